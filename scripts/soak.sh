#!/usr/bin/env bash
# Long soak of rtmpgate: at least 200 concurrent sessions over mixed transports for several
# minutes, through the built-in engine and through the gateway to nginx-rtmp, then a check
# that the gateway's fds are back to baseline and its memory near it.
#
# Each run (engine, then relay) has one ffmpeg publisher with four real players (ffmpeg over
# rtmps, rtmpt and rtmpts; rtmpdump over rtmp) whose packets must be one contiguous run of
# the source, plus raw-socket RTMP players on that stream and raw publishers that number
# every audio message, whose raw players must see every number in order. The test is
# tests/soak.rs (its short form runs with `cargo test`); this script runs the ignored long
# form in a release build.
#
# Usage: scripts/soak.sh [engine|relay|both]        (default: both, one after the other)
# Sizes (environment, defaults in brackets):
#   SOAK_SECS              seconds of media per publisher             [300]
#   SOAK_RAW_PLAYERS       raw players on the ffmpeg stream           [120]
#   SOAK_RAW_PUBLISHERS    raw publishers, each on its own key        [20]
#   SOAK_RAW_PLAYERS_EACH  raw players per raw publisher              [4]
# Sessions per run = 5 + SOAK_RAW_PLAYERS + SOAK_RAW_PUBLISHERS * (1 + SOAK_RAW_PLAYERS_EACH)
# = 225 with the defaults. Needs the peers from scripts/install-peers.sh. Takes about
# SOAK_SECS + 60 s per run (plus a release build and encoding the source once).
set -euo pipefail
cd "$(dirname "$0")/.."

which="${1:-both}"
export SOAK_SECS="${SOAK_SECS:-300}"
export SOAK_RAW_PLAYERS="${SOAK_RAW_PLAYERS:-120}"
export SOAK_RAW_PUBLISHERS="${SOAK_RAW_PUBLISHERS:-20}"
export SOAK_RAW_PLAYERS_EACH="${SOAK_RAW_PLAYERS_EACH:-4}"
sessions=$((5 + SOAK_RAW_PLAYERS + SOAK_RAW_PUBLISHERS * (1 + SOAK_RAW_PLAYERS_EACH)))
echo "soak: ${sessions} sessions per run, ${SOAK_SECS} s of media"
# The raw clients are threads in the test process, each with a socket; the gateway needs an
# fd per client and per backend leg.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

case "$which" in
  engine) tests=(soak_long_engine) ;;
  relay) tests=(soak_long_relay_to_nginx) ;;
  both) tests=(soak_long_engine soak_long_relay_to_nginx) ;;
  *) echo "usage: $0 [engine|relay|both]" >&2; exit 2 ;;
esac
for t in "${tests[@]}"; do
  echo "soak: running $t"
  cargo test --release --test soak -- --ignored --exact "$t" --nocapture --test-threads 1
done
echo "soak: passed"
