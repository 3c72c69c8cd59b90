//! Configuration for containers and clouds: settings from environment
//! variables and files, `external-ip=auto` against a fake cloud metadata
//! service and a STUN server on loopback, the private-relay warning, and
//! the `--health-check` and `--drain` commands a container runs.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BIN, Client, Cloud, FakeMetadata, NetNs, Options, Server, TOKEN, TempDir, free_ports, http_get,
    relay_range, run_with_timeout,
};

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

/// The relayed address of a new allocation.
fn relayed_ip(s: &Server) -> IpAddr {
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate(USER, PASSWORD);
    assert!(
        r.is_success(),
        "allocate failed: {:?}\n{}",
        r.code(),
        s.log_text()
    );
    let ip = r.relayed().ip();
    c.delete(USER, PASSWORD);
    ip
}

fn auto_server(extra: &str) -> Server {
    Server::start(Options::new(&format!(
        "lt-cred-mech\nrealm=example.org\nuser={USER}:{PASSWORD}\nexternal-ip=auto\n{extra}"
    )))
}

/// Waits until the server's log holds `text`.
fn wait_log(s: &Server, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.log_text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no '{text}' in the log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn environment_variables_configure_a_server_without_a_file() {
    let dir = TempDir::new("env");
    let port = free_ports(1);
    let (min, max) = relay_range(20);
    // The password as a Docker/Kubernetes secret file.
    let secret = dir.path("turn_password");
    std::fs::write(&secret, format!("{PASSWORD}\n")).unwrap();
    let env: Vec<(String, String)> = [
        ("TURN_USERNAME", USER.to_string()),
        ("TURN_PASSWORD_FILE", secret.display().to_string()),
        ("REALM", "example.org".to_string()),
        ("EXTERNAL_IP", "203.0.113.9".to_string()),
        ("TURNSERVER_LISTENING_IP", "127.0.0.1".to_string()),
        ("TURNSERVER_LISTENING_PORT", port.to_string()),
        ("TURNSERVER_MIN_PORT", min.to_string()),
        ("TURNSERVER_MAX_PORT", max.to_string()),
        ("TURNSERVER_NO_TLS", "true".to_string()),
        ("TURNSERVER_LOG_LEVEL", "debug".to_string()),
        // Empty counts as unset.
        ("TURNSERVER_DENIED_PEER_IP", String::new()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    // No configuration file at all (-n); the command line still wins.
    let s = Server::launch_env(
        vec!["-n".into(), "--realm".into(), "cli.example.org".into()],
        port,
        port + 1,
        dir,
        &env,
        None,
    );
    let log = s.log_text();
    assert!(
        log.contains(
            "settings from the environment: TURN_USERNAME, TURN_PASSWORD_FILE, REALM, EXTERNAL_IP, TURNSERVER_LISTENING_IP"
        ),
        "{log}"
    );
    assert!(!log.contains("TURNSERVER_DENIED_PEER_IP"), "{log}");
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate(USER, PASSWORD);
    assert!(r.is_success(), "{:?}\n{log}", r.code());
    assert_eq!(r.relayed().ip(), "203.0.113.9".parse::<IpAddr>().unwrap());
    let relay_port = r.relayed().port();
    assert!((min..=max).contains(&relay_port), "{relay_port}");
    // --realm on the command line beat REALM.
    let mut other = Client::new(s.udp_addr());
    let r = other.allocate("alice", "wrong");
    assert_eq!(r.code(), Some(401));
    assert_eq!(
        r.msg()
            .text(turnserver::stun::attr::REALM)
            .unwrap()
            .unwrap(),
        "cli.example.org"
    );
    assert!(
        s.log_text().contains("DEBUG"),
        "log-level from the environment"
    );
}

#[test]
fn bad_environment_values_name_the_variable() {
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(BIN)
            .args(["-n", "--check-config"])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{env:?} was accepted");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let e = run(&[("TURNSERVER_MIN_PORT", "lots")]);
    assert!(
        e.contains("environment variable TURNSERVER_MIN_PORT: min-port:"),
        "{e}"
    );
    let e = run(&[("TURN_USERNAME", "alice")]);
    assert!(e.contains("TURN_PASSWORD"), "{e}");
    let e = run(&[("REALM_FILE", "/nonexistent/realm")]);
    assert!(
        e.contains("environment variable REALM_FILE") && e.contains("/nonexistent/realm"),
        "{e}"
    );
    let e = run(&[("REALM", "a"), ("REALM_FILE", "/etc/hostname")]);
    assert!(e.contains("both REALM and REALM_FILE"), "{e}");
}

#[test]
fn external_ip_auto_asks_aws_imdsv2_with_a_token_and_again_on_reload() {
    let meta = FakeMetadata::start(Cloud::Aws("203.0.113.77".into()));
    let s = auto_server(&format!("external-ip-metadata={}\n", meta.url()));
    wait_log(
        &s,
        "external-ip=auto: 203.0.113.77 (from AWS metadata (IMDSv2))",
    );
    assert_eq!(relayed_ip(&s), "203.0.113.77".parse::<IpAddr>().unwrap());
    let reqs = meta.requests();
    assert!(
        reqs.contains(&"PUT /latest/api/token".to_string()),
        "{reqs:?}"
    );
    assert!(
        reqs.contains(&format!("GET /latest/meta-data/public-ipv4 [{TOKEN}]")),
        "{reqs:?}"
    );
    // Loopback listening, an advertised public address: no warning.
    assert!(!s.log_text().contains("clients outside this network"));

    // The Elastic IP moves: a reload finds the new one.
    *meta.cloud.lock().unwrap() = Cloud::Aws("203.0.113.78".into());
    s.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&s, "external-ip=auto: 203.0.113.78");
    wait_log(&s, "configuration reloaded");
    assert_eq!(relayed_ip(&s), "203.0.113.78".parse::<IpAddr>().unwrap());

    // The service stops answering: the reload keeps the last address.
    *meta.cloud.lock().unwrap() = Cloud::Silent;
    s.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&s, "the public address was not found again");
    assert_eq!(relayed_ip(&s), "203.0.113.78".parse::<IpAddr>().unwrap());
}

#[test]
fn external_ip_auto_asks_gcp_with_its_header() {
    let meta = FakeMetadata::start(Cloud::Gcp("198.51.100.23".into()));
    let s = auto_server(&format!("external-ip-metadata={}\n", meta.url()));
    wait_log(&s, "external-ip=auto: 198.51.100.23 (from GCP metadata)");
    assert_eq!(relayed_ip(&s), "198.51.100.23".parse::<IpAddr>().unwrap());
    // AWS was asked too, and said nothing useful.
    assert!(
        meta.requests().iter().any(|r| r == "PUT /latest/api/token"),
        "{:?}",
        meta.requests()
    );
}

#[test]
fn external_ip_auto_falls_back_to_stun() {
    // Another of our servers on loopback is the STUN server.
    let stun = Server::start(Options::new(""));
    let s = auto_server(&format!(
        "external-ip-metadata=off\nexternal-ip-stun=127.0.0.1:{}\n",
        stun.port
    ));
    wait_log(
        &s,
        &format!(
            "external-ip=auto: 127.0.0.1 (from STUN server 127.0.0.1:{})",
            stun.port
        ),
    );
    assert_eq!(relayed_ip(&s), "127.0.0.1".parse::<IpAddr>().unwrap());
}

#[test]
fn external_ip_auto_timeout_uses_the_fallback_or_refuses_to_start() {
    let meta = FakeMetadata::start(Cloud::Silent);
    // A STUN server that never answers: a bound socket nobody reads.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let common = format!(
        "external-ip-metadata={}\nexternal-ip-stun={}\nexternal-ip-timeout=1\n",
        meta.url(),
        dead.local_addr().unwrap()
    );
    let s = auto_server(&format!("{common}external-ip-fallback=192.0.2.10\n"));
    wait_log(&s, "using external-ip-fallback 192.0.2.10");
    assert!(
        s.log_text().contains("no answer in 1 s"),
        "{}",
        s.log_text()
    );
    assert_eq!(relayed_ip(&s), "192.0.2.10".parse::<IpAddr>().unwrap());

    // Without a fallback the server does not start, and says why.
    let dir = TempDir::new("noauto");
    let conf = dir.path("turnserver.conf");
    let port = free_ports(1);
    std::fs::write(
        &conf,
        format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\nno-tls\nexternal-ip=auto\n{common}"
        ),
    )
    .unwrap();
    let (done, out) = run_with_timeout(
        Command::new(BIN).arg("-c").arg(&conf),
        Duration::from_secs(30),
    );
    assert!(!done, "started without an address:\n{out}");
    assert!(
        out.contains("external-ip=auto: the public address was not found")
            && out.contains("external-ip-fallback"),
        "{out}"
    );
}

