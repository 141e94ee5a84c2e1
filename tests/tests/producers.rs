//! Producers in other languages follow docs/protocol.md against a live worker, so the
//! document cannot drift from the code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use fleetq_tests::{worker_config, FnHandler, Stack};
use fleetq_worker::Outcome;
use serde_json::json;

fn example(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_producer_plain_xadd_and_blocking_wait() {
    fleetq_tests::require_python_redis();
    let s = Stack::start().await;
    let w = s.worker(
        worker_config("images", "gpu-1", 1),
        FnHandler::new(|job, _| async move {
            Outcome::Succeeded(json!({"prompt": job.payload["prompt"], "by": "gpu-1"}))
        }),
    );
    let url = s.server.url();
    let v = fleetq_tests::run_python_json(
        example("examples/producers/python/producer.py"),
        [
            "--queue",
            "images",
            "--payload",
            r#"{"prompt": "a red fox; $(rm -rf /)"}"#,
            "--timeout",
            "20",
        ]
        .map(str::to_owned)
        .to_vec(),
        url,
    )
    .await;
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["result"]["prompt"], "a red fox; $(rm -rf /)");
    assert_eq!(v["result"]["by"], "gpu-1");
    w.stop().await;
}

async fn run_producer(
    dir: &str,
    program: &str,
    args: &[&str],
    url: String,
) -> std::process::Output {
    let dir = example(dir);
    let (program, args): (String, Vec<String>) = (
        program.to_owned(),
        args.iter().map(|s| (*s).to_owned()).collect(),
    );
    tokio::task::spawn_blocking(move || {
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .env("REDIS_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_shell_producers_follow_the_protocol() {
    let node_ready = example("examples/producers/node/node_modules/ioredis").exists();
    assert!(node_ready, "the Node producer needs its packages: run `npm ci` in examples/producers/node (`./dev test` does)");
    let s = Stack::start().await;
    let w = s.worker(
        worker_config("images", "gpu-1", 1),
        FnHandler::new(|job, _| async move { Outcome::Succeeded(json!({"echo": job.payload})) }),
    );
    let payload =
        r#"{"prompt":"a red fox; $(touch /tmp/fleetq-never) `id`","n":12345678901234567}"#;
    for (dir, program, args) in [
        (
            "examples/producers/node",
            "node",
            vec![
                "producer.js",
                "--queue",
                "images",
                "--payload",
                payload,
                "--timeout",
                "20",
            ],
        ),
        (
            "examples/producers/shell",
            "./producer.sh",
            vec!["images", payload, "20"],
        ),
    ] {
        let out = run_producer(dir, program, &args, s.server.url()).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{program} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(v["state"], "succeeded", "{program}");
        assert_eq!(
            v["result"]["echo"]["prompt"], "a red fox; $(touch /tmp/fleetq-never) `id`",
            "{program}"
        );
    }
    assert!(!std::path::Path::new("/tmp/fleetq-never").exists());
    // Bad input and timeouts give the documented exit codes.
    let bad = run_producer(
        "examples/producers/shell",
        "./producer.sh",
        &["images", "{nope", "5"],
        s.server.url(),
    )
    .await;
    assert_eq!(bad.status.code(), Some(3));
    w.stop().await;
    let late = run_producer(
        "examples/producers/node",
        "node",
        &[
            "producer.js",
            "--queue",
            "idle",
            "--payload",
            "{}",
            "--timeout",
            "1",
        ],
        s.server.url(),
    )
    .await;
    assert_eq!(
        late.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&late.stdout)
    );
}
