//! The table of every option coturn knows (4.6.1 plus the names added up to
//! 4.17), with how this server treats each one.
//!
//! Each option is declared once, here: its names, value kind, default, help
//! text, how its value is applied to [`Config`] and printed back
//! (`--check-config`), and whether a reload applies it or only a restart.
//! The config-file parser, the command line and `--help`, the effective
//! configuration, the reload's restart-only warning and the "not
//! implemented" warning all read this table. Adding an option is one line
//! here (and a `Config` field) plus the code that uses it.

use crate::auth::PasswordAlgorithm;
use std::net::SocketAddr;

use super::setting::Setting::{
    Flag, Inverted, Ip, Ips, Path, Port, PortOrNone, Seconds, Text, U32, U64,
};
use super::setting::{Lines, Setting, field, flag, need, number};
use super::{Config, User, UserSecret, parse_host_port, parse_user, syslog_facility};
use crate::turn::policy::IpRange;
use crate::turn::{DefaultFamily, ExternalIp};
use crate::userdb::UserDb;

/// How an option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg {
    /// A flag: bare means true; `=0/off/no/false` and `=1/on/yes/true` also work.
    Flag,
    /// Requires a value: `key=value`, `key value`, `--key value`, `--key=value`.
    Value,
    /// Value optional; on the command line it must be attached with `=`
    /// (`--stale-nonce=60`), as with coturn.
    Optional,
}

