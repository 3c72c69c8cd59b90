//! Which peer addresses an allocation may relay to (RFC 8656 §9 leaves this
//! to server policy; coturn's `allowed-peer-ip`, `denied-peer-ip`,
//! `allow-loopback-peers`, `no-multicast-peers`).
//!
//! Addresses are canonicalised before every check: an IPv4-mapped
//! (`::ffff:a.b.c.d`) or IPv4-compatible (`::a.b.c.d`) IPv6 address is
//! judged as the IPv4 address it embeds, so `::ffff:127.0.0.1` is loopback
//! (CVE-2026-27624) and `::` / `0.0.0.0` are unspecified (CVE-2020-26262).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
/// they embed; other addresses are returned unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mapped = o[..10].iter().all(|b| *b == 0) && o[10] == 0xFF && o[11] == 0xFF;
            let compatible = o[..12].iter().all(|b| *b == 0);
            if mapped || compatible {
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                ip
            }
        }
        v4 => v4,
    }
}

/// Why a peer address was refused; answered with 403 Forbidden.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// 0.0.0.0/8 or `::` (or an IPv6 form embedding them).
    Unspecified,
    /// 127.0.0.0/8 or `::1` without `allow-loopback-peers`.
    Loopback,
    /// Multicast or broadcast with `no-multicast-peers`.
    Multicast,
    /// Matched a `denied-peer-ip` entry.
    DeniedList,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Denied::Unspecified => "unspecified address",
            Denied::Loopback => "loopback address (allow-loopback-peers is off)",
            Denied::Multicast => "multicast/broadcast address (no-multicast-peers)",
            Denied::DeniedList => "matches denied-peer-ip",
        })
    }
}

/// The peer address policy.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    /// `allow-loopback-peers`.
    pub allow_loopback: bool,
    /// `no-multicast-peers`.
    pub deny_multicast: bool,
    /// `allowed-peer-ip` entries; a match wins over every denial.
    pub allowed: Vec<IpRange>,
    /// `denied-peer-ip` entries.
    pub denied: Vec<IpRange>,
}

impl PeerPolicy {
    /// Decides whether relaying to `ip` is allowed.
    pub fn check(&self, ip: IpAddr) -> Result<(), Denied> {
        let c = canonical(ip);
        let listed = |list: &[IpRange]| list.iter().any(|r| r.contains(c) || r.contains(ip));
        if listed(&self.allowed) {
            return Ok(());
        }
        let is_v6_loopback = ip == IpAddr::V6(Ipv6Addr::LOCALHOST);
        if !is_v6_loopback && matches!(c, IpAddr::V4(v4) if v4.octets()[0] == 0) {
            return Err(Denied::Unspecified);
        }
        let loopback = is_v6_loopback || matches!(c, IpAddr::V4(v4) if v4.is_loopback());
        if loopback && !self.allow_loopback {
            return Err(Denied::Loopback);
        }
        if self.deny_multicast {
            let multicast = match c {
                IpAddr::V4(v4) => v4.is_multicast() || v4.is_broadcast() || v4.octets()[0] >= 224,
                IpAddr::V6(v6) => v6.is_multicast(),
            };
            if multicast {
                return Err(Denied::Multicast);
            }
        }
        if listed(&self.denied) {
            return Err(Denied::DeniedList);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_parse() {
        let r: IpRange = "10.0.0.0/8".parse().unwrap();
        assert!(r.contains(ip("10.255.0.1")));
        assert!(!r.contains(ip("11.0.0.0")));
        let r: IpRange = "192.0.2.10-192.0.2.20".parse().unwrap();
        assert!(r.contains(ip("192.0.2.10")) && r.contains(ip("192.0.2.20")));
        assert!(!r.contains(ip("192.0.2.21")));
        let r: IpRange = "fc00::/7".parse().unwrap();
        assert!(r.contains(ip("fd12::1")));
        assert!(!r.contains(ip("fe80::1")));
        let r: IpRange = "::ffff:0.0.0.0-::ffff:255.255.255.255".parse().unwrap();
        assert!(r.contains(ip("::ffff:8.8.8.8")));
        let r: IpRange = "0.0.0.0/0".parse().unwrap();
        assert!(r.contains(ip("8.8.8.8")));
        assert!("1.2.3.4/33".parse::<IpRange>().is_err());
        assert!("1.2.3.9-1.2.3.4".parse::<IpRange>().is_err());
        assert!("1.2.3.4-::1".parse::<IpRange>().is_err());
        assert!("nonsense".parse::<IpRange>().is_err());
        assert!("10.0.0.0/x".parse::<IpRange>().is_err());
    }

    #[test]
    fn loopback_and_unspecified_in_every_form() {
        let p = PeerPolicy::default();
        for a in [
            "127.0.0.1",
            "127.255.255.254",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::ffff:7f00:1",
        ] {
            assert_eq!(p.check(ip(a)), Err(Denied::Loopback), "{a}");
        }
        for a in ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "::0.0.0.2"] {
            assert_eq!(p.check(ip(a)), Err(Denied::Unspecified), "{a}");
        }
        assert_eq!(p.check(ip("198.51.100.1")), Ok(()));
        assert_eq!(p.check(ip("2001:db8::1")), Ok(()));
        let open = PeerPolicy {
            allow_loopback: true,
            ..PeerPolicy::default()
        };
        assert_eq!(open.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(open.check(ip("::1")), Ok(()));
        assert_eq!(open.check(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(open.check(ip("0.0.0.0")), Err(Denied::Unspecified));
    }

    #[test]
    fn multicast_and_lists() {
        let p = PeerPolicy {
            deny_multicast: true,
            denied: vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.1-192.0.2.9".parse().unwrap(),
            ],
            allowed: vec!["10.1.2.3".parse().unwrap(), "127.0.0.5".parse().unwrap()],
            ..PeerPolicy::default()
        };
        assert_eq!(p.check(ip("224.0.0.1")), Err(Denied::Multicast));
        assert_eq!(p.check(ip("255.255.255.255")), Err(Denied::Multicast));
        assert_eq!(p.check(ip("ff02::1")), Err(Denied::Multicast));
        assert_eq!(p.check(ip("::ffff:224.0.0.1")), Err(Denied::Multicast));
        assert_eq!(p.check(ip("10.9.9.9")), Err(Denied::DeniedList));
        assert_eq!(p.check(ip("::ffff:10.9.9.9")), Err(Denied::DeniedList));
        assert_eq!(p.check(ip("192.0.2.5")), Err(Denied::DeniedList));
        // allowed wins over the denied list and over loopback.
        assert_eq!(p.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(p.check(ip("::ffff:10.1.2.3")), Ok(()));
        assert_eq!(p.check(ip("127.0.0.5")), Ok(()));
        assert_eq!(p.check(ip("127.0.0.6")), Err(Denied::Loopback));
    }
}
