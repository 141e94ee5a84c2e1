//! The incidents fleetq exists to prevent, replayed against real Redis and real worker
//! processes (times shortened): no queue, stale generation, start timeout, progress-aware
//! stall, busy is not an error, queue and run timeouts, poison jobs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetq_broker::{
    maintenance, nodes, EnqueueOptions, JobState, Producer, QueueConfig, QueueKeys,
};
use fleetq_tests::{eventually, worker_config, FnHandler, Stack, WorkerProcess};
use fleetq_worker::{JobContext, Outcome, Progress};
use serde_json::json;

fn quick(cfg: QueueConfig) -> QueueConfig {
    QueueConfig {
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(100),
        ..cfg
    }
}

async fn wait_all(p: &Producer, ids: &[String]) -> Vec<fleetq_broker::JobStatus> {
    let mut out = Vec::new();
    for id in ids {
        out.push(p.wait(id, Duration::from_secs(30)).await.unwrap());
    }
    out
}

async fn registered(s: &Stack, n: usize) {
    eventually(Duration::from_secs(15), "nodes registered", || async {
        nodes::list(&s.redis).await.unwrap().len() >= n
    })
    .await;
}

/// 1. No queue: one node with one slot; three jobs at once all complete, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_queue_one_slot_three_jobs_all_complete_in_order() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let _w = WorkerProcess::spawn(&s.server.url(), "q", "gpu-1", 1, &[]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let e = p
            .enqueue(&json!({"sleep_ms": 400}), &EnqueueOptions::default())
            .await
            .unwrap();
        ids.push(e.id);
    }
    let done = wait_all(&p, &ids).await;
    let mut last_end = 0u64;
    for st in &done {
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
        assert_eq!(st.attempts, 1);
        let end: u64 = st.fields["ended_ms"].parse().unwrap();
        assert!(end >= last_end, "jobs finished out of order");
        last_end = end;
    }
    assert_eq!(
        s.stat("q", "failed").await + s.stat("q", "retried").await,
        0
    );
}

/// 2. Stale generation: a node takes jobs and hangs. Each job moves to a healthy node within
/// the progress timeout, never back to the hanging node; after 3 in a row it suspends itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_generation_jobs_move_and_the_hanging_node_is_suspended() {
    let s = Stack::start().await;
    let progress_timeout = Duration::from_millis(800);
    s.configure(
        "q",
        &quick(QueueConfig {
            progress_timeout: Some(progress_timeout),
            lease: Duration::from_secs(2),
            ..QueueConfig::default()
        }),
    )
    .await;
    let p = s.producer("q").await;
    let url = s.server.url();
    let stuck = WorkerProcess::spawn(
        &url,
        "q",
        "stuck",
        3,
        &["--mode", "hang", "--suspend-after", "3"],
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            p.enqueue(
                &json!({"steps": 3, "step_ms": 100}),
                &EnqueueOptions::default(),
            )
            .await
            .unwrap()
            .id,
        );
    }
    for id in &ids {
        let id = id.clone();
        let p = p.clone();
        eventually(
            Duration::from_secs(15),
            "job taken by the hanging node",
            move || {
                let (p, id) = (p.clone(), id.clone());
                async move { p.status(&id).await.unwrap().node.as_deref() == Some("stuck") }
            },
        )
        .await;
    }
    let taken = Instant::now();
    let healthy = WorkerProcess::spawn(&url, "q", "healthy", 2, &[]);
    for _ in 0..3 {
        ids.push(
            p.enqueue(
                &json!({"steps": 3, "step_ms": 100}),
                &EnqueueOptions::default(),
            )
            .await
            .unwrap()
            .id,
        );
    }
    let done = wait_all(&p, &ids).await;
    for st in &done {
        assert_eq!(
            st.state,
            JobState::Succeeded,
            "{st:?}\nhealthy log:\n{}",
            healthy.log()
        );
        assert_eq!(st.result.as_ref().unwrap()["node"], "healthy");
        let on_stuck = st.nodes.iter().filter(|n| *n == "stuck").count();
        assert!(
            on_stuck <= 1,
            "job went back to the hanging node: {:?}",
            st.nodes
        );
    }
    // The first three moved within the progress timeout (plus their own run time and slack).
    assert!(
        taken.elapsed() < progress_timeout + Duration::from_secs(5),
        "{:?}",
        taken.elapsed()
    );
    assert_eq!(s.stat("q", "node:stuck:timeout:progress").await, 3);
    let record = nodes::list(&s.redis)
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.node == "stuck")
        .unwrap();
    assert!(
        record.suspended_until() > nodes::server_ms(&s.redis).await.unwrap(),
        "{record:?}"
    );
    let ev = s.events("q").await;
    assert!(ev
        .iter()
        .any(|e| e["type"] == "node_suspended" && e["node"] == "stuck"));
    let timeouts: Vec<_> = ev.iter().filter(|e| e["type"] == "timeout").collect();
    assert!(
        timeouts
            .iter()
            .all(|e| e["node"] == "stuck" && e["kind"] == "progress"),
        "{timeouts:?}"
    );
    drop(stuck);
}

