//! Reading a client's TLS start and following the handshake until the server has committed,
//! for CONNECT tunnels and transparent connections alike. These functions only read, hold
//! and forward; they say why they stopped ([`Unread`]) and leave counting and logging to
//! the caller, which knows what the connection was for.

use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;

use super::sni::{
    ACCESS_DENIED_ALERT, ClientHello, HelloReader, ServerFirst, ServerReader, SniError,
    change_cipher_spec,
};
use crate::proxy::head::Rewind;
use crate::proxy::keepalive::Watched;
use crate::proxy::refusal::Unanswerable;
use crate::reason::ReasonCode;
use std::time::Duration;

/// Most client bytes held while the server's first flight is awaited; past it the client
/// is simply not read (TCP pushes back).
const MAX_HELD: usize = 64 * 1024;

/// Most bytes of what a refused client sent that a log line shows.
pub const MAX_SHOWN: usize = 256;

/// Why reading or following stopped short.
#[derive(Debug)]
pub(crate) enum Unread {
    /// One side went away or fell silent: nothing to count beyond what was decided.
    Gone,
    /// Refused for what the client sent (`tls_hello_invalid`, `tls_hello_timeout`,
    /// `sni_changed_after_retry`, `tunnel_protocol_not_allowed`); `seen` is what it sent,
    /// bounded and escaped, for the log line.
    Refused(ReasonCode, String),
}

/// What the client sent, bounded to [`MAX_SHOWN`] bytes and escaped, never raw.
pub(crate) fn shown(bytes: &[u8]) -> String {
    bytes[..bytes.len().min(MAX_SHOWN)]
        .escape_ascii()
        .to_string()
}

/// The client side of a connection: the plain TCP socket (so that the relay can splice),
/// or an upgraded stream (clients on a TLS listener).
pub(crate) enum ClientSide {
    Tcp(TcpStream),
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

impl ClientSide {
    /// Take a CONNECT's stream back from hyper, with the bytes hyper had read past it.
    pub(crate) fn from_upgraded(upgraded: hyper::upgrade::Upgraded) -> (Self, BytesMut) {
        match upgraded.downcast::<TokioIo<Watched<Rewind<TcpStream>>>>() {
            Ok(parts) => {
                let (unread, tcp) = parts.io.into_inner().into_inner().into_parts();
                // What hyper had read comes first; what it had not yet taken from the
                // first head's buffer comes after.
                let mut pending = BytesMut::from(&parts.read_buf[..]);
                pending.extend_from_slice(&unread);
                (ClientSide::Tcp(tcp), pending)
            }
            Err(upgraded) => (
                ClientSide::Upgraded(TokioIo::new(upgraded)),
                BytesMut::new(),
            ),
        }
    }

    pub(crate) async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        buf.reserve(4096);
        match self {
            ClientSide::Tcp(s) => s.read_buf(buf).await,
            ClientSide::Upgraded(s) => s.read_buf(buf).await,
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ClientSide::Tcp(s) => s.write_all(bytes).await,
            ClientSide::Upgraded(s) => s.write_all(bytes).await,
        }
    }
}

/// How a wait for more client bytes ended.
pub(crate) enum Filled {
    More,
    Closed,
    TimedOut,
}

pub(crate) async fn fill(
    client: &mut ClientSide,
    buf: &mut BytesMut,
    deadline: Deadline,
) -> Filled {
    match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Filled::Closed,
        Ok(Ok(_)) => Filled::More,
        Err(_) => Filled::TimedOut,
    }
}

/// Read one ClientHello with `reader` from the client's stream `buf` (bounded in size, and
/// in time by `deadline`).
pub(crate) async fn read_hello(
    client: &mut ClientSide,
    buf: &mut BytesMut,
    mut reader: HelloReader,
    deadline: Deadline,
) -> Result<ClientHello, Unread> {
    loop {
        let refusal = match reader.read(buf) {
            Ok(Some(hello)) => return Ok(hello),
            Ok(None) => match fill(client, buf, deadline).await {
                Filled::More => continue,
                Filled::Closed => return Err(Unread::Gone),
                Filled::TimedOut => ReasonCode::TlsHelloTimeout,
            },
            Err(SniError::NotTls) => ReasonCode::TunnelProtocolNotAllowed,
            Err(e) => {
                tracing::debug!(error = %e, "ClientHello refused");
                ReasonCode::TlsHelloInvalid
            }
        };
        return Err(Unread::Refused(refusal, shown(buf)));
    }
}

