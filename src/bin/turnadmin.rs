//! `turnadmin`: manages the users, REST secrets, ORIGIN mappings and realm
//! options of a user database, with coturn's `turnadmin` flags and output,
//! on coturn's schemas (so either tool manages the same database).
//!
//! Unlike coturn's, it writes no log file: what it has to say goes to
//! standard output (listings) and standard error (errors, with a non-zero
//! exit).

use std::process::ExitCode;

use clap::{ArgAction, Parser};
use sha2::{Digest, Sha256};
use turnserver::auth::long_term_key;
use turnserver::server::fleet;
use turnserver::userdb::conn::DEFAULT_SQLITE;
use turnserver::userdb::store::{REALM_OPTIONS, hex_key};
use turnserver::userdb::{Store, UserDb};

#[derive(Parser, Debug)]
#[command(
    name = "turnadmin",
    version,
    disable_help_flag = true,
    about = "Manages the users, secrets, ORIGIN mappings and realm options of a turnserver (or coturn) user database"
)]
struct Args {
    // Commands.
    /// Print a long-term key: 0x followed by the MD5 of user:realm:password
    /// (for user=name:0x... in turnserver.conf)
    #[arg(short = 'k', long = "key", action = ArgAction::SetTrue)]
    key: bool,
    /// Add or update a user (-u, -r, -p)
    #[arg(short = 'a', long = "add", action = ArgAction::SetTrue)]
    add: bool,
    /// Delete a user (-u, -r)
    #[arg(short = 'd', long = "delete", action = ArgAction::SetTrue)]
    delete: bool,
    /// List the users as user[realm] (of -r, or all)
    #[arg(short = 'l', long = "list", action = ArgAction::SetTrue)]
    list: bool,
    /// Add a TURN REST API shared secret to the realm (-r)
    #[arg(short = 's', long = "set-secret", value_name = "SECRET")]
    set_secret: Option<String>,
    /// Show the shared secrets as secret[realm] (of -r, or all)
    #[arg(short = 'S', long = "show-secret", action = ArgAction::SetTrue)]
    show_secret: bool,
    /// Delete a shared secret of the realm (-r)
    #[arg(short = 'X', long = "delete-secret", value_name = "SECRET")]
    delete_secret: Option<String>,
    /// Delete every shared secret of the realm (-r)
    #[arg(long = "delete-all-secrets", action = ArgAction::SetTrue)]
    delete_all_secrets: bool,
    /// Map an ORIGIN (-o) to a realm (-r)
    #[arg(short = 'O', long = "add-origin", action = ArgAction::SetTrue)]
    add_origin: bool,
    /// Remove the mapping of an ORIGIN (-o)
    #[arg(short = 'R', long = "del-origin", action = ArgAction::SetTrue)]
    del_origin: bool,
    /// List the ORIGIN mappings as origin ==>> realm (of -r, or all)
    #[arg(short = 'I', long = "list-origins", action = ArgAction::SetTrue)]
    list_origins: bool,
    /// Set realm options of the realm (-r): --max-bps, --total-quota,
    /// --user-quota (0 removes one)
    #[arg(short = 'g', long = "set-realm-option", action = ArgAction::SetTrue)]
    set_realm_option: bool,
    /// List realm options as option[realm]=value (of -r, or all)
    #[arg(short = 'G', long = "list-realm-options", action = ArgAction::SetTrue)]
    list_realm_options: bool,
    /// Print an encrypted password ($5$salt$sha256) for cli-password (-p)
    #[arg(short = 'P', long = "generate-encrypted-password", action = ArgAction::SetTrue)]
    encrypted_password: bool,

