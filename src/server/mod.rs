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
pub mod offload;
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

pub use shared::{Phase, Shared, Steering, StreamCount, Telemetry, WorkerReport};
pub use worker::{Frozen, RelaySockets};
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
        let mut s = Sockets::default();
        bind_missing(plan, &mut s)?;
        per_worker.push(s);
    }
    Ok(Bound { per_worker })
}

/// Binds, for one worker, every listener of `plan` that `s` lacks (all of
/// them for a fresh start; those a predecessor did not hand over, for a
/// takeover).
fn bind_missing(plan: &Plan, s: &mut Sockets) -> Result<(), BindError> {
    let device = plan.listening_device.as_deref();
    let err = |addr, transport| {
        move |error| BindError {
            addr,
            transport,
            error,
        }
    };
    for &addr in &plan.dtls {
        if !s.dtls.iter().any(|(_, a)| *a == addr) {
            let sock = net::udp_listener(addr, device, net::LISTENER_BUFFER, false)
                .map_err(err(addr, "dtls"))?;
            s.dtls.push((sock, addr));
        }
    }
    for &addr in &plan.udp {
        if !s.udp.iter().any(|(_, a)| *a == addr) {
            let buffer = plan.sock_buf_size.unwrap_or(net::LISTENER_BUFFER);
            let sock =
                net::udp_listener(addr, device, buffer, plan.udp_gro).map_err(err(addr, "udp"))?;
            s.udp.push((sock, addr));
        }
    }
    for &(addr, port) in &plan.tcp {
        if !s.tcp.iter().any(|l| l.addr == addr) {
            let sock = net::tcp_listener(addr, device).map_err(err(addr, port.name()))?;
            s.tcp.push(StreamListener {
                socket: sock,
                addr,
                proxy: port == StreamPort::Proxy,
            });
        }
    }
    Ok(())
}

/// What a predecessor process handed over ([`takeover`]), by its worker
/// index.
#[derive(Default)]
pub struct Inherited {
    pub workers: Vec<InheritedWorker>,
}

/// One predecessor worker's listeners, allocations and counters.
#[derive(Default)]
pub struct InheritedWorker {
    pub udp: Vec<(SocketAddr, std::net::UdpSocket)>,
    /// Address, `tcp-proxy-port`, listener.
    pub tcp: Vec<(SocketAddr, bool, std::net::TcpListener)>,
    pub dtls: Vec<(SocketAddr, std::net::UdpSocket)>,
    pub relays: Vec<(crate::turn::SavedAllocation, worker::RelaySockets)>,
    /// Plain TCP client connections: 5-tuple, socket, bytes already read.
    pub streams: Vec<(crate::turn::FiveTuple, std::net::TcpStream, Vec<u8>)>,
    pub stats: crate::turn::Stats,
    /// Its core's next allocation generation.
    pub next_generation: u32,
}

