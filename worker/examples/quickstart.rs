//! The smallest whole fleetq: a producer, a worker with two slots, five jobs, their results.
//!
//! `cargo run --example quickstart` — uses REDIS_URL when set, else starts a throwaway
//! `redis-server` on a free port and removes it afterwards.

use std::time::{Duration, Instant};

use fleetq_broker::{EnqueueOptions, LocalRedis, Producer, Redis};
use fleetq_worker::{Handler, Job, JobContext, Outcome, WorkerConfig};

/// Pretends to be a GPU: "renders" the prompt in 200 ms.
struct FakeGpu;

impl Handler for FakeGpu {
    async fn handle(&self, job: Job, _ctx: JobContext) -> Outcome {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let prompt = job.payload["prompt"].as_str().unwrap_or("?");
        Outcome::Succeeded(serde_json::json!({ "image": format!("{prompt}.png") }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let (_server, url) = match std::env::var("REDIS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = LocalRedis::start()?;
            let url = server.url();
            println!("started redis-server at {url}");
            (Some(server), url)
        }
    };
    let redis = Redis::connect(&url).await?;
    let producer = Producer::new(&redis, "quickstart").await?;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut config = WorkerConfig::new("quickstart", "gpu-0");
    config.slots = 2;
    let worker = {
        let (redis, stop) = (redis.clone(), stop.clone());
        tokio::spawn(fleetq_worker::run(redis, config, FakeGpu, async move {
            stop.cancelled().await
        }))
    };

    let started = Instant::now();
    let mut ids = Vec::new();
    for prompt in ["fox", "owl", "cat", "elk", "bee"] {
        let job = producer
            .enqueue(
                &serde_json::json!({ "prompt": prompt }),
                &EnqueueOptions::default(),
            )
            .await?;
        println!(
            "enqueued {prompt:<4} as {} (position {})",
            job.id, job.position
        );
        ids.push(job.id);
    }
    let mut ok = true;
    for id in &ids {
        let status = producer.wait(id, Duration::from_secs(30)).await?;
        println!(
            "{id}: {} on {} → {}",
            status.state,
            status.node.as_deref().unwrap_or("-"),
            status
                .result
                .map_or_else(|| "-".to_owned(), |r| r.to_string())
        );
        ok &= status.state == fleetq_broker::JobState::Succeeded;
    }
    println!(
        "5 jobs on 2 slots in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stop.cancel();
    worker.await??;
    if !ok {
        anyhow::bail!("not every job succeeded");
    }
    Ok(())
}
