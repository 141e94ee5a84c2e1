//! The chaos suite's short run, and a self-test of the TCP fault proxy.

use std::time::Duration;

use fleetq_tests::chaos::{self, ChaosConfig};
use fleetq_tests::proxy::Proxy;
use fleetq_tests::{eventually, Stack};

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    let Ok(mut conn) = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
    else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

#[tokio::test]
async fn proxy_forwards_cuts_and_restores() {
    let stack = Stack::start().await;
    let upstream = format!("127.0.0.1:{}", stack.server.port())
        .parse()
        .unwrap();
    let proxy = Proxy::start(upstream).await.unwrap();
    assert!(ping(&proxy.url()).await, "PING through the proxy");

    // A connection opened before the cut is closed by it.
    let client = redis::Client::open(proxy.url()).unwrap();
    let mut held = client.get_multiplexed_async_connection().await.unwrap();
    proxy.cut();
    assert!(!ping(&proxy.url()).await, "new connections fail while cut");
    let r = redis::cmd("PING").query_async::<String>(&mut held).await;
    assert!(r.is_err(), "an open connection fails after the cut: {r:?}");

    proxy.restore();
    let url = proxy.url();
    eventually(Duration::from_secs(5), "PING after restore", || ping(&url)).await;

    // A delay holds every chunk both ways: a PING takes at least twice the delay.
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    proxy.delay(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

/// 300 jobs over 20 s on 4 workers × 2 slots, lease 2 s, every fault kind: nothing lost,
/// nothing doubled, queue empty, no process died on its own. Executions per job are
/// reported, not asserted (a job may run more than once after an outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_chaos_run() {
    let child = env!("CARGO_BIN_EXE_fleetq-chaos-child").into();
    let mut cfg = ChaosConfig::short(child);
    cfg.seed = std::env::var("FLEETQ_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let report = chaos::run(cfg).await.unwrap();
    eprintln!("{}", report.table());
    assert!(report.passed(), "chaos checks failed:\n{}", report.table());
}
