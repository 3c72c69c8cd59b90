//! The eBPF ChannelData fast path (server::offload) in the kernel, between
//! network namespaces the test creates: client —veth— relay —veth— peer.
//! With a channel binding installed, ChannelData from the client leaves the
//! relay as UDP from the relayed address to the peer and the peer's answers
//! come back as ChannelData, rewritten in the kernel with valid checksums,
//! while the relay's sockets see none of them; anything the program does
//! not own (another channel, a padded frame, a removed binding) reaches
//! the sockets untouched.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use common::{Client, NetNs, channel_bind_attrs, channel_data, free_ports, in_netns};
use turnserver::server::offload::{Binding, Offload};
use turnserver::stun::{Class, MessageWriter, attr, method};

/// Three namespaces: client (10.91.1.2), relay (10.91.1.1 on r0 and
/// 10.91.2.1 on r1), peer (10.91.2.2).
struct Topology {
    client: NetNs,
    relay: NetNs,
    peer: NetNs,
}

fn topology(tag: &str) -> Topology {
    let client = NetNs::empty(&format!("{tag}c"));
    let relay = NetNs::empty(&format!("{tag}r"));
    let peer = NetNs::empty(&format!("{tag}p"));
    let link = |a: &NetNs, an: &str, b: &NetNs, bn: &str| {
        a.ip(&[
            "-n", &a.name, "link", "add", an, "type", "veth", "peer", "name", bn, "netns", &b.name,
        ]);
    };
    link(&client, "c0", &relay, "r0");
    link(&peer, "p0", &relay, "r1");
    // Fixed link addresses, and neighbours known both ways, as a relay's
    // first exchanges would have resolved them.
    let ends = [
        (
            &client,
            "c0",
            "02:91:01:00:00:02",
            "10.91.1.2",
            "fd00:91:1::2",
        ),
        (
            &relay,
            "r0",
            "02:91:01:00:00:01",
            "10.91.1.1",
            "fd00:91:1::1",
        ),
        (
            &relay,
            "r1",
            "02:91:02:00:00:01",
            "10.91.2.1",
            "fd00:91:2::1",
        ),
        (
            &peer,
            "p0",
            "02:91:02:00:00:02",
            "10.91.2.2",
            "fd00:91:2::2",
        ),
    ];
    for (ns, dev, mac, ip, ip6) in ends {
        ns.ip(&["-n", &ns.name, "link", "set", dev, "address", mac]);
        ns.address(dev, &format!("{ip}/24"));
        // No duplicate address detection: usable at once.
        ns.ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{ip6}/64"),
            "dev",
            dev,
            "nodad",
        ]);
    }
    for (ns, dev, other) in [
        (&client, "c0", 1),
        (&relay, "r0", 0),
        (&relay, "r1", 3),
        (&peer, "p0", 2),
    ] {
        let (_, _, mac, ip, ip6) = ends[other];
        for addr in [ip, ip6] {
            ns.ip(&[
                "-n",
                &ns.name,
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
    }
    // Client and peer send complete UDP checksums, as datagrams from
    // other hosts arrive (a local sender over veth leaves them to the
    // device: see the last case of the test).
    common::require_tool("ethtool", "apt-get install ethtool");
    client.exec(&["ethtool", "-K", "c0", "tx", "off"]);
    peer.exec(&["ethtool", "-K", "p0", "tx", "off"]);
    // NAPI on the client's and the peer's ends (veth starts it when GRO is
    // asked for), as a network card has: the XDP variant's redirects into
    // a veth are delivered only then.
    for (ns, dev) in [(&client, "c0"), (&peer, "p0")] {
        ns.exec(&["ethtool", "-K", dev, "gro", "off"]);
        ns.exec(&["ethtool", "-K", dev, "gro", "on"]);
    }
    client.ip(&[
        "-n",
        &client.name,
        "route",
        "add",
        "default",
        "via",
        "10.91.1.1",
    ]);
    peer.ip(&[
        "-n",
        &peer.name,
        "route",
        "add",
        "default",
        "via",
        "10.91.2.1",
    ]);
    client.ip(&[
        "-n",
        &client.name,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:91:1::1",
    ]);
    peer.ip(&[
        "-n",
        &peer.name,
        "-6",
        "route",
        "add",
        "default",
        "via",
        "fd00:91:2::1",
    ]);
    // The kernel's route lookup for the program (bpf_fib_lookup) needs
    // forwarding on the interfaces it is attached to.
    relay.exec(&["sysctl", "-q", "-w", "net.ipv4.conf.all.forwarding=1"]);
    relay.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
    Topology {
        client,
        relay,
        peer,
    }
}

/// UDP checksum errors counted in the calling thread's namespace.
fn csum_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
    let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InCsumErrors")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap()
}

fn bind(ns: &NetNs, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = ns.run(move || UdpSocket::bind(addr).unwrap());
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Nothing waiting on `s` (within 200 ms).
fn silent(s: &UdpSocket) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let quiet = s.recv_from(&mut [0u8; 2048]).is_err();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    quiet
}

/// A listening, relay, client and peer socket in the topology's
/// namespaces (IPv4 or IPv6 addresses) and the channel binding between
/// them.
struct Ends {
    server: UdpSocket,
    relay: UdpSocket,
    client: UdpSocket,
    peer: UdpSocket,
    binding: Binding,
}

fn ends(t: &Topology, v6: bool, channel: u16, expires_ns: u64) -> Ends {
    let [server, relay, client, peer] = if v6 {
        [
            "[fd00:91:1::1]:3478",
            "[fd00:91:2::1]:50000",
            "[fd00:91:1::2]:40000",
            "[fd00:91:2::2]:9000",
        ]
    } else {
        [
            "10.91.1.1:3478",
            "10.91.2.1:50000",
            "10.91.1.2:40000",
            "10.91.2.2:9000",
        ]
    };
    let server = bind(&t.relay, server);
    let relay = bind(&t.relay, relay);
    let client = bind(&t.client, client);
    let peer = bind(&t.peer, peer);
    let binding = Binding {
        client: client.local_addr().unwrap(),
        server: server.local_addr().unwrap(),
        relayed: relay.local_addr().unwrap(),
        peer: peer.local_addr().unwrap(),
        channel,
        expires_ns,
    };
    Ends {
        server,
        relay,
        client,
        peer,
        binding,
    }
}

/// CLOCK_MONOTONIC nanoseconds `secs` from now.
fn expires_in(secs: u64) -> u64 {
    turnserver::server::offload::monotonic_ns(std::time::Instant::now() + Duration::from_secs(secs))
}

/// `n` datagrams of growing sizes each way through channel `b`, checked
/// whole: client -> peer loses its ChannelData header and comes from the
/// relayed address; peer -> client gains it and comes from the listening
/// address. `why` says what to look at when one does not arrive.
fn relay_both_ways(
    client: &UdpSocket,
    peer: &UdpSocket,
    b: &Binding,
    n: u32,
    tag: &str,
    why: &mut dyn FnMut() -> String,
) {
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let payload = format!("{tag} to the peer #{i} {}", "x".repeat(i as usize % 50));
        client
            .send_to(&channel_data(b.channel, payload.as_bytes()), b.server)
            .unwrap();
        let (len, from) = peer
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{tag}: not relayed to the peer ({e}); {}", why()));
        assert_eq!((&buf[..len], from), (payload.as_bytes(), b.relayed));
        let payload = format!("{tag} to the client #{i} {}", "y".repeat(i as usize % 37));
        peer.send_to(payload.as_bytes(), b.relayed).unwrap();
        let (len, from) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("{tag}: not relayed to the client ({e}); {}", why()));
        assert_eq!(from, b.server);
        assert_eq!(
            &buf[..len],
            &channel_data(b.channel, payload.as_bytes())[..]
        );
    }
}

