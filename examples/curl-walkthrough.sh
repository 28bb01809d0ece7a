#!/usr/bin/env bash
# A walk through one RTMPT session with curl: open, send C0+C1, idle until S0+S1+S2 are
# back, close. Prints what each step returns.
#
#   examples/curl-walkthrough.sh [BASE_URL]      (default http://127.0.0.1:8080)
#
# BASE_URL is an rtmpgate RTMPT listener (or any RTMPT server) in front of an RTMP
# server that answers the handshake. Every request is a separate curl call, hence a
# separate TCP connection: the session lives in the server's table, not on a connection.
set -euo pipefail

BASE=${1:-http://127.0.0.1:8080}
BASE=${BASE%/}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# post PATH BODYFILE: POST the file, reply body to $tmp/reply, print the HTTP status.
post() {
    curl -sS --max-time 10 -X POST -H 'Content-Type: application/x-fcs' \
        --data-binary @"$2" -o "$tmp/reply" -w '%{http_code}' "$BASE$1"
}
# hex FILE [SKIP] [COUNT]: bytes as hex.
hex() { od -An -tx1 -v -j "${2:-0}" -N "${3:-16}" "$1" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//'; }
size() { wc -c <"$1" | tr -d ' '; }

printf '\0' >"$tmp/zero"

echo "1. POST $BASE/fcs/ident2   (Flash's probe; clients ignore the answer)"
echo "   -> HTTP $(post /fcs/ident2 "$tmp/zero")"

echo "2. POST $BASE/open/1   (body: one 0x00 byte)"
code=$(post /open/1 "$tmp/zero")
id=$(tr -d '\n' <"$tmp/reply")
echo "   -> HTTP $code, $(size "$tmp/reply") bytes: session id '$id' + newline"
[ "$code" = 200 ] || { echo "open failed" >&2; exit 1; }

# C0 = 0x03 (plain RTMP), C1 = time (4 bytes) + zero (4 bytes) + 1528 random bytes.
{ printf '\003\0\0\0\0\0\0\0\0'; head -c 1528 /dev/urandom; } >"$tmp/c0c1"
echo "3. POST $BASE/send/$id/0   (body: C0+C1, $(size "$tmp/c0c1") bytes)"
code=$(post "/send/$id/0" "$tmp/c0c1")
got=$(( $(size "$tmp/reply") - 1 ))
echo "   -> HTTP $code, polling byte $(hex "$tmp/reply" 0 1), $got server bytes"

seq=1
want=3073 # S0+S1+S2 = 1 + 1536 + 1536; each reply's polling byte is stripped
: >"$tmp/server"
tail -c +2 "$tmp/reply" >>"$tmp/server"
while [ "$(size "$tmp/server")" -lt "$want" ] && [ $seq -lt 30 ]; do
    echo "4. POST $BASE/idle/$id/$seq   (body: one 0x00 byte)"
    code=$(post "/idle/$id/$seq" "$tmp/zero")
    got=$(( $(size "$tmp/reply") - 1 ))
    echo "   -> HTTP $code, polling byte $(hex "$tmp/reply" 0 1), $got server bytes"
    [ "$code" = 200 ] || { echo "idle failed" >&2; exit 1; }
    tail -c +2 "$tmp/reply" >>"$tmp/server"
    seq=$((seq + 1))
done
total=$(size "$tmp/server")
echo "   server bytes so far: $total (S0+S1+S2 is 3073)"
echo "   S0 (version): $(hex "$tmp/server" 0 1)  S1 starts: $(hex "$tmp/server" 1 8)"
if [ "$total" -ge "$want" ]; then
    if cmp -s <(tail -c +1538 "$tmp/server" | head -c 1536 | tail -c 1528) <(tail -c 1528 "$tmp/c0c1"); then
        echo "   S2 echoes C1's random bytes: handshake answered"
    else
        echo "   S2 does not echo C1 (a server may do so with the digest scheme)"
    fi
fi

echo "5. POST $BASE/close/$id/$seq   (body: one 0x00 byte)"
code=$(post "/close/$id/$seq" "$tmp/zero")
echo "   -> HTTP $code, body: $(hex "$tmp/reply" 0 4)"

seq=$((seq + 1))
echo "6. POST $BASE/idle/$id/$seq   (after close: the session is gone)"
echo "   -> HTTP $(post "/idle/$id/$seq" "$tmp/zero")"
