//! turnserver against coturn and the kernel floor, under the same turnbench
//! load: `cargo bench --bench compare`.
//!
//! Runs, on 127.0.0.1 with free ports:
//! - turnserver (this build), with its default workers and with one, and,
//!   when found, Debian's coturn (`COTURN_BIN`, else
//!   `/opt/coturn/usr/bin/turnserver` as put there by
//!   `benches/setup-coturn.sh`, else `/usr/bin/turnserver` if that is
//!   coturn), each from a fresh start with the same coturn-style config;
//! - the kernel floor: `turnbench forward`, a bare UDP forwarder doing one
//!   `recv` and one `send` per packet, with a socket per client.
//!
//! and measures, with `turnbench echo` as the peer:
//! - server CPU (user + system, from /proc) per relayed packet at fixed
//!   offered loads, and p99 round-trip latency there: every server runs at
//!   once and the runs are interleaved, one server at a time, five rounds
//!   per load (`COMPARE_REPEATS` to change); the tables quote medians. The
//!   loads come in turnbench's default 1 ms bursts, then, at two light
//!   loads, spread out every 100 µs (`--step 100`), and last over only 4
//!   allocations in 1 ms bursts, several packets each per burst (runs that
//!   turnserver sends with UDP GSO), and with the clients over TCP and over
//!   TLS (the floor, UDP only, sits those out);
//! - the most relayed packets per second with less than 0.1 % loss: the
//!   median of three ramps of 3-second runs, interleaved the same way, each
//!   refined to within 5 % after its coarse 15 % steps;
//! - resident memory added by 10,000 idle allocations, and the allocation
//!   rate while creating them (401, Allocate, ChannelBind each): the
//!   median of three rounds, each server started fresh for each;
//! - the allocation rate by credential store: static `user=` lines, an
//!   SQLite `userdb` and a Redis `redis-userdb` (a `redis-server` started
//!   for it), the same database for turnserver and coturn, and turnserver
//!   as a fleet node (Redis and a `user-quota` counted there): the median
//!   of three rounds of 2,000 allocations (401, Allocate, ChannelBind each);
//! - the relay path of a fleet node (the Redis users, a quota, the
//!   registry and `redis-statsdb` on), a fifth server in the fixed loads and
//!   ramps, against a lone node;
//! - when valgrind is installed, user-space instructions per relayed packet
//!   at a light load, counted by callgrind on each server (and the floor)
//!   in turn: the part of the cost that is the server's own code, in a
//!   figure that moves by about ±8 % from run to run (with how many packets
//!   each wake-up finds) where CPU time moves by ±10 % and more.
//!
//! Prints the machine, every measurement and a summary table in Markdown
//! (the format of BENCHMARKS.md), and writes the raw numbers to
//! `target/compare.json`. It fails if a server stops relaying (see
//! [`check`]). `COMPARE_QUICK=1` runs one short round of everything, as a
//! smoke test of this command (the test command's; see [`scale`]). The
//! load generator, the echo peer and the server share the machine's cores,
//! as they would on a small VM; the server's CPU is counted alone.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnserver::bench::Report;

const TURNSERVER: &str = env!("CARGO_BIN_EXE_turnserver");
const TURNBENCH: &str = env!("CARGO_BIN_EXE_turnbench");
const TURNADMIN: &str = env!("CARGO_BIN_EXE_turnadmin");

/// How the clients reach the server (turnbench `-t`). The relayed side is
/// UDP in every case.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// turnbench's and the JSON's name for it.
    fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// An offered load: round trips per second (each is two relayed packets)
/// over `flows` allocations whose clients use `transport`, sent in bursts
/// every `step_us` microseconds (turnbench `--step`).
#[derive(Clone, Copy)]
struct Load {
    rate: f64,
    step_us: u64,
    flows: usize,
    transport: Transport,
}

impl Load {
    /// `rate` over [`FLOWS`] UDP allocations in turnbench's default 1 ms
    /// bursts.
    const fn burst(rate: f64) -> Load {
        Load {
            rate,
            step_us: BURST_STEP_US,
            flows: FLOWS,
            transport: Transport::Udp,
        }
    }

    /// `rate` over [`FLOWS`] UDP allocations spread out, a few packets
    /// every 100 µs.
    const fn spread(rate: f64) -> Load {
        Load {
            rate,
            step_us: SPREAD_STEP_US,
            flows: FLOWS,
            transport: Transport::Udp,
        }
    }

    /// `rate` over [`FLOWS`] allocations whose clients connect over
    /// `transport`, in 1 ms bursts.
    const fn over(transport: Transport, rate: f64) -> Load {
        Load {
            rate,
            step_us: BURST_STEP_US,
            flows: FLOWS,
            transport,
        }
    }
}

/// turnbench's default pacing: the packets due are sent every millisecond.
const BURST_STEP_US: u64 = 1000;
/// Spread pacing: a few packets every 100 µs, closer to many independent
/// clients (and costlier for every server: fewer packets per wake-up).
const SPREAD_STEP_US: u64 = 100;
/// Offered loads for the CPU comparison, in 1 ms bursts.
const LOADS: [Load; 3] = [
    Load::burst(10_000.0),
    Load::burst(40_000.0),
    Load::burst(80_000.0),
];
/// The same comparison with spread pacing, at loads that leave the load
/// generator (which then wakes ten times as often) some of the machine.
const SPREAD_LOADS: [Load; 2] = [Load::spread(10_000.0), Load::spread(20_000.0)];
/// A few busy flows in 1 ms bursts, several packets per flow per burst, as
/// high-bitrate video sends them: runs of datagrams for one destination,
/// which turnserver sends with UDP GSO.
const FEW_FLOW_LOADS: [Load; 1] = [Load {
    rate: 20_000.0,
    step_us: BURST_STEP_US,
    flows: 4,
    transport: Transport::Udp,
}];
/// Clients over TCP and over TLS (`turn:...?transport=tcp`, `turns:`), as
/// behind firewalls that pass no UDP. The floor forwards UDP only, so it
/// sits these out.
const STREAM_LOADS: [Load; 2] = [
    Load::over(Transport::Tcp, 20_000.0),
    Load::over(Transport::Tls, 20_000.0),
];
/// The load the summary table quotes for CPU and latency.
const HEADLINE_LOAD: Load = LOADS[1];
/// Flows for the traffic runs.
const FLOWS: usize = 100;
/// Idle allocations for the memory measurement.
const IDLE_ALLOCATIONS: usize = 10_000;
/// How long and how often each measurement runs.
struct Scale {
    /// `COMPARE_QUICK`: a smoke run, too short to quote.
    quick: bool,
    /// Runs per fixed load; the tables quote the median run (by CPU) and
    /// the median p99.
    repeats: usize,
    /// Seconds per fixed-load run.
    load_seconds: f64,
    /// Throughput ramps per server; the result is the median.
    ramps: usize,
    /// Seconds per step of the throughput ramp.
    ramp_seconds: f64,
    /// Seconds of traffic for the instruction counts.
    instruction_seconds: f64,
}

