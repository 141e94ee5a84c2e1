//! Connections to Redis: one shared, self-reconnecting connection for short commands, and a
//! dedicated connection per blocking read whose response timeout exceeds its `BLOCK`.
//!
//! One [`Redis`] handle hides the topology ([`crate::topology`] has the URL forms):
//!
//! - **one server** (`redis://`, `rediss://`): a redis-rs `ConnectionManager`;
//! - **Redis Cluster** (`redis+cluster://`): a redis-rs cluster connection, which follows
//!   `MOVED`, `ASK` and `TRYAGAIN` and refreshes its slot map after a failover; per-node work
//!   (`SCAN`, `FUNCTION LOAD`) goes to [`Redis::primaries`], keyless commands of a queue
//!   (`TIME`) to [`Redis::conn_for`], blocking reads to the primary serving their key;
//! - **Sentinel** (`redis+sentinel://`): the primary the sentinels name; a command refused
//!   with `READONLY` (the old primary, now a replica) or refused at connect makes the handle
//!   ask the sentinels again, move to the new primary and send the command once more.
//!
//! A user and password go in the URL (`redis://:secret@host:6379/0`); TLS uses rustls with the
//! webpki roots or the CA in [`RedisConfig::ca_cert`]. Passwords never reach logs or errors:
//! every URL shown is [`redact`]ed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};
use tokio_util::sync::CancellationToken;

use crate::topology::{self, Endpoint, NodeUrl};
use crate::{retry, Error, Result};

/// A dedicated connection to one node, for blocking commands.
pub type BlockingConn = MultiplexedConnection;

/// Used when `REDIS_URL` is unset and no URL is given.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// How long establishing a TCP (and TLS) connection may take. Default 2 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a short command may wait for its reply. Default 2 s; redis-rs' own default
/// (500 ms) is too tight for a Lua step on a loaded server.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How many times the shared connection retries one reconnect before the command that
/// waits on it fails. Default 2: a refused connect is instant, so a command issued during an
/// outage fails within about 150 ms instead of hanging, and callers see the outage.
pub const RECONNECT_RETRIES: usize = 2;
/// First delay between reconnect tries of the shared connection. Default 50 ms.
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
/// Longest delay between reconnect tries of the shared connection. Default 500 ms.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://…` for TLS.
    /// Env: `REDIS_URL`. Default [`DEFAULT_REDIS_URL`].
    pub url: String,
    /// Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Default [`DEFAULT_RESPONSE_TIMEOUT`].
    pub response_timeout: Duration,
    /// PEM file of the CA that signed the server's certificate, for `rediss://` servers with
    /// a private CA. Env: `FLEETQ_REDIS_CA_CERT`. Default: none (the webpki public roots).
    pub ca_cert: Option<std::path::PathBuf>,
    /// Name given with `CLIENT SETNAME` to every connection of this handle (the shared one,
    /// again after each reconnect, and every [`Redis::blocking_conn`]), so that `CLIENT LIST`
    /// shows whose it is and a process that died is seen as its connections close. Printable
    /// ASCII without spaces. Default: none (connections stay unnamed).
    pub client_name: Option<String>,
}

impl RedisConfig {
    /// Settings for `url` with the default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            ca_cert: None,
            client_name: None,
        }
    }
}

/// Checks a connection name: `CLIENT SETNAME` takes printable ASCII without spaces.
pub fn validate_client_name(name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::Config(format!(
            "connection name {name:?} is not valid: use printable ASCII without spaces (CLIENT SETNAME refuses others)"
        )));
    }
    Ok(())
}

/// A handle on Redis — one server, a Redis Cluster or a Sentinel-managed primary (see
/// [`crate::topology`] for the URL forms) — cheap to clone.
#[derive(Clone)]
pub struct Redis {
    /// The URL without its password, for messages.
    url: String,
    /// Shared by every short command of this process; reconnects by itself after a failure
    /// and follows the topology (cluster redirections, a sentinel's new primary).
    shared: SharedConn,
    target: Target,
    config: RedisConfig,
}

/// How to reach the data, per topology.
#[derive(Clone)]
enum Target {
    Standalone(Box<redis::Client>),
    Cluster(Arc<ClusterTarget>),
    Sentinel(Arc<SentinelTarget>),
}

struct ClusterTarget {
    nodes: NodeUrl,
    seeds: Vec<(String, u16)>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.url)
            .field("topology", &self.topology())
            .field("client_name", &self.config.client_name)
            .finish()
    }
}

