//! `CONNECT host:port`: decide, dial, and only then answer `200`; then inspect what the
//! tunnel carries and relay it (see [`super::tunnel`]).
//!
//! A connection whose first request is a plain `CONNECT` (the common case) is answered here
//! directly on its socket ([`serve_first`]): no HTTP machinery between the request head and
//! the `403` or the `200` and the tunnel. A `CONNECT` later on a keep-alive connection, or
//! on a TLS listener, goes through hyper ([`handle`]). Both decide in [`decide`] and dial
//! in `dial_admitted`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use hyper::{Request, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::handshake::ClientSide;
use super::tunnel::Tunnel;
use crate::metrics::{ListenerKind, OpenGuard};
use crate::policy::{PathView, Target};
use crate::proxy::addr::ClientAddr;
use crate::proxy::dial::dial;
use crate::proxy::head::ConnectHead;
use crate::proxy::plumbing::{ConnHandles, Slot, register};
use crate::proxy::refusal::{self, AllowCount, dial_failed};
use crate::proxy::respond::{self, Body, Reply, full};
use crate::proxy::state::{Judgement, Live, Shared};

/// An allowed CONNECT whose upstream is dialled (or, inspected, is not yet: each request
/// inside dials its own), before its `200`.
pub(crate) struct Opened {
    target: Target,
    upstream: Option<(TcpStream, SocketAddr)>,
    verdict: Judgement,
    /// The allow, counted when the tunnel's inspection has passed (see [`AllowCount`]).
    pending: Option<AllowCount>,
    started: Instant,
}

/// A CONNECT the policy let through (or audit mode passed), before its dial.
pub(crate) struct Admitted {
    target: Target,
    /// Its TLS will be inspected: no dial now.
    inspect: bool,
    verdict: Judgement,
    /// The allow, counted later (see [`AllowCount`]).
    pending: Option<AllowCount>,
}

/// Decide a CONNECT to `raw` (its request target). A refusal (invalid target, policy) is
/// counted and logged, and comes back as the answer to send. Synchronous, so that the
/// refusal of a first `CONNECT` is written before its socket is ever registered.
pub(crate) fn decide(raw: &str, client: ClientAddr, live: &Live) -> Result<Admitted, Reply> {
    let target = match Target::parse(raw) {
        Ok(t) => t,
        Err(e) => {
            return Err(refusal::invalid(
                live,
                ListenerKind::Connect,
                client,
                raw,
                e,
            ));
        }
    };
    let verdict = live.judge(client, &target, PathView::Hidden);
    if live.inspects(&target, &verdict) {
        if live
            .inspector
            .as_ref()
            .is_some_and(|i| i.ca_expired(std::time::SystemTime::now()))
        {
            // Everything else carries on; what needs inspection cannot be served.
            let reason = crate::reason::ReasonCode::InspectCaExpired;
            let shown = target.to_string();
            let seen = refusal::Seen {
                via: ListenerKind::Connect,
                client,
                target: Some(&target),
                shown: &shown,
                seen: "",
                outcome: crate::metrics::Outcome::Deny,
                reason,
                rule: "",
            };
            let message = format!(
                "aml-egress cannot inspect {shown}, which its policy inspects: the inspection CA (inspect.ca_cert) has expired. Make a new one (aml-egress ca init), install it on compute, and reload"
            );
            return Err(
                refusal::Refusal::host_refused(seen, reason.words(), message)
                    .issue(live, refusal::Count::Now),
            );
        }
        // Each request inside is decided (and counted) on its own, path included.
        return Ok(Admitted {
            target,
            inspect: true,
            verdict,
            pending: None,
        });
    }
    // An allowed tunnel is counted once the dial worked and, on TLS ports, once the name
    // inside has been checked.
    let pending = refusal::admit(
        live,
        ListenerKind::Connect,
        client,
        &target,
        || target.to_string(),
        &verdict,
    )?;
    Ok(Admitted {
        target,
        inspect: false,
        verdict,
        pending,
    })
}

/// Dial an admitted CONNECT; a failed or refused dial (address guard) is counted and
/// logged, and comes back as the answer to send.
async fn dial_admitted(a: Admitted, client: ClientAddr, live: &Live) -> Result<Opened, Reply> {
    let Admitted {
        target,
        inspect,
        verdict,
        pending,
    } = a;
    let started = Instant::now();
    if inspect {
        return Ok(Opened {
            target,
            upstream: None,
            verdict,
            pending,
            started,
        });
    }
    // Boxed: a refusal's task does not carry the dialler's state.
    let dialling = Box::pin(dial(
        &target,
        verdict.decision.is_allowed(),
        live.dial_of(verdict.policy),
    ));
    let dialled = dialling.await;
    live.metrics.dial(dialled.is_ok(), started.elapsed());
    let (upstream, addr) = match dialled {
        Ok(x) => x,
        Err(e) => {
            return Err(dial_failed(
                live,
                ListenerKind::Connect,
                client,
                &target,
                &e,
                pending,
            ));
        }
    };
    // The count waits for the inspection inside, except on opaque ports.
    let pending = pending.filter(|_| !live.config.opaque_ports.contains(&target.port));
    Ok(Opened {
        target,
        upstream: Some((upstream, addr)),
        verdict,
        pending,
        started,
    })
}

