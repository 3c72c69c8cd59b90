//! The client side of TURN that turnbench needs: a connection to the
//! server over UDP, TCP or TLS, long-term-credential authentication
//! (RFC 8489 §9.2) and the requests that set up and tear down an
//! allocation (RFC 8656 §7 Allocate, §8 Refresh, §9 CreatePermission,
//! §12 ChannelBind).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use turnserver::auth::{Key, long_term_key};
use turnserver::stun::channel::{Frame, stream_frame};
use turnserver::stun::{self, Class, Message, MessageWriter, attr, method};

/// A byte stream to the server: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

/// An owned stream of either kind.
pub type BoxIo = Pin<Box<dyn Io>>;

/// How the client reaches the server (`turn:` over UDP or TCP, `turns:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    /// "udp", "tcp" or "tls".
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// Credentials every allocation logs in with.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// What the server told us to authenticate with, and the derived key.
#[derive(Clone)]
pub struct Auth {
    pub username: String,
    pub realm: String,
    pub nonce: Vec<u8>,
    pub key: Key,
}

impl Auth {
    /// The credentials to sign a request with.
    pub fn credentials(&self) -> stun::client::Credentials<'_> {
        stun::client::Credentials {
            username: &self.username,
            realm: &self.realm,
            nonce: &self.nonce,
            key: &self.key,
        }
    }
}

