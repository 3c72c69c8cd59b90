//! STUN message codec (RFC 8489) with the TURN methods and attributes of
//! RFC 8656, and ChannelData framing (RFC 8656 §12.4).
//!
//! Parsing is zero-copy: [`Message`] borrows the received bytes and keeps a
//! small inline index of attribute positions, so decoding a request allocates
//! nothing. [`MessageWriter`] appends a message to a caller-owned `Vec<u8>`
//! that is reused across packets. Malformed input always yields a
//! [`DecodeError`], never a panic.

pub mod attr;
pub mod channel;
pub mod client;
mod error;

pub use error::ErrorCode;

use std::fmt;
use std::net::SocketAddr;

use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;
use sha2::Sha256;

/// The fixed magic cookie in every RFC 5389/8489 message header.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN message header, bytes.
pub const HEADER_LEN: usize = 20;
/// Most attributes one message may carry; more is treated as malformed.
pub const MAX_ATTRIBUTES: usize = 40;

/// STUN and TURN method numbers (RFC 8489 §18.2, RFC 8656 §17).
pub mod method {
    /// Binding (RFC 8489).
    pub const BINDING: u16 = 0x001;
    /// Allocate (RFC 8656 §7).
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh (RFC 8656 §7.3).
    pub const REFRESH: u16 = 0x004;
    /// Send (indication only, RFC 8656 §10).
    pub const SEND: u16 = 0x006;
    /// Data (indication only, RFC 8656 §10).
    pub const DATA: u16 = 0x007;
    /// CreatePermission (RFC 8656 §9).
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind (RFC 8656 §11).
    pub const CHANNEL_BIND: u16 = 0x009;
    /// Connect (RFC 6062 §4.3): open a TCP connection to a peer.
    pub const CONNECT: u16 = 0x00A;
    /// ConnectionBind (RFC 6062 §4.4): make this connection a data
    /// connection for a peer connection.
    pub const CONNECTION_BIND: u16 = 0x00B;
    /// ConnectionAttempt (RFC 6062 §4.5, indication): a peer connected.
    pub const CONNECTION_ATTEMPT: u16 = 0x00C;

    /// A short human name for logs.
    pub fn name(m: u16) -> &'static str {
        match m {
            BINDING => "Binding",
            ALLOCATE => "Allocate",
            REFRESH => "Refresh",
            SEND => "Send",
            DATA => "Data",
            CREATE_PERMISSION => "CreatePermission",
            CHANNEL_BIND => "ChannelBind",
            CONNECT => "Connect",
            CONNECTION_BIND => "ConnectionBind",
            CONNECTION_ATTEMPT => "ConnectionAttempt",
            _ => "unknown",
        }
    }
}

/// The class of a STUN message (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// Builds the 14-bit message type field from method and class (RFC 8489 §5).
pub const fn message_type(method: u16, class: Class) -> u16 {
    let c = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 1) << 4)
        | ((c & 2) << 7)
}

fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why bytes could not be parsed as a STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than 20 bytes.
    TooShort,
    /// The two top bits of the first byte are not zero.
    NotStun,
    /// The magic cookie is not 0x2112A442 (an RFC 3489 message: the core
    /// answers those only with `stun-backward-compatibility`).
    BadMagicCookie,
    /// The header length is not a multiple of 4 or disagrees with the bytes given.
    BadLength,
    /// An attribute header or value runs past the end of the message.
    TruncatedAttribute,
    /// More than [`MAX_ATTRIBUTES`] attributes.
    TooManyAttributes,
    /// An attribute follows FINGERPRINT, or FINGERPRINT is not 4 bytes.
    BadFingerprintPosition,
    /// MESSAGE-INTEGRITY is not 20 bytes, or MESSAGE-INTEGRITY-SHA256 is
    /// not 16 to 32 bytes in steps of 4 (RFC 8489 §14.6).
    BadIntegrityLength,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DecodeError::TooShort => "message shorter than the 20-byte STUN header",
            DecodeError::NotStun => "first two bits are not zero",
            DecodeError::BadMagicCookie => "magic cookie mismatch",
            DecodeError::BadLength => "message length field is inconsistent",
            DecodeError::TruncatedAttribute => "attribute runs past the end of the message",
            DecodeError::TooManyAttributes => "too many attributes",
            DecodeError::BadFingerprintPosition => "FINGERPRINT is not the last 4-byte attribute",
            DecodeError::BadIntegrityLength => {
                "MESSAGE-INTEGRITY is not 20 bytes or MESSAGE-INTEGRITY-SHA256 not 16-32"
            }
        };
        f.write_str(s)
    }
}

