//! Queue defaults, kept in Redis (`fleetq:{q}:config`) so that producers in any language and
//! every worker agree on them without sharing a config file. A job may override the timeouts
//! and `max_attempts` with fields of its own.
//!
//! Every numeric field of the hash follows the one rule of [`limits`](crate::limits) and its
//! range there ([`CONFIG_NUMBERS`]), here as in the functions: a value such as `nan`, `1.5`,
//! `inf`, `-1` or `0x10` is refused with the field, the value and the range, by
//! [`QueueConfig::from_map`] and by every function that reads the config, before it writes.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use crate::keys::QueueKeys;
use crate::limits::{self, CONFIG_NUMBERS};
use crate::{Error, Result};

/// Default lease: a dead or frozen host's job moves on after about this long.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);
/// Default number of attempts (first run included) before a job is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default delay before the first retry; doubles with each attempt.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Default cap on the retry delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Default time a finished job's hash (status, result, error) is kept.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);
/// Default cap on the events stream.
pub const DEFAULT_EVENTS_MAXLEN: u64 = 10_000;
/// Default largest payload, in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The error for config field `name` holding `value` where it must hold `expected`.
fn refused(name: &str, expected: &str, value: &str) -> Error {
    let shown: String = value.chars().take(100).collect();
    Error::Config(format!(
        "queue config field {name} must be {expected}, got {shown:?}; fix it with HSET fleetq:{{<queue>}}:config {name} <number>"
    ))
}

