//! Live takeover (`turnserver --takeover`): a new process takes the running
//! one's listeners, relay sockets and allocations over its control socket
//! while clients relay, and the old one exits 0; refused or interrupted
//! takeovers leave the old one serving; ten in a row leave descriptors and
//! memory flat.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    BIN, Client, Options, Server, TempDir, channel_bind_attrs, channel_data, free_ports, http_get,
    metric, open_fds, rss_kib, run_with_timeout,
};
use turnserver::server::takeover::{self, Msg};
use turnserver::stun::{attr, method};

const USER: &str = "alice";
const PASS: &str = "alicepw";

/// A server with a control socket, metrics and a pid file in `ctl`.
fn start(ctl: &TempDir, extra: &str) -> (Server, u16) {
    start_with(ctl, extra, false)
}

/// [`start`], with TLS (and DTLS) when `tls`.
fn start_with(ctl: &TempDir, extra: &str, tls: bool) -> (Server, u16) {
    start_env(ctl, extra, tls, &[])
}

/// [`start_with`], with environment variables.
fn start_env(ctl: &TempDir, extra: &str, tls: bool, env: &[(&str, &str)]) -> (Server, u16) {
    let metrics = free_ports(1);
    let opts = Options::new(&format!(
        "lt-cred-mech\nuser={USER}:{PASS}\nrealm=example.org\nallow-loopback-peers\n\
         control-socket={}\nprometheus\nprometheus-address=127.0.0.1\nprometheus-port={metrics}\n\
         pidfile={}\n{extra}",
        ctl.path("control.sock").display(),
        ctl.path("turnserver.pid").display(),
    ));
    let mut opts = if tls { opts.tls() } else { opts };
    for (k, v) in env {
        opts = opts.env(k, v);
    }
    let s = Server::start(opts);
    (s, metrics)
}

/// A UDP client with an allocation and channel 0x4001 bound to a peer
/// socket of the test's.
struct Flow {
    client: Client,
    peer: UdpSocket,
    relayed: SocketAddr,
}

impl Flow {
    fn new(server: &Server) -> Flow {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut client = Client::new(server.udp_addr());
        let r = client.allocate(USER, PASS);
        assert!(r.is_success(), "{:?}\n{}", r.code(), server.log_text());
        let relayed = r.relayed();
        let bind = channel_bind_attrs(0x4001, peer.local_addr().unwrap());
        let r = client.signed(method::CHANNEL_BIND, &bind, USER, PASS);
        assert!(r.is_success(), "{:?}", r.code());
        Flow {
            client,
            peer,
            relayed,
        }
    }

    /// Starts numbered traffic both ways: the client sends ChannelData
    /// every `gap`, the peer echoes each datagram back through the relay.
    fn run(&self, gap: Duration) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (c_send, c_recv) = (
            self.client.sock.try_clone().unwrap(),
            self.client.sock.try_clone().unwrap(),
        );
        let peer = self.peer.try_clone().unwrap();
        let server = self.client.server;
        let relayed = self.relayed;
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n: u32 = 0;
                while !stop.load(Ordering::Relaxed) {
                    let _ = c_send.send_to(&channel_data(0x4001, &n.to_be_bytes()), server);
                    n += 1;
                    std::thread::sleep(gap);
                }
                n
            })
        };
        let echo = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                peer.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut got = 0u32;
                let mut buf = [0u8; 64];
                loop {
                    match peer.recv_from(&mut buf) {
                        Ok((4, from)) if from == relayed => {
                            got += 1;
                            let _ = peer.send_to(&buf[..4], relayed);
                        }
                        Ok(_) => {}
                        Err(_) if stop.load(Ordering::Relaxed) => return got,
                        Err(_) => {}
                    }
                }
            })
        };
        let back = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                c_recv
                    .set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut got = 0u32;
                let mut buf = [0u8; 64];
                loop {
                    match c_recv.recv_from(&mut buf) {
                        Ok((8, _)) if buf[..4] == [0x40, 0x01, 0, 4] => got += 1,
                        Ok(_) => {}
                        Err(_) if stop.load(Ordering::Relaxed) => return got,
                        Err(_) => {}
                    }
                }
            })
        };
        Traffic {
            stop,
            sender,
            echo,
            back,
        }
    }
}

