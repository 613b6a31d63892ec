//! Moving a tunnel's bytes both ways until either side is done or the tunnel sits idle:
//! zero-copy `splice(2)` through a pipe when both sides are plain TCP sockets (the common
//! case), a buffered copy otherwise (clients on a TLS listener).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// When each direction last moved bytes, shared by both, so that a tunnel busy one way is
/// not closed for being quiet the other way.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    idle: Duration,
}

impl Activity {
    fn new(idle: Duration) -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            idle,
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether neither direction has moved bytes for the idle timeout.
    fn expired(&self) -> bool {
        let quiet = self.start.elapsed().as_millis() as u64 - self.last_ms.load(Ordering::Relaxed);
        quiet >= self.idle.as_millis() as u64
    }
}

/// Copy both ways with buffers until both directions end. Returns bytes a→b and b→a.
pub async fn copy_both<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new(idle);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::join!(
        copy_one(&mut ar, &mut bw, &activity),
        copy_one(&mut br, &mut aw, &activity)
    )
}

async fn copy_one<R, W>(r: &mut R, w: &mut W, activity: &Activity) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match tokio::time::timeout(activity.idle, r.read(&mut buf)).await {
            Err(_) if activity.expired() => break,
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                total += n as u64;
                activity.touch();
            }
        }
    }
    let _ = w.shutdown().await;
    total
}

/// Splice both ways between two TCP sockets until both directions end. Falls back to
/// [`copy_both`] when the kernel gives no pipe (out of descriptors).
pub async fn splice_both(a: TcpStream, b: TcpStream, idle: Duration) -> (u64, u64) {
    let (Ok(ab), Ok(ba)) = (Pipe::new(), Pipe::new()) else {
        return copy_both(a, b, idle).await;
    };
    let activity = Activity::new(idle);
    tokio::join!(
        splice_one(&a, &b, ab, &activity),
        splice_one(&b, &a, ba, &activity)
    )
}

struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A larger pipe moves more per system call; the default (64 KiB) still works.
        let _ = fcntl_setpipe_size(&write, 1 << 20);
        Ok(Pipe { read, write })
    }
}

const CHUNK: usize = 1 << 20;

async fn splice_one(from: &TcpStream, to: &TcpStream, pipe: Pipe, activity: &Activity) -> u64 {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut total = 0u64;
    'outer: loop {
        // Socket → pipe, waiting for data at most the idle timeout at a time.
        let moved = loop {
            match tokio::time::timeout(activity.idle, from.readable()).await {
                Err(_) if activity.expired() => break 'outer,
                Err(_) => continue,
                Ok(Err(_)) => break 'outer,
                Ok(Ok(())) => {}
            }
            let r = from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.write, None, CHUNK, flags).map_err(io::Error::from)
            });
            match r {
                Ok(0) => break 'outer, // end of stream
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => break 'outer,
            }
        };
        // Pipe → socket, until the pipe is empty.
        let mut left = moved;
        while left > 0 {
            if to.writable().await.is_err() {
                break 'outer;
            }
            let r = to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, to, None, left, flags).map_err(io::Error::from)
            });
            match r {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => break 'outer,
            }
        }
        total += moved as u64;
        activity.touch();
    }
    let _ = rustix::net::shutdown(to, rustix::net::Shutdown::Write);
    total
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
    async fn splice_moves_every_byte_both_ways_and_passes_half_close_on() {
        // client <-> [a | proxy | b] <-> server
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let relay = tokio::spawn(splice_both(a, b, Duration::from_secs(30)));
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
