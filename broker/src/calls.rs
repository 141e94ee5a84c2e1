//! Typed calls of the server-side functions a worker uses: their arguments (one builder for
//! each, shared by the worker and the tests) and their replies as enums, parsed so that an
//! unknown reply is an error rather than a silent fall-through.
//!
//! Each function's KEYS, ARGV and reply are documented in the header of its Lua file
//! (`broker/src/lua/`); the types here follow those headers one to one.

use std::time::Duration;

use redis::Value;

use crate::functions::fcall;
use crate::keys::QueueKeys;
use crate::{Error, Result};

/// A fencing token: chosen by a worker for every take, stored with the job, presented by every
/// renewal, progress report and commit of that take. Random, so no rollback of Redis can make
/// two runs share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// A new random token (64 bits, hex).
    pub fn new() -> Self {
        Self(format!("{:016x}", rand::random::<u64>()))
    }

    /// No token: only to release an entry read but never taken.
    pub fn none() -> Self {
        Self(String::new())
    }

    /// The token as sent to Redis.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

/// Who calls: the consumer (unique per process start) and its node.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Consumer name in the group.
    pub consumer: String,
    /// Node (host) name.
    pub node: String,
}

/// One entry passed to `fleetq_take` (11 values).
#[derive(Debug, Clone, Default)]
pub struct TakeEntry {
    /// Stream entry id.
    pub entry_id: String,
    /// Job id.
    pub job_id: String,
    /// This take's fencing token.
    pub token: Option<Token>,
    /// Attempts used by earlier entries of the job (the entry's `attempts` field).
    pub prior_attempts: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// When the queue timeout ends (ms since the epoch); 0: none.
    pub queue_deadline_ms: u64,
    /// When the job was first enqueued (ms).
    pub enqueued_ms: u64,
    /// Nodes this job avoids.
    pub avoid: Vec<String>,
    /// Until when `avoid` holds (ms); 0: not at all.
    pub avoid_until_ms: u64,
    /// The job's workflow, if any.
    pub workflow: Option<String>,
    /// Times the job was handed on so far.
    pub passes: u32,
}

impl TakeEntry {
    /// The values for entry `entry_id` of a valid job `job` of a queue with `queue`'s config,
    /// with a fresh token: the job's attempts and avoid list, and its queue deadline on a first
    /// attempt.
    pub fn for_job(entry_id: &str, job: &crate::JobEntry, queue: &crate::QueueConfig) -> Self {
        TakeEntry {
            entry_id: entry_id.to_owned(),
            job_id: job.job_id.clone(),
            token: Some(Token::new()),
            prior_attempts: job.prior_attempts,
            max_attempts: job.max_attempts(queue),
            queue_deadline_ms: match job.queue_timeout(queue) {
                Some(t) if job.prior_attempts == 0 => job
                    .enqueued_ms
                    .saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                _ => 0,
            },
            enqueued_ms: job.enqueued_ms,
            avoid: job.avoid.clone(),
            avoid_until_ms: job.avoid_until,
            workflow: job.workflow.clone(),
            passes: job.passes,
        }
    }
}

/// `fleetq_take` for a batch of entries. `beat`: note the caller alive on the queue (a worker
/// sends it at most every lease/4; see take.lua).
pub fn take(
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    started_now: bool,
    beat: bool,
    entries: &[TakeEntry],
) -> redis::Cmd {
    let mut cmd = fcall("fleetq_take", keys);
    cmd.arg(&caller.consumer)
        .arg(&caller.node)
        .arg(lease.as_millis() as u64)
        .arg(u8::from(started_now))
        .arg(u8::from(beat));
    for e in entries {
        cmd.arg(&e.entry_id)
            .arg(&e.job_id)
            .arg(e.token.as_ref().map_or("", Token::as_str))
            .arg(e.prior_attempts)
            .arg(e.max_attempts)
            .arg(e.queue_deadline_ms)
            .arg(e.enqueued_ms)
            .arg(e.avoid.join(","))
            .arg(e.avoid_until_ms)
            .arg(e.workflow.as_deref().unwrap_or(""))
            .arg(e.passes);
    }
    cmd
}

