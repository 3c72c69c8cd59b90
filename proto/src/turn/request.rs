//! Decoding requests into typed values, in one place: everything the core
//! decides reads these fields, and every error a malformed request earns
//! (400 Bad Request, 420 Unknown Attribute, 440 Address Family not
//! Supported) comes from here.

use std::net::SocketAddr;

use super::Family;
use crate::stun::channel::{MAX_CHANNEL_RFC5766, MAX_CHANNEL_RFC8656, MIN_CHANNEL};
use crate::stun::{ErrorCode, MAX_ATTRIBUTES, Message, attr, method};

/// The comprehension-required attributes of `msg` this server does not
/// understand (RFC 8489 §6.3.1: answered with 420 and UNKNOWN-ATTRIBUTES);
/// empty when there are none.
pub fn unknown_attributes<'u>(msg: &Message<'_>, out: &'u mut [u16; 16]) -> &'u [u16] {
    let n = msg.unknown_required(out);
    &out[..n]
}

/// Who a request says it is: USERNAME, or USERHASH in its place
/// (RFC 8489 §14.3, §14.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserId<'m> {
    Name(&'m str),
    /// SHA-256(username ":" realm), 32 bytes.
    Hash(&'m [u8]),
}

/// The long-term credentials a request carries (RFC 8489 §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'m> {
    pub user: UserId<'m>,
    pub realm: &'m str,
    pub nonce: &'m [u8],
    /// PASSWORD-ALGORITHM's algorithm number, if present.
    pub password_algorithm: Option<u16>,
    /// PASSWORD-ALGORITHMS as the client echoed it, if present.
    pub password_algorithms: Option<&'m [u8]>,
}

impl<'m> Credentials<'m> {
    /// USERNAME (or USERHASH), REALM and NONCE of a request that has
    /// MESSAGE-INTEGRITY(-SHA256), with PASSWORD-ALGORITHM(S) if present.
    /// Error: 400 when one of the three is missing or malformed (not UTF-8,
    /// a USERHASH not 32 bytes, a malformed PASSWORD-ALGORITHM)
    /// (RFC 8489 §9.2.4).
    pub fn decode(msg: &Message<'m>) -> Result<Self, ErrorCode> {
        let user = match (msg.text(attr::USERNAME), msg.get(attr::USERHASH)) {
            (Some(Ok(name)), _) => UserId::Name(name),
            (None, Some(hash)) if hash.len() == 32 => UserId::Hash(hash),
            _ => return Err(ErrorCode::BadRequest),
        };
        let password_algorithm = msg
            .get(attr::PASSWORD_ALGORITHM)
            .map(attr::decode_password_algorithm)
            .transpose()
            .map_err(|_| ErrorCode::BadRequest)?;
        match (msg.text(attr::REALM), msg.get(attr::NONCE)) {
            (Some(Ok(realm)), Some(nonce)) => Ok(Credentials {
                user,
                realm,
                nonce,
                password_algorithm,
                password_algorithms: msg.get(attr::PASSWORD_ALGORITHMS),
            }),
            _ => Err(ErrorCode::BadRequest),
        }
    }
}

