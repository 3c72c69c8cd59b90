//! coturn-compatible configuration: `turnserver.conf` and the command line.
//!
//! The file holds one option per line: the long option name, then the value
//! after `=`, spaces or tabs (`realm=x`, `realm x`, `realm = x`), or nothing
//! for a flag. `#` starts a comment line; a value in double quotes has them
//! removed. Keys may repeat; repeatable options accumulate, others keep the
//! last value. Every file key is also a `--long-option`, and coturn's short
//! flags work. Settings from the environment ([`env`]: `TURNSERVER_<OPTION>`
//! and the coturn image's `TURN_USERNAME`, `REALM`, ...) are applied after
//! the file, and the command line after both, so it overrides them.
//!
//! Unknown keys in the file and options not implemented yet produce
//! warnings; a bad value is a [`ConfigError`] naming the file, line and key.

pub mod env;
pub mod options;
pub mod setting;

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::auth::{Authenticator, Key, Mechanism, PasswordAlgorithm, StaticUsers, UserKeys};
use crate::turn::policy::{IpRange, PeerPolicy};
use crate::turn::{DefaultFamily, ExternalIp};
use options::{Arg, OPTIONS, Reload, Support};

/// Where a setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of a configuration file (1-based).
    File {
        path: PathBuf,
        line: usize,
    },
    CommandLine,
    /// An environment variable (`TURNSERVER_MIN_PORT`, `REALM_FILE`, ...).
    Environment {
        var: String,
    },
    /// Built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::CommandLine => f.write_str("command line"),
            Origin::Environment { var } => write!(f, "environment variable {var}"),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// A configuration error: where, which key, what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    pub key: String,
    pub message: String,
}

impl ConfigError {
    fn new(origin: &Origin, key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            origin: origin.clone(),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::CommandLine => write!(f, "command line: --{}: {}", self.key, self.message),
            Origin::Default if self.key.is_empty() => f.write_str(&self.message),
            origin => write!(f, "{origin}: {}: {}", self.key, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// One `key[=value]` setting from the file or the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The canonical long option name.
    pub key: String,
    /// `None` for a bare flag.
    pub value: Option<String>,
    pub origin: Origin,
}

/// `external-ip=auto` or `auto/PRIVATE`: the public address is detected;
/// with a private address it maps only relays on that address (as
/// `external-ip=PUBLIC/PRIVATE` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoExternalIp {
    pub private: Option<IpAddr>,
}

/// A secret for a static user.
#[derive(Clone, PartialEq, Eq)]
pub enum UserSecret {
    Password(String),
    /// A precomputed key from `user=name:0x<32 hex>`.
    Key(Key),
}

impl fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UserSecret::Password(_) => "Password(..)",
            UserSecret::Key(_) => "Key(..)",
        })
    }
}

/// A `user=` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub secret: UserSecret,
}

