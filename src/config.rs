//! Settings: a TOML file, then `AML_EGRESS__SECTION__KEY` environment overrides, checked
//! in full before anything runs.
//!
//! Every problem is reported with where the value came from (the file or the environment
//! variable), the key, the bad value and a fix, and all problems are reported at once, so
//! that an operator fixes a file in one pass. No runtime types live here.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Config, Environment, File, FileFormat, Map, Value, ValueKind};
use serde::Deserialize;

use ipnet::IpNet;

use crate::catalog::{Cloud, PortItem, port_set, regions};
use crate::policy::{Action, Matchable, PortSet, RuleSpec, Source, did_you_mean, parse_pattern};

/// Prefix of environment overrides: `AML_EGRESS__CATALOG__REGION=westeurope`.
pub const ENV_PREFIX: &str = "AML_EGRESS";

/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &[
    "catalog.features",
    "proxy.listen",
    "proxy.allow_clients",
    "proxy.tls_ports",
    "proxy.opaque_ports",
    "proxy.tls_listen",
    "upstream.allow_cidrs",
    "upstream.name_servers",
];

/// The `[catalog]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CatalogSettings {
    /// `public`, `usgov` or `china`.
    pub cloud: Option<String>,
    /// An embedded revision (`2021-11`, `2026-03`); the newest when unset.
    pub revision: Option<String>,
    /// Fills `<region>`.
    pub region: Option<String>,
    /// Fills `<storage>`.
    pub storage_account: Option<String>,
    /// Fills `<acr>`.
    pub container_registry: Option<String>,
    /// Optional parts by name, or `["all"]`.
    pub features: Vec<String>,
    /// A catalog file to read instead of the embedded one.
    pub file: Option<PathBuf>,
}

/// The `[policy]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PolicySettings {
    /// `widen` (default) or `deny`: what path rules do over TLS.
    pub tls_path_rules: Option<String>,
}

/// The `[proxy]` section: listeners, mode, who may connect, and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProxySettings {
    /// Addresses to listen on (`host:port`, IPv6 in brackets).
    pub listen: Vec<String>,
    /// `enforce` or `audit`.
    pub mode: String,
    /// Client networks allowed to use the proxy.
    pub allow_clients: Vec<String>,
    /// Concurrent client connections; more are answered 503 at once.
    pub max_connections: usize,
    /// Concurrent connections from one client address (IPv6 by /64); `0` means no limit.
    pub max_connections_per_client: usize,
    /// Largest request head accepted (bytes); larger heads get 431.
    pub max_header_bytes: usize,
    /// Seconds a client has to send a whole request head; slower ones get 408.
    pub header_timeout_secs: f64,
    /// Seconds of silence after which a tunnel or keep-alive connection is closed.
    pub idle_timeout_secs: f64,
    /// Seconds open tunnels and requests get to finish after SIGTERM/SIGINT.
    pub grace_period_secs: f64,
    /// Ports whose tunnels must carry a TLS ClientHello naming an allowed host.
    pub tls_ports: Vec<u16>,
    /// Ports whose tunnels are relayed without inspection, on the CONNECT's decision alone
    /// (protocols that are neither TLS nor HTTP, such as SMB on 445).
    pub opaque_ports: Vec<u16>,
    /// What a well-formed ClientHello without a server name gets: `deny` or `allow` (on the
    /// CONNECT's decision).
    pub sni_missing: String,
    /// Seconds a tunnel's client has to send its whole ClientHello (or its first bytes).
    pub sni_timeout_secs: f64,
    /// Addresses where clients reach the proxy over TLS (`curl --proxy https://...`).
    pub tls_listen: Vec<String>,
    /// PEM certificate chain for the TLS listeners.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) for the TLS listeners.
    pub tls_key: Option<PathBuf>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: vec!["127.0.0.1:3128".into()],
            mode: "enforce".into(),
            allow_clients: [
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "fc00::/7",
            ]
            .map(String::from)
            .to_vec(),
            max_connections: 4096,
            max_connections_per_client: 1024,
            max_header_bytes: 16 * 1024,
            header_timeout_secs: 10.0,
            idle_timeout_secs: 300.0,
            grace_period_secs: 30.0,
            tls_ports: vec![443],
            opaque_ports: Vec::new(),
            sni_missing: "deny".into(),
            sni_timeout_secs: 10.0,
            tls_listen: Vec::new(),
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// The `[upstream]` section: how destinations are dialled.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UpstreamSettings {
    /// `"host:port" = "addr:port"` pins, like curl's `--connect-to`.
    pub connect_to: BTreeMap<String, String>,
    /// Networks the address guard lets through (loopback, link-local, ...).
    pub allow_cidrs: Vec<String>,
    /// Seconds per connection attempt.
    pub dial_timeout_secs: f64,
    /// `allow_matched` (private ranges only for names that matched the allowlist) or `deny`.
    pub private_ranges: String,
    /// DNS servers (`ip` or `ip:port`); empty means those of `/etc/resolv.conf`.
    pub name_servers: Vec<String>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        UpstreamSettings {
            connect_to: BTreeMap::new(),
            allow_cidrs: Vec::new(),
            dial_timeout_secs: 10.0,
            private_ranges: "allow_matched".into(),
            name_servers: Vec::new(),
        }
    }
}

