//! What a Redis server has done so far — its command statistics and its CPU time — read in
//! one `INFO cpu commandstats`, and the difference of two such samples.
//!
//! One call for both keeps them consistent (the same instant), and keeps the measurement's
//! own cost down to one command per sample. That cost is still in a CPU delta (the tail of
//! the first sample and the head of the second run inside the window); [`Sample::cost`]
//! measures it so that a step measured in many short windows can take it out.

use std::time::Duration;

use anyhow::Context;
use redis::aio::ConnectionLike;

use crate::commandstats::CommandStats;

/// Commands and CPU time of one server at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sample {
    /// `INFO commandstats`.
    pub stats: CommandStats,
    /// `used_cpu_user + used_cpu_sys` of `INFO cpu`.
    pub cpu: Duration,
}

/// What the server did between two samples.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Commands executed (without the measuring `INFO`).
    pub stats: CommandStats,
    /// CPU time used.
    pub cpu: Duration,
}

impl Sample {
    /// Reads both sections in one `INFO`.
    pub async fn read<C: ConnectionLike + Send>(conn: &mut C) -> anyhow::Result<Self> {
        let text: String = redis::cmd("INFO")
            .arg("cpu")
            .arg("commandstats")
            .query_async(conn)
            .await
            .context("INFO cpu commandstats")?;
        Ok(Self {
            stats: CommandStats::parse(&text),
            cpu: cpu_of(&text)?,
        })
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Self) -> Delta {
        Delta {
            stats: self.stats.since(&earlier.stats),
            cpu: self.cpu.saturating_sub(earlier.cpu),
        }
    }

    /// The Redis CPU time one sample adds to a window: the mean over `n` samples read back
    /// to back.
    pub async fn cost<C: ConnectionLike + Send>(conn: &mut C, n: u32) -> anyhow::Result<Duration> {
        let first = Self::read(conn).await?;
        let mut last = first.clone();
        for _ in 0..n {
            last = Self::read(conn).await?;
        }
        Ok(last.since(&first).cpu / n.max(1))
    }
}

impl Delta {
    /// Adds `other` to this one.
    pub fn add(&mut self, other: &Delta) {
        self.stats.add(&other.stats);
        self.cpu += other.cpu;
    }
}

/// `used_cpu_user + used_cpu_sys` from the text of `INFO cpu`.
pub fn cpu_of(info: &str) -> anyhow::Result<Duration> {
    let secs = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("INFO cpu has no {key}; is this a Redis server?"))
    };
    Ok(Duration::from_secs_f64(
        secs("used_cpu_user:")? + secs("used_cpu_sys:")?,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn reads_cpu_and_subtracts() {
        let a = Sample {
            stats: CommandStats::parse("cmdstat_xadd:calls=2,usec=4\r\n"),
            cpu: cpu_of("used_cpu_sys:0.250000\r\nused_cpu_user:1.000000\r\n").unwrap(),
        };
        assert_eq!(a.cpu, Duration::from_millis(1250));
        let b = Sample {
            stats: CommandStats::parse("cmdstat_xadd:calls=5,usec=9\r\ncmdstat_info:calls=3\r\n"),
            cpu: Duration::from_millis(1300),
        };
        let mut d = b.since(&a);
        assert_eq!(d.cpu, Duration::from_millis(50));
        assert_eq!(d.stats.calls("xadd"), 3);
        d.add(&b.since(&a));
        assert_eq!(d.stats.calls("xadd"), 6);
        assert_eq!(d.cpu, Duration::from_millis(100));
        assert!(cpu_of("used_memory:1\r\n").is_err());
    }
}
