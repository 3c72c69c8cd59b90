//! The table of every option coturn knows (4.6.1 plus the names added up to
//! 4.17), with how this server treats each one.
//!
//! The same table drives the config-file parser and the command line, so
//! every file key is also a `--long-option`.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Implemented.
    Yes,
    /// Accepted; this server already behaves that way, so it changes nothing.
    /// The text explains why, for `--help`.
    Inherent(&'static str),
    /// Not implemented yet: accepted with one warning naming it.
    NotYet,
    /// Deprecated or removed in coturn; accepted with a warning.
    Obsolete(&'static str),
}

/// One option.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// Long name, as in the config file.
    pub name: &'static str,
    pub short: Option<char>,
    pub arg: Arg,
    /// May be given several times; values accumulate.
    pub repeat: bool,
    pub support: Support,
    pub help: &'static str,
}

const fn opt(
    name: &'static str,
    short: Option<char>,
    arg: Arg,
    repeat: bool,
    support: Support,
    help: &'static str,
) -> Spec {
    Spec {
        name,
        short,
        arg,
        repeat,
        support,
        help,
    }
}

use Arg::{Flag, Optional, Value};
use Support::{Inherent, NotYet, Obsolete, Yes};

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
    opt("listening-ip", Some('L'), Value, true, Yes, "Listener IP address; repeatable. Default: every local address."),
    opt("listening-port", Some('p'), Value, false, Yes, "UDP and TCP listener port. Default: 3478."),
    opt("tls-listening-port", None, Value, false, Yes, "TLS listener port. Default: 5349."),
    opt("alt-listening-port", None, Value, false, Yes, "Extra plain UDP/TCP listener port. Default: none."),
    opt("alt-tls-listening-port", None, Value, false, Yes, "Extra TLS listener port. Default: none."),
    opt("listening-device", Some('d'), Value, false, Yes, "Bind listeners to this network interface (SO_BINDTODEVICE)."),
    opt("no-udp", None, Flag, false, Yes, "Do not start UDP listeners."),
    opt("no-tcp", None, Flag, false, Yes, "Do not start TCP listeners."),
    opt("no-tls", None, Flag, false, Yes, "Do not start TLS listeners."),
    opt("no-dtls", None, Flag, false, Inherent("DTLS is not offered"), "Do not start DTLS listeners."),
    opt("dtls", None, Flag, false, NotYet, "Start DTLS listeners."),
    opt("aux-server", None, Value, true, NotYet, "Auxiliary listener ip:port."),
    opt("udp-self-balance", None, Flag, false, NotYet, "Balance UDP over aux servers with ALTERNATE-SERVER."),
    opt("tcp-proxy-port", None, Value, false, NotYet, "TCP listener expecting the PROXY protocol."),
    opt("max-stream-connections-per-ip", None, Value, false, Yes, "TCP/TLS connections one source address may hold open; 0 = unlimited. Default: 256."),
    // Relay
    opt("relay-ip", Some('E'), Value, true, Yes, "Relay (allocation) IP address; repeatable. Default: the address the client connected to."),
    opt("relay-device", Some('i'), Value, false, Yes, "Bind relay sockets to this network interface."),
    opt("external-ip", Some('X'), Value, true, Yes, "Public address to advertise: public or public/private; repeatable."),
    opt("min-port", None, Value, false, Yes, "Lowest relay port. Default: 49152."),
    opt("max-port", None, Value, false, Yes, "Highest relay port. Default: 65535."),
    opt("relay-threads", Some('m'), Value, false, Yes, "Worker threads. Default: number of CPUs."),
    opt("cpus", None, Value, false, NotYet, "Override the detected CPU count."),
    opt("allocation-default-address-family", Some('A'), Value, false, Yes, "Relay family without REQUESTED-ADDRESS-FAMILY: ipv4, ipv6 or keep. Default: ipv4."),
    opt("keep-address-family", Some('K'), Flag, false, Yes, "Deprecated: same as allocation-default-address-family=keep."),
    opt("no-udp-relay", None, Flag, false, Yes, "Refuse UDP relay allocations (442)."),
    opt("no-tcp-relay", None, Flag, false, Inherent("TCP relaying (RFC 6062) is not offered"), "Refuse TCP relay allocations."),
    opt("server-relay", None, Flag, false, NotYet, "Non-standard: skip permission checks."),
    opt("ne", None, Value, false, Obsolete("network engine selection was removed in coturn 4.10"), "Network engine version."),
    opt("sock-buf-size", None, Value, false, Yes, "Receive and send buffer of every UDP listener and relay socket, bytes (capped by net.core.rmem_max/wmem_max). Default: 4 MiB for listeners, the kernel's default for relays."),
    opt("multiplex-peer", None, Flag, false, NotYet, "Share relay sockets between allocations."),
    opt("multiplex-peer-port", None, Value, false, NotYet, "Port for multiplex-peer."),
    opt("multiplex-peer-max-peers", None, Value, false, NotYet, "Peers per multiplexed socket."),
    opt("udp-recvmmsg", None, Flag, false, Inherent("UDP is always received with recvmmsg and sent to clients with sendmmsg"), "Batch UDP receives."),
    opt("udp-recvmmsg-log", None, Flag, false, NotYet, "Log recvmmsg statistics."),
    opt("udp-sendmmsg-log", None, Flag, false, NotYet, "Log sendmmsg statistics."),
    opt("no-udp-gro", None, Flag, false, Yes, "Leave UDP GRO off: by default every UDP listener and relay socket takes runs of datagrams the network card coalesced in one receive, which turnserver splits again."),
    opt("udp-gso", None, Flag, false, Inherent("runs of datagrams to one destination are always sent with UDP GSO where the kernel and device allow it"), "Use UDP GSO."),
    // Peer access
    opt("allow-loopback-peers", None, Flag, false, Yes, "Allow relaying to loopback peers (127.0.0.0/8, ::1). Default: denied."),
    opt("allow-private-peers", None, Flag, false, Yes, "Allow relaying to private peers (RFC 1918, 100.64/10, fc00::/7), as coturn 4.6.1 did. Default: denied."),
    opt("no-loopback-peers", None, Flag, false, Inherent("loopback peers are denied by default"), "Legacy: deny loopback peers."),
    opt("no-multicast-peers", None, Flag, false, Inherent("multicast and broadcast peers are always denied"), "Deny multicast and broadcast peers."),
    opt("denied-peer-ip", None, Value, true, Yes, "Deny peers in this IP, range a-b or CIDR; repeatable."),
    opt("allowed-peer-ip", None, Value, true, Yes, "Allow peers in this IP, range a-b or CIDR; wins over denials; repeatable."),
    // Authentication
    opt("lt-cred-mech", Some('a'), Flag, false, Yes, "Use long-term credentials."),
    opt("no-auth", Some('z'), Flag, false, Yes, "Allow anonymous access."),
    opt("user", Some('u'), Value, true, Yes, "User account name:password or name:0x<32 hex key>; repeatable."),
    opt("realm", Some('r'), Value, false, Yes, "Realm for long-term credentials. Default: the host name."),
    opt("use-auth-secret", None, Flag, false, Yes, "TURN REST API: time-limited credentials."),
    opt("static-auth-secret", None, Value, true, Yes, "TURN REST API shared secret; repeatable, every one is tried."),
    opt("rest-api-separator", Some('C'), Value, false, Yes, "Separator between timestamp and user in REST usernames. Default: ':'."),
    opt("secret-ts-exp-time", None, Value, false, Obsolete("it had no effect since coturn 4.5 and was removed in 4.7"), "Deprecated."),
    opt("stale-nonce", None, Optional, false, Yes, "Nonce lifetime, seconds; 0 = never stale. Default: 600."),
    opt("server-name", None, Value, false, Yes, "Server name (default realm when realm is not set)."),
    opt("oauth", None, Flag, false, NotYet, "RFC 7635 third-party authorization."),
    opt("check-origin-consistency", None, Flag, false, NotYet, "Require a constant ORIGIN per session."),
    opt("secure-stun", None, Flag, false, Yes, "Require authentication for Binding."),
    opt("stateless-nonce", None, Flag, false, Inherent("nonces are always stateless"), "Stateless nonces."),
    opt("stateless-nonce-secret", None, Value, false, NotYet, "Shared secret for stateless nonces."),
    opt("unauthorized-ratelimit", None, Flag, false, Inherent("answers to unauthenticated requests are always rate-limited; unauthorized-ratelimit-rps=0 turns it off"), "Rate-limit 401 responses."),
    opt("unauthorized-ratelimit-rps", None, Value, false, Yes, "Answers to unauthenticated requests (401, 438, 400, 420) per second per source address, burst 5 s worth; 0 = unlimited. Default: 20."),
    opt("userdb", Some('b'), Value, false, NotYet, "SQLite user database."),
    opt("psql-userdb", Some('e'), Value, false, NotYet, "PostgreSQL user database."),
    opt("mysql-userdb", Some('M'), Value, false, NotYet, "MySQL user database."),
    opt("mongo-userdb", Some('J'), Value, false, NotYet, "MongoDB user database."),
    opt("redis-userdb", Some('N'), Value, false, NotYet, "Redis user database."),
    opt("redis-statsdb", Some('O'), Value, false, NotYet, "Redis statistics database."),
    opt("secret-key-file", None, Value, false, NotYet, "AES key for encrypted database passwords."),
    opt("no-auth-pings", None, Flag, false, Inherent("there is no database to ping"), "Disable database health checks."),
    opt("no-dynamic-ip-list", None, Flag, false, Inherent("peer lists come only from the configuration"), "Do not read peer lists from the database."),
    opt("no-dynamic-realms", None, Flag, false, Inherent("realms come only from the configuration"), "Do not read realms from the database."),
    // Quotas and lifetimes
    opt("user-quota", Some('q'), Value, false, Yes, "Concurrent allocations per user (486 beyond); 0 = unlimited. Default: 0."),
    opt("total-quota", Some('Q'), Value, false, Yes, "Concurrent allocations in total (486 beyond); 0 = unlimited. Default: 0."),
    opt("max-bps", Some('s'), Value, false, Yes, "Bytes per second per allocation, each direction; excess is dropped; 0 = unlimited. Default: 0."),
    opt("bps-capacity", Some('B'), Value, false, Yes, "Bytes per second to hand out in total, max-bps per allocation (486 beyond); needs max-bps; 0 = unlimited."),
    opt("max-allocate-lifetime", None, Optional, false, Yes, "Cap on allocation lifetime, seconds. Default: 3600."),
    opt("channel-lifetime", None, Optional, false, Yes, "Channel binding lifetime, seconds. Default: 600."),
    opt("permission-lifetime", None, Optional, false, Yes, "Permission lifetime, seconds. Default: 300."),
    opt("max-allocate-timeout", None, Value, false, Yes, "Seconds a TCP/TLS connection may stay silent without an allocation. Default: 60."),
    opt("mobility", None, Flag, false, Yes, "RFC 8016 mobility: clients may move their allocation to a new address."),
    opt("udp-steering", None, Value, false, Yes, "auto (default): while the load is light, every UDP client datagram goes to the first relay thread (fewer wake-ups), and the kernel spreads them again when it gets busy; off: always spread. Off with mobility."),
    opt("drain-min-allocations", None, Value, false, NotYet, "Drain mode threshold."),
    // STUN behaviour
    opt("fingerprint", Some('f'), Flag, false, Yes, "Add FINGERPRINT to every response."),
    opt("stun-only", Some('S'), Flag, false, Yes, "Serve STUN only: TURN requests are ignored."),
    opt("no-stun", None, Flag, false, Yes, "Do not answer Binding (TURN only)."),
    opt("no-software-attribute", None, Flag, false, Inherent("SOFTWARE is not sent unless software-attribute is set"), "Do not send SOFTWARE."),
    opt("software-attribute", None, Flag, false, Yes, "Send SOFTWARE in responses."),
    opt("no-rfc5780", None, Flag, false, Inherent("RFC 5780 NAT discovery is not offered"), "Disable RFC 5780."),
    opt("rfc5780", None, Flag, false, NotYet, "Enable RFC 5780 NAT discovery."),
    opt("no-stun-backward-compatibility", None, Flag, false, Inherent("RFC 3489 requests are not answered"), "Only RFC 5389 STUN."),
    opt("stun-backward-compatibility", None, Flag, false, NotYet, "Answer RFC 3489 requests."),
    opt("rfc3489-compatibility", None, Flag, false, NotYet, "Answer RFC 3489 requests."),
    opt("response-origin-only-with-rfc5780", None, Flag, false, Inherent("RESPONSE-ORIGIN is never sent"), "RESPONSE-ORIGIN only with RFC 5780."),
    opt("rfc5766-channel-numbers", None, Flag, false, Inherent("channel numbers 0x4000-0x7FFF are always accepted"), "Accept RFC 5766 channel numbers."),
    opt("include-reason-string", None, Flag, false, Inherent("error responses always carry a reason phrase"), "Descriptive error reasons."),
    opt("log-binding", None, Flag, false, Inherent("Binding requests are never logged"), "Log Binding requests."),
    opt("respond-http-unsupported", None, Flag, false, NotYet, "Answer HTTP on TURN ports."),
    opt("drop-invalid-packets", None, Flag, false, Inherent("invalid packets are always dropped"), "Drop invalid packets."),
    opt("drop-invalid-packets-log", None, Flag, false, NotYet, "Log dropped packets."),
    // TLS
    opt("cert", None, Value, false, Yes, "TLS certificate chain (PEM)."),
    opt("pkey", None, Value, false, Yes, "TLS private key (PEM)."),
    opt("pkey-pwd", None, Value, false, NotYet, "Private key password."),
    opt("cipher-list", None, Value, false, NotYet, "OpenSSL cipher list."),
    opt("CA-file", None, Value, false, NotYet, "CA for client certificates."),
    opt("ec-curve-name", None, Value, false, Inherent("curves are negotiated by rustls"), "ECDH curve."),
    opt("dh566", None, Flag, false, Inherent("DHE is not used; ECDHE only"), "566-bit DH."),
    opt("dh1066", None, Flag, false, Inherent("DHE is not used; ECDHE only"), "1066-bit DH."),
    opt("dh-file", None, Value, false, Inherent("DHE is not used; ECDHE only"), "DH parameters file."),
    opt("no-tlsv1", None, Flag, false, Inherent("TLS 1.0 is never offered"), "Disable TLS 1.0."),
    opt("no-tlsv1_1", None, Flag, false, Inherent("TLS 1.1 is never offered"), "Disable TLS 1.1."),
    opt("no-tlsv1_2", None, Flag, false, Yes, "Disable TLS 1.2 (TLS 1.3 only)."),
    opt("tlsv1", None, Flag, false, NotYet, "Enable TLS 1.0."),
    opt("tlsv1_1", None, Flag, false, NotYet, "Enable TLS 1.1."),
    opt("no-sslv2", None, Flag, false, Obsolete("SSL is never offered"), "Deprecated."),
    opt("no-sslv3", None, Flag, false, Obsolete("SSL is never offered"), "Deprecated."),
    opt("raw-public-keys", None, Flag, false, NotYet, "TLS raw public keys."),
    opt("acme-redirect", None, Value, false, NotYet, "Redirect ACME challenges."),
    // Logging
    opt("log-file", Some('l'), Value, false, Yes, "Log file path, or stdout. Default: stdout."),
    opt("no-stdout-log", None, Flag, false, Yes, "With log-file, do not also log to stdout."),
    opt("syslog", None, Flag, false, Yes, "Log to syslog as well."),
    opt("syslog-facility", None, Value, false, Yes, "Syslog facility, e.g. LOG_LOCAL1. Default: LOG_DAEMON."),
    opt("simple-log", None, Flag, false, Inherent("the log file name is used as given"), "No pid/date in the log file name."),
    opt("new-log-timestamp", None, Flag, false, Inherent("timestamps are always ISO 8601"), "ISO 8601 timestamps."),
    opt("new-log-timestamp-format", None, Value, false, NotYet, "Timestamp format."),
    opt("log-level", None, Value, false, Yes, "Log level: error, warn, info, debug or trace (overrides -v/-V). Default: info."),
    opt("verbose", Some('v'), Flag, false, Yes, "Verbose: log every request."),
    opt("Verbose", Some('V'), Flag, false, Yes, "Extra verbose."),
    // Process and management
    opt("daemon", Some('o'), Flag, false, Yes, "Detach and run in the background."),
    opt("pidfile", None, Value, false, Yes, "Write the process id to this file (empty: none). Default: none."),
    opt("proc-user", None, Value, false, Yes, "Run as this user once ports are bound and keys read."),
    opt("proc-group", None, Value, false, Yes, "Run as this group once ports are bound and keys read."),
    opt("drain-timeout", None, Value, false, Yes, "Seconds SIGTERM waits for allocations to end before exiting. Default: 30."),
    opt("no-cli", None, Flag, false, Inherent("there is no telnet CLI"), "Disable the telnet CLI."),
    opt("cli", None, Flag, false, NotYet, "Enable the telnet CLI."),
    opt("cli-ip", None, Value, false, Inherent("there is no telnet CLI"), "Telnet CLI address."),
    opt("cli-port", None, Value, false, Inherent("there is no telnet CLI"), "Telnet CLI port."),
    opt("cli-password", None, Value, false, Inherent("there is no telnet CLI"), "Telnet CLI password."),
    opt("cli-max-output-sessions", None, Value, false, Inherent("there is no telnet CLI"), "Telnet CLI output limit."),
    opt("web-admin", None, Flag, false, NotYet, "HTTPS admin interface."),
    opt("web-admin-ip", None, Value, false, NotYet, "Web admin address."),
    opt("web-admin-port", None, Value, false, NotYet, "Web admin port."),
    opt("web-admin-listen-on-workers", None, Flag, false, NotYet, "Web admin on TURN ports."),
    opt("prometheus", None, Flag, false, Yes, "Serve Prometheus metrics over HTTP, with / and /health for health checks."),
    opt("prometheus-port", None, Value, false, Yes, "Metrics port. Default: 9641."),
    opt("prometheus-address", None, Value, false, Yes, "Metrics address. Default: 0.0.0.0."),
    opt("prometheus-path", None, Value, false, Yes, "Metrics path. Default: /metrics."),
    opt("prometheus-username-labels", None, Flag, false, Yes, "Allocations per user as a labelled gauge (at most 1000 users)."),
    opt("prometheus-tls", None, Flag, false, NotYet, "TLS for the metrics endpoint."),
    opt("prometheus-cert", None, Value, false, NotYet, "Metrics endpoint certificate."),
    opt("prometheus-key", None, Value, false, NotYet, "Metrics endpoint key."),
    opt("alternate-server", None, Value, true, Yes, "Redirect Allocates over UDP/TCP to ip[:port] with 300 Try Alternate; repeatable (round-robin)."),
    opt("tls-alternate-server", None, Value, true, Yes, "Redirect Allocates over TLS to ip[:port] (default port 5349); repeatable."),
    opt("udp-alternate-server", None, Value, true, NotYet, "ALTERNATE-SERVER for UDP."),
    opt("tcp-alternate-server", None, Value, true, NotYet, "ALTERNATE-SERVER for TCP."),
];

/// Looks an option up by its long name or an alias.
pub fn find(name: &str) -> Option<&'static Spec> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map_or(name, |(_, real)| real);
    OPTIONS.iter().find(|s| s.name == name)
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
            assert_eq!(find(name).unwrap().support, Support::Yes, "{name}");
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
