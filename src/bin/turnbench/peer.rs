//! The far ends of a benchmark: an echo peer for relayed packets, and a bare
//! UDP forwarder that measures the kernel's floor for one relay hop.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use turnserver::server::batch::{RecvBatch, SendQueue};

/// Sends every datagram back to where it came from, on `threads` threads
/// sharing one socket, in batches (`recvmmsg` / `sendmmsg`) so the peer
/// costs little next to the server under test. Runs until killed.
pub fn echo(listen: SocketAddr, threads: usize) -> io::Result<()> {
    let sock = UdpSocket::bind(listen)?;
    set_buffers(&sock);
    eprintln!("turnbench echo: listening on {}", sock.local_addr()?);
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let sock = sock.try_clone()?;
        handles.push(std::thread::spawn(move || {
            let mut batch = RecvBatch::new(0, 65536, 0);
            let mut queue = SendQueue::new();
            loop {
                let n = match batch.recv_wait(sock.as_fd()) {
                    Ok(n) => n,
                    Err(_) => continue,
                };
                for i in 0..n {
                    let (datagrams, from) = batch.datagrams(i);
                    let Some(from) = from else { continue };
                    for range in datagrams {
                        if queue.is_full() {
                            queue.flush(&batch, |_| Some(sock.as_fd()));
                        }
                        queue.push(i, range, from, 0);
                    }
                }
                queue.flush(&batch, |_| Some(sock.as_fd()));
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Large socket buffers, so neither end of a benchmark drops for lack of
/// them (best effort: capped by net.core.rmem_max / wmem_max).
pub fn set_buffers(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
}

/// The kernel floor: a plain UDP relay. Each client of `listen` gets its own
/// socket towards `to` (as a TURN allocation gets a relay socket); a
/// datagram from a client goes out of that socket, an answer from `to` goes
/// back to the client. One `recv` and one `send` per packet on one thread,
/// with epoll to wait; nothing else. Runs until the process is killed.
pub fn forward(listen: SocketAddr, to: SocketAddr) -> io::Result<()> {
    let front = UdpSocket::bind(listen)?;
    front.set_nonblocking(true)?;
    set_buffers(&front);
    eprintln!(
        "turnbench forward: {} -> {to}, one socket per client",
        front.local_addr()?
    );
    let epoll = Epoll::new(EpollCreateFlags::empty()).map_err(io::Error::from)?;
    epoll
        .add(front.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, 0))
        .map_err(io::Error::from)?;
    let mut clients: HashMap<SocketAddr, usize> = HashMap::new();
    let mut backs: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = [0u8; 65536];
    let unspecified: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let token = ev.data() as usize;
            if token == 0 {
                loop {
                    let (len, from) = match front.recv_from(&mut buf) {
                        Ok(x) => x,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    let i = match clients.get(&from) {
                        Some(&i) => i,
                        None => {
                            let back = UdpSocket::bind(unspecified)?;
                            back.connect(to)?;
                            back.set_nonblocking(true)?;
                            set_buffers(&back);
                            let i = backs.len();
                            epoll
                                .add(
                                    back.as_fd(),
                                    EpollEvent::new(EpollFlags::EPOLLIN, i as u64 + 1),
                                )
                                .map_err(io::Error::from)?;
                            backs.push((back, from));
                            clients.insert(from, i);
                            i
                        }
                    };
                    let _ = backs[i].0.send(&buf[..len]);
                }
            } else {
                let (back, client) = &backs[token - 1];
                loop {
                    match back.recv(&mut buf) {
                        Ok(len) => {
                            let _ = front.send_to(&buf[..len], client);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    }
                }
            }
        }
    }
}
