//! A fleet of nodes sharing one Redis (the `redis-userdb`): quotas counted
//! across every node, a registry of live allocations, revocation and
//! session control, and load spreading.
//!
//! - **Quotas.** With a `user-quota` or `total-quota` (the file's or a
//!   realm's), a new allocation takes a slot in Redis first: a Lua script
//!   sums the counts of the live nodes (each node a field of one hash per
//!   user and per realm) and takes the slot atomically, or refuses (486).
//!   The core's Allocate waits for that answer alone, held by its worker
//!   ([`crate::turn::Wanted::Quota`]). A node is live while its heartbeat key
//!   (`turnserver/node/<name>`, rewritten every [`PERIOD`]) has not
//!   expired: [`LEASE`] after a node dies or is cut off, its slots count no
//!   more. Every heartbeat also writes the node's own counts that changed
//!   from its exact local ones, and all of them every
//!   [`FULL_REWRITE_EVERY`] beats and after an outage, so the shared counts
//!   heal from any drift. Live nodes are the members of `turnserver/nodes`
//!   whose heartbeat exists (no KEYS scans).
//! - **Redis down**: quotas fall back to the node's own counts (logged
//!   once, `turn_fleet_up` 0, `/health` says so); nothing relaying notices.
//!   When Redis answers again the node rewrites its counts and is back.
//! - **Registry**: every live allocation is a field of
//!   `turnserver/allocations/<node>` (expiring with the node), for
//!   `turnadmin --list-allocations`.
//! - **Events** on channel `turnserver/events`: `user <realm> <name>` and
//!   `tables` drop what the user database's cache knows (our `turnadmin`
//!   publishes them; Redis keyspace notifications for `turn/*` keys, when
//!   the server may turn them on, cover other tools), and `end-user
//!   <realm|*> <name>` ends that user's allocations on every node.
//! - **Spreading**: every heartbeat carries the node's address and load;
//!   with `redirect-above`, a busy (or draining) node sends new Allocates
//!   to the least-loaded healthy peer ([`super::spread`]).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::Shared;
use super::directory::Cache;
use super::spread;
use crate::turn::quota::{Acquire, Claim, Counts, Ledger, Limits, Refused};
use crate::turn::{AllocationStatus, StatusChange, Wanted};
use crate::userdb::conn::Endpoint;

/// How often a node rewrites its heartbeat and counts.
pub const PERIOD: Duration = Duration::from_secs(1);
/// How long a node's heartbeat lives: its slots count this long after it
/// dies or is cut off, at most.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long a refusal is remembered before Redis is asked again.
const DENIAL_MEMORY: Duration = Duration::from_millis(300);
/// A slot taken in Redis that no Allocate claimed (prefetched, or its
/// Allocate went away) is given back after this long.
const UNCLAIMED: Duration = Duration::from_secs(2);
/// Slots a node takes ahead for a user with room to spare (at most a
/// quarter of the room left), so that a busy user's Allocates mostly find
/// one at hand instead of waiting for Redis.
const PREFETCH: u32 = 16;
/// The channel of fleet events.
pub const EVENTS: &str = "turnserver/events";

/// How this node takes part.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The node's name in Redis (`node-name`).
    pub node: String,
    /// Where clients reach it over UDP/TCP, and over TLS.
    pub address: SocketAddr,
    pub tls_address: Option<SocketAddr>,
    /// `redirect-above`, percent of capacity; 0 = only while draining.
    pub redirect_above: f64,
    /// The Redis of the `redis-userdb`.
    pub redis: Endpoint,
}

/// A slot-in-Redis conversation about one (realm, user).
#[derive(Debug, Default)]
struct Hold {
    /// Slots Redis granted that no Allocate has claimed yet, with when.
    granted: Vec<Instant>,
    /// The last refusal and why.
    denied: Option<(Instant, Refused)>,
    /// Workers holding an Allocate for this.
    waiting: Vec<usize>,
    /// A request to Redis is on its way.
    asking: bool,
    /// Allocates that found no slot since the last request was sent: the
    /// next request asks for this many slots at once.
    demand: u32,
}

