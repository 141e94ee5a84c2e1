//! What every part of a running worker shares: who it is, how it takes, renews and commits,
//! the jobs it holds, its free slots, its node record and its handler.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fleetq_broker::functions::{self, fcall};
use fleetq_broker::{QueueConfig, QueueKeys, Redis};
use tokio::sync::Semaphore;

use crate::completion::Committer;
use crate::config::WorkerConfig;
use crate::lease::{Held, Renewer};
use crate::node::{epoch_ms, NodeHandle};
use crate::take::Taker;

/// The state shared by the read loop, the slot tasks, the renewer and the shutdown.
pub(crate) struct Runtime<H> {
    /// Who takes, with which lease, and whether a job counts as started when taken.
    pub(crate) taker: Taker,
    /// Records the ends of attempts, fenced, retrying through outages.
    pub(crate) committer: Committer,
    /// Renews the held leases; the read loop calls it directly after an outage.
    pub(crate) renewer: Renewer,
    pub(crate) config: WorkerConfig,
    /// The queue's defaults (timeouts, attempts, backoff), refreshed every `config_refresh`.
    pub(crate) queue: Mutex<QueueConfig>,
    /// Shared by the queue's partitions (one runtime each).
    pub(crate) handler: Arc<H>,
    /// The entries held now with their tokens: renewed, fenced, and released at shutdown.
    pub(crate) held: Held,
    /// This host's record, health and metrics.
    pub(crate) node: NodeHandle,
    /// Free slots: a read asks for no more entries than there are permits.
    pub(crate) slots: Arc<Semaphore>,
}

impl<H> Runtime<H> {
    pub(crate) fn queue_config(&self) -> QueueConfig {
        self.queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_queue_config(&self, q: QueueConfig) {
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = q;
    }

    pub(crate) fn redis(&self) -> &Redis {
        &self.taker.redis
    }

    pub(crate) fn keys(&self) -> &QueueKeys {
        &self.taker.keys
    }

    pub(crate) fn consumer(&self) -> &str {
        &self.taker.caller.consumer
    }

    /// Promotes the queue's due delayed jobs after `delay`: the retry or hand-off this worker
    /// just scheduled then goes back in line on time, waking blocked readers, whatever the
    /// other workers' timers say.
    pub(crate) fn schedule_promote(&self, delay: Duration) {
        let redis = self.redis().clone();
        let keys = self.keys().clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay + Duration::from_millis(5)).await;
            let mut cmd = fcall("fleetq_promote", &keys);
            cmd.arg(100);
            if let Err(e) = functions::call::<(u64, u64)>(&mut redis.conn(), &cmd, "promote").await
            {
                tracing::warn!(error = %e, "cannot promote due retries; idle workers and brokers will");
            }
        });
    }

    /// Counts a failure or timeout in this node's streak; suspends the node after K in a row.
    pub(crate) async fn node_failed(&self) {
        let health = &self.node.health;
        let streak = health.failure();
        let k = self.config.suspend_after;
        if k > 0 && streak >= k && health.suspended_for().is_none() {
            let until = epoch_ms() + self.config.suspend_for.as_millis() as u64;
            self.node
                .suspend(until, &format!("{streak} failures or timeouts in a row"))
                .await;
        }
    }
}
