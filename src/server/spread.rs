//! Where to send new clients when this node is busy or draining: a pure
//! state machine the fleet task consults every heartbeat (like
//! [`super::steering::Controller`]).
//!
//! A node above `redirect-above` percent of its capacity answers new
//! Allocates with 300 ALTERNATE-SERVER naming the least-loaded healthy
//! node of the fleet that is itself below the threshold; it stops once it
//! is back under the threshold less a margin, so a node near the line does
//! not flap. A draining node sends every new Allocate elsewhere.

use std::net::SocketAddr;

/// Percentage points under the threshold a node must fall to stop
/// redirecting.
pub const HYSTERESIS: f64 = 5.0;

/// Another node as its heartbeat describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Where its clients reach it over UDP/TCP.
    pub address: SocketAddr,
    /// Where over TLS, if it serves TLS.
    pub tls_address: Option<SocketAddr>,
    /// Its load, percent of its capacity.
    pub load: f64,
    pub draining: bool,
}

/// Where to redirect new Allocates: over UDP/TCP, and over TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub address: SocketAddr,
    pub tls_address: Option<SocketAddr>,
}

/// The redirect decision, with memory for the hysteresis.
#[derive(Debug, Default)]
pub struct Controller {
    redirecting: bool,
}

impl Controller {
    pub fn new() -> Self {
        Controller::default()
    }

    /// Decides from this node's `load` (percent), the `threshold` (percent;
    /// 0 = only when draining), whether it `draining`, and the `peers`.
    pub fn decide(
        &mut self,
        load: f64,
        threshold: f64,
        draining: bool,
        peers: &[Peer],
    ) -> Option<Target> {
        let busy = threshold > 0.0
            && if self.redirecting {
                load >= threshold - HYSTERESIS
            } else {
                load >= threshold
            };
        self.redirecting = busy;
        if !busy && !draining {
            return None;
        }
        // Peers that can take clients: not draining, and below the
        // threshold (any load will do for a draining node without a
        // threshold).
        peers
            .iter()
            .filter(|p| !p.draining && (threshold <= 0.0 || p.load < threshold))
            .min_by(|a, b| {
                // Equal loads: the lower address, so the choice holds still.
                a.load
                    .total_cmp(&b.load)
                    .then_with(|| a.address.cmp(&b.address))
            })
            .map(|p| Target {
                address: p.address,
                tls_address: p.tls_address,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(port: u16, load: f64) -> Peer {
        Peer {
            address: SocketAddr::from(([10, 0, 0, 1], port)),
            tls_address: None,
            load,
            draining: false,
        }
    }

    #[test]
    fn redirects_to_the_least_loaded_peer_above_the_threshold_only() {
        let mut c = Controller::new();
        let peers = [peer(1, 40.0), peer(2, 10.0), peer(3, 95.0)];
        assert_eq!(c.decide(50.0, 80.0, false, &peers), None);
        let t = c.decide(85.0, 80.0, false, &peers).unwrap();
        assert_eq!(t.address.port(), 2);
        // Hysteresis: still redirecting just under the threshold...
        assert!(c.decide(77.0, 80.0, false, &peers).is_some());
        // ...until the margin is passed.
        assert_eq!(c.decide(74.0, 80.0, false, &peers), None);
        assert_eq!(c.decide(79.0, 80.0, false, &peers), None);
    }

    #[test]
    fn equal_loads_pick_the_same_peer_whatever_the_order() {
        let mut c = Controller::new();
        let (a, b) = (peer(7, 20.0), peer(3, 20.0));
        let one = c.decide(90.0, 80.0, false, &[a.clone(), b.clone()]);
        let other = c.decide(90.0, 80.0, false, &[b, a]);
        assert_eq!(one, other);
        assert_eq!(one.unwrap().address.port(), 3);
    }

    #[test]
    fn no_healthy_peer_means_no_redirect() {
        let mut c = Controller::new();
        let mut busy = peer(1, 90.0);
        let mut draining = peer(2, 0.0);
        draining.draining = true;
        assert_eq!(c.decide(99.0, 80.0, false, &[busy.clone(), draining]), None);
        busy.load = 50.0;
        assert!(c.decide(99.0, 80.0, false, &[busy]).is_some());
    }

    #[test]
    fn a_draining_node_sends_everyone_away() {
        let mut c = Controller::new();
        let peers = [peer(1, 60.0), peer(2, 30.0)];
        // Without a threshold, any non-draining peer will do.
        assert_eq!(c.decide(0.0, 0.0, true, &peers).unwrap().address.port(), 2);
        assert_eq!(c.decide(0.0, 0.0, false, &peers), None);
        assert_eq!(c.decide(0.0, 0.0, true, &[]), None);
    }
}
