//! The Azure Machine Learning outbound host catalog and its rendering into rules.
//!
//! The data lives in `config/catalog/` (one TOML file per article revision, plus the list
//! of Azure regions) and is embedded into the binary, so that the proxy runs without any
//! file; `catalog.file` swaps in a newer file of the same format without a new build.
//! Rendering picks the entries of one cloud and feature set, fills the `<region>`,
//! `<storage>` and `<acr>` placeholders, and leaves out (with a warning) every entry whose
//! placeholder has no value, so that no placeholder is ever matched literally.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::policy::{Action, Matchable, PortSet, RuleSpec, Source, parse_pattern};

pub mod diff;
pub mod import;
pub mod service_tags;
pub use service_tags::ServiceTags;

/// Catalog revisions built into the binary, oldest first; the last is the default.
pub const REVISIONS: &[(&str, &str)] = &[
    (
        "2021-11",
        include_str!("../../config/catalog/azureml-2021-11.toml"),
    ),
    (
        "2026-03",
        include_str!("../../config/catalog/azureml-2026-03.toml"),
    ),
];

/// The revision used when `catalog.revision` is not set.
pub const DEFAULT_REVISION: &str = "2026-03";

const REGIONS: &str = include_str!("../../config/catalog/regions.toml");

/// The three Azure clouds the article covers.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    #[default]
    Public,
    Usgov,
    China,
}

impl Cloud {
    /// Every cloud, in the order the article lists them.
    pub const ALL: [Cloud; 3] = [Cloud::Public, Cloud::Usgov, Cloud::China];

    /// The configuration spelling (`public`, `usgov`, `china`).
    pub fn name(self) -> &'static str {
        match self {
            Cloud::Public => "public",
            Cloud::Usgov => "usgov",
            Cloud::China => "china",
        }
    }

    /// Parse the configuration spelling.
    pub fn from_name(s: &str) -> Option<Self> {
        Cloud::ALL.into_iter().find(|c| c.name() == s)
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether an entry names hosts or Azure service tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Host,
    ServiceTag,
}

/// Transport protocol of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Direction of traffic; inbound entries are user-defined-route guidance only.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Outbound,
    Inbound,
}

/// One port or an inclusive range written `"a-b"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortItem {
    One(i64),
    Range(String),
}

impl PortItem {
    /// The inclusive range, or a message saying what is wrong with it.
    pub fn range(&self) -> Result<(u16, u16), String> {
        let one = |n: i64| -> Result<u16, String> {
            u16::try_from(n)
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("port {n} is not from 1 to 65535"))
        };
        match self {
            PortItem::One(n) => one(*n).map(|p| (p, p)),
            PortItem::Range(s) => {
                let parse = |t: &str| -> Result<u16, String> {
                    t.trim()
                        .parse::<i64>()
                        .map_err(|_| format!("'{s}' is not a port or a range 'low-high'"))
                        .and_then(one)
                };
                let (lo, hi) = match s.split_once('-') {
                    Some((a, b)) => (parse(a)?, parse(b)?),
                    None => {
                        let p = parse(s)?;
                        (p, p)
                    }
                };
                if lo > hi {
                    return Err(format!("range '{s}' runs backwards"));
                }
                Ok((lo, hi))
            }
        }
    }
}

/// Turn a list of port items into a [`PortSet`], naming the first bad item.
pub fn port_set(items: &[PortItem]) -> Result<PortSet, String> {
    let ranges = items
        .iter()
        .map(PortItem::range)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PortSet::from_ranges(ranges))
}

/// An optional part of the catalog, switched on by name in `catalog.features`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub name: String,
    pub summary: String,
    #[serde(default)]
    pub implies: Vec<String>,
    /// For a part the article omits: why it is needed and where it was reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_addition: Option<String>,
}

/// One row of one table of the article.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    // Shared (not copied) with every rule rendered from the entry, in every policy.
    pub section: Arc<str>,
    pub purpose: Arc<str>,
    pub clouds: Vec<Cloud>,
    pub kind: EntryKind,
    pub patterns: Vec<String>,
    pub protocol: Protocol,
    pub ports: Vec<PortItem>,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<Arc<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Entry {
    /// Why a proxy does not enforce this entry, or `None` when it does.
    pub fn not_enforced_because(&self) -> Option<&'static str> {
        if self.direction == Direction::Inbound {
            Some("inbound traffic (user-defined route), never carried by a proxy")
        } else if self.protocol == Protocol::Udp {
            Some("UDP, which an HTTP proxy does not carry")
        } else if self.kind == EntryKind::ServiceTag {
            Some("a service tag: an address list from a Service Tags file, not a host name")
        } else {
            None
        }
    }
}

