//! The offline commands (`check`, `catalog`, `validate`): what they print and their exit
//! codes. `main` only parses arguments and calls these.

use std::io::{self, BufRead, Write};

use serde::Serialize;

use crate::catalog::ReferenceEntry;
use crate::config::Built;
use crate::policy::{Decision, PathView, Rule, Source, Verdict};

/// Exit code: every target allowed / the file is valid.
pub const EXIT_OK: i32 = 0;
/// Exit code: at least one target denied.
pub const EXIT_DENIED: i32 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: i32 = 2;

/// A `check` argument: `host:port`, or a URL whose scheme says whether the path is visible.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckTarget<'a> {
    pub authority: std::borrow::Cow<'a, str>,
    pub path: Option<&'a str>,
}

/// Split a `check` argument. `http://host[:port]/path` checks the path as plain HTTP would;
/// `https://host[:port]/...` checks as a TLS tunnel (the path is invisible).
///
/// URLs are split as the proxy's URI parser (hyper's) splits them: the authority ends at the
/// first `/`, `?` or `#` (RFC 3986 §3.2), the fragment is dropped, and the path is what the
/// proxy hands the policy, its `path_and_query` (`/` when empty, `?q` for `http://h?q`).
pub fn parse_check_target(input: &str) -> CheckTarget<'_> {
    let (rest, default_port, visible) = if let Some(r) = input.strip_prefix("http://") {
        (r, "80", true)
    } else if let Some(r) = input.strip_prefix("https://") {
        (r, "443", false)
    } else {
        return CheckTarget {
            authority: input.into(),
            path: None,
        };
    };
    // Otherwise `http://a:8080?@b/` would read as userinfo `a:8080?` and host `b`.
    let (auth, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let path = match path.split('#').next() {
        Some("") | None => "/",
        Some(p) => p,
    };
    let has_port = if auth.starts_with('[') {
        auth.contains("]:")
    } else {
        auth.contains(':')
    };
    let authority = if has_port || auth.is_empty() {
        auth.into()
    } else {
        format!("{auth}:{default_port}").into()
    };
    CheckTarget {
        authority,
        path: visible.then_some(path),
    }
}

#[derive(Serialize)]
struct CheckLine<'a> {
    target: &'a str,
    decision: Verdict,
    reason: crate::reason::ReasonCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a Source>,
    explanation: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    would_allow_with: Option<String>,
}

/// Decide one `check` argument.
pub fn check_one(built: &Built, input: &str) -> (Decision, String) {
    let (decision, explanation, _) = check_with_hint(built, input);
    (decision, explanation)
}

/// As [`check_one`], with the optional part that is off and would allow a denied target.
pub fn check_with_hint(built: &Built, input: &str) -> (Decision, String, Option<String>) {
    let t = parse_check_target(input);
    let view = t.path.map_or(PathView::Hidden, PathView::Visible);
    let decision = built.policy.decide_str(&t.authority, view);
    let mut explanation = built.policy.explain(&t.authority, &decision);
    let part = (!decision.is_allowed())
        .then(|| crate::policy::Target::parse(&t.authority).ok())
        .flatten()
        .and_then(|target| built.would_allow_with(&target, view))
        .map(str::to_owned);
    if let Some(p) = &part {
        explanation.push_str(&crate::config::optional_part_hint(p));
    }
    (decision, explanation, part)
}

/// Run `check` over the arguments, or over standard input when there are none.
pub fn check(
    built: &Built,
    targets: &[String],
    json: bool,
    out: &mut dyn Write,
) -> io::Result<i32> {
    let mut any_denied = false;
    let mut one = |input: &str, out: &mut dyn Write| -> io::Result<()> {
        let (d, explanation, would_allow_with) = check_with_hint(built, input);
        any_denied |= !d.is_allowed();
        if json {
            let rule: Option<&Rule> = d.rule.map(|id| built.policy.rule(id));
            let line = CheckLine {
                target: input,
                decision: d.verdict,
                reason: d.reason.code(),
                rule: rule.map(|r| r.what.to_string()),
                ports: rule.map(|r| r.ports.to_string()),
                source: rule.map(|r| &r.source),
                explanation,
                would_allow_with,
            };
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)
        } else {
            let verdict = match d.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            };
            writeln!(out, "{verdict} {input} {explanation}")
        }
    };
    if targets.is_empty() {
        for line in io::stdin().lock().lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            one(line, out)?;
        }
    } else {
        for t in targets {
            one(t, out)?;
        }
    }
    Ok(if any_denied { EXIT_DENIED } else { EXIT_OK })
}