    // Which database.
    /// SQLite database file (default /var/lib/turn/turndb, as coturn's
    /// Debian package)
    #[arg(
        short = 'b',
        long = "userdb",
        visible_alias = "db",
        value_name = "FILE"
    )]
    userdb: Option<String>,
    /// PostgreSQL connection string (libpq conninfo or postgresql:// URI)
    #[arg(
        short = 'e',
        long = "psql-userdb",
        visible_alias = "sql-userdb",
        value_name = "CONNINFO"
    )]
    psql_userdb: Option<String>,
    /// MySQL/MariaDB connection string (host=... dbname=... user=... password=...)
    #[arg(short = 'M', long = "mysql-userdb", value_name = "CONNINFO")]
    mysql_userdb: Option<String>,
    /// Redis connection string (ip=... dbname=... password=... port=...)
    #[arg(short = 'N', long = "redis-userdb", value_name = "CONNINFO")]
    redis_userdb: Option<String>,

    // Values.
    /// User name
    #[arg(short = 'u', long = "user")]
    user: Option<String>,
    /// Realm
    #[arg(short = 'r', long = "realm")]
    realm: Option<String>,
    /// Password
    #[arg(short = 'p', long = "password")]
    password: Option<String>,
    /// ORIGIN
    #[arg(short = 'o', long = "origin")]
    origin: Option<String>,
    /// Realm option max-bps, bytes per second (0 removes it)
    #[arg(long = "max-bps")]
    max_bps: Option<u64>,
    /// Realm option total-quota (0 removes it)
    #[arg(long = "total-quota")]
    total_quota: Option<u64>,
    /// Realm option user-quota (0 removes it)
    #[arg(long = "user-quota")]
    user_quota: Option<u64>,
    /// Print help
    /// List the fleet's live nodes and allocations (of -u, -r, or all) from
    /// the Redis of -N (ours)
    #[arg(long = "list-allocations", action = ArgAction::SetTrue)]
    list_allocations: bool,
    /// End a user's (-u) allocations on every node of the fleet sharing the
    /// Redis of -N, in realm -r or every realm (ours)
    #[arg(long = "end-user", action = ArgAction::SetTrue)]
    end_user: bool,

    #[arg(short = 'h', long = "help", action = ArgAction::Help)]
    help: Option<bool>,
}

/// An error to print, exiting non-zero.
struct Failure(String);

fn need<'a>(v: &'a Option<String>, what: &str) -> Result<&'a str, Failure> {
    v.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
        Failure(format!(
            "The operation cannot be completed: {what} must be set."
        ))
    })
}

/// The database the flags name (SQLite at coturn's default path if none).
fn database(a: &Args) -> Result<UserDb, Failure> {
    let given = [
        a.userdb.as_deref().map(|v| ("-b", UserDb::sqlite(v))),
        a.psql_userdb
            .as_deref()
            .map(|v| ("-e", UserDb::postgres(v))),
        a.mysql_userdb.as_deref().map(|v| ("-M", UserDb::mysql(v))),
        a.redis_userdb.as_deref().map(|v| ("-N", UserDb::redis(v))),
    ];
    let mut given: Vec<_> = given.into_iter().flatten().collect();
    if given.len() > 1 {
        return Err(Failure(
            "only one of -b, -e, -M and -N may be given".to_string(),
        ));
    }
    match given.pop() {
        None => Ok(UserDb::Sqlite(DEFAULT_SQLITE.into())),
        Some((flag, parsed)) => parsed.map_err(|e| Failure(format!("{flag}: {e}"))),
    }
}

/// `$5$<salt>$<sha256(salt || password)>`, salt and hash in hex: the form
/// coturn's `turnadmin -P` prints and its `cli-password` takes.
fn encrypted_password(password: &str) -> String {
    let salt: [u8; 8] = rand::random();
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("$5${}${}", hex(&salt), hex(&h.finalize()))
}

