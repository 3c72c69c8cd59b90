//! Shared helpers for integration tests: start the real `turnserver` binary
//! on loopback with free ports, a minimal STUN client, test certificates,
//! and checks for the external tools a test needs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use turnserver::auth::long_term_key;
use turnserver::stun::{Class, Message, MessageWriter, attr, method};

/// Path of the binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_turnserver");

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "turnserver-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `n` consecutive ports free for both UDP and TCP on 127.0.0.1, below the
/// kernel's ephemeral range (32768+) so clients' own sockets cannot take them.
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..500 {
        let base = rand_range(20000, 32000 - n);
        let ok = (base..base + n).all(|p| {
            UdpSocket::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p)).is_ok()
        });
        if ok {
            return base;
        }
    }
    panic!("no free ports");
}

/// A relay port range of `len` ports above the ephemeral range (61000+).
pub fn relay_range(len: u16) -> (u16, u16) {
    let base = rand_range(61000, 65535 - len);
    (base, base + len - 1)
}

fn rand_range(lo: u16, hi: u16) -> u16 {
    // Good enough spread for tests without pulling in a RNG here.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    static SALT: AtomicU32 = AtomicU32::new(0x9E37_79B9);
    let s = SALT.fetch_add(0x6D2B_79F5, Ordering::SeqCst);
    let x = (t ^ s ^ (std::process::id() << 16)).wrapping_mul(2_654_435_761);
    lo + (x % u32::from(hi - lo)) as u16
}

/// Where tests/run-all.sh unpacks coturn's client tools (turnutils_*),
/// without installing coturn's package, which would own
/// /usr/bin/turnserver.
pub const COTURN_TOOLS: &str = "/opt/coturn-tools/usr/bin";

/// Finds a tool on PATH or in [`COTURN_TOOLS`]; fails loudly when missing.
pub fn require_tool(name: &str, package_hint: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from(COTURN_TOOLS)])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("{name} is not installed: {package_hint} (the README's test command installs it)")
    })
}

/// Writes a self-signed certificate for localhost/127.0.0.1 and its key.
pub fn write_test_cert(dir: &TempDir) -> (PathBuf, PathBuf) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = dir.path("cert.pem");
    let key = dir.path("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A running `turnserver`, killed on drop.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub tls_port: u16,
    pub log: PathBuf,
    pub dir: TempDir,
    /// The generated part of the config file (ports, TLS files).
    preamble: String,
}

/// How to start a server.
pub struct Options {
    /// Lines for the config file (listening ports and log are added).
    pub config: String,
    /// Extra command-line arguments.
    pub args: Vec<String>,
    pub tls: bool,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// A soft limit on open files (`RLIMIT_NOFILE`) for the server process,
    /// as a shell's `ulimit -Sn` sets it; the hard limit stays.
    pub open_files: Option<u64>,
}

impl Options {
    pub fn new(config: &str) -> Options {
        Options {
            config: config.to_string(),
            args: Vec::new(),
            tls: false,
            env: Vec::new(),
            open_files: None,
        }
    }

    pub fn tls(mut self) -> Options {
        self.tls = true;
        self
    }

