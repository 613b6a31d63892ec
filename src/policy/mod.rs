//! The policy: rules compiled once, then asked about each destination on the hot path.
//!
//! Pure and synchronous: no I/O, no async, nothing of the rest of the crate. Rules arrive
//! as [`RuleSpec`]s (from the catalog and the operator's config), are compiled by
//! [`Policy::compile`], and every question gets a [`Decision`] that names the rule that
//! allowed or denied it, or the reason nothing did.

pub mod cidr;
mod hash;
mod matcher;
pub mod pattern;
pub mod target;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::reason::ReasonCode;
use cidr::CidrTable;
use matcher::NameTable;
pub use pattern::{HostPattern, PathPattern, PatternError, parse_pattern};
pub use target::{Host, InvalidTarget, Name, Target};

/// Index of a rule in its [`Policy`]; stable for the life of that policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(pub u32);

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

/// Ports a rule applies to, as inclusive ranges; an empty set means every port.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    /// Every port (operator deny rules without `ports`).
    pub fn any() -> Self {
        PortSet(Vec::new())
    }

    /// The given inclusive ranges; callers have checked `lo <= hi` and `lo > 0`.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u16, u16)>) -> Self {
        let mut v: Vec<_> = ranges.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        PortSet(v)
    }

    /// This set without `ports`, or `None` when nothing is left (an empty set would mean
    /// every port).
    pub fn without(&self, ports: &[u16]) -> Option<PortSet> {
        let ranges: &[(u16, u16)] = if self.is_any() {
            &[(1, 65535)]
        } else {
            &self.0
        };
        let mut out = Vec::new();
        for &(lo, hi) in ranges {
            let mut start = lo;
            let mut cut: Vec<u16> = ports
                .iter()
                .copied()
                .filter(|p| (lo..=hi).contains(p))
                .collect();
            cut.sort_unstable();
            cut.dedup();
            for p in cut {
                if p > start {
                    out.push((start, p - 1));
                }
                start = p.saturating_add(1);
                if p == u16::MAX {
                    start = 0;
                }
            }
            if start != 0 && start <= hi {
                out.push((start, hi));
            }
        }
        (!out.is_empty()).then(|| PortSet::from_ranges(out))
    }

    /// Whether the set holds `port`.
    #[inline]
    pub fn contains(&self, port: u16) -> bool {
        self.is_any() || self.0.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    /// The inclusive ranges (empty: every port).
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    /// Whether this is the every-port set.
    pub fn is_any(&self) -> bool {
        self.0.is_empty()
    }

    /// The ranges in the form the config uses (`443`, `8000-8080`).
    pub fn range_texts(&self) -> impl Iterator<Item = PortRange> + '_ {
        self.0.iter().map(|&(lo, hi)| PortRange(lo, hi))
    }
}

/// One inclusive port range, displayed as `443` or `8000-8080`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange(pub u16, pub u16);

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let PortRange(lo, hi) = *self;
        if lo == hi {
            write!(f, "{lo}")
        } else {
            write!(f, "{lo}-{hi}")
        }
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_any() {
            return f.write_str("any");
        }
        for (i, range) in self.range_texts().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

impl Serialize for PortSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a rule came from, so that every decision can be traced to a line of the article
/// or of the operator's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "origin", rename_all = "snake_case")]
pub enum Source {
    /// A rendered catalog entry.
    Catalog {
        cloud: &'static str,
        // Shared with the catalog entry: a hub's policies render the same entries.
        revision: Arc<str>,
        section: Arc<str>,
        purpose: Arc<str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        feature: Option<Arc<str>>,
        /// The service tag (as the Service Tags file names it) whose prefix this rule is.
        #[serde(skip_serializing_if = "Option::is_none")]
        service_tag: Option<String>,
    },
    /// An operator `[[allow]]` or `[[deny]]` entry (1-based index in its list).
    Operator {
        list: String,
        index: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
    },
    /// A rule imported from a file Azure produced (`catalog.import`).
    Imported {
        file: String,
        /// The category or outbound rule it came from.
        what: String,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Catalog {
                cloud,
                revision,
                section,
                purpose,
                feature,
                service_tag,
            } => {
                write!(f, "catalog {revision} {cloud}: {section}: {purpose}")?;
                if let Some(feat) = feature {
                    write!(f, " [{feat}]")?;
                }
                if let Some(tag) = service_tag {
                    write!(f, ", service tag {tag}")?;
                }
                Ok(())
            }
            Source::Operator {
                list,
                index,
                comment,
            } => {
                write!(f, "config [[{list}]] #{index}")?;
                if let Some(c) = comment {
                    write!(f, " ({c})")?;
                }
                Ok(())
            }
            Source::Imported { file, what } => write!(f, "imported from {file}: {what}"),
        }
    }
}

