//! Serving one client connection: the first request head read with its bounds (408, 431);
//! a plain first `CONNECT` answered by the proxy itself ([`super::connect`]); anything else
//! through hyper with the keep-alive timers, each request routed to CONNECT or absolute-form
//! forwarding (or, inside a tunnel, to in-tunnel forwarding).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::connect::FirstClient;
use super::listen::{ConnHandles, Slot, stopped};
use super::respond::{Body, refuse};
use super::state::Shared;
use super::{connect, head, http, keepalive, respond};
use crate::metrics::{Limit, ListenerKind, OpenGuard};

/// Serve one plain-TCP client connection of the forward proxy: a first request that is a
/// plain `CONNECT` is answered directly ([`connect::serve_first`]); anything else goes
/// through hyper ([`serve_requests`]).
pub(super) async fn serve_plain(
    sock: std::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
    open: OpenGuard,
) {
    let mut buf = BytesMut::with_capacity(4096);
    head::read_arrived(&sock, &mut buf);
    if let Some(h) = head::plain_connect(&buf) {
        // The whole head came with the connection: a refusal needs no registration.
        let client = FirstClient::Unregistered(sock);
        let held = (shared, permit, open);
        return connect::serve_first(client, buf, h, peer, held).await;
    }
    let Some(stream) = register(sock, peer, &shared.live()) else {
        return;
    };
    let (stream, buf) = match first_head(stream, buf, peer, &shared).await {
        Some(x) => x,
        None => return,
    };
    match head::plain_connect(&buf) {
        Some(h) => {
            let client = FirstClient::Registered(stream);
            let held = (shared, permit, open);
            connect::serve_first(client, buf, h, peer, held).await
        }
        None => {
            let stream = head::Rewind::new(buf, stream);
            // Boxed, so that a CONNECT's task does not carry hyper's state.
            let requests = Box::pin(serve_requests(stream, peer, shared, Some(permit), route));
            requests.await
        }
    }
}

/// Register a client socket with the worker's runtime, to wait on it. A failure (out of
/// memory, or of epoll watches) closes the connection and is logged (rate-limited).
pub(super) fn register(
    sock: std::net::TcpStream,
    peer: SocketAddr,
    live: &super::Live,
) -> Option<TcpStream> {
    match TcpStream::from_std(sock) {
        Ok(s) => Some(s),
        Err(e) => {
            if live.logs.line() {
                tracing::error!(client = %peer, error = %e, "cannot watch a client connection; closed (raise fs.epoll.max_user_watches or lower proxy.max_connections)");
            }
            None
        }
    }
}

/// Serve one client connection: its first request head read with the proxy's bounds
/// (408, 431), then its requests answered by `handle`.
pub(super) async fn serve_connection<S, H, F>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>, SocketAddr, Arc<Shared>) -> F + Copy + Send + 'static,
    F: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let Some((stream, prefix)) = first_head(stream, BytesMut::new(), peer, &shared).await else {
        return;
    };
    serve_requests(
        head::Rewind::new(prefix, stream),
        peer,
        shared,
        Some(permit),
        handle,
    )
    .await;
}

/// Read a connection's first request head (after what `buf` holds) with the proxy's bounds;
/// a slow client gets `408`, an oversized head `431`, and `None` comes back.
async fn first_head<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    buf: BytesMut,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<(S, BytesMut)> {
    let live = shared.live();
    let cfg = &live.config;
    let read = head::read_head(&mut stream, buf, cfg.max_header_bytes, cfg.header_timeout).await;
    match read {
        Ok(p) => Some((stream, p)),
        Err(head::HeadError::Timeout) => {
            if live.limit_hit(Limit::HeaderTimeout) {
                tracing::warn!(client = %peer, reason = "header_timeout", "request head not received in time; answered 408");
            }
            refuse_raw(stream, respond::request_timeout()).await;
            None
        }
        Err(head::HeadError::TooLarge) => {
            if live.limit_hit(Limit::HeaderSize) {
                tracing::warn!(client = %peer, reason = "header_too_large", "request head larger than proxy.max_header_bytes; answered 431");
            }
            let body = respond::raw(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head too large",
                "http_request_error",
                "header_too_large",
                "the request head is larger than proxy.max_header_bytes",
            );
            refuse_raw(stream, &body).await;
            None
        }
        Err(_) => None,
    }
}

