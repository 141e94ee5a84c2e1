//! The demo's summary: outcomes and figures from the queue's counters, and each incident as
//! the queue's events tell it — which node hung and which timeout caught it after how long,
//! whose child crashed and where its jobs went, which jobs the dead host held and who finished
//! them, which nodes suspended themselves and why — with the proof that every job ended
//! exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use fleetq_broker::inspect::{self, Event};
use fleetq_broker::metrics::TIMEOUT_KINDS;
use fleetq_broker::{JobState, Producer, QueueKeys, Redis};
use serde::Serialize;

use super::FLEET;
use crate::exit::CliError;
use crate::output::{human_secs, table};

/// The summary, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// The queue the demo used.
    pub queue: String,
    /// Jobs enqueued.
    pub jobs: usize,
    /// Jobs by final state.
    pub outcomes: BTreeMap<String, usize>,
    /// Enqueue → start of the successful attempt, ms.
    pub wait_ms: Percentiles,
    /// Successful jobs per node.
    pub per_node: BTreeMap<String, usize>,
    /// Timeouts by kind.
    pub timeouts: BTreeMap<String, i64>,
    /// Timeouts by node, then kind (kinds that fired only).
    pub timeouts_by_node: BTreeMap<String, BTreeMap<String, i64>>,
    /// Entries taken over from dead hosts: reclaimed after a lost lease, or put back in line by
    /// the broker when the host's connections closed.
    pub reclaims: i64,
    /// Attempts retried.
    pub retries: i64,
    /// Nodes that suspended themselves.
    pub suspended_nodes: Vec<String>,
    /// Each incident, as it happened.
    pub incidents: Incidents,
    /// Every job ended exactly once: one terminal state each, one recorded success per
    /// succeeded job, and the counters agree.
    pub exactly_once: bool,
    /// Wall time of the demo, seconds.
    pub duration_s: f64,
    /// The log file of the demo's broker and workers.
    pub log_file: String,
}

/// Wait-time percentiles.
#[derive(Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
}

/// The incidents of the demo, from the queue's events. Times (`*_ms`) are ms since the
/// burst was enqueued, or between the two moments a field's name says.
#[derive(Debug, Default, Serialize)]
pub struct Incidents {
    /// Every timeout that fired.
    pub timeouts: Vec<TimeoutIncident>,
    /// Attempts that failed on a node (a crashed child, an error), not by a timeout.
    pub crashes: Vec<Crash>,
    /// Hosts that died, with the jobs they held.
    pub dead_hosts: Vec<DeadHost>,
    /// Nodes that suspended themselves.
    pub suspensions: Vec<Suspension>,
}

/// A timeout: which node it caught, of which kind, after how long, and what became of the job.
#[derive(Debug, Serialize)]
pub struct TimeoutIncident {
    /// The job.
    pub job: String,
    /// The node that held it.
    pub node: String,
    /// `queue`, `start`, `progress`, `run` or `lease`.
    pub kind: String,
    /// The stage the job was in (progress timeouts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// How long the node went without the sign the timeout waits for (for a lease timeout of a
    /// dead host: since its death), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_ms: Option<u64>,
    /// When it fired.
    pub at_ms: u64,
    /// The node that took the job next.
    pub retried_on: Option<String>,
    /// How the job ended.
    #[serde(flatten)]
    pub end: Ending,
}

/// A failed attempt that was not a timeout: a child that crashed, an error.
#[derive(Debug, Serialize)]
pub struct Crash {
    /// The job.
    pub job: String,
    /// The node it failed on.
    pub node: String,
    /// What the node reported.
    pub error: String,
    /// When.
    pub at_ms: u64,
    /// The node that took the job next.
    pub retried_on: Option<String>,
    /// How the job ended.
    #[serde(flatten)]
    pub end: Ending,
}

/// A host that died, and the jobs it held then.
#[derive(Debug, Serialize)]
pub struct DeadHost {
    /// The node.
    pub node: String,
    /// When it died.
    pub died_at_ms: u64,
    /// The jobs it held at that moment.
    pub jobs: Vec<HeldJob>,
}

