//! Relay sockets: binding them in the port range, and EVEN-PORT
//! reservations shared by every worker.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use super::net;
use super::ports::{PortPool, Want};
use crate::turn::{
    AllocationId, OpenedRelay, PortRequest, RESERVATION_LIFETIME, RelayError, RelayProvider,
    RelayRequest,
};

/// Bind attempts per Allocate before answering 508 when other programs hold
/// the ports the pool offers.
const BIND_ATTEMPTS: usize = 16;

struct Reserved {
    socket: std::net::UdpSocket,
    expires: Instant,
}

/// Sockets held for RESERVATION-TOKENs (EVEN-PORT with the R bit), shared by
/// all workers: the Allocate that claims one may arrive at any worker.
#[derive(Default)]
pub struct Reservations {
    map: Mutex<HashMap<[u8; 8], Reserved>>,
}

impl Reservations {
    fn insert(&self, socket: std::net::UdpSocket, now: Instant) -> [u8; 8] {
        let mut map = self.map.lock().expect("reservations lock");
        loop {
            let token: [u8; 8] = rand::random();
            if let std::collections::hash_map::Entry::Vacant(slot) = map.entry(token) {
                slot.insert(Reserved {
                    socket,
                    expires: now + Duration::from_secs(RESERVATION_LIFETIME),
                });
                return token;
            }
        }
    }

    fn claim(&self, token: &[u8; 8], now: Instant) -> Option<std::net::UdpSocket> {
        let mut map = self.map.lock().expect("reservations lock");
        match map.remove(token) {
            Some(r) if r.expires > now => Some(r.socket),
            Some(r) => {
                map.insert(*token, r);
                None
            }
            None => None,
        }
    }

    /// Closes reservations older than [`RESERVATION_LIFETIME`] and returns
    /// their ports to `pool`.
    pub fn sweep(&self, now: Instant, pool: &PortPool) {
        let mut map = self.map.lock().expect("reservations lock");
        map.retain(|_, r| {
            if r.expires > now {
                return true;
            }
            if let Ok(a) = r.socket.local_addr() {
                pool.release(a.port());
            }
            false
        });
    }

    /// Copies of the reserved sockets with their tokens and the time they
    /// have left at `now`, for a successor process.
    pub fn copies(&self, now: Instant) -> Vec<([u8; 8], Duration, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd;
        let map = self.map.lock().expect("reservations lock");
        map.iter()
            .filter_map(|(token, r)| {
                let fd = r.socket.as_fd().try_clone_to_owned().ok()?;
                Some((*token, r.expires.saturating_duration_since(now), fd))
            })
            .collect()
    }

    /// Holds `socket` for `token` until `expires` (a reservation handed
    /// over by a predecessor process).
    pub fn adopt(&self, token: [u8; 8], socket: std::net::UdpSocket, expires: Instant) {
        let mut map = self.map.lock().expect("reservations lock");
        map.insert(token, Reserved { socket, expires });
    }

    /// Number of reservations held.
    pub fn len(&self) -> usize {
        self.map.lock().expect("reservations lock").len()
    }

    /// Whether no reservation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A relay socket opened for an allocation, waiting to be registered with
/// the worker's event loop.
pub struct Opened {
    pub id: AllocationId,
    pub socket: std::net::UdpSocket,
    pub addr: SocketAddr,
}

/// The [`RelayProvider`] a worker hands to the core for one call.
pub struct Opener<'a> {
    pub pool: &'a PortPool,
    pub reservations: &'a Reservations,
    pub device: Option<&'a str>,
    /// Socket buffer size for relay sockets (`sock-buf-size`), bytes.
    pub buffer: Option<usize>,
    /// Whether relay sockets get UDP GRO (off with `no-udp-gro`).
    pub gro: bool,
    pub now: Instant,
    /// Sockets opened during the call.
    pub opened: &'a mut Vec<Opened>,
    /// TCP relay listeners opened during the call (RFC 6062).
    pub tcp_opened: &'a mut Vec<OpenedTcp>,
}

