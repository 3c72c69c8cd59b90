//! One worker thread: a current-thread tokio runtime that owns a share of
//! the clients and everything about their allocations.
//!
//! Each worker binds its own SO_REUSEPORT UDP and TCP listener sockets, so
//! the kernel spreads clients across workers by 5-tuple. An allocation's
//! relay socket is registered on the worker that owns its client 5-tuple, so
//! relaying never takes a lock or crosses a thread. State is shared between
//! the worker's tasks through `Rc<RefCell<Worker>>`; no borrow is held across
//! an `.await`.
//!
//! The UDP data path does not go through a task per socket: the UDP
//! listeners and every relay socket sit in one epoll set of the worker's
//! own (level-triggered), which tokio watches as a single descriptor. One
//! task takes each round of ready sockets, reads them with `recvmmsg`, lets
//! the core decide, and sends with `sendmmsg` (UDP GSO for runs to one
//! destination), ChannelData payloads from the buffer they arrived in and
//! peer data framed in the buffer it was received into. A
//! relay socket costs its descriptor and a slot in a vector, nothing else.
//!
//! The worker moves bytes: what to answer, relay or refuse is the core's
//! decision ([`crate::turn::Server`]), and whether to pull, hold or forward
//! a datagram when steering moves a client between workers is
//! [`super::handover::Handover`]'s; client streams are served by
//! [`super::stream`], and process-wide state lives in [`super::shared`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::Shared;
use super::batch::{BATCH, RecvBatch, SendQueue};
use super::handover::{Handover, Orphan};
use super::relay::{Opened, Opener};
use super::steering;
use super::stream::{self, Conn};
use crate::stun::ErrorCode;
use crate::stun::channel::{HEADROOM, TAILROOM};
use crate::turn::{
    self, AllocationId, ClientAction, Event, FiveTuple, MovedAllocation, Transport, Wanted,
};

/// Links at or above this value are stream connections; below, UDP listener
/// indexes.
pub(super) const STREAM_LINK: u32 = 1 << 31;
/// Links from this value up to [`STREAM_LINK`] are DTLS listeners.
pub(super) const DTLS_LINK: u32 = 1 << 30;
/// Largest UDP datagram, bytes.
const MAX_DATAGRAM: usize = 65536;
/// Epoll tokens at or above this value are relay sockets (token minus this
/// is the allocation's slot); below, UDP listener indexes.
const RELAY_TOKEN: u64 = 1 << 32;
/// Ready sockets taken per round of the UDP data path.
const EVENTS: usize = 256;

/// A TCP listener (TLS is detected by the first byte on every one).
pub struct StreamListener {
    pub socket: std::net::TcpListener,
    pub addr: SocketAddr,
    /// `tcp-proxy-port`: every connection starts with a PROXY header.
    pub proxy: bool,
}

/// The listener sockets one worker owns, and what it takes over from a
/// predecessor process.
#[derive(Default)]
pub struct Sockets {
    pub udp: Vec<(std::net::UdpSocket, SocketAddr)>,
    pub tcp: Vec<StreamListener>,
    /// DTLS listeners (UDP on the TLS ports).
    pub dtls: Vec<(std::net::UdpSocket, SocketAddr)>,
    /// Allocations handed over by a predecessor (live takeover), with
    /// their relay sockets and whether they keep their ids (those of the
    /// predecessor's worker with this index); UDP ones' links already index
    /// `udp`.
    pub restored: Vec<(turn::SavedAllocation, RelaySockets, bool)>,
    /// The predecessor's counters of the workers this one succeeds.
    pub stats: Vec<turn::Stats>,
    /// The highest next allocation generation of those workers: new ids
    /// given to allocations handed over start there.
    pub generation_floor: u32,
    /// Plain TCP client connections handed over: 5-tuple, socket, and the
    /// bytes already read from it (a frame's start).
    pub streams: Vec<(FiveTuple, std::net::TcpStream, Vec<u8>)>,
}

/// What a worker hands to a successor process ([`super::takeover`]):
/// copies of its listeners' descriptors, its UDP allocations with copies
/// of their relay sockets, and its counters. The worker no longer reads
/// any of them until it is thawed.
pub struct Frozen {
    pub udp: Vec<(SocketAddr, OwnedFd)>,
    /// Address, `tcp-proxy-port`, descriptor.
    pub tcp: Vec<(SocketAddr, bool, OwnedFd)>,
    pub dtls: Vec<(SocketAddr, OwnedFd)>,
    pub relays: Vec<(turn::SavedAllocation, [Option<OwnedFd>; 2])>,
    /// Idle plain TCP client connections: 5-tuple, descriptor, bytes read
    /// and not yet handled.
    pub streams: Vec<(FiveTuple, OwnedFd, Vec<u8>)>,
    pub stats: turn::Stats,
    /// The core's next allocation generation.
    pub next_generation: u32,
}

/// An allocation's relay socket, in the slot of its allocation id.
struct Relay {
    id: AllocationId,
    /// The relay sockets by family (IPv4, IPv6): one, or both for a dual
    /// allocation (RFC 8656 §7.2).
    sockets: RelaySockets,
    /// A TCP allocation's listening task and connections (RFC 6062).
    tcp: Option<super::tcp_relay::TcpRelay>,
}

/// An allocation's relay sockets, indexed by [`family_index`]; what moves
/// with an allocation between workers.
pub type RelaySockets = [Option<UdpSocket>; 2];