/// The effective configuration: one field per implemented option (the
/// option table, [`options::OPTIONS`], says how each is read and printed).
///
/// `Config::default()` has every field empty; [`Config::defaults`] is what
/// a configuration without options means (the table's defaults applied).
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The configuration file read, if any.
    pub config_file: Option<PathBuf>,
    pub listening_ips: Vec<IpAddr>,
    pub listening_port: u16,
    pub tls_listening_port: u16,
    pub alt_listening_port: Option<u16>,
    pub alt_tls_listening_port: Option<u16>,
    pub listening_device: Option<String>,
    pub no_udp: bool,
    pub no_tcp: bool,
    pub no_tls: bool,
    pub relay_ips: Vec<IpAddr>,
    pub relay_device: Option<String>,
    pub external_ips: Vec<ExternalIp>,
    /// `external-ip=auto[/private]`: found by the daemon at start and on
    /// reload, then added to `external_ips`.
    pub external_ip_auto: Option<AutoExternalIp>,
    /// `external-ip-metadata`: base URL, or `off`.
    pub external_ip_metadata: Option<String>,
    /// `external-ip-stun`: `host:port` of each STUN server.
    pub external_ip_stun: Vec<String>,
    /// `external-ip-fallback`.
    pub external_ip_fallback: Option<IpAddr>,
    /// `external-ip-timeout`, seconds.
    pub external_ip_timeout: u32,
    pub min_port: u16,
    pub max_port: u16,
    /// `relay-threads`; `None` = one per CPU.
    pub relay_threads: Option<usize>,
    /// `sock-buf-size`: SO_RCVBUF/SO_SNDBUF of UDP listener and relay
    /// sockets, bytes; `None` = 4 MiB for listeners, the kernel default for
    /// relays.
    pub sock_buf_size: Option<usize>,
    pub default_family: DefaultFamily,
    pub no_udp_relay: bool,
    /// `no-dtls`: no DTLS listeners.
    pub no_dtls: bool,
    /// `no-tcp-relay`: no RFC 6062 TCP allocations.
    pub no_tcp_relay: bool,
    /// UDP GRO on every UDP listener and relay socket; `no-udp-gro` turns
    /// it off. Restart only.
    pub udp_gro: bool,
    /// RFC 8016 mobility tickets.
    pub mobility: bool,
    /// `udp-steering`: `auto` (true) gathers UDP clients on the first worker
    /// while the load is light; `off` leaves them to the kernel's hash.
    pub udp_steering: bool,
    /// Answers to unauthenticated requests per second per source; 0 = off.
    pub unauthorized_ratelimit_rps: u32,
    pub secure_stun: bool,
    /// `stun-backward-compatibility` / `rfc3489-compatibility`.
    pub rfc3489: bool,
    /// `tcp-proxy-port`: a listener where every connection carries a
    /// PROXY header.
    pub tcp_proxy_port: Option<u16>,
    /// `proxy-protocol-allow`: load balancers whose TCP/TLS connections
    /// start with a PROXY header.
    pub proxy_protocol_allow: Vec<IpRange>,
    /// `rfc5780` (on) / `no-rfc5780` (off, the default).
    pub rfc5780: bool,
    /// `password-algorithms`: `None` for `auto`, an empty list for `off`.
    pub password_algorithms: Option<Vec<PasswordAlgorithm>>,
    /// `require-sha256`.
    pub require_sha256: bool,
    pub no_stun: bool,
    pub stun_only: bool,
    /// `check-origin-consistency`.
    pub check_origin_consistency: bool,
    /// The user database (`userdb`, `psql-userdb`, `mysql-userdb`,
    /// `redis-userdb`), if any.
    pub userdb: Option<crate::userdb::UserDb>,
    /// `redis-statsdb`: where allocation statuses are published.
    pub redis_statsdb: Option<crate::userdb::conn::Endpoint>,
    /// `node-name`: this node's name in a fleet (default: the host name).
    pub node_name: Option<String>,
    /// `node-address`: where clients reach this node (port 0: the
    /// listening port).
    pub node_address: Option<std::net::SocketAddr>,
    /// `redirect-above`: percent of capacity above which a fleet node
    /// redirects new Allocates; 0 = only while draining.
    pub redirect_above: u32,
    /// Staleness bound of what is read from the user database, seconds.
    pub userdb_cache_seconds: u32,
    /// `no-dynamic-ip-list`: peer lists only from the configuration.
    pub no_dynamic_ip_list: bool,
    /// `no-dynamic-realms`: no realm options or ORIGIN mappings from the
    /// database.
    pub no_dynamic_realms: bool,
    /// Quotas and bandwidth limits (0 = unlimited).
    pub limits: crate::turn::quota::Limits,
    /// TCP/TLS connections per source address; 0 = unlimited.
    pub max_stream_connections_per_ip: u32,
    /// Seconds a stream connection may stay silent without an allocation.
    pub max_allocate_timeout: u32,
    /// Serve metrics over HTTP.
    pub prometheus: bool,
    /// Always set once the defaults are applied (0.0.0.0).
    pub prometheus_address: Option<IpAddr>,
    pub prometheus_port: u16,
    pub prometheus_path: String,
    pub prometheus_username_labels: bool,
    /// `None` = no pid file.
    pub pidfile: Option<PathBuf>,
    /// `control-socket`: where a successor asks for a live takeover
    /// (`None`: no control socket).
    pub control_socket: Option<PathBuf>,
    /// `ebpf-offload`: relay channel bindings in the kernel.
    pub ebpf_offload: EbpfOffload,
    /// `ebpf-offload-interface`: where to attach it (none: the interfaces
    /// holding the listening and relay addresses).
    pub ebpf_offload_interfaces: Vec<String>,
    pub proc_user: Option<String>,
    pub proc_group: Option<String>,
    /// Log to syslog too.
    pub syslog: bool,
    pub syslog_facility: Option<String>,
    /// `log-level`; overrides `verbose`/`Verbose`.
    pub log_level: Option<tracing::Level>,
    /// `alternate-server`.
    pub alternate_servers: Vec<std::net::SocketAddr>,
    /// `tls-alternate-server`.
    pub tls_alternate_servers: Vec<std::net::SocketAddr>,
    /// Seconds SIGTERM waits for allocations to end.
    pub drain_timeout: u32,
    pub allow_loopback_peers: bool,
    pub allow_private_peers: bool,
    pub denied_peer_ips: Vec<IpRange>,
    pub allowed_peer_ips: Vec<IpRange>,
    pub lt_cred_mech: bool,
    pub no_auth: bool,
    pub users: Vec<User>,
    pub realm: Option<String>,
    pub use_auth_secret: bool,
    pub static_auth_secrets: Vec<String>,
    pub rest_api_separator: char,
    /// Nonce lifetime, seconds; 0 = never stale.
    pub stale_nonce: u32,
    pub server_name: Option<String>,
    /// Seconds.
    pub max_allocate_lifetime: u32,
    /// Seconds.
    pub channel_lifetime: u32,
    /// Seconds.
    pub permission_lifetime: u32,
    pub fingerprint: bool,
    pub software_attribute: bool,
    pub cert: Option<PathBuf>,
    pub pkey: Option<PathBuf>,
    pub no_tlsv1_2: bool,
    /// `None` = stdout.
    pub log_file: Option<PathBuf>,
    pub no_stdout_log: bool,
    /// 0 normal, 1 `-v`, 2 `-V`.
    pub verbose: u8,
    pub daemon: bool,
    origins: Vec<(&'static str, Origin)>,
}

