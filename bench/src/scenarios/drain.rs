//! One worker process drains N enqueued no-op jobs — the run behind the end-to-end scenario,
//! the payload sweep and the drain by slots — with the Redis commands and CPU time of the
//! enqueue and of the drain, the worker's CPU time, and the exactly-once check.
//!
//! The queue's group exists and has delivered once (see [`Server::prime_group`]), as on any
//! queue a worker has read from. All N jobs are enqueued with `enqueue_batch` (in batches of
//! [`plan::enqueue_batch`]) before the worker takes any. How the worker starts:
//!
//! - [`Start::AfterEnqueue`] (end to end): the worker process is spawned once the jobs are
//!   in; the clock runs from its spawn, so the drain includes the process start and its
//!   Redis commands (tens of ms; a handful of commands).
//! - [`Start::Ready`] (drain by slots): the worker is spawned on the empty queue first, and
//!   once it is blocked in its read (`INFO clients` `blocked_clients`) it is frozen
//!   (SIGSTOP); the jobs are enqueued, and the clock, the worker's CPU time and the drain's
//!   Redis figures start when it is thawed (SIGCONT). So the drain is the drain only. Its
//!   pending read is answered with the first entry while it is frozen: that one
//!   `XREADGROUP` counts in the enqueue's window.
//!
//! The drain ends when the stats hash says all N succeeded (polled every 20 ms; the polls'
//! `HGET`s are taken out of the counts). Redis CPU (`INFO cpu`) is read at the ends of the
//! enqueue and of the drain; commands (`INFO commandstats`) too, and for
//! [`Start::AfterEnqueue`] once more after the worker has stopped, so that the lifecycle
//! count holds the worker's shutdown.
//!
//! Exactly once: stats `succeeded` = N and no other end or retry counter; the stream and
//! the pending list are empty; the worker's handler ran N times; every job hash left is
//! `succeeded` and there are N of them; and a sample of statuses read with `fleetq_status`
//! says `succeeded`. A failure is a problem in the report (the binary then exits 1).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetq_broker::{Producer, QueueKeys};

use crate::commandstats::CommandStats;
use crate::payload;
use crate::plan;
use crate::poll;
use crate::sample::Delta;
use crate::server::{queue_config, Server};
use crate::worker_process::WorkerProcess;

/// How often the harness looks at the `succeeded` counter.
const POLL: Duration = Duration::from_millis(20);
/// Statuses read with `fleetq_status` after the run, at most.
const STATUS_SAMPLES: usize = 1000;
/// Stats counters that must stay 0 when every job succeeds at its first attempt.
pub(crate) const MUST_BE_ZERO: &[&str] = &[
    "failed",
    "dead",
    "expired",
    "cancelled",
    "retried",
    "released",
    "reclaimed",
    "fenced",
    "duplicates",
    "passed",
];

/// When the worker process starts (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Spawned after the enqueue; the drain includes its start.
    AfterEnqueue,
    /// Spawned before, frozen during the enqueue; the drain is the drain only.
    Ready,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Queue name.
    pub queue: &'static str,
    /// The worker's node name.
    pub node: String,
    /// Jobs.
    pub jobs: usize,
    /// Bytes of each job's payload.
    pub payload_bytes: usize,
    /// The worker's slots.
    pub slots: usize,
    /// When the worker starts.
    pub start: Start,
}

/// What one drain measured.
#[derive(Debug, Clone)]
pub struct DrainRun {
    /// Jobs.
    pub jobs: usize,
    /// Bytes of each payload.
    pub payload_bytes: usize,
    /// The worker's slots.
    pub slots: usize,
    /// Wall time of the drain (see [`Start`]), seconds.
    pub seconds: f64,
    /// Commands and Redis CPU of the enqueue.
    pub enqueue: Delta,
    /// Commands of the drain (through the worker's shutdown for [`Start::AfterEnqueue`]),
    /// less the harness's polls; Redis CPU of the drain until all succeeded.
    pub drain: Delta,
    /// The worker process's CPU time over the drain (10 ms ticks); zero when unknown.
    pub worker_cpu: Duration,
    /// Failed exactly-once checks.
    pub problems: Vec<String>,
}

impl DrainRun {
    /// `jobs / seconds`.
    pub fn jobs_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.jobs as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// `calls / jobs`.
    pub fn per_job(&self, calls: u64) -> f64 {
        calls as f64 / self.jobs.max(1) as f64
    }

    /// `d / jobs` in µs.
    pub fn us_per_job(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e6 / self.jobs.max(1) as f64
    }

    /// Commands of the enqueue and the drain together.
    pub fn lifecycle(&self) -> CommandStats {
        let mut all = self.enqueue.stats.clone();
        all.add(&self.drain.stats);
        all
    }

    /// Every command Redis executed over enqueue and drain, per job.
    pub fn server_cmds_per_job(&self) -> f64 {
        self.per_job(self.lifecycle().total())
    }

    /// Redis CPU over enqueue and drain, per job, µs.
    pub fn redis_cpu_us_per_job(&self) -> f64 {
        self.us_per_job(self.enqueue.cpu + self.drain.cpu)
    }
}

