//! Batched datagram I/O for the UDP hot path: `recvmmsg(2)` fills many
//! buffers in one system call and `sendmmsg(2)` sends many datagrams in one.
//!
//! Buffers are allocated once per worker and reused for every packet; the
//! system call arguments (`mmsghdr`, `iovec`, addresses) live in fixed
//! arrays (set up once for receiving, filled right before each call for
//! sending), so nothing here allocates per packet.

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
    /// The slots' buffers, each `size` bytes, owned by the batch (from
    /// `Box<[u8]>`, freed on drop). Kept as raw pointers because the
    /// kernel writes through copies of them in `args`: every reference to
    /// a buffer is derived from these, for no longer than a `&self` or
    /// `&mut self` borrow.
    bufs: [*mut u8; BATCH],
    size: usize,
    headroom: usize,
    lens: [usize; BATCH],
    /// The `recvmmsg` arguments, one header per slot, pointing at the
    /// slot's buffer and address storage. Set up once: a call changes only
    /// the address lengths of the headers it fills, which are put back
    /// right after it. Boxed, like the buffers, so the pointers stay valid
    /// when the batch moves.
    args: Box<RecvArgs>,
}

/// What `recvmmsg` reads and writes, for every slot of a [`RecvBatch`].
struct RecvArgs {
    addrs: [libc::sockaddr_storage; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
}

/// Size of the address storage of a [`RecvBatch`] slot, bytes.
const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

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
        let size = headroom + capacity + tailroom;
        let bufs: [*mut u8; BATCH] =
            std::array::from_fn(|_| Box::into_raw(vec![0u8; size].into_boxed_slice()).cast::<u8>());
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs
        // for which all zero bytes (null pointers, zero lengths) are valid
        // values; the loop below points them at the buffers.
        let mut args: Box<RecvArgs> = Box::new(unsafe { std::mem::zeroed() });
        let RecvArgs { addrs, iovs, hdrs } = &mut *args;
        for i in 0..BATCH {
            iovs[i] = libc::iovec {
                // SAFETY: headroom <= size: within the buffer (or one past
                // its end when it has no room for data).
                iov_base: unsafe { bufs[i].add(headroom) }.cast(),
                iov_len: capacity,
            };
            set_header(
                &mut hdrs[i],
                (&mut addrs[i] as *mut libc::sockaddr_storage).cast(),
                ADDR_LEN,
                &mut iovs[i],
            );
        }
        RecvBatch {
            bufs,
            size,
            headroom,
            lens: [0; BATCH],
            args,
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
        let args = &mut *self.args;
        // SAFETY: hdrs[first..first + max] point at address storage and
        // iovecs in `args`, each iovec at a live buffer of `self.bufs` of
        // at least its length; all are heap allocations owned by self, and
        // `&mut self` means no reference to them lives during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                args.hdrs[first..].as_mut_ptr(),
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
        for i in first..first + n {
            let h = &mut args.hdrs[i];
            self.lens[i] = h.msg_len as usize;
            if h.msg_hdr.msg_namelen == 0 {
                // No source address: do not report the previous one.
                args.addrs[i].ss_family = 0;
            }
            h.msg_hdr.msg_namelen = ADDR_LEN;
        }
        Ok(n)
    }

    /// The payload range and source address of the datagram in slot `i`.
    pub fn datagram(&self, i: usize) -> (Range<usize>, Option<SocketAddr>) {
        (
            self.headroom..self.headroom + self.lens[i],
            socket_addr(&self.args.addrs[i]),
        )
    }

    /// Slot `i`'s whole buffer (headroom, datagram, tailroom).
    pub fn buf(&self, i: usize) -> &[u8] {
        // SAFETY: bufs[i] is a live allocation of `size` bytes owned by
        // self; the kernel writes to it only during `recv_with`, which
        // takes `&mut self`.
        unsafe { std::slice::from_raw_parts(self.bufs[i], self.size) }
    }

    /// Slot `i`'s whole buffer, for framing in place.
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: as in `buf`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.bufs[i], self.size) }
    }
}

impl Drop for RecvBatch {
    fn drop(&mut self) {
        for &b in &self.bufs {
            // SAFETY: each pointer came from Box::into_raw of a boxed slice
            // of `size` bytes and is freed once, here.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(b, self.size)) });
        }
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
            let bytes = &data.buf(q.slot)[q.range.clone()];
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

    /// The headers are set up once: a slot that took an IPv4 datagram (a
    /// 16-byte address) must take a whole IPv6 address (28 bytes) next.
    #[test]
    fn slots_are_reused_across_address_families() {
        let v4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let v6 = UdpSocket::bind("[::1]:0").unwrap();
        let from4 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from6 = UdpSocket::bind("[::1]:0").unwrap();
        v4.set_nonblocking(true).unwrap();
        v6.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(0, 1500, 0);
        for round in 0..3u8 {
            from4
                .send_to(&[round; 4], v4.local_addr().unwrap())
                .unwrap();
            from6
                .send_to(&[round; 6], v6.local_addr().unwrap())
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            for (sock, from, len) in [(&v4, &from4, 4), (&v6, &from6, 6)] {
                assert_eq!(batch.recv(sock.as_fd(), 0, BATCH).unwrap(), 1);
                let (r, addr) = batch.datagram(0);
                assert_eq!(r, 0..len);
                assert_eq!(&batch.buf(0)[r], &vec![round; len][..]);
                assert_eq!(addr, Some(from.local_addr().unwrap()), "round {round}");
            }
        }
    }
}
