//! Progress of a running attempt: whether it started, when it last showed activity, its
//! stage profile, and the throttled writes of all that to the job (`fleetq_progress`).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fleetq_broker::calls::{self, HoldReply, ProgressKind};
use fleetq_broker::functions;
use fleetq_broker::{QueueKeys, Redis};
use serde::Serialize;
use tokio::sync::Notify;

use crate::handler::Progress;
use crate::lease::{HeldJob, StopReason};
use crate::node::epoch_ms;

/// Longest progress message kept.
const MAX_MESSAGE_BYTES: usize = 200;

/// One stage of an attempt.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StageRecord {
    name: String,
    start_ms: u64,
    duration_ms: Option<u64>,
}

#[derive(Debug)]
struct State {
    taken_at: Instant,
    started_at: Option<Instant>,
    last_activity: Instant,
    stages: Vec<StageRecord>,
    current_since: Option<Instant>,
    last_write: Option<Instant>,
    pending: Option<String>,
}

/// What the timeouts watch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    pub(crate) taken_at: Instant,
    pub(crate) started_at: Option<Instant>,
    pub(crate) last_activity: Instant,
    /// When a throttled report is due to be written.
    pub(crate) flush_at: Option<Instant>,
}

/// Where a tracker writes (the fencing identity is the held job's).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) redis: Redis,
    pub(crate) keys: QueueKeys,
    pub(crate) consumer: String,
}

/// Tracks one attempt.
#[derive(Debug)]
pub(crate) struct Tracker {
    state: Mutex<State>,
    /// Wakes the timeout watchdog when something changed.
    pub(crate) changed: Notify,
    target: Target,
    held: Arc<HeldJob>,
    min_interval: Duration,
    /// Observes the wait (enqueue → start) of a job's first attempt when it starts.
    wait: Option<WaitClock>,
}

/// What is needed to observe `fleetq_job_wait_seconds` at the start of a first attempt.
#[derive(Debug, Clone)]
pub(crate) struct WaitClock {
    pub(crate) enqueued_ms: u64,
    pub(crate) histogram: prometheus::Histogram,
}

impl WaitClock {
    fn observe(&self) {
        self.histogram
            .observe(epoch_ms().saturating_sub(self.enqueued_ms) as f64 / 1000.0);
    }
}

impl Tracker {
    pub(crate) fn new(
        target: Target,
        held: Arc<HeldJob>,
        min_interval: Duration,
        started: bool,
        wait: Option<WaitClock>,
    ) -> Self {
        let now = Instant::now();
        if started {
            if let Some(w) = &wait {
                w.observe();
            }
        }
        Self {
            state: Mutex::new(State {
                taken_at: now,
                started_at: started.then_some(now),
                last_activity: now,
                stages: Vec::new(),
                current_since: None,
                last_write: None,
                pending: None,
            }),
            changed: Notify::new(),
            target,
            held,
            min_interval,
            wait,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        Snapshot {
            taken_at: s.taken_at,
            started_at: s.started_at,
            last_activity: s.last_activity,
            flush_at: s.pending.as_ref().map(|_| {
                s.last_write
                    .map_or_else(Instant::now, |w| w + self.min_interval)
            }),
        }
    }

    /// The stage running now, if any.
    pub(crate) fn current_stage(&self) -> Option<String> {
        let s = self.lock();
        s.current_since
            .and(s.stages.last().map(|st| st.name.clone()))
    }

    /// The stage profile as JSON, the running stage's duration counted up to now.
    pub(crate) fn stages_json(&self) -> String {
        let s = self.lock();
        let mut stages = s.stages.clone();
        if let (Some(last), Some(since)) = (stages.last_mut(), s.current_since) {
            last.duration_ms = Some(since.elapsed().as_millis() as u64);
        }
        if stages.is_empty() {
            return String::new();
        }
        serde_json::to_string(&stages).unwrap_or_default()
    }

    pub(crate) async fn mark_started(&self) {
        {
            let mut s = self.lock();
            if s.started_at.is_some() {
                return;
            }
            let now = Instant::now();
            s.started_at = Some(now);
            s.last_activity = now;
        }
        if let Some(w) = &self.wait {
            w.observe();
        }
        self.changed.notify_one();
        self.write(ProgressKind::Started, String::new()).await;
    }

    pub(crate) async fn report(&self, mut p: Progress) {
        if let Some(m) = &mut p.message {
            if m.len() > MAX_MESSAGE_BYTES {
                let mut cut = MAX_MESSAGE_BYTES;
                while !m.is_char_boundary(cut) {
                    cut -= 1;
                }
                m.truncate(cut);
            }
        }
        let json = serde_json::to_string(&p).unwrap_or_default();
        if self.lock().started_at.is_none() {
            // Progress implies the work began.
            self.mark_started().await;
        }
        let write_now = {
            let mut s = self.lock();
            let now = Instant::now();
            s.last_activity = now;
            if let Some(stage) = &p.stage {
                let same = s.current_since.is_some()
                    && s.stages.last().is_some_and(|st| &st.name == stage);
                if !same {
                    let since = s.current_since;
                    if let (Some(last), Some(since)) = (s.stages.last_mut(), since) {
                        last.duration_ms = Some(since.elapsed().as_millis() as u64);
                    }
                    s.stages.push(StageRecord {
                        name: stage.clone(),
                        start_ms: epoch_ms(),
                        duration_ms: None,
                    });
                    s.current_since = Some(now);
                }
            }
            let due = s.last_write.is_none_or(|w| now >= w + self.min_interval);
            if due {
                s.last_write = Some(now);
                s.pending = None;
            } else {
                s.pending = Some(json.clone());
            }
            due
        };
        self.changed.notify_one();
        if write_now {
            self.write(ProgressKind::Progress, json).await;
        }
    }

    /// Writes the pending (throttled) report, if any.
    pub(crate) async fn flush(&self) {
        let pending = {
            let mut s = self.lock();
            let p = s.pending.take();
            if p.is_some() {
                s.last_write = Some(Instant::now());
            }
            p
        };
        if let Some(json) = pending {
            self.write(ProgressKind::Progress, json).await;
        }
    }

    async fn write(&self, kind: ProgressKind, progress_json: String) {
        let t = &self.target;
        let holding = &self.held.holding;
        let cmd = calls::progress(
            &t.keys,
            &t.consumer,
            holding,
            kind,
            &progress_json,
            &self.stages_json(),
        );
        let reply = functions::call::<String>(&mut t.redis.conn(), &cmd, "report progress")
            .await
            .and_then(|w| HoldReply::parse("report progress", &w));
        match reply {
            Ok(HoldReply::Lost) => {
                if self.held.stop_reason().is_none() {
                    tracing::warn!(job = %holding.job_id, "lease lost (seen on a progress report); stopping the local run");
                }
                self.held.stop(StopReason::LeaseLost);
            }
            Ok(HoldReply::Cancel) => self.held.stop(StopReason::Cancelled),
            Ok(HoldReply::Ok) => {}
            Err(e) => {
                tracing::warn!(job = %holding.job_id, error = %e, "cannot write progress; the job goes on");
            }
        }
    }
}