/// Runs `spec` with the worker process started from `exe`.
pub async fn run(spec: &Spec, exe: &Path) -> anyhow::Result<DrainRun> {
    let n = spec.jobs;
    let server = Server::start().await?;
    let keys = server.configure(spec.queue, &queue_config()).await?;
    server.create_group(&keys).await?;
    server.prime_group(&keys).await?;

    let ready = match spec.start {
        Start::Ready => Some(ready_worker(&server, spec, exe).await?),
        Start::AfterEnqueue => None,
    };
    let ready_cpu = ready
        .as_ref()
        .and_then(WorkerProcess::cpu_time)
        .unwrap_or_default();

    let before = server.sample().await?;
    let producer = Producer::new(&server.redis, spec.queue).await?;
    let body = payload::noop(spec.payload_bytes);
    let per_batch = plan::enqueue_batch(spec.payload_bytes);
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = vec![body.clone(); left.min(per_batch)];
        left -= batch.len();
        let replies = producer.enqueue_batch(&batch).await.context("enqueue")?;
        ids.extend(replies.into_iter().map(|r| r.id));
    }
    drop(body);
    let enqueued = server.sample().await?;

    let started = Instant::now();
    let mut worker = match ready {
        Some(w) => {
            w.signal(libc::SIGCONT)?;
            w
        }
        None => WorkerProcess::spawn(exe, &server.url(), spec.queue, &spec.node, spec.slots)?,
    };
    let bytes = (n * spec.payload_bytes) as u64;
    let timeout =
        Duration::from_secs(60) + Duration::from_millis(2 * n as u64 + bytes / 10_000_000 * 1000);
    let mut polls = 0u64;
    loop {
        worker.check_alive()?;
        polls += 1;
        if server.stat(&keys, "succeeded").await? >= n as i64 {
            break;
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "{} of {n} jobs succeeded after {timeout:?}; the worker's log ends:\n{}",
                server.stat(&keys, "succeeded").await?,
                worker.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed();
    let drained = server.sample().await?;
    let worker_cpu = worker
        .cpu_time()
        .unwrap_or_default()
        .saturating_sub(ready_cpu);
    let handled = worker.stop(Duration::from_secs(15)).await?;
    let mut drain = drained.since(&enqueued);
    if spec.start == Start::AfterEnqueue {
        drain.stats = server.sample().await?.stats.since(&enqueued.stats);
    }
    // The harness's own reads of the counter (HGET), not the system's.
    drain.stats.discount("hget", polls);
    let problems = check(&server, &keys, &producer, &ids, handled).await?;
    Ok(DrainRun {
        jobs: n,
        payload_bytes: spec.payload_bytes,
        slots: spec.slots,
        seconds: elapsed.as_secs_f64(),
        enqueue: enqueued.since(&before),
        drain,
        worker_cpu,
        problems,
    })
}

/// Spawns the worker on the empty queue, waits until it is blocked in its read, and freezes
/// it.
async fn ready_worker(server: &Server, spec: &Spec, exe: &Path) -> anyhow::Result<WorkerProcess> {
    let mut worker = WorkerProcess::spawn(exe, &server.url(), spec.queue, &spec.node, spec.slots)?;
    let waited = poll::until(
        Duration::from_secs(30),
        Duration::from_millis(10),
        "the worker to block in its read on the empty queue",
        || async { Ok((server.blocked_clients().await? >= 1).then_some(())) },
    )
    .await;
    if let Err(e) = waited {
        worker.check_alive()?;
        return Err(e.context(format!("worker log:\n{}", worker.log_tail())));
    }
    worker.signal(libc::SIGSTOP)?;
    Ok(worker)
}

/// The exactly-once checks; returns what failed.
pub(crate) async fn check(
    server: &Server,
    keys: &QueueKeys,
    producer: &Producer,
    ids: &[String],
    handled: u64,
) -> anyhow::Result<Vec<String>> {
    let n = ids.len();
    let mut problems = check_counters(server, keys, n).await?;
    if handled != n as u64 {
        problems.push(format!("the handler ran {handled} times for {n} jobs"));
    }
    let states = job_states(server, keys).await?;
    let found: u64 = states.values().sum();
    let ok = states.get("succeeded").copied().unwrap_or(0);
    if found != ok {
        problems.push(format!("job hashes not succeeded: {states:?}"));
    }
    if ok != n as u64 {
        problems.push(format!("{ok} succeeded job hashes for {n} jobs"));
    }
    super::check_sampled_statuses(producer, ids, STATUS_SAMPLES.min(n), &mut problems).await?;
    Ok(problems)
}

/// Stats `succeeded` = `n`, every counter of [`MUST_BE_ZERO`] 0, the stream and the
/// pending list empty; returns what failed.
pub(crate) async fn check_counters(
    server: &Server,
    keys: &QueueKeys,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let succeeded = server.stat(keys, "succeeded").await?;
    if succeeded != n as i64 {
        problems.push(format!("stats succeeded is {succeeded}, expected {n}"));
    }
    for field in MUST_BE_ZERO {
        let v = server.stat(keys, field).await?;
        if v != 0 {
            problems.push(format!("stats {field} is {v}, expected 0"));
        }
    }
    let len = server.stream_len(keys).await?;
    if len != 0 {
        problems.push(format!("the stream still holds {len} entries"));
    }
    let pending = server.pending(keys).await?;
    if pending != 0 {
        problems.push(format!("{pending} entries still pending"));
    }
    Ok(problems)
}

/// Counts the queue's job hashes by `state` (SCAN, then pipelined HGET).
async fn job_states(server: &Server, keys: &QueueKeys) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut conn = server.redis.conn();
    let pattern = keys.job("*");
    let mut cursor = 0u64;
    let mut states = BTreeMap::new();
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .context("SCAN job hashes")?;
        if !found.is_empty() {
            let mut pipe = redis::pipe();
            for key in &found {
                pipe.hget(key, "state");
            }
            let got: Vec<Option<String>> = pipe
                .query_async(&mut conn)
                .await
                .context("HGET job states")?;
            for state in got {
                *states
                    .entry(state.unwrap_or_else(|| "(none)".into()))
                    .or_insert(0) += 1;
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    Ok(states)
}