/// The index in [`RelaySockets`] of the socket for `ip`'s family.
fn family_index(ip: std::net::IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

/// The epoll token, and send-queue key, of relay socket `index` of the
/// allocation in slot `slot`.
fn relay_key(slot: usize, index: usize) -> usize {
    slot * 2 + index
}

impl Relay {
    /// The socket that relays to `peer` (of its family), if the allocation
    /// has one.
    fn for_peer(&self, peer: SocketAddr) -> Option<&UdpSocket> {
        self.sockets[family_index(peer.ip())].as_ref()
    }
}

/// The worker's epoll set for its UDP sockets, as tokio sees it.
struct EpollSet(Epoll);

impl AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// One worker's state: its core, sockets and connections. Shared by its
/// tasks through [`Handle`].
pub(super) struct Worker {
    index: usize,
    pub(super) tls_handshakes: u64,
    pub(super) tls_failures: u64,
    pub(super) core: turn::Server,
    pub(super) shared: Arc<Shared>,
    mailboxes: Mailboxes,
    /// UDP listener sockets and their addresses, indexed by link.
    udp: Vec<(UdpSocket, SocketAddr)>,
    /// Client stream connections, indexed by link minus [`STREAM_LINK`].
    pub(super) conns: Slab<Rc<Conn>>,
    /// Relay sockets, indexed by allocation slot.
    relays: Vec<Option<Relay>>,
    epoll: Rc<AsyncFd<EpollSet>>,
    opened: Vec<Opened>,
    /// TCP relay listeners the core just opened (RFC 6062), for the
    /// stream task to start.
    pub(super) tcp_opened: Vec<super::relay::OpenedTcp>,
    /// Reply buffer for the core.
    pub(super) out: Vec<u8>,
    /// Whether there are other workers, so allocations may move between
    /// workers as steering changes where datagrams arrive.
    steer: bool,
    /// Allocations being pulled here from other workers, and recently
    /// given away (UDP steering).
    handover: Handover,
    /// Client messages waiting for credentials from the user database:
    /// since when, and each message with its 5-tuple and link.
    held: HashMap<Wanted, (Instant, Vec<HeldMessage>)>,
    /// Messages in `held`.
    held_count: usize,
    /// This worker's own handle, for the tasks it starts (RFC 6062).
    me: std::rc::Weak<RefCell<Worker>>,
    /// DTLS listeners, indexed by link minus [`DTLS_LINK`].
    dtls: Vec<Rc<super::dtls::Listener>>,
    /// Copies of the TCP listeners (their accept tasks own them), for a
    /// takeover: address, `tcp-proxy-port`, descriptor.
    tcp_listeners: Vec<(SocketAddr, bool, OwnedFd)>,
    /// The allocations saved for a successor while frozen.
    frozen: Option<Vec<AllocationId>>,
    /// Channel bindings of this worker's allocations installed in the eBPF
    /// fast path, with the counters last added to the core.
    offloaded: HashMap<AllocationId, Vec<Offloaded>>,
}

/// A channel binding the fast path relays, and what of its traffic the
/// core has been told about (to peer, to client).
struct Offloaded {
    binding: super::offload::Binding,
    told: (super::offload::Counters, super::offload::Counters),
}

/// A client message waiting for credentials: its 5-tuple, link and bytes.
type HeldMessage = (FiveTuple, u32, Vec<u8>);

/// Most client messages one worker holds for the user database; more are
/// dropped (the client retransmits).
const MAX_HELD_FOR_CREDENTIALS: usize = 4096;
/// How long a message waits for credentials before it is dropped.
const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// Buffers of the UDP data path, reused for every packet.
struct UdpIo {
    events: Vec<EpollEvent>,
    /// Datagrams from clients.
    client: RecvBatch,
    /// Datagrams from peers, with room to frame them in place.
    peer: RecvBatch,
    /// Framed peer datagrams waiting to go to UDP clients.
    to_clients: SendQueue,
    /// ChannelData payloads from UDP clients (in `client`) waiting to go to
    /// peers, by relay socket slot. Only ChannelData is queued, and the
    /// queue is sent before any other client message is handled and before
    /// `client` is read into again, so no allocation is created or deleted
    /// (and no slot reused) while a datagram waits.
    to_peers: SendQueue,
}

impl UdpIo {
    fn new() -> Self {
        UdpIo {
            events: vec![EpollEvent::empty(); EVENTS],
            client: RecvBatch::new(0, MAX_DATAGRAM, 0),
            peer: RecvBatch::new(HEADROOM, MAX_DATAGRAM, TAILROOM),
            to_clients: SendQueue::new(),
            to_peers: SendQueue::new(),
        }
    }
}

/// A worker as its tasks share it; no borrow is held across an `.await`.
pub(super) type Handle = Rc<RefCell<Worker>>;

impl Worker {
    /// Runs the core on one client message, then registers relay sockets it
    /// opened and applies its events.
    pub(super) fn client_message(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        data: &[u8],
    ) -> ClientAction {
        // A Refresh may end the allocation: what the fast path relayed for
        // it is counted first, so its last counts are exact.
        if !self.offloaded.is_empty()
            && data.starts_with(&[0x00, 0x04])
            && let Some(id) = self.core.allocation_for(ft)
        {
            self.sync_offloaded(Some(id));
        }
        let Worker {
            core,
            shared,
            opened,
            tcp_opened,
            out,
            ..
        } = self;
        let mut opener = Opener {
            pool: &shared.pool,
            reservations: &shared.reservations,
            device: shared.relay_device.as_deref(),
            buffer: shared.relay_buffer,
            gro: shared.relay_gro,
            now,
            opened,
            tcp_opened,
        };
        let action = core.handle_client(now, ft, link, data, out, &mut opener);
        self.register_relays();
        self.start_tcp_relays();
        self.apply_events();
        action
    }

    /// Adds the relay sockets the core just opened to the epoll set.
    fn register_relays(&mut self) {
        for o in std::mem::take(&mut self.opened) {
            if self.steer
                && let Some(ft) = self.core.five_tuple_of(o.id)
                && ft.transport == Transport::Udp
            {
                self.directory_write().insert(ft, self.index as u16);
            }
            let slot = o.id.slot();
            let index = family_index(o.addr.ip());
            let token = RELAY_TOKEN + relay_key(slot, index) as u64;
            let added = self.epoll.get_ref().0.add(
                o.socket.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            );
            if let Err(e) = added {
                error!("cannot register relay socket {}: {e}", o.addr);
                self.shared.pool.release(o.addr.port());
                continue;
            }
            if self.relays.len() <= slot {
                self.relays.resize_with(slot + 1, || None);
            }
            let relay = match &mut self.relays[slot] {
                Some(r) if r.id == o.id => r,
                other => other.insert(Relay {
                    id: o.id,
                    sockets: [None, None],
                    tcp: None,
                }),
            };
            relay.sockets[index] = Some(o.socket);
        }
    }

    fn directory_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<FiveTuple, u16>> {
        self.shared
            .steering
            .directory
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// For a UDP client datagram that found no allocation on this worker:
    /// when another worker has the 5-tuple's allocation (steering changed
    /// where its datagrams arrive), pulls it here, holding the datagram
    /// until it arrives; a datagram that reached this worker just after it
    /// gave the allocation away is forwarded instead. Returns whether the
    /// datagram was taken.
    fn steered_elsewhere(&mut self, now: Instant, ft: &FiveTuple, link: u32, data: &[u8]) -> bool {
        let shared = &self.shared;
        let owner = || {
            shared
                .steering
                .directory
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(ft)
                .map(|&o| usize::from(o))
        };
        match self.handover.orphan(now, ft, link, data, owner) {
            Orphan::Held => true,
            Orphan::Local => false,
            Orphan::Forward { to } => {
                let mail = Mail::Datagram {
                    five_tuple: *ft,
                    link,
                    bytes: data.to_vec(),
                };
                self.mailboxes.get(to).is_some_and(|m| m.send(mail).is_ok())
            }
            Orphan::Pull { from } => {
                let mail = Mail::Pull {
                    five_tuple: *ft,
                    to: self.index,
                };
                let sent = self
                    .mailboxes
                    .get(from)
                    .is_some_and(|m| m.send(mail).is_ok());
                if !sent {
                    // Handled here after all (the caller goes on with it).
                    self.handover.cancel_pull(ft);
                }
                sent
            }
        }
    }

    /// Handles a client message for `ft` that reached this worker by mail
    /// (held during a pull, or forwarded), as if it had arrived here.
    fn replay(&mut self, ft: &FiveTuple, link: u32, data: &[u8]) {
        let action = self.client_message(Instant::now(), ft, link, data);
        self.dispatch(action, ft, link, data);
    }

    /// The user database answered `wanted`: hands the messages that waited
    /// for it to the core again.
    fn credentials_arrived(&mut self, wanted: &Wanted) {
        let Some((_, held)) = self.held.remove(wanted) else {
            return;
        };
        self.held_count -= held.len();
        for (ft, link, data) in held {
            let action = self.client_message(Instant::now(), &ft, link, &data);
            self.dispatch(action, &ft, link, &data);
        }
    }

    /// Drops messages that waited too long for the user database (their
    /// clients retransmit).
    fn prune_held(&mut self, now: Instant) {
        let mut dropped = 0;
        self.held.retain(|_, (since, held)| {
            let keep = now.saturating_duration_since(*since) < CREDENTIALS_TIMEOUT;
            if !keep {
                dropped += held.len();
            }
            keep
        });
        self.held_count -= dropped;
    }

    /// Forgets finished moves: gives up on pulls that got no answer (their
    /// held datagrams are dropped) and stops forwarding for old exports.
    fn prune_moves(&mut self, now: Instant) {
        for ft in self.handover.prune(now) {
            debug!("{ft}: no answer to the pull of its allocation; dropping what was held");
        }
    }

    /// The relay socket of allocation `id`.
    fn relay(&self, id: AllocationId) -> Option<&Relay> {
        self.relays
            .get(id.slot())
            .and_then(Option::as_ref)
            .filter(|r| r.id == id)
    }

    pub(super) fn apply_events(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::AllocationClosed {
                    id,
                    relayed,
                    additional,
                    five_tuple,
                } => {
                    if self.steer && five_tuple.transport == Transport::Udp {
                        let mut d = self.directory_write();
                        if d.get(&five_tuple) == Some(&(self.index as u16)) {
                            d.remove(&five_tuple);
                        }
                    }
                    self.unload_channels(id);
                    if self.relay(id).is_some() {
                        // Closing the socket takes it out of the epoll set;
                        // it closes before its port goes back to the pool.
                        drop(self.relays[id.slot()].take());
                    }
                    self.shared.pool.release(relayed.port());
                    if let Some(a) = additional {
                        self.shared.pool.release(a.port());
                    }
                }
                Event::RelayClosed { id, relayed } => {
                    self.unload_family(id, relayed);
                    if self.relay(id).is_some()
                        && let Some(r) = self.relays[id.slot()].as_mut()
                    {
                        drop(r.sockets[family_index(relayed.ip())].take());
                    }
                    self.shared.pool.release(relayed.port());
                }
                Event::ChannelBound {
                    id,
                    five_tuple,
                    relayed,
                    peer,
                    number,
                    expires,
                } => self.offload_channel(id, five_tuple, relayed, peer, number, expires),
                Event::Status(status) => {
                    let status: Arc<turn::AllocationStatus> = Arc::from(status);
                    if let Some(f) = &self.shared.fleet {
                        f.report(status.clone());
                    }
                    if let Some(s) = &self.shared.statsdb {
                        s.report(status);
                    }
                }
            }
        }
    }

    /// Sends `data[payload]` from an allocation's relay socket to a peer.
    fn relay_to_peer(&self, id: AllocationId, peer: SocketAddr, bytes: &[u8]) {
        if let Some(s) = self.relay(id).and_then(|r| r.for_peer(peer)) {
            send_udp(s, bytes, peer);
        }
    }

    /// Starts the TCP relays (RFC 6062) the core opened in the last call.
    fn start_tcp_relays(&mut self) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        for o in std::mem::take(&mut self.tcp_opened) {
            let slot = o.id.slot();
            if self.relays.len() <= slot {
                self.relays.resize_with(slot + 1, || None);
            }
            let tcp = Some(super::tcp_relay::start(&me, o.id, o.listener));
            self.relays[slot] = Some(Relay {
                id: o.id,
                sockets: [None, None],
                tcp,
            });
        }
    }

    /// Puts peer connection `connection` of TCP allocation `allocation`
    /// in the table where its ConnectionBind finds it.
    pub(super) fn tcp_waiting(
        &mut self,
        connection: u32,
        allocation: AllocationId,
        stream: tokio::net::TcpStream,
    ) {
        let Some(ended) = self
            .relay(allocation)
            .and_then(|r| r.tcp.as_ref())
            .map(|t| t.ended.subscribe())
        else {
            return;
        };
        let Some((user, realm)) = self.core.owner_of(allocation) else {
            return;
        };
        let (user, realm) = (user.to_string(), realm.clone());
        let max_bps = self.core.max_bps(allocation);
        let Ok(stream) = stream.into_std() else {
            return;
        };
        self.shared.tcp_waiting.insert(
            connection, self.index, allocation, max_bps, &user, realm, stream, ended,
        );
    }

    /// Sends `mail` to worker `to`.
    pub(super) fn mail(&self, to: usize, mail: Mail) {
        if let Some(m) = self.mailboxes.get(to) {
            let _ = m.send(mail);
        }
    }

    /// Sends a message to the client on `ft`, reached through `link`.
    pub(super) fn send_to_client(&self, link: u32, ft: &FiveTuple, bytes: &[u8]) {
        if link < DTLS_LINK {
            if let Some((s, _)) = self.udp.get(link as usize) {
                send_udp(s, bytes, ft.client);
            }
        } else if link < STREAM_LINK {
            if let Some(l) = self.dtls.get((link - DTLS_LINK) as usize) {
                l.send(ft.client, bytes);
            }
        } else if let Some(c) = self.conns.get((link - STREAM_LINK) as usize) {
            // The slot may have been reused by another connection.
            if c.five_tuple == *ft {
                c.send(bytes);
            }
        }
    }

    /// Carries out what the core decided about client message `data`.
    pub(super) fn dispatch(
        &mut self,
        action: ClientAction,
        ft: &FiveTuple,
        link: u32,
        data: &[u8],
    ) {
        match action {
            ClientAction::None => {}
            ClientAction::Reply => self.send_to_client(link, ft, &self.out),
            ClientAction::Connect {
                allocation,
                relayed,
                peer,
                connection,
            } => {
                if let Some(me) = self.me.upgrade() {
                    tokio::task::spawn_local(super::tcp_relay::connect(
                        me, allocation, relayed, peer, connection,
                    ));
                }
            }
            ClientAction::BindConnection { .. } => {
                // Only the connection's own task can join it to a peer
                // (stream::serve_stream); a ConnectionBind that waited for
                // credentials is answered 400 and the client retries.
                let action = self
                    .core
                    .answer_error(data, ErrorCode::BadRequest, &mut self.out);
                if action == ClientAction::Reply {
                    self.send_to_client(link, ft, &self.out);
                }
            }
            ClientAction::ReplyFrom { from, to } => {
                // RFC 5780: from another of this worker's UDP listeners.
                if let Some((s, _)) = self.udp.iter().find(|(_, a)| *a == from) {
                    send_udp(s, &self.out, to);
                }
            }
            ClientAction::Relay {
                allocation,
                peer,
                payload,
            } => self.relay_to_peer(allocation, peer, &data[payload]),
            ClientAction::Await(wanted) => {
                if self.held_count < MAX_HELD_FOR_CREDENTIALS {
                    let (_, held) = self
                        .held
                        .entry(wanted)
                        .or_insert_with(|| (Instant::now(), Vec::new()));
                    held.push((*ft, link, data.to_vec()));
                    self.held_count += 1;
                }
            }
            ClientAction::Migrate {
                owner,
                allocation,
                username,
            } => {
                let mail = Mail::Export {
                    allocation,
                    username,
                    five_tuple: *ft,
                    link,
                    request: data.to_vec(),
                    to: self.index,
                };
                let sent = self
                    .mailboxes
                    .get(usize::from(owner))
                    .is_some_and(|m| m.send(mail).is_ok());
                if !sent {
                    // A ticket naming a worker that does not exist (an older
                    // process with more workers issued it).
                    let action =
                        self.core
                            .answer_error(data, ErrorCode::AllocationNotFound, &mut self.out);
                    self.dispatch(action, ft, link, data);
                }
            }
        }
    }

    /// Publishes this worker's counters and gauges for metrics.
    fn report(&self) {
        let per_user = self.shared.telemetry.per_user.load(Ordering::Relaxed);
        if let Some(slot) = self.shared.telemetry.workers.get(self.index) {
            let mut r = slot.lock().expect("telemetry lock");
            r.stats = self.core.stats().clone();
            r.gauges = self.core.gauges(per_user);
            r.tls_handshakes = self.tls_handshakes;
            r.tls_failures = self.tls_failures;
            r.cpu_seconds = thread_cpu_seconds();
            r.updated = Some(Instant::now());
        }
    }

    /// Removes an allocation's relay sockets from this worker's event loop
    /// for another worker to adopt.
    fn take_relay_sockets(&mut self, id: AllocationId) -> Option<RelaySockets> {
        self.relay(id)?;
        let r = self.relays[id.slot()].take()?;
        for s in r.sockets.iter().flatten() {
            let _ = self.epoll.get_ref().0.delete(s.as_fd());
        }
        Some(r.sockets)
    }

    /// Registers the relay sockets of allocation `id`.
    fn adopt_relay_sockets(&mut self, id: AllocationId, sockets: RelaySockets) {
        for socket in sockets.into_iter().flatten() {
            match socket.local_addr() {
                Ok(addr) => self.opened.push(Opened { id, socket, addr }),
                Err(e) => error!("a moved relay socket has no address: {e}"),
            }
        }
        self.register_relays();
    }

    /// Completes an export of allocation `id` from the core (`exported`)
    /// with its relay socket, taken out of this worker's event loop: what
    /// goes to the importing worker. Err: the core's code, or 500 (and the
    /// port released) if the socket is missing.
    fn with_relay_socket(
        &mut self,
        id: AllocationId,
        exported: Result<MovedAllocation, ErrorCode>,
    ) -> Result<(Box<MovedAllocation>, RelaySockets), ErrorCode> {
        let moved = exported?;
        match self.take_relay_sockets(id) {
            Some(sockets) => Ok((Box::new(moved), sockets)),
            None => {
                error!("allocation {} has no relay socket to move", moved.relayed());
                release_ports(&self.shared, &moved);
                Err(ErrorCode::ServerError)
            }
        }
    }

    /// Adopts an allocation another worker exported, with its relay socket;
    /// if the core refuses it (its 5-tuple has an allocation here), the
    /// socket is closed and its port released.
    fn import(&mut self, moved: MovedAllocation, sockets: RelaySockets) {
        let ports = (moved.relayed(), moved.additional());
        match self.core.import(moved) {
            Some(id) => {
                self.adopt_relay_sockets(id, sockets);
                // Its channels go back into the fast path, for this 5-tuple.
                self.core.announce_channels(id, Instant::now());
                self.apply_events();
            }
            None => {
                drop(sockets);
                self.shared.pool.release(ports.0.port());
                if let Some(a) = ports.1 {
                    self.shared.pool.release(a.port());
                }
            }
        }
    }

    /// Installs (or refreshes) a channel binding in the eBPF fast path.
    fn offload_channel(
        &mut self,
        id: AllocationId,
        ft: FiveTuple,
        relayed: SocketAddr,
        peer: SocketAddr,
        channel: u16,
        expires: Instant,
    ) {
        let Some(offload) = &self.shared.offload else {
            return;
        };
        let binding = super::offload::Binding {
            client: ft.client,
            server: ft.server,
            relayed,
            peer,
            channel,
            expires_ns: super::offload::monotonic_ns(expires),
        };
        let installed = offload
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .install(&binding);
        if let Err(e) = installed {
            debug!("{ft}: channel {channel:#06x} stays in user space: {e}");
            return;
        }
        let list = self.offloaded.entry(id).or_default();
        match list.iter_mut().find(|o| o.binding.channel == channel) {
            Some(o) => o.binding = binding,
            None => list.push(Offloaded {
                binding,
                told: Default::default(),
            }),
        }
    }

    /// Adds what the fast path relayed since the last call to the core's
    /// counters (of allocation `only`, or of every one): before anything
    /// that may end an allocation, so its final counts and log line are
    /// exact, and once a second for metrics.
    fn sync_offloaded(&mut self, only: Option<AllocationId>) {
        let Some(offload) = &self.shared.offload else {
            return;
        };
        if self.offloaded.is_empty() {
            return;
        }
        let mut o = offload.lock().unwrap_or_else(|e| e.into_inner());
        for (&id, list) in self.offloaded.iter_mut() {
            if only.is_some_and(|x| x != id) {
                continue;
            }
            for ch in list.iter_mut() {
                let Ok((up, down)) = o.counters(&ch.binding) else {
                    continue;
                };
                let t = turn::Traffic {
                    to_peer_packets: up.packets.saturating_sub(ch.told.0.packets),
                    to_peer_bytes: up.bytes.saturating_sub(ch.told.0.bytes),
                    to_client_packets: down.packets.saturating_sub(ch.told.1.packets),
                    to_client_bytes: down.bytes.saturating_sub(ch.told.1.bytes),
                };
                ch.told = (up, down);
                self.core.add_offloaded(id, &t);
                let totals = &self.shared.offloaded;
                totals[0].fetch_add(t.to_peer_packets, Ordering::Relaxed);
                totals[1].fetch_add(t.to_peer_bytes, Ordering::Relaxed);
                totals[2].fetch_add(t.to_client_packets, Ordering::Relaxed);
                totals[3].fetch_add(t.to_client_bytes, Ordering::Relaxed);
            }
        }
    }

    /// Takes allocation `id`'s bindings out of the fast path (it ended,
    /// or moves to another worker or process): its datagrams reach the
    /// sockets again.
    fn unload_channels(&mut self, id: AllocationId) {
        let Some(list) = self.offloaded.remove(&id) else {
            return;
        };
        if let Some(offload) = &self.shared.offload {
            let mut o = offload.lock().unwrap_or_else(|e| e.into_inner());
            for ch in list {
                o.remove(&ch.binding);
            }
        }
    }

    /// Takes out of the fast path the bindings of allocation `id` that
    /// relay from `relayed` (one family of a dual allocation ended).
    fn unload_family(&mut self, id: AllocationId, relayed: SocketAddr) {
        self.sync_offloaded(Some(id));
        let Some(list) = self.offloaded.get_mut(&id) else {
            return;
        };
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(list)
            .into_iter()
            .partition(|o| o.binding.relayed == relayed);
        *list = kept;
        if let Some(offload) = &self.shared.offload {
            let mut o = offload.lock().unwrap_or_else(|e| e.into_inner());
            for ch in gone {
                o.remove(&ch.binding);
            }
        }
    }

    /// Counts and takes out of the fast path allocation `id`'s bindings
    /// before it leaves this worker.
    fn before_export(&mut self, id: AllocationId) {
        self.sync_offloaded(Some(id));
        self.unload_channels(id);
    }

    /// Stops reading what a successor process takes over (the UDP
    /// listeners and the relay sockets of UDP allocations; accept loops and
    /// DTLS listeners wait on [`super::Phase`]) and answers with copies of
    /// their descriptors, the allocations saved and the counters.
    fn freeze(&mut self) -> Frozen {
        let now = Instant::now();
        // The fast path's counts go into the saved allocations, and its
        // bindings out of this process's maps (the successor installs its
        // own; thawing puts them back).
        self.sync_offloaded(None);
        let offloaded: Vec<AllocationId> = self.offloaded.keys().copied().collect();
        for id in offloaded {
            self.unload_channels(id);
        }
        let epoll = &self.epoll.get_ref().0;
        for (sock, _) in &self.udp {
            let _ = epoll.delete(sock.as_fd());
        }
        let copy = |fd: std::os::fd::BorrowedFd<'_>, what: &dyn std::fmt::Display| {
            fd.try_clone_to_owned()
                .map_err(|e| error!("takeover: cannot copy the descriptor of {what}: {e}"))
                .ok()
        };
        // Idle plain TCP connections move with their allocation (unless it
        // relays over TCP, RFC 6062); the others stay and drain here.
        let saved = self.core.save(now, |ft| {
            matches!(ft.transport, Transport::Udp | Transport::Tcp)
        });
        let mut streams = Vec::new();
        let mut moving = std::collections::HashSet::new();
        for (_, conn) in self.conns.iter() {
            let ft = conn.five_tuple;
            let allocation = self.core.allocation_for(&ft);
            let saveable = allocation.is_none() || saved.iter().any(|a| a.five_tuple == ft);
            if !conn.movable() || !saveable {
                continue;
            }
            let Some(raw) = conn.fd else { continue };
            // SAFETY: the connection's task owns the stream and is parked
            // at an await point; the descriptor is open while the Conn is
            // registered.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
            let Some(fd) = copy(borrowed, &ft) else {
                continue;
            };
            conn.handed.set(true);
            conn.park.notify_one();
            moving.insert(ft);
            streams.push((ft, fd, conn.inbox.borrow().clone()));
        }
        let mut relays = Vec::new();
        let mut ids = Vec::new();
        for saved in saved {
            if saved.five_tuple.transport == Transport::Tcp && !moving.contains(&saved.five_tuple) {
                continue;
            }
            let id = saved.id();
            let Some(r) = self.relay(id) else { continue };
            let mut fds = [None, None];
            let mut complete = true;
            for (i, sock) in r.sockets.iter().enumerate() {
                if let Some(sock) = sock {
                    fds[i] = copy(sock.as_fd(), &saved.relayed);
                    complete &= fds[i].is_some();
                }
            }
            // One that cannot be copied stays here (and is read again).
            if complete {
                for sock in r.sockets.iter().flatten() {
                    let _ = epoll.delete(sock.as_fd());
                }
                ids.push(id);
                relays.push((saved, fds));
            }
        }
        let udp = self
            .udp
            .iter()
            .filter_map(|(s, a)| Some((*a, copy(s.as_fd(), a)?)))
            .collect();
        let tcp = self
            .tcp_listeners
            .iter()
            .filter_map(|(a, proxy, fd)| Some((*a, *proxy, copy(fd.as_fd(), a)?)))
            .collect();
        let dtls = self
            .dtls
            .iter()
            .filter_map(|l| Some((l.addr, copy(l.socket.as_fd(), &l.addr)?)))
            .collect();
        self.frozen = Some(ids);
        Frozen {
            udp,
            tcp,
            dtls,
            relays,
            streams,
            stats: self.core.stats().clone(),
            next_generation: self.core.next_generation(),
        }
    }

    /// A takeover failed: reads the UDP listeners and the relay sockets it
    /// had stopped reading again.
    fn thaw(&mut self) {
        let Some(ids) = self.frozen.take() else {
            return;
        };
        // Parked connections read again once the phase is Serving.
        for (_, conn) in self.conns.iter() {
            conn.handed.set(false);
        }
        for &id in &ids {
            self.core.announce_channels(id, Instant::now());
        }
        self.apply_events();
        let epoll = &self.epoll.get_ref().0;
        for (i, (sock, addr)) in self.udp.iter().enumerate() {
            if let Err(e) = epoll.add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
            {
                error!("cannot read UDP listener {addr} again: {e}");
            }
        }
        for id in ids {
            let Some(r) = self.relay(id) else { continue };
            for (index, sock) in r.sockets.iter().enumerate() {
                if let Some(sock) = sock {
                    let token = RELAY_TOKEN + relay_key(id.slot(), index) as u64;
                    if let Err(e) =
                        epoll.add(sock.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
                    {
                        error!("cannot read a relay socket again: {e}");
                    }
                }
            }
        }
    }

    /// The successor serves what was frozen: forgets those allocations
    /// (no AllocationClosed: their sockets live on in the successor) and
    /// closes this process's copies of their relay sockets.
    fn handed(&mut self) {
        let Some(ids) = self.frozen.take() else {
            return;
        };
        let n = self.core.forget(ids.iter().copied());
        for id in ids {
            if self.relay(id).is_some() {
                drop(self.relays[id.slot()].take());
            }
        }
        // DTLS sessions cannot move and their listener is the successor's
        // now: their clients will reconnect there.
        let dtls = self.core.close_transport(
            Instant::now(),
            Transport::Dtls,
            turn::CloseReason::ConnectionClosed,
        );
        self.apply_events();
        debug!(worker = self.index, allocations = n, dtls, "handed over");
        self.report();
    }

    /// Adopts allocations handed over by a predecessor process, with
    /// their relay sockets (ports already claimed in the pool).
    fn restore(
        &mut self,
        now: Instant,
        restored: Vec<(turn::SavedAllocation, RelaySockets, bool)>,
        floor: u32,
    ) {
        let mut saved = Vec::with_capacity(restored.len());
        let mut sockets = Vec::with_capacity(restored.len());
        let mut ports = Vec::with_capacity(restored.len());
        for (a, socks, keep) in restored {
            ports.push(
                std::iter::once(a.relayed)
                    .chain(a.additional.map(|x| x.0))
                    .map(|x| x.port())
                    .collect::<Vec<_>>(),
            );
            saved.push((a, keep));
            sockets.push(socks);
        }
        let ids = match self.core.restore(now, saved, floor) {
            Ok(ids) => ids,
            Err(e) => {
                error!(
                    worker = self.index,
                    "cannot restore the allocations handed over: {e}"
                );
                vec![None; sockets.len()]
            }
        };
        for ((id, socks), ports) in ids.into_iter().zip(sockets).zip(ports) {
            match id {
                Some(id) => {
                    self.adopt_relay_sockets(id, socks);
                    self.core.announce_channels(id, now);
                }
                None => {
                    drop(socks);
                    for p in ports {
                        self.shared.pool.release(p);
                    }
                }
            }
        }
    }

    /// One round of the UDP data path: reads every ready listener and relay
    /// socket once (a batch each), handles the datagrams, and sends what
    /// goes to UDP clients in batches. Returns true when every socket was
    /// drained, so the epoll set's readiness may be cleared.
    fn udp_round(&mut self, io: &mut UdpIo) -> bool {
        let ready = match self
            .epoll
            .get_ref()
            .0
            .wait(&mut io.events, EpollTimeout::ZERO)
        {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => return false,
            Err(e) => {
                error!("epoll_wait: {e}");
                return true;
            }
        };
        let now = Instant::now();
        let mut drained = ready < io.events.len();
        // Peer batch slots holding datagrams not yet sent on.
        let mut used = 0;
        for k in 0..ready {
            let token = io.events[k].data();
            if token < RELAY_TOKEN {
                let link = token as usize;
                let Some((sock, local)) = self.udp.get(link) else {
                    continue;
                };
                let local = *local;
                let got = io.client.recv(sock.as_fd(), 0, BATCH).unwrap_or_else(|e| {
                    debug!("UDP listener {local}: {e}");
                    0
                });
                drained &= got < BATCH;
                for i in 0..got {
                    let (datagrams, from) = io.client.datagrams(i);
                    let Some(from) = from else { continue };
                    let ft = FiveTuple {
                        client: from,
                        server: local,
                        transport: Transport::Udp,
                    };
                    for range in datagrams {
                        self.udp_client_datagram(io, now, &ft, link, i, range);
                    }
                }
                self.flush_to_peers(io);
            } else {
                if used == BATCH {
                    self.flush_to_clients(io);
                    used = 0;
                }
                let key = (token - RELAY_TOKEN) as usize;
                let Some(Some(relay)) = self.relays.get(key / 2) else {
                    continue;
                };
                let Some(socket) = relay.sockets[key % 2].as_ref() else {
                    continue;
                };
                let id = relay.id;
                // ICMP errors (port unreachable) surface as errors here.
                let got = io
                    .peer
                    .recv(socket.as_fd(), used, BATCH - used)
                    .unwrap_or(0);
                drained &= got < BATCH - used;
                for i in used..used + got {
                    let (datagrams, from) = io.peer.datagrams(i);
                    let Some(from) = from else { continue };
                    for range in datagrams {
                        let Some(d) =
                            self.core
                                .handle_peer(now, id, from, io.peer.buf_mut(i), range)
                        else {
                            continue;
                        };
                        if d.link < DTLS_LINK {
                            if io.to_clients.is_full() {
                                self.flush_to_clients(io);
                            }
                            io.to_clients
                                .push(i, d.range, d.client.client, d.link as usize);
                        } else {
                            self.send_to_client(d.link, &d.client, &io.peer.buf(i)[d.range]);
                        }
                    }
                }
                used += got;
            }
        }
        self.flush_to_clients(io);
        drained
    }

    /// Handles one datagram from a UDP client: `range` of slot `slot` of
    /// `io.client`, from `ft` on listener `link`. ChannelData to relay is
    /// queued in `io.to_peers`; anything else first sends what is queued.
    fn udp_client_datagram(
        &mut self,
        io: &mut UdpIo,
        now: Instant,
        ft: &FiveTuple,
        link: usize,
        slot: usize,
        range: Range<usize>,
    ) {
        let data = &io.client.buf(slot)[range.clone()];
        let is_channel_data = data.first().is_some_and(|b| b >> 6 == 0b01);
        // Whether another worker has the allocation must be known before
        // the core sees a STUN message (an Allocate here would make a
        // second one). ChannelData without an allocation changes nothing in
        // the core, so it is looked into only once the core dropped it, and
        // relayed ChannelData costs no extra lookup.
        if self.steer
            && !is_channel_data
            && self.core.allocation_for(ft).is_none()
            && self.steered_elsewhere(now, ft, link as u32, data)
        {
            return;
        }
        if !is_channel_data || io.to_peers.is_full() {
            self.flush_to_peers(io);
        }
        let data = &io.client.buf(slot)[range.clone()];
        match self.client_message(now, ft, link as u32, data) {
            ClientAction::Relay {
                allocation,
                peer,
                payload,
            } if is_channel_data
                && self
                    .relay(allocation)
                    .is_some_and(|r| r.for_peer(peer).is_some()) =>
            {
                let start = range.start + payload.start;
                let key = relay_key(allocation.slot(), family_index(peer.ip()));
                io.to_peers
                    .push(slot, start..start + payload.len(), peer, key);
            }
            ClientAction::None
                if self.steer && is_channel_data && self.core.allocation_for(ft).is_none() =>
            {
                self.steered_elsewhere(now, ft, link as u32, data);
            }
            action => self.dispatch(action, ft, link as u32, data),
        }
    }

    /// Sends the ChannelData payloads queued for peers, each out of its
    /// allocation's relay socket.
    fn flush_to_peers(&self, io: &mut UdpIo) {
        if !io.to_peers.is_empty() {
            io.to_peers.flush(&io.client, |key| {
                self.relays
                    .get(key / 2)
                    .and_then(Option::as_ref)
                    .and_then(|r| r.sockets[key % 2].as_ref())
                    .map(|s| s.as_fd())
            });
        }
    }

    /// Sends the framed peer datagrams queued for UDP clients.
    fn flush_to_clients(&self, io: &mut UdpIo) {
        if !io.to_clients.is_empty() {
            io.to_clients
                .flush(&io.peer, |link| self.udp.get(link).map(|(s, _)| s.as_fd()));
        }
    }
}

