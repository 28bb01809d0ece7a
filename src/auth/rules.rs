//! `[auth]` in the config file: the rules as written ([`FileAuth`]), validated into
//! [`AuthSettings`], and the local checks (addresses, keys, tokens) that need no I/O.
//!
//! The top-level `[auth]` keys apply to every app; an `[auth.app.NAME]` table replaces, for
//! that app, whichever of them it sets (an absent key keeps the top-level value).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthConfigError as ConfigError;
use super::{token, Action, AuthRequest, DenyReason};
use crate::limits::Limits;
use crate::net::addr::Cidr;

/// `callback_timeout_ms` when not set: nginx-rtmp's `notify_*_timeout` default is 30 s, which
/// leaves an encoder hanging; 3 s is long for a loopback or LAN auth service.
pub const DEFAULT_CALLBACK_TIMEOUT_MS: u64 = 3_000;
/// Shortest `token_secret` accepted, in bytes: below this a secret can be guessed offline
/// from one token.
pub const MIN_SECRET_LEN: usize = 16;

/// The rules one `[auth]` or `[auth.app.NAME]` table may set.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileRules {
    pub on_connect: Option<String>,
    pub on_publish: Option<String>,
    pub on_play: Option<String>,
    pub on_done: Option<String>,
    /// Actions that need a valid token: any of "publish", "play".
    pub token_required: Option<Vec<String>>,
    pub allow_connect: Option<Vec<String>>,
    pub deny_connect: Option<Vec<String>>,
    pub allow_publish: Option<Vec<String>>,
    pub deny_publish: Option<Vec<String>>,
    pub allow_play: Option<Vec<String>>,
    pub deny_play: Option<Vec<String>>,
}

/// `[auth]` as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileAuth {
    pub on_connect: Option<String>,
    pub on_publish: Option<String>,
    pub on_play: Option<String>,
    pub on_done: Option<String>,
    pub callback_timeout_ms: Option<u64>,
    /// Seconds a positive callback answer is reused for the same request; 0: never.
    pub callback_cache_secs: Option<u64>,
    /// The HMAC-SHA256 key of the tokens (at least 16 bytes; a long random string).
    pub token_secret: Option<String>,
    /// Only tokens minted for the client's address are accepted.
    pub token_bind_addr: Option<bool>,
    pub token_required: Option<Vec<String>>,
    /// app -> keys a publisher's stream name must be (or carry as `?key=`).
    pub publish_keys: Option<BTreeMap<String, Vec<String>>>,
    /// app -> keys a player's stream name must carry as `?key=` (or be).
    pub play_keys: Option<BTreeMap<String, Vec<String>>>,
    pub allow_connect: Option<Vec<String>>,
    pub deny_connect: Option<Vec<String>>,
    pub allow_publish: Option<Vec<String>>,
    pub deny_publish: Option<Vec<String>>,
    pub allow_play: Option<Vec<String>>,
    pub deny_play: Option<Vec<String>>,
    /// Per-app tables: `[auth.app.live]`.
    #[serde(default)]
    pub app: BTreeMap<String, FileRules>,
}

impl FileAuth {
    fn top_rules(&self) -> FileRules {
        FileRules {
            on_connect: self.on_connect.clone(),
            on_publish: self.on_publish.clone(),
            on_play: self.on_play.clone(),
            on_done: self.on_done.clone(),
            token_required: self.token_required.clone(),
            allow_connect: self.allow_connect.clone(),
            deny_connect: self.deny_connect.clone(),
            allow_publish: self.allow_publish.clone(),
            deny_publish: self.deny_publish.clone(),
            allow_play: self.allow_play.clone(),
            deny_play: self.deny_play.clone(),
        }
    }

    /// True when any rule is set (otherwise nothing is checked and no `Auth` is built).
    pub fn is_set(&self) -> bool {
        let t = self.top_rules();
        t.any()
            || self.token_secret.is_some()
            || self.publish_keys.as_ref().is_some_and(|m| !m.is_empty())
            || self.play_keys.as_ref().is_some_and(|m| !m.is_empty())
            || self.app.values().any(FileRules::any)
    }

