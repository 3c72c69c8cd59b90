//! The sans-IO STUN/TURN core of turnserver.
//!
//! - [`stun`]: the STUN message codec (RFC 8489) and ChannelData framing
//!   (RFC 8656 §12.4), with the named error codes of RFC 8489 §14.8 and
//!   RFC 8656 §19.
//! - [`auth`]: long-term credentials (RFC 8489 §9.2), the TURN REST API and
//!   stateless nonces.
//! - [`turn`]: the TURN server state machine: allocations, permissions,
//!   channel bindings and their timers.
//!
//! Nothing here reaches the outside world: no socket, clock, thread, file
//! or OS randomness. Time, seeds and shared counters come in as arguments;
//! what to send comes back as values. This holds by construction: the
//! crate depends on no I/O library, forbids `unsafe`, and its
//! `clippy.toml` fails the build (`cargo clippy -- -D warnings`) on the
//! standard library calls that would reach out (`Instant::now`, sockets,
//! `thread::spawn`, `RandomState`, files, environment).

#![forbid(unsafe_code)]

pub mod auth;
pub mod stun;
pub mod turn;
