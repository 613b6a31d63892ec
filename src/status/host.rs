//! Which `Host` the status page answers: against DNS rebinding, a page that a hostile site
//! got a browser to load under its own name (rebound to the admin address) must not be
//! served, since the browser would then let that site's script read it.

use std::net::{IpAddr, SocketAddr};

/// Whether a request naming `host` (its `Host` header, `None` when absent) is for this
/// listener: `local` is the accepted socket's own address (so that a listener bound to
/// 0.0.0.0 knows the address it was reached at), `peer` the client's.
///
/// Accepted: the listener's own address and port; and, on a loopback connection (an SSH
/// tunnel ends on loopback), `localhost` or a loopback address on any port, since a
/// tunnel's local port need not be the listener's. A name other than `localhost` never
/// passes: only a name can be rebound.
pub fn is_ours(host: Option<&[u8]>, local: SocketAddr, peer: SocketAddr) -> bool {
    let Some((name, port)) = host.and_then(split) else {
        return false;
    };
    let loopback =
        peer.ip().to_canonical().is_loopback() && local.ip().to_canonical().is_loopback();
    match name.parse::<IpAddr>() {
        Ok(ip) => {
            let ip = ip.to_canonical();
            (ip == local.ip().to_canonical() && port.unwrap_or(80) == local.port())
                || (loopback && ip.is_loopback())
        }
        Err(_) => loopback && name.eq_ignore_ascii_case("localhost"),
    }
}

/// `host[:port]` or `[v6][:port]` into the host (brackets removed) and the port.
fn split(raw: &[u8]) -> Option<(&str, Option<u16>)> {
    let raw = std::str::from_utf8(raw).ok()?.trim();
    let (name, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        match after {
            "" => (v6, None),
            p => (v6, Some(p.strip_prefix(':')?)),
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (raw, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    (!name.is_empty()).then_some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(host: &str, local: &str, peer: &str) -> bool {
        is_ours(
            Some(host.as_bytes()),
            local.parse().unwrap(),
            peer.parse().unwrap(),
        )
    }

    #[test]
    fn the_listeners_own_address_and_localhost_on_loopback_pass() {
        let lo = "127.0.0.1:9464";
        let peer = "127.0.0.1:50000";
        assert!(ours("127.0.0.1:9464", lo, peer));
        assert!(ours("localhost:9464", lo, peer));
        assert!(ours("LOCALHOST:8080", lo, peer), "a tunnel's own port");
        assert!(ours("localhost", lo, peer));
        assert!(ours("127.0.0.1:8080", lo, peer));
        assert!(ours("[::1]:9464", "[::1]:9464", "[::1]:40000"));
        // Bound to 0.0.0.0 and reached at 10.0.0.5.
        assert!(ours("10.0.0.5:9464", "10.0.0.5:9464", "10.0.0.9:1234"));
        assert!(ours(
            "10.0.0.5:9464",
            "[::ffff:10.0.0.5]:9464",
            "[::ffff:10.0.0.9]:1234"
        ));
    }

    #[test]
    fn names_other_addresses_and_localhost_from_afar_are_refused() {
        let lo = "127.0.0.1:9464";
        let peer = "127.0.0.1:50000";
        assert!(!ours("evil.example:9464", lo, peer));
        assert!(!ours("evil.example", lo, peer));
        assert!(!ours("127.0.0.1.evil.example:9464", lo, peer));
        assert!(!ours("", lo, peer));
        assert!(!ours("127.0.0.1:notaport", lo, peer));
        assert!(!is_ours(None, lo.parse().unwrap(), peer.parse().unwrap()));
        let far = "10.0.0.5:9464";
        assert!(!ours("localhost:9464", far, "10.0.0.9:1234"));
        assert!(!ours("10.0.0.5:9465", far, "10.0.0.9:1234"));
        assert!(!ours("10.0.0.6:9464", far, "10.0.0.9:1234"));
        assert!(!ours("aml-egress.svc:9464", far, "10.0.0.9:1234"));
    }
}
