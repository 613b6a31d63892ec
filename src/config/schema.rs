//! The key schema: every key the typed sections of [`super::settings`] declare, and from
//! it unknown-key detection (with a did-you-mean), the environment overrides that are
//! lists, and what a reload cannot change.
//!
//! The declaration types and the typed reads live in [`super::read`], below both this
//! module and the settings that use them.

use std::collections::BTreeMap;

use config::{Map, Value, ValueKind};

use super::ConfigIssue;
use super::origin::Origins;
use super::read::{Env, Key, shown};
use crate::policy::did_you_mean;

/// Every key, in schema order.
pub fn keys() -> impl Iterator<Item = &'static Key> {
    super::settings::SECTIONS
        .iter()
        .flat_map(|(_, keys)| keys.iter())
}

/// The key's declaration, if it is one.
pub fn key(name: &str) -> Option<&'static Key> {
    keys().find(|k| k.name == name)
}

/// Keys whose environment value is a comma-separated list.
pub fn env_list_keys() -> impl Iterator<Item = &'static str> {
    keys().filter(|k| k.env == Env::List).map(|k| k.name)
}

/// Fields of an `[[allow]]` or `[[deny]]` entry.
pub const RULE_FIELDS: &[&str] = &["host", "cidr", "regex", "ports", "comment"];

/// The rule lists, written as arrays of tables.
pub const RULE_LISTS: &[&str] = &["allow", "deny"];

fn unknown(origin: String, path: String, key: &str, known: &[&str]) -> ConfigIssue {
    let near = did_you_mean(key, known.iter().copied());
    let fix = if near.is_empty() {
        format!("known keys here: {}", known.join(", "))
    } else {
        format!("did you mean {}?", near.join(" or "))
    };
    ConfigIssue {
        origin,
        key: path,
        value: None,
        problem: "unknown key".into(),
        fix: Some(fix),
    }
}

/// Where one load's keys came from, and the problems found so far: what every check below
/// records into.
struct Found<'a> {
    places: &'a Origins,
    origins: &'a mut BTreeMap<String, String>,
    issues: &'a mut Vec<ConfigIssue>,
}

impl Found<'_> {
    /// Record where each field of `table` (at `path`) came from; a field not in `known`
    /// is an unknown key.
    fn fields(&mut self, path: &str, table: &Map<String, Value>, known: &[&str]) {
        for (field, v) in table {
            let key = format!("{path}.{field}");
            let origin = self.places.of(v, &key);
            if known.contains(&field.as_str()) {
                self.origins.insert(key, origin);
            } else {
                self.issues.push(unknown(origin, key, field, known));
            }
        }
    }

    /// `value` at `key` (from `origin`) as a table, or a problem saying to `write` one.
    fn table<'v>(
        &mut self,
        key: &str,
        value: &'v Value,
        origin: String,
        write: String,
    ) -> Option<&'v Map<String, Value>> {
        match &value.kind {
            ValueKind::Table(t) => Some(t),
            _ => {
                self.issues.push(ConfigIssue {
                    origin,
                    key: key.to_owned(),
                    value: Some(shown(value)),
                    problem: "expected a table".into(),
                    fix: Some(write),
                });
                None
            }
        }
    }

    /// The entries of the array of tables `list` (from `origin`), each with its place
    /// (`list[1]`) and origins recorded; a value that is not one, or an entry that is not
    /// a table (each `entry` its noun in the fix), is a problem.
    fn entries<'v>(
        &mut self,
        list: &str,
        value: &'v Value,
        origin: String,
        entry: &str,
    ) -> Vec<(String, &'v Map<String, Value>)> {
        let ValueKind::Array(items) = &value.kind else {
            self.issues.push(ConfigIssue {
                origin,
                key: list.to_owned(),
                value: Some(shown(value)),
                problem: "expected an array of tables".into(),
                fix: Some(format!(
                    "write [[{list}]] tables in the config file (they cannot come from the environment)"
                )),
            });
            return Vec::new();
        };
        self.origins.insert(list.to_owned(), origin);
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("{list}[{}]", i + 1);
            let origin = self.places.of(item, &path);
            let write = format!("write each {entry} as a [[{list}]] table");
            if let Some(t) = self.table(&path, item, origin.clone(), write) {
                self.origins.insert(path.clone(), origin);
                out.push((path, t));
            }
        }
        out
    }

    /// `[[allow]]` or `[[deny]]` entries at `list`: their fields.
    fn rules(&mut self, list: &str, value: &Value, origin: String) {
        for (path, t) in self.entries(list, value, origin, "entry") {
            self.fields(&path, t, RULE_FIELDS);
        }
    }

    /// `[[client_policy]]` tables: their fields, their `catalog` table's keys (those of
    /// `[catalog]`) and their rule lists.
    fn client_policies(&mut self, value: &Value, origin: String) {
        use super::clients::FIELDS;
        let catalog_fields: Vec<&str> = super::settings::CatalogSettings::KEYS
            .iter()
            .map(|k| &k.name["catalog.".len()..])
            .collect();
        for (path, t) in self.entries("client_policy", value, origin, "policy") {
            let before = self.issues.len();
            for (field, v) in t {
                let key = format!("{path}.{field}");
                let origin = self.places.of(v, &key);
                match field.as_str() {
                    "allow" | "deny" => self.rules(&key, v, origin),
                    "catalog" => {
                        let write = format!(
                            "write a [{path}.catalog] table (as [client_policy.catalog] after the policy's [[client_policy]])"
                        );
                        if let Some(c) = self.table(&key, v, origin.clone(), write) {
                            self.origins.insert(key.clone(), origin);
                            self.fields(&key, c, &catalog_fields);
                        }
                    }
                    f if FIELDS.contains(&f) => {
                        self.origins.insert(key, origin);
                    }
                    _ => self.issues.push(unknown(origin, key, field, FIELDS)),
                }
            }
            // Named as every other problem of a policy is (see `clients::rekey`).
            if let Some(name) = t.get("name").and_then(|v| v.clone().into_string().ok()) {
                for issue in &mut self.issues[before..] {
                    issue.problem = format!("(policy {name}) {}", issue.problem);
                }
            }
        }
    }
}

/// Find unknown keys (with a did-you-mean) and record where each known one came from.
pub fn check_keys(
    root: &Map<String, Value>,
    places: &Origins,
    origins: &mut BTreeMap<String, String>,
    issues: &mut Vec<ConfigIssue>,
) {
    let sections: Vec<&str> = super::settings::SECTIONS
        .iter()
        .map(|(s, _)| *s)
        .chain(RULE_LISTS.iter().copied())
        .chain(["client_policy"])
        .collect();
    let mut found = Found {
        places,
        origins,
        issues,
    };
    for (name, value) in root {
        let origin = places.of(value, name);
        if RULE_LISTS.contains(&name.as_str()) {
            found.rules(name, value, origin);
            continue;
        }
        if name == "client_policy" {
            found.client_policies(value, origin);
            continue;
        }
        let Some((_, keys)) = super::settings::SECTIONS.iter().find(|(s, _)| s == name) else {
            found
                .issues
                .push(unknown(origin, name.clone(), name, &sections));
            continue;
        };
        let write = format!("write a [{name}] section");
        if let Some(table) = found.table(name, value, origin, write) {
            let fields: Vec<&str> = keys.iter().map(|k| &k.name[name.len() + 1..]).collect();
            found.fields(name, table, &fields);
        }
    }
}