/// A whole catalog file: one revision of the article.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub format: u32,
    pub revision: String,
    pub article: String,
    pub article_date: String,
    #[serde(default, rename = "feature")]
    pub features: Vec<Feature>,
    #[serde(rename = "rule")]
    pub entries: Vec<Entry>,
}

/// A catalog file that cannot be used, with the place that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{origin}: not a valid catalog file: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: rule #{index} ({section}: {purpose}): {message}")]
    Entry {
        origin: String,
        index: usize,
        section: String,
        purpose: String,
        message: String,
    },
    #[error("{origin}: {message}")]
    Other { origin: String, message: String },
}

const PLACEHOLDERS: [&str; 3] = ["<region>", "<storage>", "<acr>"];

impl Catalog {
    /// Parse and check a catalog file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, CatalogError> {
        let catalog: Catalog = toml::from_str(text).map_err(|e| CatalogError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        catalog.check(origin)?;
        Ok(catalog)
    }

    /// The embedded catalog of a revision, or `None` for an unknown revision.
    pub fn embedded(revision: &str) -> Option<Self> {
        Self::embedded_ref(revision).cloned()
    }

    /// The embedded revision `revision`, parsed once per process: a hub with hundreds of
    /// client policies renders the same revision for each, and parsing (or copying) it was
    /// most of a policy's load time.
    pub fn embedded_ref(revision: &str) -> Option<&'static Self> {
        static PARSED: std::sync::OnceLock<Vec<Catalog>> = std::sync::OnceLock::new();
        let i = REVISIONS.iter().position(|(r, _)| *r == revision)?;
        let parsed = PARSED.get_or_init(|| {
            REVISIONS
                .iter()
                .map(|(name, text)| {
                    // The embedded files are checked by the test suite; a failure here is a
                    // build defect.
                    Catalog::from_toml(text, &format!("embedded catalog {name}"))
                        .expect("embedded catalog is valid")
                })
                .collect()
        });
        parsed.get(i)
    }

    fn check(&self, origin: &str) -> Result<(), CatalogError> {
        let other = |message: String| CatalogError::Other {
            origin: origin.to_owned(),
            message,
        };
        if self.format != 1 {
            return Err(other(format!(
                "format {} is not supported (this build reads format 1)",
                self.format
            )));
        }
        let names: BTreeSet<&str> = self.features.iter().map(|f| f.name.as_str()).collect();
        for f in &self.features {
            if f.name == "all" || !is_snake_case(&f.name) {
                return Err(other(format!(
                    "feature name '{}' must be snake_case and not 'all'",
                    f.name
                )));
            }
            if let Some(bad) = f.implies.iter().find(|i| !names.contains(i.as_str())) {
                return Err(other(format!(
                    "feature '{}' implies unknown feature '{bad}'",
                    f.name
                )));
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            let fail = |message: String| CatalogError::Entry {
                origin: origin.to_owned(),
                index: i + 1,
                section: e.section.to_string(),
                purpose: e.purpose.to_string(),
                message,
            };
            if e.clouds.is_empty() || e.patterns.is_empty() || e.ports.is_empty() {
                return Err(fail("clouds, patterns and ports must not be empty".into()));
            }
            if let Some(f) = &e.feature
                && !names.contains(&**f)
            {
                return Err(fail(format!(
                    "feature '{f}' is not declared in [[feature]]"
                )));
            }
            port_set(&e.ports).map_err(fail)?;
            for p in &e.patterns {
                let filled = fill(p, |_| Some("x"));
                if filled.contains('<') || filled.contains('>') {
                    return Err(fail(format!(
                        "'{p}' holds a placeholder other than {}",
                        PLACEHOLDERS.join(", ")
                    )));
                }
                if e.kind == EntryKind::Host {
                    parse_pattern(&filled).map_err(|err| fail(err.to_string()))?;
                }
            }
        }
        Ok(())
    }

    /// The feature names this catalog declares.
    pub fn feature_names(&self) -> Vec<&str> {
        self.features.iter().map(|f| f.name.as_str()).collect()
    }

    /// Expand a feature selection (names or `all`, with implications) into the set of
    /// enabled features; unknown names are returned as the error.
    pub fn resolve_features(&self, selected: &[String]) -> Result<BTreeSet<String>, Vec<String>> {
        if selected.iter().any(|s| s == "all") {
            return Ok(self.features.iter().map(|f| f.name.clone()).collect());
        }
        let unknown: Vec<String> = selected
            .iter()
            .filter(|s| !self.features.iter().any(|f| &f.name == *s))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let mut on: BTreeSet<String> = BTreeSet::new();
        let mut todo: Vec<String> = selected.to_vec();
        while let Some(name) = todo.pop() {
            if on.insert(name.clone())
                && let Some(f) = self.features.iter().find(|f| f.name == name)
            {
                todo.extend(f.implies.iter().cloned());
            }
        }
        Ok(on)
    }

    /// Render the entries of one cloud and feature set into enforced rules and reference
    /// entries. `features` must come from [`Catalog::resolve_features`].
    /// Render the entries for a cloud, its placeholder values and features. With a Service
    /// Tags file, outbound TCP service-tag entries become CIDR rules for the tag's prefixes
    /// (IPv4 and IPv6); without one, and for inbound or UDP entries, they are reference.
    pub fn render(
        &self,
        sel: &Selection,
        features: &BTreeSet<String>,
        tags: Option<&ServiceTags>,
    ) -> Rendered {
        self.render_where(sel, features, tags, |_| true)
    }

    /// [`Catalog::render`], of the entries `which` keeps only.
    pub fn render_where(
        &self,
        sel: &Selection,
        features: &BTreeSet<String>,
        tags: Option<&ServiceTags>,
        which: impl Fn(&Entry) -> bool,
    ) -> Rendered {
        let mut out = Rendered::default();
        let revision: Arc<str> = self.revision.as_str().into();
        for e in &self.entries {
            if !e.clouds.contains(&sel.cloud) || !which(e) {
                continue;
            }
            if let Some(f) = &e.feature
                && !features.contains(&**f)
            {
                continue;
            }
            let source = Source::Catalog {
                cloud: sel.cloud.name(),
                revision: revision.clone(),
                section: e.section.clone(),
                purpose: e.purpose.clone(),
                feature: e.feature.clone(),
                service_tag: None,
            };
            // Checked in `check`, so this cannot fail for a loaded catalog.
            let ports = port_set(&e.ports).unwrap_or_default();
            for p in &e.patterns {
                let mut missing = Vec::new();
                let filled = fill(p, |ph| {
                    let v = sel.value(ph);
                    if v.is_none() {
                        missing.push(ph);
                    }
                    v
                });
                let outbound_tag =
                    e.kind == EntryKind::ServiceTag && e.direction == Direction::Outbound;
                if let (true, Some(tags)) = (outbound_tag, tags)
                    && missing.is_empty()
                {
                    match tags.lookup(&filled) {
                        Some((name, prefixes)) => {
                            out.network.push(NetworkRule {
                                tag: name.to_owned(),
                                protocol: e.protocol,
                                ports: ports.clone(),
                                prefixes: prefixes.to_vec(),
                                source: source.clone(),
                            });
                            if e.protocol == Protocol::Udp {
                                // Firewall guidance only: a proxy carries no UDP.
                                out.reference.push(ReferenceEntry {
                                    pattern: filled,
                                    kind: e.kind,
                                    protocol: e.protocol,
                                    direction: e.direction,
                                    ports: ports.to_string(),
                                    source: source.clone(),
                                    note: e.note.clone(),
                                    not_enforced: "UDP, which an HTTP proxy does not carry",
                                });
                                continue;
                            }
                            let mut source = source.clone();
                            if let Source::Catalog { service_tag, .. } = &mut source {
                                *service_tag = Some(name.to_owned());
                            }
                            out.rules.extend(prefixes.iter().map(|net| RuleSpec {
                                action: Action::Allow,
                                what: Matchable::Cidr(*net),
                                ports: ports.clone(),
                                source: source.clone(),
                            }));
                            continue;
                        }
                        None => out.warnings.push(format!(
                            "service tag {filled} ({source}) is not in the Service Tags file (cloud {}); it stays unenforced",
                            tags.cloud
                        )),
                    }
                }
                if let Some(why) = e.not_enforced_because() {
                    out.reference.push(ReferenceEntry {
                        pattern: filled,
                        kind: e.kind,
                        protocol: e.protocol,
                        direction: e.direction,
                        ports: ports.to_string(),
                        source: source.clone(),
                        note: e.note.clone(),
                        not_enforced: why,
                    });
                    continue;
                }
                if !missing.is_empty() {
                    let keys: Vec<String> = missing
                        .iter()
                        .map(|ph| format!("{ph} (set catalog.{})", Selection::key_for(ph)))
                        .collect();
                    out.left_out.warnings.push(out.warnings.len());
                    out.left_out.settings.extend(
                        missing
                            .iter()
                            .map(|ph| format!("catalog.{}", Selection::key_for(ph))),
                    );
                    out.warnings.push(format!(
                        "left out {p} port {ports} ({source}): no value for {}",
                        keys.join(", ")
                    ));
                    continue;
                }
                if let Ok((host, path)) = parse_pattern(&filled) {
                    out.rules.push(RuleSpec {
                        action: Action::Allow,
                        what: Matchable::Host(host, path),
                        ports: ports.clone(),
                        source: source.clone(),
                    });
                } else {
                    out.warnings.push(format!(
                        "left out {filled} ({source}): the filled-in name is not a valid host (check the placeholder values)"
                    ));
                }
            }
        }
        out
    }
}

