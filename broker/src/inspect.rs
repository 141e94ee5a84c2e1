//! Reading a queue's state from Redis: depths, oldest wait, counters, dead letters. Used by
//! the broker's metrics and HTTP API and by the CLI. Every read is O(1) or bounded.

use std::collections::HashMap;

use serde::Serialize;

use crate::connection::SharedConn;
use crate::functions::{self, fcall};
use crate::keys::{QueueKeys, GROUP};

use crate::{Error, Redis, Result};

/// The state of one queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct QueueState {
    /// The queue name.
    pub queue: String,
    /// Jobs waiting for a worker (cancelled or expired entries not yet dropped left out).
    pub waiting: u64,
    /// Jobs delivered to a worker and not finished (the pending list).
    pub in_flight: u64,
    /// Retries waiting out their backoff and scheduled jobs.
    pub delayed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Age of the oldest waiting job, seconds (0 when none waits).
    pub oldest_waiting_seconds: f64,
    /// Jobs ever enqueued (retries and hand-offs not counted again).
    pub enqueued_total: u64,
    /// Consumers (worker processes) known to the group.
    pub consumers: u64,
    /// The counters kept by the server-side functions (`fleetq:{q}:stats`).
    pub stats: HashMap<String, i64>,
}

impl QueueState {
    /// Adds a partition's state to its queue's: counts add up, the oldest wait is the oldest
    /// of both, consumers are the most any partition has (every worker reads them all).
    fn absorb(&mut self, part: QueueState) {
        self.waiting += part.waiting;
        self.in_flight += part.in_flight;
        self.delayed += part.delayed;
        self.dead += part.dead;
        self.oldest_waiting_seconds = self.oldest_waiting_seconds.max(part.oldest_waiting_seconds);
        self.enqueued_total += part.enqueued_total;
        self.consumers = self.consumers.max(part.consumers);
        for (k, v) in part.stats {
            *self.stats.entry(k).or_default() += v;
        }
    }

    /// A counter from the stats hash, 0 when absent.
    pub fn stat(&self, name: &str) -> i64 {
        self.stats.get(name).copied().unwrap_or(0)
    }
}

fn map_of(flat: Vec<redis::Value>) -> HashMap<String, redis::Value> {
    let mut out = HashMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Ok(k) = redis::from_redis_value::<String>(k) {
            out.insert(k, v);
        }
    }
    out
}

fn num(m: &HashMap<String, redis::Value>, k: &str) -> Option<u64> {
    m.get(k)
        .and_then(|v| redis::from_redis_value_ref::<Option<u64>>(v).ok().flatten())
}

