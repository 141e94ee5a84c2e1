//! The read loop: wait for a free slot, then reclaim stale entries when one may be due or
//! block in `XREADGROUP … COUNT free BLOCK t >` (on a connection of its own), pass what came
//! to `fleetq_take` and start a slot task for each job that runs here.
//!
//! Idle, a worker costs Redis almost nothing: two of a stream's idle workers watch it (see
//! `reclaim`) and block until the next lease deadline or retry, at most a lease; the others
//! block for their whole `max_block` and call `fleetq_reclaim` once per block. A worker that
//! holds or took jobs blocks at most a lease and reclaims again a lease after its last reclaim
//! (its standing in the watch and its node's alive mark are then out of date). A watcher gives
//! its seat up when it has no free slot, is suspended or stops.
//!
//! A queue split in partitions is read stream by stream (each partition, and the queue
//! itself): a sweep without blocking asks each stream in turn for the slots still free, the
//! first stream of the turn rotating. When the sweep finds them all empty, one waiter per
//! stream blocks in `XREAD` (which delivers nothing to the group) for an entry newer than the
//! last one seen before the sweep; the first that wakes starts the next sweep. So a worker
//! never holds more than its free slots, and no stream waits for another's block to end.
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
use futures_util::FutureExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::attempt;
use crate::completion::{Ending, InFlight};
use crate::handler::Handler;
use crate::lease::HeldJob;
use crate::reclaim;
use crate::runtime::Runtime;
use crate::take::{self, Taken};
use crate::Error;

/// Returns once a slot is free while no end is on its way to Redis.
async fn slot_with_nothing_on_its_way(slots: &Semaphore, in_flight: &InFlight) {
    loop {
        in_flight.settled().await;
        if slots.available_permits() > 0 {
            return;
        }
        // Closed only when the worker is gone.
        let Ok(permit) = slots.acquire().await else {
            return std::future::pending().await;
        };
        drop(permit);
    }
}

/// A waiter on a partitioned queue's stream, on its own task: its connection comes back, with
/// whether an entry newer than the mark came.
type Waiter = JoinHandle<Result<(MultiplexedConnection, bool), Error>>;

/// One stream the loop reads: the queue, or one of its partitions (or the queue itself
/// beside them).
struct Source<H> {
    rt: Arc<Runtime<H>>,
    /// The blocking reader's connection; dropped on error or suspension, made again lazily.
    reader: Option<MultiplexedConnection>,
    /// Partitioned queues: the waiter's connection while no waiter runs.
    waiter_conn: Option<MultiplexedConnection>,
    /// Partitioned queues: the waiter in progress.
    waiter: Option<Waiter>,
    /// Partitioned queues: the stream's last entry id, read before a sweep that found
    /// nothing new in it; a waiter waits for an entry newer than this.
    mark: Option<String>,
    /// When to reclaim next: the next lease deadline or retry for the watcher, the end of
    /// the block for the others.
    next_wake: Instant,
    /// This worker watches the stream (its last reclaim said so): it blocks at most a lease.
    watching: bool,
    /// When the stream was last reclaimed.
    reclaimed: Instant,
    /// This worker held or took a job of this stream since then: reclaim again once a lease
    /// has passed (renewals and takes moved its node's alive mark, and a watcher that holds
    /// jobs is the first to hand the watch on).
    busy_since: bool,
    /// When to re-read the stream's config.
    next_refresh: Instant,
    /// No reclaim before this (half a lease after coming back from an outage).
    reclaim_after: Instant,
    /// Set after an error (and at start): renew and re-read own entries before anything else.
    recovering: bool,
    /// Set after an error: on the way back, leave other hosts' leases alone for half a lease.
    after_error: bool,
}

impl<H> Source<H> {
    /// When to reclaim next: at `next_wake`, or a lease after the last reclaim when a job was
    /// held or taken since.
    fn reclaim_at(&self) -> Instant {
        if self.busy_since {
            self.next_wake.min(self.reclaimed + self.rt.taker.lease)
        } else {
            self.next_wake
        }
    }
}

