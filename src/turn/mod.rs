//! The sans-IO TURN server core (RFC 8656, with RFC 8489 Binding and
//! long-term credentials).
//!
//! [`Server`] owns the allocation table: allocations keyed by their client
//! 5-tuple, each with its permissions, channel bindings and expiry times. It
//! never touches a socket or reads a clock. The driver passes in every
//! received client message and peer datagram with the current [`Instant`],
//! sends what the core decides, and calls [`Server::handle_timeout`] at least
//! once a second so lifetimes expire. Relay sockets are opened through the
//! [`RelayProvider`] the driver hands in, and closed when the driver drains
//! [`Event::AllocationClosed`] from [`Server::poll_event`].
//!
//! The relay hot path allocates nothing: client ChannelData and Send
//! indications come back as [`ClientAction::Relay`] with the payload's range
//! in the caller's buffer, and peer data is framed in place by
//! [`Server::handle_peer`].

mod auth_log;
pub mod policy;
pub mod quota;
#[cfg(any(test, feature = "fuzzing"))]
pub mod sim;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use slab::Slab;
use tracing::{debug, info, trace};

use crate::auth::{AuthFailure, Authenticator, Key, NonceCheck, NonceIssuer};
use crate::stun::channel::{self, MAX_CHANNEL_RFC5766, MIN_CHANNEL};
use crate::stun::{Class, Message, MessageWriter, attr, method};
use policy::PeerPolicy;

/// Default allocation lifetime, seconds (RFC 8656 §7.2).
pub const DEFAULT_ALLOCATION_LIFETIME: u32 = 600;
/// How long a channel number and peer stay reserved after the binding
/// expires, seconds (RFC 8656 §12).
pub const CHANNEL_REBIND_GUARD: u64 = 300;
/// Default cap on permissions per allocation (a WebRTC client needs one per
/// remote candidate address).
pub const DEFAULT_MAX_PERMISSIONS: usize = 64;
/// Default cap on channel bindings per allocation.
pub const DEFAULT_MAX_CHANNELS: usize = 64;

/// Default limit on answers to unauthenticated requests per source address,
/// per second.
pub const DEFAULT_UNAUTHENTICATED_RATE: u32 = 20;
/// Source addresses the rate limiter tracks at once per worker; more share
/// slots (the newest wins), so memory stays fixed under spoofed floods.
const RATE_SLOTS: usize = 4096;

/// How long an EVEN-PORT reservation is held, seconds (RFC 8656 §7.2:
/// "about 30 seconds"). The driver enforces it.
pub const RESERVATION_LIFETIME: u64 = 30;

/// Transport between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// TCP and TLS carry a byte stream, so ChannelData is padded to 4 bytes.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        })
    }
}

/// The client side 5-tuple that identifies an allocation (RFC 8656 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiveTuple {
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The server address the client sent to.
    pub server: SocketAddr,
    pub transport: Transport,
}

/// An IP address as 128 bits (IPv4 in the low 32), for hashing.
fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Hashes the addresses, ports and transport in one write when both
/// addresses are IPv4 (all of it fits in 128 bits), else in three, rather
/// than field by field (a dozen writes through `SocketAddr`'s own `Hash`):
/// the allocation table is looked up by 5-tuple for every datagram a client
/// sends. Values equal under `Eq` hash alike (IPv6 flow info and scope,
/// which `Eq` also compares, are left out of the hash).
impl std::hash::Hash for FiveTuple {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let ports = u128::from(self.client.port()) << 24
            | u128::from(self.server.port()) << 8
            | (self.transport as u128) << 2;
        match (self.client.ip(), self.server.ip()) {
            (IpAddr::V4(c), IpAddr::V4(s)) => state.write_u128(
                u128::from(u32::from(c)) << 96 | u128::from(u32::from(s)) << 64 | ports,
            ),
            (c, s) => {
                state.write_u128(ip_bits(c));
                state.write_u128(ip_bits(s));
                let family = u128::from(c.is_ipv6()) << 1 | u128::from(s.is_ipv6());
                state.write_u64((ports | family) as u64);
            }
        }
    }
}

impl fmt::Display for FiveTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}->{}", self.transport, self.client, self.server)
    }
}

/// Identifies an allocation; stays unique for the life of the [`Server`]
/// (slots are reused, generations are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocationId {
    index: u32,
    generation: u32,
}

impl AllocationId {
    /// The allocation's slot in its [`Server`]'s table: small and dense, so
    /// a driver can index its own per-allocation tables with it. A slot is
    /// reused once its allocation ends; compare whole ids to tell the
    /// allocations apart.
    pub fn slot(&self) -> usize {
        self.index as usize
    }
}

/// Address family of a relayed transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// Relay address family used when an Allocate has no
/// REQUESTED-ADDRESS-FAMILY (coturn's `allocation-default-address-family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultFamily {
    /// IPv4, as RFC 8656 §7.2 specifies.
    #[default]
    Ipv4,
    Ipv6,
    /// The family of the address the client connected to.
    Keep,
}

/// `external-ip`: the public address advertised in XOR-RELAYED-ADDRESS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalIp {
    pub public: IpAddr,
    /// With `public/private`, only relays bound on `private` map to `public`;
    /// without it, every relay of the same family does.
    pub private: Option<IpAddr>,
}

/// Settings of the core, shared by every worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub auth: Authenticator,
    pub nonces: NonceIssuer,
    /// Add FINGERPRINT to every response (`fingerprint`); responses to
    /// requests carrying FINGERPRINT get one regardless.
    pub fingerprint: bool,
    /// SOFTWARE attribute for responses, if any.
    pub software: Option<String>,
    /// Cap on allocation lifetime, seconds (`max-allocate-lifetime`).
    pub max_allocation_lifetime: u32,
    /// Permission lifetime, seconds (`permission-lifetime`, 300).
    pub permission_lifetime: u32,
    /// Channel binding lifetime, seconds (`channel-lifetime`, 600).
    pub channel_lifetime: u32,
    pub policy: PeerPolicy,
    /// `relay-ip` addresses; empty means "the address the client used".
    pub relay_ips: Vec<IpAddr>,
    /// Every address the server listens on (fallback relay addresses for a
    /// family the client did not connect over).
    pub listening_ips: Vec<IpAddr>,
    pub external_ips: Vec<ExternalIp>,
    pub default_family: DefaultFamily,
    /// Accept channel numbers 0x5000–0x7FFF (RFC 5766) as well as
    /// 0x4000–0x4FFF (RFC 8656).
    pub rfc5766_channels: bool,
    /// Grant UDP relays (`no-udp-relay` turns this off: every Allocate
    /// gets 442).
    pub allow_udp_relay: bool,
    /// RFC 8016 mobility (`mobility`): allocations asked for with an empty
    /// MOBILITY-TICKET get a ticket, and a Refresh carrying it from another
    /// 5-tuple moves the allocation there. Off: MOBILITY-TICKET gets 405.
    pub mobility: bool,
    /// Key authenticating mobility tickets; shared by every worker.
    pub ticket_key: [u8; 32],
    /// Answers to unauthenticated requests (401, 438, 400, 420, 441) per
    /// second per source address, with a burst of five seconds' worth;
    /// `None` = unlimited (`unauthorized-ratelimit-rps`). Each worker counts
    /// its own clients.
    pub unauthenticated_rate: Option<u32>,
    /// Binding requires long-term credentials too (`secure-stun`).
    pub secure_stun: bool,
    /// Binding requests are ignored (`no-stun`).
    pub no_stun: bool,
    /// TURN requests are ignored: a STUN-only server (`stun-only`).
    pub stun_only: bool,
    /// Quotas and bandwidth limits.
    pub limits: quota::Limits,
    /// Counts shared by every worker (kept across configuration reloads).
    pub usage: std::sync::Arc<quota::Usage>,
    /// Permissions one allocation may hold at once; more get 508.
    pub max_permissions: usize,
    /// Channel bindings one allocation may hold at once; more get 508.
    pub max_channels: usize,
    /// `alternate-server`: redirect every Allocate over UDP/TCP with 300
    /// Try Alternate, round-robin among servers of the client's family
    /// (coturn's redirection mode).
    pub alternate_servers: Vec<SocketAddr>,
    /// `tls-alternate-server`: the same for clients over TLS.
    pub tls_alternate_servers: Vec<SocketAddr>,
}

