//! Operations on the real binary: reload without dropping anyone, systemd
//! notification, drain, metrics, privilege dropping, pid file, log reopen
//! and --check-config.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    BIN, Background, Client, Options, Server, StreamClient, TempDir, binding_request,
    channel_bind_attrs, free_ports, http_get, metric, relay_range, run_with_timeout, tls_connect,
    write_test_cert,
};
use nix::sys::signal::Signal;
use turnserver::auth::rest_password;
use turnserver::stun::{attr, method};

const ALICE_OLD: &str = "lt-cred-mech\nrealm=r\nuser=alice:old\nallow-loopback-peers\n";

/// An allocation with a channel to a local peer.
struct Relaying {
    client: Client,
    peer: UdpSocket,
    relayed: SocketAddr,
    server: SocketAddr,
}

impl Relaying {
    fn new(server: SocketAddr, user: &str, pw: &str) -> Relaying {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut client = Client::new(server);
        let r = client.allocate(user, pw);
        assert!(r.is_success(), "{:?}", r.code());
        let relayed = r.relayed();
        let bind = channel_bind_attrs(0x4000, peer.local_addr().unwrap());
        assert!(
            client
                .signed(method::CHANNEL_BIND, &bind, user, pw)
                .is_success()
        );
        Relaying {
            client,
            peer,
            relayed,
            server,
        }
    }

    /// One datagram each way.
    fn round_trip(&self) {
        self.client
            .sock
            .send_to(&[0x40, 0x00, 0, 2, b'u', b'p', 0, 0], self.server)
            .unwrap();
        let mut buf = [0u8; 100];
        let (n, _) = self.peer.recv_from(&mut buf).expect("peer receives");
        assert_eq!(&buf[..n], b"up");
        self.peer.send_to(b"dn", self.relayed).unwrap();
        let (n, _) = self
            .client
            .sock
            .recv_from(&mut buf)
            .expect("client receives");
        assert_eq!(&buf[4..n], b"dn");
    }
}

/// Whether a TLS handshake with the server succeeds when only `cert` is
/// trusted.
fn tls_trusts(addr: SocketAddr, cert: &std::path::Path) -> bool {
    let mut tls = tls_connect(addr, cert);
    tls.conn.complete_io(&mut tls.sock).is_ok()
}

fn new_cert(dir: &TempDir, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let sub = TempDir::new(name);
    let (c, k) = write_test_cert(&sub);
    let cert = dir.path(&format!("{name}-cert.pem"));
    let key = dir.path(&format!("{name}-key.pem"));
    std::fs::copy(c, &cert).unwrap();
    std::fs::copy(k, &key).unwrap();
    (cert, key)
}

#[test]
fn sighup_changes_passwords_and_certificates_without_dropping_anyone() {
    let s = Server::start(Options::new(ALICE_OLD).tls());
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], s.tls_port));
    let live = Relaying::new(s.udp_addr(), "alice", "old");
    live.round_trip();
    let keep = TempDir::new("certs");
    let old_cert = keep.path("old.pem");
    std::fs::copy(s.dir.path("cert.pem"), &old_cert).unwrap();
    let mut tls_before = StreamClient::new(tls_connect(tls_addr, &old_cert));
    assert!(tls_before.transact(&binding_request([1; 12])).is_success());

    // New password and a new certificate, then SIGHUP.
    let (new_cert, new_key) = new_cert(&keep, "new");
    std::fs::copy(&new_cert, s.dir.path("cert.pem")).unwrap();
    std::fs::copy(&new_key, s.dir.path("key.pem")).unwrap();
    s.rewrite_config("lt-cred-mech\nrealm=r\nuser=alice:new\nallow-loopback-peers\n");
    s.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));

    // The allocation made with the old password keeps relaying and refreshing.
    live.round_trip();
    let mut c = live.client;
    assert!(c.signed(method::REFRESH, &[], "alice", "old").is_success());
    // New logins need the new password.
    assert_eq!(
        Client::new(s.udp_addr()).allocate("alice", "old").code(),
        Some(401)
    );
    assert!(
        Client::new(s.udp_addr())
            .allocate("alice", "new")
            .is_success()
    );
    // New TLS connections get the new certificate; the open one carries on.
    assert!(tls_trusts(tls_addr, &new_cert));
    assert!(!tls_trusts(tls_addr, &old_cert));
    assert!(tls_before.transact(&binding_request([2; 12])).is_success());

    // A broken configuration is refused and the running one stays.
    s.rewrite_config("lt-cred-mech\nrealm=r\nuser=alice:newer\nmax-port=99999\n");
    s.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    let log = s.log_text();
    assert!(
        log.contains("configuration not reloaded, the previous one stays in force"),
        "{log}"
    );
    assert!(
        log.contains("max-port: '99999' is not a port number"),
        "{log}"
    );
    assert!(
        Client::new(s.udp_addr())
            .allocate("alice", "new")
            .is_success()
    );
    assert_eq!(
        Client::new(s.udp_addr()).allocate("alice", "newer").code(),
        Some(401)
    );
    // Settings only a restart can apply are named.
    s.rewrite_config("lt-cred-mech\nrealm=r\nuser=alice:new\nrelay-threads=7\n");
    s.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.log_text()
            .contains("need a restart to take effect: relay-threads")
    );
    assert!(!s.log_text().contains("secret"), "no secrets in the log");
}

