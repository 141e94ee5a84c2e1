//! Drain by slots: the same backlog of no-op jobs drained by one worker process with 1, 8
//! and 64 slots ([`crate::plan::DRAIN_SLOTS`]), to show what batching (reads, takes) buys in
//! Redis commands and in the CPU of Redis and of the worker.
//!
//! Each is a [`crate::scenarios::drain`] run with [`Start::Ready`]: the worker is up and
//! blocked in its read before the jobs are enqueued, frozen while they are, and the clock,
//! the commands, the Redis CPU and the worker's CPU cover only the drain (from the thaw
//! until all succeeded) — not the process start, not the enqueue, not the shutdown.

use std::path::Path;

use serde::Serialize;

use crate::plan::{Plan, DRAIN_SLOTS, PAYLOAD_BYTES};
use crate::scenarios::drain::{self, Spec, Start};

const QUEUE: &str = "bench-slots";

/// One slot count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlotsRun {
    /// The worker's slots.
    pub slots: usize,
    /// Jobs drained.
    pub jobs: usize,
    /// Wall time of the drain, seconds.
    pub seconds: f64,
    /// `jobs / seconds`.
    pub jobs_per_sec: f64,
    /// Every command Redis executed during the drain, per job.
    pub server_cmds_per_job: f64,
    /// Client commands during the drain, per job.
    pub client_cmds_per_job: f64,
    /// Redis CPU during the drain, per job, µs.
    pub redis_cpu_us_per_job: f64,
    /// The worker process's CPU during the drain, per job (10 ms ticks), µs.
    pub worker_cpu_us_per_job: f64,
}

/// Every slot count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DrainBySlots {
    /// One run per slot count, in the order of [`DRAIN_SLOTS`].
    pub runs: Vec<SlotsRun>,
    /// Failed exactly-once checks, each naming its slot count.
    pub problems: Vec<String>,
}

/// Runs the scenario with worker processes started from `exe`.
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<DrainBySlots> {
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    for slots in DRAIN_SLOTS {
        tracing::info!(slots, jobs = plan.slots_jobs, "drain by one worker process");
        let spec = Spec {
            queue: QUEUE,
            node: format!("slots-{slots}"),
            jobs: plan.slots_jobs,
            payload_bytes: PAYLOAD_BYTES,
            slots,
            start: Start::Ready,
        };
        let r = drain::run(&spec, exe).await?;
        problems.extend(r.problems.iter().map(|p| format!("{slots} slots, {p}")));
        runs.push(SlotsRun {
            slots,
            jobs: r.jobs,
            seconds: r.seconds,
            jobs_per_sec: r.jobs_per_sec(),
            server_cmds_per_job: r.per_job(r.drain.stats.total()),
            client_cmds_per_job: r.per_job(r.drain.stats.client_total()),
            redis_cpu_us_per_job: r.us_per_job(r.drain.cpu),
            worker_cpu_us_per_job: r.us_per_job(r.worker_cpu),
        });
    }
    Ok(DrainBySlots { runs, problems })
}
