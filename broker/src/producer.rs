//! The producer client: enqueue, status, blocking wait for the result, cancel.
//!
//! Waiting blocks on Redis (`BLPOP` of the job's notify key, registered atomically with the
//! status read by `fleetq_watch`), never polls. Blocking commands hold a connection each, so
//! waits take connections from a deadpool-redis pool of their own; everything else goes over
//! the shared multiplexed connection.
//!
//! On a queue split in partitions ([`crate::partitions`]) a job goes to the partition its id
//! hashes to; a job without an id gets one, chosen so that such jobs go to the partitions in
//! turn. Status, wait and cancel find a job's partition from its id alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::connection::Redis;
use crate::functions::{self, fcall};
use crate::job::{check_payload, JobState, JobStatus};
use crate::keys::QueueKeys;
use crate::partitions::Partitions;
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
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
    /// The queue's partitions, as read when the producer was made.
    parts: Partitions,
    /// Jobs without an id enqueued so far (their partition goes round).
    next: Arc<AtomicUsize>,
    /// Wait connections per partition, made at the first wait on it.
    waits: Arc<Mutex<HashMap<String, WaitPool>>>,
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
    /// `fleetq functions load`. Reads the queue's partition count once: make a new producer
    /// after changing it (jobs of an older producer still run, from the queue itself).
    pub async fn new(redis: &Redis, queue: &str) -> Result<Self> {
        let keys = QueueKeys::new(queue)?;
        functions::load_all(&redis.conn()).await?;
        let parts = Partitions::load(redis, &keys).await?;
        Ok(Self {
            redis: redis.clone(),
            keys,
            parts,
            next: Arc::new(AtomicUsize::new(rand::random::<u16>().into())),
            waits: Arc::default(),
        })
    }

    /// The queue's keys.
    pub fn keys(&self) -> &QueueKeys {
        &self.keys
    }

    /// The queue's partitions (one, the queue itself, when it is not split).
    pub fn partitions(&self) -> &Partitions {
        &self.parts
    }

    /// Where a new job goes, with the id it is given: a job with an id goes to the partition
    /// the id hashes to; without one, on a split queue, it gets a random id that hashes to
    /// the next partition in turn (a few tries of CRC16), so that status finds it by its id.
    fn place(&self, id: Option<&str>) -> (&QueueKeys, Option<String>) {
        if let Some(id) = id {
            return (self.parts.for_key(id), None);
        }
        if !self.parts.is_split() {
            return (&self.keys, None);
        }
        let target = self
            .parts
            .round_robin(self.next.fetch_add(1, Ordering::Relaxed));
        loop {
            let id = format!("{:032x}", rand::random::<u128>());
            if self.parts.for_key(&id) == target {
                return (target, Some(id));
            }
        }
    }

    /// Where job `id` lives: its partition, then the queue itself (jobs queued before the
    /// split, or added there by a plain `XADD`).
    fn homes(&self, id: &str) -> Vec<&QueueKeys> {
        match self.parts.is_split() {
            true => vec![self.parts.for_key(id), self.parts.base()],
            false => vec![&self.keys],
        }
    }

    /// The `fleetq_enqueue` call for one job.
    fn enqueue_cmd(&self, payload: &str, opts: &EnqueueOptions) -> redis::Cmd {
        let (keys, generated) = self.place(opts.id.as_deref());
        let mut cmd = fcall("fleetq_enqueue", keys);
        cmd.arg(payload);
        if let Some(id) = generated {
            cmd.arg("id").arg(id);
        }
        for (k, v) in opts.args() {
            cmd.arg(k).arg(v);
        }
        cmd
    }

    /// Puts a job on the queue. Never refused for being busy: the reply says where it waits.
    pub async fn enqueue(
        &self,
        payload: &serde_json::Value,
        opts: &EnqueueOptions,
    ) -> Result<Enqueued> {
        let text = serde_json::to_string(payload)
            .map_err(|e| Error::Config(format!("payload cannot be encoded as JSON: {e}")))?;
        // Encoded by serde_json: JSON by construction.
        self.enqueue_checked(&text, opts).await
    }

    /// Like [`Producer::enqueue`], with a payload that is already JSON text. The text is
    /// checked here ([`check_payload`]): the functions do not parse payloads, so a text that
    /// is not JSON is refused ([`Error::Rejected`], saying what is wrong) before it is sent.
    pub async fn enqueue_json(&self, payload: &str, opts: &EnqueueOptions) -> Result<Enqueued> {
        check_payload(payload).map_err(|e| Error::Rejected(e.to_string()))?;
        self.enqueue_checked(payload, opts).await
    }

    /// Whether a job is added with a plain `XADD` (see [`PLAIN_PAYLOAD_BYTES`]).
    fn plain(&self, payload: &str, opts: &EnqueueOptions) -> bool {
        payload.len() >= PLAIN_PAYLOAD_BYTES && !self.parts.is_split() && opts.args().is_empty()
    }

    /// Adds large payloads (known to be JSON) with plain `XADD`s, after one
    /// `fleetq_enqueue_check` of the largest: in [`PLAIN_CALL_BYTES`] runs, each in one
    /// `MULTI` with the group's counters, which say the positions.
    async fn enqueue_plain(&self, payloads: &[&str]) -> Result<Vec<Enqueued>> {
        let largest = payloads.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut check = fcall("fleetq_enqueue_check", &self.keys);
        check.arg(largest);
        let _: String = functions::call(&mut self.redis.conn(), &check, "enqueue")
            .await
            .map_err(|e| e.refused_enqueue("job"))?;
        let stream = self.keys.stream();
        let mut out = Vec::with_capacity(payloads.len());
        for run in chunks(payloads, PLAIN_CALL_BYTES, |p| p.len()) {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for payload in run {
                pipe.cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg("payload")
                    .arg(*payload);
            }
            pipe.cmd("XINFO").arg("GROUPS").arg(&stream);
            pipe.cmd("XLEN").arg(&stream);
            let mut replies: Vec<redis::Value> = pipe
                .query_async(&mut self.redis.conn())
                .await
                .map_err(|e| Error::redis("enqueue", e).refused_enqueue("job"))?;
            if replies.len() != run.len() + 2 {
                return Err(plain_reply(format!(
                    "{} values for {} entries",
                    replies.len(),
                    run.len()
                )));
            }
            let length: u64 = parse_plain(replies.pop())?;
            let groups: Vec<Vec<redis::Value>> = parse_plain(replies.pop())?;
            // The run's entries are the last ones added: the last is at the end of the line.
            let last = crate::inspect::undelivered(groups, length);
            let n = replies.len() as u64;
            for (i, id) in replies.into_iter().enumerate() {
                out.push(Enqueued {
                    id: parse_plain(Some(id))?,
                    state: JobState::Waiting,
                    position: last.saturating_sub(n - 1 - i as u64),
                    created: true,
                });
            }
        }
        Ok(out)
    }

    /// One `fleetq_enqueue` call for a payload known to be JSON (a large one without options:
    /// a plain `XADD`).
    async fn enqueue_checked(&self, payload: &str, opts: &EnqueueOptions) -> Result<Enqueued> {
        if self.plain(payload, opts) {
            let mut one = self.enqueue_plain(&[payload]).await?;
            return one.pop().ok_or_else(|| Error::Protocol {
                step: "enqueue",
                detail: "no reply for the job".into(),
            });
        }
        let cmd = self.enqueue_cmd(payload, opts);
        let reply: (String, String, u64, u8) =
            functions::call(&mut self.redis.conn(), &cmd, "enqueue")
                .await
                .map_err(|e| e.refused_enqueue("job"))?;
        enqueued(reply)
    }

    /// Puts many jobs (JSON texts, default options) on the queue; see
    /// [`Producer::enqueue_batch_with`].
    pub async fn enqueue_batch(&self, payloads: &[String]) -> Result<Vec<Enqueued>> {
        let opts = EnqueueOptions::default();
        let jobs: Vec<(&str, &EnqueueOptions)> =
            payloads.iter().map(|p| (p.as_str(), &opts)).collect();
        self.enqueue_many(&jobs).await
    }

    /// Puts many jobs, each a JSON text with its options, on the queue: one
    /// `fleetq_enqueue_batch` call per [`BATCH_CALL_JOBS`] jobs or [`BATCH_CALL_BYTES`] of
    /// payload, all of one queue or partition in one pipeline (one round trip per partition).
    /// Each call reads the queue's config and line once for all its jobs. The replies are in
    /// the order of `jobs`, each as [`Producer::enqueue_json`] answers it.
    ///
    /// Every payload is checked first ([`check_payload`]); one that is not JSON refuses the
    /// batch before anything is sent, naming the job. A job the functions refuse (a payload
    /// over `max_payload_bytes`, say) refuses its call; other calls of the batch may have
    /// queued their jobs by then, so give jobs an `id` when a batch may be sent again.
    pub async fn enqueue_batch_with(
        &self,
        jobs: &[(String, EnqueueOptions)],
    ) -> Result<Vec<Enqueued>> {
        let jobs: Vec<(&str, &EnqueueOptions)> =
            jobs.iter().map(|(p, o)| (p.as_str(), o)).collect();
        self.enqueue_many(&jobs).await
    }

    async fn enqueue_many(&self, jobs: &[(&str, &EnqueueOptions)]) -> Result<Vec<Enqueued>> {
        for (i, (payload, _)) in jobs.iter().enumerate() {
            check_payload(payload).map_err(|e| {
                Error::Rejected(format!("job {} of {} in the batch: {e}", i + 1, jobs.len()))
            })?;
        }
        // In order: runs of large payloads without options go as plain XADDs, the rest
        // through the functions.
        let mut out = Vec::with_capacity(jobs.len());
        for run in jobs.chunk_by(|a, b| self.plain(a.0, a.1) == self.plain(b.0, b.1)) {
            if self.plain(run[0].0, run[0].1) {
                let payloads: Vec<&str> = run.iter().map(|(p, _)| *p).collect();
                out.extend(self.enqueue_plain(&payloads).await?);
            } else {
                out.extend(self.enqueue_functions(run).await?);
            }
        }
        Ok(out)
    }

    /// Jobs known to be JSON through `fleetq_enqueue_batch`, one pipeline per queue or
    /// partition.
    async fn enqueue_functions(&self, jobs: &[(&str, &EnqueueOptions)]) -> Result<Vec<Enqueued>> {
        // The jobs of each queue or partition, in order, with the id given to those without.
        let mut homes: Vec<(&QueueKeys, Vec<Placed>)> = Vec::new();
        for (i, (_, opts)) in jobs.iter().enumerate() {
            let (keys, generated) = self.place(opts.id.as_deref());
            match homes.iter_mut().find(|(k, _)| *k == keys) {
                Some((_, list)) => list.push((i, generated)),
                None => homes.push((keys, vec![(i, generated)])),
            }
        }
        let mut out: Vec<Option<Enqueued>> = vec![None; jobs.len()];
        for (keys, list) in homes {
            let mut pipe = redis::pipe();
            let mut order = Vec::with_capacity(list.len());
            for chunk in chunks(&list, BATCH_CALL_BYTES, |(i, _)| jobs[*i].0.len()) {
                let mut cmd = fcall("fleetq_enqueue_batch", keys);
                for (i, generated) in chunk {
                    let (payload, opts) = jobs[*i];
                    let mut pairs = opts.args();
                    if let Some(id) = generated {
                        pairs.push(("id", id.clone()));
                    }
                    cmd.arg(pairs.len()).arg(payload);
                    for (k, v) in pairs {
                        cmd.arg(k).arg(v);
                    }
                    order.push(*i);
                }
                pipe.add_command(cmd);
            }
            let replies: Vec<Vec<(String, String, u64, u8)>> =
                functions::call_pipeline(&mut self.redis.conn(), &pipe, "enqueue batch")
                    .await
                    .map_err(|e| e.refused_enqueue("batch of jobs"))?;
            let replies: Vec<_> = replies.into_iter().flatten().collect();
            if replies.len() != order.len() {
                return Err(Error::Protocol {
                    step: "enqueue batch",
                    detail: format!(
                        "{} replies to {} jobs; is the server's fleetq library another version than this client's?",
                        replies.len(),
                        order.len()
                    ),
                });
            }
            for (i, reply) in order.into_iter().zip(replies) {
                out[i] = Some(enqueued(reply)?);
            }
        }
        // Every place was filled above (one reply per job, checked).
        Ok(out.into_iter().flatten().collect())
    }

    /// What is known about job `id` now.
    pub async fn status(&self, id: &str) -> Result<JobStatus> {
        Ok(self.find(id, "fleetq_status", "status").await?.1)
    }

    /// Job `id`'s status, and the caller counted as watching it: its routine events (`started`
    /// aside, see `routine_events` in [`QueueConfig`](crate::QueueConfig)) are written to the
    /// events stream until it ends, and its end is pushed to its notify list (as for
    /// [`Producer::wait`]).
    pub async fn watch(&self, id: &str) -> Result<JobStatus> {
        Ok(self.find(id, "fleetq_watch", "watch").await?.1)
    }

    /// Job `id`'s status with the queue or partition that holds it (its events are there).
    pub async fn locate(&self, id: &str) -> Result<(QueueKeys, JobStatus)> {
        let (keys, st) = self.find(id, "fleetq_status", "status").await?;
        Ok((keys.clone(), st))
    }

    /// Calls a function that answers a job's status fields (`fleetq_status`, `fleetq_watch`)
    /// on the job's home, then on the queue itself while the answer is `not_found`.
    async fn find(
        &self,
        id: &str,
        function: &str,
        step: &'static str,
    ) -> Result<(&QueueKeys, JobStatus)> {
        let homes = self.homes(id);
        for keys in &homes {
            let mut cmd = fcall(function, keys);
            cmd.arg(id);
            let flat: Vec<(String, String)> =
                functions::call(&mut self.redis.conn(), &cmd, step).await?;
            let status = JobStatus::from_fields(id, flat);
            if status.state != JobState::NotFound {
                return Ok((*keys, status));
            }
        }
        Ok((homes[0], JobStatus::from_fields(id, Vec::new())))
    }

    /// The wait pool of one queue or partition.
    fn wait_pool(&self, keys: &QueueKeys) -> Result<WaitPool> {
        let mut pools = self.waits.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(keys.name()) {
            return Ok(pool.clone());
        }
        let manager = WaitConns {
            redis: self.redis.clone(),
            key: keys.stream(),
        };
        let pool = WaitPool::builder(manager)
            .max_size(DEFAULT_MAX_CONCURRENT_WAITS)
            .build()
            .map_err(|e| Error::Config(format!("cannot build the wait pool: {e}")))?;
        pools.insert(keys.name().to_owned(), pool.clone());
        Ok(pool)
    }

    /// Waits until job `id` ends (succeeded, failed, dead, expired or cancelled) and returns
    /// its final status; [`Error::Timeout`] after `timeout`. Blocks on Redis, never polls.
    /// An unknown id returns at once with state `not_found`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<JobStatus> {
        let deadline = Instant::now() + timeout;
        let (keys, status) = self.find(id, "fleetq_watch", "wait").await?;
        if status.state.is_terminal() || status.state == JobState::NotFound {
            return Ok(status);
        }
        let mut conn = self.wait_pool(keys)?.get().await.map_err(|e| match e {
            deadpool::managed::PoolError::Backend(e) => e,
            other => Error::Config(format!("cannot take a connection for the wait: {other}")),
        })?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        // BLPOP takes seconds as a float; 0 would mean "forever".
        let secs = remaining.as_secs_f64().max(0.01);
        let popped = tokio::time::timeout(
            remaining + self.redis.config().response_timeout,
            redis::cmd("BLPOP")
                .arg(keys.notify(id))
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
        let mut state = JobState::NotFound;
        for keys in self.homes(id) {
            let mut cmd = fcall("fleetq_cancel", keys);
            cmd.arg(id);
            let (s,): (String,) = functions::call(&mut self.redis.conn(), &cmd, "cancel").await?;
            state = parse_state(&s)?;
            if state != JobState::NotFound {
                break;
            }
        }
        Ok(state)
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

/// Most jobs in one `fleetq_enqueue_batch` call sent by [`Producer::enqueue_batch`]: a call
/// holds Redis while it runs (about 5 µs a job), so a large batch goes in several calls of one
/// pipeline. 100.
pub const BATCH_CALL_JOBS: usize = 100;

/// A payload this big or bigger, of a job without options on a queue that is not split, is
/// added with a plain `XADD` (in a `MULTI` with the group's counters, for its position) after
/// a `fleetq_enqueue_check` of its size, not passed to `fleetq_enqueue`: Redis 7.0's Lua
/// hashes every byte of every string a function is given, which for a payload of 1 MB costs
/// about ten times the `XADD` that stores it. 64 KiB.
pub const PLAIN_PAYLOAD_BYTES: usize = 64 * 1024;

/// Most payload bytes in one `fleetq_enqueue_batch` call (a job larger than this goes alone):
/// bounds the arguments Redis holds for one call. 1 MiB.
pub const BATCH_CALL_BYTES: usize = 1 << 20;

/// Most payload bytes in one `MULTI` of plain `XADD`s ([`PLAIN_PAYLOAD_BYTES`]): Redis holds a
/// transaction's commands until its `EXEC`. 8 MiB.
pub const PLAIN_CALL_BYTES: usize = 8 << 20;

/// `items` cut into runs of at most [`BATCH_CALL_JOBS`] items and `max_bytes` of `size`
/// (each run holds at least one item).
fn chunks<T>(items: &[T], max_bytes: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && (i - start == BATCH_CALL_JOBS || bytes + n > max_bytes) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// A job of a batch where it goes: its place in the batch and the id generated for it, if
/// any (see [`Producer::place`]).
type Placed = (usize, Option<String>);

/// A value of the reply to a plain enqueue (`XADD`s, `XINFO GROUPS`, `XLEN` in one `MULTI`).
fn parse_plain<T: redis::FromRedisValue>(v: Option<redis::Value>) -> Result<T> {
    let v = v.ok_or_else(|| plain_reply("too few values".into()))?;
    redis::from_redis_value(v).map_err(|e| plain_reply(e.to_string()))
}

fn plain_reply(detail: String) -> Error {
    Error::Protocol {
        step: "enqueue (plain XADD)",
        detail,
    }
}

/// A function's reply `[job_id, state, position, created]` as an [`Enqueued`].
fn enqueued((id, state, position, created): (String, String, u64, u8)) -> Result<Enqueued> {
    Ok(Enqueued {
        id,
        state: parse_state(&state)?,
        position,
        created: created == 1,
    })
}

fn parse_state(s: &str) -> Result<JobState> {
    JobState::from_name(s).ok_or_else(|| Error::Protocol {
        step: "job state",
        detail: format!(
            "unknown job state {s:?}; is the server's fleetq library newer than this client?"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_cut_by_count_and_by_bytes() {
        let small = vec![10usize; 250];
        let runs: Vec<usize> = chunks(&small, BATCH_CALL_BYTES, |n| *n)
            .iter()
            .map(|r| r.len())
            .collect();
        assert_eq!(runs, vec![100, 100, 50]);
        let big = vec![BATCH_CALL_BYTES / 2 + 1, 5, BATCH_CALL_BYTES * 3, 5];
        let runs: Vec<usize> = chunks(&big, BATCH_CALL_BYTES, |n| *n)
            .iter()
            .map(|r| r.len())
            .collect();
        assert_eq!(runs, vec![2, 1, 1], "a run holds at least one job");
        assert!(chunks(&Vec::<usize>::new(), BATCH_CALL_BYTES, |n| *n).is_empty());
    }
}
