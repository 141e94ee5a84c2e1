//! The broker service: metrics that agree with Redis, maintenance that two brokers run
//! without doubling anything, the HTTP API end to end, readiness that follows Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fleetq_broker::service::BrokerConfig;
use fleetq_broker::{EnqueueOptions, JobState, QueueConfig, QueueKeys};
use fleetq_tests::{eventually, scrape, worker_config, FnHandler, Stack};
use fleetq_worker::{JobContext, Outcome};
use serde_json::{json, Value};

fn fast_broker() -> BrokerConfig {
    BrokerConfig {
        maintenance_interval: Duration::from_millis(50),
        ..BrokerConfig::default()
    }
}

async fn count_events(s: &Stack, queue: &str, kind: &str) -> usize {
    s.events(queue)
        .await
        .iter()
        .filter(|e| e.get("type").map(String::as_str) == Some(kind))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_the_right_values_and_agree_with_redis() {
    let s = Stack::start().await;
    s.configure(
        "img",
        &QueueConfig {
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(40),
            ..QueueConfig::default()
        },
    )
    .await;
    let p = s.producer("img").await;
    let keys = QueueKeys::new("img").unwrap();
    let gate = tokio_util::sync::CancellationToken::new();
    let g = gate.clone();
    let mut cfg = worker_config("img", "gpu-1", 1);
    cfg.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.heartbeat = Duration::from_millis(100);
    cfg.suspend_after = 0;
    let w = s.worker(
        cfg,
        FnHandler::new(move |job, ctx: JobContext| {
            let g = g.clone();
            async move {
                match job.payload["kind"].as_str() {
                    Some("retry") => Outcome::Retry("flaky".into()),
                    Some("stall") => {
                        ctx.cancelled().await;
                        Outcome::Succeeded(json!(null))
                    }
                    Some("hold") => {
                        g.cancelled().await;
                        Outcome::Succeeded(json!(null))
                    }
                    _ => Outcome::Succeeded(json!({"ok": true})),
                }
            }
        }),
    );
    let opts = EnqueueOptions::default();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(p.enqueue(&json!({"kind": "ok"}), &opts).await.unwrap().id);
    }
    ids.push(
        p.enqueue(
            &json!({"kind": "retry"}),
            &EnqueueOptions {
                max_attempts: Some(2),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id,
    );
    ids.push(
        p.enqueue(
            &json!({"kind": "stall"}),
            &EnqueueOptions {
                max_attempts: Some(1),
                progress_timeout: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .id,
    );
    let _: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg("payload")
        .arg("{broken")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    for id in &ids {
        p.wait(id, Duration::from_secs(20)).await.unwrap();
    }
    let hold = p.enqueue(&json!({"kind": "hold"}), &opts).await.unwrap();
    eventually(Duration::from_secs(10), "hold running", || async {
        p.status(&hold.id).await.unwrap().state == JobState::Running
    })
    .await;
    p.enqueue(
        &json!({}),
        &EnqueueOptions {
            delay: Some(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    p.enqueue(&json!({"kind": "ok"}), &opts).await.unwrap();
    p.enqueue(&json!({"kind": "ok"}), &opts).await.unwrap();
    eventually(Duration::from_secs(10), "dead letters written", || async {
        s.stat("img", "dead").await == 3
    })
    .await;

    let b = s.broker(fast_broker()).await;
    // The node record shows the busy slot once its heartbeat ran.
    eventually(
        Duration::from_secs(10),
        "busy slot in the node record",
        || async {
            scrape(&format!("{}/metrics", b.base))
                .await
                .find("fleetq_node_busy_slots", &[("node", "gpu-1")])
                == Some(1.0)
        },
    )
    .await;
    let m = scrape(&format!("{}/metrics", b.base)).await;
    let q = [("queue", "img")];
    assert_eq!(m.get("fleetq_queue_waiting", &q), 2.0);
    assert_eq!(m.get("fleetq_queue_in_flight", &q), 1.0);
    assert_eq!(m.get("fleetq_queue_delayed", &q), 1.0);
    assert_eq!(m.get("fleetq_queue_dead", &q), 3.0);
    assert!(m.get("fleetq_queue_oldest_waiting_seconds", &q) > 0.0);
    assert_eq!(m.get("fleetq_queue_enqueued_total", &q), 10.0);
    assert_eq!(m.get("fleetq_queue_consumers", &q), 1.0);
    assert_eq!(
        m.get(
            "fleetq_queue_jobs_total",
            &[("queue", "img"), ("outcome", "succeeded")]
        ),
        3.0
    );
    assert_eq!(
        m.get(
            "fleetq_queue_jobs_total",
            &[("queue", "img"), ("outcome", "retried")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "fleetq_queue_jobs_total",
            &[("queue", "img"), ("outcome", "dead")]
        ),
        3.0
    );
    assert_eq!(
        m.get(
            "fleetq_queue_timeouts_total",
            &[("queue", "img"), ("kind", "progress")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "fleetq_queue_node_timeouts_total",
            &[("node", "gpu-1"), ("kind", "progress")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "fleetq_queue_node_jobs_total",
            &[("node", "gpu-1"), ("outcome", "succeeded")]
        ),
        3.0
    );
    assert_eq!(m.get("fleetq_nodes", &[("state", "live")]), 1.0);
    assert_eq!(m.get("fleetq_nodes", &[("state", "suspended")]), 0.0);
    assert_eq!(m.get("fleetq_node_slots", &[("node", "gpu-1")]), 1.0);
    assert!(m.get("fleetq_node_heartbeat_age_seconds", &[("node", "gpu-1")]) < 5.0);
    assert_eq!(m.get("fleetq_queue_reclaimed_total", &q), 0.0);
    assert_eq!(m.get("fleetq_queue_fenced_total", &q), 0.0);

    // Values agree with Redis itself.
    let pending: u64 = redis::cmd("XPENDING")
        .arg(keys.stream())
        .arg("workers")
        .query_async::<Vec<redis::Value>>(&mut s.conn())
        .await
        .map(|v| redis::from_redis_value_ref(&v[0]).unwrap())
        .unwrap();
    assert_eq!(pending as f64, m.get("fleetq_queue_in_flight", &q));
    let delayed: u64 = redis::cmd("ZCARD")
        .arg(keys.delayed())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(delayed as f64, m.get("fleetq_queue_delayed", &q));
    let dead: u64 = redis::cmd("XLEN")
        .arg(keys.dead())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(dead as f64, m.get("fleetq_queue_dead", &q));

    // The worker's own metrics.
    let worker_metrics = s.first_node_metrics_url().await;
    let wm = scrape(&worker_metrics).await;
    let l = |k: &'static str, v: &'static str| [("queue", "img"), ("node", "gpu-1"), (k, v)];
    assert_eq!(wm.get("fleetq_jobs_total", &l("outcome", "succeeded")), 3.0);
    assert_eq!(wm.get("fleetq_jobs_total", &l("outcome", "retried")), 1.0);
    assert_eq!(wm.get("fleetq_jobs_total", &l("outcome", "dead")), 3.0);
    assert_eq!(wm.get("fleetq_jobs_total", &l("outcome", "expired")), 0.0);
    assert_eq!(
        wm.get("fleetq_job_timeouts_total", &l("kind", "progress")),
        1.0
    );
    assert_eq!(
        wm.get("fleetq_job_timeouts_total", &l("kind", "lease")),
        0.0
    );
    let w_labels = [("queue", "img"), ("node", "gpu-1")];
    assert_eq!(wm.get("fleetq_worker_slots", &w_labels), 1.0);
    assert_eq!(wm.get("fleetq_worker_busy_slots", &w_labels), 1.0);
    assert_eq!(wm.get("fleetq_node_suspended", &w_labels), 0.0);
    assert_eq!(wm.get("fleetq_jobs_reclaimed_total", &w_labels), 0.0);
    assert_eq!(wm.get("fleetq_commits_fenced_total", &w_labels), 0.0);
    let count = |name: &str| {
        wm.find(&format!("{name}_count"), &w_labels)
            .or_else(|| wm.find(name, &w_labels))
            .unwrap()
    };
    // First attempts started: 3 ok, retry, stall, hold. Attempts ended: 3 ok, 2 retry, stall.
    assert_eq!(count("fleetq_job_wait_seconds"), 6.0);
    assert_eq!(count("fleetq_job_run_seconds"), 6.0);
    assert!(
        !reqwest::get(&worker_metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains(&hold.id),
        "no job id in any label"
    );
    gate.cancel();
    b.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_promote_and_expire_each_job_exactly_once() {
    const N: usize = 20;
    let s = Stack::start().await;
    // Every promotion's `queued` event is counted below.
    s.configure(
        "q",
        &QueueConfig {
            routine_events: true,
            ..QueueConfig::default()
        },
    )
    .await;
    let p = s.producer("q").await;
    let keys = QueueKeys::new("q").unwrap();
    s.create_group("q").await;
    let b1 = s.broker(fast_broker()).await;
    let b2 = s.broker(fast_broker()).await;
    let delay = EnqueueOptions {
        delay: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let expire = EnqueueOptions {
        queue_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    for _ in 0..N {
        p.enqueue(&json!({"scheduled": true}), &delay)
            .await
            .unwrap();
        p.enqueue(&json!({"short": true}), &expire).await.unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "all promoted and expired",
        || async {
            s.stat("q", "readded").await == N as i64 && s.stat("q", "expired").await == N as i64
        },
    )
    .await;
    // More maintenance, as a third broker would run it beside the two: nothing more happens.
    for _ in 0..5 {
        let t = fleetq_broker::maintenance::tick(&s.redis, &keys)
            .await
            .unwrap();
        assert_eq!((t.promoted, t.expired), (0, 0));
    }
    assert_eq!(s.stat("q", "readded").await, N as i64);
    assert_eq!(s.stat("q", "expired").await, N as i64);
    assert_eq!(count_events(&s, "q", "expired").await, N);
    let promoted: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(keys.events())
        .arg("-")
        .arg("+")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let promoted = promoted
        .iter()
        .filter(|(_, f)| f.contains(&("promoted".to_owned(), "1".to_owned())))
        .count();
    assert_eq!(promoted, N);
    let len: u64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(
        len as usize,
        2 * N,
        "N promoted + N expired-but-unread entries, no duplicates"
    );
    let m = scrape(&format!("{}/metrics", b1.base)).await;
    assert_eq!(
        m.get("fleetq_queue_waiting", &[("queue", "q")]),
        N as f64,
        "expired entries are not waiting"
    );
    assert_eq!(m.get("fleetq_queue_delayed", &[("queue", "q")]), 0.0);
    b1.stop().await;
    b2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_round_trip_for_every_endpoint() {
    let s = Stack::start().await;
    let b = s
        .broker(BrokerConfig {
            api_token: Some("t0ken".into()),
            max_body_bytes: 2048,
            ..fast_broker()
        })
        .await;
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", b.base);
    let authed = |rb: reqwest::RequestBuilder| rb.bearer_auth("t0ken");

    // Auth.
    let r = http
        .post(url("/v1/queues/img/jobs"))
        .json(&json!({"payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("missing bearer token"));
    let r = http
        .get(url("/v1/queues"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("wrong bearer token"));

    // Bad input.
    let r = authed(http.post(url("/v1/queues/img/jobs")))
        .body(format!("{{\"payload\": \"{}\"}}", "x".repeat(4000)))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert!(r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("size limit"));
    let r = authed(http.post(url("/v1/queues/img/jobs")))
        .body("{\"payload\": {")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let err = r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.contains("not valid JSON") && err.contains("line 1"),
        "{err}"
    );
    let r = authed(http.post(url("/v1/queues/img/jobs")))
        .json(&json!({"payload": {}, "colour": "red"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("colour"));
    let r = authed(http.post(url("/v1/queues/bad:name/jobs")))
        .json(&json!({"payload": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("invalid queue name"));

    // Enqueue, status, wait, cancel.
    let r = authed(http.post(url("/v1/queues/img/jobs")))
        .json(&json!({"payload": {"prompt": "fox"}, "id": "job-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        (
            e["id"].as_str(),
            e["state"].as_str(),
            e["position"].as_u64()
        ),
        (Some("job-1"), Some("waiting"), Some(1))
    );
    let st: Value = authed(http.get(url("/v1/queues/img/jobs/job-1")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["state"], "waiting");
    assert_eq!(st["position"], 1);
    let r = authed(http.get(url("/v1/queues/img/jobs/nope")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no job nope"));
    let r = authed(http.get(url("/v1/queues/img/jobs/job-1/wait?timeout_ms=200")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 408);
    let w = s.worker(
        worker_config("img", "gpu-1", 1),
        FnHandler::new(|job, _| async move {
            Outcome::Succeeded(
                json!({"image": format!("{}.png", job.payload["prompt"].as_str().unwrap())}),
            )
        }),
    );
    let st: Value = authed(http.get(url("/v1/queues/img/jobs/job-1/wait?timeout_ms=10000")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["state"], "succeeded");
    assert_eq!(st["result"]["image"], "fox.png");
    w.stop().await;
    let e: Value = authed(http.post(url("/v1/queues/img/jobs")))
        .json(&json!({"payload": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = authed(http.delete(url(&format!(
        "/v1/queues/img/jobs/{}",
        e["id"].as_str().unwrap()
    ))))
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "cancelled");
    assert_eq!(
        authed(http.delete(url("/v1/queues/img/jobs/nope")))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // Queues.
    let qs: Value = authed(http.get(url("/v1/queues")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let img = qs
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "img")
        .unwrap();
    assert_eq!(img["stats"]["succeeded"], 1);

    // Dead letters: list, retry, purge one, purge all.
    let keys = QueueKeys::new("img").unwrap();
    for _ in 0..2 {
        let _: String = redis::cmd("XADD")
            .arg(keys.dead())
            .arg("*")
            .arg("job")
            .arg("x")
            .arg("reason")
            .arg("poison")
            .arg("error")
            .arg("boom")
            .arg("attempts")
            .arg(3)
            .arg("nodes")
            .arg("a,b,c")
            .arg("f:payload")
            .arg("{\"n\":1}")
            .query_async(&mut s.conn())
            .await
            .unwrap();
    }
    let dead: Value = authed(http.get(url("/v1/queues/img/dead?count=10")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dead = dead.as_array().unwrap().clone();
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["reason"], "poison");
    assert_eq!(dead[0]["nodes"], json!(["a", "b", "c"]));
    let id0 = dead[0]["dead_id"].as_str().unwrap();
    let r: Value = authed(http.post(url(&format!("/v1/queues/img/dead/{id0}/retry"))))
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["job"], "x");
    let st: Value = authed(http.get(url("/v1/queues/img/jobs/x")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["state"], "waiting");
    assert_eq!(
        authed(http.post(url(&format!("/v1/queues/img/dead/{id0}/retry"))))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    for bad in [
        "/v1/queues/img/dead/not-an-id/retry",
        "/v1/queues/img/dead/1-x/retry",
    ] {
        let r = authed(http.post(url(bad)))
            .header("content-type", "application/json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("<ms>-<seq>"),
            "{body}"
        );
    }
    let id1 = dead[1]["dead_id"].as_str().unwrap();
    let r: Value = authed(http.delete(url(&format!("/v1/queues/img/dead/{id1}"))))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["purged"], 1);
    assert_eq!(
        authed(http.delete(url(&format!("/v1/queues/img/dead/{id1}"))))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let r: Value = authed(http.delete(url("/v1/queues/img/dead")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["purged"], 0);

    // Open endpoints.
    assert_eq!(
        http.get(url("/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(http.get(url("/readyz")).send().await.unwrap().status(), 200);
    let metrics = http
        .get(url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("fleetq_queue_waiting{queue=\"img\"}"));
    let doc: Value = http
        .get(url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/queues/{queue}/jobs",
        "/v1/queues/{queue}/jobs/{id}/wait",
        "/v1/queues/{queue}/dead/{dead_id}/retry",
        "/readyz",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_without_a_restart() {
    let mut s = Stack::start().await;
    let b = s.broker(fast_broker()).await;
    let ready = |base: String| async move {
        reqwest::Client::new()
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(ready(b.base.clone()).await, 200);
    s.server.kill();
    eventually(
        Duration::from_secs(15),
        "unready while Redis is down",
        || ready(b.base.clone()).map_status(503),
    )
    .await;
    let body: Value = reqwest::get(format!("{}/readyz", b.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["status"], "unready");
    assert!(!body["error"].as_str().unwrap().is_empty());
    s.server.restart().unwrap();
    eventually(
        Duration::from_secs(20),
        "ready again once Redis is back",
        || ready(b.base.clone()).map_status(200),
    )
    .await;
    b.stop().await;
}

trait MapStatus {
    async fn map_status(self, want: u16) -> bool;
}

impl<F: std::future::Future<Output = reqwest::StatusCode>> MapStatus for F {
    async fn map_status(self, want: u16) -> bool {
        self.await.as_u16() == want
    }
}
