//! The `fleetq-broker` service: the function library loaded at start, the maintenance loop,
//! crash detection and the HTTP server (API, `/metrics`, health), all stopping on the same
//! shutdown future. Stateless: run as many as you like.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::http::{self, ApiState};
use crate::{functions, liveness, maintenance, retry, Error, Redis, Result};

/// Default HTTP listen address: loopback only; set `FLEETQ_LISTEN` to expose it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Queues to tend and report; empty: every queue found in Redis. Env `FLEETQ_QUEUES`.
    pub queues: Vec<String>,
    /// Bearer token for `/v1`; none: no auth (fine on loopback). Env `FLEETQ_API_TOKEN`.
    pub api_token: Option<String>,
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
        Ok(())
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
    // Dropped when `run` returns (early `?` included), which ends the waiter task.
    let shutdown = crate::shutdown::Shutdown::new(shutdown);
    let stop = shutdown.token();
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(listen = ?addr, queues = ?config.queues, auth = config.api_token.is_some(), "broker started");
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
        config.api_token.clone(),
        config.max_body_bytes,
    ));
    let served = axum::serve(listener, http::router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await;
    let _ = library.await;
    let _ = maint.await;
    let _ = watch.await;
    tracing::info!("broker stopped");
    served.map_err(Error::Serve)
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
