//! The eBPF ChannelData fast path: the programs of `relay.bpf.c` (a TC
//! variant and an XDP variant sharing their maps), compiled by build.rs
//! with clang and embedded, loaded with aya and attached (TCX or XDP links,
//! which end with the process) to the interfaces that hold the listening
//! and relayed addresses.
//!
//! A [`Binding`] installed here makes the kernel relay that channel's
//! ChannelData both ways without the server's sockets: client → listening
//! address becomes UDP from the relayed address to the peer, and peer →
//! relayed address becomes ChannelData from the listening address to the
//! client. Everything else reaches the sockets as before (see the program's
//! header comment). [`Offload::counters`] reads back what was relayed.
//!
//! The workers (`server::worker`) install the bindings the core announces
//! (`turn::Event::ChannelBound`), take them out when an allocation ends or
//! moves, and add the counters to the core's (`ebpf-offload` option).

use std::net::SocketAddr;

/// A channel binding as the fast path relays it: the client 5-tuple's two
/// ends, the allocation's relayed transport address, the peer and the
/// channel number (0x4000-0x4FFF, or to 0x7FFF with RFC 5766's range).
/// Both addresses of a side share a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub client: SocketAddr,
    /// The listening address the client sends to.
    pub server: SocketAddr,
    pub relayed: SocketAddr,
    pub peer: SocketAddr,
    pub channel: u16,
    /// Until when it holds, nanoseconds of CLOCK_MONOTONIC (see
    /// [`monotonic_ns`]): the channel's expiry or its peer permission's,
    /// whichever is first. Past it the program leaves the datagrams to
    /// the sockets (whose core drops them).
    pub expires_ns: u64,
}

/// `at` as nanoseconds of CLOCK_MONOTONIC, the clock of `Instant` on Linux
/// and of the program's `bpf_ktime_get_ns`.
pub fn monotonic_ns(at: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0);
    if at >= now {
        mono.saturating_add(u64::try_from((at - now).as_nanos()).unwrap_or(u64::MAX))
    } else {
        mono.saturating_sub(u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// What the program relayed for one direction of a binding.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    /// Payload bytes (without the ChannelData header).
    pub bytes: u64,
    /// When the last one went, nanoseconds of CLOCK_MONOTONIC.
    pub last_ns: u64,
}

/// `struct taddr`: IPv4 in the first 4 bytes of `ip`, the port in network
/// order, the family as 4 or 6.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TAddr {
    ip: [u8; 16],
    port: u16,
    family: u8,
    pad: u8,
}

