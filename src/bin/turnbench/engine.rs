//! The load: allocations set up in parallel, then paced or windowed
//! traffic through them, measured per round trip, then torn down.
//!
//! Each thread runs a single-threaded tokio runtime with its share of the
//! flows. A flow is one allocation (or, with `--raw`, one plain UDP socket).
//! Senders stamp every packet with their flow number, a sequence number and
//! the send time; the echo peer, or the partner allocation in pairs mode,
//! sends it back, and the sender records the round trip.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use nix::sys::timer::{Expiration, TimerSetTimeFlags};
use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::UdpSocket;
use tokio::sync::{Barrier, Notify, Semaphore};
use tokio::task::JoinHandle;

use turnserver::stun::channel::{parse_channel_data, stream_frame};
use turnserver::stun::{Class, Message, MessageWriter, attr, method};

use crate::client::{self, Auth, BoxIo, Conn, Credentials, Link, Tls, Transport};

/// Marks turnbench payloads: "TBv1".
const MAGIC: [u8; 4] = *b"TBv1";
/// Magic, flow number (u32), sequence number (u64), send time (u64 ns).
pub const MIN_PAYLOAD: usize = 24;
/// The first channel number (RFC 8656 §12).
const CHANNEL: u16 = 0x4000;
/// Bytes a stream flow may queue before packets are dropped locally.
const MAX_QUEUED: usize = 1 << 20;

/// Everything a run is told to do.
pub struct Plan {
    pub server: SocketAddr,
    /// Local address for the client sockets.
    pub bind: IpAddr,
    pub transport: Transport,
    pub tls: Option<Tls>,
    pub creds: Option<Credentials>,
    pub allocations: usize,
    /// Echo peer; `None` means client-to-client pairs.
    pub peer: Option<SocketAddr>,
    /// Plain UDP to `server` (a forwarder), no TURN.
    pub raw: bool,
    pub indications: bool,
    /// Payload bytes per packet.
    pub size: usize,
    /// Packets per second offered by all senders together; 0 = windowed.
    pub rate: f64,
    /// Packets in flight per sender when `rate` is 0.
    pub window: u32,
    /// Pacing step: the packets due are sent together once per step.
    pub step: Duration,
    pub duration: Duration,
    pub hold: Duration,
    pub threads: usize,
    pub concurrency: usize,
    /// LIFETIME asked for in Allocate, seconds.
    pub lifetime: u32,
    /// Print progress to stderr.
    pub verbose: bool,
}

impl Plan {
    /// Whether flow `i` sends (the others reflect, in pairs mode).
    fn is_sender(&self, i: usize) -> bool {
        self.raw || self.peer.is_some() || i.is_multiple_of(2)
    }

    /// How many flows send.
    pub fn senders(&self) -> usize {
        (0..self.allocations).filter(|&i| self.is_sender(i)).count()
    }

    /// Relay hops through the server per round trip.
    pub fn hops_per_round_trip(&self) -> u64 {
        if self.raw || self.peer.is_some() {
            2
        } else {
            4
        }
    }

    /// The flows thread `t` owns: pairs stay on one thread.
    fn flows_of(&self, t: usize) -> Vec<usize> {
        let unit = if self.raw || self.peer.is_some() {
            1
        } else {
            2
        };
        (0..self.allocations / unit)
            .filter(|u| u % self.threads == t)
            .flat_map(|u| u * unit..u * unit + unit)
            .collect()
    }
}

/// Nanoseconds since the first call (the process's clock for timestamps).
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// What one thread measured.
pub struct ThreadResult {
    pub setup_ok: u64,
    pub setup_errors: BTreeMap<String, u64>,
    pub setup_end: Option<Instant>,
    pub sent: u64,
    pub received: u64,
    pub local_drops: u64,
    pub reflected: u64,
    pub deleted: u64,
    pub rtt_ns: Histogram<u64>,
}

