//! Several instances as one: the tables of each instance's admin listener (`/allowed`,
//! `/denied`) merged as if one proxy had served all the traffic behind the load balancer,
//! for `aml-egress allowed`, `denied` and `suggest` given `--admin` more than once.
//!
//! Rows with the same key are one row: counts summed, the earliest first sighting and the
//! latest last one (the timestamps are RFC 3339 in UTC, which order as text), the other
//! fields from the first instance that had the row. A fleet's `/denied` merge sums each
//! instance's top N, so a target just below every instance's cut is not counted.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use crate::allowed::AllowedReport;
use crate::metrics::DeniedReport;

/// `/allowed`'s answer from the admin listener `admin` (named in the error).
pub fn parse_allowed(admin: &str, body: &str) -> Result<Vec<AllowedReport>, String> {
    serde_json::from_str(body).map_err(|e| {
        format!("{admin}: the admin listener sent something other than the /allowed list: {e}")
    })
}

/// `/denied`'s answer from the admin listener `admin` (named in the error).
pub fn parse_denied(admin: &str, body: &str) -> Result<Vec<DeniedReport>, String> {
    serde_json::from_str(body).map_err(|e| {
        format!("{admin}: the admin listener sent something other than the /denied list: {e}")
    })
}

/// The earlier of two timestamps; an empty one (unknown) loses.
fn earlier(a: &mut String, b: &str) {
    if a.is_empty() || (!b.is_empty() && b < a.as_str()) {
        *a = b.to_owned();
    }
}

/// The later of two timestamps.
fn later(a: &mut String, b: &str) {
    if b > a.as_str() {
        *a = b.to_owned();
    }
}

/// The names allowed under wildcard rules, one row per name, port and rule across the
/// instances' lists: most recently seen first, then by name, port and rule.
pub fn merge_allowed(lists: impl IntoIterator<Item = Vec<AllowedReport>>) -> Vec<AllowedReport> {
    let mut rows: BTreeMap<(String, u16, String), AllowedReport> = BTreeMap::new();
    for row in lists.into_iter().flatten() {
        match rows.entry((row.name.clone(), row.port, row.rule.clone())) {
            Entry::Vacant(v) => {
                v.insert(row);
            }
            Entry::Occupied(mut o) => {
                let m = o.get_mut();
                m.count = m.count.saturating_add(row.count);
                earlier(&mut m.first_seen, &row.first_seen);
                later(&mut m.last_seen, &row.last_seen);
                if m.rule_source.is_empty() {
                    m.rule_source = row.rule_source;
                }
            }
        }
    }
    let mut v: Vec<AllowedReport> = rows.into_values().collect();
    // Stable: equal last sightings keep the map's name, port, rule order.
    v.sort_by(|a, b| b.last_seen.cmp(&a.last_seen));
    v
}

