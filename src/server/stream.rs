//! Client TCP and TLS connections: accepting them (TLS told apart by its
//! first byte), serving each until it closes (frames to the core, replies
//! and relayed data queued back), the stream as the reader and writer share
//! it, and how a batch of queued frames is put on the wire.
//!
//! Over TLS, every TURN frame (a STUN message or a ChannelData message) goes
//! in a TLS record of its own, as coturn sends them. The stream is a byte
//! stream to TLS, so this is not what RFC 8656 requires, but clients exist
//! that read one message per `SSL_read` and drop whatever else the record
//! held: coturn's own `turnutils_uclient` is one (a record holding two
//! ChannelData messages counts as one and loses the second). The records of
//! one batch still leave in a single `writev`.

use std::cell::{Cell, RefCell};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use super::worker::{Handle, STREAM_LINK};
use super::{Shared, proxy};
use crate::stun::channel;
use crate::turn::{ClientAction, FiveTuple, Transport};

/// Bytes a stream connection may have queued for sending before further
/// relayed data to it is dropped (a client that stops reading cannot grow
/// server memory without bound).
const MAX_QUEUED: usize = 512 * 1024;
/// Largest frame on a stream: a STUN message (20-byte header plus a 16-bit
/// length), bytes; padded ChannelData is at most 4 + 65536.
const MAX_FRAME: usize = 20 + 65535;
/// Time allowed for a new TCP/TLS connection to send its first byte and
/// finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to complete a frame once its first byte arrived (slowloris).
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A client's stream connection: its 5-tuple, the bytes read but not yet
/// handled (a frame's start), and the outgoing byte queue.
pub(super) struct Conn {
    pub(super) five_tuple: FiveTuple,
    /// Bytes read and not yet a whole frame. Between reads every byte
    /// taken from the socket is here, so a plain TCP connection can move
    /// to a successor process with them (live takeover).
    pub(super) inbox: RefCell<Vec<u8>>,
    queue: RefCell<Vec<u8>>,
    wake: Notify,
    dropped: Cell<u64>,
    /// The writer is writing a batch (part of it may be on the wire).
    writing: Cell<bool>,
    /// A plain TCP connection's descriptor (`None` for TLS).
    pub(super) fd: Option<std::os::fd::RawFd>,
    /// Handed to a successor (while frozen: to be, unless thawed).
    pub(super) handed: Cell<bool>,
    /// Wakes the reader to stop reading when the connection is handed.
    pub(super) park: Notify,
}

