//! Worker settings: typed, with named defaults, validated before connecting.

use std::time::Duration;

use fleetq_broker::keys::QueueKeys;

/// Default number of jobs a worker runs at once (one per GPU is usual).
pub const DEFAULT_SLOTS: usize = 1;
/// Default time running jobs get to finish after a stop signal before they are released.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Longest an idle worker blocks in one read while another idle worker watches the queue
/// (follows its lease deadlines and retries, blocking at most a lease). Default 60 s: with the
/// heartbeat, the config refresh and the watcher's share, about 0.2 Redis commands a second
/// per idle worker, the commands inside the functions included. It also bounds how long the
/// queue may go unwatched after its watcher died or froze (the next idle worker to wake
/// takes over), and how long a dead idle node counts as alive for a job's hand-off.
pub const DEFAULT_MAX_BLOCK: Duration = Duration::from_secs(60);
/// Threads of the `fleetq-worker` binary's async runtime. Default 1: the worker only waits on
/// Redis, its children and HTTP, so one thread does it with the fewest cross-thread wake-ups
/// (measured on 2 cores, with [`run_on`]: half the worker CPU per job of one thread per core).
pub const DEFAULT_RUNTIME_THREADS: usize = 1;

/// The runtime a worker process runs on: multi-threaded with `threads` workers (at least one),
/// timers and I/O enabled. Blocking work (a handler that computes) belongs on
/// `tokio::task::spawn_blocking`, whatever the count.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
}

/// Runs `main` to its end on `runtime`'s worker threads (not on the calling thread, as
/// `Runtime::block_on` would: the read loop and the tasks it wakes then share one thread
/// instead of waking each other across two).
pub fn run_on<F>(runtime: &tokio::runtime::Runtime, main: F) -> F::Output
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime.block_on(runtime.spawn(main)) {
        Ok(out) => out,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the worker's main task was cancelled: {e}"),
    }
}

/// How often an idle worker re-reads the queue config from Redis. Default 60 s.
pub const DEFAULT_CONFIG_REFRESH: Duration = Duration::from_secs(60);
/// Failures or timeouts in a row after which a node suspends itself. Default 3.
pub const DEFAULT_SUSPEND_AFTER: u32 = 3;
/// How long a node suspends itself. Default 60 s.
pub const DEFAULT_SUSPEND_FOR: Duration = Duration::from_secs(60);
/// How often the node record is renewed (it lives 3 times this, 90 s by default; the broker
/// deletes the record of a worker whose process is gone within about a second). A renewal
/// without news is two commands (`PEXPIRE`, `HGET` of an operator's command, which therefore
/// takes effect within this long); the whole record is written at once when the busy slots
/// or the suspension change. Default 30 s.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);
/// Least time between two progress writes of one job. Default 1 s.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of one worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The queue to work. Flag `--queue`, env `FLEETQ_QUEUE`.
    pub queue: String,
    /// This host's name, stable across restarts (metrics and failover use it).
    /// Flag `--node`, env `FLEETQ_NODE`. Default: the host name.
    pub node: String,
    /// Jobs run at once. Flag `--slots`, env `FLEETQ_SLOTS`. Default [`DEFAULT_SLOTS`].
    pub slots: usize,
    /// Time running jobs get after a stop signal. Default [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
    /// Longest single blocking read of an idle worker that does not watch the queue. Default
    /// [`DEFAULT_MAX_BLOCK`]; a watcher, or a worker that holds jobs, blocks at most a lease.
    /// Flag `--max-block-ms`, env `FLEETQ_MAX_BLOCK_MS`.
    pub max_block: Duration,
    /// How often the queue config is re-read. Default [`DEFAULT_CONFIG_REFRESH`].
    pub config_refresh: Duration,
    /// Failures or timeouts in a row before this node suspends itself; 0 never.
    /// Flag `--suspend-after`, env `FLEETQ_SUSPEND_AFTER`. Default [`DEFAULT_SUSPEND_AFTER`].
    pub suspend_after: u32,
    /// How long a self-suspension lasts. Flag `--suspend-for-secs`. Default [`DEFAULT_SUSPEND_FOR`].
    pub suspend_for: Duration,
    /// Node record renewal interval; the record lives 3 times this. Default
    /// [`DEFAULT_HEARTBEAT`]. Flag `--heartbeat-secs`, env `FLEETQ_HEARTBEAT_SECS`.
    pub heartbeat: Duration,
    /// Least time between two progress writes of one job. Default [`DEFAULT_PROGRESS_INTERVAL`].
    pub progress_interval: Duration,
    /// Where to serve `/metrics`; none: not served (the binary defaults to 127.0.0.1:9101).
    /// Port 0 picks a free port; the bound address is in the node record (`metrics_addr`).
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl WorkerConfig {
    /// Settings for `queue` on `node` with the defaults.
    pub fn new(queue: impl Into<String>, node: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            node: node.into(),
            slots: DEFAULT_SLOTS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_block: DEFAULT_MAX_BLOCK,
            config_refresh: DEFAULT_CONFIG_REFRESH,
            suspend_after: DEFAULT_SUSPEND_AFTER,
            suspend_for: DEFAULT_SUSPEND_FOR,
            heartbeat: DEFAULT_HEARTBEAT,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            metrics_addr: None,
        }
    }

    /// Checks the settings; the message says which one is wrong and what to use.
    ///
    /// ```
    /// use fleetq_worker::WorkerConfig;
    ///
    /// let mut config = WorkerConfig::new("images", "gpu-07");
    /// config.slots = 4;
    /// assert!(config.validate().is_ok());
    ///
    /// config.slots = 0;
    /// let err = config.validate().unwrap_err().to_string();
    /// assert!(err.contains("slots is 0; use 1 to 1024"), "{err}");
    /// ```
    pub fn validate(&self) -> Result<(), crate::Error> {
        QueueKeys::new(&self.queue)?;
        let bad = |msg: String| Err(crate::Error::Config(msg));
        if self.node.is_empty()
            || self.node.len() > 100
            || !self
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return bad(format!(
                "node name {:?} must be 1 to 100 letters, digits, '-', '_' or '.'",
                self.node
            ));
        }
        if self.slots == 0 || self.slots > 1024 {
            return bad(format!("slots is {}; use 1 to 1024", self.slots));
        }
        if self.max_block < Duration::from_millis(10) {
            return bad("max_block must be at least 10 ms".into());
        }
        if self.heartbeat < Duration::from_millis(100) {
            return bad("heartbeat must be at least 100 ms".into());
        }
        if self.suspend_after > 0 && self.suspend_for.is_zero() {
            return bad("suspend_for must be positive when suspend_after is set".into());
        }
        Ok(())
    }
}
