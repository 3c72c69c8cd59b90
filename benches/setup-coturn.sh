#!/usr/bin/env bash
# Puts Debian's coturn daemon in /opt/coturn for `cargo bench --bench compare`
# without installing the package (which would own /usr/bin/turnserver and
# /etc/turnserver.conf, and conflicts with turnserver's own package).
#
# Installs those of coturn's runtime libraries that are missing with apt
# (upgrading none that are installed), downloads the coturn package, unpacks
# it under /opt/coturn and checks that its turnserver runs.
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

DEST=${COTURN_DIR:-/opt/coturn}
if [ -x "$DEST/usr/bin/turnserver" ] && "$DEST/usr/bin/turnserver" --version >/dev/null 2>&1; then
    echo "coturn $("$DEST/usr/bin/turnserver" --version 2>/dev/null | head -n 1) is in $DEST"
    exit 0
fi

# coturn's Depends (bookworm, 4.6.1) minus the tools it needs as a service.
missing=()
for p in libevent-core-2.1-7 libevent-extra-2.1-7 libevent-openssl-2.1-7 \
    libevent-pthreads-2.1-7 libhiredis0.14 libmariadb3 libpq5 libsqlite3-0 \
    libssl3 libsystemd0; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
as_root apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade "${missing[@]}"
fi
download=$(mktemp -d)
chmod 755 "$download"
if getent passwd _apt >/dev/null; then as_root chown _apt "$download"; fi
(cd "$download" && as_root apt-get download -q coturn)
as_root mkdir -p "$DEST"
as_root dpkg-deb -x "$download"/coturn_*.deb "$DEST"
as_root rm -rf "$download"
if ldd "$DEST/usr/bin/turnserver" | grep -q "not found"; then
    ldd "$DEST/usr/bin/turnserver" | grep "not found" >&2
    echo "coturn's libraries are missing" >&2
    exit 1
fi
echo "coturn $("$DEST/usr/bin/turnserver" --version 2>/dev/null | head -n 1) is in $DEST"
