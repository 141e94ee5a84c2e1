//! The process executor with real child processes (`examples/python/sim_gpu.py`): every kind
//! of ending frees the slot and leaves no child behind, and payloads never reach a shell.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use fleetq_broker::{EnqueueOptions, JobState, QueueConfig};
use fleetq_tests::{eventually, scrape, worker_config, Stack};
use fleetq_worker::executor::{ProcessConfig, ProcessExecutor};
use serde_json::json;

fn sim(flags: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/python/sim_gpu.py");
    format!("python3 {} --steps 3 --step-ms 30 {flags}", path.display())
}

/// Processes (zombies included) that this test process started for `node`.
fn children_of(node: &str) -> Vec<(u32, char)> {
    fleetq_tests::child_processes(std::process::id())
        .into_iter()
        .filter(|(pid, state)| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let tagged = env
                .split(|b| *b == 0)
                .any(|kv| kv == format!("FLEETQ_NODE={node}").as_bytes());
            // A zombie's environ is empty: match it by its command name instead.
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            tagged || (*state == 'Z' && comm.starts_with("python"))
        })
        .collect()
}

struct Fixture {
    s: Stack,
    node: String,
    w: Option<fleetq_tests::InProcessWorker>,
    metrics: String,
}

impl Fixture {
    async fn start(
        node: &str,
        flags: &str,
        slots: usize,
        queue_cfg: QueueConfig,
        tune: impl FnOnce(&mut ProcessConfig),
    ) -> Self {
        let s = Stack::start().await;
        s.configure("gpu", &queue_cfg).await;
        let mut cfg = worker_config("gpu", node, slots);
        cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        cfg.shutdown_grace = Duration::from_millis(300);
        let mut pc = ProcessConfig::from_command(&sim(flags), slots).unwrap();
        pc.kill_grace = Duration::from_millis(500);
        tune(&mut pc);
        let w = s.worker(cfg, ProcessExecutor::new(pc, node));
        let metrics = s.first_node_metrics_url().await;
        Self {
            s,
            node: node.to_owned(),
            w: Some(w),
            metrics,
        }
    }

    async fn busy(&self) -> f64 {
        scrape(&self.metrics)
            .await
            .get("fleetq_worker_busy_slots", &[])
    }

    async fn assert_idle_and_clean(&self) {
        eventually(Duration::from_secs(10), "busy slots back to 0", || async {
            self.busy().await == 0.0
        })
        .await;
        // Only idle pool children may remain while the worker runs; none is a zombie.
        for (pid, state) in children_of(&self.node) {
            assert_ne!(state, 'Z', "zombie child {pid}");
        }
    }

    /// Stops the worker, checks no child is left, and hands back the stack.
    async fn stop(mut self) -> Stack {
        self.w.take().unwrap().stop().await;
        eventually(
            Duration::from_secs(10),
            "no child process left after shutdown",
            || async { children_of(&self.node).is_empty() },
        )
        .await;
        self.s
    }
}

