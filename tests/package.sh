#!/usr/bin/env bash
# Debian package test (run as root by tests/run-all.sh): builds the .deb with
# `cargo deb`, installs it with apt, checks what it put on the machine, runs
# the installed binary the way the systemd unit does (as the turnserver user,
# with /etc/turnserver.conf) on free loopback ports, edits the config and
# reloads it as an operator would, relays through it with coturn's client,
# then purges the package and checks nothing is left behind.
#
# Needs: root, apt, cargo-deb, systemd-analyze, turnutils_* (coturn's client
# tools; tests/run-all.sh unpacks them into /opt/coturn-tools/usr/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/package.sh installs a package: run it as root" >&2
    exit 1
fi
export PATH="/opt/coturn-tools/usr/bin:$PATH"
for tool in cargo-deb systemd-analyze turnutils_uclient turnutils_peer turnutils_stunclient; do
    if ! command -v "$tool" >/dev/null; then
        echo "FAIL: $tool is not installed (tests/run-all.sh installs it)" >&2
        exit 1
    fi
done
if dpkg-query -W -f='${Status}' turnserver 2>/dev/null | grep -q 'ok installed'; then
    echo "FAIL: a turnserver package is already installed; this test would replace it" >&2
    exit 1
fi

work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -q turnserver >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "FAIL: $*" >&2
    if [ -f "$work/server.log" ]; then
        echo "---- server log ----" >&2
        cat "$work/server.log" >&2
    fi
    exit 1
}
check() { # check "description" command...
    local what=$1
    shift
    "$@" || fail "$what"
    echo "ok: $what"
}
equals() { # equals "description" actual expected
    [ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"
    echo "ok: $1"
}

# Runs a command as the turnserver user, as systemd's User= does.
as_service_user() {
    setpriv --reuid=turnserver --regid=turnserver --init-groups -- "$@"
}

# Free loopback ports: 4 in a row for the listeners, 2 for turnutils_peer.
free_port_block() {
    python3 - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(1000):
    base = random.randrange(20000, 32000 - n)
    socks = []
    try:
        for p in range(base, base + n):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                s.bind(("127.0.0.1", p))
                socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks:
            s.close()
    print(base)
    break
else:
    sys.exit("no free ports")
EOF
}

echo "==> cargo deb"
deb=$(cargo deb --locked 2>"$work/cargo-deb.log" | tail -n 1) || {
    cat "$work/cargo-deb.log" >&2
    fail "cargo deb"
}
check "cargo deb built $deb" test -f "$deb"
cp "$deb" "$work/turnserver.deb"

echo "==> apt-get install ./turnserver.deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$work/turnserver.deb" \
    >"$work/install.log" 2>&1 || {
    cat "$work/install.log" >&2
    fail "the package installs"
}
equals "package status" "$(dpkg-query -W -f='${Status}' turnserver)" "install ok installed"
check "/usr/bin/turnserver comes from the package" \
    sh -c 'dpkg -S /usr/bin/turnserver | grep -q "^turnserver:"'
check "/etc/turnserver.conf is a conffile" \
    sh -c "dpkg-query -W -f='\${Conffiles}' turnserver | grep -q '/etc/turnserver.conf '"
check "turnserver --version" sh -c '/usr/bin/turnserver --version | grep -q "^turnserver "'
check "turnbench, the load generator, is installed" sh -c '/usr/bin/turnbench --version | grep -q "^turnbench "'

# The system user, its directories, and who may read the secrets.
check "system user turnserver exists" getent passwd turnserver
uid=$(id -u turnserver)
check "turnserver is a system user (uid $uid)" test "$uid" -lt 1000
shell=$(getent passwd turnserver | cut -d: -f7)
check "turnserver cannot log in (shell $shell)" \
    sh -c "case '$shell' in */nologin | */false) true ;; *) false ;; esac"
equals "/etc/turnserver.conf owner and mode" "$(stat -c '%U:%G %a' /etc/turnserver.conf)" \
    "root:turnserver 640"
equals "/var/lib/turnserver owner and mode" "$(stat -c '%U:%G %a' /var/lib/turnserver)" \
    "turnserver:turnserver 750"
equals "/var/log/turnserver owner and mode" "$(stat -c '%U:%G %a' /var/log/turnserver)" \
    "turnserver:turnserver 750"

# The unit: installed, enabled for boot, valid.
unit=/usr/lib/systemd/system/turnserver.service
check "unit installed" test -f "$unit"
check "unit enabled for multi-user.target" \
    test -L /etc/systemd/system/multi-user.target.wants/turnserver.service
systemd-analyze verify "$unit" >"$work/verify.log" 2>&1 || {
    cat "$work/verify.log" >&2
    fail "systemd-analyze verify $unit"
}
if grep -v "^$" "$work/verify.log" | grep -q .; then
    cat "$work/verify.log" >&2
    fail "systemd-analyze verify $unit printed warnings"
fi
echo "ok: systemd-analyze verify $unit"
for line in Type=notify ExecReload= User=turnserver After=network-online.target \
    AmbientCapabilities=CAP_NET_BIND_SERVICE WatchdogSec= LimitNOFILE=; do
    check "unit has $line" grep -q "^$line" "$unit"
done

# The shipped config is valid, and safe: credentials on, nobody can log in.
/usr/bin/turnserver --check-config -c /etc/turnserver.conf >"$work/check.out" 2>"$work/check.err" || {
    cat "$work/check.out" "$work/check.err" >&2
    fail "turnserver --check-config -c /etc/turnserver.conf"
}
echo "ok: turnserver --check-config -c /etc/turnserver.conf"
check "the shipped config turns lt-cred-mech on" grep -qx "lt-cred-mech=on" "$work/check.out"
check "--check-config says nobody can log in yet" grep -q "every client will be refused" "$work/check.err"
as_service_user /usr/bin/turnserver --check-config -c /etc/turnserver.conf >/dev/null 2>&1 ||
    fail "the service user cannot read /etc/turnserver.conf"
echo "ok: the service user can read its config"

# Run the installed binary as the unit does (user turnserver, the shipped
# config), with the listeners moved to free loopback ports on the command
# line, which also wins over the file on reload. (setpriv execs in place, so
# $! is the server itself.)
base=$(free_port_block 4)
port=$base
peer_port=$(free_port_block 2)
relay_lo=$((61000 + RANDOM % 4000))
relay_hi=$((relay_lo + 99))
setpriv --reuid=turnserver --regid=turnserver --init-groups -- \
    /usr/bin/turnserver -c /etc/turnserver.conf --listening-ip=127.0.0.1 --listening-port="$port" --tls-listening-port=$((base + 1)) \
    --no-tls --min-port="$relay_lo" --max-port="$relay_hi" --allow-loopback-peers \
    --realm=package.test --prometheus --prometheus-address=127.0.0.1 \
    --prometheus-port=$((base + 2)) >"$work/server.log" 2>&1 &
pids+=($!)
server_pid=$!
for _ in $(seq 50); do
    turnutils_stunclient -p "$port" 127.0.0.1 >"$work/stun.out" 2>&1 && break
    sleep 0.2
done
check "the installed server answers STUN as user turnserver" \
    grep -q "UDP reflexive addr" "$work/stun.out"
equals "server process user" "$(ps -o user= -p "$server_pid")" turnserver

turnutils_peer -L 127.0.0.1 -p "$peer_port" >/dev/null 2>&1 &
pids+=($!)
sleep 0.3
uclient() {
    timeout 60 turnutils_uclient -u alice -w "$1" -e 127.0.0.1 -r "$peer_port" \
        -p "$port" -m 2 -n 50 -l 170 -z 5 127.0.0.1 >"$work/uclient.out" 2>&1 || true
}
uclient a-first-password
check "with no users in the config, TURN is refused" \
    sh -c "! grep -q 'Total lost packets 0 (0.000000%)' '$work/uclient.out'"

# The operator adds a user and reloads, as `systemctl reload` would.
echo "user=alice:a-first-password" >>/etc/turnserver.conf
kill -HUP "$server_pid"
for _ in $(seq 50); do
    grep -q "configuration reloaded" "$work/server.log" && break
    sleep 0.1
done
check "SIGHUP reloaded /etc/turnserver.conf" grep -q "configuration reloaded" "$work/server.log"
uclient a-first-password
check "after the reload, alice relays with no loss" \
    grep -q "Total lost packets 0 (0.000000%)" "$work/uclient.out"
python3 -c "import urllib.request,sys; print(urllib.request.urlopen(sys.argv[1]).read().decode())" \
    "http://127.0.0.1:$((base + 2))/metrics" >"$work/metrics.txt" || fail "scraping /metrics"
check "metrics count the relayed allocations" \
    grep -Eq '^turn_allocations_created_total [1-9]' "$work/metrics.txt"

# uclient leaves one allocation behind (it never refreshes it to 0): SIGTERM
# drains, with /health answering 503, and a second SIGTERM exits at once.
health() {
    python3 - "http://127.0.0.1:$((base + 2))/health" <<'EOF'
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1]).status)
except urllib.error.HTTPError as e:
    print(e.code)
