//! A primary, its replica and three sentinels watching them as [`SERVICE_NAME`], each a
//! `redis-server` in its own temporary directory on loopback ports, for tests of
//! `redis+sentinel://` URLs. A test can ask for a failover or kill the primary; both return
//! once the sentinels report the new primary and the servers have taken their new roles.
//!
//! ```no_run
//! # async fn demo() {
//! use fleetq_tests::sentinel::SentinelSetup;
//! let mut setup = SentinelSetup::start().await;
//! let url = setup.url(); // redis+sentinel://127.0.0.1:s1,…/fleetq-primary
//! let promoted = setup.failover().await;
//! let promoted_again = setup.kill_primary().await;
//! setup.restart_old_primary().await; // back as a replica of `promoted_again`
//! # let _ = (url, promoted);
//! # }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::cluster::server::{self, info_field, poll, Conns, Server};

/// The service (master) name the sentinels monitor.
pub const SERVICE_NAME: &str = "fleetq-primary";

/// Number of sentinels.
pub const SENTINELS: usize = 3;

/// Sentinels that must agree the primary is down before a failover (`sentinel monitor … 2`).
pub const QUORUM: usize = 2;

/// `sentinel down-after-milliseconds`: a primary silent this long is considered down.
pub const DOWN_AFTER: Duration = Duration::from_millis(1_000);

/// `sentinel failover-timeout`.
pub const FAILOVER_TIMEOUT: Duration = Duration::from_millis(3_000);

/// How long start, failover, kill and restart wait for the servers and sentinels to agree.
/// An automatic failover whose first election splits is retried after twice
/// [`FAILOVER_TIMEOUT`], so this leaves room for a few elections.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(40);

/// Log lines per server printed when a test panics with the setup alive.
const LOG_LINES_ON_PANIC: usize = 20;

/// A running primary + replica + three sentinels. Dropping it kills them all and removes
/// their directories.
pub struct SentinelSetup {
    /// The two data servers: the first primary, then its replica (roles change with failovers).
    data: Vec<Server>,
    sentinels: Vec<Server>,
    conns: Conns,
}

impl SentinelSetup {
    /// Starts the primary, its replica, then the sentinels, and waits until every sentinel
    /// reports the primary, lists the replica as healthy and sees the other two sentinels, and
    /// the replica's link is up. Panics (with the logs) when it cannot.
    pub async fn start() -> Self {
        let mut setup = Self {
            data: Vec::with_capacity(2),
            sentinels: Vec::with_capacity(SENTINELS),
            conns: Conns::default(),
        };
        let primary = Server::start("primary", false, data_args(None))
            .await
            .unwrap_or_else(|e| panic!("cannot start the primary: {e}"));
        let primary_port = primary.port();
        setup.data.push(primary);
        let replica = Server::start("replica", false, data_args(Some(primary_port)))
            .await
            .unwrap_or_else(|e| panic!("cannot start the replica: {e}"));
        let replica_port = replica.port();
        setup.data.push(replica);
        // The replica is attached before the sentinels look, so their first INFO lists it.
        setup
            .settle("the replica to attach", || async {
                setup.check_replica(replica_port, primary_port).await
            })
            .await;
        for _ in 0..SENTINELS {
            let s = Server::spawn_new("sentinel", false, sentinel_args(primary_port))
                .unwrap_or_else(|e| panic!("cannot start a sentinel: {e}"));
            setup.sentinels.push(s);
        }
        for s in &mut setup.sentinels {
            if let Err(e) = s.ready().await {
                panic!("cannot start a sentinel: {e}");
            }
        }
        setup
            .settle(
                "the sentinels to see the primary, the replica and each other",
                || setup.check(primary_port, Some(replica_port)),
            )
            .await;
        setup
    }