/// A request sent while traffic flows, remembered to resend on 438.
#[derive(Clone, Copy)]
enum Pending {
    Refresh(u32),
    Bind,
    Permission,
}

/// Where a flow's packets go.
enum Out {
    Udp(Rc<UdpSocket>),
    Stream(Rc<StreamOut>),
}

/// A stream flow's outgoing bytes, written by its writer task.
struct StreamOut {
    queue: RefCell<Vec<u8>>,
    wake: Notify,
}

impl Out {
    /// Sends one datagram or queues one frame; false when it was dropped.
    fn send(&self, bytes: &[u8]) -> bool {
        match self {
            Out::Udp(s) => socket2::SockRef::from(&**s).send(bytes).is_ok(),
            Out::Stream(s) => {
                let mut q = s.queue.borrow_mut();
                if q.len() + bytes.len() > MAX_QUEUED {
                    return false;
                }
                q.extend_from_slice(bytes);
                drop(q);
                s.wake.notify_one();
                true
            }
        }
    }
}

/// One allocation (or raw socket) in the traffic phase.
struct Flow {
    id: u32,
    sender: bool,
    out: Out,
    /// The packet this flow sends: framing around a payload at `payload`.
    tpl: RefCell<Vec<u8>>,
    payload: usize,
    auth: RefCell<Option<Auth>>,
    peer: SocketAddr,
    seq: Cell<u64>,
    last_rx: Cell<u64>,
    pending: RefCell<Vec<([u8; 12], Pending)>>,
    tid: Cell<u64>,
    deleted: Cell<bool>,
}

/// State shared by the tasks of one thread.
struct Local {
    plan: Arc<Plan>,
    stats: RefCell<Stats>,
    /// True while senders may send.
    sending: Cell<bool>,
    /// True while round trips are recorded.
    measuring: Cell<bool>,
    last_rx_any: Cell<u64>,
}

struct Stats {
    sent: u64,
    received: u64,
    local_drops: u64,
    reflected: u64,
    rtt_ns: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 100 s at 3 significant digits.
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("histogram bounds")
}

