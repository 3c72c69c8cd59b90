//! TCP and TLS under abuse: slowloris, idle connections, too many
//! connections from one address, maximum-size frames and clients that stop
//! reading. The server must close what it should and keep serving everyone
//! else with bounded memory.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{
    Client, Options, Server, StreamClient, binding_request, channel_bind_attrs, tls_over,
};
use turnserver::stun::method;

const USERS: &str = "lt-cred-mech\nrealm=r\nuser=alice:pw\n";

/// Seconds until the server closes `s` (reads until EOF or error).
fn closed_after(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None;
            }
            Err(_) => return Some(start.elapsed()),
        }
    }
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn slowloris_and_stalled_handshakes_are_closed() {
    let s = Server::start(Options::new(USERS).tls());
    // Half a STUN header, then nothing.
    let mut half = TcpStream::connect(s.udp_addr()).unwrap();
    half.write_all(&[0x00, 0x01, 0x00]).unwrap();
    // A frame whose body never completes.
    let mut partial = TcpStream::connect(s.udp_addr()).unwrap();
    partial
        .write_all(&[0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42])
        .unwrap();
    // A TLS record header and nothing more.
    let mut tls = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], s.tls_port))).unwrap();
    tls.write_all(&[0x16, 0x03, 0x01]).unwrap();
    // Connected but silent.
    let silent = TcpStream::connect(s.udp_addr()).unwrap();
    // Meanwhile everyone else is served.
    let mut t = StreamClient::tcp(s.udp_addr());
    assert!(t.transact(&binding_request([1; 12])).is_success());
    for (name, conn) in [
        ("half header", half),
        ("partial frame", partial),
        ("TLS", tls),
        ("silent", silent),
    ] {
        let after = closed_after(conn, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{name} connection was never closed"));
        assert!(
            after < Duration::from_secs(15),
            "{name}: closed after {after:?}"
        );
    }
}

#[test]
fn connections_without_an_allocation_time_out() {
    let s = Server::start(Options::new(&format!("{USERS}max-allocate-timeout=2\n")));
    let mut idle = StreamClient::tcp(s.udp_addr());
    assert!(idle.transact(&binding_request([1; 12])).is_success());
    let mut busy = StreamClient::tcp(s.udp_addr());
    assert!(busy.allocate("alice", "pw").is_success());
    let after = closed_after(idle.stream, Duration::from_secs(10)).expect("idle connection closed");
    assert!(after < Duration::from_secs(5), "{after:?}");
    // The connection with an allocation stays.
    std::thread::sleep(Duration::from_secs(1));
    assert!(busy.transact(&binding_request([2; 12])).is_success());
}

#[test]
fn connections_per_address_are_capped() {
    let s = Server::start(Options::new(&format!(
        "{USERS}max-stream-connections-per-ip=3\n"
    )));
    let mut open: Vec<StreamClient<TcpStream>> =
        (0..3).map(|_| StreamClient::tcp(s.udp_addr())).collect();
    for (i, c) in open.iter_mut().enumerate() {
        assert!(c.transact(&binding_request([i as u8; 12])).is_success());
    }
    let extra = TcpStream::connect(s.udp_addr()).unwrap();
    assert!(
        closed_after(extra, Duration::from_secs(5)).is_some(),
        "a fourth connection is closed"
    );
    // Another source address is not affected.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    sock.connect(&s.udp_addr().into()).unwrap();
    let mut other = StreamClient::new(TcpStream::from(sock));
    other
        .stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(other.transact(&binding_request([9; 12])).is_success());
    // Closing one frees its place.
    drop(open.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = StreamClient::tcp(s.udp_addr());
    assert!(again.transact(&binding_request([8; 12])).is_success());
}

#[test]
fn maximum_size_frames_are_handled() {
    let s = Server::start(Options::new(USERS));
    let mut t = StreamClient::tcp(s.udp_addr());
    // ChannelData of the largest length on an unbound channel: dropped.
    let mut cd = vec![0x40, 0x00, 0xFF, 0xFF];
    cd.extend(vec![0xAB; 65535 + 1]);
    t.stream.write_all(&cd).unwrap();
    // A STUN request of the largest length, full of an unknown optional
    // attribute: answered.
    let mut stun = vec![0x00, 0x01, 0xFF, 0xFC, 0x21, 0x12, 0xA4, 0x42];
    stun.extend([5u8; 12]);
    let body = 0xFFFC;
    stun.extend([
        0xC0,
        0x01,
        ((body - 4) >> 8) as u8,
        ((body - 4) & 0xFF) as u8,
    ]);
    stun.extend(vec![0u8; body - 4]);
    let r = t.transact(&stun);
    assert!(r.is_success());
    assert!(t.transact(&binding_request([1; 12])).is_success());
}

#[test]
fn a_client_that_stops_reading_cannot_grow_server_memory() {
    let s = Server::start(Options::new(&format!("{USERS}allow-loopback-peers\n")));
    let tcp = stalled_socket(s.udp_addr());
    stalled_client_is_bounded(s, StreamClient::new(tcp));
}

#[test]
fn a_tls_client_that_stops_reading_cannot_grow_server_memory() {
    let s = Server::start(Options::new(&format!("{USERS}allow-loopback-peers\n")).tls());
    let tcp = stalled_socket(SocketAddr::from(([127, 0, 0, 1], s.tls_port)));
    let tls = tls_over(tcp, &s.dir.path("cert.pem"));
    stalled_client_is_bounded(s, StreamClient::new(tls));
}

/// A connection to `addr` with a small receive buffer, so the kernel holds
/// little on the client's side once it stops reading.
fn stalled_socket(addr: SocketAddr) -> TcpStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    socket2::SockRef::from(&tcp)
        .set_recv_buffer_size(4096)
        .unwrap();
    tcp
}

/// Relays 60 MB from a peer towards `t`, which never reads: the server's
/// memory must stay bounded, other clients served, and the drops logged.
fn stalled_client_is_bounded<S: Read + Write>(mut s: Server, mut t: StreamClient<S>) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let r = t.allocate("alice", "pw");
    let relayed = r.relayed();
    let bind = channel_bind_attrs(0x4000, peer.local_addr().unwrap());
    assert!(
        t.signed(method::CHANNEL_BIND, &bind, "alice", "pw")
            .is_success()
    );
    let before = rss_kib(s.pid());
    let chunk = vec![0x42u8; 1200];
    for _ in 0..50_000 {
        let _ = peer.send_to(&chunk, relayed);
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(s.pid());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Everyone else is still served.
    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate("alice", "pw").is_success());
    drop(t);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.log_text()
            .contains("frames dropped because the client was not reading"),
        "{}",
        s.log_text()
    );
    assert!(s.alive());
}
