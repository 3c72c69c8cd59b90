//! UDP steering: at light load, every client datagram goes to worker 0.
//!
//! Each worker has its own SO_REUSEPORT UDP listener, and the kernel spreads
//! clients across them by a hash of the 5-tuple. That is what lets several
//! cores share heavy traffic, but at light load it costs: each worker finds
//! half the packets, so it goes to sleep and wakes up twice as often, and
//! two workers cost up to 70 % more CPU per packet than one (BENCHMARKS.md).
//!
//! So while the load is light, a one-instruction classic BPF program on each
//! listener's reuseport group (`SO_ATTACH_REUSEPORT_CBPF`, returning socket
//! 0 of the group, which is worker 0's: it binds first) sends every client
//! datagram to worker 0; when worker 0 gets busy, the program is detached
//! (`SO_DETACH_REUSEPORT_BPF`) and the kernel's hash applies again. An
//! allocation follows its client's datagrams: the worker they now reach
//! pulls it, with its relay socket, from the worker that has it (see the
//! worker's `Mail::Pull`).
//!
//! [`Controller`] decides when, from CPU time; it does no I/O.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// Steers every datagram of the reuseport group of `fd` to its socket 0.
///
/// Errors: what `setsockopt(SO_ATTACH_REUSEPORT_CBPF)` returns (Linux 4.5).
pub fn attach(fd: BorrowedFd<'_>) -> io::Result<()> {
    // BPF_RET | BPF_K with k = 0: "socket 0".
    let mut program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: a valid descriptor and a sock_fprog pointing at a live
    // one-instruction program; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Gives the reuseport group of `fd` back to the kernel's hash. Detaching
/// when nothing is attached is not an error.
///
/// Errors: what `setsockopt(SO_DETACH_REUSEPORT_BPF)` returns (Linux 5.3).
pub fn detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let zero: libc::c_int = 0;
    // SAFETY: a valid descriptor and a c_int option value (ignored).
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_REUSEPORT_BPF,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match r {
        0 => Ok(()),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            e => Err(e),
        },
    }
}

/// Worker 0's CPU use, as a fraction of one core over one tick, above which
/// steering stops: the traffic needs more than one worker soon.
pub const SPREAD_ABOVE: f64 = 0.6;
/// All workers' CPU use together, as a fraction of one core, below which
/// (for [`STEER_AFTER`]) steering starts again.
pub const STEER_BELOW: f64 = 0.35;
/// How long the load must stay below [`STEER_BELOW`] before steering.
pub const STEER_AFTER: Duration = Duration::from_secs(10);
/// How often the controller looks at worker 0's CPU time.
pub const TICK: Duration = Duration::from_millis(100);

/// Decides when to steer, from CPU time (sans-IO: the caller measures and
/// applies). Steering starts on: at start the server is idle.
#[derive(Debug)]
pub struct Controller {
    steering: bool,
    /// Since when the total load has been below [`STEER_BELOW`].
    low_since: Option<Instant>,
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

impl Controller {
    pub fn new() -> Self {
        Controller {
            steering: true,
            low_since: None,
        }
    }

    /// Whether datagrams are currently steered to worker 0.
    pub fn steering(&self) -> bool {
        self.steering
    }

    /// Takes one tick's measurements at `now`: `first` is worker 0's CPU use
    /// over the last tick and `total` all workers' over the last second or
    /// so, each in cores (1.0 = one core busy). Returns the new state when it
    /// changes: `Some(false)` to spread, `Some(true)` to steer.
    pub fn tick(&mut self, now: Instant, first: f64, total: f64) -> Option<bool> {
        if self.steering {
            if first > SPREAD_ABOVE {
                self.steering = false;
                self.low_since = None;
                return Some(false);
            }
            return None;
        }
        if total >= STEER_BELOW {
            self.low_since = None;
            return None;
        }
        let since = *self.low_since.get_or_insert(now);
        if now.duration_since(since) >= STEER_AFTER {
            self.steering = true;
            self.low_since = None;
            return Some(true);
        }
        None
    }

    /// Starts over in the steering state (a reload switched steering back
    /// on).
    pub fn reset(&mut self) {
        *self = Controller::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn spreads_fast_and_steers_again_only_after_a_quiet_while() {
        let t0 = Instant::now();
        let mut c = Controller::new();
        assert!(c.steering());
        assert_eq!(c.tick(t0, 0.3, 0.3), None);
        // One busy tick on worker 0 spreads at once.
        assert_eq!(c.tick(t0 + TICK, 0.7, 0.5), Some(false));
        assert!(!c.steering());
        // Light load must last STEER_AFTER; a busy moment restarts the wait.
        let mut t = t0 + TICK * 2;
        assert_eq!(c.tick(t, 0.1, 0.2), None);
        t += STEER_AFTER / 2;
        assert_eq!(c.tick(t, 0.1, 0.5), None);
        t += TICK;
        assert_eq!(c.tick(t, 0.1, 0.2), None);
        assert_eq!(c.tick(t + STEER_AFTER - TICK, 0.1, 0.2), None);
        assert_eq!(c.tick(t + STEER_AFTER, 0.1, 0.2), Some(true));
        assert!(c.steering());
        c.tick(t + STEER_AFTER + TICK, 0.9, 0.9);
        c.reset();
        assert!(c.steering());
    }

    /// Attached, every datagram to the group reaches socket 0, whatever its
    /// source; detached, the kernel's hash spreads sources again.
    #[test]
    fn the_program_sends_everything_to_socket_zero() {
        let bind = || {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s
        };
        let first = bind();
        first
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind();
        second.bind(&addr).unwrap();
        let (first, second): (UdpSocket, UdpSocket) = (first.into(), second.into());
        first.set_nonblocking(true).unwrap();
        second.set_nonblocking(true).unwrap();
        let to = addr.as_socket().unwrap();
        let count = |s: &UdpSocket| {
            let mut n = 0;
            let mut buf = [0u8; 16];
            while s.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        };
        let send_from_many = || {
            let senders: Vec<UdpSocket> = (0..32)
                .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
                .collect();
            for s in &senders {
                s.send_to(b"x", to).unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        attach(second.as_fd()).unwrap();
        send_from_many();
        assert_eq!((count(&first), count(&second)), (32, 0));
        detach(first.as_fd()).unwrap();
        detach(first.as_fd()).unwrap();
        send_from_many();
        let (a, b) = (count(&first), count(&second));
        assert_eq!(a + b, 32);
        assert!(a > 0 && b > 0, "the hash spreads 32 sources: {a} and {b}");
    }
}
