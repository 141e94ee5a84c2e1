//! Where the cost of a job goes: the steps of [`crate::steps`] driven directly against a
//! fresh `redis-server`, each measured on its own, with the batch sizes of a worker with 8
//! slots draining a backlog and of the producer's batch API.
//!
//! - **enqueue**: N jobs (200-byte payload) with `enqueue_batch`, 500 per call.
//! - **take**: the worker's read (`XREADGROUP … COUNT 8`) and one `fleetq_take` for what it
//!   read — 8 entries per read, as the backlog always has 8.
//! - **complete**: `fleetq_complete` for what each take took (today one call per job, the
//!   calls of one take sent together, as the 8 slots' commits of jobs that end together share
//!   the worker's multiplexed connection).
//! - **maintenance**: one pass of the broker's maintenance over the queue
//!   ([`crate::steps::Steps::maintenance_pass`]) at the start of the drain, and one more
//!   for every second ([`fleetq_broker::maintenance::DEFAULT_INTERVAL`]) the driven run has
//!   lasted (enqueue included) — what a broker beside the run would do; divided by the
//!   run's N jobs like the other steps. The cost per pass is reported beside it: per job it
//!   shrinks as throughput grows.
//!
//! Each step runs in windows of its own, framed by one `INFO cpu commandstats` (see
//! [`crate::sample`]): the enqueue in one window; the drain in rounds of
//! [`ROUND_BATCHES`] takes (one window) followed by their completions (another window),
//! so that the pending list stays small (at most 512 entries) as a worker's does; each
//! maintenance pass in a window of its own. A step's figures are the sums over its windows:
//!
//! - **commands** (server count): every command Redis executed in the windows, those run
//!   inside functions included (commandstats `calls`); the client count beside them;
//! - **Redis CPU**: `used_cpu_user + used_cpu_sys` deltas of `INFO cpu` — the whole server
//!   process, socket I/O and event loop included, so it adds up with the end-to-end figure —
//!   less the measured cost of one sample per window.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::payload;
use crate::plan::{Plan, BATCH_SIZE, FLOOR_READ_COUNT, PAYLOAD_BYTES};
use crate::sample::{Delta, Sample};
use crate::scenarios::drain::check_counters;
use crate::server::{queue_config, Server};
use crate::steps::{Steps, Taken};

const QUEUE: &str = "bench-steps";
const NODE: &str = "steps-1";
/// Reads (of 8) per take window; their completions follow in one complete window.
pub const ROUND_BATCHES: usize = 64;
/// Samples read back to back to measure what one sample costs.
const SAMPLE_COST_SAMPLES: u32 = 20;

/// One value per step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ByStep<T> {
    /// `Producer::enqueue_batch`.
    pub enqueue: T,
    /// `XREADGROUP … COUNT 8` + `fleetq_take`.
    pub take: T,
    /// `fleetq_complete` of what was taken.
    pub complete: T,
    /// The broker's maintenance passes over the run.
    pub maintenance: T,
}

impl<T: Copy + std::ops::Add<Output = T>> ByStep<T> {
    /// The four steps added up.
    pub fn sum(&self) -> T {
        self.enqueue + self.take + self.complete + self.maintenance
    }

    /// Each step mapped with `f`.
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> ByStep<U> {
        ByStep {
            enqueue: f(self.enqueue),
            take: f(self.take),
            complete: f(self.complete),
            maintenance: f(self.maintenance),
        }
    }
}

/// What the by-step run measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ByStepResult {
    /// Jobs driven through the steps.
    pub jobs: usize,
    /// Jobs per `enqueue_batch` call.
    pub enqueue_batch: usize,
    /// Entries per read (and per take).
    pub read_count: usize,
    /// Wall time of the driven run (enqueue and drain, measuring included), seconds.
    pub seconds: f64,
    /// Every command Redis executed, per job, by step.
    pub server_cmds_per_job: ByStep<f64>,
    /// Client commands (round trips' commands), per job, by step.
    pub client_cmds_per_job: ByStep<f64>,
    /// Redis CPU (`INFO cpu` user + sys, less the samples' own cost) per job, µs, by step.
    pub redis_cpu_us_per_job: ByStep<f64>,
    /// Maintenance passes made over the run.
    pub maintenance_passes: usize,
    /// Commands per maintenance pass.
    pub maintenance_cmds_per_pass: f64,
    /// Redis CPU per maintenance pass, µs.
    pub maintenance_cpu_us_per_pass: f64,
    /// The Redis CPU one sample costs (taken out of every window), µs.
    pub sample_cost_us: f64,
    /// Failed checks that every job succeeded exactly once (empty when all passed).
    pub problems: Vec<String>,
}

