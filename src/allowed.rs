//! The names each wildcard allow rule let through: what `/allowed`, `aml-egress allowed`,
//! `suggest --narrow` and the gauge `aml_egress_wildcard_names{rule}` show, so that an
//! operator can see which storage accounts (registries, vaults) compute reached under
//! `*.blob.core.windows.net` and narrow the wildcard to them (`catalog.narrow`).

use serde::{Deserialize, Serialize};

/// One name allowed under a wildcard rule, as `/allowed` serves it (a JSON array of these,
/// most recently seen first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedReport {
    /// The host name as the client named it (normalised: lower case, no trailing dot).
    pub name: String,
    pub port: u16,
    /// The wildcard pattern that allowed it, as written in rules (`*.blob.core.windows.net`,
    /// `regex:...`); rules that share a pattern share it.
    pub rule: String,
    /// Where the first rule that allowed it came from (catalog entry, config line, import).
    pub rule_source: String,
    /// Allowed decisions on this name, port and pattern since it entered the table.
    pub count: u64,
    /// RFC 3339, UTC, seconds.
    pub first_seen: String,
    pub last_seen: String,
}