impl Redis {
    /// Connects to `url` with the default timeouts.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(RedisConfig::new(url)).await
    }

    /// Connects with explicit settings and checks the server answers `PING` (a server still
    /// loading its data accepts the connection but answers `-LOADING`: an error here).
    pub async fn connect_with(config: RedisConfig) -> Result<Self> {
        install_tls_provider();
        let endpoint = Endpoint::parse(&config.url)?;
        Self::open(&endpoint, config).await
    }

    /// Like [`Redis::connect_with`], but waits while Redis is unreachable, loading, read-only
    /// or otherwise [transiently](Error::is_transient) unable to serve, with a capped,
    /// jittered backoff ([`retry::until_ready`]), saying why once per change of state.
    /// Returns `Ok(None)` when `stop` is cancelled first; errors only for problems waiting
    /// cannot fix (bad URL, unreadable CA file, wrong password).
    pub async fn connect_patiently(
        config: RedisConfig,
        stop: &CancellationToken,
    ) -> Result<Option<Self>> {
        install_tls_provider();
        let endpoint = Endpoint::parse(&config.url)?;
        if let Endpoint::Standalone { url } = &endpoint {
            open_client(url, &config)?;
        }
        retry::until_ready("connect", stop, || Self::open(&endpoint, config.clone())).await
    }

    async fn open(endpoint: &Endpoint, config: RedisConfig) -> Result<Self> {
        if let Some(name) = &config.client_name {
            validate_client_name(name)?;
        }
        let url = redact(&config.url);
        let (target, shared) = match endpoint {
            Endpoint::Standalone { url: u } => {
                let client = open_client(u, &config)?;
                let node = NodeConn::open(client.clone(), &config, &url).await?;
                (Target::Standalone(Box::new(client)), Shared::Node(node))
            }
            Endpoint::Cluster { nodes, seeds } => {
                let target = Arc::new(ClusterTarget {
                    nodes: nodes.clone(),
                    seeds: seeds.clone(),
                });
                let conn = cluster_conn(&target, &config, &url).await?;
                (
                    Target::Cluster(target),
                    Shared::Cluster(conn, None, Arc::from(seeds[0].0.as_str())),
                )
            }
            Endpoint::Sentinel {
                nodes,
                sentinels,
                service,
            } => {
                let target = Arc::new(SentinelTarget::new(nodes, sentinels, service));
                let addr = target.resolve(&config).await?;
                let node = target.node_conn(&addr, &config).await?;
                let conn = SentinelConn {
                    target: target.clone(),
                    current: Arc::new(std::sync::RwLock::new((addr, node))),
                    config: config.clone(),
                };
                (Target::Sentinel(target), Shared::Sentinel(conn))
            }
        };
        let mut shared = SharedConn(shared);
        if let (Shared::Cluster(..), Some(name)) = (&shared.0, &config.client_name) {
            // Sent to every node; see `RedisConfig::client_name` for what a reconnect does.
            set_name(&mut shared, name)
                .await
                .map_err(|e| Error::redis("client setname", e))?;
        }
        let _: Value = redis::cmd("PING")
            .query_async(&mut shared)
            .await
            .map_err(|e| Error::redis("ping", e))?;
        Ok(Self {
            url,
            shared,
            target,
            config,
        })
    }

    /// `standalone`, `cluster` or `sentinel`.
    pub fn topology(&self) -> &'static str {
        match self.target {
            Target::Standalone(_) => "standalone",
            Target::Cluster(_) => "cluster",
            Target::Sentinel(_) => "sentinel",
        }
    }

    /// A new handle on the same servers (same URL, TLS and timeouts) whose connections all
    /// carry `name` (see [`RedisConfig::client_name`]). Connects at once.
    pub async fn named(&self, name: &str) -> Result<Redis> {
        validate_client_name(name)?;
        let mut config = self.config.clone();
        config.client_name = Some(name.to_owned());
        Self::connect_with(config).await
    }

    /// The shared connection for short commands (clone it freely: it is multiplexed). On a
    /// cluster each command goes to the node that serves its keys; a command without keys
    /// goes to any node (use [`Redis::primaries`] or [`Redis::conn_for`] to choose).
    pub fn conn(&self) -> SharedConn {
        self.shared.clone()
    }

    /// A shared connection whose every command goes to the primary serving `key`'s slot
    /// (the same as [`Redis::conn`] except on a cluster): for keyless commands such as
    /// `TIME` that must run on a queue's own shard.
    pub fn conn_for(&self, key: &str) -> SharedConn {
        match &self.shared.0 {
            Shared::Cluster(c, _, host) => SharedConn(Shared::Cluster(
                c.clone(),
                Some(SingleNodeRoutingInfo::SpecificNode(Route::new(
                    topology::slot_of(key),
                    SlotAddr::Master,
                ))),
                host.clone(),
            )),
            _ => self.conn(),
        }
    }

    /// One shared connection per primary (one item except on a cluster), each sending every
    /// command to its node: for `SCAN`, `FUNCTION LOAD` and other per-node commands.
    pub async fn primaries(&self) -> Result<Vec<SharedConn>> {
        self.shared.primaries().await
    }

    /// The cluster's primaries and their slots (`CLUSTER SLOTS`); empty except on a cluster.
    pub async fn cluster_primaries(&self) -> Result<Vec<topology::Primary>> {
        self.shared.cluster_primaries().await
    }

    /// A new dedicated connection for blocking commands of up to `block` on `key` (the
    /// stream or list the command blocks on): to the server, the current primary, or the
    /// cluster primary serving `key`'s slot. Its response timeout is `block` plus the
    /// configured response timeout, so a read that blocks the whole time is not mistaken
    /// for a dead server. Named when the handle is. After a failover it answers `MOVED` or
    /// `READONLY`, or fails: drop it and ask for a new one.
    pub async fn blocking_conn(&self, key: &str, block: Duration) -> Result<BlockingConn> {
        self.node_conn(key, Some(block + self.config.response_timeout))
            .await
    }

    /// Like [`Redis::blocking_conn`] without a response timeout: the caller bounds each
    /// command itself.
    pub async fn unbounded_conn(&self, key: &str) -> Result<BlockingConn> {
        self.node_conn(key, None).await
    }

    async fn node_conn(&self, key: &str, timeout: Option<Duration>) -> Result<BlockingConn> {
        let client = match &self.target {
            Target::Standalone(client) => (**client).clone(),
            Target::Sentinel(t) => {
                let (host, port) = t.resolve(&self.config).await?;
                open_client(&t.nodes.at(&host, port), &self.config)?
            }
            Target::Cluster(t) => {
                let primaries = self.cluster_primaries().await?;
                let slot = topology::slot_of(key);
                let Some(owner) = topology::owner(&primaries, slot) else {
                    return Err(Error::Redis {
                        step: "find the primary of a key",
                        source: redis::RedisError::from((
                            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                            "no primary serves slot",
                            format!("{slot} of {key}: the cluster's slots are not all covered"),
                        )),
                    });
                };
                open_client(&t.nodes.at(&owner.host, owner.port), &self.config)?
            }
        };
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(timeout);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|source| Error::Connect {
                url: self.url.clone(),
                source,
            })?;
        if let Some(name) = &self.config.client_name {
            set_name(&mut conn, name)
                .await
                .map_err(|e| Error::redis("client setname", e))?;
        }
        Ok(conn)
    }

    /// Reads `maxmemory_policy` and `maxmemory` from `INFO memory` of every primary (allowed
    /// where `CONFIG` is not) and warns loudly when the policy is not `noeviction`: with
    /// `allkeys-*` Redis may evict queued jobs, with `volatile-*` finished job records and
    /// node records (keys with a TTL). Returns the first primary's policy.
    pub async fn check_eviction_policy(&self) -> Result<String> {
        let mut first = None;
        for mut conn in self.primaries().await? {
            let policy = eviction_policy(&mut conn, &self.url).await?;
            first.get_or_insert(policy);
        }
        first.ok_or_else(|| Error::Protocol {
            step: "info memory",
            detail: "the cluster has no primary".into(),
        })
    }

    /// The server URL with its password masked.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The settings this handle was made with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }
}

