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

/// Receive buffers per `recvmmsg` call.
pub const BATCH: usize = 32;

/// Datagrams a [`SendQueue`] holds: a received batch's worth and more, as
/// one receive buffer may hold many datagrams (UDP GRO).
pub const QUEUE: usize = 4 * BATCH;

/// Most datagrams the kernel coalesces into one receive (UDP GRO) or
/// splits one GSO send into (its `UDP_MAX_SEGMENTS`).
pub const MAX_SEGMENTS: usize = 64;

/// Room for one `UDP_SEGMENT` or `UDP_GRO` control message (a `u16` or an
/// `int`), in `u64`s so it is aligned for `cmsghdr`.
const CTRL_WORDS: usize = 4;

/// `BATCH` receive buffers and what the last [`RecvBatch::recv`] put in
/// them.
///
/// Slot `i` holds the datagrams of one receive: one, or on a socket with
/// `UDP_GRO` on, a run from one source that the kernel coalesced (all of
/// one size but the last). Each datagram has `headroom` spare bytes before
/// it and `tailroom` after, so the core can frame it in place (ChannelData
/// or a Data indication around it): a coalesced run is spread out in the
/// buffer as it arrives. [`RecvBatch::datagrams`] gives their ranges.
pub struct RecvBatch {
    /// The slots' buffers, each `size` bytes, owned by the batch (from
    /// `Box<[u8]>`, freed on drop). Kept as raw pointers because the
    /// kernel writes through copies of them in `args`: every reference to
    /// a buffer is derived from these, for no longer than a `&self` or
    /// `&mut self` borrow.
    bufs: [*mut u8; BATCH],
    size: usize,
    headroom: usize,
    tailroom: usize,
    /// What slot `i` holds.
    held: [Datagrams; BATCH],
    /// The `recvmmsg` arguments, one header per slot, pointing at the
    /// slot's buffer, address storage and control buffer. Set up once: a
    /// call changes only the address and control lengths of the headers it
    /// fills, which are put back right after it. Boxed, like the buffers,
    /// so the pointers stay valid when the batch moves.
    args: Box<RecvArgs>,
}

/// What `recvmmsg` reads and writes, for every slot of a [`RecvBatch`].
struct RecvArgs {
    addrs: [libc::sockaddr_storage; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    ctrl: [[u64; CTRL_WORDS]; BATCH],
}

/// Size of the control buffer of a [`RecvBatch`] slot, bytes.
const CTRL_LEN: usize = CTRL_WORDS * 8;

/// The datagrams in one [`RecvBatch`] slot, as an iterator over their
/// ranges in the slot's buffer: `count` datagrams of `segment` bytes each
/// (the last has the rest of `len` bytes in all), `stride` bytes apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Datagrams {
    first: usize,
    stride: usize,
    segment: usize,
    len: usize,
    count: usize,
}

impl Iterator for Datagrams {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.count == 0 {
            return None;
        }
        let n = self.len.min(self.segment);
        let r = self.first..self.first + n;
        self.first += self.stride;
        self.len -= n;
        self.count -= 1;
        Some(r)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.count, Some(self.count))
    }
}

impl ExactSizeIterator for Datagrams {}