#[derive(Debug, Default)]
struct LedgerState {
    counts: Counts,
    holds: HashMap<(String, String), Hold>,
}

/// What the fleet task is asked to do.
enum Request {
    Reserve {
        realm: String,
        user: String,
        limits: Limits,
        /// Slots wanted.
        count: u32,
    },
    Release {
        realm: String,
        user: Option<String>,
    },
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub up: AtomicBool,
    /// Slots Redis granted and refused.
    pub granted: AtomicU64,
    pub refused: AtomicU64,
    pub errors: AtomicU64,
    /// Status reports dropped because the fleet task fell behind.
    pub dropped: AtomicU64,
}

/// The node's part of the fleet, shared by its workers.
pub struct Fleet {
    pub config: FleetConfig,
    state: Mutex<LedgerState>,
    requests: mpsc::UnboundedSender<Request>,
    statuses: mpsc::Sender<Arc<AllocationStatus>>,
    /// Since when Redis does not answer, and why.
    down: Mutex<Option<(Instant, String)>>,
    /// This process's mark in its heartbeat, to notice another node
    /// writing under the same name.
    instance: u64,
    /// Heartbeats written so far, and whether the name clash was logged.
    beats: AtomicU64,
    clash_logged: AtomicBool,
    pub stats: FleetStats,
}

/// What the fleet task needs besides the [`Fleet`].
pub struct Inbox {
    requests: mpsc::UnboundedReceiver<Request>,
    statuses: mpsc::Receiver<Arc<AllocationStatus>>,
}

impl Fleet {
    pub fn new(config: FleetConfig) -> (Arc<Fleet>, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stx, srx) = mpsc::channel(4096);
        let fleet = Arc::new(Fleet {
            config,
            state: Mutex::default(),
            requests: tx,
            statuses: stx,
            down: Mutex::new(None),
            instance: rand::random(),
            beats: AtomicU64::new(0),
            clash_logged: AtomicBool::new(false),
            stats: FleetStats::default(),
        });
        fleet.stats.up.store(true, Ordering::Relaxed);
        (
            fleet,
            Inbox {
                requests: rx,
                statuses: srx,
            },
        )
    }

    fn state(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The core's ledger for worker `worker`.
    pub fn ledger_for(self: &Arc<Self>, worker: usize) -> Box<dyn Ledger> {
        Box::new(FleetLedger {
            fleet: self.clone(),
            worker,
        })
    }

    /// Live allocations on this node.
    pub fn allocations(&self) -> u32 {
        self.state().counts.allocations()
    }

    /// Queues an allocation's status for the registry (dropped, and
    /// counted, if the task is far behind).
    pub fn report(&self, status: Arc<AllocationStatus>) {
        if self.statuses.try_send(status).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `Some(since, why)` while Redis does not answer.
    pub fn outage(&self) -> Option<(Instant, String)> {
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_up(&self) -> bool {
        self.stats.up.load(Ordering::Relaxed)
    }

    fn mark(&self, outcome: Result<(), String>) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(()) => {
                if let Some((since, _)) = down.take() {
                    info!(
                        "fleet: Redis answers again after {} s; quotas count across the fleet again",
                        since.elapsed().as_secs()
                    );
                }
                self.stats.up.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                if down.is_none() {
                    warn!(
                        "fleet: Redis unreachable: {e}; quotas count this node's allocations only until it answers"
                    );
                    *down = Some((Instant::now(), e));
                }
                self.stats.up.store(false, Ordering::Relaxed);
            }
        }
    }
}

/// One worker's ledger.
struct FleetLedger {
    fleet: Arc<Fleet>,
    worker: usize,
}

