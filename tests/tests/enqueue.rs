//! The lean enqueue path: what Redis does per enqueued job (counted with INFO commandstats,
//! never timed), positions in O(1) from the group's counters in each state Redis can be in,
//! the batch form, and queue-timeout expiry from the deadline index, without reading the
//! backlog.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleetq_broker::functions::fcall;
use fleetq_broker::{maintenance, EnqueueOptions, Error, JobState, QueueConfig, QueueKeys};
use fleetq_tests::{eventually, worker_config, FnHandler, Stack};
use fleetq_worker::Outcome;
use serde_json::json;

/// Commands the server ran since the last [`reset_stats`], by name (`xinfo|groups`, …),
/// leaving out those the test itself sends to look (`info`, `config|resetstat`).
async fn calls(s: &Stack) -> BTreeMap<String, u64> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let n = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), n))
        })
        .filter(|(name, _)| name != "info" && name != "config|resetstat")
        .collect()
}

async fn reset_stats(s: &Stack) {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut s.conn())
        .await
        .unwrap();
}

/// The commands the functions ran inside (everything but the FCALLs).
fn inner(calls: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    calls
        .iter()
        .filter(|(name, _)| *name != "fcall")
        .map(|(n, c)| (n.clone(), *c))
        .collect()
}

/// Options with only an id (a job with an id has a hash: its status reads no entry).
fn with_id(id: impl Into<String>) -> EnqueueOptions {
    EnqueueOptions {
        id: Some(id.into()),
        ..EnqueueOptions::default()
    }
}

/// The largest payload a producer sends through `fleetq_enqueue`.
const LARGEST_THROUGH_FUNCTIONS: usize = fleetq_broker::producer::PLAIN_PAYLOAD_BYTES - 1;

fn payload_of(bytes: usize) -> String {
    json!({ "blob": "x".repeat(bytes.saturating_sub(12)) }).to_string()
}

/// Enqueues `n` jobs of `bytes` one by one and returns the commands Redis ran for them.
async fn cost_of_singles(s: &Stack, queue: &str, n: usize, bytes: usize) -> BTreeMap<String, u64> {
    let p = s.producer(queue).await;
    let body = payload_of(bytes);
    reset_stats(s).await;
    for _ in 0..n {
        p.enqueue_json(&body, &EnqueueOptions::default())
            .await
            .unwrap();
    }
    calls(s).await
}

/// What an enqueue through the functions costs Redis does not depend on the payload: the same
/// commands, as many of each, for 200 B and for the largest payload sent through them (a
/// larger one goes around them, below), none of them reading entries (`XINFO STREAM`
/// copies the first and last entries, `XRANGE` any), in every state the group can be in:
/// made by fleetq_enqueue with its counter, made by a worker without one and never
/// delivered, and with the lag unknown to Redis (a job still running ahead of one that
/// finished).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_cost_does_not_depend_on_the_payload() {
    const N: usize = 8;
    let s = Stack::start().await;
    let q = QueueKeys::new("q").unwrap();
    s.create_group("cold").await;
    // Queue "q": the first enqueue makes the group.
    let p = s.producer("q").await;
    for _ in 0..4 {
        p.enqueue_json("{}", &EnqueueOptions::default())
            .await
            .unwrap();
    }
    for queue in ["q", "cold"] {
        let small = cost_of_singles(&s, queue, N, 200).await;
        let large = cost_of_singles(&s, queue, N, LARGEST_THROUGH_FUNCTIONS).await;
        assert_eq!(small["fcall"], N as u64, "{small:?}");
        assert_eq!(
            inner(&small),
            inner(&large),
            "{queue}: 200 B vs the largest"
        );
        for reads in ["xinfo|stream", "xrange", "xrevrange", "exists"] {
            assert!(!small.contains_key(reads), "{queue}: {reads} in {small:?}");
        }
        // Per job: the entry (its `queued` event is routine: off by default); per call: the
        // config and the group; no TIME (a waiting job's enqueue time is its entry id's).
        assert_eq!(small["xadd"], N as u64, "{small:?}");
        assert_eq!(small["xinfo|groups"], N as u64, "{small:?}");
        assert!(!small.contains_key("time"), "{small:?}");
    }

    // Redis cannot tell the lag: the first job still runs, the second finished.
    let mut c = s.conn();
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w1")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(q.stream())
        .arg(">")
        .query_async(&mut c)
        .await
        .unwrap();
    let second = read.keys[0].ids[1].id.clone();
    let _: () = redis::pipe()
        .cmd("XACK")
        .arg(q.stream())
        .arg("workers")
        .arg(&second)
        .ignore()
        .cmd("XDEL")
        .arg(q.stream())
        .arg(&second)
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    let small = cost_of_singles(&s, "q", N, 200).await;
    let large = cost_of_singles(&s, "q", N, LARGEST_THROUGH_FUNCTIONS).await;
    assert_eq!(
        inner(&small),
        inner(&large),
        "lag unknown: 200 B vs the largest"
    );
    assert_eq!(
        small["xlen"], N as u64,
        "the line's end from XLEN: {small:?}"
    );
    assert!(!small.contains_key("xinfo|stream") && !small.contains_key("xrange"));
}

