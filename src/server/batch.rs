//! Batched datagram I/O for the UDP hot path: `recvmmsg(2)` fills many
//! buffers in one system call and `sendmmsg(2)` sends many datagrams in one.
//!
//! Buffers are allocated once per worker and reused for every packet; the
//! system call arguments (`mmsghdr`, `iovec`, addresses) live in fixed
//! arrays filled right before each call, so nothing here allocates per
//! packet.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::SockAddr;

/// Datagrams per `recvmmsg` / `sendmmsg` call.
pub const BATCH: usize = 32;

/// `BATCH` receive buffers and what the last [`RecvBatch::recv`] put in
/// them.
///
/// Slot `i` holds one datagram at `headroom..headroom + len`, with
/// `tailroom` spare bytes after the largest possible datagram, so the core
/// can frame it in place (ChannelData or a Data indication around it).
pub struct RecvBatch {
    bufs: Vec<Box<[u8]>>,
    headroom: usize,
    capacity: usize,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
}

/// Points one `mmsghdr` at an address and a single buffer, with no
/// control data.
fn set_header(
    h: &mut libc::mmsghdr,
    name: *mut libc::c_void,
    namelen: libc::socklen_t,
    iov: &mut libc::iovec,
) {
    h.msg_hdr.msg_name = name;
    h.msg_hdr.msg_namelen = namelen;
    h.msg_hdr.msg_iov = iov;
    h.msg_hdr.msg_iovlen = 1;
    h.msg_hdr.msg_control = std::ptr::null_mut();
    h.msg_hdr.msg_controllen = 0;
    h.msg_hdr.msg_flags = 0;
    h.msg_len = 0;
}

/// Reads an IPv4 or IPv6 socket address the kernel wrote.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which
            // is smaller than and aligned within sockaddr_storage.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                a.sin_addr.s_addr.to_ne_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

impl RecvBatch {
    /// Buffers for datagrams of up to `capacity` bytes each, with the given
    /// spare room before and after. Large buffers cost address space only:
    /// pages are touched as far as datagrams reach.
    pub fn new(headroom: usize, capacity: usize, tailroom: usize) -> Self {
        RecvBatch {
            bufs: (0..BATCH)
                .map(|_| vec![0u8; headroom + capacity + tailroom].into_boxed_slice())
                .collect(),
            headroom,
            capacity,
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C
            // structs for which all zero bytes (null pointers, zero lengths)
            // are valid values; they are filled in before every system call.
            addrs: unsafe { std::mem::zeroed() },
            iovs: unsafe { std::mem::zeroed() },
            hdrs: unsafe { std::mem::zeroed() },
        }
    }

    /// Receives up to `max` datagrams into slots `first..first + max`
    /// without blocking. Returns how many arrived (0 when none was waiting).
    /// Datagrams longer than the capacity are truncated.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, first: usize, max: usize) -> io::Result<usize> {
        self.recv_with(fd, first, max, libc::MSG_DONTWAIT)
    }

    /// Like [`RecvBatch::recv`] into slots `0..`, but on a blocking socket:
    /// waits for the first datagram, then takes whatever else is queued.
    pub fn recv_wait(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        self.recv_with(fd, 0, BATCH, libc::MSG_WAITFORONE)
    }

    fn recv_with(
        &mut self,
        fd: BorrowedFd<'_>,
        first: usize,
        max: usize,
        flags: libc::c_int,
    ) -> io::Result<usize> {
        let max = max.min(BATCH - first);
        if max == 0 {
            return Ok(0);
        }
        for k in 0..max {
            let i = first + k;
            self.iovs[k] = libc::iovec {
                iov_base: self.bufs[i][self.headroom..].as_mut_ptr().cast(),
                iov_len: self.capacity,
            };
            self.addrs[i].ss_family = 0;
            set_header(
                &mut self.hdrs[k],
                (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast(),
                std::mem::size_of::<libc::sockaddr_storage>() as u32,
                &mut self.iovs[k],
            );
        }
        // SAFETY: hdrs[..max] point at live iovecs and address storage owned
        // by self, each iovec at a live buffer of at least `capacity` bytes;
        // nothing else touches them during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                max as libc::c_uint,
                flags,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = n as usize;
        for k in 0..n {
            self.lens[first + k] = self.hdrs[k].msg_len as usize;
        }
        Ok(n)
    }

    /// The payload range and source address of the datagram in slot `i`.
    pub fn datagram(&self, i: usize) -> (Range<usize>, Option<SocketAddr>) {
        (
            self.headroom..self.headroom + self.lens[i],
            socket_addr(&self.addrs[i]),
        )
    }

    /// Slot `i`'s whole buffer (headroom, datagram, tailroom).
    pub fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i]
    }

    /// Slot `i`'s whole buffer, for framing in place.
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i]
    }
}