/// What a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matchable {
    /// A host pattern, optionally restricted to a path (plain HTTP only).
    Host(HostPattern, Option<PathPattern>),
    /// A network, for IP-literal destinations only.
    Cidr(IpNet),
    /// An operator regex over the normalised name.
    Regex(String),
}

impl fmt::Display for Matchable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Matchable::Host(h, None) => write!(f, "{h}"),
            Matchable::Host(h, Some(p)) => write!(f, "{h}{p}"),
            Matchable::Cidr(n) => write!(f, "{n}"),
            Matchable::Regex(r) => write!(f, "regex:{r}"),
        }
    }
}

/// A rule before compilation, as the catalog renderer and config produce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub action: Action,
    pub what: Matchable,
    pub ports: PortSet,
    pub source: Source,
}

/// A compiled rule; identical to its spec, kept so decisions can explain themselves.
pub type Rule = RuleSpec;

impl Rule {
    /// `pattern:ports`, the way `check` and logs show a rule.
    pub fn display(&self) -> String {
        format!("{} port {}", self.what, self.ports)
    }
}

/// What to do with a path-restricted rule when the path cannot be seen (inside TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsPathRules {
    /// Treat the rule as allowing the whole host (warned about at load).
    #[default]
    Widen,
    /// The rule never matches a TLS destination.
    Deny,
    /// The path is enforced by inspecting the tunnel (`[inspect]`), never widened. Where
    /// the policy itself cannot see a path it decides as with `Deny`; the inspection data
    /// path (issue 20) is what lets such a tunnel through, request by request.
    Inspect,
}

impl TlsPathRules {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsPathRules::Widen => "widen",
            TlsPathRules::Deny => "deny",
            TlsPathRules::Inspect => "inspect",
        }
    }
}

/// How much of the request the caller could see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathView<'a> {
    /// A TLS tunnel (CONNECT or SNI): no path.
    Hidden,
    /// A plain HTTP request with this path (and query).
    Visible(&'a str),
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
}

/// Why a decision came out as it did; [`Reason::code`] is the stable machine-readable form
/// used in metrics labels, logs and `Proxy-Status` details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// An allow rule matched.
    Allowed,
    /// An allow rule with a path matched a TLS destination, widened to the host.
    AllowedWidened,
    /// An operator deny rule matched.
    DeniedByRule,
    /// No rule matches the name (or address).
    NoMatchingRule,
    /// A rule matches the name but not the port.
    PortNotAllowed,
    /// A rule matches the name but not the path.
    PathNotAllowed,
    /// Only path-restricted rules match, and paths cannot be seen inside TLS.
    PathHiddenByTls,
    /// The target could not be parsed.
    InvalidTarget(InvalidTarget),
    /// Only a wildcard that `catalog.narrow` narrowed matches, and the name is not among
    /// the names it still allows.
    WildcardNarrowed,
    /// An address on a TLS port, which only an operator CIDR rule may allow: such a
    /// connection carries no server name, so a service tag's prefix would let it reach any
    /// tenant behind it (`catalog.service_tags_nameless_tls = "deny"`).
    ServiceTagWithoutName,
    /// No policy serves the client (`policy.unmatched_clients = "refuse"`): decided before
    /// any policy, by whoever chooses one.
    NoPolicyForClient,
}

impl Reason {
    /// Whether audit mode lets a denial for this reason through (and logs it): every
    /// policy answer but an operator's deny rule, an invalid target and a client no policy
    /// serves, which hold in every mode.
    pub fn audit_lets_through(&self) -> bool {
        !matches!(
            self,
            Reason::DeniedByRule | Reason::InvalidTarget(_) | Reason::NoPolicyForClient
        )
    }

