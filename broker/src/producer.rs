//! The producer client: enqueue, status, blocking wait for the result, cancel.
//!
//! Waiting blocks on Redis (`BLPOP` of the job's notify key, registered atomically with the
//! status read by `fleetq_watch`), never polls. Blocking commands hold a connection each, so
//! waits take connections from a deadpool-redis pool of their own; everything else goes over
//! the shared multiplexed connection.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::connection::Redis;
use crate::functions::{self, fcall};
use crate::job::{JobState, JobStatus};
use crate::keys::QueueKeys;
use crate::{Error, Result};

/// Most waits that may block at once per producer; more queue for a connection.
/// Default 32.
pub const DEFAULT_MAX_CONCURRENT_WAITS: usize = 32;

/// Optional settings of one job. All default to the queue's config.
#[derive(Debug, Clone, Default)]
pub struct EnqueueOptions {
    /// Idempotency key and job id: enqueueing the same id again returns the existing job.
    pub id: Option<String>,
    /// What a node that fails this job may be blocked for (model name, pipeline…).
    pub workflow: Option<String>,
    /// Attempts before the job is dead-lettered, first run included.
    pub max_attempts: Option<u32>,
    /// Expire the job when not started within this.
    pub queue_timeout: Option<Duration>,
    /// Taken but not started within this → timeout.
    pub start_timeout: Option<Duration>,
    /// No progress event for this long → timeout.
    pub progress_timeout: Option<Duration>,
    /// Cap on one attempt's run time.
    pub run_timeout: Option<Duration>,
    /// Run no earlier than this from now.
    pub delay: Option<Duration>,
    /// W3C trace context, passed to the handler.
    pub traceparent: Option<String>,
}

impl EnqueueOptions {
    fn args(&self) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| d.as_millis().to_string();
        let mut out = Vec::new();
        let mut push = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                out.push((k, v));
            }
        };
        push("id", self.id.clone());
        push("workflow", self.workflow.clone());
        push("max_attempts", self.max_attempts.map(|v| v.to_string()));
        push("queue_timeout_ms", self.queue_timeout.map(ms));
        push("start_timeout_ms", self.start_timeout.map(ms));
        push("progress_timeout_ms", self.progress_timeout.map(ms));
        push("run_timeout_ms", self.run_timeout.map(ms));
        push("delay_ms", self.delay.map(ms));
        push("traceparent", self.traceparent.clone());
        out
    }
}

/// The answer to an enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Enqueued {
    /// The job id (the given `id`, else the stream entry id).
    pub id: String,
    /// `waiting` or `scheduled` for a new job; the existing job's state for a known id.
    pub state: JobState,
    /// 1-based place among waiting jobs; 0 when not waiting.
    pub position: u64,
    /// False when the id was already known and nothing was added.
    pub created: bool,
}

/// A client that puts jobs on one queue and follows them.
#[derive(Clone)]
pub struct Producer {
    redis: Redis,
    keys: QueueKeys,
    waits: WaitPool,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("queue", &self.keys.name())
            .finish()
    }
}

impl Producer {
    /// A producer for `queue`. Loads the server-side functions when the server has none or an
    /// older version, for convenience, when its Redis user may (`function|load`). A user
    /// without it (the producer role of docs/operations.md) gets through when the library is
    /// current or newer; when it is missing or older, the error ([`Error::Library`]) names
    /// `fleetq functions load`.
    pub async fn new(redis: &Redis, queue: &str) -> Result<Self> {
        let keys = QueueKeys::new(queue)?;
        functions::load_all(&redis.conn()).await?;
        let manager = WaitConns {
            redis: redis.clone(),
            key: keys.stream(),
        };
        let waits = WaitPool::builder(manager)
            .max_size(DEFAULT_MAX_CONCURRENT_WAITS)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the wait pool: {e}")))?;
        Ok(Self {
            redis: redis.clone(),
            keys,
            waits,
        })
    }

    /// The queue's keys.
    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// Puts a job on the queue. Never refused for being busy: the reply says where it waits.
    pub async fn enqueue(
        &self,
        payload: &serde_json::Value,
        opts: &EnqueueOptions,
    ) -> Result<Enqueued> {
        let text = serde_json::to_string(payload)
            .map_err(|e| Error::Config(format!("payload cannot be encoded as JSON: {e}")))?;
        self.enqueue_json(&text, opts).await
    }

    /// Like [`Producer::enqueue`], with a payload that is already JSON text.
    pub async fn enqueue_json(&self, payload: &str, opts: &EnqueueOptions) -> Result<Enqueued> {
        let mut cmd = fcall("fleetq_enqueue", &self.keys);
        cmd.arg(payload);
        for (k, v) in opts.args() {
            cmd.arg(k).arg(v);
        }
        let (id, state, position, created): (String, String, u64, u8) =
            functions::call(&mut self.redis.conn(), &cmd, "enqueue")
                .await
                .map_err(|e| e.refused_enqueue("job"))?;
        Ok(Enqueued {
            id,
            state: parse_state(&state)?,
            position,
            created: created == 1,
        })
    }

