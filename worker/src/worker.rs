//! The worker runtime: N slots, reading only for free slots, leases renewed while jobs run,
//! idle capacity reclaiming stale entries, fenced commits, retries with backoff, and a
//! two-phase shutdown.
//!
//! The loop, with `free` = slots not running a job:
//! 1. on start, take this consumer's own pending entries (`XREADGROUP … 0`);
//! 2. when a lease deadline or a retry is due, call `fleetq_reclaim` for up to `free` entries;
//! 3. otherwise block in `XREADGROUP … COUNT free BLOCK t >`, with `t` the time until the next
//!    deadline (at most `max_block`), on a connection of its own;
//! 4. pass what was read to `fleetq_take`, run each job in a slot, commit it fenced.
//!
//! Shutdown: stop reading; running jobs get `shutdown_grace` to finish; what is still running
//! then is stopped and released (given back at once, the attempt not counted), and so is
//! anything left in this consumer's pending list; then the consumer is removed.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleetq_broker::functions;
use fleetq_broker::keys::GROUP;
use fleetq_broker::{JobEntry, QueueConfig, QueueKeys, RawEntry, Redis};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::completion::{self, Commit, Committed, Ending};
use crate::config::WorkerConfig;
use crate::handler::{Handler, Job, JobContext, Outcome};
use crate::lease::{self, Held, HeldJob, StopReason};
use crate::metrics::WorkerMetrics;
use crate::node::{self, epoch_ms, Health, NodeHandle};
use crate::progress::{Target, Tracker, WaitClock};
use crate::reclaim;
use crate::take::{self, Decision, Taken, Taker};
use crate::timeouts::{self, Limits, TimeoutKind};
use crate::Error;

/// Longest wait between attempts to reach Redis again after an error.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(5);
/// Longest wait between two readiness checks of the executor.
const MAX_READY_BACKOFF: Duration = Duration::from_secs(30);
/// Tries of a commit that fails for a transient reason before the job is left to its lease.
const COMMIT_TRIES: u32 = 5;

/// What every slot task shares.
struct Runtime<H> {
    taker: Taker,
    config: WorkerConfig,
    queue: Mutex<QueueConfig>,
    handler: H,
    held: Held,
    node: NodeHandle,
}

impl<H> Runtime<H> {
    fn queue_config(&self) -> QueueConfig {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn redis(&self) -> &Redis {
        &self.taker.redis
    }

    fn keys(&self) -> &QueueKeys {
        &self.taker.keys
    }
}

/// A unique consumer name for this process start: `<node>:<pid>:<start ms>`.
pub fn consumer_name(node: &str) -> String {
    format!("{node}:{}:{}", std::process::id(), epoch_ms())
}

/// Runs a worker until `shutdown` resolves, then shuts down in two phases (see the module
/// docs). Returns an error only when the worker cannot start (bad config, Redis unreachable).
pub async fn run<H, S>(
    redis: Redis,
    config: WorkerConfig,
    handler: H,
    shutdown: S,
) -> Result<(), Error>
where
    H: Handler,
    S: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    let keys = QueueKeys::new(&config.queue)?;
    functions::load(&mut redis.conn()).await?;
    take::ensure_group(&redis, &keys).await?;
    let queue = QueueConfig::load(&mut redis.conn(), &keys).await?;
    let consumer = consumer_name(&config.node);
    let max_block = config.max_block.min(queue.lease);
    tracing::info!(queue = %config.queue, node = %config.node, %consumer, slots = config.slots,
        lease_ms = queue.lease.as_millis() as u64, "worker started");

