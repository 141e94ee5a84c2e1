//! Taking work: read entries for the free slots only (`XREADGROUP … COUNT free`), then let
//! `fleetq_take` decide, in one call per batch, which of them run here.
//!
//! Entries that are not valid jobs are taken too, then dead-lettered with the reason by the
//! caller: a foreign producer's mistake never crashes a worker and is never lost.

use std::time::Duration;

use fleetq_broker::calls::{
    self, Caller, Committed, Completion, Holding, TakeDecision, TakeEntry, TakeNextRows, Token,
};
use fleetq_broker::functions;
use fleetq_broker::job::entry_ms;
use fleetq_broker::keys::GROUP;
use fleetq_broker::{JobEntry, Malformed, QueueConfig, QueueKeys, RawEntry, Redis};
use redis::aio::MultiplexedConnection;
use redis::Value;

/// An entry after `fleetq_take` (its parsed job travels beside it).
#[derive(Debug)]
pub(crate) struct Taken {
    /// Entry, job and this take's token.
    pub(crate) holding: Holding,
    pub(crate) decision: TakeDecision,
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
    // Not `StreamReadReply`: its map of `String` names fails the whole batch on one name
    // that is not UTF-8, and keeps only the last of two equal names.
    let reply: Option<Vec<(String, Vec<EntryReply>)>> = cmd.query_async(conn).await?;
    Ok(reply
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(_, entries)| entries)
        .map(raw_entry)
        .collect())
}

pub(crate) use fleetq_broker::calls::EntryReply;

