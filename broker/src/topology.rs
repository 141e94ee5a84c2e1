//! Where the Redis data lives: one server, a Redis Cluster, or a primary found through
//! Sentinel. This module reads the URL forms, finds a cluster's primaries and a key's owner,
//! and asks the sentinels for the current primary; [`crate::connection`] builds connections
//! on top.
//!
//! | URL | topology |
//! |---|---|
//! | `redis://[user:password@]host[:port][/db]` | one server (`rediss://` with TLS) |
//! | `redis+cluster://[user:password@]h1:p1,h2:p2,…` | Redis Cluster; the hosts are seed nodes, any live one is enough (`rediss+cluster://` with TLS); database 0 only |
//! | `redis+sentinel://[user:password@]h1:p1,h2:p2,…/service[/db]` | the primary that the sentinels name for `service` (`rediss+sentinel://` with TLS to the sentinels and the servers) |
//!
//! With Sentinel, the user and password are the data servers'; the sentinels are asked without
//! credentials.

use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::Value;

use crate::{Error, Result};

/// The default port of a sentinel, when a `redis+sentinel://` host names none.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;
/// The default port of a Redis server, when a host names none.
pub const DEFAULT_PORT: u16 = 6379;

/// What a Redis URL points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// One server; the URL is passed to redis-rs as is.
    Standalone {
        /// `redis://…` or `rediss://…`.
        url: String,
    },
    /// A Redis Cluster reached through any of its seed nodes.
    Cluster {
        /// The servers' address form: scheme and credentials.
        nodes: NodeUrl,
        /// `(host, port)` of each seed node.
        seeds: Vec<(String, u16)>,
    },
    /// A primary named by sentinels.
    Sentinel {
        /// The servers' address form: scheme, credentials and database.
        nodes: NodeUrl,
        /// `(host, port)` of each sentinel.
        sentinels: Vec<(String, u16)>,
        /// The name the sentinels monitor the primary under.
        service: String,
    },
}

/// How to write the URL of one server of a cluster or a sentinel setup: scheme, credentials
/// and database shared by all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUrl {
    tls: bool,
    /// `user:password@` or empty.
    userinfo: String,
    db: i64,
}

impl NodeUrl {
    /// The `redis://` (or `rediss://`) URL of the server at `host:port`.
    pub fn at(&self, host: &str, port: u16) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let host = match host.contains(':') {
            true => format!("[{host}]"),
            false => host.to_owned(),
        };
        let db = match self.db {
            0 => String::new(),
            n => format!("/{n}"),
        };
        format!("{scheme}://{}{host}:{port}{db}", self.userinfo)
    }

    /// The URL of a sentinel at `host:port`: same TLS, no credentials, no database.
    pub fn sentinel_at(&self, host: &str, port: u16) -> String {
        let plain = NodeUrl {
            tls: self.tls,
            userinfo: String::new(),
            db: 0,
        };
        plain.at(host, port)
    }
}

fn bad(url: &str, why: &str) -> Error {
    Error::Config(format!(
        "invalid Redis URL {}: {why}; expected redis://[user:password@]host[:port][/db], \
         redis+cluster://[user:password@]host:port,host:port,… or \
         redis+sentinel://[user:password@]host:port,host:port,…/service-name (rediss… for TLS)",
        crate::connection::redact(url)
    ))
}

