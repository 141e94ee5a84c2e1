//! The steps of a job's life, driven directly by the bench the way a worker with 8 slots and
//! a broker perform them, so that each can be measured on its own (see
//! [`crate::scenarios::by_step`]):
//!
//! - **enqueue** — `Producer::enqueue_batch`, the producer's batch API;
//! - **take** — the worker's read (`XREADGROUP … COUNT n >`, no block: there is a backlog),
//!   then `fleetq_take` for the batch read, with the values the worker passes for each entry;
//! - **complete** — `fleetq_complete` for what one take took, as the no-op bench handler's
//!   successes (result `null`);
//! - **maintenance** — one pass of the broker's maintenance loop
//!   (`fleetq_broker::maintenance::run`) over the queue, as `fleetq-broker --queues <q>` runs
//!   it every second.
//!
//! Every fleetq function call the bench builds itself is built here, with the
//! `fleetq_broker::calls` builders, so that when a builder's signature changes (a batched
//! completion, say) this module is the one to adapt. The worker's own code is not called:
//! its take and completion are private to it, and the bench must measure what the library
//! does whatever shape the worker's loop has.

use anyhow::{bail, Context};
use fleetq_broker::calls::{self, Caller, Commit, Ending, Holding, TakeDecision, TakeEntry, Token};
use fleetq_broker::keys::GROUP;
use fleetq_broker::{
    functions, maintenance, partitions, JobEntry, Producer, QueueConfig, QueueKeys, RawEntry, Redis,
};
use redis::Value;

/// What a take handed to this caller: the entries it may run, ready to complete.
#[derive(Debug, Default)]
pub struct Taken {
    /// Entry, job and token of each entry taken, in the order read.
    pub held: Vec<Holding>,
}

impl Taken {
    /// How many entries were taken.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when the read found nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// One queue's steps, as one worker consumer and one broker.
#[derive(Debug)]
pub struct Steps {
    /// Shared connection of every step.
    redis: Redis,
    /// The queue.
    keys: QueueKeys,
    /// For the enqueue step.
    producer: Producer,
    /// The consumer and node the takes and completions are made as.
    caller: Caller,
    /// The queue config, read once as a worker does at start (lease, attempts, limits).
    config: QueueConfig,
}

impl Steps {
    /// Steps of `queue` (its group must exist), taken and completed as a consumer of `node`.
    pub async fn new(redis: &Redis, queue: &str, node: &str) -> anyhow::Result<Self> {
        let keys = QueueKeys::new(queue)?;
        let config = QueueConfig::load(&mut redis.conn(), &keys)
            .await
            .context("read the queue config")?;
        Ok(Self {
            redis: redis.clone(),
            producer: Producer::new(redis, queue).await?,
            caller: Caller {
                consumer: fleetq_worker::worker::consumer_name(node),
                node: node.to_owned(),
            },
            keys,
            config,
        })
    }

    /// Enqueues `payloads` in one `enqueue_batch` call; returns the job ids.
    pub async fn enqueue(&self, payloads: &[String]) -> anyhow::Result<Vec<String>> {
        let replies = self
            .producer
            .enqueue_batch(payloads)
            .await
            .context("enqueue a batch")?;
        Ok(replies.into_iter().map(|r| r.id).collect())
    }

    /// Reads up to `count` waiting entries and takes them with one `fleetq_take`. Fails
    /// when `fleetq_take` does not let every entry run here: in this bench every entry is a
    /// fresh valid job read by its only consumer, so anything else is a bug to look at.
    pub async fn take(&self, count: usize) -> anyhow::Result<Taken> {
        let entries = self.read(count).await?;
        if entries.is_empty() {
            return Ok(Taken::default());
        }
        let args = entries
            .iter()
            .map(|e| self.take_entry(e))
            .collect::<anyhow::Result<Vec<TakeEntry>>>()?;
        // The bench handler does not report its start: the job starts when taken.
        // Marked alive at most every lease/4 by a worker: not per batch.
        let cmd = calls::take_for(
            &self.keys,
            &self.caller,
            self.config.lease,
            true,
            false,
            &self.config,
            &args,
        );
        let rows = functions::call(&mut self.redis.conn(), &cmd, "take").await?;
        let replies = calls::parse_take(rows)?;
        if replies.len() != args.len() {
            bail!(
                "fleetq_take answered for {} of {} entries; the function library and this bench disagree on the reply's shape",
                replies.len(),
                args.len()
            );
        }
        let mut held = Vec::with_capacity(args.len());
        for (arg, reply) in args.into_iter().zip(replies) {
            if !matches!(reply.decision, TakeDecision::Run { .. }) {
                bail!(
                    "fleetq_take decided {:?} for entry {} (job {}), a fresh job read by its only consumer; look at the take function",
                    reply.decision,
                    arg.entry_id,
                    arg.job_id
                );
            }
            held.push(Holding {
                entry_id: arg.entry_id,
                token: arg.token.unwrap_or_else(Token::none),
                job_id: arg.job_id,
            });
        }
        Ok(Taken { held })
    }

