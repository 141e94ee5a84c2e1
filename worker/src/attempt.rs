//! One attempt of a job in one slot: hold it, run the handler against its timeouts and stop
//! signals, decide what to record ([`verdict`], a pure mapping tested as a table), commit it
//! fenced, and count it in the metrics and the node's health.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetq_broker::calls::DeadReason;
use fleetq_broker::{JobEntry, QueueConfig};
use tokio::sync::OwnedSemaphorePermit;

use crate::completion::{Commit, Committed, Ending};
use crate::handler::{Handler, Job, JobContext, Outcome};
use crate::lease::{HeldJob, StopReason};
use crate::progress::{Target, Tracker, WaitClock};
use crate::runtime::Runtime;
use crate::take::Taken;
use crate::timeouts::{self, Limits, TimeoutKind};

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ended {
    /// The handler answered.
    Outcome(Outcome),
    /// The runtime stopped it.
    Stopped(StopReason),
    /// A timeout fired.
    Timeout(TimeoutKind),
}

/// What besides the ending decides the commit.
#[derive(Debug, Clone)]
pub(crate) struct Facts<'a> {
    /// This attempt's number, 1-based.
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) node: &'a str,
    pub(crate) stage: Option<&'a str>,
    pub(crate) elapsed_ms: u64,
    /// Backoff before a retry.
    pub(crate) backoff: Duration,
}

/// What to record for an attempt: the commit (none when the lease is lost: another host has
/// the job) and the timeout that ended it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    pub(crate) commit: Option<Commit>,
    pub(crate) timeout: Option<TimeoutKind>,
}

/// The pure mapping from how an attempt ended to what is recorded.
pub(crate) fn verdict(ended: &Ended, f: &Facts<'_>) -> Verdict {
    let retry_or_dead = |error: String| {
        if f.attempt < f.max_attempts {
            Commit::Retry {
                error,
                delay: f.backoff,
            }
        } else {
            let max = f.max_attempts;
            Commit::Dead {
                reason: DeadReason::AttemptsExhausted,
                error: format!("attempts exhausted ({max} of {max}); last error: {error}"),
            }
        }
    };
    let (commit, timeout) = match ended {
        Ended::Outcome(Outcome::Succeeded(v)) => (Some(Commit::Succeeded(v.to_string())), None),
        Ended::Outcome(Outcome::Fail(e)) => (Some(Commit::Failed(e.clone())), None),
        Ended::Outcome(Outcome::Retry(e)) => (Some(retry_or_dead(e.clone())), None),
        Ended::Timeout(kind) => {
            let stage = f
                .stage
                .map_or_else(String::new, |s| format!(" in stage {s}"));
            let msg = format!(
                "{} timeout on node {}{stage} after {} ms",
                kind.name(),
                f.node,
                f.elapsed_ms
            );
            (Some(retry_or_dead(msg)), Some(*kind))
        }
        Ended::Stopped(StopReason::LeaseLost) => (None, None),
        Ended::Stopped(StopReason::Cancelled) => (Some(Commit::Cancelled), None),
        // Not the job's fault: back in line at once, the attempt not counted.
        Ended::Stopped(StopReason::Shutdown | StopReason::SelfFenced) => {
            (Some(Commit::Release), None)
        }
    };
    Verdict { commit, timeout }
}

/// The outcome counted in `fleetq_jobs_total` for a commit Redis answered.
pub(crate) fn counted_outcome(commit: &Commit, committed: Committed) -> Option<&'static str> {
    match (commit, committed) {
        (_, Committed::Fenced) => None,
        (_, Committed::Poison) => Some("dead"),
        (Commit::Succeeded(_), _) => Some("succeeded"),
        (Commit::Failed(_), _) => Some("failed"),
        (Commit::Retry { .. }, _) => Some("retried"),
        (Commit::Dead { .. }, _) => Some("dead"),
        (Commit::Cancelled, _) => Some("cancelled"),
        (Commit::Release, _) => None,
    }
}

/// Whether an accepted commit counts as a failure of this node (`Some(true)`), a success
/// (`Some(false)`), or neither.
pub(crate) fn node_failed(commit: &Commit, committed: Committed) -> Option<bool> {
    if committed != Committed::Ok {
        return None;
    }
    match commit {
        Commit::Succeeded(_) => Some(false),
        Commit::Retry { .. }
        | Commit::Dead {
            reason: DeadReason::AttemptsExhausted,
            ..
        } => Some(true),
        _ => None,
    }
}

