//! A fleet of three nodes sharing one Redis, each node in a network
//! namespace of its own on one bridge, with Redis, the clients and the
//! peers in a fourth (the hub): quotas across the fleet and a dead node's
//! lease, revocation and ending a user everywhere, coturn's status feed,
//! a Redis outage under load, and redirects followed by coturn's client.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{
    Background, Client, NetNs, NsServer, Options, Redis, Server, TempDir, http_get, metric,
    require_tool, run_with_timeout, xor_peer,
};
use turnserver::stun::{attr, method};

const TURNADMIN: &str = env!("CARGO_BIN_EXE_turnadmin");
const TURNBENCH: &str = env!("CARGO_BIN_EXE_turnbench");
/// coturn's server, unpacked by benches/setup-coturn.sh (tests/run-all.sh).
const COTURN: &str = "/opt/coturn/usr/bin/turnserver";

/// The hub's address on the bridge (Redis, clients, peers).
const HUB: &str = "10.77.0.1";
/// The port the nodes listen on (each namespace is private to the test).
const PORT: u16 = 3578;
const REDIS_PORT: u16 = 6379;
const METRICS_PORT: u16 = 9641;
const REALM: &str = "north.gov";
/// The documented lease: a dead node's share counts this long at most.
const LEASE: Duration = Duration::from_secs(3);

/// The fleet tests share two cores: one at a time keeps their timings
/// honest.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Node {
    /// Dropped (killed) before its namespace goes.
    server: Option<NsServer>,
    /// Kept for their drop: the namespace and the configuration's
    /// directory.
    _ns: NetNs,
    ip: String,
    _config: TempDir,
}

impl Node {
    fn addr(&self) -> SocketAddr {
        format!("{}:{PORT}", self.ip).parse().unwrap()
    }

    fn log(&self) -> String {
        self.server.as_ref().map(|s| s.log()).unwrap_or_default()
    }

    fn server(&self) -> &NsServer {
        self.server.as_ref().unwrap()
    }
}

/// Three nodes, Redis and the hub; torn down in that order.
struct Fleet {
    nodes: Vec<Node>,
    redis: Redis,
    hub: NetNs,
}

impl Fleet {
    /// Builds the network and Redis, adds `alice`, `bob` and `carol`
    /// (passwords `<name>pw`) and starts three nodes whose configuration
    /// has `extra` (the same for all) and `per_node(i)` (i = 1..=3).
    fn start(tag: &str, extra: &str, per_node: impl Fn(usize) -> String) -> Fleet {
        let hub = NetNs::empty(&format!("{tag}h"));
        hub.ip(&["-n", &hub.name, "link", "add", "br0", "type", "bridge"]);
        hub.ip(&[
            "-n",
            &hub.name,
            "addr",
            "add",
            &format!("{HUB}/24"),
            "dev",
            "br0",
        ]);
        hub.ip(&["-n", &hub.name, "link", "set", "br0", "up"]);
        let redis = Redis::start_in(&hub.name, HUB, REDIS_PORT);
        let mut fleet = Fleet {
            nodes: Vec::new(),
            redis,
            hub,
        };
        for user in ["alice", "bob", "carol"] {
            fleet.admin(&["-a", "-u", user, "-r", REALM, "-p", &format!("{user}pw")]);
        }
        for i in 1..=3 {
            let ns = NetNs::empty(&format!("{tag}{i}"));
            let veth = format!("v{i}");
            ns.ip(&[
                "-n",
                &fleet.hub.name,
                "link",
                "add",
                &veth,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ]);
            ns.ip(&[
                "-n",
                &fleet.hub.name,
                "link",
                "set",
                &veth,
                "master",
                "br0",
                "up",
            ]);
            let ip = format!("10.77.0.1{i}");
            ns.address("eth0", &format!("{ip}/24"));
            let config = TempDir::new("fleet");
            let conf = format!(
                "listening-ip={ip}\nlistening-port={PORT}\nno-tls\nrealm={REALM}\n\
                 redis-userdb=\"{}\"\nnode-name=n{i}\nmin-port=50000\nmax-port=50099\n\
                 allowed-peer-ip={HUB}\nprometheus\nprometheus-address={ip}\n\
                 prometheus-port={METRICS_PORT}\n{extra}\n{}\n",
                fleet.redis.conninfo(),
                per_node(i)
            );
            std::fs::write(config.path("turnserver.conf"), conf).unwrap();
            let server = ns.start_server(&[
                std::ffi::OsString::from("-c"),
                config.path("turnserver.conf").into_os_string(),
            ]);
            fleet.nodes.push(Node {
                server: Some(server),
                _ns: ns,
                ip,
                _config: config,
            });
        }
        // Every node has seen the others' heartbeats.
        fleet.wait_for("the nodes' heartbeats", Duration::from_secs(10), |f| {
            f.redis
                .cli(&["--scan", "--pattern", "turnserver/node/*"])
                .lines()
                .count()
                == 3
        });
        fleet
    }

