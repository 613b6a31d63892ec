//! Selective TLS inspection (issue 20), the parts that come before the data path: which
//! allowed tunnels are to be inspected and why, and the operator's CA ([`ca`]).
//!
//! A tunnel is inspected when inspection is on (`inspect.ca_cert`), its name is not in
//! `inspect.bypass`, and either the rule that allows it restricts a path or its name is
//! in `inspect.hosts`. The decision per tunnel is [`Inspection::inspects`], pure and
//! cheap; everything else here runs at load.

pub mod ca;

use std::path::PathBuf;
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

use crate::policy::{Action, HostPattern, HostSet, Matchable, Policy, parse_pattern};
pub use ca::{CaCert, CaKey, Constraints};

/// Why a tunnel is inspected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The rule that allows it restricts a path, which only inspection can see.
    PathRule,
    /// Its name is in `inspect.hosts`.
    Hosts,
}

impl Why {
    /// How `validate` and logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Why::PathRule => "path rule",
            Why::Hosts => "inspect.hosts",
        }
    }
}

/// A host pattern of `inspect.hosts` or `inspect.bypass`: rule syntax, without a path.
pub fn host_pattern(entry: &str) -> Result<HostPattern, String> {
    match parse_pattern(entry) {
        Ok((p, None)) => Ok(p),
        Ok((_, Some(_))) => Err(
            "a path here means nothing: a tunnel is inspected or not as a whole (a path rule in [[allow]] restricts paths)".into(),
        ),
        Err(e) => Err(format!("not a host pattern: {e}")),
    }
}

/// One pattern the configuration inspects, and why: a path rule (with the rule and its
/// source, as `catalog` shows them) or `inspect.hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub pattern: HostPattern,
    pub why: Why,
    /// The rule (`pattern/path port N (source)`), or `inspect.hosts`.
    pub what: String,
}

/// The CA in force: its certificate and key, read and checked at load.
#[derive(Debug)]
pub struct LoadedCa {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub cert: CaCert,
    pub key: CaKey,
}

/// The `[inspect]` settings compiled for the runtime.
#[derive(Debug, Default)]
pub struct Inspection {
    /// The CA; inspection is off without one.
    pub ca: Option<LoadedCa>,
    hosts: HostSet,
    bypass: HostSet,
    /// What the configuration inspects (with a CA), in rule order then `inspect.hosts`
    /// order; patterns wholly bypassed are left out.
    pub inspected: Vec<Inspected>,
    /// `inspect.upstream_ca_file` and the trust anchors it holds, added to the system's
    /// store to verify upstreams (there is no way to turn that verification off).
    pub upstream_ca_file: Option<PathBuf>,
    pub upstream_roots: Vec<CertificateDer<'static>>,
    /// `inspect.max_cached_certs`.
    pub max_cached_certs: usize,
}

impl Inspection {
    /// What `hosts` and the path rules of `policies` (the default policy and every client
    /// policy: one CA serves them all) on `tls_ports` inspect, less what `bypass` covers
    /// whole; and one warning per path rule over a bypassed name, which cannot be enforced
    /// there. No CA yet: [`Inspection::with_ca`] adds it.
    pub fn plan(
        policies: &[&Policy],
        tls_ports: &[u16],
        hosts: Vec<HostPattern>,
        bypass: Vec<HostPattern>,
        max_cached_certs: usize,
    ) -> (Self, Vec<String>) {
        let mut inspected = Vec::new();
        let mut warnings = Vec::new();
        let bypassed = |p: &HostPattern| bypass.iter().any(|b| b.covers(p));
        for r in policies.iter().flat_map(|p| p.rules()) {
            let Matchable::Host(h, Some(_)) = &r.what else {
                continue;
            };
            if r.action != Action::Allow || !tls_ports.iter().any(|&p| r.ports.contains(p)) {
                continue;
            }
            if let Some(b) = bypass.iter().find(|b| b.overlaps(h)) {
                warnings.push(format!(
                    "{} ({}) restricts a path over a name inspect.bypass holds ({b}): there it cannot be enforced over TLS (refused with policy.tls_path_rules = \"inspect\" or \"deny\", widened to the host with \"widen\")",
                    r.display(),
                    r.source
                ));
            }
            if !bypassed(h) {
                inspected.push(Inspected {
                    pattern: h.clone(),
                    why: Why::PathRule,
                    what: format!("{} ({})", r.display(), r.source),
                });
            }
        }
        for h in &hosts {
            if !bypassed(h) {
                inspected.push(Inspected {
                    pattern: h.clone(),
                    why: Why::Hosts,
                    what: "inspect.hosts".into(),
                });
            }
        }
        let plan = Inspection {
            ca: None,
            hosts: HostSet::new(hosts),
            bypass: HostSet::new(bypass),
            inspected,
            upstream_ca_file: None,
            upstream_roots: Vec::new(),
            max_cached_certs,
        };
        (plan, warnings)
    }

