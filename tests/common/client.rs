//! Test clients: STUN/TURN over UDP ([`Client`]) and over a TCP or TLS
//! stream ([`StreamClient`]), with requests built and signed by the
//! library's own client-side builder (`turnserver::stun::client`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use turnserver::auth::long_term_key;
use turnserver::stun::client::Credentials;
use turnserver::stun::{self, Class, Message, MessageWriter, attr, method};

/// A request of method `m` with transaction ID `tid`: `attrs`, then
/// XOR-PEER-ADDRESS `peer` if given, then signed for `creds` (user and
/// password) with `realm` and `nonce` if given, then FINGERPRINT if
/// `fingerprint`. Every test client builds its requests here, with the
/// library's client-side builder.
#[allow(clippy::too_many_arguments)]
pub fn build_request(
    m: u16,
    tid: &[u8; 12],
    attrs: &[(u16, Vec<u8>)],
    peer: Option<SocketAddr>,
    creds: Option<(&str, &str)>,
    realm: &str,
    nonce: &[u8],
    fingerprint: bool,
) -> Vec<u8> {
    let key = creds.map(|(user, pw)| long_term_key(user, realm, pw));
    let creds = creds
        .zip(key.as_ref())
        .map(|((username, _), key)| Credentials {
            username,
            realm,
            nonce,
            key,
        });
    let attrs = |w: &mut MessageWriter<'_>| {
        for (t, v) in attrs {
            w.attr(*t, v);
        }
        if let Some(p) = peer {
            w.xor_address(attr::XOR_PEER_ADDRESS, p);
        }
    };
    stun::client::request(m, tid, attrs, creds.as_ref(), fingerprint)
}

/// A Binding request.
pub fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut out = Vec::new();
    MessageWriter::new(&mut out, method::BINDING, Class::Request, &tid).fingerprint();
    out
}

/// A small STUN/TURN client over UDP for protocol-level tests.
pub struct Client {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub realm: String,
    pub nonce: Vec<u8>,
    tid: u8,
}

/// A response: class and error code, with the raw bytes.
pub struct Response {
    pub raw: Vec<u8>,
}

impl Response {
    /// REALM and NONCE of a 401 or 438, to sign the next request with.
    pub fn realm_and_nonce(&self) -> (String, Vec<u8>) {
        let m = self.msg();
        let realm = m.text(attr::REALM).unwrap().unwrap().to_string();
        (realm, m.get(attr::NONCE).unwrap().to_vec())
    }

    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).unwrap()
    }
    pub fn code(&self) -> Option<u16> {
        self.msg()
            .get(attr::ERROR_CODE)
            .map(|v| attr::decode_error_code(v).unwrap().0)
    }
    pub fn is_success(&self) -> bool {
        self.msg().class() == Class::Success
    }
    /// XOR-RELAYED-ADDRESS of an Allocate success (panics without one).
    pub fn relayed(&self) -> SocketAddr {
        self.msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    }
}

impl Client {
    pub fn new(server: SocketAddr) -> Client {
        let local = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        Client::bound(local.parse().unwrap(), server)
    }

    /// A client on a socket bound to `local` (in the namespace of the
    /// calling thread).
    pub fn bound(local: SocketAddr, server: SocketAddr) -> Client {
        let sock = UdpSocket::bind(local).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Client {
            sock,
            server,
            realm: String::new(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid = self.tid.wrapping_add(1);
        let mut t = [self.tid; 12];
        t[0] = 0xA5;
        t
    }

    /// Sends a request and waits for the response with its transaction ID,
    /// retransmitting a few times.
    pub fn transact(&mut self, req: &[u8]) -> Response {
        let tid: [u8; 12] = req[8..20].try_into().unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..6 {
            self.sock.send_to(req, self.server).unwrap();
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if let Ok((n, _)) = self.sock.recv_from(&mut buf)
                    && n >= 20
                    && buf[8..20] == tid
                {
                    return Response {
                        raw: buf[..n].to_vec(),
                    };
                }
            }
        }
        panic!("no response from {}", self.server);
    }

    /// Builds a request: `attrs`, then credentials if given, then
    /// FINGERPRINT.
    pub fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        creds: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let tid = self.next_tid();
        build_request(m, &tid, attrs, None, creds, &self.realm, &self.nonce, true)
    }

