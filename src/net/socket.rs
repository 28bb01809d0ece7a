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
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// TCP_NODELAY (RTMP writes whole messages; waiting for more only adds latency) and TCP
/// keepalive, so a peer that vanished without a FIN is noticed within about 90 s even when
/// nothing is being sent to it.
pub fn tune_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    #[cfg(target_os = "linux")]
    let keepalive = keepalive
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive);
}
