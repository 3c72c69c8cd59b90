//! The relay port range `min-port`..=`max-port`, shared by every worker.
//!
//! The pool tracks which ports this process holds so workers do not race
//! for the same one; the kernel has the last word (another program may hold
//! a port), so a failed bind is retried on another port.

use std::sync::Mutex;

/// Free/used bitmap over the relay port range.
#[derive(Debug)]
pub struct PortPool {
    min: u16,
    max: u16,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    used: Vec<u64>,
    in_use: usize,
}

/// What kind of port to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Any,
    Even,
    /// An even port and the odd one after it, both free.
    EvenPair,
}

impl PortPool {
    /// A pool over `min..=max` (both inclusive; `min <= max`).
    pub fn new(min: u16, max: u16) -> Self {
        assert!(min <= max, "empty port range");
        let n = usize::from(max - min) + 1;
        PortPool {
            min,
            max,
            inner: Mutex::new(Inner {
                used: vec![0; n.div_ceil(64)],
                in_use: 0,
            }),
        }
    }

    /// Number of ports in the range.
    pub fn capacity(&self) -> usize {
        usize::from(self.max - self.min) + 1
    }

    /// Ports currently taken.
    pub fn in_use(&self) -> usize {
        self.inner.lock().expect("port pool lock").in_use
    }

    /// Takes a free port matching `want`, scanning from a random point so
    /// relay ports are unpredictable (RFC 8656 §7.2). `EvenPair` takes both
    /// ports of the pair and returns the even one.
    pub fn take(&self, want: Want) -> Option<u16> {
        let n = self.capacity();
        let start = rand::random_range(0..n);
        let mut g = self.inner.lock().expect("port pool lock");
        for step in 0..n {
            let i = (start + step) % n;
            let port = self.min as usize + i;
            let free = |g: &Inner, i: usize| i < n && g.used[i / 64] & (1 << (i % 64)) == 0;
            let ok = match want {
                Want::Any => free(&g, i),
                Want::Even => port.is_multiple_of(2) && free(&g, i),
                Want::EvenPair => port.is_multiple_of(2) && free(&g, i) && free(&g, i + 1),
            };
            if ok {
                g.used[i / 64] |= 1 << (i % 64);
                g.in_use += 1;
                if want == Want::EvenPair {
                    let j = i + 1;
                    g.used[j / 64] |= 1 << (j % 64);
                    g.in_use += 1;
                }
                return Some(port as u16);
            }
        }
        None
    }

    /// Marks `port` taken (a relay socket handed over by a predecessor
    /// process); ports outside the range are ignored.
    pub fn claim(&self, port: u16) {
        if port < self.min || port > self.max {
            return;
        }
        let i = usize::from(port - self.min);
        let mut g = self.inner.lock().expect("port pool lock");
        if g.used[i / 64] & (1 << (i % 64)) == 0 {
            g.used[i / 64] |= 1 << (i % 64);
            g.in_use += 1;
        }
    }

    /// Returns a port to the pool; ports outside the range are ignored.
    pub fn release(&self, port: u16) {
        if port < self.min || port > self.max {
            return;
        }
        let i = usize::from(port - self.min);
        let mut g = self.inner.lock().expect("port pool lock");
        if g.used[i / 64] & (1 << (i % 64)) != 0 {
            g.used[i / 64] &= !(1 << (i % 64));
            g.in_use -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_every_port_once_then_none() {
        let p = PortPool::new(50000, 50009);
        let mut got: Vec<u16> = (0..10).map(|_| p.take(Want::Any).unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, (50000..=50009).collect::<Vec<_>>());
        assert_eq!(p.take(Want::Any), None);
        assert_eq!(p.in_use(), 10);
        p.release(50004);
        assert_eq!(p.take(Want::Any), Some(50004));
        p.release(1);
    }

    #[test]
    fn claimed_ports_are_not_handed_out() {
        let p = PortPool::new(50000, 50001);
        p.claim(50001);
        p.claim(50001);
        p.claim(40000);
        assert_eq!(p.in_use(), 1);
        assert_eq!(p.take(Want::Any), Some(50000));
        assert_eq!(p.take(Want::Any), None);
        p.release(50001);
        assert_eq!(p.take(Want::Any), Some(50001));
    }

    #[test]
    fn even_and_pairs() {
        let p = PortPool::new(50001, 50004);
        assert_eq!(p.take(Want::EvenPair), Some(50002));
        assert_eq!(
            p.take(Want::EvenPair),
            None,
            "50004's partner is outside the range"
        );
        assert_eq!(p.take(Want::Even), Some(50004));
        assert_eq!(p.take(Want::Even), None);
        assert_eq!(p.take(Want::Any), Some(50001));
        assert_eq!(p.in_use(), 4);
    }
}
