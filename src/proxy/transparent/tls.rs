//! A redirected TLS connection: the ClientHello read as inside a CONNECT tunnel, decided on
//! its server name and the original port, the name dialled (never an address the client
//! chose), the handshake followed until the server commits, then relayed.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;

use super::destination;
use crate::config::TransparentDial;
use crate::metrics::ListenerKind;
use crate::policy::{Host, PathView, Target};
use crate::proxy::addr::ClientAddr;
use crate::proxy::connect::handshake::{
    self, ClientSide, Held, Start, Unread, ech_seen, read_hello,
};
use crate::proxy::connect::sni::HelloReader;
use crate::proxy::connect::tunnel::inspected_session;
use crate::proxy::dial::dial_preferring;
use crate::proxy::plumbing::Slot;
use crate::proxy::refusal::{self, AllowCount, Count, Refusal, Seen, Unanswerable, denial};
use crate::proxy::state::Shared;
use crate::reason::ReasonCode;

/// A redirected TLS connection: read the ClientHello, decide, dial, follow the handshake,
/// relay. `permit` is the connection's place under `proxy.max_connections`, held until it
/// ends (handed on to an inspected session, whose upgraded WebSockets outlive it).
pub(crate) async fn serve(
    stream: TcpStream,
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
) {
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
    let v = match first.server_name {
        Some(_) => live.judge(client, &target, PathView::Hidden),
        None => live.judge_nameless_tls(client, &target),
    };
    // Inspected: the proxy ends the handshake itself (so an ECH extension is moot), and
    // each request inside is decided on its own.
    if let Some(inspector) = &live.inspector
        && live.inspects(&target, &v)
    {
        if inspector.ca_expired(std::time::SystemTime::now()) {
            let reason = ReasonCode::InspectCaExpired;
            let answer = refuse(reason, "", &target, "", false, Count::Now);
            handshake::answer(&mut side, answer).await;
            return;
        }
        if !first.alpn.inspectable() {
            let reason = ReasonCode::TlsAlpnNotInspectable;
            let answer = refuse(reason, first.alpn.shown(), &target, "", false, Count::Now);
            handshake::answer(&mut side, answer).await;
            return;
        }
        let session =
            inspected_session(inspector, (client, target), (shared.clone(), Some(permit)));
        Box::pin(session.serve(side, buf)).await;
        return;
    }
    if first.encrypted_client_hello && !cfg.ech_allowed {
        // The real name is encrypted: the outer one is not where the server sends it.
        let target = first.server_name.map_or(dst, |name| Target {
            host: Host::Name(name),
            port: orig.0.port(),
        });
        let seen = ech_seen(&first);
        let answer = refuse(
            ReasonCode::TlsEchPresent,
            &seen,
            &target,
            "",
            false,
            Count::Now,
        );
        handshake::answer(&mut side, answer).await;
        return;
    }
    let counted = if v.pass && !v.would_deny {
        Some(AllowCount::new(&live, via, client, &target, &v))
    } else {
        // Both reasons are policy answers, which audit mode lets pass.
        let pass = v.pass;
        let rule = live.rule_text(&v);
        let answer = refuse(
            refusal::name_reason(reason, &v.decision),
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
    let dialled = dial_preferring(
        &target,
        prefer,
        v.decision.is_allowed(),
        live.dial_of(v.policy),
    )
    .await;
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
            let count = Count::instead_of(counted);
            let answer = refuse(reason, &seen, &target, "", false, count);
            handshake::answer(&mut side, answer).await;
            return;
        }
    }
    drop(counted); // an allow
    let _open = live
        .metrics
        .open(true, live.mode_of(v.policy))
        .on(permit.tunnel_gauge());
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
        rule = %live.rule_text(&v),
        policy = live.policy_name(v.policy),
        mode = live.mode_of(v.policy).as_str(),
        bytes_up = up,
        bytes_down = down,
        duration_ms = started.elapsed().as_millis() as u64,
        "transparent connection closed"
    );
}