impl Conn {
    /// Queues a complete frame; drops it when the client is not reading.
    pub(super) fn send(&self, bytes: &[u8]) {
        let mut q = self.queue.borrow_mut();
        if q.len() + bytes.len() > MAX_QUEUED {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        q.extend_from_slice(bytes);
        drop(q);
        self.wake.notify_one();
    }

    /// Whether the connection can move to a successor now: plain TCP,
    /// nothing queued or being written.
    pub(super) fn movable(&self) -> bool {
        self.fd.is_some() && !self.writing.get() && self.queue.borrow().is_empty()
    }
}

/// Registers a client stream connection on the worker: its [`Conn`] and
/// link. `inbox` holds bytes already read from it (a connection handed over
/// by a predecessor); `fd` is a plain TCP connection's descriptor.
pub(super) fn register(
    worker: &Handle,
    ft: FiveTuple,
    inbox: Vec<u8>,
    fd: Option<std::os::fd::RawFd>,
) -> (Rc<Conn>, u32) {
    let conn = Rc::new(Conn {
        five_tuple: ft,
        inbox: RefCell::new(inbox),
        queue: RefCell::new(Vec::new()),
        wake: Notify::new(),
        dropped: Cell::new(0),
        writing: Cell::new(false),
        fd,
        handed: Cell::new(false),
        park: Notify::new(),
    });
    let link = STREAM_LINK + worker.borrow_mut().conns.insert(conn.clone()) as u32;
    (conn, link)
}

/// Accepts client connections on a TCP listener of the worker, within the
/// per-address limit, and serves each on a task of its own. A connection
/// from a balancer of `proxy-protocol-allow` first gives its client's
/// address in a PROXY header; the limit then counts that client, and the
/// balancer itself is not limited. On a `tcp-proxy-port` listener
/// (`proxy_port`) every connection must start with one, from any source,
/// as in coturn.
pub(super) async fn listen(
    worker: Handle,
    listener: TcpListener,
    local: SocketAddr,
    proxy_port: bool,
) {
    let mut phase = worker.borrow().shared.phase.subscribe();
    loop {
        // While a successor takes over, connections wait in the kernel's
        // queue for it; once it has, the listener is its.
        if !super::shared::serving(&mut phase).await {
            return;
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = phase.changed() => continue,
        };
        let (mut stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                warn!("accept on {local}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = worker.borrow().shared.clone();
        let balancer = proxy_port || proxy::is_balancer(&shared.proxy_allow.load(), peer.ip());
        let slot = if balancer {
            None
        } else {
            match StreamSlot::acquire(&shared, peer) {
                Some(slot) => Some(slot),
                None => continue,
            }
        };
        let _ = stream.set_nodelay(true);
        let worker = worker.clone();
        tokio::task::spawn_local(async move {
            let mut client = peer;
            let mut slot = slot;
            if balancer {
                let header =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, proxy::read_header(&mut stream)).await;
                match header {
                    Ok(Ok(proxy::Origin::Proxied { source, .. })) => client = source,
                    Ok(Ok(proxy::Origin::Local)) => {}
                    Ok(Err(e)) => {
                        info!(
                            "{peer} -> {local}: {e}; closing (proxy-protocol-allow lists {})",
                            peer.ip()
                        );
                        return;
                    }
                    Err(_) => {
                        debug!(
                            "{peer} -> {local}: no PROXY header within {HANDSHAKE_TIMEOUT:?}; closing"
                        );
                        return;
                    }
                }
                if client != peer {
                    match StreamSlot::acquire(&shared, client) {
                        Some(s) => slot = Some(s),
                        None => return,
                    }
                }
            }
            accept_stream(worker, stream, client, local, balancer).await;
            drop(slot);
        });
    }
}

impl StreamSlot {
    /// Counts a connection from `client` against the per-address limit;
    /// `None` (logged) when the address is at it.
    fn acquire(shared: &Arc<Shared>, client: SocketAddr) -> Option<StreamSlot> {
        if !shared.streams.acquire(client.ip()) {
            debug!(
                "{client}: more than {} connections from this address; closing",
                shared.streams.limit.load(Ordering::Relaxed)
            );
            return None;
        }
        Some(StreamSlot {
            shared: shared.clone(),
            ip: client.ip(),
        })
    }
}

/// Decides TLS or plain TCP by the first byte (0x16 is a TLS handshake
/// record), as coturn does on both of its ports, then serves the connection
/// of client `peer`. A PROXY header is refused unless the connection came
/// from a balancer (`via_balancer`, whose header was already read).
async fn accept_stream(
    worker: Handle,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    via_balancer: bool,
) {
    let acceptor = worker.borrow().shared.tls.load_full();
    let mut first = [0u8; 12];
    let is_tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 && !via_balancer && proxy::looks_like_header(&first[..n]) => {
            info!(
                "{peer} -> {local}: a PROXY header from an address proxy-protocol-allow does not list; closing"
            );
            return;
        }
        Ok(Ok(n)) if n > 0 => first[0] == 0x16,
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
        use std::os::fd::AsRawFd;
        let (conn, link) = register(&worker, ft, Vec::new(), Some(stream.as_raw_fd()));
        serve_stream(worker, stream, conn, link).await;
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
            let (conn, link) = register(&worker, ft, Vec::new(), None);
            serve_stream(worker, tls, conn, link).await
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

/// Serves a plain TCP client connection handed over by a predecessor
/// process, with the bytes it had read; returns its link.
pub(super) fn adopt(
    worker: &Handle,
    ft: FiveTuple,
    stream: std::net::TcpStream,
    inbox: Vec<u8>,
) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    stream.set_nonblocking(true)?;
    let stream = TcpStream::from_std(stream)?;
    let (conn, link) = register(worker, ft, inbox, Some(stream.as_raw_fd()));
    let shared = worker.borrow().shared.clone();
    // Counted like any connection of its address (over the limit or not:
    // it is already open).
    let slot = StreamSlot::acquire(&shared, ft.client);
    let worker = worker.clone();
    tokio::task::spawn_local(async move {
        serve_stream(worker, stream, conn, link).await;
        drop(slot);
    });
    Ok(link)
}

/// How a connection's reader stopped.
enum Ended {
    /// The connection closed or broke a rule.
    Closed,
    /// RFC 6062: it became a data connection for TCP relay connection
    /// `connection`, with the bytes read past the ConnectionBind.
    Bound(super::tcp_relay::Claimed, u32, Vec<u8>),
    /// A successor process serves it now.
    Handed,
}

/// Serves one TCP or TLS client connection ([`register`]ed as `conn` on
/// `link`) until it closes; its allocation ends with it (RFC 8656 §3.1).
/// A plain TCP connection stops here, open, when a successor process
/// takes it over.
pub(super) async fn serve_stream<S: FrameStream>(
    worker: Handle,
    stream: S,
    conn: Rc<Conn>,
    link: u32,
) {
    let ft = conn.five_tuple;
    let mut phase = worker.borrow().shared.phase.subscribe();
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
                conn.writing.set(true);
                let staged = stream.borrow_mut().stage(&spare);
                let Ok(rest) = staged else { return };
                if wr.write_all(rest).await.is_err() || wr.flush().await.is_err() {
                    return;
                }
                conn.writing.set(false);
                spare.clear();
            }
        }
    };

    let reader = async {
        let mut chunk = vec![0u8; 16 * 1024];
        let mut last_frame = Instant::now();
        let mut partial_since: Option<Instant> = None;
        // Bytes a predecessor had read are handled first.
        let mut fresh = !conn.inbox.borrow().is_empty();
        loop {
            if fresh {
                fresh = false;
                // Whole frames go to the core; a started one stays in the
                // inbox.
                let mut start = 0;
                loop {
                    let inbox = conn.inbox.borrow();
                    let frame = match channel::stream_frame(&inbox[start..]) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => {
                            debug!("{ft}: stream is neither STUN nor ChannelData; closing");
                            return Ended::Closed;
                        }
                    };
                    let len = frame.len();
                    if len > MAX_FRAME {
                        return Ended::Closed;
                    }
                    if inbox.len() - start < len {
                        break;
                    }
                    let data = inbox[start..start + len].to_vec();
                    drop(inbox);
                    let mut w = worker.borrow_mut();
                    let action = w.client_message(Instant::now(), &ft, link, &data);
                    if let ClientAction::BindConnection {
                        connection,
                        username,
                        realm,
                    } = &action
                        && let Some(claimed) =
                            w.shared.tcp_waiting.claim(*connection, username, realm)
                    {
                        // RFC 6062: the success response, then this is a
                        // data connection, joined to the peer byte for byte.
                        conn.send(&w.out);
                        let rest = conn.inbox.borrow()[start + len..].to_vec();
                        return Ended::Bound(claimed, *connection, rest);
                    }
                    w.dispatch(action, &ft, link, &data);
                    drop(w);
                    start += len;
                }
                let left = {
                    let mut inbox = conn.inbox.borrow_mut();
                    inbox.drain(..start);
                    inbox.len()
                };
                let now = Instant::now();
                if start > 0 {
                    last_frame = now;
                    partial_since = None;
                }
                if left == 0 {
                    partial_since = None;
                } else if partial_since.is_none() {
                    partial_since = Some(now);
                }
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
            let read = async {
                match deadline {
                    Some((at, why)) => {
                        match tokio::time::timeout_at(at.into(), rd.read(&mut chunk)).await {
                            Ok(r) => r,
                            Err(_) => {
                                debug!("{ft}: {why}; closing");
                                Ok(0)
                            }
                        }
                    }
                    None => rd.read(&mut chunk).await,
                }
            };
            // A takeover: a connection handed over stops reading before
            // it takes another byte (the inbox went over as it is), and
            // once the successor serves it, ends here without closing it.
            let read = tokio::select! {
                biased;
                _ = conn.park.notified(), if conn.fd.is_some() => {
                    if conn.handed.get()
                        && !super::shared::serving(&mut phase).await
                        && conn.handed.get()
                    {
                        return Ended::Handed;
                    }
                    continue;
                }
                r = read => r,
            };
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(n) => conn.inbox.borrow_mut().extend_from_slice(&chunk[..n]),
            }
            fresh = true;
        }
    };

    let ended = tokio::select! {
        e = reader => e,
        _ = writer => Ended::Closed,
    };
    if matches!(ended, Ended::Handed) {
        // The successor has the connection (its own descriptor): this
        // process's copy closes without a word to the client.
        worker
            .borrow_mut()
            .conns
            .remove((link - STREAM_LINK) as usize);
        return;
    }
    {
        let mut w = worker.borrow_mut();
        w.conns.remove((link - STREAM_LINK) as usize);
        w.core.client_closed(Instant::now(), &ft);
        w.apply_events();
    }
    if conn.dropped.get() > 0 {
        info!(
            "{ft}: {} frames dropped because the client was not reading",
            conn.dropped.get()
        );
    }
    let Ended::Bound(claimed, connection, leftover) = ended else {
        return;
    };
    // What is queued (the ConnectionBind success) goes first.
    let queued = std::mem::take(&mut *conn.queue.borrow_mut());
    let staged = stream.borrow_mut().stage(&queued).map(<[u8]>::to_vec);
    let Ok(rest) = staged else { return };
    if wr.write_all(&rest).await.is_err() || wr.flush().await.is_err() {
        return;
    }
    drop((rd, wr));
    let Ok(stream) = Rc::try_unwrap(stream) else {
        return;
    };
    debug!("{ft}: data connection for TCP relay connection {connection}");
    super::tcp_relay::pipe(worker, stream.into_inner(), claimed, connection, leftover).await;
}

