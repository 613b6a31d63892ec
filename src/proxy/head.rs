//! The first request head of a connection, read by us with a size and time bound so that a
//! slow client gets `408` and an oversized head `431`; then either taken as a plain
//! `CONNECT` the proxy answers itself ([`plain_connect`]) or replayed into hyper.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How many fields a head may have: one per 64 bytes of `proxy.max_header_bytes` (256 at
/// the default 16 KiB; Apache's default is 100, and clients send a few dozen). hyper sizes
/// two arrays by this for every head it parses, so a count sized for the byte limit's
/// smallest fields (one per 4 bytes) cost a fifth of an inspected keep-alive request's CPU.
pub fn max_fields(max_header_bytes: usize) -> usize {
    (max_header_bytes / 64).max(100)
}

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
/// `limit` bytes and `timeout` in total, after what `buf` already holds. Whatever arrived
/// after the head stays in the buffer. No timer is armed when the head is already there.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    limit: usize,
    timeout: Duration,
) -> Result<BytesMut, HeadError> {
    if ends_head(&buf) {
        return Ok(buf);
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut scanned = buf.len();
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

/// Read what has already arrived on a just-accepted connection into `buf`, without
/// waiting: a client's first request is usually there by the time it is accepted, and the
/// runtime would only try to read it after a trip through epoll. `None`: nothing yet.
pub fn read_arrived(stream: impl std::os::fd::AsFd, buf: &mut BytesMut) -> Option<usize> {
    let old = buf.len();
    buf.resize(old + 4096, 0);
    let got = rustix::net::recv(stream, &mut buf[old..], rustix::net::RecvFlags::empty());
    let n = got.map_or(0, |(n, _)| n);
    buf.truncate(old + n);
    // A closed or failed connection is left for the reads that follow to find.
    (n > 0).then_some(n)
}

/// A first request head that is a `CONNECT` the proxy answers itself, without hyper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectHead {
    /// Where the request target (`host:port`) is in the buffer.
    pub target: std::ops::Range<usize>,
    /// The length of the head; the tunnel's first bytes follow it.
    pub len: usize,
}

/// The head at the start of `buf` when it is a `CONNECT` that needs no HTTP machinery:
/// HTTP/1.1, a request target in authority form (RFC 9112 §3.2.3) that hyper would read
/// the same way, at most 32 fields, none of them `Content-Length` or `Transfer-Encoding`
/// (a CONNECT has no content, RFC 9110 §9.3.6). Anything else is `None`, and hyper parses
/// and answers it as any request.
pub fn plain_connect(buf: &[u8]) -> Option<ConnectHead> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if req.method != Some("CONNECT") || req.version != Some(1) {
        return None;
    }
    let framed = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-length")
            || h.name.eq_ignore_ascii_case("transfer-encoding")
    });
    let target = req.path?;
    if framed || hyper::http::uri::Authority::try_from(target).is_err() {
        return None;
    }
    let at = target.as_ptr() as usize - buf.as_ptr() as usize;
    Some(ConnectHead {
        target: at..at + target.len(),
        len,
    })
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
