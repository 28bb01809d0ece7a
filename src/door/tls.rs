//! TLS server and client configuration (tokio-rustls), PEM loading, SNI certificates.