impl Endpoint {
    /// Reads a URL of any of the three forms (see the module docs).
    ///
    /// ```
    /// use fleetq_broker::topology::Endpoint;
    /// let e = Endpoint::parse("redis+cluster://:pw@10.0.0.1:7000,10.0.0.2:7000").unwrap();
    /// assert!(matches!(e, Endpoint::Cluster { ref seeds, .. } if seeds.len() == 2));
    /// assert!(Endpoint::parse("redis+cluster://h:7000/2").is_err());
    /// ```
    pub fn parse(url: &str) -> Result<Self> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(bad(url, "no scheme"));
        };
        let (tls, kind) = match scheme {
            "redis" | "rediss" | "unix" | "redis+unix" => {
                return Ok(Endpoint::Standalone {
                    url: url.to_owned(),
                })
            }
            "redis+cluster" => (false, "cluster"),
            "rediss+cluster" => (true, "cluster"),
            "redis+sentinel" => (false, "sentinel"),
            "rediss+sentinel" => (true, "sentinel"),
            other => return Err(bad(url, &format!("unknown scheme {other:?}"))),
        };
        if rest.contains('?') {
            return Err(bad(url, "query parameters are not supported"));
        }
        let (userinfo, rest) = match rest.rsplit_once('@') {
            Some((u, r)) => (format!("{u}@"), r),
            None => (String::new(), rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let (service, db) = match kind {
            "sentinel" => {
                let Some(service) = parts.next() else {
                    return Err(bad(
                        url,
                        "a sentinel URL names its service after the hosts: …/mymaster",
                    ));
                };
                (Some(service.to_owned()), parts.next())
            }
            _ => (None, parts.next()),
        };
        if parts.next().is_some() {
            return Err(bad(url, "too many path parts"));
        }
        let db = match db {
            None => 0,
            Some(d) => d
                .parse::<i64>()
                .map_err(|_| bad(url, &format!("database {d:?} is not a number")))?,
        };
        if kind == "cluster" && db != 0 {
            return Err(bad(
                url,
                &format!(
                    "a Redis Cluster has database 0 only (the URL names {db}); drop the /{db}"
                ),
            ));
        }
        let default_port = match kind {
            "sentinel" => DEFAULT_SENTINEL_PORT,
            _ => DEFAULT_PORT,
        };
        let addrs = hosts
            .split(',')
            .map(|h| host_port(h, default_port).ok_or_else(|| bad(url, &format!("bad host {h:?}"))))
            .collect::<Result<Vec<_>>>()?;
        let nodes = NodeUrl { tls, userinfo, db };
        Ok(match service {
            None => Endpoint::Cluster {
                nodes,
                seeds: addrs,
            },
            Some(service) => Endpoint::Sentinel {
                nodes,
                sentinels: addrs,
                service,
            },
        })
    }

    /// `standalone`, `cluster` or `sentinel`.
    pub fn kind(&self) -> &'static str {
        match self {
            Endpoint::Standalone { .. } => "standalone",
            Endpoint::Cluster { .. } => "cluster",
            Endpoint::Sentinel { .. } => "sentinel",
        }
    }
}

fn host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if s.is_empty() {
        return None;
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() => Some((h.to_owned(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((s.to_owned(), default_port)),
    }
}

/// One primary of a cluster and the slots it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    /// Host as the cluster announces it.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Slot ranges, inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// Total slots of a Redis Cluster.
pub const SLOTS: u32 = 16384;

/// The primaries of a cluster from `CLUSTER SLOTS` (asked of any node through `conn`).
/// A node that announces no IP is given `fallback_host`.
pub async fn primaries<C: ConnectionLike + Send>(
    conn: &mut C,
    fallback_host: &str,
) -> Result<Vec<Primary>> {
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .map_err(|e| Error::redis("cluster slots", e))?;
    parse_slots(reply, fallback_host)
}

fn parse_slots(reply: Value, fallback_host: &str) -> Result<Vec<Primary>> {
    let bad = |detail: &str| Error::Protocol {
        step: "cluster slots",
        detail: detail.to_owned(),
    };
    let Value::Array(ranges) = reply else {
        return Err(bad("not an array"));
    };
    let mut out: Vec<Primary> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            return Err(bad("a range is not an array"));
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(node))) =
            (items.first(), items.get(1), items.get(2))
        else {
            return Err(bad("a range lacks start, end or its primary"));
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) if !b.is_empty() => String::from_utf8_lossy(b).into_owned(),
            _ => fallback_host.to_owned(),
        };
        let Some(Value::Int(port)) = node.get(1) else {
            return Err(bad("a primary has no port"));
        };
        let (start, end, port) = (*start as u16, *end as u16, *port as u16);
        match out.iter_mut().find(|p| p.host == host && p.port == port) {
            Some(p) => p.slots.push((start, end)),
            None => out.push(Primary {
                host,
                port,
                slots: vec![(start, end)],
            }),
        }
    }
    Ok(out)
}