/// 3. Start timeout: a node accepts jobs but never starts them; the job completes elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_timeout_fires_and_the_job_completes_elsewhere() {
    let s = Stack::start().await;
    let start_timeout = Duration::from_millis(700);
    s.configure(
        "q",
        &quick(QueueConfig {
            start_timeout: Some(start_timeout),
            ..QueueConfig::default()
        }),
    )
    .await;
    let p = s.producer("q").await;
    let url = s.server.url();
    let _never = WorkerProcess::spawn(&url, "q", "loader", 1, &["--mode", "never-start"]);
    let e = p
        .enqueue(&json!({"sleep_ms": 50}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "job taken by the loader",
        || async {
            let st = p.status(&e.id).await.unwrap();
            st.state == JobState::Taken && st.node.as_deref() == Some("loader")
        },
    )
    .await;
    let _ok = WorkerProcess::spawn(&url, "q", "ready", 1, &[]);
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(st.result.unwrap()["node"], "ready");
    let history: serde_json::Value = serde_json::from_str(&st.fields["history"]).unwrap();
    let first = &history[0];
    assert_eq!(first["node"], "loader");
    assert_eq!(first["timeout"], "start");
    let elapsed = first["elapsed_ms"].as_u64().unwrap();
    assert!(
        (700..1700).contains(&elapsed),
        "start timeout fired after {elapsed} ms"
    );
    assert_eq!(s.stat("q", "node:loader:timeout:start").await, 1);
}

/// 4. A long job that reports progress steadily is not timed out; one that stops is, and the
/// error names its stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_resets_the_stall_timer_and_silence_trips_it() {
    let s = Stack::start().await;
    s.configure(
        "q",
        &quick(QueueConfig {
            progress_timeout: Some(Duration::from_millis(500)),
            max_attempts: 1,
            ..QueueConfig::default()
        }),
    )
    .await;
    let p = s.producer("q").await;
    let mut cfg = worker_config("q", "n1", 2);
    cfg.progress_interval = Duration::from_millis(200);
    let w = s.worker(
        cfg,
        FnHandler::new(|job, ctx: JobContext| async move {
            let stall_after = job.payload["stall_after"].as_u64();
            ctx.progress(Progress::stage("load")).await;
            for step in 1..=8u64 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if stall_after.is_some_and(|k| step > k) {
                    std::future::pending::<()>().await;
                }
                ctx.progress(Progress::step(step, 8).in_stage("KSampler"))
                    .await;
            }
            Outcome::Succeeded(json!({"steps": 8}))
        }),
    );
    let steady = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let stalls = p
        .enqueue(&json!({"stall_after": 2}), &EnqueueOptions::default())
        .await
        .unwrap();
    let ok = p.wait(&steady.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(ok.state, JobState::Succeeded, "{ok:?}");
    assert_eq!(
        ok.progress.as_ref().unwrap()["step"],
        8,
        "the last report landed"
    );
    let stages: serde_json::Value = serde_json::from_str(&ok.fields["stages"]).unwrap();
    assert_eq!(stages[0]["name"], "load");
    assert_eq!(stages[1]["name"], "KSampler");
    assert!(
        stages[1]["duration_ms"].as_u64().unwrap() >= 1000,
        "{stages}"
    );
    let bad = p.wait(&stalls.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(bad.state, JobState::Dead);
    let err = bad.error.unwrap();
    assert!(
        err.contains("progress timeout") && err.contains("in stage KSampler"),
        "{err}"
    );
    assert_eq!(bad.fields["timeout"], "progress");
    assert_eq!(bad.fields["timeout_stage"], "KSampler");
    assert_eq!(s.stat("q", "timeout:progress").await, 1);
    w.stop().await;
}

/// 5. Busy is not an error: with every slot busy, enqueue answers at once with a position,
/// and the job runs when a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_is_not_an_error() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let gate = tokio_util::sync::CancellationToken::new();
    let g = gate.clone();
    let w = s.worker(
        worker_config("q", "n1", 1),
        FnHandler::new(move |job, _| {
            let g = g.clone();
            async move {
                if job.payload["block"] == true {
                    g.cancelled().await;
                }
                Outcome::Succeeded(json!("done"))
            }
        }),
    );
    let first = p
        .enqueue(&json!({"block": true}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "slot busy", || async {
        p.status(&first.id).await.unwrap().state == JobState::Running
    })
    .await;
    let t = Instant::now();
    let second = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let third = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "enqueue waited for a slot"
    );
    assert_eq!((second.state, second.position), (JobState::Waiting, 1));
    assert_eq!(third.position, 2);
    assert_eq!(p.status(&third.id).await.unwrap().position, Some(2));
    gate.cancel();
    for id in [&first.id, &second.id, &third.id] {
        assert_eq!(
            p.wait(id, Duration::from_secs(10)).await.unwrap().state,
            JobState::Succeeded
        );
    }
    w.stop().await;
}

