//! What runs a job: the [`Handler`] trait for Rust users, the [`Job`] it gets, the
//! [`JobContext`] it reports through, and the [`Outcome`] it returns.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// One job, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job id (stable across retries).
    pub id: String,
    /// The queue it came from.
    pub queue: String,
    /// The payload JSON.
    pub payload: serde_json::Value,
    /// This attempt's number, 1-based (reclaims after a lost lease count).
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// The job's `workflow` field, when given.
    pub workflow: Option<String>,
    /// The job's `traceparent` field, when given.
    pub traceparent: Option<String>,
    /// When the job was first enqueued (ms since the Unix epoch, Redis clock).
    pub enqueued_ms: u64,
}

/// How an attempt ended, as the handler says.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Done; the value is recorded as the job's result.
    Succeeded(serde_json::Value),
    /// Failed in a way worth retrying (on another node, after a backoff).
    Retry(String),
    /// Failed for good (bad input, say): the job ends `failed`, no retry.
    Fail(String),
}

/// The handle a running job uses to see cancellation.
///
/// The token fires when the job must stop: a producer cancelled it, its lease was lost,
/// a timeout fired, or the worker is shutting down. The runtime also drops the handler's
/// future then, so a handler only needs the token to stop work it spawned elsewhere
/// (threads, child processes).
#[derive(Debug, Clone)]
pub struct JobContext {
    pub(crate) cancel: CancellationToken,
}

impl JobContext {
    /// Resolves when the job must stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// True once the job must stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A clone of the cancellation token, for work spawned elsewhere.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// Runs jobs. Implement it for in-process Rust work; executors for child processes and
/// HTTP inference servers implement it too.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt of `job`.
    fn handle(&self, job: Job, ctx: JobContext) -> impl Future<Output = Outcome> + Send;
}
