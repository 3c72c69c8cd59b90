#!/usr/bin/env bash
# Debian package test (run as root by tests/run-all.sh): builds the .deb with
# `cargo deb`, then, in a throwaway Debian root made for the test (so the
# host's packages and /etc/turnserver.conf are never touched), installs it
# with apt, checks what it put there, runs the installed binary the way the
# systemd unit does (as the turnserver user, with /etc/turnserver.conf) on
# free loopback ports, edits the config and reloads it as an operator
# would, relays through it with coturn's client, then purges the package and
# checks nothing is left behind.
#
# The root is made with debootstrap (from the host's Debian mirror, cached
# as target/package-test/base-SUITE, copied afresh for every run) and
# entered with chroot in new mount and PID namespaces: its /proc, /dev and
# /sys mounts and every process started in it end with the test. It shares
# the host's network, so the server listens on the host's loopback.
#
# Needs: root, debootstrap, cargo-deb, unshare, turnutils_* (coturn's client
# tools; tests/run-all.sh unpacks them into /opt/coturn-tools/usr/bin).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/package.sh makes a Debian root and installs a package in it: run it as root" >&2
    exit 1
fi

if [ -z "${PACKAGE_TEST_INSIDE:-}" ]; then
    export PATH="/opt/coturn-tools/usr/bin:$PATH"
    for tool in cargo-deb debootstrap unshare turnutils_uclient turnutils_peer turnutils_stunclient; do
        if ! command -v "$tool" >/dev/null; then
            echo "FAIL: $tool is not installed (tests/run-all.sh installs it)" >&2
            exit 1
        fi
    done
    echo "==> cargo deb"
    deb=$(cargo deb --locked 2>target/cargo-deb.log | tail -n 1) || {
        cat target/cargo-deb.log >&2
        echo "FAIL: cargo deb" >&2
        exit 1
    }
    test -f "$deb" || { echo "FAIL: cargo deb built no $deb" >&2; exit 1; }
    echo "ok: cargo deb built $deb"

    # The Debian root: the host's release, from the host's mirror, with what
    # the test runs inside (python3 for ports and HTTP, systemd for
    # systemd-analyze, the libraries of coturn's client tools) and what the
    # package depends on.
    suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v security | head -n 1)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ { print $2; exit }' \
        /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
    include=adduser,procps,python3,systemd,libevent-core-2.1-7,libevent-extra-2.1-7,libssl3
    base=target/package-test/base-$suite
    if [ "$(cat "$base.stamp" 2>/dev/null)" != "$suite $mirror $include" ]; then
        echo "==> debootstrap $suite into $base (once; cached)"
        rm -rf "$base" "$base.partial" "$base.stamp"
        mkdir -p target/package-test
        debootstrap --variant=minbase --include="$include" "$suite" "$base.partial" "$mirror" \
            >target/package-test/debootstrap.log 2>&1 || {
            tail -n 30 target/package-test/debootstrap.log >&2
            echo "FAIL: debootstrap $suite from $mirror" >&2
            exit 1
        }
        mv "$base.partial" "$base"
        echo "$suite $mirror $include" >"$base.stamp"
    fi
    root=$(mktemp -d "$PWD/target/package-test/root.XXXXXX")
    # Mounts made for the root live in the test's own mount namespace and
    # are gone when it ends; never remove a root with a mount still in it
    # (that would reach into the host's /dev).
    remove_root() {
        if grep -q " $root/" /proc/self/mountinfo; then
            echo "mounts remain under $root: not removing it" >&2
        else
            rm -rf "$root"
        fi
    }
    trap remove_root EXIT
    cp -a "$base/." "$root/"
    for tool in turnutils_uclient turnutils_peer turnutils_stunclient; do
        install -m 755 "$(command -v "$tool")" "$root/usr/local/bin/"
    done
    install -m 644 "$deb" "$root/root/turnserver.deb"
    install -m 755 "$0" "$root/root/package.sh"
    echo "==> the package test, in a Debian $suite root ($root)"
    status=0
    unshare --mount --pid --fork --propagation private sh -c '
        root=$1
        mount --rbind /dev "$root/dev"
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        mount -t tmpfs tmpfs "$root/tmp"
        mount -t tmpfs tmpfs "$root/run"
        exec chroot "$root" /usr/bin/env -i PACKAGE_TEST_INSIDE=1 HOME=/root \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            /bin/bash /root/package.sh
    ' sh "$root" || status=$?
    exit "$status"
fi

# From here on: inside the Debian root, as root.
cd /root
deb=/root/turnserver.deb
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
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

echo "==> apt-get install ./turnserver.deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$deb" \
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
check "turnadmin is installed and prints coturn's key" \
    sh -c '[ "$(/usr/bin/turnadmin -k -u ninefingers -r north.gov -p youhavetoberealistic)" = 0xbc807ee29df3c9ffa736523fb2c4e8ee ]'

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
    # stunclient never retransmits: a request sent before the server
    # listened would wait forever.
    timeout 2 turnutils_stunclient -p "$port" 127.0.0.1 >"$work/stun.out" 2>&1 && break
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
dpkg -i "$deb" >"$work/reinstall.log" 2>&1 || {
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
check "/usr/bin/turnadmin removed" test ! -e /usr/bin/turnadmin
check "/etc/turnserver.conf removed on purge" test ! -e /etc/turnserver.conf
check "unit removed" test ! -e "$unit"
check "boot symlink removed" test ! -L /etc/systemd/system/multi-user.target.wants/turnserver.service
check "/var/lib/turnserver removed on purge" test ! -e /var/lib/turnserver
check "statoverride removed on purge" sh -c '! dpkg-statoverride --list /etc/turnserver.conf'
echo "package test passed"
