//! The timeouts a worker enforces on a running attempt: start (taken but not started), progress
//! (no progress report for too long) and run (total). The queue timeout is enforced in Redis
//! (`fleetq_take`, `fleetq_expire`) and the lease timeout by reclaim on other hosts.
//!
//! A firing stops the attempt (the handler's future is dropped and its cancellation token
//! fires), and the attempt is recorded as a `timeout` of that kind, on this node, in the stage
//! it was in, then retried elsewhere per the retry policy.

use std::time::{Duration, Instant};

use crate::progress::Tracker;

/// Which timeout fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// Taken but not started in time.
    Start,
    /// No progress report in time.
    Progress,
    /// Ran too long in all.
    Run,
}

impl TimeoutKind {
    /// The name used in Redis, events and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Progress => "progress",
            Self::Run => "run",
        }
    }
}

/// The limits in force for one attempt (the job's own, else the queue's).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Limits {
    pub(crate) start: Option<Duration>,
    pub(crate) progress: Option<Duration>,
    pub(crate) run: Option<Duration>,
}

/// Resolves when a limit is passed; writes throttled progress reports when they fall due.
/// Never resolves when no limit is set.
pub(crate) async fn watchdog(tracker: &Tracker, limits: Limits) -> TimeoutKind {
    loop {
        // Register interest before reading the state, so no change is missed.
        let changed = tracker.changed.notified();
        let snap = tracker.snapshot();
        let mut next: Option<(Instant, Option<TimeoutKind>)> = None;
        let mut consider = |at: Instant, kind: Option<TimeoutKind>| {
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, kind));
            }
        };
        match snap.started_at {
            None => {
                if let Some(t) = limits.start {
                    consider(snap.taken_at + t, Some(TimeoutKind::Start));
                }
            }
            Some(started) => {
                if let Some(t) = limits.progress {
                    consider(snap.last_activity + t, Some(TimeoutKind::Progress));
                }
                if let Some(t) = limits.run {
                    consider(started + t, Some(TimeoutKind::Run));
                }
            }
        }
        if let Some(at) = snap.flush_at {
            consider(at, None);
        }
        match next {
            Some((at, kind)) if at <= Instant::now() => match kind {
                Some(kind) => return kind,
                None => tracker.flush().await,
            },
            Some((at, _)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}
