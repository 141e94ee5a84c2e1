//! Crash detection faster than the lease: a worker names its connections after its consumer
//! (`CLIENT SETNAME`), so when its process dies, its connections close and its name leaves
//! `CLIENT LIST` within a moment. The broker (the role that may run `CLIENT LIST`) watches
//! the names of consumers that hold entries; a consumer it saw connected and then misses for
//! [`GONE_AFTER`] is gone, and its entries are put back in line at once (`fleetq_abandon`),
//! waking an idle worker, instead of after the lease.
//!
//! Only consumers this broker saw connected are judged (a worker of an older version, or
//! one started before this broker, falls back to its lease), and nothing is judged until the
//! broker's own connection has been up, and its looks unbroken, for [`GONE_AFTER`] (after a
//! Redis restart, or a freeze or outage that timed out the workers' calls, every worker
//! reconnects, and none is gone). A frozen host keeps its connections open: the lease still
//! catches it. A wrong verdict (the process lives but lost its connections for a while) is
//! safe: its renewals and commit are fenced, and it stops its run.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::calls;
use crate::functions;
use crate::keys::{QueueKeys, GROUP};
use crate::{Error, Redis, Result};

/// How often the broker looks at the connected clients. Default 250 ms.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(250);
/// How long a consumer's name must be missing before its process counts as gone. Default
/// 750 ms: longer than a worker's reconnect backoff (at most 500 ms), far shorter than a lease.
pub const GONE_AFTER: Duration = Duration::from_millis(750);

/// What the broker has seen of the connected consumers.
#[derive(Debug)]
pub struct Liveness {
    /// Consumer name → when its connection was last seen.
    seen: HashMap<String, Instant>,
    /// This broker's own connection ids (one per primary), and since when they have been
    /// the same.
    own: Option<(Vec<i64>, Instant)>,
    /// Gone consumers whose node record was already dealt with (until they are seen again).
    records_done: HashSet<String>,
    /// When the last look succeeded.
    last_look: Option<Instant>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self {
            seen: HashMap::new(),
            own: None,
            records_done: HashSet::new(),
            last_look: None,
        }
    }

    /// Reads `CLIENT LIST` of every primary and notes every named connection.
    pub async fn observe(&mut self, redis: &Redis) -> Result<()> {
        let mut ids = Vec::new();
        let mut lists = Vec::new();
        for mut conn in redis.primaries().await? {
            let (id, list): (i64, String) = redis::pipe()
                .cmd("CLIENT")
                .arg("ID")
                .cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("normal")
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::redis("list connected clients", e))?;
            ids.push(id);
            lists.push(list);
        }
        let now = Instant::now();
        let gap = self
            .last_look
            .is_some_and(|t| now.duration_since(t) >= GONE_AFTER);
        self.last_look = Some(now);
        if self.own.as_ref().is_none_or(|(own, _)| *own != ids) || gap {
            // A new connection of ours: Redis may have restarted or failed over, so every
            // worker is reconnecting now. Or no look for GONE_AFTER (Redis frozen or
            // unreachable, this broker stalled): a name missing now may be one reconnecting,
            // and nothing says how long it has been missing. Start every clock afresh.
            self.own = Some((ids, now));
            for t in self.seen.values_mut() {
                *t = now;
            }
        }
        for list in &lists {
            for name in names(list) {
                self.records_done.remove(name);
                self.seen.insert(name.to_owned(), now);
            }
        }
        Ok(())
    }

    /// Whether `consumer`'s process is gone: seen before, missing for [`GONE_AFTER`].
    pub fn is_gone(&self, consumer: &str) -> bool {
        let Some((_, since)) = &self.own else {
            return false;
        };
        let Some(last) = self.seen.get(consumer) else {
            return false;
        };
        since.elapsed() >= GONE_AFTER && last.elapsed() >= GONE_AFTER
    }

    /// Forgets a consumer (after its entries were put back in line).
    pub fn forget(&mut self, consumer: &str) {
        self.seen.remove(consumer);
    }

    /// Every name seen before and gone now, read once per look: the node records and the
    /// queues' consumers are then judged alike (a name crossing [`GONE_AFTER`] between the two
    /// would have its jobs moved and its record left).
    fn gone_now(&self) -> HashSet<String> {
        self.seen
            .keys()
            .filter(|name| self.is_gone(name))
            .cloned()
            .collect()
    }

    /// Forgets names not seen for an hour (consumers of long gone processes).
    fn prune(&mut self) {
        self.seen
            .retain(|_, t| t.elapsed() < Duration::from_secs(3600));
        let seen = &self.seen;
        self.records_done.retain(|name| seen.contains_key(name));
    }
}