/// The denied targets, one row per target and policy across the instances' lists: most
/// denied first, then by target, at most `limit`.
pub fn merge_denied(
    lists: impl IntoIterator<Item = Vec<DeniedReport>>,
    limit: usize,
) -> Vec<DeniedReport> {
    let mut rows: BTreeMap<(String, String), DeniedReport> = BTreeMap::new();
    for row in lists.into_iter().flatten() {
        match rows.entry((row.target.clone(), row.policy.clone())) {
            Entry::Vacant(v) => {
                v.insert(row);
            }
            Entry::Occupied(mut o) => {
                let m = o.get_mut();
                m.count = m.count.saturating_add(row.count);
                m.let_through = m.let_through.saturating_add(row.let_through);
                // The last refusal's reason and bytes are the latest instance's.
                if row.last_seen > m.last_seen && !row.reason.is_empty() {
                    m.reason = row.reason;
                    m.seen = row.seen;
                }
                earlier(&mut m.first_seen, &row.first_seen);
                later(&mut m.last_seen, &row.last_seen);
            }
        }
    }
    let mut v: Vec<DeniedReport> = rows.into_values().collect();
    // The order /denied itself uses, so that one instance's list comes out as it went in.
    v.sort_by(crate::metrics::by_count);
    v.truncate(limit);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const A_ALLOWED: &str = r#"[
  {"name":"acct2.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","count":5,"first_seen":"2026-11-02T08:00:00Z","last_seen":"2026-11-03T09:00:00Z"},
  {"name":"acct1.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","count":7,"first_seen":"2026-11-01T10:00:00Z","last_seen":"2026-11-02T12:00:00Z"}
]"#;
    const B_ALLOWED: &str = r#"[
  {"name":"acct1.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"","count":3,"first_seen":"2026-10-31T23:00:00Z","last_seen":"2026-11-03T11:00:00Z"},
  {"name":"acct1.blob.core.windows.net","port":8787,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","count":1,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-01T00:00:00Z"},
  {"name":"a.example.com","port":443,"rule":".example.com","rule_source":"config.toml:12","count":2,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-01T00:00:00Z"}
]"#;

    #[test]
    fn allowed_rows_merge_by_name_port_and_rule() {
        let a = parse_allowed("http://a:9464", A_ALLOWED).unwrap();
        let b = parse_allowed("http://b:9464", B_ALLOWED).unwrap();
        let merged = merge_allowed([a, b]);
        let shown: Vec<(&str, u16, u64, &str, &str)> = merged
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.port,
                    r.count,
                    r.first_seen.as_str(),
                    r.last_seen.as_str(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    "acct1.blob.core.windows.net",
                    443,
                    10,
                    "2026-10-31T23:00:00Z",
                    "2026-11-03T11:00:00Z"
                ),
                (
                    "acct2.blob.core.windows.net",
                    443,
                    5,
                    "2026-11-02T08:00:00Z",
                    "2026-11-03T09:00:00Z"
                ),
                // Equal last sightings: by name, then port.
                (
                    "a.example.com",
                    443,
                    2,
                    "2026-11-01T00:00:00Z",
                    "2026-11-01T00:00:00Z"
                ),
                (
                    "acct1.blob.core.windows.net",
                    8787,
                    1,
                    "2026-11-01T00:00:00Z",
                    "2026-11-01T00:00:00Z"
                ),
            ]
        );
        // The first instance's source, and an empty one filled from another instance.
        assert_eq!(merged[0].rule_source, "catalog 2026-03 public: storage");
        assert!(merge_allowed(Vec::<Vec<AllowedReport>>::new()).is_empty());
    }

    #[test]
    fn a_body_that_is_not_the_list_names_its_instance() {
        let e = parse_allowed("http://b:9464", "{\"error\":1}").unwrap_err();
        assert!(e.starts_with("http://b:9464: "), "{e}");
        assert!(e.contains("/allowed list"), "{e}");
        let e = parse_denied("http://c:9464", "<html>").unwrap_err();
        assert!(
            e.starts_with("http://c:9464: ") && e.contains("/denied list"),
            "{e}"
        );
    }

    fn denied(target: &str, count: u64, first: &str, last: &str) -> DeniedReport {
        let (host, port) = target.rsplit_once(':').unwrap();
        DeniedReport {
            target: target.into(),
            host: host.into(),
            port: port.parse().unwrap(),
            policy: "default".into(),
            count,
            let_through: 0,
            first_seen: first.into(),
            last_seen: last.into(),
            allow_entry: format!("[[allow]]\nhost = \"{host}\"\nports = [{port}]"),
            reason: "no_matching_rule".into(),
            seen: String::new(),
        }
    }

    #[test]
    fn denied_rows_merge_by_target_most_denied_first() {
        let a = vec![
            denied(
                "x.example.net:443",
                4,
                "2026-11-02T00:00:00Z",
                "2026-11-04T00:00:00Z",
            ),
            denied(
                "y.example.net:443",
                3,
                "2026-11-01T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ),
        ];
        let b = vec![
            denied(
                "y.example.net:443",
                2,
                "2026-10-30T00:00:00Z",
                "2026-11-05T00:00:00Z",
            ),
            denied(
                "z.example.net:80",
                5,
                "2026-11-01T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ),
        ];
        let merged = merge_denied([a.clone(), b], 10);
        let shown: Vec<(&str, u64, &str, &str)> = merged
            .iter()
            .map(|r| {
                (
                    r.target.as_str(),
                    r.count,
                    r.first_seen.as_str(),
                    r.last_seen.as_str(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                // 5 and 5: by target.
                (
                    "y.example.net:443",
                    5,
                    "2026-10-30T00:00:00Z",
                    "2026-11-05T00:00:00Z"
                ),
                (
                    "z.example.net:80",
                    5,
                    "2026-11-01T00:00:00Z",
                    "2026-11-01T00:00:00Z"
                ),
                (
                    "x.example.net:443",
                    4,
                    "2026-11-02T00:00:00Z",
                    "2026-11-04T00:00:00Z"
                ),
            ]
        );
        assert_eq!(merge_denied([a.clone(), vec![]], 1).len(), 1);
        // One instance's list, in /denied's own order, comes out unchanged.
        let one: Vec<String> = merge_denied([a.clone()], 10)
            .into_iter()
            .map(|r| serde_json::to_string(&r).unwrap())
            .collect();
        let want: Vec<String> = a
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        assert_eq!(one, want);
    }
}
