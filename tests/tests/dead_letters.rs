//! An operator's hands on the dead letters (`fleetq_dead_retry`, `fleetq_dead_purge`): a
//! retried dead letter runs again as a fresh job, a purge removes what it names or all.
//! With `core_queue.rs` and `functions.rs` these tests call every function of the library,
//! and the `core_on_valkey` target runs them on Valkey too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::{inspect, EnqueueOptions, JobState};
use fleetq_tests::{eventually, quick_queue_config, worker_config, FnHandler, Server, Stack};
use fleetq_worker::Outcome;
use serde_json::json;

/// The server these tests run on. As its own test target this file runs on Redis; the
/// `core_on_valkey` target includes it as a module and its `crate::SERVER` is Valkey (then
/// this one is unused).
#[allow(dead_code)]
const SERVER: Server = Server::Redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_dead_letter_runs_again_and_purges_remove_the_rest() {
    let s = Stack::start_on(crate::SERVER).await;
    s.configure("q", &quick_queue_config()).await;
    let p = s.producer("q").await;
    let keys = p.keys().clone();
    // Every job fails until the model is back; one attempt each, so each dies at once.
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    // Three failures in a row would suspend the node (and so the retried job) for a minute.
    let mut config = worker_config("q", "n1", 1);
    config.suspend_after = 0;
    let w = s.worker(
        config,
        FnHandler::new(move |job, _| {
            let healed = h.load(Ordering::SeqCst);
            async move {
                if healed {
                    Outcome::Succeeded(job.payload)
                } else {
                    Outcome::Retry("model missing".into())
                }
            }
        }),
    );
    for id in ["a", "b", "c"] {
        let opts = EnqueueOptions {
            id: Some(id.into()),
            max_attempts: Some(1),
            ..EnqueueOptions::default()
        };
        p.enqueue(&json!({ "job": id }), &opts).await.unwrap();
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Dead, "{st:?}");
    }
    let dead = inspect::dead_letters(&s.redis, &keys, "-", 10)
        .await
        .unwrap();
    let jobs: Vec<&str> = dead.iter().map(|d| d.job.as_str()).collect();
    assert_eq!(jobs, ["a", "b", "c"]);
    assert!(
        dead.iter().all(|d| d.reason == "attempts_exhausted"),
        "{dead:?}"
    );

    // Retried once the model is back: a fresh job (attempts start over) that succeeds.
    healed.store(true, Ordering::SeqCst);
    let again = inspect::retry_dead(&s.redis, &keys, &dead[0].dead_id)
        .await
        .unwrap();
    assert_eq!(again.as_deref(), Some("a"));
    let st = p.wait("a", Duration::from_secs(10)).await.unwrap();
    assert_eq!((st.state, st.attempts), (JobState::Succeeded, 1), "{st:?}");
    assert_eq!(st.result.unwrap()["job"], "a");
    // The dead letter left with the retry: a second retry of it finds nothing.
    assert_eq!(
        inspect::retry_dead(&s.redis, &keys, &dead[0].dead_id)
            .await
            .unwrap(),
        None
    );

    // A purge by id removes that one; a purge of nothing named removes the rest.
    let b = vec![dead[1].dead_id.clone()];
    assert_eq!(inspect::purge_dead(&s.redis, &keys, &b).await.unwrap(), 1);
    assert_eq!(inspect::purge_dead(&s.redis, &keys, &b).await.unwrap(), 0);
    assert_eq!(inspect::purge_dead(&s.redis, &keys, &[]).await.unwrap(), 1);
    eventually(Duration::from_secs(5), "no dead letters left", || async {
        inspect::dead_letters(&s.redis, &keys, "-", 10)
            .await
            .unwrap()
            .is_empty()
    })
    .await;
    w.stop().await;
}
