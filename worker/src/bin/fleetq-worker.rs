//! `fleetq-worker`: runs jobs from one queue on this host. Parses flags, sets up logging and
//! calls `fleetq_worker::run` until SIGTERM or Ctrl-C.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use fleetq_broker::flags::CommonFlags;
use fleetq_broker::shutdown::Shutdown;
use fleetq_worker::config::{
    DEFAULT_HEARTBEAT, DEFAULT_MAX_BLOCK, DEFAULT_SHUTDOWN_GRACE, DEFAULT_SLOTS,
    DEFAULT_SUSPEND_AFTER, DEFAULT_SUSPEND_FOR,
};
use fleetq_worker::executor::{
    Echo, Executor, HttpConfig, HttpExecutor, HttpMode, ProcessConfig, ProcessExecutor,
};
use fleetq_worker::WorkerConfig;

/// What runs the jobs (the `--executor` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ExecutorKind {
    /// Answer each job with its payload (smoke tests).
    Echo,
    /// Long-lived child processes speaking JSON lines (--command).
    Process,
    /// A local ComfyUI server (--url http://127.0.0.1:8188).
    Comfyui,
    /// A local server taking the payload as a JSON POST (--url http://127.0.0.1:9000/run).
    Http,
}

/// Run fleetq jobs from one queue on this host.
///
/// Example: fleetq-worker --queue images --node gpu-07 --slots 4 --executor echo
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonFlags,
    /// Queue to work.
    #[arg(long, env = "FLEETQ_QUEUE")]
    queue: String,
    /// This host's name, stable across restarts. Default: the host name.
    #[arg(long, env = "FLEETQ_NODE")]
    node: Option<String>,
    /// Jobs run at once (usually one per GPU).
    #[arg(long, env = "FLEETQ_SLOTS", default_value_t = DEFAULT_SLOTS)]
    slots: usize,
    /// Threads of the worker's async runtime (it only waits on Redis, children and HTTP: one is
    /// enough for dozens of slots, and costs the least CPU per job).
    #[arg(long, env = "FLEETQ_RUNTIME_THREADS", default_value_t = fleetq_worker::config::DEFAULT_RUNTIME_THREADS as u16,
        value_parser = clap::value_parser!(u16).range(1..=256))]
    runtime_threads: u16,
    /// Seconds running jobs get to finish after SIGTERM before they are handed to other hosts.
    #[arg(long, env = "FLEETQ_SHUTDOWN_GRACE_SECS", default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    shutdown_grace_secs: u64,
    /// Longest single blocking read, in ms (an idle worker wakes at least this often).
    #[arg(long, env = "FLEETQ_MAX_BLOCK_MS", default_value_t = DEFAULT_MAX_BLOCK.as_millis() as u64)]
    max_block_ms: u64,
    /// Failures or timeouts in a row after which this node suspends itself (0: never).
    #[arg(long, env = "FLEETQ_SUSPEND_AFTER", default_value_t = DEFAULT_SUSPEND_AFTER)]
    suspend_after: u32,
    /// Seconds a self-suspension lasts.
    #[arg(long, env = "FLEETQ_SUSPEND_FOR_SECS", default_value_t = DEFAULT_SUSPEND_FOR.as_secs())]
    suspend_for_secs: u64,
    /// Seconds between node-record heartbeats (the record lives three times this).
    #[arg(long, env = "FLEETQ_HEARTBEAT_SECS", default_value_t = DEFAULT_HEARTBEAT.as_secs())]
    heartbeat_secs: u64,
    /// Where to serve /metrics (loopback unless you say so); "off" to not serve it.
    #[arg(long, env = "FLEETQ_METRICS_ADDR", default_value = "127.0.0.1:9101")]
    metrics_addr: String,
    /// What runs the jobs.
    #[arg(long, env = "FLEETQ_EXECUTOR", value_enum, default_value = "echo")]
    executor: ExecutorKind,
    /// Process executor: the child's command line, split like a shell would but never run by
    /// one (e.g. "python3 examples/python/sim_gpu.py --steps 20").
    #[arg(long, env = "FLEETQ_COMMAND")]
    command: Option<String>,
    /// HTTP executors: the server's URL.
    #[arg(long, env = "FLEETQ_URL")]
    url: Option<String>,
    /// HTTP executors: seconds a request may take (JSON mode: the whole job).
    #[arg(long, env = "FLEETQ_REQUEST_TIMEOUT_SECS", default_value_t = fleetq_worker::executor::http::DEFAULT_REQUEST_TIMEOUT.as_secs())]
    request_timeout_secs: u64,
    /// Process executor: replace a child after this many jobs.
    #[arg(long, env = "FLEETQ_MAX_JOBS_PER_CHILD")]
    max_jobs_per_child: Option<u32>,
    /// Process executor: replace a child after it lived this many seconds (between jobs).
    #[arg(long, env = "FLEETQ_MAX_CHILD_LIFE_SECS")]
    max_child_life_secs: Option<u64>,
    /// Process executor: seconds between SIGTERM and SIGKILL when stopping a child.
    #[arg(long, env = "FLEETQ_KILL_GRACE_SECS", default_value_t = fleetq_worker::executor::process::DEFAULT_KILL_GRACE.as_secs())]
    kill_grace_secs: u64,
    /// Process executor: an environment variable passed to children (repeatable); replaces
    /// the default list (PATH, HOME, LANG, LC_ALL, TZ, TMPDIR, PYTHONPATH, VIRTUAL_ENV,
    /// CUDA_VISIBLE_DEVICES, NVIDIA_VISIBLE_DEVICES, HF_HOME).
    #[arg(long = "child-env", env = "FLEETQ_CHILD_ENV", value_delimiter = ',')]
    child_env: Vec<String>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let runtime = match fleetq_worker::config::runtime(usize::from(args.runtime_threads)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}; check the process's thread and memory limits");
            return std::process::ExitCode::FAILURE;
        }
    };
    fleetq_broker::flags::exit(fleetq_worker::config::run_on(&runtime, run(args)))
}