impl std::error::Error for DecodeError {}

#[derive(Debug, Clone, Copy, Default)]
struct RawAttr {
    typ: u16,
    len: u16,
    /// Offset of the value (after the attribute header) within the message;
    /// a message on a stream may be 65,552 bytes, so 16 bits are not enough.
    start: u32,
}

/// A parsed STUN message borrowing its bytes.
///
/// Attributes after MESSAGE-INTEGRITY other than MESSAGE-INTEGRITY-SHA256
/// and FINGERPRINT, and after MESSAGE-INTEGRITY-SHA256 other than
/// FINGERPRINT, are ignored as RFC 8489 §14.5 and §14.6 require; they are
/// not visible through any accessor. Neither integrity attribute is listed
/// among the attributes either.
#[derive(Clone)]
pub struct Message<'a> {
    raw: &'a [u8],
    method: u16,
    class: Class,
    attrs: [RawAttr; MAX_ATTRIBUTES],
    n_attrs: u8,
    /// Offset of the MESSAGE-INTEGRITY attribute header, if present.
    integrity_at: Option<u32>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, if present.
    integrity_sha256_at: Option<u32>,
    /// Offset of the FINGERPRINT attribute header, if present.
    fingerprint_at: Option<u32>,
}

impl fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("method", &method::name(self.method))
            .field("class", &self.class)
            .field("len", &self.raw.len())
            .field(
                "attrs",
                &self
                    .attributes()
                    .map(|(t, v)| (t, v.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<'a> Message<'a> {
    /// Parses exactly one STUN message occupying all of `buf` (a UDP datagram
    /// or one frame cut from a stream).
    ///
    /// Errors: see [`DecodeError`]. The FINGERPRINT value and
    /// MESSAGE-INTEGRITY are *not* verified here; use
    /// [`Message::fingerprint_ok`] and [`Message::verify_integrity`].
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        if buf[0] & 0xC0 != 0 {
            return Err(DecodeError::NotStun);
        }
        if u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
            return Err(DecodeError::BadMagicCookie);
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len % 4 != 0 || HEADER_LEN + len != buf.len() {
            return Err(DecodeError::BadLength);
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut msg = Message {
            raw: buf,
            method,
            class,
            attrs: [RawAttr::default(); MAX_ATTRIBUTES],
            n_attrs: 0,
            integrity_at: None,
            integrity_sha256_at: None,
            fingerprint_at: None,
        };
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            if buf.len() - pos < 4 {
                return Err(DecodeError::TruncatedAttribute);
            }
            let typ = u16::from_be_bytes([buf[pos], buf[pos + 1]]);
            let alen = usize::from(u16::from_be_bytes([buf[pos + 2], buf[pos + 3]]));
            let padded = (alen + 3) & !3;
            if buf.len() - pos - 4 < padded {
                return Err(DecodeError::TruncatedAttribute);
            }
            if msg.fingerprint_at.is_some() {
                return Err(DecodeError::BadFingerprintPosition);
            }
            if typ == attr::FINGERPRINT {
                if alen != 4 {
                    return Err(DecodeError::BadFingerprintPosition);
                }
                msg.fingerprint_at = Some(pos as u32);
            } else if msg.integrity_sha256_at.is_some() {
                // Only FINGERPRINT may follow MESSAGE-INTEGRITY-SHA256.
            } else if typ == attr::MESSAGE_INTEGRITY_SHA256 {
                if !(16..=32).contains(&alen) || alen % 4 != 0 {
                    return Err(DecodeError::BadIntegrityLength);
                }
                msg.integrity_sha256_at = Some(pos as u32);
            } else if msg.integrity_at.is_some() {
                // Only the two above may follow MESSAGE-INTEGRITY.
            } else if typ == attr::MESSAGE_INTEGRITY {
                if alen != 20 {
                    return Err(DecodeError::BadIntegrityLength);
                }
                msg.integrity_at = Some(pos as u32);
            } else {
                let n = usize::from(msg.n_attrs);
                if n == MAX_ATTRIBUTES {
                    return Err(DecodeError::TooManyAttributes);
                }
                msg.attrs[n] = RawAttr {
                    typ,
                    len: alen as u16,
                    start: (pos + 4) as u32,
                };
                msg.n_attrs += 1;
            }
            // Attributes after an integrity attribute are skipped.
            pos += 4 + padded;
        }
        Ok(msg)
    }

    /// The method number (see [`method`]).
    pub fn method(&self) -> u16 {
        self.method
    }

    /// The message class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// The 96-bit transaction ID.
    pub fn transaction_id(&self) -> &'a [u8; 12] {
        self.raw[8..20].try_into().expect("header is 20 bytes")
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    /// Every attribute before MESSAGE-INTEGRITY(-SHA256), in order, as
    /// `(type, value)`; values exclude padding.
    pub fn attributes(&self) -> impl Iterator<Item = (u16, &'a [u8])> + '_ {
        let raw = self.raw;
        self.attrs[..usize::from(self.n_attrs)]
            .iter()
            .map(move |a| {
                (
                    a.typ,
                    &raw[(a.start as usize)..(a.start as usize) + usize::from(a.len)],
                )
            })
    }

    /// The value of the first attribute of type `typ`.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs[..usize::from(self.n_attrs)]
            .iter()
            .find(|a| a.typ == typ)
            .map(|a| &self.raw[(a.start as usize)..(a.start as usize) + usize::from(a.len)])
    }

    /// The byte range within [`Message::as_bytes`] of the first attribute of
    /// type `typ`'s value; used to forward DATA without copying.
    pub fn value_range(&self, typ: u16) -> Option<std::ops::Range<usize>> {
        self.attrs[..usize::from(self.n_attrs)]
            .iter()
            .find(|a| a.typ == typ)
            .map(|a| (a.start as usize)..(a.start as usize) + usize::from(a.len))
    }

    /// Whether an attribute of type `typ` is present.
    pub fn has(&self, typ: u16) -> bool {
        self.get(typ).is_some()
    }

    /// Values of every attribute of type `typ`, in order.
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.attributes()
            .filter(move |(t, _)| *t == typ)
            .map(|(_, v)| v)
    }

    /// Decodes the first XOR-address attribute of type `typ`.
    pub fn xor_address(&self, typ: u16) -> Option<Result<SocketAddr, attr::AttrError>> {
        self.get(typ)
            .map(|v| attr::decode_xor_address(typ, v, self.transaction_id()))
    }

    /// Decodes the first text attribute of type `typ` (USERNAME, REALM, ...).
    pub fn text(&self, typ: u16) -> Option<Result<&'a str, attr::AttrError>> {
        self.get(typ).map(|v| attr::decode_text(typ, v))
    }

    /// Comprehension-required attribute types this server does not
    /// understand, at most 16, written to `out`; returns how many.
    pub fn unknown_required(&self, out: &mut [u16; 16]) -> usize {
        let mut n = 0;
        for (t, _) in self.attributes() {
            if !attr::is_understood(t) && !out[..n].contains(&t) && n < out.len() {
                out[n] = t;
                n += 1;
            }
        }
        n
    }

    /// Whether the message carries MESSAGE-INTEGRITY or
    /// MESSAGE-INTEGRITY-SHA256.
    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some() || self.integrity_sha256_at.is_some()
    }

    /// Whether the message carries MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6).
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256_at.is_some()
    }

    /// Whether the message carries FINGERPRINT.
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint_at.is_some()
    }

    /// `true` when there is no FINGERPRINT or it matches (RFC 8489 §14.7).
    pub fn fingerprint_ok(&self) -> bool {
        match self.fingerprint_at {
            None => true,
            Some(at) => {
                let at = at as usize;
                let got = u32::from_be_bytes(
                    self.raw[at + 4..at + 8].try_into().expect("checked length"),
                );
                fingerprint_of(&self.raw[..at], at + 8 - HEADER_LEN) == got
            }
        }
    }

    /// Verifies the message's integrity with `key` in constant time:
    /// MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6, possibly truncated to 16
    /// bytes or more) when present, else MESSAGE-INTEGRITY (HMAC-SHA1,
    /// §14.5). `false` when neither is present or the one checked is wrong.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        if let Some(at) = self.integrity_sha256_at {
            let at = at as usize;
            let len = usize::from(u16::from_be_bytes([self.raw[at + 2], self.raw[at + 3]]));
            let mut mac =
                <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
            update_with_length(&mut mac, &self.raw[..at], at + 4 + len - HEADER_LEN);
            return mac
                .verify_truncated_left(&self.raw[at + 4..at + 4 + len])
                .is_ok();
        }
        let Some(at) = self.integrity_at else {
            return false;
        };
        let at = at as usize;
        let mac = integrity_mac(key, &self.raw[..at], at + 24 - HEADER_LEN);
        mac.verify_slice(&self.raw[at + 4..at + 24]).is_ok()
    }
}

