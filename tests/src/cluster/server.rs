//! One `redis-server` process of a local topology — a cluster node, a primary or replica
//! watched by sentinels, or a sentinel — in a temporary directory of its own that keeps its
//! log, killed when dropped. Also what both topologies share: loopback ports reserved below the
//! ephemeral range, one cached connection per server, and polling until a deadline.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue};

/// How long a fresh server has to answer `PING` before it counts as failed to start.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a wait looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Connect timeout of the harness's own connections to a server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Response timeout of the harness's own connections (a frozen server must not hang a wait).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Start attempts per server when its ports turn out to be taken (another process may bind a
/// port between the check and redis-server's own bind).
const START_ATTEMPTS: usize = 5;

/// A cluster node's bus listens this far above its client port (Redis's own convention).
pub const BUS_PORT_OFFSET: u16 = 10_000;

/// Lowest port handed out.
const PORT_RANGE_START: u16 = 12_000;

/// Builds a server's command-line arguments from its directory, port and bus port (0 when it
/// has none); it may also write files into the directory (a sentinel's config).
pub(crate) type ArgsFn = Box<dyn Fn(&Path, u16, u16) -> Vec<String> + Send + Sync>;

/// One `redis-server` process.
pub(crate) struct Server {
    /// What it is, for messages ("cluster node", "sentinel", …).
    label: &'static str,
    port: u16,
    /// The cluster bus port; 0 for servers outside a cluster.
    bus_port: u16,
    /// Whether `bus_port` is needed (reserved and passed to the arguments).
    needs_bus: bool,
    /// Its own directory: data, AOF, `nodes.conf`, sentinel config and log; removed on drop.
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Stopped with SIGSTOP: alive, but not answering.
    frozen: bool,
    args: ArgsFn,
}

impl Server {
    /// Starts a server on freshly reserved ports, retrying on other ports when it exits at
    /// start (most often: a port was taken meanwhile). Waits until it answers `PING`.
    pub(crate) async fn start(
        label: &'static str,
        needs_bus: bool,
        args: ArgsFn,
    ) -> Result<Self, String> {
        let mut server = Self::spawn_new(label, needs_bus, args)?;
        server.ready().await?;
        Ok(server)
    }

    /// Reserves ports and a directory and spawns the process, without waiting for it; finish
    /// with [`Server::ready`]. Lets several servers boot at once.
    pub(crate) fn spawn_new(
        label: &'static str,
        needs_bus: bool,
        args: ArgsFn,
    ) -> Result<Self, String> {
        let (port, bus_port) = reserve_ports(needs_bus)?;
        let mut server = Self {
            label,
            port,
            bus_port,
            needs_bus,
            dir: new_dir(label)?,
            child: None,
            frozen: false,
            args,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Waits until the spawned process answers; when it exited at start, moves it to other
    /// ports and a fresh directory and tries again, up to [`START_ATTEMPTS`] times.
    pub(crate) async fn ready(&mut self) -> Result<(), String> {
        let mut attempt = 1;
        loop {
            match self.wait_ready().await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= START_ATTEMPTS || self.child.is_some() => return Err(e),
                Err(_) => {
                    attempt += 1;
                    let (port, bus_port) = reserve_ports(self.needs_bus)?;
                    self.port = port;
                    self.bus_port = bus_port;
                    self.dir = new_dir(self.label)?;
                    self.spawn()?;
                }
            }
        }
    }

    /// Starts the process again on the same ports and directory (after [`Server::kill`]) and
    /// waits until it answers.
    pub(crate) async fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()?;
        self.wait_ready().await
    }

    /// Replaces the arguments used by the next start (a restarted primary may come back as a
    /// replica).
    pub(crate) fn set_args(&mut self, args: ArgsFn) {
        self.args = args;
    }

