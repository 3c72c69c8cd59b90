//! Throwaway database servers for the user-database tests: Debian's
//! PostgreSQL, MariaDB and Redis, each started on a free loopback port with
//! its data in a temporary directory, and stopped (and removed) when
//! dropped. A missing server is a loud failure (the test command installs
//! them).

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, free_ports, require_tool};

/// A database server process, stopped on drop: asked politely (SIGTERM),
/// then killed.
pub struct DbProcess {
    child: Option<Child>,
    what: &'static str,
}

impl DbProcess {
    fn spawn(cmd: &mut Command, what: &'static str) -> DbProcess {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        DbProcess {
            child: Some(child),
            what,
        }
    }

    /// Stops the server now (for outage tests); `wait` until it is gone.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.what);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for DbProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The directory of the newest PostgreSQL server binaries.
fn postgres_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.retain(|d| d.join("initdb").is_file());
    dirs.sort();
    dirs.pop().unwrap_or_else(|| {
        panic!("PostgreSQL's server is not installed (apt-get install postgresql; the test command does)")
    })
}

/// A PostgreSQL cluster of the test's own, run as the `postgres` user
/// (PostgreSQL refuses root), with database `coturn` and user `turn`
/// (password `turnpw`).
pub struct Postgres {
    pub port: u16,
    process: DbProcess,
    bin: PathBuf,
    data: PathBuf,
    _dir: TempDir,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = postgres_bin();
        require_tool("psql", "apt-get install postgresql-client");
        let dir = TempDir::new("pg");
        let pw = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("the postgres system user (from Debian's postgresql package)");
        std::os::unix::fs::chown(&dir.0, Some(pw.uid.as_raw()), Some(pw.gid.as_raw())).unwrap();
        let pwfile = dir.path("pw");
        std::fs::write(&pwfile, "turnpw\n").unwrap();
        std::os::unix::fs::chown(&pwfile, Some(pw.uid.as_raw()), None).unwrap();
        let data = dir.path("data");
        let as_postgres = |prog: PathBuf| {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(prog)
            .current_dir(&dir.0);
            c
        };
        run(
            as_postgres(bin.join("initdb"))
                .args([
                    "-U",
                    "turn",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .arg("-D")
                .arg(&data),
            "initdb",
        );
        let port = free_ports(1);
        let mut pg = Postgres {
            port,
            process: DbProcess {
                child: None,
                what: "postgres",
            },
            bin,
            data,
            _dir: dir,
        };
        pg.resume();
        run(
            Command::new("psql")
                .env("PGPASSWORD", "turnpw")
                .arg(format!(
                    "host=127.0.0.1 port={port} user=turn dbname=postgres"
                ))
                .args(["-q", "-c", "CREATE DATABASE coturn"]),
            "psql CREATE DATABASE",
        );
        pg
    }

    /// Starts the server (again, after [`Postgres::stop`]).
    pub fn resume(&mut self) {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(self.bin.join("postgres"))
        .arg("-D")
        .arg(&self.data)
        .args(["-p", &self.port.to_string(), "-k"])
        .arg(self.data.parent().unwrap())
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
        self.process = DbProcess::spawn(&mut c, "postgres");
        wait_listening(self.port, "postgres");
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// coturn's `psql-userdb` string for it.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=coturn user=turn password=turnpw connect_timeout=2",
            self.port
        )
    }
}

/// A MariaDB server of the test's own with database `coturn` and user
/// `turn`@`127.0.0.1` (password `turnpw`).
pub struct MariaDb {
    pub port: u16,
    _process: DbProcess,
    _dir: TempDir,
}

