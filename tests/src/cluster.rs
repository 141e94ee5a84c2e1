//! A local Redis Cluster for tests: primaries and replicas, each a `redis-server` in its own
//! temporary directory on loopback ports, created with `redis-cli --cluster create`, which a
//! test can fail over, kill, freeze and restart. Every operation that changes the topology
//! returns only once every live node reports `cluster_state:ok` and all of them agree on the
//! slot map and on who replicates whom.
//!
//! ```no_run
//! # async fn demo() {
//! use fleetq_tests::cluster::RedisCluster;
//! let mut cluster = RedisCluster::start().await;
//! let [q0, _q1, _q2] = cluster.queue_names_on_each_primary().await;
//! let first = cluster.primary_ports().await[0];
//! let promoted = cluster.kill_primary(first).await;
//! cluster.restart(first).await; // comes back as a replica of `promoted`
//! # let _ = (q0, promoted);
//! # }
//! ```

pub(crate) mod server;

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::{Duration, Instant};

use fleetq_broker::QueueKeys;

use server::{info_field, poll, Conns, Server};

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// Default `cluster-node-timeout`: a primary that stops answering for this long is failed over
/// (promotion follows within about two more seconds).
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(1_000);

/// How long start, failover, kill, freeze and restart wait for the cluster to agree.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `redis-cli --cluster create` may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A manual failover gives up after 5 s (Redis's `CLUSTER_MF_TIMEOUT`); it is asked again then.
const MANUAL_FAILOVER_RETRY: Duration = Duration::from_secs(6);

/// Log lines per node printed when a test panics with the cluster alive.
const LOG_LINES_ON_PANIC: usize = 20;

/// The shape of a [`RedisCluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of primaries; at least 3 (`redis-cli --cluster create` wants 3). Default 3.
    pub primaries: usize,
    /// Replicas per primary. Default 1.
    pub replicas_per_primary: usize,
    /// `cluster-node-timeout`. Default [`DEFAULT_NODE_TIMEOUT`].
    pub node_timeout: Duration,
    /// Extra `--name value` arguments for every node.
    pub extra: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            primaries: 3,
            replicas_per_primary: 1,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            extra: Vec::new(),
        }
    }
}

/// A node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Owns slots (or could), takes writes.
    Primary,
    /// Replicates a primary.
    Replica,
}

/// One node as a live node's `CLUSTER NODES` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// The 40-character node id.
    pub id: String,
    /// Primary or replica.
    pub role: Role,
    /// For a replica: the id of the primary it follows.
    pub primary_id: Option<String>,
    /// For a replica: the port of the primary it follows.
    pub primary_port: Option<u16>,
    /// Slot ranges (inclusive) a primary serves, in slot order; empty for a replica.
    pub slots: Vec<RangeInclusive<u16>>,
    /// Flagged `fail` or `fail?` (unreachable) by the node that was asked.
    pub failed: bool,
}

impl ClusterNode {
    /// Whether this node serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|r| r.contains(&slot))
    }
}

/// A running local Redis Cluster. Dropping it kills every node and removes their directories.
pub struct RedisCluster {
    /// The processes, in creation order (primaries first at creation).
    servers: Vec<Server>,
    /// Node id of each server, same order; ids survive restarts (`nodes.conf`).
    ids: Vec<String>,
    /// Ports of the primaries right after start, in slot order: the seeds of [`Self::seed_url`].
    seeds: Vec<u16>,
    conns: Conns,
    options: ClusterOptions,
}

impl RedisCluster {
    /// Starts 3 primaries with one replica each ([`ClusterOptions::default`]).
    pub async fn start() -> Self {
        Self::start_with(ClusterOptions::default()).await
    }

