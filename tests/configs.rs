//! The configurations shipped in `config/` run as documented: each starts
//! the real binary (only ports are overridden) and a client relays through
//! it with the credentials the file names.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    Client, Server, StreamClient, TempDir, channel_bind_attrs, free_ports, relay_range,
    tls_connect, write_test_cert,
};
use turnserver::auth::rest_password;
use turnserver::stun::method;

fn start(config: &str, extra: &[String]) -> Server {
    let dir = TempDir::new("shipped");
    let base = free_ports(2);
    let (min, max) = relay_range(100);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(config);
    let mut args = vec![
        "-c".to_string(),
        path.display().to_string(),
        "-p".to_string(),
        base.to_string(),
        format!("--tls-listening-port={}", base + 1),
        format!("--min-port={min}"),
        format!("--max-port={max}"),
    ];
    args.extend_from_slice(extra);
    Server::launch(args, base, base + 1, dir)
}

/// Allocates, binds a channel to a local peer and relays both ways.
fn relay_through(s: &Server, user: &str, pw: &str) {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let peer_addr: SocketAddr = peer.local_addr().unwrap();
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate(user, pw);
    assert!(r.is_success(), "{:?}\n{}", r.code(), s.log_text());
    let relayed = r.relayed();
    let bind = channel_bind_attrs(0x4010, peer_addr);
    assert!(c.signed(method::CHANNEL_BIND, &bind, user, pw).is_success());
    c.sock
        .send_to(&[0x40, 0x10, 0, 3, b'a', b'b', b'c', 0], s.udp_addr())
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"abc"[..], relayed));
    peer.send_to(b"xyz", relayed).unwrap();
    let (n, _) = c.sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &[0x40, 0x10, 0, 3, b'x', b'y', b'z']);
}

#[test]
fn demo_config() {
    let s = start("demo.conf", &[]);
    relay_through(&s, "demo", "demo-password");
    assert_eq!(
        Client::new(s.udp_addr()).allocate("demo", "wrong").code(),
        Some(401)
    );
}

#[test]
fn rest_api_config() {
    let s = start("rest-api.conf", &[]);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = format!("{}:alice", now + 86400);
    relay_through(
        &s,
        &user,
        &rest_password(b"replace-with-a-long-random-secret", &user),
    );
}

#[test]
fn tls_config_with_a_certificate_made_at_test_time() {
    let certs = TempDir::new("shipped-cert");
    let (cert, key) = write_test_cert(&certs);
    let s = start(
        "tls.conf",
        &[
            format!("--cert={}", cert.display()),
            format!("--pkey={}", key.display()),
        ],
    );
    relay_through(&s, "demo", "demo-password");
    let mut tls = StreamClient::new(tls_connect(
        SocketAddr::from(([127, 0, 0, 1], s.tls_port)),
        &cert,
    ));
    let r = tls.allocate("demo", "demo-password");
    assert!(r.is_success(), "{:?}", r.code());
}