async fn eviction_policy(conn: &mut SharedConn, url: &str) -> Result<String> {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(conn)
        .await
        .map_err(|e| Error::redis("info memory", e))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_owned)
    };
    let policy = field("maxmemory_policy").ok_or_else(|| Error::Protocol {
        step: "info memory",
        detail: "no maxmemory_policy field".into(),
    })?;
    let maxmemory = field("maxmemory").unwrap_or_else(|| "0".into());
    let risk = if policy.starts_with("allkeys-") {
        Some("queued and running jobs (any key) can be evicted and silently lost")
    } else if policy.starts_with("volatile-") {
        Some("finished job records and node records (keys with a TTL) can be evicted early")
    } else if policy != "noeviction" {
        Some("fleetq keys can be evicted")
    } else {
        None
    };
    if let Some(risk) = risk {
        tracing::warn!(
            maxmemory_policy = %policy,
            maxmemory = %maxmemory,
            "Redis at {url} has maxmemory-policy {policy} (maxmemory {maxmemory} bytes): {risk} once memory is full. Set maxmemory-policy noeviction (see docs/operations.md)",
        );
    }
    Ok(policy)
}

async fn cluster_conn(
    target: &ClusterTarget,
    config: &RedisConfig,
    url: &str,
) -> Result<ClusterConnection> {
    let seeds: Vec<String> = target
        .seeds
        .iter()
        .map(|(h, p)| target.nodes.at(h, *p))
        .collect();
    let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.response_timeout)
        .retries(CLUSTER_RETRIES)
        .min_retry_wait(RECONNECT_MIN_DELAY.as_millis() as u64)
        .max_retry_wait(RECONNECT_MAX_DELAY.as_millis() as u64)
        // Redirections and retries within their own budget, not the first try's.
        .overall_response_timeout(Some(config.response_timeout * 3));
    if let Some(path) = &config.ca_cert {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(read_ca(path)?),
        });
    }
    let client = builder.build().map_err(|e| {
        Error::Config(format!(
            "invalid Redis Cluster URL {url}: {e}; expected redis+cluster://[user:password@]host:port,host:port,…"
        ))
    })?;
    client
        .get_async_connection()
        .await
        .map_err(|source| Error::Connect {
            url: url.to_owned(),
            source,
        })
}