/// Traffic running through a [`Flow`].
struct Traffic {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<u32>,
    echo: JoinHandle<u32>,
    back: JoinHandle<u32>,
}

impl Traffic {
    /// Stops sending, lets the last datagrams arrive and returns (sent,
    /// reached the peer, came back).
    fn finish(self) -> (u32, u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().unwrap();
        (sent, self.echo.join().unwrap(), self.back.join().unwrap())
    }
}

fn metrics(port: u16) -> String {
    let (status, body) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/metrics");
    assert_eq!(status, 200);
    body
}

/// A signed Refresh for another 600 s.
fn refresh(c: &mut Client) -> common::Response {
    c.signed(
        method::REFRESH,
        &[(attr::LIFETIME, 600u32.to_be_bytes().to_vec())],
        USER,
        PASS,
    )
}

#[test]
fn udp_allocations_continue_across_a_takeover() {
    let ctl = TempDir::new("takeover");
    let (mut old, metrics_port) = start(&ctl, "");
    let mut flow = Flow::new(&old);
    let traffic = flow.run(Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(700));
    let before = metrics(metrics_port);
    let created = metric(&before, "turn_allocations_created_total").unwrap();

    let mut new = old.successor(&[]);
    let status = old.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(0)),
        "the old process exits 0:\n{}",
        old.log_text()
    );
    std::thread::sleep(Duration::from_millis(700));
    let (sent, reached, back) = traffic.finish();
    eprintln!("takeover under traffic: sent {sent}, reached the peer {reached}, came back {back}");
    assert!(sent > 1000, "{sent}");
    assert_eq!(
        (reached, back),
        (sent, sent),
        "no datagram lost across the takeover\n---- old ----\n{}\n---- new ----\n{}",
        old.log_text(),
        new.log_text()
    );
    let old_log = old.log_text();
    assert!(
        old_log.contains("takeover: handed 1 allocations and"),
        "{old_log}"
    );
    assert!(
        new.log_text().contains("serving 1 allocations handed over"),
        "{}",
        new.log_text()
    );
    assert!(new.alive());
    assert_eq!(
        std::fs::read_to_string(ctl.path("turnserver.pid"))
            .unwrap()
            .trim(),
        new.pid().to_string(),
        "the pid file names the new process"
    );

    // The allocation is the new process's: Refresh, CreatePermission and
    // ChannelBind work, with the nonce the old process issued.
    let c = &mut flow.client;
    let r = refresh(c);
    assert!(
        r.is_success(),
        "Refresh: {:?}\n{}",
        r.code(),
        new.log_text()
    );
    let other = UdpSocket::bind("127.0.0.2:0").unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let r = c.signed_peer(
        method::CREATE_PERMISSION,
        &[],
        other.local_addr().unwrap(),
        USER,
        PASS,
    );
    assert!(r.is_success(), "CreatePermission: {:?}", r.code());
    let bind = channel_bind_attrs(0x4002, other.local_addr().unwrap());
    let r = c.signed(method::CHANNEL_BIND, &bind, USER, PASS);
    assert!(r.is_success(), "ChannelBind: {:?}", r.code());
    c.sock
        .send_to(&channel_data(0x4002, b"after"), c.server)
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = other.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"after"[..], flow.relayed));

    // Counters carry over: what the old process counted is still counted
    // (workers report every second).
    std::thread::sleep(Duration::from_millis(1100));
    let after = metrics(metrics_port);
    assert!(
        metric(&after, "turn_allocations_created_total").unwrap() >= created,
        "{after}"
    );
    assert_eq!(
        metric(&after, "turn_allocations{transport=\"udp\"}"),
        Some(1.0),
        "{after}"
    );
    let relayed = metric(&after, "turn_relayed_packets_total{direction=\"to_peer\"}").unwrap();
    assert!(relayed >= f64::from(sent), "{relayed} < {sent}\n{after}");
    assert!(c.delete(USER, PASS).is_success());
    assert_eq!(new.stop().code(), Some(0));
}