/// Runs one attempt of `entry` in the slot held by `_permit`, then records it.
pub(crate) async fn run<H: Handler>(
    rt: Arc<Runtime<H>>,
    taken: Taken,
    attempt: u32,
    entry: JobEntry,
    queue: QueueConfig,
    slot: OwnedSemaphorePermit,
) {
    let held = Arc::new(HeldJob::new(taken.holding));
    if let Some(older) = rt.held.insert(held.clone()) {
        // An older take of this entry (Redis lost this worker's earlier take): stop it first.
        older.stop(StopReason::LeaseLost);
    }
    let metrics = rt.node.metrics.clone();
    metrics.busy.inc();
    let tracker = Arc::new(tracker(&rt, &held, attempt, &entry));
    let max_attempts = entry.max_attempts(&queue);
    let limits = Limits {
        start: entry.start_timeout(&queue),
        progress: entry.progress_timeout(&queue),
        run: entry.run_timeout(&queue),
    };
    let job = Job {
        id: held.holding.job_id.clone(),
        // The queue's own name, also when this is one of its partitions.
        queue: rt.config.queue.clone(),
        payload: entry.payload,
        attempt,
        max_attempts,
        workflow: entry.workflow,
        traceparent: entry.traceparent,
        enqueued_ms: entry.enqueued_ms,
    };
    let started = Instant::now();
    let ended = race(&rt, &held, &tracker, job, limits).await;
    held.mark_finished();
    let ending = Ending {
        timeout: None,
        stage: tracker.current_stage(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        stages_json: tracker.stages_json(),
    };
    let facts = Facts {
        attempt,
        max_attempts,
        node: &rt.config.node,
        stage: ending.stage.as_deref(),
        elapsed_ms: ending.elapsed_ms,
        backoff: queue.backoff(attempt, rand::random::<f64>()),
    };
    let v = verdict(&ended, &facts);
    record(&rt, &held, attempt, &ended, v, ending, slot).await;
    rt.held.remove(&held);
    metrics.busy.dec();
}

fn tracker<H>(rt: &Runtime<H>, held: &Arc<HeldJob>, attempt: u32, entry: &JobEntry) -> Tracker {
    Tracker::new(
        Target {
            redis: rt.redis().clone(),
            keys: rt.keys().clone(),
            consumer: rt.taker.caller.consumer.clone(),
        },
        held.clone(),
        rt.config.progress_interval,
        rt.taker.starts_at_once,
        (attempt == 1).then(|| WaitClock {
            enqueued_ms: entry.enqueued_ms,
            histogram: rt.node.metrics.wait.clone(),
        }),
    )
}

/// Runs the handler until it answers, a timeout fires or the runtime stops it.
async fn race<H: Handler>(
    rt: &Runtime<H>,
    held: &HeldJob,
    tracker: &Arc<Tracker>,
    job: Job,
    limits: Limits,
) -> Ended {
    let ctx = JobContext {
        cancel: held.cancel.clone(),
        tracker: tracker.clone(),
    };
    let ended = tokio::select! {
        // A stop (cancel, lost lease, shutdown) wins over the handler's own answer to it.
        biased;
        _ = held.cancel.cancelled() => Ended::Stopped(held.stop_reason().unwrap_or(StopReason::Shutdown)),
        kind = timeouts::watchdog(tracker, limits) => Ended::Timeout(kind),
        out = rt.handler.handle(job, ctx) => match held.stop_reason() {
            Some(reason) => Ended::Stopped(reason),
            None => Ended::Outcome(out),
        },
    };
    // Whatever ended the attempt, work the handler spawned elsewhere must stop too.
    held.cancel.cancel();
    if matches!(ended, Ended::Outcome(_)) {
        // The latest progress report lands before the end is recorded.
        tracker.flush().await;
    }
    if let Some(started_at) = tracker.snapshot().started_at {
        rt.node
            .metrics
            .run
            .observe(started_at.elapsed().as_secs_f64());
    }
    ended
}

/// Commits the verdict and counts it.
async fn record<H>(
    rt: &Runtime<H>,
    held: &HeldJob,
    attempt: u32,
    ended: &Ended,
    v: Verdict,
    mut ending: Ending,
    slot: OwnedSemaphorePermit,
) {
    let metrics = &rt.node.metrics;
    if let Some(kind) = v.timeout {
        tracing::warn!(job = %held.holding.job_id, kind = kind.name(), stage = ?ending.stage, "timeout fired; stopping the attempt");
        ending.timeout = Some(kind.name());
        metrics.timeout(kind.name());
    }
    if let Ended::Stopped(StopReason::LeaseLost | StopReason::SelfFenced) = ended {
        // Either way this node's lease on the job ran out.
        metrics.timeout("lease");
    }
    let Some(commit) = v.commit else { return };
    let Some(committed) = rt
        .committer
        .commit(held, attempt, &commit, &ending, Some(slot))
        .await
    else {
        return;
    };
    if let (Commit::Retry { delay, .. }, Committed::Ok) = (&commit, committed) {
        rt.schedule_promote(*delay);
    }
    if committed == Committed::Fenced {
        metrics.fenced.inc();
    }
    if let Some(outcome) = counted_outcome(&commit, committed) {
        metrics.outcome(outcome);
    }
    match node_failed(&commit, committed) {
        Some(true) => rt.node_failed().await,
        Some(false) => rt.node.health.success(),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn facts(attempt: u32, max_attempts: u32) -> Facts<'static> {
        Facts {
            attempt,
            max_attempts,
            node: "gpu-1",
            stage: Some("KSampler"),
            elapsed_ms: 1500,
            backoff: Duration::from_millis(700),
        }
    }

    #[test]
    fn how_an_attempt_ended_decides_what_is_recorded() {
        use serde_json::json;
        let retry = |e: &str| Commit::Retry {
            error: e.into(),
            delay: Duration::from_millis(700),
        };
        let dead = |e: &str| Commit::Dead {
            reason: DeadReason::AttemptsExhausted,
            error: format!("attempts exhausted (3 of 3); last error: {e}"),
        };
        let progress_msg = "progress timeout on node gpu-1 in stage KSampler after 1500 ms";
        let table: Vec<(Ended, u32, Option<Commit>, Option<TimeoutKind>)> = vec![
            (
                Ended::Outcome(Outcome::Succeeded(json!({"a": 1}))),
                1,
                Some(Commit::Succeeded(r#"{"a":1}"#.into())),
                None,
            ),
            (
                Ended::Outcome(Outcome::Fail("bad".into())),
                1,
                Some(Commit::Failed("bad".into())),
                None,
            ),
            (
                Ended::Outcome(Outcome::Retry("oom".into())),
                1,
                Some(retry("oom")),
                None,
            ),
            (
                Ended::Outcome(Outcome::Retry("oom".into())),
                3,
                Some(dead("oom")),
                None,
            ),
            (
                Ended::Timeout(TimeoutKind::Progress),
                2,
                Some(retry(progress_msg)),
                Some(TimeoutKind::Progress),
            ),
            (
                Ended::Timeout(TimeoutKind::Progress),
                3,
                Some(dead(progress_msg)),
                Some(TimeoutKind::Progress),
            ),
            (Ended::Stopped(StopReason::LeaseLost), 1, None, None),
            (
                Ended::Stopped(StopReason::Cancelled),
                1,
                Some(Commit::Cancelled),
                None,
            ),
            (
                Ended::Stopped(StopReason::Shutdown),
                3,
                Some(Commit::Release),
                None,
            ),
            (
                Ended::Stopped(StopReason::SelfFenced),
                3,
                Some(Commit::Release),
                None,
            ),
        ];
        for (ended, attempt, commit, timeout) in table {
            let v = verdict(&ended, &facts(attempt, 3));
            assert_eq!(
                v,
                Verdict { commit, timeout },
                "{ended:?} at attempt {attempt}"
            );
        }
    }

    #[test]
    fn what_is_counted_for_a_commit() {
        let retry = Commit::Retry {
            error: "x".into(),
            delay: Duration::ZERO,
        };
        assert_eq!(counted_outcome(&retry, Committed::Ok), Some("retried"));
        assert_eq!(counted_outcome(&retry, Committed::Poison), Some("dead"));
        assert_eq!(counted_outcome(&retry, Committed::Fenced), None);
        assert_eq!(counted_outcome(&Commit::Release, Committed::Ok), None);
        assert_eq!(node_failed(&retry, Committed::Ok), Some(true));
        assert_eq!(node_failed(&retry, Committed::Poison), None);
        assert_eq!(
            node_failed(&Commit::Succeeded("1".into()), Committed::Ok),
            Some(false)
        );
        assert_eq!(node_failed(&Commit::Cancelled, Committed::Ok), None);
    }
}