impl Flow {
    fn next_tid(&self) -> [u8; 12] {
        self.tid.set(self.tid.get() + 1);
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&(0x8000_0000 | self.id).to_be_bytes());
        tid[4..].copy_from_slice(&self.tid.get().to_be_bytes());
        tid
    }

    /// Stamps and sends the next packet.
    fn send_next(&self, local: &Local) {
        let mut tpl = self.tpl.borrow_mut();
        let p = self.payload;
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        tpl[p..p + 4].copy_from_slice(&MAGIC);
        tpl[p + 4..p + 8].copy_from_slice(&self.id.to_be_bytes());
        tpl[p + 8..p + 16].copy_from_slice(&seq.to_be_bytes());
        tpl[p + 16..p + 24].copy_from_slice(&now_ns().to_be_bytes());
        let ok = self.out.send(&tpl);
        let mut s = local.stats.borrow_mut();
        if ok {
            s.sent += 1;
        } else {
            s.local_drops += 1;
        }
    }

    /// Sends `payload` (another flow's packet) back through this flow.
    fn reflect(&self, local: &Local, payload: &[u8]) {
        let mut tpl = self.tpl.borrow_mut();
        let p = self.payload;
        let n = payload.len().min(tpl.len() - p);
        tpl[p..p + n].copy_from_slice(&payload[..n]);
        if self.out.send(&tpl) {
            local.stats.borrow_mut().reflected += 1;
        } else {
            local.stats.borrow_mut().local_drops += 1;
        }
    }

    /// Sends a request while traffic flows and remembers it for 438.
    fn send_request(&self, kind: Pending, channel: u16) {
        let tid = self.next_tid();
        let mut out = Vec::with_capacity(256);
        let auth = self.auth.borrow();
        let peer = self.peer;
        let m = match kind {
            Pending::Refresh(_) => method::REFRESH,
            Pending::Bind => method::CHANNEL_BIND,
            Pending::Permission => method::CREATE_PERMISSION,
        };
        let build = |w: &mut MessageWriter<'_>| match kind {
            Pending::Refresh(lifetime) => {
                w.attr_u32(attr::LIFETIME, lifetime);
            }
            Pending::Bind => {
                let mut number = [0u8; 4];
                number[..2].copy_from_slice(&channel.to_be_bytes());
                w.attr(attr::CHANNEL_NUMBER, &number)
                    .xor_address(attr::XOR_PEER_ADDRESS, peer);
            }
            Pending::Permission => {
                w.xor_address(attr::XOR_PEER_ADDRESS, peer);
            }
        };
        client::write_request(&mut out, m, &tid, auth.as_ref(), &build);
        if matches!(self.out, Out::Stream(_)) || out.len() <= 1500 {
            self.out.send(&out);
        }
        let mut pending = self.pending.borrow_mut();
        if pending.len() > 16 {
            pending.remove(0);
        }
        pending.push((tid, kind));
    }

    /// Handles a response to a request sent while traffic flows.
    fn on_response(&self, msg: &Message<'_>) {
        let tid = *msg.transaction_id();
        let kind = {
            let mut pending = self.pending.borrow_mut();
            let Some(i) = pending.iter().position(|(t, _)| *t == tid) else {
                return;
            };
            pending.remove(i).1
        };
        if msg.class() == Class::Success {
            if let Pending::Refresh(0) = kind {
                self.deleted.set(true);
            }
            return;
        }
        let (code, _) = client::error_code(msg);
        if code == 438
            && let Some(nonce) = msg.get(attr::NONCE)
        {
            if let Some(a) = self.auth.borrow_mut().as_mut() {
                a.nonce = nonce.to_vec();
            }
            self.send_request(kind, CHANNEL);
        } else if let Pending::Refresh(0) = kind {
            // 437: the allocation is already gone.
            self.deleted.set(code == 437);
        }
    }

    /// Handles one datagram or frame received on this flow.
    fn on_receive(&self, local: &Local, bytes: &[u8]) {
        let payload = if local.plan.raw {
            bytes
        } else if bytes.first().is_some_and(|b| b >> 6 == 1) {
            match parse_channel_data(bytes) {
                Some((_, r)) => &bytes[r],
                None => return,
            }
        } else {
            let Ok(msg) = Message::parse(bytes) else {
                return;
            };
            match msg.class() {
                Class::Indication if msg.method() == method::DATA => {
                    match msg.value_range(attr::DATA) {
                        Some(r) => &bytes[r],
                        None => return,
                    }
                }
                Class::Success | Class::Error => {
                    self.on_response(&msg);
                    return;
                }
                _ => return,
            }
        };
        if payload.len() < MIN_PAYLOAD || payload[..4] != MAGIC {
            return;
        }
        let now = now_ns();
        local.last_rx_any.set(now);
        if !self.sender {
            self.reflect(local, payload);
            return;
        }
        let origin = u32::from_be_bytes(payload[4..8].try_into().expect("4 bytes"));
        if origin != self.id {
            return;
        }
        self.last_rx.set(now);
        let sent_at = u64::from_be_bytes(payload[16..24].try_into().expect("8 bytes"));
        {
            let mut s = local.stats.borrow_mut();
            s.received += 1;
            if local.measuring.get() {
                s.rtt_ns
                    .saturating_record(now.saturating_sub(sent_at).max(1_000));
            }
        }
        if local.plan.rate == 0.0 && local.sending.get() {
            self.send_next(local);
        }
    }
}