/// What the fast path left to the sockets and counted for `b`.
fn fast_path_state(offload: &mut Offload, b: &Binding) -> String {
    format!(
        "left to the sockets: {:?}; counters {:?}",
        offload.passed(),
        offload.counters(b)
    )
}

/// A client in the client namespace with an allocation of alice's on the
/// server at `server` and channel 0x4001 bound to `peer`; the binding as
/// the server holds it (its expiry unknown here: 0).
fn channel_client(t: &Topology, server: SocketAddr, peer: SocketAddr) -> (Client, Binding) {
    let mut client = in_netns(&t.client.name, move || {
        Client::bound("10.91.1.2:0".parse().unwrap(), server)
    });
    let r = client.allocate("alice", "alicepw");
    assert!(r.is_success(), "{:?}", r.code());
    let relayed = r.relayed();
    bind_channel(&mut client, peer);
    let binding = Binding {
        client: client.sock.local_addr().unwrap(),
        server,
        relayed,
        peer,
        channel: 0x4001,
        expires_ns: 0,
    };
    (client, binding)
}

/// Binds (or refreshes) channel 0x4001 of `client`'s allocation to `peer`.
fn bind_channel(client: &mut Client, peer: SocketAddr) {
    let r = client.signed(
        method::CHANNEL_BIND,
        &channel_bind_attrs(0x4001, peer),
        "alice",
        "alicepw",
    );
    assert!(r.is_success(), "{:?}", r.code());
}

