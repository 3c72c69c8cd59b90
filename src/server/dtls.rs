//! TURN over DTLS (coturn's `turns:` over UDP): a UDP listener on each TLS
//! port whose clients speak DTLS 1.2 (or 1.3), through `dimpl`, a sans-IO
//! DTLS engine. Every datagram from a client goes through its session;
//! the TURN messages inside go to the core as from a [`Transport::Dtls`]
//! client, and what the core answers or relays to the client is encrypted
//! by the same session. Sessions are per client address; the engine's
//! stateless cookie keeps a spoofed ClientHello from costing more than one
//! answer. A session ends on close_notify, on a fatal error, after
//! [`HANDSHAKE`] without completing its handshake, or after [`IDLE`]
//! without traffic while its client has no allocation; its allocation
//! ends with it.
//!
//! `dimpl` signs with ECDSA only (P-256, P-384): with an RSA key, DTLS is
//! not offered and the start-up log says so.
//!
//! [`Transport::Dtls`]: crate::turn::Transport::Dtls

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dimpl::{Dtls, DtlsCertificate, Output};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::debug;

/// A session without traffic for this long, whose client has no
/// allocation, is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// A handshake not finished within this long is dropped, so that
/// datagrams from spoofed or silent sources do not hold session slots.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// Sessions one listener of one worker keeps at most; a ClientHello beyond
/// it is ignored.
pub const MAX_SESSIONS: usize = 20_000;

/// Loads the certificate (first of the chain) and key for DTLS from the
/// TLS files. `Ok(None)` when the key is not ECDSA, which `dimpl` cannot
/// sign with. Errors name the file.
pub fn load(cert: &Path, key: &Path) -> Result<Option<DtlsCertificate>, String> {
    let first = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("{} contains no PEM certificate", cert.display()))?
        .map_err(|e| format!("cannot parse certificate {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read private key {}: {e}", key.display()))?;
    if rustls::crypto::ring::sign::any_ecdsa_type(&key).is_err() {
        return Ok(None);
    }
    Ok(Some(DtlsCertificate {
        certificate: first.to_vec(),
        private_key: key.secret_der().to_vec(),
    }))
}

/// The DTLS settings of every session: no client certificate (TURN
/// clients authenticate with their credentials).
pub fn config() -> Arc<dimpl::Config> {
    Arc::new(
        dimpl::Config::builder()
            .require_client_certificate(false)
            .build()
            .expect("a valid DTLS configuration"),
    )
}

/// A plaintext fatal alert for a handshake that `datagram` failed:
/// protocol_version (70) for a DTLS 1.0 record, handshake_failure (40)
/// otherwise (RFC 6347 §4.1, RFC 5246 §7.2).
fn fatal_alert(datagram: &[u8]) -> [u8; 15] {
    let dtls10 = datagram.get(1..3) == Some(&[0xfe, 0xff][..]);
    let (version, description) = if dtls10 {
        ([0xfe, 0xff], 70)
    } else {
        ([0xfe, 0xfd], 40)
    };
    [
        21,
        version[0],
        version[1],
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        2,
        description,
    ]
}

struct Session {
    dtls: Dtls,
    last: Instant,
    /// When the session started; `None` once the handshake completed.
    handshaking_since: Option<Instant>,
}

/// One DTLS listener of a worker: its socket and its clients' sessions.
pub struct Listener {
    pub socket: tokio::net::UdpSocket,
    pub addr: SocketAddr,
    sessions: RefCell<HashMap<SocketAddr, Session>>,
}

/// What a datagram from a client gave.
#[derive(Default)]
pub struct Received {
    /// TURN messages (STUN or ChannelData) the client sent.
    pub messages: Vec<Vec<u8>>,
    /// The session ended (close_notify or an error).
    pub ended: bool,
}

impl Listener {
    pub fn new(socket: tokio::net::UdpSocket, addr: SocketAddr) -> Self {
        Listener {
            socket,
            addr,
            sessions: RefCell::new(HashMap::new()),
        }
    }