/// A TCP relay's listening socket, opened for allocation `id`.
pub struct OpenedTcp {
    pub id: AllocationId,
    pub listener: std::net::TcpListener,
    pub addr: SocketAddr,
}

impl Opener<'_> {
    fn bind(&self, ip: IpAddr, port: u16, df: bool) -> io::Result<std::net::UdpSocket> {
        net::relay_socket(
            SocketAddr::new(ip, port),
            self.device,
            df,
            self.buffer,
            self.gro,
        )
    }

    fn bind_from_pool(
        &self,
        ip: IpAddr,
        want: Want,
        df: bool,
    ) -> Result<(std::net::UdpSocket, Option<std::net::UdpSocket>), RelayError> {
        for _ in 0..BIND_ATTEMPTS {
            let port = self.pool.take(want).ok_or(RelayError::NoPortAvailable)?;
            let release = |pool: &PortPool| {
                pool.release(port);
                if want == Want::EvenPair {
                    pool.release(port + 1);
                }
            };
            let first = match self.bind(ip, port, df) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    release(self.pool);
                    continue;
                }
                Err(e) => {
                    release(self.pool);
                    warn!("cannot bind relay socket {ip}:{port}: {e}");
                    return Err(RelayError::NoPortAvailable);
                }
            };
            if want != Want::EvenPair {
                return Ok((first, None));
            }
            match self.bind(ip, port + 1, df) {
                Ok(second) => return Ok((first, Some(second))),
                Err(_) => {
                    release(self.pool);
                    continue;
                }
            }
        }
        Err(RelayError::NoPortAvailable)
    }
}