    /// Our `turnadmin -N <this Redis> args`, run in the hub.
    fn admin(&self, args: &[&str]) -> String {
        let info = self.redis.conninfo();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.hub.name, TURNADMIN, "-N", &info])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "turnadmin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A client in the hub for node `i` (1..=3).
    fn client(&self, i: usize) -> Client {
        let server = self.nodes[i - 1].addr();
        self.hub
            .run(move || Client::bound(format!("{HUB}:0").parse().unwrap(), server))
    }

    /// Allocates as `user` on node `i`: the client (holding the
    /// allocation) or the error code.
    fn allocate(&self, i: usize, user: &str) -> Result<Client, u16> {
        let mut c = self.client(i);
        let r = c.allocate(user, &format!("{user}pw"));
        if r.is_success() {
            Ok(c)
        } else {
            Err(r.code().unwrap_or(0))
        }
    }

    /// Allocates as `user` on node `i`, which must succeed: the client and
    /// the relayed address.
    fn allocate_relayed(&self, i: usize, user: &str) -> (Client, SocketAddr) {
        let mut c = self.client(i);
        let r = c.allocate(user, &format!("{user}pw"));
        assert!(
            r.is_success(),
            "{user} on n{i}: {:?}\n{}",
            r.code(),
            self.logs()
        );
        let relayed = r.relayed();
        (c, relayed)
    }

    /// GET `path` from node `i`'s metrics listener.
    fn http(&self, i: usize, path: &'static str) -> (u16, String) {
        let addr: SocketAddr = format!("{}:{METRICS_PORT}", self.nodes[i - 1].ip)
            .parse()
            .unwrap();
        self.hub.run(move || http_get(addr, path))
    }

    fn metric(&self, i: usize, name: &str) -> Option<f64> {
        metric(&self.http(i, "/metrics").1, name)
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("---- n{} ----\n{}", i + 1, n.log()))
            .collect()
    }

    /// Waits (polling) until `f` holds, failing with `what` and the logs.
    fn wait_for(&self, what: &str, limit: Duration, mut f: impl FnMut(&Fleet) -> bool) -> Duration {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < limit,
                "{what}: not within {limit:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }

    /// Waits until every node refuses, `refused(fleet, node)`, each within
    /// a second, and asserts that all of them did within a second of the
    /// call (made right after the change); returns how long it took.
    fn refused_everywhere(&self, what: &str, refused: impl Fn(&Fleet, usize) -> bool) -> Duration {
        let start = Instant::now();
        for i in 1..=3 {
            self.wait_for(what, Duration::from_secs(1), |f| refused(f, i));
        }
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{what} everywhere after {took:?}"
        );
        took
    }
}

/// A peer socket in the hub.
fn peer(fleet: &Fleet) -> std::net::UdpSocket {
    fleet.hub.run(|| {
        let s = std::net::UdpSocket::bind(format!("{HUB}:0")).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    })
}

/// Gives `c` (allocated as `user`) a permission for `peer`; returns its
/// relayed address.
fn permit(
    c: &mut Client,
    user: &str,
    relayed: SocketAddr,
    peer: &std::net::UdpSocket,
) -> SocketAddr {
    let attrs = [(
        attr::XOR_PEER_ADDRESS,
        xor_peer(peer.local_addr().unwrap(), &[0; 12]),
    )];
    let r = c.signed(
        method::CREATE_PERMISSION,
        &attrs,
        user,
        &format!("{user}pw"),
    );
    assert!(r.is_success(), "CreatePermission: {:?}", r.code());
    relayed
}

/// Whether a datagram from `peer` to `relayed` reaches `c`.
fn relays(c: &Client, peer: &std::net::UdpSocket, relayed: SocketAddr) -> bool {
    peer.send_to(b"probe", relayed).unwrap();
    let mut buf = [0u8; 1500];
    c.sock.recv_from(&mut buf).is_ok()
}

