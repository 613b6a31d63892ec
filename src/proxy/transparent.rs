//! Transparent mode, for a network virtual appliance: connections that the firewall
//! redirected here (`REDIRECT`), with their original destination read from the socket
//! (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`).
//!
//! - TLS: the ClientHello is read exactly as inside a CONNECT tunnel (bounded, fail closed,
//!   HelloRetryRequest followed) and decided on its server name and the original port; the
//!   proxy then dials what the name resolves to, never an address the client chose
//!   (`transparent.dial`). Without a name only the CIDR rules on the original destination
//!   can allow it.
//! - HTTP: each request is decided on `Host`, the original port and the path, and
//!   forwarded by the same code as absolute-form requests.
//!
//! A connection whose original destination is the proxy itself is refused, never dialled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;

use super::addr::{ClientAddr, OrigDstAddr};
use super::connect::handshake::{self, ClientSide, Held, Start, Unread, read_hello};
use super::connect::sni::HelloReader;
use super::dial::{canonical, dial_preferring};
use super::plumbing::Slot;
use super::refusal::{self, AllowCount, Count, Refusal, Seen, Unanswerable, denial};
use super::serve::serve_connection;
use super::state::{Live, Shared};
use crate::config::TransparentDial;
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{Host, PathView, Target};
use crate::reason::ReasonCode;

/// The destination the client connected to before the firewall redirected it. IPv4 flows
/// (also those accepted on a dual-stack `[::]` listener, whose peer is `::ffff:a.b.c.d`)
/// carry it in `SO_ORIGINAL_DST`, IPv6 flows in `IP6T_SO_ORIGINAL_DST`.
pub fn original_destination(
    stream: &TcpStream,
    client: ClientAddr,
) -> std::io::Result<OrigDstAddr> {
    use rustix::net::sockopt::{ip_original_dst, ipv6_original_dst};
    let orig = match client.ip().is_ipv4() {
        true => SocketAddr::V4(ip_original_dst(stream)?),
        false => SocketAddr::V6(ipv6_original_dst(stream)?),
    };
    Ok(OrigDstAddr(orig))
}

/// The original destination as a target, or `None` (logged and counted) when it cannot be
/// read or is the proxy itself: a client that connected to the listener directly, or a
/// redirect loop.
fn destination(
    stream: &TcpStream,
    client: ClientAddr,
    live: &Live,
    via: ListenerKind,
) -> Option<(OrigDstAddr, Target)> {
    let orig = match original_destination(stream, client) {
        Ok(o) => o,
        Err(e) => {
            if live.logs.line() {
                tracing::warn!(listener = via.as_str(), client = %client, error = %e, "no original destination on a transparent connection (was it redirected here?); closed");
            }
            return None;
        }
    };
    let target = Target {
        host: Host::Ip(canonical(orig.0.ip())),
        port: orig.0.port(),
    };
    if live.config.dial.is_proxy_itself(orig) {
        let shown = target.to_string();
        // Closed without an answer: the client did not ask this proxy for anything.
        let refusal = Refusal {
            seen: Seen {
                via,
                client,
                target: Some(&target),
                shown: &shown,
                seen: "(the original destination is this proxy)",
                outcome: Outcome::Deny,
                reason: ReasonCode::ForbiddenAddress,
                rule: "",
            },
            answer: (),
        };
        refusal.issue(live, Count::Now);
        return None;
    }
    Some((orig, target))
}