/// How often the cluster connection retries a command that met a redirection, a
/// `TRYAGAIN` or a broken node connection, before the caller sees the error. Default 6.
pub const CLUSTER_RETRIES: u32 = 6;

/// The primary the sentinels name, and how to reach the servers.
struct SentinelTarget {
    nodes: NodeUrl,
    sentinels: Vec<(String, u16)>,
    service: String,
    /// Held while asking the sentinels, with the time of the last answer: one question at a
    /// time, at most one per [`SENTINEL_ASK_EVERY`].
    asked: tokio::sync::Mutex<Option<(Instant, (String, u16))>>,
}

/// Fewest time between two questions to the sentinels after errors. Default 200 ms.
pub const SENTINEL_ASK_EVERY: Duration = Duration::from_millis(200);

impl SentinelTarget {
    fn new(nodes: &NodeUrl, sentinels: &[(String, u16)], service: &str) -> Self {
        Self {
            nodes: nodes.clone(),
            sentinels: sentinels.to_vec(),
            service: service.to_owned(),
            asked: tokio::sync::Mutex::new(None),
        }
    }

    /// The current primary's address, asked of the sentinels (or the answer of less than
    /// [`SENTINEL_ASK_EVERY`] ago).
    async fn resolve(&self, config: &RedisConfig) -> Result<(String, u16)> {
        let mut asked = self.asked.lock().await;
        if let Some((at, addr)) = &*asked {
            if at.elapsed() < SENTINEL_ASK_EVERY {
                return Ok(addr.clone());
            }
        }
        let addr = topology::sentinel_primary(
            &self.nodes,
            &self.sentinels,
            &self.service,
            config.connect_timeout,
        )
        .await?;
        *asked = Some((Instant::now(), addr.clone()));
        Ok(addr)
    }

    async fn node_conn(&self, addr: &(String, u16), config: &RedisConfig) -> Result<NodeConn> {
        let url = self.nodes.at(&addr.0, addr.1);
        let client = open_client(&url, config)?;
        NodeConn::open(client, config, &redact(&url)).await
    }
}

/// The shared connection of a Sentinel handle: the current primary's, replaced when the
/// sentinels name another.
#[derive(Clone)]
struct SentinelConn {
    target: Arc<SentinelTarget>,
    current: Arc<std::sync::RwLock<((String, u16), NodeConn)>>,
    config: RedisConfig,
}

impl SentinelConn {
    fn now(&self) -> ((String, u16), NodeConn) {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Sends with `send` on the current primary's connection; when the reply looks like a
    /// failover (see [`failover_sign`], or `readonly` of the replies), moves to the primary the
    /// sentinels name and, when the command surely did not run, sends it again (twice at most).
    async fn send<T, F, Fut>(
        &self,
        send: F,
        readonly: impl Fn(&T) -> Option<bool>,
    ) -> redis::RedisResult<T>
    where
        F: Fn(NodeConn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            let (addr, node) = self.now();
            let res = send(node).await;
            let sign = match &res {
                Err(e) => failover_sign(e),
                Ok(v) => readonly(v),
            };
            match sign {
                Some(safe) if tries < 3 && self.follow(&addr).await && safe => continue,
                _ => return res,
            }
        }
    }

