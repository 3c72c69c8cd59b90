//! The data path both ways (RFC 8656 §10–12): client ChannelData and Send
//! indications to peers, peer datagrams to clients as ChannelData or Data
//! indications. Nothing here allocates.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use tracing::trace;

use super::{AllocationId, ClientAction, Delivery, Family, FiveTuple, Server};
use crate::stun::channel;
use crate::stun::{Message, attr};

impl Server {
    /// ChannelData from a client (RFC 8656 §12.5): relayed to the channel's
    /// peer, dropped without an allocation, a bound channel or bandwidth.
    pub(super) fn client_channel_data(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        data: &[u8],
    ) -> ClientAction {
        let Some((number, payload)) = channel::parse_channel_data(data) else {
            return ClientAction::None;
        };
        let Some(id) = self.allocation_for(ft) else {
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

    /// A Send indication (RFC 8656 §10.2): relayed to XOR-PEER-ADDRESS when
    /// it has a permission; anything wrong drops it silently.
    pub(super) fn send_indication(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        msg: &Message<'_>,
    ) -> ClientAction {
        let Some(id) = self.allocation_for(ft) else {
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
        let Some(realm) = self.get(id).map(|a| a.realm.clone()) else {
            return ClientAction::None;
        };
        let lists = self.directory.realm_settings(&realm);
        let (allowed, denied) = lists
            .as_deref()
            .map_or((&[][..], &[][..]), |r| (&r.allowed_peers, &r.denied_peers));
        if self
            .cfg
            .policy
            .check_addr_with(peer, allowed, denied)
            .is_err()
        {
            trace!(five_tuple = %ft, %peer, "Send indication to a forbidden peer dropped");
            return ClientAction::None;
        }
        let Some(a) = self.get_mut(id) else {
            return ClientAction::None;
        };
        if a.tcp.is_some()
            || !a.families().contains(Family::of(peer.ip()))
            || !a.permitted(peer.ip(), now)
        {
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
}
