//! End to end: N no-op jobs through ONE worker process with 8 slots.
//!
//! The queue's group exists and has delivered once (see [`Server::prime_group`]), as on any
//! queue a worker has read from. All jobs are enqueued first (`enqueue_batch`), then the
//! worker process is started and the
//! clock runs from its spawn until the stats hash says all N succeeded (polled every 20 ms),
//! so the time includes the process start (tens of ms). `INFO commandstats` is read before
//! the enqueue, after it, and after the worker has stopped: the delta is every command of
//! the jobs' whole lifecycle (enqueue, reads, takes, heartbeats, results, shutdown), less
//! the harness's own polling.
//!
//! Exactly once: stats `succeeded` = N and no other end or retry counter; the stream and
//! the pending list are empty; the worker's handler ran N times; every job hash left is
//! `succeeded` and there are N of them; and a sample of statuses read with `fleetq_status`
//! says `succeeded`. Any failure is a problem in the report (the binary then exits 1).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetq_broker::{Producer, QueueKeys};
use serde::Serialize;

use crate::commandstats::CommandStats;
use crate::plan::{Plan, BATCH_SIZE, PAYLOAD_BYTES, WORKER_SLOTS};
use crate::server::{queue_config, Server};
use crate::worker_process::WorkerProcess;
use crate::{payload, scenarios::rate};

const QUEUE: &str = "bench-e2e";
const NODE: &str = "e2e-1";
/// How often the harness looks at the `succeeded` counter.
const POLL: Duration = Duration::from_millis(20);
/// Statuses read with `fleetq_status` after the run.
const STATUS_SAMPLES: usize = 1000;
/// Commands listed in the report.
const TOP_COMMANDS: usize = 12;
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
    /// Redis CPU time per job while the worker ran (`INFO cpu`), µs.
    pub redis_cpu_us_per_job: f64,
    /// Of which inside `FCALL` (commandstats `usec` of `fcall`; take, complete, renew,
    /// reclaim, heartbeat), µs.
    pub fcall_us_per_job: f64,
    /// The worker process's CPU time per job (`/proc/<pid>/stat`, 10 ms ticks), µs; 0 when
    /// unknown.
    pub worker_cpu_us_per_job: f64,
    /// Redis time inside `fleetq_enqueue` per job (commandstats), µs.
    pub enqueue_fcall_us_per_job: f64,
    /// The most called commands over the lifecycle.
    pub top_commands: Vec<CommandRate>,
    /// Failed exactly-once checks (empty when all passed).
    pub problems: Vec<String>,
}

/// Runs the scenario with worker processes started from `exe`.
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<E2eResult> {
    let n = plan.e2e_jobs;
    let server = Server::start().await?;
    let keys = server.configure(QUEUE, &queue_config()).await?;
    server.create_group(&keys).await?;
    server.prime_group(&keys).await?;

    let before = server.command_stats().await?;
    let producer = Producer::new(&server.redis, QUEUE).await?;
    let body = payload::noop(PAYLOAD_BYTES);
    let mut ids = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = vec![body.clone(); left.min(BATCH_SIZE)];
        left -= batch.len();
        let replies = producer.enqueue_batch(&batch).await.context("enqueue")?;
        ids.extend(replies.into_iter().map(|r| r.id));
    }
    let enqueued = server.command_stats().await?;
    let cpu_enqueued = server.cpu_time().await?;

    let started = Instant::now();
    let mut worker = WorkerProcess::spawn(exe, &server.url(), QUEUE, NODE, WORKER_SLOTS)?;
    let timeout = Duration::from_secs(60) + Duration::from_millis(2 * n as u64);
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
    let redis_cpu = server.cpu_time().await?.saturating_sub(cpu_enqueued);
    let worker_cpu = worker.cpu_time().unwrap_or_default();
    let handled = worker.stop(Duration::from_secs(15)).await?;
    let after = server.command_stats().await?;

    let mut lifecycle = after.since(&before);
    // The harness's own reads of the counter (HGET), not the system's.
    lifecycle.discount("hget", polls);
    let enqueue = enqueued.since(&before);
    let working = after.since(&enqueued);
    let per_job = |calls: u64| calls as f64 / n as f64;
    let us_per_job = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let problems = check(&server, &keys, &producer, &ids, handled).await?;
    Ok(E2eResult {
        jobs: n,
        slots: WORKER_SLOTS,
        seconds: elapsed.as_secs_f64(),
        jobs_per_sec: rate(n, elapsed),
        cmds_per_job: per_job(lifecycle.total()),
        client_cmds_per_job: per_job(lifecycle.client_total()),
        enqueue_cmds_per_job: per_job(enqueue.total()),
        enqueue_client_cmds_per_job: per_job(enqueue.client_total()),
        redis_cpu_us_per_job: us_per_job(redis_cpu),
        fcall_us_per_job: per_job(working.usec("fcall")),
        worker_cpu_us_per_job: us_per_job(worker_cpu),
        enqueue_fcall_us_per_job: per_job(enqueue.usec("fcall")),
        top_commands: top(&lifecycle, n),
        problems,
    })
}

fn top(stats: &CommandStats, jobs: usize) -> Vec<CommandRate> {
    stats
        .top(TOP_COMMANDS)
        .into_iter()
        .map(|(command, calls)| CommandRate {
            command,
            per_job: calls as f64 / jobs as f64,
        })
        .collect()
}

/// The exactly-once checks; returns what failed.
async fn check(
    server: &Server,
    keys: &QueueKeys,
    producer: &Producer,
    ids: &[String],
    handled: u64,
) -> anyhow::Result<Vec<String>> {
    let n = ids.len();
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
    super::check_sampled_statuses(producer, ids, STATUS_SAMPLES, &mut problems).await?;
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