/// Builds a flow's packet template: returns it and the payload's offset.
fn template(plan: &Plan, peer: SocketAddr, id: u32) -> (Vec<u8>, usize) {
    let size = plan.size;
    if plan.raw {
        return (vec![0; size], 0);
    }
    let stream = plan.transport != Transport::Udp;
    if plan.indications {
        let mut out = Vec::new();
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&id.to_be_bytes());
        MessageWriter::new(&mut out, method::SEND, Class::Indication, &tid)
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, &vec![0; size]);
        let pad = (4 - size % 4) % 4;
        let at = out.len() - pad - size;
        (out, at)
    } else {
        let pad = if stream { (4 - size % 4) % 4 } else { 0 };
        let mut out = vec![0; 4 + size + pad];
        out[..2].copy_from_slice(&CHANNEL.to_be_bytes());
        out[2..4].copy_from_slice(&(size as u16).to_be_bytes());
        (out, 4)
    }
}

/// A flow after setup, before the traffic tasks start.
struct Ready {
    id: usize,
    link: Link,
    rest: Vec<u8>,
    auth: Option<Auth>,
}

/// A connection with its allocation: credentials and relayed address.
type Allocated = (Conn, Option<Auth>, SocketAddr);

impl Ready {
    fn new(id: usize, conn: Conn, auth: Option<Auth>) -> Ready {
        let (link, rest) = conn.into_parts();
        Ready {
            id,
            link,
            rest,
            auth,
        }
    }
}

/// Connects and allocates for flow `id` (no permission yet).
async fn allocate(plan: &Plan, id: usize) -> Result<Allocated, String> {
    let mut conn = Conn::connect(
        plan.server,
        plan.bind,
        plan.transport,
        plan.tls.as_ref(),
        id as u32,
    )
    .await
    .map_err(|e| format!("connect: {e}"))?;
    let (auth, relayed) = conn
        .allocate(plan.creds.as_ref(), plan.lifetime)
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, auth, relayed))
}

/// Opens the permission (and channel) from `conn`'s allocation to `peer`.
async fn open_path(
    plan: &Plan,
    conn: &mut Conn,
    auth: &mut Option<Auth>,
    peer: SocketAddr,
) -> Result<(), String> {
    if plan.indications {
        conn.create_permission(auth, peer).await
    } else {
        conn.channel_bind(auth, CHANNEL, peer).await
    }
    .map_err(|e| e.to_string())
}

fn count_error(errors: &RefCell<BTreeMap<String, u64>>, e: String) {
    *errors.borrow_mut().entry(e).or_insert(0) += 1;
}

/// Sets up this thread's flows: returns those that are ready, with their
/// destination.
async fn setup(
    plan: &Arc<Plan>,
    ids: &[usize],
    errors: &Rc<RefCell<BTreeMap<String, u64>>>,
) -> Vec<(Ready, SocketAddr)> {
    if plan.raw {
        let mut ready = Vec::new();
        for &id in ids {
            match Conn::connect(plan.server, plan.bind, Transport::Udp, None, id as u32).await {
                Ok(c) => ready.push((Ready::new(id, c, None), plan.server)),
                Err(e) => count_error(errors, format!("connect: {e}")),
            }
        }
        return ready;
    }
    let limit = Rc::new(Semaphore::new(
        (plan.concurrency / plan.threads).clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut tasks: Vec<JoinHandle<Option<Allocated>>> = Vec::new();
    for &id in ids {
        let plan = plan.clone();
        let limit = limit.clone();
        let errors = errors.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let _permit = limit.acquire().await.expect("semaphore open");
            match allocate(&plan, id).await {
                Ok((mut conn, mut auth, relayed)) => {
                    if let Some(peer) = plan.peer
                        && let Err(e) = open_path(&plan, &mut conn, &mut auth, peer).await
                    {
                        count_error(&errors, e);
                        return None;
                    }
                    Some((conn, auth, relayed))
                }
                Err(e) => {
                    count_error(&errors, e);
                    None
                }
            }
        }));
    }
    let mut done = Vec::with_capacity(ids.len());
    for t in tasks {
        done.push(t.await.ok().flatten());
    }
    if let Some(peer) = plan.peer {
        return ids
            .iter()
            .zip(done)
            .filter_map(|(&id, d)| {
                let (conn, auth, _) = d?;
                Some((Ready::new(id, conn, auth), peer))
            })
            .collect();
    }
    // Pairs: each side opens the path to the other's relayed address.
    let mut ready = Vec::new();
    let mut it = ids.iter().zip(done);
    while let (Some((&a_id, a)), Some((&b_id, b))) = (it.next(), it.next()) {
        let (Some(a), Some(b)) = (a, b) else {
            continue;
        };
        let (mut a_conn, mut a_auth, a_relayed) = a;
        let (mut b_conn, mut b_auth, b_relayed) = b;
        let _permit = limit.acquire().await.expect("semaphore open");
        let (ra, rb) = tokio::join!(
            open_path(plan, &mut a_conn, &mut a_auth, b_relayed),
            open_path(plan, &mut b_conn, &mut b_auth, a_relayed)
        );
        if let Err(e) = ra.and(rb) {
            count_error(errors, e);
            continue;
        }
        for (id, conn, auth, peer) in [
            (a_id, a_conn, a_auth, b_relayed),
            (b_id, b_conn, b_auth, a_relayed),
        ] {
            ready.push((Ready::new(id, conn, auth), peer));
        }
    }
    ready
}

