//! The two-phase shutdown: stop reading; running jobs get `shutdown_grace` to finish; what is
//! still running then is stopped and released (given back at once, the attempt not counted),
//! and so is anything left in this consumer's pending list; the consumer is removed only when
//! nothing is pending under its name any more (else its entries would be lost for good).

use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::calls::{Commit, Holding, Token};
use fleetq_broker::keys::GROUP;
use tokio::task::JoinSet;

use crate::completion::Ending;
use crate::handler::Handler;
use crate::lease::{HeldJob, StopReason};
use crate::runtime::Runtime;
use crate::take;

/// How long released jobs may take to be recorded after the grace period, before the worker
/// gives up on Redis and leaves them to their leases.
const RELEASE_GRACE: Duration = Duration::from_secs(5);

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// Phase 1 and 2 for the slot tasks (of every stream read): drain within the grace period,
/// then stop and release.
pub(crate) async fn drain<H: Handler>(rts: &[Arc<Runtime<H>>], tasks: &mut JoinSet<()>) {
    let grace = rts[0].config.shutdown_grace;
    tracing::info!(
        running = rts.iter().map(|rt| rt.held.len()).sum::<usize>(),
        grace_ms = grace.as_millis() as u64,
        "stopping: no new jobs; waiting for running jobs"
    );
    if tokio::time::timeout(grace, join_all(tasks)).await.is_ok() {
        return;
    }
    let left: Vec<_> = rts.iter().flat_map(|rt| rt.held.snapshot()).collect();
    tracing::warn!(
        count = left.len(),
        "grace period over; releasing running jobs to other hosts"
    );
    for job in left {
        job.stop(StopReason::Shutdown);
    }
    if tokio::time::timeout(RELEASE_GRACE, join_all(tasks))
        .await
        .is_err()
    {
        for rt in rts {
            rt.committer.hard_stop.cancel();
        }
        join_all(tasks).await;
    }
}

/// Gives back everything still pending under this consumer, then removes the consumer when
/// nothing is left under its name.
pub(crate) async fn release_pending<H>(rt: &Runtime<H>) {
    let Some(pending) = own_pending(rt).await else {
        return;
    };
    let mut entries = Vec::with_capacity(pending.len());
    for (entry_id, _, _, _) in &pending {
        entries.push((entry_id.clone(), job_id_of(rt, entry_id).await));
    }
    release(rt, entries, "at shutdown").await;
    if !pending.is_empty() {
        tracing::info!(count = pending.len(), "released unstarted entries");
    }
    match own_pending(rt).await {
        Some(left) if left.is_empty() => remove_consumer(rt).await,
        Some(left) => tracing::warn!(
            count = left.len(),
            "entries still pending under this consumer; keeping it so other hosts reclaim them"
        ),
        None => {}
    }
}

/// Gives back `(entry id, job id)` pairs this consumer was delivered but never took: each
/// goes back to the queue at once, no attempt counted.
pub(crate) async fn release<H>(rt: &Runtime<H>, entries: Vec<(String, String)>, when: &str) {
    for (entry_id, job_id) in entries {
        let holding = Holding {
            entry_id,
            token: Token::none(),
            job_id,
        };
        let job = HeldJob::new(holding);
        if let Err(e) = rt
            .committer
            .commit_once(&job, 0, &Commit::Release, &Ending::default(), None)
            .await
        {
            let e = e.0;
            tracing::warn!(entry = %job.holding.entry_id, error = %e, when,
                "cannot release an entry; its lease will run out");
        }
    }
}

type PendingRow = (String, String, u64, u64);

async fn own_pending<H>(rt: &Runtime<H>) -> Option<Vec<PendingRow>> {
    let pending: redis::RedisResult<Vec<PendingRow>> = redis::cmd("XPENDING")
        .arg(rt.keys().stream())
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .arg(rt.consumer())
        .query_async(&mut rt.redis().conn())
        .await;
    match pending {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list pending entries at shutdown; their leases will run out");
            None
        }
    }
}

async fn remove_consumer<H>(rt: &Runtime<H>) {
    let _: redis::RedisResult<i64> = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(rt.keys().stream())
        .arg(GROUP)
        .arg(rt.consumer())
        .query_async(&mut rt.redis().conn())
        .await;
}

async fn job_id_of<H>(rt: &Runtime<H>, entry_id: &str) -> String {
    let r: redis::RedisResult<Vec<take::EntryReply>> = redis::cmd("XRANGE")
        .arg(rt.keys().stream())
        .arg(entry_id)
        .arg(entry_id)
        .query_async(&mut rt.redis().conn())
        .await;
    match r {
        Ok(entries) => entries
            .into_iter()
            .next()
            .map_or_else(|| entry_id.to_owned(), |e| take::raw_entry(e).job_id()),
        Err(_) => entry_id.to_owned(),
    }
}