    /// Records every job of `taken` as succeeded (result `null`) in one `fleetq_complete`
    /// call, as a worker's slots do when the jobs of one take end together. Fails when a
    /// completion is refused.
    pub async fn complete(&self, taken: Taken) -> anyhow::Result<()> {
        if taken.is_empty() {
            return Ok(());
        }
        let success = Commit::Succeeded("null".to_owned());
        let ending = Ending::default();
        let batch: Vec<calls::Completion<'_>> = taken
            .held
            .iter()
            .map(|held| calls::Completion {
                held,
                attempt: 1,
                commit: &success,
                ending: &ending,
            })
            .collect();
        let cmd = calls::complete(&self.keys, &self.caller, &batch);
        let words: Vec<String> = functions::call(&mut self.redis.conn(), &cmd, "complete").await?;
        let answers = calls::parse_complete(words, taken.len())?;
        for (held, committed) in taken.held.iter().zip(answers) {
            if committed != calls::Committed::Ok {
                bail!(
                    "fleetq_complete answered {committed:?} for job {} held by its only consumer; look at the complete function",
                    held.job_id
                );
            }
        }
        Ok(())
    }

    /// One pass of the broker's maintenance over this queue, as
    /// `fleetq_broker::maintenance::run` makes it on every tick for `--queues <this queue>`:
    /// the queue's sources (`partitions::served`), the config copied to its partitions
    /// (`partitions::sync_all`), then `maintenance::tick` on each source.
    pub async fn maintenance_pass(&self) -> anyhow::Result<()> {
        let queues = [self.keys.name().to_owned()];
        let served = partitions::served(&self.redis, &queues)
            .await
            .context("maintenance: list the queue's sources")?;
        partitions::sync_all(&self.redis, &served)
            .await
            .context("maintenance: copy the config to partitions")?;
        for keys in &served {
            maintenance::tick(&self.redis, keys)
                .await
                .context("maintenance tick")?;
        }
        Ok(())
    }

    /// `XREADGROUP GROUP workers <consumer> COUNT count STREAMS <stream> >`.
    async fn read(&self, count: usize) -> anyhow::Result<Vec<RawEntry>> {
        let reply: Option<Vec<(String, Vec<calls::EntryReply>)>> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.caller.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(self.keys.stream())
            .arg(">")
            .query_async(&mut self.redis.conn())
            .await
            .context("XREADGROUP")?;
        Ok(reply
            .unwrap_or_default()
            .into_iter()
            .flat_map(|(_, entries)| entries)
            .map(|(id, fields)| {
                RawEntry::from_bytes(
                    id,
                    fields
                        .into_iter()
                        .map(|(f, v)| (f, value_bytes(v)))
                        .collect(),
                )
            })
            .collect())
    }

    /// The values the worker passes to `fleetq_take` for `raw` (as `fleetq_worker`'s take
    /// builds them: the job parsed with the queue's payload limit, a fresh token). Fails for
    /// an entry that is not a valid job (the worker would dead-letter it; this bench enqueues
    /// none).
    fn take_entry(&self, raw: &RawEntry) -> anyhow::Result<TakeEntry> {
        let j = JobEntry::parse(raw, self.config.max_payload_bytes).map_err(|e| {
            anyhow::anyhow!(
                "entry {} is not a valid job ({e}); the bench enqueues only valid ones, so look at the producer",
                raw.id
            )
        })?;
        Ok(TakeEntry::for_job(&raw.id, &j, &self.config))
    }
}

/// Raw bytes of a field value.
fn value_bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        other => format!("{other:?}").into_bytes(),
    }
}
