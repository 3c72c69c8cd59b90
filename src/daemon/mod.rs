//! The daemon's life: start-up, reload, drain and stop, signals, systemd
//! notification and metrics. `main` is all the binary runs.
//!
//! Start-up reads and checks the configuration and certificates, binds every
//! listener, then (optionally) detaches, writes the pid file, drops
//! privileges, starts the workers and tells systemd it is ready. Then the
//! main thread waits for signals:
//!
//! - SIGHUP re-reads the configuration file and certificates and reopens
//!   the log file; a bad configuration is refused and the old one stays.
//! - SIGUSR2 reloads only the certificates.
//! - SIGUSR1 drains: new allocations are refused (508, or 300 with
//!   `alternate-server`), existing ones carry on, health checks fail.
//! - SIGTERM or SIGINT drains and exits once allocations are gone or
//!   `drain-timeout` passes; a second one exits at once.

pub mod control;
pub mod external;
mod http;
pub mod logging;
pub mod metrics;
pub mod process;
pub mod takeover;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tracing::{error, info, warn};

use crate::auth::NonceIssuer;
use crate::config::{self, AuthKind, Config, Invocation, LoadError};
use crate::server::{
    self, Plan, Server, Shared, Steering, StreamCount, StreamPort, Telemetry, ports::PortPool,
    relay::Reservations,
};
use crate::turn;

/// What stays fixed across reloads.
struct Fixed {
    listening_ips: Vec<IpAddr>,
    nonce_secret: [u8; 32],
    ticket_key: [u8; 32],
    hostname: String,
    /// Allocation statuses are reported (a fleet or `redis-statsdb`).
    report_allocations: bool,
    /// The eBPF fast path is loaded: the core announces channel bindings.
    offload: bool,
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "turnserver".to_string())
}

/// Tells systemd, when it is listening (NOTIFY_SOCKET).
fn notify(states: &[NotifyState]) {
    let _ = sd_notify::notify(states);
}