/// 6a. Queue timeout expires waiting jobs even when no worker is alive; a worker that comes
/// later does not run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_expires_waiting_jobs_without_any_worker() {
    let s = Stack::start().await;
    s.configure(
        "q",
        &QueueConfig {
            queue_timeout: Some(Duration::from_millis(300)),
            ..QueueConfig::default()
        },
    )
    .await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    // The group exists (workers ran before) but none is alive now.
    s.create_group("q").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            p.enqueue(&json!({}), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let own = p
        .enqueue(
            &json!({}),
            &EnqueueOptions {
                queue_timeout: Some(Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let waiter = {
        let (p, id) = (p.clone(), ids[0].clone());
        tokio::spawn(async move { p.wait(&id, Duration::from_secs(20)).await.unwrap() })
    };
    // The broker's maintenance step, as any broker runs it every second.
    eventually(Duration::from_secs(10), "jobs expired", || async {
        maintenance::tick(&s.redis, &keys).await.unwrap();
        s.stat("q", "expired").await == 3
    })
    .await;
    let woken = waiter.await.unwrap();
    assert_eq!(woken.state, JobState::Expired);
    assert!(woken.error.unwrap().contains("queue timeout"));
    assert_eq!(
        p.status(&own.id).await.unwrap().state,
        JobState::Waiting,
        "its own longer timeout holds"
    );
    assert_eq!(s.stat("q", "tombstones").await, 3);
    let h = FnHandler::new(|_, _| async { Outcome::Succeeded(json!(1)) });
    let calls = h.calls.clone();
    let w = s.worker(worker_config("q", "n1", 2), h);
    assert_eq!(
        p.wait(&own.id, Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        JobState::Succeeded
    );
    eventually(
        Duration::from_secs(10),
        "expired entries dropped",
        || async {
            let len: u64 = redis::cmd("XLEN")
                .arg(keys.stream())
                .query_async(&mut s.conn())
                .await
                .unwrap();
            len == 0
        },
    )
    .await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "expired jobs never ran"
    );
    assert_eq!(s.stat("q", "tombstones").await, 0);
    for id in &ids {
        assert_eq!(p.status(id).await.unwrap().state, JobState::Expired);
    }
    w.stop().await;
}

/// 6b. Run timeout caps a job that progresses forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_timeout_caps_a_job_that_progresses_forever() {
    let s = Stack::start().await;
    s.configure(
        "q",
        &quick(QueueConfig {
            progress_timeout: Some(Duration::from_millis(400)),
            run_timeout: Some(Duration::from_millis(900)),
            max_attempts: 1,
            ..QueueConfig::default()
        }),
    )
    .await;
    let p = s.producer("q").await;
    let w = s.worker(
        worker_config("q", "n1", 1),
        FnHandler::new(|_, ctx: JobContext| async move {
            for step in 0.. {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ctx.progress(Progress::step(step, u64::MAX)).await;
            }
            Outcome::Succeeded(json!(null))
        }),
    );
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.fields["timeout"], "run");
    let elapsed: u64 = st.fields["timeout_elapsed_ms"].parse().unwrap();
    assert!((900..2000).contains(&elapsed), "{elapsed}");
    w.stop().await;
}

/// 7. A job that fails on M distinct nodes is poison: dead-lettered, no node suspended for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_job_is_dead_lettered_after_m_distinct_nodes() {
    let s = Stack::start().await;
    let mut cfg = quick(QueueConfig {
        max_attempts: 10,
        ..QueueConfig::default()
    });
    cfg.lease = Duration::from_secs(2);
    s.configure("q", &cfg).await;
    let _: () = redis::cmd("HSET")
        .arg(QueueKeys::new("q").unwrap().config())
        .arg("poison_nodes")
        .arg(3)
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let p = s.producer("q").await;
    let url = s.server.url();
    let _ws: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| WorkerProcess::spawn(&url, "q", n, 1, &["--suspend-after", "2"]))
        .collect();
    registered(&s, 3).await;
    let e = p
        .enqueue(&json!({"fail": "retry"}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st.state, JobState::Dead, "{st:?}");
    assert_eq!(st.fields["reason"], "poison");
    assert_eq!(st.attempts, 3);
    let mut distinct = st.nodes.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{:?}", st.nodes);
    // A good job still runs: nobody was suspended for the poison.
    let good = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        p.wait(&good.id, Duration::from_secs(10))
            .await
            .unwrap()
            .state,
        JobState::Succeeded
    );
    assert!(!s
        .events("q")
        .await
        .iter()
        .any(|e| e["type"] == "node_suspended"));
    for n in nodes::list(&s.redis).await.unwrap() {
        assert_eq!(n.suspended_until(), 0, "{n:?}");
    }
}

