//! Errors a person can act on, and exit codes scripts can rely on.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done (for `enqueue --wait`, `watch`, `demo`: the job(s) succeeded) |
//! | 1 | a job ended without succeeding (failed, dead, expired, cancelled) |
//! | 2 | bad command line (unknown flag, missing argument) |
//! | 3 | Redis unreachable or failing |
//! | 4 | not found (job, queue, node, dead letter, a usable function library) |
//! | 5 | bad input (payload not JSON, invalid name, refused by the queue) |
//! | 6 | timed out waiting |

use std::process::ExitCode;

/// What went wrong, with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    /// The process exit code.
    pub code: u8,
    /// One line for a person: what was wrong and what to do.
    pub message: String,
}

/// A job ended without succeeding.
pub const JOB_NOT_SUCCEEDED: u8 = 1;
/// Redis unreachable or failing.
pub const REDIS: u8 = 3;
/// Job, queue, node, dead letter or a usable function library not found.
pub const NOT_FOUND: u8 = 4;
/// Bad input.
pub const BAD_INPUT: u8 = 5;
/// Timed out waiting.
pub const TIMEOUT: u8 = 6;

impl CliError {
    /// An error with `code` and `message`.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<fleetq_broker::Error> for CliError {
    fn from(e: fleetq_broker::Error) -> Self {
        use fleetq_broker::Error as E;
        let code = match &e {
            E::Connect { .. } | E::Redis { .. } | E::Protocol { .. } => REDIS,
            E::Rejected(_) | E::Config(_) => BAD_INPUT,
            E::Library(_) => NOT_FOUND,
            E::Timeout { .. } => TIMEOUT,
            _ => REDIS,
        };
        Self::new(
            code,
            fleetq_broker::error::report([&e as &(dyn std::error::Error + 'static)]),
        )
    }
}
