//! Redis outages: frozen, killed and restarted from its AOF, paused for writes. Nothing is
//! lost, nothing runs twice, no computed result is thrown away, and workers are back at work
//! within a second of Redis being ready. Each test runs its own redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetq_broker::local_redis::LocalRedisOptions;
use fleetq_broker::{EnqueueOptions, JobState, LocalRedis, Producer, QueueConfig, Redis};
use fleetq_tests::{direct_connection, eventually, send_signal, worker_config, FnHandler, Stack};
use fleetq_worker::{Job, JobContext, Outcome};
use serde_json::json;

/// How often each job's handler ran, by job id.
type Runs = Arc<Mutex<HashMap<String, u32>>>;

/// A handler that sleeps the payload's `ms` and counts its runs.
fn sleeper(runs: Runs) -> impl fleetq_worker::Handler {
    FnHandler::new(move |job: Job, _ctx: JobContext| {
        let runs = runs.clone();
        async move {
            *runs.lock().unwrap().entry(job.id.clone()).or_default() += 1;
            let ms = job.payload["ms"].as_u64().unwrap_or(100);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Outcome::Succeeded(json!("done"))
        }
    })
}

async fn stack_with(options: LocalRedisOptions) -> Stack {
    let server = LocalRedis::start_with(options).expect("start redis-server");
    let redis = Redis::connect(&server.url()).await.expect("connect");
    Stack { server, redis }
}

fn lease_config(lease: Duration, max_attempts: u32) -> QueueConfig {
    QueueConfig {
        lease,
        max_attempts,
        ..QueueConfig::default()
    }
}

async fn enqueue_n(p: &Producer, n: usize, ms: u64) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let opts = EnqueueOptions {
            id: Some(format!("job-{i}")),
            ..EnqueueOptions::default()
        };
        ids.push(p.enqueue(&json!({ "ms": ms }), &opts).await.unwrap().id);
    }
    ids
}

/// Waits until every job is terminal; returns the states.
async fn all_ended(p: &Producer, ids: &[String], within: Duration) -> HashMap<String, JobState> {
    let mut out = HashMap::new();
    for id in ids {
        let st = p.wait(id, within).await.unwrap();
        out.insert(id.clone(), st.state);
    }
    out
}

fn assert_each_ran_once(runs: &Runs, ids: &[String], log: &str) {
    let runs = runs.lock().unwrap();
    let twice: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "jobs ran more than once: {twice:?}\n{log}"
    );
    assert_eq!(runs.len(), ids.len(), "every job ran");
}

/// Redis frozen (SIGSTOP) for three leases while jobs with a single attempt run: every job
/// succeeds once, none is dead-lettered, none runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_for_three_leases_loses_and_repeats_nothing() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(1);
    s.configure("q", &lease_config(lease, 1)).await;
    let p = s.producer("q").await;
    let runs: Runs = Arc::default();
    let w1 = s.worker(worker_config("q", "w1", 2), sleeper(runs.clone()));
    let w2 = s.worker(worker_config("q", "w2", 2), sleeper(runs.clone()));
    let ids = enqueue_n(&p, 24, 300).await;
    eventually(Duration::from_secs(10), "some jobs done", || async {
        s.stat("q", "succeeded").await >= 4
    })
    .await;
    let pid = s.server.pid().unwrap();
    send_signal(pid, libc::SIGSTOP);
    tokio::time::sleep(lease * 3).await; // the fault itself, not a wait for a condition
    send_signal(pid, libc::SIGCONT);
    let states = all_ended(&p, &ids, Duration::from_secs(30)).await;
    let log = s.server.log();
    assert!(
        states.values().all(|st| *st == JobState::Succeeded),
        "{states:?}\n{log}"
    );
    assert_each_ran_once(&runs, &ids, &log);
    assert_eq!(s.stat("q", "dead").await, 0);
    assert_eq!(s.stat("q", "succeeded").await, ids.len() as i64);
    w1.stop().await;
    w2.stop().await;
}

