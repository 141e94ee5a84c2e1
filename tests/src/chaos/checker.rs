//! The checker: decides from the history, the final state read from Redis and the executions
//! log alone. It never looks at timing.

use std::collections::{BTreeMap, HashMap};

use fleetq_broker::{JobState, Producer, QueueKeys, Redis};

use super::history::History;

/// One verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// Counts or ids behind the verdict.
    pub detail: String,
}

/// The final state of the queue as read from Redis after the drain.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Observed {
    /// State of every job the generator tried to enqueue.
    pub states: BTreeMap<String, String>,
    /// `succeeded` events per job id in the events stream.
    pub successes: HashMap<String, u64>,
    /// Stats hash counter `fenced` (late results refused).
    pub fenced: i64,
    /// XLEN of the stream.
    pub stream_len: u64,
    /// Entries in the PEL.
    pub pending: u64,
    /// ZCARD of the delayed set.
    pub delayed: u64,
    /// Executions (`start` lines) per job id in the executions log.
    pub executions: HashMap<String, u64>,
}

/// The outcome of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Every verdict.
    pub checks: Vec<Check>,
    /// Enqueues acknowledged / attempted.
    pub acked: usize,
    /// Enqueues attempted.
    pub attempted: usize,
    /// Final states: state name → jobs.
    pub states: BTreeMap<String, usize>,
    /// Executions per job: runs → jobs (0 = never ran, e.g. a failed enqueue).
    pub executions: BTreeMap<u64, usize>,
    /// Late results refused (stats `fenced`).
    pub fenced: i64,
    /// Faults done, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// The seed, to repeat the run.
    pub seed: u64,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }

    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "seed {}  enqueues {} acked / {} tried  fenced (late results refused) {}\n",
            self.seed, self.acked, self.attempted, self.fenced
        );
        out += &format!(
            "faults      {:?}\nstates      {:?}\n",
            self.faults, self.states
        );
        out += &format!("executions  {:?} (runs -> jobs)\n", self.executions);
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            out += &format!("{mark} {:<34} {}\n", c.name, c.detail);
        }
        out
    }
}

/// Reads the final state of `keys` from Redis and the executions log at `exec_log`.
pub async fn observe(
    redis: &Redis,
    producer: &Producer,
    history: &History,
    exec_log: &std::path::Path,
) -> anyhow::Result<Observed> {
    let keys = producer.keys().clone();
    let mut obs = Observed::default();
    for e in history.enqueues() {
        let state = producer.status(&e.id).await?.state;
        obs.states.insert(e.id, state.name().to_owned());
    }
    for (_, fields) in fleetq_broker::inspect::events(redis, &keys).await? {
        if fields.get("type").map(String::as_str) == Some("succeeded") {
            if let Some(job) = fields.get("job") {
                *obs.successes.entry(job.clone()).or_default() += 1;
            }
        }
    }
    read_counters(redis, &keys, &mut obs).await?;
    let log = std::fs::read_to_string(exec_log).unwrap_or_default();
    for line in log.lines() {
        let mut words = line.split_whitespace();
        if let (Some(id), Some(_pid), Some("start")) = (words.next(), words.next(), words.next()) {
            *obs.executions.entry(id.to_owned()).or_default() += 1;
        }
    }
    Ok(obs)
}

async fn read_counters(redis: &Redis, keys: &QueueKeys, obs: &mut Observed) -> anyhow::Result<()> {
    let mut conn = redis.conn();
    let fenced: Option<i64> = redis::cmd("HGET")
        .arg(keys.stats())
        .arg("fenced")
        .query_async(&mut conn)
        .await?;
    obs.fenced = fenced.unwrap_or(0);
    obs.stream_len = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut conn)
        .await?;
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .query_async(&mut conn)
        .await?;
    obs.pending = match summary {
        redis::Value::Array(v) => v
            .into_iter()
            .next()
            .and_then(|c| redis::from_redis_value(c).ok()),
        _ => None,
    }
    .unwrap_or(0);
    obs.delayed = redis::cmd("ZCARD")
        .arg(keys.delayed())
        .query_async(&mut conn)
        .await?;
    Ok(())
}

/// Decides every check from `history` and `obs`.
pub fn check(history: &History, obs: &Observed, seed: u64) -> Report {
    let enqueues = history.enqueues();
    let mut states = BTreeMap::new();
    for s in obs.states.values() {
        *states.entry(s.clone()).or_default() += 1;
    }
    let mut executions = BTreeMap::new();
    for e in &enqueues {
        *executions
            .entry(obs.executions.get(&e.id).copied().unwrap_or(0))
            .or_default() += 1;
    }
    let mut faults = BTreeMap::new();
    for f in history.faults() {
        *faults.entry(f.kind).or_default() += 1;
    }
    Report {
        checks: checks(history, obs),
        acked: enqueues.iter().filter(|e| e.acked).count(),
        attempted: enqueues.len(),
        states,
        executions,
        fenced: obs.fenced,
        faults,
        seed,
    }
}

fn checks(history: &History, obs: &Observed) -> Vec<Check> {
    let enqueues = history.enqueues();
    let terminal = |id: &str| {
        obs.states
            .get(id)
            .and_then(|s| JobState::from_name(s))
            .is_some_and(JobState::is_terminal)
    };
    let lost: Vec<&str> = enqueues
        .iter()
        .filter(|e| e.acked && !terminal(&e.id))
        .map(|e| e.id.as_str())
        .collect();
    // A failed enqueue may or may not have happened: absent or terminal, never stuck.
    let stuck: Vec<&str> = enqueues
        .iter()
        .filter(|e| {
            !e.acked
                && !terminal(&e.id)
                && obs.states.get(&e.id).map(String::as_str) != Some("not_found")
        })
        .map(|e| e.id.as_str())
        .collect();
    let doubled: Vec<&String> = obs
        .successes
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id)
        .collect();
    let succeeded_no_run: Vec<&String> = obs
        .states
        .iter()
        .filter(|(id, s)| *s == "succeeded" && !obs.executions.contains_key(*id))
        .map(|(id, _)| id)
        .collect();
    let exits = history.exits();
    let died: Vec<String> = exits
        .iter()
        .filter(|e| !e.expected)
        .map(|e| format!("{} ({:?}) at {} ms", e.process, e.code, e.at_ms))
        .collect();
    vec![
        verdict("no acknowledged job lost", &lost),
        verdict("failed enqueues absent or terminal", &stuck),
        verdict("no job with two successes", &doubled),
        verdict("every success was executed", &succeeded_no_run),
        Check {
            name: "stream, PEL and delayed set empty",
            ok: obs.stream_len == 0 && obs.pending == 0 && obs.delayed == 0,
            detail: format!(
                "xlen {} pending {} delayed {}",
                obs.stream_len, obs.pending, obs.delayed
            ),
        },
        verdict("no process died on its own", &died),
    ]
}

fn verdict<T: std::fmt::Display>(name: &'static str, bad: &[T]) -> Check {
    let shown: Vec<String> = bad.iter().take(10).map(ToString::to_string).collect();
    Check {
        name,
        ok: bad.is_empty(),
        detail: if bad.is_empty() {
            "0".into()
        } else {
            format!("{}: {}", bad.len(), shown.join(", "))
        },
    }
}
