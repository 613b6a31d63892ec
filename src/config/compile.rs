//! From checked [`Settings`] to a [`Compiled`] configuration: the policy compiled (the
//! catalog rendered for the chosen cloud and features, plus the operator's own rules) and
//! the typed options of every other part. After this step nothing sees `Settings`.
//!
//! This is the one place that joins config, catalog and policy, used at start-up, by the
//! CLI commands and by reload, so that all of them enforce the same rule set.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::read::Reload;
use super::schema::key;
use super::settings::{
    AdminSettings, CatalogSettings, LogSettings, MetricsSettings, ProxySettings, ReloadSettings,
    TransparentSettings, UpstreamSettings,
};

use crate::catalog::{
    Catalog, Cloud, DEFAULT_REVISION, LeftOut, NetworkRule, REVISIONS, ReferenceEntry, Selection,
    ServiceTags,
};
use crate::config::{ConfigError, ConfigIssue, NamelessTls, Settings, operator_rule};
use crate::inspect::{Inspection, LoadedCa, ca};
use crate::policy::{
    Action, HostPattern, Matchable, PathView, Policy, PolicyOptions, RuleSpec, Target,
    TlsPathRules, did_you_mean, parse_pattern,
};

/// A compiled policy and what an operator should know about it.
#[derive(Debug)]
pub struct Built {
    pub policy: Policy,
    pub cloud: Cloud,
    /// The region the catalog was rendered for, if set.
    pub region: Option<String>,
    pub revision: String,
    pub features: BTreeSet<String>,
    /// Every optional part of the catalog (shared by the policies of one load).
    pub parts: std::sync::Arc<[Part]>,
    /// Catalog entries kept for reference, not enforced (shared by the policies of one
    /// load that render the same ones).
    pub reference: std::sync::Arc<[ReferenceEntry]>,
    /// Outbound service-tag entries with their prefixes (with a Service Tags file).
    pub network: Vec<NetworkRule>,
    /// The rules of the optional parts that are off: which part would allow a denial.
    pub off_parts: OffParts,
    /// Entries left out and load-time notes, in that order.
    pub warnings: Vec<String>,
    /// Which warnings are catalog entries left out for want of a placeholder value.
    pub left_out: LeftOut,
}

fn load_catalog(s: &Settings) -> Result<std::borrow::Cow<'static, Catalog>, ConfigIssue> {
    if let Some(path) = &s.catalog.file {
        let issue = |problem: String, fix: Option<String>| ConfigIssue {
            origin: s.origin_of("catalog.file"),
            key: "catalog.file".into(),
            value: Some(format!("{:?}", path.display().to_string())),
            problem,
            fix,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            issue(
                format!("cannot read the catalog file: {e}"),
                Some("check the path".into()),
            )
        })?;
        let catalog = Catalog::from_toml(&text, &path.display().to_string()).map_err(|e| {
            issue(
                e.to_string(),
                Some("see config/catalog/ for the format".into()),
            )
        })?;
        if let Some(rev) = &s.catalog.revision
            && *rev != catalog.revision
        {
            return Err(ConfigIssue {
                origin: s.origin_of("catalog.revision"),
                key: "catalog.revision".into(),
                value: Some(format!("{rev:?}")),
                problem: format!("the catalog file holds revision {}", catalog.revision),
                fix: Some("remove catalog.revision, or make it match the file".into()),
            });
        }
        return Ok(std::borrow::Cow::Owned(catalog));
    }
    let rev = s.catalog.revision.as_deref().unwrap_or(DEFAULT_REVISION);
    Catalog::embedded_ref(rev)
        .map(std::borrow::Cow::Borrowed)
        .ok_or_else(|| {
            let names: Vec<&str> = REVISIONS.iter().map(|(r, _)| *r).collect();
            ConfigIssue {
                origin: s.origin_of("catalog.revision"),
                key: "catalog.revision".into(),
                value: Some(format!("{rev:?}")),
                problem: "no such catalog revision is built in".into(),
                fix: Some(format!(
                    "use one of {}, or load a file with catalog.file",
                    names.join(", ")
                )),
            }
        })
}

/// The Service Tags file `catalog.service_tags_file` names, checked against the cloud.
fn load_service_tags(s: &Settings) -> Result<Option<ServiceTags>, ConfigIssue> {
    let Some(path) = &s.catalog.service_tags_file else {
        return Ok(None);
    };
    let issue = |problem: String, fix: &str| ConfigIssue {
        origin: s.origin_of("catalog.service_tags_file"),
        key: "catalog.service_tags_file".into(),
        value: Some(format!("{:?}", path.display().to_string())),
        problem,
        fix: Some(fix.into()),
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        issue(
            format!("cannot read the Service Tags file: {e}"),
            "check the path",
        )
    })?;
    ServiceTags::parse(&text, s.catalog.cloud)
        .map(Some)
        .map_err(|e| {
            issue(
                e.to_string(),
                "use the weekly ServiceTags_<Cloud>_<date>.json download (or the discovery API's answer) for the configured catalog.cloud",
            )
        })
}

impl CatalogSettings {
    /// What rendering a catalog needs from these settings: the cloud and the placeholder
    /// values, normalised (the region as Azure names it, the registry in lower case). The
    /// one place a selection is built, for the policy and for `catalog diff`.
    pub fn selection(&self) -> Selection {
        Selection {
            cloud: self.cloud,
            region: self
                .region
                .as_deref()
                .map(crate::config::checks::region_name),
            storage_account: self.storage_account.clone(),
            container_registry: self
                .container_registry
                .as_deref()
                .map(str::to_ascii_lowercase),
        }
    }
}

