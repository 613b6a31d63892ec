//! WebSocket handshakes (RFC 6455 §4) on forwarded requests: an allowed HTTP/1.1 `GET`
//! asking to upgrade to `websocket` keeps its `Upgrade` on the way to the upstream, and
//! after the upstream's `101` the two connections are relayed as a tunnel is. Every other
//! upgrade (`h2c`, `TLS/1.0`, anything unknown) is stripped as a hop-by-hop field, as before.

use std::sync::Arc;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::proxy::plumbing::ConnHandles;
use crate::proxy::state::Live;

/// Whether `req` is a WebSocket opening handshake: HTTP/1.1, `GET`, `Connection` listing
/// `upgrade` and `Upgrade` naming exactly one protocol, `websocket` (case-insensitive).
/// HTTP/2 clients cannot ask this way (RFC 8441's extended CONNECT is not offered).
pub(super) fn asks_websocket<B>(req: &Request<B>) -> bool {
    req.version() == hyper::Version::HTTP_11
        && req.method() == hyper::Method::GET
        && lists_upgrade(req.headers())
        && names_websocket(req.headers())
}

/// Whether a response accepts the WebSocket upgrade: `101` with `Upgrade: websocket`.
pub(super) fn accepted<B>(resp: &Response<B>) -> bool {
    resp.status() == StatusCode::SWITCHING_PROTOCOLS && names_websocket(resp.headers())
}

fn lists_upgrade(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

fn names_websocket(h: &HeaderMap) -> bool {
    let mut values = h.get_all(header::UPGRADE).iter();
    matches!(
        (values.next(), values.next()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")
    )
}

/// Put back the two fields that hop-by-hop stripping removed from a WebSocket handshake
/// (a request, or the `101` that answers it).
pub(super) fn keep_upgrade(h: &mut HeaderMap) {
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// The client's side of an upgrade, taken from its request before it is forwarded, with
/// the connection's handles (its place under `proxy.max_connections`, its keep-alive
/// timers, the shutdown tracker) when the listener gave it some.
pub(super) struct ClientUpgrade {
    on: OnUpgrade,
    handles: Option<ConnHandles>,
}

impl ClientUpgrade {
    pub(super) fn take<B>(req: &mut Request<B>) -> Self {
        ClientUpgrade {
            handles: req.extensions().get::<ConnHandles>().cloned(),
            on: hyper::upgrade::on(req),
        }
    }

    /// Once the `101` has gone to the client, relay both upgraded connections until either
    /// side ends, the relay idles for `proxy.idle_timeout_secs`, or shutdown's grace period
    /// is over. The connection keeps its place under `proxy.max_connections` meanwhile, and
    /// counts as a tunnel open in `mode` (its policy's).
    pub(super) fn relay<B>(
        self,
        upstream: &mut Response<B>,
        live: &Arc<Live>,
        shown: String,
        mode: crate::config::Mode,
    ) {
        let upstream = hyper::upgrade::on(upstream);
        let live = live.clone();
        let guard = self.handles.as_ref().map(|h| h.tracker.track());
        tokio::spawn(async move {
            let _guard = guard;
            let (client, upstream) = match tokio::try_join!(self.on, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(target = %shown, error = %e, "WebSocket upgrade not completed");
                    return;
                }
            };
            let slot = self.handles.as_ref().map(|h| {
                h.turn.detach(); // a tunnel now: no request timers
                h.slot.clone()
            });
            let open = live.metrics.open(true, mode);
            let _open = match slot.as_deref() {
                Some(s) => open.on(s.tunnel_gauge()),
                None => open,
            };
            let counters = crate::proxy::relay::Counters {
                up: &live.metrics.tunnel_up,
                down: &live.metrics.tunnel_down,
            };
            let relay = crate::proxy::relay::copy_both(
                TokioIo::new(client),
                TokioIo::new(upstream),
                live.config.idle_timeout,
                counters,
            );
            let closed = async {
                match &self.handles {
                    Some(h) => h.tracker.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                (up, down) = relay => {
                    tracing::debug!(target = %shown, up, down, "WebSocket relay ended");
                }
                _ = closed => {
                    tracing::warn!(target = %shown, reason = "grace_period_over", "WebSocket relay closed at shutdown");
                }
            }
        });
    }
}
