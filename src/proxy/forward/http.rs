//! Absolute-form plain HTTP (`GET http://host/path`): decided on host, port and path,
//! routed by the URI's authority (the `Host` header sent upstream is rewritten to it), with
//! hop-by-hop and `Proxy-*` headers removed and bodies streamed both ways.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::connect::{CaptureConnection, HttpInfo, capture_connection};

use super::host::{self, Named};
use super::upgrade::{self, ClientUpgrade};
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{InvalidTarget, PathView, Reason, Target};
use crate::proxy::activity::Activity;
use crate::proxy::addr::{ClientAddr, OrigDstAddr};
use crate::proxy::pool::{DialledAt, UploadBody, causes, dial_error};
use crate::proxy::refusal::{self, Count, Refusal, Seen, dial_failed, upstream_failed};
use crate::proxy::respond::{Body, BodyError, Reply};
use crate::proxy::state::Live;
use crate::reason::ReasonCode;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Fields with which a client can make a front end that routes on them (a reverse proxy,
/// an application gateway, a CDN) reach another tenant, or another path, behind an allowed
/// name: removed under `proxy.forwarded_headers = "strip"`.
const FORWARDING: [&str; 11] = [
    "forwarded", // RFC 7239
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-proto",
    "x-forwarded-server",
    "x-host",
    "x-original-host",
    "x-original-url",
    "x-rewrite-url",
];

/// Remove the [`FORWARDING`] fields, under their `_` spellings too: CGI-style back ends
/// (WSGI, PHP) read `X_Forwarded_Host` as the same variable as `X-Forwarded-Host`.
fn strip_forwarding(h: &mut HeaderMap) {
    let same = |name: &str, field: &str| {
        name.len() == field.len()
            && name
                .bytes()
                .zip(field.bytes())
                .all(|(n, f)| n == f || (n == b'_' && f == b'-'))
    };
    let found: Vec<HeaderName> = h
        .keys()
        .filter(|k| FORWARDING.iter().any(|f| same(k.as_str(), f)))
        .cloned()
        .collect();
    for n in found {
        h.remove(n);
    }
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // `TE: trailers` says the client takes trailers, which the proxy passes on (gRPC
    // needs it); any other transfer coding it names is hop-by-hop and goes.
    let trailers = h
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"))
        && h.contains_key(header::TE);
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
    let proxy: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for n in proxy {
        h.remove(n);
    }
    if trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

pub(crate) async fn forward(
    req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    live: Arc<Live>,
) -> Response<Body> {
    let started = Instant::now();
    let Some(authority) = req.uri().authority().cloned() else {
        return refusal::invalid(
            &live,
            ListenerKind::Http,
            client,
            "",
            InvalidTarget::EmptyHost,
        )
        .into();
    };
    if authority.as_str().contains('@') {
        return refusal::invalid(
            &live,
            ListenerKind::Http,
            client,
            authority.as_str(),
            InvalidTarget::UserInfo,
        )
        .into();
    }
    let port = match authority.port() {
        Some(_) => match authority.port_u16() {
            Some(p) if p > 0 => p,
            _ => {
                return refusal::invalid(
                    &live,
                    ListenerKind::Http,
                    client,
                    authority.as_str(),
                    InvalidTarget::BadPort,
                )
                .into();
            }
        },
        None => 80,
    };
    let target = match Target::from_parts(authority.host(), port) {
        Ok(t) => t,
        Err(e) => {
            return refusal::invalid(&live, ListenerKind::Http, client, authority.as_str(), e)
                .into();
        }
    };
    send(
        req,
        client,
        live,
        ListenerKind::Http,
        target,
        (Scheme::Http, authority.as_str()),
        started,
    )
    .await
}

/// A request inside a CONNECT tunnel to `tunnel` (RFC 9112 §3.2: origin form, or absolute
/// form, whose authority then wins over `Host`): the host it names must be the tunnel's,
/// and a port it names the tunnel's port. HTTP/1.0 without `Host` means the tunnel's host.
pub(crate) async fn forward_in_tunnel(
    req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    live: Arc<Live>,
    tunnel: Target,
) -> Response<Body> {
    let started = Instant::now();
    let named = named_bytes(&req);
    let same = match (req.method(), host::named(named, tunnel.port)) {
        (&hyper::Method::CONNECT, _) => false,
        (_, Named::Host(t)) => t == tunnel,
        (_, Named::Absent) => named.is_none() && req.version() == hyper::Version::HTTP_10,
        _ => false,
    };
    if !same {
        let seen = named_text(&req);
        let message = format!(
            "aml-egress refused a request inside the tunnel to {tunnel}: it names {seen:?}, not the tunnel's host (and port); send requests for other hosts through their own CONNECT or as absolute-form requests"
        );
        return host_mismatch(&live, client, tunnel, ("the tunnel", &seen), message);
    }
    // The authority sent upstream: the tunnel's host, and its port unless it is 80.
    let authority = match tunnel.port {
        80 => tunnel.host.to_string(),
        _ => tunnel.to_string(),
    };
    send(
        req,
        client,
        live,
        ListenerKind::Http,
        tunnel,
        (Scheme::Http, &authority),
        started,
    )
    .await
}

/// A request inside an inspected TLS tunnel to `tunnel`: the URI's authority (absolute
/// form) and `Host`, each when present, must name the tunnel's host and port (otherwise
/// `host_mismatch`: domain fronting); then decided on host, port and path like plain HTTP
/// and forwarded over TLS, the upstream's certificate verified for the tunnel's name.
pub(crate) async fn forward_inspected(
    req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    live: Arc<Live>,
    tunnel: Target,
) -> Response<Body> {
    let started = Instant::now();
    let names = |b: Option<&[u8]>| match host::named(b, tunnel.port) {
        Named::Host(t) => t == tunnel,
        _ => false,
    };
    let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
    let host = req.headers().get(header::HOST).map(|h| h.as_bytes());
    // Two `Host` fields could each be read by a different hop (RFC 9112 §3.2: a 400).
    let one_host = req.headers().get_all(header::HOST).iter().count() <= 1;
    let same = req.method() != hyper::Method::CONNECT
        && one_host
        && (authority.is_some() || host.is_some())
        && authority.is_none_or(|a| names(Some(a)))
        && host.is_none_or(|h| names(Some(h)));
    if !same {
        live.metrics
            .inspected_requests
            .with_label_values(&["deny", ReasonCode::HostMismatch.as_str()])
            .inc();
        let seen = named_text(&req);
        let message = format!(
            "aml-egress refused a request inside the TLS session with {tunnel}: it names {seen:?}, not the session's host (and port); a request for another host needs its own connection"
        );
        return host_mismatch(
            &live,
            client,
            tunnel,
            ("the inspected tunnel", &seen),
            message,
        );
    }
    let authority = match tunnel.port {
        443 => tunnel.host.to_string(),
        _ => tunnel.to_string(),
    };
    send(
        req,
        client,
        live,
        ListenerKind::Http,
        tunnel,
        (Scheme::Https, &authority),
        started,
    )
    .await
}

/// Refuse (count, record, log, answer `403`) a request inside a tunnel (`inside`: which
/// kind) that names another host or port than the tunnel's (`seen`, as it named it).
fn host_mismatch(
    live: &Live,
    client: ClientAddr,
    tunnel: Target,
    (inside, seen): (&str, &str),
    message: String,
) -> Response<Body> {
    let reason = ReasonCode::HostMismatch;
    let seen_as = Seen {
        via: ListenerKind::Http,
        client,
        target: Some(&tunnel),
        shown: &format!("{tunnel} (request inside {inside})"),
        seen,
        outcome: Outcome::Deny,
        reason,
        rule: "",
    };
    Refusal::host_refused(seen_as, reason.words(), message)
        .issue(live, Count::Now)
        .into_response()
}

/// How a request goes upstream: plain HTTP, or TLS (inspected requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

/// A request redirected to the transparent HTTP listener from `orig`: decided on the host
/// its `Host` (or absolute-form authority) names, on the original port (a port it names
/// must be that one) and on the path. Without `Host`, only the CIDR rules on the original
/// destination can allow it.
pub(crate) async fn forward_transparent(
    req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    live: Arc<Live>,
    OrigDstAddr(orig): OrigDstAddr,
) -> Response<Body> {
    let started = Instant::now();
    let via = ListenerKind::TransparentHttp;
    let port = orig.port();
    let dst = Target {
        host: crate::policy::Host::Ip(crate::proxy::dial::canonical(orig.ip())),
        port,
    };
    let named = match req.method() {
        // A redirected CONNECT names no host this listener can serve.
        &hyper::Method::CONNECT => Named::Mismatch,
        _ => host::named(named_bytes(&req), port),
    };
    let target = match named {
        Named::Host(t) => t,
        Named::Invalid(e) => {
            return refusal::invalid(&live, via, client, named_text(&req).as_str(), e).into();
        }
        Named::Absent => {
            let v = live.judge(client, &dst, PathView::Hidden);
            // A client no policy serves is refused for that, with or without a Host.
            if v.pass || v.decision.reason == Reason::NoPolicyForClient {
                let shown = dst.to_string();
                return send(req, client, live, via, dst, (Scheme::Http, &shown), started).await;
            }
            let reason = ReasonCode::NoServerName;
            let seen_as = Seen {
                via,
                client,
                target: Some(&dst),
                shown: &format!("{dst} (no Host)"),
                seen: "(no Host)",
                outcome: Outcome::Deny,
                reason,
                rule: "",
            };
            let message = format!(
                "aml-egress refused a request to {dst} without a Host header: only a CIDR rule for the address could allow it"
            );
            let words = "no Host and no rule for the address";
            return Refusal::host_refused(seen_as, words, message)
                .issue(&live, Count::Now)
                .into_response();
        }
        Named::Mismatch => {
            let seen = named_text(&req);
            let reason = ReasonCode::HostMismatch;
            let seen_as = Seen {
                via,
                client,
                target: Some(&dst),
                shown: &format!("{dst} (redirected; Host {seen})"),
                seen: &seen,
                outcome: Outcome::Deny,
                reason,
                rule: "",
            };
            let message = format!(
                "aml-egress refused a request redirected to port {port}: its Host {seen:?} names another port, or is not a host"
            );
            return Refusal::host_refused(seen_as, reason.words(), message)
                .issue(&live, Count::Now)
                .into_response();
        }
    };
    let shown = match port {
        80 => target.host.to_string(),
        _ => target.to_string(),
    };
    send(
        req,
        client,
        live,
        via,
        target,
        (Scheme::Http, &shown),
        started,
    )
    .await
}

/// The response to `sent`, or `None` when its head did not come within `idle` of the
/// request's last bytes (so that a long upload is not cut off but a silent upstream is).
async fn answer<F, T>(sent: F, upload: &Activity, idle: std::time::Duration) -> Option<T>
where
    F: std::future::Future<Output = T>,
{
    tokio::pin!(sent);
    loop {
        let quiet = upload.quiet_for();
        if quiet >= idle {
            return None;
        }
        tokio::select! {
            r = &mut sent => return Some(r),
            _ = tokio::time::sleep(idle - quiet) => {}
        }
    }
}

/// RFC 9110 §9.2.2.
fn is_idempotent(m: &hyper::Method) -> bool {
    use hyper::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

/// Whether the upstream ended the connection before a whole response head: with a FIN
/// (hyper's incomplete message, or a request it never sent), or with a reset (a server
/// that drops a kept-alive connection with the request unread, a middlebox's idle timeout).
/// The caller has no response head, so nothing of an answer reached the client.
fn unanswered(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    causes(e).any(|err| {
        let closed = err
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message() || h.is_canceled());
        let reset = err.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            )
        });
        closed || reset
    })
}

