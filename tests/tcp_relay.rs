//! RFC 6062 TCP relaying against the real binary on loopback: coturn's
//! `turnutils_uclient -T` (client to client over TCP relays, control and
//! data connections over TCP, then TLS) without loss; and our own client
//! through every step: a TCP allocation, Connect (success with CONNECTION-ID,
//! 446 for a second one to the same peer, 447 for a closed port),
//! ConnectionBind on a new connection and bytes both ways, a peer
//! connecting in (refused without a permission, ConnectionAttempt with
//! one), and the refusals (TCP over UDP, `no-tcp-relay`, an unknown
//! CONNECTION-ID).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::client::{Client, Frame, Response, StreamClient, xor_peer};
use common::uclient::run_uclient;
use common::{Options, Server};
use turnserver::stun::{Message, attr, method};

const USERS: &str = "lt-cred-mech\nrealm=example.org\nuser=alice:pw\nallow-loopback-peers\n";

/// A TCP allocation on a new control connection (the 401 round trip
/// first).
fn tcp_allocation(s: &Server) -> (StreamClient<TcpStream>, Response) {
    let mut c = StreamClient::tcp(([127, 0, 0, 1], s.port).into());
    let r = signed_request(
        &mut c,
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])],
    );
    (c, r)
}

/// A request with credentials, learning realm and nonce from a 401 first
/// when the client has none.
fn signed_request(c: &mut StreamClient<TcpStream>, m: u16, attrs: &[(u16, Vec<u8>)]) -> Response {
    if c.nonce.is_empty() {
        let req = c.request(m, attrs, None);
        let challenge = c.transact(&req);
        assert_eq!(challenge.code(), Some(401));
        (c.realm, c.nonce) = challenge.realm_and_nonce();
    }
    c.signed(m, attrs, "alice", "pw")
}

fn peer_attr(peer: SocketAddr) -> (u16, Vec<u8>) {
    (attr::XOR_PEER_ADDRESS, xor_peer(peer, &[0; 12]))
}

fn connection_id(r: &Response) -> u32 {
    u32::from_be_bytes(
        r.msg()
            .get(attr::CONNECTION_ID)
            .unwrap()
            .try_into()
            .unwrap(),
    )
}

/// ConnectionBind for `id` on a new connection, which then carries the
/// peer's bytes.
fn bind(s: &Server, id: u32) -> TcpStream {
    let mut data = StreamClient::tcp(([127, 0, 0, 1], s.port).into());
    let r = signed_request(
        &mut data,
        method::CONNECTION_BIND,
        &[(attr::CONNECTION_ID, id.to_be_bytes().to_vec())],
    );
    assert!(r.is_success(), "ConnectionBind: {:?}", r.code());
    data.stream
}

fn exchange(client: &mut TcpStream, peer: &mut TcpStream) {
    client.write_all(b"from the client").unwrap();
    let mut buf = [0u8; 15];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the client");
    peer.write_all(b"from the peer").unwrap();
    let mut buf = [0u8; 13];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the peer");
}

#[test]
fn coturn_uclient_relays_over_tcp_relays() {
    let s = Server::start(Options::new(USERS).tls());
    let p = s.port.to_string();
    run_uclient(
        &[
            "-T", "-n", "30", "-m", "4", "-l", "120", "-u", "alice", "-w", "pw", "-p", &p,
        ],
        "127.0.0.1",
        100,
        &|| s.log_text(),
    );
    let tls = s.tls_port.to_string();
    run_uclient(
        &[
            "-T", "-S", "-n", "30", "-m", "4", "-l", "120", "-u", "alice", "-w", "pw", "-p", &tls,
        ],
        "127.0.0.1",
        100,
        &|| s.log_text(),
    );
}

