//! Maintenance: the idempotent server-side steps that keep queues moving no matter which
//! processes are alive — promote due retries and scheduled jobs (`fleetq_promote`), expire
//! waiting jobs past their queue timeout, dead-letter in-flight jobs whose last lease ran out,
//! and remove consumers of hosts gone for good (`fleetq_expire`), on every queue and
//! partition, and copy each split queue's config to its partitions. Any number of brokers may run them
//! at once with the same result as one; workers promote too (inside `fleetq_reclaim`).

use std::future::Future;
use std::time::Duration;

use crate::functions::{self, fcall};
use crate::keys::{self, QueueKeys};
use crate::{Redis, Result};

/// How often a broker runs the steps. Default 1 s.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Most jobs promoted per queue per tick.
pub const PROMOTE_BATCH: u64 = 1000;
/// Most waiting entries examined for expiry per queue per tick.
pub const EXPIRE_BATCH: u64 = 1000;

/// What one tick did on one queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// Delayed jobs moved to the stream.
    pub promoted: u64,
    /// Jobs ended here: waiting jobs past their queue timeout (`expired`), and in-flight jobs
    /// whose holder's lease ran out on their last attempt (`dead`).
    pub expired: u64,
}

/// Runs the maintenance steps once on queue `keys`.
pub async fn tick(redis: &Redis, keys: &QueueKeys) -> Result<Tick> {
    let mut conn = redis.conn();
    let mut promote = fcall("fleetq_promote", keys);
    promote.arg(PROMOTE_BATCH);
    let (promoted, _next): (u64, u64) = functions::call(&mut conn, &promote, "promote").await?;
    let mut expire = fcall("fleetq_expire", keys);
    expire.arg(EXPIRE_BATCH);
    let (expired, _scanned): (u64, u64) = functions::call(&mut conn, &expire, "expire").await?;
    Ok(Tick { promoted, expired })
}

/// The names of every queue that has a stream (SCAN, so it never blocks the server).
pub async fn discover_queues(redis: &Redis) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for conn in redis.primaries().await? {
        let found = scan(
            conn,
            keys::STREAM_PATTERN,
            Some("stream"),
            "discover queues",
        )
        .await?;
        out.extend(
            found
                .iter()
                .filter_map(|k| keys::queue_of_stream(k))
                .map(str::to_owned),
        );
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Runs [`tick`] on `queues` (every queue found, when empty) every `interval` until
/// `shutdown` resolves. Errors are retried on the next tick and logged once per outage (and
/// again when the reason changes), not once per tick.
pub async fn run<S>(redis: Redis, queues: Vec<String>, interval: Duration, shutdown: S)
where
    S: Future<Output = ()> + Send,
{
    let mut outage = crate::retry::OutageLog::new();
    let mut timer = tokio::time::interval(interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = timer.tick() => {}
        }
        let served = match crate::partitions::served(&redis, &queues).await {
            Ok(q) => q,
            Err(e) => {
                let _ = outage.failed("maintenance: list queues", &e);
                continue;
            }
        };
        let mut failed = false;
        if let Err(e) = crate::partitions::sync_all(&redis, &served).await {
            failed = true;
            let _ = outage.failed("maintenance: copy the config to partitions", &e);
        }
        for keys in served {
            let name = keys.name();
            match tick(&redis, &keys).await {
                Ok(t) if t.promoted + t.expired > 0 => {
                    tracing::debug!(queue = %name, promoted = t.promoted, expired = t.expired, "maintenance tick");
                }
                Ok(_) => {}
                Err(e) if e.is_transient() => {
                    failed = true;
                    let _ = outage.failed("maintenance tick", &e);
                }
                Err(e) => {
                    tracing::warn!(queue = %name, error = %e, "maintenance tick failed; trying again next tick")
                }
            }
        }
        if !failed {
            let _ = outage.recovered();
        }
    }
}

/// Every key of the node behind `conn` matching `pattern` (of `kind`, when given), by SCAN
/// (so it never blocks the server); may repeat a key.
pub async fn scan(
    mut conn: crate::connection::SharedConn,
    pattern: &str,
    kind: Option<&str>,
    step: &'static str,
) -> Result<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(500);
        if let Some(kind) = kind {
            cmd.arg("TYPE").arg(kind);
        }
        let (next, batch): (u64, Vec<String>) = cmd
            .query_async(&mut conn)
            .await
            .map_err(|e| crate::Error::redis(step, e))?;
        out.extend(batch);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}
