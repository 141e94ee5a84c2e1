//! `fleetq demo`: the whole story in one command.
//!
//! A local `redis-server` (unless REDIS_URL is set), a broker, and five simulated GPU nodes
//! running `sim_gpu.py` children through the process executor: two healthy, one that hangs
//! mid-job (progress timeout → suspended), one whose child crashes (retried elsewhere →
//! suspended), and one whose host dies with a job in hand (its connections close → the broker
//! puts its jobs back in line; a frozen one would lose its lease → reclaimed). A burst of jobs
//! goes in; a live view shows each node; the summary tells each incident from the queue's
//! events and proves every job ended exactly once.
//!
//! - [`live`] — what the demo shows while it runs: bars on a terminal, a few plain lines
//!   otherwise.
//! - [`story`] — the summary: outcomes, figures, and each incident as it happened.
//!
//! The broker and the workers run in-process on a runtime of their own, whose threads log to
//! a file (named at the end), so that their log lines never share the terminal with the view.

mod live;
mod story;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleetq_broker::service::BrokerConfig;
use fleetq_broker::{inspect, JobState, LocalRedis, Producer, QueueConfig, QueueKeys, Redis};
use fleetq_worker::executor::{ProcessConfig, ProcessExecutor};
use fleetq_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::args::DemoArgs;
use crate::exit::{self, CliError};
use crate::output::json;

pub use story::{
    Crash, DeadHost, HeldJob, Incidents, Percentiles, Summary, Suspension, TimeoutIncident,
};

const SIM_GPU: &str = include_str!("../../examples/python/sim_gpu.py");
const CHILD_HELPER: &str = include_str!("../../examples/python/fleetq_child.py");
/// The demo gives up after this long.
const DEMO_LIMIT: Duration = Duration::from_secs(55);
/// The dying host dies at its job's second progress report (mid-job), or after this long
/// when none came (a slow machine): then it may hold nothing, and the summary says so.
const DEATH_AT_THE_LATEST: Duration = Duration::from_secs(10);
/// What the services log to the demo's log file unless RUST_LOG says otherwise.
const DEFAULT_LOG_FILTER: &str = "warn,fleetq_broker=info,fleetq_worker=info";

/// One simulated node.
pub(crate) struct NodeSpec {
    pub(crate) name: &'static str,
    slots: usize,
    flags: &'static str,
    pub(crate) role: &'static str,
}

pub(crate) const FLEET: &[NodeSpec] = &[
    NodeSpec {
        name: "gpu-1",
        slots: 2,
        flags: "",
        role: "healthy",
    },
    NodeSpec {
        name: "gpu-2",
        slots: 2,
        flags: "",
        role: "healthy",
    },
    NodeSpec {
        name: "gpu-3",
        slots: 1,
        flags: "--hang-mid-run",
        role: "hangs mid-job",
    },
    NodeSpec {
        name: "gpu-4",
        slots: 1,
        flags: "--crash-mid-run",
        role: "child crashes",
    },
    NodeSpec {
        name: "gpu-5",
        slots: 1,
        flags: "--step-ms 400",
        role: "host dies mid-job",
    },
];
/// The node whose host "dies" (its worker stops dead: nothing released, nothing renewed, its
/// connections closed).
const DYING: &str = "gpu-5";

/// Runs the demo; `redis_url` is REDIS_URL when set.
///
/// Everything runs on a runtime of its own whose threads send their log lines to the demo's
/// log file: the broker's, the workers' and their children's stderr alike.
pub async fn run(
    redis_url: Option<String>,
    args: &DemoArgs,
    as_json: bool,
) -> Result<(), CliError> {
    let (log_path, dispatch) = log_file()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fleetq-demo")
        .enable_all()
        .on_thread_start(move || {
            // The guard lives as long as the thread: every log line of this runtime's tasks
            // goes to the file.
            std::mem::forget(tracing::dispatcher::set_default(&dispatch));
        })
        .build()
        .map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("cannot start the demo's runtime: {e}"),
            )
        })?;
    let opts = Options {
        jobs: args.jobs,
        view: if as_json || args.quiet {
            live::View::Off
        } else if live::stdout_is_terminal() {
            live::View::Bars
        } else {
            live::View::Lines
        },
        as_json,
    };
    let outcome = runtime
        .spawn(demo(redis_url, opts, log_path.clone()))
        .await
        .unwrap_or_else(|e| {
            Err(CliError::new(
                exit::BAD_INPUT,
                format!(
                    "the demo stopped unexpectedly ({e}); its log is {}",
                    log_path.display()
                ),
            ))
        });
    // Whatever is left (connection drivers) ends with the runtime.
    runtime.shutdown_background();
    outcome
}

