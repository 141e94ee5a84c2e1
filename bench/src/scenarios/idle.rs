//! Idle cost: K bench worker processes (the bench worker's settings: `max_block` 60 s and
//! heartbeat 30 s, the defaults) on an empty queue. Once every node record exists and a
//! further 2 s have passed, `INFO commandstats` is read at the start and the end of the
//! window; the delta divided by K and by the window is the figure (server count: inside
//! functions included), with the client count beside it.
//!
//! The fleet's idle cycle ([`crate::bench_worker::idle_cycle`]) is 60 s with the defaults:
//! the queue's two lease watchers call `fleetq_reclaim` and block once per lease, every other
//! worker once per `max_block`, and each renews its node record once per heartbeat. The full
//! run's window is whole cycles, at least 20 s ([`Plan::idle_window`]), so it follows the
//! worker's settings when they change; the quick run's 4 s window catches partial cycles, so
//! its figure is rough.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::plan::{Plan, IDLE_SETTLE};
use crate::poll;
use crate::server::{queue_config, Server};
use crate::worker_process::WorkerProcess;

const QUEUE: &str = "bench-idle";

/// What the idle scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleResult {
    /// Idle worker processes.
    pub workers: usize,
    /// The measuring window, seconds.
    pub window_s: f64,
    /// One idle cycle of a worker, seconds.
    pub cycle_s: f64,
    /// Commands Redis executed per worker per second (inside functions included).
    pub cmds_per_worker_per_sec: f64,
    /// Client commands per worker per second.
    pub client_cmds_per_worker_per_sec: f64,
}

/// Runs the scenario with worker processes started from `exe`.
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<IdleResult> {
    let k = plan.idle_workers;
    let server = Server::start().await?;
    server.configure(QUEUE, &queue_config()).await?;
    let nodes: Vec<String> = (1..=k).map(|i| format!("idle-{i:02}")).collect();
    let mut workers = Vec::with_capacity(k);
    for node in &nodes {
        workers.push(WorkerProcess::spawn(exe, &server.url(), QUEUE, node, 1)?);
    }
    poll::until(
        Duration::from_secs(60),
        Duration::from_millis(50),
        "every idle worker's node record",
        || async { Ok(server.nodes_present(&nodes).await?.then_some(())) },
    )
    .await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    for w in &mut workers {
        w.check_alive()?;
    }

    let before = server.command_stats().await?;
    let started = Instant::now();
    tokio::time::sleep(plan.idle_window).await;
    let after = server.command_stats().await?;
    let window = started.elapsed().as_secs_f64();
    let delta = after.since(&before);

    for w in &workers {
        w.signal(libc::SIGTERM)?;
    }
    for w in workers {
        w.wait_exit(Duration::from_secs(15)).await?;
    }
    let per = |calls: u64| calls as f64 / k as f64 / window;
    Ok(IdleResult {
        workers: k,
        window_s: window,
        cycle_s: crate::bench_worker::idle_cycle(queue_config().lease).as_secs_f64(),
        cmds_per_worker_per_sec: per(delta.total()),
        client_cmds_per_worker_per_sec: per(delta.client_total()),
    })
}