#[test]
fn sigusr2_reloads_only_the_certificate() {
    let s = Server::start(Options::new(ALICE_OLD).tls());
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], s.tls_port));
    let keep = TempDir::new("usr2");
    let (new_cert, new_key) = new_cert(&keep, "renewed");
    std::fs::copy(&new_cert, s.dir.path("cert.pem")).unwrap();
    std::fs::copy(&new_key, s.dir.path("key.pem")).unwrap();
    // A config change is not applied by SIGUSR2.
    s.rewrite_config("lt-cred-mech\nrealm=r\nuser=alice:changed\n");
    s.signal(Signal::SIGUSR2);
    std::thread::sleep(Duration::from_millis(500));
    assert!(tls_trusts(tls_addr, &new_cert));
    assert!(
        Client::new(s.udp_addr())
            .allocate("alice", "old")
            .is_success()
    );
    assert!(s.log_text().contains("certificates reloaded"));
}

fn notifications(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = m.lines().any(|l| l == until);
            got.push(m);
            if done {
                return got;
            }
        }
    }
    panic!("no {until} within {limit:?}; got {got:?}");
}

#[test]
fn systemd_notifications_follow_the_lifecycle() {
    let dir = TempDir::new("notify");
    let sock_path = dir.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let port = free_ports(1);
    let (min, max) = relay_range(20);
    let log = std::fs::File::create(dir.path("log")).unwrap();
    let child = Command::new(BIN)
        .args(["-n", "-L", "127.0.0.1", "-p", &port.to_string(), "--no-tls"])
        .args([format!("--min-port={min}"), format!("--max-port={max}")])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let mut server = Background(child);
    let got = notifications(&sock, "READY=1", Duration::from_secs(10));
    // Ready means ready: the very first Binding is answered.
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    probe
        .send_to(&binding_request([1; 12]), ("127.0.0.1", port))
        .unwrap();
    assert!(
        probe.recv_from(&mut [0u8; 200]).is_ok(),
        "READY=1 before the port answers"
    );
    let got = [
        got,
        notifications(
            &sock,
            "STATUS=serving; 0 allocations",
            Duration::from_secs(5),
        ),
    ]
    .concat();
    assert!(got.iter().any(|m| m.contains("STATUS=serving")), "{got:?}");
    // WatchdogSec=1s: pings at least every half second.
    notifications(&sock, "WATCHDOG=1", Duration::from_secs(3));

    nix::sys::signal::kill(pid, Signal::SIGHUP).unwrap();
    let reload = notifications(&sock, "READY=1", Duration::from_secs(5));
    let text = reload.join("\n");
    let reloading = text.find("RELOADING=1").expect("RELOADING=1");
    assert!(text.contains("MONOTONIC_USEC="), "{text}");
    assert!(reloading < text.rfind("READY=1").unwrap(), "{text}");

    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    notifications(&sock, "STOPPING=1", Duration::from_secs(5));
    let st = server.0.wait().unwrap();
    assert!(st.success());
}

