//! turnbench: a TURN load generator (RFC 8656) for sizing a deployment and
//! comparing servers.
//!
//! `turnbench run SERVER` sets up N allocations over UDP, TCP or TLS,
//! relays stamped packets through them (to an echo peer, or between pairs
//! of allocations), and reports delivered packets per second, loss,
//! round-trip latency percentiles and the allocation rate, as text or JSON.
//! It speaks plain RFC 8656, so it measures coturn as well as turnserver.
//! `turnbench echo` is the echo peer; `turnbench forward` is a bare UDP
//! forwarder that shows what one relay hop costs the kernel alone.

mod client;
mod engine;
mod peer;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Parser, Subcommand};
use turnserver::bench::{Latency, Report};

use client::{Credentials, Tls, Transport};
use engine::{MIN_PAYLOAD, Plan};

#[derive(Parser)]
#[command(name = "turnbench", version, about = "TURN load generator (RFC 8656)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Set up allocations on SERVER, relay traffic through them, report.
    Run(Box<RunArgs>),
    /// Echo peer: send every UDP datagram back to its sender.
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Threads sharing the socket.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Kernel floor: a bare UDP forwarder, one socket per client towards TO.
    Forward {
        /// Address clients send to.
        #[arg(long)]
        listen: String,
        /// Where each client's datagrams go (an echo peer).
        #[arg(long)]
        to: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The TURN server, host:port (3478 when no port is given).
    server: String,
    /// How clients reach the server.
    #[arg(short, long, value_enum, default_value_t = Transport::Udp)]
    transport: Transport,
    /// Allocations (flows). In pairs mode (no --peer) half of them send and
    /// their partners send every packet back.
    #[arg(short = 'n', long, default_value_t = 10)]
    allocations: usize,
    /// Echo peer (e.g. `turnbench echo`); without it, allocations are paired
    /// and relay to each other through the server (client to client).
    #[arg(long)]
    peer: Option<String>,
    /// Send indications and receive Data indications instead of ChannelData.
    #[arg(long)]
    indications: bool,
    /// Plain UDP to SERVER, no TURN (for `turnbench forward` or an echo
    /// peer): the baseline.
    #[arg(long)]
    raw: bool,
    /// Payload bytes per packet (at least 24).
    #[arg(short, long, default_value_t = 170)]
    size: usize,
    /// Packets per second sent by all senders together; 0 keeps --window
    /// packets in flight per sender instead (saturating).
    #[arg(short, long, default_value_t = 10000.0)]
    rate: f64,
    /// Packets in flight per sender with --rate 0.
    #[arg(long, default_value_t = 8)]
    window: u32,
    /// Pacing step with --rate, microseconds: the packets due are sent
    /// together once per step. 1000 sends 1 ms bursts; smaller steps spread
    /// the packets out, closer to many independent clients.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(20..=1_000_000))]
    step: u64,
    /// Seconds of traffic; 0 only sets up and tears down.
    #[arg(short, long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to keep the allocations idle after setup, before traffic.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Username for long-term credentials (with --password), or the user
    /// part of TURN REST API usernames (with --secret).
    #[arg(short, long)]
    user: Option<String>,
    /// Password for --user.
    #[arg(short = 'w', long)]
    password: Option<String>,
    /// TURN REST API shared secret (static-auth-secret): usernames are
    /// "<expiry>:<user>" valid for a day, passwords their HMAC.
    #[arg(long)]
    secret: Option<String>,
    /// REST API username separator (rest-api-separator).
    #[arg(long, default_value_t = ':')]
    separator: char,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Allocations being set up at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// LIFETIME requested in Allocate, seconds.
    #[arg(long, default_value_t = 600)]
    lifetime: u32,
    /// TLS: trust this CA or self-signed certificate (PEM).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// TLS: accept any certificate (for test servers).
    #[arg(long)]
    insecure: bool,
    /// TLS: the name to verify (default: SERVER's host).
    #[arg(long)]
    tls_name: Option<String>,
    /// Local IP address of the client sockets (default: the unspecified
    /// address of SERVER's family, the kernel picks). Binding another
    /// loopback address, e.g. 127.0.0.2, keeps thousands of client ports
    /// out of the way of a server's relay ports on 127.0.0.1.
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Progress on stderr.
    #[arg(short, long)]
    verbose: bool,
}