#[test]
fn channel_data_is_relayed_in_the_kernel_both_ways() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads an eBPF program and must run as root"
    );
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = topology("o");
    let Ends {
        server,
        relay,
        client,
        peer,
        binding,
    } = ends(&t, false, 0x4001, expires_in(600));
    let mut offload = in_netns(&t.relay.name, || {
        let mut o = Offload::load().expect("load the fast path");
        o.attach("r0").unwrap();
        o.attach("r1").unwrap();
        o
    });
    offload.install(&binding).unwrap();
    let client_errors = in_netns(&t.client.name, csum_errors);
    let peer_errors = in_netns(&t.peer.name, csum_errors);

    const N: u32 = 200;
    relay_both_ways(&client, &peer, &binding, N, "v4", &mut || {
        fast_path_state(&mut offload, &binding)
    });
    let mut buf = [0u8; 2048];
    assert!(silent(&server), "the listening socket saw relayed traffic");
    assert!(silent(&relay), "the relay socket saw relayed traffic");
    let (up, down) = offload.counters(&binding).unwrap();
    assert_eq!((up.packets, down.packets), (u64::from(N), u64::from(N)));
    assert!(up.bytes > 0 && down.bytes > 0 && up.last_ns > 0);
    assert_eq!(in_netns(&t.client.name, csum_errors), client_errors);
    assert_eq!(in_netns(&t.peer.name, csum_errors), peer_errors);

    // What the program does not own reaches the sockets as it was sent.
    let other = channel_data(0x4002, b"unknown channel");
    client.send_to(&other, binding.server).unwrap();
    let (n, from) = server.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&other[..], binding.client));
    let mut padded = channel_data(0x4001, b"odd");
    padded.push(0);
    client.send_to(&padded, binding.server).unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &padded[..], "a padded frame goes to user space");
    let stranger = bind(&t.peer, "10.91.2.2:9001");
    stranger
        .send_to(b"not the bound peer", binding.relayed)
        .unwrap();
    let (n, _) = relay.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"not the bound peer");
    assert!(silent(&client), "an unbound peer reached the client");

    // A removed binding stops at once.
    let (up, down) = offload.remove(&binding);
    assert_eq!((up.packets, down.packets), (u64::from(N), u64::from(N)));
    client
        .send_to(&channel_data(0x4001, b"after"), binding.server)
        .unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &channel_data(0x4001, b"after")[..]);
    assert!(silent(&peer));

    // IPv6, both ways.
    let Ends {
        server: server6,
        relay: relay6,
        client: client6,
        peer: peer6,
        binding: b6,
    } = ends(&t, true, 0x4fff, binding.expires_ns);
    offload.install(&b6).unwrap();
    relay_both_ways(&client6, &peer6, &b6, 20, "v6", &mut || {
        fast_path_state(&mut offload, &b6)
    });
    assert!(silent(&server6) && silent(&relay6));
    assert_eq!(offload.counters(&b6).unwrap().0.packets, 20);
    assert_eq!(in_netns(&t.client.name, csum_errors), client_errors);
    assert_eq!(in_netns(&t.peer.name, csum_errors), peer_errors);
    offload.remove(&b6);

    // Without forwarding on the interface the route lookup refuses, and
    // the datagram takes the socket path.
    offload.install(&binding).unwrap();
    t.relay
        .exec(&["sysctl", "-q", "-w", "net.ipv4.conf.r0.forwarding=0"]);
    let refused = offload.passed().unwrap()[2];
    client
        .send_to(&channel_data(0x4001, b"no forwarding"), binding.server)
        .unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &channel_data(0x4001, b"no forwarding")[..]);
    assert_eq!(offload.passed().unwrap()[2], refused + 1);
    t.relay
        .exec(&["sysctl", "-q", "-w", "net.ipv4.conf.r0.forwarding=1"]);
    offload.remove(&binding);

    // An expired binding is left to the sockets at once, whatever the
    // maps still hold.
    let mut short = binding;
    short.expires_ns = turnserver::server::offload::monotonic_ns(
        std::time::Instant::now() + Duration::from_millis(300),
    );
    offload.install(&short).unwrap();
    client
        .send_to(&channel_data(0x4001, b"in time"), binding.server)
        .unwrap();
    assert_eq!(peer.recv_from(&mut buf).unwrap().0, 7);
    std::thread::sleep(Duration::from_millis(400));
    client
        .send_to(&channel_data(0x4001, b"too late"), binding.server)
        .unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &channel_data(0x4001, b"too late")[..]);
    assert_eq!(offload.passed().unwrap()[5], 1);
    offload.remove(&short);

    // A sender on this host whose checksum the device completes
    // (CHECKSUM_PARTIAL over veth) is left to the kernel's path.
    offload.install(&binding).unwrap();
    t.client.exec(&["ethtool", "-K", "c0", "tx", "on"]);
    let partial = offload.passed().unwrap()[4];
    client
        .send_to(&channel_data(0x4001, b"local sender"), binding.server)
        .unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &channel_data(0x4001, b"local sender")[..]);
    assert_eq!(offload.passed().unwrap()[4], partial + 1);
    drop(t);
}

