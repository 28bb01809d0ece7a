//! Fuzzes the door's TLS server stream (`net::tls_stream::TlsStream`: rustls's unbuffered
//! API under our own buffers, the ClientHello peeked in place) in two ways, chosen by the
//! input's first byte:
//!
//! - raw (even): the rest of the input is what a client sends, the sniffed head (its first
//!   `b / 2` bytes) handed over as the door does; the stream must fail or end, never panic,
//!   and never read past its bounds.
//! - echo (odd): a real rustls client (tokio-rustls) completes a handshake with the stream
//!   and sends the rest of the input in writes of fuzzer-chosen sizes; the server side reads
//!   with a fuzzer-chosen buffer size and sends back what it read in vectored writes of
//!   fuzzer-chosen pieces, through a socket that takes and gives at most a fuzzer-chosen
//!   number of bytes per call (records split anywhere, partial writes). What the client reads
//!   back must equal what it sent, and both close_notify's must arrive.
//!
//! The mode byte also chooses the certificates served (bits 1-2: the ECDSA dev chain, an RSA
//! chain, or both, where each client gets the one it can take, as the default or for the name
//! `localhost` alone) and whether another handshake is under way (bit 3: with an RSA chain,
//! the steps that sign then run on the blocking pool); raw mode's head is `b >> 4` bytes.
//!
//! Everything runs on tokio's paused clock over an in-memory pipe; a run that stops moving
//! is a hang.
#![no_main]

use std::io;
use std::pin::Pin;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

#[path = "../async_harness.rs"]
mod async_harness;
use async_harness::paused_runtime;
use libfuzzer_sys::fuzz_target;
use rtmpgate::net::tls::{self, CertSource, SniResolver};
use rtmpgate::net::tls_stream::TlsStream;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const HANG: Duration = Duration::from_secs(3600);

/// A socket that takes and gives at most `max` bytes per call.
struct Trickle<S> {
    inner: S,
    max: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Trickle<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let max = self.max.min(buf.remaining());
        let mut small = vec![0u8; max];
        let mut rb = ReadBuf::new(&mut small);
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut rb);
        buf.put_slice(rb.filled());
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Trickle<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = self.max.min(buf.len());
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A throwaway RSA 2048 CA and localhost chain for fuzzing only (fuzz/certs-rsa).
const RSA_CA: &[u8] = include_bytes!("../certs-rsa/ca.pem");
const RSA_CHAIN: &[u8] = include_bytes!("../certs-rsa/chain.pem");
const RSA_KEY: &[u8] = include_bytes!("../certs-rsa/key.pem");

/// The certificates a run's server answers with.
#[derive(Clone, Copy, Debug)]
struct Served {
    /// 0: the ECDSA dev chain; 1: the RSA chain; 2: both; 3: the RSA chain, and both for
    /// `localhost` (the name the echo client asks).
    chains: u8,
    /// Another handshake counted as under way beside this one.
    company: bool,
}

impl Served {
    fn from_mode(mode: u8) -> Served {
        Served {
            chains: (mode >> 1) & 3,
            company: mode & 8 != 0,
        }
    }
}

fn server_config(served: Served) -> tls::TlsServer {
    static KEYS: OnceLock<(Arc<CertifiedKey>, Arc<CertifiedKey>)> = OnceLock::new();
    let (ecdsa, rsa) = KEYS.get_or_init(|| {
        let dev = tls::load_certified_key(&CertSource::EmbeddedDev).expect("dev certificate");
        let rsa = tls::certified_key_from_pem(
            RSA_CHAIN,
            Path::new("fuzz/certs-rsa/chain.pem"),
            RSA_KEY,
            Path::new("fuzz/certs-rsa/key.pem"),
        )
        .expect("RSA chain");
        (dev, rsa)
    });
    let resolver = match served.chains {
        0 => SniResolver::new(ecdsa.clone()),
        1 => SniResolver::new(rsa.clone()),
        2 => {
            let mut r = SniResolver::new(rsa.clone());
            r.add_default(ecdsa.clone());
            r
        }
        _ => {
            let mut r = SniResolver::new(rsa.clone());
            r.add("localhost", rsa.clone());
            r.add("localhost", ecdsa.clone());
            r
        }
    };
    tls::server_config(resolver).expect("server config")
}

