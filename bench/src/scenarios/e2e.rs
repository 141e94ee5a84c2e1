//! End to end: N no-op jobs through ONE worker process with 8 slots.
//!
//! A [`drain`] run with [`Start::AfterEnqueue`]: all jobs are enqueued first
//! (`enqueue_batch`), then the worker process is started, and the clock runs from its spawn
//! until the stats hash says all N succeeded, so the time includes the process start (tens
//! of ms). The command counts cover the jobs' whole lifecycle (enqueue, reads, takes,
//! heartbeats, results, shutdown), less the harness's own polling; the Redis CPU covers the
//! enqueue and the drain (`INFO cpu`, user + sys). The exactly-once check is the drain's.

use std::path::Path;

use serde::Serialize;

use crate::commandstats::CommandStats;
use crate::plan::{Plan, PAYLOAD_BYTES, WORKER_SLOTS};
use crate::scenarios::drain::{self, DrainRun, Spec, Start};

const QUEUE: &str = "bench-e2e";
const NODE: &str = "e2e-1";
/// Commands listed in the report.
const TOP_COMMANDS: usize = 12;

/// Calls of one command per job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRate {
    /// The commandstats name (`hset`, `fcall`, `xgroup|create`).
    pub command: String,
    /// Calls divided by the number of jobs.
    pub per_job: f64,
}

/// What the end-to-end run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct E2eResult {
    /// Jobs through the worker.
    pub jobs: usize,
    /// The worker's slots.
    pub slots: usize,
    /// From the worker's spawn until all jobs succeeded, seconds.
    pub seconds: f64,
    /// `jobs / seconds`.
    pub jobs_per_sec: f64,
    /// Every command Redis executed over the lifecycle, per job (inside functions included).
    pub cmds_per_job: f64,
    /// Client commands (see [`crate::commandstats`]) over the lifecycle, per job.
    pub client_cmds_per_job: f64,
    /// The enqueue phase's share of [`E2eResult::cmds_per_job`].
    pub enqueue_cmds_per_job: f64,
    /// The enqueue phase's share of [`E2eResult::client_cmds_per_job`].
    pub enqueue_client_cmds_per_job: f64,
    /// Redis CPU time per job over the enqueue and the drain (`INFO cpu`), µs.
    pub redis_cpu_us_per_job: f64,
    /// Of which while the worker ran (the drain), µs.
    pub drain_redis_cpu_us_per_job: f64,
    /// Redis time inside `FCALL` during the drain per job (commandstats `usec` of `fcall`;
    /// take, complete, renew, reclaim, heartbeat), µs.
    pub fcall_us_per_job: f64,
    /// The worker process's CPU time per job (`/proc/<pid>/stat`, 10 ms ticks, its start
    /// included), µs; 0 when unknown.
    pub worker_cpu_us_per_job: f64,
    /// Redis time inside `fleetq_enqueue` per job (commandstats), µs.
    pub enqueue_fcall_us_per_job: f64,
    /// The most called commands over the lifecycle.
    pub top_commands: Vec<CommandRate>,
    /// Failed exactly-once checks (empty when all passed).
    pub problems: Vec<String>,
}

impl E2eResult {
    /// The figures of a [`drain`] run.
    pub fn from_run(r: &DrainRun) -> Self {
        let lifecycle = r.lifecycle();
        E2eResult {
            jobs: r.jobs,
            slots: r.slots,
            seconds: r.seconds,
            jobs_per_sec: r.jobs_per_sec(),
            cmds_per_job: r.per_job(lifecycle.total()),
            client_cmds_per_job: r.per_job(lifecycle.client_total()),
            enqueue_cmds_per_job: r.per_job(r.enqueue.stats.total()),
            enqueue_client_cmds_per_job: r.per_job(r.enqueue.stats.client_total()),
            redis_cpu_us_per_job: r.redis_cpu_us_per_job(),
            drain_redis_cpu_us_per_job: r.us_per_job(r.drain.cpu),
            fcall_us_per_job: r.per_job(r.drain.stats.usec("fcall")),
            worker_cpu_us_per_job: r.us_per_job(r.worker_cpu),
            enqueue_fcall_us_per_job: r.per_job(r.enqueue.stats.usec("fcall")),
            top_commands: top(&lifecycle, r.jobs),
            problems: r.problems.clone(),
        }
    }
}

/// Runs the scenario with worker processes started from `exe`.
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<E2eResult> {
    let spec = Spec {
        queue: QUEUE,
        node: NODE.to_owned(),
        jobs: plan.e2e_jobs,
        payload_bytes: PAYLOAD_BYTES,
        slots: WORKER_SLOTS,
        start: Start::AfterEnqueue,
    };
    Ok(E2eResult::from_run(&drain::run(&spec, exe).await?))
}

fn top(stats: &CommandStats, jobs: usize) -> Vec<CommandRate> {
    stats
        .top(TOP_COMMANDS)
        .into_iter()
        .map(|(command, calls)| CommandRate {
            command,
            per_job: calls as f64 / jobs.max(1) as f64,
        })
        .collect()
}