fn queue_cfg() -> QueueConfig {
    QueueConfig {
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(40),
        ..QueueConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_with_progress_and_shell_metacharacters_untouched() {
    let f = Fixture::start("px-happy", "", 1, queue_cfg(), |_| {}).await;
    let p = f.s.producer("gpu").await;
    let marker = std::env::temp_dir().join(format!("fleetq-pwned-{}", std::process::id()));
    let nasty = format!("$(touch {m}); `touch {m}`; touch {m} && rm -rf /nonexistent | cat > {m} 'quo\"te' \\ \n\t$HOME", m = marker.display());
    let payload = json!({"cmd": nasty, "nested": {"a": [1, 2, "x"]}, "unicode": "naïve ✓"});
    let e = p
        .enqueue(&payload, &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    let result = st.result.unwrap();
    assert_eq!(result["echo"], payload, "payload arrived byte-identical");
    assert!(!marker.exists(), "something in the payload was executed");
    assert_eq!(st.progress.as_ref().unwrap()["step"], 3);
    let stages: serde_json::Value = serde_json::from_str(&st.fields["stages"]).unwrap();
    assert_eq!(stages[0]["name"], "sampling");
    assert!(st.fields.contains_key("started_ms"));
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_job_is_retried_and_the_child_replaced() {
    let f = Fixture::start("px-crash", "", 1, queue_cfg(), |_| {}).await;
    let p = f.s.producer("gpu").await;
    let first = p
        .enqueue(&json!({"n": 1}), &EnqueueOptions::default())
        .await
        .unwrap();
    let pid1 = p
        .wait(&first.id, Duration::from_secs(20))
        .await
        .unwrap()
        .result
        .unwrap()["pid"]
        .as_i64()
        .unwrap();
    let crash = p
        .enqueue(
            &json!({"crash": true}),
            &EnqueueOptions {
                max_attempts: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let st = p.wait(&crash.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.attempts, 2, "the crash was retried");
    let err = st.error.unwrap();
    assert!(
        err.contains("exited (exit status: 3) during the job"),
        "{err}"
    );
    let after = p
        .enqueue(&json!({"n": 2}), &EnqueueOptions::default())
        .await
        .unwrap();
    let pid2 = p
        .wait(&after.id, Duration::from_secs(20))
        .await
        .unwrap()
        .result
        .unwrap()["pid"]
        .as_i64()
        .unwrap();
    assert_ne!(pid1, pid2, "a new child replaced the crashed one");
    assert!(
        !PathBuf::from(format!("/proc/{pid1}")).exists(),
        "the crashed child was reaped"
    );
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_before_start_trips_the_start_timeout_and_the_child_is_killed() {
    let cfg = QueueConfig {
        start_timeout: Some(Duration::from_millis(600)),
        max_attempts: 1,
        ..queue_cfg()
    };
    let f = Fixture::start("px-nostart", "", 1, cfg, |_| {}).await;
    let p = f.s.producer("gpu").await;
    let e = p
        .enqueue(&json!({"hang": "before_start"}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "child running the job", || async {
        !children_of("px-nostart").is_empty()
    })
    .await;
    let hung: Vec<u32> = children_of("px-nostart")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.fields["timeout"], "start");
    eventually(
        Duration::from_secs(10),
        "hung child gone from the process table",
        || async { hung.iter().all(|pid| fleetq_tests::process_gone(*pid)) },
    )
    .await;
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_mid_run_trips_the_progress_timeout() {
    let cfg = QueueConfig {
        progress_timeout: Some(Duration::from_millis(600)),
        max_attempts: 1,
        ..queue_cfg()
    };
    let f = Fixture::start("px-stall", "", 1, cfg, |_| {}).await;
    let p = f.s.producer("gpu").await;
    let e = p
        .enqueue(&json!({"hang": "mid_run"}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    assert_eq!(st.fields["timeout"], "progress");
    assert_eq!(st.fields["timeout_stage"], "sampling");
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_stdout_is_a_clear_protocol_error() {
    let cfg = QueueConfig {
        max_attempts: 1,
        ..queue_cfg()
    };
    let f = Fixture::start("px-garbage", "", 1, cfg, |_| {}).await;
    let p = f.s.producer("gpu").await;
    let e = p
        .enqueue(&json!({"garbage": true}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    let err = st.error.unwrap();
    assert!(
        err.contains("protocol error") && err.contains("stderr"),
        "{err}"
    );
    // The next job gets a fresh child and succeeds.
    let ok = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert_eq!(
        p.wait(&ok.id, Duration::from_secs(20)).await.unwrap().state,
        JobState::Succeeded
    );
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_jobs_per_child_replaces_children_between_jobs_without_losing_one() {
    let f = Fixture::start("px-recycle", "", 1, queue_cfg(), |pc| {
        pc.max_jobs_per_child = Some(2)
    })
    .await;
    let p = f.s.producer("gpu").await;
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            p.enqueue(&json!({"n": n}), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    let mut pids = Vec::new();
    for id in &ids {
        let st = p.wait(id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded);
        assert_eq!(st.attempts, 1);
        let r = st.result.unwrap();
        pids.push((r["pid"].as_i64().unwrap(), r["jobs_done"].as_i64().unwrap()));
    }
    assert_eq!(pids[0].0, pids[1].0);
    assert_ne!(pids[1].0, pids[2].0);
    assert_eq!(pids[2].0, pids[3].0);
    assert_ne!(pids[3].0, pids[4].0);
    assert_eq!(
        pids.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![1, 2, 1, 2, 1]
    );
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_shutdown_stop_the_child_and_free_the_slot() {
    let cfg = QueueConfig {
        lease: Duration::from_millis(900),
        ..queue_cfg()
    };
    let f = Fixture::start("px-stop", "", 1, cfg, |_| {}).await;
    let p = f.s.producer("gpu").await;
    let e = p
        .enqueue(
            &json!({"steps": 1000, "step_ms": 50}),
            &EnqueueOptions::default(),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "running", || async {
        p.status(&e.id).await.unwrap().state == JobState::Running
    })
    .await;
    assert_eq!(p.cancel(&e.id).await.unwrap(), JobState::Cancelling);
    assert_eq!(
        p.wait(&e.id, Duration::from_secs(10)).await.unwrap().state,
        JobState::Cancelled
    );
    f.assert_idle_and_clean().await;
    // Shutdown while a job runs: the job is released, the child stopped.
    let long = p
        .enqueue(
            &json!({"steps": 1000, "step_ms": 50}),
            &EnqueueOptions::default(),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "running", || async {
        p.status(&long.id).await.unwrap().state == JobState::Running
    })
    .await;
    let s = f.stop().await;
    let st = s.producer("gpu").await.status(&long.id).await.unwrap();
    assert_eq!(st.state, JobState::Waiting, "released for another host");
    assert_eq!(st.attempts, 0, "without burning an attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_the_run_timeout_free_the_slot_too() {
    let cfg = QueueConfig {
        run_timeout: Some(Duration::from_millis(700)),
        max_attempts: 1,
        ..queue_cfg()
    };
    let f = Fixture::start("px-ends", "", 1, cfg, |_| {}).await;
    let p = f.s.producer("gpu").await;
    let e = p
        .enqueue(&json!({"fail": "fatal"}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Failed);
    assert!(st.error.unwrap().contains("simulated failure"));
    f.assert_idle_and_clean().await;
    let e = p
        .enqueue(
            &json!({"steps": 1000, "step_ms": 50}),
            &EnqueueOptions::default(),
        )
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (st.state, st.fields["timeout"].as_str()),
        (JobState::Dead, "run")
    );
    f.assert_idle_and_clean().await;
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_is_reported_and_no_job_is_taken() {
    let s = Stack::start().await;
    let pc = ProcessConfig::from_command("/nonexistent/fleetq-model-server --port 1", 1).unwrap();
    assert!(pc
        .resolve_program()
        .unwrap_err()
        .contains("command not found"));
    let w = s.worker(
        worker_config("gpu", "px-missing", 1),
        ProcessExecutor::new(pc, "px-missing"),
    );
    let p = s.producer("gpu").await;
    let e = p
        .enqueue(&json!({}), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        p.wait(&e.id, Duration::from_millis(1000)).await,
        Err(fleetq_broker::Error::Timeout { .. })
    ));
    assert_eq!(p.status(&e.id).await.unwrap().state, JobState::Waiting);
    w.stop().await;
}