impl From<SocketAddr> for TAddr {
    fn from(a: SocketAddr) -> TAddr {
        let mut t = TAddr {
            port: a.port().to_be(),
            ..TAddr::default()
        };
        match a {
            SocketAddr::V4(v4) => {
                t.ip[..4].copy_from_slice(&v4.ip().octets());
                t.family = 4;
            }
            SocketAddr::V6(v6) => {
                t.ip = v6.ip().octets();
                t.family = 6;
            }
        }
        t
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ClientKey {
    client: TAddr,
    server: TAddr,
    channel: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PeerKey {
    peer: TAddr,
    relay: TAddr,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ToPeer {
    relay: TAddr,
    peer: TAddr,
    expires_ns: u64,
    /// The binding's entry in `COUNTERS`.
    slot: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ToClient {
    server: TAddr,
    client: TAddr,
    channel: u16,
    pad: u16,
    slot: u32,
    expires_ns: u64,
}

/// `struct binding_counters`: one CPU's counts of one binding.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct BindingCounters {
    to_peer: Counters,
    to_client: Counters,
}

/// Bindings the maps hold at most (`MAX_BINDINGS` of the program).
const MAX_BINDINGS: u32 = 65536;

impl Binding {
    fn client_key(&self) -> ClientKey {
        ClientKey {
            client: self.client.into(),
            server: self.server.into(),
            channel: self.channel,
            pad: 0,
        }
    }

    fn peer_key(&self) -> PeerKey {
        PeerKey {
            peer: self.peer.into(),
            relay: self.relayed.into(),
        }
    }

    /// What identifies a binding across refreshes: everything but its
    /// expiry.
    fn identity(&self) -> (SocketAddr, SocketAddr, SocketAddr, SocketAddr, u16) {
        (
            self.client,
            self.server,
            self.relayed,
            self.peer,
            self.channel,
        )
    }
}

#[cfg(ebpf)]
mod loaded {
    use super::*;
    use aya::Ebpf;
    use aya::maps::HashMap;
    use aya::programs::LinkOrder;
    use aya::programs::tc::{
        SchedClassifier, SchedClassifierLinkId, TcAttachOptions, TcAttachType,
    };
    use aya::programs::{Xdp, XdpMode};

    // SAFETY: plain `repr(C)` data without padding the kernel could leak
    // into (every gap is an explicit field), valid for any bit pattern.
    unsafe impl aya::Pod for ClientKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PeerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToPeer {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ToClient {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BindingCounters {}

    /// `e` and its causes, `: `-separated (aya's errors keep the
    /// system's error, such as EBUSY, in their source).
    fn with_causes(e: &dyn std::error::Error) -> String {
        let mut out = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            out.push_str(&format!(": {c}"));
            cause = c.source();
        }
        out
    }

    /// The TC variant in `bpf`.
    fn classifier(bpf: &mut Ebpf) -> Result<&mut SchedClassifier, String> {
        bpf.program_mut("turn_channel_data")
            .ok_or("the eBPF object has no turn_channel_data")?
            .try_into()
            .map_err(|e| format!("turn_channel_data: {e}"))
    }

    /// The program's object file, built by build.rs.
    static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/relay.bpf.o"));

    /// The loaded fast path; detached and unloaded when dropped (or when
    /// the process dies: TCX links die with their last descriptor).
    pub struct Offload {
        bpf: Ebpf,
        /// The `COUNTERS` slot of each installed binding.
        slots:
            std::collections::HashMap<(SocketAddr, SocketAddr, SocketAddr, SocketAddr, u16), u32>,
        /// Unused slots, the longest unused first: a datagram the program
        /// was relaying when its binding was removed counts in a slot that
        /// no new binding has taken yet.
        free: std::collections::VecDeque<u32>,
        /// Whether the XDP variant is loaded (on first [`Offload::attach_xdp`]).
        xdp_loaded: bool,
        /// The TC variant's links, by interface.
        tc_links: Vec<(String, SchedClassifierLinkId)>,
    }

    impl Offload {
        /// Loads the program into the kernel. Errors: no CAP_BPF /
        /// CAP_NET_ADMIN, a kernel without BPF, the verifier's refusal.
        pub fn load() -> Result<Offload, String> {
            let mut bpf = Ebpf::load(OBJECT).map_err(|e| {
                format!(
                    "loading the eBPF program: {e} (it needs CAP_BPF and CAP_NET_ADMIN, or root)"
                )
            })?;
            classifier(&mut bpf)?
                .load()
                .map_err(|e| format!("loading turn_channel_data: {}", with_causes(&e)))?;
            Ok(Offload {
                bpf,
                slots: Default::default(),
                free: (0..MAX_BINDINGS).collect(),
                xdp_loaded: false,
                tc_links: Vec::new(),
            })
        }

        /// Attaches the program to the ingress of `interface` (a TCX link,
        /// kernel 6.6 or later).
        pub fn attach(&mut self, interface: &str) -> Result<(), String> {
            let link = classifier(&mut self.bpf)?
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| format!("attaching to {interface}: {}", with_causes(&e)))?;
            self.tc_links.push((interface.to_string(), link));
            Ok(())
        }

        /// Moves `interface` from the TC variant to the XDP variant: XDP
        /// first (it runs before TC, so from then on TC sees none of the
        /// relayed traffic), then the TC link goes. Error: XDP cannot be
        /// attached (the TC link stays).
        pub fn replace_tc_with_xdp(&mut self, interface: &str) -> Result<(), String> {
            self.attach_xdp(interface)?;
            while let Some(i) = self.tc_links.iter().position(|(n, _)| n == interface) {
                let (_, link) = self.tc_links.swap_remove(i);
                classifier(&mut self.bpf)?
                    .detach(link)
                    .map_err(|e| format!("detaching TC from {interface}: {e}"))?;
            }
            Ok(())
        }

        /// Attaches the XDP variant to `interface` in driver (native)
        /// mode, as a BPF link that ends with the process. The maps are
        /// the TC variant's: either relays the same bindings. Errors: the
        /// driver has no native XDP, the kernel refused.
        pub fn attach_xdp(&mut self, interface: &str) -> Result<(), String> {
            let prog: &mut Xdp = self
                .bpf
                .program_mut("turn_channel_xdp")
                .ok_or("the eBPF object has no turn_channel_xdp")?
                .try_into()
                .map_err(|e| format!("turn_channel_xdp: {e}"))?;
            if !self.xdp_loaded {
                prog.load()
                    .map_err(|e| format!("loading turn_channel_xdp: {e}"))?;
                self.xdp_loaded = true;
            }
            prog.attach(interface, XdpMode::Driver)
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "attaching XDP (driver mode) to {interface}: {}",
                        with_causes(&e)
                    )
                })
        }

        fn peer_map(
            &mut self,
        ) -> Result<HashMap<&mut aya::maps::MapData, ClientKey, ToPeer>, String> {
            HashMap::try_from(self.bpf.map_mut("TO_PEER").ok_or("no TO_PEER map")?)
                .map_err(|e| format!("TO_PEER: {e}"))
        }

        fn client_map(
            &mut self,
        ) -> Result<HashMap<&mut aya::maps::MapData, PeerKey, ToClient>, String> {
            HashMap::try_from(self.bpf.map_mut("TO_CLIENT").ok_or("no TO_CLIENT map")?)
                .map_err(|e| format!("TO_CLIENT: {e}"))
        }

        fn counter_map(
            &mut self,
        ) -> Result<aya::maps::PerCpuArray<&mut aya::maps::MapData, BindingCounters>, String>
        {
            aya::maps::PerCpuArray::try_from(self.bpf.map_mut("COUNTERS").ok_or("no COUNTERS map")?)
                .map_err(|e| format!("COUNTERS: {e}"))
        }

        /// Relays `b` in the kernel from now on, both ways, until its
        /// expiry; installing it again moves the expiry and keeps counting
        /// (the counts live apart from the binding, so none is lost to the
        /// refresh). Errors: the maps are full (65,536 bindings), the
        /// kernel refused.
        pub fn install(&mut self, b: &Binding) -> Result<(), String> {
            let slot = match self.slots.get(&b.identity()) {
                Some(&slot) => slot,
                None => {
                    let slot = self
                        .free
                        .pop_front()
                        .ok_or("the fast path holds 65536 bindings already")?;
                    let cpus = aya::util::nr_cpus().map_err(|(what, e)| format!("{what}: {e}"))?;
                    let zero =
                        aya::maps::PerCpuValues::try_from(vec![BindingCounters::default(); cpus])
                            .map_err(|e| format!("COUNTERS: {e}"));
                    let zeroed = zero.and_then(|z| {
                        self.counter_map()?
                            .set(slot, z, 0)
                            .map_err(|e| format!("COUNTERS: {e}"))
                    });
                    if let Err(e) = zeroed {
                        self.free.push_front(slot);
                        return Err(e);
                    }
                    self.slots.insert(b.identity(), slot);
                    slot
                }
            };
            let to_peer = ToPeer {
                relay: b.relayed.into(),
                peer: b.peer.into(),
                expires_ns: b.expires_ns,
                slot,
                pad: 0,
            };
            let to_client = ToClient {
                server: b.server.into(),
                client: b.client.into(),
                channel: b.channel,
                pad: 0,
                slot,
                expires_ns: b.expires_ns,
            };
            let installed = self
                .peer_map()
                .and_then(|mut m| {
                    m.insert(b.client_key(), to_peer, 0)
                        .map_err(|e| format!("installing {b:?}: {e}"))
                })
                .and_then(|()| {
                    self.client_map()?
                        .insert(b.peer_key(), to_client, 0)
                        .map_err(|e| format!("installing {b:?}: {e}"))
                });
            if installed.is_err() {
                self.remove(b);
            }
            installed
        }

        /// Stops relaying `b` in the kernel: its datagrams reach the
        /// sockets again. Returns its last counters (to the peer, to the
        /// client), zero when it was not installed.
        pub fn remove(&mut self, b: &Binding) -> (Counters, Counters) {
            let counters = self.counters(b).unwrap_or_default();
            if let Ok(mut m) = self.peer_map() {
                let _ = m.remove(&b.client_key());
            }
            if let Ok(mut m) = self.client_map() {
                let _ = m.remove(&b.peer_key());
            }
            if let Some(slot) = self.slots.remove(&b.identity()) {
                self.free.push_back(slot);
            }
            counters
        }

        /// Datagrams the program left to the sockets since it was loaded,
        /// by reason: no binding for a ChannelData, an unusual shape
        /// (padding, GSO, a checksum it cannot update), no route or
        /// neighbour, over the MTU, a checksum a local sender left to the
        /// device (CHECKSUM_PARTIAL), an expired binding.
        pub fn passed(&mut self) -> Result<[u64; 6], String> {
            let map = aya::maps::PerCpuArray::<_, u64>::try_from(
                self.bpf.map("PASSED").ok_or("no PASSED map")?,
            )
            .map_err(|e| format!("PASSED: {e}"))?;
            let mut out = [0u64; 6];
            for (i, o) in out.iter_mut().enumerate() {
                *o = map
                    .get(&(i as u32), 0)
                    .map_err(|e| format!("PASSED: {e}"))?
                    .iter()
                    .sum();
            }
            Ok(out)
        }

        /// What the kernel relayed for `b` so far: to the peer, to the
        /// client (every CPU's counts added up). Error: `b` is not
        /// installed.
        pub fn counters(&mut self, b: &Binding) -> Result<(Counters, Counters), String> {
            let slot = *self
                .slots
                .get(&b.identity())
                .ok_or_else(|| format!("{b:?} is not installed"))?;
            let per_cpu = self
                .counter_map()?
                .get(&slot, 0)
                .map_err(|e| format!("{b:?}: {e}"))?;
            let add = |sum: &mut Counters, c: &Counters| {
                sum.packets += c.packets;
                sum.bytes += c.bytes;
                sum.last_ns = sum.last_ns.max(c.last_ns);
            };
            let (mut up, mut down) = (Counters::default(), Counters::default());
            for c in per_cpu.iter() {
                add(&mut up, &c.to_peer);
                add(&mut down, &c.to_client);
            }
            Ok((up, down))
        }
    }
}

#[cfg(ebpf)]
pub use loaded::Offload;

/// Without clang at build time there is no fast path to load.
#[cfg(not(ebpf))]
pub struct Offload;

#[cfg(not(ebpf))]
impl Offload {
    /// Always an error: this build has no eBPF program.
    pub fn load() -> Result<Offload, String> {
        Err("this build has no eBPF fast path (clang was missing when it was built)".to_string())
    }

