//! The process executor: a pool of long-lived child processes, one per slot, so a model stays
//! loaded between jobs. Jobs and answers travel as JSON lines on the child's stdin and stdout
//! (see `examples/python/fleetq_child.py` for the child's side):
//!
//! - in: `{"type":"job","id":…,"queue":…,"payload":…,"attempt":…,"max_attempts":…,"deadline_ms":…}`
//! - out: `{"type":"started"}`, any number of `{"type":"progress","step":…,"total":…,"stage":…,"message":…}`,
//!   then one `{"type":"result","result":…}` or `{"type":"error","message":…,"retryable":…}`.
//!
//! Anything else on stdout is a protocol error; stderr lines go to the worker's log, tagged
//! with the child's pid and job. A child is replaced when it exits, crashes, writes garbage,
//! is stopped by a timeout or cancel (SIGTERM to its process group, SIGKILL after the grace),
//! or reaches its job or lifetime limit; a replacement never starts before the old child has
//! been reaped. The payload reaches the child on stdin only — never a shell, never argv — and
//! the child's environment is an explicit allow-list.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::handler::{Handler, Job, JobContext, Outcome, Progress};

/// Time a child gets to exit after SIGTERM (or after its stdin closes) before SIGKILL.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);
/// Environment variables passed to children unless configured otherwise.
pub const DEFAULT_ENV_ALLOW: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "HF_HOME",
];
/// Longest line a child may write on stdout (a result with inline data), bytes.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;
/// Longest stderr line logged, bytes (longer lines are cut).
const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// Settings of the process executor.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The program to run (a path, or a name looked up in `PATH`). Flag `--command` (split
    /// like a shell would, without running one), env `FLEETQ_COMMAND`.
    pub program: String,
    /// Its arguments (from configuration only; never from a job).
    pub args: Vec<String>,
    /// Children at most: the worker's slots.
    pub slots: usize,
    /// Names of environment variables passed through to children. Default
    /// [`DEFAULT_ENV_ALLOW`]. Flag `--child-env NAME` (repeatable).
    pub env_allow: Vec<String>,
    /// Replace a child after this many jobs; none: never. Flag `--max-jobs-per-child`.
    pub max_jobs_per_child: Option<u32>,
    /// Replace a child after it has lived this long (checked between jobs); none: never.
    /// Flag `--max-child-life-secs`.
    pub max_child_life: Option<Duration>,
    /// SIGTERM → SIGKILL grace. Default [`DEFAULT_KILL_GRACE`].
    pub kill_grace: Duration,
    /// Working directory of children; none: the worker's.
    pub workdir: Option<PathBuf>,
}

impl ProcessConfig {
    /// Settings for `command` (split into program and arguments like a shell would, but no
    /// shell runs it), with the defaults.
    pub fn from_command(command: &str, slots: usize) -> Result<Self, String> {
        let words = shlex::split(command)
            .ok_or_else(|| format!("cannot split the command {command:?}: unbalanced quotes"))?;
        let mut words = words.into_iter();
        let program = words
            .next()
            .ok_or_else(|| "the command is empty; give the program to run, e.g. --command 'python3 model_server.py'".to_owned())?;
        Ok(Self {
            program,
            args: words.collect(),
            slots,
            env_allow: DEFAULT_ENV_ALLOW.iter().map(|s| (*s).to_owned()).collect(),
            max_jobs_per_child: None,
            max_child_life: None,
            kill_grace: DEFAULT_KILL_GRACE,
            workdir: None,
        })
    }

    /// The program's full path, or a message saying it was not found.
    pub fn resolve_program(&self) -> Result<PathBuf, String> {
        let p = Path::new(&self.program);
        let found = if self.program.contains('/') {
            p.is_file().then(|| p.to_path_buf())
        } else {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(&self.program))
                    .find(|c| c.is_file())
            })
        };
        found.ok_or_else(|| {
            format!(
                "command not found: {:?}; check --command (it is looked up in PATH unless it has a '/')",
                self.program
            )
        })
    }
}

