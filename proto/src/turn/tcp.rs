//! RFC 6062 TCP relaying: Connect, ConnectionBind and ConnectionAttempt.
//!
//! A TCP allocation's relayed transport address is a listening TCP socket.
//! The core decides who may connect where and names each peer connection
//! with a CONNECTION-ID; the driver opens, accepts and joins the TCP
//! connections and reports back ([`Server::tcp_connect_result`],
//! [`Server::tcp_peer_arrived`], [`Server::tcp_connection_ended`]).

use std::net::SocketAddr;
use std::time::Instant;

use tracing::info;

use super::allocation::Families;
use super::{AllocationId, ClientAction, Family, FiveTuple, Server};
use crate::auth::LongTermKey;
use crate::stun::{Class, ErrorCode, Message, MessageWriter, attr, method};

/// Peer connections one TCP allocation may hold at once (pending and
/// joined); more Connects get 508 and more incoming ones are refused.
pub const MAX_TCP_CONNECTIONS: usize = 64;

/// Low bits of a CONNECTION-ID that name the worker (up to 1024 workers).
const WORKER_BITS: u32 = 10;

/// Where a peer connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TcpState {
    /// Connect is under way; its response is owed.
    Connecting {
        tid: [u8; 12],
        sha256: bool,
        fingerprint: bool,
    },
    /// Open, waiting for or joined to a client data connection.
    Open,
}

/// One peer connection of a TCP allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TcpConnection {
    pub(super) id: u32,
    pub(super) peer: SocketAddr,
    pub(super) state: TcpState,
}

