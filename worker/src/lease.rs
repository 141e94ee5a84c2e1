//! Leases: the entries this worker holds, the loop that renews them all every lease/3 in one
//! ownership-checked call (`fleetq_renew`), and self-fencing.
//!
//! A renewal that finds an entry held by someone else stops the local run at once
//! ([`StopReason::LeaseLost`]): another host has it now, and this one could not commit anyway.
//! A host that cannot renew at all (Redis unreachable from here) stops its running jobs once
//! `lease - margin` has passed since Redis last confirmed them ([`StopReason::SelfFenced`]):
//! by then another host may be taking them over. A job whose handler already finished is not
//! stopped: it only waits to record its result, which fencing keeps safe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleetq_broker::calls::{self, Caller, HoldReply, Holding};
use fleetq_broker::functions;
use fleetq_broker::{QueueKeys, Redis};
use tokio_util::sync::CancellationToken;

/// Why a running job was stopped by the runtime rather than finishing by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Another host (or a newer take of the same entry) holds it now.
    LeaseLost,
    /// Redis could not confirm the lease for `lease - margin`: stopped before another host
    /// may have taken it over.
    SelfFenced,
    /// A producer cancelled the job.
    Cancelled,
    /// The worker is shutting down and the grace period ran out.
    Shutdown,
}

/// One entry this worker holds.
#[derive(Debug)]
pub(crate) struct HeldJob {
    /// Entry, job and the token of this take: what every renewal, report and commit presents.
    pub(crate) holding: Holding,
    /// Fires when the job must stop; the handler sees it through its context.
    pub(crate) cancel: CancellationToken,
    /// The first reason it was stopped for.
    reason: Mutex<Option<StopReason>>,
    /// When Redis last confirmed this worker holds the entry (take or renewal sent then):
    /// self-fencing counts from here.
    confirmed: Mutex<Instant>,
    /// The handler is done: the job only waits for its commit and is not self-fenced.
    finished: AtomicBool,
}

impl HeldJob {
    pub(crate) fn new(holding: Holding) -> Self {
        Self {
            holding,
            cancel: CancellationToken::new(),
            reason: Mutex::new(None),
            confirmed: Mutex::new(Instant::now()),
            finished: AtomicBool::new(false),
        }
    }

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

    /// The handler returned: from now on the job only waits for its commit.
    pub(crate) fn mark_finished(&self) {
        self.finished.store(true, Ordering::SeqCst);
    }

    fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    fn confirm(&self, at: Instant) {
        let mut c = self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *c = (*c).max(at);
    }

