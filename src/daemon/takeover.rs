//! The daemon's two sides of a live takeover ([`crate::server::takeover`]):
//! the running server's control socket thread, which asks the control loop
//! to freeze the workers and hands their state over, and the successor's
//! [`receive`] and [`Incoming::commit`].

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::server::takeover::{
    self, Conn, FRAME_TIMEOUT, Listener, Msg, READS, READY_TIMEOUT, SavedListener, SavedRelay,
    SavedReservation, SavedStream, SavedWorker, State,
};
use crate::server::{Frozen, Inherited, InheritedWorker};

/// What the control socket thread asks of the control loop.
pub enum Request {
    /// Freeze the workers and answer with the state to hand over and its
    /// descriptors.
    Freeze {
        reply: std::sync::mpsc::Sender<Result<(State, Vec<OwnedFd>), String>>,
    },
    /// Process `pid` serves now what was frozen: `allocations` allocations
    /// and `fds` descriptors went over, the workers were frozen for
    /// `frozen`.
    Committed {
        pid: i32,
        allocations: usize,
        fds: usize,
        frozen: Duration,
    },
    /// The takeover failed after the freeze: thaw. Why.
    Failed(String),
}

/// Assembles the state of `frozen` workers, with the keys nonces and
/// tickets are made with and a copy of the metrics listener.
pub fn assemble(
    frozen: Vec<Frozen>,
    nonce_secret: [u8; 32],
    ticket_key: [u8; 32],
    metrics: Option<(SocketAddr, OwnedFd)>,
    reservations: Vec<([u8; 8], Duration, OwnedFd)>,
    offloaded: [u64; 4],
) -> (State, Vec<OwnedFd>) {
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut put = |fd: OwnedFd| {
        fds.push(fd);
        (fds.len() - 1) as u32
    };
    let mut workers = Vec::with_capacity(frozen.len());
    for f in frozen {
        let mut w = SavedWorker {
            stats: f.stats,
            next_generation: f.next_generation,
            ..SavedWorker::default()
        };
        for (addr, fd) in f.udp {
            w.udp.push(SavedListener {
                addr,
                fd: put(fd),
                proxy: false,
            });
        }
        for (addr, proxy, fd) in f.tcp {
            w.tcp.push(SavedListener {
                addr,
                fd: put(fd),
                proxy,
            });
        }
        for (addr, fd) in f.dtls {
            w.dtls.push(SavedListener {
                addr,
                fd: put(fd),
                proxy: false,
            });
        }
        for (allocation, [v4, v6]) in f.relays {
            let fds = [v4.map(&mut put), v6.map(&mut put)];
            w.relays.push(SavedRelay { allocation, fds });
        }
        for (five_tuple, fd, inbox) in f.streams {
            w.streams.push(SavedStream {
                five_tuple,
                fd: put(fd),
                inbox,
            });
        }
        workers.push(w);
    }
    let metrics = metrics.map(|(addr, fd)| SavedListener {
        addr,
        fd: put(fd),
        proxy: false,
    });
    let reservations = reservations
        .into_iter()
        .map(|(token, left, fd)| SavedReservation {
            token,
            expires_in_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
            fd: put(fd),
        })
        .collect();
    let state = State {
        version: env!("CARGO_PKG_VERSION").to_string(),
        nonce_secret,
        ticket_key,
        workers,
        metrics,
        reservations,
        offloaded,
    };
    (state, fds)
}

/// Serves the control socket on a thread of its own, one takeover at a
/// time, until one commits.
pub fn spawn_server(
    listener: Listener,
    requests: tokio::sync::mpsc::UnboundedSender<Request>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            loop {
                let conn = match listener.accept() {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("control socket {}: {e}", listener.path().display());
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match serve(&conn, &requests) {
                    Ok(()) => return,
                    Err(e) => warn!("takeover not done, this server carries on: {e}"),
                }
            }
        })
        .map(|_| ())
}

/// Refuses the successor on `conn` with `reason`, returned as the error.
fn refuse(conn: &Conn, reason: String) -> Result<(), String> {
    let _ = conn.send(&Msg::Refused {
        reason: reason.clone(),
    });
    Err(reason)
}

