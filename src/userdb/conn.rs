//! coturn's user-database connection strings, parsed into what the
//! database libraries take.
//!
//! - `userdb` (`-b`): an SQLite file path.
//! - `psql-userdb` / `sql-userdb` (`-e`): a libpq conninfo string (`host=…
//!   dbname=… user=… password=… port=… connect_timeout=…`) or a
//!   `postgresql://` URI.
//! - `mysql-userdb` (`-M`): `host=… dbname=… user=… password=… port=…
//!   connect_timeout=… read_timeout=…`.
//! - `redis-userdb` (`-N`): `ip=… dbname=… password=… port=…
//!   connect_timeout=…`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where coturn's Debian package keeps its SQLite database, and so where
/// `turnadmin` looks without `-b`/`-e`/`-M`/`-N`.
pub const DEFAULT_SQLITE: &str = "/var/lib/turn/turndb";

/// How long connecting may take unless the string says
/// (`connect_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A user database to use.
#[derive(Clone, PartialEq, Eq)]
pub enum UserDb {
    Sqlite(PathBuf),
    Postgres(Endpoint),
    MySql(Endpoint),
    Redis(Endpoint),
}

/// A database server: where, which database, who, and how long to wait.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: Option<u16>,
    /// The database name (Redis: the database number).
    pub database: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub connect_timeout: Duration,
    /// A `postgresql://` URI given as is.
    pub uri: Option<String>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password is a secret: never print it.
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for UserDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for UserDb {
    /// A description without the password, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let server = |f: &mut fmt::Formatter<'_>, kind: &str, e: &Endpoint| {
            let port = e.port.map(|p| format!(":{p}")).unwrap_or_default();
            write!(f, "{kind} {}{port}/{}", e.host, e.database)
        };
        match self {
            UserDb::Sqlite(p) => write!(f, "SQLite {}", p.display()),
            UserDb::Postgres(e) => server(f, "PostgreSQL", e),
            UserDb::MySql(e) => server(f, "MySQL", e),
            UserDb::Redis(e) => server(f, "Redis", e),
        }
    }
}

/// `key=value` pairs separated by spaces; a value may be quoted with
/// single quotes (libpq's conninfo syntax, which coturn's MySQL and Redis
/// strings follow too).
fn pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("'{key}' has no value (expected key=value)"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(format!("{key}: unterminated quote")),
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key.to_ascii_lowercase(), value));
    }
}

/// An endpoint from `key=value` pairs; `host_keys` name the host (`host`,
/// or `ip` for Redis).
fn endpoint(s: &str, host_keys: &[&str]) -> Result<Endpoint, String> {
    let mut e = Endpoint {
        connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        ..Endpoint::default()
    };
    for (k, v) in pairs(s)? {
        match k.as_str() {
            k if host_keys.contains(&k) => e.host = v,
            "hostaddr" => e.host = v,
            "port" => {
                e.port = Some(
                    v.parse()
                        .map_err(|_| format!("port '{v}' is not a port number"))?,
                )
            }
            "dbname" | "database" | "db" => e.database = v,
            "user" => e.user = Some(v),
            "password" => e.password = Some(v),
            "connect_timeout" => {
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("connect_timeout '{v}' is not a number of seconds"))?;
                e.connect_timeout = Duration::from_secs(secs.max(1));
            }
            // Accepted and left to the defaults: query timeouts, TLS
            // settings (no TLS to the database), libpq's other keys.
            "read_timeout" | "sslmode" | "ca" | "capath" | "cert" | "key" | "cipher"
            | "application_name" | "options" | "keepalives" => {}
            other => return Err(format!("unknown key '{other}'")),
        }
    }
    if e.host.is_empty() {
        e.host = "127.0.0.1".to_string();
    }
    Ok(e)
}

impl UserDb {
    /// `userdb`: an SQLite file. Error: an empty path.
    pub fn sqlite(s: &str) -> Result<UserDb, String> {
        let p = s.trim();
        if p.is_empty() {
            return Err("the path is empty".into());
        }
        Ok(UserDb::Sqlite(PathBuf::from(p)))
    }