/// Messages between workers (RFC 8016 mobility moves an allocation to the
/// worker that receives its client's new 5-tuple).
pub enum Mail {
    /// Hand `allocation` over to worker `to`, for its client now on
    /// `five_tuple` (connection `link` there); `request` is the Refresh to
    /// replay once it arrives.
    Export {
        allocation: AllocationId,
        username: String,
        five_tuple: FiveTuple,
        link: u32,
        request: Vec<u8>,
        to: usize,
    },
    /// The answer to `Export`: the allocation and its relay socket, or the
    /// error code to answer the request with.
    Imported {
        result: Result<(Box<MovedAllocation>, RelaySockets), ErrorCode>,
        five_tuple: FiveTuple,
        link: u32,
        request: Vec<u8>,
    },
    /// Hand the allocation of UDP client `five_tuple` to worker `to`, where
    /// its datagrams now arrive (steering).
    Pull { five_tuple: FiveTuple, to: usize },
    /// The answer to `Pull`: the allocation and its relay socket, or why
    /// not (404: this worker no longer has it).
    Pulled {
        five_tuple: FiveTuple,
        result: Result<(Box<MovedAllocation>, RelaySockets), ErrorCode>,
    },
    /// A client datagram that reached the worker that just gave its
    /// allocation away, from the listener with index `link`.
    Datagram {
        five_tuple: FiveTuple,
        link: u32,
        bytes: Vec<u8>,
    },
    /// What messages held here waited for (credentials, a quota decision)
    /// is decided.
    Ready(Wanted),
    /// The fleet sends new Allocates to another node (or stops).
    Redirect(Option<(SocketAddr, Option<SocketAddr>)>),
    /// End a user's allocations (in a realm, or every realm).
    EndUser(Option<String>, String),
    /// A reloaded configuration for new requests.
    Config(Arc<turn::Config>),
    /// Start or stop draining.
    Drain(bool),
    /// Stop reading the UDP listeners and UDP allocations' relay sockets
    /// and answer with what a successor process needs ([`Frozen`]).
    Freeze(tokio::sync::oneshot::Sender<Frozen>),
    /// The takeover failed: read everything again.
    Thaw,
    /// The successor has taken over: forget what was handed over.
    Handed,
    /// A peer connection of a TCP allocation here ended (RFC 6062), after
    /// relaying these many bytes each way.
    TcpEnded {
        allocation: AllocationId,
        connection: u32,
        to_peer_bytes: u64,
        to_client_bytes: u64,
    },
}

