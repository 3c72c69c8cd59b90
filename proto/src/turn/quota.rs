//! Allocation quotas and bandwidth limits: `user-quota`, `total-quota`,
//! `max-bps` and `bps-capacity`.
//!
//! Quotas count allocations beyond one core (every worker of the process,
//! and in a fleet every node), so the core does not keep the counts: it
//! asks a [`Ledger`] the driver hands in. [`Counts`] is the counting itself,
//! pure and single-threaded; the driver shares one behind a lock. Each
//! allocation keeps the [`Claim`] it acquired, so releasing is exact even if
//! the limits change while it lives.

use std::collections::BTreeMap;
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

/// What one allocation holds, to give back when it ends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    /// The realm it counts in.
    pub realm: Box<str>,
    /// The user whose count it holds, if `user-quota` was on.
    pub user: Option<Box<str>>,
    /// Bandwidth reserved from `bps-capacity`, bytes per second.
    pub bps: u64,
    /// Also counted in a fleet's shared ledger (to give back there too).
    pub fleet: bool,
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

/// A ledger's answer to a new allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    Granted(Claim),
    Refused(Refused),
    /// The ledger must ask beyond this process (a fleet's shared counts):
    /// the core hands the request back, and asks again when the driver
    /// says the answer is there.
    Pending,
}

impl From<Result<Claim, Refused>> for Acquire {
    fn from(r: Result<Claim, Refused>) -> Self {
        match r {
            Ok(c) => Acquire::Granted(c),
            Err(why) => Acquire::Refused(why),
        }
    }
}

/// Where the core counts allocations against quotas. The driver's
/// implementation is shared by every worker (and may be shared further).
pub trait Ledger {
    /// Counts a new allocation of `user` (its quota key; empty for
    /// anonymous clients, which count only towards the totals) in `realm`
    /// against `limits`, the realm's: `total-quota` counts the realm's
    /// allocations, `user-quota` those of the user in the realm.
    fn acquire(&mut self, realm: &str, user: &str, limits: &Limits) -> Acquire;

    /// Gives back what `claim` holds (an allocation ended or was refused
    /// after its claim).
    fn release(&mut self, claim: &Claim);

    /// Counts again what `claim` holds, with no limit checked: an
    /// allocation restored from a predecessor's state (a live takeover).
    fn restore(&mut self, claim: &Claim);
}

/// Allocation counts: in all, per realm, per user of a realm, and the
/// bandwidth reserved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    total: u32,
    reserved_bps: u64,
    realms: BTreeMap<Box<str>, u32>,
    users: BTreeMap<(Box<str>, Box<str>), u32>,
}

impl Counts {
    /// Live allocations counted, in every realm.
    pub fn allocations(&self) -> u32 {
        self.total
    }

    /// Live allocations in `realm`.
    pub fn in_realm(&self, realm: &str) -> u32 {
        self.realms.get(realm).copied().unwrap_or(0)
    }

    /// Bandwidth reserved from `bps-capacity`, bytes per second.
    pub fn reserved_bps(&self) -> u64 {
        self.reserved_bps
    }

    /// Live allocations by realm.
    pub fn realms(&self) -> impl Iterator<Item = (&str, u32)> {
        self.realms.iter().map(|(r, n)| (&**r, *n))
    }

    /// Live allocations by (realm, user), for users counted.
    pub fn users(&self) -> impl Iterator<Item = (&str, &str, u32)> {
        self.users.iter().map(|((r, u), n)| (&**r, &**u, *n))
    }

    /// Live allocations of `user` in `realm` (counted only while
    /// `user-quota` is on).
    pub fn of_user(&self, realm: &str, user: &str) -> u32 {
        self.users
            .get(&(Box::from(realm), Box::from(user)))
            .copied()
            .unwrap_or(0)
    }
}

impl Counts {
    /// Counts a new allocation (see [`Ledger::acquire`]); error: the limit
    /// that refused it.
    pub fn take(&mut self, realm: &str, user: &str, limits: &Limits) -> Result<Claim, Refused> {
        if limits.total_quota > 0 && self.in_realm(realm) >= limits.total_quota {
            return Err(Refused::TotalQuota);
        }
        let bps = if limits.bps_capacity > 0 {
            limits.max_bps
        } else {
            0
        };
        if bps > 0 && self.reserved_bps + bps > limits.bps_capacity {
            return Err(Refused::BandwidthCapacity);
        }
        let counted_user = if limits.user_quota > 0 && !user.is_empty() {
            let n = self.users.entry((realm.into(), user.into())).or_insert(0);
            if *n >= limits.user_quota {
                return Err(Refused::UserQuota);
            }
            *n += 1;
            Some(user.into())
        } else {
            None
        };
        self.total += 1;
        *self.realms.entry(realm.into()).or_insert(0) += 1;
        self.reserved_bps += bps;
        Ok(Claim {
            realm: realm.into(),
            user: counted_user,
            bps,
            fleet: false,
        })
    }