impl Ledger for FleetLedger {
    fn acquire(&mut self, realm: &str, user: &str, limits: &Limits) -> Acquire {
        let f = &self.fleet;
        let shared = limits.user_quota > 0 || limits.total_quota > 0;
        let mut st = f.state();
        if !shared || !f.is_up() {
            return st.counts.take(realm, user, limits).into();
        }
        // Redis decides the quotas; the node still counts exactly (and
        // enforces bps-capacity, which is its own).
        let mut local = *limits;
        local.user_quota = if limits.user_quota > 0 { u32::MAX } else { 0 };
        local.total_quota = 0;
        let hold = st
            .holds
            .entry((realm.to_string(), user.to_string()))
            .or_default();
        if hold.granted.pop().is_some() {
            return match st.counts.take(realm, user, &local) {
                Ok(mut claim) => {
                    claim.fleet = true;
                    Acquire::Granted(claim)
                }
                Err(why) => {
                    let _ = f.requests.send(Request::Release {
                        realm: realm.into(),
                        user: Some(user.into()),
                    });
                    Acquire::Refused(why)
                }
            };
        }
        if let Some((at, why)) = hold.denied
            && at.elapsed() < DENIAL_MEMORY
        {
            return Acquire::Refused(why);
        }
        if !hold.waiting.contains(&self.worker) {
            hold.waiting.push(self.worker);
        }
        // One request in flight per user: Allocates arriving meanwhile
        // are asked for together by the next one, so many concurrent
        // Allocates of one user cost a few round trips, not one each.
        hold.demand += 1;
        if !hold.asking {
            hold.asking = true;
            let count = std::mem::take(&mut hold.demand);
            let sent = f.requests.send(Request::Reserve {
                realm: realm.into(),
                user: user.into(),
                limits: *limits,
                count,
            });
            if sent.is_err() {
                hold.asking = false;
                return st.counts.take(realm, user, limits).into();
            }
        }
        Acquire::Pending
    }

    fn release(&mut self, claim: &Claim) {
        self.fleet.state().counts.give_back(claim);
        if claim.fleet {
            let _ = self.fleet.requests.send(Request::Release {
                realm: claim.realm.to_string(),
                user: claim.user.as_deref().map(str::to_string),
            });
        }
    }

    fn restore(&mut self, claim: &Claim) {
        // Redis still counts a restored fleet claim: the predecessor
        // handed it over without releasing it there.
        self.fleet.state().counts.put_back(claim);
    }
}

/// The set of node names (members whose heartbeat is gone are removed by
/// whoever notices).
const NODES: &str = "turnserver/nodes";
/// Every this many heartbeats a node rewrites all its counts, not only
/// those that changed.
const FULL_REWRITE_EVERY: u64 = 10;

fn node_key(node: &str) -> String {
    format!("turnserver/node/{node}")
}

fn user_key(realm: &str, user: &str) -> String {
    format!("turnserver/quota/{realm}/user/{user}")
}

fn realm_key(realm: &str) -> String {
    format!("turnserver/quota/{realm}/total")
}

fn registry_key(node: &str) -> String {
    format!("turnserver/allocations/{node}")
}

/// Takes up to ARGV[4] slots for a user: KEYS[1] the user's hash, KEYS[2]
/// the realm's; ARGV node, user-quota, total-quota (0 = none), count,
/// prefetch. Counts of nodes whose heartbeat is gone are dropped. With
/// room to spare it takes up to `prefetch` more, never more than a quarter
/// of the room left. Returns the slots taken and, when fewer than asked,
/// which quota stopped it ("user", "total"; else "").
const RESERVE: &str = r#"
local function live(key)
  local sum = 0
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    if redis.call('EXISTS', 'turnserver/node/' .. fields[i]) == 1 then
      sum = sum + tonumber(fields[i + 1])
    else
      redis.call('HDEL', key, fields[i])
    end
  end
  return sum
end
local uq = tonumber(ARGV[2])
local tq = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local room = 2147483647
local why = ''
if uq > 0 then
  room = uq - live(KEYS[1])
  if room < want then why = 'user' end
end
if tq > 0 then
  local total = tq - live(KEYS[2])
  if total < room then
    room = total
    if room < want then why = 'total' end
  end
end
local n = math.min(want, room)
if n <= 0 then return {0, why} end
if n == want then
  n = n + math.min(tonumber(ARGV[5]), math.floor((room - n) / 4))
end
redis.call('HINCRBY', KEYS[1], ARGV[1], n)
redis.call('HINCRBY', KEYS[2], ARGV[1], n)
return {n, why}
"#;

