//! `fleetq-chaos`: a chaos run against real redis-server, fleetq-broker and fleetq-worker
//! processes. Prints the checker's table (or JSON) and exits 1 when a check fails.
//!
//! Example: fleetq-chaos --jobs 5000 --workers 6 --slots 2 --lease-ms 2000 --duration-secs 180

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use fleetq_tests::chaos::{self, ChaosConfig, FaultKind};

/// Run the fleetq chaos suite once.
#[derive(Debug, Parser)]
struct Args {
    /// Jobs enqueued over the run.
    #[arg(long, default_value_t = 300)]
    jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 2)]
    slots: usize,
    /// The queue's lease, ms (pauses last 1.5 × this).
    #[arg(long, default_value_t = 2000)]
    lease_ms: u64,
    /// Seconds of enqueueing and faults (the drain comes after).
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Seed of job lengths and the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fault kinds: worker-kill, worker-pause, redis-kill, redis-pause, worker-partition;
    /// "none" for none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "worker-kill,worker-pause,redis-kill,redis-pause,worker-partition"
    )]
    faults: Vec<String>,
    /// The queue's max attempts.
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    /// Seconds the drain may take after the run.
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn config(args: &Args) -> anyhow::Result<ChaosConfig> {
    let exe = std::env::current_exe()?;
    let child = exe.with_file_name("fleetq-chaos-child");
    let mut cfg = ChaosConfig::short(child);
    cfg.jobs = args.jobs;
    cfg.workers = args.workers;
    cfg.slots = args.slots;
    cfg.lease = Duration::from_millis(args.lease_ms);
    cfg.duration = Duration::from_secs(args.duration_secs);
    cfg.seed = args.seed;
    cfg.max_attempts = args.max_attempts;
    cfg.drain_timeout = Duration::from_secs(args.drain_secs);
    cfg.faults = args
        .faults
        .iter()
        .filter(|f| f.as_str() != "none")
        .map(|f| FaultKind::from_name(f).with_context(|| format!("unknown fault kind {f:?}")))
        .collect::<anyhow::Result<_>>()?;
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    let args = Args::parse();
    let report = chaos::run(config(&args)?).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if report.passed() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
