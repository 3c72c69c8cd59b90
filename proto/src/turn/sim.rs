//! A scripted population of clients and peers driving one core with
//! simulated time, for the `core_sequence` fuzz target and the property
//! tests: arbitrary bytes become a sequence of [`Op`]s (well-formed,
//! correctly signed requests as well as raw bytes), and after every step the
//! core's invariants must hold and nothing may panic.
//!
//! Compiled for tests and with the `fuzzing` feature only.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};

use super::policy::PeerPolicy;
use super::quota::{Counts, Limits};
use super::{
    AllocationId, ClientAction, Config, FiveTuple, OpenedRelay, PortRequest, RelayError,
    RelayProvider, RelayRequest, Server, Transport,
};
use crate::auth::{Authenticator, Mechanism, NonceIssuer, StaticUsers, UserKeys, long_term_key};
use crate::stun::channel::{HEADROOM, TAILROOM};
use crate::stun::client::{Credentials, write_request};
use crate::stun::{Class, Message, MessageWriter, attr, method};

const REALM: &str = "sim";
const CLIENTS: usize = 6;

/// One step of the script.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Arbitrary bytes from a client.
    Raw {
        who: u8,
        bytes: Vec<u8>,
    },
    Allocate {
        who: u8,
        lifetime: Option<u32>,
        even_port: Option<bool>,
        use_token: bool,
        family: Option<u8>,
        mobile: bool,
        transport: u8,
        fingerprint: bool,
    },
    Refresh {
        who: u8,
        lifetime: Option<u32>,
        family: Option<u8>,
        ticket: Option<u8>,
    },
    CreatePermission {
        who: u8,
        peers: Vec<u8>,
    },
    ChannelBind {
        who: u8,
        number: u16,
        peer: u8,
    },
    Send {
        who: u8,
        peer: u8,
        len: u8,
    },
    ChannelData {
        who: u8,
        number: u16,
        len: u8,
        padded: bool,
    },
    /// A Binding request, with RFC 5780's CHANGE-REQUEST (flags),
    /// RESPONSE-PORT and PADDING when asked.
    Binding {
        who: u8,
        change: Option<u8>,
        response_port: Option<u16>,
        padding: u8,
    },
    /// A datagram from a peer to one of the allocations.
    Peer {
        pick: u8,
        peer: u8,
        len: u16,
    },
    Advance {
        secs: u16,
    },
    /// A stream client's connection closes.
    Close {
        who: u8,
    },
    /// The relay provider runs out of ports for a while.
    Exhaust {
        on: bool,
    },
    /// A live takeover: the table is saved, forgotten, and restored into a
    /// new core with a ledger of its own (RFC 6062 TCP allocations stay
    /// behind and end with the old core), at a clock `skew_ms` later.
    Takeover {
        skew_ms: u16,
    },
}

/// Whether the simulated server listens on `addr` (its two listening
/// addresses, RFC 5780's two ports).
fn cfg_listens(addr: SocketAddr) -> bool {
    matches!(addr.port(), 3478 | 3479)
        && ["192.0.2.10", "192.0.2.11", "2001:db8::10"]
            .iter()
            .any(|ip| addr.ip() == ip.parse::<std::net::IpAddr>().expect("ip"))
}

/// Peers: global, forbidden, and the server's own relay address.
fn peer(i: u8) -> SocketAddr {
    const PEERS: &[&str] = &[
        "93.184.216.34:5000",
        "93.184.216.35:6000",
        "[2606:4700::1111]:7000",
        "127.0.0.1:9",
        "10.0.0.1:9",
        "[::ffff:127.0.0.1]:9",
        "[64:ff9b::a9fe:a9fe]:80",
        "192.0.2.10:50002",
        "192.0.2.10:22",
        "0.0.0.0:1",
        "[::1]:50000",
    ];
    PEERS[usize::from(i) % PEERS.len()].parse().expect("valid")
}

