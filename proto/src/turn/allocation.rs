//! Allocations (RFC 8656 §7): their state, Allocate and Refresh, lifetimes
//! and the end of an allocation.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::permission::{Channel, Permission};
use super::quota;
use super::request::{self, RequestedFamily};
use super::{
    AllocationId, ClientAction, CloseReason, DEFAULT_ALLOCATION_LIFETIME, DefaultFamily, Event,
    Family, FiveTuple, PortRequest, RelayProvider, RelayRequest, Server, Traffic,
};
use crate::auth::LongTermKey;
use crate::stun::{Class, ErrorCode, Message, attr};

/// One allocation: the relayed transport address of a client 5-tuple, with
/// its permissions and channel bindings.
#[derive(Debug)]
pub(super) struct Allocation {
    pub(super) id: AllocationId,
    /// Created with an empty MOBILITY-TICKET: may move to another 5-tuple.
    pub(super) mobile: bool,
    pub(super) five_tuple: FiveTuple,
    /// The driver's token for the client connection.
    pub(super) link: u32,
    /// The relayed transport address the relay socket is bound to.
    pub(super) relayed: SocketAddr,
    /// The address sent in XOR-RELAYED-ADDRESS (`external-ip` applied).
    pub(super) advertised: SocketAddr,
    /// The IPv6 relayed address of a dual allocation (RFC 8656 §7.2),
    /// beside the IPv4 one above.
    pub(super) additional: Option<Relayed>,
    /// The family a dual Allocate could not be given a relayed address
    /// of, why, and the attribute type to say it with (ADDRESS-ERROR-CODE
    /// in the success response, RFC 8656 §7.2).
    pub(super) address_error: Option<(Family, ErrorCode, u16)>,
    pub(super) username: Box<str>,
    /// The realm it belongs to (the default one, or its ORIGIN's).
    pub(super) realm: Arc<str>,
    /// The ORIGIN its Allocate carried (`check-origin-consistency`).
    pub(super) origin: Option<Box<str>>,
    /// The key it was created with (`None` without authentication).
    pub(super) key: Option<LongTermKey>,
    /// Its user came from the user database: later requests are checked
    /// against the database's key, and a deleted user loses it.
    pub(super) from_directory: bool,
    /// Its name in status reports ([`super::AllocationStatus::report_id`]).
    pub(super) report_id: u64,
    pub(super) created: Instant,
    pub(super) expires: Instant,
    /// The Allocate's transaction ID, to answer retransmissions alike.
    pub(super) allocate_tid: [u8; 12],
    pub(super) reservation_token: Option<[u8; 8]>,
    /// The client sends FINGERPRINT, so Data indications carry one too.
    pub(super) fingerprint: bool,
    pub(super) permissions: Vec<Permission>,
    pub(super) channels: Vec<Channel>,
    pub(super) traffic: Traffic,
    /// What counts against quotas, to release when it ends.
    pub(super) claim: quota::Claim,
    /// `max-bps` shaping, when configured at creation.
    pub(super) shaper: Option<Box<Shaper>>,
    /// A TCP allocation (RFC 6062) and its peer connections; `None` for
    /// UDP.
    pub(super) tcp: Option<Vec<super::tcp::TcpConnection>>,
}

/// A relayed transport address and the address advertised for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Relayed {
    pub(super) relayed: SocketAddr,
    pub(super) advertised: SocketAddr,
}

/// The address families an allocation relays: one, or both for a dual
/// allocation (RFC 8656 §7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Families {
    v4: bool,
    v6: bool,
}