impl Opener<'_> {
    /// A listening TCP socket on a port of the pool, for TCP allocation
    /// `id` (RFC 6062).
    fn open_tcp(&mut self, id: AllocationId, ip: IpAddr) -> Result<OpenedRelay, RelayError> {
        for _ in 0..BIND_ATTEMPTS {
            let port = self
                .pool
                .take(Want::Any)
                .ok_or(RelayError::NoPortAvailable)?;
            let addr = SocketAddr::new(ip, port);
            match net::tcp_relay_listener(addr, self.device) {
                Ok(listener) => {
                    self.tcp_opened.push(OpenedTcp { id, listener, addr });
                    return Ok(OpenedRelay {
                        addr,
                        reservation: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => self.pool.release(port),
                Err(e) => {
                    self.pool.release(port);
                    warn!("cannot bind TCP relay socket {addr}: {e}");
                    return Err(RelayError::NoPortAvailable);
                }
            }
        }
        Err(RelayError::NoPortAvailable)
    }
}

impl RelayProvider for Opener<'_> {
    fn open(&mut self, id: AllocationId, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        if req.tcp {
            return self.open_tcp(id, req.ip);
        }
        let (socket, reservation) = match req.port {
            PortRequest::Reserved(token) => {
                let s = self
                    .reservations
                    .claim(&token, self.now)
                    .ok_or(RelayError::NoReservation)?;
                (s, None)
            }
            PortRequest::Any => (
                self.bind_from_pool(req.ip, Want::Any, req.dont_fragment)?.0,
                None,
            ),
            PortRequest::Even {
                reserve_next: false,
            } => (
                self.bind_from_pool(req.ip, Want::Even, req.dont_fragment)?
                    .0,
                None,
            ),
            PortRequest::Even { reserve_next: true } => {
                let (s, next) = self.bind_from_pool(req.ip, Want::EvenPair, req.dont_fragment)?;
                let next = next.expect("pair requested");
                (s, Some(self.reservations.insert(next, self.now)))
            }
        };
        let addr = socket
            .local_addr()
            .map_err(|_| RelayError::NoPortAvailable)?;
        self.opened.push(Opened { id, socket, addr });
        Ok(OpenedRelay { addr, reservation })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opener<'a>(
        pool: &'a PortPool,
        res: &'a Reservations,
        opened: &'a mut Vec<Opened>,
        now: Instant,
    ) -> Opener<'a> {
        Opener {
            pool,
            reservations: res,
            device: None,
            buffer: None,
            gro: true,
            now,
            opened,
            tcp_opened: Box::leak(Box::default()),
        }
    }

    fn free_even_range(len: u16) -> (u16, u16) {
        // Find a small range of free ports for this test.
        for _ in 0..100 {
            let base = rand::random_range(20000u16..30000) & !1;
            let sockets: Vec<_> = (base..base + len)
                .map(|p| std::net::UdpSocket::bind(("127.0.0.1", p)))
                .collect();
            if sockets.iter().all(|s| s.is_ok()) {
                return (base, base + len - 1);
            }
        }
        panic!("no free port range");
    }

    #[test]
    fn reservation_is_claimed_once_and_expires() {
        let (min, max) = free_even_range(4);
        let pool = PortPool::new(min, max);
        let res = Reservations::default();
        let mut opened = Vec::new();
        let t0 = Instant::now();
        let id = crate::turn::AllocationId::new(1, 1);
        let req = RelayRequest {
            ip: "127.0.0.1".parse().unwrap(),
            port: PortRequest::Even { reserve_next: true },
            dont_fragment: false,
            tcp: false,
        };
        let first = opener(&pool, &res, &mut opened, t0).open(id, &req).unwrap();
        assert_eq!(first.addr.port() % 2, 0);
        let token = first.reservation.unwrap();
        assert_eq!(pool.in_use(), 2);
        let claim = RelayRequest {
            port: PortRequest::Reserved(token),
            ..req
        };
        let second = opener(&pool, &res, &mut opened, t0)
            .open(id, &claim)
            .unwrap();
        assert_eq!(second.addr.port(), first.addr.port() + 1);
        assert_eq!(
            opener(&pool, &res, &mut opened, t0).open(id, &claim),
            Err(RelayError::NoReservation)
        );
        // An unclaimed reservation expires after 30 s and frees its port.
        let third = opener(&pool, &res, &mut opened, t0).open(id, &req).unwrap();
        assert_eq!(pool.in_use(), 4);
        let later = t0 + Duration::from_secs(RESERVATION_LIFETIME);
        let late_claim = RelayRequest {
            port: PortRequest::Reserved(third.reservation.unwrap()),
            ..req
        };
        assert_eq!(
            opener(&pool, &res, &mut opened, later).open(id, &late_claim),
            Err(RelayError::NoReservation)
        );
        res.sweep(later, &pool);
        assert!(res.is_empty());
        assert_eq!(pool.in_use(), 3);
    }

    #[test]
    fn exhausted_range_then_recovery() {
        let (min, max) = free_even_range(2);
        let pool = PortPool::new(min, max);
        let res = Reservations::default();
        let mut opened = Vec::new();
        let now = Instant::now();
        let id = crate::turn::AllocationId::new(1, 1);
        let req = RelayRequest {
            ip: "127.0.0.1".parse().unwrap(),
            port: PortRequest::Any,
            dont_fragment: true,
            tcp: false,
        };
        assert!(opener(&pool, &res, &mut opened, now).open(id, &req).is_ok());
        assert!(opener(&pool, &res, &mut opened, now).open(id, &req).is_ok());
        assert_eq!(
            opener(&pool, &res, &mut opened, now).open(id, &req),
            Err(RelayError::NoPortAvailable)
        );
        let freed = opened.pop().unwrap();
        drop(freed.socket);
        pool.release(freed.addr.port());
        assert!(opener(&pool, &res, &mut opened, now).open(id, &req).is_ok());
    }

    #[test]
    fn ports_held_by_other_programs_are_skipped() {
        let (min, max) = free_even_range(2);
        let _squatter = std::net::UdpSocket::bind(("127.0.0.1", min)).unwrap();
        let pool = PortPool::new(min, max);
        let res = Reservations::default();
        let mut opened = Vec::new();
        let id = crate::turn::AllocationId::new(1, 1);
        let req = RelayRequest {
            ip: "127.0.0.1".parse().unwrap(),
            port: PortRequest::Any,
            dont_fragment: false,
            tcp: false,
        };
        let got = opener(&pool, &res, &mut opened, Instant::now())
            .open(id, &req)
            .unwrap();
        assert_eq!(got.addr.port(), max);
    }
}
