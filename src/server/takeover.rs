//! Live takeover: the running server hands its sockets and allocation
//! table to a successor (`turnserver --takeover`) over a Unix control
//! socket, so an upgrade or a restart-only configuration change ends no
//! call.
//!
//! The exchange, over a `SOCK_SEQPACKET` socket (each frame one message;
//! file descriptors travel as `SCM_RIGHTS`, at most [`FDS_PER_FRAME`] a
//! frame):
//!
//! 1. successor → running: [`Msg::Hello`] with the state formats it reads;
//! 2. running → successor: [`Msg::Refused`], or [`Msg::State`] (format,
//!    length, CRC-32 and descriptor count), then the state's bytes in
//!    frames of at most [`CHUNK`] bytes, then the descriptors. Before it
//!    saves anything the running server stops reading its UDP listeners and
//!    the relay sockets it hands over, and stops accepting connections:
//!    datagrams arriving meanwhile wait in the sockets' buffers, which the
//!    successor reads next;
//! 3. successor → running: [`Msg::Ready`] once it has built everything
//!    but before it reads a socket;
//! 4. running → successor: [`Msg::Commit`]. The running server forgets
//!    what it handed over, drains its TCP/TLS clients (their connections
//!    cannot move) and exits 0; the successor starts reading.
//!
//! If anything fails before the commit (a refusal, a bad state, the
//! successor killed, no `Ready` within [`READY_TIMEOUT`]) the running
//! server resumes reading and the successor exits non-zero.
//!
//! The state is JSON in a versioned envelope ([`FORMAT`], checked with
//! CRC-32); a successor lists the formats it reads ([`READS`]), and a
//! running server whose format the successor cannot read refuses, so the
//! operator falls back to draining.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};

use crate::turn::{SavedAllocation, Stats};

/// The state format this build writes.
pub const FORMAT: u32 = 1;
/// The state formats this build reads.
pub const READS: &[u32] = &[1];
/// Where the control socket is unless `control-socket` says otherwise.
pub const DEFAULT_PATH: &str = "/run/turnserver/control.sock";
/// Largest state chunk in one frame, bytes.
pub const CHUNK: usize = 60 * 1024;
/// Most descriptors in one frame (the kernel's SCM_MAX_FD is 253).
pub const FDS_PER_FRAME: usize = 250;
/// How long the running server waits for the successor's `Ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long either side waits for any other frame.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    /// The successor's greeting: its version and the state formats it
    /// reads.
    Hello { version: String, reads: Vec<u32> },
    /// The running server will not hand over, and why.
    Refused { reason: String },
    /// The state follows: `bytes` bytes in chunks (CRC-32 `crc32`), then
    /// `fds` descriptors.
    State {
        format: u32,
        version: String,
        bytes: u64,
        crc32: u32,
        fds: u32,
    },
    /// The successor is ready to serve.
    Ready,
    /// The running server has let go; the successor serves now.
    Commit,
}

/// The format the running server (writing [`FORMAT`]) uses for a successor
/// that reads `reads`, or why it refuses.
pub fn negotiate(reads: &[u32]) -> Result<u32, String> {
    if reads.contains(&FORMAT) {
        Ok(FORMAT)
    } else {
        Err(format!(
            "this server writes state format {FORMAT}, the new process reads {reads:?}: drain instead (SIGTERM, or --drain)"
        ))
    }
}

/// A listening socket handed over: its address, its descriptor's index in
/// the state's descriptor list, and whether it is a `tcp-proxy-port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedListener {
    pub addr: SocketAddr,
    pub fd: u32,
    #[serde(default)]
    pub proxy: bool,
}

/// An allocation handed over, with the indexes of its relay sockets (IPv4,
/// IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedRelay {
    pub allocation: SavedAllocation,
    pub fds: [Option<u32>; 2],
}

/// A plain TCP client connection handed over: its 5-tuple, descriptor
/// index, and the bytes already read from it (the start of a frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStream {
    pub five_tuple: crate::turn::FiveTuple,
    pub fd: u32,
    pub inbox: Vec<u8>,
}

/// What one worker of the running server hands over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedWorker {
    pub udp: Vec<SavedListener>,
    pub tcp: Vec<SavedListener>,
    pub dtls: Vec<SavedListener>,
    pub relays: Vec<SavedRelay>,
    /// Plain TCP client connections (absent in states of the first
    /// builds).
    #[serde(default)]
    pub streams: Vec<SavedStream>,
    pub stats: Stats,
    /// The worker's next allocation generation (absent in states of the
    /// first builds).
    #[serde(default)]
    pub next_generation: u32,
}

