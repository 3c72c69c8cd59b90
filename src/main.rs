//! `turnserver`: reads the configuration, binds every listener, then runs
//! the workers until SIGTERM or SIGINT.

use std::fs::OpenOptions;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};
use tracing_subscriber::fmt::writer::MakeWriterExt;

use turnserver::auth::NonceIssuer;
use turnserver::config::{self, AuthKind, Config, Invocation, LoadError};
use turnserver::server::{self, Plan, Shared, ports::PortPool, relay::Reservations};
use turnserver::turn;

fn main() -> ExitCode {
    let loaded = match config::load(std::env::args_os()) {
        Ok(Invocation::Run(l)) => l,
        Ok(Invocation::Version) => {
            println!("turnserver {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(LoadError::Usage(e)) => e.exit(),
        Err(LoadError::Config(e)) => {
            eprintln!("turnserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cfg = loaded.config;
    if let Err(e) = init_logging(&cfg) {
        eprintln!("turnserver: {e}");
        return ExitCode::FAILURE;
    }
    // A panic is a bug. Log it and abort, so the service manager restarts the
    // whole server instead of leaving one worker's clients on a dead thread.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        error!("internal error, exiting: {info}");
        default_hook(info);
        std::process::abort();
    }));
    info!(
        "turnserver {} starting; configuration: {}",
        env!("CARGO_PKG_VERSION"),
        cfg.config_file
            .as_ref()
            .map_or("none".to_string(), |p| p.display().to_string())
    );
    for w in &loaded.warnings {
        warn!("{w}");
    }
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("turnserver: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stdout and/or `log-file`; `-v` adds per-request lines, `-V`
/// everything.
fn init_logging(cfg: &Config) -> Result<(), String> {
    let level = match cfg.verbose {
        0 => tracing::Level::INFO,
        1 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false);
    match &cfg.log_file {
        None => builder.with_writer(std::io::stdout).init(),
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    cfg.error("log-file", format!("cannot open {}: {e}", path.display()))
                        .to_string()
                })?;
            let file = Mutex::new(file);
            if cfg.no_stdout_log || cfg.daemon {
                builder.with_writer(file).init();
            } else {
                builder.with_writer(file.and(std::io::stdout)).init();
            }
        }
    }
    Ok(())
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "turnserver".to_string())
}