/// `ebpf-offload`: whether and how channel bindings are relayed by an eBPF
/// program below the sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EbpfOffload {
    /// Sockets only.
    #[default]
    Off,
    /// XDP (driver mode) where every interface is a network card whose
    /// driver has it, else TC; sockets when neither loads (with one log
    /// line).
    Auto,
    /// TC (TCX links), or refuse to start.
    Tc,
    /// XDP in driver mode (XDP links), or refuse to start.
    Xdp,
}

impl EbpfOffload {
    /// Its name in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            EbpfOffload::Off => "off",
            EbpfOffload::Auto => "auto",
            EbpfOffload::Tc => "tc",
            EbpfOffload::Xdp => "xdp",
        }
    }
}

/// The credential mechanism the configuration selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    None,
    LongTerm,
    RestApi,
}

/// Result of reading the configuration.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Warnings to log once logging is up.
    pub warnings: Vec<String>,
    /// The environment variables that set options, for the start-up log.
    pub environment: Vec<String>,
    /// `--takeover`: take the running server's sockets and allocations
    /// over its control socket instead of binding.
    pub takeover: bool,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run the server.
    Run(Box<Loaded>),
    /// `--check-config`: validate and print the effective configuration.
    CheckConfig(Box<Loaded>),
    /// `--health-check`: ask the running server's `/health` (exit 0 when
    /// healthy or when metrics are off).
    HealthCheck(Box<Loaded>),
    /// `--drain`: make the running server drain and wait for its
    /// allocations to end.
    Drain(Box<Loaded>),
    /// Print the version and exit.
    Version,
}

/// Parses a boolean value the way coturn does: empty means true;
/// `0`, `no`, `false`, `off` (any case, or just the first letter of the
/// first three) are false; `yes`, `true`, `on`, or a leading digit 1–9 are true.
pub fn parse_bool(v: &str) -> Option<bool> {
    let l = v.trim().to_ascii_lowercase();
    match l.as_str() {
        "" => Some(true),
        "off" => Some(false),
        "on" => Some(true),
        _ => match l.as_bytes()[0] {
            b'0' | b'n' | b'f' => Some(false),
            b'y' | b't' | b'1'..=b'9' => Some(true),
            _ => None,
        },
    }
}

/// Splits one config-file line into key and value, as coturn's
/// `parse_arg_string`: the key ends at the first space, tab or `=`; the value
/// follows any run of those. A value starting with `"` loses its quotes.
/// Returns `None` for blank and comment lines.
pub fn split_line(line: &str) -> Option<(&str, Option<&str>)> {
    let line = line
        .trim_start_matches([' ', '\t'])
        .trim_end_matches(['\r', '\n', ' ', '\t']);
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let is_sep = |c: char| c == ' ' || c == '\t' || c == '=';
    match line.find(is_sep) {
        None => Some((line, None)),
        Some(i) => {
            let key = &line[..i];
            let mut value = line[i..].trim_start_matches(is_sep);
            if let Some(inner) = value.strip_prefix('"') {
                value = inner.strip_suffix('"').unwrap_or(inner);
            }
            Some((key, if value.is_empty() { None } else { Some(value) }))
        }
    }
}

