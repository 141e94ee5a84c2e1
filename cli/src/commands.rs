//! The everyday commands: enqueue, status, watch, cancel, queues, nodes, dead letters, the
//! function library, partitions, top.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fleetq_broker::functions::{self, LibraryState};
use fleetq_broker::inspect::{self, QueueState};
use fleetq_broker::partitions::{self, discover_queues};
use fleetq_broker::{nodes, EnqueueOptions, JobState, JobStatus, Producer, QueueKeys, Redis};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::args::{
    Cli, Command, DeadAction, DeadArgs, EnqueueArgs, FunctionsAction, JobArgs, NodeAction,
    StatusArgs, TopArgs, WatchArgs,
};
use crate::exit::{self, CliError};
use crate::output::{human_secs, json, out, outln, table, utc_time};

/// Runs one command.
pub async fn dispatch(cli: Cli) -> Result<(), CliError> {
    let url = cli.redis_url;
    let connect = || Redis::connect(&url);
    match cli.command {
        // The demo brings its own Redis unless REDIS_URL names one.
        Command::Demo(a) => crate::demo::run(std::env::var("REDIS_URL").ok(), &a, cli.json).await,
        Command::Enqueue(a) => enqueue(&connect().await?, a, cli.json).await,
        Command::Status(a) => status(&connect().await?, a, cli.json).await,
        Command::Watch(a) => watch(&connect().await?, a, cli.json).await,
        Command::Queues => queues(&connect().await?, cli.json).await,
        Command::Nodes(a) => {
            nodes_cmd(
                &connect().await?,
                a.action.unwrap_or(NodeAction::List),
                cli.json,
            )
            .await
        }
        Command::Dead(a) => {
            let (queue, action) = dead_parts(a)?;
            dead(&connect().await?, &queue, action, cli.json).await
        }
        Command::Functions(a) => match a.action {
            None => Err(missing_subcommand(
                "functions",
                "fleetq functions SUBCOMMAND",
                &["fleetq functions status", "fleetq functions load"],
            )),
            Some(FunctionsAction::Dump) => {
                dump_functions(cli.json);
                Ok(())
            }
            Some(action) => functions_cmd(&connect().await?, action, cli.json).await,
        },
        Command::Partitions(a) => partitions_cmd(&connect().await?, a, cli.json).await,
        Command::Cancel(a) => cancel(&connect().await?, a, cli.json).await,
        Command::Top(a) => top(&connect().await?, a, cli.json).await,
    }
}

/// The error for a command group given without its subcommand: what it needs, the
/// subcommands (from the command line's own definition, so the list stays true) and examples.
fn missing_subcommand(group: &str, usage: &str, examples: &[&str]) -> CliError {
    use clap::CommandFactory as _;
    let cli = Cli::command();
    let subs: Vec<String> = cli
        .find_subcommand(group)
        .map(|c| {
            c.get_subcommands()
                .filter(|s| s.get_name() != "help")
                .map(|s| {
                    let about = s.get_about().map(ToString::to_string).unwrap_or_default();
                    format!("  {:<8} {about}", s.get_name())
                })
                .collect()
        })
        .unwrap_or_default();
    CliError::new(
        exit::USAGE,
        format!(
            "`fleetq {group}` needs a subcommand: {usage}, one of\n{}\nExamples:\n  {}\nMore in `fleetq {group} --help`.",
            subs.join("\n"),
            examples.join("\n  ")
        ),
    )
}

/// The queue and the action of `fleetq dead`, or a message naming what is missing.
fn dead_parts(a: DeadArgs) -> Result<(String, DeadAction), CliError> {
    const EXAMPLES: &[&str] = &[
        "fleetq dead images list",
        "fleetq dead images show 1795404558999-0",
        "fleetq dead images retry 1795404558999-0",
    ];
    match (a.queue, a.action) {
        (Some(q), Some(action)) => Ok((q, action)),
        (None, Some(_)) => Err(CliError::new(
            exit::USAGE,
            "`fleetq dead` needs the queue before the subcommand, e.g. `fleetq dead images list`; `fleetq queues` lists the queues",
        )),
        (Some(q), None) if ["list", "show", "retry", "purge"].contains(&q.as_str()) => {
            Err(CliError::new(
                exit::USAGE,
                format!("`fleetq dead {q}` needs the queue first: `fleetq dead QUEUE {q}`, e.g. `fleetq dead images {q}`; `fleetq queues` lists the queues"),
            ))
        }
        (Some(q), None) => Err(missing_subcommand(
            "dead",
            &format!("fleetq dead {q} SUBCOMMAND"),
            EXAMPLES,
        )),
        (None, None) => Err(missing_subcommand(
            "dead",
            "fleetq dead QUEUE SUBCOMMAND",
            EXAMPLES,
        )),
    }
}

fn queue_keys(name: &str) -> Result<QueueKeys, CliError> {
    QueueKeys::new(name).map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))
}

/// Fails with "not found" unless the queue exists. A partition (`images#1`) of a queue that
/// exists is accepted too.
async fn existing_queue(redis: &Redis, name: &str) -> Result<QueueKeys, CliError> {
    let keys = fleetq_broker::keys::discovered(name)
        .map_err(|e| CliError::new(exit::BAD_INPUT, e.to_string()))?;
    let known = discover_queues(redis).await?;
    if !known
        .iter()
        .any(|q| q == fleetq_broker::keys::base_of(name))
    {
        let list = if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        };
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("queue {name:?} not found (known queues: {list}); check the name"),
        ));
    }
    Ok(keys)
}