    pub fn arg(mut self, a: &str) -> Options {
        self.args.push(a.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Options {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    /// Starts the server with a soft open files limit of `n`.
    pub fn open_files(mut self, n: u64) -> Options {
        self.open_files = Some(n);
        self
    }
}

impl Server {
    /// The line number in the config file of line `n` (from 1) of the
    /// test's own `Options::config`, after the generated preamble.
    pub fn config_line(&self, n: usize) -> usize {
        self.preamble.lines().count() + n
    }

    /// Starts the binary on 127.0.0.1 with free ports and waits until it
    /// answers a Binding request.
    pub fn start(opts: Options) -> Server {
        let dir = TempDir::new("server");
        let base = free_ports(2);
        let (port, tls_port) = (base, base + 1);
        let (min, max) = relay_range(300);
        let mut preamble = format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\ntls-listening-port={tls_port}\nmin-port={min}\nmax-port={max}\n"
        );
        if opts.tls {
            let (cert, key) = write_test_cert(&dir);
            preamble.push_str(&format!(
                "cert={}\npkey={}\n",
                cert.display(),
                key.display()
            ));
        } else {
            preamble.push_str("no-tls\n");
        }
        let conf_path = dir.path("turnserver.conf");
        std::fs::write(&conf_path, format!("{preamble}{}\n", opts.config)).unwrap();
        let mut args = vec!["-c".to_string(), conf_path.display().to_string()];
        args.extend(opts.args);
        let mut s = Server::launch_env(args, port, tls_port, dir, &opts.env, opts.open_files);
        s.preamble = preamble;
        s
    }

    /// Rewrites the config file: the same ports and TLS files, then `config`.
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(
            self.dir.path("turnserver.conf"),
            format!("{}{config}\n", self.preamble),
        )
        .unwrap();
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the binary with exactly `args` and waits until it answers a
    /// Binding request on 127.0.0.1:`port`.
    pub fn launch(args: Vec<String>, port: u16, tls_port: u16, dir: TempDir) -> Server {
        Server::launch_env(args, port, tls_port, dir, &[], None)
    }

    fn launch_env(
        args: Vec<String>,
        port: u16,
        tls_port: u16,
        dir: TempDir,
        env: &[(String, String)],
        open_files: Option<u64>,
    ) -> Server {
        let log = dir.path("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(&args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
        if let Some(soft) = open_files {
            use nix::sys::resource::{Resource, getrlimit, setrlimit};
            use std::os::unix::process::CommandExt;
            let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
            assert!(soft < hard, "the hard limit {hard} is not above {soft}");
            // SAFETY: setrlimit is async-signal-safe; the closure allocates
            // nothing.
            unsafe {
                cmd.pre_exec(move || {
                    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)
                });
            }
        }
        let child = cmd.spawn().expect("start turnserver");
        let mut s = Server {
            child: Some(child),
            port,
            tls_port,
            log,
            dir,
            preamble: String::new(),
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        if std::fs::read_to_string(self.dir.path("turnserver.conf"))
            .is_ok_and(|c| c.lines().any(|l| l == "no-udp" || l == "no-stun"))
        {
            return self.wait_ready_tcp();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "turnserver exited with {status} before it was ready:\n{}",
                    self.log_text()
                );
            }
            let req = binding_request([7; 12]);
            sock.send_to(&req, self.udp_addr()).unwrap();
            let mut buf = [0u8; 1500];
            if let Ok((n, _)) = sock.recv_from(&mut buf)
                && Message::parse(&buf[..n]).is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "turnserver did not answer:\n{}",
                self.log_text()
            );
        }
    }

    fn wait_ready_tcp(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "turnserver exited with {status} before it was ready:\n{}",
                    self.log_text()
                );
            }
            if TcpStream::connect(self.udp_addr()).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "turnserver did not listen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn udp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Stops with SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- turnserver log ----\n{}", self.log_text());
        }
    }
}

/// A Binding request.
pub fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut out = Vec::new();
    MessageWriter::new(&mut out, method::BINDING, Class::Request, &tid).fingerprint();
    out
}

/// A small STUN/TURN client over UDP for protocol-level tests.
pub struct Client {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub realm: String,
    pub nonce: Vec<u8>,
    tid: u8,
}

/// A response: class and error code, with the raw bytes.
pub struct Response {
    pub raw: Vec<u8>,
}

impl Response {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).unwrap()
    }
    pub fn code(&self) -> Option<u16> {
        self.msg()
            .get(attr::ERROR_CODE)
            .map(|v| attr::decode_error_code(v).unwrap().0)
    }
    pub fn is_success(&self) -> bool {
        self.msg().class() == Class::Success
    }
    /// XOR-RELAYED-ADDRESS of an Allocate success (panics without one).
    pub fn relayed(&self) -> SocketAddr {
        self.msg()
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    }
}

impl Client {
    pub fn new(server: SocketAddr) -> Client {
        let local = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        Client::bound(local.parse().unwrap(), server)
    }

    /// A client on a socket bound to `local` (in the namespace of the
    /// calling thread).
    pub fn bound(local: SocketAddr, server: SocketAddr) -> Client {
        let sock = UdpSocket::bind(local).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Client {
            sock,
            server,
            realm: String::new(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid = self.tid.wrapping_add(1);
        let mut t = [self.tid; 12];
        t[0] = 0xA5;
        t
    }

    /// Sends a request and waits for the response with its transaction ID,
    /// retransmitting a few times.
    pub fn transact(&mut self, req: &[u8]) -> Response {
        let tid: [u8; 12] = req[8..20].try_into().unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..6 {
            self.sock.send_to(req, self.server).unwrap();
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if let Ok((n, _)) = self.sock.recv_from(&mut buf)
                    && n >= 20
                    && buf[8..20] == tid
                {
                    return Response {
                        raw: buf[..n].to_vec(),
                    };
                }
            }
        }
        panic!("no response from {}", self.server);
    }

    /// Builds a request: `attrs`, then credentials if given.
    pub fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        creds: Option<(&str, &str)>,
    ) -> Vec<u8> {
        let tid = self.next_tid();
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, m, Class::Request, &tid);
        for (t, v) in attrs {
            w.attr(*t, v);
        }
        if let Some((user, pw)) = creds {
            w.attr(attr::USERNAME, user.as_bytes())
                .attr(attr::REALM, self.realm.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity(&long_term_key(user, &self.realm, pw));
        }
        w.fingerprint();
        out
    }