/// An operator suspends and resumes a node by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_suspends_and_resumes_a_node() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let _w = WorkerProcess::spawn(&s.server.url(), "q", "gpu-9", 1, &["--heartbeat-ms", "200"]);
    registered(&s, 1).await;
    assert!(nodes::suspend(&s.redis, "gpu-9", Duration::from_secs(60))
        .await
        .unwrap());
    assert!(
        !nodes::suspend(&s.redis, "no-such-node", Duration::from_secs(60))
            .await
            .unwrap()
    );
    eventually(Duration::from_secs(10), "node suspended", || async {
        nodes::list(&s.redis).await.unwrap()[0].suspended_until() > 0
    })
    .await;
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(
        matches!(
            p.wait(&e.id, Duration::from_millis(800)).await,
            Err(fleetq_broker::Error::Timeout { .. })
        ),
        "a suspended node takes nothing"
    );
    assert!(nodes::resume(&s.redis, "gpu-9").await.unwrap());
    assert_eq!(
        p.wait(&e.id, Duration::from_secs(10)).await.unwrap().state,
        JobState::Succeeded
    );
}

/// A node that failed a workflow is blocked for it: another job of that workflow is handed
/// on to a healthy node even when the blocked node is the one that reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_failed_a_workflow_hands_its_jobs_on() {
    let s = Stack::start().await;
    s.configure("q", &quick(QueueConfig::default())).await;
    let p = s.producer("q").await;
    let gate = tokio_util::sync::CancellationToken::new();
    let sick = s.worker(
        worker_config("q", "sick", 1),
        FnHandler::new(|_, _| async { Outcome::Retry("CUDA error: out of memory".into()) }),
    );
    let sdxl = EnqueueOptions {
        workflow: Some("sdxl".into()),
        ..Default::default()
    };
    let first = p.enqueue(&json!({}), &sdxl).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "first job failed on sick",
        || async {
            p.status(&first.id)
                .await
                .unwrap()
                .nodes
                .first()
                .map(String::as_str)
                == Some("sick")
        },
    )
    .await;
    let g = gate.clone();
    let healthy = s.worker(
        worker_config("q", "healthy", 1),
        FnHandler::new(move |job, _| {
            let g = g.clone();
            async move {
                if job.payload["hold"] == true {
                    g.cancelled().await;
                }
                Outcome::Succeeded(json!("ok"))
            }
        }),
    );
    assert_eq!(
        p.wait(&first.id, Duration::from_secs(10))
            .await
            .unwrap()
            .nodes,
        vec!["sick", "healthy"]
    );
    // Keep healthy busy, then offer the sick node another sdxl job: it must hand it on.
    let hold = p
        .enqueue(&json!({"hold": true}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "healthy busy", || async {
        p.status(&hold.id).await.unwrap().node.as_deref() == Some("healthy")
    })
    .await;
    let second = p.enqueue(&json!({}), &sdxl).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "sick handed the job on",
        || async { s.stat("q", "passed").await >= 1 },
    )
    .await;
    gate.cancel();
    let st = p.wait(&second.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(st.nodes, vec!["healthy"], "the blocked node never ran it");
    assert_eq!(st.attempts, 1, "handing on does not use an attempt");
    sick.stop().await;
    healthy.stop().await;
}