/// Size of the address storage of a [`RecvBatch`] slot, bytes.
const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// Points one `mmsghdr` at an address and a single buffer, with no
/// control data.
fn set_header(
    h: &mut libc::mmsghdr,
    name: *mut libc::c_void,
    namelen: libc::socklen_t,
    iov: *mut libc::iovec,
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
    /// Buffers for receives of up to `capacity` bytes each (a datagram, or
    /// a coalesced run of them), with `headroom` and `tailroom` spare bytes
    /// around every datagram. Large buffers cost address space only: pages
    /// are touched as far as datagrams reach.
    pub fn new(headroom: usize, capacity: usize, tailroom: usize) -> Self {
        // A run of MAX_SEGMENTS datagrams spread out needs the room around
        // each of them.
        let size = headroom + capacity + tailroom + (MAX_SEGMENTS - 1) * (headroom + tailroom);
        let bufs: [*mut u8; BATCH] =
            std::array::from_fn(|_| Box::into_raw(vec![0u8; size].into_boxed_slice()).cast::<u8>());
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs
        // for which all zero bytes (null pointers, zero lengths) are valid
        // values; the loop below points them at the buffers.
        let mut args: Box<RecvArgs> = Box::new(unsafe { std::mem::zeroed() });
        let RecvArgs {
            addrs,
            iovs,
            hdrs,
            ctrl,
        } = &mut *args;
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
            hdrs[i].msg_hdr.msg_control = ctrl[i].as_mut_ptr().cast();
            hdrs[i].msg_hdr.msg_controllen = CTRL_LEN;
        }
        RecvBatch {
            bufs,
            size,
            headroom,
            tailroom,
            held: [Datagrams::default(); BATCH],
            args,
        }
    }

    /// Receives into up to `max` slots `first..first + max` without
    /// blocking. Returns how many slots were filled (0 when nothing was
    /// waiting). Datagrams longer than the capacity are truncated.
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
        // SAFETY: hdrs[first..first + max] point at address storage,
        // control buffers and iovecs in `args`, each iovec at a live buffer
        // of `self.bufs` of at least its length; all are heap allocations
        // owned by self, and `&mut self` means no reference to them lives
        // during the call.
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
            let h = &mut self.args.hdrs[i];
            let len = h.msg_len as usize;
            let segment = gro_segment(&h.msg_hdr).filter(|&s| s > 0 && s < len);
            if h.msg_hdr.msg_namelen == 0 {
                // No source address: do not report the previous one.
                self.args.addrs[i].ss_family = 0;
            }
            h.msg_hdr.msg_namelen = ADDR_LEN;
            h.msg_hdr.msg_controllen = CTRL_LEN;
            h.msg_hdr.msg_flags = 0;
            self.held[i] = match segment {
                None => Datagrams {
                    first: self.headroom,
                    stride: 0,
                    segment: len,
                    len,
                    count: 1,
                },
                Some(segment) => self.spread(i, len, segment),
            };
        }
        Ok(n)
    }

    /// Lays the coalesced run of `len` bytes in slot `i` (datagrams of
    /// `segment` bytes, the last maybe shorter) out with the headroom and
    /// tailroom around each datagram, and returns where they are. A run
    /// that would not fit (more than [`MAX_SEGMENTS`] datagrams) is
    /// dropped: no datagrams.
    fn spread(&mut self, i: usize, len: usize, segment: usize) -> Datagrams {
        let count = len.div_ceil(segment);
        let stride = segment + self.headroom + self.tailroom;
        let last = len - (count - 1) * segment;
        let held = Datagrams {
            first: self.headroom,
            stride,
            segment,
            len,
            count,
        };
        if self.headroom + self.tailroom == 0 {
            return held;
        }
        if count > MAX_SEGMENTS
            || self.headroom + (count - 1) * stride + last + self.tailroom > self.size
        {
            return Datagrams::default();
        }
        let (headroom, buf) = (self.headroom, self.buf_mut(i));
        // From the last datagram back, so none is overwritten before it moved.
        for k in (1..count).rev() {
            let from = headroom + k * segment;
            let n = segment.min(len - k * segment);
            buf.copy_within(from..from + n, headroom + k * stride);
        }
        held
    }

    /// The datagrams in slot `i`, as ranges of [`RecvBatch::buf`], and the
    /// address they came from.
    pub fn datagrams(&self, i: usize) -> (Datagrams, Option<SocketAddr>) {
        (self.held[i], socket_addr(&self.args.addrs[i]))
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

/// The datagram size of a receive the kernel coalesced (the `UDP_GRO`
/// control message), if `hdr` carries one.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    if hdr.msg_controllen == 0 {
        return None;
    }
    // SAFETY: the kernel filled msg_controllen bytes of the control buffer
    // with well-formed control messages; CMSG_FIRSTHDR / CMSG_NXTHDR stay
    // within them and return null past the end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    None
}

