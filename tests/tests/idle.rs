//! Idle workers: the watch of `fleetq_reclaim` (one idle worker follows a queue's deadlines,
//! the others sleep), the node record's cheap renewals and its removal when a worker's
//! process is gone, and what idle workers on an empty queue make Redis do, counted with
//! `INFO commandstats` (the commands inside functions included) over whole cycles.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleetq_broker::connection::SharedConn;
use fleetq_broker::functions::fcall;
use fleetq_broker::{liveness, nodes, EnqueueOptions, JobState, QueueConfig, QueueKeys};
use fleetq_tests::{eventually, worker_config, FnHandler, Stack, WorkerProcess};
use fleetq_worker::Outcome;
use serde_json::json;

const QUEUE: &str = "idle";
const LEASE_MS: u64 = 10_000;
const SLEEP_MS: u64 = 60_000;

/// `fleetq_reclaim` as an idle worker calls it: (entries claimed, next wake, server now).
async fn reclaim(
    c: &mut SharedConn,
    keys: &QueueKeys,
    consumer: &str,
    free: usize,
    holds: usize,
) -> (usize, u64, u64) {
    type Entry = (String, Vec<(String, String)>);
    let (entries, wake, now): (Vec<Entry>, u64, u64) = fcall("fleetq_reclaim", keys)
        .arg(consumer)
        .arg(LEASE_MS)
        .arg(free)
        .arg(format!("node-{consumer}"))
        .arg(SLEEP_MS)
        .arg(holds)
        .query_async(c)
        .await
        .unwrap();
    (entries.len(), wake, now)
}

/// Whether `consumer` watches after this call (free slot, holding nothing).
async fn watches(c: &mut SharedConn, keys: &QueueKeys, consumer: &str) -> bool {
    reclaim(c, keys, consumer, 1, 0).await.1 > 0
}

async fn set_stat(c: &mut SharedConn, keys: &QueueKeys, field: &str, value: u64) {
    let _: () = redis::cmd("HSET")
        .arg(keys.stats())
        .arg(field)
        .arg(value)
        .query_async(c)
        .await
        .unwrap();
}

/// Two idle workers watch; the others are told to sleep. A seat passes on when its watcher
/// gives it up (no free slot), is late, or holds jobs while a caller holds none.
#[tokio::test]
async fn idle_workers_share_two_watch_seats() {
    let s = Stack::start().await;
    let keys = QueueKeys::new(QUEUE).unwrap();
    s.create_group(QUEUE).await;
    let mut c = s.conn();
    let (_, wake, now) = reclaim(&mut c, &keys, "w1", 1, 0).await;
    assert!(
        wake > now && wake <= now + LEASE_MS,
        "the first caller watches and calls again within a lease: wake {wake}, now {now}"
    );
    assert!(watches(&mut c, &keys, "w2").await, "the second seat");
    assert!(
        !watches(&mut c, &keys, "w3").await,
        "w1 and w2 watch, w3 sleeps"
    );
    assert!(watches(&mut c, &keys, "w1").await, "w1 keeps its seat");

    // w1 has no free slot: it gives its seat up, and the next caller takes it.
    assert_eq!(reclaim(&mut c, &keys, "w1", 0, 1).await.1, 0);
    assert!(watches(&mut c, &keys, "w3").await);
    assert!(!watches(&mut c, &keys, "w1").await);

    // w2 is late (it froze, or died idle): the next caller takes over.
    set_stat(&mut c, &keys, "watch:2:until_ms", 1).await;
    assert!(watches(&mut c, &keys, "w1").await);
    assert!(!watches(&mut c, &keys, "w2").await);

    // w3 holds jobs: a caller that holds none takes its seat (a watcher that froze must not
    // be the only one following its own leases); a caller that holds jobs too does not.
    assert!(reclaim(&mut c, &keys, "w3", 1, 2).await.1 > 0);
    assert_eq!(reclaim(&mut c, &keys, "w4", 1, 1).await.1, 0);
    assert!(watches(&mut c, &keys, "w5").await);
    assert!(!watches(&mut c, &keys, "w3").await);
    assert!(
        watches(&mut c, &keys, "w1").await,
        "w1's seat was not touched"
    );
}

