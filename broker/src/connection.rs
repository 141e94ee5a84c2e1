//! Connections to Redis: one shared, self-reconnecting connection for short commands, and a
//! dedicated connection per blocking read whose response timeout exceeds its `BLOCK`.
//!
//! `redis://` and `rediss://` (TLS, rustls with the webpki roots) URLs work, with a user and
//! password in the URL (`redis://:secret@host:6379/0`). Passwords never reach logs or errors:
//! every URL shown is [`redact`]ed.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::AsyncConnectionConfig;

use crate::{Error, Result};

/// Used when `REDIS_URL` is unset and no URL is given.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// How long establishing a TCP (and TLS) connection may take. Default 2 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a short command may wait for its reply. Default 2 s; redis-rs' own default
/// (500 ms) is too tight for a Lua step on a loaded server.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

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
}

impl RedisConfig {
    /// Settings for `url` with the default timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            ca_cert: None,
        }
    }
}

/// A handle on one Redis server, cheap to clone.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    /// The URL without its password, for messages.
    url: String,
    /// Shared by every short command of this process; reconnects by itself after a failure.
    manager: ConnectionManager,
    config: RedisConfig,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("url", &self.url).finish()
    }
}

impl Redis {
    /// Connects to `url` with the default timeouts.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(RedisConfig::new(url)).await
    }

    /// Connects with explicit settings and checks the server answers.
    pub async fn connect_with(config: RedisConfig) -> Result<Self> {
        install_tls_provider();
        let url = redact(&config.url);
        let bad_url = |e: redis::RedisError| {
            Error::Config(format!(
                "invalid Redis URL {url}: {e}; expected redis://[user:password@]host[:port][/db] or rediss://…"
            ))
        };
        let client = match &config.ca_cert {
            None => redis::Client::open(config.url.as_str()).map_err(bad_url)?,
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
                redis::Client::build_with_tls(config.url.as_str(), certs).map_err(bad_url)?
            }
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let manager = ConnectionManager::new_with_config(client.clone(), manager_config)
            .await
            .map_err(|source| Error::Connect {
                url: url.clone(),
                source,
            })?;
        Ok(Self {
            client,
            url,
            manager,
            config,
        })
    }

    /// The shared connection for short commands (clone it freely: it is multiplexed).
    pub fn conn(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// A new dedicated connection for blocking commands of up to `block`; its response
    /// timeout is `block` plus the configured response timeout, so a read that blocks the
    /// whole time is not mistaken for a dead server.
    pub async fn blocking_conn(&self, block: Duration) -> Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(block + self.config.response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .map_err(|source| Error::Connect {
                url: self.url.clone(),
                source,
            })
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
    use super::redact;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(redact("redis://:s3cret@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("rediss://bob:pw@h:6380"), "rediss://bob:***@h:6380");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
