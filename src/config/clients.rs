//! `[[client_policy]]`: policies per client for one appliance serving several workspaces
//! (hub and spoke). Each names the clients it serves (source networks, client certificate
//! names) and has its own `[client_policy.catalog]`, `[[client_policy.allow]]`,
//! `[[client_policy.deny]]` and `mode`. The top-level `[catalog]`, `[[allow]]` and
//! `proxy.mode` stay the default policy (`default`); the top-level `[[deny]]` applies to
//! every policy.
//!
//! A client policy is compiled as a configuration of its own ([`derived`]: the global
//! settings with its catalog, rules and mode), so that it is checked and built by exactly
//! the code the default policy goes through; its messages name it ([`rekey`]).

use std::collections::BTreeMap;

use config::{Map, Value, ValueKind};
use ipnet::IpNet;

use super::read::Reader;
use super::settings::{CatalogSettings, Mode, RuleEntry, Settings};
use super::{ConfigIssue, rule_entries};

/// The name of the policy the top-level settings make.
pub const DEFAULT_POLICY: &str = "default";

/// Fields of a `[[client_policy]]` table.
pub const FIELDS: &[&str] = &[
    "name",
    "sources",
    "client_names",
    "mode",
    "catalog",
    "allow",
    "deny",
];

/// One `[[client_policy]]` as read: whom it serves and what it allows.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientPolicySettings {
    /// `[a-z0-9_-]`, unique, not `default`: the `policy` label of metrics and logs.
    pub name: String,
    /// Client networks it serves; the most specific prefix over all policies wins.
    pub sources: Vec<IpNet>,
    /// Client certificate DNS SAN (or CN) patterns it serves on `proxy.tls_listen`.
    pub client_names: Vec<String>,
    /// Its mode; `None`: `proxy.mode`.
    pub mode: Option<Mode>,
    /// Its catalog selection; keys it does not give take the built-in defaults, never the
    /// top-level `[catalog]`'s (another workspace's storage account must not leak in).
    pub catalog: CatalogSettings,
    pub allow: Vec<RuleEntry>,
    /// Its own denials, after the global `[[deny]]`.
    pub deny: Vec<RuleEntry>,
    /// Where each of its keys came from, keyed as inside the table (`catalog.region`).
    pub origins: BTreeMap<String, String>,
    /// Its 1-based place among the `[[client_policy]]` tables.
    pub index: usize,
}

impl ClientPolicySettings {
    /// `client_policy[2]`, as keys in messages start.
    pub fn path(&self) -> String {
        format!("client_policy[{}]", self.index)
    }
}

/// Read every `[[client_policy]]` table of the collected tree (its keys were checked by
/// the schema); problems go to `issues`, keyed by their place (`client_policy[2].sources`).
pub(super) fn read(
    root: &Map<String, Value>,
    origins: &BTreeMap<String, String>,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<ClientPolicySettings> {
    let Some(ValueKind::Array(entries)) = root.get("client_policy").map(|v| &v.kind) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let ValueKind::Table(table) = &entry.kind else {
            continue; // reported by the schema check
        };
        let prefix = format!("client_policy[{}].", i + 1);
        // The keys under a prefix sit together in the map: visiting only them keeps a
        // file of many policies linear to read.
        let own: BTreeMap<String, String> = origins
            .range(prefix.clone()..)
            .map_while(|(k, o)| Some((k.strip_prefix(&prefix)?.to_owned(), o.clone())))
            .collect();
        let mut r = Reader::new(table, &own);
        let name: String = r.read("name", String::new());
        let sources: Vec<IpNet> = r
            .read("sources", Vec::new())
            .into_iter()
            .map(canonical)
            .collect();
        let client_names: Vec<String> = r.read("client_names", Vec::new());
        let mode: Option<Mode> = r.read("mode", None);
        let catalog = CatalogSettings::read(&mut r);
        let mut found = r.issues;
        let allow = rule_entries(table, "allow", &own, &mut found);
        let deny = rule_entries(table, "deny", &own, &mut found);
        let cp = ClientPolicySettings {
            name,
            sources,
            client_names,
            mode,
            catalog,
            allow,
            deny,
            origins: own,
            index: i + 1,
        };
        issues.extend(found.into_iter().map(|issue| rekey(issue, &cp)));
        out.push(cp);
    }
    out
}