    /// An Allocate for UDP with credentials, doing the 401 round trip first.
    pub fn allocate(&mut self, user: &str, pw: &str) -> Response {
        let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        let req = self.request(method::ALLOCATE, &attrs, None);
        let challenge = self.transact(&req);
        assert_eq!(challenge.code(), Some(401), "expected a 401 challenge");
        self.realm = challenge
            .msg()
            .text(attr::REALM)
            .unwrap()
            .unwrap()
            .to_string();
        self.nonce = challenge.msg().get(attr::NONCE).unwrap().to_vec();
        let req = self.request(method::ALLOCATE, &attrs, Some((user, pw)));
        self.transact(&req)
    }

    /// A signed request carrying XOR-PEER-ADDRESS `peer` (encoded with the
    /// request's transaction ID, which IPv6 addresses need) after `attrs`.
    pub fn signed_peer(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        peer: SocketAddr,
        user: &str,
        pw: &str,
    ) -> Response {
        let tid = self.next_tid();
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, m, Class::Request, &tid);
        for (t, v) in attrs {
            w.attr(*t, v);
        }
        w.xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::USERNAME, user.as_bytes())
            .attr(attr::REALM, self.realm.as_bytes())
            .attr(attr::NONCE, &self.nonce)
            .integrity(&long_term_key(user, &self.realm, pw))
            .fingerprint();
        self.transact(&out)
    }

    /// An Allocate with extra attributes (after a 401 round trip).
    pub fn allocate_with(&mut self, extra: &[(u16, Vec<u8>)], user: &str, pw: &str) -> Response {
        let mut attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        attrs.extend_from_slice(extra);
        let req = self.request(method::ALLOCATE, &attrs, None);
        let challenge = self.transact(&req);
        assert_eq!(challenge.code(), Some(401), "expected a 401 challenge");
        self.realm = challenge
            .msg()
            .text(attr::REALM)
            .unwrap()
            .unwrap()
            .to_string();
        self.nonce = challenge.msg().get(attr::NONCE).unwrap().to_vec();
        let req = self.request(method::ALLOCATE, &attrs, Some((user, pw)));
        self.transact(&req)
    }

    /// A signed request on an existing allocation.
    pub fn signed(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], user: &str, pw: &str) -> Response {
        let req = self.request(m, attrs, Some((user, pw)));
        self.transact(&req)
    }

    /// Deletes the allocation: a signed Refresh with LIFETIME 0 (RFC 8656
    /// §7.3).
    pub fn delete(&mut self, user: &str, pw: &str) -> Response {
        self.signed(
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 0, 0])],
            user,
            pw,
        )
    }
}

/// Sends `datagrams` (all of one size but the last, which may be shorter)
/// to `to` as one UDP GSO send, as a sender that batches does: a receiver
/// with UDP_GRO on gets them in one receive, any other one by one.
pub fn send_gso(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
    use std::os::fd::AsRawFd;
    let segment = datagrams[0].len() as u16;
    let iov: Vec<std::io::IoSlice<'_>> =
        datagrams.iter().map(|d| std::io::IoSlice::new(d)).collect();
    let addr = SockaddrStorage::from(to);
    let n = sendmsg(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        Some(&addr),
    )
    .expect("GSO send");
    assert_eq!(n, datagrams.iter().map(Vec::len).sum::<usize>());
}

/// The attributes of a ChannelBind of channel `number` to `peer`.
pub fn channel_bind_attrs(number: u16, peer: SocketAddr) -> Vec<(u16, Vec<u8>)> {
    vec![
        (
            attr::CHANNEL_NUMBER,
            vec![(number >> 8) as u8, number as u8, 0, 0],
        ),
        (attr::XOR_PEER_ADDRESS, xor_peer(peer, &[0; 12])),
    ]
}

/// A ChannelData message on channel `number` carrying `payload`, unpadded
/// (as over UDP).
pub fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(number >> 8) as u8, number as u8, (n >> 8) as u8, n as u8];
    f.extend_from_slice(payload);
    f
}

