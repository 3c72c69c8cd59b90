//! Listener and relay address options on the real binary: the default of
//! every local address (in a network namespace of the test's own),
//! `no-udp`/`no-tcp`, devices, `external-ip`, peer lists and `-o`.

mod common;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    BIN, Client, NetNs, Options, Server, StreamClient, TempDir, binding_request, free_ports,
    relay_range, run_with_timeout, xor_peer,
};
use turnserver::stun::{attr, method};

#[test]
fn without_listening_ip_every_local_address_is_served() {
    let ns = NetNs::new("all", "198.51.100.1");
    let server = ns.start_server(&[
        "-n",
        "-p",
        "3478",
        "--no-tls",
        "--min-port=60000",
        "--max-port=60100",
        "--user=alice:pw",
        "--realm=example.org",
    ]);
    let text = server.log();
    for want in [
        "udp 127.0.0.1:3478",
        "udp 198.51.100.1:3478",
        "udp [::1]:3478",
        "tcp 198.51.100.1:3478",
    ] {
        assert!(
            text.contains(&format!("listening on {want}")),
            "missing {want}:\n{text}"
        );
    }
    assert!(
        !text.contains("fe80"),
        "link-local addresses are skipped:\n{text}"
    );
    // Each address answers, and an allocation made through the veth address
    // is relayed from that address. (The namespace is private to this test,
    // so the default port 3478 is free there.)
    let (mapped, relayed) = ns.run(|| {
        let server: SocketAddr = "198.51.100.1:3478".parse().unwrap();
        let mut c = Client::new(server);
        let mapped = c
            .transact(&binding_request([1; 12]))
            .msg()
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .unwrap()
            .unwrap();
        // The test client's socket is bound to 127.0.0.1, so that is what
        // the server sees as its reflexive address.
        assert_eq!(mapped, c.sock.local_addr().unwrap());
        let mut lo = Client::new("127.0.0.1:3478".parse().unwrap());
        assert!(lo.transact(&binding_request([2; 12])).is_success());
        let r = c.allocate("alice", "pw");
        (mapped, r.relayed())
    });
    assert!(mapped.ip().is_loopback());
    assert_eq!(
        relayed.ip(),
        "198.51.100.1".parse::<std::net::IpAddr>().unwrap()
    );
    assert!((60000..=60100).contains(&relayed.port()));
}

#[test]
fn no_udp_and_no_tcp() {
    let s = Server::start(Options::new("no-udp\n"));
    let mut t = StreamClient::tcp(s.udp_addr());
    assert!(t.transact(&binding_request([1; 12])).is_success());
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    u.send_to(&binding_request([2; 12]), s.udp_addr()).unwrap();
    assert!(u.recv_from(&mut [0u8; 100]).is_err(), "no UDP listener");
    assert!(!s.log_text().contains("listening on udp"));

    let s = Server::start(Options::new("no-tcp\n"));
    assert!(TcpStream::connect(s.udp_addr()).is_err(), "no TCP listener");
    assert!(
        Client::new(s.udp_addr())
            .transact(&binding_request([3; 12]))
            .is_success()
    );
}

#[test]
fn listening_and_relay_devices() {
    let s = Server::start(Options::new(
        "lt-cred-mech\nrealm=r\nuser=alice:pw\nallow-loopback-peers\nlistening-device=lo\nrelay-device=lo\n",
    ));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut c = Client::new(s.udp_addr());
    let relayed = c.allocate("alice", "pw").relayed();
    let permit = [(
        attr::XOR_PEER_ADDRESS,
        xor_peer(peer.local_addr().unwrap(), &[0; 12]),
    )];
    assert!(
        c.signed(method::CREATE_PERMISSION, &permit, "alice", "pw")
            .is_success()
    );
    peer.send_to(b"hi", relayed).unwrap();
    let mut buf = [0u8; 100];
    assert!(c.sock.recv_from(&mut buf).is_ok());

    // A device that does not exist stops the server with a clear error.
    let port = free_ports(1);
    let (ok, out) = run_with_timeout(
        Command::new(BIN).args([
            "-n",
            "-L",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--no-tls",
            "--listening-device=nosuchdev0",
        ]),
        Duration::from_secs(10),
    );
    assert!(!ok);
    assert!(out.contains("cannot bind to device nosuchdev0"), "{out}");
}