/// The read loop's own state.
pub(crate) struct Intake<H> {
    sources: Vec<Source<H>>,
    /// Free slots, shared by every stream's runtime.
    slots: Arc<Semaphore>,
    /// Longest single block while watching or holding jobs (`max_block` capped by the
    /// lease: no lease may run out unseen).
    watch_block: Duration,
    /// Longest single block otherwise (`max_block`); the blocking connections' response
    /// timeouts are above it.
    max_block: Duration,
    /// The stream a partitioned queue's next turn starts with.
    turn: usize,
    /// Set when every waiter's block ended with nothing new: wait again without a sweep.
    idle: bool,
    /// The last read brought a large entry ([`take::is_large`]): read directly, not through
    /// `fleetq_take_next`.
    large: bool,
    /// Woken when a waiter ends.
    woke: Arc<Notify>,
    backoff: Backoff,
    outage: OutageLog,
    /// Slot tasks.
    pub(crate) tasks: JoinSet<()>,
}

/// A failed step, with the stream it failed on.
struct Failed {
    source: usize,
    error: Error,
}

trait On<T> {
    fn on(self, source: usize) -> Result<T, Failed>;
}

impl<T> On<T> for Result<T, Error> {
    fn on(self, source: usize) -> Result<T, Failed> {
        self.map_err(|error| Failed { source, error })
    }
}

