//! Dispatch latency: enqueue → start, with idle slots.
//!
//! One worker process with 8 slots waits on an empty queue. Jobs arrive open-loop at a
//! fixed rate (each enqueue is sent at its scheduled time, in a task of its own, without
//! waiting for earlier ones or for completion). After all succeeded:
//!
//! - **Redis clock** (the reported figure): `started_ms − enqueued_ms` of each job hash,
//!   both written by the functions from Redis' `TIME` (`enqueued_ms` is the entry id's ms),
//!   so there is no clock skew, but the resolution is 1 ms: a value of 0 means "within the
//!   same millisecond", 1 means "across one millisecond boundary" (0 to 2 ms).
//! - **Observed** (an upper bound with µs resolution): from the harness's `Instant` just
//!   before it sends the enqueue until the harness receives the job's `started` event from
//!   the events stream (`XREAD BLOCK` on its own connection). It includes one extra
//!   Redis → harness hop and the harness's own scheduling.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use fleetq_broker::{EnqueueOptions, Producer, QueueConfig, QueueKeys, Redis};
use redis::streams::StreamReadReply;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::payload;
use crate::plan::{Plan, DISPATCH_RATE, PAYLOAD_BYTES, WORKER_SLOTS};
use crate::poll;
use crate::server::{queue_config, Server};
use crate::worker_process::WorkerProcess;

const QUEUE: &str = "bench-dispatch";
const NODE: &str = "dispatch-1";
/// Events kept, so that the harness's reader never misses a `started` event.
const EVENTS_MAXLEN: u64 = 100_000;
/// Wait after the worker's node record appears, so that it is blocked in its read.
const SETTLE: Duration = Duration::from_millis(500);
/// Longest block of the harness's events read.
const EVENTS_BLOCK: Duration = Duration::from_millis(200);

/// What the dispatch scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DispatchResult {
    /// Arrival rate, jobs per second.
    pub rate: u32,
    /// Arrival window, seconds.
    pub window_s: f64,
    /// Jobs enqueued.
    pub jobs: usize,
    /// Median of `started_ms − enqueued_ms` (Redis clock, 1 ms resolution).
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// Largest of the same.
    pub max_ms: f64,
    /// Median of the observed enqueue-sent → `started`-event-received time, ms.
    pub observed_p50_ms: f64,
    /// 99th percentile of the same.
    pub observed_p99_ms: f64,
    /// Jobs with an observed time (all, unless an event was missed).
    pub observed_jobs: usize,
    /// Latest an enqueue was sent after its scheduled time, ms (the open loop's own slip).
    pub max_send_slip_ms: f64,
}