impl Config {
    /// A configuration with coturn's defaults and the given authenticator.
    pub fn new(auth: Authenticator, nonces: NonceIssuer) -> Self {
        Config {
            auth,
            nonces,
            fingerprint: false,
            software: None,
            max_allocation_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            policy: PeerPolicy::default(),
            relay_ips: Vec::new(),
            listening_ips: Vec::new(),
            external_ips: Vec::new(),
            default_family: DefaultFamily::Ipv4,
            rfc5766_channels: true,
            allow_udp_relay: true,
            mobility: false,
            ticket_key: [0; 32],
            unauthenticated_rate: Some(DEFAULT_UNAUTHENTICATED_RATE),
            secure_stun: false,
            no_stun: false,
            stun_only: false,
            limits: quota::Limits::default(),
            usage: std::sync::Arc::new(quota::Usage::default()),
            max_permissions: DEFAULT_MAX_PERMISSIONS,
            max_channels: DEFAULT_MAX_CHANNELS,
            alternate_servers: Vec::new(),
            tls_alternate_servers: Vec::new(),
        }
    }
}

/// Which relay port the core needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRequest {
    /// Any free port in the range.
    Any,
    /// An even port; with `reserve_next`, the next (odd) port is bound and
    /// held for [`RESERVATION_LIFETIME`] under a token the driver returns
    /// (EVEN-PORT with the R bit, RFC 8656 §7.2).
    Even { reserve_next: bool },
    /// The socket reserved under this RESERVATION-TOKEN. Reservations live
    /// in the driver, shared by all workers, because the claiming Allocate
    /// usually comes from another 5-tuple and so may reach another worker.
    Reserved([u8; 8]),
}

/// A relay socket the core asks the driver to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest {
    /// Local address to bind.
    pub ip: IpAddr,
    pub port: PortRequest,
    /// Set DF on relayed datagrams (DONT-FRAGMENT).
    pub dont_fragment: bool,
}

/// A relay socket the driver opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedRelay {
    /// The bound relayed transport address.
    pub addr: SocketAddr,
    /// The RESERVATION-TOKEN for the reserved next port, for
    /// `PortRequest::Even { reserve_next: true }`.
    pub reservation: Option<[u8; 8]>,
}

/// Why a relay socket could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayError {
    /// No free port in `min-port`..`max-port` (answered 508).
    NoPortAvailable,
    /// The reservation token is unknown or expired (answered 508).
    NoReservation,
}

/// The driver side of relay sockets.
pub trait RelayProvider {
    /// Binds a relay socket for allocation `id`. On success the driver must
    /// deliver datagrams arriving on it to [`Server::handle_peer`] with `id`.
    fn open(&mut self, id: AllocationId, req: &RelayRequest) -> Result<OpenedRelay, RelayError>;
}

/// What the driver must do with a client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Nothing to send.
    None,
    /// Send the STUN message in `out` back to the client on the same 5-tuple.
    Reply,
    /// Send `data[payload]` from `allocation`'s relay socket to `peer`.
    Relay {
        allocation: AllocationId,
        peer: SocketAddr,
        payload: Range<usize>,
    },
    /// An authenticated Refresh carries a mobility ticket for an allocation
    /// owned by worker `owner` (RFC 8016). The driver asks that worker to
    /// [`Server::export`] it for `username`, [`Server::import`]s it here, and
    /// hands the same request to [`Server::handle_client`] again, which then
    /// refreshes it on its new 5-tuple. If the export fails, answer the
    /// request with [`Server::answer_error`] and the code it returned.
    Migrate {
        owner: u16,
        allocation: AllocationId,
        username: String,
    },
}

/// Where to send framed peer data (see [`Server::handle_peer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The driver's token for the client connection (`link` passed in with
    /// the client's messages).
    pub link: u32,
    pub client: FiveTuple,
    /// The framed message's range in the buffer.
    pub range: Range<usize>,
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Refresh with LIFETIME 0.
    Deleted,
    /// The lifetime ran out without a refresh.
    Expired,
    /// The client's TCP/TLS connection closed.
    ConnectionClosed,
}

impl CloseReason {
    /// Every reason, in the order of [`Stats::ended`].
    pub const ALL: [CloseReason; 3] = [
        CloseReason::Deleted,
        CloseReason::Expired,
        CloseReason::ConnectionClosed,
    ];

    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Deleted => "deleted",
            CloseReason::Expired => "expired",
            CloseReason::ConnectionClosed => "connection_closed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Monotonic counters the core keeps for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub allocations_created: u64,
    /// Indexed like [`CloseReason::ALL`].
    pub ended: [u64; 3],
    /// Indexed by [`crate::auth::AuthFailure::index`].
    pub auth_failures: [u64; AuthFailure::ALL.len()],
    /// Answers dropped by the unauthenticated-answer rate limit.
    pub rate_limited: u64,
    /// Allocations refused by a quota or capacity (486).
    pub quota_refusals: u64,
    /// Allocations refused for lack of a relay port (508).
    pub no_port_refusals: u64,
    /// Requests refused for a forbidden peer (403).
    pub forbidden_peers: u64,
    /// Allocates redirected with 300 (alternate-server or drain).
    pub redirected: u64,
    /// Traffic of allocations that have ended here.
    pub closed_traffic: Traffic,
}

/// Live state the core reports for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Allocations by client transport: UDP, TCP, TLS.
    pub allocations: [u64; 3],
    pub permissions: u64,
    pub channels: u64,
    /// Traffic of live allocations.
    pub live_traffic: Traffic,
    /// Allocations per user (the user part of REST usernames), when asked.
    pub users: Vec<(Box<str>, u32)>,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Deleted => "refresh with lifetime 0",
            CloseReason::Expired => "lifetime expired",
            CloseReason::ConnectionClosed => "client connection closed",
        })
    }
}

/// Something the driver must act on; drain with [`Server::poll_event`] after
/// every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Close the allocation's relay socket.
    AllocationClosed {
        id: AllocationId,
        relayed: SocketAddr,
        /// The client's 5-tuple the allocation belonged to.
        five_tuple: FiveTuple,
    },
}

/// Packet and byte counters of one allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

impl Traffic {
    /// Adds another allocation's counters.
    pub fn add(&mut self, o: &Traffic) {
        self.to_peer_packets += o.to_peer_packets;
        self.to_peer_bytes += o.to_peer_bytes;
        self.to_client_packets += o.to_client_packets;
        self.to_client_bytes += o.to_client_bytes;
    }
}

#[derive(Debug, Clone)]
struct Permission {
    ip: IpAddr,
    expires: Instant,
}

#[derive(Debug, Clone)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    id: AllocationId,
    /// Created with an empty MOBILITY-TICKET: may move to another 5-tuple.
    mobile: bool,
    five_tuple: FiveTuple,
    link: u32,
    relayed: SocketAddr,
    advertised: SocketAddr,
    username: Box<str>,
    key: Option<Key>,
    created: Instant,
    expires: Instant,
    allocate_tid: [u8; 12],
    reservation_token: Option<[u8; 8]>,
    /// The client sends FINGERPRINT, so Data indications carry one too.
    fingerprint: bool,
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
    traffic: Traffic,
    /// What counts against quotas, to release when it ends.
    claim: quota::Claim,
    /// `max-bps` shaping, when configured at creation.
    shaper: Option<Box<Shaper>>,
}

/// Per-allocation bandwidth limit, each direction on its own.
#[derive(Debug)]
struct Shaper {
    /// Bytes per second.
    rate: u64,
    to_peer: quota::Bucket,
    to_client: quota::Bucket,
}

impl Allocation {
    /// Whether `bytes` may be relayed to the peer at `now` (`max-bps`).
    fn admit_to_peer(&mut self, bytes: usize, now: Instant) -> bool {
        match &mut self.shaper {
            None => true,
            Some(s) => s.to_peer.take(bytes as u64, s.rate, now),
        }
    }

