//! turnbench, the load generator, against the real server on loopback: every
//! mode it offers sets up its allocations, relays without loss at a modest
//! rate, measures round trips and deletes what it created; and it drives
//! Debian's coturn the same way (it speaks plain RFC 8656).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Background, Options, Server, TempDir, free_ports};

const TURNBENCH: &str = env!("CARGO_BIN_EXE_turnbench");

const USERS: &str = "lt-cred-mech\nrealm=bench.test\nuser=bench:bench-password\n\
                     allow-loopback-peers\nunauthorized-ratelimit-rps=0\n";

/// Runs turnbench; returns whether it succeeded, its stdout and stderr.
fn turnbench(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(TURNBENCH)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start turnbench");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `turnbench run ... --json` and returns the parsed report.
fn run_json(args: &[&str]) -> Value {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.push("--json");
    let (ok, out, err) = turnbench(&all);
    assert!(ok, "turnbench {args:?} failed:\n{out}\n{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `turnbench run SERVER` with the static test user (`USERS`) towards the
/// echo peer `peer`, then `rest`; returns the parsed report.
fn run_echo(server: &str, peer: SocketAddr, rest: &[&str]) -> Value {
    let peer = peer.to_string();
    let mut args = vec![
        server,
        "-u",
        "bench",
        "-w",
        "bench-password",
        "--peer",
        &peer,
    ];
    args.extend_from_slice(rest);
    run_json(&args)
}

/// `turnbench echo` on a free port.
fn echo_peer() -> (Background, SocketAddr) {
    let port = free_ports(1);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Background(
        Command::new(TURNBENCH)
            .args(["echo", "--listen", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnbench echo"),
    );
    // Ready once it echoes.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 16];
    for _ in 0..50 {
        probe.send_to(b"ping", addr).unwrap();
        if probe.recv(&mut buf).is_ok() {
            return (child, addr);
        }
    }
    panic!("turnbench echo did not start");
}

/// Checks a report of a run that should have relayed everything.
fn assert_clean(r: &Value, allocations: u64, per_round_trip: u64) {
    assert_eq!(r["allocations_ok"], allocations, "{r:#}");
    assert!(r["setup_errors"].as_object().unwrap().is_empty(), "{r:#}");
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 100, "{r:#}");
    assert_eq!(r["received"].as_u64().unwrap(), sent, "loss: {r:#}");
    assert_eq!(r["relayed_per_round_trip"], per_round_trip, "{r:#}");
    let rtt = &r["rtt_us"];
    let (p50, p99, max) = (
        rtt["p50"].as_f64().unwrap(),
        rtt["p99"].as_f64().unwrap(),
        rtt["max"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{r:#}");
    if r["mode"] != "raw" {
        assert!(r["allocation_rate"].as_f64().unwrap() > 0.0, "{r:#}");
        assert_eq!(r["allocations_deleted"], allocations, "{r:#}");
    }
}

#[test]
fn udp_echo_channel_data_and_send_indications() {
    let s = Server::start(Options::new(USERS));
    let (_echo, peer) = echo_peer();
    let server = s.udp_addr().to_string();
    let load = ["-n", "8", "-r", "2000", "-d", "1"];
    let r = run_echo(&server, peer, &load);
    assert_eq!(r["mode"], "echo");
    assert_eq!(r["send"], "channel");
    assert_clean(&r, 8, 2);

    let r = run_echo(&server, peer, &[&load[..], &["--indications"]].concat());
    assert_eq!(r["send"], "indication");
    assert_clean(&r, 8, 2);

    // The server saw every allocation come and go.
    let log = s.log_text();
    assert_eq!(log.matches("allocation created").count(), 16, "{log}");
    assert_eq!(
        log.matches("reason=refresh with lifetime 0").count(),
        16,
        "{log}"
    );
}

#[test]
fn client_to_client_pairs_and_windowed_saturation() {
    let s = Server::start(Options::new(USERS));
    let server = s.udp_addr().to_string();
    let r = run_json(&[
        &server,
        "-u",
        "bench",
        "-w",
        "bench-password",
        "-n",
        "6",
        "-r",
        "1500",
        "-d",
        "1",
    ]);
    assert_eq!(r["mode"], "pairs");
    assert_clean(&r, 6, 4);
    assert_eq!(r["reflected"], r["received"], "{r:#}");

    // --rate 0 keeps a window of packets in flight and reports what got
    // through; on loopback nothing is lost.
    let (_echo, peer) = echo_peer();
    let r = run_echo(
        &server,
        peer,
        &["-n", "4", "-r", "0", "--window", "2", "-d", "1"],
    );
    assert!(r["offered_rate"].is_null(), "{r:#}");
    assert!(
        r["round_trips_per_second"].as_f64().unwrap() > 1000.0,
        "{r:#}"
    );
}

#[test]
fn tcp_and_tls_with_rest_credentials() {
    let s = Server::start(
        Options::new(
            "use-auth-secret\nstatic-auth-secret=bench-secret\nrealm=bench.test\n\
             allow-loopback-peers\nunauthorized-ratelimit-rps=0\n",
        )
        .tls(),
    );
    let (_echo, peer) = echo_peer();
    let peer = peer.to_string();
    let plain = format!("127.0.0.1:{}", s.port);
    let r = run_json(&[
        &plain,
        "-t",
        "tcp",
        "--secret",
        "bench-secret",
        "-u",
        "carol",
        "--peer",
        &peer,
        "-n",
        "4",
        "-r",
        "1000",
        "-d",
        "1",
    ]);
    assert_eq!(r["transport"], "tcp");
    assert_clean(&r, 4, 2);

    let tls = format!("127.0.0.1:{}", s.tls_port);
    let ca = s.dir.path("cert.pem");
    let ca = ca.to_str().unwrap();
    let r = run_json(&[
        &tls,
        "-t",
        "tls",
        "--ca",
        ca,
        "--tls-name",
        "localhost",
        "--secret",
        "bench-secret",
        "--peer",
        &peer,
        "-n",
        "4",
        "-r",
        "1000",
        "-d",
        "1",
    ]);
    assert_eq!(r["transport"], "tls");
    assert_clean(&r, 4, 2);

    // Without a trusted certificate, TLS is refused up front.
    let (ok, _, err) = turnbench(&[
        "run",
        &tls,
        "-t",
        "tls",
        "--secret",
        "bench-secret",
        "--peer",
        &peer,
    ]);
    assert!(!ok);
    assert!(err.contains("--ca FILE"), "{err}");
}

/// turnbench setting up `n` allocations on `server` as user bench with a
/// wrong password, then no traffic, with `extra` arguments.
fn wrong_password(
    server: &str,
    peer: SocketAddr,
    n: &str,
    extra: &[&str],
) -> (bool, String, String) {
    let peer = peer.to_string();
    let mut args = vec![
        "run", server, "-u", "bench", "-w", "wrong", "--peer", &peer, "-n", n, "-d", "0",
    ];
    args.extend_from_slice(extra);
    turnbench(&args)
}

#[test]
fn wrong_credentials_are_reported() {
    let s = Server::start(Options::new(USERS));
    let (_echo, peer) = echo_peer();
    let (ok, out, err) = wrong_password(&s.udp_addr().to_string(), peer, "3", &[]);
    assert!(!ok, "{out}");
    assert!(out.contains("setup error x3: Allocate: 401"), "{out}");
    assert!(err.contains("no allocation could be set up"), "{err}");
}

/// A UDP proxy in front of `server` that drops the first datagram from each
/// new client address and relays everything else both ways; stops when
/// dropped.
struct Lossy {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Lossy {
    fn start(server: SocketAddr) -> Lossy {
        use std::collections::HashMap;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        front
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let addr = front.local_addr().unwrap();
        let (front2, stop2) = (front.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut upstream: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = [0u8; 2048];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, client)) = front2.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(up) = upstream.get(&client) {
                    let _ = up.send(&buf[..n]);
                    continue;
                }
                // A new client: its first datagram is lost; answers from
                // the server to its own upstream socket go back to it.
                let up = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                up.connect(server).unwrap();
                up.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                upstream.insert(client, up.clone());
                let (front3, stop3) = (front2.clone(), stop2.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop3.load(Ordering::Relaxed) {
                        if let Ok(n) = up.recv(&mut buf) {
                            let _ = front3.send_to(&buf[..n], client);
                        }
                    }
                });
            }
        });
        Lossy { addr, stop }
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A request that gets no answer within the RTO is sent again, and the
/// report counts it: through a proxy that loses each client's first
/// datagram (its first Allocate), every allocation is still set up, with
/// one retransmission each and the 500 ms it costs in the setup time.
#[test]
fn setup_retransmissions_are_counted() {
    let s = Server::start(Options::new(USERS));
    let (_echo, peer) = echo_peer();
    let lossy = Lossy::start(s.udp_addr());
    let set_up_3 =
        |server: SocketAddr| run_echo(&server.to_string(), peer, &["-n", "3", "-d", "0"]);
    let r = set_up_3(lossy.addr);
    assert_eq!(r["allocations_ok"], 3, "{r:#}");
    assert!(r["setup_errors"].as_object().unwrap().is_empty(), "{r:#}");
    assert_eq!(r["setup_retransmissions"], 3, "{r:#}");
    assert!(r["setup_seconds"].as_f64().unwrap() >= 0.5, "{r:#}");
    // Without the loss, nothing is sent twice.
    let r = set_up_3(s.udp_addr());
    assert_eq!(r["allocations_ok"], 3, "{r:#}");
    assert_eq!(r["setup_retransmissions"], 0, "{r:#}");
}

#[test]
fn kernel_floor_forwarder() {
    let (_echo, peer) = echo_peer();
    let port = free_ports(1);
    let listen = format!("127.0.0.1:{port}");
    let _fwd = Background(
        Command::new(TURNBENCH)
            .args(["forward", "--listen", &listen, "--to", &peer.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnbench forward"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let r = run_json(&[&listen, "--raw", "-n", "5", "-r", "2000", "-d", "1"]);
    assert_eq!(r["mode"], "raw");
    assert_clean(&r, 5, 2);
}

/// Runs `turnbench run --raw` at 10,000 packets/s from one flow against a
/// plain UDP socket for one second, and returns the sizes of the bursts the
/// packets arrived in: packets less than 40 µs apart by their kernel receive
/// timestamps (SO_TIMESTAMPNS) belong to one burst.
fn arrival_bursts(step_us: &'static str) -> Vec<usize> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
    use std::os::fd::AsRawFd;

    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    setsockopt(&sink, sockopt::ReceiveTimestampns, &true).unwrap();
    setsockopt(&sink, sockopt::RcvBuf, &(4 << 20)).unwrap();
    sink.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let target = sink.local_addr().unwrap().to_string();
    let generator = std::thread::spawn(move || {
        turnbench(&[
            "run", &target, "--raw", "-n", "1", "-r", "10000", "--step", step_us, "-d", "1",
        ])
    });
    let mut stamps: Vec<Duration> = Vec::new();
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<()>(
            sink.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            break; // quiet for 500 ms: the run is over
        };
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmTimestampns(t) = c {
                stamps.push(Duration::from(t));
            }
        }
    }
    let (ok, out, err) = generator.join().unwrap();
    // Nothing answers, so turnbench reports the loss, but it must have run.
    assert!(out.contains("sent every"), "{ok} {out} {err}");
    assert!(stamps.len() > 5_000, "{} packets arrived", stamps.len());
    let mut bursts = vec![1];
    for w in stamps.windows(2) {
        if w[1].saturating_sub(w[0]) < Duration::from_micros(40) {
            *bursts.last_mut().unwrap() += 1;
        } else {
            bursts.push(1);
        }
    }
    bursts
}

/// The median of `v`.
fn median(mut v: Vec<usize>) -> usize {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn pacing_step_spreads_packets() {
    // Default pacing: every millisecond the 10 packets due leave together.
    let bursts = arrival_bursts("1000");
    assert!(median(bursts.clone()) >= 4, "bursts {bursts:?}");
    // --step 100: one packet every 100 µs.
    let bursts = arrival_bursts("100");
    assert!(median(bursts.clone()) <= 2, "bursts {bursts:?}");
    // Steps outside 20 µs..1 s are refused.
    let (ok, _, err) = turnbench(&["run", "127.0.0.1:9", "--raw", "--step", "5"]);
    assert!(!ok && err.contains("--step"), "{err}");
}

/// Where benches/setup-coturn.sh puts Debian's coturn (tests/run-all.sh runs
/// it); never on PATH, so `turnserver` stays ours.
const COTURN: &str = "/opt/coturn/usr/bin/turnserver";

#[test]
fn drives_coturn_too() {
    assert!(
        Path::new(COTURN).is_file(),
        "{COTURN} is missing: run benches/setup-coturn.sh (tests/run-all.sh does)"
    );
    let dir = TempDir::new("coturn");
    let port = free_ports(2);
    let conf = dir.path("coturn.conf");
    std::fs::write(
        &conf,
        format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\ntls-listening-port={}\n\
             min-port=62000\nmax-port=62999\nlt-cred-mech\nuser=bench:bench-password\n\
             realm=bench.test\nallow-loopback-peers\nno-tls\nno-dtls\nno-cli\n\
             simple-log\nlog-file={}\npidfile={}\n",
            port + 1,
            dir.path("coturn.log").display(),
            dir.path("coturn.pid").display(),
        ),
    )
    .unwrap();
    let _coturn = Background(
        Command::new(COTURN)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start coturn"),
    );
    let (_echo, peer) = echo_peer();
    let server = format!("127.0.0.1:{port}");
    // coturn answers once its threads are up.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let (ok, out, err) = turnbench(&[
            "run",
            &server,
            "-u",
            "bench",
            "-w",
            "bench-password",
            "--peer",
            &peer.to_string(),
            "-n",
            "6",
            "-r",
            "2000",
            "-d",
            "1",
            "--json",
        ]);
        if ok {
            break serde_json::from_str::<Value>(&out).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "coturn never served:\n{out}\n{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_clean(&r, 6, 2);
    // coturn's refusals are reported by request, code and reason phrase.
    let (ok, out, _) = wrong_password(&server, peer, "2", &["--json"]);
    assert!(!ok, "{out}");
    let r: Value = serde_json::from_str(&out).unwrap();
    let errors = r["setup_errors"].as_object().unwrap();
    assert_eq!(errors.len(), 1, "{r:#}");
    let (what, count) = errors.iter().next().unwrap();
    assert!(what.starts_with("Allocate: 401 "), "{what:?}");
    assert!(!what.contains('\0'), "{what:?}");
    assert_eq!(count.as_u64(), Some(2), "{r:#}");
}
