//! The report of one run: every figure, the targets beside them with pass/miss, a table for
//! people and one JSON object for scripts.
//!
//! Targets are not assertions: a missed target is reported, not an error. Only a failed
//! correctness check (a job not succeeded exactly once) is — see [`Report::problems`].

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;
use serde_json::json;

use crate::scenarios::cluster::ClusterResult;
use crate::scenarios::dispatch::DispatchResult;
use crate::scenarios::e2e::E2eResult;
use crate::scenarios::enqueue::EnqueueResult;
use crate::scenarios::floor::FloorResult;
use crate::scenarios::idle::IdleResult;
use crate::scenarios::memory::MemoryResult;
use crate::scenarios::recovery::RecoveryResult;

/// Target: client commands (round trips) per job, at most.
pub const TARGET_CLIENT_CMDS_PER_JOB: f64 = 3.0;
/// Target: end-to-end throughput as a share of the floor, at least.
pub const TARGET_E2E_OF_FLOOR: f64 = 0.5;
/// Target: Redis bytes per waiting job above the payload size, at most.
pub const TARGET_BYTES_OVER_PAYLOAD: f64 = 100.0;
/// Target: commands per idle worker per second (server count), at most.
pub const TARGET_IDLE_CMDS_PER_SEC: f64 = 0.5;
/// Target: 99th percentile of enqueue → start with idle slots, ms, at most.
pub const TARGET_DISPATCH_P99_MS: f64 = 2.0;
/// Target: recovery after a host freezes, beyond the lease, seconds, at most.
pub const TARGET_RECOVERY_OVER_LEASE_S: f64 = 1.0;
/// Target: recovery after a worker process is killed, seconds, at most (its connections close,
/// so the broker need not wait for the lease).
pub const TARGET_RECOVERY_KILL_S: f64 = 1.5;

/// Target: with 3 partitions on 3 primaries, the busiest primary's share of the Redis CPU
/// of the drain, less than (with 1 partition it is about 1.0).
pub const TARGET_BUSIEST_PRIMARY_SHARE: f64 = 0.6;

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

/// One target and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetCheck {
    /// What is checked.
    pub figure: String,
    /// The measured value, as shown.
    pub measured: String,
    /// The target, as shown.
    pub target: String,
    /// True when met.
    pub pass: bool,
}

