//! Permissions (RFC 8656 §9) and channel bindings (RFC 8656 §12): their
//! state, CreatePermission and ChannelBind, and the peer policy check.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::info;

use super::allocation::{Allocation, Families};
use super::request;
use super::{AllocationId, CHANNEL_REBIND_GUARD, ClientAction, Family, FiveTuple, Server};
use crate::auth::LongTermKey;
use crate::stun::channel::{MAX_CHANNEL_RFC5766, MIN_CHANNEL};
use crate::stun::{ErrorCode, MAX_ATTRIBUTES, Message};

/// A permission: the peer IP address data may be relayed to and from.
#[derive(Debug, Clone)]
pub(super) struct Permission {
    pub(super) ip: IpAddr,
    pub(super) expires: Instant,
}

/// A channel binding: a channel number for one peer transport address.
#[derive(Debug, Clone)]
pub(super) struct Channel {
    pub(super) number: u16,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
}

impl Allocation {
    /// Whether a permission for `ip` is installed at `now`.
    pub(super) fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    /// The channel bound to `peer` at `now`.
    pub(super) fn channel_for_peer(&self, peer: SocketAddr, now: Instant) -> Option<u16> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number)
    }

    /// The peer channel `number` is bound to at `now`.
    pub(super) fn peer_for_channel(&self, number: u16, now: Instant) -> Option<SocketAddr> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
            .map(|c| c.peer)
    }

    /// Installs or refreshes the permission for `ip` until `expires`.
    fn add_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => p.expires = expires,
            None => self.permissions.push(Permission { ip, expires }),
        }
    }

    /// Drops expired permissions, and channels once their rebind guard
    /// has passed too.
    pub(super) fn prune(&mut self, now: Instant) {
        self.permissions.retain(|p| p.expires > now);
        let guard = Duration::from_secs(CHANNEL_REBIND_GUARD);
        self.channels.retain(|c| c.expires + guard > now);
    }

    /// Permissions and channels are unique, within their caps and valid
    /// channel numbers.
    pub(super) fn check_invariants(
        &self,
        max_permissions: usize,
        max_channels: usize,
    ) -> Result<(), String> {
        if self.permissions.len() > max_permissions || self.channels.len() > max_channels {
            return Err(format!("{}: over a cap", self.five_tuple));
        }
        for (i, p) in self.permissions.iter().enumerate() {
            if self.permissions[..i].iter().any(|q| q.ip == p.ip) {
                return Err(format!(
                    "{}: duplicate permission {}",
                    self.five_tuple, p.ip
                ));
            }
        }
        for (i, c) in self.channels.iter().enumerate() {
            if self.channels[..i]
                .iter()
                .any(|d| d.number == c.number || d.peer == c.peer)
            {
                return Err(format!(
                    "{}: channel {:#x} or {} bound twice",
                    self.five_tuple, c.number, c.peer
                ));
            }
            if !(MIN_CHANNEL..=MAX_CHANNEL_RFC5766).contains(&c.number) {
                return Err(format!(
                    "{}: channel number {:#x}",
                    self.five_tuple, c.number
                ));
            }
        }
        Ok(())
    }
}

impl Server {
    /// Vets a peer for an allocation relaying on `relay_family` in `realm`:
    /// 443 for another family, 403 when the peer policy (with the realm's
    /// own lists) refuses it. `with_port`:
    /// the request relays to this exact transport address (ChannelBind),
    /// not to the whole IP (CreatePermission).
    pub(super) fn vet_peer(
        &mut self,
        peer: SocketAddr,
        (families, realm): &(Families, std::sync::Arc<str>),
        ft: &FiveTuple,
        with_port: bool,
    ) -> Result<(), ErrorCode> {
        if !families.contains(Family::of(peer.ip())) {
            return Err(ErrorCode::PeerAddressFamilyMismatch);
        }
        let realm = self.directory.realm_settings(realm);
        let (allowed, denied) = realm
            .as_deref()
            .map_or((&[][..], &[][..]), |r| (&r.allowed_peers, &r.denied_peers));
        let verdict = if with_port {
            self.cfg.policy.check_addr_with(peer, allowed, denied)
        } else {
            self.cfg.policy.check_with(peer.ip(), allowed, denied)
        };
        if let Err(why) = verdict {
            self.stats.forbidden_peers += 1;
            info!(five_tuple = %ft, peer = %peer, "403: peer refused: {why}");
            return Err(ErrorCode::Forbidden);
        }
        Ok(())
    }