/// `catalog.narrow` checked against the rule set: every key a wildcard pattern that some
/// allow rule has, every name one that the wildcard matches (an exact name, or a deeper
/// `*.` pattern). All problems are reported at once.
fn narrowing(
    s: &Settings,
    specs: &[RuleSpec],
) -> Result<Vec<(HostPattern, Vec<HostPattern>)>, ConfigError> {
    let wildcards: BTreeSet<String> = specs
        .iter()
        .filter(|r| r.action == Action::Allow)
        .filter_map(|r| match &r.what {
            Matchable::Host(
                h @ (HostPattern::Subdomains(_) | HostPattern::ApexAndSubdomains(_)),
                _,
            ) => Some(h.to_string()),
            _ => None,
        })
        .collect();
    let mut issues = Vec::new();
    let mut out = Vec::new();
    for (key, names) in &s.catalog.narrow.0 {
        let issue = |value: String, problem: String, fix: String| ConfigIssue {
            origin: s.origin_of("catalog.narrow"),
            key: format!("catalog.narrow.{key:?}"),
            value: Some(value),
            problem,
            fix: Some(fix),
        };
        let pattern = match parse_pattern(key) {
            Ok((p @ (HostPattern::Subdomains(_) | HostPattern::ApexAndSubdomains(_)), None)) => p,
            _ => {
                issues.push(issue(
                    format!("{key:?}"),
                    "a key of catalog.narrow must be a wildcard host pattern (\"*.blob.core.windows.net\"), without a path".into(),
                    "use the pattern exactly as `aml-egress catalog` lists it".into(),
                ));
                continue;
            }
        };
        if let Some((first, _)) = out
            .iter()
            .find(|(p, _): &&(HostPattern, Vec<HostPattern>)| *p == pattern)
        {
            issues.push(issue(
                format!("{key:?}"),
                format!(
                    "names the same pattern as another key ({first}): one list would be ignored"
                ),
                "merge the two lists under one key".into(),
            ));
            continue;
        }
        if !wildcards.contains(&pattern.to_string()) {
            let near = did_you_mean(key, wildcards.iter().map(String::as_str));
            let hint = if near.is_empty() {
                "use a wildcard pattern that `aml-egress catalog` lists (catalog entries, [[allow]] and imports)".to_owned()
            } else {
                format!("did you mean {}?", near.join(" or "))
            };
            issues.push(issue(
                format!("{key:?}"),
                format!("{pattern} matches no allow rule of the rendered rule set, so there is nothing to narrow"),
                hint,
            ));
            continue;
        }
        let mut allowed = Vec::new();
        for name in names {
            match parse_pattern(name) {
                Ok((p, None)) if narrows(&pattern, &p) => allowed.push(p),
                Ok((p, None)) if p == pattern => issues.push(issue(
                    format!("{name:?}"),
                    "listing the wildcard itself under its own key narrows nothing".into(),
                    "list the names under it that may still be reached, or remove the key".into(),
                )),
                Ok((p, None)) => issues.push(issue(
                    format!("{name:?}"),
                    format!("{pattern} does not match {p}, so listing it narrows nothing"),
                    format!("list names under {pattern} only (a name such as x.{}, or a deeper *. pattern)", pattern.base()),
                )),
                Ok((_, Some(_))) => issues.push(issue(
                    format!("{name:?}"),
                    "a narrowed name cannot carry a path".into(),
                    "list the host name only".into(),
                )),
                Err(e) => issues.push(issue(
                    format!("{name:?}"),
                    format!("not a host name or pattern: {e}"),
                    format!("write a name under {pattern}"),
                )),
            }
        }
        out.push((pattern, allowed));
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError(issues))
    }
}

/// A note for each narrowed wildcard that a wider allow wildcard, not narrowed itself,
/// covers: the wider one still allows every name under it, so the narrowing alone keeps
/// nothing out (the catalog nests `*.instances.azureml.ms` under `*.azureml.ms`).
fn narrowing_notes(policy: &Policy) -> Vec<String> {
    let narrow = &policy.options().narrow;
    let mut notes = Vec::new();
    for (key, _) in narrow {
        for r in policy.rules() {
            let (Action::Allow, Matchable::Host(wide, _)) = (r.action, &r.what) else {
                continue;
            };
            if !matches!(
                wide,
                HostPattern::Subdomains(_) | HostPattern::ApexAndSubdomains(_)
            ) || wide == key
                || narrow.iter().any(|(k, _)| k == wide)
            {
                continue;
            }
            let entry = HostPattern::Subdomains(key.base().to_owned());
            if narrows(wide, &entry) {
                notes.push(format!(
                    "catalog.narrow narrows {key}, but {wide} ({}) still allows every name under it, so the narrowing keeps nothing out: narrow {wide} too",
                    r.source
                ));
            }
        }
    }
    notes.dedup();
    notes
}

/// Whether `entry` is a name or pattern that the wildcard `key` matches in full: an exact
/// name the wildcard matches, or a `*.` pattern strictly below the key's base.
fn narrows(key: &HostPattern, entry: &HostPattern) -> bool {
    let under = |name: &str| {
        let base = key.base();
        name.len() > base.len() + 1
            && name.ends_with(base)
            && name.as_bytes()[name.len() - base.len() - 1] == b'.'
    };
    match entry {
        HostPattern::Exact(n) => {
            under(n) || (matches!(key, HostPattern::ApexAndSubdomains(b) if b == n))
        }
        HostPattern::Subdomains(b) => {
            under(b) || (matches!(key, HostPattern::ApexAndSubdomains(k) if k == b))
        }
        HostPattern::ApexAndSubdomains(b) => under(b),
    }
}