    fn spawn(&mut self) -> Result<(), String> {
        let out = std::fs::File::create(self.stdout_path())
            .map_err(|e| format!("cannot create {}: {e}", self.stdout_path().display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("cannot duplicate a file handle: {e}"))?;
        let child = Command::new("redis-server")
            .args((self.args)(self.dir.path(), self.port, self.bus_port))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run redis-server for a {} ({e}); install it (Debian: apt-get install -y redis-server)",
                    self.label
                )
            })?;
        self.child = Some(child);
        self.frozen = false;
        Ok(())
    }

    /// Polls `PING` until it answers or [`START_TIMEOUT`] passes. When the process exits, its
    /// child handle is dropped (so [`Server::ready`] knows it may retry elsewhere).
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "the {} on port {} exited at start ({status}); its log:\n{}",
                    self.label,
                    self.port,
                    self.log_tail(30)
                ));
            }
            if ping(self.port).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {} on port {} did not answer PING within {START_TIMEOUT:?}; its log:\n{}",
                    self.label,
                    self.port,
                    self.log_tail(30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The client port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process runs and is not frozen, i.e. is expected to answer.
    pub(crate) fn is_live(&self) -> bool {
        self.child.is_some() && !self.frozen
    }

    /// Whether the process runs (frozen or not).
    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's directory.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the process (SIGKILL) and reaps it; a no-op when it is not running.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.frozen = false;
    }

    /// Stops the process with SIGSTOP: it keeps its sockets but answers nothing.
    pub(crate) fn freeze(&mut self) {
        let pid = self.pid().unwrap_or_else(|| {
            panic!(
                "cannot freeze the {} on port {}: it is not running",
                self.label, self.port
            )
        });
        crate::send_signal(pid, libc::SIGSTOP);
        self.frozen = true;
    }

    /// Resumes a frozen process with SIGCONT.
    pub(crate) fn thaw(&mut self) {
        let pid = self.pid().unwrap_or_else(|| {
            panic!(
                "cannot thaw the {} on port {}: it is not running",
                self.label, self.port
            )
        });
        crate::send_signal(pid, libc::SIGCONT);
        self.frozen = false;
    }

    fn stdout_path(&self) -> PathBuf {
        self.dir.path().join("stdout.log")
    }

    /// Path of the log file the arguments must name (`logfile`).
    pub(crate) fn log_path(dir: &Path) -> PathBuf {
        dir.join("redis.log")
    }

    /// The last `lines` lines of the server's log (its stdout first: startup errors land
    /// there before the log file is open).
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let mut log = std::fs::read_to_string(self.stdout_path()).unwrap_or_default();
        log.push_str(&std::fs::read_to_string(Self::log_path(self.dir.path())).unwrap_or_default());
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Prints the log tail to stderr, headed by what and where the server is.
    pub(crate) fn print_log_tail(&self, lines: usize) {
        eprintln!(
            "--- last {lines} lines of the log of the {} on port {} ---\n{}",
            self.label,
            self.port,
            self.log_tail(lines)
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn new_dir(label: &str) -> Result<tempfile::TempDir, String> {
    tempfile::Builder::new()
        .prefix(&format!("fleetq-{}-", label.replace(' ', "-")))
        .tempdir()
        .map_err(|e| format!("cannot create a temporary directory: {e}"))
}

async fn ping(port: u16) -> bool {
    let Ok(client) = redis::Client::open(url(port)) else {
        return false;
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(200)))
        .set_response_timeout(Some(Duration::from_millis(500)));
    let Ok(mut conn) = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
    else {
        return false;
    };
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .is_ok()
}

/// `redis://127.0.0.1:<port>`, for a plain client of one server.
pub fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// Ports handed out by this process (never handed out twice, so a killed server's port stays
/// its own for a restart).
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// The half-open range ports are drawn from: below the kernel's ephemeral range (where
/// outgoing connections and other tests' `free_port()` live), leaving room for the bus
/// port at +[`BUS_PORT_OFFSET`].
fn port_range() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let end = ephemeral_start.saturating_sub(BUS_PORT_OFFSET);
    if end > PORT_RANGE_START + 1_000 {
        (PORT_RANGE_START, end)
    } else {
        // An unusual ephemeral range: fall back to the top of the port space.
        (40_000, 55_000)
    }
}