    /// The stable reason code (metrics, logs, `Proxy-Status`, `check --json`).
    pub fn code(&self) -> ReasonCode {
        match self {
            Reason::Allowed => ReasonCode::Rule,
            Reason::AllowedWidened => ReasonCode::RuleWidened,
            Reason::DeniedByRule => ReasonCode::DenyRule,
            Reason::NoMatchingRule => ReasonCode::NoMatchingRule,
            Reason::PortNotAllowed => ReasonCode::PortNotAllowed,
            Reason::PathNotAllowed => ReasonCode::PathNotAllowed,
            Reason::PathHiddenByTls => ReasonCode::PathHiddenByTls,
            Reason::InvalidTarget(_) => ReasonCode::InvalidTarget,
            Reason::WildcardNarrowed => ReasonCode::WildcardNarrowed,
            Reason::ServiceTagWithoutName => ReasonCode::ServiceTagWithoutName,
            Reason::NoPolicyForClient => ReasonCode::NoPolicyForClient,
        }
    }

    /// Rank used to keep the most telling near miss.
    fn weight(&self) -> u8 {
        match self {
            Reason::WildcardNarrowed => 3,
            Reason::PathNotAllowed | Reason::PathHiddenByTls => 2,
            Reason::PortNotAllowed => 1,
            _ => 0,
        }
    }
}

/// The answer to one question: the verdict, why, and the rule that decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    pub rule: Option<RuleId>,
}

impl Decision {
    fn allow(rule: RuleId, widened: bool) -> Self {
        Decision {
            verdict: Verdict::Allow,
            reason: if widened {
                Reason::AllowedWidened
            } else {
                Reason::Allowed
            },
            rule: Some(rule),
        }
    }

    fn deny(reason: Reason, rule: Option<RuleId>) -> Self {
        Decision {
            verdict: Verdict::Deny,
            reason,
            rule,
        }
    }

    /// Whether the destination may be reached.
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }
}

/// Options that change how rules are compiled.
#[derive(Debug, Clone, Default)]
pub struct PolicyOptions {
    pub tls_path_rules: TlsPathRules,
    /// `catalog.narrow`: wildcard patterns with the names (exact, or deeper wildcards) that
    /// each may still allow. Every allow rule with such a pattern is narrowed.
    pub narrow: Vec<(HostPattern, Vec<HostPattern>)>,
    /// Ports on which an address is allowed only by an operator CIDR rule (`proxy.tls_ports`
    /// under `catalog.service_tags_nameless_tls = "deny"`); empty: any CIDR rule allows.
    pub nameless_tls_ports: Vec<u16>,
    /// `catalog.service_tags_nameless_tls = "deny"`: a TLS hello seen without a server name
    /// ([`Policy::decide_nameless_tls`]) is allowed only by an operator CIDR rule, on any
    /// port.
    pub nameless_tls: bool,
}

/// Host patterns compiled into the policy's own name tables, so that a list of them
/// (`inspect.hosts`, `inspect.bypass`) matches names exactly as rules do.
#[derive(Debug, Default)]
pub struct HostSet {
    patterns: Vec<HostPattern>,
    table: NameTable,
}

impl HostSet {
    /// The set of `patterns`.
    pub fn new(patterns: Vec<HostPattern>) -> Self {
        let mut table = NameTable::default();
        for (i, p) in patterns.iter().enumerate() {
            table.insert(p, RuleId(i as u32));
        }
        HostSet { patterns, table }
    }

    /// Whether a pattern matches `name`, a normalised name (lower case, no trailing dot),
    /// as [`Name`] holds it.
    #[inline]
    pub fn contains(&self, name: &str) -> bool {
        self.table.find(name, |_| true)
    }

    /// The patterns, in the order given.
    pub fn patterns(&self) -> &[HostPattern] {
        &self.patterns
    }

    /// Whether there is no pattern.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }
}

/// A compile-time failure (a regex set too large for the engine, for example).
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("the {list} regex rules cannot be compiled together: {source}")]
    Regex {
        list: &'static str,
        source: regex::Error,
    },
}

#[derive(Debug, Default)]
struct Tables {
    names: NameTable,
    cidrs: CidrTable,
}

/// Per rule, what the hot path needs beside the rule itself.
#[derive(Debug, Clone, Copy, Default)]
struct RuleFacts {
    /// Index into [`Policy::wildcards`] when the rule is an allow rule with a wildcard (a
    /// `*` pattern or a regex): the names it lets through are recorded.
    wildcard: Option<u32>,
    /// Index into [`Policy::narrowed`] when `catalog.narrow` narrows the rule.
    narrowed: Option<u32>,
    /// An operator's own rule (`[[allow]]`/`[[deny]]`), not the catalog's nor an import's.
    operator: bool,
}