/// The rules of the optional parts that are off, compiled to tell a denied destination
/// which part would allow it; never consulted to allow anything.
#[derive(Debug, Default)]
pub struct OffParts {
    /// From entries without placeholders, compiled without `catalog.narrow`: the same for
    /// every policy over the same catalog, cloud, parts and Service Tags file, so a hub's
    /// policies share one copy.
    shared: Option<std::sync::Arc<Policy>>,
    /// From entries with placeholders (`<storage>`), rendered with this policy's values.
    own: Option<Policy>,
}

/// Whether `rule` is of an optional part that is a field addition.
fn addition(catalog: &Catalog, rule: &RuleSpec) -> bool {
    match &rule.source {
        crate::policy::Source::Catalog {
            feature: Some(f), ..
        } => catalog
            .features
            .iter()
            .any(|x| *x.name == **f && x.field_addition.is_some()),
        _ => false,
    }
}

/// An optional part of the catalog.
#[derive(Debug)]
pub struct Part {
    pub name: String,
    pub summary: String,
    /// A part the article omits (see the catalog's `field_addition`).
    pub field_addition: bool,
}

impl Part {
    /// The summary, marked ` [field addition]` for a part the article omits.
    pub fn marked_summary(&self) -> String {
        let mark = if self.field_addition {
            " [field addition]"
        } else {
            ""
        };
        format!("{}{mark}", self.summary)
    }
}

impl OffParts {
    /// The hints from entries without placeholders, which the policies of one load over
    /// the same catalog, cloud, parts and Service Tags file share.
    pub fn shared(&self) -> Option<&std::sync::Arc<Policy>> {
        self.shared.as_ref()
    }
}

/// What the policies of one load share once compiled, keyed by what decides them.
#[derive(Default)]
pub struct SharedParts {
    hints: std::collections::HashMap<String, std::sync::Arc<Policy>>,
    parts: std::collections::HashMap<String, std::sync::Arc<[Part]>>,
    reference: std::collections::HashMap<String, std::sync::Arc<[ReferenceEntry]>>,
}

/// Render the catalog and compile it with the operator rules.
pub fn build_policy(s: &Settings) -> Result<Built, ConfigError> {
    build_policy_sharing(s, &mut SharedParts::default())
}

/// [`build_policy`], taking what an earlier policy of the same load compiled alike from
/// `shared` (and leaving its own there).
pub fn build_policy_sharing(s: &Settings, shared: &mut SharedParts) -> Result<Built, ConfigError> {
    let catalog = load_catalog(s).map_err(|i| ConfigError(vec![i]))?;
    // The default parts apply only where the catalog has them (a catalog file of an
    // operator's may not); parts named in the configuration must exist.
    let chosen: Vec<String> = if s.origins.contains_key("catalog.features") {
        s.catalog.features.clone()
    } else {
        let names = catalog.feature_names();
        s.catalog
            .features
            .iter()
            .filter(|f| names.contains(&f.as_str()))
            .cloned()
            .collect()
    };
    let features = catalog.resolve_features(&chosen).map_err(|unknown| {
        let names = catalog.feature_names();
        let issues = unknown
            .iter()
            .map(|u| {
                let near = did_you_mean(u, names.iter().copied());
                let hint = if near.is_empty() {
                    String::new()
                } else {
                    format!("did you mean {}? ", near.join(" or "))
                };
                ConfigIssue {
                    origin: s.origin_of("catalog.features"),
                    key: "catalog.features".into(),
                    value: Some(format!("{u:?}")),
                    problem: "not an optional part of this catalog".into(),
                    fix: Some(format!("{hint}valid names: all, {}", names.join(", "))),
                }
            })
            .collect();
        ConfigError(issues)
    })?;
    let selection = s.catalog.selection();
    let tags = load_service_tags(s).map_err(|i| ConfigError(vec![i]))?;
    let mut rendered = catalog.render(&selection, &features, tags.as_ref());
    let mut specs = std::mem::take(&mut rendered.rules);
    let mut imported_notes = Vec::new();
    for path in &s.catalog.import {
        let issue = |problem: String| {
            ConfigIssue {
            origin: s.origin_of("catalog.import"),
            key: "catalog.import".into(),
            value: Some(format!("{:?}", path.display().to_string())),
            problem,
            fix: Some("give the JSON that `az rest` (outbound network dependencies) or `az ml workspace outbound-rule list` prints".into()),
        }
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(vec![issue(format!("cannot read the file: {e}"))]))?;
        let file = path.display().to_string();
        let got = crate::catalog::import::import(&text, &file, tags.as_ref())
            .map_err(|e| ConfigError(vec![issue(e.to_string())]))?;
        specs.extend(got.rules);
        imported_notes.extend(got.warnings);
        for (what, why) in got.not_enforced {
            imported_notes.push(format!("{what} in {file} is not enforced: {why}"));
        }
    }
    // A client policy's own lists are named as such in every explanation; the global
    // `[[deny]]` applies to it as to the default policy.
    let allow_list = match s.policy_name {
        Some(_) => "client_policy.allow",
        None => "allow",
    };
    let lists = [
        (allow_list, &s.allow),
        ("deny", &s.deny),
        ("client_policy.deny", &s.own_deny),
    ];
    for (list, entries) in lists {
        for (i, e) in entries.iter().enumerate() {
            // Checked by Settings::load; an error here means settings built by hand.
            specs.push(operator_rule(list, i, e).map_err(|i| ConfigError(vec![i]))?);
        }
    }
    let options = PolicyOptions {
        tls_path_rules: s.policy.tls_path_rules,
        narrow: narrowing(s, &specs)?,
        nameless_tls_ports: match s.catalog.service_tags_nameless_tls {
            NamelessTls::Deny => s.proxy.tls_ports.clone(),
            NamelessTls::Allow => Vec::new(),
        },
        nameless_tls: s.catalog.service_tags_nameless_tls == NamelessTls::Deny,
    };
    let policy = Policy::compile(specs, options.clone()).map_err(|e| {
        ConfigError(vec![ConfigIssue {
            origin: s.origin_of("allow"),
            key: "regex".into(),
            value: None,
            problem: e.to_string(),
            fix: Some("use fewer or simpler regex rules, or host patterns".into()),
        }])
    })?;
    // The rules of the optional parts that are off: those of entries without placeholders
    // are taken from `shared` when an earlier policy compiled the same ones.
    let all = catalog
        .resolve_features(&["all".to_owned()])
        .unwrap_or_default();
    let hints = |placeholders: bool, options: PolicyOptions| {
        let mut rules: Vec<_> = catalog
            .render_where(&selection, &all, tags.as_ref(), |e| {
                e.has_placeholder() == placeholders
                    && e.feature.as_ref().is_some_and(|f| !features.contains(&**f))
            })
            .rules;
        // Field additions first: they name what a compute instance needs, where an
        // article part may cover the same host for another purpose.
        rules.sort_by_key(|r| !addition(&catalog, r));
        Policy::compile(rules, options).ok()
    };
    let unnarrowed = PolicyOptions {
        narrow: Vec::new(),
        ..options.clone()
    };
    let key = format!(
        "{:?} {:?} {:?} {:?} {:?} {:?}",
        s.catalog.file,
        catalog.revision,
        selection.cloud,
        features,
        s.catalog.service_tags_file,
        unnarrowed
    );
    let off_parts = OffParts {
        shared: match shared.hints.get(&key) {
            Some(p) => Some(p.clone()),
            None => hints(false, unnarrowed).map(|p| {
                let p = std::sync::Arc::new(p);
                shared.hints.insert(key, p.clone());
                p
            }),
        },
        own: hints(true, options.clone()),
    };
    let mut warnings = rendered.warnings;
    warnings.extend(imported_notes);
    warnings.extend(narrowing_notes(&policy));
    if options.nameless_tls
        && s.proxy.tls_ports.is_empty()
        && policy.rules().iter().any(|r| {
            r.action == Action::Allow
                && matches!(r.what, Matchable::Cidr(_))
                && !matches!(r.source, crate::policy::Source::Operator { .. })
        })
    {
        warnings.push(
            "proxy.tls_ports is empty, so no port counts as TLS for `check`, `catalog` and the exports: a service tag's prefix shows as allowing an address on every port of the tag. Tunnels and redirected connections that carry a TLS hello without a server name are still refused (service_tag_without_name, catalog.service_tags_nameless_tls = \"deny\"); list the TLS ports (tls_ports = [443]) to make the rest agree".to_owned(),
        );
    }
    warnings.extend(policy.notes().iter().cloned());
    Ok(Built {
        policy,
        cloud: selection.cloud,
        region: selection.region.clone(),
        revision: catalog.revision.clone(),
        features,
        parts: shared
            .parts
            .entry(format!("{:?} {:?}", s.catalog.file, catalog.revision))
            .or_insert_with(|| {
                catalog
                    .features
                    .iter()
                    .map(|f| Part {
                        name: f.name.clone(),
                        summary: f.summary.clone(),
                        field_addition: f.field_addition.is_some(),
                    })
                    .collect()
            })
            .clone(),
        off_parts,
        reference: {
            let key = format!("{:?}", rendered.reference);
            shared
                .reference
                .entry(key)
                .or_insert_with(|| rendered.reference.into())
                .clone()
        },
        network: rendered.network,
        warnings,
        // The rendered warnings come first, so their places stay.
        left_out: rendered.left_out,
    })
}

