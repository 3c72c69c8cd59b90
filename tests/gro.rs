//! UDP GRO on receive, through the real binary: the server runs in a
//! network namespace of the test's own, its client and peers in a second
//! one, joined by a veth link that coalesces datagrams the way a network
//! card's GRO does (NAPI with a deferred GRO flush). A burst of datagrams
//! sent one by one then reaches the server's sockets (UDP_GRO on) as one
//! receive, which the server must split again: every datagram relayed on
//! its own, whole and in order, in both directions.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{
    Client, NetNs, channel_bind_attrs, channel_data, expect_relayed, frame_burst, require_tool,
    send_each, xor_peer,
};
use nix::sys::socket::{setsockopt, sockopt};
use turnserver::stun::{attr, method};

/// The server's side of the link.
const SERVER_IP: &str = "10.97.0.1";
/// The client's and peers' side.
const CLIENT_IP: &str = "10.97.0.2";
const PORT: u16 = 40000;

/// Two namespaces joined by veth `vs` (server side, `SERVER_IP`) and `vp`
/// (`CLIENT_IP`), with GRO on `vs` coalescing what `vp` sends.
struct Link {
    server: NetNs,
    client: NetNs,
}

impl Link {
    fn new() -> Link {
        require_tool("ethtool", "apt-get install ethtool");
        let server = NetNs::empty("gros");
        let client = NetNs::empty("groc");
        server.ip(&[
            "-n",
            &server.name,
            "link",
            "add",
            "vs",
            "type",
            "veth",
            "peer",
            "name",
            "vp",
            "netns",
            &client.name,
        ]);
        for (ns, dev, ip) in [(&server, "vs", SERVER_IP), (&client, "vp", CLIENT_IP)] {
            ns.address(dev, &format!("{ip}/24"));
        }
        // veth runs NAPI (and so GRO) for what it receives once GRO is
        // asked for, and takes plain UDP through it with UDP GRO
        // forwarding on. Holding the GRO list for 200 µs instead of
        // flushing it after every poll lets datagrams sent one by one
        // merge, as a busy network card's do.
        server.exec(&["ethtool", "-K", "vs", "gro", "off"]);
        server.exec(&[
            "ethtool",
            "-K",
            "vs",
            "gro",
            "on",
            "rx-udp-gro-forwarding",
            "on",
        ]);
        server.exec(&[
            "sh",
            "-c",
            "echo 200000 > /sys/class/net/vs/gro_flush_timeout",
        ]);
        Link { server, client }
    }
}

/// How many receives a socket with UDP_GRO on in the server's namespace
/// needs for a burst of 16 datagrams sent one by one from the client's.
fn receives_for_a_burst(link: &Link) -> usize {
    let rx = link.server.run(|| {
        let s = UdpSocket::bind((SERVER_IP, PORT + 1)).unwrap();
        setsockopt(&s, sockopt::UdpGroSegment, &true).unwrap();
        s
    });
    let to: SocketAddr = format!("{SERVER_IP}:{}", PORT + 1).parse().unwrap();
    link.client.run(move || {
        let tx = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
        send_each(&tx, to, &vec![vec![7u8; 500]; 16]);
    });
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (mut bytes, mut reads) = (0, 0);
    let mut buf = vec![0u8; 65536];
    while bytes < 16 * 500 {
        bytes += rx.recv(&mut buf).expect("the burst arrives");
        reads += 1;
    }
    reads
}

#[test]
fn coalesced_bursts_are_relayed_datagram_by_datagram() {
    let link = Link::new();
    // Positive control: the link really coalesces, so the server below
    // gets coalesced receives to split.
    let reads = receives_for_a_burst(&link);
    assert!(
        reads < 16,
        "the veth link did not coalesce: {reads} receives"
    );
    relay_bursts(&link, &[]);
    // With GRO off the kernel splits the bursts itself: the same result.
    relay_bursts(&link, &["--no-udp-gro"]);
}

/// Starts the server in the link's server namespace with `extra`
/// arguments, checks that bursts both ways are relayed datagram by
/// datagram, and stops it again.
fn relay_bursts(link: &Link, extra: &[&str]) {
    let port = PORT.to_string();
    let allowed = format!("--allowed-peer-ip={CLIENT_IP}");
    let mut args = vec!["-n", "--no-tls", "-L", SERVER_IP, "-p", &port];
    args.extend(["--min-port=50000", "--max-port=50100", "--lt-cred-mech"]);
    args.extend(["--user=alice:pw", "--realm=example.org", "-v", &allowed]);
    args.extend(extra);
    let _server = link.server.start_server(&args);

    let server: SocketAddr = format!("{SERVER_IP}:{PORT}").parse().unwrap();
    link.client.run(move || {
        let mut c = Client::bound(format!("{CLIENT_IP}:0").parse().unwrap(), server);
        c.sock
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let relayed = c.allocate("alice", "pw").relayed();
        let peer = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
        let plain = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let bind = channel_bind_attrs(0x4005, peer.local_addr().unwrap());
        assert!(
            c.signed(method::CHANNEL_BIND, &bind, "alice", "pw")
                .is_success()
        );
        let perm = vec![(
            attr::XOR_PEER_ADDRESS,
            xor_peer(plain.local_addr().unwrap(), &[0; 12]),
        )];
        assert!(
            c.signed(method::CREATE_PERMISSION, &perm, "alice", "pw")
                .is_success()
        );

        // Peer to client: a packetised frame, over the channel and as Data
        // indications.
        let datagrams = frame_burst();
        send_each(&peer, relayed, &datagrams);
        expect_relayed(&c.sock, &datagrams, Some(0x4005));
        send_each(&plain, relayed, &datagrams);
        expect_relayed(&c.sock, &datagrams, None);

        // Client to peer: a burst of ChannelData.
        let frames: Vec<Vec<u8>> = datagrams.iter().map(|d| channel_data(0x4005, d)).collect();
        send_each(&c.sock, server, &frames);
        let mut buf = vec![0u8; 65536];
        for (i, d) in datagrams.iter().enumerate() {
            let got = peer.recv(&mut buf).unwrap();
            assert_eq!(&buf[..got], &d[..], "datagram {i} to the peer");
        }
    });
}