/// Print the optional parts of the catalog, marking the enabled ones.
pub fn print_features(built: &Built, out: &mut dyn Write) -> io::Result<()> {
    for (name, summary) in &built.all_features {
        let on = if built.features.contains(name) {
            "on "
        } else {
            "off"
        };
        writeln!(out, "{on} {name:<28} {summary}")?;
    }
    Ok(())
}

#[derive(Serialize)]
struct CatalogJson<'a> {
    cloud: &'a str,
    revision: &'a str,
    features: Vec<&'a str>,
    rules: Vec<RuleJson<'a>>,
    not_enforced: &'a [ReferenceEntry],
    warnings: &'a [String],
}

#[derive(Serialize)]
struct RuleJson<'a> {
    action: crate::policy::Action,
    pattern: String,
    ports: String,
    source: &'a Source,
}

/// Print the rendered rule set (`catalog`), as a table or JSON.
pub fn print_catalog(built: &Built, json: bool, out: &mut dyn Write) -> io::Result<()> {
    let rules = built.policy.rules();
    if json {
        let doc = CatalogJson {
            cloud: built.cloud.name(),
            revision: &built.revision,
            features: built.features.iter().map(String::as_str).collect(),
            rules: rules
                .iter()
                .map(|r| RuleJson {
                    action: r.action,
                    pattern: r.what.to_string(),
                    ports: r.ports.to_string(),
                    source: &r.source,
                })
                .collect(),
            not_enforced: &built.reference,
            warnings: &built.warnings,
        };
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        return writeln!(out);
    }
    let features: Vec<&str> = built.features.iter().map(String::as_str).collect();
    writeln!(
        out,
        "# catalog {} for the {} cloud; optional parts on: {}",
        built.revision,
        built.cloud,
        if features.is_empty() {
            "none".to_owned()
        } else {
            features.join(", ")
        }
    )?;
    writeln!(out, "# enforced rules ({})", rules.len())?;
    let width = rules
        .iter()
        .map(|r| r.what.to_string().len())
        .max()
        .unwrap_or(0)
        .min(60);
    for r in rules {
        let action = match r.action {
            crate::policy::Action::Allow => "allow",
            crate::policy::Action::Deny => "deny ",
        };
        writeln!(
            out,
            "{action} {:<width$} {:<12} {}",
            r.what.to_string(),
            r.ports.to_string(),
            r.source
        )?;
    }
    writeln!(
        out,
        "# not enforced by a proxy, kept for reference ({})",
        built.reference.len()
    )?;
    for e in &built.reference {
        let kind = match (e.direction, e.kind) {
            (crate::catalog::Direction::Inbound, _) => "inbound",
            (_, crate::catalog::EntryKind::ServiceTag) => "tag",
            _ => "udp",
        };
        writeln!(
            out,
            "{kind:<7} {:<width$} {:<12} {} ({})",
            e.pattern,
            format!("{:?} {}", e.protocol, e.ports).to_lowercase(),
            e.source,
            e.not_enforced
        )?;
    }
    Ok(())
}

/// Print `validate`'s summary: rules per kind and every warning.
pub fn print_summary(built: &Built, origin: &str, out: &mut dyn Write) -> io::Result<()> {
    let c = built.policy.counts();
    writeln!(
        out,
        "{origin}: valid (catalog {} for the {} cloud)",
        built.revision, built.cloud
    )?;
    writeln!(
        out,
        "rules: {} exact, {} wildcard, {} with a path, {} regex, {} cidr allow; {} deny; {} catalog entries not enforced by a proxy",
        c.exact,
        c.wildcard,
        c.path,
        c.regex,
        c.cidr,
        c.deny,
        built.reference.len()
    )?;
    let features: Vec<&str> = built.features.iter().map(String::as_str).collect();
    writeln!(
        out,
        "optional parts on: {}",
        if features.is_empty() {
            "none".to_owned()
        } else {
            features.join(", ")
        }
    )?;
    writeln!(out, "warnings: {}", built.warnings.len())?;
    for w in &built.warnings {
        writeln!(out, "  - {w}")?;
    }
    Ok(())
}