impl Built {
    /// Log the load-time notes (at start-up and after a reload): the catalog entries left
    /// out for want of a placeholder value in one WARN line (how many, and which settings
    /// would add them), each of them at debug; every other note at WARN. `policy` is the
    /// policy's name (`default`, or a `[[client_policy]]`'s), which each line carries and a
    /// client policy's settings are named under.
    pub fn log_notes(&self, policy: &str) {
        let n = self.left_out.warnings.len();
        if n > 0 {
            let under = if policy == crate::config::clients::DEFAULT_POLICY {
                String::new()
            } else {
                format!(" of [[client_policy]] {policy:?}")
            };
            let settings: Vec<String> = self
                .left_out
                .settings
                .iter()
                .map(|k| match under.is_empty() {
                    true => k.clone(),
                    false => format!("client_policy.{k}"),
                })
                .collect();
            let settings = settings.join(", ");
            let entries = if n == 1 { "entry" } else { "entries" };
            tracing::warn!(
                policy,
                left_out = n,
                settings = %settings,
                "{n} catalog {entries}{under} left out: a placeholder has no value; set {settings} to add them (aml-egress catalog lists them)"
            );
        }
        for (i, w) in self.warnings.iter().enumerate() {
            if self.left_out.warnings.contains(&i) {
                tracing::debug!(policy, note = %w, "catalog entry left out");
            } else {
                tracing::warn!(policy, note = %w, "policy note");
            }
        }
    }

    /// The optional part (off now) that would allow `target`, for a denial's hint: a
    /// field addition before an article part, this policy's own entries before the shared.
    pub fn would_allow_with(&self, target: &Target, view: PathView<'_>) -> Option<&str> {
        let own = self.off_parts.own.as_ref();
        let own = own.and_then(|p| self.off_part(p, target, view));
        let shared = self.off_parts.shared.as_deref();
        let shared = shared.and_then(|p| self.off_part(p, target, view));
        match (own, shared) {
            (Some((_, false)), Some((f, true))) => Some(f),
            (Some((f, _)), _) | (None, Some((f, _))) => Some(f),
            (None, None) => None,
        }
    }

