//! Recovery: how long a job stays stranded on a host that died (SIGKILL) or froze (SIGSTOP)
//! before it runs on another.
//!
//! Worker A (1 slot, the default 10 s lease, renewed every lease/3) takes a long job (the
//! bench worker sleeps `payload.sleep_ms`). Then worker B starts, idle. A is killed or
//! frozen; the clock runs from the signal until `fleetq_status` shows the job `running` on
//! B, polled by the harness every 20 ms (the system under test does not poll: B sleeps in
//! its blocking read until the lease deadline it learnt from `fleetq_reclaim`).
//!
//! A broker's crash detection runs beside them (`fleetq_broker::liveness`, as in
//! `fleetq-broker`): a killed process closes its connections, so its job goes back in line
//! within about a second. A frozen one keeps them open; its lease runs out
//! `lease − (time since A's last renewal)` after the signal, so that result lies between about
//! 2/3 of the lease and the lease, plus B's wake-up and claim. The two faults run at the same
//! time, each on its own Redis.

use std::path::Path;
use std::time::{Duration, Instant};

use fleetq_broker::{EnqueueOptions, JobState, Producer};
use serde::Serialize;

use crate::payload;
use crate::plan::RECOVERY_JOB;
use crate::poll;
use crate::server::{queue_config, Server};
use crate::worker_process::WorkerProcess;

const QUEUE: &str = "bench-recovery";
/// How often the harness reads the job's status.
const POLL: Duration = Duration::from_millis(20);

/// What happens to the host holding the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL: the process dies.
    Kill,
    /// SIGSTOP: the process freezes (SIGCONT and SIGKILL afterwards).
    Hang,
}

/// What the recovery scenarios measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RecoveryResult {
    /// The queue's lease, seconds.
    pub lease_s: f64,
    /// SIGKILL → running on the other node, seconds.
    pub kill_s: f64,
    /// SIGSTOP → running on the other node, seconds.
    pub hang_s: f64,
}

/// Runs both faults (at the same time) with worker processes started from `exe`.
pub async fn run(exe: &Path) -> anyhow::Result<RecoveryResult> {
    let (kill, hang) = tokio::try_join!(one(exe, Fault::Kill), one(exe, Fault::Hang))?;
    Ok(RecoveryResult {
        lease_s: queue_config().lease.as_secs_f64(),
        kill_s: kill.as_secs_f64(),
        hang_s: hang.as_secs_f64(),
    })
}

/// One fault: the time from the signal until the job runs on the second node.
pub async fn one(exe: &Path, fault: Fault) -> anyhow::Result<Duration> {
    let server = Server::start().await?;
    let config = queue_config();
    server.configure(QUEUE, &config).await?;
    let broker_stop = tokio_util::sync::CancellationToken::new();
    let _broker = broker_stop.clone().drop_guard();
    tokio::spawn(fleetq_broker::liveness::run(
        server.redis.clone(),
        vec![QUEUE.to_owned()],
        fleetq_broker::liveness::DEFAULT_INTERVAL,
        broker_stop,
    ));
    let tag = match fault {
        Fault::Kill => "kill",
        Fault::Hang => "hang",
    };
    let a = WorkerProcess::spawn(exe, &server.url(), QUEUE, &format!("{tag}-a"), 1)?;
    let producer = Producer::new(&server.redis, QUEUE).await?;
    let job = producer
        .enqueue_json(
            &payload::sleep(RECOVERY_JOB.as_millis() as u64),
            &EnqueueOptions::default(),
        )
        .await?;
    let running_on = |node: String| {
        let producer = &producer;
        let id = job.id.clone();
        move || {
            let node = node.clone();
            let id = id.clone();
            async move {
                let s = producer.status(&id).await?;
                Ok(
                    (s.state == JobState::Running && s.node.as_deref() == Some(node.as_str()))
                        .then_some(()),
                )
            }
        }
    };
    poll::until(
        Duration::from_secs(30),
        POLL,
        "the job to run on the first worker",
        running_on(a.node.clone()),
    )
    .await?;

    // The second worker starts only now, so that the job cannot go to it first.
    let b = WorkerProcess::spawn(exe, &server.url(), QUEUE, &format!("{tag}-b"), 1)?;
    let node_b = [b.node.clone()];
    poll::until(
        Duration::from_secs(30),
        POLL,
        "the second worker's node record",
        || async { Ok(server.nodes_present(&node_b).await?.then_some(())) },
    )
    .await?;

    // A broker judges only processes it saw connected; here everything so far took a few
    // milliseconds, so let it look twice first (a real broker has been watching for long).
    tokio::time::sleep(fleetq_broker::liveness::DEFAULT_INTERVAL * 2).await;
    let signalled = Instant::now();
    match fault {
        Fault::Kill => a.signal(libc::SIGKILL)?,
        Fault::Hang => a.signal(libc::SIGSTOP)?,
    }
    let moved = poll::until(
        config.lease + Duration::from_secs(20),
        POLL,
        "the stranded job to run on the second worker",
        running_on(b.node.clone()),
    )
    .await;
    let elapsed = signalled.elapsed();
    if fault == Fault::Hang {
        a.signal(libc::SIGCONT)?;
    }
    drop(a);
    drop(b);
    moved?;
    Ok(elapsed)
}
