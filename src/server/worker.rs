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
//! The driver moves bytes only: every decision is the core's
//! ([`crate::turn::Server`]).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, info, warn};

use super::batch::{BATCH, RecvBatch, SendQueue};
use super::ports::PortPool;
use super::relay::{Opened, Opener, Reservations};
use super::steering;
use super::stream::{FrameStream, StreamHalf};
use crate::stun::ErrorCode;
use crate::stun::channel::{self, HEADROOM, TAILROOM};
use crate::turn::{self, AllocationId, ClientAction, Event, FiveTuple, MovedAllocation, Transport};

/// Links at or above this value are stream connections; below, UDP listener
/// indexes.
const STREAM_LINK: u32 = 1 << 31;
/// Largest UDP datagram, bytes.
const MAX_DATAGRAM: usize = 65536;
/// Bytes a stream connection may have queued for sending before further
/// relayed data to it is dropped (a client that stops reading cannot grow
/// server memory without bound).
const MAX_QUEUED: usize = 512 * 1024;
/// Largest frame on a stream: a STUN message (20-byte header plus a 16-bit
/// length), bytes; padded ChannelData is at most 4 + 65536.
const MAX_FRAME: usize = 20 + 65535;
/// Epoll tokens at or above this value are relay sockets (token minus this
/// is the allocation's slot); below, UDP listener indexes.
const RELAY_TOKEN: u64 = 1 << 32;
/// Ready sockets taken per round of the UDP data path.
const EVENTS: usize = 256;
/// Time allowed for a new TCP/TLS connection to send its first byte and
/// finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to complete a frame once its first byte arrived (slowloris).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams held per 5-tuple while its allocation is pulled here.
const MAX_HELD: usize = 64;
/// For how long after giving an allocation away a worker forwards the
/// datagrams that still reach it (those queued in its socket before
/// steering changed), instead of pulling the allocation back.
const STRAGGLER_WINDOW: Duration = Duration::from_millis(250);
/// How long a pull may take before the datagrams held for it are dropped.
const PULL_TIMEOUT: Duration = Duration::from_secs(2);

/// Process-wide state every worker reads.
pub struct Shared {
    /// The core configuration at start; reloads reach the workers by mail.
    pub core: Arc<turn::Config>,
    /// TLS for `tls` listeners, and for TLS detected on plain TCP ports;
    /// swapped when certificates are reloaded.
    pub tls: arc_swap::ArcSwapOption<tokio_rustls::TlsAcceptor>,
    pub pool: PortPool,
    pub reservations: Reservations,
    pub relay_device: Option<String>,
    /// `sock-buf-size` for relay sockets, bytes.
    pub relay_buffer: Option<usize>,
    /// UDP GRO on relay sockets (off with `no-udp-gro`).
    pub relay_gro: bool,
    /// Open TCP/TLS connections per source address, across workers.
    pub streams: StreamCount,
    /// Seconds of silence after which a stream connection without an
    /// allocation is closed (`max-allocate-timeout`).
    pub idle_timeout_secs: AtomicU64,
    /// What workers report for metrics, one slot each.
    pub telemetry: Telemetry,
    /// UDP steering (see [`super::steering`]).
    pub steering: Steering,
    /// Allocations counted against quotas, by every worker's core.
    pub quotas: super::quota::SharedCounts,
}

/// UDP steering state shared by the workers.
#[derive(Debug, Default)]
pub struct Steering {
    /// Whether the configuration allows steering (`udp-steering=auto` and
    /// no `mobility`); changed by reloads.
    pub enabled: AtomicBool,
    /// Whether every UDP client datagram goes to worker 0 now.
    pub active: AtomicBool,
    /// The worker that has each UDP client 5-tuple's allocation, kept only
    /// with more than one worker. Written when an allocation is created,
    /// moved or closed; read when a datagram finds no allocation on the
    /// worker it reached.
    pub directory: std::sync::RwLock<HashMap<FiveTuple, u16>>,
}