#[test]
fn sigterm_drains_then_exits_when_the_last_allocation_ends() {
    let metrics = free_ports(1);
    let mut s = Server::start(Options::new(&format!(
        "{ALICE_OLD}drain-timeout=60\nprometheus\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\n"
    )));
    let health = SocketAddr::from(([127, 0, 0, 1], metrics));
    assert_eq!(http_get(health, "/health").0, 200);
    let live = Relaying::new(s.udp_addr(), "alice", "old");
    s.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        Client::new(s.udp_addr()).allocate("alice", "old").code(),
        Some(508)
    );
    assert_eq!(http_get(health, "/health").0, 503);
    assert_eq!(http_get(health, "/").0, 503);
    live.round_trip();
    assert!(
        s.wait_exit(Duration::from_secs(1)).is_none(),
        "exited with an allocation left"
    );
    live.round_trip();
    let mut c = live.client;
    assert!(c.delete("alice", "old").is_success());
    let st = s
        .wait_exit(Duration::from_secs(5))
        .expect("exits once the allocation is gone");
    assert!(st.success());
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let mut s = Server::start(Options::new(&format!("{ALICE_OLD}drain-timeout=600\n")));
    let _live = Relaying::new(s.udp_addr(), "alice", "old");
    s.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.wait_exit(Duration::from_millis(500)).is_none());
    s.signal(Signal::SIGTERM);
    let st = s
        .wait_exit(Duration::from_secs(3))
        .expect("second SIGTERM exits");
    assert!(st.success());
}

#[test]
fn sigusr1_drains_without_exiting_and_alternate_server_redirects() {
    let metrics = free_ports(1);
    let mut s = Server::start(Options::new(&format!(
        "{ALICE_OLD}drain-timeout=1\nprometheus\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\n"
    )));
    let health = SocketAddr::from(([127, 0, 0, 1], metrics));
    let live = Relaying::new(s.udp_addr(), "alice", "old");
    s.signal(Signal::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        Client::new(s.udp_addr()).allocate("alice", "old").code(),
        Some(508)
    );
    assert_eq!(http_get(health, "/health").0, 503);
    live.round_trip();
    assert!(
        s.wait_exit(Duration::from_millis(1500)).is_none(),
        "SIGUSR1 does not exit"
    );
    // SIGTERM with drain-timeout=1 exits despite the allocation.
    s.signal(Signal::SIGTERM);
    assert!(
        s.wait_exit(Duration::from_secs(5))
            .expect("exits after drain-timeout")
            .success()
    );

    let s = Server::start(Options::new(&format!(
        "{ALICE_OLD}alternate-server=198.51.100.9\n"
    )));
    let r = Client::new(s.udp_addr()).allocate("alice", "old");
    assert_eq!(r.code(), Some(300));
    let alt = attr::decode_address(
        attr::ALTERNATE_SERVER,
        r.msg().get(attr::ALTERNATE_SERVER).unwrap(),
    )
    .unwrap();
    assert_eq!(alt, "198.51.100.9:3478".parse().unwrap());
    assert!(
        r.msg().has_integrity(),
        "300 to an authenticated request is signed"
    );
}

