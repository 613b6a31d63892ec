//! Absolute-form plain HTTP (`GET http://host/path`): decided on host, port and path,
//! routed by the URI's authority (the `Host` header sent upstream is rewritten to it), with
//! hop-by-hop and `Proxy-*` headers removed and bodies streamed both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use super::Shared;
use super::connect::dial_failed;
use super::dial::dial;
use super::respond::{Body, refuse};
use crate::policy::{InvalidTarget, PathView, Target};

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

fn strip_hop_by_hop(h: &mut HeaderMap) {
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
}

pub(super) async fn forward(
    mut req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> Response<Body> {
    let started = Instant::now();
    let Some(authority) = req.uri().authority().cloned() else {
        return shared.refuse_invalid("http", peer, "", InvalidTarget::EmptyHost);
    };
    if authority.as_str().contains('@') {
        return shared.refuse_invalid("http", peer, authority.as_str(), InvalidTarget::UserInfo);
    }
    let port = match authority.port() {
        Some(_) => match authority.port_u16() {
            Some(p) if p > 0 => p,
            _ => {
                return shared.refuse_invalid(
                    "http",
                    peer,
                    authority.as_str(),
                    InvalidTarget::BadPort,
                );
            }
        },
        None => 80,
    };
    let target = match Target::from_parts(authority.host(), port) {
        Ok(t) => t,
        Err(e) => return shared.refuse_invalid("http", peer, authority.as_str(), e),
    };
    let shown = target.to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let v = shared.judge(&target, PathView::Visible(&path));
    shared.log_decision("http", peer, &format!("{shown}{path}"), &v);
    if !v.pass {
        return shared.forbidden(&format!("{shown}{path}"), &v.decision);
    }
    let (stream, addr) = match dial(&target, v.decision.is_allowed(), &shared.config.dial).await {
        Ok(x) => x,
        Err(e) => return dial_failed(&shared, peer, &shown, &e),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => {
            return refuse(
                StatusCode::BAD_GATEWAY,
                "connection_terminated",
                "upstream_handshake",
                &format!("aml-egress could not talk HTTP to {shown}: {e}"),
            );
        }
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // Route by the URI's authority and make the Host header say the same (RFC 9112 3.2.2).
    strip_hop_by_hop(req.headers_mut());
    if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
        req.headers_mut().insert(header::HOST, v);
    }
    *req.uri_mut() = path
        .parse::<Uri>()
        .unwrap_or_else(|_| Uri::from_static("/"));
    let method = req.method().clone();
    match sender.send_request(req).await {
        Ok(mut resp) => {
            strip_hop_by_hop(resp.headers_mut());
            tracing::info!(
                listener = "http",
                client = %peer,
                target = %shown,
                upstream = %addr,
                method = %method,
                path = %path,
                status = resp.status().as_u16(),
                decision = if v.would_deny { "would_deny" } else { "allow" },
                rule = %shared.rule_text(&v.decision),
                mode = shared.config.mode.as_str(),
                duration_ms = started.elapsed().as_millis() as u64,
                "request forwarded"
            );
            resp.map(|b| b.boxed())
        }
        Err(e) => refuse(
            StatusCode::BAD_GATEWAY,
            "http_response_incomplete",
            "upstream_response",
            &format!("aml-egress got no valid response from {shown}: {e}"),
        ),
    }
}
