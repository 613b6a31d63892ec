//! `aml-egress check`: say whether destinations would be allowed, and by which rule.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;

use serde::Serialize;

use super::{EXIT_DENIED, EXIT_OK, exit_code, load};
use crate::config::{Built, Chosen};
use crate::metrics::NO_POLICY;
use crate::policy::{Decision, PathView, Reason, Rule, Source, Verdict};

/// The arguments of `check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Configuration file (TOML); embedded defaults when left out.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Print load-time notes and warnings to standard error.
    #[arg(long, short)]
    pub verbose: bool,
    /// Decide as a client at this address would be: under the [[client_policy]] whose
    /// sources hold it (else as policy.unmatched_clients says).
    #[arg(long, value_name = "IP", conflicts_with = "policy")]
    pub client: Option<std::net::IpAddr>,
    /// Decide as a client presenting a certificate with this DNS name would be (on
    /// proxy.tls_listen with proxy.tls_client_ca); with --client, the certificate wins as
    /// it does in the proxy.
    #[arg(long, value_name = "NAME", conflicts_with = "policy")]
    pub client_name: Option<String>,
    /// Decide under this policy: `default`, or a [[client_policy]]'s name.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    /// Targets as host:port, http://host/path (path checked) or https://host; one per line on standard input when none are given.
    pub targets: Vec<String>,
}

/// `check`: 0 when every target is allowed, 1 when any is denied, 2 on a configuration
/// error.
pub fn run(args: Args) -> i32 {
    exit_code(check(args))
}

fn check(args: Args) -> anyhow::Result<i32> {
    let compiled = match load("check", args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let clients = &compiled.clients;
    if args.client_name.is_some() && clients.policies.iter().all(|p| p.client_names.is_empty()) {
        eprintln!(
            "note: no [[client_policy]] has client_names, so a certificate's name chooses no policy here (nor in the proxy): the client is decided by its address, or as unclaimed"
        );
    }
    // A certificate's name wins over the address, as in the proxy.
    let certified = args
        .client_name
        .as_ref()
        .and_then(|n| clients.by_certificate(std::slice::from_ref(n)).ok());
    let chosen = match (certified, &args.client, &args.policy) {
        (Some(i), _, _) => Chosen::Client(i),
        (None, Some(ip), _) => clients.choose(*ip),
        (None, None, Some(name)) => match super::named_policy("check", clients, name) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        },
        (None, None, None) if args.client_name.is_some() => clients.unclaimed(),
        (None, None, None) => Chosen::Default,
    };
    let built = match chosen {
        Chosen::Default => &compiled.built,
        Chosen::Client(i) => &*clients.policies[i].built,
        Chosen::Refused => {
            let who = args
                .client
                .map(|ip| ip.to_string())
                .or(args.client_name.clone())
                .unwrap_or_default();
            let why = format!(
                "no [[client_policy]] serves the client {who} (policy.unmatched_clients = \"refuse\")"
            );
            let mut out = io::stdout().lock();
            let code = check_targets(
                Decider::Refused(&why),
                None,
                &args.targets,
                args.json,
                &mut out,
            )?;
            out.flush()?;
            return Ok(code);
        }
    };
    // Named in the output once a configuration has several policies.
    let policy = match chosen {
        Chosen::Client(i) => Some(clients.policies[i].name.as_str()),
        _ if !clients.policies.is_empty() => Some(crate::config::clients::DEFAULT_POLICY),
        _ => None,
    };
    let inspecting = Some((&compiled.inspect, compiled.proxy.tls_ports.as_slice()));
    if args.verbose {
        for w in &built.warnings {
            eprintln!("note: {w}");
        }
    }
    let audit = clients.mode_of(chosen, compiled.proxy.mode) == crate::config::Mode::Audit;
    let mut out = io::stdout().lock();
    let code = check_targets(
        Decider::Policy(built, policy, audit),
        inspecting,
        &args.targets,
        args.json,
        &mut out,
    )?;
    out.flush()?;
    Ok(code)
}

/// A `check` argument: `host:port`, or a URL whose scheme says whether the path is visible.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckTarget<'a> {
    pub authority: std::borrow::Cow<'a, str>,
    pub path: Option<&'a str>,
    /// The path of an `https://` URL, which only inspection sees.
    pub tls_path: Option<&'a str>,
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
            tls_path: None,
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
        tls_path: (!visible).then_some(path),
    }
}

