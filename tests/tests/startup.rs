//! Processes wait for Redis: a `fleetq-broker` started while Redis is down or still loading
//! stays up, says once why it waits, and serves as soon as Redis is ready; the shared
//! connection is good again on the first command after a restart; named connections keep
//! their name across reconnects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetq_broker::{Error, Redis, RedisConfig};
use fleetq_tests::{bin_path, eventually, free_port, send_signal, Stack};
use tokio_util::sync::CancellationToken;

/// A redis-server on `port` in `dir` with `extra` arguments; killed when dropped.
struct Server(Child);

impl Server {
    fn start(port: u16, dir: &Path, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--appendonly", "no", "--daemonize", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `fleetq-broker` process with its output in a file.
struct Broker {
    child: Child,
    log: tempfile::NamedTempFile,
    http: u16,
}

impl Broker {
    fn spawn(redis_url: &str) -> Self {
        let log = tempfile::NamedTempFile::new().unwrap();
        let http = free_port();
        let child = Command::new(bin_path("fleetq-broker"))
            .args(["--listen", &format!("127.0.0.1:{http}")])
            .env("REDIS_URL", redis_url)
            .env("RUST_LOG", "info")
            // Logs go to stdout.
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Self { child, log, http }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    async fn ready(&self) -> bool {
        let url = format!("http://127.0.0.1:{}/readyz", self.http);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        matches!(client.get(url).send().await, Ok(r) if r.status().is_success())
    }

    async fn stop(mut self) {
        send_signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(status.code(), Some(0), "log:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "no exit; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn waits(log: &str) -> usize {
    log.matches("waiting for Redis").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_before_redis_waits_and_then_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut broker = Broker::spawn(&format!("redis://:hunter2@127.0.0.1:{port}/0"));
    eventually(Duration::from_secs(20), "the broker says it waits", || {
        let log = broker.log();
        async move { waits(&log) > 0 }
    })
    .await;
    // Many tries later (the backoff caps at 500 ms), it is still up and has said it once.
    let seen = Instant::now();
    eventually(Duration::from_secs(5), "two seconds of waiting", || async {
        seen.elapsed() > Duration::from_secs(2)
    })
    .await;
    assert!(broker.alive(), "the broker exited:\n{}", broker.log());
    let log = broker.log();
    assert_eq!(waits(&log), 1, "said more than once:\n{log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    assert!(!log.contains("hunter2"), "the password leaked:\n{log}");

    let _server = Server::start(port, dir.path(), &["--requirepass", "hunter2"]);
    let started = Instant::now();
    eventually(Duration::from_secs(5), "readyz turns ready", || {
        broker.ready()
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "ready only after {took:?}");
    assert!(broker.alive());
    assert!(
        broker.log().contains("Redis ready again after"),
        "{}",
        broker.log()
    );
    broker.stop().await;
}

/// A server that loads a data set slowly (`key-load-delay`, µs per key) and answers `-LOADING`
/// meanwhile (`loading-process-events-interval-bytes`).
fn loading_server(port: u16, dir: &Path) -> Server {
    let seed = Server::start(port, dir, &["--save", "", "--enable-debug-command", "yes"]);
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        if let Ok(c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
            break c;
        }
        assert!(Instant::now() < deadline, "seed server did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(2000)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SAVE").query(&mut conn).unwrap();
    drop(seed);
    Server::start(
        port,
        dir,
        &[
            "--save",
            "",
            "--key-load-delay",
            "4000",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_while_redis_loads_waits_and_then_serves() {
    bin_path("fleetq-broker"); // built before the clock of the loading server starts
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = loading_server(port, dir.path());
    let url = format!("redis://127.0.0.1:{port}/0");
    // The server answers, but -LOADING: a transient error, not a reason to give up.
    let client = redis::Client::open(url.as_str()).unwrap();
    let loading = loop {
        match client.get_multiplexed_async_connection().await {
            Ok(mut c) => match redis::cmd("PING").query_async::<String>(&mut c).await {
                Err(e) => break e,
                Ok(_) => panic!("the server finished loading before the test saw it"),
            },
            Err(e) if e.code() == Some("LOADING") => break e,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(loading.code(), Some("LOADING"), "{loading}");
    assert!(Error::redis("ping", loading).is_transient());

    let mut broker = Broker::spawn(&url);
    eventually(
        Duration::from_secs(20),
        "the broker waits for loading",
        || {
            let log = broker.log();
            async move { log.contains("waiting for Redis") && log.contains("loading") }
        },
    )
    .await;
    eventually(Duration::from_secs(20), "readyz turns ready", || {
        broker.ready()
    })
    .await;
    assert!(broker.alive());
    assert_eq!(waits(&broker.log()), 1, "{}", broker.log());
    broker.stop().await;
}

#[tokio::test]
async fn connect_patiently_waits_and_gives_up_only_on_stop_or_a_permanent_error() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let stop = CancellationToken::new();
    let config = RedisConfig::new(format!("redis://127.0.0.1:{port}/0"));
    let waiting = tokio::spawn({
        let (config, stop) = (config.clone(), stop.clone());
        async move { Redis::connect_patiently(config, &stop).await }
    });
    let _server = Server::start(port, dir.path(), &["--save", ""]);
    let redis = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .expect("connected");
    let _: String = redis::cmd("PING")
        .query_async(&mut redis.conn())
        .await
        .unwrap();

    let nowhere = RedisConfig::new(format!("redis://127.0.0.1:{}/0", free_port()));
    let stop2 = CancellationToken::new();
    stop2.cancel();
    assert!(Redis::connect_patiently(nowhere, &stop2)
        .await
        .unwrap()
        .is_none());

    let mut bad = RedisConfig::new("nonsense://x");
    assert!(matches!(
        Redis::connect_patiently(bad.clone(), &stop).await,
        Err(Error::Config(_))
    ));
    bad.url = format!("redis://:wrong@127.0.0.1:{port}/0");
    let err = Redis::connect_patiently(bad, &stop).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
}

async fn ping(redis: &Redis) -> Result<String, redis::RedisError> {
    redis::cmd("PING").query_async(&mut redis.conn()).await
}

#[tokio::test]
async fn the_first_command_after_a_restart_succeeds() {
    let mut s = Stack::start().await;
    ping(&s.redis).await.unwrap();
    s.server.kill();
    // A few commands during the outage: each fails and leaves a failed reconnect behind.
    for _ in 0..3 {
        assert!(ping(&s.redis).await.is_err());
    }
    // `restart` returns once PING answers on a fresh connection.
    s.server.restart().unwrap();
    let t = Instant::now();
    let first = ping(&s.redis).await;
    assert!(first.is_ok(), "stale error after the restart: {first:?}");
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "took {:?}",
        t.elapsed()
    );
}

async fn named_clients(redis: &Redis, name: &str) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut redis.conn())
        .await
        .unwrap();
    list.lines()
        .filter(|l| l.split(' ').any(|f| f == format!("name={name}")))
        .count()
}

#[tokio::test]
async fn named_connections_keep_their_name_across_restarts() {
    let mut s = Stack::start().await;
    assert!(matches!(
        s.redis.named("has space").await,
        Err(Error::Config(_))
    ));
    let named = s.redis.named("fleetq-test-w1").await.unwrap();
    let _blocking = named
        .blocking_conn("k", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(named_clients(&s.redis, "fleetq-test-w1").await, 2);

    s.server.kill();
    assert!(ping(&named).await.is_err());
    s.server.restart().unwrap();
    ping(&named).await.unwrap();
    let _blocking = named
        .blocking_conn("k", Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(named_clients(&named, "fleetq-test-w1").await, 2);
    // The unnamed handle stays unnamed.
    ping(&s.redis).await.ok();
    assert_eq!(named_clients(&s.redis, "").await, 1);
}

/// A `fleetq-worker` started before its Redis waits (no exit) and takes work as soon as
/// Redis is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_redis_waits_and_then_works() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = Command::new(bin_path("fleetq-worker"))
        .args(["--queue", "q", "--node", "early", "--executor", "echo"])
        .args(["--metrics-addr", "off"])
        .env("REDIS_URL", &url)
        .env("RUST_LOG", "info")
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(log.path()).unwrap_or_default();
    eventually(Duration::from_secs(20), "the worker says it waits", || {
        let l = read_log();
        async move { waits(&l) > 0 }
    })
    .await;
    assert!(
        worker.try_wait().unwrap().is_none(),
        "exited:\n{}",
        read_log()
    );
    let _server = Server::start(port, dir.path(), &[]);
    let redis = loop {
        if let Ok(r) = Redis::connect(&url).await {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let p = fleetq_broker::Producer::new(&redis, "q").await.unwrap();
    let e = p
        .enqueue(&serde_json::json!({"x": 1}), &Default::default())
        .await
        .unwrap();
    let st = p.wait(&e.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        st.state,
        fleetq_broker::JobState::Succeeded,
        "{}",
        read_log()
    );
    assert_eq!(st.result.unwrap()["node"], "early");
    send_signal(worker.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = worker.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit:\n{}", read_log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", read_log());
}
