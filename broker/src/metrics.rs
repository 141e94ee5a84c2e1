//! The broker's Prometheus metrics: queue state and the per-node counters kept in Redis by
//! the server-side functions, read at scrape time (at most once a second) so they are right
//! whichever broker is scraped. Every name, label and meaning is listed in `docs/metrics.md`.
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `fleetq_queue_waiting` | gauge | queue | jobs waiting for a worker |
//! | `fleetq_queue_in_flight` | gauge | queue | jobs delivered to a worker, not finished |
//! | `fleetq_queue_delayed` | gauge | queue | retries in backoff and scheduled jobs |
//! | `fleetq_queue_dead` | gauge | queue | dead letters |
//! | `fleetq_queue_oldest_waiting_seconds` | gauge | queue | age of the oldest waiting job |
//! | `fleetq_queue_enqueued_total` | counter | queue | jobs enqueued |
//! | `fleetq_queue_consumers` | gauge | queue | worker processes in the consumer group |
//! | `fleetq_queue_jobs_total` | counter | queue, outcome | attempts' ends: succeeded, failed, retried, dead, expired, cancelled |
//! | `fleetq_queue_timeouts_total` | counter | queue, kind | timeouts: queue, start, progress, run, lease |
//! | `fleetq_queue_reclaimed_total` | counter | queue | entries reclaimed after a lost lease |
//! | `fleetq_queue_fenced_total` | counter | queue | commits refused because the lease was lost |
//! | `fleetq_queue_node_jobs_total` | counter | queue, node, outcome | per node: succeeded, failed |
//! | `fleetq_queue_node_timeouts_total` | counter | queue, node, kind | per node timeouts (incl. lease) |
//! | `fleetq_nodes` | gauge | state | live nodes by state: live, suspended |
//! | `fleetq_node_slots` | gauge | node | a node's job slots |
//! | `fleetq_node_busy_slots` | gauge | node | a node's slots running a job |
//! | `fleetq_node_heartbeat_age_seconds` | gauge | node | time since the node's last heartbeat |

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::inspect::{self, QueueState};
use crate::nodes::{self, NodeRecord};
use crate::{Error, Redis, Result};

/// Scrapes closer together than this share one read of Redis.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// Job outcomes counted per queue (stats hash field = outcome).
pub const OUTCOMES: &[&str] = &[
    "succeeded",
    "failed",
    "retried",
    "dead",
    "expired",
    "cancelled",
];
/// Timeout kinds.
pub const TIMEOUT_KINDS: &[&str] = &["queue", "start", "progress", "run", "lease"];

/// Renders the broker's metrics.
#[derive(Debug)]
pub struct BrokerMetrics {
    redis: Redis,
    /// Queues to report; empty: every queue found.
    queues: Vec<String>,
    cache: Mutex<Option<(Instant, String)>>,
}

fn err(e: prometheus::Error) -> Error {
    Error::Protocol {
        step: "render metrics",
        detail: e.to_string(),
    }
}

