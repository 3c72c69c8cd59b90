//! Addresses and identities: the transport, the client 5-tuple that keys an
//! allocation (RFC 8656 §2), allocation ids and address families.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Transport between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    /// DTLS over UDP (coturn's `turns:` over UDP): datagrams, encrypted.
    Dtls,
}

impl Transport {
    /// TCP and TLS carry a byte stream, so ChannelData is padded to 4 bytes.
    pub fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// TLS or DTLS: `tls-alternate-server` applies.
    pub fn is_secure(self) -> bool {
        matches!(self, Transport::Tls | Transport::Dtls)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Dtls => "dtls",
        })
    }
}

/// The client side 5-tuple that identifies an allocation (RFC 8656 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FiveTuple {
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The server address the client sent to.
    pub server: SocketAddr,
    pub transport: Transport,
}

/// An IP address as 128 bits (IPv4 in the low 32), for hashing.
fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// Hashes the addresses, ports and transport in one write when both
/// addresses are IPv4 (all of it fits in 128 bits), else in three, rather
/// than field by field (a dozen writes through `SocketAddr`'s own `Hash`):
/// the allocation table is looked up by 5-tuple for every datagram a client
/// sends. Values equal under `Eq` hash alike (IPv6 flow info and scope,
/// which `Eq` also compares, are left out of the hash).
impl std::hash::Hash for FiveTuple {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let ports = u128::from(self.client.port()) << 24
            | u128::from(self.server.port()) << 8
            | (self.transport as u128) << 2;
        match (self.client.ip(), self.server.ip()) {
            (IpAddr::V4(c), IpAddr::V4(s)) => state.write_u128(
                u128::from(u32::from(c)) << 96 | u128::from(u32::from(s)) << 64 | ports,
            ),
            (c, s) => {
                state.write_u128(ip_bits(c));
                state.write_u128(ip_bits(s));
                let family = u128::from(c.is_ipv6()) << 1 | u128::from(s.is_ipv6());
                state.write_u64((ports | family) as u64);
            }
        }
    }
}

impl fmt::Display for FiveTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}->{}", self.transport, self.client, self.server)
    }
}

/// Identifies an allocation; stays unique for the life of the [`Server`]
/// (slots are reused, generations are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocationId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl AllocationId {
    /// An id from its slot and generation. A [`super::Server`] knows only
    /// the ids it handed out; this is for drivers' own tests and tables.
    pub fn new(index: u32, generation: u32) -> Self {
        AllocationId { index, generation }
    }

    /// The allocation's slot in its [`Server`]'s table: small and dense, so
    /// a driver can index its own per-allocation tables with it. A slot is
    /// reused once its allocation ends; compare whole ids to tell the
    /// allocations apart.
    pub fn slot(&self) -> usize {
        self.index as usize
    }
}

/// Address family of a relayed transport address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Its number in REQUESTED-ADDRESS-FAMILY and ADDRESS-ERROR-CODE
    /// (RFC 8656 §18.6): 0x01 IPv4, 0x02 IPv6.
    pub const fn code(self) -> u8 {
        match self {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        }
    }
}

/// Relay address family used when an Allocate has no
/// REQUESTED-ADDRESS-FAMILY (coturn's `allocation-default-address-family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DefaultFamily {
    /// IPv4, as RFC 8656 §7.2 specifies.
    #[default]
    Ipv4,
    Ipv6,
    /// The family of the address the client connected to.
    Keep,
}

/// `external-ip`: the public address advertised in XOR-RELAYED-ADDRESS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalIp {
    pub public: IpAddr,
    /// With `public/private`, only relays bound on `private` map to `public`;
    /// without it, every relay of the same family does.
    pub private: Option<IpAddr>,
}