/// A problem found inside a client policy, as the operator finds it: the key from the top
/// of the file (`client_policy[2].catalog.region`, `client_policy[2].allow[1].host`) and
/// the policy's name in the problem.
pub fn rekey(mut issue: ConfigIssue, cp: &ClientPolicySettings) -> ConfigIssue {
    let inner = issue
        .key
        .strip_prefix("client_policy.")
        .unwrap_or(&issue.key)
        .to_owned();
    issue.key = format!("{}.{inner}", cp.path());
    if !cp.name.is_empty() {
        issue.problem = format!("(policy {}) {}", cp.name, issue.problem);
    }
    if issue.origin.is_empty() {
        issue.origin = cp.origins.get(&inner).cloned().unwrap_or_default();
    }
    issue
}

/// The global settings every client policy's [`derived`] settings start from: `s`
/// without its client policies and their origins. Made once per load, so that deriving
/// each of a hub's policies copies the global settings only, not every other policy's
/// (which made loading quadratic in the number of policies).
pub fn base(s: &Settings) -> Settings {
    let Settings {
        catalog,
        policy,
        inspect,
        proxy,
        upstream,
        transparent,
        admin,
        metrics,
        log,
        reload,
        allow,
        deny,
        client_policies: _,
        policy_name,
        own_deny,
        file,
        origins,
    } = s;
    Settings {
        catalog: catalog.clone(),
        policy: policy.clone(),
        inspect: inspect.clone(),
        proxy: proxy.clone(),
        upstream: upstream.clone(),
        transparent: transparent.clone(),
        admin: admin.clone(),
        metrics: metrics.clone(),
        log: log.clone(),
        reload: reload.clone(),
        allow: allow.clone(),
        deny: deny.clone(),
        client_policies: Vec::new(),
        policy_name: policy_name.clone(),
        own_deny: own_deny.clone(),
        file: file.clone(),
        origins: origins
            .iter()
            .filter(|(k, _)| !k.starts_with("client_policy"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The settings a client policy is compiled from: the global ones (`base`, from
/// [`base`]), with its catalog, its allow rules, the global deny rules followed by its
/// own, its mode, and the origins of its own keys in place of the top-level ones. It has
/// no client policies itself.
pub fn derived(base: &Settings, cp: &ClientPolicySettings) -> Settings {
    let mut d = base.clone();
    d.catalog = cp.catalog.clone();
    d.allow = cp.allow.clone();
    d.own_deny = cp.deny.clone();
    d.policy_name = Some(cp.name.clone());
    if let Some(mode) = cp.mode {
        d.proxy.mode = mode;
    }
    d.origins
        .retain(|k, _| !k.starts_with("catalog.") && !k.starts_with("allow"));
    for (k, o) in &cp.origins {
        if k.starts_with("catalog.") {
            d.origins.insert(k.clone(), o.clone());
        } else if let Some(rest) = k.strip_prefix("allow") {
            d.origins
                .insert(format!("client_policy.allow{rest}"), o.clone());
        } else if let Some(rest) = k.strip_prefix("deny") {
            d.origins
                .insert(format!("client_policy.deny{rest}"), o.clone());
        }
    }
    d
}

/// A source network as clients are looked up: an IPv4-mapped IPv6 prefix
/// (`::ffff:10.1.0.0/112`) as the IPv4 one it maps (`10.1.0.0/16`), since a client on a
/// dual-stack listener is looked up by its IPv4 address.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(IpNet::V4)
                .unwrap_or(net),
            None => net,
        },
        _ => net,
    }
}

/// Whether `name` may name a policy: 1 to 64 of `a-z`, `0-9`, `_`, `-`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The most `[[client_policy]]` tables one configuration may hold: a connection carries
/// its policy's place in 16 bits, and the `policy` label of the metrics stays bounded.
pub const MAX_CLIENT_POLICIES: usize = 4096;

/// `text` (an explanation, a hint or a configuration entry written for the default
/// policy) as it reads for a `[[client_policy]]`: its keys are the policy's own
/// (`[[client_policy.allow]]`, `client_policy.catalog.narrow`, ...), since a client policy
/// takes nothing from the top-level `[catalog]` and `[[allow]]`. The top-level `[[deny]]`
/// applies to every policy and stays. The parts of `text` that are one of `keep` (what
/// came from the network: the target, its host) are left as they are, so that a host
/// named `catalog.features.contoso.com` is never rewritten.
pub fn in_client_policy(text: &str, keep: &[&str]) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    let mut rest = text;
    loop {
        let next = keep
            .iter()
            .filter(|k| !k.is_empty())
            .filter_map(|k| rest.find(*k).map(|i| (i, k.len())))
            .min_by_key(|&(i, n)| (i, std::cmp::Reverse(n)));
        match next {
            Some((i, n)) => {
                out.push_str(&own_keys(&rest[..i]));
                out.push_str(&rest[i..i + n]);
                rest = &rest[i + n..];
            }
            None => {
                out.push_str(&own_keys(rest));
                return out;
            }
        }
    }
}

/// The rewrite of [`in_client_policy`], on text that holds nothing from the network.
fn own_keys(text: &str) -> std::borrow::Cow<'_, str> {
    use std::sync::OnceLock;
    static KEYS: OnceLock<regex::Regex> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        regex::Regex::new(
            r"(^|[^.\w])(\[\[allow\]\]|catalog\.(?:narrow|features|service_tags_nameless_tls|storage_account|region|container_registry|cloud|revision|import|service_tags_file))",
        )
        .expect("the pattern is valid")
    });
    keys.replace_all(text, |c: &regex::Captures<'_>| {
        let key = &c[2];
        let own = match key.strip_prefix("[[") {
            Some(list) => format!("[[client_policy.{list}"),
            None => format!("client_policy.{key}"),
        };
        format!("{}{own}", &c[1])
    })
}

