//! `fleetq demo`: the whole story in one command.
//!
//! A local `redis-server` (unless REDIS_URL is set), a broker, and five simulated GPU nodes
//! running `sim_gpu.py` children through the process executor: two healthy, one that hangs
//! mid-job (progress timeout → suspended), one whose child crashes (retried elsewhere →
//! suspended), and one that dies with jobs in hand (its connections close → the broker puts its jobs back in
//! line; a frozen one would lose its lease → reclaimed). A burst of
//! jobs goes in; live bars show each node; the summary proves every job ended exactly once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fleetq_broker::metrics::TIMEOUT_KINDS;
use fleetq_broker::service::BrokerConfig;
use fleetq_broker::{inspect, JobState, LocalRedis, Producer, QueueConfig, QueueKeys, Redis};
use fleetq_worker::executor::{ProcessConfig, ProcessExecutor};
use fleetq_worker::WorkerConfig;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::args::DemoArgs;
use crate::exit::{self, CliError};
use crate::output::{human_secs, json, table};

const SIM_GPU: &str = include_str!("../../examples/python/sim_gpu.py");
const CHILD_HELPER: &str = include_str!("../../examples/python/fleetq_child.py");
/// The demo gives up after this long.
const DEMO_LIMIT: Duration = Duration::from_secs(55);

/// One simulated node.
struct NodeSpec {
    name: &'static str,
    slots: usize,
    flags: &'static str,
    role: &'static str,
}

const FLEET: &[NodeSpec] = &[
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
        role: "host dies at 2 s",
    },
];
/// The node whose host "dies" (its worker stops dead, renewing nothing).
const DYING: &str = "gpu-5";

/// The summary, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The queue the demo used.
    pub queue: String,
    /// Jobs enqueued.
    pub jobs: usize,
    /// Jobs by final state.
    pub outcomes: BTreeMap<String, usize>,
    /// Enqueue → start of the successful attempt, ms.
    pub wait_ms: Percentiles,
    /// Successful jobs per node.
    pub per_node: BTreeMap<String, usize>,
    /// Timeouts by kind.
    pub timeouts: BTreeMap<String, i64>,
    /// Entries taken over from dead hosts: reclaimed after a lost lease, or put back in line by
    /// the broker when the host's connections closed.
    pub reclaims: i64,
    /// Attempts retried.
    pub retries: i64,
    /// Nodes that suspended themselves.
    pub suspended_nodes: Vec<String>,
    /// Every job ended exactly once: one terminal state each, one recorded success per
    /// succeeded job, and the counters agree.
    pub exactly_once: bool,
    /// Wall time of the demo, seconds.
    pub duration_s: f64,
}