    /// The part of `hints` that would allow `target`, and whether it is a field addition.
    fn off_part<'a>(
        &self,
        hints: &'a Policy,
        target: &Target,
        view: PathView<'_>,
    ) -> Option<(&'a str, bool)> {
        let d = hints.decide(target, view);
        if !d.is_allowed() {
            return None;
        }
        let rule = hints.rule(d.rule?);
        // The shared hints are compiled without `catalog.narrow`: a wildcard this policy
        // narrows hints only for the names it keeps.
        if let (Some(names), crate::policy::Host::Name(name)) =
            (self.policy.narrowed_to(rule), &target.host)
            && !names.iter().any(|n| n.matches(name.as_str()))
        {
            return None;
        }
        match &rule.source {
            crate::policy::Source::Catalog {
                feature: Some(f), ..
            } => Some((
                f,
                self.parts
                    .iter()
                    .any(|p| *p.name == **f && p.field_addition),
            )),
            _ => None,
        }
    }
}

/// How long before its CA expires a load warns.
const CA_EXPIRY_WARNING_SECS: i64 = 30 * 86_400;

/// `[inspect]` compiled against the policy: what is inspected, and the CA and upstream
/// trust anchors read and checked (every problem at once), with the load-time notes.
/// `aml-egress ca init` compiles with `inspect.ca_cert` and `inspect.ca_key` cleared.
fn inspection(
    s: &Settings,
    policies: &[&Policy],
) -> Result<(Inspection, Vec<String>), ConfigError> {
    let i = &s.inspect;
    let mut issues = Vec::new();
    let shown = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let issue = |key: &str, value: Option<String>, p: ca::Problem| ConfigIssue {
        origin: s.origin_of(key),
        key: key.to_owned(),
        value,
        problem: p.problem,
        fix: Some(p.fix),
    };
    let mut patterns = |key: &str, list: &[String]| -> Vec<HostPattern> {
        let mut out = Vec::new();
        for entry in list {
            match crate::inspect::host_pattern(entry) {
                Ok(p) => out.push(p),
                // Checked by Settings::load; an error here means settings built by hand.
                Err(problem) => issues.push(ConfigIssue {
                    origin: s.origin_of(key),
                    key: key.to_owned(),
                    value: Some(format!("{entry:?}")),
                    problem,
                    fix: None,
                }),
            }
        }
        out
    };
    let hosts = patterns("inspect.hosts", &i.hosts);
    let bypass = patterns("inspect.bypass", &i.bypass);
    let (mut plan, mut notes) = Inspection::plan(
        policies,
        &s.proxy.tls_ports,
        hosts,
        bypass,
        i.max_cached_certs,
    );
    match (&i.ca_cert, &i.ca_key) {
        (None, None) => {
            if s.policy.tls_path_rules == TlsPathRules::Inspect && !plan.inspected.is_empty() {
                notes.push("policy.tls_path_rules = \"inspect\" without inspect.ca_cert: path rules are refused over TLS (as with \"deny\") until a CA is set".into());
            }
        }
        (Some(_), None) | (None, Some(_)) => {
            let (missing, given) = if i.ca_cert.is_none() {
                ("inspect.ca_cert", "inspect.ca_key")
            } else {
                ("inspect.ca_key", "inspect.ca_cert")
            };
            issues.push(ConfigIssue {
                origin: s.origin_of(given),
                key: missing.to_owned(),
                value: None,
                problem: "inspect.ca_cert and inspect.ca_key go together: set both or neither".into(),
                fix: Some("name the CA's certificate and key files (`aml-egress ca init` writes ca.pem and ca.key), or remove the one given".into()),
            });
        }
        (Some(cert_path), Some(key_path)) => match ca::read_cert(cert_path) {
            Err(p) => issues.push(issue("inspect.ca_cert", Some(shown(cert_path)), p)),
            Ok(cert) => match ca::read_key(key_path, &cert) {
                Err(p) => issues.push(issue("inspect.ca_key", Some(shown(key_path)), p)),
                Ok(key) => {
                    if let Some(c) = &cert.constraints {
                        let config = s
                            .file
                            .as_ref()
                            .map_or_else(|| "FILE".to_owned(), |f| f.display().to_string());
                        for not in plan.not_permitted(c) {
                            issues.push(ConfigIssue {
                                origin: s.origin_of("inspect.ca_cert"),
                                key: "inspect.ca_cert".into(),
                                value: Some(shown(cert_path)),
                                problem: format!(
                                    "the CA's name constraints ({}) do not permit {}, which this configuration inspects ({}): clients would refuse its certificates",
                                    c.describe(),
                                    not.pattern,
                                    not.what
                                ),
                                fix: Some(format!(
                                    "make a CA for this configuration (aml-egress ca init --config {config} --out DIR --force) and install its ca.pem on compute, or add {} to inspect.bypass if it need not be inspected",
                                    not.pattern
                                )),
                            });
                        }
                    }
                    let left = cert.seconds_left(std::time::SystemTime::now());
                    let when = crate::clock::rfc3339(cert.not_after);
                    if left <= 0 {
                        notes.push(format!(
                            "the inspection CA {} expired at {when}: tunnels that need inspection will be refused; make a new one with aml-egress ca init and install it on compute",
                            cert_path.display()
                        ));
                    } else if left < CA_EXPIRY_WARNING_SECS {
                        notes.push(format!(
                            "the inspection CA {} expires in {} days ({when}): make a new one with aml-egress ca init and install it on compute before then",
                            cert_path.display(),
                            (left + 43_200) / 86_400
                        ));
                    }
                    plan.ca = Some(LoadedCa {
                        cert_path: cert_path.clone(),
                        key_path: key_path.clone(),
                        cert,
                        key,
                    });
                }
            },
        },
    }
    if let Some(f) = &i.upstream_ca_file {
        match ca::read_anchors(f) {
            Ok(roots) => plan.upstream_roots = roots,
            Err(p) => issues.push(issue("inspect.upstream_ca_file", Some(shown(f)), p)),
        }
        plan.upstream_ca_file = Some(f.clone());
    }
    if issues.is_empty() {
        Ok((plan, notes))
    } else {
        Err(ConfigError(issues))
    }
}

