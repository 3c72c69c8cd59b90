#!/usr/bin/env python3
"""The eBPF fast path against the socket path, coturn and a bare forwarder,
over veth links between network namespaces (on loopback there is no device
for the program to sit on):

    client ns --veth-- relay ns --veth-- peer ns
    turnbench run      the server       turnbench echo

Servers, all in the relay namespace, measured in turn in every round
(interleaved, so the host's drift reaches them alike):

    offload   turnserver with ebpf-offload=tc
    sockets   turnserver with ebpf-offload=off (UDP GRO on, its default)
    coturn    Debian's coturn (benches/setup-coturn.sh), if installed
    floor     `turnbench forward`, a bare recv+send UDP forwarder

Every veth end runs NAPI in a kernel thread of its own (GRO on, threaded),
as a network card's interrupt would, so the kernel's receive work of each
namespace is in a thread that can be counted: the relay's CPU is the server
process plus the relay namespace's two NAPI threads (where the eBPF program
runs), read from /proc/*/schedstat (nanoseconds on CPU). The load
generator, the echo peer and their NAPI threads are counted apart; the
system-wide figure (/proc/stat) is shown too.

Printed, as medians (and ranges) over the rounds:
  - CPU per relayed packet in microseconds, at a fixed load;
  - p99 round-trip time at that load;
  - the most relayed packets/s with less than 0.1 % loss (ramps of 3-second
    runs, +15 % a step; the median of the ramps). On a two-core machine the
    generator and the echo peer share the CPUs with the relay, so this is
    the whole system's limit, which a cheaper relay raises;
  - the program's own run time per invocation (kernel.bpf_stats_enabled
    for one run), and a `bpftool prog run` micro-benchmark: nanoseconds
    per packet for ChannelData to a peer, UDP to a client and a datagram it
    leaves to the sockets, with live bindings in the maps.

    benches/offload-netns.py [--rate N] [--allocations N] [--rounds N]
                             [--ramps N] [--bin PATH]

Needs root, iproute2, ethtool, bpftool, a kernel with TCX (6.6+) and
release builds (cargo build --release). Namespaces and files are removed at
exit.
"""

import argparse
import glob
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = f"ob{os.getpid() % 10000}"
NS = {"c": f"{TAG}c", "r": f"{TAG}r", "p": f"{TAG}p"}
# Device names are global in kernel thread names (napi/DEV-ID): unique ones.
DEV = {"c0": f"{TAG}c0", "r0": f"{TAG}r0", "r1": f"{TAG}r1", "p0": f"{TAG}p0"}
CLIENT, SERVER, RELAY, PEER = "10.98.1.2", "10.98.1.1", "10.98.2.1", "10.98.2.2"
ECHO = f"{PEER}:9000"


def run(*args, ns=None, check=True, capture=False):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, check=check, capture_output=capture, text=True)
    return r.stdout if capture else None


def setup():
    for ns in NS.values():
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "-n", NS["c"], "link", "add", DEV["c0"], "type", "veth", "peer",
        "name", DEV["r0"], "netns", NS["r"])
    run("ip", "-n", NS["p"], "link", "add", DEV["p0"], "type", "veth", "peer",
        "name", DEV["r1"], "netns", NS["r"])
    for ns, dev, addr in [("c", "c0", CLIENT), ("r", "r0", SERVER),
                          ("r", "r1", RELAY), ("p", "p0", PEER)]:
        run("ip", "-n", NS[ns], "addr", "add", f"{addr}/24", "dev", DEV[dev])
        run("ip", "-n", NS[ns], "link", "set", DEV[dev], "up")
    run("ip", "-n", NS["c"], "route", "add", "default", "via", SERVER)
    run("ip", "-n", NS["p"], "route", "add", "default", "via", RELAY)
    run("sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1", ns=NS["r"])
    for ns, dev in [("c", "c0"), ("r", "r0"), ("r", "r1"), ("p", "p0")]:
        d = DEV[dev]
        # veth runs NAPI (and GRO) once GRO is asked for; threaded, it
        # runs in a kernel thread of its own.
        run("ethtool", "-K", d, "gro", "off", ns=NS[ns], capture=True)
        run("ethtool", "-K", d, "gro", "on", ns=NS[ns], capture=True)
        run("sh", "-c", f"echo 1 > /sys/class/net/{d}/threaded", ns=NS[ns])
    # Client and peer send complete UDP checksums, as other hosts do.
    for ns, dev in [("c", "c0"), ("p", "p0")]:
        run("ethtool", "-K", DEV[dev], "tx", "off", ns=NS[ns], capture=True)


