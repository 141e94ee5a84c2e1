//! Dashboards, alert rules and the compose stack, proven: a real Prometheus scrapes a live
//! broker and workers while jobs flow (a timeout and a reclaim included), and every PromQL
//! expression of the dashboards and the rules must be valid and return data. promtool checks
//! the config and rules; a real Compose parser checks docker-compose.yml; the metric names of
//! dashboards, rules and docs/metrics.md agree both ways.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleetq_broker::service::BrokerConfig;
use fleetq_broker::{EnqueueOptions, JobState, QueueConfig, QueueKeys};
use fleetq_tests::{eventually, free_port, worker_config, FnHandler, Stack, WorkerProcess};
use fleetq_worker::Outcome;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn need(tool: &str, install: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap()
        .status
        .success();
    assert!(
        found,
        "{tool} is needed for this test: {install} (`./dev test` installs it)"
    );
}

/// Every PromQL expression of the two dashboards, with Grafana's variables filled in.
fn dashboard_exprs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for name in ["overview", "nodes"] {
        let path = root().join(format!("dashboards/grafana/{name}.json"));
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap().to_owned();
                out.push((format!("{name}: {}", p["title"].as_str().unwrap()), expr));
            }
        }
    }
    out
}

fn grafana_vars(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$queue", ".+")
        .replace("$node", ".+")
}

/// (name, expr, is_alert) of every rule.
fn rules() -> Vec<(String, String, bool)> {
    let text = std::fs::read_to_string(root().join("dashboards/rules/fleetq.yml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = Vec::new();
    for g in doc["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let expr = r["expr"].as_str().unwrap().to_owned();
            match (r["alert"].as_str(), r["record"].as_str()) {
                (Some(a), _) => out.push((a.to_owned(), expr, true)),
                (_, Some(rec)) => out.push((rec.to_owned(), expr, false)),
                _ => panic!("a rule with neither alert nor record"),
            }
        }
    }
    out
}

/// The quantity of an alert written `(quantity) <op> threshold`.
fn alert_quantity(expr: &str) -> String {
    let e = expr.trim();
    assert!(
        e.starts_with('('),
        "alert expressions are written `(quantity) <op> threshold`: {e}"
    );
    let mut depth = 0;
    for (i, c) in e.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return e[1..i].to_owned();
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses in {e}");
}

fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("fleetq_") {
        let start = i + pos;
        let prev_ok = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if prev_ok {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

fn documented_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("fleetq_"))
        .map(str::to_owned)
        .collect()
}

fn base_name(name: &str, documented: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if documented.contains(base) {
                return base.to_owned();
            }
        }
    }
    name.to_owned()
}

#[test]
fn dashboards_and_rules_use_only_documented_metrics_and_every_metric_is_on_a_panel() {
    let documented = documented_metrics();
    assert!(documented.len() >= 20, "{documented:?}");
    let mut on_panels = BTreeSet::new();
    for (panel, expr) in dashboard_exprs() {
        for m in metric_names(&expr) {
            let m = base_name(&m, &documented);
            assert!(
                documented.contains(&m),
                "{panel} uses {m}, which docs/metrics.md does not list"
            );
            on_panels.insert(m);
        }
    }
    for (name, expr, _) in rules() {
        for m in metric_names(&expr) {
            let m = base_name(&m, &documented);
            assert!(
                documented.contains(&m),
                "rule {name} uses {m}, which docs/metrics.md does not list"
            );
        }
    }
    let missing: Vec<_> = documented.difference(&on_panels).collect();
    assert!(missing.is_empty(), "metrics on no panel: {missing:?}");
}

