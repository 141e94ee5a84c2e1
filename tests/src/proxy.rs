//! A tiny TCP fault proxy (toxiproxy's idea): forwards loopback connections to an upstream and
//! can cut them all, refuse new ones until restored, or delay every chunk it forwards.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mode {
    /// Every connection closed and new ones refused while set.
    cut: bool,
    /// Added before each forwarded chunk; zero: none.
    delay: Duration,
    /// Bumped on every cut, so connections opened before it close even after a quick restore.
    generation: u64,
}

/// A running proxy; stops (and closes every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode {
            cut: false,
            delay: Duration::ZERO,
            generation: 0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, upstream, rx, stop.clone()));
        Ok(Self { addr, mode, stop })
    }

    /// `redis://127.0.0.1:<port>` of the proxy's listening side.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// The proxy's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection and closes new ones at once until [`Proxy::restore`].
    pub fn cut(&self) {
        self.mode.send_modify(|m| {
            m.cut = true;
            m.generation += 1;
        });
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.mode.send_modify(|m| m.cut = false);
    }

    /// Delays every forwarded chunk by `delay` (zero: no delay), both ways.
    pub fn delay(&self, delay: Duration) {
        self.mode.send_modify(|m| m.delay = delay);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else { continue };
        if mode.borrow().cut {
            drop(client);
            continue;
        }
        tokio::spawn(connection(client, upstream, mode.clone(), stop.clone()));
    }
}

/// Forwards one connection until either side closes, the proxy is cut, or it stops.
async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    stop: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let born = mode.borrow().generation;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, mode.clone());
    let down = pump(sr, cw, mode.clone());
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = async { tokio::join!(up, down) } => {}
        _ = mode.wait_for(|m| m.cut || m.generation != born) => {}
    }
}

async fn pump<R, W>(mut from: R, mut to: W, mode: watch::Receiver<Mode>)
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = mode.borrow().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
