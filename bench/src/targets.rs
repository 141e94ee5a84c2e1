//! The targets of a run and whether it met each. Targets are not assertions: a missed target
//! is reported (table and JSON), never an exit failure.

use serde::Serialize;

use crate::report::Report;

/// Target: every command Redis executes per job end to end (server count, inside functions
/// included), at most.
pub const TARGET_SERVER_CMDS_PER_JOB: f64 = 8.0;
/// Target: client commands (round trips) per job, at most.
pub const TARGET_CLIENT_CMDS_PER_JOB: f64 = 3.0;
/// Target: Redis CPU per job end to end (enqueue and drain), µs, at most.
pub const TARGET_REDIS_CPU_US_PER_JOB: f64 = 20.0;
/// Target: end-to-end throughput as a share of the floor, at least.
pub const TARGET_E2E_OF_FLOOR: f64 = 0.5;
/// Target: the biggest payload's Redis CPU per job beyond its floor, as a multiple of the
/// 200-byte payload's beyond its floor, at most (fleetq must not copy payloads around).
pub const TARGET_BIG_PAYLOAD_OVER_SMALL: f64 = 2.0;
/// Target: Redis bytes per waiting job above the payload size, at most.
pub const TARGET_BYTES_OVER_PAYLOAD: f64 = 100.0;
/// Target: commands per idle worker per second (server count), at most.
pub const TARGET_IDLE_CMDS_PER_SEC: f64 = 0.3;
/// Target: 99th percentile of enqueue → start with idle slots, ms, at most.
pub const TARGET_DISPATCH_P99_MS: f64 = 1.0;
/// Target: recovery after a host freezes, beyond the lease, seconds, at most.
pub const TARGET_RECOVERY_OVER_LEASE_S: f64 = 1.0;
/// Target: recovery after a worker process is killed, seconds, at most (its connections close,
/// so the broker need not wait for the lease).
pub const TARGET_RECOVERY_KILL_S: f64 = 1.5;
/// Target: with 3 partitions on 3 primaries, the busiest primary's share of the Redis CPU
/// of the drain, less than (with 1 partition it is about 1.0).
pub const TARGET_BUSIEST_PRIMARY_SHARE: f64 = 0.6;

/// What a target is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// [`TARGET_SERVER_CMDS_PER_JOB`].
    ServerCmds,
    /// [`TARGET_CLIENT_CMDS_PER_JOB`].
    ClientCmds,
    /// [`TARGET_REDIS_CPU_US_PER_JOB`].
    RedisCpu,
    /// [`TARGET_E2E_OF_FLOOR`].
    E2eOfFloor,
    /// [`TARGET_BIG_PAYLOAD_OVER_SMALL`].
    BigPayload,
    /// [`TARGET_BYTES_OVER_PAYLOAD`].
    Bytes,
    /// [`TARGET_IDLE_CMDS_PER_SEC`].
    Idle,
    /// [`TARGET_DISPATCH_P99_MS`].
    Dispatch,
    /// [`TARGET_RECOVERY_KILL_S`].
    RecoveryKill,
    /// [`TARGET_RECOVERY_OVER_LEASE_S`].
    RecoveryHang,
    /// [`TARGET_BUSIEST_PRIMARY_SHARE`].
    ClusterShare,
}

/// One target and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetCheck {
    /// Which target.
    pub goal: Goal,
    /// What is checked.
    pub figure: String,
    /// The measured value, as shown.
    pub measured: String,
    /// The target, as shown.
    pub target: String,
    /// True when met.
    pub pass: bool,
}

