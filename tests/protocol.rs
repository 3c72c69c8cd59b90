//! STUN and TURN behaviour of the real binary over real sockets: Binding on
//! every transport, channels, port exhaustion, stream close, peer policy and
//! hostile bytes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::{
    Client, Frame, Options, Server, StreamClient, binding_request, channel_bind_attrs,
    channel_data, expect_relayed, frame_burst, relay_range, send_each, send_gso, tls_connect,
    tls_over, xor_peer,
};
use turnserver::stun::{Class, Message, MessageWriter, attr, method};

const ALICE: &str = "lt-cred-mech\nrealm=example.org\nuser=alice:pw\n";

fn peer_socket() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

#[test]
fn binding_over_udp_tcp_and_tls() {
    let s = Server::start(Options::new(ALICE).tls());
    // UDP, with FINGERPRINT because the request has one.
    let mut c = Client::new(s.udp_addr());
    let r = c.transact(&binding_request([1; 12]));
    assert!(r.is_success());
    let mapped = r
        .msg()
        .xor_address(attr::XOR_MAPPED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(mapped, c.sock.local_addr().unwrap());
    assert!(r.msg().has_fingerprint() && r.msg().fingerprint_ok());
    assert!(!r.msg().has(attr::SOFTWARE));
    // Without FINGERPRINT in the request (and no `fingerprint` option): none.
    let mut plain = Vec::new();
    MessageWriter::new(&mut plain, method::BINDING, Class::Request, &[2; 12]);
    assert!(!c.transact(&plain).msg().has_fingerprint());
    // TCP.
    let mut t = StreamClient::tcp(s.udp_addr());
    let r = t.transact(&binding_request([3; 12]));
    assert_eq!(
        r.msg()
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .unwrap()
            .unwrap(),
        t.stream.local_addr().unwrap()
    );
    // TLS on the TLS port, verifying the certificate.
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], s.tls_port));
    let mut tls = StreamClient::new(tls_connect(tls_addr, &s.dir.path("cert.pem")));
    let r = tls.transact(&binding_request([4; 12]));
    assert!(r.is_success());
    // TLS is also recognised on the plain port, as coturn does.
    let mut tls_plain_port = StreamClient::new(tls_connect(s.udp_addr(), &s.dir.path("cert.pem")));
    assert!(
        tls_plain_port
            .transact(&binding_request([5; 12]))
            .is_success()
    );
    // And plain TCP on the TLS port.
    let mut tcp_tls_port = StreamClient::tcp(tls_addr);
    assert!(
        tcp_tls_port
            .transact(&binding_request([6; 12]))
            .is_success()
    );
}

#[test]
fn fingerprint_option_adds_it_to_every_response() {
    let s = Server::start(Options::new("fingerprint\n"));
    let mut c = Client::new(s.udp_addr());
    let mut plain = Vec::new();
    MessageWriter::new(&mut plain, method::BINDING, Class::Request, &[2; 12]);
    assert!(c.transact(&plain).msg().has_fingerprint());
}

#[test]
fn channels_relay_both_ways_over_udp() {
    let s = Server::start(Options::new(&format!("{ALICE}allow-loopback-peers\n")));
    let (peer, peer_addr) = peer_socket();
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate("alice", "pw");
    let relayed = r.relayed();
    assert!(
        c.signed(
            method::CHANNEL_BIND,
            &channel_bind_attrs(0x4001, peer_addr),
            "alice",
            "pw"
        )
        .is_success()
    );
    // Client -> peer.
    c.sock
        .send_to(
            &[0x40, 0x01, 0, 5, b'h', b'e', b'l', b'l', b'o'],
            s.udp_addr(),
        )
        .unwrap();
    let mut buf = [0u8; 2000];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"hello"[..], relayed));
    // Peer -> client, 1200 bytes.
    let big = vec![0x5A; 1200];
    peer.send_to(&big, relayed).unwrap();
    let (n, _) = c.sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..4], &[0x40, 0x01, 0x04, 0xB0]);
    assert_eq!(&buf[4..n], &big[..]);
    // After the allocation is deleted, nothing more is relayed.
    let r = c.delete("alice", "pw");
    assert!(r.is_success());
    peer.send_to(b"late", relayed).unwrap();
    c.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        c.sock.recv_from(&mut buf).is_err(),
        "nothing relayed after the allocation is deleted"
    );
}

