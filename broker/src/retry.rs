//! Waiting out a Redis outage: a capped, jittered exponential [`Backoff`], an [`OutageLog`]
//! that logs once per change of state (not once per try), and [`until_ready`], which retries
//! a step until it succeeds, fails for good or is cancelled.
//!
//! The cap is short (500 ms by default) on purpose: a process waiting for Redis should take
//! work again within a second of Redis being ready; a refused TCP connect costs Redis nothing.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::Rng as _;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// First wait after a failure. Default 50 ms.
pub const DEFAULT_BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest wait between two tries. Default 500 ms, so a waiting process is back within
/// about a second of Redis being ready.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_millis(500);
/// Each wait is the nominal one times a random factor in `1 ± JITTER` (±20 %), so a fleet
/// that lost Redis together does not come back in lockstep.
pub const JITTER: f64 = 0.2;

/// Exponential backoff: `start`, doubling up to `cap`, each wait jittered by ±[`JITTER`].
#[derive(Debug, Clone)]
pub struct Backoff {
    start: Duration,
    cap: Duration,
    /// The nominal (unjittered) next wait.
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BACKOFF_START, DEFAULT_BACKOFF_CAP)
    }
}

impl Backoff {
    /// Backoff from `start` doubling to `cap` (a `cap` below `start` is raised to `start`).
    pub fn new(start: Duration, cap: Duration) -> Self {
        Self {
            start,
            cap: cap.max(start),
            current: start,
        }
    }

    /// The next wait (jittered), and doubles the one after it up to the cap.
    // Not `Iterator::next`: a backoff never ends, so an `Option` would only add an unwrap.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        let nominal = self.current;
        self.current = (self.current * 2).min(self.cap);
        let factor = rand::rng().random_range(1.0 - JITTER..=1.0 + JITTER);
        nominal.mul_f64(factor)
    }

    /// Starts again from `start` (call after a success).
    pub fn reset(&mut self) {
        self.current = self.start;
    }
}

/// Logs an outage once per change of state: the first failure, a failure of a different
/// kind (refused → `LOADING`, say), and the recovery with how long it took. Repeated
/// failures of the same kind are silent, so a long outage does not flood the log.
#[derive(Debug, Default)]
pub struct OutageLog {
    /// When the current outage began; `None` while Redis answers.
    since: Option<Instant>,
    /// The kind of the last failure logged (see [`failure_kind`]).
    kind: Option<String>,
}

impl OutageLog {
    /// A log with no outage going on.
    pub fn new() -> Self {
        Self::default()
    }

    /// True while an outage is going on (a failure since the last recovery).
    pub fn is_out(&self) -> bool {
        self.since.is_some()
    }

    /// Records a failure of `what`; warns when it starts an outage or is of another kind
    /// than the last one. Returns whether it logged.
    pub fn failed(&mut self, what: &str, err: &Error) -> bool {
        let kind = failure_kind(err);
        self.since.get_or_insert_with(Instant::now);
        if self.kind.as_deref() == Some(kind.as_str()) {
            return false;
        }
        tracing::warn!(error = %err, "waiting for Redis: {what}: {err}");
        self.kind = Some(kind);
        true
    }

    /// Records a success; after failures, logs "Redis ready again after X ms" and returns
    /// how long the outage lasted.
    pub fn recovered(&mut self) -> Option<Duration> {
        let since = self.since.take()?;
        self.kind = None;
        let took = since.elapsed();
        tracing::info!(
            outage_ms = took.as_millis() as u64,
            "Redis ready again after {} ms",
            took.as_millis()
        );
        Some(took)
    }
}

/// A short name for the kind of failure, so that [`OutageLog`] can tell a change of state
/// (refused, timeout, `LOADING`, `READONLY`, …) from another try failing the same way.
pub fn failure_kind(err: &Error) -> String {
    let source = match err {
        Error::Connect { source, .. } | Error::Redis { source, .. } => source,
        Error::Timeout { .. } => return "timeout".into(),
        other => return format!("{other}"),
    };
    if let Some(code) = source.code() {
        code.to_owned()
    } else if source.is_connection_refusal() {
        "refused".into()
    } else if source.is_timeout() {
        "timeout".into()
    } else if source.is_connection_dropped() {
        "dropped".into()
    } else {
        format!("{:?}", source.kind())
    }
}

/// Calls `f` until it succeeds (`Ok(Some)`), fails with an error that is not
/// [transient](Error::is_transient) (`Err`), or `stop` is cancelled (`Ok(None)`). Between
/// tries it waits a [`Backoff`] with the defaults; it logs through an [`OutageLog`], once
/// per change of state, never once per try.
pub async fn until_ready<T, F, Fut>(
    what: &'static str,
    stop: &CancellationToken,
    mut f: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut backoff = Backoff::default();
    let mut log = OutageLog::new();
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            r = f() => r,
        };
        match attempt {
            Ok(v) => {
                log.recovered();
                return Ok(Some(v));
            }
            Err(e) if e.is_transient() => {
                log.failed(what, &e);
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff.next()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        let within = |d: Duration, nominal: u64| {
            let n = nominal as f64;
            let ms = d.as_secs_f64() * 1000.0;
            ms >= n * (1.0 - JITTER) - 0.01 && ms <= n * (1.0 + JITTER) + 0.01
        };
        for (d, nominal) in waits.iter().zip([50, 100, 200, 400, 500, 500, 500, 500]) {
            assert!(within(*d, nominal), "{d:?} not within 20% of {nominal} ms");
        }
        b.reset();
        assert!(within(b.next(), 50));
    }

    #[test]
    fn outage_log_speaks_once_per_state() {
        let refused = Error::Timeout {
            what: "x".into(),
            after: Duration::from_secs(1),
        };
        let other = Error::Config("bad".into());
        let mut log = OutageLog::new();
        assert!(log.recovered().is_none(), "no outage, nothing to report");
        assert!(log.failed("ping", &refused));
        assert!(!log.failed("ping", &refused));
        assert!(log.failed("ping", &other));
        assert!(log.is_out());
        assert!(log.recovered().is_some());
        assert!(!log.is_out());
        assert!(log.failed("ping", &refused), "a new outage is logged again");
    }

    #[tokio::test]
    async fn until_ready_stops_on_cancel_and_on_permanent_errors() {
        let stop = CancellationToken::new();
        let mut tries = 0;
        let got = until_ready("test", &stop, || {
            tries += 1;
            let n = tries;
            async move {
                if n < 3 {
                    Err(Error::Timeout {
                        what: "x".into(),
                        after: Duration::ZERO,
                    })
                } else {
                    Ok(n)
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, Some(3));
        let err = until_ready("test", &stop, || async {
            Err::<(), _>(Error::Config("bad".into()))
        })
        .await;
        assert!(matches!(err, Err(Error::Config(_))));
        stop.cancel();
        let none = until_ready("test", &stop, || async {
            Err::<(), _>(Error::Timeout {
                what: "x".into(),
                after: Duration::ZERO,
            })
        })
        .await
        .unwrap();
        assert!(none.is_none());
    }
}
