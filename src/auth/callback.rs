//! HTTP callbacks compatible with nginx-rtmp's `on_connect`, `on_publish`, `on_play` and
//! `on_done`: the same form-encoded POST (fields, order, `call` values, the client's query
//! arguments appended), so an auth service written for nginx-rtmp works unchanged.
//!
//! What nginx-rtmp 1.2 sends (captured from `libnginx-mod-rtmp` in `tests/auth_nginx.rs`):
//!
//! ```text
//! connect: app flashver swfurl tcurl pageurl addr epoch call=connect  + connect's ?args
//! publish: app flashver swfurl tcurl pageurl addr clientid call=publish name type=live + args
//! play:    app flashver swfurl tcurl pageurl addr clientid call=play name start duration reset + args
//! done:    app flashver swfurl tcurl pageurl addr clientid call=done name + args
//! ```
//!
//! The answer: 2xx allows; 3xx with a `Location` renames the stream of a publish or play (a
//! `Location` holding a URL, which nginx-rtmp takes as a relay, denies here); anything else,
//! or no answer within `callback_timeout_ms`, denies. One connection per call
//! (`Connection: close`, as nginx-rtmp does), the response head bounded to 16 KiB and its
//! body never read. At most `limits.max_auth_callbacks` calls are out at once; a call that
//! cannot get a slot within its timeout denies. Positive answers may be cached for
//! `callback_cache_secs`, in at most `limits.max_auth_cache_entries` entries.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, LOCATION};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::rules::{AuthSettings, CallbackUrl};
use super::{split_query, Action, AuthRequest, Decision, DenyReason};
use crate::throttle::LogThrottle;

/// Bytes of a response head (status line and headers) we read at most.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The callback client: the in-flight bound, the cache of positive answers.
pub struct Callbacks {
    timeout: Duration,
    cache_ttl: Duration,
    max_cache: usize,
    max_name_len: usize,
    slots: Arc<Semaphore>,
    cache: Mutex<HashMap<[u8; 32], (Instant, Decision)>>,
    log: Arc<LogThrottle>,
}

impl Callbacks {
    pub fn new(s: &AuthSettings) -> Callbacks {
        Callbacks {
            timeout: s.callback_timeout,
            cache_ttl: s.cache_ttl,
            max_cache: s.max_cache_entries,
            max_name_len: s.max_name_len,
            slots: Arc::new(Semaphore::new(s.max_callbacks)),
            cache: Mutex::new(HashMap::new()),
            log: Arc::new(LogThrottle::new()),
        }
    }

    /// Asks `url` about `req`; at most the callback timeout (a free slot included).
    pub async fn ask(&self, url: &CallbackUrl, req: &AuthRequest) -> Decision {
        // The SHA-256 of what was asked, not the text: an entry costs 32 bytes whatever the
        // client sent.
        let cache_key = (!self.cache_ttl.is_zero() && self.max_cache > 0).then(|| {
            let mut h = Sha256::new();
            h.update(url.to_string().as_bytes());
            h.update(b"\n");
            h.update(form(req, false).as_bytes());
            <[u8; 32]>::from(h.finalize())
        });
        if let Some(k) = &cache_key {
            if let Some(d) = self.cached(k) {
                return d;
            }
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let Ok(Ok(_permit)) =
            tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await
        else {
            return Decision::Deny(DenyReason::CallbackBusy);
        };
        let d = match tokio::time::timeout_at(deadline, post(url, form(req, true))).await {
            Err(_) => Decision::Deny(DenyReason::CallbackTimeout),
            Ok(Err(e)) => {
                if let Some(also) = self.log.should_log("callback failures") {
                    warn!(
                        "auth: on_{} callback {url} failed: {e}; the {} is denied (is the auth \
                         service up?){also}",
                        req.action, req.action
                    );
                }
                Decision::Deny(DenyReason::CallbackError)
            }
            Ok(Ok((status, location))) => self.interpret(req.action, status, location.as_deref()),
        };
        if let (Some(k), Decision::Allow | Decision::Rename(_)) = (cache_key, &d) {
            self.remember(k, d.clone());
        }
        d
    }

    /// Sends a `done` notice in the background; dropped when no slot is free.
    pub fn notify(&self, url: CallbackUrl, req: AuthRequest) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            debug!(
                "auth: on_done for {} dropped: every callback slot is busy",
                req.target()
            );
            return;
        };
        let timeout = self.timeout;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _permit = permit;
            let r = tokio::time::timeout(timeout, post(&url, form(&req, true))).await;
            if !matches!(r, Ok(Ok(_))) {
                debug!(
                    "auth: on_done callback {url} for {} got no answer",
                    req.target()
                );
            }
        });
    }

    fn interpret(&self, action: Action, status: StatusCode, location: Option<&str>) -> Decision {
        if status.is_success() {
            return Decision::Allow;
        }
        if !status.is_redirection() {
            return Decision::Deny(DenyReason::CallbackDenied);
        }
        if action == Action::Connect {
            return Decision::Allow;
        }
        // nginx-rtmp: the new stream name is the Location; a URL there means a relay, which
        // is not done here.
        let Some(loc) = location else {
            return Decision::Deny(DenyReason::CallbackError);
        };
        let (name, _) = split_query(loc);
        let name = name.trim_matches('/');
        if name.is_empty()
            || name.contains("://")
            || name.len() > self.max_name_len
            || name.chars().any(char::is_control)
        {
            return Decision::Deny(DenyReason::CallbackError);
        }
        Decision::Rename(name.to_owned())
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Decision> {
        let cache = self.cache.lock().ok()?;
        let (at, d) = cache.get(key)?;
        (at.elapsed() < self.cache_ttl).then(|| d.clone())
    }

    fn remember(&self, key: [u8; 32], d: Decision) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= self.max_cache {
            let ttl = self.cache_ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        if cache.len() >= self.max_cache {
            // Still full of fresh answers: this one is not kept (the bound holds).
            return;
        }
        cache.insert(key, (Instant::now(), d));
    }
}