/// A watcher wakes at the next deadline it learns (a lease, a retry); the others hear of
/// none, and their node counts alive until their next call.
#[tokio::test]
async fn the_watcher_follows_deadlines_and_the_others_count_alive_until_their_next_call() {
    let s = Stack::start().await;
    let keys = QueueKeys::new(QUEUE).unwrap();
    s.create_group(QUEUE).await;
    let p = s.producer(QUEUE).await;
    let mut c = s.conn();
    let delayed = EnqueueOptions {
        delay: Some(Duration::from_secs(2)),
        ..Default::default()
    };
    p.enqueue(&json!({}), &delayed).await.unwrap();
    let (_, wake, now) = reclaim(&mut c, &keys, "w1", 1, 0).await;
    assert!(
        wake > now + 1000 && wake <= now + 2000,
        "the watcher wakes when the retry is due: wake {wake}, now {now}"
    );
    assert!(watches(&mut c, &keys, "w2").await, "the second seat");
    let (_, wake, now) = reclaim(&mut c, &keys, "w3", 1, 0).await;
    assert_eq!(wake, 0, "w3 does not watch");
    let score: f64 = redis::cmd("ZSCORE")
        .arg(keys.nodes())
        .arg("node-w3")
        .query_async(&mut c)
        .await
        .unwrap();
    // Alive for 30 s past its score (fleetq_take's other_node_eligible): until its next call
    // (a whole sleep) plus a lease.
    assert_eq!(score as u64, now + SLEEP_MS + LEASE_MS - 30_000);
}

/// On an empty queue a watcher's call is a handful of commands (no config is read, and no
/// lease or pending entry is looked at when nothing is pending), and the others' fewer still.
#[tokio::test]
async fn reclaim_on_an_empty_queue_costs_a_handful_of_commands() {
    let s = Stack::start().await;
    let keys = QueueKeys::new(QUEUE).unwrap();
    s.create_group(QUEUE).await;
    let watcher = call_cost(&s, || async {
        assert!(watches(&mut s.conn(), &keys, "w1").await);
    })
    .await;
    assert!(watches(&mut s.conn(), &keys, "w2").await);
    let other = call_cost(&s, || async {
        assert!(!watches(&mut s.conn(), &keys, "w3").await);
    })
    .await;
    assert!(
        watcher.values().sum::<u64>() <= 9 && !watcher.contains_key("hgetall"),
        "the watcher's call: {watcher:?}"
    );
    assert_eq!(
        watcher.get("zrange").copied().unwrap_or(0),
        1,
        "only the delayed set's first entry is read: {watcher:?}"
    );
    assert!(
        other.values().sum::<u64>() <= 4 && !other.contains_key("hgetall"),
        "the other's call: {other:?}"
    );
}

/// What Redis executed while `f` ran (nothing else runs against this server), by command.
async fn call_cost<F, Fut>(s: &Stack, f: F) -> BTreeMap<String, u64>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let before = command_calls(s).await;
    f().await;
    let after = command_calls(s).await;
    after
        .into_iter()
        .map(|(name, n)| {
            let d = n - before.get(&name).copied().unwrap_or(0);
            (name, d)
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// Calls per command name (`fcall`, `hset`, `xgroup|create`, …), `info` left out.
async fn command_calls(s: &Stack) -> BTreeMap<String, u64> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut s.conn())
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            (name != "info").then(|| (name.to_owned(), calls))
        })
        .collect()
}

/// A record written by `fleetq_node_beat` renewed with a bare `PEXPIRE` reads as seen at
/// the renewal (its expiry minus its `ttl_ms`).
#[tokio::test]
async fn a_renewed_record_reads_as_seen_at_its_renewal() {
    let s = Stack::start().await;
    let mut c = s.conn();
    let key = fleetq_broker::keys::node("gpu-1");
    let reply: String = redis::cmd("FCALL")
        .arg("fleetq_node_beat")
        .arg(1)
        .arg(&key)
        .arg(90_000)
        .arg("node")
        .arg("gpu-1")
        .arg("consumer")
        .arg("gpu-1:1:1")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(reply, "");
    // As if the beat with news was long ago, and only renewals came since.
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("last_seen_ms")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    let now = nodes::server_ms(&s.redis).await.unwrap();
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(90_000)
        .query_async(&mut c)
        .await
        .unwrap();
    let fleet = nodes::list(&s.redis).await.unwrap();
    assert_eq!(fleet.len(), 1);
    let seen = fleet[0].last_seen_ms();
    assert!(
        seen >= now && seen < now + 1000,
        "seen at the renewal: {seen}, now {now}"
    );
    assert_eq!(fleet[0].fields["ttl_ms"], "90000");
    // A bad time to live is refused with what to pass.
    let err = redis::cmd("FCALL")
        .arg("fleetq_node_beat")
        .arg(1)
        .arg(&key)
        .arg("soon")
        .query_async::<String>(&mut c)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("time to live \"soon\""), "{err}");
}