fn read_payload(arg: &str) -> Result<Value, CliError> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!("cannot read the payload file {path}: {e}"),
            )
        })?,
        None => arg.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            format!("the payload is not valid JSON: {e}; quote it for your shell, e.g. '{{\"prompt\":\"a red fox\"}}'"),
        )
    })
}

async fn enqueue(redis: &Redis, a: EnqueueArgs, as_json: bool) -> Result<(), CliError> {
    let payload = read_payload(&a.payload)?;
    queue_keys(&a.queue)?;
    let p = Producer::new(redis, &a.queue).await?;
    let ms = |v: Option<u64>| v.map(Duration::from_millis);
    let opts = EnqueueOptions {
        id: a.id,
        workflow: a.workflow,
        max_attempts: a.max_attempts,
        queue_timeout: ms(a.queue_timeout_ms),
        start_timeout: ms(a.start_timeout_ms),
        progress_timeout: ms(a.progress_timeout_ms),
        run_timeout: ms(a.run_timeout_ms),
        delay: ms(a.delay_ms),
        traceparent: None,
    };
    // Where each place the job may land stands in its events, before the job is added.
    let mut cursors = HashMap::new();
    for keys in p.partitions().sources() {
        cursors.insert(keys.name().to_owned(), events_cursor(redis, &keys).await?);
    }
    let e = p.enqueue(&payload, &opts).await?;
    if !a.wait {
        if as_json {
            json(&e);
        } else {
            let how = if e.created {
                "enqueued"
            } else {
                "already known"
            };
            outln!(
                "{how} job {} on {}: {} (position {})",
                e.id,
                a.queue,
                e.state,
                e.position
            );
        }
        return Ok(());
    }
    if !as_json {
        eprintln!(
            "enqueued job {} on {} at position {}",
            e.id, a.queue, e.position
        );
    }
    let (home, _) = p.locate(&e.id).await?;
    let cursor = cursors
        .remove(home.name())
        .unwrap_or_else(|| "0-0".to_owned());
    let st = follow(
        redis,
        &p,
        &home,
        &e.id,
        cursor,
        Duration::from_secs(a.wait_timeout_secs),
        !as_json,
    )
    .await?;
    finish(&st, as_json)
}

/// Prints a final status and how the job ended, and maps it to the exit code.
fn finish(st: &JobStatus, as_json: bool) -> Result<(), CliError> {
    if as_json {
        json(&status_json(st, None));
    } else {
        print_status(st, None, 0);
    }
    if st.state == JobState::Succeeded {
        if !as_json {
            let ran = match (st.fields.get("started_ms"), st.fields.get("ended_ms")) {
                (Some(s), Some(e)) => match (s.parse::<u64>(), e.parse::<u64>()) {
                    (Ok(s), Ok(e)) => {
                        format!(" in {}", human_secs(e.saturating_sub(s) as f64 / 1000.0))
                    }
                    _ => String::new(),
                },
                _ => String::new(),
            };
            outln!(
                "job {} succeeded on {} at attempt {}{ran}",
                st.id,
                st.node.as_deref().unwrap_or("?"),
                st.attempts
            );
        }
        Ok(())
    } else {
        Err(CliError::new(exit::JOB_NOT_SUCCEEDED, ended_because(st)))
    }
}

/// How a job that did not succeed ended, and why: its state, reason, timeout and error.
fn ended_because(st: &JobStatus) -> String {
    let mut why = Vec::new();
    if let Some(r) = st.fields.get("reason").filter(|r| !r.is_empty()) {
        why.push(format!("reason {r}"));
    }
    if let Some(t) = st.fields.get("timeout").filter(|t| !t.is_empty()) {
        why.push(format!("{t} timeout"));
    }
    let why = if why.is_empty() {
        String::new()
    } else {
        format!(" ({})", why.join(", "))
    };
    let after = match st.attempts {
        0 => " without running".to_owned(),
        1 => " after 1 attempt".to_owned(),
        n => format!(" after {n} attempts"),
    };
    let error = st
        .error
        .as_deref()
        .filter(|e| !e.is_empty())
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    format!("job {} ended {}{why}{after}{error}", st.id, st.state)
}

/// Whether a job in `state` has a worker holding it (whose node's pid and host apply).
fn held(state: JobState) -> bool {
    matches!(
        state,
        JobState::Taken | JobState::Running | JobState::Cancelling
    )
}

/// The record of the node running job `st`, when it runs.
async fn running_node(
    redis: &Redis,
    st: &JobStatus,
) -> Result<Option<nodes::NodeRecord>, CliError> {
    match st.node.as_deref() {
        Some(node) if held(st.state) => Ok(nodes::get(redis, node).await?),
        _ => Ok(None),
    }
}

fn ms_field(st: &JobStatus, key: &str) -> Option<u64> {
    st.fields.get(key).and_then(|v| v.parse().ok())
}