/// Redis killed (-9) mid-work and restarted from its AOF after 8 s (lease 2 s): the results
/// computed during the outage are recorded, not run again, and every worker takes a job
/// within a second of Redis being ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_keeps_every_computed_result() {
    let mut s = stack_with(LocalRedisOptions {
        appendonly: true,
        // Every write on disk: this test is about the outage, not about the last second of
        // writes that `everysec` may lose (fencing tokens cover that, see functions.rs).
        extra: vec![("appendfsync".into(), "always".into())],
        ..LocalRedisOptions::default()
    })
    .await;
    let lease = Duration::from_secs(2);
    s.configure("q", &lease_config(lease, 1)).await;
    let p = s.producer("q").await;
    let runs: Runs = Arc::default();
    let nodes = ["w1", "w2", "w3"];
    let workers: Vec<_> = nodes
        .iter()
        .map(|n| s.worker(worker_config("q", n, 2), sleeper(runs.clone())))
        .collect();
    let ids = enqueue_n(&p, 40, 1500).await;
    eventually(Duration::from_secs(15), "all six slots busy", || async {
        let running = futures_running(&p, &ids).await;
        running >= 6
    })
    .await;
    s.server.kill();
    tokio::time::sleep(Duration::from_secs(8)).await; // the outage itself
    s.server.restart().unwrap();
    // Ready: the first answer from the restarted server (the test's own idle connection may
    // fail once on its way back).
    let ready_ms = loop {
        match fleetq_broker::nodes::server_ms(&s.redis).await {
            Ok(ms) => break ms,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let states = all_ended(&p, &ids, Duration::from_secs(60)).await;
    let log = s.server.log();
    assert!(
        states.values().all(|st| *st == JobState::Succeeded),
        "{states:?}\n{log}"
    );
    assert_each_ran_once(&runs, &ids, &log);
    // Each worker's first take after Redis was ready, from the job records.
    let mut first: HashMap<String, u64> = HashMap::new();
    for id in &ids {
        let st = p.status(id).await.unwrap();
        let taken = st
            .fields
            .get("taken_ms")
            .and_then(|t| t.parse::<u64>().ok());
        if let (Some(node), Some(taken)) = (st.node.clone(), taken) {
            if taken >= ready_ms {
                let e = first.entry(node).or_insert(taken);
                *e = (*e).min(taken);
            }
        }
    }
    for n in nodes {
        let after = first.get(n).map(|t| t - ready_ms);
        assert!(
            after.is_some_and(|a| a <= 1000),
            "{n} took its first job {after:?} ms after Redis was ready ({first:?})"
        );
    }
    for w in workers {
        w.stop().await;
    }
}

async fn futures_running(p: &Producer, ids: &[String]) -> usize {
    let mut n = 0;
    for id in ids {
        if p.status(id).await.unwrap().state == JobState::Running {
            n += 1;
        }
    }
    n
}

/// A 4-slot worker whose own running entries look stale (aged past the lease, deadlines in
/// the past) does not reclaim them from itself: each job runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_never_reclaims_its_own_running_jobs() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(2);
    s.configure("q", &lease_config(lease, 1)).await;
    let p = s.producer("q").await;
    let runs: Runs = Arc::default();
    let w = s.worker(worker_config("q", "w1", 4), sleeper(runs.clone()));
    let ids = enqueue_n(&p, 3, 2500).await;
    eventually(Duration::from_secs(10), "three jobs running", || async {
        futures_running(&p, &ids).await == 3
    })
    .await;
    let keys = p.keys().clone();
    let pending = s.pending("q").await;
    for (entry, owner, _, _) in &pending {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(keys.stream())
            .arg("workers")
            .arg(owner)
            .arg(0)
            .arg(entry)
            .arg("IDLE")
            .arg(60_000)
            .arg("JUSTID")
            .query_async(&mut s.conn())
            .await
            .unwrap();
        let _: i64 = redis::cmd("ZADD")
            .arg(keys.leases())
            .arg(1)
            .arg(entry)
            .query_async(&mut s.conn())
            .await
            .unwrap();
    }
    // The worker has a free slot and wakes for the lapsed deadlines at once.
    let states = all_ended(&p, &ids, Duration::from_secs(20)).await;
    assert!(
        states.values().all(|st| *st == JobState::Succeeded),
        "{states:?}"
    );
    assert_each_ran_once(&runs, &ids, "");
    assert_eq!(
        s.stat("q", "reclaimed").await,
        0,
        "nothing reclaimed from itself"
    );
    w.stop().await;
}

/// A shutdown whose release fails (Redis refuses writes meanwhile) keeps the consumer and its
/// pending entries; another worker finishes the job once Redis takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_release_at_shutdown_leaves_the_job_for_another_host() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(1);
    s.configure("q", &lease_config(lease, 3)).await;
    let p = s.producer("q").await;
    let mut cfg = worker_config("q", "leaving", 1);
    cfg.shutdown_grace = Duration::from_millis(100);
    let a = s.worker(
        cfg,
        FnHandler::new(|_, ctx: JobContext| async move {
            ctx.cancelled().await;
            Outcome::Retry("stopped".into())
        }),
    );
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "job running", || async {
        p.status(&e.id).await.unwrap().state == JobState::Running
    })
    .await;
    // Writes wait (and time out) for the next 12 s: the release cannot be recorded. The
    // test's own commands go on a connection of their own (a paused client blocks its
    // connection, and the in-process worker shares the stack's).
    let mut admin = direct_connection(&s.server.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(12_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let started = Instant::now();
    a.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "the stop did not wait for Redis"
    );
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let consumers: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(p.keys().stream())
        .arg("workers")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(
        consumers.len(),
        1,
        "the consumer with a pending entry was kept"
    );
    let b = s.worker(
        worker_config("q", "staying", 1),
        FnHandler::new(|_, _| async { Outcome::Succeeded(json!("b")) }),
    );
    let st = p.wait(&e.id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}\n{}", s.server.log());
    assert_eq!(st.node.as_deref(), Some("staying"));
    assert_eq!(s.stat("q", "succeeded").await, 1);
    b.stop().await;
}

