//! A worker process for the end-to-end tests.
//!
//! `--mode normal` runs the payload: `{"sleep_ms": N}` sleeps; `{"steps": N, "step_ms": M,
//! "stage": "…"}` reports progress after each step; `{"stall_after": K}` stops reporting (and
//! hangs) after step K; `{"fail": "retry"|"fatal"}` fails as told; otherwise it succeeds with
//! `{"node": <node>, "result": <result>}`.
//! `--mode hang` takes jobs and hangs without a word (a stuck GPU); `--mode never-start`
//! accepts jobs but never reports their start (a model load that never ends).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::{Parser, ValueEnum};
use fleetq_broker::Redis;
use fleetq_worker::{Handler, Job, JobContext, Outcome, Progress, WorkerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Normal,
    Hang,
    NeverStart,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    redis_url: String,
    #[arg(long)]
    queue: String,
    #[arg(long)]
    node: String,
    #[arg(long, default_value_t = 1)]
    slots: usize,
    #[arg(long, default_value_t = 5000)]
    grace_ms: u64,
    #[arg(long, value_enum, default_value = "normal")]
    mode: Mode,
    #[arg(long, default_value_t = 3)]
    suspend_after: u32,
    #[arg(long, default_value_t = 60_000)]
    suspend_for_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    heartbeat_ms: u64,
    /// Longest block of an idle worker that does not watch; the library's default when absent.
    #[arg(long)]
    max_block_ms: Option<u64>,
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

struct TestHandler {
    node: String,
    mode: Mode,
}

impl Handler for TestHandler {
    async fn handle(&self, job: Job, ctx: JobContext) -> Outcome {
        if self.mode != Mode::Normal {
            std::future::pending::<()>().await;
        }
        let p = &job.payload;
        let num = |k: &str| p.get(k).and_then(serde_json::Value::as_u64);
        if let Some(ms) = num("sleep_ms") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(steps) = num("steps") {
            let step_ms = num("step_ms").unwrap_or(100);
            let stage = p
                .get("stage")
                .and_then(|s| s.as_str())
                .unwrap_or("render")
                .to_owned();
            for step in 1..=steps {
                tokio::time::sleep(Duration::from_millis(step_ms)).await;
                if num("stall_after").is_some_and(|k| step > k) {
                    std::future::pending::<()>().await;
                }
                ctx.progress(Progress::step(step, steps).in_stage(stage.clone()))
                    .await;
            }
        }
        match p.get("fail").and_then(serde_json::Value::as_str) {
            Some("retry") => Outcome::Retry(format!("asked to fail on {}", self.node)),
            Some("fatal") => Outcome::Fail("asked to fail for good".into()),
            _ => Outcome::Succeeded(serde_json::json!({
                "node": self.node,
                "result": p.get("result").cloned().unwrap_or_default(),
            })),
        }
    }

    fn reports_start(&self) -> bool {
        self.mode == Mode::NeverStart
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let redis = Redis::connect(&args.redis_url).await?;
    let mut config = WorkerConfig::new(&args.queue, &args.node);
    config.slots = args.slots;
    config.shutdown_grace = Duration::from_millis(args.grace_ms);
    config.suspend_after = args.suspend_after;
    config.suspend_for = Duration::from_millis(args.suspend_for_ms);
    config.heartbeat = Duration::from_millis(args.heartbeat_ms);
    if let Some(ms) = args.max_block_ms {
        config.max_block = Duration::from_millis(ms);
    }
    config.metrics_addr = args.metrics_addr;
    let handler = TestHandler {
        node: args.node.clone(),
        mode: args.mode,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    fleetq_worker::run(redis, config, handler, shutdown).await?;
    Ok(())
}