/// `user-quota` counts allocations on every node, and a node killed with
/// its allocations gives them back within the lease. A realm's
/// `total-quota` set with turnadmin counts across the fleet too.
#[test]
fn quotas_count_across_the_fleet_and_a_dead_nodes_share_expires() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = Fleet::start("q", "user-quota=2", |_| String::new());
    let _a1 = fleet.allocate(1, "alice").expect("alice on n1");
    let _a2 = fleet.allocate(2, "alice").expect("alice on n2");
    for i in [3, 1, 2] {
        assert_eq!(
            fleet.allocate(i, "alice").err(),
            Some(486),
            "a third allocation of alice on n{i}\n{}",
            fleet.logs()
        );
    }
    // The shared counts, per node.
    let counts = fleet
        .redis
        .cli(&["hgetall", &format!("turnserver/quota/{REALM}/user/alice")]);
    assert_eq!(
        counts.split_whitespace().collect::<Vec<_>>(),
        ["n1", "1", "n2", "1"]
    );

    // n1 dies without a word: its share lasts the lease at most.
    fleet.nodes[0].server.as_mut().unwrap().kill();
    let killed = Instant::now();
    let mut freed = None;
    while freed.is_none() {
        assert!(
            killed.elapsed() < LEASE + Duration::from_secs(2),
            "alice's quota not freed {:?} after n1 died\n{}",
            killed.elapsed(),
            fleet.logs()
        );
        freed = fleet.allocate(3, "alice").ok();
    }
    let took = killed.elapsed();
    assert!(took <= LEASE + Duration::from_millis(1500), "took {took:?}");
    eprintln!("a dead node's quota share freed after {took:?}");
    assert_eq!(fleet.allocate(2, "alice").err(), Some(486));

    // A realm's total-quota, set while the fleet runs (turnadmin tells
    // the nodes at once), counts across it: alice holds 2 (n2, n3), so
    // bob may take one more, anywhere, and then nobody.
    fleet.admin(&["-g", "-r", REALM, "--total-quota", "3"]);
    std::thread::sleep(Duration::from_secs(1));
    let _b = fleet
        .allocate(2, "bob")
        .expect("bob's allocation, the realm's third");
    assert_eq!(
        fleet.allocate(3, "carol").err(),
        Some(486),
        "{}",
        fleet.logs()
    );
    assert_eq!(fleet.allocate(2, "carol").err(), Some(486));
    let counts = fleet
        .redis
        .cli(&["hgetall", &format!("turnserver/quota/{REALM}/total")]);
    let mut total: Vec<&str> = counts.split_whitespace().collect();
    total.retain(|w| w.parse::<u32>().is_ok());
    let sum: u32 = total.iter().map(|w| w.parse::<u32>().unwrap()).sum();
    assert_eq!(sum, 3, "{counts}");
}

/// Deleting a user (with turnadmin, or by deleting the key as any Redis
/// client may) is refused by every node within a second, whatever the
/// cache time; the fleet lists its allocations by user and node and ends
/// a user's allocations on every node in one command.
#[test]
fn revocation_and_ending_a_user_reach_every_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = Fleet::start("r", "userdb-cache-seconds=60", |_| String::new());
    // alice on every node, bob and carol known to every node.
    let mut alice: Vec<Client> = (1..=3)
        .map(|i| fleet.allocate(i, "alice").expect("alice"))
        .collect();
    for i in 1..=3 {
        for user in ["bob", "carol"] {
            let mut c = fleet.allocate(i, user).expect(user);
            assert!(c.delete(user, &format!("{user}pw")).is_success());
        }
    }

    // The listing: every node, and alice's allocation on each.
    let listed = fleet.admin(&["--list-allocations", "-u", "alice"]);
    for i in 1..=3 {
        assert!(
            listed.contains(&format!(
                "node n{i} address=10.77.0.1{i}:{PORT} allocations=1"
            )),
            "{listed}"
        );
        assert!(
            listed.contains(&format!("alice[{REALM}] node=n{i} udp client={HUB}:")),
            "{listed}"
        );
    }
    assert_eq!(
        listed.lines().filter(|l| l.starts_with("alice[")).count(),
        3
    );

    // End alice everywhere: her allocations are gone on all three nodes,
    // and each node says why.
    let out = fleet.admin(&["--end-user", "-u", "alice", "-r", REALM]);
    assert!(
        out.contains("alice: 3 allocations ended, 0 still listed; 3 nodes told"),
        "{out}"
    );
    for (i, c) in alice.iter_mut().enumerate() {
        let r = c.signed(
            method::REFRESH,
            &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
            "alice",
            "alicepw",
        );
        assert_eq!(
            r.code(),
            Some(437),
            "alice's allocation on n{} lives on",
            i + 1
        );
        assert!(
            fleet.nodes[i]
                .log()
                .contains("1 allocations of alice in realm north.gov ended by the operator"),
            "{}",
            fleet.nodes[i].log()
        );
    }
    assert!(!fleet.admin(&["--list-allocations"]).contains("alice["));
    // She is not banned: ending is not deleting.
    drop(fleet.allocate(1, "alice").expect("alice again"));

    // turnadmin -d: every node refuses bob within a second, although
    // each cached him for a minute.
    fleet.admin(&["-d", "-u", "bob", "-r", REALM]);
    let took = fleet.refused_everywhere("bob refused", |f, i| {
        f.allocate(i, "bob").err() == Some(401)
    });
    eprintln!("turnadmin -d refused on three nodes after {took:?}");

    // Another tool deletes carol's key: keyspace notifications.
    fleet
        .redis
        .cli(&["del", &format!("turn/realm/{REALM}/user/carol/key")]);
    let took = fleet.refused_everywhere("carol refused", |f, i| {
        f.allocate(i, "carol").err() == Some(401)
    });
    eprintln!("DEL of the key refused on three nodes after {took:?}");

    // coturn's own turnadmin adds and deletes a user on the same Redis.
    let info = fleet.redis.conninfo();
    coturn_turnadmin(
        &fleet,
        &["-a", "-N", &info, "-u", "erin", "-r", REALM, "-p", "erinpw"],
    );
    for i in 1..=3 {
        drop(
            fleet
                .allocate(i, "erin")
                .expect("erin, added by coturn's turnadmin"),
        );
    }
    coturn_turnadmin(&fleet, &["-d", "-N", &info, "-u", "erin", "-r", REALM]);
    fleet.refused_everywhere("erin refused", |f, i| {
        f.allocate(i, "erin").err() == Some(401)
    });
}