/// A take of `entries` in the shortest form that says it: `fleetq_take_fresh` when every
/// entry's values are those it derives from the entry id and `queue`'s config (a plain job's
/// first attempt: the common case of a busy queue), else `fleetq_take`. Both decide the same.
pub fn take_for(
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    started_now: bool,
    beat: bool,
    queue: &crate::QueueConfig,
    entries: &[TakeEntry],
) -> redis::Cmd {
    if entries.is_empty() || !entries.iter().all(|e| e.is_fresh(queue)) {
        return take(keys, caller, lease, started_now, beat, entries);
    }
    let mut cmd = fresh_header(
        "fleetq_take_fresh",
        keys,
        caller,
        lease,
        started_now,
        beat,
        queue,
    );
    for e in entries {
        cmd.arg(&e.entry_id)
            .arg(e.token.as_ref().map_or("", Token::as_str));
    }
    cmd
}

/// An `FCALL` of `function` with the 7 header values `fleetq_take_fresh` and
/// `fleetq_take_next` share.
fn fresh_header(
    function: &str,
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    started_now: bool,
    beat: bool,
    queue: &crate::QueueConfig,
) -> redis::Cmd {
    let mut cmd = fcall(function, keys);
    cmd.arg(&caller.consumer)
        .arg(&caller.node)
        .arg(lease.as_millis() as u64)
        .arg(u8::from(started_now))
        .arg(u8::from(beat))
        .arg(queue.max_attempts)
        .arg(queue_timeout_ms(queue));
    cmd
}

/// The 4 values per end of `fleetq_complete_first` (and `fleetq_take_next`): entry id, token,
/// job id and the result of each first-attempt success of `batch`.
fn first_ends(cmd: &mut redis::Cmd, batch: &[Completion<'_>], results: &[&str]) {
    for (c, result) in batch.iter().zip(results) {
        cmd.arg(&c.held.entry_id)
            .arg(c.held.token.as_str())
            .arg(&c.held.job_id)
            .arg(*result);
    }
}

fn queue_timeout_ms(queue: &crate::QueueConfig) -> u64 {
    queue
        .queue_timeout
        .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}

impl TakeEntry {
    /// Whether `fleetq_take_fresh` derives exactly these values from the entry id and
    /// `queue`'s config (see take.lua).
    pub fn is_fresh(&self, queue: &crate::QueueConfig) -> bool {
        let deadline = match queue_timeout_ms(queue) {
            0 => 0,
            t => crate::job::entry_ms(&self.entry_id).saturating_add(t),
        };
        self.job_id == self.entry_id
            && self.prior_attempts == 0
            && self.max_attempts == queue.max_attempts
            && self.queue_deadline_ms == deadline
            && self.enqueued_ms == crate::job::entry_ms(&self.entry_id)
            && self.avoid.is_empty()
            && self.avoid_until_ms == 0
            && self.workflow.is_none()
            && self.passes == 0
    }
}

/// What `fleetq_take` decided for an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeDecision {
    /// Run it here; this is attempt number `attempt`.
    Run {
        /// 1-based attempt number.
        attempt: u32,
    },
    /// Not owned by the caller (any more).
    Lost,
    /// Another entry carries this job, or the job has ended.
    Duplicate,
    /// A producer cancelled it.
    Cancelled,
    /// Its queue timeout passed before it started.
    Expired,
    /// No attempt left, or delivered too often without a start: dead-lettered.
    Dead,
    /// Handed on to another node; due again after `delay`.
    Pass {
        /// Until it is due again.
        delay: Duration,
    },
}

/// One entry's reply from `fleetq_take`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeReply {
    /// Stream entry id.
    pub entry_id: String,
    /// The decision.
    pub decision: TakeDecision,
    /// The entry's delivery count.
    pub deliveries: u64,
}

/// Parses the reply of [`take`].
pub fn parse_take(rows: Vec<(String, String, u64, u64)>) -> Result<Vec<TakeReply>> {
    rows.into_iter()
        .map(|(entry_id, word, deliveries, n)| {
            Ok(TakeReply {
                entry_id,
                decision: TakeDecision::parse(&word, n)?,
                deliveries,
            })
        })
        .collect()
}

impl TakeDecision {
    /// A take's word on one entry, with its number `n` (the attempt, or the delay of a pass).
    fn parse(word: &str, n: u64) -> Result<Self> {
        Ok(match word {
            "run" => Self::Run {
                attempt: u32::try_from(n).unwrap_or(u32::MAX),
            },
            "lost" => Self::Lost,
            "duplicate" => Self::Duplicate,
            "cancelled" => Self::Cancelled,
            "expired" => Self::Expired,
            "dead" => Self::Dead,
            "pass" => Self::Pass {
                delay: Duration::from_millis(n),
            },
            other => return Err(unknown("take", other)),
        })
    }
}