    /// Whether `bytes` may be relayed to the client at `now` (`max-bps`).
    fn admit_to_client(&mut self, bytes: usize, now: Instant) -> bool {
        match &mut self.shaper {
            None => true,
            Some(s) => s.to_client.take(bytes as u64, s.rate, now),
        }
    }

    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number)
    }

    fn peer_for_channel(&self, number: u16, now: Instant) -> Option<SocketAddr> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
            .map(|c| c.peer)
    }

    fn add_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => p.expires = expires,
            None => self.permissions.push(Permission { ip, expires }),
        }
    }

    fn prune(&mut self, now: Instant) {
        self.permissions.retain(|p| p.expires > now);
        let guard = Duration::from_secs(CHANNEL_REBIND_GUARD);
        self.channels.retain(|c| c.expires + guard > now);
    }
}

fn ticket_tag(key: &[u8; 32], data: &[u8]) -> [u8; 10] {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(data);
    let out = mac.finalize().into_bytes();
    out[..10].try_into().expect("SHA-1 output is 20 bytes")
}

/// Result of authenticating a request.
enum Authed<'m> {
    /// Authenticated (or auth disabled: no key, empty username).
    Ok { key: Option<Key>, username: &'m str },
    /// An error response is in `out`.
    Answered,
}

const fn reason(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Allocation Not Found",
        405 => "Mobility Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Server Error",
    }
}

/// The TURN server state machine for one worker's share of the clients.
pub struct Server {
    cfg: std::sync::Arc<Config>,
    allocations: Slab<Allocation>,
    by_five_tuple: HashMap<FiveTuple, AllocationId>,
    events: VecDeque<Event>,
    next_generation: u32,
    /// Maps the monotonic clock to UNIX time (for REST expiry and nonces).
    wall: (Instant, u64),
    rng: u64,
    relay_rr: usize,
    /// This core's worker index, written into mobility tickets.
    worker: u16,
    limiter: RateLimiter,
    auth_log: auth_log::AuthLog,
    stats: Stats,
    /// Draining: new allocations are refused (508) or redirected (300).
    draining: bool,
    alternate_rr: usize,
}

/// Token buckets per source address for answers to unauthenticated
/// requests, in a fixed table indexed by a keyed hash.
struct RateLimiter {
    slots: Box<[RateSlot]>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
    /// Answers suppressed since the last [`Server::take_suppressed`].
    suppressed: u64,
}

#[derive(Clone, Copy, Default)]
struct RateSlot {
    /// The canonical source address as a number (IPv4 mapped into IPv6).
    key: u128,
    /// Thousandths of an answer.
    tokens: u32,
    /// Milliseconds since the limiter's epoch at the last refill.
    last_ms: u32,
}

impl RateLimiter {
    fn new(now: Instant) -> Self {
        RateLimiter {
            slots: vec![RateSlot::default(); RATE_SLOTS].into_boxed_slice(),
            hasher: std::collections::hash_map::RandomState::new(),
            // A second in the past, so no real timestamp is 0 (an empty slot).
            epoch: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            suppressed: 0,
        }
    }