async fn set_maxmemory(s: &Stack, bytes: u64) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(&mut s.conn())
        .await
        .unwrap();
}

/// At maxmemory with `noeviction`: a new job is refused with an error naming maxmemory,
/// while running jobs still complete and the backlog drains (the functions that drain work
/// may run at maxmemory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_maxmemory_new_jobs_are_refused_and_the_backlog_drains() {
    let s = Stack::start().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    s.configure("q", &lease_config(Duration::from_secs(2), 3))
        .await;
    let p = s.producer("q").await;
    let gate = tokio_util::sync::CancellationToken::new();
    let g = gate.clone();
    let w = s.worker(
        worker_config("q", "w1", 2),
        FnHandler::new(move |_, _| {
            let g = g.clone();
            async move {
                g.cancelled().await;
                Outcome::Succeeded(json!("done"))
            }
        }),
    );
    let payload = json!({ "blob": "x".repeat(4000) });
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(
            p.enqueue(&payload, &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    eventually(Duration::from_secs(10), "two jobs running", || async {
        futures_running(&p, &ids).await == 2
    })
    .await;
    // Full: the limit is what is used now, minus a little.
    set_maxmemory(&s, (s.used_memory().await - 10_000) as u64).await;
    let err = p
        .enqueue(&payload, &EnqueueOptions::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("maxmemory"), "{err}");
    gate.cancel();
    let states = all_ended(&p, &ids, Duration::from_secs(60)).await;
    assert!(
        states.values().all(|st| *st == JobState::Succeeded),
        "{states:?}\n{}",
        s.server.log()
    );
    // Drained, the memory is back under the limit: new jobs are taken again.
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        p.wait(&e.id, Duration::from_secs(10)).await.unwrap().state,
        JobState::Succeeded
    );
    w.stop().await;
}

/// Notes `.1` in `.0` when dropped.
struct OnDrop(Arc<Mutex<Vec<&'static str>>>, &'static str);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.lock().unwrap().push(self.1);
    }
}

/// A worker cut off from Redis (a proxy between them drops every connection) stops its running
/// job once it could not renew for lease − margin, before another worker can take it; the
/// other worker runs it, and one success is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_redis_stops_its_run_before_another_takes_it() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(2);
    s.configure("q", &lease_config(lease, 3)).await;
    let p = s.producer("q").await;
    let upstream = format!("127.0.0.1:{}", s.server.port()).parse().unwrap();
    let proxy = fleetq_tests::proxy::Proxy::start(upstream).await.unwrap();
    let through_proxy = Redis::connect(&proxy.url()).await.unwrap();
    // What happened, in order: "a stopped" when A's run saw its stop, "b started" when B ran it.
    let seen: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let a_seen = seen.clone();
    let mut a_cfg = worker_config("q", "cut-off", 1);
    a_cfg.shutdown_grace = Duration::from_millis(100);
    let a_handler = FnHandler::new(move |_, ctx: JobContext| {
        // The runtime drops a stopped handler's future: the guard notes when.
        let stopped = OnDrop(a_seen.clone(), "a stopped");
        async move {
            let _stopped = stopped;
            ctx.cancelled().await;
            Outcome::Retry("stopped".into())
        }
    });
    let a_stop = tokio_util::sync::CancellationToken::new();
    let a_task = {
        let stop = a_stop.clone();
        tokio::spawn(fleetq_worker::run(
            through_proxy,
            a_cfg,
            a_handler,
            async move { stop.cancelled().await },
        ))
    };
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the job running on the cut-off node",
        || async {
            let st = p.status(&e.id).await.unwrap();
            st.state == JobState::Running && st.node.as_deref() == Some("cut-off")
        },
    )
    .await;
    let b_seen = seen.clone();
    let b = s.worker(
        worker_config("q", "connected", 1),
        FnHandler::new(move |_, _| {
            let seen = b_seen.clone();
            async move {
                seen.lock().unwrap().push("b started");
                Outcome::Succeeded(json!("b"))
            }
        }),
    );
    proxy.cut();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    assert_eq!(st.node.as_deref(), Some("connected"));
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["a stopped", "b started"],
        "the cut-off run stopped before the other host started the job"
    );
    assert_eq!(s.stat("q", "succeeded").await, 1);
    proxy.restore();
    a_stop.cancel();
    a_task.await.unwrap().unwrap();
    b.stop().await;
}