/// Wait-time percentiles.
#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the demo; `redis_url` is REDIS_URL when set.
pub async fn run(
    redis_url: Option<String>,
    args: &DemoArgs,
    as_json: bool,
) -> Result<(), CliError> {
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
        // The live view follows every job through its events.
        routine_events: true,
        ..QueueConfig::default()
    }
    .store(&mut redis.conn(), &keys)
    .await?;
    let producer = Producer::new(&redis, &queue).await?;

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
    let broker_addr = listener.local_addr().ok();
    let broker = {
        let (redis, stop) = (redis.clone(), stop.clone());
        let cfg = BrokerConfig {
            queues: vec![queue.clone()],
            maintenance_interval: Duration::from_millis(250),
            ..BrokerConfig::default()
        };
        tokio::spawn(async move {
            fleetq_broker::service::run(redis, listener, cfg, async move { stop.cancelled().await })
                .await
        })
    };

    // The fleet.
    let mut workers = Vec::new();
    for spec in FLEET {
        let mut cfg = WorkerConfig::new(&queue, spec.name);
        cfg.slots = spec.slots;
        cfg.heartbeat = Duration::from_secs(1);
        cfg.suspend_after = 2;
        cfg.suspend_for = Duration::from_secs(120);
        cfg.shutdown_grace = Duration::from_secs(2);
        cfg.progress_interval = Duration::from_millis(200);
        let command = format!(
            "python3 {} --steps 6 --step-ms 80 {}",
            dir.path().join("sim_gpu.py").display(),
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

    // The burst.
    let payloads: Vec<String> = (0..args.jobs)
        .map(|i| {
            serde_json::json!({ "prompt": format!("a red fox, variation {i}"), "seed": i })
                .to_string()
        })
        .collect();
    let ids: Vec<String> = producer
        .enqueue_batch(&payloads)
        .await?
        .into_iter()
        .map(|e| e.id)
        .collect();

    let show = !args.quiet && !as_json;
    let ui = Ui::new(show, &ids);
    if show {
        eprintln!(
            "fleetq demo: {} jobs on queue {queue} · Redis {} · broker http://{}",
            ids.len(),
            redis.url(),
            broker_addr.map_or_else(|| "?".into(), |a| a.to_string())
        );
    }
    let mut cursor = "0-0".to_owned();
    let mut events_conn = redis
        .blocking_conn(&keys.events(), Duration::from_millis(500))
        .await?;
    let mut last_depth = Instant::now() - Duration::from_secs(5);
    let mut dying = workers
        .iter()
        .position(|(n, _)| *n == DYING)
        .map(|i| workers.remove(i));
    loop {
        if let Some((_, handle)) = &dying {
            if started.elapsed() > Duration::from_secs(2) {
                // The host dies with jobs in hand: nothing is released, nothing renewed.
                handle.abort();
                ui.node_dead(DYING);
                dying = None;
            }
        }
        for (id, fields) in
            inspect::read_events(&mut events_conn, &keys, &cursor, Duration::from_millis(300))
                .await?
        {
            cursor = id;
            ui.event(&fields);
        }
        if last_depth.elapsed() >= Duration::from_millis(500) {
            last_depth = Instant::now();
            let st = inspect::queue_state(&redis, &keys).await?;
            ui.depth(&st);
            let ended: i64 = JobState::TERMINAL.iter().map(|t| st.stat(t.name())).sum();
            if ended >= ids.len() as i64 {
                break;
            }
        }
        if started.elapsed() > DEMO_LIMIT {
            break;
        }
    }
    ui.finish();
    stop.cancel();
    for (_, h) in workers {
        let _ = h.await;
    }
    let _ = broker.await;

    let summary = summarize(&redis, &producer, &keys, &ids, started.elapsed()).await?;
    if as_json {
        json(&summary);
    } else {
        print_summary(&summary);
    }
    let all_ok = summary.outcomes.get("succeeded").copied().unwrap_or(0) == ids.len();
    if all_ok && summary.exactly_once {
        Ok(())
    } else {
        Err(CliError::new(
            exit::JOB_NOT_SUCCEEDED,
            "not every job succeeded exactly once (see the summary)",
        ))
    }
}

async fn summarize(
    redis: &Redis,
    p: &Producer,
    keys: &QueueKeys,
    ids: &[String],
    took: Duration,
) -> Result<Summary, CliError> {
    let state = inspect::queue_state(redis, keys).await?;
    let mut outcomes = BTreeMap::new();
    let mut per_node = BTreeMap::new();
    let mut waits = Vec::new();
    let mut succeeded = 0usize;
    for id in ids {
        let st = p.status(id).await?;
        *outcomes.entry(st.state.to_string()).or_insert(0) += 1;
        if st.state == JobState::Succeeded {
            succeeded += 1;
            if let Some(n) = &st.node {
                *per_node.entry(n.clone()).or_insert(0) += 1;
            }
            let ms = |k: &str| st.fields.get(k).and_then(|v| v.parse::<u64>().ok());
            if let (Some(enq), Some(start)) = (
                ms("enqueued_ms"),
                ms("attempt_started_ms").or(ms("started_ms")),
            ) {
                waits.push(start.saturating_sub(enq));
            }
        }
    }
    waits.sort_unstable();
    // Exactly once: one `succeeded` event per succeeded job, none for the others, and the
    // counters agree.
    let events = inspect::events(redis, keys).await?;
    let mut successes: HashMap<String, usize> = HashMap::new();
    let mut suspended = Vec::new();
    for (_, f) in &events {
        let f: HashMap<&str, &str> = f.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        match f.get("type").copied() {
            Some("succeeded") => {
                *successes
                    .entry(f.get("job").copied().unwrap_or("").to_owned())
                    .or_insert(0) += 1
            }
            Some("node_suspended") => {
                if let Some(n) = f.get("node") {
                    if !suspended.contains(&n.to_string()) {
                        suspended.push((*n).to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    let exactly_once = successes.values().all(|n| *n == 1)
        && successes.len() == succeeded
        && state.stat("succeeded") == succeeded as i64
        && outcomes.values().sum::<usize>() == ids.len();
    let timeouts = TIMEOUT_KINDS
        .iter()
        .map(|k| ((*k).to_owned(), state.stat(&format!("timeout:{k}"))))
        .collect();
    suspended.sort();
    Ok(Summary {
        queue: keys.name().to_owned(),
        jobs: ids.len(),
        outcomes,
        wait_ms: Percentiles {
            p50: percentile(&waits, 0.5),
            p95: percentile(&waits, 0.95),
        },
        per_node,
        timeouts,
        reclaims: state.stat("reclaimed") + state.stat("abandoned"),
        retries: state.stat("retried"),
        suspended_nodes: suspended,
        exactly_once,
        duration_s: took.as_secs_f64(),
    })
}

fn print_summary(s: &Summary) {
    println!(
        "\nfleetq demo: {} jobs in {}",
        s.jobs,
        human_secs(s.duration_s)
    );
    let mut t = table(&["outcome", "jobs"]);
    for (k, v) in &s.outcomes {
        t.add_row(vec![k.clone(), v.to_string()]);
    }
    println!("{t}");
    let mut t = table(&["node", "role", "completed", "timeouts / failures"]);
    for spec in FLEET {
        let done = s.per_node.get(spec.name).copied().unwrap_or(0);
        let note = if s.suspended_nodes.iter().any(|n| n == spec.name) {
            "suspended itself"
        } else {
            ""
        };
        t.add_row(vec![
            spec.name.to_owned(),
            spec.role.to_owned(),
            done.to_string(),
            note.to_owned(),
        ]);
    }
    println!("{t}");
    let mut t = table(&["figure", "value"]);
    t.add_row(vec![
        "wait p50 / p95".to_owned(),
        format!(
            "{} / {}",
            human_secs(s.wait_ms.p50 as f64 / 1000.0),
            human_secs(s.wait_ms.p95 as f64 / 1000.0)
        ),
    ]);
    for (k, v) in &s.timeouts {
        t.add_row(vec![format!("{k} timeouts"), v.to_string()]);
    }
    t.add_row(vec![
        "taken over from dead hosts".to_owned(),
        s.reclaims.to_string(),
    ]);
    t.add_row(vec!["retries".to_owned(), s.retries.to_string()]);
    t.add_row(vec![
        "suspended nodes".to_owned(),
        if s.suspended_nodes.is_empty() {
            "-".into()
        } else {
            s.suspended_nodes.join(", ")
        },
    ]);
    t.add_row(vec![
        "every job ended exactly once".to_owned(),
        if s.exactly_once { "yes" } else { "NO" }.to_owned(),
    ]);
    println!("{t}");
}

/// Live bars: one for the burst, one per node.
struct Ui {
    total: ProgressBar,
    nodes: HashMap<String, ProgressBar>,
    _multi: MultiProgress,
}

impl Ui {
    fn new(show: bool, ids: &[String]) -> Self {
        let multi = MultiProgress::new();
        if !show {
            multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let total = multi.add(ProgressBar::new(ids.len() as u64));
        total.set_style(
            ProgressStyle::with_template("jobs  [{bar:30}] {pos}/{len} {elapsed}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let mut nodes = HashMap::new();
        for spec in FLEET {
            let pb = multi.add(ProgressBar::new_spinner());
            pb.set_style(
                ProgressStyle::with_template("{spinner} {prefix:6} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb.set_prefix(spec.name);
            pb.set_message(format!("idle ({})", spec.role));
            if show {
                pb.enable_steady_tick(Duration::from_millis(120));
            }
            nodes.insert(spec.name.to_owned(), pb);
        }
        Self {
            total,
            nodes,
            _multi: multi,
        }
    }

    fn event(&self, f: &HashMap<String, String>) {
        let get = |k: &str| f.get(k).map_or("", String::as_str);
        let node = get("node");
        let Some(pb) = self.nodes.get(node) else {
            return;
        };
        let job = get("job");
        let short = job.get(job.len().saturating_sub(6)..).unwrap_or(job);
        match get("type") {
            "started" | "taken" => pb.set_message(format!("job …{short} started")),
            "progress" => {
                let p: serde_json::Value =
                    serde_json::from_str(get("progress")).unwrap_or_default();
                pb.set_message(format!(
                    "job …{short} {} {}/{}",
                    p["stage"].as_str().unwrap_or(""),
                    p["step"],
                    p["total"]
                ));
            }
            "succeeded" => {
                self.total.inc(1);
                pb.set_message(format!("job …{short} done"));
            }
            "retrying" => pb.set_message(format!(
                "job …{short} failed: {}",
                get("error").chars().take(50).collect::<String>()
            )),
            "timeout" => pb.set_message(format!("job …{short} {} timeout", get("kind"))),
            "node_suspended" => pb.set_message("SUSPENDED after repeated failures".to_owned()),
            _ => {}
        }
    }

    fn node_dead(&self, node: &str) {
        if let Some(pb) = self.nodes.get(node) {
            pb.set_message("HOST DIED (its jobs move on when their leases run out)".to_owned());
        }
    }

    fn depth(&self, st: &inspect::QueueState) {
        self.total.set_message(format!(
            "waiting {} · in flight {} · delayed {}",
            st.waiting, st.in_flight, st.delayed
        ));
    }

    fn finish(&self) {
        for pb in self.nodes.values() {
            pb.finish();
        }
        self.total.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_of_a_sorted_list() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.95), 95);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
