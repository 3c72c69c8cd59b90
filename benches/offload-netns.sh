#!/usr/bin/env bash
# The eBPF fast path (ebpf-offload=tc) against the socket path of the same
# binary, over veth links between network namespaces (on loopback there is
# no device for the program to sit on):
#
#   client ns --veth-- relay ns --veth-- peer ns
#   turnbench run      turnserver        turnbench echo
#
# Each round runs both servers' load in turn (interleaved) at a fixed rate
# and prints, per server: CPU per relayed packet in microseconds counted
# system-wide (every CPU's user, system, irq and softirq time from
# /proc/stat, so the kernel's share of forwarding is in it; the load
# generator's and echo peer's own user+system time is subtracted and shown
# apart), loss in percent, and p99 round-trip time in microseconds.
#
#   benches/offload-netns.sh [BIN [RATE [ALLOCATIONS [ROUNDS]]]]
#
# BIN defaults to target/release/turnserver, RATE is round trips per second
# in 1 ms bursts (default 20000), ALLOCATIONS the number of flows (default
# 16), ROUNDS the interleaved 4-second rounds (default 5).
#
# Needs root, iproute2, ethtool, a kernel with TCX (6.6+) and release builds
# with clang (cargo build --release). The namespaces are deleted at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${1:-target/release/turnserver}")
RATE=${2:-20000}
ALLOCS=${3:-16}
ROUNDS=${4:-5}
BENCH=$(realpath target/release/turnbench)
[ -x "$BENCH" ] || { echo "build turnbench first: cargo build --release" >&2; exit 1; }
command -v ethtool >/dev/null || { echo "ethtool is missing: apt-get install ethtool" >&2; exit 1; }

C=offbenchC$$
R=offbenchR$$
P=offbenchP$$
WORK=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "$C" "$R" "$P"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

for ns in "$C" "$R" "$P"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$C" link add c0 type veth peer name r0 netns "$R"
ip -n "$P" link add p0 type veth peer name r1 netns "$R"
ip -n "$C" addr add 10.98.1.2/24 dev c0
ip -n "$R" addr add 10.98.1.1/24 dev r0
ip -n "$R" addr add 10.98.2.1/24 dev r1
ip -n "$P" addr add 10.98.2.2/24 dev p0
for l in "$C c0" "$R r0" "$R r1" "$P p0"; do
    set -- $l
    ip -n "$1" link set "$2" up
done
ip -n "$C" route add default via 10.98.1.1
ip -n "$P" route add default via 10.98.2.1
ip netns exec "$R" sysctl -q -w net.ipv4.conf.all.forwarding=1
# Complete UDP checksums from client and peer, as from other hosts.
ip netns exec "$C" ethtool -K c0 tx off >/dev/null
ip netns exec "$P" ethtool -K p0 tx off >/dev/null

for k in 0 1; do
    mode=$([ "$k" = 0 ] && echo tc || echo off)
    cat >"$WORK/$k.conf" <<EOF
listening-ip=10.98.1.1
listening-port=$((33478 + 10 * k))
relay-ip=10.98.2.1
min-port=$((40000 + 10000 * k))
max-port=$((49000 + 10000 * k))
lt-cred-mech
user=bench:bench-password
realm=bench.test
allowed-peer-ip=10.98.2.2
unauthorized-ratelimit-rps=0
no-tls
no-dtls
control-socket=
ebpf-offload=$mode
log-file=$WORK/$k.log
EOF
done

ip netns exec "$P" "$BENCH" echo --listen 10.98.2.2:9000 >/dev/null 2>&1 &
pids+=($!)
echo_pid=$!
servers=()
for k in 0 1; do
    ip netns exec "$R" "$BIN" -c "$WORK/$k.conf" >/dev/null 2>&1 &
    pids+=($!)
    servers+=($!)
done
sleep 2
grep -q "ebpf-offload=tc: channel bindings" "$WORK/0.log" ||
    { echo "the fast path did not load:" >&2; cat "$WORK/0.log" >&2; exit 1; }

busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
own() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results=("" "")
for i in $(seq "$ROUNDS"); do
    for j in 0 1; do
        k=$(((i + j) % 2))
        b0=$(busy)
        e0=$(own "$echo_pid")
        # The report, then the shell's stat line: its children's CPU time.
        out=$(ip netns exec "$C" sh -c '
            "$0" run "$1" -u bench -w bench-password --peer 10.98.2.2:9000 \
                -n "$2" -r "$3" -d 4 --json
            echo
            cat /proc/$$/stat' "$BENCH" "10.98.1.1:$((33478 + 10 * k))" "$ALLOCS" "$RATE")
        b1=$(busy)
        e1=$(own "$echo_pid")
        v=$(python3 -c '
import json, os, sys
b0, b1, e0, e1 = map(float, sys.argv[1:5])
report, stat = sys.argv[5].strip().rsplit("\n", 1)
r = json.loads(report)
tick = os.sysconf("SC_CLK_TCK")
# cutime and cstime: the load generator, waited for by the shell.
fields = stat[stat.rindex(")") + 2:].split()
client = (float(fields[13]) + float(fields[14])) / tick
relayed = r["received"] * r["relayed_per_round_trip"]
gen = client + (e1 - e0) / tick
total = (b1 - b0) / tick
us = max(total - gen, 0.0) * 1e6 / relayed
loss = r.get("loss_percent", 0)
p99 = r["rtt_us"]["p99"]
print(f"{us:.2f} µs (generator {gen * 1e6 / relayed:.2f})/{loss:.2f} %/{p99:.0f} µs")
' "$b0" "$b1" "$e0" "$e1" "$out")
        results[$k]="${results[$k]}  $v"
    done
done
echo "load: $RATE round trips/s in 1 ms bursts over $ALLOCS allocations, 4 s a run"
echo "per run: system-wide CPU per relayed packet without the load generator / loss / p99"
echo "ebpf-offload=tc :${results[0]}"
echo "ebpf-offload=off:${results[1]}"