/// A relay socket held for a RESERVATION-TOKEN (RFC 8656 §7.2), with the
/// milliseconds it has left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReservation {
    pub token: [u8; 8],
    pub expires_in_ms: u64,
    pub fd: u32,
}

/// The whole state a running server hands its successor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The running server's version (for the log).
    pub version: String,
    /// Keys nonces and mobility tickets are made with: the successor keeps
    /// them, so nonces and tickets clients hold stay valid.
    pub nonce_secret: [u8; 32],
    pub ticket_key: [u8; 32],
    /// The workers' shares, by worker index.
    pub workers: Vec<SavedWorker>,
    /// The metrics listener, if any.
    pub metrics: Option<SavedListener>,
    /// EVEN-PORT reservations (absent in states of the first builds).
    #[serde(default)]
    pub reservations: Vec<SavedReservation>,
    /// What the eBPF fast path relayed so far (`turn_offloaded_*`: packets
    /// and bytes to peers, packets and bytes to clients; absent in states
    /// of earlier builds).
    #[serde(default)]
    pub offloaded: [u64; 4],
}

impl State {
    /// Encodes the state in `format`: its bytes and their CRC-32.
    pub fn encode(&self, format: u32) -> (Vec<u8>, u32) {
        debug_assert_eq!(format, FORMAT);
        let bytes = serde_json::to_vec(self).expect("the state serializes");
        let crc = crc32fast::hash(&bytes);
        (bytes, crc)
    }

    /// Decodes a state of `format` whose bytes should have CRC-32 `crc`.
    /// Errors name what is wrong: a format this build cannot read, a
    /// corrupt or unreadable state.
    pub fn decode(format: u32, bytes: &[u8], crc: u32) -> Result<State, String> {
        if !READS.contains(&format) {
            return Err(format!(
                "state format {format} is not one this build reads ({READS:?})"
            ));
        }
        let got = crc32fast::hash(bytes);
        if got != crc {
            return Err(format!(
                "the state is corrupt (CRC-32 {got:08x}, expected {crc:08x})"
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("the state cannot be read: {e}"))
    }

    /// The state announced by `header` ([`Msg::State`]) whose bytes are
    /// `body`, when `received` descriptors came with it: checked length,
    /// format, CRC-32 and descriptor indexes.
    pub fn from_parts(header: &Msg, body: &[u8], received: usize) -> Result<State, String> {
        let Msg::State {
            format,
            bytes,
            crc32,
            fds,
            ..
        } = header
        else {
            return Err(format!("expected the state, got {header:?}"));
        };
        if body.len() as u64 != *bytes {
            return Err(format!("the state has {} bytes, not {bytes}", body.len()));
        }
        if received != *fds as usize {
            return Err(format!(
                "{received} descriptors came with the state, not {fds}"
            ));
        }
        let state = State::decode(*format, body, *crc32)?;
        state.check_fds(received)?;
        Ok(state)
    }

    /// Every descriptor index the state refers to, each once, below `n`.
    pub fn check_fds(&self, n: usize) -> Result<(), String> {
        let mut seen = vec![false; n];
        let mut mark = |i: u32| -> Result<(), String> {
            match seen.get_mut(i as usize) {
                Some(s) if !*s => {
                    *s = true;
                    Ok(())
                }
                Some(_) => Err(format!("descriptor {i} is named twice")),
                None => Err(format!("descriptor {i} is missing ({n} received)")),
            }
        };
        for w in &self.workers {
            for l in w.udp.iter().chain(&w.tcp).chain(&w.dtls) {
                mark(l.fd)?;
            }
            for r in &w.relays {
                for fd in r.fds.iter().flatten() {
                    mark(*fd)?;
                }
            }
            for s in &w.streams {
                mark(s.fd)?;
            }
        }
        if let Some(m) = &self.metrics {
            mark(m.fd)?;
        }
        for r in &self.reservations {
            mark(r.fd)?;
        }
        Ok(())
    }
}

/// One end of a control connection.
pub struct Conn {
    fd: OwnedFd,
}

/// A frame received: its bytes and the descriptors it carried.
pub struct Frame {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

fn io_err(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

impl Conn {
    /// Sets how long a receive may wait.
    pub fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        let tv = nix::sys::time::TimeVal::new(t.as_secs() as _, t.subsec_micros() as _);
        socket::setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(io_err)
    }

    /// Sends one frame with `fds` attached.
    fn send_frame(&self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let iov = [IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io_err)?;
        Ok(())
    }

    /// Sends a message.
    pub fn send(&self, m: &Msg) -> std::io::Result<()> {
        self.send_frame(&serde_json::to_vec(m).expect("messages serialize"), &[])
    }

    /// Receives one frame (its descriptors close-on-exec). End of stream is
    /// an `UnexpectedEof` error.
    pub fn recv_frame(&self) -> std::io::Result<Frame> {
        let mut buf = vec![0u8; CHUNK + 1024];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_FRAME]);
        let (n, fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io_err)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io_err)? {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors
                    // in this process for us; nothing else owns them.
                    fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                }
            }
            let truncated = msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
            (msg.bytes, fds, truncated)
        };
        if truncated {
            return Err(std::io::Error::other("a control frame was truncated"));
        }
        if n == 0 && fds.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the other process closed the control connection",
            ));
        }
        buf.truncate(n);
        Ok(Frame { bytes: buf, fds })
    }

    /// Receives a message.
    pub fn recv(&self) -> std::io::Result<Msg> {
        let f = self.recv_frame()?;
        serde_json::from_slice(&f.bytes)
            .map_err(|e| std::io::Error::other(format!("a bad control message: {e}")))
    }

    /// Sends `state` in `format` with its descriptors.
    pub fn send_state(&self, state: &State, fds: &[OwnedFd], format: u32) -> std::io::Result<()> {
        let (bytes, crc32) = state.encode(format);
        self.send(&Msg::State {
            format,
            version: env!("CARGO_PKG_VERSION").to_string(),
            bytes: bytes.len() as u64,
            crc32,
            fds: fds.len() as u32,
        })?;
        for chunk in bytes.chunks(CHUNK) {
            self.send_frame(chunk, &[])?;
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        for group in raw.chunks(FDS_PER_FRAME) {
            self.send_frame(b"F", group)?;
        }
        Ok(())
    }

    /// Receives the state announced by `header` and its descriptors.
    pub fn recv_state(&self, header: &Msg) -> Result<(State, Vec<OwnedFd>), String> {
        let Msg::State { bytes, fds, .. } = header else {
            return Err(format!("expected the state, got {header:?}"));
        };
        let mut data = Vec::with_capacity(*bytes as usize);
        while (data.len() as u64) < *bytes {
            let f = self
                .recv_frame()
                .map_err(|e| format!("receiving the state: {e}"))?;
            if !f.fds.is_empty() {
                return Err("descriptors arrived inside the state".to_string());
            }
            data.extend_from_slice(&f.bytes);
        }
        let mut received = Vec::with_capacity(*fds as usize);
        while received.len() < *fds as usize {
            let f = self
                .recv_frame()
                .map_err(|e| format!("receiving descriptors: {e}"))?;
            received.extend(f.fds);
        }
        let state = State::from_parts(header, &data, received.len())?;
        Ok((state, received))
    }

    /// The connected peer's process id and user id (`SO_PEERCRED`).
    pub fn peer(&self) -> std::io::Result<(i32, u32)> {
        let c = socket::getsockopt(&self.fd, sockopt::PeerCredentials).map_err(io_err)?;
        Ok((c.pid(), c.uid()))
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io_err)
}

