//! RFC 8489 §9.2 long-term credentials (MESSAGE-INTEGRITY-SHA256, the
//! PASSWORD-ALGORITHMS / PASSWORD-ALGORITHM negotiation behind the
//! "obMatJos2" nonce cookie, USERHASH) of the real binary over loopback UDP,
//! driven by an independent client: librice's sans-IO `turn-client-proto`
//! (with `stun-proto` / `stun-types`). This file owns the client's socket
//! and pumps its datagrams; it logs every STUN message both ways so that the
//! wire format is checked by hand-written parsing here, not only by the
//! client's acceptance of it. The exchange is printed when a test fails, or
//! always with `RFC8489_TRANSCRIPT=1` (and `--nocapture`).
//!
//! Covered: SHA-256 chosen from a `SHA-256,MD5` offer, with every
//! authenticated request (Allocate, CreatePermission, ChannelBind, Refresh)
//! signed with MESSAGE-INTEGRITY-SHA256 and every success response verified
//! with the SHA-256 key, relaying both ways with Send/Data and ChannelData;
//! an MD5-only offer (`password-algorithms=md5`) falling back to
//! MESSAGE-INTEGRITY; USERHASH instead of USERNAME; and TURN REST API
//! credentials (`use-auth-secret`) with SHA-256.

mod common;

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant as StdInstant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Options, Server};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use stun_proto::Instant;
use stun_proto::agent::Transmit;
use stun_proto::auth::Feature;
use stun_types::message::IntegrityAlgorithm;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

const USERS: &str = "lt-cred-mech\nrealm=example.org\nuser=alice:alicepw\nallow-loopback-peers\n";
const REALM: &str = "example.org";

/// How long any one step (a transaction, a relayed datagram) may take.
const STEP: Duration = Duration::from_secs(5);

// STUN/TURN numbers from RFC 8489 and RFC 8656, written out here rather than
// taken from either implementation.
const ALLOCATE: u16 = 0x003;
const REFRESH: u16 = 0x004;
const CREATE_PERMISSION: u16 = 0x008;
const CHANNEL_BIND: u16 = 0x009;
const CLASS_REQUEST: u8 = 0;
const CLASS_SUCCESS: u8 = 2;
const CLASS_ERROR: u8 = 3;
const USERNAME: u16 = 0x0006;
const MESSAGE_INTEGRITY: u16 = 0x0008;
const ERROR_CODE: u16 = 0x0009;
const REALM_ATTR: u16 = 0x0014;
const NONCE: u16 = 0x0015;
const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const PASSWORD_ALGORITHM: u16 = 0x001D;
const USERHASH: u16 = 0x001E;
const PASSWORD_ALGORITHMS: u16 = 0x8002;
const ALGO_MD5: u16 = 0x0001;
const ALGO_SHA256: u16 = 0x0002;
/// RFC 8489 §9.2: a nonce starting with this carries the security feature
/// bits in the next four base64 characters.
const NONCE_COOKIE: &str = "obMatJos2";
/// First security feature byte: Password algorithms, Username anonymity.
const FEATURE_PASSWORD_ALGORITHMS: u8 = 0x80;
const FEATURE_USERNAME_ANONYMITY: u8 = 0x40;

// ---------------------------------------------------------------------------
// Hand-written STUN parsing of the logged datagrams.

/// A STUN message from the log: method, class and attributes in order.
#[derive(Clone)]
struct Stun {
    raw: Vec<u8>,
    method: u16,
    class: u8,
    attrs: Vec<(u16, usize, Vec<u8>)>,
}

impl Stun {
    /// Parses a datagram as STUN, or `None` (ChannelData, garbage).
    fn parse(raw: &[u8]) -> Option<Stun> {
        if raw.len() < 20 || raw[0] & 0xC0 != 0 || raw[4..8] != [0x21, 0x12, 0xA4, 0x42] {
            return None;
        }
        let t = u16::from_be_bytes([raw[0], raw[1]]);
        let len = usize::from(u16::from_be_bytes([raw[2], raw[3]]));
        if raw.len() != 20 + len {
            return None;
        }
        let method = (t & 0x000F) | ((t & 0x00E0) >> 1) | ((t & 0x3E00) >> 2);
        let class = (((t >> 7) & 2) | ((t >> 4) & 1)) as u8;
        let mut attrs = Vec::new();
        let mut off = 20;
        while off + 4 <= raw.len() {
            let ty = u16::from_be_bytes([raw[off], raw[off + 1]]);
            let n = usize::from(u16::from_be_bytes([raw[off + 2], raw[off + 3]]));
            let value = raw.get(off + 4..off + 4 + n)?.to_vec();
            attrs.push((ty, off, value));
            off += 4 + n.div_ceil(4) * 4;
        }
        Some(Stun {
            raw: raw.to_vec(),
            method,
            class,
            attrs,
        })
    }

