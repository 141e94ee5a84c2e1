//! The read loop: wait for a free slot, then reclaim stale entries when one may be due or
//! block in `XREADGROUP … COUNT free BLOCK t >` (on a connection of its own), pass what came
//! to `fleetq_take` and start a slot task for each job that runs here.
//!
//! Redis unreachable is a state, not an error: the loop backs off (capped at half a second,
//! jittered, so it is back within a second of Redis being ready), says so once, and on the
//! way back first renews every lease it holds and re-reads its own pending entries, then
//! waits half a lease before it judges other hosts' leases, so that live holders renew first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetq_broker::calls::{Commit, TakeDecision};
use fleetq_broker::retry::{Backoff, OutageLog};
use fleetq_broker::{JobEntry, Malformed, QueueConfig, RawEntry};
use redis::aio::MultiplexedConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::attempt;
use crate::completion::Ending;
use crate::handler::Handler;
use crate::lease::HeldJob;
use crate::reclaim;
use crate::runtime::Runtime;
use crate::take::{self, Taken};
use crate::Error;

/// The read loop's own state.
pub(crate) struct Intake<H> {
    rt: Arc<Runtime<H>>,
    /// The blocking reader's connection; dropped on error or suspension, made again lazily.
    reader: Option<MultiplexedConnection>,
    /// Longest single block (the configured one, capped by the lease).
    max_block: Duration,
    /// When a lease deadline or a retry may next fall due: reclaim then.
    next_wake: Instant,
    /// When to re-read the queue config.
    next_refresh: Instant,
    /// No reclaim before this (half a lease after coming back from an outage).
    reclaim_after: Instant,
    /// Set after an error (and at start): renew and re-read own entries before anything else.
    recovering: bool,
    /// Set after an error: on the way back, leave other hosts' leases alone for half a lease.
    after_error: bool,
    backoff: Backoff,
    outage: OutageLog,
    /// Slot tasks.
    pub(crate) tasks: JoinSet<()>,
}

impl<H: Handler> Intake<H> {
    pub(crate) fn new(rt: Arc<Runtime<H>>, max_block: Duration) -> Self {
        let now = Instant::now();
        let refresh = rt.config.config_refresh;
        Self {
            rt,
            reader: None,
            max_block,
            next_wake: now,
            next_refresh: now + refresh,
            reclaim_after: now,
            // On start, too, this consumer's own pending entries come first.
            recovering: true,
            after_error: false,
            backoff: Backoff::default(),
            outage: OutageLog::default(),
            tasks: JoinSet::new(),
        }
    }

    /// Runs the loop until `stop` fires.
    pub(crate) async fn run(&mut self, stop: &CancellationToken) {
        while !stop.is_cancelled() {
            while self.tasks.try_join_next().is_some() {}
            // Not cut short by `stop` except where it waits: a batch taken is always dispatched.
            match self.step(stop).await {
                Ok(()) => {
                    self.backoff.reset();
                    let _ = self.outage.recovered();
                }
                Err(e) => self.recover(e, stop).await,
            }
        }
        self.reader = None;
    }

    /// One turn: recover, wait for capacity, then reclaim or read, and dispatch.
    async fn step(&mut self, stop: &CancellationToken) -> Result<(), Error> {
        if self.recovering {
            self.come_back().await?;
        }
        if let Some(left) = self.rt.node.health.suspended_for() {
            return self.wait_suspended(left, stop).await;
        }
        let free = self.rt.slots.available_permits();
        if free == 0 {
            tokio::select! {
                permit = self.rt.slots.clone().acquire_owned() => drop(permit),
                _ = stop.cancelled() => {}
            }
            return Ok(());
        }
        self.refresh_config().await;
        let entries = if Instant::now() >= self.next_wake && Instant::now() >= self.reclaim_after {
            self.reclaim(free).await?
        } else {
            Vec::new()
        };
        let entries = match entries.is_empty() {
            false => entries,
            true => match self.read(free, stop).await? {
                Some(e) => e,
                None => return Ok(()),
            },
        };
        self.dispatch(entries).await
    }

    /// Back from an outage (or starting): renew what is held, then take back this consumer's
    /// own pending entries that nothing here holds (Redis may have rolled back a take).
    async fn come_back(&mut self) -> Result<(), Error> {
        self.rt.renewer.renew_all().await?;
        // Every entry of ours: the held ones come back too and are skipped.
        let count = self.rt.config.slots + self.rt.held.len();
        let mut conn = self.take_reader().await?;
        let own = take::read(
            &mut conn,
            self.rt.keys(),
            self.rt.consumer(),
            count,
            None,
            true,
        )
        .await
        .map_err(|e| fleetq_broker::Error::redis("read own pending entries", e))?;
        self.reader = Some(conn);
        let forgotten: Vec<RawEntry> = own
            .into_iter()
            .filter(|e| !self.rt.held.contains(&e.id))
            .collect();
        self.dispatch(forgotten).await?;
        self.recovering = false;
        if std::mem::take(&mut self.after_error) {
            self.reclaim_after = Instant::now() + self.rt.taker.lease / 2;
        }
        Ok(())
    }

    async fn wait_suspended(
        &mut self,
        left: Duration,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let changed = self.rt.node.health.changed.notified();
        tokio::select! {
            _ = tokio::time::sleep(left) => self.rt.node.resume("suspension over").await,
            _ = changed => {}
            _ = stop.cancelled() => {}
        }
        Ok(())
    }