/// What this server does with an option.
pub enum Support {
    /// Implemented: how the value is applied and printed.
    Yes(Setting),
    /// Accepted; this server already behaves that way, so it changes nothing.
    /// The text explains why, for `--help`.
    Inherent(&'static str),
    /// Not implemented yet: accepted with one warning naming it.
    NotYet,
    /// Deprecated or removed in coturn; accepted with a warning.
    Obsolete(&'static str),
    /// Accepted with a warning: this server does not offer it (why).
    Unsupported(&'static str),
}

/// When a changed value takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// On SIGHUP, for new requests and connections.
    Live,
    /// Only after a restart (a reload logs that it changed).
    Restart,
}

/// One option.
pub struct Spec {
    /// Long name, as in the config file.
    pub name: &'static str,
    pub short: Option<char>,
    /// How it takes a value (for options that are not implemented; an
    /// implemented one's follows from its [`Setting`]).
    arg: Arg,
    pub support: Support,
    /// The value in force when the option is not given, applied like a
    /// given one.
    pub default: Option<&'static str>,
    /// What not giving the option means, when that is not a value
    /// ("one per CPU").
    pub note: Option<&'static str>,
    pub reload: Reload,
    pub help: &'static str,
}

impl Spec {
    /// How the option takes its value.
    pub fn arg(&self) -> Arg {
        match &self.support {
            Support::Yes(s) if s.is_flag() => Arg::Flag,
            Support::Yes(s) if s.is_optional() => Arg::Optional,
            Support::Yes(_) => Arg::Value,
            _ => self.arg,
        }
    }

    /// Whether the option may be given several times, its values adding up.
    pub fn repeatable(&self) -> bool {
        matches!(&self.support, Support::Yes(s) if s.is_repeatable())
    }

    /// The help text with the default and what the option's support is.
    pub fn full_help(&self) -> String {
        let mut h = self.help.to_string();
        match (self.default, self.note) {
            (Some(d), _) if !d.is_empty() => h.push_str(&format!(" Default: {d}.")),
            (_, Some(n)) => h.push_str(&format!(" Default: {n}.")),
            _ => {}
        }
        match &self.support {
            Support::Yes(_) if self.reload == Reload::Restart => h.push_str(" [restart to change]"),
            Support::Yes(_) => {}
            Support::Inherent(why) => h.push_str(&format!(" [accepted: {why}]")),
            Support::NotYet => h.push_str(" [not implemented yet: ignored]"),
            Support::Obsolete(why) => h.push_str(&format!(" [obsolete: {why}]")),
            Support::Unsupported(why) => h.push_str(&format!(" [not supported: {why}]")),
        }
        h
    }

    /// Sets the default value.
    const fn default(mut self, value: &'static str) -> Spec {
        self.default = Some(value);
        self
    }

    /// Says what leaving the option out means.
    const fn note(mut self, note: &'static str) -> Spec {
        self.note = Some(note);
        self
    }
}

const fn spec(
    name: &'static str,
    short: Option<char>,
    arg: Arg,
    support: Support,
    reload: Reload,
    help: &'static str,
) -> Spec {
    Spec {
        name,
        short,
        arg,
        support,
        default: None,
        note: None,
        reload,
        help,
    }
}

/// An implemented option.
const fn yes(
    name: &'static str,
    short: Option<char>,
    setting: Setting,
    reload: Reload,
    help: &'static str,
) -> Spec {
    spec(name, short, Arg::Value, Support::Yes(setting), reload, help)
}

/// An option not implemented yet that takes a value.
const fn not_yet(name: &'static str, short: Option<char>, help: &'static str) -> Spec {
    spec(name, short, Arg::Value, Support::NotYet, Reload::Live, help)
}

/// A flag not implemented yet.
const fn not_yet_flag(name: &'static str, short: Option<char>, help: &'static str) -> Spec {
    spec(name, short, Arg::Flag, Support::NotYet, Reload::Live, help)
}

/// An option taking a value that asks for what this server does anyway.
const fn inherent(
    name: &'static str,
    short: Option<char>,
    why: &'static str,
    help: &'static str,
) -> Spec {
    spec(
        name,
        short,
        Arg::Value,
        Support::Inherent(why),
        Reload::Live,
        help,
    )
}

/// A flag that asks for what this server does anyway.
const fn inherent_flag(
    name: &'static str,
    short: Option<char>,
    why: &'static str,
    help: &'static str,
) -> Spec {
    spec(
        name,
        short,
        Arg::Flag,
        Support::Inherent(why),
        Reload::Live,
        help,
    )
}

/// An option accepted with a warning that it is not supported.
const fn unsupported(
    name: &'static str,
    short: Option<char>,
    why: &'static str,
    help: &'static str,
) -> Spec {
    spec(
        name,
        short,
        Arg::Value,
        Support::Unsupported(why),
        Reload::Live,
        help,
    )
}

/// An obsolete option taking a value.
const fn obsolete(
    name: &'static str,
    short: Option<char>,
    why: &'static str,
    help: &'static str,
) -> Spec {
    spec(
        name,
        short,
        Arg::Value,
        Support::Obsolete(why),
        Reload::Live,
        help,
    )
}

/// An obsolete flag.
const fn obsolete_flag(
    name: &'static str,
    short: Option<char>,
    why: &'static str,
    help: &'static str,
) -> Spec {
    spec(
        name,
        short,
        Arg::Flag,
        Support::Obsolete(why),
        Reload::Live,
        help,
    )
}

use Reload::{Live, Restart};

/// Names that are accepted as another option's name.
pub const ALIASES: &[(&str, &str)] = &[
    ("prod", "no-software-attribute"),
    ("db", "userdb"),
    ("sql-userdb", "psql-userdb"),
    ("log-min-level", "log-level"),
];

/// Every option, in the order `--help` lists them.
#[rustfmt::skip]
pub const OPTIONS: &[Spec] = &[
    // Listeners
    yes("listening-ip", Some('L'), Ips(field!(listening_ips)), Restart, "Listener IP address; repeatable.").note("every local address"),
    yes("listening-port", Some('p'), Port(field!(listening_port)), Restart, "UDP and TCP listener port.").default("3478"),
    yes("tls-listening-port", None, Port(field!(tls_listening_port)), Restart, "TLS listener port.").default("5349"),
    yes("alt-listening-port", None, PortOrNone(field!(alt_listening_port)), Restart, "Extra plain UDP/TCP listener port; 0 = none.").default("0"),
    yes("alt-tls-listening-port", None, PortOrNone(field!(alt_tls_listening_port)), Restart, "Extra TLS listener port; 0 = none.").default("0"),
    yes("listening-device", Some('d'), Text(field!(listening_device)), Restart, "Bind listeners to this network interface (SO_BINDTODEVICE)."),
    yes("no-udp", None, Flag(field!(no_udp)), Restart, "Do not start UDP listeners."),
    yes("no-tcp", None, Flag(field!(no_tcp)), Restart, "Do not start TCP listeners."),
    yes("no-tls", None, Flag(field!(no_tls)), Restart, "Do not start TLS listeners."),
    yes("no-dtls", None, Flag(field!(no_dtls)), Restart, "No DTLS listeners: by default, with cert/pkey set and an ECDSA key, TURN over DTLS is served on the TLS ports over UDP (coturn 4.6.1's default)."),
    yes("dtls", None, Inverted(field!(no_dtls)), Restart, "Serve TURN over DTLS on the TLS ports (the default; coturn 4.17's switch)."),
    not_yet("aux-server", None, "Auxiliary listener ip:port."),
    not_yet_flag("udp-self-balance", None, "Balance UDP over aux servers with ALTERNATE-SERVER."),
    yes("tcp-proxy-port", None, PortOrNone(field!(tcp_proxy_port)), Restart, "A TCP/TLS listener port on every listening address where each connection must start with a PROXY protocol v1 or v2 header, from any source (coturn's): firewall it to the load balancer, or prefer proxy-protocol-allow; 0 = none.").default("0"),
    yes("proxy-protocol-allow", None, PROXY_PROTOCOL_ALLOW, Live, "A TCP load balancer (IP, range a-b or CIDR) whose TCP and TLS connections start with a PROXY protocol v1 or v2 header giving the client's address; repeatable. Connections from elsewhere are served directly and refused if they send such a header."),
    yes("max-stream-connections-per-ip", None, U32(field!(max_stream_connections_per_ip)), Live, "TCP/TLS connections one source address may hold open; 0 = unlimited.").default("256"),
    // Relay
    yes("relay-ip", Some('E'), Ips(field!(relay_ips)), Live, "Relay (allocation) IP address; repeatable.").note("the address the client connected to"),
    yes("relay-device", Some('i'), Text(field!(relay_device)), Restart, "Bind relay sockets to this network interface."),
    yes("external-ip", Some('X'), EXTERNAL_IP, Live, "Public address to advertise: public or public/private; repeatable. `auto` (or auto/private) finds the public address at start and on reload: from the cloud's metadata service, else from external-ip-stun servers."),
    yes("external-ip-metadata", None, Text(field!(external_ip_metadata)), Live, "external-ip=auto: the metadata service's base URL (AWS IMDSv2, GCP, Azure, DigitalOcean, Hetzner), or off.").default("http://169.254.169.254"),
    yes("external-ip-stun", None, EXTERNAL_IP_STUN, Live, "external-ip=auto: STUN servers (host:port) asked for this host's public address when no metadata service answers; repeatable."),
    yes("external-ip-fallback", None, Ip(field!(external_ip_fallback)), Live, "external-ip=auto: the address to advertise when detection fails; without it, a failure stops the start (a reload keeps the last address found)."),
    yes("external-ip-timeout", None, U32(field!(external_ip_timeout)), Live, "external-ip=auto: seconds each way of detecting may take.").default("2"),
    yes("min-port", None, Port(field!(min_port)), Restart, "Lowest relay port.").default("49152"),
    yes("max-port", None, Port(field!(max_port)), Restart, "Highest relay port.").default("65535"),
    yes("relay-threads", Some('m'), RELAY_THREADS, Restart, "Worker threads.").note("one per CPU"),
    not_yet("cpus", None, "Override the detected CPU count."),
    yes("allocation-default-address-family", Some('A'), DEFAULT_FAMILY, Live, "Relay family without REQUESTED-ADDRESS-FAMILY: ipv4, ipv6 or keep.").default("ipv4"),
    yes("keep-address-family", Some('K'), KEEP_FAMILY, Live, "Deprecated: same as allocation-default-address-family=keep."),
    yes("no-udp-relay", None, Flag(field!(no_udp_relay)), Live, "Refuse UDP relay allocations (442)."),
    yes("no-tcp-relay", None, Flag(field!(no_tcp_relay)), Live, "Refuse TCP relay allocations (RFC 6062; 442)."),
    not_yet_flag("server-relay", None, "Non-standard: skip permission checks."),
    obsolete("ne", None, "network engine selection was removed in coturn 4.10", "Network engine version."),
    yes("sock-buf-size", None, SOCK_BUF_SIZE, Restart, "Receive and send buffer of every UDP listener and relay socket, bytes (capped by net.core.rmem_max/wmem_max).").note("4 MiB for listeners, the kernel's default for relays"),
    not_yet_flag("multiplex-peer", None, "Share relay sockets between allocations."),
    not_yet("multiplex-peer-port", None, "Port for multiplex-peer."),
    not_yet("multiplex-peer-max-peers", None, "Peers per multiplexed socket."),
    inherent_flag("udp-recvmmsg", None, "UDP is always received with recvmmsg and sent to clients with sendmmsg", "Batch UDP receives."),
    not_yet_flag("udp-recvmmsg-log", None, "Log recvmmsg statistics."),
    not_yet_flag("udp-sendmmsg-log", None, "Log sendmmsg statistics."),
    yes("no-udp-gro", None, Inverted(field!(udp_gro)), Restart, "Leave UDP GRO off: by default every UDP listener and relay socket takes runs of datagrams the network card coalesced in one receive, which turnserver splits again.").default("off"),
    inherent_flag("udp-gso", None, "runs of datagrams to one destination are always sent with UDP GSO where the kernel and device allow it", "Use UDP GSO."),
    // Peer access
    yes("allow-loopback-peers", None, Flag(field!(allow_loopback_peers)), Live, "Allow relaying to loopback peers (127.0.0.0/8, ::1).").default("off"),
    yes("allow-private-peers", None, Flag(field!(allow_private_peers)), Live, "Allow relaying to private peers (RFC 1918, 100.64/10, fc00::/7), as coturn 4.6.1 did.").default("off"),
    inherent_flag("no-loopback-peers", None, "loopback peers are denied by default", "Legacy: deny loopback peers."),
    inherent_flag("no-multicast-peers", None, "multicast and broadcast peers are always denied", "Deny multicast and broadcast peers."),
    yes("denied-peer-ip", None, DENIED_PEER_IP, Live, "Deny peers in this IP, range a-b or CIDR; repeatable."),
    yes("allowed-peer-ip", None, ALLOWED_PEER_IP, Live, "Allow peers in this IP, range a-b or CIDR; wins over denials; repeatable."),
    // Authentication
    yes("lt-cred-mech", Some('a'), Flag(field!(lt_cred_mech)), Live, "Use long-term credentials."),
    yes("no-auth", Some('z'), Flag(field!(no_auth)), Live, "Allow anonymous access."),
    yes("user", Some('u'), USER, Live, "User account name:password or name:0x<32 hex key>; repeatable."),
    yes("realm", Some('r'), Text(field!(realm)), Live, "Realm for long-term credentials.").note("server-name, else the host name"),
    yes("use-auth-secret", None, Flag(field!(use_auth_secret)), Live, "TURN REST API: time-limited credentials."),
    yes("static-auth-secret", None, STATIC_AUTH_SECRET, Live, "TURN REST API shared secret; repeatable, every one is tried."),
    yes("rest-api-separator", Some('C'), REST_API_SEPARATOR, Live, "Separator between timestamp and user in REST usernames.").default(":"),
    obsolete("secret-ts-exp-time", None, "it had no effect since coturn 4.5 and was removed in 4.7", "Deprecated."),
    yes("stale-nonce", None, Seconds { field: field!(stale_nonce), min: 0, optional: true }, Live, "Nonce lifetime, seconds; 0 = never stale.").default("600"),
    yes("server-name", None, Text(field!(server_name)), Live, "Server name (default realm when realm is not set)."),
    not_yet_flag("oauth", None, "RFC 7635 third-party authorization."),
    yes("check-origin-consistency", None, Flag(field!(check_origin_consistency)), Live, "Every request on an allocation must carry the ORIGIN its Allocate carried (441 otherwise)."),
    yes("secure-stun", None, Flag(field!(secure_stun)), Live, "Require authentication for Binding."),
    yes("password-algorithms", None, PASSWORD_ALGORITHMS, Live, "RFC 8489 password algorithms offered in 401 answers, in order of preference: a comma list of sha256 and md5, `auto` (sha256,md5 when every credential can give a SHA-256 key: passwords in user= lines and REST secrets; md5 alone with 0x keys or a user database), or `off` (no PASSWORD-ALGORITHMS, RFC 5389 behaviour).").default("auto"),
    yes("require-sha256", None, Flag(field!(require_sha256)), Live, "Refuse requests whose only integrity is MESSAGE-INTEGRITY (HMAC-SHA1): they must carry MESSAGE-INTEGRITY-SHA256 (RFC 8489). Most WebRTC clients cannot: off by default."),
    inherent_flag("stateless-nonce", None, "nonces are always stateless", "Stateless nonces."),
    not_yet("stateless-nonce-secret", None, "Shared secret for stateless nonces."),
    inherent_flag("unauthorized-ratelimit", None, "answers to unauthenticated requests are always rate-limited; unauthorized-ratelimit-rps=0 turns it off", "Rate-limit 401 responses."),
    yes("unauthorized-ratelimit-rps", None, U32(field!(unauthorized_ratelimit_rps)), Live, "Answers to unauthenticated requests (401, 438, 400, 420) per second per source address, burst 5 s worth; 0 = unlimited.").default("20"),
    yes("userdb", Some('b'), USERDB_SQLITE, Restart, "SQLite user database file with coturn's schema (coturn's Debian package: /var/lib/turn/turndb); created when missing."),
    yes("psql-userdb", Some('e'), USERDB_POSTGRES, Restart, "PostgreSQL user database: a libpq conninfo string (host=... dbname=... user=... password=... port=... connect_timeout=...) or a postgresql:// URI."),
    yes("mysql-userdb", Some('M'), USERDB_MYSQL, Restart, "MySQL/MariaDB user database: host=... dbname=... user=... password=... port=... connect_timeout=... read_timeout=..."),
    unsupported("mongo-userdb", Some('J'), "MongoDB is not supported (Debian's coturn is built without it either): move the users to SQLite, PostgreSQL, MySQL or Redis", "MongoDB user database."),
    yes("redis-userdb", Some('N'), USERDB_REDIS, Restart, "Redis user database: ip=... dbname=... password=... port=... connect_timeout=..."),
    yes("userdb-cache-seconds", None, U32(field!(userdb_cache_seconds)), Restart, "How stale what is read from the user database may get, seconds: users are looked up again, and secrets, realm options, ORIGIN mappings and peer lists re-read, within this time of a change.").default("3"),
    yes("redis-statsdb", Some('O'), REDIS_STATSDB, Restart, "Redis for allocation statuses and traffic as coturn publishes them (turn/realm/<realm>/user/<user>/allocation/<id>/status ...): ip=... dbname=... password=... port=... connect_timeout=..."),
    yes("node-name", None, Text(field!(node_name)), Restart, "This node's name in a fleet sharing a redis-userdb (its heartbeat, quota shares and registry).").note("the host name"),
    yes("node-address", None, NODE_ADDRESS, Restart, "Where clients reach this node, ip[:port], for the fleet's redirects (the TLS port is tls-listening-port).").note("external-ip, else the first listening address; listening-port"),
    yes("redirect-above", None, U32(field!(redirect_above)), Restart, "In a fleet, send new Allocates to the least-loaded healthy node (300 ALTERNATE-SERVER) while this node is above this percent of its capacity (relay ports, or total-quota); 0 = only while draining.").default("0"),
    not_yet("secret-key-file", None, "AES key for encrypted database passwords."),
    inherent_flag("no-auth-pings", None, "the user database is only asked when needed, and an outage is noticed on the next query", "Disable database health checks."),
    yes("no-dynamic-ip-list", None, Flag(field!(no_dynamic_ip_list)), Restart, "Do not read peer lists (allowed_peer_ip, denied_peer_ip) from the user database."),
    yes("no-dynamic-realms", None, Flag(field!(no_dynamic_realms)), Restart, "Do not read realm options and ORIGIN mappings from the user database."),
    // Quotas and lifetimes
    yes("user-quota", Some('q'), U32(field!(limits.user_quota)), Live, "Concurrent allocations per user (486 beyond); 0 = unlimited.").default("0"),
    yes("total-quota", Some('Q'), U32(field!(limits.total_quota)), Live, "Concurrent allocations in total (486 beyond); 0 = unlimited.").default("0"),
    yes("max-bps", Some('s'), U64(field!(limits.max_bps)), Live, "Bytes per second per allocation, each direction; excess is dropped; 0 = unlimited.").default("0"),
    yes("bps-capacity", Some('B'), U64(field!(limits.bps_capacity)), Live, "Bytes per second to hand out in total, max-bps per allocation (486 beyond); needs max-bps; 0 = unlimited.").default("0"),
    yes("max-allocate-lifetime", None, Seconds { field: field!(max_allocate_lifetime), min: 1, optional: true }, Live, "Cap on allocation lifetime, seconds.").default("3600"),
    yes("channel-lifetime", None, Seconds { field: field!(channel_lifetime), min: 1, optional: true }, Live, "Channel binding lifetime, seconds.").default("600"),
    yes("permission-lifetime", None, Seconds { field: field!(permission_lifetime), min: 1, optional: true }, Live, "Permission lifetime, seconds.").default("300"),
    yes("max-allocate-timeout", None, Seconds { field: field!(max_allocate_timeout), min: 1, optional: false }, Live, "Seconds a TCP/TLS connection may stay silent without an allocation.").default("60"),
    yes("mobility", None, Flag(field!(mobility)), Live, "RFC 8016 mobility: clients may move their allocation to a new address."),
    yes("udp-steering", None, UDP_STEERING, Live, "auto: while the load is light, every UDP client datagram goes to the first relay thread (fewer wake-ups), and the kernel spreads them again when it gets busy; off: always spread. Off with mobility.").default("auto"),
    not_yet("drain-min-allocations", None, "Drain mode threshold."),
    // STUN behaviour
    yes("fingerprint", Some('f'), Flag(field!(fingerprint)), Live, "Add FINGERPRINT to every response."),
    yes("stun-only", Some('S'), Flag(field!(stun_only)), Live, "Serve STUN only: TURN requests are ignored."),
    yes("no-stun", None, Flag(field!(no_stun)), Live, "Do not answer Binding (TURN only)."),
    inherent_flag("no-software-attribute", None, "SOFTWARE is not sent unless software-attribute is set", "Do not send SOFTWARE."),
    yes("software-attribute", None, Flag(field!(software_attribute)), Live, "Send SOFTWARE in responses."),
    yes("no-rfc5780", None, Inverted(field!(rfc5780)), Restart, "No RFC 5780 NAT behaviour discovery (the default; coturn 4.6.1's name)."),
    yes("rfc5780", None, Flag(field!(rfc5780)), Restart, "Offer RFC 5780 NAT behaviour discovery over UDP when two listening-ip of one family are set: OTHER-ADDRESS, RESPONSE-ORIGIN, CHANGE-REQUEST, RESPONSE-PORT, PADDING, answered from the other address and the alt-listening-port (listening-port + 1 when unset), rate-limited like unauthenticated answers (coturn 4.7's name)."),
    yes("no-stun-backward-compatibility", None, Inverted(field!(rfc3489)), Live, "Only RFC 5389 STUN: no RFC 3489 answers, no MAPPED-ADDRESS (the default; coturn 4.6.1's name)."),
    yes("stun-backward-compatibility", None, Flag(field!(rfc3489)), Live, "Answer RFC 3489 Binding requests (no magic cookie) with MAPPED-ADDRESS, and add MAPPED-ADDRESS to every Binding response; rate-limited like other unauthenticated answers (coturn 4.7's name)."),
    yes("rfc3489-compatibility", None, Flag(field!(rfc3489)), Live, "Same as stun-backward-compatibility (coturn 4.16's name)."),
    inherent_flag("response-origin-only-with-rfc5780", None, "RESPONSE-ORIGIN is never sent", "RESPONSE-ORIGIN only with RFC 5780."),
    inherent_flag("rfc5766-channel-numbers", None, "channel numbers 0x4000-0x7FFF are always accepted", "Accept RFC 5766 channel numbers."),
    inherent_flag("include-reason-string", None, "error responses always carry a reason phrase", "Descriptive error reasons."),
    inherent_flag("log-binding", None, "Binding requests are never logged", "Log Binding requests."),
    not_yet_flag("respond-http-unsupported", None, "Answer HTTP on TURN ports."),
    inherent_flag("drop-invalid-packets", None, "invalid packets are always dropped", "Drop invalid packets."),
    not_yet_flag("drop-invalid-packets-log", None, "Log dropped packets."),
    // TLS
    yes("cert", None, Path(field!(cert)), Live, "TLS certificate chain (PEM); reloaded on SIGHUP and SIGUSR2."),
    yes("pkey", None, Path(field!(pkey)), Live, "TLS private key (PEM); reloaded on SIGHUP and SIGUSR2."),
    not_yet("pkey-pwd", None, "Private key password."),
    not_yet("cipher-list", None, "OpenSSL cipher list."),
    not_yet("CA-file", None, "CA for client certificates."),
    inherent("ec-curve-name", None, "curves are negotiated by rustls", "ECDH curve."),
    inherent_flag("dh566", None, "DHE is not used; ECDHE only", "566-bit DH."),
    inherent_flag("dh1066", None, "DHE is not used; ECDHE only", "1066-bit DH."),
    inherent("dh-file", None, "DHE is not used; ECDHE only", "DH parameters file."),
    inherent_flag("no-tlsv1", None, "TLS 1.0 is never offered", "Disable TLS 1.0."),
    inherent_flag("no-tlsv1_1", None, "TLS 1.1 is never offered", "Disable TLS 1.1."),
    yes("no-tlsv1_2", None, Flag(field!(no_tlsv1_2)), Live, "Disable TLS 1.2 (TLS 1.3 only)."),
    not_yet_flag("tlsv1", None, "Enable TLS 1.0."),
    not_yet_flag("tlsv1_1", None, "Enable TLS 1.1."),
    obsolete_flag("no-sslv2", None, "SSL is never offered", "Deprecated."),
    obsolete_flag("no-sslv3", None, "SSL is never offered", "Deprecated."),
    not_yet_flag("raw-public-keys", None, "TLS raw public keys."),
    not_yet("acme-redirect", None, "Redirect ACME challenges."),
    // Logging
    yes("log-file", Some('l'), LOG_FILE, Live, "Log file path, or stdout; reopened on SIGHUP (logrotate).").default("stdout"),
    yes("no-stdout-log", None, Flag(field!(no_stdout_log)), Restart, "With log-file, do not also log to stdout."),
    yes("syslog", None, Flag(field!(syslog)), Restart, "Log to syslog as well."),
    yes("syslog-facility", None, SYSLOG_FACILITY, Restart, "Syslog facility, e.g. LOG_LOCAL1.").note("LOG_DAEMON"),
    inherent_flag("simple-log", None, "the log file name is used as given", "No pid/date in the log file name."),
    inherent_flag("new-log-timestamp", None, "timestamps are always ISO 8601", "ISO 8601 timestamps."),
    not_yet("new-log-timestamp-format", None, "Timestamp format."),
    yes("log-level", None, LOG_LEVEL, Live, "Log level: error, warn, info, debug or trace (overrides -v/-V).").note("info"),
    yes("verbose", Some('v'), VERBOSE, Live, "Verbose: log every request."),
    yes("Verbose", Some('V'), VERY_VERBOSE, Live, "Extra verbose (coturn's -V; the version is --version)."),
    // Process and management
    yes("daemon", Some('o'), Flag(field!(daemon)), Restart, "Detach and run in the background."),
    yes("pidfile", None, Path(field!(pidfile)), Restart, "Write the process id to this file (empty: none).").note("none"),
    yes("proc-user", None, Text(field!(proc_user)), Restart, "Run as this user once ports are bound and keys read."),
    yes("proc-group", None, Text(field!(proc_group)), Restart, "Run as this group once ports are bound and keys read."),
    yes("drain-timeout", None, U32(field!(drain_timeout)), Live, "Seconds SIGTERM waits for allocations to end before exiting.").default("30"),
    yes("ebpf-offload", None, EBPF_OFFLOAD, Restart, "Relay the ChannelData of UDP channel bindings in the kernel with an eBPF program on the interfaces of the listening and relay addresses, below the sockets: off, auto (XDP where every interface is a network card whose driver has native XDP, else TC; when it loads: needs CAP_BPF and CAP_NET_ADMIN, a kernel with TCX (6.6+) and a build with clang; else sockets, with one log line), tc (TC ingress), or xdp (XDP in driver mode). Allocations with max-bps stay in user space.").default("off"),
    yes("ebpf-offload-interface", None, EBPF_OFFLOAD_INTERFACE, Restart, "Attach the eBPF fast path to this network interface (repeatable) instead of those holding the listening and relay addresses."),
    yes("control-socket", None, Path(field!(control_socket)), Restart, "Unix socket (created 0600, owned by proc-user) through which `turnserver --takeover` takes over this server's sockets and allocations; empty: none.").default("/run/turnserver/control.sock"),
    inherent_flag("no-cli", None, "there is no telnet CLI", "Disable the telnet CLI."),
    not_yet_flag("cli", None, "Enable the telnet CLI."),
    inherent("cli-ip", None, "there is no telnet CLI", "Telnet CLI address."),
    inherent("cli-port", None, "there is no telnet CLI", "Telnet CLI port."),
    inherent("cli-password", None, "there is no telnet CLI", "Telnet CLI password."),
    inherent("cli-max-output-sessions", None, "there is no telnet CLI", "Telnet CLI output limit."),
    not_yet_flag("web-admin", None, "HTTPS admin interface."),
    not_yet("web-admin-ip", None, "Web admin address."),
    not_yet("web-admin-port", None, "Web admin port."),
    not_yet_flag("web-admin-listen-on-workers", None, "Web admin on TURN ports."),
    yes("prometheus", None, Flag(field!(prometheus)), Restart, "Serve Prometheus metrics over HTTP, with / and /health for health checks."),
    yes("prometheus-port", None, Port(field!(prometheus_port)), Restart, "Metrics port.").default("9641"),
    yes("prometheus-address", None, Ip(field!(prometheus_address)), Restart, "Metrics address.").default("0.0.0.0"),
    yes("prometheus-path", None, PROMETHEUS_PATH, Restart, "Metrics path.").default("/metrics"),
    yes("prometheus-username-labels", None, Flag(field!(prometheus_username_labels)), Live, "Allocations per user as a labelled gauge (at most 1000 users)."),
    not_yet_flag("prometheus-tls", None, "TLS for the metrics endpoint."),
    not_yet("prometheus-cert", None, "Metrics endpoint certificate."),
    not_yet("prometheus-key", None, "Metrics endpoint key."),
    yes("alternate-server", None, ALTERNATE_SERVER, Live, "Redirect Allocates over UDP/TCP to ip[:port] (default port 3478) with 300 Try Alternate; repeatable (round-robin)."),
    yes("tls-alternate-server", None, TLS_ALTERNATE_SERVER, Live, "Redirect Allocates over TLS to ip[:port] (default port 5349); repeatable."),
    not_yet("udp-alternate-server", None, "ALTERNATE-SERVER for UDP."),
    not_yet("tcp-alternate-server", None, "ALTERNATE-SERVER for TCP."),
];

// The options with a value of their own kind.

const PASSWORD_ALGORITHMS: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?.trim();
        c.password_algorithms = match v {
            "auto" => None,
            "off" | "none" => Some(Vec::new()),
            list => {
                let mut algorithms = Vec::new();
                for name in list.split(',').map(str::trim) {
                    let a = PasswordAlgorithm::parse(name).ok_or_else(|| {
                        format!("'{name}' is not a password algorithm (md5, sha256)")
                    })?;
                    if algorithms.contains(&a) {
                        return Err(format!("'{name}' is listed twice"));
                    }
                    algorithms.push(a);
                }
                Some(algorithms)
            }
        };
        Ok(())
    },
    render: |c, key, out| {
        let v = match &c.password_algorithms {
            None => "auto".to_string(),
            Some(l) if l.is_empty() => "off".to_string(),
            Some(l) => l.iter().map(|a| a.name()).collect::<Vec<_>>().join(","),
        };
        out.push(format!("{key}={v}"));
    },
    repeat: false,
    flag: false,
};