    /// Validates the table. `limits` bounds the callbacks in flight and the cache.
    pub fn build(&self, limits: &Limits) -> Result<AuthSettings, ConfigError> {
        let timeout_ms = self
            .callback_timeout_ms
            .unwrap_or(DEFAULT_CALLBACK_TIMEOUT_MS);
        if timeout_ms == 0 {
            return Err(invalid(
                "auth.callback_timeout_ms",
                "must be more than 0: a callback with no time to answer denies everyone; \
                 remove the key for the default (3000)",
            ));
        }
        let token_secret = match &self.token_secret {
            Some(s) if s.len() < MIN_SECRET_LEN => {
                return Err(invalid(
                    "auth.token_secret",
                    format!(
                        "is {} bytes; use at least {MIN_SECRET_LEN} random bytes, e.g. the \
                         output of `openssl rand -hex 32`",
                        s.len()
                    ),
                ))
            }
            Some(s) => Some(Secret(s.as_bytes().to_vec())),
            None => None,
        };
        let top = self.top_rules();
        let default = AppRules::build("auth", &top, &top_keys(self, ""), &token_secret)?;
        let mut apps = HashMap::new();
        let mut names: Vec<&String> = self.app.keys().collect();
        for k in self
            .publish_keys
            .iter()
            .chain(&self.play_keys)
            .flat_map(|m| m.keys())
        {
            if !names.contains(&k) {
                names.push(k);
            }
        }
        for name in names {
            let own = self.app.get(name).cloned().unwrap_or_default();
            let merged = own.over(&top);
            let rules = AppRules::build(
                &format!("auth.app.{name}"),
                &merged,
                &top_keys(self, name),
                &token_secret,
            )?;
            apps.insert(name.clone(), rules);
        }
        Ok(AuthSettings {
            callback_timeout: Duration::from_millis(timeout_ms),
            cache_ttl: Duration::from_secs(self.callback_cache_secs.unwrap_or(0)),
            max_callbacks: limits.max_auth_callbacks.max(1),
            max_cache_entries: limits.max_auth_cache_entries,
            max_name_len: limits.max_name_len,
            token_secret,
            token_bind_addr: self.token_bind_addr.unwrap_or(false),
            default,
            apps,
        })
    }
}

/// The keys listed for `app` in the top-level tables (for "" none: keys are per app).
fn top_keys(f: &FileAuth, app: &str) -> [Option<Vec<String>>; 2] {
    let get =
        |m: &Option<BTreeMap<String, Vec<String>>>| m.as_ref().and_then(|m| m.get(app)).cloned();
    [get(&f.publish_keys), get(&f.play_keys)]
}

impl FileRules {
    fn any(&self) -> bool {
        self.on_connect.is_some()
            || self.on_publish.is_some()
            || self.on_play.is_some()
            || self.on_done.is_some()
            || self.token_required.is_some()
            || [
                &self.allow_connect,
                &self.deny_connect,
                &self.allow_publish,
                &self.deny_publish,
                &self.allow_play,
                &self.deny_play,
            ]
            .iter()
            .any(|l| l.is_some())
    }

