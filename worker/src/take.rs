//! Taking work: read entries for the free slots only (`XREADGROUP … COUNT free`), then let
//! `fleetq_take` decide, in one call per batch, which of them run here.
//!
//! Entries that are not valid jobs are taken too, then dead-lettered with the reason by the
//! caller: a foreign producer's mistake never crashes a worker and is never lost.

use std::time::Duration;

use fleetq_broker::functions::{self, fcall};
use fleetq_broker::job::entry_ms;
use fleetq_broker::keys::GROUP;
use fleetq_broker::{JobEntry, Malformed, QueueConfig, QueueKeys, RawEntry, Redis};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use redis::Value;

/// An entry after `fleetq_take` (its parsed job travels beside it).
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) entry_id: String,
    pub(crate) job_id: String,
    pub(crate) decision: Decision,
    pub(crate) deliveries: u64,
    /// This attempt's number (prior attempts + deliveries).
    pub(crate) attempt: u32,
}

/// What `fleetq_take` decided for an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Run it here.
    Run,
    /// Settled without running here (`fleetq_take`'s word: lost, duplicate, cancelled,
    /// expired, dead).
    Skip(String),
    /// Handed on to another node; due again after this delay.
    Pass(std::time::Duration),
}

/// Reads up to `count` new entries, blocking up to `block`. `from_start` reads this
/// consumer's own pending entries instead (id `0`), as a worker does first on start.
pub(crate) async fn read(
    conn: &mut MultiplexedConnection,
    keys: &QueueKeys,
    consumer: &str,
    count: usize,
    block: Option<Duration>,
    from_start: bool,
) -> redis::RedisResult<Vec<RawEntry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    if let Some(block) = block {
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
    }
    cmd.arg("STREAMS")
        .arg(keys.stream())
        .arg(if from_start { "0" } else { ">" });
    let reply: Option<StreamReadReply> = cmd.query_async(conn).await?;
    let mut out = Vec::new();
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        for id in key.ids {
            out.push(RawEntry {
                fields: id
                    .map
                    .into_iter()
                    .map(|(f, v)| (f, value_bytes(v)))
                    .collect(),
                id: id.id,
            });
        }
    }
    Ok(out)
}

/// An entry as Lua and `XRANGE` return it: id and flat field/value pairs.
pub(crate) type EntryReply = (String, Vec<(String, Value)>);

/// Turns an [`EntryReply`] into a [`RawEntry`].
pub(crate) fn raw_entry((id, fields): EntryReply) -> RawEntry {
    RawEntry {
        id,
        fields: fields
            .into_iter()
            .map(|(f, v)| (f, value_bytes(v)))
            .collect(),
    }
}

/// Raw bytes of a field value.
pub(crate) fn value_bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}

/// Creates the consumer group (reading from the start of the stream) when missing.
pub(crate) async fn ensure_group(
    redis: &Redis,
    keys: &QueueKeys,
) -> Result<(), fleetq_broker::Error> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys.stream())
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis.conn())
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(fleetq_broker::Error::redis("create consumer group", e)),
    }
}

/// Runs `fleetq_take` for a batch of entries this worker read.
/// Who takes: the identity and settings `fleetq_take` needs.
#[derive(Debug, Clone)]
pub(crate) struct Taker {
    pub(crate) redis: Redis,
    pub(crate) keys: QueueKeys,
    pub(crate) consumer: String,
    pub(crate) node: String,
    pub(crate) lease: std::time::Duration,
    /// The handler does not report its start: the job counts as started when taken.
    pub(crate) starts_at_once: bool,
}

pub(crate) async fn take(
    taker: &Taker,
    queue: &QueueConfig,
    entries: Vec<RawEntry>,
) -> Result<Vec<(Taken, Result<JobEntry, Malformed>)>, fleetq_broker::Error> {
    let Taker {
        redis,
        keys,
        consumer,
        node,
        lease,
        starts_at_once,
    } = taker;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let parsed: Vec<(RawEntry, Result<JobEntry, Malformed>)> = entries
        .into_iter()
        .map(|raw| {
            let job = JobEntry::parse(&raw, queue.max_payload_bytes);
            (raw, job)
        })
        .collect();
    let mut cmd = fcall("fleetq_take", keys);
    cmd.arg(consumer)
        .arg(node)
        .arg(lease.as_millis() as u64)
        .arg(u8::from(*starts_at_once));
    for (raw, job) in &parsed {
        match job {
            Ok(j) => {
                let deadline = match j.queue_timeout(queue) {
                    Some(t) if j.prior_attempts == 0 => j.enqueued_ms + t.as_millis() as u64,
                    _ => 0,
                };
                cmd.arg(&raw.id)
                    .arg(&j.job_id)
                    .arg(j.prior_attempts)
                    .arg(j.max_attempts(queue))
                    .arg(deadline)
                    .arg(j.enqueued_ms)
                    .arg(j.avoid.join(","))
                    .arg(j.avoid_until)
                    .arg(j.workflow.as_deref().unwrap_or(""))
                    .arg(j.passes);
            }
            Err(_) => {
                // Taken so that it can be dead-lettered with its reason.
                cmd.arg(&raw.id)
                    .arg(raw.job_id())
                    .arg(0)
                    .arg(u32::MAX)
                    .arg(0)
                    .arg(entry_ms(&raw.id))
                    .arg("")
                    .arg(0)
                    .arg("")
                    .arg(0);
            }
        }
    }
    let replies: Vec<(String, String, u64, u32)> =
        functions::call(&mut redis.conn(), &cmd, "take").await?;
    Ok(parsed
        .into_iter()
        .zip(replies)
        .map(|((raw, job), (entry_id, decision, deliveries, attempt))| {
            let decision = if decision == "run" {
                Decision::Run
            } else if decision == "pass" {
                Decision::Pass(std::time::Duration::from_millis(u64::from(attempt)))
            } else {
                tracing::debug!(entry = %entry_id, %decision, "entry settled at take");
                Decision::Skip(decision)
            };
            let taken = Taken {
                job_id: match &job {
                    Ok(j) => j.job_id.clone(),
                    Err(_) => raw.job_id(),
                },
                entry_id,
                decision,
                deliveries,
                attempt,
            };
            (taken, job)
        })
        .collect())
}