const EXTERNAL_IP: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?;
        let ip = super::setting::ip;
        if v == "auto" || v.starts_with("auto/") {
            let private = match v.split_once('/') {
                Some((_, p)) => Some(ip(p)?),
                None => None,
            };
            if c.external_ip_auto.is_some() {
                return Err("external-ip=auto is given twice".into());
            }
            if c.external_ips.iter().any(|x| x.private.is_none()) && private.is_none() {
                return Err("a plain external IP is already set; auto would be a second".into());
            }
            c.external_ip_auto = Some(super::AutoExternalIp { private });
            return Ok(());
        }
        let e = match v.split_once('/') {
            Some((public, private)) => ExternalIp {
                public: ip(public)?,
                private: Some(ip(private)?),
            },
            None => ExternalIp {
                public: ip(v)?,
                private: None,
            },
        };
        if let Some(p) = e.private
            && p.is_ipv4() != e.public.is_ipv4()
        {
            return Err(format!("'{v}' mixes IPv4 and IPv6"));
        }
        if e.private.is_none() && c.external_ip_auto.is_some_and(|a| a.private.is_none()) {
            return Err(
                "external-ip=auto is already set; a plain address would be a second".into(),
            );
        }
        if e.private.is_none()
            && c.external_ips
                .iter()
                .any(|x| x.private.is_none() && x.public.is_ipv4() == e.public.is_ipv4())
        {
            return Err(
                "a plain external IP of this family is already set; use public/private pairs for several"
                    .into(),
            );
        }
        c.external_ips.push(e);
        Ok(())
    },
    render: |c, key, out| {
        match c.external_ip_auto {
            Some(super::AutoExternalIp { private: Some(p) }) => out.push(format!("{key}=auto/{p}")),
            Some(_) => out.push(format!("{key}=auto")),
            None => {}
        }
        for e in &c.external_ips {
            match e.private {
                Some(p) => out.push(format!("{key}={}/{p}", e.public)),
                None => out.push(format!("{key}={}", e.public)),
            }
        }
    },
    repeat: true,
    flag: false,
};