/// A job a dead host held, and how it got away.
#[derive(Debug, Serialize)]
pub struct HeldJob {
    /// The job.
    pub job: String,
    /// `connections_closed` (the broker saw the host's connections close and put the job
    /// back in line), `lease_expired` (a worker reclaimed it when its lease ran out), or
    /// `none` (it never came back).
    pub how: String,
    /// Death → the lease timeout counted against the host.
    pub lease_timeout_after_ms: Option<u64>,
    /// The node that took it over …
    pub taken_by: Option<String>,
    /// … this long after the death.
    pub taken_after_ms: Option<u64>,
    /// How the job ended.
    #[serde(flatten)]
    pub end: Ending,
}

/// A node that suspended itself.
#[derive(Debug, Serialize)]
pub struct Suspension {
    /// The node.
    pub node: String,
    /// Why, in the node's words.
    pub reason: String,
    /// When.
    pub at_ms: u64,
    /// For how long.
    pub for_ms: u64,
}

/// When the burst went in (server clock, ms) and how long the demo took.
pub(super) struct Clock {
    pub(super) t0_ms: u64,
    pub(super) took: Duration,
}

/// The death of the dying host: its node and the moment (server clock, ms).
pub(super) struct Death {
    pub(super) node: &'static str,
    pub(super) at_ms: u64,
}

/// How a job ended: its final state (`ended`) and the node it ended on (`ended_on`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ending {
    /// The final state.
    #[serde(rename = "ended")]
    pub state: String,
    /// The node it ended on.
    #[serde(rename = "ended_on")]
    pub node: Option<String>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Reads the queue's counters, jobs and events into the summary.
