//! The report of one run: every figure, and one JSON object for scripts. The targets are in
//! [`crate::targets`], the tables for people in [`crate::table`].
//!
//! A missed target is reported, not an error. Only a failed correctness check (a job not
//! succeeded exactly once) is — see [`Report::problems`].

use serde::Serialize;
use serde_json::json;

use crate::scenarios::by_step::ByStepResult;
use crate::scenarios::cluster::ClusterResult;
use crate::scenarios::dispatch::DispatchResult;
use crate::scenarios::e2e::E2eResult;
use crate::scenarios::enqueue::EnqueueResult;
use crate::scenarios::floor::FloorResult;
use crate::scenarios::idle::IdleResult;
use crate::scenarios::memory::MemoryResult;
use crate::scenarios::payload_sweep::PayloadSweep;
use crate::scenarios::recovery::RecoveryResult;
use crate::scenarios::slots::DrainBySlots;
use crate::targets::{self, TargetCheck};

/// Every figure of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// True for a `--quick` run (small counts, short windows).
    pub quick: bool,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
    /// Producer throughput.
    pub enqueue: EnqueueResult,
    /// Through one worker process, with the command counts and the exactly-once check.
    pub e2e: E2eResult,
    /// The same Redis work from one client, nothing else.
    pub floor: FloorResult,
    /// The steps of a job driven directly, each measured on its own.
    pub by_step: ByStepResult,
    /// End to end and floor with growing payloads.
    pub payload_sweep: PayloadSweep,
    /// The drain by one worker process with 1, 8 and 64 slots.
    pub drain_by_slots: DrainBySlots,
    /// Memory per waiting job.
    pub memory: MemoryResult,
    /// Idle worker cost.
    pub idle: IdleResult,
    /// Enqueue → start latency.
    pub dispatch: DispatchResult,
    /// Time to move a dead or frozen host's job.
    pub recovery: RecoveryResult,
    /// A hot queue on a 3-primary cluster, 1 partition against 3.
    pub cluster: ClusterResult,
}