/// Writes a configuration for the real binary in the relay namespace to
/// `dir`: listening on 10.91.1.1:`port`, relaying from 10.91.2.1 (ports
/// 50000-50400) to the peer 10.91.2.2 only, metrics on `port + 1`, no
/// control socket unless `extra` names one, then the lines of `extra`.
fn relay_config(dir: &common::TempDir, port: u16, extra: &str) -> std::path::PathBuf {
    let conf = dir.path("turnserver.conf");
    std::fs::write(
        &conf,
        format!(
            "listening-ip=10.91.1.1\nlistening-port={port}\nrelay-ip=10.91.2.1\n\
             min-port=50000\nmax-port=50400\nno-tls\nno-dtls\ncontrol-socket=\n\
             lt-cred-mech\nrealm=example.org\nallowed-peer-ip=10.91.2.2\n\
             prometheus\nprometheus-address=10.91.1.1\nprometheus-port={}\n{extra}\n",
            port + 1
        ),
    )
    .unwrap();
    conf
}

/// The metrics of the server listening on 10.91.1.1:`port` (served on
/// `port + 1` by [`relay_config`]), asked from the client's namespace.
fn metrics(t: &Topology, port: u16) -> String {
    let addr: SocketAddr = format!("10.91.1.1:{}", port + 1).parse().unwrap();
    in_netns(&t.client.name, move || common::http_get(addr, "/metrics").1)
}

/// The tests of this file one at a time: they count the programs attached.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// TCX links (BPF link type 11) of programs named turn_channel_data, on
/// the whole host, as bpftool lists them.
fn tcx_links() -> usize {
    links("turn_channel_data", 11, "tcx")
}

/// XDP links (BPF link type 6) of programs named turn_channel_xdp.
fn xdp_links() -> usize {
    links("turn_channel_xdp", 6, "xdp")
}

