//! Quota counts shared by every worker: the core's [`Counts`] behind a
//! lock, handed to each worker's core as its [`Ledger`]. Touched only when
//! an allocation is created or ends, never per packet.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::turn::quota::{Acquire, Claim, Counts, Ledger, Limits};

/// A handle on the process's quota counts; clones share them.
#[derive(Debug, Clone, Default)]
pub struct SharedCounts(Arc<Mutex<Counts>>);

impl SharedCounts {
    fn lock(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent even if a holder panicked: every
        // update is a few integer operations.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Live allocations on the whole server.
    pub fn allocations(&self) -> u32 {
        self.lock().allocations()
    }

    /// Live allocations of `user` in `realm` (counted while `user-quota`
    /// is on).
    pub fn of_user(&self, realm: &str, user: &str) -> u32 {
        self.lock().of_user(realm, user)
    }
}

impl Ledger for SharedCounts {
    fn acquire(&mut self, realm: &str, user: &str, limits: &Limits) -> Acquire {
        self.lock().take(realm, user, limits).into()
    }

    fn release(&mut self, claim: &Claim) {
        self.lock().give_back(claim)
    }

    fn restore(&mut self, claim: &Claim) {
        self.lock().put_back(claim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_counts_across_threads() {
        let limits = Limits {
            total_quota: 100,
            ..Limits::default()
        };
        let counts = SharedCounts::default();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let mut c = counts.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| matches!(c.acquire("r", "u", &limits), Acquire::Granted(_)))
                        .count()
                })
            })
            .collect();
        let granted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(granted, 100);
        assert_eq!(counts.allocations(), 100);
    }
}
