//! A worker process for the end-to-end tests. Its handler reads the payload:
//! `{"sleep_ms": N, "fail": "retry"|"fatal", "result": …}` — sleeps N ms, then fails as told or
//! succeeds with `{"node": <node>, "result": <result>}`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use fleetq_broker::Redis;
use fleetq_worker::{Handler, Job, JobContext, Outcome, WorkerConfig};

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
}

struct TestHandler {
    node: String,
}

impl Handler for TestHandler {
    async fn handle(&self, job: Job, _ctx: JobContext) -> Outcome {
        let p = &job.payload;
        if let Some(ms) = p.get("sleep_ms").and_then(serde_json::Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
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
    let handler = TestHandler {
        node: args.node.clone(),
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