fn is_snake_case(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Replace each known placeholder with `value(placeholder)`; placeholders without a value
/// stay as written.
impl Entry {
    /// Whether a pattern names a placeholder (`<storage>`), so that what it renders to
    /// depends on a workspace's own values.
    pub fn has_placeholder(&self) -> bool {
        self.patterns
            .iter()
            .any(|p| PLACEHOLDERS.iter().any(|ph| p.contains(ph)))
    }
}

fn fill<'a>(pattern: &str, mut value: impl FnMut(&'static str) -> Option<&'a str>) -> String {
    let mut s = pattern.to_owned();
    for ph in PLACEHOLDERS {
        if s.contains(ph)
            && let Some(v) = value(ph)
        {
            s = s.replace(ph, v);
        }
    }
    s
}

/// What rendering needs from the settings: the cloud and the placeholder values.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub cloud: Cloud,
    pub region: Option<String>,
    pub storage_account: Option<String>,
    pub container_registry: Option<String>,
}

impl Selection {
    fn value(&self, placeholder: &str) -> Option<&str> {
        match placeholder {
            "<region>" => self.region.as_deref(),
            "<storage>" => self.storage_account.as_deref(),
            "<acr>" => self.container_registry.as_deref(),
            _ => None,
        }
    }

    fn key_for(placeholder: &str) -> &'static str {
        match placeholder {
            "<region>" => "region",
            "<storage>" => "storage_account",
            _ => "container_registry",
        }
    }
}

