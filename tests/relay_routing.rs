//! The connect-aware relay with real peers: routing by app to two nginx-rtmp backends
//! (proved by playing straight from the backend), failover past a dead backend, health
//! checks marking a killed backend down and a restarted one up (log and /metrics), the
//! relay behind rtmps:// and rtmpt:// listeners and in front of an rtmps:// backend, and
//! `relay = "bytes"` with failover. Frames are compared with the source (framemd5, whole
//! run), so the backend got exactly the client's chunk stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::*;

const SECONDS: u32 = 5;

/// nginx-rtmp with these applications (each `live on`), on `port` or a free one.
struct Backend {
    proc: Proc,
    _dir: TempDir,
    port: u16,
}

impl Backend {
    fn start(apps: &[&str], port: Option<u16>) -> Backend {
        let apps: String = apps
            .iter()
            .map(|a| format!("  application {a} {{ live on; record off; }}\n"))
            .collect();
        let (proc, dir, port) = spawn_nginx_rtmp(port, |d, port| {
            format!(
                "load_module {module};\n\
                 worker_processes 1; daemon off; master_process off;\n\
                 error_log {d}/error.log warn; pid {d}/nginx.pid;\n\
                 events {{ worker_connections 1024; }}\n\
                 rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n{apps} }} }}\n",
                module = peers().nginx_rtmp_module.display(),
                d = d.display(),
            )
        });
        Backend {
            proc,
            _dir: dir,
            port,
        }
    }

    fn upstream(&self) -> String {
        format!("rtmp://127.0.0.1:{}", self.port)
    }

    fn url(&self, path: &str) -> String {
        format!("rtmp://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// `/metrics` from the admin listener (curl, bounded).
fn metrics(admin: SocketAddr) -> String {
    let out = run_ok(
        Command::new("curl").args(["-s", "-m", "5", &format!("http://{admin}/metrics")]),
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of `rtmpgate_upstream_backend_up` for `backend`, if listed.
fn backend_up(text: &str, backend: &str) -> Option<u8> {
    let needle = format!("backend=\"{backend}\"");
    text.lines()
        .filter(|l| l.starts_with("rtmpgate_upstream_backend_up{") && l.contains(&needle))
        .find_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
}

/// App `live` goes to backend 1, apps `cam*` to backend 2: a stream published through the
/// gateway plays straight from its backend, and through the gateway, frame for frame.
#[test]
fn routes_each_app_to_its_group_frame_exact() {
    let p = peers();
    let b1 = Backend::start(&["live"], None);
    let b2 = Backend::start(&["live", "cam1"], None);
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\n\n\
             [[upstreams]]\nname = \"one\"\napps = [\"live\"]\nbackends = [\"{}\"]\n\n\
             [[upstreams]]\nname = \"two\"\napps = [\"cam*\"]\nbackends = [\"{}\"]\n",
            b1.upstream(),
            b2.upstream()
        ))
        .start();
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);

    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/a", gw.url("rtmp")),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, b1.url("live/a")),
            (PlayerKind::Rtmpdump, format!("{}/live/a", gw.url("rtmp"))),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }

    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/cam1/b", gw.url("rtmp")),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, b2.url("cam1/b")),
            (PlayerKind::Ffmpeg, format!("{}/cam1/b", gw.url("rtmp"))),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    // An app no group serves (there is no default group) is refused with a reason.
    let out = run_capture(
        Command::new(&p.ffmpeg).args([
            "-nostdin",
            "-hide_banner",
            "-rw_timeout",
            "5000000",
            "-i",
            &format!("{}/other/x", gw.url("rtmp")),
            "-f",
            "null",
            "-",
        ]),
        Duration::from_secs(20),
    );
    assert!(out.0.is_some_and(|s| !s.success()));
    assert!(
        gw.wait_log(
            "no upstream group serves app 'other'",
            Duration::from_secs(5)
        ),
        "{}",
        gw.log()
    );
}

/// A group of three: a dead address, backend 1, backend 2 (`balance = "first"`). Clients
/// skip the dead one without noticing; the health check marks it down; backend 1 is killed:
/// marked down (log, /metrics) and new clients land on backend 2; backend 1 restarted on
/// its port: marked up again.
#[test]
fn fails_over_and_health_checks_mark_backends_down_and_up() {
    let p = peers();
    let dead = format!("rtmp://127.0.0.1:{}", free_port());
    let b1 = Backend::start(&["live"], None);
    let b2 = Backend::start(&["live"], None);
    let b1_port = b1.port;
    let b1_url = b1.upstream();
    let gw = Gateway::builder()
        .args(&["--listen", "rtmp://127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .config(&format!(
            "[upstream]\nrelay = \"connect\"\nhealth_interval_secs = 1\nhealth_rise = 2\nhealth_fall = 1\n\n\
             [[upstreams]]\nname = \"pool\"\nbackends = [\"{dead}\", \"{b1_url}\", \"{}\"]\n\
             balance = \"first\"\nhealth_check = \"tcp\"\n",
            b2.upstream()
        ))
        .start();
    let admin = admin_addr(&gw);
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);

    // The dead backend is skipped (by its health check, or by the client's own connect).
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/a", gw.url("rtmp")),
        &src_file,
        &[(PlayerKind::Rtmpdump, b1.url("live/a"))],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    assert!(
        gw.wait_log(
            &format!("backend {dead} marked down"),
            Duration::from_secs(5)
        ),
        "{}",
        gw.log()
    );
    let m = metrics(admin);
    assert_eq!(backend_up(&m, &dead), Some(0), "{m}");
    assert_eq!(backend_up(&m, &b1_url), Some(1), "{m}");
    assert_eq!(backend_up(&m, &b2.upstream()), Some(1), "{m}");