fn text(m: &HashMap<String, redis::Value>, k: &str) -> Option<String> {
    m.get(k)
        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

/// An `XINFO` reply as field → value.
type Info = HashMap<String, redis::Value>;

/// The states of the queues among `served` (see [`crate::partitions::served`]), a split
/// queue's partitions added up under the queue's name; sorted by name.
pub async fn queue_states(redis: &Redis, served: &[QueueKeys]) -> Result<Vec<QueueState>> {
    let mut by_queue: std::collections::BTreeMap<String, QueueState> = Default::default();
    for keys in served {
        let mut state = queue_state(redis, keys).await?;
        let base = crate::keys::base_of(keys.name()).to_owned();
        state.queue.clone_from(&base);
        match by_queue.get_mut(&base) {
            Some(total) => total.absorb(state),
            None => {
                by_queue.insert(base, state);
            }
        }
    }
    Ok(by_queue.into_values().collect())
}

/// Reads the state of queue `keys`.
pub async fn queue_state(redis: &Redis, keys: &QueueKeys) -> Result<QueueState> {
    // On the queue's own shard, TIME included.
    let mut conn = redis.conn_for(&keys.stream());
    let (exists, mut state, now_ms) = read_counters(&mut conn, keys).await?;
    // XINFO fails on a missing stream; a queue nobody has enqueued to yet has only counters.
    if !exists {
        return Ok(state);
    }
    let length = read_enqueued(&mut conn, keys, &mut state).await?;
    let group = read_group(&mut conn, keys).await?;
    let tombstones = u64::try_from(state.stat("tombstones")).unwrap_or(0);
    let (lag, last_delivered) = match &group {
        Some(g) => {
            state.in_flight = num(g, "pending").unwrap_or(0);
            state.consumers = num(g, "consumers").unwrap_or(0);
            // `lag` is exact while no undelivered entry is deleted, which fleetq never does.
            let lag = num(g, "lag").unwrap_or(length.saturating_sub(state.in_flight));
            (
                lag,
                text(g, "last-delivered-id").unwrap_or_else(|| "0-0".into()),
            )
        }
        None => (length, "0-0".to_owned()),
    };
    state.waiting = lag.saturating_sub(tombstones);
    if state.waiting > 0 {
        state.oldest_waiting_seconds =
            oldest_waiting_ms(redis, keys, &last_delivered, tombstones, now_ms).await? as f64
                / 1000.0;
    }
    Ok(state)
}

/// One round trip for what every queue has, stream or not: whether the stream exists, the
/// delayed and dead depths, the counters, and the server's clock (ms) for ages.
async fn read_counters(conn: &mut SharedConn, keys: &QueueKeys) -> Result<(bool, QueueState, u64)> {
    let (exists, delayed, dead, raw_stats, server_time): (
        bool,
        u64,
        u64,
        HashMap<String, String>,
        (u64, u64),
    ) = redis::pipe()
        .exists(keys.stream())
        .zcard(keys.delayed())
        .xlen(keys.dead())
        .hgetall(keys.stats())
        .cmd("TIME")
        .query_async(conn)
        .await
        .map_err(step)?;
    let now_ms = server_time.0 * 1000 + server_time.1 / 1000;
    // Counters only (the hash also keeps cursors).
    let stats = raw_stats
        .into_iter()
        .filter_map(|(k, v)| v.parse::<i64>().ok().map(|n| (k, n)))
        .collect();
    let state = QueueState {
        queue: keys.name().to_owned(),
        delayed,
        dead,
        stats,
        ..QueueState::default()
    };
    Ok((exists, state, now_ms))
}

/// Sets `enqueued_total` from the stream's `entries-added` and returns the stream length.
async fn read_enqueued(
    conn: &mut SharedConn,
    keys: &QueueKeys,
    state: &mut QueueState,
) -> Result<u64> {
    let stream: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(keys.stream())
        .query_async(conn)
        .await
        .map_err(step)?;
    let stream = map_of(stream);
    let length = num(&stream, "length").unwrap_or(0);
    let added = num(&stream, "entries-added").unwrap_or(length);
    // A scheduled job counts as enqueued when it is scheduled; every later add of a job to the
    // stream (retry, hand-off, promotion when due) is counted in `readded` and taken off.
    let readded = u64::try_from(state.stat("readded")).unwrap_or(0);
    let scheduled = u64::try_from(state.stat("scheduled")).unwrap_or(0);
    state.enqueued_total = (added + scheduled).saturating_sub(readded);
    Ok(length)
}

/// The entries of a stream not yet delivered to fleetq's group, from its `XINFO GROUPS` reply
/// and its length, as the functions count them: the group's lag, else (when Redis cannot tell
/// it) the entries neither pending nor delivered, `length − pending`; without a group, all.
pub(crate) fn undelivered(groups: Vec<Vec<redis::Value>>, length: u64) -> u64 {
    let group = groups
        .into_iter()
        .map(map_of)
        .find(|g| text(g, "name").as_deref() == Some(GROUP));
    match group {
        Some(g) => {
            num(&g, "lag").unwrap_or_else(|| length.saturating_sub(num(&g, "pending").unwrap_or(0)))
        }
        None => length,
    }
}

/// fleetq's consumer group on the stream, if it was created yet.
async fn read_group(conn: &mut SharedConn, keys: &QueueKeys) -> Result<Option<Info>> {
    let groups: Vec<Vec<redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(keys.stream())
        .query_async(conn)
        .await
        .map_err(step)?;
    Ok(groups
        .into_iter()
        .map(map_of)
        .find(|g| text(g, "name").as_deref() == Some(GROUP)))
}

fn step(e: redis::RedisError) -> Error {
    Error::redis("read queue state", e)
}

/// Age of the oldest undelivered entry that is not a tombstone (looks at most
/// tombstones + 1 entries, capped at 100).
async fn oldest_waiting_ms(
    redis: &Redis,
    keys: &QueueKeys,
    last_delivered: &str,
    tombstones: u64,
    now_ms: u64,
) -> Result<u64> {
    let mut conn = redis.conn();
    let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(keys.stream())
        .arg(format!("({last_delivered}"))
        .arg("+")
        .arg("COUNT")
        .arg((tombstones + 1).min(100))
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::redis("read oldest waiting job", e))?;
    for (id, fields) in entries {
        let job_id = fields.get("id").cloned().unwrap_or_else(|| id.clone());
        if tombstones > 0 {
            let tomb: Option<String> = redis::cmd("HGET")
                .arg(keys.job(&job_id))
                .arg("tombstone")
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::redis("read oldest waiting job", e))?;
            if tomb.is_some() {
                continue;
            }
        }
        let enqueued = fields
            .get("enqueued_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| crate::job::entry_ms(&id));
        return Ok(now_ms.saturating_sub(enqueued));
    }
    Ok(0)
}

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct DeadLetter {
    /// Its entry id in the dead-letter stream (what retry and purge take).
    pub dead_id: String,
    /// The job id.
    pub job: String,
    /// Why: malformed, attempts_exhausted, poison, …
    pub reason: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: u64,
    /// Nodes of the attempts, in order.
    pub nodes: Vec<String>,
    /// When it died, ms since the epoch.
    pub dead_ms: u64,
    /// The job's original fields (payload, id, …).
    pub fields: HashMap<String, String>,
}