/// BPF links of type `kind` (number or name, as bpftool may print either)
/// of programs named `program`, on the whole host.
fn links(program: &str, kind: u64, kind_name: &str) -> usize {
    common::require_tool("bpftool", "apt-get install bpftool");
    let json = |args: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    };
    let progs = json(&["prog", "show"]);
    let ours: Vec<u64> = progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == program)
        .filter_map(|p| p["id"].as_u64())
        .collect();
    json(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["type"] == kind || l["type"] == kind_name)
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ours.contains(&id)))
        .count()
}

#[test]
fn the_server_offloads_channels_with_ebpf_offload_tc() {
    server_offloads_channels("tc");
}

#[test]
fn the_server_offloads_channels_with_ebpf_offload_xdp() {
    server_offloads_channels("xdp");
}

/// The real binary with `ebpf-offload=MODE` relays a channel in the kernel
/// both ways, counts it exactly, leaves the rest to user space, takes the
/// binding out when the allocation ends and leaves no link when killed.
fn server_offloads_channels(mode: &str) {
    let attached = || {
        if mode == "xdp" {
            xdp_links()
        } else {
            tcx_links()
        }
    };
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads an eBPF program and must run as root"
    );
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(attached(), 0, "another program is attached already");
    let t = topology(if mode == "xdp" { "x" } else { "s" });
    let port = free_ports(2);
    let dir = common::TempDir::new("offload");
    let conf = relay_config(
        &dir,
        port,
        &format!("user=alice:alicepw\nebpf-offload={mode}"),
    );
    let mut server = t.relay.start_server(&["-c", conf.to_str().unwrap()]);
    let how = if mode == "xdp" {
        "XDP, driver mode"
    } else {
        "TC ingress"
    };
    assert!(
        server.log().contains(&format!(
            "ebpf-offload={mode}: channel bindings of UDP clients are relayed in the kernel on r0, r1 ({how})"
        )),
        "{}",
        server.log()
    );
    assert_eq!(
        attached(),
        2,
        "attached to r0 and r1 (and no other test attached a program meanwhile)"
    );
    // A card's GRO would coalesce datagrams for sockets that ask for it,
    // and the program leaves coalesced frames to user space.
    assert!(
        server.log().contains("UDP GRO is off on the sockets"),
        "{}",
        server.log()
    );
    let server_addr: SocketAddr = format!("10.91.1.1:{port}").parse().unwrap();
    let peer = bind(&t.peer, "10.91.2.2:9000");
    let peer_addr = peer.local_addr().unwrap();
    let (mut client, binding) = channel_client(&t, server_addr, peer_addr);
    let relayed = binding.relayed;

    const N: u64 = 300;
    relay_both_ways(&client.sock, &peer, &binding, N as u32, mode, &mut || {
        server.log()
    });
    let mut buf = [0u8; 2048];
    // What the program does not own goes to user space, which relays it
    // as it would without the fast path: a Send indication, and
    // ChannelData padded to four bytes, as over TCP.
    let mut send = Vec::new();
    MessageWriter::new(&mut send, method::SEND, Class::Indication, &[7; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, peer_addr)
        .attr(attr::DATA, b"by indication");
    client.sock.send_to(&send, server_addr).unwrap();
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"by indication"[..], relayed));
    let mut padded = channel_data(0x4001, b"padded");
    padded.extend([0, 0]);
    client.sock.send_to(&padded, server_addr).unwrap();
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"padded"[..], relayed));
    // Metrics: every packet went through the fast path and is counted as
    // relayed, exactly (workers add the fast path's counts every second);
    // the two above were relayed by user space.
    std::thread::sleep(Duration::from_millis(2100));
    let body = metrics(&t, port);
    for (name, want) in [
        ("turn_offloaded_packets_total{direction=\"to_peer\"}", N),
        ("turn_offloaded_packets_total{direction=\"to_client\"}", N),
        ("turn_relayed_packets_total{direction=\"to_peer\"}", N + 2),
        ("turn_relayed_packets_total{direction=\"to_client\"}", N),
    ] {
        assert_eq!(
            common::metric(&body, name),
            Some(want as f64),
            "{name}\n{body}"
        );
    }
    // Deleting the allocation takes its channel out of the kernel at once,
    // and the log line counts what the kernel relayed.
    assert!(client.delete("alice", "alicepw").is_success());
    let log = server.log();
    assert!(
        log.contains(&format!("to_peer_packets={}", N + 2))
            && log.contains(&format!("to_client_packets={N}")),
        "{log}"
    );
    client
        .sock
        .send_to(&channel_data(0x4001, b"after the end"), server_addr)
        .unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        peer.recv_from(&mut buf).is_err(),
        "relayed after the allocation ended"
    );

    // SIGKILL leaves no program behind: its links die with it.
    server.kill();
    assert_eq!(attached(), 0, "a killed server left its program attached");
    drop(dir);
}

