//! Process-wide state every worker reads or reports into: the core
//! configuration, TLS, the relay port pool and reservations, connection
//! counts, telemetry for metrics and the watchdog, UDP steering, and the
//! quota counts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ports::PortPool;
use super::relay::Reservations;
use crate::turn::{self, FiveTuple};

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
    /// The DTLS certificate (ECDSA; `None` when DTLS is off), swapped when
    /// certificates are reloaded, and the DTLS settings.
    pub dtls_cert: arc_swap::ArcSwapOption<dimpl::DtlsCertificate>,
    pub dtls_config: Arc<dimpl::Config>,
    /// RFC 6062 peer connections waiting for their ConnectionBind.
    pub tcp_waiting: super::tcp_relay::WaitingConnections,
    /// `proxy-protocol-allow`: the load balancers whose TCP/TLS
    /// connections start with a PROXY header ([`super::proxy`]).
    pub proxy_allow: arc_swap::ArcSwap<Vec<turn::policy::IpRange>>,
    /// Seconds of silence after which a stream connection without an
    /// allocation is closed (`max-allocate-timeout`).
    pub idle_timeout_secs: AtomicU64,
    /// What workers report for metrics, one slot each.
    pub telemetry: Telemetry,
    /// UDP steering (see [`super::steering`]).
    pub steering: Steering,
    /// Allocations counted against quotas, by every worker's core.
    pub quotas: super::quota::SharedCounts,
    /// The user database's cache, when one is configured.
    pub directory: Option<Arc<super::directory::Cache>>,
    /// The fleet sharing the `redis-userdb`, when one is configured.
    pub fleet: Option<Arc<super::fleet::Fleet>>,
    /// The `redis-statsdb` publisher, when one is configured.
    pub statsdb: Option<Arc<super::statsdb::StatsDb>>,
    /// Whether the node drains (SIGUSR1, SIGTERM).
    pub draining: AtomicBool,
    /// Serving, or handing over to a successor ([`super::takeover`]):
    /// accept loops and DTLS listeners wait while it is not `Serving`.
    pub phase: tokio::sync::watch::Sender<Phase>,
    /// The eBPF fast path (`ebpf-offload`), when loaded: its maps are
    /// shared by every worker, touched when a channel is bound or an
    /// allocation ends or moves, and read once a second.
    pub offload: Option<std::sync::Mutex<super::offload::Offload>>,
    /// What the fast path relayed: packets and payload bytes to peers,
    /// then to clients.
    pub offloaded: [AtomicU64; 4],
}

/// Where the process is in a live takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading every socket.
    Serving,
    /// A successor is receiving the state: listeners and handed-over relay
    /// sockets are not read (their datagrams wait in the kernel).
    Frozen,
    /// The successor serves them now: only the TCP/TLS clients that could
    /// not move are served here, until they end.
    Handed,
}

/// Waits until `phase` is [`Phase::Serving`] (true) or
/// [`Phase::Handed`] (false: the caller's socket belongs to the successor).
pub async fn serving(phase: &mut tokio::sync::watch::Receiver<Phase>) -> bool {
    loop {
        match *phase.borrow_and_update() {
            Phase::Serving => return true,
            Phase::Handed => return false,
            Phase::Frozen => {}
        }
        if phase.changed().await.is_err() {
            return true;
        }
    }
}

impl Shared {
    /// Live allocations on the whole server, counted as they are created
    /// and end (the fleet's ledger, else the quota counts).
    pub fn allocations(&self) -> u32 {
        match &self.fleet {
            Some(f) => f.allocations(),
            None => self.quotas.allocations(),
        }
    }
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

    /// Counts a new connection from `ip`; false when `ip` is at the limit.
    pub(super) fn acquire(&self, ip: std::net::IpAddr) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut m = self.per_ip.lock().expect("stream count lock");
        let n = m.entry(ip).or_insert(0);
        if limit > 0 && *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts a connection from `ip` as closed.
    pub(super) fn release(&self, ip: std::net::IpAddr) {
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