#[test]
fn metrics_match_the_traffic() {
    let metrics = free_ports(1);
    let s = Server::start(Options::new(&format!(
        "{ALICE_OLD}prometheus\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\nrelay-threads=2\n"
    )));
    let addr = SocketAddr::from(([127, 0, 0, 1], metrics));
    let live = Relaying::new(s.udp_addr(), "alice", "old");
    let mut buf = [0u8; 200];
    for _ in 0..10 {
        let mut cd = vec![0x40, 0x00, 0, 100];
        cd.extend([1u8; 100]);
        live.client.sock.send_to(&cd, s.udp_addr()).unwrap();
        live.peer.recv_from(&mut buf).unwrap();
    }
    for _ in 0..7 {
        live.peer.send_to(&[2u8; 50], live.relayed).unwrap();
        live.client.sock.recv_from(&mut buf).unwrap();
    }
    assert_eq!(
        Client::new(s.udp_addr()).allocate("alice", "wrong").code(),
        Some(401)
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200);
    let m = |line: &str| metric(&body, line).unwrap_or_else(|| panic!("no {line} in\n{body}"));
    assert_eq!(m("turn_relayed_packets_total{direction=\"to_peer\"}"), 10.0);
    assert_eq!(m("turn_relayed_bytes_total{direction=\"to_peer\"}"), 1000.0);
    assert_eq!(
        m("turn_relayed_packets_total{direction=\"to_client\"}"),
        7.0
    );
    assert_eq!(
        m("turn_relayed_bytes_total{direction=\"to_client\"}"),
        350.0
    );
    assert_eq!(m("turn_allocations{transport=\"udp\"}"), 1.0);
    assert_eq!(m("turn_allocations_created_total"), 1.0);
    assert_eq!(m("turn_channels"), 1.0);
    assert_eq!(m("turn_permissions"), 1.0);
    assert_eq!(m("turn_auth_failures_total{reason=\"bad_integrity\"}"), 1.0);
    assert_eq!(m("turn_relay_ports{state=\"in_use\"}"), 1.0);
    assert_eq!(m("turn_draining"), 0.0);
    // Per worker: both threads report CPU time, and the allocation is on
    // exactly one of them.
    let cpu: Vec<f64> = (0..2)
        .map(|w| m(&format!("turn_worker_cpu_seconds_total{{worker=\"{w}\"}}")))
        .collect();
    assert!(cpu.iter().all(|&c| c > 0.0), "{cpu:?}");
    let on: Vec<f64> = (0..2)
        .map(|w| m(&format!("turn_worker_allocations{{worker=\"{w}\"}}")))
        .collect();
    assert_eq!(on.iter().sum::<f64>(), 1.0, "{on:?}");
    assert!(metric(&body, "turn_worker_allocations{worker=\"2\"}").is_none());
    assert!(m("process_open_fds") > 0.0);
    assert!(m("process_resident_memory_bytes") > 0.0);
    // An ended allocation moves to the ended counter, traffic stays counted.
    let mut c = live.client;
    assert!(c.delete("alice", "old").is_success());
    std::thread::sleep(Duration::from_millis(1500));
    let (_, body) = http_get(addr, "/metrics");
    assert_eq!(
        metric(&body, "turn_allocations_ended_total{reason=\"deleted\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&body, "turn_allocations{transport=\"udp\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(&body, "turn_relayed_packets_total{direction=\"to_peer\"}"),
        Some(10.0)
    );
    assert_eq!(http_get(addr, "/").0, 200);
    assert_eq!(http_get(addr, "/nope").0, 404);
}

#[test]
fn user_labels_stay_bounded_after_ten_thousand_rest_usernames() {
    // Room for the descriptors the test and the server need.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let metrics = free_ports(1);
    let (min, max) = relay_range(1400);
    let s = Server::start(Options::new(&format!(
        "use-auth-secret\nstatic-auth-secret=k\nrealm=r\nprometheus\nprometheus-username-labels\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\nunauthorized-ratelimit-rps=0\nmin-port={min}\nmax-port={max}\n"
    )));
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let server = s.udp_addr();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            std::thread::spawn(move || {
                // Clients whose allocations stay alive keep their sockets, so
                // no later client reuses their 5-tuple.
                let mut kept = Vec::new();
                for i in (t..10_000).step_by(4) {
                    let user = format!("{expiry}:user{i}");
                    let pw = rest_password(b"k", &user);
                    let mut c = Client::new(server);
                    let r = c.allocate(&user, &pw);
                    assert!(r.is_success(), "{user}: {:?}", r.code());
                    if i < 1200 {
                        kept.push(c);
                    } else {
                        assert!(c.delete(&user, &pw).is_success());
                    }
                }
                kept
            })
        })
        .collect();
    let _kept: Vec<Vec<Client>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let (_, body) = http_get(SocketAddr::from(([127, 0, 0, 1], metrics)), "/metrics");
    let series = body
        .lines()
        .filter(|l| l.starts_with("turn_user_allocations{"))
        .count();
    assert_eq!(series, 1001, "1000 users and _other");
    assert_eq!(
        metric(&body, "turn_user_allocations{user=\"_other\"}"),
        Some(200.0)
    );
    assert_eq!(
        metric(&body, "turn_allocations{transport=\"udp\"}"),
        Some(1200.0)
    );
    assert_eq!(
        metric(&body, "turn_allocations_created_total"),
        Some(10_000.0)
    );
}

