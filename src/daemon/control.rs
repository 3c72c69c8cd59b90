//! Commands that talk to a running server instead of being one:
//! `--health-check` (a container's HEALTHCHECK) and `--drain` (a
//! Kubernetes `preStop` hook). Both run from inside a `FROM scratch` image,
//! which has no shell, curl or kill.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::Config;

/// Where the metrics endpoint of the server configured by `cfg` answers
/// locally: `prometheus-address` unless it is a wildcard, then loopback.
fn metrics_host(cfg: &Config) -> String {
    match cfg.prometheus_address {
        Some(IpAddr::V4(a)) if !a.is_unspecified() => a.to_string(),
        Some(IpAddr::V6(a)) if !a.is_unspecified() => a.to_string(),
        Some(IpAddr::V6(_)) => Ipv6Addr::LOCALHOST.to_string(),
        _ => Ipv4Addr::LOCALHOST.to_string(),
    }
}

/// A runtime for the requests of one command.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// One GET of the server's own endpoint on `rt`, within 3 s.
fn get(rt: &tokio::runtime::Runtime, cfg: &Config, path: &str) -> Result<(u16, String), String> {
    let host = metrics_host(cfg);
    rt.block_on(async {
        match tokio::time::timeout(
            Duration::from_secs(3),
            super::http::request(&host, cfg.prometheus_port, "GET", path, &[]),
        )
        .await
        {
            Ok(r) => r.map_err(|e| format!("http://{host}:{}{path}: {e}", cfg.prometheus_port)),
            Err(_) => Err(format!(
                "http://{host}:{}{path}: no answer in 3 s",
                cfg.prometheus_port
            )),
        }
    })
}

/// `--health-check`: 0 when `/health` answers 200, or when metrics are off
/// (then only the process's existence can be checked, which the container
/// runtime does itself); 1 otherwise (draining, not answering).
pub fn health_check(cfg: &Config) -> ExitCode {
    if !cfg.prometheus {
        println!("metrics are off (prometheus): nothing to ask");
        return ExitCode::SUCCESS;
    }
    match runtime().and_then(|rt| get(&rt, cfg, "/health")) {
        Ok((200, body)) => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            println!("HTTP {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            println!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// The process named `turnserver` to drain: the one in `pidfile` when that
/// file exists, else the only other one running (in a container it is
/// process 1). Errors name what was looked at.
fn find_server(cfg: &Config) -> Result<i32, String> {
    if let Some(path) = &cfg.pidfile
        && let Ok(text) = std::fs::read_to_string(path)
    {
        return text
            .trim()
            .parse::<i32>()
            .map_err(|_| format!("{}: not a process id", path.display()));
    }
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").map_err(|e| format!("/proc: {e}"))? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim() == "turnserver")
        {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        [] => Err("no turnserver process found".into()),
        many => Err(format!(
            "{} turnserver processes ({}): set pidfile to say which",
            many.len(),
            many.iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// `--drain`: SIGUSR1 to the running server, then, with metrics on, waits
/// until `/live` reports no allocations or `drain-timeout` seconds passed.
/// 0 once drained (or timed out: the caller's SIGTERM ends the rest); 1
/// when no server was found or it could not be signalled.
pub fn drain(cfg: &Config) -> ExitCode {
    let pid = match find_server(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("turnserver --drain: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    ) {
        eprintln!("turnserver --drain: cannot signal process {pid}: {e}");
        return ExitCode::FAILURE;
    }
    println!("process {pid} drains: new allocations go elsewhere");
    if !cfg.prometheus {
        println!("metrics are off (prometheus): not waiting for allocations to end");
        return ExitCode::SUCCESS;
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnserver --drain: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = Duration::from_secs(u64::from(cfg.drain_timeout));
    let start = Instant::now();
    let mut last = None;
    loop {
        let left = match get(&rt, cfg, "/live") {
            Ok((200, body)) => body
                .lines()
                .find_map(|l| l.strip_prefix("allocations: "))
                .and_then(|n| n.trim().parse::<u64>().ok()),
            _ => None,
        };
        match left {
            Some(0) => {
                println!("no allocations left after {} s", start.elapsed().as_secs());
                return ExitCode::SUCCESS;
            }
            Some(n) if last != Some(n) => {
                println!("{n} allocations left");
                last = Some(n);
            }
            _ => {}
        }
        if start.elapsed() >= limit {
            println!(
                "drain-timeout ({} s) passed with {} allocations left",
                limit.as_secs(),
                last.map_or("an unknown number of".to_string(), |n| n.to_string())
            );
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
