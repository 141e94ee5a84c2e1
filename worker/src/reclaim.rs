//! Reclaim: a worker with free slots takes over entries whose lease ran out (their host died,
//! froze or lost its network) with `XCLAIM`, inside `fleetq_reclaim`, which also promotes
//! due retries.
//!
//! The idle workers of a stream share that work (the watch, see `broker/src/lua/reclaim.lua`):
//! two of them, the watchers, are told when the next lease deadline or retry falls due and
//! block on their read exactly until then, at most a lease; every other idle worker is told
//! nothing and blocks for its whole `max_block`. So a watcher claims up to [`HAND_ON`] more
//! entries than it has free slots, and puts those back in line at once (a release), where a
//! blocked idle worker gets them within a millisecond: a frozen host with many jobs is
//! relieved of all of them at its lease, not one watcher's slots at a time. A worker with no
//! free slot gives its seat up, so that the next idle one to call takes it.

use std::time::Duration;

use fleetq_broker::calls::{self, Caller, ReclaimReply};
use fleetq_broker::functions;
use fleetq_broker::{QueueKeys, RawEntry, Redis};

use crate::take::raw_entry;

/// Added to every wake-up delay so the worker wakes just after a deadline, not before.
const WAKE_MARGIN_MS: u64 = 5;

/// Entries a reclaim may claim beyond the caller's free slots, to put back in line for the
/// other idle workers (which block without following the leases).
pub(crate) const HAND_ON: usize = 16;

/// What one reclaim call found.
#[derive(Debug)]
pub(crate) struct Reclaimed {
    /// Claimed entries for the caller's free slots.
    pub(crate) entries: Vec<RawEntry>,
    /// Claimed entries beyond them: to put back in line at once.
    pub(crate) hand_on: Vec<RawEntry>,
    /// The caller watches: the time until the next lease deadline or due retry (at most a
    /// lease). `None`: another worker watches; call again after `max_block`.
    pub(crate) next_wake: Option<Duration>,
}

/// How the caller takes part in the watch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Standing {
    /// The longest it blocks while another worker watches (its `max_block`).
    pub(crate) sleep: Duration,
    /// Entries it holds (a watcher holding none is preferred).
    pub(crate) holds: usize,
}

fn command(
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    free: usize,
    standing: Standing,
) -> redis::Cmd {
    let mut cmd = calls::reclaim(keys, caller, lease, free);
    cmd.arg(standing.sleep.as_millis() as u64)
        .arg(standing.holds);
    cmd
}

pub(crate) async fn reclaim(
    redis: &Redis,
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    free: usize,
    standing: Standing,
) -> Result<Reclaimed, fleetq_broker::Error> {
    let cmd = command(keys, caller, lease, free + HAND_ON, standing);
    let (entries, next_wake_ms, now_ms): ReclaimReply =
        functions::call(&mut redis.conn(), &cmd, "reclaim").await?;
    let mut entries: Vec<RawEntry> = entries.into_iter().map(raw_entry).collect();
    let hand_on = entries.split_off(free.min(entries.len()));
    // A few ms late rather than early: an entry is claimable once its idle time reaches the lease.
    let next_wake = (next_wake_ms > 0)
        .then(|| Duration::from_millis(next_wake_ms.saturating_sub(now_ms) + WAKE_MARGIN_MS));
    Ok(Reclaimed {
        entries,
        hand_on,
        next_wake,
    })
}

/// Gives up the caller's watch (a call with no free slot): it cannot claim now.
pub(crate) async fn resign(
    redis: &Redis,
    keys: &QueueKeys,
    caller: &Caller,
    lease: Duration,
    standing: Standing,
) -> Result<(), fleetq_broker::Error> {
    let cmd = command(keys, caller, lease, 0, standing);
    let _: ReclaimReply = functions::call(&mut redis.conn(), &cmd, "give up the watch").await?;
    Ok(())
}
