//! TCP sockets: listening sockets bound the same way everywhere, and the options every
//! connection (client or backend) gets.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use tokio::net::TcpStream;

/// A non-blocking listening socket with SO_REUSEADDR (restarts do not wait for TIME_WAIT)
/// and, when `v6_only` says so, IPV6_V6ONLY (None: the system's default).
pub fn bind_listener(
    addr: SocketAddr,
    v6_only: Option<bool>,
    backlog: i32,
) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let (true, Some(only)) = (addr.is_ipv6(), v6_only) {
        socket.set_only_v6(only)?;
    }
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // On Linux a connection accepted from this socket inherits these (the kernel copies the
    // listener's TCP_NODELAY, SO_KEEPALIVE and keepalive timers into it): set once here, they
    // save five setsockopt calls per connection (see `tune_accepted`).
    #[cfg(target_os = "linux")]
    {
        socket.set_nodelay(true)?;
        socket.set_tcp_keepalive(&keepalive())?;
    }
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// TCP_NODELAY (RTMP writes whole messages; waiting for more only adds latency) and TCP
/// keepalive, so a peer that vanished without a FIN is noticed within about 90 s even when
/// nothing is being sent to it.
pub fn tune_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive());
}

/// [`tune_socket`] for a connection accepted from a [`bind_listener`] socket: nothing to do
/// on Linux, where it inherited the options from the listener (five system calls fewer per
/// connection, about 1 % of a full TLS handshake's server CPU: bench/RESULTS.md, seventh
/// session); elsewhere the options are set on the connection.
pub fn tune_accepted(tcp: &TcpStream) {
    #[cfg(not(target_os = "linux"))]
    tune_socket(tcp);
    #[cfg(target_os = "linux")]
    let _ = tcp;
}

/// Keepalive probes after 60 s of silence (every 10 s, 3 of them, where the system lets us
/// set those).
fn keepalive() -> socket2::TcpKeepalive {
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    #[cfg(target_os = "linux")]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    keepalive
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_the_options() {
        let std = bind_listener("127.0.0.1:0".parse().unwrap(), None, 8).unwrap();
        let listener = tokio::net::TcpListener::from_std(std).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        tune_accepted(&tcp);
        assert!(tcp.nodelay().unwrap());
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(60));
        #[cfg(target_os = "linux")]
        {
            assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(10));
            assert_eq!(sock.keepalive_retries().unwrap(), 3);
        }
    }
}