pub(super) async fn summarize(
    redis: &Redis,
    p: &Producer,
    keys: &QueueKeys,
    ids: &[String],
    clock: Clock,
    death: Option<Death>,
    log: &Path,
) -> Result<Summary, CliError> {
    let state = inspect::queue_state(redis, keys).await?;
    let mut outcomes = BTreeMap::new();
    let mut per_node = BTreeMap::new();
    let mut waits = Vec::new();
    let mut ends = HashMap::new();
    let mut succeeded = 0usize;
    for id in ids {
        let st = p.status(id).await?;
        *outcomes.entry(st.state.to_string()).or_insert(0) += 1;
        ends.insert(
            id.clone(),
            Ending {
                state: st.state.to_string(),
                node: st.node.clone(),
            },
        );
        if st.state == JobState::Succeeded {
            succeeded += 1;
            if let Some(n) = &st.node {
                *per_node.entry(n.clone()).or_insert(0) += 1;
            }
            let ms = |k: &str| st.fields.get(k).and_then(|v| v.parse::<u64>().ok());
            if let (Some(enq), Some(start)) = (
                ms("enqueued_ms"),
                ms("attempt_started_ms").or(ms("started_ms")),
            ) {
                waits.push(start.saturating_sub(enq));
            }
        }
    }
    waits.sort_unstable();
    let events = inspect::events(redis, keys).await?;
    // Exactly once: one `succeeded` event per succeeded job, none for the others, and the
    // counters agree.
    let mut successes: HashMap<&str, usize> = HashMap::new();
    for (_, f) in &events {
        if f.get("type").map(String::as_str) == Some("succeeded") {
            *successes
                .entry(f.get("job").map_or("", String::as_str))
                .or_insert(0) += 1;
        }
    }
    let exactly_once = successes.values().all(|n| *n == 1)
        && successes.len() == succeeded
        && state.stat("succeeded") == succeeded as i64
        && outcomes.values().sum::<usize>() == ids.len();
    let incidents = incidents(&events, &ends, clock.t0_ms, death.as_ref());
    let mut suspended: Vec<String> = incidents
        .suspensions
        .iter()
        .map(|s| s.node.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    suspended.sort();
    let timeouts = TIMEOUT_KINDS
        .iter()
        .map(|k| ((*k).to_owned(), state.stat(&format!("timeout:{k}"))))
        .collect();
    let mut timeouts_by_node: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for spec in FLEET {
        for kind in TIMEOUT_KINDS {
            let n = state.stat(&format!("node:{}:timeout:{kind}", spec.name));
            if n > 0 {
                timeouts_by_node
                    .entry(spec.name.to_owned())
                    .or_default()
                    .insert((*kind).to_owned(), n);
            }
        }
    }
    Ok(Summary {
        queue: keys.name().to_owned(),
        jobs: ids.len(),
        outcomes,
        wait_ms: Percentiles {
            p50: percentile(&waits, 0.5),
            p95: percentile(&waits, 0.95),
        },
        per_node,
        timeouts,
        timeouts_by_node,
        reclaims: state.stat("reclaimed") + state.stat("abandoned"),
        retries: state.stat("retried"),
        suspended_nodes: suspended,
        incidents,
        exactly_once,
        duration_s: clock.took.as_secs_f64(),
        log_file: log.display().to_string(),
    })
}

/// The ms part of an event id (the server's clock when it was written).
fn event_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

/// Event types after which a job is held by nobody.
const LETS_GO: [&str; 8] = [
    "succeeded",
    "failed",
    "dead",
    "cancelled",
    "expired",
    "retrying",
    "released",
    "timeout",
];

/// The incidents the events tell: `ends` is each job's final state, `t0_ms` the moment of the
/// burst, `death` the dying host's death when it died.
fn incidents(
    events: &[Event],
    ends: &HashMap<String, Ending>,
    t0_ms: u64,
    death: Option<&Death>,
) -> Incidents {
    let get = |f: &'_ HashMap<String, String>, k: &str| -> String {
        f.get(k).cloned().unwrap_or_default()
    };
    let since = |ms: u64| ms.saturating_sub(t0_ms);
    let ending = |job: &str| ends.get(job).cloned().unwrap_or_default();
    let next_take = |job: &str, from: usize, not: &str| next_take(events, job, from, not);
    let mut out = Incidents::default();
    for (i, (id, f)) in events.iter().enumerate() {
        let at = event_ms(id);
        let (job, node) = (get(f, "job"), get(f, "node"));
        match f.get("type").map(String::as_str) {
            Some("timeout") => {
                let kind = get(f, "kind");
                let after_ms = match (kind.as_str(), death) {
                    ("lease", Some(d)) if d.node == node => Some(at.saturating_sub(d.at_ms)),
                    _ => f.get("elapsed_ms").and_then(|v| v.parse().ok()),
                };
                let end = ending(&job);
                out.timeouts.push(TimeoutIncident {
                    retried_on: next_take(&job, i + 1, "").map(|t| t.0),
                    stage: f.get("stage").filter(|s| !s.is_empty()).cloned(),
                    job,
                    node,
                    kind,
                    after_ms,
                    at_ms: since(at),
                    end,
                });
            }
            Some("retrying") if f.get("timeout").is_none_or(String::is_empty) => {
                let end = ending(&job);
                out.crashes.push(Crash {
                    retried_on: next_take(&job, i + 1, "").map(|t| t.0),
                    error: get(f, "error"),
                    job,
                    node,
                    at_ms: since(at),
                    end,
                });
            }
            Some("failed") => {
                let end = ending(&job);
                out.crashes.push(Crash {
                    retried_on: None,
                    error: get(f, "error"),
                    job,
                    node,
                    at_ms: since(at),
                    end,
                });
            }
            Some("node_suspended") => {
                let until: u64 = f.get("until_ms").and_then(|v| v.parse().ok()).unwrap_or(at);
                out.suspensions.push(Suspension {
                    node,
                    reason: get(f, "reason"),
                    at_ms: since(at),
                    for_ms: until.saturating_sub(at),
                });
            }
            _ => {}
        }
    }
    if let Some(d) = death {
        out.dead_hosts
            .push(dead_host(events, d, since(d.at_ms), ends));
    }
    out
}