/// The log file (kept after the demo) and the log dispatcher that writes to it.
fn log_file() -> Result<(PathBuf, tracing::Dispatch), CliError> {
    let (file, path) = tempfile::Builder::new()
        .prefix("fleetq-demo-")
        .suffix(".log")
        .tempfile()
        .and_then(|f| f.keep().map_err(|e| e.error))
        .map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("cannot create the demo's log file in the temporary directory ({e}); set TMPDIR to a writable directory"),
            )
        })?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .finish();
    Ok((path, tracing::Dispatch::new(subscriber)))
}

/// What the command line asked for.
struct Options {
    jobs: usize,
    view: live::View,
    as_json: bool,
}

/// The services the demo starts, to stop them at the end.
struct Fleet {
    stop: CancellationToken,
    broker: tokio::task::JoinHandle<fleetq_broker::Result<()>>,
    workers: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
}

async fn demo(redis_url: Option<String>, opts: Options, log: PathBuf) -> Result<(), CliError> {
    let started = Instant::now();
    let (_local, url, queue) = match redis_url {
        Some(url) => {
            let q = format!("demo-{:06x}", rand::random::<u32>() & 0xff_ffff);
            (None, url, q)
        }
        None => {
            let server = LocalRedis::start().map_err(|e| {
                CliError::new(exit::REDIS, format!("the demo starts its own redis-server when REDIS_URL is unset, but it could not: {e}"))
            })?;
            let url = server.url();
            (Some(server), url, "demo".to_owned())
        }
    };
    let dir = tempfile::Builder::new()
        .prefix("fleetq-demo-")
        .tempdir()
        .map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("cannot create a temporary directory: {e}"),
            )
        })?;
    std::fs::write(dir.path().join("sim_gpu.py"), SIM_GPU)
        .and_then(|()| std::fs::write(dir.path().join("fleetq_child.py"), CHILD_HELPER))
        .map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("cannot write the simulated GPU program: {e}"),
            )
        })?;
    let probe =
        ProcessConfig::from_command("python3", 1).map_err(|e| CliError::new(exit::BAD_INPUT, e))?;
    probe.resolve_program().map_err(|_| {
        CliError::new(exit::BAD_INPUT, "the demo's simulated GPUs are Python programs, but python3 was not found in PATH; install python3")
    })?;

    let redis = Redis::connect(&url).await?;
    let keys = QueueKeys::new(&queue)?;
    QueueConfig {
        lease: Duration::from_secs(3),
        progress_timeout: Some(Duration::from_millis(1500)),
        max_attempts: 5,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        retention: Duration::from_secs(600),
        // The live view and the summary follow every job through its events.
        routine_events: true,
        ..QueueConfig::default()
    }
    .store(&mut redis.conn(), &keys)
    .await?;
    let producer = Producer::new(&redis, &queue).await?;
    let (fleet, broker_addr) = start_fleet(&redis, &queue, dir.path()).await?;

    // The burst.
    let payloads: Vec<String> = (0..opts.jobs)
        .map(|i| {
            serde_json::json!({ "prompt": format!("a red fox, variation {i}"), "seed": i })
                .to_string()
        })
        .collect();
    let t0_ms = server_ms(&redis, &keys).await?;
    let ids: Vec<String> = producer
        .enqueue_batch(&payloads)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();

    let ui = live::Ui::new(
        opts.view,
        &format!(
            "fleetq demo: {} jobs on queue {queue}\n  Redis {} · broker http://{}",
            ids.len(),
            redis.url(),
            broker_addr
        ),
        ids.len(),
    );
    let death = follow(&redis, &keys, &ui, ids.len(), fleet.workers, started).await;
    let (death, workers) = match death {
        Ok(v) => v,
        Err(e) => {
            fleet.stop.cancel();
            ui.finish();
            return Err(e);
        }
    };
    ui.stopping();
    fleet.stop.cancel();
    for (_, h) in workers {
        let _ = h.await;
    }
    let _ = fleet.broker.await;
    ui.finish();

    let summary = story::summarize(
        &redis,
        &producer,
        &keys,
        &ids,
        story::Clock {
            t0_ms,
            took: started.elapsed(),
        },
        death,
        &log,
    )
    .await?;
    if opts.as_json {
        json(&summary);
    } else {
        story::print(&summary);
    }
    let all_ok = summary.outcomes.get("succeeded").copied().unwrap_or(0) == ids.len();
    if all_ok && summary.exactly_once {
        Ok(())
    } else {
        Err(CliError::new(
            exit::JOB_NOT_SUCCEEDED,
            format!(
                "not every job succeeded exactly once (see the summary; the services' log is {})",
                log.display()
            ),
        ))
    }
}

