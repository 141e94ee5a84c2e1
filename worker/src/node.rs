//! This host as the fleet sees it: its record (`fleetq:node:<node>`, renewed by a heartbeat
//! and gone when the worker stops), its failure streak, and suspension — by itself after K
//! failures or timeouts in a row, or by an operator — during which it takes no new work.
//!
//! The heartbeat writes the whole record (`fleetq_node_beat`) only when there is news: at
//! start, when the busy slots, the suspension or the failure streak changed (busy changes
//! are sent within [`BUSY_BEAT_GAP`], not at the next beat), and when the record is gone. A
//! beat without news renews the record's time to live and looks for an operator's command:
//! `PEXPIRE` and `HGET`, one round trip.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fleetq_broker::functions::{self, fcall};
use fleetq_broker::{keys, QueueKeys, Redis};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// Least time between two heartbeats sent because the busy slots changed: a worker whose slots
/// turn over thousands of times a second sends one a second, and an idle one sends its change
/// at once.
pub(crate) const BUSY_BEAT_GAP: Duration = Duration::from_secs(1);

/// The record lives this many heartbeats: two beats may fail before it expires.
pub(crate) const RECORD_LIVES_BEATS: u32 = 3;

/// Health of this node: failure streak and suspension.
#[derive(Debug, Default)]
pub(crate) struct Health {
    streak: AtomicU32,
    /// Suspended until this time (ms since the epoch, local clock); 0 when not suspended.
    suspended_until: AtomicU64,
    /// Wakes the read loop and the heartbeat when the suspension changes.
    pub(crate) changed: Notify,
    /// Wakes the heartbeat when a job starts or ends in a slot (a stored wake-up when the
    /// heartbeat is busy, so none is lost).
    busy: Notify,
}

pub(crate) fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Health {
    /// How long the node stays suspended from now, if it is.
    pub(crate) fn suspended_for(&self) -> Option<Duration> {
        let until = self.suspended_until.load(Ordering::SeqCst);
        let now = epoch_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }

    pub(crate) fn suspended_until(&self) -> u64 {
        self.suspended_until.load(Ordering::SeqCst)
    }

    /// A job started or ended in a slot: the record's busy count follows.
    pub(crate) fn busy_changed(&self) {
        self.busy.notify_one();
    }

    pub(crate) fn streak(&self) -> u32 {
        self.streak.load(Ordering::SeqCst)
    }

    pub(crate) fn success(&self) {
        self.streak.store(0, Ordering::SeqCst);
    }

    /// Counts a failure or timeout; returns the streak.
    pub(crate) fn failure(&self) -> u32 {
        self.streak.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn set(&self, until_ms: u64) {
        self.suspended_until.store(until_ms, Ordering::SeqCst);
        if until_ms == 0 {
            self.streak.store(0, Ordering::SeqCst);
        }
        self.changed.notify_waiters();
    }
}

/// Everything the node record and suspension need.
#[derive(Debug, Clone)]
pub(crate) struct NodeHandle {
    pub(crate) redis: Redis,
    /// The queue (its base name goes in the record).
    pub(crate) keys: QueueKeys,
    /// Where the suspension is published: the queue, or each of its partitions and itself.
    pub(crate) sources: Arc<Vec<QueueKeys>>,
    pub(crate) node: String,
    pub(crate) consumer: String,
    pub(crate) health: Arc<Health>,
    pub(crate) metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Where this worker serves `/metrics`, for the record (and scrape discovery).
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
}

impl NodeHandle {
    /// Suspends the node until `until_ms` for `reason`, on the queue and in its record.
    pub(crate) async fn suspend(&self, until_ms: u64, reason: &str) {
        self.health.set(until_ms);
        self.metrics.suspended.set(1);
        tracing::warn!(node = %self.node, reason, for_ms = until_ms.saturating_sub(epoch_ms()),
            "node suspended: taking no new jobs");
        self.publish(until_ms, reason).await;
    }

    /// Lifts the suspension.
    pub(crate) async fn resume(&self, reason: &str) {
        self.health.set(0);
        self.metrics.suspended.set(0);
        tracing::info!(node = %self.node, reason, "node resumed: taking jobs again");
        self.publish(0, reason).await;
    }

    async fn publish(&self, until_ms: u64, reason: &str) {
        for keys in self.sources.iter() {
            let mut cmd = fcall("fleetq_node_state", keys);
            cmd.arg(&self.node).arg(until_ms).arg(reason);
            if let Err(e) =
                functions::call::<String>(&mut self.redis.conn(), &cmd, "node state").await
            {
                tracing::warn!(queue = %keys.name(), error = %e, "cannot record the node's suspension state");
            }
        }
    }
}

/// What the record says that changes while the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct News {
    busy: usize,
    suspended_until: u64,
    failure_streak: u32,
}

impl News {
    /// Whether `other` differs from this in the busy slots alone.
    fn differs_in_busy_only(self, other: News) -> bool {
        self.busy != other.busy
            && News {
                busy: other.busy,
                ..self
            } == other
    }
}