/// A datagram waiting in a [`SendQueue`]: a range of one [`RecvBatch`]
/// slot, its destination and the socket to send it from.
struct Queued {
    slot: usize,
    range: Range<usize>,
    to: SockAddr,
    socket: usize,
}

/// Most bytes one UDP GSO send may carry: the largest UDP payload over IPv4
/// (65535 minus the 20-byte IP and 8-byte UDP headers), which fits IPv6 too.
const MAX_GSO_BYTES: usize = 65507;

/// One `sendmmsg` header's share of the queue: `count` datagrams from
/// iovec `first`.
#[derive(Clone, Copy, Default)]
struct Run {
    first: usize,
    count: usize,
}

/// Datagrams in the buffers of a [`RecvBatch`] (peer data framed in place
/// for clients, or ChannelData payloads for peers), sent together with
/// `sendmmsg` once the batch is full or the worker's round ends.
///
/// Consecutive datagrams out of one socket for the same destination (one
/// relay socket's batch from a video sender, or one client's burst to its
/// peer) leave as one UDP GSO send
/// (`UDP_SEGMENT`, Linux 4.18): the kernel builds and routes one packet and
/// splits it late, and the receiver still gets each datagram on its own.
/// They qualify when all but the last have the same size. A GSO send the
/// kernel refuses goes out again one datagram at a time, and a device that
/// cannot segment (`EIO`) turns GSO off for the queue.
pub struct SendQueue {
    queued: Vec<Queued>,
    gso: bool,
    runs: [Run; QUEUE],
    iovs: [libc::iovec; QUEUE],
    hdrs: [libc::mmsghdr; QUEUE],
    ctrl: [[u64; CTRL_WORDS]; QUEUE],
}

impl Default for SendQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl SendQueue {
    pub fn new() -> Self {
        SendQueue {
            queued: Vec::with_capacity(QUEUE),
            gso: true,
            runs: [Run::default(); QUEUE],
            // SAFETY: as in RecvBatch::new.
            iovs: unsafe { std::mem::zeroed() },
            hdrs: unsafe { std::mem::zeroed() },
            ctrl: [[0; CTRL_WORDS]; QUEUE],
        }
    }

    /// A queue that never uses UDP GSO: one datagram per `sendmmsg` header.
    pub fn without_gso() -> Self {
        SendQueue {
            gso: false,
            ..Self::new()
        }
    }

    /// Whether consecutive datagrams to one destination still leave as one
    /// GSO send (false once a device refused it).
    pub fn gso(&self) -> bool {
        self.gso
    }

