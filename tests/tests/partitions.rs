//! A hot queue split in partitions: on a 3-primary cluster the partitions land on every
//! primary, producers spread the jobs over them, workers run every job once and the CLI
//! shows the queue as one; on one server, a worker with one slot waits on every partition at
//! once and never holds more than its slot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use fleetq_broker::keys::GROUP;
use fleetq_broker::partitions::{self, Partitions};
use fleetq_broker::{functions, EnqueueOptions, JobState, Producer, QueueKeys, Redis};
use fleetq_tests::cluster::RedisCluster;
use fleetq_tests::{bin_path, eventually, worker_config, FnHandler, Stack, WorkerProcess};
use fleetq_worker::Outcome;
use serde_json::{json, Value};

fn cli_json(url: &str, args: &[&str]) -> Value {
    let out = Command::new(bin_path("fleetq"))
        .args(args)
        .arg("--json")
        .env("REDIS_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .expect("run fleetq");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"))
}

/// A queue name whose first three partitions live on three different primaries.
async fn spread_queue(cluster: &RedisCluster) -> String {
    for n in 0.. {
        let name = format!("hot-{n}");
        let base = QueueKeys::new(&name).unwrap();
        let mut owners = BTreeSet::new();
        for i in 0..3 {
            let slot = cluster.slot_of(&base.partition(i).stream()).await;
            owners.insert(cluster.primary_for_slot(slot).await);
        }
        if owners.len() == 3 {
            return name;
        }
    }
    unreachable!()
}

/// A queue in 3 partitions on 3 primaries of `cluster`, with the library loaded.
struct Split {
    url: String,
    redis: Redis,
    queue: String,
    base: QueueKeys,
    split: Partitions,
}

impl Split {
    async fn on(cluster: &RedisCluster) -> Self {
        let url = cluster.seed_url();
        let redis = Redis::connect(&url).await.unwrap();
        functions::load_all(&redis.conn()).await.unwrap();
        let queue = spread_queue(cluster).await;
        let base = QueueKeys::new(&queue).unwrap();
        let split = partitions::set(&redis, &base, 3).await.unwrap();
        Self {
            url,
            redis,
            queue,
            base,
            split,
        }
    }
}

