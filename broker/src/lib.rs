//! fleetq: a job queue for GPU fleets on Redis Streams.
//!
//! This crate is the queue itself, shared by producers, workers, the broker and the CLI:
//!
//! - [`keys`] — the Redis key layout (the only place keys are built).
//! - [`job`] — the job envelope: entry fields, validation, states, status.
//! - [`queue_config`] — queue defaults kept in Redis (timeouts, attempts, backoff, retention).
//! - [`limits`] — one rule for every number in entries and configs, each field's range.
//! - [`functions`] — the server-side Redis Functions library (Lua) and its loader.
//! - [`calls`] — typed arguments and replies of the functions a worker calls.
//! - [`connection`] — connections to Redis (TLS, passwords, timeouts), whatever the topology.
//! - [`topology`] — URL forms for one server, Redis Cluster and Sentinel; slots and primaries.
//! - [`retry`] — waiting out a Redis outage: backoff, once-per-state logging, `until_ready`.
//! - [`producer`] — enqueue, status, wait for the result, cancel.
//! - [`inspect`] — queue state (depths, oldest wait, counters) and dead letters.
//! - [`liveness`] — crash detection: a worker whose connections closed gives its jobs back.
//! - [`maintenance`] — promote due retries, expire waiting jobs past their queue timeout.
//! - [`metrics`] — the broker's Prometheus metrics, read from Redis.
//! - [`http`] — the HTTP API (axum) with `/metrics`, health checks and OpenAPI.
//! - [`listener`] — the HTTP listener: connection cap, header and idle timeouts, graceful close.
//! - [`service`] — the `fleetq-broker` service: maintenance loop and HTTP server.
//! - [`shutdown`] — the SIGTERM/Ctrl-C signal and a shutdown future seen as a token.
//! - [`nodes`] — the fleet's node records; operator suspend and resume.
//! - [`partitions`] — hot queues split over several slots (and primaries).
//! - [`local_redis`] — a throwaway `redis-server` for the demo, benchmarks and tests.
//! - [`flags`] — command-line flags shared by the service binaries.
//! - [`error`] — the crate's error type.

pub mod calls;
pub mod connection;
pub mod error;
#[cfg(feature = "service")]
pub mod flags;
pub mod functions;
#[cfg(feature = "service")]
pub mod http;
pub mod inspect;
pub mod job;
pub mod keys;
pub mod limits;
#[cfg(feature = "service")]
pub mod listener;
pub mod liveness;
pub mod local_redis;
pub mod maintenance;
#[cfg(feature = "service")]
pub mod metrics;
pub mod nodes;
pub mod partitions;
pub mod producer;
pub mod queue_config;
pub mod retry;
#[cfg(feature = "service")]
pub mod service;
pub mod shutdown;
pub mod topology;

pub use connection::{Redis, RedisConfig};
pub use error::{Error, Result};
pub use job::{JobEntry, JobState, JobStatus, Malformed, RawEntry};
pub use keys::QueueKeys;
pub use local_redis::LocalRedis;
pub use producer::{EnqueueOptions, Enqueued, Producer};
pub use queue_config::QueueConfig;