/// Speaks the control protocol as a successor would, to drive the running
/// server into the cases a real successor rarely shows.
fn hello(path: &std::path::Path, reads: Vec<u32>) -> (takeover::Conn, Msg) {
    let conn = takeover::connect(path).unwrap();
    conn.send(&Msg::Hello {
        version: "test".into(),
        reads,
    })
    .unwrap();
    let answer = conn.recv().unwrap();
    (conn, answer)
}

#[test]
fn refused_or_interrupted_takeovers_leave_the_old_server_serving() {
    let ctl = TempDir::new("takeover");
    let (mut old, _) = start(&ctl, "drain-timeout=1");
    let path = ctl.path("control.sock");
    let meta = std::fs::metadata(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let flow = Flow::new(&old);
    let traffic = flow.run(Duration::from_millis(2));

    // A successor that reads only a newer state format is refused.
    let (_, answer) = hello(&path, vec![99]);
    match answer {
        Msg::Refused { reason } => assert!(reason.contains("drain instead"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // A successor killed after receiving the state (it never says Ready):
    // the old process reads everything again.
    let (conn, header) = hello(&path, takeover::READS.to_vec());
    let (state, fds) = conn.recv_state(&header).unwrap();
    assert_eq!(
        state.workers.iter().map(|w| w.relays.len()).sum::<usize>(),
        1
    );
    assert!(!fds.is_empty());
    drop((conn, fds));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !old.log_text().contains("takeover failed") {
        assert!(Instant::now() < deadline, "{}", old.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // A control socket other users could write to is not trusted.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let conf = old.dir.path("turnserver.conf");
    let mut cmd = Command::new(BIN);
    cmd.args(["-c", conf.to_str().unwrap(), "--takeover"]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(20));
    assert!(!ok, "the successor fails:\n{out}");
    assert!(out.contains("has mode 666"), "{out}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::thread::sleep(Duration::from_millis(300));
    let (sent, reached, back) = traffic.finish();
    eprintln!("refusals under traffic: sent {sent}, reached {reached}, came back {back}");
    assert_eq!((reached, back), (sent, sent), "{}", old.log_text());
    assert!(old.alive());
    // And it still takes new allocations.
    let mut c = Client::new(old.udp_addr());
    assert!(c.allocate(USER, PASS).is_success());
    assert_eq!(old.stop().code(), Some(0));
    assert!(!path.exists(), "the control socket is removed at exit");
}

#[test]
fn ten_takeovers_in_a_row_leave_descriptors_and_memory_flat() {
    let ctl = TempDir::new("takeover");
    let (first, _) = start(&ctl, "");
    let flows: Vec<Flow> = (0..20).map(|_| Flow::new(&first)).collect();
    let traffic: Vec<Traffic> = flows
        .iter()
        .map(|f| f.run(Duration::from_millis(5)))
        .collect();
    let mut servers = vec![first];
    let mut samples = Vec::new();
    for round in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        let next = servers.last().unwrap().successor(&[]);
        let old = servers.last_mut().unwrap();
        let st = old.wait_exit(Duration::from_secs(10));
        assert_eq!(
            st.and_then(|s| s.code()),
            Some(0),
            "round {round}:\n{}",
            old.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
        samples.push((open_fds(next.pid()), rss_kib(next.pid())));
        servers.push(next);
    }
    let mut lost = 0;
    for t in traffic {
        let (sent, reached, back) = t.finish();
        lost += (sent - reached) + (reached - back);
    }
    eprintln!("descriptors and RSS (KiB) after each takeover: {samples:?}; lost {lost}");
    assert_eq!(lost, 0, "{}", servers.last().unwrap().log_text());
    let (fds2, rss2) = samples[1];
    let (fds10, rss10) = samples[9];
    assert_eq!(fds10, fds2, "descriptors stay flat: {samples:?}");
    assert!(
        rss10 < rss2 + rss2 / 4 + 2048,
        "memory stays flat: {samples:?}"
    );
}

/// uclient's arguments for `n` messages per client over `transport`
/// ("udp", "tcp" or "tls") to the echo peer on `peer_port`.
fn uclient_args(s: &Server, transport: &str, peer_port: u16, clients: u32, n: u32) -> Vec<String> {
    let mut a: Vec<String> = match transport {
        "udp" => vec![],
        "tcp" => vec!["-t".into()],
        _ => vec!["-t".into(), "-S".into()],
    };
    let port = if transport == "tls" {
        s.tls_port
    } else {
        s.port
    };
    for x in [
        "-u",
        USER,
        "-w",
        PASS,
        "-e",
        "127.0.0.1",
        "-r",
        &peer_port.to_string(),
        "-p",
        &port.to_string(),
        "-m",
        &clients.to_string(),
        "-n",
        &n.to_string(),
        "-l",
        "170",
        "-z",
        "5",
    ] {
        a.push(x.to_string());
    }
    a
}

/// Runs uclient on a thread; it asserts zero loss ([`run_uclient`]).
fn uclient_thread(args: Vec<String>, min: u64, log: std::path::PathBuf) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run_uclient(&a, "127.0.0.1", min, &|| {
            std::fs::read_to_string(&log).unwrap_or_default()
        })
    })
}

#[test]
fn uclient_and_chromium_relay_through_a_takeover() {
    let ctl = TempDir::new("takeover");
    let (mut old, _) = start_with(&ctl, "fingerprint", true);
    let (_peer, pport) = common::turnutils_peer("127.0.0.1");
    // UDP channels, TCP and TLS clients, all sending for about 5 s.
    let runs: Vec<(&str, JoinHandle<String>)> =
        [("udp", 4, 1000), ("tcp", 2, 800), ("tls", 2, 800)]
            .into_iter()
            .map(|(t, clients, n)| {
                let args = uclient_args(&old, t, pport, clients, n);
                (
                    t,
                    uclient_thread(args, u64::from(clients * n), old.log.clone()),
                )
            })
            .collect();
    // A Chromium data channel relayed over TURN/UDP, a message each way
    // every 40 ms for 6 s.
    let mut cmd = common::webrtc_relay();
    cmd.args([
        "--turn",
        &format!("turn:127.0.0.1:{}?transport=udp", old.port),
        "--username",
        USER,
        "--credential",
        PASS,
        "--messages",
        "150",
        "--gap-ms",
        "40",
        "--timeout-ms",
        "60000",
    ]);
    let browser = std::thread::spawn(move || run_with_timeout(&mut cmd, Duration::from_secs(90)));
    // Take over once the browser relays (its allocations exist) and the
    // clients are mid-run.
    let deadline = Instant::now() + Duration::from_secs(30);
    while old
        .log_text()
        .matches("allocation created five_tuple=udp")
        .count()
        < 6
    {
        assert!(Instant::now() < deadline, "{}", old.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let mut new = old.successor(&[]);
    for (t, run) in runs {
        let out = run
            .join()
            .unwrap_or_else(|_| panic!("uclient over {t} failed"));
        let lost = out
            .lines()
            .find(|l| l.contains("Total lost packets"))
            .unwrap();
        eprintln!("uclient over {t} through the takeover: {lost}");
    }
    let (ok, out) = browser.join().unwrap();
    assert!(
        ok,
        "Chromium's relay failed:\n{out}\n---- old ----\n{}\n---- new ----\n{}",
        old.log_text(),
        new.log_text()
    );
    assert!(
        out.contains("\"ok\":true") && out.contains("\"relayProtocol\":\"udp\""),
        "{out}"
    );
    // The old process exits 0 once its TCP/TLS clients are done.
    let st = old.wait_exit(Duration::from_secs(40));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", old.log_text());
    let log = old.log_text();
    let handed = log
        .lines()
        .find(|l| l.contains("takeover: handed"))
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("{handed}");
    // The new process serves every transport afterwards.
    for (t, clients, n) in [("udp", 2, 50), ("tcp", 1, 50), ("tls", 1, 50)] {
        let args = uclient_args(&new, t, pport, clients, n);
        uclient_thread(args, u64::from(clients * n), new.log.clone())
            .join()
            .unwrap_or_else(|_| panic!("uclient over {t} after the takeover failed"));
    }
    new.stop();
}

/// What a process of the service sent to its NOTIFY_SOCKET: the
/// descriptors stored (by name) and the names removed, as systemd's file
/// descriptor store keeps them.
#[derive(Default)]
struct FdStore {
    stored: Vec<(String, std::os::fd::OwnedFd)>,
    removed: Vec<String>,
}

/// Plays systemd's notification socket at `path` until `stop`.
fn notify_socket(path: &std::path::Path, stop: Arc<AtomicBool>) -> JoinHandle<FdStore> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::io::IoSliceMut;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    let sock = std::os::unix::net::UnixDatagram::bind(path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    std::thread::spawn(move || {
        let mut store = FdStore::default();
        let mut buf = vec![0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 16]);
        loop {
            let (text, fds) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                match recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => {
                        let mut fds = Vec::new();
                        for c in m.cmsgs().unwrap() {
                            if let ControlMessageOwned::ScmRights(raw) = c {
                                // SAFETY: just received, owned by nobody else.
                                fds.extend(
                                    raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }),
                                );
                            }
                        }
                        (m.bytes, fds)
                    }
                    Err(_) if stop.load(Ordering::Relaxed) => return store,
                    Err(_) => continue,
                }
            };
            let text = String::from_utf8_lossy(&buf[..text]).to_string();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if text.lines().any(|l| l == "FDSTORE=1") {
                for fd in fds {
                    store.stored.push((name.clone(), fd));
                }
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                store.removed.push(name);
            }
        }
    })
}

#[test]
fn systemctl_restart_keeps_allocations_through_the_file_descriptor_store() {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let ctl = TempDir::new("fdstore");
    let notify_path = ctl.path("notify.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let collector = notify_socket(&notify_path, stop.clone());
    let notify = notify_path.display().to_string();
    // systemd passes FileDescriptorStoreMax= as $FDSTORE.
    let env = [("NOTIFY_SOCKET", notify.as_str()), ("FDSTORE", "1024")];
    let (mut old, metrics_port) = start_env(&ctl, "", false, &env);
    let mut flow = Flow::new(&old);
    let traffic = flow.run(Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(500));

    // systemctl restart: SIGTERM, then the next process gets the store.
    old.signal(nix::sys::signal::Signal::SIGTERM);
    let st = old.wait_exit(Duration::from_secs(5));
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{}", old.log_text());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let stored = collector.join().unwrap().stored;
    let names: Vec<String> = stored.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("turnserver-state"),
        "{names:?}"
    );
    eprintln!("{} descriptors in the store: {names:?}", names.len());

    // Start the next process the way systemd does: the stored descriptors
    // from fd 3 on, LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (set by a
    // shell that then execs the server, keeping its pid).
    let stop = Arc::new(AtomicBool::new(false));
    let _ = std::fs::remove_file(&notify_path);
    let collector = notify_socket(&notify_path, stop.clone());
    let high: Vec<OwnedFd> = stored
        .iter()
        .map(|(_, fd)| {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(1000)).map(|f| {
                // SAFETY: fcntl returned a new descriptor we own.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(f) }
            })
        })
        .collect::<Result<_, _>>()
        .unwrap();
    let raw: Vec<i32> = high.iter().map(AsRawFd::as_raw_fd).collect();
    let dir = TempDir::new("restarted");
    let conf = dir.path("turnserver.conf");
    std::fs::copy(old.dir.path("turnserver.conf"), &conf).unwrap();
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "LISTEN_PID=$$ exec \"$0\" \"$@\"",
        BIN,
        "-c",
        conf.to_str().unwrap(),
    ])
    .env("LISTEN_FDS", raw.len().to_string())
    .env("LISTEN_FDNAMES", names.join(":"))
    .env("NOTIFY_SOCKET", &notify)
    .env("FDSTORE", "1024");
    // SAFETY: dup2 is async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in raw.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut new = Server::launch_cmd(cmd, old.port, old.tls_port, dir);
    // Like systemd, the test's copies stay open until the service has
    // taken them.
    drop((high, stored));
    std::thread::sleep(Duration::from_millis(500));
    let (sent, reached, back) = traffic.finish();
    eprintln!("restart through the store: sent {sent}, reached {reached}, came back {back}");
    assert_eq!(
        (reached, back),
        (sent, sent),
        "---- old ----\n{}\n---- new ----\n{}",
        old.log_text(),
        new.log_text()
    );
    stop.store(true, Ordering::Relaxed);
    let removed = collector.join().unwrap().removed;
    let mut expected = names.clone();
    expected.sort();
    let mut removed_sorted = removed.clone();
    removed_sorted.sort();
    assert_eq!(
        removed_sorted, expected,
        "the new process empties the store"
    );
    let log = new.log_text();
    assert!(log.contains("serving 1 allocations handed over"), "{log}");
    let c = &mut flow.client;
    let r = refresh(c);
    assert!(
        r.is_success(),
        "Refresh after the restart: {:?}\n{log}",
        r.code()
    );
    let m = metrics(metrics_port);
    assert_eq!(
        metric(&m, "turn_allocations{transport=\"udp\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(c.delete(USER, PASS).is_success());
    assert_eq!(new.stop().code(), Some(0));
}

#[test]
fn a_successor_with_another_configuration_applies_it() {
    let ctl = TempDir::new("takeover");
    let removed = free_ports(1);
    let (mut old, _) = start(
        &ctl,
        &format!("relay-threads=2\nalt-listening-port={removed}"),
    );
    let mut flow = Flow::new(&old);
    // A client on the listener the new configuration drops.
    let removed_addr = SocketAddr::from(([127, 0, 0, 1], removed));
    let mut gone = Client::new(removed_addr);
    assert!(gone.allocate(USER, PASS).is_success());
    let traffic = flow.run(Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(300));

    // Three workers instead of two, and a new listener instead of the
    // removed one.
    let added = free_ports(1);
    let mut new = old.successor_with(&format!("relay-threads=3\nalt-listening-port={added}"), &[]);
    assert_eq!(
        old.wait_exit(Duration::from_secs(10))
            .and_then(|s| s.code()),
        Some(0),
        "{}",
        old.log_text()
    );
    std::thread::sleep(Duration::from_millis(500));
    let (sent, reached, back) = traffic.finish();
    assert_eq!((reached, back), (sent, sent), "{}", new.log_text());
    let log = new.log_text();
    assert!(log.contains("3 worker threads running"), "{log}");
    assert!(
        log.contains(&format!(
            "udp 127.0.0.1:{removed} is no longer configured: closed"
        )),
        "{log}"
    );
    assert!(
        log.contains("takeover: 1 allocations were on listeners no longer configured and end"),
        "{log}"
    );
    assert!(log.contains("serving 1 allocations handed over"), "{log}");
    // The moved allocation answers on its listener.
    let r = refresh(&mut flow.client);
    assert!(r.is_success(), "{:?}\n{log}", r.code());
    // The removed listener is closed; the added one serves.
    gone.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let _ = gone
        .sock
        .send_to(&common::binding_request([1; 12]), removed_addr);
    let mut buf = [0u8; 1500];
    assert!(
        gone.sock.recv_from(&mut buf).is_err(),
        "the removed listener answered"
    );
    let mut fresh = Client::new(SocketAddr::from(([127, 0, 0, 1], added)));
    assert!(
        fresh.allocate(USER, PASS).is_success(),
        "{}",
        new.log_text()
    );
    assert!(fresh.delete(USER, PASS).is_success());
    assert!(flow.client.delete(USER, PASS).is_success());
    assert_eq!(new.stop().code(), Some(0));
}

#[test]
fn an_even_port_reservation_survives_a_takeover() {
    let ctl = TempDir::new("takeover");
    let (old, _) = start(&ctl, "");
    // RTP: an even port, the next one reserved for RTCP (RFC 8656 §7.2).
    let mut rtp = Client::new(old.udp_addr());
    let r = rtp.allocate_with(&[(attr::EVEN_PORT, vec![0x80])], USER, PASS);
    assert!(r.is_success(), "{:?}", r.code());
    let token = r.msg().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    let rtp_port = r.relayed().port();
    assert_eq!(rtp_port % 2, 0);
    let mut new = old.successor(&[]);
    // The RTCP allocation claims the reservation from the new process.
    let mut rtcp = Client::new(new.udp_addr());
    let r = rtcp.allocate_with(&[(attr::RESERVATION_TOKEN, token)], USER, PASS);
    assert!(r.is_success(), "{:?}\n{}", r.code(), new.log_text());
    assert_eq!(r.relayed().port(), rtp_port + 1);
    assert!(rtp.delete(USER, PASS).is_success());
    assert!(rtcp.delete(USER, PASS).is_success());
    assert_eq!(new.stop().code(), Some(0));
}

#[test]
fn a_tcp_client_moves_with_a_frame_cut_across_the_switch() {
    use std::io::Write;
    let ctl = TempDir::new("takeover");
    let (mut old, _) = start(&ctl, "");
    let mut c = common::StreamClient::tcp(old.udp_addr());
    let r = c.allocate(USER, PASS);
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let bind = channel_bind_attrs(0x4001, peer.local_addr().unwrap());
    assert!(
        c.signed(method::CHANNEL_BIND, &bind, USER, PASS)
            .is_success()
    );
    // Half of a ChannelData frame reaches the old process before the
    // takeover, the rest the new one.
    let mut frame = channel_data(0x4001, b"split across two processes");
    // Over a stream ChannelData is padded to 4 bytes (RFC 8656 §12.5).
    frame.resize(frame.len().next_multiple_of(4), 0);
    c.stream.write_all(&frame[..9]).unwrap();
    c.stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut new = old.successor(&[]);
    c.stream.write_all(&frame[9..]).unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"split across two processes"[..], relayed),
        "{}",
        new.log_text()
    );
    // The old process had nothing left to drain: it exits at once.
    assert_eq!(
        old.wait_exit(Duration::from_secs(5)).and_then(|s| s.code()),
        Some(0),
        "{}",
        old.log_text()
    );
    assert!(
        old.log_text().contains("0 allocations of TLS clients stay"),
        "{}",
        old.log_text()
    );
    // Both ways, and requests, on the same connection.
    peer.send_to(b"back", relayed).unwrap();
    match c.read_frame().unwrap() {
        common::Frame::ChannelData(0x4001, data) => assert_eq!(data, b"back"),
        _ => panic!("expected ChannelData"),
    }
    let r = c.signed(
        method::REFRESH,
        &[(attr::LIFETIME, vec![0, 0, 0, 0])],
        USER,
        PASS,
    );
    assert!(r.is_success(), "{:?}", r.code());
    assert_eq!(new.stop().code(), Some(0));
}