    /// When Redis last confirmed the lease.
    pub(crate) fn confirmed_at(&self) -> Instant {
        *self
            .confirmed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The entries this worker holds, by entry id; each with the token of its take.
#[derive(Debug, Clone, Default)]
pub(crate) struct Held(Arc<Mutex<HashMap<String, Arc<HeldJob>>>>);

impl Held {
    /// Holds `job`; returns an older take of the same entry, which the caller must stop.
    pub(crate) fn insert(&self, job: Arc<HeldJob>) -> Option<Arc<HeldJob>> {
        let older = self
            .lock()
            .insert(job.holding.entry_id.clone(), job.clone());
        older.filter(|o| o.holding.token != job.holding.token)
    }

    /// Forgets `job`, unless a newer take of its entry replaced it.
    pub(crate) fn remove(&self, job: &HeldJob) {
        let mut map = self.lock();
        if map
            .get(&job.holding.entry_id)
            .is_some_and(|j| j.holding.token == job.holding.token)
        {
            map.remove(&job.holding.entry_id);
        }
    }

    pub(crate) fn contains(&self, entry_id: &str) -> bool {
        self.lock().contains_key(entry_id)
    }

    pub(crate) fn snapshot(&self) -> Vec<Arc<HeldJob>> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<HeldJob>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Renews the held entries; shared by the renewal loop and the read loop (which renews
/// everything before reading again after Redis was unreachable).
#[derive(Debug, Clone)]
pub(crate) struct Renewer {
    pub(crate) redis: Redis,
    pub(crate) keys: QueueKeys,
    pub(crate) caller: Caller,
    pub(crate) lease: Duration,
    pub(crate) held: Held,
}

impl Renewer {
    /// Time without a confirmed lease after which a running job is stopped.
    pub(crate) fn fence_after(&self) -> Duration {
        let margin = (self.lease / 5).max(Duration::from_millis(200));
        self.lease.saturating_sub(margin)
    }

    /// Renews every held entry once (nothing is sent when none is held).
    pub(crate) async fn renew_all(&self) -> Result<(), fleetq_broker::Error> {
        let jobs = self.held.snapshot();
        if jobs.is_empty() {
            return Ok(());
        }
        let sent = Instant::now();
        let holdings: Vec<&Holding> = jobs.iter().map(|j| &j.holding).collect();
        let cmd = calls::renew(&self.keys, &self.caller, self.lease, &holdings);
        let mut conn = self.redis.conn();
        let call = functions::call::<Vec<String>>(&mut conn, &cmd, "renew leases");
        let replies = tokio::time::timeout(self.lease / 3, call)
            .await
            .map_err(|_| fleetq_broker::Error::Timeout {
                what: "the lease renewal".into(),
                after: self.lease / 3,
            })??;
        for (job, word) in jobs.iter().zip(replies) {
            apply(job, HoldReply::parse("renew leases", &word)?, sent);
        }
        Ok(())
    }

    /// Stops running jobs whose lease Redis has not confirmed for [`Self::fence_after`];
    /// returns when the next one falls due.
    fn fence_overdue(&self) -> Option<Instant> {
        let limit = self.fence_after();
        let mut next: Option<Instant> = None;
        for job in self.held.snapshot() {
            if job.is_finished() || job.stop_reason().is_some() {
                continue;
            }
            let due = job.confirmed_at() + limit;
            if due <= Instant::now() {
                tracing::warn!(job = %job.holding.job_id, after_ms = limit.as_millis() as u64,
                    "cannot reach Redis to renew the lease; stopping the local run before another host takes the job over");
                job.stop(StopReason::SelfFenced);
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// Renews every `lease / 3` and self-fences overdue jobs until `stop` fires.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let every = self.lease / 3;
        let mut next_renew = Instant::now() + every;
        loop {
            let fence_at = self.fence_overdue();
            let wake = fence_at.map_or(next_renew, |f| f.min(next_renew));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            if Instant::now() < next_renew {
                continue;
            }
            next_renew = Instant::now() + every;
            let renewal = self.renew_all();
            tokio::pin!(renewal);
            let result = loop {
                let fence_at = self.fence_overdue();
                tokio::select! {
                    r = &mut renewal => break r,
                    _ = stop.cancelled() => return,
                    _ = sleep_until_or_never(fence_at) => {}
                }
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, held = self.held.len(), "lease renewal failed; will retry at the next tick");
            }
        }
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Acts on one entry's renewal reply.
fn apply(job: &HeldJob, reply: HoldReply, sent: Instant) {
    match reply {
        HoldReply::Ok => job.confirm(sent),
        HoldReply::Cancel => {
            job.confirm(sent);
            if job.stop_reason().is_none() {
                tracing::info!(job = %job.holding.job_id, "cancel requested by a producer; stopping the job");
            }
            job.stop(StopReason::Cancelled);
        }
        // A job that finished is committing (or just committed): its commit is fenced or
        // already done, so there is nothing to stop and nothing to warn about.
        HoldReply::Lost if job.is_finished() => job.stop(StopReason::LeaseLost),
        HoldReply::Lost => {
            if job.stop_reason().is_none() {
                tracing::warn!(job = %job.holding.job_id, entry = %job.holding.entry_id,
                    "lease lost: another host holds this job now; stopping the local run");
            }
            job.stop(StopReason::LeaseLost);
        }
    }
}