/// Loads the TLS certificate when TLS is on. Errors name the config line.
fn tls_acceptor(cfg: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>, String> {
    match (&cfg.cert, &cfg.pkey, cfg.no_tls) {
        (_, _, true) => Ok(None),
        (Some(cert), Some(key), false) => {
            let sc = server::tls::load(cert, key, cfg.no_tlsv1_2)
                .map_err(|m| cfg.error("cert", m).to_string())?;
            Ok(Some(tokio_rustls::TlsAcceptor::from(sc)))
        }
        (Some(_), None, false) => Err(cfg.error("cert", "is set but pkey is not").to_string()),
        (None, Some(_), false) => Err(cfg.error("pkey", "is set but cert is not").to_string()),
        (None, None, false) => Ok(None),
    }
}

/// The DTLS certificate for `cfg`: the TLS files' when TLS is on, DTLS is
/// not turned off (`no-dtls`) and the key is ECDSA (the only kind `dimpl`
/// signs with; an RSA key turns DTLS off with a warning).
fn dtls_certificate(cfg: &Config) -> Result<Option<dimpl::DtlsCertificate>, String> {
    let (Some(cert), Some(key), false, false) = (&cfg.cert, &cfg.pkey, cfg.no_tls, cfg.no_dtls)
    else {
        return Ok(None);
    };
    let loaded = server::dtls::load(cert, key).map_err(|m| cfg.error("cert", m).to_string())?;
    if loaded.is_none() {
        warn!(
            "DTLS is off: its library signs with ECDSA keys only and {} is not one (TLS is unaffected)",
            key.display()
        );
    }
    Ok(loaded)
}

/// The core configuration for `cfg`.
fn core_config(cfg: &Config, fixed: &Fixed) -> turn::Config {
    let realm = cfg.effective_realm(&fixed.hostname);
    let own_relay_ips = if cfg.relay_ips.is_empty() {
        fixed.listening_ips.clone()
    } else {
        cfg.relay_ips.clone()
    };
    let stale = (cfg.stale_nonce > 0).then_some(u64::from(cfg.stale_nonce));
    let mut core = turn::Config::new(
        cfg.authenticator(&realm),
        NonceIssuer::new(fixed.nonce_secret, stale),
    );
    core.fingerprint = cfg.fingerprint;
    core.software = cfg
        .software_attribute
        .then(|| format!("turnserver {}", env!("CARGO_PKG_VERSION")));
    core.max_allocation_lifetime = cfg.max_allocate_lifetime;
    core.permission_lifetime = cfg.permission_lifetime;
    core.channel_lifetime = cfg.channel_lifetime;
    core.policy = cfg.peer_policy(own_relay_ips);
    core.relay_ips = cfg.relay_ips.clone();
    core.listening_ips = fixed.listening_ips.clone();
    core.external_ips = cfg.external_ips.clone();
    core.default_family = cfg.default_family;
    core.allow_udp_relay = !cfg.no_udp_relay;
    core.allow_tcp_relay = !cfg.no_tcp_relay;
    core.mobility = cfg.mobility;
    core.ticket_key = fixed.ticket_key;
    core.offload_channels = fixed.offload;
    core.unauthenticated_rate =
        (cfg.unauthorized_ratelimit_rps > 0).then_some(cfg.unauthorized_ratelimit_rps);
    core.secure_stun = cfg.secure_stun;
    core.rfc3489 = cfg.rfc3489;
    core.rfc5780 = cfg.rfc5780_ports(&fixed.listening_ips);
    core.password_algorithms = cfg.offered_password_algorithms(&core.auth);
    core.require_sha256 = cfg.require_sha256;
    core.check_origin_consistency = cfg.check_origin_consistency;
    core.report_allocations = fixed.report_allocations;
    core.no_stun = cfg.no_stun;
    core.stun_only = cfg.stun_only;
    core.limits = cfg.limits;
    core.alternate_servers = cfg.alternate_servers.clone();
    core.tls_alternate_servers = cfg.tls_alternate_servers.clone();
    core
}

/// Logs what the configuration means for clients.
fn describe(cfg: &Config, core: &turn::Config) {
    let realm = &core.auth.realm;
    match cfg.auth_kind() {
        AuthKind::None => warn!(
            "NO AUTHENTICATION: any client can allocate relays on this server. \
             Set lt-cred-mech with user=name:password, or use-auth-secret with static-auth-secret."
        ),
        AuthKind::LongTerm => info!(
            "authentication: long-term credentials, realm '{realm}', {} user(s){}",
            cfg.users.len(),
            cfg.userdb
                .as_ref()
                .map(|d| format!(" and the users of {d}"))
                .unwrap_or_default()
        ),
        AuthKind::RestApi => info!(
            "authentication: TURN REST API, realm '{realm}', {} secret(s){}, separator '{}'",
            cfg.static_auth_secrets.len(),
            cfg.userdb
                .as_ref()
                .map(|d| format!(" and the secrets of {d}"))
                .unwrap_or_default(),
            cfg.rest_api_separator
        ),
    }
    if cfg.auth_kind() != AuthKind::None && cfg.realm.is_none() {
        warn!("realm is not set; using '{realm}'");
    }
    if cfg.auth_kind() != AuthKind::None {
        describe_rfc8489(cfg, core);
    }
    match core.rfc5780 {
        Some((main, alt)) => info!(
            "RFC 5780 NAT discovery over UDP: ports {main} and {alt} on every listening address"
        ),
        None if cfg.rfc5780 => {
            warn!("rfc5780 is set but needs two listening-ip of one family (and UDP): not offered")
        }
        None => {}
    }
    if let Some(port) = cfg.tcp_proxy_port {
        warn!(
            "tcp-proxy-port {port}: every connection there must start with a PROXY header, and \
             any source may claim any client address with one: let only the load balancer reach \
             it (or use proxy-protocol-allow, which checks the source)"
        );
    }
    if !cfg.proxy_protocol_allow.is_empty() {
        let list: Vec<String> = cfg
            .proxy_protocol_allow
            .iter()
            .map(ToString::to_string)
            .collect();
        info!(
            "PROXY protocol: TCP and TLS connections from {} must start with a PROXY header (v1 or v2)",
            list.join(", ")
        );
    }
    info!("{}", core.policy.describe());
}

/// Logs the RFC 8489 §9.2 security offered: password algorithms, whether
/// MESSAGE-INTEGRITY-SHA256 is required, and USERHASH.
fn describe_rfc8489(cfg: &Config, core: &turn::Config) {
    let algorithms = &core.password_algorithms;
    let list = if algorithms.is_empty() {
        "none offered (RFC 5389 keys)".to_string()
    } else {
        algorithms
            .iter()
            .map(|a| a.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let anonymity = core.security_features() & crate::auth::FEATURE_USERNAME_ANONYMITY != 0;
    info!(
        "RFC 8489: password algorithms {list}; MESSAGE-INTEGRITY-SHA256 {}; USERHASH {}",
        if core.require_sha256 {
            "required"
        } else {
            "accepted"
        },
        if anonymity {
            "accepted for the configured users"
        } else {
            "not offered"
        }
    );
    let sha256 = algorithms.contains(&crate::auth::PasswordAlgorithm::Sha256);
    if sha256 && !cfg.sha256_keys(&core.auth) {
        warn!(
            "password-algorithms offers sha256, but users given as 0x keys or kept in the user \
             database have only an MD5 key: a client choosing SHA-256 for them gets 401. \
             password-algorithms=auto offers md5 alone in this case"
        );
    }
}

/// Where clients reach this node, for a fleet's redirects: `node-address`,
/// else the public `external-ip`, else the first listening address that is
/// not loopback (or the first one); on the listening port, and over TLS on
/// the TLS port when TLS is on.
fn node_addresses(
    cfg: &Config,
    listening: &[IpAddr],
    tls: bool,
) -> (SocketAddr, Option<SocketAddr>) {
    let ip = cfg
        .node_address
        .map(|a| a.ip())
        .or_else(|| cfg.external_ips.iter().map(|e| e.public).next())
        .or_else(|| listening.iter().copied().find(|ip| !ip.is_loopback()))
        .or_else(|| listening.first().copied())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let port = cfg
        .node_address
        .map(|a| a.port())
        .filter(|p| *p != 0)
        .unwrap_or(cfg.listening_port);
    let tls_address = (tls && !cfg.no_tls).then(|| SocketAddr::new(ip, cfg.tls_listening_port));
    (SocketAddr::new(ip, port), tls_address)
}

/// The option that names `db`, for errors.
fn userdb_option(db: &crate::userdb::UserDb) -> &'static str {
    match db {
        crate::userdb::UserDb::Sqlite(_) => "userdb",
        crate::userdb::UserDb::Postgres(_) => "psql-userdb",
        crate::userdb::UserDb::MySql(_) => "mysql-userdb",
        crate::userdb::UserDb::Redis(_) => "redis-userdb",
    }
}

/// Opens the user database for the server: an SQLite file is created with
/// coturn's schema when missing; servers are connected to when first
/// queried (an unreachable one is an outage, not a start-up error).
async fn open_userdb(db: &crate::userdb::UserDb) -> Result<crate::userdb::Store, String> {
    crate::userdb::Store::open(db, true, false)
        .await
        .map_err(|e| e.to_string())
}

/// Settings that only a restart applies, changed between `old` and `new`:
/// the options marked restart-only in the table, and TLS listeners turned
/// on or off by a certificate appearing or going (certificates themselves
/// reload live).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = old.restart_only_changes(new);
    let tls_on = |c: &Config| !c.no_tls && c.cert.is_some() && c.pkey.is_some();
    if tls_on(old) != tls_on(new) {
        changed.push("cert/pkey (TLS listeners)");
    }
    changed
}

fn listener_plan(cfg: &Config, ips: &[IpAddr], tls: bool, dtls: bool) -> Plan {
    let workers = cfg
        .relay_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut plain = vec![cfg.listening_port];
    plain.extend(cfg.alt_listening_port);
    if let Some((_, alt)) = cfg.rfc5780_ports(ips)
        && !plain.contains(&alt)
    {
        plain.push(alt);
    }
    let mut secure = vec![cfg.tls_listening_port];
    secure.extend(cfg.alt_tls_listening_port);
    let mut plan = Plan {
        udp: Vec::new(),
        tcp: Vec::new(),
        dtls: Vec::new(),
        workers,
        listening_device: cfg.listening_device.clone(),
        sock_buf_size: cfg.sock_buf_size,
        udp_gro: cfg.udp_gro,
    };
    for &ip in ips {
        for &port in &plain {
            let a = SocketAddr::new(ip, port);
            if !cfg.no_udp {
                plan.udp.push(a);
            }
            if !cfg.no_tcp {
                plan.tcp.push((a, StreamPort::Plain));
            }
        }
        if tls {
            for &port in &secure {
                plan.tcp.push((SocketAddr::new(ip, port), StreamPort::Tls));
            }
        }
        if dtls {
            for &port in &secure {
                plan.dtls.push(SocketAddr::new(ip, port));
            }
        }
        if let Some(port) = cfg.tcp_proxy_port {
            plan.tcp
                .push((SocketAddr::new(ip, port), StreamPort::Proxy));
        }
    }
    plan
}

/// The daemon's entry point.
pub fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let loaded = match config::load(args.clone()) {
        Ok(Invocation::Run(l)) => l,
        Ok(Invocation::CheckConfig(l)) => return check_config(*l),
        Ok(Invocation::HealthCheck(l)) => return control::health_check(&l.config),
        Ok(Invocation::Drain(l)) => return control::drain(&l.config),
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
    let mut cfg = loaded.config;
    let logging = match logging::Logging::init(&cfg) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("turnserver: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    if !loaded.environment.is_empty() {
        info!(
            "settings from the environment: {}",
            loaded.environment.join(", ")
        );
    }
    for w in &loaded.warnings {
        warn!("{w}");
    }
    let detected = match detect_external_ip_now(&mut cfg) {
        Ok(d) => d,
        Err(e) => {
            error!("{e}");
            eprintln!("turnserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(cfg, args, logging, detected, loaded.takeover) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("turnserver: {e}");
            notify(&[NotifyState::Status(&format!("failed: {e}"))]);
            ExitCode::FAILURE
        }
    }
}

/// `external-ip=auto` before the server starts: detects on a runtime of its
/// own (dropped before any fork).
fn detect_external_ip_now(cfg: &mut Config) -> Result<Option<external::Detected>, String> {
    if cfg.external_ip_auto.is_none() {
        return Ok(None);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(apply_external_ip(cfg, None))
}

/// `external-ip=auto`: finds the public address ([`external::detect`]) and
/// adds it to `cfg.external_ips`. When detection fails, `previous` (the
/// address found before a reload) or `external-ip-fallback` stands in, with
/// a warning; without either it is an error. `Ok(None)` without `auto`.
async fn apply_external_ip(
    cfg: &mut Config,
    previous: Option<&external::Detected>,
) -> Result<Option<external::Detected>, String> {
    let Some(auto) = cfg.external_ip_auto else {
        return Ok(None);
    };
    let found = match external::detect(cfg).await {
        Ok(d) => {
            info!("external-ip=auto: {} (from {})", d.ip, d.source);
            d
        }
        Err(why) => match (previous, cfg.external_ip_fallback) {
            (Some(p), _) => {
                warn!(
                    "external-ip=auto: the public address was not found again ({why}); keeping {}",
                    p.ip
                );
                p.clone()
            }
            (None, Some(ip)) => {
                warn!(
                    "external-ip=auto: the public address was not found ({why}); using external-ip-fallback {ip}"
                );
                external::Detected {
                    ip,
                    source: "external-ip-fallback".into(),
                }
            }
            (None, None) => {
                return Err(format!(
                    "external-ip=auto: the public address was not found ({why}); set external-ip-stun=HOST:PORT, external-ip-fallback=ADDR or external-ip=ADDR"
                ));
            }
        },
    };
    if let Some(p) = auto.private
        && p.is_ipv4() != found.ip.is_ipv4()
    {
        return Err(format!(
            "external-ip=auto/{p}: the address found, {}, is of the other family",
            found.ip
        ));
    }
    cfg.external_ips.push(turn::ExternalIp {
        public: found.ip,
        private: auto.private,
    });
    Ok(Some(found))
}

/// `--check-config`: everything start-up checks before binding, then the
/// effective configuration.
fn check_config(loaded: config::Loaded) -> ExitCode {
    let cfg = loaded.config;
    // Detected on a copy: the printed configuration keeps `auto`, so that it
    // reads back as it was written.
    match detect_external_ip_now(&mut cfg.clone()) {
        Ok(Some(d)) => eprintln!("external-ip=auto: {} (from {})", d.ip, d.source),
        Ok(None) => {}
        Err(e) => {
            eprintln!("turnserver: {e}");
            return ExitCode::FAILURE;
        }
    }
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let checks = || -> Result<(), String> {
        tls_acceptor(&cfg)?;
        process::resolve(cfg.proc_user.as_deref(), cfg.proc_group.as_deref())?;
        Ok(())
    };
    if let Err(e) = checks() {
        eprintln!("turnserver: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "# effective configuration of turnserver {} ({})",
        env!("CARGO_PKG_VERSION"),
        cfg.config_file
            .as_ref()
            .map_or("no configuration file".to_string(), |p| p
                .display()
                .to_string())
    );
    print!("{}", cfg.render());
    eprintln!("configuration OK");
    ExitCode::SUCCESS
}

/// The running daemon, as the signal loop sees it.
struct Daemon {
    args: Vec<OsString>,
    cfg: Config,
    fixed: Fixed,
    server: Server,
    logging: logging::Logging,
    draining: Arc<AtomicBool>,
    /// Set by the first SIGTERM/SIGINT: exit once allocations are gone or at
    /// this time.
    stopping: Option<Instant>,
    exit_now: bool,
    /// The address `external-ip=auto` found last.
    detected: Option<external::Detected>,
    /// The metrics listener's address and a copy of its descriptor, for a
    /// successor.
    metrics_fd: Option<(SocketAddr, std::os::fd::OwnedFd)>,
    /// The successor's process id once it has taken over.
    handed_to: Option<i32>,
}

impl Daemon {
    fn status(&self) {
        let state = match (
            self.stopping.is_some(),
            self.draining.load(Ordering::Relaxed),
        ) {
            (true, _) => "stopping",
            (false, true) => "draining",
            (false, false) => "serving",
        };
        notify(&[NotifyState::Status(&format!(
            "{state}; {} allocations",
            self.server.allocations()
        ))]);
    }

    /// SIGHUP (`full`) or SIGUSR2 (certificates only).
    async fn reload(&mut self, full: bool) {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(t) = NotifyState::monotonic_usec_now() {
            states.push(t);
        }
        notify(&states);
        let what = if full {
            "configuration"
        } else {
            "certificates"
        };
        match self.try_reload(full).await {
            Ok(()) => info!("{what} reloaded"),
            Err(e) => error!("{what} not reloaded, the previous one stays in force: {e}"),
        }
        notify(&[NotifyState::Ready]);
        self.status();
    }

    async fn try_reload(&mut self, full: bool) -> Result<(), String> {
        if !full {
            let tls = tls_acceptor(&self.cfg)?;
            let dtls = dtls_certificate(&self.cfg)?;
            if tls.is_some() {
                self.server.set_tls(tls);
            }
            if dtls.is_some() {
                self.server.shared.dtls_cert.store(dtls.map(Arc::new));
            }
            return Ok(());
        }
        // logrotate moved the file: reopen it whatever else happens.
        if let Err(e) = self.logging.reopen(self.cfg.log_file.as_deref()) {
            error!("{e}");
        }
        let loaded = match config::load(self.args.clone()) {
            Ok(Invocation::Run(l))
            | Ok(Invocation::CheckConfig(l))
            | Ok(Invocation::HealthCheck(l))
            | Ok(Invocation::Drain(l)) => *l,
            Ok(Invocation::Version) => return Ok(()),
            Err(LoadError::Usage(e)) => return Err(e.to_string()),
            Err(LoadError::Config(e)) => return Err(e.to_string()),
        };
        let mut new = loaded.config;
        // Detected again, so that a moved address follows (an Elastic IP
        // reassigned); while detection fails the last address stays.
        let detected = apply_external_ip(&mut new, self.detected.as_ref()).await?;
        let tls = tls_acceptor(&new)?;
        let dtls = dtls_certificate(&new)?;
        for w in &loaded.warnings {
            warn!("{w}");
        }
        let restart = restart_only_changes(&self.cfg, &new);
        if !restart.is_empty() {
            warn!(
                "changed settings that need a restart to take effect: {}",
                restart.join(", ")
            );
        }
        let core = core_config(&new, &self.fixed);
        describe(&new, &core);
        self.server.set_config(Arc::new(core));
        if tls.is_some() {
            self.server.set_tls(tls);
        }
        if dtls.is_some() {
            self.server.shared.dtls_cert.store(dtls.map(Arc::new));
        }
        let shared = &self.server.shared;
        shared
            .streams
            .limit
            .store(new.max_stream_connections_per_ip, Ordering::Relaxed);
        shared
            .idle_timeout_secs
            .store(u64::from(new.max_allocate_timeout), Ordering::Relaxed);
        shared
            .proxy_allow
            .store(Arc::new(new.proxy_protocol_allow.clone()));
        shared
            .steering
            .enabled
            .store(new.udp_steering && !new.mobility, Ordering::Relaxed);
        shared
            .telemetry
            .per_user
            .store(new.prometheus_username_labels, Ordering::Relaxed);
        self.logging.set_level(logging::level_for(&new));
        if new.log_file != self.cfg.log_file
            && let Err(e) = self.logging.reopen(new.log_file.as_deref())
        {
            error!("{e}");
        }
        self.cfg = new;
        self.detected = detected;
        Ok(())
    }

    /// SIGUSR1: drain without exiting.
    fn drain(&mut self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            info!(
                "SIGUSR1: draining: new allocations are refused, {} existing ones carry on",
                self.server.allocations()
            );
            self.server.set_draining(true);
        }
        self.status();
    }

    /// SIGTERM / SIGINT.
    fn stop(&mut self, signal: &str) {
        if self.stopping.is_some() {
            info!("{signal} again: exiting now");
            self.exit_now = true;
            return;
        }
        let timeout = Duration::from_secs(u64::from(self.cfg.drain_timeout));
        let n = self.server.allocations();
        info!(
            "{signal}: shutting down; waiting up to {}s for {n} allocations to end",
            timeout.as_secs()
        );
        notify(&[NotifyState::Stopping]);
        self.stopping = Some(Instant::now() + timeout);
        self.draining.store(true, Ordering::Relaxed);
        self.server.set_draining(true);
        self.status();
    }

    /// A successor asks for the state ([`takeover`]): freezes the workers
    /// and assembles what goes over.
    async fn freeze(&self) -> Result<(server::takeover::State, Vec<std::os::fd::OwnedFd>), String> {
        let metrics = match &self.metrics_fd {
            Some((addr, fd)) => Some((
                *addr,
                fd.try_clone()
                    .map_err(|e| format!("metrics listener: {e}"))?,
            )),
            None => None,
        };
        let frozen = self.server.freeze().await?;
        let reservations = self.server.shared.reservations.copies(Instant::now());
        Ok(takeover::assemble(
            frozen,
            self.fixed.nonce_secret,
            self.fixed.ticket_key,
            metrics,
            reservations,
            std::array::from_fn(|i| self.server.shared.offloaded[i].load(Ordering::Relaxed)),
        ))
    }

    /// SIGTERM under systemd with a file descriptor store: puts the
    /// sockets and the state there for the next start (`systemctl
    /// restart`) and exits at once, so UDP clients wait only for the
    /// restart; TCP/TLS connections cannot be kept and close. False (and
    /// everything thawed) when there is no store or it fails: then SIGTERM
    /// drains as usual.
    async fn hand_to_fd_store(&mut self) -> bool {
        let Some(limit) = takeover::fd_store_limit() else {
            return false;
        };
        if self.stopping.is_some() || self.handed_to.is_some() {
            return false;
        }
        let started = Instant::now();
        let (state, fds) = match self.freeze().await {
            Ok(x) => x,
            Err(e) => {
                warn!(
                    "SIGTERM: cannot freeze for the file descriptor store: {e}; draining instead"
                );
                return false;
            }
        };
        let allocations: usize = state.workers.iter().map(|w| w.relays.len()).sum();
        match takeover::store(&state, &fds, limit) {
            Ok(()) => {
                self.server.handed();
                info!(
                    "SIGTERM: {allocations} allocations and {} sockets are in systemd's file descriptor store for the next start ({} ms); exiting now",
                    fds.len(),
                    started.elapsed().as_millis()
                );
                notify(&[NotifyState::Stopping]);
                self.handed_to = Some(0);
                self.exit_now = true;
                true
            }
            Err(e) => {
                warn!("SIGTERM: {e}; draining instead");
                self.server.thaw();
                false
            }
        }
    }

    /// The successor `pid` serves the UDP clients and the listeners now:
    /// this process drains its TCP/TLS clients and exits 0.
    fn handed(&mut self, pid: i32, allocations: usize, fds: usize, frozen: Duration) {
        self.server.handed();
        self.handed_to = Some(pid);
        let timeout = Duration::from_secs(u64::from(self.cfg.drain_timeout));
        info!(
            "takeover: handed {allocations} allocations and {fds} sockets to process {pid} (workers paused {} ms); {} allocations of TLS clients stay here for up to {}s (and TCP clients that were busy), then this process exits",
            frozen.as_millis(),
            (self.server.allocations() as usize).saturating_sub(allocations),
            timeout.as_secs()
        );
        notify(&[NotifyState::Stopping]);
        self.stopping = Some(Instant::now() + timeout);
    }

    fn should_exit(&self) -> bool {
        self.exit_now
            || self.stopping.is_some_and(|deadline| {
                self.server.allocations() == 0 || Instant::now() >= deadline
            })
    }
}

/// The data path of a configuration, with every listener bound but no
/// worker running yet: [`run`] starts it after daemonizing and dropping
/// privileges; tests can start it in their own process with
/// [`server::start`].
pub struct Prepared {
    pub bound: server::Bound,
    pub shared: Arc<Shared>,
    fixed: Fixed,
    /// The lookups the user database's task serves, with a database.
    userdb: Option<server::directory::Requests>,
    /// What the fleet task serves, in a fleet.
    fleet: Option<server::fleet::Inbox>,
    /// What the `redis-statsdb` task publishes.
    statsdb: Option<server::statsdb::Queue>,
    /// The metrics listener a predecessor handed over, with its address.
    inherited_metrics: Option<(SocketAddr, std::net::TcpListener)>,
    /// Interfaces on TC until the predecessor lets go of their XDP hook.
    xdp_pending: Vec<String>,
}

/// Reads the certificates, works out the listeners, binds them and builds
/// the state every worker shares. Errors name what could not be done.
pub fn prepare(cfg: &Config) -> Result<Prepared, String> {
    prepare_with(cfg, None)
}

/// [`prepare`], taking the sockets, allocations and keys of `incoming`
/// (a live takeover) instead of binding where they cover the plan.
fn prepare_with(
    cfg: &Config,
    incoming: Option<&mut takeover::Incoming>,
) -> Result<Prepared, String> {
    let tls = tls_acceptor(cfg)?;
    if tls.is_none() && !cfg.no_tls {
        info!("no cert/pkey configured: TLS listeners are off");
    }
    let local =
        server::net::local_addresses().map_err(|e| format!("cannot list local addresses: {e}"))?;
    let listening_ips = server::expand_listening_ips(&cfg.listening_ips, &local);
    if listening_ips.is_empty() {
        return Err("no address to listen on".to_string());
    }
    let dtls = dtls_certificate(cfg)?;
    let overlap = incoming.as_ref().is_some_and(|i| i.live());
    let inherited_offloaded = incoming
        .as_ref()
        .map(|i| i.state.offloaded)
        .unwrap_or_default();
    let offload = offload(cfg, &listening_ips, overlap)?;
    let (offload, xdp_pending) = match offload {
        Some(o) => (Some(o.offload), o.xdp_pending),
        None => (None, Vec::new()),
    };
    let mut plan = listener_plan(cfg, &listening_ips, tls.is_some(), dtls.is_some());
    // With the fast path, UDP GRO stays off: a network card's GRO would
    // coalesce a channel's datagrams for a socket that asked for it into
    // one frame, which the program must leave to user space.
    let udp_gro = cfg.udp_gro && offload.is_none();
    if cfg.udp_gro && !udp_gro {
        info!(
            "ebpf-offload: UDP GRO is off on the sockets, so that the fast path sees every datagram"
        );
    }
    plan.udp_gro = udp_gro;
    if plan.udp.is_empty() && plan.tcp.is_empty() {
        return Err("every listener is turned off (no-udp, no-tcp, no TLS)".to_string());
    }
    let fleet_redis = match &cfg.userdb {
        Some(crate::userdb::UserDb::Redis(e)) => Some(e.clone()),
        _ => None,
    };
    let fixed = Fixed {
        listening_ips: listening_ips.clone(),
        nonce_secret: incoming
            .as_ref()
            .map_or_else(rand::random, |i| i.state.nonce_secret),
        ticket_key: incoming
            .as_ref()
            .map_or_else(rand::random, |i| i.state.ticket_key),
        hostname: hostname(),
        report_allocations: fleet_redis.is_some() || cfg.redis_statsdb.is_some(),
        offload: false,
    };
    let fixed = Fixed {
        offload: offload.is_some(),
        ..fixed
    };
    let core = core_config(cfg, &fixed);
    describe(cfg, &core);

    let (bound, inherited_metrics, reservations) = match incoming {
        Some(i) => {
            let (inherited, metrics, reservations) =
                i.sockets().map_err(|e| format!("takeover: {e}"))?;
            let (bound, dropped) =
                server::bind_inherited(&plan, inherited).map_err(|e| e.to_string())?;
            if dropped > 0 {
                warn!(
                    "takeover: {dropped} allocations were on listeners no longer configured and end"
                );
            }
            (bound, metrics, reservations)
        }
        None => (
            server::bind(&plan).map_err(|e| e.to_string())?,
            None,
            Vec::new(),
        ),
    };
    for a in &plan.udp {
        info!("listening on udp {a}");
    }
    for (a, port) in &plan.tcp {
        info!("listening on {} {a}", port.name());
    }
    for a in &plan.dtls {
        info!("listening on dtls {a}");
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
    let advertised: Vec<IpAddr> = if !cfg.external_ips.is_empty() {
        cfg.external_ips.iter().map(|e| e.public).collect()
    } else if !cfg.relay_ips.is_empty() {
        cfg.relay_ips.clone()
    } else {
        listening_ips.clone()
    };
    if let Some(w) = external::private_relay_warning(&advertised, &cfg.listening_ips, &local) {
        warn!("{w}");
    }
    let (directory, requests) = match &cfg.userdb {
        Some(db) => {
            let (cache, requests) = server::directory::Cache::new(
                db.clone(),
                Duration::from_secs(u64::from(cfg.userdb_cache_seconds.max(1))),
                !cfg.no_dynamic_ip_list,
                !cfg.no_dynamic_realms,
            );
            (Some(cache), Some(requests))
        }
        None => (None, None),
    };
    let (fleet, fleet_inbox) = match fleet_redis {
        Some(redis) => {
            let (address, tls_address) = node_addresses(cfg, &listening_ips, tls.is_some());
            let config = server::fleet::FleetConfig {
                node: cfg
                    .node_name
                    .clone()
                    .unwrap_or_else(|| fixed.hostname.clone()),
                address,
                tls_address,
                redirect_above: f64::from(cfg.redirect_above),
                redis,
            };
            info!(
                "fleet: node '{}' at {address}, sharing quotas, users and its registry through Redis",
                config.node
            );
            let (f, inbox) = server::fleet::Fleet::new(config);
            (Some(f), Some(inbox))
        }
        None => (None, None),
    };
    let (statsdb, statsdb_queue) = match &cfg.redis_statsdb {
        Some(_) => {
            let (s, q) = server::statsdb::StatsDb::new();
            (Some(s), Some(q))
        }
        None => (None, None),
    };
    let workers = bound.workers();
    let shared = Arc::new(Shared {
        core: Arc::new(core),
        tls: arc_swap::ArcSwapOption::new(tls.map(Arc::new)),
        pool: PortPool::new(cfg.min_port, cfg.max_port),
        reservations: Reservations::default(),
        relay_device: cfg.relay_device.clone(),
        relay_buffer: cfg.sock_buf_size,
        relay_gro: udp_gro,
        streams: StreamCount::new(cfg.max_stream_connections_per_ip),
        proxy_allow: arc_swap::ArcSwap::from_pointee(cfg.proxy_protocol_allow.clone()),
        tcp_waiting: Default::default(),
        dtls_cert: arc_swap::ArcSwapOption::new(dtls.map(Arc::new)),
        dtls_config: server::dtls::config(),
        idle_timeout_secs: AtomicU64::new(u64::from(cfg.max_allocate_timeout)),
        telemetry: Telemetry::new(workers),
        quotas: server::quota::SharedCounts::default(),
        directory,
        fleet,
        statsdb,
        draining: std::sync::atomic::AtomicBool::new(false),
        steering: Steering::default(),
        phase: tokio::sync::watch::Sender::new(server::Phase::Serving),
        offload: offload.map(std::sync::Mutex::new),
        offloaded: Default::default(),
    });
    shared
        .steering
        .enabled
        .store(cfg.udp_steering && !cfg.mobility, Ordering::Relaxed);
    shared
        .telemetry
        .per_user
        .store(cfg.prometheus_username_labels, Ordering::Relaxed);
    for port in bound.inherited_relay_ports() {
        shared.pool.claim(port);
    }
    for (counter, value) in shared.offloaded.iter().zip(inherited_offloaded) {
        counter.store(value, Ordering::Relaxed);
    }
    let now = Instant::now();
    for (token, socket, left) in reservations {
        if let Ok(a) = socket.local_addr() {
            shared.pool.claim(a.port());
        }
        shared.reservations.adopt(token, socket, now + left);
    }
    Ok(Prepared {
        bound,
        shared,
        fixed,
        userdb: requests,
        fleet: fleet_inbox,
        statsdb: statsdb_queue,
        inherited_metrics,
        xdp_pending,
    })
}

/// The eBPF fast path as loaded at start-up: the program, and the
/// interfaces that wait for XDP (on TC meanwhile) because the process this
/// one takes over from still holds their XDP hook.
pub struct Offloaded {
    pub offload: server::offload::Offload,
    pub xdp_pending: Vec<String>,
}

/// Loads and attaches the eBPF fast path as `ebpf-offload` says: `None`
/// when off, or with `auto` when it cannot (logged once); an error with
/// `tc`/`xdp` when it cannot. `overlap`: a predecessor is still running
/// (live takeover), so an interface's XDP hook may be taken; such an
/// interface gets TC until the predecessor lets go (see
/// [`upgrade_to_xdp`]).
fn offload(
    cfg: &Config,
    listening_ips: &[IpAddr],
    overlap: bool,
) -> Result<Option<Offloaded>, String> {
    use config::EbpfOffload;
    let mode = cfg.ebpf_offload;
    let attempt = || -> Result<(Offloaded, Vec<String>, String), String> {
        let interfaces = if cfg.ebpf_offload_interfaces.is_empty() {
            let mut ips: Vec<IpAddr> = listening_ips.to_vec();
            ips.extend(cfg.relay_ips.iter().copied());
            server::net::interfaces_of(&ips)
                .map_err(|e| format!("cannot list interfaces: {e}"))?
                .into_iter()
                .filter(|i| i != "lo")
                .collect()
        } else {
            cfg.ebpf_offload_interfaces.clone()
        };
        if interfaces.is_empty() {
            return Err(format!(
                "no interface but loopback holds {} (name one with ebpf-offload-interface)",
                listening_ips
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let mut o = server::offload::Offload::load()?;
        // XDP (driver mode) with `xdp`, and with `auto` where every
        // interface is a network card's (a virtual one, veth in a
        // container, takes XDP redirects only when its peer runs NAPI)
        // and its driver has native XDP; TC otherwise.
        let mut xdp = match mode {
            EbpfOffload::Xdp => true,
            EbpfOffload::Auto => interfaces
                .iter()
                .all(|i| std::path::Path::new(&format!("/sys/class/net/{i}/device")).exists()),
            _ => false,
        };
        let mut pending = Vec::new();
        if xdp {
            let mut failed = None;
            for i in &interfaces {
                match o.attach_xdp(i) {
                    Ok(()) => {}
                    // The predecessor's program holds the hook until it
                    // exits (one XDP program per interface).
                    Err(e) if overlap && (e.contains("os error 16") || e.contains("busy")) => {
                        o.attach(i)?;
                        pending.push(i.clone());
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                if mode == EbpfOffload::Xdp {
                    return Err(e);
                }
                // A driver without native XDP refuses: TC on a fresh load
                // (nothing stays attached from the attempt).
                info!("ebpf-offload=auto: {e}; using TC");
                o = server::offload::Offload::load()?;
                pending.clear();
                xdp = false;
            }
        }
        for i in &interfaces {
            if !xdp {
                o.attach(i)?;
            }
            // The program's route lookup (bpf_fib_lookup) refuses on an
            // interface that does not forward: everything stays on the
            // socket path there.
            for (family, path) in [
                ("ipv4", format!("/proc/sys/net/ipv4/conf/{i}/forwarding")),
                ("ipv6", format!("/proc/sys/net/ipv6/conf/{i}/forwarding")),
            ] {
                if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "0") {
                    warn!(
                        "ebpf-offload: {family} forwarding is off on {i}, so the kernel's route lookup refuses and its {family} channels stay on the socket path; set net.{family}.conf.{i}.forwarding=1 to offload them"
                    );
                }
            }
        }
        let how = match (xdp, pending.is_empty()) {
            (false, _) => "TC ingress".to_string(),
            (true, true) => "XDP, driver mode".to_string(),
            (true, false) => format!(
                "XDP, driver mode; TC on {} until the process taken over from lets go of its XDP hook",
                pending.join(", ")
            ),
        };
        Ok((
            Offloaded {
                offload: o,
                xdp_pending: pending,
            },
            interfaces,
            how,
        ))
    };
    match mode {
        EbpfOffload::Off => Ok(None),
        _ => match attempt() {
            Ok((o, interfaces, how)) => {
                info!(
                    "ebpf-offload={}: channel bindings of UDP clients are relayed in the kernel on {} ({how})",
                    mode.name(),
                    interfaces.join(", ")
                );
                Ok(Some(o))
            }
            Err(e) if mode == EbpfOffload::Auto => {
                info!("ebpf-offload=auto: {e}; relaying through sockets");
                Ok(None)
            }
            Err(e) => Err(cfg
                .error("ebpf-offload", format!("{}: {e}", mode.name()))
                .to_string()),
        },
    }
}

/// Moves `interfaces` from TC to XDP once the process this one took over
/// from has let go of their XDP hook (it exits after the handover, or
/// after draining its TLS clients): tries every quarter of a second, for
/// up to an hour, on a thread of its own. The maps are shared, so nothing
/// relayed is lost in the move.
fn upgrade_to_xdp(shared: Arc<Shared>, mut interfaces: Vec<String>) {
    if interfaces.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("xdp-upgrade".into())
        .spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(3600);
            while !interfaces.is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
                let Some(offload) = &shared.offload else {
                    return;
                };
                let mut o = offload.lock().unwrap_or_else(|e| e.into_inner());
                interfaces.retain(|i| match o.replace_tc_with_xdp(i) {
                    Ok(()) => {
                        info!("ebpf-offload: XDP on {i} now (the process taken over from let go)");
                        false
                    }
                    Err(_) => true,
                });
            }
            if !interfaces.is_empty() {
                warn!(
                    "ebpf-offload: {} stay on TC (their XDP hook is still taken)",
                    interfaces.join(", ")
                );
            }
        });
    if let Err(e) = spawned {
        warn!("ebpf-offload: cannot start the XDP upgrade thread ({e}): TC stays");
    }
}

/// An open files limit below which start-up warns: a server that can
/// hold only a few thousand allocations.
const FEW_OPEN_FILES: u64 = 4096;

fn run(
    cfg: Config,
    args: Vec<OsString>,
    logging: logging::Logging,
    detected: Option<external::Detected>,
    takeover_mode: bool,
) -> Result<(), String> {
    let identity = process::resolve(cfg.proc_user.as_deref(), cfg.proc_group.as_deref())?;
    match process::raise_open_files_limit() {
        Ok((before, limit)) => {
            if before < limit {
                info!("open files: limit raised from {before} to {limit}");
            }
            // One per UDP allocation (its relay socket) or TCP/TLS client.
            if limit < FEW_OPEN_FILES {
                warn!(
                    "open files: the limit is {limit}, so fewer than {limit} allocations fit; raise the hard limit (LimitNOFILE=, ulimit -Hn)"
                );
            }
        }
        Err(e) => warn!("cannot raise the open files limit: {e}"),
    }
    let mut incoming = match (&cfg.control_socket, takeover_mode) {
        (Some(path), true) => {
            let started = Instant::now();
            let i = takeover::receive(path).map_err(|e| format!("takeover: {e}"))?;
            info!(
                "takeover: received the state of turnserver {} ({} workers) in {} ms",
                i.state.version,
                i.state.workers.len(),
                started.elapsed().as_millis()
            );
            Some((i, started))
        }
        (None, true) => {
            return Err("--takeover needs a control-socket (it is set to none)".to_string());
        }
        // A restart under systemd: what the previous process left in the
        // file descriptor store.
        _ => takeover::from_fd_store().map(|i| {
            info!(
                "takeover: the file descriptor store holds the state of turnserver {} ({} workers)",
                i.state.version,
                i.state.workers.len()
            );
            (i, Instant::now())
        }),
    };
    let Prepared {
        bound,
        shared,
        fixed,
        userdb,
        fleet,
        statsdb,
        inherited_metrics,
        xdp_pending,
    } = prepare_with(&cfg, incoming.as_mut().map(|(i, _)| i))?;
    let metrics_listener = if cfg.prometheus {
        let ip = cfg
            .prometheus_address
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let addr = SocketAddr::new(ip, cfg.prometheus_port);
        let l = match inherited_metrics {
            Some((a, l)) if a == addr => l,
            _ => std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr} for metrics: {e}"))?,
        };
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        info!("metrics on http://{addr}{}", cfg.prometheus_path);
        Some(l)
    } else {
        None
    };
    let metrics_fd = match &metrics_listener {
        Some(l) => Some((
            l.local_addr().map_err(|e| e.to_string())?,
            std::os::fd::AsFd::as_fd(l)
                .try_clone_to_owned()
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let owner = identity.uid.map(|u| {
        (
            u.as_raw(),
            identity
                .gid
                .map_or(nix::unistd::getegid().as_raw(), |g| g.as_raw()),
        )
    });
    // The control socket: bound now, while still privileged; a successor
    // takes the path over once it has committed.
    let control = match (&cfg.control_socket, incoming.is_some()) {
        (Some(path), false) => match server::takeover::Listener::bind(path, owner) {
            Ok(l) => Some(l),
            Err(e) if cfg.origin("control-socket") == config::Origin::Default => {
                info!("{e}: live takeover (--takeover) is off for this process");
                None
            }
            Err(e) => return Err(e),
        },
        _ => None,
    };

    if cfg.daemon {
        if cfg.log_file.is_none() && !cfg.syslog {
            warn!("daemon mode without log-file or syslog: log lines are discarded");
        }
        nix::unistd::daemon(true, false).map_err(|e| format!("cannot daemonize: {e}"))?;
    }
    let _pidfile = match &cfg.pidfile {
        Some(p) => Some(process::PidFile::create(p)?),
        None => None,
    };
    process::drop_privileges(identity)?;
    if let Some(uid) = identity.uid {
        info!("running as user {uid}");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the control loop: {e}"))?;
    // Signals are caught from here on: a SIGTERM right after start-up (or
    // right after a takeover's commit) drains instead of killing.
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        let _runtime = rt.enter();
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(term), Ok(int), Ok(hup), Ok(usr1), Ok(usr2)) => (term, int, hup, usr1, usr2),
            _ => return Err("cannot install signal handlers".to_string()),
        }
    };
    // The user database, opened as the service user: its tables are read
    // before the first client is served (waiting at most its connect
    // timeout), and its task runs on the control loop.
    let userdb = match (&shared.directory, userdb) {
        (Some(cache), Some(requests)) => {
            let store = rt
                .block_on(open_userdb(&cache.db))
                .map_err(|e| format!("{}: {e}", userdb_option(&cache.db)))?;
            rt.block_on(server::directory::warm_up(
                cache,
                &store,
                Duration::from_secs(5),
            ));
            Some((cache.clone(), store, requests))
        }
        _ => None,
    };
    // A successor commits as late as it can, with everything built, and
    // only then starts reading: the running server has let go.
    let control = match incoming.take() {
        Some((i, started)) => {
            i.commit().map_err(|e| format!("takeover: {e}"))?;
            info!(
                "takeover: committed {} ms after asking; serving {} allocations handed over",
                started.elapsed().as_millis(),
                bound.inherited_allocations()
            );
            match &cfg.control_socket {
                Some(path) => match server::takeover::Listener::take_over(path, owner) {
                    Ok(l) => Some(l),
                    Err(e) => {
                        warn!("{e}: live takeover of this process is off");
                        None
                    }
                },
                None => None,
            }
        }
        None => control,
    };
    let server =
        server::start(bound, shared.clone()).map_err(|e| format!("cannot start workers: {e}"))?;
    upgrade_to_xdp(shared.clone(), xdp_pending);
    let (takeover_tx, mut takeover_rx) = tokio::sync::mpsc::unbounded_channel();
    let control_path = match control {
        Some(l) => {
            let path = l.path().to_path_buf();
            takeover::spawn_server(l, takeover_tx)
                .map_err(|e| format!("cannot start the control socket thread: {e}"))?;
            info!("control socket {} (for --takeover)", path.display());
            Some(path)
        }
        None => None,
    };
    if let Some((cache, store, requests)) = userdb {
        info!(
            "users, secrets and realm settings from {} (at most {} s stale)",
            cache.db,
            cache.ttl().as_secs_f32()
        );
        let notify = server.credentials_notifier();
        rt.spawn(server::directory::serve(cache, store, requests, notify));
    }
    if let (Some(f), Some(inbox)) = (&shared.fleet, fleet) {
        rt.spawn(server::fleet::run(
            f.clone(),
            shared.clone(),
            inbox,
            shared.directory.clone(),
            server.fleet_teller(),
        ));
    }
    if let (Some(s), Some(queue), Some(endpoint)) = (&shared.statsdb, statsdb, &cfg.redis_statsdb) {
        info!(
            "allocation statuses published to Redis {}:{}",
            endpoint.host,
            endpoint.port.unwrap_or(6379)
        );
        rt.spawn(server::statsdb::run(s.clone(), endpoint.clone(), queue));
    }
    let draining = Arc::new(AtomicBool::new(false));
    let mut daemon = Daemon {
        args,
        cfg,
        fixed,
        server,
        logging,
        draining: draining.clone(),
        stopping: None,
        exit_now: false,
        detected,
        metrics_fd,
        handed_to: None,
    };
    notify(&[NotifyState::Ready]);
    daemon.status();

    rt.block_on(async move {
        let mut metrics_task = None;
        if let Some(l) = metrics_listener {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    let registry = Arc::new(metrics::registry(metrics::TurnCollector {
                        shared: shared.clone(),
                        draining: draining.clone(),
                        per_user: daemon.cfg.prometheus_username_labels,
                    }));
                    metrics_task = Some(tokio::spawn(metrics::serve(
                        l,
                        registry,
                        daemon.cfg.prometheus_path.clone(),
                        draining.clone(),
                        shared.clone(),
                    )));
                }
                Err(e) => error!("metrics listener: {e}"),
            }
        }
        let (mut term, mut int, mut hup, mut usr1, mut usr2) = signals;
        let watchdog = sd_notify::watchdog_enabled();
        let period = watchdog.map_or(Duration::from_secs(1), |w| {
            (w / 2).min(Duration::from_secs(1))
        });
        let mut tick = tokio::time::interval(period);
        let mut last_status = Instant::now();
        loop {
            tokio::select! {
                _ = term.recv() => {
                    if !daemon.hand_to_fd_store().await {
                        daemon.stop("SIGTERM");
                    }
                }
                _ = int.recv() => daemon.stop("SIGINT"),
                _ = hup.recv() => daemon.reload(true).await,
                _ = usr2.recv() => daemon.reload(false).await,
                _ = usr1.recv() => daemon.drain(),
                Some(req) = takeover_rx.recv() => match req {
                    takeover::Request::Freeze { reply } => {
                        let _ = reply.send(daemon.freeze().await);
                    }
                    takeover::Request::Committed { pid, allocations, fds, frozen } => {
                        // The successor answers metrics scrapes now.
                        if let Some(t) = metrics_task.take() {
                            t.abort();
                        }
                        daemon.handed(pid, allocations, fds, frozen);
                    }
                    takeover::Request::Failed(why) => {
                        warn!("takeover failed: {why}; serving everything again");
                        daemon.server.thaw();
                    }
                },
                _ = tick.tick() => {
                    // Only while every worker's event loop is alive: a stuck
                    // worker gets the whole service restarted.
                    if watchdog.is_some() && shared.telemetry.all_alive(Duration::from_secs(5)) {
                        notify(&[NotifyState::Watchdog]);
                    }
                    if last_status.elapsed() >= Duration::from_secs(10) {
                        daemon.status();
                        last_status = Instant::now();
                    }
                }
            }
            if daemon.should_exit() {
                break;
            }
        }
        match daemon.handed_to {
            Some(0) => {}
            Some(pid) => info!(
                "exiting after the takeover by process {pid}, with {} allocations",
                daemon.server.allocations()
            ),
            None => {
                info!("exiting with {} allocations", daemon.server.allocations());
                if let Some(p) = &control_path {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    });
    Ok(())
}
