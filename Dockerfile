# rtmpgate container image: a multi-stage build (Rust toolchain only in the build stage), a
# small Debian runtime, a non-root user. No certificate is baked in, not even the dev one
# (the binary is built without the dev-cert feature): mount yours (e.g. /etc/letsencrypt)
# and point [tls] cert/key at them; without a TLS listener none is needed.
#
#   docker build -t rtmpgate .
#   docker run --rm -p 1935:1935 -p 8080:8080 \
#       -v "$PWD/examples/docker/rtmpgate.toml:/etc/rtmpgate/rtmpgate.toml:ro" rtmpgate
#
# The admin listener (metrics, health, API) binds 127.0.0.1 by default, which is not reachable
# from outside a container: set [admin] listen = "0.0.0.0:9935" with [admin] token (or the
# RTMPGATE_ADMIN_TOKEN environment variable) and publish 9935 to scrape it.

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so editing the sources does not rebuild them.
# (src/rtmp is the workspace's protocol crate, rtmpgate-proto, and src/tools its tools crate,
# rtmpgate-tools: their manifests too.)
COPY Cargo.toml Cargo.lock ./
COPY src/rtmp/Cargo.toml ./src/rtmp/
COPY src/tools/Cargo.toml ./src/tools/
RUN mkdir -p src/tools/bench benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo '' > src/lib.rs \
 && echo '' > src/rtmp/lib.rs \
 && echo '' > src/tools/lib.rs \
 && echo 'fn main() {}' > src/tools/bench/main.rs \
 && echo 'fn main() {}' > benches/codec.rs \
 && cargo fetch --locked
COPY src ./src
COPY benches ./benches
# Without the dev-cert feature: the public dev certificate is neither compiled in nor copied,
# so a TLS listener without a mounted certificate refuses to start (it never serves a key
# everyone has).
RUN cargo build --release --locked --no-default-features --bin rtmpgate \
 && install -D -m 0755 target/release/rtmpgate /out/rtmpgate

FROM debian:bookworm-slim
# ca-certificates: verifying an rtmps:// upstream against the system roots. Not pinned on
# purpose: root store updates should reach a rebuilt image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 rtmpgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin rtmpgate \
 && mkdir -p /etc/rtmpgate
COPY --from=build /out/rtmpgate /usr/local/bin/rtmpgate
USER 10001:10001
# Unprivileged ports (a non-root user cannot bind below 1024); map 80/443 to them outside.
EXPOSE 1935 8080 8443 9935
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/rtmpgate"]
CMD ["--config", "/etc/rtmpgate/rtmpgate.toml"]
