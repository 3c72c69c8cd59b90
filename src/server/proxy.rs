//! The PROXY protocol (HAProxy's, versions 1 and 2) on TCP and TLS
//! listeners: a load balancer named by `proxy-protocol-allow` starts each
//! connection with a header giving the client's real address, which this
//! server then uses as the client side of the 5-tuple (so XOR-MAPPED-ADDRESS,
//! rate limits, quotas, peer checks and logs see the client, not the
//! balancer). Connections from anywhere else are served directly, and one
//! that starts with a PROXY header is refused: only a listed balancer may
//! speak for someone else.
//!
//! The header is read byte-exactly (no read past its end), so what follows
//! it — a TLS handshake or STUN — reaches the usual code untouched. Parsing
//! is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;

use crate::turn::policy::IpRange;

/// The 12-byte signature a version 2 header starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, bytes, CRLF included (the specification's).
const V1_MAX: usize = 107;
/// Most address and TLV bytes accepted after a version 2 header's first 16
/// (an IPv6 address block is 36; TLVs from balancers are a few hundred).
const V2_MAX_BODY: usize = 1024;

/// What a balancer's header says about a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Relayed for the client at `source`, which connected to `destination`
    /// on the balancer.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (version 2 LOCAL, version 1 UNKNOWN,
    /// or an address family other than IP): a health check, served as the
    /// balancer's.
    Local,
}

/// Whether connections from `ip` come from a balancer named in
/// `proxy-protocol-allow`.
pub fn is_balancer(allow: &[IpRange], ip: IpAddr) -> bool {
    allow.iter().any(|r| r.contains(ip))
}

/// Whether the first bytes of a connection (`prefix`, as many as have
/// arrived, at least one) may be the start of a PROXY header: a header from
/// a source that is not a listed balancer is refused on this.
pub fn looks_like_header(prefix: &[u8]) -> bool {
    let starts = |sig: &[u8]| {
        let n = prefix.len().min(sig.len());
        n > 0 && prefix[..n] == sig[..n]
    };
    starts(b"PROXY ") || starts(V2_SIGNATURE)
}

/// Reads one PROXY header (version 1 or 2) from the start of `stream`, and
/// nothing after it. Errors: the connection closed or failed, no header,
/// or a malformed one (the message says which).
pub async fn read_header<S: AsyncReadExt + Unpin>(stream: &mut S) -> Result<Origin, String> {
    let mut head = [0u8; 16];
    stream
        .read_exact(&mut head[..5])
        .await
        .map_err(|e| format!("reading the PROXY header: {e}"))?;
    if &head[..5] == b"PROXY" {
        let mut line = head[..5].to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(format!("PROXY v1 header longer than {V1_MAX} bytes"));
            }
            let mut b = [0u8; 1];
            stream
                .read_exact(&mut b)
                .await
                .map_err(|e| format!("reading the PROXY header: {e}"))?;
            line.push(b[0]);
        }
        let header = ppp::v1::Header::try_from(line.as_slice())
            .map_err(|e| format!("malformed PROXY v1 header: {e}"))?;
        return Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Origin::Proxied {
                source: SocketAddr::new(a.source_address.into(), a.source_port),
                destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
            },
            ppp::v1::Addresses::Tcp6(a) => Origin::Proxied {
                source: SocketAddr::new(a.source_address.into(), a.source_port),
                destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
            },
            ppp::v1::Addresses::Unknown => Origin::Local,
        });
    }
    if head[..5] != V2_SIGNATURE[..5] {
        return Err("the connection does not start with a PROXY header".into());
    }
    stream
        .read_exact(&mut head[5..])
        .await
        .map_err(|e| format!("reading the PROXY header: {e}"))?;
    if &head[..12] != V2_SIGNATURE {
        return Err("malformed PROXY v2 signature".into());
    }
    let body = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if body > V2_MAX_BODY {
        return Err(format!(
            "PROXY v2 header of {body} bytes (more than {V2_MAX_BODY})"
        ));
    }
    let mut all = head.to_vec();
    all.resize(16 + body, 0);
    stream
        .read_exact(&mut all[16..])
        .await
        .map_err(|e| format!("reading the PROXY header: {e}"))?;
    let header = ppp::v2::Header::try_from(all.as_slice())
        .map_err(|e| format!("malformed PROXY v2 header: {e}"))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(Origin::Local);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Origin::Proxied {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        },
        ppp::v2::Addresses::IPv6(a) => Origin::Proxied {
            source: SocketAddr::new(a.source_address.into(), a.source_port),
            destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
        },
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => Origin::Local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> (Result<Origin, String>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut input = bytes;
        let got = rt.block_on(read_header(&mut input));
        (got, input.to_vec())
    }

    fn proxied(source: &str, destination: &str) -> Origin {
        Origin::Proxied {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        }
    }

    #[test]
    fn version_1_is_read_up_to_its_end() {
        let (got, rest) = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 3478\r\n\x00\x01rest");
        assert_eq!(got, Ok(proxied("192.0.2.7:40000", "198.51.100.1:3478")));
        assert_eq!(rest, b"\x00\x01rest");
        let (got, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n");
        assert_eq!(got, Ok(proxied("[2001:db8::7]:40000", "[2001:db8::1]:443")));
        assert_eq!(read(b"PROXY UNKNOWN\r\n\x16").0, Ok(Origin::Local));
    }

    #[test]
    fn version_2_is_read_up_to_its_end() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "192.0.2.7:40000".parse::<SocketAddr>().unwrap(),
                "198.51.100.1:5349".parse::<SocketAddr>().unwrap(),
            ),
        )
        .write_tlv(ppp::v2::Type::NoOp, &[1, 2, 3])
        .unwrap()
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (got, rest) = read(&bytes);
        assert_eq!(got, Ok(proxied("192.0.2.7:40000", "198.51.100.1:5349")));
        assert_eq!(rest, b"\x16\x03\x01");
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(read(&local).0, Ok(Origin::Local));
    }

    #[test]
    fn malformed_or_missing_headers_are_errors() {
        for bad in [
            &b"\x00\x01\x00\x00\x21\x12\xa4\x42"[..],
            b"PROXY TCP4 192.0.2.7\r\n",
            b"PROXY TCP4 999.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY",
            b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
        ] {
            assert!(read(bad).0.is_err(), "{bad:?}");
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert!(read(&long).0.unwrap_err().contains("longer"));
    }

    #[test]
    fn header_prefixes_are_recognised_and_stun_is_not() {
        assert!(looks_like_header(b"P"));
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"\r\n\r\n\0"));
        assert!(!looks_like_header(b"\x00\x01\x00\x00"));
        assert!(!looks_like_header(b"\x16\x03\x01"));
        assert!(!looks_like_header(b"PRO "));
        assert!(!looks_like_header(b""));
        let allow: Vec<IpRange> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_balancer(&allow, "10.1.2.3".parse().unwrap()));
        assert!(!is_balancer(&allow, "192.0.2.1".parse().unwrap()));
    }
}
