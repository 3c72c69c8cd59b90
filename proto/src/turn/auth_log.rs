//! Logging refused credentials without a line per retransmission.
//!
//! A client with a wrong password retransmits and retries: one user produced
//! 31 identical "401: wrong password" lines in half a minute (the noise
//! coturn users complain about, coturn#603, #1470). [`AuthLog`] lets the
//! first refusal of a (client address, username, reason) through, counts
//! the repeats for [`WINDOW`], and reports the count when the window ends.
//! Metrics still count every refusal. Pure state: time is passed in.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::auth::AuthFailure;

/// How long repeats of a logged refusal are only counted, 60 seconds.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Clients, users and reasons tracked at once per worker; refusals beyond
/// are counted together, so memory stays bounded under a flood of
/// usernames or spoofed addresses (which the unauthenticated-answer rate
/// limit also holds back).
const MAX_ENTRIES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    client: IpAddr,
    user: Box<str>,
    why: AuthFailure,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the logged refusal was.
    since: Instant,
    /// Refusals since, not logged.
    repeats: u64,
}

/// Repeats of a logged refusal, reported when its window ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repeated<'a> {
    /// The client's address; `None` for refusals counted together because
    /// the table was full.
    pub client: Option<IpAddr>,
    /// The username it sent (empty for the pooled count).
    pub user: &'a str,
    /// The reason (for the pooled count, of its first refusal).
    pub why: AuthFailure,
    /// Refusals not logged during the window.
    pub repeats: u64,
}

/// Which refusals to log (see the module documentation).
#[derive(Debug, Default)]
pub struct AuthLog {
    entries: BTreeMap<Key, Entry>,
    /// Windows that ended at a [`AuthLog::record`] rather than a sweep, with
    /// repeats still to report.
    due: Vec<(Key, u64)>,
    /// Refusals not tracked because the table was full: since when, how
    /// many, and the first one's reason.
    overflow: Option<(Instant, u64, AuthFailure)>,
}

impl AuthLog {
    /// Records a refusal of `user` from `client` at `now`; returns whether
    /// to log it (the first in its window).
    pub fn record(&mut self, now: Instant, client: IpAddr, user: &str, why: AuthFailure) -> bool {
        let key = Key {
            client,
            user: user.into(),
            why,
        };
        if let Some(e) = self.entries.get_mut(&key) {
            if now < e.since + WINDOW {
                e.repeats += 1;
                return false;
            }
            let repeats = std::mem::replace(&mut e.repeats, 0);
            e.since = now;
            if repeats > 0 {
                self.due.push((key, repeats));
            }
            return true;
        }
        if self.entries.len() >= MAX_ENTRIES {
            let (_, n, _) = self.overflow.get_or_insert((now, 0, why));
            *n += 1;
            return false;
        }
        self.entries.insert(
            key,
            Entry {
                since: now,
                repeats: 0,
            },
        );
        true
    }

    /// Ends the windows that are over at `now`, calling `report` for each
    /// that had repeats. Call about once a second.
    pub fn sweep(&mut self, now: Instant, mut report: impl FnMut(Repeated<'_>)) {
        for (k, repeats) in self.due.drain(..) {
            report(Repeated {
                client: Some(k.client),
                user: &k.user,
                why: k.why,
                repeats,
            });
        }
        self.entries.retain(|k, e| {
            if now < e.since + WINDOW {
                return true;
            }
            if e.repeats > 0 {
                report(Repeated {
                    client: Some(k.client),
                    user: &k.user,
                    why: k.why,
                    repeats: e.repeats,
                });
            }
            false
        });
        if let Some((since, n, why)) = self.overflow
            && now >= since + WINDOW
        {
            self.overflow = None;
            report(Repeated {
                client: None,
                user: "",
                why,
                repeats: n,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::disallowed_methods)] // Instant::now as the base time

    use super::*;

    fn collect(log: &mut AuthLog, now: Instant) -> Vec<(Option<IpAddr>, String, u64)> {
        let mut out = Vec::new();
        log.sweep(now, |r| out.push((r.client, r.user.to_string(), r.repeats)));
        out
    }

    #[test]
    fn retransmissions_are_logged_once_then_counted() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut log = AuthLog::default();
        assert!(log.record(t0, ip, "alice", AuthFailure::BadIntegrity));
        for i in 1..31 {
            let t = t0 + Duration::from_millis(i * 1000);
            assert!(!log.record(t, ip, "alice", AuthFailure::BadIntegrity));
            assert!(collect(&mut log, t).is_empty());
        }
        // Another reason, user or client is logged on its own.
        assert!(log.record(t0, ip, "alice", AuthFailure::StaleNonce));
        assert!(log.record(t0, ip, "bob", AuthFailure::BadIntegrity));
        assert!(log.record(
            t0,
            "192.0.2.2".parse().unwrap(),
            "alice",
            AuthFailure::BadIntegrity
        ));
        let end = collect(&mut log, t0 + WINDOW);
        assert_eq!(end, vec![(Some(ip), "alice".to_string(), 30)]);
        // A new window logs again.
        assert!(log.record(t0 + WINDOW, ip, "alice", AuthFailure::BadIntegrity));
    }

    #[test]
    fn a_window_ended_without_a_sweep_still_reports_its_repeats() {
        let t0 = Instant::now();
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let mut log = AuthLog::default();
        assert!(log.record(t0, ip, "u", AuthFailure::Expired));
        assert!(!log.record(t0, ip, "u", AuthFailure::Expired));
        assert!(log.record(t0 + WINDOW * 2, ip, "u", AuthFailure::Expired));
        assert_eq!(
            collect(&mut log, t0 + WINDOW * 2),
            vec![(Some(ip), "u".to_string(), 1)]
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let t0 = Instant::now();
        let mut log = AuthLog::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for i in 0..MAX_ENTRIES + 10 {
            let logged = log.record(t0, ip, &format!("user{i}"), AuthFailure::UnknownUser);
            assert_eq!(logged, i < MAX_ENTRIES);
        }
        assert_eq!(log.entries.len(), MAX_ENTRIES);
        assert_eq!(
            collect(&mut log, t0 + WINDOW),
            vec![(None, String::new(), 10)]
        );
        assert!(log.entries.is_empty());
    }
}
