//! State machine tests of the core with simulated time and a fake relay
//! provider.

#![allow(clippy::disallowed_methods)] // Instant::now as the base time

use super::*;
use crate::auth::{
    Authenticator, Key, Mechanism, NonceIssuer, StaticUsers, UserKeys, long_term_key, rest_password,
};
use crate::stun::channel::{HEADROOM, TAILROOM};
use crate::stun::client::{Credentials, request};
use quota::Counts;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

const REALM: &str = "example.org";
const UNIX0: u64 = 1_800_000_000;

/// Hands out relay addresses <ip>:50000, :50002, ...; keeps reservations
/// like the driver does; can be told to fail.
#[derive(Default)]
struct FakeRelays {
    next_port: u16,
    fail: bool,
    opened: Vec<(AllocationId, RelayRequest)>,
    reservations: HashMap<[u8; 8], SocketAddr>,
}

impl RelayProvider for FakeRelays {
    fn open(&mut self, id: AllocationId, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        if self.fail {
            return Err(RelayError::NoPortAvailable);
        }
        self.opened.push((id, *req));
        if let PortRequest::Reserved(token) = req.port {
            let addr = self
                .reservations
                .remove(&token)
                .ok_or(RelayError::NoReservation)?;
            return Ok(OpenedRelay {
                addr,
                reservation: None,
            });
        }
        let port = 50000 + self.next_port;
        self.next_port += 2;
        let addr = SocketAddr::new(req.ip, port);
        let reservation = match req.port {
            PortRequest::Even { reserve_next: true } => {
                let token = [port as u8; 8];
                self.reservations
                    .insert(token, SocketAddr::new(req.ip, port + 1));
                Some(token)
            }
            _ => None,
        };
        Ok(OpenedRelay { addr, reservation })
    }
}

struct Harness {
    server: Server,
    /// The quota counts the server's ledger holds.
    counts: Rc<RefCell<Counts>>,
    relays: FakeRelays,
    t0: Instant,
    now: Instant,
    out: Vec<u8>,
    tid: u8,
}

fn users_config() -> Config {
    let users = StaticUsers::new(
        REALM,
        [
            (
                "alice".to_string(),
                UserKeys::from_password("alice", REALM, "alicepw"),
            ),
            (
                "bob".to_string(),
                UserKeys::from_password("bob", REALM, "bobpw"),
            ),
        ],
    );
    let auth = Authenticator {
        realm: REALM.into(),
        mechanism: Mechanism::LongTerm(users),
    };
    let mut cfg = Config::new(auth, NonceIssuer::new([1; 32], Some(600)));
    cfg.listening_ips = vec!["192.0.2.10".parse().unwrap()];
    cfg
}

fn udp(client: &str) -> FiveTuple {
    FiveTuple {
        client: client.parse().unwrap(),
        server: "192.0.2.10:3478".parse().unwrap(),
        transport: Transport::Udp,
    }
}

/// A request under construction: attributes, then optional credentials.
struct Req {
    method: u16,
    attrs: Vec<(u16, Vec<u8>)>,
    tid: [u8; 12],
    fingerprint: bool,
}

impl Req {
    fn attr(mut self, t: u16, v: &[u8]) -> Self {
        self.attrs.push((t, v.to_vec()));
        self
    }
    fn peer(self, addr: &str) -> Self {
        let a: SocketAddr = addr.parse().unwrap();
        let x = attr::xor_address(a, &self.tid);
        let mut v = [0u8; 20];
        let n = crate::stun::encode_address(&mut v, x);
        self.attr(attr::XOR_PEER_ADDRESS, &v[..n])
    }
    fn fingerprint(mut self) -> Self {
        self.fingerprint = true;
        self
    }
    fn build(&self, creds: Option<(&str, &str, &[u8])>) -> Vec<u8> {
        let key = creds.map(|(user, password, _)| long_term_key(user, REALM, password));
        let creds = creds
            .zip(key.as_ref())
            .map(|((username, _, nonce), key)| Credentials {
                username,
                realm: REALM,
                nonce,
                key,
            });
        let attrs = |w: &mut MessageWriter<'_>| {
            for (t, v) in &self.attrs {
                w.attr(*t, v);
            }
        };
        request(
            self.method,
            &self.tid,
            attrs,
            creds.as_ref(),
            self.fingerprint,
        )
    }
}

struct Resp {
    raw: Vec<u8>,
}

impl Resp {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("valid response")
    }
    fn code(&self) -> Option<u16> {
        self.msg()
            .get(attr::ERROR_CODE)
            .map(|v| attr::decode_error_code(v).unwrap().0)
    }
    fn ok(&self) -> bool {
        self.msg().class() == Class::Success
    }
    fn nonce(&self) -> Vec<u8> {
        self.msg().get(attr::NONCE).expect("NONCE").to_vec()
    }
    fn xor(&self, t: u16) -> SocketAddr {
        self.msg().xor_address(t).unwrap().unwrap()
    }
    fn lifetime(&self) -> u32 {
        attr::decode_u32(attr::LIFETIME, self.msg().get(attr::LIFETIME).unwrap()).unwrap()
    }
}

impl Harness {
    fn new(cfg: Config) -> Self {
        let t0 = Instant::now();
        let counts = Rc::new(RefCell::new(Counts::default()));
        Harness {
            server: Server::new(Arc::new(cfg), Box::new(counts.clone()), 0, t0, UNIX0, 42),
            counts,
            relays: FakeRelays::default(),
            t0,
            now: t0,
            out: Vec::new(),
            tid: 0,
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.server.handle_timeout(self.now);
    }

    fn req(&mut self, method: u16) -> Req {
        self.tid = self.tid.wrapping_add(1);
        Req {
            method,
            attrs: Vec::new(),
            tid: [self.tid; 12],
            fingerprint: false,
        }
    }

    fn send(&mut self, ft: &FiveTuple, bytes: &[u8]) -> ClientAction {
        self.server
            .handle_client(self.now, ft, 7, bytes, &mut self.out, &mut self.relays)
    }

    fn ask(&mut self, ft: &FiveTuple, bytes: &[u8]) -> Resp {
        let action = self.send(ft, bytes);
        assert_eq!(action, ClientAction::Reply, "expected a reply");
        Resp {
            raw: self.out.clone(),
        }
    }

    /// Sends `req` with credentials, first fetching a nonce with a 401.
    fn ask_authed(&mut self, ft: &FiveTuple, req: &Req, user: &str, pw: &str) -> Resp {
        let challenge = self.ask(ft, &req.build(None));
        assert_eq!(challenge.code(), Some(401));
        let nonce = challenge.nonce();
        self.ask(ft, &req.build(Some((user, pw, &nonce))))
    }

    fn allocate(&mut self, ft: &FiveTuple, user: &str, pw: &str) -> Resp {
        let r = self
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        self.ask_authed(ft, &r, user, pw)
    }

    fn peer_data(
        &mut self,
        id: AllocationId,
        peer: &str,
        payload: &[u8],
    ) -> Option<(Delivery, Vec<u8>)> {
        let mut buf = vec![0u8; HEADROOM + payload.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
        let d = self.server.handle_peer(
            self.now,
            id,
            peer.parse().unwrap(),
            &mut buf,
            HEADROOM..HEADROOM + payload.len(),
        )?;
        let bytes = buf[d.range.clone()].to_vec();
        Some((d, bytes))
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }
}

#[test]
fn binding_answers_xor_mapped_address() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h.req(method::BINDING);
    let resp = h.ask(&ft, &r.build(None));
    assert!(resp.ok());
    assert_eq!(resp.xor(attr::XOR_MAPPED_ADDRESS), ft.client);
    assert!(!resp.msg().has_fingerprint());
    assert!(
        !resp.msg().has(attr::SOFTWARE),
        "no SOFTWARE unless configured"
    );
    // FINGERPRINT when the request had one.
    let r = h.req(method::BINDING).fingerprint();
    let resp = h.ask(&ft, &r.build(None));
    assert!(resp.msg().has_fingerprint() && resp.msg().fingerprint_ok());
    // ... or when `fingerprint` is configured.
    let mut cfg = users_config();
    cfg.fingerprint = true;
    let mut h = Harness::new(cfg);
    let r = h.req(method::BINDING);
    assert!(h.ask(&ft, &r.build(None)).msg().has_fingerprint());
}

/// An RFC 3489 Binding request: no magic cookie, a 128-bit transaction ID.
fn classic_binding(attrs: &[u8]) -> Vec<u8> {
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    m.extend_from_slice(&[0xA7; 16]);
    m.extend_from_slice(attrs);
    m
}

#[test]
fn rfc3489_binding_is_answered_only_when_configured() {
    let ft = udp("203.0.113.5:40000");
    let mut h = Harness::new(users_config());
    assert_eq!(h.send(&ft, &classic_binding(&[])), ClientAction::None);
    let mut cfg = users_config();
    cfg.rfc3489 = true;
    let mut h = Harness::new(cfg);
    let resp = h.ask(&ft, &classic_binding(&[]));
    // 0x0101, length 12, the request's 16-byte ID, MAPPED-ADDRESS.
    let mut want = vec![0x01, 0x01, 0x00, 0x0C];
    want.extend_from_slice(&[0xA7; 16]);
    want.extend_from_slice(&[
        0x00, 0x01, 0x00, 0x08, 0x00, 0x01, 0x9C, 0x40, 203, 0, 113, 5,
    ]);
    assert_eq!(resp.raw, want);
    // A CHANGE-REQUEST with flags 0 is fine; asking for a change is not.
    let zero = [0x00, 0x03, 0x00, 0x04, 0, 0, 0, 0];
    assert_eq!(h.send(&ft, &classic_binding(&zero)), ClientAction::Reply);
    let change = [0x00, 0x03, 0x00, 0x04, 0, 0, 0, 6];
    assert_eq!(h.send(&ft, &classic_binding(&change)), ClientAction::None);
    // Wrong length, other methods, truncated attributes: dropped.
    let mut bad = classic_binding(&[]);
    bad[3] = 4;
    assert_eq!(h.send(&ft, &bad), ClientAction::None);
    let mut other = classic_binding(&[]);
    other[1] = 0x03;
    assert_eq!(h.send(&ft, &other), ClientAction::None);
    assert_eq!(
        h.send(&ft, &classic_binding(&[0x00, 0x03, 0x00, 0x08, 0, 0, 0, 0])),
        ClientAction::None
    );
    // RFC 5389 Binding responses carry MAPPED-ADDRESS too.
    let r = h.req(method::BINDING);
    let resp = h.ask(&ft, &r.build(None));
    assert!(resp.msg().has(attr::MAPPED_ADDRESS));
}

#[test]
fn bad_fingerprint_and_garbage_are_dropped() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let mut raw = h.req(method::BINDING).fingerprint().build(None);
    let n = raw.len();
    raw[n - 1] ^= 1;
    assert_eq!(h.send(&ft, &raw), ClientAction::None);
    assert_eq!(h.send(&ft, &[0xFF; 40]), ClientAction::None);
    assert_eq!(h.send(&ft, &[]), ClientAction::None);
    assert_eq!(h.send(&ft, &[0x40, 0x00, 0x00, 0x10]), ClientAction::None);
}