/// The job's attempts, oldest first: the records of its `history` (protocol §14), then the
/// current attempt while one runs, or the one attempt of a job that succeeded at once (which
/// writes no record). Each is an object with `attempt`, `node`, `outcome` and, when known,
/// `timeout`, `stage`, `started_ms`, `ended_ms`, `elapsed_ms`, `error`.
fn attempts_of(st: &JobStatus) -> Vec<Value> {
    let mut list: Vec<Value> = st
        .fields
        .get("history")
        .and_then(|h| serde_json::from_str::<Value>(h).ok())
        .and_then(|v| match v {
            Value::Array(a) => Some(a),
            _ => None,
        })
        .unwrap_or_default();
    let recorded = |n: u64| list.iter().any(|r| r["attempt"].as_u64() == Some(n));
    let node = st.node.clone().unwrap_or_default();
    let started = ms_field(st, "attempt_started_ms").or_else(|| ms_field(st, "started_ms"));
    let current = match st.state {
        JobState::Running | JobState::Cancelling => Some((u64::from(st.attempts), "running")),
        JobState::Taken => Some((u64::from(st.attempts) + 1, "taken")),
        JobState::Succeeded => Some((u64::from(st.attempts), "succeeded")),
        _ => None,
    };
    if let Some((n, outcome)) = current.filter(|(n, _)| *n > 0 && !recorded(*n)) {
        let mut rec = serde_json::json!({"attempt": n, "node": node, "outcome": outcome});
        if let Some(s) = started.filter(|_| outcome != "taken") {
            rec["started_ms"] = s.into();
        }
        if let Some(e) = ms_field(st, "ended_ms").filter(|_| outcome == "succeeded") {
            rec["ended_ms"] = e.into();
        }
        list.push(rec);
    }
    list
}

/// One line for a person about one attempt (an element of [`attempts_of`]); `now_ms` (server
/// clock) for the time a running attempt has run, 0 when unknown.
fn attempt_line(rec: &Value, now_ms: u64) -> String {
    let text = |k: &str| rec[k].as_str().filter(|s| !s.is_empty());
    let num = |k: &str| rec[k].as_u64();
    let outcome = text("outcome").unwrap_or("?");
    let mut line = format!(
        "#{} on {}: {outcome}",
        num("attempt").map_or_else(|| "?".to_owned(), |n| n.to_string()),
        text("node").unwrap_or("?")
    );
    if let Some(kind) = text("timeout") {
        line.push_str(&format!(" ({kind} timeout"));
        if let Some(stage) = text("stage") {
            line.push_str(&format!(", in stage {stage}"));
        }
        line.push(')');
    } else if let Some(stage) = text("stage") {
        line.push_str(&format!(" (stage {stage})"));
    }
    match (num("started_ms"), num("ended_ms")) {
        (Some(s), Some(e)) => line.push_str(&format!(
            ", started {}, ended after {}",
            utc_time(s),
            human_secs(num("elapsed_ms").unwrap_or(e.saturating_sub(s)) as f64 / 1000.0)
        )),
        (Some(s), None) if now_ms > 0 => line.push_str(&format!(
            ", started {}, running for {}",
            utc_time(s),
            human_secs(now_ms.saturating_sub(s) as f64 / 1000.0)
        )),
        (Some(s), None) => line.push_str(&format!(", started {}", utc_time(s))),
        (None, Some(e)) => line.push_str(&format!(", never started, ended {}", utc_time(e))),
        (None, None) => {}
    }
    if let Some(err) = text("error") {
        let mut short: String = err.chars().take(120).collect();
        if short.len() < err.len() {
            short.push('…');
        }
        line.push_str(&format!(": {short}"));
    }
    line
}

/// The `--json` document of a status: the [`JobStatus`] keys, with `history` as an array of
/// attempt objects ([`attempts_of`]) instead of the JSON text in `fields`, and `pid`, `host`
/// and `consumer` of the node running the job when it runs.
fn status_json(st: &JobStatus, node: Option<&nodes::NodeRecord>) -> Value {
    let mut doc = serde_json::to_value(st).unwrap_or_else(|_| serde_json::json!({"id": st.id}));
    if let Some(obj) = doc.as_object_mut() {
        if let Some(fields) = obj.get_mut("fields").and_then(Value::as_object_mut) {
            fields.remove("history");
        }
        obj.insert("history".into(), Value::Array(attempts_of(st)));
        if let Some(n) = node {
            if let Some(pid) = n.pid() {
                obj.insert("pid".into(), pid.into());
            }
            if let Some(host) = n.host() {
                obj.insert("host".into(), host.into());
            }
            if let Some(c) = n.consumer() {
                obj.insert("consumer".into(), c.into());
            }
        }
    }
    doc
}

fn print_status(st: &JobStatus, node: Option<&nodes::NodeRecord>, now_ms: u64) {
    let mut t = table(&["field", "value"]);
    t.add_row(vec!["job".to_owned(), st.id.clone()]);
    t.add_row(vec!["state".to_owned(), st.state.to_string()]);
    if let Some(pos) = st.position {
        t.add_row(vec!["position".to_owned(), pos.to_string()]);
    }
    t.add_row(vec!["attempts".to_owned(), st.attempts.to_string()]);
    if !st.nodes.is_empty() {
        t.add_row(vec!["nodes".to_owned(), st.nodes.join(" → ")]);
    }
    if let Some(n) = node {
        if let Some(pid) = n.pid() {
            t.add_row(vec!["pid".to_owned(), pid.to_string()]);
        }
        if let Some(host) = n.host() {
            t.add_row(vec!["host".to_owned(), host.to_owned()]);
        }
    }
    if let Some(p) = &st.progress {
        t.add_row(vec!["progress".to_owned(), p.to_string()]);
    }
    if let Some(r) = &st.result {
        t.add_row(vec!["result".to_owned(), r.to_string()]);
    }
    if let Some(e) = &st.error {
        t.add_row(vec!["error".to_owned(), e.clone()]);
    }
    for k in ["timeout", "timeout_stage", "reason"] {
        if let Some(v) = st.fields.get(k) {
            t.add_row(vec![k.to_owned(), v.clone()]);
        }
    }
    let ms = |k: &str| st.fields.get(k).and_then(|v| v.parse::<u64>().ok());
    if let (Some(enq), Some(start)) = (ms("enqueued_ms"), ms("started_ms")) {
        t.add_row(vec![
            "waited".to_owned(),
            human_secs(start.saturating_sub(enq) as f64 / 1000.0),
        ]);
    }
    if let (Some(start), Some(end)) = (ms("started_ms"), ms("ended_ms")) {
        t.add_row(vec![
            "ran".to_owned(),
            human_secs(end.saturating_sub(start) as f64 / 1000.0),
        ]);
    }
    outln!("{t}");
    let attempts = attempts_of(st);
    if !attempts.is_empty() {
        outln!("attempts:");
        for rec in &attempts {
            outln!("  {}", attempt_line(rec, now_ms));
        }
    }
}

