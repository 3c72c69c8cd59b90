//! Credentials and realm settings beyond the configuration file: users,
//! REST secrets, ORIGIN → realm mappings and per-realm limits and peer
//! lists, as a user database holds them (coturn's `userdb`,
//! `psql-userdb`, `mysql-userdb`, `redis-userdb`).
//!
//! The core never waits for a database. It asks a [`Directory`] the driver
//! implements over a cache it keeps fresh; when the cache does not know yet
//! the answer is [`Lookup::Pending`], and the core hands the request back
//! as [`super::ClientAction::Await`]: the driver looks the
//! credentials up, without holding anything else, and gives the same
//! request to the core again once the cache knows.

use std::sync::Arc;

use super::policy::IpRange;
use crate::auth::Key;

/// What a directory knows about something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<T> {
    Found(T),
    /// Not in the database (or the database cannot be asked and nothing is
    /// known about it).
    Absent,
    /// Not known yet: ask again when the driver has looked it up.
    Pending,
}

/// REST API secrets of one realm, every one to be tried.
pub type Secrets = Arc<[Box<[u8]>]>;

/// What a request waits for: credentials from the directory, or a quota
/// decision from the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wanted {
    /// The long-term key of `name` in `realm`.
    User { realm: Arc<str>, name: Arc<str> },
    /// The REST secrets of `realm`.
    Secrets { realm: Arc<str> },
    /// Room for one more allocation of `user` in `realm`, from a ledger
    /// shared beyond this process (a fleet's quotas).
    Quota { realm: Arc<str>, user: Arc<str> },
}

/// Per-realm settings from a database (coturn's `turn_realm_option`,
/// `allowed_peer_ip` and `denied_peer_ip`); `None` means "as configured".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealmSettings {
    /// `max-bps`, bytes per second per allocation and direction.
    pub max_bps: Option<u64>,
    /// `user-quota`: concurrent allocations per user of the realm.
    pub user_quota: Option<u32>,
    /// `total-quota`: concurrent allocations in the realm.
    pub total_quota: Option<u32>,
    /// Peers allowed on top of the configuration's policy.
    pub allowed_peers: Vec<IpRange>,
    /// Peers denied on top of the configuration's policy.
    pub denied_peers: Vec<IpRange>,
}

/// Where the core finds credentials and realm settings it does not hold
/// itself. Every method answers at once from what the implementation
/// knows; none may block.
pub trait Directory {
    /// The long-term key of `user` in `realm`.
    fn user_key(&self, realm: &str, user: &str) -> Lookup<Key>;

    /// The REST API secrets of `realm`.
    fn secrets(&self, realm: &str) -> Lookup<Secrets>;

    /// The realm requests carrying ORIGIN `origin` belong to, if mapped.
    fn realm_of_origin(&self, origin: &str) -> Option<Arc<str>>;

    /// The settings of `realm`, if the database has any.
    fn realm_settings(&self, realm: &str) -> Option<Arc<RealmSettings>>;
}

/// No database: everything is absent.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDirectory;

impl Directory for NoDirectory {
    fn user_key(&self, _: &str, _: &str) -> Lookup<Key> {
        Lookup::Absent
    }

    fn secrets(&self, _: &str) -> Lookup<Secrets> {
        Lookup::Absent
    }

    fn realm_of_origin(&self, _: &str) -> Option<Arc<str>> {
        None
    }

    fn realm_settings(&self, _: &str) -> Option<Arc<RealmSettings>> {
        None
    }
}
