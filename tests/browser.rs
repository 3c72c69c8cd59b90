//! Real browsers: headless Chromium (Debian `chromium`, driven by
//! playwright-core from `tests/browser`) gathers a srflx candidate from our
//! STUN service and relays a data channel between two RTCPeerConnections with
//! `iceTransportPolicy: 'relay'` over TURN/UDP, TURN/TCP and TURNS.

mod common;

use std::time::Duration;

use common::{Options, Server, run_with_timeout};

#[test]
fn chromium_gathers_srflx_and_relays_data_channels_over_udp_tcp_and_tls() {
    let s = Server::start(
        Options::new("lt-cred-mech\nrealm=example.org\nuser=demo:secret\nallow-loopback-peers\nfingerprint\n").tls(),
    );
    let mut cmd = common::webrtc_relay();
    cmd.args([
        "--stun",
        &format!("stun:127.0.0.1:{}", s.port),
        "--turn",
        &format!("turn:127.0.0.1:{}?transport=udp", s.port),
        "--turn",
        &format!("turn:127.0.0.1:{}?transport=tcp", s.port),
        "--turn",
        &format!("turns:localhost:{}?transport=tcp", s.tls_port),
        "--username",
        "demo",
        "--credential",
        "secret",
        "--timeout-ms",
        "90000",
    ]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(120));
    assert!(
        ok,
        "browser checks failed:\n{out}\n---- server log ----\n{}",
        s.log_text()
    );
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines.iter().all(|l| l.contains("\"ok\":true")), "{out}");
    assert!(lines[0].contains("\"check\":\"srflx\""), "{out}");
    for (line, proto) in lines[1..].iter().zip(["udp", "tcp", "tls"]) {
        assert!(line.contains("\"localType\":\"relay\""), "{line}");
        assert!(line.contains("\"remoteType\":\"relay\""), "{line}");
        assert!(
            line.contains(&format!("\"relayProtocol\":\"{proto}\"")),
            "{line}"
        );
    }
    let log = s.log_text();
    for t in ["udp", "tcp", "tls"] {
        assert!(
            log.contains(&format!("allocation created five_tuple={t} ")),
            "no {t} allocation:\n{log}"
        );
    }
}