fn client(who: u8) -> (FiveTuple, u32) {
    let i = usize::from(who) % CLIENTS;
    let transport = match i % 3 {
        0 => Transport::Udp,
        1 => Transport::Tcp,
        _ => Transport::Tls,
    };
    let ft = FiveTuple {
        client: format!("203.0.113.{}:{}", 1 + i % 2, 40000 + i)
            .parse()
            .expect("valid"),
        server: if i == 5 {
            "[2001:db8::10]:3478"
        } else {
            "192.0.2.10:3478"
        }
        .parse()
        .expect("valid"),
        transport,
    };
    (ft, i as u32)
}

#[derive(Default)]
struct Relays {
    next: u16,
    exhausted: bool,
    reserved: BTreeMap<[u8; 8], SocketAddr>,
}

impl RelayProvider for Relays {
    fn open(&mut self, _: AllocationId, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        if self.exhausted {
            return Err(RelayError::NoPortAvailable);
        }
        if let PortRequest::Reserved(t) = req.port {
            let addr = self.reserved.remove(&t).ok_or(RelayError::NoReservation)?;
            return Ok(OpenedRelay {
                addr,
                reservation: None,
            });
        }
        self.next = self.next.wrapping_add(2);
        let port = 50000 + (self.next % 10000);
        let addr = SocketAddr::new(req.ip, port);
        let reservation = matches!(req.port, PortRequest::Even { reserve_next: true }).then(|| {
            let t = port.to_be_bytes().repeat(4).try_into().expect("8 bytes");
            self.reserved.insert(t, SocketAddr::new(req.ip, port + 1));
            t
        });
        Ok(OpenedRelay { addr, reservation })
    }
}

/// The simulated server and its clients.
pub struct Sim {
    pub server: Server,
    /// The quota counts the server's ledger holds.
    counts: Rc<RefCell<Counts>>,
    relays: Relays,
    now: Instant,
    out: Vec<u8>,
    auth: bool,
    nonces: BTreeMap<IpAddr, Vec<u8>>,
    tickets: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
    tid: u32,
}

impl Sim {
    /// A server with long-term credentials (`auth`) or none, small caps and
    /// quotas so the script reaches their edges, starting at `now`.
    pub fn new(auth: bool, now: Instant) -> Sim {
        let counts = Rc::new(RefCell::new(Counts::default()));
        Sim {
            server: Self::server(auth, now, &counts),
            counts,
            relays: Relays::default(),
            now,
            out: Vec::new(),
            auth,
            nonces: BTreeMap::new(),
            tickets: Vec::new(),
            tokens: Vec::new(),
            tid: 0,
        }
    }

    /// The simulated core, counting quotas in `counts`.
    fn server(auth: bool, now: Instant, counts: &Rc<RefCell<Counts>>) -> Server {
        let mechanism = if auth {
            Mechanism::LongTerm(StaticUsers::new(
                REALM,
                [("u".to_string(), UserKeys::from_password("u", REALM, "p"))],
            ))
        } else {
            Mechanism::None
        };
        let mut cfg = Config::new(
            Authenticator {
                realm: REALM.into(),
                mechanism,
            },
            NonceIssuer::new([3; 32], Some(600)),
        );
        cfg.listening_ips = vec![
            "192.0.2.10".parse().expect("ip"),
            "2001:db8::10".parse().expect("ip"),
            "192.0.2.11".parse().expect("ip"),
        ];
        cfg.policy = PeerPolicy {
            own_relay_ips: cfg.listening_ips.clone(),
            relay_ports: (50000, 60000),
            ..PeerPolicy::default()
        };
        cfg.mobility = true;
        // RFC 5780 on both listening addresses' ports.
        cfg.rfc5780 = Some((3478, 3479));
        // Malformed messages go through the RFC 3489 path too.
        cfg.rfc3489 = true;
        cfg.max_permissions = 4;
        cfg.max_channels = 3;
        cfg.limits = Limits {
            user_quota: 4,
            total_quota: 5,
            max_bps: 20_000,
            bps_capacity: 0,
        };
        Server::new(
            Arc::new(cfg),
            Box::new(counts.clone()),
            0,
            now,
            1_800_000_000,
            7,
        )
    }

    fn send(&mut self, ft: &FiveTuple, link: u32, bytes: &[u8]) -> ClientAction {
        let action =
            self.server
                .handle_client(self.now, ft, link, bytes, &mut self.out, &mut self.relays);
        if let ClientAction::Relay { payload, .. } = &action {
            assert!(
                payload.end <= bytes.len(),
                "payload range outside the message"
            );
        }
        while self.server.poll_event().is_some() {}
        action
    }