/// Runs coturn's `turnadmin` in the hub, in a mount namespace of its own
/// where /var/log is a scratch tmpfs (it opens a log file there at every
/// run, which must not land on the machine).
fn coturn_turnadmin(fleet: &Fleet, args: &[&str]) {
    let bin = "/opt/coturn/usr/bin/turnadmin";
    assert!(
        std::path::Path::new(bin).exists(),
        "{bin} is missing: run benches/setup-coturn.sh (tests/run-all.sh does)"
    );
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &fleet.hub.name,
            "unshare",
            "-m",
            "sh",
            "-c",
        ])
        .arg("mount -t tmpfs tmpfs /var/log && exec \"$0\" \"$@\"")
        .arg(bin)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "coturn turnadmin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Follows `turn/realm/*` channels in the hub (`redis-cli psubscribe`);
/// [`Feed::messages`] are (channel, message) pairs so far.
struct Feed {
    _cli: Background,
    dir: TempDir,
}

impl Feed {
    fn follow(fleet: &Fleet) -> Feed {
        require_tool("redis-cli", "apt-get install redis-tools");
        let dir = TempDir::new("feed");
        let out = std::fs::File::create(dir.path("feed")).unwrap();
        let cli = Command::new("ip")
            .args(["netns", "exec", &fleet.hub.name, "redis-cli"])
            .args(["-h", HUB, "-p", &REDIS_PORT.to_string()])
            .args(["-a", "turnpw", "--no-auth-warning", "--csv"])
            .args(["psubscribe", "turn/realm/*"])
            .stdout(out)
            .spawn()
            .unwrap();
        let feed = Feed {
            _cli: Background(cli),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !feed.text().contains("psubscribe") {
            assert!(Instant::now() < deadline, "redis-cli never subscribed");
            std::thread::sleep(Duration::from_millis(50));
        }
        feed
    }

    fn text(&self) -> String {
        std::fs::read_to_string(self.dir.path("feed")).unwrap_or_default()
    }

    fn messages(&self) -> Vec<(String, String)> {
        self.text()
            .lines()
            .filter_map(|l| {
                let l = l.strip_prefix("\"pmessage\",\"turn/realm/*\",\"")?;
                let (channel, message) = l.split_once("\",\"")?;
                Some((
                    channel.to_string(),
                    message.trim_end_matches('"').to_string(),
                ))
            })
            .collect()
    }
}

/// `s` with every run of digits replaced by `#`: the shape of a message.
fn shape(s: &str) -> String {
    let mut out = String::new();
    let mut digits = false;
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            if !digits {
                out.push('#');
            }
            digits = true;
        } else {
            out.push(ch);
            digits = false;
        }
    }
    out
}

/// One allocation's life as `user` through `c`: allocate, a permission
/// and a packet each way, refresh, delete.
fn life(c: &mut Client, user: &str, peer: &std::net::UdpSocket) {
    let pw = format!("{user}pw");
    let r = c.allocate(user, &pw);
    assert!(r.is_success(), "allocate: {:?}", r.code());
    let relayed = permit(c, user, r.relayed(), peer);
    assert!(relays(c, peer, relayed));
    let r = c.signed(
        method::REFRESH,
        &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
        user,
        &pw,
    );
    assert!(r.is_success());
    assert!(c.delete(user, &pw).is_success());
}