/// `fleetq_node_gone` deletes a record only for the consumer that wrote it.
#[tokio::test]
async fn node_gone_deletes_only_the_gone_consumers_record() {
    let s = Stack::start().await;
    let mut c = s.conn();
    let key = fleetq_broker::keys::node("gpu-1");
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("consumer")
        .arg("gpu-1:2:2000")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        !nodes::gone(&s.redis, "gpu-1:1:1000").await.unwrap(),
        "an older process of gpu-1 went: the newer one's record stays"
    );
    assert_eq!(nodes::list(&s.redis).await.unwrap().len(), 1);
    assert!(nodes::gone(&s.redis, "gpu-1:2:2000").await.unwrap());
    assert!(nodes::list(&s.redis).await.unwrap().is_empty());
    assert!(!nodes::gone(&s.redis, "not a consumer name").await.unwrap());
}

/// The record's busy count follows a job's start and end within a second or so, long before
/// the next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_slots_reach_the_node_record_before_the_next_heartbeat() {
    let s = Stack::start().await;
    s.configure(QUEUE, &QueueConfig::default()).await;
    let mut cfg = worker_config(QUEUE, "gpu-1", 2);
    cfg.heartbeat = Duration::from_secs(600);
    let w = s.worker(
        cfg,
        FnHandler::new(|job, _ctx| async move {
            let ms = job.payload["sleep_ms"].as_u64().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Outcome::Succeeded(json!(null))
        }),
    );
    let busy = || async {
        nodes::list(&s.redis)
            .await
            .unwrap()
            .first()
            .map(nodes::NodeRecord::busy)
    };
    eventually(Duration::from_secs(10), "gpu-1's record", || async {
        busy().await == Some(0)
    })
    .await;
    let p = s.producer(QUEUE).await;
    let e = p
        .enqueue(&json!({"sleep_ms": 2500}), &EnqueueOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(2), "busy 1 in the record", || async {
        busy().await == Some(1)
    })
    .await;
    assert_eq!(
        p.wait(&e.id, Duration::from_secs(10)).await.unwrap().state,
        JobState::Succeeded
    );
    eventually(Duration::from_secs(2), "busy 0 again", || async {
        busy().await == Some(0)
    })
    .await;
    w.stop().await;
}

/// A worker killed while idle (it holds nothing) leaves `fleetq nodes` and the queue's
/// consumers within about a second of the broker's crash detection seeing its connections
/// close, not after its record's time to live (90 s) or the 10 minutes after which idle
/// consumers are removed; a live one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_idle_worker_leaves_the_fleet_at_once() {
    let s = Stack::start().await;
    s.configure(QUEUE, &QueueConfig::default()).await;
    let url = s.server.url();
    let a = WorkerProcess::spawn(&url, QUEUE, "gpu-a", 1, &[]);
    let _b = WorkerProcess::spawn(&url, QUEUE, "gpu-b", 1, &[]);
    let listed = || async {
        let mut names: Vec<String> = nodes::list(&s.redis)
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.node)
            .collect();
        names.sort();
        names
    };
    eventually(Duration::from_secs(15), "both node records", || async {
        listed().await == ["gpu-a", "gpu-b"]
    })
    .await;
    let stop = tokio_util::sync::CancellationToken::new();
    let _broker = stop.clone().drop_guard();
    tokio::spawn(liveness::run(
        s.redis.clone(),
        vec![QUEUE.to_owned()],
        liveness::DEFAULT_INTERVAL,
        stop,
    ));
    // The broker judges only processes it saw connected, and nothing in its first
    // GONE_AFTER: let it look for that long (its own clock, not a wait for a condition).
    tokio::time::sleep(liveness::GONE_AFTER * 2).await;
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    eventually(
        Duration::from_secs(5),
        "gpu-a gone from the fleet",
        || async { listed().await == ["gpu-b"] },
    )
    .await;
    eprintln!("gpu-a left the fleet {:?} after SIGKILL", killed.elapsed());
    let keys = QueueKeys::new(QUEUE).unwrap();
    eventually(
        Duration::from_secs(5),
        "gpu-a gone from the queue's consumers",
        || async {
            let state = fleetq_broker::inspect::queue_state(&s.redis, &keys)
                .await
                .unwrap();
            state.consumers == 1
        },
    )
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "{:?}",
        killed.elapsed()
    );
}

