//! Fenced completion: every end of an attempt is one `fleetq_complete` call that first checks
//! this worker still holds the entry (consumer and token), then records the result or error,
//! acknowledges, deletes the entry and emits the event — all or nothing. A late result from a
//! host that lost its lease is refused ("fenced"), counted and logged.
//!
//! A computed result is never thrown away while it can still be recorded: a commit that fails
//! for a transient reason (Redis down, loading, read-only during a failover) is tried again,
//! with the job still held and renewed, until Redis answers — accepted or fenced — or the
//! worker's hard stop. Only a release (nothing computed to keep) gives up once its lease has
//! surely run out.

use std::time::Instant;

use fleetq_broker::calls;
pub(crate) use fleetq_broker::calls::{Commit, Committed, Ending};
use fleetq_broker::functions;
use fleetq_broker::retry::{Backoff, OutageLog};
use fleetq_broker::{QueueKeys, Redis};
use tokio_util::sync::CancellationToken;

use crate::lease::HeldJob;

/// Where and as whom commits are made.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    pub(crate) redis: Redis,
    pub(crate) keys: QueueKeys,
    pub(crate) consumer: String,
    pub(crate) lease: std::time::Duration,
    /// Cancelled when the worker stops for good: commits still failing then are given up.
    pub(crate) hard_stop: CancellationToken,
}

impl Committer {
    /// One `fleetq_complete` call.
    pub(crate) async fn commit_once(
        &self,
        job: &HeldJob,
        commit: &Commit,
        ending: &Ending,
    ) -> Result<Committed, fleetq_broker::Error> {
        let cmd = calls::complete(&self.keys, &self.consumer, &job.holding, commit, ending);
        let word: String = functions::call(&mut self.redis.conn(), &cmd, "complete").await?;
        let committed = Committed::parse(&word)?;
        let id = &job.holding.job_id;
        match committed {
            Committed::Fenced => {
                tracing::warn!(job = %id, entry = %job.holding.entry_id, ?commit,
                    "commit refused: this worker lost its lease on the job; another host owns it now");
            }
            Committed::Poison => {
                tracing::warn!(job = %id, "job failed on too many distinct nodes: dead-lettered as poison");
            }
            Committed::Ok => {}
        }
        Ok(committed)
    }

    /// Commits until Redis answers (see the module docs); `None` when given up.
    pub(crate) async fn commit(
        &self,
        job: &HeldJob,
        commit: &Commit,
        ending: &Ending,
    ) -> Option<Committed> {
        let mut backoff = Backoff::default();
        let mut outage = OutageLog::default();
        loop {
            let e = match self.commit_once(job, commit, ending).await {
                Ok(c) => {
                    let _ = outage.recovered();
                    return Some(c);
                }
                Err(e) => e,
            };
            // A bad queue config stops every function until fixed: keep the result and try
            // again, as through an outage.
            if !e.is_transient() && !e.is_bad_config() {
                tracing::error!(job = %job.holding.job_id, error = %e,
                    "cannot record the end of the job; its lease will run out and another host will run it again");
                return None;
            }
            if self.give_up(job, commit) {
                return None;
            }
            let _ = outage.failed("record the end of a job", &e);
            tokio::select! {
                _ = tokio::time::sleep(backoff.next()) => {}
                _ = self.hard_stop.cancelled() => {}
            }
        }
    }

    /// Whether to stop trying: at the hard stop, or for a release once the lease is surely over.
    fn give_up(&self, job: &HeldJob, commit: &Commit) -> bool {
        if self.hard_stop.is_cancelled() {
            tracing::error!(job = %job.holding.job_id, ?commit,
                "stopping with the end of this job unrecorded (Redis unreachable); another host will run it again");
            return true;
        }
        let lease_over = Instant::now() > job.confirmed_at() + self.lease * 2;
        if *commit == Commit::Release && lease_over {
            tracing::warn!(job = %job.holding.job_id,
                "cannot give the job back (Redis unreachable); its lease has run out, so another host takes it");
            return true;
        }
        false
    }
}