    // Backend 1 dies: the check marks it down within a few intervals.
    drop(b1);
    assert!(
        gw.wait_log(
            &format!("backend {b1_url} marked down"),
            Duration::from_secs(10)
        ),
        "{}",
        gw.log()
    );
    assert_eq!(backend_up(&metrics(admin), &b1_url), Some(0));
    // New clients land on backend 2.
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/b", gw.url("rtmp")),
        &src_file,
        &[
            (PlayerKind::Rtmpdump, b2.url("live/b")),
            (PlayerKind::Ffmpeg, format!("{}/live/b", gw.url("rtmp"))),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }

    // Back on its port: two passing checks mark it up.
    let _b1 = Backend::start(&["live"], Some(b1_port));
    assert!(
        gw.wait_log(
            &format!("backend {b1_url} marked up"),
            Duration::from_secs(10)
        ),
        "{}",
        gw.log()
    );
    assert_eq!(backend_up(&metrics(admin), &b1_url), Some(1));
}

/// `relay = "bytes"` (today's blind copy) with two URLs from the command line: the first
/// refuses, the client is copied to the second, frames exact.
#[test]
fn bytes_mode_fails_over_at_tcp_connect() {
    let p = peers();
    let dead = format!("rtmp://127.0.0.1:{}", free_port());
    let b = Backend::start(&["live"], None);
    let gw = Gateway::builder()
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--upstream",
            &dead,
            "--upstream",
            &b.upstream(),
        ])
        .config("[upstream]\nrelay = \"bytes\"\n")
        .start();
    assert!(gw.log_contains("relay = bytes"), "{}", gw.log());
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let url = format!("{}/live/s", gw.url("rtmp"));
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &url,
        &src_file,
        &[(PlayerKind::Ffmpeg, url.clone())],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
    assert!(gw.expect_log(&format!("backend {dead} marked down")));
}

/// `[auth]` governs relayed clients too (the relay switches to connect mode for it): a
/// publisher with a good key reaches the backend frame for frame; one with a wrong key is
/// answered with the reason before the backend ever sees its publish.
#[test]
fn auth_checks_relayed_publishers() {
    let p = peers();
    let b = Backend::start(&["live"], None);
    let gw = Gateway::builder()
        .args(&[
            "--listen",
            "rtmp://127.0.0.1:0",
            "--upstream",
            &b.upstream(),
        ])
        .config("[auth.publish_keys]\nlive = [\"k1\"]\n")
        .start();
    assert!(gw.log_contains("relay = connect"), "{}", gw.log());
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/k1", gw.url("rtmp")),
        &src_file,
        &[(PlayerKind::Rtmpdump, b.url("live/k1"))],
    );
    for r in &got {
        r.assert_run_of(&src);
    }

    // A wrong key: ffmpeg fails with the gateway's reason.
    let (status, _, err) = run_capture(
        Command::new(&p.ffmpeg).args([
            "-nostdin",
            "-hide_banner",
            "-re",
            "-i",
            src_file.to_str().unwrap(),
            "-c",
            "copy",
            "-f",
            "flv",
            &format!("{}/live/wrong", gw.url("rtmp")),
        ]),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&err);
    assert!(status.is_some_and(|s| !s.success()), "{err}");
    assert!(
        err.contains("stream key is not valid"),
        "ffmpeg did not get the reason:\n{err}"
    );
    assert!(
        gw.wait_log("publish 'wrong' denied", Duration::from_secs(5)),
        "{}",
        gw.log()
    );
}

/// The connect-aware relay behind every transport and in front of a TLS backend: publish
/// over rtmps, play over rtmpt (HTTP tunnel), rtmpe (static ffmpeg) and rtmpts, the backend
/// reached as rtmps:// through stunnel with the test CA; frames exact.
#[test]
fn connect_relay_over_tunnel_rtmpe_and_tls_both_sides() {
    let p = peers();
    let certs = dev_certs();
    let b = Backend::start(&["live"], None);
    let tls_front = Stunnel::start(SocketAddr::from(([127, 0, 0, 1], b.port)), TlsMode::Server);
    let upstream = format!("rtmps://127.0.0.1:{}", tls_front.port());
    let gw = Gateway::builder()
        .rtmp_and_rtmps()
        .args(&[
            "--upstream",
            &upstream,
            "--upstream-ca",
            certs.ca.to_str().unwrap(),
        ])
        .config("[upstream]\nrelay = \"connect\"\n")
        .start();
    assert!(gw.log_contains("relay = connect"), "{}", gw.log());
    let dir = temp_dir();
    let src_file = source_flv(SECONDS);
    let src = framemd5(&src_file);
    let got = publish_and_play(
        dir.path(),
        &p.ffmpeg,
        &format!("{}/live/t", gw.url("rtmps")),
        &src_file,
        &[
            (PlayerKind::Ffmpeg, format!("{}/live/t", gw.url("rtmpt"))),
            (
                PlayerKind::StaticFfmpeg,
                format!("{}/live/t", gw.url("rtmpe")),
            ),
            (PlayerKind::Ffmpeg, format!("{}/live/t", gw.url("rtmpts"))),
        ],
    );
    for r in &got {
        r.assert_run_of(&src);
    }
}
