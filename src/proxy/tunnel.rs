//! An answered CONNECT: every tunnel is inspected by what it carries, and refused when the
//! proxy cannot read it.
//!
//! - Ports in `proxy.opaque_ports` are relayed on the CONNECT's decision alone.
//! - TLS (required on `proxy.tls_ports`, recognised by its first byte elsewhere): one
//!   well-formed ClientHello naming an allowed host; then the client's further bytes are held
//!   until the server's first handshake message is read. A ServerHello commits the
//!   handshake; a HelloRetryRequest means the client's second ClientHello is checked the same
//!   way and must name the same server (RFC 8446 §4.1.4).
//! - HTTP/1 (a request line): every request is decided and forwarded like an absolute-form
//!   request, through the same code ([`super::http`]).
//! - Anything else: refused (`tunnel_protocol_not_allowed`).
//!
//! These refusals come after the `200`, so no status carries them: they are counted, logged
//! (what was seen, bounded and escaped) and, to a TLS client, sent as an `access_denied`
//! alert.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;

use super::detect::{Carried, Detector};
use super::head::Rewind;
use super::keepalive::Watched;
use super::relay;
use super::sni::{
    ACCESS_DENIED_ALERT, ClientHello, HelloReader, ServerFirst, ServerReader, SniError,
    change_cipher_spec,
};
use super::{AllowCount, ConnHandles, Judged, Live, Seen, Shared};
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{Host, Name, PathView, Target};
use crate::reason::ReasonCode;

/// Most client bytes held while the server's first flight is awaited; past it the client
/// is simply not read (TCP pushes back).
const MAX_HELD: usize = 64 * 1024;

/// Most bytes of what a refused client sent that a log line shows.
const MAX_SHOWN: usize = 256;

/// Why a tunnel was refused after its `200`; each is a reason code in the metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Malformed or empty records, records other than handshake before the hello, an
    /// oversize hello, several names, an invalid name.
    HelloInvalid,
    /// No whole ClientHello within `proxy.sni_timeout_secs`.
    HelloTimeout,
    /// The server name is not allowed for the CONNECT port.
    SniNotAllowed,
    /// A well-formed hello without a name, under `proxy.sni_missing = "deny"`.
    NoServerName,
    /// The ClientHello after a HelloRetryRequest named another server.
    SniChangedAfterRetry,
    /// Neither TLS nor HTTP/1 on a port outside `proxy.opaque_ports`.
    ProtocolNotAllowed,
}

impl Refusal {
    /// The reason code.
    pub(crate) fn code(self) -> ReasonCode {
        match self {
            Refusal::HelloInvalid => ReasonCode::TlsHelloInvalid,
            Refusal::HelloTimeout => ReasonCode::TlsHelloTimeout,
            Refusal::SniNotAllowed => ReasonCode::SniNotAllowed,
            Refusal::NoServerName => ReasonCode::NoServerName,
            Refusal::SniChangedAfterRetry => ReasonCode::SniChangedAfterRetry,
            Refusal::ProtocolNotAllowed => ReasonCode::TunnelProtocolNotAllowed,
        }
    }

    /// Whether audit mode lets it pass: policy answers do, what the proxy cannot read
    /// never does.
    fn auditable(self) -> bool {
        matches!(self, Refusal::SniNotAllowed | Refusal::NoServerName)
    }
}

