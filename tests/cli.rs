//! The binary's command line, configuration errors, start-up warnings,
//! logging and signals.

mod common;

use std::net::{TcpListener, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{BIN, Client, Options, Server, TempDir, free_ports, run_with_timeout};

fn run(args: &[&str]) -> (bool, String) {
    run_with_timeout(Command::new(BIN).args(args), Duration::from_secs(20))
}

#[test]
fn version_and_help() {
    let (ok, out) = run(&["--version"]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        format!("turnserver {}", env!("CARGO_PKG_VERSION"))
    );
    let (ok, out) = run(&["--help"]);
    assert!(ok, "{out}");
    for opt in [
        "--listening-ip",
        "-c <FILE>",
        "--static-auth-secret",
        "--user",
        "not implemented yet",
    ] {
        assert!(out.contains(opt), "help lacks {opt}:\n{out}");
    }
}

#[test]
fn unknown_command_line_option_is_fatal() {
    let (ok, out) = run(&["-n", "--no-such-option"]);
    assert!(!ok);
    assert!(out.contains("no-such-option"), "{out}");
}

/// Writes `text` as a config file and runs the binary on it.
fn with_config(text: &str) -> (bool, String, String, u16) {
    let dir = TempDir::new("cli");
    let port = free_ports(2);
    let path = dir.path("bad.conf");
    let tls_port = port + 1;
    std::fs::write(
        &path,
        format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\ntls-listening-port={tls_port}\n{text}"
        ),
    )
    .unwrap();
    let p = path.to_str().unwrap().to_string();
    let (ok, out) = run(&["-c", &p]);
    (ok, out, p, port)
}

#[test]
fn bad_values_exit_non_zero_naming_file_line_and_key_before_binding() {
    let cases = [
        (
            "listening-port=70000",
            "4: listening-port: '70000' is not a port number (1-65535)",
        ),
        (
            "min-port=60000\nmax-port=50000",
            "5: max-port: min-port 60000 is greater than max-port 50000",
        ),
        (
            "relay-ip=not-an-ip",
            "4: relay-ip: 'not-an-ip' is not an IP address",
        ),
        (
            "fingerprint=perhaps",
            "4: fingerprint: 'perhaps' is not a boolean",
        ),
        (
            "cert=/nonexistent/cert.pem\npkey=/nonexistent/key.pem",
            "4: cert: cannot read certificate /nonexistent/cert.pem",
        ),
        (
            "cert=/etc/hostname\npkey=/etc/hostname",
            "4: cert: /etc/hostname contains no PEM certificate",
        ),
    ];
    for (text, want) in cases {
        let (ok, out, path, port) = with_config(text);
        assert!(!ok, "{text}: should fail:\n{out}");
        assert!(
            out.contains(&format!("{path}:{want}")),
            "{text}: expected '{path}:{want}' in:\n{out}"
        );
        // Nothing was bound: the listening port is still free.
        assert!(
            UdpSocket::bind(("127.0.0.1", port)).is_ok(),
            "{text}: port was bound"
        );
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "{text}: port was bound"
        );
    }
}

#[test]
fn missing_explicit_config_file_is_an_error() {
    let (ok, out) = run(&["-c", "/nonexistent/turnserver.conf"]);
    assert!(!ok);
    assert!(
        out.contains("configuration file '/nonexistent/turnserver.conf' not found"),
        "{out}"
    );
}

#[test]
fn a_busy_port_is_reported() {
    let port = free_ports(1);
    let _squatter = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let (ok, out) = run(&[
        "-n",
        "--listening-ip=127.0.0.1",
        "-p",
        &port.to_string(),
        "--no-tls",
    ]);
    assert!(!ok);
    assert!(
        out.contains(&format!("cannot listen on udp 127.0.0.1:{port}")),
        "{out}"
    );
}