/// A batch reads the config and the group once per call: for 100 jobs, one HGETALL and one
/// XINFO GROUPS, and one XADD a job (no routine `queued` event by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_reads_config_and_group_once_per_call() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    p.enqueue_json("{}", &EnqueueOptions::default())
        .await
        .unwrap();
    let batch = vec![payload_of(200); 100];
    reset_stats(&s).await;
    p.enqueue_batch(&batch).await.unwrap();
    let c = calls(&s).await;
    assert_eq!(
        (c["fcall"], c["hgetall"], c["xinfo|groups"], c["xadd"]),
        (1, 1, 1, 100),
        "{c:?}"
    );
    eprintln!("commands per job, batch of 100: {c:?}");
}

/// Positions of a batch are 1..N across the calls it is cut into; enqueueing the same ids
/// again answers the existing jobs (created false, their positions), also for an id given
/// twice in one batch; a payload that is not JSON refuses the batch before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_positions_are_one_to_n_and_known_ids_answer_created_false() {
    const N: usize = 250;
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let jobs: Vec<(String, EnqueueOptions)> = (0..N)
        .map(|i| {
            let id = (i % 3 == 0).then(|| format!("job-{i}"));
            (
                json!({ "i": i }).to_string(),
                EnqueueOptions {
                    id,
                    ..EnqueueOptions::default()
                },
            )
        })
        .collect();
    let first = p.enqueue_batch_with(&jobs).await.unwrap();
    let positions: Vec<u64> = first.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=N as u64).collect::<Vec<_>>());
    assert!(first
        .iter()
        .all(|e| e.created && e.state == JobState::Waiting));
    for k in [0, 99, 100, 101, 249] {
        let st = p.status(&first[k].id).await.unwrap();
        assert_eq!(st.position, Some(k as u64 + 1), "status of job {k}");
    }

    let again = p.enqueue_batch_with(&jobs).await.unwrap();
    for (k, (e, before)) in again.iter().zip(&first).enumerate() {
        if k % 3 == 0 {
            assert_eq!(
                (e.id.as_str(), e.created, e.position),
                (before.id.as_str(), false, k as u64 + 1),
                "known id {k}"
            );
        } else {
            assert!(e.created, "job {k} without id is new");
        }
    }
    let new: Vec<u64> = again
        .iter()
        .filter(|e| e.created)
        .map(|e| e.position)
        .collect();
    assert_eq!(
        new,
        (N as u64 + 1..=N as u64 + new.len() as u64).collect::<Vec<_>>()
    );

    let twice = p
        .enqueue_batch_with(&[
            (
                "{}".into(),
                EnqueueOptions {
                    id: Some("twin".into()),
                    ..EnqueueOptions::default()
                },
            ),
            (
                "{}".into(),
                EnqueueOptions {
                    id: Some("twin".into()),
                    ..EnqueueOptions::default()
                },
            ),
        ])
        .await
        .unwrap();
    assert!(twice[0].created && !twice[1].created, "{twice:?}");
    assert_eq!(twice[0].position, twice[1].position);

    let len = |s: &Stack| {
        let mut c = s.conn();
        async move {
            redis::cmd("XLEN")
                .arg(QueueKeys::new("q").unwrap().stream())
                .query_async::<u64>(&mut c)
                .await
                .unwrap()
        }
    };
    let before = len(&s).await;
    let err = p
        .enqueue_batch(&["{}".into(), "{\"a\":".into(), "{}".into()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("job 2 of 3") && text.contains("payload is not valid JSON"),
        "{text}"
    );
    assert_eq!(len(&s).await, before, "nothing was sent");
}

