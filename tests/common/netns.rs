//! Network namespaces of the test's own, joined by a veth pair, and the
//! binary running inside one.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, Background, TempDir, require_tool};

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

    /// Gives link `dev` of this namespace the address `cidr` (`10.0.0.1/24`)
    /// and brings it up.
    pub fn address(&self, dev: &str, cidr: &str) {
        self.ip(&["-n", &self.name, "addr", "add", cidr, "dev", dev]);
        self.ip(&["-n", &self.name, "link", "set", dev, "up"]);
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
            child: Some(Background(child)),
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
    /// Sockets keep their namespace, so one made here may be used from any
    /// thread afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }
}

/// Runs `f` on a thread inside network namespace `name`.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// The binary running in a [`NetNs`] ([`NetNs::start_server`]); killed on
/// drop, before its directory goes.
pub struct NsServer {
    child: Option<Background>,
    pub dir: TempDir,
}

impl NsServer {
    /// The server's process id (`ip netns exec` execs it).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.0.id() as i32)
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits up to `limit` for the server to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        super::wait_child(&mut self.child.as_mut()?.0, limit)
    }

    /// SIGKILLs the server and reaps it.
    pub fn kill(&mut self) {
        drop(self.child.take());
    }

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
