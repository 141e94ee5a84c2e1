//! The HTTP executor against a fake ComfyUI (HTTP + websocket) written for the suite: each
//! scripted behaviour maps to the right outcome and timeout kind, `/interrupt` is called when a
//! timeout stops a job, and the generic JSON mode maps status codes to outcomes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetq_broker::{EnqueueOptions, JobState, QueueConfig};
use fleetq_tests::fake_comfy::FakeComfy;
use fleetq_tests::{eventually, scrape, worker_config, InProcessWorker, Stack};
use fleetq_worker::executor::{HttpConfig, HttpExecutor, HttpMode};
use serde_json::json;

async fn worker(s: &Stack, url: &str, mode: HttpMode, node: &str) -> (InProcessWorker, String) {
    let mut cfg = worker_config("gpu", node, 1);
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let exec = HttpExecutor::new(HttpConfig {
        url: url.to_owned(),
        mode,
        request_timeout: Duration::from_secs(10),
    })
    .unwrap();
    let w = s.worker(cfg, exec);
    let metrics = s.first_node_metrics_url().await;
    (w, metrics)
}

async fn slot_free(metrics: &str) {
    eventually(Duration::from_secs(10), "busy slots back to 0", || async {
        scrape(metrics).await.get("fleetq_worker_busy_slots", &[]) == 0.0
    })
    .await;
}

fn workflow(mode: &str) -> serde_json::Value {
    json!({"prompt": {"3": {"class_type": "KSampler"}, "9": {"class_type": "SaveImage"}, "fleetq_test": {"mode": mode}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_success_with_progress_and_outputs() {
    let s = Stack::start().await;
    let comfy = FakeComfy::start().await;
    let (w, metrics) = worker(&s, &comfy.base, HttpMode::ComfyUi, "comfy-1").await;
    let p = s.producer("gpu").await;
    let e = p
        .enqueue(&workflow("succeed"), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    let r = st.result.unwrap();
    assert!(r["outputs"]["9"]["images"][0]["filename"]
        .as_str()
        .unwrap()
        .ends_with(".png"));
    let stages: serde_json::Value = serde_json::from_str(&st.fields["stages"]).unwrap();
    let names: Vec<&str> = stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["3", "9"]);
    assert!(st.fields.contains_key("started_ms"));
    assert_eq!(comfy.interrupts(), 0);
    slot_free(&metrics).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_hang_stall_and_error_map_to_the_right_endings() {
    let s = Stack::start().await;
    s.configure(
        "gpu",
        &QueueConfig {
            start_timeout: Some(Duration::from_millis(500)),
            progress_timeout: Some(Duration::from_millis(500)),
            max_attempts: 1,
            ..QueueConfig::default()
        },
    )
    .await;
    let comfy = FakeComfy::start().await;
    let (w, metrics) = worker(&s, &comfy.base, HttpMode::ComfyUi, "comfy-2").await;
    let p = s.producer("gpu").await;

    let e = p
        .enqueue(&workflow("hang_before_start"), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (st.state, st.fields["timeout"].as_str()),
        (JobState::Dead, "start")
    );
    eventually(
        Duration::from_secs(5),
        "interrupt after the start timeout",
        || async { comfy.interrupts() == 1 },
    )
    .await;
    slot_free(&metrics).await;

    let e = p
        .enqueue(&workflow("stall"), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (st.state, st.fields["timeout"].as_str()),
        (JobState::Dead, "progress")
    );
    assert_eq!(st.fields["timeout_stage"], "KSampler");
    eventually(
        Duration::from_secs(5),
        "interrupt after the progress timeout",
        || async { comfy.interrupts() == 2 },
    )
    .await;
    slot_free(&metrics).await;

    let e = p
        .enqueue(&workflow("error"), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Dead);
    let err = st.error.unwrap();
    assert!(
        err.contains("node 4") && err.contains("CUDA out of memory"),
        "{err}"
    );
    assert!(
        !st.fields.contains_key("timeout"),
        "an error is not a timeout"
    );
    assert_eq!(
        comfy.interrupts(),
        2,
        "no interrupt for a prompt that ended by itself"
    );
    slot_free(&metrics).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_mode_maps_status_codes_to_outcomes() {
    let s = Stack::start().await;
    s.configure(
        "gpu",
        &QueueConfig {
            max_attempts: 2,
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(40),
            ..QueueConfig::default()
        },
    )
    .await;
    let comfy = FakeComfy::start().await;
    let (w, metrics) = worker(
        &s,
        &format!("{}/json", comfy.base),
        HttpMode::Json,
        "json-1",
    )
    .await;
    let p = s.producer("gpu").await;
    let ok = p
        .enqueue(&json!({"status": 200, "x": 1}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&ok.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(st.result.unwrap()["echo"]["x"], 1);
    let bad = p
        .enqueue(&json!({"status": 400}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&bad.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (st.state, st.attempts),
        (JobState::Failed, 1),
        "4xx fails for good"
    );
    let down = p
        .enqueue(&json!({"status": 503}), &EnqueueOptions::default())
        .await
        .unwrap();
    let st = p.wait(&down.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        (st.state, st.attempts),
        (JobState::Dead, 2),
        "5xx is retried"
    );
    slot_free(&metrics).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_at_start_is_waited_for_not_crash_looped() {
    let s = Stack::start().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (w, _metrics) = worker(
        &s,
        &format!("http://{addr}"),
        HttpMode::ComfyUi,
        "comfy-late",
    )
    .await;
    let p = s.producer("gpu").await;
    let e = p
        .enqueue(&workflow("succeed"), &EnqueueOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        p.wait(&e.id, Duration::from_millis(1500)).await,
        Err(fleetq_broker::Error::Timeout { .. })
    ));
    assert_eq!(
        p.status(&e.id).await.unwrap().state,
        JobState::Waiting,
        "no job taken while the server is down"
    );
    let comfy = FakeComfy::start_on(tokio::net::TcpListener::bind(addr).await.unwrap()).await;
    let st = p.wait(&e.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(st.state, JobState::Succeeded);
    assert_eq!(comfy.prompts(), 1);
    w.stop().await;
}