/// One takeover conversation with a successor; Ok once it committed.
fn serve(
    conn: &Conn,
    requests: &tokio::sync::mpsc::UnboundedSender<Request>,
) -> Result<(), String> {
    let (pid, uid) = conn.peer().map_err(|e| format!("control socket: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != me {
        return refuse(
            conn,
            format!("process {pid} runs as user {uid}, neither root nor this server's user {me}"),
        );
    }
    let (version, reads) = match conn.recv() {
        Ok(Msg::Hello { version, reads }) => (version, reads),
        Ok(other) => return refuse(conn, format!("expected a greeting, got {other:?}")),
        Err(e) => return Err(format!("process {pid}: {e}")),
    };
    let format = match takeover::negotiate(&reads) {
        Ok(f) => f,
        Err(reason) => return refuse(conn, reason),
    };
    info!(
        "takeover: process {pid} (turnserver {version}) asks for this server's sockets and allocations"
    );
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    if requests.send(Request::Freeze { reply: tx }).is_err() {
        return refuse(conn, "the server is stopping".to_string());
    }
    let (state, fds) = match rx.recv_timeout(FRAME_TIMEOUT) {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return refuse(conn, format!("cannot freeze: {e}")),
        Err(_) => {
            let _ = requests.send(Request::Failed("the workers did not freeze".into()));
            return refuse(conn, "the workers did not freeze in time".to_string());
        }
    };
    let allocations = state.workers.iter().map(|w| w.relays.len()).sum();
    let n = fds.len();
    let handed = (|| -> Result<(), String> {
        conn.send_state(&state, &fds, format)
            .map_err(|e| format!("sending the state: {e}"))?;
        drop(fds);
        conn.set_timeout(READY_TIMEOUT)
            .map_err(|e| format!("control socket: {e}"))?;
        match conn.recv() {
            Ok(Msg::Ready) => {}
            Ok(Msg::Refused { reason }) => return Err(format!("process {pid} gave up: {reason}")),
            Ok(other) => return Err(format!("process {pid} sent {other:?}")),
            Err(e) => return Err(format!("process {pid} did not get ready: {e}")),
        }
        conn.send(&Msg::Commit)
            .map_err(|e| format!("process {pid} went away before the commit: {e}"))
    })();
    match handed {
        Ok(()) => {
            let _ = requests.send(Request::Committed {
                pid,
                allocations,
                fds: n,
                frozen: started.elapsed(),
            });
            Ok(())
        }
        Err(e) => {
            let _ = requests.send(Request::Failed(e.clone()));
            Err(e)
        }
    }
}

/// What a successor received from the running server: the connection (to
/// commit on), the state, and the descriptors it names.
pub struct Incoming {
    /// The control connection; `None` when the state came from systemd's
    /// file descriptor store (nothing to commit to).
    conn: Option<Conn>,
    pub state: State,
    fds: Vec<Option<OwnedFd>>,
}

/// Asks the server running at control socket `path` for its sockets and
/// allocations. Errors say why (unsafe socket permissions, nobody
/// listening, a refusal, a corrupt state); the running server then carries
/// on.
pub fn receive(path: &Path) -> Result<Incoming, String> {
    let conn = takeover::connect(path)?;
    conn.send(&Msg::Hello {
        version: env!("CARGO_PKG_VERSION").to_string(),
        reads: READS.to_vec(),
    })
    .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let header = conn
        .recv()
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    if let Msg::Refused { reason } = &header {
        return Err(format!("the running server refused: {reason}"));
    }
    let (state, fds) = conn.recv_state(&header)?;
    Ok(Incoming {
        conn: Some(conn),
        state,
        fds: fds.into_iter().map(Some).collect(),
    })
}

impl Incoming {
    fn take(&mut self, i: u32) -> Result<OwnedFd, String> {
        self.fds
            .get_mut(i as usize)
            .and_then(Option::take)
            .ok_or_else(|| format!("descriptor {i} is missing"))
    }

    fn udp(&mut self, l: &SavedListener) -> Result<(SocketAddr, std::net::UdpSocket), String> {
        let s = std::net::UdpSocket::from(self.take(l.fd)?);
        match s.local_addr() {
            Ok(a) if a == l.addr => Ok((l.addr, s)),
            got => Err(format!(
                "descriptor {} is not udp {} ({got:?})",
                l.fd, l.addr
            )),
        }
    }

    fn tcp(&mut self, l: &SavedListener) -> Result<std::net::TcpListener, String> {
        let s = std::net::TcpListener::from(self.take(l.fd)?);
        match s.local_addr() {
            Ok(a) if a == l.addr => Ok(s),
            got => Err(format!(
                "descriptor {} is not tcp {} ({got:?})",
                l.fd, l.addr
            )),
        }
    }

    /// The listeners, relay sockets and allocations, by the predecessor's
    /// worker index; the metrics listener with its address; and the
    /// EVEN-PORT reservations (token, socket, time left).
    #[allow(clippy::type_complexity)]
    pub fn sockets(
        &mut self,
    ) -> Result<
        (
            Inherited,
            Option<(SocketAddr, std::net::TcpListener)>,
            Vec<([u8; 8], std::net::UdpSocket, Duration)>,
        ),
        String,
    > {
        let workers = std::mem::take(&mut self.state.workers);
        let mut inherited = Inherited::default();
        for w in workers {
            let mut iw = InheritedWorker {
                stats: w.stats,
                next_generation: w.next_generation,
                ..InheritedWorker::default()
            };
            for l in &w.udp {
                iw.udp.push(self.udp(l)?);
            }
            for l in &w.tcp {
                iw.tcp.push((l.addr, l.proxy, self.tcp(l)?));
            }
            for l in &w.dtls {
                iw.dtls.push(self.udp(l)?);
            }
            for r in w.relays {
                let mut sockets = [None, None];
                for (slot, fd) in sockets.iter_mut().zip(r.fds) {
                    if let Some(fd) = fd {
                        *slot = Some(std::net::UdpSocket::from(self.take(fd)?));
                    }
                }
                iw.relays.push((r.allocation, sockets));
            }
            for st in w.streams {
                let s = std::net::TcpStream::from(self.take(st.fd)?);
                let ft = st.five_tuple;
                match (s.local_addr(), s.peer_addr()) {
                    (Ok(l), Ok(p)) if l == ft.server && p == ft.client => {}
                    got => {
                        return Err(format!(
                            "descriptor {} is not the connection {ft} ({got:?})",
                            st.fd
                        ));
                    }
                }
                iw.streams.push((ft, s, st.inbox));
            }
            inherited.workers.push(iw);
        }
        let metrics = match self.state.metrics.clone() {
            Some(l) => Some((l.addr, self.tcp(&l)?)),
            None => None,
        };
        let mut reservations = Vec::new();
        for r in std::mem::take(&mut self.state.reservations) {
            let socket = std::net::UdpSocket::from(self.take(r.fd)?);
            reservations.push((r.token, socket, Duration::from_millis(r.expires_in_ms)));
        }
        Ok((inherited, metrics, reservations))
    }

    /// Whether a running server hands over (live takeover), rather than
    /// systemd's file descriptor store: the two processes overlap.
    pub fn live(&self) -> bool {
        self.conn.is_some()
    }

    /// Tells the running server this process is ready and waits for its
    /// commit; after Ok this process must serve (the other has let go).
    pub fn commit(self) -> Result<(), String> {
        let Some(conn) = self.conn else {
            return Ok(());
        };
        conn.send(&Msg::Ready)
            .map_err(|e| format!("the running server went away: {e}"))?;
        match conn.recv() {
            Ok(Msg::Commit) => Ok(()),
            Ok(other) => Err(format!(
                "the running server sent {other:?} instead of the commit"
            )),
            Err(e) => Err(format!("no commit from the running server: {e}")),
        }
    }
}

/// The name of the state in systemd's file descriptor store.
pub const STATE_NAME: &str = "turnserver-state";
/// The prefix of the socket names in the store: `turnserver-fd-INDEX`.
const FD_PREFIX: &str = "turnserver-fd-";

/// How many descriptors systemd's file descriptor store takes
/// (`FileDescriptorStoreMax=`, which systemd passes as `$FDSTORE`), when
/// this process runs under systemd with one.
pub fn fd_store_limit() -> Option<usize> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let n: usize = std::env::var("FDSTORE").ok()?.parse().ok()?;
    (n > 0).then_some(n)
}

