//! The fleet: worker hosts' records (`fleetq:node:<node>`), kept alive by each worker's
//! heartbeat and deleted by the broker's crash detection when the worker's process is gone,
//! and the operator's suspend and resume.
//!
//! A heartbeat with news (`fleetq_node_beat`: at start, when busy or the suspension changed)
//! writes the record; the beats in between only renew its time to live. So the time of the
//! last beat is read from the record's expiry: `PEXPIRETIME` minus the `ttl_ms` the worker
//! wrote, on the server clock like `last_seen_ms`.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::keys;
use crate::{Error, Redis, Result};

/// One worker host as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    /// The node name.
    pub node: String,
    /// Every field of the record (slots, busy, version, queues, consumer, pid, host,
    /// last_seen_ms, suspended_until, failure_streak, ttl_ms, …). `last_seen_ms` is the time of the last
    /// heartbeat, the renewals of its time to live included (see the module docs).
    pub fields: HashMap<String, String>,
}

impl NodeRecord {
    fn num(&self, name: &str) -> u64 {
        self.fields
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Job slots.
    pub fn slots(&self) -> u64 {
        self.num("slots")
    }

    /// Slots running a job.
    pub fn busy(&self) -> u64 {
        self.num("busy")
    }

    /// Suspended until this time (ms since the epoch), 0 when not suspended.
    pub fn suspended_until(&self) -> u64 {
        self.num("suspended_until")
    }

    /// Last heartbeat (ms since the epoch).
    pub fn last_seen_ms(&self) -> u64 {
        self.num("last_seen_ms")
    }

    /// The worker's process id: the record's `pid`, or for a record of a worker written
    /// before it had one, the pid part of its consumer name. `None` when neither says.
    pub fn pid(&self) -> Option<u32> {
        self.fields
            .get("pid")
            .and_then(|p| p.parse().ok())
            .or_else(|| {
                let consumer = self.consumer()?;
                node_of_consumer(consumer)?;
                consumer.rsplit(':').nth(1)?.parse().ok()
            })
    }

    /// The host name of the worker's machine (`host`), when the record has it.
    pub fn host(&self) -> Option<&str> {
        self.fields
            .get("host")
            .map(String::as_str)
            .filter(|h| !h.is_empty())
    }

    /// The worker's consumer name (`<node>:<pid>:<start ms>`), when the record has it.
    pub fn consumer(&self) -> Option<&str> {
        self.fields
            .get("consumer")
            .map(String::as_str)
            .filter(|c| !c.is_empty())
    }
}

/// Every live node (records expire when their worker stops renewing them).
pub async fn list(redis: &Redis) -> Result<Vec<NodeRecord>> {
    let mut names = Vec::new();
    for primary in redis.primaries().await? {
        names.extend(
            crate::maintenance::scan(primary, keys::NODE_PATTERN, None, "list nodes").await?,
        );
    }
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for key in names {
        if let Some(record) = read(redis, &key).await? {
            out.push(record);
        }
    }
    Ok(out)
}

/// The record of node `node`, `None` when no live worker has that name.
pub async fn get(redis: &Redis, node: &str) -> Result<Option<NodeRecord>> {
    read(redis, &keys::node(node)).await
}

/// Reads the record at `key`, with `last_seen_ms` as the later of the last write and the
/// last renewal (see the module docs).
async fn read(redis: &Redis, key: &str) -> Result<Option<NodeRecord>> {
    let (mut fields, expires_ms): (HashMap<String, String>, i64) = redis::pipe()
        .cmd("HGETALL")
        .arg(key)
        .cmd("PEXPIRETIME")
        .arg(key)
        .query_async(&mut redis.conn())
        .await
        .map_err(|e| Error::redis("read node", e))?;
    if fields.is_empty() {
        return Ok(None);
    }
    let Some(node) = keys::node_of(key).map(str::to_owned) else {
        return Ok(None);
    };
    if let Some(renewed) = renewed_ms(&fields, expires_ms) {
        let written = fields
            .get("last_seen_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        fields.insert("last_seen_ms".into(), renewed.max(written).to_string());
    }
    Ok(Some(NodeRecord { node, fields }))
}

/// When the record's time to live was last renewed: its expiry (`PEXPIRETIME`, ms since the
/// epoch; negative for none) minus the `ttl_ms` its worker wrote.
fn renewed_ms(fields: &HashMap<String, String>, expires_ms: i64) -> Option<u64> {
    let ttl: u64 = fields.get("ttl_ms")?.parse().ok()?;
    u64::try_from(expires_ms).ok()?.checked_sub(ttl)
}

/// The node of a worker's consumer name, `<node>:<pid>:<start ms>` (what a worker names its
/// connections); `None` for a name of another form.
pub fn node_of_consumer(consumer: &str) -> Option<&str> {
    let mut parts = consumer.rsplitn(3, ':');
    let (start, pid, node) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let valid_node = !node.is_empty()
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    (digits(start) && digits(pid) && valid_node).then_some(node)
}

/// Deletes the record of the node whose consumer `consumer`'s process is gone (the broker's
/// crash detection saw its connections close), unless a newer process of that node wrote it
/// since. True when it was deleted.
pub async fn gone(redis: &Redis, consumer: &str) -> Result<bool> {
    let Some(node) = node_of_consumer(consumer) else {
        return Ok(false);
    };
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("fleetq_node_gone")
        .arg(1)
        .arg(keys::node(node))
        .arg(consumer);
    let deleted: i64 =
        crate::functions::call(&mut redis.conn(), &cmd, "remove a gone node's record").await?;
    Ok(deleted == 1)
}

/// Asks node `node` to stop taking jobs for `duration` (it finishes what it runs). The worker
/// applies it at its next heartbeat. False when no live node has that name.
pub async fn suspend(redis: &Redis, node: &str, duration: Duration) -> Result<bool> {
    let now = server_ms(redis).await?;
    command(
        redis,
        node,
        &format!("suspend:{}", now + duration.as_millis() as u64),
    )
    .await
}

/// Lifts a suspension of node `node` (its own or an operator's) at its next heartbeat.
pub async fn resume(redis: &Redis, node: &str) -> Result<bool> {
    command(redis, node, "resume").await
}

async fn command(redis: &Redis, node: &str, command: &str) -> Result<bool> {
    let key = keys::node(node);
    let mut conn = redis.conn();
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::redis("find node", e))?;
    if !exists {
        return Ok(false);
    }
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("command")
        .arg(command)
        .query_async(&mut conn)
        .await
        .map_err(|e| Error::redis("command node", e))?;
    Ok(true)
}

/// The server's clock, ms since the epoch (every deadline in fleetq is on this clock).
pub async fn server_ms(redis: &Redis) -> Result<u64> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis.conn())
        .await
        .map_err(|e| Error::redis("read server time", e))?;
    Ok(secs * 1000 + micros / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_give_their_node() {
        assert_eq!(
            node_of_consumer("gpu-07:4242:1700000000000"),
            Some("gpu-07")
        );
        assert_eq!(node_of_consumer("a.b_c:1:2"), Some("a.b_c"));
        assert_eq!(node_of_consumer("gpu-07"), None);
        assert_eq!(node_of_consumer("gpu-07:x:1"), None);
        assert_eq!(node_of_consumer(":1:2"), None);
        assert_eq!(
            node_of_consumer("a:b:1:2"),
            None,
            "':' is not in a node name"
        );
    }

    #[test]
    fn pid_host_and_consumer_come_from_the_record() {
        let record = |pairs: &[(&str, &str)]| NodeRecord {
            node: "gpu-07".into(),
            fields: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let r = record(&[
            ("pid", "4242"),
            ("host", "rack3-a"),
            ("consumer", "gpu-07:4242:1700000000000"),
        ]);
        assert_eq!(
            (r.pid(), r.host(), r.consumer()),
            (
                Some(4242),
                Some("rack3-a"),
                Some("gpu-07:4242:1700000000000")
            )
        );
        let older = record(&[("consumer", "gpu-07:99:1700000000000")]);
        assert_eq!(older.pid(), Some(99), "from the consumer name");
        assert_eq!((older.host(), record(&[]).pid()), (None, None));
    }

    #[test]
    fn the_last_renewal_is_the_expiry_minus_the_time_to_live() {
        let f = HashMap::from([("ttl_ms".to_owned(), "90000".to_owned())]);
        assert_eq!(renewed_ms(&f, 1_000_090_000), Some(1_000_000_000));
        assert_eq!(renewed_ms(&f, -1), None, "no expiry");
        assert_eq!(
            renewed_ms(&HashMap::new(), 1_000_090_000),
            None,
            "no ttl_ms"
        );
    }
}
