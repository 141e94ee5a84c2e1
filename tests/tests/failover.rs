//! Hosts that die, freeze or stop: jobs move on within the lease, exactly one success is
//! recorded, and a graceful stop gives work back at once without burning an attempt.
//! Each worker here is a process of its own (`fleetq-test-worker`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetq_broker::{EnqueueOptions, JobState, QueueConfig};
use fleetq_tests::{eventually, Stack, WorkerProcess};
use serde_json::json;

async fn running_on(p: &fleetq_broker::Producer, id: &str, node: &str) -> bool {
    let st = p.status(id).await.unwrap();
    st.state == JobState::Running && st.node.as_deref() == Some(node)
}

async fn events_of(s: &Stack, queue: &str, kind: &str, job: &str) -> usize {
    s.events(queue)
        .await
        .iter()
        .filter(|e| {
            e.get("type").map(String::as_str) == Some(kind)
                && e.get("job").map(String::as_str) == Some(job)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_job_completes_elsewhere_within_lease_plus_2s_once() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(2);
    s.configure(
        "q",
        &QueueConfig {
            lease,
            ..QueueConfig::default()
        },
    )
    .await;
    let p = s.producer("q").await;
    let url = s.server.url();
    let a = WorkerProcess::spawn(&url, "q", "node-a", 1, &[]);
    let e = p
        .enqueue(
            &json!({"sleep_ms": 1000, "result": "r"}),
            &EnqueueOptions::default(),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "job running on node-a", || {
        running_on(&p, &e.id, "node-a")
    })
    .await;
    let b = WorkerProcess::spawn(&url, "q", "node-b", 1, &[]);
    // Let B start and go idle (its first read is then blocked until A's lease deadline).
    eventually(Duration::from_secs(15), "node-b registered", || async {
        let consumers: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(p.keys().stream())
            .arg("workers")
            .query_async(&mut s.conn())
            .await
            .unwrap();
        consumers.len() == 2
    })
    .await;
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    eventually(
        lease + Duration::from_secs(2),
        "job started on node-b",
        || running_on(&p, &e.id, "node-b"),
    )
    .await;
    let moved = killed.elapsed();
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}\nB log:\n{}", b.log());
    assert_eq!(st.result.unwrap()["node"], "node-b");
    assert_eq!(st.attempts, 2, "the reclaim counts as an attempt");
    assert_eq!(st.nodes, vec!["node-a", "node-b"]);
    assert_eq!(s.stat("q", "succeeded").await, 1);
    assert_eq!(events_of(&s, "q", "succeeded", &e.id).await, 1);
    assert!(s.stat("q", "reclaimed").await >= 1);
    assert!(
        moved <= lease + Duration::from_secs(2),
        "moved after {moved:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_cannot_record_its_result() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(1);
    s.configure(
        "q",
        &QueueConfig {
            lease,
            ..QueueConfig::default()
        },
    )
    .await;
    let p = s.producer("q").await;
    let url = s.server.url();
    let a = WorkerProcess::spawn(&url, "q", "node-a", 1, &["--heartbeat-ms", "200"]);
    let e = p
        .enqueue(&json!({"sleep_ms": 1500}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "job running on node-a", || {
        running_on(&p, &e.id, "node-a")
    })
    .await;
    a.signal(libc::SIGSTOP);
    let b = WorkerProcess::spawn(&url, "q", "node-b", 1, &[]);
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}\nB log:\n{}", b.log());
    assert_eq!(st.result.as_ref().unwrap()["node"], "node-b");
    // A wakes up with a finished handler and a stale lease. Whichever it notices first (its
    // lease lost on renewal, its own self-fencing, or a refused commit), it must record
    // nothing and let the job go: its node record shows it idle again, after the wake-up.
    let woke_ms = fleetq_broker::nodes::server_ms(&s.redis).await.unwrap();
    a.signal(libc::SIGCONT);
    eventually(
        Duration::from_secs(10),
        "node-a idle again after waking",
        || async {
            let nodes = fleetq_broker::nodes::list(&s.redis).await.unwrap();
            nodes.iter().any(|n| {
                let num = |f: &str| n.fields.get(f).and_then(|v| v.parse::<u64>().ok());
                n.node == "node-a" && num("busy") == Some(0) && num("last_seen_ms") > Some(woke_ms)
            })
        },
    )
    .await;
    let after = p.status(&e.id).await.unwrap();
    assert_eq!(after.state, JobState::Succeeded);
    assert_eq!(
        after.result.unwrap()["node"],
        "node-b",
        "A's late result was not recorded"
    );
    assert_eq!(s.stat("q", "succeeded").await, 1);
    assert_eq!(events_of(&s, "q", "succeeded", &e.id).await, 1);
    let pending = s.pending("q").await;
    assert!(
        pending.is_empty(),
        "nothing left pending: {pending:?}\nA log:\n{}",
        a.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_short_jobs_and_releases_long_ones() {
    let s = Stack::start().await;
    // Default lease (10 s): released jobs must move far sooner than a lease.
    let p = s.producer("q").await;
    let url = s.server.url();
    let mut a = WorkerProcess::spawn(&url, "q", "node-a", 3, &["--grace-ms", "700"]);
    let short = p
        .enqueue(&json!({"sleep_ms": 200}), &EnqueueOptions::default())
        .await
        .unwrap();
    let long1 = p
        .enqueue(&json!({"sleep_ms": 3000}), &EnqueueOptions::default())
        .await
        .unwrap();
    let long2 = p
        .enqueue(&json!({"sleep_ms": 3000}), &EnqueueOptions::default())
        .await
        .unwrap();
    for id in [&long1.id, &long2.id] {
        eventually(
            Duration::from_secs(15),
            "long job running on node-a",
            || running_on(&p, id, "node-a"),
        )
        .await;
    }
    let b = WorkerProcess::spawn(&url, "q", "node-b", 2, &[]);
    a.signal(libc::SIGTERM);
    let stopped = Instant::now();
    let code = a.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "A log:\n{}", a.log());
    let st = p.wait(&short.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        st.result.unwrap()["node"],
        "node-a",
        "the short job finished within the grace period"
    );
    for id in [&long1.id, &long2.id] {
        eventually(
            Duration::from_secs(5),
            "released job running on node-b",
            || running_on(&p, id, "node-b"),
        )
        .await;
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "released jobs waited {:?}",
        stopped.elapsed()
    );
    for id in [&long1.id, &long2.id] {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "B log:\n{}", b.log());
        assert_eq!(st.result.unwrap()["node"], "node-b");
        assert_eq!(st.attempts, 1, "a release does not burn an attempt");
    }
    assert_eq!(s.stat("q", "released").await, 2);
    // The stopped worker removed its consumer.
    let consumers: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(p.keys().stream())
        .arg("workers")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(consumers.len(), 1);
}

/// A killed worker's connections close: the broker's crash detection (driven here tick by
/// tick, as `fleetq-broker` runs it every 250 ms) sees it gone and puts its job back in line
/// long before the (default, 10 s) lease would run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_moves_on_before_its_lease_runs_out() {
    use fleetq_broker::liveness::{self, Liveness};
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let url = s.server.url();
    let a = WorkerProcess::spawn(&url, "q", "node-a", 1, &[]);
    let e = p
        .enqueue(&json!({"sleep_ms": 60_000}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "job running on node-a", || {
        running_on(&p, &e.id, "node-a")
    })
    .await;
    let b = WorkerProcess::spawn(&url, "q", "node-b", 1, &[]);
    eventually(Duration::from_secs(15), "node-b registered", || async {
        fleetq_broker::nodes::list(&s.redis).await.unwrap().len() == 2
    })
    .await;
    let queues = vec![p.keys().clone()];
    let mut seen = Liveness::new();
    // The broker has seen A connected (a look now, and one after GONE_AFTER of its own).
    liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    tokio::time::sleep(liveness::GONE_AFTER).await; // the broker's own clock, not a wait for a condition
    liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    assert_eq!(
        s.stat("q", "abandoned").await,
        0,
        "A is alive: nothing moves"
    );
    a.signal(libc::SIGKILL);
    let killed = std::time::Instant::now();
    while s.stat("q", "abandoned").await == 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "A's job not put back in line"
        );
        tokio::time::sleep(liveness::DEFAULT_INTERVAL).await; // the broker's tick
        liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    }
    eventually(Duration::from_secs(5), "job running on node-b", || {
        running_on(&p, &e.id, "node-b")
    })
    .await;
    assert_eq!(s.stat("q", "reclaimed").await, 0, "B log:\n{}", b.log());
}

