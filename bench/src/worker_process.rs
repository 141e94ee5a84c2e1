//! A bench worker in a process of its own: the bench binary re-executed with its hidden
//! `worker` subcommand ([`crate::bench_worker`]), so that it can be stopped (SIGTERM),
//! killed (SIGKILL) and frozen (SIGSTOP) like a real host. Its log goes to a file in the
//! temporary directory, shown when something goes wrong and removed on drop.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::bench_worker::HANDLED_PREFIX;

/// Lines of the worker's log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// A running bench worker process.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    /// The worker's node name.
    pub node: String,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts `exe worker --redis-url url --queue queue --node node --slots slots`.
    pub fn spawn(
        exe: &Path,
        url: &str,
        queue: &str,
        node: &str,
        slots: usize,
    ) -> anyhow::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let log = std::env::temp_dir().join(format!(
            "fleetq-bench-worker-{}-{}-{node}.log",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("create the worker log {}", log.display()))?;
        let child = Command::new(exe)
            .args(["worker", "--redis-url", url, "--queue", queue, "--node", node])
            .args(["--slots", &slots.to_string()])
            .env(
                "RUST_LOG",
                std::env::var("FLEETQ_BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .with_context(|| {
                format!(
                    "start the bench worker {} (the fleetq-bench binary with its `worker` subcommand)",
                    exe.display()
                )
            })?;
        Ok(Self {
            child,
            node: node.to_owned(),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> anyhow::Result<i32> {
        i32::try_from(self.child.id()).context("process id out of range")
    }

    /// Sends `signal` (`libc::SIGTERM`, `SIGKILL`, `SIGSTOP`, `SIGCONT`).
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        send_signal(self.pid()?, signal)
            .with_context(|| format!("send signal {signal} to worker {}", self.node))
    }

    /// CPU time the process has used so far, all threads (`utime + stime` of
    /// `/proc/<pid>/stat`, in 10 ms ticks: Linux's `USER_HZ` is 100); `None` off Linux.
    pub fn cpu_time(&self) -> Option<Duration> {
        const TICKS_PER_SEC: u64 = 100;
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some(Duration::from_millis(
            (utime + stime) * 1000 / TICKS_PER_SEC,
        ))
    }

    /// Fails (with the end of the worker's log) when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!(
                "worker {} exited early ({status}); its log ends:\n{}",
                self.node,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// Stops the worker with SIGTERM, waits up to `timeout` for it to exit, and returns how
    /// many attempts its handler ran.
    pub async fn stop(self, timeout: Duration) -> anyhow::Result<u64> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(timeout).await
    }

    /// Waits up to `timeout` for the worker to exit after a SIGTERM sent earlier, and
    /// returns how many attempts its handler ran.
    pub async fn wait_exit(mut self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().context("wait for the worker")? {
                break status;
            }
            if Instant::now() >= deadline {
                bail!(
                    "worker {} did not stop within {timeout:?}; its log ends:\n{}",
                    self.node,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !status.success() {
            bail!(
                "worker {} exited with {status}; its log ends:\n{}",
                self.node,
                self.log_tail()
            );
        }
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout
                .read_to_string(&mut out)
                .context("read the worker's stdout")?;
        }
        out.lines()
            .find_map(|l| l.strip_prefix(HANDLED_PREFIX))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("worker {} printed no {HANDLED_PREFIX}<n>", self.node))
    }

    /// The last lines of the worker's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Ok(pid) = self.pid() {
            // SIGKILL ends a stopped process too; SIGCONT first lets it be reaped at once.
            let _ = send_signal(pid, libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Sends `signal` to `pid`, one of this process's own children.
#[allow(unsafe_code)]
fn send_signal(pid: i32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) takes two integers and has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