#[test]
fn promtool_accepts_the_config_and_the_rules() {
    need("promtool", "apt-get install -y prometheus");
    let dir = root().join("dashboards");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "rules/fleetq.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn compose_file_is_valid_and_every_service_is_built_or_pulled() {
    // Compose v2 (`docker compose`) where it is installed, else the classic `docker-compose`.
    let v2 = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !v2 {
        need("docker-compose", "apt-get install -y docker-compose");
    }
    // No .env of the checkout's: the broker's token comes from here or not at all.
    let no_env = tempfile::NamedTempFile::new().unwrap();
    let config = |token: Option<&str>| {
        let mut cmd = if v2 {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        } else {
            Command::new("docker-compose")
        };
        cmd.arg("--env-file")
            .arg(no_env.path())
            .args(["-f", "docker-compose.yml", "config"])
            .current_dir(root())
            .env_remove("FLEETQ_API_TOKEN");
        if let Some(t) = token {
            cmd.env("FLEETQ_API_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let refused = config(None);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("set FLEETQ_API_TOKEN"),
        "the stack should not start without an API token:\n{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = config(Some("compose-test-token"));
    assert!(
        out.status.success(),
        "docker-compose config:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).unwrap();
    let services = doc["services"].as_mapping().unwrap();
    let names: BTreeSet<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for want in [
        "redis",
        "broker",
        "worker-1",
        "worker-2",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(want), "service {want} missing: {names:?}");
    }
    for (name, svc) in services {
        let image = svc["image"].as_str().unwrap_or("");
        assert!(
            !image.is_empty() && (svc.get("build").is_some() || image.contains(':')),
            "{name:?}: neither built nor a named, tagged image"
        );
        assert!(
            svc.get("restart").is_some(),
            "{name:?} has no restart policy"
        );
        assert!(
            svc.get("healthcheck").is_some() || image == "fleetq:local",
            "{name:?} has no health check"
        );
    }
    assert_eq!(
        services["broker"]["environment"]["FLEETQ_API_TOKEN"].as_str(),
        Some("compose-test-token")
    );
    assert!(services["broker"]["environment"]["REDIS_URL"].is_string());
    let redis_cmd = serde_yaml::to_string(&services["redis"]["command"]).unwrap();
    assert!(
        redis_cmd.contains("appendonly") && redis_cmd.contains("noeviction"),
        "{redis_cmd}"
    );
    assert!(root().join("Dockerfile").exists());
}

/// A Prometheus on a free loopback port, killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    _dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn start_prometheus(targets_broker: &[String], targets_workers: &[String]) -> Prometheus {
    let dir = std::env::temp_dir().join(format!(
        "fleetq-prom-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = root()
        .join("dashboards/rules/fleetq.yml")
        .canonicalize()
        .unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: fleetq-broker\n    static_configs:\n      - targets: {:?}\n  - job_name: fleetq-worker\n    static_configs:\n      - targets: {:?}\n",
        rules.display(), targets_broker, targets_workers
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    Prometheus {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

async fn query(base: &str, expr: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap();
    r.json().await.unwrap()
}

/// The dashboard and rule expressions that are invalid or have no data now, with the answer.
async fn failing_queries(base: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (panel, expr) in dashboard_exprs() {
        let e = grafana_vars(&expr);
        let r = query(base, &e).await;
        if r["status"] != "success" || r["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!("{panel}: {e} → {r}"));
        }
    }
    for (name, expr, is_alert) in rules() {
        let r = query(base, &expr).await;
        if r["status"] != "success" {
            failures.push(format!("rule {name} invalid: {expr} → {r}"));
            continue;
        }
        let data_expr = if is_alert {
            alert_quantity(&expr)
        } else {
            expr.clone()
        };
        let r = query(base, &data_expr).await;
        if r["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!("rule {name} has no data: {data_expr} → {r}"));
        }
    }
    failures
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_and_rule_query_returns_data_from_a_live_stack() {
    need("prometheus", "apt-get install -y prometheus");
    let s = Stack::start().await;
    s.configure(
        "img",
        &QueueConfig {
            lease: Duration::from_secs(1),
            progress_timeout: Some(Duration::from_millis(400)),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(40),
            ..QueueConfig::default()
        },
    )
    .await;
    // Retries may come back to gpu-a soon (gpu-c is busy, then dead).
    let _: () = redis::cmd("HSET")
        .arg(QueueKeys::new("img").unwrap().config())
        .arg("failover_cooldown_ms")
        .arg(300)
        .query_async(&mut s.conn())
        .await
        .unwrap();
    let p = s.producer("img").await;
    let broker = s
        .broker(BrokerConfig {
            maintenance_interval: Duration::from_millis(200),
            ..BrokerConfig::default()
        })
        .await;
    // Worker C, a process, takes a long job; it will be killed with the job in hand.
    let c_port = free_port();
    let c = WorkerProcess::spawn(
        &s.server.url(),
        "img",
        "gpu-c",
        1,
        &["--metrics-addr", &format!("127.0.0.1:{c_port}")],
    );
    let quiet_ok = EnqueueOptions {
        progress_timeout: Some(Duration::from_secs(120)),
        ..Default::default()
    };
    let long = p
        .enqueue(&json!({"sleep_ms": 60000}), &quiet_ok)
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "long job on gpu-c", || async {
        p.status(&long.id).await.unwrap().node.as_deref() == Some("gpu-c")
    })
    .await;
    // Worker A, in-process; the stalled first attempts of `hold` jobs trip its progress timeout.
    let a_port = free_port();
    let mut cfg = worker_config("img", "gpu-a", 2);
    cfg.metrics_addr = Some(format!("127.0.0.1:{a_port}").parse().unwrap());
    cfg.heartbeat = Duration::from_millis(500);
    let a = s.worker(
        cfg,
        FnHandler::new(|job, ctx: fleetq_worker::JobContext| async move {
            if job.payload["stall"] == true && job.attempt == 1 {
                ctx.cancelled().await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            Outcome::Succeeded(json!({"ok": true}))
        }),
    );
    let prom = start_prometheus(
        &[broker.base.trim_start_matches("http://").to_owned()],
        &[format!("127.0.0.1:{a_port}"), format!("127.0.0.1:{c_port}")],
    );
    eventually(Duration::from_secs(30), "prometheus ready", || async {
        reqwest::get(format!("{}/-/ready", prom.base))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let mut hold = Vec::new();
    for _ in 0..2 {
        hold.push(
            p.enqueue(&json!({"stall": true}), &EnqueueOptions::default())
                .await
                .unwrap()
                .id,
        );
    }
    // Flow: successes, a dead letter, and scrape time.
    for i in 0..10 {
        p.enqueue(&json!({"n": i}), &EnqueueOptions::default())
            .await
            .unwrap();
    }
    let keys = QueueKeys::new("img").unwrap();
    let _: String = redis::cmd("XADD")
        .arg(keys.stream())
        .arg("*")
        .arg("payload")
        .arg("{x")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    // gpu-c must be on record in Prometheus before it dies.
    let c_scraped = format!("count_over_time(up{{instance=\"127.0.0.1:{c_port}\"}}[1m]) >= 2");
    eventually(Duration::from_secs(20), "gpu-c scraped twice", || async {
        query(&prom.base, &c_scraped).await["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    })
    .await;
    // Frozen, not killed: a killed worker's job is put back in line by the broker (its
    // connections close), a frozen one's is reclaimed when its lease runs out, which is what
    // the reclaim panels and the per-node lease timeouts show.
    c.signal(libc::SIGSTOP);
    let st = p.wait(&long.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        (st.state, st.nodes.last().map(String::as_str)),
        (JobState::Succeeded, Some("gpu-a")),
        "reclaimed by gpu-a"
    );
    for id in &hold {
        assert_eq!(
            p.wait(id, Duration::from_secs(20)).await.unwrap().state,
            JobState::Succeeded
        );
    }
    eventually(Duration::from_secs(20), "a reclaim happened", || async {
        s.stat("img", "reclaimed").await >= 1
    })
    .await;

    let up = query(&prom.base, "up").await;
    assert!(
        up["data"]["result"].as_array().unwrap().len() >= 3,
        "{up}\n{}",
        log_of(&prom._dir)
    );
    // Poll (the last scrapes and rule runs may still be on their way) until every query is
    // valid and has data, or the deadline says which are not.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let failures = failing_queries(&prom.base).await;
        if failures.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} expressions failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The alerting side works too: Prometheus loaded every rule.
    let loaded: Value = reqwest::get(format!("{}/api/v1/rules", prom.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n: usize = loaded["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(n, rules().len());
    a.stop().await;
    broker.stop().await;
}
