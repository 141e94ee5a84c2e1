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
    /// Idle measuring window: two whole 10 s cycles (default `max_block` and heartbeat) in a
    /// full run; 4 s (partial cycles) in a quick one.
    pub idle_window: Duration,
    /// Open-loop arrival window of the dispatch scenario. Full 10 s, quick 3 s.
    pub dispatch_window: Duration,
    /// Jobs per drain of the cluster scenario (once with 1 partition, once with 3). Full
    /// 30 000, quick 3 000.
    pub cluster_jobs: usize,
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
            idle_window: Duration::from_secs(20),
            dispatch_window: Duration::from_secs(10),
            cluster_jobs: 30_000,
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