/// Gives a slot back: KEYS[1] the user's hash (or none), KEYS[2] the
/// realm's; ARGV node.
const RELEASE: &str = r#"
for i = 1, #KEYS do
  if KEYS[i] ~= '' and redis.call('HINCRBY', KEYS[i], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return 1
"#;

/// What the task tells the workers.
pub enum Tell {
    /// What worker `worker` waited for is decided.
    Ready(usize, Wanted),
    /// Send new Allocates there (or stop).
    Redirect(Option<spread::Target>),
    /// End `user`'s allocations (in `realm`, or every realm).
    EndUser(Option<String>, String),
}

/// Lets every Allocate held for a quota slot go on: clears each hold's
/// pending ask and tells its worker that what it wanted is ready.
fn release_holds(fleet: &Fleet, tell: &(dyn Fn(Tell) + Send + Sync)) {
    let waiting: Vec<(usize, Wanted)> = {
        let mut st = fleet.state();
        st.holds
            .iter_mut()
            .flat_map(|((r, u), h)| {
                h.asking = false;
                h.demand = 0;
                let wanted = Wanted::Quota {
                    realm: r.as_str().into(),
                    user: u.as_str().into(),
                };
                std::mem::take(&mut h.waiting)
                    .into_iter()
                    .map(move |w| (w, wanted.clone()))
            })
            .collect()
    };
    for (w, wanted) in waiting {
        tell(Tell::Ready(w, wanted));
    }
}

/// The fleet task: talks to Redis for the ledger, keeps the heartbeat,
/// counts, registry and redirect current, and follows the events.
pub async fn run(
    fleet: Arc<Fleet>,
    shared: Arc<Shared>,
    inbox: Inbox,
    cache: Option<Arc<Cache>>,
    tell: Box<dyn Fn(Tell) + Send + Sync>,
) {
    let tell: Arc<dyn Fn(Tell) + Send + Sync> = Arc::from(tell);
    let e = &fleet.config.redis;
    let url = crate::userdb::store::redis_url(e);
    let client = match url.and_then(|u| redis::Client::open(u.as_str()).map_err(Into::into)) {
        Ok(c) => c,
        Err(err) => {
            warn!("fleet: {err}; quotas count this node's allocations only");
            fleet.mark(Err(err.to_string()));
            return;
        }
    };
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(e.connect_timeout))
        .set_response_timeout(Some(e.connect_timeout))
        .set_number_of_retries(0);
    let conn = match redis::aio::ConnectionManager::new_lazy_with_config(client.clone(), config) {
        Ok(c) => c,
        Err(err) => {
            fleet.mark(Err(err.to_string()));
            return;
        }
    };
    tokio::spawn(follow_events(
        client,
        fleet.clone(),
        conn.clone(),
        cache,
        tell.clone(),
    ));
    let Inbox {
        mut requests,
        statuses,
    } = inbox;
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut spreader = spread::Controller::new();
    let mut target: Option<spread::Target> = None;
    let mut written: BTreeMap<String, u32> = BTreeMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<((String, String), Reserved)>();
    let reserve = Arc::new(redis::Script::new(RESERVE));
    let release = Arc::new(redis::Script::new(RELEASE));
    tokio::spawn(write_registry(fleet.clone(), conn.clone(), statuses));
    loop {
        tokio::select! {
            Some(req) = requests.recv() => match req {
                Request::Reserve { realm, user, limits, count } => {
                    let mut c = conn.clone();
                    let node = fleet.config.node.clone();
                    let done = done_tx.clone();
                    let script = reserve.clone();
                    tokio::spawn(async move {
                        let result = script
                            .key(user_key(&realm, &user))
                            .key(realm_key(&realm))
                            .arg(&node)
                            .arg(limits.user_quota)
                            .arg(limits.total_quota)
                            .arg(count)
                            .arg(PREFETCH)
                            .invoke_async::<(u32, String)>(&mut c)
                            .await
                            .map(|(granted, why)| Reserved {
                                asked: count,
                                granted,
                                why: match why.as_str() {
                                    "user" => Some(Refused::UserQuota),
                                    "total" => Some(Refused::TotalQuota),
                                    _ => None,
                                },
                                error: None,
                            })
                            .unwrap_or_else(|e| Reserved {
                                asked: count,
                                granted: 0,
                                why: None,
                                error: Some(e.to_string()),
                            });
                        let _ = done.send(((realm, user), result));
                    });
                }
                Request::Release { realm, user } => {
                    if fleet.is_up() {
                        let mut c = conn.clone();
                        let node = fleet.config.node.clone();
                        let script = release.clone();
                        tokio::spawn(async move {
                            let user = user.map(|u| user_key(&realm, &u)).unwrap_or_default();
                            let _ = script
                                .key(user)
                                .key(realm_key(&realm))
                                .arg(&node)
                                .invoke_async::<i64>(&mut c)
                                .await;
                        });
                    }
                }
            },
            Some((key, result)) = done_rx.recv() => {
                let waiting = {
                    let mut st = fleet.state();
                    let hold = st.holds.entry(key.clone()).or_default();
                    hold.asking = false;
                    // The waiting Allocates are tried again: those that
                    // find no slot ask anew.
                    hold.demand = 0;
                    let now = Instant::now();
                    hold.granted.extend((0..result.granted).map(|_| now));
                    fleet.stats.granted.fetch_add(u64::from(result.granted), Ordering::Relaxed);
                    if let Some(why) = result.why && result.granted < result.asked {
                        hold.denied = Some((now, why));
                        fleet
                            .stats
                            .refused
                            .fetch_add(u64::from(result.asked - result.granted), Ordering::Relaxed);
                    }
                    std::mem::take(&mut hold.waiting)
                };
                if let Some(e) = result.error {
                    fleet.mark(Err(e));
                }
                let wanted = Wanted::Quota { realm: key.0.as_str().into(), user: key.1.as_str().into() };
                for w in waiting {
                    tell(Tell::Ready(w, wanted.clone()));
                }
            }
            _ = tick.tick() => {
                // Every count again now and then, and first thing after an
                // outage (Redis may have lost them); else what changed.
                let beat = fleet.beats.load(Ordering::Relaxed);
                let full = !fleet.is_up() || beat.is_multiple_of(FULL_REWRITE_EVERY);
                let result = heartbeat(&fleet, &shared, &conn, &mut written, full).await;
                let was_up = fleet.is_up();
                fleet.mark(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                if !was_up || !fleet.is_up() {
                    // Redis is back, or down: whatever was held waiting goes
                    // on (with local quotas while it is down).
                    release_holds(&fleet, &*tell);
                }
                let peers = match &result {
                    Ok(peers) => peers.clone(),
                    Err(_) => Vec::new(),
                };
                let draining = shared.draining.load(Ordering::Relaxed);
                let decided = spreader.decide(
                    load_percent(&fleet, &shared),
                    fleet.config.redirect_above,
                    draining,
                    &peers,
                );
                if decided != target {
                    match &decided {
                        Some(t) => info!("fleet: new allocations go to {} (this node is {})", t.address, if draining { "draining" } else { "busy" }),
                        None => info!("fleet: new allocations are served here again"),
                    }
                    target = decided;
                    tell(Tell::Redirect(target));
                }
            }
        }
    }
}

/// What Redis answered a [`Request::Reserve`].
struct Reserved {
    asked: u32,
    granted: u32,
    /// The quota that stopped it short of `asked`.
    why: Option<Refused>,
    /// Redis did not answer.
    error: Option<String>,
}

/// Writes allocation statuses into this node's registry, in order, in
/// pipelines of whatever is queued; skipped while Redis is down (the
/// registry then expires with the heartbeat, and is rewritten as statuses
/// come).
async fn write_registry(
    fleet: Arc<Fleet>,
    conn: redis::aio::ConnectionManager,
    mut statuses: mpsc::Receiver<Arc<AllocationStatus>>,
) {
    let key = registry_key(&fleet.config.node);
    let mut batch = Vec::new();
    while statuses.recv_many(&mut batch, 1024).await > 0 {
        if !fleet.is_up() {
            batch.clear();
            continue;
        }
        let mut pipe = redis::pipe();
        for status in batch.drain(..) {
            let field = format!("{:018}", status.report_id % 1_000_000_000_000_000_000);
            match status.change {
                StatusChange::Deleted => pipe.hdel(&key, &field).ignore(),
                _ => pipe.hset(&key, &field, registry_value(&status)).ignore(),
            };
        }
        let mut c = conn.clone();
        if let Err(e) = pipe.query_async::<()>(&mut c).await {
            debug!("fleet registry: {e}");
        }
    }
}

/// The registry's value of an allocation: realm, user, transport, client,
/// relayed address and the UNIX time it was reported, tab separated.
fn registry_value(s: &AllocationStatus) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "{}\t{}\t{}\t{}\t{}\t{now}",
        s.realm, s.username, s.five_tuple.transport, s.five_tuple.client, s.relayed
    )
}

