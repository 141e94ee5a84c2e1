//! Connections to Redis: one shared, self-reconnecting connection for short commands, and a
//! dedicated connection per blocking read whose response timeout exceeds its `BLOCK`.
//!
//! `redis://` and `rediss://` (TLS, rustls with the webpki roots) URLs work, with a user and
//! password in the URL (`redis://:secret@host:6379/0`). Passwords never reach logs or errors:
//! every URL shown is [`redact`]ed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};
use tokio_util::sync::CancellationToken;

use crate::{retry, Error, Result};

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

/// A handle on one Redis server, cheap to clone.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    /// The URL without its password, for messages.
    url: String,
    /// Shared by every short command of this process; reconnects by itself after a failure.
    shared: SharedConn,
    config: RedisConfig,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.url)
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
        let client = open_client(&config)?;
        Self::from_client(client, config).await
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
        let client = open_client(&config)?;
        retry::until_ready("connect", stop, || {
            Self::from_client(client.clone(), config.clone())
        })
        .await
    }

    async fn from_client(client: redis::Client, config: RedisConfig) -> Result<Self> {
        if let Some(name) = &config.client_name {
            validate_client_name(name)?;
        }
        let url = redact(&config.url);
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let manager = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(|source| Error::Connect {
                url: url.clone(),
                source,
            })?;
        let mut shared = SharedConn {
            inner: manager,
            name: config.client_name.as_deref().map(Arc::from),
            unnamed: Arc::new(AtomicBool::new(config.client_name.is_some())),
        };
        let _: String = redis::cmd("PING")
            .query_async(&mut shared)
            .await
            .map_err(|e| Error::redis("ping", e))?;
        Ok(Self {
            client,
            url,
            shared,
            config,
        })
    }

    /// A new handle on the same server (same URL, TLS and timeouts) whose connections all
    /// carry `name` (see [`RedisConfig::client_name`]). Connects at once.
    pub async fn named(&self, name: &str) -> Result<Redis> {
        validate_client_name(name)?;
        let mut config = self.config.clone();
        config.client_name = Some(name.to_owned());
        Self::from_client(self.client.clone(), config).await
    }

    /// The shared connection for short commands (clone it freely: it is multiplexed).
    pub fn conn(&self) -> SharedConn {
        self.shared.clone()
    }

    /// A new dedicated connection for blocking commands of up to `block`; its response
    /// timeout is `block` plus the configured response timeout, so a read that blocks the
    /// whole time is not mistaken for a dead server. Named when the handle is.
    pub async fn blocking_conn(&self, block: Duration) -> Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(block + self.config.response_timeout));
        let mut conn = self
            .client
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

    /// Reads `maxmemory_policy` and `maxmemory` from `INFO memory` (allowed where `CONFIG`
    /// is not) and warns loudly when the policy is not `noeviction`: with `allkeys-*` Redis
    /// may evict queued jobs, with `volatile-*` finished job records and node records (keys
    /// with a TTL). Returns the policy.
    pub async fn check_eviction_policy(&self) -> Result<String> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
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
                "Redis at {} has maxmemory-policy {policy} (maxmemory {maxmemory} bytes): {risk} once memory is full. Set maxmemory-policy noeviction (see docs/operations.md)",
                self.url
            );
        }
        Ok(policy)
    }

    /// The server URL with its password masked.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the server is and how to reach it (TLS settings included), for other clients
    /// such as connection pools.
    pub fn connection_info(&self) -> redis::ConnectionInfo {
        self.client.get_connection_info().clone()
    }

    /// The settings this handle was made with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }
}

/// The shared, self-reconnecting connection of a [`Redis`] handle (a redis-rs
/// `ConnectionManager` underneath). Two things on top:
///
/// - a command that finds the connection *refused* is tried once more: redis-rs keeps the
///   result of its last reconnect, so after an outage the first command would get that stale
///   "connection refused" even though Redis listens again. A refused command never reached
///   the server, so sending it again is safe.
/// - with a [client name](RedisConfig::client_name), the name is set again with
///   `CLIENT SETNAME` before the first command after any error that may have reconnected.
#[derive(Clone)]
pub struct SharedConn {
    inner: ConnectionManager,
    /// The connection name, when the handle has one.
    name: Option<Arc<str>>,
    /// Set when the current connection may not carry the name (at start and after an
    /// error that makes redis-rs reconnect); shared by every clone.
    unnamed: Arc<AtomicBool>,
}

impl SharedConn {
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

impl ConnectionLike for SharedConn {
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

/// A client for `config` (URL and CA file checked; nothing connected yet).
fn open_client(config: &RedisConfig) -> Result<redis::Client> {
    let url = redact(&config.url);
    let bad_url = |e: redis::RedisError| {
        Error::Config(format!(
            "invalid Redis URL {url}: {e}; expected redis://[user:password@]host[:port][/db] or rediss://…"
        ))
    };
    match &config.ca_cert {
        None => redis::Client::open(config.url.as_str()).map_err(bad_url),
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Config(format!(
                    "cannot read the Redis CA certificate {}: {e}; check FLEETQ_REDIS_CA_CERT",
                    path.display()
                ))
            })?;
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            };
            redis::Client::build_with_tls(config.url.as_str(), certs).map_err(bad_url)
        }
    }
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
