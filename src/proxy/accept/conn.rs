//! Serving one forward-proxy connection: the first request head read with its bounds (408,
//! 431); a plain first `CONNECT` answered by the proxy itself
//! ([`crate::proxy::connect::open`]); anything else through hyper ([`crate::proxy::serve`]),
//! each request routed to CONNECT or absolute-form forwarding ([`route`]).

use std::sync::Arc;

use bytes::BytesMut;
use hyper::{Method, Request, StatusCode};

use crate::metrics::{ListenerKind, OpenGuard};
use crate::proxy::addr::ClientAddr;
use crate::proxy::connect::open;
use crate::proxy::connect::open::FirstClient;
use crate::proxy::forward::http;
use crate::proxy::head;
use crate::proxy::plumbing::{Slot, register};
use crate::proxy::respond::{Body, Reply};
use crate::proxy::serve::{first_head, serve_requests};
use crate::proxy::state::Shared;

/// Serve one plain-TCP client connection of the forward proxy: a first request that is a
/// plain `CONNECT` is answered directly ([`open::serve_first`]); anything else goes
/// through hyper ([`serve_requests`]).
pub(crate) async fn serve_plain(
    sock: std::net::TcpStream,
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
    open: OpenGuard,
) {
    let mut buf = BytesMut::with_capacity(4096);
    head::read_arrived(&sock, &mut buf);
    if let Some(h) = head::plain_connect(&buf) {
        // The whole head came with the connection: a refusal needs no registration.
        let first = FirstClient::Unregistered(sock);
        let held = (shared, permit, open);
        return open::serve_first(first, buf, h, client, held).await;
    }
    let Some(stream) = register(sock, client, &shared.live().logs) else {
        return;
    };
    let (stream, buf) = match first_head(stream, buf, client, &shared).await {
        Some(x) => x,
        None => return,
    };
    match head::plain_connect(&buf) {
        Some(h) => {
            let first = FirstClient::Registered(stream);
            let held = (shared, permit, open);
            open::serve_first(first, buf, h, client, held).await
        }
        None => {
            let stream = head::Rewind::new(buf, stream);
            // Boxed, so that a CONNECT's task does not carry hyper's state.
            let requests = Box::pin(serve_requests(stream, client, shared, Some(permit), route));
            requests.await
        }
    }
}

/// The forward proxy's router: `CONNECT` to [`open`], absolute-form `http://` to
/// [`http`], anything else `400`.
pub(crate) async fn route(
    req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    shared: Arc<Shared>,
) -> hyper::Response<Body> {
    let live = shared.live();
    let start = std::time::Instant::now();
    if req.method() == Method::CONNECT {
        let mut resp = open::handle(req, client, live.clone(), shared).await;
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
            let resp = http::forward(req, client, live.clone()).await;
            live.metrics
                .request_duration(ListenerKind::Http, start.elapsed());
            resp
        }
        Some("https") => Reply::new(
            StatusCode::BAD_REQUEST,
            "http_request_error",
            "https_absolute_form",
            (None, "https URLs go through CONNECT"),
            "aml-egress tunnels TLS with CONNECT: use this proxy as HTTPS_PROXY (https://host URLs are then sent as CONNECT host:443)".to_owned(),
        )
        .into_response(),
        _ => Reply::new(
            StatusCode::BAD_REQUEST,
            "http_request_error",
            "not_a_proxy_request",
            (None, "not a proxy request"),
            "aml-egress is a forwarding proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port, for example by setting HTTP_PROXY and HTTPS_PROXY to http://<this proxy>:3128".to_owned(),
        )
        .into_response(),
    }
}