/// A redirected TLS connection: read the ClientHello, decide, dial, follow the handshake,
/// relay.
pub(super) async fn tls(stream: TcpStream, client: ClientAddr, shared: Arc<Shared>) {
    let started = Instant::now();
    let live = shared.live();
    let via = ListenerKind::TransparentTls;
    let Some((orig, dst)) = destination(&stream, client, &live, via) else {
        return;
    };
    let cfg = &live.config;
    let mut side = ClientSide::Tcp(stream);
    let mut buf = BytesMut::new();
    let deadline = Deadline::now() + cfg.sni_timeout;
    // Count, record and log a refusal, and give the client its answer.
    let refuse =
        |reason: ReasonCode, seen: &str, target: &Target, rule: &str, pass: bool, count| {
            let shown = format!("{target} (redirected to {dst})");
            let refusal = Refusal::in_tls(Seen {
                via,
                client,
                target: Some(target),
                shown: &shown,
                seen,
                outcome: denial(pass),
                reason,
                rule,
            });
            refusal.issue(&live, count)
        };
    let first = match read_hello(&mut side, &mut buf, HelloReader::default(), deadline).await {
        Ok(h) => h,
        Err(Unread::Gone) => return,
        Err(Unread::Refused(reason, seen)) => {
            let answer = refuse(reason, &seen, &dst, "", false, Count::Now);
            handshake::answer(&mut side, answer).await;
            return;
        }
    };
    // By its server name on the original port; without one, only the CIDR rules on the
    // original destination can allow it.
    let (target, reason) = match first.server_name {
        Some(name) => (
            Target {
                host: Host::Name(name),
                port: orig.0.port(),
            },
            ReasonCode::SniNotAllowed,
        ),
        None => (dst, ReasonCode::NoServerName),
    };
    let v = live.judge(&target, PathView::Hidden);
    let counted = if v.pass && !v.would_deny {
        Some(AllowCount::new(&live, via, &v))
    } else {
        // Both reasons are policy answers, which audit mode lets pass.
        let pass = v.pass;
        let rule = live.rule_text(&v.decision);
        let answer = refuse(
            reason,
            &target.to_string(),
            &target,
            &rule,
            pass,
            Count::Now,
        );
        if !pass {
            handshake::answer(&mut side, answer).await;
            return;
        }
        None
    };
    let prefer = match (cfg.transparent_dial, first.server_name) {
        (TransparentDial::OriginalIfResolved, Some(_)) => Some(orig.0.ip()),
        _ => None,
    };
    let dial_started = Instant::now();
    let dialled = dial_preferring(&target, prefer, v.decision.is_allowed(), &cfg.dial).await;
    live.metrics.dial(dialled.is_ok(), dial_started.elapsed());
    let (mut upstream, addr) = match dialled {
        Ok(x) => x,
        Err(e) => {
            // Counted and logged; inside TLS the client gets an alert, not the HTTP answer.
            let _ = refusal::dial_failed(&live, via, client, &target, &e, counted);
            handshake::answer(&mut side, Unanswerable::Alert).await;
            return;
        }
    };
    let mut held = Held::new(&mut buf);
    let followed = held
        .follow(
            &mut side,
            &mut upstream,
            &first,
            cfg.idle_timeout,
            cfg.sni_timeout,
        )
        .await;
    let (sent, client_done, down) = (held.sent, held.client_done, held.down);
    match followed {
        Ok(()) => {}
        Err(Unread::Gone) => return,
        Err(Unread::Refused(reason, seen)) => {
            let count = counted.map_or(Count::Now, Count::Instead);
            let answer = refuse(reason, &seen, &target, "", false, count);
            handshake::answer(&mut side, answer).await;
            return;
        }
    }
    drop(counted); // an allow
    let _open = live.metrics.open(true, cfg.mode);
    let start = Start {
        buf,
        sent,
        client_done,
        down,
    };
    let (up, down) = handshake::relay(side, upstream, start, cfg.idle_timeout, &live.metrics).await;
    tracing::info!(
        listener = via.as_str(),
        client = %client,
        target = %target,
        original_destination = %orig,
        upstream = %addr,
        decision = if v.would_deny { "would_deny" } else { "allow" },
        rule = %live.rule_text(&v.decision),
        mode = cfg.mode.as_str(),
        bytes_up = up,
        bytes_down = down,
        duration_ms = started.elapsed().as_millis() as u64,
        "transparent connection closed"
    );
}

/// A redirected plain HTTP connection: requests decided on `Host`, the original port and
/// the path, forwarded like absolute-form requests.
pub(super) async fn http(
    stream: TcpStream,
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
) {
    let live = shared.live();
    let Some((orig, _)) = destination(&stream, client, &live, ListenerKind::TransparentHttp) else {
        return;
    };
    drop(live);
    let handle = move |req, client, shared: Arc<Shared>| {
        super::forward::http::forward_transparent(req, client, shared.live(), orig)
    };
    serve_connection(stream, client, shared, permit, handle).await;
}