    /// After an error that may mean a failover: asks the sentinels and moves to the primary
    /// they name if it is another. Returns whether it moved.
    async fn follow(&self, was: &(String, u16)) -> bool {
        let Ok(addr) = self.target.resolve(&self.config).await else {
            return false;
        };
        if &addr == was {
            return false;
        }
        let Ok(node) = self.target.node_conn(&addr, &self.config).await else {
            return false;
        };
        tracing::info!(primary = %format!("{}:{}", addr.0, addr.1), service = %self.target.service,
            "the sentinels name a new primary; moving to it");
        let mut current = match self.current.write() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *current = (addr, node);
        true
    }
}

/// Whether an error may come from a failover the sentinels know of, and whether the command
/// surely did not run (so sending it again is safe).
fn failover_sign(e: &redis::RedisError) -> Option<bool> {
    if e.code() == Some("READONLY") || e.is_connection_refusal() {
        return Some(true);
    }
    (e.is_io_error() || e.is_connection_dropped() || e.is_timeout()).then_some(false)
}

/// `Some(true)` when a reply is a `READONLY` refusal (redis-rs hands server errors back as
/// values): the server is a replica now, and a write it refused did not run.
fn readonly(values: &[Value]) -> Option<bool> {
    values
        .iter()
        .any(|v| matches!(v, Value::ServerError(e) if e.code() == "READONLY"))
        .then_some(true)
}

/// The shared connection of a [`Redis`] handle: clone it freely.
#[derive(Clone)]
pub struct SharedConn(Shared);

impl SharedConn {
    /// One connection per primary (see [`Redis::primaries`]).
    pub async fn primaries(&self) -> Result<Vec<SharedConn>> {
        let Shared::Cluster(c, _, host) = &self.0 else {
            return Ok(vec![self.clone()]);
        };
        Ok(self
            .cluster_primaries()
            .await?
            .into_iter()
            .map(|p| {
                SharedConn(Shared::Cluster(
                    c.clone(),
                    Some(SingleNodeRoutingInfo::ByAddress {
                        host: p.host,
                        port: p.port,
                    }),
                    host.clone(),
                ))
            })
            .collect())
    }

    /// The cluster's primaries and their slots; empty except on a cluster.
    pub async fn cluster_primaries(&self) -> Result<Vec<topology::Primary>> {
        match &self.0 {
            Shared::Cluster(c, _, host) => topology::primaries(&mut c.clone(), host).await,
            _ => Ok(Vec::new()),
        }
    }
}

#[derive(Clone)]
enum Shared {
    Node(NodeConn),
    Sentinel(SentinelConn),
    /// The cluster connection, and where every command goes when not by its keys.
    Cluster(ClusterConnection, Option<SingleNodeRoutingInfo>, Arc<str>),
}

impl ConnectionLike for SharedConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Shared::Node(n) => n.req_packed_command(cmd),
            Shared::Cluster(c, None, _) => c.req_packed_command(cmd),
            Shared::Cluster(c, Some(route), _) => {
                let route = route.clone();
                Box::pin(async move {
                    c.route_command(
                        cmd.clone(),
                        redis::cluster_routing::RoutingInfo::SingleNode(route),
                    )
                    .await
                })
            }
            Shared::Sentinel(s) => Box::pin(s.send(
                move |mut node| async move { node.req_packed_command(cmd).await },
                |v| readonly(std::slice::from_ref(v)),
            )),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Shared::Node(n) => n.req_packed_commands(pipeline, offset, count),
            Shared::Cluster(c, None, _) => c.req_packed_commands(pipeline, offset, count),
            Shared::Cluster(c, Some(route), _) => {
                let route = route.clone();
                Box::pin(async move {
                    c.route_pipeline(pipeline.clone(), offset, count, route)
                        .await
                })
            }
            Shared::Sentinel(s) => {
                Box::pin(s.send(
                    move |mut node| async move {
                        node.req_packed_commands(pipeline, offset, count).await
                    },
                    |values| readonly(values),
                ))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Shared::Node(n) => n.get_db(),
            Shared::Sentinel(s) => s.now().1.get_db(),
            Shared::Cluster(..) => 0,
        }
    }
}