#[test]
fn external_ip_is_what_clients_see() {
    let s = Server::start(Options::new(
        "lt-cred-mech\nrealm=r\nuser=alice:pw\nexternal-ip=203.0.113.7\n",
    ));
    let r = Client::new(s.udp_addr()).allocate("alice", "pw");
    let advertised = r.relayed();
    assert_eq!(
        advertised.ip(),
        "203.0.113.7".parse::<std::net::IpAddr>().unwrap()
    );
    let s = Server::start(Options::new(
        "lt-cred-mech\nrealm=r\nuser=alice:pw\nexternal-ip=203.0.113.8/127.0.0.1\n",
    ));
    let r = Client::new(s.udp_addr()).allocate("alice", "pw");
    let advertised = r.relayed();
    assert_eq!(
        advertised.ip(),
        "203.0.113.8".parse::<std::net::IpAddr>().unwrap()
    );
    assert!(s.log_text().contains("advertised=203.0.113.8:"));
}

#[test]
fn denied_and_allowed_peer_lists() {
    let s = Server::start(Options::new(
        "lt-cred-mech\nrealm=r\nuser=alice:pw\nallow-loopback-peers\ndenied-peer-ip=127.0.0.0/8\nallowed-peer-ip=127.0.0.5-127.0.0.6\nno-multicast-peers\n",
    ));
    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate("alice", "pw").is_success());
    let code = |c: &mut Client, peer: &str| {
        let p: SocketAddr = peer.parse().unwrap();
        c.signed(
            method::CREATE_PERMISSION,
            &[(attr::XOR_PEER_ADDRESS, xor_peer(p, &[0; 12]))],
            "alice",
            "pw",
        )
        .code()
    };
    assert_eq!(code(&mut c, "127.0.0.1:9"), Some(403), "denied range");
    assert_eq!(
        code(&mut c, "127.0.0.5:9"),
        None,
        "allowed wins over denied"
    );
    assert_eq!(code(&mut c, "127.0.0.6:9"), None);
    assert_eq!(code(&mut c, "224.0.0.1:9"), Some(403), "multicast");
    assert_eq!(
        code(&mut c, "93.184.216.34:9"),
        None,
        "global and not listed"
    );
    assert_eq!(
        code(&mut c, "198.51.100.1:9"),
        Some(403),
        "documentation range"
    );
}

#[test]
fn daemon_mode_detaches_and_keeps_serving() {
    let dir = TempDir::new("daemon");
    let port = free_ports(1);
    let (min, max) = relay_range(50);
    let log = dir.path("daemon.log");
    let (ok, out) = run_with_timeout(
        Command::new(BIN).args([
            "-n",
            "-o",
            "-L",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--no-tls",
            &format!("--min-port={min}"),
            &format!("--max-port={max}"),
            &format!("--log-file={}", log.display()),
        ]),
        Duration::from_secs(10),
    );
    assert!(ok, "the foreground process exits 0 once detached:\n{out}");
    let pid = find_pid(&log.display().to_string()).expect("daemon is running");
    let _kill = KillOnDrop(pid);
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        Client::new(server)
            .transact(&binding_request([1; 12]))
            .is_success()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("worker threads running")
    );
}

fn find_pid(arg: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline"))
                && String::from_utf8_lossy(&cmd).contains(arg)
            {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn alt_listening_port_and_verbose_request_lines() {
    let alt = free_ports(1);
    let s = Server::start(Options::new(&format!(
        "lt-cred-mech\nrealm=r\nuser=alice:pw\nalt-listening-port={alt}\nverbose\n"
    )));
    let alt_addr: SocketAddr = format!("127.0.0.1:{alt}").parse().unwrap();
    assert!(
        Client::new(alt_addr)
            .transact(&binding_request([1; 12]))
            .is_success()
    );
    assert!(
        StreamClient::tcp(alt_addr)
            .transact(&binding_request([2; 12]))
            .is_success()
    );
    assert!(Client::new(alt_addr).allocate("alice", "pw").is_success());
    let log = s.log_text();
    assert!(
        log.contains(&format!("listening on udp 127.0.0.1:{alt}")),
        "{log}"
    );
    assert!(
        log.contains("Allocate request: success"),
        "-v logs each request:\n{log}"
    );
    assert!(
        !log.contains("Binding"),
        "Binding requests are never logged:\n{log}"
    );
}
