//! `fleetq-bench`: runs the benchmark against its own `redis-server` and prints a table, then
//! one JSON object on the last line. `--quick` runs the same scenarios small (for CI);
//! `--json-only` prints only the JSON. Exits 1 when a job did not succeed exactly once (or a
//! scenario could not run); a missed target is reported, not an exit code.
//!
//! The hidden `worker` subcommand is the worker process the benchmark starts (this binary
//! re-executed): see `fleetq_bench::bench_worker`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fleetq_bench::bench_worker::{self, WorkerArgs, HANDLED_PREFIX};
use fleetq_bench::Options;

/// fleetq benchmarks: cost per job, idle cost, dispatch latency, recovery time, against the
/// Redis floor. Needs `redis-server` on the PATH.
#[derive(Debug, Parser)]
#[command(name = "fleetq-bench", version)]
struct Cli {
    /// Same scenarios, small counts and short windows (well under a minute).
    #[arg(long)]
    quick: bool,
    /// Print only the JSON object.
    #[arg(long)]
    json_only: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A bench worker process (started by the benchmark itself).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_filter = if cli.command.is_some() {
        "warn"
    } else {
        "fleetq_bench=info,warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // A worker process runs on the runtime `fleetq-worker` uses; the harness on one thread per
    // core.
    let runtime = match &cli.command {
        Some(Command::Worker(_)) => {
            fleetq_worker::config::runtime(fleetq_worker::config::DEFAULT_RUNTIME_THREADS)
        }
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetq-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    fleetq_worker::config::run_on(&runtime, async move {
        match cli.command {
            Some(Command::Worker(args)) => match bench_worker::run(args).await {
                Ok(handled) => {
                    println!("{HANDLED_PREFIX}{handled}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fleetq-bench worker: {e:#}");
                    ExitCode::FAILURE
                }
            },
            None => bench(cli.quick, cli.json_only).await,
        }
    })
}

async fn bench(quick: bool, json_only: bool) -> ExitCode {
    let worker_exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fleetq-bench: cannot find its own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = match fleetq_bench::run(&Options { quick, worker_exe }).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleetq-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !json_only {
        println!("{}", report.table());
        println!("{}", report.commands_table());
        println!(
            "{} run, {:.0} s in all; each scenario on its own redis-server",
            if report.quick { "quick" } else { "full" },
            report.seconds
        );
    }
    println!("{}", report.to_json());
    let problems = report.problems();
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "fleetq-bench: correctness check failed: {}",
            problems.join("; ")
        );
        ExitCode::FAILURE
    }
}
