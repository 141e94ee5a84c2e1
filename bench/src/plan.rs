//! The sizes and windows of a run: the full benchmark, and `--quick` (the same scenarios with
//! small counts and short windows, for CI, so that the benchmark does not rot).

use std::time::Duration;

/// Bytes of every job payload (a JSON text).
pub const PAYLOAD_BYTES: usize = 200;
/// Jobs per `enqueue_batch` call (one pipelined round trip).
pub const BATCH_SIZE: usize = 500;
/// Slots of the worker in the end-to-end and dispatch scenarios.
pub const WORKER_SLOTS: usize = 8;
/// Entries per `XREADGROUP` in the floor: the most the 8-slot worker can ever read at once.
pub const FLOOR_READ_COUNT: usize = WORKER_SLOTS;
/// Open-loop arrival rate of the dispatch scenario, jobs per second.
pub const DISPATCH_RATE: u32 = 200;
/// Wait after the idle workers' node records exist, before the idle window opens.
pub const IDLE_SETTLE: Duration = Duration::from_secs(2);
/// The full run's idle window is the fewest whole idle cycles of a bench worker (see
/// [`crate::bench_worker::idle_cycle`]) that last at least this long.
pub const IDLE_MIN_WINDOW: Duration = Duration::from_secs(20);
/// Most payload bytes per `enqueue_batch` call (and per pipeline of the floor's `XADD`s):
/// big payloads go in smaller batches, so that neither side holds hundreds of MB at once.
pub const ENQUEUE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Slot counts of the drain-by-slots scenario.
pub const DRAIN_SLOTS: [usize; 3] = [1, 8, 64];
/// Worker processes of the cluster scenario: one per primary, so that with 3 partitions
/// every primary has readers, and few enough that on 2 cores they leave Redis room.
pub const CLUSTER_WORKERS: usize = 3;
/// Slots of each worker process in the cluster scenario (as in the end-to-end one).
pub const CLUSTER_WORKER_SLOTS: usize = WORKER_SLOTS;
/// How long the job that a recovery scenario strands runs (longer than the whole scenario).
pub const RECOVERY_JOB: Duration = Duration::from_secs(120);

/// Counts and windows of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// True for `--quick`.
    pub quick: bool,
    /// Jobs enqueued one at a time (`Producer::enqueue_json` in a loop). Full 10 000, quick 2 000.
    pub enqueue_single_jobs: usize,
    /// Jobs enqueued with `Producer::enqueue_batch`. Full 50 000, quick 10 000.
    pub enqueue_batch_jobs: usize,
    /// Jobs enqueued with `enqueue_batch` into a queue whose group has never delivered (the
    /// slow position path). Full 3 000, quick 1 000.
    pub enqueue_cold_jobs: usize,
    /// Jobs through one worker, and through the floor loop. Full 50 000, quick 5 000.
    pub e2e_jobs: usize,
    /// Waiting jobs for the memory figure. Full 100 000, quick 10 000.
    pub memory_jobs: usize,
    /// Idle worker processes. Full 20, quick 5.
    pub idle_workers: usize,
    /// Idle measuring window: in a full run the fewest whole idle cycles of a bench worker
    /// that last [`IDLE_MIN_WINDOW`] (two 10 s cycles with the default `max_block`,
    /// heartbeat and lease; one if the cycle grows to 30 s); 4 s (partial cycles) in a
    /// quick one.
    pub idle_window: Duration,
    /// Open-loop arrival window of the dispatch scenario. Full 10 s, quick 3 s.
    pub dispatch_window: Duration,
    /// Jobs per drain of the cluster scenario (once with 1 partition, once with 3). Full
    /// 30 000, quick 3 000.
    pub cluster_jobs: usize,
    /// Jobs driven through the steps one by one (the by-step breakdown). Full 20 000,
    /// quick 2 000.
    pub by_step_jobs: usize,
    /// Payload sizes of the payload sweep beyond the 200-byte one (which is the end-to-end
    /// run), with their job counts: full 10 000 B × 5 000 and 1 000 000 B × 200, quick
    /// 10 000 B × 500 and 1 000 000 B × 30.
    pub payload_sweep: Vec<(usize, usize)>,
    /// Rounds of each bigger size of the payload sweep (an end-to-end run and a floor run
    /// each; the median round by its cost over the floor is reported): full 3, quick 1. A
    /// big payload's cost is mostly its copy, which moves between runs by more than what
    /// fleetq adds to it.
    pub payload_rounds: usize,
    /// Jobs per drain of the drain-by-slots scenario (once per entry of [`DRAIN_SLOTS`]).
    /// Full 10 000, quick 1 000.
    pub slots_jobs: usize,
}

