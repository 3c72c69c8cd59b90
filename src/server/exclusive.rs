//! Refusing to share a listening address with another process.
//!
//! Every worker binds its own listener with SO_REUSEPORT, and the kernel
//! lets any other socket of the same user join that group: a second
//! turnserver (or anything else using SO_REUSEPORT) on the same address
//! would silently take half the clients. So before the workers bind, each
//! listening address is bound once without SO_REUSEPORT; if that fails with
//! "address in use", another socket holds it and the server stops with the
//! holder's pid when `/proc` tells it (coturn's bind error, with a name).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// The transport of a listening address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// Checks that no other socket holds `addr` for `proto`.
///
/// The probe socket has no SO_REUSEPORT; a UDP probe has no SO_REUSEADDR
/// either (with it, two UDP sockets may share a port), while a TCP probe
/// has it, so connections of a previous run in TIME_WAIT do not count and
/// only another listener conflicts. Port 0 is not checked.
///
/// Errors: [`io::ErrorKind::AddrInUse`] with "address already in use by
/// another process (pid N, NAME)" (or "pid unknown" when `/proc` does not
/// show the holder, as for another user's process without root), or the
/// probe's own error (an address that is not local, say).
pub fn check_unshared(addr: SocketAddr, proto: Proto, device: Option<&str>) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let (ty, protocol) = match proto {
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
    };
    let s = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if proto == Proto::Tcp {
        s.set_reuse_address(true)?;
    }
    super::net::bind_device(&s, device)?;
    match s.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let holder = match holder_of(addr, proto) {
                Some((pid, name)) => format!("pid {pid}, {name}"),
                None => "pid unknown".to_string(),
            };
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("address already in use by another process ({holder})"),
            ))
        }
        Err(e) => Err(e),
    }
}

/// The pid and command name of a process holding a socket bound to `addr`
/// (a listening one for TCP), from `/proc/net` and `/proc/*/fd`.
pub fn holder_of(addr: SocketAddr, proto: Proto) -> Option<(u32, String)> {
    let inodes = socket_inodes(addr, proto);
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if inode.is_some_and(|i| inodes.contains(&i)) {
                let name = std::fs::read_to_string(entry.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                return Some((pid, name));
            }
        }
    }
    None
}

/// Inodes of the sockets in `/proc/net/{udp,tcp}{,6}` bound to `addr`'s
/// port on its address or a wildcard that covers it (TCP: listening only).
fn socket_inodes(addr: SocketAddr, proto: Proto) -> Vec<u64> {
    let base = match proto {
        Proto::Udp => "udp",
        Proto::Tcp => "tcp",
    };
    let mut out = Vec::new();
    for file in [format!("/proc/net/{base}"), format!("/proc/net/{base}6")] {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            if let Some((local, state, inode)) = parse_proc_net_line(line) {
                let listening = proto == Proto::Udp || state == TCP_LISTEN;
                if listening && local.port() == addr.port() && covers(local.ip(), addr.ip()) {
                    out.push(inode);
                }
            }
        }
    }
    out
}

/// `st` of a listening TCP socket in `/proc/net/tcp`.
const TCP_LISTEN: u8 = 0x0A;

/// Whether a socket bound to `bound` conflicts with binding `wanted`: the
/// same address, or either is a wildcard of the same family (IPv4 in IPv6
/// is compared as IPv4: a dual-stack `[::]` socket covers every IPv4
/// address).
fn covers(bound: IpAddr, wanted: IpAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let (b, w) = (canon(bound), canon(wanted));
    b == w
        || (bound.is_unspecified() && (bound.is_ipv6() || w.is_ipv4()))
        || (w.is_unspecified() && b.is_ipv4() == w.is_ipv4())
}

/// One line of `/proc/net/{udp,tcp}{,6}`: the local address, the state
/// and the socket's inode.
fn parse_proc_net_line(line: &str) -> Option<(SocketAddr, u8, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Addresses are the kernel's 32-bit words of network-order bytes,
    // printed as numbers in host byte order.
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((
        SocketAddr::new(ip, port),
        u8::from_str_radix(state, 16).ok()?,
        inode.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines() {
        let v4 = "   0: 0100007F:0D96 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12345 2 0000000000000000 0";
        assert_eq!(
            parse_proc_net_line(v4),
            Some(("127.0.0.1:3478".parse().unwrap(), 0x07, 12345))
        );
        let v6 = "   1: 00000000000000000000000001000000:0D96 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_proc_net_line(v6),
            Some(("[::1]:3478".parse().unwrap(), 0x0A, 777))
        );
        assert_eq!(parse_proc_net_line("garbage"), None);
    }

    #[test]
    fn wildcards_cover_their_family() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(covers(ip("0.0.0.0"), ip("127.0.0.1")));
        assert!(covers(ip("127.0.0.1"), ip("0.0.0.0")));
        assert!(covers(ip("::"), ip("127.0.0.1")));
        assert!(covers(ip("::ffff:127.0.0.1"), ip("127.0.0.1")));
        assert!(!covers(ip("0.0.0.0"), ip("::1")));
        assert!(!covers(ip("127.0.0.2"), ip("127.0.0.1")));
    }

    #[test]
    fn a_shared_udp_port_is_refused_with_the_holder() {
        // A socket in this very process that lets others share its port.
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        let err = check_unshared(addr, Proto::Udp, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let me = std::process::id();
        assert!(
            err.to_string().starts_with(&format!(
                "address already in use by another process (pid {me}, "
            )),
            "{err}"
        );
        drop(s);
        check_unshared(addr, Proto::Udp, None).unwrap();
    }

    #[test]
    fn a_tcp_listener_is_refused_but_not_a_closed_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // A connection leaves the port in TIME_WAIT once both ends close.
        let c = std::net::TcpStream::connect(addr).unwrap();
        let (a, _) = l.accept().unwrap();
        let err = check_unshared(addr, Proto::Tcp, None).unwrap_err();
        assert!(err.to_string().contains("address already in use"), "{err}");
        drop(a);
        drop(c);
        drop(l);
        check_unshared(addr, Proto::Tcp, None).unwrap();
        check_unshared("127.0.0.1:0".parse().unwrap(), Proto::Udp, None).unwrap();
    }
}
