//! Hot queues split in partitions.
//!
//! A queue `q` is one stream in one Redis Cluster slot, so one primary serves all of it. A
//! queue configured with `partitions = P` (P ≥ 2, field of `fleetq:{q}:config`) is P queues
//! `q#0` … `q#P-1` instead, each with every key of a queue under its own hash tag `{q#i}`, so
//! the partitions spread over the primaries. The functions need nothing new: each partition
//! is a complete queue. What this module adds on the client side:
//!
//! - **producers** spread jobs over the partitions: a job with an id (or a partition key)
//!   goes to the partition its hash names, so the same id always lands in the same place and
//!   enqueue stays idempotent; a job without either goes round robin;
//! - **workers** read every partition *and* the base queue `q` (which drains what was queued
//!   before the queue was split, and what producers that know nothing of partitions `XADD`);
//! - **the config** is kept on the base queue; [`sync_config`] copies it to every partition
//!   (the broker does so on every maintenance turn, [`set`] at once);
//! - **metrics and the CLI** add the partitions up and show the queue as one.
//!
//! A position is per partition: "3rd in line" is 3rd in its partition, and workers read the
//! partitions in turn.

use std::collections::HashMap;

use redis::AsyncCommands;

use crate::connection::Redis;
use crate::keys::QueueKeys;
use crate::{Error, Result};

/// The config field holding the number of partitions.
pub const FIELD: &str = "partitions";

/// Most partitions a queue may have.
pub const MAX_PARTITIONS: u32 = 64;

/// A queue and its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    base: QueueKeys,
    /// The partitions (empty when the queue is not split).
    parts: Vec<QueueKeys>,
}

impl Partitions {
    /// A queue of `count` partitions (0 and 1: not split).
    pub fn new(base: QueueKeys, count: u32) -> Result<Self> {
        if count > MAX_PARTITIONS {
            return Err(Error::Config(format!(
                "queue {} asks for {count} partitions; use at most {MAX_PARTITIONS}",
                base.name()
            )));
        }
        let parts = match count {
            0 | 1 => Vec::new(),
            n => (0..n).map(|i| base.partition(i)).collect(),
        };
        Ok(Self { base, parts })
    }

    /// Reads the queue's partition count from its config hash.
    pub async fn load(redis: &Redis, base: &QueueKeys) -> Result<Self> {
        let raw: Option<String> = redis
            .conn_for(&base.config())
            .hget(base.config(), FIELD)
            .await
            .map_err(|e| Error::redis("read the partition count", e))?;
        Self::new(base.clone(), parse_count(base, raw.as_deref())?)
    }

    /// The queue itself.
    pub fn base(&self) -> &QueueKeys {
        &self.base
    }

    /// How many partitions (1 when not split).
    pub fn count(&self) -> u32 {
        self.parts.len().max(1) as u32
    }

    /// True when the queue is split.
    pub fn is_split(&self) -> bool {
        !self.parts.is_empty()
    }

    /// Where jobs are written: the partitions, or the queue itself when not split.
    pub fn targets(&self) -> &[QueueKeys] {
        match self.parts.is_empty() {
            true => std::slice::from_ref(&self.base),
            false => &self.parts,
        }
    }

    /// What workers read: the partitions and the base queue, or the queue itself.
    pub fn sources(&self) -> Vec<QueueKeys> {
        let mut all = self.parts.clone();
        all.push(self.base.clone());
        all
    }

    /// The partition for a job with this id or partition key.
    pub fn for_key(&self, key: &str) -> &QueueKeys {
        let targets = self.targets();
        &targets[usize::from(crate::topology::crc16(key.as_bytes())) % targets.len()]
    }

    /// The partition the `n`-th job without a key goes to.
    pub fn round_robin(&self, n: usize) -> &QueueKeys {
        let targets = self.targets();
        &targets[n % targets.len()]
    }
}

fn parse_count(base: &QueueKeys, raw: Option<&str>) -> Result<u32> {
    let Some(raw) = raw else { return Ok(1) };
    match raw.trim().parse::<u32>() {
        Ok(n) if n <= MAX_PARTITIONS => Ok(n.max(1)),
        _ => Err(Error::Config(format!(
            "queue config field {FIELD} of {} must be a whole number from 1 to {MAX_PARTITIONS}, got {raw:?}; fix it with `fleetq partitions {} <count>`",
            base.name(),
            base.name()
        ))),
    }
}

