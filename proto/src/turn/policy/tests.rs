//! Peer policy: every special-purpose range, every IPv6 spelling of them,
//! and the options that open them.

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn ranges_parse() {
    let r: IpRange = "10.0.0.0/8".parse().unwrap();
    assert!(r.contains(ip("10.255.0.1")));
    assert!(!r.contains(ip("11.0.0.0")));
    let r: IpRange = "192.0.2.10-192.0.2.20".parse().unwrap();
    assert!(r.contains(ip("192.0.2.10")) && r.contains(ip("192.0.2.20")));
    assert!(!r.contains(ip("192.0.2.21")));
    let r: IpRange = "fc00::/7".parse().unwrap();
    assert!(r.contains(ip("fd12::1")));
    assert!(!r.contains(ip("fe80::1")));
    let r: IpRange = "::ffff:0.0.0.0-::ffff:255.255.255.255".parse().unwrap();
    assert!(r.contains(ip("::ffff:8.8.8.8")));
    let r: IpRange = "0.0.0.0/0".parse().unwrap();
    assert!(r.contains(ip("8.8.8.8")));
    assert!("1.2.3.4/33".parse::<IpRange>().is_err());
    assert!("1.2.3.9-1.2.3.4".parse::<IpRange>().is_err());
    assert!("1.2.3.4-::1".parse::<IpRange>().is_err());
    assert!("nonsense".parse::<IpRange>().is_err());
    assert!("10.0.0.0/x".parse::<IpRange>().is_err());
}

/// Every address that must never be a peer by default, with its kind.
pub const FORBIDDEN: &[(&str, Kind)] = &[
    ("0.0.0.0", Kind::Unspecified),
    ("0.1.2.3", Kind::Unspecified),
    ("::", Kind::Unspecified),
    ("127.0.0.1", Kind::Loopback),
    ("127.255.255.254", Kind::Loopback),
    ("::1", Kind::Loopback),
    ("10.0.0.1", Kind::Private),
    ("172.16.0.1", Kind::Private),
    ("172.31.255.254", Kind::Private),
    ("192.168.1.1", Kind::Private),
    ("100.64.0.1", Kind::Private),
    ("100.127.255.254", Kind::Private),
    ("169.254.169.254", Kind::LinkLocal),
    ("169.254.0.1", Kind::LinkLocal),
    ("224.0.0.1", Kind::Multicast),
    ("239.255.255.250", Kind::Multicast),
    ("255.255.255.255", Kind::Multicast),
    ("192.0.0.8", Kind::Reserved),
    ("192.0.2.1", Kind::Reserved),
    ("192.88.99.1", Kind::Reserved),
    ("198.18.0.1", Kind::Reserved),
    ("198.19.255.1", Kind::Reserved),
    ("198.51.100.1", Kind::Reserved),
    ("203.0.113.1", Kind::Reserved),
    ("240.0.0.1", Kind::Reserved),
    ("fc00::1", Kind::Private),
    ("fd12:3456::1", Kind::Private),
    ("fec0::1", Kind::Private),
    ("fe80::1", Kind::LinkLocal),
    ("ff02::1", Kind::Multicast),
    ("2001:db8::1", Kind::Reserved),
    ("3fff::1", Kind::Reserved),
    ("2001:2::1", Kind::Reserved),
    ("100::1", Kind::Reserved),
    ("64:ff9b:1::1", Kind::Reserved),
    // IPv4 embedded in IPv6: mapped, compatible, NAT64, 6to4, Teredo.
    ("::ffff:127.0.0.1", Kind::Loopback),
    ("::ffff:7f00:1", Kind::Loopback),
    ("::127.0.0.1", Kind::Loopback),
    ("::ffff:0.0.0.0", Kind::Unspecified),
    ("::0.0.0.2", Kind::Unspecified),
    ("::ffff:10.0.0.1", Kind::Private),
    ("::ffff:169.254.169.254", Kind::LinkLocal),
    ("::ffff:224.0.0.1", Kind::Multicast),
    ("64:ff9b::127.0.0.1", Kind::Loopback),
    ("64:ff9b::10.1.2.3", Kind::Private),
    ("64:ff9b::169.254.169.254", Kind::LinkLocal),
    ("2002:7f00:1::1", Kind::Loopback),
    ("2002:a9fe:a9fe::", Kind::LinkLocal),
    ("2002:c0a8:101::1", Kind::Private),
    // Teredo with the client 127.0.0.1 (stored inverted: 80ff:fffe).
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", Kind::Loopback),
    // Teredo with the server 10.0.0.1.
    ("2001:0:a00:1::1", Kind::Private),
];

#[test]
fn every_non_global_form_is_classified_and_refused_by_default() {
    let p = PeerPolicy::default();
    for (a, k) in FORBIDDEN {
        assert_eq!(kind(ip(a)), *k, "{a}");
        assert_eq!(p.check(ip(a)), Err(Denied::Kind(*k)), "{a}");
        assert!(p.check_addr(SocketAddr::new(ip(a), 5000)).is_err(), "{a}");
    }
}

