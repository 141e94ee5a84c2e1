//! Counting Redis commands with `INFO commandstats`.
//!
//! Redis counts every command it executes, including those a function runs with
//! `redis.call` (one `FCALL fleetq_complete` shows up as one `fcall` plus every `hset`,
//! `xack`, … inside it). Two counts come out of a delta:
//!
//! - **server** ([`CommandStats::total`]): everything Redis executed;
//! - **client** ([`CommandStats::client_total`]): the commands that are only ever sent by
//!   clients — never called inside a fleetq function — i.e. the round trips clients make.
//!   They are `FCALL`, `FCALL_RO`, `XREADGROUP`, `FUNCTION …`, `XGROUP …`, `CLIENT …`,
//!   `HELLO`, `PING`, `SELECT`, `AUTH` (see [`is_client_only`]). The worker also sends
//!   `HGETALL` (queue config, at start and every 60 s), `XPENDING`, `XRANGE` and `DEL` (at
//!   shutdown) itself; functions use those too, so they count as server commands only —
//!   at most a handful per worker lifetime.
//!
//! `INFO` is the measurement itself and is left out of every count.

use std::collections::BTreeMap;

use anyhow::Context;

/// The command this harness measures with; never counted.
pub const MEASUREMENT_COMMAND: &str = "info";

/// Commands only clients send (fleetq's functions never call them), by their commandstats
/// name: a plain name, or a container command's name followed by `|` for its subcommands.
const CLIENT_ONLY: &[&str] = &[
    "fcall",
    "fcall_ro",
    "xreadgroup",
    "hello",
    "ping",
    "select",
    "auth",
    "function|",
    "xgroup|",
    "client|",
];

/// True when `name` (a commandstats name such as `fcall` or `xgroup|create`) is a command
/// only clients send.
pub fn is_client_only(name: &str) -> bool {
    CLIENT_ONLY.iter().any(|c| match c.strip_suffix('|') {
        Some(container) => name
            .strip_prefix(container)
            .is_some_and(|rest| rest.starts_with('|')),
        None => name == *c,
    })
}

/// Calls and time of one command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// Times it ran.
    pub calls: u64,
    /// Microseconds Redis spent in it (for `fcall`: the whole function, the commands it
    /// ran included).
    pub usec: u64,
}

/// Calls per command (lower-case commandstats names, `xgroup|create` for subcommands).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandStats(BTreeMap<String, Calls>);

impl CommandStats {
    /// Reads `INFO commandstats`.
    pub async fn read<C: redis::aio::ConnectionLike + Send>(conn: &mut C) -> anyhow::Result<Self> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .context("INFO commandstats")?;
        Ok(Self::parse(&text))
    }

    /// Parses `cmdstat_<name>:calls=<n>,usec=…` lines.
    pub fn parse(text: &str) -> Self {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some((name, rest)) = line
                .trim()
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix(key))
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if let Some(calls) = field("calls=") {
                let usec = field("usec=").unwrap_or(0);
                out.insert(name.to_ascii_lowercase(), Calls { calls, usec });
            }
        }
        Self(out)
    }

    /// What was executed between `earlier` and `self`, without the measurement command.
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(name, _)| name.as_str() != MEASUREMENT_COMMAND)
                .map(|(name, now)| {
                    let before = earlier.0.get(name).copied().unwrap_or_default();
                    let d = Calls {
                        calls: now.calls.saturating_sub(before.calls),
                        usec: now.usec.saturating_sub(before.usec),
                    };
                    (name.clone(), d)
                })
                .filter(|(_, d)| d.calls > 0)
                .collect(),
        )
    }

    /// Adds the calls and time of `other` to these (deltas of windows measured apart).
    pub fn add(&mut self, other: &Self) {
        for (name, c) in &other.0 {
            let v = self.0.entry(name.clone()).or_default();
            v.calls += c.calls;
            v.usec += c.usec;
        }
    }

    /// Takes away `n` calls of `name` that the harness itself sent (its polling).
    pub fn discount(&mut self, name: &str, n: u64) {
        if let Some(v) = self.0.get_mut(name) {
            v.calls = v.calls.saturating_sub(n);
        }
    }

    /// Calls of `name`.
    pub fn calls(&self, name: &str) -> u64 {
        self.0.get(name).map_or(0, |c| c.calls)
    }

    /// Microseconds Redis spent in `name`.
    pub fn usec(&self, name: &str) -> u64 {
        self.0.get(name).map_or(0, |c| c.usec)
    }

    /// Every command Redis executed (those inside functions included).
    pub fn total(&self) -> u64 {
        self.0.values().map(|c| c.calls).sum()
    }

    /// The commands clients sent (see [`is_client_only`]).
    pub fn client_total(&self) -> u64 {
        self.0
            .iter()
            .filter(|(name, _)| is_client_only(name))
            .map(|(_, c)| c.calls)
            .sum()
    }

    /// The `n` most called commands, most called first.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> =
            self.0.iter().map(|(k, v)| (k.clone(), v.calls)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_subtracts() {
        let before = CommandStats::parse(
            "# Commandstats\r\ncmdstat_fcall:calls=2,usec=9,usec_per_call=4.50,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=1,usec=1,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let after = CommandStats::parse(
            "cmdstat_fcall:calls=7,usec=9\r\ncmdstat_hset:calls=10,usec=9\r\n\
             cmdstat_xgroup|create:calls=1,usec=3\r\ncmdstat_info:calls=4,usec=1\r\n",
        );
        let d = after.since(&before);
        assert_eq!(d.calls("fcall"), 5);
        assert_eq!(d.usec("fcall"), 0);
        assert_eq!(d.calls("hset"), 10);
        assert_eq!(d.calls("info"), 0);
        assert_eq!(d.total(), 16);
        assert_eq!(d.client_total(), 6);
        assert_eq!(d.top(1), vec![("hset".to_owned(), 10)]);
    }

    #[test]
    fn client_only_names() {
        assert!(is_client_only("fcall"));
        assert!(is_client_only("xgroup|create"));
        assert!(is_client_only("client|setinfo"));
        assert!(!is_client_only("xadd"));
        assert!(!is_client_only("xgroupx"));
        assert!(!is_client_only("xpending"));
    }
}