/// The compiled, immutable rule set.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    facts: Vec<RuleFacts>,
    /// The distinct wildcard patterns of allow rules, as written (`*.blob.core.windows.net`).
    wildcards: Vec<Box<str>>,
    /// The names each narrowed pattern still allows.
    narrowed: Vec<NameTable>,
    allow: Tables,
    deny: Tables,
    options: PolicyOptions,
    notes: Vec<String>,
    /// Allow host rules by the last two labels of their base name, so that the "nearest
    /// rule" hint of a refusal stays cheap however many rules there are.
    by_domain: std::collections::HashMap<String, Vec<usize>>,
}

/// Up to this many rules, the nearest-rule hint also looks for near-typos in every rule;
/// above it, only rules under the same registrable domain are considered.
const FULL_SCAN_RULES: usize = 2000;

fn last_two_labels(name: &str) -> &str {
    name.rmatch_indices('.')
        .nth(1)
        .map_or(name, |(i, _)| &name[i + 1..])
}

/// Counts of compiled rules by kind, for summaries and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RuleCounts {
    pub exact: usize,
    pub wildcard: usize,
    pub path: usize,
    pub regex: usize,
    pub cidr: usize,
    pub deny: usize,
}

impl Policy {
    /// Compile rules. Load-time notes (wildcard readings, widened path rules) are kept in
    /// [`Policy::notes`] for the caller to print or log.
    pub fn compile(specs: Vec<RuleSpec>, options: PolicyOptions) -> Result<Self, PolicyError> {
        let mut allow = Tables::default();
        let mut deny = Tables::default();
        let mut regexes: [(Vec<String>, Vec<RuleId>); 2] = Default::default();
        let mut notes = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let id = RuleId(i as u32);
            let (tables, slot) = match spec.action {
                Action::Allow => (&mut allow, 0),
                Action::Deny => (&mut deny, 1),
            };
            match &spec.what {
                Matchable::Host(h, path) => {
                    if let HostPattern::ApexAndSubdomains(base) = h {
                        notes.push(format!(
                            "{h} ({}) is read as {base} and its subdomains (*.{base}); names that merely end in the same characters, such as not{base}, are not matched",
                            spec.source
                        ));
                    }
                    if let Some(p) = path
                        && options.tls_path_rules == TlsPathRules::Widen
                    {
                        notes.push(format!(
                            "{h}{p} ({}) restricts a path, which is invisible inside TLS: over TLS it is widened to the whole host {h} (set policy.tls_path_rules = \"deny\" to refuse instead)",
                            spec.source
                        ));
                    }
                    tables.names.insert(h, id);
                }
                Matchable::Cidr(net) => tables.cidrs.insert(*net, id),
                Matchable::Regex(r) => {
                    regexes[slot].0.push(r.clone());
                    regexes[slot].1.push(id);
                }
            }
        }
        let [(ap, ai), (dp, di)] = regexes;
        allow
            .names
            .set_regexes(&ap, ai)
            .map_err(|source| PolicyError::Regex {
                list: "allow",
                source,
            })?;
        deny.names
            .set_regexes(&dp, di)
            .map_err(|source| PolicyError::Regex {
                list: "deny",
                source,
            })?;
        notes.dedup();
        let (facts, wildcards, narrowed) = facts(&specs, &options.narrow);
        let mut by_domain: std::collections::HashMap<String, Vec<usize>> = Default::default();
        for (i, r) in specs.iter().enumerate() {
            if let (Action::Allow, Matchable::Host(h, _)) = (r.action, &r.what) {
                by_domain
                    .entry(last_two_labels(h.base()).to_owned())
                    .or_default()
                    .push(i);
            }
        }
        Ok(Policy {
            rules: specs,
            facts,
            wildcards,
            narrowed,
            allow,
            deny,
            options,
            notes,
            by_domain,
        })
    }

    /// Parse `host:port` and decide; a parse failure is a deny with `invalid_target`.
    pub fn decide_str(&self, target: &str, path: PathView<'_>) -> Decision {
        match Target::parse(target) {
            Ok(t) => self.decide(&t, path),
            Err(e) => Decision::deny(Reason::InvalidTarget(e), None),
        }
    }

    /// The hot path: deny rules first, then allow rules; nothing allocates unless regex
    /// rules exist and the name passes the set's quick test.
    #[inline]
    pub fn decide(&self, target: &Target, path: PathView<'_>) -> Decision {
        let port = target.port;
        match &target.host {
            Host::Name(name) => {
                let name = name.as_str();
                let mut hit = None;
                if !self.deny.names.is_empty() {
                    self.deny.names.find(name, |id| {
                        let ok = self.rules[id.0 as usize].ports.contains(port);
                        if ok {
                            hit = Some(id);
                        }
                        ok
                    });
                    if let Some(id) = hit {
                        return Decision::deny(Reason::DeniedByRule, Some(id));
                    }
                }
                let mut miss: Option<(Reason, RuleId)> = None;
                let mut widened = false;
                self.allow.names.find(name, |id| {
                    let rule = &self.rules[id.0 as usize];
                    let facts = self.facts[id.0 as usize];
                    let near = if !rule.ports.contains(port) {
                        Reason::PortNotAllowed
                    } else if let Some(n) = facts.narrowed
                        && !self.narrowed[n as usize].find(name, |_| true)
                    {
                        Reason::WildcardNarrowed
                    } else {
                        match (&rule.what, path) {
                            (Matchable::Host(_, Some(p)), PathView::Visible(req)) => {
                                if p.matches(req) {
                                    hit = Some(id);
                                    return true;
                                }
                                Reason::PathNotAllowed
                            }
                            (Matchable::Host(_, Some(_)), PathView::Hidden) => {
                                if self.options.tls_path_rules == TlsPathRules::Widen {
                                    hit = Some(id);
                                    widened = true;
                                    return true;
                                }
                                Reason::PathHiddenByTls
                            }
                            _ => {
                                hit = Some(id);
                                return true;
                            }
                        }
                    };
                    if miss.is_none_or(|(m, _)| near.weight() > m.weight()) {
                        miss = Some((near, id));
                    }
                    false
                });
                match (hit, miss) {
                    (Some(id), _) => Decision::allow(id, widened),
                    (None, Some((reason, id))) => Decision::deny(reason, Some(id)),
                    (None, None) => Decision::deny(Reason::NoMatchingRule, None),
                }
            }
            Host::Ip(ip) => self.decide_ip(*ip, port),
        }
    }

    /// The decision on a TLS hello without a server name to `ip` on `port`, once the proxy
    /// has seen it (a tunnel to an address, a redirected connection): nothing names the
    /// tenant behind the address, so under `catalog.service_tags_nameless_tls = "deny"`
    /// only an operator CIDR rule allows it, whatever the port.
    pub fn decide_nameless_tls(&self, ip: IpAddr, port: u16) -> Decision {
        self.decide_address(ip, port, self.options.nameless_tls)
    }

    fn decide_ip(&self, ip: IpAddr, port: u16) -> Decision {
        self.decide_address(ip, port, self.options.nameless_tls_ports.contains(&port))
    }

    /// `nameless`: only an operator CIDR rule may allow.
    fn decide_address(&self, ip: IpAddr, port: u16, nameless: bool) -> Decision {
        let ports_ok = |id: &RuleId| self.rules[id.0 as usize].ports.contains(port);
        if let Some(id) = self.deny.cidrs.lookup(ip).find(ports_ok) {
            return Decision::deny(Reason::DeniedByRule, Some(id));
        }
        let mut near: Option<(Reason, RuleId)> = None;
        for id in self.allow.cidrs.lookup(ip) {
            if !ports_ok(&id) {
                near.get_or_insert((Reason::PortNotAllowed, id));
            } else if nameless && !self.facts[id.0 as usize].operator {
                // The most telling miss: the port is right, the kind of rule is not.
                near = Some((Reason::ServiceTagWithoutName, id));
            } else {
                return Decision::allow(id, false);
            }
        }
        match near {
            Some((reason, id)) => Decision::deny(reason, Some(id)),
            None => Decision::deny(Reason::NoMatchingRule, None),
        }
    }

    /// The networks of `[[deny]]` CIDR rules with their ports and their text, in rule order,
    /// so that the dialler refuses resolved addresses inside them as well as literals.
    pub fn deny_networks(&self) -> Vec<(IpNet, PortSet, String)> {
        self.rules
            .iter()
            .filter_map(|r| match (r.action, &r.what) {
                (Action::Deny, Matchable::Cidr(n)) => Some((*n, r.ports.clone(), r.display())),
                _ => None,
            })
            .collect()
    }

    /// The wildcard pattern (as written) of the allow rule behind `id`, when it has one:
    /// the names such a rule lets through are worth recording (`/allowed`).
    #[inline]
    pub fn wildcard(&self, id: RuleId) -> Option<&str> {
        let w = self.facts.get(id.0 as usize)?.wildcard?;
        Some(&self.wildcards[w as usize])
    }

    /// The distinct wildcard patterns of allow rules, as written.
    pub fn wildcards(&self) -> &[Box<str>] {
        &self.wildcards
    }

    /// The options the policy was compiled with (narrowing, nameless TLS ports), for the
    /// exports that must reproduce its decisions.
    pub fn options(&self) -> &PolicyOptions {
        &self.options
    }

    /// The names `catalog.narrow` keeps `rule` to, when it narrows it.
    pub fn narrowed_to(&self, rule: &Rule) -> Option<&[HostPattern]> {
        let Matchable::Host(h, _) = &rule.what else {
            return None;
        };
        if rule.action != Action::Allow {
            return None;
        }
        self.options
            .narrow
            .iter()
            .find(|(k, _)| k == h)
            .map(|(_, names)| names.as_slice())
    }

    /// The ports of `rule` on which it allows nothing because it is a catalog or imported
    /// CIDR rule and those ports carry TLS (`catalog.service_tags_nameless_tls = "deny"`).
    pub fn nameless_ports(&self, rule: &Rule) -> Vec<u16> {
        let operator = matches!(rule.source, Source::Operator { .. });
        if operator || rule.action != Action::Allow || !matches!(rule.what, Matchable::Cidr(_)) {
            return Vec::new();
        }
        self.options
            .nameless_tls_ports
            .iter()
            .copied()
            .filter(|p| rule.ports.contains(*p))
            .collect()
    }

    /// The rule behind an id from a [`Decision`] of this policy.
    pub fn rule(&self, id: RuleId) -> &Rule {
        &self.rules[id.0 as usize]
    }

    /// Every compiled rule, in compile order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Load-time notes worth showing an operator.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Rule counts by kind.
    pub fn counts(&self) -> RuleCounts {
        let mut c = RuleCounts::default();
        for r in &self.rules {
            if r.action == Action::Deny {
                c.deny += 1;
                continue;
            }
            match &r.what {
                Matchable::Host(_, Some(_)) => c.path += 1,
                Matchable::Host(HostPattern::Exact(_), None) => c.exact += 1,
                Matchable::Host(_, None) => c.wildcard += 1,
                Matchable::Regex(_) => c.regex += 1,
                Matchable::Cidr(_) => c.cidr += 1,
            }
        }
        c
    }

    /// Allow rules whose names resemble `name`, closest first: the hint in every refusal's
    /// body, from a scan of the rules (of the same registrable domain in large rule sets)
    /// that allocates only for the few that resemble it.
    pub fn nearest(&self, name: &str, limit: usize) -> Vec<&Rule> {
        let candidates: Box<dyn Iterator<Item = &Rule>> = if self.rules.len() <= FULL_SCAN_RULES {
            Box::new(self.rules.iter())
        } else {
            let same = self.by_domain.get(last_two_labels(name));
            Box::new(same.into_iter().flatten().map(|&i| &self.rules[i]))
        };
        let mut scored: Vec<(usize, &Rule)> = candidates
            .filter(|r| r.action == Action::Allow)
            .filter_map(|r| match &r.what {
                Matchable::Host(h, _) => similarity(name, h.base()).map(|s| (s, r)),
                _ => None,
            })
            .collect();
        scored.sort_by_cached_key(|(s, r)| {
            let wildcard = !matches!(r.what, Matchable::Host(HostPattern::Exact(_), _));
            (*s, wildcard, r.what.to_string())
        });
        let mut out: Vec<&Rule> = Vec::new();
        for (_, r) in scored {
            if !out.iter().any(|o| o.what == r.what) {
                out.push(r);
            }
            if out.len() == limit {
                break;
            }
        }
        out
    }

    /// One human-readable line explaining a decision (the `check` output after the target).
    pub fn explain(&self, target: &str, decision: &Decision) -> String {
        let rule = decision.rule.map(|id| self.rule(id));
        match (decision.reason, rule) {
            (Reason::Allowed, Some(r)) => format!("{} ({})", r.display(), r.source),
            (Reason::AllowedWidened, Some(r)) => format!(
                "{} ({}), path widened to the host because TLS hides it",
                r.display(),
                r.source
            ),
            (Reason::DeniedByRule, Some(r)) => {
                format!("denied by {} ({})", r.display(), r.source)
            }
            (Reason::PortNotAllowed, Some(r)) => format!(
                "port not allowed: {} allows only port {} ({})",
                r.what, r.ports, r.source
            ),
            (Reason::PathNotAllowed, Some(r)) => format!(
                "path not allowed: {} allows only that path ({})",
                r.what, r.source
            ),
            (Reason::PathHiddenByTls, Some(r)) => format!(
                "only a path rule matches ({}) and paths are invisible inside TLS (policy.tls_path_rules = \"{}\")",
                r.what,
                self.options.tls_path_rules.as_str()
            ),
            (Reason::InvalidTarget(e), _) => format!("invalid target: {e}"),
            (Reason::NoPolicyForClient, _) => {
                "no [[client_policy]] serves this client (policy.unmatched_clients = \"refuse\")"
                    .to_owned()
            }
            (Reason::WildcardNarrowed, Some(r)) => format!(
                "{} ({}) is narrowed by catalog.narrow and this name is not among the names it still allows: add it to catalog.narrow.\"{}\" if it should be reached",
                r.what, r.source, r.what
            ),
            (Reason::ServiceTagWithoutName, Some(r)) => format!(
                "an address on a TLS port carries no server name, so {} ({}) could reach any tenant behind it; only an operator [[allow]] CIDR rule allows it (or catalog.service_tags_nameless_tls = \"allow\")",
                r.what, r.source
            ),
            _ => {
                let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
                let host = host.trim_end_matches('.').to_ascii_lowercase();
                let near = self.nearest(&host, 3);
                if near.is_empty() {
                    "no rule matches".to_owned()
                } else {
                    let names: Vec<String> = near.iter().map(|r| r.what.to_string()).collect();
                    format!("no rule matches (nearest: {})", names.join(", "))
                }
            }
        }
    }
}

