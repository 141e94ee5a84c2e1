//! The tables for people: every figure with its target and pass/miss, and the most called
//! commands of the end-to-end run.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};

use crate::report::Report;
use crate::targets::Goal;

impl Report {
    /// The figures with their targets.
    pub fn table(&self) -> Table {
        let targets = self.targets();
        let verdict = |goal: Goal| {
            targets
                .iter()
                .find(|t| t.goal == goal)
                .map_or((String::new(), String::new()), |t| {
                    (
                        t.target.clone(),
                        if t.pass { "pass" } else { "MISS" }.to_owned(),
                    )
                })
        };
        let mut t = new_table(&["figure", "value", "target", "result"]);
        let mut row = |figure: String, value: String, goal: Option<Goal>| {
            let (target, result) = goal.map_or((String::new(), String::new()), verdict);
            t.add_row(vec![figure, value, target, result]);
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
            "e2e / floor".into(),
            format!("{:.2}", self.e2e_of_floor()),
            Some(Goal::E2eOfFloor),
        );
        row(
            "Redis CPU per job, enqueue + drain: e2e / floor (INFO cpu)".into(),
            format!(
                "{:.1} / {:.1} µs",
                x.redis_cpu_us_per_job, f.redis_cpu_us_per_job
            ),
            Some(Goal::RedisCpu),
        );
        row(
            "  of which the drain: e2e (worker phase) / floor (its loop)".into(),
            format!(
                "{:.1} / {:.1} µs",
                x.drain_redis_cpu_us_per_job, f.loop_redis_cpu_us_per_job
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
            "Redis commands per job, server count (inside functions included)".into(),
            format!("{:.2}", x.cmds_per_job),
            Some(Goal::ServerCmds),
        );
        row(
            "Redis commands per job, client count".into(),
            format!("{:.2}", x.client_cmds_per_job),
            Some(Goal::ClientCmds),
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
        self.by_step_rows(&mut row);
        self.sweep_rows(&mut row);
        self.slots_rows(&mut row);
        let m = &self.memory;
        row(
            format!(
                "Redis bytes per waiting job ({} jobs, payload {} B)",
                m.jobs, m.payload_bytes
            ),
            format!("{:.0} B", m.bytes_per_job),
            Some(Goal::Bytes),
        );
        let i = &self.idle;
        let partial = if i.window_s + 0.5 < i.cycle_s {
            "; shorter than the idle cycle, partial"
        } else {
            ""
        };
        row(
            format!(
                "idle: commands per worker per s, server count ({} workers, {:.0} s window, {:.0} s cycle{partial})",
                i.workers, i.window_s, i.cycle_s
            ),
            format!("{:.3}", i.cmds_per_worker_per_sec),
            Some(Goal::Idle),
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
            Some(Goal::Dispatch),
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
            Some(Goal::RecoveryKill),
        );
        row(
            format!("recovery after SIGSTOP (lease {:.0} s)", r.lease_s),
            format!("{:.2} s", r.hang_s),
            Some(Goal::RecoveryHang),
        );
        self.cluster_rows(&mut row);
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

    /// The by-step breakdown.
    fn by_step_rows(&self, row: &mut impl FnMut(String, String, Option<Goal>)) {
        let b = &self.by_step;
        let steps = |v: &crate::scenarios::by_step::ByStep<f64>, places: usize| {
            format!(
                "{:.p$} / {:.p$} / {:.p$} / {:.p$} (sum {:.p$})",
                v.enqueue,
                v.take,
                v.complete,
                v.maintenance,
                v.sum(),
                p = places
            )
        };
        row(
            format!(
                "by step, {} jobs driven directly (enqueue batches of {}, reads of {}): \
                 server commands per job, enqueue / take / complete / maintenance",
                b.jobs, b.enqueue_batch, b.read_count
            ),
            steps(&b.server_cmds_per_job, 2),
            None,
        );
        row(
            "  client commands per job, same steps".into(),
            steps(&b.client_cmds_per_job, 3),
            None,
        );
        row(
            "  Redis CPU per job, same steps (INFO cpu, µs)".into(),
            steps(&b.redis_cpu_us_per_job, 1),
            None,
        );
        row(
            format!(
                "  maintenance: {} pass(es) over {:.1} s, one per second as a broker does",
                b.maintenance_passes, b.seconds
            ),
            format!(
                "{:.0} commands, {:.0} µs per pass",
                b.maintenance_cmds_per_pass, b.maintenance_cpu_us_per_pass
            ),
            None,
        );
    }

    /// The payload sweep.
    fn sweep_rows(&self, row: &mut impl FnMut(String, String, Option<Goal>)) {
        for r in &self.payload_sweep.runs {
            row(
                format!(
                    "payload {} B ({} jobs, 1 worker × 8 slots): e2e; server commands per job; \
                     Redis CPU per job e2e / floor (e2e less floor)",
                    r.payload_bytes, r.jobs
                ),
                format!(
                    "{:.0} jobs/s; {:.2}; {:.1} / {:.1} µs ({:.1})",
                    r.jobs_per_sec,
                    r.server_cmds_per_job,
                    r.redis_cpu_us_per_job,
                    r.floor_redis_cpu_us_per_job,
                    r.over_floor_us()
                ),
                None,
            );
        }
        row(
            "  biggest payload's Redis CPU per job less its floor, over the smallest's".into(),
            crate::targets::big_payload(self)
                .map_or("not measured".into(), |b| format!("{:.2} ×", b.ratio())),
            Some(Goal::BigPayload),
        );
    }

    /// The drain by slots.
    fn slots_rows(&self, row: &mut impl FnMut(String, String, Option<Goal>)) {
        for r in &self.drain_by_slots.runs {
            row(
                format!(
                    "drain of {} waiting jobs, 1 worker process × {} slot(s): rate; server / client \
                     commands per job; Redis / worker CPU per job",
                    r.jobs, r.slots
                ),
                format!(
                    "{:.0} jobs/s; {:.2} / {:.2}; {:.1} / {:.1} µs",
                    r.jobs_per_sec,
                    r.server_cmds_per_job,
                    r.client_cmds_per_job,
                    r.redis_cpu_us_per_job,
                    r.worker_cpu_us_per_job
                ),
                None,
            );
        }
    }

    /// The cluster scenario.
    fn cluster_rows(&self, row: &mut impl FnMut(String, String, Option<Goal>)) {
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
                (r.partitions == 3).then_some(Goal::ClusterShare),
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