#[test]
fn unknown_comprehension_required_attribute_gets_420() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(0x7F00, b"??")
        .attr(0xC000, b"optional");
    let resp = h.ask(&ft, &r.build(None));
    assert_eq!(resp.code(), Some(420));
    let listed =
        attr::decode_unknown_attributes(resp.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap()).unwrap();
    assert_eq!(listed, vec![0x7F00]);
}

#[test]
fn unauthenticated_allocate_gets_401_with_realm_and_nonce() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let resp = h.ask(&ft, &r.build(None));
    assert_eq!(resp.code(), Some(401));
    assert_eq!(resp.msg().text(attr::REALM), Some(Ok(REALM)));
    assert!(resp.msg().has(attr::NONCE));
    assert!(!resp.msg().has_integrity());
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn allocate_succeeds_with_the_right_password_only() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let resp = h.allocate(&ft, "alice", "wrong");
    assert_eq!(resp.code(), Some(401));
    assert!(resp.msg().has(attr::NONCE));
    let resp = h.allocate(&ft, "mallory", "x");
    assert_eq!(resp.code(), Some(401));
    assert_eq!(h.server.allocation_count(), 0);

    let resp = h.allocate(&ft, "alice", "alicepw");
    assert!(resp.ok(), "{:?}", resp.code());
    assert_eq!(
        resp.xor(attr::XOR_RELAYED_ADDRESS),
        "192.0.2.10:50000".parse().unwrap()
    );
    assert_eq!(resp.xor(attr::XOR_MAPPED_ADDRESS), ft.client);
    assert_eq!(resp.lifetime(), 600);
    assert!(
        resp.msg()
            .verify_integrity(&long_term_key("alice", REALM, "alicepw"))
    );
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(
        h.relays.opened[0].1.ip,
        "192.0.2.10".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn missing_username_with_integrity_is_400() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let mut raw = Vec::new();
    MessageWriter::new(&mut raw, method::ALLOCATE, Class::Request, &r.tid)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .integrity(b"whatever");
    assert_eq!(h.ask(&ft, &raw).code(), Some(400));
}

#[test]
fn lifetime_defaults_and_caps() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::LIFETIME, &100_000u32.to_be_bytes());
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").lifetime(), 3600);
    let ft2 = udp("203.0.113.5:40001");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::LIFETIME, &30u32.to_be_bytes());
    assert_eq!(h.ask_authed(&ft2, &r, "alice", "alicepw").lifetime(), 600);
}

#[test]
fn requested_transport_udp_or_tcp_over_a_stream() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    // TCP relaying over UDP: 400 (RFC 6062 §5.1); another protocol: 442.
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(400));
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[132, 0, 0, 0]);
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(442));
    let r = h.req(method::ALLOCATE);
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(400));
    assert_eq!(h.server.allocation_count(), 0);
    // Over TCP it is granted, unless no-tcp-relay.
    let tcp = FiveTuple {
        transport: Transport::Tcp,
        ..udp("203.0.113.5:40001")
    };
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
    assert!(h.ask_authed(&tcp, &r, "alice", "alicepw").ok());
    assert!(h.relays.opened.last().unwrap().1.tcp);
    let mut cfg = users_config();
    cfg.allow_tcp_relay = false;
    let mut h = Harness::new(cfg);
    assert_eq!(h.ask_authed(&tcp, &r, "alice", "alicepw").code(), Some(442));
}

#[test]
fn second_allocate_is_437_but_retransmission_repeats_success() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let challenge = h.ask(&ft, &r.build(None));
    let nonce = challenge.nonce();
    let first = h.ask(&ft, &r.build(Some(("alice", "alicepw", &nonce))));
    assert!(first.ok());
    h.advance(5);
    let again = h.ask(&ft, &r.build(Some(("alice", "alicepw", &nonce))));
    assert!(again.ok());
    assert_eq!(
        again.xor(attr::XOR_RELAYED_ADDRESS),
        first.xor(attr::XOR_RELAYED_ADDRESS)
    );
    assert_eq!(h.relays.opened.len(), 1, "no second relay socket");
    let other = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let resp = h.ask(&ft, &other.build(Some(("alice", "alicepw", &nonce))));
    assert_eq!(resp.code(), Some(437));
    assert!(
        resp.msg()
            .verify_integrity(&long_term_key("alice", REALM, "alicepw"))
    );
}

#[test]
fn stale_nonce_gets_438_with_a_fresh_nonce() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let nonce = h.ask(&ft, &r.build(None)).nonce();
    h.advance(601);
    let resp = h.ask(&ft, &r.build(Some(("alice", "alicepw", &nonce))));
    assert_eq!(resp.code(), Some(438));
    let fresh = resp.nonce();
    assert_ne!(fresh, nonce);
    assert_eq!(resp.msg().text(attr::REALM), Some(Ok(REALM)));
    assert!(
        h.ask(&ft, &r.build(Some(("alice", "alicepw", &fresh))))
            .ok()
    );
    // A nonce made up by the client is never accepted.
    let ft2 = udp("203.0.113.6:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    assert_eq!(
        h.ask(
            &ft2,
            &r.build(Some(("alice", "alicepw", b"0123456789abcdef01234567")))
        )
        .code(),
        Some(438)
    );
    // Nor one issued to another client address.
    assert_eq!(
        h.ask(&ft2, &r.build(Some(("alice", "alicepw", &fresh))))
            .code(),
        Some(438)
    );
}

#[test]
fn no_free_port_is_508() {
    let mut h = Harness::new(users_config());
    h.relays.fail = true;
    let ft = udp("203.0.113.5:40000");
    assert_eq!(h.allocate(&ft, "alice", "alicepw").code(), Some(508));
    assert_eq!(h.server.allocation_count(), 0);
    h.relays.fail = false;
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
}

#[test]
fn address_family_selection() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    assert_eq!(
        h.ask_authed(&ft, &r, "alice", "alicepw").code(),
        Some(440),
        "no IPv6 relay address"
    );
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0]);
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(440));

    let mut cfg = users_config();
    cfg.relay_ips = vec![
        "2001:db8::10".parse().unwrap(),
        "93.184.216.10".parse().unwrap(),
    ];
    let mut h = Harness::new(cfg);
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    let resp = h.ask_authed(&ft, &r, "alice", "alicepw");
    assert_eq!(
        resp.xor(attr::XOR_RELAYED_ADDRESS).ip(),
        "2001:db8::10".parse::<IpAddr>().unwrap()
    );
    // An IPv4 peer on an IPv6 relay is a family mismatch.
    let r = h.req(method::CREATE_PERMISSION).peer("93.184.216.99:1000");
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(443));
    // Default family is IPv4, from relay-ip.
    let ft2 = udp("203.0.113.5:40001");
    let resp = h.allocate(&ft2, "bob", "bobpw");
    assert_eq!(
        resp.xor(attr::XOR_RELAYED_ADDRESS).ip(),
        "93.184.216.10".parse::<IpAddr>().unwrap()
    );
    // Refresh asking for the other family: 443.
    let r = h
        .req(method::REFRESH)
        .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    assert_eq!(h.ask_authed(&ft2, &r, "bob", "bobpw").code(), Some(443));
}

#[test]
fn external_ip_is_advertised() {
    let mut cfg = users_config();
    cfg.external_ips = vec![ExternalIp {
        public: "93.184.216.77".parse().unwrap(),
        private: Some("192.0.2.10".parse().unwrap()),
    }];
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    let resp = h.allocate(&ft, "alice", "alicepw");
    assert_eq!(
        resp.xor(attr::XOR_RELAYED_ADDRESS),
        "93.184.216.77:50000".parse().unwrap()
    );

    let mut cfg = users_config();
    cfg.external_ips = vec![ExternalIp {
        public: "93.184.216.78".parse().unwrap(),
        private: None,
    }];
    let mut h = Harness::new(cfg);
    let resp = h.allocate(&ft, "alice", "alicepw");
    assert_eq!(
        resp.xor(attr::XOR_RELAYED_ADDRESS),
        "93.184.216.78:50000".parse().unwrap()
    );
}

#[test]
fn refresh_extends_and_zero_deletes() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let id = h.server.allocation_for(&ft).unwrap();
    h.advance(500);
    let r = h
        .req(method::REFRESH)
        .attr(attr::LIFETIME, &1200u32.to_be_bytes());
    let resp = h.ask_authed(&ft, &r, "alice", "alicepw");
    assert!(resp.ok());
    assert_eq!(resp.lifetime(), 1200);
    h.advance(1100);
    assert_eq!(
        h.server.allocation_count(),
        1,
        "refreshed allocation still alive at t=1600"
    );
    let r = h
        .req(method::REFRESH)
        .attr(attr::LIFETIME, &0u32.to_be_bytes());
    let resp = h.ask_authed(&ft, &r, "alice", "alicepw");
    assert!(resp.ok());
    assert_eq!(resp.lifetime(), 0);
    assert_eq!(h.server.allocation_count(), 0);
    assert_eq!(
        h.events(),
        vec![Event::AllocationClosed {
            id,
            relayed: "192.0.2.10:50000".parse().unwrap(),
            additional: None,
            five_tuple: ft,
        }]
    );
    // Refresh without an allocation: 437.
    let r = h.req(method::REFRESH);
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(437));
}

#[test]
fn allocation_expires_without_refresh() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    h.advance(599);
    assert_eq!(h.server.allocation_count(), 1);
    assert!(h.events().is_empty());
    h.advance(1);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(matches!(h.events()[..], [Event::AllocationClosed { .. }]));
    // The 5-tuple is free again.
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
}

#[test]
fn requests_on_another_users_allocation_get_441() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let r = h.req(method::REFRESH);
    assert_eq!(h.ask_authed(&ft, &r, "bob", "bobpw").code(), Some(441));
}

#[test]
fn permissions_gate_peer_traffic_and_expire() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let id = h.server.allocation_for(&ft).unwrap();
    assert!(
        h.peer_data(id, "93.184.216.1:7000", b"hi").is_none(),
        "no permission yet"
    );

    let r = h
        .req(method::CREATE_PERMISSION)
        .peer("93.184.216.1:1")
        .peer("93.184.216.2:1");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    // Any port of a permitted IP may send; the client gets a Data indication.
    let (d, bytes) = h.peer_data(id, "93.184.216.1:7000", b"hello").unwrap();
    assert_eq!(d.client, ft);
    assert_eq!(d.link, 7);
    let m = Message::parse(&bytes).unwrap();
    assert_eq!((m.method(), m.class()), (method::DATA, Class::Indication));
    assert_eq!(m.get(attr::DATA), Some(&b"hello"[..]));
    assert_eq!(
        m.xor_address(attr::XOR_PEER_ADDRESS),
        Some(Ok("93.184.216.1:7000".parse().unwrap()))
    );
    assert!(h.peer_data(id, "93.184.216.2:9", b"x").is_some());
    assert!(h.peer_data(id, "93.184.216.3:9", b"x").is_none());

    // Send indication to a permitted peer is relayed, others are dropped.
    let send = h
        .req(method::SEND)
        .peer("93.184.216.1:7000")
        .attr(attr::DATA, b"out");
    let mut raw = send.build(None);
    let t = message_type(method::SEND, Class::Indication).to_be_bytes();
    raw[..2].copy_from_slice(&t);
    match h.send(&ft, &raw) {
        ClientAction::Relay {
            allocation,
            peer,
            payload,
        } => {
            assert_eq!(allocation, id);
            assert_eq!(peer, "93.184.216.1:7000".parse().unwrap());
            assert_eq!(&raw[payload], b"out");
        }
        other => panic!("expected relay, got {other:?}"),
    }
    let send = h
        .req(method::SEND)
        .peer("93.184.216.9:7000")
        .attr(attr::DATA, b"out");
    let mut raw = send.build(None);
    raw[..2].copy_from_slice(&t);
    assert_eq!(h.send(&ft, &raw), ClientAction::None);

    h.advance(299);
    assert!(h.peer_data(id, "93.184.216.1:7000", b"x").is_some());
    h.advance(1);
    assert!(
        h.peer_data(id, "93.184.216.1:7000", b"x").is_none(),
        "permission expired at 300 s"
    );
    let traffic = h.server.traffic(id).unwrap();
    assert_eq!(traffic.to_client_packets, 3);
    assert_eq!(traffic.to_peer_packets, 1);
    assert_eq!(traffic.to_peer_bytes, 3);
}

