//! The core's settings, derived from `turnserver.conf` by the driver.

use std::net::{IpAddr, SocketAddr};

use super::policy::PeerPolicy;
use super::quota;
use super::{DEFAULT_MAX_CHANNELS, DEFAULT_MAX_PERMISSIONS, DEFAULT_UNAUTHENTICATED_RATE};
use super::{DefaultFamily, ExternalIp};
use crate::auth::{
    Authenticator, FEATURE_PASSWORD_ALGORITHMS, FEATURE_USERNAME_ANONYMITY, Mechanism, NonceIssuer,
    PasswordAlgorithm,
};

/// Settings of the core, shared by every worker.
#[derive(Debug, Clone)]
pub struct Config {
    pub auth: Authenticator,
    pub nonces: NonceIssuer,
    /// Password algorithms offered in PASSWORD-ALGORITHMS, in order of
    /// preference (RFC 8489 §9.2.4, `password-algorithms`). Empty: the
    /// "Password algorithms" security feature is not announced and every
    /// request is checked with MD5 keys, as RFC 5389 servers do.
    pub password_algorithms: Vec<PasswordAlgorithm>,
    /// Requests must carry MESSAGE-INTEGRITY-SHA256 (`require-sha256`);
    /// MESSAGE-INTEGRITY (HMAC-SHA1) alone gets 401.
    pub require_sha256: bool,
    /// Add FINGERPRINT to every response (`fingerprint`); responses to
    /// requests carrying FINGERPRINT get one regardless.
    pub fingerprint: bool,
    /// SOFTWARE attribute for responses, if any.
    pub software: Option<String>,
    /// Cap on allocation lifetime, seconds (`max-allocate-lifetime`).
    pub max_allocation_lifetime: u32,
    /// Permission lifetime, seconds (`permission-lifetime`, 300).
    pub permission_lifetime: u32,
    /// Channel binding lifetime, seconds (`channel-lifetime`, 600).
    pub channel_lifetime: u32,
    pub policy: PeerPolicy,
    /// `relay-ip` addresses; empty means "the address the client used".
    pub relay_ips: Vec<IpAddr>,
    /// Every address the server listens on (fallback relay addresses for a
    /// family the client did not connect over).
    pub listening_ips: Vec<IpAddr>,
    pub external_ips: Vec<ExternalIp>,
    pub default_family: DefaultFamily,
    /// Accept channel numbers 0x5000–0x7FFF (RFC 5766) as well as
    /// 0x4000–0x4FFF (RFC 8656).
    pub rfc5766_channels: bool,
    /// Grant UDP relays (`no-udp-relay` turns this off: every Allocate
    /// gets 442).
    pub allow_udp_relay: bool,
    /// Grant TCP relays (RFC 6062) to clients over TCP and TLS
    /// (`no-tcp-relay` turns this off: 442).
    pub allow_tcp_relay: bool,
    /// RFC 8016 mobility (`mobility`): allocations asked for with an empty
    /// MOBILITY-TICKET get a ticket, and a Refresh carrying it from another
    /// 5-tuple moves the allocation there. Off: MOBILITY-TICKET gets 405.
    pub mobility: bool,
    /// The driver relays channel bindings below the sockets (an eBPF fast
    /// path): the core announces them with [`super::Event::ChannelBound`].
    pub offload_channels: bool,
    /// Key authenticating mobility tickets; shared by every worker.
    pub ticket_key: [u8; 32],
    /// Answers to unauthenticated requests (401, 438, 400, 420, 441) per
    /// second per source address, with a burst of five seconds' worth;
    /// `None` = unlimited (`unauthorized-ratelimit-rps`). Each worker counts
    /// its own clients.
    pub unauthenticated_rate: Option<u32>,
    /// Report every allocation's creation, refreshes and end as
    /// [`super::Event::Status`] (for `redis-statsdb` and a fleet's
    /// registry).
    pub report_allocations: bool,
    /// Every request on an allocation must carry the ORIGIN its Allocate
    /// carried, else 441 (`check-origin-consistency`).
    pub check_origin_consistency: bool,
    /// Binding requires long-term credentials too (`secure-stun`).
    pub secure_stun: bool,
    /// RFC 3489 classic STUN (`stun-backward-compatibility`): a Binding
    /// request without the magic cookie is answered with MAPPED-ADDRESS
    /// (RFC 3489 §11.2.1), rate-limited like unauthenticated answers, and
    /// RFC 5389 Binding responses carry MAPPED-ADDRESS too.
    pub rfc3489: bool,
    /// RFC 5780 NAT behaviour discovery (`rfc5780`, with two listening
    /// addresses of a family): the main and the alternate port, both
    /// listened on at every listening address. Binding over UDP then
    /// answers with OTHER-ADDRESS, RESPONSE-ORIGIN and MAPPED-ADDRESS, and
    /// honours CHANGE-REQUEST, RESPONSE-PORT and PADDING.
    pub rfc5780: Option<(u16, u16)>,
    /// Binding requests are ignored (`no-stun`).
    pub no_stun: bool,
    /// TURN requests are ignored: a STUN-only server (`stun-only`).
    pub stun_only: bool,
    /// Quotas and bandwidth limits.
    pub limits: quota::Limits,
    /// Permissions one allocation may hold at once; more get 508.
    pub max_permissions: usize,
    /// Channel bindings one allocation may hold at once; more get 508.
    pub max_channels: usize,
    /// `alternate-server`: redirect every Allocate over UDP/TCP with 300
    /// Try Alternate, round-robin among servers of the client's family
    /// (coturn's redirection mode).
    pub alternate_servers: Vec<SocketAddr>,
    /// `tls-alternate-server`: the same for clients over TLS.
    pub tls_alternate_servers: Vec<SocketAddr>,
}