/// fleetq_enqueue_batch checks every job before it writes: a bad job refuses the call, naming
/// its place, and nothing is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_function_refuses_a_bad_job_before_it_writes() {
    let s = Stack::start().await;
    let keys = QueueKeys::new("q").unwrap();
    let mut c = s.conn();
    for (args, want) in [
        (
            vec!["0", "{}", "1", "{}", "colour", "red"],
            "job 2 (ARGV[3]): unknown field",
        ),
        (
            vec!["0", "{}", "x", "{}"],
            "job 2 (ARGV[3]): expected the number",
        ),
        (vec!["0", "{}", "2", "{}", "id", "a"], "announces 2 pairs"),
        (vec!["0", ""], "job 1 (ARGV[1]): payload is missing"),
    ] {
        let mut cmd = fcall("fleetq_enqueue_batch", &keys);
        for a in &args {
            cmd.arg(*a);
        }
        let err = cmd.query_async::<redis::Value>(&mut c).await.unwrap_err();
        assert!(err.to_string().contains(want), "{args:?}: {err}");
    }
    let exists: bool = redis::cmd("EXISTS")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(!exists, "nothing was written");
    // A good call answers per job, as fleetq_enqueue does.
    let mut cmd = fcall("fleetq_enqueue_batch", &keys);
    cmd.arg(0).arg("{}").arg(1).arg("{}").arg("id").arg("b");
    let reply: Vec<(String, String, u64, u8)> = cmd.query_async(&mut c).await.unwrap();
    assert_eq!(reply[1], ("b".into(), "waiting".into(), 2, 1));
}

/// Positions stay exact and O(1) (no XRANGE) when Redis cannot tell the lag: a job still
/// running ahead of one that finished. Status positions move as workers read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_are_exact_when_the_lag_is_unknown() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let mut c = s.conn();
    let mut ids = Vec::new();
    for k in 0..4 {
        ids.push(
            p.enqueue_json("{}", &with_id(format!("j{k}")))
                .await
                .unwrap()
                .id,
        );
    }
    let entry = |id: &str| {
        let mut c = s.conn();
        let key = keys.job(id);
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg("entry")
                .query_async::<String>(&mut c)
                .await
                .unwrap()
        }
    };
    let second = entry(&ids[1]).await;
    let read = |n: usize| {
        let mut c = s.conn();
        let stream = keys.stream();
        async move {
            let _: redis::Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("workers")
                .arg("w1")
                .arg("COUNT")
                .arg(n)
                .arg("STREAMS")
                .arg(stream)
                .arg(">")
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    read(2).await;
    // The second finished; the first still runs.
    let _: () = redis::pipe()
        .cmd("XACK")
        .arg(keys.stream())
        .arg("workers")
        .arg(&second)
        .ignore()
        .cmd("XDEL")
        .arg(keys.stream())
        .arg(&second)
        .ignore()
        .query_async(&mut c)
        .await
        .unwrap();
    reset_stats(&s).await;
    let e = p.enqueue_json("{}", &with_id("j4")).await.unwrap();
    assert_eq!(e.position, 3);
    ids.push(e.id);
    for (k, want) in [(2, 1), (3, 2), (4, 3)] {
        assert_eq!(p.status(&ids[k]).await.unwrap().position, Some(want));
    }
    read(1).await;
    assert_eq!(p.status(&ids[3]).await.unwrap().position, Some(1));
    assert_eq!(p.status(&ids[4]).await.unwrap().position, Some(2));
    let c = calls(&s).await;
    assert!(
        !c.contains_key("xrange"),
        "positions walked the stream: {c:?}"
    );
}

/// A group made without a counter (as a worker makes it) and never delivered: enqueue
/// positions are exact at once; jobs added after the first delivery carry `seq` and are
/// O(1) again; the earlier ones are counted, and right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_before_and_after_the_first_delivery_of_a_group_without_counter() {
    let s = Stack::start().await;
    s.create_group("q").await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let mut ids = Vec::new();
    for k in 1..=3u64 {
        let e = p
            .enqueue_json("{}", &with_id(format!("j{k}")))
            .await
            .unwrap();
        assert_eq!(e.position, k);
        ids.push(e.id);
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let e = p.enqueue_json("{}", &with_id("j4")).await.unwrap();
    assert_eq!(e.position, 3);
    ids.push(e.id);
    reset_stats(&s).await;
    assert_eq!(p.status(&ids[3]).await.unwrap().position, Some(3));
    assert!(!calls(&s).await.contains_key("xrange"), "O(1) with seq");
    assert_eq!(p.status(&ids[1]).await.unwrap().position, Some(1));
    assert_eq!(p.status(&ids[2]).await.unwrap().position, Some(2));
}

/// Plain XADDs before any worker or fleetq enqueue: the first fleetq_enqueue makes the group
/// with the counter Redis knows, so its job and later ones have exact O(1) positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_enqueue_after_plain_xadds_makes_the_group_with_its_counter() {
    let s = Stack::start().await;
    let keys = QueueKeys::new("q").unwrap();
    let mut c = s.conn();
    for _ in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(keys.stream())
            .arg("*")
            .arg("payload")
            .arg("{}")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let p = s.producer("q").await;
    let e = p.enqueue_json("{}", &with_id("fleetq")).await.unwrap();
    assert_eq!(e.position, 4);
    reset_stats(&s).await;
    assert_eq!(p.status(&e.id).await.unwrap().position, Some(4));
    assert!(!calls(&s).await.contains_key("xrange"));
}

