//! fleetq worker runtime: runs jobs from a fleetq queue on one host with N slots.
//!
//! - [`config`] — worker settings, defaults, validation.
//! - [`handler`] — the [`Handler`] trait, the [`Job`] it gets, its [`JobContext`] and [`Outcome`].
//! - [`worker`] — the consumer loop with slots, dispatch and the two-phase shutdown; [`run`].
//! - `take` — reading for free slots only and deciding with `fleetq_take`.
//! - [`lease`] — held entries and their renewal every lease/3.
//! - `reclaim` — taking over entries whose lease ran out (`XAUTOCLAIM`).
//! - `completion` — fenced commits of results, errors, retries and dead letters.
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

mod completion;
mod node;
mod progress;
mod reclaim;
mod take;

pub use config::WorkerConfig;
pub use error::Error;
pub use handler::{Handler, Job, JobContext, Outcome, Progress};
pub use worker::run;
