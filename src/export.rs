//! `aml-egress export`: the enforced rule set for another enforcement point.
//!
//! - `azure-firewall`: an Azure Firewall Policy rule collection group (ARM JSON). Host rules
//!   on HTTP(S) ports become application rules; host rules on other ports network rules with
//!   `destinationFqdns` (Azure Firewall's DNS proxy must be on); CIDR and service-tag rules
//!   network rules; `[[deny]]` entries a Deny collection of higher priority. A bare leading
//!   star (`*contoso.com`, which Azure Firewall would match against `th3re4lcontoso.com`) is
//!   never written: `name` and `*.name` instead.
//! - `squid`: `acl` and `http_access` lines that reproduce the decisions (`dstdomain -n` for
//!   names, `dstdom_regex` for `*.name`, which never matches the apex), with the rules' ports.
//!
//! With `[[client_policy]]` policies each policy is written for the addresses it serves:
//! [`azure_firewall_policies`] a rule collection group per policy, [`squid_policies`] a
//! section per policy.
//!
//! Regex rules cannot be expressed in either; path rules follow `policy.tls_path_rules`
//! (widened to their host, or left out): a warning names each.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::config::Built;
use crate::policy::{Action, HostPattern, Matchable, PortSet, Rule, Source, TlsPathRules};

/// An export and what it could not express.
#[derive(Debug)]
pub struct Export {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Host names as both exports write them: never a bare leading star.
fn names(h: &HostPattern) -> Vec<String> {
    match h {
        HostPattern::Exact(n) => vec![n.clone()],
        HostPattern::Subdomains(n) => vec![format!("*.{n}")],
        HostPattern::ApexAndSubdomains(n) => vec![n.clone(), format!("*.{n}")],
    }
}

fn port_list(p: &PortSet) -> Vec<String> {
    if p.is_any() {
        return vec!["*".into()];
    }
    p.range_texts().map(|r| r.to_string()).collect()
}

/// The rules to export, as the policy enforces them: path rules handled by
/// `policy.tls_path_rules`, narrowed wildcards (`catalog.narrow`) written as the names they
/// still allow, and catalog CIDR rules without the TLS ports that
/// `catalog.service_tags_nameless_tls = "deny"` keeps from them; warnings for the rest.
fn exportable(
    built: &Built,
    tls_path_rules: TlsPathRules,
    warnings: &mut Vec<String>,
) -> Vec<Rule> {
    let options = built.policy.options();
    let mut out = Vec::new();
    for r in built.policy.rules() {
        match (&r.what, tls_path_rules) {
            (Matchable::Regex(_), _) => warnings.push(format!(
                "left out {} ({}): regex rules cannot be expressed",
                r.display(),
                r.source
            )),
            (Matchable::Host(_, Some(_)), TlsPathRules::Deny | TlsPathRules::Inspect) => {
                warnings.push(format!(
                    "left out {} ({}): path rules cannot be expressed, and policy.tls_path_rules = \"{}\" never widens them",
                    r.display(),
                    r.source,
                    tls_path_rules.as_str()
                ))
            }
            (Matchable::Host(h, path), _) => {
                if path.is_some() {
                    warnings.push(format!(
                        "widened {} ({}) to its whole host: paths cannot be expressed",
                        r.display(),
                        r.source
                    ));
                }
                let narrowed = (r.action == Action::Allow)
                    .then(|| options.narrow.iter().find(|(k, _)| k == h))
                    .flatten();
                match narrowed {
                    Some((_, names)) => out.extend(names.iter().map(|n| Rule {
                        what: Matchable::Host(n.clone(), None),
                        ..r.clone()
                    })),
                    None => out.push(Rule {
                        what: Matchable::Host(h.clone(), None),
                        ..r.clone()
                    }),
                }
            }
            (Matchable::Cidr(_), _)
                if r.action == Action::Allow
                    && !matches!(r.source, Source::Operator { .. })
                    && !options.nameless_tls_ports.is_empty() =>
            {
                match r.ports.without(&options.nameless_tls_ports) {
                    Some(ports) => out.push(Rule { ports, ..r.clone() }),
                    None => warnings.push(format!(
                        "left out {} ({}): an address on a TLS port carries no server name, and catalog.service_tags_nameless_tls = \"deny\"",
                        r.display(),
                        r.source
                    )),
                }
            }
            _ => out.push(r.clone()),
        }
    }
    out
}

/// A rule name: unique (numbered), at most 80 characters, letters, digits, `-` and `.`.
fn rule_name(i: usize, what: &str) -> String {
    let clean: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!("r{i}-{clean}");
    name.truncate(80);
    name
}

/// The Azure Firewall Policy rule collection group.
pub fn azure_firewall(built: &Built, tls_path_rules: TlsPathRules, sources: &[String]) -> Export {
    azure_firewall_group(built, tls_path_rules, sources, ("aml-egress", 200))
}

/// [`azure_firewall`] as the group `name` at `priority`: one policy of several, exported
/// alone under the name and priority it has among all of them (`aml-egress-team-a`, 200),
/// so that groups exported one at a time do not collide.
pub fn azure_firewall_group(
    built: &Built,
    tls_path_rules: TlsPathRules,
    sources: &[String],
    (name, priority): (&str, u32),
) -> Export {
    let mut warnings = Vec::new();
    let group = group(
        built,
        tls_path_rules,
        sources,
        name,
        priority,
        &mut warnings,
    );
    Export {
        text: serde_json::to_string_pretty(&group).unwrap_or_default() + "\n",
        warnings,
    }
}

/// One policy of a configuration with several, as an export writes it: its name, its
/// rules and the source addresses they apply to (none: any).
#[derive(Debug)]
pub struct PolicyPart<'a> {
    pub name: &'a str,
    /// Its place among the policies (the client policies' in file order, then the default
    /// one's): its group's priority, whichever others are exported with it.
    pub place: usize,
    pub built: &'a Built,
    pub sources: Vec<String>,
}