/// Redis frozen while a worker's connection drops (its calls timed out; it reconnects once
/// Redis answers): the broker, which could not look during the freeze, does not take the
/// name missing right after it for a gone process, and the entry stays with its holder. A
/// name that stays missing after that is still caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_of_redis_is_not_the_death_of_a_reconnecting_worker() {
    use fleetq_broker::liveness::{self, Liveness};
    let s = Stack::start().await;
    let p = s.producer("q").await;
    p.enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let client = redis::Client::open(s.server.url()).unwrap();
    let holder = || async {
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg("c1")
            .query_async(&mut c)
            .await
            .unwrap();
        c
    };
    let mut c1 = holder().await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(fleetq_broker::keys::GROUP)
        .arg("c1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(p.keys().stream())
        .arg(">")
        .query_async(&mut c1)
        .await
        .unwrap();
    let queues = vec![p.keys().clone()];
    let mut seen = Liveness::new();
    liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    tokio::time::sleep(liveness::GONE_AFTER).await; // the broker's own clock, not a wait for a condition
    liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();

    let pid = s.server.pid().unwrap();
    fleetq_tests::send_signal(pid, libc::SIGSTOP);
    drop(c1);
    tokio::time::sleep(Duration::from_millis(1500)).await; // the fault itself
    fleetq_tests::send_signal(pid, libc::SIGCONT);
    // The first look after the freeze: c1's old connection is closed, its new one not yet up.
    liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    let _c1 = holder().await;
    for _ in 0..4 {
        tokio::time::sleep(liveness::DEFAULT_INTERVAL).await; // the broker's tick
        liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    }
    assert_eq!(
        s.stat("q", "abandoned").await,
        0,
        "c1 reconnected: nothing moves"
    );

    drop(_c1);
    let dropped = Instant::now();
    while s.stat("q", "abandoned").await == 0 {
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "c1 gone for good, its entry not put back in line"
        );
        tokio::time::sleep(liveness::DEFAULT_INTERVAL).await; // the broker's tick
        liveness::tick(&s.redis, &queues, &mut seen).await.unwrap();
    }
}
