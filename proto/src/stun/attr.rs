//! STUN and TURN attribute types (RFC 8489 §18.3, RFC 8656 §18) and decoders
//! for their values.
//!
//! Every decoder takes an attribute *value* (the bytes after the 4-byte
//! attribute header, without padding) and returns a typed value or an
//! [`AttrError`]; none of them panics on any input.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::MAGIC_COOKIE;

/// MAPPED-ADDRESS (RFC 8489 §14.1).
pub const MAPPED_ADDRESS: u16 = 0x0001;
/// SOURCE-ADDRESS (RFC 3489 §11.2.5): where an RFC 3489 answer came from.
pub const SOURCE_ADDRESS: u16 = 0x0004;
/// CHANGED-ADDRESS (RFC 3489 §11.2.3): the server's other address and port.
pub const CHANGED_ADDRESS: u16 = 0x0005;
/// CHANGE-REQUEST (RFC 5780 §7.2): answer from the other address and/or
/// port. Understood only while RFC 5780 is offered (else 420).
pub const CHANGE_REQUEST: u16 = 0x0003;
/// USERNAME (RFC 8489 §14.3), UTF-8, at most 513 bytes.
pub const USERNAME: u16 = 0x0006;
/// MESSAGE-INTEGRITY (RFC 8489 §14.5), 20-byte HMAC-SHA1.
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
/// ERROR-CODE (RFC 8489 §14.8).
pub const ERROR_CODE: u16 = 0x0009;
/// UNKNOWN-ATTRIBUTES (RFC 8489 §14.13), a list of 16-bit types.
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
/// CHANNEL-NUMBER (RFC 8656 §18.1).
pub const CHANNEL_NUMBER: u16 = 0x000C;
/// LIFETIME (RFC 8656 §18.2), seconds.
pub const LIFETIME: u16 = 0x000D;
/// BANDWIDTH (draft-thomson / RFC 5766 drafts); accepted and ignored.
pub const BANDWIDTH: u16 = 0x0010;
/// XOR-PEER-ADDRESS (RFC 8656 §18.3).
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
/// DATA (RFC 8656 §18.4).
pub const DATA: u16 = 0x0013;
/// REALM (RFC 8489 §14.9).
pub const REALM: u16 = 0x0014;
/// NONCE (RFC 8489 §14.10).
pub const NONCE: u16 = 0x0015;
/// XOR-RELAYED-ADDRESS (RFC 8656 §18.5).
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
/// REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6).
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
/// EVEN-PORT (RFC 8656 §18.7).
pub const EVEN_PORT: u16 = 0x0018;
/// REQUESTED-TRANSPORT (RFC 8656 §18.8).
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
/// The REQUESTED-TRANSPORT protocol number of UDP (IANA: 17).
pub const TRANSPORT_UDP: u8 = 17;
/// The REQUESTED-TRANSPORT protocol number of TCP (IANA: 6, RFC 6062).
pub const TRANSPORT_TCP: u8 = 6;
/// DONT-FRAGMENT (RFC 8656 §18.9).
pub const DONT_FRAGMENT: u16 = 0x001A;
/// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), a 16- to 32-byte HMAC-SHA256.
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// PASSWORD-ALGORITHM (RFC 8489 §14.12): the algorithm the client chose
/// from PASSWORD-ALGORITHMS, with its parameters.
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
/// USERHASH (RFC 8489 §14.4): SHA-256(username ":" realm), 32 bytes, in
/// place of USERNAME.
pub const USERHASH: u16 = 0x001E;
/// XOR-MAPPED-ADDRESS (RFC 8489 §14.2).
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// RESERVATION-TOKEN (RFC 8656 §18.10), 8 bytes.
pub const RESERVATION_TOKEN: u16 = 0x0022;
/// PRIORITY (RFC 8445 §16.1); ICE, accepted and ignored.
pub const PRIORITY: u16 = 0x0024;
/// USE-CANDIDATE (RFC 8445 §16.1); ICE, accepted and ignored.
pub const USE_CANDIDATE: u16 = 0x0025;
/// PADDING (RFC 5780 §7.6): a Binding request's padding, echoed in size.
/// Understood only while RFC 5780 is offered.
pub const PADDING: u16 = 0x0026;
/// RESPONSE-PORT (RFC 5780 §7.5): answer to this port of the client's IP.
/// Understood only while RFC 5780 is offered.
pub const RESPONSE_PORT: u16 = 0x0027;
/// CONNECTION-ID (RFC 6062 §6.2.1): a peer connection's 32-bit name.
pub const CONNECTION_ID: u16 = 0x002A;
/// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.11): asks for an IPv6 relayed
/// address besides the IPv4 one (a dual allocation).
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
/// ADDRESS-ERROR-CODE (RFC 8656 §18.12).
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
/// ADDITIONAL-ADDRESS-FAMILY as draft-ietf-tram-turnbis numbered it, and
/// coturn 4.6 still sends it (`turnutils_uclient -Z`).
pub const ADDITIONAL_ADDRESS_FAMILY_DRAFT: u16 = 0x8032;
/// ADDRESS-ERROR-CODE as the draft numbered it; answered to requests that
/// used [`ADDITIONAL_ADDRESS_FAMILY_DRAFT`].
pub const ADDRESS_ERROR_CODE_DRAFT: u16 = 0x8033;
/// PASSWORD-ALGORITHMS (RFC 8489 §14.11).
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
/// ALTERNATE-DOMAIN (RFC 8489 §14.16).
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
/// ICMP (RFC 8656 §18.13).
pub const ICMP: u16 = 0x8004;
/// RESPONSE-ORIGIN (RFC 5780 §7.3): the address a response was sent from.
pub const RESPONSE_ORIGIN: u16 = 0x802B;
/// OTHER-ADDRESS (RFC 5780 §7.4): the server's other address and port.
pub const OTHER_ADDRESS: u16 = 0x802C;
/// SOFTWARE (RFC 8489 §14.14).
pub const SOFTWARE: u16 = 0x8022;
/// ORIGIN (draft-ietf-tram-stun-origin, as coturn): the web origin of the
/// page that made the request; maps the request to a realm.
pub const ORIGIN: u16 = 0x802F;
/// ALTERNATE-SERVER (RFC 8489 §14.15).
pub const ALTERNATE_SERVER: u16 = 0x8023;
/// FINGERPRINT (RFC 8489 §14.7), CRC-32 of the message XOR 0x5354554E.
pub const FINGERPRINT: u16 = 0x8028;
/// ICE-CONTROLLED (RFC 8445 §16.1).
pub const ICE_CONTROLLED: u16 = 0x8029;
/// ICE-CONTROLLING (RFC 8445 §16.1).
pub const ICE_CONTROLLING: u16 = 0x802A;
/// MOBILITY-TICKET (RFC 8016 §3.1); comprehension-optional. With `mobility`
/// on, an empty one in an Allocate asks for a ticket and a Refresh carrying
/// one moves the allocation to a new 5-tuple; off, it is answered with 405.
pub const MOBILITY_TICKET: u16 = 0x8030;

