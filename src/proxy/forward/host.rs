//! The host an HTTP request names (its absolute-form authority, else its `Host`), for
//! requests that arrive at a destination already known: inside a CONNECT tunnel, or
//! redirected to the transparent listener. Pure, and fuzzed.

use crate::policy::{InvalidTarget, Target};

/// What a request names, judged against the port it arrived for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Returned by value once per request; boxing the target would allocate for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Named {
    /// No authority and no (or an empty) `Host`.
    Absent,
    /// A host on `port`.
    Host(Target),
    /// Not a host on that port: another port, userinfo, or not an authority at all.
    Mismatch,
    /// An authority whose host is not a valid host.
    Invalid(InvalidTarget),
}

/// Judge `named` (an authority or `Host` value, as bytes) for a request that arrived for
/// `port`; a port it names must be that one (RFC 9110 §7.2).
pub fn named(named: Option<&[u8]>, port: u16) -> Named {
    let Some(bytes) = named.filter(|b| !b.is_empty()) else {
        return Named::Absent;
    };
    let Some(authority) = std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<hyper::http::uri::Authority>().ok())
    else {
        return Named::Mismatch;
    };
    if authority.as_str().contains('@') {
        return Named::Mismatch;
    }
    if authority.port().is_some() && authority.port_u16() != Some(port) {
        return Named::Mismatch;
    }
    match Target::from_parts(authority.host(), port) {
        Ok(t) => Named::Host(t),
        Err(e) => Named::Invalid(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_ports_and_what_is_refused() {
        let host = |s: &str| named(Some(s.as_bytes()), 80);
        assert!(matches!(host("Web.Test"), Named::Host(t) if t.to_string() == "web.test:80"));
        assert!(matches!(host("web.test:80"), Named::Host(_)));
        assert_eq!(host("web.test:8080"), Named::Mismatch);
        assert_eq!(host("web.test@evil.test"), Named::Mismatch);
        assert_eq!(host("evil test"), Named::Mismatch);
        assert!(matches!(host("[::1]"), Named::Host(_)));
        assert!(matches!(host("bad_%"), Named::Mismatch | Named::Invalid(_)));
        assert_eq!(named(None, 80), Named::Absent);
        assert_eq!(named(Some(b""), 80), Named::Absent);
    }
}