/// Serve HTTP/1 requests on a client stream until it closes or shutdown closes it, with
/// the keep-alive timers of [`keepalive`]; `handle` answers each request (at the proxy
/// itself, or inside a tunnel). `permit` is the connection's place under
/// `proxy.max_connections`, handed on to tunnels.
pub(crate) async fn serve_requests<S, H, F>(
    stream: head::Rewind<S>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Option<Arc<Slot>>,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>, SocketAddr, Arc<Shared>) -> F + Copy + Send + 'static,
    F: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let live = shared.live();
    let cfg = &live.config;
    let turn = Arc::new(keepalive::Turn::default());
    let io = TokioIo::new(keepalive::Watched::new(
        stream,
        turn.clone(),
        cfg.header_timeout,
        cfg.idle_timeout,
        respond::request_timeout(),
    ));
    let svc_shared = shared.clone();
    let idle = cfg.idle_timeout;
    let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let shared = svc_shared.clone();
        let turn = turn.clone();
        turn.begin();
        if let Some(slot) = &permit {
            req.extensions_mut().insert(ConnHandles {
                slot: slot.clone(),
                turn: turn.clone(),
            });
        }
        async move {
            let resp = handle(req, peer, shared).await;
            Ok::<_, std::convert::Infallible>(resp.map(|b| turn.wrap(b, idle)))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(None) // see keepalive: ours answers 408
        .max_buf_size(cfg.max_header_bytes.max(8192))
        // Our byte limit is the only limit on a head: room for as many fields as fit.
        .max_headers(cfg.max_header_bytes / 4)
        .keep_alive(true);
    let (metrics, logs) = (live.metrics.clone(), live.logs.clone());
    drop(live);
    let conn = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    let mut stopping = shared.stopping.clone();
    tokio::select! {
        done = conn.as_mut() => {
            let hit = match &done {
                Err(e) if keepalive::is_head_timeout(e) => Some((
                    Limit::HeaderTimeout,
                    "a later request head on a keep-alive connection was not completed in time; answered 408",
                )),
                Err(e) if e.is_parse_too_large() => Some((
                    Limit::HeaderSize,
                    "a later request head was larger than proxy.max_header_bytes; answered 431",
                )),
                _ => None,
            };
            if let Some((which, what)) = hit {
                metrics.limit(which);
                if logs.line() {
                    tracing::warn!(client = %peer, reason = which.as_str(), "{what}");
                }
            }
        }
        _ = stopped(&mut stopping) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shared.tracker.closed() => {}
            }
        }
    }
}

/// Write a raw refusal, then read and discard what the client is still sending (bounded in
/// bytes and time) before closing, so that the kernel does not reset the connection and
/// destroy the answer before the client reads it.
async fn refuse_raw<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, body: &[u8]) {
    use tokio::io::AsyncReadExt;
    if stream.write_all(body).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = vec![0u8; 8192]; // not on the stack: it would size every connection's task
    let mut left = 256 * 1024usize;
    let drain = async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

pub(super) async fn route(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> hyper::Response<Body> {
    let live = shared.live();
    let start = std::time::Instant::now();
    if req.method() == Method::CONNECT {
        let mut resp = connect::handle(req, peer, live.clone(), shared).await;
        live.metrics
            .request_duration(ListenerKind::Connect, start.elapsed());
        if !resp.status().is_success() {
            // Bytes the client sent behind its CONNECT were meant for the tunnel it expected;
            // after a refusal they must not be read as a request: answer and close.
            resp.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        return resp;
    }
    match req.uri().scheme_str() {
        Some("http") => {
            let resp = http::forward(req, peer, live.clone()).await;
            live.metrics
                .request_duration(ListenerKind::Http, start.elapsed());
            resp
        }
        Some("https") => refuse(
            StatusCode::BAD_REQUEST,
            "http_request_error",
            "https_absolute_form",
            (None, "https URLs go through CONNECT"),
            "aml-egress tunnels TLS with CONNECT: use this proxy as HTTPS_PROXY (https://host URLs are then sent as CONNECT host:443)",
        ),
        _ => refuse(
            StatusCode::BAD_REQUEST,
            "http_request_error",
            "not_a_proxy_request",
            (None, "not a proxy request"),
            "aml-egress is a forwarding proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port, for example by setting HTTP_PROXY and HTTPS_PROXY to http://<this proxy>:3128",
        ),
    }
}
