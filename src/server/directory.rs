//! The user database as the cores see it: a cache that answers at once
//! ([`crate::turn::Directory`]), and the task that fills it.
//!
//! - **Users** are looked up one by one when first asked for (the core's
//!   request waits, held by its worker, nothing else does) and kept for
//!   `userdb-cache-seconds` (the staleness bound): an entry older than half
//!   of that is refreshed in the background while it is still used, an
//!   entry older than all of it is looked up again before it is used. A
//!   user added in the database is seen at its first request, a deleted or
//!   changed one within the bound.
//! - **Secrets, ORIGIN mappings, realm options and peer lists** are small
//!   tables, re-read as a whole every `userdb-cache-seconds`.
//! - **Outages**: a failed or slow (past the connect timeout) query marks
//!   the database down, logged once, and retried with backoff (1 s doubling
//!   to 30 s). While it is down nothing waits: users and secrets already
//!   known keep working, unknown users get 401 at once. The first answer
//!   after an outage is logged too. Nothing already relaying notices.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::auth::Key;
use crate::turn::policy::IpRange;
use crate::turn::{Directory, Lookup, RealmSettings, Secrets, Wanted};
use crate::userdb::{Snapshot, Store, UserDb};

/// Default staleness bound, seconds (`userdb-cache-seconds`).
pub const DEFAULT_CACHE_SECONDS: u32 = 3;
/// Most lookups waiting at once; beyond, unknown users are refused (401)
/// rather than queued behind a slow database.
const MAX_IN_FLIGHT: usize = 4096;
/// Backoff after a failure: from 1 s, doubling, to 30 s.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What is known of one user.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Option<Key>,
    fetched: Instant,
}

/// The whole-table part, prepared for lookups.
#[derive(Debug, Default)]
struct Tables {
    /// When it was read; `None` before the first read.
    fetched: Option<Instant>,
    secrets: HashMap<String, Secrets>,
    origins: HashMap<String, Arc<str>>,
    realms: HashMap<String, Arc<RealmSettings>>,
}

impl Tables {
    /// From a snapshot; peer ranges that do not parse are skipped, and
    /// with `ip_lists` or `realms` off their tables are left out
    /// (`no-dynamic-ip-list`, `no-dynamic-realms`).
    fn from(s: Snapshot, fetched: Instant, ip_lists: bool, realms: bool) -> Tables {
        let mut t = Tables {
            fetched: Some(fetched),
            ..Tables::default()
        };
        for (realm, list) in s.secrets {
            let list: Secrets = list
                .into_iter()
                .map(|v| v.into_bytes().into_boxed_slice())
                .collect();
            t.secrets.insert(realm, list);
        }
        let mut settings: BTreeMap<String, RealmSettings> = BTreeMap::new();
        if realms {
            t.origins = s
                .origins
                .into_iter()
                .map(|(o, r)| (o, Arc::from(r)))
                .collect();
            for ((realm, opt), value) in s.realm_options {
                let r = settings.entry(realm).or_default();
                let n = value.trim().parse::<u64>().ok().filter(|&n| n > 0);
                match opt.as_str() {
                    "max-bps" => r.max_bps = n,
                    "user-quota" => r.user_quota = n.map(|n| n.min(u64::from(u32::MAX)) as u32),
                    "total-quota" => r.total_quota = n.map(|n| n.min(u64::from(u32::MAX)) as u32),
                    _ => {}
                }
            }
        }
        if ip_lists {
            let parse = |v: Vec<String>| -> Vec<IpRange> {
                v.iter()
                    .filter_map(|r| match r.parse() {
                        Ok(r) => Some(r),
                        Err(e) => {
                            warn!("user database: peer range '{r}' skipped: {e}");
                            None
                        }
                    })
                    .collect()
            };
            for (realm, list) in s.allowed_peers {
                settings.entry(realm).or_default().allowed_peers = parse(list);
            }
            for (realm, list) in s.denied_peers {
                settings.entry(realm).or_default().denied_peers = parse(list);
            }
        }
        t.realms = settings
            .into_iter()
            .map(|(r, s)| (r, Arc::new(s)))
            .collect();
        t
    }
}

