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
//! [`Event::AllocationClosed`] from [`Server::poll_event`]; quotas are
//! counted in the [`quota::Ledger`] it hands in.
//!
//! A request is decoded once into a typed [`request::Request`] (400, 420
//! and 440 come from there); the handlers decide on its fields:
//! [`allocation`] (Allocate, Refresh, expiry), [`permission`]
//! (CreatePermission, ChannelBind, the peer policy), [`relay`] (the data
//! path both ways), [`mobility`] (RFC 8016 tickets and moving allocations
//! between workers), with [`rate_limit`] and [`auth_log`] beside them.
//!
//! The relay hot path allocates nothing: client ChannelData and Send
//! indications come back as [`ClientAction::Relay`] with the payload's range
//! in the caller's buffer, and peer data is framed in place by
//! [`Server::handle_peer`].

mod allocation;
mod auth_log;
mod config;
pub mod directory;
mod driver;
mod five_tuple;
mod mobility;
mod permission;
pub mod policy;
pub mod quota;
pub mod rate_limit;
mod relay;
pub mod request;
mod saved;
#[cfg(any(test, feature = "fuzzing"))]
pub mod sim;
mod stats;
pub mod tcp;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use slab::Slab;
use tracing::{debug, info};

use crate::auth::{
    AuthFailure, FEATURE_PASSWORD_ALGORITHMS, LongTermKey, NonceCheck, NonceIssuer,
    PasswordAlgorithm, Verdict,
};
use crate::stun::{Class, ErrorCode, Message, MessageWriter, attr, method};
use allocation::Allocation;
use rate_limit::{RateLimiter, SeededMap, SeededState};
use request::{Credentials, Request, UserId};

pub use config::Config;
pub use directory::{Directory, Lookup, NoDirectory, RealmSettings, Secrets, Wanted};
pub use driver::{
    AllocationStatus, ClientAction, CloseReason, Delivery, Event, OpenedRelay, PortRequest,
    RelayError, RelayProvider, RelayRequest, StatusChange,
};
pub use five_tuple::{AllocationId, DefaultFamily, ExternalIp, Family, FiveTuple, Transport};
pub use mobility::MovedAllocation;
pub use saved::{RestoreError, SavedAllocation, SavedChannel, SavedKey, SavedPermission};
pub use stats::{Gauges, Stats, Traffic};

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
/// How long an EVEN-PORT reservation is held, seconds (RFC 8656 §7.2:
/// "about 30 seconds"). The driver enforces it.
pub const RESERVATION_LIFETIME: u64 = 30;

/// The TURN server state machine for one worker's share of the clients.
pub struct Server {
    cfg: std::sync::Arc<Config>,
    /// Where allocations are counted against quotas (shared by the driver).
    ledger: Box<dyn quota::Ledger>,
    /// Users, secrets and realm settings of a user database.
    directory: Box<dyn Directory>,
    allocations: Slab<Allocation>,
    by_five_tuple: SeededMap<FiveTuple, AllocationId>,
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
    /// Where a fleet sends new Allocates while this node is busy or
    /// draining: over UDP/TCP, and over TLS.
    redirect: Option<(SocketAddr, Option<SocketAddr>)>,
}

/// The outcome of authenticating a request.
enum Authed<'m> {
    /// Authenticated (or auth disabled: no key, empty username) in `realm`;
    /// `from_directory` when the key came from the user database.
    Ok {
        key: Option<LongTermKey>,
        username: Cow<'m, str>,
        realm: Arc<str>,
        from_directory: bool,
    },
    /// An error response is in `out`.
    Answered,
    /// The directory must be asked first.
    Pending(Wanted),
}