/// The cluster slot of `key` (CRC16 of its hash tag, as Redis computes it).
pub fn slot_of(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b
        .iter()
        .position(|&c| c == b'{')
        .and_then(|open| {
            let close = b[open + 1..].iter().position(|&c| c == b'}')?;
            (close > 0).then(|| &b[open + 1..open + 1 + close])
        })
        .unwrap_or(b);
    crc16(tagged) % SLOTS as u16
}

pub(crate) fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = match crc & 0x8000 {
                0 => crc << 1,
                _ => (crc << 1) ^ 0x1021,
            };
        }
    }
    crc
}

/// The primary serving `slot`, if any.
pub fn owner(primaries: &[Primary], slot: u16) -> Option<&Primary> {
    primaries
        .iter()
        .find(|p| p.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
}

/// Asks the sentinels, in order, for the address of `service`'s primary; the first that
/// answers wins. Each is given `timeout`.
pub async fn sentinel_primary(
    nodes: &NodeUrl,
    sentinels: &[(String, u16)],
    service: &str,
    timeout: Duration,
) -> Result<(String, u16)> {
    let mut last = String::from("no sentinel given");
    for (host, port) in sentinels {
        let url = nodes.sentinel_at(host, *port);
        match ask_sentinel(&url, service, timeout).await {
            Ok(Some(addr)) => return Ok(addr),
            Ok(None) => last = format!("sentinel {host}:{port} does not know service {service:?}"),
            Err(e) => last = format!("sentinel {host}:{port}: {e}"),
        }
    }
    Err(Error::Config(format!(
        "no sentinel named a primary for {service:?} ({last}); check the sentinel addresses and the service name in REDIS_URL"
    )))
}

async fn ask_sentinel(
    url: &str,
    service: &str,
    timeout: Duration,
) -> redis::RedisResult<Option<(String, u16)>> {
    let client = redis::Client::open(url)?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await?;
    let addr: Option<(String, String)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(service)
        .query_async(&mut conn)
        .await?;
    Ok(addr.and_then(|(h, p)| Some((h, p.parse().ok()?))))
}

/// How the data servers are doing, for `/readyz` and `fleetq functions status`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct Health {
    /// `standalone`, `cluster` or `sentinel`.
    pub topology: String,
    /// Each primary (one except on a cluster).
    pub primaries: Vec<PrimaryHealth>,
    /// Slots served by a primary (cluster only; all 16384 when covered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots_covered: Option<u32>,
}

/// One primary's state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "service", derive(utoipa::ToSchema))]
pub struct PrimaryHealth {
    /// `host:port`, or `server` when there is one.
    pub node: String,
    /// `cluster_state` from `CLUSTER INFO` (cluster only: `ok` or `fail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_state: Option<String>,
    /// The fleetq library on this primary: `missing`, `older (…)`, `current (…)`, `newer (…)`.
    pub library: String,
    /// Whether this build can work with that library.
    pub library_usable: bool,
    /// Why this primary could not be read (cluster only; the others still are).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Health {
    /// True when every primary answers, the cluster (if any) is `ok`, and only libraries
    /// are missing or older: what loading the library fixes.
    pub fn only_libraries_missing(&self) -> bool {
        let reachable = self
            .primaries
            .iter()
            .all(|p| p.error.is_none() && p.cluster_state.as_deref().is_none_or(|c| c == "ok"));
        reachable
            && self.slots_covered.is_none_or(|c| c == SLOTS)
            && self.primaries.iter().any(|p| !p.library_usable)
    }

    /// What is wrong, if anything: a cluster not `ok` or not fully covered, or a primary
    /// without a usable library.
    pub fn problem(&self) -> Option<String> {
        if let Some(covered) = self.slots_covered.filter(|&c| c < SLOTS) {
            return Some(format!(
                "CLUSTERDOWN: only {covered} of {SLOTS} slots have a primary; fix the cluster (redis-cli --cluster check)"
            ));
        }
        for p in &self.primaries {
            if let Some(state) = p.cluster_state.as_deref().filter(|s| *s != "ok") {
                return Some(format!(
                    "CLUSTERDOWN: primary {} says cluster_state:{state}; wait for the failover or fix the cluster",
                    p.node
                ));
            }
        }
        for p in &self.primaries {
            if let Some(e) = &p.error {
                return Some(format!("primary {} cannot be read: {e}", p.node));
            }
            if !p.library_usable {
                return Some(format!(
                    "primary {}: the fleetq library is {}: {}",
                    p.node,
                    p.library,
                    crate::functions::REMEDY
                ));
            }
        }
        None
    }
}