    let stop_reading = CancellationToken::new();
    {
        let token = stop_reading.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }
    let metrics = Arc::new(
        WorkerMetrics::new(&config.queue, &config.node)
            .map_err(|e| Error::Config(format!("cannot set up metrics: {e}")))?,
    );
    metrics.slots.set(config.slots as i64);
    let metrics_addr = match config.metrics_addr {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::Config(format!(
                    "cannot serve metrics on {addr}: {e}; pick another --metrics-addr"
                ))
            })?;
            let bound = listener.local_addr().ok();
            tracing::info!(addr = ?bound, "serving /metrics");
            let stop = stop_reading.clone();
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                async move { stop.cancelled().await },
            ));
            bound
        }
    };
    let node = NodeHandle {
        redis: redis.clone(),
        keys: keys.clone(),
        node: config.node.clone(),
        consumer: consumer.clone(),
        health: Arc::new(Health::default()),
        metrics: metrics.clone(),
        metrics_addr,
    };
    let rt = Arc::new(Runtime {
        taker: Taker {
            redis: redis.clone(),
            keys: keys.clone(),
            consumer: consumer.clone(),
            node: config.node.clone(),
            lease: queue.lease,
            starts_at_once: !handler.reports_start(),
        },
        config: config.clone(),
        queue: Mutex::new(queue),
        handler,
        held: Held::default(),
        node: node.clone(),
    });
    let background_stop = CancellationToken::new();
    // Should this future be dropped (its task aborted), the background tasks stop with it, as
    // they would with the process: no lease renewed, no heartbeat.
    let _background_guard = background_stop.clone().drop_guard();
    let renewer = tokio::spawn(lease::renew_loop(
        redis.clone(),
        keys.clone(),
        consumer.clone(),
        config.node.clone(),
        rt.taker.lease,
        rt.held.clone(),
        background_stop.clone(),
    ));
    let slots = Arc::new(Semaphore::new(config.slots));
    let heart = tokio::spawn(node::heartbeat_loop(
        node.clone(),
        config.slots,
        slots.clone(),
        config.heartbeat,
        background_stop.clone(),
    ));
    let mut tasks = JoinSet::new();

    // Take no job before the executor can run one (its command exists, its server answers).
    let mut wait_ready = Duration::from_millis(200);
    loop {
        match rt.handler.ready().await {
            Ok(()) => break,
            Err(why) => {
                tracing::warn!(%why, retry_in_ms = wait_ready.as_millis() as u64, "executor not ready; taking no jobs yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait_ready) => {}
                    _ = stop_reading.cancelled() => break,
                }
                wait_ready = (wait_ready * 2).min(MAX_READY_BACKOFF);
            }
        }
    }
    let mut reader = redis.blocking_conn(max_block).await?;
    // Our own pending entries first (empty unless a consumer name is reused).
    let own = take::read(&mut reader, &keys, &consumer, config.slots, None, true)
        .await
        .map_err(|e| fleetq_broker::Error::redis("read own pending entries", e))?;
    dispatch(&rt, own, &slots, &mut tasks).await?;

    let mut next_wake = Instant::now();
    let mut next_refresh = Instant::now() + config.config_refresh;
    let mut backoff = Duration::from_millis(100);
    loop {
        while tasks.try_join_next().is_some() {}
        if stop_reading.is_cancelled() {
            break;
        }
        if let Some(left) = node.health.suspended_for() {
            // Suspended: take nothing new until the suspension ends or is lifted.
            let changed = node.health.changed.notified();
            tokio::select! {
                _ = stop_reading.cancelled() => break,
                _ = tokio::time::sleep(left) => node.resume("suspension over").await,
                _ = changed => {}
            }
            continue;
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                _ = stop_reading.cancelled() => break,
                permit = slots.clone().acquire_owned() => drop(permit),
            }
            continue;
        }
        if Instant::now() >= next_refresh {
            next_refresh = Instant::now() + config.config_refresh;
            match QueueConfig::load(&mut redis.conn(), &keys).await {
                Ok(q) => *rt.queue.lock().unwrap_or_else(PoisonError::into_inner) = q,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot refresh the queue config; keeping the old one")
                }
            }
        }
        let step = async {
            if Instant::now() >= next_wake {
                let r =
                    reclaim::reclaim(&redis, &keys, &consumer, &config.node, rt.taker.lease, free)
                        .await?;
                next_wake = Instant::now() + r.next_wake.unwrap_or(max_block).min(max_block);
                if !r.entries.is_empty() {
                    rt.node.metrics.reclaimed.inc_by(r.entries.len() as u64);
                    tracing::info!(
                        count = r.entries.len(),
                        "reclaimed entries whose lease ran out"
                    );
                    return Ok::<_, Error>(r.entries);
                }
            }
            let block = next_wake
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), max_block);
            take::read(&mut reader, &keys, &consumer, free, Some(block), false)
                .await
                .map_err(|e| fleetq_broker::Error::redis("read jobs", e).into())
        };
        let suspended = node.health.changed.notified();
        let read = tokio::select! {
            r = step => r,
            _ = stop_reading.cancelled() => break,
            // Suspended while blocked: drop the read (and its connection) at once.
            _ = suspended => {
                reader = redis.blocking_conn(max_block).await?;
                continue;
            }
        };
        let result = match read {
            Ok(entries) => dispatch(&rt, entries, &slots, &mut tasks).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => {
                if let Error::Queue(fleetq_broker::Error::Redis { source, .. }) = &e {
                    if source.code() == Some("NOGROUP") {
                        // The stream was deleted (or the server restarted empty): recreate.
                        let _ = take::ensure_group(&redis, &keys).await;
                    }
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "worker step failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop_reading.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
                if let Ok(conn) = redis.blocking_conn(max_block).await {
                    reader = conn;
                }
            }
        }
    }

    // Phase 1: stop reading (a read cut short by the signal dies with its connection).
    drop(reader);
    tracing::info!(
        running = rt.held.len(),
        grace_ms = config.shutdown_grace.as_millis() as u64,
        "stopping: no new jobs; waiting for running jobs"
    );
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    // Phase 2: release what is still running.
    if drained.is_err() {
        let left = rt.held.snapshot();
        tracing::warn!(
            count = left.len(),
            "grace period over; releasing running jobs to other hosts"
        );
        for (_, job) in left {
            job.stop(StopReason::Shutdown);
        }
        while tasks.join_next().await.is_some() {}
    }
    background_stop.cancel();
    let _ = renewer.await;
    let _ = heart.await;
    release_pending(&rt).await;
    rt.handler.shutdown().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Passes entries to `fleetq_take` and starts a slot task for each job that runs here.
