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

/// Seconds the kernel holds a connection that has sent nothing before handing it to
/// `accept` anyway (see [`defer_accept`]): one SYN-ACK retransmission, as haproxy's
/// `defer-accept` and nginx's `deferred` use.
#[cfg(target_os = "linux")]
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// TCP_DEFER_ACCEPT on a listener whose clients speak first (RTMP's C0+C1, a TLS
/// ClientHello, an HTTP request, a PROXY header): the kernel completes `accept` only once the
/// client's first bytes are in (or after [`DEFER_ACCEPT_SECS`] for one that sends nothing,
/// which is then accepted and meets the first-bytes timeout as before). Without it the
/// gateway woke at the TCP handshake's last ACK, accepted, found nothing to read (EAGAIN)
/// and slept again until the first bytes came: one wake-up, one `epoll_wait` and one failed
/// `recvfrom` per connection (bench/RESULTS.md, TLS handshakes, eighth session). Connections
/// that never send anything also stay in the kernel's queue instead of holding a descriptor
/// and a task for that second. Elsewhere (no such option) a no-op.
pub fn defer_accept(listener: &TcpListener) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let secs = DEFER_ACCEPT_SECS;
        // SAFETY: the fd is the live listener `listener` borrows for the call; the option
        // value is a c_int passed with its own size.
        let r = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&secs as *const libc::c_int).cast::<libc::c_void>(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = listener;
    Ok(())
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

    /// With [`defer_accept`], a connection that has sent nothing is not handed to `accept`;
    /// its first bytes make it acceptable at once, with those bytes already readable.
    #[cfg(target_os = "linux")]
    #[test]
    fn deferred_accept_waits_for_the_first_bytes() {
        use std::io::{Read, Write};
        let listener = bind_listener("127.0.0.1:0".parse().unwrap(), None, 8).unwrap();
        defer_accept(&listener).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        // Connected on the client's side, not acceptable yet (well inside the one second
        // after which the kernel would hand over a silent connection anyway).
        std::thread::sleep(Duration::from_millis(200));
        let silent = listener.accept();
        assert!(
            matches!(&silent, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "a silent connection was accepted: {silent:?}"
        );
        client.write_all(b"\x03").unwrap();
        let start = std::time::Instant::now();
        let (mut tcp, _) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(start.elapsed() < Duration::from_millis(500), "not accepted");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        tcp.set_nonblocking(true).unwrap();
        let mut first = [0u8; 4];
        assert_eq!(
            tcp.read(&mut first).unwrap(),
            1,
            "the first byte came with the accept"
        );
        assert_eq!(first[0], 3);
    }
}