/// Three idle workers, two of them watching: the one that takes a job freezes (SIGSTOP),
/// and the job runs on another right after the lease, although the third sleeps for a
/// minute (whichever took the job, a watcher still follows its lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_is_reclaimed_at_its_lease_while_idle_workers_sleep() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(1);
    s.configure(
        QUEUE,
        &QueueConfig {
            lease,
            ..QueueConfig::default()
        },
    )
    .await;
    let url = s.server.url();
    let workers: Vec<WorkerProcess> = ["gpu-a", "gpu-b", "gpu-c"]
        .iter()
        .map(|n| WorkerProcess::spawn(&url, QUEUE, n, 1, &["--max-block-ms", "60000"]))
        .collect();
    eventually(Duration::from_secs(15), "three node records", || async {
        nodes::list(&s.redis).await.unwrap().len() == 3
    })
    .await;
    let p = s.producer(QUEUE).await;
    let e = p
        .enqueue(&json!({"sleep_ms": 60_000}), &EnqueueOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let holder = loop {
        let st = p.status(&e.id).await.unwrap();
        if let (JobState::Running, Some(node)) = (st.state, &st.node) {
            break node.clone();
        }
        assert!(Instant::now() < deadline, "the job did not start: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let frozen = workers.iter().find(|w| w.node == holder).unwrap();
    frozen.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    eventually(
        lease + Duration::from_millis(1500),
        "the job running on another worker",
        || async {
            let st = p.status(&e.id).await.unwrap();
            st.state == JobState::Running && st.node.as_deref() != Some(holder.as_str())
        },
    )
    .await;
    eprintln!("moved {:?} after SIGSTOP", stopped.elapsed());
    assert_eq!(s.stat(QUEUE, "reclaimed").await, 1);
}

/// A frozen host with three jobs: at its lease a watcher (one slot) claims all three, runs one
/// and puts the others back in line, where the other idle workers (one of them not watching)
/// take them at once: no job waits for a sleeping worker's next wake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_of_a_frozen_host_moves_at_its_lease() {
    let s = Stack::start().await;
    let lease = Duration::from_secs(1);
    s.configure(
        QUEUE,
        &QueueConfig {
            lease,
            ..QueueConfig::default()
        },
    )
    .await;
    let url = s.server.url();
    let big = WorkerProcess::spawn(&url, QUEUE, "gpu-big", 3, &[]);
    let p = s.producer(QUEUE).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let e = p
            .enqueue(&json!({"sleep_ms": 60_000}), &EnqueueOptions::default())
            .await
            .unwrap();
        ids.push(e.id);
    }
    let running_on = |ids: Vec<String>, on_big: bool| {
        let p = &p;
        async move {
            for id in &ids {
                let st = p.status(id).await.unwrap();
                let big = st.node.as_deref() == Some("gpu-big");
                if st.state != JobState::Running || big != on_big {
                    return false;
                }
            }
            true
        }
    };
    eventually(Duration::from_secs(10), "three jobs on gpu-big", || {
        running_on(ids.clone(), true)
    })
    .await;
    let _idle: Vec<WorkerProcess> = ["gpu-a", "gpu-b", "gpu-c"]
        .iter()
        .map(|n| WorkerProcess::spawn(&url, QUEUE, n, 1, &["--max-block-ms", "60000"]))
        .collect();
    eventually(Duration::from_secs(15), "four node records", || async {
        nodes::list(&s.redis).await.unwrap().len() == 4
    })
    .await;
    big.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    eventually(
        lease + Duration::from_secs(2),
        "the three jobs running elsewhere",
        || running_on(ids.clone(), false),
    )
    .await;
    eprintln!("all moved {:?} after SIGSTOP", stopped.elapsed());
    assert_eq!(s.stat(QUEUE, "reclaimed").await, 3);
    assert!(
        s.stat(QUEUE, "released").await >= 1,
        "a watcher handed jobs on"
    );
}

