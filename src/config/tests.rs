//! Config parsing: every file form, the command line, and every error.

use super::*;
use std::net::IpAddr;

fn file(text: &str) -> (Result<Config, ConfigError>, Vec<String>) {
    let mut warnings = Vec::new();
    let entries = parse_file(Path::new("/etc/turnserver.conf"), text, &mut warnings);
    let cfg = Config::from_entries(entries.iter(), &mut warnings);
    (cfg, warnings)
}

fn ok(text: &str) -> Config {
    let (cfg, _) = file(text);
    cfg.unwrap()
}

fn err(text: &str) -> String {
    file(text).0.unwrap_err().to_string()
}

fn cli(args: &[&str]) -> Result<Config, String> {
    let mut argv = vec!["turnserver", "-n"];
    argv.extend_from_slice(args);
    let cl = parse_command_line(argv).map_err(|e| e.to_string())?;
    let mut w = Vec::new();
    Config::from_entries(cl.entries.iter(), &mut w).map_err(|e| e.to_string())
}

#[test]
fn line_forms() {
    assert_eq!(
        split_line("realm=example.org"),
        Some(("realm", Some("example.org")))
    );
    assert_eq!(
        split_line("realm example.org"),
        Some(("realm", Some("example.org")))
    );
    assert_eq!(
        split_line("realm = example.org"),
        Some(("realm", Some("example.org")))
    );
    assert_eq!(
        split_line("realm\t\texample.org\r\n"),
        Some(("realm", Some("example.org")))
    );
    assert_eq!(split_line("  fingerprint  "), Some(("fingerprint", None)));
    assert_eq!(split_line("fingerprint="), Some(("fingerprint", None)));
    assert_eq!(
        split_line("realm=\"my realm\""),
        Some(("realm", Some("my realm")))
    );
    assert_eq!(
        split_line("realm=\"unterminated"),
        Some(("realm", Some("unterminated")))
    );
    assert_eq!(
        split_line("user=alice:pa=ss word"),
        Some(("user", Some("alice:pa=ss word")))
    );
    assert_eq!(split_line("# comment"), None);
    assert_eq!(split_line("   # indented comment"), None);
    assert_eq!(split_line(""), None);
    assert_eq!(split_line("   \r\n"), None);
}

#[test]
fn booleans() {
    for t in ["", "1", "7", "yes", "Y", "true", "T", "on", "ON", "On"] {
        assert_eq!(parse_bool(t), Some(true), "{t}");
    }
    for f in ["0", "no", "N", "false", "f", "off", "OFF"] {
        assert_eq!(parse_bool(f), Some(false), "{f}");
    }
    assert_eq!(parse_bool("maybe"), None);
}