    /// Queues `range` of slot `slot` for `to`, to go out of socket number
    /// `socket` (an index the caller resolves at [`SendQueue::flush`]).
    /// The queue must not be full ([`SendQueue::is_full`]).
    pub fn push(&mut self, slot: usize, range: Range<usize>, to: SocketAddr, socket: usize) {
        debug_assert!(self.queued.len() < QUEUE);
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

    /// Whether [`QUEUE`] datagrams wait: flush before pushing more.
    pub fn is_full(&self) -> bool {
        self.queued.len() == QUEUE
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

    /// Whether datagram `k` may join a GSO run of `count` datagrams from
    /// `first` of `segment` bytes each, `bytes` in all.
    fn joins(&self, k: usize, first: usize, count: usize, segment: usize, bytes: usize) -> bool {
        let (q, head) = (&self.queued[k], &self.queued[first]);
        let last = &self.queued[k - 1];
        let len = q.range.len();
        self.gso
            && count < MAX_SEGMENTS
            && bytes + len <= MAX_GSO_BYTES
            && last.range.len() == segment
            && len <= segment
            && len > 0
            && q.to == head.to
    }

    /// Sends datagrams `start..end` of the queue out of `fd`.
    fn send_run(&mut self, data: &RecvBatch, fd: BorrowedFd<'_>, start: usize, end: usize) {
        for k in start..end {
            let q = &self.queued[k];
            let bytes = &data.buf(q.slot)[q.range.clone()];
            self.iovs[k - start] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
        }
        // Group the datagrams into runs, one sendmmsg header each.
        let mut runs = 0;
        let mut k = start;
        while k < end {
            let segment = self.queued[k].range.len();
            let (mut count, mut bytes) = (1, segment);
            while k + count < end && self.joins(k + count, k, count, segment, bytes) {
                bytes += self.queued[k + count].range.len();
                count += 1;
            }
            self.runs[runs] = Run {
                first: k - start,
                count,
            };
            let q = &self.queued[k];
            // The kernel only reads the address of a datagram it sends.
            set_header(
                &mut self.hdrs[runs],
                q.to.as_ptr() as *mut libc::c_void,
                q.to.len(),
                &mut self.iovs[k - start],
            );
            if count > 1 {
                self.hdrs[runs].msg_hdr.msg_iovlen = count;
                self.set_segment(runs, segment);
            }
            runs += 1;
            k += count;
        }
        let mut sent = 0;
        while sent < runs {
            // SAFETY: hdrs[sent..runs] point at addresses in self.queued,
            // iovecs in self.iovs into `data`'s buffers and control data in
            // self.ctrl, all alive and unchanged for the duration of the
            // call; the kernel only reads them.
            let r = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs[sent..].as_mut_ptr(),
                    (runs - sent) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                sent += r as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The header at `sent` failed. One datagram is dropped; a GSO
            // run goes out again one datagram at a time.
            let run = self.runs[sent];
            if run.count > 1 {
                if err.raw_os_error() == Some(libc::EIO) && self.gso {
                    self.gso = false;
                    tracing::warn!(
                        "UDP GSO refused by the network device ({err}); sending datagrams one by one"
                    );
                }
                self.send_each(fd, sent, run);
            }
            sent += 1;
        }
    }

    /// Puts a `UDP_SEGMENT` control message of `segment` bytes on header
    /// `h`.
    fn set_segment(&mut self, h: usize, segment: usize) {
        let ctrl = &mut self.ctrl[h];
        let hdr = &mut self.hdrs[h].msg_hdr;
        hdr.msg_control = ctrl.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
        // SAFETY: the control buffer is CTRL_WORDS * 8 = 32 bytes, aligned
        // for cmsghdr, and CMSG_SPACE(2) (24 bytes) fits in it, so
        // CMSG_FIRSTHDR is non-null and its data has room for a u16.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(hdr);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment as u16);
        }
    }

    /// Sends the datagrams of `run` (header `h`, refused as one GSO send)
    /// one `sendmsg` each, dropping those the kernel refuses.
    fn send_each(&mut self, fd: BorrowedFd<'_>, h: usize, run: Run) {
        let hdr = self.hdrs[h].msg_hdr;
        for i in run.first..run.first + run.count {
            let mut one = hdr;
            one.msg_iov = &mut self.iovs[i];
            one.msg_iovlen = 1;
            one.msg_control = std::ptr::null_mut();
            one.msg_controllen = 0;
            // SAFETY: as in send_run, for one datagram.
            unsafe { libc::sendmsg(fd.as_raw_fd(), &one, libc::MSG_DONTWAIT) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    /// The one datagram in slot `i` and its source.
    fn one(batch: &RecvBatch, i: usize) -> (Range<usize>, Option<SocketAddr>) {
        let (mut d, from) = batch.datagrams(i);
        assert_eq!(d.len(), 1, "slot {i}: {d:?}");
        (d.next().unwrap(), from)
    }

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
            let (r, from) = one(&batch, 2 + i);
            assert_eq!(r, 8..18);
            assert_eq!(&batch.buf(2 + i)[r], &[i as u8; 10]);
            assert_eq!(from, Some(b.local_addr().unwrap()));
        }
        let (r, from) = one(&batch, 7);
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

    /// A batch on a socket of its own holding `sizes.len()` datagrams, the
    /// i-th `sizes[i]` bytes of the value `i`, and the socket.
    fn filled(sizes: &[usize]) -> (RecvBatch, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&a)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.set_nonblocking(true).unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            from.send_to(&vec![i as u8; n], a.local_addr().unwrap())
                .unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut batch = RecvBatch::new(0, 65536, 0);
        assert_eq!(batch.recv(a.as_fd(), 0, BATCH).unwrap(), sizes.len());
        (batch, a)
    }

    /// Queues slot `i` of `batch` to `to[i]` for every `i`, flushes out of
    /// `out`, and returns what each receiver (in order of first mention)
    /// read, one entry per read.
    fn relay(
        q: &mut SendQueue,
        batch: &RecvBatch,
        to: &[&UdpSocket],
        out: &UdpSocket,
    ) -> Vec<Vec<Vec<u8>>> {
        for (i, dest) in to.iter().enumerate() {
            let (r, _) = one(batch, i);
            q.push(i, r, dest.local_addr().unwrap(), 0);
        }
        q.flush(batch, |_| Some(out.as_fd()));
        let mut receivers: Vec<&UdpSocket> = Vec::new();
        for r in to {
            if !receivers.iter().any(|s| std::ptr::eq(*s, *r)) {
                receivers.push(r);
            }
        }
        receivers
            .iter()
            .map(|r| {
                r.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 65536];
                while let Ok(n) = r.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
                got
            })
            .collect()
    }

    fn enable_gro(s: &UdpSocket) {
        nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::UdpGroSegment, &true)
            .expect("UDP_GRO");
    }