    /// `redis+sentinel://127.0.0.1:s1,127.0.0.1:s2,127.0.0.1:s3/fleetq-primary`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect();
        format!("redis+sentinel://{}/{SERVICE_NAME}", hosts.join(","))
    }

    /// `redis://127.0.0.1:<port>`: a plain URL of one server (data server or sentinel).
    pub fn server_url(&self, port: u16) -> String {
        server::url(port)
    }

    /// The ports of the two data servers: the first primary, then the first replica.
    pub fn data_ports(&self) -> [u16; 2] {
        [self.data[0].port(), self.data[1].port()]
    }

    /// The ports of the sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(Server::port).collect()
    }

    /// The process id of the server (data server or sentinel) at `port`, while it runs.
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.server(port).pid()
    }

    /// The primary's port as the first live sentinel that answers reports it
    /// (`SENTINEL get-master-addr-by-name`).
    pub async fn primary_port(&self) -> u16 {
        let mut why = Vec::new();
        for s in self.sentinels.iter().filter(|s| s.is_live()) {
            match self.reported_primary(s.port()).await {
                Ok(port) => return port,
                Err(e) => why.push(e),
            }
        }
        panic!("no sentinel reported the primary: {why:?}");
    }

    /// The data server that is not the reported primary.
    pub async fn replica_port(&self) -> u16 {
        self.other_than(self.primary_port().await)
    }

    /// `SENTINEL FAILOVER fleetq-primary`; once every sentinel reports the other data server
    /// as primary and it says `role:master`, sends the old primary `REPLICAOF <new>` (what
    /// Sentinel itself does only after about 10 s: it gives a demoted master 8 s and looks at
    /// replicas every 10 s), then waits until the old primary replicates the new one with its
    /// link up and every sentinel lists it as a healthy replica. Clients still writing to the
    /// old primary get `READONLY` from then on. Returns the new primary's port.
    pub async fn failover(&self) -> u16 {
        self.failover_with(true).await
    }

    /// [`Self::failover`] without the prompt demotion: waits until Sentinel itself has turned
    /// the old primary into a replica of the new one (about 10 s). Until then both servers say
    /// `role:master` and the old one still takes writes, which the demotion then discards.
    /// Returns the new primary's port.
    pub async fn failover_unassisted(&self) -> u16 {
        self.failover_with(false).await
    }

    async fn failover_with(&self, demote: bool) -> u16 {
        let old = self.primary_port().await;
        let new = self.other_than(old);
        assert!(
            self.server(new).is_live(),
            "no failover possible: the replica {new} is not running"
        );
        let sentinel = self.live_sentinel();
        let reply: String = self
            .conns
            .query(
                sentinel,
                redis::cmd("SENTINEL").arg("FAILOVER").arg(SERVICE_NAME),
            )
            .await
            .unwrap_or_else(|e| panic!("SENTINEL FAILOVER on sentinel {sentinel} failed: {e}"));
        assert_eq!(reply, "OK", "SENTINEL FAILOVER said {reply}");
        self.settle("the sentinels to promote the replica", || {
            self.check(new, None)
        })
        .await;
        if demote {
            let _: () = self
                .conns
                .query(
                    old,
                    redis::cmd("REPLICAOF")
                        .arg("127.0.0.1")
                        .arg(new.to_string()),
                )
                .await
                .unwrap_or_else(|e| panic!("REPLICAOF on the old primary {old} failed: {e}"));
        }
        self.settle("the old primary to follow the new one", || {
            self.check(new, Some(old))
        })
        .await;
        new
    }

    /// Kills (SIGKILL) the current primary and waits until the sentinels have promoted the
    /// replica: every live sentinel reports it and it says `role:master`. Returns its port.
    pub async fn kill_primary(&mut self) -> u16 {
        let old = self.primary_port().await;
        let new = self.other_than(old);
        assert!(
            self.server(new).is_live(),
            "killing the primary would leave no server: the replica {new} is not running"
        );
        self.server_mut(old).kill();
        self.settle("the sentinels to promote the replica", || {
            self.check(new, None)
        })
        .await;
        new
    }

    /// Starts the killed data server again on its port and directory, as a replica of the
    /// current primary (as the sentinels would reconfigure it, only sooner), and waits until its
    /// link is up and every sentinel lists it as a healthy replica. Returns its port.
    pub async fn restart_old_primary(&mut self) -> u16 {
        let primary = self.primary_port().await;
        let old = self
            .data
            .iter()
            .find(|s| !s.is_running())
            .map(Server::port)
            .unwrap_or_else(|| panic!("no data server is down; kill the primary first"));
        let server = self.server_mut(old);
        server.set_args(data_args(Some(primary)));
        if let Err(e) = server.restart().await {
            panic!("cannot restart the old primary {old}: {e}");
        }
        self.settle("the old primary to rejoin as a replica", || {
            self.check(primary, Some(old))
        })
        .await;
        old
    }

    /// The last `lines` lines of the log of the server (data server or sentinel) at `port`.
    pub fn log_tail(&self, port: u16, lines: usize) -> String {
        self.server(port).log_tail(lines)
    }

    async fn settle<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let started = Instant::now();
        if let Err(why) = poll(SETTLE_TIMEOUT, check).await {
            panic!(
                "timed out after {:?} waiting for {what}: {why}",
                started.elapsed()
            );
        }
    }

    /// `Ok` when every live sentinel reports `primary`, sees the other sentinels and (with a
    /// replica) lists `replica` as healthy, `primary` says `role:master` and `replica` follows
    /// it with its link up.
    async fn check(&self, primary: u16, replica: Option<u16>) -> Result<(), String> {
        let info: String = self
            .conns
            .query(primary, redis::cmd("INFO").arg("replication"))
            .await?;
        if info_field(&info, "role") != Some("master") {
            return Err(format!("server {primary} is not a master yet"));
        }
        if let Some(replica) = replica {
            self.check_replica(replica, primary).await?;
        }
        for s in self.sentinels.iter().filter(|s| s.is_live()) {
            let port = s.port();
            let reported = self.reported_primary(port).await?;
            if reported != primary {
                return Err(format!(
                    "sentinel {port} reports primary {reported}, not {primary}"
                ));
            }
            let peers: Vec<HashMap<String, String>> = self
                .conns
                .query(
                    port,
                    redis::cmd("SENTINEL").arg("SENTINELS").arg(SERVICE_NAME),
                )
                .await?;
            let healthy_peers = peers.iter().filter(|p| healthy(p, "sentinel")).count();
            if healthy_peers != SENTINELS - 1 {
                return Err(format!(
                    "sentinel {port} sees {healthy_peers} healthy other sentinels, want {}",
                    SENTINELS - 1
                ));
            }
            if let Some(replica) = replica {
                let replicas: Vec<HashMap<String, String>> = self
                    .conns
                    .query(
                        port,
                        redis::cmd("SENTINEL").arg("REPLICAS").arg(SERVICE_NAME),
                    )
                    .await?;
                // Not `master-link-status`: a sentinel refreshes that from the replica's INFO only
                // every 10 s (every second once the primary is down, which is when it counts).
                let listed = replicas.iter().any(|r| {
                    r.get("port").map(String::as_str) == Some(&replica.to_string())
                        && healthy(r, "slave")
                });
                if !listed {
                    return Err(format!(
                        "sentinel {port} does not list {replica} as a healthy replica: {replicas:?}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// `Ok` when `replica` says it replicates `primary` and its link is up.
    async fn check_replica(&self, replica: u16, primary: u16) -> Result<(), String> {
        let info: String = self
            .conns
            .query(replica, redis::cmd("INFO").arg("replication"))
            .await?;
        let follows = info_field(&info, "role") == Some("slave")
            && info_field(&info, "master_port") == Some(&primary.to_string())
            && info_field(&info, "master_link_status") == Some("up");
        if follows {
            Ok(())
        } else {
            Err(format!(
                "server {replica} is not (yet) a replica of {primary} with its link up"
            ))
        }
    }

    async fn reported_primary(&self, sentinel: u16) -> Result<u16, String> {
        let addr: Option<(String, String)> = self
            .conns
            .query(
                sentinel,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(SERVICE_NAME),
            )
            .await?;
        let (_, port) =
            addr.ok_or_else(|| format!("sentinel {sentinel} does not know {SERVICE_NAME}"))?;
        port.parse()
            .map_err(|e| format!("sentinel {sentinel} reported port {port:?}: {e}"))
    }

    fn other_than(&self, port: u16) -> u16 {
        let [a, b] = self.data_ports();
        if port == a {
            b
        } else if port == b {
            a
        } else {
            panic!("the sentinels report {port}, which is neither data server ({a}, {b})")
        }
    }

    fn live_sentinel(&self) -> u16 {
        self.sentinels
            .iter()
            .find(|s| s.is_live())
            .map(Server::port)
            .unwrap_or_else(|| panic!("no sentinel is running"))
    }

    fn server(&self, port: u16) -> &Server {
        self.data
            .iter()
            .chain(&self.sentinels)
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no server of the sentinel setup on port {port}"))
    }

    fn server_mut(&mut self, port: u16) -> &mut Server {
        self.data
            .iter_mut()
            .chain(&mut self.sentinels)
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no server of the sentinel setup on port {port}"))
    }
}

impl Drop for SentinelSetup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in self.data.iter().chain(&self.sentinels) {
                s.print_log_tail(LOG_LINES_ON_PANIC);
            }
        }
        // Each server kills its process and removes its directory as it drops.
    }
}

/// Whether a `SENTINEL REPLICAS`/`SENTINELS` entry's flags are exactly `kind` (no `s_down`,
/// `o_down` or `disconnected`).
fn healthy(entry: &HashMap<String, String>, kind: &str) -> bool {
    entry.get("flags").map(String::as_str) == Some(kind)
}

/// The `redis-server` arguments of a data server, replicating `replicaof` when given.
fn data_args(replicaof: Option<u16>) -> server::ArgsFn {
    Box::new(move |dir: &Path, port: u16, _bus: u16| {
        let mut args: Vec<String> = [
            ("port", port.to_string()),
            ("bind", "127.0.0.1".into()),
            ("dir", dir.display().to_string()),
            ("logfile", Server::log_path(dir).display().to_string()),
            ("daemonize", "no".into()),
            ("save", String::new()),
            ("appendonly", "yes".into()),
            ("appendfsync", "always".into()),
            // Full syncs start at once (default: wait 5 s for more replicas).
            ("repl-diskless-sync-delay", "0".into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [format!("--{k}"), v])
        .collect();
        if let Some(primary) = replicaof {
            args.extend([
                "--replicaof".into(),
                "127.0.0.1".into(),
                primary.to_string(),
            ]);
        }
        args
    })
}

/// A sentinel's arguments: it writes its own config file (which the sentinel rewrites as it
/// learns) into the directory and starts `redis-server <file> --sentinel`.
fn sentinel_args(primary: u16) -> server::ArgsFn {
    Box::new(move |dir: &Path, port: u16, _bus: u16| {
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\n\
             bind 127.0.0.1\n\
             daemonize no\n\
             dir {dir}\n\
             logfile {log}\n\
             sentinel resolve-hostnames no\n\
             sentinel monitor {SERVICE_NAME} 127.0.0.1 {primary} {QUORUM}\n\
             sentinel down-after-milliseconds {SERVICE_NAME} {down}\n\
             sentinel failover-timeout {SERVICE_NAME} {failover}\n\
             sentinel parallel-syncs {SERVICE_NAME} 1\n",
            dir = dir.display(),
            log = Server::log_path(dir).display(),
            down = DOWN_AFTER.as_millis(),
            failover = FAILOVER_TIMEOUT.as_millis(),
        );
        if let Err(e) = std::fs::write(&conf, text) {
            panic!("cannot write the sentinel config {}: {e}", conf.display());
        }
        vec![conf.display().to_string(), "--sentinel".into()]
    })
}