/// Resolves "host:port", "host", "ip" or "[v6]:port".
fn resolve(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let target = match s.rsplit_once(':') {
        Some((_, p)) if p.parse::<u16>().is_ok() => s.to_string(),
        _ => format!("{s}:{default_port}"),
    };
    target
        .to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn tls_settings(args: &RunArgs, server: &str) -> Result<Tls, String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if let Some(ca) = &args.ca {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)
            .map_err(|e| format!("{}: {e}", ca.display()))?
        {
            roots
                .add(c.map_err(|e| format!("{}: {e}", ca.display()))?)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else if args.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        return Err("TLS needs --ca FILE (the server's CA or certificate) or --insecure".into());
    };
    let host = args.tls_name.clone().unwrap_or_else(|| {
        let h = server.rsplit_once(':').map_or(server, |(h, _)| h);
        h.trim_matches(['[', ']']).to_string()
    });
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| format!("TLS name {host}: {e}"))?;
    Ok(Tls {
        config: Arc::new(config),
        name,
    })
}

/// Certificate verifier for --insecure: signatures are checked, the chain
/// and the name are not.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn credentials(args: &RunArgs) -> Result<Option<Credentials>, String> {
    match (&args.secret, &args.user, &args.password) {
        (Some(secret), user, None) => {
            let expiry = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_err(|e| e.to_string())?
                .as_secs()
                + 86_400;
            let username = match user {
                Some(u) => format!("{expiry}{}{u}", args.separator),
                None => expiry.to_string(),
            };
            let password = turnserver::auth::rest_password(secret.as_bytes(), &username);
            Ok(Some(Credentials { username, password }))
        }
        (Some(_), _, Some(_)) => Err("--secret mints passwords: drop --password".into()),
        (None, Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        (None, Some(_), None) => Err("--user needs --password (or --secret)".into()),
        (None, None, Some(_)) => Err("--password needs --user".into()),
        (None, None, None) => Ok(None),
    }
}

/// Lets this process open one socket per allocation.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    if args.size < MIN_PAYLOAD || args.size > 65_000 {
        return Err(format!("--size must be {MIN_PAYLOAD}..65000 bytes"));
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        return Err("--rate must be 0 or more".into());
    }
    if args.allocations == 0 {
        return Err("--allocations must be at least 1".into());
    }
    if args.peer.is_none() && !args.raw && args.allocations % 2 == 1 {
        return Err("pairs mode (no --peer) needs an even number of allocations".into());
    }
    if args.raw && args.transport != Transport::Udp {
        return Err("--raw is plain UDP".into());
    }
    let server = resolve(
        &args.server,
        if args.transport == Transport::Tls {
            5349
        } else {
            3478
        },
    )?;
    let peer = match &args.peer {
        Some(p) => Some(resolve(p, 3478)?),
        None => None,
    };
    let tls = if args.transport == Transport::Tls {
        Some(tls_settings(&args, &args.server)?)
    } else {
        None
    };
    raise_fd_limit();
    let threads = args.threads.max(1);
    let bind = args.bind.unwrap_or(if server.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    });
    if bind.is_ipv4() != server.is_ipv4() {
        return Err("--bind must be of SERVER's address family".into());
    }
    let plan = Arc::new(Plan {
        server,
        bind,
        transport: args.transport,
        tls,
        creds: credentials(&args)?,
        allocations: args.allocations,
        peer: if args.raw { Some(server) } else { peer },
        raw: args.raw,
        indications: args.indications,
        size: args.size,
        rate: args.rate,
        window: args.window.max(1),
        step: Duration::from_micros(args.step),
        duration: Duration::from_secs_f64(args.duration.max(0.0)),
        hold: Duration::from_secs_f64(args.hold.max(0.0)),
        threads,
        concurrency: args.concurrency.max(1),
        lifetime: args.lifetime,
        verbose: args.verbose,
    });
    let barrier = Arc::new(tokio::sync::Barrier::new(threads));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let plan = plan.clone();
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .name(format!("turnbench-{t}"))
                .spawn(move || engine::run_thread(plan, t, barrier))
                .map_err(|e| format!("thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().map_err(|_| "a load thread panicked".to_string())?);
    }

    let mut rtt = results[0].rtt_ns.clone();
    let mut setup_errors = BTreeMap::new();
    let (mut ok, mut sent, mut received, mut drops, mut deleted) = (0, 0, 0, 0, 0);
    let mut reflected = 0;
    let mut setup_end = start;
    for r in &results[..] {
        ok += r.setup_ok;
        sent += r.sent;
        received += r.received;
        drops += r.local_drops;
        reflected += r.reflected;
        deleted += r.deleted;
        for (e, n) in &r.setup_errors {
            *setup_errors.entry(e.clone()).or_insert(0) += n;
        }
        if let Some(t) = r.setup_end {
            setup_end = setup_end.max(t);
        }
    }
    for r in &results[1..] {
        rtt.add(&r.rtt_ns).map_err(|e| e.to_string())?;
    }
    let setup_seconds = setup_end.duration_since(start).as_secs_f64();
    let duration = plan.duration.as_secs_f64();
    let lost = sent.saturating_sub(received);
    let round_trips = if duration > 0.0 {
        received as f64 / duration
    } else {
        0.0
    };
    let us = |ns: u64| ns as f64 / 1000.0;
    let report = Report {
        server: server.to_string(),
        transport: args.transport.name().to_string(),
        mode: if args.raw {
            "raw"
        } else if peer.is_some() {
            "echo"
        } else {
            "pairs"
        }
        .to_string(),
        send: if args.indications {
            "indication"
        } else {
            "channel"
        }
        .to_string(),
        payload_bytes: args.size,
        allocations_requested: args.allocations,
        allocations_ok: ok,
        setup_seconds,
        allocation_rate: if setup_seconds > 0.0 && !args.raw {
            ok as f64 / setup_seconds
        } else {
            0.0
        },
        setup_retransmissions: client::RETRANSMISSIONS.load(std::sync::atomic::Ordering::Relaxed),
        setup_errors,
        offered_rate: (args.rate > 0.0).then_some(args.rate),
        step_us: (args.rate > 0.0).then_some(args.step),
        duration_seconds: duration,
        sent,
        received,
        lost,
        loss_percent: if sent > 0 {
            lost as f64 * 100.0 / sent as f64
        } else {
            0.0
        },
        local_drops: drops,
        reflected,
        round_trips_per_second: round_trips,
        relayed_per_round_trip: plan.hops_per_round_trip(),
        relayed_packets_per_second: round_trips * plan.hops_per_round_trip() as f64,
        rtt_us: (!rtt.is_empty()).then(|| Latency {
            p50: us(rtt.value_at_quantile(0.5)),
            p90: us(rtt.value_at_quantile(0.9)),
            p99: us(rtt.value_at_quantile(0.99)),
            p999: us(rtt.value_at_quantile(0.999)),
            max: us(rtt.max()),
            mean: rtt.mean() / 1000.0,
        }),
        allocations_deleted: deleted,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_text(&report);
    }
    if report.allocations_ok == 0 {
        return Err("no allocation could be set up".into());
    }
    Ok(())
}