/// What [`Policy::compile`] keeps per rule: its wildcard pattern (shared by the rules that
/// share one), its narrowing, and whether an operator wrote it.
fn facts(
    specs: &[RuleSpec],
    narrow: &[(HostPattern, Vec<HostPattern>)],
) -> (Vec<RuleFacts>, Vec<Box<str>>, Vec<NameTable>) {
    let mut wildcards: Vec<Box<str>> = Vec::new();
    let narrowed: Vec<NameTable> = narrow
        .iter()
        .map(|(_, names)| {
            let mut t = NameTable::default();
            for n in names {
                t.insert(n, RuleId(0));
            }
            t
        })
        .collect();
    let facts = specs
        .iter()
        .map(|spec| {
            let operator = matches!(spec.source, Source::Operator { .. });
            if spec.action != Action::Allow {
                return RuleFacts {
                    operator,
                    ..RuleFacts::default()
                };
            }
            let (text, pattern) = match &spec.what {
                Matchable::Host(
                    h @ (HostPattern::Subdomains(_) | HostPattern::ApexAndSubdomains(_)),
                    _,
                ) => (h.to_string(), Some(h)),
                Matchable::Regex(_) => (spec.what.to_string(), None),
                _ => {
                    return RuleFacts {
                        operator,
                        ..RuleFacts::default()
                    };
                }
            };
            let wildcard = match wildcards.iter().position(|w| **w == *text) {
                Some(i) => i,
                None => {
                    wildcards.push(text.into());
                    wildcards.len() - 1
                }
            };
            let narrowed = pattern.and_then(|p| narrow.iter().position(|(k, _)| k == p));
            RuleFacts {
                wildcard: Some(wildcard as u32),
                narrowed: narrowed.map(|n| n as u32),
                operator,
            }
        })
        .collect();
    (facts, wildcards, narrowed)
}