/// Beats every `interval` (and at once when the suspension changes, within [`BUSY_BEAT_GAP`]
/// when the busy slots do) until `stop`; applies the operator's suspend/resume commands. The
/// record lives [`RECORD_LIVES_BEATS`] intervals.
pub(crate) async fn heartbeat_loop(
    node: NodeHandle,
    slots: usize,
    free: Arc<Semaphore>,
    interval: Duration,
    stop: CancellationToken,
) {
    let started_ms = epoch_ms();
    let ttl = interval * RECORD_LIVES_BEATS;
    // What the record holds, as far as this worker knows; None: write it all.
    let mut recorded: Option<News> = None;
    // The last beat failed: the next one waits for the interval, as a timed one.
    let mut failed = false;
    let mut beaten = Instant::now();
    let mut due = beaten;
    loop {
        // Armed before the beat, so a health change during the call still wakes the next one.
        let changed = node.health.changed.notified();
        let news = News {
            busy: slots.saturating_sub(free.available_permits()),
            suspended_until: node.health.suspended_until(),
            failure_streak: node.health.streak(),
        };
        let now = Instant::now();
        // News goes out at once, but a change of the busy slots alone not sooner than
        // BUSY_BEAT_GAP after the last beat.
        let news_at = match recorded {
            None if failed => None,
            Some(r) if r == news => None,
            Some(r) if r.differs_in_busy_only(news) => Some(beaten + BUSY_BEAT_GAP),
            _ => Some(now),
        };
        if now >= due || news_at.is_some_and(|at| now >= at) {
            recorded = beat(&node, slots, news, recorded, ttl, started_ms).await;
            failed = recorded.is_none();
            beaten = Instant::now();
            due = beaten + interval;
            continue;
        }
        let wake = news_at.map_or(due, |at| at.min(due));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = changed => {}
            // Not while a beat is planned: slots that turn over thousands of times a second
            // then wake this loop about once a second, not at every job.
            _ = node.health.busy.notified(), if news_at.is_none() => {}
        }
    }
    // Gone from the fleet at once rather than after the record's time to live.
    let _: redis::RedisResult<i64> = redis::cmd("DEL")
        .arg(keys::node(&node.node))
        .query_async(&mut node.redis.conn())
        .await;
}

/// One heartbeat: the whole record when `news` is not what it holds (or that is unknown), else
/// a renewal of its time to live, which also looks for an operator's command (the whole
/// record is written then too: that call takes the command atomically). Returns what the
/// record holds afterwards, `None` when unknown.
async fn beat(
    node: &NodeHandle,
    slots: usize,
    news: News,
    recorded: Option<News>,
    ttl: Duration,
    started_ms: u64,
) -> Option<News> {
    if recorded == Some(news) {
        let key = keys::node(&node.node);
        let renewed: redis::RedisResult<(i64, Option<String>)> = redis::pipe()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(ttl.as_millis() as u64)
            .cmd("HGET")
            .arg(&key)
            .arg("command")
            .query_async(&mut node.redis.conn())
            .await;
        match renewed {
            // Renewed, and no command waits.
            Ok((1, None)) => return recorded,
            // The record is gone (expired, or taken for a dead process's) or a command waits.
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "node heartbeat failed; will retry");
                return recorded;
            }
        }
    }
    let cmd = beat_command(node, slots, news, ttl, started_ms);
    match functions::call::<String>(&mut node.redis.conn(), &cmd, "node heartbeat").await {
        Ok(command) => {
            obey(node, &command).await;
            Some(news)
        }
        Err(e) => {
            tracing::warn!(error = %e, "node heartbeat failed; will retry");
            None
        }
    }
}

/// The `fleetq_node_beat` call: writes the node record, which lives `ttl`, and returns the
/// operator's pending command for this node.
fn beat_command(
    node: &NodeHandle,
    slots: usize,
    news: News,
    ttl: Duration,
    started_ms: u64,
) -> redis::Cmd {
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("fleetq_node_beat")
        .arg(1)
        .arg(keys::node(&node.node))
        .arg(ttl.as_millis() as u64)
        .arg("node")
        .arg(&node.node)
        .arg("queues")
        .arg(node.keys.name())
        .arg("slots")
        .arg(slots)
        .arg("busy")
        .arg(news.busy)
        .arg("version")
        .arg(env!("CARGO_PKG_VERSION"))
        .arg("consumer")
        .arg(&node.consumer)
        .arg("pid")
        .arg(std::process::id())
        .arg("host")
        .arg(host_name())
        .arg("started_ms")
        .arg(started_ms)
        .arg("suspended_until")
        .arg(news.suspended_until)
        .arg("failure_streak")
        .arg(news.failure_streak)
        .arg("metrics_addr")
        .arg(
            node.metrics_addr
                .map_or_else(String::new, |a| a.to_string()),
        );
    cmd
}

/// This machine's host name, for the record (an operator finds the process by pid and
/// host): the kernel's (`/proc/sys/kernel/hostname`), else `HOSTNAME`, else empty.
fn host_name() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().map(|h| h.trim().to_owned()))
            .unwrap_or_default()
    })
}

/// Carries out the operator command the heartbeat returned: `resume`, `suspend:<until ms>`,
/// or nothing (any other reply).
async fn obey(node: &NodeHandle, command: &str) {
    if command == "resume" {
        node.resume("operator").await;
    } else if let Some(until) = command
        .strip_prefix("suspend:")
        .and_then(|u| u.parse::<u64>().ok())
    {
        node.suspend(until, "operator").await;
    }
}
