//! Which peer addresses an allocation may relay to.
//!
//! Safe by default: only global unicast addresses are peers. Refused unless
//! an option opens them: loopback, unspecified, private (RFC 1918), shared
//! (CGNAT 100.64/10), link-local (including the cloud metadata address
//! 169.254.169.254), multicast, broadcast, benchmarking, documentation and
//! reserved ranges, IPv6 unique-local and site-local, and every IPv6 form
//! that embeds an IPv4 address that is not global (IPv4-mapped
//! `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4
//! `2002::/16`, Teredo `2001::/32`). Addresses are canonicalised before they
//! are judged, so no spelling of 127.0.0.1 gets through (CVE-2020-26262,
//! CVE-2026-27624).
//!
//! The server's own relay addresses are peers only on relay ports: two
//! clients of the same server reach each other's relayed addresses, but no
//! other service on the server.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An inclusive range of addresses of one family: a single address, `a-b`,
/// or a CIDR prefix `net/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    start: IpAddr,
    end: IpAddr,
}

impl IpRange {
    /// The range holding exactly `ip`.
    pub fn single(ip: IpAddr) -> Self {
        IpRange { start: ip, end: ip }
    }

    /// Whether `ip` (as given, not canonicalised) lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.start, self.end, ip) {
            (IpAddr::V4(s), IpAddr::V4(e), IpAddr::V4(x)) => {
                (u32::from(s)..=u32::from(e)).contains(&u32::from(x))
            }
            (IpAddr::V6(s), IpAddr::V6(e), IpAddr::V6(x)) => {
                (u128::from(s)..=u128::from(e)).contains(&u128::from(x))
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl FromStr for IpRange {
    type Err = String;

    /// Parses `1.2.3.4`, `1.2.3.4-1.2.3.9`, `10.0.0.0/8`, `fc00::/7`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let ip = |t: &str| -> Result<IpAddr, String> {
            let t = t.trim().trim_start_matches('[').trim_end_matches(']');
            t.parse::<IpAddr>()
                .map_err(|_| format!("'{t}' is not an IP address"))
        };
        if let Some((net, len)) = s.split_once('/') {
            let net = ip(net)?;
            let len: u32 = len
                .trim()
                .parse()
                .map_err(|_| format!("'{len}' is not a prefix length"))?;
            return match net {
                IpAddr::V4(n) if len <= 32 => {
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                    let start = u32::from(n) & mask;
                    Ok(IpRange {
                        start: IpAddr::V4(Ipv4Addr::from(start)),
                        end: IpAddr::V4(Ipv4Addr::from(start | !mask)),
                    })
                }
                IpAddr::V6(n) if len <= 128 => {
                    let mask = if len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - len)
                    };
                    let start = u128::from(n) & mask;
                    Ok(IpRange {
                        start: IpAddr::V6(Ipv6Addr::from(start)),
                        end: IpAddr::V6(Ipv6Addr::from(start | !mask)),
                    })
                }
                _ => Err(format!("prefix length {len} is too long for {net}")),
            };
        }
        if let Some((a, b)) = s.split_once('-') {
            let (a, b) = (ip(a)?, ip(b)?);
            let ordered = match (a, b) {
                (IpAddr::V4(x), IpAddr::V4(y)) => x <= y,
                (IpAddr::V6(x), IpAddr::V6(y)) => x <= y,
                _ => return Err(format!("range '{s}' mixes IPv4 and IPv6")),
            };
            if !ordered {
                return Err(format!("range '{s}' ends before it starts"));
            }
            return Ok(IpRange { start: a, end: b });
        }
        Ok(IpRange::single(ip(s)?))
    }
}

/// Maps IPv4-mapped and IPv4-compatible IPv6 addresses to the IPv4 address
/// they embed; other addresses are returned unchanged. `::1` stays IPv6
/// loopback.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6 != Ipv6Addr::LOCALHOST => {
            let o = v6.octets();
            let mapped = o[..10].iter().all(|b| *b == 0) && o[10] == 0xFF && o[11] == 0xFF;
            let compatible = o[..12].iter().all(|b| *b == 0);
            if mapped || compatible {
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                ip
            }
        }
        other => other,
    }
}

/// What kind of address a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reachable on the internet: a legitimate peer.
    Global,
    /// 0.0.0.0/8, `::`.
    Unspecified,
    /// 127.0.0.0/8, `::1`.
    Loopback,
    /// RFC 1918, CGNAT 100.64.0.0/10, unique-local fc00::/7, site-local
    /// fec0::/10.
    Private,
    /// 169.254.0.0/16 (with the cloud metadata service) and fe80::/10.
    LinkLocal,
    /// Multicast and the limited broadcast address.
    Multicast,
    /// Documentation, benchmarking, protocol-assignment and reserved ranges,
    /// and IPv6 outside 2000::/3.
    Reserved,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Global => "global",
            Kind::Unspecified => "unspecified",
            Kind::Loopback => "loopback",
            Kind::Private => "private",
            Kind::LinkLocal => "link-local",
            Kind::Multicast => "multicast/broadcast",
            Kind::Reserved => "reserved/documentation",
        })
    }
}