/// A catalog entry kept for reference and guidance, never enforced by the proxy.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceEntry {
    pub pattern: String,
    pub kind: EntryKind,
    pub protocol: Protocol,
    pub direction: Direction,
    pub ports: String,
    pub source: Source,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub not_enforced: &'static str,
}

/// An outbound service-tag entry resolved through a Service Tags file: what a firewall in
/// front of compute forwards (`aml-egress nva-rules`), TCP and UDP alike.
#[derive(Debug, Clone)]
pub struct NetworkRule {
    /// The tag as the file names it.
    pub tag: String,
    pub protocol: Protocol,
    pub ports: PortSet,
    pub prefixes: Vec<ipnet::IpNet>,
    pub source: Source,
}

/// The result of rendering: rules to compile, reference entries, and warnings.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    pub rules: Vec<RuleSpec>,
    /// Outbound service-tag entries with their prefixes (with a Service Tags file).
    pub network: Vec<NetworkRule>,
    pub reference: Vec<ReferenceEntry>,
    pub warnings: Vec<String>,
    /// Which of the warnings are entries left out because a placeholder has no value.
    pub left_out: LeftOut,
}

/// Catalog entries left out because a placeholder (`<region>`, `<storage>`, `<acr>`) has
/// no value: on the embedded defaults there are several, so `serve` sums them up in one
/// line rather than one warning each.
#[derive(Debug, Clone, Default)]
pub struct LeftOut {
    /// Their places in the warnings, where each entry stays listed (for `validate` and
    /// `catalog`).
    pub warnings: Vec<usize>,
    /// The settings that would add them, as `catalog.region`.
    pub settings: std::collections::BTreeSet<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionFile {
    public: Vec<String>,
    usgov: Vec<String>,
    china: Vec<String>,
}

/// Azure region names of a cloud (lower case), from the embedded region list.
pub fn regions(cloud: Cloud) -> &'static [String] {
    static PARSED: OnceLock<RegionFile> = OnceLock::new();
    let file =
        PARSED.get_or_init(|| toml::from_str(REGIONS).expect("embedded region list is valid"));
    match cloud {
        Cloud::Public => &file.public,
        Cloud::Usgov => &file.usgov,
        Cloud::China => &file.china,
    }
}
