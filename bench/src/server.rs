//! A fresh `redis-server` per scenario (loopback, free port, no persistence: `LocalRedis`),
//! so that no scenario's keys, memory or counters leak into another's, and what the
//! scenarios read from it: counters, memory, command statistics, node records. The free
//! functions at the end take any [`Redis`] handle, so the cluster scenario uses them too.

use std::time::Duration;

use anyhow::Context;
use fleetq_broker::keys::GROUP;
use fleetq_broker::{LocalRedis, QueueConfig, QueueKeys, Redis};
use redis::aio::ConnectionLike;

use crate::commandstats::CommandStats;
use crate::sample::Sample;

/// Retention of finished jobs' hashes in the bench's queues: long enough to check every
/// job of the end-to-end run after it (the default is 1 h), short enough to stay small.
pub const RETENTION: Duration = Duration::from_secs(300);
/// Cap of the events stream in the bench's queues (the default is 10 000): events are still
/// written (they are part of a job's cost), but the stream stays small.
pub const EVENTS_MAXLEN: u64 = 100;

/// The bench's queue config: defaults (lease 10 s included) but [`RETENTION`] and
/// [`EVENTS_MAXLEN`].
pub fn queue_config() -> QueueConfig {
    QueueConfig {
        retention: RETENTION,
        events_maxlen: EVENTS_MAXLEN,
        ..QueueConfig::default()
    }
}

/// One private Redis and a client on it.
#[derive(Debug)]
pub struct Server {
    /// Killed and its directory removed when dropped.
    local: LocalRedis,
    /// Shared client handle.
    pub redis: Redis,
}

impl Server {
    /// Starts a server, connects to it and loads the function library (as a fleet's broker
    /// would: workers wait for it and never load it themselves).
    pub async fn start() -> anyhow::Result<Self> {
        let local = LocalRedis::start().context("start redis-server")?;
        let redis = Redis::connect(&local.url())
            .await
            .context("connect to the bench's redis-server")?;
        fleetq_broker::functions::load_all(&redis.conn())
            .await
            .context("load the function library")?;
        Ok(Self { local, redis })
    }

    /// The server's URL, for worker processes.
    pub fn url(&self) -> String {
        self.local.url()
    }

    /// Writes `config` for `queue` and returns the queue's keys.
    pub async fn configure(&self, queue: &str, config: &QueueConfig) -> anyhow::Result<QueueKeys> {
        let keys = QueueKeys::new(queue)?;
        config
            .store(&mut self.redis.conn(), &keys)
            .await
            .context("write the queue config")?;
        Ok(keys)
    }

    /// Creates the queue's consumer group (as a running fleet would have).
    pub async fn create_group(&self, keys: &QueueKeys) -> anyhow::Result<()> {
        create_group(&self.redis, keys).await
    }

    /// See [`prime_group`].
    pub async fn prime_group(&self, keys: &QueueKeys) -> anyhow::Result<()> {
        prime_group(&self.redis, keys).await
    }

    /// A counter of the queue's stats hash, 0 when absent.
    pub async fn stat(&self, keys: &QueueKeys, field: &str) -> anyhow::Result<i64> {
        stat(&self.redis, keys, field).await
    }

    /// `used_memory` from `INFO memory`, bytes.
    pub async fn used_memory(&self) -> anyhow::Result<u64> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.redis.conn())
            .await
            .context("INFO memory")?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO memory has no used_memory")
    }

    /// Clients blocked in a command (`blocked_clients` of `INFO clients`): a worker waiting
    /// in its `XREADGROUP … BLOCK` is one.
    pub async fn blocked_clients(&self) -> anyhow::Result<u64> {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query_async(&mut self.redis.conn())
            .await
            .context("INFO clients")?;
        info.lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .and_then(|v| v.trim().parse().ok())
            .context("INFO clients has no blocked_clients; is this a Redis server?")
    }

    /// CPU time the server has used so far (see [`cpu_time`]).
    pub async fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(&mut self.redis.conn()).await
    }

    /// Commands and CPU time so far, in one `INFO` (see [`Sample`]).
    pub async fn sample(&self) -> anyhow::Result<Sample> {
        Sample::read(&mut self.redis.conn()).await
    }

    /// `INFO commandstats` now.
    pub async fn command_stats(&self) -> anyhow::Result<CommandStats> {
        CommandStats::read(&mut self.redis.conn()).await
    }

    /// True when every node in `nodes` has a record (`fleetq:node:<node>`).
    pub async fn nodes_present(&self, nodes: &[String]) -> anyhow::Result<bool> {
        let mut pipe = redis::pipe();
        for n in nodes {
            pipe.exists(fleetq_broker::keys::node(n));
        }
        let found: Vec<bool> = pipe
            .query_async(&mut self.redis.conn())
            .await
            .context("EXISTS node records")?;
        Ok(found.iter().all(|f| *f))
    }

    /// `XLEN` of the queue's stream.
    pub async fn stream_len(&self, keys: &QueueKeys) -> anyhow::Result<u64> {
        stream_len(&self.redis, keys).await
    }

    /// Entries in the group's pending list (0 without a group).
    pub async fn pending(&self, keys: &QueueKeys) -> anyhow::Result<u64> {
        pending(&self.redis, keys).await
    }
}

