//! Parsing and normalisation of destinations (`host:port`) as they arrive from clients.
//!
//! Everything here treats its input as hostile: sizes are bounded, nothing allocates, and
//! every malformed input maps to one [`InvalidTarget`] variant so that a refusal can say
//! exactly what was wrong.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest DNS name accepted, without the optional trailing dot (RFC 1035).
pub const MAX_NAME_LEN: usize = 253;
/// Longest single label accepted (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a destination was refused before any rule was consulted.
///
/// Each variant is a distinct, user-facing explanation; all of them share the
/// machine-readable reason `invalid_target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidTarget {
    #[error("the target is empty")]
    Empty,
    #[error("the target has no port (write host:port, for example example.com:443)")]
    MissingPort,
    #[error("the port is not a number from 1 to 65535")]
    BadPort,
    #[error("the host is empty")]
    EmptyHost,
    #[error("the host has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("a label of the host is longer than 63 characters")]
    LabelTooLong,
    #[error("the host is longer than 253 characters")]
    NameTooLong,
    #[error("the host holds a character other than letters, digits, '-', '_' and '.'")]
    BadCharacter,
    #[error("the target holds user information ('@'), which a proxy target never carries")]
    UserInfo,
    #[error("the target holds a percent sign (percent-encoding is not accepted in a host)")]
    Percent,
    #[error("the target holds a wildcard '*'")]
    Wildcard,
    #[error("an IPv6 address must be written in brackets, for example [2001:db8::1]:443")]
    UnbracketedIpv6,
    #[error("the bracketed part is not a valid IPv6 address")]
    BadIpv6,
    #[error(
        "the host looks numeric but is not a dotted-quad IPv4 address (numeric forms such as 2130706433 or 0x7f.1 are refused)"
    )]
    AmbiguousNumeric,
}

/// A lower-cased DNS name held inline, so that normalising a hostile name never allocates.
#[derive(Clone, Copy)]
pub struct Name {
    buf: [u8; MAX_NAME_LEN],
    len: u8,
}

impl Name {
    /// Validate and normalise a host name (no port): lower case, one trailing dot removed.
    pub fn parse(input: &str) -> Result<Self, InvalidTarget> {
        let bytes = input.as_bytes();
        let bytes = bytes.strip_suffix(b".").unwrap_or(bytes);
        if bytes.is_empty() {
            return Err(InvalidTarget::EmptyHost);
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(InvalidTarget::NameTooLong);
        }
        let mut buf = [0u8; MAX_NAME_LEN];
        let mut label_len = 0usize;
        for (dst, &b) in buf.iter_mut().zip(bytes) {
            *dst = match b {
                b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => b,
                b'A'..=b'Z' => b | 0x20,
                b'.' => {
                    if label_len == 0 {
                        return Err(InvalidTarget::EmptyLabel);
                    }
                    label_len = 0;
                    *dst = b'.';
                    continue;
                }
                b'@' => return Err(InvalidTarget::UserInfo),
                b'%' => return Err(InvalidTarget::Percent),
                b'*' => return Err(InvalidTarget::Wildcard),
                _ => return Err(InvalidTarget::BadCharacter),
            };
            label_len += 1;
            if label_len > MAX_LABEL_LEN {
                return Err(InvalidTarget::LabelTooLong);
            }
        }
        if label_len == 0 {
            return Err(InvalidTarget::EmptyLabel);
        }
        // A last label starting with a digit is never a real top-level domain; such
        // names are numeric address forms that resolvers may turn into any address.
        let last_label_start = bytes.iter().rposition(|&b| b == b'.').map_or(0, |i| i + 1);
        if bytes[last_label_start].is_ascii_digit() {
            return Err(InvalidTarget::AmbiguousNumeric);
        }
        Ok(Name {
            buf,
            len: bytes.len() as u8,
        })
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes are ever written into `buf`.
        std::str::from_utf8(&self.buf[..self.len as usize]).unwrap_or("")
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for Name {}

/// The host part of a target: a DNS name or an address literal.
// The inline name is the point: parsing a hostile name must not allocate.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// A validated, lower-cased DNS name.
    Name(Name),
    /// An IP literal; IPv4-mapped IPv6 literals are kept as written and unmapped by the matcher.
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n.as_str()),
            Host::Ip(IpAddr::V4(a)) => write!(f, "{a}"),
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
        }
    }
}

/// A normalised destination: what every policy decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Name or address.
    pub host: Host,
    /// TCP or UDP port, never 0.
    pub port: u16,
}

