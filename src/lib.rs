//! turnserver: a STUN/TURN server that reads coturn's configuration.
//!
//! The protocol lives in a sans-IO core, the `turnserver-proto` crate in
//! `proto/`, re-exported here: [`stun`] (codec), [`auth`] (credentials) and
//! [`turn`] (allocations, permissions, channels, timers), all with time
//! passed in. [`server`] is the thin tokio driver that moves bytes between
//! sockets and the core; [`config`] reads `turnserver.conf` and the command
//! line; [`daemon`] is the process around them.

pub use turnserver_proto::{auth, stun, turn};

pub mod bench;
pub mod config;
pub mod daemon;
pub mod server;
pub mod userdb;
