//! The pooled keep-alive client: hyper-util's connection pool over our own connector, so
//! that every new upstream connection goes through the same resolve-once, address-guarded
//! dial as a CONNECT tunnel. `http` URIs are plain connections; `https` ones (the requests
//! of inspected tunnels) are TLS, the upstream's certificate verified against the
//! inspection's trust anchors with the URI's host as the name, and HTTP/2 when the upstream
//! chooses `h2` by ALPN.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;

use hyper::Uri;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::net::TcpStream;

use super::activity::Activity;
use super::dial::{DialConfig, DialError, dial};
use crate::metrics::Metrics;
use crate::policy::{InvalidTarget, Target};

/// Dials the pool's new connections. Private ranges are allowed only through the client
/// for allowlisted names, so a connection pooled for one kind never serves the other.
#[derive(Clone)]
pub struct Connector {
    dial: Arc<DialConfig>,
    allowlisted: bool,
    metrics: Arc<Metrics>,
    /// For `https` URIs (inspection on); without it they are refused.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A pooled connection's transport.
enum Transport {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

/// When a pooled connection was dialled, in its connection metadata: a request sent at a
/// later time went over a reused connection (what a retry depends on).
#[derive(Debug, Clone, Copy)]
pub struct DialledAt(pub Instant);

/// An upstream connection of the pool: the socket, when it was dialled, and whether the
/// upstream chose `h2` by ALPN (then hyper speaks HTTP/2 on it and multiplexes requests).
pub struct Pooled {
    io: Transport,
    at: Instant,
    h2: bool,
}

impl Connection for Pooled {
    fn connected(&self) -> Connected {
        let c = match &self.io {
            Transport::Plain(io) => io.connected(),
            Transport::Tls(io) => io.inner().get_ref().0.connected(),
        };
        let c = c.extra(DialledAt(self.at));
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

/// Forward a call to whichever transport a connection has.
macro_rules! transport {
    ($self:ident, $io:ident => $e:expr) => {
        match &mut $self.io {
            Transport::Plain($io) => $e,
            Transport::Tls($io) => $e,
        }
    };
}

impl hyper::rt::Read for Pooled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        transport!(self, io => Pin::new(io).poll_read(cx, buf))
    }
}

impl hyper::rt::Write for Pooled {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        transport!(self, io => Pin::new(io).poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        transport!(self, io => Pin::new(io).poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        transport!(self, io => Pin::new(io).poll_shutdown(cx))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Transport::Plain(io) => io.is_write_vectored(),
            Transport::Tls(io) => io.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        transport!(self, io => Pin::new(io).poll_write_vectored(cx, bufs))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Pooled;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let cfg = self.dial.clone();
        let allowlisted = self.allowlisted;
        let metrics = self.metrics.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let https = uri.scheme_str() == Some("https");
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let target = Target::from_parts(host, port)
                .map_err(|e: InvalidTarget| DialError::Dns(e.to_string()))?;
            let started = std::time::Instant::now();
            let dialled = dial(&target, allowlisted, &cfg).await;
            metrics.dial(dialled.is_ok(), started.elapsed());
            let stream = dialled?.0;
            let mut h2 = false;
            let io = if https {
                let tls = tls.ok_or_else(|| {
                    DialError::Certificate("no TLS configuration for upstreams".into())
                })?;
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                    .map_err(|e| DialError::Certificate(e.to_string()))?;
                let connected = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, stream)
                    .await;
                match connected {
                    Ok(s) => {
                        h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                        Transport::Tls(Box::new(TokioIo::new(s)))
                    }
                    Err(e) => {
                        metrics.inspect_upstream_failures.inc();
                        return Err(DialError::Certificate(e.to_string()));
                    }
                }
            } else {
                Transport::Plain(TokioIo::new(stream))
            };
            Ok(Pooled {
                io,
                at: Instant::now(),
                h2,
            })
        })
    }
}

/// A request body on its way upstream that notes when bytes last went through.
pub struct UploadBody {
    /// `None`: an empty body (a retried request without one).
    inner: Option<Incoming>,
    activity: Arc<Activity>,
}

impl UploadBody {
    pub fn new(inner: Incoming, activity: Arc<Activity>) -> Self {
        UploadBody {
            inner: Some(inner),
            activity,
        }
    }

    /// No body.
    pub fn empty(activity: Arc<Activity>) -> Self {
        UploadBody {
            inner: None,
            activity,
        }
    }
}

impl hyper::body::Body for UploadBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.activity.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => hyper::body::SizeHint::with_exact(0),
        }
    }
}

/// The pools: for names an allow rule matched, and for audit-mode passes; each also in an
/// HTTP/1.1-only variant for WebSocket handshakes, since an upgrade needs HTTP/1.1 and an
/// upstream offered `h2` would choose it.
pub struct Upstream {
    allowlisted: Client<Connector, UploadBody>,
    unlisted: Client<Connector, UploadBody>,
    allowlisted_h1: Client<Connector, UploadBody>,
    unlisted_h1: Client<Connector, UploadBody>,
}

impl Upstream {
    /// Pools whose idle connections close after `idle`; a response head may take up to
    /// `max_head` bytes (`proxy.max_header_bytes`), one field per 64 of them.
    /// `tls` verifies the upstreams of `https` URIs (inspected requests).
    pub fn new(
        dial: Arc<DialConfig>,
        idle: Duration,
        max_head: usize,
        metrics: Arc<Metrics>,
        tls: Option<Arc<ClientConfig>>,
    ) -> Self {
        let h1 = tls.as_ref().map(|c| {
            let mut c = ClientConfig::clone(c);
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        });
        let client = |allowlisted, tls: &Option<Arc<ClientConfig>>| {
            Client::builder(TokioExecutor::new())
                .http1_max_buf_size(max_head.max(8192))
                .http1_max_headers(super::head::max_fields(max_head))
                .http2_max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX))
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(idle)
                .pool_max_idle_per_host(32)
                .set_host(false)
                .build(Connector {
                    dial: dial.clone(),
                    allowlisted,
                    metrics: metrics.clone(),
                    tls: tls.clone(),
                })
        };
        Upstream {
            allowlisted: client(true, &tls),
            unlisted: client(false, &tls),
            allowlisted_h1: client(true, &h1),
            unlisted_h1: client(false, &h1),
        }
    }

    /// The pool for a request whose name an allow rule matched (or not); `upgrade`: one
    /// that asks to switch protocols, which needs an HTTP/1.1 connection.
    pub fn client(&self, allowlisted: bool, upgrade: bool) -> &Client<Connector, UploadBody> {
        match (allowlisted, upgrade) {
            (true, false) => &self.allowlisted,
            (false, false) => &self.unlisted,
            (true, true) => &self.allowlisted_h1,
            (false, true) => &self.unlisted_h1,
        }
    }
}

/// The dial error inside a client error, if the failure was ours.
pub fn dial_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a DialError> {
    causes(e).find_map(|err| err.downcast_ref::<DialError>())
}

/// An error and its sources, outermost first (hyper-util wraps hyper's, which wraps the
/// socket's).
pub fn causes<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |err| err.source())
}