EOF
}
equals "/health while serving" "$(health)" 200
kill -TERM "$server_pid"
sleep 1
check "SIGTERM with a live allocation drains instead of exiting" kill -0 "$server_pid"
equals "/health while draining" "$(health)" 503
kill -TERM "$server_pid"
for _ in $(seq 50); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$server_pid" 2>/dev/null; then fail "a second SIGTERM did not stop the server"; fi
wait "$server_pid" && status=0 || status=$?
equals "exit status after the second SIGTERM" "$status" 0

# Upgrading (here: reinstalling) keeps the operator's edited conffile and its
# permissions, and the maintainer scripts run again cleanly.
echo "==> dpkg -i (reinstall over an edited /etc/turnserver.conf)"
dpkg -i "$work/turnserver.deb" >"$work/reinstall.log" 2>&1 || {
    cat "$work/reinstall.log" >&2
    fail "reinstalling the package"
}
check "the edited /etc/turnserver.conf survives an upgrade" \
    grep -qx "user=alice:a-first-password" /etc/turnserver.conf
equals "/etc/turnserver.conf owner and mode after an upgrade" \
    "$(stat -c '%U:%G %a' /etc/turnserver.conf)" "root:turnserver 640"
equals "one turnserver user" "$(getent passwd | grep -c '^turnserver:')" 1

echo "==> apt-get purge turnserver"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q turnserver >"$work/purge.log" 2>&1 || {
    cat "$work/purge.log" >&2
    fail "apt-get purge turnserver"
}
check "/usr/bin/turnserver removed" test ! -e /usr/bin/turnserver
check "/usr/bin/turnbench removed" test ! -e /usr/bin/turnbench
check "/etc/turnserver.conf removed on purge" test ! -e /etc/turnserver.conf
check "unit removed" test ! -e "$unit"
check "boot symlink removed" test ! -L /etc/systemd/system/multi-user.target.wants/turnserver.service
check "/var/lib/turnserver removed on purge" test ! -e /var/lib/turnserver
check "statoverride removed on purge" sh -c '! dpkg-statoverride --list /etc/turnserver.conf'
echo "package test passed"
