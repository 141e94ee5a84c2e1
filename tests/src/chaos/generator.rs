//! The producer side: enqueues `jobs` jobs with ids `job-00000`… spread evenly over the run,
//! recording what each call returned. A call that fails (as during a Redis outage) is recorded
//! and not retried: the job may or may not exist, and the checker allows both.

use std::time::Duration;

use fleetq_broker::{EnqueueOptions, Producer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::ChaosConfig;
use super::history::{Enqueue, History};

/// Longest an enqueue may take before it counts as failed (a frozen Redis never answers).
pub const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// The id of job `i`.
pub fn job_id(i: usize) -> String {
    format!("job-{i:05}")
}

/// Enqueues every job of `cfg`, pacing them over `cfg.duration`.
pub async fn generate(producer: Producer, cfg: ChaosConfig, history: History) {
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x6a6f6273);
    let gap = cfg.duration / cfg.jobs.max(1) as u32;
    let mut next = tokio::time::Instant::now();
    for i in 0..cfg.jobs {
        let id = job_id(i);
        let ms = rng.random_range(cfg.job_ms.0..=cfg.job_ms.1);
        let opts = EnqueueOptions {
            id: Some(id.clone()),
            ..Default::default()
        };
        let payload = serde_json::json!({ "ms": ms });
        let at_ms = history.now_ms();
        let res = tokio::time::timeout(ENQUEUE_TIMEOUT, producer.enqueue(&payload, &opts)).await;
        let error = match res {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {ENQUEUE_TIMEOUT:?}")),
        };
        history.enqueue(Enqueue {
            id,
            at_ms,
            acked: error.is_none(),
            error,
        });
        next += gap;
        tokio::time::sleep_until(next).await;
    }
}