/// What a child writes on stdout.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ChildMessage {
    Started,
    Progress {
        step: Option<u64>,
        total: Option<u64>,
        stage: Option<String>,
        message: Option<String>,
    },
    Result {
        result: serde_json::Value,
    },
    Error {
        message: String,
        #[serde(default = "yes")]
        retryable: bool,
    },
}

fn yes() -> bool {
    true
}

/// One running child.
struct ChildProc {
    child: Child,
    pid: i32,
    stdin: Option<ChildStdin>,
    stdout: FramedRead<ChildStdout, LinesCodec>,
    born: Instant,
    jobs: u32,
    /// The job it runs, for log lines of its stderr.
    current_job: Arc<Mutex<Option<String>>>,
    /// Held from spawn until the child is reaped: bounds the children and keeps a
    /// replacement from starting while the old one lives.
    _seat: OwnedSemaphorePermit,
}

impl ChildProc {
    fn signal_group(&self, signal: Signal) {
        // The child leads its own process group, so this reaches what it spawned too.
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }

    /// Stops the child and reaps it: closes stdin (a polite child exits), then SIGTERM to its
    /// group after `grace`, then SIGKILL after another `grace`.
    async fn stop(mut self, grace: Duration, polite: bool) {
        drop(self.stdin.take());
        if polite && tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
            self.signal_group(Signal::SIGKILL);
            return;
        }
        self.signal_group(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.signal_group(Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Whatever the child left in its group goes too.
        self.signal_group(Signal::SIGKILL);
    }
}

struct Pool {
    config: ProcessConfig,
    node: String,
    idle: Mutex<Vec<ChildProc>>,
    seats: Arc<Semaphore>,
}

/// A child checked out for one job; dropping it without [`Checkout::give_back`] stops and
/// reaps the child in the background (a timeout or cancel dropped the job).
struct Checkout {
    child: Option<ChildProc>,
    pool: Arc<Pool>,
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let grace = self.pool.config.kill_grace;
            tracing::info!(pid = child.pid, "stopping child process (job stopped)");
            child.signal_group(Signal::SIGTERM);
            tokio::spawn(child.stop(grace, false));
        }
    }
}

impl Checkout {
    fn proc(&mut self) -> Option<&mut ChildProc> {
        self.child.as_mut()
    }

    /// Returns a healthy child to the pool, or retires it when it reached its limits.
    fn give_back(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        *child
            .current_job
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        child.jobs += 1;
        let c = &self.pool.config;
        let worn = c.max_jobs_per_child.is_some_and(|m| child.jobs >= m)
            || c.max_child_life.is_some_and(|l| child.born.elapsed() >= l);
        if worn {
            tracing::info!(
                pid = child.pid,
                jobs = child.jobs,
                "replacing child process: job or lifetime limit reached"
            );
            tokio::spawn(child.stop(c.kill_grace, true));
        } else {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(child);
        }
    }

