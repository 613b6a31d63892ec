//! Moving a tunnel's bytes both ways until either side is done or the tunnel sits idle.
//! Between plain TCP sockets (the common case): small reads copied through the worker's
//! buffer, bulk with zero-copy `splice(2)` through a pooled pipe; a buffered copy otherwise
//! (clients on a TLS listener).

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::IntCounter;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::proxy::activity::Activity;

/// Where each direction's bytes are counted as they move (the tunnel-bytes metric).
#[derive(Clone, Copy)]
pub struct Counters<'a> {
    /// Client to upstream.
    pub up: &'a IntCounter,
    /// Upstream to client.
    pub down: &'a IntCounter,
}

/// A tunnel's activity, shared by both directions so that a tunnel busy one way is not
/// closed for being quiet the other way, and its idle timeout.
struct Idle {
    activity: Activity,
    limit: Duration,
}

impl Idle {
    fn new(limit: Duration) -> Self {
        Idle {
            activity: Activity::new(),
            limit,
        }
    }

    fn touch(&self) {
        self.activity.touch();
    }

    /// Whether neither direction has moved bytes for the idle timeout.
    fn expired(&self) -> bool {
        self.activity.quiet_for() >= self.limit
    }
}

/// Copy both ways with buffers until both directions end. Returns bytes a→b and b→a.
pub async fn copy_both<A, B>(a: A, b: B, idle: Duration, counters: Counters<'_>) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Idle::new(idle);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::join!(
        copy_one(&mut ar, &mut bw, &activity, counters.up),
        copy_one(&mut br, &mut aw, &activity, counters.down)
    )
}

async fn copy_one<R, W>(r: &mut R, w: &mut W, activity: &Idle, counter: &IntCounter) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match tokio::time::timeout(activity.limit, r.read(&mut buf)).await {
            Err(_) if activity.expired() => break,
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                // Counted before they are passed on: never behind what a peer has seen.
                counter.inc_by(n as u64);
                // A peer that stops reading for the idle timeout ends the tunnel too.
                match tokio::time::timeout(activity.limit, w.write_all(&buf[..n])).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
                total += n as u64;
                activity.touch();
            }
        }
    }
    // Passing the end on can itself wait on a peer that does not read (a TLS client).
    let _ = tokio::time::timeout(activity.limit, w.shutdown()).await;
    total
}

/// Relay both ways between two TCP sockets until both directions end. Each direction
/// copies through its worker's shared buffer while its reads are small (a TLS handshake, a
/// request and its answer: one read and one write each, no pipe), and switches to zero-copy
/// `splice(2)` once a read fills that buffer (a download), through a pipe borrowed from its
/// worker for each round; if the kernel gives no pipe (out of descriptors) it copies
/// through a buffer of its own. An idle tunnel holds neither pipe nor buffer.
pub async fn splice_both(
    a: TcpStream,
    b: TcpStream,
    idle: Duration,
    counters: Counters<'_>,
) -> (u64, u64) {
    let activity = Idle::new(idle);
    tokio::join!(
        splice_one(&a, &b, &activity, counters.up),
        splice_one(&b, &a, &activity, counters.down)
    )
}

/// How one direction moves bytes.
enum Mover {
    /// Through the worker's shared buffer ([`copy_small`]).
    Small,
    /// Through a pipe of the worker's ([`Pipe::take`]).
    Splice,
    Buffer(Vec<u8>),
}

struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    /// It got the size asked for.
    full: bool,
}

/// Empty pipes the process keeps for the next splice rounds, across all workers: 16 of
/// 1 MiB are 4,096 pages, a quarter of the kernel's default per-user budget for pipe
/// buffers (`fs.pipe-user-pages-soft`, 16,384 pages).
const SPARE_PIPES: usize = 16;

/// Spare pipes kept now, across all workers.
static SPARES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