#[test]
fn auto_without_privileges_falls_back_to_sockets() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    common::require_tool("setpriv", "apt-get install util-linux");
    // A root without CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (as a
    // service without them would be).
    let dir = common::TempDir::new("offload-auto");
    let port = free_ports(1);
    let conf = dir.path("turnserver.conf");
    std::fs::write(
        &conf,
        format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\nno-tls\nno-dtls\ncontrol-socket=\n\
             lt-cred-mech\nuser=alice:alicepw\nrealm=example.org\nallow-loopback-peers\n\
             ebpf-offload=auto\nebpf-offload-interface=lo\n"
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args([
        "--bounding-set=-bpf,-net_admin,-sys_admin,-perfmon",
        "--inh-caps=-all",
        common::BIN,
        "-c",
        conf.to_str().unwrap(),
    ]);
    let s = common::Server::launch_cmd(cmd, port, port + 1, dir);
    let log = s.log_text();
    assert!(
        log.contains("ebpf-offload=auto: ") && log.contains("relaying through sockets"),
        "{log}"
    );
    assert_eq!(tcx_links(), 0);
    // And it relays.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut c = Client::new(s.udp_addr());
    let r = c.allocate("alice", "alicepw");
    assert!(r.is_success(), "{:?}", r.code());
    let bind = channel_bind_attrs(0x4001, peer.local_addr().unwrap());
    assert!(
        c.signed(method::CHANNEL_BIND, &bind, "alice", "alicepw")
            .is_success()
    );
    c.sock
        .send_to(&channel_data(0x4001, b"through sockets"), s.udp_addr())
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"through sockets");
}

