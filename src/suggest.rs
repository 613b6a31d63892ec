//! `aml-egress suggest`: `[[allow]]` entries learnt from what a proxy refused (in audit mode,
//! what it would have refused), from its `/denied` table or its JSON log lines.
//!
//! Exact names by default; a wildcard `*.parent` only when at least `collapse` distinct
//! names share a parent at or below their registrable domain (the public suffix list, its
//! private section included, so never `*.blob.core.windows.net` nor a wildcard at or above a
//! public suffix). Ports as seen. IP destinations become CIDR entries only when asked.
//! The output is deterministic. [`narrow`] is the other way round: from what wildcard
//! rules let through, the names to keep (`suggest --narrow`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::policy::{Host, Target};

pub mod narrow;

/// How often one refused destination was seen, and when first and last (as given).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub count: u64,
    pub first: String,
    pub last: String,
}

impl Tally {
    /// Add `other`'s sightings: counts summed, the earlier first and the later last.
    pub fn absorb(&mut self, other: &Tally) {
        self.count = self.count.saturating_add(other.count);
        if self.first.is_empty() || (!other.first.is_empty() && other.first < self.first) {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
    }
}

/// Refused destinations by `host:port`.
pub type Refused = BTreeMap<(String, u16), Tally>;

/// Add `more` (another instance's) to `into`.
pub fn merge(into: &mut Refused, more: Refused) {
    for (key, seen) in more {
        into.entry(key).or_default().absorb(&seen);
    }
}

/// From `/denied`'s JSON (`[{host, port, count, first_seen, last_seen}]`).
pub fn from_denied(json: &str) -> Result<Refused, String> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("/denied did not answer JSON: {e}"))?;
    let items = v.as_array().ok_or("/denied did not answer a list")?;
    let mut out = Refused::new();
    for i in items {
        let (Some(host), Some(port)) = (
            i["host"].as_str(),
            i["port"].as_u64().and_then(|p| u16::try_from(p).ok()),
        ) else {
            continue;
        };
        out.entry((host.to_owned(), port))
            .or_default()
            .absorb(&Tally {
                count: i["count"].as_u64().unwrap_or(1),
                first: i["first_seen"].as_str().unwrap_or_default().to_owned(),
                last: i["last_seen"].as_str().unwrap_or_default().to_owned(),
            });
    }
    Ok(out)
}

/// From the proxy's JSON log lines ("destination denied"); other lines are skipped.
pub fn from_log(text: &str, out: &mut Refused) {
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["fields"]["message"] != "destination denied" {
            continue;
        }
        // `target` starts with `host:port`, then maybe a path or a note.
        let shown = v["fields"]["target"].as_str().unwrap_or_default();
        let head = shown.split([' ', '/']).next().unwrap_or_default();
        let Ok(t) = Target::parse(head) else {
            continue;
        };
        let host = match t.host {
            Host::Name(n) => n.as_str().to_owned(),
            Host::Ip(ip) => ip.to_string(),
        };
        let at = v["timestamp"].as_str().unwrap_or_default().to_owned();
        out.entry((host, t.port)).or_default().absorb(&Tally {
            count: 1,
            first: at.clone(),
            last: at,
        });
    }
}

/// The parent under which `name`'s siblings may be collapsed: its parent domain, when
/// that is at or below the registrable domain.
fn parent(name: &str) -> Option<&str> {
    let registrable = psl::domain_str(name)?;
    let (_, parent) = name.split_once('.')?;
    (parent.len() >= registrable.len() && parent.ends_with(registrable)).then_some(parent)
}