/// A `[[client_policy]]` compiled: whom it serves, its mode, and its policy.
#[derive(Debug)]
pub struct ClientBuilt {
    pub name: String,
    pub sources: Vec<ipnet::IpNet>,
    pub client_names: Vec<String>,
    pub mode: crate::config::Mode,
    /// Shared by policies whose catalog selection, rules and mode are the same.
    pub built: std::sync::Arc<Built>,
}

/// The `[[client_policy]]` policies, in file order, and how a client's is chosen: the
/// one place the rule lives, for the proxy and for `check --client`.
#[derive(Debug)]
pub struct ClientPolicies {
    pub policies: Vec<ClientBuilt>,
    /// Each source network to its policy's place.
    by_source: crate::policy::cidr::CidrTable,
    /// Each `client_names` pattern with its policy's place (no two policies' overlap).
    by_certificate: Vec<(HostPattern, usize)>,
    /// Each policy's key to its place.
    by_key: std::collections::HashMap<PolicyKey, usize>,
    /// What serves a client no policy claims.
    pub unmatched: crate::config::UnmatchedClients,
}

/// A policy's name and `client_names` as a small copyable key, which a connection carries
/// when a client certificate chose its policy: found again in whichever configuration is
/// live when each request is decided. A reload that removes the policy, renames it, or
/// changes the names it claims (another policy may now have the old name) leaves no
/// policy with the key, and the connection is refused until it reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyKey(u64);

impl PolicyKey {
    /// The key of the policy named `name` that claims the certificate names `client_names`
    /// (in any order).
    pub fn of(name: &str, client_names: &[String]) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        let mut names: Vec<&String> = client_names.iter().collect();
        names.sort();
        names.hash(&mut h);
        PolicyKey(h.finish())
    }
}

/// Why a client certificate chose no policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateChoice {
    /// None of its names is any policy's.
    Unclaimed,
    /// Its names are two policies' (one name each): the connection is refused.
    Ambiguous(String, String),
}

/// Which policy serves a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// The default policy (the top-level settings).
    Default,
    /// The client policy at this place in [`ClientPolicies::policies`].
    Client(usize),
    /// None: `policy.unmatched_clients = "refuse"` and no policy claims the client.
    Refused,
}

impl ClientPolicies {
    fn new(policies: Vec<ClientBuilt>, unmatched: crate::config::UnmatchedClients) -> Self {
        let mut by_source = crate::policy::cidr::CidrTable::default();
        for (i, cp) in policies.iter().enumerate() {
            for net in &cp.sources {
                by_source.insert(*net, crate::policy::RuleId(i as u32));
            }
        }
        let mut by_certificate = Vec::new();
        for (i, cp) in policies.iter().enumerate() {
            for n in &cp.client_names {
                // Checked by Settings::load.
                if let Ok((host, None)) = parse_pattern(&n.to_ascii_lowercase()) {
                    by_certificate.push((host, i));
                }
            }
        }
        let by_key = policies
            .iter()
            .enumerate()
            .map(|(i, cp)| (PolicyKey::of(&cp.name, &cp.client_names), i))
            .collect();
        ClientPolicies {
            policies,
            by_source,
            by_certificate,
            by_key,
            unmatched,
        }
    }

    /// The policy a client certificate's DNS names (or, without any, its CN) choose.
    ///
    /// # Errors
    /// None is claimed, or two policies claim its names.
    pub fn by_certificate(&self, names: &[String]) -> Result<usize, CertificateChoice> {
        let mut found: Option<usize> = None;
        for name in names {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            for (pattern, i) in &self.by_certificate {
                if !pattern.matches(&name) {
                    continue;
                }
                match found {
                    Some(j) if j != *i => {
                        return Err(CertificateChoice::Ambiguous(
                            self.policies[j].name.clone(),
                            self.policies[*i].name.clone(),
                        ));
                    }
                    _ => found = Some(*i),
                }
            }
        }
        found.ok_or(CertificateChoice::Unclaimed)
    }

    /// The policy a certificate chose earlier, in this configuration: its place, or `None`
    /// when a reload removed it (or renamed it).
    pub fn by_key(&self, key: PolicyKey) -> Option<usize> {
        self.by_key.get(&key).copied()
    }

    /// The policy of a client at `ip`: the one whose most specific source network holds
    /// it (one hash probe per prefix length in use), else as `policy.unmatched_clients`
    /// says. Without client policies, always the default one.
    pub fn choose(&self, ip: std::net::IpAddr) -> Chosen {
        if self.policies.is_empty() {
            return Chosen::Default;
        }
        match self.by_source.lookup(ip).next() {
            Some(id) => Chosen::Client(id.0 as usize),
            None if self.unmatched == crate::config::UnmatchedClients::Refuse => Chosen::Refused,
            None => Chosen::Default,
        }
    }

    /// What serves a client that no policy claims.
    pub fn unclaimed(&self) -> Chosen {
        match self.unmatched {
            crate::config::UnmatchedClients::Refuse if !self.policies.is_empty() => Chosen::Refused,
            _ => Chosen::Default,
        }
    }

    /// The policy named `name` (`default`, or a client policy's name).
    pub fn named(&self, name: &str) -> Option<Chosen> {
        if name == crate::config::clients::DEFAULT_POLICY {
            return Some(Chosen::Default);
        }
        self.policies
            .iter()
            .position(|p| p.name == name)
            .map(Chosen::Client)
    }

