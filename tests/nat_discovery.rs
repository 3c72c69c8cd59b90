//! RFC 5780 NAT behaviour discovery: coturn's `turnutils_natdiscovery`
//! (from Debian's coturn package, unpacked in /opt/coturn by
//! tests/run-all.sh) against the real binary with two listening addresses
//! and `rfc5780`, and against coturn 4.6.1 set up the same way: the two
//! reports must agree line for line (server ports named, client ports
//! blanked; OTHER-ADDRESS aside, where coturn departs from RFC 5780 §7.4),
//! and say what the loopback "NAT" is: endpoint-independent
//! mapping and filtering. Then the attributes themselves: OTHER-ADDRESS,
//! RESPONSE-ORIGIN, CHANGE-REQUEST answered from the other address and
//! port, RESPONSE-PORT, PADDING; and none of it without `rfc5780`. With
//! RFC 3489 on too, Debian's classic `stun` client detects the NAT as it
//! does against coturn.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::binding_request;
use common::{Background, Options, Server, TempDir, free_ports, run_with_timeout};
use turnserver::stun::{Class, Message, MessageWriter, attr, method};

const COTURN_BIN: &str = "/opt/coturn/usr/bin";

/// Runs natdiscovery's mapping and filtering tests against 127.0.0.1:`port`
/// and returns its report with `port` written P, `alt` written A and every
/// other port (the client's own) blanked.
fn natdiscovery(port: u16, alt: u16) -> String {
    let bin = format!("{COTURN_BIN}/turnutils_natdiscovery");
    assert!(
        std::path::Path::new(&bin).exists(),
        "{bin} is missing: run benches/setup-coturn.sh (tests/run-all.sh does)"
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["-m", "-f", "-p", &port.to_string(), "127.0.0.1"]);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(ok, "natdiscovery failed:\n{out}");
    out.lines()
        .map(|line| {
            let mut norm = String::new();
            let mut rest = line;
            while let Some(i) = rest.find(':') {
                norm.push_str(&rest[..=i]);
                rest = &rest[i + 1..];
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                if digits > 0 {
                    let n: u32 = rest[..digits].parse().unwrap();
                    norm.push_str(match n {
                        n if n == u32::from(port) => "P",
                        n if n == u32::from(alt) => "A",
                        _ => "*",
                    });
                    rest = &rest[digits..];
                }
            }
            norm.push_str(rest);
            norm
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// coturn 4.6.1 on 127.0.0.1 and 127.0.0.2, `port` and `alt`.
fn coturn(port: u16, alt: u16) -> (Background, TempDir) {
    let dir = TempDir::new("coturn-5780");
    let conf = dir.path("turnserver.conf");
    std::fs::write(
        &conf,
        format!(
            "listening-ip=127.0.0.1\nlistening-ip=127.0.0.2\nlistening-port={port}\n\
             alt-listening-port={alt}\nno-tls\nno-dtls\nno-cli\nlog-file=stdout\n\
             pidfile={}\n",
            dir.path("turnserver.pid").display()
        ),
    )
    .unwrap();
    let child = Command::new(format!("{COTURN_BIN}/turnserver"))
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start coturn");
    let process = Background(child);
    // Ready when both addresses answer a Binding.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = [0u8; 512];
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let to: SocketAddr = format!("{ip}:{alt}").parse().unwrap();
        loop {
            assert!(Instant::now() < deadline, "coturn does not answer on {to}");
            sock.send_to(&binding_request([3; 12]), to).unwrap();
            if sock.recv_from(&mut buf).is_ok() {
                break;
            }
        }
    }
    (process, dir)
}

fn ours(extra: &str) -> (Server, u16) {
    let alt = free_ports(1);
    let s = Server::start(Options::new(&format!(
        "listening-ip=127.0.0.2\nalt-listening-port={alt}\n{extra}"
    )));
    (s, alt)
}

#[test]
fn natdiscovery_reports_as_it_does_against_coturn() {
    let (s, alt) = ours("rfc5780\n");
    let mine = natdiscovery(s.port, alt);
    let base = free_ports(2);
    let (_coturn, _dir) = coturn(base, base + 1);
    let theirs = natdiscovery(base, base + 1);
    // OTHER-ADDRESS is where "change IP and port" answers from (RFC 5780
    // §7.4): from 127.0.0.2:P that is 127.0.0.1:A, which we say; coturn
    // says 127.0.0.2:A there. Every other line must agree.
    let without_other = |report: &str| {
        report
            .lines()
            .filter(|l| !l.contains("Other addr"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        without_other(&mine),
        without_other(&theirs),
        "natdiscovery against turnserver:\n{mine}\n\nagainst coturn:\n{theirs}\n\n{}",
        s.log_text()
    );
    assert!(
        mine.contains("NAT with Endpoint Independent Mapping!"),
        "{mine}"
    );
    assert!(
        mine.contains("NAT with Endpoint Independent Filtering!"),
        "{mine}"
    );
}

/// A Binding request with `attrs`, sent from `sock` to `to`; the response
/// and the address it came from.
fn binding(
    sock: &UdpSocket,
    to: SocketAddr,
    attrs: &[(u16, Vec<u8>)],
) -> Option<(Vec<u8>, SocketAddr)> {
    let mut out = Vec::new();
    let mut w = MessageWriter::new(&mut out, method::BINDING, Class::Request, &[8; 12]);
    for (t, v) in attrs {
        w.attr(*t, v);
    }
    sock.send_to(&out, to).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = sock.recv_from(&mut buf).ok()?;
    Some((buf[..n].to_vec(), from))
}

fn address(raw: &[u8], typ: u16) -> Option<SocketAddr> {
    let m = Message::parse(raw).unwrap();
    m.get(typ).map(|v| attr::decode_address(typ, v).unwrap())
}

#[test]
fn change_request_response_port_and_padding() {
    let (s, alt) = ours("rfc5780\n");
    let server: SocketAddr = ([127, 0, 0, 1], s.port).into();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let other: SocketAddr = ([127, 0, 0, 2], alt).into();

    let (raw, from) = binding(&sock, server, &[]).unwrap();
    assert_eq!(from, server);
    assert_eq!(address(&raw, attr::OTHER_ADDRESS), Some(other));
    assert_eq!(address(&raw, attr::RESPONSE_ORIGIN), Some(server));
    assert_eq!(
        address(&raw, attr::MAPPED_ADDRESS),
        Some(sock.local_addr().unwrap())
    );
    for (flags, expected) in [
        (0x04u8, SocketAddr::from(([127, 0, 0, 2], s.port))),
        (0x02, SocketAddr::from(([127, 0, 0, 1], alt))),
        (0x06, other),
    ] {
        let (raw, from) = binding(
            &sock,
            server,
            &[(attr::CHANGE_REQUEST, vec![0, 0, 0, flags])],
        )
        .unwrap();
        assert_eq!(from, expected, "CHANGE-REQUEST {flags:#x}");
        assert_eq!(address(&raw, attr::RESPONSE_ORIGIN), Some(expected));
    }
    // RESPONSE-PORT: the answer goes to another port of the same address.
    let second = UdpSocket::bind("127.0.0.1:0").unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let port = second.local_addr().unwrap().port();
    let [hi, lo] = port.to_be_bytes();
    let mut out = Vec::new();
    MessageWriter::new(&mut out, method::BINDING, Class::Request, &[9; 12])
        .attr(attr::RESPONSE_PORT, &[hi, lo, 0, 0]);
    sock.send_to(&out, server).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = second.recv_from(&mut buf).unwrap();
    assert_eq!(
        Message::parse(&buf[..n])
            .unwrap()
            .xor_address(attr::XOR_MAPPED_ADDRESS),
        Some(Ok(sock.local_addr().unwrap()))
    );
    // PADDING: the answer is padded as much.
    let (raw, _) = binding(&sock, server, &[(attr::PADDING, vec![0; 400])]).unwrap();
    assert_eq!(
        Message::parse(&raw)
            .unwrap()
            .get(attr::PADDING)
            .map(<[u8]>::len),
        Some(400)
    );
}

#[test]
fn without_rfc5780_none_of_it_is_offered() {
    let (s, _alt) = ours("");
    let server: SocketAddr = ([127, 0, 0, 1], s.port).into();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (raw, _) = binding(&sock, server, &[]).unwrap();
    assert_eq!(address(&raw, attr::OTHER_ADDRESS), None);
    assert_eq!(address(&raw, attr::RESPONSE_ORIGIN), None);
    let (raw, from) = binding(&sock, server, &[(attr::CHANGE_REQUEST, vec![0, 0, 0, 6])]).unwrap();
    assert_eq!(from, server);
    let m = Message::parse(&raw).unwrap();
    assert_eq!(
        m.get(attr::ERROR_CODE)
            .map(|v| attr::decode_error_code(v).unwrap().0),
        Some(420)
    );
}

/// The verdict lines of the RFC 3489 `stun` client (Debian's stun-client)
/// against 127.0.0.1:`port`: its tests I to III, what it concludes.
fn classic_stun_verdict(port: u16) -> String {
    let bin = common::require_tool("stun", "apt-get install stun-client");
    let mut cmd = Command::new(bin);
    cmd.args([&format!("127.0.0.1:{port}"), "-v"]);
    let (_, out) = run_with_timeout(&mut cmd, Duration::from_secs(60));
    out.lines()
        .filter(|l| {
            l.starts_with("test ")
                || l.starts_with("is nat")
                || l.starts_with("mapped IP same")
                || l.starts_with("hairpin")
                || l.starts_with("preserver port")
                || l.starts_with("Primary:")
                || l.starts_with("Return value")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn rfc3489_stun_client_detects_the_nat_as_against_coturn() {
    let (s, _alt) = ours("rfc5780\nstun-backward-compatibility\n");
    let mine = classic_stun_verdict(s.port);
    let base = free_ports(2);
    let (_coturn, _dir) = coturn(base, base + 1);
    let theirs = classic_stun_verdict(base);
    assert!(mine.contains("Primary: Open"), "{mine}\n{}", s.log_text());
    assert_eq!(mine, theirs, "turnserver:\n{mine}\n\ncoturn:\n{theirs}");
}