fn in4(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in6(ip: Ipv6Addr, net: u128, len: u32) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(ip) & mask == net & mask
}

/// Classifies an IPv4 address (IANA special-purpose address registry).
pub fn kind_v4(ip: Ipv4Addr) -> Kind {
    if in4(ip, [0, 0, 0, 0], 8) {
        Kind::Unspecified
    } else if in4(ip, [127, 0, 0, 0], 8) {
        Kind::Loopback
    } else if in4(ip, [10, 0, 0, 0], 8)
        || in4(ip, [172, 16, 0, 0], 12)
        || in4(ip, [192, 168, 0, 0], 16)
        || in4(ip, [100, 64, 0, 0], 10)
    {
        Kind::Private
    } else if in4(ip, [169, 254, 0, 0], 16) {
        Kind::LinkLocal
    } else if in4(ip, [224, 0, 0, 0], 4) || ip == Ipv4Addr::BROADCAST {
        Kind::Multicast
    } else if in4(ip, [192, 0, 0, 0], 24)
        || in4(ip, [192, 0, 2, 0], 24)
        || in4(ip, [192, 88, 99, 0], 24)
        || in4(ip, [198, 18, 0, 0], 15)
        || in4(ip, [198, 51, 100, 0], 24)
        || in4(ip, [203, 0, 113, 0], 24)
        || in4(ip, [240, 0, 0, 0], 4)
    {
        Kind::Reserved
    } else {
        Kind::Global
    }
}

/// The worst of two kinds, for addresses that embed another.
fn worst(a: Kind, b: Kind) -> Kind {
    if a == Kind::Global { b } else { a }
}

/// Classifies an address after canonicalising it; IPv6 forms that embed an
/// IPv4 address (NAT64, 6to4, Teredo) are as bad as what they embed.
pub fn kind(ip: IpAddr) -> Kind {
    let v6 = match canonical(ip) {
        IpAddr::V4(v4) => return kind_v4(v4),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let v4_at = |i: usize| Ipv4Addr::new(o[i], o[i + 1], o[i + 2], o[i + 3]);
    if v6 == Ipv6Addr::LOCALHOST {
        Kind::Loopback
    } else if v6.is_unspecified() {
        Kind::Unspecified
    } else if in6(v6, 0x0064_ff9b << 96, 96) {
        // NAT64 well-known prefix: the peer is the embedded IPv4 address.
        kind_v4(v4_at(12))
    } else if in6(v6, 0x2002 << 112, 16) {
        // 6to4: the IPv4 address follows the prefix.
        kind_v4(v4_at(2))
    } else if in6(v6, 0x2001_0000 << 96, 32) {
        // Teredo: server at bits 32..64, client (inverted) in the last 32.
        let client = Ipv4Addr::from(!u32::from(v4_at(12)));
        worst(kind_v4(v4_at(4)), kind_v4(client))
    } else if v6.is_multicast() {
        Kind::Multicast
    } else if in6(v6, 0xfe80 << 112, 10) {
        Kind::LinkLocal
    } else if in6(v6, 0xfc00 << 112, 7) || in6(v6, 0xfec0 << 112, 10) {
        Kind::Private
    } else if !in6(v6, 0x2000 << 112, 3)
        || in6(v6, 0x2001 << 112, 23)
        || in6(v6, 0x2001_0db8 << 96, 32)
        || in6(v6, 0x3fff << 112, 20)
    {
        // Outside global unicast, IETF protocol assignments (benchmarking,
        // ORCHID, ...), and the documentation prefixes.
        Kind::Reserved
    } else {
        Kind::Global
    }
}

/// Why a peer address was refused; answered with 403 Forbidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Not a global unicast address, and no option opens its kind.
    Kind(Kind),
    /// Matched a `denied-peer-ip` entry.
    DeniedList,
    /// The server's own relay address on a port that is not a relay port.
    OwnAddress,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::Kind(Kind::Loopback) => {
                f.write_str("loopback address (allow-loopback-peers is off)")
            }
            Denied::Kind(Kind::Private) => {
                f.write_str("private address (allow-private-peers is off)")
            }
            Denied::Kind(k) => write!(f, "{k} address"),
            Denied::DeniedList => f.write_str("matches denied-peer-ip"),
            Denied::OwnAddress => {
                f.write_str("the server's own address outside the relay port range")
            }
        }
    }
}

