//! Handing UDP allocations between workers as steering moves their
//! clients: a pure state machine the worker consults (like
//! [`super::steering::Controller`]); the worker does the I/O.
//!
//! When UDP steering changes, a client's datagrams start reaching another
//! worker than the one holding its allocation. The worker they reach
//! *pulls* the allocation (with its relay socket) from the owner, holding
//! the client's datagrams until it arrives, then replays them in order.
//! The owner, having given it away, *forwards* the few datagrams still
//! queued in its own socket for [`STRAGGLER_WINDOW`] instead of pulling the
//! allocation back. A pull that gets no answer within [`PULL_TIMEOUT`] is
//! given up and what was held for it dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::turn::FiveTuple;

/// Datagrams held per 5-tuple while its allocation is pulled here.
pub const MAX_HELD: usize = 64;
/// For how long after giving an allocation away a worker forwards the
/// datagrams that still reach it (those queued in its socket before
/// steering changed), instead of pulling the allocation back.
pub const STRAGGLER_WINDOW: Duration = Duration::from_millis(250);
/// How long a pull may take before the datagrams held for it are dropped.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(2);

/// A client datagram held during a pull: the listener index it arrived on
/// and its bytes.
pub type Held = (u32, Vec<u8>);

/// What to do with a UDP client datagram that found no allocation on this
/// worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Orphan {
    /// Held until the pull of its allocation is answered (or dropped when
    /// [`MAX_HELD`] are already held).
    Held,
    /// Send it to worker `to`, which has just taken its allocation.
    Forward { to: usize },
    /// Ask worker `from` for the allocation; the datagram is held. If the
    /// request cannot be sent, call [`Handover::cancel_pull`].
    Pull { from: usize },
    /// No other worker has an allocation for it: handle it here.
    Local,
}

/// Pulls in progress and recent give-aways of one worker.
#[derive(Debug)]
pub struct Handover {
    /// This worker's index.
    me: usize,
    /// 5-tuples whose allocation is being pulled here: since when, and the
    /// datagrams held.
    pulling: HashMap<FiveTuple, (Instant, Vec<Held>)>,
    /// 5-tuples whose allocation this worker gave away: when, and to whom.
    exported: HashMap<FiveTuple, (Instant, usize)>,
}

impl Handover {
    /// No moves in progress, for worker `me`.
    pub fn new(me: usize) -> Self {
        Handover {
            me,
            pulling: HashMap::new(),
            exported: HashMap::new(),
        }
    }

    /// Decides about a datagram from `ft` (on listener `link`) that found no
    /// allocation here at `now`. `owner` looks up which worker the shared
    /// directory says has the 5-tuple's allocation (called only when
    /// needed: it takes a lock).
    pub fn orphan(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        link: u32,
        data: &[u8],
        owner: impl FnOnce() -> Option<usize>,
    ) -> Orphan {
        if let Some((_, held)) = self.pulling.get_mut(ft) {
            if held.len() < MAX_HELD {
                held.push((link, data.to_vec()));
            }
            return Orphan::Held;
        }
        // Given away a moment ago: forward (the new owner gets it after the
        // allocation itself, which went first on the same channel).
        if let Some(&(t, to)) = self.exported.get(ft)
            && now.saturating_duration_since(t) < STRAGGLER_WINDOW
        {
            return Orphan::Forward { to };
        }
        match owner() {
            Some(from) if from != self.me => {
                self.pulling.insert(*ft, (now, vec![(link, data.to_vec())]));
                Orphan::Pull { from }
            }
            _ => Orphan::Local,
        }
    }

    /// The pull for `ft` could not be asked for: forget it and return the
    /// datagram held for it, to handle here.
    pub fn cancel_pull(&mut self, ft: &FiveTuple) -> Vec<Held> {
        self.pulling
            .remove(ft)
            .map(|(_, held)| held)
            .unwrap_or_default()
    }

    /// The answer to the pull for `ft` arrived (with the allocation or
    /// without): the datagrams held for it, in arrival order, to replay.
    pub fn pulled(&mut self, ft: &FiveTuple) -> Vec<Held> {
        self.cancel_pull(ft)
    }

    /// This worker gave `ft`'s allocation to worker `to` at `now`: its
    /// stragglers are forwarded there for [`STRAGGLER_WINDOW`].
    pub fn gave_away(&mut self, now: Instant, ft: &FiveTuple, to: usize) {
        self.exported.insert(*ft, (now, to));
    }

    /// Whether a pull of `ft`'s allocation is in progress here.
    #[cfg(test)]
    pub fn is_pulling(&self, ft: &FiveTuple) -> bool {
        self.pulling.contains_key(ft)
    }