/// A packetised video frame: 24 datagrams, 23 of 1100 bytes and a last of
/// 77, the i-th filled with `i`.
pub fn frame_burst() -> Vec<Vec<u8>> {
    (0..24)
        .map(|i| vec![i as u8; if i == 23 { 77 } else { 1100 }])
        .collect()
}

/// Sends each of `datagrams` to `to` as a datagram of its own.
pub fn send_each(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    for d in datagrams {
        sock.send_to(d, to).unwrap();
    }
}

/// Reads `datagrams.len()` messages from a UDP client's socket and checks
/// that each carries the next of `datagrams`, whole and in order: as
/// unpadded ChannelData on `channel`, or as a Data indication with `None`.
pub fn expect_relayed(sock: &UdpSocket, datagrams: &[Vec<u8>], channel: Option<u16>) {
    let mut buf = vec![0u8; 65536];
    for (i, d) in datagrams.iter().enumerate() {
        let got = sock.recv(&mut buf).unwrap();
        let payload = match channel {
            Some(number) => {
                let n = d.len();
                assert_eq!(
                    &buf[..4],
                    &[(number >> 8) as u8, number as u8, (n >> 8) as u8, n as u8],
                    "datagram {i}"
                );
                assert_eq!(got, 4 + n, "datagram {i}");
                &buf[4..got]
            }
            None => {
                let m = Message::parse(&buf[..got]).unwrap();
                assert_eq!(m.method(), method::DATA, "datagram {i}");
                m.get(attr::DATA).unwrap()
            }
        };
        assert_eq!(payload, &d[..], "datagram {i} (channel {channel:?})");
    }
}

/// An XOR-PEER-ADDRESS attribute value for `peer` in a message with `tid`.
pub fn xor_peer(peer: SocketAddr, tid: &[u8; 12]) -> Vec<u8> {
    let x = attr::xor_address(peer, tid);
    let mut v = [0u8; 20];
    let n = turnserver::stun::encode_address(&mut v, x);
    v[..n].to_vec()
}

/// Runs a command with a timeout, returning (success, combined output).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> (bool, String) {
    let dir = TempDir::new("cmd");
    let out_path = dir.path("out.txt");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    std::fs::File::open(&out_path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    match status {
        Some(st) => (st.success(), text),
        None => (false, format!("{text}\n[timed out after {timeout:?}]")),
    }
}

