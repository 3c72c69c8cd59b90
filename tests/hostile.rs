//! Hostile clients against the real binary with the default configuration.
//!
//! In a network namespace of the test's own, every forbidden address is a
//! local address and a wildcard listener would catch anything sent to any of
//! them: every spelling of every forbidden range is refused for
//! CreatePermission and ChannelBind, and Send indications to them deliver
//! nothing. Then malformed datagrams and garbage streams: the server keeps
//! answering and an existing allocation keeps relaying.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::{Client, NetNs, Options, Server, StreamClient, binding_request};
use turnserver::auth::long_term_key;
use turnserver::stun::{Class, MessageWriter, attr, method};

/// Forbidden IPv4 addresses assigned to the namespace's interface.
const V4: &[&str] = &[
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "192.0.0.8",
    "192.0.2.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "240.0.0.1",
];

/// Forbidden IPv6 addresses assigned to the namespace's interface.
const V6: &[&str] = &[
    "fc00::1",
    "fd12:3456::1",
    "fec0::1",
    "2001:db8::1",
    "3fff::1",
    "64:ff9b:1::1",
    "2001:2::1",
];

const PORT: u16 = 9999;

/// Every way to name a forbidden peer for an allocation of each family.
fn targets() -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let mut v4: Vec<SocketAddr> = V4
        .iter()
        .map(|a| SocketAddr::new(a.parse().unwrap(), PORT))
        .collect();
    for a in [
        "127.0.0.1",
        "127.0.0.53",
        "0.0.0.0",
        "0.0.0.1",
        "224.0.0.1",
        "255.255.255.255",
    ] {
        v4.push(SocketAddr::new(a.parse().unwrap(), PORT));
    }
    let mut v6: Vec<SocketAddr> = V6
        .iter()
        .map(|a| SocketAddr::new(a.parse().unwrap(), PORT))
        .collect();
    for a in V4.iter().chain(["127.0.0.1", "0.0.0.0"].iter()) {
        let v4: std::net::Ipv4Addr = a.parse().unwrap();
        let o = v4.octets();
        for form in [
            format!("::ffff:{a}"),
            format!("::{a}"),
            format!("64:ff9b::{a}"),
            format!("2002:{:02x}{:02x}:{:02x}{:02x}::1", o[0], o[1], o[2], o[3]),
            // Teredo with this server address.
            format!(
                "2001:0:{:02x}{:02x}:{:02x}{:02x}::1",
                o[0], o[1], o[2], o[3]
            ),
        ] {
            v6.push(SocketAddr::new(form.parse().unwrap(), PORT));
        }
    }
    for a in ["::1", "::", "ff02::1"] {
        v6.push(SocketAddr::new(a.parse().unwrap(), PORT));
    }
    (v4, v6)
}

