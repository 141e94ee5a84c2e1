//! Executors: ready-made [`Handler`]s the `fleetq-worker` binary can run.
//!
//! - [`Echo`] answers each job with its own payload: a smoke test for producers and for a
//!   deployment, with no GPU work behind it.
//! - [`process`] runs jobs in long-lived child processes speaking JSON lines (a Python model
//!   server, say).
//! - [`http`] runs jobs on a local inference server: ComfyUI, or any JSON-over-HTTP server.

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
