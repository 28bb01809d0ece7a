#!/bin/sh
# Regenerates the public, testing-only dev CA and the localhost certificate in this directory.
# Needs openssl (1.1.1 or newer). Usage: certs/make-dev-certs.sh [OUTPUT_DIR]
set -eu
out="${1:-$(dirname "$0")}"
days=3650
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The CA: ECDSA P-256, allowed to sign certificates and nothing else.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" \
    -subj "/O=rtmpgate development (public key, testing only)/CN=rtmpgate dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$out/ca.pem"

# The leaf: localhost, 127.0.0.1 and ::1, usable by TLS servers only.
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$out/localhost.key"
openssl req -new -key "$out/localhost.key" -subj "/CN=localhost" -out "$tmp/localhost.csr"
cat > "$tmp/leaf.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in "$tmp/localhost.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
    -CAcreateserial -CAserial "$tmp/ca.srl" -sha256 -days "$days" \
    -extfile "$tmp/leaf.ext" -out "$tmp/leaf.pem"

# Served chain: leaf first, then the CA (like Let's Encrypt's fullchain.pem).
cat "$tmp/leaf.pem" "$out/ca.pem" > "$out/localhost.pem"
chmod 0644 "$out/ca.key" "$out/localhost.key"
echo "wrote $out/ca.pem $out/ca.key $out/localhost.pem $out/localhost.key"
