//! Test harness shared by the end-to-end tests: a private `redis-server` per test (or a
//! `valkey-server`: [`Server`]), worker processes to kill, freeze and stop, and polling with
//! deadlines (tests never sleep to wait).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleetq_broker::{LocalRedis, Producer, QueueConfig, QueueKeys, Redis};
use fleetq_worker::{Handler, Job, JobContext, Outcome, WorkerConfig};
use tokio_util::sync::CancellationToken;

pub use fleetq_broker;
pub use fleetq_worker;

pub mod chaos;
pub mod cluster;
pub mod entries;
pub mod fake_comfy;
pub mod proxy;
pub mod sentinel;
pub mod server;

pub use server::Server;

/// Lines of a server's or worker's log put into a failing test's output.
pub const LOG_TAIL_LINES: usize = 40;

/// A private Redis for one test plus handles on it.
pub struct Stack {
    /// The server (kill, restart, log).
    pub server: LocalRedis,
    /// A client handle.
    pub redis: Redis,
}

impl Stack {
    /// Starts a fresh `redis-server` on a free port, with the function library loaded (as a
    /// running broker would have: workers wait for it and never load it themselves).
    pub async fn start() -> Self {
        Self::start_on(Server::Redis).await
    }

    /// Like [`Stack::start`], on `server`. Panics, saying how to install it, when the server
    /// is Valkey and there is no `valkey-server`, and when the program found is not Valkey.
    pub async fn start_on(server: Server) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let local = LocalRedis::start_with(server.options())
            .unwrap_or_else(|e| panic!("cannot start the {} server: {e}", server.name()));
        let redis = Redis::connect(&local.url()).await.expect("connect");
        if server == Server::Valkey {
            let info: String = redis::cmd("INFO")
                .arg("server")
                .query_async(&mut redis.conn())
                .await
                .unwrap();
            let field = format!("{}:", server.version_field());
            assert!(
                info.lines().any(|l| l.starts_with(&field)),
                "{} was started as Valkey but reports no {field} in INFO server, so it is not \
                 Valkey: point {} at a valkey-server binary, or unset it and {}",
                server
                    .program()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .display(),
                server::VALKEY_SERVER_ENV,
                server::VALKEY_INSTALL_HINT
            );
        }
        let server = local;
        fleetq_broker::functions::load_all(&redis.conn())
            .await
            .expect("load the function library");
        Self { server, redis }
    }

    /// A producer for `queue`.
    pub async fn producer(&self, queue: &str) -> Producer {
        Producer::new(&self.redis, queue).await.expect("producer")
    }

    /// Writes queue config `cfg` for `queue`.
    pub async fn configure(&self, queue: &str, cfg: &QueueConfig) {
        let keys = QueueKeys::new(queue).unwrap();
        cfg.store(&mut self.redis.conn(), &keys).await.unwrap();
    }

    /// Creates the `workers` group of `queue` (as a worker does at start).
    pub async fn create_group(&self, queue: &str) {
        let keys = QueueKeys::new(queue).unwrap();
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.stream())
            .arg("workers")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await
            .unwrap();
    }

    /// A plain connection for raw commands.
    pub fn conn(&self) -> fleetq_broker::connection::SharedConn {
        self.redis.conn()
    }

    /// Runs an in-process worker until the returned token is cancelled.
    pub fn worker<H: Handler>(&self, config: WorkerConfig, handler: H) -> InProcessWorker {
        let stop = CancellationToken::new();
        let s = stop.clone();
        let redis = self.redis.clone();
        let task = tokio::spawn(async move {
            fleetq_worker::run(redis, config, handler, async move { s.cancelled().await })
                .await
                .expect("worker run");
        });
        InProcessWorker { stop, task }
    }

    /// Every event of `queue` still in its events stream, oldest first.
    pub async fn events(&self, queue: &str) -> Vec<std::collections::HashMap<String, String>> {
        let keys = QueueKeys::new(queue).unwrap();
        let events = fleetq_broker::inspect::events(&self.redis, &keys)
            .await
            .unwrap();
        events.into_iter().map(|(_, f)| f).collect()
    }

    /// The `/metrics` URL of the first live node's worker, once its record exists.
    pub async fn first_node_metrics_url(&self) -> String {
        eventually(Duration::from_secs(10), "a node registered", || async {
            !fleetq_broker::nodes::list(&self.redis)
                .await
                .unwrap()
                .is_empty()
        })
        .await;
        let record = fleetq_broker::nodes::list(&self.redis)
            .await
            .unwrap()
            .remove(0);
        format!("http://{}/metrics", record.fields["metrics_addr"])
    }

    /// The queue's pending list (in-flight entries): (entry id, consumer, idle ms, deliveries).
    pub async fn pending(&self, queue: &str) -> Vec<(String, String, u64, u64)> {
        let keys = QueueKeys::new(queue).unwrap();
        redis::cmd("XPENDING")
            .arg(keys.stream())
            .arg("workers")
            .arg("-")
            .arg("+")
            .arg(1000)
            .query_async(&mut self.conn())
            .await
            .unwrap()
    }

    /// The server's `used_memory` (bytes).
    pub async fn used_memory(&self) -> i64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap()
    }

    /// A field of the queue's stats hash, 0 when absent.
    pub async fn stat(&self, queue: &str, field: &str) -> i64 {
        let keys = QueueKeys::new(queue).unwrap();
        let v: Option<i64> = redis::cmd("HGET")
            .arg(keys.stats())
            .arg(field)
            .query_async(&mut self.conn())
            .await
            .unwrap();
        v.unwrap_or(0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- last {LOG_TAIL_LINES} lines of the server's log (port {}) ---\n{}",
                self.server.port(),
                self.server.log_tail(LOG_TAIL_LINES)
            );
        }
    }
}