    /// Unreachable: there is no loaded program.
    pub fn attach(&mut self, _interface: &str) -> Result<(), String> {
        Err("no eBPF fast path in this build".to_string())
    }

    /// Unreachable: there is no loaded program.
    pub fn attach_xdp(&mut self, _interface: &str) -> Result<(), String> {
        Err("no eBPF fast path in this build".to_string())
    }

    /// Unreachable: there is no loaded program.
    pub fn replace_tc_with_xdp(&mut self, _interface: &str) -> Result<(), String> {
        Err("no eBPF fast path in this build".to_string())
    }

    /// Unreachable: there is no loaded program.
    pub fn install(&mut self, _b: &Binding) -> Result<(), String> {
        Err("no eBPF fast path in this build".to_string())
    }

    /// Unreachable: there is no loaded program.
    pub fn remove(&mut self, _b: &Binding) -> (Counters, Counters) {
        Default::default()
    }

    /// Unreachable: there is no loaded program.
    pub fn counters(&mut self, _b: &Binding) -> Result<(Counters, Counters), String> {
        Err("no eBPF fast path in this build".to_string())
    }

    /// Unreachable: there is no loaded program.
    pub fn passed(&mut self) -> Result<[u64; 6], String> {
        Err("no eBPF fast path in this build".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Rust mirrors have the C structs' sizes (checked against the
    /// object's BTF by aya too, at map load).
    #[test]
    fn layouts_match_the_c_structs() {
        assert_eq!(std::mem::size_of::<TAddr>(), 20);
        assert_eq!(std::mem::size_of::<ClientKey>(), 44);
        assert_eq!(std::mem::size_of::<PeerKey>(), 40);
        assert_eq!(std::mem::size_of::<ToPeer>(), 56);
        assert_eq!(std::mem::size_of::<ToClient>(), 56);
        assert_eq!(std::mem::size_of::<BindingCounters>(), 48);
        let t = TAddr::from("10.0.0.1:3478".parse::<SocketAddr>().unwrap());
        assert_eq!(&t.ip[..5], &[10, 0, 0, 1, 0]);
        assert_eq!(t.port.to_ne_bytes(), [0x0d, 0x96]);
        assert_eq!(t.family, 4);
    }
}
