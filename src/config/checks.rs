//! Checks on typed settings: ranges, and what one key requires of another. Each problem
//! names where the value came from, the key, the value and a fix; all are reported at once.
//! Nothing here changes a value.

use super::settings::Settings;
use super::{ConfigIssue, operator_rule};
use crate::catalog::regions;
use crate::policy::did_you_mean;

/// A problem before its origin is known.
struct Problem {
    key: &'static str,
    /// The value as shown.
    value: String,
    problem: String,
    fix: Option<String>,
}

impl Problem {
    fn new(key: &'static str, value: String, problem: String, fix: Option<String>) -> Self {
        Problem {
            key,
            value,
            problem,
            fix,
        }
    }
}

/// An Azure region's programmatic name as the catalog lists it (`West Europe` and
/// `west-europe` become `westeurope`).
pub fn region_name(region: &str) -> String {
    region.to_ascii_lowercase().replace([' ', '-'], "")
}

fn range<T: PartialOrd + std::fmt::Display>(
    out: &mut Vec<Problem>,
    key: &'static str,
    value: T,
    low: T,
    high: T,
    fix: &str,
) {
    if value < low || value > high {
        out.push(Problem::new(
            key,
            value.to_string(),
            "out of range".into(),
            Some(fix.into()),
        ));
    }
}

/// Every problem in `s`, or none.
pub fn check(s: &Settings) -> Vec<ConfigIssue> {
    let mut out: Vec<Problem> = Vec::new();
    catalog(s, &mut out);
    proxy(s, &mut out);
    inspect(s, &mut out);
    operations(s, &mut out);
    let mut issues: Vec<ConfigIssue> = out
        .into_iter()
        .map(|p| ConfigIssue {
            origin: s.origin_of(p.key),
            key: p.key.to_owned(),
            value: Some(p.value),
            problem: p.problem,
            fix: p.fix,
        })
        .collect();
    for (list, entries) in [("allow", &s.allow), ("deny", &s.deny)] {
        for (i, e) in entries.iter().enumerate() {
            if let Err(issue) = operator_rule(list, i, e) {
                issues.push(ConfigIssue {
                    origin: s.origin_of(&issue.key),
                    ..issue
                });
            }
        }
    }
    issues.extend(super::clients::check(s));
    // Each client policy's catalog and rules, as its own settings (named as its keys).
    let base = super::clients::base(s);
    for cp in &s.client_policies {
        let d = super::clients::derived(&base, cp);
        let mut own = Vec::new();
        catalog(&d, &mut own);
        for p in own {
            let issue = ConfigIssue {
                origin: d.origin_of(p.key),
                key: p.key.to_owned(),
                value: Some(p.value),
                problem: p.problem,
                fix: p.fix,
            };
            issues.push(super::clients::rekey(issue, cp));
        }
        for (list, entries) in [
            ("client_policy.allow", &cp.allow),
            ("client_policy.deny", &cp.deny),
        ] {
            for (i, e) in entries.iter().enumerate() {
                if let Err(issue) = operator_rule(list, i, e) {
                    let origin = d.origin_of(&issue.key);
                    issues.push(super::clients::rekey(ConfigIssue { origin, ..issue }, cp));
                }
            }
        }
    }
    issues
}

fn catalog(s: &Settings, out: &mut Vec<Problem>) {
    let c = &s.catalog;
    if let Some(region) = &c.region {
        let known = regions(c.cloud);
        if !known.contains(&region_name(region)) {
            let near = did_you_mean(&region_name(region), known.iter().map(String::as_str));
            let fix = if near.is_empty() {
                format!(
                    "use the programmatic name of an Azure {} region (for example {})",
                    c.cloud,
                    known.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                )
            } else {
                format!("did you mean {}?", near.join(" or "))
            };
            out.push(Problem::new(
                "catalog.region",
                format!("{region:?}"),
                format!("not an Azure region of the {} cloud", c.cloud),
                Some(fix),
            ));
        }
    }
    if let Some(sa) = &c.storage_account {
        let ok = (3..=24).contains(&sa.len())
            && sa
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !ok {
            out.push(Problem::new(
                "catalog.storage_account",
                format!("{sa:?}"),
                "not a storage account name".to_owned(),
                Some(
                    "use the account name only (3 to 24 lower-case letters and digits), not a URL"
                        .into(),
                ),
            ));
        }
    }
    if let Some(acr) = &c.container_registry {
        let ok = (5..=50).contains(&acr.len()) && acr.bytes().all(|b| b.is_ascii_alphanumeric());
        if !ok {
            out.push(Problem::new(
                "catalog.container_registry",
                format!("{acr:?}"),
                "not a container registry name".to_owned(),
                Some(
                    "use the registry name only (5 to 50 letters and digits), without .azurecr.io"
                        .into(),
                ),
            ));
        }
    }
}

