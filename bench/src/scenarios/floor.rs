//! The floor: the least Redis work a job needs, with nothing else, from one client in a tight
//! pipelined loop — what Redis allows on this machine, so that `e2e / floor` says how close
//! fleetq comes.
//!
//! Same N and payload as the end-to-end run, same key layout (a fleetq queue's stream, group
//! and job hash keys). `XADD` of all jobs first (pipelined batches, untimed, as the
//! end-to-end enqueue is untimed); then, timed: `XREADGROUP … COUNT 8` (the most the 8-slot
//! worker can read at once), and for each entry read `XACK`, `XDEL` and an `HSET` of its
//! result — sent in the same pipeline as the next `XREADGROUP`, so one round trip per 8 jobs.
//!
//! Redis CPU (`INFO cpu`, user + sys) is read before the `XADD`s, between them and the loop,
//! and after the loop: the floor's CPU per job covers both, as the end-to-end figure covers
//! the enqueue and the drain. [`run_with`] runs the same with another payload size (the
//! payload sweep); big payloads are added in smaller pipelines ([`plan::enqueue_batch`]).

use std::time::{Duration, Instant};

use anyhow::Context;
use fleetq_broker::keys::GROUP;
use fleetq_broker::QueueKeys;
use redis::streams::StreamReadReply;
use serde::Serialize;

use crate::plan::{self, Plan, FLOOR_READ_COUNT, PAYLOAD_BYTES};
use crate::server::Server;
use crate::{payload, scenarios::rate};

const QUEUE: &str = "bench-floor";
const CONSUMER: &str = "floor";

/// What the floor loop measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FloorResult {
    /// Jobs through the loop.
    pub jobs: usize,
    /// Bytes of each payload.
    pub payload_bytes: usize,
    /// Entries per `XREADGROUP`.
    pub read_count: usize,
    /// `XADD` of all jobs (pipelined), jobs per second.
    pub add_per_sec: f64,
    /// The timed read/ack/delete/result loop, seconds.
    pub seconds: f64,
    /// `jobs / seconds`.
    pub jobs_per_sec: f64,
    /// Redis CPU time per job over the `XADD`s and the loop (`INFO cpu`), µs.
    pub redis_cpu_us_per_job: f64,
    /// Of which in the timed loop, µs.
    pub loop_redis_cpu_us_per_job: f64,
}

/// Runs the scenario: the end-to-end run's jobs and payload.
pub async fn run(plan: &Plan) -> anyhow::Result<FloorResult> {
    run_with(plan.e2e_jobs, PAYLOAD_BYTES).await
}

/// Runs the floor loop for `n` jobs with payloads of `payload_bytes`.
pub async fn run_with(n: usize, payload_bytes: usize) -> anyhow::Result<FloorResult> {
    let server = Server::start().await?;
    let keys = QueueKeys::new(QUEUE)?;
    server.create_group(&keys).await?;
    let mut conn = server.redis.conn();
    let body = payload::noop(payload_bytes);
    let per_pipeline = plan::enqueue_batch(payload_bytes);

    let cpu_start = server.cpu_time().await?;
    let started = Instant::now();
    let mut left = n;
    while left > 0 {
        let count = left.min(per_pipeline);
        left -= count;
        let mut pipe = redis::pipe();
        for _ in 0..count {
            pipe.cmd("XADD")
                .arg(keys.stream())
                .arg("*")
                .arg("payload")
                .arg(&body)
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await.context("XADD")?;
    }
    let added = started.elapsed();

    let cpu_before = server.cpu_time().await?;
    let started = Instant::now();
    let mut done = 0usize;
    let mut to_finish: Vec<String> = Vec::new();
    loop {
        let mut pipe = redis::pipe();
        for id in to_finish.drain(..) {
            pipe.cmd("XACK")
                .arg(keys.stream())
                .arg(GROUP)
                .arg(&id)
                .ignore();
            pipe.cmd("XDEL").arg(keys.stream()).arg(&id).ignore();
            pipe.cmd("HSET")
                .arg(keys.job(&id))
                .arg("result")
                .arg("null")
                .ignore();
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(CONSUMER)
            .arg("COUNT")
            .arg(FLOOR_READ_COUNT)
            .arg("STREAMS")
            .arg(keys.stream())
            .arg(">");
        let (read,): (Option<StreamReadReply>,) =
            pipe.query_async(&mut conn).await.context("XREADGROUP")?;
        for key in read.map(|r| r.keys).unwrap_or_default() {
            to_finish.extend(key.ids.into_iter().map(|e| e.id));
        }
        if to_finish.is_empty() {
            break;
        }
        done += to_finish.len();
    }
    let elapsed = started.elapsed();
    let cpu_end = server.cpu_time().await?;
    let loop_cpu = cpu_end.saturating_sub(cpu_before);
    let all_cpu = cpu_end.saturating_sub(cpu_start);

    anyhow::ensure!(done == n, "the floor loop read {done} of {n} entries");
    let len = server.stream_len(&keys).await?;
    let pending = server.pending(&keys).await?;
    anyhow::ensure!(
        len == 0 && pending == 0,
        "the floor loop left {len} entries and {pending} pending"
    );
    Ok(FloorResult {
        jobs: n,
        payload_bytes,
        read_count: FLOOR_READ_COUNT,
        add_per_sec: rate(n, added),
        seconds: elapsed.as_secs_f64(),
        jobs_per_sec: rate(n, elapsed.max(Duration::from_nanos(1))),
        redis_cpu_us_per_job: all_cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
        loop_redis_cpu_us_per_job: loop_cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
    })
}
