//! The Redis key layout. Every key fleetq touches is built here and nowhere else.
//!
//! All keys of one queue `q` share the hash tag `{q}`, so a queue lives in one Redis Cluster
//! slot and the server-side functions that touch several of its keys stay atomic.
//!
//! | key | type | what |
//! |---|---|---|
//! | `fleetq:{q}:stream` | stream, group `workers` | waiting and in-flight jobs; the group's pending list is "in flight" |
//! | `fleetq:{q}:delayed` | sorted set (score: due time, ms) | retries waiting out their backoff, scheduled jobs |
//! | `fleetq:{q}:dead` | stream | dead letters: the job's fields (`f:`-prefixed), reason, last error, attempts, nodes |
//! | `fleetq:{q}:job:<id>` | hash, expires `retention_ms` after the job ends | state, attempts, node, timestamps, progress, result or error |
//! | `fleetq:{q}:events` | stream capped at `events_maxlen` | lifecycle events |
//! | `fleetq:{q}:config` | hash | queue defaults (timeouts, attempts, backoff, retention, lease) |
//! | `fleetq:{q}:leases` | sorted set (score: lease deadline, ms) | entry ids in flight with their holder's deadline: an entry is stale once it passed; tells idle workers when to look |
//! | `fleetq:{q}:stats` | hash | counters kept by the functions (per outcome, per node and timeout kind); also cursors and the liveness clocks `active_ms` (last worker call) and `grace_until_ms` |
//! | `fleetq:{q}:holds` | hash | what the hot path reads once per batch: `<entry id>` → `<token> <consumer>` (the fencing token of its current take), `<entry id>` → `-` (a waiting entry whose job hash must be read before a take), `w:<job id>` → callers waiting on the job |
//! | `fleetq:{q}:deadlines` | sorted set (score: queue deadline, ms) | entries of never-started jobs with a queue timeout, as `<entry id> <enqueued_ms> <job id>`: what `fleetq_expire` ends when due, without reading the backlog |
//! | `fleetq:{q}:notify:<id>` | list, expires after 60 s | one token per waiter when the job ends (for `BLPOP`) |
//! | `fleetq:{q}:nodes` | sorted set (score: last seen, ms) | nodes working the queue, for failover decisions |
//! | `fleetq:{q}:suspended` | hash node → until (ms) | nodes suspended on this queue |
//! | `fleetq:{q}:blocks` | hash `<workflow>\|<node>` → until (ms) | nodes blocked for a workflow after failing it |
//! | `fleetq:node:<node>` | hash, expires when not renewed | a worker host: slots, busy, last seen |
//!
//! The Lua functions derive the queue's keys from `KEYS[1]` (the stream key) by suffix; the
//! suffixes there (`broker/src/lua/common.lua`) must match the ones here.

/// The consumer group every worker of a queue reads with.
pub const GROUP: &str = "workers";

/// Longest queue name accepted; keeps keys short and readable.
pub const MAX_QUEUE_NAME_LEN: usize = 100;

/// The keys of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueKeys {
    name: String,
    prefix: String,
}