    /// Counts `claim` again, whatever the limits: an allocation restored
    /// from a predecessor's state.
    pub fn put_back(&mut self, claim: &Claim) {
        self.total += 1;
        self.reserved_bps += claim.bps;
        *self.realms.entry(claim.realm.clone()).or_insert(0) += 1;
        if let Some(u) = &claim.user {
            *self
                .users
                .entry((claim.realm.clone(), u.clone()))
                .or_insert(0) += 1;
        }
    }

    /// Gives back what `claim` holds.
    pub fn give_back(&mut self, claim: &Claim) {
        self.total = self.total.saturating_sub(1);
        self.reserved_bps = self.reserved_bps.saturating_sub(claim.bps);
        if let Some(n) = self.realms.get_mut(&claim.realm) {
            *n -= 1;
            if *n == 0 {
                self.realms.remove(&claim.realm);
            }
        }
        if let Some(u) = &claim.user {
            let key = (claim.realm.clone(), u.clone());
            if let Some(n) = self.users.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.users.remove(&key);
                }
            }
        }
    }
}

impl Ledger for Counts {
    fn acquire(&mut self, realm: &str, user: &str, limits: &Limits) -> Acquire {
        self.take(realm, user, limits).into()
    }

    fn release(&mut self, claim: &Claim) {
        self.give_back(claim)
    }

    fn restore(&mut self, claim: &Claim) {
        self.put_back(claim)
    }
}

/// A ledger one core owns alone and a test can still read (for tests and
/// the simulation; the driver shares its counts between threads).
impl Ledger for std::rc::Rc<std::cell::RefCell<Counts>> {
    fn acquire(&mut self, realm: &str, user: &str, limits: &Limits) -> Acquire {
        self.borrow_mut().take(realm, user, limits).into()
    }

    fn release(&mut self, claim: &Claim) {
        self.borrow_mut().give_back(claim)
    }

    fn restore(&mut self, claim: &Claim) {
        self.borrow_mut().put_back(claim)
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
    #![allow(clippy::disallowed_methods)] // Instant::now as the base time

    use super::*;
    use std::time::Duration;

    #[test]
    fn total_and_user_quotas() {
        let mut u = Counts::default();
        let l = Limits {
            user_quota: 2,
            total_quota: 3,
            ..Limits::default()
        };
        let a1 = u.take("r", "alice", &l).unwrap();
        let a2 = u.take("r", "alice", &l).unwrap();
        assert_eq!(u.take("r", "alice", &l), Err(Refused::UserQuota));
        let b1 = u.take("r", "bob", &l).unwrap();
        assert_eq!(u.take("r", "carol", &l), Err(Refused::TotalQuota));
        assert_eq!(u.allocations(), 3);
        u.give_back(&a1);
        assert_eq!(u.of_user("r", "alice"), 1);
        assert!(u.take("r", "carol", &l).is_ok());
        u.give_back(&a2);
        u.give_back(&b1);
        assert_eq!(u.of_user("r", "alice"), 0);
        assert_eq!(u.of_user("r", "bob"), 0);
        assert_eq!(u.allocations(), 1);
        // Anonymous allocations only count towards the total.
        assert!(u.take("r", "", &l).is_ok());
        assert!(u.take("r", "dave", &l).is_ok());
        // A refusal holds nothing.
        assert_eq!(u.take("r", "eve", &l), Err(Refused::TotalQuota));
        assert_eq!(u.of_user("r", "eve"), 0);
        assert_eq!(u.allocations(), 3);
        // Another realm has quotas of its own.
        assert!(u.take("other", "alice", &l).is_ok());
        assert_eq!(u.in_realm("other"), 1);
        assert_eq!(u.allocations(), 4);
    }

    #[test]
    fn bandwidth_capacity() {
        let mut u = Counts::default();
        let l = Limits {
            max_bps: 1000,
            bps_capacity: 2500,
            ..Limits::default()
        };
        let a = u.take("r", "a", &l).unwrap();
        let _b = u.take("r", "b", &l).unwrap();
        assert_eq!(u.take("r", "c", &l), Err(Refused::BandwidthCapacity));
        assert_eq!(u.allocations(), 2, "a refused allocation holds nothing");
        assert_eq!(u.reserved_bps(), 2000);
        u.give_back(&a);
        assert!(u.take("r", "c", &l).is_ok());
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