    /// Equal-size datagrams for one destination, then a shorter one, leave
    /// as one GSO send: a receiver with UDP_GRO on reads them as one
    /// buffer (loopback keeps the GSO packet whole up to the socket).
    /// A receiver without it reads each datagram on its own, in order.
    #[test]
    fn runs_to_one_destination_leave_as_one_gso_send() {
        let sizes = [100, 100, 100, 100, 37, 100, 100];
        let (batch, out) = filled(&sizes);
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(&b);
        let mut q = SendQueue::new();
        // Five to b (the fifth is shorter: it ends the run), one to c, one
        // to b again.
        let got = relay(&mut q, &batch, &[&b, &b, &b, &b, &b, &c, &b], &out);
        let sent = |i: usize| vec![i as u8; sizes[i]];
        let joined: Vec<u8> = (0..5).flat_map(sent).collect();
        assert_eq!(got[0], vec![joined, [sent(6)].concat()]);
        assert_eq!(got[1], vec![sent(5)]);
        assert!(q.gso());

        // The same datagrams to a receiver without UDP_GRO: one each.
        let (batch, out) = filled(&sizes);
        let d = UdpSocket::bind("127.0.0.1:0").unwrap();
        let got = relay(&mut q, &batch, &[&d; 7], &out);
        assert_eq!(got[0], (0..7).map(sent).collect::<Vec<_>>());
    }

    /// A GSO send carries at most 65,507 bytes: a third 30,000-byte datagram
    /// starts a send of its own.
    #[test]
    fn gso_sends_stay_within_the_largest_udp_payload() {
        let sizes = [30_000, 30_000, 30_000];
        let (batch, out) = filled(&sizes);
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(&b);
        let mut q = SendQueue::new();
        let got = relay(&mut q, &batch, &[&b; 3], &out);
        let sent = |i: usize| vec![i as u8; sizes[i]];
        assert_eq!(got[0], vec![[sent(0), sent(1)].concat(), sent(2)]);
    }

