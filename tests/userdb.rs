//! User databases against the real binary: coturn's SQLite database as
//! coturn's own `turnadmin` writes it, PostgreSQL, MariaDB and Redis
//! servers started for the test, several realms through ORIGIN, a
//! database outage, and bad connection strings.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    Background, Client, MariaDb, Options, Postgres, Redis, Server, TempDir, free_ports, http_get,
    metric, require_tool, run_with_timeout, xor_peer,
};
use turnserver::auth::rest_password;
use turnserver::stun::{attr, method};

const TURNADMIN: &str = env!("CARGO_BIN_EXE_turnadmin");
/// Debian's coturn, unpacked by benches/setup-coturn.sh (tests/run-all.sh).
const COTURN_DIR: &str = "/opt/coturn/usr/bin";

/// What a test waits for a change in the database to be seen: the
/// configured staleness bound (1 s) and some slack.
const STALENESS: Duration = Duration::from_millis(1600);

/// Runs our `turnadmin` with `args`; returns its standard output.
fn turnadmin(args: &[&str]) -> String {
    let out = Command::new(TURNADMIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "turnadmin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs coturn's `turnadmin` with `args` in a mount namespace of its own
/// where /var/log is a scratch tmpfs: it opens a log file there at every
/// run, which must not land on the machine. Needs root.
fn coturn_turnadmin(args: &[&str]) -> String {
    let bin = Path::new(COTURN_DIR).join("turnadmin");
    assert!(
        bin.exists(),
        "{} is missing: run benches/setup-coturn.sh (tests/run-all.sh does)",
        bin.display()
    );
    let out = Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /var/log && exec \"$0\" \"$@\"",
        ])
        .arg(&bin)
        .args(args)
        .output()
        .expect("unshare (util-linux), as root");
    assert!(
        out.status.success(),
        "coturn turnadmin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Allocates as `user`/`pw`; returns the response code (`None`: success).
fn allocate(s: &Server, user: &str, pw: &str) -> Option<u16> {
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate(user, pw);
    if r.is_success() {
        let _ = c.delete(user, pw);
        None
    } else {
        Some(r.code().unwrap_or(0))
    }
}

/// Retries `f` until it returns true or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TURN REST credential for `secret`.
fn rest(secret: &str) -> (String, String) {
    let user = format!("{}:rest-user", unix_now() + 600);
    let pw = rest_password(secret.as_bytes(), &user);
    (user, pw)
}

/// turnutils_uclient between two allocations of `user` (-y), every packet
/// delivered.
fn uclient_relays(s: &Server, user: &str, pw: &str) {
    let bin = require_tool(
        "turnutils_uclient",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let port = s.port.to_string();
    let mut cmd = Command::new(bin);
    cmd.args(["-y", "-u", user, "-w", pw, "-p", &port]).args([
        "-m",
        "2",
        "-n",
        "20",
        "-l",
        "170",
        "127.0.0.1",
    ]);
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(
        out.contains("Total lost packets 0 (0.000000%)"),
        "uclient as {user}:\n{out}\n---- server log ----\n{}",
        s.log_text()
    );
}

/// Chromium relays a data channel over TURN/UDP as `user`.
fn chromium_relays(s: &Server, user: &str, pw: &str) {
    let mut cmd = common::webrtc_relay();
    cmd.args([
        "--turn",
        &format!("turn:127.0.0.1:{}?transport=udp", s.port),
        "--username",
        user,
        "--credential",
        pw,
        "--timeout-ms",
        "60000",
    ]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(90));
    assert!(
        ok && out.contains("\"ok\":true") && out.contains("\"localType\":\"relay\""),
        "chromium as {user}:\n{out}\n---- server log ----\n{}",
        s.log_text()
    );
}

/// coturn's SQLite database, written by coturn's turnadmin (and one peer
/// range by sqlite3, which turnadmin cannot set), serves as it is; changes
/// made by coturn's turnadmin while the server runs are seen within the
/// staleness bound; and the reverse: what our turnadmin writes, coturn
/// lists and coturn's server accepts.
#[test]
fn coturns_sqlite_database_serves_unchanged_and_changes_live() {
    let dir = TempDir::new("sqlite-userdb");
    let db = dir.path("turndb");
    let db_s = db.to_str().unwrap();
    coturn_turnadmin(&[
        "-a",
        "-b",
        db_s,
        "-u",
        "alice",
        "-r",
        "north.gov",
        "-p",
        "alicepw",
    ]);
    coturn_turnadmin(&["-s", "logen", "-b", db_s, "-r", "north.gov"]);
    coturn_turnadmin(&["-g", "-b", db_s, "-r", "north.gov", "--user-quota", "1"]);
    require_tool("sqlite3", "apt-get install sqlite3");
    let out = Command::new("sqlite3")
        .arg(&db)
        .arg("INSERT INTO denied_peer_ip (realm, ip_range) VALUES ('north.gov', '93.184.216.0/24')")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let conf =
        format!("userdb={db_s}\nrealm=north.gov\nallow-loopback-peers\nuserdb-cache-seconds=1\n");
    let s = Server::start(Options::new(&conf));
    assert!(
        s.log_text().contains(&format!("from SQLite {db_s}")),
        "{}",
        s.log_text()
    );
    // The user, with the realm's quota and denied range.
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate("alice", "alicepw");
    assert!(r.is_success(), "{:?}\n{}", r.code(), s.log_text());
    let permit = |c: &mut Client, peer: &str| {
        let p = peer.parse().unwrap();
        c.signed(
            method::CREATE_PERMISSION,
            &[(attr::XOR_PEER_ADDRESS, xor_peer(p, &[0; 12]))],
            "alice",
            "alicepw",
        )
        .code()
    };
    assert_eq!(
        permit(&mut c, "93.184.216.34:9"),
        Some(403),
        "the realm's denied range"
    );
    assert_eq!(permit(&mut c, "127.0.0.1:9"), None);
    assert_eq!(
        allocate(&s, "alice", "alicepw"),
        Some(486),
        "the realm's user-quota of 1"
    );
    assert!(c.delete("alice", "alicepw").is_success());
    assert_eq!(allocate(&s, "alice", "wrong"), Some(401));
    assert_eq!(allocate(&s, "nobody", "x"), Some(401));
    // coturn's client and Chromium relay as the database's user (uclient
    // -y takes two allocations: raise the quota; coturn's turnadmin keeps
    // an option set to 0 rather than removing it).
    coturn_turnadmin(&["-g", "-b", db_s, "-r", "north.gov", "--user-quota", "10"]);
    std::thread::sleep(STALENESS);
    uclient_relays(&s, "alice", "alicepw");
    chromium_relays(&s, "alice", "alicepw");

    // Live: a user added is served at once, one deleted is refused within
    // the bound and loses its allocation at its next request.
    coturn_turnadmin(&[
        "-a",
        "-b",
        db_s,
        "-u",
        "bob",
        "-r",
        "north.gov",
        "-p",
        "bobpw",
    ]);
    assert_eq!(allocate(&s, "bob", "bobpw"), None, "{}", s.log_text());
    let mut held = Client::new(s.udp_addr());
    assert!(held.allocate("bob", "bobpw").is_success());
    coturn_turnadmin(&["-d", "-b", db_s, "-u", "bob", "-r", "north.gov"]);
    std::thread::sleep(STALENESS);
    assert_eq!(allocate(&s, "bob", "bobpw"), Some(401));
    let refresh = held.signed(
        method::REFRESH,
        &[(attr::LIFETIME, vec![0, 0, 2, 88])],
        "bob",
        "bobpw",
    );
    assert_eq!(refresh.code(), Some(401));
    assert!(
        s.log_text()
            .contains("reason=user removed from the user database"),
        "{}",
        s.log_text()
    );

    // The database's REST secret, and one added while running.
    let rest_conf =
        format!("userdb={db_s}\nrealm=north.gov\nuse-auth-secret\nuserdb-cache-seconds=1\n");
    let r = Server::start(Options::new(&rest_conf));
    let (u, p) = rest("logen");
    assert_eq!(allocate(&r, &u, &p), None, "{}", r.log_text());
    let (u, p) = rest("other");
    assert_eq!(allocate(&r, &u, &p), Some(401));
    coturn_turnadmin(&["-s", "other", "-b", db_s, "-r", "north.gov"]);
    std::thread::sleep(STALENESS);
    assert_eq!(allocate(&r, &u, &p), None, "{}", r.log_text());

    // The reverse: ours writes, coturn reads.
    turnadmin(&[
        "-a",
        "-b",
        db_s,
        "-u",
        "carol",
        "-r",
        "north.gov",
        "-p",
        "carolpw",
    ]);
    let listed = coturn_turnadmin(&["-l", "-b", db_s]);
    assert!(listed.lines().any(|l| l == "carol[north.gov]"), "{listed}");
    let (_coturn, coturn) = coturn_server(
        &dir,
        &format!("userdb={db_s}\nrealm=north.gov\nlt-cred-mech\n"),
    );
    let mut c = Client::new(coturn);
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        let r = c.allocate("carol", "carolpw");
        if r.is_success() || Instant::now() > deadline {
            break r.code();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, None, "coturn refused our turnadmin's user");
}

/// Starts coturn's own server on a free port with `extra` configuration,
/// killed when the returned guard drops.
fn coturn_server(dir: &TempDir, extra: &str) -> (Background, std::net::SocketAddr) {
    let bin = Path::new(COTURN_DIR).join("turnserver");
    let port = free_ports(2);
    let conf = dir.path("coturn.conf");
    std::fs::write(
        &conf,
        format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\ntls-listening-port={}\nmin-port=62000\nmax-port=62999\nno-tls\nno-dtls\nno-cli\nsimple-log\nlog-file={}\npidfile={}\n{extra}",
            port + 1,
            dir.path("coturn.log").display(),
            dir.path("coturn.pid").display(),
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start coturn");
    (
        Background(child),
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
}

/// Users, secrets and live changes through a database server; `flag` is
/// turnadmin's flag for it, `option` the configuration key.
fn serves_through(option: &str, flag: &str, conninfo: &str) {
    let admin = |args: &[&str]| {
        let mut a = vec![flag, conninfo];
        a.extend_from_slice(args);
        turnadmin(&a)
    };
    admin(&["-a", "-u", "alice", "-r", "north.gov", "-p", "alicepw"]);
    admin(&["-s", "logen", "-r", "north.gov"]);
    let listed = admin(&["-l"]);
    assert!(
        listed.lines().any(|l| l == "alice[north.gov]"),
        "{option}: {listed}"
    );
    let conf = format!(
        "{option}=\"{conninfo}\"\nrealm=north.gov\nuserdb-cache-seconds=1\nallow-loopback-peers\n"
    );
    let s = Server::start(Options::new(&conf));
    assert_eq!(
        allocate(&s, "alice", "alicepw"),
        None,
        "{option}:\n{}",
        s.log_text()
    );
    assert_eq!(allocate(&s, "alice", "wrong"), Some(401), "{option}");
    assert_eq!(allocate(&s, "bob", "bobpw"), Some(401), "{option}");
    admin(&["-a", "-u", "bob", "-r", "north.gov", "-p", "bobpw"]);
    std::thread::sleep(STALENESS);
    assert_eq!(
        allocate(&s, "bob", "bobpw"),
        None,
        "{option}: a user added live"
    );
    admin(&["-d", "-u", "alice", "-r", "north.gov"]);
    std::thread::sleep(STALENESS);
    assert_eq!(
        allocate(&s, "alice", "alicepw"),
        Some(401),
        "{option}: a user deleted live"
    );
    let rest_conf = format!(
        "{option}=\"{conninfo}\"\nrealm=north.gov\nuse-auth-secret\nuserdb-cache-seconds=1\n"
    );
    let r = Server::start(Options::new(&rest_conf));
    let (u, p) = rest("logen");
    assert_eq!(
        allocate(&r, &u, &p),
        None,
        "{option}: the database's secret"
    );
    let (u, p) = rest("newer");
    assert_eq!(allocate(&r, &u, &p), Some(401));
    admin(&["-s", "newer", "-r", "north.gov"]);
    std::thread::sleep(STALENESS);
    assert_eq!(allocate(&r, &u, &p), None, "{option}: a secret added live");
    assert!(
        !s.log_text().contains("turnpw"),
        "no database password in the log"
    );
}

#[test]
fn postgresql_serves_users_secrets_and_live_changes() {
    let pg = Postgres::start();
    serves_through("psql-userdb", "-e", &pg.conninfo());
}

#[test]
fn mariadb_serves_users_secrets_and_live_changes() {
    let db = MariaDb::start();
    serves_through("mysql-userdb", "-M", &db.conninfo());
}

#[test]
fn redis_serves_users_secrets_and_live_changes() {
    let r = Redis::start();
    serves_through("redis-userdb", "-N", &r.conninfo());
}

/// One server, two realms: ORIGIN picks the realm (its users, its REST
/// secrets), the default realm keeps its own.
#[test]
fn origins_select_realms_with_their_own_users() {
    let dir = TempDir::new("realms");
    let db = dir.path("turndb");
    let db_s = db.to_str().unwrap();
    turnadmin(&[
        "-a",
        "-b",
        db_s,
        "-u",
        "alice",
        "-r",
        "north.gov",
        "-p",
        "alicepw",
    ]);
    turnadmin(&[
        "-a",
        "-b",
        db_s,
        "-u",
        "whirrun",
        "-r",
        "crinna.org",
        "-p",
        "sword",
    ]);
    turnadmin(&[
        "-O",
        "-b",
        db_s,
        "-o",
        "https://crinna.example",
        "-r",
        "crinna.org",
    ]);
    assert_eq!(
        turnadmin(&["-I", "-b", db_s]).trim(),
        "https://crinna.example ==>> crinna.org"
    );
    let s = Server::start(Options::new(&format!("userdb={db_s}\nrealm=north.gov\n")));
    let origin = [(attr::ORIGIN, b"https://crinna.example".to_vec())];
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate_with(&origin, "whirrun", "sword");
    assert!(r.is_success(), "{:?}\n{}", r.code(), s.log_text());
    assert_eq!(c.realm, "crinna.org", "the 401 named the ORIGIN's realm");
    let mut c = Client::new(s.udp_addr());
    assert_eq!(
        c.allocate_with(&origin, "alice", "alicepw").code(),
        Some(401)
    );
    let mut c = Client::new(s.udp_addr());
    assert!(c.allocate("alice", "alicepw").is_success());
    assert_eq!(c.realm, "north.gov");
    let mut c = Client::new(s.udp_addr());
    assert_eq!(c.allocate("whirrun", "sword").code(), Some(401));
    // Each realm's REST secrets.
    turnadmin(&["-s", "logen", "-b", db_s, "-r", "north.gov"]);
    turnadmin(&["-s", "north", "-b", db_s, "-r", "crinna.org"]);
    let r = Server::start(Options::new(&format!(
        "userdb={db_s}\nrealm=north.gov\nuse-auth-secret\n"
    )));
    let (u, p) = rest("north");
    let mut c = Client::new(r.udp_addr());
    assert!(
        c.allocate_with(&origin, &u, &p).is_success(),
        "{}",
        r.log_text()
    );
    assert_eq!(
        allocate(&r, &u, &p),
        Some(401),
        "the default realm's secret is another"
    );
    let (u, p) = rest("logen");
    assert_eq!(allocate(&r, &u, &p), None);
    let mut c = Client::new(r.udp_addr());
    assert_eq!(c.allocate_with(&origin, &u, &p).code(), Some(401));
}

/// The database goes away mid-run: relaying goes on, known users keep
/// working, unknown ones are refused promptly, the outage is reported
/// once and in /health, and service recovers when the database returns.
#[test]
fn a_database_outage_never_stops_relaying() {
    let mut redis = Redis::start();
    let info = redis.conninfo();
    turnadmin(&[
        "-N",
        &info,
        "-a",
        "-u",
        "alice",
        "-r",
        "north.gov",
        "-p",
        "alicepw",
    ]);
    let metrics = free_ports(1);
    let conf = format!(
        "redis-userdb=\"{info}\"\nrealm=north.gov\nuserdb-cache-seconds=1\nallow-loopback-peers\nprometheus\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\n"
    );
    let s = Server::start(Options::new(&conf));
    let maddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    // A relaying allocation.
    let mut c = Client::new(s.udp_addr());
    let relayed = c.allocate("alice", "alicepw").relayed();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let permit = [(
        attr::XOR_PEER_ADDRESS,
        xor_peer(peer.local_addr().unwrap(), &[0; 12]),
    )];
    assert!(
        c.signed(method::CREATE_PERMISSION, &permit, "alice", "alicepw")
            .is_success()
    );
    let mut buf = [0u8; 1500];
    let relays = |c: &Client| {
        peer.send_to(b"ping", relayed).unwrap();
        c.sock.recv_from(&mut [0u8; 1500]).is_ok()
    };
    assert!(relays(&c));

    redis.stop();
    std::thread::sleep(STALENESS);
    assert!(relays(&c), "relaying stopped with the database");
    let started = Instant::now();
    assert_eq!(allocate(&s, "stranger", "x"), Some(401));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "an unknown user waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        allocate(&s, "alice", "alicepw"),
        None,
        "a known user is refused:\n{}",
        s.log_text()
    );
    let (status, body) = http_get(maddr, "/health");
    assert_eq!(status, 200);
    assert!(body.contains("userdb: unreachable"), "{body}");
    let (_, body) = http_get(maddr, "/metrics");
    assert_eq!(metric(&body, "turn_userdb_up"), Some(0.0), "{body}");
    assert!(relays(&c));
    let log = s.log_text();
    // Once by the user database, once by the fleet (a Redis userdb makes
    // the node a fleet of one).
    for what in ["user database", "fleet: Redis"] {
        assert_eq!(
            log.lines()
                .filter(|l| l.contains(what) && l.contains("unreachable:"))
                .count(),
            1,
            "the outage is logged once by the {what}:\n{log}"
        );
    }

    redis.resume();
    turnadmin(&[
        "-N",
        &info,
        "-a",
        "-u",
        "dave",
        "-r",
        "north.gov",
        "-p",
        "davepw",
    ]);
    assert!(
        eventually(Duration::from_secs(40), || allocate(&s, "dave", "davepw")
            .is_none()),
        "no recovery:\n{}",
        s.log_text()
    );
    assert!(s.log_text().contains("answers again"), "{}", s.log_text());
    let (_, body) = http_get(maddr, "/health");
    assert!(body.contains("userdb: ok"), "{body}");
    assert!(relays(&c));
    let _ = peer.recv_from(&mut buf);
}

/// Bad connection strings and unusable files stop the server before it
/// binds, naming the file, line and option; a reload with one keeps the
/// running configuration.
#[test]
fn bad_connection_strings_name_the_option() {
    let bin = env!("CARGO_BIN_EXE_turnserver");
    let dir = TempDir::new("baddb");
    let cases = [
        (
            "psql-userdb=\"host=127.0.0.1 port=http dbname=x\"",
            "psql-userdb: port 'http' is not a port number",
        ),
        (
            "mysql-userdb=\"host=127.0.0.1 user=x\"",
            "mysql-userdb: dbname is missing",
        ),
        (
            "redis-userdb=\"ip=127.0.0.1 frobnicate=1\"",
            "redis-userdb: unknown key 'frobnicate'",
        ),
        (
            "userdb=/a.db\nredis-userdb=ip=127.0.0.1",
            "redis-userdb: only one user database can be used, and userdb is set too",
        ),
    ];
    for (text, want) in cases {
        let conf = dir.path("t.conf");
        std::fs::write(&conf, format!("listening-ip=127.0.0.1\nno-tls\n{text}\n")).unwrap();
        let (ok, out) = run_with_timeout(
            Command::new(bin).arg("-c").arg(&conf),
            Duration::from_secs(10),
        );
        assert!(!ok, "{text}: started:\n{out}");
        assert!(out.contains(want), "{text}: expected '{want}' in:\n{out}");
    }
    // A file that cannot be created.
    let port = free_ports(2);
    let (ok, out) = run_with_timeout(
        Command::new(bin).args([
            "-n",
            "--listening-ip=127.0.0.1",
            "-p",
            &port.to_string(),
            "--no-tls",
            "--userdb=/proc/nonexistent/turndb",
        ]),
        Duration::from_secs(10),
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("userdb: ") && out.contains("/proc/nonexistent"),
        "{out}"
    );
    // A reload with a bad string keeps the running configuration.
    let db = dir.path("ok.db");
    turnadmin(&[
        "-a",
        "-b",
        db.to_str().unwrap(),
        "-u",
        "alice",
        "-r",
        "r",
        "-p",
        "pw",
    ]);
    let s = Server::start(Options::new(&format!("userdb={}\nrealm=r\n", db.display())));
    s.rewrite_config("psql-userdb=\"dbname=\"\nrealm=r\n");
    s.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        s.log_text()
            .contains("not reloaded, the previous one stays in force"),
        "{}",
        s.log_text()
    );
    assert_eq!(allocate(&s, "alice", "pw"), None);
}