    fn get(&self, ty: u16) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(t, _, _)| *t == ty)
            .map(|(_, _, v)| &v[..])
    }

    fn has(&self, ty: u16) -> bool {
        self.get(ty).is_some()
    }

    fn text(&self, ty: u16) -> Option<String> {
        self.get(ty)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    fn error_code(&self) -> Option<u16> {
        self.get(ERROR_CODE)
            .filter(|v| v.len() >= 4)
            .map(|v| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
    }

    /// PASSWORD-ALGORITHMS as (algorithm, parameters) pairs.
    fn password_algorithms(&self) -> Option<Vec<(u16, Vec<u8>)>> {
        let v = self.get(PASSWORD_ALGORITHMS)?;
        let mut out = Vec::new();
        let mut off = 0;
        while off + 4 <= v.len() {
            let algo = u16::from_be_bytes([v[off], v[off + 1]]);
            let n = usize::from(u16::from_be_bytes([v[off + 2], v[off + 3]]));
            out.push((algo, v.get(off + 4..off + 4 + n)?.to_vec()));
            off += 4 + n.div_ceil(4) * 4;
        }
        Some(out)
    }

    /// PASSWORD-ALGORITHM as (algorithm, parameters).
    fn password_algorithm(&self) -> Option<(u16, Vec<u8>)> {
        let v = self.get(PASSWORD_ALGORITHM)?;
        assert!(
            v.len() >= 4,
            "short PASSWORD-ALGORITHM in {}",
            self.describe()
        );
        let n = usize::from(u16::from_be_bytes([v[2], v[3]]));
        Some((u16::from_be_bytes([v[0], v[1]]), v[4..4 + n].to_vec()))
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 with the RFC 8489 §14.6 procedure:
    /// HMAC-SHA256 over the message up to the attribute, with the header
    /// length covering it.
    fn sha256_integrity_ok(&self, key: &[u8]) -> bool {
        let Some((_, off, value)) = self
            .attrs
            .iter()
            .find(|(t, _, _)| *t == MESSAGE_INTEGRITY_SHA256)
        else {
            return false;
        };
        let mut prefix = self.raw[..*off].to_vec();
        let len = (*off - 20 + 4 + value.len()) as u16;
        prefix[2..4].copy_from_slice(&len.to_be_bytes());
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap();
        mac.update(&prefix);
        let full = mac.finalize().into_bytes();
        value.len() >= 16 && full[..value.len()] == value[..]
    }

    fn describe(&self) -> String {
        let method = match self.method {
            ALLOCATE => "Allocate".to_string(),
            REFRESH => "Refresh".to_string(),
            0x006 => "Send".to_string(),
            0x007 => "Data".to_string(),
            CREATE_PERMISSION => "CreatePermission".to_string(),
            CHANNEL_BIND => "ChannelBind".to_string(),
            m => format!("method {m:#x}"),
        };
        let class = ["request", "indication", "success", "error"][usize::from(self.class)];
        let attrs: Vec<String> = self
            .attrs
            .iter()
            .map(|(t, _, v)| match *t {
                USERNAME => format!("USERNAME={:?}", String::from_utf8_lossy(v)),
                MESSAGE_INTEGRITY => "MESSAGE-INTEGRITY".to_string(),
                ERROR_CODE => format!("ERROR-CODE={}", self.error_code().unwrap_or(0)),
                REALM_ATTR => format!("REALM={:?}", String::from_utf8_lossy(v)),
                NONCE => format!("NONCE={:?}", String::from_utf8_lossy(v)),
                MESSAGE_INTEGRITY_SHA256 => format!("MESSAGE-INTEGRITY-SHA256({})", v.len()),
                PASSWORD_ALGORITHM => format!("PASSWORD-ALGORITHM={:02x?}", v),
                USERHASH => "USERHASH".to_string(),
                PASSWORD_ALGORITHMS => format!("PASSWORD-ALGORITHMS={:02x?}", v),
                0x8028 => "FINGERPRINT".to_string(),
                t => format!("{t:#06x}"),
            })
            .collect();
        format!("{method} {class} [{}]", attrs.join(", "))
    }
}

/// The security feature bits of an RFC 8489 nonce, or `None` without the
/// cookie.
fn nonce_features(nonce: &str) -> Option<[u8; 3]> {
    let rest = nonce.strip_prefix(NONCE_COOKIE)?;
    let bytes = BASE64.decode(rest.get(..4)?).ok()?;
    bytes.try_into().ok()
}

/// The RFC 8489 §9.2.2 SHA-256 long-term key.
fn sha256_key(username: &str, password: &str) -> Vec<u8> {
    Sha256::digest(format!("{username}:{REALM}:{password}")).to_vec()
}

/// The RFC 8489 §14.4 USERHASH of `username`.
fn userhash(username: &str) -> Vec<u8> {
    Sha256::digest(format!("{username}:{REALM}")).to_vec()
}

/// The TURN REST API password: base64(HMAC-SHA1(secret, username)).
fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    BASE64.encode(mac.finalize().into_bytes())
}

// ---------------------------------------------------------------------------
// The librice client on a real socket.

/// Which way a logged datagram went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToServer,
    FromServer,
}

