//! Counters and gauges the core keeps for metrics.

use super::CloseReason;
use crate::auth::AuthFailure;

/// Monotonic counters the core keeps for metrics. Serialized into a
/// takeover's state so a successor's counters continue.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub allocations_created: u64,
    /// Indexed like [`CloseReason::ALL`].
    pub ended: [u64; CloseReason::ALL.len()],
    /// Indexed by [`crate::auth::AuthFailure::index`].
    pub auth_failures: [u64; AuthFailure::ALL.len()],
    /// Answers dropped by the unauthenticated-answer rate limit.
    pub rate_limited: u64,
    /// Allocations refused by a quota or capacity (486).
    pub quota_refusals: u64,
    /// Allocations refused for lack of a relay port (508).
    pub no_port_refusals: u64,
    /// Requests refused for a forbidden peer (403).
    pub forbidden_peers: u64,
    /// Allocates redirected with 300 (alternate-server or drain).
    pub redirected: u64,
    /// Traffic of allocations that have ended here.
    pub closed_traffic: Traffic,
}

/// Live state the core reports for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Allocations by client transport: UDP, TCP, TLS.
    pub allocations: [u64; 4],
    pub permissions: u64,
    pub channels: u64,
    /// Traffic of live allocations.
    pub live_traffic: Traffic,
    /// Allocations per user (the user part of REST usernames), when asked.
    pub users: Vec<(Box<str>, u32)>,
}

/// Packet and byte counters of one allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

impl Traffic {
    /// Adds another allocation's counters.
    pub fn add(&mut self, o: &Traffic) {
        self.to_peer_packets += o.to_peer_packets;
        self.to_peer_bytes += o.to_peer_bytes;
        self.to_client_packets += o.to_client_packets;
        self.to_client_bytes += o.to_client_bytes;
    }
}