/// The places coturn looks for a relative configuration file, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for base in [".", "./etc", "../etc", "/etc", "/usr/local/etc"] {
        for sub in ["", "turnserver", "coturn"] {
            if sub.is_empty() {
                dirs.push(PathBuf::from(base));
            } else {
                dirs.push(Path::new(base).join(sub));
            }
        }
    }
    dirs
}

/// Finds `name` as coturn does: an absolute path as given, else in
/// [`search_dirs`].
pub fn find_config_file(name: &str) -> Option<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    search_dirs()
        .into_iter()
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// Reads a configuration file into entries. Unknown keys become warnings
/// naming file and line.
pub fn parse_file(path: &Path, text: &str, warnings: &mut Vec<String>) -> Vec<Entry> {
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some((key, value)) = split_line(line) else {
            continue;
        };
        let origin = Origin::File {
            path: path.to_path_buf(),
            line: i + 1,
        };
        if line.trim_end().ends_with(';') {
            warnings.push(format!(
                "{origin}: line ends with a semicolon, which becomes part of the value: {}",
                line.trim()
            ));
        }
        if let Some(v) = value
            && (v.contains(" #") || v.contains("\t#"))
        {
            warnings.push(format!(
                "{origin}: {key}: the value contains ' #'; comments are only allowed on lines of their own, so it is part of the value"
            ));
        }
        match options::find(key) {
            Some(spec) => entries.push(Entry {
                key: spec.name.to_string(),
                value: value.map(str::to_string),
                origin,
            }),
            None => warnings.push(format!("{origin}: unknown option '{key}' ignored")),
        }
    }
    entries
}

/// The clap command built from the option table.
pub fn command() -> clap::Command {
    use clap::{Arg as A, ArgAction};
    let mut cmd = clap::Command::new("turnserver")
        .about("STUN/TURN server; reads coturn's turnserver.conf and options")
        .disable_version_flag(true)
        .max_term_width(100)
        .arg(
            A::new("config-file")
                .short('c')
                .value_name("FILE")
                .action(ArgAction::Set)
                .help("Configuration file (default: turnserver.conf, searched as coturn does)"),
        )
        .arg(
            A::new("no-config")
                .short('n')
                .action(ArgAction::SetTrue)
                .help("Do not read a configuration file"),
        )
        .arg(
            A::new("version")
                .long("version")
                .action(ArgAction::SetTrue)
                .help("Print the version and exit"),
        )
        .arg(
            A::new("check-config")
                .long("check-config")
                .action(ArgAction::SetTrue)
                .help("Check the configuration (including certificates), print the effective settings with secrets masked, and exit; non-zero on error"),
        )
        .arg(
            A::new("health-check")
                .long("health-check")
                .action(ArgAction::SetTrue)
                .help("Ask the running server's /health on the metrics port (prometheus) and exit 0 if it is healthy, 1 if not; 0 when metrics are off (for HEALTHCHECK)"),
        )
        .arg(
            A::new("takeover")
                .long("takeover")
                .action(ArgAction::SetTrue)
                .help("Start by taking over the running server's listeners, relay sockets and allocations through its control socket (control-socket), so no call drops; the old process drains its TCP/TLS clients and exits 0. Fails, leaving the old one serving, if it cannot"),
        )
        .arg(
            A::new("drain")
                .long("drain")
                .action(ArgAction::SetTrue)
                .help("Make the running server (pidfile, else the only turnserver process) drain, as SIGUSR1 does, and wait until its allocations have ended or drain-timeout passed (for a preStop hook)"),
        );
    for spec in OPTIONS {
        let mut a = A::new(spec.name).long(spec.name).action(ArgAction::Append);
        a = a.help(spec.full_help());
        if let Some(s) = spec.short {
            a = a.short(s);
        }
        a = match spec.arg() {
            Arg::Flag => a
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .value_name("BOOL"),
            Arg::Value => a.num_args(1).value_name("VALUE").allow_hyphen_values(false),
            Arg::Optional => a
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .value_name("VALUE"),
        };
        for (alias, real) in options::ALIASES {
            if *real == spec.name {
                a = a.alias(*alias);
            }
        }
        cmd = cmd.arg(a);
    }
    cmd
}