/// The cross-policy checks: how many, names, whom each serves, sources claimed twice.
/// (Each policy's own catalog and rules are checked as its [`derived`] settings.)
pub(super) fn check(s: &Settings) -> Vec<ConfigIssue> {
    let mut out = Vec::new();
    if s.client_policies.len() > MAX_CLIENT_POLICIES {
        out.push(ConfigIssue {
            origin: s.origin_of("client_policy"),
            key: "client_policy".into(),
            value: Some(format!("{} tables", s.client_policies.len())),
            problem: format!("more than {MAX_CLIENT_POLICIES} client policies"),
            fix: Some(
                "give spokes with the same needs one policy with several sources, or split the hub over several appliances".into(),
            ),
        });
        return out;
    }
    let mut named: BTreeMap<&str, &ClientPolicySettings> = BTreeMap::new();
    let mut claimed: BTreeMap<IpNet, &ClientPolicySettings> = BTreeMap::new();
    let mut certs: Vec<(crate::policy::HostPattern, &str, &ClientPolicySettings)> = Vec::new();
    for cp in &s.client_policies {
        let issue = |field: &str, value: Option<String>, problem: String, fix: &str| ConfigIssue {
            origin: cp
                .origins
                .get(field)
                .cloned()
                .unwrap_or_else(|| s.origin_of(&cp.path())),
            key: format!("{}.{field}", cp.path()),
            value,
            problem,
            fix: Some(fix.to_owned()),
        };
        if !valid_name(&cp.name) || cp.name == DEFAULT_POLICY {
            let (problem, fix) = if cp.name.is_empty() {
                (
                    "a client policy needs a name",
                    "add name = \"team-a\" (a-z, 0-9, _ and -): metrics and logs carry it",
                )
            } else if cp.name == DEFAULT_POLICY {
                (
                    "\"default\" is the policy of the top-level [catalog] and [[allow]]",
                    "choose another name",
                )
            } else {
                (
                    "not a policy name",
                    "use 1 to 64 of a-z, 0-9, _ and - (metrics and logs carry it)",
                )
            };
            out.push(issue(
                "name",
                Some(format!("{:?}", cp.name)),
                problem.into(),
                fix,
            ));
        } else if let Some(first) = named.insert(&cp.name, cp) {
            out.push(issue(
                "name",
                Some(format!("{:?}", cp.name)),
                format!("{} already has this name", first.path()),
                "give each [[client_policy]] its own name",
            ));
        }
        if cp.sources.is_empty() && cp.client_names.is_empty() {
            out.push(issue(
                "sources",
                None,
                format!("policy {:?} serves no client", cp.name),
                "add sources = [\"10.1.0.0/16\"] (the spoke's client networks) or client_names for client certificates",
            ));
        }
        for net in &cp.sources {
            if let Some(first) = claimed.insert(*net, cp) {
                out.push(issue(
                    "sources",
                    Some(net.to_string()),
                    format!(
                        "policies {:?} ({}) and {:?} both claim {net}: a client there would have two policies",
                        first.name,
                        first.path(),
                        cp.name
                    ),
                    "give the network to one policy (a more specific prefix in another wins over it)",
                ));
            }
        }
        if !cp.client_names.is_empty() && s.proxy.tls_client_ca.is_none() {
            out.push(issue(
                "client_names",
                Some(format!("{:?}", cp.client_names)),
                format!(
                    "policy {:?} is chosen by client certificates, which the proxy asks for only with proxy.tls_client_ca",
                    cp.name
                ),
                "set proxy.tls_client_ca (and proxy.tls_listen), or remove client_names",
            ));
        }
        for pattern in &cp.client_names {
            let p = pattern.to_ascii_lowercase();
            let parsed = match crate::policy::parse_pattern(&p) {
                Ok((host, None)) => Some(host),
                _ => None,
            };
            let Some(host) = parsed else {
                out.push(issue(
                    "client_names",
                    Some(format!("{pattern:?}")),
                    "not a certificate name pattern".into(),
                    "write a DNS name such as \"workspace-a.contoso.com\" or \"*.team-a.contoso.com\"",
                ));
                continue;
            };
            // A certificate name two policies' patterns both match would have two policies.
            if let Some((_, other, first)) = certs
                .iter()
                .find(|(h, _, first)| first.index != cp.index && h.overlaps(&host))
            {
                out.push(issue(
                    "client_names",
                    Some(format!("{pattern:?}")),
                    format!(
                        "policies {:?} ({other:?}) and {:?} ({pattern:?}) both claim some certificate names",
                        first.name, cp.name
                    ),
                    "give each certificate name to one policy (patterns that cannot match the same name)",
                ));
            }
            certs.push((host, pattern, cp));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_hints_name_the_client_policys_own_keys() {
        assert_eq!(
            in_client_policy(
                "[catalog.narrow]\n\"*.blob.core.windows.net\" = [..., \"x\"]",
                &[]
            ),
            "[client_policy.catalog.narrow]\n\"*.blob.core.windows.net\" = [..., \"x\"]"
        );
        assert_eq!(
            in_client_policy(
                "add it to catalog.narrow.\"*.b\"; or catalog.features = [\"vscode\"]",
                &[]
            ),
            "add it to client_policy.catalog.narrow.\"*.b\"; or client_policy.catalog.features = [\"vscode\"]"
        );
        assert_eq!(
            in_client_policy("[[allow]]\nhost = \"a\"", &[]),
            "[[client_policy.allow]]\nhost = \"a\""
        );
        // Already the policy's own, the global [[deny]], and words that are not keys,
        // stay as they are.
        let own = "client_policy.catalog.narrow, [[deny]] #1, the catalog. and (catalog 2026-03)";
        assert_eq!(in_client_policy(own, &[]), own);
        // What came from the network is never rewritten, wherever it stands.
        let host = "catalog.features.contoso.com";
        assert_eq!(
            in_client_policy(
                &format!("[[allow]]\nhost = \"{host}\"\nports = [80]"),
                &[host]
            ),
            format!("[[client_policy.allow]]\nhost = \"{host}\"\nports = [80]")
        );
        let shown = "x.test:80/[[allow]]";
        assert_eq!(
            in_client_policy(
                &format!("{shown}: no rule matches; add an [[allow]] entry"),
                &[shown]
            ),
            format!("{shown}: no rule matches; add an [[client_policy.allow]] entry")
        );
    }

    #[test]
    fn ipv4_mapped_source_prefixes_are_read_as_the_ipv4_ones_clients_are_looked_up_by() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(canonical(net("::ffff:10.1.0.0/112")), net("10.1.0.0/16"));
        assert_eq!(canonical(net("::ffff:127.0.0.5/128")), net("127.0.0.5/32"));
        assert_eq!(canonical(net("fd00:2::/48")), net("fd00:2::/48"));
        assert_eq!(canonical(net("::/0")), net("::/0"));
        assert_eq!(canonical(net("10.0.0.0/8")), net("10.0.0.0/8"));
    }
}