async fn run(a: Args) -> Result<(), Failure> {
    let commands = [
        a.key,
        a.add,
        a.delete,
        a.list,
        a.set_secret.is_some(),
        a.show_secret,
        a.delete_secret.is_some(),
        a.delete_all_secrets,
        a.add_origin,
        a.del_origin,
        a.list_origins,
        a.set_realm_option,
        a.list_realm_options,
        a.encrypted_password,
        a.list_allocations,
        a.end_user,
    ];
    match commands.iter().filter(|c| **c).count() {
        0 => {
            return Err(Failure(
                "no command given (turnadmin -h lists them)".to_string(),
            ));
        }
        1 => {}
        _ => return Err(Failure("give one command at a time".to_string())),
    }
    if a.key {
        let user = need(&a.user, "the user")?;
        let password = need(&a.password, "the password")?;
        let realm = a.realm.as_deref().unwrap_or("");
        println!("0x{}", hex_key(&long_term_key(user, realm, password)));
        return Ok(());
    }
    if a.encrypted_password {
        println!("{}", encrypted_password(need(&a.password, "the password")?));
        return Ok(());
    }
    let db = database(&a)?;
    if a.list_allocations || a.end_user {
        return fleet(&a, &db).await;
    }
    let writes = !(a.list || a.show_secret || a.list_origins || a.list_realm_options);
    let fail = |e: turnserver::userdb::store::Error| Failure(format!("{db}: {e}"));
    let store = Store::open(&db, writes, true).await.map_err(fail)?;
    if writes {
        store.create_schema().await.map_err(fail)?;
    }
    let realm_filter = a.realm.as_deref().filter(|r| !r.is_empty());
    if a.add {
        let user = need(&a.user, "the user")?;
        let realm = need(&a.realm, "the realm")?;
        let password = need(&a.password, "the password")?;
        let key = long_term_key(user, realm, password);
        store.set_user(realm, user, &key).await.map_err(fail)?;
    } else if a.delete {
        let user = need(&a.user, "the user")?;
        let realm = need(&a.realm, "the realm")?;
        store.delete_user(realm, user).await.map_err(fail)?;
    } else if a.list {
        for (realm, name) in store.users(realm_filter).await.map_err(fail)? {
            println!("{name}[{realm}]");
        }
    } else if let Some(secret) = &a.set_secret {
        let realm = need(&a.realm, "the realm")?;
        if secret.is_empty() {
            return Err(Failure("the secret is empty".into()));
        }
        store.add_secret(realm, secret).await.map_err(fail)?;
    } else if a.show_secret {
        let snap = store.snapshot().await.map_err(fail)?;
        for (realm, secrets) in snap.secrets {
            if realm_filter.is_none_or(|r| r == realm) {
                for s in secrets {
                    println!("{s}[{realm}]");
                }
            }
        }
    } else if let Some(secret) = &a.delete_secret {
        let realm = need(&a.realm, "the realm")?;
        store
            .delete_secret(realm, Some(secret))
            .await
            .map_err(fail)?;
    } else if a.delete_all_secrets {
        let realm = need(&a.realm, "the realm")?;
        store.delete_secret(realm, None).await.map_err(fail)?;
    } else if a.add_origin {
        let origin = need(&a.origin, "the origin")?;
        let realm = need(&a.realm, "the realm")?;
        store.add_origin(origin, realm).await.map_err(fail)?;
    } else if a.del_origin {
        let origin = need(&a.origin, "the origin")?;
        store.delete_origin(origin).await.map_err(fail)?;
    } else if a.list_origins {
        let snap = store.snapshot().await.map_err(fail)?;
        for (origin, realm) in snap.origins {
            if realm_filter.is_none_or(|r| r == realm) {
                println!("{origin} ==>> {realm}");
            }
        }
    } else if a.set_realm_option {
        let realm = need(&a.realm, "the realm")?;
        let options = [
            ("max-bps", a.max_bps),
            ("total-quota", a.total_quota),
            ("user-quota", a.user_quota),
        ];
        if options.iter().all(|(_, v)| v.is_none()) {
            return Err(Failure(
                "The operation cannot be completed: a realm option must be set.".into(),
            ));
        }
        for (opt, value) in options {
            debug_assert!(REALM_OPTIONS.contains(&opt));
            if let Some(v) = value {
                store.set_realm_option(realm, opt, v).await.map_err(fail)?;
            }
        }
    } else if a.list_realm_options {
        let snap = store.snapshot().await.map_err(fail)?;
        for ((realm, opt), value) in snap.realm_options {
            if realm_filter.is_none_or(|r| r == realm) {
                println!("{opt}[{realm}]={value}");
            }
        }
    }
    if writes && let Some(mut c) = store.redis() {
        // Nodes sharing this Redis drop what they cached at once.
        let user = if a.add || a.delete {
            Some((need(&a.realm, "the realm")?, need(&a.user, "the user")?))
        } else {
            None
        };
        fleet::invalidate(&mut c, user)
            .await
            .map_err(|e| fail(e.into()))?;
    }
    Ok(())
}