/// A `TurnClientUdp` bound to its own loopback socket, pumped by hand.
struct Turn {
    sock: UdpSocket,
    local: SocketAddr,
    server: SocketAddr,
    client: TurnClientUdp,
    base: StdInstant,
    /// Every datagram between the client and the server, in order.
    log: Vec<(Dir, Vec<u8>)>,
    events: VecDeque<TurnEvent>,
    peer_data: VecDeque<(SocketAddr, Vec<u8>)>,
    closed: bool,
}

impl Turn {
    /// A client for `server` with long-term credentials; `tune` adjusts the
    /// configuration (integrity algorithms, anonymous usernames).
    fn new(
        server: SocketAddr,
        username: &str,
        password: &str,
        tune: impl FnOnce(&mut TurnConfig),
    ) -> Turn {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = sock.local_addr().unwrap();
        let mut config = TurnConfig::new(TurnCredentials::new(username, password));
        tune(&mut config);
        Turn {
            client: TurnClientUdp::allocate(local, server, config),
            sock,
            local,
            server,
            base: StdInstant::now(),
            log: Vec::new(),
            events: VecDeque::new(),
            peer_data: VecDeque::new(),
            closed: false,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_std(self.base)
    }

    fn send(&mut self, data: &[u8], to: SocketAddr) {
        assert_eq!(to, self.server, "the client sends only to the server");
        self.log.push((Dir::ToServer, data.to_vec()));
        self.sock.send_to(data, to).unwrap();
    }

    /// One round: lets the client time out what it must, sends what it has
    /// queued, collects its events, then waits for one datagram from the
    /// server until the client's next timer or `deadline`.
    fn pump(&mut self, deadline: StdInstant) {
        let wake = match self.client.poll(self.now()) {
            TurnPollRet::WaitUntil(t) => t.to_std(self.base).min(deadline),
            TurnPollRet::Closed => {
                self.closed = true;
                deadline
            }
            other => panic!("unexpected poll result for a UDP allocation: {other:?}"),
        };
        while let Some(t) = self.client.poll_transmit(self.now()) {
            let data = t.data.as_ref().to_vec();
            self.send(&data, t.to);
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push_back(e);
        }
        if !self.events.is_empty() {
            return;
        }
        let wait = wake
            .saturating_duration_since(StdInstant::now())
            .max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 2048];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let data = &buf[..n];
                self.log.push((Dir::FromServer, data.to_vec()));
                let ret = self.client.recv(
                    Transmit::new(data, TransportType::Udp, from, self.local),
                    self.now(),
                );
                if let TurnRecvRet::PeerData(d) = ret {
                    self.peer_data.push_back((d.peer, d.data().to_vec()));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("recv from the server: {e}"),
        }
    }