#[test]
fn channels_relay_both_ways_over_tcp_with_padding() {
    let s = Server::start(Options::new(&format!("{ALICE}allow-loopback-peers\n")));
    let (peer, peer_addr) = peer_socket();
    let mut t = StreamClient::tcp(s.udp_addr());
    let r = t.allocate("alice", "pw");
    assert!(r.is_success());
    let relayed = r.relayed();
    assert!(
        t.signed(
            method::CHANNEL_BIND,
            &channel_bind_attrs(0x4ABC, peer_addr),
            "alice",
            "pw"
        )
        .is_success()
    );
    // Two padded ChannelData frames back to back in one write.
    t.stream
        .write_all(&[
            0x4A, 0xBC, 0, 3, b'o', b'n', b'e', 0, 0x4A, 0xBC, 0, 2, b'h', b'i', 0, 0,
        ])
        .unwrap();
    let mut buf = [0u8; 100];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"one");
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hi");
    peer.send_to(b"xyz", relayed).unwrap();
    match t.read_frame().unwrap() {
        Frame::ChannelData(ch, data) => assert_eq!((ch, data.as_slice()), (0x4ABC, &b"xyz"[..])),
        Frame::Stun(_) => panic!("expected ChannelData"),
    }
    // Closing the connection ends the allocation.
    drop(t);
    std::thread::sleep(Duration::from_millis(300));
    let log = s.log_text();
    assert!(log.contains("reason=client connection closed"), "{log}");
    assert!(
        log.contains("to_peer_packets=2 to_peer_bytes=5 to_client_packets=1 to_client_bytes=3"),
        "{log}"
    );
}

/// A TCP stream whose every read stays within one TLS record, so that the
/// TLS client on top of it returns one record's plaintext per read, as
/// OpenSSL's `SSL_read` does for coturn's `turnutils_uclient`.
struct OneRecordPerRead {
    tcp: TcpStream,
    record: Vec<u8>,
    at: usize,
}