async fn entries_added(redis: &Redis, keys: &QueueKeys) -> u64 {
    let info: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(keys.stream())
        .query_async(&mut redis.conn_for(&keys.stream()))
        .await
        .unwrap();
    let mut it = info.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if redis::from_redis_value::<String>(k).unwrap() == "entries-added" {
            return redis::from_redis_value(v).unwrap();
        }
    }
    panic!("no entries-added in XINFO STREAM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_partitions_over_three_primaries_run_every_job_once() {
    let cluster = RedisCluster::start().await;
    let Split {
        url,
        redis,
        queue,
        base,
        split,
    } = Split::on(&cluster).await;
    assert_eq!(split.count(), 3);
    // The config written on the queue is copied to its partitions.
    let _: () = redis::cmd("HSET")
        .arg(base.config())
        .arg("max_attempts")
        .arg(5)
        .query_async(&mut redis.conn())
        .await
        .unwrap();
    partitions::sync_config(&redis, &split).await.unwrap();
    let copied: Option<String> = redis::cmd("HGET")
        .arg(base.partition(2).config())
        .arg("max_attempts")
        .query_async(&mut redis.conn())
        .await
        .unwrap();
    assert_eq!(copied.as_deref(), Some("5"));

    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| WorkerProcess::spawn(&url, &queue, &format!("gpu-{i}"), 4, &[]))
        .collect();
    let p = Producer::new(&redis, &queue).await.unwrap();
    assert_eq!(p.partitions().count(), 3);
    let mut ids = Vec::new();
    for n in 0..60 {
        let e = p
            .enqueue(&json!({ "result": n }), &EnqueueOptions::default())
            .await
            .unwrap();
        assert!(e.created);
        ids.push(e.id);
    }
    for n in 0..15 {
        let opts = EnqueueOptions {
            id: Some(format!("order-{n}")),
            ..Default::default()
        };
        ids.push(p.enqueue(&json!({ "result": n }), &opts).await.unwrap().id);
    }
    // The same id again is the same job: it lands in the same partition.
    let again = EnqueueOptions {
        id: Some("order-3".into()),
        ..Default::default()
    };
    assert!(!p.enqueue(&json!({}), &again).await.unwrap().created);
    // A plain XADD on the queue itself, as a producer that knows nothing of partitions.
    let plain: String = redis::cmd("XADD")
        .arg(base.stream())
        .arg("*")
        .arg("payload")
        .arg(r#"{"result":"plain"}"#)
        .query_async(&mut redis.conn())
        .await
        .unwrap();
    ids.push(plain);

    for id in &ids {
        let st = p.wait(id, Duration::from_secs(60)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{id}: {st:?}");
        assert_eq!(st.attempts, 1, "{id} ran more than once: {st:?}");
    }
    // Jobs without an id went to the partitions in turn: 20 each.
    for i in 0..3 {
        let added = entries_added(&redis, &base.partition(i)).await;
        assert!(added >= 20, "partition {i} got {added} entries");
    }
    // The CLI shows the queue as one, and finds a job by its id alone.
    let (u, q) = (url.clone(), queue.clone());
    let (queues, status, shown) = tokio::task::spawn_blocking({
        let id = ids[7].clone();
        move || {
            (
                cli_json(&u, &["queues"]),
                cli_json(&u, &["status", &id, "--queue", &q]),
                cli_json(&u, &["partitions", &q]),
            )
        }
    })
    .await
    .unwrap();
    let listed: Vec<&Value> = queues
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["queue"].as_str().unwrap().starts_with(&queue))
        .collect();
    assert_eq!(listed.len(), 1, "{queues}");
    assert_eq!(listed[0]["queue"], queue.as_str());
    assert_eq!(listed[0]["enqueued_total"], 76, "{queues}");
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(shown["partitions"], 3, "{shown}");
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_waits_on_every_partition_and_holds_at_most_one_job() {
    let s = Stack::start().await;
    let base = QueueKeys::new("split").unwrap();
    let split: Partitions = partitions::set(&s.redis, &base, 3).await.unwrap();
    let mut config = worker_config("split", "gpu-a", 1);
    // Longer than the test: a partition nobody blocks on would wait for this.
    config.max_block = Duration::from_secs(60);
    let worker = s.worker(
        config,
        FnHandler::new(|job, _| async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Outcome::Succeeded(job.payload)
        }),
    );
    let p = s.producer("split").await;
    eventually(Duration::from_secs(10), "the worker's consumer", || async {
        let consumers: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(base.partition(2).stream())
            .arg(GROUP)
            .query_async(&mut s.conn())
            .await
            .unwrap_or_default();
        !consumers.is_empty()
    })
    .await;
    // One job at a time, each into the next partition, while the worker is idle: each is
    // picked up from its partition's blocked read, not after another partition's block.
    for n in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let e = p
            .enqueue(&json!({ "n": n }), &EnqueueOptions::default())
            .await
            .unwrap();
        let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
    }
    // A burst over all partitions: never more than the one slot pending at once.
    let mut ids = Vec::new();
    for n in 0..30 {
        let opts = EnqueueOptions::default();
        ids.push(p.enqueue(&json!({ "n": n }), &opts).await.unwrap().id);
    }
    let mut most = 0;
    for _ in 0..40 {
        // All partitions at one instant (MULTI/EXEC): counts read one after the other could
        // see a job finish in one partition and the next start in another, and add both.
        let mut pipe = redis::pipe();
        pipe.atomic();
        for keys in split.sources() {
            pipe.cmd("XPENDING").arg(keys.stream()).arg(GROUP);
        }
        type Summary = (
            u64,
            Option<String>,
            Option<String>,
            Option<Vec<redis::Value>>,
        );
        let counts: Vec<Summary> = pipe.query_async(&mut s.conn()).await.unwrap();
        let pending: u64 = counts.iter().map(|c| c.0).sum();
        most = most.max(pending);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in &ids {
        let st = p.wait(id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{st:?}");
        assert_eq!(st.attempts, 1, "{st:?}");
    }
    assert!(most <= 1, "{most} entries pending with one slot");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_under_a_split_queue_loses_and_doubles_nothing() {
    let cluster = RedisCluster::start().await;
    let Split {
        url,
        redis,
        queue,
        split,
        ..
    } = Split::on(&cluster).await;
    let _workers: Vec<WorkerProcess> = (0..2)
        .map(|i| WorkerProcess::spawn(&url, &queue, &format!("gpu-{i}"), 2, &[]))
        .collect();
    let p = Producer::new(&redis, &queue).await.unwrap();
    let struck = split.targets()[0].clone();
    let slot = cluster.slot_of(&struck.stream()).await;
    let target = cluster.primary_for_slot(slot).await;
    let mut ids = Vec::new();
    for n in 0..120 {
        let e = loop {
            match p
                .enqueue(&json!({ "sleep_ms": 20 }), &EnqueueOptions::default())
                .await
            {
                Ok(e) => break e,
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("enqueue: {e}"),
            }
        };
        ids.push(e.id);
        if n == 50 {
            let new = cluster.failover(target).await;
            // A job for the struck partition runs once the new primary answers.
            let id = (0..)
                .map(|k| format!("probe-{k}"))
                .find(|id| p.partitions().for_key(id) == &struck)
                .unwrap();
            let opts = EnqueueOptions {
                id: Some(id.clone()),
                ..Default::default()
            };
            let t = std::time::Instant::now();
            loop {
                match p.enqueue(&json!({}), &opts).await {
                    Ok(_) => break,
                    Err(e) if e.is_transient() => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("enqueue: {e}"),
                }
            }
            let st = p.wait(&id, Duration::from_secs(15)).await.unwrap();
            assert_eq!(st.state, JobState::Succeeded, "{st:?}");
            eprintln!(
                "first job on {} after its new primary {new} answered ran in {:?}",
                struck.name(),
                t.elapsed()
            );
            ids.push(id);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in &ids {
        let st = p.wait(id, Duration::from_secs(40)).await.unwrap();
        assert_eq!(st.state, JobState::Succeeded, "{id}: {st:?}");
    }
    // Nothing succeeded twice: the queue, its partitions added up, counted exactly its jobs.
    let served = partitions::served(&redis, std::slice::from_ref(&queue))
        .await
        .unwrap();
    let states = fleetq_broker::inspect::queue_states(&redis, &served)
        .await
        .unwrap();
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(states[0].stat("succeeded"), ids.len() as i64, "{states:?}");
}