/// Reads one UDP flow until aborted.
async fn udp_reader(local: Rc<Local>, flows: Rc<Vec<Rc<Flow>>>, i: usize, sock: Rc<UdpSocket>) {
    let mut buf = [0u8; 2048];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) => flows[i].on_receive(&local, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Reads one stream flow's frames until the stream ends or it is aborted.
async fn stream_reader(
    local: Rc<Local>,
    flows: Rc<Vec<Rc<Flow>>>,
    i: usize,
    mut rd: ReadHalf<BoxIo>,
    mut buf: Vec<u8>,
) {
    let mut len = buf.len();
    buf.resize(len.max(8192), 0);
    loop {
        while let Ok(Some(f)) = stream_frame(&buf[..len]) {
            let n = f.len();
            if n > len {
                if n > buf.len() {
                    buf.resize(n, 0);
                }
                break;
            }
            // ChannelData padding is ignored: on_receive reads the length.
            flows[i].on_receive(&local, &buf[..n]);
            buf.copy_within(n..len, 0);
            len -= n;
        }
        if stream_frame(&buf[..len]).is_err() {
            return;
        }
        match rd.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
    }
}

/// Writes one stream flow's queued frames.
async fn stream_writer(out: Rc<StreamOut>, mut wr: WriteHalf<BoxIo>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        out.wake.notified().await;
        loop {
            std::mem::swap(&mut batch, &mut *out.queue.borrow_mut());
            if batch.is_empty() {
                break;
            }
            if wr.write_all(&batch).await.is_err() {
                return;
            }
            batch.clear();
        }
        let _ = wr.flush().await;
    }
}

/// Offers `rate` packets per second across `senders` for `duration`: every
/// `step` (a timerfd, so steps shorter than tokio's 1 ms timer work) it sends
/// the packets that have come due since the last step, round robin.
async fn pace(
    local: Rc<Local>,
    senders: Vec<Rc<Flow>>,
    rate: f64,
    step: Duration,
    duration: Duration,
) {
    if senders.is_empty() {
        tokio::time::sleep(duration).await;
        return;
    }
    let ticker = match Ticker::new(step) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("turnbench: pacing timer: {e}");
            return;
        }
    };
    let start = Instant::now();
    let mut issued: u64 = 0;
    let mut next = 0usize;
    // Never catch up more than 10 ms of backlog at once.
    let max_burst = ((rate / 100.0) as u64).max(1);
    loop {
        if let Err(e) = ticker.tick().await {
            eprintln!("turnbench: pacing timer: {e}");
            return;
        }
        let elapsed = start.elapsed();
        if elapsed >= duration {
            return;
        }
        let due = (elapsed.as_secs_f64() * rate) as u64;
        if due > issued + max_burst {
            issued = due - max_burst;
        }
        while issued < due {
            senders[next].send_next(&local);
            next = (next + 1) % senders.len();
            issued += 1;
        }
    }
}