/// Runs the scenario with a worker process started from `exe`.
pub async fn run(plan: &Plan, exe: &Path) -> anyhow::Result<DispatchResult> {
    let server = Server::start().await?;
    let config = QueueConfig {
        events_maxlen: EVENTS_MAXLEN,
        // The harness reads every job's `started` event.
        routine_events: true,
        ..queue_config()
    };
    let keys = server.configure(QUEUE, &config).await?;
    let worker = WorkerProcess::spawn(exe, &server.url(), QUEUE, NODE, WORKER_SLOTS)?;
    let node = [NODE.to_owned()];
    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        "the dispatch worker's node record",
        || async { Ok(server.nodes_present(&node).await?.then_some(())) },
    )
    .await?;
    tokio::time::sleep(SETTLE).await;

    let stop_events = CancellationToken::new();
    let events = tokio::spawn(started_events(
        server.redis.clone(),
        keys.clone(),
        stop_events.clone(),
    ));
    let producer = Producer::new(&server.redis, QUEUE).await?;
    let total = (f64::from(DISPATCH_RATE) * plan.dispatch_window.as_secs_f64()).round() as usize;
    let sent = arrive(&producer, total).await?;
    let jobs = sent.len();
    let (sent, slip): (Vec<(String, Instant)>, Vec<Duration>) = sent
        .into_iter()
        .map(|(id, at, slip)| ((id, at), slip))
        .unzip();

    poll::until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        "every dispatch job to succeed",
        || async { Ok((server.stat(&keys, "succeeded").await? >= jobs as i64).then_some(())) },
    )
    .await?;
    stop_events.cancel();
    let started_at = events.await.context("events reader")??;
    worker.stop(Duration::from_secs(15)).await?;

    let mut pipe = redis::pipe();
    for (id, _) in &sent {
        pipe.cmd("HMGET")
            .arg(keys.job(id))
            .arg("started_ms")
            .arg("enqueued_ms");
    }
    let times: Vec<(Option<u64>, Option<u64>)> = pipe
        .query_async(&mut server.redis.conn())
        .await
        .context("read started_ms and enqueued_ms")?;
    let mut redis_ms = Vec::with_capacity(jobs);
    for ((id, _), t) in sent.iter().zip(&times) {
        match t {
            (Some(started), Some(enqueued)) => {
                redis_ms.push(started.saturating_sub(*enqueued) as f64);
            }
            _ => anyhow::bail!("job {id} has no started_ms or enqueued_ms"),
        }
    }
    let mut observed_ms: Vec<f64> = sent
        .iter()
        .filter_map(|(id, at)| {
            started_at
                .get(id)
                .map(|got| ms(got.saturating_duration_since(*at)))
        })
        .collect();
    redis_ms.sort_by(f64::total_cmp);
    observed_ms.sort_by(f64::total_cmp);
    Ok(DispatchResult {
        rate: DISPATCH_RATE,
        window_s: plan.dispatch_window.as_secs_f64(),
        jobs,
        p50_ms: percentile(&redis_ms, 0.50),
        p99_ms: percentile(&redis_ms, 0.99),
        max_ms: redis_ms.last().copied().unwrap_or(0.0),
        observed_p50_ms: percentile(&observed_ms, 0.50),
        observed_p99_ms: percentile(&observed_ms, 0.99),
        observed_jobs: observed_ms.len(),
        max_send_slip_ms: slip.into_iter().map(ms).fold(0.0, f64::max),
    })
}

/// Enqueues `total` jobs at [`DISPATCH_RATE`], each in a task of its own at its scheduled
/// time; returns (job id, when it was sent, how late it was sent).
async fn arrive(
    producer: &Producer,
    total: usize,
) -> anyhow::Result<Vec<(String, Instant, Duration)>> {
    let body = payload::noop(PAYLOAD_BYTES);
    let every = Duration::from_secs(1) / DISPATCH_RATE;
    let begin = tokio::time::Instant::now() + Duration::from_millis(20);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let due = begin + every * u32::try_from(i).context("too many jobs")?;
        tokio::time::sleep_until(due).await;
        let producer = producer.clone();
        let body = body.clone();
        tasks.spawn(async move {
            let slip = tokio::time::Instant::now().saturating_duration_since(due);
            let at = Instant::now();
            let r = producer
                .enqueue_json(&body, &EnqueueOptions::default())
                .await;
            r.map(|e| (e.id, at, slip))
        });
    }
    let mut out = Vec::with_capacity(total);
    while let Some(r) = tasks.join_next().await {
        out.push(r.context("enqueue task")?.context("enqueue")?);
    }
    Ok(out)
}

/// Reads the queue's events stream until `stop`, and returns when each job's `started`
/// event arrived.
async fn started_events(
    redis: Redis,
    keys: QueueKeys,
    stop: CancellationToken,
) -> anyhow::Result<HashMap<String, Instant>> {
    let mut conn = redis.blocking_conn(&keys.events(), EVENTS_BLOCK).await?;
    let mut from = fleetq_broker::inspect::last_entry_id(&mut conn, &keys.events())
        .await
        .context("XREVRANGE events")?;
    let mut started = HashMap::new();
    while !stop.is_cancelled() {
        let reply: Option<StreamReadReply> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(EVENTS_BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(keys.events())
            .arg(&from)
            .query_async(&mut conn)
            .await
            .context("XREAD events")?;
        let now = Instant::now();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for e in key.ids {
                if e.get::<String>("type").as_deref() == Some("started") {
                    if let Some(job) = e.get::<String>("job") {
                        started.entry(job).or_insert(now);
                    }
                }
                from = e.id;
            }
        }
    }
    Ok(started)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted `values` (`p` in 0..=1); 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