fn proxy(s: &Settings, out: &mut Vec<Problem>) {
    let p = &s.proxy;
    let t = &s.transparent;
    if p.listen.is_empty()
        && p.tls_listen.is_empty()
        && t.tls_listen.is_empty()
        && t.http_listen.is_empty()
    {
        out.push(Problem::new(
            "proxy.listen",
            "[]".into(),
            "no listener".into(),
            Some("give at least one address, for example \"127.0.0.1:3128\" (or transparent listeners)".into()),
        ));
    }
    if !p.tls_listen.is_empty() {
        for (key, file) in [
            ("proxy.tls_cert", &p.tls_cert),
            ("proxy.tls_key", &p.tls_key),
        ] {
            if file.is_none() {
                out.push(Problem::new(
                    key,
                    "(unset)".into(),
                    "proxy.tls_listen needs a certificate and a key".into(),
                    Some("name PEM files with proxy.tls_cert and proxy.tls_key".into()),
                ));
            }
        }
    }
    if p.tls_client_ca.is_some() && p.tls_listen.is_empty() {
        out.push(Problem::new(
            "proxy.tls_client_ca",
            format!(
                "{:?}",
                p.tls_client_ca
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default()
            ),
            "client certificates are asked for on proxy.tls_listen, which is not set".into(),
            Some("add proxy.tls_listen, or remove proxy.tls_client_ca".into()),
        ));
    }
    range(
        out,
        "proxy.max_connections",
        p.max_connections,
        1,
        1_000_000,
        "use 1 to 1000000 (each connection needs a few file descriptors)",
    );
    range(
        out,
        "proxy.max_connections_per_client",
        p.max_connections_per_client,
        0,
        1_000_000,
        "use 0 (no limit) to 1000000",
    );
    range(
        out,
        "proxy.workers",
        p.workers,
        0,
        256,
        "use 0 (one per CPU) to 256",
    );
    range(
        out,
        "proxy.max_header_bytes",
        p.max_header_bytes,
        8192,
        1 << 20,
        "use 8192 to 1048576",
    );
    for (key, d) in [
        ("proxy.header_timeout_secs", p.header_timeout_secs),
        ("proxy.idle_timeout_secs", p.idle_timeout_secs),
        ("proxy.grace_period_secs", p.grace_period_secs),
        ("proxy.sni_timeout_secs", p.sni_timeout_secs),
        ("upstream.dial_timeout_secs", s.upstream.dial_timeout_secs),
    ] {
        if d.is_zero() || d.as_secs_f64() > 86_400.0 {
            out.push(Problem::new(
                key,
                d.as_secs_f64().to_string(),
                "not a duration".into(),
                Some("use seconds from more than 0 to 86400".into()),
            ));
        }
    }
    if p.shutdown_delay_secs.as_secs_f64() > 3600.0 {
        out.push(Problem::new(
            "proxy.shutdown_delay_secs",
            p.shutdown_delay_secs.as_secs_f64().to_string(),
            "not a duration".into(),
            Some("use seconds from 0 (stop accepting at once) to 3600".into()),
        ));
    }
    for (key, ports) in [
        ("proxy.tls_ports", &p.tls_ports),
        ("proxy.opaque_ports", &p.opaque_ports),
    ] {
        if ports.contains(&0) {
            out.push(Problem::new(
                key,
                "0".into(),
                "port 0".into(),
                Some("use ports from 1 to 65535".into()),
            ));
        }
    }
    for port in p.opaque_ports.iter().filter(|o| p.tls_ports.contains(o)) {
        out.push(Problem::new(
            "proxy.opaque_ports",
            port.to_string(),
            "also in proxy.tls_ports: a tunnel cannot be both inspected and not".into(),
            Some(format!(
                "remove {port} from one of the two lists (TLS tunnels on it are checked only while it is in proxy.tls_ports)"
            )),
        ));
    }
}

/// `[inspect]`'s lists and bound. Its CA files are checked when the configuration is
/// compiled ([`crate::inspect`]), which `aml-egress ca init` skips.
fn inspect(s: &Settings, out: &mut Vec<Problem>) {
    let i = &s.inspect;
    for (key, list) in [("inspect.hosts", &i.hosts), ("inspect.bypass", &i.bypass)] {
        for entry in list {
            if let Err(problem) = crate::inspect::host_pattern(entry) {
                out.push(Problem::new(
                    key,
                    format!("{entry:?}"),
                    problem,
                    Some("write a host pattern as in rules, without a path: \"files.example.com\", \"*.blob.core.windows.net\"".into()),
                ));
            }
        }
    }
    range(
        out,
        "inspect.max_cached_certs",
        i.max_cached_certs,
        1,
        1_000_000,
        "use 1 to 1000000 (each kept certificate holds a few kilobytes)",
    );
}

fn operations(s: &Settings, out: &mut Vec<Problem>) {
    let a = &s.admin;
    if let Some(addr) = a.listen
        && !addr.ip().is_loopback()
        && a.token_file.is_none()
    {
        out.push(Problem::new(
            "admin.listen",
            format!("\"{addr}\""),
            "an admin listener off loopback needs a bearer token".into(),
            Some("set admin.token_file to a file holding the token, or listen on 127.0.0.1".into()),
        ));
    }
    if let Some(f) = &a.token_file {
        let token = std::fs::read_to_string(f).unwrap_or_default();
        if token.trim().len() < 16 {
            out.push(Problem::new(
                "admin.token_file",
                format!("{:?}", f.display().to_string()),
                "missing, unreadable, or holding a token shorter than 16 characters".into(),
                Some("write a long random token into the file, for example with `openssl rand -hex 32`".into()),
            ));
        }
    }
    range(
        out,
        "metrics.max_denied_targets",
        s.metrics.max_denied_targets,
        1,
        100_000,
        "use 1 to 100000 (each is one series per scrape)",
    );
    range(
        out,
        "metrics.max_allowed_names",
        s.metrics.max_allowed_names,
        1,
        1_000_000,
        "use 1 to 1000000 (each kept name holds a few hundred bytes)",
    );
    if s.reload.watch_interval_secs.as_secs_f64() > 3600.0 {
        out.push(Problem::new(
            "reload.watch_interval_secs",
            s.reload.watch_interval_secs.as_secs_f64().to_string(),
            "not a duration".into(),
            Some("use seconds from 0 (no watch) to 3600".into()),
        ));
    }
}
