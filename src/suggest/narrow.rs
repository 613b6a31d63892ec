//! `aml-egress suggest --narrow`: a `[catalog.narrow]` table of the names each wildcard
//! allow rule let through, from `/allowed` rows (merged across instances first) or from the
//! proxy's JSON log lines "first use under wildcard".
//!
//! One key per pattern, exactly as the rule writes it; its names sorted, one a line, each
//! with what was seen of it as a comment. A `regex:` pattern cannot be narrowed: its names
//! are listed as comments. The output is deterministic.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::allowed::AllowedReport;

/// What the counts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Allowed decisions (`/allowed`).
    Allowed,
    /// Log lines: the proxy logs a name's first use under a pattern only, once per instance,
    /// restart or return after eviction.
    FirstUses,
}

/// What was seen of one name under one pattern.
#[derive(Debug, Clone, Default)]
struct Seen {
    ports: BTreeSet<u16>,
    count: u64,
    first: String,
    last: String,
}

#[derive(Debug, Default)]
struct Pattern {
    /// Where the rules with this pattern came from.
    sources: BTreeSet<String>,
    names: BTreeMap<String, Seen>,
}

/// The names seen under each wildcard pattern.
#[derive(Debug)]
pub struct Observed {
    counted: Counted,
    patterns: BTreeMap<String, Pattern>,
}

impl Observed {
    /// Nothing seen yet, counting `counted`.
    pub fn new(counted: Counted) -> Self {
        Observed {
            counted,
            patterns: BTreeMap::new(),
        }
    }

    fn add(&mut self, rule: &str, source: &str, name: &str, port: u16, count: u64, at: [&str; 2]) {
        let p = self.patterns.entry(rule.to_owned()).or_default();
        if !source.is_empty() {
            p.sources.insert(source.to_owned());
        }
        let s = p.names.entry(name.to_owned()).or_default();
        s.ports.insert(port);
        s.count = s.count.saturating_add(count);
        let [first, last] = at;
        if s.first.is_empty() || (!first.is_empty() && first < s.first.as_str()) {
            s.first = first.to_owned();
        }
        if last > s.last.as_str() {
            s.last = last.to_owned();
        }
    }

    /// `/allowed` rows (of one instance, or a fleet's merged).
    pub fn add_reports(&mut self, rows: &[AllowedReport]) {
        for r in rows {
            self.add(
                &r.rule,
                &r.rule_source,
                &r.name,
                r.port,
                r.count,
                [&r.first_seen, &r.last_seen],
            );
        }
    }

