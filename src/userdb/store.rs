//! Reading and writing coturn's user databases, with coturn's schemas
//! unchanged: the SQL tables (`turnusers_lt`, `turn_secret`,
//! `allowed_peer_ip`, `denied_peer_ip`, `turn_origin_to_realm`,
//! `turn_realm_option`, …) in SQLite, PostgreSQL or MySQL/MariaDB through
//! sqlx, and the Redis keys (`turn/realm/<realm>/user/<name>/key`, …)
//! through redis-rs. Every value reaches SQL as a bound parameter.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::AsyncCommands;
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use super::conn::{Endpoint, UserDb};
use crate::auth::{Key, long_term_key};

/// What went wrong talking to the database.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error(e.to_string())
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error(e.to_string())
    }
}

type Result<T> = std::result::Result<T, Error>;

/// coturn's SQL schema (its `schema.sql`): the tables the server reads and
/// `turnadmin` writes, created when missing.
pub const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS turnusers_lt (realm varchar(127) default '', name varchar(512), hmackey char(128), PRIMARY KEY (realm, name))",
    "CREATE TABLE IF NOT EXISTS turn_secret (realm varchar(127) default '', value varchar(256), primary key (realm, value))",
    "CREATE TABLE IF NOT EXISTS allowed_peer_ip (realm varchar(127) default '', ip_range varchar(256), primary key (realm, ip_range))",
    "CREATE TABLE IF NOT EXISTS denied_peer_ip (realm varchar(127) default '', ip_range varchar(256), primary key (realm, ip_range))",
    "CREATE TABLE IF NOT EXISTS turn_origin_to_realm (origin varchar(127), realm varchar(127), primary key (origin))",
    "CREATE TABLE IF NOT EXISTS turn_realm_option (realm varchar(127) default '', opt varchar(32), value varchar(128), primary key (realm, opt))",
    "CREATE TABLE IF NOT EXISTS oauth_key (kid varchar(128), ikm_key varchar(256), timestamp bigint default 0, lifetime integer default 0, as_rs_alg varchar(64) default '', realm varchar(127), primary key (kid))",
    "CREATE TABLE IF NOT EXISTS admin_user (name varchar(32), realm varchar(127), password varchar(127), primary key (name))",
];

/// The per-realm options a database may set (`turn_realm_option.opt`).
pub const REALM_OPTIONS: [&str; 3] = ["max-bps", "total-quota", "user-quota"];

/// Everything but users that the server reads as a whole, periodically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// REST secrets by realm.
    pub secrets: BTreeMap<String, Vec<String>>,
    /// ORIGIN → realm.
    pub origins: BTreeMap<String, String>,
    /// (realm, option) → value, for [`REALM_OPTIONS`].
    pub realm_options: BTreeMap<(String, String), String>,
    /// Peer ranges by realm.
    pub allowed_peers: BTreeMap<String, Vec<String>>,
    pub denied_peers: BTreeMap<String, Vec<String>>,
}

/// An open user database.
pub enum Store {
    /// SQLite, PostgreSQL or MySQL/MariaDB.
    Sql {
        pool: AnyPool,
        /// PostgreSQL numbers its placeholders (`$1`); the others take `?`.
        numbered: bool,
    },
    Redis(redis::aio::ConnectionManager),
}

/// A statement in both placeholder styles.
struct Sql {
    numbered: &'static str,
    plain: &'static str,
}

macro_rules! sql {
    ($numbered:literal, $plain:literal) => {
        Sql {
            numbered: $numbered,
            plain: $plain,
        }
    };
}

