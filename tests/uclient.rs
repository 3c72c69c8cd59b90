//! Interoperability with coturn's own test client, `turnutils_uclient`
//! (from Debian's `coturn`, unpacked by tests/run-all.sh), against the real binary on loopback: every
//! run must deliver every packet.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Background, Options, Server, free_ports, require_tool, run_with_timeout};

const USERS: &str =
    "lt-cred-mech\nrealm=example.org\nuser=test:secret\nallow-loopback-peers\nfingerprint\n";

/// Runs uclient with `args` (server address last) and checks its report:
/// every message sent came back, and at least `min_msgs` were sent.
fn uclient(server: &Server, args: &[&str], min_msgs: u64) -> String {
    let bin = require_tool(
        "turnutils_uclient",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let mut cmd = Command::new(bin);
    cmd.args(args).arg("127.0.0.1");
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(90));
    let lost = out
        .lines()
        .find(|l| l.contains("Total lost packets"))
        .unwrap_or_else(|| {
            panic!(
                "uclient gave no report (ok={ok}):\n{out}\n---- server log ----\n{}",
                server.log_text()
            )
        });
    assert!(
        lost.contains("Total lost packets 0 (0.000000%)"),
        "packets lost:\n{out}\n---- server log ----\n{}",
        server.log_text()
    );
    let totals = out
        .lines()
        .rev()
        .find(|l| l.contains("start_mclient: tot_send_msgs="))
        .unwrap_or_else(|| panic!("no totals:\n{out}"));
    let num = |key: &str| -> u64 {
        let rest = &totals[totals.find(key).unwrap() + key.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (sent, received) = (num("tot_send_msgs="), num("tot_recv_msgs="));
    assert!(sent >= min_msgs, "only {sent} messages sent:\n{out}");
    assert_eq!(sent, received, "{out}");
    assert!(!out.contains("ERROR"), "uclient reported an error:\n{out}");
    out
}

fn peer() -> (Background, u16) {
    let bin = require_tool(
        "turnutils_peer",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    // turnutils_peer binds port and port + 1.
    let port = free_ports(2);
    let child = Command::new(bin)
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start turnutils_peer");
    std::thread::sleep(Duration::from_millis(300));
    (Background(child), port)
}

#[test]
fn udp_channel_data_through_turnutils_peer() {
    let s = Server::start(Options::new(USERS));
    let (_peer, pport) = peer();
    let p = s.port.to_string();
    let pp = pport.to_string();
    // RTP/RTCP pairs (EVEN-PORT + RESERVATION-TOKEN), ChannelData.
    uclient(
        &s,
        &[
            "-u",
            "test",
            "-w",
            "secret",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-p",
            &p,
            "-m",
            "4",
            "-n",
            "100",
            "-l",
            "170",
            "-z",
            "5",
        ],
        400,
    );
    let log = s.log_text();
    assert!(log.contains("allocation created"), "{log}");
    assert!(log.contains("allocation deleted"), "{log}");
    assert!(
        !log.contains("secret"),
        "the password must never be logged:\n{log}"
    );
}

#[test]
fn udp_send_indications() {
    let s = Server::start(Options::new(USERS));
    let (_peer, pport) = peer();
    let p = s.port.to_string();
    let pp = pport.to_string();
    uclient(
        &s,
        &[
            "-s",
            "-c",
            "-u",
            "test",
            "-w",
            "secret",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-p",
            &p,
            "-m",
            "2",
            "-n",
            "100",
            "-l",
            "170",
            "-z",
            "5",
        ],
        200,
    );
}

#[test]
fn udp_client_to_client() {
    let s = Server::start(Options::new(USERS));
    let p = s.port.to_string();
    uclient(
        &s,
        &[
            "-y", "-u", "test", "-w", "secret", "-p", &p, "-m", "4", "-n", "100", "-l", "170",
            "-z", "5",
        ],
        400,
    );
}

#[test]
fn tcp_client() {
    let s = Server::start(Options::new(USERS));
    let (_peer, pport) = peer();
    let p = s.port.to_string();
    let pp = pport.to_string();
    uclient(
        &s,
        &[
            "-t",
            "-u",
            "test",
            "-w",
            "secret",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-p",
            &p,
            "-m",
            "2",
            "-n",
            "100",
            "-l",
            "171",
            "-z",
            "5",
        ],
        200,
    );
    // Send indications over TCP too.
    uclient(
        &s,
        &[
            "-t",
            "-s",
            "-c",
            "-u",
            "test",
            "-w",
            "secret",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-p",
            &p,
            "-m",
            "2",
            "-n",
            "50",
            "-l",
            "170",
            "-z",
            "5",
        ],
        100,
    );
}

#[test]
fn tls_client() {
    let s = Server::start(Options::new(USERS).tls());
    let (_peer, pport) = peer();
    let tp = s.tls_port.to_string();
    let pp = pport.to_string();
    let out = uclient(
        &s,
        &[
            "-t",
            "-S",
            "-u",
            "test",
            "-w",
            "secret",
            "-e",
            "127.0.0.1",
            "-r",
            &pp,
            "-p",
            &tp,
            "-m",
            "2",
            "-n",
            "100",
            "-l",
            "170",
            "-z",
            "5",
        ],
        200,
    );
    assert!(
        s.log_text().contains("five_tuple=tls "),
        "allocations should be over TLS:\n{out}\n{}",
        s.log_text()
    );
}

#[test]
fn rest_api_secret() {
    let s = Server::start(Options::new(
        "use-auth-secret\nstatic-auth-secret=oldsecret\nstatic-auth-secret=newsecret\nrealm=example.org\nallow-loopback-peers\n",
    ));
    let (_peer, pport) = peer();
    let p = s.port.to_string();
    let pp = pport.to_string();
    // Both secrets work (rotation).
    for secret in ["newsecret", "oldsecret"] {
        uclient(
            &s,
            &[
                "-W",
                secret,
                "-u",
                "alice",
                "-c",
                "-e",
                "127.0.0.1",
                "-r",
                &pp,
                "-p",
                &p,
                "-m",
                "2",
                "-n",
                "50",
                "-l",
                "170",
                "-z",
                "5",
            ],
            100,
        );
    }
}

#[test]
fn ipv6_relays_client_to_client() {
    let s = Server::start(Options::new(&format!("{USERS}listening-ip=::1\n")));
    let p = s.port.to_string();
    uclient(
        &s,
        &[
            "-y", "-x", "-u", "test", "-w", "secret", "-p", &p, "-m", "4", "-n", "50", "-l", "170",
            "-z", "5",
        ],
        200,
    );
    assert!(s.log_text().contains("relayed=[::1]:"), "{}", s.log_text());
}

#[test]
fn mobility_client() {
    let s = Server::start(Options::new(&format!("{USERS}mobility\n")));
    let p = s.port.to_string();
    uclient(
        &s,
        &[
            "-M", "-y", "-c", "-u", "test", "-w", "secret", "-p", &p, "-m", "2", "-n", "50", "-l",
            "170", "-z", "5",
        ],
        100,
    );
}