/// The client side of an upgraded CONNECT: the plain TCP socket when hyper hands it back
/// (so that the relay can splice), or the upgraded stream (clients on a TLS listener).
pub(super) enum ClientSide {
    Tcp(TcpStream),
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

impl ClientSide {
    /// Take the stream back from hyper, with the bytes hyper had read past the CONNECT.
    pub(super) fn from_upgraded(upgraded: hyper::upgrade::Upgraded) -> (Self, BytesMut) {
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

    async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
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
enum Filled {
    More,
    Closed,
    TimedOut,
}

async fn fill(client: &mut ClientSide, buf: &mut BytesMut, deadline: Deadline) -> Filled {
    match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Filled::Closed,
        Ok(Ok(_)) => Filled::More,
        Err(_) => Filled::TimedOut,
    }
}

/// How inspection ended short of relaying.
enum Stop {
    /// Refused: counted, logged, and the client told (alert or nothing).
    Refused,
    /// One side went away or fell silent: the CONNECT's own decision stands.
    Gone,
}

/// What an open tunnel needs to know about itself.
pub(super) struct Tunnel {
    pub live: Arc<Live>,
    pub shared: Arc<Shared>,
    pub handles: Option<ConnHandles>,
    pub peer: SocketAddr,
    pub target: Target,
    pub addr: SocketAddr,
    pub started: Instant,
}

impl Tunnel {
    /// Inspect by what the tunnel carries, count the decision if not yet counted, relay.
    pub(super) async fn run(
        &self,
        upgraded: hyper::upgrade::Upgraded,
        mut upstream: TcpStream,
        mut v: Judged,
        mut pending: Option<AllowCount>,
    ) {
        let cfg = &self.live.config;
        let port = self.target.port;
        let (mut client, mut buf) = ClientSide::from_upgraded(upgraded);
        let mut sni = String::new();
        let mut sent = 0;
        let mut client_done = false;
        let mut handshake_down = 0;
        if !cfg.opaque_ports.contains(&port) {
            let deadline = Deadline::now() + cfg.sni_timeout;
            let carried = if cfg.tls_ports.contains(&port) {
                Carried::Tls
            } else {
                match self.detect(&mut client, &mut buf, deadline).await {
                    Ok(c) => c,
                    Err(Stop::Refused) | Err(Stop::Gone) => return,
                }
            };
            match carried {
                Carried::Http => {
                    drop(upstream); // each request goes through the guarded pool instead
                    drop(pending); // the CONNECT itself was allowed
                    self.serve_http(client, buf).await;
                    return;
                }
                Carried::Tls => {
                    let mut held = Held {
                        buf: &mut buf,
                        sent: 0,
                        client_done: false,
                        down: 0,
                    };
                    match self
                        .tls(
                            &mut client,
                            &mut held,
                            &mut upstream,
                            &mut pending,
                            deadline,
                        )
                        .await
                    {
                        Ok((name, audit)) => {
                            sni = name;
                            v.would_deny |= audit;
                            sent = held.sent;
                            client_done = held.client_done;
                            handshake_down = held.down;
                        }
                        Err(_) => return,
                    }
                }
                Carried::Other | Carried::Incomplete => {
                    self.refuse(Refusal::ProtocolNotAllowed, &buf, None, &mut pending);
                    linger(&mut client).await;
                    return;
                }
            }
        }
        drop(pending); // an allow, if nothing else was counted for this request
        let idle = cfg.idle_timeout;
        let unsent = &buf[sent..];
        if !unsent.is_empty() {
            match tokio::time::timeout(idle, upstream.write_all(unsent)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        if client_done {
            let _ = upstream.shutdown().await;
        }
        let metrics = &self.live.metrics;
        metrics.tunnel_up.inc_by(buf.len() as u64);
        metrics.tunnel_down.inc_by(handshake_down);
        let counters = relay::Counters {
            up: &metrics.tunnel_up,
            down: &metrics.tunnel_down,
        };
        let (up, down) = match client {
            ClientSide::Tcp(s) => relay::splice_both(s, upstream, idle, counters).await,
            ClientSide::Upgraded(s) => relay::copy_both(s, upstream, idle, counters).await,
        };
        tracing::info!(
            listener = "connect",
            client = %self.peer,
            target = %self.target,
            upstream = %self.addr,
            sni = %sni,
            decision = if v.would_deny { "would_deny" } else { "allow" },
            rule = %self.live.rule_text(&v.decision),
            mode = cfg.mode.as_str(),
            bytes_up = up + buf.len() as u64,
            bytes_down = down + handshake_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "tunnel closed"
        );
    }

    /// Tell TLS from HTTP/1 from anything else by the first bytes (on ports that are
    /// neither TLS nor opaque).
    async fn detect(
        &self,
        client: &mut ClientSide,
        buf: &mut BytesMut,
        deadline: Deadline,
    ) -> Result<Carried, Stop> {
        let limit = self.live.config.max_header_bytes;
        let mut detector = Detector::default();
        loop {
            match detector.read(buf, limit) {
                Carried::Incomplete => {}
                found => return Ok(found),
            }
            match fill(client, buf, deadline).await {
                Filled::More => {}
                Filled::Closed => return Err(Stop::Gone),
                // Nothing readable in time: a protocol where the server speaks first, or a
                // client that stalls. Neither can be inspected.
                Filled::TimedOut => return Ok(Carried::Other),
            }
        }
    }

    /// Read and judge the ClientHello, and follow the handshake until the server has
    /// committed to a hello that was checked. Returns the server name and whether only
    /// audit mode let it pass.
    async fn tls(
        &self,
        client: &mut ClientSide,
        held: &mut Held<'_>,
        upstream: &mut TcpStream,
        pending: &mut Option<AllowCount>,
        deadline: Deadline,
    ) -> Result<(String, bool), Stop> {
        let first = self
            .read_hello(client, held.buf, HelloReader::default(), deadline, pending)
            .await?;
        let Ok(audit) = self.judge_name(first.server_name, pending) else {
            return Err(self.alert(client).await);
        };
        let idle = self.live.config.idle_timeout;
        let mut server = ServerReader::default();
        held.forward(upstream, first.end, idle).await?;
        match held
            .await_server(client, upstream, &mut server, 0, idle)
            .await?
        {
            ServerFirst::ServerHello => {}
            ServerFirst::HelloRetry => {
                // A ChangeCipherSpec may come first (RFC 8446 §D.4), then the second hello.
                let deadline = Deadline::now() + self.live.config.sni_timeout;
                let start = loop {
                    match change_cipher_spec(held.buf, held.sent) {
                        Ok(Some(n)) => break held.sent + n,
                        Err(_) => {
                            self.refuse(Refusal::HelloInvalid, held.buf, None, pending);
                            return Err(self.alert(client).await);
                        }
                        Ok(None) => {}
                    }
                    if !matches!(fill(client, held.buf, deadline).await, Filled::More) {
                        self.refuse(Refusal::HelloTimeout, held.buf, None, pending);
                        return Err(self.alert(client).await);
                    }
                };
                let second = self
                    .read_hello(client, held.buf, HelloReader::at(start), deadline, pending)
                    .await?;
                if second.server_name != first.server_name {
                    let shown = second.server_name.map(|n| n.as_str().to_owned());
                    let seen = shown.as_deref().unwrap_or("(no server name)");
                    self.refuse(
                        Refusal::SniChangedAfterRetry,
                        seen.as_bytes(),
                        None,
                        pending,
                    );
                    return Err(self.alert(client).await);
                }
                held.forward(upstream, second.end, idle).await?;
                match held
                    .await_server(client, upstream, &mut server, 1, idle)
                    .await?
                {
                    ServerFirst::ServerHello => {}
                    // A second HelloRetryRequest is a protocol error (RFC 8446 §4.1.4): the
                    // client aborts, and a third hello would go unchecked.
                    _ => return Err(Stop::Gone),
                }
            }
            // The server refused the handshake or does not speak TLS: what it sent has
            // reached the client; nothing of the client's goes further.
            ServerFirst::Alert | ServerFirst::Invalid => return Err(Stop::Gone),
        }
        let name = first
            .server_name
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        Ok((name, audit))
    }

    /// Read one ClientHello with `reader` (bounded in size, and in time by `deadline`).
    async fn read_hello(
        &self,
        client: &mut ClientSide,
        buf: &mut BytesMut,
        mut reader: HelloReader,
        deadline: Deadline,
        pending: &mut Option<AllowCount>,
    ) -> Result<ClientHello, Stop> {
        loop {
            let refusal = match reader.read(buf) {
                Ok(Some(hello)) => return Ok(hello),
                Ok(None) => match fill(client, buf, deadline).await {
                    Filled::More => continue,
                    Filled::Closed => return Err(Stop::Gone),
                    Filled::TimedOut => Refusal::HelloTimeout,
                },
                Err(SniError::NotTls) => Refusal::ProtocolNotAllowed,
                Err(e) => {
                    tracing::debug!(client = %self.peer, error = %e, "ClientHello refused");
                    Refusal::HelloInvalid
                }
            };
            self.refuse(refusal, buf, None, pending);
            if refusal == Refusal::ProtocolNotAllowed {
                linger(client).await; // not TLS: an alert would mean nothing to it
                return Err(Stop::Refused);
            }
            return Err(self.alert(client).await);
        }
    }

    /// Judge the hello's server name for the CONNECT port. `Ok(true)`: only audit mode let
    /// it pass.
    fn judge_name(
        &self,
        name: Option<Name>,
        pending: &mut Option<AllowCount>,
    ) -> Result<bool, Stop> {
        let live = &*self.live;
        let (refusal, verdict, by_name) = match (name, self.target.host) {
            // The CONNECT named this host and was decided on it.
            (Some(n), Host::Name(t)) if n == t => return Ok(false),
            (Some(n), _) => {
                let t = Target {
                    host: Host::Name(n),
                    port: self.target.port,
                };
                let v = live.judge(&t, PathView::Hidden);
                if v.decision.is_allowed() {
                    return Ok(false);
                }
                (Refusal::SniNotAllowed, Some(v), Some(t))
            }
            // Clients send no name for an IP address (RFC 6066 §3): the CONNECT's
            // decision on the address stands.
            (None, Host::Ip(_)) => return Ok(false),
            (None, Host::Name(_)) if live.config.sni_missing_allowed => return Ok(false),
            (None, Host::Name(_)) => (Refusal::NoServerName, None, None),
        };
        let shown = by_name.as_ref().map(|t| t.to_string());
        let seen = shown.as_deref().unwrap_or("(no server name)").as_bytes();
        let pass = live.config.mode == super::Mode::Audit && refusal.auditable();
        let rule = verdict
            .map(|v| live.rule_text(&v.decision))
            .unwrap_or_default();
        self.count(refusal, pass, seen, by_name.as_ref(), &rule, pending);
        if pass { Ok(true) } else { Err(Stop::Refused) }
    }

    /// Count, record and log a refusal that audit mode does not pass.
    fn refuse(
        &self,
        refusal: Refusal,
        seen: &[u8],
        by_name: Option<&Target>,
        pending: &mut Option<AllowCount>,
    ) {
        self.count(refusal, false, seen, by_name, "", pending);
    }

    fn count(
        &self,
        refusal: Refusal,
        pass: bool,
        seen: &[u8],
        by_name: Option<&Target>,
        rule: &str,
        pending: &mut Option<AllowCount>,
    ) {
        let what = by_name.unwrap_or(&self.target);
        let label = format!("{what} (inside CONNECT {})", self.target);
        let shown = seen[..seen.len().min(MAX_SHOWN)].escape_ascii().to_string();
        let record = Seen {
            via: ListenerKind::Connect,
            client: self.peer,
            target: Some(what),
            shown: &label,
            seen: &shown,
            outcome: if pass {
                Outcome::WouldDeny
            } else {
                Outcome::Deny
            },
            reason: refusal.code(),
            rule,
        };
        match pending.take() {
            // This refusal is the request's decision.
            Some(p) => {
                p.instead();
                self.live.note(&record);
            }
            // The request was counted already (an audit pass): record and log only.
            None => self.live.record(&record),
        }
    }

    /// Tell a TLS client its tunnel is refused, then close.
    async fn alert(&self, client: &mut ClientSide) -> Stop {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            client.write_all(&ACCESS_DENIED_ALERT),
        )
        .await;
        linger(client).await;
        Stop::Refused
    }
    /// HTTP/1 inside the tunnel: each request decided and forwarded like an absolute-form
    /// one, its `Host` held to the CONNECT target.
    async fn serve_http(&self, client: ClientSide, buf: BytesMut) {
        let slot = self.handles.as_ref().map(|h| h.slot.clone());
        let (peer, shared, target) = (self.peer, self.shared.clone(), self.target);
        let handle = move |req, peer, shared: Arc<Shared>| {
            super::http::forward_in_tunnel(req, peer, shared.live(), target)
        };
        match client {
            ClientSide::Tcp(s) => {
                super::serve_requests(Rewind::new(buf, s), peer, shared, slot, handle).await
            }
            ClientSide::Upgraded(s) => {
                super::serve_requests(Rewind::new(buf, s), peer, shared, slot, handle).await
            }
        }
    }
}

/// Before closing a refused tunnel, read and drop what the client is still sending (bounded
/// in bytes and time), so that the kernel does not answer it with a reset that destroys the
/// alert before the client reads it.
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

/// The client's bytes of a TLS tunnel: those up to `sent` have gone upstream, the rest are
/// held until the server has committed.
struct Held<'a> {
    buf: &'a mut BytesMut,
    sent: usize,
    /// The client half-closed.
    client_done: bool,
    /// Server bytes passed to the client so far.
    down: u64,
}

impl Held<'_> {
    /// Send the client's bytes up to `end` upstream.
    async fn forward(
        &mut self,
        upstream: &mut TcpStream,
        end: usize,
        idle: std::time::Duration,
    ) -> Result<(), Stop> {
        let chunk = &self.buf[self.sent..end];
        match tokio::time::timeout(idle, upstream.write_all(chunk)).await {
            Ok(Ok(())) => {
                self.sent = end;
                Ok(())
            }
            _ => Err(Stop::Gone),
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
        idle: std::time::Duration,
    ) -> Result<ServerFirst, Stop> {
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
                            return Err(Stop::Gone);
                        }
                        server.feed(&chunk[..n]);
                        self.down += n as u64;
                    }
                    _ => return Err(Stop::Gone),
                },
                r = client.read_buf(self.buf), if room => match r {
                    Ok(0) => {
                        self.client_done = true;
                        if self.buf.len() == self.sent {
                            let _ = upstream.shutdown().await;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return Err(Stop::Gone),
                },
                _ = tokio::time::sleep_until(deadline) => return Err(Stop::Gone),
            }
        }
    }
}
