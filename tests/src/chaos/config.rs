//! What a chaos run does.

use std::path::PathBuf;
use std::time::Duration;

/// A kind of fault the nemesis may inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` a worker, then start it again under the same node name.
    WorkerKill,
    /// SIGSTOP a worker for longer than the lease, then SIGCONT.
    WorkerPause,
    /// `kill -9` redis-server, then restart it from its AOF on the same port.
    RedisKill,
    /// SIGSTOP redis-server for longer than the lease, then SIGCONT.
    RedisPause,
    /// Cut one worker's connections to Redis (its own TCP proxy) for longer than the lease.
    WorkerPartition,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 5] = [
        Self::WorkerKill,
        Self::WorkerPause,
        Self::RedisKill,
        Self::RedisPause,
        Self::WorkerPartition,
    ];

    /// Parses `worker-kill`, `worker-pause`, `redis-kill`, `redis-pause`, `worker-partition`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind's name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::WorkerKill => "worker-kill",
            Self::WorkerPause => "worker-pause",
            Self::RedisKill => "redis-kill",
            Self::RedisPause => "redis-pause",
            Self::WorkerPartition => "worker-partition",
        }
    }
}

/// Settings of one chaos run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Jobs enqueued, spread evenly over `duration`.
    pub jobs: usize,
    /// Worker processes.
    pub workers: usize,
    /// Slots (child processes) per worker.
    pub slots: usize,
    /// The queue's lease; pauses last 1.5 × this.
    pub lease: Duration,
    /// How long jobs are enqueued and faults injected; the drain comes after.
    pub duration: Duration,
    /// Seeds job lengths and the fault schedule.
    pub seed: u64,
    /// Fault kinds the nemesis draws from; empty: no faults.
    pub faults: Vec<FaultKind>,
    /// The queue's max attempts (high, so that faults do not exhaust it).
    pub max_attempts: u32,
    /// Shortest and longest job run time, ms.
    pub job_ms: (u64, u64),
    /// How long the drain may take after `duration` before jobs count as lost.
    pub drain_timeout: Duration,
    /// The child binary (`fleetq-chaos-child`).
    pub child: PathBuf,
}

impl ChaosConfig {
    /// Defaults of the short run: 300 jobs, 4 workers × 2 slots, lease 2 s, 20 s of every
    /// fault, 10 attempts, jobs of 50–300 ms, 60 s drain.
    pub fn short(child: PathBuf) -> Self {
        Self {
            jobs: 300,
            workers: 4,
            slots: 2,
            lease: Duration::from_secs(2),
            duration: Duration::from_secs(20),
            seed: 1,
            faults: FaultKind::ALL.to_vec(),
            max_attempts: 10,
            job_ms: (50, 300),
            drain_timeout: Duration::from_secs(60),
            child,
        }
    }
}
