//! Allocation quotas and bandwidth limits: `user-quota`, `total-quota`,
//! `max-bps` and `bps-capacity`.
//!
//! [`Usage`] holds the counts every worker shares (atomics, and a map of
//! per-user counts touched only when allocations are created or end). Each
//! allocation keeps the [`Claim`] it acquired, so releasing is exact even if
//! the limits change while it lives.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Limits from the configuration; 0 means unlimited throughout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent allocations per user (`user-quota`).
    pub user_quota: u32,
    /// Concurrent allocations in total (`total-quota`).
    pub total_quota: u32,
    /// Bytes per second per allocation and direction (`max-bps`).
    pub max_bps: u64,
    /// Bytes per second the server hands out in total (`bps-capacity`):
    /// each allocation reserves `max_bps` of it.
    pub bps_capacity: u64,
}

/// Counts shared by every worker.
#[derive(Debug, Default)]
pub struct Usage {
    total: AtomicU32,
    reserved_bps: AtomicU64,
    users: Mutex<HashMap<Box<str>, u32>>,
}

/// What one allocation holds, to give back when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The user whose count it holds, if `user-quota` was on.
    user: Option<Box<str>>,
    /// Bandwidth reserved from `bps-capacity`, bytes per second.
    bps: u64,
}

/// Which limit refused an allocation (answered 486).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    UserQuota,
    TotalQuota,
    BandwidthCapacity,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::UserQuota => "user-quota reached",
            Refused::TotalQuota => "total-quota reached",
            Refused::BandwidthCapacity => "bps-capacity exhausted",
        })
    }
}

/// Increments `counter` unless it has reached `limit` (0 = unlimited).
fn take(counter: &AtomicU32, limit: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (limit == 0 || n < limit).then_some(n + 1)
        })
        .is_ok()
}

impl Usage {
    /// Live allocations on the whole server.
    pub fn allocations(&self) -> u32 {
        self.total.load(Ordering::Acquire)
    }

    /// Bandwidth reserved from `bps-capacity`, bytes per second.
    pub fn reserved_bps(&self) -> u64 {
        self.reserved_bps.load(Ordering::Acquire)
    }

    /// Live allocations of `user`.
    pub fn of_user(&self, user: &str) -> u32 {
        self.users
            .lock()
            .expect("usage lock")
            .get(user)
            .copied()
            .unwrap_or(0)
    }

    /// Counts a new allocation for `user` (its quota key) against `limits`.
    pub fn acquire(&self, user: &str, limits: &Limits) -> Result<Claim, Refused> {
        if !take(&self.total, limits.total_quota) {
            return Err(Refused::TotalQuota);
        }
        let bps = if limits.bps_capacity > 0 {
            limits.max_bps
        } else {
            0
        };
        if bps > 0 {
            let ok = self
                .reserved_bps
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                    (r + bps <= limits.bps_capacity).then_some(r + bps)
                })
                .is_ok();
            if !ok {
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::BandwidthCapacity);
            }
        }
        let counted_user = if limits.user_quota > 0 && !user.is_empty() {
            let mut users = self.users.lock().expect("usage lock");
            let n = users.entry(user.into()).or_insert(0);
            if *n >= limits.user_quota {
                drop(users);
                self.total.fetch_sub(1, Ordering::AcqRel);
                self.reserved_bps.fetch_sub(bps, Ordering::AcqRel);
                return Err(Refused::UserQuota);
            }
            *n += 1;
            Some(user.into())
        } else {
            None
        };
        Ok(Claim {
            user: counted_user,
            bps,
        })
    }

    /// Gives back what `claim` holds.
    pub fn release(&self, claim: &Claim) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.reserved_bps.fetch_sub(claim.bps, Ordering::AcqRel);
        if let Some(u) = &claim.user {
            let mut users = self.users.lock().expect("usage lock");
            if let Some(n) = users.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    users.remove(u);
                }
            }
        }
    }
}

/// A token bucket for one direction of one allocation: `rate` bytes per
/// second with a burst of one second's worth.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: u64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: u64, now: Instant) -> Self {
        Bucket {
            tokens: rate,
            last: now,
        }
    }

    /// Takes `bytes` if available at `now`; false means drop the datagram.
    pub fn take(&mut self, bytes: u64, rate: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        if !elapsed.is_zero() {
            let refill = (elapsed.as_micros().min(u128::from(u64::MAX)) as u64)
                .saturating_mul(rate)
                / 1_000_000;
            if refill > 0 {
                self.tokens = (self.tokens + refill).min(rate);
                self.last = now;
            }
        }
        if self.tokens >= bytes {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn total_and_user_quotas() {
        let u = Usage::default();
        let l = Limits {
            user_quota: 2,
            total_quota: 3,
            ..Limits::default()
        };
        let a1 = u.acquire("alice", &l).unwrap();
        let a2 = u.acquire("alice", &l).unwrap();
        assert_eq!(u.acquire("alice", &l), Err(Refused::UserQuota));
        let b1 = u.acquire("bob", &l).unwrap();
        assert_eq!(u.acquire("carol", &l), Err(Refused::TotalQuota));
        assert_eq!(u.allocations(), 3);
        u.release(&a1);
        assert_eq!(u.of_user("alice"), 1);
        assert!(u.acquire("carol", &l).is_ok());
        u.release(&a2);
        u.release(&b1);
        assert_eq!(u.of_user("alice"), 0);
        assert_eq!(u.of_user("bob"), 0);
        assert_eq!(u.allocations(), 1);
        // Anonymous allocations only count towards the total.
        assert!(u.acquire("", &l).is_ok());
    }

    #[test]
    fn bandwidth_capacity() {
        let u = Usage::default();
        let l = Limits {
            max_bps: 1000,
            bps_capacity: 2500,
            ..Limits::default()
        };
        let a = u.acquire("a", &l).unwrap();
        let _b = u.acquire("b", &l).unwrap();
        assert_eq!(u.acquire("c", &l), Err(Refused::BandwidthCapacity));
        assert_eq!(u.allocations(), 2, "a refused allocation holds nothing");
        assert_eq!(u.reserved_bps(), 2000);
        u.release(&a);
        assert!(u.acquire("c", &l).is_ok());
    }

    #[test]
    fn bucket_rate_and_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        assert!(b.take(600, 1000, t0));
        assert!(!b.take(600, 1000, t0), "burst is one second's worth");
        assert!(b.take(400, 1000, t0));
        assert!(!b.take(1, 1000, t0));
        assert!(b.take(100, 1000, t0 + Duration::from_millis(100)));
        assert!(!b.take(100, 1000, t0 + Duration::from_millis(100)));
        // Never more than the burst, however long it idled.
        assert!(!b.take(1001, 1000, t0 + Duration::from_secs(60)));
        assert!(b.take(1000, 1000, t0 + Duration::from_secs(60)));
    }
}