async fn dispatch<H: Handler>(
    rt: &Arc<Runtime<H>>,
    entries: Vec<RawEntry>,
    slots: &Arc<Semaphore>,
    tasks: &mut JoinSet<()>,
) -> Result<(), Error> {
    if entries.is_empty() {
        return Ok(());
    }
    let queue = rt.queue_config();
    let taken = take::take(&rt.taker, &queue, entries).await?;
    for (t, job) in taken {
        match &t.decision {
            Decision::Run => {}
            Decision::Skip(why) => {
                let m = &rt.node.metrics;
                match why.as_str() {
                    "expired" => {
                        m.outcome("expired");
                        m.timeout("queue");
                    }
                    "cancelled" | "dead" => m.outcome(why),
                    _ => {}
                }
                continue;
            }
            Decision::Pass(delay) => {
                schedule_promote(rt, *delay);
                continue;
            }
        }
        match job {
            Ok(job) => {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Cannot happen: we read no more than the free slots. Give it back.
                    tracing::error!(job = %t.job_id, "no free slot for a job read for a free slot; releasing it");
                    commit_with_retries(rt, &t, &Commit::Release, &Ending::default()).await;
                    continue;
                };
                let rt = rt.clone();
                tasks.spawn(run_job(rt, t, job, queue.clone(), permit));
            }
            Err(malformed) => {
                tracing::warn!(entry = %t.entry_id, reason = %malformed, "malformed entry sent to the dead letters");
                let commit = Commit::Dead {
                    reason: "malformed",
                    error: malformed.to_string(),
                };
                if let Some(Committed::Ok) =
                    commit_with_retries(rt, &t, &commit, &Ending::default()).await
                {
                    rt.node.metrics.outcome("dead");
                }
            }
        }
    }
    Ok(())
}

enum Ended {
    Outcome(Outcome),
    Stopped(StopReason),
    Timeout(TimeoutKind),
}