/// Checks that the control socket at `path` is safe to hand state to:
/// owned by root or this user and not writable by anyone else. The error
/// names the path and what is wrong.
pub fn check_path(path: &Path) -> Result<(), String> {
    let md =
        std::fs::metadata(path).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if md.uid() != 0 && md.uid() != me {
        return Err(format!(
            "control socket {} belongs to user {}, not to root or this user ({me}): refusing to take over through it",
            path.display(),
            md.uid()
        ));
    }
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "control socket {} has mode {mode:o}: other users can write to it, so refusing to take over through it (it is created 0600)",
            path.display()
        ));
    }
    Ok(())
}

/// Connects to the running server's control socket at `path` (after
/// [`check_path`]).
pub fn connect(path: &Path) -> Result<Conn, String> {
    check_path(path)?;
    let fd = seqpacket().map_err(|e| format!("control socket: {e}"))?;
    let addr =
        UnixAddr::new(path).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    socket::connect(fd.as_raw_fd(), &addr)
        .map_err(|e| format!("cannot reach the running server at {}: {e}", path.display()))?;
    let conn = Conn { fd };
    conn.set_timeout(FRAME_TIMEOUT)
        .map_err(|e| format!("control socket: {e}"))?;
    Ok(conn)
}

/// The listening control socket of a running server.
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Listener {
    /// Binds the control socket at `path`, mode 0600, owned by `owner`
    /// (uid, gid) when given; its directory is created (0755) if missing.
    /// A socket file left by a dead server is replaced; one a live server
    /// answers on is an error.
    pub fn bind(path: &Path, owner: Option<(u32, u32)>) -> Result<Listener, String> {
        let shown = path.display();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            if let Some((uid, gid)) = owner {
                let _ = std::os::unix::fs::chown(dir, Some(uid), Some(gid));
            }
        }
        if path.exists() {
            let probe = seqpacket().map_err(|e| format!("control socket: {e}"))?;
            let addr = UnixAddr::new(path).map_err(|e| format!("control socket {shown}: {e}"))?;
            if socket::connect(probe.as_raw_fd(), &addr).is_ok() {
                return Err(format!(
                    "control socket {shown}: another server is listening on it"
                ));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot replace {shown}: {e}"))?;
        }
        Self::bind_fresh(path, owner)
    }

    /// Binds at `path`, replacing whatever socket file is there (the
    /// successor, after the commit, takes the path over).
    pub fn take_over(path: &Path, owner: Option<(u32, u32)>) -> Result<Listener, String> {
        let _ = std::fs::remove_file(path);
        Self::bind_fresh(path, owner)
    }

    fn bind_fresh(path: &Path, owner: Option<(u32, u32)>) -> Result<Listener, String> {
        let shown = path.display();
        let fd = seqpacket().map_err(|e| format!("control socket: {e}"))?;
        let addr = UnixAddr::new(path).map_err(|e| format!("control socket {shown}: {e}"))?;
        // Created 0600 from the start: no window in which another user
        // could connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = socket::bind(fd.as_raw_fd(), &addr);
        nix::sys::stat::umask(old);
        bound.map_err(|e| format!("cannot bind control socket {shown}: {e}"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("cannot chown control socket {shown}: {e}"))?;
        }
        socket::listen(&fd, Backlog::new(4).expect("a valid backlog"))
            .map_err(|e| format!("cannot listen on control socket {shown}: {e}"))?;
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> std::io::Result<Conn> {
        let fd = socket::accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(io_err)?;
        // SAFETY: accept4 returned a new descriptor we own.
        let conn = Conn {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        conn.set_timeout(FRAME_TIMEOUT)?;
        Ok(conn)
    }

    /// Removes the socket file (at exit, when no successor took it).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_successor_that_cannot_read_our_format_is_refused() {
        assert_eq!(negotiate(&[1, 2]), Ok(1));
        let e = negotiate(&[2]).unwrap_err();
        assert!(e.contains("drain instead"), "{e}");
    }

    /// A state written in format 1 (tests/fixtures/takeover-state-v1.json,
    /// written by the first build with takeover) is still read: a newer
    /// build must take over from the oldest one in the field.
    #[test]
    fn format_1_state_is_read() {
        let bytes = include_bytes!("../../tests/fixtures/takeover-state-v1.json");
        let crc = crc32fast::hash(bytes);
        let s = State::decode(1, bytes, crc).unwrap();
        assert_eq!(s.workers.len(), 2);
        let r = &s.workers[0].relays[0];
        assert_eq!(r.allocation.username, "alice");
        assert_eq!(r.allocation.channels[0].number, 0x4001);
        s.check_fds(6).unwrap();
        assert!(s.check_fds(5).is_err());
        // A corrupt state and an unknown format are refused, not guessed.
        assert!(
            State::decode(1, bytes, crc ^ 1)
                .unwrap_err()
                .contains("corrupt")
        );
        assert!(
            State::decode(9, bytes, crc)
                .unwrap_err()
                .contains("format 9")
        );
    }

    #[test]
    fn state_and_descriptors_cross_a_socket_pair() {
        let (a, b) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (a, b) = (Conn { fd: a }, Conn { fd: b });
        let sockets: Vec<std::net::UdpSocket> = (0..300)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<OwnedFd> = sockets
            .iter()
            .map(|s| s.as_fd().try_clone_to_owned().unwrap())
            .collect();
        let mut state = State {
            version: "test".into(),
            nonce_secret: [7; 32],
            ticket_key: [9; 32],
            workers: vec![SavedWorker::default()],
            metrics: None,
            reservations: Vec::new(),
            offloaded: [0; 4],
        };
        for (i, s) in sockets.iter().enumerate() {
            state.workers[0].udp.push(SavedListener {
                addr: s.local_addr().unwrap(),
                fd: i as u32,
                proxy: false,
            });
        }
        // Larger than one chunk.
        state.version = "v".repeat(3 * CHUNK);
        let sender = std::thread::spawn(move || a.send_state(&state, &fds, FORMAT).map(|_| state));
        let header = b.recv().unwrap();
        let (got, fds) = b.recv_state(&header).unwrap();
        let state = sender.join().unwrap().unwrap();
        assert_eq!(got, state);
        assert_eq!(fds.len(), 300);
        for (l, fd) in got.workers[0].udp.iter().zip(&fds) {
            let s = std::net::UdpSocket::from(fd.try_clone().unwrap());
            assert_eq!(s.local_addr().unwrap(), l.addr);
        }
    }
}