fn message_type(m: u16, c: Class) -> u16 {
    crate::stun::message_type(m, c)
}

#[test]
fn loopback_and_unspecified_peers_are_403() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    for peer in ["127.0.0.1:9", "0.0.0.0:9", "127.1.2.3:9"] {
        let r = h.req(method::CREATE_PERMISSION).peer(peer);
        assert_eq!(
            h.ask_authed(&ft, &r, "alice", "alicepw").code(),
            Some(403),
            "{peer}"
        );
        let r = h
            .req(method::CHANNEL_BIND)
            .attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
            .peer(peer);
        assert_eq!(
            h.ask_authed(&ft, &r, "alice", "alicepw").code(),
            Some(403),
            "{peer}"
        );
    }
    // One bad address in a multi-address CreatePermission installs nothing.
    let r = h
        .req(method::CREATE_PERMISSION)
        .peer("93.184.216.1:1")
        .peer("127.0.0.1:1");
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(403));
    let id = h.server.allocation_for(&ft).unwrap();
    assert!(h.peer_data(id, "93.184.216.1:1", b"x").is_none());
}

#[test]
fn channels_bind_relay_and_expire() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::LIFETIME, &3600u32.to_be_bytes());
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    let id = h.server.allocation_for(&ft).unwrap();
    let bind = |h: &mut Harness, number: u16, peer: &str| {
        let r = h
            .req(method::CHANNEL_BIND)
            .attr(
                attr::CHANNEL_NUMBER,
                &[(number >> 8) as u8, number as u8, 0, 0],
            )
            .peer(peer);
        h.ask_authed(&ft, &r, "alice", "alicepw")
    };
    assert!(bind(&mut h, 0x4001, "93.184.216.1:5000").ok());
    // ChannelData from the client goes to the bound peer.
    let cd = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0];
    match h.send(&ft, &cd) {
        ClientAction::Relay {
            allocation,
            peer,
            payload,
        } => {
            assert_eq!(allocation, id);
            assert_eq!(peer, "93.184.216.1:5000".parse().unwrap());
            assert_eq!(&cd[payload], b"abc");
        }
        other => panic!("{other:?}"),
    }
    // Unbound channel: dropped.
    assert_eq!(h.send(&ft, &[0x40, 0x02, 0, 1, b'x']), ClientAction::None);
    // Peer data from the bound peer comes back as ChannelData (no padding on UDP).
    let (_, bytes) = h.peer_data(id, "93.184.216.1:5000", b"xyz").unwrap();
    assert_eq!(bytes, vec![0x40, 0x01, 0, 3, b'x', b'y', b'z']);
    // Another port of the same IP has a permission but no channel: Data indication.
    let (_, bytes) = h.peer_data(id, "93.184.216.1:5001", b"xyz").unwrap();
    assert!(Message::parse(&bytes).is_ok());

    // Rebinding rules.
    assert_eq!(
        bind(&mut h, 0x4001, "93.184.216.2:5000").code(),
        Some(400),
        "number bound to another peer"
    );
    assert_eq!(
        bind(&mut h, 0x4002, "93.184.216.1:5000").code(),
        Some(400),
        "peer bound to another number"
    );
    assert_eq!(
        bind(&mut h, 0x3FFF, "93.184.216.2:5000").code(),
        Some(400),
        "below 0x4000"
    );
    assert_eq!(
        bind(&mut h, 0x8000, "93.184.216.2:5000").code(),
        Some(400),
        "above 0x7FFF"
    );
    assert!(
        bind(&mut h, 0x7FFE, "93.184.216.3:5000").ok(),
        "RFC 5766 range accepted"
    );
    // Refreshing the same binding is fine.
    h.advance(500);
    assert!(bind(&mut h, 0x4001, "93.184.216.1:5000").ok());
    h.advance(599);
    assert!(
        matches!(h.send(&ft, &cd), ClientAction::Relay { .. }),
        "channel alive at 599 s"
    );
    // The permission the binding installed lasts 300 s unless refreshed.
    assert!(h.peer_data(id, "93.184.216.1:5000", b"x").is_none());
    h.advance(1);
    assert_eq!(
        h.send(&ft, &cd),
        ClientAction::None,
        "channel expired at 600 s after refresh"
    );
    // Within 5 minutes of expiry the number cannot go to another peer ...
    assert_eq!(bind(&mut h, 0x4001, "93.184.216.9:5000").code(), Some(400));
    // ... but can be re-established for the same one, and is free after the guard.
    h.advance(300);
    assert!(bind(&mut h, 0x4001, "93.184.216.9:5000").ok());
}

#[test]
fn rfc8656_channel_range_when_rfc5766_is_off() {
    let mut cfg = users_config();
    cfg.rfc5766_channels = false;
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let r = h
        .req(method::CHANNEL_BIND)
        .attr(attr::CHANNEL_NUMBER, &[0x50, 0x00, 0, 0])
        .peer("93.184.216.1:5000");
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(400));
}

#[test]
fn stream_clients_get_padded_channel_data() {
    let mut h = Harness::new(users_config());
    let ft = FiveTuple {
        transport: Transport::Tcp,
        ..udp("203.0.113.5:40000")
    };
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let id = h.server.allocation_for(&ft).unwrap();
    let r = h
        .req(method::CHANNEL_BIND)
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
        .peer("93.184.216.1:5000");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    let (_, bytes) = h.peer_data(id, "93.184.216.1:5000", b"xyzzy").unwrap();
    assert_eq!(
        bytes,
        vec![0x40, 0x00, 0, 5, b'x', b'y', b'z', b'z', b'y', 0, 0, 0]
    );
    h.server.client_closed(h.now, &ft);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(matches!(h.events()[..], [Event::AllocationClosed { .. }]));
}

#[test]
fn even_port_reservation_token() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::EVEN_PORT, &[0x80]);
    let resp = h.ask_authed(&ft, &r, "alice", "alicepw");
    assert!(resp.ok());
    assert_eq!(resp.xor(attr::XOR_RELAYED_ADDRESS).port() % 2, 0);
    let token = resp.msg().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    assert_eq!(token.len(), 8);
    // The token claims the reserved odd port from another 5-tuple.
    let ft2 = udp("203.0.113.5:40001");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::RESERVATION_TOKEN, &token);
    let resp = h.ask_authed(&ft2, &r, "alice", "alicepw");
    assert!(resp.ok());
    assert_eq!(
        resp.xor(attr::XOR_RELAYED_ADDRESS),
        "192.0.2.10:50001".parse().unwrap()
    );
    // A token works once.
    let ft3 = udp("203.0.113.5:40002");
    assert_eq!(h.ask_authed(&ft3, &r, "alice", "alicepw").code(), Some(508));
    // EVEN-PORT and RESERVATION-TOKEN together are a bad request.
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::EVEN_PORT, &[0x00])
        .attr(attr::RESERVATION_TOKEN, &token);
    assert_eq!(h.ask_authed(&ft3, &r, "alice", "alicepw").code(), Some(400));
}

#[test]
fn rest_api_credentials() {
    let auth = Authenticator {
        realm: REALM.into(),
        mechanism: Mechanism::RestApi {
            secrets: vec![b"s1".to_vec(), b"s2".to_vec()],
            separator: ':',
        },
    };
    let mut h = Harness::new(Config::new(auth, NonceIssuer::new([1; 32], Some(600))));
    let ft = udp("203.0.113.5:40000");
    for (i, secret) in [&b"s1"[..], b"s2"].iter().enumerate() {
        let user = format!("{}:alice", UNIX0 + 3600);
        let pw = rest_password(secret, &user);
        let ft = udp(&format!("203.0.113.5:{}", 41000 + i));
        assert!(h.allocate(&ft, &user, &pw).ok());
    }
    let user = format!("{}:alice", UNIX0 - 1);
    let pw = rest_password(b"s1", &user);
    assert_eq!(h.allocate(&ft, &user, &pw).code(), Some(401), "expired");
    let user = format!("{}", UNIX0 + 10);
    let pw = rest_password(b"s3", &user);
    assert_eq!(
        h.allocate(&ft, &user, &pw).code(),
        Some(401),
        "unknown secret"
    );
    // The allocation outlives its credential: refresh after expiry still works.
    let user = format!("{}:carol", UNIX0 + 100);
    let pw = rest_password(b"s1", &user);
    assert!(h.allocate(&ft, &user, &pw).ok());
    h.advance(200);
    let r = h.req(method::REFRESH);
    assert!(h.ask_authed(&ft, &r, &user, &pw).ok());
}

#[test]
fn anonymous_mode_needs_no_credentials() {
    let auth = Authenticator {
        realm: REALM.into(),
        mechanism: Mechanism::None,
    };
    let mut h = Harness::new(Config::new(auth, NonceIssuer::new([1; 32], Some(600))));
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let resp = h.ask(&ft, &r.build(None));
    assert!(resp.ok());
    assert!(!resp.msg().has_integrity());
}

#[test]
fn unsupported_method_is_400() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h.req(0x0ff);
    assert_eq!(h.ask(&ft, &r.build(None)).code(), Some(400));
}

#[test]
fn wall_clock_follows_the_monotonic_clock() {
    let h = Harness::new(users_config());
    assert_eq!(h.server.unix(h.t0 + Duration::from_secs(90)), UNIX0 + 90);
}

fn mobile_config() -> Config {
    let mut cfg = users_config();
    cfg.mobility = true;
    cfg.ticket_key = [9; 32];
    cfg
}

fn allocate_mobile(h: &mut Harness, ft: &FiveTuple) -> Vec<u8> {
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::MOBILITY_TICKET, b"");
    let resp = h.ask_authed(ft, &r, "alice", "alicepw");
    assert!(resp.ok(), "{:?}", resp.code());
    let ticket = resp
        .msg()
        .get(attr::MOBILITY_TICKET)
        .expect("ticket")
        .to_vec();
    assert_eq!(ticket.len(), 27);
    assert!(
        ticket
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_'),
        "printable ticket"
    );
    ticket
}