    /// The "first use under wildcard" lines of a JSON log; other lines are skipped.
    pub fn add_log(&mut self, text: &str) {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let f = &v["fields"];
            if f["message"] != "first use under wildcard" {
                continue;
            }
            let port = f["port"]
                .as_u64()
                .or_else(|| f["port"].as_str().and_then(|p| p.parse().ok()))
                .and_then(|p| u16::try_from(p).ok());
            let (Some(name), Some(port), Some(rule)) =
                (f["name"].as_str(), port, f["rule"].as_str())
            else {
                continue;
            };
            let at = v["timestamp"].as_str().unwrap_or_default();
            let source = f["rule_source"].as_str().unwrap_or_default();
            self.add(rule, source, name, port, 1, [at, at]);
        }
    }

    /// The `[catalog.narrow]` table, as TOML with comments.
    pub fn render(&self) -> String {
        let mut o = String::from(
            "# Suggested by `aml-egress suggest --narrow`: the names each wildcard allow rule let\n",
        );
        o.push_str(match self.counted {
            Counted::Allowed => {
                "# through, from /allowed (names seen since each instance started, at most\n\
                 # metrics.max_allowed_names of them; counts are allowed requests).\n"
            }
            Counted::FirstUses => {
                "# through, from the log lines \"first use under wildcard\" (counts are first uses,\n\
                 # logged once per instance, restart or return after eviction; not requests).\n"
            }
        });
        o.push_str(
            "# To apply: add this table to the configuration (its keys under the [catalog.narrow]\n\
             # there, if there is one) and reload (SIGHUP, or `systemctl reload aml-egress`).\n\
             # A name under a listed pattern that is not listed is then refused with reason\n\
             # wildcard_narrowed: review the names, and add any used too rarely to be seen here.\n",
        );
        let (regex, narrowable): (Vec<_>, Vec<_>) = self
            .patterns
            .iter()
            .partition(|(rule, _)| rule.starts_with("regex:"));
        if self.patterns.is_empty() {
            o.push_str("\n# Nothing was allowed under a wildcard rule yet: nothing to narrow.\n");
            return o;
        }
        if !narrowable.is_empty() {
            o.push_str("[catalog.narrow]\n");
        }
        for (rule, p) in &narrowable {
            o.push('\n');
            for s in &p.sources {
                let _ = writeln!(o, "# rule: {}", comment(s));
            }
            let _ = writeln!(o, "{} = [", toml_string(rule));
            let quoted: Vec<String> = p.names.keys().map(|n| toml_string(n) + ",").collect();
            let w = quoted.iter().map(String::len).max().unwrap_or(0);
            for (q, seen) in quoted.iter().zip(p.names.values()) {
                let _ = writeln!(o, "    {q:<w$}  # {}", self.note(seen));
            }
            o.push_str("]\n");
        }
        for (rule, p) in &regex {
            let _ = writeln!(
                o,
                "\n# {} is a regex and cannot be narrowed; to narrow it, replace it with\n\
                 # rules for the names seen under it:",
                comment(rule)
            );
            for (name, seen) in &p.names {
                let _ = writeln!(o, "#   {}  ({})", comment(name), self.note(seen));
            }
        }
        o
    }

    /// `12 allowed, ports 443, 8787, first ..., last ...`.
    fn note(&self, s: &Seen) -> String {
        let mut n = match (self.counted, s.count) {
            (Counted::Allowed, c) => format!("{c} allowed"),
            (Counted::FirstUses, 1) => "first use logged once".to_owned(),
            (Counted::FirstUses, c) => format!("first use logged {c} times"),
        };
        if s.ports.len() > 1 {
            let ports: Vec<String> = s.ports.iter().map(u16::to_string).collect();
            let _ = write!(n, ", ports {}", ports.join(", "));
        }
        let _ = write!(
            n,
            ", first {}, last {}",
            comment(or_unknown(&s.first)),
            comment(or_unknown(&s.last))
        );
        n
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "(unknown)" } else { s }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// `s` fit for a TOML comment, which cannot hold control characters: each becomes `?`.
fn comment(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{merge_allowed, parse_allowed};

    const A: &str = r#"[
  {"name":"acct2.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","count":5,"first_seen":"2026-11-02T08:00:00Z","last_seen":"2026-11-03T09:00:00Z"},
  {"name":"acct1.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","count":7,"first_seen":"2026-11-01T10:00:00Z","last_seen":"2026-11-02T12:00:00Z"},
  {"name":"x1.models.example","port":443,"rule":"regex:^x[0-9]+\\.models\\.example$","rule_source":"config.toml:20","count":2,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-01T01:00:00Z"}
]"#;
    const B: &str = r#"[
  {"name":"acct1.blob.core.windows.net","port":8787,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","count":1,"first_seen":"2026-10-31T00:00:00Z","last_seen":"2026-10-31T00:00:00Z"},
  {"name":"acct1.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"","count":4,"first_seen":"2026-11-01T11:00:00Z","last_seen":"2026-11-04T00:00:00Z"},
  {"name":"a.example.com","port":443,"rule":".example.com","rule_source":"config.toml:12","count":2,"first_seen":"2026-11-01T00:00:00Z","last_seen":"2026-11-01T00:00:00Z"}
]"#;

    fn fleet() -> Observed {
        let rows = merge_allowed([
            parse_allowed("http://a:9464", A).unwrap(),
            parse_allowed("http://b:9464", B).unwrap(),
        ]);
        let mut o = Observed::new(Counted::Allowed);
        o.add_reports(&rows);
        o
    }

    #[test]
    fn a_fleets_rows_become_one_table_of_sorted_keys_and_names() {
        let text = fleet().render();
        let table = &text[text.find("\n[catalog.narrow]\n").unwrap()..];
        assert_eq!(
            table,
            r#"
[catalog.narrow]

# rule: catalog 2026-03 public: storage
"*.blob.core.windows.net" = [
    "acct1.blob.core.windows.net",  # 12 allowed, ports 443, 8787, first 2026-10-31T00:00:00Z, last 2026-11-04T00:00:00Z
    "acct2.blob.core.windows.net",  # 5 allowed, first 2026-11-02T08:00:00Z, last 2026-11-03T09:00:00Z
]

# rule: config.toml:12
".example.com" = [
    "a.example.com",  # 2 allowed, first 2026-11-01T00:00:00Z, last 2026-11-01T00:00:00Z
]

# regex:^x[0-9]+\.models\.example$ is a regex and cannot be narrowed; to narrow it, replace it with
# rules for the names seen under it:
#   x1.models.example  (2 allowed, first 2026-11-01T00:00:00Z, last 2026-11-01T01:00:00Z)
"#
        );
        // The header says how to apply it.
        assert!(text.starts_with("# Suggested by `aml-egress suggest --narrow`"));
        assert!(text.contains("reload"), "{text}");
        assert!(
            text.contains("refused with reason\n# wildcard_narrowed"),
            "{text}"
        );
    }

    #[test]
    fn the_table_is_toml_whose_keys_are_the_patterns() {
        let parsed: toml::Table = toml::from_str(&fleet().render()).unwrap();
        let narrow = parsed["catalog"]["narrow"].as_table().unwrap();
        let keys: Vec<&str> = narrow.keys().map(String::as_str).collect();
        assert_eq!(keys, ["*.blob.core.windows.net", ".example.com"]);
        let names: Vec<&str> = narrow["*.blob.core.windows.net"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["acct1.blob.core.windows.net", "acct2.blob.core.windows.net"]
        );
    }

    #[test]
    fn quotes_and_control_characters_cannot_break_the_toml() {
        let mut o = Observed::new(Counted::Allowed);
        o.add(
            "*.we\"ird\\.example",
            "line\nbreak",
            "a\"b\\c\u{1}.example",
            443,
            1,
            ["2026-11-01T00:00:00Z\n[x]", ""],
        );
        let text = o.render();
        let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let names = parsed["catalog"]["narrow"]["*.we\"ird\\.example"]
            .as_array()
            .unwrap();
        assert_eq!(names[0].as_str(), Some("a\"b\\c\u{1}.example"));
        assert!(text.contains("# rule: line?break\n"), "{text}");
    }

    const LOG: &str = r#"{"timestamp":"2026-11-20T10:00:00.000000Z","level":"INFO","fields":{"message":"first use under wildcard","name":"acct.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","client":"10.0.0.5:40000","listener":"forward"},"target":"aml_egress::proxy"}
{"timestamp":"2026-11-20T10:00:01.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"connect","client":"10.0.1.4:50000","target":"a.data.example.com:443","seen":"","decision":"deny","reason":"no_matching_rule","rule":"","mode":"enforce"},"target":"aml_egress::proxy"}
not json
{"timestamp":"2026-11-22T07:30:00.000000Z","level":"INFO","fields":{"message":"first use under wildcard","name":"acct.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","client":"10.0.0.6:40000","listener":"transparent_tls"},"target":"aml_egress::proxy"}
{"timestamp":"2026-11-21T09:00:00.000000Z","level":"INFO","fields":{"message":"first use under wildcard","name":"other.blob.core.windows.net","port":"8787","rule":"*.blob.core.windows.net","rule_source":"catalog 2026-03 public: storage","client":"10.0.0.5:40001","listener":"forward"},"target":"aml_egress::proxy"}
"#;

    #[test]
    fn log_lines_count_first_uses_with_their_times() {
        let mut o = Observed::new(Counted::FirstUses);
        o.add_log(LOG);
        let text = o.render();
        assert!(text.contains("counts are first uses"), "{text}");
        assert!(
            text.contains(
                "\n    \"acct.blob.core.windows.net\",   # first use logged 2 times, first 2026-11-20T10:00:00.000000Z, last 2026-11-22T07:30:00.000000Z\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\n    \"other.blob.core.windows.net\",  # first use logged once, first 2026-11-21T09:00:00.000000Z, last 2026-11-21T09:00:00.000000Z\n"
            ),
            "{text}"
        );
        assert!(!text.contains("data.example.com"), "{text}");
    }

    #[test]
    fn nothing_seen_prints_no_table() {
        let text = Observed::new(Counted::Allowed).render();
        assert!(
            text.ends_with(
                "\n# Nothing was allowed under a wildcard rule yet: nothing to narrow.\n"
            ),
            "{text}"
        );
        assert!(!text.contains("\n[catalog.narrow]\n"), "{text}");
        // Only regex patterns: no empty table either.
        let mut o = Observed::new(Counted::Allowed);
        o.add("regex:^a$", "", "a", 443, 1, ["", ""]);
        let text = o.render();
        assert!(!text.contains("\n[catalog.narrow]\n"), "{text}");
        assert!(
            text.contains("#   a  (1 allowed, first (unknown), last (unknown))"),
            "{text}"
        );
    }
}