/// `redis-statsdb`: every node's allocations appear on coturn's status
/// channels, in the shapes coturn's own server gives them on the same
/// Redis, and the status key carries the allocation's lifetime.
#[test]
fn statsdb_feed_matches_coturns_from_every_node() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let conninfo =
        |port: u16| format!("ip={HUB} dbname=3 password=turnpw port={port} connect_timeout=2");
    let statsdb = format!("redis-statsdb=\"{}\"", conninfo(REDIS_PORT));
    let fleet = Fleet::start("s", &statsdb, |_| String::new());
    let feed = Feed::follow(&fleet);
    let peer = peer(&fleet);

    // coturn itself, in the hub, publishing to the same Redis.
    assert!(
        std::path::Path::new(COTURN).exists(),
        "{COTURN} is missing: run benches/setup-coturn.sh (tests/run-all.sh does)"
    );
    let dir = TempDir::new("coturn");
    std::fs::write(
        dir.path("coturn.conf"),
        format!(
            "listening-ip={HUB}\nlistening-port=3590\nmin-port=51000\nmax-port=51099\nno-tls\nno-dtls\nno-cli\n\
             realm={REALM}\nlt-cred-mech\nuser=dave:davepw\n{statsdb}\nallowed-peer-ip={HUB}\n\
             simple-log\nlog-file={}\npidfile={}\n",
            dir.path("coturn.log").display(),
            dir.path("coturn.pid").display()
        ),
    )
    .unwrap();
    let coturn = Background(
        Command::new("ip")
            .args(["netns", "exec", &fleet.hub.name, COTURN, "-c"])
            .arg(dir.path("coturn.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let coturn_addr: SocketAddr = format!("{HUB}:3590").parse().unwrap();
    let mut c = fleet
        .hub
        .run(move || Client::bound(format!("{HUB}:0").parse().unwrap(), coturn_addr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.transact(&common::binding_request([7; 12])).is_success() {
        assert!(Instant::now() < deadline, "coturn never answered");
    }
    life(&mut c, "dave", &peer);

    // The same on each of our nodes, and the live status key.
    for i in 1..=3 {
        let mut c = fleet.client(i);
        let pw = "alicepw";
        let r = c.allocate("alice", pw);
        assert!(r.is_success());
        let keys = fleet.redis.cli(&[
            "--scan",
            "--pattern",
            "turn/realm/north.gov/user/alice/allocation/*/status",
        ]);
        let key = keys
            .lines()
            .next()
            .unwrap_or_else(|| panic!("no status key for n{i}: {keys}"))
            .to_string();
        let value = fleet.redis.cli(&["get", &key]);
        assert!(
            value.starts_with("new lifetime=600, type=UDP, local=10.77.0.1"),
            "{value}"
        );
        let ttl: u32 = fleet.redis.cli(&["ttl", &key]).trim().parse().unwrap();
        assert!((590..=600).contains(&ttl), "TTL {ttl}");
        assert!(c.delete("alice", pw).is_success());
        life(&mut c, "alice", &peer);
    }
    // coturn says "deleted" (with the totals) some time after the
    // Refresh with LIFETIME 0.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !feed
        .messages()
        .iter()
        .any(|(ch, m)| ch.contains("/dave/") && m == "deleted")
    {
        assert!(
            Instant::now() < deadline,
            "coturn never said deleted:\n{}",
            feed.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(coturn);

    let messages = feed.messages();
    let shapes = |user: &str| -> std::collections::BTreeSet<(String, String)> {
        messages
            .iter()
            .filter(|(ch, _)| ch.contains(&format!("/user/{user}/")))
            .map(|(ch, m)| (shape(ch), shape(m)))
            .collect()
    };
    let theirs = shapes("dave");
    let ours: std::collections::BTreeSet<(String, String)> = shapes("alice")
        .into_iter()
        .map(|(ch, m)| (ch.replace("/alice/", "/dave/"), m))
        .collect();
    for kind in ["new lifetime", "refreshed lifetime", "deleted"] {
        assert!(
            theirs.iter().any(|(_, m)| m.starts_with(kind)),
            "coturn published no {kind}: {messages:#?}"
        );
    }
    let missing: Vec<_> = theirs.difference(&ours).collect();
    assert!(
        missing.is_empty(),
        "coturn published shapes we do not: {missing:#?}\nours: {ours:#?}"
    );
    // Every node's allocations were on the feed: new, refreshed and
    // deleted, from each node's address.
    for i in 1..=3 {
        let local = format!("local=10.77.0.1{i}:{PORT}");
        for kind in ["new", "refreshed lifetime=600", "refreshed lifetime=0"] {
            assert!(
                messages
                    .iter()
                    .any(|(_, m)| m.starts_with(kind) && m.contains(&local)),
                "no {kind} from n{i}: {messages:#?}"
            );
        }
    }
    let deleted = messages
        .iter()
        .filter(|(ch, m)| ch.contains("/alice/") && m == "deleted")
        .count();
    assert_eq!(deleted, 6, "{messages:#?}");
}

/// What a [`Probe`] saw.
#[derive(Debug)]
struct Probed {
    sent: u32,
    received: u32,
    longest_gap: Duration,
}

/// Sends a datagram from a peer through an allocation every 20 ms and
/// times the gaps between arrivals, until stopped.
struct Probe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Probed>,
}

impl Probe {
    fn start(client: &Client, peer: &std::net::UdpSocket, relayed: SocketAddr) -> Probe {
        let sock = client.sock.try_clone().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let peer = peer.try_clone().unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Probed {
                sent: 0,
                received: 0,
                longest_gap: Duration::ZERO,
            };
            let mut last = Instant::now();
            let mut buf = [0u8; 1500];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peer.send_to(b"probe", relayed).unwrap();
                seen.sent += 1;
                let next = Instant::now() + Duration::from_millis(20);
                while Instant::now() < next {
                    if sock.recv_from(&mut buf).is_ok() {
                        seen.received += 1;
                        seen.longest_gap = seen.longest_gap.max(last.elapsed());
                        last = Instant::now();
                    }
                }
            }
            // The last ones in flight.
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            while seen.received < seen.sent && sock.recv_from(&mut buf).is_ok() {
                seen.received += 1;
            }
            seen
        });
        Probe { stop, thread }
    }

    fn finish(self) -> Probed {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Redis stops for 10 s while the nodes relay under load: nothing is lost
/// and nothing pauses, each node says so once, quotas are counted per
/// node meanwhile, and the shared counts are exact again once Redis is
/// back.
#[test]
fn a_redis_outage_under_load_loses_nothing_and_converges() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut fleet = Fleet::start("o", "user-quota=2", |_| String::new());
    let peer = peer(&fleet);
    let (mut a1, a1_relayed) = fleet.allocate_relayed(1, "alice");
    let _a2 = fleet.allocate(2, "alice").unwrap();
    assert_eq!(fleet.allocate(3, "alice").err(), Some(486));
    permit(&mut a1, "alice", a1_relayed, &peer);
    let probe = Probe::start(&a1, &peer, a1_relayed);

    // Load: turnbench relays 3000 packets/s each way between two
    // allocations of bob (his quota) on n3.
    let hub = fleet.hub.name.clone();
    let target = fleet.nodes[2].addr().to_string();
    let bench = std::thread::spawn(move || {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &hub, TURNBENCH, "run", &target])
            .args(["-u", "bob", "-w", "bobpw", "-n", "2", "-r", "3000"])
            .args(["-d", "16", "--json"]);
        run_with_timeout(&mut cmd, Duration::from_secs(60))
    });
    std::thread::sleep(Duration::from_secs(2));

    fleet.redis.stop();
    let stopped = Instant::now();
    for i in 1..=3 {
        fleet.wait_for("turn_fleet_up 0", Duration::from_secs(3), |f| {
            f.metric(i, "turn_fleet_up") == Some(0.0)
        });
        let (status, body) = fleet.http(i, "/health");
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("fleet: Redis unreachable"), "{body}");
    }
    // Quotas per node: alice has one on n1 and none on n3.
    let _a3 = fleet
        .allocate(3, "alice")
        .expect("alice on n3, counted locally");
    let _a4 = fleet.allocate(1, "alice").expect("alice's second on n1");
    assert_eq!(
        fleet.allocate(1, "alice").err(),
        Some(486),
        "n1's own count"
    );
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed()));

    fleet.redis.resume();
    let resumed = Instant::now();
    for i in 1..=3 {
        fleet.wait_for("turn_fleet_up 1", Duration::from_secs(5), |f| {
            f.metric(i, "turn_fleet_up") == Some(1.0)
        });
    }
    // The shared counts are the nodes' exact ones again.
    let key = format!("turnserver/quota/{REALM}/user/alice");
    fleet.wait_for("exact counts", Duration::from_secs(3), |f| {
        let text = f.redis.cli(&["hgetall", &key]);
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut pairs: Vec<String> = words.chunks(2).map(|p| p.join("=")).collect();
        pairs.sort();
        pairs == ["n1=2", "n2=1", "n3=1"]
    });
    eprintln!("converged {:?} after Redis returned", resumed.elapsed());
    for i in 1..=3 {
        assert_eq!(
            fleet.allocate(i, "alice").err(),
            Some(486),
            "fleet quota on n{i}"
        );
    }

    let (ok, out) = bench.join().unwrap();
    assert!(ok, "turnbench: {out}");
    let json = out.find('{').map_or("", |at| &out[at..]);
    let report: serde_json::Value = serde_json::Deserializer::from_str(json)
        .into_iter()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no report: {out}"));
    assert_eq!(report["allocations_ok"], 2, "{out}");
    assert_eq!(report["lost"], 0, "{out}");
    // Relaying never paused: no round trip took a quarter second.
    assert!(
        report["rtt_us"]["max"].as_f64().unwrap() < 250_000.0,
        "{out}"
    );
    let probed = probe.finish();
    eprintln!("probe through n1: {probed:?}; turnbench: {out}");
    assert_eq!(probed.received, probed.sent, "{probed:?}");
    assert!(
        probed.longest_gap < Duration::from_millis(200),
        "{probed:?}"
    );
    // Every allocation lives on.
    let r = a1.signed(
        method::REFRESH,
        &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
        "alice",
        "alicepw",
    );
    assert!(r.is_success(), "{:?}", r.code());
    for (i, n) in fleet.nodes.iter().enumerate() {
        let log = n.log();
        assert_eq!(
            log.matches("fleet: Redis unreachable").count(),
            1,
            "n{}:\n{log}",
            i + 1
        );
        assert_eq!(
            log.matches("fleet: Redis answers again").count(),
            1,
            "n{}:\n{log}",
            i + 1
        );
    }
    fleet.nodes.clear();
}