    /// Pumps until `f` yields, for at most [`STEP`]; a failure event from
    /// the client or the time limit fail the test (and `Drop` prints the
    /// STUN exchange so far).
    fn wait<T>(&mut self, what: &str, mut f: impl FnMut(&mut Turn) -> Option<T>) -> T {
        let deadline = StdInstant::now() + STEP;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Some(e) = self.events.iter().find(|e| {
                matches!(
                    e,
                    TurnEvent::AllocationCreateFailed(_)
                        | TurnEvent::PermissionCreateFailed(..)
                        | TurnEvent::ChannelCreateFailed(..)
                )
            }) {
                panic!("{what}: the client reports {e:?}");
            }
            assert!(
                StdInstant::now() < deadline,
                "{what}: nothing after {STEP:?} (client closed: {})",
                self.closed
            );
            self.pump(deadline);
        }
    }

    /// Waits for the first pending event that `f` picks.
    fn wait_event<T>(&mut self, what: &str, mut f: impl FnMut(&TurnEvent) -> Option<T>) -> T {
        self.wait(what, |t| {
            let i = t.events.iter().position(|e| f(e).is_some())?;
            f(&t.events.remove(i).unwrap())
        })
    }

    /// Runs the client's Allocate (with its 401 round) to completion and
    /// returns the relayed address.
    fn allocate(&mut self) -> SocketAddr {
        self.wait_event("allocating", |e| match e {
            TurnEvent::AllocationCreated(TransportType::Udp, relayed) => Some(*relayed),
            _ => None,
        })
    }

    fn create_permission(&mut self, peer: SocketAddr) {
        let now = self.now();
        self.client
            .create_permission(TransportType::Udp, peer.ip(), now)
            .unwrap();
        self.wait_event("creating a permission", |e| {
            matches!(e, TurnEvent::PermissionCreated(TransportType::Udp, ip) if *ip == peer.ip())
                .then_some(())
        });
    }

    fn bind_channel(&mut self, peer: SocketAddr) {
        let now = self.now();
        self.client
            .bind_channel(TransportType::Udp, peer, now)
            .unwrap();
        self.wait_event("binding a channel", |e| {
            matches!(e, TurnEvent::ChannelCreated(TransportType::Udp, a) if *a == peer)
                .then_some(())
        });
    }

    /// Sends `data` to `peer` through the relay, as the client frames it
    /// (Send indication, or ChannelData once a channel is bound); returns
    /// the datagram put on the wire.
    fn send_to_peer(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<u8> {
        let now = self.now();
        let t = self
            .client
            .send_to(TransportType::Udp, peer, data.to_vec(), now)
            .unwrap()
            .expect("a UDP client always has something to send")
            .build();
        self.send(&t.data, t.to);
        t.data
    }

    /// Waits for data relayed from a peer.
    fn recv_from_peer(&mut self) -> (SocketAddr, Vec<u8>) {
        self.wait("receiving relayed data", |t| t.peer_data.pop_front())
    }

    /// Deletes the allocation (Refresh with LIFETIME 0) and waits for the
    /// server's success response.
    fn delete(&mut self) {
        let now = self.now();
        self.client.delete(now).unwrap();
        let before = self.log.len();
        self.wait("deleting the allocation", |t| {
            t.log[before..].iter().find_map(|(d, raw)| {
                let m = Stun::parse(raw).filter(|_| *d == Dir::FromServer)?;
                (m.method == REFRESH && m.class == CLASS_SUCCESS).then_some(())
            })
        });
    }

    fn messages(&self, dir: Dir) -> impl Iterator<Item = Stun> + '_ {
        self.log
            .iter()
            .filter(move |(d, _)| *d == dir)
            .filter_map(|(_, raw)| Stun::parse(raw))
    }

    /// The server's first 401 to an Allocate: the challenge.
    fn challenge(&self) -> Stun {
        self.messages(Dir::FromServer)
            .find(|m| m.method == ALLOCATE && m.class == CLASS_ERROR && m.error_code() == Some(401))
            .expect("a 401 to the first Allocate")
    }

    /// The client's requests that carry credentials (a NONCE).
    fn signed_requests(&self) -> Vec<Stun> {
        self.messages(Dir::ToServer)
            .filter(|m| m.class == CLASS_REQUEST && m.has(NONCE))
            .collect()
    }

    /// The server's success responses.
    fn successes(&self) -> Vec<Stun> {
        self.messages(Dir::FromServer)
            .filter(|m| m.class == CLASS_SUCCESS)
            .collect()
    }

    /// The STUN exchange so far, one message a line.
    fn transcript(&self) -> String {
        let mut s = String::from("STUN exchange (-> to the server, <- from it):\n");
        for (d, raw) in &self.log {
            let arrow = if *d == Dir::ToServer { "->" } else { "<-" };
            match Stun::parse(raw) {
                Some(m) => s.push_str(&format!("  {arrow} {}\n", m.describe())),
                None => s.push_str(&format!("  {arrow} {} bytes of non-STUN\n", raw.len())),
            }
        }
        s
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("RFC8489_TRANSCRIPT").is_some() {
            eprintln!("---- {}", self.transcript());
        }
    }
}