    /// Starts a cluster of the given shape and waits until every node agrees on it and every
    /// replica's link to its primary is up. Panics (with the nodes' logs) when it cannot.
    pub async fn start_with(options: ClusterOptions) -> Self {
        assert!(
            options.primaries >= 3,
            "a Redis Cluster needs at least 3 primaries, not {}",
            options.primaries
        );
        let total = options.primaries * (1 + options.replicas_per_primary);
        let mut cluster = Self {
            servers: Vec::with_capacity(total),
            ids: Vec::new(),
            seeds: Vec::new(),
            conns: Conns::default(),
            options,
        };
        // Spawn all, then wait for each: the nodes boot side by side.
        for _ in 0..total {
            let server = Server::spawn_new("cluster node", true, node_args(&cluster.options))
                .unwrap_or_else(|e| panic!("cannot start a cluster node: {e}"));
            cluster.servers.push(server);
        }
        for server in &mut cluster.servers {
            if let Err(e) = server.ready().await {
                panic!("cannot start a cluster node: {e}");
            }
        }
        cluster.create().await;
        for server in &cluster.servers {
            let id: String = cluster
                .conns
                .query(server.port(), redis::cmd("CLUSTER").arg("MYID"))
                .await
                .unwrap_or_else(|e| panic!("CLUSTER MYID failed: {e}"));
            cluster.ids.push(id);
        }
        let primaries = cluster.options.primaries;
        let per_primary = cluster.options.replicas_per_primary;
        let view = cluster
            .converge_where("the new cluster to form", |view| {
                let shape = primaries_with_replicas(view);
                if shape.len() != primaries {
                    return Err(format!("{} primaries, want {primaries}", shape.len()));
                }
                if let Some((p, r)) = shape.iter().find(|(_, r)| r.len() != per_primary) {
                    return Err(format!(
                        "primary {} has {} replicas, want {per_primary}",
                        p.port,
                        r.len()
                    ));
                }
                let covered: usize = view
                    .iter()
                    .flat_map(|n| &n.slots)
                    .map(|r| usize::from(r.end() - r.start()) + 1)
                    .sum();
                if covered != usize::from(SLOTS) {
                    return Err(format!("{covered} slots assigned, want {SLOTS}"));
                }
                Ok(())
            })
            .await;
        cluster.seeds = primaries_in_slot_order(&view);
        cluster
    }