/// Give a refused client its answer (an `access_denied` alert if it speaks TLS), then
/// close.
pub(crate) async fn answer(client: &mut ClientSide, answer: Unanswerable) {
    if answer == Unanswerable::Alert {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            client.write_all(&ACCESS_DENIED_ALERT),
        )
        .await;
    }
    linger(client).await;
}

/// Before closing a refused connection, read and drop what the client is still sending
/// (bounded in bytes and time), so that the kernel does not answer it with a reset that
/// destroys the alert before the client reads it.
async fn linger(client: &mut ClientSide) {
    let _ = match client {
        ClientSide::Tcp(s) => s.shutdown().await,
        ClientSide::Upgraded(s) => s.shutdown().await,
    };
    let mut sink = BytesMut::with_capacity(8192);
    let drain = async {
        let mut left = 256 * 1024usize;
        while left > 0 {
            sink.clear();
            match client.read_buf(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// The client's bytes of a TLS connection: those up to `sent` have gone upstream, the rest
/// are held until the server has committed.
pub(crate) struct Held<'a> {
    pub buf: &'a mut BytesMut,
    pub sent: usize,
    /// The client half-closed.
    pub client_done: bool,
    /// Server bytes passed to the client so far.
    pub down: u64,
}

impl<'a> Held<'a> {
    pub(crate) fn new(buf: &'a mut BytesMut) -> Self {
        Held {
            buf,
            sent: 0,
            client_done: false,
            down: 0,
        }
    }

    /// Send the client's bytes up to `end` upstream.
    async fn forward(
        &mut self,
        upstream: &mut TcpStream,
        end: usize,
        idle: Duration,
    ) -> Result<(), Unread> {
        let chunk = &self.buf[self.sent..end];
        match tokio::time::timeout(idle, upstream.write_all(chunk)).await {
            Ok(Ok(())) => {
                self.sent = end;
                Ok(())
            }
            _ => Err(Unread::Gone),
        }
    }

    /// Pass the server's bytes to the client until its handshake message `index` (0 the
    /// first, 1 the one after a HelloRetryRequest) can be told, holding the client's bytes
    /// meanwhile. A half-close from the client carries no bytes and is passed on at once.
    async fn await_server(
        &mut self,
        client: &mut ClientSide,
        upstream: &mut TcpStream,
        server: &mut ServerReader,
        index: usize,
        idle: Duration,
    ) -> Result<ServerFirst, Unread> {
        let mut chunk = vec![0u8; 16 * 1024];
        let deadline = Deadline::now() + idle;
        loop {
            if let Some(first) = server.message(index) {
                return Ok(first);
            }
            let room = !self.client_done && self.buf.len() - self.sent < MAX_HELD;
            tokio::select! {
                r = upstream.read(&mut chunk) => match r {
                    Ok(n) if n > 0 => {
                        let write = client.write_all(&chunk[..n]);
                        if !matches!(tokio::time::timeout(idle, write).await, Ok(Ok(()))) {
                            return Err(Unread::Gone);
                        }
                        server.feed(&chunk[..n]);
                        self.down += n as u64;
                    }
                    _ => return Err(Unread::Gone),
                },
                r = client.read_buf(self.buf), if room => match r {
                    Ok(0) => {
                        self.client_done = true;
                        if self.buf.len() == self.sent {
                            let _ = upstream.shutdown().await;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return Err(Unread::Gone),
                },
                _ = tokio::time::sleep_until(deadline) => return Err(Unread::Gone),
            }
        }
    }

    /// Send the checked `first` hello upstream and follow the handshake until the server
    /// has committed to a hello that was checked: a ServerHello ends it; after a
    /// HelloRetryRequest the client's second hello (one ChangeCipherSpec may come first,
    /// RFC 8446 §D.4) must name the same server.
    pub(crate) async fn follow(
        &mut self,
        client: &mut ClientSide,
        upstream: &mut TcpStream,
        first: &ClientHello,
        idle: Duration,
        hello_timeout: Duration,
    ) -> Result<(), Unread> {
        let mut server = ServerReader::default();
        self.forward(upstream, first.end, idle).await?;
        match self
            .await_server(client, upstream, &mut server, 0, idle)
            .await?
        {
            ServerFirst::ServerHello => Ok(()),
            ServerFirst::HelloRetry => {
                let deadline = Deadline::now() + hello_timeout;
                let start = loop {
                    match change_cipher_spec(self.buf, self.sent) {
                        Ok(Some(n)) => break self.sent + n,
                        Err(_) => {
                            return Err(Unread::Refused(
                                ReasonCode::TlsHelloInvalid,
                                shown(self.buf),
                            ));
                        }
                        Ok(None) => {}
                    }
                    if !matches!(fill(client, self.buf, deadline).await, Filled::More) {
                        return Err(Unread::Refused(
                            ReasonCode::TlsHelloTimeout,
                            shown(self.buf),
                        ));
                    }
                };
                let second = read_hello(client, self.buf, HelloReader::at(start), deadline).await?;
                if second.server_name != first.server_name {
                    let name = second.server_name.map(|n| n.as_str().to_owned());
                    let seen = name.unwrap_or_else(|| "(no server name)".into());
                    return Err(Unread::Refused(ReasonCode::SniChangedAfterRetry, seen));
                }
                // RFC 9849 §6.1.5: the second hello offers ECH exactly when the first did.
                // One that adds it would carry a name that no check saw, in every setting.
                if second.encrypted_client_hello && !first.encrypted_client_hello {
                    let seen = ech_seen(&second);
                    return Err(Unread::Refused(ReasonCode::TlsEchPresent, seen));
                }
                self.forward(upstream, second.end, idle).await?;
                match self
                    .await_server(client, upstream, &mut server, 1, idle)
                    .await?
                {
                    ServerFirst::ServerHello => Ok(()),
                    // A second HelloRetryRequest is a protocol error (RFC 8446 §4.1.4): the
                    // client aborts, and a third hello would go unchecked.
                    _ => Err(Unread::Gone),
                }
            }
            // The server refused the handshake or does not speak TLS: what it sent has
            // reached the client; nothing of the client's goes further.
            ServerFirst::Alert | ServerFirst::Invalid => Err(Unread::Gone),
        }
    }
}

/// What was already exchanged when a connection starts relaying: the client's bytes (those
/// before `sent` have gone upstream), whether it half-closed, and the server's bytes passed.
pub(crate) struct Start {
    pub buf: BytesMut,
    pub sent: usize,
    pub client_done: bool,
    pub down: u64,
}

impl Start {
    /// Nothing exchanged yet but the client's bytes in `buf`.
    pub(crate) fn fresh(buf: BytesMut) -> Self {
        Start {
            buf,
            sent: 0,
            client_done: false,
            down: 0,
        }
    }
}

/// Send what is still held upstream, then relay both ways until either side is done or
/// the connection idles for `idle`; counted in the tunnel-bytes metric. Returns the bytes
/// each way, the held ones and the handshake included.
pub(crate) async fn relay(
    client: ClientSide,
    mut upstream: TcpStream,
    start: Start,
    idle: Duration,
    metrics: &crate::metrics::Metrics,
) -> (u64, u64) {
    // Counted before what is still held is passed on (see the relay's counters).
    let held = start.buf.len();
    metrics.tunnel_up.inc_by(held as u64);
    metrics.tunnel_down.inc_by(start.down);
    let unsent = &start.buf[start.sent..];
    if !unsent.is_empty()
        && !matches!(
            tokio::time::timeout(idle, upstream.write_all(unsent)).await,
            Ok(Ok(()))
        )
    {
        return (start.sent as u64, start.down);
    }
    if start.client_done {
        let _ = upstream.shutdown().await;
    }
    // The head's buffer is not kept for the tunnel's life: only its length is needed.
    drop(start.buf);
    let counters = crate::proxy::relay::Counters {
        up: &metrics.tunnel_up,
        down: &metrics.tunnel_down,
    };
    let (up, down) = match client {
        ClientSide::Tcp(s) => crate::proxy::relay::splice_both(s, upstream, idle, counters).await,
        ClientSide::Upgraded(s) => {
            crate::proxy::relay::copy_both(s, upstream, idle, counters).await
        }
    };
    (up + held as u64, down + start.down)
}

/// What a log line shows of a refused hello that carries an encrypted one: its outer name.
pub(crate) fn ech_seen(hello: &ClientHello) -> String {
    match &hello.server_name {
        Some(n) => format!("{} (outer name of an encrypted client hello)", n.as_str()),
        None => "(no server name; an encrypted client hello)".to_owned(),
    }
}
