//! Any bytes as a TCP/TLS stream arriving in arbitrary pieces: framing must
//! find frames or refuse the stream, never panic or read out of bounds, and
//! each frame must be handled by the parsers. Also frames peer data in place
//! around an arbitrary payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnserver_proto::stun::Message;
use turnserver_proto::stun::channel::{self, Frame, HEADROOM, TAILROOM};

fuzz_target!(|data: &[u8]| {
    let (&split, rest) = data.split_first().unwrap_or((&1, &[]));
    let piece = usize::from(split.max(1));
    let mut buf: Vec<u8> = Vec::new();
    for chunk in rest.chunks(piece) {
        buf.extend_from_slice(chunk);
        let mut start = 0;
        loop {
            match channel::stream_frame(&buf[start..]) {
                Ok(None) => break,
                Err(_) => return,
                Ok(Some(f)) => {
                    if buf.len() - start < f.len() {
                        break;
                    }
                    let frame = &buf[start..start + f.len()];
                    match f {
                        Frame::Stun(_) => {
                            let _ = Message::parse(frame);
                        }
                        Frame::ChannelData(_) => {
                            let (_, payload) = channel::parse_channel_data(frame)
                                .expect("framed ChannelData parses");
                            assert!(payload.end <= frame.len());
                        }
                    }
                    start += f.len();
                }
            }
        }
        buf.drain(..start);
    }
    // In-place framing of a peer datagram of this size.
    let len = rest.len().min(1500);
    let mut peer_buf = vec![0u8; HEADROOM + len + TAILROOM];
    peer_buf[HEADROOM..HEADROOM + len].copy_from_slice(&rest[..len]);
    let r = channel::frame_channel_data(
        &mut peer_buf,
        HEADROOM..HEADROOM + len,
        0x4001,
        split % 2 == 0,
    );
    assert_eq!(
        channel::parse_channel_data(&peer_buf[r]).map(|(_, p)| p.len()),
        Some(len)
    );
    let peer = "[2001:db8::1]:4000".parse().expect("valid");
    let r = channel::frame_data_indication(
        &mut peer_buf,
        HEADROOM..HEADROOM + len,
        peer,
        &[1; 12],
        split % 3 == 0,
    );
    let m = Message::parse(&peer_buf[r]).expect("a Data indication parses");
    assert!(m.fingerprint_ok());
});
