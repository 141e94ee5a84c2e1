//! The `fleetq` CLI as a person or a script uses it: every command against a live queue, the
//! error cases with their exit codes and messages, and the demo from a clean environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use fleetq_broker::QueueKeys;
use fleetq_tests::{bin_path, eventually, worker_config, FnHandler, Stack};
use fleetq_worker::Outcome;
use serde_json::{json, Value};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", self.stdout, self.stderr))
    }
}

async fn fleetq(url: Option<&str>, args: &[&str]) -> Run {
    let bin = bin_path("fleetq");
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let url = url.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .env_remove("REDIS_URL")
            .env_remove("RUST_LOG");
        if let Some(url) = url {
            cmd.env("REDIS_URL", url);
        }
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_from_a_clean_environment_exits_0_and_its_summary_adds_up() {
    let r = fleetq(None, &["demo", "--json"]).await;
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let s = r.json();
    let jobs = s["jobs"].as_u64().unwrap();
    let outcomes: u64 = s["outcomes"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(outcomes, jobs);
    assert_eq!(s["outcomes"]["succeeded"].as_u64(), Some(jobs));
    let per_node: u64 = s["per_node"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(per_node, jobs, "every success is attributed to one node");
    assert_eq!(s["exactly_once"], true);
    assert!(
        s["timeouts"]["progress"].as_u64().unwrap() >= 1,
        "the hanging node timed out"
    );
    assert!(
        s["reclaims"].as_u64().unwrap() >= 1,
        "the dead host's job was reclaimed"
    );
    assert!(s["suspended_nodes"].as_array().unwrap().len() >= 2);
    assert!(s["wait_ms"]["p95"].as_u64().unwrap() >= s["wait_ms"]["p50"].as_u64().unwrap());
    assert!(s["duration_s"].as_f64().unwrap() < 60.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_against_a_live_queue() {
    let s = Stack::start().await;
    let url = s.server.url();
    let u = Some(url.as_str());

    // enqueue
    let r = fleetq(
        u,
        &[
            "enqueue",
            "images",
            r#"{"prompt":"fox"}"#,
            "--id",
            "job-1",
            "--json",
        ],
    )
    .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.json()["id"], "job-1");
    assert_eq!(r.json()["position"], 1);
    let r = fleetq(
        u,
        &["enqueue", "images", r#"{"prompt":"fox"}"#, "--id", "job-1"],
    )
    .await;
    assert!(r.stdout.contains("already known"), "{}", r.stdout);

    // status (queue found by itself) and watch need a worker for the end.
    let r = fleetq(u, &["status", "job-1", "--json"]).await;
    assert_eq!(
        (r.code, r.json()["state"].as_str()),
        (Some(0), Some("waiting"))
    );
    let w = s.worker(
        worker_config("images", "gpu-1", 1),
        FnHandler::new(|job, _| async move {
            if job.payload["fail"] == true {
                Outcome::Fail("bad prompt".into())
            } else {
                Outcome::Succeeded(json!({"image": "fox.png"}))
            }
        }),
    );
    let r = fleetq(u, &["watch", "job-1", "--queue", "images", "--json"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.json()["result"]["image"], "fox.png");
    let r = fleetq(u, &["enqueue", "images", r#"{"prompt":"owl"}"#, "--wait"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("succeeded") && r.stdout.contains("fox.png"),
        "{}",
        r.stdout
    );
    let r = fleetq(
        u,
        &["enqueue", "images", r#"{"fail":true}"#, "--wait", "--json"],
    )
    .await;
    assert_eq!(r.code, Some(1), "a job that fails exits 1: {}", r.stderr);
    assert_eq!(r.json()["state"], "failed");
    assert!(r.stderr.contains("bad prompt"));

    // queues and nodes
    let r = fleetq(u, &["queues", "--json"]).await;
    let q = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "images")
        .cloned()
        .unwrap();
    assert_eq!(q["stats"]["succeeded"], 2);
    let r = fleetq(u, &["queues"]).await;
    assert!(
        r.stdout.contains("images") && r.stdout.contains("waiting"),
        "{}",
        r.stdout
    );
    eventually(Duration::from_secs(10), "node listed", || async {
        fleetq(u, &["nodes", "--json"])
            .await
            .json()
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await;
    let r = fleetq(u, &["nodes"]).await;
    assert!(
        r.stdout.contains("gpu-1") && r.stdout.contains("live"),
        "{}",
        r.stdout
    );
    let r = fleetq(u, &["nodes", "suspend", "gpu-1", "--for-secs", "60"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let r = fleetq(u, &["nodes", "resume", "gpu-1", "--json"]).await;
    assert_eq!(r.json()["resumed"], true);
    let r = fleetq(u, &["nodes", "suspend", "gpu-404"]).await;
    assert_eq!(r.code, Some(4));
    assert!(
        r.stderr.contains("no live node \"gpu-404\""),
        "{}",
        r.stderr
    );
    w.stop().await;

    // dead letters
    let keys = QueueKeys::new("images").unwrap();
    let _: String = redis::cmd("XADD")
        .arg(keys.dead())
        .arg("*")
        .arg("job")
        .arg("j9")
        .arg("reason")
        .arg("poison")
        .arg("error")
        .arg("boom")
        .arg("attempts")
        .arg(3)
        .arg("nodes")
        .arg("a,b,c")
        .arg("f:payload")
        .arg("{}")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let r = fleetq(u, &["dead", "images", "list", "--json"]).await;
    let dead_id = r.json()[0]["dead_id"].as_str().unwrap().to_owned();
    let r = fleetq(u, &["dead", "images", "list"]).await;
    assert!(
        r.stdout.contains("poison") && r.stdout.contains("a,b,c"),
        "{}",
        r.stdout
    );
    let r = fleetq(u, &["dead", "images", "show", &dead_id]).await;
    assert!(r.stdout.contains("boom"), "{}", r.stdout);
    let r = fleetq(u, &["dead", "images", "retry", &dead_id, "--json"]).await;
    assert_eq!(r.json()["job"], "j9");
    let r = fleetq(u, &["dead", "images", "retry", &dead_id]).await;
    assert_eq!(r.code, Some(4));
    let r = fleetq(u, &["dead", "images", "purge", "--json"]).await;
    assert_eq!(r.json()["purged"], 0);

    // top, once
    let r = fleetq(u, &["top", "--iterations", "1"]).await;
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("images"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_what_to_do_and_exit_with_their_codes() {
    let s = Stack::start().await;
    let url = s.server.url();
    let u = Some(url.as_str());
    let r = fleetq(u, &["enqueue", "images", "{\"prompt\": oops}"]).await;
    assert_eq!(r.code, Some(5));
    assert!(
        r.stderr.contains("not valid JSON") && r.stderr.contains("column"),
        "{}",
        r.stderr
    );
    let r = fleetq(u, &["enqueue", "bad:queue", "{}"]).await;
    assert_eq!(r.code, Some(5));
    assert!(r.stderr.contains("invalid queue name"), "{}", r.stderr);
    let r = fleetq(u, &["status", "no-such-job"]).await;
    assert_eq!(r.code, Some(4));
    assert!(r.stderr.contains("no job \"no-such-job\""), "{}", r.stderr);
    let r = fleetq(u, &["dead", "nope", "list"]).await;
    assert_eq!(r.code, Some(4));
    assert!(
        r.stderr.contains("queue \"nope\" not found"),
        "{}",
        r.stderr
    );
    let r = fleetq(u, &["enqueue"]).await;
    assert_eq!(r.code, Some(2), "usage errors exit 2");
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r = fleetq(Some(&format!("redis://127.0.0.1:{dead_port}")), &["queues"]).await;
    assert_eq!(r.code, Some(3));
    assert!(
        r.stderr.contains(&format!(
            "cannot connect to Redis at redis://127.0.0.1:{dead_port}"
        )),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("redis-server"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("Error {") && !r.stderr.contains("kind:"),
        "no debug dump: {}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_help_with_examples() {
    for cmd in [
        "demo",
        "enqueue",
        "status",
        "watch",
        "cancel",
        "queues",
        "nodes",
        "dead",
        "top",
        "functions",
        "partitions",
    ] {
        let r = fleetq(None, &[cmd, "--help"]).await;
        assert_eq!(r.code, Some(0), "{cmd}");
        assert!(
            r.stdout.contains("Examples:"),
            "{cmd} --help has no examples:\n{}",
            r.stdout
        );
    }
    // Each command lists only its own flags.
    let status = fleetq(None, &["status", "--help"]).await;
    assert!(
        !status.stdout.contains("--timeout-secs"),
        "{}",
        status.stdout
    );
    let watch = fleetq(None, &["watch", "--help"]).await;
    assert!(watch.stdout.contains("--timeout-secs"), "{}", watch.stdout);
}

/// `cancel` by id alone, `top --json` as one JSON object, `watch` and `enqueue --wait` on a
/// queue split in partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_top_json_and_a_split_queue() {
    let s = Stack::start().await;
    let url = s.server.url();
    let p = s.producer("later").await;
    // A waiting job (no worker reads this queue).
    let e = p
        .enqueue(&json!({}), &fleetq_broker::EnqueueOptions::default())
        .await
        .unwrap();
    let r = fleetq(Some(&url), &["cancel", &e.id, "--json"]).await;
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["state"], "cancelled", "{}", r.stdout);
    assert_eq!(r.json()["queue"], "later");
    let r = fleetq(Some(&url), &["cancel", "no-such-job"]).await;
    assert_eq!(r.code, Some(4), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("no job"), "{}", r.stderr);

    let r = fleetq(Some(&url), &["top", "--json", "--iterations", "1"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        !r.stdout.contains('\x1b'),
        "screen codes in JSON: {:?}",
        r.stdout
    );
    let top = r.json();
    assert!(top["queues"].is_array() && top["nodes"].is_array(), "{top}");

    let r = fleetq(Some(&url), &["partitions", "split", "3", "--json"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        r.json()["streams"],
        json!(["split#0", "split#1", "split#2"])
    );
    let r = fleetq(Some(&url), &["partitions", "split", "65"]).await;
    assert_eq!(r.code, Some(5), "{}", r.stderr);
    assert!(r.stderr.contains("at most 64"), "{}", r.stderr);
    let worker = s.worker(
        worker_config("split", "gpu-1", 2),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(job.payload) }),
    );
    let r = fleetq(
        Some(&url),
        &["enqueue", "split", r#"{"n":1}"#, "--wait", "--json"],
    )
    .await;
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    let done = r.json();
    assert_eq!(done["state"], "succeeded", "{done}");
    let id = done["id"].as_str().unwrap().to_owned();
    let r = fleetq(Some(&url), &["watch", &id, "--queue", "split", "--json"]).await;
    assert_eq!(r.json()["state"], "succeeded", "{}", r.stdout);
    let r = fleetq(Some(&url), &["queues", "--json"]).await;
    let listed = r.json();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["queue"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"split") && !names.iter().any(|n| n.contains('#')),
        "{names:?}"
    );
    worker.stop().await;
}
