//! Reclaim: a worker with free slots takes over entries whose lease ran out (their host died,
//! froze or lost its network) with `XCLAIM`, inside `fleetq_reclaim`, which also promotes
//! due retries. The reply says when something may next fall due, so an idle worker sleeps
//! (blocked on its read) exactly until then instead of polling.

use std::time::Duration;

use fleetq_broker::calls::{self, Caller, ReclaimReply};
use fleetq_broker::functions;
use fleetq_broker::{QueueKeys, RawEntry, Redis};

use crate::take::raw_entry;

/// Added to every wake-up delay so the worker wakes just after a deadline, not before.
const WAKE_MARGIN_MS: u64 = 5;

/// What one reclaim call found.
#[derive(Debug)]
pub(crate) struct Reclaimed {
    pub(crate) entries: Vec<RawEntry>,
    /// Time until the next lease deadline or due retry; `None` when nothing is pending.
    pub(crate) next_wake: Option<Duration>,
}

pub(crate) async fn reclaim(
    redis: &Redis,
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    free: usize,
) -> Result<Reclaimed, fleetq_broker::Error> {
    let cmd = calls::reclaim(keys, caller, lease, free);
    let (entries, next_wake_ms, now_ms): ReclaimReply =
        functions::call(&mut redis.conn(), &cmd, "reclaim").await?;
    let entries = entries.into_iter().map(raw_entry).collect();
    // A few ms late rather than early: an entry is claimable once its idle time reaches the lease.
    let next_wake = (next_wake_ms > 0)
        .then(|| Duration::from_millis(next_wake_ms.saturating_sub(now_ms) + WAKE_MARGIN_MS));
    Ok(Reclaimed { entries, next_wake })
}