impl QueueKeys {
    /// Keys of queue `name`.
    ///
    /// A name is 1 to [`MAX_QUEUE_NAME_LEN`] bytes of letters, digits, `-`, `_` and `.`: braces
    /// would break the hash tag, and colons the key layout.
    ///
    /// ```
    /// let keys = fleetq_broker::QueueKeys::new("images").unwrap();
    /// assert_eq!(keys.stream(), "fleetq:{images}:stream");
    /// assert!(fleetq_broker::QueueKeys::new("a:b").is_err());
    /// ```
    pub fn new(name: &str) -> Result<Self, crate::Error> {
        let valid = !name.is_empty()
            && name.len() <= MAX_QUEUE_NAME_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid {
            return Err(crate::Error::Config(format!(
                "invalid queue name {name:?}: use 1 to {MAX_QUEUE_NAME_LEN} letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            prefix: format!("fleetq:{{{name}}}:"),
        })
    }

    /// Partition `i` of this queue: the queue `<name>#<i>`, under a hash tag of its own
    /// (see [`crate::partitions`]).
    pub fn partition(&self, i: u32) -> Self {
        let name = format!("{}#{i}", base_of(&self.name));
        Self {
            prefix: format!("fleetq:{{{name}}}:"),
            name,
        }
    }

    /// The queue this is a partition of (the queue itself when it is not one).
    pub fn base(&self) -> Self {
        match base_of(&self.name) {
            b if b == self.name => self.clone(),
            b => Self {
                name: b.to_owned(),
                prefix: format!("fleetq:{{{b}}}:"),
            },
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `fleetq:{q}:stream`, the key passed as `KEYS[1]` to every function.
    pub fn stream(&self) -> String {
        format!("{}stream", self.prefix)
    }

    /// `fleetq:{q}:delayed`.
    pub fn delayed(&self) -> String {
        format!("{}delayed", self.prefix)
    }

    /// `fleetq:{q}:dead`.
    pub fn dead(&self) -> String {
        format!("{}dead", self.prefix)
    }

    /// `fleetq:{q}:events`.
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// `fleetq:{q}:config`.
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }

    /// `fleetq:{q}:leases`.
    pub fn leases(&self) -> String {
        format!("{}leases", self.prefix)
    }

    /// `fleetq:{q}:stats`.
    pub fn stats(&self) -> String {
        format!("{}stats", self.prefix)
    }

    /// `fleetq:{q}:nodes`.
    pub fn nodes(&self) -> String {
        format!("{}nodes", self.prefix)
    }

    /// `fleetq:{q}:suspended`.
    pub fn suspended(&self) -> String {
        format!("{}suspended", self.prefix)
    }

    /// `fleetq:{q}:blocks`.
    pub fn blocks(&self) -> String {
        format!("{}blocks", self.prefix)
    }

    /// `fleetq:{q}:holds`.
    pub fn holds(&self) -> String {
        format!("{}holds", self.prefix)
    }

    /// `fleetq:{q}:deadlines`.
    pub fn deadlines(&self) -> String {
        format!("{}deadlines", self.prefix)
    }

    /// `fleetq:{q}:job:<id>`.
    pub fn job(&self, job_id: &str) -> String {
        format!("{}job:{job_id}", self.prefix)
    }

    /// `fleetq:{q}:notify:<id>`.
    pub fn notify(&self, job_id: &str) -> String {
        format!("{}notify:{job_id}", self.prefix)
    }
}

/// The queue a queue name belongs to: `q` for partition `q#3`, else the name itself.
pub fn base_of(name: &str) -> &str {
    name.split_once('#').map_or(name, |(base, _)| base)
}

/// Keys of a queue or partition named as discovery finds it (`q` or `q#3`).
pub fn discovered(name: &str) -> Result<QueueKeys, crate::Error> {
    let base = QueueKeys::new(base_of(name))?;
    match name.split_once('#') {
        None => Ok(base),
        Some((_, i)) => match i.parse::<u32>() {
            Ok(n) if n.to_string() == i => Ok(base.partition(n)),
            _ => Err(crate::Error::Config(format!(
                "{name:?} is not a partition name (<queue>#<number>)"
            ))),
        },
    }
}

/// `fleetq:node:<node>`, the record of one worker host.
pub fn node(node: &str) -> String {
    format!("fleetq:node:{node}")
}

/// The node name inside a node record key, when it is one.
pub fn node_of(key: &str) -> Option<&str> {
    key.strip_prefix("fleetq:node:")
}

/// Pattern matching every node record, for listing the fleet with `SCAN`.
pub const NODE_PATTERN: &str = "fleetq:node:*";

/// Pattern matching every queue's stream key, for discovery with `SCAN`.
pub const STREAM_PATTERN: &str = "fleetq:{*}:stream";

/// The queue name inside a stream key, when it is one.
pub fn queue_of_stream(key: &str) -> Option<&str> {
    key.strip_prefix("fleetq:{")?.strip_suffix("}:stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag() {
        let k = QueueKeys::new("img").unwrap();
        assert_eq!(k.stream(), "fleetq:{img}:stream");
        assert_eq!(k.job("a1"), "fleetq:{img}:job:a1");
        assert_eq!(queue_of_stream(&k.stream()), Some("img"));
        let p = k.partition(2);
        assert_eq!(p.stream(), "fleetq:{img#2}:stream");
        assert_eq!(p.base(), k);
        assert_eq!(discovered("img#2").unwrap(), p);
        assert!(discovered("img#02").is_err() && discovered("img#x").is_err());
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "a{b", "a:b", "a b", &"x".repeat(101)] {
            assert!(QueueKeys::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
