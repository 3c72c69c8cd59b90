//! `external-ip=auto`: finding the address clients reach this host at, and
//! the check that warns when relays would advertise a private one.
//!
//! Detection asks, at once and each within `external-ip-timeout` seconds,
//! the metadata services of the clouds that publish a public address
//! (`external-ip-metadata`, by default `http://169.254.169.254`):
//!
//! | provider | request |
//! |---|---|
//! | AWS (IMDSv2) | `PUT /latest/api/token` (`X-aws-ec2-metadata-token-ttl-seconds`), then `GET /latest/meta-data/public-ipv4` with the token |
//! | GCP | `GET /computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip`, `Metadata-Flavor: Google` |
//! | Azure | `GET /metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress?api-version=2021-02-01&format=text`, `Metadata: true` |
//! | DigitalOcean | `GET /metadata/v1/interfaces/public/0/ipv4/address` |
//! | Hetzner Cloud | `GET /hetzner/v1/metadata/public-ipv4` |
//!
//! The first of that list to answer with an address wins. When none does,
//! a STUN Binding (RFC 8489 §5) goes to each `external-ip-stun` server and
//! the first XOR-MAPPED-ADDRESS back wins. Oracle Cloud's metadata service
//! (and Azure's for Standard-SKU public addresses) does not publish the
//! public address, so there STUN is the way.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::task::JoinSet;

use crate::config::Config;
use crate::stun::{self, Class, Message, attr, method};

/// A detected address and where it came from ("AWS metadata (IMDSv2)",
/// "STUN server stun.example.org:3478").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub ip: IpAddr,
    pub source: String,
}

/// One cloud's metadata request for the public IPv4 address.
struct Provider {
    /// Name in errors.
    name: &'static str,
    /// Where the address came from, for the log.
    source: &'static str,
    /// AWS IMDSv2: a session token from `PUT /latest/api/token` first, sent
    /// with the GET.
    imds_token: bool,
    path: &'static str,
    /// A header the service requires, if any.
    header: Option<(&'static str, &'static str)>,
}

/// The metadata providers, in order of preference.
static PROVIDERS: [Provider; 5] = [
    Provider {
        name: "AWS",
        source: "AWS metadata (IMDSv2)",
        imds_token: true,
        path: "/latest/meta-data/public-ipv4",
        header: None,
    },
    Provider {
        name: "GCP",
        source: "GCP metadata",
        imds_token: false,
        path: "/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip",
        header: Some(("Metadata-Flavor", "Google")),
    },
    Provider {
        name: "Azure",
        source: "Azure metadata",
        imds_token: false,
        path: "/metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress?api-version=2021-02-01&format=text",
        header: Some(("Metadata", "true")),
    },
    Provider {
        name: "DigitalOcean",
        source: "DigitalOcean metadata",
        imds_token: false,
        path: "/metadata/v1/interfaces/public/0/ipv4/address",
        header: None,
    },
    Provider {
        name: "Hetzner",
        source: "Hetzner metadata",
        imds_token: false,
        path: "/hetzner/v1/metadata/public-ipv4",
        header: None,
    },
];

/// Finds the public address as configured (see the module docs). Errors:
/// one line listing why each way failed.
pub async fn detect(cfg: &Config) -> Result<Detected, String> {
    let timeout = Duration::from_secs(u64::from(cfg.external_ip_timeout.max(1)));
    let mut why = Vec::new();
    match cfg.external_ip_metadata.as_deref() {
        None | Some("off") | Some("") => why.push("metadata: off".to_string()),
        Some(base) => match Base::parse(base) {
            Err(e) => why.push(format!("metadata: {e}")),
            Ok(base) => match metadata(&base, timeout).await {
                Ok(d) => return Ok(d),
                Err(e) => why.push(e),
            },
        },
    }
    if cfg.external_ip_stun.is_empty() {
        why.push("no external-ip-stun server".to_string());
    } else {
        match stun_servers(&cfg.external_ip_stun, timeout).await {
            Ok(d) => return Ok(d),
            Err(e) => why.push(e),
        }
    }
    Err(why.join("; "))
}

/// A metadata service's address: `http://host[:port]`.
#[derive(Clone)]
struct Base {
    host: String,
    port: u16,
}