/// Starts the broker and the fleet; answers them and the broker's address.
async fn start_fleet(redis: &Redis, queue: &str, dir: &Path) -> Result<(Fleet, String), CliError> {
    // The broker: maintenance and metrics, as in production.
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("cannot open a loopback port for the broker: {e}"),
            )
        })?;
    let broker_addr = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let broker = {
        let (redis, stop) = (redis.clone(), stop.clone());
        let cfg = BrokerConfig {
            queues: vec![queue.to_owned()],
            maintenance_interval: Duration::from_millis(250),
            ..BrokerConfig::default()
        };
        tokio::spawn(async move {
            fleetq_broker::service::run(redis, listener, cfg, async move { stop.cancelled().await })
                .await
        })
    };

    let mut workers = Vec::new();
    for spec in FLEET {
        let mut cfg = WorkerConfig::new(queue, spec.name);
        cfg.slots = spec.slots;
        cfg.heartbeat = Duration::from_secs(1);
        cfg.suspend_after = 2;
        cfg.suspend_for = Duration::from_secs(120);
        cfg.shutdown_grace = Duration::from_secs(2);
        cfg.progress_interval = Duration::from_millis(200);
        let command = format!(
            "python3 {} --steps 6 --step-ms 80 {}",
            dir.join("sim_gpu.py").display(),
            spec.flags
        );
        let mut pc = ProcessConfig::from_command(&command, spec.slots)
            .map_err(|e| CliError::new(exit::BAD_INPUT, e))?;
        pc.kill_grace = Duration::from_secs(1);
        let exec = ProcessExecutor::new(pc, spec.name);
        let (redis, stop) = (redis.clone(), stop.clone());
        let handle = tokio::spawn(async move {
            let _ =
                fleetq_worker::run(redis, cfg, exec, async move { stop.cancelled().await }).await;
        });
        workers.push((spec.name, handle));
    }
    Ok((
        Fleet {
            stop,
            broker,
            workers,
        },
        broker_addr,
    ))
}

/// Follows the queue's events into the live view until every job has ended (or the demo's
/// time is up), killing the dying host mid-job on the way. Answers the death (node and
/// server time, ms) and the workers still alive.
async fn follow(
    redis: &Redis,
    keys: &QueueKeys,
    ui: &live::Ui,
    jobs: usize,
    mut workers: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    started: Instant,
) -> Result<
    (
        Option<story::Death>,
        Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    ),
    CliError,
> {
    let mut cursor = "0-0".to_owned();
    let mut events_conn = redis
        .blocking_conn(&keys.events(), Duration::from_millis(500))
        .await?;
    let mut last_depth = Instant::now() - Duration::from_secs(5);
    let mut dying = workers
        .iter()
        .position(|(n, _)| *n == DYING)
        .map(|i| workers.remove(i));
    let mut dying_reports = 0;
    let mut death = None;
    loop {
        let due = dying_reports >= 2 || started.elapsed() > DEATH_AT_THE_LATEST;
        if let (Some((node, handle)), true) = (&dying, due) {
            // The host dies with its job in hand: nothing is released, nothing renewed.
            handle.abort();
            let at_ms = server_ms(redis, keys).await?;
            ui.node_dead(node);
            death = Some(story::Death { node, at_ms });
            dying = None;
        }
        for (id, fields) in
            inspect::read_events(&mut events_conn, keys, &cursor, Duration::from_millis(300))
                .await?
        {
            cursor = id;
            if dying.is_some()
                && fields.get("node").map(String::as_str) == Some(DYING)
                && fields.get("type").map(String::as_str) == Some("progress")
            {
                dying_reports += 1;
            }
            ui.event(&fields);
        }
        if last_depth.elapsed() >= Duration::from_millis(500) {
            last_depth = Instant::now();
            let st = inspect::queue_state(redis, keys).await?;
            ui.depth(&st);
            let ended: i64 = JobState::TERMINAL.iter().map(|t| st.stat(t.name())).sum();
            if ended >= jobs as i64 {
                break;
            }
        }
        if started.elapsed() > DEMO_LIMIT {
            break;
        }
    }
    if let Some((_, handle)) = dying {
        workers.push((DYING, handle));
    }
    Ok((death, workers))
}

/// The Redis server's clock, ms: the clock of the queue's events.
async fn server_ms(redis: &Redis, keys: &QueueKeys) -> Result<u64, CliError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis.conn_for(&keys.stream()))
        .await
        .map_err(|e| {
            CliError::new(
                exit::REDIS,
                format!("cannot read the Redis server's clock (TIME): {e}"),
            )
        })?;
    Ok(secs * 1000 + micros / 1000)
}
