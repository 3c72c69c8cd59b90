//! Any bytes as a script of client requests, raw messages, peer datagrams,
//! time steps, connection closes and port exhaustion against the TURN core
//! (turnserver_proto::turn::sim): nothing may panic and the allocation table's
//! invariants and quota accounting must hold after every step.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = turnserver_proto::turn::sim::run(data, std::time::Instant::now()) {
        panic!("{e}");
    }
});
