//! Interoperability with coturn's own test client, `turnutils_uclient`
//! (from Debian's `coturn`, unpacked by tests/run-all.sh), against the real binary on loopback: every
//! run must deliver every packet.

mod common;

use common::{Background, Options, Server, run_uclient, turnutils_peer};

const USERS: &str =
    "lt-cred-mech\nrealm=example.org\nuser=test:secret\nallow-loopback-peers\nfingerprint\n";

/// Runs uclient with `args` against `server` on 127.0.0.1 ([`run_uclient`]).
fn uclient(server: &Server, args: &[&str], min_msgs: u64) -> String {
    run_uclient(args, "127.0.0.1", min_msgs, &|| server.log_text())
}

fn peer() -> (Background, u16) {
    turnutils_peer("127.0.0.1")
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