/// Azure Firewall rule collection groups, one per policy (`aml-egress-<policy>`, in the
/// order given, priorities 200, 300, ... by each policy's place): a JSON array. Each policy's rules apply to its
/// own sources only; its warnings name it.
pub fn azure_firewall_policies(parts: &[PolicyPart<'_>], tls_path_rules: TlsPathRules) -> Export {
    let mut warnings = Vec::new();
    let mut groups = Vec::new();
    for p in parts {
        let mut own = Vec::new();
        let priority = group_priority(p.place);
        let wanted = wanted_priority(p.place);
        if wanted > GROUP_PRIORITY_MAX as usize {
            own.push(format!(
                "its group's priority would be {wanted} but Azure Firewall takes at most {GROUP_PRIORITY_MAX}: it shares {GROUP_PRIORITY_MAX} with the policies around it; export fewer policies per firewall policy, or set the priorities by hand"
            ));
        }
        groups.push(group(
            p.built,
            tls_path_rules,
            &p.sources,
            &format!("aml-egress-{}", p.name),
            priority,
            &mut own,
        ));
        warnings.extend(own.into_iter().map(|w| format!("(policy {}) {w}", p.name)));
    }
    Export {
        text: serde_json::to_string_pretty(&Value::Array(groups)).unwrap_or_default() + "\n",
        warnings,
    }
}

/// The highest priority Azure Firewall takes for a rule collection group.
pub const GROUP_PRIORITY_MAX: u32 = 65_000;

/// The priority of the `i`th (0-based) policy's rule collection group: 200, 300, ...,
/// at most [`GROUP_PRIORITY_MAX`] (the 649th policy's and later share it).
pub fn group_priority(i: usize) -> u32 {
    u32::try_from(wanted_priority(i))
        .unwrap_or(u32::MAX)
        .min(GROUP_PRIORITY_MAX)
}

/// The `i`th policy's group priority before Azure's bound: 200, 300, ...
fn wanted_priority(i: usize) -> usize {
    200 + 100 * i
}

/// One rule collection group: `name` at `priority`, the rules of `built` for `sources`.
fn group(
    built: &Built,
    tls_path_rules: TlsPathRules,
    sources: &[String],
    name: &str,
    priority: u32,
    warnings: &mut Vec<String>,
) -> Value {
    let sources: Vec<String> = if sources.is_empty() {
        vec!["*".into()]
    } else {
        sources.to_vec()
    };
    let mut allow = Vec::new();
    let mut deny = Vec::new();
    // Service tags with their ports, each exported once by name.
    let mut tags: BTreeSet<(String, String)> = BTreeSet::new();
    for (i, r) in exportable(built, tls_path_rules, warnings)
        .iter()
        .enumerate()
    {
        let into = if r.action == Action::Deny {
            &mut deny
        } else {
            &mut allow
        };
        match &r.what {
            Matchable::Host(h, _) => {
                let fqdns = names(h);
                let web: Vec<u16> = r
                    .ports
                    .ranges()
                    .iter()
                    .filter(|(lo, hi)| lo == hi && (*lo == 80 || *lo == 443))
                    .map(|(lo, _)| *lo)
                    .collect();
                let web_only = !r.ports.is_any() && web.len() == r.ports.ranges().len();
                if web_only || r.ports.is_any() {
                    let ports = if r.ports.is_any() { vec![80, 443] } else { web };
                    let protocols: Vec<Value> = ports
                        .iter()
                        .map(|p| {
                            json!({"protocolType": if *p == 443 { "Https" } else { "Http" }, "port": p})
                        })
                        .collect();
                    into.push(json!({
                        "ruleType": "ApplicationRule",
                        "name": rule_name(i, &h.to_string()),
                        "description": r.source.to_string().chars().take(140).collect::<String>(),
                        "sourceAddresses": sources,
                        "protocols": protocols,
                        "targetFqdns": fqdns,
                    }));
                } else {
                    into.push(json!({
                        "ruleType": "NetworkRule",
                        "name": rule_name(i, &h.to_string()),
                        "description": "by name on other ports: needs Azure Firewall's DNS proxy",
                        "ipProtocols": ["TCP"],
                        "sourceAddresses": sources,
                        "destinationFqdns": fqdns,
                        "destinationPorts": port_list(&r.ports),
                    }));
                }
            }
            Matchable::Cidr(net) => {
                // Prefixes of one service tag become one rule naming the tag.
                if let Source::Catalog {
                    service_tag: Some(tag),
                    ..
                } = &r.source
                    && r.action == Action::Allow
                {
                    tags.insert((tag.clone(), port_list(&r.ports).join(",")));
                    continue;
                }
                into.push(json!({
                    "ruleType": "NetworkRule",
                    "name": rule_name(i, &net.to_string()),
                    "ipProtocols": ["TCP"],
                    "sourceAddresses": sources,
                    "destinationAddresses": [net.to_string()],
                    "destinationPorts": port_list(&r.ports),
                }));
            }
            Matchable::Regex(_) => {}
        }
    }
    for (i, (tag, ports)) in tags.into_iter().enumerate() {
        allow.push(json!({
            "ruleType": "NetworkRule",
            "name": rule_name(10_000 + i, &tag),
            "ipProtocols": ["TCP"],
            "sourceAddresses": sources,
            "destinationAddresses": [tag],
            "destinationPorts": ports.split(',').collect::<Vec<_>>(),
        }));
    }
    let mut collections = Vec::new();
    if !deny.is_empty() {
        collections.push(json!({
            "ruleCollectionType": "FirewallPolicyFilterRuleCollection",
            "name": "aml-egress-deny",
            "priority": 100,
            "action": {"type": "Deny"},
            "rules": deny,
        }));
    }
    collections.push(json!({
        "ruleCollectionType": "FirewallPolicyFilterRuleCollection",
        "name": "aml-egress-allow",
        "priority": 200,
        "action": {"type": "Allow"},
        "rules": allow,
    }));
    json!({
        "name": name,
        "properties": {
            "priority": priority,
            "ruleCollections": collections,
        }
    })
}

/// A regular expression for `*.name`: one or more labels before `name`, never `name`.
fn subdomain_regex(name: &str) -> String {
    format!("\\.{}$", name.replace('.', "\\."))
}

/// Squid `acl` and `http_access` lines.
pub fn squid(built: &Built, tls_path_rules: TlsPathRules, sources: &[String]) -> Export {
    use std::fmt::Write as _;
    let mut warnings = Vec::new();
    let mut o = String::from(SQUID_HEADER);
    let src = if sources.is_empty() {
        "all".to_owned()
    } else {
        let _ = writeln!(o, "acl aml_src src {}", sources.join(" "));
        "aml_src".to_owned()
    };
    squid_lines(&mut o, built, tls_path_rules, "aml", &src, &mut warnings);
    let _ = writeln!(o, "http_access deny all");
    Export { text: o, warnings }
}

const SQUID_HEADER: &str = "# aml-egress rules for Squid (generated by `aml-egress export --format squid`).\n# Include before your own http_access lines; the last line refuses everything else.\n";

/// The default policy in a Squid export of every policy: its rules, for the clients that
/// no client policy claims (`claimed`, all client policies' sources), within `sources`
/// when given.
#[derive(Debug)]
pub struct SquidDefault<'a> {
    pub built: &'a Built,
    pub sources: Vec<String>,
    pub claimed: Vec<String>,
}