/// Command-line settings: the entries plus `-c`/`-n`.
#[derive(Debug, Default)]
pub struct CommandLine {
    pub entries: Vec<Entry>,
    pub config_file: Option<String>,
    pub no_config: bool,
    pub version: bool,
    pub check_config: bool,
    pub health_check: bool,
    pub drain: bool,
    pub takeover: bool,
}

/// Parses the command line (`args` includes the program name). Errors and
/// `--help` come back as clap errors for the caller to print.
pub fn parse_command_line<I, T>(args: I) -> Result<CommandLine, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let m = command().try_get_matches_from(args)?;
    let mut cl = CommandLine {
        config_file: m.get_one::<String>("config-file").cloned(),
        no_config: m.get_flag("no-config"),
        version: m.get_flag("version"),
        check_config: m.get_flag("check-config"),
        health_check: m.get_flag("health-check"),
        drain: m.get_flag("drain"),
        takeover: m.get_flag("takeover"),
        entries: Vec::new(),
    };
    for spec in OPTIONS {
        if let Some(occurrences) = m.get_occurrences::<String>(spec.name) {
            for occ in occurrences {
                let v: Vec<&String> = occ.collect();
                let value = v.first().filter(|s| !s.is_empty()).map(|s| s.to_string());
                cl.entries.push(Entry {
                    key: spec.name.to_string(),
                    value,
                    origin: Origin::CommandLine,
                });
            }
        }
    }
    Ok(cl)
}

/// Reads the command line, the configuration file it names (or the
/// default one) and the environment ([`env`]) into the effective
/// configuration.
pub fn load<I, T>(args: I) -> Result<Invocation, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    load_with_env(args, &|name: &str| std::env::var(name).ok())
}

/// [`load`] with the environment read through `get`.
pub fn load_with_env<I, T>(
    args: I,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Invocation, LoadError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cl = parse_command_line(args).map_err(LoadError::Usage)?;
    if cl.version {
        return Ok(Invocation::Version);
    }
    let mut warnings = Vec::new();
    let mut file_entries = Vec::new();
    let mut config_file = None;
    if !cl.no_config {
        let explicit = cl.config_file.is_some();
        let name = cl
            .config_file
            .clone()
            .unwrap_or_else(|| "turnserver.conf".to_string());
        match find_config_file(&name) {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    LoadError::Config(ConfigError {
                        origin: Origin::CommandLine,
                        key: "c".into(),
                        message: format!("cannot read {}: {e}", path.display()),
                    })
                })?;
                file_entries = parse_file(&path, &text, &mut warnings);
                config_file = Some(path);
            }
            None if explicit => {
                return Err(LoadError::Config(ConfigError {
                    origin: Origin::Default,
                    key: String::new(),
                    message: format!(
                        "configuration file '{name}' not found (searched {})",
                        if Path::new(&name).is_absolute() {
                            name.clone()
                        } else {
                            search_dirs()
                                .iter()
                                .map(|d| d.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    ),
                }));
            }
            None => warnings.push(format!(
                "configuration file '{name}' not found; using defaults and command-line settings"
            )),
        }
    }
    let from_env = env::entries(get).map_err(LoadError::Config)?;
    let mut config = Config::from_entries(
        file_entries
            .iter()
            .chain(from_env.entries.iter())
            .chain(cl.entries.iter()),
        &mut warnings,
    )
    .map_err(LoadError::Config)?;
    config.config_file = config_file;
    config.resolve_paths();
    let loaded = Box::new(Loaded {
        config,
        warnings,
        environment: from_env.used,
        takeover: cl.takeover,
    });
    if cl.check_config {
        return Ok(Invocation::CheckConfig(loaded));
    }
    if cl.health_check {
        return Ok(Invocation::HealthCheck(loaded));
    }
    if cl.drain {
        return Ok(Invocation::Drain(loaded));
    }
    Ok(Invocation::Run(loaded))
}

/// Why [`load`] failed.
#[derive(Debug)]
pub enum LoadError {
    /// Bad command line, or `--help` (clap prints and exits).
    Usage(clap::Error),
    Config(ConfigError),
}

