//! TURN over DTLS on the TLS port over UDP, against the real binary, with
//! OpenSSL's `s_client -dtls1_2` as the DTLS client (an implementation
//! independent of the server's) carrying our STUN messages: Binding, the
//! 401 round trip and Allocate, a permission, Send and Data indications,
//! and a channel both ways with a UDP peer. Then `no-dtls`, and an RSA key
//! (which the DTLS library cannot sign with) leaving TLS on and DTLS off.
//!
//! coturn's `turnutils_uclient -S` over UDP relays without loss too. It
//! starts most connections with a DTLS 1.0 ClientHello, which is refused
//! (RFC 8996) with a protocol_version alert, as coturn 4.6.1's OpenSSL
//! does; it then tries again with DTLS 1.2.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::client::{Response, build_request};
use common::uclient::run_uclient;
use common::{Options, Server, require_tool};
use turnserver::stun::{Message, attr, method};

const USERS: &str = "lt-cred-mech\nrealm=example.org\nuser=alice:pw\nallow-loopback-peers\n";

/// A DTLS client: `openssl s_client -dtls1_2`, fed messages on stdin and
/// read on stdout.
struct DtlsClient {
    child: Child,
    stdin: ChildStdin,
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
    realm: String,
    nonce: Vec<u8>,
    tid: u8,
}

impl Drop for DtlsClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DtlsClient {
    fn connect(addr: SocketAddr) -> DtlsClient {
        let openssl = require_tool("openssl", "apt-get install openssl");
        let mut child = Command::new(openssl)
            .args([
                "s_client",
                "-dtls1_2",
                "-quiet",
                "-connect",
                &addr.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_client");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        DtlsClient {
            child,
            stdin,
            rx,
            pending: Vec::new(),
            realm: String::new(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin.write_all(bytes).unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next whole frame (STUN message or ChannelData) from the server.
    fn frame(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.pending.len() >= 4 {
                let len = usize::from(u16::from_be_bytes([self.pending[2], self.pending[3]]));
                let whole = if self.pending[0] >> 6 == 1 {
                    4 + len
                } else {
                    20 + len
                };
                if self.pending.len() >= whole {
                    return self.pending.drain(..whole).collect();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = self
                .rx
                .recv_timeout(left)
                .expect("a frame from the server over DTLS");
            self.pending.extend(chunk);
        }
    }

    fn transact(&mut self, req: &[u8]) -> Response {
        self.send(req);
        loop {
            let raw = self.frame();
            if raw[0] >> 6 == 0 && raw[8..20] == req[8..20] {
                return Response { raw };
            }
        }
    }

    /// A request signed once the 401 told realm and nonce.
    fn signed(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], peer: Option<SocketAddr>) -> Response {
        self.tid += 1;
        let tid = [self.tid; 12];
        if self.nonce.is_empty() {
            let req = build_request(m, &tid, attrs, peer, None, "", &[], false);
            let challenge = self.transact(&req);
            assert_eq!(challenge.code(), Some(401));
            (self.realm, self.nonce) = challenge.realm_and_nonce();
            self.tid += 1;
        }
        let tid = [self.tid; 12];
        let req = build_request(
            m,
            &tid,
            attrs,
            peer,
            Some(("alice", "pw")),
            &self.realm.clone(),
            &self.nonce.clone(),
            false,
        );
        self.transact(&req)
    }
}

#[test]
fn turn_over_dtls_binds_allocates_and_relays() {
    let s = Server::start(Options::new(USERS).tls());
    let dtls: SocketAddr = ([127, 0, 0, 1], s.tls_port).into();
    let mut c = DtlsClient::connect(dtls);
    let binding = c.transact(&common::client::binding_request([7; 12]));
    let mapped = binding
        .msg()
        .xor_address(attr::XOR_MAPPED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(mapped.ip(), dtls.ip());

    let r = c.signed(
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        None,
    );
    assert!(r.is_success(), "{:?}\n{}", r.code(), s.log_text());
    let relayed = r.relayed();
    assert!(
        s.log_text()
            .contains(&format!("allocation created five_tuple=dtls {mapped}->")),
        "{}",
        s.log_text()
    );
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let perm = c.signed(method::CREATE_PERMISSION, &[], Some(peer_addr));
    assert!(perm.is_success(), "{:?}", perm.code());
    let mut buf = [0u8; 1500];
    // Peer -> client: a Data indication, encrypted.
    peer.send_to(b"over dtls", relayed).unwrap();
    let data = c.frame();
    let m = Message::parse(&data).unwrap();
    assert_eq!(m.method(), method::DATA);
    assert_eq!(m.get(attr::DATA), Some(&b"over dtls"[..]));
    // A channel, both ways.
    let bind = c.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
        Some(peer_addr),
    );
    assert!(bind.is_success(), "{:?}", bind.code());
    c.send(&[0x40, 0x01, 0, 4, b'p', b'i', b'n', b'g']);
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"ping"[..], relayed));
    peer.send_to(b"pong", relayed).unwrap();
    assert_eq!(c.frame(), [0x40, 0x01, 0, 4, b'p', b'o', b'n', b'g']);
}

#[test]
fn no_dtls_and_rsa_keys_leave_dtls_off() {
    let s = Server::start(Options::new(&format!("{USERS}no-dtls\n")).tls());
    assert!(
        !s.log_text().contains("listening on dtls"),
        "{}",
        s.log_text()
    );

    // An RSA certificate: TLS stays, DTLS is off, and the log says why.
    let dir = common::TempDir::new("rsa");
    let (cert, key) = (dir.path("rsa.pem"), dir.path("rsa.key"));
    let ok = Command::new(require_tool("openssl", "apt-get install openssl"))
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl req");
    // The harness's own certificate comes first; these lines replace it.
    let s = Server::start(
        Options::new(&format!(
            "{USERS}cert={}\npkey={}\n",
            cert.display(),
            key.display()
        ))
        .tls(),
    );
    let log = s.log_text();
    assert!(log.contains("DTLS is off"), "{log}");
    assert!(log.contains("listening on tls"), "{log}");
    assert!(!log.contains("listening on dtls"), "{log}");
}

#[test]
fn coturn_uclient_relays_over_dtls() {
    let s = Server::start(Options::new(USERS).tls());
    let p = s.tls_port.to_string();
    let out = run_uclient(
        &[
            "-S", "-y", "-n", "20", "-m", "2", "-l", "120", "-u", "alice", "-w", "pw", "-p", &p,
        ],
        "127.0.0.1",
        40,
        &|| s.log_text(),
    );
    assert!(out.contains("method=DTLSv1.2"), "{out}");
}