fn client_config() -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let ca = include_bytes!("../../certs/ca.pem");
    for pem in [&ca[..], RSA_CA] {
        for cert in tls::certs_from_pem(pem, Path::new("ca")).expect("CA") {
            roots.add(cert).expect("CA cert");
        }
    }
    Arc::new(
        ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

async fn raw(data: &[u8], head_len: usize, served: Served) {
    let config = server_config(served);
    let _company = served.company.then(|| config.handshake_begins());
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let head_len = head_len.min(data.len());
    let (head, rest) = data.split_at(head_len);
    let rest = rest.to_vec();
    let writer = tokio::spawn(async move {
        let _ = client.write_all(&rest).await;
        let _ = client.shutdown().await;
        // Read (and drop) whatever the server answers, until it closes.
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let serve = async {
        let Ok(mut tls) = TlsStream::accept(server, head, &config).await else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        let _ = tls.shutdown().await;
    };
    tokio::time::timeout(HANG, serve)
        .await
        .expect("the TLS stream did not end after its client's bytes ended");
    tokio::time::timeout(HANG, writer)
        .await
        .expect("the client did not see the end")
        .expect("client task");
}

async fn echo(data: &[u8], served: Served) {
    // Knobs from the first bytes, the payload after them.
    let [wire, read_size, write_pieces, client_writes, rest @ ..] = data else {
        return;
    };
    let wire = usize::from(*wire) * 16 + 1;
    let read_size = usize::from(*read_size) * 64 + 1;
    let piece = usize::from(*write_pieces) * 32 + 1;
    let client_write = usize::from(*client_writes) * 128 + 1;
    // The payload, twice: a longer input crosses several records.
    let payload: Vec<u8> = rest.iter().copied().cycle().take(rest.len() * 2).collect();
    let config = server_config(served);
    let _company = served.company.then(|| config.handshake_begins());
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let io = Trickle {
            inner: server_io,
            max: wire,
        };
        let mut tls = TlsStream::accept(io, &[], &config)
            .await
            .expect("handshake with a real client");
        let mut buf = vec![0u8; read_size];
        loop {
            let n = tls
                .read(&mut buf)
                .await
                .expect("reading what the client sent");
            if n == 0 {
                break;
            }
            // Sent back in vectored writes of `piece`-byte slices.
            let mut left = &buf[..n];
            while !left.is_empty() {
                let slices: Vec<io::IoSlice<'_>> =
                    left.chunks(piece).map(io::IoSlice::new).collect();
                let took = tls.write_vectored(&slices).await.expect("echoing");
                assert!(took > 0, "a vectored write took nothing");
                left = &left[took..];
            }
            tls.flush().await.expect("flush");
        }
        tls.shutdown().await.expect("close_notify");
    });
    let connector = tokio_rustls::TlsConnector::from(client_config());
    let name = ServerName::try_from("localhost").expect("name");
    let client = connector
        .connect(name, client_io)
        .await
        .expect("client handshake");
    let (mut rd, mut wr) = tokio::io::split(client);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(client_write) {
            wr.write_all(chunk).await.expect("client write");
        }
        wr.shutdown().await.expect("client close_notify");
    });
    let mut back = Vec::with_capacity(payload.len());
    tokio::time::timeout(HANG, rd.read_to_end(&mut back))
        .await
        .expect("the echo did not end")
        .expect("the echo ended with an error (no close_notify?)");
    assert!(
        back == payload,
        "echoed {} bytes, sent {}: they differ",
        back.len(),
        payload.len()
    );
    writer.await.expect("writer");
    tokio::time::timeout(HANG, server)
        .await
        .expect("the server side did not end")
        .expect("server task");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let rt = paused_runtime();
    rt.block_on(async {
        let served = Served::from_mode(mode);
        if mode % 2 == 0 {
            raw(data, usize::from(mode >> 4), served).await;
        } else {
            echo(data, served).await;
        }
    });
});