/// A distance between a requested name and a rule's base name, or `None` when they are
/// unrelated. Names sharing their last two labels or a long common ending rank first;
/// near-typos (edit distance up to two) come next.
fn similarity(name: &str, base: &str) -> Option<usize> {
    let common = name
        .bytes()
        .rev()
        .zip(base.bytes().rev())
        .take_while(|(a, b)| a == b)
        .count();
    if common > 0 {
        let registrable = base
            .rmatch_indices('.')
            .nth(1)
            .map_or(base.len(), |(i, _)| base.len() - i - 1);
        if common >= registrable {
            return Some(base.len() - common);
        }
    }
    within_two_edits(name.as_bytes(), base.as_bytes()).map(|d| 100 + d)
}

/// The edit distance between `a` and `b` when it is at most 2, without allocating: only
/// the diagonal band the answer can lie in is computed (Ukkonen), and a row whose every
/// cell is over 2 ends the search. Run on every refusal, for its "nearest" hint.
fn within_two_edits(a: &[u8], b: &[u8]) -> Option<usize> {
    const K: usize = 2;
    const OVER: usize = K + 1;
    if a.len().abs_diff(b.len()) > K {
        return None; // the distance is at least the difference in length
    }
    // Cell j of a row is the distance between a[..i] and b[..i + j - K], for j in 0..=2K.
    let mut prev = [OVER; 2 * K + 1];
    for (j, cell) in prev.iter_mut().enumerate().skip(K) {
        *cell = (j - K).min(OVER); // row 0: b[..j - K] against nothing
    }
    for i in 1..=a.len() {
        let mut cur = [OVER; 2 * K + 1];
        for j in 0..=2 * K {
            let Some(col) = (i + j).checked_sub(K) else {
                continue; // before b's start
            };
            if col > b.len() {
                break;
            }
            let mut best = if col == 0 { i } else { OVER };
            if col > 0 {
                let same = usize::from(a[i - 1] != b[col - 1]);
                best = best.min(prev[j] + same); // diagonal
            }
            if j < 2 * K {
                best = best.min(prev[j + 1] + 1); // a[i - 1] deleted
            }
            if j > 0 {
                best = best.min(cur[j - 1] + 1); // b[col - 1] inserted
            }
            cur[j] = best.min(OVER);
        }
        if cur.iter().all(|&c| c >= OVER) {
            return None;
        }
        prev = cur;
    }
    let d = prev[b.len() + K - a.len()];
    (d <= K).then_some(d)
}

