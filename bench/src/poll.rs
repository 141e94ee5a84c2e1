//! Waiting for a condition: the bench polls (the system under test never does), every
//! `every`, until a deadline, and says what it waited for when the deadline passes.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::bail;

/// Calls `check` every `every` until it yields `Some`, and returns that value; fails after
/// `timeout` with a message naming `what`.
pub async fn until<T, F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}
