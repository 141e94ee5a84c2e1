//! The one error type of the `fleetq-worker` crate.

/// What stops a worker from running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A queue-level failure (Redis unreachable, bad queue config, …).
    #[error(transparent)]
    Queue(#[from] fleetq_broker::Error),
    /// A worker setting is invalid.
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

impl Error {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Queue(e) => e.is_transient(),
            Error::Config(_) => false,
        }
    }
}