impl BrokerMetrics {
    /// Metrics of `queues` (every queue when empty).
    pub fn new(redis: Redis, queues: Vec<String>) -> Self {
        Self {
            redis,
            queues,
            cache: Mutex::new(None),
        }
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub async fn render(&self) -> Result<String> {
        if let Some((at, text)) = self.cache.lock().map_or(None, |c| c.clone()) {
            if at.elapsed() < MIN_REFRESH {
                return Ok(text);
            }
        }
        let served = crate::partitions::served(&self.redis, &self.queues).await?;
        let states = inspect::queue_states(&self.redis, &served).await?;
        let fleet = nodes::list(&self.redis).await?;
        let now_ms = nodes::server_ms(&self.redis).await?;
        let text = encode(&states, &fleet, now_ms).map_err(err)?;
        if let Ok(mut c) = self.cache.lock() {
            *c = Some((Instant::now(), text.clone()));
        }
        Ok(text)
    }
}

/// Renders one scrape: a fresh registry filled from the states read just now, so a queue or
/// node that is gone simply disappears from the output.
fn encode(
    states: &[QueueState],
    fleet: &[NodeRecord],
    now_ms: u64,
) -> Result<String, prometheus::Error> {
    let reg = Registry::new();
    let queue = QueueFamilies::register(&reg)?;
    for s in states {
        queue.record(s);
    }
    FleetFamilies::register(&reg)?.record(fleet, now_ms);
    let mut out = Vec::new();
    TextEncoder::new().encode(&reg.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn gauge(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<GaugeVec, prometheus::Error> {
    let g = GaugeVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    reg.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Counters in Redis are signed; a negative one (never written by fleetq) reads as zero.
fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The `fleetq_queue_*` families.
struct QueueFamilies {
    waiting: GaugeVec,
    in_flight: GaugeVec,
    delayed: GaugeVec,
    dead: GaugeVec,
    oldest: GaugeVec,
    consumers: GaugeVec,
    enqueued: IntCounterVec,
    jobs: IntCounterVec,
    timeouts: IntCounterVec,
    reclaimed: IntCounterVec,
    fenced: IntCounterVec,
    node_jobs: IntCounterVec,
    node_timeouts: IntCounterVec,
}

impl QueueFamilies {
    fn register(reg: &Registry) -> Result<Self, prometheus::Error> {
        let g = |name: &str, help: &str| gauge(reg, name, help, &["queue"]);
        let c = |name: &str, help: &str, labels: &[&str]| counter(reg, name, help, labels);
        let q = &["queue"];
        Ok(Self {
            waiting: g("fleetq_queue_waiting", "Jobs waiting for a worker.")?,
            in_flight: g(
                "fleetq_queue_in_flight",
                "Jobs delivered to a worker and not finished.",
            )?,
            delayed: g(
                "fleetq_queue_delayed",
                "Retries waiting out their backoff and scheduled jobs.",
            )?,
            dead: g("fleetq_queue_dead", "Dead letters.")?,
            oldest: g(
                "fleetq_queue_oldest_waiting_seconds",
                "Age of the oldest waiting job.",
            )?,
            consumers: g(
                "fleetq_queue_consumers",
                "Worker processes in the queue's consumer group.",
            )?,
            enqueued: c("fleetq_queue_enqueued_total", "Jobs enqueued.", q)?,
            jobs: c(
                "fleetq_queue_jobs_total",
                "Ends of attempts by outcome.",
                &["queue", "outcome"],
            )?,
            timeouts: c(
                "fleetq_queue_timeouts_total",
                "Timeouts by kind.",
                &["queue", "kind"],
            )?,
            reclaimed: c(
                "fleetq_queue_reclaimed_total",
                "Entries reclaimed after their lease ran out.",
                q,
            )?,
            fenced: c(
                "fleetq_queue_fenced_total",
                "Commits refused because the caller had lost its lease.",
                q,
            )?,
            node_jobs: c(
                "fleetq_queue_node_jobs_total",
                "Ends of attempts per node: succeeded, failed.",
                &["queue", "node", "outcome"],
            )?,
            node_timeouts: c(
                "fleetq_queue_node_timeouts_total",
                "Timeouts per node and kind.",
                &["queue", "node", "kind"],
            )?,
        })
    }

    fn record(&self, s: &QueueState) {
        let q = s.queue.as_str();
        self.waiting.with_label_values(&[q]).set(s.waiting as f64);
        self.in_flight
            .with_label_values(&[q])
            .set(s.in_flight as f64);
        self.delayed.with_label_values(&[q]).set(s.delayed as f64);
        self.dead.with_label_values(&[q]).set(s.dead as f64);
        self.oldest
            .with_label_values(&[q])
            .set(s.oldest_waiting_seconds);
        self.consumers
            .with_label_values(&[q])
            .set(s.consumers as f64);
        self.enqueued
            .with_label_values(&[q])
            .inc_by(s.enqueued_total);
        for outcome in OUTCOMES {
            self.jobs
                .with_label_values(&[q, outcome])
                .inc_by(count(s.stat(outcome)));
        }
        for kind in TIMEOUT_KINDS {
            self.timeouts
                .with_label_values(&[q, kind])
                .inc_by(count(s.stat(&format!("timeout:{kind}"))));
        }
        self.reclaimed
            .with_label_values(&[q])
            .inc_by(count(s.stat("reclaimed")));
        self.fenced
            .with_label_values(&[q])
            .inc_by(count(s.stat("fenced")));
        for (field, value) in &s.stats {
            self.record_node_stat(q, field, *value);
        }
    }

    /// One stats-hash field of the form `node:<node>:<what>`; other fields are not per node
    /// and are skipped here.
    fn record_node_stat(&self, q: &str, field: &str, value: i64) {
        let Some((node, what)) = field
            .strip_prefix("node:")
            .and_then(|rest| rest.split_once(':'))
        else {
            return;
        };
        match what.strip_prefix("timeout:") {
            Some(kind) => self
                .node_timeouts
                .with_label_values(&[q, node, kind])
                .inc_by(count(value)),
            None if what == "succeeded" || what == "failed" => self
                .node_jobs
                .with_label_values(&[q, node, what])
                .inc_by(count(value)),
            None => {}
        }
    }
}

/// The `fleetq_nodes` and `fleetq_node_*` families.
struct FleetFamilies {
    nodes: IntGaugeVec,
    slots: GaugeVec,
    busy: GaugeVec,
    age: GaugeVec,
}

impl FleetFamilies {
    fn register(reg: &Registry) -> Result<Self, prometheus::Error> {
        let nodes = IntGaugeVec::new(
            Opts::new("fleetq_nodes", "Live nodes by state."),
            &["state"],
        )?;
        reg.register(Box::new(nodes.clone()))?;
        let n = &["node"];
        Ok(Self {
            nodes,
            slots: gauge(reg, "fleetq_node_slots", "A node's job slots.", n)?,
            busy: gauge(
                reg,
                "fleetq_node_busy_slots",
                "A node's slots running a job.",
                n,
            )?,
            age: gauge(
                reg,
                "fleetq_node_heartbeat_age_seconds",
                "Time since the node's last heartbeat.",
                n,
            )?,
        })
    }

    fn record(&self, fleet: &[NodeRecord], now_ms: u64) {
        let suspended = fleet
            .iter()
            .filter(|n| n.suspended_until() > now_ms)
            .count();
        self.nodes
            .with_label_values(&["live"])
            .set((fleet.len() - suspended) as i64);
        self.nodes
            .with_label_values(&["suspended"])
            .set(suspended as i64);
        for n in fleet {
            self.slots
                .with_label_values(&[&n.node])
                .set(n.slots() as f64);
            self.busy.with_label_values(&[&n.node]).set(n.busy() as f64);
            self.age
                .with_label_values(&[&n.node])
                .set(now_ms.saturating_sub(n.last_seen_ms()) as f64 / 1000.0);
        }
    }
}
