//! Soak: churn many allocations (allocate, bind a channel, relay both ways,
//! delete; and TCP clients that vanish) and check that the daemon's open
//! file descriptors and resident memory come back to their baseline, and
//! that every relay port is free again.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{
    Client, Options, Server, StreamClient, channel_bind_attrs, open_fds, relay_range, rss_kib,
};
use turnserver::stun::method;

/// One full allocation life over UDP.
fn cycle(server: SocketAddr, peer: &UdpSocket, i: usize) {
    let mut c = Client::new(server);
    let r = c.allocate("alice", "pw");
    assert!(r.is_success(), "cycle {i}: {:?}", r.code());
    let relayed = r.relayed();
    let bind = channel_bind_attrs(0x4000, peer.local_addr().unwrap());
    assert!(
        c.signed(method::CHANNEL_BIND, &bind, "alice", "pw")
            .is_success()
    );
    c.sock
        .send_to(&[0x40, 0x00, 0, 4, b'p', b'i', b'n', b'g'], server)
        .unwrap();
    let mut buf = [0u8; 100];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    peer.send_to(b"pong", relayed).unwrap();
    let (n, _) = c.sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[4..n], b"pong");
    assert!(c.delete("alice", "pw").is_success());
}

/// A TCP client that allocates and then just disconnects.
fn vanish(server: SocketAddr) {
    let mut t = StreamClient::tcp(server);
    assert!(t.allocate("alice", "pw").is_success());
}

#[test]
fn churn_returns_fds_and_memory_to_baseline() {
    let (min, max) = relay_range(200);
    let s = Server::start(Options::new(&format!(
        "lt-cred-mech\nrealm=r\nuser=alice:pw\nallow-loopback-peers\nmin-port={min}\nmax-port={max}\nunauthorized-ratelimit-rps=0\n"
    )));
    let pid = s.pid();
    let server = s.udp_addr();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    // Warm up so lazily grown tables and allocator pools exist.
    for i in 0..100 {
        cycle(server, &peer, i);
        vanish(server);
    }
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = open_fds(pid);
    let rss_before = rss_kib(pid);

    for round in 0..10 {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
                    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    for i in 0..60 {
                        cycle(server, &peer, round * 1000 + t * 100 + i);
                        if i % 4 == 0 {
                            vanish(server);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let fds_after = open_fds(pid);
    let rss_after = rss_kib(pid);
    assert_eq!(fds_after, fds_before, "file descriptors leaked");
    assert!(
        rss_after <= rss_before + 4096,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Every relay port is free again: the whole range can be allocated.
    let mut held = Vec::new();
    for i in 0..=(max - min) {
        let mut c = Client::new(server);
        let r = c.allocate("alice", "pw");
        assert!(r.is_success(), "port {i} of the range: {:?}", r.code());
        held.push(c);
    }
    assert_eq!(
        Client::new(server).allocate("alice", "pw").code(),
        Some(508)
    );
}