    /// These rules, with `base`'s value wherever this table does not set one.
    fn over(self, base: &FileRules) -> FileRules {
        let b = base.clone();
        FileRules {
            on_connect: self.on_connect.or(b.on_connect),
            on_publish: self.on_publish.or(b.on_publish),
            on_play: self.on_play.or(b.on_play),
            on_done: self.on_done.or(b.on_done),
            token_required: self.token_required.or(b.token_required),
            allow_connect: self.allow_connect.or(b.allow_connect),
            deny_connect: self.deny_connect.or(b.deny_connect),
            allow_publish: self.allow_publish.or(b.allow_publish),
            deny_publish: self.deny_publish.or(b.deny_publish),
            allow_play: self.allow_play.or(b.allow_play),
            deny_play: self.deny_play.or(b.deny_play),
        }
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A secret: printed as `<redacted>` so `Debug` output (config dumps, reload diffs) never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(crate) Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A callback address: `http://host[:port]/path` (nginx-rtmp's callbacks are plain HTTP),
/// parsed by the net layer's one URL module.
pub use crate::net::url::HttpUrl as CallbackUrl;

/// Address lists of one action: a deny match denies; a non-empty allow list denies every
/// address outside it.
#[derive(Clone, Debug, Default)]
pub struct AddrRule {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

impl AddrRule {
    fn build(
        prefix: &str,
        action: &str,
        allow: &Option<Vec<String>>,
        deny: &Option<Vec<String>>,
    ) -> Result<AddrRule, ConfigError> {
        let parse = |kind: &str, l: &Option<Vec<String>>| -> Result<Vec<Cidr>, ConfigError> {
            l.iter()
                .flatten()
                .enumerate()
                .map(|(i, t)| {
                    Cidr::parse(&format!("{prefix}.{kind}_{action}[{i}]"), t).map_err(|e| {
                        ConfigError {
                            key: e.key,
                            message: e.message,
                        }
                    })
                })
                .collect()
        };
        Ok(AddrRule {
            allow: parse("allow", allow)?,
            deny: parse("deny", deny)?,
        })
    }

    pub fn permits(&self, ip: std::net::IpAddr) -> bool {
        if self.deny.iter().any(|c| c.contains(ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip))
    }
}

/// Keys compared in constant time: each is kept as its SHA-256, and the candidate's
/// SHA-256 is compared to each (so neither the content nor the length of a key shows in
/// the time taken).
#[derive(Clone, Default)]
pub struct KeySet(Vec<[u8; 32]>);

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySet({} keys, redacted)", self.0.len())
    }
}

impl KeySet {
    fn new(keys: &[String]) -> KeySet {
        KeySet(
            keys.iter()
                .map(|k| Sha256::digest(k.as_bytes()).into())
                .collect(),
        )
    }

    pub fn contains(&self, candidate: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(candidate.as_bytes()).into();
        // Every key is compared, whichever matches.
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |acc, k| acc | k.ct_eq(&d))
            .into()
    }
}

/// The rules in force for one app.
#[derive(Clone, Debug, Default)]
pub struct AppRules {
    /// on_connect, on_publish, on_play, on_done.
    pub callbacks: [Option<CallbackUrl>; 4],
    /// connect, publish, play.
    pub addr: [AddrRule; 3],
    pub publish_keys: Option<KeySet>,
    pub play_keys: Option<KeySet>,
    pub token_publish: bool,
    pub token_play: bool,
}

impl AppRules {
    fn build(
        prefix: &str,
        r: &FileRules,
        keys: &[Option<Vec<String>>; 2],
        secret: &Option<Secret>,
    ) -> Result<AppRules, ConfigError> {
        let cb = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|u| CallbackUrl::parse(&format!("{prefix}.{name}"), u))
                .transpose()
        };
        let mut token_publish = false;
        let mut token_play = false;
        for (i, a) in r.token_required.iter().flatten().enumerate() {
            match a.as_str() {
                "publish" => token_publish = true,
                "play" => token_play = true,
                other => {
                    return Err(invalid(
                        &format!("{prefix}.token_required[{i}]"),
                        format!("{other:?} is not an action a token can be required for; use \"publish\" and/or \"play\" (connect has no stream name to sign)"),
                    ))
                }
            }
        }
        if (token_publish || token_play) && secret.is_none() {
            return Err(invalid(
                &format!("{prefix}.token_required"),
                "needs auth.token_secret (the key tokens are signed with); set it, e.g. to the output of `openssl rand -hex 32`",
            ));
        }
        let keyset = |k: &Option<Vec<String>>, what: &str| -> Result<Option<KeySet>, ConfigError> {
            match k {
                Some(list) if list.is_empty() || list.iter().any(String::is_empty) => Err(invalid(
                    &format!("auth.{what}"),
                    "has an empty list or an empty key; list non-empty keys, or remove the app to drop the rule",
                )),
                Some(list) => Ok(Some(KeySet::new(list))),
                None => Ok(None),
            }
        };
        Ok(AppRules {
            callbacks: [
                cb("on_connect", &r.on_connect)?,
                cb("on_publish", &r.on_publish)?,
                cb("on_play", &r.on_play)?,
                cb("on_done", &r.on_done)?,
            ],
            addr: [
                AddrRule::build(prefix, "connect", &r.allow_connect, &r.deny_connect)?,
                AddrRule::build(prefix, "publish", &r.allow_publish, &r.deny_publish)?,
                AddrRule::build(prefix, "play", &r.allow_play, &r.deny_play)?,
            ],
            publish_keys: keyset(&keys[0], "publish_keys")?,
            play_keys: keyset(&keys[1], "play_keys")?,
            token_publish,
            token_play,
        })
    }

    pub fn callback(&self, action: Action) -> Option<&CallbackUrl> {
        self.callbacks.get(action.index()).and_then(Option::as_ref)
    }
}

