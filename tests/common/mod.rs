//! Shared helpers for integration tests, by job: [`server`] starts the real
//! `turnserver` binary on loopback with free ports, [`client`] speaks
//! STUN/TURN to it over UDP, TCP and TLS, [`netns`] makes network namespaces
//! of the test's own; here are free ports, scratch directories, test
//! certificates, child processes and the external tools a test needs.
// Each test uses some of the helpers, and so compiles the others unused.
#![allow(dead_code, unused_imports)]

pub mod client;
pub mod db;
pub mod metadata;
pub mod netns;
pub mod server;
pub mod uclient;

pub use client::*;
pub use db::*;
pub use metadata::*;
pub use netns::*;
pub use server::*;
pub use uclient::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

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

/// Waits up to `limit` for `child` to exit by itself: its status, or
/// `None` if it still runs.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
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

/// Descriptors process `pid` holds.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of process `pid`, KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// `node webrtc-relay.mjs` in tests/browser (headless Chromium driven by
/// playwright-core), ready for its arguments; fails loudly when Node.js,
/// Chromium or playwright-core is missing.
pub fn webrtc_relay() -> Command {
    let node = require_tool("node", "install Node.js 20");
    require_tool("chromium", "apt-get install chromium");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `npm ci` in {} (the README's test command does)",
        dir.display()
    );
    let mut cmd = Command::new(node);
    cmd.current_dir(&dir).arg("webrtc-relay.mjs");
    cmd
}