/// Parses `ip`, `ip:port`, `[ipv6]` or `[ipv6]:port`.
pub fn parse_host_port(v: &str, default_port: u16) -> Option<std::net::SocketAddr> {
    let v = v.trim();
    if let Ok(a) = v.parse::<std::net::SocketAddr>() {
        return Some(a);
    }
    if let Ok(ip) = v
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Some(std::net::SocketAddr::new(ip, default_port));
    }
    None
}

/// The syslog facility named `LOG_DAEMON`, `LOG_LOCAL3`, `daemon`, ...
pub fn syslog_facility(name: &str) -> Option<libc::c_int> {
    let n = name.trim().to_ascii_uppercase();
    let n = n.strip_prefix("LOG_").unwrap_or(&n);
    Some(match n {
        "DAEMON" => libc::LOG_DAEMON,
        "USER" => libc::LOG_USER,
        "AUTH" => libc::LOG_AUTH,
        "LOCAL0" => libc::LOG_LOCAL0,
        "LOCAL1" => libc::LOG_LOCAL1,
        "LOCAL2" => libc::LOG_LOCAL2,
        "LOCAL3" => libc::LOG_LOCAL3,
        "LOCAL4" => libc::LOG_LOCAL4,
        "LOCAL5" => libc::LOG_LOCAL5,
        "LOCAL6" => libc::LOG_LOCAL6,
        "LOCAL7" => libc::LOG_LOCAL7,
        _ => return None,
    })
}

/// A `user=` value: `name:password` or `name:0x<32 hex digits>`.
fn parse_user(v: &str) -> Result<User, String> {
    let Some((name, secret)) = v.split_once(':') else {
        return Err("expected name:password or name:0x<32 hex digits>".into());
    };
    if name.is_empty() {
        return Err("the user name is empty".into());
    }
    let hex = secret
        .strip_prefix("0x")
        .or_else(|| secret.strip_prefix("0X"));
    let secret = match hex {
        Some(h) if h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            let mut key = [0u8; 16];
            for (i, k) in key.iter_mut().enumerate() {
                *k = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).expect("checked hex");
            }
            UserSecret::Key(key)
        }
        _ => UserSecret::Password(secret.to_string()),
    };
    Ok(User {
        name: name.to_string(),
        secret,
    })
}