/// A datagram waiting in a [`SendQueue`]: a range of one [`RecvBatch`]
/// slot, its destination and the socket to send it from.
struct Queued {
    slot: usize,
    range: Range<usize>,
    to: SockAddr,
    socket: usize,
}

/// Datagrams framed in place in a [`RecvBatch`], sent together with
/// `sendmmsg` once the batch is full or the worker's round ends.
pub struct SendQueue {
    queued: Vec<Queued>,
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
}

impl Default for SendQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl SendQueue {
    pub fn new() -> Self {
        SendQueue {
            queued: Vec::with_capacity(BATCH),
            // SAFETY: as in RecvBatch::new.
            iovs: unsafe { std::mem::zeroed() },
            hdrs: unsafe { std::mem::zeroed() },
        }
    }

    /// Queues `range` of slot `slot` for `to`, to go out of socket number
    /// `socket` (an index the caller resolves at [`SendQueue::flush`]).
    pub fn push(&mut self, slot: usize, range: Range<usize>, to: SocketAddr, socket: usize) {
        debug_assert!(self.queued.len() < BATCH);
        self.queued.push(Queued {
            slot,
            range,
            to: to.into(),
            socket,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Sends everything queued, grouped by socket (`sockets(index)` gives
    /// the descriptor), and empties the queue. A datagram the kernel refuses
    /// (unreachable destination, full buffer) is dropped, as the network
    /// would drop it; the others still go out.
    pub fn flush<'a>(
        &mut self,
        data: &RecvBatch,
        sockets: impl Fn(usize) -> Option<BorrowedFd<'a>>,
    ) {
        let mut done = 0;
        while done < self.queued.len() {
            let socket = self.queued[done].socket;
            // The run of datagrams for the same socket (usually all of them).
            let mut end = done;
            while end < self.queued.len() && self.queued[end].socket == socket {
                end += 1;
            }
            if let Some(fd) = sockets(socket) {
                self.send_run(data, fd, done, end);
            }
            done = end;
        }
        self.queued.clear();
    }

    fn send_run(&mut self, data: &RecvBatch, fd: BorrowedFd<'_>, start: usize, end: usize) {
        let n = end - start;
        for k in 0..n {
            let q = &self.queued[start + k];
            let bytes = &data.bufs[q.slot][q.range.clone()];
            self.iovs[k] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            // The kernel only reads the address of a datagram it sends.
            set_header(
                &mut self.hdrs[k],
                q.to.as_ptr() as *mut libc::c_void,
                q.to.len(),
                &mut self.iovs[k],
            );
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: hdrs[sent..n] point at addresses in self.queued and
            // iovecs into `data`'s buffers, all alive and unchanged for the
            // duration of the call; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                sent += r as usize;
            } else if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                // The datagram at `sent` failed: drop it, send the rest.
                sent += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn receives_and_sends_in_batches() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(8, 1500, 4);
        assert_eq!(batch.recv(a.as_fd(), 0, BATCH).unwrap(), 0, "nothing yet");
        for i in 0..5u8 {
            b.send_to(&[i; 10], a.local_addr().unwrap()).unwrap();
        }
        c.send_to(b"from c", a.local_addr().unwrap()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        // A partial batch into slots 2.., then the rest.
        assert_eq!(batch.recv(a.as_fd(), 2, 3).unwrap(), 3);
        assert_eq!(batch.recv(a.as_fd(), 5, BATCH).unwrap(), 3);
        for i in 0..5 {
            let (r, from) = batch.datagram(2 + i);
            assert_eq!(r, 8..18);
            assert_eq!(&batch.buf(2 + i)[r], &[i as u8; 10]);
            assert_eq!(from, Some(b.local_addr().unwrap()));
        }
        let (r, from) = batch.datagram(7);
        assert_eq!(&batch.buf(7)[r], b"from c");
        assert_eq!(from, Some(c.local_addr().unwrap()));

        // Send slots back to b and c in one call, with an unroutable
        // destination in the middle that must not stop the others.
        let mut q = SendQueue::new();
        q.push(2, 8..18, b.local_addr().unwrap(), 0);
        q.push(3, 8..18, "0.0.0.0:0".parse().unwrap(), 0);
        q.push(7, 8..14, c.local_addr().unwrap(), 0);
        q.flush(&batch, |_| Some(a.as_fd()));
        assert!(q.is_empty());
        let mut buf = [0u8; 64];
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), 10);
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(c.recv(&mut buf).unwrap(), 6);
        assert_eq!(&buf[..6], b"from c");
    }
}