/// The run's [`Scale`]: 5 runs of 5 s per load, 3 ramps of 3 s steps and
/// 5 s under callgrind; `COMPARE_REPEATS=N` changes the runs per load.
/// `COMPARE_QUICK=1` makes it a smoke test of this command (one round of
/// everything, 1 s each, about two minutes; the test command runs it),
/// whose figures are too short to quote; it writes
/// `target/compare-quick.json` instead of `target/compare.json`.
fn scale() -> &'static Scale {
    static SCALE: std::sync::OnceLock<Scale> = std::sync::OnceLock::new();
    SCALE.get_or_init(|| {
        let quick = std::env::var("COMPARE_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut s = if quick {
            Scale {
                quick,
                repeats: 1,
                load_seconds: 1.0,
                ramps: 1,
                ramp_seconds: 1.0,
                instruction_seconds: 1.0,
            }
        } else {
            Scale {
                quick,
                repeats: 5,
                load_seconds: 5.0,
                ramps: 3,
                ramp_seconds: 3.0,
                instruction_seconds: 5.0,
            }
        };
        if let Some(n) = std::env::var("COMPARE_REPEATS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
        {
            s.repeats = n;
        }
        s
    })
}

/// Growth of the offered load from one ramp step to the next.
const RAMP_GROWTH: f64 = 1.15;
/// Fractions of a server's last passed coarse step tried after it fails,
/// in order, until one fails.
const RAMP_REFINE: [f64; 2] = [1.05, 1.10];
/// Loss that ends the ramp.
const MAX_LOSS_PERCENT: f64 = 0.1;
/// Load for the instruction counts: light enough for a server under
/// valgrind (tens of times slower) to keep up.
const INSTRUCTION_LOAD: Load = Load::burst(2_000.0);

/// A directory removed on drop, also when a measurement panics.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds used so far (all threads).
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .unwrap_or_else(|e| panic!("{} is gone: {e}", self.name));
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        ticks / hz
    }

    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }
}

/// `n` consecutive ports free for UDP and TCP on 127.0.0.1.
fn free_ports(n: u16) -> u16 {
    for attempt in 0..1000u32 {
        let base = 20_000 + ((std::process::id() * 7919 + attempt * 104_729) % 11_000) as u16;
        let ok = (base..base + n).all(|p| {
            UdpSocket::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        });
        if ok {
            return base;
        }
    }
    panic!("no free ports");
}

/// Waits until a STUN Binding request to `addr` is answered.
fn wait_for_stun(addr: SocketAddr, name: &str) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut req = Vec::new();
    turnserver::stun::MessageWriter::new(
        &mut req,
        turnserver::stun::method::BINDING,
        turnserver::stun::Class::Request,
        &[9; 12],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let _ = sock.send_to(&req, addr);
        if sock.recv(&mut buf).is_ok() {
            return;
        }
    }
    panic!("{name} does not answer STUN on {addr}");
}

/// A server under test.
#[derive(Clone)]
struct Target {
    name: &'static str,
    bin: PathBuf,
    /// Extra command-line arguments.
    args: Vec<String>,
    /// A command to run the server under (valgrind), with its arguments;
    /// empty to run it directly.
    wrap: Vec<String>,
}

/// `Command` for `bin` under `wrap` (see [`Target::wrap`]).
fn wrapped(wrap: &[String], bin: &Path) -> Command {
    match wrap.split_first() {
        Some((tool, args)) => {
            let mut c = Command::new(tool);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    }
}

/// The coturn binary to compare with, if any.
fn find_coturn() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("COTURN_BIN").map(PathBuf::from),
        Some(PathBuf::from("/opt/coturn/usr/bin/turnserver")),
        Some(PathBuf::from("/usr/bin/turnserver")),
    ];
    candidates.into_iter().flatten().find(|p| {
        p.is_file()
            && Command::new(p).arg("--version").output().is_ok_and(|o| {
                let v = String::from_utf8_lossy(&o.stdout);
                // turnserver prints "turnserver X.Y.Z"; coturn only the
                // version number.
                !v.starts_with("turnserver") && v.trim().starts_with(|c: char| c.is_ascii_digit())
            })
    })
}

fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

struct Env {
    dir: PathBuf,
    echo: SocketAddr,
    /// The servers' TLS certificate (self-signed, for 127.0.0.1) and key.
    cert: PathBuf,
    key: PathBuf,
}

/// Starts `target` fresh with the shared config on a free port.
fn start_server(env: &Env, t: &Target) -> (Proc, SocketAddr) {
    start_server_with(env, t, "user=bench:bench-password\n")
}