/// Reads the state of every primary: cluster state and slot coverage (on a cluster) and the
/// fleetq library.
pub async fn health(redis: &crate::Redis) -> Result<Health> {
    let cluster = redis.cluster_primaries().await?;
    let mut primaries = Vec::new();
    for (i, mut conn) in redis.primaries().await?.into_iter().enumerate() {
        let node = cluster
            .get(i)
            .map_or_else(|| "server".to_owned(), |p| format!("{}:{}", p.host, p.port));
        let read = async {
            let cluster_state = match cluster.is_empty() {
                true => None,
                false => {
                    let info: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| Error::redis("cluster info", e))?;
                    info.lines()
                        .find_map(|l| l.trim().strip_prefix("cluster_state:"))
                        .map(str::to_owned)
                }
            };
            let library = crate::functions::check(&mut conn).await?;
            Ok::<_, Error>((cluster_state, library))
        };
        primaries.push(match read.await {
            Ok((cluster_state, library)) => PrimaryHealth {
                node,
                cluster_state,
                library: library.to_string(),
                library_usable: library.usable(),
                error: None,
            },
            // One primary down is reported as such; the others are still read.
            Err(e) if !cluster.is_empty() => PrimaryHealth {
                node,
                cluster_state: None,
                library: "unknown".into(),
                library_usable: false,
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e),
        });
    }
    let slots_covered = (!cluster.is_empty()).then(|| {
        cluster
            .iter()
            .flat_map(|p| &p.slots)
            .map(|&(a, b)| u32::from(b) - u32::from(a) + 1)
            .sum()
    });
    Ok(Health {
        topology: redis.topology().to_owned(),
        primaries,
        slots_covered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        assert_eq!(
            Endpoint::parse("redis://h:1/2").unwrap(),
            Endpoint::Standalone {
                url: "redis://h:1/2".into()
            }
        );
        let Endpoint::Cluster { nodes, seeds } =
            Endpoint::parse("rediss+cluster://u:p@a:7000,b,[::1]:7002").unwrap()
        else {
            panic!("not a cluster")
        };
        assert_eq!(
            seeds,
            vec![
                ("a".into(), 7000),
                ("b".into(), DEFAULT_PORT),
                ("::1".into(), 7002)
            ]
        );
        assert_eq!(nodes.at("c", 7003), "rediss://u:p@c:7003");
        assert_eq!(nodes.at("::1", 1), "rediss://u:p@[::1]:1");
        let Endpoint::Sentinel {
            nodes,
            sentinels,
            service,
        } = Endpoint::parse("redis+sentinel://:pw@s1,s2:5000/main/3").unwrap()
        else {
            panic!("not sentinel")
        };
        assert_eq!(service, "main");
        assert_eq!(sentinels[0], ("s1".into(), DEFAULT_SENTINEL_PORT));
        assert_eq!(nodes.at("p", 6379), "redis://:pw@p:6379/3");
        assert_eq!(nodes.sentinel_at("s1", 1), "redis://s1:1");
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, why) in [
            ("redis+cluster://h:1/1", "database 0 only"),
            ("redis+sentinel://h:1", "names its service"),
            ("redis+cluster://h:x", "bad host"),
            ("redis+cluster://,h:1", "bad host"),
            ("memcached://h", "unknown scheme"),
            ("redis+cluster://:secret@h:1/1", "***"),
        ] {
            let e = Endpoint::parse(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("fleetq:{q}:stream"), slot_of("q"));
        assert_eq!(slot_of("a{}b"), slot_of("a{}b"));
        assert_eq!(slot_of("123456789"), 0x31C3);
    }
}
