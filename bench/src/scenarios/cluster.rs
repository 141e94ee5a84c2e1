//! A hot queue on a Redis Cluster: the same drain with 1 partition and with 3, on ONE local
//! cluster of 3 primaries ([`crate::cluster`]), in the same run.
//!
//! For each partition count P a fresh queue gets the bench's queue config and
//! `partitions::set(P)`; for P = 3 its name is chosen so that its 3 partitions land on the 3
//! primaries. Each partition's group is created and primed (see [`prime_group`]), N no-op
//! jobs are enqueued (untimed; the producer spreads them over the partitions in turn), then [`CLUSTER_WORKERS`] worker processes of [`CLUSTER_WORKER_SLOTS`] slots are started
//! with the cluster URL. The clock runs from their spawn until the `succeeded` counters of
//! the queue's sources (the partitions and the queue itself) add up to N, polled every
//! 20 ms; each primary's CPU time (`INFO cpu`) is read at both ends.
//!
//! With one partition, one primary's command thread does all of the queue's work; with 3,
//! each primary does a third. The figure that shows it is the busiest primary's share of the
//! Redis CPU spent on the drain. The throughput ratio is reported too, but on a machine with
//! fewer cores than primaries plus workers it is bound by the cores, not by Redis.
//!
//! Exactly once, per run: the `succeeded` counters add up to N and every other end or retry
//! counter is 0 on every source; every source's stream and pending list are empty; the
//! workers' handlers ran N times in all; a sample of statuses read with `fleetq_status` says
//! `succeeded`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetq_broker::partitions::{self, Partitions};
use fleetq_broker::{EnqueueOptions, Producer, QueueKeys};
use serde::Serialize;

use crate::cluster::{Cluster, PRIMARIES};
use crate::plan::{Plan, BATCH_SIZE, CLUSTER_WORKERS, CLUSTER_WORKER_SLOTS, PAYLOAD_BYTES};
use crate::scenarios::drain::MUST_BE_ZERO;
use crate::server::{create_group, pending, prime_group, queue_config, stat, stream_len};
use crate::worker_process::WorkerProcess;
use crate::{payload, scenarios::rate};

/// The queue of the 1-partition run.
const QUEUE_ONE: &str = "bench-cluster";
/// Names of the split queue are tried as `<prefix>-0`, `<prefix>-1`, … until one's
/// partitions land on distinct primaries.
const QUEUE_SPLIT_PREFIX: &str = "bench-cluster-split";
/// The partition counts compared.
const PARTITIONS: [u32; 2] = [1, 3];
/// How often the harness adds up the `succeeded` counters.
const POLL: Duration = Duration::from_millis(20);
/// Statuses read with `fleetq_status` after each run.
const STATUS_SAMPLES: usize = 300;

/// One drain at one partition count.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterRun {
    /// Partitions of the queue (1: not split).
    pub partitions: u32,
    /// `jobs / seconds`.
    pub jobs_per_sec: f64,
    /// From the workers' spawn until all jobs succeeded, seconds.
    pub seconds: f64,
    /// Each primary's CPU time during the drain per job, µs, in the order of
    /// [`ClusterResult::ports`].
    pub redis_cpu_us_per_job_by_primary: Vec<f64>,
    /// The busiest primary's CPU time over all primaries' (1.0: one primary did it all).
    pub busiest_primary_cpu_share: f64,
    /// The worker processes' CPU time per job, all of them together (`/proc/<pid>/stat`,
    /// 10 ms ticks), µs; 0 when unknown. Beside the Redis figures it shows what the drain
    /// asks of the machine's cores.
    pub worker_cpu_us_per_job: f64,
}

/// What the cluster scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterResult {
    /// Primaries of the cluster.
    pub primaries: usize,
    /// Their ports, ascending: the order of the per-primary figures.
    pub ports: Vec<u16>,
    /// Jobs per run.
    pub jobs: usize,
    /// Worker processes per run.
    pub workers: usize,
    /// Slots per worker process.
    pub slots: usize,
    /// One run per partition count, in [`PARTITIONS`] order.
    pub runs: Vec<ClusterRun>,
    /// `jobs_per_sec` with 3 partitions over that with 1, this run.
    pub speedup_3_over_1: f64,
    /// Failed exactly-once checks (empty when all passed), each naming its run.
    pub problems: Vec<String>,
}

