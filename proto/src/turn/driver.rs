//! What passes between the core and its driver: the relay sockets the core
//! asks for, what to do with a client message, where to deliver peer data,
//! and the events the driver drains.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::time::Instant;

use super::{AllocationId, FiveTuple, Wanted};

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
    /// A TCP relay (RFC 6062): a listening TCP socket on the relayed
    /// transport address instead of a UDP socket.
    pub tcp: bool,
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
    /// A dual allocation (RFC 8656 §7.2) opens two, an IPv4 and an IPv6
    /// one, under the same `id`: the driver tells them apart by family and
    /// relays to a peer from the one of the peer's family.
    fn open(&mut self, id: AllocationId, req: &RelayRequest) -> Result<OpenedRelay, RelayError>;
}

/// What the driver must do with a client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Nothing to send.
    None,
    /// Send the STUN message in `out` back to the client on the same 5-tuple.
    Reply,
    /// Send the STUN message in `out` from the server's UDP listener bound
    /// to `from` to `to` (RFC 5780: a CHANGE-REQUEST asked for another
    /// address or port, or RESPONSE-PORT for another client port). Drop it
    /// when no listener has that address.
    ReplyFrom { from: SocketAddr, to: SocketAddr },
    /// RFC 6062 Connect: open a TCP connection from `relayed` (the TCP
    /// allocation's relayed transport address) to `peer` within 30 s, and
    /// report the outcome with [`Server::tcp_connect_result`] for
    /// `connection`.
    Connect {
        allocation: AllocationId,
        relayed: SocketAddr,
        peer: SocketAddr,
        connection: u32,
    },
    /// RFC 6062 ConnectionBind, authenticated as `username` in `realm`:
    /// if peer connection `connection` is waiting for its data connection
    /// and belongs to that user, send the success response in `out` and
    /// join this client connection to it byte for byte (no STUN on it
    /// after the response); else answer with [`Server::answer_error`] 400.
    BindConnection {
        connection: u32,
        username: String,
        realm: std::sync::Arc<str>,
    },
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
    /// The request needs credentials the [`super::Directory`] does not know
    /// yet, or a quota decision the [`super::quota::Ledger`] must ask
    /// beyond this process for. The driver gets it (holding this request,
    /// and nothing else), then hands the same message to
    /// [`Server::handle_client`] again, which then finds it.
    Await(Wanted),
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
    /// Its user was deleted from the user database (seen at its next
    /// request).
    UserRemoved,
    /// The operator ended its user's allocations.
    Revoked,
}

impl CloseReason {
    /// Every reason, in the order of [`Stats::ended`].
    pub const ALL: [CloseReason; 5] = [
        CloseReason::Deleted,
        CloseReason::Expired,
        CloseReason::ConnectionClosed,
        CloseReason::UserRemoved,
        CloseReason::Revoked,
    ];

    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Deleted => "deleted",
            CloseReason::Expired => "expired",
            CloseReason::ConnectionClosed => "connection_closed",
            CloseReason::UserRemoved => "user_removed",
            CloseReason::Revoked => "revoked",
        }
    }

    /// Its position in [`CloseReason::ALL`] (for counter arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Deleted => "refresh with lifetime 0",
            CloseReason::Expired => "lifetime expired",
            CloseReason::ConnectionClosed => "client connection closed",
            CloseReason::UserRemoved => "user removed from the user database",
            CloseReason::Revoked => "ended by the operator",
        })
    }
}

/// What changed about an allocation, for the status feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    New,
    Refreshed,
    Deleted,
}

/// An allocation's status, reported (with `report_allocations`) when it is
/// created, refreshed and deleted: what coturn's `redis-statsdb` publishes
/// and a fleet's registry of live allocations holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationStatus {
    pub change: StatusChange,
    pub id: AllocationId,
    /// A number naming the allocation for its whole life, also when it
    /// moves between workers (random, 60 bits).
    pub report_id: u64,
    pub five_tuple: FiveTuple,
    pub relayed: SocketAddr,
    pub username: Box<str>,
    pub realm: std::sync::Arc<str>,
    /// The lifetime granted, seconds (0 when deleted).
    pub lifetime: u32,
    /// Its traffic so far.
    pub traffic: super::Traffic,
}

/// Something the driver must act on; drain with [`Server::poll_event`] after
/// every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An allocation's status changed (only with `report_allocations`).
    Status(Box<AllocationStatus>),
    /// Close the allocation's relay socket (both, for a dual allocation).
    AllocationClosed {
        id: AllocationId,
        relayed: SocketAddr,
        /// The second relayed address of a dual allocation (RFC 8656 §7.2).
        additional: Option<SocketAddr>,
        /// The client's 5-tuple the allocation belonged to.
        five_tuple: FiveTuple,
    },
    /// Close one relay socket of a dual allocation that lives on with the
    /// other (a Refresh with LIFETIME 0 and REQUESTED-ADDRESS-FAMILY,
    /// RFC 8656 §7.3).
    RelayClosed {
        id: AllocationId,
        relayed: SocketAddr,
    },
    /// With [`super::Config::offload_channels`]: channel `number` of
    /// allocation `id` (client 5-tuple `five_tuple`, UDP) is bound to
    /// `peer`, relayed from `relayed`, until `expires` (the channel's
    /// expiry or its peer permission's, whichever is first). Sent when it
    /// is bound or either is refreshed; the driver may relay it below the
    /// sockets until `expires`, until the allocation closes or moves, and
    /// must report what it relayed with [`super::Server::add_offloaded`].
    /// Allocations with a `max-bps` limit are never announced (the core
    /// shapes them).
    ChannelBound {
        id: AllocationId,
        five_tuple: FiveTuple,
        relayed: SocketAddr,
        peer: SocketAddr,
        number: u16,
        expires: Instant,
    },
}