/// Whether the database answers.
#[derive(Debug)]
struct Health {
    /// Since when it does not, and why.
    down: Option<(Instant, String)>,
    /// No query before this while down.
    retry_at: Instant,
    backoff: Duration,
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct DirectoryStats {
    pub found: AtomicU64,
    pub absent: AtomicU64,
    pub errors: AtomicU64,
    pub up: AtomicBool,
}

/// The cache every worker's core reads, shared by them.
pub struct Cache {
    /// Which database, for logs.
    pub db: UserDb,
    ttl: Duration,
    users: RwLock<HashMap<String, HashMap<String, Entry>>>,
    tables: ArcSwap<Tables>,
    health: Mutex<Health>,
    /// Lookups asked for and not answered yet, with the workers to tell.
    in_flight: Mutex<HashMap<Wanted, Vec<usize>>>,
    requests: mpsc::UnboundedSender<Wanted>,
    ip_lists: bool,
    dynamic_realms: bool,
    /// The tables changed: re-read them now.
    tables_stale: AtomicBool,
    pub stats: DirectoryStats,
}

/// What [`serve`] needs besides the cache.
pub struct Requests(mpsc::UnboundedReceiver<Wanted>);

impl Cache {
    /// An empty cache for `db`, whose entries live `ttl`; `ip_lists` and
    /// `dynamic_realms` read the peer lists and the realm options and
    /// ORIGIN mappings (off with `no-dynamic-ip-list`,
    /// `no-dynamic-realms`). The [`Requests`] go to [`serve`].
    pub fn new(
        db: UserDb,
        ttl: Duration,
        ip_lists: bool,
        dynamic_realms: bool,
    ) -> (Arc<Cache>, Requests) {
        let (tx, rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let cache = Arc::new(Cache {
            db,
            ttl: ttl.max(Duration::from_millis(100)),
            users: RwLock::default(),
            tables: ArcSwap::from_pointee(Tables::default()),
            health: Mutex::new(Health {
                down: None,
                retry_at: now,
                backoff: BACKOFF_MIN,
            }),
            in_flight: Mutex::default(),
            requests: tx,
            ip_lists,
            dynamic_realms,
            tables_stale: AtomicBool::new(false),
            stats: DirectoryStats::default(),
        });
        cache.stats.up.store(true, Ordering::Relaxed);
        (cache, Requests(rx))
    }

    /// The staleness bound.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The core's view of the cache for worker `worker` (which is told
    /// when what it asked for arrives).
    pub fn for_worker(self: &Arc<Self>, worker: usize) -> Box<dyn Directory> {
        Box::new(WorkerView {
            cache: self.clone(),
            worker,
        })
    }

    /// `Some(since, why)` while the database is down.
    pub fn outage(&self) -> Option<(Instant, String)> {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .down
            .clone()
    }

    /// Whether queries are held back (down, before the next retry).
    fn resting(&self, now: Instant) -> bool {
        let h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        h.down.is_some() && now < h.retry_at
    }

    /// Asks the service for `w`, telling `worker` (if any) when it is
    /// there. False when too much is in flight already.
    fn ask(&self, w: Wanted, worker: Option<usize>) -> bool {
        let mut f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiting) = f.get_mut(&w) {
            if let Some(i) = worker
                && !waiting.contains(&i)
            {
                waiting.push(i);
            }
            return true;
        }
        if f.len() >= MAX_IN_FLIGHT {
            return false;
        }
        f.insert(w.clone(), worker.into_iter().collect());
        drop(f);
        self.requests.send(w).is_ok()
    }