const RELAY_THREADS: Setting = Setting::Custom {
    apply: |c, v| {
        let n: usize = number(need(v)?)?;
        if n > 1024 {
            return Err(format!("{n} threads is more than the limit of 1024"));
        }
        c.relay_threads = Some(n.max(1));
        Ok(())
    },
    render: |c, key, out| out.extend(c.relay_threads.map(|n| format!("{key}={n}"))),
    repeat: false,
    flag: false,
};

const DEFAULT_FAMILY: Setting = Setting::Custom {
    apply: |c, v| {
        c.default_family = match need(v)?.trim().to_ascii_lowercase().as_str() {
            "ipv4" => DefaultFamily::Ipv4,
            "ipv6" => DefaultFamily::Ipv6,
            "keep" => DefaultFamily::Keep,
            other => return Err(format!("'{other}' is not ipv4, ipv6 or keep")),
        };
        Ok(())
    },
    render: |c, key, out| {
        let v = match c.default_family {
            DefaultFamily::Ipv4 => "ipv4",
            DefaultFamily::Ipv6 => "ipv6",
            DefaultFamily::Keep => "keep",
        };
        out.push(format!("{key}={v}"));
    },
    repeat: false,
    flag: false,
};

/// `keep-address-family`: printed as allocation-default-address-family.
const KEEP_FAMILY: Setting = Setting::Custom {
    apply: |c, v| {
        if flag(v)? {
            c.default_family = DefaultFamily::Keep;
        }
        Ok(())
    },
    render: |_, _, _| {},
    repeat: false,
    flag: true,
};