/// The functions do not parse payloads: a text that is not JSON, sent with FCALL by a
/// producer of another language, is queued, and the worker dead-letters it as malformed with
/// the parser's reason. The Rust producer refuses it before sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_json_is_the_workers_to_dead_letter() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let err = p
        .enqueue_json("{oops", &EnqueueOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("payload is not valid JSON"),
        "{err}"
    );
    let (id, state, _, _): (String, String, u64, u8) = fcall("fleetq_enqueue", &keys)
        .arg("{oops")
        .arg("id")
        .arg("foreign")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(state, "waiting");
    let w = s.worker(
        worker_config("q", "n1", 1),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    let st = p.wait(&id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(st.state, JobState::Dead, "{st:?}");
    assert!(
        st.error.unwrap_or_default().contains("not valid JSON"),
        "the reason names the payload"
    );
    w.stop().await;
}

/// A job with a queue timeout of its own (none in the queue's config) expires with no
/// worker alive, found through the deadline index, with and without an id; its waiter is
/// woken; a job without a timeout keeps waiting; a job taken before its deadline is left
/// alone and its index member dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_queue_timeout_expires_with_no_worker_alive() {
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let timeout = |id: Option<&str>| EnqueueOptions {
        id: id.map(str::to_owned),
        queue_timeout: Some(Duration::from_millis(200)),
        ..EnqueueOptions::default()
    };
    let taken = p
        .enqueue(&json!({}), &timeout(Some("taken")))
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("w1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.stream())
        .arg(">")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let named = p
        .enqueue(&json!({}), &timeout(Some("named")))
        .await
        .unwrap();
    let plain = p.enqueue(&json!({}), &timeout(None)).await.unwrap();
    let keep = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    let waiter = {
        let (p, id) = (p.clone(), named.id.clone());
        tokio::spawn(async move { p.wait(&id, Duration::from_secs(20)).await.unwrap() })
    };
    let indexed: u64 = redis::cmd("ZCARD")
        .arg(keys.deadlines())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(indexed, 3, "the jobs with a timeout, not the one without");
    eventually(Duration::from_secs(10), "two jobs expired", || async {
        maintenance::tick(&s.redis, &keys).await.unwrap();
        s.stat("q", "expired").await == 2
    })
    .await;
    let woken = waiter.await.unwrap();
    assert_eq!(woken.state, JobState::Expired);
    assert!(woken
        .error
        .unwrap()
        .contains("queue timeout: not started within 200 ms"));
    assert_eq!(p.status(&plain.id).await.unwrap().state, JobState::Expired);
    assert_eq!(p.status(&keep.id).await.unwrap().state, JobState::Waiting);
    assert_ne!(p.status(&taken.id).await.unwrap().state, JobState::Expired);
    assert_eq!(s.stat("q", "tombstones").await, 2);
    let left: u64 = redis::cmd("ZCARD")
        .arg(keys.deadlines())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(left, 0, "due members are removed, the taken one's too");
}

/// fleetq_expire on a backlog of 10 000 waiting jobs without any queue timeout reads no
/// entry (no XRANGE at all). With a queue timeout set in the config, it reads each entry
/// added since its previous call once — the 10 000 over ten calls of 1000, then none — and
/// indexes those not yet due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_reads_nothing_of_a_backlog_without_queue_timeouts() {
    const N: usize = 10_000;
    let s = Stack::start().await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    let batch = vec!["{}".to_owned(); 1000];
    for _ in 0..N / 1000 {
        p.enqueue_batch(&batch).await.unwrap();
    }
    let expire = |s: &Stack| {
        let mut c = s.conn();
        let keys = keys.clone();
        async move {
            fcall("fleetq_expire", &keys)
                .arg(1000)
                .query_async::<(u64, u64)>(&mut c)
                .await
                .unwrap()
        }
    };
    reset_stats(&s).await;
    assert_eq!(expire(&s).await, (0, 0));
    let c = calls(&s).await;
    assert!(!c.contains_key("xrange"), "expire read entries: {c:?}");

    s.configure(
        "q",
        &QueueConfig {
            queue_timeout: Some(Duration::from_secs(86_400)),
            ..QueueConfig::default()
        },
    )
    .await;
    let mut read = 0;
    for _ in 0..N / 1000 {
        let (ended, scanned) = expire(&s).await;
        assert_eq!((ended, scanned), (0, 1000));
        read += scanned;
    }
    assert_eq!(read, N as u64);
    assert_eq!(expire(&s).await, (0, 0), "each entry is read once");
    let indexed: u64 = redis::cmd("ZCARD")
        .arg(keys.deadlines())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(indexed, N as u64);
}

