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
use super::{Live, Shared, Verdict};
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
    if !v.pass {
        live.note_verdict(ListenerKind::Connect, peer, Some(&target), &shown, &v);
        return live.forbidden(&shown, &v.decision);
    }
    let started = Instant::now();
    let dialled = dial(&target, v.decision.is_allowed(), &live.config.dial).await;
    live.metrics.dial(dialled.is_ok(), started.elapsed());
    let (upstream, addr) = match dialled {
        Ok(x) => x,
        Err(e) => return dial_failed(&live, ListenerKind::Connect, peer, &target, &e),
    };
    live.note_verdict(ListenerKind::Connect, peer, Some(&target), &shown, &v);
    let guard = shared.tracker.track();
    let open = live.metrics.open(true, live.config.mode.as_str());
    tokio::spawn(async move {
        let _guard = guard;
        let _open = open;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                tokio::select! {
                    _ = tunnel(upgraded, upstream, target, &live, peer, v, addr, started) => {}
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
pub(super) fn dial_failed(
    live: &Live,
    via: ListenerKind,
    peer: SocketAddr,
    target: &Target,
    e: &DialError,
) -> Response<Body> {
    let (error, details) = e.proxy_status();
    let guard = matches!(e, DialError::Forbidden(_) | DialError::SelfConnection(_));
    let status = match e {
        _ if guard => StatusCode::FORBIDDEN,
        DialError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let target = target.to_string();
    if guard {
        live.note(
            via,
            peer,
            Target::parse(&target).ok().as_ref(),
            &target,
            Outcome::Deny,
            details,
            "",
        );
    } else {
        live.metrics.decision(via, Outcome::Error, details);
        if live.metrics.error_line_allowed() {
            tracing::warn!(client = %peer, target, decision = "error", reason = details, mode = live.config.mode.as_str(), error = %e, "upstream not reached");
        }
    }
    let hint = match e {
        DialError::Forbidden(_) | DialError::SelfConnection(_) => {
            " (the address guard refuses loopback, link-local, metadata and similar addresses; list a network in upstream.allow_cidrs to exempt it)"
        }
        _ => "",
    };
    refuse(
        status,
        error,
        details,
        &format!("aml-egress could not reach {target}: {e}{hint}"),
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
            let (mut pending, tcp) = parts.io.into_inner().into_inner().into_parts();
            pending.extend_from_slice(&parts.read_buf);
            (ClientSide::Tcp(tcp), pending)
        }
        Err(upgraded) => (
            ClientSide::Upgraded(TokioIo::new(upgraded)),
            BytesMut::new(),
        ),
    }
}

#[allow(clippy::too_many_arguments)]
async fn tunnel(
    upgraded: hyper::upgrade::Upgraded,
    mut upstream: TcpStream,
    target: Target,
    live: &Live,
    peer: SocketAddr,
    mut v: Verdict,
    addr: SocketAddr,
    started: Instant,
) {
    let shown = target.to_string();
    let cfg = &live.config;
    let (mut client, mut buf) = unwrap_client(upgraded);
    let mut sni = String::new();
    if cfg.tls_ports.contains(&target.port) {
        let deadline = tokio::time::Instant::now() + cfg.sni_timeout;
        let found = loop {
            match server_name(&buf) {
                Err(SniError::Incomplete) if buf.len() < MAX_HELLO + 64 => {
                    let read = async {
                        match &mut client {
                            ClientSide::Tcp(s) => s.read_buf(&mut buf).await,
                            ClientSide::Upgraded(s) => s.read_buf(&mut buf).await,
                        }
                    };
                    match tokio::time::timeout_at(deadline, read).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        Ok(Ok(_)) => continue,
                        Err(_) => break None,
                    }
                }
                Ok(Some(name)) => break Some(name),
                _ => break None,
            }
        };
        let sni_verdict = match found {
            Some(name) => {
                sni = name.as_str().to_owned();
                let by_name = Target {
                    host: Host::Name(name),
                    port: target.port,
                };
                let same = matches!(target.host, Host::Name(n) if n == name);
                (!same).then(|| live.judge(&by_name, PathView::Hidden))
            }
            None if cfg.sni_missing_allowed => None,
            None => Some(live.apply_mode(Decision {
                verdict: crate::policy::Verdict::Deny,
                reason: Reason::NoMatchingRule,
                rule: None,
            })),
        };
        if let Some(sv) = sni_verdict
            && !sv.decision.is_allowed()
        {
            let outcome = if sv.pass {
                Outcome::WouldDeny
            } else {
                Outcome::Deny
            };
            let by_name = found.map(|name| Target {
                host: Host::Name(name),
                port: target.port,
            });
            let what = by_name.as_ref().unwrap_or(&target);
            let label = format!("{what} (TLS name inside CONNECT {shown})");
            let rule = live.rule_text(&sv.decision);
            live.note(
                ListenerKind::Connect,
                peer,
                Some(what),
                &label,
                outcome,
                "sni_not_allowed",
                &rule,
            );
            if !sv.pass {
                return;
            }
            v.would_deny = true;
        }
    }
    if !buf.is_empty() && upstream.write_all(&buf).await.is_err() {
        return;
    }
    live.metrics.tunnel_up.inc_by(buf.len() as u64);
    let counters = relay::Counters {
        up: &live.metrics.tunnel_up,
        down: &live.metrics.tunnel_down,
    };
    let (up, down) = match client {
        ClientSide::Tcp(s) => relay::splice_both(s, upstream, cfg.idle_timeout, counters).await,
        ClientSide::Upgraded(s) => relay::copy_both(s, upstream, cfg.idle_timeout, counters).await,
    };
    let up = up + buf.len() as u64;
    tracing::info!(
        listener = "connect",
        client = %peer,
        target = %shown,
        upstream = %addr,
        sni = %sni,
        decision = if v.would_deny { "would_deny" } else { "allow" },
        rule = %live.rule_text(&v.decision),
        mode = cfg.mode.as_str(),
        bytes_up = up,
        bytes_down = down,
        duration_ms = started.elapsed().as_millis() as u64,
        "tunnel closed"
    );
}
