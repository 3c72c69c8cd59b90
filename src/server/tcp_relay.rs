//! RFC 6062 TCP relaying, the driver's half: the relay's listening socket,
//! the connections Connect opens from the relayed transport address, the
//! peer connections waiting for their client data connection (in a table
//! every worker reaches, since a ConnectionBind may arrive at any worker),
//! and the byte pipe between a data connection and its peer connection.
//! The core ([`crate::turn::tcp`]) decides who may connect and names the
//! connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use super::worker::{Handle, Mail};
use crate::turn::AllocationId;

/// How long Connect may take, and how long a peer connection waits for its
/// ConnectionBind (RFC 6062 §5.2, §5.3: 30 s).
pub const TCP_RELAY_TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP allocation's listening task and the signal that ends its
/// connections: dropping it stops accepting and closes every connection
/// of the allocation, joined or not.
pub struct TcpRelay {
    accept: tokio::task::JoinHandle<()>,
    /// Receivers in every connection of the allocation see it dropped.
    pub(super) ended: watch::Sender<()>,
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A peer connection waiting for its client data connection.
struct Waiting {
    /// The worker whose core holds the allocation.
    owner: usize,
    /// The allocation's `max-bps`, bytes per second each way (0: none).
    max_bps: u64,
    allocation: AllocationId,
    username: Box<str>,
    realm: Arc<str>,
    stream: std::net::TcpStream,
    deadline: Instant,
    ended: watch::Receiver<()>,
}

/// What a ConnectionBind takes to join its data connection to a peer.
pub struct Claimed {
    pub owner: usize,
    /// `max-bps` of the allocation, bytes per second each way (0: none).
    pub max_bps: u64,
    pub allocation: AllocationId,
    pub stream: std::net::TcpStream,
    pub ended: watch::Receiver<()>,
}

/// Peer connections waiting for a ConnectionBind, by CONNECTION-ID, shared
/// by every worker.
#[derive(Default)]
pub struct WaitingConnections {
    map: Mutex<HashMap<u32, Waiting>>,
}

impl WaitingConnections {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert(
        &self,
        connection: u32,
        owner: usize,
        allocation: AllocationId,
        max_bps: u64,
        username: &str,
        realm: Arc<str>,
        stream: std::net::TcpStream,
        ended: watch::Receiver<()>,
    ) {
        let w = Waiting {
            owner,
            max_bps,
            allocation,
            username: username.into(),
            realm,
            stream,
            deadline: Instant::now() + TCP_RELAY_TIMEOUT,
            ended,
        };
        self.map
            .lock()
            .expect("tcp relay table lock")
            .insert(connection, w);
    }

    /// Takes peer connection `connection` for a ConnectionBind of
    /// `username` in `realm`; `None` when there is none waiting for that
    /// user.
    pub fn claim(&self, connection: u32, username: &str, realm: &str) -> Option<Claimed> {
        let mut map = self.map.lock().expect("tcp relay table lock");
        let ok = map
            .get(&connection)
            .is_some_and(|w| &*w.username == username && &*w.realm == realm);
        if !ok {
            return None;
        }
        let w = map.remove(&connection)?;
        Some(Claimed {
            owner: w.owner,
            max_bps: w.max_bps,
            allocation: w.allocation,
            stream: w.stream,
            ended: w.ended,
        })
    }