impl Families {
    /// Whether the allocation has a relayed address of family `f`.
    pub(super) fn contains(self, f: Family) -> bool {
        match f {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// Per-allocation bandwidth limit, each direction on its own.
#[derive(Debug)]
pub(super) struct Shaper {
    /// Bytes per second.
    pub(super) rate: u64,
    pub(super) to_peer: quota::Bucket,
    pub(super) to_client: quota::Bucket,
}

impl Allocation {
    /// Whether `bytes` may be relayed to the peer at `now` (`max-bps`).
    pub(super) fn admit_to_peer(&mut self, bytes: usize, now: Instant) -> bool {
        match &mut self.shaper {
            None => true,
            Some(s) => s.to_peer.take(bytes as u64, s.rate, now),
        }
    }

    /// Its `max-bps` limit, bytes per second each way; 0 for none.
    pub(super) fn max_bps(&self) -> u64 {
        self.shaper.as_ref().map_or(0, |s| s.rate)
    }

    /// Whether `bytes` may be relayed to the client at `now` (`max-bps`).
    pub(super) fn admit_to_client(&mut self, bytes: usize, now: Instant) -> bool {
        match &mut self.shaper {
            None => true,
            Some(s) => s.to_client.take(bytes as u64, s.rate, now),
        }
    }

    /// The families the allocation relays.
    pub(super) fn families(&self) -> Families {
        let mut f = Families {
            v4: false,
            v6: false,
        };
        for addr in std::iter::once(self.relayed).chain(self.additional.map(|r| r.relayed)) {
            match Family::of(addr.ip()) {
                Family::V4 => f.v4 = true,
                Family::V6 => f.v6 = true,
            }
        }
        f
    }
}

/// Who asks for an allocation: the authenticated user, their realm and key.
pub(super) struct Owner<'u> {
    pub(super) username: &'u str,
    pub(super) realm: Arc<str>,
    pub(super) key: Option<LongTermKey>,
    /// The key came from the user database.
    pub(super) from_directory: bool,
}

impl Server {
    /// The quota and bandwidth limits in `realm`: the configuration's,
    /// with what the user database sets for the realm instead.
    pub(super) fn limits_in(&self, realm: &str) -> quota::Limits {
        let mut limits = self.cfg.limits;
        if let Some(r) = self.directory.realm_settings(realm) {
            limits.max_bps = r.max_bps.unwrap_or(limits.max_bps);
            limits.user_quota = r.user_quota.unwrap_or(limits.user_quota);
            limits.total_quota = r.total_quota.unwrap_or(limits.total_quota);
        }
        limits
    }

    /// The lifetime to grant for a requested one, seconds: capped by
    /// `max-allocate-lifetime`, the default when none is asked.
    fn lifetime(&self, requested: Option<u32>) -> u32 {
        let max = self.cfg.max_allocation_lifetime.max(1);
        match requested {
            Some(r) => r.min(max),
            None => DEFAULT_ALLOCATION_LIFETIME.min(max),
        }
    }

    /// The local address to bind a relay of `family` on for `ft`:
    /// round-robin over `relay-ip`, else the address the client reached,
    /// else a listening address of that family (not loopback if another
    /// exists).
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

    /// The address to advertise for `relayed` (`external-ip`).
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
        w.xor_address(attr::XOR_RELAYED_ADDRESS, a.advertised);
        if let Some(second) = &a.additional {
            w.xor_address(attr::XOR_RELAYED_ADDRESS, second.advertised);
        }
        if let Some((family, code, typ)) = a.address_error {
            w.address_error(typ, family.code(), code);
        }
        w.attr_u32(attr::LIFETIME, remaining);
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

    /// Allocate (RFC 8656 §7.2), authenticated as `who`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn allocate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        msg: &Message<'_>,
        req: &request::Allocate<'_>,
        out: &mut Vec<u8>,
        relays: &mut dyn RelayProvider,
        who: Owner<'_>,
    ) -> ClientAction {
        let (username, key) = (who.username, who.key);
        let k = key.as_ref();
        if let Some(a) = self.by_five_tuple.get(ft).and_then(|id| self.get(*id)) {
            if a.allocate_tid == *msg.transaction_id() {
                // A retransmission: answer as the first time (RFC 8656 §7.2).
                return self.allocate_success(now, out, msg, a);
            }
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        }
        let fleet = self.redirect.and_then(|(plain, tls)| {
            if ft.transport.is_secure() {
                tls
            } else {
                Some(plain)
            }
        });
        if let Some(alt) = self.alternate_server(ft).or(fleet) {
            // Redirection (coturn's alternate-server), and how a draining
            // server hands new clients to its peers.
            self.stats.redirected += 1;
            let mut w = self.response(out, msg, Class::Error);
            w.error(ErrorCode::TryAlternate)
                .address(attr::ALTERNATE_SERVER, alt);
            self.seal(&mut w, msg, k);
            return ClientAction::Reply;
        }
        if self.draining {
            info!(five_tuple = %ft, user = username, "508: draining");
            return self.error(out, msg, ErrorCode::InsufficientCapacity, k);
        }
        let tcp = match req.transport {
            attr::TRANSPORT_UDP if self.cfg.allow_udp_relay => false,
            // RFC 6062 §5.1: over TCP or TLS only, and none of the UDP
            // allocation's options.
            attr::TRANSPORT_TCP if self.cfg.allow_tcp_relay => {
                if !ft.transport.is_stream()
                    || req.even_port.is_some()
                    || req.reservation_token.is_some()
                    || req.dont_fragment
                    || req.dual.is_some()
                    || req.mobility_ticket.is_some()
                {
                    return self.error(out, msg, ErrorCode::BadRequest, k);
                }
                true
            }
            _ => return self.error(out, msg, ErrorCode::UnsupportedTransportProtocol, k),
        };
        let mobile = match req.mobility_ticket {
            None => false,
            Some(_) if !self.cfg.mobility => {
                return self.error(out, msg, ErrorCode::MobilityForbidden, k);
            }
            Some(t) if !t.is_empty() => return self.error(out, msg, ErrorCode::BadRequest, k),
            Some(_) => true,
        };
        // Never shorter than the default (RFC 8656 §7.2).
        let lifetime = self
            .lifetime(req.lifetime)
            .max(DEFAULT_ALLOCATION_LIFETIME.min(self.cfg.max_allocation_lifetime.max(1)));
        // The relays to open: one of the requested (or default) family, or
        // for a dual allocation an IPv4 and an IPv6 one (RFC 8656 §7.2). A
        // family with no address to relay on is 440 — for the whole
        // request, or in ADDRESS-ERROR-CODE when the other family is given.
        let mut wanted: [Option<(Family, Option<IpAddr>, PortRequest)>; 2] = [None, None];
        let even = match req.even_port {
            None => PortRequest::Any,
            Some(reserve_next) => PortRequest::Even { reserve_next },
        };
        if let Some(t) = req.reservation_token {
            // The driver knows the reserved socket's address; the IP here
            // is only a hint.
            let ip = ft.server.ip();
            wanted[0] = Some((Family::of(ip), Some(ip), PortRequest::Reserved(t)));
        } else if req.dual.is_some() {
            wanted[0] = Some((Family::V4, self.relay_ip(Family::V4, ft), even));
            wanted[1] = Some((Family::V6, self.relay_ip(Family::V6, ft), PortRequest::Any));
        } else {
            let family = req.family.unwrap_or(match self.cfg.default_family {
                DefaultFamily::Ipv4 => Family::V4,
                DefaultFamily::Ipv6 => Family::V6,
                DefaultFamily::Keep => Family::of(ft.server.ip()),
            });
            wanted[0] = Some((family, self.relay_ip(family, ft), even));
        }
        if wanted.iter().flatten().all(|(_, ip, _)| ip.is_none()) {
            return self.error(out, msg, ErrorCode::AddressFamilyNotSupported, k);
        }

        let id = AllocationId::new(self.allocations.vacant_key() as u32, self.next_generation);
        let quota_user = self.quota_user(username);
        let limits = self.limits_in(&who.realm);
        let claim = match self.ledger.acquire(&who.realm, quota_user, &limits) {
            quota::Acquire::Granted(c) => c,
            quota::Acquire::Refused(why) => {
                self.stats.quota_refusals += 1;
                info!(five_tuple = %ft, user = username, "486: {why}");
                return self.error(out, msg, ErrorCode::AllocationQuotaReached, k);
            }
            quota::Acquire::Pending => {
                return ClientAction::Await(super::Wanted::Quota {
                    realm: who.realm,
                    user: quota_user.into(),
                });
            }
        };
        let error_type = if req.dual == Some(true) {
            attr::ADDRESS_ERROR_CODE_DRAFT
        } else {
            attr::ADDRESS_ERROR_CODE
        };
        let mut opened: Vec<super::OpenedRelay> = Vec::with_capacity(2);
        let mut address_error = None;
        for (family, ip, port) in wanted.into_iter().flatten() {
            let Some(ip) = ip else {
                address_error = Some((family, ErrorCode::AddressFamilyNotSupported, error_type));
                continue;
            };
            let relay = RelayRequest {
                ip,
                port,
                dont_fragment: req.dont_fragment,
                tcp,
            };
            match relays.open(id, &relay) {
                Ok(o) => opened.push(o),
                Err(e) => {
                    self.stats.no_port_refusals += 1;
                    info!(five_tuple = %ft, user = username, "508: cannot open relay socket on {ip}: {e:?}");
                    address_error = Some((family, ErrorCode::InsufficientCapacity, error_type));
                }
            }
        }
        let Some(&primary) = opened.first() else {
            self.ledger.release(&claim);
            let code = address_error.map_or(ErrorCode::InsufficientCapacity, |(_, c, _)| c);
            return self.error(out, msg, code, k);
        };
        let additional = opened.get(1).map(|o| Relayed {
            relayed: o.addr,
            advertised: self.advertised(o.addr),
        });
        let opened = primary;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let max_bps = limits.max_bps;
        let allocation = Allocation {
            id,
            mobile,
            five_tuple: *ft,
            link,
            relayed: opened.addr,
            advertised: self.advertised(opened.addr),
            additional,
            address_error,
            username: username.into(),
            realm: who.realm,
            origin: msg.text(attr::ORIGIN).and_then(Result::ok).map(Into::into),
            key,
            from_directory: who.from_directory,
            report_id: self.random() >> 4,
            created: now,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            allocate_tid: *msg.transaction_id(),
            reservation_token: opened.reservation,
            fingerprint: msg.has_fingerprint() || self.cfg.fingerprint,
            permissions: Vec::new(),
            channels: Vec::new(),
            traffic: Traffic::default(),
            claim,
            tcp: tcp.then(Vec::new),
            shaper: (max_bps > 0).then(|| {
                Box::new(Shaper {
                    rate: max_bps,
                    to_peer: quota::Bucket::new(max_bps, now),
                    to_client: quota::Bucket::new(max_bps, now),
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
        if let Some(second) = &allocation.additional {
            info!(five_tuple = %ft, relayed = %second.relayed, advertised = %second.advertised, "allocation created: dual, second relayed address");
        }
        let index = self.allocations.insert(allocation);
        debug_assert_eq!(index, id.slot());
        self.by_five_tuple.insert(*ft, id);
        self.report(id, super::StatusChange::New, now);
        let a = self.get(id).expect("just inserted");
        self.allocate_success(now, out, msg, a)
    }

    /// The `alternate-server` (or `tls-alternate-server`) of the client's
    /// family to redirect an Allocate to, round-robin; `None` when there is
    /// none.
    fn alternate_server(&mut self, ft: &FiveTuple) -> Option<SocketAddr> {
        let alternates = if ft.transport.is_secure() {
            &self.cfg.tls_alternate_servers
        } else {
            &self.cfg.alternate_servers
        };
        let n = alternates
            .iter()
            .filter(|a| a.is_ipv4() == ft.client.is_ipv4())
            .count();
        if n == 0 {
            return None;
        }
        self.alternate_rr = self.alternate_rr.wrapping_add(1);
        alternates
            .iter()
            .filter(|a| a.is_ipv4() == ft.client.is_ipv4())
            .nth(self.alternate_rr % n)
            .copied()
    }

    /// Refresh (RFC 8656 §7.3), and the move of a mobile allocation to this
    /// 5-tuple (RFC 8016 §3.2).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn refresh(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        msg: &Message<'_>,
        req: &request::Refresh<'_>,
        out: &mut Vec<u8>,
        key: Option<LongTermKey>,
        username: &str,
    ) -> ClientAction {
        let k = key.as_ref();
        if req.mobility_ticket.is_some() && !self.cfg.mobility {
            return self.error(out, msg, ErrorCode::MobilityForbidden, k);
        }
        let id = match (self.by_five_tuple.get(ft), req.mobility_ticket) {
            (Some(&id), _) => id,
            (None, None) => return self.error(out, msg, ErrorCode::AllocationMismatch, k),
            // A mobile client arriving from a new 5-tuple (RFC 8016 §3.2).
            (None, Some(t)) => match self.arrive(t, ft, link, username) {
                Ok(id) => id,
                Err(action) => {
                    return match action {
                        Arrival::Elsewhere(migrate) => migrate,
                        Arrival::Refused(code) => self.error(out, msg, code, k),
                    };
                }
            },
        };
        let Some(families) = self.get(id).map(Allocation::families) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        let family = match req.family {
            None => None,
            Some(RequestedFamily::Known(f)) if families.contains(f) => Some(f),
            Some(_) => return self.error(out, msg, ErrorCode::PeerAddressFamilyMismatch, k),
        };
        let lifetime = match req.lifetime {
            Some(0) => 0,
            requested => self.lifetime(requested),
        };
        let dual = self.get(id).is_some_and(|a| a.additional.is_some());
        if let (0, Some(f), true) = (lifetime, family, dual) {
            // One family of a dual allocation goes; the other lives on
            // (RFC 8656 §7.3).
            self.drop_family(id, f, ft);
        } else if lifetime == 0 {
            // coturn's status feed says "refreshed lifetime=0" before
            // "deleted": so do we.
            if let Some(a) = self.get_mut(id) {
                a.expires = now;
            }
            self.report(id, super::StatusChange::Refreshed, now);
            self.close(id, CloseReason::Deleted, now);
        } else if let Some(a) = self.get_mut(id) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
            self.report(id, super::StatusChange::Refreshed, now);
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

    /// Deletes the relayed address of family `f` of dual allocation `id`,
    /// keeping the other, and tells the driver to close its socket.
    fn drop_family(&mut self, id: AllocationId, f: Family, ft: &FiveTuple) {
        let Some(a) = self.get_mut(id) else {
            return;
        };
        let Some(second) = a.additional.take() else {
            return;
        };
        let gone = if Family::of(second.relayed.ip()) == f {
            second.relayed
        } else {
            let gone = a.relayed;
            a.relayed = second.relayed;
            a.advertised = second.advertised;
            gone
        };
        info!(five_tuple = %ft, relayed = %gone, "dual allocation: one relayed address deleted");
        self.events
            .push_back(Event::RelayClosed { id, relayed: gone });
    }

    /// Ends allocation `id`: releases its quota claim, counts and logs it,
    /// and tells the driver to close its relay socket.
    pub(super) fn close(&mut self, id: AllocationId, reason: CloseReason, now: Instant) {
        if self.get(id).is_none() {
            return;
        }
        self.report(id, super::StatusChange::Deleted, now);
        let a = self.allocations.remove(id.slot());
        self.by_five_tuple.remove(&a.five_tuple);
        self.ledger.release(&a.claim);
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
            additional: a.additional.map(|r| r.relayed),
            five_tuple: a.five_tuple,
        });
    }
}

/// Why a Refresh with a mobility ticket did not find its allocation here.
pub(super) enum Arrival {
    /// Another worker has it: the driver moves it here.
    Elsewhere(ClientAction),
    /// The ticket is no good: answer with this code.
    Refused(ErrorCode),
}