thread_local! {
    static PIPES: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    /// A pipe for one round: a spare of this worker's, or a new one. A pipe is only busy
    /// while a round's bytes are in it, so a worker needs as many as it has rounds waiting
    /// on a slow receiver, not one per tunnel: this keeps the process well under the
    /// kernel's per-user budget for pipe buffers (`fs.pipe-user-pages-soft`), past which
    /// new pipes shrink to two pages.
    fn take() -> io::Result<Pipe> {
        match PIPES.with_borrow_mut(Vec::pop) {
            Some(p) => {
                SPARES.fetch_sub(1, Ordering::Relaxed);
                Ok(p)
            }
            None => Pipe::new(),
        }
    }

    /// Give an emptied pipe back to the worker, if the process keeps fewer than
    /// [`SPARE_PIPES`] and this one got its full size.
    fn give_back(self) {
        let kept = self.full
            && SPARES
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < SPARE_PIPES).then_some(n + 1)
                })
                .is_ok();
        if kept {
            PIPES.with_borrow_mut(|spare| spare.push(self));
        }
    }

    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // 1 MiB: a round moves up to that much per pair of system calls (about twice what
        // a 256 KiB pipe moved in the bench, for a tenth less CPU per GiB relayed), and a
        // direction whose receiver stalls pins at most that. Past the per-user budget the
        // kernel refuses and the pipe keeps a smaller size; it is then not kept.
        let full = fcntl_setpipe_size(&write, CHUNK).is_ok_and(|n| n >= CHUNK);
        Ok(Pipe { read, write, full })
    }
}

const CHUNK: usize = 1 << 20;

/// Bytes one direction moves before it lets its worker's other connections run.
const FAIR_SHARE: usize = 1 << 20;

/// The shared buffer's size: a read that fills it is taken for bulk transfer.
const SMALL: usize = 16 * 1024;

thread_local! {
    /// One copy buffer per worker thread, used only between a read and a write that
    /// completes at once; never held across an await.
    static SHARED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; SMALL]);
}

async fn splice_one(
    from: &TcpStream,
    to: &TcpStream,
    activity: &Idle,
    counter: &IntCounter,
) -> u64 {
    let mut mover = Mover::Small;
    let mut total = 0u64;
    let mut since_yield = 0usize;
    loop {
        // Wait for data, at most the idle timeout at a time.
        match tokio::time::timeout(activity.limit, from.readable()).await {
            Err(_) if activity.expired() => break,
            Err(_) => continue,
            Ok(Err(_)) => break,
            Ok(Ok(())) => {}
        }
        let pipe = match mover {
            Mover::Splice => match Pipe::take() {
                Ok(p) => Some(p),
                Err(_) => {
                    mover = Mover::Buffer(vec![0u8; 64 * 1024]);
                    None
                }
            },
            _ => None,
        };
        // The read side never waits here; the bound is on a peer that stops reading.
        let round = async {
            match (&mut mover, &pipe) {
                (_, Some(pipe)) => splice_once(from, to, pipe, counter).await,
                (Mover::Buffer(buf), None) => copy_once(from, to, buf, counter).await,
                (_, None) => copy_small(from, to, counter).await,
            }
        };
        let Ok(moved) = tokio::time::timeout(activity.limit, round).await else {
            break;
        };
        if let (Some(p), Ok(_)) = (pipe, &moved) {
            p.give_back(); // a finished round leaves its pipe empty
        }
        match moved {
            Ok(Some(0)) | Err(_) => break, // end of stream, or a side failed
            Ok(None) => continue,          // readiness was spurious
            Ok(Some(n)) => {
                total += n as u64; // counted by the round, before it wrote them
                activity.touch();
                if n == SMALL && matches!(mover, Mover::Small) {
                    mover = Mover::Splice;
                }
                // A worker serves many connections on one thread: after each MiB, let the
                // others run (a stream of data is otherwise always ready to move more).
                since_yield += n;
                if since_yield >= FAIR_SHARE {
                    since_yield = 0;
                    tokio::task::yield_now().await;
                }
            }
        }
    }
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    total
}