    /// Feeds a datagram from `from` to its session (a new one when it has
    /// none and `cert` is set), sends what the engine answers, and returns
    /// the TURN messages it decrypted.
    pub fn receive(
        &self,
        from: SocketAddr,
        datagram: &[u8],
        now: Instant,
        cert: Option<&DtlsCertificate>,
        config: &Arc<dimpl::Config>,
    ) -> Received {
        let mut sessions = self.sessions.borrow_mut();
        if !sessions.contains_key(&from) {
            let Some(cert) = cert else {
                return Received::default();
            };
            if sessions.len() >= MAX_SESSIONS {
                return Received::default();
            }
            let dtls = Dtls::new_auto(config.clone(), cert.clone(), now);
            sessions.insert(
                from,
                Session {
                    dtls,
                    last: now,
                    handshaking_since: Some(now),
                },
            );
        }
        let session = sessions.get_mut(&from).expect("just inserted");
        session.last = now;
        let mut got = Received::default();
        let fed = session
            .dtls
            .handle_timeout(now)
            .and_then(|()| session.dtls.handle_packet(datagram));
        if let Err(e) = fed {
            debug!("DTLS {from} -> {}: {e}", self.addr);
            if session.handshaking_since.is_some() {
                // Say so, so that the client gives up at once (coturn's
                // client then tries again with another version) rather
                // than retransmitting for a minute.
                let _ = self.socket.try_send_to(&fatal_alert(datagram), from);
            }
            sessions.remove(&from);
            got.ended = true;
            return got;
        }
        got.ended = self.drain(session, from, &mut got.messages);
        if got.ended {
            sessions.remove(&from);
        }
        got
    }

    /// Encrypts `message` for client `to` and sends it; false when the
    /// client has no session.
    pub fn send(&self, to: SocketAddr, message: &[u8]) -> bool {
        let mut sessions = self.sessions.borrow_mut();
        let Some(session) = sessions.get_mut(&to) else {
            return false;
        };
        if session.dtls.send_application_data(message).is_err() {
            sessions.remove(&to);
            return false;
        }
        let mut ignored = Vec::new();
        if self.drain(session, to, &mut ignored) {
            sessions.remove(&to);
        }
        true
    }

    /// Runs the sessions' timers (handshake retransmissions) and closes
    /// those idle for [`IDLE`] whose client has no allocation
    /// (`has_allocation`); returns the clients whose sessions ended.
    pub fn tick(
        &self,
        now: Instant,
        has_allocation: impl Fn(SocketAddr) -> bool,
    ) -> Vec<SocketAddr> {
        let mut ended = Vec::new();
        let mut sessions = self.sessions.borrow_mut();
        sessions.retain(|&client, s| {
            let idle = now.saturating_duration_since(s.last) >= IDLE;
            let stuck = s
                .handshaking_since
                .is_some_and(|t| now.saturating_duration_since(t) >= HANDSHAKE);
            let keep = !stuck
                && (!idle || has_allocation(client))
                && s.dtls.handle_timeout(now).is_ok()
                && !self.drain(s, client, &mut Vec::new());
            if !keep {
                ended.push(client);
            }
            keep
        });
        ended
    }

    /// Sends every record the session has ready, collects decrypted data
    /// into `messages`; true when the peer closed the session.
    fn drain(&self, s: &mut Session, to: SocketAddr, messages: &mut Vec<Vec<u8>>) -> bool {
        let mut buf = vec![0u8; 2048];
        loop {
            match s.dtls.poll_output(&mut buf) {
                Output::Packet(p) => {
                    let _ = self.socket.try_send_to(p, to);
                }
                Output::BufferTooSmall { needed } => buf.resize(needed, 0),
                Output::ApplicationData(d) => messages.push(d.to_vec()),
                Output::Connected => s.handshaking_since = None,
                Output::CloseNotify => return true,
                Output::Timeout(_) => return false,
                _ => {}
            }
        }
    }
}