async fn run_job<H: Handler>(
    rt: Arc<Runtime<H>>,
    t: Taken,
    entry: JobEntry,
    queue: QueueConfig,
    _permit: OwnedSemaphorePermit,
) {
    let held = Arc::new(HeldJob {
        job_id: t.job_id.clone(),
        deliveries: t.deliveries,
        cancel: CancellationToken::new(),
        reason: Mutex::new(None),
    });
    rt.held.insert(t.entry_id.clone(), held.clone());
    let metrics = rt.node.metrics.clone();
    metrics.busy.inc();
    let tracker = Arc::new(Tracker::new(
        Target {
            redis: rt.redis().clone(),
            keys: rt.keys().clone(),
            consumer: rt.taker.consumer.clone(),
            entry_id: t.entry_id.clone(),
        },
        held.clone(),
        rt.config.progress_interval,
        rt.taker.starts_at_once,
        (t.attempt == 1).then(|| WaitClock {
            enqueued_ms: entry.enqueued_ms,
            histogram: metrics.wait.clone(),
        }),
    ));
    let max_attempts = entry.max_attempts(&queue);
    let limits = Limits {
        start: entry.start_timeout(&queue),
        progress: entry.progress_timeout(&queue),
        run: entry.run_timeout(&queue),
    };
    let job = Job {
        id: t.job_id.clone(),
        queue: rt.keys().name().to_owned(),
        payload: entry.payload,
        attempt: t.attempt,
        max_attempts,
        workflow: entry.workflow,
        traceparent: entry.traceparent,
        enqueued_ms: entry.enqueued_ms,
    };
    let ctx = JobContext {
        cancel: held.cancel.clone(),
        tracker: tracker.clone(),
    };
    let started = Instant::now();
    let ended = tokio::select! {
        // A stop (cancel, lost lease, shutdown) wins over the handler's own answer to it.
        biased;
        _ = held.cancel.cancelled() => Ended::Stopped(held.stop_reason().unwrap_or(StopReason::Shutdown)),
        kind = timeouts::watchdog(&tracker, limits) => Ended::Timeout(kind),
        out = rt.handler.handle(job, ctx) => match held.stop_reason() {
            Some(reason) => Ended::Stopped(reason),
            None => Ended::Outcome(out),
        },
    };
    // Whatever ended the attempt, work the handler spawned elsewhere must stop too.
    held.cancel.cancel();
    if matches!(ended, Ended::Outcome(_)) {
        // The latest progress report lands before the end is recorded.
        tracker.flush().await;
    }
    if let Some(started_at) = tracker.snapshot().started_at {
        metrics.run.observe(started_at.elapsed().as_secs_f64());
    }
    let mut ending = Ending {
        timeout: None,
        stage: tracker.current_stage(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        stages_json: tracker.stages_json(),
    };
    let retry_or_dead = |error: String| {
        if t.attempt < max_attempts {
            Commit::Retry {
                error,
                delay: queue.backoff(t.attempt, rand::random::<f64>()),
            }
        } else {
            Commit::Dead {
                reason: "attempts_exhausted",
                error: format!(
                    "attempts exhausted ({max_attempts} of {max_attempts}); last error: {error}"
                ),
            }
        }
    };
    let commit = match ended {
        Ended::Outcome(Outcome::Succeeded(v)) => Some(Commit::Succeeded(v.to_string())),
        Ended::Outcome(Outcome::Fail(e)) => Some(Commit::Failed(e)),
        Ended::Outcome(Outcome::Retry(e)) => Some(retry_or_dead(e)),
        Ended::Timeout(kind) => {
            let stage = ending
                .stage
                .as_deref()
                .map_or_else(String::new, |s| format!(" in stage {s}"));
            let msg = format!(
                "{} timeout on node {}{stage} after {} ms",
                kind.name(),
                rt.taker.node,
                ending.elapsed_ms
            );
            tracing::warn!(job = %t.job_id, kind = kind.name(), stage = ?ending.stage, "timeout fired; stopping the attempt");
            ending.timeout = Some(kind.name());
            metrics.timeout(kind.name());
            Some(retry_or_dead(msg))
        }
        Ended::Stopped(StopReason::LeaseLost) => {
            metrics.timeout("lease");
            None
        }
        Ended::Stopped(StopReason::Cancelled) => Some(Commit::Cancelled),
        Ended::Stopped(StopReason::Shutdown) => Some(Commit::Release),
    };
    if let Some(commit) = commit {
        let committed = commit_with_retries(&rt, &t, &commit, &ending).await;
        if let (Commit::Retry { delay, .. }, Some(Committed::Ok)) = (&commit, committed) {
            schedule_promote(&rt, *delay);
        }
        match (&commit, committed) {
            (_, Some(Committed::Fenced)) => metrics.fenced.inc(),
            (_, Some(Committed::Poison)) => metrics.outcome("dead"),
            (c, Some(Committed::Ok)) => match c {
                Commit::Succeeded(_) => metrics.outcome("succeeded"),
                Commit::Failed(_) => metrics.outcome("failed"),
                Commit::Retry { .. } => metrics.outcome("retried"),
                Commit::Dead { .. } => metrics.outcome("dead"),
                Commit::Cancelled => metrics.outcome("cancelled"),
                Commit::Release => {}
            },
            (_, None) => {}
        }
        note_health(&rt, &commit, committed).await;
    }
    rt.held.remove(&t.entry_id);
    metrics.busy.dec();
}

/// Promotes the queue's due delayed jobs after `delay`: the retry or hand-off this worker
/// just scheduled then goes back in line on time, waking blocked readers, whatever the
/// other workers' timers say.
fn schedule_promote<H: Handler>(rt: &Arc<Runtime<H>>, delay: Duration) {
    let redis = rt.redis().clone();
    let keys = rt.keys().clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay + Duration::from_millis(5)).await;
        let mut cmd = functions::fcall("fleetq_promote", &keys);
        cmd.arg(100);
        if let Err(e) = functions::call::<(u64, u64), _>(&mut redis.conn(), &cmd, "promote").await {
            tracing::warn!(error = %e, "cannot promote due retries; idle workers and brokers will");
        }
    });
}