#[test]
fn mobility_off_answers_405() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::MOBILITY_TICKET, b"");
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(405));
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let r = h
        .req(method::REFRESH)
        .attr(attr::MOBILITY_TICKET, &[b'A'; 27]);
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(405));
}

#[test]
fn mobility_ticket_moves_the_allocation_to_a_new_five_tuple() {
    let mut h = Harness::new(mobile_config());
    let ft = udp("203.0.113.5:40000");
    // A non-empty ticket in an Allocate is malformed.
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::MOBILITY_TICKET, b"x");
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(400));
    let ticket = allocate_mobile(&mut h, &ft);
    let id = h.server.allocation_for(&ft).unwrap();
    let bind = h
        .req(method::CHANNEL_BIND)
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
        .peer("93.184.216.1:5000");
    assert!(h.ask_authed(&ft, &bind, "alice", "alicepw").ok());

    // The client's address changes: Refresh with the ticket from the new one.
    let moved_to = udp("93.184.216.200:1234");
    let r = h.req(method::REFRESH).attr(attr::MOBILITY_TICKET, &ticket);
    let resp = h.ask_authed(&moved_to, &r, "alice", "alicepw");
    assert!(resp.ok(), "{:?}", resp.code());
    assert!(resp.msg().has(attr::MOBILITY_TICKET));
    assert_eq!(h.server.allocation_for(&ft), None);
    assert_eq!(h.server.allocation_for(&moved_to), Some(id));
    // Peer data follows the client; its channel came along.
    let (d, bytes) = h.peer_data(id, "93.184.216.1:5000", b"x").unwrap();
    assert_eq!(d.client, moved_to);
    assert_eq!(bytes, vec![0x40, 0x01, 0, 1, b'x']);
    assert!(matches!(
        h.send(&moved_to, &[0x40, 0x01, 0, 1, b'y']),
        ClientAction::Relay { .. }
    ));
    assert_eq!(
        h.send(&ft, &[0x40, 0x01, 0, 1, b'y']),
        ClientAction::None,
        "old 5-tuple is gone"
    );
    assert!(h.events().is_empty(), "a move is not a deletion");

    // Another user cannot take it; a forged or foreign ticket finds nothing.
    let elsewhere = udp("93.184.216.201:1");
    let r = h.req(method::REFRESH).attr(attr::MOBILITY_TICKET, &ticket);
    assert_eq!(
        h.ask_authed(&elsewhere, &r, "bob", "bobpw").code(),
        Some(441)
    );
    let mut forged = ticket.clone();
    forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
    let r = h.req(method::REFRESH).attr(attr::MOBILITY_TICKET, &forged);
    assert_eq!(
        h.ask_authed(&elsewhere, &r, "alice", "alicepw").code(),
        Some(404)
    );
    // A plain allocation has no ticket to be found by.
    let plain = udp("203.0.113.9:1");
    assert!(h.allocate(&plain, "alice", "alicepw").ok());
    assert_eq!(h.server.allocation_count(), 2);
}

#[test]
fn a_ticket_owned_by_another_worker_migrates_the_allocation() {
    let cfg = Arc::new(mobile_config());
    let mut a = Harness::new(mobile_config());
    a.server = Server::new(cfg.clone(), Box::new(a.counts.clone()), 0, a.now, UNIX0, 1);
    let mut b = Harness::new(mobile_config());
    b.counts = a.counts.clone();
    b.server = Server::new(cfg, Box::new(b.counts.clone()), 1, b.now, UNIX0, 2);
    let ft = udp("203.0.113.5:40000");
    let ticket = allocate_mobile(&mut a, &ft);
    let id = a.server.allocation_for(&ft).unwrap();

    let moved_to = udp("93.184.216.200:1234");
    let r = b.req(method::REFRESH).attr(attr::MOBILITY_TICKET, &ticket);
    let challenge = b.ask(&moved_to, &r.build(None));
    let request = r.build(Some(("alice", "alicepw", &challenge.nonce())));
    let action = b.send(&moved_to, &request);
    assert_eq!(
        action,
        ClientAction::Migrate {
            owner: 0,
            allocation: id,
            username: "alice".into()
        }
    );
    // The owner refuses another user, then hands it over.
    assert_eq!(
        a.server.export(id, "bob", &moved_to, 3).err(),
        Some(ErrorCode::WrongCredentials)
    );
    let moved = a.server.export(id, "alice", &moved_to, 3).unwrap();
    assert_eq!(moved.relayed(), "192.0.2.10:50000".parse().unwrap());
    assert_eq!(a.server.allocation_count(), 0);
    assert!(
        a.events().is_empty(),
        "the relay socket moves, it is not closed"
    );
    assert_eq!(
        a.server.export(id, "alice", &moved_to, 3).err(),
        Some(ErrorCode::AllocationNotFound)
    );
    let new_id = b.server.import(moved).unwrap();
    assert_eq!(b.server.allocation_for(&moved_to), Some(new_id));
    // Replaying the request refreshes it in its new home.
    let resp = b.ask(&moved_to, &request);
    assert!(resp.ok());
    assert!(resp.msg().has(attr::MOBILITY_TICKET));
    // A failed move is answered with the owner's code.
    let mut out = Vec::new();
    assert_eq!(
        b.server
            .answer_error(&request, ErrorCode::AllocationNotFound, &mut out),
        ClientAction::Reply
    );
    assert_eq!(Resp { raw: out }.code(), Some(404));
}

#[test]
fn an_allocation_moves_to_another_worker_unchanged() {
    let cfg = Arc::new(users_config());
    let mut a = Harness::new(users_config());
    a.server = Server::new(cfg.clone(), Box::new(a.counts.clone()), 0, a.now, UNIX0, 1);
    let mut b = Harness::new(users_config());
    b.counts = a.counts.clone();
    b.server = Server::new(cfg, Box::new(b.counts.clone()), 1, b.now, UNIX0, 2);
    let ft = udp("203.0.113.5:40000");
    assert!(a.allocate(&ft, "alice", "alicepw").ok());
    let id = a.server.allocation_for(&ft).unwrap();
    let r = a.req(method::CREATE_PERMISSION).peer("93.184.216.1:1");
    assert!(a.ask_authed(&ft, &r, "alice", "alicepw").ok());

    let moved = a.server.export_unchanged(id).unwrap();
    assert_eq!(a.server.allocation_count(), 0);
    assert!(
        a.events().is_empty(),
        "the relay socket moves, it is not closed"
    );
    assert_eq!(
        a.server.export_unchanged(id).err(),
        Some(ErrorCode::AllocationNotFound)
    );
    let new_id = b.server.import(moved).unwrap();
    assert_eq!(b.server.allocation_for(&ft), Some(new_id));
    // Same 5-tuple and connection token, permissions kept.
    let (d, _) = b.peer_data(new_id, "93.184.216.1:7000", b"hi").unwrap();
    assert_eq!((d.client, d.link), (ft, 7));
    let r = b.req(method::REFRESH);
    assert!(b.ask_authed(&ft, &r, "alice", "alicepw").ok());
    // Closing it there reports the 5-tuple.
    let r = b
        .req(method::REFRESH)
        .attr(attr::LIFETIME, &0u32.to_be_bytes());
    assert!(b.ask_authed(&ft, &r, "alice", "alicepw").ok());
    assert!(matches!(
        b.events()[..],
        [Event::AllocationClosed { five_tuple, .. }] if five_tuple == ft
    ));
}

#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut cfg = users_config();
    cfg.unauthenticated_rate = Some(2); // burst of 10
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    let same_ip_other_port = udp("203.0.113.5:40001");
    let other = udp("203.0.113.6:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let raw = r.build(None);
    let answered = (0..30)
        .filter(|_| h.send(&ft, &raw) == ClientAction::Reply)
        .count();
    assert_eq!(answered, 10, "the burst, then silence");
    assert_eq!(
        h.send(&same_ip_other_port, &raw),
        ClientAction::None,
        "counted per address"
    );
    assert_eq!(
        h.send(&other, &raw),
        ClientAction::Reply,
        "other sources unaffected"
    );
    // Unknown attributes and bad methods count too.
    let bad = h.req(method::CONNECT).build(None);
    assert_eq!(h.send(&ft, &bad), ClientAction::None);
    assert_eq!(h.server.take_suppressed(), 22);
    assert_eq!(h.server.take_suppressed(), 0);
    // Binding is not limited.
    let b = h.req(method::BINDING).build(None);
    assert_eq!(h.send(&ft, &b), ClientAction::Reply);
    // Two answers per second come back.
    h.advance(1);
    let answered = (0..10)
        .filter(|_| h.send(&ft, &raw) == ClientAction::Reply)
        .count();
    assert_eq!(answered, 2);
}

#[test]
fn authenticated_answers_are_not_limited() {
    let mut cfg = users_config();
    cfg.unauthenticated_rate = Some(1);
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let nonce = {
        let r = h.req(method::REFRESH);
        h.ask(&ft, &r.build(None)).nonce()
    };
    for _ in 0..50 {
        let r = h.req(method::REFRESH);
        assert!(
            h.ask(&ft, &r.build(Some(("alice", "alicepw", &nonce))))
                .ok()
        );
    }
}

#[test]
fn secure_stun_no_stun_and_stun_only() {
    let mut cfg = users_config();
    cfg.secure_stun = true;
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    let r = h.req(method::BINDING);
    let challenge = h.ask(&ft, &r.build(None));
    assert_eq!(challenge.code(), Some(401));
    let resp = h.ask(
        &ft,
        &r.build(Some(("alice", "alicepw", &challenge.nonce()))),
    );
    assert!(resp.ok());
    assert_eq!(resp.xor(attr::XOR_MAPPED_ADDRESS), ft.client);
    assert!(
        resp.msg()
            .verify_integrity(&long_term_key("alice", REALM, "alicepw"))
    );

    let mut cfg = users_config();
    cfg.no_stun = true;
    let mut h = Harness::new(cfg);
    let r = h.req(method::BINDING);
    assert_eq!(h.send(&ft, &r.build(None)), ClientAction::None);
    assert!(
        h.allocate(&ft, "alice", "alicepw").ok(),
        "TURN still served"
    );

    let mut cfg = users_config();
    cfg.stun_only = true;
    let mut h = Harness::new(cfg);
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    assert_eq!(h.send(&ft, &r.build(None)), ClientAction::None);
    let r = h.req(method::BINDING);
    assert!(h.ask(&ft, &r.build(None)).ok());
}

#[test]
fn quotas_answer_486_and_free_up_when_allocations_end() {
    let mut cfg = users_config();
    cfg.limits = quota::Limits {
        user_quota: 2,
        total_quota: 3,
        ..quota::Limits::default()
    };
    let mut h = Harness::new(cfg);
    let fts: Vec<FiveTuple> = (0..5)
        .map(|i| udp(&format!("203.0.113.5:{}", 41000 + i)))
        .collect();
    assert!(h.allocate(&fts[0], "alice", "alicepw").ok());
    assert!(h.allocate(&fts[1], "alice", "alicepw").ok());
    assert_eq!(
        h.allocate(&fts[2], "alice", "alicepw").code(),
        Some(486),
        "user-quota"
    );
    assert!(h.allocate(&fts[2], "bob", "bobpw").ok());
    assert_eq!(
        h.allocate(&fts[3], "bob", "bobpw").code(),
        Some(486),
        "total-quota"
    );
    assert_eq!(h.counts.borrow().allocations(), 3);
    // Ending allocations frees quota: by Refresh 0, and by expiry.
    let r = h.req(method::REFRESH).attr(attr::LIFETIME, &[0, 0, 0, 0]);
    assert!(h.ask_authed(&fts[0], &r, "alice", "alicepw").ok());
    assert!(h.allocate(&fts[3], "alice", "alicepw").ok());
    h.advance(601);
    assert_eq!(h.counts.borrow().allocations(), 0);
    assert_eq!(h.counts.borrow().of_user(REALM, "alice"), 0);
    // A refused relay socket gives its quota back.
    h.relays.fail = true;
    assert_eq!(h.allocate(&fts[4], "alice", "alicepw").code(), Some(508));
    assert_eq!(h.counts.borrow().allocations(), 0);
}