/// coturn's client between two allocations of alice (-y) through `to`,
/// run in the hub: every packet must arrive.
fn uclient_relays(fleet: &Fleet, to: SocketAddr) {
    let bin = require_tool(
        "turnutils_uclient",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &fleet.hub.name])
        .arg(bin)
        .args([
            "-y",
            "-u",
            "alice",
            "-w",
            "alicepw",
            "-p",
            &to.port().to_string(),
        ])
        .args(["-m", "1", "-n", "20", "-l", "170", &to.ip().to_string()]);
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    // "start_mclient: tot_send_msgs=80, tot_recv_msgs=80" at the end.
    let totals = out
        .lines()
        .filter_map(|l| l.split("start_mclient: tot_send_msgs=").nth(1))
        .filter_map(|t| t.split_once(", tot_recv_msgs="))
        .next_back()
        .map(|(sent, received)| (sent.trim().to_string(), received.trim().to_string()));
    assert!(
        out.contains("Total lost packets 0 (0.000000%)")
            && totals.is_some_and(|(sent, received)| sent == received && sent != "0"),
        "uclient through {to}:\n{out}\n{}",
        fleet.logs()
    );
}

/// Allocations node `i` has created so far (its log).
fn created(fleet: &Fleet, i: usize) -> usize {
    fleet.nodes[i - 1]
        .log()
        .matches("allocation created")
        .count()
}

