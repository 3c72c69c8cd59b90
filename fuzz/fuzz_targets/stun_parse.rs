//! Any bytes as a UDP datagram: the STUN parser and every accessor must
//! return errors, never panic; a message that parses must re-encode to the
//! same attributes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turnserver_proto::stun::{Message, MessageWriter, attr, channel};

fuzz_target!(|data: &[u8]| {
    let _ = channel::parse_channel_data(data);
    let Ok(m) = Message::parse(data) else { return };
    let _ = m.fingerprint_ok();
    let _ = m.verify_integrity(b"fuzz-key");
    let mut unknown = [0u16; 16];
    let _ = m.unknown_required(&mut unknown);
    for (t, v) in m.attributes() {
        let _ = attr::decode_address(t, v);
        let _ = attr::decode_xor_address(t, v, m.transaction_id());
        let _ = attr::decode_u32(t, v);
        let _ = attr::decode_text(t, v);
        let _ = attr::decode_error_code(v);
        let _ = attr::decode_unknown_attributes(v);
        let _ = attr::decode_channel_number(v);
        let _ = attr::decode_even_port(v);
        let _ = attr::decode_reservation_token(v);
    }
    // Re-encoding gives back the same attributes.
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, m.method(), m.class(), m.transaction_id());
    for (t, v) in m.attributes() {
        if t != attr::MESSAGE_INTEGRITY {
            w.attr(t, v);
        }
    }
    let again = Message::parse(&out).expect("re-encoded message parses");
    assert!(
        again.attributes().eq(m
            .attributes()
            .filter(|(t, _)| *t != attr::MESSAGE_INTEGRITY)),
        "re-encoding changed the attributes"
    );
});