/// The form body nginx-rtmp sends for `req` (`with_client` adds the per-connection fields
/// `clientid` and `epoch`, left out of cache keys).
pub fn form(req: &AuthRequest, with_client: bool) -> String {
    let mut f = Form::default();
    f.add("app", &req.app);
    f.add("flashver", &req.flash_ver);
    f.add("swfurl", &req.swf_url);
    f.add("tcurl", &req.tc_url);
    f.add("pageurl", &req.page_url);
    f.add("addr", &super::token::addr_text(req.addr));
    match req.action {
        Action::Connect => {
            if with_client {
                f.add("epoch", "0");
            }
            f.add("call", "connect");
            for (k, v) in &req.connect_args {
                f.add(k, v);
            }
        }
        action => {
            if with_client {
                f.add("clientid", &req.client_id.to_string());
            }
            f.add("call", action.as_str());
            f.add("name", &req.name);
            match action {
                Action::Publish => f.add("type", "live"),
                Action::Play => {
                    // RTMP's defaults for play's start (-2: live, else recorded),
                    // duration (-1: to the end) and reset.
                    f.add("start", "-2");
                    f.add("duration", "-1");
                    f.add("reset", "0");
                }
                _ => {}
            }
            for (k, v) in &req.args {
                f.add(k, v);
            }
        }
    }
    f.0
}

#[derive(Default)]
struct Form(String);

impl Form {
    fn add(&mut self, k: &str, v: &str) {
        if !self.0.is_empty() {
            self.0.push('&');
        }
        escape(&mut self.0, k);
        self.0.push('=');
        escape(&mut self.0, v);
    }
}

/// `application/x-www-form-urlencoded`: everything but RFC 3986's unreserved characters
/// escaped.
fn escape(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// One POST; the status and `Location`. The caller bounds the time; dropping the future
/// closes the connection.
async fn post(url: &CallbackUrl, body: String) -> Result<(StatusCode, Option<String>), String> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_RESPONSE_HEAD)
        .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP setup failed: {e}"))?;
    let host = if url.port == 80 {
        url.host.clone()
    } else if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let req = Request::post(url.path.as_str())
        .header(HOST, host)
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(CONNECTION, "close")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("bad request: {e}"))?;
    // The connection is driven here, not in a spawned task, so nothing outlives the caller's
    // timeout.
    let conn = conn;
    tokio::pin!(conn);
    let send = sender.send_request(req);
    tokio::pin!(send);
    let resp = tokio::select! {
        biased;
        r = &mut send => r,
        r = &mut conn => match r {
            // The server answered and closed (HTTP/1.0, Connection: close): the answer is
            // already with the request's future.
            Ok(()) => send.await,
            Err(e) => return Err(format!("the connection failed: {e}")),
        },
    }
    .map_err(|e| format!("no answer: {e}"))?;
    let location = resp
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((resp.status(), location))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rtmp::amf0::Amf0Value;

    #[test]
    fn form_matches_nginx_rtmp_field_order() {
        let obj = Amf0Value::object(vec![
            ("app", Amf0Value::string("live?tcq=1")),
            (
                "tcUrl",
                Amf0Value::string("rtmp://127.0.0.1:1935/live?tcq=1"),
            ),
            (
                "flashVer",
                Amf0Value::string("FMLE/3.0 (compatible; Lavf59.27.100)"),
            ),
        ]);
        let c = AuthRequest::connect("::ffff:127.0.0.1".parse().unwrap(), 6, Some(&obj));
        assert_eq!(
            form(&c, true),
            "app=live&flashver=FMLE%2F3.0%20%28compatible%3B%20Lavf59.27.100%29&swfurl=\
             &tcurl=rtmp%3A%2F%2F127.0.0.1%3A1935%2Flive%3Ftcq%3D1&pageurl=&addr=127.0.0.1\
             &epoch=0&call=connect&tcq=1"
        );
        let p = c.for_stream(Action::Publish, "cam1?token=abc&expires=123");
        assert!(form(&p, true).ends_with(
            "&addr=127.0.0.1&clientid=6&call=publish&name=cam1&type=live&token=abc&expires=123"
        ));
        assert!(!form(&p, false).contains("clientid"));
        let d = p.done();
        assert!(form(&d, true).ends_with("&clientid=6&call=done&name=cam1&token=abc&expires=123"));
    }

    #[test]
    fn what_a_client_sends_bounds_the_body() {
        // Every field and the name's query at the AMF string limit (1 MiB): the body stays
        // within a few times max_name_len (escaping triples a byte at most).
        let huge = "\u{1}".repeat(1 << 20);
        let obj = Amf0Value::object(vec![
            ("app", Amf0Value::string(format!("live?{huge}"))),
            ("tcUrl", Amf0Value::string(huge.clone())),
            ("swfUrl", Amf0Value::string(huge.clone())),
            ("pageUrl", Amf0Value::string(huge.clone())),
            ("flashVer", Amf0Value::string(huge.clone())),
        ]);
        let max = 1024;
        let c = AuthRequest::connect_bounded("127.0.0.1".parse().unwrap(), 1, Some(&obj), max);
        let p = c.for_stream(Action::Publish, &format!("cam?a={huge}"));
        for r in [&c, &p] {
            let body = form(r, true).len();
            assert!(body <= 3 * 8 * max, "{body} bytes");
        }
    }
}