impl MariaDb {
    pub fn start() -> MariaDb {
        require_tool("mariadbd", "apt-get install mariadb-server");
        require_tool("mariadb", "apt-get install mariadb-client");
        let dir = TempDir::new("mariadb");
        let data = dir.path("data");
        let socket = dir.path("sock");
        run(
            Command::new("mariadb-install-db")
                .args(["--no-defaults", "--user=root", "--skip-test-db"])
                .arg("--auth-root-authentication-method=normal")
                .arg(format!("--datadir={}", data.display())),
            "mariadb-install-db",
        );
        let port = free_ports(1);
        let process = DbProcess::spawn(
            Command::new("mariadbd")
                .args(["--no-defaults", "--user=root", "--bind-address=127.0.0.1"])
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--port={port}"))
                .arg(format!("--pid-file={}", dir.path("pid").display()))
                .args(["--skip-log-bin", "--innodb-flush-log-at-trx-commit=0"]),
            "mariadbd",
        );
        wait_listening(port, "mariadbd");
        run(
            Command::new("mariadb")
                .args(["--no-defaults", "-u", "root"])
                .arg(format!("--socket={}", socket.display()))
                .args([
                    "-e",
                    "CREATE DATABASE coturn; CREATE USER 'turn'@'127.0.0.1' IDENTIFIED BY 'turnpw'; GRANT ALL ON coturn.* TO 'turn'@'127.0.0.1';",
                ]),
            "mariadb CREATE DATABASE",
        );
        MariaDb {
            port,
            _process: process,
            _dir: dir,
        }
    }

    /// coturn's `mysql-userdb` string for it.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 dbname=coturn user=turn password=turnpw port={} connect_timeout=2 read_timeout=2",
            self.port
        )
    }
}

/// A Redis server of the test's own (password `turnpw`), its data kept in
/// an append-only file so it survives a stop and resume.
pub struct Redis {
    pub port: u16,
    /// The address it listens on.
    pub ip: String,
    /// The network namespace it runs in (`None`: the test's own).
    pub netns: Option<String>,
    process: DbProcess,
    dir: TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_at(None, "127.0.0.1", free_ports(1))
    }

    /// Starts one in network namespace `netns`, listening on `ip:port`.
    pub fn start_in(netns: &str, ip: &str, port: u16) -> Redis {
        Redis::start_at(Some(netns.to_string()), ip, port)
    }

    fn start_at(netns: Option<String>, ip: &str, port: u16) -> Redis {
        require_tool("redis-server", "apt-get install redis-server");
        let dir = TempDir::new("redis");
        let mut r = Redis {
            port,
            ip: ip.to_string(),
            netns,
            process: DbProcess {
                child: None,
                what: "redis-server",
            },
            dir,
        };
        r.resume();
        r
    }

    /// Starts the server (again, after [`Redis::stop`]).
    pub fn resume(&mut self) {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-server"]);
                c
            }
            None => Command::new("redis-server"),
        };
        self.process = DbProcess::spawn(
            cmd.args(["--bind", &self.ip, "--port", &self.port.to_string()])
                .args([
                    "--requirepass",
                    "turnpw",
                    "--save",
                    "",
                    "--appendonly",
                    "yes",
                ])
                .arg("--dir")
                .arg(&self.dir.0),
            "redis-server",
        );
        match &self.netns {
            Some(ns) => {
                let addr: std::net::SocketAddr =
                    format!("{}:{}", self.ip, self.port).parse().unwrap();
                super::in_netns(ns, move || {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while TcpStream::connect(addr).is_err() {
                        assert!(
                            Instant::now() < deadline,
                            "redis-server never listened on {addr}"
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                });
            }
            None => wait_listening(self.port, "redis-server"),
        }
    }

    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Runs `redis-cli` on database 3 (in its namespace) with `args`;
    /// returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "redis-cli"]);
                c
            }
            None => Command::new("redis-cli"),
        };
        let out = cmd
            .args(["-h", &self.ip, "-p", &self.port.to_string()])
            .args(["-a", "turnpw", "--no-auth-warning", "-n", "3"])
            .args(args)
            .output()
            .expect("redis-cli (Debian's redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// coturn's `redis-userdb` string for it.
    pub fn conninfo(&self) -> String {
        format!(
            "ip={} dbname=3 password=turnpw port={} connect_timeout=2",
            self.ip, self.port
        )
    }
}
