//! The `fleetq` CLI as a person or a script uses it: every command against a live queue, the
//! error cases with their exit codes and messages, and the demo from a clean environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleetq_broker::{EnqueueOptions, QueueKeys};
use fleetq_tests::{
    bin_path, eventually, free_port, quick_queue_config, worker_config, FnHandler, Stack,
    WorkerProcess,
};
use fleetq_worker::{Outcome, Progress};
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

    // A command group without its subcommand names them, with examples.
    for (args, subs) in [
        (&["dead"][..], &["list", "show", "retry", "purge"][..]),
        (
            &["dead", "images"][..],
            &["list", "show", "retry", "purge"][..],
        ),
        (&["functions"][..], &["load", "status", "dump"][..]),
    ] {
        let r = fleetq(u, args).await;
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(
            subs.iter().all(|s| r.stderr.contains(&format!("  {s} ")))
                && r.stderr.contains("Examples:")
                && r.stderr.contains("fleetq dead images list") == (args[0] == "dead")
                && !r.stderr.contains("requires a subcommand"),
            "{args:?}: {}",
            r.stderr
        );
    }
    let r = fleetq(u, &["dead", "list"]).await;
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("fleetq dead images list"), "{}", r.stderr);
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
    assert!(
        r.stderr
            .contains(&format!("redis-server --port {dead_port}"))
            && r.stderr.contains("REDIS_URL")
            && !r.stderr.contains("--port 6379"),
        "the hint names the real port: {}",
        r.stderr
    );
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
    assert!(status.stdout.contains("--field"), "{}", status.stdout);
    for cmd in ["watch", "cancel"] {
        let r = fleetq(None, &[cmd, "--help"]).await;
        assert!(!r.stdout.contains("--field"), "{cmd}: {}", r.stdout);
    }
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
    assert_eq!(r.json()["outcome"], "cancelled", "{}", r.stdout);
    let r = fleetq(Some(&url), &["cancel", &e.id]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("already ended as cancelled"),
        "{}",
        r.stdout
    );
    let r = fleetq(Some(&url), &["cancel", &e.id, "--json"]).await;
    assert_eq!(r.json()["outcome"], "already_ended", "{}", r.stdout);
    let waiting = p
        .enqueue(&json!({}), &fleetq_broker::EnqueueOptions::default())
        .await
        .unwrap();
    let r = fleetq(Some(&url), &["cancel", &waiting.id]).await;
    assert!(r.stdout.contains("cancelled while waiting"), "{}", r.stdout);
    let r = fleetq(Some(&url), &["cancel", "no-such-job"]).await;
    assert_eq!(r.code, Some(4), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("no job"), "{}", r.stderr);
    let r = fleetq(Some(&url), &["cancel", "no-such-job", "--json"]).await;
    assert_eq!(r.code, Some(4), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.json()["outcome"], "not_found", "{}", r.stdout);

    // One snapshot and out, without --iterations.
    let r = fleetq(Some(&url), &["top", "--json"]).await;
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

