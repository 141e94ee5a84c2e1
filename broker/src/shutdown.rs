//! Shutdown: the process signal every fleetq binary waits for, and [`Shutdown`], which turns a
//! shutdown future into a [`CancellationToken`] that many tasks can watch.
//!
//! Library `run` functions take their shutdown as a future (so tests pass their own); inside,
//! several loops need to see it, which a future cannot do but a token can. [`Shutdown`] is the
//! one place that bridge is built, and it cleans up after itself: dropping it (an early `?`
//! return included) aborts the task waiting on the future.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Resolves on SIGTERM or Ctrl-C: the shutdown future every fleetq binary passes to its `run`.
///
/// If the SIGTERM handler cannot be installed (no Unix signal support), only Ctrl-C counts.
pub async fn signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A shutdown request seen as a token: cancelled once the future given to [`Shutdown::new`]
/// resolves.
///
/// Dropping it aborts the waiting task (the token is left as it is), so a `run` that returns
/// early leaves nothing behind. Must be created inside a Tokio runtime.
#[derive(Debug)]
pub struct Shutdown {
    /// Cancelled when the shutdown future resolves; clones go to every loop that must stop.
    token: CancellationToken,
    /// The task awaiting the shutdown future; aborted on drop so it never outlives its owner.
    waiter: JoinHandle<()>,
}

impl Shutdown {
    /// Spawns a task that cancels the token when `fut` resolves.
    pub fn new(fut: impl Future<Output = ()> + Send + 'static) -> Self {
        let token = CancellationToken::new();
        let cancel = token.clone();
        let waiter = tokio::spawn(async move {
            fut.await;
            cancel.cancel();
        });
        Self { token, waiter }
    }

    /// A clone of the token, cancelled when shutdown is requested.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// True once shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has been requested (at once if it already was).
    pub async fn requested(&self) {
        self.token.cancelled().await;
    }
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        self.waiter.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn token_is_cancelled_when_the_future_resolves() {
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _ = rx.await;
        });
        let token = shutdown.token();
        assert!(!shutdown.is_requested());
        assert!(!token.is_cancelled());
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), shutdown.requested())
            .await
            .expect("shutdown requested within 5 s");
        assert!(shutdown.is_requested());
        assert!(token.is_cancelled());
    }

    #[tokio::test]
    async fn drop_aborts_the_waiting_task() {
        // The future holds the sender; once the waiter task is aborted the future is dropped
        // and the receiver sees the channel closed.
        let (held_tx, mut held_rx) = oneshot::channel::<()>();
        let shutdown = Shutdown::new(async move {
            let _held = held_tx;
            std::future::pending::<()>().await;
        });
        let token = shutdown.token();
        drop(shutdown);
        let closed = tokio::time::timeout(Duration::from_secs(5), &mut held_rx).await;
        assert!(matches!(closed, Ok(Err(_))), "sender dropped with the task");
        assert!(!token.is_cancelled(), "abort is not a shutdown request");
    }
}
