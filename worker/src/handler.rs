//! What runs a job: the [`Handler`] trait for Rust users, the [`Job`] it gets, the
//! [`JobContext`] it reports through, and the [`Outcome`] it returns.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::progress::Tracker;

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

/// A progress report: any of step/total, the stage (a node of a workflow, a phase of a
/// pipeline) and a short message. Every report resets the job's progress timeout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Steps done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    /// Steps in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// The stage running now; a change of stage starts a new entry in the stage profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// A short message (cut to 200 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Progress {
    /// Step `step` of `total`.
    pub fn step(step: u64, total: u64) -> Self {
        Self {
            step: Some(step),
            total: Some(total),
            ..Self::default()
        }
    }

    /// Entering stage `name`.
    pub fn stage(name: impl Into<String>) -> Self {
        Self {
            stage: Some(name.into()),
            ..Self::default()
        }
    }

    /// The same report in stage `name`.
    pub fn in_stage(mut self, name: impl Into<String>) -> Self {
        self.stage = Some(name.into());
        self
    }

    /// The same report with a message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }
}

/// The handle a running job reports through and sees cancellation on.
///
/// The token fires when the job must stop: a producer cancelled it, its lease was lost, a
/// timeout fired, or the worker is shutting down. The runtime also drops the handler's
/// future then, so a handler only needs the token to stop work it spawned elsewhere
/// (threads, child processes).
#[derive(Clone)]
pub struct JobContext {
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: Arc<Tracker>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl JobContext {
    /// Says the work has really begun (model loaded, server accepted and started). Only
    /// handlers whose [`Handler::reports_start`] is true need it; it stops the start timeout.
    pub async fn started(&self) {
        self.tracker.mark_started().await;
    }

    /// Reports progress: resets the progress timeout, tracks the stage profile, and writes the
    /// report to the job (throttled to one write per `progress_interval`; the latest report
    /// always lands).
    pub async fn progress(&self, progress: Progress) {
        self.tracker.report(progress).await;
    }

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

    /// True when the handler calls [`JobContext::started`] itself once the work really begins
    /// (a child process that loads a model, an inference server that queues internally);
    /// the start timeout covers the time until then. False (the default): the job counts as
    /// started when the handler is called.
    fn reports_start(&self) -> bool {
        false
    }

    /// Checks the handler can take work (its command exists, its server answers). The worker
    /// takes no job until this succeeds, retrying with backoff and saying why meanwhile.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// Called once when the worker stops, after the last job: stop child processes, close
    /// connections.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
