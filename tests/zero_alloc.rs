//! The relay hot path allocates nothing per packet.
//!
//! This test runs the server's real data path (the workers `turnserver`
//! runs, started with `daemon::prepare` and `server::start`) inside the
//! test process, whose global allocator counts every allocation. A client
//! and a peer on loopback relay ChannelData both ways through an
//! allocation; once warm, tens of thousands of relayed packets must cost
//! no more allocations than the workers' once-a-second housekeeping.
//!
//! It is the only test in this binary, so nothing else allocates while it
//! counts.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Client, free_ports, relay_range};
use turnserver::config::{self, Invocation};
use turnserver::stun::{attr, method};

/// Counts allocations (and reallocations) made by any thread.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Relays `n` round trips: client -> ChannelData -> peer, and back. Uses
/// only fixed buffers, so the loop itself allocates nothing.
fn relay(client: &UdpSocket, server: SocketAddr, peer: &UdpSocket, relayed: SocketAddr, n: usize) {
    let mut frame = [0u8; 4 + 160];
    frame[..2].copy_from_slice(&0x4000u16.to_be_bytes());
    frame[2..4].copy_from_slice(&160u16.to_be_bytes());
    let mut buf = [0u8; 2048];
    for i in 0..n {
        frame[4..12].copy_from_slice(&(i as u64).to_be_bytes());
        client.send_to(&frame, server).unwrap();
        let (len, from) = peer.recv_from(&mut buf).expect("relayed to the peer");
        assert_eq!((len, from), (160, relayed));
        assert_eq!(buf[..8], (i as u64).to_be_bytes());
        peer.send_to(&buf[..len], relayed).unwrap();
        let len = client.recv(&mut buf).expect("relayed back to the client");
        assert_eq!(len, 4 + 160, "ChannelData from the server");
        assert_eq!(buf[4..12], (i as u64).to_be_bytes());
    }
}

#[test]
fn relaying_allocates_nothing_per_packet() {
    let port = free_ports(2);
    let (min, max) = relay_range(50);
    let args: Vec<String> = [
        "turnserver".to_string(),
        "-n".into(),
        "--listening-ip=127.0.0.1".into(),
        format!("--listening-port={port}"),
        format!("--tls-listening-port={}", port + 1),
        "--no-tls".into(),
        "--no-tcp".into(),
        format!("--min-port={min}"),
        format!("--max-port={max}"),
        "--lt-cred-mech".into(),
        "--user=alice:alice-password".into(),
        "--realm=example.org".into(),
        "--allow-loopback-peers".into(),
        "--relay-threads=2".into(),
    ]
    .into();
    let cfg = match config::load(args).expect("configuration") {
        Invocation::Run(loaded) => loaded.config,
        _ => panic!("expected a run configuration"),
    };
    let prepared = turnserver::daemon::prepare(&cfg).expect("listeners");
    let _running =
        turnserver::server::start(prepared.bound, prepared.shared).expect("worker threads");
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // Set up an allocation with a channel to the peer.
    let mut c = Client::new(server);
    let deadline = Instant::now() + Duration::from_secs(5);
    let alloc = loop {
        // The workers may take a moment to start serving.
        let r = c.allocate("alice", "alice-password");
        if r.is_success() || Instant::now() > deadline {
            break r;
        }
    };
    assert!(alloc.is_success(), "Allocate failed: {:?}", alloc.code());
    let relayed = alloc.relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let bind = c.signed_peer(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x00, 0, 0])],
        peer.local_addr().unwrap(),
        "alice",
        "alice-password",
    );
    assert!(bind.is_success(), "ChannelBind failed: {:?}", bind.code());
    c.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();

    // Warm up: buffers, tables and the allocator reach their steady size.
    relay(&c.sock, server, &peer, relayed, 2_000);

    const ROUND_TRIPS: usize = 20_000;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    relay(&c.sock, server, &peer, relayed, ROUND_TRIPS);
    let elapsed = started.elapsed();
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;

    // 40,000 relayed packets. The workers' timers run once a second and may
    // allocate a little for the metrics report; allow that much per elapsed
    // second, and nothing that scales with packets.
    let seconds = elapsed.as_secs_f64().ceil() as u64 + 1;
    let allowed = 40 * seconds;
    assert!(
        allocations <= allowed,
        "{allocations} allocations while relaying {} packets in {elapsed:?} \
         (allowed {allowed}: housekeeping only)",
        2 * ROUND_TRIPS
    );
    eprintln!(
        "{allocations} allocations for {} relayed packets in {elapsed:?}",
        2 * ROUND_TRIPS
    );
}
