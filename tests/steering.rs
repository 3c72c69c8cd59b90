//! UDP steering with the real binary and two workers: at light load every
//! UDP client's allocation is on worker 0; when steering stops (here by a
//! reload with `udp-steering=off`, as it would when worker 0 gets busy) the
//! kernel spreads the clients and each allocation follows its client to the
//! worker its datagrams reach, and back when steering starts again. Every
//! client keeps relaying both ways, and keeps its allocation, through each
//! switch.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Client, Options, Server, channel_bind_attrs, free_ports, http_get, metric};
use turnserver::stun::{attr, method};

const CLIENTS: usize = 20;

fn config(metrics: u16, steering: &str) -> String {
    format!(
        "lt-cred-mech\nrealm=example.org\nuser=alice:pw\nallow-loopback-peers\nrelay-threads=2\n\
         unauthorized-ratelimit-rps=0\nprometheus\nprometheus-address=127.0.0.1\n\
         prometheus-port={metrics}\nudp-steering={steering}\n"
    )
}

/// Polls the metrics until `done` holds for (steering gauge, allocations
/// on workers 0 and 1), or 5 s pass; returns the last values.
fn wait_metrics(metrics: u16, done: impl Fn(f64, [f64; 2]) -> bool) -> (f64, [f64; 2]) {
    let addr = SocketAddr::from(([127, 0, 0, 1], metrics));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(addr, "/metrics");
        let steering = metric(&body, "turn_udp_steering").unwrap_or(f64::NAN);
        let on = [0, 1].map(|w| {
            metric(&body, &format!("turn_worker_allocations{{worker=\"{w}\"}}")).unwrap_or(0.0)
        });
        if done(steering, on) || Instant::now() > deadline {
            return (steering, on);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every client sends ChannelData to the peer and gets the peer's answer
/// back, then refreshes its allocation.
fn all_relay(s: &Server, clients: &mut [(Client, SocketAddr)], peer: &UdpSocket, round: u8) {
    let mut buf = [0u8; 100];
    for (i, (c, relayed)) in clients.iter_mut().enumerate() {
        let frame = [0x40, 0x01, 0, 3, round, i as u8, b'>'];
        c.sock.send_to(&frame, s.udp_addr()).unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&frame[4..], *relayed), "client {i}");
        peer.send_to(&[round, i as u8, b'<'], *relayed).unwrap();
        let n = c.sock.recv(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            &[0x40, 0x01, 0, 3, round, i as u8, b'<'],
            "client {i}"
        );
        let r = c.signed(
            method::REFRESH,
            &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
            "alice",
            "pw",
        );
        assert!(r.is_success(), "client {i}: Refresh {:?}", r.code());
    }
}

#[test]
fn allocations_follow_their_clients_when_steering_switches() {
    let metrics = free_ports(1);
    let s = Server::start(Options::new(&config(metrics, "auto")));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (steering, _) = wait_metrics(metrics, |st, _| st == 1.0);
    assert_eq!(steering, 1.0, "steering starts on");

    let mut clients: Vec<(Client, SocketAddr)> = (0..CLIENTS)
        .map(|_| {
            let mut c = Client::new(s.udp_addr());
            c.sock
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let relayed = c.allocate("alice", "pw").relayed();
            let bind = channel_bind_attrs(0x4001, peer_addr);
            assert!(
                c.signed(method::CHANNEL_BIND, &bind, "alice", "pw")
                    .is_success()
            );
            (c, relayed)
        })
        .collect();
    all_relay(&s, &mut clients, &peer, 0);
    let all = CLIENTS as f64;
    let (_, on) = wait_metrics(metrics, |_, on| on == [all, 0.0]);
    assert_eq!(on, [all, 0.0], "steered: everything on worker 0");

    // Steering off: the kernel spreads the clients, allocations follow.
    s.rewrite_config(&config(metrics, "off"));
    s.signal(nix::sys::signal::Signal::SIGHUP);
    let (steering, _) = wait_metrics(metrics, |st, _| st == 0.0);
    assert_eq!(steering, 0.0);
    all_relay(&s, &mut clients, &peer, 1);
    all_relay(&s, &mut clients, &peer, 2);
    let (_, on) = wait_metrics(metrics, |_, on| on[0] + on[1] == all && on[1] > 0.0);
    assert_eq!(on[0] + on[1], all, "{on:?}");
    assert!(on[0] > 0.0 && on[1] > 0.0, "spread over both: {on:?}");

    // On again: everything back to worker 0.
    s.rewrite_config(&config(metrics, "auto"));
    s.signal(nix::sys::signal::Signal::SIGHUP);
    let (steering, _) = wait_metrics(metrics, |st, _| st == 1.0);
    assert_eq!(steering, 1.0);
    // For a moment after giving an allocation away, a worker forwards what
    // still reaches it instead of pulling the allocation back (datagrams
    // queued before a switch); then it pulls.
    std::thread::sleep(Duration::from_millis(400));
    all_relay(&s, &mut clients, &peer, 3);
    let (_, on) = wait_metrics(metrics, |_, on| on == [all, 0.0]);
    assert_eq!(on, [all, 0.0], "steered again");
    let log = s.log_text();
    assert!(!log.contains("allocation deleted"), "{log}");
    assert!(log.contains("UDP steering off"), "{log}");
}