impl Read for OneRecordPerRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.record.len() {
            let mut hdr = [0u8; 5];
            self.tcp.read_exact(&mut hdr)?;
            let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
            self.record = hdr.to_vec();
            self.record.resize(5 + len, 0);
            self.tcp.read_exact(&mut self.record[5..])?;
            self.at = 0;
        }
        let n = buf.len().min(self.record.len() - self.at);
        buf[..n].copy_from_slice(&self.record[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for OneRecordPerRead {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

#[test]
fn tls_puts_each_frame_in_a_record_of_its_own() {
    let s = Server::start(Options::new(&format!("{ALICE}allow-loopback-peers\n")).tls());
    let (peer, peer_addr) = peer_socket();
    let tcp = TcpStream::connect(("127.0.0.1", s.tls_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let sock = OneRecordPerRead {
        tcp,
        record: Vec::new(),
        at: 0,
    };
    let mut t = StreamClient::new(tls_over(sock, &s.dir.path("cert.pem")));
    let r = t.allocate("alice", "pw");
    assert!(r.is_success());
    let relayed = r.relayed();
    assert!(
        t.signed(
            method::CHANNEL_BIND,
            &channel_bind_attrs(0x4001, peer_addr),
            "alice",
            "pw"
        )
        .is_success()
    );
    // A burst from the peer: the server reads it in batches and queues many
    // frames for the connection at once. Sizes vary so padding is covered.
    const BURST: usize = 64;
    for i in 0..BURST {
        let mut payload = vec![(i % 251) as u8; 97 + i % 4];
        payload[0] = i as u8;
        peer.send_to(&payload, relayed).unwrap();
    }
    // Every read returns one record's plaintext: it must be one whole
    // ChannelData frame, padding included, and the frames must come in order.
    let mut buf = vec![0u8; 70000];
    for i in 0..BURST {
        let n = t.stream.read(&mut buf).unwrap();
        assert!(n >= 4, "record {i}: {n} bytes");
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        assert_eq!(&buf[..2], &[0x40, 0x01], "record {i}");
        assert_eq!(len, 97 + i % 4, "record {i}");
        assert_eq!(
            n,
            4 + ((len + 3) & !3),
            "record {i} holds {n} bytes, not one frame of {len}"
        );
        assert_eq!(buf[4], i as u8, "record {i} is out of order");
    }
}

/// A burst from a peer (as a video frame is) reaches a UDP client as
/// separate datagrams, whole and in order, over a channel and as Data
/// indications: the server sends such runs with UDP GSO.
#[test]
fn peer_bursts_reach_a_udp_client_datagram_by_datagram() {
    let s = Server::start(Options::new(&format!("{ALICE}allow-loopback-peers\n")));
    let (peer, peer_addr) = peer_socket();
    let (plain, plain_addr) = peer_socket();
    let mut c = Client::new(s.udp_addr());
    let relayed = c.allocate("alice", "pw").relayed();
    let bind = channel_bind_attrs(0x4002, peer_addr);
    assert!(
        c.signed(method::CHANNEL_BIND, &bind, "alice", "pw")
            .is_success()
    );
    let perm = vec![(attr::XOR_PEER_ADDRESS, xor_peer(plain_addr, &[0; 12]))];
    assert!(
        c.signed(method::CREATE_PERMISSION, &perm, "alice", "pw")
            .is_success()
    );
    // Sent one by one, then as one GSO send, which reaches the relay
    // socket (UDP_GRO on) as one receive the server splits.
    let datagrams = frame_burst();
    for (from, channel, gso) in [
        (&peer, Some(0x4002), false),
        (&plain, None, false),
        (&peer, Some(0x4002), true),
        (&plain, None, true),
    ] {
        if gso {
            send_gso(from, relayed, &datagrams);
        } else {
            send_each(from, relayed, &datagrams);
        }
        expect_relayed(&c.sock, &datagrams, channel);
    }
}

/// A burst of ChannelData from a UDP client reaches the peer datagram by
/// datagram, in order (the server sends such runs with UDP GSO), and a
/// request in the middle of the burst takes effect between the datagrams
/// before it and those after it: a Refresh deleting the allocation lets
/// everything before it through and nothing after it.
#[test]
fn client_bursts_reach_the_peer_datagram_by_datagram() {
    let s = Server::start(Options::new(&format!("{ALICE}allow-loopback-peers\n")));
    let (peer, peer_addr) = peer_socket();
    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate("alice", "pw").is_success());
    let bind = channel_bind_attrs(0x4003, peer_addr);
    assert!(
        c.signed(method::CHANNEL_BIND, &bind, "alice", "pw")
            .is_success()
    );
    let frame = |i: usize, n: usize| channel_data(0x4003, &vec![i as u8; n]);
    let sizes: Vec<usize> = (0..24).map(|i| if i == 23 { 51 } else { 1000 }).collect();
    let delete = c.request(
        method::REFRESH,
        &[(attr::LIFETIME, vec![0, 0, 0, 0])],
        Some(("alice", "pw")),
    );
    for (i, &n) in sizes.iter().enumerate() {
        c.sock.send_to(&frame(i, n), s.udp_addr()).unwrap();
    }
    // The same as one GSO send, which reaches the listener (UDP_GRO on) as
    // one receive the server splits.
    let frames: Vec<Vec<u8>> = (0..24).map(|i| frame(50 + i, sizes[i])).collect();
    send_gso(&c.sock, s.udp_addr(), &frames);
    c.sock.send_to(&delete, s.udp_addr()).unwrap();
    let after: Vec<Vec<u8>> = (0..8).map(|i| frame(100 + i, 1000)).collect();
    send_gso(&c.sock, s.udp_addr(), &after);
    for f in &after {
        c.sock.send_to(f, s.udp_addr()).unwrap();
    }
    let mut buf = [0u8; 65536];
    for first in [0, 50] {
        for (i, &n) in sizes.iter().enumerate() {
            let got = peer.recv(&mut buf).unwrap();
            let v = (first + i) as u8;
            assert_eq!(&buf[..got], &vec![v; n][..], "datagram {}", first + i);
        }
    }
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        peer.recv(&mut buf).is_err(),
        "relayed after the allocation was deleted"
    );
    let n = c.sock.recv(&mut buf).unwrap();
    let r = Message::parse(&buf[..n]).unwrap();
    assert_eq!(r.method(), method::REFRESH);
    assert_eq!(r.class(), Class::Success);
}

#[test]
fn port_exhaustion_is_508_and_recovers() {
    let (min, max) = relay_range(2);
    let s = Server::start(Options::new(&format!(
        "{ALICE}min-port={min}\nmax-port={max}\n"
    )));
    let mut a = Client::new(s.udp_addr());
    let mut b = Client::new(s.udp_addr());
    let mut c = Client::new(s.udp_addr());
    assert!(a.allocate("alice", "pw").is_success());
    assert!(b.allocate("alice", "pw").is_success());
    assert_eq!(c.allocate("alice", "pw").code(), Some(508));
    assert!(a.delete("alice", "pw").is_success());
    let r = c.allocate("alice", "pw");
    assert!(r.is_success(), "{:?}", r.code());
    let port = r.relayed().port();
    assert!((min..=max).contains(&port));
}

/// RFC 8656 §7.3: a Refresh with LIFETIME 0 deletes the allocation at once,
/// so the same 5-tuple can allocate again straight away (a client reusing
/// its socket, or a NAT reusing a port). coturn 4.6.1 does not always: a
/// second `turnbench` run of 10,000 allocations, whose client ports reuse
/// those of the first run's deleted allocations, had 822 of its Allocates
/// answered 437 "Mismatched allocation: wrong transaction ID".
#[test]
fn a_deleted_allocation_frees_its_5_tuple_at_once() {
    let s = Server::start(Options::new(ALICE));
    let mut c = Client::new(s.udp_addr());
    let first = c.allocate("alice", "pw");
    assert!(first.is_success());
    let delete = c.delete("alice", "pw");
    assert!(delete.is_success());
    for _ in 0..3 {
        let again = c.allocate("alice", "pw");
        assert!(again.is_success(), "{:?}", again.code());
        assert!(c.delete("alice", "pw").is_success());
    }
}

#[test]
fn allocation_errors() {
    let s = Server::start(Options::new(ALICE));
    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate("alice", "pw").is_success());
    // A second Allocate on the same 5-tuple.
    let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
    assert_eq!(
        c.signed(method::ALLOCATE, &attrs, "alice", "pw").code(),
        Some(437)
    );
    // TCP relaying over UDP: 400 (RFC 6062 §5.1); an unknown protocol: 442.
    let mut d = Client::new(s.udp_addr());
    d.realm = c.realm.clone();
    d.nonce = c.nonce.clone();
    let tcp = vec![(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])];
    assert_eq!(
        d.signed(method::ALLOCATE, &tcp, "alice", "pw").code(),
        Some(400)
    );
    let sctp = vec![(attr::REQUESTED_TRANSPORT, vec![132, 0, 0, 0])];
    assert_eq!(
        d.signed(method::ALLOCATE, &sctp, "alice", "pw").code(),
        Some(442)
    );
    // Unknown comprehension-required attribute.
    let req = d.request(method::ALLOCATE, &[(0x7ABC, vec![1, 2, 3, 4])], None);
    let r = d.transact(&req);
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES),
        Some(&[0x7A, 0xBC][..])
    );
    // Refresh without an allocation.
    assert_eq!(
        d.signed(method::REFRESH, &[], "alice", "pw").code(),
        Some(437)
    );
}

