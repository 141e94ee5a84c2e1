//! A Jepsen-style chaos run against real processes: a private `redis-server` with AOF, a
//! `fleetq-broker` and N `fleetq-worker`s running the process executor.
//!
//! - [`config`]: what to run (jobs, workers, lease, faults, seed).
//! - [`history`]: what every client saw and every fault done, with times.
//! - [`fleet`]: the processes, to start, kill, freeze and stop.
//! - [`generator`]: the producer side, enqueueing jobs with ids chosen here.
//! - [`nemesis`]: faults on a schedule drawn from the seed.
//! - [`checker`]: decides from the history and Redis's final state alone.
//! - [`run`]: the whole run, start to verdict.

pub mod checker;
pub mod config;
pub mod fleet;
pub mod generator;
pub mod history;
pub mod nemesis;
pub mod run;

pub use checker::{Check, Report};
pub use config::{ChaosConfig, FaultKind};
pub use history::History;
pub use run::run;

/// Environment variable naming the executions log the child appends to.
pub const EXEC_LOG_ENV: &str = "FLEETQ_CHAOS_LOG";
