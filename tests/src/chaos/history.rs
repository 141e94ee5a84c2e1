//! The history of a run: what the producer saw for every enqueue, every fault and every
//! process exit, each with its time since the start. The checker decides from it alone
//! (plus the final state read from Redis and the executions log).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// What one enqueue call returned.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Enqueue {
    /// The job id the harness chose.
    pub id: String,
    /// Ms since the start of the run.
    pub at_ms: u64,
    /// Acknowledged by Redis; when false the job may or may not exist.
    pub acked: bool,
    /// The error when not acknowledged.
    pub error: Option<String>,
}

/// One fault, from start to end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fault {
    /// `worker-kill`, `worker-pause`, `redis-kill`, `redis-pause`.
    pub kind: &'static str,
    /// The node or `redis`.
    pub target: String,
    /// Ms since the start when it began.
    pub at_ms: u64,
    /// Ms it lasted.
    pub lasted_ms: u64,
}

/// A process that exited in a way the nemesis did not cause.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exit {
    /// The node, `broker` or `redis`.
    pub process: String,
    /// Ms since the start.
    pub at_ms: u64,
    /// Exit code, none when killed by a signal.
    pub code: Option<i32>,
    /// Expected (a SIGTERM at the end that exited 0) or not.
    pub expected: bool,
}

#[derive(Debug, Default)]
struct Inner {
    enqueues: Vec<Enqueue>,
    faults: Vec<Fault>,
    exits: Vec<Exit>,
}

/// A shared, append-only history.
#[derive(Debug, Clone)]
pub struct History {
    start: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            inner: Arc::default(),
        }
    }

    /// Ms since the start.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Records an enqueue.
    pub fn enqueue(&self, e: Enqueue) {
        self.with(|i| i.enqueues.push(e));
    }

    /// Records a fault.
    pub fn fault(&self, f: Fault) {
        self.with(|i| i.faults.push(f));
    }

    /// Records a process exit.
    pub fn exit(&self, e: Exit) {
        self.with(|i| i.exits.push(e));
    }

    /// Every enqueue so far.
    pub fn enqueues(&self) -> Vec<Enqueue> {
        self.with(|i| i.enqueues.clone())
    }

    /// Every fault so far.
    pub fn faults(&self) -> Vec<Fault> {
        self.with(|i| i.faults.clone())
    }

    /// Every exit so far.
    pub fn exits(&self) -> Vec<Exit> {
        self.with(|i| i.exits.clone())
    }
}