/// A request by method, decoded.
// CreatePermission holds its peers inline (up to 40): one value on the
// stack per request, where boxing would allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'m> {
    /// Binding (RFC 8489 §3): no attributes to decode.
    Binding,
    Allocate(Allocate<'m>),
    Refresh(Refresh<'m>),
    CreatePermission(CreatePermission),
    ChannelBind(ChannelBind),
    /// Connect (RFC 6062 §4.3): XOR-PEER-ADDRESS, the peer to connect to.
    Connect(SocketAddr),
    /// ConnectionBind (RFC 6062 §4.4): CONNECTION-ID.
    ConnectionBind(u32),
}

impl<'m> Request<'m> {
    /// Decodes a request of a method the server serves. `rfc5766_channels`
    /// widens the channel numbers accepted from 0x4000–0x4FFF to
    /// 0x4000–0x7FFF. Errors: 400 for a missing or malformed attribute,
    /// another method, or a combination RFC 8656 forbids; 440 for an
    /// unknown REQUESTED-ADDRESS-FAMILY.
    pub fn decode(msg: &Message<'m>, rfc5766_channels: bool) -> Result<Self, ErrorCode> {
        Ok(match msg.method() {
            method::BINDING => Request::Binding,
            method::ALLOCATE => Request::Allocate(Allocate::decode(msg)?),
            method::REFRESH => Request::Refresh(Refresh::decode(msg)?),
            method::CREATE_PERMISSION => Request::CreatePermission(CreatePermission::decode(msg)?),
            method::CHANNEL_BIND => {
                Request::ChannelBind(ChannelBind::decode(msg, rfc5766_channels)?)
            }
            method::CONNECT => Request::Connect(
                msg.xor_address(attr::XOR_PEER_ADDRESS)
                    .and_then(Result::ok)
                    .ok_or(ErrorCode::BadRequest)?,
            ),
            method::CONNECTION_BIND => Request::ConnectionBind(
                msg.get(attr::CONNECTION_ID)
                    .and_then(|v| v.try_into().ok())
                    .map(u32::from_be_bytes)
                    .ok_or(ErrorCode::BadRequest)?,
            ),
            _ => return Err(ErrorCode::BadRequest),
        })
    }
}

/// An Allocate request (RFC 8656 §7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocate<'m> {
    /// REQUESTED-TRANSPORT: the IANA protocol number (17 is UDP).
    pub transport: u8,
    /// EVEN-PORT: `Some(reserve_next)` when present (the R bit).
    pub even_port: Option<bool>,
    /// RESERVATION-TOKEN: claim a port reserved by an earlier EVEN-PORT.
    pub reservation_token: Option<[u8; 8]>,
    /// REQUESTED-ADDRESS-FAMILY.
    pub family: Option<Family>,
    /// ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §7.2): an IPv6 relayed address
    /// besides the IPv4 one (a dual allocation). `Some(true)` when the
    /// request used the draft's attribute number (coturn's clients), which
    /// the answer's ADDRESS-ERROR-CODE then uses too.
    pub dual: Option<bool>,
    /// LIFETIME, seconds, as asked.
    pub lifetime: Option<u32>,
    /// DONT-FRAGMENT.
    pub dont_fragment: bool,
    /// MOBILITY-TICKET (RFC 8016 §3.1): an empty one asks for mobility.
    pub mobility_ticket: Option<&'m [u8]>,
}

impl<'m> Allocate<'m> {
    /// Errors: 400 without REQUESTED-TRANSPORT, for a malformed attribute,
    /// for RESERVATION-TOKEN together with EVEN-PORT,
    /// REQUESTED-ADDRESS-FAMILY or ADDITIONAL-ADDRESS-FAMILY, for
    /// ADDITIONAL-ADDRESS-FAMILY together with REQUESTED-ADDRESS-FAMILY or
    /// naming anything but IPv6 (RFC 8656 §7.2); 440 for an unknown
    /// REQUESTED-ADDRESS-FAMILY.
    pub fn decode(msg: &Message<'m>) -> Result<Self, ErrorCode> {
        let transport = match msg.get(attr::REQUESTED_TRANSPORT) {
            Some(v) => attr::decode_requested_transport(v).map_err(|_| ErrorCode::BadRequest)?,
            None => return Err(ErrorCode::BadRequest),
        };
        let even_port = optional(msg, attr::EVEN_PORT, attr::decode_even_port)?;
        let reservation_token =
            optional(msg, attr::RESERVATION_TOKEN, attr::decode_reservation_token)?;
        let family = requested_family(msg)?;
        let rfc = optional(
            msg,
            attr::ADDITIONAL_ADDRESS_FAMILY,
            attr::decode_requested_family,
        )?;
        let draft = optional(
            msg,
            attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT,
            attr::decode_requested_family,
        )?;
        let dual = match (rfc, draft) {
            (None, None) => None,
            (Some(0x02), None) if family.is_none() => Some(false),
            (None, Some(0x02)) if family.is_none() => Some(true),
            _ => return Err(ErrorCode::BadRequest),
        };
        if reservation_token.is_some()
            && (even_port.is_some() || family.is_some() || dual.is_some())
        {
            return Err(ErrorCode::BadRequest);
        }
        Ok(Allocate {
            transport,
            even_port,
            reservation_token,
            family,
            dual,
            lifetime: lifetime(msg)?,
            dont_fragment: msg.has(attr::DONT_FRAGMENT),
            mobility_ticket: msg.get(attr::MOBILITY_TICKET),
        })
    }
}

/// A Refresh request (RFC 8656 §7.3, RFC 8016 §3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refresh<'m> {
    /// LIFETIME, seconds, as asked; 0 deletes the allocation.
    pub lifetime: Option<u32>,
    /// REQUESTED-ADDRESS-FAMILY: must be one of the allocation's (else
    /// 443); with LIFETIME 0 on a dual allocation, only that family's
    /// relayed address is deleted.
    pub family: Option<RequestedFamily>,
    /// MOBILITY-TICKET: the allocation to move to this 5-tuple.
    pub mobility_ticket: Option<&'m [u8]>,
}

/// A REQUESTED-ADDRESS-FAMILY value in a Refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestedFamily {
    Known(Family),
    /// A value other than IPv4 (0x01) and IPv6 (0x02): matches no
    /// allocation.
    Unknown(u8),
}