impl Plan {
    /// The full benchmark.
    pub fn full() -> Self {
        Self {
            quick: false,
            enqueue_single_jobs: 10_000,
            enqueue_batch_jobs: 50_000,
            enqueue_cold_jobs: 3_000,
            e2e_jobs: 50_000,
            memory_jobs: 100_000,
            idle_workers: 20,
            idle_window: whole_cycles(
                crate::bench_worker::idle_cycle(crate::server::queue_config().lease),
                IDLE_MIN_WINDOW,
            ),
            dispatch_window: Duration::from_secs(10),
            cluster_jobs: 30_000,
            by_step_jobs: 20_000,
            payload_sweep: vec![(10_000, 5_000), (1_000_000, 200)],
            payload_rounds: 3,
            slots_jobs: 10_000,
        }
    }

    /// The quick run for CI: well under a minute on 2 cores.
    pub fn quick() -> Self {
        Self {
            quick: true,
            enqueue_single_jobs: 2_000,
            enqueue_batch_jobs: 10_000,
            enqueue_cold_jobs: 1_000,
            e2e_jobs: 5_000,
            memory_jobs: 10_000,
            idle_workers: 5,
            idle_window: Duration::from_secs(4),
            dispatch_window: Duration::from_secs(3),
            cluster_jobs: 3_000,
            by_step_jobs: 2_000,
            payload_sweep: vec![(10_000, 500), (1_000_000, 30)],
            payload_rounds: 1,
            slots_jobs: 1_000,
        }
    }

    /// [`Plan::quick`] when `quick`, else [`Plan::full`].
    pub fn new(quick: bool) -> Self {
        if quick {
            Self::quick()
        } else {
            Self::full()
        }
    }
}

/// Jobs per `enqueue_batch` call for payloads of `payload_bytes`: [`BATCH_SIZE`], fewer when
/// that many would exceed [`ENQUEUE_BATCH_BYTES`], at least 1.
pub fn enqueue_batch(payload_bytes: usize) -> usize {
    (ENQUEUE_BATCH_BYTES / payload_bytes.max(1)).clamp(1, BATCH_SIZE)
}

/// The fewest whole `cycle`s that last at least `at_least` (one cycle when `cycle` is 0).
pub fn whole_cycles(cycle: Duration, at_least: Duration) -> Duration {
    if cycle.is_zero() {
        return at_least;
    }
    let n = at_least.as_nanos().div_ceil(cycle.as_nanos()).max(1);
    cycle * u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_whole_cycles() {
        let s = Duration::from_secs;
        assert_eq!(whole_cycles(s(10), s(20)), s(20));
        assert_eq!(whole_cycles(s(30), s(20)), s(30));
        assert_eq!(whole_cycles(s(15), s(20)), s(30));
        assert_eq!(whole_cycles(s(7), s(20)), s(21));
    }

    #[test]
    fn big_payloads_go_in_small_batches() {
        assert_eq!(enqueue_batch(200), BATCH_SIZE);
        assert_eq!(enqueue_batch(10_000), 419);
        assert_eq!(enqueue_batch(1_000_000), 4);
        assert_eq!(enqueue_batch(100_000_000), 1);
    }

    #[test]
    fn the_full_idle_window_is_whole_cycles() {
        let cycle = crate::bench_worker::idle_cycle(crate::server::queue_config().lease);
        let w = Plan::full().idle_window;
        assert!(w >= IDLE_MIN_WINDOW);
        assert_eq!(w.as_nanos() % cycle.as_nanos(), 0, "{w:?} of {cycle:?}");
    }
}