// What follows works on any handle, one server or a cluster (keyed commands are routed).

/// Creates the queue's consumer group (as a running fleet would have).
pub async fn create_group(redis: &Redis, keys: &QueueKeys) -> anyhow::Result<()> {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.stream())
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis.conn())
        .await
        .context("XGROUP CREATE")?;
    Ok(())
}

/// Makes the queue's group look like one a worker has read from: one plain entry is
/// added, read by a throwaway consumer, acknowledged and deleted, and the consumer
/// removed. The stream is empty again, but the group's `entries-read` is now known.
///
/// Why: Redis (7.0) reports `entries-read` as unknown for a group that has never
/// delivered an entry, and `fleetq_enqueue` then computes the new job's position with an
/// `XRANGE … COUNT 1000` instead of in O(1) — about 1 ms per enqueue on a backlog (see
/// the enqueue scenario's cold figure). Every queue a worker has read from is past this.
pub async fn prime_group(redis: &Redis, keys: &QueueKeys) -> anyhow::Result<()> {
    const PRIMER: &str = "bench-primer";
    let mut conn = redis.conn();
    let id: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg("payload")
        .arg("{}")
        .query_async(&mut conn)
        .await
        .context("XADD the primer entry")?;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(PRIMER)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(&mut conn)
        .await
        .context("XREADGROUP the primer entry")?;
    let _: () = redis::pipe()
        .cmd("XACK")
        .arg(keys.stream())
        .arg(GROUP)
        .arg(&id)
        .ignore()
        .cmd("XDEL")
        .arg(keys.stream())
        .arg(&id)
        .ignore()
        .cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(keys.stream())
        .arg(GROUP)
        .arg(PRIMER)
        .ignore()
        .query_async(&mut conn)
        .await
        .context("drop the primer entry")?;
    Ok(())
}

/// A counter of the queue's stats hash, 0 when absent.
pub async fn stat(redis: &Redis, keys: &QueueKeys, field: &str) -> anyhow::Result<i64> {
    let v: Option<i64> = redis::cmd("HGET")
        .arg(keys.stats())
        .arg(field)
        .query_async(&mut redis.conn())
        .await
        .with_context(|| format!("HGET stats {field}"))?;
    Ok(v.unwrap_or(0))
}

/// CPU time the server behind `conn` has used so far (`used_cpu_user + used_cpu_sys` of
/// `INFO cpu`).
pub async fn cpu_time<C: ConnectionLike + Send>(conn: &mut C) -> anyhow::Result<Duration> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(conn)
        .await
        .context("INFO cpu")?;
    crate::sample::cpu_of(&info)
}

/// `XLEN` of the queue's stream.
pub async fn stream_len(redis: &Redis, keys: &QueueKeys) -> anyhow::Result<u64> {
    redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut redis.conn())
        .await
        .context("XLEN")
}

/// Entries in the group's pending list (0 without a group).
pub async fn pending(redis: &Redis, keys: &QueueKeys) -> anyhow::Result<u64> {
    let summary: redis::RedisResult<(u64, redis::Value, redis::Value, redis::Value)> =
        redis::cmd("XPENDING")
            .arg(keys.stream())
            .arg(GROUP)
            .query_async(&mut redis.conn())
            .await;
    match summary {
        Ok((n, ..)) => Ok(n),
        Err(e) if e.code() == Some("NOGROUP") => Ok(0),
        Err(e) => Err(e).context("XPENDING"),
    }
}
