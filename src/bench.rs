//! The report of `turnbench run --json`, shared by `turnbench`, which
//! writes it, and the comparison benchmark (`benches/compare.rs`), which
//! reads it back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Round-trip latency percentiles, microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

/// What `turnbench run` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub server: String,
    /// "udp", "tcp" or "tls".
    pub transport: String,
    /// "echo", "pairs" or "raw".
    pub mode: String,
    /// "channel" or "indication".
    pub send: String,
    pub payload_bytes: usize,
    pub allocations_requested: usize,
    pub allocations_ok: u64,
    /// Seconds from start until every allocation was ready (401, Allocate,
    /// ChannelBind or CreatePermission).
    pub setup_seconds: f64,
    /// Complete allocations per second during setup.
    pub allocation_rate: f64,
    /// Setup requests sent again for want of an answer within the RTO
    /// (UDP; 0 over TCP and TLS).
    pub setup_retransmissions: u64,
    pub setup_errors: BTreeMap<String, u64>,
    /// Packets per second asked for (null when windowed).
    pub offered_rate: Option<f64>,
    /// Pacing step, microseconds (null when windowed).
    pub step_us: Option<u64>,
    pub duration_seconds: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_percent: f64,
    /// Packets the generator could not send (socket buffer or queue full).
    pub local_drops: u64,
    /// Packets the partner allocations sent back (pairs mode).
    pub reflected: u64,
    /// Completed round trips per second.
    pub round_trips_per_second: f64,
    /// Packets the server relays per round trip (2 via an echo peer, 4
    /// between pairs).
    pub relayed_per_round_trip: u64,
    /// Packets per second the server relayed, counted from round trips.
    pub relayed_packets_per_second: f64,
    pub rtt_us: Option<Latency>,
    pub allocations_deleted: u64,
}
