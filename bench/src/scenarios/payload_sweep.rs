//! The payload sweep: what a job costs as its payload grows — 200 B, 10 KB and 1 MB (10^6
//! bytes, under the default `max_payload_bytes` of 1 MiB) — beside the floor for the same
//! payload, so that fleetq's CPU "excluding the copy of the payload itself" is fleetq less
//! the floor (the floor moves the same bytes in and out of Redis too).
//!
//! Each size is an end-to-end run ([`crate::scenarios::drain`], [`Start::AfterEnqueue`], one
//! worker process with 8 slots) and a floor run ([`crate::scenarios::floor::run_with`]) of
//! the same jobs; the bigger sizes run [`Plan::payload_rounds`] such pairs and report the
//! median one by its cost over the floor. The 200-byte row is the end-to-end scenario and the floor scenario of this
//! run themselves (the same method and payload); the bigger sizes run with fewer jobs
//! ([`Plan::payload_sweep`]) and smaller enqueue batches ([`crate::plan::enqueue_batch`]).

use std::path::Path;

use serde::Serialize;

use crate::plan::{Plan, WORKER_SLOTS};
use crate::scenarios::drain::{self, Spec, Start};
use crate::scenarios::e2e::E2eResult;
use crate::scenarios::floor::{self, FloorResult};

const QUEUE: &str = "bench-payload";

/// One payload size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PayloadRun {
    /// Bytes of each payload.
    pub payload_bytes: usize,
    /// Jobs.
    pub jobs: usize,
    /// End to end, jobs per second (from the worker's spawn).
    pub jobs_per_sec: f64,
    /// Every command Redis executed over the lifecycle, per job.
    pub server_cmds_per_job: f64,
    /// Redis CPU over enqueue and drain, per job, µs.
    pub redis_cpu_us_per_job: f64,
    /// The floor's Redis CPU over its `XADD`s and loop, per job, µs.
    pub floor_redis_cpu_us_per_job: f64,
    /// The worker process's CPU per job (its start included), µs.
    pub worker_cpu_us_per_job: f64,
}

impl PayloadRun {
    /// Redis CPU per job beyond the floor's for the same payload, µs.
    pub fn over_floor_us(&self) -> f64 {
        self.redis_cpu_us_per_job - self.floor_redis_cpu_us_per_job
    }

    fn new(e2e: &E2eResult, floor: &FloorResult) -> Self {
        Self {
            payload_bytes: floor.payload_bytes,
            jobs: e2e.jobs,
            jobs_per_sec: e2e.jobs_per_sec,
            server_cmds_per_job: e2e.cmds_per_job,
            redis_cpu_us_per_job: e2e.redis_cpu_us_per_job,
            floor_redis_cpu_us_per_job: floor.redis_cpu_us_per_job,
            worker_cpu_us_per_job: e2e.worker_cpu_us_per_job,
        }
    }
}

/// Every size of one sweep, smallest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PayloadSweep {
    /// One run per size.
    pub runs: Vec<PayloadRun>,
    /// Failed exactly-once checks, each naming its payload size.
    pub problems: Vec<String>,
}

impl PayloadSweep {
    /// The run with the smallest payload and the one with the biggest.
    pub fn ends(&self) -> Option<(&PayloadRun, &PayloadRun)> {
        Some((self.runs.first()?, self.runs.last()?))
    }
}

/// Runs the sweep; `e2e` and `floor_200` are this run's end-to-end and floor results (the
/// 200-byte row).
pub async fn run(
    plan: &Plan,
    exe: &Path,
    e2e: &E2eResult,
    floor_200: &FloorResult,
) -> anyhow::Result<PayloadSweep> {
    let mut runs = vec![PayloadRun::new(e2e, floor_200)];
    let mut problems = Vec::new();
    for &(payload_bytes, jobs) in &plan.payload_sweep {
        let mut rounds = Vec::with_capacity(plan.payload_rounds);
        for round in 1..=plan.payload_rounds.max(1) {
            tracing::info!(
                payload_bytes,
                jobs,
                round,
                "payload sweep: end to end, then the floor"
            );
            let spec = Spec {
                queue: QUEUE,
                node: format!("payload-{payload_bytes}"),
                jobs,
                payload_bytes,
                slots: WORKER_SLOTS,
                start: Start::AfterEnqueue,
            };
            let r = E2eResult::from_run(&drain::run(&spec, exe).await?);
            problems.extend(
                r.problems
                    .iter()
                    .map(|p| format!("payload {payload_bytes} B, round {round}, {p}")),
            );
            let f = floor::run_with(jobs, payload_bytes).await?;
            rounds.push(PayloadRun::new(&r, &f));
        }
        // The median round by its cost over the floor.
        rounds.sort_by(|a, b| a.over_floor_us().total_cmp(&b.over_floor_us()));
        runs.push(rounds.swap_remove(rounds.len() / 2));
    }
    Ok(PayloadSweep { runs, problems })
}