/// [`start_server`] with `credentials` (configuration lines) for the
/// benchmark's user instead of a `user=` line.
fn start_server_with(env: &Env, t: &Target, credentials: &str) -> (Proc, SocketAddr) {
    let port = free_ports(2);
    // The default relay range: client sockets are on another address.
    let relay_base = 49_152;
    let config = format!(
        "# the same coturn-style configuration for every server\n\
         listening-ip=127.0.0.1\n\
         listening-port={port}\n\
         tls-listening-port={}\n\
         min-port={relay_base}\n\
         max-port=65535\n\
         lt-cred-mech\n\
         {credentials}\
         realm=bench.test\n\
         allow-loopback-peers\n\
         cert={}\n\
         pkey={}\n\
         no-dtls\n\
         no-cli\n\
         simple-log\n\
         log-file={}/{}.log\n",
        port + 1,
        env.cert.display(),
        env.key.display(),
        env.dir.display(),
        t.name,
    );
    let conf = env.dir.join(format!("{}.conf", t.name));
    std::fs::write(&conf, config).unwrap();
    let out = std::fs::File::create(env.dir.join(format!("{}.out", t.name))).unwrap();
    let child = wrapped(&t.wrap, &t.bin)
        .arg("-c")
        .arg(&conf)
        .args(&t.args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", t.bin.display()));
    let p = Proc {
        child,
        name: t.name.to_string(),
    };
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for_stun(addr, t.name);
    (p, addr)
}

/// Runs turnbench with `args`, returning its report.
fn turnbench(args: &[String]) -> Report {
    let out = Command::new(TURNBENCH)
        .arg("run")
        .args(args)
        .arg("--json")
        .output()
        .expect("run turnbench");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "turnbench {args:?}: {e}\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Clients bind this address, so their ports never collide with the relay
/// ports servers bind on 127.0.0.1.
const CLIENT_IP: &str = "127.0.0.2";

fn load_args(server: SocketAddr, env: &Env, raw: bool, load: Load, secs: f64) -> Vec<String> {
    // Every server listens for TLS on the port after its UDP/TCP one.
    let server = match load.transport {
        Transport::Tls => SocketAddr::new(server.ip(), server.port() + 1),
        _ => server,
    };
    let mut a = vec![
        server.to_string(),
        "--bind".into(),
        CLIENT_IP.into(),
        "-t".into(),
        load.transport.name().into(),
    ];
    if load.transport == Transport::Tls {
        a.extend(["--ca".into(), env.cert.display().to_string()]);
    }
    if raw {
        a.push("--raw".into());
    } else {
        a.extend(
            ["-u", "bench", "-w", "bench-password", "--peer"]
                .iter()
                .map(|s| s.to_string()),
        );
        a.push(env.echo.to_string());
    }
    a.extend([
        "-n".into(),
        load.flows.to_string(),
        "-r".into(),
        load.rate.to_string(),
        "--step".into(),
        load.step_us.to_string(),
        "-d".into(),
        secs.to_string(),
    ]);
    a
}

/// The median of `v` (the lower middle for an even count); NaN when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}

/// The smallest and largest of `v` (infinities when empty).
fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Packets the server relayed in a turnbench run: round trips received
/// times the relayed packets each took.
fn relayed_packets(r: &Report) -> f64 {
    (r.received * r.relayed_per_round_trip) as f64
}

/// The p99 round-trip time of a run, microseconds (NaN without one).
fn p99(r: &Report) -> f64 {
    r.rtt_us.as_ref().map_or(f64::NAN, |l| l.p99)
}

/// One fixed-load run: the server's CPU per relayed packet and the
/// latency and loss turnbench saw.
fn fixed_run(p: &Proc, server: SocketAddr, env: &Env, raw: bool, load: Load) -> Value {
    let before = p.cpu_seconds();
    let r = turnbench(&load_args(server, env, raw, load, scale().load_seconds));
    let cpu = p.cpu_seconds() - before;
    let relayed = relayed_packets(&r);
    let us = if relayed > 0.0 {
        cpu * 1e6 / relayed
    } else {
        f64::NAN
    };
    eprintln!(
        "    {:<20} {us:.2} µs/relayed packet, p99 {:.0} µs, loss {:.3} %",
        p.name,
        p99(&r),
        r.loss_percent,
    );
    json!({
        "cpu_seconds": cpu,
        "relayed_packets": relayed,
        "cpu_us_per_relayed_packet": us,
        "loss_percent": r.loss_percent,
        "rtt_us": r.rtt_us,
    })
}

/// The runs at one offered load summarised by their medians (CPU with its
/// range), with every run kept under "runs".
fn summarise(load: Load, runs: Vec<Value>) -> Value {
    let field =
        |f: &dyn Fn(&Value) -> Option<f64>| -> Vec<f64> { runs.iter().filter_map(f).collect() };
    let cpus = field(&|r| r["cpu_us_per_relayed_packet"].as_f64());
    let (lo, hi) = min_max(&cpus);
    json!({
        "offered_round_trips_per_second": load.rate,
        "step_us": load.step_us,
        "flows": load.flows,
        "transport": load.transport.name(),
        "cpu_us_per_relayed_packet": median(cpus),
        "cpu_us_min": lo,
        "cpu_us_max": hi,
        "loss_percent": median(field(&|r| r["loss_percent"].as_f64())),
        "rtt_us": {
            "p50": median(field(&|r| r["rtt_us"]["p50"].as_f64())),
            "p99": median(field(&|r| r["rtt_us"]["p99"].as_f64())),
            "p999": median(field(&|r| r["rtt_us"]["p999"].as_f64())),
        },
        "runs": runs,
    })
}

/// A server under fixed load: its process, where to send, and whether it
/// is the plain forwarder (no TURN).
struct Loaded {
    proc: Proc,
    addr: SocketAddr,
    raw: bool,
}

/// The fixed loads, interleaved: every server runs at once (idle while
/// another is measured), and each of the [`Scale::repeats`] rounds at each load
/// measures every server in turn, starting with a different one each round.
/// Slow drift of the machine (other tenants, frequency) then reaches every
/// server alike instead of whichever happened to run during it. Returns the
/// summarised loads of each server, in the order given.
fn fixed_loads(servers: &[Loaded], env: &Env) -> Vec<Vec<Value>> {
    let n = servers.len();
    let mut out: Vec<Vec<Value>> = vec![Vec::new(); n];
    let all = LOADS
        .into_iter()
        .chain(SPREAD_LOADS)
        .chain(FEW_FLOW_LOADS)
        .chain(STREAM_LOADS);
    for load in all {
        eprintln!(
            "==> fixed load {:.0} round trips/s over {} {} allocations, sent every {} µs",
            load.rate,
            load.flows,
            load.transport.name(),
            load.step_us
        );
        // The floor forwards UDP only.
        let takes = |s: &Loaded| load.transport == Transport::Udp || !s.raw;
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); n];
        for round in 0..scale().repeats {
            for k in 0..n {
                let i = (round + k) % n;
                let s = &servers[i];
                if takes(s) {
                    runs[i].push(fixed_run(&s.proc, s.addr, env, s.raw, load));
                }
            }
        }
        for (i, r) in runs.into_iter().enumerate() {
            if takes(&servers[i]) {
                out[i].push(summarise(load, r));
            }
        }
    }
    out
}

/// The throughput ramps, interleaved like [`fixed_loads`]: [`Scale::ramps`] times,
/// the offered load starts at 40,000 round trips/s and grows by 15 % a
/// step, each step running every server still in the ramp in turn, until a
/// server loses 0.1 % or more (or turnbench itself drops). Then each server
/// that failed is tried at 5 % and 10 % above its last passed step (the
/// [`RAMP_REFINE`] steps, stopping at its first failure), so its best is
/// known to within 5 % rather than 15 %. A server's best in a ramp is the
/// last step it passed; its result is the median of its bests, with every
/// step kept.
fn ramps(servers: &[Loaded], env: &Env) -> Vec<Value> {
    let n = servers.len();
    let mut bests: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut steps: Vec<Vec<Value>> = vec![Vec::new(); n];
    // One step of server `i` at `rate`: its relayed packets/s if it passed.
    let mut step = |i: usize, rate: f64, round: usize| -> Option<f64> {
        let s = &servers[i];
        let r = turnbench(&load_args(
            s.addr,
            env,
            s.raw,
            Load::burst(rate),
            scale().ramp_seconds,
        ));
        let (loss, relayed) = (r.loss_percent, r.relayed_packets_per_second);
        eprintln!(
            "    {:<20} offered {rate:.0}/s -> {relayed:.0} relayed/s, loss {loss:.3} %",
            s.proc.name
        );
        steps[i].push(json!({
            "ramp": round,
            "offered": rate,
            "relayed_per_second": relayed,
            "loss_percent": loss,
        }));
        let failed = loss >= MAX_LOSS_PERCENT || r.local_drops > 0;
        (!failed).then_some(relayed)
    };
    let rounds = scale().ramps;
    for round in 0..rounds {
        eprintln!("==> throughput ramp {}/{rounds}", round + 1);
        let mut best: Vec<f64> = vec![0.0; n];
        // The offered rate of each server's last passed step.
        let mut passed: Vec<f64> = vec![0.0; n];
        let mut refine: Vec<usize> = Vec::new();
        let mut active: Vec<usize> = (0..n).collect();
        let mut rate = 40_000.0;
        for k in 0..20 {
            if active.is_empty() {
                break;
            }
            let mut failed = Vec::new();
            for j in 0..active.len() {
                let i = active[(k + j) % active.len()];
                match step(i, rate, round) {
                    Some(relayed) => {
                        best[i] = relayed;
                        passed[i] = rate;
                    }
                    None => failed.push(i),
                }
            }
            active.retain(|i| !failed.contains(i));
            refine.extend(failed.into_iter().filter(|&i| passed[i] > 0.0));
            rate *= RAMP_GROWTH;
        }
        for factor in RAMP_REFINE {
            let mut failed = Vec::new();
            for &i in &refine {
                match step(i, passed[i] * factor, round) {
                    Some(relayed) => best[i] = relayed,
                    None => failed.push(i),
                }
            }
            refine.retain(|i| !failed.contains(i));
        }
        for i in 0..n {
            bests[i].push(best[i]);
        }
    }
    (0..n)
        .map(|i| {
            let (lo, hi) = min_max(&bests[i]);
            json!({
                "relayed_per_second": median(bests[i].clone()),
                "min": lo,
                "max": hi,
                "bests": bests[i],
                "steps": steps[i],
            })
        })
        .collect()
}

