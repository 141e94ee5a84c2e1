//! Fenced completion: every end of an attempt goes through `fleetq_complete`, which first
//! checks this worker still holds the entry (its token), then records the result or error,
//! acknowledges and deletes the entry — all or nothing for each entry. A late result from a
//! host that lost its lease is refused ("fenced"), counted and logged.
//!
//! Ends are batched: the attempts that end while a call is on its way (or in the same turn of
//! the scheduler) go together in the next call, so Redis does its per-call work (the config,
//! the clock, the acknowledgement and deletion, the counters) once per batch. One call is on
//! its way at a time per stream; a batch holds at most [`MAX_BATCH`] ends. The slots of a
//! batch's jobs are freed together when Redis has recorded them, so the next read asks for
//! all of them at once (and the next take and completion are as large).
//!
//! While the read loop of a busy stream waits for slots, it *carries* the first-attempt
//! successes instead ([`Committer::carry`]): the batching task hands them to it, and it
//! records them with its next read and take in one `fleetq_take_next` (see `intake`).
//!
//! A computed result is never thrown away while it can still be recorded: a commit that fails
//! for a transient reason (Redis down, loading, read-only during a failover) is tried again,
//! with the job still held and renewed, until Redis answers — accepted or fenced — or the
//! worker's hard stop. Only a release (nothing computed to keep) gives up once its lease has
//! surely run out.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use fleetq_broker::calls::{self, Caller, Completion, Holding};
pub(crate) use fleetq_broker::calls::{Commit, Committed, Ending};
use fleetq_broker::functions;
use fleetq_broker::retry::{Backoff, OutageLog};
use fleetq_broker::{QueueKeys, Redis};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::lease::HeldJob;

/// Most attempt ends in one `fleetq_complete` call.
pub(crate) const MAX_BATCH: usize = 128;

/// Scheduler turns a carried end waits for the ends of the other busy slots.
const GATHER_TURNS: usize = 4;

/// Ends on their way to Redis, across the worker's streams. The read loop waits for them
/// before it reads for only part of the slots: their slots come free together a moment
/// later, and one read, take and completion for all of them costs Redis less than several.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    answered: Notify,
}

impl InFlight {
    /// Whether some end is on its way.
    pub(crate) fn busy(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Returns once no end is on its way.
    pub(crate) async fn settled(&self) {
        loop {
            let answered = self.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if !self.busy() {
                return;
            }
            answered.await;
        }
    }

    fn sent(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn answered(&self, n: usize) {
        self.count.fetch_sub(n, Ordering::AcqRel);
        self.answered.notify_waiters();
    }
}

/// Why a commit was not recorded, with the job's slot given back to keep while it tries again.
pub(crate) type NotRecorded = (Arc<fleetq_broker::Error>, Option<OwnedSemaphorePermit>);

/// One end waiting for the next call, with the job's slot (freed once it is recorded) and
/// where its answer goes.
#[derive(Debug)]
struct Request {
    holding: Holding,
    attempt: u32,
    commit: Commit,
    ending: Ending,
    slot: Option<OwnedSemaphorePermit>,
    reply: oneshot::Sender<Result<Committed, NotRecorded>>,
}

impl Request {
    fn completion(&self) -> Completion<'_> {
        Completion {
            held: &self.holding,
            attempt: self.attempt,
            commit: &self.commit,
            ending: &self.ending,
        }
    }
}

/// Hands each request of `batch` its answer (see [`Carried::answer`]), emptying it.
fn answer(batch: &mut Vec<Request>, answered: Result<Vec<Committed>, Arc<fleetq_broker::Error>>) {
    match answered {
        Ok(words) => {
            // The batch's slots are freed together, after every job has its answer.
            let mut slots = Vec::with_capacity(batch.len());
            for (mut r, c) in batch.drain(..).zip(words) {
                slots.push(r.slot.take());
                let _ = r.reply.send(Ok(c));
            }
            drop(slots);
        }
        Err(e) => {
            for mut r in batch.drain(..) {
                let slot = r.slot.take();
                let _ = r.reply.send(Err((e.clone(), slot)));
            }
        }
    }
}

/// Where and as whom commits are made.
#[derive(Debug, Clone)]
pub(crate) struct Committer {
    pub(crate) lease: std::time::Duration,
    /// Cancelled when the worker stops for good: commits still failing then are given up.
    pub(crate) hard_stop: CancellationToken,
    /// Shared by the committers of all the worker's streams.
    pub(crate) in_flight: Arc<InFlight>,
    batches: mpsc::UnboundedSender<Request>,
    carry: Arc<Carry>,
}

/// First-attempt successes held back for the read loop while it carries them.
#[derive(Debug, Default)]
struct Carry {
    state: Mutex<CarryState>,
    came: Notify,
}

#[derive(Debug, Default)]
struct CarryState {
    on: bool,
    ends: Vec<Request>,
}

impl Carry {
    fn state(&self) -> std::sync::MutexGuard<'_, CarryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the first-attempt successes out of `batch` while the read loop carries them.
    fn divert(&self, batch: &mut Vec<Request>) {
        let mut state = self.state();
        if !state.on {
            return;
        }
        let (firsts, rest): (Vec<Request>, Vec<Request>) = batch
            .drain(..)
            .partition(|r| r.completion().first_success().is_some());
        *batch = rest;
        if !firsts.is_empty() {
            state.ends.extend(firsts);
            self.came.notify_one();
        }
    }
}

/// Ends the read loop carries: it records them with its next read ([`Carried::answer`]).
/// Dropped unanswered, they go back to the batching task.
#[derive(Debug)]
pub(crate) struct Carried {
    batch: Vec<Request>,
    in_flight: Arc<InFlight>,
    back: mpsc::UnboundedSender<Request>,
}

impl Carried {
    /// How many ends.
    pub(crate) fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }

    /// The ends as a call records them.
    pub(crate) fn completions(&self) -> Vec<Completion<'_>> {
        self.batch.iter().map(Request::completion).collect()
    }

    /// Hands each end its answer: the call's words (their slots are freed first, together),
    /// or the call's error (each end then tries again, with its slot).
    pub(crate) fn answer(mut self, answered: Result<Vec<Committed>, Arc<fleetq_broker::Error>>) {
        let _answered = Answered(&self.in_flight, self.batch.len());
        answer(&mut self.batch, answered);
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        for r in self.batch.drain(..) {
            // Refused only when the batching task has stopped: the end's own loop then hears
            // so and gives up.
            if self.back.send(r).is_err() {
                self.in_flight.answered(1);
            }
        }
    }
}

impl Committer {
    /// A committer for the stream `keys`, with its batching task (which ends when the last
    /// clone of the committer is dropped). Needs a Tokio runtime.
    pub(crate) fn new(
        redis: Redis,
        keys: QueueKeys,
        caller: Caller,
        lease: std::time::Duration,
        in_flight: Arc<InFlight>,
    ) -> Self {
        let (batches, rx) = mpsc::unbounded_channel();
        let carry = Arc::new(Carry::default());
        tokio::spawn(send_batches(
            redis,
            keys,
            caller,
            rx,
            in_flight.clone(),
            carry.clone(),
        ));
        Self {
            lease,
            in_flight,
            hard_stop: CancellationToken::new(),
            batches,
            carry,
        }
    }

    /// Carries the first-attempt successes that end from now on, until one comes or `until`
    /// resolves: returns those carried (maybe none), to be recorded by the caller's next
    /// call ([`Carried::answer`]). Other ends are sent as always meanwhile.
    ///
    /// `busy`: the slots busy when it starts. Once the first end comes, the others that are
    /// about to (the jobs that end together) get a few scheduler turns to join it, so that
    /// the call records and reads for as many slots as it can.
    pub(crate) async fn carry(&self, until: impl Future<Output = ()>, busy: usize) -> Carried {
        let came = self.carry.came.notified();
        tokio::pin!(came, until);
        came.as_mut().enable();
        self.carry.state().on = true;
        let first = tokio::select! {
            _ = came => true,
            _ = until => false,
        };
        if first {
            for _ in 0..GATHER_TURNS {
                if self.carry.state().ends.len() >= busy {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        let ends = {
            let mut state = self.carry.state();
            state.on = false;
            std::mem::take(&mut state.ends)
        };
        Carried {
            batch: ends,
            in_flight: self.in_flight.clone(),
            back: self.batches.clone(),
        }
    }

    /// Records one end in the next batch's `fleetq_complete` call, once. `slot` (the job's)
    /// is freed when Redis answered, else handed back with the error.
    pub(crate) async fn commit_once(
        &self,
        job: &HeldJob,
        attempt: u32,
        commit: &Commit,
        ending: &Ending,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Result<Committed, NotRecorded> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            holding: job.holding.clone(),
            attempt,
            commit: commit.clone(),
            ending: ending.clone(),
            slot,
            reply,
        };
        let gone = || {
            Arc::new(fleetq_broker::Error::Config(
                "the worker's commit task has stopped".into(),
            ))
        };
        self.in_flight.sent();
        if let Err(e) = self.batches.send(request) {
            self.in_flight.answered(1);
            return Err((gone(), e.0.slot));
        }
        let committed = answer.await.map_err(|_| (gone(), None))??;
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
    /// `slot`: the job's, held until the end is recorded (or given up).
    pub(crate) async fn commit(
        &self,
        job: &HeldJob,
        attempt: u32,
        commit: &Commit,
        ending: &Ending,
        mut slot: Option<OwnedSemaphorePermit>,
    ) -> Option<Committed> {
        let mut backoff = Backoff::default();
        let mut outage = OutageLog::default();
        loop {
            let e = match self.commit_once(job, attempt, commit, ending, slot).await {
                Ok(c) => {
                    let _ = outage.recovered();
                    return Some(c);
                }
                Err((e, back)) => {
                    slot = back;
                    e
                }
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

/// The batching task of one stream: takes the ends waiting, sends them in one call, hands
/// each its answer (all of them the same error when the call failed: each end's own loop then
/// decides to try again). While the read loop carries, its first-attempt successes go to it.
async fn send_batches(
    redis: Redis,
    keys: QueueKeys,
    caller: Caller,
    mut rx: mpsc::UnboundedReceiver<Request>,
    in_flight: Arc<InFlight>,
    carry: Arc<Carry>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        // The slots that finish in the same turn join this call.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        carry.divert(&mut batch);
        if batch.is_empty() {
            continue;
        }
        let items: Vec<Completion<'_>> = batch.iter().map(Request::completion).collect();
        // Counted as answered however this turn ends (a panic below included), so that the
        // read loop never waits for an answer that cannot come.
        let _answered = Answered(&in_flight, batch.len());
        let cmd = calls::complete(&keys, &caller, &items);
        let answered: Result<Vec<Committed>, fleetq_broker::Error> =
            match functions::call::<Vec<String>>(&mut redis.conn(), &cmd, "complete").await {
                Ok(words) => calls::parse_complete(words, batch.len()),
                Err(e) => Err(e),
            };
        answer(&mut batch, answered.map_err(Arc::new));
    }
}

/// Marks a batch's ends answered when dropped.
struct Answered<'a>(&'a InFlight, usize);

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        self.0.answered(self.1);
    }
}