#[test]
fn turnutils_uclient_relays_through_the_fast_path() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = topology("u");
    let port = free_ports(2);
    let dir = common::TempDir::new("offload-uclient");
    let conf = relay_config(&dir, port, "user=test:secret\nebpf-offload=tc");
    let server = t.relay.start_server(&["-c", conf.to_str().unwrap()]);
    // coturn's echo peer in the peer namespace.
    let peer_bin = common::require_tool(
        "turnutils_peer",
        "coturn's client tools, unpacked by tests/run-all.sh",
    );
    let _peer = common::Background(
        std::process::Command::new("ip")
            .args(["netns", "exec", &t.peer.name])
            .arg(peer_bin)
            .args(["-L", "10.91.2.2", "-p", "9000"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let p = port.to_string();
    let out = common::run_uclient_in(
        Some(&t.client.name),
        &[
            "-u",
            "test",
            "-w",
            "secret",
            "-e",
            "10.91.2.2",
            "-r",
            "9000",
            "-p",
            &p,
            "-m",
            "4",
            "-n",
            "200",
            "-l",
            "170",
            "-z",
            "5",
        ],
        "10.91.1.1",
        800,
        &|| server.log(),
    );
    let lost = out
        .lines()
        .find(|l| l.contains("Total lost packets"))
        .unwrap();
    eprintln!("uclient through the fast path: {lost}");
    std::thread::sleep(Duration::from_millis(1100));
    let body = metrics(&t, port);
    let up = common::metric(&body, "turn_offloaded_packets_total{direction=\"to_peer\"}").unwrap();
    let down = common::metric(
        &body,
        "turn_offloaded_packets_total{direction=\"to_client\"}",
    )
    .unwrap();
    let passed: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("turn_offload_passed_total"))
        .collect();
    eprintln!("offloaded: {up} to peers, {down} to clients; left to the sockets: {passed:?}");
    // Every data message both ways (4 clients, 200 each), whatever channel
    // numbers uclient picked (it uses RFC 5766's range up to 0x7FFF).
    assert!(up >= 800.0 && down >= 800.0, "{body}");
}

#[test]
fn max_bps_and_bps_capacity_hold_with_the_fast_path() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = topology("b");
    let port = free_ports(2);
    let dir = common::TempDir::new("offload-bps");
    let conf = relay_config(
        &dir,
        port,
        "user=alice:alicepw\nmax-bps=10000\nbps-capacity=15000\nebpf-offload=tc",
    );
    let server = t.relay.start_server(&["-c", conf.to_str().unwrap()]);
    assert!(
        server.log().contains("ebpf-offload=tc: "),
        "{}",
        server.log()
    );
    let server_addr: SocketAddr = format!("10.91.1.1:{port}").parse().unwrap();
    let peer = bind(&t.peer, "10.91.2.2:9000");
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (client, _) = channel_client(&t, server_addr, peer_addr);
    // A shaped allocation stays in user space, which drops what exceeds
    // max-bps: a one-second burst of 10,000 bytes is ten datagrams of
    // 1000, plus what refills while they are sent.
    let frame = channel_data(0x4001, &[7u8; 1000]);
    for _ in 0..100 {
        client.sock.send_to(&frame, server_addr).unwrap();
    }
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while peer.recv_from(&mut buf).is_ok() {
        got += 1;
    }
    assert!((5..=15).contains(&got), "{got} of 100 datagrams relayed");
    // bps-capacity: 15,000 of it is reserved by one allocation of 10,000,
    // so a second is refused.
    let mut second = in_netns(&t.client.name, move || {
        Client::bound("10.91.1.2:0".parse().unwrap(), server_addr)
    });
    assert!(!second.allocate("alice", "alicepw").is_success());
    assert!(
        server.log().contains("bps-capacity exhausted"),
        "{}",
        server.log()
    );
    // Nothing of it went through the kernel.
    std::thread::sleep(Duration::from_millis(1100));
    let body = metrics(&t, port);
    assert_eq!(
        common::metric(&body, "turn_offloaded_packets_total{direction=\"to_peer\"}"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        common::metric(&body, "turn_relayed_packets_total{direction=\"to_peer\"}"),
        Some(got as f64),
        "{body}"
    );
}

#[test]
fn the_xdp_variant_relays_channel_data_both_ways() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads an eBPF program and must run as root"
    );
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = topology("d");
    let expires_ns = expires_in(600);
    let Ends {
        server,
        relay,
        client,
        peer,
        binding,
    } = ends(&t, false, 0x4001, expires_ns);
    let mut offload = in_netns(&t.relay.name, || {
        let mut o = Offload::load().expect("load the fast path");
        o.attach_xdp("r0").expect("native XDP on veth");
        o.attach_xdp("r1").expect("native XDP on veth");
        o
    });
    assert_eq!(xdp_links(), 2);
    offload.install(&binding).unwrap();
    let client_errors = in_netns(&t.client.name, csum_errors);
    let peer_errors = in_netns(&t.peer.name, csum_errors);
    const N: u32 = 100;
    relay_both_ways(&client, &peer, &binding, N, "xdp v4", &mut || {
        fast_path_state(&mut offload, &binding)
    });
    let mut buf = [0u8; 2048];
    assert!(
        silent(&server) && silent(&relay),
        "the sockets saw relayed traffic"
    );
    let (up, down) = offload.counters(&binding).unwrap();
    assert_eq!((up.packets, down.packets), (u64::from(N), u64::from(N)));
    assert_eq!(in_netns(&t.client.name, csum_errors), client_errors);
    assert_eq!(in_netns(&t.peer.name, csum_errors), peer_errors);

    // Another channel and a padded frame reach the sockets as sent.
    let other = channel_data(0x4002, b"unknown channel");
    client.send_to(&other, binding.server).unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &other[..]);
    let mut padded = channel_data(0x4001, b"odd");
    padded.push(0);
    client.send_to(&padded, binding.server).unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &padded[..]);

    // IPv6, both ways.
    let Ends {
        server: server6,
        relay: relay6,
        client: client6,
        peer: peer6,
        binding: b6,
    } = ends(&t, true, 0x4fff, expires_ns);
    offload.install(&b6).unwrap();
    relay_both_ways(&client6, &peer6, &b6, 20, "v6", &mut || {
        fast_path_state(&mut offload, &b6)
    });
    assert!(silent(&server6) && silent(&relay6));
    assert_eq!(offload.counters(&b6).unwrap().0.packets, 20);
    assert_eq!(in_netns(&t.client.name, csum_errors), client_errors);
    assert_eq!(in_netns(&t.peer.name, csum_errors), peer_errors);

    // A removed binding stops at once.
    offload.remove(&binding);
    client
        .send_to(&channel_data(0x4001, b"after"), binding.server)
        .unwrap();
    let (n, _) = server.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &channel_data(0x4001, b"after")[..]);
    assert!(silent(&peer));
    drop(offload);
    assert_eq!(xdp_links(), 0, "dropping the fast path detaches it");
}

