//! RTMP URLs, one type and one parser for every caller: `scheme://host[:port][/app[/stream]]`.
//!
//! A listener (`--listen`) and the backend (`--upstream`) name only `scheme://host:port`;
//! the client (load generator, tests) also names the application and stream, as ffmpeg
//! takes them. The four URL schemes are [`Scheme`]; RTMPE is not one of them (it is sniffed
//! on every plain listener). [`HttpUrl`] is the `http://` endpoint the gateway calls (the
//! auth callbacks), split by the same host and port rules. Errors name the setting that
//! held the URL (`--listen`, `listen[1]`, `upstream.url`, `auth.on_play`, `url`) and say how
//! to write it.

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

/// The URL schemes: the transport a listener accepts or a client connects with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// RTMP over TCP.
    Rtmp,
    /// RTMP over TLS.
    Rtmps,
    /// RTMP tunnelled through HTTP POSTs.
    Rtmpt,
    /// The HTTP tunnel over TLS.
    Rtmpts,
}

impl Scheme {
    /// The scheme a URL names (any case), if it is one of the four.
    pub fn from_name(name: &str) -> Option<Scheme> {
        match name.to_ascii_lowercase().as_str() {
            "rtmp" => Some(Scheme::Rtmp),
            "rtmps" => Some(Scheme::Rtmps),
            "rtmpt" => Some(Scheme::Rtmpt),
            "rtmpts" => Some(Scheme::Rtmpts),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Rtmp => "rtmp",
            Scheme::Rtmps => "rtmps",
            Scheme::Rtmpt => "rtmpt",
            Scheme::Rtmpts => "rtmpts",
        }
    }

    /// The port a URL without one means (the ports Flash used).
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Rtmp => 1935,
            Scheme::Rtmpt => 80,
            Scheme::Rtmps | Scheme::Rtmpts => 443,
        }
    }

    /// TLS first: a TLS listener runs the TLS handshake before sniffing.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Rtmps | Scheme::Rtmpts)
    }

    /// The HTTP tunnel (RTMPT).
    pub fn is_tunnel(self) -> bool {
        matches!(self, Scheme::Rtmpt | Scheme::Rtmpts)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed URL. `app` and `stream` are empty for a listener or the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtmpUrl {
    pub scheme: Scheme,
    /// An IP literal (IPv6 without brackets) or a name.
    pub host: String,
    pub port: u16,
    pub app: String,
    /// Stream name; empty when the URL names only the application.
    pub stream: String,
}

/// `scheme://host:port`, an IPv6 host in brackets, then `/app/stream` when there are.
impl fmt::Display for RtmpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme, self.host, self.port)?;
        } else {
            write!(f, "{}://{}:{}", self.scheme, self.host, self.port)?;
        }
        if !self.app.is_empty() {
            write!(f, "/{}", self.app)?;
        }
        if !self.stream.is_empty() {
            write!(f, "/{}", self.stream)?;
        }
        Ok(())
    }
}

impl RtmpUrl {
    /// Parses a client URL, `SCHEME://HOST[:PORT]/APP[/STREAM]` as ffmpeg takes it: the
    /// stream name is everything after the first path segment.
    pub fn parse(url: &str) -> Result<RtmpUrl, UrlError> {
        const KEY: &str = "url";
        let (scheme, rest) = split_scheme(KEY, url, "rtmp://localhost/live/stream")?;
        let scheme = Scheme::from_name(scheme).ok_or_else(|| {
            invalid(
                KEY,
                format!("'{url}': unknown scheme '{scheme}'; use rtmp, rtmps, rtmpt or rtmpts"),
            )
        })?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = split_host_port(KEY, url, authority, "rtmp://[::1]/live")?;
        let (app, stream) = path.split_once('/').unwrap_or((path, ""));
        if app.is_empty() {
            return Err(invalid(
                KEY,
                format!("'{url}' has no application name; write e.g. {scheme}://{host}/live"),
            ));
        }
        Ok(RtmpUrl {
            scheme,
            host: host.to_owned(),
            port: port.unwrap_or(scheme.default_port()),
            app: app.to_owned(),
            stream: stream.to_owned(),
        })
    }