    /// Whether an allowed tunnel to `host` (a normalised name) is inspected, and why:
    /// never without a CA nor for a bypassed name; for a path rule
    /// (`allowing_rule_has_path`), or a name in `inspect.hosts`. Which ports are inspected
    /// (`proxy.tls_ports`) is the caller's to check.
    #[inline]
    pub fn inspects(&self, host: &str, allowing_rule_has_path: bool) -> Option<Why> {
        if self.ca.is_none() || self.bypass.contains(host) {
            return None;
        }
        if allowing_rule_has_path {
            Some(Why::PathRule)
        } else if self.hosts.contains(host) {
            Some(Why::Hosts)
        } else {
            None
        }
    }

    /// Whether a tunnel to `target` on which `policy` decided `d` is inspected: a name on
    /// one of `tls_ports`, not bypassed, and either allowed and in `inspect.hosts`, or
    /// left undecided because only a path rule matches and `policy.tls_path_rules =
    /// "inspect"` (`path_hidden_by_tls`), whose path inspection will see. The one place this is decided,
    /// for the proxy and for `check`.
    pub fn inspects_tunnel(
        &self,
        policy: &Policy,
        tls_ports: &[u16],
        target: &crate::policy::Target,
        d: &crate::policy::Decision,
    ) -> bool {
        let crate::policy::Host::Name(name) = target.host else {
            return false;
        };
        if self.ca.is_none() || !tls_ports.contains(&target.port) {
            return false;
        }
        // A path rule is inspected where `policy.tls_path_rules = "inspect"` left it
        // undecided; `widen` and `deny` say what the operator wants instead.
        let path_rule = match d.reason {
            crate::policy::Reason::PathHiddenByTls => {
                policy.options().tls_path_rules == crate::policy::TlsPathRules::Inspect
            }
            _ if d.is_allowed() => false,
            _ => return false,
        };
        self.inspects(name.as_str(), path_rule).is_some()
    }

    /// When the CA's certificate expires (with a CA).
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.ca.as_ref().map(|c| c.cert.not_after)
    }

    /// The DNS subtrees a CA for this configuration must permit.
    pub fn subtrees(&self) -> Vec<String> {
        ca::subtrees(self.inspected.iter().map(|i| &i.pattern))
    }

    /// The inspected patterns that `constraints` do not permit.
    pub fn not_permitted<'a>(&'a self, constraints: &'a Constraints) -> Vec<&'a Inspected> {
        self.inspected
            .iter()
            .filter(|i| !constraints.permits(&i.pattern))
            .collect()
    }

    /// `inspect.bypass`'s patterns.
    pub fn bypass(&self) -> &[HostPattern] {
        self.bypass.patterns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyOptions, PortSet, RuleSpec, Source};

    fn rule(pattern: &str, port: u16) -> RuleSpec {
        let (h, path) = parse_pattern(pattern).unwrap();
        RuleSpec {
            action: Action::Allow,
            what: Matchable::Host(h, path),
            ports: PortSet::from_ranges([(port, port)]),
            source: Source::Operator {
                list: "allow".into(),
                index: 1,
                comment: None,
            },
        }
    }

    fn pats(v: &[&str]) -> Vec<HostPattern> {
        v.iter().map(|s| host_pattern(s).unwrap()).collect()
    }

    #[test]
    fn path_rules_on_tls_ports_and_hosts_are_inspected_unless_bypassed() {
        let policy = Policy::compile(
            vec![
                rule("raw.githubusercontent.com/microsoft/*", 443),
                rule("plain.example/x/*", 80),
                rule("pinned.example/a/*", 443),
                rule("files.example", 443),
            ],
            PolicyOptions::default(),
        )
        .unwrap();
        let (mut plan, warnings) = Inspection::plan(
            &[&policy],
            &[443],
            pats(&["*.blob.core.windows.net", "keep.pinned.example"]),
            pats(&["pinned.example", "x.blob.core.windows.net"]),
            10,
        );
        let got: Vec<(String, Why)> = plan
            .inspected
            .iter()
            .map(|i| (i.pattern.to_string(), i.why))
            .collect();
        assert_eq!(
            got,
            [
                ("raw.githubusercontent.com".to_owned(), Why::PathRule),
                ("*.blob.core.windows.net".to_owned(), Why::Hosts),
                ("keep.pinned.example".to_owned(), Why::Hosts),
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("pinned.example/a/*"), "{warnings:?}");
        // Without a CA nothing is inspected.
        assert_eq!(plan.inspects("a.blob.core.windows.net", false), None);
        let ca = ca::generate(Some(&plan.subtrees()), 1, "t", SystemTime::now()).unwrap();
        let dir = std::env::temp_dir().join(format!("aml-egress-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_path = dir.join("ca.key");
        ca::write_new(&key_path, &ca.key_pem, 0o600, true).unwrap();
        let key = ca::read_key(&key_path, &ca.cert).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        plan.ca = Some(LoadedCa {
            cert_path: "ca.pem".into(),
            key_path,
            cert: ca.cert,
            key,
        });
        assert_eq!(
            plan.inspects("a.blob.core.windows.net", false),
            Some(Why::Hosts)
        );
        assert_eq!(plan.inspects("x.blob.core.windows.net", false), None);
        assert_eq!(plan.inspects("x.blob.core.windows.net", true), None);
        assert_eq!(
            plan.inspects("raw.githubusercontent.com", true),
            Some(Why::PathRule)
        );
        assert_eq!(plan.inspects("files.example", false), None);
    }
}
