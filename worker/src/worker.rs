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
use fleetq_broker::partitions::Partitions;
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
    let Some((redis, sources)) = start(&redis, &keys, &consumer, &stop).await? else {
        return Ok(());
    };
    let lease = sources[0].1.lease;
    tracing::info!(queue = %config.queue, node = %config.node, %consumer, slots = config.slots,
        lease_ms = lease.as_millis() as u64, partitions = sources.len().saturating_sub(1),
        "worker started");
    let metrics =
        Arc::new(WorkerMetrics::new(&config.queue, &config.node).map_err(Error::Metrics)?);
    metrics.slots.set(config.slots as i64);
    let metrics_addr = serve_metrics(&config, &metrics, &stop).await?;
    let shared = Shared {
        node: NodeHandle {
            redis: redis.clone(),
            keys,
            sources: Arc::new(sources.iter().map(|(k, _)| k.clone()).collect()),
            node: config.node.clone(),
            consumer: consumer.clone(),
            health: Arc::new(Health::default()),
            metrics,
            metrics_addr,
        },
        slots: Arc::new(Semaphore::new(config.slots)),
        in_flight: Arc::default(),
        handler: Arc::new(handler),
        redis,
        config,
        consumer,
    };
    let rts: Vec<Arc<Runtime<H>>> = sources
        .into_iter()
        .map(|(keys, queue)| Arc::new(shared.runtime(keys, queue)))
        .collect();

    let background = Background::start(&rts);
    wait_until_ready(&*shared.handler, &stop).await;
    let max_block = shared.config.max_block.min(lease);
    let mut intake = Intake::new(rts.clone(), max_block);
    intake.run(&stop).await;

    shutdown::drain(&rts, &mut intake.tasks).await;
    background.stop().await;
    for rt in &rts {
        shutdown::release_pending(rt).await;
    }
    shared.handler.shutdown().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// Waits for Redis, names this process's connections after its consumer (so the broker sees
/// at once when the process is gone), waits until the function library is there (a worker
/// never loads it: the broker or `fleetq functions load` does), then for each stream it reads
/// (the queue, or its partitions and itself) checks the group and reads the config; `None`
/// when stopped meanwhile.
async fn start(
    redis: &Redis,
    keys: &QueueKeys,
    consumer: &str,
    stop: &CancellationToken,
) -> Result<Option<(Redis, Vec<(QueueKeys, QueueConfig)>)>, Error> {
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
    let sources = retry::until_ready("start the worker", stop, || async {
        let mut out = Vec::new();
        for source in Partitions::load(&named, keys).await?.sources() {
            take::ensure_group(&named, &source).await?;
            let queue = QueueConfig::load(&mut named.conn(), &source).await?;
            out.push((source, queue));
        }
        Ok(out)
    })
    .await?;
    Ok(sources.map(|s| (named, s)))
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

/// What the runtimes of one worker share, whichever stream each reads.
struct Shared<H> {
    redis: Redis,
    config: WorkerConfig,
    consumer: String,
    handler: Arc<H>,
    node: NodeHandle,
    slots: Arc<Semaphore>,
    in_flight: Arc<crate::completion::InFlight>,
}

impl<H: Handler> Shared<H> {
    /// The runtime for one stream: the queue, or one of its partitions.
    fn runtime(&self, keys: QueueKeys, queue: QueueConfig) -> Runtime<H> {
        let caller = Caller {
            consumer: self.consumer.clone(),
            node: self.config.node.clone(),
        };
        let held = Held::default();
        let lease = queue.lease;
        Runtime {
            taker: Taker {
                redis: self.redis.clone(),
                keys: keys.clone(),
                caller: caller.clone(),
                lease,
                starts_at_once: !self.handler.reports_start(),
                last_beat: Arc::default(),
            },
            committer: Committer::new(
                self.redis.clone(),
                keys.clone(),
                caller.clone(),
                lease,
                self.in_flight.clone(),
            ),
            renewer: Renewer {
                redis: self.redis.clone(),
                keys,
                caller,
                lease,
                held: held.clone(),
            },
            node: self.node.clone(),
            slots: self.slots.clone(),
            queue: Mutex::new(queue),
            config: self.config.clone(),
            handler: self.handler.clone(),
            held,
        }
    }
}

/// The lease renewers (one per stream read) and the node heartbeat, beside the read loop.
struct Background {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    // Should `run` be dropped (its task aborted), the background tasks stop with it, as they
    // would with the process: no lease renewed, no heartbeat.
    _guard: tokio_util::sync::DropGuard,
}

impl Background {
    fn start<H: Handler>(rts: &[Arc<Runtime<H>>]) -> Self {
        let stop = CancellationToken::new();
        let mut tasks: Vec<_> = rts
            .iter()
            .map(|rt| tokio::spawn(rt.renewer.clone().run(stop.clone())))
            .collect();
        let rt = &rts[0];
        tasks.push(tokio::spawn(node::heartbeat_loop(
            rt.node.clone(),
            rt.config.slots,
            rt.slots.clone(),
            rt.config.heartbeat,
            stop.clone(),
        )));
        Self {
            _guard: stop.clone().drop_guard(),
            stop,
            tasks,
        }
    }

    /// Stops them and waits for them (the heartbeat removes the node record).
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
