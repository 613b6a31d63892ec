//! Serving HTTP/1 requests on a client stream with the proxy's bounds: the first request
//! head read within `proxy.header_timeout_secs` and `proxy.max_header_bytes` (408, 431),
//! then hyper with the keep-alive timers of [`super::keepalive`], each request answered by
//! a handler the caller gives (the forward proxy's router, in-tunnel or transparent
//! forwarding). Shared by every way into the proxy that speaks HTTP.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::addr::ClientAddr;
use super::head;
use super::keepalive;
use super::plumbing::{ConnHandles, Slot, stopped};
use super::respond;
use super::respond::{Body, Reply};
use super::state::Shared;
use crate::metrics::Limit;

/// Serve one client connection: its first request head read with the proxy's bounds
/// (408, 431), then its requests answered by `handle`.
pub(crate) async fn serve_connection<S, H, F>(
    stream: S,
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>, ClientAddr, Arc<Shared>) -> F + Copy + Send + 'static,
    F: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let Some((stream, prefix)) = first_head(stream, BytesMut::new(), client, &shared).await else {
        return;
    };
    serve_requests(
        head::Rewind::new(prefix, stream),
        client,
        shared,
        Some(permit),
        handle,
    )
    .await;
}

/// Read a connection's first request head (after what `buf` holds) with the proxy's bounds;
/// a slow client gets `408`, an oversized head `431`, and `None` comes back.
pub(crate) async fn first_head<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    buf: BytesMut,
    client: ClientAddr,
    shared: &Shared,
) -> Option<(S, BytesMut)> {
    let live = shared.live();
    let cfg = &live.config;
    let read = head::read_head(&mut stream, buf, cfg.max_header_bytes, cfg.header_timeout).await;
    match read {
        Ok(p) => Some((stream, p)),
        Err(head::HeadError::Timeout) => {
            if live.limit_hit(Limit::HeaderTimeout) {
                tracing::warn!(client = %client, reason = "header_timeout", "request head not received in time; answered 408");
            }
            refuse_raw(stream, &respond::request_timeout()).await;
            None
        }
        Err(head::HeadError::TooLarge) => {
            if live.limit_hit(Limit::HeaderSize) {
                tracing::warn!(client = %client, reason = "header_too_large", "request head larger than proxy.max_header_bytes; answered 431");
            }
            let reply = Reply::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "http_request_error",
                "header_too_large",
                (None, "request head too large"),
                "the request head is larger than proxy.max_header_bytes".to_owned(),
            );
            refuse_raw(stream, &reply.closing_bytes()).await;
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
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Option<Arc<Slot>>,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>, ClientAddr, Arc<Shared>) -> F + Copy + Send + 'static,
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
        respond::request_timeout,
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
                tracker: shared.tracker.clone(),
            });
        }
        async move {
            let resp = handle(req, client, shared).await;
            Ok::<_, std::convert::Infallible>(resp.map(|b| turn.wrap(b, idle)))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(None) // see keepalive: ours answers 408
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_headers(head::max_fields(cfg.max_header_bytes))
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
                    "a later request head was larger than proxy.max_header_bytes (or had more than one field per 64 of its bytes); answered 431",
                )),
                _ => None,
            };
            if let Some((which, what)) = hit {
                metrics.limit(which);
                if logs.line() {
                    tracing::warn!(client = %client, reason = which.as_str(), "{what}");
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

/// HTTP/2 on `stream` (an inspected session whose client chose `h2` by ALPN): each request
/// stream handed to `handle`, as [`serve_requests`] does for HTTP/1. At most 100 streams
/// at once, header lists within `proxy.max_header_bytes`; closed gracefully (`GOAWAY`) at
/// shutdown or when no byte has moved either way for `proxy.idle_timeout_secs`, and
/// dropped if its streams are still open one more idle timeout later.
pub(crate) async fn serve_h2_requests<S, H, F>(
    stream: S,
    client: ClientAddr,
    shared: Arc<Shared>,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>, ClientAddr, Arc<Shared>) -> F + Copy + Send + 'static,
    F: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let (max_header, idle) = {
        let live = shared.live();
        (live.config.max_header_bytes, live.config.idle_timeout)
    };
    let activity = Arc::new(super::activity::Activity::new());
    let stream = super::activity::Touching::new(stream, activity.clone());
    let svc_shared = shared.clone();
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let shared = svc_shared.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, client, shared).await) }
    });
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX));
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut stopping = shared.stopping.clone();
    let quiet = async {
        loop {
            let q = activity.quiet_for();
            if q >= idle {
                return;
            }
            tokio::time::sleep(idle - q).await;
        }
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = quiet => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(idle, conn.as_mut()).await;
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
