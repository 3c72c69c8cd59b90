//! The allocation table saved and restored across processes: what a live
//! takeover (`turnserver --takeover`) carries from the running server to
//! its successor, beside the relay sockets themselves.
//!
//! An [`Allocation`] holds [`Instant`]s, which mean nothing in another
//! process, so a [`SavedAllocation`] holds durations relative to the `now`
//! it was saved at, in milliseconds, and [`Server::restore`] re-anchors them
//! to its own `now`. Allocation ids (slot and generation) are kept, so
//! mobility tickets stay valid, and quota claims are counted again in the
//! successor's ledger ([`super::quota::Ledger::restore`]).
//!
//! What is not carried: `max-bps` token buckets (they start full), an
//! EVEN-PORT reservation token, and the ADDRESS-ERROR-CODE of a dual
//! Allocate (only a retransmitted Allocate would show it). RFC 6062 TCP
//! allocations are not saved: their client connections stay with the
//! predecessor, which drains them.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use slab::Slab;
use tracing::info;

use super::allocation::{Allocation, Relayed, Shaper};
use super::permission::{Channel, Permission};
use super::quota::{self, Claim};
use super::{AllocationId, FiveTuple, Server, Stats, Traffic};
use crate::auth::LongTermKey;

/// The long-term key an allocation was created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedKey {
    /// MD5(username:realm:password), RFC 8489 §9.2.2.
    Md5([u8; 16]),
    /// SHA-256 of the same, RFC 8489 §9.2.2.
    Sha256([u8; 32]),
}

/// A permission (RFC 8656 §9): its peer IP and the milliseconds it has
/// left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPermission {
    pub ip: IpAddr,
    pub expires_in_ms: u64,
}

/// A channel binding (RFC 8656 §12): milliseconds until it expires,
/// negative once it has and only its rebind guard holds the number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedChannel {
    pub number: u16,
    pub peer: SocketAddr,
    pub expires_in_ms: i64,
}

/// One allocation as another process can restore it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAllocation {
    /// Its [`AllocationId`]'s slot and generation.
    pub index: u32,
    pub generation: u32,
    pub mobile: bool,
    pub five_tuple: FiveTuple,
    /// The driver's token for the client connection (a UDP listener's
    /// index): the successor's driver rewrites it for its own listeners.
    pub link: u32,
    pub relayed: SocketAddr,
    pub advertised: SocketAddr,
    /// The second (relayed, advertised) pair of a dual allocation.
    pub additional: Option<(SocketAddr, SocketAddr)>,
    pub username: String,
    pub realm: String,
    pub origin: Option<String>,
    pub key: Option<SavedKey>,
    pub from_directory: bool,
    pub report_id: u64,
    /// Milliseconds since it was created.
    pub age_ms: u64,
    /// Milliseconds until it expires.
    pub expires_in_ms: u64,
    pub allocate_tid: [u8; 12],
    pub fingerprint: bool,
    pub permissions: Vec<SavedPermission>,
    pub channels: Vec<SavedChannel>,
    pub traffic: Traffic,
    pub claim: Claim,
    /// Its `max-bps` limit, bytes per second each way; 0 for none.
    pub max_bps: u64,
}

impl SavedAllocation {
    /// Its id in the core it was saved from (and is restored into).
    pub fn id(&self) -> AllocationId {
        AllocationId::new(self.index, self.generation)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn signed_millis(at: Instant, now: Instant) -> i64 {
    if at >= now {
        i64::try_from(millis(at - now)).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(millis(now - at)).unwrap_or(i64::MAX)
    }
}

fn instant(now: Instant, ms: i64) -> Instant {
    let d = Duration::from_millis(ms.unsigned_abs());
    if ms >= 0 {
        now + d
    } else {
        now.checked_sub(d).unwrap_or(now)
    }
}

/// Why a saved table cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// The core already holds allocations: restoring is for a new core.
    NotEmpty,
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::NotEmpty => write!(f, "the allocation table is not empty"),
        }
    }
}

impl std::error::Error for RestoreError {}

