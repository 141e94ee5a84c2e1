//! fleetq worker runtime: runs jobs from a fleetq queue on one host with N slots.
//!
//! - [`config`] — worker settings, defaults, validation.
//! - [`handler`] — the [`Handler`] trait, the [`Job`] it gets, its [`JobContext`] and [`Outcome`].
//! - [`worker`] — [`run`]: start, wait until ready, the read loop, shut down.
//! - `runtime` — what the loop, the slots, the renewer and the shutdown share.
//! - `intake` — the read loop: free slots, reclaim or read, dispatch, recovery from outages.
//! - `take` — reading for free slots only and deciding with `fleetq_take`.
//! - `attempt` — one attempt in one slot: run, race the timeouts, decide, commit, count.
//! - [`lease`] — held entries with their tokens, renewal every lease/3, self-fencing.
//! - `reclaim` — taking over entries whose lease ran out (`fleetq_reclaim`).
//! - `completion` — fenced commits, retried through Redis outages.
//! - `shutdown` — the two-phase shutdown: drain, then release.
//! - [`metrics`] — the worker's Prometheus metrics and `/metrics` server.
//! - [`timeouts`] — start, progress and run timeouts of a running attempt.
//! - `progress` — progress reports, the stage profile, throttled writes.
//! - `node` — this host's record, failure streak and suspension.
//! - [`executor`] — ready-made handlers for the `fleetq-worker` binary.
//! - [`error`] — the crate's error type.

pub mod config;
pub mod error;
pub mod executor;
pub mod handler;
pub mod lease;
pub mod metrics;
pub mod worker;

pub mod timeouts;

mod attempt;
mod completion;
mod intake;
mod node;
mod progress;
mod reclaim;
mod runtime;
mod shutdown;
mod take;

pub use config::WorkerConfig;
pub use error::Error;
pub use handler::{Handler, Job, JobContext, Outcome, Progress};
pub use worker::run;