/// The `[admin]` section: the listener for metrics, health and the denied list.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AdminSettings {
    /// `host:port`, or empty to serve no admin endpoints.
    pub listen: String,
    /// A file holding the bearer token; required when `listen` is not a loopback address.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:9464".into(),
            token_file: None,
        }
    }
}

/// The `[metrics]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MetricsSettings {
    /// Distinct denied `host:port` pairs with their own series (and in `/denied`).
    pub max_denied_targets: usize,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            max_denied_targets: 1000,
        }
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// `error`, `warn`, `info`, `debug` or `trace` (`AML_EGRESS_LOG` takes precedence).
    pub level: String,
    /// `json` (one object per line) or `text`.
    pub format: String,
    /// Denial lines per target (`host:port`) per minute; more are counted, not written.
    pub denied_lines_per_minute: u32,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: "json".into(),
            denied_lines_per_minute: 10,
        }
    }
}

/// The `[reload]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ReloadSettings {
    /// Seconds between looks at the config file (and the files it names); 0 turns the
    /// watch off (SIGHUP still reloads).
    pub watch_interval_secs: f64,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        ReloadSettings {
            watch_interval_secs: 2.0,
        }
    }
}

/// One `[[allow]]` or `[[deny]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RuleEntry {
    pub host: Option<String>,
    pub cidr: Option<String>,
    pub regex: Option<String>,
    pub ports: Option<Vec<PortItem>>,
    pub comment: Option<String>,
}

/// Everything read from the file and the environment, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub catalog: CatalogSettings,
    pub policy: PolicySettings,
    pub proxy: ProxySettings,
    pub upstream: UpstreamSettings,
    pub admin: AdminSettings,
    pub metrics: MetricsSettings,
    pub log: LogSettings,
    pub reload: ReloadSettings,
    pub allow: Vec<RuleEntry>,
    pub deny: Vec<RuleEntry>,
    /// The file the settings came from, if any.
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// Where each leaf value came from (`catalog.region` → file path or variable name).
    #[serde(skip)]
    pub origins: BTreeMap<String, String>,
}

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

/// The shape of the settings tree, for unknown-key detection with suggestions.
enum Shape {
    Leaf,
    /// A table whose keys are free (for example `connect_to`).
    Map,
    Table(&'static [(&'static str, Shape)]),
    TableArray(&'static [(&'static str, Shape)]),
}

const RULE_KEYS: &[(&str, Shape)] = &[
    ("host", Shape::Leaf),
    ("cidr", Shape::Leaf),
    ("regex", Shape::Leaf),
    ("ports", Shape::Leaf),
    ("comment", Shape::Leaf),
];

