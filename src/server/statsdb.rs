//! `redis-statsdb`: allocation status and traffic in Redis as coturn 4.6.1
//! writes them, so tools built on coturn's status feed keep working.
//!
//! For allocation `<id>` (18 digits) of `<user>` in `<realm>`, under
//! `turn/realm/<realm>/user/<user>/allocation/<id>`:
//! - `…/status` is set to `new lifetime=600, type=UDP, local=…, remote=…,
//!   ssl=NONE, cipher=NONE` (then `refreshed lifetime=…`), expiring with the
//!   allocation, and the same text is published on that channel; at the end
//!   the key is deleted and `deleted` published;
//! - `…/traffic` and `…/traffic/peer` are published at every refresh, and
//!   `…/total_traffic` and `…/total_traffic/peer` at the end:
//!   `rcvp=…, rcvb=…, sentp=…, sentb=…`, seen from the client side (received
//!   from the client, sent to it) and from the peer side. Bytes are payload
//!   bytes (coturn counts the client side's framing too).
//!
//! Publishing never holds anything up: reports wait in a bounded queue and
//! are dropped (and counted) when Redis is slow or gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::turn::{AllocationStatus, StatusChange, Transport};
use crate::userdb::conn::Endpoint;

/// The publisher's queue, shared by the workers.
pub struct StatsDb {
    queue: mpsc::Sender<Arc<AllocationStatus>>,
    /// Reports dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Reports Redis refused or could not take.
    pub errors: AtomicU64,
}

/// What [`run`] reads.
pub struct Queue(mpsc::Receiver<Arc<AllocationStatus>>);

impl StatsDb {
    pub fn new() -> (Arc<StatsDb>, Queue) {
        let (tx, rx) = mpsc::channel(8192);
        (
            Arc::new(StatsDb {
                queue: tx,
                dropped: AtomicU64::new(0),
                errors: AtomicU64::new(0),
            }),
            Queue(rx),
        )
    }

    /// Queues a status to publish.
    pub fn report(&self, status: Arc<AllocationStatus>) {
        if self.queue.try_send(status).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// coturn's key prefix of an allocation.
pub fn prefix(s: &AllocationStatus) -> String {
    format!(
        "turn/realm/{}/user/{}/allocation/{:018}",
        s.realm,
        s.username,
        s.report_id % 1_000_000_000_000_000_000
    )
}

/// coturn's status text.
pub fn status_text(s: &AllocationStatus) -> String {
    let kind = match s.change {
        StatusChange::New => "new",
        StatusChange::Refreshed => "refreshed",
        StatusChange::Deleted => return "deleted".to_string(),
    };
    let transport = match s.five_tuple.transport {
        Transport::Udp => "UDP",
        Transport::Tcp => "TCP",
        Transport::Tls => "TLS",
        Transport::Dtls => "DTLS",
    };
    let ssl = match s.five_tuple.transport {
        Transport::Tls => "TLS",
        Transport::Dtls => "DTLS",
        _ => "NONE",
    };
    format!(
        "{kind} lifetime={}, type={transport}, local={}, remote={}, ssl={ssl}, cipher=NONE",
        s.lifetime, s.five_tuple.server, s.five_tuple.client
    )
}

/// coturn's traffic texts: the client side and the peer side.
pub fn traffic_texts(s: &AllocationStatus) -> (String, String) {
    let t = &s.traffic;
    (
        format!(
            "rcvp={}, rcvb={}, sentp={}, sentb={}",
            t.to_peer_packets, t.to_peer_bytes, t.to_client_packets, t.to_client_bytes
        ),
        format!(
            "rcvp={}, rcvb={}, sentp={}, sentb={}",
            t.to_client_packets, t.to_client_bytes, t.to_peer_packets, t.to_peer_bytes
        ),
    )
}

/// Publishes the queued reports to the Redis at `endpoint` until the
/// runtime stops.
pub async fn run(stats: Arc<StatsDb>, endpoint: Endpoint, queue: Queue) {
    let mut rx = queue.0;
    let client = match crate::userdb::store::redis_url(&endpoint)
        .and_then(|u| redis::Client::open(u.as_str()).map_err(Into::into))
    {
        Ok(c) => c,
        Err(e) => {
            warn!("redis-statsdb: {e}; no status is published");
            return;
        }
    };
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(endpoint.connect_timeout))
        .set_response_timeout(Some(endpoint.connect_timeout))
        .set_number_of_retries(0);
    let conn = match redis::aio::ConnectionManager::new_lazy_with_config(client, config) {
        Ok(c) => c,
        Err(e) => {
            warn!("redis-statsdb: {e}; no status is published");
            return;
        }
    };
    let mut failing = false;
    while let Some(s) = rx.recv().await {
        let mut c = conn.clone();
        let p = prefix(&s);
        let status = format!("{p}/status");
        let mut pipe = redis::pipe();
        match s.change {
            StatusChange::New | StatusChange::Refreshed => {
                let text = status_text(&s);
                pipe.cmd("SET")
                    .arg(&status)
                    .arg(&text)
                    .arg("EX")
                    .arg(s.lifetime.max(1))
                    .ignore();
                pipe.publish(&status, &text).ignore();
                if s.change == StatusChange::Refreshed {
                    let (client, peer) = traffic_texts(&s);
                    pipe.publish(format!("{p}/traffic"), client).ignore();
                    pipe.publish(format!("{p}/traffic/peer"), peer).ignore();
                }
            }
            StatusChange::Deleted => {
                pipe.del(&status).ignore();
                pipe.publish(&status, "deleted").ignore();
                let (client, peer) = traffic_texts(&s);
                pipe.publish(format!("{p}/total_traffic"), client).ignore();
                pipe.publish(format!("{p}/total_traffic/peer"), peer)
                    .ignore();
            }
        }
        match pipe.query_async::<()>(&mut c).await {
            Ok(()) => {
                if failing {
                    warn!("redis-statsdb: publishing again");
                    failing = false;
                }
            }
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    warn!(
                        "redis-statsdb: cannot publish: {e}; statuses are dropped until it answers"
                    );
                    failing = true;
                } else {
                    debug!("redis-statsdb: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::{AllocationId, FiveTuple, Traffic};

    #[test]
    fn coturns_texts() {
        let mut s = AllocationStatus {
            change: StatusChange::New,
            id: AllocationId::new(1, 1),
            report_id: 1_000_000_000_000_000_001,
            five_tuple: FiveTuple {
                client: "127.0.0.1:60741".parse().unwrap(),
                server: "127.0.0.1:24478".parse().unwrap(),
                transport: Transport::Udp,
            },
            relayed: "127.0.0.1:50000".parse().unwrap(),
            username: "alice".into(),
            realm: "north.gov".into(),
            lifetime: 777,
            traffic: Traffic {
                to_peer_packets: 18,
                to_peer_bytes: 1892,
                to_client_packets: 10,
                to_client_bytes: 1000,
            },
        };
        assert_eq!(
            prefix(&s),
            "turn/realm/north.gov/user/alice/allocation/000000000000000001"
        );
        assert_eq!(
            status_text(&s),
            "new lifetime=777, type=UDP, local=127.0.0.1:24478, remote=127.0.0.1:60741, ssl=NONE, cipher=NONE"
        );
        s.change = StatusChange::Deleted;
        assert_eq!(status_text(&s), "deleted");
        let (client, peer) = traffic_texts(&s);
        assert_eq!(client, "rcvp=18, rcvb=1892, sentp=10, sentb=1000");
        assert_eq!(peer, "rcvp=10, rcvb=1000, sentp=18, sentb=1892");
    }
}