/// A node above `redirect-above` sends new Allocates to the least-loaded
/// healthy node, and a draining one to any healthy node; coturn's client
/// follows the 300 and relays there.
#[test]
fn busy_and_draining_nodes_send_clients_to_healthy_ones() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 100 relay ports each: two allocations put n1 at 2 %.
    let fleet = Fleet::start("l", "", |i| {
        if i == 1 {
            "redirect-above=2".into()
        } else {
            String::new()
        }
    });
    let _held: Vec<Client> = (0..2).map(|_| fleet.allocate(1, "bob").unwrap()).collect();
    fleet.wait_for("n1 redirecting", Duration::from_secs(3), |f| {
        f.nodes[0].log().contains("fleet: new allocations go to")
    });
    let mut c = fleet.client(1);
    let r = c.allocate("carol", "carolpw");
    assert_eq!(r.code(), Some(300), "{}", fleet.logs());
    let alt = attr::decode_address(
        attr::ALTERNATE_SERVER,
        r.msg().get(attr::ALTERNATE_SERVER).unwrap(),
    )
    .unwrap();
    assert!(
        [fleet.nodes[1].addr(), fleet.nodes[2].addr()].contains(&alt),
        "redirected to {alt}"
    );
    let before = (created(&fleet, 1), created(&fleet, 2) + created(&fleet, 3));
    uclient_relays(&fleet, fleet.nodes[0].addr());
    assert_eq!(created(&fleet, 1), before.0, "n1 took the busy client");
    // uclient -y -m 1 makes four (RTP and RTCP for each end).
    assert_eq!(created(&fleet, 2) + created(&fleet, 3), before.1 + 4);

    // n2 drains: new clients go to n3 (n1 is above the line).
    fleet.nodes[1]
        .server()
        .signal(nix::sys::signal::Signal::SIGUSR1);
    fleet.wait_for("n2 redirecting", Duration::from_secs(3), |f| {
        f.nodes[1].log().contains(&format!(
            "fleet: new allocations go to 10.77.0.13:{PORT} (this node is draining)"
        ))
    });
    let before = (created(&fleet, 2), created(&fleet, 3));
    uclient_relays(&fleet, fleet.nodes[1].addr());
    assert_eq!(
        created(&fleet, 2),
        before.0,
        "the draining node took a client"
    );
    assert_eq!(created(&fleet, 3), before.1 + 4);
}