fn send_indication(peer: SocketAddr) -> Vec<u8> {
    let mut out = Vec::new();
    MessageWriter::new(&mut out, method::SEND, Class::Indication, &[3; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, b"forbidden");
    out
}

#[test]
fn every_forbidden_address_form_is_refused_and_nothing_is_sent() {
    let ns = NetNs::new("hostile", "198.51.100.254");
    let ip = |args: &[&str]| {
        let st = Command::new("ip")
            .args(["-n", &ns.name])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    for a in V4 {
        ip(&["addr", "add", &format!("{a}/32"), "dev", "va"]);
    }
    for a in V6 {
        ip(&["addr", "add", &format!("{a}/128"), "dev", "va", "nodad"]);
    }
    ip(&["addr", "add", "64:ff9b::a00:1/128", "dev", "va", "nodad"]);
    let server = ns.start_server(&[
        "-n",
        "-L",
        "127.0.0.1",
        "-L",
        "::1",
        "-p",
        "3478",
        "--no-tls",
        "--min-port=60000",
        "--max-port=60100",
        "--user=alice:pw",
        "--realm=r",
        "-v",
    ]);
    let (v4, v6) = targets();
    let report = ns.run(move || {
        // A dual-stack wildcard listener catches a datagram to any local address.
        let sink = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        sink.set_only_v6(false).unwrap();
        sink.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, PORT)).into())
            .unwrap();
        let sink = UdpSocket::from(sink);
        sink.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        // Positive control: the forbidden addresses really are reachable here.
        let probe = UdpSocket::bind("0.0.0.0:0").unwrap();
        probe.send_to(b"control", ("10.0.0.1", PORT)).unwrap();
        let mut buf = [0u8; 100];
        assert_eq!(
            sink.recv_from(&mut buf).map(|(n, _)| n).ok(),
            Some(7),
            "control datagram"
        );

        let mut failures = Vec::new();
        for (server, targets, family) in [
            ("127.0.0.1:3478", &v4, None),
            ("[::1]:3478", &v6, Some(2u8)),
        ] {
            let mut c = Client::new(server.parse().unwrap());
            let extra: Vec<(u16, Vec<u8>)> = family
                .map(|f| vec![(attr::REQUESTED_ADDRESS_FAMILY, vec![f, 0, 0, 0])])
                .unwrap_or_default();
            let r = c.allocate_with(&extra, "alice", "pw");
            assert!(r.is_success(), "allocate on {server}: {:?}", r.code());
            for (i, &peer) in targets.iter().enumerate() {
                // The server's own relay addresses (127.0.0.1 and ::1 here,
                // in any spelling) accept permissions, because other clients'
                // relays live there; but only relay ports are reachable, which
                // ChannelBind, Send and the sink below check.
                let own = matches!(
                    turnserver::turn::policy::canonical(peer.ip())
                        .to_string()
                        .as_str(),
                    "127.0.0.1" | "::1"
                );
                let p = c.signed_peer(method::CREATE_PERMISSION, &[], peer, "alice", "pw");
                if p.code() != Some(403) && !own {
                    failures.push(format!("CreatePermission {peer}: {:?}", p.code()));
                }
                let n = 0x4000 + i as u16;
                let b = c.signed_peer(
                    method::CHANNEL_BIND,
                    &[(attr::CHANNEL_NUMBER, vec![(n >> 8) as u8, n as u8, 0, 0])],
                    peer,
                    "alice",
                    "pw",
                );
                if b.code() != Some(403) {
                    failures.push(format!("ChannelBind {peer}: {:?}", b.code()));
                }
                c.sock.send_to(&send_indication(peer), c.server).unwrap();
            }
        }
        let mut leaked = Vec::new();
        while let Ok((n, from)) = sink.recv_from(&mut buf) {
            leaked.push(format!("{n} bytes from {from}"));
        }
        (failures, leaked)
    });
    let (failures, leaked) = report;
    let text = server.log();
    assert!(
        failures.is_empty(),
        "not refused:\n{}\n{text}",
        failures.join("\n")
    );
    assert!(
        leaked.is_empty(),
        "datagrams reached forbidden addresses: {leaked:?}"
    );
    assert!(text.contains("403: peer refused"), "{text}");
}

/// A signed Allocate with raw control over its bytes.
fn allocate_bytes(realm: &str, nonce: &[u8], extra_after_mi: bool, duplicate: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, method::ALLOCATE, Class::Request, &[0x77; 12]);
    w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    if duplicate {
        w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0])
            .attr(attr::LIFETIME, &[0, 0, 0, 1])
            .attr(attr::LIFETIME, &[0, 0, 0, 2]);
    }
    w.attr(attr::USERNAME, b"alice")
        .attr(attr::REALM, realm.as_bytes())
        .attr(attr::NONCE, nonce)
        .integrity(&long_term_key("alice", realm, "pw"));
    if extra_after_mi {
        w.attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    }
    w.fingerprint();
    out
}