/// A peer on loopback that fails rather than hangs.
fn peer_socket() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

/// Relays one datagram each way between the client and `peer`, checking
/// payloads and addresses; returns the client's and the server's framing.
fn round_trip(
    t: &mut Turn,
    peer: &UdpSocket,
    relayed: SocketAddr,
    out: &[u8],
    back: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let peer_addr = peer.local_addr().unwrap();
    let sent = t.send_to_peer(peer_addr, out);
    let mut buf = [0u8; 2048];
    let (n, from) = peer
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("the peer got nothing: {e}"));
    assert_eq!((&buf[..n], from), (out, relayed), "client -> peer");
    let before = t.log.len();
    peer.send_to(back, relayed).unwrap();
    let (from, data) = t.recv_from_peer();
    assert_eq!((&data[..], from), (back, peer_addr), "peer -> client");
    let framing = t.log[before..]
        .iter()
        .rev()
        .find(|(d, _)| *d == Dir::FromServer)
        .map(|(_, raw)| raw.clone())
        .unwrap();
    (sent, framing)
}

/// Whether a datagram is ChannelData (first two bits 01).
fn is_channel_data(raw: &[u8]) -> bool {
    raw.first().is_some_and(|b| b & 0xC0 == 0x40)
}

/// A client that supports both integrity algorithms, SHA-256 first; the
/// server's PASSWORD-ALGORITHMS order decides (the crate's default is
/// SHA-1/MD5 only).
fn sha256_and_md5(c: &mut TurnConfig) {
    c.set_supported_integrity(IntegrityAlgorithm::Sha256);
    c.add_supported_integrity(IntegrityAlgorithm::Sha1);
}

/// The checks of the 401 challenge of a server offering `algorithms`: the
/// RFC 8489 nonce cookie with the Password algorithms bit, and the offer.
fn check_challenge(t: &Turn, algorithms: &[u16]) -> [u8; 3] {
    let c = t.challenge();
    let nonce = c.text(NONCE).expect("NONCE in the 401");
    let features = nonce_features(&nonce).unwrap_or_else(|| {
        panic!(
            "the 401's NONCE {nonce:?} lacks the RFC 8489 cookie {NONCE_COOKIE:?} and four base64 \
             characters of security features, so the client falls back to RFC 5389 MD5/SHA-1",
        )
    });
    assert_ne!(
        features[0] & FEATURE_PASSWORD_ALGORITHMS,
        0,
        "Password algorithms bit in {nonce:?}",
    );
    assert_eq!(c.text(REALM_ATTR).as_deref(), Some(REALM));
    let offer: Vec<(u16, Vec<u8>)> = algorithms.iter().map(|a| (*a, Vec::new())).collect();
    assert_eq!(
        c.password_algorithms(),
        Some(offer),
        "PASSWORD-ALGORITHMS in the 401",
    );
    features
}