#[test]
fn connect_bind_and_relay_both_ways() {
    let s = Server::start(Options::new(USERS));
    let (mut c, r) = tcp_allocation(&s);
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer_addr = listener.local_addr().unwrap();
    let r = signed_request(&mut c, method::CONNECT, &[peer_attr(peer_addr)]);
    assert!(r.is_success(), "Connect: {:?}", r.code());
    let id = connection_id(&r);
    let (mut peer, from) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        from, relayed,
        "the connection comes from the relayed address"
    );
    // A second Connect to the same peer: 446.
    let again = signed_request(&mut c, method::CONNECT, &[peer_attr(peer_addr)]);
    assert_eq!(again.code(), Some(446));
    // A closed port: 447.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let refused = signed_request(&mut c, method::CONNECT, &[peer_attr(closed)]);
    assert_eq!(refused.code(), Some(447));
    let mut data = bind(&s, id);
    exchange(&mut data, &mut peer);
    // An unknown CONNECTION-ID: 400.
    let mut other = StreamClient::tcp(([127, 0, 0, 1], s.port).into());
    let r = signed_request(
        &mut other,
        method::CONNECTION_BIND,
        &[(attr::CONNECTION_ID, 12345u32.to_be_bytes().to_vec())],
    );
    assert_eq!(r.code(), Some(400));
    // The allocation ends with its control connection, and its
    // connections with it.
    let second = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = signed_request(
        &mut c,
        method::CONNECT,
        &[peer_attr(second.local_addr().unwrap())],
    );
    assert!(r.is_success(), "Connect: {:?}", r.code());
    let (mut second_peer, _) = second.accept().unwrap();
    second_peer
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _second_data = bind(&s, connection_id(&r));
    // The first connection closes from the client's side: its bytes count
    // in the allocation's traffic.
    drop(data);
    let mut buf = [0u8; 8];
    assert!(matches!(peer.read(&mut buf), Ok(0) | Err(_)));
    drop(peer);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !s.log_text().contains("TCP relay: connection closed") {
        assert!(std::time::Instant::now() < deadline, "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    assert!(matches!(second_peer.read(&mut buf), Ok(0) | Err(_)));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !s.log_text().contains("allocation deleted") {
        assert!(std::time::Instant::now() < deadline, "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.log_text();
    assert!(
        log.lines().any(|l| l.contains("allocation deleted")
            && l.contains("to_peer_bytes=15")
            && l.contains("to_client_bytes=13")),
        "{log}"
    );
}

#[test]
fn peers_connect_in_with_a_permission_only() {
    let s = Server::start(Options::new(USERS));
    let (mut c, r) = tcp_allocation(&s);
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    // Without a permission the connection is closed at once.
    let mut stranger = TcpStream::connect(relayed).unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(stranger.read(&mut buf), Ok(0) | Err(_)));
    // With one, the client hears of it and binds a data connection.
    let perm = signed_request(
        &mut c,
        method::CREATE_PERMISSION,
        &[peer_attr("127.0.0.1:1".parse().unwrap())],
    );
    assert!(perm.is_success(), "{:?}", perm.code());
    let mut peer = TcpStream::connect(relayed).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let indication = loop {
        if let Frame::Stun(raw) = c.read_frame().unwrap() {
            break raw;
        }
    };
    let m = Message::parse(&indication).unwrap();
    assert_eq!(m.method(), method::CONNECTION_ATTEMPT);
    assert_eq!(
        m.xor_address(attr::XOR_PEER_ADDRESS),
        Some(Ok(peer.local_addr().unwrap()))
    );
    let id = u32::from_be_bytes(m.get(attr::CONNECTION_ID).unwrap().try_into().unwrap());
    let mut data = bind(&s, id);
    exchange(&mut data, &mut peer);
}

#[test]
fn tcp_allocations_are_refused_where_they_cannot_be() {
    // Over UDP: 400.
    let s = Server::start(Options::new(USERS));
    let mut u = Client::new(s.udp_addr());
    let r = u.allocate_with(&[], "alice", "pw");
    assert!(r.is_success());
    let mut u = Client::new(s.udp_addr());
    let attrs = [(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])];
    let req = u.request(method::ALLOCATE, &attrs, None);
    let challenge = u.transact(&req);
    u.realm = "example.org".into();
    u.nonce = challenge.msg().get(attr::NONCE).unwrap().to_vec();
    let r = u.signed(method::ALLOCATE, &attrs, "alice", "pw");
    assert_eq!(r.code(), Some(400));
    // no-tcp-relay: 442.
    let s = Server::start(Options::new(&format!("{USERS}no-tcp-relay\n")));
    let (_c, r) = tcp_allocation(&s);
    assert_eq!(r.code(), Some(442));
}

#[test]
fn max_bps_shapes_tcp_relay_connections() {
    // 60,000 bytes at 20,000 bytes/s, a first second's worth at once: the
    // peer cannot have them all before 2 s (a lower bound only, so a slow
    // machine cannot fail it).
    let s = Server::start(Options::new(&format!("{USERS}max-bps=20000\n")));
    let (mut c, r) = tcp_allocation(&s);
    assert!(r.is_success(), "{:?}", r.code());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let r = signed_request(
        &mut c,
        method::CONNECT,
        &[peer_attr(listener.local_addr().unwrap())],
    );
    assert!(r.is_success(), "Connect: {:?}", r.code());
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut data = bind(&s, connection_id(&r));
    let start = std::time::Instant::now();
    let writer = std::thread::spawn(move || {
        data.write_all(&vec![0x5A; 60_000]).unwrap();
        data
    });
    let mut got = vec![0u8; 60_000];
    peer.read_exact(&mut got).unwrap();
    let elapsed = start.elapsed();
    assert!(got.iter().all(|b| *b == 0x5A));
    assert!(
        elapsed >= Duration::from_millis(1900),
        "60 kB at max-bps=20000 arrived in {elapsed:?}"
    );
    drop(writer.join().unwrap());
}