const SOCK_BUF_SIZE: Setting = Setting::Custom {
    apply: |c, v| {
        let n: usize = number(need(v)?)?;
        if !(4096..=1 << 30).contains(&n) {
            return Err(format!("{n} bytes is outside 4096..1073741824"));
        }
        c.sock_buf_size = Some(n);
        Ok(())
    },
    render: |c, key, out| out.extend(c.sock_buf_size.map(|n| format!("{key}={n}"))),
    repeat: false,
    flag: false,
};

const EBPF_OFFLOAD: Setting = Setting::Custom {
    apply: |c, v| {
        use super::EbpfOffload as E;
        c.ebpf_offload = match need(v)?.trim().to_ascii_lowercase().as_str() {
            "off" => E::Off,
            "auto" => E::Auto,
            "tc" => E::Tc,
            "xdp" => E::Xdp,
            other => return Err(format!("'{other}' is not off, auto, tc or xdp")),
        };
        Ok(())
    },
    render: |c, key, out| out.push(format!("{key}={}", c.ebpf_offload.name())),
    repeat: false,
    flag: false,
};

const EBPF_OFFLOAD_INTERFACE: Setting = Setting::Custom {
    apply: |c, v| {
        let name = need(v)?.trim().to_string();
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(format!("'{name}' is not an interface name"));
        }
        if !c.ebpf_offload_interfaces.contains(&name) {
            c.ebpf_offload_interfaces.push(name);
        }
        Ok(())
    },
    render: |c, key, out| {
        out.extend(
            c.ebpf_offload_interfaces
                .iter()
                .map(|i| format!("{key}={i}")),
        )
    },
    repeat: true,
    flag: false,
};

