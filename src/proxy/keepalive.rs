//! Between requests on a keep-alive client connection. hyper's own header timeout closes
//! a connection without an answer, so the proxy keeps the time itself: a client that has
//! begun a request head and not finished it within `proxy.header_timeout_secs` gets `408`
//! and is closed; one that sends nothing for `proxy.idle_timeout_secs` is closed quietly.
//! (The first head of a connection is read before hyper sees it; see [`super::head`].)

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::respond::{Body, BodyError};

/// Whether the connection is serving a request (from its head to the end of its response).
#[derive(Debug, Default)]
pub struct Turn {
    busy: AtomicBool,
    /// Requests begun so far: a head timer armed before the latest one is stale.
    begun: AtomicU64,
    /// The connection became a tunnel: reads and writes pass straight through.
    detached: AtomicBool,
    /// The reader parked while busy, woken when the turn ends so that it arms its timer.
    reader: Mutex<Option<Waker>>,
}

impl Turn {
    /// A request head has been parsed and handed to the proxy.
    pub fn begin(&self) {
        self.begun.fetch_add(1, Ordering::AcqRel);
        self.busy.store(true, Ordering::Release);
    }

    /// Wrap a response body so that the turn ends when the body has been sent (or dropped),
    /// and so that a body whose source sends nothing for `idle` ends in an error (the
    /// client then sees an incomplete response, not a truncated one that looks whole).
    pub fn wrap(self: &Arc<Self>, body: Body, idle: Duration) -> Body {
        use http_body_util::BodyExt;
        TurnBody {
            inner: body,
            turn: self.clone(),
            idle,
            stall: None,
        }
        .boxed()
    }

    /// The connection is now a tunnel (its CONNECT was answered and upgraded).
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Release);
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }
}

struct TurnBody {
    inner: Body,
    turn: Arc<Turn>,
    idle: Duration,
    stall: Option<Pin<Box<Sleep>>>,
}

impl Drop for TurnBody {
    fn drop(&mut self) {
        self.turn.busy.store(false, Ordering::Release);
        let parked = self
            .turn
            .reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(w) = parked {
            w.wake();
        }
    }
}

impl HttpBody for TurnBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                let idle = this.idle;
                let stall = this
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if stall.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(
                        "the upstream sent nothing for proxy.idle_timeout_secs".into(),
                    )));
                }
                Poll::Pending
            }
            ready => {
                this.stall = None;
                ready
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error that ends a connection whose later request head stalled (after our 408),
/// told apart from other timeouts by its type.
#[derive(Debug)]
struct HeadTimeout;

impl std::fmt::Display for HeadTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request head not completed within proxy.header_timeout_secs")
    }
}

impl std::error::Error for HeadTimeout {}

/// Whether a connection ended because a later request head stalled (our 408).
pub fn is_head_timeout(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return io.get_ref().is_some_and(|inner| inner.is::<HeadTimeout>());
        }
        cur = err.source();
    }
    false
}

/// What the timer is running for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    Nothing,
    Idle,
    Head,
}

/// The client stream as hyper sees it, with the between-requests timers.
pub struct Watched<S> {
    inner: S,
    turn: Arc<Turn>,
    header_timeout: Duration,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
    armed: Armed,
    /// `Turn::begun` when the head timer was armed.
    head_of: u64,
    /// Runs while a write waits on a client that does not read.
    stall: Pin<Box<Sleep>>,
    stalled: bool,
    refusal: fn() -> Vec<u8>,
}

impl<S> Watched<S> {
    /// Watch `inner`; `refusal` gives the raw 408 written when a head stalls.
    pub fn new(
        inner: S,
        turn: Arc<Turn>,
        header_timeout: Duration,
        idle: Duration,
        refusal: fn() -> Vec<u8>,
    ) -> Self {
        Watched {
            inner,
            turn,
            header_timeout,
            idle,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            armed: Armed::Nothing,
            head_of: 0,
            stall: Box::pin(tokio::time::sleep(Duration::ZERO)),
            stalled: false,
            refusal,
        }
    }

    /// The stream, for a tunnel that takes it over.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn arm(&mut self, what: Armed, after: Duration) {
        self.armed = what;
        self.timer.as_mut().reset(Instant::now() + after);
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.turn.detached.load(Ordering::Acquire) {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let busy = this.turn.busy();
        let begun = this.turn.begun.load(Ordering::Acquire);
        if busy || (this.armed == Armed::Head && this.head_of != begun) {
            this.armed = Armed::Nothing; // that head became a request
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before && !busy && this.armed != Armed::Head {
                    // The first bytes of a new request head: it must be complete in time.
                    let t = this.header_timeout;
                    this.arm(Armed::Head, t);
                    this.head_of = begun;
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if busy => {
                *this.turn.reader.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(cx.waker().clone());
                if this.turn.busy() {
                    return Poll::Pending;
                }
                // The turn ended meanwhile: arm the idle timer now.
            }
            Poll::Pending => {}
        }
        if this.armed == Armed::Nothing {
            let t = this.idle;
            this.arm(Armed::Idle, t);
        }
        if this.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        match this.armed {
            Armed::Head => {
                // hyper is waiting for the rest of a head, so it is not writing: answer
                // 408 (best effort, one write) and end the connection.
                let _ = Pin::new(&mut this.inner).poll_write(cx, &(this.refusal)());
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, HeadTimeout)))
            }
            // Quiet for the idle timeout between requests: end of stream.
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    /// A client that stops reading a response for `proxy.idle_timeout_secs` is cut off, so
    /// that it cannot hold its connection (and the upstream's) forever.
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending if !this.turn.detached.load(Ordering::Acquire) => {
                if !this.stalled {
                    this.stalled = true;
                    let deadline = Instant::now() + this.idle;
                    this.stall.as_mut().reset(deadline);
                }
                if this.stall.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client read nothing for proxy.idle_timeout_secs",
                    )));
                }
                Poll::Pending
            }
            other => {
                this.stalled = false;
                other
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