/// The first node other than `not` to take `job` at or after event `from`, and when.
fn next_take(events: &[Event], job: &str, from: usize, not: &str) -> Option<(String, u64)> {
    events.get(from..)?.iter().find_map(|(id, f)| {
        let t = f.get("type").map(String::as_str);
        let node = f.get("node").map_or("", String::as_str);
        (matches!(t, Some("taken" | "started"))
            && f.get("job").map(String::as_str) == Some(job)
            && node != not
            && !node.is_empty())
        .then(|| (node.to_owned(), event_ms(id)))
    })
}

/// What the dying host held when it died, and how each job got away.
fn dead_host(
    events: &[Event],
    d: &Death,
    died_at_ms: u64,
    ends: &HashMap<String, Ending>,
) -> DeadHost {
    let after = events.partition_point(|(id, _)| event_ms(id) <= d.at_ms);
    let mut holder: BTreeMap<&str, &str> = BTreeMap::new();
    for (_, f) in &events[..after] {
        let (Some(t), Some(job)) = (f.get("type"), f.get("job")) else {
            continue;
        };
        match t.as_str() {
            "taken" | "started" => {
                holder.insert(job, f.get("node").map_or("", String::as_str));
            }
            t if LETS_GO.contains(&t) => {
                holder.remove(job.as_str());
            }
            _ => {}
        }
    }
    let jobs = holder
        .into_iter()
        .filter(|(_, node)| *node == d.node)
        .map(|(job, _)| {
            let later = |t: &str| {
                events[after..].iter().find(|(_, f)| {
                    f.get("job").map(String::as_str) == Some(job)
                        && f.get("type").map(String::as_str) == Some(t)
                })
            };
            let lease = later("timeout").filter(|(_, f)| {
                f.get("kind").map(String::as_str) == Some("lease")
                    && f.get("node").map(String::as_str) == Some(d.node)
            });
            let released = later("released")
                .filter(|(_, f)| f.get("reason").map(String::as_str) == Some("process gone"));
            let taken = next_take(events, job, after, d.node);
            let how = if released.is_some() {
                "connections_closed"
            } else if taken.is_some() {
                "lease_expired"
            } else {
                "none"
            };
            let end = ends.get(job).cloned().unwrap_or_default();
            HeldJob {
                job: job.to_owned(),
                how: how.to_owned(),
                lease_timeout_after_ms: lease.map(|(id, _)| event_ms(id).saturating_sub(d.at_ms)),
                taken_after_ms: taken.as_ref().map(|t| t.1.saturating_sub(d.at_ms)),
                taken_by: taken.map(|t| t.0),
                end,
            }
        })
        .collect();
    DeadHost {
        node: d.node.to_owned(),
        died_at_ms,
        jobs,
    }
}

fn secs(ms: u64) -> String {
    human_secs(ms as f64 / 1000.0)
}

/// A span set in whole seconds (a suspension), as whole seconds: `120 s`.
fn whole_secs(ms: u64) -> String {
    format!("{} s", (ms + 500) / 1000)
}