/// Squid lines for a configuration with client policies: a section per policy, its
/// `http_access` lines qualified by its own `src` ACL (deny lines first within it), then
/// the default policy's, qualified by `!aml_claimed`, when it serves anyone; one
/// `http_access deny all` at the end. The policies' sources must not overlap (see
/// [`crate::config::ClientPolicies::served`]): Squid takes the first line that matches.
pub fn squid_policies(
    parts: &[PolicyPart<'_>],
    default: Option<&SquidDefault<'_>>,
    tls_path_rules: TlsPathRules,
) -> Export {
    use std::fmt::Write as _;
    let mut warnings = Vec::new();
    let mut o = String::from(SQUID_HEADER);
    for (i, p) in parts.iter().enumerate() {
        // Squid's ACL names are at most 63 characters: long policy names go by place.
        let prefix = if p.name.len() <= 40 {
            format!("aml_{}", p.name)
        } else {
            format!("aml_p{}", i + 1)
        };
        let _ = writeln!(o, "\n# policy {}: {}", p.name, p.sources.join(" "));
        let _ = writeln!(o, "acl {prefix}_src src {}", p.sources.join(" "));
        let mut own = Vec::new();
        squid_lines(
            &mut o,
            p.built,
            tls_path_rules,
            &prefix,
            &format!("{prefix}_src"),
            &mut own,
        );
        warnings.extend(own.into_iter().map(|w| format!("(policy {}) {w}", p.name)));
    }
    if let Some(d) = default {
        let _ = writeln!(
            o,
            "\n# policy default: clients no other policy claims{}",
            if d.sources.is_empty() {
                String::new()
            } else {
                format!(", within {}", d.sources.join(" "))
            }
        );
        let mut src = String::new();
        if !d.sources.is_empty() {
            let _ = writeln!(o, "acl aml_src src {}", d.sources.join(" "));
            src.push_str("aml_src ");
        }
        if d.claimed.is_empty() {
            src.push_str(if d.sources.is_empty() { "all" } else { "" });
        } else {
            let _ = writeln!(o, "acl aml_claimed src {}", d.claimed.join(" "));
            src.push_str("!aml_claimed");
        }
        let src = src.trim_end();
        let mut own = Vec::new();
        squid_lines(&mut o, d.built, tls_path_rules, "aml", src, &mut own);
        warnings.extend(own.into_iter().map(|w| format!("(policy default) {w}")));
    }
    let _ = writeln!(o, "\nhttp_access deny all");
    Export { text: o, warnings }
}

/// The ACLs of `built`'s rules (named `<prefix>_r<n>`) and their `http_access` lines, each
/// qualified by `src` (ACL names, `!` allowed), deny lines first.
fn squid_lines(
    o: &mut String,
    built: &Built,
    tls_path_rules: TlsPathRules,
    prefix: &str,
    src: &str,
    warnings: &mut Vec<String>,
) {
    use std::fmt::Write as _;
    let mut access = Vec::new();
    for (i, r) in exportable(built, tls_path_rules, warnings)
        .iter()
        .enumerate()
    {
        let acl = format!("{prefix}_r{i}");
        // One ACL per kind of match (a Squid ACL has one type).
        let mut acls = Vec::new();
        match &r.what {
            Matchable::Host(h, _) => {
                let (exact, sub): (Vec<String>, Vec<String>) =
                    names(h).into_iter().partition(|n| !n.starts_with("*."));
                if !exact.is_empty() {
                    let _ = writeln!(o, "acl {acl} dstdomain -n {}", exact.join(" "));
                    acls.push(acl.clone());
                }
                for s in &sub {
                    let _ = writeln!(
                        o,
                        "acl {acl}_sub dstdom_regex -i {}",
                        subdomain_regex(&s[2..])
                    );
                }
                if !sub.is_empty() {
                    acls.push(format!("{acl}_sub"));
                }
            }
            Matchable::Cidr(net) => {
                let _ = writeln!(o, "acl {acl} dst {net}");
                acls.push(acl.clone());
            }
            Matchable::Regex(_) => continue,
        }
        let ports = if r.ports.is_any() {
            String::new()
        } else {
            let _ = writeln!(o, "acl {acl}_ports port {}", port_list(&r.ports).join(" "));
            format!(" {acl}_ports")
        };
        let verb = if r.action == Action::Deny {
            "deny"
        } else {
            "allow"
        };
        for a in acls {
            access.push((
                r.action == Action::Deny,
                format!("http_access {verb} {src} {a}{ports}"),
            ));
        }
    }
    // Deny entries first, as aml-egress applies them first.
    access.sort_by_key(|(is_deny, _)| !is_deny);
    for (_, line) in access {
        let _ = writeln!(o, "{line}");
    }
}