#[test]
fn rest_api_quota_counts_the_user_not_the_credential() {
    let auth = Authenticator {
        realm: REALM.into(),
        mechanism: Mechanism::RestApi {
            secrets: vec![b"s".to_vec()],
            separator: ':',
        },
    };
    let mut cfg = Config::new(auth, NonceIssuer::new([1; 32], Some(600)));
    cfg.limits.user_quota = 1;
    let mut h = Harness::new(cfg);
    let u1 = format!("{}:alice", UNIX0 + 100);
    let u2 = format!("{}:alice", UNIX0 + 200);
    let u3 = format!("{}:bob", UNIX0 + 200);
    assert!(
        h.allocate(&udp("203.0.113.5:1"), &u1, &rest_password(b"s", &u1))
            .ok()
    );
    assert_eq!(
        h.allocate(&udp("203.0.113.5:2"), &u2, &rest_password(b"s", &u2))
            .code(),
        Some(486)
    );
    assert!(
        h.allocate(&udp("203.0.113.5:3"), &u3, &rest_password(b"s", &u3))
            .ok()
    );
}

#[test]
fn bandwidth_capacity_and_max_bps() {
    let mut cfg = users_config();
    cfg.limits = quota::Limits {
        max_bps: 1000,
        bps_capacity: 2000,
        ..quota::Limits::default()
    };
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    assert!(
        h.allocate(&udp("203.0.113.5:40001"), "alice", "alicepw")
            .ok()
    );
    assert_eq!(
        h.allocate(&udp("203.0.113.5:40002"), "alice", "alicepw")
            .code(),
        Some(486),
        "capacity used up"
    );
    let id = h.server.allocation_for(&ft).unwrap();
    let bind = h
        .req(method::CHANNEL_BIND)
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
        .peer("93.184.216.1:5000");
    assert!(h.ask_authed(&ft, &bind, "alice", "alicepw").ok());
    // 1000 bytes per second each way: four 300-byte datagrams, then drops.
    let mut cd = vec![0x40, 0x00, 0x01, 0x2C];
    cd.extend([0u8; 300]);
    let sent = (0..10)
        .filter(|_| matches!(h.send(&ft, &cd), ClientAction::Relay { .. }))
        .count();
    assert_eq!(sent, 3);
    let received = (0..10)
        .filter(|_| h.peer_data(id, "93.184.216.1:5000", &[0u8; 300]).is_some())
        .count();
    assert_eq!(received, 3);
    h.now += Duration::from_millis(300);
    assert!(
        matches!(h.send(&ft, &cd), ClientAction::Relay { .. }),
        "refilled"
    );
}

#[test]
fn permission_and_channel_caps_answer_508() {
    let mut cfg = users_config();
    cfg.max_permissions = 3;
    cfg.max_channels = 2;
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let r = h
        .req(method::CREATE_PERMISSION)
        .peer("93.184.216.1:1")
        .peer("93.184.216.2:1");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    // Refreshing existing permissions is always fine.
    let r = h
        .req(method::CREATE_PERMISSION)
        .peer("93.184.216.1:1")
        .peer("93.184.216.2:1");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    let r = h
        .req(method::CREATE_PERMISSION)
        .peer("93.184.216.3:1")
        .peer("93.184.216.4:1");
    assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(508));
    let r = h.req(method::CREATE_PERMISSION).peer("93.184.216.3:1");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    let bind = |h: &mut Harness, n: u8, peer: &str| {
        let r = h
            .req(method::CHANNEL_BIND)
            .attr(attr::CHANNEL_NUMBER, &[0x40, n, 0, 0])
            .peer(peer);
        h.ask_authed(&ft, &r, "alice", "alicepw").code()
    };
    assert_eq!(bind(&mut h, 1, "93.184.216.1:5"), None);
    assert_eq!(bind(&mut h, 2, "93.184.216.2:5"), None);
    assert_eq!(bind(&mut h, 3, "93.184.216.3:5"), Some(508), "channel cap");
    assert_eq!(bind(&mut h, 1, "93.184.216.1:5"), None, "rebinding is fine");
    // Expired permissions make room again.
    h.advance(301);
    let r = h
        .req(method::CREATE_PERMISSION)
        .peer("93.184.216.7:1")
        .peer("93.184.216.8:1");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
}

/// A user database as the driver's cache presents it: users known (with a
/// key, or known to be absent) or not yet known (pending).
#[derive(Default)]
struct DbState {
    users: HashMap<(String, String), Option<Key>>,
    origins: HashMap<String, Arc<str>>,
    realms: HashMap<String, Arc<RealmSettings>>,
}

#[derive(Clone, Default)]
struct Db(Rc<RefCell<DbState>>);

impl Directory for Db {
    fn user_key(&self, realm: &str, user: &str) -> Lookup<Key> {
        match self.0.borrow().users.get(&(realm.into(), user.into())) {
            Some(Some(k)) => Lookup::Found(*k),
            Some(None) => Lookup::Absent,
            None => Lookup::Pending,
        }
    }
    fn secrets(&self, _: &str) -> Lookup<Secrets> {
        Lookup::Absent
    }
    fn realm_of_origin(&self, origin: &str) -> Option<Arc<str>> {
        self.0.borrow().origins.get(origin).cloned()
    }
    fn realm_settings(&self, realm: &str) -> Option<Arc<RealmSettings>> {
        self.0.borrow().realms.get(realm).cloned()
    }
}

impl Db {
    fn set_user(&self, realm: &str, user: &str, password: Option<&str>) {
        let key = password.map(|p| long_term_key(user, realm, p));
        self.0
            .borrow_mut()
            .users
            .insert((realm.into(), user.into()), key);
    }
}

/// A harness whose server also reads `db`.
fn with_db(cfg: Config, db: &Db) -> Harness {
    let mut h = Harness::new(cfg);
    let server = std::mem::replace(
        &mut h.server,
        Server::new(
            Arc::new(users_config()),
            Box::new(h.counts.clone()),
            0,
            h.t0,
            UNIX0,
            1,
        ),
    );
    h.server = server.with_directory(Box::new(db.clone()));
    h
}

/// A request signed for `user` in `realm`, with ORIGIN `origin` if given.
fn realm_request(
    h: &mut Harness,
    m: u16,
    attrs: &[(u16, Vec<u8>)],
    origin: Option<&str>,
    creds: Option<(&str, &str, &str, &[u8])>,
) -> Vec<u8> {
    let tid = h.req(m).tid;
    let key = creds.map(|(realm, user, pw, _)| long_term_key(user, realm, pw));
    let creds = creds
        .zip(key.as_ref())
        .map(|((realm, username, _, nonce), key)| Credentials {
            username,
            realm,
            nonce,
            key,
        });
    let build = |w: &mut MessageWriter<'_>| {
        for (t, v) in attrs {
            w.attr(*t, v);
        }
        if let Some(o) = origin {
            w.attr(attr::ORIGIN, o.as_bytes());
        }
    };
    request(m, &tid, build, creds.as_ref(), false)
}

fn udp_transport() -> Vec<(u16, Vec<u8>)> {
    vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])]
}

#[test]
fn a_database_user_is_looked_up_without_an_answer_then_served() {
    let db = Db::default();
    let mut h = with_db(users_config(), &db);
    let ft = udp("203.0.113.5:40000");
    let t = udp_transport();
    let first = realm_request(&mut h, method::ALLOCATE, &t, None, None);
    let challenge = h.ask(&ft, &first);
    assert_eq!(challenge.code(), Some(401));
    let nonce = challenge.nonce();
    let req = realm_request(
        &mut h,
        method::ALLOCATE,
        &t,
        None,
        Some((REALM, "carol", "cpw", &nonce)),
    );
    // Not known yet: no answer, the driver is asked to look carol up.
    assert_eq!(
        h.send(&ft, &req),
        ClientAction::Await(Wanted::User {
            realm: REALM.into(),
            name: "carol".into()
        })
    );
    assert_eq!(h.server.allocation_count(), 0);
    // The driver learnt the key and hands the same request in again.
    db.set_user(REALM, "carol", Some("cpw"));
    assert!(h.ask(&ft, &req).ok());
    // The configuration's users are not asked for.
    let other = udp("203.0.113.6:40000");
    assert!(h.allocate(&other, "alice", "alicepw").ok());
    // Deleted from the database: the next Refresh is refused and the
    // allocation ends.
    db.set_user(REALM, "carol", None);
    let refresh = realm_request(
        &mut h,
        method::REFRESH,
        &[],
        None,
        Some((REALM, "carol", "cpw", &nonce)),
    );
    assert_eq!(h.ask(&ft, &refresh).code(), Some(401));
    assert_eq!(h.server.allocation_for(&ft), None);
    assert!(matches!(h.events()[..], [Event::AllocationClosed { .. }]));
    assert_eq!(h.server.stats().ended[CloseReason::UserRemoved.index()], 1);
}

#[test]
fn an_origin_selects_a_realm_with_its_users_limits_and_peers() {
    let db = Db::default();
    db.set_user("tenant.example", "dave", Some("dpw"));
    db.0.borrow_mut()
        .origins
        .insert("https://tenant.example".into(), "tenant.example".into());
    db.0.borrow_mut().realms.insert(
        "tenant.example".into(),
        Arc::new(RealmSettings {
            user_quota: Some(1),
            denied_peers: vec!["93.184.216.0/24".parse().unwrap()],
            ..RealmSettings::default()
        }),
    );
    let mut h = with_db(users_config(), &db);
    let origin = Some("https://tenant.example");
    let t = udp_transport();
    let ft = udp("203.0.113.5:40000");
    let first = realm_request(&mut h, method::ALLOCATE, &t, origin, None);
    let challenge = h.ask(&ft, &first);
    assert_eq!(challenge.code(), Some(401));
    assert_eq!(
        challenge.msg().text(attr::REALM),
        Some(Ok("tenant.example")),
        "the 401 names the ORIGIN's realm"
    );
    let nonce = challenge.nonce();
    let dave = Some(("tenant.example", "dave", "dpw", &nonce[..]));
    let r = realm_request(&mut h, method::ALLOCATE, &t, origin, dave);
    assert!(h.ask(&ft, &r).ok());
    // The realm's user-quota of 1.
    let second = udp("203.0.113.5:40001");
    let r = realm_request(&mut h, method::ALLOCATE, &t, origin, dave);
    assert_eq!(h.ask(&second, &r).code(), Some(486));
    // The realm's denied peers, on top of the configuration's policy.
    let perm = |h: &mut Harness, peer: &str| {
        let tid = h.req(method::CREATE_PERMISSION).tid;
        let a: SocketAddr = peer.parse().unwrap();
        let x = attr::xor_address(a, &tid);
        let mut v = [0u8; 20];
        let n = crate::stun::encode_address(&mut v, x);
        let attrs = vec![(attr::XOR_PEER_ADDRESS, v[..n].to_vec())];
        realm_request(h, method::CREATE_PERMISSION, &attrs, origin, dave)
    };
    let denied = perm(&mut h, "93.184.216.34:1");
    assert_eq!(h.ask(&ft, &denied).code(), Some(403));
    let fine = perm(&mut h, "93.184.217.34:1");
    assert!(h.ask(&ft, &fine).ok());
    // The default realm's users are not the tenant's.
    let third = udp("203.0.113.5:40002");
    let alice = Some(("tenant.example", "alice", "alicepw", &nonce[..]));
    db.set_user("tenant.example", "alice", None);
    let r = realm_request(&mut h, method::ALLOCATE, &t, origin, alice);
    assert_eq!(h.ask(&third, &r).code(), Some(401));
}

