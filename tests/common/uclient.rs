//! coturn's own test client `turnutils_uclient` and echo peer
//! `turnutils_peer` (from Debian's `coturn`, unpacked by tests/run-all.sh).

use std::process::Command;
use std::time::Duration;

use super::{Background, free_ports, require_tool, run_with_timeout};

/// Runs uclient with `args` against `server_ip` and checks its report:
/// every message sent came back, at least `min_msgs` were sent, no ERROR.
/// `server_log` is printed with a failure. Returns uclient's output.
pub fn run_uclient(
    args: &[&str],
    server_ip: &str,
    min_msgs: u64,
    server_log: &dyn Fn() -> String,
) -> String {
    run_uclient_in(None, args, server_ip, min_msgs, server_log)
}

/// [`run_uclient`] inside network namespace `netns` when given.
pub fn run_uclient_in(
    netns: Option<&str>,
    args: &[&str],
    server_ip: &str,
    min_msgs: u64,
    server_log: &dyn Fn() -> String,
) -> String {
    let bin = require_tool(
        "turnutils_uclient",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args).arg(server_ip);
    let (ok, out) = run_with_timeout(&mut cmd, Duration::from_secs(90));
    let lost = out
        .lines()
        .find(|l| l.contains("Total lost packets"))
        .unwrap_or_else(|| {
            panic!(
                "uclient gave no report (ok={ok}):\n{out}\n---- server log ----\n{}",
                server_log()
            )
        });
    assert!(
        lost.contains("Total lost packets 0 (0.000000%)"),
        "packets lost:\n{out}\n---- server log ----\n{}",
        server_log()
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

/// `turnutils_peer` echoing on `ip`; its port (it binds port and port + 1).
pub fn turnutils_peer(ip: &str) -> (Background, u16) {
    let bin = require_tool(
        "turnutils_peer",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let port = free_ports(2);
    let child = Command::new(bin)
        .args(["-L", ip, "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start turnutils_peer");
    std::thread::sleep(Duration::from_millis(300));
    (Background(child), port)
}