/// A request that failed for good.
#[derive(Debug)]
pub enum Error {
    Io(io::Error),
    /// No answer after every retransmission (UDP) or within the timeout.
    Timeout(&'static str),
    /// An error response: code and reason phrase.
    Refused(&'static str, u16, String),
    /// An answer that is not a valid response to the request.
    Protocol(&'static str, &'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Timeout(what) => write!(f, "{what}: no answer"),
            Error::Refused(what, code, reason) => write!(f, "{what}: {code} {reason}"),
            Error::Protocol(what, problem) => write!(f, "{what}: {problem}"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// TLS settings for `turns:`.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    pub name: rustls_pki_types::ServerName<'static>,
}

/// A connection to the server while an allocation is being set up.
pub struct Conn {
    pub link: Link,
    /// Stream receive buffer and how much of it holds unread bytes.
    rbuf: Vec<u8>,
    rlen: usize,
    out: Vec<u8>,
    tid_counter: u64,
    tid_salt: u32,
}

/// The socket or stream under a connection.
pub enum Link {
    /// A UDP socket connected to the server.
    Udp(Rc<UdpSocket>),
    Stream(BoxIo),
}

/// A TCP connection from `local` (port 0: any) to `server`, without Nagle.
async fn tcp_connect(local: SocketAddr, server: SocketAddr) -> io::Result<TcpStream> {
    let s = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if !local.ip().is_unspecified() {
        s.bind(local)?;
    }
    let s = s.connect(server).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Initial retransmission timeout for UDP (RFC 8489 §6.2.1), and how many
/// times a request is sent before giving up (Rc).
const RTO: Duration = Duration::from_millis(500);
const RC: u32 = 7;
/// How long a stream request may wait for its answer (Ti).
const STREAM_TIMEOUT: Duration = Duration::from_secs(39);

/// Requests sent again because no answer came within the RTO, by every
/// connection of the process (UDP only; streams do not retransmit). Each
/// costs a flow at least 500 ms of setup time, so a few can move a whole
/// run's allocation rate.
pub static RETRANSMISSIONS: AtomicU64 = AtomicU64::new(0);

impl Conn {
    /// Opens a connection to `server` from `bind` (an IP address; the
    /// unspecified address lets the kernel choose).
    pub async fn connect(
        server: SocketAddr,
        bind: IpAddr,
        transport: Transport,
        tls: Option<&Tls>,
        salt: u32,
    ) -> Result<Conn, Error> {
        let local = SocketAddr::new(bind, 0);
        let link = match transport {
            Transport::Udp => {
                let s = UdpSocket::bind(local).await?;
                s.connect(server).await?;
                Link::Udp(Rc::new(s))
            }
            Transport::Tcp => {
                let s = tcp_connect(local, server).await?;
                Link::Stream(Box::pin(s))
            }
            Transport::Tls => {
                let tls = tls.expect("TLS settings for a TLS connection");
                let s = tcp_connect(local, server).await?;
                let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
                let s = connector.connect(tls.name.clone(), s).await?;
                Link::Stream(Box::pin(s))
            }
        };
        Ok(Conn {
            link,
            rbuf: vec![0; 4096],
            rlen: 0,
            out: Vec::with_capacity(512),
            tid_counter: 0,
            tid_salt: salt,
        })
    }

    /// A fresh transaction ID (unique per connection).
    pub fn next_tid(&mut self) -> [u8; 12] {
        self.tid_counter += 1;
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&self.tid_salt.to_be_bytes());
        tid[4..].copy_from_slice(&self.tid_counter.to_be_bytes());
        tid
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.link {
            Link::Udp(s) => s.send(bytes).await.map(|_| ()),
            Link::Stream(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    /// Receives the next STUN message into `rbuf[..n]`, returning `n`;
    /// ChannelData frames are skipped.
    async fn recv_stun(&mut self) -> io::Result<usize> {
        loop {
            match &mut self.link {
                Link::Udp(s) => {
                    let n = s.recv(&mut self.rbuf).await?;
                    if n >= 20 && self.rbuf[0] >> 6 == 0 {
                        return Ok(n);
                    }
                }
                Link::Stream(s) => {
                    // Drop the previous frame, then read until a whole one.
                    loop {
                        match stream_frame(&self.rbuf[..self.rlen]) {
                            Err(_) => {
                                return Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "the server sent bytes that are not STUN or ChannelData",
                                ));
                            }
                            Ok(Some(f)) if f.len() <= self.rlen => {
                                let len = f.len();
                                if let Frame::Stun(_) = f {
                                    // Move it to the front for the caller.
                                    return Ok(len);
                                }
                                self.rbuf.copy_within(len..self.rlen, 0);
                                self.rlen -= len;
                            }
                            Ok(f) => {
                                if let Some(f) = f
                                    && f.len() > self.rbuf.len()
                                {
                                    self.rbuf.resize(f.len(), 0);
                                }
                                let n = s.read(&mut self.rbuf[self.rlen..]).await?;
                                if n == 0 {
                                    return Err(io::ErrorKind::UnexpectedEof.into());
                                }
                                self.rlen += n;
                            }
                        }
                    }
                }
            }
        }
    }

    /// After a stream message at the front of `rbuf` was used, drops it.
    fn consume(&mut self, n: usize) {
        if let Link::Stream(_) = self.link {
            self.rbuf.copy_within(n..self.rlen, 0);
            self.rlen -= n;
        }
    }

    /// Sends the request in `self.out` and waits for the response with
    /// transaction ID `tid`, retransmitting over UDP. Returns the response's
    /// length; the response is at `self.rbuf[..len]` until the next call.
    async fn transact(&mut self, what: &'static str, tid: [u8; 12]) -> Result<usize, Error> {
        let out = std::mem::take(&mut self.out);
        let result = self.transact_inner(what, tid, &out).await;
        self.out = out;
        result
    }

    async fn transact_inner(
        &mut self,
        what: &'static str,
        tid: [u8; 12],
        req: &[u8],
    ) -> Result<usize, Error> {
        let udp = matches!(self.link, Link::Udp(_));
        let mut rto = RTO;
        let tries = if udp { RC } else { 1 };
        for attempt in 0..tries {
            if attempt > 0 {
                RETRANSMISSIONS.fetch_add(1, Ordering::Relaxed);
            }
            self.send(req).await?;
            let wait = if udp { rto } else { STREAM_TIMEOUT };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let n = match tokio::time::timeout_at(deadline, self.recv_stun()).await {
                    Err(_) => break,
                    Ok(r) => r?,
                };
                let matches = Message::parse(&self.rbuf[..n])
                    .is_ok_and(|m| *m.transaction_id() == tid && m.class() != Class::Request);
                if matches {
                    return Ok(n);
                }
                self.consume(n);
            }
            rto *= 2;
        }
        Err(Error::Timeout(what))
    }

    /// Sends one request built by `build` (plus the credentials, if any) and
    /// returns the success response's length in `rbuf`. A 438 Stale Nonce is
    /// retried with the new nonce.
    async fn request(
        &mut self,
        what: &'static str,
        method: u16,
        auth: &mut Option<Auth>,
        build: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Result<usize, Error> {
        for _ in 0..3 {
            let tid = self.next_tid();
            write_request(&mut self.out, method, &tid, auth.as_ref(), build);
            let n = self.transact(what, tid).await?;
            let msg = Message::parse(&self.rbuf[..n])
                .map_err(|_| Error::Protocol(what, "unparsable response"))?;
            if msg.class() == Class::Success {
                return Ok(n);
            }
            let (code, reason) = error_code(&msg);
            if code == 438
                && let (Some(a), Some(nonce)) = (auth.as_mut(), msg.get(attr::NONCE))
            {
                a.nonce = nonce.to_vec();
                self.consume(n);
                continue;
            }
            return Err(Error::Refused(what, code, reason));
        }
        Err(Error::Protocol(what, "the nonce keeps going stale"))
    }

    /// Allocates a UDP relay (RFC 8656 §7.1): first without credentials to
    /// learn REALM and NONCE from the 401, then with them. Returns the
    /// credentials to use for later requests (none on a server without
    /// authentication) and the relayed transport address.
    pub async fn allocate(
        &mut self,
        creds: Option<&Credentials>,
        lifetime: u32,
    ) -> Result<(Option<Auth>, SocketAddr), Error> {
        const WHAT: &str = "Allocate";
        let build = |w: &mut MessageWriter<'_>| {
            w.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
                .attr_u32(attr::LIFETIME, lifetime);
        };
        let mut auth = None;
        let tid = self.next_tid();
        {
            let mut w = MessageWriter::new(&mut self.out, method::ALLOCATE, Class::Request, &tid);
            build(&mut w);
            w.fingerprint();
        }
        let n = self.transact(WHAT, tid).await?;
        let msg = Message::parse(&self.rbuf[..n])
            .map_err(|_| Error::Protocol(WHAT, "unparsable response"))?;
        let n = if msg.class() == Class::Success {
            n
        } else {
            let (code, reason) = error_code(&msg);
            if code != 401 {
                return Err(Error::Refused(WHAT, code, reason));
            }
            let Some(creds) = creds else {
                return Err(Error::Refused(
                    WHAT,
                    401,
                    "the server wants credentials: give --user and --password, or --secret".into(),
                ));
            };
            let realm = msg
                .text(attr::REALM)
                .and_then(Result::ok)
                .ok_or(Error::Protocol(WHAT, "401 without REALM"))?
                .to_string();
            let nonce = msg
                .get(attr::NONCE)
                .ok_or(Error::Protocol(WHAT, "401 without NONCE"))?
                .to_vec();
            auth = Some(Auth {
                key: long_term_key(&creds.username, &realm, &creds.password),
                username: creds.username.clone(),
                realm,
                nonce,
            });
            self.consume(n);
            self.request(WHAT, method::ALLOCATE, &mut auth, &build)
                .await?
        };
        let msg = Message::parse(&self.rbuf[..n]).expect("parsed before");
        let relayed = msg
            .xor_address(attr::XOR_RELAYED_ADDRESS)
            .and_then(Result::ok)
            .ok_or(Error::Protocol(WHAT, "success without XOR-RELAYED-ADDRESS"))?;
        self.consume(n);
        Ok((auth, relayed))
    }

    /// Binds `channel` to `peer` (RFC 8656 §12.2).
    pub async fn channel_bind(
        &mut self,
        auth: &mut Option<Auth>,
        channel: u16,
        peer: SocketAddr,
    ) -> Result<(), Error> {
        let mut number = [0u8; 4];
        number[..2].copy_from_slice(&channel.to_be_bytes());
        let n = self
            .request("ChannelBind", method::CHANNEL_BIND, auth, &|w| {
                w.attr(attr::CHANNEL_NUMBER, &number)
                    .xor_address(attr::XOR_PEER_ADDRESS, peer);
            })
            .await?;
        self.consume(n);
        Ok(())
    }

    /// Installs a permission for `peer`'s IP address (RFC 8656 §9).
    pub async fn create_permission(
        &mut self,
        auth: &mut Option<Auth>,
        peer: SocketAddr,
    ) -> Result<(), Error> {
        let n = self
            .request("CreatePermission", method::CREATE_PERMISSION, auth, &|w| {
                w.xor_address(attr::XOR_PEER_ADDRESS, peer);
            })
            .await?;
        self.consume(n);
        Ok(())
    }
}

/// Builds a request into `out` (cleared first): `build` adds the method's
/// attributes, then it is signed with `auth` if any, then FINGERPRINT.
pub fn write_request(
    out: &mut Vec<u8>,
    method: u16,
    tid: &[u8; 12],
    auth: Option<&Auth>,
    build: &dyn Fn(&mut MessageWriter<'_>),
) {
    let creds = auth.map(Auth::credentials);
    stun::client::write_request(out, method, tid, build, creds.as_ref(), true);
}

/// ERROR-CODE of an error response: the code (0 when it has none) and the
/// reason phrase, without trailing NUL bytes.
pub fn error_code(msg: &Message<'_>) -> (u16, String) {
    msg.get(attr::ERROR_CODE)
        .and_then(|v| attr::decode_error_code(v).ok())
        // Some of coturn's reason phrases (437's) end in a NUL byte.
        .map(|(c, r)| (c, r.trim_end_matches('\0').to_string()))
        .unwrap_or((0, "error response without ERROR-CODE".into()))
}

impl Conn {
    /// Takes the connection apart for the traffic phase: the link, and any
    /// stream bytes already read past the last response.
    pub fn into_parts(self) -> (Link, Vec<u8>) {
        let rest = self.rbuf[..self.rlen].to_vec();
        (self.link, rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code and reason turnbench reports for an error response whose
    /// ERROR-CODE carries `code` and `reason`.
    fn reported(code: u16, reason: &str) -> (u16, String) {
        let mut buf = Vec::new();
        MessageWriter::new(&mut buf, method::ALLOCATE, Class::Error, &[7; 12])
            .error_code(code, reason);
        error_code(&Message::parse(&buf).unwrap())
    }

    #[test]
    fn reason_phrases_lose_the_nul_coturn_ends_them_with() {
        assert_eq!(
            reported(437, "Mismatched allocation: wrong transaction ID\0"),
            (
                437,
                "Mismatched allocation: wrong transaction ID".to_string()
            )
        );
        assert_eq!(
            reported(401, "Unauthorized"),
            (401, "Unauthorized".to_string())
        );
    }
}
