//! Fenced completion: every end of an attempt is one `fleetq_complete` call that first checks
//! this worker still owns the entry (consumer and delivery count), then records the result
//! or error, acknowledges, deletes the entry and emits the event — all or nothing. A late
//! result from a host that lost its lease is refused ("fenced"), counted and logged.

use std::time::Duration;

use fleetq_broker::functions::{self, fcall};
use fleetq_broker::{QueueKeys, Redis};

/// How an attempt is recorded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Commit {
    Succeeded(String),
    Failed(String),
    Retry {
        error: String,
        delay: Duration,
    },
    Dead {
        reason: &'static str,
        error: String,
    },
    Cancelled,
    /// Give the job back at once without counting the attempt (shutdown).
    Release,
}

/// Whether the commit was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Committed {
    Ok,
    /// The worker no longer owns the entry; nothing was recorded.
    Fenced,
    /// A retry was turned into a dead letter: the job failed on too many distinct nodes.
    Poison,
}

/// How the attempt ended when a timeout stopped it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ending {
    pub(crate) timeout: Option<&'static str>,
    pub(crate) stage: Option<String>,
    pub(crate) elapsed_ms: u64,
    pub(crate) stages_json: String,
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn commit(
    redis: &Redis,
    keys: &QueueKeys,
    consumer: &str,
    entry_id: &str,
    deliveries: u64,
    job_id: &str,
    commit: &Commit,
    ending: &Ending,
) -> Result<Committed, fleetq_broker::Error> {
    let (outcome, data, delay, reason) = match commit {
        Commit::Succeeded(r) => ("succeeded", r.as_str(), 0, ""),
        Commit::Failed(e) => ("failed", e.as_str(), 0, ""),
        Commit::Retry { error, delay } => ("retry", error.as_str(), delay.as_millis() as u64, ""),
        Commit::Dead { reason, error } => ("dead", error.as_str(), 0, *reason),
        Commit::Cancelled => ("cancelled", "", 0, ""),
        Commit::Release => ("release", "", 0, ""),
    };
    let mut cmd = fcall("fleetq_complete", keys);
    cmd.arg(consumer)
        .arg(entry_id)
        .arg(deliveries)
        .arg(job_id)
        .arg(outcome)
        .arg(data)
        .arg(delay)
        .arg(reason)
        .arg(ending.timeout.unwrap_or(""))
        .arg(ending.stage.as_deref().unwrap_or(""))
        .arg(ending.elapsed_ms)
        .arg(&ending.stages_json);
    let reply: String = functions::call(&mut redis.conn(), &cmd, "complete").await?;
    Ok(match reply.as_str() {
        "fenced" => {
            tracing::warn!(job = %job_id, entry = %entry_id, outcome, "commit refused: this worker lost its lease on the job; another host owns it now");
            Committed::Fenced
        }
        "poison" => {
            tracing::warn!(job = %job_id, "job failed on too many distinct nodes: dead-lettered as poison");
            Committed::Poison
        }
        _ => Committed::Ok,
    })
}