#[test]
fn loopback_peers_are_forbidden_by_default() {
    let s = Server::start(Options::new(ALICE));
    let (listener, listener_addr) = peer_socket();
    listener
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate("alice", "pw").is_success());
    let permit = |c: &mut Client, p: SocketAddr| {
        c.signed(
            method::CREATE_PERMISSION,
            &[(attr::XOR_PEER_ADDRESS, xor_peer(p, &[0; 12]))],
            "alice",
            "pw",
        )
        .code()
    };
    for peer in ["127.0.0.2:5000", "0.0.0.0:5000", "127.255.0.1:1"] {
        let p: SocketAddr = peer.parse().unwrap();
        assert_eq!(permit(&mut c, p), Some(403), "{peer}");
        let r = c.signed(
            method::CHANNEL_BIND,
            &channel_bind_attrs(0x4000, p),
            "alice",
            "pw",
        );
        assert_eq!(r.code(), Some(403), "{peer}");
    }
    // 127.0.0.1 is this server's relay address: other clients' relays are
    // reachable there, but no other port (here a UDP service of the test).
    assert_eq!(permit(&mut c, listener_addr), None);
    let r = c.signed(
        method::CHANNEL_BIND,
        &channel_bind_attrs(0x4000, listener_addr),
        "alice",
        "pw",
    );
    assert_eq!(r.code(), Some(403));
    let mut send = Vec::new();
    MessageWriter::new(&mut send, method::SEND, Class::Indication, &[5; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, listener_addr)
        .attr(attr::DATA, b"must not arrive");
    c.sock.send_to(&send, s.udp_addr()).unwrap();
    assert!(
        listener.recv_from(&mut [0u8; 100]).is_err(),
        "a byte reached a non-relay port"
    );
}

