//! Queue defaults, kept in Redis (`fleetq:{q}:config`) so that producers in any language and
//! every worker agree on them without sharing a config file. A job may override the timeouts
//! and `max_attempts` with fields of its own.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use crate::keys::QueueKeys;
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
        }
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl QueueConfig {
    /// Reads the queue's config hash; absent fields take their defaults.
    pub async fn load<C: AsyncCommands>(conn: &mut C, keys: &QueueKeys) -> Result<Self> {
        let map: HashMap<String, String> = conn
            .hgetall(keys.config())
            .await
            .map_err(|e| Error::redis("read queue config", e))?;
        Self::from_map(&map)
    }

    /// Parses config hash fields; an unparsable value is an error naming the field.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self> {
        let mut c = Self::default();
        let num = |name: &str| -> Result<Option<u64>> {
            match map.get(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| {
                    Error::Config(format!(
                        "queue config field {name} must be a whole number, got {v:?}; fix it with HSET"
                    ))
                }),
            }
        };
        let dur = |name: &str| -> Result<Option<Duration>> {
            Ok(num(name)?.filter(|v| *v > 0).map(Duration::from_millis))
        };
        if let Some(v) = dur("lease_ms")? {
            c.lease = v;
        }
        if let Some(v) = num("max_attempts")? {
            c.max_attempts = u32::try_from(v.max(1)).unwrap_or(u32::MAX);
        }
        if let Some(v) = dur("backoff_base_ms")? {
            c.backoff_base = v;
        }
        if let Some(v) = dur("backoff_max_ms")? {
            c.backoff_max = v;
        }
        c.queue_timeout = dur("queue_timeout_ms")?;
        c.start_timeout = dur("start_timeout_ms")?;
        c.progress_timeout = dur("progress_timeout_ms")?;
        c.run_timeout = dur("run_timeout_ms")?;
        if let Some(v) = dur("retention_ms")? {
            c.retention = v;
        }
        if let Some(v) = num("events_maxlen")? {
            c.events_maxlen = v;
        }
        if let Some(v) = num("max_payload_bytes")? {
            c.max_payload_bytes = usize::try_from(v).unwrap_or(usize::MAX);
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values make sense together.
    pub fn validate(&self) -> Result<()> {
        if self.lease < Duration::from_millis(300) {
            return Err(Error::Config(format!(
                "lease_ms is {} ms; use at least 300 ms so renewals (every lease/3) keep up",
                self.lease.as_millis()
            )));
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
    fn backoff_grows_and_is_capped() {
        let c = QueueConfig::default();
        assert_eq!(c.backoff(1, 0.5), Duration::from_secs(1));
        assert_eq!(c.backoff(3, 0.5), Duration::from_secs(4));
        assert_eq!(c.backoff(30, 0.5), Duration::from_secs(60));
        assert!(c.backoff(2, 0.0) < c.backoff(2, 0.99));
    }
}
