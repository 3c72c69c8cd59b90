//! Credential failures against the real binary: wrong password, unknown
//! user and expired REST credentials get 401, and the server keeps serving
//! everyone else.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Client, Options, Server, xor_peer};
use turnserver::auth::rest_password;
use turnserver::stun::{Class, Message, MessageWriter, attr, method};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Allocates, permits a local UDP peer, relays one datagram each way.
fn relays_end_to_end(server: &Server, user: &str, pw: &str) {
    let mut c = Client::new(server.udp_addr());
    let r = c.allocate(user, pw);
    assert!(
        r.is_success(),
        "allocate failed: {:?}\n{}",
        r.code(),
        server.log_text()
    );
    let relayed = r.relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    // An IPv4 XOR-PEER-ADDRESS depends only on the magic cookie, not on the
    // transaction ID.
    let perm = c.signed(
        method::CREATE_PERMISSION,
        &[(attr::XOR_PEER_ADDRESS, xor_peer(peer_addr, &[0; 12]))],
        user,
        pw,
    );
    assert!(perm.is_success(), "CreatePermission: {:?}", perm.code());
    // Client -> peer with a Send indication.
    let mut send = Vec::new();
    MessageWriter::new(&mut send, method::SEND, Class::Indication, &[9; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, peer_addr)
        .attr(attr::DATA, b"ping");
    c.sock.send_to(&send, server.udp_addr()).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = peer
        .recv_from(&mut buf)
        .expect("peer receives the relayed datagram");
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(from, relayed);
    // Peer -> client as a Data indication.
    peer.send_to(b"pong", relayed).unwrap();
    let (n, _) = c
        .sock
        .recv_from(&mut buf)
        .expect("client receives a Data indication");
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.method(), method::DATA);
    assert_eq!(m.get(attr::DATA), Some(&b"pong"[..]));
}

#[test]
fn wrong_password_and_unknown_user_get_401_and_others_keep_working() {
    let s = Server::start(Options::new("lt-cred-mech\nrealm=example.org\nuser=alice:right\nuser=bob:0x{key}\nallow-loopback-peers\n".replace("{key}", &hex(&turnserver::auth::long_term_key("bob", "example.org", "bobpw"))).as_str()));
    relays_end_to_end(&s, "alice", "right");
    for (user, pw) in [("alice", "wrong"), ("mallory", "right"), ("alice", "")] {
        let mut c = Client::new(s.udp_addr());
        let r = c.allocate(user, pw);
        assert_eq!(r.code(), Some(401), "{user}/{pw}");
        assert!(r.msg().has(attr::NONCE) && r.msg().has(attr::REALM));
        assert!(!r.msg().has_integrity());
    }
    // A precomputed 0x key works like a password.
    relays_end_to_end(&s, "bob", "bobpw");
    relays_end_to_end(&s, "alice", "right");
    let log = s.log_text();
    assert!(log.contains("401: wrong password"), "{log}");
    assert!(log.contains("401: unknown user"), "{log}");
    assert!(
        !log.contains("right"),
        "passwords must not be logged:\n{log}"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn expired_rest_credential_gets_401_and_valid_ones_work() {
    let s = Server::start(Options::new(
        "use-auth-secret\nstatic-auth-secret=topsecret\nrealm=example.org\nallow-loopback-peers\n",
    ));
    let expired = format!("{}:alice", now() - 10);
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate(&expired, &rest_password(b"topsecret", &expired));
    assert_eq!(r.code(), Some(401));
    let wrong_secret = format!("{}:alice", now() + 600);
    let r =
        Client::new(s.udp_addr()).allocate(&wrong_secret, &rest_password(b"other", &wrong_secret));
    assert_eq!(r.code(), Some(401));
    for user in [
        format!("{}:alice", now() + 600),
        format!("{}", now() + 600),
        format!("alice:{}", now() + 600),
    ] {
        relays_end_to_end(&s, &user, &rest_password(b"topsecret", &user));
    }
    let log = s.log_text();
    assert!(log.contains("401: REST credential expired"), "{log}");
    assert!(
        !log.contains("topsecret"),
        "secrets must not be logged:\n{log}"
    );
}

#[test]
fn stale_nonce_gets_438_then_succeeds() {
    let s = Server::start(Options::new(
        "lt-cred-mech\nrealm=example.org\nuser=alice:pw\nstale-nonce=1\n",
    ));
    let mut c = Client::new(s.udp_addr());
    let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
    let req = c.request(method::ALLOCATE, &attrs, None);
    let ch = c.transact(&req);
    c.realm = "example.org".into();
    c.nonce = ch.msg().get(attr::NONCE).unwrap().to_vec();
    std::thread::sleep(Duration::from_millis(2100));
    let req = c.request(method::ALLOCATE, &attrs, Some(("alice", "pw")));
    let r = c.transact(&req);
    assert_eq!(r.code(), Some(438));
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    let req = c.request(method::ALLOCATE, &attrs, Some(("alice", "pw")));
    assert!(c.transact(&req).is_success());
}

/// A client retransmitting a request with a wrong password (31 times, as
/// seen from one misconfigured client) is logged once, naming user, realm
/// and reason; every refusal is still counted in the metrics. Another user
/// or reason from the same client gets its own line.
#[test]
fn repeated_refusals_are_logged_once_and_counted_every_time() {
    let metrics = common::free_ports(1);
    let s = Server::start(Options::new(&format!(
        "lt-cred-mech\nrealm=example.org\nuser=alice:right\nunauthorized-ratelimit-rps=0\nprometheus\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\n"
    )));
    let mut c = Client::new(s.udp_addr());
    assert_eq!(c.allocate("alice", "wrong").code(), Some(401));
    let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
    let retransmitted = c.request(method::ALLOCATE, &attrs, Some(("alice", "wrong")));
    for _ in 0..30 {
        assert_eq!(c.transact(&retransmitted).code(), Some(401));
    }
    assert_eq!(c.allocate("mallory", "x").code(), Some(401));
    assert_eq!(c.allocate("mallory", "x").code(), Some(401));
    // Metrics are gathered from the workers about once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let log = s.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("401: wrong password"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains("user=\"alice\"") && lines[0].contains("realm=example.org"),
        "{}",
        lines[0]
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("401: unknown user") && l.contains("user=\"mallory\""))
            .count(),
        1,
        "{log}"
    );
    let (status, body) =
        common::http_get(format!("127.0.0.1:{metrics}").parse().unwrap(), "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        common::metric(&body, "turn_auth_failures_total{reason=\"bad_integrity\"}"),
        Some(31.0),
        "{body}"
    );
    assert_eq!(
        common::metric(&body, "turn_auth_failures_total{reason=\"unknown_user\"}"),
        Some(2.0),
        "{body}"
    );
}
