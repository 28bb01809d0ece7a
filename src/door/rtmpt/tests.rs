//! Tunnel tests over in-memory connections, speaking raw HTTP bytes so the exact wire
//! format (status line, header case, lengths) is checked, not a client library's view.

use std::sync::Mutex as StdMutex;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::*;

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5555))
}

/// One raw HTTP/1.1 client connection to the tunnel.
struct Conn {
    io: DuplexStream,
    buf: Vec<u8>,
}

struct Resp {
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }
}

impl Conn {
    fn new(tunnel: &Arc<Tunnel>) -> Conn {
        let (client, server) = tokio::io::duplex(1 << 20);
        let t = Arc::clone(tunnel);
        tokio::spawn(async move { t.serve_connection(server, addr(), addr(), false).await });
        Conn {
            io: client,
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, path: &str, body: &[u8]) {
        self.io
            .write_all(&raw_request("POST", path, body))
            .await
            .unwrap();
    }

    async fn read(&mut self) -> Resp {
        read_response(&mut self.io, &mut self.buf).await
    }

    async fn req(&mut self, path: &str, body: &[u8]) -> Resp {
        self.write(path, body).await;
        self.read().await
    }

    async fn open(&mut self) -> String {
        let r = self.req("/open/1", &[0]).await;
        assert_eq!(r.status(), 200, "{}", r.head);
        let s = String::from_utf8(r.body).unwrap();
        s.strip_suffix('\n').unwrap().to_string()
    }
}

fn raw_request(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-fcs\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

async fn read_response<S: AsyncRead + Unpin>(io: &mut S, buf: &mut Vec<u8>) -> Resp {
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 65536];
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..end].to_vec()).unwrap();
    let len: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("no Title-Case Content-Length in {head}"))
        .parse()
        .unwrap();
    while buf.len() < end + len {
        let mut chunk = [0u8; 65536];
        let n = io.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside a response body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    Resp { head, body }
}

/// A handler that echoes every byte back.
fn echo() -> StreamHandler {
    Arc::new(|mut s: ClientStream| {
        Box::pin(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    })
}

/// A handler that reports what it read (until EOF) on a channel.
fn recorder() -> (StreamHandler, mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tx = Arc::new(StdMutex::new(Some(tx)));
    let h: StreamHandler = Arc::new(move |mut s: ClientStream| {
        let tx = tx.lock().unwrap().take();
        Box::pin(async move {
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all).await;
            if let Some(tx) = tx {
                let _ = tx.send(all);
            }
        })
    });
    (h, rx)
}

fn limits(f: impl FnOnce(&mut Limits)) -> Arc<Limits> {
    let mut l = Limits::default();
    f(&mut l);
    Arc::new(l)
}

