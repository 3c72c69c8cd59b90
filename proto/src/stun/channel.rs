//! ChannelData messages (RFC 8656 §12.4), stream framing for STUN over
//! TCP/TLS (RFC 8489 §6.2.2, RFC 8656 §12.5), and in-place framing of peer
//! data for the client.
//!
//! The peer→client path receives a datagram into a buffer at offset
//! [`HEADROOM`] and then writes a ChannelData header or a Data indication
//! header directly in front of the payload, so relayed bytes are never
//! copied.

use std::net::SocketAddr;
use std::ops::Range;

use super::{
    Class, HEADER_LEN, MAGIC_COOKIE, attr, encode_address, fingerprint_of, message_type, method,
};

/// Lowest channel number (RFC 8656 §12).
pub const MIN_CHANNEL: u16 = 0x4000;
/// Highest channel number in RFC 8656 §12 (0x4000–0x4FFF).
pub const MAX_CHANNEL_RFC8656: u16 = 0x4FFF;
/// Highest channel number in RFC 5766 (0x4000–0x7FFF), still used by older clients.
pub const MAX_CHANNEL_RFC5766: u16 = 0x7FFF;

/// Bytes reserved in front of a received peer payload: the largest header
/// written there, a Data indication carrying an IPv6 XOR-PEER-ADDRESS
/// (20 + 24 + 4).
pub const HEADROOM: usize = 48;
/// Bytes needed after a peer payload: up to 3 bytes of padding and an
/// 8-byte FINGERPRINT.
pub const TAILROOM: usize = 12;

/// What a stream buffer starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A STUN message of this total length, bytes.
    Stun(usize),
    /// A ChannelData message of this total length including padding to a
    /// multiple of 4 (RFC 8656 §12.5), bytes.
    ChannelData(usize),
}

impl Frame {
    /// Total bytes the frame occupies in the stream.
    pub fn len(self) -> usize {
        match self {
            Frame::Stun(n) | Frame::ChannelData(n) => n,
        }
    }

    /// Always false: a frame has at least a 4-byte header.
    pub fn is_empty(self) -> bool {
        false
    }
}

/// Error for stream bytes that are neither STUN nor ChannelData.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAFrame;

impl std::fmt::Display for NotAFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream data is neither a STUN message nor ChannelData")
    }
}

impl std::error::Error for NotAFrame {}

/// Finds the length of the frame at the start of a TCP/TLS stream buffer.
///
/// Returns `Ok(None)` when fewer than 4 bytes are available, `Ok(Some(f))`
/// once the frame's length is known (the caller waits for `f.len()` bytes),
/// and `Err` when the first two bits are `10` or `11`, or a STUN length is
/// not a multiple of 4: the stream cannot be resynchronised and should be
/// closed.
pub fn stream_frame(buf: &[u8]) -> Result<Option<Frame>, NotAFrame> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    match buf[0] >> 6 {
        0b00 => {
            if len % 4 != 0 {
                return Err(NotAFrame);
            }
            Ok(Some(Frame::Stun(HEADER_LEN + len)))
        }
        0b01 => Ok(Some(Frame::ChannelData(4 + ((len + 3) & !3)))),
        _ => Err(NotAFrame),
    }
}

/// Parses a ChannelData message (RFC 8656 §12.4) occupying `buf`, returning
/// the channel number and the payload's range within `buf`.
///
/// `buf` may be longer than the payload (padding on streams, or trailing
/// bytes in a UDP datagram). Returns `None` when `buf` is shorter than the
/// header or the declared length, or the channel number is outside
/// 0x4000–0x7FFF.
pub fn parse_channel_data(buf: &[u8]) -> Option<(u16, Range<usize>)> {
    if buf.len() < 4 {
        return None;
    }
    let channel = u16::from_be_bytes([buf[0], buf[1]]);
    if !(MIN_CHANNEL..=MAX_CHANNEL_RFC5766).contains(&channel) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    if buf.len() - 4 < len {
        return None;
    }
    Some((channel, 4..4 + len))
}

/// Writes a ChannelData header for `channel` in front of the payload at
/// `buf[payload]` and, for streams, zero padding after it; returns the range
/// of the complete message.
///
/// Requires `payload.start >= 4`, and `padding` bytes (0–3) of room after the
/// payload when `stream` is true.
pub fn frame_channel_data(
    buf: &mut [u8],
    payload: Range<usize>,
    channel: u16,
    stream: bool,
) -> Range<usize> {
    let start = payload.start - 4;
    let len = payload.len();
    buf[start..start + 2].copy_from_slice(&channel.to_be_bytes());
    buf[start + 2..start + 4].copy_from_slice(&(len as u16).to_be_bytes());
    let mut end = payload.end;
    if stream {
        let pad = (4 - len % 4) % 4;
        buf[end..end + pad].fill(0);
        end += pad;
    }
    start..end
}