#[test]
fn origin_consistency_is_checked_when_asked() {
    let db = Db::default();
    db.set_user(REALM, "carol", Some("cpw"));
    let mut h = with_db(users_config(), &db);
    h.server.set_config(Arc::new({
        let mut c = users_config();
        c.check_origin_consistency = true;
        c
    }));
    let ft = udp("203.0.113.5:40000");
    let t = udp_transport();
    let first = realm_request(&mut h, method::ALLOCATE, &t, Some("https://a"), None);
    let nonce = h.ask(&ft, &first).nonce();
    let carol = Some((REALM, "carol", "cpw", &nonce[..]));
    let r = realm_request(&mut h, method::ALLOCATE, &t, Some("https://a"), carol);
    assert!(h.ask(&ft, &r).ok());
    let refresh = realm_request(&mut h, method::REFRESH, &[], Some("https://b"), carol);
    assert_eq!(h.ask(&ft, &refresh).code(), Some(441));
    let refresh = realm_request(&mut h, method::REFRESH, &[], Some("https://a"), carol);
    assert!(h.ask(&ft, &refresh).ok());
}

#[test]
fn allocations_are_reported_when_asked_and_ended_by_user() {
    let mut cfg = users_config();
    cfg.report_allocations = true;
    let mut h = Harness::new(cfg);
    let ft = udp("203.0.113.5:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    let changes = |h: &mut Harness| -> Vec<(StatusChange, String, u32)> {
        h.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Status(s) => Some((s.change, s.username.to_string(), s.lifetime)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(changes(&mut h), [(StatusChange::New, "alice".into(), 600)]);
    let r = h
        .req(method::REFRESH)
        .attr(attr::LIFETIME, &900u32.to_be_bytes());
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    assert_eq!(
        changes(&mut h),
        [(StatusChange::Refreshed, "alice".into(), 900)]
    );
    // A Refresh with LIFETIME 0, as coturn reports it.
    let gone = udp("203.0.113.7:40000");
    assert!(h.allocate(&gone, "bob", "bobpw").ok());
    changes(&mut h);
    let r = h
        .req(method::REFRESH)
        .attr(attr::LIFETIME, &0u32.to_be_bytes());
    assert!(h.ask_authed(&gone, &r, "bob", "bobpw").ok());
    assert_eq!(
        changes(&mut h),
        [
            (StatusChange::Refreshed, "bob".into(), 0),
            (StatusChange::Deleted, "bob".into(), 0)
        ]
    );
    let other = udp("203.0.113.6:40000");
    assert!(h.allocate(&other, "bob", "bobpw").ok());
    changes(&mut h);
    // The operator ends alice's allocations; bob's stay.
    assert_eq!(h.server.close_user(h.now, Some("elsewhere"), "alice"), 0);
    assert_eq!(h.server.close_user(h.now, Some(REALM), "alice"), 1);
    assert_eq!(
        changes(&mut h),
        [(StatusChange::Deleted, "alice".into(), 0)]
    );
    assert_eq!(h.server.allocation_for(&ft), None);
    assert!(h.server.allocation_for(&other).is_some());
    assert_eq!(h.server.stats().ended[CloseReason::Revoked.index()], 1);
    // Without report_allocations, nothing but the closing events.
    let mut h = Harness::new(users_config());
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    assert!(h.events().is_empty());
}

/// A ledger that must ask beyond the process the first time, then grants.
#[derive(Default)]
struct AskingLedger {
    granted: bool,
}

impl quota::Ledger for AskingLedger {
    fn acquire(&mut self, realm: &str, user: &str, limits: &quota::Limits) -> quota::Acquire {
        if std::mem::replace(&mut self.granted, true) {
            Counts::default().take(realm, user, limits).into()
        } else {
            quota::Acquire::Pending
        }
    }
    fn release(&mut self, _: &quota::Claim) {}
    fn restore(&mut self, _: &quota::Claim) {}
}

#[test]
fn a_pending_quota_hands_the_allocate_back() {
    let mut h = Harness::new(users_config());
    h.server = Server::new(
        Arc::new(users_config()),
        Box::new(AskingLedger::default()),
        0,
        h.t0,
        UNIX0,
        3,
    );
    let ft = udp("203.0.113.5:40000");
    let r = h
        .req(method::ALLOCATE)
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    let challenge = h.ask(&ft, &r.build(None));
    let req = r.build(Some(("alice", "alicepw", &challenge.nonce())));
    assert_eq!(
        h.send(&ft, &req),
        ClientAction::Await(Wanted::Quota {
            realm: REALM.into(),
            user: "alice".into()
        })
    );
    assert!(
        h.relays.opened.is_empty(),
        "no relay before the quota allows it"
    );
    assert!(h.ask(&ft, &req).ok());
}

#[test]
fn a_fleet_redirect_answers_300_until_it_is_lifted() {
    let mut h = Harness::new(users_config());
    let to: SocketAddr = "198.51.100.20:3478".parse().unwrap();
    h.server.set_redirect(Some((to, None)));
    let ft = udp("203.0.113.5:40000");
    let r = h.allocate(&ft, "alice", "alicepw");
    assert_eq!(r.code(), Some(300));
    let alt = attr::decode_address(
        attr::ALTERNATE_SERVER,
        r.msg().get(attr::ALTERNATE_SERVER).unwrap(),
    )
    .unwrap();
    assert_eq!(alt, to);
    // Over TLS without a TLS address: served here.
    let tls = FiveTuple {
        transport: Transport::Tls,
        ..udp("203.0.113.6:40000")
    };
    assert!(h.allocate(&tls, "alice", "alicepw").ok());
    h.server.set_redirect(None);
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
}

/// RFC 8489 §9.2: the 401 announces the security features and offers
/// PASSWORD-ALGORITHMS; a request choosing SHA-256 is checked with the
/// SHA-256 key and answered with MESSAGE-INTEGRITY-SHA256.
mod rfc8489 {
    use super::*;
    use crate::auth::{
        FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY, PasswordAlgorithm,
        long_term_key_sha256, userhash,
    };

    const SHA256_THEN_MD5: [u8; 8] = [0, 2, 0, 0, 0, 1, 0, 0];

    /// How a test request identifies itself and signs.
    struct Sign<'a> {
        user: Option<&'a str>,
        hash: Option<[u8; 32]>,
        algorithm: Option<u16>,
        algorithms: Option<&'a [u8]>,
        key: Vec<u8>,
        sha256: bool,
        sha1: bool,
    }

    impl Default for Sign<'_> {
        fn default() -> Self {
            Sign {
                user: Some("alice"),
                hash: None,
                algorithm: Some(2),
                algorithms: Some(&SHA256_THEN_MD5),
                key: long_term_key_sha256("alice", REALM, "alicepw").to_vec(),
                sha256: true,
                sha1: false,
            }
        }
    }

    fn allocate(tid: u8, nonce: &[u8], s: &Sign<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, method::ALLOCATE, Class::Request, &[tid; 12]);
        w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        if let Some(u) = s.user {
            w.attr(attr::USERNAME, u.as_bytes());
        }
        if let Some(h) = &s.hash {
            w.attr(attr::USERHASH, h);
        }
        w.attr(attr::REALM, REALM.as_bytes());
        w.attr(attr::NONCE, nonce);
        if let Some(list) = s.algorithms {
            w.attr(attr::PASSWORD_ALGORITHMS, list);
        }
        if let Some(a) = s.algorithm {
            let c = a.to_be_bytes();
            w.attr(attr::PASSWORD_ALGORITHM, &[c[0], c[1], 0, 0]);
        }
        if s.sha1 {
            w.integrity(&s.key);
        }
        if s.sha256 {
            w.integrity_sha256(&s.key);
        }
        out
    }

    fn challenge(h: &mut Harness, ft: &FiveTuple) -> Resp {
        let r = h
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        let c = h.ask(ft, &r.build(None));
        assert_eq!(c.code(), Some(401));
        c
    }

    #[test]
    fn the_401_announces_features_and_offers_sha256_then_md5() {
        let mut h = Harness::new(users_config());
        let c = challenge(&mut h, &udp("198.51.100.1:5000"));
        let nonce = c.nonce();
        assert!(nonce.starts_with(b"obMatJos2"), "{nonce:?}");
        assert_eq!(
            NonceIssuer::features_of(&nonce),
            Some(FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY)
        );
        assert_eq!(
            c.msg().get(attr::PASSWORD_ALGORITHMS),
            Some(&SHA256_THEN_MD5[..])
        );
    }

    #[test]
    fn sha256_key_and_integrity_allocate_and_sign_the_answer() {
        let mut h = Harness::new(users_config());
        let ft = udp("198.51.100.1:5000");
        let nonce = challenge(&mut h, &ft).nonce();
        let s = Sign::default();
        let r = h.ask(&ft, &allocate(50, &nonce, &s));
        assert!(r.ok(), "{:?}", r.code());
        let m = r.msg();
        assert!(m.has_integrity_sha256());
        assert!(m.verify_integrity(&s.key));
        // A Refresh with the same key on the allocation works; one with the
        // MD5 key and no algorithm (RFC 5389 style) works too.
        let md5 = long_term_key("alice", REALM, "alicepw");
        let refresh = h.req(method::REFRESH);
        let r = h.ask(&ft, &refresh.build(Some(("alice", "alicepw", &nonce))));
        assert!(r.ok(), "{:?}", r.code());
        assert!(!r.msg().has_integrity_sha256());
        assert!(r.msg().verify_integrity(&md5));
    }

    #[test]
    fn md5_key_with_sha256_integrity_is_answered_with_sha256_integrity() {
        let mut h = Harness::new(users_config());
        let ft = udp("198.51.100.1:5000");
        let nonce = challenge(&mut h, &ft).nonce();
        let key = long_term_key("alice", REALM, "alicepw").to_vec();
        let s = Sign {
            algorithm: Some(1),
            key: key.clone(),
            sha1: true,
            ..Sign::default()
        };
        let r = h.ask(&ft, &allocate(51, &nonce, &s));
        assert!(r.ok(), "{:?}", r.code());
        assert!(r.msg().has_integrity_sha256() && r.msg().verify_integrity(&key));
    }

    #[test]
    fn mismatched_algorithms_get_400() {
        let mut h = Harness::new(users_config());
        let ft = udp("198.51.100.1:5000");
        let nonce = challenge(&mut h, &ft).nonce();
        let cases: [Sign<'_>; 4] = [
            // The list was bid down to MD5 only.
            Sign {
                algorithms: Some(&[0, 1, 0, 0]),
                ..Sign::default()
            },
            // PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS.
            Sign {
                algorithms: None,
                ..Sign::default()
            },
            // PASSWORD-ALGORITHMS without PASSWORD-ALGORITHM.
            Sign {
                algorithm: None,
                ..Sign::default()
            },
            // An algorithm that was not offered.
            Sign {
                algorithm: Some(7),
                ..Sign::default()
            },
        ];
        for (i, s) in cases.iter().enumerate() {
            let r = h.ask(&ft, &allocate(60 + i as u8, &nonce, s));
            assert_eq!(r.code(), Some(400), "case {i}");
        }
        assert_eq!(h.server.allocation_count(), 0);
    }

    #[test]
    fn userhash_finds_the_user() {
        let mut h = Harness::new(users_config());
        let ft = udp("198.51.100.1:5000");
        let nonce = challenge(&mut h, &ft).nonce();
        let s = Sign {
            user: None,
            hash: Some(userhash("alice", REALM)),
            ..Sign::default()
        };
        let r = h.ask(&ft, &allocate(70, &nonce, &s));
        assert!(r.ok(), "{:?}", r.code());
        // An unknown hash is 401.
        let ft2 = udp("198.51.100.1:5001");
        let nonce = challenge(&mut h, &ft2).nonce();
        let s = Sign {
            user: None,
            hash: Some(userhash("mallory", REALM)),
            ..Sign::default()
        };
        assert_eq!(h.ask(&ft2, &allocate(71, &nonce, &s)).code(), Some(401));
    }

    #[test]
    fn an_md5_only_user_choosing_sha256_gets_401() {
        let mut cfg = users_config();
        cfg.auth.mechanism = Mechanism::LongTerm(StaticUsers::new(
            REALM,
            [(
                "alice".to_string(),
                UserKeys::from(long_term_key("alice", REALM, "alicepw")),
            )],
        ));
        let mut h = Harness::new(cfg);
        let ft = udp("198.51.100.1:5000");
        let nonce = challenge(&mut h, &ft).nonce();
        let r = h.ask(&ft, &allocate(80, &nonce, &Sign::default()));
        assert_eq!(r.code(), Some(401));
        assert_eq!(
            h.server.stats().auth_failures[AuthFailure::NoSha256Key.index()],
            1
        );
    }

    #[test]
    fn require_sha256_refuses_sha1_only_requests() {
        let mut cfg = users_config();
        cfg.require_sha256 = true;
        let mut h = Harness::new(cfg);
        let ft = udp("198.51.100.1:5000");
        assert_eq!(h.allocate(&ft, "alice", "alicepw").code(), Some(401));
        let nonce = challenge(&mut h, &ft).nonce();
        let r = h.ask(&ft, &allocate(90, &nonce, &Sign::default()));
        assert!(r.ok(), "{:?}", r.code());
    }

    #[test]
    fn off_keeps_rfc5389_behaviour() {
        let mut cfg = users_config();
        cfg.password_algorithms = Vec::new();
        let mut h = Harness::new(cfg);
        let ft = udp("198.51.100.1:5000");
        let c = challenge(&mut h, &ft);
        assert_eq!(c.msg().get(attr::PASSWORD_ALGORITHMS), None);
        assert_eq!(
            NonceIssuer::features_of(&c.nonce()),
            Some(FEATURE_USERNAME_ANONYMITY)
        );
        // PASSWORD-ALGORITHM is then ignored: the MD5 key is used.
        let nonce = c.nonce();
        let s = Sign {
            algorithm: Some(PasswordAlgorithm::Sha256.code()),
            ..Sign::default()
        };
        assert_eq!(h.ask(&ft, &allocate(95, &nonce, &s)).code(), Some(401));
        assert!(h.allocate(&ft, "alice", "alicepw").ok());
    }
}