    /// `psql-userdb`: a conninfo string or a `postgresql://` URI.
    pub fn postgres(s: &str) -> Result<UserDb, String> {
        let s = s.trim();
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(UserDb::Postgres(Endpoint {
                uri: Some(s.to_string()),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                ..Endpoint::default()
            }));
        }
        let e = endpoint(s, &["host"])?;
        if e.database.is_empty() {
            return Err("dbname is missing".into());
        }
        Ok(UserDb::Postgres(e))
    }

    /// `mysql-userdb`: coturn's `host=… dbname=… user=… password=…` form.
    pub fn mysql(s: &str) -> Result<UserDb, String> {
        let e = endpoint(s, &["host"])?;
        if e.database.is_empty() {
            return Err("dbname is missing".into());
        }
        Ok(UserDb::MySql(e))
    }

    /// `redis-userdb`: coturn's `ip=… dbname=… password=… port=…` form
    /// (`dbname` is the database number, 0 by default).
    pub fn redis(s: &str) -> Result<UserDb, String> {
        let mut e = endpoint(s, &["ip", "host"])?;
        if e.database.is_empty() {
            e.database = "0".into();
        }
        u32::from_str(&e.database)
            .map_err(|_| format!("dbname '{}' is not a Redis database number", e.database))?;
        Ok(UserDb::Redis(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coturn_connection_strings() {
        let pg = UserDb::postgres(
            "host=127.0.0.1 dbname=coturn user=turn password='s3 cr\\'t' port=5433 connect_timeout=30",
        )
        .unwrap();
        let UserDb::Postgres(e) = &pg else { panic!() };
        assert_eq!(e.host, "127.0.0.1");
        assert_eq!(e.port, Some(5433));
        assert_eq!(e.database, "coturn");
        assert_eq!(e.user.as_deref(), Some("turn"));
        assert_eq!(e.password.as_deref(), Some("s3 cr't"));
        assert_eq!(e.connect_timeout, Duration::from_secs(30));
        assert!(
            !format!("{pg:?} {pg}").contains("s3"),
            "no password in logs"
        );
        let uri = UserDb::postgres("postgresql://u:p@localhost/db").unwrap();
        assert!(matches!(
            uri,
            UserDb::Postgres(Endpoint { uri: Some(_), .. })
        ));
        let my = UserDb::mysql("host=localhost dbname=coturn user=turn password=turn port=3306 connect_timeout=10 read_timeout=10").unwrap();
        assert!(matches!(
            my,
            UserDb::MySql(Endpoint {
                port: Some(3306),
                ..
            })
        ));
        let r = UserDb::redis("ip=127.0.0.1 dbname=2 password=turn port=6379 connect_timeout=30")
            .unwrap();
        let UserDb::Redis(e) = r else { panic!() };
        assert_eq!((e.database.as_str(), e.port), ("2", Some(6379)));
        assert_eq!(
            UserDb::redis("ip=127.0.0.1").unwrap(),
            UserDb::Redis(Endpoint {
                host: "127.0.0.1".into(),
                database: "0".into(),
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                ..Endpoint::default()
            })
        );
    }

    #[test]
    fn bad_strings_say_what_is_wrong() {
        assert_eq!(UserDb::mysql("host=x").unwrap_err(), "dbname is missing");
        assert_eq!(
            UserDb::postgres("host=x dbname=y port=http").unwrap_err(),
            "port 'http' is not a port number"
        );
        assert_eq!(
            UserDb::redis("ip=x frobnicate=1").unwrap_err(),
            "unknown key 'frobnicate'"
        );
        assert_eq!(
            UserDb::redis("ip=x dbname=two").unwrap_err(),
            "dbname 'two' is not a Redis database number"
        );
        assert_eq!(
            UserDb::mysql("host").unwrap_err(),
            "'host' has no value (expected key=value)"
        );
        assert_eq!(UserDb::sqlite(" ").unwrap_err(), "the path is empty");
    }
}
