//! The container image (`docker/build`, `docker/Dockerfile`) built and run
//! with Debian's podman, and the Kubernetes manifests validated.
//!
//! Podman runs with a configuration, storage, runtime state, CNI network
//! and locks of the test's own under its temporary directory
//! (`CONTAINERS_CONF`, `CONTAINERS_STORAGE_CONF`, a `runc --root` wrapper,
//! `lock_type = "file"`), so a podman the machine already uses is not
//! touched; what podman insists on writing elsewhere (its blob cache under
//! `/var/lib/containers`, `/var/lib/cni/results`, the portmap plugin's
//! `CNI-HOSTPORT-*` iptables chains) is removed afterwards unless it was
//! there before. The runtime's limits stay under the machine's hard ones
//! (`default_ulimits`), and there is no systemd, so health checks are run
//! by hand (`podman healthcheck run`).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{
    Cloud, FakeMetadata, TempDir, free_ports, http_get, relay_range, require_tool, run_uclient,
    run_with_timeout, turnutils_peer,
};

const USER: &str = "alice";
const PASSWORD: &str = "wonder-land";
/// The test network's bridge: the host is .1 on it.
const SUBNET: &str = "10.89.77";

/// Podman confined to a directory of the test's own.
struct Podman {
    dir: TempDir,
    bridge: String,
    had_containers_dir: bool,
    had_cni_dir: bool,
    had_cni_chains: bool,
}

