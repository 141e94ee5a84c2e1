//! The one error type of the `fleetq-worker` crate, by what failed.

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
    /// The `/metrics` listener could not be bound.
    #[error("cannot serve metrics on {addr}: {source}; pick another --metrics-addr (or off)")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// What the system said.
        source: std::io::Error,
    },
    /// The worker's metrics could not be set up.
    #[error("cannot set up the worker's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl Error {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Queue(e) => e.is_transient(),
            Error::Config(_) | Error::Bind { .. } | Error::Metrics(_) => false,
        }
    }
}
