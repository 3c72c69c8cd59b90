//! RFC 8656 §7.2 dual allocations against the real binary on loopback: an
//! Allocate with ADDITIONAL-ADDRESS-FAMILY gets an IPv4 and an IPv6 relayed
//! address that both carry data; with only IPv6 to relay on, the answers
//! §7.2 prescribes; and coturn's own `turnutils_uclient -Z -y` (dual
//! allocations, client to client) relays without loss.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::client::{Client, Response};
use common::uclient::run_uclient;
use common::{Options, Server};
use turnserver::stun::{attr, method};

const USERS: &str =
    "lt-cred-mech\nrealm=example.org\nuser=alice:pw\nallow-loopback-peers\nlistening-ip=::1\n";

/// Every XOR-RELAYED-ADDRESS of an Allocate response, in order.
fn relayed(r: &Response) -> Vec<SocketAddr> {
    let m = r.msg();
    m.get_all(attr::XOR_RELAYED_ADDRESS)
        .map(|v| {
            attr::decode_xor_address(attr::XOR_RELAYED_ADDRESS, v, m.transaction_id()).unwrap()
        })
        .collect()
}

fn dual_allocate(c: &mut Client) -> Response {
    c.allocate_with(
        &[(attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
        "alice",
        "pw",
    )
}

#[test]
fn a_dual_allocation_relays_both_families() {
    let s = Server::start(Options::new(USERS));
    let mut c = Client::new(s.udp_addr());
    let r = dual_allocate(&mut c);
    assert!(r.is_success(), "{:?}\n{}", r.code(), s.log_text());
    let relays = relayed(&r);
    assert_eq!(relays.len(), 2, "{relays:?}");
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6(), "{relays:?}");
    assert_eq!(r.msg().get(attr::ADDRESS_ERROR_CODE), None);

    let mut buf = [0u8; 2000];
    for (number, peer_ip, relay) in [
        (0x4001u16, "127.0.0.1:0", relays[0]),
        (0x4002, "[::1]:0", relays[1]),
    ] {
        let peer = UdpSocket::bind(peer_ip).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let bind = c.signed_peer(
            method::CHANNEL_BIND,
            &[(
                attr::CHANNEL_NUMBER,
                [number.to_be_bytes(), [0, 0]].concat(),
            )],
            peer_addr,
            "alice",
            "pw",
        );
        assert!(bind.is_success(), "{peer_addr}: {:?}", bind.code());
        // Client -> peer, out of the relay of the peer's family.
        let [hi, lo] = number.to_be_bytes();
        c.sock
            .send_to(&[hi, lo, 0, 4, b'p', b'i', b'n', b'g'], s.udp_addr())
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"ping"[..], relay));
        // Peer -> client, on the same channel.
        peer.send_to(b"pong", relay).unwrap();
        let (n, _) = c.sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[hi, lo, 0, 4, b'p', b'o', b'n', b'g']);
    }

    // Deleting the IPv6 relay keeps the IPv4 one.
    let drop_v6 = c.signed(
        method::REFRESH,
        &[
            (attr::LIFETIME, vec![0, 0, 0, 0]),
            (attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0]),
        ],
        "alice",
        "pw",
    );
    assert!(drop_v6.is_success(), "{:?}", drop_v6.code());
    let v6_peer: SocketAddr = "[::1]:9".parse().unwrap();
    let perm = c.signed_peer(method::CREATE_PERMISSION, &[], v6_peer, "alice", "pw");
    assert_eq!(perm.code(), Some(443));
    let refresh = c.signed(method::REFRESH, &[], "alice", "pw");
    assert!(refresh.is_success());
    assert!(c.delete("alice", "pw").is_success());
}

#[test]
fn with_only_ipv6_to_relay_on_the_rfc8656_answers_are_given() {
    let s = Server::start(Options::new(&format!("{USERS}relay-ip=::1\n")));
    // Dual: the IPv6 relay, and 440 for IPv4 in ADDRESS-ERROR-CODE.
    let mut c = Client::new(s.udp_addr());
    let r = dual_allocate(&mut c);
    assert!(r.is_success(), "{:?}", r.code());
    let relays = relayed(&r);
    assert_eq!(relays.len(), 1);
    assert!(relays[0].is_ipv6(), "{relays:?}");
    let error = r.msg().get(attr::ADDRESS_ERROR_CODE).unwrap().to_vec();
    assert_eq!(&error[..4], &[0x01, 0, 4, 40]);
    // Without a family the default, IPv4, is not available: 440.
    let mut c = Client::new(s.udp_addr());
    assert_eq!(c.allocate("alice", "pw").code(), Some(440));
    // Asking for IPv6 works.
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate_with(
        &[(attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
        "alice",
        "pw",
    );
    assert!(r.is_success(), "{:?}", r.code());
    assert!(r.relayed().is_ipv6());
}

#[test]
fn coturn_uclient_dual_allocations_client_to_client() {
    let s = Server::start(Options::new(USERS));
    let p = s.port.to_string();
    run_uclient(
        &[
            "-Z", "-y", "-n", "20", "-m", "4", "-l", "120", "-u", "alice", "-w", "pw", "-p", &p,
        ],
        "127.0.0.1",
        80,
        &|| s.log_text(),
    );
}

#[test]
fn both_relays_follow_a_mobile_client_across_workers() {
    let s = Server::start(Options::new(&format!("{USERS}mobility\nrelay-threads=4\n")));
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate_with(
        &[
            (attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]),
            (attr::MOBILITY_TICKET, vec![]),
        ],
        "alice",
        "pw",
    );
    assert!(r.is_success(), "{:?}", r.code());
    let relays = relayed(&r);
    assert_eq!(relays.len(), 2);
    let mut ticket = r.msg().get(attr::MOBILITY_TICKET).unwrap().to_vec();
    let peers: Vec<(u16, UdpSocket)> = [(0x4001u16, "127.0.0.1:0"), (0x4002, "[::1]:0")]
        .into_iter()
        .map(|(number, ip)| {
            let peer = UdpSocket::bind(ip).unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let bind = c.signed_peer(
                method::CHANNEL_BIND,
                &[(
                    attr::CHANNEL_NUMBER,
                    [number.to_be_bytes(), [0, 0]].concat(),
                )],
                peer.local_addr().unwrap(),
                "alice",
                "pw",
            );
            assert!(bind.is_success(), "{:?}", bind.code());
            (number, peer)
        })
        .collect();
    let mut buf = [0u8; 100];
    for i in 0..6u8 {
        let (next, r) = c.move_with_ticket(&ticket, "alice", "pw");
        assert!(r.is_success(), "move {i}: {:?}\n{}", r.code(), s.log_text());
        ticket = r.msg().get(attr::MOBILITY_TICKET).unwrap().to_vec();
        next.sock
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for ((number, peer), relay) in peers.iter().zip(&relays) {
            peer.send_to(&[i], relay).unwrap();
            let (n, _) = next.sock.recv_from(&mut buf).expect("peer data follows");
            let [hi, lo] = number.to_be_bytes();
            assert_eq!(&buf[..n], &[hi, lo, 0, 1, i], "move {i}, relay {relay}");
        }
        c = next;
    }
}