/// The client side of a first `CONNECT`: its socket is registered with the worker's
/// runtime only when the proxy has to wait on it.
pub(crate) enum FirstClient {
    /// The whole head came with the connection; nothing has waited on the socket yet.
    Unregistered(std::net::TcpStream),
    Registered(TcpStream),
}

/// The first request of a plain connection, a `CONNECT` whose head `head` is at the
/// start of `buf`: answered and tunnelled on this task. A refusal on a socket not yet
/// registered is one `send` and a close; bytes the client sent behind the head are the
/// tunnel's first bytes.
pub(crate) async fn serve_first(
    first: FirstClient,
    mut buf: BytesMut,
    head: ConnectHead,
    client: ClientAddr,
    (shared, slot, open): (Arc<Shared>, Arc<Slot>, OpenGuard),
) {
    let live = shared.live();
    let start = Instant::now();
    // plain_connect checked the target is an authority, so it is ASCII.
    let raw = std::str::from_utf8(&buf[head.target.clone()]).unwrap_or_default();
    let (decided, mut stream) = match (decide(raw, client, &live), first) {
        (Err(refusal), FirstClient::Unregistered(sock)) => {
            live.metrics
                .request_duration(ListenerKind::Connect, start.elapsed());
            respond::send_and_close(sock, refusal.closing_bytes());
            return;
        }
        (Ok(admitted), FirstClient::Unregistered(sock)) => match register(sock, client, &live.logs)
        {
            Some(s) => (Ok(admitted), s),
            None => {
                if let Some(p) = admitted.pending {
                    p.instead(); // never dialled: not an allow
                }
                return;
            }
        },
        (decided, FirstClient::Registered(s)) => (decided, s),
    };
    let opened = match decided {
        Ok(admitted) => dial_admitted(admitted, client, &live).await,
        Err(refusal) => Err(refusal),
    };
    live.metrics
        .request_duration(ListenerKind::Connect, start.elapsed());
    match opened {
        // The bytes behind the CONNECT were meant for the tunnel: never read as a
        // request; the connection closes after the answer.
        Err(refusal) => {
            let _ = stream.write_all(&refusal.closing_bytes()).await;
        }
        Ok(opened) => {
            if stream.write_all(&respond::established()).await.is_err() {
                return; // the client left: its allow is counted as the request ends
            }
            buf.advance(head.len);
            drop(open); // a tunnel now, counted as one
            let side = ClientSide::Tcp(stream);
            // Boxed, so that a refusal's task does not carry the tunnel's state. (Its own
            // statement: a temporary in an awaiting statement is kept in the state.)
            let tunnel = Box::pin(tunnel(opened, side, buf, live, shared, Some(slot), client));
            tunnel.await;
        }
    }
}

/// A `CONNECT` that hyper parsed: answered through hyper, tunnelled once hyper hands the
/// connection over.
pub(crate) async fn handle(
    req: Request<hyper::body::Incoming>,
    client: ClientAddr,
    live: Arc<Live>,
    shared: Arc<Shared>,
) -> Response<Body> {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    let admitted = match decide(raw, client, &live) {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    let opened = match dial_admitted(admitted, client, &live).await {
        Ok(o) => o,
        Err(refusal) => return refusal.into_response(),
    };
    let handles = req.extensions().get::<ConnHandles>().cloned();
    let guard = shared.tracker.track();
    tokio::spawn(async move {
        let _guard = guard;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let slot = handles.map(|h| {
                    h.turn.detach(); // the stream is a tunnel now: no request timers
                    h.slot
                });
                let (side, buf) = ClientSide::from_upgraded(upgraded);
                tunnel(opened, side, buf, live, shared, slot, client).await;
            }
            Err(e) => tracing::debug!(client = %client, error = %e, "CONNECT upgrade failed"),
        }
    });
    let mut resp = Response::new(full(""));
    resp.extensions_mut()
        .insert(hyper::ext::ReasonPhrase::from_static(
            b"Connection established",
        ));
    resp
}

/// Inspect and relay an answered tunnel until it ends or shutdown's grace period is over.
/// `slot` is the connection's place under `proxy.max_connections`, which the tunnel holds.
/// (Not an `async fn`: its future keeps each part once, not also the arguments it was
/// built from; it lives as long as the tunnel.)
fn tunnel(
    opened: Opened,
    side: ClientSide,
    buf: BytesMut,
    live: Arc<Live>,
    shared: Arc<Shared>,
    slot: Option<Arc<Slot>>,
    client: ClientAddr,
) -> impl std::future::Future<Output = ()> {
    let Opened {
        target,
        upstream,
        verdict,
        pending,
        started,
    } = opened;
    let open = live.metrics.open(true, live.mode_of(verdict.policy));
    let open = match &slot {
        Some(s) => open.on(s.tunnel_gauge()),
        None => open,
    };
    let addr = upstream.as_ref().map(|(_, a)| *a);
    let t = Tunnel {
        live,
        shared,
        slot,
        client,
        target,
        addr: addr.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        started,
    };
    async move {
        let _open = open;
        let served = async {
            match upstream {
                Some((upstream, _)) => t.run(side, buf, upstream, verdict, pending).await,
                None => Box::pin(t.inspect(side, buf)).await,
            }
        };
        tokio::select! {
            _ = served => {}
            _ = t.shared.tracker.closed() => {
                tracing::warn!(listener = "connect", client = %t.client, target = %t.target, reason = "grace_period_over", "tunnel closed at shutdown");
            }
        }
    }
}