/// What one worker reports, refreshed every second.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub stats: turn::Stats,
    pub gauges: turn::Gauges,
    /// TLS handshakes completed and failed (including timeouts).
    pub tls_handshakes: u64,
    pub tls_failures: u64,
    /// CPU time the worker's thread has used (user + system), seconds.
    pub cpu_seconds: f64,
    /// When the worker last reported: a heartbeat for the watchdog.
    pub updated: Option<Instant>,
}

/// Reports of every worker.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub workers: Vec<std::sync::Mutex<WorkerReport>>,
    /// Count allocations per user in the reports
    /// (`prometheus-username-labels`).
    pub per_user: AtomicBool,
}

impl Telemetry {
    /// Whether every worker reported within `within` (its event loop runs).
    pub fn all_alive(&self, within: Duration) -> bool {
        self.workers.iter().all(|w| {
            w.lock()
                .expect("telemetry lock")
                .updated
                .is_some_and(|t| t.elapsed() <= within)
        })
    }

    /// Slots for `n` workers.
    pub fn new(n: usize) -> Self {
        Telemetry {
            workers: (0..n).map(|_| Default::default()).collect(),
            per_user: AtomicBool::new(false),
        }
    }
}

/// Counts TCP/TLS connections per source address, capped at `limit`
/// (0 = unlimited; changed by reloads).
#[derive(Debug, Default)]
pub struct StreamCount {
    pub limit: AtomicU32,
    per_ip: std::sync::Mutex<HashMap<std::net::IpAddr, u32>>,
}

impl StreamCount {
    /// A counter with the given per-address limit.
    pub fn new(limit: u32) -> Self {
        StreamCount {
            limit: AtomicU32::new(limit),
            per_ip: Default::default(),
        }
    }

    fn acquire(&self, ip: std::net::IpAddr) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut m = self.per_ip.lock().expect("stream count lock");
        let n = m.entry(ip).or_insert(0);
        if limit > 0 && *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&self, ip: std::net::IpAddr) {
        let mut m = self.per_ip.lock().expect("stream count lock");
        if let Some(n) = m.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&ip);
            }
        }
    }

    /// Open connections from `ip`.
    pub fn of(&self, ip: std::net::IpAddr) -> u32 {
        self.per_ip
            .lock()
            .expect("stream count lock")
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

/// Releases a connection's place in [`StreamCount`] when it ends.
struct StreamSlot {
    shared: Arc<Shared>,
    ip: std::net::IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.shared.streams.release(self.ip);
    }
}

/// A TCP listener (TLS is detected by the first byte on every one).
pub struct StreamListener {
    pub socket: std::net::TcpListener,
    pub addr: SocketAddr,
}

/// The listener sockets one worker owns.
pub struct Sockets {
    pub udp: Vec<(std::net::UdpSocket, SocketAddr)>,
    pub tcp: Vec<StreamListener>,
}

/// An allocation's relay socket, in the slot of its allocation id.
struct Relay {
    id: AllocationId,
    socket: UdpSocket,
}

/// The worker's epoll set for its UDP sockets, as tokio sees it.
struct EpollSet(Epoll);

impl AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

/// A pull in progress: when it started, and the client datagrams held until
/// the allocation arrives (with their listener index).
type Pull = (Instant, Vec<(u32, Vec<u8>)>);

/// A client's stream connection: its 5-tuple and outgoing byte queue.
struct Conn {
    five_tuple: FiveTuple,
    queue: RefCell<Vec<u8>>,
    wake: Notify,
    dropped: Cell<u64>,
}

