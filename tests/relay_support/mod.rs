//! Helpers for the relay's pool, failover and callback tests: nginx-rtmp backends with their
//! stat page (nginx's own count of RTMP clients), listeners that accept TCP but do not speak
//! RTMP, raw RTMP clients (handshake, connect, play on the proto crate's `ClientSession`, one
//! blocking socket each, every read bounded), and the gateway's backend metrics.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtmpgate::rtmp::chunk::{ChunkDecoder, ChunkLimits};
use rtmpgate::rtmp::handshake::{ClientHandshake, S0S1S2_LEN};
use rtmpgate::rtmp::session::client::Call;
use rtmpgate::rtmp::session::{ClientConfig, ClientEvent, ClientSession};

use crate::common::*;

/// nginx-rtmp with `application` blocks (`live on`, plus `extra` inside each), and an HTTP
/// server on a second port whose `/stat` is nginx-rtmp's `rtmp_stat all`. One process.
pub struct StatNginx {
    proc: Proc,
    _dir: TempDir,
    pub port: u16,
    pub stat_port: u16,
}

impl StatNginx {
    pub fn start(apps: &[&str]) -> StatNginx {
        StatNginx::start_with(apps, None, "")
    }

    /// On `port` (a backend coming back where another was), with `extra` directives in
    /// each application (e.g. `on_publish URL;`).
    pub fn start_with(apps: &[&str], port: Option<u16>, extra: &str) -> StatNginx {
        let apps: String = apps
            .iter()
            .map(|a| format!("  application {a} {{ live on; record off; {extra} }}\n"))
            .collect();
        let stat = Mutex::new(0u16);
        let (proc, dir, port) = spawn_nginx_rtmp(port, |d, port| {
            let stat_port = free_port();
            *stat.lock().unwrap() = stat_port;
            format!(
                "load_module {module};\n\
                 worker_processes 1; daemon off; master_process off;\n\
                 error_log {d}/error.log info; pid {d}/nginx.pid;\n\
                 events {{ worker_connections 2048; }}\n\
                 rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n{apps} }} }}\n\
                 http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
                 server {{ listen 127.0.0.1:{stat_port}; location /stat {{ rtmp_stat all; }} }} }}\n",
                module = peers().nginx_rtmp_module.display(),
                d = d.display(),
            )
        });
        let stat_port = *stat.lock().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], stat_port));
        assert!(
            wait_until(START_TIMEOUT, || accepts(addr)),
            "nginx's stat page on {addr} did not come up"
        );
        StatNginx {
            proc,
            _dir: dir,
            port,
            stat_port,
        }
    }

    pub fn upstream(&self) -> String {
        format!("rtmp://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("rtmp://127.0.0.1:{}/{path}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// nginx-rtmp's stat page (XML).
    pub fn stat(&self) -> String {
        let out = run_ok(
            Command::new(&peers().curl).args([
                "-s",
                "-m",
                "5",
                &format!("http://127.0.0.1:{}/stat", self.stat_port),
            ]),
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Clients nginx-rtmp lists in the streams of its applications (publishers and
    /// players; a connection that has not published or played is in no stream).
    pub fn stream_clients(&self) -> usize {
        // Each <client> element of the stat page is one publisher or player.
        self.stat().matches("<client>").count()
    }

    /// Connections nginx has accepted since it started (`naccepted`).
    pub fn accepted(&self) -> u64 {
        let s = self.stat();
        s.split("<naccepted>")
            .nth(1)
            .and_then(|r| r.split('<').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// nginx's error.log so far (at `info`: every connect, publish and play it handled).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("error.log")).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

impl Drop for StatNginx {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// A loopback listener that accepts TCP and does not speak RTMP: `Silent` reads whatever
/// comes and never answers; `Garbage` answers the RTMP handshake (so a handshake-only check
/// passes) and then sends an HTTP error instead of answering `connect`, and closes; `Close`
/// closes each connection as soon as it is accepted.
pub struct FakeBackend {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fake {
    Silent,
    Garbage,
    /// Accepts and closes at once (a backend refusing at connect time).
    Close,
}

impl FakeBackend {
    pub fn start(kind: Fake) -> FakeBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a fake backend");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        let thread = thread::spawn(move || {
            let mut conns: Vec<thread::JoinHandle<()>> = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let s2 = s.clone();
                        conns.push(thread::spawn(move || serve_fake(sock, kind, &s2)));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
            drop(listener);
            for c in conns {
                let _ = c.join();
            }
        });
        FakeBackend {
            port,
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    pub fn upstream(&self) -> String {
        format!("rtmp://127.0.0.1:{}", self.port)
    }

    /// Closes the listener and every connection (the port is free again afterwards).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_fake(mut sock: TcpStream, kind: Fake, stop: &AtomicBool) {
    if kind == Fake::Close {
        return;
    }
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 4096];
    let mut got = 0usize;
    let mut answered = false;
    while !stop.load(Ordering::Relaxed) {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => got += n,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
        if kind == Fake::Garbage && !answered && got >= 1537 {
            // S0 (version 3), S1 (zeros: a simple handshake), S2 (anything).
            let mut s = vec![0u8; S0S1S2_LEN];
            s[0] = 3;
            let _ = sock.write_all(&s);
            answered = true;
        } else if kind == Fake::Garbage && answered && got > 1537 + 1536 {
            // C2 and the connect came: not an RTMP answer.
            let _ = sock.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            return;
        }
    }
}

/// A raw RTMP client on one blocking socket: handshake, connect, and optionally play.
pub struct RawClient {
    sock: TcpStream,
    session: ClientSession,
    buf: BytesMut,
}

/// Every read of a raw client gives up after this long (its own timeout: far longer than
/// any bound a test asserts with it).
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl RawClient {
    /// Connects to `addr`, runs the handshake and `connect` to `app`; Ok once the server
    /// answered `_result`.
    pub fn connect(addr: SocketAddr, app: &str) -> Result<RawClient, String> {
        let sock = TcpStream::connect_timeout(&addr, RAW_READ_TIMEOUT)
            .map_err(|e| format!("TCP connect to {addr}: {e}"))?;
        sock.set_read_timeout(Some(RAW_READ_TIMEOUT)).unwrap();
        sock.set_nodelay(true).unwrap();
        let mut c = RawClient {
            sock,
            session: ClientSession::new(
                ClientConfig::default(),
                ChunkDecoder::new(ChunkLimits::default()),
            ),
            buf: BytesMut::new(),
        };
        let hs = ClientHandshake::new(false);
        c.sock.write_all(&hs.c0c1()).map_err(|e| e.to_string())?;
        let mut s = vec![0u8; S0S1S2_LEN];
        c.sock
            .read_exact(&mut s)
            .map_err(|e| format!("reading S0S1S2: {e}"))?;
        let c2 = hs.c2(&s).map_err(|e| e.to_string())?;
        c.sock.write_all(&c2).map_err(|e| e.to_string())?;
        let tc_url = format!("rtmp://{addr}/{app}");
        c.session
            .connect(app, &tc_url, Vec::new())
            .map_err(|e| e.to_string())?;
        c.flush()?;
        match c.next_where(|e| {
            matches!(
                e,
                ClientEvent::Reply {
                    call: Call::Connect,
                    ..
                }
            )
        })? {
            ClientEvent::Reply { ok: true, .. } => Ok(c),
            other => Err(format!("connect answered {}", other.describe())),
        }
    }

    /// createStream, then play `name` (no answer awaited: nginx-rtmp lists the player in
    /// its stat page at once).
    pub fn play(&mut self, name: &str) -> Result<(), String> {
        self.session.create_stream().map_err(|e| e.to_string())?;
        self.flush()?;
        let id = match self.next_where(|e| matches!(e, ClientEvent::StreamCreated { .. }))? {
            ClientEvent::StreamCreated { stream_id, .. } => stream_id,
            _ => 1,
        };
        self.session.play(id, name);
        self.flush()
    }

    /// createStream, then publish `name` (query included); the first status the server
    /// answers (`onStatus NetStream.Publish.Start`, `...BadName`), or Err with why not
    /// (`closed by the server` when it hangs up instead).
    pub fn publish(&mut self, name: &str) -> Result<String, String> {
        self.session.create_stream().map_err(|e| e.to_string())?;
        self.flush()?;
        let id = match self.next_where(|e| matches!(e, ClientEvent::StreamCreated { .. }))? {
            ClientEvent::StreamCreated { stream_id, .. } => stream_id,
            _ => 1,
        };
        self.session.publish(id, name);
        self.flush()?;
        let ev = self.next_where(|e| matches!(e, ClientEvent::Status { .. }))?;
        Ok(match ev {
            ClientEvent::Status {
                code, description, ..
            } => format!("onStatus {code} {description}"),
            other => other.describe(),
        })
    }

    fn flush(&mut self) -> Result<(), String> {
        if let Some(out) = self.session.take_output() {
            self.sock
                .write_all(&out)
                .map_err(|e| format!("writing: {e}"))?;
        }
        Ok(())
    }

    /// Reads until an event matching `want` (acks and pings answered on the way).
    fn next_where(&mut self, want: impl Fn(&ClientEvent) -> bool) -> Result<ClientEvent, String> {
        let mut chunk = [0u8; 8192];
        loop {
            while let Some(ev) = self
                .session
                .poll(&mut self.buf)
                .map_err(|e| e.to_string())?
            {
                if want(&ev) {
                    return Ok(ev);
                }
            }
            self.flush()?;
            let n = self
                .sock
                .read(&mut chunk)
                .map_err(|e| format!("reading: {e}"))?;
            if n == 0 {
                return Err("closed by the server".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// True if the server has closed the connection (non-blocking look).
    pub fn is_closed(&self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = self.sock.peek(&mut b);
        self.sock.set_nonblocking(false).unwrap();
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
    }

    /// Reads (discarding) until the server closes: Ok(when) at EOF or a reset, Err if its
    /// own read timeout ([`RAW_READ_TIMEOUT`]) passed first, which a test counts as a
    /// failure.
    pub fn wait_closed(&mut self) -> Result<Instant, String> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => return Ok(Instant::now()),
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err(format!(
                        "still open after its own {RAW_READ_TIMEOUT:?} timeout"
                    ))
                }
                Err(_) => return Ok(Instant::now()),
            }
        }
    }
}

/// `/metrics` from the gateway's admin listener.
pub fn metrics(admin: SocketAddr) -> String {
    let out = run_ok(
        Command::new(&peers().curl).args(["-s", "-m", "5", &format!("http://{admin}/metrics")]),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `name{upstream="G",backend="B"...}` (labels in the order printed), if
/// listed; `extra` adds labels after backend (e.g. `,to="down"`).
pub fn backend_metric(
    text: &str,
    name: &str,
    group: &str,
    backend: &str,
    extra: &str,
) -> Option<u64> {
    let series = format!("{name}{{upstream=\"{group}\",backend=\"{backend}\"{extra}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

pub fn backend_up(text: &str, group: &str, backend: &str) -> Option<u64> {
    backend_metric(text, "rtmpgate_upstream_backend_up", group, backend, "")
}

pub fn backend_clients(text: &str, group: &str, backend: &str) -> Option<u64> {
    backend_metric(
        text,
        "rtmpgate_upstream_backend_clients",
        group,
        backend,
        "",
    )
}

/// `rtmpgate_upstream_backend_transitions_total{...,to}`.
pub fn transitions(text: &str, group: &str, backend: &str, to: &str) -> Option<u64> {
    backend_metric(
        text,
        "rtmpgate_upstream_backend_transitions_total",
        group,
        backend,
        &format!(",to=\"{to}\""),
    )
}
