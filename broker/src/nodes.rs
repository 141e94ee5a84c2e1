//! The fleet: worker hosts' records (`fleetq:node:<node>`), kept alive by each worker's
//! heartbeat, and the operator's suspend and resume.

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
    /// Every field of the record (slots, busy, version, queues, last_seen_ms,
    /// suspended_until, failure_streak, …).
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
}

/// Every live node (records expire when their worker stops renewing them).
pub async fn list(redis: &Redis) -> Result<Vec<NodeRecord>> {
    let mut conn = redis.conn();
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
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|e| Error::redis("read node", e))?;
        if fields.is_empty() {
            continue;
        }
        let Some(node) = keys::node_of(&key).map(str::to_owned) else {
            continue;
        };
        out.push(NodeRecord { node, fields });
    }
    Ok(out)
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