/// Every request the client signed used `algorithm`: PASSWORD-ALGORITHM
/// with it, PASSWORD-ALGORITHMS echoing the 401, and only the matching
/// integrity attribute. Returns the methods seen.
fn check_signed_requests(t: &Turn, algorithm: u16) -> Vec<u16> {
    let offered = t.challenge().password_algorithms();
    let requests = t.signed_requests();
    assert!(!requests.is_empty(), "no signed request");
    for r in &requests {
        let what = r.describe();
        assert_eq!(
            r.password_algorithm(),
            Some((algorithm, Vec::new())),
            "PASSWORD-ALGORITHM of {what}"
        );
        assert_eq!(
            r.password_algorithms(),
            offered,
            "PASSWORD-ALGORITHMS echoed in {what}"
        );
        let (want, not) = if algorithm == ALGO_SHA256 {
            (MESSAGE_INTEGRITY_SHA256, MESSAGE_INTEGRITY)
        } else {
            (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256)
        };
        assert!(r.has(want) && !r.has(not), "integrity of {what}");
        let want_len = if algorithm == ALGO_SHA256 { 32 } else { 20 };
        assert_eq!(r.get(want).map(<[u8]>::len), Some(want_len), "{what}");
        assert_eq!(r.text(REALM_ATTR).as_deref(), Some(REALM), "{what}");
    }
    let mut methods: Vec<u16> = requests.iter().map(|r| r.method).collect();
    methods.dedup();
    methods
}

#[test]
fn sha256_password_algorithm_allocates_and_relays() {
    let s = Server::start(Options::new(USERS));
    // USERNAME here (USERHASH has its own test): the crate's default, Auto,
    // would send USERHASH whenever the nonce offers Username anonymity.
    let mut t = Turn::new(s.udp_addr(), "alice", "alicepw", |c| {
        sha256_and_md5(c);
        c.set_anonymous_username(Feature::Disabled);
    });
    let relayed = t.allocate();
    assert_eq!(relayed.ip(), s.udp_addr().ip());

    // The challenge offers SHA-256 first, then MD5, and the client took
    // SHA-256 (the first entry it supports).
    check_challenge(&t, &[ALGO_SHA256, ALGO_MD5]);
    check_signed_requests(&t, ALGO_SHA256);
    assert_eq!(t.signed_requests()[0].method, ALLOCATE);

    // Send indication out, Data indication back.
    let (peer, peer_addr) = peer_socket();
    t.create_permission(peer_addr);
    let (out, back) = round_trip(&mut t, &peer, relayed, b"sha256 send", b"sha256 data");
    assert!(
        Stun::parse(&out).is_some_and(|m| m.method == 0x006),
        "a Send indication before the channel"
    );
    assert!(Stun::parse(&back).is_some_and(|m| m.method == 0x007));

    // ChannelData both ways once the channel is bound.
    t.bind_channel(peer_addr);
    let (out, back) = round_trip(&mut t, &peer, relayed, b"sha256 channel out", b"channel in");
    assert!(is_channel_data(&out) && is_channel_data(&back));
    assert_eq!(out[..2], back[..2], "the same channel number both ways");

    t.delete();

    // Every authenticated method went out with MESSAGE-INTEGRITY-SHA256 ...
    let methods = check_signed_requests(&t, ALGO_SHA256);
    for m in [ALLOCATE, CREATE_PERMISSION, CHANNEL_BIND, REFRESH] {
        assert!(methods.contains(&m), "{m:#x} signed");
    }
    for r in t.signed_requests() {
        assert_eq!(
            r.text(USERNAME).as_deref(),
            Some("alice"),
            "{}",
            r.describe()
        );
        assert!(!r.has(USERHASH), "{}", r.describe());
    }
    // ... and every success came back with a MESSAGE-INTEGRITY-SHA256 that
    // checks with the SHA-256 key, and no SHA-1 MESSAGE-INTEGRITY.
    let key = sha256_key("alice", "alicepw");
    let successes = t.successes();
    for m in [ALLOCATE, CREATE_PERMISSION, CHANNEL_BIND, REFRESH] {
        assert!(successes.iter().any(|r| r.method == m), "{m:#x} answered");
    }
    for r in successes {
        assert!(
            r.sha256_integrity_ok(&key) && !r.has(MESSAGE_INTEGRITY),
            "integrity of {}",
            r.describe()
        );
    }
}

