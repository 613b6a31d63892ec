//! The first request head of a connection, read by us with a size and time bound so that a
//! slow client gets `408` and an oversized head `431`, then replayed into hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Why no request head could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The client sent nothing more and closed.
    Closed,
    /// The head did not arrive in time.
    Timeout,
    /// The head is larger than allowed.
    TooLarge,
    /// A read failed.
    Io(io::Error),
}

/// Read until the end of the first request head (an empty line, its line ends CRLF or a
/// bare LF as RFC 9112 §2.2 lets a recipient accept, as hyper's parser does), within
/// `limit` bytes and `timeout` in total. Whatever arrived after the head stays in the
/// buffer.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    timeout: Duration,
) -> Result<BytesMut, HeadError> {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut scanned = 0usize;
    loop {
        if ends_head(&buf[scanned.saturating_sub(2)..]) {
            return Ok(buf);
        }
        scanned = buf.len();
        if buf.len() >= limit {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(4096.min(limit - buf.len()).max(1));
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Err(_) => return Err(HeadError::Timeout),
            Ok(Ok(0)) => return Err(HeadError::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(HeadError::Io(e)),
        }
    }
}

/// Whether `bytes` hold the end of a head: a line end followed by an empty line
/// (`\n\n` or `\n\r\n`; `\r\n\r\n` contains the latter).
fn ends_head(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && matches!(&bytes[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// A stream that first yields bytes already read from it.
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Rewind { prefix, inner }
    }

    /// The bytes not yet read, and the stream.
    pub fn into_parts(self) -> (BytesMut, S) {
        (self.prefix, self.inner)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
