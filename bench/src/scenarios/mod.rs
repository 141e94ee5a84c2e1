//! The scenarios. Each starts its own `redis-server` (see [`crate::server`]), or its own
//! cluster ([`crate::cluster`]), and returns its figures; none depends on another's state.
//!
//! - [`enqueue`] — producer throughput: one job at a time, and pipelined batches.
//! - [`drain`] — one worker process drains N enqueued jobs: the run behind `e2e`,
//!   `payload_sweep` and `slots`, with its exactly-once check.
//! - [`e2e`] — N no-op jobs through one worker process with 8 slots: throughput, Redis
//!   commands and CPU per job.
//! - [`floor`] — the same Redis work with nothing else, from one client: what Redis allows.
//! - [`by_step`] — the steps of a job (enqueue, take, complete, maintenance) driven
//!   directly, each one's commands and Redis CPU per job.
//! - [`payload_sweep`] — end to end and floor with payloads of 200 B, 10 KB and 1 MB.
//! - [`slots`] — the drain by one worker process with 1, 8 and 64 slots.
//! - [`memory`] — Redis memory per waiting job.
//! - [`idle`] — Redis commands per idle worker per second.
//! - [`dispatch`] — enqueue→start latency at a fixed arrival rate with idle slots.
//! - [`recovery`] — time until a killed or frozen host's job runs elsewhere.
//! - [`cluster`] — a hot queue on a 3-primary Redis Cluster, 1 partition against 3.

pub mod by_step;
pub mod cluster;
pub mod dispatch;
pub mod drain;
pub mod e2e;
pub mod enqueue;
pub mod floor;
pub mod idle;
pub mod memory;
pub mod payload_sweep;
pub mod recovery;
pub mod slots;

/// Jobs per second, 0 when nothing was timed.
pub(crate) fn rate(jobs: usize, elapsed: std::time::Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        jobs as f64 / secs
    } else {
        0.0
    }
}

/// Reads about `samples` statuses of `ids` (evenly spread) with `fleetq_status` and adds a
/// problem for the first job that is not `succeeded`.
pub(crate) async fn check_sampled_statuses(
    producer: &fleetq_broker::Producer,
    ids: &[String],
    samples: usize,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let step = (ids.len() / samples).max(1);
    for id in ids.iter().step_by(step) {
        let status = producer.status(id).await?;
        if status.state != fleetq_broker::JobState::Succeeded {
            problems.push(format!("job {id} is {}", status.state.name()));
            break;
        }
    }
    Ok(())
}
