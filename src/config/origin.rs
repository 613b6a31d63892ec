//! Where a value came from, as messages name it: the configuration file as the user gave it
//! (never rewritten relative to the current directory) with the line of the key, or the
//! environment variable. The `config` crate keeps neither lines nor, for tables, any origin,
//! so the lines come from the TOML's own spans.

use std::collections::BTreeMap;

use config::{Value, ValueKind};
use toml::de::{DeTable, DeValue};

use super::{ConfigIssue, ENV_PREFIX};

/// What the `config` crate records as the origin of an environment override.
const ENVIRONMENT: &str = "the environment";

/// The file of one load and the line of every key in it.
#[derive(Debug, Default)]
pub struct Origins {
    /// The file as given (`--config`), if any.
    file: Option<String>,
    /// `proxy.mode`, `proxy`, `allow[2]`, `allow[2].host` → 1-based line of the key.
    lines: BTreeMap<String, usize>,
}

impl Origins {
    /// Origins for a load without a file (the environment over the built-in defaults).
    pub fn none() -> Self {
        Origins::default()
    }

    /// Parse the TOML `text` of `file` (named as the user gave it) for the line of each key.
    ///
    /// # Errors
    /// The first syntax error, as a problem of the file naming its line.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigIssue> {
        let doc = DeTable::parse(text).map_err(|e| ConfigIssue {
            origin: match e.span() {
                Some(span) => format!("{file}:{}", LineStarts::of(text).line(span.start)),
                None => file.to_owned(),
            },
            key: "(file)".to_owned(),
            value: None,
            problem: e.to_string().trim_end().to_owned(),
            fix: Some("fix the TOML syntax at the place named".into()),
        })?;
        let mut lines = BTreeMap::new();
        record(&LineStarts::of(text), "", doc.get_ref(), &mut lines);
        Ok(Origins {
            file: Some(file.to_owned()),
            lines,
        })
    }

    /// Where `value`, found at the key path `key` (`proxy.mode`, `allow[1].host`), came
    /// from: `file:line`, `environment variable AML_EGRESS__...`, or for a table the origin
    /// of its first value; the file alone, or `built-in defaults`, when nothing says more.
    pub fn of(&self, value: &Value, key: &str) -> String {
        if value.origin() == Some(ENVIRONMENT) {
            return environment_variable(key);
        }
        if let Some(line) = self.lines.get(key) {
            return format!("{}:{line}", self.file.as_deref().unwrap_or_default());
        }
        // Tables the `config` crate builds while merging carry no origin; their values do.
        if let ValueKind::Table(t) = &value.kind
            && let Some((field, v)) = t.iter().next()
        {
            return self.of(v, &format!("{key}.{field}"));
        }
        self.fallback()
    }

    /// The origin of a value nothing more is known about: the file, or the defaults.
    pub fn fallback(&self) -> String {
        self.file
            .clone()
            .unwrap_or_else(|| "built-in defaults".to_owned())
    }
}

/// `environment variable AML_EGRESS__PROXY__MODE` for `proxy.mode`.
fn environment_variable(key: &str) -> String {
    format!(
        "environment variable {ENV_PREFIX}__{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

/// Where each line of a text starts, so that finding a key's line is a binary search
/// (counting newlines from the start for every key made a file of many client policies
/// quadratic to load).
struct LineStarts(Vec<usize>);

impl LineStarts {
    fn of(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(
                text.bytes()
                    .enumerate()
                    .filter(|(_, b)| *b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        LineStarts(starts)
    }

    /// The 1-based line holding byte `at`.
    fn line(&self, at: usize) -> usize {
        self.0.partition_point(|&start| start <= at)
    }
}

/// Record the line of every key of `table` (at `prefix`) and, inside arrays of tables, of
/// every entry (`allow[1]`, at its first key).
fn record(
    text: &LineStarts,
    prefix: &str,
    table: &DeTable<'_>,
    lines: &mut BTreeMap<String, usize>,
) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        lines.insert(path.clone(), text.line(k.span().start));
        match v.get_ref() {
            DeValue::Table(t) => record(text, &path, t, lines),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(t) = item.get_ref() {
                        let entry = format!("{path}[{}]", i + 1);
                        let first = t.keys().map(|k| k.span().start).min();
                        let at = first.unwrap_or(item.span().start);
                        lines.insert(entry.clone(), text.line(at));
                        record(text, &entry, t, lines);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_gets_its_line() {
        let text = "[proxy]\nmode = \"x\"\nfoo = { a = 1 }\n\n[inspect]\nb = 2\n[[allow]]\nhost = \"a\"\nports = [443]\n[[allow]]\n\nports = [80]\n";
        let o = Origins::parse("c.toml", text).unwrap();
        let at = |k: &str| o.lines.get(k).copied();
        assert_eq!(at("proxy"), Some(1));
        assert_eq!(at("proxy.mode"), Some(2));
        assert_eq!(at("proxy.foo"), Some(3));
        assert_eq!(at("proxy.foo.a"), Some(3));
        assert_eq!(at("inspect"), Some(5));
        assert_eq!(at("inspect.b"), Some(6));
        assert_eq!(at("allow[1]"), Some(8));
        assert_eq!(at("allow[1].ports"), Some(9));
        assert_eq!(at("allow[2]"), Some(12));
    }

    #[test]
    fn a_syntax_error_names_the_file_as_given_and_its_line() {
        let e = Origins::parse("/a/b.toml", "[proxy]\nmode = \n").unwrap_err();
        assert_eq!(e.origin, "/a/b.toml:2", "{e}");
    }
}