#[test]
fn malformed_datagrams_and_garbage_streams_change_nothing() {
    let s = Server::start(
        Options::new("lt-cred-mech\nrealm=r\nuser=alice:pw\nallow-loopback-peers\n").tls(),
    );
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut c = Client::new(s.udp_addr());
    let relayed = c.allocate("alice", "pw").relayed();
    let bind = [(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])];
    assert!(
        c.signed_peer(
            method::CHANNEL_BIND,
            &bind,
            peer.local_addr().unwrap(),
            "alice",
            "pw"
        )
        .is_success()
    );

    let mut hostile = Client::new(s.udp_addr());
    hostile
        .sock
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let nonce = c.nonce.clone();
    let valid = allocate_bytes("r", &nonce, false, false);
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    // Truncated at every length.
    for n in 0..valid.len() {
        datagrams.push(valid[..n].to_vec());
    }
    // Length field larger and smaller than the datagram.
    for len in [0xFFFCu16, 0x0004, 0x0100] {
        let mut d = valid.clone();
        d[2..4].copy_from_slice(&len.to_be_bytes());
        datagrams.push(d);
    }
    // Bad FINGERPRINT, bad MESSAGE-INTEGRITY (wrong key), attribute after
    // MESSAGE-INTEGRITY, duplicated attributes.
    let mut bad_fp = valid.clone();
    let n = bad_fp.len();
    bad_fp[n - 1] ^= 0xFF;
    datagrams.push(bad_fp);
    let mut bad_mi = valid.clone();
    let mi_at = bad_mi.len() - 8 - 20;
    bad_mi[mi_at] ^= 0xFF;
    datagrams.push(bad_mi);
    datagrams.push(allocate_bytes("r", &nonce, true, false));
    datagrams.push(allocate_bytes("r", &nonce, false, true));
    // ChannelData with lying lengths, random bytes, empty datagrams.
    datagrams.push(vec![0x40, 0x00, 0xFF, 0xFF, 1, 2, 3]);
    datagrams.push(vec![0x7F, 0xFF, 0x00, 0x10]);
    datagrams.push(Vec::new());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..3000 {
        let mut d = vec![0u8; i % 300];
        for b in d.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        if i % 2 == 0 && d.len() >= 20 {
            d[0] &= 0x3F;
            d[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
        }
        datagrams.push(d);
    }
    for d in &datagrams {
        hostile.sock.send_to(d, s.udp_addr()).unwrap();
    }
    // Garbage streams, plain and TLS, and the same datagrams as TCP frames.
    let mut tcp = TcpStream::connect(s.udp_addr()).unwrap();
    for d in datagrams.iter().take(200) {
        let _ = tcp.write_all(d);
    }
    for bytes in [
        &[0xFFu8; 100][..],
        b"\x16\x03\x01\x00\x10garbage-handshake",
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        for port in [s.port, s.tls_port] {
            if let Ok(mut t) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = t.write_all(bytes);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));

    // Still answering, on every transport; the allocation still relays.
    assert!(
        Client::new(s.udp_addr())
            .transact(&binding_request([1; 12]))
            .is_success()
    );
    assert!(
        StreamClient::tcp(s.udp_addr())
            .transact(&binding_request([2; 12]))
            .is_success()
    );
    c.sock
        .send_to(&[0x40, 0x00, 0, 2, b'o', b'k', 0, 0], s.udp_addr())
        .unwrap();
    let mut buf = [0u8; 100];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"ok"[..], relayed));
    peer.send_to(b"back", relayed).unwrap();
    let (n, _) = c.sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[4..n], b"back");
    // The hostile client's duplicate-attribute Allocate used the first
    // REQUESTED-TRANSPORT (UDP) and the one after MESSAGE-INTEGRITY was
    // ignored: it holds a UDP allocation now, which a retransmission finds.
    let r = hostile.transact(&allocate_bytes("r", &nonce, true, false));
    assert!(r.is_success(), "{:?}", r.code());
    let addr: IpAddr = r.relayed().ip();
    assert!(addr.is_loopback());
}
