//! TEMPORARY STUB (replaced by the real module).
#![allow(clippy::should_implement_trait)]
use crate::{Error, Result};
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
/// Backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    cur: Duration,
}
impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}
impl Backoff {
    /// New.
    pub fn new() -> Self {
        Self {
            cur: Duration::from_millis(50),
        }
    }
    /// Next.
    pub fn next(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(Duration::from_millis(500));
        d
    }
    /// Reset.
    pub fn reset(&mut self) {
        self.cur = Duration::from_millis(50);
    }
}
/// Log.
#[derive(Debug, Default)]
pub struct OutageLog {
    down: Option<String>,
}
impl OutageLog {
    /// Failed.
    pub fn failed(&mut self, what: &str, e: &Error) {
        let k = e.to_string();
        if self.down.as_deref() != Some(&k) {
            tracing::warn!(%what, error = %e, "waiting for Redis");
            self.down = Some(k);
        }
    }
    /// Recovered.
    pub fn recovered(&mut self) {
        if self.down.take().is_some() {
            tracing::info!("Redis ready again");
        }
    }
}
/// Until ready.
pub async fn until_ready<T, F, Fut>(
    what: &'static str,
    stop: &CancellationToken,
    mut f: F,
) -> Result<Option<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut b = Backoff::new();
    let mut log = OutageLog::default();
    loop {
        match f().await {
            Ok(v) => {
                log.recovered();
                return Ok(Some(v));
            }
            Err(e) if e.is_transient() => {
                log.failed(what, &e);
                tokio::select! { _ = tokio::time::sleep(b.next()) => {}, _ = stop.cancelled() => return Ok(None) }
            }
            Err(e) => return Err(e),
        }
    }
}