/// XOR value applied to the CRC-32 in FINGERPRINT (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// Whether an attribute type is comprehension-required (RFC 8489 §14:
/// types 0x0000–0x7FFF).
pub const fn is_comprehension_required(typ: u16) -> bool {
    typ < 0x8000
}

/// Whether this server understands a comprehension-required attribute type.
///
/// A request carrying a comprehension-required attribute for which this
/// returns `false` is answered with 420 Unknown Attribute (RFC 8489 §6.3.1).
pub const fn is_understood(typ: u16) -> bool {
    matches!(
        typ,
        MAPPED_ADDRESS
            | USERNAME
            | MESSAGE_INTEGRITY
            | ERROR_CODE
            | UNKNOWN_ATTRIBUTES
            | CHANNEL_NUMBER
            | LIFETIME
            | BANDWIDTH
            | XOR_PEER_ADDRESS
            | DATA
            | REALM
            | NONCE
            | XOR_RELAYED_ADDRESS
            | REQUESTED_ADDRESS_FAMILY
            | EVEN_PORT
            | REQUESTED_TRANSPORT
            | DONT_FRAGMENT
            | XOR_MAPPED_ADDRESS
            | RESERVATION_TOKEN
            | PRIORITY
            | USE_CANDIDATE
            | MESSAGE_INTEGRITY_SHA256
            | CONNECTION_ID
            | PASSWORD_ALGORITHM
            | USERHASH
    ) || !is_comprehension_required(typ)
}

/// A malformed attribute value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrError {
    /// The value has the wrong length for its type.
    BadLength { typ: u16, len: usize },
    /// An address attribute names a family other than 0x01 (IPv4) or 0x02 (IPv6).
    BadFamily { typ: u16, family: u8 },
    /// A text attribute is not valid UTF-8.
    NotUtf8 { typ: u16 },
    /// ERROR-CODE with a class outside 3..=6 or a number above 99.
    BadErrorCode,
}

impl fmt::Display for AttrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrError::BadLength { typ, len } => {
                write!(f, "attribute 0x{typ:04x} has invalid length {len}")
            }
            AttrError::BadFamily { typ, family } => {
                write!(
                    f,
                    "attribute 0x{typ:04x} has unknown address family 0x{family:02x}"
                )
            }
            AttrError::NotUtf8 { typ } => write!(f, "attribute 0x{typ:04x} is not valid UTF-8"),
            AttrError::BadErrorCode => write!(f, "ERROR-CODE is malformed"),
        }
    }
}