/// What decides `check`'s targets.
#[derive(Clone, Copy)]
pub enum Decider<'a> {
    /// A compiled policy, named in the output (`Some`) when the configuration has several,
    /// and whether it is in audit mode (its denials are let through and logged).
    Policy(&'a Built, Option<&'a str>, bool),
    /// No policy: the client is refused whatever the target (`no_policy_for_client`),
    /// with this explanation.
    Refused(&'a str),
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
    /// The policy that decided, when the configuration has client policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a str>,
    /// What the proxy does, as `aml_egress_decisions_total` counts it: `allow`, `deny`,
    /// or `would_deny` (denied, but let through and logged in audit mode).
    outcome: &'static str,
}

/// Decide one `check` argument.
pub fn check_one(built: &Built, input: &str) -> (Decision, String) {
    let (decision, explanation, _) = check_with_hint(built, None, input);
    (decision, explanation)
}

/// What `check` needs to tell an inspected tunnel: the inspection and `proxy.tls_ports`.
pub type Inspecting<'a> = (&'a crate::inspect::Inspection, &'a [u16]);

/// As [`check_one`], with the optional part that is off and would allow a denied target;
/// with `inspecting`, an `https://` URL that would be inspected is decided on its path too,
/// and says so.
pub fn check_with_hint(
    built: &Built,
    inspecting: Option<Inspecting<'_>>,
    input: &str,
) -> (Decision, String, Option<String>) {
    let t = parse_check_target(input);
    let mut view = t.path.map_or(PathView::Hidden, PathView::Visible);
    let mut decision = built.policy.decide_str(&t.authority, view);
    let mut inspected = false;
    if let (Some((inspection, tls_ports)), Some(path), Ok(target)) = (
        inspecting,
        t.tls_path,
        crate::policy::Target::parse(&t.authority),
    ) && inspection.inspects_tunnel(&built.policy, tls_ports, &target, &decision)
    {
        view = PathView::Visible(path);
        decision = built.policy.decide(&target, view);
        inspected = true;
    }
    let mut explanation = built.policy.explain(&t.authority, &decision);
    if inspected {
        explanation.push_str(" (inspected)");
    }
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

/// Decide every target of the arguments, or of standard input (one a line, `#` comments
/// and blank lines skipped) when there are none, under `built` (the policy named `policy`
/// in the output, when given), printing one line each (text or JSON): [`EXIT_DENIED`] when
/// any is denied, else [`EXIT_OK`].
pub fn check_targets(
    decider: Decider<'_>,
    inspecting: Option<Inspecting<'_>>,
    targets: &[String],
    json: bool,
    out: &mut dyn Write,
) -> io::Result<i32> {
    let mut any_denied = false;
    let mut one = |input: &str, out: &mut dyn Write| -> io::Result<()> {
        let (built, policy, audit, (d, explanation, would_allow_with)) = match decider {
            Decider::Policy(built, policy, audit) => {
                let (d, mut explanation, mut hint) = check_with_hint(built, inspecting, input);
                // A client policy's own keys, not the top-level ones it never reads.
                if policy.is_some_and(|p| p != crate::config::clients::DEFAULT_POLICY) {
                    use crate::config::clients::in_client_policy;
                    explanation = in_client_policy(&explanation, &[input]);
                    hint = hint.map(|h| in_client_policy(&h, &[input]));
                }
                (Some(built), policy, audit, (d, explanation, hint))
            }
            Decider::Refused(why) => {
                let d = Decision {
                    verdict: Verdict::Deny,
                    reason: Reason::NoPolicyForClient,
                    rule: None,
                };
                (None, Some(NO_POLICY), false, (d, why.to_owned(), None))
            }
        };
        any_denied |= !d.is_allowed();
        let outcome = match (d.verdict, audit && d.reason.audit_lets_through()) {
            (Verdict::Allow, _) => "allow",
            (Verdict::Deny, true) => "would_deny",
            (Verdict::Deny, false) => "deny",
        };
        if json {
            let rule: Option<&Rule> = d.rule.zip(built).map(|(id, b)| b.policy.rule(id));
            let line = CheckLine {
                target: input,
                decision: d.verdict,
                reason: d.reason.code(),
                rule: rule.map(|r| r.what.to_string()),
                ports: rule.map(|r| r.ports.to_string()),
                source: rule.map(|r| &r.source),
                explanation,
                would_allow_with,
                policy,
                outcome,
            };
            serde_json::to_writer(&mut *out, &line)?;
            writeln!(out)
        } else {
            let verdict = match d.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            };
            let audit = match outcome {
                "would_deny" => "audit: let through and logged",
                _ => "",
            };
            match (policy, audit) {
                (Some(p), "") => writeln!(out, "{verdict} {input} {explanation} [policy {p}]"),
                (Some(p), a) => writeln!(out, "{verdict} {input} {explanation} [policy {p}, {a}]"),
                (None, "") => writeln!(out, "{verdict} {input} {explanation}"),
                (None, a) => writeln!(out, "{verdict} {input} {explanation} [{a}]"),
            }
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