/// A key from its hex form (`hmackey`): 32 hex digits, MD5.
pub fn parse_hex_key(hex: &str) -> Option<Key> {
    let hex = hex.trim();
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// The hex form of a key, as `hmackey` holds it.
pub fn hex_key(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A URL for sqlx with the user and password percent-encoded.
fn sql_url(scheme: &str, e: &Endpoint) -> Result<String> {
    if let Some(u) = &e.uri {
        return Ok(u.clone());
    }
    let mut url =
        url::Url::parse(&format!("{scheme}://localhost/")).map_err(|e| Error(e.to_string()))?;
    let bad = |_| Error(format!("'{}' is not a host name or address", e.host));
    url.set_host(Some(&e.host)).map_err(bad)?;
    url.set_port(e.port).map_err(|_| Error("bad port".into()))?;
    url.set_path(&e.database);
    if let Some(u) = &e.user {
        url.set_username(u).map_err(|_| Error("bad user".into()))?;
    }
    if let Some(p) = &e.password {
        url.set_password(Some(p))
            .map_err(|_| Error("bad password".into()))?;
    }
    Ok(url.to_string())
}

/// The `redis://` URL of a Redis endpoint, password encoded.
pub fn redis_url(e: &Endpoint) -> Result<url::Url> {
    let mut url = url::Url::parse("redis://localhost/").expect("a valid URL");
    let bad = |_| Error(format!("'{}' is not a host name or address", e.host));
    url.set_host(Some(&e.host)).map_err(bad)?;
    url.set_port(Some(e.port.unwrap_or(6379)))
        .map_err(|_| Error("bad port".into()))?;
    url.set_path(&e.database);
    if let Some(p) = &e.password {
        url.set_password(Some(p))
            .map_err(|_| Error("bad password".into()))?;
    }
    Ok(url)
}

impl Store {
    /// Opens `db`. An SQLite file is created with coturn's schema when
    /// missing (`create`), or must exist; the SQL servers are connected to
    /// lazily (an unreachable server is an error at the first query, not
    /// here) unless `eager`. Errors: an unusable file or connection string,
    /// or (eager) an unreachable server.
    pub async fn open(db: &UserDb, create: bool, eager: bool) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let pool = |timeout: Duration| {
            AnyPoolOptions::new()
                .max_connections(4)
                .min_connections(0)
                .acquire_timeout(timeout)
        };
        match db {
            UserDb::Sqlite(path) => {
                if !create && !path.exists() {
                    return Err(Error(format!("{} does not exist", path.display())));
                }
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && create
                    && !dir.exists()
                {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| Error(format!("cannot create {}: {e}", dir.display())))?;
                }
                let mut url = url::Url::parse("sqlite://localhost/").expect("a valid URL");
                let abs = std::path::absolute(path)
                    .map_err(|e| Error(format!("{}: {e}", path.display())))?;
                url.set_path(&abs.to_string_lossy());
                url.set_query(Some(if create { "mode=rwc" } else { "mode=rw" }));
                let url = url.as_str().replacen("sqlite://localhost", "sqlite://", 1);
                let pool = pool(Duration::from_secs(5))
                    .connect(&url)
                    .await
                    .map_err(|e| Error(format!("{}: {e}", path.display())))?;
                let store = Store::Sql {
                    pool,
                    numbered: false,
                };
                if create {
                    store.create_schema().await?;
                } else {
                    // Readable, and a coturn database.
                    store.user_count().await?;
                }
                Ok(store)
            }
            UserDb::Postgres(e) | UserDb::MySql(e) => {
                let pg = matches!(db, UserDb::Postgres(_));
                let url = sql_url(if pg { "postgres" } else { "mysql" }, e)?;
                if eager {
                    // One connection first, for the real error (the pool
                    // would only say that it timed out).
                    use sqlx::Connection;
                    match tokio::time::timeout(
                        e.connect_timeout,
                        sqlx::AnyConnection::connect(&url),
                    )
                    .await
                    {
                        Ok(Ok(c)) => c.close().await?,
                        Ok(Err(err)) => return Err(err.into()),
                        Err(_) => {
                            return Err(Error(format!(
                                "no connection within {} s",
                                e.connect_timeout.as_secs()
                            )));
                        }
                    }
                }
                let pool = pool(e.connect_timeout).connect_lazy(&url)?;
                Ok(Store::Sql { pool, numbered: pg })
            }
            UserDb::Redis(e) => {
                let client = redis::Client::open(redis_url(e)?.as_str())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(e.connect_timeout))
                    .set_response_timeout(Some(e.connect_timeout))
                    .set_number_of_retries(1);
                let manager = if eager {
                    redis::aio::ConnectionManager::new_with_config(client, config).await?
                } else {
                    redis::aio::ConnectionManager::new_lazy_with_config(client, config)?
                };
                Ok(Store::Redis(manager))
            }
        }
    }

    /// Creates coturn's tables where missing (SQL databases).
    pub async fn create_schema(&self) -> Result<()> {
        if let Store::Sql { pool, .. } = self {
            for statement in SCHEMA {
                sqlx::query(*statement).execute(pool).await?;
            }
        }
        Ok(())
    }

    fn pick(&self, q: &Sql) -> &'static str {
        match self {
            Store::Sql { numbered: true, .. } => q.numbered,
            _ => q.plain,
        }
    }

    async fn user_count(&self) -> Result<i64> {
        let Store::Sql { pool, .. } = self else {
            return Ok(0);
        };
        let row = sqlx::query("SELECT COUNT(*) FROM turnusers_lt")
            .fetch_one(pool)
            .await?;
        Ok(row.try_get::<i64, _>(0)?)
    }

    /// The long-term key of `user` in `realm`; `None` when there is no such
    /// user (or its key is unreadable).
    pub async fn user_key(&self, realm: &str, user: &str) -> Result<Option<Key>> {
        match self {
            Store::Sql { pool, .. } => {
                // PostgreSQL's char(n) is not a text type to sqlx's Any.
                let q = sql!(
                    "SELECT CAST(hmackey AS TEXT) FROM turnusers_lt WHERE realm = $1 AND name = $2",
                    "SELECT hmackey FROM turnusers_lt WHERE realm = ? AND name = ?"
                );
                let row = sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(user)
                    .fetch_optional(pool)
                    .await?;
                Ok(row
                    .map(|r| r.try_get::<String, _>(0))
                    .transpose()?
                    .and_then(|h: String| parse_hex_key(&h)))
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let base = format!("turn/realm/{realm}/user/{user}");
                let hex: Option<String> = c.get(format!("{base}/key")).await?;
                if let Some(k) = hex.as_deref().and_then(parse_hex_key) {
                    return Ok(Some(k));
                }
                // coturn also accepts a clear password.
                let password: Option<String> = c.get(format!("{base}/password")).await?;
                Ok(password.map(|p| long_term_key(user, realm, &p)))
            }
        }
    }

    /// Secrets, origins, realm options and peer lists, all realms.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut s = Snapshot::default();
        match self {
            Store::Sql { pool, .. } => {
                let pairs = |q: &'static str| async move {
                    let rows = sqlx::query(q).fetch_all(pool).await?;
                    rows.iter()
                        .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
                        .collect::<Result<Vec<(String, String)>>>()
                };
                for (realm, v) in pairs("SELECT realm, value FROM turn_secret").await? {
                    s.secrets.entry(realm).or_default().push(v);
                }
                s.origins = pairs("SELECT origin, realm FROM turn_origin_to_realm")
                    .await?
                    .into_iter()
                    .collect();
                for (realm, r) in pairs("SELECT realm, ip_range FROM allowed_peer_ip").await? {
                    s.allowed_peers.entry(realm).or_default().push(r);
                }
                for (realm, r) in pairs("SELECT realm, ip_range FROM denied_peer_ip").await? {
                    s.denied_peers.entry(realm).or_default().push(r);
                }
                let rows = sqlx::query("SELECT realm, opt, value FROM turn_realm_option")
                    .fetch_all(pool)
                    .await?;
                for r in rows {
                    s.realm_options.insert(
                        (r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?),
                        r.try_get::<String, _>(2)?,
                    );
                }
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let keys = scan(&mut c, "turn/*").await?;
                for key in keys {
                    let parts: Vec<&str> = key.split('/').collect();
                    match parts[..] {
                        ["turn", "realm", realm, "secret"] => {
                            let v: Vec<String> = c.smembers(&key).await?;
                            s.secrets.entry(realm.into()).or_default().extend(v);
                        }
                        ["turn", "realm", realm, "allowed-peer-ip"] => {
                            let v: Vec<String> = c.smembers(&key).await?;
                            s.allowed_peers.entry(realm.into()).or_default().extend(v);
                        }
                        ["turn", "realm", realm, "denied-peer-ip"] => {
                            let v: Vec<String> = c.smembers(&key).await?;
                            s.denied_peers.entry(realm.into()).or_default().extend(v);
                        }
                        ["turn", "realm", realm, opt] if REALM_OPTIONS.contains(&opt) => {
                            let v: Option<String> = c.get(&key).await?;
                            if let Some(v) = v {
                                s.realm_options.insert((realm.into(), opt.into()), v);
                            }
                        }
                        ["turn", "origin", ..] => {
                            let origin = &key["turn/origin/".len()..];
                            let v: Option<String> = c.get(&key).await?;
                            if let Some(v) = v {
                                s.origins.insert(origin.into(), v);
                            }
                        }
                        _ => {}
                    }
                }
                for v in s.secrets.values_mut() {
                    v.sort();
                }
            }
        }
        Ok(s)
    }

    // What turnadmin does.

    /// The Redis connection of a Redis store (for the fleet's commands).
    pub fn redis(&self) -> Option<redis::aio::ConnectionManager> {
        match self {
            Store::Redis(r) => Some(r.clone()),
            Store::Sql { .. } => None,
        }
    }

    /// Adds or updates a user.
    pub async fn set_user(&self, realm: &str, user: &str, key: &Key) -> Result<()> {
        let hex = hex_key(key);
        match self {
            Store::Sql { pool, .. } => {
                self.delete_user(realm, user).await?;
                let q = sql!(
                    "INSERT INTO turnusers_lt (realm, name, hmackey) VALUES ($1, $2, $3)",
                    "INSERT INTO turnusers_lt (realm, name, hmackey) VALUES (?, ?, ?)"
                );
                sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(user)
                    .bind(hex)
                    .execute(pool)
                    .await?;
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let () = c
                    .set(format!("turn/realm/{realm}/user/{user}/key"), hex)
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes a user.
    pub async fn delete_user(&self, realm: &str, user: &str) -> Result<()> {
        match self {
            Store::Sql { pool, .. } => {
                let q = sql!(
                    "DELETE FROM turnusers_lt WHERE realm = $1 AND name = $2",
                    "DELETE FROM turnusers_lt WHERE realm = ? AND name = ?"
                );
                sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(user)
                    .execute(pool)
                    .await?;
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let base = format!("turn/realm/{realm}/user/{user}");
                let () = c
                    .del(&[format!("{base}/key"), format!("{base}/password")])
                    .await?;
            }
        }
        Ok(())
    }

    /// Users as (realm, name), of `realm` or all.
    pub async fn users(&self, realm: Option<&str>) -> Result<Vec<(String, String)>> {
        let mut out = match self {
            Store::Sql { pool, .. } => {
                let rows = sqlx::query("SELECT realm, name FROM turnusers_lt")
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<String, _>(1)?)))
                    .collect::<Result<Vec<_>>>()?
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let keys = scan(&mut c, "turn/realm/*/user/*").await?;
                let mut v: Vec<(String, String)> = keys
                    .iter()
                    .filter_map(|k| {
                        let p: Vec<&str> = k.split('/').collect();
                        match p[..] {
                            ["turn", "realm", realm, "user", name, "key" | "password"] => {
                                Some((realm.to_string(), name.to_string()))
                            }
                            _ => None,
                        }
                    })
                    .collect();
                v.sort();
                v.dedup();
                v
            }
        };
        out.retain(|(r, _)| realm.is_none_or(|want| want == r));
        Ok(out)
    }

    /// Adds a REST secret to `realm`.
    pub async fn add_secret(&self, realm: &str, secret: &str) -> Result<()> {
        match self {
            Store::Sql { pool, .. } => {
                self.delete_secret(realm, Some(secret)).await?;
                let q = sql!(
                    "INSERT INTO turn_secret (realm, value) VALUES ($1, $2)",
                    "INSERT INTO turn_secret (realm, value) VALUES (?, ?)"
                );
                sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(secret)
                    .execute(pool)
                    .await?;
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let () = c.sadd(format!("turn/realm/{realm}/secret"), secret).await?;
            }
        }
        Ok(())
    }

    /// Deletes one REST secret of `realm`, or all of them (`None`).
    pub async fn delete_secret(&self, realm: &str, secret: Option<&str>) -> Result<()> {
        match (self, secret) {
            (Store::Sql { pool, .. }, Some(v)) => {
                let q = sql!(
                    "DELETE FROM turn_secret WHERE realm = $1 AND value = $2",
                    "DELETE FROM turn_secret WHERE realm = ? AND value = ?"
                );
                sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(v)
                    .execute(pool)
                    .await?;
            }
            (Store::Sql { pool, .. }, None) => {
                let q = sql!(
                    "DELETE FROM turn_secret WHERE realm = $1",
                    "DELETE FROM turn_secret WHERE realm = ?"
                );
                sqlx::query(self.pick(&q)).bind(realm).execute(pool).await?;
            }
            (Store::Redis(r), Some(v)) => {
                let mut c = r.clone();
                let () = c.srem(format!("turn/realm/{realm}/secret"), v).await?;
            }
            (Store::Redis(r), None) => {
                let mut c = r.clone();
                let () = c.del(format!("turn/realm/{realm}/secret")).await?;
            }
        }
        Ok(())
    }

    /// Maps ORIGIN `origin` to `realm`.
    pub async fn add_origin(&self, origin: &str, realm: &str) -> Result<()> {
        match self {
            Store::Sql { pool, .. } => {
                self.delete_origin(origin).await?;
                let q = sql!(
                    "INSERT INTO turn_origin_to_realm (origin, realm) VALUES ($1, $2)",
                    "INSERT INTO turn_origin_to_realm (origin, realm) VALUES (?, ?)"
                );
                sqlx::query(self.pick(&q))
                    .bind(origin)
                    .bind(realm)
                    .execute(pool)
                    .await?;
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let () = c.set(format!("turn/origin/{origin}"), realm).await?;
            }
        }
        Ok(())
    }

    /// Removes the mapping of ORIGIN `origin`.
    pub async fn delete_origin(&self, origin: &str) -> Result<()> {
        match self {
            Store::Sql { pool, .. } => {
                let q = sql!(
                    "DELETE FROM turn_origin_to_realm WHERE origin = $1",
                    "DELETE FROM turn_origin_to_realm WHERE origin = ?"
                );
                sqlx::query(self.pick(&q))
                    .bind(origin)
                    .execute(pool)
                    .await?;
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let () = c.del(format!("turn/origin/{origin}")).await?;
            }
        }
        Ok(())
    }

    /// Sets realm option `opt` (one of [`REALM_OPTIONS`]) of `realm`; 0
    /// removes it.
    pub async fn set_realm_option(&self, realm: &str, opt: &str, value: u64) -> Result<()> {
        match self {
            Store::Sql { pool, .. } => {
                let q = sql!(
                    "DELETE FROM turn_realm_option WHERE realm = $1 AND opt = $2",
                    "DELETE FROM turn_realm_option WHERE realm = ? AND opt = ?"
                );
                sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(opt)
                    .execute(pool)
                    .await?;
                if value > 0 {
                    let q = sql!(
                        "INSERT INTO turn_realm_option (realm, opt, value) VALUES ($1, $2, $3)",
                        "INSERT INTO turn_realm_option (realm, opt, value) VALUES (?, ?, ?)"
                    );
                    sqlx::query(self.pick(&q))
                        .bind(realm)
                        .bind(opt)
                        .bind(value.to_string())
                        .execute(pool)
                        .await?;
                }
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let key = format!("turn/realm/{realm}/{opt}");
                if value > 0 {
                    let () = c.set(key, value.to_string()).await?;
                } else {
                    let () = c.del(key).await?;
                }
            }
        }
        Ok(())
    }

    /// Adds a peer range to a realm's allowed (`allowed`) or denied list.
    pub async fn add_peer_range(&self, realm: &str, range: &str, allowed: bool) -> Result<()> {
        match self {
            Store::Sql { pool, .. } => {
                let q = match allowed {
                    true => sql!(
                        "INSERT INTO allowed_peer_ip (realm, ip_range) VALUES ($1, $2)",
                        "INSERT INTO allowed_peer_ip (realm, ip_range) VALUES (?, ?)"
                    ),
                    false => sql!(
                        "INSERT INTO denied_peer_ip (realm, ip_range) VALUES ($1, $2)",
                        "INSERT INTO denied_peer_ip (realm, ip_range) VALUES (?, ?)"
                    ),
                };
                sqlx::query(self.pick(&q))
                    .bind(realm)
                    .bind(range)
                    .execute(pool)
                    .await?;
            }
            Store::Redis(r) => {
                let mut c = r.clone();
                let list = if allowed { "allowed" } else { "denied" };
                let () = c
                    .sadd(format!("turn/realm/{realm}/{list}-peer-ip"), range)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Every key matching `pattern`, once each, with SCAN (KEYS would block
/// a shared Redis for as long as it walks every key; SCAN may return a
/// key twice).
async fn scan(c: &mut redis::aio::ConnectionManager, pattern: &str) -> Result<Vec<String>> {
    let mut iter = c.scan_match::<_, String>(pattern).await?;
    let mut keys = Vec::new();
    while let Some(key) = iter.next_item().await {
        keys.push(key?);
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_in_hex() {
        let k = long_term_key("ninefingers", "north.gov", "youhavetoberealistic");
        assert_eq!(hex_key(&k), "bc807ee29df3c9ffa736523fb2c4e8ee");
        assert_eq!(parse_hex_key("BC807EE29DF3C9FFA736523FB2C4E8EE  "), Some(k));
        assert_eq!(parse_hex_key("bc80"), None);
        assert_eq!(parse_hex_key(&"zz".repeat(16)), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sqlite_round_trip_with_coturns_schema() {
        let dir = std::env::temp_dir().join(format!("turnserver-store-{}", std::process::id()));
        let path = dir.join("sub/turndb");
        let db = UserDb::Sqlite(path.clone());
        assert!(Store::open(&db, false, true).await.is_err(), "missing file");
        let s = Store::open(&db, true, true).await.unwrap();
        let key = long_term_key("alice", "r", "pw");
        s.set_user("r", "alice", &key).await.unwrap();
        s.set_user("r", "alice", &key).await.unwrap();
        assert_eq!(s.user_key("r", "alice").await.unwrap(), Some(key));
        assert_eq!(s.user_key("other", "alice").await.unwrap(), None);
        s.add_secret("r", "s1").await.unwrap();
        s.add_secret("r", "s2").await.unwrap();
        s.add_origin("https://x", "r").await.unwrap();
        s.set_realm_option("r", "user-quota", 3).await.unwrap();
        s.add_peer_range("r", "10.0.0.0/8", true).await.unwrap();
        let snap = s.snapshot().await.unwrap();
        assert_eq!(snap.secrets["r"], ["s1", "s2"]);
        assert_eq!(snap.origins["https://x"], "r");
        assert_eq!(snap.realm_options[&("r".into(), "user-quota".into())], "3");
        assert_eq!(snap.allowed_peers["r"], ["10.0.0.0/8"]);
        assert_eq!(s.users(None).await.unwrap(), [("r".into(), "alice".into())]);
        s.delete_user("r", "alice").await.unwrap();
        s.delete_secret("r", None).await.unwrap();
        assert_eq!(s.user_key("r", "alice").await.unwrap(), None);
        assert!(s.snapshot().await.unwrap().secrets.is_empty());
        // Reopened without create: it exists and has the schema.
        drop(s);
        Store::open(&db, false, true).await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
