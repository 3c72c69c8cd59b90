//! The I/O driver: listeners, relay sockets, TLS and worker threads around
//! the sans-IO core in [`crate::turn`].
//!
//! [`bind`] opens every listener socket for every worker up front, so a
//! port that cannot be bound is an error before anything runs; [`start`]
//! then runs the workers.

pub mod batch;
pub mod directory;
pub mod dtls;
pub mod exclusive;
pub mod fleet;
mod handover;
pub mod net;
pub mod ports;
pub mod proxy;
pub mod quota;
pub mod relay;
mod shared;
pub mod spread;
pub mod statsdb;
pub mod steering;
mod stream;
pub mod takeover;
pub mod tcp_relay;
pub mod tls;
mod worker;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tracing::info;

pub use shared::{Shared, Steering, StreamCount, Telemetry, WorkerReport};
use worker::{Sockets, StreamListener};

/// What to listen on.
#[derive(Debug, Clone)]
pub struct Plan {
    /// UDP listener addresses.
    pub udp: Vec<SocketAddr>,
    /// TCP listener addresses and what each is for; TLS is detected by its
    /// first byte on every one.
    pub tcp: Vec<(SocketAddr, StreamPort)>,
    /// DTLS listener addresses (UDP on the TLS ports).
    pub dtls: Vec<SocketAddr>,
    /// Number of worker threads (each binds every listener with SO_REUSEPORT).
    pub workers: usize,
    pub listening_device: Option<String>,
    /// SO_RCVBUF/SO_SNDBUF for UDP listeners, bytes (`None`:
    /// [`net::LISTENER_BUFFER`]).
    pub sock_buf_size: Option<usize>,
    /// UDP GRO on the UDP listeners (off with `no-udp-gro`).
    pub udp_gro: bool,
}

/// What a TCP listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPort {
    /// A plain port (`listening-port`, `alt-listening-port`).
    Plain,
    /// A TLS port (`tls-listening-port`, `alt-tls-listening-port`).
    Tls,
    /// coturn's `tcp-proxy-port`: every connection starts with a PROXY
    /// header, whatever its source.
    Proxy,
}

impl StreamPort {
    /// Its name in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            StreamPort::Plain => "tcp",
            StreamPort::Tls => "tls",
            StreamPort::Proxy => "tcp (PROXY protocol)",
        }
    }
}

/// A listener that could not be bound.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    pub transport: &'static str,
    pub error: std::io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot listen on {} {}: {}",
            self.transport, self.addr, self.error
        )
    }
}

impl std::error::Error for BindError {}

/// Listener sockets for every worker.
pub struct Bound {
    per_worker: Vec<Sockets>,
}

/// Binds every listener of `plan` once per worker, after checking that no
/// other process holds any of them ([`exclusive::check_unshared`]): the
/// workers share each address through SO_REUSEPORT, which would otherwise
/// let a second server, or any program of the same user with SO_REUSEPORT,
/// split the clients silently.
pub fn bind(plan: &Plan) -> Result<Bound, BindError> {
    let device = plan.listening_device.as_deref();
    let udp = plan.udp.iter().map(|&a| (a, exclusive::Proto::Udp, "udp"));
    let tcp = plan
        .tcp
        .iter()
        .map(|&(a, port)| (a, exclusive::Proto::Tcp, port.name()));
    let dtls = plan
        .dtls
        .iter()
        .map(|&a| (a, exclusive::Proto::Udp, "dtls"));
    for (addr, proto, transport) in udp.chain(tcp).chain(dtls) {
        exclusive::check_unshared(addr, proto, device).map_err(|error| BindError {
            addr,
            transport,
            error,
        })?;
    }
    let mut per_worker = Vec::with_capacity(plan.workers);
    for _ in 0..plan.workers.max(1) {
        let mut s = Sockets {
            udp: Vec::new(),
            tcp: Vec::new(),
            dtls: Vec::new(),
        };
        for &addr in &plan.dtls {
            let sock =
                net::udp_listener(addr, device, net::LISTENER_BUFFER, false).map_err(|error| {
                    BindError {
                        addr,
                        transport: "dtls",
                        error,
                    }
                })?;
            s.dtls.push((sock, addr));
        }
        for &addr in &plan.udp {
            let buffer = plan.sock_buf_size.unwrap_or(net::LISTENER_BUFFER);
            let sock = net::udp_listener(addr, device, buffer, plan.udp_gro).map_err(|error| {
                BindError {
                    addr,
                    transport: "udp",
                    error,
                }
            })?;
            s.udp.push((sock, addr));
        }
        for &(addr, port) in &plan.tcp {
            let sock = net::tcp_listener(addr, device).map_err(|error| BindError {
                addr,
                transport: port.name(),
                error,
            })?;
            s.tcp.push(StreamListener {
                socket: sock,
                addr,
                proxy: port == StreamPort::Proxy,
            });
        }
        per_worker.push(s);
    }
    Ok(Bound { per_worker })
}