    /// Puts many jobs on the queue in one round trip (a pipeline of `fleetq_enqueue` calls).
    pub async fn enqueue_batch(&self, payloads: &[String]) -> Result<Vec<Enqueued>> {
        let mut pipe = redis::pipe();
        for p in payloads {
            let mut cmd = fcall("fleetq_enqueue", &self.keys);
            cmd.arg(p);
            pipe.add_command(cmd);
        }
        let replies: Vec<(String, String, u64, u8)> =
            functions::call_pipeline(&mut self.redis.conn(), &pipe, "enqueue batch")
                .await
                .map_err(|e| e.refused_enqueue("batch of jobs"))?;
        replies
            .into_iter()
            .map(|(id, state, position, created)| {
                Ok(Enqueued {
                    id,
                    state: parse_state(&state)?,
                    position,
                    created: created == 1,
                })
            })
            .collect()
    }

    /// What is known about job `id` now.
    pub async fn status(&self, id: &str) -> Result<JobStatus> {
        let mut cmd = fcall("fleetq_status", &self.keys);
        cmd.arg(id);
        let flat: Vec<(String, String)> =
            functions::call(&mut self.redis.conn(), &cmd, "status").await?;
        Ok(JobStatus::from_fields(id, flat))
    }

    /// Waits until job `id` ends (succeeded, failed, dead, expired or cancelled) and returns
    /// its final status; [`Error::Timeout`] after `timeout`. Blocks on Redis, never polls.
    /// An unknown id returns at once with state `not_found`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<JobStatus> {
        let deadline = Instant::now() + timeout;
        let mut watch = fcall("fleetq_watch", &self.keys);
        watch.arg(id);
        let flat: Vec<(String, String)> =
            functions::call(&mut self.redis.conn(), &watch, "wait").await?;
        let status = JobStatus::from_fields(id, flat);
        if status.state.is_terminal() || status.state == JobState::NotFound {
            return Ok(status);
        }
        let mut conn = self.waits.get().await.map_err(|e| match e {
            deadpool::managed::PoolError::Backend(e) => e,
            other => Error::Config(format!("cannot take a connection for the wait: {other}")),
        })?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // BLPOP takes seconds as a float; 0 would mean "forever".
        let secs = remaining.as_secs_f64().max(0.01);
        let popped = tokio::time::timeout(
            remaining + self.redis.config().response_timeout,
            redis::cmd("BLPOP")
                .arg(self.keys.notify(id))
                .arg(secs)
                .query_async::<Option<(String, String)>>(&mut *conn),
        )
        .await;
        match popped {
            Ok(Ok(Some(_))) => self.status(id).await,
            Ok(Ok(None)) => Err(Error::Timeout {
                what: format!("job {id} to end"),
                after: timeout,
            }),
            Ok(Err(e)) => Err(Error::redis("wait", e)),
            Err(_) => {
                // The connection's state is unknown: keep it out of the pool.
                drop(deadpool::managed::Object::take(conn));
                Err(Error::Timeout {
                    what: format!("job {id} to end (Redis did not answer)"),
                    after: timeout,
                })
            }
        }
    }

    /// Cancels job `id`: a waiting or delayed job will not run (`cancelled`); a running job's
    /// worker is told at its next lease renewal (`cancelling`). Returns the resulting state.
    pub async fn cancel(&self, id: &str) -> Result<JobState> {
        let mut cmd = fcall("fleetq_cancel", &self.keys);
        cmd.arg(id);
        let (state,): (String,) = functions::call(&mut self.redis.conn(), &cmd, "cancel").await?;
        parse_state(&state)
    }
}

/// Connections for blocking waits on one queue: dedicated ones (a `BLPOP` holds its
/// connection), on the node that serves the queue, made again after a failover.
type WaitPool = deadpool::managed::Pool<WaitConns>;

/// Makes and checks the wait pool's connections.
struct WaitConns {
    redis: Redis,
    /// A key of the queue, to find its node.
    key: String,
}

impl deadpool::managed::Manager for WaitConns {
    type Type = crate::connection::BlockingConn;
    type Error = Error;

    async fn create(&self) -> Result<Self::Type> {
        // Waits bound themselves (BLPOP timeout plus a margin).
        self.redis.unbounded_conn(&self.key).await
    }

    async fn recycle(
        &self,
        conn: &mut Self::Type,
        _: &deadpool::managed::Metrics,
    ) -> deadpool::managed::RecycleResult<Error> {
        // A pooled connection may point at a primary that is gone or now a replica.
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(conn)
            .await
            .map_err(|e| Error::redis("check a pooled connection", e))?;
        let role = match role.first() {
            Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        };
        match role.as_str() {
            "master" => Ok(()),
            other => Err(deadpool::managed::RecycleError::message(format!(
                "the pooled connection's server is a {other} now"
            ))),
        }
    }
}

fn parse_state(s: &str) -> Result<JobState> {
    JobState::from_name(s).ok_or_else(|| Error::Protocol {
        step: "job state",
        detail: format!(
            "unknown job state {s:?}; is the server's fleetq library newer than this client?"
        ),
    })
}