async fn run(args: Args) -> anyhow::Result<()> {
    args.common.init_logging();
    let node = args.node.clone().unwrap_or_else(host_name);
    let config = worker_config(&args, &node)?;
    // The executor is built before connecting, so a flag mistake is reported without Redis.
    let executor = executor(&args, &node, config.slots)?;
    let shutdown = Shutdown::new(fleetq_broker::shutdown::signal());
    let stop = shutdown.token();
    let Some(redis) = args
        .common
        .connect_patiently("fleetq-worker", &stop)
        .await?
    else {
        return Ok(());
    };
    fleetq_worker::run(redis, config, executor, stop.cancelled_owned()).await?;
    Ok(())
}

/// The worker's settings from the flags, validated.
fn worker_config(args: &Args, node: &str) -> anyhow::Result<WorkerConfig> {
    let mut config = WorkerConfig::new(&args.queue, node);
    config.slots = args.slots;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config.max_block = Duration::from_millis(args.max_block_ms);
    config.suspend_after = args.suspend_after;
    config.suspend_for = Duration::from_secs(args.suspend_for_secs);
    config.heartbeat = Duration::from_secs(args.heartbeat_secs);
    config.metrics_addr = match args.metrics_addr.as_str() {
        "off" | "" => None,
        a => Some(a.parse().with_context(|| {
            format!("--metrics-addr {a:?} is not an address such as 127.0.0.1:9101 (or off)")
        })?),
    };
    config.validate()?;
    Ok(config)
}

/// The executor `--executor` names, built from its flags.
fn executor(args: &Args, node: &str, slots: usize) -> anyhow::Result<Executor> {
    Ok(match args.executor {
        ExecutorKind::Echo => Echo {
            node: node.to_owned(),
        }
        .into(),
        ExecutorKind::Process => process_executor(args, node, slots)?.into(),
        ExecutorKind::Comfyui => http_executor(args, HttpMode::ComfyUi)?.into(),
        ExecutorKind::Http => http_executor(args, HttpMode::Json)?.into(),
    })
}

fn process_executor(args: &Args, node: &str, slots: usize) -> anyhow::Result<ProcessExecutor> {
    let command = args
        .command
        .as_deref()
        .context("--executor process needs --command, e.g. --command 'python3 model_server.py'")?;
    let mut pc = ProcessConfig::from_command(command, slots).map_err(anyhow::Error::msg)?;
    pc.max_jobs_per_child = args.max_jobs_per_child;
    pc.max_child_life = args.max_child_life_secs.map(Duration::from_secs);
    pc.kill_grace = Duration::from_secs(args.kill_grace_secs);
    if !args.child_env.is_empty() {
        pc.env_allow = args.child_env.clone();
    }
    Ok(ProcessExecutor::new(pc, node))
}

fn http_executor(args: &Args, mode: HttpMode) -> anyhow::Result<HttpExecutor> {
    let url = args
        .url
        .clone()
        .context("--executor comfyui|http needs --url, e.g. --url http://127.0.0.1:8188")?;
    HttpExecutor::new(HttpConfig {
        url,
        mode,
        request_timeout: Duration::from_secs(args.request_timeout_secs),
    })
    .map_err(anyhow::Error::msg)
}
