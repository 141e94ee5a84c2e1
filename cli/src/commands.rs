//! The everyday commands: enqueue, status, watch, queues, nodes, dead letters, the function
//! library, top.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fleetq_broker::functions::{self, LibraryState};
use fleetq_broker::inspect::{self, QueueState};
use fleetq_broker::partitions::{self, discover_queues};
use fleetq_broker::{nodes, EnqueueOptions, JobState, JobStatus, Producer, QueueKeys, Redis};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::args::{
    Cli, Command, DeadAction, DeadArgs, EnqueueArgs, FunctionsAction, JobArgs, NodeAction, TopArgs,
    WatchArgs,
};
use crate::exit::{self, CliError};
use crate::output::{human_secs, json, table};

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
        Command::Dead(a) => dead(&connect().await?, a, cli.json).await,
        Command::Functions(a) => functions_cmd(&connect().await?, a.action, cli.json).await,
        Command::Partitions(a) => partitions_cmd(&connect().await?, a, cli.json).await,
        Command::Cancel(a) => cancel(&connect().await?, a, cli.json).await,
        Command::Top(a) => top(&connect().await?, a, cli.json).await,
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
            println!(
                "{how} job {} on {}: {} (position {})",
                e.id, a.queue, e.state, e.position
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

/// Prints a final status and maps it to the exit code.
fn finish(st: &JobStatus, as_json: bool) -> Result<(), CliError> {
    if as_json {
        json(st);
    } else {
        print_status(st);
    }
    if st.state == JobState::Succeeded {
        Ok(())
    } else {
        Err(CliError::new(
            exit::JOB_NOT_SUCCEEDED,
            format!(
                "job {} ended {}{}",
                st.id,
                st.state,
                st.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ))
    }
}

fn print_status(st: &JobStatus) {
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
    println!("{t}");
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

async fn status(redis: &Redis, a: JobArgs, as_json: bool) -> Result<(), CliError> {
    let (_, st) = locate(redis, &a.id, a.queue.as_deref()).await?;
    if as_json {
        json(&st);
    } else {
        print_status(&st);
    }
    Ok(())
}

async fn cancel(redis: &Redis, a: JobArgs, as_json: bool) -> Result<(), CliError> {
    let (p, _) = locate(redis, &a.id, a.queue.as_deref()).await?;
    let state = p.cancel(&a.id).await?;
    if as_json {
        json(&serde_json::json!({"id": a.id, "queue": p.keys().name(), "state": state}));
    } else {
        let what = match state {
            JobState::Cancelled => "cancelled: it will not run",
            JobState::Cancelling => {
                "cancelling: its worker stops it at the next lease renewal (see `fleetq status`)"
            }
            _ => "already ended; nothing to cancel",
        };
        println!("job {} in queue {}: {what}", a.id, p.keys().name());
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
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg:40} [{bar:30}] {pos}/{len} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb.set_message("waiting");
        Some(pb)
    } else {
        None
    };
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
                if let Some(pb) = &pb {
                    match kind {
                        "started" | "taken" => pb.set_message(format!(
                            "{kind} on {}",
                            f.get("node").map_or("?", String::as_str)
                        )),
                        "progress" => {
                            if let Some(prog) = f
                                .get("progress")
                                .and_then(|s| serde_json::from_str::<Value>(s).ok())
                            {
                                if let (Some(step), Some(total)) =
                                    (prog["step"].as_u64(), prog["total"].as_u64())
                                {
                                    pb.set_length(total);
                                    pb.set_position(step);
                                }
                                if let Some(stage) = prog["stage"].as_str() {
                                    pb.set_message(format!("running · {stage}"));
                                }
                            }
                        }
                        "retrying" => pb.set_message(format!(
                            "retrying ({})",
                            f.get("error").map_or("", String::as_str)
                        )),
                        "timeout" => pb.set_message(format!(
                            "{} timeout on {}",
                            f.get("kind").map_or("?", String::as_str),
                            f.get("node").map_or("?", String::as_str)
                        )),
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
        println!("no queues yet; put a job on one with `fleetq enqueue QUEUE '{{...}}'`");
    } else {
        println!("{}", queues_table(&states));
    }
    Ok(())
}

fn nodes_table(fleet: &[nodes::NodeRecord], now_ms: u64) -> comfy_table::Table {
    let mut t = table(&[
        "node",
        "state",
        "slots",
        "busy",
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

async fn nodes_cmd(redis: &Redis, action: NodeAction, as_json: bool) -> Result<(), CliError> {
    match action {
        NodeAction::List => {
            let fleet = nodes::list(redis).await?;
            let now = nodes::server_ms(redis).await?;
            if as_json {
                json(&fleet);
            } else if fleet.is_empty() {
                println!("no live nodes; start one with `fleetq-worker --queue QUEUE`");
            } else {
                println!("{}", nodes_table(&fleet, now));
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
        println!("{text}");
    }
}

async fn dead(redis: &Redis, a: DeadArgs, as_json: bool) -> Result<(), CliError> {
    let keys = existing_queue(redis, &a.queue).await?;
    match a.action {
        DeadAction::List { count } => {
            let list = inspect::dead_letters(redis, &keys, "-", count).await?;
            if as_json {
                json(&list);
                return Ok(());
            }
            if list.is_empty() {
                println!("no dead letters in {}", a.queue);
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
            println!("{t}");
            Ok(())
        }
        DeadAction::Show { dead_id } => {
            let list = inspect::dead_letters(redis, &keys, &dead_id, 1).await?;
            let Some(d) = list.into_iter().find(|d| d.dead_id == dead_id) else {
                return Err(CliError::new(
                    exit::NOT_FOUND,
                    format!(
                        "no dead letter {dead_id} in {}; `fleetq dead {} list` shows them",
                        a.queue, a.queue
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
                println!("{t}");
            }
            Ok(())
        }
        DeadAction::Retry { dead_id } => match inspect::retry_dead(redis, &keys, &dead_id).await? {
            Some(job) => {
                report(
                    as_json,
                    &serde_json::json!({"job": job, "queue": a.queue}),
                    &format!("job {job} is back in line on {}", a.queue),
                );
                Ok(())
            }
            None => Err(CliError::new(
                exit::NOT_FOUND,
                format!("no dead letter {dead_id} in {}", a.queue),
            )),
        },
        DeadAction::Purge { dead_id } => {
            let ids: Vec<String> = dead_id.clone().into_iter().collect();
            let n = inspect::purge_dead(redis, &keys, &ids).await?;
            if dead_id.is_some() && n == 0 {
                return Err(CliError::new(
                    exit::NOT_FOUND,
                    format!("no dead letter {} in {}", ids[0], a.queue),
                ));
            }
            report(
                as_json,
                &serde_json::json!({"purged": n}),
                &format!("purged {n} dead letter(s) from {}", a.queue),
            );
            Ok(())
        }
    }
}

/// `fleetq functions load|status`.
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
        println!(
            "queue {} has {} partition{}: {}",
            a.queue,
            p.count(),
            if p.count() == 1 { "" } else { "s" },
            names.join(", ")
        );
    }
    Ok(())
}

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
        println!("{t}");
        match (&action, before != after) {
            (FunctionsAction::Load, true) => println!("loaded fleetq library {ours}"),
            (FunctionsAction::Load, false) => {
                println!("nothing to load: the server's library is {state}")
            }
            (FunctionsAction::Status, _) => {}
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
            // One object per line (JSON lines), no screen codes.
            let doc = serde_json::json!({"queues": states, "nodes": fleet, "server_ms": now});
            println!("{doc}");
        } else {
            // Clear the screen and draw from the top.
            print!("\x1b[2J\x1b[H");
            println!(
                "fleetq top — {} queue(s), {} node(s) — every {} ms, Ctrl-C to leave\n",
                states.len(),
                fleet.len(),
                a.interval_ms
            );
            println!("{}", queues_table(&states));
            println!("{}", nodes_table(&fleet, now));
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