/// Memory added by idle allocations, and the allocation rate creating them.
fn idle_allocations(p: &Proc, server: SocketAddr, echo: SocketAddr) -> Value {
    // Warm up code paths and allocator arenas with a few allocations first.
    turnbench(&[
        server.to_string(),
        "--bind".into(),
        CLIENT_IP.into(),
        "-u".into(),
        "bench".into(),
        "-w".into(),
        "bench-password".into(),
        "--peer".into(),
        echo.to_string(),
        "-n".into(),
        "100".into(),
        "-d".into(),
        "0".into(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let before = p.rss_kib();
    let mut child = Command::new(TURNBENCH)
        .args([
            "run",
            &server.to_string(),
            "--bind",
            CLIENT_IP,
            "-u",
            "bench",
            "-w",
            "bench-password",
            "--peer",
            &echo.to_string(),
            "-n",
            &IDLE_ALLOCATIONS.to_string(),
            "-d",
            "0",
            "--hold",
            "3",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("turnbench");
    let stderr = child.stderr.take().unwrap();
    let mut during = None;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains("allocations ready") {
            std::thread::sleep(Duration::from_millis(1500));
            during = Some(p.rss_kib());
        }
    }
    let out = child.wait_with_output().unwrap();
    let r: Report = serde_json::from_slice(&out.stdout).expect("turnbench JSON");
    let during = during.expect("turnbench never reported its allocations ready");
    json!({
        "allocations": r.allocations_ok,
        "rss_before_kib": before,
        "rss_with_allocations_kib": during,
        "added_kib": during.saturating_sub(before),
        "added_kib_per_10000": (during.saturating_sub(before)) as f64
            * 10_000.0 / (r.allocations_ok as f64).max(1.0),
        "allocation_rate": r.allocation_rate,
        "setup_errors": r.setup_errors,
    })
}

/// Memory and allocation rate of every target, in [`Scale::ramps`] rounds
/// (3; one when quick), each measurement on a fresh start, each round
/// starting with a different target, so that the host's drift reaches all
/// alike. One setup of 10,000 allocations moves by a factor of two with
/// the host (6,500–13,500/s for one build within minutes, without a single
/// retransmission), which one run per server turned into the ratio. Returns
/// per target its name, version and `memory`: the median rate and memory
/// per 10,000 over the rounds, the fewest allocations any round set up,
/// and every round. The fixed loads and the ramps are measured apart, all
/// servers together ([`fixed_loads`], [`ramps`]).
fn measure_servers(env: &Env, targets: &[&Target]) -> Vec<Value> {
    let rounds = scale().ramps;
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); targets.len()];
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let t = targets[i];
            eprintln!(
                "==> idle allocations, round {}/{rounds}: {} ({})",
                round + 1,
                t.name,
                t.bin.display()
            );
            let (p, addr) = start_server(env, t);
            runs[i].push(idle_allocations(&p, addr, env.echo));
        }
    }
    targets
        .iter()
        .zip(runs)
        .map(|(t, runs)| {
            let of =
                |key: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[key].as_f64()).collect() };
            let rates = of("allocation_rate");
            let fewest = runs
                .iter()
                .map(|r| r["allocations"].as_u64().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let memory = json!({
                "allocations": fewest,
                "added_kib_per_10000": median(of("added_kib_per_10000")),
                "allocation_rate": median(rates.clone()),
                "allocation_rate_min": rates.iter().copied().fold(f64::INFINITY, f64::min),
                "allocation_rate_max": rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                "rounds": runs,
            });
            json!({"name": t.name, "version": version_of(&t.bin), "memory": memory})
        })
        .collect()
}

/// Allocations per round of the credential-store measurement.
fn store_allocations() -> usize {
    if scale().quick { 300 } else { 2_000 }
}