/// The node's load, percent of its capacity: relay ports in use, or
/// allocations of `total-quota` when one is set, whichever is higher.
fn load_percent(fleet: &Fleet, shared: &Shared) -> f64 {
    let ports = shared.pool.in_use() as f64 * 100.0 / shared.pool.capacity().max(1) as f64;
    let total = shared.core.limits.total_quota;
    let quota = if total > 0 {
        f64::from(fleet.allocations()) * 100.0 / f64::from(total)
    } else {
        0.0
    };
    ports.max(quota)
}

/// Slots granted for (realm, user) that no Allocate claimed: how many.
type Unclaimed = (String, String, usize);

/// Rewrites the heartbeat and this node's counts, gives back slots no
/// Allocate claimed, and reads the other nodes' heartbeats.
async fn heartbeat(
    fleet: &Fleet,
    shared: &Shared,
    conn: &redis::aio::ConnectionManager,
    written: &mut BTreeMap<String, u32>,
    full: bool,
) -> redis::RedisResult<Vec<spread::Peer>> {
    let cfg = &fleet.config;
    let mut c = conn.clone();
    let lease = LEASE.as_millis() as u64;
    let me = serde_json::json!({
        "address": cfg.address.to_string(),
        "tls_address": cfg.tls_address.map(|a| a.to_string()),
        "load": load_percent(fleet, shared),
        "allocations": fleet.allocations(),
        "draining": shared.draining.load(Ordering::Relaxed),
        "instance": fleet.instance,
    });
    let before: Option<String> = redis::cmd("SET")
        .arg(node_key(&cfg.node))
        .arg(me.to_string())
        .arg("PX")
        .arg(lease)
        .arg("GET")
        .query_async(&mut c)
        .await?;
    // Another process wrote this name's heartbeat since our last one (not
    // our own previous run: only after our first beat).
    let theirs = before
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|j| j["instance"].as_u64())
        .filter(|i| *i != fleet.instance);
    if fleet.beats.fetch_add(1, Ordering::Relaxed) > 0
        && theirs.is_some()
        && !fleet.clash_logged.swap(true, Ordering::Relaxed)
    {
        warn!(
            "fleet: another node also calls itself '{}': quota counts and the registry are wrong until each node has its own node-name",
            cfg.node
        );
    }
    // The exact counts, and slots nobody claimed.
    let (counts, stale): (BTreeMap<String, u32>, Vec<Unclaimed>) = {
        let mut st = fleet.state();
        let mut counts = BTreeMap::new();
        for (realm, n) in st.counts.realms() {
            counts.insert(realm_key(realm), n);
        }
        for (realm, user, n) in st.counts.users() {
            counts.insert(user_key(realm, user), n);
        }
        let mut stale = Vec::new();
        st.holds.retain(|(realm, user), h| {
            let before = h.granted.len();
            h.granted.retain(|t| t.elapsed() < UNCLAIMED);
            let gone = before - h.granted.len();
            if gone > 0 {
                stale.push((realm.clone(), user.clone(), gone));
            }
            // Slots granted and about to be claimed still count.
            let held = h.granted.len() as u32;
            if held > 0 {
                *counts.entry(realm_key(realm)).or_insert(0) += held;
                *counts.entry(user_key(realm, user)).or_insert(0) += held;
            }
            !h.granted.is_empty()
                || !h.waiting.is_empty()
                || h.asking
                || h.denied.is_some_and(|(t, _)| t.elapsed() < DENIAL_MEMORY)
        });
        (counts, stale)
    };
    let mut pipe = redis::pipe();
    for (key, n) in &counts {
        if full || written.get(key) != Some(n) {
            pipe.hset(key, &cfg.node, *n).ignore();
        }
    }
    for key in written.keys().filter(|k| !counts.contains_key(*k)) {
        pipe.hdel(key, &cfg.node).ignore();
    }
    pipe.pexpire(registry_key(&cfg.node), lease as i64 * 2)
        .ignore();
    pipe.sadd(NODES, &cfg.node).ignore();
    let () = pipe.query_async(&mut c).await?;
    // Slots granted but never claimed were not in the counts above: the
    // rewrite already gave them back.
    if !stale.is_empty() {
        debug!("fleet: {} unclaimed quota slots given back", stale.len());
    }
    *written = counts;
    // The peers: the members of the node set whose heartbeat lives (the
    // others are dropped from it).
    let names: Vec<String> = c.smembers(NODES).await?;
    let others: Vec<&String> = names.iter().filter(|n| **n != cfg.node).collect();
    let mut peers = Vec::new();
    if !others.is_empty() {
        let keys: Vec<String> = others.iter().map(|n| node_key(n)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
        let gone: Vec<&&String> = others
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n)
            .collect();
        if !gone.is_empty() {
            let () = c.srem(NODES, gone).await?;
        }
        for v in values.into_iter().flatten() {
            let Ok(j) = serde_json::from_str::<serde_json::Value>(&v) else {
                continue;
            };
            let addr = |k: &str| j[k].as_str().and_then(|a| a.parse().ok());
            if let Some(address) = addr("address") {
                peers.push(spread::Peer {
                    address,
                    tls_address: addr("tls_address"),
                    load: j["load"].as_f64().unwrap_or(100.0),
                    draining: j["draining"].as_bool().unwrap_or(true),
                });
            }
        }
    }
    Ok(peers)
}