/// A periodic timerfd watched by tokio: microsecond steps, which tokio's
/// own timer (1 ms granularity) cannot give.
struct Ticker(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl Ticker {
    fn new(step: Duration) -> io::Result<Ticker> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        fd.set(
            Expiration::Interval(step.into()),
            TimerSetTimeFlags::empty(),
        )?;
        let fd = std::os::fd::OwnedFd::from(fd);
        // SAFETY: the OwnedFd is moved in and owned by the AsyncFd, which
        // never replaces or closes it while registered.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Ticker(fd))
    }

    /// Waits for the next expiry (or returns at once if some are pending).
    async fn tick(&self) -> io::Result<()> {
        loop {
            let mut guard = self.0.readable().await?;
            let mut count = [0u8; 8];
            match nix::unistd::read(self.0.get_ref(), &mut count) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Keeps `window` packets in flight per sender until `duration` passes,
/// refilling a flow that has heard nothing for 200 ms.
async fn windowed(local: Rc<Local>, senders: Vec<Rc<Flow>>, window: u32, duration: Duration) {
    let start = Instant::now();
    for f in &senders {
        f.last_rx.set(now_ns());
        for _ in 0..window {
            f.send_next(&local);
        }
    }
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        tick.tick().await;
        if start.elapsed() >= duration {
            return;
        }
        let now = now_ns();
        for f in &senders {
            if now.saturating_sub(f.last_rx.get()) > 200_000_000 {
                f.last_rx.set(now);
                for _ in 0..window {
                    f.send_next(&local);
                }
            }
        }
    }
}

/// Refreshes every flow's allocation and permission or channel every two
/// minutes while traffic flows (lifetimes are 300 s and more).
async fn refresher(flows: Rc<Vec<Rc<Flow>>>, plan: Arc<Plan>) {
    if plan.raw {
        return;
    }
    let period = Duration::from_secs(120);
    loop {
        tokio::time::sleep(period).await;
        for f in flows.iter() {
            f.send_request(Pending::Refresh(plan.lifetime), CHANNEL);
            let kind = if plan.indications {
                Pending::Permission
            } else {
                Pending::Bind
            };
            f.send_request(kind, CHANNEL);
        }
    }
}

/// Runs thread `t`'s share of the plan. `barrier` lines the threads up after
/// setup and after traffic.
pub fn run_thread(plan: Arc<Plan>, t: usize, barrier: Arc<Barrier>) -> ThreadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let set = tokio::task::LocalSet::new();
    set.block_on(&rt, thread_main(plan, t, barrier))
}

async fn thread_main(plan: Arc<Plan>, t: usize, barrier: Arc<Barrier>) -> ThreadResult {
    let ids = plan.flows_of(t);
    let errors = Rc::new(RefCell::new(BTreeMap::new()));
    let ready = setup(&plan, &ids, &errors).await;
    let setup_end = Instant::now();
    let setup_ok = ready.len() as u64;

    let local = Rc::new(Local {
        plan: plan.clone(),
        stats: RefCell::new(Stats {
            sent: 0,
            received: 0,
            local_drops: 0,
            reflected: 0,
            rtt_ns: histogram(),
        }),
        sending: Cell::new(false),
        measuring: Cell::new(false),
        last_rx_any: Cell::new(0),
    });
    let mut flows = Vec::with_capacity(ready.len());
    let mut links = Vec::with_capacity(ready.len());
    for (r, peer) in ready {
        let (tpl, payload) = template(&plan, peer, r.id as u32);
        let (out, reader) = match r.link {
            Link::Udp(s) => (Out::Udp(s.clone()), Reader::Udp(s)),
            Link::Stream(s) => {
                let (rd, wr) = tokio::io::split(s);
                let out = Rc::new(StreamOut {
                    queue: RefCell::new(Vec::new()),
                    wake: Notify::new(),
                });
                (
                    Out::Stream(out.clone()),
                    Reader::Stream(rd, wr, out, r.rest),
                )
            }
        };
        flows.push(Rc::new(Flow {
            id: r.id as u32,
            sender: plan.is_sender(r.id),
            out,
            tpl: RefCell::new(tpl),
            payload,
            auth: RefCell::new(r.auth),
            peer,
            seq: Cell::new(0),
            last_rx: Cell::new(0),
            pending: RefCell::new(Vec::new()),
            tid: Cell::new(0),
            deleted: Cell::new(false),
        }));
        links.push(reader);
    }
    let flows = Rc::new(flows);
    let mut tasks = Vec::new();
    for (i, reader) in links.into_iter().enumerate() {
        match reader {
            Reader::Udp(s) => tasks.push(tokio::task::spawn_local(udp_reader(
                local.clone(),
                flows.clone(),
                i,
                s,
            ))),
            Reader::Stream(rd, wr, out, rest) => {
                tasks.push(tokio::task::spawn_local(stream_reader(
                    local.clone(),
                    flows.clone(),
                    i,
                    rd,
                    rest,
                )));
                tasks.push(tokio::task::spawn_local(stream_writer(out, wr)));
            }
        }
    }
    tasks.push(tokio::task::spawn_local(refresher(
        flows.clone(),
        plan.clone(),
    )));

    barrier.wait().await;
    if t == 0 && plan.verbose {
        eprintln!("turnbench: setup done");
    }
    if !plan.hold.is_zero() {
        if t == 0 {
            eprintln!(
                "turnbench: allocations ready, holding them for {} s",
                plan.hold.as_secs_f64()
            );
        }
        tokio::time::sleep(plan.hold).await;
    }
    if !plan.duration.is_zero() {
        let senders: Vec<Rc<Flow>> = flows.iter().filter(|f| f.sender).cloned().collect();
        local.sending.set(true);
        local.measuring.set(true);
        if plan.rate > 0.0 {
            let share = plan.rate * senders.len() as f64 / plan.senders().max(1) as f64;
            pace(local.clone(), senders, share, plan.step, plan.duration).await;
        } else {
            windowed(local.clone(), senders, plan.window, plan.duration).await;
        }
        local.sending.set(false);
        // Let the last packets come back: until 200 ms pass without one, at
        // most 2 s.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if now_ns().saturating_sub(local.last_rx_any.get()) > 200_000_000 {
                break;
            }
        }
        local.measuring.set(false);
    }
    barrier.wait().await;

    // Tear down: Refresh with LIFETIME 0, answers collected by the readers.
    let mut deleted = 0;
    if !plan.raw {
        for f in flows.iter() {
            f.send_request(Pending::Refresh(0), CHANNEL);
        }
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            deleted = flows.iter().filter(|f| f.deleted.get()).count() as u64;
            if deleted == flows.len() as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for t in tasks {
        t.abort();
    }
    let s = local.stats.replace(Stats {
        sent: 0,
        received: 0,
        local_drops: 0,
        reflected: 0,
        rtt_ns: histogram(),
    });
    let setup_errors = errors.borrow().clone();
    ThreadResult {
        setup_ok,
        setup_errors,
        setup_end: Some(setup_end),
        sent: s.sent,
        received: s.received,
        local_drops: s.local_drops,
        reflected: s.reflected,
        deleted,
        rtt_ns: s.rtt_ns,
    }
}

/// A flow's receive side, before its task starts.
enum Reader {
    Udp(Rc<UdpSocket>),
    Stream(ReadHalf<BoxIo>, WriteHalf<BoxIo>, Rc<StreamOut>, Vec<u8>),
}