/// A broker running in this test process on a free loopback port.
pub struct InProcessBroker {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessBroker {
    /// Stops the broker and waits for it.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("broker task");
    }
}

impl Stack {
    /// Starts a broker with `config` on a free loopback port.
    pub async fn broker(&self, config: fleetq_broker::service::BrokerConfig) -> InProcessBroker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        let redis = self.redis.clone();
        let task = tokio::spawn(async move {
            fleetq_broker::service::run(
                redis,
                listener,
                config,
                async move { s.cancelled().await },
            )
            .await
            .expect("broker run");
        });
        InProcessBroker { base, stop, task }
    }
}

/// Fetches `url` and parses the Prometheus exposition into (name, labels) → value.
pub async fn scrape(url: &str) -> Metrics {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    Metrics(scrape.samples)
}

/// Parsed metric samples.
pub struct Metrics(pub Vec<prometheus_parse::Sample>);

impl Metrics {
    /// The value of the sample named `name` whose labels include all of `labels`;
    /// histograms give their count. Panics when absent.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels)
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
    }

    /// Like [`Metrics::get`], `None` when absent.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    }
}

/// A worker running in this test process.
pub struct InProcessWorker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessWorker {
    /// Signals shutdown and waits until the worker has stopped.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("worker task");
    }
}

/// Worker settings for tests: 1 slot, short grace.
pub fn worker_config(queue: &str, node: &str, slots: usize) -> WorkerConfig {
    let mut c = WorkerConfig::new(queue, node);
    c.slots = slots;
    c.shutdown_grace = Duration::from_secs(2);
    c
}

/// A handler built from a closure; counts its calls.
pub struct FnHandler<F> {
    f: F,
    /// How many times the handler ran.
    pub calls: Arc<AtomicUsize>,
}

impl<F, Fut> FnHandler<F>
where
    F: Fn(Job, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    /// Wraps `f`.
    pub fn new(f: F) -> Self {
        Self {
            f,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Job, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    fn handle(&self, job: Job, ctx: JobContext) -> impl Future<Output = Outcome> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.f)(job, ctx)
    }
}

/// A plain connection to one server for a test's own commands, with a 10 s response timeout:
/// the redis crate's 500 ms default is shorter than a write can take on a loaded 2-core
/// machine while several servers fsync and rewrite their AOF at once.
pub async fn direct_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .unwrap_or_else(|e| panic!("bad test URL {url}: {e}"))
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// A queue config for tests that wait on leases and retries: a 2 s lease, retries after
/// 50–200 ms, the rest as by default.
pub fn quick_queue_config() -> QueueConfig {
    QueueConfig {
        lease: Duration::from_secs(2),
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        ..QueueConfig::default()
    }
}

