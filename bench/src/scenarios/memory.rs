//! Redis memory per waiting job: `used_memory` with N waiting jobs (enqueued with
//! `enqueue_batch`, bench payload, no worker, consumer group created and primed — see
//! [`crate::server::Server::prime_group`]) minus `used_memory` of the empty queue (library
//! loaded, config written, group created), divided by N.
//!
//! The events stream is written by every enqueue but capped
//! ([`crate::server::EVENTS_MAXLEN`]), so it adds a constant, not a per-job amount.

use anyhow::Context;
use fleetq_broker::Producer;
use serde::Serialize;

use crate::payload;
use crate::plan::{Plan, BATCH_SIZE, PAYLOAD_BYTES};
use crate::server::{queue_config, Server};

const QUEUE: &str = "bench-memory";

/// What the memory scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryResult {
    /// Waiting jobs.
    pub jobs: usize,
    /// Payload bytes per job.
    pub payload_bytes: usize,
    /// `used_memory` of the empty queue, bytes.
    pub empty_bytes: u64,
    /// `used_memory` with the jobs waiting, bytes.
    pub full_bytes: u64,
    /// `(full − empty) / jobs`.
    pub bytes_per_job: f64,
}

/// Runs the scenario.
pub async fn run(plan: &Plan) -> anyhow::Result<MemoryResult> {
    let n = plan.memory_jobs;
    let server = Server::start().await?;
    let keys = server.configure(QUEUE, &queue_config()).await?;
    server.create_group(&keys).await?;
    server.prime_group(&keys).await?;
    let producer = Producer::new(&server.redis, QUEUE).await?;
    let body = payload::noop(PAYLOAD_BYTES);
    let empty = server.used_memory().await?;
    let mut left = n;
    while left > 0 {
        let batch = vec![body.clone(); left.min(BATCH_SIZE)];
        left -= batch.len();
        producer.enqueue_batch(&batch).await.context("enqueue")?;
    }
    let full = server.used_memory().await?;
    let len = server.stream_len(&keys).await?;
    anyhow::ensure!(len == n as u64, "{len} entries waiting after {n} enqueues");
    Ok(MemoryResult {
        jobs: n,
        payload_bytes: PAYLOAD_BYTES,
        empty_bytes: empty,
        full_bytes: full,
        bytes_per_job: full.saturating_sub(empty) as f64 / n as f64,
    })
}