/// coturn's `alternate-server` list: every new Allocate gets 300 naming the
/// next server, and coturn's client relays through it.
#[test]
fn alternate_server_list_redirects_coturns_client() {
    let users = "realm=north.gov\nuser=alice:alicepw\n";
    let b = Server::start(Options::new(&format!("{users}allow-loopback-peers\n")));
    let a = Server::start(Options::new(&format!(
        "{users}alternate-server=127.0.0.1:{}\n",
        b.port
    )));
    let bin = require_tool(
        "turnutils_uclient",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let mut cmd = Command::new(bin);
    cmd.args([
        "-y",
        "-u",
        "alice",
        "-w",
        "alicepw",
        "-p",
        &a.port.to_string(),
    ])
    .args(["-m", "1", "-n", "20", "-l", "170", "127.0.0.1"]);
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(out.contains("Total lost packets 0 (0.000000%)"), "{out}");
    assert!(
        !a.log_text().contains("allocation created"),
        "{}",
        a.log_text()
    );
    assert_eq!(
        b.log_text().matches("allocation created").count(),
        4,
        "{}",
        b.log_text()
    );
}

/// A TURN REST credential for `secret`, valid for ten minutes.
fn rest(secret: &str) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let user = format!("{expiry}:rest-user");
    let pw = turnserver::auth::rest_password(secret.as_bytes(), &user);
    (user, pw)
}

/// Allocates with REST credentials on node `i`: the error code, if any.
fn allocate_rest(fleet: &Fleet, i: usize, (user, pw): &(String, String)) -> Option<u16> {
    let mut c = fleet.client(i);
    let r = c.allocate(user, pw);
    if r.is_success() {
        assert!(c.delete(user, pw).is_success());
        None
    } else {
        Some(r.code().unwrap_or(0))
    }
}

/// A REST secret deleted with turnadmin, or by another tool, is refused by
/// every node within a second, whatever the cache time; the other secret
/// keeps working.
#[test]
fn a_deleted_secret_is_refused_everywhere_within_a_second() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let fleet = Fleet::start("x", "use-auth-secret\nuserdb-cache-seconds=60", |_| {
        String::new()
    });
    for secret in ["old-secret", "new-secret", "third-secret"] {
        fleet.admin(&["-s", secret, "-r", REALM]);
    }
    let (old, new, third) = (rest("old-secret"), rest("new-secret"), rest("third-secret"));
    fleet.wait_for("the secrets", Duration::from_secs(2), |f| {
        (1..=3).all(|i| allocate_rest(f, i, &third).is_none())
    });
    for i in 1..=3 {
        assert_eq!(allocate_rest(&fleet, i, &old), None, "n{i}");
        assert_eq!(allocate_rest(&fleet, i, &new), None, "n{i}");
    }

    fleet.admin(&["-X", "old-secret", "-r", REALM]);
    let took = fleet.refused_everywhere("the old secret refused", |f, i| {
        allocate_rest(f, i, &old) == Some(401)
    });
    eprintln!("turnadmin -X refused on three nodes after {took:?}");

    // Another tool removes a secret from the set.
    fleet.redis.cli(&[
        "srem",
        &format!("turn/realm/{REALM}/secret"),
        "third-secret",
    ]);
    fleet.refused_everywhere("the third secret refused", |f, i| {
        allocate_rest(f, i, &third) == Some(401)
    });
    for i in 1..=3 {
        assert_eq!(allocate_rest(&fleet, i, &new), None, "n{i}");
    }
}

/// Two nodes under one name would count each other's allocations as
/// their own: the second to notice says so.
#[test]
fn two_nodes_with_one_name_are_told() {
    let redis = Redis::start();
    let conf = format!(
        "redis-userdb=\"{}\"\nrealm={REALM}\nnode-name=twin\n",
        redis.conninfo()
    );
    let a = Server::start(Options::new(&conf));
    let b = Server::start(Options::new(&conf));
    let deadline = Instant::now() + Duration::from_secs(5);
    let clash = "another node also calls itself 'twin'";
    while !(a.log_text().contains(clash) || b.log_text().contains(clash)) {
        assert!(
            Instant::now() < deadline,
            "no warning:\n{}\n{}",
            a.log_text(),
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