/// A second server on the addresses of a running one fails at once, naming
/// the first one's pid, instead of silently sharing the port through
/// SO_REUSEPORT; the first keeps serving.
#[test]
fn a_second_server_on_a_taken_port_fails_and_the_first_keeps_serving() {
    let mut first = Server::start(Options::new("lt-cred-mech\nrealm=r\nuser=u:p\n"));
    let conf = first.dir.path("turnserver.conf");
    let started = std::time::Instant::now();
    let (ok, out) = run(&["-c", conf.to_str().unwrap()]);
    assert!(!ok, "the second server must not start:\n{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it must fail fast, took {:?}",
        started.elapsed()
    );
    let want = format!(
        "cannot listen on udp {}: address already in use by another process (pid {}, turnserver)",
        first.udp_addr(),
        first.pid()
    );
    assert!(out.contains(&want), "expected '{want}' in:\n{out}");
    assert!(first.alive());
    let mut c = Client::new(first.udp_addr());
    assert!(c.transact(&common::binding_request([2; 12])).is_success());
    assert!(c.allocate("u", "p").is_success());
    assert!(c.delete("u", "p").is_success());
    assert!(first.stop().success());
}

/// Any other socket that would share a listening port through SO_REUSEPORT
/// (here a TCP listener of the test itself) stops the server too.
#[test]
fn a_foreign_reuseport_listener_is_not_joined() {
    use socket2::{Domain, Protocol, Socket, Type};
    // A free port can be taken by another test between the check and the
    // bind: try a few.
    let (port, addr, _squatter) = (0..20)
        .find_map(|_| {
            let port = free_ports(1);
            let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
            s.set_reuse_address(true).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).ok()?;
            s.listen(8).ok()?;
            Some((port, addr, s))
        })
        .expect("a free port for the squatter");
    let (ok, out) = run(&[
        "-n",
        "--listening-ip=127.0.0.1",
        "-p",
        &port.to_string(),
        "--no-tls",
    ]);
    assert!(!ok, "{out}");
    let want = format!(
        "cannot listen on tcp {addr}: address already in use by another process (pid {}",
        std::process::id()
    );
    assert!(out.contains(&want), "expected '{want}' in:\n{out}");
}

#[test]
fn warnings_unknown_keys_and_unimplemented_options() {
    let mut s = Server::start(Options::new(
        "no-such-key=1\nweb-admin\nno-loopback-peers\ncipher-list=DEFAULT\n",
    ));
    let log = s.log_text();
    let line = s.config_line(1);
    assert!(
        log.contains(&format!(
            "turnserver.conf:{line}: unknown option 'no-such-key' ignored"
        )),
        "{log}"
    );
    assert!(
        log.contains("option 'web-admin' is not implemented yet and is ignored"),
        "{log}"
    );
    assert!(
        log.contains("option 'cipher-list' is not implemented yet"),
        "{log}"
    );
    assert!(
        !log.contains("no-loopback-peers"),
        "legacy option accepted silently:\n{log}"
    );
    assert!(
        log.contains("NO AUTHENTICATION"),
        "running without auth must be loud:\n{log}"
    );
    assert!(s.alive());
    assert!(s.stop().success(), "SIGTERM exits 0");
    assert!(s.log_text().contains("SIGTERM: shutting down"));
}

#[test]
fn reload_signals_do_not_kill_the_server() {
    let mut s = Server::start(Options::new(""));
    let pid = nix::unistd::Pid::from_raw(s.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR2).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.alive());
    let mut c = Client::new(s.udp_addr());
    let r = c.transact(&common::binding_request([1; 12]));
    assert!(r.is_success());
    let log = s.log_text();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("certificates reloaded"), "{log}");
}

#[test]
fn log_file_gets_the_log() {
    let dir = TempDir::new("logfile");
    let path = dir.path("turn.log");
    let mut s = Server::start(Options::new(&format!(
        "log-file={}\nno-stdout-log\n",
        path.display()
    )));
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("listening on udp 127.0.0.1:"), "{text}");
    assert!(
        !s.log_text().contains("listening on udp"),
        "no-stdout-log: stdout stays quiet"
    );
    s.stop();
}