    /// Stops and reaps the child now (it misbehaved); returns how it ended.
    async fn discard(mut self) -> String {
        let Some(mut child) = self.child.take() else {
            return "gone".into();
        };
        let grace = self.pool.config.kill_grace;
        // A child that closed its stdout is usually exiting: give it a moment to say how.
        let status = tokio::time::timeout(Duration::from_millis(500), child.child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        let pid = child.pid;
        child.stop(grace, false).await;
        match status {
            Some(st) => format!("child process {pid} exited ({st})"),
            None => format!("child process {pid} was stopped"),
        }
    }
}

impl Pool {
    async fn checkout(self: &Arc<Self>) -> Result<Checkout, String> {
        if let Some(child) = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return Ok(Checkout {
                child: Some(child),
                pool: self.clone(),
            });
        }
        let seat = self
            .seats
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| "the executor is shutting down".to_owned())?;
        let child = self.spawn(seat)?;
        Ok(Checkout {
            child: Some(child),
            pool: self.clone(),
        })
    }

    fn spawn(&self, seat: OwnedSemaphorePermit) -> Result<ChildProc, String> {
        let program = self.config.resolve_program()?;
        let mut child = self
            .command(&program)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .map(|s| FramedRead::new(s, LinesCodec::new_with_max_length(MAX_LINE_BYTES)))
            .ok_or("the child has no stdout")?;
        let current_job = Arc::new(Mutex::new(None::<String>));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(log_stderr(
                stderr,
                current_job.clone(),
                self.node.clone(),
                pid,
            ));
        }
        tracing::info!(pid, program = %program.display(), "started child process");
        Ok(ChildProc {
            child,
            pid,
            stdin,
            stdout,
            born: Instant::now(),
            jobs: 0,
            current_job,
            _seat: seat,
        })
    }

    /// The child's command: a clean environment (only the allowed variables pass, so secrets
    /// of the worker's environment do not leak), pipes for the protocol and logs, and its own
    /// process group so stopping it reaches what it spawned.
    fn command(&self, program: &Path) -> Command {
        let c = &self.config;
        let mut cmd = Command::new(program);
        cmd.args(&c.args)
            .env_clear()
            .env("PYTHONUNBUFFERED", "1")
            .env("FLEETQ_NODE", &self.node)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for name in &c.env_allow {
            if let Some(v) = std::env::var_os(name) {
                cmd.env(name, v);
            }
        }
        if let Some(dir) = &c.workdir {
            cmd.current_dir(dir);
        }
        die_with_parent(&mut cmd);
        cmd
    }
}

/// Logs each line the child writes on stderr, tagged with the node, the child and the job it
/// runs at the time; ends when the child closes stderr.
async fn log_stderr(stderr: ChildStderr, job: Arc<Mutex<Option<String>>>, node: String, pid: i32) {
    let mut lines = FramedRead::new(stderr, LinesCodec::new_with_max_length(MAX_LOG_LINE_BYTES));
    while let Some(line) = lines.next().await {
        let Ok(line) = line else { continue };
        let job = job.lock().unwrap_or_else(PoisonError::into_inner).clone();
        tracing::info!(target: "fleetq::child", %node, pid, job = job.as_deref().unwrap_or("-"), "{line}");
    }
}

/// Makes the child die when the worker dies, even by SIGKILL (Linux `PR_SET_PDEATHSIG`), so a
/// killed worker leaves no child behind holding a GPU. (The signal follows the thread that
/// spawned the child; children are spawned from the runtime's worker threads, which live as
/// long as the worker.)
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    // SAFETY: the closure runs in the forked child before exec and only makes the prctl
    // system call, which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}

/// Runs each job in a long-lived child process (see the module docs).
#[derive(Clone)]
pub struct ProcessExecutor {
    pool: Arc<Pool>,
}

impl std::fmt::Debug for ProcessExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessExecutor")
            .field("program", &self.pool.config.program)
            .finish_non_exhaustive()
    }
}

impl ProcessExecutor {
    /// An executor with `config` on node `node` (passed to children as `FLEETQ_NODE`).
    pub fn new(config: ProcessConfig, node: &str) -> Self {
        let seats = Arc::new(Semaphore::new(config.slots.max(1)));
        Self {
            pool: Arc::new(Pool {
                config,
                node: node.to_owned(),
                idle: Mutex::new(Vec::new()),
                seats,
            }),
        }
    }

    async fn run(&self, job: Job, ctx: JobContext) -> Outcome {
        let co = match self.pool.checkout().await {
            Ok(c) => c,
            Err(e) => return Outcome::Retry(e),
        };
        match send_job(co, &job).await {
            Ok(co) => follow(co, &ctx).await,
            Err(outcome) => outcome,
        }
    }
}

