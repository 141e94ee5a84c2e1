//! Fuzzing the entry intake: random entries (tests/src/entries.rs) interleaved with good jobs,
//! `XADD`ed raw as a foreign producer would, against a real `fleetq-test-worker` process, for
//! a bounded time. At the end every entry is accounted for — run to an end state, or
//! dead-lettered with a reason — nothing is in flight or left in the stream, every good job
//! succeeded, and the worker never died (it is restarted when it does, and the restarts are
//! counted).
//!
//! Seeded: the seed is printed, and `FLEETQ_FUZZ_SEED=<seed>` replays a run;
//! `FLEETQ_FUZZ_SECS` sets how long entries are added (default 10, at most 30).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use fleetq_broker::{JobEntry, QueueConfig, QueueKeys, RawEntry};
use fleetq_tests::entries::{EntryGen, Fields};
use fleetq_tests::{direct_connection, eventually, Stack, WorkerProcess};
use redis::aio::MultiplexedConnection;

/// Entries waiting in the stream at most before the producer waits for the worker.
const BACKLOG_MAX: u64 = 200;
/// Hostile entries per good job.
const HOSTILE_PER_GOOD: usize = 4;

/// One entry added: its job id, whether it is a good job, its field count (for messages), and
/// the reason a worker must give when it is malformed (by `JobEntry::parse`).
struct Added {
    job: String,
    good: bool,
    fields: usize,
    malformed: Option<String>,
}

fn seed() -> u64 {
    std::env::var("FLEETQ_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn run_for() -> Duration {
    let secs = std::env::var("FLEETQ_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10u64);
    Duration::from_secs(secs.min(30))
}

async fn xadd(c: &mut MultiplexedConnection, keys: &QueueKeys, fields: &Fields) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys.stream()).arg("*");
    for (f, v) in fields {
        cmd.arg(&f[..]).arg(&v[..]);
    }
    cmd.query_async(c).await.unwrap()
}

async fn xlen(c: &mut MultiplexedConnection, key: String) -> u64 {
    redis::cmd("XLEN").arg(key).query_async(c).await.unwrap()
}

fn spawn_worker(url: &str) -> WorkerProcess {
    // Hostile timeouts fail attempts by the dozen: the node must not suspend itself for them.
    WorkerProcess::spawn(
        url,
        "fz",
        "n1",
        4,
        &["--suspend-after", "1000000000", "--grace-ms", "1000"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_entries_all_end_and_good_jobs_flow() {
    let seed = seed();
    eprintln!("fuzz_entries: seed {seed}; replay with FLEETQ_FUZZ_SEED={seed} cargo nextest run -p fleetq-tests --test fuzz_entries");
    let s = Stack::start().await;
    s.configure(
        "fz",
        &QueueConfig {
            lease: Duration::from_secs(2),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            ..QueueConfig::default()
        },
    )
    .await;
    s.create_group("fz").await;
    let url = s.server.url();
    let keys = QueueKeys::new("fz").unwrap();
    let mut c = direct_connection(&url).await;
    let mut worker = spawn_worker(&url);
    let mut restarts = 0;
    let mut restart_if_gone = |worker: &mut WorkerProcess| {
        if let Some(code) = worker.exited() {
            eprintln!(
                "seed {seed}: the worker exited ({code}); its log:\n{}",
                worker.log()
            );
            restarts += 1;
            *worker = spawn_worker(&url);
        }
    };
    let mut gen = EntryGen::new(seed);
    let mut added: Vec<Added> = Vec::new();
    let end = Instant::now() + run_for();
    while Instant::now() < end {
        // The worker must keep up: a backlog that does not drain means it stopped.
        let waited = Instant::now();
        while xlen(&mut c, keys.stream()).await > BACKLOG_MAX {
            restart_if_gone(&mut worker);
            assert!(
                waited.elapsed() < Duration::from_secs(30),
                "seed {seed}: the backlog stopped draining; worker log:\n{}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..HOSTILE_PER_GOOD {
            let fields = gen.hostile();
            let id = xadd(&mut c, &keys, &fields).await;
            let count = fields.len();
            let raw = RawEntry::from_bytes(id, fields);
            let malformed = JobEntry::parse(&raw, QueueConfig::default().max_payload_bytes)
                .err()
                .map(|m| m.to_string());
            added.push(Added {
                job: raw.job_id(),
                good: false,
                fields: count,
                malformed,
            });
        }
        let (job, fields) = gen.good();
        xadd(&mut c, &keys, &fields).await;
        added.push(Added {
            job,
            good: true,
            fields: fields.len(),
            malformed: None,
        });
        restart_if_gone(&mut worker);
    }
    eprintln!("seed {seed}: {} entries added; draining", added.len());
    eventually(
        Duration::from_secs(60),
        &format!("seed {seed}: stream, delayed set and pending list empty"),
        || async {
            let mut c = direct_connection(&url).await;
            let delayed: u64 = redis::cmd("ZCARD")
                .arg(keys.delayed())
                .query_async(&mut c)
                .await
                .unwrap();
            xlen(&mut c, keys.stream()).await == 0
                && delayed == 0
                && s.pending("fz").await.is_empty()
        },
    )
    .await;
    restart_if_gone(&mut worker);

    let mut dead = 0;
    let mut ends = std::collections::BTreeMap::<String, usize>::new();
    for a in &added {
        let (state, reason, error): (Option<String>, Option<String>, Option<String>) =
            redis::cmd("HMGET")
                .arg(keys.job(&a.job))
                .arg("state")
                .arg("reason")
                .arg("error")
                .query_async(&mut c)
                .await
                .unwrap();
        let state = state.unwrap_or_else(|| "none".into());
        let what = format!(
            "seed {seed}: job {:?} ({} fields, good {}) ended {state} ({reason:?}: {error:?})",
            a.job, a.fields, a.good
        );
        if a.good {
            assert_eq!(state, "succeeded", "{what}");
        }
        assert!(
            ["succeeded", "failed", "dead", "expired"].contains(&state.as_str()),
            "{what}"
        );
        if let Some(m) = &a.malformed {
            assert_eq!(
                (state.as_str(), reason.as_deref(), error.as_deref()),
                ("dead", Some("malformed"), Some(m.as_str())),
                "{what}"
            );
        }
        if state == "dead" {
            dead += 1;
            assert!(
                reason.is_some_and(|r| !r.is_empty()) && error.is_some_and(|e| !e.is_empty()),
                "{what}"
            );
        }
        *ends.entry(state).or_default() += 1;
    }
    eprintln!("seed {seed}: ends {ends:?}");
    assert_eq!(
        xlen(&mut c, keys.dead()).await,
        dead,
        "seed {seed}: one dead letter per dead job"
    );
    assert!(
        dead > 0 && ends.get("succeeded").copied().unwrap_or(0) > 0,
        "seed {seed}: {ends:?}"
    );
    assert_eq!(restarts, 0, "seed {seed}: the worker died {restarts} times");
    assert!(
        !worker.log().contains("panicked"),
        "seed {seed}: the worker panicked:\n{}",
        worker.log()
    );
}
