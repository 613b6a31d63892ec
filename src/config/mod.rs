//! Settings: a TOML file, then `AML_EGRESS__SECTION__KEY` environment overrides, read into
//! typed settings and checked in full before anything runs.
//!
//! `config file + env → raw values per key → Settings (typed) → checks`: [`read`] says how a
//! key is declared and reads each value into its type once, [`settings`] holds the typed
//! sections (one declaration per key), [`schema`] the whole key set (unknown keys,
//! environment lists), [`checks`] the ranges and cross-key rules. Every problem is reported with where the value
//! came from (the file or the environment variable), the key, the bad value and a fix, and
//! all problems are reported at once, so that an operator fixes a file in one pass.

pub mod checks;
pub mod clients;
pub mod compile;
pub mod origin;
pub mod read;
pub mod schema;
pub mod settings;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use config::{Config, Environment, File, FileFormat, Map, Value, ValueKind};
use ipnet::IpNet;

use crate::catalog::port_set;
use crate::policy::{Action, Matchable, PortSet, RuleSpec, Source, parse_pattern};
pub use compile::{
    Built, CertificateChoice, Change, Chosen, ClientBuilt, ClientPolicies, Compiled, PolicyKey,
    build_client_policies, build_policy, carve, compile,
};
pub use settings::{
    AdminSettings, CatalogSettings, ConnectTo, Ech, ForwardedHeaders, InspectSettings, LogFormat,
    LogLevel, LogSettings, MetricsSettings, Mode, NameServer, NamelessTls, Narrow, PolicySettings,
    PrivateRanges, ProxySettings, ReloadSettings, RuleEntry, Settings, SniMissing, TransparentDial,
    TransparentMode, TransparentSettings, UnmatchedClients, UpstreamSettings,
};

/// Load a config file (if given) and the process environment, check and compile it.
pub fn load(path: Option<&Path>) -> Result<Compiled, ConfigError> {
    compile(Settings::load(path)?)
}

/// Prefix of environment overrides: `AML_EGRESS__CATALOG__REGION=westeurope`.
pub const ENV_PREFIX: &str = "AML_EGRESS";

/// One problem in the settings: where, which key, what value, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub origin: String,
    pub key: String,
    pub value: Option<String>,
    pub problem: String,
    pub fix: Option<String>,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.key)?;
        if let Some(v) = &self.value {
            write!(f, " = {v}")?;
        }
        write!(f, ": {}", self.problem)?;
        if let Some(fix) = &self.fix {
            write!(f, "; {fix}")?;
        }
        Ok(())
    }
}

/// All problems found in one load; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for issue in &self.0 {
            write!(f, "\n  - {issue}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Settings {
    /// Read a file (if given) and the process environment, then check every key and value.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// As [`Settings::load`], with the environment given as a map (for tests and tools);
    /// `None` reads the process environment.
    pub fn load_with_env(
        path: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let file_origin = path.map_or_else(
            || "built-in defaults".to_owned(),
            |p| p.display().to_string(),
        );
        let whole = |problem: String, fix: Option<String>| {
            ConfigError(vec![ConfigIssue {
                origin: file_origin.clone(),
                key: "(file)".to_owned(),
                value: None,
                problem,
                fix,
            }])
        };
        let mut builder = Config::builder();
        let mut places = origin::Origins::none();
        if let Some(p) = path {
            if !p.is_file() {
                return Err(whole(
                    "the configuration file does not exist or is not a file".into(),
                    Some("check the path given with --config".into()),
                ));
            }
            // Read here rather than by the `config` crate, which names the file relative to
            // the current directory and keeps no lines: every message names the file as
            // given, with the line.
            let bytes = std::fs::read(p).map_err(|e| {
                whole(
                    format!("cannot read the configuration file: {e}"),
                    Some("check the file's permissions".into()),
                )
            })?;
            let text = String::from_utf8_lossy(&bytes);
            let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
            places =
                origin::Origins::parse(&file_origin, text).map_err(|i| ConfigError(vec![i]))?;
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        }
        let mut environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .ignore_empty(true);
        for key in schema::env_list_keys() {
            environment = environment.with_list_parse_key(key);
        }
        if let Some(map) = env {
            environment = environment.source(Some(map.into_iter().collect()));
        }
        let cfg = builder.add_source(environment).build().map_err(|e| {
            whole(
                e.to_string(),
                Some("fix the TOML syntax at the place named".into()),
            )
        })?;
        // `collect` keeps which values came from the environment; `places` knows the lines
        // of the others.
        let root: Map<String, Value> =
            config::Source::collect(&cfg).map_err(|e| whole(e.to_string(), None))?;

        let mut issues = Vec::new();
        let mut origins = BTreeMap::new();
        schema::check_keys(&root, &places, &mut origins, &mut issues);
        if !issues.is_empty() {
            return Err(ConfigError(issues));
        }
        let rules = (
            rule_entries(&root, "allow", &origins, &mut issues),
            rule_entries(&root, "deny", &origins, &mut issues),
        );
        let mut reader = read::Reader::new(&root, &origins);
        let mut settings = Settings::read(&mut reader, rules);
        issues.extend(reader.issues);
        settings.client_policies = clients::read(&root, &origins, &mut issues);
        settings.file = path.map(Path::to_path_buf);
        // With a CA, a path rule over TLS is enforced by inspection unless the file says
        // otherwise.
        if settings.inspect.ca_cert.is_some() && !origins.contains_key("policy.tls_path_rules") {
            settings.policy.tls_path_rules = crate::policy::TlsPathRules::Inspect;
        }
        settings.origins = origins;
        issues.extend(checks::check(&settings));
        if issues.is_empty() {
            Ok(settings)
        } else {
            Err(ConfigError(issues))
        }
    }

    /// Where a key's value came from, for messages: `file:line`, the environment variable,
    /// or for a key not given the entry or table holding it (`allow[1].ports` →
    /// `allow[1]`), else the file or the built-in defaults.
    pub fn origin_of(&self, key: &str) -> String {
        let mut k = key;
        loop {
            if let Some(o) = self.origins.get(k) {
                return o.clone();
            }
            match k.rfind(['.', '[']) {
                Some(i) => k = &k[..i],
                None => break,
            }
        }
        self.file.as_ref().map_or_else(
            || "built-in defaults".to_owned(),
            |p| p.display().to_string(),
        )
    }
}

