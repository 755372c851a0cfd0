#!/usr/bin/env bash
# Install or update one cache-plane cluster member on this host, idempotently. As root:
#
#   deploy/install.sh node1            # this host runs member node1 (deploy/config/node1.toml)
#
# Creates the cache-plane system user, /opt/cache-plane/venv (the package from this source
# tree), /etc/cache-plane/{node1.toml,secrets/}, the systemd template unit, and enables
# cache-plane@node1. Re-running upgrades the package and unit and keeps configs and secrets.
# The Raft password and the tokens must be the same on every member: the first run generates
# them in /etc/cache-plane/secrets/ (raft-password; api-token = admin; route-token,
# read-token and the role file `tokens` listing them; mode 0400, owned by cache-plane); copy
# that directory to the other hosts before installing there. TLS certificates are yours to
# bring: /etc/cache-plane/tls/{ca.crt,member.crt,member.key} (docs/security.md shows openssl
# commands); a member beyond loopback refuses to start without them. Then start:
# systemctl start cache-plane@node1 (see docs/operations.md for bootstrap order and checks).
#
#   deploy/install.sh gateway          # this host runs an OpenAI-compatible gateway instead
#
# installs /etc/cache-plane/gateway.toml and secrets/gateway-keys.toml (0400, cache-plane) from
# the examples and enables cache-plane-gateway (docs/gateway.md).
set -euo pipefail

MEMBER=${1:?usage: deploy/install.sh MEMBER   (e.g. node1; uses deploy/config/MEMBER.toml)}
case "$MEMBER" in *[!A-Za-z0-9_-]*) echo "member name must be [A-Za-z0-9_-]+" >&2; exit 2;; esac
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/cache-plane
ETC=/etc/cache-plane
UNIT_DIR=/etc/systemd/system

if [ "$(id -u)" -ne 0 ]; then echo "run as root" >&2; exit 1; fi

# Python 3.11+ with venv; systemd-analyze for the unit check below.
if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    if command -v apt-get >/dev/null; then
        apt-get update -q && apt-get install -y -q python3 python3-venv
    else
        echo "need Python >= 3.11 with the venv module" >&2; exit 1
    fi
fi
command -v systemd-analyze >/dev/null || { command -v apt-get >/dev/null && apt-get install -y -q systemd; } || true

getent group cache-plane >/dev/null || groupadd --system cache-plane
getent passwd cache-plane >/dev/null || useradd --system --gid cache-plane \
    --home-dir /var/lib/cache-plane --no-create-home --shell /usr/sbin/nologin cache-plane

[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade pip
"$PREFIX/venv/bin/python" -m pip install --quiet --upgrade "$SRC"

install -d -m 0755 -o root -g root "$ETC"
install -d -m 0750 -o root -g cache-plane "$ETC/secrets"
for secret in raft-password api-token route-token read-token; do
    if [ ! -s "$ETC/secrets/$secret" ]; then
        (umask 077; "$PREFIX/venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(32))' \
            > "$ETC/secrets/$secret")
        echo "generated $ETC/secrets/$secret: copy it to the other members"
    fi
    chown cache-plane:cache-plane "$ETC/secrets/$secret"
    chmod 0400 "$ETC/secrets/$secret"
done
if [ ! -s "$ETC/secrets/tokens" ]; then  # the role file members read (tokens_file)
    (umask 077; printf 'route %s\nread %s\n' "$(cat "$ETC/secrets/route-token")" \
        "$(cat "$ETC/secrets/read-token")" > "$ETC/secrets/tokens")
fi
chown cache-plane:cache-plane "$ETC/secrets/tokens"
chmod 0400 "$ETC/secrets/tokens"
install -d -m 0750 -o root -g cache-plane "$ETC/tls"
for file in ca.crt member.crt member.key; do
    [ -s "$ETC/tls/$file" ] || echo "missing $ETC/tls/$file: put the member's TLS files there (docs/security.md)"
done
if [ "$MEMBER" = gateway ]; then
    [ -f "$ETC/gateway.toml" ] || install -m 0644 "$SRC/deploy/config/gateway.toml" "$ETC/gateway.toml"
    [ -f "$ETC/secrets/gateway-keys.toml" ] || install -m 0400 -o cache-plane -g cache-plane \
        "$SRC/deploy/config/gateway-keys.example.toml" "$ETC/secrets/gateway-keys.toml"
    echo "installed $ETC/gateway.toml and secrets/gateway-keys.toml from the examples: edit both"
    install -m 0644 "$SRC/deploy/systemd/cache-plane-gateway.service" "$UNIT_DIR/cache-plane-gateway.service"
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable cache-plane-gateway.service
        echo "enabled cache-plane-gateway; start it with: systemctl start cache-plane-gateway"
    fi
    exit 0
fi
if [ ! -f "$ETC/$MEMBER.toml" ]; then
    install -m 0644 "$SRC/deploy/config/$MEMBER.toml" "$ETC/$MEMBER.toml"
    echo "installed $ETC/$MEMBER.toml from the example: set this host's addresses in it"
fi
[ -f "$ETC/$MEMBER.env" ] || install -m 0644 "$SRC/deploy/config/cache-plane.env.example" "$ETC/$MEMBER.env"

install -m 0644 "$SRC/deploy/systemd/cache-plane@.service" "$UNIT_DIR/cache-plane@.service"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$UNIT_DIR/cache-plane@$MEMBER.service" || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable "cache-plane@$MEMBER.service"
    echo "enabled cache-plane@$MEMBER; start it with: systemctl start cache-plane@$MEMBER"
else
    echo "systemd is not running here; unit installed in $UNIT_DIR"
fi
