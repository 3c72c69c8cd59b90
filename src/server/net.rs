//! Socket creation (socket2) and local address discovery.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Receive and send buffer size requested for listener sockets, bytes (the
/// kernel caps it at `net.core.rmem_max` / `wmem_max`).
pub const LISTENER_BUFFER: usize = 4 << 20;

/// Every address of every local interface that is up, except IPv4/IPv6
/// link-local ones (they need a scope and coturn skips them too).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if !ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(ip) = ip_of(&ifa) else { continue };
        let link_local = match ip {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
        };
        if !link_local && !ip.is_unspecified() && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// The IP address of an interface address entry, if it has one.
fn ip_of(ifa: &nix::ifaddrs::InterfaceAddress) -> Option<IpAddr> {
    let addr = ifa.address.as_ref()?;
    if let Some(v4) = addr.as_sockaddr_in() {
        Some(IpAddr::V4(v4.ip()))
    } else {
        addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
    }
}

/// The names of the interfaces that hold any of `ips`, each once.
pub fn interfaces_of(ips: &[IpAddr]) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let Some(ip) = ip_of(&ifa) else { continue };
        if ips.contains(&ip) && !out.contains(&ifa.interface_name) {
            out.push(ifa.interface_name);
        }
    }
    Ok(out)
}

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// SO_BINDTODEVICE to `device`, if given; the error names the device.
pub(crate) fn bind_device(s: &Socket, device: Option<&str>) -> io::Result<()> {
    if let Some(d) = device {
        s.bind_device(Some(d.as_bytes()))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind to device {d}: {e}")))?;
    }
    Ok(())
}

/// A UDP listener socket with SO_REUSEPORT, so each worker can bind its own
/// on the same address and the kernel spreads clients by 5-tuple.
///
/// `buffer` is the receive and send buffer size to ask for, bytes; `gro`
/// turns UDP GRO on ([`enable_gro`]).
pub fn udp_listener(
    addr: SocketAddr,
    device: Option<&str>,
    buffer: usize,
    gro: bool,
) -> io::Result<std::net::UdpSocket> {
    let s = socket(addr, Type::DGRAM, Protocol::UDP)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    if gro {
        enable_gro(&s);
    }
    bind_device(&s, device)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A TCP listener socket with SO_REUSEPORT (one per worker).
pub fn tcp_listener(addr: SocketAddr, device: Option<&str>) -> io::Result<std::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    bind_device(&s, device)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// A relay socket bound exactly to `addr` (no address or port reuse, so the
/// kernel guarantees the port is ours alone), with `buffer` bytes of
/// receive and send buffer if given (else the kernel's default), and UDP
/// GRO on if `gro` ([`enable_gro`]).
pub fn relay_socket(
    addr: SocketAddr,
    device: Option<&str>,
    dont_fragment: bool,
    buffer: Option<usize>,
    gro: bool,
) -> io::Result<std::net::UdpSocket> {
    let s = socket(addr, Type::DGRAM, Protocol::UDP)?;
    if let Some(b) = buffer {
        let _ = s.set_recv_buffer_size(b);
        let _ = s.set_send_buffer_size(b);
    }
    if gro {
        enable_gro(&s);
    }
    bind_device(&s, device)?;
    if dont_fragment {
        set_dont_fragment(&s, addr.is_ipv6())?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A listening TCP socket on a TCP relay's relayed transport address
/// (RFC 6062), with SO_REUSEADDR and SO_REUSEPORT so that the connections
/// Connect opens can be bound to the same address and port.
pub fn tcp_relay_listener(
    addr: SocketAddr,
    device: Option<&str>,
) -> io::Result<std::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    bind_device(&s, device)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Turns UDP GRO on (`UDP_GRO`, Linux 5.0): the kernel may then hand a
/// run of datagrams from one source (a burst a network card coalesced, or
/// a sender's GSO send) to one receive, which [`super::batch::RecvBatch`]
/// splits again. Best effort: an older kernel delivers them one by one.
/// `no-udp-gro` leaves it off.
fn enable_gro(s: &Socket) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::UdpGroSegment, &true);
}

/// Sets the DF bit on every datagram the socket sends (path MTU discovery
/// "do"), as DONT-FRAGMENT asks (RFC 8656 §18.9).
fn set_dont_fragment(s: &Socket, ipv6: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name, value) = if ipv6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    // SAFETY: setsockopt on a valid descriptor with a pointer to a live c_int
    // and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_a_local_address() {
        let addrs = local_addresses().unwrap();
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
    }

    #[test]
    fn relay_sockets_do_not_share_ports() {
        let a = relay_socket("127.0.0.1:0".parse().unwrap(), None, true, None, true).unwrap();
        let taken = a.local_addr().unwrap();
        assert!(relay_socket(taken, None, false, None, true).is_err());
    }

    #[test]
    fn listeners_share_ports_across_workers() {
        let a = udp_listener("127.0.0.1:0".parse().unwrap(), None, LISTENER_BUFFER, true).unwrap();
        let addr = a.local_addr().unwrap();
        let _b = udp_listener(addr, None, LISTENER_BUFFER, true).unwrap();
        let t = tcp_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let _u = tcp_listener(t.local_addr().unwrap(), None).unwrap();
    }

    /// Whether `UDP_GRO` is on for `s`.
    fn gro(s: &std::net::UdpSocket) -> bool {
        nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::UdpGroSegment).unwrap()
    }

    #[test]
    fn udp_sockets_take_coalesced_datagrams() {
        for on in [true, false] {
            let r = relay_socket("127.0.0.1:0".parse().unwrap(), None, false, None, on).unwrap();
            assert_eq!(gro(&r), on);
            let l = udp_listener("[::1]:0".parse().unwrap(), None, LISTENER_BUFFER, on).unwrap();
            assert_eq!(gro(&l), on);
        }
    }

    #[test]
    fn socket_buffers_are_set() {
        // Linux reports twice what was asked for (its bookkeeping overhead),
        // capped by net.core.rmem_max; 64 KiB is below every default cap.
        let r = relay_socket(
            "127.0.0.1:0".parse().unwrap(),
            None,
            false,
            Some(65536),
            true,
        )
        .unwrap();
        let r = socket2::SockRef::from(&r);
        assert!(r.recv_buffer_size().unwrap() >= 65536);
        assert!(r.send_buffer_size().unwrap() >= 65536);
        let l = udp_listener("127.0.0.1:0".parse().unwrap(), None, 100_000, true).unwrap();
        let l = socket2::SockRef::from(&l);
        assert!(l.recv_buffer_size().unwrap() >= 100_000);
    }
}
