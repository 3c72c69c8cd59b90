//! Answers to unauthenticated requests per source address (no
//! amplification): token buckets in a fixed table indexed by a keyed hash,
//! so memory stays fixed under spoofed floods and an attacker who does not
//! know the key cannot aim at a victim's slot.

use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use siphasher::sip::SipHasher13;

use super::policy;

/// Source addresses the rate limiter tracks at once per worker; more share
/// slots (the newest wins).
const RATE_SLOTS: usize = 4096;

/// A [`BuildHasher`] keyed by the caller (SipHash-1-3, as the standard
/// library's `RandomState`, whose keys come from the OS instead).
#[derive(Debug, Clone, Copy)]
pub struct SeededState {
    k0: u64,
    k1: u64,
}

impl SeededState {
    /// Keys derived from `seed` (any value; pass a random one).
    pub fn new(seed: u64) -> Self {
        SeededState {
            k0: seed,
            k1: seed.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15,
        }
    }
}

impl BuildHasher for SeededState {
    type Hasher = SipHasher13;

    fn build_hasher(&self) -> SipHasher13 {
        SipHasher13::new_with_keys(self.k0, self.k1)
    }
}

/// A `HashMap` whose hasher the caller seeds.
pub type SeededMap<K, V> = std::collections::HashMap<K, V, SeededState>;

/// Token buckets per source address.
pub struct RateLimiter {
    slots: Box<[RateSlot]>,
    hasher: SeededState,
    epoch: Instant,
    /// Answers suppressed since the last take.
    pub suppressed: u64,
}

#[derive(Clone, Copy, Default)]
struct RateSlot {
    /// The canonical source address as a number (IPv4 mapped into IPv6).
    key: u128,
    /// Thousandths of an answer.
    tokens: u32,
    /// Milliseconds since the limiter's epoch at the last refill.
    last_ms: u32,
}

impl RateLimiter {
    /// An empty limiter at `now`, its slot hash keyed by `seed`.
    pub fn new(now: Instant, seed: u64) -> Self {
        RateLimiter {
            slots: vec![RateSlot::default(); RATE_SLOTS].into_boxed_slice(),
            hasher: SeededState::new(seed),
            // A second in the past, so no real timestamp is 0 (an empty slot).
            epoch: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
            suppressed: 0,
        }
    }

    /// Whether `ip` may get another answer at `now` under `rate` per second
    /// (burst: five seconds' worth).
    pub fn admit(&mut self, ip: IpAddr, now: Instant, rate: u32) -> bool {
        let key = match policy::canonical(ip) {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let burst = rate.saturating_mul(5).saturating_mul(1000);
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u32;
        let mut h = self.hasher.build_hasher();
        h.write_u128(key);
        let slot = &mut self.slots[(h.finish() as usize) % RATE_SLOTS];
        if slot.key != key || slot.last_ms == 0 {
            *slot = RateSlot {
                key,
                tokens: burst,
                last_ms: now_ms.max(1),
            };
        } else {
            let elapsed = u64::from(now_ms.saturating_sub(slot.last_ms));
            let refill = elapsed.saturating_mul(u64::from(rate));
            slot.tokens = (u64::from(slot.tokens) + refill).min(u64::from(burst)) as u32;
            slot.last_ms = now_ms.max(1);
        }
        if slot.tokens >= 1000 {
            slot.tokens -= 1000;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // Instant::now as the base time

    use super::*;

    #[test]
    fn the_same_seed_hashes_alike_and_another_does_not() {
        let h = |seed: u64| SeededState::new(seed).hash_one(42u128);
        assert_eq!(h(1), h(1));
        assert_ne!(h(1), h(2));
    }

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut l = RateLimiter::new(t0, 7);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let admitted = (0..150).filter(|_| l.admit(ip, t0, 20)).count();
        assert_eq!(admitted, 100, "five seconds' worth");
        assert_eq!(l.suppressed, 50);
        assert!(!l.admit(ip, t0 + Duration::from_millis(10), 20));
        assert!(l.admit(ip, t0 + Duration::from_millis(60), 20));
        // Another source has its own bucket; ::ffff:a.b.c.d is a.b.c.d.
        assert!(l.admit("192.0.2.2".parse().unwrap(), t0, 20));
        assert!(!l.admit(
            "::ffff:192.0.2.1".parse().unwrap(),
            t0 + Duration::from_millis(60),
            20
        ));
    }
}