    /// The tcUrl sent in `connect`: the URL up to and including the application.
    pub fn tc_url(&self) -> String {
        format!("{}://{}:{}/{}", self.scheme, self.host, self.port, self.app)
    }

    /// The same URL with another stream name.
    pub fn with_stream(&self, stream: &str) -> Self {
        RtmpUrl {
            stream: stream.to_owned(),
            ..self.clone()
        }
    }
}

/// An `http://host[:port][/path]` URL: an HTTP endpoint the gateway calls (the auth
/// callbacks, plain HTTP as nginx-rtmp's are). Host and port follow the RTMP URLs' rules
/// (the same splitter); the default port is 80.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    /// An IP literal (IPv6 without brackets) or a name.
    pub host: String,
    pub port: u16,
    /// The path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    /// Parses the URL held by setting `key`.
    pub fn parse(key: &str, url: &str) -> Result<HttpUrl, UrlError> {
        const EXAMPLE: &str = "http://127.0.0.1:8000/auth";
        let bad = |why: &str| {
            invalid(
                key,
                format!("'{url}' {why}; write it as http://HOST[:PORT]/PATH, e.g. {EXAMPLE}"),
            )
        };
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            bad("is not an http:// URL (callbacks are plain HTTP, as nginx-rtmp's)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let (host, port) = split_host_port(key, url, authority, "http://[::1]:8000/auth")?;
        if port == Some(0) {
            return Err(bad("has port 0"));
        }
        if path.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("has spaces or control characters in its path"));
        }
        Ok(HttpUrl {
            host: host.to_owned(),
            port: port.unwrap_or(80),
            path: path.to_owned(),
        })
    }
}

/// `http://host:port/path`, an IPv6 host in brackets.
impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}{}", self.host, self.port, self.path)
        } else {
            write!(f, "http://{}:{}{}", self.host, self.port, self.path)
        }
    }
}

/// Splits `scheme://rest`; `example` shows the expected shape in the error.
fn split_scheme<'a>(
    key: &str,
    url: &'a str,
    example: &str,
) -> Result<(&'a str, &'a str), UrlError> {
    url.split_once("://").ok_or_else(|| {
        invalid(
            key,
            format!("'{url}' is not a URL; write it as scheme://host:port, e.g. {example}"),
        )
    })
}

/// Splits `host[:port]`; the host may be `[v6]`, and an IPv6 host must be. `v6_example` is
/// a URL of the caller's kind with a bracketed IPv6 host, for the error. Every URL and
/// `HOST:PORT` setting of the gateway goes through here (the cluster's peers too).
pub fn split_host_port<'a>(
    key: &str,
    url: &str,
    authority: &'a str,
    v6_example: &str,
) -> Result<(&'a str, Option<u16>), UrlError> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
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
    } else if authority.matches(':').count() > 1 {
        return Err(invalid(
            key,
            format!("'{url}': put an IPv6 address in brackets, e.g. {v6_example}"),
        ));
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
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
    Ok((host, port))
}

/// Splits a listener or backend URL, `scheme://host[:port][/]`, refusing a path: the
/// client's app and stream names pass through unchanged.
fn split_endpoint<'a>(
    key: &str,
    url: &'a str,
) -> Result<(&'a str, &'a str, Option<u16>), UrlError> {
    let (scheme, rest) = split_scheme(key, url, "rtmp://0.0.0.0:1935")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(invalid(
            key,
            format!("'{url}' has a path, query or user part; give only scheme://host:port (the client's app and stream names pass through unchanged)"),
        ));
    }
    let (host, port) = split_host_port(key, url, rest, "rtmp://[::]:1935")?;
    Ok((scheme, host, port))
}

