//! The nemesis: faults on a schedule drawn from the seed, one at a time, with a quiet gap
//! after each so that the system is seen both healthy and broken.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::config::{ChaosConfig, FaultKind};
use super::fleet::Fleet;
use super::history::{Fault, History};
use crate::send_signal;

/// Injects faults from `cfg.faults` until `cfg.duration` has passed.
pub async fn unleash(
    fleet: &mut Fleet,
    cfg: &ChaosConfig,
    history: &History,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let end = Instant::now() + cfg.duration;
    let pause = cfg.lease * 3 / 2;
    loop {
        let gap = Duration::from_millis(rng.random_range(500..=2500));
        tokio::time::sleep(gap).await;
        fleet.note_unexpected_exits(history);
        let Some(&kind) = cfg.faults.choose(&mut rng) else {
            break;
        };
        if Instant::now() + pause >= end {
            break;
        }
        let worker = rng.random_range(0..fleet.workers.len());
        let at_ms = history.now_ms();
        let target = inject(fleet, kind, worker, pause).await?;
        history.fault(Fault {
            kind: kind.name(),
            target,
            at_ms,
            lasted_ms: history.now_ms() - at_ms,
        });
    }
    if let Some(rest) = end.checked_duration_since(Instant::now()) {
        tokio::time::sleep(rest).await;
    }
    fleet.note_unexpected_exits(history);
    Ok(())
}

/// Does one fault of `kind` (on worker `worker` for worker faults); returns the target's name.
async fn inject(
    fleet: &mut Fleet,
    kind: FaultKind,
    worker: usize,
    pause: Duration,
) -> anyhow::Result<String> {
    match kind {
        FaultKind::WorkerKill => {
            let w = &mut fleet.workers[worker];
            w.signal(libc::SIGKILL);
            w.wait(Duration::from_secs(5)).await;
            fleet.spawn_worker(worker).await?;
        }
        FaultKind::WorkerPause => {
            let w = &mut fleet.workers[worker];
            w.signal(libc::SIGSTOP);
            tokio::time::sleep(pause).await;
            w.signal(libc::SIGCONT);
        }
        FaultKind::WorkerPartition => {
            fleet.proxies[worker].cut();
            tokio::time::sleep(pause).await;
            fleet.proxies[worker].restore();
        }
        FaultKind::RedisKill => {
            fleet.redis.kill();
            fleet.redis.restart()?;
            return Ok("redis".into());
        }
        FaultKind::RedisPause => {
            let pid = fleet
                .redis
                .pid()
                .ok_or_else(|| anyhow::anyhow!("redis is not running"))?;
            send_signal(pid, libc::SIGSTOP);
            tokio::time::sleep(pause).await;
            send_signal(pid, libc::SIGCONT);
            return Ok("redis".into());
        }
    }
    Ok(format!("w{worker}"))
}
