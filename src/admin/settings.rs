//! `[admin]` and `--admin`: where the admin listener binds, its bearer token and its TLS
//! certificate, validated (a non-loopback address without a token is refused).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::net::tls::CertSource;

/// The admin address when neither `--admin` nor `[admin] listen` says otherwise.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9935";

/// `[admin]` as written in the file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// `HOST:PORT` (an IP literal) or `off`.
    pub listen: Option<String>,
    /// Bearer token required on /metrics and /api/ (always, when set).
    pub token: Option<String>,
    /// PEM certificate chain and key: serve the admin listener over HTTPS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The validated admin settings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdminSettings {
    /// None: the admin listener is off.
    pub listen: Option<SocketAddr>,
    /// True when the address was configured (a bind failure then stops the start); false
    /// for the default address, where a port already taken (another rtmpgate on the same
    /// machine, parallel tests) only costs a warning.
    pub explicit: bool,
    pub token: Option<String>,
    pub tls: Option<CertSource>,
}

/// A mistake in `[admin]` or the `--admin*` flags: the key at fault and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct AdminSettingsError {
    pub key: String,
    pub message: String,
}

fn invalid(key: &str, message: String) -> AdminSettingsError {
    AdminSettingsError {
        key: key.to_string(),
        message,
    }
}

impl AdminSettings {
    /// Merges `--admin` / `--admin-token` over the file's `[admin]`; `base` is the config
    /// file's directory (relative certificate paths).
    pub fn merge(
        flag_listen: Option<&str>,
        flag_token: Option<String>,
        file: FileAdmin,
        base: Option<&Path>,
    ) -> Result<AdminSettings, AdminSettingsError> {
        let (key, text, explicit) = match (flag_listen, file.listen.as_deref()) {
            (Some(v), _) => ("--admin", v.to_string(), true),
            (None, Some(v)) => ("admin.listen", v.to_string(), true),
            (None, None) => ("admin.listen", DEFAULT_ADMIN.to_string(), false),
        };
        let token = flag_token.or(file.token);
        if let Some(t) = &token {
            if t.trim().is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    "admin.token",
                    "must be a non-empty string without spaces; generate one with \
                     `openssl rand -hex 32`"
                        .into(),
                ));
            }
        }
        let tls = CertSource::pair(file.cert, file.key, base).map_err(|_| {
            invalid(
                "admin.cert",
                "admin.cert and admin.key go together; set both (PEM files, as for [tls])".into(),
            )
        })?;
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(AdminSettings {
                listen: None,
                explicit,
                token,
                tls,
            });
        }
        let addr: SocketAddr = text.trim().parse().map_err(|_| {
            invalid(
                key,
                format!(
                    "'{text}' is not an IP address and port; write e.g. 127.0.0.1:9935, \
                     [::1]:9935, 0.0.0.0:9935 (with admin.token), or off"
                ),
            )
        })?;
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(invalid(
                key,
                format!(
                    "{addr} is reachable from other machines, so the admin listener needs a \
                     bearer token: set [admin] token (or --admin-token / \
                     RTMPGATE_ADMIN_TOKEN), e.g. from `openssl rand -hex 32`, or bind it to \
                     127.0.0.1"
                ),
            ));
        }
        Ok(AdminSettings {
            listen: Some(addr),
            explicit,
            token,
            tls,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn file(listen: Option<&str>, token: Option<&str>) -> FileAdmin {
        FileAdmin {
            listen: listen.map(Into::into),
            token: token.map(Into::into),
            ..FileAdmin::default()
        }
    }

    #[test]
    fn default_is_loopback_and_not_explicit() {
        let s = AdminSettings::merge(None, None, FileAdmin::default(), None).unwrap();
        assert_eq!(s.listen, Some("127.0.0.1:9935".parse().unwrap()));
        assert!(!s.explicit);
        assert!(s.token.is_none());
    }

    #[test]
    fn off_disables_and_flag_wins() {
        let s =
            AdminSettings::merge(Some("off"), None, file(Some("127.0.0.1:1"), None), None).unwrap();
        assert_eq!(s.listen, None);
        let s = AdminSettings::merge(None, None, file(Some("[::1]:0"), None), None).unwrap();
        assert!(s.explicit);
        assert_eq!(s.listen, Some("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn public_address_needs_a_token() {
        let err = AdminSettings::merge(Some("0.0.0.0:9935"), None, FileAdmin::default(), None)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--admin: 0.0.0.0:9935"), "{err}");
        assert!(err.contains("token"), "{err}");
        let ok = AdminSettings::merge(
            None,
            None,
            file(Some("0.0.0.0:9935"), Some("s3cret-token")),
            None,
        )
        .unwrap();
        assert_eq!(ok.token.as_deref(), Some("s3cret-token"));
        assert!(
            AdminSettings::merge(Some("localhost:1"), None, FileAdmin::default(), None).is_err()
        );
        assert!(AdminSettings::merge(None, Some(" ".into()), FileAdmin::default(), None).is_err());
    }

    #[test]
    fn cert_paths_are_relative_to_the_file() {
        let f = FileAdmin {
            cert: Some("a.pem".into()),
            key: Some("/k.pem".into()),
            ..FileAdmin::default()
        };
        let s = AdminSettings::merge(None, None, f, Some(Path::new("/etc/rtmpgate"))).unwrap();
        assert_eq!(
            s.tls,
            Some(CertSource::Files {
                cert: "/etc/rtmpgate/a.pem".into(),
                key: "/k.pem".into()
            })
        );
        let half = FileAdmin {
            cert: Some("a.pem".into()),
            ..FileAdmin::default()
        };
        assert!(AdminSettings::merge(None, None, half, None).is_err());
    }
}
