//! `CONNECT host:port`: decide, dial, and only then answer `200`; then check the TLS name
//! inside the tunnel (on TLS ports) and relay both ways (see [`super::relay`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::dial::{DialError, dial};
use super::head::Rewind;
use super::keepalive::Watched;
use super::relay;
use super::respond::{Body, full, refuse};
use super::sni::{MAX_HELLO, SniError, server_name};
use super::{AllowCount, Live, Seen, Shared, Verdict};
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{Decision, Host, PathView, Reason, Target};

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
    // On TLS ports the count waits for the name inside; elsewhere it is an allow now.
    let pending = pending.filter(|_| live.config.tls_ports.contains(&target.port));
    let guard = shared.tracker.track();
    let open = live.metrics.open(true, live.config.mode.as_str());
    let handles = req.extensions().get::<super::ConnHandles>().cloned();
    tokio::spawn(async move {
        let _guard = guard;
        let _open = open;
        // The tunnel holds its connection's place under proxy.max_connections.
        let handles = handles;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                if let Some(h) = &handles {
                    h.turn.detach(); // the stream is a tunnel now: no request timers
                }
                let t = Tunnel {
                    live: &live,
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
    let guard = matches!(e, DialError::Forbidden(_) | DialError::SelfConnection(_));
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
    let hint = if guard {
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

/// The client side of an upgraded CONNECT: the plain TCP socket when hyper hands it back
/// (so that the relay can splice), or the upgraded stream (clients on a TLS listener).
enum ClientSide {
    Tcp(TcpStream),
    Upgraded(TokioIo<hyper::upgrade::Upgraded>),
}

fn unwrap_client(upgraded: hyper::upgrade::Upgraded) -> (ClientSide, BytesMut) {
    match upgraded.downcast::<TokioIo<Watched<Rewind<TcpStream>>>>() {
        Ok(parts) => {
            let (unread, tcp) = parts.io.into_inner().into_inner().into_parts();
            // What hyper had read comes first; what it had not yet taken from the first
            // head's buffer comes after.
            let mut pending = BytesMut::from(&parts.read_buf[..]);
            pending.extend_from_slice(&unread);
            (ClientSide::Tcp(tcp), pending)
        }
        Err(upgraded) => (
            ClientSide::Upgraded(TokioIo::new(upgraded)),
            BytesMut::new(),
        ),
    }
}

/// What an open tunnel needs to know about itself.
struct Tunnel<'a> {
    live: &'a Live,
    peer: SocketAddr,
    target: Target,
    addr: SocketAddr,
    started: Instant,
}

/// How the check of the TLS name ended.
enum NameCheck {
    /// Go on; the name seen (empty if none), and whether only audit mode let it through.
    Pass(String, bool),
    /// Close the tunnel (refused, or the client went away).
    Close,
}

impl Tunnel<'_> {
    /// Check the TLS name (on TLS ports), count the decision if not yet counted, relay.
    async fn run(
        &self,
        upgraded: hyper::upgrade::Upgraded,
        mut upstream: TcpStream,
        mut v: Verdict,
        mut pending: Option<AllowCount>,
    ) {
        let cfg = &self.live.config;
        let (mut client, mut buf) = unwrap_client(upgraded);
        let (sni, audit_name) = if cfg.tls_ports.contains(&self.target.port) {
            match self.check_name(&mut client, &mut buf, &mut pending).await {
                NameCheck::Pass(sni, audit) => (sni, audit),
                NameCheck::Close => return,
            }
        } else {
            (String::new(), false)
        };
        drop(pending); // an allow, if nothing else was counted for this request
        v.would_deny |= audit_name;
        let idle = cfg.idle_timeout;
        if !buf.is_empty() {
            match tokio::time::timeout(idle, upstream.write_all(&buf)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
        let metrics = &self.live.metrics;
        metrics.tunnel_up.inc_by(buf.len() as u64);
        let counters = relay::Counters {
            up: &metrics.tunnel_up,
            down: &metrics.tunnel_down,
        };
        let (up, down) = match client {
            ClientSide::Tcp(s) => relay::splice_both(s, upstream, cfg.idle_timeout, counters).await,
            ClientSide::Upgraded(s) => {
                relay::copy_both(s, upstream, cfg.idle_timeout, counters).await
            }
        };
        tracing::info!(
            listener = "connect",
            client = %self.peer,
            target = %self.target,
            upstream = %self.addr,
            sni = %sni,
            decision = if v.would_deny { "would_deny" } else { "allow" },
            rule = %self.live.rule_text(&v.decision),
            mode = cfg.mode.as_str(),
            bytes_up = up + buf.len() as u64,
            bytes_down = down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "tunnel closed"
        );
    }

    /// Read the ClientHello (bounded in size and time) and decide on its server name. A
    /// refused name is counted as this request's decision, unless one was counted already.
    async fn check_name(
        &self,
        client: &mut ClientSide,
        buf: &mut BytesMut,
        pending: &mut Option<AllowCount>,
    ) -> NameCheck {
        let live = self.live;
        let cfg = &live.config;
        let deadline = tokio::time::Instant::now() + cfg.sni_timeout;
        let found = loop {
            match server_name(buf) {
                Err(SniError::Incomplete) if buf.len() < MAX_HELLO + 64 => {
                    let read = async {
                        match client {
                            ClientSide::Tcp(s) => s.read_buf(buf).await,
                            ClientSide::Upgraded(s) => s.read_buf(buf).await,
                        }
                    };
                    match tokio::time::timeout_at(deadline, read).await {
                        // Gone before naming a server: the CONNECT's own decision stands
                        // (`pending` counts it when dropped).
                        Ok(Ok(0)) | Ok(Err(_)) => return NameCheck::Close,
                        Ok(Ok(_)) => continue,
                        Err(_) => break None,
                    }
                }
                Ok(Some(name)) => break Some(name),
                _ => break None,
            }
        };
        let by_name = found.map(|name| Target {
            host: Host::Name(name),
            port: self.target.port,
        });
        let sni = found.map(|n| n.as_str().to_owned()).unwrap_or_default();
        let verdict = match (&by_name, found) {
            (Some(t), Some(name)) => {
                let same = matches!(self.target.host, Host::Name(n) if n == name);
                (!same).then(|| live.judge(t, PathView::Hidden))
            }
            _ if cfg.sni_missing_allowed => None,
            _ => Some(live.apply_mode(Decision {
                verdict: crate::policy::Verdict::Deny,
                reason: Reason::NoMatchingRule,
                rule: None,
            })),
        };
        let Some(sv) = verdict.filter(|sv| !sv.decision.is_allowed()) else {
            return NameCheck::Pass(sni, false);
        };
        let outcome = if sv.pass {
            Outcome::WouldDeny
        } else {
            Outcome::Deny
        };
        let what = by_name.as_ref().unwrap_or(&self.target);
        let label = format!("{what} (TLS name inside CONNECT {})", self.target);
        let rule = live.rule_text(&sv.decision);
        let seen = Seen {
            via: ListenerKind::Connect,
            client: self.peer,
            target: Some(what),
            shown: &label,
            outcome,
            reason: "sni_not_allowed",
            rule: &rule,
        };
        match pending.take() {
            // This refusal is the request's decision.
            Some(p) => {
                p.instead();
                live.note(&seen);
            }
            // The request was counted already (an audit pass): record and log only.
            None => live.record(&seen),
        }
        if sv.pass {
            NameCheck::Pass(sni, true)
        } else {
            NameCheck::Close
        }
    }
}