/// `aml-egress denied`: the most denied destinations of a running proxy, as a table (or the
/// JSON as served with `json`).
pub fn print_denied(body: &str, json: bool, out: &mut impl Write) -> Result<(), String> {
    if json {
        return out.write_all(body.as_bytes()).map_err(|e| e.to_string());
    }
    let rows: Vec<crate::metrics::DeniedReport> = serde_json::from_str(body).map_err(|e| {
        format!("the admin listener sent something other than the /denied list: {e}")
    })?;
    let w = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut text = format!(
        "{:>8}  {:<w$}  {:<20}  {:<20}  TO ALLOW\n",
        "COUNT", "TARGET", "LAST SEEN", "FIRST SEEN"
    );
    for r in &rows {
        text.push_str(&format!(
            "{:>8}  {:<w$}  {:<20}  {:<20}  {}\n",
            r.count,
            r.target,
            r.last_seen,
            r.first_seen,
            r.allow_entry.replace('\n', " ")
        ));
    }
    if rows.is_empty() {
        text.push_str("(nothing denied since the proxy started)\n");
    }
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_targets() {
        let t = parse_check_target("pypi.org:443");
        assert_eq!((t.authority.as_ref(), t.path), ("pypi.org:443", None));
        let t = parse_check_target("http://raw.githubusercontent.com/a/b");
        assert_eq!(
            (t.authority.as_ref(), t.path),
            ("raw.githubusercontent.com:80", Some("/a/b"))
        );
        let t = parse_check_target("https://[2001:db8::1]:8443/x");
        assert_eq!((t.authority.as_ref(), t.path), ("[2001:db8::1]:8443", None));
        let t = parse_check_target("http://example.com");
        assert_eq!(
            (t.authority.as_ref(), t.path),
            ("example.com:80", Some("/"))
        );
    }

    fn split(input: &str) -> (String, Option<&str>) {
        let t = parse_check_target(input);
        (t.authority.into_owned(), t.path)
    }

    /// The authority ends at the first `/`, `?` or `#`, as in the proxy's URI parser; an `@`
    /// after that is part of the path, not userinfo.
    #[test]
    fn check_targets_end_the_authority_where_the_proxy_does() {
        assert_eq!(
            split("http://allowed.example:8080?@evil.example/"),
            ("allowed.example:8080".into(), Some("?@evil.example/"))
        );
        assert_eq!(
            split("http://a.example#@evil.example/"),
            ("a.example:80".into(), Some("/"))
        );
        assert_eq!(
            split("http://a.example/p?x=1"),
            ("a.example:80".into(), Some("/p?x=1"))
        );
        assert_eq!(split("https://h.example?x"), ("h.example:443".into(), None));
        assert_eq!(
            split("https://h.example:8443#@evil.example/"),
            ("h.example:8443".into(), None)
        );
        // hyper keeps a query-only rest as it is (no `/` is added) and drops the fragment.
        assert_eq!(
            split("http://h.example?x"),
            ("h.example:80".into(), Some("?x"))
        );
        assert_eq!(
            split("http://h.example?x#y"),
            ("h.example:80".into(), Some("?x"))
        );
        assert_eq!(
            split("http://h.example/a#b?c"),
            ("h.example:80".into(), Some("/a"))
        );
    }

    /// A real `user@host` authority is still passed on whole, and refused like the proxy
    /// refuses it.
    #[test]
    fn check_targets_with_userinfo_are_invalid() {
        assert_eq!(
            split("http://user@evil.example/x"),
            ("user@evil.example:80".into(), Some("/x"))
        );
        let settings =
            crate::config::Settings::load_with_env(None, Some(Default::default())).unwrap();
        let built = crate::config::build_policy(&settings).unwrap();
        for input in [
            "http://user@evil.example/x",
            "http://user:pw@evil.example/",
            "https://pypi.org@evil.example/",
        ] {
            let (d, _) = check_one(&built, input);
            assert_eq!(d.reason.code().as_str(), "invalid_target", "{input}");
        }
    }
}