    /// Whether `ip` may get another answer at `now` under `rate` per second.
    fn admit(&mut self, ip: IpAddr, now: Instant, rate: u32) -> bool {
        use std::hash::BuildHasher;
        let key = match policy::canonical(ip) {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let burst = rate.saturating_mul(5).saturating_mul(1000);
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u32;
        let slot = &mut self.slots[(self.hasher.hash_one(key) as usize) % RATE_SLOTS];
        if slot.key != key || slot.last_ms == 0 {
            *slot = RateSlot {
                key,
                tokens: burst,
                last_ms: now_ms.max(1),
            };
        } else {
            let elapsed = u64::from(now_ms.saturating_sub(slot.last_ms));
            let refill = elapsed.saturating_mul(u64::from(rate));
            slot.tokens = (u64::from(slot.tokens) + refill).min(u64::from(burst)) as u32;
            slot.last_ms = now_ms.max(1);
        }
        if slot.tokens >= 1000 {
            slot.tokens -= 1000;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

/// An allocation on its way to another worker (RFC 8016 mobility): its
/// whole state, already re-keyed to the client's new 5-tuple.
#[derive(Debug)]
pub struct MovedAllocation {
    allocation: Allocation,
}

impl MovedAllocation {
    /// Its relayed transport address (the relay socket travels with it).
    pub fn relayed(&self) -> SocketAddr {
        self.allocation.relayed
    }
}

/// Length of a mobility ticket, characters: unpadded base64url of 20 bytes
/// (worker, index, generation and a 10-byte tag). coturn's clients keep at
/// most 32 characters of a ticket.
const TICKET_LEN: usize = 27;

impl Server {
    /// A core with no allocations for worker `worker`. `now` and `unix_now`
    /// (UNIX seconds) anchor the wall clock; `seed` seeds the generator for
    /// Data indication transaction IDs (any value).
    pub fn new(
        cfg: std::sync::Arc<Config>,
        worker: u16,
        now: Instant,
        unix_now: u64,
        seed: u64,
    ) -> Self {
        Server {
            cfg,
            allocations: Slab::new(),
            by_five_tuple: HashMap::new(),
            events: VecDeque::new(),
            next_generation: 1,
            wall: (now, unix_now),
            rng: seed | 1,
            relay_rr: 0,
            worker,
            limiter: RateLimiter::new(now),
            auth_log: auth_log::AuthLog::default(),
            stats: Stats::default(),
            draining: false,
            alternate_rr: 0,
        }
    }

    /// Re-anchors the wall clock (the driver does this periodically).
    pub fn set_wall_clock(&mut self, now: Instant, unix_now: u64) {
        self.wall = (now, unix_now);
    }

    /// Replaces the configuration for new requests (live reload); existing
    /// allocations keep their keys, permissions and channels.
    pub fn set_config(&mut self, cfg: std::sync::Arc<Config>) {
        self.cfg = cfg;
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The allocation on a client 5-tuple, if any.
    pub fn allocation_for(&self, five_tuple: &FiveTuple) -> Option<AllocationId> {
        self.by_five_tuple.get(five_tuple).copied()
    }

    /// The client 5-tuple of an allocation.
    pub fn five_tuple_of(&self, id: AllocationId) -> Option<FiveTuple> {
        self.get(id).map(|a| a.five_tuple)
    }

    /// Traffic counters of an allocation.
    pub fn traffic(&self, id: AllocationId) -> Option<Traffic> {
        self.get(id).map(|a| a.traffic)
    }

    /// Starts or stops draining: while draining, new allocations get 300
    /// Try Alternate (when alternate servers are configured) or 508, and
    /// existing ones carry on.
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Whether the core is draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Live gauges; with `per_user`, allocations are counted per user.
    pub fn gauges(&self, per_user: bool) -> Gauges {
        let mut g = Gauges::default();
        let mut users: HashMap<&str, u32> = HashMap::new();
        for (_, a) in self.allocations.iter() {
            g.allocations[a.five_tuple.transport as usize] += 1;
            g.permissions += a.permissions.len() as u64;
            g.channels += a.channels.len() as u64;
            g.live_traffic.add(&a.traffic);
            if per_user {
                let user = match &self.cfg.auth.mechanism {
                    crate::auth::Mechanism::RestApi { separator, .. } => {
                        crate::auth::rest_user(&a.username, *separator)
                    }
                    _ => &a.username,
                };
                *users.entry(user).or_insert(0) += 1;
            }
        }
        g.users = users.into_iter().map(|(u, n)| (u.into(), n)).collect();
        g
    }

    /// Answers to unauthenticated requests suppressed by the rate limit
    /// since the last call.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.limiter.suppressed)
    }

    /// Applies the unauthenticated-answer rate limit to the answer in
    /// `out`: drops it (clearing `out`) when `ft`'s source is over its limit.
    fn limit(&mut self, now: Instant, ft: &FiveTuple, out: &mut Vec<u8>) -> ClientAction {
        match self.cfg.unauthenticated_rate {
            Some(rate) if !self.limiter.admit(ft.client.ip(), now, rate) => {
                self.stats.rate_limited += 1;
                out.clear();
                ClientAction::None
            }
            _ => ClientAction::Reply,
        }
    }

    /// Checks the allocation table's internal consistency: every 5-tuple
    /// maps to the allocation that holds it, permissions and channels are
    /// unique and within their caps, and nothing expired survives a
    /// [`Server::handle_timeout`] at `checked_at`. For tests and fuzzing.
    pub fn check_invariants(&self, checked_at: Option<Instant>) -> Result<(), String> {
        if self.by_five_tuple.len() != self.allocations.len() {
            return Err(format!(
                "{} 5-tuples for {} allocations",
                self.by_five_tuple.len(),
                self.allocations.len()
            ));
        }
        for (ft, id) in &self.by_five_tuple {
            let a = self
                .get(*id)
                .ok_or_else(|| format!("{ft} maps to a missing allocation"))?;
            if a.five_tuple != *ft {
                return Err(format!("{ft} maps to the allocation of {}", a.five_tuple));
            }
        }
        for (_, a) in self.allocations.iter() {
            if a.permissions.len() > self.cfg.max_permissions
                || a.channels.len() > self.cfg.max_channels
            {
                return Err(format!("{}: over a cap", a.five_tuple));
            }
            for (i, p) in a.permissions.iter().enumerate() {
                if a.permissions[..i].iter().any(|q| q.ip == p.ip) {
                    return Err(format!("{}: duplicate permission {}", a.five_tuple, p.ip));
                }
            }
            for (i, c) in a.channels.iter().enumerate() {
                if a.channels[..i]
                    .iter()
                    .any(|d| d.number == c.number || d.peer == c.peer)
                {
                    return Err(format!(
                        "{}: channel {:#x} or {} bound twice",
                        a.five_tuple, c.number, c.peer
                    ));
                }
                if !(MIN_CHANNEL..=MAX_CHANNEL_RFC5766).contains(&c.number) {
                    return Err(format!("{}: channel number {:#x}", a.five_tuple, c.number));
                }
            }
            if let Some(t) = checked_at
                && a.expires <= t
            {
                return Err(format!("{}: expired allocation survived", a.five_tuple));
            }
        }
        Ok(())
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn unix(&self, now: Instant) -> u64 {
        self.wall.1 + now.saturating_duration_since(self.wall.0).as_secs()
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: transaction IDs of Data indications need uniqueness,
        // not secrecy.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn get(&self, id: AllocationId) -> Option<&Allocation> {
        self.allocations
            .get(id.index as usize)
            .filter(|a| a.id == id)
    }

    fn get_mut(&mut self, id: AllocationId) -> Option<&mut Allocation> {
        self.allocations
            .get_mut(id.index as usize)
            .filter(|a| a.id == id)
    }

    /// Handles one message from a client: a STUN message or ChannelData,
    /// exactly one UDP datagram or one stream frame.
    ///
    /// `link` is the driver's token for the connection (returned in
    /// [`Delivery::link`]). A reply, if any, is written to `out` (cleared
    /// first). Malformed input is dropped silently.
    pub fn handle_client(
        &mut self,
        now: Instant,
        five_tuple: &FiveTuple,
        link: u32,
        data: &[u8],
        out: &mut Vec<u8>,
        relays: &mut dyn RelayProvider,
    ) -> ClientAction {
        out.clear();
        match data.first() {
            Some(b) if b >> 6 == 0b01 => self.client_channel_data(now, five_tuple, data),
            Some(b) if b >> 6 == 0b00 => {
                let Ok(msg) = Message::parse(data) else {
                    return ClientAction::None;
                };
                if !msg.fingerprint_ok() {
                    return ClientAction::None;
                }
                match msg.class() {
                    Class::Request => self.request(now, five_tuple, link, &msg, out, relays),
                    Class::Indication if msg.method() == method::SEND => {
                        self.send_indication(now, five_tuple, &msg)
                    }
                    _ => ClientAction::None,
                }
            }
            _ => ClientAction::None,
        }
    }

    fn client_channel_data(&mut self, now: Instant, ft: &FiveTuple, data: &[u8]) -> ClientAction {
        let Some((number, payload)) = channel::parse_channel_data(data) else {
            return ClientAction::None;
        };
        let Some(&id) = self.by_five_tuple.get(ft) else {
            return ClientAction::None;
        };
        let Some(a) = self.get_mut(id) else {
            return ClientAction::None;
        };
        let Some(peer) = a.peer_for_channel(number, now) else {
            return ClientAction::None;
        };
        if !a.admit_to_peer(payload.len(), now) {
            return ClientAction::None;
        }
        a.traffic.to_peer_packets += 1;
        a.traffic.to_peer_bytes += payload.len() as u64;
        ClientAction::Relay {
            allocation: id,
            peer,
            payload,
        }
    }

    fn send_indication(&mut self, now: Instant, ft: &FiveTuple, msg: &Message<'_>) -> ClientAction {
        let Some(&id) = self.by_five_tuple.get(ft) else {
            trace!(five_tuple = %ft, "Send indication without an allocation dropped");
            return ClientAction::None;
        };
        let mut unknown = [0u16; 16];
        if msg.unknown_required(&mut unknown) > 0 {
            trace!(five_tuple = %ft, "Send indication with unknown attributes dropped");
            return ClientAction::None;
        }
        let (Some(Ok(peer)), Some(payload)) = (
            msg.xor_address(attr::XOR_PEER_ADDRESS),
            msg.value_range(attr::DATA),
        ) else {
            trace!(five_tuple = %ft, "Send indication without XOR-PEER-ADDRESS or DATA dropped");
            return ClientAction::None;
        };
        if self.cfg.policy.check_addr(peer).is_err() {
            trace!(five_tuple = %ft, %peer, "Send indication to a forbidden peer dropped");
            return ClientAction::None;
        }
        let Some(a) = self.get_mut(id) else {
            return ClientAction::None;
        };
        if Family::of(peer.ip()) != Family::of(a.relayed.ip()) || !a.permitted(peer.ip(), now) {
            trace!(five_tuple = %ft, %peer, "Send indication without a permission dropped");
            return ClientAction::None;
        }
        if !a.admit_to_peer(payload.len(), now) {
            return ClientAction::None;
        }
        a.traffic.to_peer_packets += 1;
        a.traffic.to_peer_bytes += payload.len() as u64;
        ClientAction::Relay {
            allocation: id,
            peer,
            payload,
        }
    }

    /// Starts a response to `req` in `out`; SOFTWARE is added when configured.
    fn response<'o>(
        &self,
        out: &'o mut Vec<u8>,
        req: &Message<'_>,
        class: Class,
    ) -> MessageWriter<'o> {
        let mut w = MessageWriter::new(out, req.method(), class, req.transaction_id());
        if let Some(s) = &self.cfg.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        w
    }

    /// Adds MESSAGE-INTEGRITY (when authenticated) and FINGERPRINT (when the
    /// request had one or `fingerprint` is set).
    fn seal(&self, w: &mut MessageWriter<'_>, req: &Message<'_>, key: Option<&Key>) {
        if let Some(k) = key {
            w.integrity(k);
        }
        if self.cfg.fingerprint || req.has_fingerprint() {
            w.fingerprint();
        }
    }

    fn error(
        &self,
        out: &mut Vec<u8>,
        req: &Message<'_>,
        code: u16,
        key: Option<&Key>,
    ) -> ClientAction {
        let mut w = self.response(out, req, Class::Error);
        w.error_code(code, reason(code));
        self.seal(&mut w, req, key);
        ClientAction::Reply
    }

    /// 401 or 438 with REALM and a fresh NONCE, never MESSAGE-INTEGRITY.
    fn challenge(
        &self,
        now: Instant,
        out: &mut Vec<u8>,
        ft: &FiveTuple,
        req: &Message<'_>,
        code: u16,
    ) -> ClientAction {
        let nonce = self.cfg.nonces.issue(self.unix(now), ft.client.ip());
        let mut w = self.response(out, req, Class::Error);
        w.error_code(code, reason(code))
            .attr(attr::REALM, self.cfg.auth.realm.as_bytes())
            .attr(attr::NONCE, &nonce);
        self.seal(&mut w, req, None);
        ClientAction::Reply
    }

    fn request(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
        relays: &mut dyn RelayProvider,
    ) -> ClientAction {
        let mut unknown = [0u16; 16];
        let n = msg.unknown_required(&mut unknown);
        if n > 0 {
            let mut w = self.response(out, msg, Class::Error);
            w.error_code(420, reason(420))
                .unknown_attributes(&unknown[..n]);
            self.seal(&mut w, msg, None);
            debug!(five_tuple = %ft, method = method::name(msg.method()), "420 for unknown attributes {:04x?}", &unknown[..n]);
            return self.limit(now, ft, out);
        }
        let m = msg.method();
        let turn = matches!(
            m,
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND
        );
        if (m == method::BINDING && self.cfg.no_stun) || (turn && self.cfg.stun_only) {
            return ClientAction::None;
        }
        if m == method::BINDING && !self.cfg.secure_stun {
            let mut w = self.response(out, msg, Class::Success);
            w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
            self.seal(&mut w, msg, None);
            return ClientAction::Reply;
        }
        if !turn && m != method::BINDING {
            debug!(five_tuple = %ft, "400 for unsupported method 0x{m:03x}");
            self.error(out, msg, 400, None);
            return self.limit(now, ft, out);
        }
        let (key, username) = match self.authenticate(now, ft, msg, out) {
            Authed::Ok { key, username } => (key, username),
            Authed::Answered => return self.limit(now, ft, out),
        };
        if m == method::BINDING {
            // secure-stun: an authenticated Binding.
            let mut w = self.response(out, msg, Class::Success);
            w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
            self.seal(&mut w, msg, key.as_ref());
            return ClientAction::Reply;
        }
        let action = match m {
            method::ALLOCATE => self.allocate(now, ft, link, msg, out, relays, key, username),
            method::REFRESH => self.refresh(now, ft, link, msg, out, key, username),
            method::CREATE_PERMISSION => self.create_permission(now, ft, msg, out, key),
            _ => self.channel_bind(now, ft, msg, out, key),
        };
        if tracing::enabled!(tracing::Level::DEBUG) {
            let outcome = match Message::parse(out) {
                Ok(r) if r.class() == Class::Success => "success".to_string(),
                Ok(r) => match r.get(attr::ERROR_CODE).map(attr::decode_error_code) {
                    Some(Ok((code, text))) => format!("error {code} {text}"),
                    _ => "error".to_string(),
                },
                Err(_) => "no response".to_string(),
            };
            debug!(five_tuple = %ft, user = username, "{} request: {outcome}", method::name(m));
        }
        action
    }

    /// RFC 8489 §9.2.4 for long-term credentials.
    fn authenticate<'m>(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'m>,
        out: &mut Vec<u8>,
    ) -> Authed<'m> {
        if !self.cfg.auth.enabled() {
            return Authed::Ok {
                key: None,
                username: "",
            };
        }
        if !msg.has_integrity() {
            self.challenge(now, out, ft, msg, 401);
            return Authed::Answered;
        }
        let (Some(Ok(username)), Some(Ok(_realm)), Some(nonce)) = (
            msg.text(attr::USERNAME),
            msg.text(attr::REALM),
            msg.get(attr::NONCE),
        ) else {
            self.error(out, msg, 400, None);
            return Authed::Answered;
        };
        match self.cfg.nonces.check(nonce, self.unix(now), ft.client.ip()) {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.auth_failed(now, ft, username, msg, AuthFailure::StaleNonce);
                self.challenge(now, out, ft, msg, 438);
                return Authed::Answered;
            }
        }
        // Requests on an existing allocation must come from its user and are
        // checked with the key it was created with (a REST credential may
        // expire while its allocation lives on, as in coturn).
        if let Some(a) = self.by_five_tuple.get(ft).and_then(|id| self.get(*id)) {
            if *a.username != *username {
                info!(five_tuple = %ft, user = username, allocation_user = &*a.username, "441: request for another user's allocation");
                self.error(out, msg, 441, None);
                return Authed::Answered;
            }
            if let Some(key) = a.key
                && msg.verify_integrity(&key)
            {
                return Authed::Ok {
                    key: Some(key),
                    username,
                };
            }
        }
        match self.cfg.auth.authenticate(msg, username, self.unix(now)) {
            Ok(key) => Authed::Ok {
                key: Some(key),
                username,
            },
            Err(why) => {
                self.auth_failed(now, ft, username, msg, why);
                self.challenge(now, out, ft, msg, 401);
                Authed::Answered
            }
        }
    }

