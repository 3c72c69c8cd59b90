//! Prometheus metrics over HTTP (`prometheus`), and health checks: `/` and
//! `/health` (readiness: 200 while serving, 503 while draining) and `/live`
//! (liveness: 200 while the process serves, with the live allocations).
//!
//! Workers keep plain counters and publish them once a second
//! ([`crate::server::Telemetry`]); the collector sums them at scrape time,
//! so the relay path never touches a shared counter. Label sets are fixed,
//! except the optional per-user gauge, which is capped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeCounterValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use crate::auth::AuthFailure;
use crate::server::{Shared, WorkerReport};
use crate::turn::CloseReason;

/// Most distinct users in `turn_user_allocations`; the rest are summed
/// under `user="_other"`.
pub const MAX_USER_LABELS: usize = 1000;

/// Encodes every metric from the workers' reports.
pub struct TurnCollector {
    pub shared: Arc<Shared>,
    pub draining: Arc<AtomicBool>,
    pub per_user: bool,
}

impl std::fmt::Debug for TurnCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnCollector")
            .field("per_user", &self.per_user)
            .finish_non_exhaustive()
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counters<N: EncodeCounterValue + Copy + Default>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, N)],
) -> std::fmt::Result {
    let c = ConstCounter::new(N::default());
    let mut m = e.encode_descriptor(name, help, None, c.metric_type())?;
    for (l, v) in values {
        ConstCounter::new(*v).encode(m.encode_family(&[(label, *l)])?)?;
    }
    Ok(())
}

fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, i64)],
) -> std::fmt::Result {
    let g = ConstGauge::new(0i64);
    let mut m = e.encode_descriptor(name, help, None, g.metric_type())?;
    for (l, v) in values {
        ConstGauge::new(*v).encode(m.encode_family(&[(label, *l)])?)?;
    }
    Ok(())
}

/// Process statistics from /proc/self.
struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: i64,
    open_fds: i64,
    max_fds: i64,
    threads: i64,
    start_time: i64,
}

fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1);
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let threads: i64 = f.get(17)?.parse().ok()?;
    let start_ticks: f64 = f.get(19)?.parse().ok()?;
    let rss_pages: i64 = f.get(21)?.parse().ok()?;
    let btime: i64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as i64)
        .unwrap_or(0);
    let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft as i64)
        .unwrap_or(0);
    Some(ProcessStats {
        cpu_seconds: (utime + stime) / ticks,
        rss_bytes: rss_pages * page as i64,
        open_fds,
        max_fds,
        threads,
        start_time: btime + (start_ticks / ticks) as i64,
    })
}