impl Conn {
    /// Queues a complete frame; drops it when the client is not reading.
    fn send(&self, bytes: &[u8]) {
        let mut q = self.queue.borrow_mut();
        if q.len() + bytes.len() > MAX_QUEUED {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        q.extend_from_slice(bytes);
        drop(q);
        self.wake.notify_one();
    }
}

struct Worker {
    index: usize,
    tls_handshakes: u64,
    tls_failures: u64,
    core: turn::Server,
    shared: Arc<Shared>,
    mailboxes: Mailboxes,
    /// UDP listener sockets and their addresses, indexed by link.
    udp: Vec<(UdpSocket, SocketAddr)>,
    conns: Slab<Rc<Conn>>,
    /// Relay sockets, indexed by allocation slot.
    relays: Vec<Option<Relay>>,
    epoll: Rc<AsyncFd<EpollSet>>,
    opened: Vec<Opened>,
    /// Reply buffer for the core.
    out: Vec<u8>,
    /// Whether there are other workers, so allocations may move between
    /// workers as steering changes where datagrams arrive.
    steer: bool,
    /// UDP 5-tuples whose allocation is being pulled from another worker.
    pulling: HashMap<FiveTuple, Pull>,
    /// UDP 5-tuples whose allocation this worker recently gave away, when
    /// and to which worker: datagrams for them that still reach this worker
    /// are forwarded there.
    exported: HashMap<FiveTuple, (Instant, usize)>,
}

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

type Handle = Rc<RefCell<Worker>>;

impl Worker {
    /// Runs the core on one client message, then registers relay sockets it
    /// opened and applies its events.
    fn client_message(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        data: &[u8],
    ) -> ClientAction {
        let Worker {
            core,
            shared,
            opened,
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
        };
        let action = core.handle_client(now, ft, link, data, out, &mut opener);
        self.register_relays();
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
            let token = RELAY_TOKEN + slot as u64;
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
            self.relays[slot] = Some(Relay {
                id: o.id,
                socket: o.socket,
            });
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
        if let Some((_, held)) = self.pulling.get_mut(ft) {
            if held.len() < MAX_HELD {
                held.push((link, data.to_vec()));
            }
            return true;
        }
        // Given away a moment ago: forward (the new owner gets it after the
        // allocation itself, which went first on the same channel).
        if let Some(&(t, to)) = self.exported.get(ft)
            && now.duration_since(t) < STRAGGLER_WINDOW
            && let Some(mailbox) = self.mailboxes.get(to)
        {
            let mail = Mail::Datagram {
                five_tuple: *ft,
                link,
                bytes: data.to_vec(),
            };
            return mailbox.send(mail).is_ok();
        }
        let owner = self
            .shared
            .steering
            .directory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(ft)
            .copied();
        let Some(owner) = owner.map(usize::from).filter(|&o| o != self.index) else {
            return false;
        };
        let Some(mailbox) = self.mailboxes.get(owner) else {
            return false;
        };
        let mail = Mail::Pull {
            five_tuple: *ft,
            to: self.index,
        };
        if mailbox.send(mail).is_err() {
            return false;
        }
        self.pulling.insert(*ft, (now, vec![(link, data.to_vec())]));
        true
    }

    /// Handles a client message for `ft` that reached this worker by mail
    /// (held during a pull, or forwarded), as if it had arrived here.
    fn replay(&mut self, ft: &FiveTuple, link: u32, data: &[u8]) {
        let action = self.client_message(Instant::now(), ft, link, data);
        self.dispatch(action, ft, link, data);
    }

    /// Forgets finished moves: gives up on pulls that got no answer (their
    /// held datagrams are dropped) and stops forwarding for old exports.
    fn prune_moves(&mut self, now: Instant) {
        self.exported
            .retain(|_, (t, _)| now.duration_since(*t) < STRAGGLER_WINDOW);
        self.pulling.retain(|ft, (t, _)| {
            let alive = now.duration_since(*t) < PULL_TIMEOUT;
            if !alive {
                debug!("{ft}: no answer to the pull of its allocation; dropping what was held");
            }
            alive
        });
    }

    /// The relay socket of allocation `id`.
    fn relay(&self, id: AllocationId) -> Option<&Relay> {
        self.relays
            .get(id.slot())
            .and_then(Option::as_ref)
            .filter(|r| r.id == id)
    }

