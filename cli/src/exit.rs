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
    /// For a person: what was wrong and what to do (one line, or a short list where the
    /// choices are the point, as for a command missing its subcommand).
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

/// Bad command line (clap's own errors exit with it too).
pub const USAGE: u8 = 2;

impl From<fleetq_broker::Error> for CliError {
    fn from(e: fleetq_broker::Error) -> Self {
        use fleetq_broker::Error as E;
        if let E::Connect { url, source } = &e {
            return Self::new(
                REDIS,
                format!(
                    "cannot connect to Redis at {url}: {source}. {}",
                    unreachable_hint(url)
                ),
            );
        }
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

/// What to do when the server at `url` (a `redis://`, `rediss://`, `redis+cluster://` or
/// `redis+sentinel://` URL, or a Unix socket path form) does not answer: start redis-server
/// where the URL points, or point the URL elsewhere.
pub fn unreachable_hint(url: &str) -> String {
    let fix = "or set REDIS_URL (or --redis-url) to the server you run";
    match address(url) {
        Address::Socket(path) => format!(
            "Start redis-server on that socket (`redis-server --port 0 --unixsocket {path}`), {fix}"
        ),
        Address::Tcp { host, port } => {
            let local = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "0.0.0.0");
            let start = format!("redis-server --port {port}");
            if local {
                format!("Start one on this machine at port {port} (`{start}`), {fix}")
            } else {
                format!("Check that redis-server runs on {host} port {port} (`{start}` there) and that this machine can reach it, {fix}")
            }
        }
    }
}

/// Where a Redis URL points (its first host for a cluster or sentinel URL).
#[derive(Debug, PartialEq, Eq)]
enum Address {
    Tcp { host: String, port: u16 },
    Socket(String),
}

fn address(url: &str) -> Address {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    if scheme.contains("unix") {
        return Address::Socket(rest.split(['?', '#']).next().unwrap_or(rest).to_owned());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let first = hosts.split(',').next().unwrap_or("");
    let default = if scheme.contains("sentinel") {
        fleetq_broker::topology::DEFAULT_SENTINEL_PORT
    } else {
        fleetq_broker::topology::DEFAULT_PORT
    };
    let (host, port) = if let Some(v6) = first.strip_prefix('[') {
        let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
        (h, after.strip_prefix(':'))
    } else {
        match first.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (first, None),
        }
    };
    Address::Tcp {
        host: if host.is_empty() { "127.0.0.1" } else { host }.to_owned(),
        port: port.and_then(|p| p.parse().ok()).unwrap_or(default),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Address {
        Address::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    #[test]
    fn addresses_come_from_the_url() {
        assert_eq!(address("redis://127.0.0.1:7001"), tcp("127.0.0.1", 7001));
        assert_eq!(
            address("redis://u:p@q@db.example:6380/2"),
            tcp("db.example", 6380)
        );
        assert_eq!(
            address("rediss://cache.internal"),
            tcp("cache.internal", 6379)
        );
        assert_eq!(address("redis://[::1]:7000/0"), tcp("::1", 7000));
        assert_eq!(address("redis+cluster://a:7000,b:7001"), tcp("a", 7000));
        assert_eq!(address("redis+sentinel://s1,s2/mymaster"), tcp("s1", 26379));
        assert_eq!(
            address("redis+unix:///run/redis.sock?db=1"),
            Address::Socket("/run/redis.sock".to_owned())
        );
    }

    #[test]
    fn the_hint_names_the_real_port() {
        let h = unreachable_hint("redis://127.0.0.1:7001");
        assert!(
            h.contains("redis-server --port 7001") && h.contains("REDIS_URL"),
            "{h}"
        );
        let h = unreachable_hint("redis://db.example:6380");
        assert!(h.contains("db.example port 6380"), "{h}");
    }
}
