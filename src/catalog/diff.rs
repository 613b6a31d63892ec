//! `aml-egress catalog diff A B`: what changes between two catalogs (revisions or files)
//! for one cloud, feature set and placeholder values, so that a team sees what Microsoft's
//! latest revision changes for them before switching.
//!
//! Two rows are the same rule when their filled-in pattern, protocol and direction match;
//! one has changed when its ports, its optional part or its section differ.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{Catalog, Direction, Protocol, Selection, port_set};

/// One rule as compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub section: String,
    pub pattern: String,
    pub protocol: Protocol,
    pub direction: Direction,
    pub ports: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
}

/// A rule in both, with what differs.
#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub before: Row,
    pub after: Row,
}

/// Rules added, removed and changed from A to B.
#[derive(Debug, Default, Serialize)]
pub struct Diff {
    pub added: Vec<Row>,
    pub removed: Vec<Row>,
    pub changed: Vec<Changed>,
}

impl Diff {
    /// Whether A and B give the same rules.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

type Key = (String, Protocol, Direction);

fn rows(c: &Catalog, sel: &Selection, features: &[String]) -> BTreeMap<Key, Row> {
    // Parts a catalog does not have are simply not on for it.
    let known: Vec<String> = features
        .iter()
        .filter(|f| *f == "all" || c.features.iter().any(|x| &x.name == *f))
        .cloned()
        .collect();
    let on: BTreeSet<String> = c.resolve_features(&known).unwrap_or_default();
    let mut out = BTreeMap::new();
    for e in &c.entries {
        if !e.clouds.contains(&sel.cloud) || e.feature.as_ref().is_some_and(|f| !on.contains(&**f))
        {
            continue;
        }
        let ports = port_set(&e.ports).unwrap_or_default().to_string();
        for p in &e.patterns {
            let pattern = super::fill(p, |ph| sel.value(ph));
            out.insert(
                (pattern.clone(), e.protocol, e.direction),
                Row {
                    section: e.section.to_string(),
                    pattern,
                    protocol: e.protocol,
                    direction: e.direction,
                    ports: ports.clone(),
                    feature: e.feature.as_deref().map(str::to_owned),
                },
            );
        }
    }
    out
}

/// Compare `a` with `b`.
pub fn diff(a: &Catalog, b: &Catalog, sel: &Selection, features: &[String]) -> Diff {
    let (ra, rb) = (rows(a, sel, features), rows(b, sel, features));
    let mut d = Diff::default();
    for (k, row) in &ra {
        match rb.get(k) {
            None => d.removed.push(row.clone()),
            Some(after) if after.ports != row.ports || after.feature != row.feature => {
                d.changed.push(Changed {
                    before: row.clone(),
                    after: after.clone(),
                })
            }
            Some(_) => {}
        }
    }
    d.added = rb
        .iter()
        .filter(|(k, _)| !ra.contains_key(*k))
        .map(|(_, r)| r.clone())
        .collect();
    d
}

/// The text form: grouped by the article section of B (A for removals).
pub fn text(d: &Diff, a: &str, b: &str) -> String {
    use std::fmt::Write as _;
    let mut by_section: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let show = |r: &Row| {
        let proto = format!("{:?}", r.protocol).to_ascii_lowercase();
        let part = r
            .feature
            .as_deref()
            .map_or(String::new(), |f| format!(" [{f}]"));
        let dir = match r.direction {
            Direction::Inbound => " inbound",
            Direction::Outbound => "",
        };
        format!("{} {proto} {}{dir}{part}", r.pattern, r.ports)
    };
    for r in &d.added {
        by_section
            .entry(&r.section)
            .or_default()
            .push(format!("+ {}", show(r)));
    }
    for r in &d.removed {
        by_section
            .entry(&r.section)
            .or_default()
            .push(format!("- {}", show(r)));
    }
    for c in &d.changed {
        by_section
            .entry(&c.after.section)
            .or_default()
            .push(format!("~ {} -> {}", show(&c.before), show(&c.after)));
    }
    let mut out = format!(
        "{a} -> {b}: {} added, {} removed, {} changed\n",
        d.added.len(),
        d.removed.len(),
        d.changed.len()
    );
    for (section, lines) in by_section {
        let _ = writeln!(out, "\n{section}");
        for l in lines {
            let _ = writeln!(out, "  {l}");
        }
    }
    out
}
