//! One chaos run, start to verdict: start the fleet, run the generator and the nemesis side
//! by side, drain, stop every process, then observe and check.

use std::time::{Duration, Instant};

use fleetq_broker::{JobState, Producer, QueueConfig, Redis, RedisConfig};

use super::checker::{self, Report};
use super::config::ChaosConfig;
use super::fleet::Fleet;
use super::generator;
use super::history::History;
use super::nemesis;

/// The queue every run uses.
pub const QUEUE: &str = "chaos";
/// Time each process gets to exit 0 after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// Runs `cfg` and returns the checker's report.
pub async fn run(cfg: ChaosConfig) -> anyhow::Result<Report> {
    let mut fleet = Fleet::start(QUEUE, cfg.slots, &cfg.child)?;
    let redis = connect(&fleet).await?;
    configure(&redis, &cfg).await?;
    let producer = Producer::new(&redis, QUEUE).await?;
    for i in 0..cfg.workers {
        fleet.spawn_worker(i).await?;
    }
    let history = History::new();
    let gen = tokio::spawn(generator::generate(
        producer.clone(),
        cfg.clone(),
        history.clone(),
    ));
    let faults = nemesis::unleash(&mut fleet, &cfg, &history).await;
    gen.await?;
    faults?;
    eprintln!("chaos: faults over at {} ms", history.now_ms());
    drain(&producer, &history, cfg.drain_timeout, &mut fleet).await;
    eprintln!("chaos: drained at {} ms", history.now_ms());
    fleet.stop(&history, STOP_GRACE).await;
    eprintln!("chaos: stopped at {} ms", history.now_ms());
    let obs = checker::observe(&redis, &producer, &history, &fleet.exec_log()).await?;
    let report = checker::check(&history, &obs, cfg.seed);
    if !report.passed() {
        eprintln!(
            "--- last 40 lines of redis-server's log ---\n{}",
            fleet.redis.log_tail(40)
        );
    }
    Ok(report)
}

/// The harness's own client: short timeouts so an outage shows up as errors, not hangs.
async fn connect(fleet: &Fleet) -> anyhow::Result<Redis> {
    let mut config = RedisConfig::new(fleet.redis.url());
    config.response_timeout = Duration::from_secs(1);
    Ok(Redis::connect_with(config).await?)
}

async fn configure(redis: &Redis, cfg: &ChaosConfig) -> anyhow::Result<()> {
    let keys = fleetq_broker::QueueKeys::new(QUEUE)?;
    let qc = QueueConfig {
        lease: cfg.lease,
        max_attempts: cfg.max_attempts,
        // The checker reads every success from the events stream: keep them all.
        events_maxlen: (cfg.jobs as u64 * 20).max(10_000),
        ..Default::default()
    };
    qc.store(&mut redis.conn(), &keys).await?;
    Ok(())
}

/// Polls until every job the generator tried is terminal or unknown, or `timeout` passes
/// (then the checker reports what is left).
async fn drain(producer: &Producer, history: &History, timeout: Duration, fleet: &mut Fleet) {
    let deadline = Instant::now() + timeout;
    let mut open: Vec<String> = history.enqueues().into_iter().map(|e| e.id).collect();
    while !open.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for id in open {
            match producer.status(&id).await.map(|s| s.state) {
                Ok(s) if s.is_terminal() || s == JobState::NotFound => {}
                _ => still.push(id),
            }
        }
        open = still;
        fleet.note_unexpected_exits(history);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