const SCHEMA: &[(&str, Shape)] = &[
    (
        "catalog",
        Shape::Table(&[
            ("cloud", Shape::Leaf),
            ("revision", Shape::Leaf),
            ("region", Shape::Leaf),
            ("storage_account", Shape::Leaf),
            ("container_registry", Shape::Leaf),
            ("features", Shape::Leaf),
            ("file", Shape::Leaf),
        ]),
    ),
    ("policy", Shape::Table(&[("tls_path_rules", Shape::Leaf)])),
    (
        "proxy",
        Shape::Table(&[
            ("listen", Shape::Leaf),
            ("mode", Shape::Leaf),
            ("allow_clients", Shape::Leaf),
            ("max_connections", Shape::Leaf),
            ("max_connections_per_client", Shape::Leaf),
            ("max_header_bytes", Shape::Leaf),
            ("header_timeout_secs", Shape::Leaf),
            ("idle_timeout_secs", Shape::Leaf),
            ("grace_period_secs", Shape::Leaf),
            ("tls_ports", Shape::Leaf),
            ("opaque_ports", Shape::Leaf),
            ("sni_missing", Shape::Leaf),
            ("sni_timeout_secs", Shape::Leaf),
            ("tls_listen", Shape::Leaf),
            ("tls_cert", Shape::Leaf),
            ("tls_key", Shape::Leaf),
        ]),
    ),
    (
        "upstream",
        Shape::Table(&[
            ("connect_to", Shape::Map),
            ("allow_cidrs", Shape::Leaf),
            ("dial_timeout_secs", Shape::Leaf),
            ("private_ranges", Shape::Leaf),
            ("name_servers", Shape::Leaf),
        ]),
    ),
    (
        "admin",
        Shape::Table(&[("listen", Shape::Leaf), ("token_file", Shape::Leaf)]),
    ),
    (
        "metrics",
        Shape::Table(&[("max_denied_targets", Shape::Leaf)]),
    ),
    (
        "log",
        Shape::Table(&[
            ("level", Shape::Leaf),
            ("format", Shape::Leaf),
            ("denied_lines_per_minute", Shape::Leaf),
        ]),
    ),
    (
        "reload",
        Shape::Table(&[("watch_interval_secs", Shape::Leaf)]),
    ),
    ("allow", Shape::TableArray(RULE_KEYS)),
    ("deny", Shape::TableArray(RULE_KEYS)),
];