    /// Runs `redis-cli --cluster create` over all nodes: the first `primaries` become
    /// primaries, the rest are spread over them as replicas.
    async fn create(&self) {
        let mut cmd = tokio::process::Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for s in &self.servers {
            cmd.arg(format!("127.0.0.1:{}", s.port()));
        }
        cmd.arg("--cluster-replicas")
            .arg(self.options.replicas_per_primary.to_string())
            .arg("--cluster-yes")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(CREATE_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!(
                "cannot run redis-cli ({e}); install it (Debian: apt-get install -y redis-tools)"
            ),
            Err(_) => panic!("redis-cli --cluster create did not finish within {CREATE_TIMEOUT:?}"),
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,…`: the ports of the primaries right after
    /// start, in slot order. It does not follow later failovers, so after a kill one seed may
    /// be dead, as a client's configured seeds would be.
    pub fn seed_url(&self) -> String {
        let hosts: Vec<String> = self
            .seeds
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `redis://127.0.0.1:<port>`: a plain (non-cluster) URL of one node.
    pub fn node_url(&self, port: u16) -> String {
        server::url(port)
    }

    /// The client ports of all nodes, running or not, in creation order.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(Server::port).collect()
    }

    /// The process id of the node at `port`, while it runs.
    pub fn pid(&self, port: u16) -> Option<u32> {
        self.server(port).pid()
    }

    /// The nodes, sorted by port, as the first live node that answers sees them now (no waiting
    /// for agreement; see [`Self::wait_converged`]).
    pub async fn nodes(&self) -> Vec<ClusterNode> {
        let mut why = Vec::new();
        for s in self.servers.iter().filter(|s| s.is_live()) {
            match self
                .conns
                .query::<String>(s.port(), redis::cmd("CLUSTER").arg("NODES"))
                .await
            {
                Ok(text) => match parse_nodes(&text) {
                    Ok(mut view) => {
                        view.sort_by_key(|n| n.port);
                        return view;
                    }
                    Err(e) => why.push(e),
                },
                Err(e) => why.push(e),
            }
        }
        panic!("no live cluster node answered CLUSTER NODES: {why:?}");
    }

    /// The ports of the primaries that serve slots, in slot order (primary 0 serves slot 0).
    pub async fn primary_ports(&self) -> Vec<u16> {
        primaries_in_slot_order(&self.nodes().await)
    }

    /// The port of the primary serving `slot` now.
    pub async fn primary_for_slot(&self, slot: u16) -> u16 {
        let view = self.nodes().await;
        primary_for_slot_in(&view, slot)
            .unwrap_or_else(|| panic!("no primary serves slot {slot}; nodes: {view:#?}"))
    }

    /// The ports of the replicas following the primary at `primary_port`, sorted.
    pub async fn replicas_of(&self, primary_port: u16) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .nodes()
            .await
            .iter()
            .filter(|n| n.role == Role::Replica && n.primary_port == Some(primary_port))
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        ports
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT` on a live node).
    pub async fn slot_of(&self, key: &str) -> u16 {
        let mut why = Vec::new();
        for s in self.servers.iter().filter(|s| s.is_live()) {
            match self
                .conns
                .query::<u16>(s.port(), redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .await
            {
                Ok(slot) => return slot,
                Err(e) => why.push(e),
            }
        }
        panic!("no live cluster node answered CLUSTER KEYSLOT {key}: {why:?}");
    }

    /// One fleetq queue name per primary, in the order of [`Self::primary_ports`]: the `i`-th
    /// name's keys (hash tag `{name}`) live on the `i`-th primary. Names are `q-a`, `q-b`, … (then
    /// `q-0`, `q-1`, …), the first that land on each primary.
    pub async fn queue_names_per_primary(&self) -> Vec<String> {
        let view = self.nodes().await;
        let primaries = primaries_in_slot_order(&view);
        let mut names: Vec<Option<String>> = vec![None; primaries.len()];
        let candidates = (b'a'..=b'z')
            .map(|c| format!("q-{}", char::from(c)))
            .chain((0..1_000).map(|i| format!("q-{i}")));
        for name in candidates {
            let keys = QueueKeys::new(&name)
                .unwrap_or_else(|e| panic!("queue name {name:?} rejected: {e}"));
            let slot = self.slot_of(&keys.stream()).await;
            let owner = primary_for_slot_in(&view, slot)
                .unwrap_or_else(|| panic!("no primary serves slot {slot}; nodes: {view:#?}"));
            let Some(i) = primaries.iter().position(|p| *p == owner) else {
                continue;
            };
            if names[i].is_none() {
                names[i] = Some(name);
            }
            if names.iter().all(Option::is_some) {
                return names.into_iter().flatten().collect();
            }
        }
        panic!("no queue name found for every primary: {names:?}");
    }

    /// [`Self::queue_names_per_primary`] for the default three primaries: names whose keys live
    /// on primary 0, 1 and 2 of [`Self::primary_ports`]. Panics when there are not 3 primaries.
    pub async fn queue_names_on_each_primary(&self) -> [String; 3] {
        let names = self.queue_names_per_primary().await;
        names
            .try_into()
            .unwrap_or_else(|n: Vec<String>| panic!("{} primaries serve slots, not 3", n.len()))
    }

    /// A manual failover: `CLUSTER FAILOVER` on a replica of the primary at `primary_port`
    /// (the one with the lowest port). Redis lets the replica catch up first, so nothing
    /// acknowledged is lost. Waits until the replica serves the primary's slots, the old primary
    /// replicates it and every node agrees. Returns the new primary's port.
    pub async fn failover(&self, primary_port: u16) -> u16 {
        let view = self.wait_converged().await;
        let (old, replicas) = self.primary_and_replicas(&view, primary_port);
        let Some(replica) = replicas.first() else {
            panic!("primary {primary_port} has no live replica to fail over to");
        };
        let started = Instant::now();
        let mut asked_at = Instant::now();
        self.ask_failover(replica.port).await;
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let why = match self.probe().await {
                Ok(view) => match promoted(&view, &old, std::slice::from_ref(replica)) {
                    Ok(port) => {
                        let old_follows = view
                            .iter()
                            .find(|n| n.id == old.id)
                            .is_some_and(|n| n.primary_id.as_deref() == Some(&replica.id));
                        if old_follows || !self.server(old.port).is_live() {
                            return port;
                        }
                        format!("old primary {} does not follow {} yet", old.port, port)
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "failover of primary {primary_port} to replica {} not done within {:?}: {why}",
                replica.port,
                started.elapsed()
            );
            if asked_at.elapsed() > MANUAL_FAILOVER_RETRY {
                asked_at = Instant::now();
                self.ask_failover(replica.port).await;
            }
            tokio::time::sleep(server::POLL_INTERVAL).await;
        }
    }

    async fn ask_failover(&self, replica_port: u16) {
        let reply: String = self
            .conns
            .query(replica_port, redis::cmd("CLUSTER").arg("FAILOVER"))
            .await
            .unwrap_or_else(|e| panic!("CLUSTER FAILOVER on replica {replica_port} failed: {e}"));
        assert_eq!(
            reply, "OK",
            "CLUSTER FAILOVER on replica {replica_port} said {reply}"
        );
    }

    /// Kills (SIGKILL) the primary at `primary_port` and waits until one of its replicas has
    /// been promoted in its place and every live node reports `cluster_state:ok` and agrees.
    /// Writes the dead primary had not yet passed on are lost, as Redis replication allows.
    /// Returns the new primary's port.
    pub async fn kill_primary(&mut self, primary_port: u16) -> u16 {
        let view = self.wait_converged().await;
        let (old, replicas) = self.primary_and_replicas(&view, primary_port);
        assert!(
            !replicas.is_empty(),
            "primary {primary_port} has no live replica that could take over"
        );
        self.server_mut(primary_port).kill();
        self.await_promotion(&old, &replicas).await
    }

    /// Freezes (SIGSTOP) the primary at `primary_port` and waits, like
    /// [`Self::kill_primary`], until one of its replicas has taken over. The frozen node stays
    /// frozen: [`Self::thaw`] it, then [`Self::wait_converged`] sees it rejoin as a replica.
    /// Returns the new primary's port.
    pub async fn freeze_primary(&mut self, primary_port: u16) -> u16 {
        let view = self.wait_converged().await;
        let (old, replicas) = self.primary_and_replicas(&view, primary_port);
        assert!(
            !replicas.is_empty(),
            "primary {primary_port} has no live replica that could take over"
        );
        self.server_mut(primary_port).freeze();
        self.await_promotion(&old, &replicas).await
    }

    async fn await_promotion(&self, old: &ClusterNode, replicas: &[ClusterNode]) -> u16 {
        let started = Instant::now();
        let result = poll(CONVERGE_TIMEOUT, || async {
            let view = self.probe().await?;
            promoted(&view, old, replicas)
        })
        .await;
        result.unwrap_or_else(|why| {
            panic!(
                "no replica of primary {} took over within {:?}: {why}",
                old.port,
                started.elapsed()
            )
        })
    }

    /// Kills (SIGKILL) the node at `port`, whatever its role, without waiting for anything.
    pub fn kill(&mut self, port: u16) {
        self.server_mut(port).kill();
    }

    /// Starts a killed node again on its port and directory (with its AOF and `nodes.conf`) and
    /// waits until the cluster agrees again; a primary that was failed over meanwhile rejoins
    /// as a replica of the node that took its slots. Returns the node as the cluster now sees it.
    pub async fn restart(&mut self, port: u16) -> ClusterNode {
        let server = self.server_mut(port);
        assert!(
            !server.is_running(),
            "node {port} is still running; kill it first"
        );
        if let Err(e) = server.restart().await {
            panic!("cannot restart cluster node {port}: {e}");
        }
        let view = self.wait_converged().await;
        view.into_iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("restarted node {port} is missing from CLUSTER NODES"))
    }

    /// Stops the node at `port` with SIGSTOP: it keeps its sockets open but answers nothing,
    /// like a host that hangs. Waits for nothing.
    pub fn freeze(&mut self, port: u16) {
        self.server_mut(port).freeze();
    }

    /// Resumes a frozen node with SIGCONT. Waits for nothing; follow with
    /// [`Self::wait_converged`] to see the cluster settle.
    pub fn thaw(&mut self, port: u16) {
        self.server_mut(port).thaw();
    }

    /// Waits until every live node (running, not frozen) reports `cluster_state:ok`, all of
    /// them agree on the slot map and on every live node's role and primary, none of them
    /// flags a live node as failing, and every live replica's link to its primary is up.
    /// Returns the agreed view (sorted by port).
    pub async fn wait_converged(&self) -> Vec<ClusterNode> {
        self.converge_where("the cluster to agree", |_| Ok(()))
            .await
    }

    async fn converge_where(
        &self,
        what: &str,
        check: impl Fn(&[ClusterNode]) -> Result<(), String>,
    ) -> Vec<ClusterNode> {
        let started = Instant::now();
        let result = poll(CONVERGE_TIMEOUT, || async {
            let view = self.probe().await?;
            check(&view)?;
            Ok(view)
        })
        .await;
        result.unwrap_or_else(|why| {
            panic!(
                "timed out after {:?} waiting for {what}: {why}",
                started.elapsed()
            )
        })
    }

    /// One look at every live node: `Ok(view)` when they all agree (see
    /// [`Self::wait_converged`]), else why not.
    async fn probe(&self) -> Result<Vec<ClusterNode>, String> {
        let live: Vec<&Server> = self.servers.iter().filter(|s| s.is_live()).collect();
        let live_ids: Vec<&str> = self
            .servers
            .iter()
            .zip(&self.ids)
            .filter(|(s, _)| s.is_live())
            .map(|(_, id)| id.as_str())
            .collect();
        let mut agreed: Option<(u16, Summary, Vec<ClusterNode>)> = None;
        for s in live {
            let port = s.port();
            let mut pipe = redis::pipe();
            pipe.cmd("CLUSTER")
                .arg("INFO")
                .cmd("CLUSTER")
                .arg("NODES")
                .cmd("INFO")
                .arg("replication");
            let (info, nodes, replication): (String, String, String) =
                self.conns.query_pipe(port, &pipe).await?;
            let state = info_field(&info, "cluster_state").unwrap_or("?");
            if state != "ok" {
                return Err(format!("node {port} says cluster_state:{state}"));
            }
            let mut view = parse_nodes(&nodes)?;
            view.sort_by_key(|n| n.port);
            let me = view
                .iter()
                .find(|n| n.port == port)
                .ok_or_else(|| format!("node {port} does not list itself"))?;
            if me.role == Role::Replica
                && info_field(&replication, "master_link_status") != Some("up")
            {
                return Err(format!("replica {port}'s link to its primary is not up"));
            }
            let summary = summarize(&view, &live_ids)
                .map_err(|e| format!("in the view of node {port}: {e}"))?;
            match &agreed {
                None => agreed = Some((port, summary, view)),
                Some((first, s0, _)) if *s0 != summary => {
                    return Err(format!(
                        "nodes {first} and {port} disagree: {s0:?} vs {summary:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        agreed
            .map(|(_, _, view)| view)
            .ok_or_else(|| "no live node".to_owned())
    }

    fn primary_and_replicas(
        &self,
        view: &[ClusterNode],
        primary_port: u16,
    ) -> (ClusterNode, Vec<ClusterNode>) {
        let old = view
            .iter()
            .find(|n| n.port == primary_port)
            .unwrap_or_else(|| panic!("no node on port {primary_port}"))
            .clone();
        assert!(
            old.role == Role::Primary,
            "node {primary_port} is a replica, not a primary"
        );
        let mut replicas: Vec<ClusterNode> = view
            .iter()
            .filter(|n| n.primary_id.as_deref() == Some(&old.id))
            .filter(|n| self.server(n.port).is_live())
            .cloned()
            .collect();
        replicas.sort_by_key(|n| n.port);
        (old, replicas)
    }

    /// The last `lines` lines of the log of the node at `port`.
    pub fn log_tail(&self, port: u16, lines: usize) -> String {
        self.server(port).log_tail(lines)
    }

    /// The directory of the node at `port` (data, AOF, `nodes.conf`, log).
    pub fn dir(&self, port: u16) -> &Path {
        self.server(port).dir()
    }

    fn server(&self, port: u16) -> &Server {
        self.servers
            .iter()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    fn server_mut(&mut self, port: u16) -> &mut Server {
        self.servers
            .iter_mut()
            .find(|s| s.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in &self.servers {
                s.print_log_tail(LOG_LINES_ON_PANIC);
            }
        }
        // Each server kills its process and removes its directory as it drops.
    }
}

/// The `redis-server` arguments of a cluster node.
fn node_args(options: &ClusterOptions) -> server::ArgsFn {
    let node_timeout = options.node_timeout.as_millis().to_string();
    let extra = options.extra.clone();
    Box::new(move |dir: &Path, port: u16, bus_port: u16| {
        let mut args: Vec<String> = [
            ("port", port.to_string()),
            ("bind", "127.0.0.1".into()),
            ("dir", dir.display().to_string()),
            ("logfile", Server::log_path(dir).display().to_string()),
            ("daemonize", "no".into()),
            ("save", String::new()),
            ("appendonly", "yes".into()),
            ("appendfsync", "always".into()),
            ("cluster-enabled", "yes".into()),
            ("cluster-config-file", "nodes.conf".into()),
            ("cluster-port", bus_port.to_string()),
            ("cluster-node-timeout", node_timeout.clone()),
            // A replica takes over however long its link was down: the tests want a failover,
            // not the safety of refusing one.
            ("cluster-replica-validity-factor", "0".into()),
            // Keep replicas where they were put, so tests know the topology.
            ("cluster-allow-replica-migration", "no".into()),
            // Full syncs start at once (default: wait 5 s for more replicas).
            ("repl-diskless-sync-delay", "0".into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [format!("--{k}"), v])
        .collect();
        for (k, v) in &extra {
            args.push(format!("--{k}"));
            args.push(v.clone());
        }
        args
    })
}

/// What all nodes must agree on: the slot map (range → owner id) and each live node's role
/// and primary.
#[derive(Debug, PartialEq, Eq)]
struct Summary {
    slots: Vec<(u16, u16, String)>,
    roles: BTreeMap<String, (Role, Option<String>)>,
}

fn summarize(view: &[ClusterNode], live_ids: &[&str]) -> Result<Summary, String> {
    let mut slots: Vec<(u16, u16, String)> = view
        .iter()
        .flat_map(|n| n.slots.iter().map(|r| (*r.start(), *r.end(), n.id.clone())))
        .collect();
    slots.sort();
    let mut roles = BTreeMap::new();
    for id in live_ids {
        let n = view
            .iter()
            .find(|n| n.id == *id)
            .ok_or_else(|| format!("node {id} is unknown"))?;
        if n.failed {
            return Err(format!("live node {} is flagged failing", n.port));
        }
        roles.insert(n.id.clone(), (n.role, n.primary_id.clone()));
    }
    Ok(Summary { slots, roles })
}

/// `Ok(port)` when one of `replicas` is a primary serving every slot `old` served.
fn promoted(
    view: &[ClusterNode],
    old: &ClusterNode,
    replicas: &[ClusterNode],
) -> Result<u16, String> {
    let promoted = view.iter().find(|n| {
        n.role == Role::Primary
            && replicas.iter().any(|r| r.id == n.id)
            && old.slots.iter().all(|r| n.slots.contains(r))
    });
    promoted.map(|n| n.port).ok_or_else(|| {
        format!(
            "none of the replicas {:?} serves the slots {:?} of {} yet",
            replicas.iter().map(|r| r.port).collect::<Vec<_>>(),
            old.slots,
            old.port
        )
    })
}

fn primaries_with_replicas(view: &[ClusterNode]) -> Vec<(&ClusterNode, Vec<&ClusterNode>)> {
    view.iter()
        .filter(|n| n.role == Role::Primary && !n.slots.is_empty())
        .map(|p| {
            let replicas = view
                .iter()
                .filter(|r| r.primary_id.as_deref() == Some(&p.id))
                .collect();
            (p, replicas)
        })
        .collect()
}

fn primaries_in_slot_order(view: &[ClusterNode]) -> Vec<u16> {
    let mut primaries: Vec<(u16, u16)> = view
        .iter()
        .filter(|n| n.role == Role::Primary && !n.failed)
        .filter_map(|n| {
            n.slots
                .iter()
                .map(|r| *r.start())
                .min()
                .map(|s| (s, n.port))
        })
        .collect();
    primaries.sort_unstable();
    primaries.into_iter().map(|(_, port)| port).collect()
}

fn primary_for_slot_in(view: &[ClusterNode], slot: u16) -> Option<u16> {
    view.iter()
        .find(|n| n.role == Role::Primary && n.serves(slot))
        .map(|n| n.port)
}

/// Parses a `CLUSTER NODES` reply:
/// `<id> <ip:port@bus[,host]> <flags> <primary id|-> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_nodes(text: &str) -> Result<Vec<ClusterNode>, String> {
    let mut nodes = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(format!("unexpected CLUSTER NODES line: {line}"));
        }
        let port = fields[1]
            .split(['@', ','])
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .unwrap_or(0);
        let flags: Vec<&str> = fields[2].split(',').collect();
        let role = if flags.contains(&"master") {
            Role::Primary
        } else {
            Role::Replica
        };
        let failed = flags.iter().any(|f| *f == "fail" || *f == "fail?");
        let mut slots = Vec::new();
        for token in &fields[8..] {
            if token.starts_with('[') {
                continue; // a slot being migrated or imported
            }
            let range = match token.split_once('-') {
                Some((a, b)) => a.parse::<u16>().ok().zip(b.parse::<u16>().ok()),
                None => token.parse::<u16>().ok().map(|s| (s, s)),
            };
            let (a, b) = range.ok_or_else(|| format!("bad slot range {token:?} in: {line}"))?;
            slots.push(a..=b);
        }
        slots.sort_by_key(|r| *r.start());
        let primary = (fields[3] != "-").then(|| fields[3].to_owned());
        nodes.push(ClusterNode {
            port,
            id: fields[0].to_owned(),
            role,
            primary_id: primary,
            primary_port: None,
            slots,
            failed,
        });
    }
    let ports: BTreeMap<String, u16> = nodes.iter().map(|n| (n.id.clone(), n.port)).collect();
    for n in &mut nodes {
        if n.role == Role::Primary {
            n.primary_id = None;
        }
        n.primary_port = n.primary_id.as_ref().and_then(|id| ports.get(id).copied());
    }
    Ok(nodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_nodes() {
        let text = "\
f055 127.0.0.1:21002@31002 master - 0 1 2 connected 5461-10922
ba92 127.0.0.1:21006@31006 slave f055 0 1 2 connected
6f9e 127.0.0.1:21001@31001 myself,master - 0 1 1 connected 0-5460 [93->-f055]
dead 127.0.0.1:21003@31003 master,fail - 0 1 3 disconnected 10923 10924-16383
";
        let view = parse_nodes(text).unwrap();
        assert_eq!(view.len(), 4);
        assert_eq!(view[1].role, Role::Replica);
        assert_eq!(view[1].primary_port, Some(21002));
        assert_eq!(view[2].slots, vec![0..=5460]);
        assert!(view[3].failed);
        assert_eq!(view[3].slots, vec![10923..=10923, 10924..=16383]);
        assert_eq!(primaries_in_slot_order(&view), vec![21001, 21002]);
        assert_eq!(primary_for_slot_in(&view, 6000), Some(21002));
    }
}