#[test]
fn a_takeover_keeps_channels_in_the_kernel_with_tc() {
    takeover_keeps_the_fast_path("tc");
}

#[test]
fn a_takeover_keeps_channels_in_the_kernel_with_xdp() {
    takeover_keeps_the_fast_path("xdp");
}

/// `turnserver --takeover` beside a server relaying a channel in the
/// kernel: the successor installs the binding in its own maps (with XDP:
/// on TC until the old process lets go of the hook, then on XDP), the
/// channel keeps being relayed in the kernel, and the counts continue.
fn takeover_keeps_the_fast_path(mode: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let t = topology(if mode == "xdp" { "y" } else { "k" });
    let port = free_ports(2);
    let dir = common::TempDir::new("offload-takeover");
    let conf = relay_config(
        &dir,
        port,
        &format!(
            "user=alice:alicepw\nebpf-offload={mode}\ncontrol-socket={}",
            dir.path("control.sock").display()
        ),
    );
    let mut old = t.relay.start_server(&["-c", conf.to_str().unwrap()]);
    let server_addr: SocketAddr = format!("10.91.1.1:{port}").parse().unwrap();
    let peer = bind(&t.peer, "10.91.2.2:9000");
    let peer_addr = peer.local_addr().unwrap();
    let (mut client, binding) = channel_client(&t, server_addr, peer_addr);
    relay_both_ways(&client.sock, &peer, &binding, 50, "before", &mut || {
        old.log()
    });

    let new = t
        .relay
        .start_server(&["-c", conf.to_str().unwrap(), "--takeover"]);
    let status = old
        .wait_exit(Duration::from_secs(10))
        .expect("the old process exits after the handover");
    assert!(status.success(), "{status:?}\n{}", old.log());
    if mode == "xdp" {
        assert!(
            new.log()
                .contains("TC on r0, r1 until the process taken over from lets go"),
            "{}",
            new.log()
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !(new.log().contains("XDP on r0 now") && new.log().contains("XDP on r1 now")) {
            assert!(std::time::Instant::now() < deadline, "{}", new.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!((xdp_links(), tcx_links()), (2, 0));
    } else {
        assert_eq!(tcx_links(), 2);
    }
    relay_both_ways(&client.sock, &peer, &binding, 50, "after", &mut || {
        new.log()
    });
    // The old allocation takes requests from the new process, and a
    // refreshed binding stays in the kernel.
    bind_channel(&mut client, peer_addr);
    relay_both_ways(&client.sock, &peer, &binding, 20, "refreshed", &mut || {
        new.log()
    });
    std::thread::sleep(Duration::from_millis(1100));
    let body = metrics(&t, port);
    for name in [
        "turn_offloaded_packets_total{direction=\"to_peer\"}",
        "turn_offloaded_packets_total{direction=\"to_client\"}",
        "turn_relayed_packets_total{direction=\"to_peer\"}",
        "turn_relayed_packets_total{direction=\"to_client\"}",
    ] {
        assert_eq!(common::metric(&body, name), Some(120.0), "{name}\n{body}");
    }
    drop(new);
}