#[tokio::test]
async fn open_reply_is_exactly_what_librtmp_and_ffmpeg_parse() {
    let t = Tunnel::new(limits(|_| {}), echo());
    let mut c = Conn::new(&t);
    let r = c.req("/open/1", &[0]).await;
    assert!(r.head.starts_with("HTTP/1.1 200 OK\r\n"), "{}", r.head);
    assert!(r.head.contains("\r\nContent-Length: 33\r\n"), "{}", r.head);
    assert!(
        r.head.contains("\r\nContent-Type: application/x-fcs\r\n"),
        "{}",
        r.head
    );
    assert!(!r.head.contains("content-length"));
    assert!(!r.head.to_ascii_lowercase().contains("chunked"));
    assert!(!r.head.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(r.body.len(), 33);
    assert_eq!(r.body[32], b'\n');
    assert!(r.body[..32].iter().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(t.sessions(), 1);
}

#[tokio::test]
async fn send_idle_close_round_trip() {
    let t = Tunnel::new(limits(|_| {}), echo());
    let mut c = Conn::new(&t);
    assert_eq!(c.req("/fcs/ident2", &[0]).await.status(), 404);
    let id = c.open().await;
    let c0c1: Vec<u8> = std::iter::once(3u8)
        .chain((0..1536).map(|i| i as u8))
        .collect();
    let mut echoed = Vec::new();
    let r = c.req(&format!("/send/{id}/0"), &c0c1).await;
    assert_eq!(r.status(), 200);
    assert!(
        !r.body.is_empty(),
        "a send reply always carries the polling byte"
    );
    echoed.extend_from_slice(&r.body[1..]);
    let mut seq = 1;
    while echoed.len() < c0c1.len() {
        let r = c.req(&format!("/idle/{id}/{seq}"), &[0]).await;
        assert_eq!(r.status(), 200);
        assert!(!r.body.is_empty());
        echoed.extend_from_slice(&r.body[1..]);
        seq += 1;
    }
    assert_eq!(echoed, c0c1);
    let r = c.req(&format!("/close/{id}/{seq}"), &[0]).await;
    assert_eq!((r.status(), r.body.as_slice()), (200, &[0u8][..]));
    assert_eq!(t.sessions(), 0);
    assert_eq!(
        c.req(&format!("/idle/{id}/{}", seq + 1), &[0])
            .await
            .status(),
        404
    );
}

#[tokio::test]
async fn bodies_are_applied_in_sequence_order_across_connections() {
    let (h, mut rx) = recorder();
    let t = Tunnel::new(limits(|_| {}), h);
    let mut a = Conn::new(&t);
    let id = a.open().await;
    let mut b = Conn::new(&t);
    let mut c = Conn::new(&t);
    // 2 and 1 arrive first, on other connections; 0 last.
    c.write(&format!("/send/{id}/2"), b"cc").await;
    b.write(&format!("/send/{id}/1"), b"bb").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = a.req(&format!("/send/{id}/0"), b"aa").await;
    assert_eq!(r.status(), 200);
    assert_eq!(b.read().await.status(), 200);
    assert_eq!(c.read().await.status(), 200);
    // A repeated number is answered but its body ignored.
    assert_eq!(a.req(&format!("/send/{id}/1"), b"XX").await.status(), 200);
    assert_eq!(a.req(&format!("/close/{id}/3"), &[0]).await.status(), 200);
    assert_eq!(rx.recv().await.unwrap(), b"aabbcc");
}

#[tokio::test]
async fn far_skipped_sequence_number_is_refused() {
    let t = Tunnel::new(limits(|_| {}), echo());
    let mut c = Conn::new(&t);
    let id = c.open().await;
    assert_eq!(c.req(&format!("/idle/{id}/0"), &[0]).await.status(), 200);
    assert_eq!(c.req(&format!("/send/{id}/1000"), b"x").await.status(), 400);
    // The session is still usable.
    assert_eq!(c.req(&format!("/idle/{id}/1"), &[0]).await.status(), 200);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let t = Tunnel::new(limits(|_| {}), echo());
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let mut both = raw_request("POST", &format!("/send/{id}/0"), b"hello");
    both.extend(raw_request("POST", &format!("/idle/{id}/1"), &[0]));
    both.extend(raw_request("POST", "/idle/nosuchsession/0", &[0]));
    c.io.write_all(&both).await.unwrap();
    let r1 = c.read().await;
    let r2 = c.read().await;
    let r3 = c.read().await;
    assert_eq!((r1.status(), r2.status(), r3.status()), (200, 200, 404));
    let mut got = r1.body[1..].to_vec();
    got.extend_from_slice(&r2.body[1..]);
    assert_eq!(got, b"hello");
}

#[tokio::test(start_paused = true)]
async fn idle_with_nothing_pending_is_held_then_answered() {
    let t = Tunnel::new(limits(|l| l.tunnel_idle_hold_ms = 150), echo());
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let start = Instant::now();
    let r = c.req(&format!("/idle/{id}/0"), &[0]).await;
    let held = start.elapsed();
    assert_eq!(r.body, [1]);
    assert!(held >= Duration::from_millis(150), "{held:?}");
    assert!(held < Duration::from_millis(300), "{held:?}");
    // A small send waits at most SEND_HOLD for an answer, which it carries.
    let start = Instant::now();
    let r = c.req(&format!("/send/{id}/1"), b"x").await;
    assert_eq!(r.body, b"\x01x");
    assert!(start.elapsed() < SEND_HOLD);
    // A large send (media) is answered at once even with nothing to return.
    let t = Tunnel::new(limits(|_| {}), recorder().0);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let start = Instant::now();
    let r = c.req(&format!("/send/{id}/0"), &[7; SMALL_SEND + 1]).await;
    assert_eq!(r.body, [1]);
    assert!(start.elapsed() < Duration::from_millis(1));
    let start = Instant::now();
    let r = c.req(&format!("/send/{id}/1"), &[7; 10]).await;
    assert_eq!(r.body, [1]);
    assert!(start.elapsed() >= SEND_HOLD);
}

#[tokio::test(start_paused = true)]
async fn polling_byte_grows_over_empty_idles() {
    let t = Tunnel::new(limits(|l| l.tunnel_idle_hold_ms = 1), recorder().0);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let mut bytes = Vec::new();
    for seq in 0..60 {
        let r = c.req(&format!("/idle/{id}/{seq}"), &[0]).await;
        assert_eq!(r.body.len(), 1);
        bytes.push(r.body[0]);
    }
    bytes.dedup();
    assert_eq!(bytes, vec![1, 3, 5, 9, 17, 33]);
}

#[tokio::test(start_paused = true)]
async fn silent_sessions_are_reaped_and_the_consumer_sees_eof() {
    let (h, mut rx) = recorder();
    let t = Tunnel::new(limits(|l| l.tunnel_reap_secs = 2), h);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    c.req(&format!("/send/{id}/0"), b"abc").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(t.sessions(), 1, "not reaped before its time");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(t.sessions(), 0);
    assert_eq!(rx.recv().await.unwrap(), b"abc");
    assert_eq!(c.req(&format!("/idle/{id}/1"), &[0]).await.status(), 404);
}

#[tokio::test]
async fn backend_close_delivers_last_bytes_then_404() {
    let h: StreamHandler = Arc::new(|mut s: ClientStream| {
        Box::pin(async move {
            let mut b = [0u8; 5];
            let _ = s.read_exact(&mut b).await;
            let _ = s.write_all(b"final status").await;
            // Dropping the stream is the backend going away.
        })
    });
    let t = Tunnel::new(limits(|_| {}), h);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let mut got = c.req(&format!("/send/{id}/0"), b"hello").await.body[1..].to_vec();
    let mut seq = 1;
    while got.len() < 12 {
        let r = c.req(&format!("/idle/{id}/{seq}"), &[0]).await;
        assert_eq!(r.status(), 200);
        got.extend_from_slice(&r.body[1..]);
        seq += 1;
    }
    assert_eq!(got, b"final status");
    assert_eq!(
        c.req(&format!("/idle/{id}/{seq}"), &[0]).await.status(),
        404
    );
    assert_eq!(t.sessions(), 0);
}

#[tokio::test]
async fn pending_bytes_are_bounded_with_backpressure() {
    const TOTAL: usize = 300_000;
    let h: StreamHandler = Arc::new(|mut s: ClientStream| {
        Box::pin(async move {
            let _ = s.write_all(&vec![0x5a; TOTAL]).await;
            let _ = s.shutdown().await;
        })
    });
    let t = Tunnel::new(
        limits(|l| {
            l.max_tunnel_pending = 64 * 1024;
            l.tunnel_idle_hold_ms = 20;
        }),
        h,
    );
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let mut total = 0;
    let mut seq = 0;
    loop {
        let r = c.req(&format!("/idle/{id}/{seq}"), &[0]).await;
        if r.status() == 404 {
            break;
        }
        assert!(r.body.len() <= 64 * 1024 + 1, "{}", r.body.len());
        total += r.body.len() - 1;
        seq += 1;
    }
    assert_eq!(total, TOTAL);
    assert!(seq >= 5);
}

#[tokio::test]
async fn http_errors_for_bad_requests() {
    let t = Tunnel::new(
        limits(|l| {
            l.max_http_body = 1000;
            l.max_tunnel_sessions = 1;
        }),
        echo(),
    );
    let mut c = Conn::new(&t);
    c.io.write_all(&raw_request("GET", "/open/1", b""))
        .await
        .unwrap();
    let r = c.read().await;
    assert_eq!(r.status(), 405);
    assert!(r.head.contains("\r\nAllow: POST\r\n"));
    assert_eq!(c.req("/idle/0123456789abcdef/0", &[0]).await.status(), 404);
    assert_eq!(c.req("/nothing", &[0]).await.status(), 404);
    let id = c.open().await;
    assert_eq!(c.req("/open/1", &[0]).await.status(), 503);
    let mut c2 = Conn::new(&t);
    assert_eq!(
        c2.req(&format!("/send/{id}/0"), &[0; 2000]).await.status(),
        413
    );
}

#[tokio::test]
async fn http_1_0_keep_alive_is_accepted() {
    let t = Tunnel::new(limits(|_| {}), echo());
    let mut c = Conn::new(&t);
    for _ in 0..2 {
        c.io.write_all(
            b"POST /open/1 HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n\0",
        )
        .await
        .unwrap();
        let r = c.read().await;
        assert_eq!(r.status(), 200, "{}", r.head);
        assert_eq!(r.body.len(), 33);
    }
    assert_eq!(t.sessions(), 2);
}

#[tokio::test]
async fn shutdown_closes_every_session() {
    let (h, mut rx) = recorder();
    let t = Tunnel::new(limits(|_| {}), h);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    c.req(&format!("/send/{id}/0"), b"xyz").await;
    t.shutdown();
    assert_eq!(t.sessions(), 0);
    assert_eq!(rx.recv().await.unwrap(), b"xyz");
}

#[test]
fn session_ids_are_long_random_and_url_safe() {
    let a = new_session_id();
    let b = new_session_id();
    assert_ne!(a, b);
    assert_eq!(a.len(), 32);
    assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    assert!(path::parse(&format!("/idle/{a}/0")).is_ok());
}

// Keep the generic bound honest: the tunnel serves any byte stream.
#[allow(dead_code)]
fn assert_serves<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(t: Arc<Tunnel>, s: S) {
    drop(t.serve_connection(s, addr(), addr(), true));
}

#[tokio::test(start_paused = true)]
async fn refused_upstream_gives_the_client_an_http_error_not_a_hang() {
    // The handler gives up at once, as a pump does when its backend refuses.
    let h: StreamHandler = Arc::new(|s: ClientStream| Box::pin(async move { drop(s) }));
    let t = Tunnel::new(limits(|_| {}), h);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    tokio::task::yield_now().await;
    let start = Instant::now();
    let mut statuses = Vec::new();
    for seq in 0..3 {
        let r = c.req(&format!("/idle/{id}/{seq}"), &[0]).await;
        statuses.push(r.status());
        if r.status() == 404 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&404), "{statuses:?}");
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(t.sessions(), 0);
}

#[tokio::test]
async fn chunked_bodies_of_tiny_chunks_are_joined_and_applied_whole() {
    let (h, mut rx) = recorder();
    let t = Tunnel::new(limits(|_| {}), h);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    let mut req =
        format!("POST /send/{id}/0 HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
            .into_bytes();
    let payload: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    for b in &payload {
        req.extend_from_slice(b"1\r\n");
        req.push(*b);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.io.write_all(&req).await.unwrap();
    assert_eq!(c.read().await.status(), 200);
    assert_eq!(c.req(&format!("/close/{id}/1"), &[0]).await.status(), 200);
    assert_eq!(rx.recv().await.unwrap(), payload);
}

#[tokio::test(start_paused = true)]
async fn a_trickled_body_is_cut_off() {
    let t = Tunnel::new(limits(|l| l.idle_timeout_secs = 5), echo());
    let mut c = Conn::new(&t);
    let id = c.open().await;
    c.io.write_all(
        format!("POST /send/{id}/0 HTTP/1.1\r\nContent-Length: 10\r\n\r\nab").as_bytes(),
    )
    .await
    .unwrap();
    let start = Instant::now();
    let r = c.read().await;
    assert_eq!(r.status(), 408);
    assert!(start.elapsed() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn the_reaper_ends_with_the_tunnel() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    let t = Tunnel::new(limits(|_| {}), echo());
    assert_eq!(metrics.num_alive_tasks(), before + 1);
    let weak = Arc::downgrade(&t);
    drop(t);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        weak.upgrade().is_none(),
        "the reaper keeps the tunnel alive"
    );
    assert_eq!(metrics.num_alive_tasks(), before);

    let t = Tunnel::new(limits(|_| {}), echo());
    t.shutdown();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(metrics.num_alive_tasks(), before);
}

#[tokio::test]
async fn sessions_count_against_the_per_address_limit() {
    let t = Tunnel::new(limits(|l| l.max_connections_per_ip = 3), echo());
    let mut c = Conn::new(&t);
    let ids = [c.open().await, c.open().await, c.open().await];
    let r = c.req("/open/1", &[0]).await;
    assert_eq!(r.status(), 503, "a fourth session from one address");
    assert_eq!(t.sessions(), 3);
    assert_eq!(t.held_by(addr().ip()), 3);
    // A session that ends gives its place back.
    let r = c.req(&format!("/close/{}/0", ids[0]), &[0]).await;
    assert_eq!(r.status(), 200);
    let _ = c.open().await;
}

#[tokio::test]
async fn a_session_whose_handler_ended_is_removed_at_once() {
    let h: StreamHandler = Arc::new(|_s: ClientStream| Box::pin(async {}));
    let t = Tunnel::new(limits(|_| {}), h);
    let mut c = Conn::new(&t);
    let _ = c.open().await;
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        while t.sessions() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the session outlived its handler");
    assert_eq!(t.held_by(addr().ip()), 0);
}

#[tokio::test(start_paused = true)]
async fn sessions_without_a_whole_handshake_are_reaped() {
    let (h, mut rx) = recorder();
    let t = Tunnel::new(limits(|l| l.handshake_timeout_secs = 2), h);
    let mut c = Conn::new(&t);
    let id = c.open().await;
    // C0 and part of C1, then requests keep coming but the handshake never completes.
    assert_eq!(
        c.req(&format!("/send/{id}/0"), &[3; 100]).await.status(),
        200
    );
    for seq in 1..4 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = c.req(&format!("/idle/{id}/{seq}"), &[0]).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        t.sessions(),
        0,
        "reaped after limits.handshake_timeout_secs"
    );
    assert_eq!(rx.recv().await.unwrap().len(), 100);
}

#[tokio::test]
async fn held_out_of_order_bytes_are_bounded_by_max_tunnel_reorder_bytes() {
    let (h, mut rx) = recorder();
    let t = Tunnel::new(
        limits(|l| {
            l.max_tunnel_reorder_bytes = 1000;
            l.tunnel_order_wait_ms = 300;
        }),
        h,
    );
    let mut a = Conn::new(&t);
    let id = a.open().await;
    let mut b = Conn::new(&t);
    let mut c = Conn::new(&t);
    assert_eq!(a.req(&format!("/send/{id}/0"), b"x").await.status(), 200);
    // 2 is held (800 bytes) while 1 is missing; 3 would take the hold past 1000 bytes: it
    // waits, then is answered 503 without being kept.
    b.write(&format!("/send/{id}/2"), &[2; 800]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = c.req(&format!("/send/{id}/3"), &[3; 800]).await;
    assert_eq!(r.status(), 503, "{}", r.head);
    assert_eq!(a.req(&format!("/send/{id}/1"), b"y").await.status(), 200);
    assert_eq!(b.read().await.status(), 200);
    assert_eq!(a.req(&format!("/close/{id}/3"), &[0]).await.status(), 200);
    assert_eq!(rx.recv().await.unwrap().len(), 802);
}