/// A client stream that can take a batch of whole frames.
pub trait FrameStream: AsyncRead + AsyncWrite + Unpin {
    /// Takes `frames` (whole STUN or ChannelData frames, back to back) into
    /// the stream's own send buffer where it has one, and returns the bytes
    /// the caller must still write and flush. Errors when the stream can no
    /// longer send (a TLS connection that has been closed).
    fn stage<'a>(&mut self, frames: &'a [u8]) -> io::Result<&'a [u8]>;
}

impl FrameStream for TcpStream {
    /// Plain TCP has no records: the batch is written as it is.
    fn stage<'a>(&mut self, frames: &'a [u8]) -> io::Result<&'a [u8]> {
        Ok(frames)
    }
}

impl FrameStream for TlsStream<TcpStream> {
    /// Encrypts each frame into a record of its own (RFC 8446 §5.1 lets a
    /// sender split and join records freely; one per frame is for clients
    /// that assume it). rustls keeps the records until the caller flushes.
    fn stage<'a>(&mut self, frames: &'a [u8]) -> io::Result<&'a [u8]> {
        let (_, tls) = self.get_mut();
        let mut rest = frames;
        while !rest.is_empty() {
            // The queue holds only frames this server built, so the length
            // is always known; anything else is written as one record.
            let len = match channel::stream_frame(rest) {
                Ok(Some(frame)) => frame.len().min(rest.len()),
                Ok(None) | Err(_) => rest.len(),
            };
            tls.writer().write_all(&rest[..len])?;
            rest = &rest[len..];
        }
        Ok(rest)
    }
}

/// One of the two users of a connection (the reader or the writer of
/// `serve_stream`), on one worker thread. Every poll borrows the stream for
/// its own duration only, so the two never overlap.
pub struct StreamHalf<S>(pub Rc<RefCell<S>>);

impl<S: AsyncRead + Unpin> AsyncRead for StreamHalf<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StreamHalf<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_shutdown(cx)
    }
}