/// Feeds `prefix` (a header and attributes) to `mac` with the header's
/// length field replaced by `length_field`.
fn update_with_length<M: Mac>(mac: &mut M, prefix: &[u8], length_field: usize) {
    mac.update(&prefix[..2]);
    mac.update(&(length_field as u16).to_be_bytes());
    mac.update(&prefix[4..]);
}

fn integrity_mac(key: &[u8], prefix: &[u8], length_field: usize) -> Hmac<Sha1> {
    let mut mac = <Hmac<Sha1> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    update_with_length(&mut mac, prefix, length_field);
    mac
}

/// HMAC-SHA1 over `prefix` (header and attributes before MESSAGE-INTEGRITY)
/// with the header length field replaced by `length_field` (RFC 8489 §14.5).
pub fn compute_integrity(key: &[u8], prefix: &[u8], length_field: usize) -> [u8; 20] {
    integrity_mac(key, prefix, length_field)
        .finalize()
        .into_bytes()
        .into()
}

/// CRC-32 of `prefix` with the header length replaced by `length_field`,
/// XOR 0x5354554E (RFC 8489 §14.7).
pub fn fingerprint_of(prefix: &[u8], length_field: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&prefix[..2]);
    h.update(&(length_field as u16).to_be_bytes());
    h.update(&prefix[4..]);
    h.finalize() ^ attr::FINGERPRINT_XOR
}

