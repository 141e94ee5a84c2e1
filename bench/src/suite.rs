//! The whole benchmark: every scenario in turn, each on its own fresh `redis-server` (the
//! cluster scenario on its own cluster), one [`Report`] at the end.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;

use crate::plan::Plan;
use crate::report::Report;
use crate::scenarios::{
    by_step, cluster, dispatch, e2e, enqueue, floor, idle, memory, payload_sweep, recovery, slots,
};

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    /// Small counts and short windows ([`Plan::quick`]) instead of [`Plan::full`].
    pub quick: bool,
    /// The `fleetq-bench` binary, re-executed with its hidden `worker` subcommand for every
    /// worker process. The binary passes `std::env::current_exe()`; a test passes the path
    /// of the built binary (see the crate docs).
    pub worker_exe: PathBuf,
}

/// Runs every scenario and returns the report. Errors when a scenario cannot run (no
/// `redis-server`, a worker that does not start, a deadline passed); a failed exactly-once
/// check is not an error but is in [`Report::problems`].
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(
        opts.worker_exe.is_file(),
        "the worker executable {} does not exist; pass the path of the built fleetq-bench binary",
        opts.worker_exe.display()
    );
    let plan = Plan::new(opts.quick);
    let exe = opts.worker_exe.as_path();
    let started = Instant::now();
    tracing::info!(
        quick = plan.quick,
        "fleetq-bench: each scenario on its own redis-server"
    );

    tracing::info!(
        single = plan.enqueue_single_jobs,
        batch = plan.enqueue_batch_jobs,
        "enqueue"
    );
    let enqueue = enqueue::run(&plan).await.context("enqueue scenario")?;
    tracing::info!(
        jobs = plan.e2e_jobs,
        "end to end through one worker process"
    );
    let e2e = e2e::run(&plan, exe).await.context("end-to-end scenario")?;
    tracing::info!(jobs = plan.e2e_jobs, "floor");
    let floor = floor::run(&plan).await.context("floor scenario")?;
    tracing::info!(
        jobs = plan.by_step_jobs,
        "by step: the steps driven directly"
    );
    let by_step = by_step::run(&plan).await.context("by-step scenario")?;
    let payload_sweep = payload_sweep::run(&plan, exe, &e2e, &floor)
        .await
        .context("payload sweep")?;
    let drain_by_slots = slots::run(&plan, exe)
        .await
        .context("drain-by-slots scenario")?;
    tracing::info!(jobs = plan.memory_jobs, "memory per waiting job");
    let memory = memory::run(&plan).await.context("memory scenario")?;
    tracing::info!(
        workers = plan.idle_workers,
        window_s = plan.idle_window.as_secs(),
        "idle workers"
    );
    let idle = idle::run(&plan, exe).await.context("idle scenario")?;
    tracing::info!(
        window_s = plan.dispatch_window.as_secs(),
        "dispatch latency"
    );
    let dispatch = dispatch::run(&plan, exe)
        .await
        .context("dispatch scenario")?;
    tracing::info!("recovery after SIGKILL and SIGSTOP (default 10 s lease)");
    let recovery = recovery::run(exe).await.context("recovery scenario")?;
    tracing::info!(
        jobs = plan.cluster_jobs,
        "a hot queue on a 3-primary cluster: 1 partition, then 3"
    );
    let cluster = cluster::run(&plan, exe).await.context("cluster scenario")?;

    Ok(Report {
        quick: plan.quick,
        seconds: started.elapsed().as_secs_f64(),
        enqueue,
        e2e,
        floor,
        by_step,
        payload_sweep,
        drain_by_slots,
        memory,
        idle,
        dispatch,
        recovery,
        cluster,
    })
}