/// Finds the queue of job `id` (the given one, or the only queue that knows it).
async fn locate(
    redis: &Redis,
    id: &str,
    queue: Option<&str>,
) -> Result<(Producer, JobStatus), CliError> {
    if let Some(q) = queue {
        existing_queue(redis, q).await?;
        let p = Producer::new(redis, q).await?;
        let st = p.status(id).await?;
        if st.state == JobState::NotFound {
            return Err(CliError::new(exit::NOT_FOUND, format!("no job {id:?} in queue {q} (never enqueued, or ended longer ago than its retention)")));
        }
        return Ok((p, st));
    }
    let mut found = Vec::new();
    let queues = discover_queues(redis).await?;
    for q in &queues {
        let p = Producer::new(redis, q).await?;
        let st = p.status(id).await?;
        if st.state != JobState::NotFound {
            found.push((p, st));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "no job {id:?} in any queue ({}); check the id, or pass --queue",
                if queues.is_empty() {
                    "there are none".to_owned()
                } else {
                    queues.join(", ")
                }
            ),
        )),
        _ => Err(CliError::new(
            exit::BAD_INPUT,
            format!("job id {id:?} exists in several queues; pass --queue"),
        )),
    }
}

async fn status(redis: &Redis, a: StatusArgs, as_json: bool) -> Result<(), CliError> {
    let (_, st) = locate(redis, &a.job.id, a.job.queue.as_deref()).await?;
    let node = running_node(redis, &st).await?;
    let doc = status_json(&st, node.as_ref());
    if let Some(name) = &a.field {
        return print_field(&st, &doc, name, as_json);
    }
    if as_json {
        json(&doc);
    } else {
        let now = if held(st.state) {
            nodes::server_ms(redis).await?
        } else {
            0
        };
        print_status(&st, node.as_ref(), now);
    }
    Ok(())
}

/// `status --field NAME`: the field of the status document `doc` (a key of it, else of its
/// `fields`) on one line — a string as it is, anything else as JSON; with `--json`, as JSON.
fn print_field(st: &JobStatus, doc: &Value, name: &str, as_json: bool) -> Result<(), CliError> {
    let found = doc
        .get(name)
        .or_else(|| doc.get("fields").and_then(|f| f.get(name)))
        .filter(|v| !v.is_null());
    let Some(value) = found else {
        let mut have: Vec<&str> = doc
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| *k != "fields")
                    .map(String::as_str)
                    .collect()
            })
            .unwrap_or_default();
        if let Some(f) = doc.get("fields").and_then(Value::as_object) {
            have.extend(f.keys().map(String::as_str));
        }
        have.sort_unstable();
        let running = if matches!(name, "pid" | "host" | "consumer") && !held(st.state) {
            " (pid, host and consumer are there only while a worker holds the job)".to_owned()
        } else {
            String::new()
        };
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "job {} ({}) has no field {name:?}{running}; it has: {}",
                st.id,
                st.state,
                have.join(", ")
            ),
        ));
    };
    match value {
        Value::String(s) if !as_json => outln!("{s}"),
        other => outln!("{other}"),
    }
    Ok(())
}

