//! Every reason a decision can carry, the policy's and the proxy's, as one enum: the
//! metrics index by it, and logs, `Proxy-Status` (RFC 9209 `details`) and `check --json`
//! print its stable code.

use serde::{Serialize, Serializer};

/// Declares the enum with its codes (the strings on the wire, which never change).
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident = $code:literal,)+) => {
        /// Why a request was allowed or refused; [`ReasonCode::as_str`] is the stable code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ReasonCode { $($(#[$doc])* $variant,)+ }

        impl ReasonCode {
            /// Every reason, in metric-slot order.
            pub const ALL: &'static [ReasonCode] = &[$(ReasonCode::$variant,)+];

            /// The machine-readable code.
            pub const fn as_str(self) -> &'static str {
                match self { $(ReasonCode::$variant => $code,)+ }
            }
        }
    };
}

reasons! {
    /// Allowed by a rule.
    Rule = "rule",
    /// Allowed by a path rule widened to its host over TLS.
    RuleWidened = "rule_widened",
    /// Refused by an operator `[[deny]]` entry (a name, or an address inside a CIDR).
    DenyRule = "deny_rule",
    NoMatchingRule = "no_matching_rule",
    PortNotAllowed = "port_not_allowed",
    PathNotAllowed = "path_not_allowed",
    PathHiddenByTls = "path_hidden_by_tls",
    InvalidTarget = "invalid_target",
    /// The TLS name inside a tunnel is not allowed on its port.
    SniNotAllowed = "sni_not_allowed",
    /// The address guard or the self check refused every address.
    ForbiddenAddress = "forbidden_address",
    DnsFailed = "dns_failed",
    NoAddress = "no_address",
    DialTimeout = "dial_timeout",
    DialFailed = "dial_failed",
    /// The upstream gave no (valid) response.
    UpstreamResponse = "upstream_response",
    /// A tunnel's TLS bytes are not one well-formed ClientHello.
    TlsHelloInvalid = "tls_hello_invalid",
    TlsHelloTimeout = "tls_hello_timeout",
    /// A ClientHello without a server name, under `proxy.sni_missing = "deny"`.
    NoServerName = "no_server_name",
    SniChangedAfterRetry = "sni_changed_after_retry",
    /// A ClientHello carrying an encrypted one (ECH), under `proxy.ech = "deny"`.
    TlsEchPresent = "tls_ech_present",
    /// Neither TLS nor HTTP/1 in a tunnel outside `proxy.opaque_ports`.
    TunnelProtocolNotAllowed = "tunnel_protocol_not_allowed",
    /// A request inside a tunnel names another host or port than the CONNECT.
    HostMismatch = "host_mismatch",
    /// Only a wildcard narrowed by `catalog.narrow` matches, and not to this name.
    WildcardNarrowed = "wildcard_narrowed",
    /// An address on a TLS port that only a service tag's (or other catalog) prefix allows.
    ServiceTagWithoutName = "service_tag_without_name",
    /// An inspected request's upstream presented a certificate that did not verify.
    UpstreamCertificateInvalid = "upstream_certificate_invalid",
    /// A tunnel that needs inspection while the inspection CA has expired.
    InspectCaExpired = "inspect_ca_expired",
    /// A hello to an inspected name whose ALPN offers no protocol the inspected session
    /// speaks (HTTP/1.1).
    TlsAlpnNotInspectable = "tls_alpn_not_inspectable",
    /// No `[[client_policy]]` claims the client, under `policy.unmatched_clients = "refuse"`.
    NoPolicyForClient = "no_policy_for_client",
}

impl ReasonCode {
    /// The reason in a few words, for the status line's reason phrase.
    pub const fn words(self) -> &'static str {
        match self {
            ReasonCode::Rule | ReasonCode::RuleWidened => "allowed",
            ReasonCode::DenyRule => "denied by a deny entry",
            ReasonCode::NoMatchingRule => "no rule matches",
            ReasonCode::PortNotAllowed => "port not allowed",
            ReasonCode::PathNotAllowed => "path not allowed",
            ReasonCode::PathHiddenByTls => "path rules cannot see inside TLS",
            ReasonCode::InvalidTarget => "invalid target",
            ReasonCode::SniNotAllowed => "TLS name not allowed",
            ReasonCode::ForbiddenAddress => "address refused by the guard",
            ReasonCode::DnsFailed => "name does not resolve",
            ReasonCode::NoAddress => "name has no address",
            ReasonCode::DialTimeout => "connect timed out",
            ReasonCode::DialFailed => "connect failed",
            ReasonCode::UpstreamResponse => "no valid response from the upstream",
            ReasonCode::TlsHelloInvalid => "malformed TLS hello",
            ReasonCode::TlsHelloTimeout => "TLS hello too slow",
            ReasonCode::NoServerName => "no server name",
            ReasonCode::SniChangedAfterRetry => "TLS name changed after retry",
            ReasonCode::TlsEchPresent => "encrypted client hello",
            ReasonCode::TunnelProtocolNotAllowed => "protocol not allowed in a tunnel",
            ReasonCode::HostMismatch => "Host names another host or port",
            ReasonCode::WildcardNarrowed => "name not among the narrowed wildcard's names",
            ReasonCode::ServiceTagWithoutName => "address without a server name",
            ReasonCode::UpstreamCertificateInvalid => "upstream certificate did not verify",
            ReasonCode::InspectCaExpired => "inspection CA expired",
            ReasonCode::TlsAlpnNotInspectable => "TLS protocol offer cannot be inspected",
            ReasonCode::NoPolicyForClient => "no policy serves this client",
        }
    }

    /// The position among [`ReasonCode::ALL`] (a metric slot).
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_positions_and_codes_are_unique() {
        for (i, r) in ReasonCode::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let codes: std::collections::BTreeSet<&str> =
            ReasonCode::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), ReasonCode::ALL.len());
    }
}