impl std::error::Error for AttrError {}

/// Decodes MAPPED-ADDRESS style values: `0x00, family, port, address`
/// (RFC 8489 §14.1). 8 bytes for IPv4, 20 for IPv6.
pub fn decode_address(typ: u16, value: &[u8]) -> Result<SocketAddr, AttrError> {
    let bad_len = AttrError::BadLength {
        typ,
        len: value.len(),
    };
    if value.len() < 4 {
        return Err(bad_len);
    }
    let port = u16::from_be_bytes([value[2], value[3]]);
    match value[1] {
        0x01 => {
            let octets: [u8; 4] = value[4..].try_into().map_err(|_| bad_len)?;
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), port))
        }
        0x02 => {
            let octets: [u8; 16] = value[4..].try_into().map_err(|_| bad_len)?;
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        family => Err(AttrError::BadFamily { typ, family }),
    }
}

/// Decodes XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS and XOR-RELAYED-ADDRESS
/// values (RFC 8489 §14.2): the port is XORed with the top 16 bits of the
/// magic cookie, the address with the cookie (IPv4) or the cookie followed by
/// the 12-byte transaction ID (IPv6).
pub fn decode_xor_address(
    typ: u16,
    value: &[u8],
    transaction_id: &[u8; 12],
) -> Result<SocketAddr, AttrError> {
    let plain = decode_address(typ, value)?;
    Ok(xor_address(plain, transaction_id))
}

/// Applies the RFC 8489 §14.2 XOR to an address; the operation is its own
/// inverse, so it both encodes and decodes.
pub fn xor_address(addr: SocketAddr, transaction_id: &[u8; 12]) -> SocketAddr {
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            let x = u32::from(ip) ^ MAGIC_COOKIE;
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port)
        }
        IpAddr::V6(ip) => {
            let mut octets = ip.octets();
            let cookie = MAGIC_COOKIE.to_be_bytes();
            for (i, o) in octets.iter_mut().enumerate() {
                *o ^= if i < 4 {
                    cookie[i]
                } else {
                    transaction_id[i - 4]
                };
            }
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port)
        }
    }
}

/// Decodes a 32-bit attribute value such as LIFETIME (seconds).
pub fn decode_u32(typ: u16, value: &[u8]) -> Result<u32, AttrError> {
    let bytes: [u8; 4] = value.try_into().map_err(|_| AttrError::BadLength {
        typ,
        len: value.len(),
    })?;
    Ok(u32::from_be_bytes(bytes))
}

/// Decodes a UTF-8 text attribute (USERNAME, REALM, NONCE, SOFTWARE).
pub fn decode_text(typ: u16, value: &[u8]) -> Result<&str, AttrError> {
    std::str::from_utf8(value).map_err(|_| AttrError::NotUtf8 { typ })
}

/// Decodes PASSWORD-ALGORITHM (RFC 8489 §14.12): a 16-bit algorithm
/// number and 16-bit parameter length, then the parameters (none for MD5
/// and SHA-256). Returns the algorithm number.
pub fn decode_password_algorithm(value: &[u8]) -> Result<u16, AttrError> {
    let bad = AttrError::BadLength {
        typ: PASSWORD_ALGORITHM,
        len: value.len(),
    };
    if value.len() < 4 {
        return Err(bad);
    }
    let params = usize::from(u16::from_be_bytes([value[2], value[3]]));
    if value.len() != 4 + params {
        return Err(bad);
    }
    Ok(u16::from_be_bytes([value[0], value[1]]))
}

/// Decodes CHANGE-REQUEST (RFC 5780 §7.2): 32 bits, "change IP" is 0x4
/// and "change port" 0x2. Returns (change IP, change port).
pub fn decode_change_request(value: &[u8]) -> Result<(bool, bool), AttrError> {
    let v: [u8; 4] = value.try_into().map_err(|_| AttrError::BadLength {
        typ: CHANGE_REQUEST,
        len: value.len(),
    })?;
    Ok((v[3] & 0x4 != 0, v[3] & 0x2 != 0))
}

/// Decodes CHANNEL-NUMBER (RFC 8656 §18.1): a 16-bit number followed by
/// 16 bits RFFU.
pub fn decode_channel_number(value: &[u8]) -> Result<u16, AttrError> {
    if value.len() != 4 {
        return Err(AttrError::BadLength {
            typ: CHANNEL_NUMBER,
            len: value.len(),
        });
    }
    Ok(u16::from_be_bytes([value[0], value[1]]))
}

