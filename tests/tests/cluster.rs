//! fleetq on a Redis Cluster (3 primaries, 3 replicas) through one seed URL: queues whose
//! slots live on each primary are enqueued to, worked, inspected and scraped; a failover
//! (manual, or a primary killed) while jobs run loses and doubles nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use fleetq_broker::{inspect, nodes, EnqueueOptions, JobState, Producer, QueueKeys, Redis};
use fleetq_tests::cluster::RedisCluster;
use fleetq_tests::{bin_path, eventually, scrape, WorkerProcess};
use serde_json::{json, Value};

fn cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin_path("fleetq"))
        .args(args)
        .env("REDIS_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run fleetq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cli_json(url: &str, args: &[&str]) -> Value {
    let (url, args): (String, Vec<String>) =
        (url.to_owned(), args.iter().map(|s| s.to_string()).collect());
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&url, &args)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}\n{err}"))
}

/// Starts an in-process broker on the cluster and returns its base URL.
async fn broker(redis: &Redis) -> (String, tokio_util::sync::CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let (s, redis) = (stop.clone(), redis.clone());
    tokio::spawn(async move {
        fleetq_broker::service::run(redis, listener, Default::default(), async move {
            s.cancelled().await
        })
        .await
        .expect("broker run");
    });
    (base, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_seed_url_serves_queues_on_every_primary() {
    let cluster = RedisCluster::start().await;
    let url = cluster.seed_url();
    let queues = cluster.queue_names_on_each_primary().await;
    let redis = Redis::connect(&url).await.unwrap();
    assert_eq!(redis.topology(), "cluster");
    assert_eq!(redis.primaries().await.unwrap().len(), 3);

    let workers: Vec<WorkerProcess> = queues
        .iter()
        .enumerate()
        .map(|(i, q)| {
            WorkerProcess::spawn(&url, q, &format!("gpu-{i}"), 2, &["--heartbeat-ms", "200"])
        })
        .collect();
    let mut ids = Vec::new();
    for q in &queues {
        let p = Producer::new(&redis, q).await.unwrap();
        for n in 0..10 {
            let e = p
                .enqueue(&json!({ "result": n }), &EnqueueOptions::default())
                .await
                .unwrap();
            ids.push((p.clone(), e.id));
        }
    }
    for (p, id) in &ids {
        let st = p.wait(id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{} {id}", p.keys().name());
    }

    // The CLI, the library and the broker see every queue and every node.
    let listed = cli_json(&url, &["queues", "--json"]).await;
    for q in &queues {
        let row = listed
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["queue"] == q.as_str())
            .unwrap_or_else(|| panic!("{q} missing from {listed}"));
        assert_eq!(row["stats"]["succeeded"], 10, "{row}");
    }
    eventually(Duration::from_secs(10), "three live nodes", || async {
        nodes::list(&redis).await.unwrap().len() == 3
    })
    .await;
    let listed = cli_json(&url, &["nodes", "--json"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    let (p, id) = &ids[25];
    let st = cli_json(&url, &["status", id, "--queue", p.keys().name(), "--json"]).await;
    assert_eq!(st["state"], "succeeded", "{st}");

    // A dead letter on the third primary's queue, listed and retried through the seed URL.
    let p = Producer::new(&redis, &queues[2]).await.unwrap();
    let opts = EnqueueOptions {
        max_attempts: Some(1),
        ..Default::default()
    };
    let bad = p.enqueue(&json!({ "fail": "retry" }), &opts).await.unwrap();
    assert_eq!(
        p.wait(&bad.id, Duration::from_secs(20))
            .await
            .unwrap()
            .state,
        JobState::Dead
    );
    let dead = inspect::dead_letters(&redis, &QueueKeys::new(&queues[2]).unwrap(), "-", 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    let listed = cli_json(&url, &["dead", &queues[2], "list", "--json"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Metrics cover every queue.
    let (base, stop) = broker(&redis).await;
    eventually(
        Duration::from_secs(10),
        "metrics of every queue",
        || async {
            let m = scrape(&format!("{base}/metrics")).await;
            queues.iter().all(|q| {
                m.find(
                    "fleetq_queue_jobs_total",
                    &[("queue", q), ("outcome", "succeeded")],
                ) == Some(10.0)
            })
        },
    )
    .await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);

    // A large payload goes around the functions (a plain XADD in a MULTI, on its queue's
    // primary) and runs there too.
    let large = json!({ "blob": "x".repeat(fleetq_broker::producer::PLAIN_PAYLOAD_BYTES) });
    for q in &queues {
        let p = Producer::new(&redis, q).await.unwrap();
        let e = p.enqueue(&large, &EnqueueOptions::default()).await.unwrap();
        assert_eq!((e.state, e.created), (JobState::Waiting, true), "{q}");
        assert!(e.position >= 1, "{q}: {e:?}");
        let st = p.wait(&e.id, Duration::from_secs(20)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{q}: {st:?}");
    }
    stop.cancel();
    drop(workers);
}

/// Runs `jobs` jobs on a queue of each primary while `fault` strikes, and checks every job
/// ended once, as succeeded, and work resumed soon after.
async fn jobs_survive(cluster: &mut RedisCluster, fault: &str) {
    let url = cluster.seed_url();
    let queues = cluster.queue_names_on_each_primary().await;
    let redis = Redis::connect(&url).await.unwrap();
    let _workers: Vec<WorkerProcess> = queues
        .iter()
        .enumerate()
        .flat_map(|(i, q)| (0..2).map(move |k| (i, k, q.clone())))
        .map(|(i, k, q)| WorkerProcess::spawn(&url, &q, &format!("gpu-{i}-{k}"), 2, &[]))
        .collect();
    let producers: Vec<Producer> = {
        let mut v = Vec::new();
        for q in &queues {
            v.push(Producer::new(&redis, q).await.unwrap());
        }
        v
    };
    let mut ids: Vec<(usize, String)> = Vec::new();
    let target = primary_port_for(cluster, &queues[0]).await;
    let mut struck = None;
    for n in 0..150 {
        let i = n % 3;
        let e = loop {
            match producers[i]
                .enqueue(&json!({ "sleep_ms": 20 }), &EnqueueOptions::default())
                .await
            {
                Ok(e) => break e,
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("enqueue: {e}"),
            }
        };
        ids.push((i, e.id));
        if n == 60 {
            let new = match fault {
                "failover" => cluster.failover(target).await,
                _ => cluster.kill_primary(target).await,
            };
            // Work resumes on the struck primary's queue: a job enqueued once the new
            // primary answers runs soon (printed; bounded loosely so a stuck worker fails).
            let t = Instant::now();
            let probe = loop {
                match producers[0]
                    .enqueue(&json!({}), &EnqueueOptions::default())
                    .await
                {
                    Ok(e) => break e,
                    Err(e) if e.is_transient() => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("enqueue: {e}"),
                }
            };
            let st = producers[0]
                .wait(&probe.id, Duration::from_secs(15))
                .await
                .unwrap();
            assert_eq!(st.state, JobState::Succeeded);
            eprintln!(
                "{fault}: first job after the new primary {new} answered ran in {:?}",
                t.elapsed()
            );
            ids.push((0, probe.id));
            struck = Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        struck.is_some_and(|t| t < Duration::from_secs(10)),
        "{struck:?}"
    );
    for (i, id) in &ids {
        let st = producers[*i].wait(id, Duration::from_secs(40)).await;
        let st = st.unwrap_or_else(|e| panic!("{id} on {}: {e}", queues[*i]));
        assert_eq!(st.state, JobState::Succeeded, "{id}: {st:?}");
    }
    // Nothing succeeded twice: each queue counted exactly its jobs.
    for (i, q) in queues.iter().enumerate() {
        let state = inspect::queue_state(&redis, &QueueKeys::new(q).unwrap())
            .await
            .unwrap();
        let mine = ids.iter().filter(|(k, _)| *k == i).count() as i64;
        assert_eq!(
            state.stats.get("succeeded").copied(),
            Some(mine),
            "{q}: {state:?}"
        );
    }
}

async fn primary_port_for(cluster: &RedisCluster, queue: &str) -> u16 {
    let slot = cluster
        .slot_of(&QueueKeys::new(queue).unwrap().stream())
        .await;
    cluster.primary_for_slot(slot).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_while_jobs_run_loses_and_doubles_nothing() {
    let mut cluster = RedisCluster::start().await;
    jobs_survive(&mut cluster, "failover").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_replaced_by_its_replica_loses_and_doubles_nothing() {
    let mut cluster = RedisCluster::start().await;
    jobs_survive(&mut cluster, "kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_urls_are_checked() {
    let e = Redis::connect("redis+cluster://127.0.0.1:1/3")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("database 0 only"), "{e}");
    let e = Redis::connect("redis+sentinel://127.0.0.1:1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("service"), "{e}");
}

/// `/readyz` tells a cluster that lost a primary (no replica to promote) for what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_a_cluster_that_is_down() {
    let mut cluster = RedisCluster::start_with(fleetq_tests::cluster::ClusterOptions {
        replicas_per_primary: 0,
        ..Default::default()
    })
    .await;
    let redis = Redis::connect(&cluster.seed_url()).await.unwrap();
    let (base, stop) = broker(&redis).await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let doomed = cluster.primary_ports().await[1];
    cluster.kill(doomed);
    eventually(
        Duration::from_secs(20),
        "readyz says CLUSTERDOWN",
        || async {
            let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
            let code = r.status();
            let body: Value = r.json().await.unwrap();
            code == 503
                && body["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("CLUSTERDOWN"))
        },
    )
    .await;
    stop.cancel();
}