/// The candidates closest to `word` (edit distance at most a third of its length, and at
/// least 2), best first: the "did you mean" of config errors.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let limit = (word.len() / 3).max(2);
    let mut scored: Vec<(usize, &str)> = candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, c)| c).collect()
}

/// Levenshtein distance over bytes; used for "did you mean" hints off the hot path.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<u8> = b.bytes().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod port_tests {
    use super::PortSet;

    #[test]
    fn ports_are_taken_out_of_ranges() {
        let s = PortSet::from_ranges([(443, 443), (445, 445)]);
        assert_eq!(s.without(&[443]).unwrap().to_string(), "445");
        assert!(PortSet::from_ranges([(443, 443)]).without(&[443]).is_none());
        let any = PortSet::any().without(&[443, 80]).unwrap();
        assert_eq!(any.ranges(), &[(1, 79), (81, 442), (444, 65535)]);
        let top = PortSet::from_ranges([(65530, 65535)])
            .without(&[65535])
            .unwrap();
        assert_eq!(top.ranges(), &[(65530, 65534)]);
        assert_eq!(s.without(&[]).unwrap(), s);
    }
}

#[cfg(test)]
mod edit_tests {
    use super::{edit_distance, within_two_edits};

    #[test]
    fn the_banded_distance_agrees_with_the_full_one_up_to_two() {
        let words = [
            "",
            "a",
            "ab",
            "ba",
            "abc",
            "acb",
            "pypi.org",
            "pypl.org",
            "pypi.orgx",
            "ypi.org",
            "files.pythonhosted.org",
            "files.pythonhosted.com",
            "login.microsoftonline.com",
            "login.microsoftonIine.com",
            "blocked.example",
            "blob.core.windows.net",
        ];
        for a in words {
            for b in words {
                let full = edit_distance(a, b);
                let banded = within_two_edits(a.as_bytes(), b.as_bytes());
                assert_eq!(banded, (full <= 2).then_some(full), "{a:?} {b:?}");
            }
        }
        // Every edit of a word at distance one and two, by construction.
        let w = "management.azure.com";
        for i in 0..w.len() {
            let dropped = format!("{}{}", &w[..i], &w[i + 1..]);
            assert_eq!(within_two_edits(w.as_bytes(), dropped.as_bytes()), Some(1));
            let swapped = format!("{}x{}", &w[..i], &w[i + 1..]);
            let twice = format!("{}y", swapped);
            assert_eq!(
                within_two_edits(w.as_bytes(), twice.as_bytes()),
                Some(edit_distance(w, &twice)).filter(|d| *d <= 2)
            );
        }
    }
}