#[test]
fn fewer_workers_merge_the_allocations_of_several() {
    let ctl = TempDir::new("takeover");
    // With mobility, UDP steering is off: the kernel spreads the clients
    // over both workers.
    let (old, metrics_port) = start(&ctl, "relay-threads=2\nmobility");
    let mut flows: Vec<Flow> = (0..12).map(|_| Flow::new(&old)).collect();
    let traffic: Vec<Traffic> = flows
        .iter()
        .map(|f| f.run(Duration::from_millis(5)))
        .collect();
    // Workers report every second.
    std::thread::sleep(Duration::from_millis(1100));
    let m = metrics(metrics_port);
    for w in ["0", "1"] {
        let n = metric(&m, &format!("turn_worker_allocations{{worker=\"{w}\"}}")).unwrap();
        assert!(n > 0.0, "worker {w} has none:\n{m}");
    }
    let mut new = old.successor_with("relay-threads=1", &[]);
    std::thread::sleep(Duration::from_millis(500));
    for t in traffic {
        let (sent, reached, back) = t.finish();
        assert_eq!((reached, back), (sent, sent), "{}", new.log_text());
    }
    let log = new.log_text();
    assert!(log.contains("1 worker threads running"), "{log}");
    assert!(log.contains("serving 12 allocations handed over"), "{log}");
    for f in &mut flows {
        let r = f.client.signed(
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 0, 0])],
            USER,
            PASS,
        );
        assert!(r.is_success(), "{:?}\n{log}", r.code());
    }
    assert_eq!(new.stop().code(), Some(0));
}