#[test]
fn hostile_bytes_do_not_disturb_other_clients() {
    let s = Server::start(Options::new(&format!("{ALICE}allow-loopback-peers\n")));
    let (peer, peer_addr) = peer_socket();
    let mut c = Client::new(s.udp_addr());
    let relayed = c.allocate("alice", "pw").relayed();
    assert!(
        c.signed(
            method::CHANNEL_BIND,
            &channel_bind_attrs(0x4000, peer_addr),
            "alice",
            "pw"
        )
        .is_success()
    );

    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u32 = 12345;
    for i in 0..2000usize {
        let mut d = vec![0u8; i % 200];
        for b in d.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        if i % 3 == 0 && d.len() >= 20 {
            // A valid-looking header with a lying length.
            d[0] = 0;
            d[1] = 1;
            d[2] = 0xFF;
            d[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        }
        let _ = junk.send_to(&d, s.udp_addr());
    }
    // Garbage streams: not STUN at all, and a frame header promising more.
    for bytes in [
        &[0xFFu8; 64][..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0x00, 0x01, 0xFF, 0xFC],
    ] {
        if let Ok(mut t) = TcpStream::connect(s.udp_addr()) {
            let _ = t.write_all(bytes);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    // The server still answers and the allocation still relays.
    let r = c.transact(&binding_request([9; 12]));
    assert!(r.is_success());
    c.sock
        .send_to(&[0x40, 0x00, 0, 2, b'o', b'k', 0, 0], s.udp_addr())
        .unwrap();
    let mut buf = [0u8; 100];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ok");
    peer.send_to(b"back", relayed).unwrap();
    let (n, _) = c.sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[4..n], b"back");
    let m = Message::parse(&r.raw).unwrap();
    assert_eq!(m.class(), Class::Success);
}

#[test]
fn ipv6_clients_and_relays() {
    let s = Server::start(Options::new(&format!(
        "{ALICE}listening-ip=::1\nallow-loopback-peers\n"
    )));
    let v6_server: SocketAddr = format!("[::1]:{}", s.port).parse().unwrap();
    let peer = UdpSocket::bind("[::1]:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // Binding over IPv6.
    let mut c = Client::new(v6_server);
    let r = c.transact(&binding_request([1; 12]));
    assert_eq!(
        r.msg()
            .xor_address(attr::XOR_MAPPED_ADDRESS)
            .unwrap()
            .unwrap(),
        c.sock.local_addr().unwrap()
    );

    // An IPv6 relay requested over IPv6.
    let r = c.allocate_with(
        &[(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
        "alice",
        "pw",
    );
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    assert_eq!(relayed.ip(), "::1".parse::<std::net::IpAddr>().unwrap());
    // Data indication carrying an IPv6 XOR-PEER-ADDRESS.
    assert!(
        c.signed_peer(method::CREATE_PERMISSION, &[], peer_addr, "alice", "pw")
            .is_success()
    );
    peer.send_to(b"v6 hello", relayed).unwrap();
    let mut buf = [0u8; 200];
    let (n, _) = c.sock.recv_from(&mut buf).unwrap();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(
        m.xor_address(attr::XOR_PEER_ADDRESS).unwrap().unwrap(),
        peer_addr
    );
    assert_eq!(m.get(attr::DATA), Some(&b"v6 hello"[..]));
    // ChannelData both ways.
    let bind = [(attr::CHANNEL_NUMBER, vec![0x40, 0x06, 0, 0])];
    assert!(
        c.signed_peer(method::CHANNEL_BIND, &bind, peer_addr, "alice", "pw")
            .is_success()
    );
    c.sock
        .send_to(&[0x40, 0x06, 0, 2, b'o', b'k', 0, 0], v6_server)
        .unwrap();
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"ok"[..], relayed));
    // An IPv4 peer on an IPv6 relay: 443.
    let v4_peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(
        c.signed_peer(method::CREATE_PERMISSION, &[], v4_peer, "alice", "pw")
            .code(),
        Some(443)
    );

    // Without REQUESTED-ADDRESS-FAMILY, an IPv6 client gets an IPv4 relay
    // (RFC 8656's default), on a listening address of that family.
    let mut d = Client::new(v6_server);
    let r = d.allocate("alice", "pw");
    assert!(r.is_success(), "{:?}", r.code());
    assert!(r.relayed().is_ipv4());
    // An IPv4 client may ask for an IPv6 relay.
    let mut e = Client::new(s.udp_addr());
    let r = e.allocate_with(
        &[(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
        "alice",
        "pw",
    );
    assert!(r.relayed().is_ipv6());
}

#[test]
fn mobility_moves_an_allocation_across_addresses_and_workers() {
    let s = Server::start(Options::new(&format!(
        "{ALICE}allow-loopback-peers\nmobility\nrelay-threads=4\n"
    )));
    let (peer, peer_addr) = peer_socket();
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate_with(&[(attr::MOBILITY_TICKET, vec![])], "alice", "pw");
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    let mut ticket = r.msg().get(attr::MOBILITY_TICKET).unwrap().to_vec();
    assert!(
        c.signed(
            method::CHANNEL_BIND,
            &channel_bind_attrs(0x4001, peer_addr),
            "alice",
            "pw"
        )
        .is_success()
    );
    let mut buf = [0u8; 100];
    for i in 0..8u8 {
        // The client's address changes: a new socket refreshes with the ticket.
        let (next, r) = c.move_with_ticket(&ticket, "alice", "pw");
        assert!(r.is_success(), "move {i}: {:?}\n{}", r.code(), s.log_text());
        ticket = r.msg().get(attr::MOBILITY_TICKET).unwrap().to_vec();
        // Relaying follows the client, with the same relayed address and channel.
        peer.send_to(&[i], relayed).unwrap();
        let (n, _) = next
            .sock
            .recv_from(&mut buf)
            .expect("peer data reaches the new address");
        assert_eq!(&buf[..n], &[0x40, 0x01, 0, 1, i]);
        next.sock
            .send_to(&[0x40, 0x01, 0, 1, i, 0, 0, 0], s.udp_addr())
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&[i][..], relayed));
        // The old address no longer reaches the allocation.
        let r = c.signed(method::REFRESH, &[], "alice", "pw");
        assert_eq!(r.code(), Some(437), "move {i}");
        c = next;
    }
    let log = s.log_text();
    assert!(
        log.contains("allocation moved to another worker (mobility)"),
        "{log}"
    );
    assert!(!log.contains("allocation deleted"), "{log}");
}

#[test]
fn rfc3489_binding_gets_mapped_address_when_configured() {
    // A classic (RFC 3489) Binding request: no magic cookie, a 128-bit ID.
    let mut req = vec![0x00, 0x01, 0x00, 0x00];
    req.extend_from_slice(&[0x5A; 16]);
    let ask = |s: &Server| {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        sock.send_to(&req, s.udp_addr()).unwrap();
        let mut buf = [0u8; 1500];
        let got = sock.recv(&mut buf).ok().map(|n| buf[..n].to_vec());
        (got, sock.local_addr().unwrap())
    };
    // Off by default: no answer.
    let s = Server::start(Options::new(ALICE));
    assert_eq!(ask(&s).0, None);
    drop(s);
    let s = Server::start(Options::new(&format!(
        "{ALICE}stun-backward-compatibility\n"
    )));
    let (got, local) = ask(&s);
    let got = got.expect("an answer to the RFC 3489 Binding");
    assert_eq!(got[..4], [0x01, 0x01, 0x00, 0x0C]);
    assert_eq!(got[4..20], [0x5A; 16]);
    // MAPPED-ADDRESS, IPv4, the client's port and address.
    let std::net::SocketAddr::V4(v4) = local else {
        unreachable!()
    };
    let mut want = vec![0x00, 0x01, 0x00, 0x08, 0x00, 0x01];
    want.extend_from_slice(&v4.port().to_be_bytes());
    want.extend_from_slice(&v4.ip().octets());
    assert_eq!(got[20..], want);
    // RFC 5389 clients get MAPPED-ADDRESS besides XOR-MAPPED-ADDRESS.
    let mut c = Client::new(s.udp_addr());
    let r = c.transact(&binding_request([2; 12]));
    let mut mapped = [0u8; 20];
    let n = turnserver::stun::encode_address(&mut mapped, c.sock.local_addr().unwrap());
    assert_eq!(
        r.msg().get(attr::MAPPED_ADDRESS).map(<[u8]>::to_vec),
        Some(mapped[..n].to_vec())
    );
}
