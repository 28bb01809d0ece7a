//! A userspace delay proxy for tests of long network paths (this machine has no netem): every
//! byte crossing it, either way, is held for a fixed one-way delay, with no limit on
//! throughput, so a round trip through it costs twice the delay, as on a long path.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks in flight per direction of one connection. At 64 KiB a chunk this carries far more
/// than the streams in the tests send in one delay; a full channel holds the reader back
/// (backpressure, no unbounded buffer).
const IN_FLIGHT: usize = 1024;

/// A running proxy; dropping it stops it and closes its connections.
pub struct DelayProxy {
    addr: SocketAddr,
    delay: Duration,
    rt: Option<tokio::runtime::Runtime>,
}

impl DelayProxy {
    /// Listens on 127.0.0.1 (a port chosen at run time) and forwards each connection to
    /// `target`, holding every byte `delay` in each direction.
    pub fn start(target: SocketAddr, delay: Duration) -> DelayProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("cannot start the delay proxy's runtime");
        let listener = rt
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("cannot bind the delay proxy");
        let addr = listener.local_addr().expect("delay proxy address");
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(one_way(cr, sw, delay));
                    tokio::spawn(one_way(sr, cw, delay));
                });
            }
        });
        DelayProxy {
            addr,
            delay,
            rt: Some(rt),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The one-way delay.
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads from `from` and writes each chunk to `to` once it is `delay` old. End of stream is
/// delayed the same way (a half-close after the last byte).
async fn one_way(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if chunk.is_empty() {
                break;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        let due = Instant::now() + delay;
        let chunk = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
        if tx.send((due, chunk)).await.is_err() || n == 0 {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