    /// Counts a refused credential and logs it, once per client, user and
    /// reason per [`auth_log::WINDOW`] (retransmissions and retrying clients
    /// would otherwise log a line each).
    fn auth_failed(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        username: &str,
        msg: &Message<'_>,
        why: AuthFailure,
    ) {
        self.stats.auth_failures[why.index()] += 1;
        if self.auth_log.record(now, ft.client.ip(), username, why) {
            let code = if why == AuthFailure::StaleNonce {
                438
            } else {
                401
            };
            info!(five_tuple = %ft, user = username, realm = %self.cfg.auth.realm, method = method::name(msg.method()), "{code}: {why}");
        }
    }

    fn lifetime(&self, requested: Option<u32>) -> u32 {
        let max = self.cfg.max_allocation_lifetime.max(1);
        match requested {
            Some(r) => r.min(max),
            None => DEFAULT_ALLOCATION_LIFETIME.min(max),
        }
    }

    fn relay_ip(&mut self, family: Family, ft: &FiveTuple) -> Option<IpAddr> {
        if !self.cfg.relay_ips.is_empty() {
            let candidates: Vec<IpAddr> = self
                .cfg
                .relay_ips
                .iter()
                .copied()
                .filter(|ip| Family::of(*ip) == family)
                .collect();
            if candidates.is_empty() {
                return None;
            }
            self.relay_rr = self.relay_rr.wrapping_add(1);
            return Some(candidates[self.relay_rr % candidates.len()]);
        }
        let local = ft.server.ip();
        if Family::of(local) == family && !local.is_unspecified() {
            return Some(local);
        }
        let pick = |loopback_ok: bool| {
            self.cfg.listening_ips.iter().copied().find(|ip| {
                Family::of(*ip) == family
                    && !ip.is_unspecified()
                    && (loopback_ok || !ip.is_loopback())
            })
        };
        pick(false).or_else(|| pick(true))
    }

    fn advertised(&self, relayed: SocketAddr) -> SocketAddr {
        let port = relayed.port();
        let ip = relayed.ip();
        if let Some(e) = self.cfg.external_ips.iter().find(|e| e.private == Some(ip)) {
            return SocketAddr::new(e.public, port);
        }
        if let Some(e) = self
            .cfg
            .external_ips
            .iter()
            .find(|e| e.private.is_none() && Family::of(e.public) == Family::of(ip))
        {
            return SocketAddr::new(e.public, port);
        }
        relayed
    }