/// RFC 8656 §7.2 dual allocations: ADDITIONAL-ADDRESS-FAMILY gives an IPv4
/// and an IPv6 relayed address in one allocation.
mod dual {
    use super::*;

    fn dual_config() -> Config {
        let mut cfg = users_config();
        cfg.listening_ips = vec![
            "192.0.2.10".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
        ];
        cfg
    }

    fn dual_allocate(h: &mut Harness, ft: &FiveTuple, extra: &[(u16, &[u8])]) -> Resp {
        let mut r = h
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        for (t, v) in extra {
            r = r.attr(*t, v);
        }
        h.ask_authed(ft, &r, "alice", "alicepw")
    }

    fn relayed(r: &Resp) -> Vec<SocketAddr> {
        let m = r.msg();
        m.get_all(attr::XOR_RELAYED_ADDRESS)
            .map(|v| {
                attr::decode_xor_address(attr::XOR_RELAYED_ADDRESS, v, m.transaction_id()).unwrap()
            })
            .collect()
    }

    fn send_indication(h: &mut Harness, ft: &FiveTuple, peer: &str) -> ClientAction {
        let send = h.req(method::SEND).peer(peer).attr(attr::DATA, b"out");
        let mut raw = send.build(None);
        let t = message_type(method::SEND, Class::Indication).to_be_bytes();
        raw[..2].copy_from_slice(&t);
        h.send(ft, &raw)
    }

    #[test]
    fn both_families_are_relayed() {
        let mut h = Harness::new(dual_config());
        let ft = udp("203.0.113.5:40000");
        let r = dual_allocate(&mut h, &ft, &[]);
        assert!(r.ok(), "{:?}", r.code());
        let addrs = relayed(&r);
        assert_eq!(addrs.len(), 2, "{addrs:?}");
        assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
        assert_eq!(r.msg().get(attr::ADDRESS_ERROR_CODE), None);
        // One quota unit, two relay sockets under one allocation.
        assert_eq!(h.server.allocation_count(), 1);
        assert_eq!(h.relays.opened.len(), 2);
        let id = h.relays.opened[0].0;
        assert_eq!(h.relays.opened[1].0, id);
        // Peers of both families get permissions and traffic both ways.
        let perm = h
            .req(method::CREATE_PERMISSION)
            .peer("93.184.216.1:7000")
            .peer("[2606:4700::1]:7000");
        assert!(h.ask_authed(&ft, &perm, "alice", "alicepw").ok());
        for peer in ["93.184.216.1:7000", "[2606:4700::1]:7000"] {
            match send_indication(&mut h, &ft, peer) {
                ClientAction::Relay { allocation, .. } => assert_eq!(allocation, id),
                other => panic!("{peer}: expected relay, got {other:?}"),
            }
            assert!(h.peer_data(id, peer, b"in").is_some(), "{peer}");
        }
        // A Refresh naming either family is fine.
        for family in [1u8, 2] {
            let refresh = h
                .req(method::REFRESH)
                .attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0]);
            assert!(h.ask_authed(&ft, &refresh, "alice", "alicepw").ok());
        }
        // Deleting it closes both sockets.
        let delete = h
            .req(method::REFRESH)
            .attr(attr::LIFETIME, &0u32.to_be_bytes());
        assert!(h.ask_authed(&ft, &delete, "alice", "alicepw").ok());
        let closed = h.events();
        assert!(
            matches!(
                closed.as_slice(),
                [Event::AllocationClosed { relayed, additional: Some(a), .. }]
                    if *relayed == addrs[0] && *a == addrs[1]
            ),
            "{closed:?}"
        );
    }

    #[test]
    fn one_family_goes_and_the_other_stays() {
        let mut h = Harness::new(dual_config());
        let ft = udp("203.0.113.5:40000");
        let r = dual_allocate(&mut h, &ft, &[]);
        let addrs = relayed(&r);
        let drop_v6 = h
            .req(method::REFRESH)
            .attr(attr::LIFETIME, &0u32.to_be_bytes())
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        assert!(h.ask_authed(&ft, &drop_v6, "alice", "alicepw").ok());
        assert_eq!(h.server.allocation_count(), 1);
        let events = h.events();
        assert!(
            matches!(events.as_slice(), [Event::RelayClosed { relayed, .. }] if *relayed == addrs[1]),
            "{events:?}"
        );
        let perm = h.req(method::CREATE_PERMISSION).peer("[2606:4700::1]:7000");
        assert_eq!(
            h.ask_authed(&ft, &perm, "alice", "alicepw").code(),
            Some(443)
        );
        let perm = h.req(method::CREATE_PERMISSION).peer("93.184.216.1:7000");
        assert!(h.ask_authed(&ft, &perm, "alice", "alicepw").ok());
    }

    #[test]
    fn a_missing_family_is_named_in_address_error_code() {
        // Only IPv4 to relay on: success with the IPv4 relay, and 440 for
        // IPv6 in ADDRESS-ERROR-CODE (RFC 8656 §7.2).
        let mut h = Harness::new(users_config());
        let ft = udp("203.0.113.5:40000");
        let req = h
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        let nonce = h.ask(&ft, &req.build(None)).nonce();
        let signed = req.build(Some(("alice", "alicepw", &nonce)));
        let r = h.ask(&ft, &signed);
        assert!(r.ok(), "{:?}", r.code());
        let addrs = relayed(&r);
        assert_eq!(addrs.len(), 1);
        assert!(addrs[0].is_ipv4());
        let v = r.msg().get(attr::ADDRESS_ERROR_CODE).unwrap().to_vec();
        assert_eq!(&v[..4], &[0x02, 0, 4, 40]);
        // The same answer to a retransmission.
        let again = h.ask(&ft, &signed);
        assert_eq!(again.msg().get(attr::ADDRESS_ERROR_CODE), Some(&v[..]));
        let perm = h.req(method::CREATE_PERMISSION).peer("[2606:4700::1]:7000");
        assert_eq!(
            h.ask_authed(&ft, &perm, "alice", "alicepw").code(),
            Some(443)
        );
    }

    #[test]
    fn the_draft_attribute_numbers_coturn_sends_work_too() {
        // turnutils_uclient -Z asks with 0x8032 and reads 0x8033.
        let mut h = Harness::new(users_config());
        let ft = udp("203.0.113.5:40000");
        let r = h
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT, &[2, 0, 0, 0]);
        let resp = h.ask_authed(&ft, &r, "alice", "alicepw");
        assert!(resp.ok(), "{:?}", resp.code());
        assert_eq!(resp.msg().get(attr::ADDRESS_ERROR_CODE), None);
        let v = resp.msg().get(attr::ADDRESS_ERROR_CODE_DRAFT).unwrap();
        assert_eq!(&v[..4], &[0x02, 0, 4, 40]);
        let mut h = Harness::new(dual_config());
        let resp = h.ask_authed(&ft, &r, "alice", "alicepw");
        assert_eq!(relayed(&resp).len(), 2);
    }

    #[test]
    fn malformed_dual_requests_get_400() {
        let mut h = Harness::new(dual_config());
        let ft = udp("203.0.113.5:40000");
        let with_requested = dual_allocate(
            &mut h,
            &ft,
            &[(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0])],
        );
        assert_eq!(with_requested.code(), Some(400));
        let r = h
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]);
        assert_eq!(h.ask_authed(&ft, &r, "alice", "alicepw").code(), Some(400));
        assert_eq!(h.server.allocation_count(), 0);
    }
}

