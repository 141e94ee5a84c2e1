//! A throwaway `redis-server` on a free loopback port in a temporary directory, for the demo,
//! the benchmarks and the tests. It is killed and its directory removed when dropped.
//! Tests may stop, pause and restart it to play failures.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long to wait for a fresh server to answer `PING`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for [`LocalRedis::start_with`].
#[derive(Debug, Clone, Default)]
pub struct LocalRedisOptions {
    /// Require this password (`requirepass`).
    pub password: Option<String>,
    /// Turn on the append-only file (for crash tests); off by default.
    pub appendonly: bool,
    /// Serve TLS only, with this PEM certificate and key (`rediss://` URLs).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Extra `--name value` arguments.
    pub extra: Vec<(String, String)>,
    /// The server program (`valkey-server`, say); default `redis-server` from `PATH`.
    pub program: Option<PathBuf>,
}

/// A running local `redis-server`.
#[derive(Debug)]
pub struct LocalRedis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    options: LocalRedisOptions,
}

impl LocalRedis {
    /// Starts a server without persistence on a free loopback port.
    pub fn start() -> Result<Self> {
        Self::start_with(LocalRedisOptions::default())
    }

    /// Starts a server with `options`.
    pub fn start_with(options: LocalRedisOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("fleetq-redis-")
            .tempdir()
            .map_err(|e| Error::LocalRedis(format!("cannot create a temporary directory: {e}")))?;
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            options,
        };
        let mut last_err = String::new();
        // A port found free may be taken before redis binds it; try a few.
        for _ in 0..5 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => {
                    last_err = e.to_string();
                    server.kill();
                }
            }
        }
        Err(Error::LocalRedis(last_err))
    }

    fn spawn(&mut self) -> Result<()> {
        let child = self.command().spawn().map_err(|e| match &self.options.program {
            Some(p) => Error::LocalRedis(format!("cannot run {} ({e})", p.display())),
            None => Error::LocalRedis(format!(
                "cannot run redis-server ({e}); install it (Debian: apt-get install -y redis-server) or set REDIS_URL to a running server"
            )),
        })?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// The `redis-server` command line for the current port and options: no snapshots, log to
    /// a file in the directory (so failure messages can include it), in the foreground.
    fn command(&self) -> Command {
        let mut cmd = match &self.options.program {
            Some(p) => Command::new(p),
            None => Command::new("redis-server"),
        };
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg(if self.options.appendonly { "yes" } else { "no" })
            .arg("--daemonize")
            .arg("no");
        if let Some((cert, key)) = &self.options.tls {
            // The later `--port 0` wins: TLS only, on the chosen port.
            cmd.arg("--port")
                .arg("0")
                .arg("--tls-port")
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-auth-clients")
                .arg("no");
        }
        if let Some(pw) = &self.options.password {
            cmd.arg("--requirepass").arg(pw);
        }
        for (k, v) in &self.options.extra {
            cmd.arg(format!("--{k}")).arg(v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }

    /// Polls until the server answers, it exits, or [`START_TIMEOUT`] passes; the error
    /// carries the server's log.
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(Error::LocalRedis(format!(
                    "{} exited at start ({status}); its log:\n{}",
                    self.program_name(),
                    self.log()
                )));
            }
            if self.ping() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::LocalRedis(format!(
                    "{} did not answer within {START_TIMEOUT:?}; its log:\n{}",
                    self.program_name(),
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The program, for messages: `redis-server` unless the options name another.
    fn program_name(&self) -> String {
        self.options
            .program
            .as_ref()
            .map_or_else(|| "redis-server".to_owned(), |p| p.display().to_string())
    }

    fn ping(&self) -> bool {
        if self.options.tls.is_some() {
            // A TLS client needs the CA; a TCP connect shows the server is listening.
            return std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        }
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    /// `redis[s]://[:password@]<host>:<port>/0`: `localhost` for TLS (the name in the test
    /// certificate), `127.0.0.1` otherwise.
    pub fn url(&self) -> String {
        let (scheme, host) = if self.options.tls.is_some() {
            ("rediss", "localhost")
        } else {
            ("redis", "127.0.0.1")
        };
        match &self.options.password {
            Some(pw) => format!("{scheme}://:{pw}@{host}:{}/0", self.port),
            None => format!("{scheme}://{host}:{}/0", self.port),
        }
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The last `lines` lines of the server's log (for failure messages).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Kills the server (SIGKILL); [`LocalRedis::restart`] brings it back on the same port.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory after [`LocalRedis::kill`].
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::LocalRedis(format!("cannot find a free loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::LocalRedis(format!("cannot find a free loopback port: {e}")))
}