#[test]
fn global_addresses_are_peers() {
    let p = PeerPolicy::default();
    for a in [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "::ffff:8.8.8.8",
        "64:ff9b::8.8.8.8",
        "2002:808:808::1",
    ] {
        assert_eq!(kind(ip(a)), Kind::Global, "{a}");
        assert_eq!(p.check(ip(a)), Ok(()), "{a}");
        assert_eq!(p.check_addr(SocketAddr::new(ip(a), 5000)), Ok(()), "{a}");
    }
}

#[test]
fn options_open_exactly_what_they_name() {
    let loopback = PeerPolicy {
        allow_loopback: true,
        ..PeerPolicy::default()
    };
    for a in ["127.0.0.1", "::1", "::ffff:127.0.0.1", "64:ff9b::127.0.0.1"] {
        assert_eq!(loopback.check(ip(a)), Ok(()), "{a}");
    }
    assert!(loopback.check(ip("0.0.0.0")).is_err());
    assert!(loopback.check(ip("10.0.0.1")).is_err());

    let private = PeerPolicy {
        allow_private: true,
        ..PeerPolicy::default()
    };
    for a in [
        "10.0.0.1",
        "172.16.5.5",
        "192.168.1.1",
        "100.64.1.1",
        "fd00::1",
        "::ffff:192.168.1.1",
    ] {
        assert_eq!(private.check(ip(a)), Ok(()), "{a}");
    }
    for a in [
        "127.0.0.1",
        "169.254.169.254",
        "224.0.0.1",
        "0.0.0.0",
        "198.18.0.1",
    ] {
        assert!(private.check(ip(a)).is_err(), "{a} stays closed");
    }

    let lists = PeerPolicy {
        allowed: vec![
            "169.254.169.254".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
        ],
        denied: vec![
            "8.8.0.0/16".parse().unwrap(),
            "10.1.2.0/24".parse().unwrap(),
        ],
        ..PeerPolicy::default()
    };
    assert_eq!(
        lists.check(ip("169.254.169.254")),
        Ok(()),
        "allowed-peer-ip opens exactly it"
    );
    assert!(lists.check(ip("169.254.169.253")).is_err());
    assert_eq!(
        lists.check(ip("10.1.2.3")),
        Ok(()),
        "allowed wins over denied"
    );
    assert_eq!(lists.check(ip("::ffff:10.1.9.9")), Ok(()));
    assert_eq!(lists.check(ip("8.8.4.4")), Err(Denied::DeniedList));
    assert_eq!(lists.check(ip("::ffff:8.8.4.4")), Err(Denied::DeniedList));
    assert_eq!(lists.check(ip("8.9.0.1")), Ok(()));
}

#[test]
fn own_relay_addresses_only_on_relay_ports() {
    let p = PeerPolicy {
        own_relay_ips: vec![ip("10.0.0.5"), ip("127.0.0.1")],
        relay_ports: (49152, 65535),
        ..PeerPolicy::default()
    };
    // Another client's relayed address on this server: fine.
    assert_eq!(p.check(ip("10.0.0.5")), Ok(()));
    assert_eq!(p.check_addr(sa("10.0.0.5:50000")), Ok(()));
    assert_eq!(p.check_addr(sa("[::ffff:10.0.0.5]:50000")), Ok(()));
    assert_eq!(p.check_addr(sa("127.0.0.1:65535")), Ok(()));
    // Any other service on the server: refused.
    assert_eq!(p.check_addr(sa("10.0.0.5:22")), Err(Denied::OwnAddress));
    assert_eq!(p.check_addr(sa("127.0.0.1:3478")), Err(Denied::OwnAddress));
    assert_eq!(
        p.check_addr(sa("[::ffff:127.0.0.1]:6379")),
        Err(Denied::OwnAddress)
    );
    // Other private addresses stay closed.
    assert!(p.check(ip("10.0.0.6")).is_err());
    // With the range open, the own address is open on every port.
    let open = PeerPolicy {
        allow_private: true,
        ..p.clone()
    };
    assert_eq!(open.check_addr(sa("10.0.0.5:22")), Ok(()));
}

#[test]
fn description_names_what_is_open() {
    let p = PeerPolicy {
        allow_loopback: true,
        denied: vec!["8.8.8.8".parse().unwrap()],
        own_relay_ips: vec![ip("10.0.0.5")],
        relay_ports: (50000, 50100),
        ..PeerPolicy::default()
    };
    let d = p.describe();
    assert!(d.contains("loopback ALLOWED"), "{d}");
    assert!(d.contains("private ranges denied"), "{d}");
    assert!(d.contains("ports 50000-50100"), "{d}");
    assert!(d.contains("denied-peer-ip: 8.8.8.8"), "{d}");
}