impl Config {
    /// Applies entries in order (file first, then command line) over the
    /// defaults and checks the result.
    pub fn from_entries<'e>(
        entries: impl Iterator<Item = &'e Entry>,
        warnings: &mut Vec<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::defaults();
        let mut warned = HashSet::new();
        for e in entries {
            cfg.apply(e, warnings, &mut warned)?;
        }
        cfg.validate(warnings)?;
        Ok(cfg)
    }

    /// Where `key` was last set, or [`Origin::Default`].
    pub fn origin(&self, key: &str) -> Origin {
        self.origins
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, o)| o.clone())
            .unwrap_or(Origin::Default)
    }

    /// Builds an error about `key` at the place it was set.
    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.origin(key), key, message)
    }

    /// Every option at its default: what a configuration without options
    /// means.
    pub fn defaults() -> Config {
        let mut cfg = Config::default();
        for spec in OPTIONS {
            if let (Support::Yes(setting), Some(d)) = (&spec.support, spec.default) {
                setting
                    .apply(&mut cfg, Some(d), None)
                    .unwrap_or_else(|e| panic!("default of {}: {e}", spec.name));
            }
        }
        cfg
    }

    /// Applies one entry as its option's table row says; an option not
    /// implemented (or obsolete) is warned about once.
    fn apply(
        &mut self,
        e: &Entry,
        warnings: &mut Vec<String>,
        warned: &mut HashSet<String>,
    ) -> Result<(), ConfigError> {
        let spec = options::find(&e.key).expect("entries hold known keys");
        let origin = &e.origin;
        let key = spec.name;
        match &spec.support {
            Support::Yes(setting) => {
                self.origins.push((key, origin.clone()));
                setting
                    .apply(self, e.value.as_deref(), spec.default)
                    .map_err(|m| ConfigError::new(origin, key, m))
            }
            Support::Inherent(_) => Ok(()),
            Support::NotYet => {
                if warned.insert(key.to_string()) {
                    warnings.push(format!(
                        "{origin}: option '{key}' is not implemented yet and is ignored"
                    ));
                }
                Ok(())
            }
            Support::Obsolete(why) => {
                if warned.insert(key.to_string()) {
                    warnings.push(format!(
                        "{origin}: option '{key}' is obsolete and ignored: {why}"
                    ));
                }
                Ok(())
            }
            Support::Unsupported(why) => {
                if warned.insert(key.to_string()) {
                    warnings.push(format!(
                        "{origin}: option '{key}' is not supported and is ignored: {why}"
                    ));
                }
                Ok(())
            }
        }
    }

    /// The options a reload cannot apply (marked restart-only in the
    /// table) whose value differs between `self` and `new`.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        OPTIONS
            .iter()
            .filter(|s| s.reload == Reload::Restart && matches!(s.support, Support::Yes(_)))
            .filter(|s| options::render(s, self) != options::render(s, new))
            .map(|s| s.name)
            .collect()
    }

    fn validate(&mut self, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
        if self.min_port > self.max_port {
            let key = if self.origin("max-port") != Origin::Default {
                "max-port"
            } else {
                "min-port"
            };
            return Err(self.error(
                key,
                format!(
                    "min-port {} is greater than max-port {}",
                    self.min_port, self.max_port
                ),
            ));
        }
        let dbs = ["userdb", "psql-userdb", "mysql-userdb", "redis-userdb"];
        let mut set: Vec<&'static str> = Vec::new();
        for (k, _) in &self.origins {
            if dbs.contains(k) && !set.contains(k) {
                set.push(k);
            }
        }
        if let [first, second, ..] = set[..] {
            return Err(self.error(
                second,
                format!("only one user database can be used, and {first} is set too"),
            ));
        }
        if self.limits.bps_capacity > 0 && self.limits.max_bps == 0 {
            return Err(self.error(
                "bps-capacity",
                "needs max-bps, the share each allocation takes",
            ));
        }
        if self.no_stun && self.stun_only {
            return Err(self.error(
                "stun-only",
                "cannot be combined with no-stun: nothing would be served",
            ));
        }
        if self.no_auth && self.lt_cred_mech {
            return Err(self.error("no-auth", "cannot be combined with lt-cred-mech"));
        }
        if self.listening_port == self.tls_listening_port && !self.no_tls {
            return Err(self.error(
                "tls-listening-port",
                format!("{} is also the listening-port", self.tls_listening_port),
            ));
        }
        match self.auth_kind() {
            AuthKind::RestApi => {
                if !self.users.is_empty() {
                    warnings.push(
                        "both user= and use-auth-secret are set: the TURN REST API is used and static users are ignored"
                            .to_string(),
                    );
                }
                if self.static_auth_secrets.is_empty() {
                    warnings.push(
                        "use-auth-secret is set but there is no static-auth-secret: every client will be refused"
                            .to_string(),
                    );
                }
            }
            AuthKind::LongTerm if self.users.is_empty() && self.userdb.is_none() => {
                warnings.push(
                    "lt-cred-mech is set but there is no user=: every client will be refused"
                        .to_string(),
                );
            }
            _ => {}
        }
        if self.no_auth && (!self.users.is_empty() || self.use_auth_secret) {
            warnings.push("no-auth is set: user= and static-auth-secret are ignored".to_string());
        }
        Ok(())
    }

    /// Makes relative `cert`/`pkey` paths relative to the configuration
    /// file's directory when they exist there (as coturn searches its
    /// configuration directories), else leaves them relative to the
    /// working directory.
    fn resolve_paths(&mut self) {
        let Some(dir) = self
            .config_file
            .as_ref()
            .and_then(|f| f.parent())
            .map(Path::to_path_buf)
        else {
            return;
        };
        for p in [&mut self.cert, &mut self.pkey].into_iter().flatten() {
            if p.is_relative() && !p.exists() {
                let candidate = dir.join(&*p);
                if candidate.exists() {
                    *p = candidate;
                }
            }
        }
    }

    /// The effective configuration in `turnserver.conf` syntax, one line per
    /// setting in the order of the option table, with passwords, keys and
    /// secrets masked; an unset option with no default is a comment saying
    /// what that means.
    pub fn render(&self) -> String {
        let mut out = format!(
            "# authentication: {}\n",
            match self.auth_kind() {
                AuthKind::None => "NONE (anyone may allocate)",
                AuthKind::LongTerm => "long-term credentials",
                AuthKind::RestApi => "TURN REST API",
            }
        );
        for spec in OPTIONS {
            for line in options::render(spec, self) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    /// Which credential mechanism is configured (coturn's rules: a
    /// `static-auth-secret` implies `use-auth-secret`, which wins over
    /// users; any `user=` implies `lt-cred-mech`; `no-auth` turns it all off).
    pub fn auth_kind(&self) -> AuthKind {
        if self.no_auth {
            AuthKind::None
        } else if self.use_auth_secret {
            AuthKind::RestApi
        } else if self.lt_cred_mech || !self.users.is_empty() || self.userdb.is_some() {
            AuthKind::LongTerm
        } else {
            AuthKind::None
        }
    }

    /// The realm: `realm`, else `server-name`, else `fallback` (the host name).
    pub fn effective_realm(&self, fallback: &str) -> String {
        self.realm
            .clone()
            .or_else(|| self.server_name.clone())
            .unwrap_or_else(|| fallback.to_string())
    }

    /// The authenticator for `realm`.
    pub fn authenticator(&self, realm: &str) -> Authenticator {
        let mechanism = match self.auth_kind() {
            AuthKind::None => Mechanism::None,
            AuthKind::RestApi => Mechanism::RestApi {
                secrets: self
                    .static_auth_secrets
                    .iter()
                    .map(|s| s.as_bytes().to_vec())
                    .collect(),
                separator: self.rest_api_separator,
            },
            AuthKind::LongTerm => Mechanism::LongTerm(StaticUsers::new(
                realm,
                self.users.iter().map(|u| {
                    let keys = match &u.secret {
                        UserSecret::Key(k) => UserKeys::from(*k),
                        UserSecret::Password(p) => UserKeys::from_password(&u.name, realm, p),
                    };
                    (u.name.clone(), keys)
                }),
            )),
        };
        Authenticator {
            realm: realm.into(),
            mechanism,
        }
    }

    /// The main and alternate ports of RFC 5780 discovery when it is
    /// offered: `rfc5780` set and two of `ips` (the listening addresses)
    /// of one family; the alternate port is `alt-listening-port`, else
    /// `listening-port` + 1 as in coturn.
    pub fn rfc5780_ports(&self, ips: &[IpAddr]) -> Option<(u16, u16)> {
        let two_of_a_family = [true, false].iter().any(|v4| {
            ips.iter()
                .filter(|ip| ip.is_ipv4() == *v4 && !ip.is_unspecified())
                .count()
                >= 2
        });
        if !self.rfc5780 || !two_of_a_family || self.no_udp {
            return None;
        }
        let main = self.listening_port;
        let alt = self
            .alt_listening_port
            .unwrap_or_else(|| main.wrapping_add(1).max(1));
        (alt != main).then_some((main, alt))
    }

    /// The password algorithms to offer (RFC 8489 §9.2.4) with `auth`:
    /// the configured list, or for `auto` SHA-256 then MD5 when every
    /// credential can give a SHA-256 key (a user database holds MD5 keys
    /// only), else MD5 alone.
    pub fn offered_password_algorithms(&self, auth: &Authenticator) -> Vec<PasswordAlgorithm> {
        match &self.password_algorithms {
            Some(list) => list.clone(),
            None => Authenticator::default_password_algorithms(self.sha256_keys(auth)),
        }
    }

    /// Whether every user's key can be a SHA-256 one with `auth`: its own
    /// credentials can, and no user database (MD5 keys only) serves users.
    pub fn sha256_keys(&self, auth: &Authenticator) -> bool {
        let db_users = self.userdb.is_some() && self.auth_kind() == AuthKind::LongTerm;
        auth.sha256_keys_available() && !db_users
    }

    /// The peer address policy; `own_relay_ips` are the addresses relays
    /// are bound to (`relay-ip`, or the listening addresses).
    ///
    /// Unlike coturn, the private half of `external-ip=public/private` is
    /// not added to the allowed list: relaying does not need it, and it would
    /// open the server's own private address to every client.
    pub fn peer_policy(&self, own_relay_ips: Vec<IpAddr>) -> PeerPolicy {
        PeerPolicy {
            allow_loopback: self.allow_loopback_peers,
            allow_private: self.allow_private_peers,
            allowed: self.allowed_peer_ips.clone(),
            denied: self.denied_peer_ips.clone(),
            own_relay_ips,
            relay_ports: (self.min_port, self.max_port),
        }
    }
}

#[cfg(test)]
mod tests;