/// Reserves a client port (and with `bus`, its bus port +[`BUS_PORT_OFFSET`]) that this process
/// has not handed out and that can be bound on 127.0.0.1 right now. Returns (port, bus port or 0).
pub(crate) fn reserve_ports(bus: bool) -> Result<(u16, u16), String> {
    let (start, end) = port_range();
    let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(start..end);
        let bus_port = port + BUS_PORT_OFFSET;
        let mut wanted = vec![port];
        if bus {
            wanted.push(bus_port);
        }
        if wanted.iter().any(|p| reserved.contains(p)) {
            continue;
        }
        if wanted
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            reserved.extend(wanted);
            return Ok((port, if bus { bus_port } else { 0 }));
        }
    }
    Err(format!(
        "no free loopback port (pair) found in {start}..{end} after 1000 tries; are many servers left running?"
    ))
}

/// One cached connection per port, replaced when it fails at the transport level.
#[derive(Default)]
pub(crate) struct Conns(Mutex<HashMap<u16, MultiplexedConnection>>);

impl Conns {
    async fn conn(&self, port: u16) -> Result<MultiplexedConnection, String> {
        if let Some(c) = self.lock().get(&port) {
            return Ok(c.clone());
        }
        let client = redis::Client::open(url(port)).map_err(|e| format!("port {port}: {e}"))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| format!("cannot connect to port {port}: {e}"))?;
        self.lock().insert(port, conn.clone());
        Ok(conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, MultiplexedConnection>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `cmd` on the server at `port`. A transport failure drops the cached connection and
    /// tries once more on a new one (the server may have been restarted); an error reply does not.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        port: u16,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.conn(port).await?;
            match cmd.query_async::<T>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) if tries < 2 && (e.is_io_error() || e.is_connection_dropped()) => {
                    self.lock().remove(&port);
                }
                Err(e) => {
                    if e.is_io_error() || e.is_connection_dropped() {
                        self.lock().remove(&port);
                    }
                    return Err(format!("port {port}: {e}"));
                }
            }
        }
    }

    /// Runs `pipe` on the server at `port`, like [`Conns::query`].
    pub(crate) async fn query_pipe<T: FromRedisValue>(
        &self,
        port: u16,
        pipe: &redis::Pipeline,
    ) -> Result<T, String> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut conn = self.conn(port).await?;
            match pipe.query_async::<T>(&mut conn).await {
                Ok(v) => return Ok(v),
                Err(e) if tries < 2 && (e.is_io_error() || e.is_connection_dropped()) => {
                    self.lock().remove(&port);
                }
                Err(e) => {
                    if e.is_io_error() || e.is_connection_dropped() {
                        self.lock().remove(&port);
                    }
                    return Err(format!("port {port}: {e}"));
                }
            }
        }
    }
}

/// Polls `probe` every [`POLL_INTERVAL`] until it gives `Ok` or `timeout` passes; then
/// returns the last reason it gave for "not yet".
pub(crate) async fn poll<T, F, Fut>(timeout: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(why) if Instant::now() >= deadline => return Err(why),
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// The value of `field` in an `INFO` reply (`field:value` lines).
pub(crate) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_args() -> ArgsFn {
        Box::new(|dir: &Path, port: u16, _bus: u16| {
            vec![
                "--port".into(),
                port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--dir".into(),
                dir.display().to_string(),
                "--logfile".into(),
                Server::log_path(dir).display().to_string(),
                "--save".into(),
                String::new(),
            ]
        })
    }

    #[tokio::test]
    async fn a_server_whose_port_is_taken_moves_to_another_port() {
        let (taken, _) = reserve_ports(false).unwrap();
        let _squatter = TcpListener::bind(("127.0.0.1", taken)).unwrap();
        let mut server = Server {
            label: "test server",
            port: taken,
            bus_port: 0,
            needs_bus: false,
            dir: new_dir("test server").unwrap(),
            child: None,
            frozen: false,
            args: plain_args(),
        };
        server.spawn().unwrap();
        server.ready().await.unwrap();
        assert_ne!(server.port(), taken);
        assert!(ping(server.port()).await);
        let pid = server.pid().unwrap();
        drop(server);
        assert!(crate::process_gone(pid));
    }

    #[test]
    fn reserved_ports_are_unique_and_leave_room_for_the_bus() {
        let mut seen = BTreeSet::new();
        for _ in 0..50 {
            let (port, bus) = reserve_ports(true).unwrap();
            assert_eq!(bus, port + BUS_PORT_OFFSET);
            assert!(
                seen.insert(port) && seen.insert(bus),
                "{port} handed out twice"
            );
        }
    }
}