/// The peer address policy.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// `allow-loopback-peers`: loopback peers are allowed.
    pub allow_loopback: bool,
    /// `allow-private-peers`: RFC 1918, CGNAT, unique-local and site-local
    /// peers are allowed (coturn 4.6.1's behaviour, for a private SFU).
    pub allow_private: bool,
    /// `allowed-peer-ip` entries: a match is allowed whatever its kind.
    pub allowed: Vec<IpRange>,
    /// `denied-peer-ip` entries, refused even when global.
    pub denied: Vec<IpRange>,
    /// The server's relay addresses: peers there are allowed on
    /// `relay_ports` (other clients' relayed addresses) and nowhere else.
    pub own_relay_ips: Vec<IpAddr>,
    /// `min-port`..=`max-port`.
    pub relay_ports: (u16, u16),
}

impl PeerPolicy {
    fn listed(list: &[IpRange], ip: IpAddr) -> bool {
        let c = canonical(ip);
        list.iter().any(|r| r.contains(c) || r.contains(ip))
    }

    /// Whether `ip`'s kind is open under this policy, and whether it is one
    /// of the server's own relay addresses.
    fn open(&self, ip: IpAddr) -> (bool, bool) {
        let c = canonical(ip);
        let own = self.own_relay_ips.iter().any(|o| canonical(*o) == c);
        let open = match kind(ip) {
            Kind::Global => true,
            Kind::Loopback => self.allow_loopback,
            Kind::Private => self.allow_private,
            _ => false,
        };
        (open, own)
    }

    /// Whether relaying to `ip` may be permitted (CreatePermission, which
    /// names no port).
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        self.check_with(ip, &[], &[])
    }

    /// [`PeerPolicy::check`] with a realm's own lists on top of the
    /// configuration's (`allowed_peer_ip` / `denied_peer_ip` of a user
    /// database).
    pub fn check_with(
        &self,
        ip: IpAddr,
        allowed: &[IpRange],
        denied: &[IpRange],
    ) -> Result<(), Denied> {
        if Self::listed(&self.allowed, ip) || Self::listed(allowed, ip) {
            return Ok(());
        }
        let (open, own) = self.open(ip);
        if !open && !own {
            return Err(Denied::Kind(kind(ip)));
        }
        if Self::listed(&self.denied, ip) || Self::listed(denied, ip) {
            return Err(Denied::DeniedList);
        }
        Ok(())
    }

    /// Whether datagrams may be relayed to `peer` (ChannelBind and Send,
    /// which name a port): [`PeerPolicy::check`], and the server's own relay
    /// addresses only on relay ports unless the address is open anyway.
    pub fn check_addr(&self, peer: SocketAddr) -> Result<(), Denied> {
        self.check_addr_with(peer, &[], &[])
    }

    /// [`PeerPolicy::check_addr`] with a realm's own lists on top.
    pub fn check_addr_with(
        &self,
        peer: SocketAddr,
        allowed: &[IpRange],
        denied: &[IpRange],
    ) -> Result<(), Denied> {
        self.check_with(peer.ip(), allowed, denied)?;
        if Self::listed(&self.allowed, peer.ip()) || Self::listed(allowed, peer.ip()) {
            return Ok(());
        }
        let (open, own) = self.open(peer.ip());
        let relay_port = (self.relay_ports.0..=self.relay_ports.1).contains(&peer.port());
        if own && !open && !relay_port {
            return Err(Denied::OwnAddress);
        }
        Ok(())
    }

    /// One line describing the policy, for the start-up log.
    pub fn describe(&self) -> String {
        let list = |l: &[IpRange]| {
            l.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = String::from("peers: global unicast allowed; ");
        s.push_str(if self.allow_loopback {
            "loopback ALLOWED; "
        } else {
            "loopback denied; "
        });
        s.push_str(if self.allow_private {
            "private ranges ALLOWED; "
        } else {
            "private ranges denied; "
        });
        s.push_str("link-local, multicast, unspecified, reserved and documentation ranges denied");
        if !self.own_relay_ips.is_empty() {
            s.push_str(&format!(
                "; own relay addresses allowed on ports {}-{} only",
                self.relay_ports.0, self.relay_ports.1
            ));
        }
        if !self.allowed.is_empty() {
            s.push_str(&format!("; allowed-peer-ip: {}", list(&self.allowed)));
        }
        if !self.denied.is_empty() {
            s.push_str(&format!("; denied-peer-ip: {}", list(&self.denied)));
        }
        s
    }
}

#[cfg(test)]
mod tests;