    fn apply_events(&mut self) {
        while let Some(ev) = self.core.poll_event() {
            match ev {
                Event::AllocationClosed {
                    id,
                    relayed,
                    five_tuple,
                } => {
                    if self.steer && five_tuple.transport == Transport::Udp {
                        let mut d = self.directory_write();
                        if d.get(&five_tuple) == Some(&(self.index as u16)) {
                            d.remove(&five_tuple);
                        }
                    }
                    if self.relay(id).is_some() {
                        // Closing the socket takes it out of the epoll set;
                        // it closes before its port goes back to the pool.
                        drop(self.relays[id.slot()].take());
                    }
                    self.shared.pool.release(relayed.port());
                }
            }
        }
    }

    /// Sends `data[payload]` from an allocation's relay socket to a peer.
    fn relay_to_peer(&self, id: AllocationId, peer: SocketAddr, bytes: &[u8]) {
        if let Some(r) = self.relay(id) {
            send_udp(&r.socket, bytes, peer);
        }
    }

    /// Sends a message to the client on `ft`, reached through `link`.
    fn send_to_client(&self, link: u32, ft: &FiveTuple, bytes: &[u8]) {
        if link < STREAM_LINK {
            if let Some((s, _)) = self.udp.get(link as usize) {
                send_udp(s, bytes, ft.client);
            }
        } else if let Some(c) = self.conns.get((link - STREAM_LINK) as usize) {
            // The slot may have been reused by another connection.
            if c.five_tuple == *ft {
                c.send(bytes);
            }
        }
    }