/// The running workers, for the control plane (reload, drain, metrics).
pub struct Server {
    mailboxes: worker::Mailboxes,
    pub shared: Arc<Shared>,
}

impl Server {
    fn broadcast(&self, mail: impl Fn() -> worker::Mail) {
        for m in self.mailboxes.iter() {
            let _ = m.send(mail());
        }
    }

    /// Hands a reloaded core configuration to every worker; it applies to
    /// new requests, while existing allocations keep their state.
    pub fn set_config(&self, cfg: Arc<crate::turn::Config>) {
        self.broadcast(|| worker::Mail::Config(cfg.clone()));
    }

    /// Starts or stops draining on every worker.
    pub fn set_draining(&self, on: bool) {
        self.shared
            .draining
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self.broadcast(|| worker::Mail::Drain(on));
    }

    /// Swaps the TLS certificate for new connections.
    pub fn set_tls(&self, tls: Option<tokio_rustls::TlsAcceptor>) {
        self.shared.tls.store(tls.map(Arc::new));
    }

    /// What the user database's task calls to tell a worker that the
    /// credentials its held messages wait for are in the cache.
    pub fn credentials_notifier(&self) -> directory::Notify {
        let mailboxes = self.mailboxes.clone();
        Box::new(move |worker, wanted| {
            if let Some(m) = mailboxes.get(worker) {
                let _ = m.send(worker::Mail::Ready(wanted));
            }
        })
    }

    /// What the fleet task calls to tell the workers (a quota decision
    /// ready, where to redirect, a user to end).
    pub fn fleet_teller(&self) -> Box<dyn Fn(fleet::Tell) + Send + Sync> {
        let mailboxes = self.mailboxes.clone();
        Box::new(move |tell| match tell {
            fleet::Tell::Ready(worker, wanted) => {
                if let Some(m) = mailboxes.get(worker) {
                    let _ = m.send(worker::Mail::Ready(wanted));
                }
            }
            fleet::Tell::Redirect(target) => {
                // UDP and TCP clients only: a TLS client would have to
                // trust the other node's certificate for an address it
                // never asked for, and browsers do not follow it.
                let t = target.map(|t| (t.address, None));
                for m in mailboxes.iter() {
                    let _ = m.send(worker::Mail::Redirect(t));
                }
            }
            fleet::Tell::EndUser(realm, user) => {
                for m in mailboxes.iter() {
                    let _ = m.send(worker::Mail::EndUser(realm.clone(), user.clone()));
                }
            }
        })
    }

    /// Live allocations on the whole server.
    pub fn allocations(&self) -> u32 {
        self.shared.allocations()
    }
}

/// Starts one thread per worker. They run until the process exits.
pub fn start(bound: Bound, shared: Arc<Shared>) -> std::io::Result<Server> {
    let n = bound.per_worker.len();
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| tokio::sync::mpsc::unbounded_channel())
        .unzip();
    let mailboxes = Arc::new(senders);
    let mut threads = 0;
    for ((i, sockets), inbox) in bound.per_worker.into_iter().enumerate().zip(receivers) {
        worker::spawn(i, sockets, shared.clone(), mailboxes.clone(), inbox)?;
        threads += 1;
    }
    info!("{threads} worker threads running");
    Ok(Server { mailboxes, shared })
}

impl Bound {
    /// Number of workers the sockets were bound for.
    pub fn workers(&self) -> usize {
        self.per_worker.len()
    }
}

/// Expands configured listening IPs: none means every local address, and
/// `0.0.0.0` / `::` mean every local address of that family.
pub fn expand_listening_ips(configured: &[IpAddr], local: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut push = |ip: IpAddr| {
        if !out.contains(&ip) {
            out.push(ip);
        }
    };
    if configured.is_empty() {
        local.iter().copied().for_each(&mut push);
    }
    for &ip in configured {
        if ip.is_unspecified() {
            local
                .iter()
                .copied()
                .filter(|l| l.is_ipv4() == ip.is_ipv4())
                .for_each(&mut push);
        } else {
            push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    #[test]
    fn listening_ip_expansion() {
        let local = ips(&["127.0.0.1", "10.0.0.2", "::1"]);
        assert_eq!(expand_listening_ips(&[], &local), local);
        assert_eq!(
            expand_listening_ips(&ips(&["0.0.0.0"]), &local),
            ips(&["127.0.0.1", "10.0.0.2"])
        );
        assert_eq!(
            expand_listening_ips(&ips(&["::", "10.0.0.2"]), &local),
            ips(&["::1", "10.0.0.2"])
        );
        assert_eq!(
            expand_listening_ips(&ips(&["192.0.2.1"]), &local),
            ips(&["192.0.2.1"])
        );
    }

    #[test]
    fn bind_reports_the_address() {
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let plan = Plan {
            udp: vec![addr],
            tcp: vec![],
            dtls: vec![],
            workers: 1,
            listening_device: None,
            sock_buf_size: None,
            udp_gro: true,
        };
        let err = bind(&plan)
            .err()
            .expect("port is taken without SO_REUSEPORT");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on udp {addr}:")),
            "{err}"
        );
    }
}