/// The `[[allow]]` or `[[deny]]` entries as written (their fields are checked later).
fn rule_entries(
    root: &Map<String, Value>,
    list: &str,
    origins: &BTreeMap<String, String>,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<RuleEntry> {
    let Some(v) = root.get(list) else {
        return Vec::new();
    };
    let ValueKind::Array(entries) = &v.kind else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.clone().try_deserialize::<RuleEntry>() {
            Ok(entry) => out.push(entry),
            Err(err) => issues.push(ConfigIssue {
                origin: origins
                    .get(&format!("{list}[{}]", i + 1))
                    .or_else(|| origins.get(list))
                    .cloned()
                    .unwrap_or_default(),
                key: format!("{list}[{}]", i + 1),
                value: None,
                problem: err.to_string(),
                fix: Some("see README (Configuration) for the fields of a rule".into()),
            }),
        }
    }
    out
}

/// Turn one `[[allow]]`/`[[deny]]` entry into a rule, or say what is wrong with it.
pub fn operator_rule(list: &str, index: usize, e: &RuleEntry) -> Result<RuleSpec, ConfigIssue> {
    let key = format!("{list}[{}]", index + 1);
    let issue =
        |field: &str, value: Option<String>, problem: String, fix: Option<String>| ConfigIssue {
            origin: String::new(),
            key: format!("{key}.{field}"),
            value,
            problem,
            fix,
        };
    let given: Vec<&str> = [("host", &e.host), ("cidr", &e.cidr), ("regex", &e.regex)]
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(k, _)| *k)
        .collect();
    if given.len() != 1 {
        return Err(issue(
            "host",
            None,
            format!(
                "needs exactly one of host, cidr or regex (found {})",
                given.len()
            ),
            Some("split the entry into one [[allow]]/[[deny]] table per pattern".into()),
        ));
    }
    let action = if list.ends_with("deny") {
        Action::Deny
    } else {
        Action::Allow
    };
    let ports = match &e.ports {
        Some(items) if !items.is_empty() => port_set(items).map_err(|m| {
            issue(
                "ports",
                Some(format!("{items:?}")),
                m,
                Some("write ports as numbers or \"low-high\" ranges from 1 to 65535".into()),
            )
        })?,
        _ if action == Action::Deny => PortSet::any(),
        _ => {
            return Err(issue(
                "ports",
                None,
                "an allow entry needs its ports".into(),
                Some("add for example ports = [443]".into()),
            ));
        }
    };
    let what = if let Some(h) = &e.host {
        let (host, path) = parse_pattern(h)
            .map_err(|err| issue("host", Some(format!("{h:?}")), err.to_string(), None))?;
        if path.is_some() && action == Action::Deny {
            return Err(issue(
                "host",
                Some(format!("{h:?}")),
                "deny entries apply to whole hosts".into(),
                Some("remove the path".into()),
            ));
        }
        Matchable::Host(host, path)
    } else if let Some(c) = &e.cidr {
        let net = parse_cidr(c).ok_or_else(|| {
                issue(
                    "cidr",
                    Some(format!("{c:?}")),
                    "not a network".into(),
                    Some("write an address with a prefix length, for example \"10.0.0.0/8\" or \"2001:db8::/32\"".into()),
                )
            })?;
        Matchable::Cidr(net)
    } else {
        let r = e.regex.as_deref().unwrap_or_default();
        regex::Regex::new(r)
            .map_err(|err| issue("regex", Some(format!("{r:?}")), err.to_string(), None))?;
        Matchable::Regex(r.to_owned())
    };
    Ok(RuleSpec {
        action,
        what,
        ports,
        source: Source::Operator {
            list: list.to_owned(),
            index: index + 1,
            comment: e.comment.clone(),
        },
    })
}

/// A DNS server written as `ip`, `ip:port` or `[v6]:port`; port 53 when left out.
pub fn parse_name_server(s: &str) -> Option<std::net::SocketAddr> {
    s.parse()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(|ip| (ip, 53).into()))
}

/// A network written as `a.b.c.d/n`, `v6/n`, or a bare address (a host route).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// What a denial says when an optional part of the catalog that is off would allow it
/// (the proxy's 403 body and `check` alike).
pub fn optional_part_hint(part: &str) -> String {
    format!("; the optional part {part} would allow it: add \"{part}\" to catalog.features")
}
