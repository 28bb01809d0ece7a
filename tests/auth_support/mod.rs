//! Helpers for the authorization tests: one-shot publishers and players whose stderr is
//! kept (the denial status is asserted on it), the gateway's metrics, and a real HTTP auth
//! service (Python's http.server) that answers nginx-rtmp style callbacks and records them.
#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::common::*;

/// What a one-shot client did: its exit status (None: killed at the deadline) and stderr.
pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Asserts the client failed and printed `needle` (the status the gateway sent).
    pub fn assert_denied(&self, what: &str, needle: &str) {
        assert!(
            !self.ok(),
            "{what}: the client succeeded but should have been denied; stderr:\n{}",
            self.stderr
        );
        assert!(
            self.status.is_some(),
            "{what}: the client hung (killed at the deadline) instead of seeing a denial; \
             stderr:\n{}",
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "{what}: the client's stderr does not show {needle:?}:\n{}",
            self.stderr
        );
    }

    pub fn assert_ok(&self, what: &str) {
        assert!(
            self.ok(),
            "{what}: the client failed ({:?}); stderr:\n{}",
            self.status,
            self.stderr
        );
    }
}

/// Bound on every one-shot client: a 1 s source published in real time, or a denial.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Publishes a 1 s source to `url` with Debian's ffmpeg (rtmp, rtmps, rtmpt, rtmpts).
pub fn ffmpeg_publish(url: &str) -> Outcome {
    let src = source_flv(1);
    let mut cmd = Command::new(&peers().ffmpeg);
    cmd.args([
        "-nostdin",
        "-hide_banner",
        "-loglevel",
        "warning",
        "-re",
        "-i",
    ])
    .arg(&src)
    .args(["-c", "copy", "-f", "flv", url]);
    let (status, _, stderr) = run_capture(&mut cmd, CLIENT_TIMEOUT);
    Outcome {
        status,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Plays `url` with ffmpeg for at most 2 s of media (`-t 2`), discarding it.
pub fn ffmpeg_play(url: &str) -> Outcome {
    let mut cmd = Command::new(&peers().ffmpeg);
    cmd.args(["-nostdin", "-hide_banner", "-loglevel", "warning"])
        .args([
            "-rw_timeout",
            "5000000",
            "-i",
            url,
            "-t",
            "2",
            "-f",
            "null",
            "-",
        ]);
    let (status, _, stderr) = run_capture(&mut cmd, CLIENT_TIMEOUT);
    Outcome {
        status,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Plays `url` with rtmpdump (live, gives up after 3 s without data).
pub fn rtmpdump_play(url: &str) -> Outcome {
    rtmpdump_play_for(url, 3)
}

/// Plays `url` with rtmpdump, giving up after `secs` without data.
pub fn rtmpdump_play_for(url: &str, secs: u32) -> Outcome {
    let mut cmd = Command::new(&peers().rtmpdump);
    cmd.args(["-m", &secs.to_string(), "-v", "-r", url, "-o", "/dev/null"]);
    let (status, _, stderr) = run_capture(&mut cmd, CLIENT_TIMEOUT);
    Outcome {
        status,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// `/metrics` as text.
pub fn metrics_text(admin: SocketAddr) -> String {
    let reply = curl_get(&format!("http://{admin}/metrics"));
    assert!(!reply.is_empty(), "no answer from /metrics on {admin}");
    reply
}

fn curl_get(url: &str) -> String {
    let mut cmd = Command::new(&peers().curl);
    cmd.args(["-s", "--max-time", "5", url]);
    String::from_utf8_lossy(&run_ok(&mut cmd, Duration::from_secs(10))).into_owned()
}

/// The value of one series (`name{labels}` exactly as printed), 0 if absent.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `rtmpgate_auth_denied_total{action="A",reason="R"}`.
pub fn denied(text: &str, action: &str, reason: &str) -> u64 {
    metric(
        text,
        &format!("rtmpgate_auth_denied_total{{action=\"{action}\",reason=\"{reason}\"}}"),
    )
}

/// The gateway binary (for `rtmpgate token`).
pub fn rtmpgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rtmpgate"))
}

// ---------------------------------------------------------------------------------------------
// The auth service
// ---------------------------------------------------------------------------------------------

/// The service's answers, by the `name` (or `app`) it is asked about: names containing
/// `deny` get 403, `slow` wait 4 s first (or until the caller hangs up, recorded as a
/// `PATH#end` entry with the wait's start), names starting with `rename` get 302 with
/// `Location: renamed`, the app `denyapp` gets 403 at connect; everything else 200. Each
/// request is appended to a file as one JSON line: path, content type, form fields in order.
const SERVICE: &str = r#"
import http.server, json, select, sys, time, urllib.parse
log = open(sys.argv[1], 'a', buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'
    def do_POST(self):
        n = int(self.headers.get('Content-Length', 0))
        body = self.rfile.read(n).decode()
        fields = urllib.parse.parse_qsl(body, keep_blank_values=True)
        log.write(json.dumps({'path': self.path, 't': time.time(),
                              'ct': self.headers.get('Content-Type'),
                              'fields': fields}) + '\n')
        d = dict(fields)
        name, app = d.get('name', ''), d.get('app', '')
        if 'slow' in name:
            # Up to 4 s, or until the caller hangs up (then when is recorded).
            t0 = time.time()
            select.select([self.connection], [], [], 4)
            log.write(json.dumps({'path': self.path + '#end', 't': time.time(),
                                  'start': t0, 'fields': []}) + '\n')
        code, loc = 200, None
        if 'deny' in name or app == 'denyapp':
            code = 403
        elif name.startswith('rename'):
            code, loc = 302, 'renamed'
        try:
            self.send_response(code)
            if loc:
                self.send_header('Location', loc)
            self.send_header('Content-Length', '0')
            self.end_headers()
        except OSError:
            pass
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)
s.daemon_threads = True
print('port', s.server_address[1], flush=True)
s.serve_forever()
"#;

/// One recorded callback.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    /// When the service received it (Unix seconds); for a `#end` entry, when the caller
    /// hung up or the wait ended.
    pub t: f64,
    /// For a `#end` entry: when that call came.
    pub start: f64,
    pub content_type: String,
    pub fields: Vec<(String, String)>,
}

impl Call {
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    pub fn keys(&self) -> Vec<&str> {
        self.fields.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// The running service (killed when dropped).
pub struct AuthService {
    proc: Proc,
    log: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl AuthService {
    pub fn start() -> AuthService {
        let dir = temp_dir();
        let script = dir.path().join("auth_service.py");
        fs::write(&script, SERVICE).expect("cannot write the auth service");
        let log = dir.path().join("calls.jsonl");
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(&log);
        let mut proc = Proc::spawn("auth service", cmd);
        let mut port = 0;
        let up = wait_until(Duration::from_secs(10), || {
            port = proc
                .log()
                .lines()
                .find_map(|l| l.trim().strip_prefix("port ")?.parse().ok())
                .unwrap_or(0);
            port != 0 || !proc.is_running()
        });
        assert!(
            up && port != 0,
            "the auth service did not start: {}",
            proc.log()
        );
        AuthService {
            proc,
            log,
            port,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| Call {
                path: v["path"].as_str().unwrap_or_default().to_owned(),
                t: v["t"].as_f64().unwrap_or_default(),
                start: v["start"].as_f64().unwrap_or_default(),
                content_type: v["ct"].as_str().unwrap_or_default().to_owned(),
                fields: v["fields"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|p| {
                                (
                                    p[0].as_str().unwrap_or_default().to_owned(),
                                    p[1].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// Calls to paths starting with `prefix`.
    pub fn calls_to(&self, prefix: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path.starts_with(prefix))
            .collect()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// nginx-rtmp on a loopback port with `application live` and its callbacks (`on_connect`
/// at server level, the others in the application) pointing at `service` paths under
/// `/nginx/`. One process, killed when dropped.
pub struct NginxWithCallbacks {
    proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl NginxWithCallbacks {
    pub fn start(service: &AuthService) -> NginxWithCallbacks {
        let u = |call: &str| service.url(&format!("/nginx/{call}"));
        let (proc, dir, port) = spawn_nginx_rtmp(None, |d, port| {
            let d = d.display();
            format!(
                "load_module {module};\n\
                 worker_processes 1; daemon off; master_process off;\n\
                 error_log {d}/error.log warn; pid {d}/nginx.pid;\n\
                 events {{ worker_connections 256; }}\n\
                 rtmp {{ server {{ listen 127.0.0.1:{port}; chunk_size 4096;\n\
                 on_connect {c};\n\
                 application live {{ live on; record off; on_publish {p}; on_play {pl}; on_done {dn}; }} }} }}\n",
                module = peers().nginx_rtmp_module.display(),
                c = u("connect"),
                p = u("publish"),
                pl = u("play"),
                dn = u("done"),
            )
        });
        NginxWithCallbacks {
            proc,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("rtmp://127.0.0.1:{}/{path}", self.port)
    }
}

/// Reads the README.
pub fn readme() -> String {
    fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("cannot read README.md")
}
