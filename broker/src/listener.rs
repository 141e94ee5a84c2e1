//! The broker's HTTP listener: accepts connections up to a cap, serves each over HTTP/1.1
//! with a deadline on request headers, and closes them gracefully on shutdown.
//!
//! What a hostile or broken client can hold is bounded here: at most
//! [`HttpLimits::max_connections`] connections at once (more wait in the kernel's listen
//! backlog until one closes), and no connection longer than [`HttpLimits::header_timeout`]
//! without a complete request head. Hyper starts that deadline whenever the connection is
//! ready for a request (when it opens, and after each answer), so the same timeout cuts
//! slow headers (slowloris) and closes idle keep-alive connections. Bodies have their own
//! deadline, applied where they are read ([`crate::http::JsonBody`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Default time a client has to send a request's complete headers, counted from when the
/// connection opens or its previous answer was sent; also how long an idle keep-alive
/// connection stays open. 10 s: far above any honest client on a LAN, short enough that
/// idle or trickling connections do not pile up.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a whole request body, counted from its headers.
/// 10 s: the largest body (about 1 MiB by default) at 100 KB/s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on open HTTP connections. Each `…/wait` holds one for up to
/// [`crate::http::MAX_WAIT`]; 512 leaves room for many waiters within the default
/// `ulimit -n` of 1024, next to the broker's Redis connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// How long open connections get to finish their request at shutdown before they are cut.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// At most one warning per this while the connection cap holds connections back.
const CAP_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What one client may hold of the broker's HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Deadline for a request's headers, and the keep-alive idle timeout. Default
    /// [`DEFAULT_HEADER_TIMEOUT`]; env `FLEETQ_HTTP_HEADER_TIMEOUT_MS`.
    pub header_timeout: Duration,
    /// Deadline for a request's body, from its headers. Default [`DEFAULT_BODY_TIMEOUT`];
    /// env `FLEETQ_HTTP_BODY_TIMEOUT_MS`.
    pub body_timeout: Duration,
    /// Most connections open at once. Default [`DEFAULT_MAX_CONNECTIONS`]; env
    /// `FLEETQ_HTTP_MAX_CONNECTIONS`.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl HttpLimits {
    /// Checks the limits; the message says which one is wrong and what to use.
    pub fn validate(&self) -> crate::Result<()> {
        let range = |name: &str, d: Duration| {
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                return Err(crate::Error::Config(format!(
                    "HTTP {name} timeout is {} ms; use 100 to 3600000 ms",
                    d.as_millis()
                )));
            }
            Ok(())
        };
        range("header", self.header_timeout)?;
        range("body", self.body_timeout)?;
        if !(1..=65_536).contains(&self.max_connections) {
            return Err(crate::Error::Config(format!(
                "HTTP max connections is {}; use 1 to 65536",
                self.max_connections
            )));
        }
        Ok(())
    }
}

/// Serves `router` on `listener` within `limits` until `stop` is cancelled; then stops
/// accepting, lets open connections finish their request for up to [`SHUTDOWN_GRACE`], and
/// cuts the rest.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut conns = JoinSet::new();
    let mut warned: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() > CAP_WARNING_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(
                        max = limits.max_connections,
                        "the HTTP connection cap is reached; new connections wait in the listen backlog until one closes (FLEETQ_HTTP_MAX_CONNECTIONS)"
                    );
                }
                tokio::select! {
                    // The semaphore is never closed.
                    Ok(p) = permits.clone().acquire_owned() => p,
                    _ = stop.cancelled() => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stop.cancelled() => break,
        };
        // Answers are small: send them at once rather than waiting to fill a segment.
        let _ = stream.set_nodelay(true);
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let stop = stop.clone();
        conns.spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let done = tokio::select! {
                done = conn.as_mut() => done,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = done {
                tracing::debug!(error = %e, "HTTP connection ended: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "HTTP connections still busy after {} s of shutdown; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

/// A failed accept: a connection reset before it was taken is nothing; anything else (out
/// of file descriptors, say) is logged and waited out a moment rather than spun on.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "cannot accept an HTTP connection: {e}; check the open file limit (ulimit -n) against FLEETQ_HTTP_MAX_CONNECTIONS");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
