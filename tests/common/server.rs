//! The binary under test, started on loopback with free ports and a
//! configuration written for the test, and stopped when dropped.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use turnserver::stun::Message;

use super::{BIN, TempDir, binding_request, free_ports, relay_range, write_test_cert};

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
            "listening-ip=127.0.0.1\nlistening-port={port}\ntls-listening-port={tls_port}\nmin-port={min}\nmax-port={max}\ncontrol-socket=\n"
        );
        // TURNSERVER_TEST_EBPF_OFFLOAD=tc runs the test with the eBPF fast
        // path attached to loopback (tests/run-all.sh runs the relay tests
        // once so): the workers mirror every channel binding into its maps
        // and read its counters back; the program leaves loopback traffic
        // to the sockets (the route lookup does not forward to local
        // addresses), so every test must pass unchanged.
        if let Ok(mode) = std::env::var("TURNSERVER_TEST_EBPF_OFFLOAD") {
            preamble.push_str(&format!("ebpf-offload={mode}\nebpf-offload-interface=lo\n"));
        }
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
        if std::env::var_os("TURNSERVER_TEST_EBPF_OFFLOAD").is_some() {
            // The log is written by a thread of its own: wait for the line.
            let loaded = "channel bindings of UDP clients are relayed in the kernel on lo";
            let deadline = Instant::now() + Duration::from_secs(5);
            while !s.log_text().contains(loaded) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let log = s.log_text();
            assert!(
                log.contains(loaded),
                "TURNSERVER_TEST_EBPF_OFFLOAD: the fast path did not load\n{log}"
            );
        }
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

    /// Starts `turnserver --takeover` with a copy of this server's
    /// configuration (and `extra` arguments) and waits until UDP Binding
    /// is answered (by either process).
    pub fn successor(&self, extra: &[&str]) -> Server {
        self.successor_with("", extra)
    }

    /// [`Server::successor`] with `config` lines appended to the copy of
    /// the configuration (later lines win).
    pub fn successor_with(&self, config: &str, extra: &[&str]) -> Server {
        let dir = TempDir::new("successor");
        let conf = dir.path("turnserver.conf");
        let text = std::fs::read_to_string(self.dir.path("turnserver.conf")).unwrap();
        std::fs::write(&conf, format!("{text}\n{config}\n")).unwrap();
        let mut args = vec![
            "-c".to_string(),
            conf.display().to_string(),
            "--takeover".to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut s = Server::launch_env(args, self.port, self.tls_port, dir, &[], None);
        s.preamble = self.preamble.clone();
        // Binding may have been answered by the old process: wait for the
        // new one to serve (or to fail).
        let deadline = Instant::now() + Duration::from_secs(20);
        while !s.log_text().contains("worker threads running") {
            if !s.alive() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        super::wait_child(self.child.as_mut()?, limit)
    }

    /// Runs the binary with exactly `args` and waits until it answers a
    /// Binding request on 127.0.0.1:`port`.
    pub fn launch(args: Vec<String>, port: u16, tls_port: u16, dir: TempDir) -> Server {
        Server::launch_env(args, port, tls_port, dir, &[], None)
    }

    /// [`Server::launch`] with extra environment variables and an optional
    /// soft open files limit.
    pub fn launch_env(
        args: Vec<String>,
        port: u16,
        tls_port: u16,
        dir: TempDir,
        env: &[(String, String)],
        open_files: Option<u64>,
    ) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.args(&args).envs(env.iter().map(|(k, v)| (k, v)));
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
        Server::launch_cmd(cmd, port, tls_port, dir)
    }

    /// Starts `cmd` (a turnserver, or a wrapper that execs one) with its
    /// output in `dir`'s log and waits until it answers on `port`.
    pub fn launch_cmd(mut cmd: Command, port: u16, tls_port: u16, dir: TempDir) -> Server {
        let log = dir.path("server.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        cmd.stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out));
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