#[test]
fn md5_only_server_offer_still_works() {
    let s = Server::start(Options::new(&format!("{USERS}password-algorithms=md5\n")));
    let mut t = Turn::new(s.udp_addr(), "alice", "alicepw", sha256_and_md5);
    let relayed = t.allocate();

    // Still the RFC 8489 negotiation (cookie, Password algorithms bit), now
    // offering MD5 alone; the client, which prefers SHA-256, signs with the
    // MD5 key and SHA-1 MESSAGE-INTEGRITY, naming MD5 in PASSWORD-ALGORITHM.
    check_challenge(&t, &[ALGO_MD5]);

    let (peer, peer_addr) = peer_socket();
    t.create_permission(peer_addr);
    round_trip(&mut t, &peer, relayed, b"md5 out", b"md5 back");

    let methods = check_signed_requests(&t, ALGO_MD5);
    assert_eq!(methods, [ALLOCATE, CREATE_PERMISSION]);
    // The client accepted each success response, which it does only with
    // a MESSAGE-INTEGRITY that checks with the MD5 key.
    for r in t.successes() {
        assert!(
            r.has(MESSAGE_INTEGRITY) && !r.has(MESSAGE_INTEGRITY_SHA256),
            "integrity of {}",
            r.describe()
        );
    }
}

#[test]
fn userhash_allocates_and_relays() {
    let s = Server::start(Options::new(USERS));
    let mut t = Turn::new(s.udp_addr(), "alice", "alicepw", |c| {
        sha256_and_md5(c);
        c.set_anonymous_username(Feature::Required);
    });
    let relayed = t.allocate();

    // The crate only refuses a server without the RFC 8489 cookie; with the
    // cookie but without the Username anonymity bit it sends USERNAME even
    // when required to hide it, so the bit and the attribute are checked
    // here.
    let features = check_challenge(&t, &[ALGO_SHA256, ALGO_MD5]);
    assert_ne!(
        features[0] & FEATURE_USERNAME_ANONYMITY,
        0,
        "Username anonymity bit in the 401's nonce",
    );

    let (peer, peer_addr) = peer_socket();
    t.create_permission(peer_addr);
    round_trip(&mut t, &peer, relayed, b"hashed out", b"hashed back");

    let methods = check_signed_requests(&t, ALGO_SHA256);
    assert_eq!(methods, [ALLOCATE, CREATE_PERMISSION]);
    for r in t.signed_requests() {
        assert_eq!(
            r.get(USERHASH),
            Some(&userhash("alice")[..]),
            "{}",
            r.describe()
        );
        assert!(!r.has(USERNAME), "{}", r.describe());
    }
    let key = sha256_key("alice", "alicepw");
    for r in t.successes() {
        assert!(r.sha256_integrity_ok(&key), "{}", r.describe());
    }
}

#[test]
fn rest_api_credentials_with_sha256() {
    // The password function against the value in coturn's documentation
    // style: echo -n "1700000000:alice" | openssl dgst -sha1 -hmac secret -binary | base64
    assert_eq!(
        rest_password("secret", "1700000000:alice"),
        "d8soP47RbdIKLDUOpnJPVQyq5Ts="
    );
    let s = Server::start(Options::new(
        "use-auth-secret\nstatic-auth-secret=s3cret\nrealm=example.org\nallow-loopback-peers\n",
    ));
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let username = format!("{expiry}:bob");
    let password = rest_password("s3cret", &username);
    // The crate's default for anonymous usernames (Auto): it would send
    // USERHASH if the nonce offered Username anonymity, which a REST API
    // server cannot resolve (the usernames are not known in advance).
    let mut t = Turn::new(s.udp_addr(), &username, &password, sha256_and_md5);
    let relayed = t.allocate();

    let features = check_challenge(&t, &[ALGO_SHA256, ALGO_MD5]);
    assert_eq!(
        features[0] & FEATURE_USERNAME_ANONYMITY,
        0,
        "a use-auth-secret server cannot offer Username anonymity",
    );

    let (peer, peer_addr) = peer_socket();
    t.create_permission(peer_addr);
    round_trip(&mut t, &peer, relayed, b"rest out", b"rest back");

    check_signed_requests(&t, ALGO_SHA256);
    for r in t.signed_requests() {
        assert_eq!(
            r.text(USERNAME).as_deref(),
            Some(&username[..]),
            "{}",
            r.describe()
        );
    }
    let key = sha256_key(&username, &password);
    for r in t.successes() {
        assert!(r.sha256_integrity_ok(&key), "{}", r.describe());
    }
}
