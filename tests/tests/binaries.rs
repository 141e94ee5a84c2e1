//! The `fleetq-broker` and `fleetq-worker` binaries as an operator runs them: they start,
//! serve, stop cleanly on SIGTERM, and refuse bad settings with a message that says what to do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use fleetq_broker::{EnqueueOptions, JobState};
use fleetq_tests::{
    bin_path, child_processes, eventually, free_port, process_gone, send_signal, Stack,
};
use serde_json::json;

fn run_to_end(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(bin_path(bin))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_are_refused_with_a_clear_message() {
    let (code, err) = run_to_end("fleetq-worker", &["--queue", "q", "--slots", "0"], &[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("slots is 0; use 1 to 1024"), "{err}");
    let (code, err) = run_to_end("fleetq-worker", &["--queue", "a:b"], &[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("invalid queue name"), "{err}");
    let (code, err) = run_to_end("fleetq-broker", &["--listen", "nowhere"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--listen"), "{err}");
    // An unreachable server is waited for (tests/tests/startup.rs); a URL that cannot be
    // right is refused at once, its password masked.
    let (code, err) = run_to_end(
        "fleetq-broker",
        &["--listen", "127.0.0.1:0"],
        &[("REDIS_URL", "nonsense://:hunter2@127.0.0.1:1")],
    );
    assert_ne!(code, Some(0));
    assert!(
        err.contains("invalid Redis URL nonsense://:***@127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the password leaked: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_worker_binaries_serve_and_stop_on_sigterm() {
    let s = Stack::start().await;
    let port = free_port();
    let mut broker = Command::new(bin_path("fleetq-broker"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("REDIS_URL", s.server.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut worker = Command::new(bin_path("fleetq-worker"))
        .args([
            "--queue",
            "echo",
            "--node",
            "gpu-0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--executor",
            "echo",
        ])
        .env("REDIS_URL", s.server.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    eventually(Duration::from_secs(15), "broker ready", || async {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let p = s.producer("echo").await;
    let e = p
        .enqueue(&json!({"hello": "gpu"}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(15)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(st.result.unwrap()["echo"]["hello"], "gpu");
    let m = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("fleetq_node_slots{node=\"gpu-0\"} 1"), "{m}");
    for child in [&mut broker, &mut worker] {
        send_signal(child.id(), libc::SIGTERM);
    }
    for child in [&mut broker, &mut worker] {
        let mut waited = Duration::ZERO;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(waited < Duration::from_secs(15), "did not stop on SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        };
        assert!(status.success(), "{status}");
    }
    assert!(
        fleetq_broker::nodes::list(&s.redis)
            .await
            .unwrap()
            .is_empty(),
        "the stopped worker left the fleet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_takes_its_child_processes_with_it() {
    let s = Stack::start().await;
    let sim =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/sim_gpu.py");
    let mut worker = Command::new(bin_path("fleetq-worker"))
        .args([
            "--queue",
            "gpu",
            "--node",
            "doomed",
            "--metrics-addr",
            "off",
            "--executor",
            "process",
        ])
        .args([
            "--command",
            &format!("python3 {} --steps 1000 --step-ms 50", sim.display()),
        ])
        .env("REDIS_URL", s.server.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = s.producer("gpu").await;
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "job running", || async {
        p.status(&e.id).await.unwrap().state == JobState::Running
    })
    .await;
    let children: Vec<u32> = child_processes(worker.id())
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(children.len(), 1, "one child runs the job");
    send_signal(worker.id(), libc::SIGKILL);
    let _ = worker.wait();
    // Gone, or a zombie waiting for its new parent to reap it.
    eventually(
        Duration::from_secs(10),
        "the child died with its worker",
        || async { process_gone(children[0]) },
    )
    .await;
}