def napi_threads(devs):
    """PIDs of the NAPI kernel threads of `devs`."""
    out = []
    for comm in glob.glob("/proc/[0-9]*/comm"):
        try:
            name = open(comm).read().strip()
        except OSError:
            continue
        if any(name.startswith(f"napi/{DEV[d]}-") for d in devs):
            out.append(int(comm.split("/")[2]))
    return out


def cpu_ns(pids):
    """Nanoseconds on CPU of every thread of `pids`."""
    total = 0
    for pid in pids:
        for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
            try:
                total += int(open(f).read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def all_tasks_ns():
    """Nanoseconds on CPU of every task on the machine (with tick-based
    accounting the time of interrupts and softirqs is charged to the task
    they interrupted, so this is all busy time but the idle tasks')."""
    return cpu_ns(int(d) for d in os.listdir("/proc") if d.isdigit())


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="offload-bench-")
        self.procs = []
        self.bench = os.path.join(ROOT, "target/release/turnbench")
        self.servers = {}
        self.on_demand = {}

    def spawn(self, ns, argv, log):
        p = subprocess.Popen(["ip", "netns", "exec", ns] + argv,
                             stdout=open(log, "w"), stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start(self):
        self.spawn(NS["p"], [self.bench, "echo", "--listen", ECHO],
                   f"{self.work}/echo.log")
        base = 33478
        for k, (name, mode) in enumerate([("offload", "tc"), ("sockets", "off"),
                                          ("offload-xdp", "xdp")]):
            port = base + 10 * k
            conf = f"{self.work}/{name}.conf"
            with open(conf, "w") as f:
                f.write(f"""listening-ip={SERVER}
listening-port={port}
relay-ip={RELAY}
min-port={30000 + 5000 * k}
max-port={34000 + 5000 * k}
lt-cred-mech
user=bench:bench-password
realm=bench.test
allowed-peer-ip={PEER}
unauthorized-ratelimit-rps=0
no-tls
no-dtls
control-socket=
ebpf-offload={mode}
log-file={self.work}/{name}.log
""")
            argv = [self.args.bin, "-c", conf]
            if mode == "off":
                p = self.spawn(NS["r"], argv, f"{self.work}/{name}.out")
                self.servers[name] = (p, f"{SERVER}:{port}", False)
            else:
                # A loaded fast path runs on every datagram of the
                # interfaces (and native XDP changes how veth receives):
                # started only for its own runs, so that the others are
                # measured without it.
                self.on_demand[name] = (argv, mode)
                self.servers[name] = (None, f"{SERVER}:{port}", False)
        coturn = os.environ.get("COTURN_BIN", "/opt/coturn/usr/bin/turnserver")
        if os.access(coturn, os.X_OK):
            port = base + 30
            conf = f"{self.work}/coturn.conf"
            with open(conf, "w") as f:
                f.write(f"""listening-ip={SERVER}
listening-port={port}
relay-ip={RELAY}
min-port=50000
max-port=54000
lt-cred-mech
user=bench:bench-password
realm=bench.test
no-tls
no-dtls
no-cli
simple-log
pidfile={self.work}/coturn.pid
log-file={self.work}/coturn.log
""")
            p = self.spawn(NS["r"], [coturn, "-c", conf], f"{self.work}/coturn.out")
            self.servers["coturn"] = (p, f"{SERVER}:{port}", False)
        else:
            print(f"coturn not found at {coturn}: run benches/setup-coturn.sh", file=sys.stderr)
        port = base + 40
        p = self.spawn(NS["r"], [self.bench, "forward", "--listen", f"{SERVER}:{port}",
                                 "--to", ECHO], f"{self.work}/floor.log")
        self.servers["floor"] = (p, f"{SERVER}:{port}", True)
        time.sleep(2)
        for name, (p, _, _) in self.servers.items():
            if p is not None and p.poll() is not None:
                sys.exit(f"{name} exited: {open(f'{self.work}/{name}.out').read()}")
        self.relay_napi = napi_threads(["r0", "r1"])
        self.other_napi = napi_threads(["c0", "p0"])
        if len(self.relay_napi) != 2 or len(self.other_napi) != 2:
            sys.exit(f"NAPI threads not found: {self.relay_napi} {self.other_napi}")
        self.echo_pid = self.procs[0].pid

    def up(self, name):
        """Starts `name` if it runs only for its own runs."""
        if name not in self.on_demand or self.servers[name][0] is not None:
            return
        argv, mode = self.on_demand[name]
        log = f"{self.work}/{name}.log"
        if os.path.exists(log):
            os.remove(log)
        p = self.spawn(NS["r"], argv, f"{self.work}/{name}.out")
        self.servers[name] = (p, self.servers[name][1], False)
        deadline = time.time() + 10
        while time.time() < deadline:
            text = open(log).read() if os.path.exists(log) else ""
            if "worker threads running" in text:
                break
            if p.poll() is not None:
                break
            time.sleep(0.05)
        if f"ebpf-offload={mode}: channel bindings" not in text:
            sys.exit(f"the fast path ({mode}) did not load:\n{text}")

    def down(self, name):
        """Stops `name` if it runs only for its own runs."""
        p = self.servers[name][0]
        if name not in self.on_demand or p is None:
            return
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.procs.remove(p)
        self.servers[name] = (None, self.servers[name][1], False)

    def load(self, name, rate, seconds, background=False, step=1000):
        """Runs turnbench against `name` (packets due every `step` µs sent
        together); returns its report."""
        p, addr, raw = self.servers[name]
        argv = [self.bench, "run", addr, "-n", str(self.args.allocations), "-r", str(rate),
                "-d", str(seconds), "--step", str(step), "--json"]
        argv += ["--raw"] if raw else ["-u", "bench", "-w", "bench-password", "--peer", ECHO]
        g = subprocess.Popen(["ip", "netns", "exec", NS["c"]] + argv,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if background:
            return g
        out, err = g.communicate()
        if g.returncode != 0:
            sys.exit(f"turnbench against {name} failed: {err}")
        return json.loads(out)

    def measure(self, name, rate, seconds, step=1000):
        """One run at `rate`: CPU per relayed packet (relay, generator and
        echo side, system-wide), loss, p99."""
        self.up(name)
        p = self.servers[name][0]
        relay_pids = [p.pid] + self.relay_napi
        # The server is the child of `ip netns exec`, which execs it: the
        # same pid.
        r0, o0, e0, b0 = (cpu_ns(relay_pids), cpu_ns(self.other_napi),
                          cpu_ns([self.echo_pid]), all_tasks_ns())
        before = resource_children()
        report = self.load(name, rate, seconds, step=step)
        after = resource_children()
        r1, o1, e1, b1 = (cpu_ns(relay_pids), cpu_ns(self.other_napi),
                          cpu_ns([self.echo_pid]), all_tasks_ns())
        relayed = report["received"] * report["relayed_per_round_trip"]
        gen = after - before
        rtt = report.get("rtt_us") or {}
        return {
            "relay_us": (r1 - r0) / 1e3 / max(relayed, 1),
            "generator_us": (gen + (o1 - o0) + (e1 - e0)) / 1e3 / max(relayed, 1),
            # The generator ran and exited between the two readings.
            "system_us": (b1 - b0 + gen) / 1e3 / max(relayed, 1),
            "loss": report.get("loss_percent", 0.0),
            "p99": rtt.get("p99", float("nan")),
            "relayed_pps": relayed / seconds,
        }

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for ns in NS.values():
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        shutil.rmtree(self.work, ignore_errors=True)


def resource_children():
    """CPU nanoseconds of this process's waited-for children."""
    import resource
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (u.ru_utime + u.ru_stime) * 1e9


def ramped(xs):
    """Median and range of the ramps' results, or "-" without ramps."""
    if not xs:
        return "-"
    return f"{med(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"


def med(xs):
    return statistics.median(xs)


def fmt(xs, digits=2):
    return f"{med(xs):.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def ramp(b, name, start):
    """The most relayed packets/s of 3-second runs from `start` round
    trips/s, +15 % a step, with < 0.1 % loss; a step that loses more is
    tried a second time before the ramp ends (on two cores a moment when
    a NAPI thread waits for a CPU overflows a veth ring at any rate)."""
    rate, best = start, 0
    b.up(name)
    while rate < 2_000_000:
        runs = [b.measure(name, int(rate), 3, step=b.args.ramp_step)]
        if runs[0]["loss"] >= 0.1:
            runs.append(b.measure(name, int(rate), 3, step=b.args.ramp_step))
        ok = [m for m in runs if m["loss"] < 0.1]
        if not ok:
            break
        best = ok[0]["relayed_pps"]
        rate *= 1.15
    b.down(name)
    return best


def frame_v4(src, sport, dst, dport, payload):
    """Ethernet + IPv4 + UDP with a complete checksum."""
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000001020000000002") + b"\x08\x00"
    return eth + ip + udp


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def map_entries(name):
    out = run("bpftool", "-j", "map", "dump", "name", name, ns=NS["r"], capture=True)
    return [bytes(int(x, 16) for x in e["key"]) for e in json.loads(out)]


def micro(b, single_runs):
    """`bpftool prog run` of the loaded program on frames matching live
    bindings: ns per packet, and the program's return value."""
    b.up("offload")
    g = b.load("offload", 200, 30, background=True)
    time.sleep(3)
    prog = json.loads(run("bpftool", "-j", "prog", "show", "name", "turn_channel_data",
                          capture=True))
    prog = prog if isinstance(prog, list) else [prog]
    prog_id = prog[0]["id"]
    ifindex = int(run("cat", f"/sys/class/net/{DEV['r0']}/ifindex", ns=NS["r"], capture=True))
    ck = map_entries("TO_PEER")[0]
    pk = map_entries("TO_CLIENT")[0]
    payload = bytes(range(170))
    # client_key: client taddr (ip[16], port be16, family, pad), server
    # taddr, channel (host order), pad.
    c_ip, c_port = ck[0:4], struct.unpack("!H", ck[16:18])[0]
    s_ip, s_port = ck[20:24], struct.unpack("!H", ck[36:38])[0]
    channel = struct.unpack("<H", ck[40:42])[0]
    p_ip, p_port = pk[0:4], struct.unpack("!H", pk[16:18])[0]
    r_ip, r_port = pk[20:24], struct.unpack("!H", pk[36:38])[0]
    cd = struct.pack("!HH", channel, len(payload)) + payload
    cases = {
        "ChannelData to a peer": frame_v4(c_ip, c_port, s_ip, s_port, cd),
        "UDP to a client": frame_v4(p_ip, p_port, r_ip, r_port, payload),
        "left to the sockets (no binding)": frame_v4(
            c_ip, c_port, s_ip, s_port, struct.pack("!HH", 0x4FFF, len(payload)) + payload),
    }
    # struct __sk_buff up to ifindex: ingress_ifindex (offset 36) and
    # ifindex (40) are the receiving veth's.
    ctx = bytearray(44)
    struct.pack_into("<II", ctx, 36, ifindex, ifindex)
    fin, cin = f"{b.work}/frame", f"{b.work}/ctx"
    open(cin, "wb").write(ctx)
    results = {}
    for name, frame in cases.items():
        open(fin, "wb").write(frame)
        # A run rewrites the packet in place, and `repeat` runs the
        # program again on the rewritten one: for the relaying cases every
        # invocation runs once, on a fresh packet, and the median of the
        # kernel's timings counts; the pass case repeats a million times.
        times, rets = [], set()
        for _ in range(1 if name.startswith("left") else single_runs):
            repeat = "1000000" if name.startswith("left") else "1"
            out = run("bpftool", "prog", "run", "id", str(prog_id), "data_in", fin, "ctx_in",
                      cin, "repeat", repeat, ns=NS["r"], capture=True)
            # "Return value: 7, duration (average): 95ns" (or "duration: ")
            rets.add(int(out.split("Return value:")[1].split(",")[0]))
            times.append(int(out.split("duration")[1].split(":")[1].strip().rstrip("ns")))
        results[name] = (med(times), sorted(rets))
    g.kill()
    g.wait()
    b.down("offload")
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/turnserver"))
    ap.add_argument("--rate", type=int, default=20000,
                    help="round trips/s of the fixed load, in 1 ms bursts")
    ap.add_argument("--allocations", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ramps", type=int, default=3)
    ap.add_argument("--ramp-start", type=int, default=20000,
                    help="round trips/s of the ramps' first step")
    ap.add_argument("--ramp-step", type=int, default=1000,
                    help="pacing of the ramps, µs (1000: 1 ms bursts)")
    ap.add_argument("--quick", action="store_true",
                    help="one round, no ramps, a few micro-benchmark runs: a smoke run "
                         "(the test command's), too short to quote")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.ramps = 1, 0
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, eBPF)")
    for tool in ["ethtool", "bpftool"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install {tool}")
    b = Bench(args)
    try:
        setup()
        b.start()
        names = list(b.servers)
        runs = {n: [] for n in names}
        for i in range(args.rounds):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                runs[n].append(b.measure(n, args.rate, 4))
                b.down(n)
        # The program's own run time, with statistics on for one run.
        run("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=1")
        try:
            bpf_ns = {}
            for name, prog_name in [("offload", "turn_channel_data"),
                                    ("offload-xdp", "turn_channel_xdp")]:
                b.measure(name, args.rate, 4)
                prog = json.loads(run("bpftool", "-j", "prog", "show", "name", prog_name,
                                      capture=True))
                prog = prog[0] if isinstance(prog, list) else prog
                bpf_ns[name] = prog.get("run_time_ns", 0) / max(prog.get("run_cnt", 1), 1)
                b.down(name)
        finally:
            run("sysctl", "-q", "-w", "kernel.bpf_stats_enabled=0")
        best = {n: [] for n in names}
        for i in range(args.ramps):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                best[n].append(ramp(b, n, args.ramp_start))
        micro_results = micro(b, 20 if args.quick else 300)
    finally:
        b.cleanup()

    print(f"# ebpf-offload over veth: {args.allocations} allocations, "
          f"{args.rate} round trips/s in 1 ms bursts ({2 * args.rate} relayed packets/s), "
          f"{args.rounds} interleaved rounds of 4 s; {args.ramps} ramps")
    print()
    print("| server | relay CPU per relayed packet, µs | generator + echo, µs | system-wide, µs "
          "| loss % | p99 µs | max relayed packets/s (< 0.1 % loss) |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        rs = runs[n]
        print(f"| {n} | {fmt([r['relay_us'] for r in rs])} | "
              f"{fmt([r['generator_us'] for r in rs])} | {fmt([r['system_us'] for r in rs])} | "
              f"{fmt([r['loss'] for r in rs])} | {fmt([r['p99'] for r in rs], 0)} | "
              f"{ramped(best[n])} |")
    print()
    cpu = {n: med([r["relay_us"] for r in runs[n]]) for n in names}
    mx = {n: med(best[n]) if best[n] else float("nan") for n in names}
    for fast in ["offload", "offload-xdp"]:
        print(f"{fast} / sockets, relay CPU per packet: {cpu[fast] / cpu['sockets']:.2f}")
        if "coturn" in cpu:
            print(f"{fast} / coturn, relay CPU per packet: {cpu[fast] / cpu['coturn']:.2f}")
            if args.ramps:
                print(f"{fast} / coturn, max relayed packets/s: "
                      f"{mx[fast] / max(mx['coturn'], 1):.2f}")
    print("the program's run time per invocation (bpf_stats, both directions): "
          f"TC {bpf_ns['offload']:.0f} ns, XDP {bpf_ns['offload-xdp']:.0f} ns")
    print()
    print(f"`bpftool prog run`, 170-byte payloads (relaying: median of {20 if args.quick else 300} single runs on a "
          "fresh packet; passing: 1,000,000 repeats), return values (7 = redirect, "
          "4294967295 = TC_ACT_UNSPEC):")
    for name, (ns, ret) in micro_results.items():
        print(f"- {name}: {ns:.0f} ns per packet (returns {ret})")


if __name__ == "__main__":
    main()