    /// A GSO send the kernel refuses (here: UDP checksums turned off on
    /// the socket, which GSO needs) goes out one datagram at a time.
    #[test]
    fn refused_gso_sends_go_out_one_by_one() {
        let sizes = [60, 60, 60, 20];
        let (batch, out) = filled(&sizes);
        let off: libc::c_int = 1;
        // SAFETY: a valid descriptor and a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                out.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                (&off as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        enable_gro(&b);
        let mut q = SendQueue::new();
        let got = relay(&mut q, &batch, &[&b; 4], &out);
        let expect: Vec<Vec<u8>> = (0..4).map(|i| vec![i as u8; sizes[i]]).collect();
        assert_eq!(got[0], expect);
        // Not EIO: the device can segment, so GSO stays on.
        assert!(q.gso());
        // Without GSO, the same one by one.
        let (batch, out) = filled(&sizes);
        let mut q = SendQueue::without_gso();
        let got = relay(&mut q, &batch, &[&b; 4], &out);
        assert_eq!(got[0], expect);
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
                let (r, addr) = one(&batch, 0);
                assert_eq!(r, 0..len);
                assert_eq!(&batch.buf(0)[r], &vec![round; len][..]);
                assert_eq!(addr, Some(from.local_addr().unwrap()), "round {round}");
            }
        }
    }

    /// Datagrams of `sizes` bytes (the i-th filled with `i`) sent as one GSO
    /// send to a new socket with UDP_GRO on; that socket, and the one they
    /// came from.
    fn coalesced(sizes: &[usize]) -> (UdpSocket, UdpSocket) {
        let (batch, out) = filled(sizes);
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        enable_gro(&rx);
        let mut q = SendQueue::new();
        for i in 0..sizes.len() {
            let (r, _) = one(&batch, i);
            q.push(i, r, rx.local_addr().unwrap(), 0);
        }
        q.flush(&batch, |_| Some(out.as_fd()));
        (rx, out)
    }

    /// A GSO send into a socket with UDP_GRO on arrives as one receive;
    /// the batch splits it into its datagrams again, spread out with the
    /// headroom and tailroom around each, whatever they held before.
    #[test]
    fn coalesced_receives_are_split_into_datagrams() {
        let sizes = [100, 100, 100, 100, 100, 37];
        for (headroom, tailroom) in [(0, 0), (48, 12)] {
            let (rx, out) = coalesced(&sizes);
            // Then one datagram on its own.
            out.send_to(b"single", rx.local_addr().unwrap()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));

            let mut batch = RecvBatch::new(headroom, 65536, tailroom);
            assert_eq!(batch.recv(rx.as_fd(), 3, BATCH).unwrap(), 2);
            let (d, from) = batch.datagrams(3);
            assert_eq!(from, Some(out.local_addr().unwrap()));
            let ranges: Vec<Range<usize>> = d.collect();
            let stride = 100 + headroom + tailroom;
            let expect: Vec<Range<usize>> = (0..sizes.len())
                .map(|k| headroom + k * stride..headroom + k * stride + sizes[k])
                .collect();
            assert_eq!(ranges, expect, "headroom {headroom}");
            for (k, r) in ranges.into_iter().enumerate() {
                // `filled` numbers its datagrams from 0.
                assert_eq!(batch.buf(3)[r], vec![k as u8; sizes[k]][..]);
            }
            let (r, _) = one(&batch, 4);
            assert_eq!(&batch.buf(4)[r], b"single");
        }
    }

    /// Framing in place around each datagram of a split run leaves the
    /// others whole: the room before and after each is its own.
    #[test]
    fn split_datagrams_can_be_framed_in_place() {
        let (rx, _out) = coalesced(&[64; 8]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (h, t) = (
            crate::stun::channel::HEADROOM,
            crate::stun::channel::TAILROOM,
        );
        let mut batch = RecvBatch::new(h, 65536, t);
        assert_eq!(batch.recv(rx.as_fd(), 0, BATCH).unwrap(), 1);
        let (d, _) = batch.datagrams(0);
        assert_eq!(d.len(), 8);
        for r in d {
            let buf = batch.buf_mut(0);
            buf[r.start - h..r.start].fill(0xee);
            buf[r.end..r.end + t].fill(0xff);
        }
        for (k, r) in d.enumerate() {
            assert_eq!(batch.buf(0)[r.clone()], [k as u8; 64]);
            assert!(
                batch.buf(0)[r.start - h..r.start]
                    .iter()
                    .all(|&b| b == 0xee)
            );
            assert!(batch.buf(0)[r.end..r.end + t].iter().all(|&b| b == 0xff));
        }
    }
}