    /// The addresses the client policy at `i` serves: each of its `sources` less the more
    /// specific prefixes of other policies inside that source (which choose those clients
    /// instead), so that the lists of two policies never overlap. Each source is carved
    /// alone: another policy's prefix inside one of its wide sources does not take away
    /// its own narrower source inside that prefix, which the most specific prefix gives it.
    pub fn served(&self, i: usize) -> Vec<ipnet::IpNet> {
        let others: Vec<ipnet::IpNet> = self
            .policies
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, p)| p.sources.iter().map(ipnet::IpNet::trunc))
            .collect();
        self.policies[i]
            .sources
            .iter()
            .flat_map(|s| {
                let s = s.trunc();
                let inside: Vec<ipnet::IpNet> = others
                    .iter()
                    .copied()
                    .filter(|t| s.contains(t) && s.prefix_len() < t.prefix_len())
                    .collect();
                carve(&[s], &inside)
            })
            .collect()
    }

    /// Every client policy's sources: the addresses some client policy claims.
    pub fn claimed(&self) -> Vec<ipnet::IpNet> {
        self.policies
            .iter()
            .flat_map(|p| p.sources.iter().copied())
            .collect()
    }

    /// Log the load-time notes (see [`Built::log_notes`]) of `default`, the default
    /// policy, unless it serves nobody (`policy.unmatched_clients = "refuse"` beside client
    /// policies), and of every client policy.
    pub fn log_notes(&self, default: &Built) {
        let serves_anyone = self.unclaimed() == Chosen::Default;
        for (name, built) in self.with_default(default) {
            if name != crate::config::clients::DEFAULT_POLICY || serves_anyone {
                built.log_notes(name);
            }
        }
    }

    /// Every policy with its name, the default one (`default`, compiled apart from the
    /// client policies) first.
    pub fn with_default<'a>(
        &'a self,
        default: &'a Built,
    ) -> impl Iterator<Item = (&'a str, &'a Built)> {
        std::iter::once((crate::config::clients::DEFAULT_POLICY, default))
            .chain(self.policies.iter().map(|p| (p.name.as_str(), &*p.built)))
    }

    /// The mode of the policy `chosen`: a client policy's own, else `default` (the
    /// default policy's, `proxy.mode`).
    pub fn mode_of(&self, chosen: Chosen, default: crate::config::Mode) -> crate::config::Mode {
        match chosen {
            Chosen::Client(i) => self.policies[i].mode,
            _ => default,
        }
    }

    /// The names of every policy, `default` first.
    pub fn names(&self) -> Vec<&str> {
        std::iter::once(crate::config::clients::DEFAULT_POLICY)
            .chain(self.policies.iter().map(|p| p.name.as_str()))
            .collect()
    }
}

/// The `[[client_policy]]` policies alone, compiled from `s` as [`compile`] does but
/// without the rest of the configuration (no inspection CA is read): for `export`, which
/// needs the policies' rules and whom each serves, never the CA's key.
pub fn build_client_policies(s: &Settings) -> Result<ClientPolicies, ConfigError> {
    Ok(ClientPolicies::new(
        client_policies(s)?,
        s.policy.unmatched_clients,
    ))
}

/// `nets` less every network in `claimed` that lies inside one of them, as a list of
/// networks covering exactly the rest (a claimed network that holds a whole piece removes
/// it). IPv4 and IPv6 alike.
pub fn carve(nets: &[ipnet::IpNet], claimed: &[ipnet::IpNet]) -> Vec<ipnet::IpNet> {
    let mut pieces: Vec<ipnet::IpNet> = nets.iter().map(ipnet::IpNet::trunc).collect();
    for t in claimed.iter().map(ipnet::IpNet::trunc) {
        let mut out = Vec::with_capacity(pieces.len());
        for p in pieces {
            if t.contains(&p) {
                continue;
            }
            if !p.contains(&t) {
                out.push(p);
                continue;
            }
            // Halve `p` down to `t`, keeping each half that does not hold it.
            let mut cur = p;
            while cur.prefix_len() < t.prefix_len() {
                let Ok(halves) = cur.subnets(cur.prefix_len() + 1) else {
                    break;
                };
                let mut next = cur;
                for h in halves {
                    if h.contains(&t) {
                        next = h;
                    } else {
                        out.push(h);
                    }
                }
                cur = next;
            }
        }
        pieces = out;
    }
    pieces.sort();
    pieces
}

/// Compile every client policy as its own settings (see [`crate::config::clients`]), all
/// problems at once, each naming its policy. Identical policies share one compiled copy.
fn client_policies(s: &Settings) -> Result<Vec<ClientBuilt>, ConfigError> {
    use crate::config::clients::{base, derived, rekey};
    let mut out = Vec::new();
    let mut issues = Vec::new();
    let mut seen: std::collections::HashMap<String, std::sync::Arc<Built>> = Default::default();
    let base = base(s);
    let mut shared = SharedParts::default();
    for cp in &s.client_policies {
        let d = derived(&base, cp);
        // What decides the compiled policy: the catalog selection, the rules and the mode.
        let key = format!(
            "{:?} {:?} {:?} {:?}",
            d.catalog, d.allow, d.own_deny, d.proxy.mode
        );
        let built = match seen.get(&key) {
            Some(b) => b.clone(),
            None => match build_policy_sharing(&d, &mut shared) {
                Ok(b) => {
                    let b = std::sync::Arc::new(b);
                    seen.insert(key, b.clone());
                    b
                }
                Err(e) => {
                    issues.extend(e.0.into_iter().map(|i| rekey(i, cp)));
                    continue;
                }
            },
        };
        out.push(ClientBuilt {
            name: cp.name.clone(),
            sources: cp.sources.clone(),
            client_names: cp.client_names.clone(),
            mode: d.proxy.mode,
            built,
        });
    }
    if issues.is_empty() {
        Ok(out)
    } else {
        Err(ConfigError(issues))
    }
}

