//! The `fleetq-broker` service: the function library loaded at start, the maintenance loop,
//! crash detection and the HTTP server (API, `/metrics`, health), all stopping on the same
//! shutdown future. Stateless: run as many as you like.
//!
//! The API is never open to a network by accident: on a listener that is not loopback the
//! broker wants a token ([`BrokerConfig::api_token`]), or an explicit
//! [`BrokerConfig::open_api`], and refuses to start otherwise.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::http::{self, ApiState};
use crate::listener::{self, HttpLimits};
use crate::{functions, liveness, maintenance, retry, Error, Redis, Result};

/// Default HTTP listen address: loopback only; set `FLEETQ_LISTEN` to expose it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Queues to tend and report; empty: every queue found in Redis. Env `FLEETQ_QUEUES`.
    pub queues: Vec<String>,
    /// Bearer token for `/v1`. Env `FLEETQ_API_TOKEN`. Required on a listener that is not
    /// loopback unless [`BrokerConfig::open_api`]; without one, `/v1` answers only requests
    /// addressed to a loopback name (see [`crate::http`]).
    pub api_token: Option<String>,
    /// Serve `/v1` without a token on a listener that is not loopback: anyone who reaches
    /// the port may enqueue, cancel, retry and purge. Default false; env `FLEETQ_OPEN_API`.
    pub open_api: bool,
    /// Timeouts and the connection cap of the HTTP server. Default [`HttpLimits::default`].
    pub http: HttpLimits,
    /// Largest request body. Default [`http::DEFAULT_MAX_BODY_BYTES`].
    pub max_body_bytes: usize,
    /// How often the maintenance steps run. Default [`maintenance::DEFAULT_INTERVAL`].
    pub maintenance_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            api_token: None,
            open_api: false,
            http: HttpLimits::default(),
            max_body_bytes: http::DEFAULT_MAX_BODY_BYTES,
            maintenance_interval: maintenance::DEFAULT_INTERVAL,
        }
    }
}

impl BrokerConfig {
    /// Checks the settings; the message says which one is wrong and what to use.
    pub fn validate(&self) -> Result<()> {
        for q in &self.queues {
            crate::QueueKeys::new(q)?;
        }
        if self.max_body_bytes < 1024 {
            return Err(Error::Config(format!(
                "max body bytes is {}; use at least 1024",
                self.max_body_bytes
            )));
        }
        if self.maintenance_interval < Duration::from_millis(50) {
            return Err(Error::Config(
                "maintenance interval must be at least 50 ms".into(),
            ));
        }
        self.http.validate()
    }

    /// The token, when one is set (an empty one is none).
    fn token(&self) -> Option<&str> {
        self.api_token.as_deref().filter(|t| !t.is_empty())
    }

    /// Checks that serving the API on `addr` is safe: a listener that is not loopback needs
    /// a token, or [`BrokerConfig::open_api`] said on purpose.
    pub fn validate_listen(&self, addr: SocketAddr) -> Result<()> {
        if addr.ip().to_canonical().is_loopback() || self.token().is_some() || self.open_api {
            return Ok(());
        }
        Err(Error::Config(format!(
            "the broker would serve its API on {addr}, which is not loopback, without a token: \
             anyone who reaches the port could enqueue, cancel, retry and purge jobs. Set \
             --api-token / FLEETQ_API_TOKEN (for example `openssl rand -hex 32`) and send \
             Authorization: Bearer <token>; or listen on 127.0.0.1; or pass --open-api / \
             FLEETQ_OPEN_API=1 to serve it without a token on purpose"
        )))
    }
}

/// Serves the broker on `listener` until `shutdown` resolves.
pub async fn run<S>(
    redis: Redis,
    listener: TcpListener,
    config: BrokerConfig,
    shutdown: S,
) -> Result<()>
where
    S: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Config(format!("cannot read the listener's address: {e}")))?;
    config.validate_listen(addr)?;
    if config.open_api && config.token().is_none() {
        tracing::warn!(
            listen = %addr,
            "THE API IS OPEN: /v1 serves anyone who reaches {addr} without a token (--open-api); set FLEETQ_API_TOKEN unless a network boundary you trust guards the port"
        );
    }
    // Dropped when `run` returns (early `?` included), which ends the waiter task.
    let shutdown = crate::shutdown::Shutdown::new(shutdown);
    let stop = shutdown.token();
    tracing::info!(listen = %addr, queues = ?config.queues, auth = config.token().is_some(), "broker started");
    let library = tokio::spawn(load_library(redis.clone(), stop.clone()));
    let maint = tokio::spawn(maintenance::run(
        redis.clone(),
        config.queues.clone(),
        config.maintenance_interval,
        stop.clone().cancelled_owned(),
    ));
    let watch = tokio::spawn(liveness::run(
        redis.clone(),
        config.queues.clone(),
        liveness::DEFAULT_INTERVAL,
        stop.clone(),
    ));
    let state = Arc::new(ApiState::new(
        redis,
        config.queues.clone(),
        http::ApiOptions {
            token: config.token().map(str::to_owned),
            open: config.open_api,
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.http.body_timeout,
        },
    ));
    listener::serve(listener, http::router(state), config.http, stop.clone()).await;
    let _ = library.await;
    let _ = maint.await;
    let _ = watch.await;
    tracing::info!("broker stopped");
    Ok(())
}

/// Loads the function library at start (workers wait for it), waiting out a Redis outage.
/// When the broker's user may not load it (no `function|load`), it says so once and keeps
/// looking, until someone else loads it (`fleetq functions load`); the broker serves meanwhile,
/// and `/readyz` answers 503 with the reason.
async fn load_library(redis: Redis, stop: tokio_util::sync::CancellationToken) {
    let loaded = retry::until_ready("load the function library", &stop, || async {
        functions::load_all(&redis.conn()).await?;
        functions::check_all(&redis.conn()).await
    })
    .await;
    match loaded {
        Ok(Some(state)) => {
            tracing::info!(server = state.version().unwrap_or(""), ours = %functions::library_version(), "function library ready")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot load the function library: {e}"),
    }
}

/// Resolves on SIGTERM or Ctrl-C (see [`crate::shutdown::signal`]).
pub use crate::shutdown::signal as shutdown_signal;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listens_without_a_token() {
        let open = BrokerConfig::default();
        for ok in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "127.0.0.2:1",
        ] {
            assert!(open.validate_listen(ok.parse().unwrap()).is_ok(), "{ok}");
        }
        for public in ["0.0.0.0:8080", "[::]:8080", "10.1.2.3:8080"] {
            let e = open
                .validate_listen(public.parse().unwrap())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("not loopback") && e.contains("FLEETQ_API_TOKEN"),
                "{e}"
            );
        }
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let empty = BrokerConfig {
            api_token: Some(String::new()),
            ..BrokerConfig::default()
        };
        assert!(
            empty.validate_listen(any).is_err(),
            "an empty token is no token"
        );
        let token = BrokerConfig {
            api_token: Some("t".into()),
            ..BrokerConfig::default()
        };
        assert!(token.validate_listen(any).is_ok());
        let said_open = BrokerConfig {
            open_api: true,
            ..BrokerConfig::default()
        };
        assert!(said_open.validate_listen(any).is_ok());
    }
}