impl<H: Handler> Intake<H> {
    /// The loop over `rts`: one runtime per stream read, all sharing the slots; a watcher
    /// blocks at most `watch_block` (`max_block` capped by the lease).
    pub(crate) fn new(rts: Vec<Arc<Runtime<H>>>, watch_block: Duration) -> Self {
        let now = Instant::now();
        let slots = rts[0].slots.clone();
        let max_block = rts[0].config.max_block.max(watch_block);
        let sources = rts
            .into_iter()
            .map(|rt| Source {
                next_refresh: now + rt.config.config_refresh,
                rt,
                reader: None,
                waiter_conn: None,
                waiter: None,
                mark: None,
                next_wake: now,
                watching: false,
                reclaimed: now,
                busy_since: false,
                reclaim_after: now,
                // On start, too, this consumer's own pending entries come first.
                recovering: true,
                after_error: false,
            })
            .collect();
        Self {
            sources,
            slots,
            watch_block,
            max_block,
            turn: 0,
            idle: false,
            large: false,
            woke: Arc::new(Notify::new()),
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
                Err(f) => self.recover(f, stop).await,
            }
        }
        for s in &mut self.sources {
            if let Some(waiter) = s.waiter.take() {
                waiter.abort();
            }
            s.reader = None;
        }
        self.resign().await;
    }

    fn rt(&self) -> &Arc<Runtime<H>> {
        &self.sources[0].rt
    }

    /// One turn: recover, wait for capacity, then reclaim or read, and dispatch.
    async fn step(&mut self, stop: &CancellationToken) -> Result<(), Failed> {
        for i in 0..self.sources.len() {
            if self.sources[i].recovering {
                self.come_back(i).await.on(i)?;
            }
        }
        self.collect_waiters();
        if let Some(left) = self.rt().node.health.suspended_for() {
            self.resign().await;
            return self.wait_suspended(left, stop).await;
        }
        let in_flight = self.rt().committer.in_flight.clone();
        let free = self.slots.available_permits();
        let waits = free == 0 || (free < self.rt().config.slots && in_flight.busy());
        if waits && self.may_carry() {
            if free == 0 {
                self.resign().await;
            }
            return self.carry(stop).await.on(0);
        }
        if free == 0 {
            self.resign().await;
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => drop(permit),
                _ = stop.cancelled() => {}
            }
            return Ok(());
        }
        if free < self.rt().config.slots && in_flight.busy() {
            // Slots a batch on its way will free: read for them all at once, when it lands.
            tokio::select! {
                _ = in_flight.settled() => {}
                _ = stop.cancelled() => {}
            }
            return Ok(());
        }
        for i in 0..self.sources.len() {
            self.refresh_config(i).await;
        }
        if self.reclaim_due().await? {
            return Ok(());
        }
        match self.sources.len() {
            1 => self.read_one(stop).await.on(0),
            _ => self.read_many(stop).await,
        }
    }

    /// Whether to carry the ends of this stream's jobs into its next read (see `carry`): a
    /// queue read as one stream, whose last entries were small (a big payload costs Redis
    /// less read directly than through a function).
    fn may_carry(&self) -> bool {
        self.sources.len() == 1 && !self.large
    }

    /// Whether stream `i` is due for a reclaim.
    fn reclaim_is_due(&self, i: usize) -> bool {
        let s = &self.sources[i];
        let now = Instant::now();
        now >= s.reclaim_at() && now >= s.reclaim_after
    }

    /// A busy single stream's turn: wait for the next first-attempt successes (or for a slot
    /// with nothing on its way), then record them and read and take for the slots they free
    /// and those already free, in one `fleetq_take_next`. A reclaim due, a suspension or the
    /// stop leave the read to the next turn (the ends are recorded all the same).
    async fn carry(&mut self, stop: &CancellationToken) -> Result<(), Error> {
        let rt = self.rt().clone();
        let (slots, in_flight) = (self.slots.clone(), rt.committer.in_flight.clone());
        let health = rt.node.health.clone();
        let until = async move {
            tokio::select! {
                _ = slot_with_nothing_on_its_way(&slots, &in_flight) => {}
                _ = health.changed.notified() => {}
                _ = stop.cancelled() => {}
            }
        };
        let busy = rt.config.slots - self.slots.available_permits();
        let carried = rt.committer.carry(until, busy).await;
        if carried.is_empty() {
            return Ok(());
        }
        self.refresh_config(0).await;
        let read = !stop.is_cancelled()
            && rt.node.health.suspended_for().is_none()
            && !self.reclaim_is_due(0);
        let count = if read {
            self.slots.available_permits() + carried.len()
        } else {
            0
        };
        let queue = rt.queue_config();
        let next = match take::take_next(&rt.taker, &queue, &carried.completions(), count).await {
            Ok(Some(next)) => next,
            // Only first-attempt successes are carried; any other end would go back to the
            // batching task with the rest, as `carried` does when dropped.
            Ok(None) => return Ok(()),
            Err(e) => {
                carried.answer(Err(Arc::new(e.clone())));
                return Err(Error::Queue(e));
            }
        };
        carried.answer(Ok(next.ends));
        if let Some(why) = next.read_error {
            return self.read_failed(&why).await;
        }
        self.large = next.large;
        self.settle(0, next.taken, &queue).await;
        self.dispatch(0, next.untaken).await
    }

    /// A read inside `fleetq_take_next` failed (the ends were recorded): a missing group is
    /// made again; anything else is a failed step.
    async fn read_failed(&mut self, why: &str) -> Result<(), Error> {
        let rt = self.rt().clone();
        if why.starts_with("NOGROUP") {
            take::ensure_group(rt.redis(), rt.keys()).await?;
            return Ok(());
        }
        Err(Error::Queue(fleetq_broker::Error::Protocol {
            step: "take next",
            detail: format!("the read failed: {why}"),
        }))
    }

    /// Reclaims on every stream where a lease or retry may be due; true when any brought work.
    async fn reclaim_due(&mut self) -> Result<bool, Failed> {
        let mut got = false;
        for k in 0..self.sources.len() {
            let i = (self.turn + k) % self.sources.len();
            let free = self.slots.available_permits();
            let s = &self.sources[i];
            let now = Instant::now();
            if free == 0 || now < s.reclaim_at() || now < s.reclaim_after {
                continue;
            }
            let entries = self.reclaim(i, free).await.on(i)?;
            if !entries.is_empty() {
                got = true;
                self.dispatch(i, entries).await.on(i)?;
            }
        }
        Ok(got)
    }

    /// Back from an outage (or starting): renew what is held, then take back this consumer's
    /// own pending entries that nothing here holds (Redis may have rolled back a take).
    async fn come_back(&mut self, i: usize) -> Result<(), Error> {
        let rt = self.sources[i].rt.clone();
        rt.renewer.renew_all().await?;
        // Every entry of ours: the held ones come back too and are skipped.
        let count = rt.config.slots + rt.held.len();
        let mut conn = self.take_reader(i).await?;
        let own = take::read(&mut conn, rt.keys(), rt.consumer(), count, None, true)
            .await
            .map_err(|e| fleetq_broker::Error::redis("read own pending entries", e))?;
        self.sources[i].reader = Some(conn);
        let forgotten: Vec<RawEntry> = own
            .into_iter()
            .filter(|e| !rt.held.contains(&e.id))
            .collect();
        self.dispatch(i, forgotten).await?;
        let s = &mut self.sources[i];
        s.recovering = false;
        if std::mem::take(&mut s.after_error) {
            s.reclaim_after = Instant::now() + rt.taker.lease / 2;
        }
        Ok(())
    }

    async fn wait_suspended(
        &mut self,
        left: Duration,
        stop: &CancellationToken,
    ) -> Result<(), Failed> {
        let node = &self.rt().node;
        let changed = node.health.changed.notified();
        tokio::select! {
            _ = tokio::time::sleep(left) => node.resume("suspension over").await,
            _ = changed => {}
            _ = stop.cancelled() => {}
        }
        Ok(())
    }

    async fn refresh_config(&mut self, i: usize) {
        let s = &mut self.sources[i];
        if Instant::now() < s.next_refresh {
            return;
        }
        s.next_refresh = Instant::now() + s.rt.config.config_refresh;
        match QueueConfig::load(&mut s.rt.redis().conn(), s.rt.keys()).await {
            Ok(q) => s.rt.set_queue_config(q),
            Err(e) => {
                tracing::warn!(queue = %s.rt.keys().name(), error = %e, "cannot refresh the queue config; keeping the old one")
            }
        }
    }

    async fn reclaim(&mut self, i: usize, free: usize) -> Result<Vec<RawEntry>, Error> {
        let standing = self.standing(i);
        let s = &mut self.sources[i];
        let rt = &s.rt;
        let r = reclaim::reclaim(
            rt.redis(),
            rt.keys(),
            &rt.taker.caller,
            rt.taker.lease,
            free,
            standing,
        )
        .await?;
        s.watching = r.next_wake.is_some();
        // Another worker watches: a whole block, a little shorter at random so that idle
        // workers started together spread out (the first to call after a watcher stopped
        // takes over).
        let wake = r.next_wake.map_or_else(
            || self.max_block.mul_f64(rand::random_range(0.85..=1.0)),
            |w| w.min(self.watch_block),
        );
        let now = Instant::now();
        s.next_wake = now + wake;
        s.reclaimed = now;
        s.busy_since = standing.holds > 0;
        let claimed = r.entries.len() + r.hand_on.len();
        if claimed > 0 {
            rt.node.metrics.reclaimed.inc_by(claimed as u64);
            tracing::info!(
                queue = %rt.keys().name(),
                count = claimed,
                handed_on = r.hand_on.len(),
                "reclaimed entries whose lease ran out"
            );
        }
        if !r.hand_on.is_empty() {
            let back = r
                .hand_on
                .iter()
                .map(|e| (e.id.clone(), e.job_id()))
                .collect();
            crate::shutdown::release(rt, back, "handed on to other idle workers").await;
        }
        Ok(r.entries)
    }

    /// How this worker stands in stream `i`'s watch.
    fn standing(&self, i: usize) -> reclaim::Standing {
        reclaim::Standing {
            sleep: self.max_block,
            holds: self.sources[i].rt.held.len(),
        }
    }

    /// Gives up the seat of every stream this worker watches: it has no free slot, is
    /// suspended or stops, so the next idle worker to call takes over. A failure is only
    /// logged: the seat passes on by itself once this worker is late for it.
    async fn resign(&mut self) {
        for i in 0..self.sources.len() {
            if !std::mem::take(&mut self.sources[i].watching) {
                continue;
            }
            let standing = self.standing(i);
            let rt = &self.sources[i].rt;
            if let Err(e) = reclaim::resign(
                rt.redis(),
                rt.keys(),
                &rt.taker.caller,
                rt.taker.lease,
                standing,
            )
            .await
            {
                tracing::debug!(queue = %rt.keys().name(), error = %e, "cannot give up the watch; it passes on when this worker is late for it");
            }
        }
    }

    /// How long a read may block: until the stream's next reclaim (a lease after the last one
    /// when a job was held or taken since), at most a lease while watching or holding jobs,
    /// else at most `max_block`.
    fn block_for(&self, i: usize) -> Duration {
        let s = &self.sources[i];
        let holding = self.slots.available_permits() < s.rt.config.slots;
        let cap = if s.watching || holding {
            self.watch_block
        } else {
            self.max_block
        };
        s.reclaim_at()
            .max(s.reclaim_after)
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(1), cap)
    }

    /// One stream: block for new entries until the next wake and dispatch them. A stop cuts
    /// the read short; a suspension meanwhile gives back what it brought.
    async fn read_one(&mut self, stop: &CancellationToken) -> Result<(), Error> {
        let free = self.slots.available_permits();
        let block = self.block_for(0);
        let rt = self.rt().clone();
        let mut conn = self.take_reader(0).await?;
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
            _ = stop.cancelled() => return Ok(()),
        };
        let entries = r.map_err(|e| fleetq_broker::Error::redis("read jobs", e))?;
        self.sources[0].reader = Some(conn);
        self.large = entries.iter().any(take::is_large);
        self.hand_over(0, entries).await
    }

    /// A partitioned queue: unless every waiter just ended with nothing new, sweep; when the
    /// sweep brings nothing, mark each stream's last entry and sweep once more (an entry
    /// added meanwhile is in that sweep or newer than its mark), then wait on every stream.
    /// Marks cost a command per stream, so they are only read on the way to waiting.
    async fn read_many(&mut self, stop: &CancellationToken) -> Result<(), Failed> {
        let n = self.sources.len();
        if !std::mem::take(&mut self.idle) {
            if self.sweep().await? {
                return Ok(());
            }
            for i in 0..n {
                if self.sources[i].waiter.is_none() {
                    self.sources[i].mark = Some(self.last_id(i).await.on(i)?);
                }
            }
            if self.sweep().await? {
                return Ok(());
            }
        }
        // Armed before the waiters start, so that one ending at once still wakes the wait.
        let woke = self.woke.clone();
        let woken = woke.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        for i in 0..n {
            if self.sources[i].waiter.is_none() {
                self.start_waiter(i).await.on(i)?;
            }
        }
        let health = self.rt().node.health.clone();
        tokio::select! {
            _ = woken => {}
            _ = health.changed.notified() => {}
            _ = stop.cancelled() => {}
        }
        Ok(())
    }

    /// Reads every stream without blocking, each in turn asked for the slots still free (the
    /// first stream of the turn rotating), and dispatches; true when any brought entries.
    async fn sweep(&mut self) -> Result<bool, Failed> {
        let n = self.sources.len();
        let mut got = false;
        for k in 0..n {
            let i = (self.turn + k) % n;
            let free = self.slots.available_permits();
            if free == 0 {
                break;
            }
            let entries = self.read_now(i, free).await.on(i)?;
            if !entries.is_empty() {
                got = true;
                self.dispatch(i, entries).await.on(i)?;
            }
        }
        self.turn = (self.turn + 1) % n;
        Ok(got)
    }

    /// Reads up to `free` entries of stream `i` without blocking.
    async fn read_now(&mut self, i: usize, free: usize) -> Result<Vec<RawEntry>, Error> {
        let rt = self.sources[i].rt.clone();
        let mut conn = self.take_reader(i).await?;
        let entries = take::read(&mut conn, rt.keys(), rt.consumer(), free, None, false)
            .await
            .map_err(|e| fleetq_broker::Error::redis("read jobs", e))?;
        self.sources[i].reader = Some(conn);
        Ok(entries)
    }

    /// The id of stream `i`'s last entry (`0-0` when it has none).
    async fn last_id(&mut self, i: usize) -> Result<String, Error> {
        let stream = self.sources[i].rt.keys().stream();
        let mut conn = self.take_reader(i).await?;
        let last = fleetq_broker::inspect::last_entry_id(&mut conn, &stream)
            .await
            .map_err(|e| fleetq_broker::Error::redis("read the last entry id", e))?;
        self.sources[i].reader = Some(conn);
        Ok(last)
    }

    /// Starts the waiter of stream `i`: `XREAD BLOCK` for an entry newer than its mark.
    async fn start_waiter(&mut self, i: usize) -> Result<(), Error> {
        let block = self.block_for(i);
        let s = &mut self.sources[i];
        // Without a mark (none read yet), any entry wakes it: a spurious wake costs a sweep,
        // a missed entry would wait for the block to end.
        let mark = s.mark.clone().unwrap_or_else(|| "0-0".to_owned());
        let stream = s.rt.keys().stream();
        let mut conn = match s.waiter_conn.take() {
            Some(c) => c,
            None => s.rt.redis().blocking_conn(&stream, self.max_block).await?,
        };
        let woke = self.woke.clone();
        s.waiter = Some(tokio::spawn(async move {
            let r: redis::RedisResult<Option<redis::Value>> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(block.as_millis().max(1) as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg(&mark)
                .query_async(&mut conn)
                .await;
            woke.notify_one();
            r.map(|news| (conn, news.is_some()))
                .map_err(|e| fleetq_broker::Error::redis("wait for jobs", e).into())
        }));
        Ok(())
    }

    /// Takes back the waiters that ended. One that saw a new entry starts a sweep; when all
    /// ended with nothing new, the next wait needs no sweep (the marks still hold). A failed
    /// waiter is only logged: the stream's next read says what is wrong.
    fn collect_waiters(&mut self) {
        let (mut ended, mut news) = (false, false);
        for s in &mut self.sources {
            let finished = s.waiter.as_ref().is_some_and(|w| w.is_finished());
            let Some(waiter) = s.waiter.take_if(|_| finished) else {
                continue;
            };
            ended = true;
            let Some(result) = waiter.now_or_never() else {
                continue;
            };
            match result {
                Ok(Ok((conn, saw))) => {
                    s.waiter_conn = Some(conn);
                    news |= saw;
                }
                Ok(Err(e)) => {
                    news = true;
                    tracing::debug!(queue = %s.rt.keys().name(), error = %e, "waiting for jobs failed");
                }
                Err(e) => {
                    news = true;
                    tracing::warn!(queue = %s.rt.keys().name(), error = %e, "a waiter task ended");
                }
            }
        }
        if news {
            self.idle = false;
        } else if ended && self.sources.iter().all(|s| s.waiter.is_none()) {
            self.idle = true;
        }
    }

    /// Dispatches what a blocking read of stream `i` brought; while the node is suspended it
    /// goes back at once instead.
    async fn hand_over(&mut self, i: usize, entries: Vec<RawEntry>) -> Result<(), Error> {
        let rt = self.sources[i].rt.clone();
        if rt.node.health.suspended_for().is_some() {
            let back = entries.iter().map(|e| (e.id.clone(), e.job_id())).collect();
            crate::shutdown::release(&rt, back, "while suspended").await;
            return Ok(());
        }
        self.dispatch(i, entries).await
    }

    /// Stream `i`'s reader connection (made when there is none); the caller gives it back
    /// when the read went well.
    async fn take_reader(&mut self, i: usize) -> Result<MultiplexedConnection, Error> {
        let s = &mut self.sources[i];
        if let Some(c) = s.reader.take() {
            return Ok(c);
        }
        let stream = s.rt.keys().stream();
        Ok(s.rt.redis().blocking_conn(&stream, self.max_block).await?)
    }

    /// After a failed step: say so once per outage, wait, and come back carefully.
    async fn recover(&mut self, f: Failed, stop: &CancellationToken) {
        let s = &mut self.sources[f.source];
        s.reader = None;
        s.waiter_conn = None;
        s.recovering = true;
        s.after_error = true;
        let rt = s.rt.clone();
        if let Error::Queue(fleetq_broker::Error::Redis { source, .. }) = &f.error {
            if source.code() == Some("NOGROUP") {
                // The stream was deleted (or the server restarted empty): recreate.
                let _ = take::ensure_group(rt.redis(), rt.keys()).await;
            }
        }
        match &f.error {
            Error::Queue(q) if q.is_transient() => {
                self.outage.failed("read jobs", q);
            }
            e => {
                tracing::warn!(queue = %rt.keys().name(), error = %e, "worker step failed; retrying")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(self.backoff.next()) => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Passes entries of stream `i` to `fleetq_take` and starts a slot task for each job
    /// that runs here.
    async fn dispatch(&mut self, i: usize, entries: Vec<RawEntry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        self.idle = false;
        let rt = self.sources[i].rt.clone();
        let queue = rt.queue_config();
        let taken = take::take(&rt.taker, &queue, entries).await?;
        self.settle(i, taken, &queue).await;
        Ok(())
    }

    /// Starts a slot task for each job taken that runs here; counts what was settled.
    async fn settle(
        &mut self,
        i: usize,
        taken: Vec<(Taken, Result<JobEntry, Malformed>)>,
        queue: &QueueConfig,
    ) {
        let rt = self.sources[i].rt.clone();
        let mut started = false;
        for (t, job) in taken {
            match t.decision {
                TakeDecision::Run { attempt } => {
                    started = true;
                    self.start(&rt, t, attempt, job, queue).await;
                }
                TakeDecision::Pass { delay } => rt.schedule_promote(delay),
                other => count_settled(&rt, other),
            }
        }
        if started {
            self.sources[i].busy_since = true;
            rt.node.health.busy_changed();
        }
    }

    async fn start(
        &mut self,
        rt: &Arc<Runtime<H>>,
        t: Taken,
        attempt: u32,
        job: Result<JobEntry, Malformed>,
        queue: &QueueConfig,
    ) {
        let entry = match job {
            Ok(entry) => entry,
            Err(malformed) => return dead_letter(rt, t, attempt, malformed).await,
        };
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            // Cannot happen: no more is read than there are free slots. Give it back.
            tracing::error!(job = %t.holding.job_id, "no free slot for a job read for a free slot; releasing it");
            let held = HeldJob::new(t.holding);
            rt.committer
                .commit(&held, attempt, &Commit::Release, &Ending::default(), None)
                .await;
            return;
        };
        // Boxed: the attempt's state is large, and a task is moved into place when spawned.
        let attempt = Box::pin(attempt::run(
            rt.clone(),
            t,
            attempt,
            entry,
            queue.clone(),
            permit,
        ));
        let health = rt.node.health.clone();
        self.tasks.spawn(async move {
            attempt.await;
            // The slot's permit went with the attempt: the record's busy count follows.
            health.busy_changed();
        });
    }
}

fn count_settled<H>(rt: &Runtime<H>, decision: TakeDecision) {
    let m = &rt.node.metrics;
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

async fn dead_letter<H>(rt: &Runtime<H>, t: Taken, attempt: u32, malformed: Malformed) {
    tracing::warn!(entry = %t.holding.entry_id, reason = %malformed, "malformed entry sent to the dead letters");
    let commit = Commit::Dead {
        reason: fleetq_broker::calls::DeadReason::Malformed,
        error: malformed.to_string(),
    };
    let held = Arc::new(HeldJob::new(t.holding));
    held.mark_finished();
    rt.held.insert(held.clone());
    let committed = rt
        .committer
        .commit(&held, attempt, &commit, &Ending::default(), None)
        .await;
    rt.held.remove(&held);
    if committed == Some(fleetq_broker::calls::Committed::Ok) {
        rt.node.metrics.outcome("dead");
    }
}