impl Base {
    fn parse(s: &str) -> Result<Base, String> {
        let url = url::Url::parse(s).map_err(|e| format!("'{s}': {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "'{s}': only http:// is spoken to metadata services"
            ));
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => return Err(format!("'{s}' has no host")),
        };
        Ok(Base {
            host,
            port: url.port().unwrap_or(80),
        })
    }
}

/// One request to the metadata service.
async fn http(
    base: &Base,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    super::http::request(&base.host, base.port, method, path, headers).await
}

/// Asks one provider: its token first for AWS, then the GET; a 200 whose
/// body is an address.
async fn provider(base: &Base, p: &Provider) -> Result<IpAddr, String> {
    let fail = |e: String| format!("{}: {e}", p.name);
    let mut headers = Vec::new();
    let token;
    if p.imds_token {
        let (status, t) = http(
            base,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        )
        .await
        .map_err(fail)?;
        if status != 200 || t.is_empty() {
            return Err(format!("{}: token: HTTP {status}", p.name));
        }
        token = t;
        headers.push(("X-aws-ec2-metadata-token", token.as_str()));
    }
    headers.extend(p.header);
    let answer = http(base, "GET", p.path, &headers).await.map_err(fail)?;
    match answer {
        (200, body) => body
            .parse::<IpAddr>()
            .map_err(|_| format!("{}: the answer is not an address", p.name)),
        (status, _) => Err(format!("{}: HTTP {status}", p.name)),
    }
}

/// Every provider at once; the first in [`PROVIDERS`] order that found an
/// address.
async fn metadata(base: &Base, timeout: Duration) -> Result<Detected, String> {
    let base = std::sync::Arc::new(base.clone());
    let mut set = JoinSet::new();
    for (i, p) in PROVIDERS.iter().enumerate() {
        let base = base.clone();
        set.spawn(async move {
            let r = match tokio::time::timeout(timeout, provider(&base, p)).await {
                Ok(r) => r,
                Err(_) => Err(format!("{}: no answer in {} s", p.name, timeout.as_secs())),
            };
            (i, r)
        });
    }
    let mut results: Vec<Option<Result<IpAddr, String>>> = vec![None; PROVIDERS.len()];
    while let Some(done) = set.join_next().await {
        if let Ok((i, r)) = done {
            results[i] = Some(r);
        }
        // Stop as soon as the best provider still possible has answered.
        if let Some(i) = results.iter().position(|r| !matches!(r, Some(Err(_))))
            && let Some(Some(Ok(ip))) = results.get(i)
        {
            set.abort_all();
            return Ok(Detected {
                ip: *ip,
                source: PROVIDERS[i].source.to_string(),
            });
        }
    }
    let errors: Vec<String> = results
        .into_iter()
        .flatten()
        .filter_map(Result::err)
        .collect();
    Err(format!("metadata: {}", errors.join(", ")))
}