    /// CreatePermission (RFC 8656 §9.2): every peer is vetted, then all are
    /// installed or none (508 past `max_permissions`).
    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        req: &request::CreatePermission,
        out: &mut Vec<u8>,
        key: Option<LongTermKey>,
    ) -> ClientAction {
        let k = key.as_ref();
        let Some(id) = self.allocation_for(ft) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        let Some(relay) = self.get(id).map(|a| (a.families(), a.realm.clone())) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        for peer in req.peers() {
            if let Err(code) = self.vet_peer(peer, &relay, ft, false) {
                return self.error(out, msg, code, k);
            }
        }
        let expires = now + Duration::from_secs(u64::from(self.cfg.permission_lifetime));
        let max = self.cfg.max_permissions;
        if let Some(a) = self.get_mut(id) {
            a.permissions.retain(|p| p.expires > now);
            let mut new = [None; MAX_ATTRIBUTES];
            let mut added = 0;
            for ip in req.peers().map(|p| p.ip()) {
                if !a.permissions.iter().any(|p| p.ip == ip) && !new[..added].contains(&Some(ip)) {
                    new[added] = Some(ip);
                    added += 1;
                }
            }
            if a.permissions.len() + added > max {
                // RFC 8656 §9.2: the permission quota is exceeded.
                info!(five_tuple = %ft, "508: more than {max} permissions");
                return self.error(out, msg, ErrorCode::InsufficientCapacity, k);
            }
            for peer in req.peers() {
                a.add_permission(peer.ip(), expires);
            }
        }
        self.announce_channels(id, now);
        self.success(out, msg, k)
    }

    /// With [`super::Config::offload_channels`]: an
    /// [`super::Event::ChannelBound`] for each live channel of allocation
    /// `id` whose peer is permitted at `now` (after a ChannelBind or
    /// CreatePermission, or when the allocation arrives from another worker
    /// or process).
    pub fn announce_channels(&mut self, id: AllocationId, now: Instant) {
        if !self.cfg.offload_channels {
            return;
        }
        let Server {
            allocations,
            events,
            ..
        } = self;
        let Some(a) = allocations.get(id.slot()).filter(|a| a.id == id) else {
            return;
        };
        if a.five_tuple.transport != super::Transport::Udp || a.shaper.is_some() {
            return;
        }
        for c in a.channels.iter().filter(|c| c.expires > now) {
            let Some(permission) = a
                .permissions
                .iter()
                .find(|p| p.ip == c.peer.ip() && p.expires > now)
            else {
                continue;
            };
            let relayed = std::iter::once(a.relayed)
                .chain(a.additional.map(|r| r.relayed))
                .find(|r| r.is_ipv4() == c.peer.is_ipv4());
            if let Some(relayed) = relayed {
                events.push_back(super::Event::ChannelBound {
                    id,
                    five_tuple: a.five_tuple,
                    relayed,
                    peer: c.peer,
                    number: c.number,
                    expires: c.expires.min(permission.expires),
                });
            }
        }
    }

    /// Adds `traffic` relayed below the sockets for allocation `id` (the
    /// driver's fast path) to its counters, as if the core had relayed it.
    pub fn add_offloaded(&mut self, id: AllocationId, traffic: &super::Traffic) {
        if let Some(a) = self.get_mut(id) {
            a.traffic.add(traffic);
        }
    }

    /// ChannelBind (RFC 8656 §11.2): binds or refreshes a channel and the
    /// permission for its peer.
    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
        req: &request::ChannelBind,
        out: &mut Vec<u8>,
        key: Option<LongTermKey>,
    ) -> ClientAction {
        let k = key.as_ref();
        let Some(id) = self.allocation_for(ft) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        let Some(relay) = self.get(id).map(|a| (a.families(), a.realm.clone())) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        if self.get(id).is_some_and(|a| a.tcp.is_some()) {
            // RFC 6062 §5: no channels on a TCP allocation.
            return self.error(out, msg, ErrorCode::BadRequest, k);
        }
        let (number, peer) = (req.number, req.peer);
        if let Err(code) = self.vet_peer(peer, &relay, ft, true) {
            return self.error(out, msg, code, k);
        }
        let channel_expires = now + Duration::from_secs(u64::from(self.cfg.channel_lifetime));
        let permission_expires = now + Duration::from_secs(u64::from(self.cfg.permission_lifetime));
        let (max_channels, max_permissions) = (self.cfg.max_channels, self.cfg.max_permissions);
        let Some(a) = self.get_mut(id) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        a.prune(now);
        // RFC 8656 §11.2: the number must not be bound to another peer, nor
        // the peer to another number (including within the rebind guard).
        let conflict = a
            .channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer));
        if conflict {
            return self.error(out, msg, ErrorCode::BadRequest, k);
        }
        let new_permission = !a.permissions.iter().any(|p| p.ip == peer.ip());
        match a.channels.iter().position(|c| c.number == number) {
            Some(i) => a.channels[i].expires = channel_expires,
            None => {
                if a.channels.len() >= max_channels
                    || (new_permission && a.permissions.len() >= max_permissions)
                {
                    info!(five_tuple = %ft, "508: more than {max_channels} channels or {max_permissions} permissions");
                    return self.error(out, msg, ErrorCode::InsufficientCapacity, k);
                }
                a.channels.push(Channel {
                    number,
                    peer,
                    expires: channel_expires,
                });
            }
        }
        a.add_permission(peer.ip(), permission_expires);
        self.announce_channels(id, now);
        self.success(out, msg, k)
    }
}