/// `--list-allocations` and `--end-user`, through the Redis of `db`.
async fn fleet(a: &Args, db: &UserDb) -> Result<(), Failure> {
    if !matches!(db, UserDb::Redis(_)) {
        return Err(Failure(
            "the fleet shares a Redis: give its connection string with -N".into(),
        ));
    }
    let fail = |e: redis::RedisError| Failure(format!("{db}: {e}"));
    let store = Store::open(db, false, true)
        .await
        .map_err(|e| Failure(format!("{db}: {e}")))?;
    let Some(mut c) = store.redis() else {
        unreachable!("a Redis store");
    };
    let realm = a.realm.as_deref().filter(|r| !r.is_empty());
    let user = a.user.as_deref().filter(|u| !u.is_empty());
    let mine =
        |l: &fleet::Listed| realm.is_none_or(|r| r == l.realm) && user.is_none_or(|u| u == l.user);
    if a.list_allocations {
        let (nodes, listed) = fleet::list(&mut c).await.map_err(fail)?;
        for n in &nodes {
            let h = &n.heartbeat;
            println!(
                "node {} address={} allocations={} load={:.0}%{}",
                n.name,
                h["address"].as_str().unwrap_or("?"),
                listed.iter().filter(|l| l.node == n.name).count(),
                h["load"].as_f64().unwrap_or(0.0),
                if h["draining"].as_bool().unwrap_or(false) {
                    " draining"
                } else {
                    ""
                }
            );
        }
        for l in listed.iter().filter(|l| mine(l)) {
            println!(
                "{}[{}] node={} {} client={} relayed={}",
                l.user, l.realm, l.node, l.transport, l.client, l.relayed
            );
        }
        return Ok(());
    }
    let user = need(&a.user, "the user")?;
    let before = fleet::list(&mut c).await.map_err(fail)?.1;
    let count = before.iter().filter(|l| mine(l)).count();
    let heard = fleet::end_user(&mut c, realm, user).await.map_err(fail)?;
    // Wait (a little) for the nodes to report the allocations gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut left = count;
    while left > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        left = fleet::list(&mut c)
            .await
            .map_err(fail)?
            .1
            .iter()
            .filter(|l| mine(l))
            .count();
    }
    println!(
        "{user}: {} allocations ended, {left} still listed; {heard} nodes told",
        count - left.min(count)
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnadmin: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("turnadmin: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encrypted_passwords_have_coturns_form() {
        let p = encrypted_password("hoodless");
        let parts: Vec<&str> = p.split('$').collect();
        assert_eq!(parts[..2], ["", "5"]);
        assert_eq!((parts[2].len(), parts[3].len()), (16, 64));
        // Checked the way coturn checks it: SHA-256 of the salt's bytes and
        // the password.
        let salt: Vec<u8> = (0..8)
            .map(|i| u8::from_str_radix(&parts[2][2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let mut h = Sha256::new();
        h.update(&salt);
        h.update(b"hoodless");
        let hex: String = h.finalize().iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(parts[3], hex);
    }
}