/// Counts the attempt in this node's failure streak and suspends the node after K in a row.
async fn note_health<H>(rt: &Runtime<H>, commit: &Commit, committed: Option<Committed>) {
    let health = &rt.node.health;
    match (commit, committed) {
        (_, None | Some(Committed::Fenced | Committed::Poison)) => {}
        (Commit::Succeeded(_), _) => health.success(),
        (
            Commit::Retry { .. }
            | Commit::Dead {
                reason: "attempts_exhausted",
                ..
            },
            _,
        ) => {
            let streak = health.failure();
            let k = rt.config.suspend_after;
            if k > 0 && streak >= k && health.suspended_for().is_none() {
                let until = epoch_ms() + rt.config.suspend_for.as_millis() as u64;
                rt.node
                    .suspend(until, &format!("{streak} failures or timeouts in a row"))
                    .await;
            }
        }
        _ => {}
    }
}

async fn commit_with_retries<H>(
    rt: &Runtime<H>,
    t: &Taken,
    commit: &Commit,
    ending: &Ending,
) -> Option<Committed> {
    let mut delay = Duration::from_millis(100);
    for attempt in 1..=COMMIT_TRIES {
        match completion::commit(
            rt.redis(),
            rt.keys(),
            &rt.taker.consumer,
            &t.entry_id,
            t.deliveries,
            &t.job_id,
            commit,
            ending,
        )
        .await
        {
            Ok(c) => return Some(c),
            Err(e) if e.is_transient() && attempt < COMMIT_TRIES => {
                tracing::warn!(job = %t.job_id, error = %e, "commit failed; trying again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => {
                tracing::error!(job = %t.job_id, error = %e,
                    "cannot record the end of the job; its lease will run out and another host will run it again");
                return None;
            }
        }
    }
    None
}

/// Gives back everything still in this consumer's pending list, then removes the consumer.
async fn release_pending<H>(rt: &Runtime<H>) {
    let pending: redis::RedisResult<Vec<(String, String, u64, u64)>> = redis::cmd("XPENDING")
        .arg(rt.keys().stream())
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(&rt.taker.consumer)
        .query_async(&mut rt.redis().conn())
        .await;
    let pending = match pending {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pending entries at shutdown; their leases will run out");
            return;
        }
    };
    for (entry_id, _, _, deliveries) in &pending {
        let job_id = job_id_of(rt, entry_id).await;
        let r = completion::commit(
            rt.redis(),
            rt.keys(),
            &rt.taker.consumer,
            entry_id,
            *deliveries,
            &job_id,
            &Commit::Release,
            &Ending::default(),
        )
        .await;
        if let Err(e) = r {
            tracing::warn!(entry = %entry_id, error = %e, "cannot release an entry at shutdown; its lease will run out");
        }
    }
    if !pending.is_empty() {
        tracing::info!(count = pending.len(), "released unstarted entries");
    }
    let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(rt.keys().stream())
        .arg(GROUP)
        .arg(&rt.taker.consumer)
        .query_async(&mut rt.redis().conn())
        .await;
}

async fn job_id_of<H>(rt: &Runtime<H>, entry_id: &str) -> String {
    let r: redis::RedisResult<Vec<take::EntryReply>> = redis::cmd("XRANGE")
        .arg(rt.keys().stream())
        .arg(entry_id)
        .arg(entry_id)
        .query_async(&mut rt.redis().conn())
        .await;
    match r {
        Ok(entries) => entries
            .into_iter()
            .next()
            .map_or_else(|| entry_id.to_owned(), |e| take::raw_entry(e).job_id()),
        Err(_) => entry_id.to_owned(),
    }
}