    fn user(&self, realm: &str, user: &str, worker: usize) -> Lookup<Key> {
        let now = Instant::now();
        let entry = self
            .users
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(realm)
            .and_then(|m| m.get(user))
            .copied();
        let found = |key: Option<Key>| match key {
            Some(k) => Lookup::Found(k),
            None => Lookup::Absent,
        };
        let wanted = || Wanted::User {
            realm: realm.into(),
            name: user.into(),
        };
        match entry {
            Some(e) if now.saturating_duration_since(e.fetched) < self.ttl => {
                if now.saturating_duration_since(e.fetched) >= self.ttl / 2 && !self.resting(now) {
                    self.ask(wanted(), None);
                }
                found(e.key)
            }
            // Too old to trust, but the database cannot be asked: what is
            // known keeps working.
            Some(e) if self.resting(now) => found(e.key),
            None if self.resting(now) => Lookup::Absent,
            _ => {
                if self.ask(wanted(), Some(worker)) {
                    Lookup::Pending
                } else {
                    entry.map_or(Lookup::Absent, |e| found(e.key))
                }
            }
        }
    }

    fn secrets(&self, realm: &str, worker: usize) -> Lookup<Secrets> {
        let t = self.tables.load();
        if t.fetched.is_none() && !self.resting(Instant::now()) {
            let w = Wanted::Secrets {
                realm: realm.into(),
            };
            if self.ask(w, Some(worker)) {
                return Lookup::Pending;
            }
        }
        match t.secrets.get(realm) {
            Some(s) => Lookup::Found(s.clone()),
            None => Lookup::Absent,
        }
    }

