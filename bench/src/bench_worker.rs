//! The worker the benchmark measures: `fleetq_worker::run` with a handler that does nothing
//! (or sleeps for `payload.sleep_ms`, for the recovery scenarios), in a process of its own.
//! It is this binary's hidden subcommand
//! `worker --redis-url … --queue … --node … --slots N`, run until SIGTERM; on exit it prints
//! `handled=<n>` (how many times its handler ran) on stdout, so the end-to-end scenario can
//! check that every job ran exactly once.
//!
//! Worker settings are the defaults (`max_block` 10 s, heartbeat 10 s, lease from the queue
//! config) except: no self-suspension (`suspend_after` 0: nothing fails here, and it keeps
//! suspension out of the picture), no `/metrics` server, and a short shutdown grace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fleetq_broker::Redis;
use fleetq_worker::{Handler, Job, JobContext, Outcome, WorkerConfig};

/// What the worker prints on stdout when it stops, before the count of handled jobs.
pub const HANDLED_PREFIX: &str = "handled=";

/// The hidden `worker` subcommand's flags.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// Redis server.
    #[arg(long)]
    pub redis_url: String,
    /// Queue to work.
    #[arg(long)]
    pub queue: String,
    /// Node name (one per process).
    #[arg(long)]
    pub node: String,
    /// Jobs at once.
    #[arg(long, default_value_t = 1)]
    pub slots: usize,
    /// Time running jobs get after SIGTERM, ms.
    #[arg(long, default_value_t = 1000)]
    pub grace_ms: u64,
}

/// Succeeds with `null` at once, or after `payload.sleep_ms` milliseconds.
#[derive(Debug, Default)]
struct BenchHandler {
    /// Calls of the handler: every attempt that ran here.
    handled: Arc<AtomicU64>,
}

impl Handler for BenchHandler {
    async fn handle(&self, job: Job, _ctx: JobContext) -> Outcome {
        self.handled.fetch_add(1, Ordering::Relaxed);
        if let Some(ms) = job
            .payload
            .get("sleep_ms")
            .and_then(serde_json::Value::as_u64)
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Outcome::Succeeded(serde_json::Value::Null)
    }
}

/// The bench worker's settings: the defaults but those of the module docs.
pub fn config(args: &WorkerArgs) -> WorkerConfig {
    let mut config = WorkerConfig::new(&args.queue, &args.node);
    config.slots = args.slots;
    config.shutdown_grace = Duration::from_millis(args.grace_ms);
    config.suspend_after = 0;
    config.metrics_addr = None;
    config
}

/// The idle cycle of a bench worker on a queue with `lease`: the time after which the
/// pattern of idle commands of the fleet repeats. A queue's two lease watchers reclaim and
/// block once per lease; every other idle worker once per `max_block`; each beats once per
/// `heartbeat`. The cycle is the least common multiple of the three (60 s with the
/// defaults; the config re-read, `config_refresh` 60 s, falls on it too).
pub fn idle_cycle(lease: Duration) -> Duration {
    let c = config(&WorkerArgs {
        redis_url: String::new(),
        queue: "idle".into(),
        node: "idle".into(),
        slots: 1,
        grace_ms: 1000,
    });
    let lcm = |a: u128, b: u128| match (a, b) {
        (0, _) | (_, 0) => a.max(b),
        _ => a / gcd(a, b) * b,
    };
    let ms = [c.max_block, lease, c.heartbeat]
        .iter()
        .map(Duration::as_millis)
        .fold(0, lcm);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Runs the worker until SIGTERM (or Ctrl-C); returns how many attempts its handler ran.
pub async fn run(args: WorkerArgs) -> anyhow::Result<u64> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install the SIGTERM handler")?;
    let redis = Redis::connect(&args.redis_url).await?;
    let config = config(&args);
    let handler = BenchHandler::default();
    let handled = handler.handled.clone();
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    fleetq_worker::run(redis, config, handler, shutdown).await?;
    Ok(handled.load(Ordering::Relaxed))
}