/// Parses one listener URL: any of the four schemes.
pub fn parse_listen(key: &str, url: &str) -> Result<RtmpUrl, UrlError> {
    let (scheme, host, port) = split_endpoint(key, url)?;
    let scheme = match Scheme::from_name(scheme) {
        Some(s) => s,
        None if matches!(scheme.to_ascii_lowercase().as_str(), "rtmpe" | "rtmpte") => {
            return Err(invalid(
                key,
                format!("'{url}': RTMPE is recognised on every rtmp:// and rtmpt:// listener; listen with rtmp:// instead"),
            ))
        }
        None => {
            return Err(invalid(
                key,
                format!(
                    "'{url}': unknown scheme '{}'; use rtmp, rtmpt, rtmps or rtmpts",
                    scheme.to_ascii_lowercase()
                ),
            ))
        }
    };
    Ok(RtmpUrl {
        scheme,
        host: host.to_string(),
        port: port.unwrap_or(scheme.default_port()),
        app: String::new(),
        stream: String::new(),
    })
}

/// Parses the upstream URL: rtmp or rtmps, and a port that can be connected to.
pub fn parse_upstream(key: &str, url: &str) -> Result<RtmpUrl, UrlError> {
    let (scheme, host, port) = split_endpoint(key, url)?;
    let scheme = match Scheme::from_name(scheme) {
        Some(s @ (Scheme::Rtmp | Scheme::Rtmps)) => s,
        _ => {
            return Err(invalid(
                key,
                format!(
                    "'{url}': the upstream scheme must be rtmp or rtmps, not '{}'",
                    scheme.to_ascii_lowercase()
                ),
            ))
        }
    };
    let port = port.unwrap_or(scheme.default_port());
    if port == 0 {
        return Err(invalid(
            key,
            format!("'{url}': port 0 cannot be connected to"),
        ));
    }
    Ok(RtmpUrl {
        scheme,
        host: host.to_string(),
        port,
        app: String::new(),
        stream: String::new(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls() {
        let l = parse_listen("k", "rtmps://[::1]:0").unwrap();
        assert_eq!(l.scheme, Scheme::Rtmps);
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
        assert_eq!(u.scheme, Scheme::Rtmps);
        assert_eq!(u.port, 443);
        assert_eq!(u.to_string(), "rtmps://backend.example.com:443");
        assert!(parse_upstream("k", "rtmpt://x:80").is_err());
        assert!(parse_upstream("k", "rtmp://x:0").is_err());
    }

    #[test]
    fn http_urls_share_the_host_rules() {
        let u = HttpUrl::parse("k", "http://[::1]:81/auth?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 81, "/auth?x=1")
        );
        assert_eq!(u.to_string(), "http://[::1]:81/auth?x=1");
        assert_eq!(HttpUrl::parse("k", "http://auth").unwrap().path, "/");
        let err = |url: &str| HttpUrl::parse("auth.on_play", url).unwrap_err().to_string();
        assert!(err("https://a/x").contains("not an http:// URL"));
        assert!(err("http://::1/x").contains("e.g. http://[::1]:8000/auth"));
        assert!(err("http://a:0/x").contains("port 0"));
        assert!(err("http://a:99999/x").starts_with("auth.on_play: "));
        assert!(err("http://a/x y").contains("spaces"));
    }

    #[test]
    fn client_urls_like_ffmpeg() {
        let u = RtmpUrl::parse("rtmpt://127.0.0.1:8080/live/bench0").unwrap();
        assert_eq!(u.scheme, Scheme::Rtmpt);
        assert_eq!(u.port, 8080);
        assert_eq!(u.app, "live");
        assert_eq!(u.stream, "bench0");
        assert_eq!(u.tc_url(), "rtmpt://127.0.0.1:8080/live");
        assert_eq!(u.to_string(), "rtmpt://127.0.0.1:8080/live/bench0");
        let u = RtmpUrl::parse("rtmps://localhost/live").unwrap();
        assert_eq!(u.port, 443);
        assert_eq!(u.stream, "");
        let u = RtmpUrl::parse("rtmp://[::1]:1935/a/b/c").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.stream, "b/c");
        let u = RtmpUrl::parse("rtmp://h/live/key?token=1").unwrap();
        assert_eq!(u.stream, "key?token=1");
        for bad in [
            "http://x/live",
            "rtmp://x",
            "rtmp://x:abc/live",
            "rtmp://x/",
        ] {
            let err = RtmpUrl::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("url: "), "{err}");
        }
    }
}