/// The oldest `count` dead letters of queue `keys`, from `start` (an entry id, `-` for the
/// beginning).
pub async fn dead_letters(
    redis: &Redis,
    keys: &QueueKeys,
    start: &str,
    count: usize,
) -> Result<Vec<DeadLetter>> {
    if start != "-" {
        check_dead_id(start)?;
    }
    // Bytes: a dead letter keeps the original entry's fields, whatever their bytes.
    type Raw = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;
    let raw: Raw = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(count)
        .query_async(&mut redis.conn())
        .await
        .map_err(|e| Error::redis("list dead letters", e))?;
    Ok(raw
        .into_iter()
        .map(|(dead_id, flat)| dead_letter(dead_id, flat))
        .collect())
}

/// One dead-letter entry: fields named `f:<name>` are the original entry's, the rest say
/// why and where it died.
fn dead_letter(dead_id: String, flat: Vec<(Vec<u8>, Vec<u8>)>) -> DeadLetter {
    let mut m: HashMap<String, String> = HashMap::new();
    let mut fields = HashMap::new();
    let text = |b: Vec<u8>| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    };
    for (k, v) in flat.into_iter().map(|(k, v)| (text(k), text(v))) {
        match k.strip_prefix("f:") {
            Some(name) => {
                fields.insert(name.to_owned(), v);
            }
            None => {
                m.insert(k, v);
            }
        }
    }
    let mut take = |k: &str| m.remove(k).unwrap_or_default();
    DeadLetter {
        dead_id,
        job: take("job"),
        reason: take("reason"),
        error: take("error"),
        attempts: take("attempts").parse().unwrap_or(0),
        nodes: take("nodes")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        dead_ms: take("dead_ms").parse().unwrap_or(0),
        fields,
    }
}

/// Checks a dead letter id (`<ms>-<seq>`, as [`dead_letters`] lists them) before Redis sees it.
fn check_dead_id(id: &str) -> Result<()> {
    let number = |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
    let valid = match id.split_once('-') {
        Some((ms, seq)) => number(ms) && number(seq),
        None => number(id),
    };
    match valid {
        true => Ok(()),
        false => Err(Error::Config(format!(
            "invalid dead letter id {:?}: expected <ms>-<seq> such as 1700000000000-0, as `fleetq dead <queue> list` shows",
            id.chars().take(100).collect::<String>()
        ))),
    }
}

/// Puts dead letter `dead_id` back in line as a fresh job. Returns the job id, or `None`
/// when there is no such dead letter.
pub async fn retry_dead(redis: &Redis, keys: &QueueKeys, dead_id: &str) -> Result<Option<String>> {
    check_dead_id(dead_id)?;
    let mut cmd = fcall("fleetq_dead_retry", keys);
    cmd.arg(dead_id);
    let (job, _entry): (String, String) =
        functions::call(&mut redis.conn(), &cmd, "retry dead letter").await?;
    Ok((!job.is_empty()).then_some(job))
}

/// Deletes the given dead letters, or all of the queue's when `ids` is empty. Returns how many.
pub async fn purge_dead(redis: &Redis, keys: &QueueKeys, ids: &[String]) -> Result<u64> {
    for id in ids {
        check_dead_id(id)?;
    }
    let mut cmd = fcall("fleetq_dead_purge", keys);
    for id in ids {
        cmd.arg(id);
    }
    functions::call(&mut redis.conn(), &cmd, "purge dead letters").await
}

/// An event of a queue: its id in the events stream and its fields (`type`, `job`, …).
pub type Event = (String, HashMap<String, String>);

/// The id of the last entry of stream `key` (`0-0` when it has none or does not exist): where
/// a read of what comes next starts (`XREAD … <id>`).
pub async fn last_entry_id<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<String> {
    let last: Vec<(String, redis::Value)> = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(last
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
}

/// The queue's events after `after` (an event id, `0-0` for all), blocking up to `block` for
/// the first one; empty when none came. `conn` must be a blocking connection
/// ([`Redis::blocking_conn`]) whose response timeout exceeds `block`.
pub async fn read_events(
    conn: &mut redis::aio::MultiplexedConnection,
    keys: &QueueKeys,
    after: &str,
    block: std::time::Duration,
) -> Result<Vec<Event>> {
    type Reply = Vec<(String, Vec<(String, Vec<(String, String)>)>)>;
    let read: Option<Reply> = redis::cmd("XREAD")
        .arg("BLOCK")
        .arg(block.as_millis().max(1) as u64)
        .arg("STREAMS")
        .arg(keys.events())
        .arg(after)
        .query_async(conn)
        .await
        .map_err(|e| Error::redis("read events", e))?;
    Ok(read
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .map(|(id, fields)| (id, fields.into_iter().collect()))
        .collect())
}

/// Every event of the queue still in its (capped) events stream, oldest first.
pub async fn events(redis: &Redis, keys: &QueueKeys) -> Result<Vec<Event>> {
    let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.events())
        .arg("-")
        .arg("+")
        .query_async(&mut redis.conn())
        .await
        .map_err(|e| Error::redis("read events", e))?;
    Ok(raw
        .into_iter()
        .map(|(id, fields)| (id, fields.into_iter().collect()))
        .collect())
}