/// RFC 6062 in the core: what Connect, ConnectionBind and an incoming
/// peer connection are answered with.
mod tcp_relay {
    use super::*;

    fn tcp(client: &str) -> FiveTuple {
        FiveTuple {
            transport: Transport::Tcp,
            ..udp(client)
        }
    }

    fn tcp_allocation(h: &mut Harness, ft: &FiveTuple) -> AllocationId {
        let r = h
            .req(method::ALLOCATE)
            .attr(attr::REQUESTED_TRANSPORT, &[6, 0, 0, 0]);
        assert!(h.ask_authed(ft, &r, "alice", "alicepw").ok());
        h.server.allocation_for(ft).unwrap()
    }

    fn connect(h: &mut Harness, ft: &FiveTuple, peer: &str) -> ClientAction {
        let r = h.req(method::CONNECT).peer(peer);
        let challenge = h.ask(ft, &r.build(None));
        let nonce = challenge.nonce();
        h.send(ft, &r.build(Some(("alice", "alicepw", &nonce))))
    }

    #[test]
    fn connect_is_vetted_named_and_answered_later() {
        let mut h = Harness::new(users_config());
        let ft = tcp("203.0.113.5:40000");
        let id = tcp_allocation(&mut h, &ft);
        // The peer policy holds: a private address is 403.
        assert_eq!(connect(&mut h, &ft, "10.0.0.1:80"), ClientAction::Reply);
        assert_eq!(Resp { raw: h.out.clone() }.code(), Some(403));
        // A global one: the driver connects; the answer comes later.
        let ClientAction::Connect {
            allocation,
            peer,
            connection,
            ..
        } = connect(&mut h, &ft, "93.184.216.1:443")
        else {
            panic!("expected Connect");
        };
        assert_eq!(
            (allocation, peer),
            (id, "93.184.216.1:443".parse().unwrap())
        );
        // While it is being made, a second one is 446.
        assert_eq!(
            connect(&mut h, &ft, "93.184.216.1:443"),
            ClientAction::Reply
        );
        assert_eq!(Resp { raw: h.out.clone() }.code(), Some(446));
        // It failed: 447 to the control connection, and it may be tried again.
        let mut out = Vec::new();
        let (to, _) = h
            .server
            .tcp_connect_result(id, connection, false, &mut out)
            .unwrap();
        assert_eq!(to, ft);
        assert_eq!(Resp { raw: out.clone() }.code(), Some(447));
        let ClientAction::Connect { connection, .. } = connect(&mut h, &ft, "93.184.216.1:443")
        else {
            panic!("expected Connect");
        };
        h.server
            .tcp_connect_result(id, connection, true, &mut out)
            .unwrap();
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.class(), Class::Success);
        assert_eq!(
            m.get(attr::CONNECTION_ID),
            Some(&connection.to_be_bytes()[..])
        );
        assert!(m.verify_integrity(&long_term_key("alice", REALM, "alicepw")));
        // No channels on a TCP allocation.
        let bind = h
            .req(method::CHANNEL_BIND)
            .attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
            .peer("93.184.216.1:443");
        assert_eq!(
            h.ask_authed(&ft, &bind, "alice", "alicepw").code(),
            Some(400)
        );
    }

    #[test]
    fn incoming_peers_need_a_permission() {
        let mut h = Harness::new(users_config());
        let ft = tcp("203.0.113.5:40000");
        let id = tcp_allocation(&mut h, &ft);
        let peer: SocketAddr = "93.184.216.1:5555".parse().unwrap();
        let mut out = Vec::new();
        assert_eq!(h.server.tcp_peer_arrived(h.now, id, peer, &mut out), None);
        let perm = h.req(method::CREATE_PERMISSION).peer("93.184.216.1:1");
        assert!(h.ask_authed(&ft, &perm, "alice", "alicepw").ok());
        let (connection, to, _) = h
            .server
            .tcp_peer_arrived(h.now, id, peer, &mut out)
            .unwrap();
        assert_eq!(to, ft);
        let m = Message::parse(&out).unwrap();
        assert_eq!(m.method(), method::CONNECTION_ATTEMPT);
        assert_eq!(m.xor_address(attr::XOR_PEER_ADDRESS), Some(Ok(peer)));
        assert_eq!(
            m.get(attr::CONNECTION_ID),
            Some(&connection.to_be_bytes()[..])
        );
    }

    #[test]
    fn connection_bind_only_on_a_new_stream_connection() {
        let mut h = Harness::new(users_config());
        let ft = tcp("203.0.113.5:40000");
        tcp_allocation(&mut h, &ft);
        let bind = h
            .req(method::CONNECTION_BIND)
            .attr(attr::CONNECTION_ID, &7u32.to_be_bytes());
        // On the control connection: 400.
        assert_eq!(
            h.ask_authed(&ft, &bind, "alice", "alicepw").code(),
            Some(400)
        );
        // Over UDP: 400.
        let u = udp("203.0.113.5:40001");
        assert_eq!(
            h.ask_authed(&u, &bind, "alice", "alicepw").code(),
            Some(400)
        );
        // On a new TCP connection: the driver is asked to join it.
        let data = tcp("203.0.113.5:40002");
        let challenge = h.ask(&data, &bind.build(None));
        let nonce = challenge.nonce();
        let action = h.send(&data, &bind.build(Some(("alice", "alicepw", &nonce))));
        assert!(
            matches!(&action, ClientAction::BindConnection { connection: 7, username, .. } if username == "alice"),
            "{action:?}"
        );
        assert!(Resp { raw: h.out.clone() }.ok());
    }
}

/// A live takeover: a table saved at one instant and restored into a new
/// core (another process, another clock) relays on the same channel,
/// keeps its id, lifetimes, counters and quota claims, and answers
/// Refresh, CreatePermission and ChannelBind.
#[test]
fn a_saved_table_is_restored_into_a_new_core() {
    let mut h = Harness::new(users_config());
    let ft = udp("203.0.113.5:40000");
    let other = udp("203.0.113.6:40000");
    assert!(h.allocate(&ft, "alice", "alicepw").ok());
    assert!(h.allocate(&other, "bob", "bobpw").ok());
    let id = h.server.allocation_for(&ft).unwrap();
    let r = h
        .req(method::CHANNEL_BIND)
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x01, 0, 0])
        .peer("93.184.216.1:5000");
    assert!(h.ask_authed(&ft, &r, "alice", "alicepw").ok());
    assert!(h.peer_data(id, "93.184.216.1:5000", b"hello").is_some());
    h.advance(100);

    // Save only alice's allocation; bob's stays behind.
    let saved = h.server.save(h.now, |t| *t == ft);
    assert_eq!(saved.len(), 1);
    assert_eq!(saved[0].expires_in_ms, 500_000);
    let json = serde_json::to_string(&saved).unwrap();
    let back: Vec<SavedAllocation> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    let stats = h.server.stats().clone();
    assert_eq!(h.server.forget(saved.iter().map(SavedAllocation::id)), 1);
    assert!(
        h.events().is_empty(),
        "no AllocationClosed for a handed-over allocation"
    );
    assert_eq!(h.counts.borrow().allocations(), 1, "bob's claim only");
    assert!(h.server.allocation_for(&ft).is_none());

    // The successor: its own clock, ledger and seed.
    let mut s = Harness::new(users_config());
    s.now += Duration::from_secs(7);
    s.tid = 100;
    let back = back.into_iter().map(|a| (a, true)).collect();
    let floor = h.server.next_generation();
    assert_eq!(
        s.server.restore(s.now, back, floor).unwrap(),
        vec![Some(id)]
    );
    s.server.restore_stats(&stats);
    assert_eq!(s.server.stats().allocations_created, 2);
    assert_eq!(s.counts.borrow().allocations(), 1);
    assert_eq!(s.server.allocation_for(&ft), Some(id));
    assert_eq!(s.server.traffic(id).unwrap().to_client_packets, 1);
    s.server.check_invariants(Some(s.now)).unwrap();
    // The channel relays both ways.
    let (_, framed) = s.peer_data(id, "93.184.216.1:5000", b"again").unwrap();
    assert_eq!(&framed[..2], &[0x40, 0x01]);
    let mut cd = vec![0x40, 0x01, 0, 3];
    cd.extend_from_slice(b"abc");
    assert!(matches!(s.send(&ft, &cd), ClientAction::Relay { .. }));
    // Its lifetime continues: 500 s were left.
    s.advance(499);
    assert_eq!(s.server.allocation_for(&ft), Some(id));
    let refresh = s.req(method::REFRESH);
    assert!(s.ask_authed(&ft, &refresh, "alice", "alicepw").ok());
    let perm = s.req(method::CREATE_PERMISSION).peer("93.184.216.2:1");
    assert!(s.ask_authed(&ft, &perm, "alice", "alicepw").ok());
    let bind = s
        .req(method::CHANNEL_BIND)
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x02, 0, 0])
        .peer("93.184.216.2:1");
    assert!(s.ask_authed(&ft, &bind, "alice", "alicepw").ok());
    // A new allocation does not reuse the restored id.
    assert!(s.allocate(&other, "bob", "bobpw").ok());
    assert_ne!(s.server.allocation_for(&other), Some(id));
    s.server.check_invariants(Some(s.now)).unwrap();
    // Restoring into a core that has allocations is refused.
    let again = s.server.save(s.now, |_| true);
    let keep: Vec<_> = again.iter().cloned().map(|a| (a, true)).collect();
    assert_eq!(
        s.server.restore(s.now, keep, 1),
        Err(RestoreError::NotEmpty)
    );
    // Two predecessor workers merged into one: the same slot twice gets a
    // new id for the second, an allocation not kept gets a new id, and a
    // 5-tuple twice keeps the first only.
    let mut fresh = Harness::new(users_config());
    let (a, b) = (again[0].clone(), again[1].clone());
    let mut same_slot = b.clone();
    same_slot.index = a.index;
    same_slot.generation = a.generation;
    let ids = fresh
        .server
        .restore(
            fresh.now,
            vec![(a.clone(), true), (same_slot, true), (a.clone(), true)],
            1,
        )
        .unwrap();
    assert_eq!(ids[0], Some(a.id()));
    assert!(ids[1].is_some() && ids[1] != ids[0]);
    assert_eq!(ids[2], None);
    assert_eq!(fresh.server.allocation_count(), 2);
    assert_eq!(fresh.counts.borrow().allocations(), 2);
    fresh.server.check_invariants(None).unwrap();
    let mut other = Harness::new(users_config());
    // Not kept: a generation above any the predecessor worker issued.
    let ids = other
        .server
        .restore(other.now, vec![(a.clone(), false)], 1000)
        .unwrap();
    assert_eq!(ids[0].unwrap().slot(), 0);
    assert_ne!(ids[0], Some(a.id()), "a new id: {ids:?}");
    assert!(other.server.next_generation() > 1000);
}