/// The windows of one step added up.
#[derive(Debug, Default)]
struct Tally {
    delta: Delta,
    windows: u32,
}

impl Tally {
    fn add(&mut self, from: &Sample, to: &Sample) {
        self.delta.add(&to.since(from));
        self.windows += 1;
    }
}

/// Runs the scenario.
pub async fn run(plan: &Plan) -> anyhow::Result<ByStepResult> {
    let n = plan.by_step_jobs;
    let server = Server::start().await?;
    let keys = server.configure(QUEUE, &queue_config()).await?;
    server.create_group(&keys).await?;
    server.prime_group(&keys).await?;
    let steps = Steps::new(&server.redis, QUEUE, NODE).await?;
    let sample_cost = Sample::cost(&mut server.redis.conn(), SAMPLE_COST_SAMPLES).await?;
    let body = payload::noop(PAYLOAD_BYTES);
    let interval = fleetq_broker::maintenance::DEFAULT_INTERVAL;

    let mut tally: ByStep<Tally> = ByStep::default();
    let mut passes = 0usize;
    let started = Instant::now();
    let mut at = server.sample().await?;
    let mut left = n;
    while left > 0 {
        let batch = vec![body.clone(); left.min(BATCH_SIZE)];
        left -= batch.len();
        steps.enqueue(&batch).await?;
    }
    let mut now = server.sample().await?;
    tally.enqueue.add(&at, &now);
    at = now;

    let mut done = 0usize;
    loop {
        if passes < 1 + passes_due(started.elapsed(), interval) {
            steps.maintenance_pass().await?;
            now = server.sample().await?;
            tally.maintenance.add(&at, &now);
            at = now;
            passes += 1;
        }
        let mut round: Vec<Taken> = Vec::with_capacity(ROUND_BATCHES);
        for _ in 0..ROUND_BATCHES {
            let taken = steps.take(FLOOR_READ_COUNT).await?;
            if taken.is_empty() {
                break;
            }
            round.push(taken);
        }
        now = server.sample().await?;
        tally.take.add(&at, &now);
        at = now;
        if round.is_empty() {
            break;
        }
        for taken in round {
            done += taken.len();
            steps.complete(taken).await?;
        }
        now = server.sample().await?;
        tally.complete.add(&at, &now);
        at = now;
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut problems = check_counters(&server, &keys, n).await?;
    if done != n {
        problems.push(format!("the steps took and completed {done} of {n} jobs"));
    }
    let per_job = |calls: u64| calls as f64 / n.max(1) as f64;
    let cpu = |t: &Tally| {
        t.delta
            .cpu
            .saturating_sub(sample_cost * t.windows)
            .as_secs_f64()
            * 1e6
    };
    let by = |f: &dyn Fn(&Tally) -> f64| ByStep {
        enqueue: f(&tally.enqueue),
        take: f(&tally.take),
        complete: f(&tally.complete),
        maintenance: f(&tally.maintenance),
    };
    let per_pass = |v: f64| v / passes.max(1) as f64;
    Ok(ByStepResult {
        jobs: n,
        enqueue_batch: BATCH_SIZE,
        read_count: FLOOR_READ_COUNT,
        seconds,
        server_cmds_per_job: by(&|t| per_job(t.delta.stats.total())),
        client_cmds_per_job: by(&|t| per_job(t.delta.stats.client_total())),
        redis_cpu_us_per_job: by(&|t| cpu(t) / n.max(1) as f64),
        maintenance_passes: passes,
        maintenance_cmds_per_pass: per_pass(tally.maintenance.delta.stats.total() as f64),
        maintenance_cpu_us_per_pass: per_pass(cpu(&tally.maintenance)),
        sample_cost_us: sample_cost.as_secs_f64() * 1e6,
        problems,
    })
}

/// Whole `interval`s in `elapsed`: the passes a broker ticking every `interval` makes
/// after its first.
fn passes_due(elapsed: Duration, interval: Duration) -> usize {
    if interval.is_zero() {
        return 0;
    }
    usize::try_from(elapsed.as_nanos() / interval.as_nanos()).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_per_whole_interval() {
        let s = Duration::from_millis;
        assert_eq!(passes_due(s(999), s(1000)), 0);
        assert_eq!(passes_due(s(1000), s(1000)), 1);
        assert_eq!(passes_due(s(3500), s(1000)), 3);
        assert_eq!(passes_due(s(3500), Duration::ZERO), 0);
    }

    #[test]
    fn steps_add_up() {
        let b = ByStep {
            enqueue: 1.0,
            take: 2.0,
            complete: 3.0,
            maintenance: 0.5,
        };
        assert_eq!(b.sum(), 6.5);
        assert_eq!(b.map(|v| v * 2.0).sum(), 13.0);
    }
}