/// Follows `turnserver/events` and, when Redis allows turning them on,
/// keyspace notifications of `turn/*` keys; reconnects with backoff.
async fn follow_events(
    client: redis::Client,
    fleet: Arc<Fleet>,
    conn: redis::aio::ConnectionManager,
    cache: Option<Arc<Cache>>,
    tell: Arc<dyn Fn(Tell) + Send + Sync>,
) {
    let db = fleet.config.redis.database.clone();
    let mut backoff = Duration::from_millis(500);
    let mut warned = false;
    loop {
        let mut pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                debug!("fleet events: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(500);
        // Keyspace notifications for deletions made by other tools.
        let mut c = conn.clone();
        let keyspace = enable_keyspace_events(&mut c).await;
        if let Err(e) = &keyspace
            && !warned
        {
            warned = true;
            warn!(
                "fleet: cannot turn Redis keyspace notifications on ({e}); users deleted by other tools than ours are refused within userdb-cache-seconds"
            );
        }
        if pubsub.subscribe(EVENTS).await.is_err()
            || (keyspace.is_ok()
                && pubsub
                    .psubscribe(format!("__keyspace@{db}__:turn/*"))
                    .await
                    .is_err())
        {
            continue;
        }
        // Whatever happened while not listening.
        if let Some(cache) = &cache {
            cache.forget_all();
        }
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            let channel = msg.get_channel_name().to_string();
            let payload: String = msg.get_payload().unwrap_or_default();
            if channel == EVENTS {
                let words: Vec<&str> = payload.split('\t').collect();
                match words[..] {
                    ["user", realm, name] => {
                        if let Some(c) = &cache {
                            c.forget_user(realm, name);
                        }
                    }
                    ["tables"] => {
                        if let Some(c) = &cache {
                            c.forget_tables();
                        }
                    }
                    ["end-user", realm, name] => {
                        let realm = (realm != "*").then(|| realm.to_string());
                        tell(Tell::EndUser(realm, name.to_string()));
                    }
                    _ => debug!("fleet: unknown event {payload:?}"),
                }
            } else if let Some(key) = channel.split_once("__:").map(|(_, k)| k) {
                let parts: Vec<&str> = key.split('/').collect();
                if let Some(c) = &cache {
                    match parts[..] {
                        // The status feed (ours or coturn's redis-statsdb
                        // on the same database) says nothing of users.
                        ["turn", "realm", _, "user", _, "allocation", ..] => {}
                        ["turn", "realm", realm, "user", name, ..] => c.forget_user(realm, name),
                        _ => c.forget_tables(),
                    }
                }
            }
        }
        debug!("fleet events: connection lost; reconnecting");
    }
}