/// Commands per worker per second, in all and by command, over `window`.
struct Cost {
    total: f64,
    by_command: Vec<(String, f64)>,
}

impl std::fmt::Display for Cost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} commands per worker per s:", self.total)?;
        for (name, rate) in &self.by_command {
            write!(f, " {name} {rate:.3}")?;
        }
        Ok(())
    }
}

/// Starts `workers` worker processes with `flags` on an empty queue, waits until every node
/// record exists and `settle` has passed, then counts what Redis executes in `window`.
async fn idle_cost(
    s: &Stack,
    workers: usize,
    flags: &[&str],
    settle: Duration,
    window: Duration,
) -> (Cost, Vec<WorkerProcess>) {
    let url = s.server.url();
    let procs: Vec<WorkerProcess> = (0..workers)
        .map(|i| WorkerProcess::spawn(&url, QUEUE, &format!("idle-{i:02}"), 1, flags))
        .collect();
    eventually(
        Duration::from_secs(60),
        "every idle worker's node record",
        || async { fleetq_broker::nodes::list(&s.redis).await.unwrap().len() == workers },
    )
    .await;
    // Measuring windows, not waits for a condition: the workers do nothing the test waits for.
    tokio::time::sleep(settle).await;
    let before = command_calls(s).await;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = command_calls(s).await;
    let secs = started.elapsed().as_secs_f64();
    let per = |n: u64| n as f64 / workers as f64 / secs;
    let mut by_command: Vec<(String, f64)> = after
        .iter()
        .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| (name, per(n)))
        .collect();
    by_command.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = by_command.iter().map(|(_, r)| r).sum();
    (Cost { total, by_command }, procs)
}

/// The idle cost with the default periods shrunk tenfold (lease 1 s, max_block 6 s,
/// heartbeat 3 s): 20 idle workers make Redis execute at most ten times the budget of 0.3
/// commands per worker per second (the watcher follows the lease; the others only block).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_workers_stay_within_the_budget_at_a_tenth_of_the_default_periods() {
    let s = Stack::start().await;
    s.configure(
        QUEUE,
        &QueueConfig {
            lease: Duration::from_secs(1),
            ..QueueConfig::default()
        },
    )
    .await;
    let (cost, _workers) = idle_cost(
        &s,
        20,
        &["--max-block-ms", "6000", "--heartbeat-ms", "3000"],
        Duration::from_secs(1),
        Duration::from_secs(12),
    )
    .await;
    eprintln!("a tenth of the default periods, 20 idle workers: {cost}");
    assert!(cost.total <= 3.0, "{cost}");
}

/// The figure of the issue, with the default settings (lease 10 s): 20 idle workers on an
/// empty queue over a 120 s window (whole cycles of every periodic call). Slow; run it by hand:
/// `cargo test -p fleetq-tests --test idle -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes over two minutes; the figure for docs/benchmarks.md"]
async fn idle_cost_with_the_default_settings() {
    let s = Stack::start().await;
    s.configure(QUEUE, &QueueConfig::default()).await;
    let heartbeat = fleetq_worker::config::DEFAULT_HEARTBEAT
        .as_millis()
        .to_string();
    let (cost, _workers) = idle_cost(
        &s,
        20,
        &["--heartbeat-ms", &heartbeat],
        Duration::from_secs(2),
        Duration::from_secs(120),
    )
    .await;
    eprintln!("default settings, 20 idle workers: {cost}");
    assert!(cost.total <= 0.3, "{cost}");
    let keys = QueueKeys::new(QUEUE).unwrap();
    let pending: i64 = redis::cmd("XLEN")
        .arg(keys.stream())
        .query_async(&mut s.conn())
        .await
        .unwrap();
    assert_eq!(pending, 0, "the queue stayed empty");
}
