//! Authorization of `connect`, `publish` and `play`: one decision shared by the engine and
//! the relay.
//!
//! A caller builds an [`AuthRequest`] from what the client sent (connect's app, tcUrl,
//! swfUrl, pageUrl, flashVer, and the stream name with its `?query`) and asks
//! [`Auth::authorize`] for a [`Decision`]. The rules, all of which must pass, in this order
//! (the cheap, local ones first, so a denied address never costs an HTTP call):
//!
//! 1. address allow/deny lists (CIDR) per app and action ([`rules`]);
//! 2. static keys per app (`publish_keys`, `play_keys`): the stream name is a key or carries
//!    one as `?key=`;
//! 3. signed tokens (`?token=HEX&expires=UNIX`, HMAC-SHA256, [`token`]) on the stream name
//!    or on connect's app (the tcUrl query);
//! 4. an HTTP callback compatible with nginx-rtmp's `on_connect`/`on_publish`/`on_play`
//!    ([`callback`]): 2xx allows, 3xx with `Location` renames the stream, anything else (or
//!    no answer within the timeout) denies. The relay cannot rename (it forwards the
//!    client's bytes): it asks [`Auth::authorize_unrenamed`], for which a rename denies.
//!
//! Every denial is logged (the stream name without its query: never a token or a key given
//! as `?key=`) and counted in `rtmpgate_auth_denied_total{action,reason}`; the client gets
//! [`DenyReason::status_description`], from the engine and the relay alike.

pub mod callback;
pub mod metrics;
pub mod rules;
pub mod token;

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::rtmp::amf0::Amf0Value;
use crate::throttle::LogThrottle;

pub use rules::{AuthSettings, FileAuth};

/// What the client asks for. `Done` is the notice sent when a publish or play ends
/// (nginx-rtmp's `on_done`); it is never denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Connect,
    Publish,
    Play,
    Done,
}

impl Action {
    /// The three actions that can be denied, in the order the metrics print them.
    pub const DECIDED: [Action; 3] = [Action::Connect, Action::Publish, Action::Play];

