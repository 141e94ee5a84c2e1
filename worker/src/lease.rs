//! Leases: the set of entries this worker holds, and the loop that renews them all every
//! lease/3 in one ownership-checked call (`fleetq_renew`).
//!
//! A renewal that finds an entry owned by someone else stops the local run at once
//! ([`StopReason::LeaseLost`]): another host has it now, and this one could not commit anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fleetq_broker::functions::{self, fcall};
use fleetq_broker::{QueueKeys, Redis};
use tokio_util::sync::CancellationToken;

/// Why a running job was stopped by the runtime rather than finishing by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Another host owns the entry now.
    LeaseLost,
    /// A producer cancelled the job.
    Cancelled,
    /// The worker is shutting down and the grace period ran out.
    Shutdown,
}

/// One entry this worker holds.
#[derive(Debug)]
pub(crate) struct HeldJob {
    pub(crate) job_id: String,
    /// Delivery count when taken: the fencing token every commit and renewal presents.
    pub(crate) deliveries: u64,
    pub(crate) cancel: CancellationToken,
    pub(crate) reason: Mutex<Option<StopReason>>,
}

impl HeldJob {
    /// Stops the job for `reason` (the first reason wins).
    pub(crate) fn stop(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason);
        }
        self.cancel.cancel();
    }

    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The entries this worker holds, by entry id.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held(Arc<Mutex<HashMap<String, Arc<HeldJob>>>>);

impl Held {
    pub(crate) fn insert(&self, entry_id: String, job: Arc<HeldJob>) {
        self.lock().insert(entry_id, job);
    }

    pub(crate) fn remove(&self, entry_id: &str) {
        self.lock().remove(entry_id);
    }

    pub(crate) fn snapshot(&self) -> Vec<(String, Arc<HeldJob>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<HeldJob>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Renews every held entry every `lease / 3` until `stop` fires. Sends nothing while the
/// worker holds nothing.
pub(crate) async fn renew_loop(
    redis: Redis,
    keys: QueueKeys,
    consumer: String,
    node: String,
    lease: Duration,
    held: Held,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let jobs = held.snapshot();
        if jobs.is_empty() {
            continue;
        }
        if let Err(e) = renew_once(&redis, &keys, &consumer, &node, lease, &jobs).await {
            tracing::warn!(error = %e, held = jobs.len(), "lease renewal failed; will retry at the next tick");
        }
    }
}

async fn renew_once(
    redis: &Redis,
    keys: &QueueKeys,
    consumer: &str,
    node: &str,
    lease: Duration,
    jobs: &[(String, Arc<HeldJob>)],
) -> Result<(), fleetq_broker::Error> {
    let mut cmd = fcall("fleetq_renew", keys);
    cmd.arg(consumer).arg(lease.as_millis() as u64).arg(node);
    for (entry_id, job) in jobs {
        cmd.arg(entry_id).arg(job.deliveries).arg(&job.job_id);
    }
    let replies: Vec<String> = functions::call(&mut redis.conn(), &cmd, "renew leases").await?;
    for ((entry_id, job), reply) in jobs.iter().zip(replies) {
        match reply.as_str() {
            "lost" => {
                tracing::warn!(job = %job.job_id, entry = %entry_id, "lease lost: another host holds this job now; stopping the local run");
                job.stop(StopReason::LeaseLost);
            }
            "cancel" => {
                tracing::info!(job = %job.job_id, "cancel requested by a producer; stopping the job");
                job.stop(StopReason::Cancelled);
            }
            _ => {}
        }
    }
    Ok(())
}