impl Podman {
    fn new() -> Podman {
        require_tool(
            "podman",
            "apt-get install podman runc (tests/run-all.sh does)",
        );
        require_tool("runc", "apt-get install runc");
        assert!(
            nix::unistd::geteuid().is_root(),
            "the image test runs rootful podman and must run as root"
        );
        let had_cni_chains = Command::new("iptables")
            .args(["-t", "nat", "-S", "CNI-HOSTPORT-DNAT"])
            .output()
            .is_ok_and(|o| o.status.success());
        let dir = TempDir::new("podman");
        let bridge = format!("tsbr{}", std::process::id() % 1_000_000);
        let p = |name: &str| dir.path(name).display().to_string();
        for d in ["tmp", "net.d", "bin"] {
            std::fs::create_dir_all(dir.path(d)).unwrap();
        }
        let runc = dir.path("bin/runc");
        std::fs::write(
            &runc,
            format!(
                "#!/bin/sh\nexec /usr/sbin/runc --root '{}' \"$@\"\n",
                p("runc")
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runc, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            dir.path("containers.conf"),
            format!(
                r#"[containers]
default_ulimits = ["nofile=16384:16384", "nproc=32768:32768"]

[network]
network_backend = "cni"
network_config_dir = "{netd}"
default_network = "tstest"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{events}"
tmp_dir = "{libpod}"
lock_type = "file"
image_copy_tmp_dir = "{tmp}"

[engine.runtimes]
runc = ["{runc}"]
"#,
                netd = p("net.d"),
                events = p("events.log"),
                libpod = p("libpod"),
                tmp = p("tmp"),
                runc = runc.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                p("root"),
                p("runroot")
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path("net.d/tstest.conflist"),
            format!(
                r#"{{ "cniVersion": "0.4.0", "name": "tstest", "plugins": [
  {{ "type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": true, "hairpinMode": true,
    "ipam": {{ "type": "host-local", "dataDir": "{ipam}", "routes": [{{ "dst": "0.0.0.0/0" }}],
              "ranges": [[{{ "subnet": "{SUBNET}.0/24", "gateway": "{SUBNET}.1" }}]] }} }},
  {{ "type": "portmap", "capabilities": {{ "portMappings": true }} }} ] }}
"#,
                ipam = p("cni-ipam")
            ),
        )
        .unwrap();
        Podman {
            dir,
            bridge,
            had_containers_dir: Path::new("/var/lib/containers").exists(),
            had_cni_dir: Path::new("/var/lib/cni").exists(),
            had_cni_chains,
        }
    }

    /// Sets the environment that confines podman (and `docker/build`).
    fn confine<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env("CONTAINERS_CONF", self.dir.path("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.path("storage.conf"))
            .env("TMPDIR", self.dir.path("tmp"))
    }

    fn output(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("podman");
        self.confine(&mut cmd).args(args);
        cmd.output().expect("run podman")
    }

    /// Runs podman; its stdout, trimmed. Fails the test if podman fails.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn logs(&self, name: &str) -> String {
        let out = self.output(&["logs", name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until container `name`'s log holds `text`.
    fn wait_log(&self, name: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.logs(name).contains(text) {
            assert!(
                Instant::now() < deadline,
                "no '{text}' from {name}:\n{}",
                self.logs(name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.output(&["system", "reset", "-f"]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        if !self.had_containers_dir {
            let _ = std::fs::remove_dir_all("/var/lib/containers");
        }
        if !self.had_cni_dir {
            let _ = std::fs::remove_dir_all("/var/lib/cni");
        }
        if !self.had_cni_chains {
            let ipt = |args: &[&str]| {
                let _ = Command::new("iptables")
                    .args(args)
                    .stderr(std::process::Stdio::null())
                    .status();
            };
            for chain in ["PREROUTING", "OUTPUT"] {
                ipt(&[
                    "-t",
                    "nat",
                    "-D",
                    chain,
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    "-j",
                    "CNI-HOSTPORT-DNAT",
                ]);
            }
            ipt(&[
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-m",
                "comment",
                "--comment",
                "CNI portfwd requiring masquerade",
                "-j",
                "CNI-HOSTPORT-MASQ",
            ]);
            for c in [
                "CNI-HOSTPORT-DNAT",
                "CNI-HOSTPORT-MASQ",
                "CNI-HOSTPORT-SETMARK",
            ] {
                ipt(&["-t", "nat", "-F", c]);
                ipt(&["-t", "nat", "-X", c]);
            }
        }
    }
}

/// Builds `turnserver:test` with `docker/build` (its static binary in
/// `target/container`, kept between runs).
fn build_image(pm: &Podman) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = Command::new(root.join("docker/build"));
    pm.confine(&mut cmd)
        .arg("test")
        .current_dir(root)
        .env("CARGO_TARGET_DIR", root.join("target/container"));
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(1800));
    assert!(ok, "docker/build failed:\n{out}");
    assert_eq!(
        pm.run(&[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            "turnserver:test"
        ]),
        "65534:65534"
    );
    let health = pm.run(&[
        "image",
        "inspect",
        "--format",
        "{{json .HealthCheck}}",
        "turnserver:test",
    ]);
    assert!(health.contains("--health-check"), "{health}");
}

/// A relay data channel between two RTCPeerConnections in headless
/// Chromium (tests/browser) through `turn_url`.
fn chromium_relays(turn_url: &str, logs: &dyn Fn() -> String) {
    let mut cmd = common::webrtc_relay();
    cmd.args([
        "--turn",
        turn_url,
        "--username",
        USER,
        "--credential",
        PASSWORD,
        "--timeout-ms",
        "60000",
    ]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(90));
    assert!(
        ok,
        "Chromium did not relay:\n{out}\n---- server ----\n{}",
        logs()
    );
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_default();
    assert!(
        line.contains("\"ok\":true") && line.contains("\"localType\":\"relay\""),
        "{out}"
    );
}

/// uclient with channels through `server_ip:port` to a turnutils_peer on
/// `peer_ip`.
fn uclient_relays(server_ip: &str, port: u16, peer_ip: &str, logs: &dyn Fn() -> String) {
    let (_peer, peer_port) = turnutils_peer(peer_ip);
    let (p, pp) = (port.to_string(), peer_port.to_string());
    run_uclient(
        &[
            "-u", USER, "-w", PASSWORD, "-e", peer_ip, "-r", &pp, "-p", &p, "-m", "2", "-n", "50",
            "-l", "170", "-z", "5",
        ],
        server_ip,
        100,
        logs,
    );
}

/// The host's uid/gid of the container's process, from /proc.
fn process_ids(pm: &Podman, name: &str) -> (String, String) {
    let pid = pm.run(&["inspect", "--format", "{{.State.Pid}}", name]);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    (field("Uid:"), field("Gid:"))
}

#[test]
fn the_image_relays_with_host_networking_published_ports_and_a_numeric_user() {
    let pm = Podman::new();
    build_image(&pm);
    let secrets = TempDir::new("secrets");
    let password_file = secrets.path("turn_password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(
        &password_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let secret_mount = format!("{}:/run/secrets/turn_password:ro", password_file.display());

    // 1. Host networking, configured only through the environment and a
    //    secret file; the image's own user (65534), metrics for the health
    //    check.
    let port = free_ports(1);
    let mport = free_ports(1);
    let (min, max) = relay_range(20);
    let env = |k: &str, v: &str| format!("{k}={v}");
    // EXTERNAL_IP=auto, as on a cloud VM: the metadata service (a fake on
    // loopback standing in for 169.254.169.254) says the public address is
    // the one the clients here reach, 127.0.0.1.
    let metadata = FakeMetadata::start(Cloud::Gcp("127.0.0.1".into()));
    let host_env = [
        env("TURN_USERNAME", USER),
        env("TURN_PASSWORD_FILE", "/run/secrets/turn_password"),
        env("REALM", "example.org"),
        env("EXTERNAL_IP", "auto"),
        env("TURNSERVER_EXTERNAL_IP_METADATA", &metadata.url()),
        env("TURNSERVER_LISTENING_IP", "127.0.0.1"),
        env("TURNSERVER_LISTENING_PORT", &port.to_string()),
        env("TURNSERVER_MIN_PORT", &min.to_string()),
        env("TURNSERVER_MAX_PORT", &max.to_string()),
        env("TURNSERVER_ALLOW_LOOPBACK_PEERS", "true"),
        env("TURNSERVER_PROMETHEUS", "true"),
        env("TURNSERVER_PROMETHEUS_ADDRESS", "127.0.0.1"),
        env("TURNSERVER_PROMETHEUS_PORT", &mport.to_string()),
        env("TURNSERVER_DRAIN_TIMEOUT", "2"),
    ];
    let mut args = vec!["run", "-d", "--name", "ts-host", "--network", "host"];
    args.extend(["--no-healthcheck", "-v", &secret_mount]);
    for e in &host_env {
        args.extend(["-e", e]);
    }
    args.push("turnserver:test");
    pm.run(&args);
    pm.wait_log("ts-host", "worker threads running");
    let logs = || pm.logs("ts-host");
    assert!(
        logs().contains("settings from the environment: TURN_USERNAME, TURN_PASSWORD_FILE, REALM"),
        "{}",
        logs()
    );
    assert!(
        logs().contains("external-ip=auto: 127.0.0.1 (from GCP metadata)"),
        "{}",
        logs()
    );
    assert_eq!(
        process_ids(&pm, "ts-host"),
        (
            "65534 65534 65534 65534".into(),
            "65534 65534 65534 65534".into()
        )
    );
    uclient_relays("127.0.0.1", port, "127.0.0.1", &logs);
    chromium_relays(&format!("turn:127.0.0.1:{port}?transport=udp"), &logs);
    // The image's HEALTHCHECK command (checked above), run by hand: podman
    // schedules health checks with systemd timers, and there is no systemd.
    let health = pm.run(&["exec", "ts-host", "/usr/bin/turnserver", "--health-check"]);
    assert!(health.starts_with("ok"), "{health}");
    let live = http_get(SocketAddr::from(([127, 0, 0, 1], mport)), "/live");
    assert_eq!(live.0, 200);
    // SIGTERM: Chromium's allocations drain for drain-timeout, then a
    // clean exit before podman's own timeout.
    pm.run(&["stop", "-t", "20", "ts-host"]);
    assert_eq!(
        pm.run(&["inspect", "--format", "{{.State.ExitCode}}", "ts-host"]),
        "0",
        "{}",
        logs()
    );
    pm.run(&["rm", "ts-host"]);

    // 2. Published ports on the container network. Without EXTERNAL_IP the
    //    relays would advertise the container's own address: warned.
    let hport = free_ports(1);
    let (pmin, pmax) = relay_range(20);
    let listen = format!("{hport}:3478/udp");
    let range = format!("{pmin}-{pmax}:{pmin}-{pmax}/udp");
    let published_env = [
        env("TURN_USERNAME", USER),
        env("TURN_PASSWORD_FILE", "/run/secrets/turn_password"),
        env("REALM", "example.org"),
        env("TURNSERVER_MIN_PORT", &pmin.to_string()),
        env("TURNSERVER_MAX_PORT", &pmax.to_string()),
        // The echo peer is the host, on the container network.
        env("TURNSERVER_ALLOWED_PEER_IP", &format!("{SUBNET}.1")),
    ];
    let published = |name: &str, extra: &[String]| {
        let mut args = vec!["run", "-d", "--name", name, "--no-healthcheck"];
        args.extend(["-p", &listen, "-p", &range, "-v", &secret_mount]);
        for e in published_env.iter().chain(extra) {
            args.extend(["-e", e]);
        }
        args.push("turnserver:test");
        pm.run(&args);
        pm.wait_log(name, "worker threads running");
    };
    published("ts-private", &[]);
    let log = pm.logs("ts-private");
    assert!(
        log.contains(&format!("WARN relays will advertise {SUBNET}."))
            && log.contains("every address of this host is private"),
        "{log}"
    );
    pm.run(&["rm", "-f", "ts-private"]);
    // With the address clients reach (here the host's loopback): relays.
    published("ts-published", &[env("EXTERNAL_IP", "127.0.0.1")]);
    let logs = || pm.logs("ts-published");
    uclient_relays("127.0.0.1", hport, &format!("{SUBNET}.1"), &logs);
    pm.run(&["rm", "-f", "ts-published"]);
    // Chromium's two peer connections both relay here, so each relay sends
    // to the other's advertised address: the host's address on the
    // container network, which the published ports forward back (hairpin).
    let gateway = format!("{SUBNET}.1");
    published("ts-hairpin", &[env("EXTERNAL_IP", &gateway)]);
    let logs = || pm.logs("ts-hairpin");
    chromium_relays(&format!("turn:{gateway}:{hport}?transport=udp"), &logs);
    pm.run(&["rm", "-f", "ts-hairpin"]);

    // 3. Started as root, dropping to a user by number that no passwd file
    //    in the image names.
    let port = free_ports(1);
    let (min, max) = relay_range(20);
    let root_env = [
        env("TURN_USERNAME", USER),
        env("TURN_PASSWORD", PASSWORD),
        env("TURNSERVER_LISTENING_IP", "127.0.0.1"),
        env("TURNSERVER_LISTENING_PORT", &port.to_string()),
        env("TURNSERVER_MIN_PORT", &min.to_string()),
        env("TURNSERVER_MAX_PORT", &max.to_string()),
        env("TURNSERVER_ALLOW_LOOPBACK_PEERS", "true"),
        env("TURNSERVER_PROC_USER", "65534"),
    ];
    let mut args = vec!["run", "-d", "--name", "ts-root", "--network", "host"];
    args.extend(["--no-healthcheck", "--user", "0"]);
    for e in &root_env {
        args.extend(["-e", e]);
    }
    args.push("turnserver:test");
    pm.run(&args);
    pm.wait_log("ts-root", "worker threads running");
    let logs = || pm.logs("ts-root");
    assert!(logs().contains("running as user 65534"), "{}", logs());
    assert_eq!(
        process_ids(&pm, "ts-root"),
        (
            "65534 65534 65534 65534".into(),
            "65534 65534 65534 65534".into()
        )
    );
    uclient_relays("127.0.0.1", port, "127.0.0.1", &logs);
    pm.run(&["rm", "-f", "ts-root"]);
}

#[test]
fn kubernetes_manifests_validate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (ok, out) = run_with_timeout(
        Command::new(root.join("tests/k8s-validate.sh")).current_dir(root),
        Duration::from_secs(600),
    );
    assert!(ok, "{out}");
    assert!(out.contains("all 6 manifests valid"), "{out}");
}