impl ClusterResult {
    /// The run with `partitions` partitions.
    pub fn run(&self, partitions: u32) -> Option<&ClusterRun> {
        self.runs.iter().find(|r| r.partitions == partitions)
    }
}

/// Runs the scenario with worker processes started from `exe`.
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<ClusterResult> {
    let cluster = Cluster::start().await?;
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    for p in PARTITIONS {
        let queue = match p {
            1 => QUEUE_ONE.to_owned(),
            _ => spread_name(&cluster, p)?,
        };
        let (run, found) = drain(&cluster, plan, exe, &queue, p)
            .await
            .with_context(|| format!("{p} partition(s), queue {queue}"))?;
        problems.extend(found.into_iter().map(|f| format!("{p} partition(s): {f}")));
        runs.push(run);
    }
    let speed = |p: u32| {
        runs.iter()
            .find(|r| r.partitions == p)
            .map_or(0.0, |r| r.jobs_per_sec)
    };
    let speedup_3_over_1 = if speed(1) > 0.0 {
        speed(3) / speed(1)
    } else {
        0.0
    };
    Ok(ClusterResult {
        primaries: PRIMARIES,
        ports: cluster.ports(),
        jobs: plan.cluster_jobs,
        workers: CLUSTER_WORKERS,
        slots: CLUSTER_WORKER_SLOTS,
        runs,
        speedup_3_over_1,
        problems,
    })
}

/// The first `QUEUE_SPLIT_PREFIX-<i>` whose `count` partitions are served by `count`
/// different primaries.
fn spread_name(cluster: &Cluster, count: u32) -> anyhow::Result<String> {
    for i in 0..10_000 {
        let name = format!("{QUEUE_SPLIT_PREFIX}-{i}");
        let parts = Partitions::new(QueueKeys::new(&name)?, count)?;
        let mut owners: Vec<usize> = parts
            .targets()
            .iter()
            .map(|k| cluster.primary_of(&k.stream()))
            .collect();
        owners.sort_unstable();
        owners.dedup();
        if owners.len() == count as usize {
            return Ok(name);
        }
    }
    anyhow::bail!("no queue name {QUEUE_SPLIT_PREFIX}-<i> has its {count} partitions on {count} different primaries")
}