const UDP_STEERING: Setting = Setting::Custom {
    apply: |c, v| {
        c.udp_steering = match need(v)?.trim().to_ascii_lowercase().as_str() {
            "auto" => true,
            "off" => false,
            other => return Err(format!("'{other}' is not auto or off")),
        };
        Ok(())
    },
    render: |c, key, out| {
        out.push(format!(
            "{key}={}",
            if c.udp_steering { "auto" } else { "off" }
        ))
    },
    repeat: false,
    flag: false,
};

/// Peer ranges: `denied-peer-ip` and `allowed-peer-ip`.
fn peer_ranges(v: Option<&str>) -> Result<IpRange, String> {
    need(v)?.parse()
}

const DENIED_PEER_IP: Setting = Setting::Custom {
    apply: |c, v| {
        c.denied_peer_ips.push(peer_ranges(v)?);
        Ok(())
    },
    render: |c, key, out| out.extend(c.denied_peer_ips.iter().map(|r| format!("{key}={r}"))),
    repeat: true,
    flag: false,
};

const PROXY_PROTOCOL_ALLOW: Setting = Setting::Custom {
    apply: |c, v| {
        c.proxy_protocol_allow.push(need(v)?.parse()?);
        Ok(())
    },
    render: |c, key, out| out.extend(c.proxy_protocol_allow.iter().map(|r| format!("{key}={r}"))),
    repeat: true,
    flag: false,
};

