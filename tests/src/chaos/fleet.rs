//! The processes of a chaos run: redis-server (AOF on), one `fleetq-broker`, N
//! `fleetq-worker`s with the process executor. Knows how to kill, freeze and restart each,
//! and notices processes that exited on their own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleetq_broker::local_redis::LocalRedisOptions;
use fleetq_broker::LocalRedis;

use super::history::{Exit, History};
use super::EXEC_LOG_ENV;
use crate::proxy::Proxy;
use crate::{bin_path, free_port, send_signal};

/// A child process with its log file.
pub struct Proc {
    /// `w0`…, or `broker`.
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Its exit is in the history already.
    recorded: bool,
}

impl Proc {
    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` unless the process has exited already.
    pub fn signal(&mut self, signal: i32) {
        if self.exited().is_none() {
            send_signal(self.pid(), signal);
        }
    }

    /// The exit code if it has exited (none when by a signal), or `None` while running.
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Waits up to `timeout` for the exit; `None` when it did not exit.
    pub async fn wait(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(code) = self.exited() {
                return Some(code);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the run started.
pub struct Fleet {
    /// The server (kill/restart keep its port and AOF).
    pub redis: LocalRedis,
    /// The broker process.
    pub broker: Proc,
    /// Worker processes, index = node number.
    pub workers: Vec<Proc>,
    /// One proxy per worker between it and Redis, to cut it off alone.
    pub proxies: Vec<Proxy>,
    /// Logs and the executions log live here.
    pub dir: tempfile::TempDir,
    queue: String,
    slots: usize,
    child: PathBuf,
}

impl Fleet {
    /// Starts redis-server with AOF and the broker; workers come with [`Fleet::spawn_worker`]
    /// (each behind its own [`Proxy`]).
    pub fn start(queue: &str, slots: usize, child: &Path) -> anyhow::Result<Self> {
        let redis = LocalRedis::start_with(LocalRedisOptions {
            appendonly: true,
            extra: vec![("appendfsync".into(), "everysec".into())],
            ..Default::default()
        })?;
        let dir = tempfile::Builder::new().prefix("fleetq-chaos-").tempdir()?;
        let listen = format!("127.0.0.1:{}", free_port());
        let broker = spawn(
            "broker",
            Command::new(bin_path("fleetq-broker"))
                .args(["--redis-url", &redis.url(), "--listen", &listen])
                .args(["--queues", queue]),
            dir.path(),
        )?;
        Ok(Self {
            redis,
            broker,
            workers: Vec::new(),
            proxies: Vec::new(),
            dir,
            queue: queue.to_owned(),
            slots,
            child: child.to_owned(),
        })
    }

    /// The executions log the children append to.
    pub fn exec_log(&self) -> PathBuf {
        self.dir.path().join("executions.log")
    }

    /// Starts (or restarts, same node name) worker `i`.
    pub async fn spawn_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let name = format!("w{i}");
        if i >= self.proxies.len() {
            let upstream = format!("127.0.0.1:{}", self.redis.port()).parse()?;
            self.proxies.push(Proxy::start(upstream).await?);
        }
        let mut cmd = Command::new(bin_path("fleetq-worker"));
        cmd.args([
            "--redis-url",
            &self.proxies[i].url(),
            "--queue",
            &self.queue,
        ])
        .args(["--node", &name, "--slots", &self.slots.to_string()])
        .args(["--metrics-addr", "off", "--executor", "process"])
        .args(["--shutdown-grace-secs", "5", "--suspend-after", "0"])
        .arg("--command")
        .arg(self.child.as_os_str())
        .args(["--child-env", &format!("PATH,{EXEC_LOG_ENV}")])
        .env(EXEC_LOG_ENV, self.exec_log());
        let proc = spawn(&name, &mut cmd, self.dir.path())?;
        if i < self.workers.len() {
            self.workers[i] = proc;
        } else {
            self.workers.push(proc);
        }
        Ok(())
    }

    /// Records in `history` every process that has exited while nobody asked it to.
    pub fn note_unexpected_exits(&mut self, history: &History) {
        for p in self
            .workers
            .iter_mut()
            .chain(std::iter::once(&mut self.broker))
        {
            if p.recorded {
                continue;
            }
            if let Some(code) = p.exited() {
                p.recorded = true;
                history.exit(Exit {
                    process: p.name.clone(),
                    at_ms: history.now_ms(),
                    code,
                    expected: false,
                });
                eprintln!(
                    "{} exited on its own ({code:?}):\n{}",
                    p.name,
                    p.log_tail(40)
                );
            }
        }
    }

    /// SIGTERM to every worker, then the broker; each must exit 0 within `grace`.
    pub async fn stop(&mut self, history: &History, grace: Duration) {
        for p in self
            .workers
            .iter_mut()
            .chain(std::iter::once(&mut self.broker))
        {
            if p.recorded || p.exited().is_some() {
                continue; // recorded by note_unexpected_exits
            }
            p.signal(libc::SIGTERM);
            let code = p.wait(grace).await;
            let expected = code == Some(Some(0));
            if !expected {
                eprintln!(
                    "{} did not stop cleanly ({code:?}):\n{}",
                    p.name,
                    p.log_tail(40)
                );
            }
            history.exit(Exit {
                process: p.name.clone(),
                at_ms: history.now_ms(),
                code: code.flatten(),
                expected,
            });
        }
    }
}

fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> anyhow::Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let child = cmd
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    Ok(Proc {
        name: name.to_owned(),
        child,
        log,
        recorded: false,
    })
}
