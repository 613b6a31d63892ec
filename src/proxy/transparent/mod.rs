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

pub(crate) mod http;
pub(crate) mod tls;

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::addr::{ClientAddr, OrigDstAddr};
use super::dial::canonical;
use super::refusal::{Count, Refusal, Seen};
use super::state::Live;
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{Host, Target};
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
pub(crate) fn destination(
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