/// Turns on the keyspace notifications the cache follows (keyspace events
/// for generic, string and set commands), keeping whatever else is on.
async fn enable_keyspace_events(c: &mut redis::aio::ConnectionManager) -> redis::RedisResult<()> {
    let current: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(c)
        .await?;
    let mut flags: String = current.get(1).cloned().unwrap_or_default();
    for f in ['K', 'g', '$', 's'] {
        let covered = flags.contains(f) || (f != 'K' && flags.contains('A'));
        if !covered {
            flags.push(f);
        }
    }
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg(flags)
        .query_async(c)
        .await
}

/// A live allocation in the fleet's registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub node: String,
    pub realm: String,
    pub user: String,
    /// `udp`, `tcp` or `tls`, as the registry spells it.
    pub transport: String,
    pub client: String,
    pub relayed: String,
    /// UNIX time (seconds) of the allocation's last report.
    pub reported: u64,
}

/// A node whose heartbeat is alive.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    /// Its heartbeat, as JSON (address, tls_address, load, allocations,
    /// draining).
    pub heartbeat: serde_json::Value,
}

/// The fleet's live nodes and their allocations, read from the Redis at
/// `c` (for `turnadmin --list-allocations`). Registries of nodes whose
/// heartbeat is gone are left out.
pub async fn list(
    c: &mut redis::aio::ConnectionManager,
) -> redis::RedisResult<(Vec<Node>, Vec<Listed>)> {
    let mut names: Vec<String> = c.smembers(NODES).await?;
    names.sort();
    let mut nodes = Vec::new();
    let mut listed = Vec::new();
    for name in &names {
        let Some(beat): Option<String> = c.get(node_key(name)).await? else {
            continue;
        };
        let heartbeat = serde_json::from_str(&beat).unwrap_or(serde_json::Value::Null);
        nodes.push(Node {
            name: name.to_string(),
            heartbeat,
        });
        let registry: BTreeMap<String, String> = c.hgetall(registry_key(name)).await?;
        for value in registry.values() {
            let w: Vec<&str> = value.split('\t').collect();
            if let [realm, user, transport, client, relayed, reported] = w[..] {
                listed.push(Listed {
                    node: name.to_string(),
                    realm: realm.to_string(),
                    user: user.to_string(),
                    transport: transport.to_string(),
                    client: client.to_string(),
                    relayed: relayed.to_string(),
                    reported: reported.parse().unwrap_or(0),
                });
            }
        }
    }
    listed.sort_by(|a, b| (&a.realm, &a.user, &a.node).cmp(&(&b.realm, &b.user, &b.node)));
    Ok((nodes, listed))
}

/// Asks every node to end `user`'s allocations (in `realm`, or in every
/// realm): returns how many nodes heard it.
pub async fn end_user(
    c: &mut redis::aio::ConnectionManager,
    realm: Option<&str>,
    user: &str,
) -> redis::RedisResult<u64> {
    c.publish(
        EVENTS,
        format!("end-user\t{}\t{user}", realm.unwrap_or("*")),
    )
    .await
}

/// Tells every node to drop what it caches of `user` (after a change to
/// it), or with `None` what it caches of secrets, origins, realm options
/// and peer lists.
pub async fn invalidate(
    c: &mut redis::aio::ConnectionManager,
    user: Option<(&str, &str)>,
) -> redis::RedisResult<u64> {
    let event = match user {
        Some((realm, name)) => format!("user\t{realm}\t{name}"),
        None => "tables".to_string(),
    };
    c.publish(EVENTS, event).await
}
