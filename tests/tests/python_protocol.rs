//! A producer and a worker in Python, written from docs/protocol.md alone (tests/python), work
//! beside the real `fleetq-worker` and the Rust producer: jobs cross both ways, a graceful stop
//! gives held jobs back, and a worker of either kind killed mid-job is reclaimed by the other,
//! each job succeeding exactly once. So the document is complete enough to build both from.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetq_broker::producer::EnqueueOptions;
use fleetq_broker::{JobState, QueueKeys};
use fleetq_tests::{bin_path, eventually, quick_queue_config, send_signal, Stack, LOG_TAIL_LINES};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn python_ready() {
    fleetq_tests::require_python_redis();
}

/// A worker process (Python or `fleetq-worker`) with its log, killed when dropped.
struct Proc {
    child: Child,
    name: String,
    log: tempfile::NamedTempFile,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command) -> Self {
        let log = tempfile::Builder::new()
            .prefix(&format!("python-protocol-{name}-"))
            .suffix(".log")
            .tempfile()
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// The Python worker of tests/python on `queue` as `node`.
    fn python(url: &str, queue: &str, node: &str, slots: usize) -> Self {
        let mut cmd = Command::new("python3");
        cmd.arg(repo("tests/python/worker.py"))
            .args(["--queue", queue, "--node", node])
            .args(["--slots", &slots.to_string(), "--heartbeat-secs", "1"])
            .env("REDIS_URL", url)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        Self::spawn(node, cmd)
    }

    /// The real `fleetq-worker` binary on `queue` as `node`, with `extra` flags.
    fn fleetq(url: &str, queue: &str, node: &str, extra: &[&str]) -> Self {
        let mut cmd = Command::new(bin_path("fleetq-worker"));
        cmd.args(["--redis-url", url, "--queue", queue, "--node", node])
            .args(["--metrics-addr", "off", "--shutdown-grace-secs", "1"])
            .args(extra)
            .env("RUST_LOG", "info");
        Self::spawn(node, cmd)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last {LOG_TAIL_LINES} lines of {}'s log ---\n{}",
                self.name,
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs tests/python/producer.py with `args`; its JSON output.
async fn producer(url: &str, args: &[&str]) -> Value {
    fleetq_tests::run_python_json(
        repo("tests/python/producer.py"),
        args.iter().map(|a| (*a).to_owned()).collect(),
        url.to_owned(),
    )
    .await
}

/// `fleetq_status` of job `id` as a map.
async fn status(s: &Stack, queue: &str, id: &str) -> HashMap<String, String> {
    let flat: Vec<String> = redis::cmd("FCALL_RO")
        .arg("fleetq_status")
        .arg(1)
        .arg(QueueKeys::new(queue).unwrap().stream())
        .arg(id)
        .query_async(&mut s.conn())
        .await
        .unwrap();
    flat.chunks(2)
        .map(|kv| (kv[0].clone(), kv[1].clone()))
        .collect()
}

async fn node_record(s: &Stack, node: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("fleetq:node:{node}"))
        .query_async(&mut s.conn())
        .await
        .unwrap()
}

/// Waits until job `id` runs on `node`.
async fn running_on(s: &Stack, queue: &str, id: &str, node: &str) {
    eventually(WAIT, &format!("job {id} running on {node}"), || async {
        let st = status(s, queue, id).await;
        st.get("state").map(String::as_str) == Some("running")
            && st.get("node").map(String::as_str) == Some(node)
    })
    .await;
}

fn history(st: &HashMap<String, String>) -> Vec<Value> {
    serde_json::from_str(st.get("history").map_or("[]", String::as_str)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_jobs_run_on_a_fleetq_worker() {
    python_ready();
    let s = Stack::start().await;
    let url = s.server.url();
    let q = "pyprod";

    // Before any worker takes it, a plain XADD with an `id` is known by that id to nothing.
    let x = producer(
        &url,
        &[
            "xadd",
            "--queue",
            q,
            "--payload",
            r#"{"n":1}"#,
            "--id",
            "px-1",
        ],
    )
    .await;
    assert_eq!(x["job_id"], "px-1");
    let st = producer(&url, &["status", "--queue", q, "px-1"]).await;
    assert_eq!(st["state"], "not_found");
    let c = producer(&url, &["cancel", "--queue", q, "px-1"]).await;
    assert_eq!(c["state"], "not_found");
    // A later fleetq_enqueue of that id is a second job, behind the plain entry; it is the one
    // that runs, and the plain entry is dropped as a duplicate when a worker reaches it.
    let e = producer(
        &url,
        &[
            "enqueue",
            "--queue",
            q,
            "--payload",
            r#"{"n":2}"#,
            "--id",
            "px-1",
        ],
    )
    .await;
    assert_eq!(
        (e["created"].as_i64(), e["state"].as_str()),
        (Some(1), Some("waiting"))
    );
    assert_eq!(e["position"], 2, "{e}");
    // A scheduled job, cancelled before it is due.
    let d = producer(
        &url,
        &[
            "enqueue",
            "--queue",
            q,
            "--payload",
            "{}",
            "--id",
            "later-1",
            "--delay-ms",
            "60000",
        ],
    )
    .await;
    assert_eq!(d["state"], "scheduled");
    let c = producer(&url, &["cancel", "--queue", q, "later-1"]).await;
    assert_eq!(c["state"], "cancelled");

    let _w = Proc::fleetq(&url, q, "rust-1", &["--slots", "2"]);
    let fin = producer(&url, &["wait", "--queue", q, "px-1", "--timeout", "30"]).await;
    assert_eq!(fin["state"], "succeeded", "{fin}");
    assert_eq!(fin["result"]["echo"]["n"], 2, "{fin}");
    assert_eq!(fin["result"]["node"], "rust-1");
    eventually(
        WAIT,
        "the plain px-1 entry dropped as a duplicate",
        || async { s.stat(q, "duplicates").await == 1 },
    )
    .await;
    // The same id again: nothing added, the job as it is.
    let again = producer(
        &url,
        &[
            "enqueue",
            "--queue",
            q,
            "--payload",
            r#"{"n":3}"#,
            "--id",
            "px-1",
        ],
    )
    .await;
    assert_eq!(
        (again["created"].as_i64(), again["state"].as_str()),
        (Some(0), Some("succeeded"))
    );

    // A plain XADD without an id, and an enqueue with one, each waited for with BLPOP.
    let x = producer(
        &url,
        &[
            "xadd",
            "--queue",
            q,
            "--payload",
            r#"{"prompt":"a red fox"}"#,
            "--wait",
            "30",
        ],
    )
    .await;
    assert_eq!(x["job_id"], x["entry_id"]);
    assert_eq!(x["final"]["state"], "succeeded", "{x}");
    assert_eq!(x["final"]["result"]["echo"]["prompt"], "a red fox");
    let e = producer(
        &url,
        &[
            "enqueue",
            "--queue",
            q,
            "--payload",
            r#"{"k":"v"}"#,
            "--id",
            "order-9",
            "--wait",
            "30",
        ],
    )
    .await;
    assert_eq!(e["final"]["state"], "succeeded", "{e}");
    assert_eq!(e["final"]["result"]["echo"]["k"], "v");
    assert_eq!(s.stat(q, "succeeded").await, 3);
    assert_eq!(status(&s, q, "later-1").await["state"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_producer_jobs_run_on_the_python_worker() {
    python_ready();
    let s = Stack::start().await;
    let url = s.server.url();
    let q = "pywork";
    s.configure(q, &quick_queue_config()).await;
    let mut w = Proc::python(&url, q, "py-1", 2);
    eventually(WAIT, "the Python worker's node record", || async {
        let rec = node_record(&s, "py-1").await;
        rec.get("slots").map(String::as_str) == Some("2")
            && rec.get("consumer").is_some_and(|c| c.starts_with("py-1:"))
            && rec.contains_key("ttl_ms")
            && rec.contains_key("last_seen_ms")
    })
    .await;

    let p = s.producer(q).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let opts = EnqueueOptions {
            id: (i % 2 == 0).then(|| format!("r-{i}")),
            ..EnqueueOptions::default()
        };
        ids.push(p.enqueue(&json!({ "i": i }), &opts).await.unwrap().id);
    }
    let plain: String = redis::cmd("XADD")
        .arg(QueueKeys::new(q).unwrap().stream())
        .arg("*")
        .arg("payload")
        .arg(r#"{"i":"plain"}"#)
        .query_async(&mut s.conn())
        .await
        .unwrap();
    ids.push(plain);
    for id in &ids {
        let st = p.wait(id, WAIT).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{id}: {st:?}\n{}", w.log());
        let result = st.result.unwrap();
        assert_eq!(result["node"], "py-1");
        assert_eq!(st.nodes, vec!["py-1".to_owned()]);
    }
    let last = p.wait("r-0", WAIT).await.unwrap();
    assert_eq!(last.result.unwrap()["echo"]["i"], 0);

    // A malformed plain XADD is dead-lettered, never run.
    let bad: String = redis::cmd("XADD")
        .arg(QueueKeys::new(q).unwrap().stream())
        .arg("*")
        .arg("payload")
        .arg("{nope")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let st = p.wait(&bad, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(
        st.fields.get("reason").map(String::as_str),
        Some("malformed")
    );

    // Progress while running, then a cancel that the worker hears at its next renewal.
    let opts = EnqueueOptions {
        id: Some("long-1".into()),
        ..EnqueueOptions::default()
    };
    p.enqueue(&json!({ "py_sleep_ms": 60000 }), &opts)
        .await
        .unwrap();
    running_on(&s, q, "long-1", "py-1").await;
    eventually(WAIT, "a progress report of long-1", || async {
        status(&s, q, "long-1").await.contains_key("progress")
    })
    .await;
    assert_eq!(p.cancel("long-1").await.unwrap(), JobState::Cancelling);
    let st = p.wait("long-1", WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Cancelled, "{st:?}");

    // A graceful stop gives a running job back at once, without counting its attempt, and
    // leaves no node record or consumer behind.
    let opts = EnqueueOptions {
        id: Some("long-2".into()),
        ..EnqueueOptions::default()
    };
    p.enqueue(&json!({ "py_sleep_ms": 60000 }), &opts)
        .await
        .unwrap();
    running_on(&s, q, "long-2", "py-1").await;
    send_signal(w.child.id(), libc::SIGTERM);
    assert_eq!(w.wait_exit(WAIT).await, Some(0), "{}", w.log());
    let st = status(&s, q, "long-2").await;
    assert_eq!(st["state"], "waiting", "{st:?}");
    assert_eq!(st["attempts"], "0");
    assert!(node_record(&s, "py-1").await.is_empty());
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(QueueKeys::new(q).unwrap().stream())
        .arg("workers")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert!(consumers.is_empty(), "{consumers:?}");
    assert_eq!(s.stat(q, "released").await, 1);
    // Another worker takes it at once.
    let _r = Proc::fleetq(&url, q, "rust-1", &[]);
    let st = p.wait("long-2", WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(st.nodes, vec!["py-1".to_owned(), "rust-1".to_owned()]);
    assert_eq!(st.attempts, 1);
}

/// Checks that job `id` succeeded exactly once, on `winner`, after a lease timeout of `loser`.
async fn reclaimed_once(s: &Stack, q: &str, id: &str, loser: &str, winner: &str) {
    let p = s.producer(q).await;
    let st = p.wait(id, WAIT).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    assert_eq!(st.result.as_ref().unwrap()["node"], winner);
    assert_eq!(st.nodes, vec![loser.to_owned(), winner.to_owned()]);
    let full = status(s, q, id).await;
    let h = history(&full);
    assert_eq!(h.len(), 2, "{h:?}");
    assert_eq!(
        (h[0]["node"].as_str(), h[0]["timeout"].as_str()),
        (Some(loser), Some("lease"))
    );
    assert_eq!(
        (h[1]["node"].as_str(), h[1]["outcome"].as_str()),
        (Some(winner), Some("succeeded"))
    );
    assert_eq!(s.stat(q, "succeeded").await, 1);
    assert_eq!(s.stat(q, "fenced").await, 0);
    assert_eq!(s.stat(q, "reclaimed").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_between_python_and_fleetq_workers_both_ways() {
    python_ready();
    let s = Stack::start().await;
    let url = s.server.url();

    // A fleetq-worker killed mid-job: the Python worker reclaims the job and finishes it.
    let q = "pyreclaim1";
    s.configure(q, &quick_queue_config()).await;
    let child = format!("python3 {}", repo("examples/python/sim_gpu.py").display());
    let mut rust = Proc::fleetq(
        &url,
        q,
        "rust-k",
        &["--slots", "1", "--executor", "process", "--command", &child],
    );
    let opts = EnqueueOptions {
        id: Some("job-a".into()),
        ..EnqueueOptions::default()
    };
    let p = s.producer(q).await;
    p.enqueue(&json!({ "steps": 600, "step_ms": 50 }), &opts)
        .await
        .unwrap();
    running_on(&s, q, "job-a", "rust-k").await;
    let _py = Proc::python(&url, q, "py-r", 1);
    send_signal(rust.child.id(), libc::SIGKILL);
    rust.wait_exit(WAIT).await;
    reclaimed_once(&s, q, "job-a", "rust-k", "py-r").await;

    // A Python worker killed mid-job: a fleetq-worker reclaims it.
    let q = "pyreclaim2";
    s.configure(q, &quick_queue_config()).await;
    let mut py = Proc::python(&url, q, "py-k", 1);
    let opts = EnqueueOptions {
        id: Some("job-b".into()),
        ..EnqueueOptions::default()
    };
    let p = s.producer(q).await;
    p.enqueue(&json!({ "py_sleep_ms": 60000 }), &opts)
        .await
        .unwrap();
    running_on(&s, q, "job-b", "py-k").await;
    let _rust = Proc::fleetq(&url, q, "rust-r", &["--slots", "1"]);
    send_signal(py.child.id(), libc::SIGKILL);
    py.wait_exit(WAIT).await;
    reclaimed_once(&s, q, "job-b", "py-k", "rust-r").await;
}