/// One held entry as `fleetq_renew` and `fleetq_progress` name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// Stream entry id.
    pub entry_id: String,
    /// The token of the take.
    pub token: Token,
    /// Job id.
    pub job_id: String,
}

/// `fleetq_renew` of every entry in `held`.
pub fn renew(keys: &QueueKeys, caller: &Caller, lease: Duration, held: &[&Holding]) -> redis::Cmd {
    let mut cmd = fcall("fleetq_renew", keys);
    cmd.arg(&caller.consumer)
        .arg(lease.as_millis() as u64)
        .arg(&caller.node);
    for h in held {
        cmd.arg(&h.entry_id).arg(h.token.as_str()).arg(&h.job_id);
    }
    cmd
}

/// A renewal's or progress report's word on one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReply {
    /// Still held.
    Ok,
    /// Another consumer or take holds it: stop, the commit would be refused.
    Lost,
    /// Still held, but a producer asked to cancel the job.
    Cancel,
}

impl HoldReply {
    /// Parses one word of a `fleetq_renew` or `fleetq_progress` reply.
    pub fn parse(step: &'static str, word: &str) -> Result<Self> {
        match word {
            "ok" => Ok(Self::Ok),
            "lost" => Ok(Self::Lost),
            "cancel" => Ok(Self::Cancel),
            other => Err(unknown(step, other)),
        }
    }
}

/// Whether a progress call says the work started or how far it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressKind {
    /// The executor began the work (counts the attempt).
    Started,
    /// A progress report.
    Progress,
}

/// `fleetq_progress` for one held entry.
pub fn progress(
    keys: &QueueKeys,
    consumer: &str,
    held: &Holding,
    kind: ProgressKind,
    progress_json: &str,
    stages_json: &str,
) -> redis::Cmd {
    let mut cmd = fcall("fleetq_progress", keys);
    cmd.arg(consumer)
        .arg(&held.entry_id)
        .arg(held.token.as_str())
        .arg(&held.job_id)
        .arg(match kind {
            ProgressKind::Started => "started",
            ProgressKind::Progress => "progress",
        })
        .arg(progress_json)
        .arg(stages_json);
    cmd
}

/// Why a job went to the dead letters (the `reason` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadReason {
    /// Every attempt was used.
    AttemptsExhausted,
    /// The entry is not a valid job.
    Malformed,
    /// It failed on too many distinct nodes.
    Poison,
    /// Delivered too often without ever starting.
    DeliveriesExhausted,
}

impl DeadReason {
    /// The name in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::Malformed => "malformed",
            Self::Poison => "poison",
            Self::DeliveriesExhausted => "deliveries_exhausted",
        }
    }
}

/// How an attempt is recorded by `fleetq_complete`.
#[derive(Debug, Clone, PartialEq)]
pub enum Commit {
    /// Done, with this result JSON.
    Succeeded(String),
    /// Failed for good.
    Failed(String),
    /// Failed; retry after `delay` on another node.
    Retry {
        /// The error.
        error: String,
        /// Backoff before the retry.
        delay: Duration,
    },
    /// To the dead letters.
    Dead {
        /// Why.
        reason: DeadReason,
        /// The error.
        error: String,
    },
    /// Cancelled by a producer.
    Cancelled,
    /// Give the job back at once without counting the attempt (shutdown, self-fencing).
    Release,
}

/// How the attempt ended, for the record (timeout kind, stage, duration, stage profile).
#[derive(Debug, Clone, Default)]
pub struct Ending {
    /// The timeout that ended it, if one did (`start`, `progress`, `run`).
    pub timeout: Option<&'static str>,
    /// The stage it was in.
    pub stage: Option<String>,
    /// How long the attempt ran, ms.
    pub elapsed_ms: u64,
    /// The stage profile JSON, or empty.
    pub stages_json: String,
}

/// The end of one attempt, as `fleetq_complete` records it.
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    /// The entry and the take it ends.
    pub held: &'a Holding,
    /// The attempt's number (`fleetq_take`'s reply); 0 for a release of an entry never taken.
    pub attempt: u32,
    /// What to record.
    pub commit: &'a Commit,
    /// How the attempt ended.
    pub ending: &'a Ending,
}