    /// Records the outcome of a query.
    fn answered(&self, outcome: Result<(), &str>) {
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match outcome {
            Ok(()) => {
                if let Some((since, _)) = h.down.take() {
                    info!(
                        "user database {} answers again after {} s",
                        self.db,
                        now.saturating_duration_since(since).as_secs()
                    );
                }
                h.backoff = BACKOFF_MIN;
                self.stats.up.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if h.down.is_none() {
                    error!(
                        "user database {} unreachable: {e}; users already known keep working, others are refused until it answers",
                        self.db
                    );
                    h.down = Some((now, e.to_string()));
                    h.backoff = BACKOFF_MIN;
                } else {
                    debug!("user database {} still unreachable: {e}", self.db);
                    h.backoff = (h.backoff * 2).min(BACKOFF_MAX);
                }
                h.retry_at = now + h.backoff;
                self.stats.up.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Forgets what is known of `user` in `realm` (it changed): its next
    /// request looks it up again.
    pub fn forget_user(&self, realm: &str, user: &str) {
        if let Some(m) = self
            .users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(realm)
        {
            m.remove(user);
        }
    }

    /// Marks the tables stale (they changed): re-read at the next asking
    /// and by the next refresh, without waiting for the period.
    pub fn forget_tables(&self) {
        self.tables_stale.store(true, Ordering::Relaxed);
    }

    /// Forgets every user and marks the tables stale (events may have been
    /// missed).
    pub fn forget_all(&self) {
        self.users
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.forget_tables();
    }

    /// The workers waiting for `w` (and forgets it).
    fn done(&self, w: &Wanted) -> Vec<usize> {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(w)
            .unwrap_or_default()
    }
}

/// One worker's [`Directory`]: the shared cache, and who to tell.
struct WorkerView {
    cache: Arc<Cache>,
    worker: usize,
}

impl Directory for WorkerView {
    fn user_key(&self, realm: &str, user: &str) -> Lookup<Key> {
        self.cache.user(realm, user, self.worker)
    }

    fn secrets(&self, realm: &str) -> Lookup<Secrets> {
        self.cache.secrets(realm, self.worker)
    }

    fn realm_of_origin(&self, origin: &str) -> Option<Arc<str>> {
        self.cache.tables.load().origins.get(origin).cloned()
    }

    fn realm_settings(&self, realm: &str) -> Option<Arc<RealmSettings>> {
        self.cache.tables.load().realms.get(realm).cloned()
    }
}

/// Tells worker `worker` that what it waited for is in the cache.
pub type Notify = Box<dyn Fn(usize, Wanted) + Send>;

/// How long one query may take before the database counts as down.
fn query_timeout(db: &UserDb) -> Duration {
    match db {
        UserDb::Sqlite(_) => Duration::from_secs(5),
        UserDb::Postgres(e) | UserDb::MySql(e) | UserDb::Redis(e) => e.connect_timeout,
    }
}

/// Reads the tables once (at start, or when asked); returns whether it
/// worked.
async fn read_tables(cache: &Cache, store: &Store) -> bool {
    let timeout = query_timeout(&cache.db);
    match tokio::time::timeout(timeout, store.snapshot()).await {
        Ok(Ok(s)) => {
            let t = Tables::from(s, Instant::now(), cache.ip_lists, cache.dynamic_realms);
            cache.tables.store(Arc::new(t));
            cache.answered(Ok(()));
            true
        }
        Ok(Err(e)) => {
            cache.answered(Err(&e.to_string()));
            false
        }
        Err(_) => {
            cache.answered(Err("no answer within the timeout"));
            false
        }
    }
}

/// Looks up one user and puts the answer in the cache.
async fn look_up(cache: &Cache, store: &Store, realm: &str, name: &str) {
    let timeout = query_timeout(&cache.db);
    match tokio::time::timeout(timeout, store.user_key(realm, name)).await {
        Ok(Ok(key)) => {
            let counter = if key.is_some() {
                &cache.stats.found
            } else {
                &cache.stats.absent
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let entry = Entry {
                key,
                fetched: Instant::now(),
            };
            cache
                .users
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(realm.to_string())
                .or_default()
                .insert(name.to_string(), entry);
            cache.answered(Ok(()));
        }
        Ok(Err(e)) => cache.answered(Err(&e.to_string())),
        Err(_) => cache.answered(Err("no answer within the timeout")),
    }
}

/// Serves the cache's lookups, and re-reads the tables every staleness
/// period, until the runtime stops; `notify` tells the workers.
pub async fn serve(cache: Arc<Cache>, store: Store, requests: Requests, notify: Notify) {
    let store = Arc::new(store);
    tokio::spawn(refresh_tables(cache.clone(), store.clone()));
    let mut rx = requests.0;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Wanted>();
    // At most this many queries at once.
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        tokio::select! {
            Some(w) = rx.recv() => {
                let (cache, store, done, permits) =
                    (cache.clone(), store.clone(), done_tx.clone(), permits.clone());
                tokio::spawn(async move {
                    let _permit = permits.acquire().await;
                    match &w {
                        Wanted::User { realm, name } => look_up(&cache, &store, realm, name).await,
                        Wanted::Secrets { .. } => {
                            read_tables(&cache, &store).await;
                        }
                        // The fleet's, not the user database's.
                        Wanted::Quota { .. } => {}
                    }
                    let _ = done.send(w);
                });
            }
            Some(w) = done_rx.recv() => {
                for worker in cache.done(&w) {
                    notify(worker, w.clone());
                }
            }
            else => return,
        }
    }
}

/// Re-reads the tables every staleness period (not while the database
/// rests after a failure), and within 100 ms of being told they changed.
async fn refresh_tables(cache: Arc<Cache>, store: Arc<Store>) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let due = last.elapsed() >= cache.ttl || cache.tables_stale.swap(false, Ordering::Relaxed);
        if due && !cache.resting(Instant::now()) {
            read_tables(&cache, &store).await;
            last = Instant::now();
        }
    }
}

/// Reads the tables once at start, waiting at most `limit`: so that the
/// first clients find secrets, realms and ORIGIN mappings. An unreachable
/// database is logged (and retried by [`serve`]), not fatal.
pub async fn warm_up(cache: &Cache, store: &Store, limit: Duration) {
    if tokio::time::timeout(limit, read_tables(cache, store))
        .await
        .is_err()
    {
        cache.answered(Err("no answer at start"));
    }
}