/// "succeeded on gpu-2", "dead", …
fn ended(end: &Ending) -> String {
    match &end.node {
        Some(n) if end.state == "succeeded" => format!("{} on {n}", end.state),
        _ => end.state.clone(),
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// One line for a timeout.
fn timeout_line(t: &TimeoutIncident) -> String {
    let after = t.after_ms.map(secs);
    let what = match (t.kind.as_str(), after) {
        ("progress", Some(a)) => format!(
            "{} hung on job {}: the progress timeout caught it after {a} without progress{}",
            t.node,
            t.job,
            t.stage
                .as_ref()
                .map_or_else(String::new, |s| format!(" (stage {s})"))
        ),
        ("start", Some(a)) => format!(
            "{} never started job {}: the start timeout caught it after {a}",
            t.node, t.job
        ),
        ("run", Some(a)) => format!(
            "job {} ran too long on {}: the run timeout stopped it after {a}",
            t.job, t.node
        ),
        ("lease", _) => format!(
            "{} stopped renewing job {}: the lease timeout caught it",
            t.node, t.job
        ),
        (kind, _) => format!("job {} on {}: a {kind} timeout", t.job, t.node),
    };
    format!(
        "{what}; {}, {}",
        t.retried_on
            .as_ref()
            .map_or_else(|| "not retried".to_owned(), |n| format!("retried on {n}")),
        ended(&t.end)
    )
}

/// The incidents, as lines.
fn incident_lines(s: &Summary) -> Vec<String> {
    let i = &s.incidents;
    let held: BTreeSet<(&str, &str)> = i
        .dead_hosts
        .iter()
        .flat_map(|d| d.jobs.iter().map(|j| (d.node.as_str(), j.job.as_str())))
        .collect();
    let mut lines = Vec::new();
    // A dead host's lease timeouts are told with its death.
    let timeouts: Vec<_> = i
        .timeouts
        .iter()
        .filter(|t| !(t.kind == "lease" && held.contains(&(t.node.as_str(), t.job.as_str()))))
        .collect();
    if !timeouts.is_empty() {
        lines.push("timeouts".to_owned());
        lines.extend(timeouts.iter().map(|t| format!("  {}", timeout_line(t))));
    }
    if !i.crashes.is_empty() {
        lines.push("crashes".to_owned());
        for c in &i.crashes {
            lines.push(format!(
                "  {}'s child crashed on job {} at {} ({}); {}, {}",
                c.node,
                c.job,
                secs(c.at_ms),
                c.error,
                c.retried_on
                    .as_ref()
                    .map_or_else(|| "not retried".to_owned(), |n| format!("retried on {n}")),
                ended(&c.end)
            ));
        }
    }
    for d in &i.dead_hosts {
        lines.push("dead host".to_owned());
        let jobs: Vec<&str> = d.jobs.iter().map(|j| j.job.as_str()).collect();
        lines.push(format!(
            "  {}'s host died at {} holding {}{}",
            d.node,
            secs(d.died_at_ms),
            plural(d.jobs.len(), "job", "jobs"),
            if jobs.is_empty() {
                String::new()
            } else {
                format!(": {}", jobs.join(", "))
            }
        ));
        for j in &d.jobs {
            let back = match (j.how.as_str(), j.lease_timeout_after_ms) {
                ("connections_closed", Some(ms)) => format!(
                    "its connections closed, so the broker put it back in line {} after the death (a lease timeout of {})",
                    secs(ms),
                    d.node
                ),
                ("connections_closed", None) => {
                    "its connections closed, so the broker put it back in line".to_owned()
                }
                ("lease_expired", Some(ms)) => {
                    format!("its lease ran out {} after the death", secs(ms))
                }
                ("lease_expired", None) => "its lease ran out".to_owned(),
                _ => "it never came back".to_owned(),
            };
            let taken = match (&j.taken_by, j.taken_after_ms) {
                (Some(n), Some(ms)) => format!("; {n} took it over {} after the death", secs(ms)),
                _ => String::new(),
            };
            lines.push(format!(
                "    job {}: {back}{taken}, {}",
                j.job,
                ended(&j.end)
            ));
        }
    }
    if !i.suspensions.is_empty() {
        lines.push("suspensions".to_owned());
        for s in &i.suspensions {
            lines.push(format!(
                "  {} suspended itself at {} for {}: {}",
                s.node,
                secs(s.at_ms),
                whole_secs(s.for_ms),
                s.reason
            ));
        }
    }
    lines
}

/// The node table's last column: what happened to (or on) the node.
fn node_note(s: &Summary, node: &str) -> String {
    let i = &s.incidents;
    let mut parts = Vec::new();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for t in i.timeouts.iter().filter(|t| t.node == node) {
        *kinds.entry(t.kind.as_str()).or_default() += 1;
    }
    for (kind, n) in kinds {
        parts.push(plural(
            n,
            &format!("{kind} timeout"),
            &format!("{kind} timeouts"),
        ));
    }
    let crashes = i.crashes.iter().filter(|c| c.node == node).count();
    if crashes > 0 {
        parts.push(plural(crashes, "child crash", "child crashes"));
    }
    for d in i.dead_hosts.iter().filter(|d| d.node == node) {
        parts.push(format!(
            "host died holding {}",
            plural(d.jobs.len(), "job", "jobs")
        ));
    }
    for x in i.suspensions.iter().filter(|x| x.node == node) {
        parts.push(format!("suspended itself for {}", whole_secs(x.for_ms)));
    }
    // The jobs others could not finish that this node did.
    let rescued: BTreeSet<&str> = i
        .timeouts
        .iter()
        .filter(|t| t.node != node)
        .map(|t| (t.job.as_str(), &t.end))
        .chain(
            i.crashes
                .iter()
                .filter(|c| c.node != node)
                .map(|c| (c.job.as_str(), &c.end)),
        )
        .chain(
            i.dead_hosts
                .iter()
                .filter(|d| d.node != node)
                .flat_map(|d| d.jobs.iter().map(|j| (j.job.as_str(), &j.end))),
        )
        .filter(|(_, end)| end.state == "succeeded" && end.node.as_deref() == Some(node))
        .map(|(job, _)| job)
        .collect();
    if !rescued.is_empty() {
        parts.push(format!(
            "finished {} of other nodes",
            plural(rescued.len(), "job", "jobs")
        ));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(" · ")
    }
}

/// Prints the summary for people.
pub(super) fn print(s: &Summary) {
    println!(
        "\nfleetq demo: {} jobs in {}",
        s.jobs,
        human_secs(s.duration_s)
    );
    let mut t = table(&["outcome", "jobs"]);
    for (k, v) in &s.outcomes {
        t.add_row(vec![k.clone(), v.to_string()]);
    }
    println!("{t}");
    let mut t = table(&["node", "role", "completed", "what happened"]);
    for spec in FLEET {
        let done = s.per_node.get(spec.name).copied().unwrap_or(0);
        t.add_row(vec![
            spec.name.to_owned(),
            spec.role.to_owned(),
            done.to_string(),
            node_note(s, spec.name),
        ]);
    }
    println!("{t}");
    let lines = incident_lines(s);
    if !lines.is_empty() {
        println!("what happened");
        for l in lines {
            println!("  {l}");
        }
    }
    let mut t = table(&["figure", "value"]);
    t.add_row(vec![
        "wait p50 / p95".to_owned(),
        format!(
            "{} / {}",
            human_secs(s.wait_ms.p50 as f64 / 1000.0),
            human_secs(s.wait_ms.p95 as f64 / 1000.0)
        ),
    ]);
    for (k, v) in &s.timeouts {
        let by_node: Vec<String> = s
            .timeouts_by_node
            .iter()
            .filter_map(|(node, kinds)| kinds.get(k).map(|n| format!("{node} {n}")))
            .collect();
        let value = if by_node.is_empty() {
            v.to_string()
        } else {
            format!("{v} ({})", by_node.join(", "))
        };
        t.add_row(vec![format!("{k} timeouts"), value]);
    }
    t.add_row(vec![
        "taken over from dead hosts".to_owned(),
        s.reclaims.to_string(),
    ]);
    t.add_row(vec!["retries".to_owned(), s.retries.to_string()]);
    t.add_row(vec![
        "suspended nodes".to_owned(),
        if s.suspended_nodes.is_empty() {
            "-".into()
        } else {
            s.suspended_nodes.join(", ")
        },
    ]);
    println!("{t}");
    println!(
        "every job ended exactly once: {}",
        if s.exactly_once { "yes" } else { "NO" }
    );
    println!("logs of the broker and workers: {}", s.log_file);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, pairs: &[(&str, &str)]) -> Event {
        (
            id.to_owned(),
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn end(state: &str, node: &str) -> Ending {
        Ending {
            state: state.to_owned(),
            node: Some(node.to_owned()),
        }
    }

    #[test]
    fn percentiles_of_a_sorted_list() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.95), 95);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn the_events_tell_each_incident() {
        let events = vec![
            ev(
                "1000-0",
                &[("type", "taken"), ("job", "a"), ("node", "gpu-3")],
            ),
            ev(
                "1000-1",
                &[("type", "taken"), ("job", "b"), ("node", "gpu-4")],
            ),
            ev(
                "1000-2",
                &[("type", "taken"), ("job", "c"), ("node", "gpu-5")],
            ),
            ev(
                "1000-3",
                &[("type", "taken"), ("job", "d"), ("node", "gpu-5")],
            ),
            ev(
                "1200-0",
                &[("type", "succeeded"), ("job", "d"), ("node", "gpu-5")],
            ),
            ev(
                "1500-0",
                &[
                    ("type", "retrying"),
                    ("job", "b"),
                    ("node", "gpu-4"),
                    ("error", "child process 7 exited"),
                    ("timeout", ""),
                ],
            ),
            ev(
                "1600-0",
                &[
                    ("type", "node_suspended"),
                    ("job", ""),
                    ("node", "gpu-4"),
                    ("until_ms", "121600"),
                    ("reason", "2 failures or timeouts in a row"),
                ],
            ),
            ev(
                "1700-0",
                &[("type", "taken"), ("job", "b"), ("node", "gpu-1")],
            ),
            // gpu-5 dies at 2000.
            ev(
                "2500-0",
                &[
                    ("type", "retrying"),
                    ("job", "a"),
                    ("node", "gpu-3"),
                    ("timeout", "progress"),
                ],
            ),
            ev(
                "2500-1",
                &[
                    ("type", "timeout"),
                    ("job", "a"),
                    ("node", "gpu-3"),
                    ("kind", "progress"),
                    ("stage", "sampling"),
                    ("elapsed_ms", "1600"),
                ],
            ),
            ev(
                "3100-0",
                &[
                    ("type", "timeout"),
                    ("job", "c"),
                    ("node", "gpu-5"),
                    ("kind", "lease"),
                ],
            ),
            ev(
                "3100-1",
                &[
                    ("type", "released"),
                    ("job", "c"),
                    ("reason", "process gone"),
                ],
            ),
            ev(
                "3300-0",
                &[("type", "taken"), ("job", "c"), ("node", "gpu-2")],
            ),
            ev(
                "3400-0",
                &[("type", "taken"), ("job", "a"), ("node", "gpu-2")],
            ),
        ];
        let ends: HashMap<String, Ending> = [
            ("a", end("succeeded", "gpu-2")),
            ("b", end("succeeded", "gpu-1")),
            ("c", end("succeeded", "gpu-2")),
            ("d", end("succeeded", "gpu-5")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let death = Death {
            node: "gpu-5",
            at_ms: 2000,
        };
        let i = incidents(&events, &ends, 900, Some(&death));

        assert_eq!(i.timeouts.len(), 2);
        let hang = &i.timeouts[0];
        assert_eq!(
            (hang.node.as_str(), hang.kind.as_str(), hang.after_ms),
            ("gpu-3", "progress", Some(1600))
        );
        assert_eq!(hang.retried_on.as_deref(), Some("gpu-2"));
        assert!(timeout_line(hang).contains(
            "gpu-3 hung on job a: the progress timeout caught it after 1.6 s without progress (stage sampling); retried on gpu-2, succeeded on gpu-2"
        ));
        assert_eq!(i.timeouts[1].after_ms, Some(1100), "since the death");

        assert_eq!(i.crashes.len(), 1);
        assert_eq!(i.crashes[0].node, "gpu-4");
        assert_eq!(i.crashes[0].retried_on.as_deref(), Some("gpu-1"));

        assert_eq!(i.dead_hosts.len(), 1);
        let d = &i.dead_hosts[0];
        assert_eq!(d.died_at_ms, 1100);
        assert_eq!(
            d.jobs.len(),
            1,
            "d ended before the death: only c was in hand"
        );
        let c = &d.jobs[0];
        assert_eq!(c.job, "c");
        assert_eq!(c.how, "connections_closed");
        assert_eq!(c.lease_timeout_after_ms, Some(1100));
        assert_eq!(
            (c.taken_by.as_deref(), c.taken_after_ms),
            (Some("gpu-2"), Some(1300))
        );

        assert_eq!(i.suspensions.len(), 1);
        assert_eq!(
            (
                i.suspensions[0].node.as_str(),
                i.suspensions[0].at_ms,
                i.suspensions[0].for_ms
            ),
            ("gpu-4", 700, 120_000)
        );
    }
}