/// One drain of `queue` split in `count` partitions; returns its figures and the failed
/// exactly-once checks.
async fn drain(
    cluster: &Cluster,
    plan: &Plan,
    exe: &Path,
    queue: &str,
    count: u32,
) -> anyhow::Result<(ClusterRun, Vec<String>)> {
    let n = plan.cluster_jobs;
    let redis = &cluster.redis;
    let base = QueueKeys::new(queue)?;
    queue_config()
        .store(&mut redis.conn_for(&base.config()), &base)
        .await
        .context("write the queue config")?;
    let parts = partitions::set(redis, &base, count)
        .await
        .context("set the partition count")?;
    for target in parts.targets() {
        create_group(redis, target).await?;
        prime_group(redis, target).await?;
    }
    let producer = Producer::new(redis, queue).await?;
    let ids = enqueue(&producer, n).await?;
    let sources = parts.sources();
    let cpu_before = cluster.cpu_times().await?;

    let started = Instant::now();
    let url = cluster.url();
    let mut workers = (0..CLUSTER_WORKERS)
        .map(|i| {
            let node = format!("cluster-p{count}-{i}");
            WorkerProcess::spawn(exe, &url, queue, &node, CLUSTER_WORKER_SLOTS)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timeout = Duration::from_secs(60) + Duration::from_millis(2 * n as u64);
    loop {
        for w in &mut workers {
            w.check_alive()?;
        }
        let done = sum_stat(redis, &sources, "succeeded").await?;
        if done >= n as i64 {
            break;
        }
        if started.elapsed() > timeout {
            let tails: Vec<String> = workers
                .iter()
                .map(|w| format!("{}:\n{}", w.node, w.log_tail()))
                .collect();
            anyhow::bail!(
                "{done} of {n} jobs succeeded after {timeout:?}; the workers' logs end:\n{}",
                tails.join("\n")
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let elapsed = started.elapsed();
    let cpu_after = cluster.cpu_times().await?;
    let worker_cpu: Duration = workers.iter().filter_map(WorkerProcess::cpu_time).sum();
    let mut handled = 0;
    for w in workers {
        handled += w.stop(Duration::from_secs(15)).await?;
    }

    let cpu_us: Vec<f64> = cpu_after
        .iter()
        .zip(&cpu_before)
        .map(|(after, before)| after.saturating_sub(*before).as_secs_f64() * 1e6 / n as f64)
        .collect();
    let total: f64 = cpu_us.iter().sum();
    let busiest = cpu_us.iter().copied().fold(0.0, f64::max);
    let run = ClusterRun {
        partitions: count,
        jobs_per_sec: rate(n, elapsed),
        seconds: elapsed.as_secs_f64(),
        busiest_primary_cpu_share: if total > 0.0 { busiest / total } else { 0.0 },
        redis_cpu_us_per_job_by_primary: cpu_us,
        worker_cpu_us_per_job: worker_cpu.as_secs_f64() * 1e6 / n as f64,
    };
    let problems = check(cluster, &sources, &producer, &ids, handled).await?;
    Ok((run, problems))
}

/// Enqueues `n` no-op jobs and returns their ids. A queue that is not split gets them with
/// `enqueue_batch` ([`BATCH_SIZE`] a call). A split one gets them one call a job,
/// [`BATCH_SIZE`] calls in flight at once: `enqueue_batch` sends the jobs of every partition
/// in one pipeline, which a cluster connection refuses (`CROSSSLOT`) when they live on
/// different slots.
async fn enqueue(producer: &Producer, n: usize) -> anyhow::Result<Vec<String>> {
    let body = payload::noop(PAYLOAD_BYTES);
    let mut ids = Vec::with_capacity(n);
    let split = producer.partitions().is_split();
    let mut left = n;
    while left > 0 {
        let size = left.min(BATCH_SIZE);
        left -= size;
        if !split {
            let batch = vec![body.clone(); size];
            let replies = producer.enqueue_batch(&batch).await.context("enqueue")?;
            ids.extend(replies.into_iter().map(|r| r.id));
            continue;
        }
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..size {
            let (producer, body) = (producer.clone(), body.clone());
            calls.spawn(async move {
                producer
                    .enqueue_json(&body, &EnqueueOptions::default())
                    .await
            });
        }
        while let Some(reply) = calls.join_next().await {
            ids.push(reply.context("an enqueue task")?.context("enqueue")?.id);
        }
    }
    Ok(ids)
}

/// A stats counter added up over `sources`.
async fn sum_stat(
    redis: &fleetq_broker::Redis,
    sources: &[QueueKeys],
    field: &str,
) -> anyhow::Result<i64> {
    let mut sum = 0;
    for keys in sources {
        sum += stat(redis, keys, field).await?;
    }
    Ok(sum)
}

/// The exactly-once checks over every source of the queue; returns what failed.
async fn check(
    cluster: &Cluster,
    sources: &[QueueKeys],
    producer: &Producer,
    ids: &[String],
    handled: u64,
) -> anyhow::Result<Vec<String>> {
    let redis = &cluster.redis;
    let n = ids.len();
    let mut problems = Vec::new();
    let succeeded = sum_stat(redis, sources, "succeeded").await?;
    if succeeded != n as i64 {
        problems.push(format!(
            "stats succeeded add up to {succeeded}, expected {n}"
        ));
    }
    for keys in sources {
        let name = keys.name();
        for field in MUST_BE_ZERO {
            let v = stat(redis, keys, field).await?;
            if v != 0 {
                problems.push(format!("{name}: stats {field} is {v}, expected 0"));
            }
        }
        let len = stream_len(redis, keys).await?;
        if len != 0 {
            problems.push(format!("{name}: the stream still holds {len} entries"));
        }
        let pending = pending(redis, keys).await?;
        if pending != 0 {
            problems.push(format!("{name}: {pending} entries still pending"));
        }
    }
    if handled != n as u64 {
        problems.push(format!("the handlers ran {handled} times for {n} jobs"));
    }
    super::check_sampled_statuses(producer, ids, STATUS_SAMPLES, &mut problems).await?;
    Ok(problems)
}
