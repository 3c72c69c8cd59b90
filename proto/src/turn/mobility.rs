//! RFC 8016 mobility, and moving allocations between workers: tickets,
//! and taking an allocation out of one core and into another (for a mobile
//! client's new 5-tuple, or unchanged when UDP steering moves its client).

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tracing::{debug, info};

use super::allocation::{Allocation, Arrival};
use super::{AllocationId, ClientAction, FiveTuple, Server};
use crate::stun::{ErrorCode, Message};

/// An allocation on its way to another worker (RFC 8016 mobility): its
/// whole state, already re-keyed to the client's new 5-tuple.
#[derive(Debug)]
pub struct MovedAllocation {
    allocation: Allocation,
}

impl MovedAllocation {
    /// Its relayed transport address (the relay socket travels with it).
    pub fn relayed(&self) -> SocketAddr {
        self.allocation.relayed
    }

    /// The second relayed address of a dual allocation, whose socket
    /// travels with it too.
    pub fn additional(&self) -> Option<SocketAddr> {
        self.allocation.additional.map(|r| r.relayed)
    }
}

/// Length of a mobility ticket, characters: unpadded base64url of 20 bytes
/// (worker, index, generation and a 10-byte tag). coturn's clients keep at
/// most 32 characters of a ticket.
const TICKET_LEN: usize = 27;

fn ticket_tag(key: &[u8; 32], data: &[u8]) -> [u8; 10] {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(data);
    let out = mac.finalize().into_bytes();
    out[..10].try_into().expect("SHA-1 output is 20 bytes")
}

impl Server {
    /// A Refresh carrying ticket `t` from 5-tuple `ft` (connection `link`)
    /// for `username`: moves the allocation here when this worker has it.
    pub(super) fn arrive(
        &mut self,
        t: &[u8],
        ft: &FiveTuple,
        link: u32,
        username: &str,
    ) -> Result<AllocationId, Arrival> {
        let Some((owner, id)) = self.parse_ticket(t) else {
            return Err(Arrival::Refused(ErrorCode::AllocationNotFound));
        };
        if owner != self.worker {
            return Err(Arrival::Elsewhere(ClientAction::Migrate {
                owner,
                allocation: id,
                username: username.to_string(),
            }));
        }
        let mut a = self.take(id, username).map_err(Arrival::Refused)?;
        info!(from = %a.five_tuple, to = %ft, user = username, relayed = %a.relayed, "allocation moved (mobility)");
        a.five_tuple = *ft;
        a.link = link;
        self.by_five_tuple.insert(*ft, id);
        let index = self.allocations.insert(a);
        debug_assert_eq!(index, id.slot());
        Ok(id)
    }

    /// The mobility ticket for allocation `id` on this worker: base64url of
    /// worker, index, generation and a 10-byte HMAC-SHA1 tag over them
    /// (printable and short, as clients such as turnutils_uclient keep it in a
    /// 33-byte string).
    pub(super) fn ticket(&self, id: AllocationId) -> [u8; TICKET_LEN] {
        let mut raw = [0u8; 20];
        raw[..2].copy_from_slice(&self.worker.to_be_bytes());
        raw[2..6].copy_from_slice(&id.index.to_be_bytes());
        raw[6..10].copy_from_slice(&id.generation.to_be_bytes());
        let tag = ticket_tag(&self.cfg.ticket_key, &raw[..10]);
        raw[10..].copy_from_slice(&tag);
        let mut out = [0u8; TICKET_LEN];
        let n = URL_SAFE_NO_PAD
            .encode_slice(raw, &mut out)
            .expect("20 bytes encode to 27 characters");
        debug_assert_eq!(n, TICKET_LEN);
        out
    }