/// Runs our `turnadmin` with `args`.
fn turnadmin(args: &[&str]) {
    let out = Command::new(TURNADMIN)
        .args(args)
        .output()
        .expect("turnadmin");
    assert!(
        out.status.success(),
        "turnadmin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `user-quota` no benchmark reaches, so that a fleet node asks Redis
/// for every allocation's slot without ever being refused.
const FLEET_QUOTA: u32 = 1_000_000;

/// Starts a `redis-server` of the benchmark's own on a free port: the
/// server (stopped on drop) and its `redis-userdb` string; `None` when
/// Debian's redis-server is not installed (a failure in the quick run).
fn start_redis(env: &Env) -> Option<(Proc, String)> {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            !scale().quick,
            "COMPARE_QUICK: redis-server not found (Debian package redis-server)"
        );
        eprintln!("redis-server not found (Debian package redis-server): no Redis or fleet rows");
        return None;
    }
    let port = free_ports(1);
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(&env.dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server");
    let info = format!("ip=127.0.0.1 dbname=0 port={port} connect_timeout=5");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server does not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((
        Proc {
            child,
            name: "redis-server".into(),
        },
        info,
    ))
}

/// The allocation rate of every target with the benchmark's user as a
/// static `user=` line, in an SQLite file and in Redis (`redis`, when
/// `redis-server` is installed), and for turnserver as a fleet node (Redis
/// and a `user-quota`): per store and target, the median of
/// [`Scale::ramps`] rounds of [`store_allocations`], each on a fresh start.
fn credential_stores(env: &Env, targets: &[&Target], redis: Option<&str>) -> Value {
    // The one user, added to a store named by turnadmin's `-b`/`-N`.
    let add_user = |store: &[&str]| {
        let mut args = vec!["-a"];
        args.extend_from_slice(store);
        args.extend(["-u", "bench", "-r", "bench.test", "-p", "bench-password"]);
        turnadmin(&args);
    };
    let sqlite = env.dir.join("turndb");
    let db = sqlite.to_str().unwrap();
    add_user(&["-b", db]);
    let mut stores = vec![
        ("static", "user=bench:bench-password\n".to_string()),
        ("sqlite", format!("userdb={db}\n")),
    ];
    if let Some(info) = redis {
        add_user(&["-N", info]);
        stores.push(("redis", format!("redis-userdb=\"{info}\"\n")));
        // A node of a fleet: every Allocate takes its quota slot in Redis.
        stores.push((
            "fleet",
            format!("redis-userdb=\"{info}\"\nuser-quota={FLEET_QUOTA}\n"),
        ));
    }
    let n = store_allocations();
    let mut out = serde_json::Map::new();
    for (store, creds) in &stores {
        let mut per_target = serde_json::Map::new();
        for t in targets {
            if *store == "fleet" && t.name != "turnserver" {
                // coturn counts quotas per node: it has no fleet row.
                continue;
            }
            let mut rates = Vec::new();
            for round in 0..scale().ramps {
                eprintln!(
                    "==> allocation rate, {store}, round {}/{}: {}",
                    round + 1,
                    scale().ramps,
                    t.name
                );
                let (_p, addr) = start_server_with(env, t, creds);
                let r = turnbench(&[
                    addr.to_string(),
                    "--bind".into(),
                    CLIENT_IP.into(),
                    "-u".into(),
                    "bench".into(),
                    "-w".into(),
                    "bench-password".into(),
                    "--peer".into(),
                    env.echo.to_string(),
                    "-n".into(),
                    n.to_string(),
                    "-d".into(),
                    "0".into(),
                ]);
                assert!(
                    r.allocations_ok as usize >= n * 95 / 100,
                    "{} with {store}: {} of {n} allocations ({:?})",
                    t.name,
                    r.allocations_ok,
                    r.setup_errors
                );
                rates.push(r.allocation_rate);
            }
            let (lo, hi) = min_max(&rates);
            per_target.insert(
                t.name.to_string(),
                json!({"allocation_rate": median(rates.clone()), "min": lo, "max": hi, "rounds": rates}),
            );
        }
        out.insert(store.to_string(), per_target.into());
    }
    Value::Object(out)
}

/// The credential-store table.
fn stores_report(stores: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Allocation rate by credential store (allocations/s, median (min–max) of {} rounds of {} allocations, each server started fresh; 401, Allocate and ChannelBind each; one user):\n",
        scale().ramps,
        store_allocations()
    );
    let _ = writeln!(
        s,
        "| store | turnserver | coturn | turnserver vs its static users |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    let rate = |store: &str, who: &str| stores[store][who]["allocation_rate"].as_f64();
    let cell = |store: &str, who: &str| {
        let v = &stores[store][who];
        match v["allocation_rate"].as_f64() {
            Some(r) => format!(
                "{r:.0} ({:.0}–{:.0})",
                v["min"].as_f64().unwrap_or(f64::NAN),
                v["max"].as_f64().unwrap_or(f64::NAN)
            ),
            None => "–".to_string(),
        }
    };
    for store in ["static", "sqlite", "redis", "fleet"] {
        if stores.get(store).is_none() {
            continue;
        }
        let vs_static = match (rate(store, "turnserver"), rate("static", "turnserver")) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let label = match store {
            "fleet" => "fleet node (redis, user-quota)",
            other => other,
        };
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {vs_static} |",
            cell(store, "turnserver"),
            cell(store, "coturn")
        );
    }
    s
}

/// Whether valgrind and callgrind_control are installed.
fn have_callgrind() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// valgrind's `--vgdb-prefix`: the FIFOs through which callgrind_control
/// reaches a server under valgrind go in the run's own directory (removed at
/// the end) rather than the system's temporary directory, where a SIGKILLed
/// valgrind would leave them behind.
fn vgdb_prefix(env: &Env) -> String {
    format!("--vgdb-prefix={}", env.dir.join("vgdb-pipe").display())
}