/// Copies the base queue's config (all but the partition count) to every partition, and
/// removes from a partition what the base no longer has. Returns how many partitions changed.
pub async fn sync_config(redis: &Redis, p: &Partitions) -> Result<usize> {
    if !p.is_split() {
        return Ok(0);
    }
    let mut base: HashMap<String, String> = redis
        .conn_for(&p.base.config())
        .hgetall(p.base.config())
        .await
        .map_err(|e| Error::redis("read the queue config", e))?;
    base.remove(FIELD);
    let mut changed = 0;
    for part in &p.parts {
        let mut conn = redis.conn_for(&part.config());
        let have: HashMap<String, String> = conn
            .hgetall(part.config())
            .await
            .map_err(|e| Error::redis("read a partition's config", e))?;
        if have == base {
            continue;
        }
        let stale: Vec<&String> = have.keys().filter(|k| !base.contains_key(*k)).collect();
        // Not MULTI (the broker's user may not): new values first, then the stale fields go.
        let mut pipe = redis::pipe();
        if !base.is_empty() {
            // HSET with many pairs, not HMSET (not in the broker's ACL line).
            let mut hset = redis::cmd("HSET");
            hset.arg(part.config());
            for (k, v) in &base {
                hset.arg(k).arg(v);
            }
            pipe.add_command(hset).ignore();
        }
        if !stale.is_empty() {
            pipe.hdel(part.config(), stale).ignore();
        }
        let _: () = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis("write a partition's config", e))?;
        changed += 1;
    }
    Ok(changed)
}

/// Splits queue `queue` in `count` partitions (1: not split) and copies its config to them.
/// Refuses to drop a partition that still holds jobs.
pub async fn set(redis: &Redis, base: &QueueKeys, count: u32) -> Result<Partitions> {
    let new = Partitions::new(base.clone(), count)?;
    let old = Partitions::load(redis, base).await?;
    for dropped in old.parts.iter().skip(new.parts.len()) {
        let mut conn = redis.conn_for(&dropped.stream());
        let (entries, delayed): (u64, u64) = redis::pipe()
            .xlen(dropped.stream())
            .zcard(dropped.delayed())
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis("check a partition before dropping it", e))?;
        if entries + delayed > 0 {
            return Err(Error::Config(format!(
                "partition {} still holds {entries} entries and {delayed} delayed jobs; let workers drain it before lowering the count",
                dropped.name()
            )));
        }
    }
    let _: () = redis
        .conn_for(&base.config())
        .hset(base.config(), FIELD, new.count())
        .await
        .map_err(|e| Error::redis("write the partition count", e))?;
    sync_config(redis, &new).await?;
    Ok(new)
}

/// The queues and partitions a broker serves: with `configured` names, those queues with
/// their partitions; else every queue and partition discovery finds (names that are neither
/// are left out).
pub async fn served(redis: &Redis, configured: &[String]) -> Result<Vec<QueueKeys>> {
    if configured.is_empty() {
        let names = crate::maintenance::discover_queues(redis).await?;
        return Ok(names
            .iter()
            .filter_map(|n| crate::keys::discovered(n).ok())
            .collect());
    }
    let mut out = Vec::new();
    for name in configured {
        let base = QueueKeys::new(name)?;
        out.extend(Partitions::load(redis, &base).await?.sources());
    }
    Ok(out)
}

/// The names of every queue found (a split queue once, by its own name), sorted.
pub async fn discover_queues(redis: &Redis) -> Result<Vec<String>> {
    let names = crate::maintenance::discover_queues(redis).await?;
    Ok(group(names).into_keys().collect())
}

/// Copies the config of every split queue among `served` (or whose partitions are among
/// them) to its partitions (see
/// [`sync_config`]); returns how many partitions changed.
pub async fn sync_all(redis: &Redis, served: &[QueueKeys]) -> Result<usize> {
    let bases: std::collections::BTreeMap<&str, QueueKeys> = served
        .iter()
        .map(|k| (crate::keys::base_of(k.name()), k.base()))
        .collect();
    let mut changed = 0;
    for base in bases.values() {
        let p = Partitions::load(redis, base).await?;
        changed += sync_config(redis, &p).await?;
    }
    Ok(changed)
}

/// Groups queue names as found by discovery (`q`, `q#0`, `q#1`…) under their base queue.
pub fn group<I: IntoIterator<Item = String>>(
    names: I,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for name in names {
        let base = crate::keys::base_of(&name).to_owned();
        out.entry(base).or_default().push(name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_partition_is_the_queue_itself() {
        let q = QueueKeys::new("img").unwrap();
        let p = Partitions::new(q.clone(), 1).unwrap();
        assert_eq!(p.targets(), std::slice::from_ref(&q));
        assert_eq!(p.sources(), vec![q.clone()]);
        assert_eq!(p.for_key("x"), &q);
    }

    #[test]
    fn partitions_have_their_own_slots_and_a_stable_choice() {
        let q = QueueKeys::new("img").unwrap();
        let p = Partitions::new(q.clone(), 3).unwrap();
        let names: Vec<&str> = p.targets().iter().map(|k| k.name()).collect();
        assert_eq!(names, ["img#0", "img#1", "img#2"]);
        assert_eq!(p.sources().len(), 4);
        assert_eq!(p.for_key("order-17"), p.for_key("order-17"));
        assert_eq!(p.round_robin(4).name(), "img#1");
        assert!(Partitions::new(q.clone(), MAX_PARTITIONS + 1).is_err());
        assert!(parse_count(&q, Some("1.5")).is_err());
        assert_eq!(parse_count(&q, Some("0")).unwrap(), 1);
        let grouped = group(["img#1".into(), "img".into(), "txt".into()]);
        assert_eq!(grouped["img"], ["img#1", "img"]);
    }
}