    /// Sends a request built by `build` (attributes before credentials),
    /// signing it and doing the 401/438 round trip when auth is on.
    fn request(
        &mut self,
        who: u8,
        m: u16,
        fingerprint: bool,
        build: &dyn Fn(&mut MessageWriter<'_>),
    ) {
        let (ft, link) = client(who);
        for _ in 0..2 {
            self.tid = self.tid.wrapping_add(1);
            let mut tid = [0u8; 12];
            tid[..4].copy_from_slice(&self.tid.to_be_bytes());
            let nonce = self
                .nonces
                .get(&ft.client.ip())
                .cloned()
                .unwrap_or_default();
            let key = long_term_key("u", REALM, "p");
            let creds = self.auth.then_some(Credentials {
                username: "u",
                realm: REALM,
                nonce: &nonce,
                key: &key,
            });
            let mut raw = Vec::new();
            write_request(&mut raw, m, &tid, build, creds.as_ref(), fingerprint);
            match self.send(&ft, link, &raw) {
                ClientAction::Reply => {}
                ClientAction::ReplyFrom { from, to } => {
                    // RFC 5780: from another of the server's addresses, to
                    // the client's address.
                    assert!(cfg_listens(from), "answer from {from}, not a listener");
                    assert_eq!(to.ip(), ft.client.ip(), "answer to another host");
                }
                _ => return,
            }
            let Ok(resp) = Message::parse(&self.out) else {
                panic!("the core replied with an unparseable message");
            };
            assert_eq!(resp.transaction_id(), &tid, "reply to another transaction");
            if let Some(t) = resp.get(attr::MOBILITY_TICKET) {
                self.tickets.push(t.to_vec());
            }
            if let Some(t) = resp.get(attr::RESERVATION_TOKEN) {
                self.tokens.push(t.to_vec());
            }
            match resp.get(attr::ERROR_CODE).map(attr::decode_error_code) {
                Some(Ok((401 | 438, _))) => {
                    if let Some(n) = resp.get(attr::NONCE) {
                        self.nonces.insert(ft.client.ip(), n.to_vec());
                    }
                }
                _ => return,
            }
        }
    }

    /// Applies one step, then expires what is due.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Raw { who, bytes } => {
                let (ft, link) = client(*who);
                self.send(&ft, link, bytes);
            }
            Op::Allocate {
                who,
                lifetime,
                even_port,
                use_token,
                family,
                mobile,
                transport,
                fingerprint,
            } => {
                let token = use_token.then(|| self.tokens.last().cloned()).flatten();
                let transport = if transport % 8 == 0 { 6 } else { 17 };
                self.request(*who, method::ALLOCATE, *fingerprint, &|w| {
                    w.attr(attr::REQUESTED_TRANSPORT, &[transport, 0, 0, 0]);
                    if let Some(l) = lifetime {
                        w.attr_u32(attr::LIFETIME, *l);
                    }
                    if let Some(r) = even_port {
                        w.attr(attr::EVEN_PORT, &[if *r { 0x80 } else { 0 }]);
                    }
                    if let Some(t) = &token {
                        w.attr(attr::RESERVATION_TOKEN, t);
                    }
                    // The top bits ask for a dual allocation instead (RFC
                    // 8656's attribute or the draft's coturn sends), with
                    // or without REQUESTED-ADDRESS-FAMILY beside it.
                    match family {
                        Some(f) if f & 0xC0 == 0x40 || f & 0xC0 == 0x80 => {
                            let typ = if f & 0x40 != 0 {
                                attr::ADDITIONAL_ADDRESS_FAMILY
                            } else {
                                attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT
                            };
                            w.attr(typ, &[(*f >> 3) % 4, 0, 0, 0]);
                            if f & 0x20 != 0 {
                                w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[*f % 4, 0, 0, 0]);
                            }
                        }
                        Some(f) => {
                            w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[*f % 4, 0, 0, 0]);
                        }
                        None => {}
                    }
                    if *mobile {
                        w.attr(attr::MOBILITY_TICKET, b"");
                    }
                });
            }
            Op::Refresh {
                who,
                lifetime,
                family,
                ticket,
            } => {
                let ticket = ticket.and_then(|i| {
                    self.tickets
                        .get(usize::from(i) % self.tickets.len().max(1))
                        .cloned()
                });
                self.request(*who, method::REFRESH, false, &|w| {
                    if let Some(l) = lifetime {
                        w.attr_u32(attr::LIFETIME, *l % 7200);
                    }
                    if let Some(f) = family {
                        w.attr(attr::REQUESTED_ADDRESS_FAMILY, &[*f % 4, 0, 0, 0]);
                    }
                    if let Some(t) = &ticket {
                        w.attr(attr::MOBILITY_TICKET, t);
                    }
                });
            }
            Op::CreatePermission { who, peers } => {
                let peers: Vec<SocketAddr> = peers.iter().take(6).map(|p| peer(*p)).collect();
                self.request(*who, method::CREATE_PERMISSION, true, &|w| {
                    for p in &peers {
                        w.xor_address(attr::XOR_PEER_ADDRESS, *p);
                    }
                });
            }
            Op::ChannelBind {
                who,
                number,
                peer: p,
            } => {
                let number = 0x3FF0 + number % 0x20 + if number % 3 == 0 { 0x3000 } else { 0 };
                let p = peer(*p);
                self.request(*who, method::CHANNEL_BIND, true, &|w| {
                    w.attr(
                        attr::CHANNEL_NUMBER,
                        &[(number >> 8) as u8, number as u8, 0, 0],
                    )
                    .xor_address(attr::XOR_PEER_ADDRESS, p);
                });
            }
            Op::Binding {
                who,
                change,
                response_port,
                padding,
            } => {
                self.request(*who, method::BINDING, false, &|w| {
                    if let Some(c) = change {
                        w.attr(attr::CHANGE_REQUEST, &[0, 0, 0, *c]);
                    }
                    if let Some(p) = response_port {
                        let [hi, lo] = p.to_be_bytes();
                        w.attr(attr::RESPONSE_PORT, &[hi, lo, 0, 0]);
                    }
                    if *padding > 0 {
                        w.attr(attr::PADDING, &vec![0; usize::from(*padding)]);
                    }
                });
            }
            Op::Send { who, peer: p, len } => {
                let (ft, link) = client(*who);
                let mut raw = Vec::new();
                MessageWriter::new(&mut raw, method::SEND, Class::Indication, &[9; 12])
                    .xor_address(attr::XOR_PEER_ADDRESS, peer(*p))
                    .attr(attr::DATA, &vec![0x5A; usize::from(*len)]);
                self.send(&ft, link, &raw);
            }
            Op::ChannelData {
                who,
                number,
                len,
                padded,
            } => {
                let (ft, link) = client(*who);
                let number = 0x4000 + number % 0x10;
                let mut raw = vec![(number >> 8) as u8, number as u8, 0, *len];
                raw.extend(vec![0xA5; usize::from(*len)]);
                if *padded {
                    raw.extend(vec![0; (4 - usize::from(*len) % 4) % 4]);
                }
                self.send(&ft, link, &raw);
            }
            Op::Peer { pick, peer: p, len } => {
                let (ft, _) = client(*pick);
                if let Some(id) = self.server.allocation_for(&ft) {
                    let len = usize::from(*len % 1500);
                    let mut buf = vec![0u8; HEADROOM + len + TAILROOM];
                    if let Some(d) = self.server.handle_peer(
                        self.now,
                        id,
                        peer(*p),
                        &mut buf,
                        HEADROOM..HEADROOM + len,
                    ) {
                        assert_eq!(d.client, ft);
                        let framed = &buf[d.range.clone()];
                        if framed[0] >> 6 == 0 {
                            let m = Message::parse(framed).expect("a Data indication parses");
                            assert_eq!(m.get(attr::DATA).map(<[u8]>::len), Some(len));
                        } else {
                            assert_eq!(
                                usize::from(u16::from_be_bytes([framed[2], framed[3]])),
                                len
                            );
                        }
                    }
                }
            }
            Op::Advance { secs } => {
                self.now += Duration::from_secs(u64::from(*secs % 900));
            }
            Op::Close { who } => {
                let (ft, _) = client(*who);
                if ft.transport.is_stream() {
                    self.server.client_closed(self.now, &ft);
                }
            }
            Op::Exhaust { on } => self.relays.exhausted = *on,
            Op::Takeover { skew_ms } => {
                let saved = self.server.save(self.now, |_| true);
                let n = self.server.forget(saved.iter().map(|a| a.id()));
                assert_eq!(n, saved.len(), "every saved allocation is forgotten");
                let counts = Rc::new(RefCell::new(Counts::default()));
                let mut next = Self::server(self.auth, self.now, &counts);
                let stats = self.server.stats().clone();
                self.now += Duration::from_millis(u64::from(*skew_ms));
                let n = saved.len();
                let saved = saved.into_iter().map(|a| (a, true)).collect();
                let floor = self.server.next_generation();
                let ids = next
                    .restore(self.now, saved, floor)
                    .expect("a saved table restores into a new core");
                assert_eq!(ids.iter().flatten().count(), n, "a table has no duplicates");
                assert_eq!(n, next.allocation_count());
                next.restore_stats(&stats);
                self.server = next;
                self.counts = counts;
            }
        }
        self.server.handle_timeout(self.now);
        while self.server.poll_event().is_some() {}
    }

    /// Checks the core's invariants and that quota accounting matches.
    pub fn check(&self) -> Result<(), String> {
        self.server.check_invariants(Some(self.now))?;
        let counted = self.counts.borrow().allocations() as usize;
        if counted != self.server.allocation_count() {
            return Err(format!(
                "usage counts {counted}, table holds {}",
                self.server.allocation_count()
            ));
        }
        Ok(())
    }
}