/// A large payload of a job without options goes around the functions (Redis 7.0's Lua would
/// hash every byte of it): a plain XADD in one MULTI with the group's counters, after a
/// check of its size. It waits in line like any job (its position exact, one to n in a batch
/// after the jobs ahead), runs, and is refused over the queue's limit with the functions'
/// message and nothing added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_payload_goes_around_the_functions_and_waits_in_line() {
    let s = Stack::start().await;
    let p = s.producer("big").await;
    let keys = QueueKeys::new("big").unwrap();
    let small = p
        .enqueue_json("{}", &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(small.position, 1);
    let large = payload_of(1_000_000);
    reset_stats(&s).await;
    let one = p
        .enqueue_json(&large, &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (one.state, one.position, one.created),
        (JobState::Waiting, 2, true)
    );
    let ran = calls(&s).await;
    assert_eq!(ran.get("fcall"), Some(&1), "one size check: {ran:?}");
    assert_eq!(ran.get("xadd"), Some(&1), "{ran:?}");
    assert_eq!(ran.get("multi"), Some(&1), "{ran:?}");
    // A batch: the large ones in order with the small one between them.
    let batch = vec![large.clone(), "{}".to_owned(), large.clone(), large.clone()];
    let done = p.enqueue_batch(&batch).await.unwrap();
    let positions: Vec<u64> = done.iter().map(|e| e.position).collect();
    assert_eq!(positions, vec![3, 4, 5, 6]);
    let st = p.status(&one.id).await.unwrap();
    assert_eq!(
        (st.state, st.position),
        (JobState::Waiting, Some(2)),
        "{st:?}"
    );
    // Over the limit: refused with the functions' words, nothing added.
    let mut c = s.conn();
    let _: () = redis::cmd("HSET")
        .arg(keys.config())
        .arg("max_payload_bytes")
        .arg(500_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let before: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    let err = p
        .enqueue_json(&large, &EnqueueOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Rejected(m) if m.contains("over the queue limit of 500000")),
        "{err}"
    );
    let after: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(before, after, "nothing was added");
    let _: () = redis::cmd("HDEL")
        .arg(keys.config())
        .arg("max_payload_bytes")
        .query_async(&mut c)
        .await
        .unwrap();
    // A worker runs them all, the large payloads whole.
    let w = s.worker(
        worker_config("big", "n1", 4),
        FnHandler::new(|job, _| async move {
            Outcome::Succeeded(json!({ "bytes": job.payload.to_string().len() }))
        }),
    );
    for e in std::iter::once(&one).chain(&done) {
        let st = p.wait(&e.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    }
    let st = p.status(&one.id).await.unwrap();
    assert_eq!(
        st.result,
        Some(json!({ "bytes": large.len() })),
        "the payload arrived whole"
    );
    w.stop().await;
}
