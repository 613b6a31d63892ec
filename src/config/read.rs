//! How one key is declared (its name, environment form and reload behaviour) and how a
//! raw value is read into its type: the building blocks `settings` declares its
//! sections with, below both it and `schema`.
//!
//! Values are read from the raw tree the `config` crate collected (file, then environment),
//! each parsed into its type once, every problem collected with its origin.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use config::{Map, Value, ValueKind};
use ipnet::IpNet;

use super::ConfigIssue;

/// How a key is given in the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    /// `AML_EGRESS__PROXY__MODE=audit`.
    Scalar,
    /// Comma-separated: `AML_EGRESS__PROXY__LISTEN=0.0.0.0:3128,[::]:3128`.
    List,
    /// A table: only in the file.
    FileOnly,
}

/// What a reload does with a changed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// The new value takes effect for new connections and requests.
    Live,
    /// The running value stays until a restart (a warning says so).
    Restart,
}

/// One configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// `section.field`.
    pub name: &'static str,
    pub env: Env,
    pub reload: Reload,
}

/// Why a value could not be read as its key's type.
#[derive(Debug)]
pub struct Bad {
    pub problem: String,
    pub fix: Option<String>,
}

impl Bad {
    /// A problem with the fix an operator should apply.
    pub fn new(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Bad {
            problem: problem.into(),
            fix: Some(fix.into()),
        }
    }
}

/// A type a key's value is parsed into, once, at load.
pub trait Setting: Sized {
    /// The value as this type, or why it is not one.
    fn from_value(v: &Value) -> Result<Self, Bad>;
}

/// Reads typed values out of the collected tree, keeping every problem.
pub struct Reader<'a> {
    root: &'a Map<String, Value>,
    origins: &'a BTreeMap<String, String>,
    pub issues: Vec<ConfigIssue>,
}

impl<'a> Reader<'a> {
    /// A reader of the collected tree `root`, naming each problem by `origins` (key →
    /// where its value came from).
    pub fn new(root: &'a Map<String, Value>, origins: &'a BTreeMap<String, String>) -> Self {
        Reader {
            root,
            origins,
            issues: Vec::new(),
        }
    }

    fn lookup(&self, key: &str) -> Option<&'a Value> {
        let mut table = self.root;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            let v = table.get(part)?;
            if parts.peek().is_none() {
                return Some(v);
            }
            match &v.kind {
                ValueKind::Table(t) => table = t,
                _ => return None,
            }
        }
        None
    }

    /// The value of `key` as `T`, or `default` when it is not given (or is wrong, which is
    /// recorded).
    pub fn read<T: Setting>(&mut self, key: &str, default: T) -> T {
        let Some(v) = self.lookup(key) else {
            return default;
        };
        if matches!(v.kind, ValueKind::Nil) {
            return default;
        }
        match T::from_value(v) {
            Ok(t) => t,
            Err(bad) => {
                self.issues.push(ConfigIssue {
                    origin: self.origins.get(key).cloned().unwrap_or_default(),
                    key: key.to_owned(),
                    value: Some(shown(v)),
                    problem: bad.problem,
                    fix: bad.fix,
                });
                default
            }
        }
    }
}

/// A raw value as an operator wrote it: strings quoted, lists bracketed.
pub fn shown(v: &Value) -> String {
    match &v.kind {
        ValueKind::String(s) => format!("{s:?}"),
        ValueKind::Array(items) => {
            let inner: Vec<String> = items.iter().map(shown).collect();
            format!("[{}]", inner.join(", "))
        }
        _ => v.to_string(),
    }
}

fn text(v: &Value) -> Result<String, Bad> {
    match &v.kind {
        ValueKind::String(s) => Ok(s.clone()),
        ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::Float(_) | ValueKind::Boolean(_) => {
            Ok(v.to_string())
        }
        _ => Err(Bad::new("expected a string", "write the value in quotes")),
    }
}

/// The items of a list; a single value counts as a list of one.
pub fn items(v: &Value) -> Vec<&Value> {
    match &v.kind {
        ValueKind::Array(items) => items.iter().collect(),
        _ => vec![v],
    }
}

impl Setting for bool {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        match &v.kind {
            ValueKind::Boolean(b) => Ok(*b),
            ValueKind::String(s) if s == "true" || s == "false" => Ok(s == "true"),
            _ => Err(Bad::new(
                "not true or false",
                "write true or false without quotes",
            )),
        }
    }
}

impl Setting for String {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        text(v)
    }
}

impl<T: Setting> Setting for Option<T> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        T::from_value(v).map(Some)
    }
}

impl Setting for PathBuf {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        text(v).map(PathBuf::from)
    }
}

impl Setting for Vec<PathBuf> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        items(v)
            .into_iter()
            .map(|i| text(i).map(PathBuf::from))
            .collect()
    }
}

impl Setting for Vec<String> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        items(v).into_iter().map(text).collect()
    }
}

fn whole_number(v: &Value) -> Result<u64, Bad> {
    let bad = || {
        Bad::new(
            "not a whole number",
            "write a number without quotes or a fraction",
        )
    };
    match &v.kind {
        ValueKind::I64(n) => u64::try_from(*n).map_err(|_| bad()),
        ValueKind::U64(n) => Ok(*n),
        ValueKind::String(s) => s.trim().parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

impl Setting for usize {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        usize::try_from(whole_number(v)?).map_err(|_| Bad::new("too large", "use a smaller number"))
    }
}

impl Setting for u32 {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        u32::try_from(whole_number(v)?).map_err(|_| Bad::new("too large", "use a smaller number"))
    }
}

/// Durations are written in seconds, whole or fractional.
impl Setting for Duration {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        let bad = || {
            Bad::new(
                "not a duration",
                "write seconds as a number, for example 10 or 0.5",
            )
        };
        let secs = match &v.kind {
            ValueKind::I64(n) => *n as f64,
            ValueKind::U64(n) => *n as f64,
            ValueKind::Float(f) => *f,
            ValueKind::String(s) => s.trim().parse().map_err(|_| bad())?,
            _ => return Err(bad()),
        };
        // Bounded before converting: `from_secs_f64` panics past its range.
        if !(secs.is_finite() && (0.0..=1e9).contains(&secs)) {
            return Err(bad());
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

/// Ports: whole numbers from 0 (refused by the checks with a clearer message) to 65535.
impl Setting for Vec<u16> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        items(v)
            .into_iter()
            .map(|item| {
                let n = whole_number(item)?;
                u16::try_from(n).map_err(|_| Bad::new("not a port", "use ports from 1 to 65535"))
            })
            .collect()
    }
}

impl Setting for Vec<SocketAddr> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        items(v)
            .into_iter()
            .map(|item| {
                text(item)?.parse().map_err(|_| {
                    Bad::new(
                        format!("{} is not an address:port", shown(item)),
                        "write for example \"0.0.0.0:3128\" or \"[::]:3128\"",
                    )
                })
            })
            .collect()
    }
}

impl Setting for Vec<IpNet> {
    fn from_value(v: &Value) -> Result<Self, Bad> {
        items(v)
            .into_iter()
            .map(|item| {
                super::parse_cidr(&text(item)?).ok_or_else(|| {
                    Bad::new(
                        format!("{} is not a network", shown(item)),
                        "write an address with a prefix length, for example \"10.0.0.0/8\"",
                    )
                })
            })
            .collect()
    }
}