    /// The `call` field of nginx-rtmp's callbacks, and the `action` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Publish => "publish",
            Action::Play => "play",
            Action::Done => "done",
        }
    }

    fn index(self) -> usize {
        match self {
            Action::Connect => 0,
            Action::Publish => 1,
            Action::Play => 2,
            Action::Done => 3,
        }
    }

    /// The status a denied client is sent: connect's `_error` carries
    /// `NetConnection.Connect.Rejected`, publish and play an `onStatus` at level `error`.
    /// ffmpeg prints the description of any of them ("Server error: ..."); librtmp
    /// (rtmpdump) closes at once on `NetStream.Play.Failed`.
    pub fn denial_code(self) -> &'static str {
        match self {
            Action::Connect | Action::Done => "NetConnection.Connect.Rejected",
            Action::Publish => "NetStream.Publish.BadName",
            Action::Play => "NetStream.Play.Failed",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request was denied: the `reason` label of `rtmpgate_auth_denied_total` (a fixed,
/// small set: never anything the client chose).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The client's address is in a deny list or outside a non-empty allow list.
    Address,
    /// The app has keys and the stream name is none of them (nor carries one as `?key=`).
    Key,
    /// A token is required and the request carries none.
    TokenMissing,
    /// The token's `expires` is in the past.
    TokenExpired,
    /// The token does not match (wrong secret, stream, app or address, or malformed).
    TokenInvalid,
    /// The callback answered with a status other than 2xx or 3xx.
    CallbackDenied,
    /// The callback did not answer within `callback_timeout_ms`.
    CallbackTimeout,
    /// The callback could not be reached, or answered something unusable (a 3xx without a
    /// usable `Location`, a redirect to an `rtmp://` URL).
    CallbackError,
    /// `limits.max_auth_callbacks` callbacks were already waiting for an answer.
    CallbackBusy,
    /// The callback renamed a relayed client's stream (3xx `Location`), which the relay
    /// cannot do: it forwards the client's bytes unchanged.
    RenameUnsupported,
}

impl DenyReason {
    pub const ALL: [DenyReason; 10] = [
        DenyReason::Address,
        DenyReason::Key,
        DenyReason::TokenMissing,
        DenyReason::TokenExpired,
        DenyReason::TokenInvalid,
        DenyReason::CallbackDenied,
        DenyReason::CallbackTimeout,
        DenyReason::CallbackError,
        DenyReason::CallbackBusy,
        DenyReason::RenameUnsupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Address => "address",
            DenyReason::Key => "key",
            DenyReason::TokenMissing => "token_missing",
            DenyReason::TokenExpired => "token_expired",
            DenyReason::TokenInvalid => "token_invalid",
            DenyReason::CallbackDenied => "callback_denied",
            DenyReason::CallbackTimeout => "callback_timeout",
            DenyReason::CallbackError => "callback_error",
            DenyReason::CallbackBusy => "callback_busy",
            DenyReason::RenameUnsupported => "rename_unsupported",
        }
    }

    /// What the client is told (and the log says): what failed and what to do.
    pub fn description(self) -> &'static str {
        match self {
            DenyReason::Address => "your address is not allowed to do this",
            DenyReason::Key => "the stream key is not valid for this application",
            DenyReason::TokenMissing => "a token is required (?token=...&expires=...)",
            DenyReason::TokenExpired => "the token has expired; get a new one",
            DenyReason::TokenInvalid => "the token is not valid for this stream",
            DenyReason::CallbackDenied => "the authorization server refused",
            DenyReason::CallbackTimeout => "the authorization server did not answer in time",
            DenyReason::CallbackError => "the authorization server could not be asked",
            DenyReason::CallbackBusy => "too many authorizations pending; try again",
            DenyReason::RenameUnsupported => {
                // With its code and action it stays under ffmpeg's 255 characters.
                "the authorization server renamed the stream, which the relay cannot do (it \
                 forwards the client's bytes unchanged); serve this app from the engine, or \
                 have the callback answer 2xx"
            }
        }
    }

    /// The description a denied client gets with `action`'s status code (the engine and
    /// the relay both send it): `NetStream.Publish.BadName: publish denied (token_missing):
    /// a token is required (?token=...&expires=...).`
    pub fn status_description(self, action: Action) -> String {
        format!(
            "{}: {action} denied ({self}): {}.",
            action.denial_code(),
            self.description()
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer to an [`AuthRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Allowed, under another stream name (a callback's 3xx `Location`).
    Rename(String),
    Deny(DenyReason),
}

/// Everything a rule or a callback may look at. Names are kept as the client sent them,
/// split from their query; the lengths are bounded by the codec's `max_amf_string` and the
/// caller's `max_name_len` checks.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    pub action: Action,
    /// The client's address (after a PROXY header, when one is trusted).
    pub addr: IpAddr,
    /// connect's `app` without its query.
    pub app: String,
    /// The stream name without its query (empty for connect).
    pub name: String,
    pub tc_url: String,
    pub swf_url: String,
    pub page_url: String,
    pub flash_ver: String,
    /// The query of connect's `app` (how a `?query` on the tcUrl reaches the server).
    pub connect_args: Vec<(String, String)>,
    /// The query of the stream name (publish and play).
    pub args: Vec<(String, String)>,
    /// The connection's number, sent as nginx-rtmp's `clientid`.
    pub client_id: u64,
    /// Bytes kept of each field and of each name with its query (`limits.max_name_len`):
    /// what one client can make a request (a callback's body, a held command) hold.
    max_len: usize,
}

/// Query pairs kept from one name; more are ignored (a peer must not make a list grow).
pub const MAX_ARGS: usize = 32;

impl AuthRequest {
    /// The request for a client's `connect`, from its command object, each field cut to the
    /// default `limits.max_name_len`; [`AuthRequest::connect_bounded`] takes the configured one.
    pub fn connect(addr: IpAddr, client_id: u64, object: Option<&Amf0Value>) -> AuthRequest {
        let max_len = crate::limits::Limits::default().max_name_len;
        AuthRequest::connect_bounded(addr, client_id, object, max_len)
    }

    /// The request for a client's `connect`, from its command object; each field is cut to
    /// `max_len` bytes (`limits.max_name_len`).
    pub fn connect_bounded(
        addr: IpAddr,
        client_id: u64,
        object: Option<&Amf0Value>,
        max_len: usize,
    ) -> AuthRequest {
        let field = |k: &str| {
            truncate(
                object
                    .and_then(|o| o.get(k))
                    .and_then(Amf0Value::as_str)
                    .unwrap_or_default(),
                max_len,
            )
            .to_owned()
        };
        let raw_app = field("app");
        let (app, connect_args) = split_query(&raw_app);
        AuthRequest {
            action: Action::Connect,
            addr,
            app: app.trim_matches('/').to_owned(),
            name: String::new(),
            tc_url: field("tcUrl"),
            swf_url: field("swfUrl"),
            page_url: field("pageUrl"),
            flash_ver: field("flashVer"),
            connect_args,
            args: Vec::new(),
            client_id,
            max_len,
        }
    }

    /// The request for a `publish` or `play` of `raw_name` (with its `?query`) on this
    /// connection.
    pub fn for_stream(&self, action: Action, raw_name: &str) -> AuthRequest {
        let (name, args) = split_query(truncate(raw_name, self.max_len));
        AuthRequest {
            action,
            name: name.trim_matches('/').to_owned(),
            args,
            ..self.clone()
        }
    }

    /// The `done` notice for this publish or play.
    pub fn done(&self) -> AuthRequest {
        AuthRequest {
            action: Action::Done,
            ..self.clone()
        }
    }

    /// The value of query argument `key`: the stream name's first, then connect's.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .chain(&self.connect_args)
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `app/name` (or `app` for connect), for log lines: never the query.
    pub fn target(&self) -> String {
        if self.name.is_empty() {
            self.app.clone()
        } else {
            format!("{}/{}", self.app, self.name)
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Splits `name?a=1&b=2` into the name and its decoded pairs (at most [`MAX_ARGS`]).
pub fn split_query(raw: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, query)) = raw.split_once('?') else {
        return (raw, Vec::new());
    };
    let args = query
        .split('&')
        .filter(|p| !p.is_empty())
        .take(MAX_ARGS)
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    (name, args)
}

/// Decodes `%XX` and `+` (form encoding); a malformed escape is kept as written.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| {
                    std::str::from_utf8(h)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                });
                if let Some(v) = hex {
                    out.push(v);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Denials counted by action and reason, read by `/metrics`.
static DENIED: [[AtomicU64; DenyReason::ALL.len()]; 3] =
    [const { [const { AtomicU64::new(0) }; DenyReason::ALL.len()] }; 3];
/// Requests allowed (renames included), by action.
static ALLOWED: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// Denials so far of `action` for `reason`.
pub fn denied_count(action: Action, reason: DenyReason) -> u64 {
    DENIED
        .get(action.index())
        .and_then(|row| row.get(reason.index()))
        .map_or(0, |c| c.load(Relaxed))
}

/// Requests of `action` allowed so far.
pub fn allowed_count(action: Action) -> u64 {
    ALLOWED.get(action.index()).map_or(0, |c| c.load(Relaxed))
}

/// An `[auth]` key that is not valid: which one, and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct AuthConfigError {
    pub key: String,
    pub message: String,
}

/// A callback URL that does not parse: the same key and message.
impl From<crate::net::url::UrlError> for AuthConfigError {
    fn from(e: crate::net::url::UrlError) -> Self {
        AuthConfigError {
            key: e.key,
            message: e.message,
        }
    }
}

/// The authorizer for `[auth]`, or None when the table sets no rule.
pub fn from_file(
    f: &FileAuth,
    limits: &crate::limits::Limits,
) -> Result<Option<Arc<Auth>>, AuthConfigError> {
    if !f.is_set() {
        return Ok(None);
    }
    Ok(Some(Auth::new(f.build(limits)?)))
}

/// The authorizer: the validated rules and the callback client. One per configuration,
/// shared (`Arc`) by every session.
pub struct Auth {
    settings: AuthSettings,
    callbacks: callback::Callbacks,
    /// Denial lines a flood of refused clients can cause: at most one a second (the
    /// counter still counts each).
    log: LogThrottle,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The settings print their secrets redacted.
        f.debug_struct("Auth")
            .field("settings", &self.settings)
            .finish()
    }
}

impl Auth {
    pub fn new(settings: AuthSettings) -> Arc<Auth> {
        let callbacks = callback::Callbacks::new(&settings);
        Arc::new(Auth {
            settings,
            callbacks,
            log: LogThrottle::new(),
        })
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// True when deciding `action` on `app` needs an HTTP call (so the caller should not
    /// block on it inline); false when [`Auth::decide_local`] gives the whole answer.
    pub fn needs_callback(&self, action: Action, app: &str) -> bool {
        self.settings.rules_for(app).callback(action).is_some()
    }

    /// The decision from the local rules only (addresses, keys, tokens), counted and logged
    /// when it is a denial. Use it when [`Auth::needs_callback`] is false.
    pub fn decide_local(&self, req: &AuthRequest) -> Decision {
        let d = match self.settings.check_local(req, unix_now()) {
            Ok(()) => Decision::Allow,
            Err(r) => Decision::Deny(r),
        };
        self.record(req, &d);
        d
    }

    /// The decision for `req`: the local rules, then the callback if one is configured.
    /// Waits at most `callback_timeout_ms` (plus the wait for a free callback slot, within
    /// the same bound). Counts and logs the outcome.
    pub async fn authorize(&self, req: &AuthRequest) -> Decision {
        let d = self.decide(req).await;
        self.record(req, &d);
        d
    }

    /// [`Auth::authorize`] for a client that cannot be renamed (a relayed one: the relay
    /// forwards its bytes unchanged): a callback's rename is a denial,
    /// [`DenyReason::RenameUnsupported`], counted and logged as one.
    pub async fn authorize_unrenamed(&self, req: &AuthRequest) -> Decision {
        let d = match self.decide(req).await {
            Decision::Rename(to) => {
                info!(
                    "auth: {} {} from {}: the callback renamed it to {}/{}, which a relay cannot do",
                    req.action,
                    req.target(),
                    token::addr_text(req.addr),
                    req.app,
                    truncate(&to, 64)
                );
                Decision::Deny(DenyReason::RenameUnsupported)
            }
            d => d,
        };
        self.record(req, &d);
        d
    }

    /// The local rules, then the callback if one is configured; neither counted nor logged.
    async fn decide(&self, req: &AuthRequest) -> Decision {
        match self.settings.check_local(req, unix_now()) {
            Err(r) => Decision::Deny(r),
            Ok(()) => match self.settings.rules_for(&req.app).callback(req.action) {
                Some(url) => self.callbacks.ask(url, req).await,
                None => Decision::Allow,
            },
        }
    }

    /// Sends the `on_done` notice for a publish or play that ended, if one is configured:
    /// in the background, never waited for; dropped (with a debug line) when
    /// `limits.max_auth_callbacks` calls are already out.
    pub fn notify_done(self: &Arc<Self>, req: &AuthRequest) {
        let Some(url) = self.settings.rules_for(&req.app).callback(Action::Done) else {
            return;
        };
        self.callbacks.notify(url.clone(), req.done());
    }

    fn record(&self, req: &AuthRequest, d: &Decision) {
        let i = req.action.index();
        match d {
            Decision::Allow | Decision::Rename(_) => {
                if let Some(c) = ALLOWED.get(i) {
                    c.fetch_add(1, Relaxed);
                }
                if let Decision::Rename(to) = d {
                    info!(
                        "auth: {} {} from {} allowed as {}/{to} (callback redirect)",
                        req.action,
                        req.target(),
                        token::addr_text(req.addr),
                        req.app
                    );
                }
            }
            Decision::Deny(r) => {
                if let Some(c) = DENIED.get(i).and_then(|row| row.get(r.index())) {
                    c.fetch_add(1, Relaxed);
                }
                if let Some(also) = self.log.should_log("denials") {
                    // The name without its query (tokens and ?key= stay out of logs); after
                    // a key denial not even that, since a mistyped key is nearly a key.
                    let target = if *r == DenyReason::Key {
                        format!("{}/(stream name withheld)", req.app)
                    } else {
                        req.target()
                    };
                    warn!(
                        "auth: {} {target} from {} denied ({r}): {}{also}",
                        req.action,
                        token::addr_text(req.addr),
                        r.description()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn queries_split_and_decode() {
        let (n, a) = split_query("cam1?token=ab%2Fc&expires=12&x+y=1+2&&flag");
        assert_eq!(n, "cam1");
        assert_eq!(
            a,
            vec![
                ("token".into(), "ab/c".into()),
                ("expires".into(), "12".into()),
                ("x y".into(), "1 2".into()),
                ("flag".into(), String::new()),
            ]
        );
        assert_eq!(split_query("plain"), ("plain", vec![]));
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        let many = format!("n?{}", "a=1&".repeat(1000));
        assert_eq!(split_query(&many).1.len(), MAX_ARGS);
    }

    #[test]
    fn requests_carry_connect_fields_and_both_queries() {
        let obj = Amf0Value::object(vec![
            ("app", Amf0Value::string("live?tc=1")),
            ("tcUrl", Amf0Value::string("rtmp://h/live?tc=1")),
            ("flashVer", Amf0Value::string("FMLE/3.0")),
        ]);
        let c = AuthRequest::connect("127.0.0.1".parse().unwrap(), 7, Some(&obj));
        assert_eq!(c.app, "live");
        assert_eq!(c.arg("tc"), Some("1"));
        let p = c.for_stream(Action::Publish, "cam1?token=t");
        assert_eq!(p.name, "cam1");
        assert_eq!(p.arg("token"), Some("t"));
        assert_eq!(p.arg("tc"), Some("1"));
        assert_eq!(p.target(), "live/cam1");
        assert_eq!(p.done().action, Action::Done);
        // A client's long fields are cut to max_len.
        let long = Amf0Value::object(vec![("tcUrl", Amf0Value::string("é".repeat(5000)))]);
        let c = AuthRequest::connect_bounded("127.0.0.1".parse().unwrap(), 7, Some(&long), 1001);
        assert_eq!(c.tc_url.len(), 1000);
        let p = c.for_stream(Action::Play, &format!("n?{}", "a=1&".repeat(5000)));
        assert!(p.args.len() <= MAX_ARGS);
        assert_eq!(truncate("abc", 2), "ab");
    }

    #[test]
    fn status_descriptions_name_the_code_action_and_reason() {
        assert_eq!(
            DenyReason::TokenMissing.status_description(Action::Publish),
            "NetStream.Publish.BadName: publish denied (token_missing): \
             a token is required (?token=...&expires=...)."
        );
        let d = DenyReason::RenameUnsupported.status_description(Action::Play);
        assert!(d.starts_with("NetStream.Play.Failed: play denied (rename_unsupported): "));
        assert!(d.ends_with("answer 2xx."), "{d}");
        // ffmpeg prints at most 255 characters of a status description.
        for r in DenyReason::ALL {
            for a in Action::DECIDED {
                assert!(r.status_description(a).len() <= 255, "{r} {a}");
            }
        }
    }
}