impl Collector for TurnCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reports: Vec<WorkerReport> = self
            .shared
            .telemetry
            .workers
            .iter()
            .map(|w| w.lock().expect("telemetry lock").clone())
            .collect();
        let sum = |f: &dyn Fn(&WorkerReport) -> u64| reports.iter().map(f).sum::<u64>();
        let e = &mut e;

        gauges(
            e,
            "turn_allocations",
            "Live allocations by client transport",
            "transport",
            &[
                ("udp", sum(&|r| r.gauges.allocations[0]) as i64),
                ("tcp", sum(&|r| r.gauges.allocations[1]) as i64),
                ("tls", sum(&|r| r.gauges.allocations[2]) as i64),
                ("dtls", sum(&|r| r.gauges.allocations[3]) as i64),
            ],
        )?;
        counter(
            e,
            "turn_allocations_created",
            "Allocations created",
            sum(&|r| r.stats.allocations_created),
        )?;
        let ended: Vec<(&str, u64)> = CloseReason::ALL
            .iter()
            .enumerate()
            .map(|(i, c)| (c.label(), sum(&|r| r.stats.ended[i])))
            .collect();
        counters(
            e,
            "turn_allocations_ended",
            "Allocations ended, by reason",
            "reason",
            &ended,
        )?;
        let auth: Vec<(&str, u64)> = AuthFailure::ALL
            .iter()
            .map(|w| (w.label(), sum(&|r| r.stats.auth_failures[w.index()])))
            .collect();
        counters(
            e,
            "turn_auth_failures",
            "Requests refused with 401 or 438, by reason",
            "reason",
            &auth,
        )?;
        let traffic = |f: &dyn Fn(&crate::turn::Traffic) -> u64| {
            sum(&|r| f(&r.stats.closed_traffic) + f(&r.gauges.live_traffic))
        };
        counters(
            e,
            "turn_relayed_packets",
            "Datagrams relayed, by direction",
            "direction",
            &[
                ("to_peer", traffic(&|t| t.to_peer_packets)),
                ("to_client", traffic(&|t| t.to_client_packets)),
            ],
        )?;
        counters(
            e,
            "turn_relayed_bytes",
            "Payload bytes relayed, by direction",
            "direction",
            &[
                ("to_peer", traffic(&|t| t.to_peer_bytes)),
                ("to_client", traffic(&|t| t.to_client_bytes)),
            ],
        )?;
        let offloaded =
            |i: usize| self.shared.offloaded[i].load(std::sync::atomic::Ordering::Relaxed);
        counters(
            e,
            "turn_offloaded_packets",
            "Datagrams the eBPF fast path relayed (ebpf-offload; included in turn_relayed_packets), by direction",
            "direction",
            &[("to_peer", offloaded(0)), ("to_client", offloaded(2))],
        )?;
        counters(
            e,
            "turn_offloaded_bytes",
            "Payload bytes the eBPF fast path relayed (included in turn_relayed_bytes), by direction",
            "direction",
            &[("to_peer", offloaded(1)), ("to_client", offloaded(3))],
        )?;
        if let Some(o) = &self.shared.offload {
            let passed = o
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .passed()
                .unwrap_or_default();
            let reasons = [
                "no_binding",
                "shape",
                "route",
                "mtu",
                "partial_checksum",
                "expired",
            ];
            let values: Vec<(&str, u64)> = reasons.iter().copied().zip(passed).collect();
            counters(
                e,
                "turn_offload_passed",
                "Datagrams the eBPF fast path left to the sockets, by reason",
                "reason",
                &values,
            )?;
        }
        gauge(
            e,
            "turn_permissions",
            "Live permissions",
            sum(&|r| r.gauges.permissions) as i64,
        )?;
        gauge(
            e,
            "turn_channels",
            "Live channel bindings",
            sum(&|r| r.gauges.channels) as i64,
        )?;
        let in_use = self.shared.pool.in_use() as i64;
        let capacity = self.shared.pool.capacity() as i64;
        gauges(
            e,
            "turn_relay_ports",
            "Relay ports by state",
            "state",
            &[("in_use", in_use), ("free", capacity - in_use)],
        )?;
        counters(
            e,
            "turn_tls_handshakes",
            "TLS handshakes by result",
            "result",
            &[
                ("ok", sum(&|r| r.tls_handshakes)),
                ("failed", sum(&|r| r.tls_failures)),
            ],
        )?;
        counter(
            e,
            "turn_rate_limited_answers",
            "Answers to unauthenticated requests dropped by the rate limit",
            sum(&|r| r.stats.rate_limited),
        )?;
        counters(
            e,
            "turn_refusals",
            "Requests refused or redirected, by reason",
            "reason",
            &[
                ("quota", sum(&|r| r.stats.quota_refusals)),
                ("no_relay_port", sum(&|r| r.stats.no_port_refusals)),
                ("forbidden_peer", sum(&|r| r.stats.forbidden_peers)),
                ("redirected", sum(&|r| r.stats.redirected)),
            ],
        )?;
        // Per worker thread: what says one core is saturated while another
        // idles, which the process total cannot.
        let workers: Vec<String> = (0..reports.len()).map(|i| i.to_string()).collect();
        let cpu: Vec<(&str, f64)> = workers
            .iter()
            .zip(&reports)
            .map(|(w, r)| (w.as_str(), r.cpu_seconds))
            .collect();
        counters(
            e,
            "turn_worker_cpu_seconds",
            "CPU time of each worker thread (user + system), seconds; a worker using close to one second per second is saturated",
            "worker",
            &cpu,
        )?;
        let per_worker: Vec<(&str, i64)> = workers
            .iter()
            .zip(&reports)
            .map(|(w, r)| (w.as_str(), r.gauges.allocations.iter().sum::<u64>() as i64))
            .collect();
        gauges(
            e,
            "turn_worker_allocations",
            "Live allocations on each worker thread (all transports)",
            "worker",
            &per_worker,
        )?;
        gauge(
            e,
            "turn_draining",
            "1 while the server refuses new allocations",
            i64::from(self.draining.load(Ordering::Relaxed)),
        )?;
        if let Some(d) = &self.shared.directory {
            let st = &d.stats;
            gauge(
                e,
                "turn_userdb_up",
                "1 while the user database answers, 0 during an outage",
                i64::from(st.up.load(Ordering::Relaxed)),
            )?;
            counters(
                e,
                "turn_userdb_lookups",
                "Users looked up in the user database, by result",
                "result",
                &[
                    ("found", st.found.load(Ordering::Relaxed)),
                    ("absent", st.absent.load(Ordering::Relaxed)),
                ],
            )?;
            counter(
                e,
                "turn_userdb_errors_total",
                "Queries to the user database that failed or timed out",
                st.errors.load(Ordering::Relaxed),
            )?;
        }
        if let Some(f) = &self.shared.fleet {
            let st = &f.stats;
            gauge(
                e,
                "turn_fleet_up",
                "1 while the fleet's Redis answers (quotas count across the fleet), 0 while quotas are local only",
                i64::from(st.up.load(Ordering::Relaxed)),
            )?;
            counters(
                e,
                "turn_fleet_quota_slots",
                "Quota slots asked of the fleet's Redis, by answer",
                "result",
                &[
                    ("granted", st.granted.load(Ordering::Relaxed)),
                    ("refused", st.refused.load(Ordering::Relaxed)),
                ],
            )?;
            counter(
                e,
                "turn_fleet_errors_total",
                "Requests to the fleet's Redis that failed",
                st.errors.load(Ordering::Relaxed),
            )?;
        }
        if let Some(sdb) = &self.shared.statsdb {
            counter(
                e,
                "turn_statsdb_dropped_total",
                "Allocation statuses not published to redis-statsdb (queue full)",
                sdb.dropped.load(Ordering::Relaxed),
            )?;
            counter(
                e,
                "turn_statsdb_errors_total",
                "Allocation statuses redis-statsdb refused or could not take",
                sdb.errors.load(Ordering::Relaxed),
            )?;
        }
        gauge(
            e,
            "turn_udp_steering",
            "1 while every UDP client datagram goes to worker 0 (light load, udp-steering=auto)",
            i64::from(self.shared.steering.active.load(Ordering::Relaxed)),
        )?;
        if self.per_user {
            let mut users: HashMap<&str, i64> = HashMap::new();
            for r in &reports {
                for (u, n) in &r.gauges.users {
                    *users.entry(u).or_insert(0) += i64::from(*n);
                }
            }
            let mut users: Vec<(&str, i64)> = users.into_iter().collect();
            users.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            let other: i64 = users.iter().skip(MAX_USER_LABELS).map(|(_, n)| n).sum();
            users.truncate(MAX_USER_LABELS);
            if other > 0 {
                users.push(("_other", other));
            }
            gauges(
                e,
                "turn_user_allocations",
                "Live allocations per user",
                "user",
                &users,
            )?;
        }
        if let Some(p) = process_stats() {
            let c = ConstCounter::new(p.cpu_seconds);
            c.encode(e.encode_descriptor(
                "process_cpu_seconds",
                "CPU time used, seconds",
                None,
                c.metric_type(),
            )?)?;
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory, bytes",
                p.rss_bytes,
            )?;
            gauge(e, "process_open_fds", "Open file descriptors", p.open_fds)?;
            gauge(e, "process_max_fds", "File descriptor limit", p.max_fds)?;
            gauge(e, "process_threads", "Threads", p.threads)?;
            gauge(
                e,
                "process_start_time_seconds",
                "Start time, UNIX seconds",
                p.start_time,
            )?;
        }
        Ok(())
    }
}