const ALLOWED_PEER_IP: Setting = Setting::Custom {
    apply: |c, v| {
        c.allowed_peer_ips.push(peer_ranges(v)?);
        Ok(())
    },
    render: |c, key, out| out.extend(c.allowed_peer_ips.iter().map(|r| format!("{key}={r}"))),
    repeat: true,
    flag: false,
};

/// `user=name:password`, printed with the secret masked.
const USER: Setting = Setting::Custom {
    apply: |c, v| {
        c.users.push(parse_user(need(v)?)?);
        Ok(())
    },
    render: |c, key, out| {
        for User { name, secret } in &c.users {
            match secret {
                UserSecret::Password(_) => out.push(format!("{key}={name}:******")),
                UserSecret::Key(_) => out.push(format!("{key}={name}:0x******")),
            }
        }
    },
    repeat: true,
    flag: false,
};

/// `static-auth-secret`: implies use-auth-secret; printed masked.
const STATIC_AUTH_SECRET: Setting = Setting::Custom {
    apply: |c, v| {
        c.static_auth_secrets.push(need(v)?.to_string());
        c.use_auth_secret = true;
        Ok(())
    },
    render: |c, key, out| {
        out.extend(
            c.static_auth_secrets
                .iter()
                .map(|_| format!("{key}=******")),
        )
    },
    repeat: true,
    flag: false,
};

const REST_API_SEPARATOR: Setting = Setting::Custom {
    apply: |c, v| {
        c.rest_api_separator = need(v)?.chars().next().ok_or("needs a value")?;
        Ok(())
    },
    render: |c, key, out| out.push(format!("{key}={}", c.rest_api_separator)),
    repeat: false,
    flag: false,
};

/// `log-file`: a path, `stdout` (or `-`), or `syslog`.
const LOG_FILE: Setting = Setting::Custom {
    apply: |c, v| {
        c.log_file = match need(v)? {
            "stdout" | "-" => None,
            "syslog" => {
                c.syslog = true;
                None
            }
            path => Some(path.into()),
        };
        Ok(())
    },
    render: |c, key, out| {
        let v = c
            .log_file
            .as_ref()
            .map_or("stdout".to_string(), |p| p.display().to_string());
        out.push(format!("{key}={v}"));
    },
    repeat: false,
    flag: false,
};

const SYSLOG_FACILITY: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?;
        if syslog_facility(v).is_none() {
            return Err(format!(
                "'{v}' is not a syslog facility (LOG_DAEMON, LOG_USER, LOG_LOCAL0 ... LOG_LOCAL7)"
            ));
        }
        c.syslog_facility = Some(v.to_string());
        Ok(())
    },
    render: |c, key, out| out.extend(c.syslog_facility.as_ref().map(|f| format!("{key}={f}"))),
    repeat: false,
    flag: false,
};

const LOG_LEVEL: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?;
        c.log_level = Some(match v.trim().to_ascii_lowercase().as_str() {
            "error" => tracing::Level::ERROR,
            "warn" | "warning" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            _ => return Err(format!("'{v}' is not error, warn, info, debug or trace")),
        });
        Ok(())
    },
    render: |c, key, out| {
        out.extend(
            c.log_level
                .map(|l| format!("{key}={}", l.to_string().to_ascii_lowercase())),
        )
    },
    repeat: false,
    flag: false,
};

/// `-v`: one line per request.
const VERBOSE: Setting = Setting::Custom {
    apply: |c, v| {
        if flag(v)? {
            c.verbose = c.verbose.max(1);
        }
        Ok(())
    },
    render: |c, key, out| out.push(format!("{key}={}", super::setting::on_off(c.verbose >= 1))),
    repeat: false,
    flag: true,
};

/// `-V`: coturn's "very verbose" (not the version).
const VERY_VERBOSE: Setting = Setting::Custom {
    apply: |c, v| {
        if flag(v)? {
            c.verbose = 2;
        }
        Ok(())
    },
    render: |c, key, out| out.push(format!("{key}={}", super::setting::on_off(c.verbose >= 2))),
    repeat: false,
    flag: true,
};

const PROMETHEUS_PATH: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?;
        if !v.starts_with('/') {
            return Err(format!("'{v}' does not start with /"));
        }
        c.prometheus_path = v.to_string();
        Ok(())
    },
    render: |c, key, out| out.push(format!("{key}={}", c.prometheus_path)),
    repeat: false,
    flag: false,
};

const EXTERNAL_IP_STUN: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?.trim();
        // host:port or [v6]:port; the name is looked up when detecting.
        let ok = match v.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
            None => false,
        };
        if !ok {
            return Err(format!("'{v}' is not host:port"));
        }
        c.external_ip_stun.push(v.to_string());
        Ok(())
    },
    render: |c, key, out| out.extend(c.external_ip_stun.iter().map(|a| format!("{key}={a}"))),
    repeat: true,
    flag: false,
};

/// `alternate-server` and `tls-alternate-server`: `ip[:port]`.
fn alternate(v: Option<&str>, default_port: u16) -> Result<SocketAddr, String> {
    let v = need(v)?;
    parse_host_port(v, default_port).ok_or_else(|| format!("'{v}' is not ip[:port] or [ipv6]:port"))
}

