//! Codec and hot-path benchmarks: `cargo bench --bench codec`.
//!
//! Parsing, building, MESSAGE-INTEGRITY and FINGERPRINT, with raw
//! HMAC-SHA1 and CRC-32 beside them for scale, and the core's routing
//! decision for ChannelData in both directions.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use hmac::{Hmac, KeyInit, Mac};
use sha1::Sha1;

use turnserver::auth::{Authenticator, Mechanism, NonceIssuer, long_term_key};
use turnserver::stun::channel::{HEADROOM, TAILROOM};
use turnserver::stun::{Class, Message, MessageWriter, attr, method};
use turnserver::turn::{
    self, AllocationId, ClientAction, FiveTuple, OpenedRelay, RelayError, RelayProvider,
    RelayRequest, Transport,
};

/// An Allocate request as a browser sends it, signed with a long-term key.
fn allocate_request(key: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    MessageWriter::new(&mut out, method::ALLOCATE, Class::Request, &[7; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .attr(attr::LIFETIME, &600u32.to_be_bytes())
        .attr(attr::USERNAME, b"1800000000:alice")
        .attr(attr::REALM, b"example.org")
        .attr(attr::NONCE, b"0123456789abcdef01234567")
        .integrity(key)
        .fingerprint();
    out
}

fn codec(c: &mut Criterion) {
    let key = long_term_key("1800000000:alice", "example.org", "pw");
    let req = allocate_request(&key);
    let mut g = c.benchmark_group("codec");
    g.bench_function("parse Allocate", |b| {
        b.iter(|| Message::parse(black_box(&req)).unwrap().method())
    });
    let msg = Message::parse(&req).unwrap();
    g.bench_function("verify MESSAGE-INTEGRITY", |b| {
        b.iter(|| black_box(&msg).verify_integrity(&key))
    });
    g.bench_function("verify FINGERPRINT", |b| {
        b.iter(|| black_box(&msg).fingerprint_ok())
    });
    let mut out = Vec::with_capacity(256);
    let relayed: SocketAddr = "192.0.2.10:50000".parse().unwrap();
    let mapped: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    g.bench_function("build Allocate success with MI and FINGERPRINT", |b| {
        b.iter(|| {
            MessageWriter::new(&mut out, method::ALLOCATE, Class::Success, &[7; 12])
                .xor_address(attr::XOR_RELAYED_ADDRESS, relayed)
                .attr_u32(attr::LIFETIME, 600)
                .xor_address(attr::XOR_MAPPED_ADDRESS, mapped)
                .integrity(&key)
                .fingerprint();
            black_box(out.len())
        })
    });
    g.bench_function("raw HMAC-SHA1 over 100 bytes", |b| {
        b.iter(|| {
            let mut m = <Hmac<Sha1> as KeyInit>::new_from_slice(&key).unwrap();
            m.update(black_box(&req[..100]));
            m.finalize().into_bytes()
        })
    });
    g.bench_function("raw CRC-32 over 100 bytes", |b| {
        b.iter(|| crc32fast::hash(black_box(&req[..100])))
    });
    g.finish();
}

struct Relays;

impl RelayProvider for Relays {
    fn open(&mut self, _: AllocationId, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        Ok(OpenedRelay {
            addr: SocketAddr::new(req.ip, 50000),
            reservation: None,
        })
    }
}

fn routing(c: &mut Criterion) {
    let auth = Authenticator {
        realm: "example.org".into(),
        mechanism: Mechanism::None,
    };
    let mut cfg = turn::Config::new(auth, NonceIssuer::new([1; 32], Some(600)));
    cfg.policy.allow_loopback = true;
    let now = Instant::now();
    let ledger = Box::new(turn::quota::Counts::default());
    let mut server = turn::Server::new(Arc::new(cfg), ledger, 0, now, 1_800_000_000, 1);
    let ft = FiveTuple {
        client: "127.0.0.1:40000".parse().unwrap(),
        server: "127.0.0.1:3478".parse().unwrap(),
        transport: Transport::Udp,
    };
    let peer: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let mut out = Vec::new();
    let mut req = Vec::new();
    MessageWriter::new(&mut req, method::ALLOCATE, Class::Request, &[1; 12])
        .attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
    assert_eq!(
        server.handle_client(now, &ft, 0, &req, &mut out, &mut Relays),
        ClientAction::Reply
    );
    MessageWriter::new(&mut req, method::CHANNEL_BIND, Class::Request, &[2; 12])
        .attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
        .xor_address(attr::XOR_PEER_ADDRESS, peer);
    server.handle_client(now, &ft, 0, &req, &mut out, &mut Relays);
    let id = server.allocation_for(&ft).unwrap();

    let mut cd = vec![0x40, 0x00, 0x00, 170];
    cd.extend([0x55; 170]);
    let mut g = c.benchmark_group("routing");
    g.bench_function("client ChannelData -> peer decision (170 B)", |b| {
        b.iter(
            || match server.handle_client(now, &ft, 0, black_box(&cd), &mut out, &mut Relays) {
                ClientAction::Relay { payload, .. } => payload.len(),
                other => panic!("{other:?}"),
            },
        )
    });
    let mut buf = vec![0u8; HEADROOM + 170 + TAILROOM];
    g.bench_function("peer datagram -> ChannelData framing (170 B)", |b| {
        b.iter(|| {
            server
                .handle_peer(now, id, peer, black_box(&mut buf), HEADROOM..HEADROOM + 170)
                .unwrap()
                .range
                .len()
        })
    });
    g.finish();
}

criterion_group!(benches, codec, routing);
criterion_main!(benches);