#[test]
fn privileges_pid_file_and_log_reopen() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test checks dropping privileges and must run as root (as CI does)"
    );
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let files = TempDir::new("priv");
    std::fs::set_permissions(
        &files.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let pidfile = files.path("turnserver.pid");
    let logfile = files.path("turnserver.log");
    let mut s = Server::start(Options::new(&format!(
        "{ALICE_OLD}proc-user=nobody\npidfile={}\nlog-file={}\n",
        pidfile.display(),
        logfile.display()
    )));
    let pid = s.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<u32> = uid_line
        .split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect();
    assert!(uids.iter().all(|u| *u == nobody.uid.as_raw()), "{uid_line}");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        pid.to_string()
    );
    Relaying::new(s.udp_addr(), "alice", "old").round_trip();
    // logrotate: move the file away, SIGHUP, a new file appears.
    let rotated = files.path("turnserver.log.1");
    std::fs::rename(&logfile, &rotated).unwrap();
    s.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    Relaying::new(s.udp_addr(), "alice", "old");
    let fresh = std::fs::read_to_string(&logfile).expect("log file reopened");
    assert!(fresh.contains("allocation created"), "{fresh}");
    assert!(
        std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("running as user")
    );
    s.signal(Signal::SIGTERM);
    // Two signals in quick succession would be seen as one.
    std::thread::sleep(Duration::from_millis(200));
    s.signal(Signal::SIGTERM);
    assert!(s.wait_exit(Duration::from_secs(5)).unwrap().success());
    assert!(!pidfile.exists(), "pid file removed on exit");
}

#[test]
fn check_config_prints_the_effective_configuration_with_secrets_masked() {
    let dir = TempDir::new("check");
    let conf = dir.path("t.conf");
    std::fs::write(
        &conf,
        "realm=example.org\nuser=alice:hunter2\nuser=bob:0xbc807ee29df3c9ffa736523fb2c4e8ee\nstatic-auth-secret=s3cr3t\nlistening-port=4000\nno-tls\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--check-config", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("listening-port=4000"), "{stdout}");
    assert!(stdout.contains("user=alice:******"), "{stdout}");
    assert!(stdout.contains("user=bob:0x******"), "{stdout}");
    assert!(stdout.contains("static-auth-secret=******"), "{stdout}");
    assert!(
        stdout.contains("# authentication: TURN REST API"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("hunter2") && !stdout.contains("s3cr3t") && !stdout.contains("bc807ee2"),
        "{stdout}"
    );
    assert!(stderr.contains("configuration OK"));
    // What it prints is itself a valid configuration.
    let again = dir.path("again.conf");
    std::fs::write(&again, stdout.replace("******", "x")).unwrap();
    let (ok, text) = run_with_timeout(
        Command::new(BIN).args(["--check-config", "-c"]).arg(&again),
        Duration::from_secs(10),
    );
    assert!(ok, "{text}");
    // Errors exit non-zero: a bad value, a missing certificate.
    std::fs::write(&conf, "cert=/nonexistent.pem\npkey=/nonexistent.pem\n").unwrap();
    let out = Command::new(BIN)
        .args(["--check-config", "-c"])
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read certificate /nonexistent.pem")
    );
    std::fs::write(&conf, "min-port=70000\n").unwrap();
    assert!(
        !Command::new(BIN)
            .args(["--check-config", "-c"])
            .arg(&conf)
            .status()
            .unwrap()
            .success()
    );
}