impl Report {
    /// Failed correctness checks (end to end, then cluster); empty when every job succeeded
    /// exactly once.
    pub fn problems(&self) -> Vec<String> {
        let cluster = self
            .cluster
            .problems
            .iter()
            .map(|p| format!("cluster, {p}"));
        self.e2e.problems.iter().cloned().chain(cluster).collect()
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

    /// The targets, each with this run's value.
    pub fn targets(&self) -> Vec<TargetCheck> {
        let check = |figure: &str, measured: String, target: String, pass: bool| TargetCheck {
            figure: figure.to_owned(),
            measured,
            target,
            pass,
        };
        let bytes_limit = self.memory.payload_bytes as f64 + TARGET_BYTES_OVER_PAYLOAD;
        let recovery_limit = self.recovery.lease_s + TARGET_RECOVERY_OVER_LEASE_S;
        vec![
            check(
                "Redis commands per job (client count)",
                format!("{:.2}", self.e2e.client_cmds_per_job),
                format!("≤ {TARGET_CLIENT_CMDS_PER_JOB:.1}"),
                self.e2e.client_cmds_per_job <= TARGET_CLIENT_CMDS_PER_JOB,
            ),
            check(
                "e2e / floor",
                format!("{:.2}", self.e2e_of_floor()),
                format!("≥ {TARGET_E2E_OF_FLOOR:.2}"),
                self.e2e_of_floor() >= TARGET_E2E_OF_FLOOR,
            ),
            check(
                "Redis bytes per waiting job",
                format!("{:.0}", self.memory.bytes_per_job),
                format!("≤ {bytes_limit:.0} (payload + {TARGET_BYTES_OVER_PAYLOAD:.0})"),
                self.memory.bytes_per_job <= bytes_limit,
            ),
            check(
                "idle commands per worker per s (server count)",
                format!("{:.2}", self.idle.cmds_per_worker_per_sec),
                format!("≤ {TARGET_IDLE_CMDS_PER_SEC:.1}"),
                self.idle.cmds_per_worker_per_sec <= TARGET_IDLE_CMDS_PER_SEC,
            ),
            check(
                "dispatch p99 (Redis clock)",
                format!("{:.0} ms", self.dispatch.p99_ms),
                format!("≤ {TARGET_DISPATCH_P99_MS:.0} ms"),
                self.dispatch.p99_ms <= TARGET_DISPATCH_P99_MS,
            ),
            check(
                "recovery after SIGKILL",
                format!("{:.2} s", self.recovery.kill_s),
                format!("≤ {TARGET_RECOVERY_KILL_S} s"),
                self.recovery.kill_s <= TARGET_RECOVERY_KILL_S,
            ),
            check(
                "recovery after SIGSTOP",
                format!("{:.2} s", self.recovery.hang_s),
                format!("≤ {recovery_limit:.0} s (lease + 1)"),
                self.recovery.hang_s <= recovery_limit,
            ),
            check(
                "cluster, 3 partitions: busiest primary's share of Redis CPU",
                format!("{:.2}", self.split_busiest_share()),
                format!("< {TARGET_BUSIEST_PRIMARY_SHARE:.1}"),
                self.split_busiest_share() < TARGET_BUSIEST_PRIMARY_SHARE,
            ),
        ]
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
            "top_commands": top,
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

    /// The figures with their targets.
    pub fn table(&self) -> Table {
        let targets = self.targets();
        let verdict = |i: usize| {
            targets.get(i).map_or((String::new(), String::new()), |t| {
                (
                    t.target.clone(),
                    if t.pass { "pass" } else { "MISS" }.to_owned(),
                )
            })
        };
        let mut t = new_table(&["figure", "value", "target", "result"]);
        let mut row = |figure: String, value: String, target: Option<usize>| {
            let (goal, result) = target.map_or((String::new(), String::new()), verdict);
            t.add_row(vec![figure, value, goal, result]);
        };
        let e = &self.enqueue;
        row(
            format!("enqueue, one at a time ({} jobs)", e.single_jobs),
            format!("{:.0} jobs/s", e.single_per_sec),
            None,
        );
        row(
            format!(
                "enqueue, batches of {} ({} jobs)",
                e.batch_size, e.batch_jobs
            ),
            format!("{:.0} jobs/s", e.batch_per_sec),
            None,
        );
        row(
            format!(
                "enqueue, batches, group never read: XRANGE position path ({} jobs)",
                e.cold_batch_jobs
            ),
            format!("{:.0} jobs/s", e.cold_batch_per_sec),
            None,
        );
        let x = &self.e2e;
        row(
            format!(
                "end to end: {} no-op jobs, 1 worker process × {} slots",
                x.jobs, x.slots
            ),
            format!("{:.0} jobs/s ({:.2} s)", x.jobs_per_sec, x.seconds),
            None,
        );
        let f = &self.floor;
        row(
            format!(
                "floor: XREADGROUP COUNT {} + XACK/XDEL/HSET per job, 1 client, pipelined",
                f.read_count
            ),
            format!("{:.0} jobs/s ({:.2} s)", f.jobs_per_sec, f.seconds),
            None,
        );
        row(
            "  Redis CPU per job: e2e (worker phase) / floor".into(),
            format!(
                "{:.1} / {:.1} µs",
                x.redis_cpu_us_per_job, f.redis_cpu_us_per_job
            ),
            None,
        );
        row(
            "  e2e: Redis time inside FCALL per job / worker process CPU per job".into(),
            format!(
                "{:.1} / {:.1} µs",
                x.fcall_us_per_job, x.worker_cpu_us_per_job
            ),
            None,
        );
        row(
            "e2e / floor".into(),
            format!("{:.2}", self.e2e_of_floor()),
            Some(1),
        );
        row(
            "Redis commands per job, client count (target checked on this)".into(),
            format!("{:.2}", x.client_cmds_per_job),
            Some(0),
        );
        row(
            "Redis commands per job, server count (inside functions included)".into(),
            format!("{:.2}", x.cmds_per_job),
            None,
        );
        row(
            "  of which enqueue (client / server)".into(),
            format!(
                "{:.2} / {:.2}",
                x.enqueue_client_cmds_per_job, x.enqueue_cmds_per_job
            ),
            None,
        );
        row(
            "  Redis time inside fleetq_enqueue per job".into(),
            format!("{:.1} µs", x.enqueue_fcall_us_per_job),
            None,
        );
        let m = &self.memory;
        row(
            format!(
                "Redis bytes per waiting job ({} jobs, payload {} B)",
                m.jobs, m.payload_bytes
            ),
            format!("{:.0} B", m.bytes_per_job),
            Some(2),
        );
        let i = &self.idle;
        let partial = if self.quick {
            "; quick: shorter than the 10 s cycle, partial"
        } else {
            ""
        };
        row(
            format!(
                "idle: commands per worker per s, server count ({} workers, {:.0} s{partial})",
                i.workers, i.window_s
            ),
            format!("{:.3}", i.cmds_per_worker_per_sec),
            Some(3),
        );
        row(
            "idle: commands per worker per s, client count".into(),
            format!("{:.3}", i.client_cmds_per_worker_per_sec),
            None,
        );
        let d = &self.dispatch;
        row(
            format!(
                "dispatch p50 / p99 / max, Redis clock, 1 ms resolution ({} jobs at {}/s)",
                d.jobs, d.rate
            ),
            format!("{:.0} / {:.0} / {:.0} ms", d.p50_ms, d.p99_ms, d.max_ms),
            Some(4),
        );
        row(
            format!(
                "dispatch p50 / p99 observed by the harness, upper bound ({} jobs)",
                d.observed_jobs
            ),
            format!("{:.2} / {:.2} ms", d.observed_p50_ms, d.observed_p99_ms),
            None,
        );
        let r = &self.recovery;
        row(
            format!("recovery after SIGKILL (lease {:.0} s)", r.lease_s),
            format!("{:.2} s", r.kill_s),
            Some(5),
        );
        row(
            format!("recovery after SIGSTOP (lease {:.0} s)", r.lease_s),
            format!("{:.2} s", r.hang_s),
            Some(6),
        );
        let c = &self.cluster;
        for r in &c.runs {
            let cpu: Vec<String> = r
                .redis_cpu_us_per_job_by_primary
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect();
            row(
                format!(
                    "cluster ({} primaries): {} no-op jobs, {} partition(s), {} worker processes × {} slots",
                    c.primaries, c.jobs, r.partitions, c.workers, c.slots
                ),
                format!("{:.0} jobs/s ({:.2} s)", r.jobs_per_sec, r.seconds),
                None,
            );
            row(
                format!(
                    "  Redis CPU per job by primary; busiest primary's share ({} partition(s))",
                    r.partitions
                ),
                format!("{} µs; {:.2}", cpu.join(" / "), r.busiest_primary_cpu_share),
                (r.partitions == 3).then_some(7),
            );
            row(
                format!(
                    "  worker processes' CPU per job, all together ({} partition(s))",
                    r.partitions
                ),
                format!("{:.1} µs", r.worker_cpu_us_per_job),
                None,
            );
        }
        row(
            "cluster: jobs/s with 3 partitions / with 1 (this run; bound by the cores here)".into(),
            format!("{:.2}", c.speedup_3_over_1),
            None,
        );
        let problems = self.problems();
        row(
            "every job succeeded exactly once".into(),
            if problems.is_empty() {
                "yes".into()
            } else {
                format!("NO: {}", problems.join("; "))
            },
            None,
        );
        t
    }

    /// The most called commands of the end-to-end run, per job.
    pub fn commands_table(&self) -> Table {
        let mut t = new_table(&["command (end to end)", "calls per job"]);
        for c in &self.e2e.top_commands {
            t.add_row(vec![c.command.clone(), format!("{:.3}", c.per_job)]);
        }
        t
    }
}

fn new_table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    t
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}