    /// Closes the connections of worker `owner` that waited too long, or
    /// whose allocation ended; returns them for the core.
    pub fn sweep(&self, owner: usize, now: Instant) -> Vec<(AllocationId, u32)> {
        let mut gone = Vec::new();
        self.map
            .lock()
            .expect("tcp relay table lock")
            .retain(|&id, w| {
                let keep = w.owner != owner || (w.deadline > now && w.ended.has_changed().is_ok());
                if !keep {
                    gone.push((w.allocation, id));
                }
                keep
            });
        gone
    }
}

/// Starts accepting peer connections on TCP allocation `id`'s relayed
/// transport address, on this worker.
pub(super) fn start(
    worker: &Handle,
    id: AllocationId,
    listener: std::net::TcpListener,
) -> TcpRelay {
    let (ended, _) = watch::channel(());
    let worker = worker.clone();
    let accept = tokio::task::spawn_local(async move {
        let Ok(listener) = TcpListener::from_std(listener) else {
            return;
        };
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off.
                    debug!("TCP relay accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut guard = worker.borrow_mut();
            let w = &mut *guard;
            let mut out = std::mem::take(&mut w.out);
            let arrived = w.core.tcp_peer_arrived(Instant::now(), id, peer, &mut out);
            match arrived {
                Some((connection, ft, link)) => {
                    w.send_to_client(link, &ft, &out);
                    w.tcp_waiting(connection, id, stream);
                }
                None => debug!("TCP relay: connection from {peer} without a permission refused"),
            }
            w.out = out;
        }
    });
    TcpRelay { accept, ended }
}

/// Connect: a connection from `relayed` to `peer` within
/// [`TCP_RELAY_TIMEOUT`], reported to the core, whose answer goes to the
/// client's control connection; an open one waits for its ConnectionBind.
pub(super) async fn connect(
    worker: Handle,
    allocation: AllocationId,
    relayed: SocketAddr,
    peer: SocketAddr,
    connection: u32,
) {
    let open = async {
        let s = if relayed.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        s.set_reuseaddr(true)?;
        s.set_reuseport(true)?;
        s.bind(relayed)?;
        s.connect(peer).await
    };
    let stream = match tokio::time::timeout(TCP_RELAY_TIMEOUT, open).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            debug!("TCP relay: connect {relayed} -> {peer}: {e}");
            None
        }
        Err(_) => None,
    };
    let mut guard = worker.borrow_mut();
    let w = &mut *guard;
    let mut out = std::mem::take(&mut w.out);
    let answer = w
        .core
        .tcp_connect_result(allocation, connection, stream.is_some(), &mut out);
    if let Some((ft, link)) = answer {
        w.send_to_client(link, &ft, &out);
        if let Some(s) = stream {
            w.tcp_waiting(connection, allocation, s);
        }
    }
    w.out = out;
}

/// Copies `from` to `to` until `from` ends (then shuts `to` down for
/// writing), at most `rate` bytes per second after a first second's worth
/// (`max-bps` for a TCP relay, enforced by waiting rather than dropping:
/// TCP would only send the bytes again). Returns the bytes copied.
async fn shaped_copy<R, W>(from: &mut R, to: &mut W, rate: u64) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(total);
        }
        total += n as u64;
        let due = start + Duration::from_secs_f64(total.saturating_sub(rate) as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        to.write_all(&buf[..n]).await?;
    }
}

/// Joins client data connection `client` to the peer connection it bound
/// (`leftover`: bytes the client sent after its ConnectionBind), until
/// either side closes or the allocation ends; then tells the owner's core.
pub(super) async fn pipe<S: AsyncRead + AsyncWrite + Unpin>(
    worker: Handle,
    mut client: S,
    claimed: Claimed,
    connection: u32,
    leftover: Vec<u8>,
) {
    let Claimed {
        owner,
        max_bps,
        allocation,
        stream,
        mut ended,
    } = claimed;
    let joined = async {
        let _ = stream.set_nonblocking(true);
        let mut peer = TcpStream::from_std(stream)?;
        let _ = peer.set_nodelay(true);
        peer.write_all(&leftover).await?;
        if max_bps == 0 {
            return tokio::io::copy_bidirectional(&mut client, &mut peer).await;
        }
        let (mut client_in, mut client_out) = tokio::io::split(client);
        let (mut peer_in, mut peer_out) = peer.split();
        tokio::try_join!(
            shaped_copy(&mut client_in, &mut peer_out, max_bps),
            shaped_copy(&mut peer_in, &mut client_out, max_bps),
        )
    };
    let outcome = tokio::select! {
        r = joined => r.map(Some),
        _ = async { while ended.changed().await.is_ok() {} } => Ok(None),
    };
    let (to_peer_bytes, to_client_bytes) = match outcome {
        Ok(Some((to_peer, to_client))) => {
            info!(
                connection,
                to_peer_bytes = to_peer,
                to_client_bytes = to_client,
                "TCP relay: connection closed"
            );
            (to_peer, to_client)
        }
        Ok(None) => {
            info!(
                connection,
                "TCP relay: connection closed with its allocation"
            );
            (0, 0)
        }
        Err(e) => {
            info!(connection, "TCP relay: connection ended: {e}");
            (0, 0)
        }
    };
    let w = worker.borrow();
    w.mail(
        owner,
        Mail::TcpEnded {
            allocation,
            connection,
            to_peer_bytes,
            to_client_bytes,
        },
    );
}