/// `[auth]` validated: what [`super::Auth`] enforces.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub callback_timeout: Duration,
    pub cache_ttl: Duration,
    pub max_callbacks: usize,
    pub max_cache_entries: usize,
    pub max_name_len: usize,
    pub token_secret: Option<Secret>,
    pub token_bind_addr: bool,
    /// The rules of apps without a table of their own.
    pub default: AppRules,
    pub apps: HashMap<String, AppRules>,
}

impl AuthSettings {
    pub fn rules_for(&self, app: &str) -> &AppRules {
        self.apps.get(app).unwrap_or(&self.default)
    }

    /// Addresses, keys and tokens, in that order; `now` in Unix seconds.
    pub fn check_local(&self, req: &AuthRequest, now: u64) -> Result<(), DenyReason> {
        let rules = self.rules_for(&req.app);
        let (addr, keys, token_required) = match req.action {
            Action::Connect => (rules.addr.first(), None, false),
            Action::Publish => (
                rules.addr.get(1),
                rules.publish_keys.as_ref(),
                rules.token_publish,
            ),
            Action::Play => (
                rules.addr.get(2),
                rules.play_keys.as_ref(),
                rules.token_play,
            ),
            Action::Done => return Ok(()),
        };
        if addr.is_some_and(|a| !a.permits(req.addr)) {
            return Err(DenyReason::Address);
        }
        if let Some(keys) = keys {
            let by_name = keys.contains(&req.name);
            let by_arg = req.arg("key").is_some_and(|k| keys.contains(k));
            if !(by_name | by_arg) {
                return Err(DenyReason::Key);
            }
        }
        if token_required {
            let Some(secret) = &self.token_secret else {
                return Err(DenyReason::TokenInvalid);
            };
            let (Some(tok), Some(exp)) = (req.arg("token"), req.arg("expires")) else {
                return Err(DenyReason::TokenMissing);
            };
            token::verify(
                &secret.0,
                &req.app,
                &req.name,
                exp,
                tok,
                req.addr,
                self.token_bind_addr,
                now,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Result<AuthSettings, ConfigError> {
        let f: FileAuth = toml::from_str(toml_text).unwrap();
        f.build(&Limits::default())
    }

    fn req(action: Action, addr: &str, app: &str, raw_name: &str) -> AuthRequest {
        use crate::rtmp::amf0::Amf0Value;
        let obj = Amf0Value::object(vec![("app", Amf0Value::string(app))]);
        AuthRequest::connect(addr.parse().unwrap(), 1, Some(&obj)).for_stream(action, raw_name)
    }

    #[test]
    fn addresses_per_app_and_action_v4_v6_and_mapped() {
        let s = settings(
            r#"
            deny_publish = ["10.0.0.0/8"]
            allow_play = ["192.0.2.0/24", "2001:db8::/32"]
            [app.open]
            allow_play = []
            "#,
        )
        .unwrap();
        let ok = |a, app, addr| s.check_local(&req(a, addr, app, "s"), 0).is_ok();
        assert!(!ok(Action::Publish, "live", "10.1.2.3"));
        assert!(!ok(Action::Publish, "live", "::ffff:10.1.2.3"));
        assert!(ok(Action::Publish, "live", "11.0.0.1"));
        assert!(ok(Action::Play, "live", "192.0.2.9"));
        assert!(ok(Action::Play, "live", "::ffff:192.0.2.9"));
        assert!(ok(Action::Play, "live", "2001:db8::1"));
        assert!(!ok(Action::Play, "live", "2001:db9::1"));
        assert!(!ok(Action::Play, "live", "127.0.0.1"));
        // The app's own (empty) allow list replaces the top-level one.
        assert!(ok(Action::Play, "open", "127.0.0.1"));
        // Its publish rule is inherited.
        assert!(!ok(Action::Publish, "open", "10.0.0.1"));
        assert!(ok(Action::Connect, "live", "10.0.0.1"));
    }

    #[test]
    fn keys_by_name_or_key_arg() {
        let s = settings(
            r#"
            publish_keys = { live = ["k1", "k2"] }
            play_keys = { live = ["viewer"] }
            "#,
        )
        .unwrap();
        let chk = |a, app, n| s.check_local(&req(a, "127.0.0.1", app, n), 0);
        assert_eq!(chk(Action::Publish, "live", "k2"), Ok(()));
        assert_eq!(chk(Action::Publish, "live", "cam?key=k1"), Ok(()));
        assert_eq!(
            chk(Action::Publish, "live", "cam?key=k3"),
            Err(DenyReason::Key)
        );
        assert_eq!(chk(Action::Publish, "live", "k1x"), Err(DenyReason::Key));
        assert_eq!(chk(Action::Play, "live", "cam"), Err(DenyReason::Key));
        assert_eq!(chk(Action::Play, "live", "cam?key=viewer"), Ok(()));
        // Apps without keys are open.
        assert_eq!(chk(Action::Publish, "other", "anything"), Ok(()));
    }

    #[test]
    fn tokens_required_per_action() {
        let s = settings(
            r#"
            token_secret = "0123456789abcdef0123"
            token_required = ["publish"]
            "#,
        )
        .unwrap();
        let now = 1_000_000;
        let t = token::sign(b"0123456789abcdef0123", "live", "cam", now + 60, None);
        let good = format!("cam?token={t}&expires={}", now + 60);
        let chk = |a, n: &str, at| s.check_local(&req(a, "127.0.0.1", "live", n), at);
        assert_eq!(chk(Action::Publish, &good, now), Ok(()));
        assert_eq!(
            chk(Action::Publish, &good, now + 61),
            Err(DenyReason::TokenExpired)
        );
        assert_eq!(
            chk(Action::Publish, "cam", now),
            Err(DenyReason::TokenMissing)
        );
        let other = good.replacen("cam", "cam2", 1);
        assert_eq!(
            chk(Action::Publish, &other, now),
            Err(DenyReason::TokenInvalid)
        );
        assert_eq!(chk(Action::Play, "cam", now), Ok(()));
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = |t: &str| settings(t).unwrap_err().to_string();
        assert!(e(r#"token_secret = "short""#).contains("auth.token_secret"));
        assert!(e(r#"token_required = ["publish"]"#).contains("auth.token_required"));
        assert!(e(r#"on_publish = "https://x/auth""#).contains("auth.on_publish"));
        assert!(e(r#"deny_play = ["10.0.0.0/33"]"#).contains("auth.deny_play[0]"));
        assert!(e("[app.live]\non_play = \"http://h:0/\"").contains("auth.app.live.on_play"));
        assert!(e(r#"callback_timeout_ms = 0"#).contains("callback_timeout_ms"));
        assert!(e(r#"publish_keys = { live = [] }"#).contains("publish_keys"));
    }

    #[test]
    fn callback_urls() {
        let u = CallbackUrl::parse("k", "http://127.0.0.1:8000/auth?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8000, "/auth?x=1")
        );
        let u = CallbackUrl::parse("k", "http://[::1]:81").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 81, "/"));
        assert_eq!(u.to_string(), "http://[::1]:81/");
        assert_eq!(CallbackUrl::parse("k", "http://auth/x").unwrap().port, 80);
    }

    #[test]
    fn secrets_and_keys_never_print() {
        let s = settings(
            r#"
            token_secret = "very-secret-value-123"
            publish_keys = { live = ["the-key-value"] }
            "#,
        )
        .unwrap();
        let dump = format!("{s:?}");
        assert!(!dump.contains("very-secret"), "{dump}");
        assert!(!dump.contains("the-key-value"), "{dump}");
    }
}
