//! The core queue end to end: enqueue → run → result, idempotency, positions, retries and
//! dead letters, malformed entries, cancel, memory staying flat.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetq_broker::{EnqueueOptions, JobState, QueueConfig, QueueKeys};
use fleetq_tests::{eventually, quick_queue_config, worker_config, FnHandler, Server, Stack};
use fleetq_worker::Outcome;
use serde_json::json;

/// The server these tests run on. As its own test target this file runs on Redis; the
/// `core_on_valkey` target includes it as a module and its `crate::SERVER` is Valkey (then
/// this one is unused).
#[allow(dead_code)]
const SERVER: Server = Server::Redis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_run_result() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("img").await;
    let w = s.worker(
        worker_config("img", "gpu-a", 2),
        FnHandler::new(|job, _| async move {
            Outcome::Succeeded(json!({ "doubled": job.payload["n"].as_i64().unwrap() * 2 }))
        }),
    );
    let e = p
        .enqueue(&json!({"n": 21}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(e.created);
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    assert_eq!(st.result.unwrap()["doubled"], 42);
    assert_eq!(st.attempts, 1);
    assert_eq!(st.node.as_deref(), Some("gpu-a"));
    // The finished entry left the stream.
    let len: u64 = redis::cmd("XLEN")
        .arg(p.keys().stream())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(len, 0);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_enqueue_returns_the_same_job() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("q").await;
    let opts = EnqueueOptions {
        id: Some("order-17".into()),
        ..EnqueueOptions::default()
    };
    let a = p.enqueue(&json!({"x": 1}), &opts).await.unwrap();
    let b = p.enqueue(&json!({"x": 2}), &opts).await.unwrap();
    assert_eq!(a.id, "order-17");
    assert_eq!(b.id, "order-17");
    assert!(a.created);
    assert!(!b.created);
    assert_eq!(b.state, JobState::Waiting);
    assert_eq!(b.position, 1);
    let len: u64 = redis::cmd("XLEN")
        .arg(p.keys().stream())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(len, 1, "the second enqueue added nothing");

    // Runs once; a third enqueue after the end still returns the finished job.
    let w = s.worker(
        worker_config("q", "n1", 1),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    let st = p.wait("order-17", Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.result.unwrap()["x"], 1);
    let c = p.enqueue(&json!({"x": 3}), &opts).await.unwrap();
    assert_eq!((c.state, c.created), (JobState::Succeeded, false));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_of_the_kth_waiting_job_is_k() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("q").await;
    let mut ids = Vec::new();
    for k in 1..=20u64 {
        let e = p
            .enqueue(&json!({"k": k}), &EnqueueOptions::default())
            .await
            .unwrap();
        assert_eq!(e.position, k);
        ids.push(e.id);
    }
    for (k, id) in ids.iter().enumerate() {
        assert_eq!(p.status(id).await.unwrap().position, Some(k as u64 + 1));
    }
    // A worker takes 5 (one slot each, never prefetching): positions move up by 5.
    let gate = tokio_util::sync::CancellationToken::new();
    let g = gate.clone();
    let w = s.worker(
        worker_config("q", "n1", 5),
        FnHandler::new(move |_, _| {
            let g = g.clone();
            async move {
                g.cancelled().await;
                Outcome::Succeeded(json!(null))
            }
        }),
    );
    let last = ids[19].clone();
    eventually(Duration::from_secs(10), "five jobs taken", || {
        let p = p.clone();
        let last = last.clone();
        async move { p.status(&last).await.unwrap().position == Some(15) }
    })
    .await;
    assert_eq!(p.status(&ids[5]).await.unwrap().position, Some(1));
    assert_eq!(p.status(&ids[0]).await.unwrap().state, JobState::Running);
    // Plain XADD jobs (no seq field) get a position too.
    let plain: String = redis::cmd("XADD")
        .arg(p.keys().stream())
        .arg("*")
        .arg("payload")
        .arg("{}")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(p.status(&plain).await.unwrap().position, Some(16));
    gate.cancel();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_backoff_then_dead_letter() {
    let s = Stack::start_on(crate::SERVER).await;
    s.configure("q", &quick_queue_config()).await;
    let p = s.producer("q").await;
    let h = FnHandler::new(|job, _| async move {
        Outcome::Retry(format!("boom on attempt {}", job.attempt))
    });
    let calls = h.calls.clone();
    let w = s.worker(worker_config("q", "n1", 1), h);
    let e = p
        .enqueue(
            &json!({}),
            &EnqueueOptions {
                max_attempts: Some(3),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Dead, "{st:?}");
    assert_eq!(st.attempts, 3);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert!(
        st.error.as_deref().unwrap().contains("boom on attempt 3"),
        "{st:?}"
    );
    assert_eq!(s.stat("q", "retried").await, 2);
    let keys = QueueKeys::new("q").unwrap();
    let dead: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let f: std::collections::HashMap<_, _> = dead[0].1.iter().cloned().collect();
    assert_eq!(f["job"], e.id);
    assert_eq!(f["reason"], "attempts_exhausted");
    assert_eq!(f["attempts"], "3");
    assert_eq!(f["f:payload"], "{}");
    assert!(f["error"].contains("boom on attempt 3"));
    // Backoff was applied: the retries were delayed, not immediate.
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.events())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let retrying: Vec<u64> = events
        .iter()
        .filter(|(_, f)| f.iter().any(|(k, v)| k == "type" && v == "retrying"))
        .map(|(_, f)| {
            f.iter()
                .find(|(k, _)| k == "delay_ms")
                .unwrap()
                .1
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(retrying.len(), 2);
    assert!(
        retrying.iter().all(|d| (37..=250).contains(d)),
        "{retrying:?}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_failure_ends_failed_without_retry() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("q").await;
    let w = s.worker(
        worker_config("q", "n1", 1),
        FnHandler::new(|_, _| async { Outcome::Fail("prompt is empty".into()) }),
    );
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Failed);
    assert_eq!(st.error.as_deref(), Some("prompt is empty"));
    assert_eq!(st.attempts, 1);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_while_good_jobs_flow() {
    let s = Stack::start_on(crate::SERVER).await;
    s.configure(
        "q",
        &QueueConfig {
            max_payload_bytes: 1000,
            ..quick_queue_config()
        },
    )
    .await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let w = s.worker(
        worker_config("q", "n1", 2),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    let big = format!("\"{}\"", "x".repeat(2000));
    let bad: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![("data", "{}".into())], "no payload"),
        (vec![("payload", "{not json".into())], "not valid JSON"),
        (vec![("payload", big)], "over the queue limit"),
        (
            vec![("payload", "{}".into()), ("max_attempts", "lots".into())],
            "max_attempts",
        ),
        (
            vec![("payload", "{}".into()), ("queue_timeout_ms", "-5".into())],
            "queue_timeout_ms",
        ),
    ];
    let mut good = Vec::new();
    for (fields, _) in &bad {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys.stream()).arg("*");
        for (f, v) in fields {
            cmd.arg(*f).arg(v);
        }
        let _: String = cmd.query_async(&mut s.conn()).await.unwrap();
        good.push(
            p.enqueue(&json!({"ok": true}), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    for id in &good {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded);
    }
    eventually(Duration::from_secs(10), "5 dead letters", || async {
        let n: u64 = redis::cmd("XLEN")
            .arg(keys.dead())
            .query_async(&mut s.conn())
            .await
            .unwrap();
        n == 5
    })
    .await;
    let dead: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    for ((_, want), (_, fields)) in bad.iter().zip(&dead) {
        let f: std::collections::HashMap<_, _> = fields.iter().cloned().collect();
        assert_eq!(f["reason"], "malformed");
        assert!(f["error"].contains(want), "{} lacks {want}", f["error"]);
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waiting_and_running_jobs() {
    let s = Stack::start_on(crate::SERVER).await;
    s.configure(
        "q",
        &QueueConfig {
            lease: Duration::from_millis(600),
            ..quick_queue_config()
        },
    )
    .await;
    let p = s.producer("q").await;
    // No worker yet: cancel a waiting job.
    let waiting = p
        .enqueue(&json!({"n": 1}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(p.cancel(&waiting.id).await.unwrap(), JobState::Cancelled);
    assert_eq!(
        p.status(&waiting.id).await.unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(p.cancel("no-such-job").await.unwrap(), JobState::NotFound);

    let h = FnHandler::new(|job, ctx: fleetq_worker::JobContext| async move {
        if job.payload["hang"] == true {
            ctx.cancelled().await;
            return Outcome::Retry("should not be recorded".into());
        }
        Outcome::Succeeded(job.payload)
    });
    let calls = h.calls.clone();
    let w = s.worker(worker_config("q", "n1", 1), h);
    let running = p
        .enqueue(&json!({"hang": true}), &EnqueueOptions::default())
        .await
        .unwrap();
    let id = running.id.clone();
    eventually(Duration::from_secs(10), "job running", || {
        let p = p.clone();
        let id = id.clone();
        async move { p.status(&id).await.unwrap().state == JobState::Running }
    })
    .await;
    assert_eq!(p.cancel(&running.id).await.unwrap(), JobState::Cancelling);
    let st = p.wait(&running.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Cancelled);
    // The cancelled waiting job never ran; a later job still runs.
    let after = p
        .enqueue(&json!({"n": 2}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        p.wait(&after.id, Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        JobState::Succeeded
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_times_out_and_unknown_ids_are_not_found() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("q").await;
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let err = p.wait(&e.id, Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(err, fleetq_broker::Error::Timeout { .. }), "{err}");
    let st = p.wait("nope", Duration::from_secs(5)).await.unwrap();
    assert_eq!(st.state, JobState::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_to_enqueue_is_refused_with_a_clear_error() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("q").await;
    let err = p
        .enqueue_json("{oops", &EnqueueOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, fleetq_broker::Error::Rejected(_)), "{err:?}");
    assert!(
        err.to_string().contains("payload is not valid JSON"),
        "{err}"
    );
    assert!(!err.to_string().contains("user_function"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn position_is_exact_before_the_first_delivery() {
    let s = Stack::start_on(crate::SERVER).await;
    let p = s.producer("q").await;
    // A worker created the group but has delivered nothing yet.
    s.create_group("q").await;
    for k in 1..=5u64 {
        let e = p
            .enqueue(&json!({"k": k}), &EnqueueOptions::default())
            .await
            .unwrap();
        assert_eq!(e.position, k);
    }
    // The cheap path: no XRANGE walk over the backlog.
    let calls: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert!(
        !calls.contains("cmdstat_xrange:"),
        "position walked the stream:\n{calls}"
    );
}

/// A field name that is not UTF-8 is dead-lettered with the reason, and the good jobs read
/// in the same batch run: it neither jams the worker nor strands its neighbours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_name_that_is_not_utf8_is_dead_lettered_and_its_batch_runs() {
    let s = Stack::start_on(crate::SERVER).await;
    s.configure("q", &quick_queue_config()).await;
    s.create_group("q").await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let mut good = Vec::new();
    for n in 0..6 {
        if n == 3 {
            let _: String = redis::cmd("XADD")
                .arg(keys.stream())
                .arg("*")
                .arg(&b"\xff\xfe"[..])
                .arg("x")
                .arg("payload")
                .arg("{}")
                .query_async(&mut s.conn())
                .await
                .unwrap();
        }
        good.push(
            p.enqueue(&json!({ "n": n }), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    // One worker with room for the whole batch: the bad entry is read with the good ones.
    let w = s.worker(
        worker_config("q", "n1", 8),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    for id in &good {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{id}");
    }
    eventually(Duration::from_secs(10), "one dead letter", || async {
        let n: u64 = redis::cmd("XLEN")
            .arg(keys.dead())
            .query_async(&mut s.conn())
            .await
            .unwrap();
        n == 1
    })
    .await;
    type ByteEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);
    let dead: Vec<ByteEntry> = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let field = |name: &str| {
        dead[0]
            .1
            .iter()
            .find(|(f, _)| f == name.as_bytes())
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("reason"), "malformed");
    assert!(field("error").contains("not UTF-8"), "{}", field("error"));
    // The original bytes are kept in the dead letter.
    assert!(
        dead[0].1.iter().any(|(f, _)| f == b"f:\xff\xfe"),
        "{dead:?}"
    );
    assert!(s.pending("q").await.is_empty(), "nothing left in flight");
    // Listed like any other dead letter.
    let listed = fleetq_broker::inspect::dead_letters(&s.redis, &keys, "-", 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].error.contains("not UTF-8"), "{:?}", listed[0]);
    let bad_id = fleetq_broker::inspect::retry_dead(&s.redis, &keys, "not-an-id").await;
    assert!(
        matches!(&bad_id, Err(fleetq_broker::Error::Config(m)) if m.contains("<ms>-<seq>")),
        "{bad_id:?}"
    );
    w.stop().await;
}
