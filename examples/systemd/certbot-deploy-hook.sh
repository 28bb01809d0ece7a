#!/bin/sh
# certbot deploy hook for rtmpgate: after a renewal, copy the new chain and key where the
# service user can read them and tell rtmpgate to load them (SIGHUP: sessions stay open).
#
#   install -m 0755 examples/systemd/certbot-deploy-hook.sh \
#       /etc/letsencrypt/renewal-hooks/deploy/rtmpgate.sh
#
# certbot sets RENEWED_LINEAGE (/etc/letsencrypt/live/NAME) for deploy hooks. Point the
# config at the copies: [tls] cert = "/etc/rtmpgate/tls/NAME/fullchain.pem",
# key = "/etc/rtmpgate/tls/NAME/privkey.pem".
set -eu
: "${RENEWED_LINEAGE:?run by certbot as a deploy hook}"
name=$(basename "$RENEWED_LINEAGE")
dest=/etc/rtmpgate/tls/$name
install -d -m 0750 -g rtmpgate "$dest"
# Each file replaced in one rename; a reload by someone else between the two renames sees a
# key that does not match the chain, fails, and keeps serving the current pair.
install -m 0640 -g rtmpgate "$RENEWED_LINEAGE/privkey.pem" "$dest/privkey.pem.new"
install -m 0644 -g rtmpgate "$RENEWED_LINEAGE/fullchain.pem" "$dest/fullchain.pem.new"
mv "$dest/privkey.pem.new" "$dest/privkey.pem"
mv "$dest/fullchain.pem.new" "$dest/fullchain.pem"
systemctl reload rtmpgate