    /// Decodes and authenticates a ticket into (worker, allocation).
    fn parse_ticket(&self, t: &[u8]) -> Option<(u16, AllocationId)> {
        if t.len() != TICKET_LEN {
            return None;
        }
        let mut raw = [0u8; 21];
        if URL_SAFE_NO_PAD.decode_slice(t, &mut raw).ok()? != 20 {
            return None;
        }
        let tag = ticket_tag(&self.cfg.ticket_key, &raw[..10]);
        let diff = tag
            .iter()
            .zip(&raw[10..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return None;
        }
        let worker = u16::from_be_bytes([raw[0], raw[1]]);
        let index = u32::from_be_bytes(raw[2..6].try_into().ok()?);
        let generation = u32::from_be_bytes(raw[6..10].try_into().ok()?);
        Some((worker, AllocationId { index, generation }))
    }

    /// Removes a mobile allocation for `username` from the tables, for a
    /// move. Errors: 404 when it is gone or not mobile, 441 for another user.
    fn take(&mut self, id: AllocationId, username: &str) -> Result<Allocation, ErrorCode> {
        let a = self.get(id).ok_or(ErrorCode::AllocationNotFound)?;
        if !a.mobile {
            return Err(ErrorCode::AllocationNotFound);
        }
        if *a.username != *username {
            return Err(ErrorCode::WrongCredentials);
        }
        let a = self.allocations.remove(id.slot());
        self.by_five_tuple.remove(&a.five_tuple);
        Ok(a)
    }

    /// Hands allocation `id` to another worker for its client's new
    /// 5-tuple `to` (connection token `link` there). The caller moves the
    /// relay socket with it; no [`Event::AllocationClosed`] is emitted.
    /// Errors: 404 (gone, or created without mobility) or 441 (another user).
    pub fn export(
        &mut self,
        id: AllocationId,
        username: &str,
        to: &FiveTuple,
        link: u32,
    ) -> Result<MovedAllocation, ErrorCode> {
        let mut a = self.take(id, username)?;
        info!(from = %a.five_tuple, to = %to, user = username, relayed = %a.relayed, "allocation moved to another worker (mobility)");
        a.five_tuple = *to;
        a.link = link;
        Ok(MovedAllocation { allocation: a })
    }

    /// Hands allocation `id` to another worker unchanged (same 5-tuple and
    /// connection token), because its client's datagrams now reach that
    /// worker (UDP steering). The caller moves the relay socket with it; no
    /// [`Event::AllocationClosed`] is emitted. Error: 404 (gone).
    pub fn export_unchanged(&mut self, id: AllocationId) -> Result<MovedAllocation, ErrorCode> {
        self.get(id).ok_or(ErrorCode::AllocationNotFound)?;
        let a = self.allocations.remove(id.slot());
        self.by_five_tuple.remove(&a.five_tuple);
        debug!(five_tuple = %a.five_tuple, relayed = %a.relayed, "allocation moved to another worker (steering)");
        Ok(MovedAllocation { allocation: a })
    }

    /// Adopts an allocation exported by another worker; returns its id here,
    /// for registering its relay socket. `None` (and the allocation is
    /// deleted) when its new 5-tuple meanwhile got an allocation of its own.
    pub fn import(&mut self, moved: MovedAllocation) -> Option<AllocationId> {
        let mut a = moved.allocation;
        if self.by_five_tuple.contains_key(&a.five_tuple) {
            info!(five_tuple = %a.five_tuple, user = &*a.username, relayed = %a.relayed, reason = "5-tuple already has an allocation", "allocation deleted");
            self.ledger.release(&a.claim);
            return None;
        }
        let id = AllocationId::new(self.allocations.vacant_key() as u32, self.next_generation);
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        a.id = id;
        self.by_five_tuple.insert(a.five_tuple, id);
        self.allocations.insert(a);
        Some(id)
    }

    /// Answers request `data` (as received) with error `code`, for requests
    /// the driver could not complete (a failed mobility move).
    pub fn answer_error(&self, data: &[u8], code: ErrorCode, out: &mut Vec<u8>) -> ClientAction {
        match Message::parse(data) {
            Ok(msg) => self.error(out, &msg, code, None),
            Err(_) => ClientAction::None,
        }
    }
}
