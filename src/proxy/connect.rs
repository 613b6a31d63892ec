//! `CONNECT host:port`: decide, dial, and only then answer `200`; then check the TLS name
//! inside the tunnel (on TLS ports) and copy both ways until either side closes or the
//! tunnel sits idle too long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::dial::{DialError, dial};
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
                let io = TokioIo::new(upgraded);
                tokio::select! {
                    _ = tunnel(io, upstream, target, &live, peer, v, addr, started) => {}
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

#[allow(clippy::too_many_arguments)]
async fn tunnel<C>(
    mut client: C,
    mut upstream: TcpStream,
    target: Target,
    live: &Live,
    peer: SocketAddr,
    mut v: Verdict,
    addr: SocketAddr,
    started: Instant,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let shown = target.to_string();
    let cfg = &live.config;
    let mut sni = String::new();
    if cfg.tls_ports.contains(&target.port) {
        let mut buf = BytesMut::with_capacity(2048);
        let deadline = tokio::time::Instant::now() + cfg.sni_timeout;
        let found = loop {
            match server_name(&buf) {
                Err(SniError::Incomplete) if buf.len() < MAX_HELLO + 64 => {
                    match tokio::time::timeout_at(deadline, client.read_buf(&mut buf)).await {
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
        if upstream.write_all(&buf).await.is_err() {
            return;
        }
    }
    let (up, down) = splice(client, upstream, cfg.idle_timeout).await;
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

/// Copy both ways until both directions end; a direction that sees no traffic either way
/// for `idle` ends the tunnel. Returns bytes client→upstream and upstream→client.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    tokio::join!(
        pipe(&mut ar, &mut bw, idle, &last, start),
        pipe(&mut br, &mut aw, idle, &last, start)
    )
}

async fn pipe<R, W>(r: &mut R, w: &mut W, idle: Duration, last: &AtomicU64, start: Instant) -> u64
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match tokio::time::timeout(idle, r.read(&mut buf)).await {
            Err(_) => {
                let quiet = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
                if quiet < idle.as_millis() as u64 {
                    continue;
                }
                break;
            }
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                total += n as u64;
                last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = w.shutdown().await;
    total
}