/// Builds the workers' sockets of `plan` from what a predecessor handed
/// over: predecessor worker `w`'s listeners (the same kernel sockets, so
/// the same SO_REUSEPORT group members and queued datagrams) and
/// allocations go to worker `w % workers`; listeners the plan no longer
/// has are closed, with the allocations on them; addresses the plan adds,
/// and the sockets a larger number of workers needs, are bound afresh.
/// Returns the sockets and how many allocations were dropped with a
/// removed listener.
pub fn bind_inherited(plan: &Plan, inherited: Inherited) -> Result<(Bound, usize), BindError> {
    let device = plan.listening_device.as_deref();
    let n = plan.workers.max(1);
    let mut per_worker: Vec<Sockets> = (0..n).map(|_| Sockets::default()).collect();
    let mut known_udp = std::collections::HashSet::new();
    let mut known_tcp = std::collections::HashSet::new();
    let mut dropped = 0;
    for (w, old) in inherited.workers.into_iter().enumerate() {
        let s = &mut per_worker[w % n];
        let mut link_of = std::collections::HashMap::new();
        for (addr, sock) in old.udp {
            known_udp.insert(addr);
            if plan.udp.contains(&addr) {
                link_of.insert(addr, s.udp.len() as u32);
                s.udp.push((sock, addr));
            } else {
                info!("udp {addr} is no longer configured: closed");
            }
        }
        for (addr, _, sock) in old.tcp {
            known_tcp.insert(addr);
            match plan.tcp.iter().find(|(a, _)| *a == addr) {
                Some(&(_, port)) => s.tcp.push(StreamListener {
                    socket: sock,
                    addr,
                    proxy: port == StreamPort::Proxy,
                }),
                None => info!("tcp {addr} is no longer configured: closed"),
            }
        }
        for (addr, sock) in old.dtls {
            known_udp.insert(addr);
            if plan.dtls.contains(&addr) {
                s.dtls.push((sock, addr));
            } else {
                info!("dtls {addr} is no longer configured: closed");
            }
        }
        // Ids (and the mobility tickets naming them) stay valid only on the
        // worker with the same index: tickets name their worker.
        let keep = w < n;
        for (mut a, sockets) in old.relays {
            if a.five_tuple.transport != crate::turn::Transport::Udp {
                // Linked to its connection by the worker.
                s.restored.push((a, sockets, keep));
                continue;
            }
            match link_of.get(&a.five_tuple.server) {
                Some(&link) => {
                    a.link = link;
                    s.restored.push((a, sockets, keep));
                }
                None => dropped += 1,
            }
        }
        // Established connections stay, whatever the listeners now are.
        s.streams.extend(old.streams);
        s.stats.push(old.stats);
        s.generation_floor = s.generation_floor.max(old.next_generation);
    }
    // Addresses new to this configuration must not be held by another
    // process; those handed over are ours.
    let fresh_udp = plan
        .udp
        .iter()
        .chain(&plan.dtls)
        .filter(|a| !known_udp.contains(*a))
        .map(|&a| (a, exclusive::Proto::Udp, "udp"));
    let fresh_tcp = plan
        .tcp
        .iter()
        .filter(|(a, _)| !known_tcp.contains(a))
        .map(|&(a, port)| (a, exclusive::Proto::Tcp, port.name()));
    for (addr, proto, transport) in fresh_udp.chain(fresh_tcp) {
        exclusive::check_unshared(addr, proto, device).map_err(|error| BindError {
            addr,
            transport,
            error,
        })?;
    }
    for s in &mut per_worker {
        bind_missing(plan, s)?;
    }
    Ok((Bound { per_worker }, dropped))
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

    /// Freezes every worker for a takeover ([`takeover`]): accept loops
    /// and DTLS listeners pause, UDP listeners and the relay sockets of UDP
    /// allocations are no longer read, and each worker answers with copies
    /// of their descriptors and its saved allocations, by worker index.
    /// On error every worker is thawed again.
    pub async fn freeze(&self) -> Result<Vec<Frozen>, String> {
        self.shared.phase.send_replace(Phase::Frozen);
        let mut answers = Vec::with_capacity(self.mailboxes.len());
        for m in self.mailboxes.iter() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = m.send(worker::Mail::Freeze(tx));
            answers.push(rx);
        }
        let mut frozen = Vec::with_capacity(answers.len());
        for rx in answers {
            match rx.await {
                Ok(f) => frozen.push(f),
                Err(_) => {
                    self.thaw();
                    return Err("a worker did not answer".to_string());
                }
            }
        }
        Ok(frozen)
    }

    /// The takeover failed: every worker reads all its sockets again.
    pub fn thaw(&self) {
        self.shared.phase.send_replace(Phase::Serving);
        self.broadcast(|| worker::Mail::Thaw);
    }

    /// The successor serves what was frozen: workers forget it, accept
    /// loops and DTLS listeners end; TCP/TLS clients already connected
    /// stay here until they end.
    pub fn handed(&self) {
        self.shared.phase.send_replace(Phase::Handed);
        self.broadcast(|| worker::Mail::Handed);
    }
}

/// Starts one thread per worker. They run until the process exits.
pub fn start(bound: Bound, shared: Arc<Shared>) -> std::io::Result<Server> {
    let n = bound.per_worker.len();
    // Steered from the first datagram: worker 0's controller confirms it
    // on its first tick, but a client whose first datagrams reached
    // another worker meanwhile would be split across two.
    if n > 1
        && shared
            .steering
            .enabled
            .load(std::sync::atomic::Ordering::Relaxed)
    {
        use std::os::fd::AsFd;
        for (sock, addr) in &bound.per_worker[0].udp {
            if let Err(e) = steering::attach(sock.as_fd()) {
                tracing::warn!("UDP steering on {addr}: {e}");
            }
        }
    }
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

    /// The relay ports of the allocations handed over by a predecessor
    /// (to claim in the port pool).
    pub fn inherited_relay_ports(&self) -> Vec<u16> {
        self.per_worker
            .iter()
            .flat_map(|s| &s.restored)
            .flat_map(|(a, _, _)| std::iter::once(a.relayed).chain(a.additional.map(|x| x.0)))
            .map(|a| a.port())
            .collect()
    }

    /// Allocations handed over by a predecessor.
    pub fn inherited_allocations(&self) -> usize {
        self.per_worker.iter().map(|s| s.restored.len()).sum()
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
