#!/usr/bin/env bash
# Compares turnserver with and without UDP GRO where GRO can coalesce (or
# two builds): the servers run
# in a network namespace, turnbench and its echo peer in a second one, over
# a veth link whose server end runs NAPI in a thread of its own (as a
# network card's interrupt does), with GRO and UDP GRO forwarding on. On
# loopback the kernel never coalesces datagrams sent one by one, so GRO on
# receive shows only here.
#
#   benches/gro-netns.sh [BIN_A [BIN_B [RATE [ALLOCATIONS [ROUNDS]]]]]
#
# BIN_A defaults to target/release/turnserver. Without BIN_B (or with
# BIN_B "-"), B is BIN_A run with no-udp-gro.
# RATE is round trips per second in 1 ms bursts (default 20000),
# ALLOCATIONS the number of flows (default 4), ROUNDS the number of
# interleaved 4-second runs per build (default 6). For each run it prints
# server CPU per relayed packet in microseconds (user + system of the
# server process; the NAPI thread's time is not in it, for either build),
# loss in percent and p99 round-trip time in microseconds.
#
# Needs root, iproute2, ethtool and a release build of turnbench
# (cargo build --release). Loopback-free: all traffic stays on the veth
# link between the two namespaces, which are deleted at exit.
set -euo pipefail
cd "$(dirname "$0")/.."

A=$(realpath "${1:-target/release/turnserver}")
B_ARGS=()
if [ "${2:--}" = - ]; then
    B=$A
    B_ARGS=(--no-udp-gro)
else
    B=$(realpath "$2")
fi
RATE=${3:-20000}
ALLOCS=${4:-4}
ROUNDS=${5:-6}
BENCH=target/release/turnbench
[ -x "$BENCH" ] || { echo "build turnbench first: cargo build --release" >&2; exit 1; }
command -v ethtool >/dev/null || { echo "ethtool is missing: apt-get install ethtool" >&2; exit 1; }

S=grobenchS$$
P=grobenchP$$
WORK=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$S" 2>/dev/null || true
    ip netns del "$P" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$S"
ip netns add "$P"
ip -n "$S" link set lo up
ip -n "$P" link set lo up
ip -n "$S" link add vs type veth peer name vp netns "$P"
ip -n "$S" addr add 10.97.0.1/24 dev vs
ip -n "$P" addr add 10.97.0.2/24 dev vp
ip -n "$S" link set vs up
ip -n "$P" link set vp up
# veth starts NAPI (and with it GRO) for what it receives when GRO is asked
# for, and takes plain UDP through GRO with UDP GRO forwarding on.
ip netns exec "$S" ethtool -K vs gro off
ip netns exec "$S" ethtool -K vs gro on rx-udp-gro-forwarding on
ip netns exec "$S" sh -c 'echo 1 > /sys/class/net/vs/threaded'

for k in 0 1; do
    port=$((23478 + 300 * k))
    cat >"$WORK/$k.conf" <<EOF
listening-ip=10.97.0.1
listening-port=$port
min-port=$((40000 + 10000 * k))
max-port=$((49000 + 10000 * k))
lt-cred-mech
user=bench:bench-password
realm=bench.test
allowed-peer-ip=10.97.0.2
no-tls
no-dtls
no-cli
log-file=$WORK/$k.log
EOF
done

ip netns exec "$P" "$BENCH" echo --listen 10.97.0.2:23500 >/dev/null 2>&1 &
pids+=($!)
ip netns exec "$S" "$A" -c "$WORK/0.conf" --unauthorized-ratelimit-rps=0 >/dev/null 2>&1 &
pids+=($!)
servers=($!)
ip netns exec "$S" "$B" -c "$WORK/1.conf" --unauthorized-ratelimit-rps=0 "${B_ARGS[@]}" >/dev/null 2>&1 &
pids+=($!)
servers+=($!)
sleep 1.5

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results=("" "")
for i in $(seq "$ROUNDS"); do
    for j in 0 1; do
        k=$(((i + j) % 2))
        c0=$(cpu "${servers[$k]}")
        out=$(ip netns exec "$P" "$BENCH" run "10.97.0.1:$((23478 + 300 * k))" --bind 10.97.0.2 \
            -u bench -w bench-password --peer 10.97.0.2:23500 \
            -n "$ALLOCS" -r "$RATE" -d 4 --json)
        c1=$(cpu "${servers[$k]}")
        v=$(python3 -c '
import json, os, sys
r = json.loads(sys.argv[3])
tick = os.sysconf("SC_CLK_TCK")
relayed = r["received"] * r["relayed_per_round_trip"]
us = (float(sys.argv[2]) - float(sys.argv[1])) / tick * 1e6 / relayed
loss = r.get("loss_percent", 0)
p99 = r["rtt_us"]["p99"]
print(f"{us:.2f} µs/{loss:.2f} %/{p99:.0f} µs")
' "$c0" "$c1" "$out")
        results[$k]="${results[$k]}  $v"
    done
done
echo "load: $RATE round trips/s in 1 ms bursts over $ALLOCS allocations"
echo "per run: server CPU per relayed packet / loss / p99"
echo "A $A:${results[0]}"
echo "B $B ${B_ARGS[*]}:${results[1]}"