/// The self-reconnecting connection to one server (a redis-rs `ConnectionManager`
/// underneath). Two things on top:
///
/// - a command that finds the connection *refused* is tried once more: redis-rs keeps the
///   result of its last reconnect, so after an outage the first command would get that stale
///   "connection refused" even though Redis listens again. A refused command never reached
///   the server, so sending it again is safe.
/// - with a [client name](RedisConfig::client_name), the name is set again with
///   `CLIENT SETNAME` before the first command after any error that may have reconnected.
#[derive(Clone)]
struct NodeConn {
    inner: ConnectionManager,
    /// The connection name, when the handle has one.
    name: Option<Arc<str>>,
    /// Set when the current connection may not carry the name (at start and after an
    /// error that makes redis-rs reconnect); shared by every clone.
    unnamed: Arc<AtomicBool>,
}

impl NodeConn {
    /// Connects to the server of `client` (`url` is the redacted URL, for errors).
    async fn open(client: redis::Client, config: &RedisConfig, url: &str) -> Result<Self> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let manager = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(|source| Error::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self {
            inner: manager,
            name: config.client_name.as_deref().map(Arc::from),
            unnamed: Arc::new(AtomicBool::new(config.client_name.is_some())),
        })
    }

    /// Names the connection when it may have been replaced since it was last named.
    async fn ensure_name(&mut self) -> redis::RedisResult<()> {
        let Some(name) = self.name.clone() else {
            return Ok(());
        };
        if !self.unnamed.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let named = set_name(&mut self.inner, &name).await;
        if let Err(e) = &named {
            self.note(e);
        }
        named
    }

    /// Whether a try that ended in `res` is worth one more: only a refused command (it never
    /// reached the server), once. Notes a possible reconnect either way.
    fn again<T>(&self, res: &redis::RedisResult<T>, tries: u32) -> bool {
        match res {
            Ok(_) => false,
            Err(e) => {
                self.note(e);
                e.is_connection_refusal() && tries < 2
            }
        }
    }

    /// Remembers that an error may have made redis-rs reconnect (without the name).
    fn note(&self, e: &redis::RedisError) {
        if self.name.is_some() && (e.is_io_error() || e.is_unrecoverable_error()) {
            self.unnamed.store(true, Ordering::Release);
        }
    }
}

impl ConnectionLike for NodeConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut tries = 0;
            loop {
                tries += 1;
                let res = match self.ensure_name().await {
                    Ok(()) => self.inner.req_packed_command(cmd).await,
                    Err(e) => Err(e),
                };
                if !self.again(&res, tries) {
                    return res;
                }
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut tries = 0;
            loop {
                tries += 1;
                let res = match self.ensure_name().await {
                    Ok(()) => {
                        self.inner
                            .req_packed_commands(pipeline, offset, count)
                            .await
                    }
                    Err(e) => Err(e),
                };
                if !self.again(&res, tries) {
                    return res;
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

async fn set_name<C: ConnectionLike + Send>(conn: &mut C, name: &str) -> redis::RedisResult<()> {
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async(conn)
        .await
}

/// A client for the server at `url` with the TLS settings of `config` (URL and CA file
/// checked; nothing connected yet).
fn open_client(url_text: &str, config: &RedisConfig) -> Result<redis::Client> {
    let url = redact(url_text);
    let bad_url = |e: redis::RedisError| {
        Error::Config(format!(
            "invalid Redis URL {url}: {e}; expected redis://[user:password@]host[:port][/db] or rediss://…"
        ))
    };
    match &config.ca_cert {
        None => redis::Client::open(url_text).map_err(bad_url),
        Some(path) => {
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca(path)?),
            };
            redis::Client::build_with_tls(url_text, certs).map_err(bad_url)
        }
    }
}

fn read_ca(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the Redis CA certificate {}: {e}; check FLEETQ_REDIS_CA_CERT",
            path.display()
        ))
    })
}

/// `url` with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

/// rustls needs a process-wide crypto provider for `rediss://`; installing it twice is fine.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::{redact, validate_client_name};

    #[test]
    fn names_without_spaces_only() {
        assert!(validate_client_name("w-host1-42").is_ok());
        assert!(validate_client_name("has space").is_err());
        assert!(validate_client_name("").is_err());
        assert!(validate_client_name("new\nline").is_err());
    }

    #[test]
    fn passwords_are_masked() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://bob:pw@h:6380"), "rediss://bob:***@h:6380");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