/// Puts the sockets and then the state (in a memfd) into systemd's file
/// descriptor store, for the next start of the service to take over
/// (`systemctl restart`). The state goes last: a store without it holds
/// nothing the next start uses. Errors: the store is too small, or systemd
/// cannot be told.
pub fn store(state: &State, fds: &[OwnedFd], limit: usize) -> Result<(), String> {
    use sd_notify::NotifyState;
    use std::io::Write;
    use std::os::fd::AsFd;
    if fds.len() + 1 > limit {
        return Err(format!(
            "FileDescriptorStoreMax={limit} is below the {} descriptors to keep (raise it in the unit)",
            fds.len() + 1
        ));
    }
    for (i, fd) in fds.iter().enumerate() {
        let name = format!("{FD_PREFIX}{i}");
        sd_notify::notify_with_fds(
            &[
                NotifyState::FdStore,
                NotifyState::FdName(&name),
                NotifyState::Custom("FDPOLL=0"),
            ],
            &[fd.as_fd()],
        )
        .map_err(|e| format!("file descriptor store: {e}"))?;
    }
    let (bytes, crc32) = state.encode(takeover::FORMAT);
    let header = Msg::State {
        format: takeover::FORMAT,
        version: env!("CARGO_PKG_VERSION").to_string(),
        bytes: bytes.len() as u64,
        crc32,
        fds: fds.len() as u32,
    };
    let memfd = nix::sys::memfd::memfd_create(STATE_NAME, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| format!("memfd: {e}"))?;
    let mut file = std::fs::File::from(memfd);
    let mut head = serde_json::to_vec(&header).expect("messages serialize");
    head.push(b'\n');
    file.write_all(&head)
        .and_then(|()| file.write_all(&bytes))
        .map_err(|e| format!("memfd: {e}"))?;
    sd_notify::notify_with_fds(
        &[
            NotifyState::FdStore,
            NotifyState::FdName(STATE_NAME),
            NotifyState::Custom("FDPOLL=0"),
        ],
        &[file.as_fd()],
    )
    .map_err(|e| format!("file descriptor store: {e}"))
}

