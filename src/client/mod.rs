//! A small async RTMP client built on the sans-IO codec: URL parsing, the transports
//! (rtmp, rtmps, rtmpt, rtmpts) and a connection that speaks the publish and play command
//! sequences. The load generator `rtmpgate-bench` is its main user; tests and tools may reuse it.

pub mod conn;
pub mod tunnel;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use conn::{ClientError, RtmpConnection};

use crate::stream::ByteStream;

/// The transports the client speaks, named by their URL schemes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Rtmp,
    Rtmps,
    Rtmpt,
    Rtmpts,
}

impl Scheme {
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
            Scheme::Rtmps | Scheme::Rtmpts => 443,
            Scheme::Rtmpt => 80,
        }
    }

    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Rtmps | Scheme::Rtmpts)
    }

    pub fn is_tunnel(self) -> bool {
        matches!(self, Scheme::Rtmpt | Scheme::Rtmpts)
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `SCHEME://HOST[:PORT]/APP[/STREAM]`, as ffmpeg takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtmpUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub app: String,
    /// Stream name; empty when the URL names only the application.
    pub stream: String,
}

impl RtmpUrl {
    /// Parses a URL; the stream name is everything after the first path segment.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::Url(format!("{s:?}: {why}"));
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| bad("expected SCHEME://HOST[:PORT]/APP[/STREAM]"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "rtmp" => Scheme::Rtmp,
            "rtmps" => Scheme::Rtmps,
            "rtmpt" => Scheme::Rtmpt,
            "rtmpts" => Scheme::Rtmpts,
            _ => return Err(bad("scheme must be rtmp, rtmps, rtmpt or rtmpts")),
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (h, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("port is not a number"))?,
                None if after.is_empty() => scheme.default_port(),
                None => return Err(bad("junk after ]")),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("port is not a number"))?),
                None => (authority, scheme.default_port()),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let (app, stream) = path.split_once('/').unwrap_or((path, ""));
        if app.is_empty() {
            return Err(bad("no application name (e.g. /live)"));
        }
        Ok(RtmpUrl {
            scheme,
            host: host.to_owned(),
            port,
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

/// How TLS servers are checked.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// Accept any certificate (load tests against a self-signed server).
    pub insecure: bool,
    /// PEM file of CA certificates to trust instead of the system's.
    pub ca: Option<PathBuf>,
}

impl TlsOptions {
    /// A connector for these options; build it once and share it.
    pub fn connector(&self) -> Result<TlsConnector, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Tls(format!("TLS set-up: {e}")))?;
        let config = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match &self.ca {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        ClientError::Tls(format!("cannot read CA file {}: {e}", path.display()))
                    })?;
                    let certs: Vec<CertificateDer<'static>> =
                        rustls_pemfile_certs(&pem).map_err(|e| {
                            ClientError::Tls(format!("CA file {}: {e}", path.display()))
                        })?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(ClientError::Tls(format!(
                            "CA file {} holds no usable certificate",
                            path.display()
                        )));
                    }
                }
                None => {
                    let native = rustls_native_certs::load_native_certs();
                    roots.add_parsable_certificates(native.certs);
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))
}

/// Accepts every server certificate but still checks the handshake signatures, so the
/// TLS work measured is the same as with verification.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Tells a tunnel whether to poll the server eagerly. Raw transports ignore it.
///
/// RTMPT has no server push: the client must ask (`/idle`). A player, or a client awaiting
/// a reply, wants to ask at once; a publisher that is streaming would only have its next
/// `/send` stuck behind an idle the server holds open, so it polls rarely.
#[derive(Clone, Debug, Default)]
pub struct PollHint(Arc<AtomicBool>);

impl PollHint {
    pub fn set_eager(&self, eager: bool) {
        self.0.store(eager, Ordering::Relaxed);
    }
    pub fn eager(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Opens the byte stream for `url`: TCP, TLS over TCP, or an HTTP tunnel (over either).
pub async fn open_transport(
    url: &RtmpUrl,
    tls: Option<&TlsConnector>,
    hint: PollHint,
) -> Result<Box<dyn ByteStream>, ClientError> {
    let addr = format!("{}:{}", url.host, url.port);
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| ClientError::Connect(addr.clone(), e))?;
    tcp.set_nodelay(true)
        .map_err(|e| ClientError::Connect(addr.clone(), e))?;
    let io: Box<dyn ByteStream> = if url.scheme.is_tls() {
        let connector = tls
            .ok_or_else(|| ClientError::Tls(format!("{}:// needs a TLS connector", url.scheme)))?;
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| ClientError::Tls(format!("server name {:?}: {e}", url.host)))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(format!("TLS handshake with {addr} failed: {e}")))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    if url.scheme.is_tunnel() {
        let host = format!("{}:{}", url.host, url.port);
        Ok(Box::new(tunnel::open(io, host, hint).await?))
    } else {
        Ok(io)
    }
}

/// The peer address of a URL, for messages.
pub fn describe(url: &RtmpUrl) -> String {
    format!("{}://{}:{}", url.scheme, url.host, url.port)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_like_ffmpeg() {
        let u = RtmpUrl::parse("rtmpt://127.0.0.1:8080/live/bench0").unwrap();
        assert_eq!(u.scheme, Scheme::Rtmpt);
        assert_eq!(u.port, 8080);
        assert_eq!(u.app, "live");
        assert_eq!(u.stream, "bench0");
        assert_eq!(u.tc_url(), "rtmpt://127.0.0.1:8080/live");
        let u = RtmpUrl::parse("rtmps://localhost/live").unwrap();
        assert_eq!(u.port, 443);
        assert_eq!(u.stream, "");
        let u = RtmpUrl::parse("rtmp://[::1]:1935/a/b/c").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.stream, "b/c");
        assert!(RtmpUrl::parse("http://x/live").is_err());
        assert!(RtmpUrl::parse("rtmp://x").is_err());
        assert!(RtmpUrl::parse("rtmp://x:abc/live").is_err());
    }
}