fn describe_origin(origin: Option<&str>, key: &str) -> String {
    match origin {
        Some("the environment") => format!(
            "environment variable {ENV_PREFIX}__{}",
            key.to_ascii_uppercase().replace('.', "__")
        ),
        Some(o) => o.to_owned(),
        None => "built-in defaults".to_owned(),
    }
}

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
        if let Some(p) = path {
            if !p.is_file() {
                return Err(whole(
                    "the configuration file does not exist or is not a file".into(),
                    Some("check the path given with --config".into()),
                ));
            }
            builder = builder.add_source(File::from(p).format(FileFormat::Toml).required(true));
        }
        let mut environment = Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .ignore_empty(true);
        for key in ENV_LIST_KEYS {
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
        // `collect` keeps each value's origin (file path or environment), which
        // deserialising would drop.
        let root: Map<String, Value> =
            config::Source::collect(&cfg).map_err(|e| whole(e.to_string(), None))?;

        let mut issues = Vec::new();
        let mut origins = BTreeMap::new();
        check_keys(&root, SCHEMA, "", &mut origins, &mut issues);
        if !issues.is_empty() {
            return Err(ConfigError(issues));
        }
        let mut settings: Settings = cfg.try_deserialize().map_err(|e| {
            whole(
                e.to_string(),
                Some("see README (Configuration) for the type of each key".into()),
            )
        })?;
        settings.file = path.map(Path::to_path_buf);
        settings.origins = origins;
        settings.validate()?;
        Ok(settings)
    }

    /// Where a key's value came from, for messages.
    pub fn origin_of(&self, key: &str) -> String {
        self.origins.get(key).cloned().unwrap_or_else(|| {
            self.file.as_ref().map_or_else(
                || "built-in defaults".to_owned(),
                |p| p.display().to_string(),
            )
        })
    }

    fn issue(
        &self,
        key: &str,
        value: impl fmt::Display,
        problem: impl Into<String>,
        fix: Option<String>,
    ) -> ConfigIssue {
        ConfigIssue {
            origin: self.origin_of(key),
            key: key.to_owned(),
            value: Some(value.to_string()),
            problem: problem.into(),
            fix,
        }
    }

    /// The configured cloud (public when unset); valid after [`Settings::load`].
    pub fn cloud(&self) -> Cloud {
        self.catalog
            .cloud
            .as_deref()
            .and_then(Cloud::from_name)
            .unwrap_or_default()
    }

    /// Value checks that need no catalog; catalog-dependent checks (features, revision of
    /// a catalog file) happen when the policy is built.
    fn validate(&mut self) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        let c = &mut self.catalog;
        if let Some(cloud) = &c.cloud {
            let lower = cloud.to_ascii_lowercase();
            if Cloud::from_name(&lower).is_none() {
                let names = Cloud::ALL.map(Cloud::name);
                issues.push((
                    "catalog.cloud",
                    format!("{cloud:?}"),
                    "not a cloud this catalog covers".to_owned(),
                    Some(format!("use one of {}", names.join(", "))),
                ));
            }
            c.cloud = Some(lower);
        }
        let cloud = c
            .cloud
            .as_deref()
            .and_then(Cloud::from_name)
            .unwrap_or_default();
        if let Some(region) = &c.region {
            let lower = region.to_ascii_lowercase().replace([' ', '-'], "");
            let known = regions(cloud);
            if !known.contains(&lower) {
                let near = did_you_mean(&lower, known.iter().map(String::as_str));
                let fix = if near.is_empty() {
                    format!(
                        "use the programmatic name of an Azure {} region (for example {})",
                        cloud,
                        known.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
                    )
                } else {
                    format!("did you mean {}?", near.join(" or "))
                };
                issues.push((
                    "catalog.region",
                    format!("{region:?}"),
                    format!("not an Azure region of the {cloud} cloud"),
                    Some(fix),
                ));
            }
            c.region = Some(lower);
        }
        if let Some(sa) = &c.storage_account {
            let ok = (3..=24).contains(&sa.len())
                && sa
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if !ok {
                issues.push((
                    "catalog.storage_account",
                    format!("{sa:?}"),
                    "not a storage account name".to_owned(),
                    Some("use the account name only (3 to 24 lower-case letters and digits), not a URL".into()),
                ));
            }
        }
        if let Some(acr) = &c.container_registry {
            let ok =
                (5..=50).contains(&acr.len()) && acr.bytes().all(|b| b.is_ascii_alphanumeric());
            if !ok {
                issues.push((
                    "catalog.container_registry",
                    format!("{acr:?}"),
                    "not a container registry name".to_owned(),
                    Some("use the registry name only (5 to 50 letters and digits), without .azurecr.io".into()),
                ));
            }
            c.container_registry = Some(acr.to_ascii_lowercase());
        }
        if let Some(mode) = &self.policy.tls_path_rules
            && mode != "widen"
            && mode != "deny"
        {
            issues.push((
                "policy.tls_path_rules",
                format!("{mode:?}"),
                "not a known setting".to_owned(),
                Some("use \"widen\" (allow the whole host over TLS) or \"deny\"".into()),
            ));
        }
        self.validate_proxy(&mut issues);
        self.validate_operations(&mut issues);
        let mut out: Vec<ConfigIssue> = issues
            .into_iter()
            .map(|(k, v, p, f)| self.issue(k, v, p, f))
            .collect();
        for (list, entries) in [("allow", &self.allow), ("deny", &self.deny)] {
            for (i, e) in entries.iter().enumerate() {
                if let Err(issue) = operator_rule(list, i, e) {
                    out.push(ConfigIssue {
                        origin: self.origin_of(list),
                        ..issue
                    });
                }
            }
        }
        if out.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(out))
        }
    }
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
    let action = if list == "deny" {
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

type Problem = (&'static str, String, String, Option<String>);

impl Settings {
    fn validate_proxy(&self, issues: &mut Vec<Problem>) {
        let p = &self.proxy;
        if p.listen.is_empty() && p.tls_listen.is_empty() {
            issues.push((
                "proxy.listen",
                "[]".into(),
                "no listener".into(),
                Some("give at least one address, for example \"127.0.0.1:3128\"".into()),
            ));
        }
        for (key, list) in [
            ("proxy.listen", &p.listen),
            ("proxy.tls_listen", &p.tls_listen),
        ] {
            for l in list {
                if l.parse::<std::net::SocketAddr>().is_err() {
                    issues.push((
                        key,
                        format!("{l:?}"),
                        "not an address:port".into(),
                        Some("write for example \"0.0.0.0:3128\" or \"[::]:3128\"".into()),
                    ));
                }
            }
        }
        if !p.tls_listen.is_empty() {
            for (key, file) in [
                ("proxy.tls_cert", &p.tls_cert),
                ("proxy.tls_key", &p.tls_key),
            ] {
                match file {
                    None => issues.push((
                        key,
                        "(unset)".into(),
                        "proxy.tls_listen needs a certificate and a key".into(),
                        Some("give the path of a PEM file".into()),
                    )),
                    Some(f) if !f.is_file() => issues.push((
                        key,
                        format!("{:?}", f.display().to_string()),
                        "the file does not exist or is not a file".into(),
                        Some("give the path of a readable PEM file".into()),
                    )),
                    Some(_) => {}
                }
            }
        }
        for ns in &self.upstream.name_servers {
            if parse_name_server(ns).is_none() {
                issues.push((
                    "upstream.name_servers",
                    format!("{ns:?}"),
                    "not a name server address".into(),
                    Some("write an address, optionally with a port: \"10.0.0.2\" or \"127.0.0.1:5353\"".into()),
                ));
            }
        }
        if p.mode != "enforce" && p.mode != "audit" {
            issues.push((
                "proxy.mode",
                format!("{:?}", p.mode),
                "not a mode".into(),
                Some("use \"enforce\" or \"audit\"".into()),
            ));
        }
        if p.sni_missing != "allow" && p.sni_missing != "deny" {
            issues.push((
                "proxy.sni_missing",
                format!("{:?}", p.sni_missing),
                "not a setting".into(),
                Some("use \"allow\" or \"deny\"".into()),
            ));
        }
        for (key, list) in [
            ("proxy.allow_clients", &p.allow_clients),
            ("upstream.allow_cidrs", &self.upstream.allow_cidrs),
        ] {
            for c in list {
                if parse_cidr(c).is_none() {
                    issues.push((
                        key,
                        format!("{c:?}"),
                        "not a network".into(),
                        Some(
                            "write an address with a prefix length, for example \"10.0.0.0/8\""
                                .into(),
                        ),
                    ));
                }
            }
        }
        if !(1..=1_000_000).contains(&p.max_connections) {
            issues.push((
                "proxy.max_connections",
                p.max_connections.to_string(),
                "out of range".into(),
                Some("use 1 to 1000000 (each connection needs a few file descriptors)".into()),
            ));
        }
        if !(8192..=1 << 20).contains(&p.max_header_bytes) {
            issues.push((
                "proxy.max_header_bytes",
                p.max_header_bytes.to_string(),
                "out of range".into(),
                Some("use 8192 to 1048576".into()),
            ));
        }
        for (key, v) in [
            ("proxy.header_timeout_secs", p.header_timeout_secs),
            ("proxy.idle_timeout_secs", p.idle_timeout_secs),
            ("proxy.grace_period_secs", p.grace_period_secs),
            ("proxy.sni_timeout_secs", p.sni_timeout_secs),
            (
                "upstream.dial_timeout_secs",
                self.upstream.dial_timeout_secs,
            ),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                issues.push((
                    key,
                    v.to_string(),
                    "not a duration".into(),
                    Some("use seconds from more than 0 to 86400".into()),
                ));
            }
        }
        for (key, ports) in [
            ("proxy.tls_ports", &p.tls_ports),
            ("proxy.opaque_ports", &p.opaque_ports),
        ] {
            if ports.contains(&0) {
                issues.push((
                    key,
                    "0".into(),
                    "port 0".into(),
                    Some("use ports from 1 to 65535".into()),
                ));
            }
        }
        for port in p.opaque_ports.iter().filter(|o| p.tls_ports.contains(o)) {
            issues.push((
                "proxy.opaque_ports",
                port.to_string(),
                "also in proxy.tls_ports: a tunnel cannot be both inspected and not".into(),
                Some(format!(
                    "remove {port} from one of the two lists (TLS tunnels on it are checked only while it is in proxy.tls_ports)"
                )),
            ));
        }
        if p.max_connections_per_client > 1_000_000 {
            issues.push((
                "proxy.max_connections_per_client",
                p.max_connections_per_client.to_string(),
                "out of range".into(),
                Some("use 0 (no limit) to 1000000".into()),
            ));
        }
        let u = &self.upstream;
        if u.private_ranges != "allow_matched" && u.private_ranges != "deny" {
            issues.push((
                "upstream.private_ranges",
                format!("{:?}", u.private_ranges),
                "not a setting".into(),
                Some("use \"allow_matched\" or \"deny\"".into()),
            ));
        }
        for (from, to) in &u.connect_to {
            let from_ok = crate::policy::Target::parse(from).is_ok();
            let to_ok = to.parse::<std::net::SocketAddr>().is_ok();
            if !from_ok || !to_ok {
                issues.push((
                    "upstream.connect_to",
                    format!("{from:?} = {to:?}"),
                    "not a \"host:port\" = \"address:port\" pair".into(),
                    Some(
                        "write for example \"login.microsoftonline.com:443\" = \"127.0.0.1:18443\""
                            .into(),
                    ),
                ));
            }
        }
    }
}

impl Settings {
    fn validate_operations(&self, issues: &mut Vec<Problem>) {
        let a = &self.admin;
        if !a.listen.is_empty() {
            match a.listen.parse::<std::net::SocketAddr>() {
                Err(_) => issues.push((
                    "admin.listen",
                    format!("{:?}", a.listen),
                    "not an address:port".into(),
                    Some(
                        "write for example \"127.0.0.1:9464\", or \"\" for no admin listener"
                            .into(),
                    ),
                )),
                Ok(addr) if !addr.ip().is_loopback() && a.token_file.is_none() => issues.push((
                    "admin.listen",
                    format!("{:?}", a.listen),
                    "an admin listener off loopback needs a bearer token".into(),
                    Some(
                        "set admin.token_file to a file holding the token, or listen on 127.0.0.1"
                            .into(),
                    ),
                )),
                Ok(_) => {}
            }
        }
        if let Some(f) = &a.token_file {
            let token = std::fs::read_to_string(f).unwrap_or_default();
            if token.trim().len() < 16 {
                issues.push((
                    "admin.token_file",
                    format!("{:?}", f.display().to_string()),
                    "missing, unreadable, or holding a token shorter than 16 characters".into(),
                    Some("write a long random token into the file, for example with `openssl rand -hex 32`".into()),
                ));
            }
        }
        if self.metrics.max_denied_targets == 0 || self.metrics.max_denied_targets > 100_000 {
            issues.push((
                "metrics.max_denied_targets",
                self.metrics.max_denied_targets.to_string(),
                "out of range".into(),
                Some("use 1 to 100000 (each is one series per scrape)".into()),
            ));
        }
        let l = &self.log;
        if !["error", "warn", "info", "debug", "trace"].contains(&l.level.as_str()) {
            issues.push((
                "log.level",
                format!("{:?}", l.level),
                "not a level".into(),
                Some("use error, warn, info, debug or trace".into()),
            ));
        }
        if l.format != "json" && l.format != "text" {
            issues.push((
                "log.format",
                format!("{:?}", l.format),
                "not a format".into(),
                Some("use \"json\" or \"text\"".into()),
            ));
        }
        let w = self.reload.watch_interval_secs;
        if !(w.is_finite() && (0.0..=3600.0).contains(&w)) {
            issues.push((
                "reload.watch_interval_secs",
                w.to_string(),
                "not a duration".into(),
                Some("use seconds from 0 (no watch) to 3600".into()),
            ));
        }
    }
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

fn check_keys(
    table: &Map<String, Value>,
    schema: &'static [(&'static str, Shape)],
    prefix: &str,
    origins: &mut BTreeMap<String, String>,
    issues: &mut Vec<ConfigIssue>,
) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        let origin = describe_origin(value.origin(), &path);
        let Some((_, shape)) = schema.iter().find(|(k, _)| k == key) else {
            let near = did_you_mean(key, schema.iter().map(|(k, _)| *k));
            let fix = if near.is_empty() {
                let keys: Vec<&str> = schema.iter().map(|(k, _)| *k).collect();
                format!("known keys here: {}", keys.join(", "))
            } else {
                format!("did you mean {}?", near.join(" or "))
            };
            issues.push(ConfigIssue {
                origin,
                key: path,
                value: None,
                problem: "unknown key".into(),
                fix: Some(fix),
            });
            continue;
        };
        match (shape, &value.kind) {
            (Shape::Leaf, _) | (Shape::Map, ValueKind::Table(_)) => {
                origins.insert(path, origin);
            }
            (Shape::Table(inner), ValueKind::Table(t)) => check_keys(t, inner, &path, origins, issues),
            (Shape::TableArray(inner), ValueKind::Array(items)) => {
                origins.insert(path.clone(), origin.clone());
                for (i, item) in items.iter().enumerate() {
                    match &item.kind {
                        ValueKind::Table(t) => {
                            check_keys(t, inner, &format!("{path}[{}]", i + 1), origins, issues)
                        }
                        _ => issues.push(ConfigIssue {
                            origin: origin.clone(),
                            key: format!("{path}[{}]", i + 1),
                            value: Some(item.to_string()),
                            problem: "expected a table".into(),
                            fix: Some(format!("write each entry as a [[{path}]] table")),
                        }),
                    }
                }
            }
            (Shape::TableArray(_), _) => issues.push(ConfigIssue {
                origin,
                key: path.clone(),
                value: Some(value.to_string()),
                problem: "expected an array of tables".into(),
                fix: Some(format!(
                    "write [[{path}]] tables in the config file (they cannot come from the environment)"
                )),
            }),
            (Shape::Table(_) | Shape::Map, _) => issues.push(ConfigIssue {
                origin,
                key: path.clone(),
                value: Some(value.to_string()),
                problem: "expected a table".into(),
                fix: Some(format!("write a [{path}] section")),
            }),
        }
    }
}