/// Runs `callgrind_control ACTION PID` (`-z` zeroes the counters, `-d`
/// dumps them to a file).
fn callgrind_control(env: &Env, p: &Proc, action: &str) {
    let out = Command::new("callgrind_control")
        .arg(vgdb_prefix(env))
        .arg(action)
        .arg(p.pid().to_string())
        .output()
        .expect("callgrind_control");
    assert!(
        out.status.success(),
        "callgrind_control {action} {}: {}",
        p.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Instructions counted since the last zeroing: dumps them (the `n`th dump
/// of the process, written to `out.n`) and reads the dump's summary line.
fn callgrind_dump(env: &Env, p: &Proc, out: &Path, n: usize) -> f64 {
    callgrind_control(env, p, "-d");
    let file = PathBuf::from(format!("{}.{n}", out.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = std::fs::read_to_string(&file).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("summary:"))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let Some(v) = summary {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no callgrind dump from {} in {}",
            p.name,
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// User-space instructions per relayed packet, counted by callgrind on a
/// fresh start of a server (`start` gets the valgrind wrapper): after a
/// warm-up, the instructions of a run at [`INSTRUCTION_LOAD`] minus those
/// of setting up and tearing down the same allocations without traffic.
/// It is steadier than CPU time, not exact (it moves with how many packets
/// each wake-up finds), and it leaves out the kernel, where most of every
/// server's time goes.
fn instructions(
    env: &Env,
    name: &str,
    raw: bool,
    start: impl FnOnce(&[String]) -> (Proc, SocketAddr),
) -> Value {
    eprintln!("==> {name} under callgrind");
    let out = env
        .dir
        .join(format!("{}.callgrind", name.replace(' ', "-")));
    let wrap = vec![
        "valgrind".to_string(),
        "--tool=callgrind".to_string(),
        format!("--callgrind-out-file={}", out.display()),
        vgdb_prefix(env),
    ];
    let (p, addr) = start(&wrap);
    turnbench(&load_args(addr, env, raw, Load::burst(500.0), 1.0));
    callgrind_control(env, &p, "-z");
    turnbench(&load_args(addr, env, raw, INSTRUCTION_LOAD, 0.0));
    let setup = callgrind_dump(env, &p, &out, 1);
    callgrind_control(env, &p, "-z");
    let r = turnbench(&load_args(
        addr,
        env,
        raw,
        INSTRUCTION_LOAD,
        scale().instruction_seconds,
    ));
    let run = callgrind_dump(env, &p, &out, 2);
    let relayed = relayed_packets(&r);
    let per_packet = (run - setup) / relayed.max(1.0);
    eprintln!(
        "    {per_packet:.0} instructions/relayed packet ({relayed:.0} packets, loss {:.3} %)",
        r.loss_percent
    );
    json!({
        "offered_round_trips_per_second": INSTRUCTION_LOAD.rate,
        "seconds": scale().instruction_seconds,
        "setup_instructions": setup,
        "run_instructions": run,
        "relayed_packets": relayed,
        "loss_percent": r.loss_percent,
        "per_relayed_packet": per_packet,
    })
}

/// Starts the kernel floor, `turnbench forward`, towards the echo peer
/// (under `wrap`, see [`Target::wrap`]).
fn start_floor(env: &Env, wrap: &[String]) -> (Proc, SocketAddr) {
    let port = free_ports(1);
    let listen: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = wrapped(wrap, Path::new(TURNBENCH))
        .args([
            "forward",
            "--listen",
            &listen.to_string(),
            "--to",
            &env.echo.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("turnbench forward");
    // Under valgrind it takes a few seconds to start listening.
    std::thread::sleep(Duration::from_millis(if wrap.is_empty() {
        300
    } else {
        5000
    }));
    (
        Proc {
            child,
            name: "kernel floor".into(),
        },
        listen,
    )
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        .unwrap_or_default();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("PRETTY_NAME=")
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {mem} RAM, {os}, Linux {}",
        kernel.trim()
    )
}

/// A server's summarised fixed `load`, if it was measured.
fn load_at(r: &Value, load: Load) -> Option<&Value> {
    r["loads"].as_array().unwrap().iter().find(|l| {
        l["offered_round_trips_per_second"].as_f64() == Some(load.rate)
            && l["step_us"].as_u64() == Some(load.step_us)
            && l["flows"].as_u64() == Some(load.flows as u64)
            && l["transport"].as_str() == Some(load.transport.name())
    })
}

fn cpu_at(r: &Value, load: Load) -> f64 {
    load_at(r, load)
        .and_then(|l| l["cpu_us_per_relayed_packet"].as_f64())
        .unwrap_or(f64::NAN)
}

/// "median (min–max)" from the fields `[median, min, max]` of `v`, with
/// `decimals` digits; NaN for a missing field.
fn median_range(v: &Value, [mid, lo, hi]: [&str; 3], decimals: usize) -> String {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    format!("{:.d$} ({:.d$}–{:.d$})", f(mid), f(lo), f(hi), d = decimals)
}

/// "median (min–max)" of the CPU runs at `load`.
fn cpu_cell(r: &Value, load: Load) -> String {
    match load_at(r, load) {
        Some(l) => median_range(
            l,
            ["cpu_us_per_relayed_packet", "cpu_us_min", "cpu_us_max"],
            2,
        ),
        None => "-".into(),
    }
}

fn p99_at(r: &Value, load: Load) -> f64 {
    load_at(r, load)
        .and_then(|l| l["rtt_us"]["p99"].as_f64())
        .unwrap_or(f64::NAN)
}

/// The median p99 at `load` in µs, or "-" where it was not measured.
fn p99_cell(r: &Value, load: Load) -> String {
    load_at(r, load).map_or("-".into(), |l| {
        format!("{:.0}", l["rtt_us"]["p99"].as_f64().unwrap_or(f64::NAN))
    })
}

fn max_pps(r: &Value) -> f64 {
    r["max"]["relayed_per_second"].as_f64().unwrap_or(f64::NAN)
}

/// Panics unless every measurement of server `r` has something in it: each
/// fixed-load run and each ramp step relayed packets, at least
/// `min_allocations` of the idle allocations were set up (not for the
/// floor) and, when counted, the instructions per packet are a number. A server that stopped relaying, or a turnbench
/// that could not reach it, then fails the run instead of printing zeros;
/// how fast it relayed is left to the tables (a slow host is no failure).
fn check(r: &Value, min_allocations: usize) {
    let name = r["name"].as_str().unwrap_or("?");
    for load in r["loads"].as_array().expect("loads") {
        for run in load["runs"].as_array().expect("runs") {
            assert!(
                run["relayed_packets"].as_f64().unwrap_or(0.0) > 0.0,
                "{name} relayed nothing at {} round trips/s over {} {} allocations",
                load["offered_round_trips_per_second"],
                load["flows"],
                load["transport"],
            );
        }
    }
    let steps = r["max"]["steps"].as_array().expect("ramp steps");
    assert!(!steps.is_empty(), "{name}: no ramp step ran");
    for step in steps {
        assert!(
            step["relayed_per_second"].as_f64().unwrap_or(0.0) > 0.0,
            "{name} relayed nothing in ramp step {step}"
        );
    }
    if let Some(m) = r.get("memory") {
        assert!(
            m["allocations"].as_u64().unwrap_or(0) >= min_allocations as u64,
            "{name}: fewer than {min_allocations} of {IDLE_ALLOCATIONS} idle allocations were set up: {m}"
        );
    }
    if let Some(i) = r.get("instructions") {
        let v = i["per_relayed_packet"].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite(), "{name}: no instruction count: {i}");
    }
}

fn report(
    machine: &str,
    ours: &Value,
    single: &Value,
    coturn: Option<&Value>,
    floor: &Value,
) -> String {
    let mut s = String::new();
    if scale().quick {
        let _ = writeln!(
            s,
            "COMPARE_QUICK: a smoke run, one short round of each measurement; too short to quote.\n"
        );
    }
    let _ = writeln!(s, "Machine: {machine}\n");
    let _ = writeln!(
        s,
        "turnserver {}; coturn {}; load: turnbench, {FLOWS} UDP allocations, ChannelData, 170-byte payloads, echo peer `turnbench echo`, all on 127.0.0.1.\n",
        ours["version"].as_str().unwrap_or("?"),
        coturn.map_or("not found (run benches/setup-coturn.sh)".to_string(), |c| c
            ["version"]
            .as_str()
            .unwrap_or("?")
            .to_string()),
    );
    let table = |s: &mut String, loads: &[Load], how: &str| {
        let _ = writeln!(
            s,
            "Server CPU per relayed packet (µs; user + system; median and range of {} runs of {} s) and median p99 round trip (µs), {how}:\n",
            scale().repeats,
            scale().load_seconds,
        );
        let _ = writeln!(
            s,
            "| offered round trips/s | relayed packets/s | turnserver | turnserver, 1 thread | coturn | kernel floor | turnserver p99 | coturn p99 | floor p99 |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
        for &load in loads {
            let _ = writeln!(
                s,
                "| {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
                load.rate,
                load.rate * 2.0,
                cpu_cell(ours, load),
                cpu_cell(single, load),
                coturn.map_or("-".into(), |c| cpu_cell(c, load)),
                cpu_cell(floor, load),
                p99_cell(ours, load),
                coturn.map_or("-".into(), |c| p99_cell(c, load)),
                p99_cell(floor, load),
            );
        }
        let _ = writeln!(s);
    };
    table(
        &mut s,
        &LOADS,
        &format!("packets sent in bursts every {BURST_STEP_US} µs"),
    );
    table(
        &mut s,
        &SPREAD_LOADS,
        &format!("packets spread out, sent every {SPREAD_STEP_US} µs"),
    );
    table(
        &mut s,
        &FEW_FLOW_LOADS,
        &format!(
            "only {} allocations, packets sent in bursts every {BURST_STEP_US} µs (several per allocation per burst, as high-bitrate video)",
            FEW_FLOW_LOADS[0].flows
        ),
    );
    for load in STREAM_LOADS {
        table(
            &mut s,
            &[load],
            &format!(
                "clients over {} (the relayed side is UDP), packets sent in bursts every {BURST_STEP_US} µs; the floor forwards UDP only",
                load.transport.name().to_uppercase()
            ),
        );
    }
    let ratio = |a: f64, b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}", a / b));
    let yes = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "not met",
        None => "-",
    };
    let c = coturn;
    let o_cpu = cpu_at(ours, HEADLINE_LOAD);
    let c_cpu = c.map(|c| cpu_at(c, HEADLINE_LOAD));
    let f_cpu = cpu_at(floor, HEADLINE_LOAD);
    let o_max = max_pps(ours);
    let c_max = c.map(max_pps);
    let o_mem = ours["memory"]["added_kib_per_10000"].as_f64().unwrap() / 1024.0;
    let c_mem = c.map(|c| c["memory"]["added_kib_per_10000"].as_f64().unwrap() / 1024.0);
    let o_rate = ours["memory"]["allocation_rate"].as_f64().unwrap();
    let c_rate = c.map(|c| c["memory"]["allocation_rate"].as_f64().unwrap());
    let o_p99 = p99_at(ours, HEADLINE_LOAD);
    let c_p99 = c.map(|c| p99_at(c, HEADLINE_LOAD));
    let _ = writeln!(
        s,
        "| metric | turnserver | coturn | turnserver / coturn | goal | |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    let _ = writeln!(
        s,
        "| server CPU per relayed packet at {:.0} relayed/s (µs) | {o_cpu:.2} | {} | {} | ≤ 0.6 | {} |",
        HEADLINE_LOAD.rate * 2.0,
        c_cpu.map_or("-".into(), |v| format!("{v:.2}")),
        ratio(o_cpu, c_cpu),
        yes(c_cpu.map(|c| o_cpu / c <= 0.6)),
    );
    let _ = writeln!(
        s,
        "| same, against the kernel floor ({f_cpu:.2} µs) | {o_cpu:.2} | | {:.2} (to floor) | ≤ 1.2 | {} |",
        o_cpu / f_cpu,
        yes(Some(o_cpu / f_cpu <= 1.2)),
    );
    let _ = writeln!(
        s,
        "| max relayed packets/s with < 0.1 % loss | {o_max:.0} | {} | {} | ≥ 2 | {} |",
        c_max.map_or("-".into(), |v| format!("{v:.0}")),
        ratio(o_max, c_max),
        yes(c_max.map(|c| o_max / c >= 2.0)),
    );
    let _ = writeln!(
        s,
        "| resident memory added by 10,000 idle allocations (MiB) | {o_mem:.1} | {} | {} | ≤ 0.25 | {} |",
        c_mem.map_or("-".into(), |v| format!("{v:.1}")),
        ratio(o_mem, c_mem),
        yes(c_mem.map(|c| o_mem / c <= 0.25)),
    );
    let _ = writeln!(
        s,
        "| allocation rate (401, Allocate, ChannelBind per second) | {o_rate:.0} | {} | {} | ≥ 2 | {} |",
        c_rate.map_or("-".into(), |v| format!("{v:.0}")),
        ratio(o_rate, c_rate),
        yes(c_rate.map(|c| o_rate / c >= 2.0)),
    );
    let _ = writeln!(
        s,
        "| p99 round trip at {:.0} relayed/s (µs) | {o_p99:.0} | {} | {} | ≤ 1 | {} |",
        HEADLINE_LOAD.rate * 2.0,
        c_p99.map_or("-".into(), |v| format!("{v:.0}")),
        ratio(o_p99, c_p99),
        yes(c_p99.map(|c| o_p99 <= c)),
    );
    let range = |r: &Value| median_range(&r["max"], ["relayed_per_second", "min", "max"], 0);
    let _ = writeln!(
        s,
        "\nMax relayed packets/s with < 0.1 % loss, median (range) of {} ramps: turnserver {}, turnserver with relay-threads=1 {}, coturn {}, kernel floor {}.",
        scale().ramps,
        range(ours),
        range(single),
        c.map_or("-".into(), range),
        range(floor),
    );
    let rate = |r: &Value| {
        median_range(
            &r["memory"],
            [
                "allocation_rate",
                "allocation_rate_min",
                "allocation_rate_max",
            ],
            0,
        )
    };
    let _ = writeln!(
        s,
        "Allocations per second setting up {IDLE_ALLOCATIONS}, median (range) of {} {}, each on a fresh start: turnserver {}, turnserver with relay-threads=1 {}, coturn {}.",
        scale().ramps,
        if scale().ramps == 1 {
            "round"
        } else {
            "rounds"
        },
        rate(ours),
        rate(single),
        c.map_or("-".into(), rate),
    );
    let _ = writeln!(
        s,
        "turnserver with relay-threads=1: {:.1} MiB per 10,000 idle allocations.",
        single["memory"]["added_kib_per_10000"].as_f64().unwrap() / 1024.0,
    );
    let instr = |r: &Value| {
        r["instructions"]["per_relayed_packet"]
            .as_f64()
            .map_or("-".to_string(), |v| format!("{v:.0}"))
    };
    let _ = writeln!(
        s,
        "User-space instructions per relayed packet (valgrind's callgrind, {FLOWS} allocations at {:.0} round trips/s for {} s, setup subtracted; the kernel's share is not counted): turnserver (udp-steering=off: clients spread over both workers) {}, turnserver with relay-threads=1 {}, coturn {}, kernel floor {}.",
        INSTRUCTION_LOAD.rate,
        scale().instruction_seconds,
        instr(ours),
        instr(single),
        c.map_or("-".into(), instr),
        instr(floor),
    );
    s
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    // One socket per allocation, here and in the servers started from here.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let dir = std::env::temp_dir().join(format!("turnserver-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _remove_dir = RemoveDir(dir.clone());
    let echo_port = free_ports(1);
    let echo: SocketAddr = format!("127.0.0.1:{echo_port}").parse().unwrap();
    let _echo = Proc {
        child: Command::new(TURNBENCH)
            .args(["echo", "--listen", &echo.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnbench echo"),
        name: "echo".into(),
    };
    std::thread::sleep(Duration::from_millis(300));
    let tls = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("a self-signed certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, tls.cert.pem()).unwrap();
    std::fs::write(&key, tls.signing_key.serialize_pem()).unwrap();
    let env = Env {
        dir: dir.clone(),
        echo,
        cert,
        key,
    };

    let ours_t = Target {
        name: "turnserver",
        bin: TURNSERVER.into(),
        // Every benchmark client comes from 127.0.0.1: lift the
        // per-address limit on unauthenticated answers (401s).
        args: vec!["--unauthorized-ratelimit-rps=0".into()],
        wrap: Vec::new(),
    };
    // The same, with one worker thread: what the data path costs when it
    // does not wake two threads for the same load.
    let single_t = Target {
        name: "turnserver-1-thread",
        bin: TURNSERVER.into(),
        args: vec![
            "--unauthorized-ratelimit-rps=0".into(),
            "--relay-threads=1".into(),
        ],
        wrap: Vec::new(),
    };
    let coturn_t = find_coturn().map(|bin| Target {
        name: "coturn",
        bin,
        args: Vec::new(),
        wrap: Vec::new(),
    });
    if coturn_t.is_none() {
        // The smoke run is the test command's: it compares with coturn or fails.
        assert!(
            !scale().quick,
            "COMPARE_QUICK: coturn not found: run benches/setup-coturn.sh, or set COTURN_BIN"
        );
        eprintln!("coturn not found: run benches/setup-coturn.sh, or set COTURN_BIN");
    }
    let mut measured = measure_servers(
        &env,
        &[Some(&ours_t), Some(&single_t), coturn_t.as_ref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
    )
    .into_iter();
    let mut ours = measured.next().unwrap();
    let mut single = measured.next().unwrap();
    let mut coturn = coturn_t.as_ref().map(|_| measured.next().unwrap());
    let mut floor = json!({"name": "kernel floor"});
    let redis = start_redis(&env);
    let stores = credential_stores(
        &env,
        &[Some(&ours_t), coturn_t.as_ref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
        redis.as_ref().map(|(_, info)| info.as_str()),
    );
    // turnserver as a fleet node with everything on: users in Redis, a
    // user-quota counted there, its registry and heartbeat, and coturn's
    // status feed; the relay path should not notice.
    let fleet_t = redis.as_ref().map(|(_, info)| Target {
        name: "turnserver-fleet",
        bin: TURNSERVER.into(),
        args: vec![
            "--unauthorized-ratelimit-rps=0".into(),
            format!("--redis-userdb={info}"),
            format!("--redis-statsdb={info}"),
            format!("--user-quota={FLEET_QUOTA}"),
            "--node-name=bench".into(),
        ],
        wrap: Vec::new(),
    });
    let mut fleet = fleet_t
        .as_ref()
        .map(|_| json!({"name": "turnserver-fleet"}));

    // Fixed loads, then the ramps: every server from a fresh start, all
    // running at once, measured one at a time in turn.
    let mut servers = Vec::new();
    for t in [
        Some(&ours_t),
        Some(&single_t),
        coturn_t.as_ref(),
        fleet_t.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let (proc, addr) = start_server(&env, t);
        servers.push(Loaded {
            proc,
            addr,
            raw: false,
        });
    }
    let (proc, addr) = start_floor(&env, &[]);
    servers.push(Loaded {
        proc,
        addr,
        raw: true,
    });
    let loads = fixed_loads(&servers, &env);
    let maxima = ramps(&servers, &env);
    drop(servers);
    let mut results = loads.into_iter().zip(maxima);
    for r in [
        Some(&mut ours),
        Some(&mut single),
        coturn.as_mut(),
        fleet.as_mut(),
        Some(&mut floor),
    ]
    .into_iter()
    .flatten()
    {
        let (loads, max) = results.next().unwrap();
        r["loads"] = loads.into();
        r["max"] = max;
    }

    if have_callgrind() {
        // Under valgrind every thread runs some fifty times slower, so UDP
        // steering, which follows worker 0's CPU time, switches off at some
        // moment of the warm-up or of the run, and the two-worker count
        // depended on when (1,958 and 2,627 in two runs of one build). With
        // steering off it always counts the path that spreads clients over
        // both workers; the one-worker count is the steered path.
        let spread = ["--udp-steering=off".to_string()];
        for (r, t, extra) in [
            (Some(&mut ours), Some(&ours_t), &spread[..]),
            (Some(&mut single), Some(&single_t), &[]),
            (coturn.as_mut(), coturn_t.as_ref(), &[]),
        ] {
            if let (Some(r), Some(t)) = (r, t) {
                r["instructions"] = instructions(&env, t.name, false, |wrap| {
                    let t = Target {
                        wrap: wrap.to_vec(),
                        args: [&t.args[..], extra].concat(),
                        ..t.clone()
                    };
                    start_server(&env, &t)
                });
            }
        }
        floor["instructions"] =
            instructions(&env, "kernel floor", true, |wrap| start_floor(&env, wrap));
    } else {
        assert!(
            !scale().quick,
            "COMPARE_QUICK: valgrind not found (Debian package valgrind)"
        );
        eprintln!("valgrind not found (Debian package valgrind): no instruction counts");
    }
    // turnserver sets up every allocation. coturn 4.6.1 answers a few in
    // 10,000 with 437 "Mismatched allocation: wrong transaction ID" (4 and 8
    // in two runs): those whose client port is one of the 100 warm-up
    // allocations', deleted just before, which coturn has not let go of
    // (see tests/protocol.rs). turnbench counts them under "setup_errors".
    check(&ours, IDLE_ALLOCATIONS);
    check(&single, IDLE_ALLOCATIONS);
    if let Some(c) = &coturn {
        check(c, IDLE_ALLOCATIONS * 95 / 100);
    }
    check(&floor, 0);
    if let Some(f) = &fleet {
        check(f, 0);
    }

    let machine = machine();
    let all = json!({
        "machine": machine,
        "turnserver": ours,
        "turnserver_1_thread": single,
        "coturn": coturn,
        "floor": floor,
        "credential_stores": stores,
        "turnserver_fleet": fleet,
    });
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join(if scale().quick {
        "target/compare-quick.json"
    } else {
        "target/compare.json"
    });
    let _ = std::fs::write(&target, serde_json::to_string_pretty(&all).unwrap());
    println!(
        "{}",
        report(&machine, &ours, &single, coturn.as_ref(), &floor)
    );
    println!("{}", stores_report(&stores));
    if let Some(f) = &fleet {
        println!("{}", fleet_report(&ours, f, &stores));
    }
    eprintln!("raw numbers: {}", target.display());
}

/// The fleet table: the relay path and the allocation rate of a fleet node
/// (Redis users, a user-quota counted in Redis, registry, heartbeat and
/// `redis-statsdb` on) against a lone node.
fn fleet_report(ours: &Value, fleet: &Value, stores: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "A fleet node (redis-userdb with a user-quota, redis-statsdb, one Redis on 127.0.0.1) against a lone node (user= lines), from the runs above:\n"
    );
    let _ = writeln!(s, "| measure | lone node | fleet node | fleet / lone |");
    let _ = writeln!(s, "|---|---|---|---|");
    let ratio = |a: f64, b: f64| {
        if a.is_finite() && b.is_finite() && b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "–".into()
        }
    };
    for load in LOADS {
        let _ = writeln!(
            s,
            "| CPU µs per relayed packet at {:.0} round trips/s | {} | {} | {} |",
            load.rate,
            cpu_cell(ours, load),
            cpu_cell(fleet, load),
            ratio(cpu_at(fleet, load), cpu_at(ours, load))
        );
    }
    let _ = writeln!(
        s,
        "| most relayed packets/s under 0.1 % loss | {:.0} | {:.0} | {} |",
        max_pps(ours),
        max_pps(fleet),
        ratio(max_pps(fleet), max_pps(ours))
    );
    let rate = |store: &str| {
        stores[store]["turnserver"]["allocation_rate"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let _ = writeln!(
        s,
        "| allocations/s (401, Allocate, ChannelBind) | {:.0} | {:.0} | {} (goal ≥ 0.80) |",
        rate("static"),
        rate("fleet"),
        ratio(rate("fleet"), rate("static"))
    );
    s
}