impl<'m> Refresh<'m> {
    /// Error: 400 for a malformed LIFETIME or REQUESTED-ADDRESS-FAMILY.
    pub fn decode(msg: &Message<'m>) -> Result<Self, ErrorCode> {
        let family = optional(
            msg,
            attr::REQUESTED_ADDRESS_FAMILY,
            attr::decode_requested_family,
        )?
        .map(|f| match f {
            0x01 => RequestedFamily::Known(Family::V4),
            0x02 => RequestedFamily::Known(Family::V6),
            other => RequestedFamily::Unknown(other),
        });
        Ok(Refresh {
            lifetime: lifetime(msg)?,
            family,
            mobility_ticket: msg.get(attr::MOBILITY_TICKET),
        })
    }
}

/// A CreatePermission request (RFC 8656 §9): one or more peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePermission {
    peers: [Option<SocketAddr>; MAX_ATTRIBUTES],
    len: usize,
}

impl CreatePermission {
    /// Error: 400 without XOR-PEER-ADDRESS or with a malformed one.
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        let mut peers = [None; MAX_ATTRIBUTES];
        let mut len = 0;
        for value in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let peer =
                attr::decode_xor_address(attr::XOR_PEER_ADDRESS, value, msg.transaction_id())
                    .map_err(|_| ErrorCode::BadRequest)?;
            // A message holds at most MAX_ATTRIBUTES attributes.
            if let Some(slot) = peers.get_mut(len) {
                *slot = Some(peer);
                len += 1;
            }
        }
        if len == 0 {
            return Err(ErrorCode::BadRequest);
        }
        Ok(CreatePermission { peers, len })
    }

    /// The XOR-PEER-ADDRESS values, in order (ports are carried but a
    /// permission covers the whole IP address).
    pub fn peers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.peers[..self.len].iter().flatten().copied()
    }
}

/// A ChannelBind request (RFC 8656 §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBind {
    /// CHANNEL-NUMBER, within the accepted range.
    pub number: u16,
    /// XOR-PEER-ADDRESS.
    pub peer: SocketAddr,
}

impl ChannelBind {
    /// Errors: 400 when CHANNEL-NUMBER or XOR-PEER-ADDRESS is missing or
    /// malformed, or the number is outside 0x4000–0x4FFF (0x4000–0x7FFF
    /// with `rfc5766_channels`).
    pub fn decode(msg: &Message<'_>, rfc5766_channels: bool) -> Result<Self, ErrorCode> {
        let number = msg
            .get(attr::CHANNEL_NUMBER)
            .map(attr::decode_channel_number)
            .and_then(Result::ok)
            .ok_or(ErrorCode::BadRequest)?;
        let max = if rfc5766_channels {
            MAX_CHANNEL_RFC5766
        } else {
            MAX_CHANNEL_RFC8656
        };
        if !(MIN_CHANNEL..=max).contains(&number) {
            return Err(ErrorCode::BadRequest);
        }
        let peer = msg
            .get(attr::XOR_PEER_ADDRESS)
            .map(|v| attr::decode_xor_address(attr::XOR_PEER_ADDRESS, v, msg.transaction_id()))
            .and_then(Result::ok)
            .ok_or(ErrorCode::BadRequest)?;
        Ok(ChannelBind { number, peer })
    }
}

/// Decodes an optional attribute; a malformed one is 400.
fn optional<'m, T, E>(
    msg: &Message<'m>,
    typ: u16,
    decode: impl FnOnce(&'m [u8]) -> Result<T, E>,
) -> Result<Option<T>, ErrorCode> {
    msg.get(typ)
        .map(decode)
        .transpose()
        .map_err(|_| ErrorCode::BadRequest)
}

/// LIFETIME, seconds; 400 when malformed.
fn lifetime(msg: &Message<'_>) -> Result<Option<u32>, ErrorCode> {
    optional(msg, attr::LIFETIME, |v| attr::decode_u32(attr::LIFETIME, v))
}

/// REQUESTED-ADDRESS-FAMILY of an Allocate: 440 for an unknown family,
/// 400 when malformed (RFC 8656 §7.2).
fn requested_family(msg: &Message<'_>) -> Result<Option<Family>, ErrorCode> {
    match optional(
        msg,
        attr::REQUESTED_ADDRESS_FAMILY,
        attr::decode_requested_family,
    )? {
        None => Ok(None),
        Some(0x01) => Ok(Some(Family::V4)),
        Some(0x02) => Ok(Some(Family::V6)),
        Some(_) => Err(ErrorCode::AddressFamilyNotSupported),
    }
}
