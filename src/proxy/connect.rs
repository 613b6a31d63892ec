//! `CONNECT host:port`: decide, dial, and only then answer `200`; then inspect what the
//! tunnel carries and relay it (see [`super::tunnel`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hyper::{Request, Response};

use super::admit::dial_failed;
use super::dial::dial;
use super::respond::{Body, full};
use super::tunnel::Tunnel;
use super::{Live, Shared};
use crate::metrics::ListenerKind;
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
    // The reason phrase Squid, tinyproxy and goproxy send, which some clients expect.
    let mut resp = Response::new(full(""));
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection established",
        ));
    resp
}