impl Completion<'_> {
    /// The result of a first attempt's success that no timeout ended and that has no stage
    /// profile: what `fleetq_complete_first` records; `None` for any other end.
    pub fn first_success(&self) -> Option<&str> {
        match self.commit {
            Commit::Succeeded(result)
                if self.attempt == 1
                    && self.ending.timeout.is_none()
                    && self.ending.stages_json.is_empty()
                    && !self.held.token.as_str().is_empty() =>
            {
                Some(result)
            }
            _ => None,
        }
    }
}

/// `fleetq_complete` of a batch of held entries (each one fenced on its own), in its short
/// form `fleetq_complete_first` when every end is a first attempt's plain success (the
/// common case of a busy queue). Both record the same.
pub fn complete(keys: &QueueKeys, caller: &Caller, batch: &[Completion<'_>]) -> redis::Cmd {
    let firsts: Option<Vec<&str>> = batch.iter().map(Completion::first_success).collect();
    if let Some(results) = firsts.filter(|r| !r.is_empty()) {
        let mut cmd = fcall("fleetq_complete_first", keys);
        cmd.arg(&caller.consumer).arg(&caller.node);
        first_ends(&mut cmd, batch, &results);
        return cmd;
    }
    let mut cmd = fcall("fleetq_complete", keys);
    cmd.arg(&caller.consumer).arg(&caller.node);
    for c in batch {
        let (outcome, data, delay, reason) = match c.commit {
            Commit::Succeeded(r) => ("succeeded", r.as_str(), 0, ""),
            Commit::Failed(e) => ("failed", e.as_str(), 0, ""),
            Commit::Retry { error, delay } => {
                ("retry", error.as_str(), delay.as_millis() as u64, "")
            }
            Commit::Dead { reason, error } => ("dead", error.as_str(), 0, reason.as_str()),
            Commit::Cancelled => ("cancelled", "", 0, ""),
            Commit::Release => ("release", "", 0, ""),
        };
        cmd.arg(&c.held.entry_id)
            .arg(c.held.token.as_str())
            .arg(&c.held.job_id)
            .arg(outcome)
            .arg(data)
            .arg(delay)
            .arg(reason)
            .arg(c.ending.timeout.unwrap_or(""))
            .arg(c.ending.stage.as_deref().unwrap_or(""))
            .arg(c.ending.elapsed_ms)
            .arg(&c.ending.stages_json)
            .arg(c.attempt);
    }
    cmd
}

/// Parses the reply of [`complete`] for a batch of `n` entries.
pub fn parse_complete(words: Vec<String>, n: usize) -> Result<Vec<Committed>> {
    if words.len() != n {
        return Err(Error::Protocol {
            step: "complete",
            detail: format!(
                "{} replies for {n} entries: the server's fleetq library is of another version; \
                 load this one with `fleetq functions load` or restart the broker",
                words.len()
            ),
        });
    }
    words.iter().map(|w| Committed::parse(w)).collect()
}

/// `fleetq_take_next`, a busy worker's turn in one call: record `ends` and read and take up to
/// `tokens.len()` new entries (`tokens[i]` for the i-th read). `None` when an end is not a
/// first attempt's plain success (those go through [`complete`]).
#[allow(clippy::too_many_arguments)]
pub fn take_next(
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    started_now: bool,
    beat: bool,
    queue: &crate::QueueConfig,
    ends: &[Completion<'_>],
    tokens: &[Token],
) -> Option<redis::Cmd> {
    let results: Vec<&str> = ends
        .iter()
        .map(Completion::first_success)
        .collect::<Option<_>>()?;
    let mut cmd = fresh_header(
        "fleetq_take_next",
        keys,
        caller,
        lease,
        started_now,
        beat,
        queue,
    );
    cmd.arg(ends.len());
    first_ends(&mut cmd, ends, &results);
    for t in tokens {
        cmd.arg(t.as_str());
    }
    Some(cmd)
}

/// The reply of [`take_next`] as it comes.
pub type TakeNextRows = (
    Vec<String>,
    Vec<(String, String, u64, u64, Vec<(Vec<u8>, Value)>)>,
    String,
);

/// What [`take_next`] did.
#[derive(Debug)]
pub struct TakeNextReply {
    /// One word per end, in order.
    pub ends: Vec<Committed>,
    /// The entries read and taken (any decision but `read`), with the token each was given.
    pub taken: Vec<(TakeReply, Token, EntryReply)>,
    /// The entries read but not taken: the caller passes them to [`take`].
    pub untaken: Vec<EntryReply>,
    /// Why the read failed, when it did (the ends are recorded either way).
    pub read_error: Option<String>,
}

/// Parses the reply of [`take_next`] for `ends` ends and the `tokens` it was given.
pub fn parse_take_next(rows: TakeNextRows, ends: usize, tokens: &[Token]) -> Result<TakeNextReply> {
    let (words, read, error) = rows;
    let ends = parse_complete(words, ends)?;
    if read.len() > tokens.len() {
        return Err(Error::Protocol {
            step: "take next",
            detail: format!(
                "{} entries read for {} tokens: the server's fleetq library is of another version; \
                 load this one with `fleetq functions load` or restart the broker",
                read.len(),
                tokens.len()
            ),
        });
    }
    let mut taken = Vec::with_capacity(read.len());
    let mut untaken = Vec::new();
    for ((entry_id, word, deliveries, n, fields), token) in read.into_iter().zip(tokens) {
        if word == "read" {
            untaken.push((entry_id, fields));
            continue;
        }
        let reply = TakeReply {
            entry_id: entry_id.clone(),
            decision: TakeDecision::parse(&word, n)?,
            deliveries,
        };
        taken.push((reply, token.clone(), (entry_id, fields)));
    }
    Ok(TakeNextReply {
        ends,
        taken,
        untaken,
        read_error: Some(error).filter(|e| !e.is_empty()),
    })
}

/// What `fleetq_complete` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Recorded.
    Ok,
    /// The caller no longer holds the entry; nothing was recorded.
    Fenced,
    /// A retry became a dead letter: the job failed on too many distinct nodes.
    Poison,
}

impl Committed {
    /// Parses a `fleetq_complete` reply.
    pub fn parse(word: &str) -> Result<Self> {
        match word {
            "ok" => Ok(Self::Ok),
            "fenced" => Ok(Self::Fenced),
            "poison" => Ok(Self::Poison),
            other => Err(unknown("complete", other)),
        }
    }
}

/// `fleetq_reclaim` for up to `free` entries.
pub fn reclaim(keys: &QueueKeys, caller: &Caller, lease: Duration, free: usize) -> redis::Cmd {
    let mut cmd = fcall("fleetq_reclaim", keys);
    cmd.arg(&caller.consumer)
        .arg(lease.as_millis() as u64)
        .arg(free)
        .arg(&caller.node);
    cmd
}

/// An entry as Lua, `XRANGE` and `XREADGROUP` return it: id and flat field/value pairs, in
/// order, duplicates kept, names as bytes (a foreign producer may write any).
pub type EntryReply = (String, Vec<(Vec<u8>, Value)>);

/// The reply of [`reclaim`]: claimed entries, next wake (server ms, 0 none), server now (ms).
pub type ReclaimReply = (Vec<EntryReply>, u64, u64);

/// `fleetq_abandon` of a consumer whose process is gone.
pub fn abandon(keys: &QueueKeys, consumer: &str) -> redis::Cmd {
    let mut cmd = fcall("fleetq_abandon", keys);
    cmd.arg(consumer);
    cmd
}

fn unknown(step: &'static str, word: &str) -> Error {
    Error::Protocol {
        step,
        detail: format!(
            "unknown reply {word:?}: the server's fleetq library is of another version; \
             load this one with `fleetq` or restart the broker"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_replies_fail_loudly() {
        assert!(HoldReply::parse("renew", "maybe").is_err());
        assert!(Committed::parse("done").is_err());
        let rows = vec![("1-0".to_owned(), "later".to_owned(), 1, 0)];
        assert!(parse_take(rows).is_err());
    }

    #[test]
    fn take_replies_are_typed() {
        let rows = vec![
            ("1-0".to_owned(), "run".to_owned(), 1, 2),
            ("2-0".to_owned(), "pass".to_owned(), 1, 250),
        ];
        let r = parse_take(rows).unwrap_or_default();
        assert_eq!(r[0].decision, TakeDecision::Run { attempt: 2 });
        assert_eq!(
            r[1].decision,
            TakeDecision::Pass {
                delay: Duration::from_millis(250)
            }
        );
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(Token::new(), Token::new());
        assert_eq!(Token::new().as_str().len(), 16);
    }
}