impl Server {
    /// A fresh CONNECTION-ID, unique in the process: random high bits, the
    /// worker's index in the low [`WORKER_BITS`] (every worker's driver
    /// shares one table of waiting connections), never 0, and not one of
    /// this worker's live connections.
    fn connection_id(&mut self) -> u32 {
        let worker = u32::from(self.worker) & ((1 << WORKER_BITS) - 1);
        loop {
            let id = (self.random() as u32) << WORKER_BITS | worker;
            let taken = self
                .allocations
                .iter()
                .filter_map(|(_, a)| a.tcp.as_ref())
                .any(|conns| conns.iter().any(|c| c.id == id));
            if id != 0 && !taken {
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2) on `ft`'s allocation to `peer`: 437 without
    /// an allocation, 400 for a UDP one, 443 for a peer of another family,
    /// 403 for a peer the policy refuses, 446 when a connection to it is
    /// being made or open, 508 beyond [`MAX_TCP_CONNECTIONS`]; otherwise
    /// the driver connects and the answer comes later.
    pub(super) fn connect(
        &mut self,
        ft: &FiveTuple,
        msg: &Message<'_>,
        peer: SocketAddr,
        out: &mut Vec<u8>,
        key: Option<LongTermKey>,
    ) -> ClientAction {
        let k = key.as_ref();
        let Some(id) = self.allocation_for(ft) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        let Some(a) = self.get(id) else {
            return self.error(out, msg, ErrorCode::AllocationMismatch, k);
        };
        let Some(conns) = &a.tcp else {
            return self.error(out, msg, ErrorCode::BadRequest, k);
        };
        if conns.iter().any(|c| c.peer == peer) {
            return self.error(out, msg, ErrorCode::ConnectionAlreadyExists, k);
        }
        if conns.len() >= MAX_TCP_CONNECTIONS {
            return self.error(out, msg, ErrorCode::InsufficientCapacity, k);
        }
        let relay: (Families, std::sync::Arc<str>) = (a.families(), a.realm.clone());
        let relayed = a.relayed;
        if let Err(code) = self.vet_peer(peer, &relay, ft, true) {
            return self.error(out, msg, code, k);
        }
        let connection = self.connection_id();
        let state = TcpState::Connecting {
            tid: *msg.transaction_id(),
            sha256: msg.has_integrity_sha256(),
            fingerprint: msg.has_fingerprint() || self.cfg.fingerprint,
        };
        if let Some(conns) = self.get_mut(id).and_then(|a| a.tcp.as_mut()) {
            conns.push(TcpConnection {
                id: connection,
                peer,
                state,
            });
        }
        ClientAction::Connect {
            allocation: id,
            relayed,
            peer,
            connection,
        }
    }

    /// ConnectionBind (RFC 6062 §5.4) authenticated as `username` in
    /// `realm`: on a new TCP or TLS connection (400 on UDP or on a control
    /// connection). The success response goes to `out`; the driver sends
    /// it once it has found the peer connection.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn connection_bind(
        &mut self,
        ft: &FiveTuple,
        msg: &Message<'_>,
        connection: u32,
        out: &mut Vec<u8>,
        key: Option<LongTermKey>,
        username: &str,
        realm: std::sync::Arc<str>,
    ) -> ClientAction {
        if !ft.transport.is_stream() || self.allocation_for(ft).is_some() {
            return self.error(out, msg, ErrorCode::BadRequest, key.as_ref());
        }
        let mut w = self.response(out, msg, Class::Success);
        self.seal(&mut w, msg, key.as_ref());
        ClientAction::BindConnection {
            connection,
            username: username.to_string(),
            realm,
        }
    }

    /// The driver's connection for `connection` of `allocation` succeeded
    /// (`ok`) or failed or timed out: the Connect response (success with
    /// CONNECTION-ID, or 447) is written to `out`, and the 5-tuple and link
    /// of the control connection to send it on are returned. `None` when
    /// the allocation or the connection is gone (close the socket).
    pub fn tcp_connect_result(
        &mut self,
        allocation: AllocationId,
        connection: u32,
        ok: bool,
        out: &mut Vec<u8>,
    ) -> Option<(FiveTuple, u32)> {
        out.clear();
        let a = self.get_mut(allocation)?;
        let conns = a.tcp.as_mut()?;
        let i = conns.iter().position(|c| c.id == connection)?;
        let TcpState::Connecting {
            tid,
            sha256,
            fingerprint,
        } = conns[i].state
        else {
            return None;
        };
        let peer = conns[i].peer;
        if ok {
            conns[i].state = TcpState::Open;
        } else {
            conns.remove(i);
        }
        let (ft, link, key) = (a.five_tuple, a.link, a.key);
        let class = if ok { Class::Success } else { Class::Error };
        let mut w = MessageWriter::new(out, method::CONNECT, class, &tid);
        if let Some(s) = &self.cfg.software {
            w.attr(attr::SOFTWARE, s.as_bytes());
        }
        if ok {
            w.attr(attr::CONNECTION_ID, &connection.to_be_bytes());
        } else {
            w.error(ErrorCode::ConnectionTimeoutOrFailure);
        }
        match key {
            Some(k) if sha256 || matches!(k, LongTermKey::Sha256(_)) => {
                w.integrity_sha256(k.as_bytes());
            }
            Some(k) => {
                w.integrity(k.as_bytes());
            }
            None => {}
        }
        if fingerprint {
            w.fingerprint();
        }
        info!(five_tuple = %ft, %peer, connection, ok, "TCP relay: Connect");
        Some((ft, link))
    }

    /// A peer connected to the relayed transport address of TCP allocation
    /// `allocation` from `peer` (RFC 6062 §5.3): when it has a permission,
    /// the connection is named and a ConnectionAttempt indication for the
    /// client is written to `out`; returns its CONNECTION-ID and the
    /// control connection to send the indication on. `None`: close it.
    pub fn tcp_peer_arrived(
        &mut self,
        now: Instant,
        allocation: AllocationId,
        peer: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Option<(u32, FiveTuple, u32)> {
        out.clear();
        let connection = self.connection_id();
        let tid_seed = self.random();
        let a = self.get_mut(allocation)?;
        if a.tcp.is_none()
            || !a.families().contains(Family::of(peer.ip()))
            || !a.permitted(peer.ip(), now)
        {
            return None;
        }
        let conns = a.tcp.as_mut()?;
        if conns.len() >= MAX_TCP_CONNECTIONS {
            return None;
        }
        conns.push(TcpConnection {
            id: connection,
            peer,
            state: TcpState::Open,
        });
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&tid_seed.to_le_bytes());
        tid[8..].copy_from_slice(&connection.to_be_bytes());
        let mut w = MessageWriter::new(out, method::CONNECTION_ATTEMPT, Class::Indication, &tid);
        w.xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::CONNECTION_ID, &connection.to_be_bytes());
        if a.fingerprint {
            w.fingerprint();
        }
        info!(five_tuple = %a.five_tuple, %peer, connection, "TCP relay: peer connected");
        Some((connection, a.five_tuple, a.link))
    }

    /// Peer connection `connection` of `allocation` ended (closed by
    /// either side, or never joined within 30 s) after relaying
    /// `to_peer_bytes` and `to_client_bytes`, which count in the
    /// allocation's traffic; a new Connect to its peer is allowed again.
    pub fn tcp_connection_ended(
        &mut self,
        allocation: AllocationId,
        connection: u32,
        to_peer_bytes: u64,
        to_client_bytes: u64,
    ) {
        if let Some(a) = self.get_mut(allocation) {
            a.traffic.to_peer_bytes += to_peer_bytes;
            a.traffic.to_client_bytes += to_client_bytes;
            if let Some(conns) = a.tcp.as_mut() {
                conns.retain(|c| c.id != connection);
            }
        }
    }
}