/// The defaults of one queue. Every field maps to a field of the config hash
/// (`lease_ms`, `max_attempts`, …) with the same name, times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// `lease_ms`: how long a worker may go without renewing before its jobs are reclaimed.
    /// Default [`DEFAULT_LEASE`].
    pub lease: Duration,
    /// `max_attempts`. Default [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    /// `backoff_base_ms`. Default [`DEFAULT_BACKOFF_BASE`].
    pub backoff_base: Duration,
    /// `backoff_max_ms`. Default [`DEFAULT_BACKOFF_MAX`].
    pub backoff_max: Duration,
    /// `queue_timeout_ms`: a job not started within it expires. Default none.
    pub queue_timeout: Option<Duration>,
    /// `start_timeout_ms`: taken but not started within it. Default none.
    pub start_timeout: Option<Duration>,
    /// `progress_timeout_ms`: no progress event for this long. Default none.
    pub progress_timeout: Option<Duration>,
    /// `run_timeout_ms`: cap on one attempt's run time. Default none.
    pub run_timeout: Option<Duration>,
    /// `retention_ms`: how long a finished job's hash is kept. Default [`DEFAULT_RETENTION`].
    pub retention: Duration,
    /// `events_maxlen`: approximate cap of the events stream; 0 turns events off.
    /// Default [`DEFAULT_EVENTS_MAXLEN`].
    pub events_maxlen: u64,
    /// `max_payload_bytes`. Default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub max_payload_bytes: usize,
    /// `routine_events` (0 or 1): also write the events every job goes through (`queued`,
    /// `taken`, `started`, `succeeded`) for every job, not only for the jobs someone watches.
    /// Default off: those four cost a write per job each, and `wait`/`watch` do not need them.
    pub routine_events: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            queue_timeout: None,
            start_timeout: None,
            progress_timeout: None,
            run_timeout: None,
            retention: DEFAULT_RETENTION,
            events_maxlen: DEFAULT_EVENTS_MAXLEN,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            routine_events: false,
        }
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl QueueConfig {
    /// Reads the queue's config hash; absent fields take their defaults.
    pub async fn load<C: AsyncCommands>(conn: &mut C, keys: &QueueKeys) -> Result<Self> {
        let raw: HashMap<String, Vec<u8>> = conn
            .hgetall(keys.config())
            .await
            .map_err(|e| Error::redis("read queue config", e))?;
        // Bytes that are not UTF-8 become U+FFFD, which no number holds: refused by name.
        let map = raw
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        Self::from_map(&map)
    }

    /// Parses config hash fields; a value that is not a whole number of its field's range
    /// (every field of [`CONFIG_NUMBERS`], those this type does not hold too) is an error
    /// naming the field, the value and the range. Fields of no meaning here are ignored.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self> {
        let mut nums: HashMap<&str, u64> = HashMap::new();
        for field in CONFIG_NUMBERS {
            if let Some(v) = map.get(field.name) {
                let n = limits::whole(v.as_bytes(), field.range())
                    .ok_or_else(|| refused(field.name, &field.expected(), v))?;
                nums.insert(field.name, n);
            }
        }
        let num = |name: &str| nums.get(name).copied();
        let dur = |name: &str| num(name).filter(|v| *v > 0).map(Duration::from_millis);
        let mut c = Self::default();
        if let Some(v) = dur("lease_ms") {
            c.lease = v;
        }
        if let Some(v) = num("max_attempts") {
            // In range (at most 1000000), so it fits.
            c.max_attempts = v.max(1) as u32;
        }
        if let Some(v) = dur("backoff_base_ms") {
            c.backoff_base = v;
        }
        if let Some(v) = dur("backoff_max_ms") {
            c.backoff_max = v;
        }
        c.queue_timeout = dur("queue_timeout_ms");
        c.start_timeout = dur("start_timeout_ms");
        c.progress_timeout = dur("progress_timeout_ms");
        c.run_timeout = dur("run_timeout_ms");
        if let Some(v) = dur("retention_ms") {
            c.retention = v;
        }
        c.routine_events = num("routine_events") == Some(1);
        if let Some(v) = num("events_maxlen") {
            c.events_maxlen = v;
        }
        if let Some(v) = num("max_payload_bytes") {
            // In range (at most 512 MiB), so it fits.
            c.max_payload_bytes = v as usize;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every value lies in its field's range and the values make sense together.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in self.to_fields() {
            let field = limits::config_field(name);
            if limits::whole(v.as_bytes(), field.range()).is_none() {
                return Err(refused(name, &field.expected(), &v));
            }
        }
        if self.backoff_max < self.backoff_base {
            return Err(Error::Config(
                "backoff_max_ms is below backoff_base_ms; raise backoff_max_ms".into(),
            ));
        }
        Ok(())
    }

    /// The hash fields for this config (all of them), for `HSET`.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let opt = |d: Option<Duration>| d.map_or("0".to_owned(), ms);
        vec![
            ("lease_ms", ms(self.lease)),
            ("max_attempts", self.max_attempts.to_string()),
            ("backoff_base_ms", ms(self.backoff_base)),
            ("backoff_max_ms", ms(self.backoff_max)),
            ("queue_timeout_ms", opt(self.queue_timeout)),
            ("start_timeout_ms", opt(self.start_timeout)),
            ("progress_timeout_ms", opt(self.progress_timeout)),
            ("run_timeout_ms", opt(self.run_timeout)),
            ("retention_ms", ms(self.retention)),
            ("events_maxlen", self.events_maxlen.to_string()),
            ("max_payload_bytes", self.max_payload_bytes.to_string()),
            ("routine_events", u8::from(self.routine_events).to_string()),
        ]
    }

    /// Writes this config to the queue's hash (all fields).
    pub async fn store<C: AsyncCommands>(&self, conn: &mut C, keys: &QueueKeys) -> Result<()> {
        self.validate()?;
        let _: () = conn
            .hset_multiple(keys.config(), &self.to_fields())
            .await
            .map_err(|e| Error::redis("write queue config", e))?;
        Ok(())
    }

    /// Retry delay after attempt `attempt` (1-based): base × 2^(attempt-1), capped, with up to
    /// ±25 % jitter taken from `jitter` in [0, 1) so that retries of a burst spread out.
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.backoff_max);
        capped.mul_f64(0.75 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let c = QueueConfig {
            lease: Duration::from_secs(2),
            queue_timeout: Some(Duration::from_secs(5)),
            ..QueueConfig::default()
        };
        let map = c
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(QueueConfig::from_map(&map).unwrap(), c);
        assert_eq!(
            QueueConfig::from_map(&HashMap::new()).unwrap(),
            QueueConfig::default()
        );
    }

    #[test]
    fn nonsense_is_refused_with_the_field_name() {
        let map = HashMap::from([("lease_ms".to_owned(), "ten".to_owned())]);
        let err = QueueConfig::from_map(&map).unwrap_err().to_string();
        assert!(err.contains("lease_ms"), "{err}");
        let map = HashMap::from([("lease_ms".to_owned(), "10".to_owned())]);
        assert!(QueueConfig::from_map(&map).is_err());
    }

    #[test]
    fn only_whole_numbers_of_each_fields_range_pass() {
        for (name, bad) in [
            ("retention_ms", "nan"),
            ("events_maxlen", "1.5"),
            ("events_maxlen", "inf"),
            ("run_timeout_ms", "-1"),
            ("queue_timeout_ms", "18446744073709551615"),
            ("max_attempts", "0x10"),
            ("lease_ms", " 2000"),
            ("max_payload_bytes", "0"),
            // Not fields of this type, but of the hash: refused alike, as the functions do.
            ("poison_nodes", "-1"),
            ("failover_cooldown_ms", "1e3"),
            ("partitions", "65"),
        ] {
            let map = HashMap::from([(name.to_owned(), bad.to_owned())]);
            let err = QueueConfig::from_map(&map).unwrap_err().to_string();
            let f = limits::config_field(name);
            assert!(
                err.contains(name) && err.contains(bad) && err.contains(&f.expected()),
                "{err}"
            );
        }
        let map = HashMap::from([("poison_nodes".to_owned(), "0".to_owned())]);
        assert!(QueueConfig::from_map(&map).is_ok());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let c = QueueConfig::default();
        assert_eq!(c.backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(c.backoff(3, 0.5), Duration::from_secs(4));
        assert_eq!(c.backoff(30, 0.5), Duration::from_secs(60));
        assert!(c.backoff(2, 0.0) < c.backoff(2, 0.99));
    }
}
