//! Listener and upstream URLs: `scheme://host[:port]`, parsed once for every caller.
//!
//! Errors name the setting that held the URL (`--listen`, `listen[1]`, `upstream.url`) and
//! say how to write it.

use std::fmt;

/// A URL that does not parse: the setting that held it, what is wrong, and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct UrlError {
    pub key: String,
    pub message: String,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> UrlError {
    UrlError {
        key: key.into(),
        message: message.into(),
    }
}

/// The transports a listener URL may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenScheme {
    Rtmp,
    Rtmpt,
    Rtmps,
    Rtmpts,
}

impl ListenScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenScheme::Rtmp => "rtmp",
            ListenScheme::Rtmpt => "rtmpt",
            ListenScheme::Rtmps => "rtmps",
            ListenScheme::Rtmpts => "rtmpts",
        }
    }

    /// TLS listeners run the TLS handshake before sniffing.
    pub fn is_tls(self) -> bool {
        matches!(self, ListenScheme::Rtmps | ListenScheme::Rtmpts)
    }

    fn default_port(self) -> u16 {
        match self {
            ListenScheme::Rtmp => 1935,
            ListenScheme::Rtmpt => 80,
            ListenScheme::Rtmps | ListenScheme::Rtmpts => 443,
        }
    }
}

/// A parsed `--listen` URL: scheme, host (IP literal or name) and port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenUrl {
    pub scheme: ListenScheme,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for ListenUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(
                f,
                "{}://[{}]:{}",
                self.scheme.as_str(),
                self.host,
                self.port
            )
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

/// Upstream URL schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamScheme {
    Rtmp,
    Rtmps,
}

/// A parsed `--upstream` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: UpstreamScheme,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.scheme {
            UpstreamScheme::Rtmp => "rtmp",
            UpstreamScheme::Rtmps => "rtmps",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Splits `scheme://host[:port][/]` into its parts; the host may be `[v6]`.
fn split_url<'a>(key: &str, url: &'a str) -> Result<(&'a str, &'a str, Option<u16>), UrlError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        invalid(
            key,
            format!(
                "'{url}' is not a URL; write it as scheme://host:port, e.g. rtmp://0.0.0.0:1935"
            ),
        )
    })?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(invalid(
            key,
            format!("'{url}' has a path, query or user part; give only scheme://host:port (the client's app and stream names pass through unchanged)"),
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| {
            invalid(
                key,
                format!("'{url}': IPv6 address is missing its closing ']'"),
            )
        })?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| invalid(key, format!("'{url}': expected ':PORT' after ']'")))?,
            ),
        };
        (host, port)
    } else if rest.matches(':').count() > 1 {
        return Err(invalid(
            key,
            format!("'{url}': put an IPv6 address in brackets, e.g. rtmp://[::]:1935"),
        ));
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(
            key,
            format!("'{url}' has no host; use 0.0.0.0 (all IPv4), [::] (all) or a name"),
        ));
    }
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().map_err(|_| {
            invalid(
                key,
                format!("'{url}': port '{p}' is not a number from 0 to 65535"),
            )
        })?),
    };
    Ok((scheme, host, port))
}

/// Parses one listener URL.
pub fn parse_listen(key: &str, url: &str) -> Result<ListenUrl, UrlError> {
    let (scheme, host, port) = split_url(key, url)?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "rtmp" => ListenScheme::Rtmp,
        "rtmpt" => ListenScheme::Rtmpt,
        "rtmps" => ListenScheme::Rtmps,
        "rtmpts" => ListenScheme::Rtmpts,
        "rtmpe" | "rtmpte" => {
            return Err(invalid(
                key,
                format!("'{url}': RTMPE is recognised on every rtmp:// and rtmpt:// listener; listen with rtmp:// instead"),
            ))
        }
        other => {
            return Err(invalid(
                key,
                format!("'{url}': unknown scheme '{other}'; use rtmp, rtmpt, rtmps or rtmpts"),
            ))
        }
    };
    Ok(ListenUrl {
        scheme,
        host: host.to_string(),
        port: port.unwrap_or(scheme.default_port()),
    })
}

/// Parses the upstream URL.
pub fn parse_upstream(key: &str, url: &str) -> Result<UpstreamUrl, UrlError> {
    let (scheme, host, port) = split_url(key, url)?;
    let (scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "rtmp" => (UpstreamScheme::Rtmp, 1935),
        "rtmps" => (UpstreamScheme::Rtmps, 443),
        other => {
            return Err(invalid(
                key,
                format!("'{url}': the upstream scheme must be rtmp or rtmps, not '{other}'"),
            ))
        }
    };
    let port = port.unwrap_or(default_port);
    if port == 0 {
        return Err(invalid(
            key,
            format!("'{url}': port 0 cannot be connected to"),
        ));
    }
    Ok(UpstreamUrl {
        scheme,
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls() {
        let l = parse_listen("k", "rtmps://[::1]:0").unwrap();
        assert_eq!(l.scheme, ListenScheme::Rtmps);
        assert_eq!(l.host, "::1");
        assert_eq!(l.to_string(), "rtmps://[::1]:0");
        assert_eq!(parse_listen("k", "rtmpt://0.0.0.0").unwrap().port, 80);
        assert_eq!(parse_listen("k", "RTMP://localhost/").unwrap().port, 1935);
        for bad in [
            "0.0.0.0:1935",
            "http://0.0.0.0:80",
            "rtmp://::1:1935",
            "rtmp://:1935",
            "rtmp://0.0.0.0:99999",
            "rtmp://0.0.0.0:1935/live",
            "rtmpe://0.0.0.0:1935",
        ] {
            let err = parse_listen("--listen", bad).unwrap_err().to_string();
            assert!(err.starts_with("--listen: "), "{err}");
        }
    }

    #[test]
    fn upstream_urls() {
        let u = parse_upstream("k", "rtmps://backend.example.com").unwrap();
        assert_eq!(u.scheme, UpstreamScheme::Rtmps);
        assert_eq!(u.port, 443);
        assert!(parse_upstream("k", "rtmpt://x:80").is_err());
        assert!(parse_upstream("k", "rtmp://x:0").is_err());
    }
}
