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
use super::relay;
use super::respond::{Body, full, refuse};
use super::sni::{MAX_HELLO, SniError, server_name};
use super::{Live, Shared, Verdict};
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
        Err(e) => return live.refuse_invalid("connect", peer, &raw, e),
    };
    let shown = target.to_string();
    let v = live.judge(&target, PathView::Hidden);
    live.log_decision("connect", peer, &shown, &v);
    if !v.pass {
        return live.forbidden(&shown, &v.decision);
    }
    let started = Instant::now();
    let (upstream, addr) = match dial(&target, v.decision.is_allowed(), &live.config.dial).await {
        Ok(x) => x,
        Err(e) => return dial_failed(&live, peer, &shown, &e),
    };
    let guard = shared.tracker.track();
    tokio::spawn(async move {
        let _guard = guard;
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

/// The response (and log line) for a dial that failed after the policy allowed it.
pub(super) fn dial_failed(
    live: &Live,
    peer: SocketAddr,
    target: &str,
    e: &DialError,
) -> Response<Body> {
    let (error, details) = e.proxy_status();
    let status = match e {
        DialError::Forbidden(_) | DialError::SelfConnection(_) => StatusCode::FORBIDDEN,
        DialError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    tracing::warn!(client = %peer, target, decision = "deny", reason = details, mode = live.config.mode.as_str(), error = %e, "upstream not reached");
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
    match upgraded.downcast::<TokioIo<Rewind<TcpStream>>>() {
        Ok(parts) => {
            let (mut pending, tcp) = parts.io.into_inner().into_parts();
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
            let decision = if sv.pass { "would_deny" } else { "deny" };
            tracing::warn!(
                listener = "connect",
                client = %peer,
                target = %shown,
                sni = %sni,
                decision,
                reason = "sni_not_allowed",
                mode = cfg.mode.as_str(),
                "TLS server name inside the tunnel is not allowed"
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
    let (up, down) = match client {
        ClientSide::Tcp(s) => relay::splice_both(s, upstream, cfg.idle_timeout).await,
        ClientSide::Upgraded(s) => relay::copy_both(s, upstream, cfg.idle_timeout).await,
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