/// The suggested entries, as TOML with comments; `part` names the optional part (off now)
/// that would allow a destination instead.
pub fn suggest(
    refused: &Refused,
    collapse: usize,
    cidrs: bool,
    part: &dyn Fn(&str, u16) -> Option<String>,
) -> String {
    // Group names by the parent they could be collapsed under.
    let mut by_parent: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (host, _) in refused.keys() {
        if let Some(p) = parent(host) {
            by_parent.entry(p).or_default().insert(host);
        }
    }
    let wide: BTreeSet<&str> = by_parent
        .iter()
        .filter(|(_, names)| collapse > 0 && names.len() >= collapse)
        .map(|(p, _)| *p)
        .collect();
    // Entries: pattern -> (ports, count, first, last, names covered).
    #[derive(Default)]
    struct Entry<'a> {
        ports: BTreeSet<u16>,
        count: u64,
        first: String,
        last: String,
        names: BTreeSet<&'a str>,
        cidr: bool,
        parts: BTreeSet<String>,
    }
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut skipped = Vec::new();
    for ((host, port), seen) in refused {
        let is_ip = host.parse::<std::net::IpAddr>().is_ok();
        if is_ip && !cidrs {
            skipped.push(format!("{host}:{port}"));
            continue;
        }
        let pattern = match parent(host).filter(|p| wide.contains(p)) {
            Some(p) => format!("*.{p}"),
            None => host.clone(),
        };
        let e = entries.entry(pattern).or_default();
        e.cidr = is_ip;
        e.ports.insert(*port);
        e.count += seen.count;
        if e.first.is_empty() || (!seen.first.is_empty() && seen.first < e.first) {
            e.first = seen.first.clone();
        }
        if seen.last > e.last {
            e.last = seen.last.clone();
        }
        e.names.insert(host);
        e.parts.extend(part(host, *port));
    }
    let mut o = String::from(
        "# Suggested by `aml-egress suggest` from refused (or, in audit mode, would-be refused)\n# traffic. Review each entry before adding it to the configuration.\n",
    );
    for (pattern, e) in &entries {
        let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
        let _ = writeln!(
            o,
            "\n# {} refusals, first {}, last {}",
            e.count,
            or_unknown(&e.first),
            or_unknown(&e.last)
        );
        if let Some(base) = pattern.strip_prefix("*.") {
            let names: Vec<&str> = e.names.iter().copied().collect();
            let _ = writeln!(
                o,
                "# covers {} names seen ({}); scope: every name under {base}",
                names.len(),
                names.join(", ")
            );
        }
        for p in &e.parts {
            let _ = writeln!(
                o,
                "# the optional part {p} would allow it instead: add \"{p}\" to catalog.features"
            );
        }
        let _ = writeln!(o, "[[allow]]");
        if e.cidr {
            let bits = if pattern.contains(':') { 128 } else { 32 };
            let _ = writeln!(o, "cidr = \"{pattern}/{bits}\"");
        } else {
            let _ = writeln!(o, "host = \"{pattern}\"");
        }
        let _ = writeln!(o, "ports = [{}]", ports.join(", "));
    }
    if !skipped.is_empty() {
        let _ = writeln!(
            o,
            "\n# IP destinations left out (add --cidrs to suggest CIDR entries): {}",
            skipped.join(", ")
        );
    }
    o
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "(unknown)" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_json_is_read() {
        let r = from_denied(
            r#"[{"target":"x.example.com:443","host":"x.example.com","port":443,"count":4,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-02T00:00:00Z","allow_entry":""}]"#,
        )
        .unwrap();
        let seen = &r[&("x.example.com".to_owned(), 443)];
        assert_eq!(
            (seen.count, seen.first.as_str()),
            (4, "2026-11-01T00:00:00Z")
        );
        assert!(from_denied("{}").is_err());
    }

    #[test]
    fn instances_merge_into_one_tally_per_destination() {
        let mut all = from_denied(
            r#"[{"host":"x.example.com","port":443,"count":4,"first_seen":"2026-11-02T00:00:00Z","last_seen":"2026-11-03T00:00:00Z"}]"#,
        )
        .unwrap();
        merge(
            &mut all,
            from_denied(
                r#"[{"host":"x.example.com","port":443,"count":2,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-02T00:00:00Z"},
                    {"host":"y.example.com","port":80,"count":1,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-01T00:00:00Z"}]"#,
            )
            .unwrap(),
        );
        let x = &all[&("x.example.com".to_owned(), 443)];
        assert_eq!(
            (x.count, x.first.as_str(), x.last.as_str()),
            (6, "2026-11-01T00:00:00Z", "2026-11-03T00:00:00Z")
        );
        assert_eq!(all.len(), 2);
    }

    #[test]
    fn wildcards_only_below_a_registrable_domain() {
        assert_eq!(parent("a.x.example.com"), Some("x.example.com"));
        assert_eq!(parent("x.example.com"), Some("example.com"));
        assert_eq!(parent("example.com"), None);
        // blob.core.windows.net is a public suffix (the list's private section).
        assert_eq!(parent("acct.blob.core.windows.net"), None);
        let mut r = Refused::new();
        for h in [
            "a.blob.core.windows.net",
            "b.blob.core.windows.net",
            "c.blob.core.windows.net",
        ] {
            r.insert((h.into(), 443), Tally::default());
        }
        let s = suggest(&r, 2, false, &|_, _| None);
        assert!(!s.contains("*."), "{s}");
    }
}
