#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing
# (coturn's client tools turnutils_uclient/turnutils_peer/turnutils_stunclient
# in /opt/coturn-tools and its daemon in /opt/coturn, Debian's chromium,
# debootstrap, ethtool, valgrind, openssl, stun-client, postgresql, mariadb-server, redis-server,
# clang, libbpf-dev and bpftool (the eBPF fast path),
# sqlite3, haproxy, podman and runc, playwright-core from npm,
# cargo-deb, cargo-fuzz), then runs formatting, lint, every test, the Debian
# package test (tests/package.sh, in a Debian root of its own), a smoke run
# of the coturn comparison benchmark and bounded fuzzing.
#
# It leaves the machine as it found it apart from those installs: packages
# already installed are neither upgraded nor removed, nothing outside the
# checkout is written but /opt/coturn*, ~/.cargo and the installs, and
# temporary files go to a directory of its own, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every temporary file of the run (tests, benchmarks, valgrind, chromium)
# goes here; it must be empty when the run ends.
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/turnserver-tests.XXXXXX")
chmod 755 "$TMPDIR"
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}
# Installs those of the Debian packages named that are not installed yet,
# upgrading nothing that is.
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "==> apt-get install ${missing[*]}"
    if [ -z "${apt_updated:-}" ]; then
        as_root apt-get update -q
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade "${missing[@]}"
}

# coturn's client tools, unpacked from Debian's package into
# /opt/coturn-tools: installing the package would put coturn's daemon at
# /usr/bin/turnserver. An installed coturn package is left alone.
COTURN_TOOLS=/opt/coturn-tools
if [ ! -x "$COTURN_TOOLS/usr/bin/turnutils_uclient" ] ||
    ! { "$COTURN_TOOLS/usr/bin/turnutils_stunclient" 2>&1 || true; } | grep -q Usage; then
    # The tools' shared libraries (see ldd), then the package itself.
    apt_install libevent-core-2.1-7 libevent-extra-2.1-7 libssl3
    download=$(mktemp -d)
    chmod 755 "$download"
    if getent passwd _apt >/dev/null; then as_root chown _apt "$download"; fi
    (cd "$download" && as_root apt-get download -q coturn)
    as_root dpkg-deb -x "$download"/coturn_*.deb "$download/root"
    as_root install -d "$COTURN_TOOLS/usr/bin"
    for tool in turnutils_uclient turnutils_peer turnutils_stunclient; do
        as_root install -m 755 "$download/root/usr/bin/$tool" "$COTURN_TOOLS/usr/bin/"
    done
    as_root rm -rf "$download"
fi
export PATH="$COTURN_TOOLS/usr/bin:$PATH"
# coturn's daemon, for turnbench's interoperability test and the comparison
# benchmark: unpacked into /opt/coturn, never on PATH.
./benches/setup-coturn.sh

# The database servers the user-database tests start on their own ports and
# data directories (tests/common/db.rs), and haproxy, the load balancer the
# PROXY protocol test starts (tests/proxy_protocol.rs): installed without
# starting their services (a policy-rc.d of our own while apt runs, unless
# the machine has one), and sqlite3 to edit a database as an operator would.
db_missing=()
for p in postgresql mariadb-server redis-server sqlite3 haproxy; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || db_missing+=("$p")
done
if [ ${#db_missing[@]} -gt 0 ]; then
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# tests/run-all.sh: do not start services while it installs\nexit 101\n' |
            as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt_install "${db_missing[@]}" || { [ -z "$own_policy" ] || as_root rm -f /usr/sbin/policy-rc.d; exit 1; }
    [ -z "$own_policy" ] || as_root rm -f /usr/sbin/policy-rc.d
fi

# Rootful podman for the image test (tests/container.rs), which confines it
# to a configuration, storage and network of its own, and file, which
# docker/build checks the static binary with.
apt_install podman runc file
# The eBPF fast path: build.rs compiles it with clang against libbpf's
# headers; bpftool shows it attached.
apt_install clang libbpf-dev bpftool

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v stun >/dev/null 2>&1 || missing+=(stun-client)
if [ ${#missing[@]} -gt 0 ]; then
    apt_install "${missing[@]}"
fi
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked

echo "==> npm ci (tests/browser)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

echo "==> cargo fmt --check"
cargo fmt --all --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
# The workspace: the turnserver package and its sans-IO core (proto/, whose
# clippy.toml refuses clocks, sockets and threads).
echo "==> cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "==> cargo test"
cargo test --locked --workspace
# The relay tests once more with the eBPF fast path loaded and attached to
# loopback (tests/common/server.rs): every channel binding goes through its
# maps, and everything must behave as without it.
echo "==> cargo test, relay tests with ebpf-offload=tc"
TURNSERVER_TEST_EBPF_OFFLOAD=tc cargo test --locked --test protocol --test limits \
    --test rfc8489 --test uclient --test dual --test hostile --test tcp_relay --test steering
echo "==> Debian package (tests/package.sh, in a Debian root of its own)"
as_root env "PATH=$PATH" "TMPDIR=$TMPDIR" ./tests/package.sh
# The documented comparison against coturn and the kernel floor, one short
# round of everything: it must keep running (its figures are not kept).
echo "==> cargo bench --bench compare (COMPARE_QUICK=1, a smoke run)"
COMPARE_QUICK=1 cargo bench --locked --bench compare
# The eBPF fast path's benchmark (network namespaces, root), one short
# round of everything, for the same reason.
echo "==> benches/offload-netns.py --quick (a smoke run)"
cargo build --locked --release --bins
as_root ./benches/offload-netns.py --quick

# Bounded fuzzing of the codec, stream framing and the TURN core, from the
# committed seeds (RUSTC_BOOTSTRAP lets cargo-fuzz use the stable
# toolchain). FUZZ_SECONDS=0 skips it.
FUZZ_SECONDS=${FUZZ_SECONDS:-45}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    echo "==> cargo fuzz (${FUZZ_SECONDS} s per target)"
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
    (
        cd fuzz
        export RUSTC_BOOTSTRAP=1
        cargo fuzz build
        for target in stun_parse stream_framing core_sequence; do
            corpus=$(mktemp -d)
            cargo fuzz run "$target" "$corpus" "seeds/$target" -- -max_total_time="$FUZZ_SECONDS"
            rm -rf "$corpus"
        done
    )
fi

# Nothing may be left behind in the temporary directory.
leftovers=$(find "$TMPDIR" -mindepth 1 -maxdepth 1 -printf '%f\n' | head -n 20)
if [ -n "$leftovers" ]; then
    echo "FAIL: the tests left files in the temporary directory:" >&2
    echo "$leftovers" >&2
    exit 1
fi
echo "==> all tests passed"
