//! The worker runtime: N slots, reading only for free slots, leases renewed while jobs run,
//! idle capacity reclaiming stale entries, fenced commits, retries with backoff, and a
//! two-phase shutdown. [`run`] reads like this module's plan:
//!
//! 1. **start** — check the settings, wait for Redis (down, loading, read-only: it waits and
//!    says why), wait for the function library (loaded by the broker, never by a worker),
//!    check the consumer group, read the queue config;
//! 2. **wait until ready** — take no job before the executor can run one;
//! 3. **loop** — the read loop (`intake`): reclaim when a lease or retry may be due, else
//!    block in `XREADGROUP … COUNT free`, take, run each job in a slot (`attempt`); recover
//!    from Redis outages without losing a computed result;
//! 4. **shut down** — stop reading, drain, release (`shutdown`).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetq_broker::calls::Caller;
use fleetq_broker::functions;
use fleetq_broker::retry;
use fleetq_broker::{QueueConfig, QueueKeys, Redis};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::completion::Committer;
use crate::config::WorkerConfig;
use crate::handler::Handler;
use crate::intake::Intake;
use crate::lease::{Held, Renewer};
use crate::metrics::WorkerMetrics;
use crate::node::{self, epoch_ms, Health, NodeHandle};
use crate::runtime::Runtime;
use crate::shutdown;
use crate::take::{self, Taker};
use crate::Error;

/// Longest wait between two readiness checks of the executor.
const MAX_READY_BACKOFF: Duration = Duration::from_secs(30);

/// A unique consumer name for this process start: `<node>:<pid>:<start ms>`.
pub fn consumer_name(node: &str) -> String {
    format!("{node}:{}:{}", std::process::id(), epoch_ms())
}

/// Runs a worker until `shutdown` resolves, then shuts down in two phases (see the module
/// docs). Waits while Redis is unreachable; returns an error only for what waiting cannot
/// fix (bad settings, a refused password, a port already in use for `/metrics`).
pub async fn run<H, S>(
    redis: Redis,
    config: WorkerConfig,
    handler: H,
    shutdown: S,
) -> Result<(), Error>
where
    H: Handler,
    S: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    // Dropped with this future (early return or abort): no task is left behind.
    let shutdown = fleetq_broker::shutdown::Shutdown::new(shutdown);
    let stop = shutdown.token();
    let keys = QueueKeys::new(&config.queue)?;
    let consumer = consumer_name(&config.node);
    let Some((redis, queue)) = start(&redis, &keys, &consumer, &stop).await? else {
        return Ok(());
    };
    tracing::info!(queue = %config.queue, node = %config.node, %consumer, slots = config.slots,
        lease_ms = queue.lease.as_millis() as u64, "worker started");
    let metrics =
        Arc::new(WorkerMetrics::new(&config.queue, &config.node).map_err(Error::Metrics)?);
    metrics.slots.set(config.slots as i64);
    let metrics_addr = serve_metrics(&config, &metrics, &stop).await?;
    let rt = Arc::new(runtime(
        redis,
        keys,
        config,
        handler,
        queue,
        consumer,
        metrics,
        metrics_addr,
    ));

    let background = Background::start(&rt);
    wait_until_ready(&rt.handler, &stop).await;
    let max_block = rt.config.max_block.min(rt.taker.lease);
    let mut intake = Intake::new(rt.clone(), max_block);
    intake.run(&stop).await;

    shutdown::drain(&rt, &mut intake.tasks).await;
    background.stop().await;
    shutdown::release_pending(&rt).await;
    rt.handler.shutdown().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Waits for Redis, names this process's connections after its consumer (so the broker sees
/// at once when the process is gone), waits until the function library is there (a worker
/// never loads it: the broker or `fleetq functions load` does), checks the group and reads
/// the queue config; `None` when stopped meanwhile.
async fn start(
    redis: &Redis,
    keys: &QueueKeys,
    consumer: &str,
    stop: &CancellationToken,
) -> Result<Option<(Redis, QueueConfig)>, Error> {
    let Some(named) =
        retry::until_ready("start the worker", stop, || redis.named(consumer)).await?
    else {
        return Ok(None);
    };
    if functions::wait_until_usable(&named.conn(), stop)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let queue = retry::until_ready("start the worker", stop, || async {
        take::ensure_group(&named, keys).await?;
        QueueConfig::load(&mut named.conn(), keys).await
    })
    .await?;
    Ok(queue.map(|q| (named, q)))
}

/// Takes no job before the executor can run one (its command exists, its server answers).
async fn wait_until_ready<H: Handler>(handler: &H, stop: &CancellationToken) {
    let mut wait = Duration::from_millis(200);
    while let Err(why) = handler.ready().await {
        tracing::warn!(%why, retry_in_ms = wait.as_millis() as u64, "executor not ready; taking no jobs yet");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        wait = (wait * 2).min(MAX_READY_BACKOFF);
    }
}

/// Serves `/metrics` when configured; the bound address goes into the node record.
async fn serve_metrics(
    config: &WorkerConfig,
    metrics: &Arc<WorkerMetrics>,
    stop: &CancellationToken,
) -> Result<Option<std::net::SocketAddr>, Error> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let bound = listener.local_addr().ok();
    tracing::info!(addr = ?bound, "serving /metrics");
    let stop = stop.clone();
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics.clone(),
        async move { stop.cancelled().await },
    ));
    Ok(bound)
}

#[allow(clippy::too_many_arguments)]
fn runtime<H>(
    redis: Redis,
    keys: QueueKeys,
    config: WorkerConfig,
    handler: H,
    queue: QueueConfig,
    consumer: String,
    metrics: Arc<WorkerMetrics>,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Runtime<H>
where
    H: Handler,
{
    let caller = Caller {
        consumer: consumer.clone(),
        node: config.node.clone(),
    };
    let held = Held::default();
    let lease = queue.lease;
    Runtime {
        taker: Taker {
            redis: redis.clone(),
            keys: keys.clone(),
            caller: caller.clone(),
            lease,
            starts_at_once: !handler.reports_start(),
        },
        committer: Committer {
            redis: redis.clone(),
            keys: keys.clone(),
            consumer: consumer.clone(),
            lease,
            hard_stop: CancellationToken::new(),
        },
        renewer: Renewer {
            redis: redis.clone(),
            keys: keys.clone(),
            caller,
            lease,
            held: held.clone(),
        },
        node: NodeHandle {
            redis,
            keys,
            node: config.node.clone(),
            consumer,
            health: Arc::new(Health::default()),
            metrics,
            metrics_addr,
        },
        slots: Arc::new(Semaphore::new(config.slots)),
        queue: Mutex::new(queue),
        config,
        handler,
        held,
    }
}

/// The lease renewer and the node heartbeat, running beside the read loop.
struct Background {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    // Should `run` be dropped (its task aborted), the background tasks stop with it, as they
    // would with the process: no lease renewed, no heartbeat.
    _guard: tokio_util::sync::DropGuard,
}

impl Background {
    fn start<H: Handler>(rt: &Arc<Runtime<H>>) -> Self {
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(rt.renewer.clone().run(stop.clone()));
        let heart = tokio::spawn(node::heartbeat_loop(
            rt.node.clone(),
            rt.config.slots,
            rt.slots.clone(),
            rt.config.heartbeat,
            stop.clone(),
        ));
        Self {
            _guard: stop.clone().drop_guard(),
            stop,
            tasks: vec![renewer, heart],
        }
    }

    /// Stops both and waits for them (the heartbeat removes the node record).
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