/// A configuration ready for the runtime: the compiled policy and the typed options of
/// every part.
#[derive(Debug)]
pub struct Compiled {
    /// The default policy: the top-level `[catalog]`, `[[allow]]`, `[[deny]]`.
    pub built: Built,
    /// The `[[client_policy]]` policies and how a client's is chosen.
    pub clients: ClientPolicies,
    pub proxy: ProxySettings,
    pub upstream: UpstreamSettings,
    pub transparent: TransparentSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub reload: ReloadSettings,
    /// `[inspect]`: what is inspected, the CA and the upstream trust anchors.
    pub inspect: Inspection,
    /// The config file, when there is one (watched and re-read on reload).
    pub file: Option<PathBuf>,
    /// The catalog file it names, if any (watched too).
    pub catalog_file: Option<PathBuf>,
    /// The Service Tags file it names, if any (watched too).
    pub service_tags_file: Option<PathBuf>,
    /// The files it imports (watched too).
    pub imports: Vec<PathBuf>,
    /// The catalog, Service Tags and import files the `[[client_policy]]` tables name
    /// (watched too).
    pub client_policy_files: Vec<PathBuf>,
    /// The values of the keys a reload cannot change.
    pub restart: RestartOnly,
}

/// The values of the keys the schema marks restart-only, as shown in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartOnly(Vec<(&'static str, String)>);

/// A restart-only key whose value differs: the running value stays until a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: &'static str,
    pub running: String,
    pub new: String,
}

impl RestartOnly {
    /// What differs in `new` from `self` (the running values).
    pub fn diff(&self, new: &RestartOnly) -> Vec<Change> {
        self.0
            .iter()
            .zip(&new.0)
            .filter(|(a, b)| a.1 != b.1)
            .map(|((key, running), (_, new))| Change {
                key,
                running: running.clone(),
                new: new.clone(),
            })
            .collect()
    }
}

/// Compile checked settings.
pub fn compile(s: Settings) -> Result<Compiled, ConfigError> {
    let mut built = build_policy(&s)?;
    let clients = ClientPolicies::new(client_policies(&s)?, s.policy.unmatched_clients);
    // One CA serves every policy: what any of them inspects, it must permit.
    let policies: Vec<&Policy> = clients
        .with_default(&built)
        .map(|(_, b)| &b.policy)
        .collect();
    let (inspect, notes) = inspection(&s, &policies)?;
    built.warnings.extend(notes);
    let restart = RestartOnly(
        s.shown()
            .into_iter()
            .filter(|(k, _)| key(k).is_some_and(|k| k.reload == Reload::Restart))
            .collect(),
    );
    Ok(Compiled {
        built,
        clients,
        proxy: s.proxy,
        upstream: s.upstream,
        transparent: s.transparent,
        admin: s.admin,
        log: s.log,
        metrics: s.metrics,
        reload: s.reload,
        inspect,
        file: s.file,
        catalog_file: s.catalog.file,
        service_tags_file: s.catalog.service_tags_file,
        imports: s.catalog.import,
        client_policy_files: s
            .client_policies
            .iter()
            .flat_map(|cp| {
                let c = &cp.catalog;
                c.file.iter().chain(&c.service_tags_file).chain(&c.import)
            })
            .cloned()
            .collect(),
        restart,
    })
}

impl Compiled {
    /// The files whose contents decide this configuration: the config file and the files
    /// it names (catalogs, Service Tags and imports, every policy's; certificates, keys,
    /// the client CA). None when serving the embedded defaults.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let Some(path) = &self.file else {
            return Vec::new();
        };
        let mut files = vec![path.clone()];
        files.extend(self.catalog_file.clone());
        files.extend(self.service_tags_file.clone());
        files.extend(self.imports.iter().cloned());
        for f in &self.client_policy_files {
            if !files.contains(f) {
                files.push(f.clone());
            }
        }
        files.extend(self.proxy.tls_cert.clone());
        files.extend(self.proxy.tls_client_ca.clone());
        files.extend(self.proxy.tls_key.clone());
        if let Some(ca) = &self.inspect.ca {
            files.push(ca.cert_path.clone());
            files.push(ca.key_path.clone());
        }
        files.extend(self.inspect.upstream_ca_file.clone());
        files
    }
}

#[cfg(test)]
mod carve_tests {
    use super::carve;
    use ipnet::IpNet;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn carving_leaves_exactly_the_rest() {
        assert_eq!(
            carve(&nets(&["10.0.0.0/8"]), &nets(&["10.0.0.0/9"])),
            nets(&["10.128.0.0/9"])
        );
        let rest = carve(&nets(&["10.0.0.0/16"]), &nets(&["10.0.5.0/24"]));
        assert_eq!(rest.len(), 8);
        for a in ["10.0.4.1", "10.0.6.1", "10.0.0.1", "10.0.255.1"] {
            let a: std::net::IpAddr = a.parse().unwrap();
            assert!(rest.iter().any(|n| n.contains(&a)), "{a}");
        }
        let inside: std::net::IpAddr = "10.0.5.9".parse().unwrap();
        assert!(!rest.iter().any(|n| n.contains(&inside)));
        // A claim that holds the whole network, one elsewhere, another family.
        assert!(carve(&nets(&["10.1.0.0/16"]), &nets(&["10.0.0.0/8"])).is_empty());
        assert_eq!(
            carve(
                &nets(&["10.1.0.0/16", "fd00::/48"]),
                &nets(&["192.168.0.0/16"])
            ),
            nets(&["10.1.0.0/16", "fd00::/48"])
        );
        assert_eq!(
            carve(&nets(&["fd00::/47"]), &nets(&["fd00::/48"])),
            nets(&["fd00:0:1::/48"])
        );
    }
}
