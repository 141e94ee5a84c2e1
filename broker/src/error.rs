//! The one error type of the `fleetq-broker` crate.

use std::time::Duration;

/// Everything that can go wrong talking to a queue.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis server could not be reached.
    #[error("cannot connect to Redis at {url}: {source}. Check that a Redis server listens at that address (start one with `redis-server --port PORT`, PORT from the URL) or set REDIS_URL (or --redis-url) to where one does")]
    Connect {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What the client said.
        source: redis::RedisError,
    },
    /// A Redis command failed.
    #[error("Redis step `{step}` failed: {source}")]
    Redis {
        /// Which step of fleetq was running.
        step: &'static str,
        /// What Redis or the client said.
        source: redis::RedisError,
    },
    /// A server-side function refused the request (bad payload, unknown field, …).
    #[error("{0}")]
    Rejected(String),
    /// A configuration value or argument is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The server has no usable fleetq function library (none, or an older one) and this
    /// process may not load it. The message says which and what to do. Transient: the broker
    /// (or an operator) loads it.
    #[error("{0}")]
    Library(String),
    /// Redis answered something fleetq does not understand (a foreign library of the same
    /// name, say).
    #[error("unexpected reply to `{step}`: {detail}")]
    Protocol {
        /// Which step of fleetq was running.
        step: &'static str,
        /// What was wrong with the reply.
        detail: String,
    },
    /// A wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long fleetq waited.
        after: Duration,
    },
    /// Redis refused a write because it reached `maxmemory` (`-OOM`, with the
    /// `noeviction` policy fleetq needs). Transient: it passes once memory is freed.
    #[error("Redis is out of memory (maxmemory reached) and refused the {what}; nothing was queued. Let workers drain the queue, raise maxmemory, or free memory; see docs/operations.md")]
    OutOfMemory {
        /// What was refused (`job`, `batch of jobs`).
        what: &'static str,
        /// What Redis said.
        source: redis::RedisError,
    },
    /// A local redis-server (demo, tests) could not be started.
    #[error("local redis-server: {0}")]
    LocalRedis(String),
}

impl Error {
    /// Wraps a Redis error raised during `step`, turning a function's own refusal
    /// (`fleetq: …`) into [`Error::Rejected`].
    pub fn redis(step: &'static str, source: redis::RedisError) -> Self {
        if source.code() == Some("fleetq:") {
            let msg = source.detail().unwrap_or_default();
            let msg = msg.split(" script: ").next().unwrap_or(msg).trim_end();
            return Error::Rejected(msg.to_owned());
        }
        let text = source.to_string();
        if let Some(pos) = text.find("fleetq: ") {
            let msg = text[pos + "fleetq: ".len()..].trim_end();
            let msg = msg.split(" script: ").next().unwrap_or(msg);
            return Error::Rejected(msg.to_owned());
        }
        Error::Redis { step, source }
    }

    /// An enqueue error as the producer reports it: a `-OOM` refusal becomes
    /// [`Error::OutOfMemory`] naming maxmemory and what to do; anything else is kept.
    pub fn refused_enqueue(self, what: &'static str) -> Self {
        match self {
            Error::Redis { source, .. } if source.code() == Some("OOM") => {
                Error::OutOfMemory { what, source }
            }
            other => other,
        }
    }

    /// True when a function refused the call because of a bad value in the queue's config
    /// hash: trying again succeeds once an operator fixes it (the error says how).
    pub fn is_bad_config(&self) -> bool {
        matches!(self, Error::Rejected(m) if m.starts_with("queue config field"))
    }

    /// True when trying again later may succeed: the connection was refused, dropped or
    /// timed out, or the server is loading its data set, busy with a script, read-only (a
    /// replica or a failover in progress), out of memory, or its cluster/master is down
    /// (`LOADING`, `BUSY`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY`, `OOM`), or
    /// the function library is missing and this process may not load it ([`Error::Library`]:
    /// the broker does). A bad URL, a wrong password or a refused request is not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::OutOfMemory { .. } | Error::Library(_) => true,
            Error::Connect { source, .. } | Error::Redis { source, .. } => {
                redis_is_transient(source)
            }
            _ => false,
        }
    }
}

/// Server error codes that describe a passing state of the server, not a bad request.
pub const TRANSIENT_CODES: &[&str] = &[
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "OOM",
];

/// True for a client or server error that may pass by itself (see [`Error::is_transient`]).
pub fn redis_is_transient(source: &redis::RedisError) -> bool {
    source.is_io_error()
        || source.is_timeout()
        || source.is_connection_dropped()
        || source.is_connection_refusal()
        || source.code().is_some_and(|c| TRANSIENT_CODES.contains(&c))
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One line for a person: every message of an error chain joined with ": ", leaving out a
/// cause already spelled out by the message before it.
pub fn report<'a>(
    chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut out: Vec<String> = Vec::new();
    for e in chain {
        let text = e.to_string();
        if out.last().is_some_and(|prev| prev.contains(&text)) {
            continue;
        }
        out.push(text);
    }
    out.join(": ")
}