/// Whether the request went over a connection dialled before it was sent.
fn reused(captured: &CaptureConnection, sent_at: std::time::Instant) -> bool {
    let Some(connected) = captured.connection_metadata().as_ref().map(|c| {
        let mut ext = hyper::http::Extensions::new();
        c.get_extras(&mut ext);
        ext
    }) else {
        return false;
    };
    connected.get::<DialledAt>().is_some_and(|d| d.0 < sent_at)
}

/// How a message's body is framed, as far as forwarding is concerned.
enum Framing {
    /// By Content-Length, or no body.
    Length,
    /// `Transfer-Encoding: chunked` (which hyper decodes).
    Chunked,
    /// A transfer coding other than chunked (named).
    Other(String),
}

fn framing(h: &HeaderMap) -> Framing {
    let mut any = false;
    for value in h.get_all(header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if coding != "chunked" {
                return Framing::Other(coding.chars().take(64).collect());
            }
            any = true;
        }
    }
    if any {
        Framing::Chunked
    } else {
        Framing::Length
    }
}

/// `Via: 1.1 aml-egress` after what earlier hops wrote (RFC 9110 §7.6.3).
fn add_via(h: &mut HeaderMap) {
    h.append(header::VIA, HeaderValue::from_static("1.1 aml-egress"));
}