impl Report {
    /// Failed correctness checks (end to end, by step, payload sweep, drain by slots,
    /// cluster); empty when every job succeeded exactly once.
    pub fn problems(&self) -> Vec<String> {
        let named = |what: &'static str, ps: &[String]| {
            ps.iter()
                .map(|p| format!("{what}, {p}"))
                .collect::<Vec<_>>()
        };
        let mut all = self.e2e.problems.clone();
        all.extend(named("by step", &self.by_step.problems));
        all.extend(named("payload sweep", &self.payload_sweep.problems));
        all.extend(named("drain by slots", &self.drain_by_slots.problems));
        all.extend(named("cluster", &self.cluster.problems));
        all
    }

    /// The busiest primary's share of Redis CPU with 3 partitions (1.0 when not measured).
    pub fn split_busiest_share(&self) -> f64 {
        self.cluster
            .run(3)
            .map_or(1.0, |r| r.busiest_primary_cpu_share)
    }

    /// `e2e_jobs_per_sec / floor_jobs_per_sec`.
    pub fn e2e_of_floor(&self) -> f64 {
        if self.floor.jobs_per_sec > 0.0 {
            self.e2e.jobs_per_sec / self.floor.jobs_per_sec
        } else {
            0.0
        }
    }

    /// The targets, each with this run's value (see [`crate::targets`]).
    pub fn targets(&self) -> Vec<TargetCheck> {
        targets::check(self)
    }

    /// The one-line JSON object: exactly the keys scripts rely on.
    pub fn to_json(&self) -> serde_json::Value {
        let top: Vec<serde_json::Value> = self
            .e2e
            .top_commands
            .iter()
            .map(|c| json!({ "command": c.command, "per_job": round(c.per_job, 3) }))
            .collect();
        json!({
            "enqueue_jobs_per_sec_single": round(self.enqueue.single_per_sec, 1),
            "enqueue_jobs_per_sec_batch": round(self.enqueue.batch_per_sec, 1),
            "enqueue_jobs_per_sec": round(self.enqueue.batch_per_sec, 1),
            "e2e_jobs_per_sec": round(self.e2e.jobs_per_sec, 1),
            "floor_jobs_per_sec": round(self.floor.jobs_per_sec, 1),
            "redis_cmds_per_job": round(self.e2e.cmds_per_job, 3),
            "redis_client_cmds_per_job": round(self.e2e.client_cmds_per_job, 3),
            "redis_cpu_us_per_job": round(self.e2e.redis_cpu_us_per_job, 1),
            "floor_redis_cpu_us_per_job": round(self.floor.redis_cpu_us_per_job, 1),
            "top_commands": top,
            "server_cmds_per_job_by_step": self.by_step.server_cmds_per_job.map(|v| round(v, 3)),
            "redis_cpu_us_by_step": self.by_step.redis_cpu_us_per_job.map(|v| round(v, 2)),
            "by_step_jobs": self.by_step.jobs,
            "maintenance_passes": self.by_step.maintenance_passes,
            "payload_sweep": self.payload_sweep_json(),
            "drain_by_slots": self.drain_by_slots_json(),
            "redis_bytes_per_waiting_job": round(self.memory.bytes_per_job, 1),
            "payload_bytes": self.memory.payload_bytes,
            "idle_cmds_per_worker_per_sec": round(self.idle.cmds_per_worker_per_sec, 3),
            "dispatch_p50_ms": round(self.dispatch.p50_ms, 3),
            "dispatch_p99_ms": round(self.dispatch.p99_ms, 3),
            "recovery_kill_s": round(self.recovery.kill_s, 3),
            "recovery_hang_s": round(self.recovery.hang_s, 3),
            "cluster": self.cluster_json(),
        })
    }

    /// The `payload_sweep` array of [`Report::to_json`].
    fn payload_sweep_json(&self) -> serde_json::Value {
        self.payload_sweep
            .runs
            .iter()
            .map(|r| {
                json!({
                    "payload_bytes": r.payload_bytes,
                    "jobs": r.jobs,
                    "jobs_per_sec": round(r.jobs_per_sec, 1),
                    "server_cmds_per_job": round(r.server_cmds_per_job, 3),
                    "redis_cpu_us_per_job": round(r.redis_cpu_us_per_job, 1),
                    "floor_redis_cpu_us_per_job": round(r.floor_redis_cpu_us_per_job, 1),
                    "worker_cpu_us_per_job": round(r.worker_cpu_us_per_job, 1),
                })
            })
            .collect()
    }

    /// The `drain_by_slots` array of [`Report::to_json`].
    fn drain_by_slots_json(&self) -> serde_json::Value {
        self.drain_by_slots
            .runs
            .iter()
            .map(|r| {
                json!({
                    "slots": r.slots,
                    "jobs": r.jobs,
                    "jobs_per_sec": round(r.jobs_per_sec, 1),
                    "server_cmds_per_job": round(r.server_cmds_per_job, 3),
                    "client_cmds_per_job": round(r.client_cmds_per_job, 3),
                    "redis_cpu_us_per_job": round(r.redis_cpu_us_per_job, 1),
                    "worker_cpu_us_per_job": round(r.worker_cpu_us_per_job, 1),
                })
            })
            .collect()
    }

    /// The `cluster` object of [`Report::to_json`].
    fn cluster_json(&self) -> serde_json::Value {
        let c = &self.cluster;
        let runs: Vec<serde_json::Value> = c
            .runs
            .iter()
            .map(|r| {
                let by_primary: Vec<f64> = r
                    .redis_cpu_us_per_job_by_primary
                    .iter()
                    .map(|v| round(*v, 1))
                    .collect();
                json!({
                    "partitions": r.partitions,
                    "jobs_per_sec": round(r.jobs_per_sec, 1),
                    "seconds": round(r.seconds, 3),
                    "redis_cpu_us_per_job_by_primary": by_primary,
                    "busiest_primary_cpu_share": round(r.busiest_primary_cpu_share, 3),
                    "worker_cpu_us_per_job": round(r.worker_cpu_us_per_job, 1),
                })
            })
            .collect();
        json!({
            "primaries": c.primaries,
            "jobs": c.jobs,
            "workers": c.workers,
            "slots": c.slots,
            "runs": runs,
            "speedup_3_over_1": round(c.speedup_3_over_1, 3),
            "exactly_once": c.problems.is_empty(),
        })
    }
}

/// `v` rounded to `places` decimals.
pub(crate) fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}