    /// An Allocate for UDP with credentials, doing the 401 round trip first.
    pub fn allocate(&mut self, user: &str, pw: &str) -> Response {
        let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        let req = self.request(method::ALLOCATE, &attrs, None);
        let challenge = self.transact(&req);
        assert_eq!(challenge.code(), Some(401), "expected a 401 challenge");
        (self.realm, self.nonce) = challenge.realm_and_nonce();
        let req = self.request(method::ALLOCATE, &attrs, Some((user, pw)));
        self.transact(&req)
    }

    /// A signed request carrying XOR-PEER-ADDRESS `peer` (encoded with the
    /// request's transaction ID, which IPv6 addresses need) after `attrs`.
    pub fn signed_peer(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: SocketAddr,
        user: &str,
        pw: &str,
    ) -> Response {
        let tid = self.next_tid();
        let creds = Some((user, pw));
        let out = build_request(
            m,
            &tid,
            attrs,
            Some(peer),
            creds,
            &self.realm,
            &self.nonce,
            true,
        );
        self.transact(&out)
    }

    /// An Allocate with extra attributes (after a 401 round trip).
    pub fn allocate_with(&mut self, extra: &[(u16, Vec<u8>)], user: &str, pw: &str) -> Response {
        let mut attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        attrs.extend_from_slice(extra);
        let req = self.request(method::ALLOCATE, &attrs, None);
        let challenge = self.transact(&req);
        assert_eq!(challenge.code(), Some(401), "expected a 401 challenge");
        (self.realm, self.nonce) = challenge.realm_and_nonce();
        let req = self.request(method::ALLOCATE, &attrs, Some((user, pw)));
        self.transact(&req)
    }

    /// A signed request on an existing allocation.
    pub fn signed(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], user: &str, pw: &str) -> Response {
        let req = self.request(m, attrs, Some((user, pw)));
        self.transact(&req)
    }

    /// RFC 8016: a client on a new socket (a new 5-tuple) refreshing this
    /// one's allocation with mobility ticket `ticket`; the new client and
    /// the Refresh's response.
    pub fn move_with_ticket(&self, ticket: &[u8], user: &str, pw: &str) -> (Client, Response) {
        let mut next = Client::new(self.server);
        next.realm = self.realm.clone();
        next.nonce = self.nonce.clone();
        let r = next.signed(
            method::REFRESH,
            &[(attr::MOBILITY_TICKET, ticket.to_vec())],
            user,
            pw,
        );
        (next, r)
    }

    /// Deletes the allocation: a signed Refresh with LIFETIME 0 (RFC 8656
    /// §7.3).
    pub fn delete(&mut self, user: &str, pw: &str) -> Response {
        self.signed(
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 0, 0])],
            user,
            pw,
        )
    }
}

/// Sends `datagrams` (all of one size but the last, which may be shorter)
/// to `to` as one UDP GSO send, as a sender that batches does: a receiver
/// with UDP_GRO on gets them in one receive, any other one by one.
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let segment = datagrams[0].len() as u16;
    let iov: Vec<std::io::IoSlice<'_>> =
        datagrams.iter().map(|d| std::io::IoSlice::new(d)).collect();
    let addr = SockaddrStorage::from(to);
    let n = sendmsg(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        Some(&addr),
    )
    .expect("GSO send");
    assert_eq!(n, datagrams.iter().map(Vec::len).sum::<usize>());
}

/// The attributes of a ChannelBind of channel `number` to `peer`.
pub fn channel_bind_attrs(number: u16, peer: SocketAddr) -> Vec<(u16, Vec<u8>)> {
    vec![
        (
            attr::CHANNEL_NUMBER,
            vec![(number >> 8) as u8, number as u8, 0, 0],
        ),
        (attr::XOR_PEER_ADDRESS, xor_peer(peer, &[0; 12])),
    ]
}

/// A ChannelData message on channel `number` carrying `payload`, unpadded
/// (as over UDP).
pub fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(number >> 8) as u8, number as u8, (n >> 8) as u8, n as u8];
    f.extend_from_slice(payload);
    f
}

/// A packetised video frame: 24 datagrams, 23 of 1100 bytes and a last of
/// 77, the i-th filled with `i`.
pub fn frame_burst() -> Vec<Vec<u8>> {
    (0..24)
        .map(|i| vec![i as u8; if i == 23 { 77 } else { 1100 }])
        .collect()
}

/// Sends each of `datagrams` to `to` as a datagram of its own.
pub fn send_each(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    for d in datagrams {
        sock.send_to(d, to).unwrap();
    }
}

