//! A minimal local Redis Cluster for the cluster scenario: 3 primaries, no replicas, each a
//! `redis-server` (`LocalRedis`, persistence off) in its own temporary directory on a free
//! loopback port. Slots are assigned in three ranges (`CLUSTER ADDSLOTSRANGE`), in the
//! order of the nodes' ports, and the nodes are joined with `CLUSTER MEET` (each node's bus
//! on a port of its own, chosen free); [`Cluster::start`] returns once every node reports
//! `cluster_state:ok` with 3 primaries, with the function library loaded on each. Every node is killed and its directory removed when dropped.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleetq_broker::local_redis::LocalRedisOptions;
use fleetq_broker::{LocalRedis, Redis};

use crate::server;

/// Primaries of the cluster.
pub const PRIMARIES: usize = 3;
/// The slot range each primary serves, in port order: Redis's own split of 16 384 slots.
const SLOT_RANGES: [(u16, u16); PRIMARIES] = [(0, 5460), (5461, 10922), (10923, 16383)];
/// `cluster-node-timeout`, ms (Redis's default is 15 000; nothing fails over here).
const NODE_TIMEOUT_MS: &str = "5000";
/// How long the nodes may take to agree on the cluster.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the nodes are asked whether the cluster is formed.
const FORM_POLL: Duration = Duration::from_millis(50);

/// Attempts at starting a node, each with a fresh bus port.
const NODE_START_TRIES: usize = 3;

/// One primary: its process and a plain connection to it alone (for `INFO` and `CLUSTER`).
#[derive(Debug)]
struct Node {
    /// Killed and its directory removed when dropped.
    local: LocalRedis,
    /// Its cluster bus port, chosen free (Redis's default, port + 10 000, may be taken or
    /// past 65 535).
    bus_port: u16,
    /// A standalone handle on this node only.
    redis: Redis,
}

/// A running 3-primary cluster and a cluster client on it.
#[derive(Debug)]
pub struct Cluster {
    /// Sorted by port; the i-th serves `SLOT_RANGES[i]`.
    nodes: Vec<Node>,
    /// `redis+cluster://…` with every node as a seed.
    url: String,
    /// A cluster client on [`Cluster::url`], for the queues' keys.
    pub redis: Redis,
}

impl Cluster {
    /// Starts the nodes, assigns the slots, joins them, waits until they agree and loads the
    /// function library on every primary.
    pub async fn start() -> anyhow::Result<Self> {
        let mut locals = Vec::with_capacity(PRIMARIES);
        for _ in 0..PRIMARIES {
            locals.push(start_node()?);
        }
        locals.sort_by_key(|(local, _)| local.port());
        let mut nodes = Vec::with_capacity(PRIMARIES);
        for (local, bus_port) in locals {
            let redis = Redis::connect(&local.url())
                .await
                .with_context(|| format!("connect to cluster node {}", local.port()))?;
            nodes.push(Node {
                local,
                bus_port,
                redis,
            });
        }
        for (node, (first, last)) in nodes.iter().zip(SLOT_RANGES) {
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut node.redis.conn())
                .await
                .with_context(|| format!("CLUSTER ADDSLOTSRANGE {first} {last}"))?;
        }
        for other in &nodes[1..] {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(other.local.port())
                .arg(other.bus_port)
                .query_async(&mut nodes[0].redis.conn())
                .await
                .with_context(|| format!("CLUSTER MEET 127.0.0.1 {}", other.local.port()))?;
        }
        wait_formed(&nodes).await?;
        let seeds: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.local.port()))
            .collect();
        let url = format!("redis+cluster://{}", seeds.join(","));
        let redis = Redis::connect(&url)
            .await
            .context("connect to the bench's cluster")?;
        fleetq_broker::functions::load_all(&redis.conn())
            .await
            .context("load the function library on every primary")?;
        Ok(Self { nodes, url, redis })
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`, for worker processes.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The primaries' ports, ascending (the order of every per-primary figure).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.local.port()).collect()
    }

    /// Which primary (index into [`Cluster::ports`]) serves `key`'s slot.
    pub fn primary_of(&self, key: &str) -> usize {
        let slot = fleetq_broker::topology::slot_of(key);
        SLOT_RANGES
            .iter()
            .position(|&(first, last)| (first..=last).contains(&slot))
            // The ranges cover every slot from 0 to 16 383, and `slot_of` is below 16 384.
            .unwrap_or(PRIMARIES - 1)
    }

    /// CPU time each primary has used so far (`used_cpu_user + used_cpu_sys` of `INFO cpu`),
    /// in the order of [`Cluster::ports`].
    pub async fn cpu_times(&self) -> anyhow::Result<Vec<Duration>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(server::cpu_time(&mut node.redis.conn()).await?);
        }
        Ok(out)
    }
}

/// Starts one node and returns it with its bus port; a bus port taken before the node binds
/// it is replaced by another, up to [`NODE_START_TRIES`] times.
fn start_node() -> anyhow::Result<(LocalRedis, u16)> {
    let mut last = None;
    for _ in 0..NODE_START_TRIES {
        let bus_port = free_port()?;
        match LocalRedis::start_with(node_options(bus_port)) {
            Ok(local) => return Ok((local, bus_port)),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).context("start a cluster node"),
        None => bail!("start a cluster node: no attempt made"),
    }
}

/// A loopback port free now.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("find a free loopback port for a cluster bus")?;
    Ok(listener.local_addr()?.port())
}

/// `redis-server` settings of a node: cluster mode, its `nodes.conf` in its own directory,
/// its bus on `bus_port`.
fn node_options(bus_port: u16) -> LocalRedisOptions {
    let bus_port = bus_port.to_string();
    let extra = [
        ("cluster-enabled", "yes"),
        ("cluster-config-file", "nodes.conf"),
        ("cluster-node-timeout", NODE_TIMEOUT_MS),
        ("cluster-port", bus_port.as_str()),
    ];
    LocalRedisOptions {
        extra: extra
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ..LocalRedisOptions::default()
    }
}

/// Waits until every node reports `cluster_state:ok`, knows all the nodes, and counts
/// [`PRIMARIES`] primaries serving slots; fails after [`FORM_TIMEOUT`] saying what a node
/// last reported.
async fn wait_formed(nodes: &[Node]) -> anyhow::Result<()> {
    let deadline = Instant::now() + FORM_TIMEOUT;
    loop {
        let mut why = None;
        for node in nodes {
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query_async(&mut node.redis.conn())
                .await
                .context("CLUSTER INFO")?;
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                    .map(str::trim)
                    .unwrap_or("?")
                    .to_owned()
            };
            let (state, size, known) = (
                field("cluster_state"),
                field("cluster_size"),
                field("cluster_known_nodes"),
            );
            let want = PRIMARIES.to_string();
            if state != "ok" || size != want || known != want {
                why = Some(format!(
                    "node {} reports cluster_state:{state}, cluster_size:{size}, cluster_known_nodes:{known}",
                    node.local.port()
                ));
                break;
            }
        }
        let Some(why) = why else { return Ok(()) };
        if Instant::now() >= deadline {
            bail!(
                "the bench's cluster did not form within {FORM_TIMEOUT:?} (want cluster_state:ok and {PRIMARIES} primaries on every node): {why}"
            );
        }
        tokio::time::sleep(FORM_POLL).await;
    }
}
