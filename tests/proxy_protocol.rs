//! The PROXY protocol behind a real load balancer: Debian's `haproxy` in TCP
//! mode (`send-proxy` and `send-proxy-v2`) in front of the real binary with
//! `proxy-protocol-allow` naming it. Clients connect from 127.0.0.2 and the
//! balancer from 127.0.0.1, so the server can tell them apart: the client's
//! own address must come back in XOR-MAPPED-ADDRESS, over TCP and TLS, and
//! an allocation made through the balancer relays, and Chromium relays
//! through `turns:` via haproxy. Without the balancer: a
//! listed address that sends no header, and an unlisted one that sends one,
//! are both refused, while an unlisted client without a header is served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::{StreamClient, binding_request, tls_over, xor_peer};
use common::{Background, Options, Server, TempDir, free_ports, require_tool};
use turnserver::stun::{Message, attr, method};

const CONFIG: &str = "lt-cred-mech\nrealm=example.org\nuser=demo:secret\nallow-loopback-peers\nproxy-protocol-allow=127.0.0.1\n";

/// The address clients connect from (the balancer connects from 127.0.0.1).
const CLIENT_IP: &str = "127.0.0.2";

/// A TCP connection from `CLIENT_IP` to `to`.
fn connect_from_client(to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{CLIENT_IP}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// haproxy in TCP mode: frontends on the returned ports forward to the
/// server's TCP port with a v1 header, to its TCP port with a v2 header and
/// to its TLS port with a v2 header, connecting from 127.0.0.1.
struct Balancer {
    _process: Background,
    _dir: TempDir,
    v1: SocketAddr,
    v2: SocketAddr,
    tls_v2: SocketAddr,
}

impl Balancer {
    fn start(server: &Server) -> Balancer {
        let haproxy = require_tool("haproxy", "apt-get install haproxy");
        let dir = TempDir::new("haproxy");
        let base = free_ports(3);
        let (v1, v2, tls_v2) = (base, base + 1, base + 2);
        let cfg = format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             listen v1\n  bind 127.0.0.1:{v1}\n  server turn 127.0.0.1:{tcp} send-proxy source 127.0.0.1\n\
             listen v2\n  bind 127.0.0.1:{v2}\n  server turn 127.0.0.1:{tcp} send-proxy-v2 source 127.0.0.1\n\
             listen tls_v2\n  bind 127.0.0.1:{tls_v2}\n  server turn 127.0.0.1:{tls} send-proxy-v2 source 127.0.0.1\n",
            tcp = server.port,
            tls = server.tls_port,
        );
        let path = dir.path("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let check = Command::new(&haproxy)
            .args(["-c", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(&haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path("haproxy.log")).unwrap(),
            ))
            .spawn()
            .expect("start haproxy");
        let b = Balancer {
            _process: Background(child),
            _dir: dir,
            v1: ([127, 0, 0, 1], v1).into(),
            v2: ([127, 0, 0, 1], v2).into(),
            tls_v2: ([127, 0, 0, 1], tls_v2).into(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for a in [b.v1, b.v2, b.tls_v2] {
            while TcpStream::connect(a).is_err() {
                assert!(Instant::now() < deadline, "haproxy is not listening on {a}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        b
    }
}

/// XOR-MAPPED-ADDRESS of a Binding over `client`.
fn mapped<S: Read + Write>(client: &mut StreamClient<S>) -> SocketAddr {
    let r = client.transact(&binding_request([9; 12]));
    assert!(r.is_success(), "{:?}", r.code());
    r.msg()
        .xor_address(attr::XOR_MAPPED_ADDRESS)
        .unwrap()
        .unwrap()
}

#[test]
fn clients_behind_haproxy_are_seen_with_their_own_address() {
    let s = Server::start(Options::new(CONFIG).tls());
    let lb = Balancer::start(&s);
    for front in [lb.v1, lb.v2] {
        let tcp = connect_from_client(front);
        let me = tcp.local_addr().unwrap();
        let mut c = StreamClient::new(tcp);
        assert_eq!(mapped(&mut c), me, "through {front}");
    }
    let tcp = connect_from_client(lb.tls_v2);
    let me = tcp.local_addr().unwrap();
    let mut c = StreamClient::new(tls_over(tcp, &s.dir.path("cert.pem")));
    assert_eq!(mapped(&mut c), me, "TLS through {}", lb.tls_v2);
}

#[test]
fn an_allocation_through_haproxy_relays_and_is_logged_with_the_client() {
    let s = Server::start(Options::new(CONFIG).tls());
    let lb = Balancer::start(&s);
    let tcp = connect_from_client(lb.v2);
    let me = tcp.local_addr().unwrap();
    let mut c = StreamClient::new(tcp);
    let r = c.allocate("demo", "secret");
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let tid = [7u8; 12];
    let perm = c.signed(
        method::CREATE_PERMISSION,
        &[(attr::XOR_PEER_ADDRESS, xor_peer(peer_addr, &tid))],
        "demo",
        "secret",
    );
    assert!(perm.is_success(), "{:?}", perm.code());
    // The peer sends first; the client gets it as a Data indication.
    peer.send_to(b"from the peer", relayed).unwrap();
    let frame = loop {
        if let common::client::Frame::Stun(raw) = c.read_frame().unwrap() {
            break raw;
        }
    };
    let m = Message::parse(&frame).unwrap();
    assert_eq!(m.get(attr::DATA), Some(&b"from the peer"[..]));
    let log = s.log_text();
    assert!(
        log.contains(&format!("allocation created five_tuple=tcp {me}->")),
        "the log names the client behind the balancer:\n{log}"
    );
}

#[test]
fn only_listed_balancers_may_send_a_header_and_they_must() {
    let s = Server::start(Options::new(CONFIG).tls());
    let server: SocketAddr = ([127, 0, 0, 1], s.port).into();
    // An unlisted client sending a header is refused...
    let mut forged = connect_from_client(server);
    forged
        .write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 3478\r\n")
        .unwrap();
    // The server may already have closed the connection.
    let _ = forged.write_all(&binding_request([1; 12]));
    let mut buf = [0u8; 64];
    assert!(
        matches!(forged.read(&mut buf), Ok(0) | Err(_)),
        "a forged header is answered"
    );
    // ...and without one it is served as itself.
    let tcp = connect_from_client(server);
    let me = tcp.local_addr().unwrap();
    assert_eq!(mapped(&mut StreamClient::new(tcp)), me);
    // A listed balancer that sends no header is refused.
    let mut bare = TcpStream::connect(server).unwrap();
    bare.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bare.write_all(&binding_request([2; 12])).unwrap();
    assert!(
        matches!(bare.read(&mut buf), Ok(0) | Err(_)),
        "a listed balancer's connection without a header is answered"
    );
    let log = s.log_text();
    assert!(
        log.contains("a PROXY header from an address proxy-protocol-allow does not list"),
        "{log}"
    );
    assert!(log.contains("does not start with a PROXY header"), "{log}");
}

#[test]
fn tcp_proxy_port_requires_a_header_from_anyone() {
    let port = common::free_ports(1);
    let s = Server::start(Options::new(&format!(
        "lt-cred-mech\nrealm=example.org\nuser=demo:secret\ntcp-proxy-port={port}\n"
    )));
    let proxy_port: SocketAddr = ([127, 0, 0, 1], port).into();
    // coturn's semantics: whoever connects there speaks for the client.
    let mut tcp = connect_from_client(proxy_port);
    tcp.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 1234 3478\r\n")
        .unwrap();
    let claimed: SocketAddr = "203.0.113.9:1234".parse().unwrap();
    assert_eq!(mapped(&mut StreamClient::new(tcp)), claimed);
    // Without a header the connection is closed.
    let mut bare = connect_from_client(proxy_port);
    bare.write_all(&binding_request([2; 12])).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(bare.read(&mut buf), Ok(0) | Err(_)));
    // The plain port is unchanged.
    let plain = connect_from_client(([127, 0, 0, 1], s.port).into());
    let me = plain.local_addr().unwrap();
    assert_eq!(mapped(&mut StreamClient::new(plain)), me);
    assert!(s.log_text().contains("tcp-proxy-port"), "{}", s.log_text());
}

/// Chromium relays a data channel through `turns:` via haproxy (TLS passed
/// through, a PROXY v2 header in front).
#[test]
fn chromium_relays_through_turns_behind_haproxy() {
    let s = Server::start(Options::new(CONFIG).tls());
    let lb = Balancer::start(&s);
    let mut cmd = common::webrtc_relay();
    cmd.args([
        "--turn",
        &format!("turns:localhost:{}?transport=tcp", lb.tls_v2.port()),
        "--username",
        "demo",
        "--credential",
        "secret",
        "--timeout-ms",
        "60000",
    ]);
    let (ok, out) = common::run_with_timeout(&mut cmd, Duration::from_secs(90));
    assert!(
        ok,
        "browser check failed:\n{out}\n---- server log ----\n{}",
        s.log_text()
    );
    assert!(out.contains("\"relayProtocol\":\"tls\""), "{out}");
    // Every connection from 127.0.0.1 must start with a PROXY header
    // (proxy-protocol-allow), so these TLS allocations came through it.
    let log = s.log_text();
    assert!(log.contains("allocation created five_tuple=tls"), "{log}");
    assert!(!log.contains("does not start with a PROXY header"), "{log}");
}