fn run(cfg: Config) -> Result<(), String> {
    // TLS first: an unusable certificate is a configuration error.
    let tls = match (&cfg.cert, &cfg.pkey, cfg.no_tls) {
        (_, _, true) => None,
        (Some(cert), Some(key), false) => {
            let sc = server::tls::load(cert, key, cfg.no_tlsv1_2)
                .map_err(|m| cfg.error("cert", m).to_string())?;
            Some(tokio_rustls::TlsAcceptor::from(sc))
        }
        (Some(_), None, false) => {
            return Err(cfg.error("cert", "is set but pkey is not").to_string());
        }
        (None, Some(_), false) => {
            return Err(cfg.error("pkey", "is set but cert is not").to_string());
        }
        (None, None, false) => {
            info!("no cert/pkey configured: TLS listeners are off");
            None
        }
    };

    let local =
        server::net::local_addresses().map_err(|e| format!("cannot list local addresses: {e}"))?;
    let listening_ips = server::expand_listening_ips(&cfg.listening_ips, &local);
    if listening_ips.is_empty() {
        return Err("no address to listen on".to_string());
    }
    let plan = listener_plan(&cfg, &listening_ips, tls.is_some());
    if plan.udp.is_empty() && plan.tcp.is_empty() {
        return Err("every listener is turned off (no-udp, no-tcp, no TLS)".to_string());
    }

    let realm = cfg.effective_realm(&hostname());
    let auth = cfg.authenticator(&realm);
    match cfg.auth_kind() {
        AuthKind::None => warn!(
            "NO AUTHENTICATION: any client can allocate relays on this server. \
             Set lt-cred-mech with user=name:password, or use-auth-secret with static-auth-secret."
        ),
        AuthKind::LongTerm => info!(
            "authentication: long-term credentials, realm '{realm}', {} user(s)",
            cfg.users.len()
        ),
        AuthKind::RestApi => info!(
            "authentication: TURN REST API, realm '{realm}', {} secret(s), separator '{}'",
            cfg.static_auth_secrets.len(),
            cfg.rest_api_separator
        ),
    }
    if cfg.auth_kind() != AuthKind::None && cfg.realm.is_none() {
        warn!("realm is not set; using '{realm}'");
    }
    let own_relay_ips = if cfg.relay_ips.is_empty() {
        listening_ips.clone()
    } else {
        cfg.relay_ips.clone()
    };
    let policy = cfg.peer_policy(own_relay_ips);
    info!("{}", policy.describe());

    let stale = (cfg.stale_nonce > 0).then_some(cfg.stale_nonce);
    let mut core = turn::Config::new(auth, NonceIssuer::new(rand::random(), stale));
    core.fingerprint = cfg.fingerprint;
    core.software = cfg
        .software_attribute
        .then(|| format!("turnserver {}", env!("CARGO_PKG_VERSION")));
    core.max_allocation_lifetime = cfg.max_allocate_lifetime;
    core.permission_lifetime = cfg.permission_lifetime;
    core.channel_lifetime = cfg.channel_lifetime;
    core.policy = policy;
    core.relay_ips = cfg.relay_ips.clone();
    core.listening_ips = listening_ips.clone();
    core.external_ips = cfg.external_ips.clone();
    core.default_family = cfg.default_family;
    core.allow_udp_relay = !cfg.no_udp_relay;
    core.mobility = cfg.mobility;
    core.unauthenticated_rate =
        (cfg.unauthorized_ratelimit_rps > 0).then_some(cfg.unauthorized_ratelimit_rps);
    core.secure_stun = cfg.secure_stun;
    core.no_stun = cfg.no_stun;
    core.stun_only = cfg.stun_only;
    core.limits = cfg.limits;
    core.ticket_key = rand::random();

    let bound = server::bind(&plan).map_err(|e| e.to_string())?;
    for a in &plan.udp {
        info!("listening on udp {a}");
    }
    for (a, is_tls) in &plan.tcp {
        info!("listening on {} {a}", if *is_tls { "tls" } else { "tcp" });
    }
    info!(
        "relay ports {}-{} on {}",
        cfg.min_port,
        cfg.max_port,
        if cfg.relay_ips.is_empty() {
            "the address each client connects to".to_string()
        } else {
            cfg.relay_ips
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    for e in &cfg.external_ips {
        match e.private {
            Some(p) => info!("advertising {} for relays on {p}", e.public),
            None => info!("advertising {} for every relay of its family", e.public),
        }
    }

    if cfg.daemon {
        if cfg.log_file.is_none() {
            warn!("daemon mode without log-file: log lines are discarded");
        }
        nix::unistd::daemon(true, false).map_err(|e| format!("cannot daemonize: {e}"))?;
    }

    let shared = Arc::new(Shared {
        core: Arc::new(core),
        tls,
        pool: PortPool::new(cfg.min_port, cfg.max_port),
        reservations: Reservations::default(),
        relay_device: cfg.relay_device.clone(),
        streams: server::StreamCount::new(cfg.max_stream_connections_per_ip),
        idle_timeout: std::time::Duration::from_secs(u64::from(cfg.max_allocate_timeout)),
    });
    server::start(bound, shared).map_err(|e| format!("cannot start workers: {e}"))?;
    wait_for_signals();
    Ok(())
}

fn listener_plan(cfg: &Config, ips: &[IpAddr], tls: bool) -> Plan {
    let workers = cfg
        .relay_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut plain = vec![cfg.listening_port];
    plain.extend(cfg.alt_listening_port);
    let mut secure = vec![cfg.tls_listening_port];
    secure.extend(cfg.alt_tls_listening_port);
    let mut plan = Plan {
        udp: Vec::new(),
        tcp: Vec::new(),
        workers,
        listening_device: cfg.listening_device.clone(),
    };
    for &ip in ips {
        for &port in &plain {
            let a = SocketAddr::new(ip, port);
            if !cfg.no_udp {
                plan.udp.push(a);
            }
            if !cfg.no_tcp {
                plan.tcp.push((a, false));
            }
        }
        if tls {
            for &port in &secure {
                plan.tcp.push((SocketAddr::new(ip, port), true));
            }
        }
    }
    plan
}

/// Blocks until SIGTERM or SIGINT. SIGHUP and SIGUSR2 (coturn's reload
/// signals) are caught so they cannot kill the server.
fn wait_for_signals() {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the signal handler: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async {
        let (Ok(mut term), Ok(mut int), Ok(mut hup), Ok(mut usr2)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined2()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: shutting down"); return; }
                _ = int.recv() => { info!("SIGINT: shutting down"); return; }
                _ = hup.recv() => warn!("SIGHUP: configuration reload is not implemented yet; ignored"),
                _ = usr2.recv() => warn!("SIGUSR2: certificate reload is not implemented yet; ignored"),
            }
        }
    });
}
