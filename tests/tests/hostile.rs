//! Hostile input: entries of thousands of fields, numbers out of range, garbage in the queue
//! config. Every entry ends somewhere (run, or dead-lettered with a reason naming what was
//! wrong), its neighbours run, and a bad config value fails a function before it writes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleetq_broker::calls::Token;
use fleetq_broker::functions::fcall;
use fleetq_broker::{limits, EnqueueOptions, JobState, QueueConfig, QueueKeys};
use fleetq_tests::{
    direct_connection, eventually, quick_queue_config, worker_config, FnHandler, Stack,
};
use fleetq_worker::Outcome;
use redis::aio::MultiplexedConnection;
use serde_json::json;

/// A fresh server with queue `q` (quick config, group created), a direct connection and the
/// queue's keys.
async fn queue_q() -> (Stack, MultiplexedConnection, QueueKeys) {
    let s = Stack::start().await;
    s.configure("q", &quick_queue_config()).await;
    s.create_group("q").await;
    let c = direct_connection(&s.server.url()).await;
    (s, c, QueueKeys::new("q").unwrap())
}

/// How many replies Redis has refused with a `fleetq:` error so far (`INFO errorstats` names them `fleetq_`).
async fn fleetq_errors(c: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_fleetq_:count="))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A plain XADD of raw fields, as a foreign producer would; the entry id.
async fn xadd(
    c: &mut MultiplexedConnection,
    keys: &QueueKeys,
    fields: &[(Vec<u8>, Vec<u8>)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys.stream()).arg("*");
    for (f, v) in fields {
        cmd.arg(&f[..]).arg(&v[..]);
    }
    cmd.query_async(c).await.unwrap()
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    pairs
        .iter()
        .map(|(f, v)| (f.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// `payload` and then `n` more fields of their own names.
fn wide(payload: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = fields(&[("payload", payload)]);
    out.extend((0..n).map(|i| (format!("f{i}").into_bytes(), b"v".to_vec())));
    out
}

/// Every dead letter of the queue: its fields by name (the first of equal names).
async fn dead_letters(
    c: &mut MultiplexedConnection,
    keys: &QueueKeys,
) -> Vec<HashMap<String, String>> {
    type ByteEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);
    let dead: Vec<ByteEntry> = redis::cmd("XRANGE")
        .arg(keys.dead())
        .arg("-")
        .arg("+")
        .query_async(c)
        .await
        .unwrap();
    dead.into_iter()
        .map(|(_, f)| {
            let mut m = HashMap::new();
            for (k, v) in f {
                m.entry(String::from_utf8_lossy(&k).into_owned())
                    .or_insert_with(|| String::from_utf8_lossy(&v).into_owned());
            }
            m
        })
        .collect()
}

async fn xlen(c: &mut MultiplexedConnection, key: String) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(c).await.unwrap()
}

async fn job_field(
    c: &mut MultiplexedConnection,
    keys: &QueueKeys,
    job: &str,
    f: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(keys.job(job))
        .arg(f)
        .query_async(c)
        .await
        .unwrap()
}

/// Entries of 5000 fields — one with a bad payload, one with a good one — read in one batch
/// with good jobs: both are dead-lettered as malformed (an entry may carry at most 100
/// fields), the good jobs succeed, nothing stays in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_5000_fields_are_dead_lettered_and_their_batch_runs() {
    let s = Stack::start().await;
    s.configure("q", &quick_queue_config()).await;
    s.create_group("q").await;
    let mut c = direct_connection(&s.server.url()).await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for n in 0..6 {
        match n {
            2 => bad.push(xadd(&mut c, &keys, &wide("{not json", 5000)).await),
            4 => bad.push(xadd(&mut c, &keys, &wide("{\"ok\":1}", 5000)).await),
            _ => {}
        }
        good.push(
            p.enqueue(&json!({ "n": n }), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let w = s.worker(
        worker_config("q", "n1", 10),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    for id in &good {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{id}");
    }
    for id in &bad {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Dead, "{id}: {st:?}");
        assert_eq!(
            st.fields.get("reason").map(String::as_str),
            Some("malformed")
        );
        let error = st.error.unwrap_or_default();
        assert!(
            error.contains("5001 fields") && error.contains("100"),
            "{error}"
        );
    }
    let dead = dead_letters(&mut c, &keys).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert_eq!(d["reason"], "malformed");
        assert_eq!(d["fields_left_out"], (5001 - 64).to_string());
        assert_eq!(d.keys().filter(|k| k.starts_with("f:")).count(), 64);
    }
    assert!(s.pending("q").await.is_empty(), "nothing left in flight");
    assert_eq!(
        xlen(&mut c, keys.stream()).await,
        0,
        "every entry left the stream"
    );
    w.stop().await;
}

/// The paths that put an entry back in line (a release of an entry read but never taken, the
/// abandon of a gone consumer) meet an entry of 5000 fields without failing: it is
/// dead-lettered, reason malformed. Reclaim, expire and status read it as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_that_requeue_dead_letter_an_entry_of_5000_fields() {
    let (s, mut c, keys) = queue_q().await;
    let released = xadd(&mut c, &keys, &wide("{}", 5000)).await;
    let abandoned = xadd(&mut c, &keys, &wide("{}", 5000)).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("c1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("c2")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let status: Vec<String> = fcall("fleetq_status", &keys)
        .arg(&released)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(status[..2], ["state", "taken"]);
    // c1 gives back what it read but never took (as at shutdown).
    let reply: Vec<String> = fcall("fleetq_complete", &keys)
        .arg("c1")
        .arg("n1")
        .arg(&released)
        .arg("")
        .arg(&released)
        .arg("release")
        .arg("")
        .arg(0)
        .arg("")
        .arg("")
        .arg("")
        .arg(0)
        .arg("")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(reply, ["ok"]);
    // c2's process is gone.
    let (requeued, dead): (u64, u64) = fcall("fleetq_abandon", &keys)
        .arg("c2")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((requeued, dead), (0, 1));
    for id in [&released, &abandoned] {
        assert_eq!(
            job_field(&mut c, &keys, id, "state").await.as_deref(),
            Some("dead"),
            "{id}"
        );
        let error = job_field(&mut c, &keys, id, "error").await.unwrap();
        assert!(error.contains("5001 fields"), "{error}");
    }
    assert_eq!(dead_letters(&mut c, &keys).await.len(), 2);
    assert!(s.pending("q").await.is_empty());
    // A waiting one past its queue timeout expires like any other (a plain XADD: read by
    // fleetq_expire's pass over new entries, which a queue timeout in the config turns on).
    read_new_entries(&s).await;
    let mut slow = wide("{}", 5000);
    slow.extend(fields(&[
        ("queue_timeout_ms", "1"),
        ("enqueued_ms", "1000"),
    ]));
    let slow = xadd(&mut c, &keys, &slow).await;
    let (ended, _): (u64, u64) = fcall("fleetq_expire", &keys)
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(ended, 1);
    assert_eq!(
        job_field(&mut c, &keys, &slow, "state").await.as_deref(),
        Some("expired")
    );
}

/// Each number out of range (or not a number by the rule) ends its entry in the dead letters
/// with a reason naming the field, the value and the range; none wraps, saturates or is read
/// as a default, and the good jobs around them run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_out_of_range_are_dead_lettered_naming_field_value_and_range() {
    let s = Stack::start().await;
    s.configure("q", &quick_queue_config()).await;
    s.create_group("q").await;
    let mut c = direct_connection(&s.server.url()).await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let cases = [
        ("queue_timeout_ms", "18446744073709551615"),
        ("attempts", "4294967296"),
        ("max_attempts", "0"),
        ("max_attempts", "4294967296"),
        ("run_timeout_ms", "nan"),
        ("start_timeout_ms", "inf"),
        ("progress_timeout_ms", "1.5"),
        ("enqueued_ms", "-1"),
        ("avoid_until", "0x10"),
        ("passes", "1e3"),
        ("seq", " 7"),
    ];
    let mut bad = BTreeMap::new();
    let mut good = Vec::new();
    for (field, value) in cases {
        let id = format!("bad-{field}-{}", bad.len());
        xadd(
            &mut c,
            &keys,
            &fields(&[("payload", "{}"), ("id", &id), (field, value)]),
        )
        .await;
        bad.insert(id, (field, value));
        good.push(
            p.enqueue(&json!({}), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let w = s.worker(
        worker_config("q", "n1", 4),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    for id in &good {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{id}");
    }
    for (id, (field, value)) in &bad {
        let st = p.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Dead, "{id}: {st:?}");
        assert_eq!(
            st.fields.get("reason").map(String::as_str),
            Some("malformed"),
            "{id}"
        );
        let f = limits::entry_field(field);
        let error = st.error.unwrap_or_default();
        assert!(
            error.contains(field)
                && error.contains(value)
                && error.contains(&format!("from {} to {}", f.min, f.max)),
            "{id}: {error}"
        );
    }
    assert!(s.pending("q").await.is_empty());
    w.stop().await;
}

/// Gives queue `q` a queue timeout in its config (a day: the entries' own fields decide), so
/// that fleetq_expire reads the plain-XADD entries added since its previous call.
async fn read_new_entries(s: &Stack) {
    s.configure(
        "q",
        &QueueConfig {
            queue_timeout: Some(Duration::from_secs(86_400)),
            ..quick_queue_config()
        },
    )
    .await;
}

/// fleetq_expire reads the numbers of a waiting entry by the same rule: one that is not a
/// number of its range is left for the worker to dead-letter (never expired at once, as
/// `0x10` or `-1` read by Lua's tonumber would); of two equal fields the first counts, as in
/// Rust, for the number and for the job id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_reads_entry_numbers_by_the_rule_and_the_first_of_equal_fields() {
    let (s, mut c, keys) = queue_q().await;
    read_new_entries(&s).await;
    for (id, timeout) in [
        ("hex", "0x10"),
        ("neg", "-1"),
        ("nan", "nan"),
        ("huge", "18446744073709551615"),
    ] {
        xadd(
            &mut c,
            &keys,
            &fields(&[
                ("payload", "{}"),
                ("id", id),
                ("enqueued_ms", "1000"),
                ("queue_timeout_ms", timeout),
            ]),
        )
        .await;
    }
    xadd(
        &mut c,
        &keys,
        &fields(&[
            ("payload", "{}"),
            ("id", "first"),
            ("id", "second"),
            ("enqueued_ms", "1000"),
            ("queue_timeout_ms", "1"),
            ("queue_timeout_ms", "900000000000"),
        ]),
    )
    .await;
    let (ended, scanned): (u64, u64) = fcall("fleetq_expire", &keys)
        .arg(100)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!((ended, scanned), (1, 5));
    assert_eq!(
        job_field(&mut c, &keys, "first", "state").await.as_deref(),
        Some("expired")
    );
    assert_eq!(job_field(&mut c, &keys, "second", "state").await, None);
    let w = s.worker(
        worker_config("q", "n1", 4),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    for id in ["hex", "neg", "nan", "huge"] {
        eventually(
            Duration::from_secs(10),
            &format!("{id} dead-lettered"),
            || async {
                let mut c = direct_connection(&s.server.url()).await;
                job_field(&mut c, &keys, id, "state").await.as_deref() == Some("dead")
            },
        )
        .await;
        let error = job_field(&mut c, &keys, id, "error").await.unwrap();
        assert!(error.contains("queue_timeout_ms"), "{id}: {error}");
    }
    w.stop().await;
}

/// Bad queue config values, each with the field it names: refused by Rust
/// (`QueueConfig::from_map`) and by every function that reads the config.
const BAD_CONFIG: &[(&str, &str)] = &[
    ("retention_ms", "nan"),
    ("events_maxlen", "1.5"),
    ("events_maxlen", "inf"),
    ("retention_ms", "-1"),
    ("max_payload_bytes", "0"),
    ("lease_ms", "10"),
    ("max_attempts", "99999999999999999999"),
    ("queue_timeout_ms", " 5"),
    ("failover_cooldown_ms", "0x10"),
    ("poison_nodes", "-1"),
    ("partitions", "1e3"),
    ("backoff_max_ms", "10"),
];

/// Every key of the queue but its config, dumped: what a function may have written.
async fn snapshot(c: &mut MultiplexedConnection, keys: &QueueKeys) -> BTreeMap<String, Vec<u8>> {
    let names: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", keys.stream().trim_end_matches("stream")))
        .query_async(c)
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for k in names.into_iter().filter(|k| *k != keys.config()) {
        let dump: Vec<u8> = redis::cmd("DUMP").arg(&k).query_async(c).await.unwrap();
        out.insert(k, dump);
    }
    out
}

/// A table of bad config values driven through Rust parsing and through each function that
/// reads the config: each call fails with an error naming the field and saying to HSET it,
/// and nothing was written (job hashes, stream, events, dead letters, stats unchanged). Once
/// the value is repaired, the same calls go through and the job taken before runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_value_fails_every_function_before_it_writes() {
    let (_server, mut c, keys) = queue_q().await;
    let enqueue = |id: &str| {
        fcall("fleetq_enqueue", &keys)
            .arg("{}")
            .arg("id")
            .arg(id)
            .clone()
    };
    for id in ["a", "b", "d"] {
        let _: redis::Value = enqueue(id).query_async(&mut c).await.unwrap();
    }
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("c1")
        .arg("COUNT")
        .arg(3)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let entries: Vec<String> = read.keys[0].ids.iter().map(|i| i.id.clone()).collect();
    let (ta, tb, td) = (Token::new(), Token::new(), Token::new());
    let take = |entry: &str, job: &str, token: &Token| {
        fcall("fleetq_take", &keys)
            .arg("c1")
            .arg("n1")
            .arg(2000)
            .arg(1)
            .arg(1)
            .arg(entry)
            .arg(job)
            .arg(token.as_str())
            .arg(0)
            .arg(3)
            .arg(0)
            .arg(1000)
            .arg("")
            .arg(0)
            .arg("")
            .arg(0)
            .clone()
    };
    let complete = |entry: &str, job: &str, token: &Token, outcome: &str| {
        fcall("fleetq_complete", &keys)
            .arg("c1")
            .arg("n1")
            .arg(entry)
            .arg(token.as_str())
            .arg(job)
            .arg(outcome)
            .arg("{}")
            .arg(0)
            .arg("")
            .arg("")
            .arg("")
            .arg(0)
            .arg("")
            .arg(1)
            .clone()
    };
    let _: redis::Value = take(&entries[0], "a", &ta)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: redis::Value = take(&entries[2], "d", &td)
        .query_async(&mut c)
        .await
        .unwrap();
    let r: Vec<String> = complete(&entries[2], "d", &td, "dead")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(r, ["ok"]);
    let dead_id: String = {
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys.dead())
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        r.ids[0].id.clone()
    };
    // a runs (taken by c1), b was read by c1 and is not taken yet, d is a dead letter.
    let calls: Vec<(&str, redis::Cmd)> = vec![
        ("enqueue", enqueue("e")),
        ("take", take(&entries[1], "b", &tb)),
        ("complete", complete(&entries[0], "a", &ta, "succeeded")),
        (
            "progress",
            fcall("fleetq_progress", &keys)
                .arg("c1")
                .arg(&entries[0])
                .arg(ta.as_str())
                .arg("a")
                .arg("progress")
                .arg("{\"step\":1}")
                .arg("")
                .clone(),
        ),
        ("promote", fcall("fleetq_promote", &keys).arg(100).clone()),
        (
            "reclaim",
            fcall("fleetq_reclaim", &keys)
                .arg("c2")
                .arg(2000)
                .arg(1)
                .arg("n2")
                .clone(),
        ),
        ("abandon", fcall("fleetq_abandon", &keys).arg("c1").clone()),
        ("cancel", fcall("fleetq_cancel", &keys).arg("a").clone()),
        ("expire", fcall("fleetq_expire", &keys).arg(100).clone()),
        (
            "node_state",
            fcall("fleetq_node_state", &keys)
                .arg("n1")
                .arg(0)
                .arg("operator")
                .clone(),
        ),
        (
            "dead_retry",
            fcall("fleetq_dead_retry", &keys).arg(&dead_id).clone(),
        ),
    ];
    for (field, value) in BAD_CONFIG {
        let map = HashMap::from([(field.to_string(), value.to_string())]);
        let rust = fleetq_broker::QueueConfig::from_map(&map)
            .unwrap_err()
            .to_string();
        assert!(rust.contains(field), "Rust: {field}={value:?}: {rust}");
        let _: () = redis::cmd("HSET")
            .arg(keys.config())
            .arg(*field)
            .arg(*value)
            .query_async(&mut c)
            .await
            .unwrap();
        let before = snapshot(&mut c, &keys).await;
        for (name, cmd) in &calls {
            let err = match cmd.query_async::<redis::Value>(&mut c).await {
                Ok(v) => panic!("{name} with {field}={value:?} went through: {v:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                err.contains(&format!("queue config field {field}")) && err.contains("with HSET"),
                "{name} with {field}={value:?}: {err}"
            );
            assert_eq!(
                snapshot(&mut c, &keys).await,
                before,
                "{name} wrote with {field}={value:?}"
            );
        }
        let _: () = redis::cmd("HDEL")
            .arg(keys.config())
            .arg(*field)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // Repaired: the job taken before the garbage runs on, the one read before is taken.
    let r: redis::Value = take(&entries[1], "b", &tb)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(format!("{r:?}").contains("run"), "{r:?}");
    let r: Vec<String> = complete(&entries[0], "a", &ta, "succeeded")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(r, ["ok"]);
    assert_eq!(
        job_field(&mut c, &keys, "a", "state").await.as_deref(),
        Some("succeeded")
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.job("a"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(ttl > 0, "the ended job's hash expires: {ttl}");
}

/// A result computed while the queue's config holds a bad value is kept: the worker tries
/// again until the config is fixed, then records it (one attempt, nothing run twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_computed_under_a_bad_config_is_recorded_once_it_is_fixed() {
    let s = Stack::start().await;
    let keys = QueueKeys::new("q").unwrap();
    let cfg = QueueConfig {
        lease: Duration::from_secs(30),
        ..quick_queue_config()
    };
    s.configure("q", &cfg).await;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let worker = s.worker(
        worker_config("q", "gpu-1", 1),
        FnHandler::new(move |job, _| {
            let g = g.clone();
            async move {
                let _ = g.acquire().await;
                Outcome::Succeeded(job.payload)
            }
        }),
    );
    let p = s.producer("q").await;
    let e = p
        .enqueue(&json!({"n": 1}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the job running", || async {
        p.status(&e.id).await.unwrap().state == JobState::Running
    })
    .await;
    let mut c = direct_connection(&s.server.url()).await;
    let _: () = redis::cmd("HSET")
        .arg(keys.config())
        .arg("retention_ms")
        .arg("nan")
        .query_async(&mut c)
        .await
        .unwrap();
    let refused_before = fleetq_errors(&mut c).await;
    gate.add_permits(1);
    // The commit is refused for the config's sake (a function error, counted by Redis), and
    // nothing ends the job meanwhile.
    eventually(Duration::from_secs(10), "the commit refused", || async {
        fleetq_errors(&mut direct_connection(&s.server.url()).await).await > refused_before
    })
    .await;
    assert_eq!(p.status(&e.id).await.unwrap().state, JobState::Running);
    let _: () = redis::cmd("HSET")
        .arg(keys.config())
        .arg("retention_ms")
        .arg(3_600_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    assert_eq!(st.attempts, 1, "{st:?}");
    assert_eq!(st.result, Some(json!({"n": 1})));
    worker.stop().await;
}