/// The `name=` values of a `CLIENT LIST` reply.
fn names(list: &str) -> HashSet<&str> {
    list.lines()
        .filter_map(|line| line.split(' ').find_map(|f| f.strip_prefix("name=")))
        .filter(|n| !n.is_empty())
        .collect()
}

/// Consumers of queue `keys`: (name, pending).
async fn consumers(redis: &Redis, keys: &QueueKeys) -> Result<Vec<(String, u64)>> {
    let reply: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.stream())
        .arg(GROUP)
        .query_async(&mut redis.conn())
        .await;
    let rows = match reply {
        Ok(rows) => rows,
        // No stream or no group yet: nobody holds anything.
        Err(e) if e.code() == Some("NOGROUP") || e.to_string().contains("no such key") => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(Error::redis("list consumers", e)),
    };
    Ok(rows
        .into_iter()
        .filter_map(|m| {
            let name = redis::from_redis_value_ref::<String>(m.get("name")?).ok()?;
            let pending = redis::from_redis_value_ref::<u64>(m.get("pending")?).ok()?;
            Some((name, pending))
        })
        .collect())
}

/// One look at the fleet: deletes the node record of every gone consumer, and puts back in
/// line the entries of every gone consumer of `queues`. Returns how many entries moved.
pub async fn tick(redis: &Redis, queues: &[QueueKeys], seen: &mut Liveness) -> Result<u64> {
    seen.observe(redis).await?;
    seen.prune();
    let gone = seen.gone_now();
    let records_due: Vec<String> = gone
        .iter()
        .filter(|name| !seen.records_done.contains(*name))
        .cloned()
        .collect();
    for consumer in records_due {
        // Never in the way of putting jobs back in line: a record left over expires anyway.
        match crate::nodes::gone(redis, &consumer).await {
            Ok(true) => tracing::info!(%consumer,
                "a worker process is gone (its connections closed); its node record leaves the fleet"),
            Ok(false) => {}
            Err(e) => tracing::warn!(%consumer, error = %e,
                "cannot remove a gone worker's node record; it expires three heartbeats after its last one"),
        }
        seen.records_done.insert(consumer);
    }
    let mut moved = 0;
    // Forgotten once every queue was looked at: a worker may serve several.
    let mut done: HashSet<String> = HashSet::new();
    for keys in queues {
        for (consumer, pending) in consumers(redis, keys).await? {
            if !gone.contains(&consumer) {
                continue;
            }
            // Also for a consumer that holds nothing: it leaves the group (checked and done in
            // one step by the function), so the queue's consumer count is true at once.
            let cmd = calls::abandon(keys, &consumer);
            let (requeued, dead): (u64, u64) =
                functions::call(&mut redis.conn(), &cmd, "abandon a gone consumer").await?;
            if pending > 0 {
                tracing::warn!(queue = %keys.name(), %consumer, pending, requeued, dead,
                    "a worker process is gone (its connections closed); its jobs go back in line now");
            } else {
                tracing::info!(queue = %keys.name(), %consumer,
                    "a worker process is gone (its connections closed); it leaves the queue's consumers");
            }
            moved += requeued + dead;
            done.insert(consumer);
        }
    }
    for consumer in &done {
        seen.forget(consumer);
    }
    Ok(moved)
}

/// How often the queue list is read again when the broker tends every queue (as often as the
/// maintenance loop does: a new queue is watched within a second).
const REDISCOVER_EVERY: Duration = Duration::from_secs(1);

/// Runs [`tick`] every `interval` on `queues` (every queue found, when empty) until `stop`.
pub async fn run(
    redis: Redis,
    queues: Vec<String>,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut seen = Liveness::new();
    let mut known: Vec<QueueKeys> = Vec::new();
    let mut discovered: Option<Instant> = None;
    let mut outage = crate::retry::OutageLog::new();
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = timer.tick() => {}
        }
        if discovered.is_none_or(|d| d.elapsed() >= REDISCOVER_EVERY) {
            if let Ok(served) = crate::partitions::served(&redis, &queues).await {
                known = served;
                discovered = Some(Instant::now());
            }
        }
        match tick(&redis, &known, &mut seen).await {
            Ok(_) => {
                outage.recovered();
            }
            Err(e) if e.is_transient() => {
                outage.failed("watch worker connections", &e);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch worker connections; the lease still catches dead hosts")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn client_list_names_are_read() {
        let list = "id=3 addr=127.0.0.1:5 laddr=x fd=8 name=gpu-1:42:1700 age=1\n\
                    id=4 addr=127.0.0.1:6 fd=9 name= age=2\n";
        let n = names(list);
        assert!(n.contains("gpu-1:42:1700"));
        assert_eq!(n.len(), 1);
    }
}