    /// Carries out what the core decided about client message `data`.
    fn dispatch(&mut self, action: ClientAction, ft: &FiveTuple, link: u32, data: &[u8]) {
        match action {
            ClientAction::None => {}
            ClientAction::Reply => self.send_to_client(link, ft, &self.out),
            ClientAction::Relay {
                allocation,
                peer,
                payload,
            } => self.relay_to_peer(allocation, peer, &data[payload]),
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

    /// Removes an allocation's relay socket from this worker's event loop
    /// for another worker to adopt.
    fn take_relay_socket(&mut self, id: AllocationId) -> Option<UdpSocket> {
        self.relay(id)?;
        let r = self.relays[id.slot()].take()?;
        let _ = self.epoll.get_ref().0.delete(r.socket.as_fd());
        Some(r.socket)
    }

    /// Registers a relay socket for allocation `id`.
    fn adopt_relay_socket(&mut self, id: AllocationId, socket: UdpSocket, addr: SocketAddr) {
        self.opened.push(Opened { id, socket, addr });
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
    ) -> Result<(Box<MovedAllocation>, UdpSocket), ErrorCode> {
        let moved = exported?;
        match self.take_relay_socket(id) {
            Some(socket) => Ok((Box::new(moved), socket)),
            None => {
                error!("allocation {} has no relay socket to move", moved.relayed());
                self.shared.pool.release(moved.relayed().port());
                Err(ErrorCode::ServerError)
            }
        }
    }

    /// Adopts an allocation another worker exported, with its relay socket;
    /// if the core refuses it (its 5-tuple has an allocation here), the
    /// socket is closed and its port released.
    fn import(&mut self, moved: MovedAllocation, socket: UdpSocket) {
        let relayed = moved.relayed();
        match self.core.import(moved) {
            Some(id) => self.adopt_relay_socket(id, socket, relayed),
            None => {
                drop(socket);
                self.shared.pool.release(relayed.port());
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
                let slot = (token - RELAY_TOKEN) as usize;
                let Some(Some(relay)) = self.relays.get(slot) else {
                    continue;
                };
                let id = relay.id;
                // ICMP errors (port unreachable) surface as errors here.
                let got = io
                    .peer
                    .recv(relay.socket.as_fd(), used, BATCH - used)
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
                        if d.link < STREAM_LINK {
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
            } if is_channel_data && self.relay(allocation).is_some() => {
                let start = range.start + payload.start;
                io.to_peers
                    .push(slot, start..start + payload.len(), peer, allocation.slot());
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
            io.to_peers.flush(&io.client, |slot| {
                self.relays
                    .get(slot)
                    .and_then(Option::as_ref)
                    .map(|r| r.socket.as_fd())
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
        result: Result<(Box<MovedAllocation>, std::net::UdpSocket), ErrorCode>,
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
        result: Result<(Box<MovedAllocation>, std::net::UdpSocket), ErrorCode>,
    },
    /// A client datagram that reached the worker that just gave its
    /// allocation away, from the listener with index `link`.
    Datagram {
        five_tuple: FiveTuple,
        link: u32,
        bytes: Vec<u8>,
    },
    /// A reloaded configuration for new requests.
    Config(Arc<turn::Config>),
    /// Start or stop draining.
    Drain(bool),
}

/// The mailboxes of every worker, indexed by worker.
pub type Mailboxes = Arc<Vec<mpsc::UnboundedSender<Mail>>>;

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
    let core = turn::Server::new(
        shared.core.clone(),
        Box::new(shared.quotas.clone()),
        index as u16,
        now,
        unix_now(),
        seed,
    );
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
        out: Vec::with_capacity(1500),
        steer: shared.telemetry.workers.len() > 1,
        pulling: HashMap::new(),
        exported: HashMap::new(),
    }));
    tokio::task::spawn_local(udp_loop(worker.clone(), epoll));
    for l in sockets.tcp {
        match TcpListener::from_std(l.socket) {
            Ok(s) => {
                tokio::task::spawn_local(tcp_listener(worker.clone(), s, l.addr));
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
                let exported = w.core.export(allocation, &username, &five_tuple, link);
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
                    Some(id) => {
                        let exported = w.core.export_unchanged(id);
                        w.with_relay_socket(id, exported)
                    }
                    None => Err(ErrorCode::AllocationNotFound),
                };
                if result.is_ok() {
                    w.exported.insert(five_tuple, (Instant::now(), to));
                }
                if let Some(m) = w.mailboxes.get(to) {
                    let _ = m.send(Mail::Pulled { five_tuple, result });
                }
            }
            Mail::Pulled { five_tuple, result } => {
                let held = w
                    .pulling
                    .remove(&five_tuple)
                    .map(|(_, held)| held)
                    .unwrap_or_default();
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
            Mail::Config(cfg) => {
                w.core.set_config(cfg);
                w.report();
            }
            Mail::Drain(on) => w.core.set_draining(on),
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
        w.core.handle_timeout(now);
        w.apply_events();
        w.prune_moves(now);
        let shared = w.shared.clone();
        shared.reservations.sweep(now, &shared.pool);
        w.report();
    }
}

async fn tcp_listener(worker: Handle, listener: TcpListener, local: SocketAddr) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                warn!("accept on {local}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = worker.borrow().shared.clone();
        if !shared.streams.acquire(peer.ip()) {
            debug!(
                "{peer} -> {local}: more than {} connections from this address; closing",
                shared.streams.limit.load(Ordering::Relaxed)
            );
            continue;
        }
        let slot = StreamSlot {
            shared,
            ip: peer.ip(),
        };
        let _ = stream.set_nodelay(true);
        let worker = worker.clone();
        tokio::task::spawn_local(async move {
            accept_stream(worker, stream, peer, local).await;
            drop(slot);
        });
    }
}

/// Decides TLS or plain TCP by the first byte (0x16 is a TLS handshake
/// record), as coturn does on both of its ports, then serves the connection.
async fn accept_stream(worker: Handle, stream: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let acceptor = worker.borrow().shared.tls.load_full();
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == 0x16,
        Ok(Ok(_)) | Ok(Err(_)) => return,
        Err(_) => {
            debug!("{peer} -> {local}: no data within {HANDSHAKE_TIMEOUT:?}; closing");
            return;
        }
    };
    let ft = FiveTuple {
        client: peer,
        server: local,
        transport: if is_tls {
            Transport::Tls
        } else {
            Transport::Tcp
        },
    };
    if !is_tls {
        serve_stream(worker, stream, ft).await;
        return;
    }
    let Some(acceptor) = acceptor else {
        debug!("{peer} -> {local}: TLS handshake but no certificate is configured; closing");
        return;
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(mut tls)) => {
            worker.borrow_mut().tls_handshakes += 1;
            // The writer bounds what it hands rustls (one batch, flushed
            // before the next), and a frame must never be cut across
            // records because a buffer limit was reached.
            tls.get_mut().1.set_buffer_limit(None);
            serve_stream(worker, tls, ft).await
        }
        Ok(Err(e)) => {
            worker.borrow_mut().tls_failures += 1;
            info!("TLS handshake from {peer} on {local} failed: {e}")
        }
        Err(_) => {
            worker.borrow_mut().tls_failures += 1;
            info!("TLS handshake from {peer} on {local} timed out")
        }
    }
}

/// Serves one TCP or TLS client connection until it closes; its allocation
/// ends with it (RFC 8656 §3.1).
async fn serve_stream<S: FrameStream>(worker: Handle, stream: S, ft: FiveTuple) {
    let conn = Rc::new(Conn {
        five_tuple: ft,
        queue: RefCell::new(Vec::new()),
        wake: Notify::new(),
        dropped: Cell::new(0),
    });
    let link = STREAM_LINK + worker.borrow_mut().conns.insert(conn.clone()) as u32;
    let stream = Rc::new(RefCell::new(stream));
    let mut rd = StreamHalf(stream.clone());
    let mut wr = StreamHalf(stream.clone());

    let writer = async {
        let mut spare = Vec::new();
        loop {
            conn.wake.notified().await;
            loop {
                std::mem::swap(&mut *conn.queue.borrow_mut(), &mut spare);
                if spare.is_empty() {
                    break;
                }
                // Everything staged is flushed before the next batch is
                // taken, so the stream's own buffer holds at most one batch
                // (MAX_QUEUED) and the queue's limit still applies.
                let staged = stream.borrow_mut().stage(&spare);
                let Ok(rest) = staged else { return };
                if wr.write_all(rest).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                spare.clear();
            }
        }
    };

    let reader = async {
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut last_frame = Instant::now();
        let mut partial_since: Option<Instant> = None;
        loop {
            if buf.capacity() - buf.len() < 2048 {
                buf.reserve(4096);
            }
            // A started frame must complete within FRAME_TIMEOUT; a
            // connection without an allocation may not sit silent longer
            // than the idle timeout.
            let deadline = match partial_since {
                Some(t) => Some((t + FRAME_TIMEOUT, "a frame was not completed in time")),
                None if worker.borrow().core.allocation_for(&ft).is_none() => {
                    let idle = Duration::from_secs(
                        worker
                            .borrow()
                            .shared
                            .idle_timeout_secs
                            .load(Ordering::Relaxed),
                    );
                    Some((last_frame + idle, "idle without an allocation"))
                }
                None => None,
            };
            let read = match deadline {
                Some((at, why)) => {
                    match tokio::time::timeout_at(at.into(), rd.read_buf(&mut buf)).await {
                        Ok(r) => r,
                        Err(_) => {
                            debug!("{ft}: {why}; closing");
                            return;
                        }
                    }
                }
                None => rd.read_buf(&mut buf).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let mut start = 0;
            loop {
                let frame = match channel::stream_frame(&buf[start..]) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(_) => {
                        debug!("{ft}: stream is neither STUN nor ChannelData; closing");
                        return;
                    }
                };
                let len = frame.len();
                if len > MAX_FRAME {
                    return;
                }
                if buf.len() - start < len {
                    break;
                }
                let data = &buf[start..start + len];
                let mut w = worker.borrow_mut();
                let action = w.client_message(Instant::now(), &ft, link, data);
                w.dispatch(action, &ft, link, data);
                drop(w);
                start += len;
            }
            buf.drain(..start);
            let now = Instant::now();
            if start > 0 {
                last_frame = now;
                partial_since = None;
            }
            if buf.is_empty() {
                partial_since = None;
            } else if partial_since.is_none() {
                partial_since = Some(now);
            }
        }
    };

    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    let mut w = worker.borrow_mut();
    w.conns.remove((link - STREAM_LINK) as usize);
    w.core.client_closed(Instant::now(), &ft);
    w.apply_events();
    if conn.dropped.get() > 0 {
        info!(
            "{ft}: {} frames dropped because the client was not reading",
            conn.dropped.get()
        );
    }
}