/// Reads `datagrams.len()` messages from a UDP client's socket and checks
/// that each carries the next of `datagrams`, whole and in order: as
/// unpadded ChannelData on `channel`, or as a Data indication with `None`.
pub fn expect_relayed(sock: &UdpSocket, datagrams: &[Vec<u8>], channel: Option<u16>) {
    let mut buf = vec![0u8; 65536];
    for (i, d) in datagrams.iter().enumerate() {
        let got = sock.recv(&mut buf).unwrap();
        let payload = match channel {
            Some(number) => {
                let n = d.len();
                assert_eq!(
                    &buf[..4],
                    &[(number >> 8) as u8, number as u8, (n >> 8) as u8, n as u8],
                    "datagram {i}"
                );
                assert_eq!(got, 4 + n, "datagram {i}");
                &buf[4..got]
            }
            None => {
                let m = Message::parse(&buf[..got]).unwrap();
                assert_eq!(m.method(), method::DATA, "datagram {i}");
                m.get(attr::DATA).unwrap()
            }
        };
        assert_eq!(payload, &d[..], "datagram {i} (channel {channel:?})");
    }
}

/// An XOR-PEER-ADDRESS attribute value for `peer` in a message with `tid`.
pub fn xor_peer(peer: SocketAddr, tid: &[u8; 12]) -> Vec<u8> {
    let x = attr::xor_address(peer, tid);
    let mut v = [0u8; 20];
    let n = turnserver::stun::encode_address(&mut v, x);
    v[..n].to_vec()
}

/// Connects over TCP, sends `bytes` and reads one STUN frame back.
pub fn tcp_transact(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut hdr = [0u8; 20];
    s.read_exact(&mut hdr).unwrap();
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let mut all = hdr.to_vec();
    all.extend(body);
    all
}

/// A STUN/TURN client over a byte stream (TCP or TLS).
pub struct StreamClient<S: Read + Write> {
    pub stream: S,
    pub realm: String,
    pub nonce: Vec<u8>,
    tid: u8,
}

impl StreamClient<TcpStream> {
    pub fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        StreamClient::new(s)
    }
}

/// A TLS stream trusting only `cert` (PEM).
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects with TLS to `addr`, verifying the server against `cert` for
/// the name `localhost`.
pub fn tls_connect(addr: SocketAddr, cert: &Path) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tls_over(tcp, cert)
}

/// A TLS client on `sock` (already connected), verifying the server
/// against `cert` for the name `localhost`.
pub fn tls_over<S: Read + Write>(
    sock: S,
    cert: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, S> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// One frame read from a stream.
pub enum Frame {
    Stun(Vec<u8>),
    /// Channel number and payload (padding removed).
    ChannelData(u16, Vec<u8>),
}

impl<S: Read + Write> StreamClient<S> {
    pub fn new(stream: S) -> Self {
        StreamClient {
            stream,
            realm: String::new(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    pub fn read_frame(&mut self) -> std::io::Result<Frame> {
        let mut hdr = [0u8; 4];
        self.stream.read_exact(&mut hdr)?;
        let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        if hdr[0] >> 6 == 1 {
            let mut body = vec![0u8; (len + 3) & !3];
            self.stream.read_exact(&mut body)?;
            body.truncate(len);
            return Ok(Frame::ChannelData(
                u16::from_be_bytes([hdr[0], hdr[1]]),
                body,
            ));
        }
        let mut rest = vec![0u8; 16 + len];
        self.stream.read_exact(&mut rest)?;
        let mut all = hdr.to_vec();
        all.extend(rest);
        Ok(Frame::Stun(all))
    }

    pub fn transact(&mut self, req: &[u8]) -> Response {
        self.stream.write_all(req).unwrap();
        self.stream.flush().unwrap();
        loop {
            if let Frame::Stun(raw) = self.read_frame().unwrap()
                && raw[8..20] == req[8..20]
            {
                return Response { raw };
            }
        }
    }

    pub fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        creds: Option<(&str, &str)>,
    ) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let tid = [self.tid; 12];
        build_request(m, &tid, attrs, None, creds, &self.realm, &self.nonce, false)
    }

    pub fn allocate(&mut self, user: &str, pw: &str) -> Response {
        let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        let req = self.request(method::ALLOCATE, &attrs, None);
        let challenge = self.transact(&req);
        assert_eq!(challenge.code(), Some(401));
        (self.realm, self.nonce) = challenge.realm_and_nonce();
        let req = self.request(method::ALLOCATE, &attrs, Some((user, pw)));
        self.transact(&req)
    }

    pub fn signed(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], user: &str, pw: &str) -> Response {
        let req = self.request(m, attrs, Some((user, pw)));
        self.transact(&req)
    }
}