/// Interprets `data` as a script and runs it from `now`, checking
/// invariants after every step. The first byte picks whether credentials
/// are in use.
pub fn run(data: &[u8], now: Instant) -> Result<(), String> {
    let mut u = Unstructured::new(data);
    let auth = u.arbitrary::<bool>().unwrap_or(false);
    let mut sim = Sim::new(auth, now);
    let mut steps = 0;
    while !u.is_empty() && steps < 256 {
        let Ok(op) = u.arbitrary::<Op>() else { break };
        sim.apply(&op);
        sim.check()
            .map_err(|e| format!("after step {steps} ({op:?}): {e}"))?;
        steps += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // Instant::now as the base time

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any sequence of client messages, peer datagrams, time and
        /// failures leaves a consistent allocation table and exact quota
        /// accounting.
        #[test]
        fn allocation_invariants_hold_for_any_script(data in prop::collection::vec(any::<u8>(), 0..4096)) {
            if let Err(e) = run(&data, Instant::now()) {
                prop_assert!(false, "{}", e);
            }
        }
    }

    #[test]
    fn a_scripted_session_reaches_deep_states() {
        let mut sim = Sim::new(true, Instant::now());
        let ops = [
            Op::Allocate {
                who: 0,
                lifetime: None,
                even_port: Some(true),
                use_token: false,
                family: None,
                mobile: true,
                transport: 1,
                fingerprint: true,
            },
            Op::Allocate {
                who: 3,
                lifetime: Some(900),
                even_port: None,
                use_token: true,
                family: None,
                mobile: false,
                transport: 1,
                fingerprint: false,
            },
            Op::CreatePermission {
                who: 0,
                peers: vec![0, 1],
            },
            Op::ChannelBind {
                who: 0,
                number: 1,
                peer: 0,
            },
            Op::ChannelData {
                who: 0,
                number: 0,
                len: 10,
                padded: false,
            },
            Op::Peer {
                pick: 0,
                peer: 0,
                len: 100,
            },
            Op::Refresh {
                who: 4,
                lifetime: None,
                family: None,
                ticket: Some(0),
            },
        ];
        for op in &ops {
            sim.apply(op);
            sim.check().unwrap();
        }
        assert_eq!(sim.server.allocation_count(), 2);
        assert!(
            sim.server.allocation_for(&client(4).0).is_some(),
            "moved by its ticket"
        );
        assert!(
            sim.server.allocation_for(&client(3).0).is_some(),
            "claimed the reservation"
        );
    }
}