/// Polls `cond` every 20 ms until it is true or `timeout` passes; panics with `what` then.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of a binary of this workspace, next to the test executable's directory.
///
/// `cargo test` builds the binaries of the package under test only, so the workspace's other
/// binaries (`fleetq`, `fleetq-broker`, `fleetq-worker`) are built here, once per test
/// process, with the same cargo and profile (a no-op when they are up to date).
pub fn bin_path(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("target dir")
    } else {
        dir
    };
    // This package's own binaries are built by `cargo test` itself.
    if ["fleetq-test-worker", "fleetq-chaos", "fleetq-chaos-child"].contains(&name) {
        return dir.join(name);
    }
    BUILT.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--bins"]);
        // Not fleetq-tests: `cargo test` builds its own binaries (with its own features), and
        // building them here too would make the two overwrite each other on every run.
        for pkg in ["fleetq-broker", "fleetq-worker", "fleetq-cli"] {
            cmd.args(["-p", pkg]);
        }
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let out = cmd
            .output()
            .expect("run cargo build for the workspace's binaries");
        assert!(
            out.status.success(),
            "cargo build of the workspace binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    dir.join(name)
}

/// A worker in a process of its own (the `fleetq-test-worker` binary), to kill or freeze.
pub struct WorkerProcess {
    child: Child,
    /// The worker's node name.
    pub node: String,
    /// Its stderr, removed with it.
    log: tempfile::NamedTempFile,
}

impl WorkerProcess {
    /// Starts `fleetq-test-worker` on `queue` as `node` with `slots` and extra flags.
    pub fn spawn(url: &str, queue: &str, node: &str, slots: usize, extra: &[&str]) -> Self {
        let log = tempfile::Builder::new()
            .prefix(&format!("fleetq-test-worker-{node}-"))
            .suffix(".log")
            .tempfile()
            .expect("log file");
        let file = log.reopen().expect("log file");
        let child = Command::new(bin_path("fleetq-test-worker"))
            .args(["--redis-url", url, "--queue", queue, "--node", node])
            .args(["--slots", &slots.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn fleetq-test-worker (built by cargo test)");
        Self {
            child,
            node: node.to_owned(),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` (libc::SIGKILL, SIGSTOP, SIGCONT, SIGTERM).
    pub fn signal(&self, signal: i32) {
        send_signal(self.child.id(), signal);
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!(
                    "worker {} did not exit within {timeout:?}; log:\n{}",
                    self.node,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The exit code when the process has exited (`-1` when a signal ended it), without waiting.
    pub fn exited(&mut self) -> Option<i32> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- last {LOG_TAIL_LINES} lines of worker {}'s log ---\n{}",
                self.node,
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            );
        }
        let _ = kill(self.child.id(), libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `signal` to process `pid`; panics when it cannot.
pub fn send_signal(pid: u32, signal: i32) {
    assert_eq!(kill(pid, signal), 0, "kill({pid}, {signal}) failed");
}

/// Sends `signal` to every process of group `pgid` (a child started with `process_group(0)`
/// and what it started); a group already gone is fine.
#[allow(unsafe_code)]
pub fn signal_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(-(pgid as i32), signal) };
}

#[allow(unsafe_code)]
fn kill(pid: u32, signal: i32) -> i32 {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, signal) }
}

/// A free loopback port (for servers the tests start and must name up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The children of process `ppid` in the process table, zombies included: (pid, state).
pub fn child_processes(ppid: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, then parent pid.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(ppid) {
            out.push((pid, state));
        }
    }
    out
}

/// Whether process `pid` is gone or a zombie waiting to be reaped.
pub fn process_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'))
    })
}

/// Fails the test, saying what to install, unless `python3` with redis-py is on the PATH.
pub fn require_python_redis() {
    let probe = Command::new("python3")
        .args(["-c", "import redis"])
        .output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "python3 with redis-py is needed for this test: run `pip install redis` (`./dev test` does)"
    );
}

/// Runs the Python script `script` with `args` against `REDIS_URL=url` and parses its stdout
/// as one JSON document. Fails the test, quoting both outputs, when the script exits non-zero
/// or prints something else.
pub async fn run_python_json(script: PathBuf, args: Vec<String>, url: String) -> serde_json::Value {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(&script)
            .args(&args)
            .env("REDIS_URL", url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()))
    })
    .await
    .unwrap_or_else(|e| panic!("the python3 runner failed: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the Python script failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}