/// A child process killed on drop (helpers like turnutils_peer).
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `line_start` (a metric name with labels) in a
/// metrics exposition.
pub fn metric(body: &str, line_start: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(line_start) && l[line_start.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Connects over TCP, sends `bytes` and reads one STUN frame back.
pub fn tcp_transact(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut hdr = [0u8; 20];
    s.read_exact(&mut hdr).unwrap();
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let mut all = hdr.to_vec();
    all.extend(body);
    all
}

/// A STUN/TURN client over a byte stream (TCP or TLS).
pub struct StreamClient<S: Read + Write> {
    pub stream: S,
    pub realm: String,
    pub nonce: Vec<u8>,
    tid: u8,
}

impl StreamClient<TcpStream> {
    pub fn tcp(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        StreamClient::new(s)
    }
}

/// A TLS stream trusting only `cert` (PEM).
pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects with TLS to `addr`, verifying the server against `cert` for
/// the name `localhost`.
pub fn tls_connect(addr: SocketAddr, cert: &Path) -> TlsStream {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tls_over(tcp, cert)
}

/// A TLS client on `sock` (already connected), verifying the server
/// against `cert` for the name `localhost`.
pub fn tls_over<S: Read + Write>(
    sock: S,
    cert: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, S> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// One frame read from a stream.
pub enum Frame {
    Stun(Vec<u8>),
    /// Channel number and payload (padding removed).
    ChannelData(u16, Vec<u8>),
}

impl<S: Read + Write> StreamClient<S> {
    pub fn new(stream: S) -> Self {
        StreamClient {
            stream,
            realm: String::new(),
            nonce: Vec::new(),
            tid: 0,
        }
    }

    pub fn read_frame(&mut self) -> std::io::Result<Frame> {
        let mut hdr = [0u8; 4];
        self.stream.read_exact(&mut hdr)?;
        let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        if hdr[0] >> 6 == 1 {
            let mut body = vec![0u8; (len + 3) & !3];
            self.stream.read_exact(&mut body)?;
            body.truncate(len);
            return Ok(Frame::ChannelData(
                u16::from_be_bytes([hdr[0], hdr[1]]),
                body,
            ));
        }
        let mut rest = vec![0u8; 16 + len];
        self.stream.read_exact(&mut rest)?;
        let mut all = hdr.to_vec();
        all.extend(rest);
        Ok(Frame::Stun(all))
    }

    pub fn transact(&mut self, req: &[u8]) -> Response {
        self.stream.write_all(req).unwrap();
        self.stream.flush().unwrap();
        loop {
            if let Frame::Stun(raw) = self.read_frame().unwrap()
                && raw[8..20] == req[8..20]
            {
                return Response { raw };
            }
        }
    }

    pub fn request(
        &mut self,
        m: u16,
        attrs: &[(u16, Vec<u8>)],
        creds: Option<(&str, &str)>,
    ) -> Vec<u8> {
        self.tid = self.tid.wrapping_add(1);
        let tid = [self.tid; 12];
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, m, Class::Request, &tid);
        for (t, v) in attrs {
            w.attr(*t, v);
        }
        if let Some((user, pw)) = creds {
            w.attr(attr::USERNAME, user.as_bytes())
                .attr(attr::REALM, self.realm.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity(&long_term_key(user, &self.realm, pw));
        }
        out
    }

    pub fn allocate(&mut self, user: &str, pw: &str) -> Response {
        let attrs = vec![(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        let req = self.request(method::ALLOCATE, &attrs, None);
        let challenge = self.transact(&req);
        assert_eq!(challenge.code(), Some(401));
        self.realm = challenge
            .msg()
            .text(attr::REALM)
            .unwrap()
            .unwrap()
            .to_string();
        self.nonce = challenge.msg().get(attr::NONCE).unwrap().to_vec();
        let req = self.request(method::ALLOCATE, &attrs, Some((user, pw)));
        self.transact(&req)
    }

    pub fn signed(&mut self, m: u16, attrs: &[(u16, Vec<u8>)], user: &str, pw: &str) -> Response {
        let req = self.request(m, attrs, Some((user, pw)));
        self.transact(&req)
    }
}

/// A network namespace of the test's own with a veth pair, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates namespace `name` with loopback up and `va` (address `ip/24`)
    /// and its veth peer `vb` up. Needs root and iproute2.
    pub fn new(tag: &str, ip: &str) -> NetNs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates a network namespace and must run as root"
        );
        require_tool("ip", "apt-get install iproute2");
        let name = format!("ts{tag}{}", std::process::id());
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(&["netns", "add", &name]);
        let ns = NetNs { name: name.clone() };
        run(&["-n", &name, "link", "set", "lo", "up"]);
        run(&[
            "-n", &name, "link", "add", "va", "type", "veth", "peer", "name", "vb",
        ]);
        run(&["-n", &name, "addr", "add", &format!("{ip}/24"), "dev", "va"]);
        run(&["-n", &name, "link", "set", "va", "up"]);
        run(&["-n", &name, "link", "set", "vb", "up"]);
        ns
    }

    /// Creates namespace `name` with only loopback, up; the caller adds
    /// its links. Needs root and iproute2.
    pub fn empty(tag: &str) -> NetNs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates a network namespace and must run as root"
        );
        require_tool("ip", "apt-get install iproute2");
        let name = format!("ts{tag}{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ns = NetNs { name };
        ns.ip(&["netns", "add", &ns.name]);
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip args`, failing the test if it fails.
    pub fn ip(&self, args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed");
    }

    /// Runs `args` inside the namespace (`ip netns exec`), failing the test
    /// if it fails.
    pub fn exec(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .status()
            .expect("run ip netns exec");
        assert!(st.success(), "{args:?} in {} failed", self.name);
    }

    /// Starts the binary inside the namespace with `args` and its output
    /// in a log file, and waits (up to 20 s) until its workers run.
    pub fn start_server<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> NsServer {
        let dir = TempDir::new("netns");
        let log = dir.path("log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, BIN])
            .args(args)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap();
        let server = NsServer {
            _child: Background(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.log().contains("worker threads running") {
            assert!(Instant::now() < deadline, "{}", server.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Runs `f` on a thread that has entered the namespace (network
    /// namespaces are per thread), so sockets it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

/// The binary running in a [`NetNs`] ([`NetNs::start_server`]); killed on
/// drop, before its directory goes.
pub struct NsServer {
    _child: Background,
    pub dir: TempDir,
}

impl NsServer {
    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("log")).unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