const ALTERNATE_SERVER: Setting = Setting::Custom {
    apply: |c, v| {
        c.alternate_servers.push(alternate(v, 3478)?);
        Ok(())
    },
    render: |c, key, out| out.extend(c.alternate_servers.iter().map(|a| format!("{key}={a}"))),
    repeat: true,
    flag: false,
};

const TLS_ALTERNATE_SERVER: Setting = Setting::Custom {
    apply: |c, v| {
        c.tls_alternate_servers.push(alternate(v, 5349)?);
        Ok(())
    },
    render: |c, key, out| out.extend(c.tls_alternate_servers.iter().map(|a| format!("{key}={a}"))),
    repeat: true,
    flag: false,
};

/// A user database option: which kind it opens.
fn userdb(
    c: &mut Config,
    v: Option<&str>,
    parse: fn(&str) -> Result<UserDb, String>,
) -> Result<(), String> {
    c.userdb = Some(parse(need(v)?)?);
    Ok(())
}

/// Prints the database of kind `kind` with its password masked.
fn render_userdb(c: &Config, key: &str, out: &mut Lines, kind: fn(&UserDb) -> Option<String>) {
    out.extend(
        c.userdb
            .as_ref()
            .and_then(kind)
            .map(|v| format!("{key}={v}")),
    );
}

/// `key=value` words of a database endpoint, the password masked.
fn endpoint_text(e: &crate::userdb::conn::Endpoint, host: &str) -> String {
    if e.uri.is_some() {
        return "******".into();
    }
    let mut words = vec![
        format!("{host}={}", e.host),
        format!("dbname={}", e.database),
    ];
    if let Some(p) = e.port {
        words.push(format!("port={p}"));
    }
    if let Some(u) = &e.user {
        words.push(format!("user={u}"));
    }
    if e.password.is_some() {
        words.push("password=******".into());
    }
    words.push(format!("connect_timeout={}", e.connect_timeout.as_secs()));
    format!("\"{}\"", words.join(" "))
}

const REDIS_STATSDB: Setting = Setting::Custom {
    apply: |c, v| {
        match UserDb::redis(need(v)?)? {
            UserDb::Redis(e) => c.redis_statsdb = Some(e),
            _ => unreachable!("a Redis endpoint"),
        }
        Ok(())
    },
    render: |c, key, out| {
        out.extend(
            c.redis_statsdb
                .as_ref()
                .map(|e| format!("{key}={}", endpoint_text(e, "ip"))),
        )
    },
    repeat: false,
    flag: false,
};

const NODE_ADDRESS: Setting = Setting::Custom {
    apply: |c, v| {
        let v = need(v)?;
        c.node_address = Some(
            parse_host_port(v, 0)
                .ok_or_else(|| format!("'{v}' is not ip[:port] or [ipv6]:port"))?,
        );
        Ok(())
    },
    render: |c, key, out| out.extend(c.node_address.map(|a| format!("{key}={a}"))),
    repeat: false,
    flag: false,
};

const USERDB_SQLITE: Setting = Setting::Custom {
    apply: |c, v| userdb(c, v, UserDb::sqlite),
    render: |c, key, out| {
        render_userdb(c, key, out, |d| match d {
            UserDb::Sqlite(p) => Some(p.display().to_string()),
            _ => None,
        })
    },
    repeat: false,
    flag: false,
};

const USERDB_POSTGRES: Setting = Setting::Custom {
    apply: |c, v| userdb(c, v, UserDb::postgres),
    render: |c, key, out| {
        render_userdb(c, key, out, |d| match d {
            UserDb::Postgres(e) => Some(endpoint_text(e, "host")),
            _ => None,
        })
    },
    repeat: false,
    flag: false,
};

const USERDB_MYSQL: Setting = Setting::Custom {
    apply: |c, v| userdb(c, v, UserDb::mysql),
    render: |c, key, out| {
        render_userdb(c, key, out, |d| match d {
            UserDb::MySql(e) => Some(endpoint_text(e, "host")),
            _ => None,
        })
    },
    repeat: false,
    flag: false,
};

const USERDB_REDIS: Setting = Setting::Custom {
    apply: |c, v| userdb(c, v, UserDb::redis),
    render: |c, key, out| {
        render_userdb(c, key, out, |d| match d {
            UserDb::Redis(e) => Some(endpoint_text(e, "ip")),
            _ => None,
        })
    },
    repeat: false,
    flag: false,
};

/// Looks an option up by its long name or an alias.
pub fn find(name: &str) -> Option<&'static Spec> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, real)| real);
    OPTIONS.iter().find(|s| s.name == name)
}

/// The lines `--check-config` prints for `spec` in `cfg`: its setting, or
/// a comment saying what its absence means.
pub fn render(spec: &Spec, cfg: &Config) -> Lines {
    let mut out = Lines::new();
    if let Support::Yes(s) = &spec.support {
        s.render(cfg, spec.name, &mut out);
        if out.is_empty()
            && let Some(n) = spec.note
        {
            out.push(format!("# {}: {n}", spec.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_short_flags_are_unique() {
        let mut names: Vec<_> = OPTIONS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate option name");
        let mut shorts: Vec<_> = OPTIONS.iter().filter_map(|s| s.short).collect();
        shorts.sort_unstable();
        let n = shorts.len();
        shorts.dedup();
        assert_eq!(shorts.len(), n, "duplicate short flag");
        for (alias, real) in ALIASES {
            assert!(find(real).is_some() && find(alias).is_some());
        }
    }

    #[test]
    fn the_options_deployment_guides_use_are_implemented() {
        for name in [
            "listening-ip",
            "listening-port",
            "tls-listening-port",
            "alt-listening-port",
            "relay-ip",
            "external-ip",
            "min-port",
            "max-port",
            "fingerprint",
            "lt-cred-mech",
            "realm",
            "user",
            "use-auth-secret",
            "static-auth-secret",
            "stale-nonce",
            "cert",
            "pkey",
            "verbose",
            "Verbose",
            "log-file",
            "server-name",
            "relay-threads",
            "listening-device",
            "relay-device",
            "denied-peer-ip",
            "allowed-peer-ip",
        ] {
            assert!(
                matches!(find(name).unwrap().support, Support::Yes(_)),
                "{name}"
            );
        }
        // Accepted, and already our behaviour.
        for name in [
            "no-loopback-peers",
            "no-multicast-peers",
            "no-cli",
            "cli-password",
        ] {
            assert!(
                matches!(find(name).unwrap().support, Support::Inherent(_)),
                "{name}"
            );
        }
    }
}