impl Config {
    /// A configuration with coturn's defaults and the given authenticator.
    pub fn new(auth: Authenticator, nonces: NonceIssuer) -> Self {
        let password_algorithms =
            Authenticator::default_password_algorithms(auth.sha256_keys_available());
        Config {
            auth,
            nonces,
            password_algorithms,
            require_sha256: false,
            fingerprint: false,
            software: None,
            max_allocation_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            policy: PeerPolicy::default(),
            relay_ips: Vec::new(),
            listening_ips: Vec::new(),
            external_ips: Vec::new(),
            default_family: DefaultFamily::Ipv4,
            rfc5766_channels: true,
            allow_udp_relay: true,
            allow_tcp_relay: true,
            mobility: false,
            offload_channels: false,
            ticket_key: [0; 32],
            unauthenticated_rate: Some(DEFAULT_UNAUTHENTICATED_RATE),
            report_allocations: false,
            check_origin_consistency: false,
            secure_stun: false,
            rfc3489: false,
            rfc5780: None,
            no_stun: false,
            stun_only: false,
            limits: quota::Limits::default(),
            max_permissions: DEFAULT_MAX_PERMISSIONS,
            max_channels: DEFAULT_MAX_CHANNELS,
            alternate_servers: Vec::new(),
            tls_alternate_servers: Vec::new(),
        }
    }

    /// The STUN Security Features this configuration announces in its
    /// nonces (RFC 8489 §9.2, first byte of the 24 bits): "Password
    /// algorithms" when any are offered, "Username anonymity" when the
    /// configuration has users whose USERHASH can be resolved.
    pub fn security_features(&self) -> u8 {
        let mut f = 0;
        if !self.password_algorithms.is_empty() {
            f |= FEATURE_PASSWORD_ALGORITHMS;
        }
        if matches!(&self.auth.mechanism, Mechanism::LongTerm(users) if !users.is_empty()) {
            f |= FEATURE_USERNAME_ANONYMITY;
        }
        f
    }
}