fn print_text(r: &Report) {
    let transport = &r.transport;
    println!(
        "turnbench: {} {} flows over {transport} to {}, {} payload {} B",
        r.allocations_requested, r.mode, r.server, r.send, r.payload_bytes
    );
    if r.mode != "raw" {
        println!(
            "allocations: {}/{} ready in {:.3} s = {:.0}/s (401, Allocate, {}), {} requests retransmitted",
            r.allocations_ok,
            r.allocations_requested,
            r.setup_seconds,
            r.allocation_rate,
            if r.send == "channel" {
                "ChannelBind"
            } else {
                "CreatePermission"
            },
            r.setup_retransmissions
        );
    }
    for (e, n) in &r.setup_errors {
        println!("  setup error x{n}: {e}");
    }
    if r.duration_seconds > 0.0 {
        match r.offered_rate {
            Some(rate) => println!(
                "offered: {rate:.0} packets/s for {} s, sent every {} µs",
                r.duration_seconds,
                r.step_us.unwrap_or_default()
            ),
            None => println!(
                "offered: windowed (saturating) for {} s",
                r.duration_seconds
            ),
        }
        println!(
            "sent {}, received {}, lost {} ({:.3} %), not sent locally {}",
            r.sent, r.received, r.lost, r.loss_percent, r.local_drops
        );
        println!(
            "delivered: {:.0} round trips/s = {:.0} relayed packets/s ({} per round trip)",
            r.round_trips_per_second, r.relayed_packets_per_second, r.relayed_per_round_trip
        );
        if let Some(l) = &r.rtt_us {
            println!(
                "rtt us: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  mean {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max, l.mean
            );
        }
    }
    if r.mode != "raw" {
        println!(
            "deleted: {}/{} allocations",
            r.allocations_deleted, r.allocations_ok
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Echo { listen, threads } => {
            resolve(&listen, 0).and_then(|a| peer::echo(a, threads).map_err(|e| e.to_string()))
        }
        Command::Forward { listen, to } => resolve(&listen, 0).and_then(|l| {
            let to = resolve(&to, 0)?;
            peer::forward(l, to).map_err(|e| e.to_string())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnbench: {e}");
            ExitCode::FAILURE
        }
    }
}