impl Server {
    /// A core with no allocations for worker `worker`. `now` and `unix_now`
    /// (UNIX seconds) anchor the wall clock; `seed` keys the rate limiter's
    /// and the allocation table's hashes and seeds the generator of Data
    /// indication transaction IDs (pass a random value); `ledger` counts
    /// allocations against quotas.
    pub fn new(
        cfg: std::sync::Arc<Config>,
        ledger: Box<dyn quota::Ledger>,
        worker: u16,
        now: Instant,
        unix_now: u64,
        seed: u64,
    ) -> Self {
        Server {
            cfg,
            ledger,
            directory: Box::new(NoDirectory),
            allocations: Slab::new(),
            by_five_tuple: SeededMap::with_hasher(SeededState::new(seed)),
            events: VecDeque::new(),
            next_generation: 1,
            wall: (now, unix_now),
            rng: seed | 1,
            relay_rr: 0,
            worker,
            // Its own key, not the table's.
            limiter: RateLimiter::new(now, seed.rotate_left(29) ^ 0xA076_1D64_78BD_642F),
            auth_log: auth_log::AuthLog::default(),
            stats: Stats::default(),
            draining: false,
            alternate_rr: 0,
            redirect: None,
        }
    }

    /// Takes users, secrets and realm settings from `directory` as well as
    /// from the configuration (a user database).
    pub fn with_directory(mut self, directory: Box<dyn Directory>) -> Self {
        self.directory = directory;
        self
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

    /// The `max-bps` limit of allocation `id`, bytes per second each way;
    /// 0 when it has none (RFC 6062 connections are shaped by it too).
    pub fn max_bps(&self, id: AllocationId) -> u64 {
        self.get(id).map_or(0, allocation::Allocation::max_bps)
    }

    /// The user and realm allocation `id` belongs to, if it exists.
    pub fn owner_of(&self, id: AllocationId) -> Option<(&str, &Arc<str>)> {
        self.get(id).map(|a| (&*a.username, &a.realm))
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

    /// Sends new Allocates to another node of the fleet with 300
    /// ALTERNATE-SERVER (`address` over UDP/TCP, `tls` over TLS, when it
    /// has one), or stops (`None`). `alternate-server` lists come first.
    pub fn set_redirect(&mut self, redirect: Option<(SocketAddr, Option<SocketAddr>)>) {
        self.redirect = redirect;
    }

    /// Whether the core is draining.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Live gauges; with `per_user`, allocations are counted per user (in
    /// the order of their names).
    pub fn gauges(&self, per_user: bool) -> Gauges {
        let mut g = Gauges::default();
        let mut users: std::collections::BTreeMap<&str, u32> = Default::default();
        for (_, a) in self.allocations.iter() {
            g.allocations[a.five_tuple.transport as usize] += 1;
            g.permissions += a.permissions.len() as u64;
            g.channels += a.channels.len() as u64;
            g.live_traffic.add(&a.traffic);
            if per_user {
                *users.entry(self.quota_user(&a.username)).or_insert(0) += 1;
            }
        }
        g.users = users.into_iter().map(|(u, n)| (u.into(), n)).collect();
        g
    }

    /// The name quotas and per-user gauges count `username` under: the
    /// user part of a TURN REST username.
    fn quota_user<'u>(&self, username: &'u str) -> &'u str {
        match &self.cfg.auth.mechanism {
            crate::auth::Mechanism::RestApi { separator, .. } => {
                crate::auth::rest_user(username, *separator)
            }
            _ => username,
        }
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
            a.check_invariants(self.cfg.max_permissions, self.cfg.max_channels)?;
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
        self.allocations.get(id.slot()).filter(|a| a.id == id)
    }