#[test]
fn a_typical_coturn_config() {
    let cfg = ok(r#"
# TURN server name and realm
listening-port=3478
tls-listening-port 5349
listening-ip=127.0.0.1
listening-ip=::1
relay-ip=127.0.0.1
external-ip=203.0.113.7/10.0.0.5
min-port=49160
max-port=49200
fingerprint
lt-cred-mech
realm=example.org
user=alice:secret
user=bob:0xbc807ee29df3c9ffa736523fb2c4e8ee
stale-nonce=60
no-multicast-peers
no-loopback-peers
no-cli
cli-password=qwerty
denied-peer-ip=10.0.0.0-10.255.255.255
denied-peer-ip=192.168.0.0/16
allowed-peer-ip=10.0.0.5
verbose
log-file=stdout
server-name=turn.example.org
relay-threads=4
sock-buf-size=1048576
no-udp-gro
mobility
"#);
    assert_eq!(cfg.listening_port, 3478);
    assert_eq!(cfg.tls_listening_port, 5349);
    assert_eq!(
        cfg.listening_ips,
        vec![
            "127.0.0.1".parse::<IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(cfg.relay_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(
        cfg.external_ips,
        vec![ExternalIp {
            public: "203.0.113.7".parse().unwrap(),
            private: Some("10.0.0.5".parse().unwrap())
        }]
    );
    assert_eq!((cfg.min_port, cfg.max_port), (49160, 49200));
    assert!(cfg.fingerprint && cfg.lt_cred_mech);
    assert!(!cfg.allow_loopback_peers);
    assert_eq!(cfg.realm.as_deref(), Some("example.org"));
    assert_eq!(cfg.users.len(), 2);
    assert_eq!(cfg.users[0].secret, UserSecret::Password("secret".into()));
    assert!(matches!(cfg.users[1].secret, UserSecret::Key(k) if k[0] == 0xbc && k[15] == 0xee));
    assert_eq!(cfg.stale_nonce, 60);
    assert_eq!(cfg.denied_peer_ips.len(), 2);
    assert_eq!(cfg.allowed_peer_ips.len(), 1);
    assert_eq!(cfg.verbose, 1);
    assert_eq!(cfg.log_file, None);
    assert_eq!(cfg.relay_threads, Some(4));
    assert_eq!(cfg.sock_buf_size, Some(1 << 20));
    assert!(!cfg.udp_gro);
    assert_eq!(cfg.auth_kind(), AuthKind::LongTerm);
    let auth = cfg.authenticator("example.org");
    match auth.mechanism {
        Mechanism::LongTerm(users) => {
            let keys = users.get("alice").expect("alice");
            assert_eq!(
                keys.md5,
                crate::auth::long_term_key("alice", "example.org", "secret")
            );
            assert_eq!(
                keys.sha256,
                Some(crate::auth::long_term_key_sha256(
                    "alice",
                    "example.org",
                    "secret"
                ))
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn defaults() {
    let cfg = ok("");
    assert!(cfg.udp_gro);
    assert_eq!(cfg.listening_port, 3478);
    assert_eq!(cfg.tls_listening_port, 5349);
    assert_eq!((cfg.min_port, cfg.max_port), (49152, 65535));
    assert_eq!(cfg.stale_nonce, 600);
    assert_eq!(cfg.max_allocate_lifetime, 3600);
    assert_eq!(cfg.channel_lifetime, 600);
    assert_eq!(cfg.permission_lifetime, 300);
    assert_eq!(cfg.auth_kind(), AuthKind::None);
    assert!(!cfg.fingerprint);
    assert_eq!(cfg.effective_realm("host"), "host");
}

#[test]
fn repeated_scalar_keys_keep_the_last_value() {
    let cfg = ok(
        "realm=a\nrealm=b\nlistening-port=1000\nlistening-port=2000\nfingerprint\nfingerprint=off",
    );
    assert_eq!(cfg.realm.as_deref(), Some("b"));
    assert_eq!(cfg.listening_port, 2000);
    assert!(!cfg.fingerprint);
}

#[test]
fn rest_api_settings() {
    let cfg = ok(
        "static-auth-secret=one\nstatic-auth-secret=two\nrealm=r\nrest-api-separator=-\nuser=a:b",
    );
    assert!(cfg.use_auth_secret, "a secret implies use-auth-secret");
    assert_eq!(cfg.auth_kind(), AuthKind::RestApi);
    assert_eq!(cfg.static_auth_secrets, vec!["one", "two"]);
    assert_eq!(cfg.rest_api_separator, '-');
    let (_, warnings) = file("use-auth-secret\nstatic-auth-secret=x\nuser=a:b");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("static users are ignored")),
        "{warnings:?}"
    );
    let (_, warnings) = file("use-auth-secret");
    assert!(
        warnings.iter().any(|w| w.contains("no static-auth-secret")),
        "{warnings:?}"
    );
}

#[test]
fn users_imply_long_term_credentials() {
    let cfg = ok("user=alice:pw");
    assert!(!cfg.lt_cred_mech);
    assert_eq!(cfg.auth_kind(), AuthKind::LongTerm);
    assert_eq!(ok("user=alice:pw\nno-auth").auth_kind(), AuthKind::None);
    // Passwords may contain colons; the name ends at the first one.
    let cfg = ok("user=alice:a:b:c");
    assert_eq!(cfg.users[0].secret, UserSecret::Password("a:b:c".into()));
    // 0x followed by something that is not 32 hex digits is a password.
    let cfg = ok("user=alice:0x1234");
    assert_eq!(cfg.users[0].secret, UserSecret::Password("0x1234".into()));
}

#[test]
fn optional_values() {
    assert_eq!(ok("stale-nonce").stale_nonce, 600);
    assert_eq!(ok("stale-nonce=0").stale_nonce, 0);
    assert_eq!(ok("stale-nonce 120").stale_nonce, 120);
    assert_eq!(ok("max-allocate-lifetime=60").max_allocate_lifetime, 60);
    assert_eq!(
        ok("channel-lifetime=100\npermission-lifetime=50").channel_lifetime,
        100
    );
}

#[test]
fn unknown_and_unimplemented_keys_warn_with_file_and_line() {
    let (cfg, warnings) =
        file("fingerprint\nno-such-option=1\ndh2066\nweb-admin\nweb-admin\ncipher-list=ALL\n");
    assert!(cfg.is_ok());
    assert!(
        warnings.contains(
            &"/etc/turnserver.conf:2: unknown option 'no-such-option' ignored".to_string()
        ),
        "{warnings:?}"
    );
    assert!(
        warnings.contains(&"/etc/turnserver.conf:3: unknown option 'dh2066' ignored".to_string())
    );
    let prom: Vec<_> = warnings
        .iter()
        .filter(|w| w.contains("'web-admin'"))
        .collect();
    assert_eq!(prom.len(), 1, "one warning per option: {warnings:?}");
    assert!(
        prom[0].starts_with("/etc/turnserver.conf:4:") && prom[0].contains("not implemented yet")
    );
    assert!(warnings.iter().any(|w| w.contains("'cipher-list'")));
    // Accepted options this server already behaves like produce no warning.
    let (_, warnings) =
        file("no-loopback-peers\nno-cli\ncli-password=x\nno-tlsv1\nno-dtls\nprod\n");
    assert!(warnings.is_empty(), "{warnings:?}");
    let (_, warnings) = file("secret-ts-exp-time=100");
    assert!(warnings[0].contains("obsolete"), "{warnings:?}");
}

#[test]
fn suspicious_lines_warn() {
    let (_, warnings) = file("realm=example.org;\n");
    assert!(warnings[0].contains("semicolon"), "{warnings:?}");
    let (_, warnings) = file("realm=example.org # my realm\n");
    assert!(warnings[0].contains("' #'"), "{warnings:?}");
}

#[test]
fn bad_values_name_file_line_and_key() {
    assert_eq!(
        err("\nlistening-port=70000"),
        "/etc/turnserver.conf:2: listening-port: '70000' is not a port number (1-65535)"
    );
    assert_eq!(
        err("min-port=0"),
        "/etc/turnserver.conf:1: min-port: '0' is not a port number (1-65535)"
    );
    assert_eq!(
        err("min-port=60000\nmax-port=50000"),
        "/etc/turnserver.conf:2: max-port: min-port 60000 is greater than max-port 50000"
    );
    assert_eq!(
        err("max-port=40000"),
        "/etc/turnserver.conf:1: max-port: min-port 49152 is greater than max-port 40000"
    );
    assert_eq!(
        err("listening-ip=1.2.3"),
        "/etc/turnserver.conf:1: listening-ip: '1.2.3' is not an IP address"
    );
    assert_eq!(
        err("relay-ip"),
        "/etc/turnserver.conf:1: relay-ip: needs a value"
    );
    assert_eq!(
        err("external-ip=1.2.3.4/::1"),
        "/etc/turnserver.conf:1: external-ip: '1.2.3.4/::1' mixes IPv4 and IPv6"
    );
    assert!(
        err("external-ip=1.2.3.4\nexternal-ip=5.6.7.8")
            .starts_with("/etc/turnserver.conf:2: external-ip:")
    );
    assert_eq!(
        err("fingerprint=maybe"),
        "/etc/turnserver.conf:1: fingerprint: 'maybe' is not a boolean (use on/off, yes/no, true/false, 1/0)"
    );
    assert_eq!(
        err("user=alice"),
        "/etc/turnserver.conf:1: user: expected name:password or name:0x<32 hex digits>"
    );
    assert_eq!(
        err("user=:pw"),
        "/etc/turnserver.conf:1: user: the user name is empty"
    );
    assert!(
        err("denied-peer-ip=10.0.0.0/40")
            .starts_with("/etc/turnserver.conf:1: denied-peer-ip: prefix length 40")
    );
    assert!(err("allowed-peer-ip=10.0.0.9-10.0.0.1").contains("ends before it starts"));
    assert_eq!(
        err("stale-nonce=soon"),
        "/etc/turnserver.conf:1: stale-nonce: 'soon' is not a number of seconds"
    );
    assert_eq!(
        err("relay-threads=lots"),
        "/etc/turnserver.conf:1: relay-threads: 'lots' is not a number"
    );
    assert_eq!(
        err("sock-buf-size=100"),
        "/etc/turnserver.conf:1: sock-buf-size: 100 bytes is outside 4096..1073741824"
    );
    assert_eq!(
        err("sock-buf-size=big"),
        "/etc/turnserver.conf:1: sock-buf-size: 'big' is not a number"
    );
    assert_eq!(
        err("allocation-default-address-family=ipx"),
        "/etc/turnserver.conf:1: allocation-default-address-family: 'ipx' is not ipv4, ipv6 or keep"
    );
    assert_eq!(
        err("lt-cred-mech\nno-auth"),
        "/etc/turnserver.conf:2: no-auth: cannot be combined with lt-cred-mech"
    );
    assert_eq!(
        err("bps-capacity=100000"),
        "/etc/turnserver.conf:1: bps-capacity: needs max-bps, the share each allocation takes"
    );
    assert_eq!(
        err("user-quota=many"),
        "/etc/turnserver.conf:1: user-quota: 'many' is not a number"
    );
    assert_eq!(
        err("no-stun\nstun-only"),
        "/etc/turnserver.conf:2: stun-only: cannot be combined with no-stun: nothing would be served"
    );
    assert_eq!(
        err("listening-port=4000\ntls-listening-port=4000"),
        "/etc/turnserver.conf:2: tls-listening-port: 4000 is also the listening-port"
    );
}

#[test]
fn command_line_long_and_short_options() {
    let cfg = cli(&[
        "-a",
        "-f",
        "-v",
        "-L",
        "127.0.0.1",
        "-L127.0.0.2",
        "-E",
        "127.0.0.1",
        "-X",
        "198.51.100.1",
        "-p",
        "4000",
        "-r",
        "example.org",
        "-u",
        "alice:pw",
        "--user=bob:pw",
        "--min-port",
        "50000",
        "--max-port=50100",
        "--stale-nonce=30",
        "--allow-loopback-peers",
        "--no-tls",
    ])
    .unwrap();
    assert!(cfg.lt_cred_mech && cfg.fingerprint && cfg.allow_loopback_peers && cfg.no_tls);
    assert_eq!(cfg.verbose, 1);
    assert_eq!(cfg.listening_ips.len(), 2);
    assert_eq!(cfg.relay_ips.len(), 1);
    assert_eq!(cfg.external_ips.len(), 1);
    assert_eq!(cfg.listening_port, 4000);
    assert_eq!(cfg.realm.as_deref(), Some("example.org"));
    assert_eq!(cfg.users.len(), 2);
    assert_eq!((cfg.min_port, cfg.max_port), (50000, 50100));
    assert_eq!(cfg.stale_nonce, 30);
    assert_eq!(cli(&["-V"]).unwrap().verbose, 2);
    assert!(cli(&["--fingerprint=0"]).map(|c| !c.fingerprint).unwrap());
    assert!(cli(&["-o"]).unwrap().daemon);
    assert_eq!(cli(&["--stale-nonce"]).unwrap().stale_nonce, 600);
}

#[test]
fn command_line_errors() {
    assert!(
        cli(&["--no-such-option"])
            .unwrap_err()
            .contains("no-such-option")
    );
    assert_eq!(
        cli(&["--listening-port", "70000"]).unwrap_err(),
        "command line: --listening-port: '70000' is not a port number (1-65535)"
    );
    assert!(cli(&["--listening-port"]).is_err(), "missing value");
    // Unimplemented options are still known options on the command line.
    assert!(cli(&["--prometheus", "--user-quota", "12"]).is_ok());
}

#[test]
fn command_line_overrides_the_file() {
    let dir = std::env::temp_dir().join(format!("turnserver-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.conf");
    std::fs::write(
        &path,
        "realm=file\nlistening-port=1111\nlisting-typo=1\nuser=fromfile:x\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let Invocation::Run(loaded) =
        load(["turnserver", "-c", p, "-r", "cli", "-u", "fromcli:y"]).unwrap()
    else {
        panic!("expected run");
    };
    let cfg = &loaded.config;
    assert_eq!(cfg.realm.as_deref(), Some("cli"));
    assert_eq!(cfg.listening_port, 1111);
    assert_eq!(
        cfg.users
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        vec!["fromfile", "fromcli"]
    );
    assert_eq!(cfg.config_file.as_deref(), Some(path.as_path()));
    assert_eq!(cfg.origin("realm"), Origin::CommandLine);
    assert_eq!(
        cfg.origin("listening-port"),
        Origin::File {
            path: path.clone(),
            line: 2
        }
    );
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.ends_with(":3: unknown option 'listing-typo' ignored"))
    );
    // -n ignores the file.
    let Invocation::Run(loaded) = load(["turnserver", "-n", "-c", p]).unwrap() else {
        panic!()
    };
    assert_eq!(loaded.config.listening_port, 3478);
    assert!(loaded.config.config_file.is_none());
    // An explicit -c that does not exist is an error.
    let missing = dir.join("missing.conf");
    match load(["turnserver", "-c", missing.to_str().unwrap()]) {
        Err(LoadError::Config(e)) => assert!(e.to_string().contains("not found"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A bad value in the file names file:line:key.
    std::fs::write(&path, "# comment\nmax-port=99999\n").unwrap();
    match load(["turnserver", "-c", p]) {
        Err(LoadError::Config(e)) => assert_eq!(
            e.to_string(),
            format!("{p}:2: max-port: '99999' is not a port number (1-65535)")
        ),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        load(["turnserver", "--version"]),
        Ok(Invocation::Version)
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn search_path_matches_coturn() {
    let dirs: Vec<String> = search_dirs()
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    assert_eq!(dirs[0], ".");
    assert!(dirs.contains(&"/etc/turnserver".to_string()));
    assert!(dirs.contains(&"/etc/coturn".to_string()));
    assert!(dirs.contains(&"/usr/local/etc".to_string()));
    assert!(dirs.contains(&"../etc/coturn".to_string()));
}

#[test]
fn peer_policy_from_config() {
    let cfg = ok(
        "allow-loopback-peers\nno-multicast-peers\ndenied-peer-ip=8.8.0.0/16\nallowed-peer-ip=10.1.1.1\nmin-port=50000\nmax-port=50010",
    );
    let p = cfg.peer_policy(vec!["192.168.0.5".parse().unwrap()]);
    assert!(p.check("127.0.0.1".parse().unwrap()).is_ok());
    assert!(p.check("224.0.0.1".parse().unwrap()).is_err());
    assert!(p.check("10.2.2.2".parse().unwrap()).is_err());
    assert!(p.check("10.1.1.1".parse().unwrap()).is_ok());
    assert!(p.check("8.8.8.8".parse().unwrap()).is_err());
    assert!(p.check_addr("192.168.0.5:50005".parse().unwrap()).is_ok());
    assert!(p.check_addr("192.168.0.5:22".parse().unwrap()).is_err());
    let p = ok("allow-private-peers").peer_policy(vec![]);
    assert!(p.check("10.2.2.2".parse().unwrap()).is_ok());
}

#[test]
fn every_option_is_a_long_command_line_flag() {
    for spec in OPTIONS {
        let arg = match spec.arg() {
            Arg::Value => vec![format!("--{}", spec.name), "1".to_string()],
            _ => vec![format!("--{}", spec.name)],
        };
        let mut argv = vec!["turnserver".to_string(), "-n".to_string()];
        argv.extend(arg);
        assert!(parse_command_line(argv).is_ok(), "--{}", spec.name);
    }
}

/// The shipped example documents every option of the table (an
/// implemented one as a setting line, the others by name), mentions no
/// option the table lacks, and its lines (commented out) all parse when
/// uncommented, except the mutually exclusive ones that are shown as
/// alternatives.
#[test]
fn example_config_documents_every_option_and_no_unknown_one() {
    let text = include_str!("../../turnserver.conf.example");
    for spec in OPTIONS {
        let mentioned = text
            .lines()
            .any(|l| l.trim_start_matches('#').split(['=', ' ']).next() == Some(spec.name));
        match spec.support {
            Support::Yes(_) => assert!(
                mentioned,
                "turnserver.conf.example does not document {}",
                spec.name
            ),
            _ => assert!(
                text.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
                    .any(|w| w == spec.name),
                "turnserver.conf.example does not mention {}",
                spec.name
            ),
        }
    }
    // A line that looks like a setting ("key=…", "#key=…", "#flag") names
    // an option of the table.
    for line in text.lines() {
        let setting = line.strip_prefix('#').unwrap_or(line);
        if setting.starts_with(|c: char| c.is_ascii_alphabetic())
            && let Some((key, _)) = split_line(setting)
        {
            assert!(
                options::find(key).is_some(),
                "turnserver.conf.example mentions unknown option '{key}': {line}"
            );
        }
    }
    // The file as shipped parses, and its only warning is that nobody can
    // log in yet: it turns lt-cred-mech on with no users (safe to install).
    let (cfg, warnings) = file(text);
    let cfg = cfg.unwrap();
    assert!(cfg.lt_cred_mech);
    assert_eq!(
        warnings,
        ["lt-cred-mech is set but there is no user=: every client will be refused"],
    );
    // Each documented setting is valid on its own.
    for line in text.lines() {
        let Some(setting) = line.strip_prefix('#') else {
            continue;
        };
        let Some((key, _)) = split_line(setting) else {
            continue;
        };
        if options::find(key).is_some() && !setting.starts_with(' ') {
            let (cfg, warnings) = file(setting);
            assert!(cfg.is_ok(), "example line '{setting}': {:?}", cfg.err());
            // Warnings about the combination (lt-cred-mech without users)
            // are expected for a line on its own; unknown or unimplemented
            // keys are not.
            assert!(
                !warnings
                    .iter()
                    .any(|w| w.contains("unknown option") || w.contains("not implemented")),
                "example line '{setting}': {warnings:?}"
            );
        }
    }
}

/// The configurations in config/ parse without warnings.
#[test]
fn shipped_configs_parse_cleanly() {
    for (name, text) in [
        ("demo.conf", include_str!("../../config/demo.conf")),
        ("rest-api.conf", include_str!("../../config/rest-api.conf")),
        ("tls.conf", include_str!("../../config/tls.conf")),
    ] {
        let (cfg, warnings) = file(text);
        assert!(cfg.is_ok(), "{name}: {:?}", cfg.err());
        assert!(warnings.is_empty(), "{name}: {warnings:?}");
    }
}

/// Every default in the table is a valid value of its option, and what
/// `--check-config` prints is read back as the same configuration.
#[test]
fn defaults_are_valid_and_the_rendering_reads_back_the_same() {
    let d = Config::defaults();
    assert_eq!(d.listening_port, 3478);
    assert_eq!(d.prometheus_address, Some("0.0.0.0".parse().unwrap()));
    assert_eq!(d.rest_api_separator, ':');
    assert!(d.udp_steering && d.udp_gro);
    let cfg = ok(
        "listening-ip=127.0.0.1\nexternal-ip=203.0.113.1/10.0.0.1\nuser=a:b\nrelay-threads=3\nallowed-peer-ip=10.0.0.0/8\nalternate-server=192.0.2.1\nverbose\nsock-buf-size=65536\nlog-level=debug\nudp-steering=off\nno-udp-gro\n",
    );
    let rendered = cfg.render();
    // Secrets are masked, so compare everything but the users.
    let again = ok(&rendered.replace("******", "b"));
    assert_eq!(again.render(), rendered, "{rendered}");
    assert!(rendered.contains("relay-threads=3\n"), "{rendered}");
    assert!(ok("").render().contains("# relay-threads: one per CPU\n"));
}

/// What a reload cannot apply follows from the table.
#[test]
fn restart_only_changes_come_from_the_table() {
    let old = ok("relay-threads=2\nrealm=a\nmin-port=50000\n");
    let new = ok("relay-threads=4\nrealm=b\nmin-port=50000\nprometheus\n");
    assert_eq!(
        old.restart_only_changes(&new),
        ["relay-threads", "prometheus"]
    );
    assert!(old.restart_only_changes(&old).is_empty());
    for spec in OPTIONS {
        if spec.reload == options::Reload::Restart {
            assert!(matches!(spec.support, Support::Yes(_)), "{}", spec.name);
        }
    }
}

/// `--help` shows each option's default and whether a restart applies it.
#[test]
fn help_text_comes_from_the_table() {
    let help = command().render_long_help().to_string();
    assert!(
        help.contains("UDP and TCP listener port. Default: 3478. [restart to change]"),
        "{help}"
    );
    assert!(
        help.contains("Worker threads. Default: one per CPU."),
        "{help}"
    );
    assert!(help.contains("[not implemented yet: ignored]"), "{help}");
}

#[test]
fn password_algorithms_auto_list_and_off() {
    use crate::auth::PasswordAlgorithm::{Md5, Sha256};
    let with_users = "lt-cred-mech\nrealm=r\nuser=alice:pw\n";
    let cfg = ok(with_users);
    assert_eq!(cfg.password_algorithms, None);
    assert_eq!(
        cfg.offered_password_algorithms(&cfg.authenticator("r")),
        [Sha256, Md5]
    );
    // A bare MD5 key cannot give a SHA-256 key: auto offers MD5 alone.
    let cfg = ok("lt-cred-mech\nrealm=r\nuser=bob:0x00112233445566778899aabbccddeeff\n");
    assert_eq!(
        cfg.offered_password_algorithms(&cfg.authenticator("r")),
        [Md5]
    );
    let cfg = ok(&format!("{with_users}password-algorithms=md5, sha256\n"));
    assert_eq!(
        cfg.offered_password_algorithms(&cfg.authenticator("r")),
        [Md5, Sha256]
    );
    let cfg = ok(&format!(
        "{with_users}password-algorithms=off\nrequire-sha256\n"
    ));
    assert!(
        cfg.offered_password_algorithms(&cfg.authenticator("r"))
            .is_empty()
    );
    assert!(cfg.require_sha256);
    let e = err("password-algorithms=sha1\n");
    assert!(
        e.contains("password-algorithms") && e.contains("sha1"),
        "{e}"
    );
    let e = err("password-algorithms=md5,md5\n");
    assert!(e.contains("twice"), "{e}");
}
