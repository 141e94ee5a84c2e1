//! The one error type of the `fleetq-broker` crate.

use std::time::Duration;

/// Everything that can go wrong talking to a queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Redis server could not be reached.
    #[error("cannot connect to Redis at {url}: {source}. Check that redis-server is running there (start one with `redis-server --port 6379`) or set REDIS_URL")]
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

    /// True when trying again later may succeed (connection lost, server loading, timeout).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } => true,
            Error::Redis { source, .. } => {
                source.is_io_error()
                    || source.is_timeout()
                    || source.is_connection_dropped()
                    || source.is_connection_refusal()
                    || matches!(source.code(), Some("LOADING" | "TRYAGAIN" | "MASTERDOWN"))
            }
            _ => false,
        }
    }
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