    /// Forgets finished moves at `now`: stops forwarding for old
    /// give-aways, and gives up pulls older than [`PULL_TIMEOUT`]; returns
    /// the 5-tuples whose held datagrams were dropped.
    pub fn prune(&mut self, now: Instant) -> Vec<FiveTuple> {
        self.exported
            .retain(|_, (t, _)| now.saturating_duration_since(*t) < STRAGGLER_WINDOW);
        let mut dropped = Vec::new();
        self.pulling.retain(|ft, (t, _)| {
            let alive = now.saturating_duration_since(*t) < PULL_TIMEOUT;
            if !alive {
                dropped.push(*ft);
            }
            alive
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::Transport;

    fn ft(port: u16) -> FiveTuple {
        FiveTuple {
            client: format!("192.0.2.1:{port}").parse().unwrap(),
            server: "192.0.2.10:3478".parse().unwrap(),
            transport: Transport::Udp,
        }
    }

    #[test]
    fn a_pull_holds_datagrams_and_replays_them_in_order() {
        let t0 = Instant::now();
        let mut h = Handover::new(0);
        let c = ft(1);
        assert_eq!(
            h.orphan(t0, &c, 2, b"a", || Some(1)),
            Orphan::Pull { from: 1 }
        );
        assert!(h.is_pulling(&c));
        // Later datagrams are held without asking the directory again.
        assert_eq!(
            h.orphan(t0, &c, 3, b"b", || panic!("no second lookup")),
            Orphan::Held
        );
        assert_eq!(h.pulled(&c), vec![(2, b"a".to_vec()), (3, b"b".to_vec())]);
        assert!(!h.is_pulling(&c));
        assert!(h.pulled(&c).is_empty(), "a second answer replays nothing");
    }

    #[test]
    fn at_most_max_held_datagrams_are_held() {
        let t0 = Instant::now();
        let mut h = Handover::new(0);
        let c = ft(1);
        h.orphan(t0, &c, 0, b"first", || Some(1));
        for _ in 0..MAX_HELD + 10 {
            assert_eq!(h.orphan(t0, &c, 0, b"more", || None), Orphan::Held);
        }
        assert_eq!(h.pulled(&c).len(), MAX_HELD);
    }

    #[test]
    fn no_owner_or_this_worker_means_local() {
        let t0 = Instant::now();
        let mut h = Handover::new(1);
        assert_eq!(h.orphan(t0, &ft(1), 0, b"x", || None), Orphan::Local);
        assert_eq!(h.orphan(t0, &ft(1), 0, b"x", || Some(1)), Orphan::Local);
        assert!(!h.is_pulling(&ft(1)));
    }

    #[test]
    fn a_pull_that_cannot_be_sent_gives_the_datagram_back() {
        let t0 = Instant::now();
        let mut h = Handover::new(0);
        let c = ft(1);
        assert_eq!(
            h.orphan(t0, &c, 4, b"x", || Some(3)),
            Orphan::Pull { from: 3 }
        );
        assert_eq!(h.cancel_pull(&c), vec![(4, b"x".to_vec())]);
        assert!(!h.is_pulling(&c));
    }

    #[test]
    fn stragglers_are_forwarded_within_the_window_then_pulled_back() {
        let t0 = Instant::now();
        let mut h = Handover::new(0);
        let c = ft(1);
        h.gave_away(t0, &c, 1);
        let soon = t0 + STRAGGLER_WINDOW / 2;
        assert_eq!(
            h.orphan(soon, &c, 0, b"x", || Some(1)),
            Orphan::Forward { to: 1 }
        );
        // After the window, the datagrams are this worker's again: the
        // client moved back, so the allocation is pulled back.
        let later = t0 + STRAGGLER_WINDOW;
        assert_eq!(
            h.orphan(later, &c, 0, b"x", || Some(1)),
            Orphan::Pull { from: 1 }
        );
        assert!(h.prune(later).is_empty());
    }

    #[test]
    fn crossed_pulls_each_get_404_and_handle_their_datagrams_locally() {
        // Worker 0 and worker 1 each believe the other has the allocation
        // (the directory changed between their lookups): each pulls, each
        // answers the other's pull with "not here", and each replays what
        // it held.
        let t0 = Instant::now();
        let (mut w0, mut w1) = (Handover::new(0), Handover::new(1));
        let c = ft(1);
        assert_eq!(
            w0.orphan(t0, &c, 0, b"to0", || Some(1)),
            Orphan::Pull { from: 1 }
        );
        assert_eq!(
            w1.orphan(t0, &c, 0, b"to1", || Some(0)),
            Orphan::Pull { from: 0 }
        );
        // Neither has it, so each answers 404; the answers arrive.
        assert_eq!(w0.pulled(&c), vec![(0, b"to0".to_vec())]);
        assert_eq!(w1.pulled(&c), vec![(0, b"to1".to_vec())]);
        assert!(!w0.is_pulling(&c) && !w1.is_pulling(&c));
    }

    #[test]
    fn unanswered_pulls_time_out_and_old_give_aways_are_forgotten() {
        let t0 = Instant::now();
        let mut h = Handover::new(0);
        let (a, b) = (ft(1), ft(2));
        h.orphan(t0, &a, 0, b"x", || Some(1));
        h.gave_away(t0, &b, 1);
        assert!(h.prune(t0 + PULL_TIMEOUT / 2).is_empty());
        assert!(h.is_pulling(&a));
        assert_eq!(h.prune(t0 + PULL_TIMEOUT), vec![a]);
        assert!(!h.is_pulling(&a));
        // The give-away is gone too: b's datagrams are pulled, not forwarded.
        assert_eq!(
            h.orphan(t0 + PULL_TIMEOUT, &b, 0, b"y", || Some(1)),
            Orphan::Pull { from: 1 }
        );
    }
}