impl Target {
    /// Parse `host:port`, `[v6]:port` or `a.b.c.d:port` as sent in a CONNECT line or an
    /// absolute URI's authority.
    pub fn parse(input: &str) -> Result<Self, InvalidTarget> {
        if input.is_empty() {
            return Err(InvalidTarget::Empty);
        }
        if let Some(&b) = input
            .as_bytes()
            .iter()
            .find(|b| matches!(b, b'@' | b'%' | b'*'))
        {
            return Err(match b {
                b'@' => InvalidTarget::UserInfo,
                b'%' => InvalidTarget::Percent,
                _ => InvalidTarget::Wildcard,
            });
        }
        if let Some(rest) = input.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').ok_or(InvalidTarget::BadIpv6)?;
            let port = after.strip_prefix(':').ok_or(InvalidTarget::MissingPort)?;
            let addr: Ipv6Addr = parse_ipv6(addr)?;
            return Ok(Target {
                host: Host::Ip(IpAddr::V6(addr)),
                port: parse_port(port)?,
            });
        }
        let (host, port) = input.rsplit_once(':').ok_or(InvalidTarget::MissingPort)?;
        if host.contains(':') {
            return Err(InvalidTarget::UnbracketedIpv6);
        }
        let port = parse_port(port)?;
        Ok(Target {
            host: parse_host(host)?,
            port,
        })
    }

    /// Build a target from a host (name or unbracketed/bracketed address) and a port.
    pub fn from_parts(host: &str, port: u16) -> Result<Self, InvalidTarget> {
        if port == 0 {
            return Err(InvalidTarget::BadPort);
        }
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => Host::Ip(IpAddr::V6(parse_ipv6(v6)?)),
            None => parse_host(host)?,
        };
        Ok(Target { host, port })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn parse_host(host: &str) -> Result<Host, InvalidTarget> {
    if host.is_empty() {
        return Err(InvalidTarget::EmptyHost);
    }
    if host.as_bytes()[0].is_ascii_digit() && host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        // Only the canonical dotted quad counts as an address; anything else numeric is
        // refused by `Name::parse` below.
        if let Ok(v4) = host.parse::<Ipv4Addr>() {
            return Ok(Host::Ip(IpAddr::V4(v4)));
        }
    }
    Name::parse(host).map(Host::Name)
}

fn parse_ipv6(addr: &str) -> Result<Ipv6Addr, InvalidTarget> {
    if addr.contains('%') {
        return Err(InvalidTarget::Percent);
    }
    addr.parse().map_err(|_| InvalidTarget::BadIpv6)
}

/// Parse a decimal port from 1 to 65535; signs, spaces and more than five digits are refused.
pub fn parse_port(port: &str) -> Result<u16, InvalidTarget> {
    if port.is_empty() {
        return Err(InvalidTarget::MissingPort);
    }
    if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidTarget::BadPort);
    }
    match port.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(InvalidTarget::BadPort),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        match Target::parse(s).unwrap().host {
            Host::Name(n) => n.as_str().to_owned(),
            Host::Ip(ip) => ip.to_string(),
        }
    }

    #[test]
    fn names_are_lowercased_and_lose_one_trailing_dot() {
        assert_eq!(name("PyPI.ORG.:443"), "pypi.org");
        assert_eq!(
            Target::parse("pypi.org..:443"),
            Err(InvalidTarget::EmptyLabel)
        );
    }

    #[test]
    fn invalid_targets_are_named() {
        let cases = [
            ("", InvalidTarget::Empty),
            ("pypi.org", InvalidTarget::MissingPort),
            ("pypi.org:", InvalidTarget::MissingPort),
            ("pypi.org:0", InvalidTarget::BadPort),
            ("pypi.org:65536", InvalidTarget::BadPort),
            ("pypi.org:+443", InvalidTarget::BadPort),
            ("pypi.org:https", InvalidTarget::BadPort),
            (":443", InvalidTarget::EmptyHost),
            ("a..b:443", InvalidTarget::EmptyLabel),
            (".a.b:443", InvalidTarget::EmptyLabel),
            ("user@pypi.org:443", InvalidTarget::UserInfo),
            ("pypi%2eorg:443", InvalidTarget::Percent),
            ("*.pypi.org:443", InvalidTarget::Wildcard),
            ("pypi.org/x:443", InvalidTarget::BadCharacter),
            ("pypi org:443", InvalidTarget::BadCharacter),
            ("bücher.de:443", InvalidTarget::BadCharacter),
            ("2001:db8::1:443", InvalidTarget::UnbracketedIpv6),
            ("[2001:db8::zz]:443", InvalidTarget::BadIpv6),
            ("[fe80::1%eth0]:443", InvalidTarget::Percent),
            ("[2001:db8::1]", InvalidTarget::MissingPort),
            ("2130706433:443", InvalidTarget::AmbiguousNumeric),
            ("0x7f.1:443", InvalidTarget::AmbiguousNumeric),
            ("127.1:443", InvalidTarget::AmbiguousNumeric),
        ];
        for (input, want) in cases {
            assert_eq!(Target::parse(input), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn label_and_name_lengths_are_bounded() {
        let label63 = "a".repeat(63);
        assert!(Target::parse(&format!("{label63}.com:443")).is_ok());
        assert_eq!(
            Target::parse(&format!("a{label63}.com:443")),
            Err(InvalidTarget::LabelTooLong)
        );
        let long = format!("{0}.{0}.{0}.{1}.com", label63, "b".repeat(57));
        assert_eq!(long.len(), 253);
        assert!(Target::parse(&format!("{long}:443")).is_ok());
        assert!(Target::parse(&format!("{long}.:443")).is_ok());
        assert_eq!(
            Target::parse(&format!("x{long}:443")),
            Err(InvalidTarget::NameTooLong)
        );
    }

    #[test]
    fn ip_literals_are_addresses_not_names() {
        let t = Target::parse("20.1.2.3:443").unwrap();
        assert_eq!(t.host, Host::Ip("20.1.2.3".parse().unwrap()));
        let t = Target::parse("[2001:DB8::1]:443").unwrap();
        assert_eq!(t.host, Host::Ip("2001:db8::1".parse().unwrap()));
        assert_eq!(t.to_string(), "[2001:db8::1]:443");
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        let samples: [&[u8]; 8] = [
            b"\xff\xfe:443",
            b"[:443",
            b"]:443",
            b"[]:1",
            b"a:99999999999999999999",
            b"\0:1",
            b"[::1]:",
            b"a.b.c.d.e.f:1",
        ];
        for s in samples {
            let s = String::from_utf8_lossy(s);
            let _ = Target::parse(&s);
        }
    }
}
