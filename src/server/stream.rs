//! A client's TCP or TLS connection as the worker's reader and writer share
//! it, and how a batch of queued frames is put on the wire.
//!
//! Over TLS, every TURN frame (a STUN message or a ChannelData message) goes
//! in a TLS record of its own, as coturn sends them. The stream is a byte
//! stream to TLS, so this is not what RFC 8656 requires, but clients exist
//! that read one message per `SSL_read` and drop whatever else the record
//! held: coturn's own `turnutils_uclient` is one (a record holding two
//! ChannelData messages counts as one and loses the second). The records of
//! one batch still leave in a single `writev`.

use std::cell::RefCell;
use std::io::{self, Write};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::stun::channel;

/// A client stream that can take a batch of whole frames.
pub trait FrameStream: AsyncRead + AsyncWrite + Unpin {
    /// Takes `frames` (whole STUN or ChannelData frames, back to back) into
    /// the stream's own send buffer where it has one, and returns the bytes
    /// the caller must still write and flush. Errors when the stream can no
    /// longer send (a TLS connection that has been closed).
    fn stage<'a>(&mut self, frames: &'a [u8]) -> io::Result<&'a [u8]>;
}

impl FrameStream for TcpStream {
    /// Plain TCP has no records: the batch is written as it is.
    fn stage<'a>(&mut self, frames: &'a [u8]) -> io::Result<&'a [u8]> {
        Ok(frames)
    }
}

impl FrameStream for TlsStream<TcpStream> {
    /// Encrypts each frame into a record of its own (RFC 8446 §5.1 lets a
    /// sender split and join records freely; one per frame is for clients
    /// that assume it). rustls keeps the records until the caller flushes.
    fn stage<'a>(&mut self, frames: &'a [u8]) -> io::Result<&'a [u8]> {
        let (_, tls) = self.get_mut();
        let mut rest = frames;
        while !rest.is_empty() {
            // The queue holds only frames this server built, so the length
            // is always known; anything else is written as one record.
            let len = match channel::stream_frame(rest) {
                Ok(Some(frame)) => frame.len().min(rest.len()),
                Ok(None) | Err(_) => rest.len(),
            };
            tls.writer().write_all(&rest[..len])?;
            rest = &rest[len..];
        }
        Ok(rest)
    }
}

/// One of the two users of a connection (the reader or the writer of
/// `serve_stream`), on one worker thread. Every poll borrows the stream for
/// its own duration only, so the two never overlap.
pub struct StreamHalf<S>(pub Rc<RefCell<S>>);

impl<S: AsyncRead + Unpin> AsyncRead for StreamHalf<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StreamHalf<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_shutdown(cx)
    }
}