    async fn refresh_config(&mut self) {
        if Instant::now() < self.next_refresh {
            return;
        }
        self.next_refresh = Instant::now() + self.rt.config.config_refresh;
        match QueueConfig::load(&mut self.rt.redis().conn(), self.rt.keys()).await {
            Ok(q) => self.rt.set_queue_config(q),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the queue config; keeping the old one")
            }
        }
    }

    async fn reclaim(&mut self, free: usize) -> Result<Vec<RawEntry>, Error> {
        let rt = &self.rt;
        let r = reclaim::reclaim(
            rt.redis(),
            rt.keys(),
            &rt.taker.caller,
            rt.taker.lease,
            free,
        )
        .await?;
        let wake = r.next_wake.unwrap_or(self.max_block).min(self.max_block);
        self.next_wake = Instant::now() + wake;
        if !r.entries.is_empty() {
            rt.node.metrics.reclaimed.inc_by(r.entries.len() as u64);
            tracing::info!(
                count = r.entries.len(),
                "reclaimed entries whose lease ran out"
            );
        }
        Ok(r.entries)
    }

    /// Blocks for new entries until the next wake; `None` when the stop cut it short or the
    /// node was suspended meanwhile (what the read brought is given back).
    async fn read(
        &mut self,
        free: usize,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<RawEntry>>, Error> {
        let wake = self.next_wake.max(self.reclaim_after);
        let block = wake
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), self.max_block);
        let rt = self.rt.clone();
        let mut conn = self.take_reader().await?;
        let read = take::read(
            &mut conn,
            rt.keys(),
            rt.consumer(),
            free,
            Some(block),
            false,
        );
        // A read dropped while blocked still delivers: redis-rs keeps the connection until
        // the reply comes, and the entries land in this consumer's pending list unseen. So a
        // suspension waits the read out and gives back what it brought; only the stop drops
        // it (the process is going, and with it the connection).
        let r = tokio::select! {
            r = read => r,
            _ = stop.cancelled() => return Ok(None),
        };
        let entries = r.map_err(|e| fleetq_broker::Error::redis("read jobs", e))?;
        self.reader = Some(conn);
        if rt.node.health.suspended_for().is_some() {
            let back = entries.iter().map(|e| (e.id.clone(), e.job_id())).collect();
            crate::shutdown::release(&rt, back, "while suspended").await;
            return Ok(None);
        }
        Ok(Some(entries))
    }

    /// The reader's connection (made when there is none); the caller gives it back when the
    /// read went well.
    async fn take_reader(&mut self) -> Result<MultiplexedConnection, Error> {
        match self.reader.take() {
            Some(c) => Ok(c),
            None => Ok(self
                .rt
                .redis()
                .blocking_conn(&self.rt.keys().stream(), self.max_block)
                .await?),
        }
    }

    /// After a failed step: say so once per outage, wait, and come back carefully.
    async fn recover(&mut self, e: Error, stop: &CancellationToken) {
        self.reader = None;
        self.recovering = true;
        self.after_error = true;
        if let Error::Queue(fleetq_broker::Error::Redis { source, .. }) = &e {
            if source.code() == Some("NOGROUP") {
                // The stream was deleted (or the server restarted empty): recreate.
                let _ = take::ensure_group(self.rt.redis(), self.rt.keys()).await;
            }
        }
        match &e {
            Error::Queue(q) if q.is_transient() => {
                self.outage.failed("read jobs", q);
            }
            _ => tracing::warn!(error = %e, "worker step failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(self.backoff.next()) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Passes entries to `fleetq_take` and starts a slot task for each job that runs here.
    async fn dispatch(&mut self, entries: Vec<RawEntry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let queue = self.rt.queue_config();
        let taken = take::take(&self.rt.taker, &queue, entries).await?;
        for (t, job) in taken {
            match t.decision {
                TakeDecision::Run { attempt } => self.start(t, attempt, job, &queue).await,
                TakeDecision::Pass { delay } => self.rt.schedule_promote(delay),
                other => self.count_settled(other),
            }
        }
        Ok(())
    }

    fn count_settled(&self, decision: TakeDecision) {
        let m = &self.rt.node.metrics;
        match decision {
            TakeDecision::Expired => {
                m.outcome("expired");
                m.timeout("queue");
            }
            TakeDecision::Cancelled => m.outcome("cancelled"),
            TakeDecision::Dead => m.outcome("dead"),
            _ => {}
        }
    }

    async fn start(
        &mut self,
        t: Taken,
        attempt: u32,
        job: Result<JobEntry, Malformed>,
        queue: &QueueConfig,
    ) {
        let entry = match job {
            Ok(entry) => entry,
            Err(malformed) => return self.dead_letter(t, malformed).await,
        };
        let Ok(permit) = self.rt.slots.clone().try_acquire_owned() else {
            // Cannot happen: no more is read than there are free slots. Give it back.
            tracing::error!(job = %t.holding.job_id, "no free slot for a job read for a free slot; releasing it");
            let held = HeldJob::new(t.holding);
            self.rt
                .committer
                .commit(&held, &Commit::Release, &Ending::default())
                .await;
            return;
        };
        let rt = self.rt.clone();
        self.tasks
            .spawn(attempt::run(rt, t, attempt, entry, queue.clone(), permit));
    }

    async fn dead_letter(&self, t: Taken, malformed: Malformed) {
        tracing::warn!(entry = %t.holding.entry_id, reason = %malformed, "malformed entry sent to the dead letters");
        let commit = Commit::Dead {
            reason: fleetq_broker::calls::DeadReason::Malformed,
            error: malformed.to_string(),
        };
        let held = Arc::new(HeldJob::new(t.holding));
        held.mark_finished();
        self.rt.held.insert(held.clone());
        let committed = self
            .rt
            .committer
            .commit(&held, &commit, &Ending::default())
            .await;
        self.rt.held.remove(&held);
        if committed == Some(fleetq_broker::calls::Committed::Ok) {
            self.rt.node.metrics.outcome("dead");
        }
    }
}
