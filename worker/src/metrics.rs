//! The worker's own Prometheus metrics, served on `/metrics` when an address is configured.
//! Every series carries `queue` and `node` labels; no job id or payload ever becomes a label.
//! The full list is in `docs/metrics.md`.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `fleetq_job_wait_seconds` | histogram | queue, node | enqueue → start of a job's first attempt |
//! | `fleetq_job_run_seconds` | histogram | queue, node | start → end of an attempt |
//! | `fleetq_jobs_total` | counter | queue, node, outcome | succeeded, failed, retried, dead, expired, cancelled |
//! | `fleetq_job_timeouts_total` | counter | queue, node, kind | queue, start, progress, run, lease |
//! | `fleetq_jobs_reclaimed_total` | counter | queue, node | entries this worker took over after a lost lease |
//! | `fleetq_commits_fenced_total` | counter | queue, node | commits refused: this worker had lost the lease |
//! | `fleetq_worker_slots` | gauge | queue, node | job slots |
//! | `fleetq_worker_busy_slots` | gauge | queue, node | slots running a job |
//! | `fleetq_node_suspended` | gauge | queue, node | 1 while the node is suspended |

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Outcomes counted in `fleetq_jobs_total`, and kinds in `fleetq_job_timeouts_total`: the
/// broker's lists, so both sides speak of the same things.
pub use fleetq_broker::metrics::{OUTCOMES, TIMEOUT_KINDS};
/// Wait-time buckets, seconds: GPU queues wait from milliseconds to many minutes.
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Run-time buckets, seconds.
const RUN_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The metrics of one worker.
#[derive(Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    pub(crate) wait: Histogram,
    pub(crate) run: Histogram,
    pub(crate) jobs: IntCounterVec,
    pub(crate) timeouts: IntCounterVec,
    pub(crate) reclaimed: IntCounter,
    pub(crate) fenced: IntCounter,
    pub(crate) slots: IntGauge,
    pub(crate) busy: IntGauge,
    pub(crate) suspended: IntGauge,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// Metrics for a worker of `queue` on `node`.
    pub fn new(queue: &str, node: &str) -> Result<Self, prometheus::Error> {
        // `queue` and `node` are constant labels of the registry: every series carries them.
        let labels = HashMap::from([
            ("queue".to_owned(), queue.to_owned()),
            ("node".to_owned(), node.to_owned()),
        ]);
        let registry = Registry::new_custom(None, Some(labels))?;
        let r = &registry;
        let counter =
            |name: &str, help: &str| IntCounter::new(name, help).and_then(|m| registered(r, m));
        let gauge =
            |name: &str, help: &str| IntGauge::new(name, help).and_then(|m| registered(r, m));
        let by = |label: &str, name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label]).and_then(|m| registered(r, m))
        };
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            histogram(name, help, buckets).and_then(|m| registered(r, m))
        };
        let metrics = Self {
            wait: hist(
                "fleetq_job_wait_seconds",
                "Time from enqueue to the start of a job's first attempt.",
                WAIT_BUCKETS,
            )?,
            run: hist(
                "fleetq_job_run_seconds",
                "Time from the start to the end of an attempt.",
                RUN_BUCKETS,
            )?,
            jobs: by(
                "outcome",
                "fleetq_jobs_total",
                "Ends of attempts by outcome.",
            )?,
            timeouts: by(
                "kind",
                "fleetq_job_timeouts_total",
                "Timeouts on this node by kind.",
            )?,
            reclaimed: counter(
                "fleetq_jobs_reclaimed_total",
                "Entries this worker took over after their lease ran out.",
            )?,
            fenced: counter(
                "fleetq_commits_fenced_total",
                "Commits refused because this worker had lost the lease.",
            )?,
            slots: gauge("fleetq_worker_slots", "Job slots.")?,
            busy: gauge("fleetq_worker_busy_slots", "Slots running a job.")?,
            suspended: gauge("fleetq_node_suspended", "1 while this node is suspended.")?,
            registry,
        };
        metrics.create_labelled_series();
        Ok(metrics)
    }

    /// Every series exists from the start, at 0, so dashboards and rates see it.
    fn create_labelled_series(&self) {
        for o in OUTCOMES {
            self.jobs.with_label_values(&[o]);
        }
        for k in TIMEOUT_KINDS {
            self.timeouts.with_label_values(&[k]);
        }
    }

    pub(crate) fn outcome(&self, outcome: &str) {
        self.jobs.with_label_values(&[outcome]).inc();
    }

    pub(crate) fn timeout(&self, kind: &str) {
        self.timeouts.with_label_values(&[kind]).inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Serves `/metrics` on `listener` until `shutdown` resolves.
pub async fn serve<S>(listener: tokio::net::TcpListener, metrics: Arc<WorkerMetrics>, shutdown: S)
where
    S: Future<Output = ()> + Send + 'static,
{
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    m.render(),
                )
                    .into_response()
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
}

/// Registers `metric` with `registry` and hands it back (a registry keeps its own clone).
fn registered<M>(registry: &Registry, metric: M) -> Result<M, prometheus::Error>
where
    M: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}