/// One read into the worker's shared buffer and its write; what the peer does not take at
/// once is kept in a buffer of this round's own until it is written. `None` when there was
/// nothing to read after all.
async fn copy_small(
    from: &TcpStream,
    to: &TcpStream,
    counter: &IntCounter,
) -> io::Result<Option<usize>> {
    enum Round {
        Nothing,
        Written(usize),
        /// Read this many; these bytes still to write.
        Partly(usize, Vec<u8>),
    }
    let round = SHARED.with_borrow_mut(|buf| -> io::Result<Round> {
        let n = match from.try_read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Round::Nothing),
            Err(e) => return Err(e),
        };
        counter.inc_by(n as u64); // before they are passed on
        let sent = match to.try_write(&buf[..n]) {
            _ if n == 0 => 0,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        Ok(match sent == n {
            true => Round::Written(n),
            false => Round::Partly(n, buf[sent..n].to_vec()),
        })
    })?;
    match round {
        Round::Nothing => Ok(None),
        Round::Written(n) => Ok(Some(n)),
        Round::Partly(n, rest) => {
            write_when_ready(to, &rest).await?;
            Ok(Some(n))
        }
    }
}

/// One socket → pipe → socket round; `None` when there was nothing to read after all. The
/// bytes are counted in `counter` once in the pipe, before any of them is passed on.
async fn splice_once(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &IntCounter,
) -> io::Result<Option<usize>> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let r = from.try_io(Interest::READABLE, || {
        splice(from, None, &pipe.write, None, CHUNK, flags).map_err(io::Error::from)
    });
    let moved = match r {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    counter.inc_by(moved as u64);
    let mut left = moved;
    while left > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(&pipe.read, None, to, None, left, flags).map_err(io::Error::from)
        }) {
            Ok(n) => left -= n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Some(moved))
}

/// The same round through a buffer.
async fn copy_once(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut [u8],
    counter: &IntCounter,
) -> io::Result<Option<usize>> {
    let n = match from.try_read(buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    counter.inc_by(n as u64);
    write_when_ready(to, &buf[..n]).await?;
    Ok(Some(n))
}

/// Write all of `bytes`, waiting for the socket to be writable as often as it takes.
async fn write_when_ready(to: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        to.writable().await?;
        match to.try_write(&bytes[sent..]) {
            Ok(k) => sent += k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn the_buffer_fallback_moves_bytes_too() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        client.write_all(b"through a buffer").await.unwrap();
        client.shutdown().await.unwrap();
        let mut buf = vec![0u8; 4];
        let mut n = 0;
        let counter = IntCounter::new("relayed", "bytes").unwrap();
        loop {
            a.readable().await.unwrap();
            match copy_once(&a, &b, &mut buf, &counter).await.unwrap() {
                Some(0) => break,
                Some(k) => n += k,
                None => {}
            }
        }
        drop(b);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"through a buffer");
        assert_eq!(counter.get(), n as u64);
        assert_eq!(n, 16);
    }

    #[tokio::test]
    async fn splice_moves_every_byte_both_ways_and_passes_half_close_on() {
        // client <-> [a | proxy | b] <-> server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(async move {
            let up = IntCounter::new("u", "u").unwrap();
            let down = IntCounter::new("d", "d").unwrap();
            let counters = Counters {
                up: &up,
                down: &down,
            };
            let moved = splice_both(a, b, Duration::from_secs(30), counters).await;
            assert_eq!((up.get(), down.get()), moved);
            moved
        });
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7) as u8).collect();
        let down: Vec<u8> = (0..2_000_000u32).map(|i| (i * 13) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let c = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap(); // ends: the client's half-close passed on
        assert!(got == up);
        server.write_all(&down2).await.unwrap();
        server.shutdown().await.unwrap();
        assert!(c.await.unwrap() == down);
        assert_eq!(relay.await.unwrap(), (up.len() as u64, down.len() as u64));
    }
}
