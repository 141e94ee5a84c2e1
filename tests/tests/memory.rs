//! Memory stays flat: after 10 000 jobs the stream is empty and Redis is back near where it
//! started once the finished jobs' retention has passed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetq_broker::{QueueConfig, QueueKeys};
use fleetq_tests::{eventually, worker_config, FnHandler, Stack};
use fleetq_worker::Outcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_leave_nothing_behind() {
    const JOBS: usize = 10_000;
    let s = Stack::start().await;
    s.configure(
        "q",
        &QueueConfig {
            retention: Duration::from_millis(500),
            events_maxlen: 100,
            ..QueueConfig::default()
        },
    )
    .await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    // Warm up: one job through the whole path, so that the baseline includes the group,
    // the consumer and the (capped) events stream.
    let w = s.worker(
        worker_config("q", "n1", 8),
        FnHandler::new(|_, _| async { Outcome::Succeeded(serde_json::json!({"ok": true})) }),
    );
    let warm = p
        .enqueue(&serde_json::json!({}), &Default::default())
        .await
        .unwrap();
    p.wait(&warm.id, Duration::from_secs(10)).await.unwrap();
    let dbsize = |s: &Stack| {
        let mut c = s.conn();
        async move {
            redis::cmd("DBSIZE")
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    let job_hashes = |s: &Stack| {
        let mut c = s.conn();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(QueueKeys::new("q").unwrap().job("*"))
                .query_async(&mut c)
                .await
                .unwrap();
            keys.len()
        }
    };
    eventually(
        Duration::from_secs(10),
        "warm-up job hash expired",
        || async { job_hashes(&s).await == 0 },
    )
    .await;
    let keys_before = dbsize(&s).await;
    let before = s.used_memory().await;

    let payload = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(180));
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(500) {
        let batch = vec![payload.clone(); chunk.len()];
        p.enqueue_batch(&batch).await.unwrap();
    }
    eventually(Duration::from_secs(120), "all jobs succeeded", || async {
        s.stat("q", "succeeded").await == JOBS as i64 + 1
    })
    .await;
    let len: i64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(len, 0);
    eventually(Duration::from_secs(30), "job hashes expired", || async {
        dbsize(&s).await <= keys_before
    })
    .await;
    let after = s.used_memory().await;
    assert!(
        after - before < 256 * 1024,
        "used_memory grew by {} bytes over {JOBS} jobs (before {before}, after {after})",
        after - before
    );
    w.stop().await;
}