/// Turns an [`EntryReply`] into a [`RawEntry`].
pub(crate) fn raw_entry((id, fields): EntryReply) -> RawEntry {
    RawEntry::from_bytes(
        id,
        fields
            .into_iter()
            .map(|(f, v)| (f, value_bytes(v)))
            .collect(),
    )
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

/// Who takes: the identity and settings `fleetq_take` needs.
#[derive(Debug, Clone)]
pub(crate) struct Taker {
    pub(crate) redis: Redis,
    pub(crate) keys: QueueKeys,
    pub(crate) caller: Caller,
    pub(crate) lease: std::time::Duration,
    /// The handler does not report its start: the job counts as started when taken.
    pub(crate) starts_at_once: bool,
    /// When a take last noted this worker alive on the queue (see [`Taker::beat_due`]).
    pub(crate) last_beat: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl Taker {
    /// Whether this take should note the worker alive on the queue (the nodes zset and the
    /// queue's last worker call): at most every lease/4, so a busy queue pays it rarely.
    pub(crate) fn beat_due(&self) -> bool {
        let now = std::time::Instant::now();
        let mut last = self
            .last_beat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.is_none_or(|t| now.duration_since(t) >= self.lease / 4);
        if due {
            *last = Some(now);
        }
        due
    }
}

/// The values `fleetq_take` needs about one entry (a malformed one is taken too, so that it
/// can be dead-lettered with its reason, and so never runs out of attempts first).
fn take_entry(raw: &RawEntry, job: &Result<JobEntry, Malformed>, queue: &QueueConfig) -> TakeEntry {
    match job {
        Ok(j) => TakeEntry::for_job(&raw.id, j, queue),
        Err(_) => TakeEntry {
            entry_id: raw.id.clone(),
            job_id: raw.job_id(),
            token: Some(Token::new()),
            // As many as a job may have: attempts never end a malformed entry before its
            // dead letter does.
            max_attempts: fleetq_broker::limits::MAX_ATTEMPTS as u32,
            enqueued_ms: entry_ms(&raw.id),
            ..TakeEntry::default()
        },
    }
}

/// Runs `fleetq_take` for a batch of entries this worker read.
pub(crate) async fn take(
    taker: &Taker,
    queue: &QueueConfig,
    entries: Vec<RawEntry>,
) -> Result<Vec<(Taken, Result<JobEntry, Malformed>)>, fleetq_broker::Error> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let parsed: Vec<(TakeEntry, Result<JobEntry, Malformed>)> = entries
        .into_iter()
        .map(|raw| {
            let job = JobEntry::parse(&raw, queue.max_payload_bytes);
            (take_entry(&raw, &job, queue), job)
        })
        .collect();
    let args: Vec<TakeEntry> = parsed.iter().map(|(e, _)| e.clone()).collect();
    let cmd = calls::take_for(
        &taker.keys,
        &taker.caller,
        taker.lease,
        taker.starts_at_once,
        taker.beat_due(),
        queue,
        &args,
    );
    let rows = functions::call(&mut taker.redis.conn(), &cmd, "take").await?;
    let replies = calls::parse_take(rows)?;
    Ok(parsed
        .into_iter()
        .zip(replies)
        .map(|((e, job), reply)| {
            if !matches!(reply.decision, TakeDecision::Run { .. }) {
                tracing::debug!(entry = %e.entry_id, decision = ?reply.decision, "entry settled at take");
            }
            let holding = Holding {
                entry_id: e.entry_id,
                token: e.token.unwrap_or_else(Token::none),
                job_id: e.job_id,
            };
            (
                Taken {
                    holding,
                    decision: reply.decision,
                },
                job,
            )
        })
        .collect())
}

/// An entry this big (names and values) is read with `XREADGROUP` itself rather than through
/// `fleetq_take_next`, which would copy it into the function and out again.
const LARGE_ENTRY_BYTES: usize = 64 * 1024;

/// Whether `raw` is large (see [`LARGE_ENTRY_BYTES`]).
pub(crate) fn is_large(raw: &RawEntry) -> bool {
    raw.fields
        .iter()
        .map(|(n, v)| n.len() + v.len())
        .sum::<usize>()
        > LARGE_ENTRY_BYTES
}

/// What [`take_next`] did.
pub(crate) struct Next {
    /// The ends' words, in order.
    pub(crate) ends: Vec<Committed>,
    /// The entries read and taken, each with its parsed job.
    pub(crate) taken: Vec<(Taken, Result<JobEntry, Malformed>)>,
    /// The entries read but not taken: for [`take`].
    pub(crate) untaken: Vec<RawEntry>,
    /// Why the read failed, when it did.
    pub(crate) read_error: Option<String>,
    /// Whether an entry read was large ([`is_large`]).
    pub(crate) large: bool,
}

/// Runs `fleetq_take_next`: records `ends` and reads and takes up to `count` new entries, in
/// one call. `None`, with nothing sent, when an end is not a first attempt's plain success
/// (it goes through `fleetq_complete`).
pub(crate) async fn take_next(
    taker: &Taker,
    queue: &QueueConfig,
    ends: &[Completion<'_>],
    count: usize,
) -> Result<Option<Next>, fleetq_broker::Error> {
    let tokens: Vec<Token> = (0..count).map(|_| Token::new()).collect();
    let Some(cmd) = calls::take_next(
        &taker.keys,
        &taker.caller,
        taker.lease,
        taker.starts_at_once,
        count > 0 && taker.beat_due(),
        queue,
        ends,
        &tokens,
    ) else {
        return Ok(None);
    };
    let rows: TakeNextRows = functions::call(&mut taker.redis.conn(), &cmd, "take next").await?;
    let reply = calls::parse_take_next(rows, ends.len(), &tokens)?;
    let untaken: Vec<RawEntry> = reply.untaken.into_iter().map(raw_entry).collect();
    let mut large = untaken.iter().any(is_large);
    let taken = reply
        .taken
        .into_iter()
        .map(|(t, token, entry)| {
            let raw = raw_entry(entry);
            large |= is_large(&raw);
            let job = JobEntry::parse(&raw, queue.max_payload_bytes);
            let holding = Holding {
                job_id: raw.id,
                entry_id: t.entry_id,
                token,
            };
            let decision = t.decision;
            (Taken { holding, decision }, job)
        })
        .collect();
    Ok(Some(Next {
        ends: reply.ends,
        taken,
        untaken,
        read_error: reply.read_error,
        large,
    }))
}