/// Takes what a previous process of this service left in systemd's file
/// descriptor store (passed as `LISTEN_FDS`/`LISTEN_FDNAMES`), and empties
/// the store so it never keeps a socket this process closes. `None` when
/// there is no state, or it cannot be read (logged; the process starts
/// fresh and the descriptors close).
pub fn from_fd_store() -> Option<Incoming> {
    use sd_notify::NotifyState;
    use std::io::{Read, Seek};
    use std::os::fd::FromRawFd;
    let passed: Vec<(std::os::fd::RawFd, String)> = match sd_notify::listen_fds_with_names() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            warn!("LISTEN_FDS: {e}");
            return None;
        }
    };
    if passed.is_empty() {
        return None;
    }
    let mut state_fd = None;
    let mut sockets = std::collections::BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    for (raw, name) in passed {
        // SAFETY: the service manager passed these descriptors to this
        // process; nothing else owns them.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if name == STATE_NAME {
            state_fd = Some(fd);
        } else if let Some(i) = name
            .strip_prefix(FD_PREFIX)
            .and_then(|i| i.parse::<usize>().ok())
        {
            sockets.insert(i, fd);
        }
        names.insert(name);
    }
    for name in &names {
        let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
    }
    let Some(state_fd) = state_fd else {
        if !sockets.is_empty() {
            info!(
                "the file descriptor store held {} sockets but no state: starting fresh",
                sockets.len()
            );
        }
        return None;
    };
    let read = || -> Result<State, String> {
        let mut file = std::fs::File::from(state_fd);
        let mut all = Vec::new();
        file.rewind()
            .and_then(|_| file.read_to_end(&mut all))
            .map_err(|e| format!("reading the state: {e}"))?;
        let split = all
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("the state has no header")?;
        let header: Msg = serde_json::from_slice(&all[..split])
            .map_err(|e| format!("the state's header: {e}"))?;
        State::from_parts(&header, &all[split + 1..], sockets.len())
    };
    match read() {
        Ok(state) => {
            let n = sockets.keys().next_back().map_or(0, |i| i + 1);
            let mut fds: Vec<Option<OwnedFd>> = (0..n).map(|_| None).collect();
            for (i, fd) in sockets {
                fds[i] = Some(fd);
            }
            Some(Incoming {
                conn: None,
                state,
                fds,
            })
        }
        Err(e) => {
            warn!(
                "the previous process's state in the file descriptor store is refused: {e}; starting fresh"
            );
            None
        }
    }
}