/// The mailboxes of every worker, indexed by worker.
pub type Mailboxes = Arc<Vec<mpsc::UnboundedSender<Mail>>>;

/// Returns the relay ports of an allocation that could not be moved.
fn release_ports(shared: &Shared, moved: &MovedAllocation) {
    shared.pool.release(moved.relayed().port());
    if let Some(a) = moved.additional() {
        shared.pool.release(a.port());
    }
}

/// Sends one datagram with a direct non-blocking `sendto`.
///
/// A UDP send on a non-blocking socket needs no readiness: it either queues
/// the datagram or fails with a full buffer, and then the datagram is
/// dropped as the network would drop it.
fn send_udp(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    let _ = sock.send_to(bytes, to);
}

/// Starts worker `index` on its own thread.
pub fn spawn(
    index: usize,
    sockets: Sockets,
    shared: Arc<Shared>,
    mailboxes: Mailboxes,
    inbox: mpsc::UnboundedReceiver<Mail>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!("worker {index}: cannot start runtime: {e}");
                    std::process::exit(1);
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(index, sockets, shared, mailboxes, inbox));
        })
}

/// CPU time of the calling thread (user + system), seconds; 0 if the clock
/// cannot be read.
fn thread_cpu_seconds() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map_or(0.0, |t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn run(
    index: usize,
    sockets: Sockets,
    shared: Arc<Shared>,
    mailboxes: Mailboxes,
    inbox: mpsc::UnboundedReceiver<Mail>,
) {
    let now = Instant::now();
    let seed = rand::random::<u64>() ^ index as u64;
    let ledger: Box<dyn turn::quota::Ledger> = match &shared.fleet {
        Some(f) => f.ledger_for(index),
        None => Box::new(shared.quotas.clone()),
    };
    let mut core = turn::Server::new(
        shared.core.clone(),
        ledger,
        index as u16,
        now,
        unix_now(),
        seed,
    );
    if let Some(cache) = &shared.directory {
        core = core.with_directory(cache.for_worker(index));
    }
    let epoll = match udp_epoll(&sockets.udp) {
        Ok(e) => Rc::new(e),
        Err(e) => {
            error!("worker {index}: cannot set up the UDP event loop: {e}");
            std::process::exit(1);
        }
    };
    let worker: Handle = Rc::new(RefCell::new(Worker {
        index,
        tls_handshakes: 0,
        tls_failures: 0,
        core,
        shared: shared.clone(),
        mailboxes,
        udp: sockets.udp,
        conns: Slab::new(),
        relays: Vec::new(),
        epoll: epoll.clone(),
        opened: Vec::new(),
        tcp_opened: Vec::new(),
        out: Vec::with_capacity(1500),
        steer: shared.telemetry.workers.len() > 1,
        handover: Handover::new(index),
        held: HashMap::new(),
        held_count: 0,
        me: std::rc::Weak::new(),
        dtls: Vec::new(),
        tcp_listeners: Vec::new(),
        frozen: None,
        offloaded: HashMap::new(),
    }));
    for stats in &sockets.stats {
        worker.borrow_mut().core.restore_stats(stats);
    }
    // Connections handed over first: their allocations name them.
    let mut stream_links = HashMap::new();
    for (ft, std_stream, inbox) in sockets.streams {
        match stream::adopt(&worker, ft, std_stream, inbox) {
            Ok(link) => {
                stream_links.insert(ft, link);
            }
            Err(e) => error!("worker {index}: cannot adopt the connection of {ft}: {e}"),
        }
    }
    let mut restored = sockets.restored;
    restored.retain_mut(|(a, _, _)| match a.five_tuple.transport {
        Transport::Udp => true,
        _ => match stream_links.get(&a.five_tuple) {
            Some(&link) => {
                a.link = link;
                true
            }
            None => false,
        },
    });
    if !restored.is_empty() {
        worker
            .borrow_mut()
            .restore(now, restored, sockets.generation_floor);
    }
    for (socket, addr) in sockets.dtls {
        match tokio::net::UdpSocket::from_std(socket) {
            Ok(s) => {
                let l = Rc::new(super::dtls::Listener::new(s, addr));
                let link = {
                    let mut w = worker.borrow_mut();
                    w.dtls.push(l.clone());
                    DTLS_LINK + (w.dtls.len() - 1) as u32
                };
                tokio::task::spawn_local(dtls_loop(worker.clone(), l, link));
            }
            Err(e) => error!("worker {index}: cannot register DTLS listener {addr}: {e}"),
        }
    }
    worker.borrow_mut().me = Rc::downgrade(&worker);
    tokio::task::spawn_local(udp_loop(worker.clone(), epoll));
    for l in sockets.tcp {
        match l.socket.as_fd().try_clone_to_owned() {
            Ok(copy) => worker
                .borrow_mut()
                .tcp_listeners
                .push((l.addr, l.proxy, copy)),
            Err(e) => warn!("TCP listener {}: no copy for a takeover: {e}", l.addr),
        }
        match TcpListener::from_std(l.socket) {
            Ok(s) => {
                tokio::task::spawn_local(stream::listen(worker.clone(), s, l.addr, l.proxy));
            }
            Err(e) => error!(
                "worker {index}: cannot register TCP listener {}: {e}",
                l.addr
            ),
        }
    }
    tokio::task::spawn_local(mailbox(worker.clone(), inbox));
    if index == 0 && shared.telemetry.workers.len() > 1 {
        tokio::task::spawn_local(steering_control(worker.clone()));
    }
    timer(worker).await;
}

/// An epoll set holding the UDP listeners (token = index), watched by
/// tokio as one descriptor.
fn udp_epoll(listeners: &[(UdpSocket, SocketAddr)]) -> io::Result<AsyncFd<EpollSet>> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for (i, (s, _)) in listeners.iter().enumerate() {
        epoll.add(s.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
    }
    // SAFETY: EpollSet owns the epoll descriptor and never replaces or
    // closes it while the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(EpollSet(epoll), Interest::READABLE) }
        .map_err(io::Error::from)
}

/// The UDP data path: a round of ready sockets whenever the epoll set is
/// readable. Readiness is cleared only when a round drained every socket;
/// otherwise the task yields (so streams and timers run) and goes again.
async fn udp_loop(worker: Handle, epoll: Rc<AsyncFd<EpollSet>>) {
    let mut io = UdpIo::new();
    loop {
        let mut guard = match epoll.readable().await {
            Ok(g) => g,
            Err(e) => {
                error!("UDP event loop: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let drained = worker.borrow_mut().udp_round(&mut io);
        if drained {
            guard.clear_ready();
        } else {
            drop(guard);
            tokio::task::yield_now().await;
        }
    }
}

/// Serves messages from other workers.
async fn mailbox(worker: Handle, mut inbox: mpsc::UnboundedReceiver<Mail>) {
    while let Some(mail) = inbox.recv().await {
        let mut w = worker.borrow_mut();
        match mail {
            Mail::Export {
                allocation,
                username,
                five_tuple,
                link,
                request,
                to,
            } => {
                w.before_export(allocation);
                let exported = if w.frozen.is_some() {
                    Err(ErrorCode::ServerError)
                } else {
                    w.core.export(allocation, &username, &five_tuple, link)
                };
                let result = w.with_relay_socket(allocation, exported);
                let reply = Mail::Imported {
                    result,
                    five_tuple,
                    link,
                    request,
                };
                if let Some(m) = w.mailboxes.get(to) {
                    let _ = m.send(reply);
                }
            }
            Mail::Imported {
                result,
                five_tuple,
                link,
                request,
            } => match result {
                Ok((moved, socket)) => {
                    w.import(*moved, socket);
                    // Replay the Refresh: it now finds the allocation here.
                    w.replay(&five_tuple, link, &request);
                }
                Err(code) => {
                    let w = &mut *w;
                    let action = w.core.answer_error(&request, code, &mut w.out);
                    w.dispatch(action, &five_tuple, link, &request);
                }
            },
            Mail::Pull { five_tuple, to } => {
                let result = match w.core.allocation_for(&five_tuple) {
                    Some(id) if w.frozen.is_none() => {
                        w.before_export(id);
                        let exported = w.core.export_unchanged(id);
                        w.with_relay_socket(id, exported)
                    }
                    _ => Err(ErrorCode::AllocationNotFound),
                };
                if result.is_ok() {
                    w.handover.gave_away(Instant::now(), &five_tuple, to);
                }
                if let Some(m) = w.mailboxes.get(to) {
                    let _ = m.send(Mail::Pulled { five_tuple, result });
                }
            }
            Mail::Pulled { five_tuple, result } => {
                let held = w.handover.pulled(&five_tuple);
                if let Ok((moved, socket)) = result {
                    w.import(*moved, socket);
                }
                for (link, bytes) in held {
                    w.replay(&five_tuple, link, &bytes);
                }
            }
            Mail::Datagram {
                five_tuple,
                link,
                bytes,
            } => w.replay(&five_tuple, link, &bytes),
            Mail::Ready(wanted) => w.credentials_arrived(&wanted),
            Mail::Redirect(target) => w.core.set_redirect(target),
            Mail::EndUser(realm, user) => {
                w.sync_offloaded(None);
                let n = w.core.close_user(Instant::now(), realm.as_deref(), &user);
                w.apply_events();
                if n > 0 {
                    info!(
                        worker = w.index,
                        "{n} allocations of {user}{} ended by the operator (fleet end-user)",
                        realm.map(|r| format!(" in realm {r}")).unwrap_or_default()
                    );
                }
            }
            Mail::Config(cfg) => {
                w.core.set_config(cfg);
                w.report();
            }
            Mail::Drain(on) => w.core.set_draining(on),
            Mail::Freeze(reply) => {
                let frozen = w.freeze();
                let _ = reply.send(frozen);
            }
            Mail::Thaw => w.thaw(),
            Mail::Handed => w.handed(),
            Mail::TcpEnded {
                allocation,
                connection,
                to_peer_bytes,
                to_client_bytes,
            } => {
                w.core
                    .tcp_connection_ended(allocation, connection, to_peer_bytes, to_client_bytes)
            }
        }
    }
}

/// Serves DTLS listener `l` (link `link`): each datagram through its
/// client's session, and the TURN messages inside to the core.
async fn dtls_loop(worker: Handle, l: Rc<super::dtls::Listener>, link: u32) {
    let mut buf = vec![0u8; 65536];
    let mut phase = worker.borrow().shared.phase.subscribe();
    loop {
        // A successor taking over reads the listener next; its DTLS
        // sessions here cannot move and end with this process.
        if !super::shared::serving(&mut phase).await {
            return;
        }
        let received = tokio::select! {
            r = l.socket.recv_from(&mut buf) => r,
            _ = phase.changed() => continue,
        };
        let (n, from) = match received {
            Ok(x) => x,
            Err(e) => {
                debug!("DTLS listener {}: {e}", l.addr);
                continue;
            }
        };
        let now = Instant::now();
        let (cert, config) = {
            let w = worker.borrow();
            (w.shared.dtls_cert.load_full(), w.shared.dtls_config.clone())
        };
        let got = l.receive(from, &buf[..n], now, cert.as_deref(), &config);
        let ft = FiveTuple {
            client: from,
            server: l.addr,
            transport: Transport::Dtls,
        };
        let mut w = worker.borrow_mut();
        for m in &got.messages {
            let action = w.client_message(now, &ft, link, m);
            w.dispatch(action, &ft, link, m);
        }
        if got.ended {
            w.core.client_closed(now, &ft);
            w.apply_events();
        }
    }
}

/// Worker 0's steering controller: every [`steering::TICK`], measures the
/// load and attaches or detaches the steering program on this worker's UDP
/// listeners (which are socket 0 of their reuseport groups).
async fn steering_control(worker: Handle) {
    let mut tick = tokio::time::interval(steering::TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shared = worker.borrow().shared.clone();
    let mut ctl = steering::Controller::new();
    // Whether the program is attached as far as this task knows, and
    // whether steering was enabled at the last tick.
    let mut attached = None;
    let mut was_enabled = false;
    let mut last_own = thread_cpu_seconds();
    // (when, all workers' CPU seconds) over the last second or so.
    let mut window: std::collections::VecDeque<(Instant, f64)> = Default::default();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let own = thread_cpu_seconds();
        let first = (own - last_own) / steering::TICK.as_secs_f64();
        last_own = own;
        let others: f64 = shared.telemetry.workers[1..]
            .iter()
            .map(|r| r.lock().expect("telemetry lock").cpu_seconds)
            .sum();
        window.push_back((now, own + others));
        while window.len() > 2 && now.duration_since(window[1].0) >= Duration::from_secs(1) {
            window.pop_front();
        }
        let (t0, c0) = window[0];
        let span = now.duration_since(t0).as_secs_f64();
        let total = if span > 0.0 {
            (own + others - c0) / span
        } else {
            0.0
        };
        let enabled = shared.steering.enabled.load(Ordering::Relaxed);
        if enabled && !was_enabled {
            // Enabled at start or by a reload: start steered.
            ctl.reset();
        } else if enabled {
            ctl.tick(now, first, total);
        }
        was_enabled = enabled;
        let want = enabled && ctl.steering();
        if attached != Some(want) {
            let w = worker.borrow();
            for (sock, addr) in &w.udp {
                let r = if want {
                    steering::attach(sock.as_fd())
                } else {
                    steering::detach(sock.as_fd())
                };
                if let Err(e) = r {
                    warn!("UDP steering on {addr}: {e}");
                }
            }
            shared.steering.active.store(want, Ordering::Relaxed);
            if want {
                info!("UDP steering on: light load, every UDP client datagram goes to worker 0");
            } else if attached.is_some() {
                info!("UDP steering off: the kernel spreads UDP clients across the workers");
            }
            attached = Some(want);
        }
    }
}

/// Drives the core's timers once a second.
async fn timer(worker: Handle) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        ticks += 1;
        let now = Instant::now();
        let mut w = worker.borrow_mut();
        if ticks.is_multiple_of(60) {
            w.core.set_wall_clock(now, unix_now());
            let suppressed = w.core.take_suppressed();
            if suppressed > 0 {
                info!(
                    worker = w.index,
                    "rate limit: {suppressed} answers to unauthenticated requests suppressed in the last minute"
                );
            }
        }
        w.sync_offloaded(None);
        w.core.handle_timeout(now);
        w.apply_events();
        w.prune_moves(now);
        w.prune_held(now);
        let shared = w.shared.clone();
        shared.reservations.sweep(now, &shared.pool);
        for (allocation, connection) in shared.tcp_waiting.sweep(w.index, now) {
            w.core.tcp_connection_ended(allocation, connection, 0, 0);
        }
        for l in w.dtls.clone() {
            let server = l.addr;
            let ft = |client| FiveTuple {
                client,
                server,
                transport: Transport::Dtls,
            };
            let ended = l.tick(now, |c| w.core.allocation_for(&ft(c)).is_some());
            for client in ended {
                w.core.client_closed(now, &ft(client));
            }
        }
        w.apply_events();
        w.report();
    }
}
