//! `CONNECT host:port`: decide, dial, and only then answer `200`; then inspect what the
//! tunnel carries and relay it (see [`super::tunnel`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::{Request, Response, StatusCode};

use super::dial::{DialError, dial};
use super::respond::{Body, full, refuse};
use super::tunnel::Tunnel;
use super::{AllowCount, Live, Seen, Shared};
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{PathView, Target};

pub(super) async fn handle(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    live: Arc<Live>,
    shared: Arc<Shared>,
) -> Response<Body> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let target = match Target::parse(&raw) {
        Ok(t) => t,
        Err(e) => return live.refuse_invalid(ListenerKind::Connect, peer, &raw, e),
    };
    let shown = target.to_string();
    let v = live.judge(&target, PathView::Hidden);
    // An allowed tunnel is counted once the dial worked and, on TLS ports, once the name
    // inside has been checked.
    let pending = match live.admit(ListenerKind::Connect, peer, &target, || shown.clone(), &v) {
        Ok(pending) => pending,
        Err(refused) => return refused,
    };
    let started = Instant::now();
    let dialled = dial(&target, v.decision.is_allowed(), &live.config.dial).await;
    live.metrics.dial(dialled.is_ok(), started.elapsed());
    let (upstream, addr) = match dialled {
        Ok(x) => x,
        Err(e) => return dial_failed(&live, ListenerKind::Connect, peer, &target, &e, pending),
    };
    // The count waits for the inspection inside, except on opaque ports.
    let pending = pending.filter(|_| !live.config.opaque_ports.contains(&target.port));
    let guard = shared.tracker.track();
    let open = live.metrics.open(true, live.config.mode.as_str());
    let handles = req.extensions().get::<super::ConnHandles>().cloned();
    tokio::spawn(async move {
        let _guard = guard;
        let _open = open;
        // The tunnel holds its connection's place under proxy.max_connections.
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                if let Some(h) = &handles {
                    h.turn.detach(); // the stream is a tunnel now: no request timers
                }
                let t = Tunnel {
                    live: live.clone(),
                    shared: shared.clone(),
                    handles,
                    peer,
                    target,
                    addr,
                    started,
                };
                tokio::select! {
                    _ = t.run(upgraded, upstream, v, pending) => {}
                    _ = shared.tracker.closed() => {
                        tracing::warn!(listener = "connect", client = %peer, target = %target, reason = "grace_period_over", "tunnel closed at shutdown");
                    }
                }
            }
            Err(e) => tracing::debug!(client = %peer, error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(full(""))
}

/// The response (count and log line) for a dial that failed after the policy allowed it:
/// the address guard's refusals are denials; DNS and connection failures are errors.
/// `pending` is the request's uncounted allow, replaced by this outcome; `None` when the
/// decision was counted already (an audit pass).
pub(super) fn dial_failed(
    live: &Live,
    via: ListenerKind,
    peer: SocketAddr,
    target: &Target,
    e: &DialError,
    pending: Option<AllowCount>,
) -> Response<Body> {
    let counted = pending.is_none();
    if let Some(p) = pending {
        p.instead();
    }
    let (error, details) = e.proxy_status();
    let guard = matches!(
        e,
        DialError::Forbidden(_) | DialError::SelfConnection(_) | DialError::DenyRule(..)
    );
    let status = match e {
        _ if guard => StatusCode::FORBIDDEN,
        DialError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let shown = target.to_string();
    if guard && !counted {
        live.note(&Seen {
            via,
            client: peer,
            target: Some(target),
            shown: &shown,
            seen: "",
            outcome: Outcome::Deny,
            reason: details,
            rule: "",
        });
    } else {
        if !counted {
            live.metrics.decision(via, Outcome::Error, details);
        }
        if live.metrics.line_allowed() {
            tracing::warn!(client = %peer, target = %shown, decision = "error", reason = details, mode = live.config.mode.as_str(), error = %e, "upstream not reached");
        }
    }
    let hint = if matches!(e, DialError::DenyRule(..)) {
        " (remove or narrow that [[deny]] entry if the destination must be reached)"
    } else if guard {
        " (the address guard refuses loopback, link-local, metadata and similar addresses; list a network in upstream.allow_cidrs to exempt it)"
    } else {
        ""
    };
    refuse(
        status,
        error,
        details,
        &format!("aml-egress could not reach {shown}: {e}{hint}"),
    )
}