/// The targets, each with the run's value, in the order of the table.
pub fn check(r: &Report) -> Vec<TargetCheck> {
    let t = |goal: Goal, figure: &str, measured: String, target: String, pass: bool| TargetCheck {
        goal,
        figure: figure.to_owned(),
        measured,
        target,
        pass,
    };
    let bytes_limit = r.memory.payload_bytes as f64 + TARGET_BYTES_OVER_PAYLOAD;
    let recovery_limit = r.recovery.lease_s + TARGET_RECOVERY_OVER_LEASE_S;
    let big = big_payload(r);
    vec![
        t(
            Goal::ServerCmds,
            "Redis commands per job (server count)",
            format!("{:.2}", r.e2e.cmds_per_job),
            format!("≤ {TARGET_SERVER_CMDS_PER_JOB:.0}"),
            r.e2e.cmds_per_job <= TARGET_SERVER_CMDS_PER_JOB,
        ),
        t(
            Goal::ClientCmds,
            "Redis commands per job (client count)",
            format!("{:.2}", r.e2e.client_cmds_per_job),
            format!("≤ {TARGET_CLIENT_CMDS_PER_JOB:.1}"),
            r.e2e.client_cmds_per_job <= TARGET_CLIENT_CMDS_PER_JOB,
        ),
        t(
            Goal::RedisCpu,
            "Redis CPU per job, end to end",
            format!("{:.1} µs", r.e2e.redis_cpu_us_per_job),
            format!("≤ {TARGET_REDIS_CPU_US_PER_JOB:.0} µs"),
            r.e2e.redis_cpu_us_per_job <= TARGET_REDIS_CPU_US_PER_JOB,
        ),
        t(
            Goal::E2eOfFloor,
            "e2e / floor",
            format!("{:.2}", r.e2e_of_floor()),
            format!("≥ {TARGET_E2E_OF_FLOOR:.2}"),
            r.e2e_of_floor() >= TARGET_E2E_OF_FLOOR,
        ),
        t(
            Goal::BigPayload,
            "biggest payload's Redis CPU per job less its floor, over the 200 B one's",
            big.map_or("not measured".into(), |b| b.shown()),
            format!("≤ {TARGET_BIG_PAYLOAD_OVER_SMALL:.0} ×"),
            big.is_some_and(|b| b.pass()),
        ),
        t(
            Goal::Bytes,
            "Redis bytes per waiting job",
            format!("{:.0}", r.memory.bytes_per_job),
            format!("≤ {bytes_limit:.0} (payload + {TARGET_BYTES_OVER_PAYLOAD:.0})"),
            r.memory.bytes_per_job <= bytes_limit,
        ),
        t(
            Goal::Idle,
            "idle commands per worker per s (server count)",
            format!("{:.2}", r.idle.cmds_per_worker_per_sec),
            format!("≤ {TARGET_IDLE_CMDS_PER_SEC:.1}"),
            r.idle.cmds_per_worker_per_sec <= TARGET_IDLE_CMDS_PER_SEC,
        ),
        t(
            Goal::Dispatch,
            "dispatch p99 (Redis clock)",
            format!("{:.0} ms", r.dispatch.p99_ms),
            format!("≤ {TARGET_DISPATCH_P99_MS:.0} ms"),
            r.dispatch.p99_ms <= TARGET_DISPATCH_P99_MS,
        ),
        t(
            Goal::RecoveryKill,
            "recovery after SIGKILL",
            format!("{:.2} s", r.recovery.kill_s),
            format!("≤ {TARGET_RECOVERY_KILL_S} s"),
            r.recovery.kill_s <= TARGET_RECOVERY_KILL_S,
        ),
        t(
            Goal::RecoveryHang,
            "recovery after SIGSTOP",
            format!("{:.2} s", r.recovery.hang_s),
            format!("≤ {recovery_limit:.0} s (lease + 1)"),
            r.recovery.hang_s <= recovery_limit,
        ),
        t(
            Goal::ClusterShare,
            "cluster, 3 partitions: busiest primary's share of Redis CPU",
            format!("{:.2}", r.split_busiest_share()),
            format!("< {TARGET_BUSIEST_PRIMARY_SHARE:.1}"),
            r.split_busiest_share() < TARGET_BUSIEST_PRIMARY_SHARE,
        ),
    ]
}

/// The payload sweep's two ends, each as Redis CPU per job beyond its floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BigPayload {
    /// Bytes of the smallest payload.
    pub small_bytes: usize,
    /// Its Redis CPU per job less its floor's, µs.
    pub small_over_floor_us: f64,
    /// Bytes of the biggest payload.
    pub big_bytes: usize,
    /// Its Redis CPU per job less its floor's, µs.
    pub big_over_floor_us: f64,
}

impl BigPayload {
    /// `big / small` (infinite when the small one is not above its floor).
    pub fn ratio(&self) -> f64 {
        if self.small_over_floor_us > 0.0 {
            self.big_over_floor_us / self.small_over_floor_us
        } else {
            f64::INFINITY
        }
    }

    /// Met: the big one is within [`TARGET_BIG_PAYLOAD_OVER_SMALL`] times the small one.
    pub fn pass(&self) -> bool {
        self.big_over_floor_us <= TARGET_BIG_PAYLOAD_OVER_SMALL * self.small_over_floor_us
    }

    fn shown(&self) -> String {
        format!(
            "{:.2} × ({:.1} µs at {} B / {:.1} µs at {} B)",
            self.ratio(),
            self.big_over_floor_us,
            self.big_bytes,
            self.small_over_floor_us,
            self.small_bytes
        )
    }
}

/// The sweep's ends, when it has two.
pub fn big_payload(r: &Report) -> Option<BigPayload> {
    let (small, big) = r.payload_sweep.ends()?;
    (big.payload_bytes > small.payload_bytes).then(|| BigPayload {
        small_bytes: small.payload_bytes,
        small_over_floor_us: small.over_floor_us(),
        big_bytes: big.payload_bytes,
        big_over_floor_us: big.over_floor_us(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_payload_is_judged_beyond_the_floor() {
        let b = BigPayload {
            small_bytes: 200,
            small_over_floor_us: 10.0,
            big_bytes: 1_000_000,
            big_over_floor_us: 20.0,
        };
        assert!(b.pass());
        assert_eq!(b.ratio(), 2.0);
        let worse = BigPayload {
            big_over_floor_us: 20.5,
            ..b
        };
        assert!(!worse.pass());
        let flat = BigPayload {
            small_over_floor_us: 0.0,
            ..b
        };
        assert!(!flat.pass());
        assert!(flat.ratio().is_infinite());
    }
}
