//! A small async RTMP client: the transports (rtmp, rtmps, rtmpt, rtmpts; URLs are the
//! gateway's `RtmpUrl`) and a connection ([`conn`]) that runs the protocol crate's sans-IO
//! `ClientSession` over one of them. The load generator `rtmpgate-bench` is its main user.

pub mod conn;
pub mod tunnel;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub use conn::{ClientError, RtmpConnection};
/// The client's URLs are the gateway's: one type and one parser, in [`rtmpgate::net::url`].
pub use rtmpgate::net::url::{RtmpUrl, Scheme};

use rtmpgate::stream::ByteStream;

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
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::tls("protocol versions", e))?;
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
                        ClientError::tls(format!("cannot read CA file {}", path.display()), e)
                    })?;
                    let certs = rtmpgate::net::tls::certs_from_pem(&pem, path)
                        .map_err(|e| ClientError::tls("CA file", e))?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(ClientError::TlsSetup(format!(
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
        let connector = tls.ok_or_else(|| {
            ClientError::TlsSetup(format!("{}:// needs a TLS connector", url.scheme))
        })?;
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| ClientError::tls(format!("server name {:?}", url.host), e))?;
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::tls(format!("handshake with {addr}"), e))?;
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