    fn get_mut(&mut self, id: AllocationId) -> Option<&mut Allocation> {
        self.allocations.get_mut(id.slot()).filter(|a| a.id == id)
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
                    return self.classic_binding(now, five_tuple, data, out);
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

    /// Adds the integrity attribute (when authenticated) and FINGERPRINT
    /// (when the request had one or `fingerprint` is set). The integrity is
    /// MESSAGE-INTEGRITY-SHA256 when the request was checked with a SHA-256
    /// key or carried MESSAGE-INTEGRITY-SHA256 itself, else
    /// MESSAGE-INTEGRITY (RFC 8489 §9.2.4).
    fn seal(&self, w: &mut MessageWriter<'_>, req: &Message<'_>, key: Option<&LongTermKey>) {
        match key {
            Some(k @ LongTermKey::Sha256(_)) => {
                w.integrity_sha256(k.as_bytes());
            }
            Some(k) if req.has_integrity_sha256() => {
                w.integrity_sha256(k.as_bytes());
            }
            Some(k) => {
                w.integrity(k.as_bytes());
            }
            None => {}
        }
        if self.cfg.fingerprint || req.has_fingerprint() {
            w.fingerprint();
        }
    }

    /// An error response with `code`, signed with `key` when the request
    /// was authenticated.
    fn error(
        &self,
        out: &mut Vec<u8>,
        req: &Message<'_>,
        code: ErrorCode,
        key: Option<&LongTermKey>,
    ) -> ClientAction {
        let mut w = self.response(out, req, Class::Error);
        w.error(code);
        self.seal(&mut w, req, key);
        ClientAction::Reply
    }

    /// A success response with no attributes but the seal.
    fn success(
        &self,
        out: &mut Vec<u8>,
        req: &Message<'_>,
        key: Option<&LongTermKey>,
    ) -> ClientAction {
        let mut w = self.response(out, req, Class::Success);
        self.seal(&mut w, req, key);
        ClientAction::Reply
    }

    /// 401 or 438 with REALM (`realm`), a fresh NONCE announcing the
    /// security features, and PASSWORD-ALGORITHMS when that feature is on
    /// (RFC 8489 §9.2.4); never MESSAGE-INTEGRITY.
    #[allow(clippy::too_many_arguments)]
    fn challenge(
        &self,
        now: Instant,
        out: &mut Vec<u8>,
        ft: &FiveTuple,
        req: &Message<'_>,
        code: ErrorCode,
        realm: &str,
    ) -> ClientAction {
        let features = self.cfg.security_features();
        let nonce = self
            .cfg
            .nonces
            .issue(self.unix(now), ft.client.ip(), features);
        let mut w = self.response(out, req, Class::Error);
        w.error(code)
            .attr(attr::REALM, realm.as_bytes())
            .attr(attr::NONCE, &nonce);
        if features & FEATURE_PASSWORD_ALGORITHMS != 0 {
            let list = PasswordAlgorithm::encode_list(&self.cfg.password_algorithms);
            w.attr(attr::PASSWORD_ALGORITHMS, &list);
        }
        self.seal(&mut w, req, None);
        ClientAction::Reply
    }

    /// The server's other address for RFC 5780 as seen from `ft` (another
    /// listening address of the family, on the other of the two ports),
    /// when RFC 5780 is offered there: UDP only, as coturn.
    fn other_address(&self, ft: &FiveTuple) -> Option<SocketAddr> {
        let (main, alt) = self.cfg.rfc5780?;
        if ft.transport != Transport::Udp {
            return None;
        }
        let ip = ft.server.ip();
        let other_ip = self
            .cfg
            .listening_ips
            .iter()
            .copied()
            .find(|i| Family::of(*i) == Family::of(ip) && *i != ip && !i.is_unspecified())?;
        let other_port = match ft.server.port() {
            p if p == main => alt,
            p if p == alt => main,
            _ => return None,
        };
        Some(SocketAddr::new(other_ip, other_port))
    }

    /// A Binding success: XOR-MAPPED-ADDRESS, the client's address. With
    /// RFC 5780 offered (RFC 5780 §6.1): also MAPPED-ADDRESS,
    /// RESPONSE-ORIGIN and OTHER-ADDRESS, sent from the address and port
    /// CHANGE-REQUEST asks for, to the port RESPONSE-PORT names, padded as
    /// the request was (PADDING); such answers are rate-limited like
    /// unauthenticated ones, as they can go where the request did not
    /// come from. A malformed one of these attributes is 400.
    fn binding(
        &mut self,
        now: Instant,
        out: &mut Vec<u8>,
        ft: &FiveTuple,
        msg: &Message<'_>,
        key: Option<&LongTermKey>,
    ) -> ClientAction {
        let Some(other) = self.other_address(ft) else {
            let mut w = self.response(out, msg, Class::Success);
            w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client);
            if self.cfg.rfc3489 {
                w.address(attr::MAPPED_ADDRESS, ft.client);
            }
            self.seal(&mut w, msg, key);
            return ClientAction::Reply;
        };
        let change = msg
            .get(attr::CHANGE_REQUEST)
            .map(attr::decode_change_request)
            .transpose();
        let response_port = msg
            .get(attr::RESPONSE_PORT)
            .map(|v| match v {
                [hi, lo, _, _] => Ok(u16::from_be_bytes([*hi, *lo])),
                _ => Err(()),
            })
            .transpose();
        let (Ok(change), Ok(response_port)) = (change, response_port) else {
            self.error(out, msg, ErrorCode::BadRequest, key);
            return self.limit(now, ft, out);
        };
        let (change_ip, change_port) = change.unwrap_or((false, false));
        let from = SocketAddr::new(
            if change_ip {
                other.ip()
            } else {
                ft.server.ip()
            },
            if change_port {
                other.port()
            } else {
                ft.server.port()
            },
        );
        let to = match response_port {
            Some(p) if p != 0 => SocketAddr::new(ft.client.ip(), p),
            _ => ft.client,
        };
        let padding = msg.get(attr::PADDING).map_or(0, <[u8]>::len);
        let mut w = self.response(out, msg, Class::Success);
        w.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client)
            .address(attr::MAPPED_ADDRESS, ft.client)
            .address(attr::RESPONSE_ORIGIN, from)
            .address(attr::OTHER_ADDRESS, other);
        if padding > 0 {
            w.attr(attr::PADDING, &vec![0u8; padding]);
        }
        self.seal(&mut w, msg, key);
        if from == ft.server && to == ft.client {
            return ClientAction::Reply;
        }
        match self.limit(now, ft, out) {
            ClientAction::Reply => ClientAction::ReplyFrom { from, to },
            other => other,
        }
    }

    /// An RFC 3489 Binding request (no magic cookie: the 16 bytes after the
    /// length are its transaction ID), answered with MAPPED-ADDRESS only
    /// when `rfc3489` is on (RFC 3489 §11.2.1; SOURCE-ADDRESS and
    /// CHANGED-ADDRESS are left out, as RFC 5780 discovery is not offered,
    /// which keeps the answer at most 44 bytes). Anything else that does
    /// not parse is dropped.
    fn classic_binding(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> ClientAction {
        if !self.cfg.rfc3489 || self.cfg.no_stun || self.cfg.secure_stun || data.len() < 20 {
            return ClientAction::None;
        }
        let length = usize::from(u16::from_be_bytes([data[2], data[3]]));
        let cookie = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
        if data[0..2] != [0x00, 0x01]
            || length != data.len() - 20
            || length % 4 != 0
            || cookie == crate::stun::MAGIC_COOKIE
        {
            return ClientAction::None;
        }
        // A CHANGE-REQUEST asking for an answer from another address or
        // port is met when RFC 5780 discovery is offered (the same second
        // address and port); otherwise there is no answer, rather than a
        // wrong one from this address.
        let other = self.other_address(ft);
        let (mut change_ip, mut change_port) = (false, false);
        let mut rest = &data[20..];
        while rest.len() >= 4 {
            let typ = u16::from_be_bytes([rest[0], rest[1]]);
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            let Some(value) = rest.get(4..4 + len) else {
                return ClientAction::None;
            };
            if typ == attr::CHANGE_REQUEST && value.iter().any(|b| *b != 0) {
                let Ok(flags) = attr::decode_change_request(value) else {
                    return ClientAction::None;
                };
                if other.is_none() {
                    return ClientAction::None;
                }
                (change_ip, change_port) = flags;
            }
            rest = &rest[(4 + len).next_multiple_of(4).min(rest.len())..];
        }
        // MAPPED-ADDRESS; with RFC 5780 also SOURCE-ADDRESS (where the
        // answer comes from) and CHANGED-ADDRESS (RFC 3489 §11.2.3, §11.2.4).
        let from = match other {
            Some(o) => SocketAddr::new(
                if change_ip { o.ip() } else { ft.server.ip() },
                if change_port {
                    o.port()
                } else {
                    ft.server.port()
                },
            ),
            None => ft.server,
        };
        let mut attrs: Vec<(u16, SocketAddr)> = vec![(attr::MAPPED_ADDRESS, ft.client)];
        if let Some(o) = other {
            attrs.push((attr::SOURCE_ADDRESS, from));
            attrs.push((attr::CHANGED_ADDRESS, o));
        }
        let mut body = Vec::with_capacity(72);
        for (typ, addr) in attrs {
            let mut value = [0u8; 20];
            let n = crate::stun::encode_address(&mut value, addr);
            body.extend_from_slice(&typ.to_be_bytes());
            body.extend_from_slice(&(n as u16).to_be_bytes());
            body.extend_from_slice(&value[..n]);
        }
        out.extend_from_slice(&[0x01, 0x01]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&data[4..20]);
        out.extend_from_slice(&body);
        match self.limit(now, ft, out) {
            ClientAction::Reply if from != ft.server => ClientAction::ReplyFrom {
                from,
                to: ft.client,
            },
            action => action,
        }
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
        let mut unknown = request::unknown_attributes(msg, &mut unknown);
        let mut understood = [0u16; 16];
        if msg.method() == method::BINDING && self.other_address(ft).is_some() {
            // RFC 5780's comprehension-required attributes, while offered.
            let mut n = 0;
            for t in unknown.iter().filter(|t| {
                !matches!(
                    **t,
                    attr::CHANGE_REQUEST | attr::RESPONSE_PORT | attr::PADDING
                )
            }) {
                understood[n] = *t;
                n += 1;
            }
            unknown = &understood[..n];
        }
        if !unknown.is_empty() {
            let mut w = self.response(out, msg, Class::Error);
            w.error(ErrorCode::UnknownAttribute)
                .unknown_attributes(unknown);
            self.seal(&mut w, msg, None);
            debug!(five_tuple = %ft, method = method::name(msg.method()), "420 for unknown attributes {unknown:04x?}");
            return self.limit(now, ft, out);
        }
        let m = msg.method();
        let turn = matches!(
            m,
            method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND
        );
        if (m == method::BINDING && self.cfg.no_stun) || (turn && self.cfg.stun_only) {
            return ClientAction::None;
        }
        if m == method::BINDING && !self.cfg.secure_stun {
            return self.binding(now, out, ft, msg, None);
        }
        if !turn && m != method::BINDING {
            debug!(five_tuple = %ft, "400 for unsupported method 0x{m:03x}");
            self.error(out, msg, ErrorCode::BadRequest, None);
            return self.limit(now, ft, out);
        }
        let (key, username, realm, from_directory) = match self.authenticate(now, ft, msg, out) {
            Authed::Ok {
                key,
                username,
                realm,
                from_directory,
            } => (key, username, realm, from_directory),
            Authed::Answered => return self.limit(now, ft, out),
            Authed::Pending(wanted) => return ClientAction::Await(wanted),
        };
        let username: &str = &username;
        let k = key.as_ref();
        let action = match Request::decode(msg, self.cfg.rfc5766_channels) {
            Err(code) => self.error(out, msg, code, k),
            // secure-stun: an authenticated Binding.
            Ok(Request::Binding) => return self.binding(now, out, ft, msg, k),
            Ok(Request::Allocate(req)) => {
                let who = allocation::Owner {
                    username,
                    realm,
                    key,
                    from_directory,
                };
                self.allocate(now, ft, link, msg, &req, out, relays, who)
            }
            Ok(Request::Refresh(req)) => self.refresh(now, ft, link, msg, &req, out, key, username),
            Ok(Request::CreatePermission(req)) => {
                self.create_permission(now, ft, msg, &req, out, key)
            }
            Ok(Request::ChannelBind(req)) => self.channel_bind(now, ft, msg, &req, out, key),
            Ok(Request::Connect(peer)) => self.connect(ft, msg, peer, out, key),
            Ok(Request::ConnectionBind(connection)) => {
                let realm = self.realm_of(ft, msg);
                self.connection_bind(ft, msg, connection, out, key, username, realm)
            }
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

    /// The realm of a request on `ft`: its allocation's, else the one the
    /// directory maps its ORIGIN to, else the default realm.
    fn realm_of(&self, ft: &FiveTuple, msg: &Message<'_>) -> Arc<str> {
        if let Some(a) = self.allocation_for(ft).and_then(|id| self.get(id)) {
            return a.realm.clone();
        }
        msg.text(attr::ORIGIN)
            .and_then(Result::ok)
            .and_then(|origin| self.directory.realm_of_origin(origin))
            .unwrap_or_else(|| self.cfg.auth.realm.clone())
    }

    /// RFC 8489 §9.2.4 for long-term credentials, in the request's realm.
    fn authenticate<'m>(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'m>,
        out: &mut Vec<u8>,
    ) -> Authed<'m> {
        let realm = self.realm_of(ft, msg);
        if !self.cfg.auth.enabled() {
            return Authed::Ok {
                key: None,
                username: Cow::Borrowed(""),
                realm,
                from_directory: false,
            };
        }
        if !msg.has_integrity() {
            self.challenge(now, out, ft, msg, ErrorCode::Unauthorized, &realm);
            return Authed::Answered;
        }
        let creds = match Credentials::decode(msg) {
            Ok(c) => c,
            Err(code) => {
                self.error(out, msg, code, None);
                return Authed::Answered;
            }
        };
        let Some(algorithm) = self.password_algorithm(&creds) else {
            debug!(five_tuple = %ft, "400: PASSWORD-ALGORITHM(S) do not match what the nonce's answer offered");
            self.error(out, msg, ErrorCode::BadRequest, None);
            return Authed::Answered;
        };
        let username: Cow<'m, str> = match creds.user {
            UserId::Name(name) => Cow::Borrowed(name),
            UserId::Hash(hash) => match self.cfg.auth.user_by_hash(&realm, hash) {
                Some(name) => Cow::Owned(name.to_owned()),
                None => {
                    self.auth_failed(now, ft, "(userhash)", &realm, msg, AuthFailure::UnknownUser);
                    self.challenge(now, out, ft, msg, ErrorCode::Unauthorized, &realm);
                    return Authed::Answered;
                }
            },
        };
        match self
            .cfg
            .nonces
            .check(creds.nonce, self.unix(now), ft.client.ip())
        {
            NonceCheck::Valid => {}
            NonceCheck::Stale | NonceCheck::Invalid => {
                self.auth_failed(now, ft, &username, &realm, msg, AuthFailure::StaleNonce);
                self.challenge(now, out, ft, msg, ErrorCode::StaleNonce, &realm);
                return Authed::Answered;
            }
        }
        if self.cfg.require_sha256 && !msg.has_integrity_sha256() {
            self.auth_failed(now, ft, &username, &realm, msg, AuthFailure::Sha1Refused);
            self.challenge(now, out, ft, msg, ErrorCode::Unauthorized, &realm);
            return Authed::Answered;
        }
        if let Some(id) = self.allocation_for(ft) {
            match self.authenticate_on(now, id, ft, msg, &username, algorithm, out) {
                Some(Ok(key)) => {
                    return Authed::Ok {
                        key: Some(key),
                        username,
                        realm,
                        from_directory: self.get(id).is_some_and(|a| a.from_directory),
                    };
                }
                Some(Err(())) => return Authed::Answered,
                None => {}
            }
        }
        let verdict = self.cfg.auth.authenticate(
            &*self.directory,
            &realm,
            msg,
            &username,
            self.unix(now),
            algorithm,
        );
        match verdict {
            Verdict::Ok {
                key,
                from_directory,
            } => Authed::Ok {
                key: Some(key),
                username,
                realm,
                from_directory,
            },
            Verdict::Refused(why) => {
                self.auth_failed(now, ft, &username, &realm, msg, why);
                self.challenge(now, out, ft, msg, ErrorCode::Unauthorized, &realm);
                Authed::Answered
            }
            Verdict::Pending(wanted) => Authed::Pending(wanted),
        }
    }

    /// The password algorithm a request is checked with (RFC 8489 §9.2.4):
    /// MD5 unless its nonce announced "Password algorithms" and it chose
    /// another. `None` (400) when it sent only one of PASSWORD-ALGORITHM
    /// and PASSWORD-ALGORITHMS, changed the list it was offered, or chose
    /// an algorithm not in it.
    fn password_algorithm(&self, creds: &Credentials<'_>) -> Option<PasswordAlgorithm> {
        let announced = NonceIssuer::features_of(creds.nonce)
            .is_some_and(|f| f & FEATURE_PASSWORD_ALGORITHMS != 0);
        if !announced {
            return Some(PasswordAlgorithm::Md5);
        }
        match (creds.password_algorithms, creds.password_algorithm) {
            (None, None) => Some(PasswordAlgorithm::Md5),
            (Some(list), Some(code)) => {
                let offered = &self.cfg.password_algorithms;
                let same_list = *list == PasswordAlgorithm::encode_list(offered)[..];
                let chosen = PasswordAlgorithm::from_code(code)?;
                (same_list && offered.contains(&chosen)).then_some(chosen)
            }
            _ => None,
        }
    }

    /// Requests on an existing allocation must come from its user (and,
    /// with `check-origin-consistency`, its ORIGIN); they are checked with
    /// the key it was created with when they use the same password
    /// algorithm (a REST credential may expire while its allocation lives
    /// on, as in coturn), or, for a user of the database, with the user's
    /// key there now: a user deleted from the database loses the
    /// allocation. `None`: check the credentials as for a new client;
    /// `Some(Err(()))`: the answer is in `out`.
    #[allow(clippy::too_many_arguments)]
    fn authenticate_on(
        &mut self,
        now: Instant,
        id: AllocationId,
        ft: &FiveTuple,
        msg: &Message<'_>,
        username: &str,
        algorithm: PasswordAlgorithm,
        out: &mut Vec<u8>,
    ) -> Option<Result<LongTermKey, ()>> {
        let a = self.get(id)?;
        if *a.username != *username {
            info!(five_tuple = %ft, user = username, allocation_user = &*a.username, "441: request for another user's allocation");
            self.error(out, msg, ErrorCode::WrongCredentials, None);
            return Some(Err(()));
        }
        let origin = msg.text(attr::ORIGIN).and_then(Result::ok);
        if self.cfg.check_origin_consistency && a.origin.as_deref() != origin {
            info!(five_tuple = %ft, user = username, "441: ORIGIN differs from the allocation's");
            self.error(out, msg, ErrorCode::WrongCredentials, None);
            return Some(Err(()));
        }
        if !a.from_directory {
            return a
                .key
                .filter(|k| k.algorithm() == algorithm && msg.verify_integrity(k.as_bytes()))
                .map(Ok);
        }
        if algorithm != PasswordAlgorithm::Md5 {
            return None;
        }
        let realm = a.realm.clone();
        match self.directory.user_key(&realm, username) {
            Lookup::Found(key) if msg.verify_integrity(&key) => Some(Ok(LongTermKey::Md5(key))),
            Lookup::Found(_) => None,
            Lookup::Pending => {
                // The caller asks the directory through the full check.
                None
            }
            Lookup::Absent => {
                self.auth_failed(now, ft, username, &realm, msg, AuthFailure::UnknownUser);
                self.close(id, CloseReason::UserRemoved, now);
                self.challenge(now, out, ft, msg, ErrorCode::Unauthorized, &realm);
                Some(Err(()))
            }
        }
    }

    /// Counts a refused credential and logs it, once per client, user and
    /// reason per [`auth_log::WINDOW`] (retransmissions and retrying clients
    /// would otherwise log a line each).
    #[allow(clippy::too_many_arguments)]
    fn auth_failed(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        username: &str,
        realm: &str,
        msg: &Message<'_>,
        why: AuthFailure,
    ) {
        self.stats.auth_failures[why.index()] += 1;
        if self.auth_log.record(now, ft.client.ip(), username, why) {
            let code = refusal_code(why);
            info!(five_tuple = %ft, user = username, realm = %realm, method = method::name(msg.method()), "{}: {why}", code.code());
        }
    }

    /// The client's stream connection on `five_tuple` closed: its allocation
    /// ends (RFC 8656 §3.1).
    pub fn client_closed(&mut self, now: Instant, five_tuple: &FiveTuple) {
        if let Some(&id) = self.by_five_tuple.get(five_tuple) {
            self.close(id, CloseReason::ConnectionClosed, now);
        }
    }

    /// Expires allocations, permissions and channels, and reports repeated
    /// credential refusals whose window ended. Call at least once per
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
            let code = refusal_code(r.why).code();
            let (why, n) = (r.why, r.repeats);
            let secs = auth_log::WINDOW.as_secs();
            match r.client {
                Some(client) => info!(client = %client, user = r.user, realm = %realm, "{code}: {why}: {n} more in the last {secs} s"),
                None => info!(realm = %realm, "{n} more credential failures from other clients in the last {secs} s (not logged one by one)"),
            }
        });
    }

    /// Ends the allocations of `user` (the user part, for TURN REST
    /// usernames) in `realm`, or in every realm with `None`; returns how
    /// many (the operator's "end this user's sessions").
    pub fn close_user(&mut self, now: Instant, realm: Option<&str>, user: &str) -> usize {
        let ids: Vec<AllocationId> = self
            .allocations
            .iter()
            .filter(|(_, a)| {
                self.quota_user(&a.username) == user && realm.is_none_or(|r| r == &*a.realm)
            })
            .map(|(_, a)| a.id)
            .collect();
        for &id in &ids {
            self.close(id, CloseReason::Revoked, now);
        }
        ids.len()
    }

    /// Queues a status event for `id` when allocations are reported.
    fn report(&mut self, id: AllocationId, change: StatusChange, now: Instant) {
        if !self.cfg.report_allocations {
            return;
        }
        let Some(a) = self.get(id) else { return };
        let lifetime = match change {
            StatusChange::Deleted => 0,
            _ => a.expires.saturating_duration_since(now).as_secs() as u32,
        };
        let status = AllocationStatus {
            change,
            id,
            report_id: a.report_id,
            five_tuple: a.five_tuple,
            relayed: a.relayed,
            username: a.username.clone(),
            realm: a.realm.clone(),
            lifetime,
            traffic: a.traffic,
        };
        self.events.push_back(Event::Status(Box::new(status)));
    }

    /// Ends every allocation (shutdown).
    pub fn close_all(&mut self, now: Instant, reason: CloseReason) {
        let ids: Vec<AllocationId> = self.allocations.iter().map(|(_, a)| a.id).collect();
        for id in ids {
            self.close(id, reason, now);
        }
    }

    /// Ends every allocation whose client uses `transport` (a takeover's
    /// predecessor ends its DTLS clients', whose listener has moved);
    /// returns how many.
    pub fn close_transport(
        &mut self,
        now: Instant,
        transport: Transport,
        reason: CloseReason,
    ) -> usize {
        let ids: Vec<AllocationId> = self
            .allocations
            .iter()
            .filter(|(_, a)| a.five_tuple.transport == transport)
            .map(|(_, a)| a.id)
            .collect();
        for &id in &ids {
            self.close(id, reason, now);
        }
        ids.len()
    }
}

/// The error a refused credential is answered with: 438 for a stale nonce,
/// else 401.
fn refusal_code(why: AuthFailure) -> ErrorCode {
    if why == AuthFailure::StaleNonce {
        ErrorCode::StaleNonce
    } else {
        ErrorCode::Unauthorized
    }
}

#[cfg(test)]
mod tests;