/// Decodes REQUESTED-TRANSPORT (RFC 8656 §18.8): the IANA protocol number
/// (17 = UDP) in the first byte, then 24 bits RFFU.
pub fn decode_requested_transport(value: &[u8]) -> Result<u8, AttrError> {
    if value.len() != 4 {
        return Err(AttrError::BadLength {
            typ: REQUESTED_TRANSPORT,
            len: value.len(),
        });
    }
    Ok(value[0])
}

/// Decodes REQUESTED-ADDRESS-FAMILY (RFC 8656 §18.6): 0x01 IPv4, 0x02 IPv6
/// in the first byte; the raw family byte is returned.
pub fn decode_requested_family(value: &[u8]) -> Result<u8, AttrError> {
    if value.len() != 4 {
        return Err(AttrError::BadLength {
            typ: REQUESTED_ADDRESS_FAMILY,
            len: value.len(),
        });
    }
    Ok(value[0])
}

/// Decodes EVEN-PORT (RFC 8656 §18.7): returns the R bit (reserve the next
/// higher port as well).
pub fn decode_even_port(value: &[u8]) -> Result<bool, AttrError> {
    if value.len() != 1 {
        return Err(AttrError::BadLength {
            typ: EVEN_PORT,
            len: value.len(),
        });
    }
    Ok(value[0] & 0x80 != 0)
}

/// Decodes RESERVATION-TOKEN (RFC 8656 §18.10), 8 bytes.
pub fn decode_reservation_token(value: &[u8]) -> Result<[u8; 8], AttrError> {
    value.try_into().map_err(|_| AttrError::BadLength {
        typ: RESERVATION_TOKEN,
        len: value.len(),
    })
}

/// Decodes ERROR-CODE (RFC 8489 §14.8) into `(code, reason)`, code 300..=699.
pub fn decode_error_code(value: &[u8]) -> Result<(u16, &str), AttrError> {
    if value.len() < 4 {
        return Err(AttrError::BadLength {
            typ: ERROR_CODE,
            len: value.len(),
        });
    }
    let class = u16::from(value[2] & 0x07);
    let number = u16::from(value[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(AttrError::BadErrorCode);
    }
    let reason = decode_text(ERROR_CODE, &value[4..])?;
    Ok((class * 100 + number, reason))
}

/// Decodes UNKNOWN-ATTRIBUTES (RFC 8489 §14.13) into the listed types.
pub fn decode_unknown_attributes(value: &[u8]) -> Result<Vec<u16>, AttrError> {
    if !value.len().is_multiple_of(2) {
        return Err(AttrError::BadLength {
            typ: UNKNOWN_ATTRIBUTES,
            len: value.len(),
        });
    }
    Ok(value
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_address_round_trips_both_families() {
        let tid = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        for addr in [
            "192.0.2.1:32853".parse::<SocketAddr>().unwrap(),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap(),
        ] {
            let x = xor_address(addr, &tid);
            assert_ne!(x, addr);
            assert_eq!(xor_address(x, &tid), addr);
        }
    }

    #[test]
    fn decoders_reject_bad_lengths_without_panicking() {
        for len in 0..24 {
            let v = vec![0x02u8; len];
            let _ = decode_address(XOR_PEER_ADDRESS, &v);
            let _ = decode_u32(LIFETIME, &v);
            let _ = decode_channel_number(&v);
            let _ = decode_even_port(&v);
            let _ = decode_reservation_token(&v);
            let _ = decode_error_code(&v);
            let _ = decode_unknown_attributes(&v);
            let _ = decode_requested_transport(&v);
            let _ = decode_requested_family(&v);
        }
        assert_eq!(
            decode_address(MAPPED_ADDRESS, &[0, 3, 0, 1, 1, 2, 3, 4]),
            Err(AttrError::BadFamily {
                typ: MAPPED_ADDRESS,
                family: 3
            })
        );
    }

    #[test]
    fn error_code_decodes() {
        let v = [0, 0, 4, 37, b'A', b'l', b'l'];
        assert_eq!(decode_error_code(&v), Ok((437, "All")));
        assert_eq!(
            decode_error_code(&[0, 0, 7, 0]),
            Err(AttrError::BadErrorCode)
        );
    }

    #[test]
    fn understood_set() {
        assert!(is_understood(XOR_PEER_ADDRESS));
        assert!(is_understood(SOFTWARE));
        assert!(is_understood(0xC001));
        assert!(!is_understood(CHANGE_REQUEST));
        assert!(is_understood(USERHASH));
        assert!(is_understood(PASSWORD_ALGORITHM));
        assert!(!is_understood(0x7FFF));
    }
}