    fn allocate_success(
        &self,
        now: Instant,
        out: &mut Vec<u8>,
        req: &Message<'_>,
        a: &Allocation,
    ) -> ClientAction {
        let remaining = a.expires.saturating_duration_since(now).as_secs() as u32;
        let mut w = self.response(out, req, Class::Success);
        w.xor_address(attr::XOR_RELAYED_ADDRESS, a.advertised)
            .attr_u32(attr::LIFETIME, remaining);
        if let Some(t) = &a.reservation_token {
            w.attr(attr::RESERVATION_TOKEN, t);
        }
        if a.mobile {
            w.attr(attr::MOBILITY_TICKET, &self.ticket(a.id));
        }
        w.xor_address(attr::XOR_MAPPED_ADDRESS, a.five_tuple.client);
        self.seal(&mut w, req, a.key.as_ref());
        ClientAction::Reply
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
        relays: &mut dyn RelayProvider,
        key: Option<Key>,
        username: &str,
    ) -> ClientAction {
        let k = key.as_ref();
        if let Some(a) = self.by_five_tuple.get(ft).and_then(|id| self.get(*id)) {
            if a.allocate_tid == *msg.transaction_id() {
                // A retransmission: answer as the first time (RFC 8656 §7.2).
                return self.allocate_success(now, out, msg, a);
            }
            return self.error(out, msg, 437, k);
        }
        let alternates = if ft.transport == Transport::Tls {
            &self.cfg.tls_alternate_servers
        } else {
            &self.cfg.alternate_servers
        };
        let same_family: Vec<SocketAddr> = alternates
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == ft.client.is_ipv4())
            .collect();
        if !same_family.is_empty() {
            // Redirection (coturn's alternate-server), and how a draining
            // server hands new clients to its peers.
            self.alternate_rr = self.alternate_rr.wrapping_add(1);
            let alt = same_family[self.alternate_rr % same_family.len()];
            self.stats.redirected += 1;
            let mut w = self.response(out, msg, Class::Error);
            w.error_code(300, reason(300))
                .address(attr::ALTERNATE_SERVER, alt);
            self.seal(&mut w, msg, k);
            return ClientAction::Reply;
        }
        if self.draining {
            info!(five_tuple = %ft, user = username, "508: draining");
            return self.error(out, msg, 508, k);
        }
        let transport = match msg
            .get(attr::REQUESTED_TRANSPORT)
            .map(attr::decode_requested_transport)
        {
            Some(Ok(t)) => t,
            _ => return self.error(out, msg, 400, k),
        };
        if transport != 17 || !self.cfg.allow_udp_relay {
            return self.error(out, msg, 442, k);
        }
        let even_port = match msg.get(attr::EVEN_PORT).map(attr::decode_even_port) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(_)) => return self.error(out, msg, 400, k),
        };
        let token = match msg
            .get(attr::RESERVATION_TOKEN)
            .map(attr::decode_reservation_token)
        {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(_)) => return self.error(out, msg, 400, k),
        };
        let requested_family = match msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(attr::decode_requested_family)
        {
            None => None,
            Some(Ok(0x01)) => Some(Family::V4),
            Some(Ok(0x02)) => Some(Family::V6),
            Some(Ok(_)) => return self.error(out, msg, 440, k),
            Some(Err(_)) => return self.error(out, msg, 400, k),
        };
        if token.is_some() && (even_port.is_some() || requested_family.is_some()) {
            return self.error(out, msg, 400, k);
        }
        let requested_lifetime = match msg
            .get(attr::LIFETIME)
            .map(|v| attr::decode_u32(attr::LIFETIME, v))
        {
            None => None,
            Some(Ok(l)) => Some(l),
            Some(Err(_)) => return self.error(out, msg, 400, k),
        };
        let lifetime = self
            .lifetime(requested_lifetime)
            .max(DEFAULT_ALLOCATION_LIFETIME.min(self.cfg.max_allocation_lifetime.max(1)));
        let dont_fragment = msg.has(attr::DONT_FRAGMENT);
        let mobile = match msg.get(attr::MOBILITY_TICKET) {
            None => false,
            Some(_) if !self.cfg.mobility => return self.error(out, msg, 405, k),
            Some(t) if !t.is_empty() => return self.error(out, msg, 400, k),
            Some(_) => true,
        };

        let (ip, port) = if let Some(t) = token {
            // The driver knows the reserved socket's address; the IP here is
            // only a hint.
            (ft.server.ip(), PortRequest::Reserved(t))
        } else {
            let family = requested_family.unwrap_or(match self.cfg.default_family {
                DefaultFamily::Ipv4 => Family::V4,
                DefaultFamily::Ipv6 => Family::V6,
                DefaultFamily::Keep => Family::of(ft.server.ip()),
            });
            let Some(ip) = self.relay_ip(family, ft) else {
                return self.error(out, msg, 440, k);
            };
            let port = match even_port {
                None => PortRequest::Any,
                Some(reserve_next) => PortRequest::Even { reserve_next },
            };
            (ip, port)
        };

        let id = AllocationId {
            index: self.allocations.vacant_key() as u32,
            generation: self.next_generation,
        };
        let quota_user = match &self.cfg.auth.mechanism {
            crate::auth::Mechanism::RestApi { separator, .. } => {
                crate::auth::rest_user(username, *separator)
            }
            _ => username,
        };
        let claim = match self.cfg.usage.acquire(quota_user, &self.cfg.limits) {
            Ok(c) => c,
            Err(why) => {
                self.stats.quota_refusals += 1;
                info!(five_tuple = %ft, user = username, "486: {why}");
                return self.error(out, msg, 486, k);
            }
        };
        let opened = match relays.open(
            id,
            &RelayRequest {
                ip,
                port,
                dont_fragment,
            },
        ) {
            Ok(o) => o,
            Err(e) => {
                self.stats.no_port_refusals += 1;
                self.cfg.usage.release(&claim);
                info!(five_tuple = %ft, user = username, "508: cannot open relay socket on {ip}: {e:?}");
                return self.error(out, msg, 508, k);
            }
        };
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let reservation_token = opened.reservation;
        let allocation = Allocation {
            id,
            mobile,
            five_tuple: *ft,
            link,
            relayed: opened.addr,
            advertised: self.advertised(opened.addr),
            username: username.into(),
            key,
            created: now,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            allocate_tid: *msg.transaction_id(),
            reservation_token,
            fingerprint: msg.has_fingerprint() || self.cfg.fingerprint,
            permissions: Vec::new(),
            channels: Vec::new(),
            traffic: Traffic::default(),
            claim,
            shaper: (self.cfg.limits.max_bps > 0).then(|| {
                let rate = self.cfg.limits.max_bps;
                Box::new(Shaper {
                    rate,
                    to_peer: quota::Bucket::new(rate, now),
                    to_client: quota::Bucket::new(rate, now),
                })
            }),
        };
        self.stats.allocations_created += 1;
        info!(
            five_tuple = %ft,
            user = username,
            relayed = %allocation.relayed,
            advertised = %allocation.advertised,
            lifetime,
            "allocation created"
        );
        let index = self.allocations.insert(allocation);
        debug_assert_eq!(index, id.index as usize);
        self.by_five_tuple.insert(*ft, id);
        let a = self.get(id).expect("just inserted");
        self.allocate_success(now, out, msg, a)
    }

    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
        key: Option<Key>,
        username: &str,
    ) -> ClientAction {
        let k = key.as_ref();
        let ticket = msg.get(attr::MOBILITY_TICKET);
        if ticket.is_some() && !self.cfg.mobility {
            return self.error(out, msg, 405, k);
        }
        let id = match (self.by_five_tuple.get(ft), ticket) {
            (Some(&id), _) => id,
            (None, None) => return self.error(out, msg, 437, k),
            // A mobile client arriving from a new 5-tuple (RFC 8016 §3.2).
            (None, Some(t)) => {
                let Some((owner, id)) = self.parse_ticket(t) else {
                    return self.error(out, msg, 404, k);
                };
                if owner != self.worker {
                    return ClientAction::Migrate {
                        owner,
                        allocation: id,
                        username: username.to_string(),
                    };
                }
                match self.take(id, username) {
                    Ok(mut a) => {
                        info!(from = %a.five_tuple, to = %ft, user = username, relayed = %a.relayed, "allocation moved (mobility)");
                        a.five_tuple = *ft;
                        a.link = link;
                        self.by_five_tuple.insert(*ft, id);
                        let index = self.allocations.insert(a);
                        debug_assert_eq!(index, id.index as usize);
                        id
                    }
                    Err(code) => return self.error(out, msg, code, k),
                }
            }
        };
        let relay_family = match self.get(id) {
            Some(a) => Family::of(a.relayed.ip()),
            None => return self.error(out, msg, 437, k),
        };
        match msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(attr::decode_requested_family)
        {
            None => {}
            Some(Ok(f))
                if (f == 1 && relay_family == Family::V4)
                    || (f == 2 && relay_family == Family::V6) => {}
            Some(Ok(_)) => return self.error(out, msg, 443, k),
            Some(Err(_)) => return self.error(out, msg, 400, k),
        }
        let requested = match msg
            .get(attr::LIFETIME)
            .map(|v| attr::decode_u32(attr::LIFETIME, v))
        {
            None => None,
            Some(Ok(l)) => Some(l),
            Some(Err(_)) => return self.error(out, msg, 400, k),
        };
        let lifetime = if requested == Some(0) {
            0
        } else {
            self.lifetime(requested)
        };
        if lifetime == 0 {
            self.close(id, CloseReason::Deleted, now);
        } else if let Some(a) = self.get_mut(id) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
        }
        let ticket = self.get(id).filter(|a| a.mobile).map(|a| self.ticket(a.id));
        let mut w = self.response(out, msg, Class::Success);
        w.attr_u32(attr::LIFETIME, lifetime);
        if let Some(t) = &ticket {
            w.attr(attr::MOBILITY_TICKET, t);
        }
        self.seal(&mut w, msg, k);
        ClientAction::Reply
    }

    /// The mobility ticket for allocation `id` on this worker: base64url of
    /// worker, index, generation and a 10-byte HMAC-SHA1 tag over them
    /// (printable and short, as clients such as turnutils_uclient keep it in a
    /// 33-byte string).
    fn ticket(&self, id: AllocationId) -> [u8; TICKET_LEN] {
        let mut raw = [0u8; 20];
        raw[..2].copy_from_slice(&self.worker.to_be_bytes());
        raw[2..6].copy_from_slice(&id.index.to_be_bytes());
        raw[6..10].copy_from_slice(&id.generation.to_be_bytes());
        let tag = ticket_tag(&self.cfg.ticket_key, &raw[..10]);
        raw[10..].copy_from_slice(&tag);
        let mut out = [0u8; TICKET_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(raw, &mut out)
            .expect("20 bytes encode to 27 characters");
        debug_assert_eq!(n, TICKET_LEN);
        out
    }

    /// Decodes and authenticates a ticket into (worker, allocation).
    fn parse_ticket(&self, t: &[u8]) -> Option<(u16, AllocationId)> {
        if t.len() != TICKET_LEN {
            return None;
        }
        let mut raw = [0u8; 21];
        if URL_SAFE_NO_PAD.decode_slice(t, &mut raw).ok()? != 20 {
            return None;
        }
        let tag = ticket_tag(&self.cfg.ticket_key, &raw[..10]);
        let diff = tag
            .iter()
            .zip(&raw[10..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return None;
        }
        let worker = u16::from_be_bytes([raw[0], raw[1]]);
        let index = u32::from_be_bytes(raw[2..6].try_into().ok()?);
        let generation = u32::from_be_bytes(raw[6..10].try_into().ok()?);
        Some((worker, AllocationId { index, generation }))
    }

    /// Removes a mobile allocation for `username` from the tables, for a
    /// move. Errors: 404 when it is gone or not mobile, 441 for another user.
    fn take(&mut self, id: AllocationId, username: &str) -> Result<Allocation, u16> {
        let a = self.get(id).ok_or(404u16)?;
        if !a.mobile {
            return Err(404);
        }
        if *a.username != *username {
            return Err(441);
        }
        let a = self.allocations.remove(id.index as usize);
        self.by_five_tuple.remove(&a.five_tuple);
        Ok(a)
    }

    /// Hands allocation `id` to another worker for its client's new
    /// 5-tuple `to` (connection token `link` there). The caller moves the
    /// relay socket with it; no [`Event::AllocationClosed`] is emitted.
    /// Errors: 404 (gone, or created without mobility) or 441 (another user).
    pub fn export(
        &mut self,
        id: AllocationId,
        username: &str,
        to: &FiveTuple,
        link: u32,
    ) -> Result<MovedAllocation, u16> {
        let mut a = self.take(id, username)?;
        info!(from = %a.five_tuple, to = %to, user = username, relayed = %a.relayed, "allocation moved to another worker (mobility)");
        a.five_tuple = *to;
        a.link = link;
        Ok(MovedAllocation { allocation: a })
    }

    /// Hands allocation `id` to another worker unchanged (same 5-tuple and
    /// connection token), because its client's datagrams now reach that
    /// worker (UDP steering). The caller moves the relay socket with it; no
    /// [`Event::AllocationClosed`] is emitted. Error: 404 (gone).
    pub fn export_unchanged(&mut self, id: AllocationId) -> Result<MovedAllocation, u16> {
        self.get(id).ok_or(404u16)?;
        let a = self.allocations.remove(id.index as usize);
        self.by_five_tuple.remove(&a.five_tuple);
        debug!(five_tuple = %a.five_tuple, relayed = %a.relayed, "allocation moved to another worker (steering)");
        Ok(MovedAllocation { allocation: a })
    }

    /// Adopts an allocation exported by another worker; returns its id here,
    /// for registering its relay socket. `None` (and the allocation is
    /// deleted) when its new 5-tuple meanwhile got an allocation of its own.
    pub fn import(&mut self, moved: MovedAllocation) -> Option<AllocationId> {
        let mut a = moved.allocation;
        if self.by_five_tuple.contains_key(&a.five_tuple) {
            info!(five_tuple = %a.five_tuple, user = &*a.username, relayed = %a.relayed, reason = "5-tuple already has an allocation", "allocation deleted");
            self.cfg.usage.release(&a.claim);
            return None;
        }
        let id = AllocationId {
            index: self.allocations.vacant_key() as u32,
            generation: self.next_generation,
        };
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        a.id = id;
        self.by_five_tuple.insert(a.five_tuple, id);
        self.allocations.insert(a);
        Some(id)
    }

    /// Answers request `data` (as received) with error `code`, for requests
    /// the driver could not complete (a failed mobility move).
    pub fn answer_error(&self, data: &[u8], code: u16, out: &mut Vec<u8>) -> ClientAction {
        match Message::parse(data) {
            Ok(msg) => self.error(out, &msg, code, None),
            Err(_) => ClientAction::None,
        }
    }

    /// Decodes and vets a XOR-PEER-ADDRESS value for an allocation relaying
    /// on `relay_family`; `Err(code)` is the error to answer.
    /// `with_port`: the request relays to this exact transport address
    /// (ChannelBind), not to the whole IP (CreatePermission).
    fn vet_peer(
        &mut self,
        value: &[u8],
        tid: &[u8; 12],
        relay_family: Family,
        ft: &FiveTuple,
        with_port: bool,
    ) -> Result<SocketAddr, u16> {
        let peer =
            attr::decode_xor_address(attr::XOR_PEER_ADDRESS, value, tid).map_err(|_| 400u16)?;
        if Family::of(peer.ip()) != relay_family {
            return Err(443);
        }
        let verdict = if with_port {
            self.cfg.policy.check_addr(peer)
        } else {
            self.cfg.policy.check(peer.ip())
        };
        if let Err(why) = verdict {
            self.stats.forbidden_peers += 1;
            info!(five_tuple = %ft, peer = %peer, "403: peer refused: {why}");
            return Err(403);
        }
        Ok(peer)
    }

    fn create_permission(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
        key: Option<Key>,
    ) -> ClientAction {
        let k = key.as_ref();
        let Some(&id) = self.by_five_tuple.get(ft) else {
            return self.error(out, msg, 437, k);
        };
        let Some(relay_family) = self.get(id).map(|a| Family::of(a.relayed.ip())) else {
            return self.error(out, msg, 437, k);
        };
        let mut peers: [Option<IpAddr>; crate::stun::MAX_ATTRIBUTES] =
            [None; crate::stun::MAX_ATTRIBUTES];
        let mut n = 0;
        for value in msg.get_all(attr::XOR_PEER_ADDRESS) {
            match self.vet_peer(value, msg.transaction_id(), relay_family, ft, false) {
                Ok(peer) => {
                    peers[n] = Some(peer.ip());
                    n += 1;
                }
                Err(code) => return self.error(out, msg, code, k),
            }
        }
        if n == 0 {
            return self.error(out, msg, 400, k);
        }
        let expires = now + Duration::from_secs(u64::from(self.cfg.permission_lifetime));
        let max = self.cfg.max_permissions;
        if let Some(a) = self.get_mut(id) {
            a.permissions.retain(|p| p.expires > now);
            let mut new: [Option<IpAddr>; crate::stun::MAX_ATTRIBUTES] =
                [None; crate::stun::MAX_ATTRIBUTES];
            let mut added = 0;
            for ip in peers[..n].iter().flatten() {
                if !a.permissions.iter().any(|p| p.ip == *ip) && !new[..added].contains(&Some(*ip))
                {
                    new[added] = Some(*ip);
                    added += 1;
                }
            }
            if a.permissions.len() + added > max {
                // RFC 8656 §9.2: the permission quota is exceeded.
                info!(five_tuple = %ft, "508: more than {max} permissions");
                return self.error(out, msg, 508, k);
            }
            for ip in peers[..n].iter().flatten() {
                a.add_permission(*ip, expires);
            }
        }
        let mut w = self.response(out, msg, Class::Success);
        self.seal(&mut w, msg, k);
        ClientAction::Reply
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        out: &mut Vec<u8>,
        key: Option<Key>,
    ) -> ClientAction {
        let k = key.as_ref();
        let Some(&id) = self.by_five_tuple.get(ft) else {
            return self.error(out, msg, 437, k);
        };
        let Some(relay_family) = self.get(id).map(|a| Family::of(a.relayed.ip())) else {
            return self.error(out, msg, 437, k);
        };
        let number = match msg
            .get(attr::CHANNEL_NUMBER)
            .map(attr::decode_channel_number)
        {
            Some(Ok(n)) => n,
            _ => return self.error(out, msg, 400, k),
        };
        let max = if self.cfg.rfc5766_channels {
            MAX_CHANNEL_RFC5766
        } else {
            channel::MAX_CHANNEL_RFC8656
        };
        if !(MIN_CHANNEL..=max).contains(&number) {
            return self.error(out, msg, 400, k);
        }
        let Some(value) = msg.get(attr::XOR_PEER_ADDRESS) else {
            return self.error(out, msg, 400, k);
        };
        let peer = match self.vet_peer(value, msg.transaction_id(), relay_family, ft, true) {
            Ok(p) => p,
            Err(code) => return self.error(out, msg, code, k),
        };
        let channel_expires = now + Duration::from_secs(u64::from(self.cfg.channel_lifetime));
        let permission_expires = now + Duration::from_secs(u64::from(self.cfg.permission_lifetime));
        let Some(a) = self.get_mut(id) else {
            return self.error(out, msg, 437, k);
        };
        a.prune(now);
        // RFC 8656 §11.2: the number must not be bound to another peer, nor
        // the peer to another number (including within the rebind guard).
        let conflict = a
            .channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer));
        if conflict {
            return self.error(out, msg, 400, k);
        }
        let new_permission = !a.permissions.iter().any(|p| p.ip == peer.ip());
        match a.channels.iter().position(|c| c.number == number) {
            Some(i) => a.channels[i].expires = channel_expires,
            None => {
                let (max_channels, max_permissions) =
                    (self.cfg.max_channels, self.cfg.max_permissions);
                // Re-borrow after reading the limits.
                let a = self.get_mut(id).expect("checked above");
                if a.channels.len() >= max_channels
                    || (new_permission && a.permissions.len() >= max_permissions)
                {
                    info!(five_tuple = %ft, "508: more than {max_channels} channels or {max_permissions} permissions");
                    return self.error(out, msg, 508, k);
                }
                a.channels.push(Channel {
                    number,
                    peer,
                    expires: channel_expires,
                });
            }
        }
        let Some(a) = self.get_mut(id) else {
            return self.error(out, msg, 437, k);
        };
        a.add_permission(peer.ip(), permission_expires);
        let mut w = self.response(out, msg, Class::Success);
        self.seal(&mut w, msg, k);
        ClientAction::Reply
    }

    /// Handles a datagram from `peer` that arrived on `allocation`'s relay
    /// socket. The payload is `buf[payload]`; `payload.start` must be at least
    /// [`channel::HEADROOM`] and `buf` must extend [`channel::TAILROOM`]
    /// bytes past `payload.end`.
    ///
    /// Returns where to send the framed message (ChannelData if the peer has
    /// a channel, else a Data indication), or `None` to drop it (no
    /// permission, or the allocation is gone).
    pub fn handle_peer(
        &mut self,
        now: Instant,
        allocation: AllocationId,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> Option<Delivery> {
        let tid_seed = self.random();
        let a = self.get_mut(allocation)?;
        if !a.permitted(peer.ip(), now) || !a.admit_to_client(payload.len(), now) {
            return None;
        }
        let stream = a.five_tuple.transport.is_stream();
        let len = payload.len() as u64;
        let range = match a.channel_for_peer(peer, now) {
            Some(number) => channel::frame_channel_data(buf, payload, number, stream),
            None => {
                if payload.len() > usize::from(u16::MAX) - 64 {
                    return None;
                }
                let mut tid = [0u8; 12];
                tid[..8].copy_from_slice(&tid_seed.to_le_bytes());
                tid[8..].copy_from_slice(&allocation.generation.to_le_bytes());
                channel::frame_data_indication(buf, payload, peer, &tid, a.fingerprint)
            }
        };
        a.traffic.to_client_packets += 1;
        a.traffic.to_client_bytes += len;
        Some(Delivery {
            link: a.link,
            client: a.five_tuple,
            range,
        })
    }

    /// The client's stream connection on `five_tuple` closed: its allocation
    /// ends (RFC 8656 §3.1).
    pub fn client_closed(&mut self, now: Instant, five_tuple: &FiveTuple) {
        if let Some(&id) = self.by_five_tuple.get(five_tuple) {
            self.close(id, CloseReason::ConnectionClosed, now);
        }
    }

    /// Expires allocations, permissions and channels. Call at least once per
    /// second.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<AllocationId> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.expires <= now)
            .map(|(_, a)| a.id)
            .collect();
        for id in expired {
            self.close(id, CloseReason::Expired, now);
        }
        for (_, a) in self.allocations.iter_mut() {
            a.prune(now);
        }
        let realm = &self.cfg.auth.realm;
        self.auth_log.sweep(now, |r| {
            let code = if r.why == AuthFailure::StaleNonce { 438 } else { 401 };
            let (why, n) = (r.why, r.repeats);
            let secs = auth_log::WINDOW.as_secs();
            match r.client {
                Some(client) => info!(client = %client, user = r.user, realm = %realm, "{code}: {why}: {n} more in the last {secs} s"),
                None => info!(realm = %realm, "{n} more credential failures from other clients in the last {secs} s (not logged one by one)"),
            }
        });
    }

    /// Ends every allocation (shutdown).
    pub fn close_all(&mut self, now: Instant, reason: CloseReason) {
        let ids: Vec<AllocationId> = self.allocations.iter().map(|(_, a)| a.id).collect();
        for id in ids {
            self.close(id, reason, now);
        }
    }

    fn close(&mut self, id: AllocationId, reason: CloseReason, now: Instant) {
        if self.get(id).is_none() {
            return;
        }
        let index = id.index as usize;
        let a = self.allocations.remove(index);
        self.by_five_tuple.remove(&a.five_tuple);
        self.cfg.usage.release(&a.claim);
        self.stats.ended[reason.index()] += 1;
        self.stats.closed_traffic.add(&a.traffic);
        let t = a.traffic;
        info!(
            five_tuple = %a.five_tuple,
            user = &*a.username,
            relayed = %a.relayed,
            reason = %reason,
            duration_s = now.saturating_duration_since(a.created).as_secs(),
            to_peer_packets = t.to_peer_packets,
            to_peer_bytes = t.to_peer_bytes,
            to_client_packets = t.to_client_packets,
            to_client_bytes = t.to_client_bytes,
            "allocation deleted"
        );
        self.events.push_back(Event::AllocationClosed {
            id,
            relayed: a.relayed,
            five_tuple: a.five_tuple,
        });
    }
}

#[cfg(test)]
mod tests;

/// Helpers for other modules' unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::AllocationId;

    /// An allocation id for tests outside the core.
    pub fn id(n: u32) -> AllocationId {
        AllocationId {
            index: n,
            generation: n,
        }
    }
}