impl Server {
    /// Saves, at `now`, every allocation whose client 5-tuple `which`
    /// selects, leaving the table unchanged (the caller may still go on
    /// serving them if the takeover fails). RFC 6062 TCP allocations are
    /// never saved.
    pub fn save(&self, now: Instant, which: impl Fn(&FiveTuple) -> bool) -> Vec<SavedAllocation> {
        self.allocations
            .iter()
            .map(|(_, a)| a)
            .filter(|a| a.tcp.is_none() && which(&a.five_tuple))
            .map(|a| SavedAllocation {
                index: a.id.index,
                generation: a.id.generation,
                mobile: a.mobile,
                five_tuple: a.five_tuple,
                link: a.link,
                relayed: a.relayed,
                advertised: a.advertised,
                additional: a.additional.map(|r| (r.relayed, r.advertised)),
                username: a.username.to_string(),
                realm: a.realm.to_string(),
                origin: a.origin.as_deref().map(str::to_string),
                key: a.key.as_ref().map(|k| match k {
                    LongTermKey::Md5(k) => SavedKey::Md5(*k),
                    LongTermKey::Sha256(k) => SavedKey::Sha256(*k),
                }),
                from_directory: a.from_directory,
                report_id: a.report_id,
                age_ms: millis(now.saturating_duration_since(a.created)),
                expires_in_ms: millis(a.expires.saturating_duration_since(now)),
                allocate_tid: a.allocate_tid,
                fingerprint: a.fingerprint,
                permissions: a
                    .permissions
                    .iter()
                    .map(|p| SavedPermission {
                        ip: p.ip,
                        expires_in_ms: millis(p.expires.saturating_duration_since(now)),
                    })
                    .collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|c| SavedChannel {
                        number: c.number,
                        peer: c.peer,
                        expires_in_ms: signed_millis(c.expires, now),
                    })
                    .collect(),
                traffic: a.traffic,
                claim: a.claim.clone(),
                max_bps: a.max_bps(),
            })
            .collect()
    }

    /// Removes allocations that were saved and handed to a successor: no
    /// [`super::Event::AllocationClosed`] (the successor relays through
    /// their sockets now) and their quota claims given back here only (a
    /// fleet's shared count stays with the successor). Returns how many
    /// were removed; ids no longer here are skipped.
    pub fn forget(&mut self, ids: impl IntoIterator<Item = AllocationId>) -> usize {
        let mut n = 0;
        for id in ids {
            if self.get(id).is_none() {
                continue;
            }
            let a = self.allocations.remove(id.slot());
            self.by_five_tuple.remove(&a.five_tuple);
            self.ledger.release(&Claim {
                fleet: false,
                ..a.claim
            });
            n += 1;
        }
        n
    }

    /// Restores a predecessor's allocations into this new core at `now`,
    /// and counts their quota claims in this core's ledger. Each comes with
    /// whether it keeps its id (so the mobility tickets its client holds
    /// stay valid): pass true only for allocations of the predecessor's
    /// worker with this core's index, whose tickets name this worker. The
    /// others (and any whose slot is taken) get new ids, with generations
    /// from `floor` on: pass the predecessor worker's
    /// [`Server::next_generation`], so no ticket it issued names them.
    /// Returns each one's id here, in order; `None` for one whose 5-tuple an
    /// earlier one has (its claim is not counted). Error: the core already
    /// has allocations.
    pub fn restore(
        &mut self,
        now: Instant,
        saved: Vec<(SavedAllocation, bool)>,
        floor: u32,
    ) -> Result<Vec<Option<AllocationId>>, RestoreError> {
        if !self.allocations.is_empty() {
            return Err(RestoreError::NotEmpty);
        }
        self.next_generation = self.next_generation.max(floor);
        // Which keep their slot, which get a new one, which are dropped.
        let mut slots = std::collections::BTreeSet::new();
        let mut plan = Vec::with_capacity(saved.len());
        for (s, keep) in &saved {
            if self.by_five_tuple.contains_key(&s.five_tuple) {
                plan.push(None);
                continue;
            }
            self.by_five_tuple.insert(s.five_tuple, s.id());
            let kept = *keep && slots.insert(s.index);
            if kept {
                self.next_generation = self
                    .next_generation
                    .max(s.generation.wrapping_add(1).max(1));
            }
            plan.push(Some(kept));
        }
        let mut ids = vec![None; saved.len()];
        let mut kept = Vec::new();
        let mut rekeyed = Vec::new();
        for (i, ((s, _), p)) in saved.into_iter().zip(plan).enumerate() {
            match p {
                None => {
                    info!(five_tuple = %s.five_tuple, relayed = %s.relayed, "a handed-over allocation duplicates another's 5-tuple: dropped");
                }
                Some(true) => {
                    ids[i] = Some(s.id());
                    kept.push((s.index as usize, self.restored(now, s.id(), s)));
                }
                Some(false) => rekeyed.push((i, s)),
            }
        }
        self.allocations = kept.into_iter().collect::<Slab<_>>();
        for (i, s) in rekeyed {
            let id = AllocationId::new(self.allocations.vacant_key() as u32, self.next_generation);
            self.next_generation = self.next_generation.wrapping_add(1).max(1);
            self.by_five_tuple.insert(s.five_tuple, id);
            let a = self.restored(now, id, s);
            self.allocations.insert(a);
            ids[i] = Some(id);
        }
        info!(
            allocations = self.allocations.len(),
            "allocations restored from the previous process"
        );
        Ok(ids)
    }

    /// One saved allocation as a live one with id `id` at `now`, its claim
    /// counted in the ledger.
    fn restored(&mut self, now: Instant, id: AllocationId, s: SavedAllocation) -> Allocation {
        self.ledger.restore(&s.claim);
        Allocation {
            id,
            mobile: s.mobile,
            five_tuple: s.five_tuple,
            link: s.link,
            relayed: s.relayed,
            advertised: s.advertised,
            additional: s.additional.map(|(relayed, advertised)| Relayed {
                relayed,
                advertised,
            }),
            address_error: None,
            username: s.username.into(),
            realm: Arc::from(s.realm),
            origin: s.origin.map(Into::into),
            key: s.key.map(|k| match k {
                SavedKey::Md5(k) => LongTermKey::Md5(k),
                SavedKey::Sha256(k) => LongTermKey::Sha256(k),
            }),
            from_directory: s.from_directory,
            report_id: s.report_id,
            created: now
                .checked_sub(Duration::from_millis(s.age_ms))
                .unwrap_or(now),
            expires: now + Duration::from_millis(s.expires_in_ms),
            allocate_tid: s.allocate_tid,
            reservation_token: None,
            fingerprint: s.fingerprint,
            permissions: s
                .permissions
                .into_iter()
                .map(|p| Permission {
                    ip: p.ip,
                    expires: now + Duration::from_millis(p.expires_in_ms),
                })
                .collect(),
            channels: s
                .channels
                .into_iter()
                .map(|c| Channel {
                    number: c.number,
                    peer: c.peer,
                    expires: instant(now, c.expires_in_ms),
                })
                .collect(),
            traffic: s.traffic,
            claim: s.claim,
            shaper: (s.max_bps > 0).then(|| {
                Box::new(Shaper {
                    rate: s.max_bps,
                    to_peer: quota::Bucket::new(s.max_bps, now),
                    to_client: quota::Bucket::new(s.max_bps, now),
                })
            }),
            tcp: None,
        }
    }

    /// The generation the next allocation id gets: what a successor's
    /// [`Server::restore`] takes as its floor.
    pub fn next_generation(&self) -> u32 {
        self.next_generation
    }

    /// Adds a predecessor's counters to this core's, so metrics continue
    /// across a takeover.
    pub fn restore_stats(&mut self, s: &Stats) {
        let t = &mut self.stats;
        t.allocations_created += s.allocations_created;
        for (a, b) in t.ended.iter_mut().zip(s.ended) {
            *a += b;
        }
        for (a, b) in t.auth_failures.iter_mut().zip(s.auth_failures) {
            *a += b;
        }
        t.rate_limited += s.rate_limited;
        t.quota_refusals += s.quota_refusals;
        t.no_port_refusals += s.no_port_refusals;
        t.forbidden_peers += s.forbidden_peers;
        t.redirected += s.redirected;
        t.closed_traffic.add(&s.closed_traffic);
    }
}