/// Hands `job` to the checked-out child as one JSON line. A child that cannot take it is
/// discarded and the job retried.
async fn send_job(mut co: Checkout, job: &Job) -> Result<Checkout, Outcome> {
    let Some(proc_) = co.proc() else {
        return Err(Outcome::Retry("no child process".into()));
    };
    *proc_
        .current_job
        .lock()
        .unwrap_or_else(PoisonError::into_inner) = Some(job.id.clone());
    let line = serde_json::json!({
        "type": "job",
        "id": job.id,
        "queue": job.queue,
        "payload": job.payload,
        "attempt": job.attempt,
        "max_attempts": job.max_attempts,
        "deadline_ms": serde_json::Value::Null,
    });
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    let written = match proc_.stdin.as_mut() {
        Some(stdin) => stdin.write_all(&bytes).await.and(stdin.flush().await),
        None => Err(std::io::Error::other("stdin closed")),
    };
    if let Err(e) = written {
        let how = co.discard().await;
        return Err(Outcome::Retry(format!(
            "{how} before it took the job ({e})"
        )));
    }
    Ok(co)
}

/// Reads the child's messages until it answers the job. A cancel returns at once (dropping
/// the checkout stops the child); a broken stream or a line that is not a message discards
/// the child, since its state is unknown.
async fn follow(mut co: Checkout, ctx: &JobContext) -> Outcome {
    loop {
        let Some(proc_) = co.proc() else {
            return Outcome::Retry("no child process".into());
        };
        let next = tokio::select! {
            l = proc_.stdout.next() => l,
            _ = ctx.cancelled() => return Outcome::Retry("stopped".into()),
        };
        let line = match next {
            Some(Ok(line)) => line,
            Some(Err(e)) => {
                let how = co.discard().await;
                return Outcome::Retry(format!("{how}: its stdout broke the protocol ({e})"));
            }
            None => {
                let how = co.discard().await;
                return Outcome::Retry(format!("{how} during the job"));
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ChildMessage>(&line) {
            Ok(ChildMessage::Started) => ctx.started().await,
            Ok(ChildMessage::Progress {
                step,
                total,
                stage,
                message,
            }) => {
                let p = Progress {
                    step,
                    total,
                    stage,
                    message,
                };
                ctx.progress(p).await;
            }
            Ok(ChildMessage::Result { result }) => {
                co.give_back();
                return Outcome::Succeeded(result);
            }
            Ok(ChildMessage::Error { message, retryable }) => {
                co.give_back();
                return if retryable {
                    Outcome::Retry(message)
                } else {
                    Outcome::Fail(message)
                };
            }
            Err(e) => return protocol_error(co, &line, &e).await,
        }
    }
}

/// Discards a child that wrote something other than a protocol message on stdout; the reason
/// quotes the line (cut to 200 bytes) so the child's author sees what went wrong.
async fn protocol_error(co: Checkout, line: &str, e: &serde_json::Error) -> Outcome {
    let mut shown = line.to_owned();
    if shown.len() > 200 {
        let mut cut = 200;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    let how = co.discard().await;
    Outcome::Retry(format!(
        "protocol error: the child wrote {shown:?} on stdout, which is not a fleetq message ({e}); \
         children must write only protocol JSON lines on stdout and logs on stderr ({how})"
    ))
}

impl Handler for ProcessExecutor {
    fn handle(
        &self,
        job: Job,
        ctx: JobContext,
    ) -> impl std::future::Future<Output = Outcome> + Send {
        self.run(job, ctx)
    }

    fn reports_start(&self) -> bool {
        true
    }

    async fn ready(&self) -> Result<(), String> {
        self.pool.config.resolve_program().map(|_| ())
    }

    async fn shutdown(&self) {
        let idle: Vec<ChildProc> = std::mem::take(
            &mut *self
                .pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let grace = self.pool.config.kill_grace;
        for child in idle {
            child.stop(grace, true).await;
        }
        // Children being stopped in the background hold their seats until reaped.
        let n = u32::try_from(self.pool.config.slots.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(grace * 3, self.pool.seats.acquire_many(n)).await;
        self.pool.seats.close();
    }
}