/// Every STUN server at once; the first address back.
async fn stun_servers(servers: &[String], timeout: Duration) -> Result<Detected, String> {
    let mut set = JoinSet::new();
    for s in servers {
        let s = s.clone();
        set.spawn(async move {
            match tokio::time::timeout(timeout, binding(&s)).await {
                Ok(Ok(ip)) => Ok(Detected {
                    ip,
                    source: format!("STUN server {s}"),
                }),
                Ok(Err(e)) => Err(format!("STUN {s}: {e}")),
                Err(_) => Err(format!("STUN {s}: no answer in {} s", timeout.as_secs())),
            }
        });
    }
    let mut errors = Vec::new();
    while let Some(done) = set.join_next().await {
        match done {
            Ok(Ok(d)) => {
                set.abort_all();
                return Ok(d);
            }
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join(", "))
}

/// One Binding transaction with `server` (`host:port`), sent again after
/// 250 ms, 500 ms, 1 s, ... until the caller's timeout; the mapped address.
async fn binding(server: &str) -> Result<IpAddr, String> {
    let to = tokio::net::lookup_host(server)
        .await
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or("no address")?;
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|e| e.to_string())?;
    sock.connect(to).await.map_err(|e| e.to_string())?;
    let tid: [u8; 12] = rand::random();
    let request = stun::client::request(method::BINDING, &tid, |_| {}, None, true);
    let mut wait = Duration::from_millis(250);
    let mut buf = [0u8; 1500];
    loop {
        sock.send(&request).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(got) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            let n = got.map_err(|e| e.to_string())?;
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            if m.transaction_id() != &tid || m.method() != method::BINDING {
                continue;
            }
            if m.class() != Class::Success {
                return Err("Binding refused".into());
            }
            return match m.xor_address(attr::XOR_MAPPED_ADDRESS) {
                Some(Ok(a)) => Ok(a.ip()),
                _ => Err("no XOR-MAPPED-ADDRESS in the answer".into()),
            };
        }
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Whether clients outside this host's networks could reach `ip`: not
/// loopback, private (RFC 1918, RFC 6598 shared, IPv6 ULA), link-local or
/// unspecified.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_global(IpAddr::V4(v4));
            }
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// The classic misconfiguration: relays would advertise a private or
/// loopback address to clients that come from outside. `advertised` is
/// what relays report (the external IPs, else the relay IPs, else the
/// listening addresses); `listening` the configured listening addresses
/// (empty: every local address, `local`). Warns when an advertised address
/// is not global while a configured listening address is, or, listening
/// everywhere, when no local address is global (behind NAT, in a
/// container). Returns the warning.
pub fn private_relay_warning(
    advertised: &[IpAddr],
    listening: &[IpAddr],
    local: &[IpAddr],
) -> Option<String> {
    // Listening everywhere, a client on loopback gets a loopback relay,
    // which is right for it: only the other addresses matter.
    let private: Vec<String> = advertised
        .iter()
        .filter(|ip| {
            let local_only = listening.is_empty() && ip.is_loopback();
            !is_global(**ip) && !local_only
        })
        .map(IpAddr::to_string)
        .collect();
    if private.is_empty() {
        return None;
    }
    let exposed = if listening.is_empty() {
        !local.iter().any(|ip| is_global(*ip))
    } else {
        listening.iter().any(|ip| is_global(*ip))
    };
    exposed.then(|| {
        format!(
            "relays will advertise {}, which clients outside this network cannot reach{}: if this host is behind NAT (a cloud VM's public address, a container's published ports), set external-ip=PUBLIC (or PUBLIC/PRIVATE), or external-ip=auto to detect it",
            private.join(", "),
            if listening.is_empty() {
                " (every address of this host is private)"
            } else {
                ""
            }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn global_addresses() {
        for g in [
            "203.0.113.7",
            "8.8.8.8",
            "100.128.0.1",
            "2001:db8::1",
            "::ffff:1.2.3.4",
        ] {
            assert!(is_global(g.parse().unwrap()), "{g}");
        }
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_global(p.parse().unwrap()), "{p}");
        }
    }

    #[test]
    fn private_relay_warning_when_it_matters() {
        // A public listening address with a private relay or external IP.
        let w = private_relay_warning(&ips(&["10.0.0.5"]), &ips(&["198.51.100.1"]), &[]);
        assert!(w.unwrap().contains("10.0.0.5"));
        // Everything private or loopback: a LAN or a test, no warning.
        assert!(private_relay_warning(&ips(&["127.0.0.1"]), &ips(&["127.0.0.1"]), &[]).is_none());
        assert!(private_relay_warning(&ips(&["10.0.0.5"]), &ips(&["10.0.0.5"]), &[]).is_none());
        // Listening everywhere in a container: every local address private.
        let local = ips(&["127.0.0.1", "10.88.0.5"]);
        let w = private_relay_warning(&local, &[], &local).unwrap();
        assert!(w.contains("every address of this host is private"), "{w}");
        assert!(w.contains("advertise 10.88.0.5,"), "{w}");
        let only_loopback = ips(&["127.0.0.1", "::1"]);
        assert!(private_relay_warning(&only_loopback, &[], &only_loopback).is_none());
        // ... unless the host has a public address too, or one is advertised.
        let local = ips(&["127.0.0.1", "10.88.0.5", "203.0.113.9"]);
        assert!(private_relay_warning(&local, &[], &local).is_none());
        let local = ips(&["127.0.0.1", "10.88.0.5"]);
        assert!(private_relay_warning(&ips(&["203.0.113.9"]), &[], &local).is_none());
    }
}