/// The registry with the TURN collector.
pub fn registry(collector: TurnCollector) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(collector));
    r
}

/// Serves `path` (metrics), `/` and `/health` (readiness: 503 while
/// draining) and `/live` (liveness: 200, with the state and the live
/// allocations) on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Arc<Registry>,
    path: String,
    draining: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("metrics listener: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let path = path.clone();
        let draining = draining.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, content_type, body) =
                    answer(req.uri().path(), &path, &registry, &draining, &shared);
                async move {
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                debug!("metrics connection from {peer}: {e}");
            }
        });
    }
}

fn answer(
    request_path: &str,
    metrics_path: &str,
    registry: &Registry,
    draining: &AtomicBool,
    shared: &Shared,
) -> (StatusCode, &'static str, String) {
    if request_path == metrics_path {
        let mut body = String::new();
        match prometheus_client::encoding::text::encode(&mut body, registry) {
            Ok(()) => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                "encoding failed\n".into(),
            ),
        }
    } else if request_path == "/live" {
        // Liveness: 200 while the process serves, draining or not, with the
        // live allocations (what `turnserver --drain` waits on).
        let allocations = shared.allocations();
        let state = if draining.load(Ordering::Relaxed) {
            "draining"
        } else {
            "serving"
        };
        (
            StatusCode::OK,
            "text/plain",
            format!("{state}\nallocations: {allocations}\n"),
        )
    } else if request_path == "/" || request_path == "/health" {
        if draining.load(Ordering::Relaxed) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".into(),
            )
        } else {
            // Relaying goes on through a user database outage: still 200,
            // with the detail.
            let mut body = "ok\n".to_string();
            if let Some(d) = &shared.directory {
                match d.outage() {
                    Some((since, why)) => {
                        let _ = writeln!(
                            body,
                            "userdb: unreachable for {} s ({why}); known users keep working",
                            since.elapsed().as_secs()
                        );
                    }
                    None => body.push_str("userdb: ok\n"),
                }
            }
            if let Some(f) = &shared.fleet {
                match f.outage() {
                    Some((since, why)) => {
                        let _ = writeln!(
                            body,
                            "fleet: Redis unreachable for {} s ({why}); quotas count this node only",
                            since.elapsed().as_secs()
                        );
                    }
                    None => body.push_str("fleet: ok\n"),
                }
            }
            (StatusCode::OK, "text/plain", body)
        }
    } else {
        let mut body = String::new();
        let _ = writeln!(body, "not found; metrics are at {metrics_path}");
        (StatusCode::NOT_FOUND, "text/plain", body)
    }
}