/// Writes a Data indication (RFC 8656 §10.3) around the payload at
/// `buf[payload]`: header, XOR-PEER-ADDRESS, DATA header in front; padding
/// and, if `fingerprint`, FINGERPRINT after. Returns the message's range.
///
/// Requires `payload.start >= HEADROOM`, `TAILROOM` bytes after the payload,
/// and a payload of at most 65,488 bytes (so the STUN length fits 16 bits).
pub fn frame_data_indication(
    buf: &mut [u8],
    payload: Range<usize>,
    peer: SocketAddr,
    tid: &[u8; 12],
    fingerprint: bool,
) -> Range<usize> {
    let mut addr = [0u8; 20];
    let addr_len = encode_address(&mut addr, attr::xor_address(peer, tid));
    let start = payload.start - (HEADER_LEN + 4 + addr_len + 4);
    let len = payload.len();
    let pad = (4 - len % 4) % 4;
    let mut end = payload.end;
    buf[end..end + pad].fill(0);
    end += pad;

    let mut p = start;
    buf[p..p + 2].copy_from_slice(&message_type(method::DATA, Class::Indication).to_be_bytes());
    // Length is filled in below.
    buf[p + 4..p + 8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    buf[p + 8..p + 20].copy_from_slice(tid);
    p += HEADER_LEN;
    buf[p..p + 2].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    buf[p + 2..p + 4].copy_from_slice(&(addr_len as u16).to_be_bytes());
    buf[p + 4..p + 4 + addr_len].copy_from_slice(&addr[..addr_len]);
    p += 4 + addr_len;
    buf[p..p + 2].copy_from_slice(&attr::DATA.to_be_bytes());
    buf[p + 2..p + 4].copy_from_slice(&(len as u16).to_be_bytes());
    debug_assert_eq!(p + 4, payload.start);

    let body = end - start - HEADER_LEN;
    if fingerprint {
        let length_field = body + 8;
        buf[start + 2..start + 4].copy_from_slice(&(length_field as u16).to_be_bytes());
        let crc = fingerprint_of(&buf[start..end], length_field);
        buf[end..end + 2].copy_from_slice(&attr::FINGERPRINT.to_be_bytes());
        buf[end + 2..end + 4].copy_from_slice(&4u16.to_be_bytes());
        buf[end + 4..end + 8].copy_from_slice(&crc.to_be_bytes());
        end += 8;
    } else {
        buf[start + 2..start + 4].copy_from_slice(&(body as u16).to_be_bytes());
    }
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::Message;

    #[test]
    fn stream_frames() {
        assert_eq!(stream_frame(&[0x00, 0x01, 0x00]), Ok(None));
        assert_eq!(
            stream_frame(&[0x00, 0x01, 0x00, 0x08]),
            Ok(Some(Frame::Stun(28)))
        );
        assert_eq!(stream_frame(&[0x00, 0x01, 0x00, 0x07]), Err(NotAFrame));
        assert_eq!(
            stream_frame(&[0x40, 0x00, 0x00, 0x05]),
            Ok(Some(Frame::ChannelData(12)))
        );
        assert_eq!(
            stream_frame(&[0x7F, 0xFF, 0x00, 0x04]),
            Ok(Some(Frame::ChannelData(8)))
        );
        assert_eq!(stream_frame(&[0x80, 0, 0, 0]), Err(NotAFrame));
        assert_eq!(stream_frame(&[0xC0, 0, 0, 0]), Err(NotAFrame));
        // 'G' is 0x47: HTTP looks like ChannelData on channel 0x4745 with
        // length "T " (0x5420).
        assert_eq!(
            stream_frame(b"GET / HTTP/1.1"),
            Ok(Some(Frame::ChannelData(4 + 0x5420)))
        );
    }

    #[test]
    fn channel_data_parse() {
        assert_eq!(
            parse_channel_data(&[0x40, 0x01, 0, 2, 9, 9]),
            Some((0x4001, 4..6))
        );
        // Padding after the payload is fine.
        assert_eq!(
            parse_channel_data(&[0x40, 0x01, 0, 2, 9, 9, 0, 0]),
            Some((0x4001, 4..6))
        );
        assert_eq!(parse_channel_data(&[0x40, 0x01, 0, 3, 9, 9]), None);
        assert_eq!(parse_channel_data(&[0x3F, 0xFF, 0, 0]), None);
        assert_eq!(parse_channel_data(&[0x40]), None);
    }

    #[test]
    fn channel_data_framing_in_place() {
        let mut buf = vec![0xAAu8; HEADROOM + 5 + TAILROOM];
        buf[HEADROOM..HEADROOM + 5].copy_from_slice(b"hello");
        let r = frame_channel_data(&mut buf, HEADROOM..HEADROOM + 5, 0x4005, true);
        assert_eq!(
            &buf[r.clone()],
            &[0x40, 0x05, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0]
        );
        let r = frame_channel_data(&mut buf, HEADROOM..HEADROOM + 5, 0x4005, false);
        assert_eq!(r.len(), 9);
    }

    #[test]
    fn data_indication_in_place_parses_back() {
        for peer in ["198.51.100.7:4000", "[2001:db8::1]:4000"] {
            let peer: SocketAddr = peer.parse().unwrap();
            for fp in [false, true] {
                let mut buf = vec![0u8; HEADROOM + 7 + TAILROOM];
                buf[HEADROOM..HEADROOM + 7].copy_from_slice(b"payload");
                let tid = [7u8; 12];
                let r = frame_data_indication(&mut buf, HEADROOM..HEADROOM + 7, peer, &tid, fp);
                let msg = Message::parse(&buf[r]).unwrap();
                assert_eq!(msg.method(), method::DATA);
                assert_eq!(msg.class(), Class::Indication);
                assert_eq!(msg.get(attr::DATA), Some(&b"payload"[..]));
                assert_eq!(msg.xor_address(attr::XOR_PEER_ADDRESS), Some(Ok(peer)));
                assert_eq!(msg.has_fingerprint(), fp);
                assert!(msg.fingerprint_ok());
            }
        }
    }
}