/// `status` of a running job names its worker's pid and host (and `--field` prints one of
/// them for a script), `nodes` lists them, and `cancel` asks the running worker to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_field_pid_host_nodes_and_cancel_of_a_running_job() {
    let s = Stack::start().await;
    let url = s.server.url();
    let u = Some(url.as_str());
    let worker = WorkerProcess::spawn(&url, "gpu", "gpu-1", 1, &[]);
    let pid = worker.pid().to_string();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    let r = fleetq(
        u,
        &[
            "enqueue",
            "gpu",
            r#"{"steps": 600, "step_ms": 100}"#,
            "--id",
            "fox-1",
        ],
    )
    .await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    eventually(Duration::from_secs(20), "the job runs", || async {
        fleetq(u, &["status", "fox-1", "--field", "state"])
            .await
            .stdout
            == "running\n"
    })
    .await;

    let field = |name: &'static str| {
        let url = url.clone();
        async move {
            let r = fleetq(Some(&url), &["status", "fox-1", "--field", name]).await;
            assert_eq!(r.code, Some(0), "--field {name}: {}", r.stderr);
            r.stdout
        }
    };
    assert_eq!(field("pid").await, format!("{pid}\n"), "{}", worker.log());
    assert_eq!(field("host").await, format!("{host}\n"));
    assert_eq!(field("node").await, "gpu-1\n");
    assert_eq!(field("attempts").await, "1\n");
    assert!(field("started_ms").await.trim().parse::<u64>().is_ok());
    let r = fleetq(u, &["status", "fox-1", "--field", "nope"]).await;
    assert_eq!(r.code, Some(4));
    assert!(
        r.stderr.contains("no field \"nope\"") && r.stderr.contains("pid"),
        "{}",
        r.stderr
    );

    let r = fleetq(u, &["status", "fox-1", "--json"]).await;
    let st = r.json();
    assert_eq!(st["pid"].as_u64(), pid.parse().ok(), "{st}");
    assert_eq!(st["host"], host.as_str());
    assert_eq!(st["state"], "running", "existing keys stay");
    assert_eq!(st["history"][0]["attempt"], 1, "{st}");
    assert_eq!(st["history"][0]["outcome"], "running", "{st}");
    let r = fleetq(u, &["status", "fox-1"]).await;
    assert!(
        r.stdout.contains(&pid) && r.stdout.contains(&host),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("#1 on gpu-1: running, started "),
        "{}",
        r.stdout
    );

    let r = fleetq(u, &["nodes", "--json"]).await;
    let n = r.json()[0].clone();
    assert_eq!(n["pid"].as_u64(), pid.parse().ok(), "{n}");
    assert_eq!(n["host"], host.as_str(), "{n}");
    assert_eq!(n["fields"]["pid"], pid.as_str(), "{n}");
    assert!(
        n["consumers"][0]
            .as_str()
            .unwrap()
            .starts_with(&format!("gpu-1:{pid}:")),
        "{n}"
    );
    let r = fleetq(u, &["nodes"]).await;
    assert!(
        r.stdout.contains("pid") && r.stdout.contains(&pid) && r.stdout.contains(&host),
        "{}",
        r.stdout
    );
    let r = fleetq(u, &["top", "--json"]).await;
    assert_eq!(r.json()["nodes"][0]["pid"].as_u64(), pid.parse().ok());

    let r = fleetq(u, &["cancel", "fox-1", "--json"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        (r.json()["state"].as_str(), r.json()["outcome"].as_str()),
        (Some("cancelling"), Some("cancelling"))
    );
    let r = fleetq(u, &["watch", "fox-1", "--queue", "gpu"]).await;
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("ended cancelled"), "{}", r.stderr);
    let r = fleetq(u, &["status", "fox-1", "--field", "pid"]).await;
    assert_eq!(r.code, Some(4), "no worker holds an ended job");
    assert!(
        r.stderr.contains("only while a worker holds the job"),
        "{}",
        r.stderr
    );
    let r = fleetq(u, &["cancel", "fox-1"]).await;
    assert!(
        r.stdout.contains("already ended as cancelled"),
        "{}",
        r.stdout
    );
}

/// `watch` tells an attempt that timed out from the end: it names the attempt, its timeout and
/// node, and the attempt it waits for, then how the job ended. `status` then lists both
/// attempts, in text and as an array in JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_names_a_timed_out_attempt_and_status_lists_the_attempts() {
    let s = Stack::start().await;
    let url = s.server.url();
    let u = Some(url.as_str());
    s.configure("renders", &quick_queue_config()).await;
    // Attempt 1 reports progress until released, then hangs (its progress timeout fires);
    // attempt 2 runs three steps and succeeds.
    let release = Arc::new(AtomicBool::new(false));
    let go = release.clone();
    let worker = s.worker(
        worker_config("renders", "gpu-1", 1),
        FnHandler::new(move |job, ctx| {
            let go = go.clone();
            async move {
                if job.attempt == 1 {
                    while !go.load(Ordering::SeqCst) {
                        ctx.progress(Progress::step(1, 4).in_stage("KSampler"))
                            .await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    std::future::pending::<()>().await;
                }
                for step in 1..=3 {
                    ctx.progress(Progress::step(step, 3)).await;
                }
                Outcome::Succeeded(json!({"image": "fox.png"}))
            }
        }),
    );
    let p = s.producer("renders").await;
    p.enqueue(
        &json!({}),
        &EnqueueOptions {
            id: Some("fox-2".into()),
            progress_timeout: Some(Duration::from_millis(1500)),
            ..EnqueueOptions::default()
        },
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "attempt 1 runs", || async {
        p.status("fox-2").await.unwrap().state == fleetq_broker::JobState::Running
    })
    .await;
    let watch = {
        let url = url.clone();
        tokio::spawn(
            async move { fleetq(Some(&url), &["watch", "fox-2", "--queue", "renders"]).await },
        )
    };
    // Released once the watch follows the job (it counts as a watcher).
    let holds = QueueKeys::new("renders").unwrap().holds();
    eventually(
        Duration::from_secs(20),
        "the watch follows the job",
        || async {
            let w: Option<i64> = redis::cmd("HGET")
                .arg(&holds)
                .arg("w:fox-2")
                .query_async(&mut s.conn())
                .await
                .unwrap();
            w.unwrap_or(0) >= 1
        },
    )
    .await;
    release.store(true, Ordering::SeqCst);
    let r = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .expect("watch ends")
        .unwrap();
    assert_eq!(r.code, Some(0), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(
            "attempt 1 timed out (progress) on gpu-1 in stage KSampler; waiting for attempt 2"
        ),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("0/0"), "{}", r.stderr);
    assert!(
        r.stdout
            .contains("job fox-2 succeeded on gpu-1 at attempt 2"),
        "{}",
        r.stdout
    );

    let r = fleetq(u, &["status", "fox-2"]).await;
    assert!(
        r.stdout
            .contains("#1 on gpu-1: timeout (progress timeout, in stage KSampler), started ")
            && r.stdout.contains("#2 on gpu-1: succeeded"),
        "{}",
        r.stdout
    );
    let st = fleetq(u, &["status", "fox-2", "--json"]).await.json();
    let history = st["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{st}");
    assert_eq!(
        (
            &history[0]["attempt"],
            &history[0]["outcome"],
            &history[0]["timeout"],
            &history[0]["stage"]
        ),
        (
            &json!(1),
            &json!("timeout"),
            &json!("progress"),
            &json!("KSampler")
        ),
        "{st}"
    );
    assert!(history[0]["elapsed_ms"].as_u64().unwrap() >= 1500, "{st}");
    assert_eq!(
        (&history[1]["attempt"], &history[1]["outcome"]),
        (&json!(2), &json!("succeeded"))
    );
    assert!(st["fields"].get("history").is_none(), "not as text: {st}");
    assert_eq!(st["result"]["image"], "fox.png", "existing keys stay");

    // An end without success says how and why.
    let r = fleetq(
        u,
        &[
            "enqueue",
            "renders",
            "{}",
            "--max-attempts",
            "1",
            "--progress-timeout-ms",
            "300",
            "--wait",
        ],
    )
    .await;
    // Attempt 1 of this job hangs, as released, until its progress timeout: no attempt left.
    assert_eq!(r.code, Some(1), "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("attempt 1 timed out (progress) on gpu-1")
            && !r.stderr.contains("waiting for attempt 2")
            && r.stderr.contains("ended dead (reason "),
        "{}",
        r.stderr
    );
    worker.stop().await;
}