/// Whether a client error is a response head over the size limit.
fn head_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    causes(e).any(|err| {
        err.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
    })
}

/// The authority or `Host` a request names, bounded and escaped for a log line.
fn named_text(req: &Request<hyper::body::Incoming>) -> String {
    let raw = named_bytes(req).unwrap_or_default();
    raw[..raw.len().min(256)].escape_ascii().to_string()
}

/// The authority a request names: its absolute-form authority, which wins over `Host`
/// (RFC 9112 §3.2.2), else its `Host` header.
fn named_bytes<B>(req: &Request<B>) -> Option<&[u8]> {
    req.uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| req.headers().get(header::HOST).map(|h| h.as_bytes()))
}

/// Decide on host, port and path, then forward (absolute-form and in-tunnel requests alike):
/// hop-by-hop headers removed, `Host` set to `authority`, bodies streamed both ways.
async fn send(
    mut req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    live: Arc<Live>,
    via: ListenerKind,
    target: Target,
    (scheme, authority): (Scheme, &str),
    started: Instant,
) -> Response<Body> {
    let shown = target.to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    // The absolute URI the pool is given (it sends origin form upstream). Only an
    // origin-form path may follow the authority: anything else (`OPTIONS *`) would be
    // glued onto the host and name another one.
    if !path.starts_with('/') {
        return refusal::invalid(&live, via, client, &path, InvalidTarget::BadCharacter).into();
    }
    let uri = match scheme {
        Scheme::Http => format!("http://{authority}{path}"),
        Scheme::Https => format!("https://{authority}{path}"),
    };
    let Ok(uri) = uri.parse::<Uri>() else {
        return refusal::invalid(&live, via, client, &uri, InvalidTarget::BadCharacter).into();
    };
    let v = live.judge(client, &target, PathView::Visible(&path));
    if scheme == Scheme::Https {
        live.metrics
            .inspected_requests
            .with_label_values(&[v.outcome().as_str(), v.decision.reason.code().as_str()])
            .inc();
    }
    let pending = match refusal::admit(&live, via, client, &target, || format!("{shown}{path}"), &v)
    {
        Ok(pending) => pending,
        Err(refused) => return refused.into(),
    };
    // Framing (RFC 9112 §6): hyper has decoded `chunked`; any other transfer coding would
    // be passed on without its label, so it is refused, and a Content-Length beside a
    // Transfer-Encoding is dropped (the chunked length wins).
    match framing(req.headers()) {
        Framing::Other(coding) => {
            let reply = Reply::new(
                StatusCode::NOT_IMPLEMENTED,
                "http_request_error",
                "transfer_coding",
                (Some(&shown), "request transfer coding not implemented"),
                format!(
                    "aml-egress forwards only the chunked transfer coding; this request used {coding:?}: send it without that coding"
                ),
            );
            let error = format!("the request's transfer coding {coding:?} is not forwarded");
            return upstream_failed(&live, (via, client), &shown, &error, pending, reply).into();
        }
        Framing::Chunked => {
            req.headers_mut().remove(header::CONTENT_LENGTH);
        }
        Framing::Length => {}
    }
    // An allowed WebSocket handshake keeps its upgrade; the client's side is taken now,
    // before the request moves on.
    let websocket = upgrade::asks_websocket(&req).then(|| ClientUpgrade::take(&mut req));
    // Route by the URI's authority and make the Host header say the same (RFC 9112 3.2.2).
    strip_hop_by_hop(req.headers_mut());
    if websocket.is_some() {
        upgrade::keep_upgrade(req.headers_mut());
    }
    if live.config.strip_forwarding {
        strip_forwarding(req.headers_mut());
    }
    if live.config.via {
        add_via(req.headers_mut());
    }
    if let Ok(v) = HeaderValue::from_str(authority) {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.uri_mut() = uri;
    // Each side speaks what it negotiated: the pool's connection decides the upstream's
    // version (HTTP/1.1, or h2 when an inspected upstream chose it by ALPN).
    if req.version() == hyper::Version::HTTP_2 {
        *req.version_mut() = hyper::Version::HTTP_11;
    }
    let method = req.method().clone();
    // A request that can be sent again (RFC 9112 §9.3.1): idempotent, without a body.
    let replay =
        (is_idempotent(&method) && hyper::body::Body::is_end_stream(req.body())).then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.version(),
                req.headers().clone(),
            )
        });
    let upload = Arc::new(Activity::new());
    let mut req = req.map(|body| UploadBody::new(body, upload.clone()));
    let captured = capture_connection(&mut req);
    let sent_at = std::time::Instant::now();
    let pool = live
        .upstream_of(v.policy)
        .client(v.decision.is_allowed(), websocket.is_some());
    let idle = live.config.idle_timeout;
    let mut answered = answer(pool.request(req), &upload, idle).await;
    // A reused connection the upstream closed or reset without answering: once more (on
    // another connection, new or pooled), as nginx and Squid do.
    if let (Some(Err(e)), Some((m, u, version, headers))) = (&answered, replay)
        && unanswered(e)
        && reused(&captured, sent_at)
    {
        live.metrics.upstream_retries.inc();
        let mut again = Request::new(UploadBody::empty(upload.clone()));
        *again.method_mut() = m;
        *again.uri_mut() = u;
        *again.version_mut() = version;
        *again.headers_mut() = headers;
        answered = answer(pool.request(again), &upload, idle).await;
    }
    // The upstream did not answer (in time, faithfully): an error in place of the allow,
    // answered `status` with the RFC 9209 `error` and `upstream_response` as its details.
    let failed = |pending, status, error, words: &str, message: String| -> Response<Body> {
        let reason = ReasonCode::UpstreamResponse.as_str();
        let logged = message.clone();
        let reply = Reply::new(status, error, reason, (Some(&shown), words), message);
        upstream_failed(&live, (via, client), &shown, &logged, pending, reply).into()
    };
    let Some(answered) = answered else {
        return failed(
            pending,
            StatusCode::GATEWAY_TIMEOUT,
            "http_response_timeout",
            "no response head in time",
            format!("aml-egress got no response head from {shown} within proxy.idle_timeout_secs"),
        );
    };
    match answered {
        Ok(mut resp) => {
            // A 101 is relayed only as the answer to a WebSocket handshake that asked for it.
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if switched && !(websocket.is_some() && upgrade::accepted(&resp)) {
                return failed(
                    pending,
                    StatusCode::BAD_GATEWAY,
                    "http_upgrade_failed",
                    "unrequested protocol switch",
                    format!(
                        "aml-egress got a 101 from {shown} that does not switch to the WebSocket the request asked for; only WebSocket upgrades are relayed"
                    ),
                );
            }
            match framing(resp.headers()) {
                Framing::Other(coding) => {
                    return failed(
                        pending,
                        StatusCode::BAD_GATEWAY,
                        "http_response_incomplete",
                        "response transfer coding not implemented",
                        format!(
                            "aml-egress got a response from {shown} in the transfer coding {coding:?}, which it cannot forward faithfully"
                        ),
                    );
                }
                Framing::Chunked => {
                    resp.headers_mut().remove(header::CONTENT_LENGTH);
                }
                Framing::Length => {}
            }
            drop(pending); // an allow
            strip_hop_by_hop(resp.headers_mut());
            if live.config.via {
                add_via(resp.headers_mut());
            }
            if let (true, Some(client_side)) = (switched, websocket) {
                upgrade::keep_upgrade(resp.headers_mut());
                let mode = live.mode_of(v.policy);
                client_side.relay(&mut resp, &live, shown.clone(), mode);
            }
            // Our own version in the status line (RFC 9110 §6.2).
            *resp.version_mut() = hyper::Version::HTTP_11;
            let upstream = resp
                .extensions()
                .get::<HttpInfo>()
                .map(|i| i.remote_addr().to_string())
                .unwrap_or_default();
            tracing::info!(
                listener = via.as_str(),
                client = %client,
                target = %shown,
                upstream,
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                decision = if v.would_deny { "would_deny" } else { "allow" },
                rule = %live.rule_text(&v),
                policy = live.policy_name(v.policy),
                mode = live.mode_of(v.policy).as_str(),
                duration_ms = started.elapsed().as_millis() as u64,
                "request forwarded"
            );
            resp.map(|b| b.map_err(BodyError::from).boxed())
        }
        Err(e) => match dial_error(&e) {
            Some(d) => dial_failed(&live, via, client, &target, d, pending).into(),
            None if head_too_large(&e) => failed(
                pending,
                StatusCode::BAD_GATEWAY,
                "http_response_header_section_size",
                "response head too large",
                format!(
                    "aml-egress got a response head from {shown} larger than proxy.max_header_bytes"
                ),
            ),
            None => failed(
                pending,
                StatusCode::BAD_GATEWAY,
                "http_response_incomplete",
                ReasonCode::UpstreamResponse.words(),
                format!("aml-egress got no valid response from {shown}: {e}"),
            ),
        },
    }
}
