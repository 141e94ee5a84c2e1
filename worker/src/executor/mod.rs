//! Executors: ready-made [`Handler`]s the `fleetq-worker` binary can run.
//!
//! - [`Echo`] answers each job with its own payload: a smoke test for producers and for a
//!   deployment, with no GPU work behind it.
//! - [`process`] runs jobs in long-lived child processes speaking JSON lines (a Python model
//!   server, say).
//! - [`http`] runs jobs on a local inference server: ComfyUI, or any JSON-over-HTTP server.
//!
//! [`Executor`] is any one of them behind a single type, so the binary chooses at run time and
//! still calls `fleetq_worker::run` once.

use crate::handler::{Handler, Job, JobContext, Outcome};

pub mod http;
pub mod process;

pub use http::{HttpConfig, HttpExecutor, HttpMode};
pub use process::{ProcessConfig, ProcessExecutor};

/// Succeeds with `{"echo": <payload>, "node": <node>}`.
#[derive(Debug, Clone)]
pub struct Echo {
    /// Reported in the result, so a producer sees which host answered.
    pub node: String,
}

impl Handler for Echo {
    async fn handle(&self, job: Job, _ctx: JobContext) -> Outcome {
        Outcome::Succeeded(serde_json::json!({ "echo": job.payload, "node": self.node }))
    }
}

/// One of the ready-made executors, chosen at run time (the binary's `--executor` flag).
///
/// Every [`Handler`] method is passed to the executor inside, so an `Executor` behaves exactly
/// like the one it holds.
#[derive(Debug)]
pub enum Executor {
    /// Answers each job with its payload.
    Echo(Echo),
    /// Long-lived child processes speaking JSON lines.
    Process(ProcessExecutor),
    /// A local inference server (ComfyUI or JSON over HTTP).
    Http(HttpExecutor),
}

impl Handler for Executor {
    async fn handle(&self, job: Job, ctx: JobContext) -> Outcome {
        match self {
            Executor::Echo(e) => e.handle(job, ctx).await,
            Executor::Process(e) => e.handle(job, ctx).await,
            Executor::Http(e) => e.handle(job, ctx).await,
        }
    }

    fn reports_start(&self) -> bool {
        match self {
            Executor::Echo(e) => e.reports_start(),
            Executor::Process(e) => e.reports_start(),
            Executor::Http(e) => e.reports_start(),
        }
    }

    async fn ready(&self) -> Result<(), String> {
        match self {
            Executor::Echo(e) => e.ready().await,
            Executor::Process(e) => e.ready().await,
            Executor::Http(e) => e.ready().await,
        }
    }

    async fn shutdown(&self) {
        match self {
            Executor::Echo(e) => e.shutdown().await,
            Executor::Process(e) => e.shutdown().await,
            Executor::Http(e) => e.shutdown().await,
        }
    }
}

impl From<Echo> for Executor {
    fn from(e: Echo) -> Self {
        Executor::Echo(e)
    }
}

impl From<ProcessExecutor> for Executor {
    fn from(e: ProcessExecutor) -> Self {
        Executor::Process(e)
    }
}

impl From<HttpExecutor> for Executor {
    fn from(e: HttpExecutor) -> Self {
        Executor::Http(e)
    }
}
