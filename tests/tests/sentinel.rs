//! fleetq behind Sentinel (1 primary, 1 replica, 3 sentinels): one `redis+sentinel://` URL,
//! and a failover while jobs run loses and doubles nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetq_broker::{inspect, EnqueueOptions, JobState, Producer, QueueKeys, Redis};
use fleetq_tests::sentinel::SentinelSetup;
use fleetq_tests::WorkerProcess;
use serde_json::json;

async fn enqueue(p: &Producer) -> String {
    loop {
        match p
            .enqueue(&json!({ "sleep_ms": 20 }), &EnqueueOptions::default())
            .await
        {
            Ok(e) => return e.id,
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("enqueue: {e}"),
        }
    }
}

async fn jobs_survive(fault: &str) {
    let mut setup = SentinelSetup::start().await;
    let url = setup.url();
    let redis = Redis::connect(&url).await.unwrap();
    assert_eq!(redis.topology(), "sentinel");
    let p = Producer::new(&redis, "q").await.unwrap();
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|k| WorkerProcess::spawn(&url, "q", &format!("gpu-{k}"), 2, &[]))
        .collect();
    let mut ids = Vec::new();
    for n in 0..100 {
        ids.push(enqueue(&p).await);
        if n == 40 {
            let new = match fault {
                "failover" => setup.failover().await,
                _ => setup.kill_primary().await,
            };
            let t = Instant::now();
            let probe = enqueue(&p).await;
            let st = p.wait(&probe, Duration::from_secs(20)).await.unwrap();
            assert_eq!(st.state, JobState::Succeeded);
            eprintln!(
                "{fault}: first job after the new primary {new} answered ran in {:?}",
                t.elapsed()
            );
            assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
            ids.push(probe);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in &ids {
        let st = p.wait(id, Duration::from_secs(40)).await;
        let st = st.unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(st.state, JobState::Succeeded, "{id}: {st:?}");
    }
    let state = inspect::queue_state(&redis, &QueueKeys::new("q").unwrap())
        .await
        .unwrap();
    assert_eq!(
        state.stats.get("succeeded").copied(),
        Some(ids.len() as i64),
        "{state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_while_jobs_run_loses_and_doubles_nothing() {
    jobs_survive("failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_replaced_through_sentinel_loses_and_doubles_nothing() {
    jobs_survive("kill").await;
}