/// `functions dump` is the library the broker loads: loaded by hand into a server without
/// one, it answers this build's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_dump_loads_into_a_bare_server() {
    let s = Stack::start().await;
    let url = s.server.url();
    let r = fleetq(None, &["functions", "dump"]).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.starts_with("#!lua name=fleetq\n"),
        "{}",
        &r.stdout[..80]
    );
    assert!(!r.stdout.contains("__FLEETQ_VERSION__"));
    let version = fleetq_broker::functions::library_version();
    assert!(r.stdout.contains(&version));
    let mut conn = s.conn();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let missing = fleetq(Some(&url), &["functions", "status", "--json"]).await;
    assert_eq!(missing.json()["state"], "missing");
    let name: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&r.stdout)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(name, "fleetq");
    let answered: String = redis::cmd("FCALL")
        .arg("fleetq_version")
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(answered, version);
    let st = fleetq(Some(&url), &["functions", "status", "--json"]).await;
    assert_eq!(st.code, Some(0), "{}", st.stderr);
    assert_eq!(st.json()["state"], "current");
    let dumped = fleetq(None, &["functions", "dump", "--json"]).await.json();
    assert_eq!(dumped["version"], version.as_str());
    assert_eq!(dumped["source"], r.stdout.as_str());
}

/// Service binaries log to stderr, with no colour codes when it is not a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_go_to_stderr_without_colours_when_it_is_a_pipe() {
    let s = Stack::start().await;
    let url = s.server.url();
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(bin_path("fleetq-worker"))
        .args(["--queue", "logs", "--node", "log-1", "--executor", "echo"])
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .env("REDIS_URL", &url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the worker logs its start",
        || async { std::fs::read_to_string(&err).unwrap().contains("log-1") },
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&err).unwrap();
    assert!(
        !log.contains("\x1b["),
        "escape codes in a piped log: {log:?}"
    );
    assert!(log.contains("INFO"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "",
        "nothing logged to stdout"
    );
    // The CLI's own logs too.
    let bin = bin_path("fleetq");
    let r = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(["queues"])
            .env("REDIS_URL", &url)
            .env("RUST_LOG", "debug")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        !err.contains("\x1b["),
        "escape codes in a piped log: {err:?}"
    );
}

#[test]
fn output_cut_short_by_its_reader_ends_quietly() {
    // A reader that is gone before the CLI writes (as `head -1` is gone after its line): the
    // write finds the pipe closed.
    let mut child = Command::new(bin_path("fleetq"))
        .args(["functions", "dump", "--json"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}; stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