#[test]
fn a_private_relay_address_behind_a_public_listener_is_warned_about() {
    // A namespace with a public (documentation) and a private address.
    let ns = NetNs::empty("priv");
    ns.ip(&[
        "-n", &ns.name, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ns.address("d0", "198.51.100.1/24");
    ns.address("d0", "10.0.0.1/24");
    ns.ip(&["-n", &ns.name, "link", "set", "d1", "up"]);
    let port = free_ports(1).to_string();
    let base = [
        "-n",
        "--listening-ip",
        "198.51.100.1",
        "--listening-port",
        &port,
        "--no-tls",
        "--relay-ip",
        "10.0.0.1",
    ];
    let warned = ns.start_server(&base);
    let log = warned.log();
    assert!(
        log.contains(
            "relays will advertise 10.0.0.1, which clients outside this network cannot reach"
        ) && log.contains("external-ip=auto"),
        "{log}"
    );
    drop(warned);
    // The same with the mapping set: no warning.
    let mut mapped = base.to_vec();
    mapped.extend(["--external-ip", "198.51.100.1/10.0.0.1"]);
    let fine = ns.start_server(&mapped);
    assert!(
        !fine.log().contains("clients outside this network"),
        "{}",
        fine.log()
    );
}

#[test]
fn health_check_and_drain_commands() {
    let mport = free_ports(1);
    let dir = TempDir::new("drain");
    let pidfile = dir.path("turnserver.pid");
    let s = Server::start(Options::new(&format!(
        "lt-cred-mech\nrealm=example.org\nuser={USER}:{PASSWORD}\nprometheus\nprometheus-address=127.0.0.1\nprometheus-port={mport}\npidfile={}\ndrain-timeout=60\n",
        pidfile.display()
    )));
    let conf = s.dir.path("turnserver.conf");
    let health = Command::new(BIN)
        .arg("--health-check")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(health.status.success(), "{health:?}");
    assert!(String::from_utf8_lossy(&health.stdout).starts_with("ok"));

    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate(USER, PASSWORD).is_success());
    let live = SocketAddr::from(([127, 0, 0, 1], mport));
    // The count follows the allocation as the worker records it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(live, "/live") != (200, "serving\nallocations: 1\n".into()) {
        assert!(Instant::now() < deadline, "{:?}", http_get(live, "/live"));
        std::thread::sleep(Duration::from_millis(100));
    }

    // --drain signals the server (found through its pidfile) and waits for
    // the allocation to end.
    let out = dir.path("drain.out");
    let mut drain = Command::new(BIN)
        .arg("--drain")
        .arg("-c")
        .arg(&conf)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&out)
        .unwrap()
        .contains("1 allocations left")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&out).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(live, "/health").0, 503);
    assert_eq!(
        http_get(live, "/live"),
        (200, "draining\nallocations: 1\n".into())
    );
    let unhealthy = Command::new(BIN)
        .arg("--health-check")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(!unhealthy.status.success());
    assert!(drain.try_wait().unwrap().is_none(), "--drain did not wait");
    assert!(c.delete(USER, PASSWORD).is_success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = drain.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "--drain did not end");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.contains(&format!("process {} drains", s.pid())),
        "{text}"
    );
    assert!(text.contains("no allocations left"), "{text}");

    // Without metrics there is nothing to ask: healthy by definition.
    let off = Command::new(BIN)
        .args(["-n", "--health-check"])
        .output()
        .unwrap();
    assert!(off.status.success());
    assert!(String::from_utf8_lossy(&off.stdout).contains("metrics are off"));
}

#[test]
fn check_config_shows_what_auto_finds_and_prints_auto_back() {
    let meta = FakeMetadata::start(Cloud::Gcp("198.51.100.40".into()));
    let dir = TempDir::new("checkauto");
    let conf = dir.path("turnserver.conf");
    std::fs::write(
        &conf,
        format!(
            "external-ip=auto\nexternal-ip-metadata={}\nexternal-ip-timeout=1\n",
            meta.url()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("external-ip=auto: 198.51.100.40 (from GCP metadata)"),
        "{stderr}"
    );
    assert!(stdout.lines().any(|l| l == "external-ip=auto"), "{stdout}");
    assert!(!stdout.contains("198.51.100.40"), "{stdout}");
}