async fn cancel(redis: &Redis, a: JobArgs, as_json: bool) -> Result<(), CliError> {
    let (p, before) = match locate(redis, &a.id, a.queue.as_deref()).await {
        Ok(found) => found,
        Err(e) if e.code == exit::NOT_FOUND && as_json => {
            json(&serde_json::json!({
                "id": a.id, "queue": a.queue, "state": JobState::NotFound, "outcome": "not_found",
            }));
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let queue = p.keys().name().to_owned();
    let state = if before.state.is_terminal() {
        before.state
    } else {
        p.cancel(&a.id).await?
    };
    let node = before.node.as_deref().unwrap_or("its node");
    let (outcome, what) = match state {
        _ if before.state.is_terminal() => (
            "already_ended",
            format!("already ended as {state}; nothing to cancel"),
        ),
        JobState::Cancelled => (
            "cancelled",
            format!("cancelled while {}; it will not run", before.state),
        ),
        JobState::Cancelling => (
            "cancelling",
            format!("asked the worker on {node} to stop it (at its next lease renewal; `fleetq watch {}` follows it to `cancelled`)", a.id),
        ),
        JobState::NotFound => {
            let e = CliError::new(
                exit::NOT_FOUND,
                format!("job {:?} in queue {queue} is gone (it ended longer ago than its retention)", a.id),
            );
            if as_json {
                json(&serde_json::json!({"id": a.id, "queue": queue, "state": state, "outcome": "not_found"}));
            }
            return Err(e);
        }
        other => (
            "already_ended",
            format!("already ended as {other}; nothing to cancel"),
        ),
    };
    if as_json {
        json(&serde_json::json!({"id": a.id, "queue": queue, "state": state, "outcome": outcome}));
    } else {
        outln!("job {} in queue {queue}: {what}", a.id);
    }
    Ok(())
}

async fn watch(redis: &Redis, a: WatchArgs, as_json: bool) -> Result<(), CliError> {
    let (p, st) = locate(redis, &a.job.id, a.job.queue.as_deref()).await?;
    if st.state.is_terminal() {
        return finish(&st, as_json);
    }
    // A split queue's job has its events in its partition.
    let (home, _) = p.locate(&a.job.id).await?;
    let cursor = events_cursor(redis, &home).await?;
    let st = follow(
        redis,
        &p,
        &home,
        &a.job.id,
        cursor,
        Duration::from_secs(a.timeout_secs),
        !as_json,
    )
    .await?;
    finish(&st, as_json)
}

/// The id of the newest event of the queue (where following starts).
async fn events_cursor(redis: &Redis, keys: &QueueKeys) -> Result<String, CliError> {
    Ok(inspect::last_entry_id(&mut redis.conn(), &keys.events())
        .await
        .map_err(|e| fleetq_broker::Error::redis("read events", e))?)
}

/// Follows job `id` through the queue's events (blocking reads, no polling) until it ends,
/// drawing a progress bar when `bar`.
async fn follow(
    redis: &Redis,
    p: &Producer,
    keys: &QueueKeys,
    id: &str,
    mut cursor: String,
    timeout: Duration,
    bar: bool,
) -> Result<JobStatus, CliError> {
    let pb = if bar {
        let pb = ProgressBar::new(0);
        pb.set_style(bar_style(SPINNER));
        pb.enable_steady_tick(Duration::from_millis(120));
        pb.set_message("waiting");
        Some(pb)
    } else {
        None
    };
    // Whether the bar shows steps (a progress report with a total came for this attempt).
    let mut steps = false;
    let deadline = Instant::now() + timeout;
    let mut conn = redis
        .blocking_conn(&keys.events(), Duration::from_secs(2))
        .await?;
    // Counted as watching: the job's end is written as an event even on a queue without
    // routine events.
    p.watch(id).await?;
    loop {
        if Instant::now() > deadline {
            if let Some(pb) = &pb {
                pb.abandon_with_message("timed out");
            }
            return Err(CliError::new(
                exit::TIMEOUT,
                format!(
                    "job {id} did not end within {} s; follow it again with `fleetq watch {id}`",
                    timeout.as_secs()
                ),
            ));
        }
        let read = inspect::read_events(&mut conn, keys, &cursor, Duration::from_secs(2)).await?;
        let mut ended = false;
        for (eid, f) in read {
            cursor = eid;
            {
                if f.get("job").map(String::as_str) != Some(id) {
                    continue;
                }
                let kind = f.get("type").map(String::as_str).unwrap_or("");
                let field = |k: &str| f.get(k).map(String::as_str).filter(|v| !v.is_empty());
                if let Some(pb) = &pb {
                    match kind {
                        "started" | "taken" => pb.set_message(format!(
                            "{kind} on {}{}",
                            field("node").unwrap_or("?"),
                            field("attempt")
                                .map_or_else(String::new, |n| format!(" (attempt {n})"))
                        )),
                        "progress" => {
                            if let Some(prog) = f
                                .get("progress")
                                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                            {
                                if let (Some(step), Some(total)) =
                                    (prog["step"].as_u64(), prog["total"].as_u64())
                                {
                                    if !steps {
                                        pb.set_style(bar_style(BAR));
                                        steps = true;
                                    }
                                    pb.set_length(total);
                                    pb.set_position(step);
                                }
                                if let Some(stage) = prog["stage"].as_str() {
                                    pb.set_message(format!("running · {stage}"));
                                }
                            }
                        }
                        // A failed attempt that goes back for another; one ended by a
                        // timeout is told by the `timeout` event that follows.
                        "retrying" if field("timeout").is_none() => {
                            let st = p.status(id).await?;
                            let node = field("node").unwrap_or("?");
                            let n = last_attempt(&st, node, None);
                            let line = format!(
                                "attempt {n} failed on {node}: {}",
                                field("error").unwrap_or("no error given")
                            );
                            next_attempt(pb, &mut steps, &st, n, true, line);
                        }
                        "timeout" => {
                            let st = p.status(id).await?;
                            let node = field("node").unwrap_or("?");
                            let kind = field("kind").unwrap_or("?");
                            let n = last_attempt(&st, node, Some(kind));
                            let stage = field("stage")
                                .map_or_else(String::new, |s| format!(" in stage {s}"));
                            let started = attempt_started(&st, n);
                            let line = format!("attempt {n} timed out ({kind}) on {node}{stage}");
                            next_attempt(pb, &mut steps, &st, n, started, line);
                        }
                        "released" => {
                            let st = p.status(id).await?;
                            let why = field("reason").unwrap_or("handed back");
                            let line = format!(
                                "the attempt on {} was released ({why})",
                                field("node").unwrap_or("a node whose process is gone")
                            );
                            let n = u64::from(st.attempts) + 1;
                            next_attempt(pb, &mut steps, &st, n, false, line);
                        }
                        "cancelling" => pb.suspend(|| {
                            eprintln!(
                                "cancel asked: the worker stops the job at its next lease renewal"
                            );
                        }),
                        _ => {}
                    }
                }
                if matches!(
                    kind,
                    "succeeded" | "failed" | "dead" | "expired" | "cancelled"
                ) {
                    ended = true;
                }
            }
        }
        // Events may be off (events_maxlen 0): the status settles it either way.
        let st = p.status(id).await?;
        if ended || st.state.is_terminal() || st.state == JobState::NotFound {
            if let Some(pb) = &pb {
                pb.finish_and_clear();
            }
            return Ok(st);
        }
    }
}

/// The bar's look until a progress report with a total arrives: a spinner and the message
/// (a bar of length 0 is drawn full, as if the job were done).
const SPINNER: &str = "{spinner} {msg} {elapsed}";
/// The bar's look once the attempt reports steps.
const BAR: &str = "{spinner} {msg:40} [{bar:30}] {pos}/{len} {elapsed}";

fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ")
}

/// The number of the attempt on `node` that just ended (by a timeout of `kind`, or a
/// failure): its record in the job's history, else the attempts counted.
fn last_attempt(st: &JobStatus, node: &str, kind: Option<&str>) -> u64 {
    attempts_of(st)
        .iter()
        .rev()
        .find(|r| {
            r["node"].as_str() == Some(node)
                && match kind {
                    Some(k) => r["outcome"] == "timeout" && r["timeout"].as_str() == Some(k),
                    None => r["outcome"] == "failed",
                }
        })
        .and_then(|r| r["attempt"].as_u64())
        .unwrap_or_else(|| u64::from(st.attempts).max(1))
}

/// Whether attempt `n` had started (a delivery that never started runs the same attempt
/// number again).
fn attempt_started(st: &JobStatus, n: u64) -> bool {
    attempts_of(st)
        .iter()
        .rev()
        .find(|r| r["attempt"].as_u64() == Some(n))
        .is_none_or(|r| r.get("started_ms").is_some_and(|v| !v.is_null()))
}

/// Says `line` above the bar and, unless the job has ended, which attempt comes next; the
/// bar goes back to a spinner for it (the steps were the old attempt's).
fn next_attempt(
    pb: &ProgressBar,
    steps: &mut bool,
    st: &JobStatus,
    n: u64,
    started: bool,
    line: String,
) {
    if st.state.is_terminal() || st.state == JobState::NotFound {
        pb.suspend(|| eprintln!("{line}"));
        return;
    }
    let next = if started {
        format!("waiting for attempt {}", n + 1)
    } else {
        format!("waiting to run attempt {n} again")
    };
    pb.suspend(|| eprintln!("{line}; {next}"));
    pb.set_style(bar_style(SPINNER));
    pb.set_length(0);
    pb.set_position(0);
    *steps = false;
    pb.set_message(next);
}

async fn queue_states(redis: &Redis) -> Result<Vec<QueueState>, CliError> {
    let served = partitions::served(redis, &[]).await?;
    Ok(inspect::queue_states(redis, &served).await?)
}

fn queues_table(states: &[QueueState]) -> comfy_table::Table {
    let mut t = table(&[
        "queue",
        "waiting",
        "in flight",
        "delayed",
        "dead",
        "oldest wait",
        "consumers",
        "succeeded",
        "failed",
    ]);
    for s in states {
        t.add_row(vec![
            s.queue.clone(),
            s.waiting.to_string(),
            s.in_flight.to_string(),
            s.delayed.to_string(),
            s.dead.to_string(),
            if s.waiting > 0 {
                human_secs(s.oldest_waiting_seconds)
            } else {
                "-".into()
            },
            s.consumers.to_string(),
            s.stat("succeeded").to_string(),
            (s.stat("failed") + s.stat("dead")).to_string(),
        ]);
    }
    t
}

async fn queues(redis: &Redis, as_json: bool) -> Result<(), CliError> {
    let states = queue_states(redis).await?;
    if as_json {
        json(&states);
    } else if states.is_empty() {
        outln!("no queues yet; put a job on one with `fleetq enqueue QUEUE '{{...}}'`");
    } else {
        outln!("{}", queues_table(&states));
    }
    Ok(())
}

fn nodes_table(fleet: &[nodes::NodeRecord], now_ms: u64) -> comfy_table::Table {
    let mut t = table(&[
        "node",
        "state",
        "slots",
        "busy",
        "pid",
        "host",
        "consumer",
        "last seen",
        "failure streak",
        "queues",
        "version",
    ]);
    for n in fleet {
        let state = if n.suspended_until() > now_ms {
            format!(
                "suspended ({} left)",
                human_secs((n.suspended_until() - now_ms) as f64 / 1000.0)
            )
        } else {
            "live".to_owned()
        };
        let f = |k: &str| n.fields.get(k).cloned().unwrap_or_default();
        t.add_row(vec![
            n.node.clone(),
            state,
            n.slots().to_string(),
            n.busy().to_string(),
            n.pid().map_or_else(|| "-".to_owned(), |p| p.to_string()),
            n.host().unwrap_or("-").to_owned(),
            n.consumer().unwrap_or("-").to_owned(),
            format!(
                "{} ago",
                human_secs(now_ms.saturating_sub(n.last_seen_ms()) as f64 / 1000.0)
            ),
            f("failure_streak"),
            f("queues"),
            f("version"),
        ]);
    }
    t
}

/// The `--json` form of the fleet: each record's `node` and `fields`, with `pid`, `host` and
/// `consumers` (its consumer name, as a list) drawn out of them.
fn nodes_json(fleet: &[nodes::NodeRecord]) -> Vec<Value> {
    fleet
        .iter()
        .map(|n| {
            let mut v =
                serde_json::to_value(n).unwrap_or_else(|_| serde_json::json!({"node": n.node}));
            if let Some(obj) = v.as_object_mut() {
                obj.insert("pid".into(), n.pid().map_or(Value::Null, Value::from));
                obj.insert("host".into(), n.host().map_or(Value::Null, Value::from));
                obj.insert(
                    "consumers".into(),
                    n.consumer().into_iter().map(Value::from).collect(),
                );
            }
            v
        })
        .collect()
}

async fn nodes_cmd(redis: &Redis, action: NodeAction, as_json: bool) -> Result<(), CliError> {
    match action {
        NodeAction::List => {
            let fleet = nodes::list(redis).await?;
            let now = nodes::server_ms(redis).await?;
            if as_json {
                json(&nodes_json(&fleet));
            } else if fleet.is_empty() {
                outln!("no live nodes; start one with `fleetq-worker --queue QUEUE`");
            } else {
                outln!("{}", nodes_table(&fleet, now));
            }
            Ok(())
        }
        NodeAction::Suspend { node, for_secs } => {
            if !nodes::suspend(redis, &node, Duration::from_secs(for_secs)).await? {
                return Err(CliError::new(
                    exit::NOT_FOUND,
                    format!("no live node {node:?}; `fleetq nodes` lists them"),
                ));
            }
            report(
                as_json,
                &serde_json::json!({"node": node, "suspended_for_secs": for_secs}),
                &format!(
                    "{node} will stop taking jobs for {} at its next heartbeat",
                    human_secs(for_secs as f64)
                ),
            );
            Ok(())
        }
        NodeAction::Resume { node } => {
            if !nodes::resume(redis, &node).await? {
                return Err(CliError::new(
                    exit::NOT_FOUND,
                    format!("no live node {node:?}; `fleetq nodes` lists them"),
                ));
            }
            report(
                as_json,
                &serde_json::json!({"node": node, "resumed": true}),
                &format!("{node} will take jobs again at its next heartbeat"),
            );
            Ok(())
        }
    }
}

fn report(as_json: bool, value: &Value, text: &str) {
    if as_json {
        json(value);
    } else {
        outln!("{text}");
    }
}

async fn dead(
    redis: &Redis,
    queue: &str,
    action: DeadAction,
    as_json: bool,
) -> Result<(), CliError> {
    let keys = existing_queue(redis, queue).await?;
    match action {
        DeadAction::List { count } => {
            let list = inspect::dead_letters(redis, &keys, "-", count).await?;
            if as_json {
                json(&list);
                return Ok(());
            }
            if list.is_empty() {
                outln!("no dead letters in {}", queue);
                return Ok(());
            }
            let now = nodes::server_ms(redis).await?;
            let mut t = table(&[
                "dead id", "job", "reason", "attempts", "nodes", "died", "error",
            ]);
            for d in &list {
                let mut err: String = d.error.chars().take(60).collect();
                if err.len() < d.error.len() {
                    err.push('…');
                }
                t.add_row(vec![
                    d.dead_id.clone(),
                    d.job.clone(),
                    d.reason.clone(),
                    d.attempts.to_string(),
                    d.nodes.join(","),
                    format!(
                        "{} ago",
                        human_secs(now.saturating_sub(d.dead_ms) as f64 / 1000.0)
                    ),
                    err,
                ]);
            }
            outln!("{t}");
            Ok(())
        }
        DeadAction::Show { dead_id } => {
            let list = inspect::dead_letters(redis, &keys, &dead_id, 1).await?;
            let Some(d) = list.into_iter().find(|d| d.dead_id == dead_id) else {
                return Err(CliError::new(
                    exit::NOT_FOUND,
                    format!(
                        "no dead letter {dead_id} in {}; `fleetq dead {} list` shows them",
                        queue, queue
                    ),
                ));
            };
            if as_json {
                json(&d);
            } else {
                let mut t = table(&["field", "value"]);
                t.add_row(vec!["dead id".to_owned(), d.dead_id.clone()]);
                t.add_row(vec!["job".to_owned(), d.job.clone()]);
                t.add_row(vec!["reason".to_owned(), d.reason.clone()]);
                t.add_row(vec!["error".to_owned(), d.error.clone()]);
                t.add_row(vec!["attempts".to_owned(), d.attempts.to_string()]);
                t.add_row(vec!["nodes".to_owned(), d.nodes.join(" → ")]);
                let mut fields: Vec<_> = d.fields.iter().collect();
                fields.sort();
                for (k, v) in fields {
                    t.add_row(vec![format!("field {k}"), v.clone()]);
                }
                outln!("{t}");
            }
            Ok(())
        }
        DeadAction::Retry { dead_id } => match inspect::retry_dead(redis, &keys, &dead_id).await? {
            Some(job) => {
                report(
                    as_json,
                    &serde_json::json!({"job": job, "queue": queue}),
                    &format!("job {job} is back in line on {}", queue),
                );
                Ok(())
            }
            None => Err(CliError::new(
                exit::NOT_FOUND,
                format!("no dead letter {dead_id} in {}", queue),
            )),
        },
        DeadAction::Purge { dead_id } => {
            let ids: Vec<String> = dead_id.clone().into_iter().collect();
            let n = inspect::purge_dead(redis, &keys, &ids).await?;
            if dead_id.is_some() && n == 0 {
                return Err(CliError::new(
                    exit::NOT_FOUND,
                    format!("no dead letter {} in {}", ids[0], queue),
                ));
            }
            report(
                as_json,
                &serde_json::json!({"purged": n}),
                &format!("purged {n} dead letter(s) from {}", queue),
            );
            Ok(())
        }
    }
}

/// `fleetq partitions`.
async fn partitions_cmd(
    redis: &Redis,
    a: crate::args::PartitionsArgs,
    as_json: bool,
) -> Result<(), CliError> {
    let keys = queue_keys(&a.queue)?;
    let p = match a.count {
        Some(count) => partitions::set(redis, &keys, count)
            .await
            .map_err(|e| match e {
                fleetq_broker::Error::Config(why) => CliError::new(exit::BAD_INPUT, why),
                other => other.into(),
            })?,
        None => partitions::Partitions::load(redis, &keys).await?,
    };
    let names: Vec<&str> = p.targets().iter().map(|k| k.name()).collect();
    if as_json {
        json(&serde_json::json!({"queue": a.queue, "partitions": p.count(), "streams": names}));
    } else {
        outln!(
            "queue {} has {} partition{}: {}",
            a.queue,
            p.count(),
            if p.count() == 1 { "" } else { "s" },
            names.join(", ")
        );
    }
    Ok(())
}

/// `fleetq functions dump`: the library text [`functions::library_source`] gives
/// `FUNCTION LOAD` (with `--json`, with its version).
fn dump_functions(as_json: bool) {
    let source = functions::library_source();
    if as_json {
        json(&serde_json::json!({"version": functions::library_version(), "source": source}));
    } else {
        use std::io::Write as _;
        // A closed pipe (`| head`) is the reader's choice, not an error.
        let _ = std::io::stdout().write_all(source.as_bytes());
    }
}

/// `fleetq functions load|status`.
async fn functions_cmd(
    redis: &Redis,
    action: FunctionsAction,
    as_json: bool,
) -> Result<(), CliError> {
    let conn = redis.conn();
    let before = functions::check_all(&conn).await?;
    if matches!(action, FunctionsAction::Load) {
        functions::load_all(&conn).await?;
    }
    let after = functions::check_all(&conn).await?;
    let ours = functions::library_version();
    let state = match &after {
        LibraryState::Missing => "missing",
        LibraryState::Older(_) => "older",
        LibraryState::Current(v) if *v == ours => "current",
        LibraryState::Current(_) => "current (another build of this version)",
        LibraryState::Newer(_) => "newer",
    };
    let health = fleetq_broker::topology::health(redis).await?;
    if as_json {
        json(&serde_json::json!({
            "server": after.version(),
            "build": ours,
            "state": state,
            "usable": after.usable(),
            "loaded": before != after,
            "redis": health,
        }));
    } else {
        let mut t = table(&["library", "version"]);
        t.add_row(vec![
            "on this Redis".to_owned(),
            after.version().unwrap_or("none").to_owned(),
        ]);
        t.add_row(vec!["this build".to_owned(), ours.clone()]);
        t.add_row(vec!["state".to_owned(), state.to_owned()]);
        t.add_row(vec!["topology".to_owned(), health.topology.clone()]);
        for p in &health.primaries {
            let cluster = p
                .cluster_state
                .as_deref()
                .map_or_else(String::new, |c| format!(", cluster_state {c}"));
            t.add_row(vec![
                format!("primary {}", p.node),
                format!("{}{cluster}", p.library),
            ]);
        }
        if let Some(covered) = health.slots_covered {
            t.add_row(vec![
                "slots covered".to_owned(),
                format!("{covered} of 16384"),
            ]);
        }
        outln!("{t}");
        match (&action, before != after) {
            (FunctionsAction::Load, true) => outln!("loaded fleetq library {ours}"),
            (FunctionsAction::Load, false) => {
                outln!("nothing to load: the server's library is {state}")
            }
            (FunctionsAction::Status | FunctionsAction::Dump, _) => {}
        }
    }
    match after.problem() {
        Some(problem) => Err(CliError::new(exit::NOT_FOUND, problem)),
        None => Ok(()),
    }
}

async fn top(redis: &Redis, a: TopArgs, as_json: bool) -> Result<(), CliError> {
    let mut n = 0u64;
    loop {
        let states = queue_states(redis).await?;
        let fleet = nodes::list(redis).await?;
        let now = nodes::server_ms(redis).await?;
        if as_json {
            // One snapshot, one document, no screen codes.
            json(
                &serde_json::json!({"queues": states, "nodes": nodes_json(&fleet), "server_ms": now}),
            );
            return Ok(());
        } else {
            // Clear the screen and draw from the top.
            out!("\x1b[2J\x1b[H");
            outln!(
                "fleetq top — {} queue(s), {} node(s) — every {} ms, Ctrl-C to leave\n",
                states.len(),
                fleet.len(),
                a.interval_ms
            );
            outln!("{}", queues_table(&states));
            outln!("{}", nodes_table(&fleet, now));
        }
        n += 1;
        if a.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(a.interval_ms.max(100))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
