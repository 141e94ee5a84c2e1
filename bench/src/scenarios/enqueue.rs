//! Producer throughput: `Producer::enqueue_json` one job at a time (a round trip each), and
//! `Producer::enqueue_batch` (one pipelined round trip per batch of
//! [`crate::plan::BATCH_SIZE`]), of no-op jobs with the bench payload, into a queue whose
//! consumer group has delivered before (as on any queue a worker has read from; see
//! [`Server::prime_group`]).
//!
//! Also, for the record, batch enqueue into a queue whose group has never delivered an
//! entry (a new queue, or a backlog enqueued before the first worker read): there
//! `fleetq_enqueue` finds the group's `entries-read` unknown and counts the position with
//! `XRANGE … COUNT 1000`.

use std::time::Instant;

use anyhow::Context;
use fleetq_broker::{EnqueueOptions, Producer};
use serde::Serialize;

use crate::plan::{Plan, BATCH_SIZE, PAYLOAD_BYTES};
use crate::server::{queue_config, Server};
use crate::{payload, scenarios::rate};

const QUEUE: &str = "bench-enqueue";
const COLD_QUEUE: &str = "bench-enqueue-cold";
/// Untimed single enqueues first (connections, function cache).
const WARM_UP_JOBS: usize = 100;

/// Producer throughput.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnqueueResult {
    /// Jobs enqueued one at a time.
    pub single_jobs: usize,
    /// Their rate, jobs per second.
    pub single_per_sec: f64,
    /// Jobs enqueued in batches.
    pub batch_jobs: usize,
    /// Jobs per batch.
    pub batch_size: usize,
    /// Their rate, jobs per second.
    pub batch_per_sec: f64,
    /// Jobs enqueued in batches into a queue whose group has never delivered.
    pub cold_batch_jobs: usize,
    /// Their rate, jobs per second.
    pub cold_batch_per_sec: f64,
}

/// Runs the scenario.
pub async fn run(plan: &Plan) -> anyhow::Result<EnqueueResult> {
    let server = Server::start().await?;
    let keys = server.configure(QUEUE, &queue_config()).await?;
    server.create_group(&keys).await?;
    server.prime_group(&keys).await?;
    let producer = Producer::new(&server.redis, QUEUE).await?;
    let body = payload::noop(PAYLOAD_BYTES);
    let opts = EnqueueOptions::default();
    for _ in 0..WARM_UP_JOBS {
        producer.enqueue_json(&body, &opts).await?;
    }

    let started = Instant::now();
    for _ in 0..plan.enqueue_single_jobs {
        producer
            .enqueue_json(&body, &opts)
            .await
            .context("single enqueue")?;
    }
    let single = started.elapsed();

    let batch = vec![body; BATCH_SIZE];
    let batches = plan.enqueue_batch_jobs.div_ceil(BATCH_SIZE);
    let started = Instant::now();
    for _ in 0..batches {
        producer
            .enqueue_batch(&batch)
            .await
            .context("batch enqueue")?;
    }
    let batched = started.elapsed();
    let expected = (WARM_UP_JOBS + plan.enqueue_single_jobs + batches * BATCH_SIZE) as u64;
    let len = server.stream_len(&keys).await?;
    anyhow::ensure!(
        len == expected,
        "the stream holds {len} entries after {expected} enqueues"
    );

    let cold_keys = server.configure(COLD_QUEUE, &queue_config()).await?;
    server.create_group(&cold_keys).await?;
    let cold = Producer::new(&server.redis, COLD_QUEUE).await?;
    let cold_batches = plan.enqueue_cold_jobs.div_ceil(BATCH_SIZE);
    let started = Instant::now();
    for _ in 0..cold_batches {
        cold.enqueue_batch(&batch)
            .await
            .context("batch enqueue, cold group")?;
    }
    let cold_elapsed = started.elapsed();

    Ok(EnqueueResult {
        single_jobs: plan.enqueue_single_jobs,
        single_per_sec: rate(plan.enqueue_single_jobs, single),
        batch_jobs: batches * BATCH_SIZE,
        batch_size: BATCH_SIZE,
        batch_per_sec: rate(batches * BATCH_SIZE, batched),
        cold_batch_jobs: cold_batches * BATCH_SIZE,
        cold_batch_per_sec: rate(cold_batches * BATCH_SIZE, cold_elapsed),
    })
}