/// Appends one STUN message to a caller-owned buffer.
///
/// The header length is kept current after every attribute, so the message
/// is valid whenever the writer is dropped. Call [`MessageWriter::integrity`]
/// and then [`MessageWriter::fingerprint`] last.
pub struct MessageWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    tid: [u8; 12],
}

impl<'b> MessageWriter<'b> {
    /// Clears `buf` and writes a header for `method`/`class` with transaction
    /// ID `tid`.
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: &[u8; 12]) -> Self {
        buf.clear();
        Self::append(buf, method, class, tid)
    }

    /// Like [`MessageWriter::new`] but appends after whatever `buf` holds.
    pub fn append(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: &[u8; 12]) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(tid);
        MessageWriter {
            buf,
            start,
            tid: *tid,
        }
    }

    fn set_length(&mut self) {
        let len = self.buf.len() - self.start - HEADER_LEN;
        debug_assert!(
            len <= usize::from(u16::MAX),
            "STUN message body of {len} bytes"
        );
        let len = len as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Adds an attribute with a raw value (padded with zeros to 4 bytes).
    /// Values longer than 65535 bytes are truncated to fit the length field.
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(usize::from(u16::MAX) - 3)];
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = (4 - value.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_length();
        self
    }

    /// Adds a 32-bit attribute (LIFETIME, seconds).
    pub fn attr_u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Adds a plain address attribute (MAPPED-ADDRESS, ALTERNATE-SERVER).
    pub fn address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let n = encode_address(&mut v, addr);
        self.attr(typ, &v[..n])
    }

    /// Adds an XOR address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS,
    /// XOR-RELAYED-ADDRESS).
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let x = attr::xor_address(addr, &self.tid);
        self.address(typ, x)
    }

    /// Adds ERROR-CODE (RFC 8489 §14.8) for a named code, with its reason
    /// phrase.
    pub fn error(&mut self, code: ErrorCode) -> &mut Self {
        self.error_code(code.code(), code.reason())
    }

    /// Adds ERROR-CODE (RFC 8489 §14.8) with any code and reason; `code`
    /// must be 300..=699.
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// Adds ADDRESS-ERROR-CODE (RFC 8656 §18.12) as attribute `typ`
    /// ([`attr::ADDRESS_ERROR_CODE`], or the draft's number): why no
    /// relayed address of `family` (0x01 IPv4, 0x02 IPv6) was given in a
    /// dual allocation.
    pub fn address_error(&mut self, typ: u16, family: u8, code: ErrorCode) -> &mut Self {
        let reason = code.reason();
        let n = code.code();
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[family, 0, (n / 100) as u8, (n % 100) as u8]);
        v.extend_from_slice(reason.as_bytes());
        self.attr(typ, &v)
    }

    /// Adds UNKNOWN-ATTRIBUTES listing `types`.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let v: Vec<u8> = types.iter().flat_map(|t| t.to_be_bytes()).collect();
        self.attr(attr::UNKNOWN_ATTRIBUTES, &v)
    }

    /// Adds MESSAGE-INTEGRITY computed with `key` over everything so far.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let prefix_end = self.buf.len();
        let length_field = prefix_end - self.start + 24 - HEADER_LEN;
        let mac = compute_integrity(key, &self.buf[self.start..prefix_end], length_field);
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Adds MESSAGE-INTEGRITY-SHA256 (RFC 8489 §14.6), the full 32-byte
    /// HMAC-SHA256 with `key` over everything so far.
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let prefix_end = self.buf.len();
        let length_field = prefix_end - self.start + 36 - HEADER_LEN;
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
        update_with_length(&mut mac, &self.buf[self.start..prefix_end], length_field);
        let out: [u8; 32] = mac.finalize().into_bytes().into();
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &out)
    }

    /// Adds FINGERPRINT over everything so far; must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        let prefix_end = self.buf.len();
        let length_field = prefix_end - self.start + 8 - HEADER_LEN;
        let crc = fingerprint_of(&self.buf[self.start..prefix_end], length_field);
        self.attr_u32(attr::FINGERPRINT, crc)
    }

    /// Length of the message written so far, bytes.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether only the header has been written.
    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }
}

/// Writes a MAPPED-ADDRESS style value into `out`; returns its length
/// (8 for IPv4, 20 for IPv6).
pub fn encode_address(out: &mut [u8; 20], addr: SocketAddr) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr {
        SocketAddr::V4(a) => {
            out[1] = 0x01;
            out[4..8].copy_from_slice(&a.ip().octets());
            8
        }
        SocketAddr::V6(a) => {
            out[1] = 0x02;
            out[4..20].copy_from_slice(&a.ip().octets());
            20
        }
    }
}

#[cfg(test)]
mod tests;
