//! `aml-egress catalog`: the rendered rule set that will be enforced, each rule with its
//! source; `--features` the optional parts; `catalog diff` what changes between two
//! catalogs.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use super::{EXIT_OK, EXIT_USAGE, exit_code, load};
use crate::catalog::{Catalog, REVISIONS, ReferenceEntry};
use crate::config::{Built, Settings};
use crate::policy::Source;

/// The arguments of `catalog`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// List the optional parts (features) instead, marking those switched on.
    #[arg(long)]
    pub features: bool,
    /// Show this policy's rule set: `default`, or a [[client_policy]]'s name.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
    #[command(subcommand)]
    pub action: Option<Action>,
}

/// How `catalog` prints the rule set.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// How `catalog diff` prints the differences.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DiffFormat {
    Text,
    Json,
}

/// The subcommands of `catalog`.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// What changes from catalog A to catalog B (revisions such as 2021-11 and 2026-03, or
    /// catalog files) for the configured cloud, features and placeholders.
    Diff {
        a: String,
        b: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: DiffFormat,
        /// For this policy's cloud, parts and placeholders: `default`, or a
        /// [[client_policy]]'s name.
        #[arg(long, value_name = "NAME")]
        policy: Option<String>,
    },
}

/// `catalog`: 0 after printing, 2 on a configuration error; `catalog diff`: 0 when the two
/// catalogs enforce the same, 1 when they differ, 2 on an error.
pub fn run(args: Args) -> i32 {
    exit_code(catalog(args))
}

fn catalog(args: Args) -> anyhow::Result<i32> {
    let mut out = io::stdout().lock();
    if let Some(Action::Diff {
        a,
        b,
        config,
        format,
        policy,
    }) = args.action
    {
        let config = config.or(args.config);
        let policy = policy.or(args.policy);
        let code = diff(
            &a,
            &b,
            config.as_deref(),
            policy.as_deref(),
            format,
            &mut out,
        )?;
        out.flush()?;
        return Ok(code);
    }
    let compiled = match load("catalog", args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let chosen = match &args.policy {
        Some(name) => match super::named_policy("catalog", &compiled.clients, name) {
            Ok(c) => c,
            Err(code) => return Ok(code),
        },
        None => crate::config::Chosen::Default,
    };
    let built = super::chosen_built(&compiled, chosen);
    if args.features {
        print_features(built, &mut out)?;
    } else {
        print_catalog(built, matches!(args.format, Format::Json), &mut out)?;
        for w in &built.warnings {
            eprintln!("warning: {w}");
        }
    }
    out.flush()?;
    Ok(EXIT_OK)
}

/// Load a catalog named by revision or by file.
fn load_catalog(name: &str) -> Result<Catalog, String> {
    if let Some(c) = Catalog::embedded(name) {
        return Ok(c);
    }
    let text = std::fs::read_to_string(name).map_err(|e| {
        let known: Vec<&str> = REVISIONS.iter().map(|(r, _)| *r).collect();
        format!(
            "{name}: neither a built-in revision ({}) nor a readable catalog file: {e}",
            known.join(", ")
        )
    })?;
    Catalog::from_toml(&text, name).map_err(|e| format!("{name}: {e}"))
}

/// `aml-egress catalog diff A B`: 0 when equal, 1 when they differ, 2 on an error.
fn diff(
    a: &str,
    b: &str,
    config: Option<&Path>,
    policy: Option<&str>,
    format: DiffFormat,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let settings = match Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aml-egress catalog diff: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let (ca, cb) = match (load_catalog(a), load_catalog(b)) {
        (Ok(ca), Ok(cb)) => (ca, cb),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("aml-egress catalog diff: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let c = match policy {
        None | Some(crate::config::clients::DEFAULT_POLICY) => &settings.catalog,
        Some(name) => match settings.client_policies.iter().find(|cp| cp.name == name) {
            Some(cp) => &cp.catalog,
            None => {
                let mut names = vec![crate::config::clients::DEFAULT_POLICY];
                names.extend(settings.client_policies.iter().map(|cp| cp.name.as_str()));
                eprintln!(
                    "aml-egress catalog diff: --policy {name:?}: no such policy; this configuration has {}",
                    names.join(", ")
                );
                return Ok(EXIT_USAGE);
            }
        },
    };
    let d = crate::catalog::diff::diff(&ca, &cb, &c.selection(), &c.features);
    match format {
        DiffFormat::Text => write!(out, "{}", crate::catalog::diff::text(&d, a, b))?,
        DiffFormat::Json => writeln!(out, "{}", serde_json::to_string(&d)?)?,
    }
    Ok(if d.is_empty() { 0 } else { 1 })
}

/// Print the optional parts of the catalog, marking the enabled ones.
pub fn print_features(built: &Built, out: &mut dyn Write) -> io::Result<()> {
    for part in built.parts.iter() {
        let on = if built.features.contains(&part.name) {
            "on "
        } else {
            "off"
        };
        writeln!(out, "{on} {:<28} {}", part.name, part.marked_summary())?;
    }
    Ok(())
}

#[derive(Serialize)]
struct CatalogJson<'a> {
    cloud: &'a str,
    revision: &'a str,
    features: Vec<&'a str>,
    rules: Vec<RuleJson<'a>>,
    not_enforced: &'a [ReferenceEntry],
    warnings: &'a [String],
}

#[derive(Serialize)]
struct RuleJson<'a> {
    action: crate::policy::Action,
    pattern: String,
    ports: String,
    source: &'a Source,
    /// The names `catalog.narrow` keeps a wildcard to.
    #[serde(skip_serializing_if = "Option::is_none")]
    narrowed_to: Option<Vec<String>>,
    /// TLS ports on which a catalog CIDR rule allows nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_on_tls_ports: Vec<u16>,
}

/// Print the rendered rule set (`catalog`), as a table or JSON.
pub fn print_catalog(built: &Built, json: bool, out: &mut dyn Write) -> io::Result<()> {
    let rules = built.policy.rules();
    if json {
        let doc = CatalogJson {
            cloud: built.cloud.name(),
            revision: &built.revision,
            features: built.features.iter().map(String::as_str).collect(),
            rules: rules
                .iter()
                .map(|r| RuleJson {
                    action: r.action,
                    pattern: r.what.to_string(),
                    ports: r.ports.to_string(),
                    source: &r.source,
                    narrowed_to: built
                        .policy
                        .narrowed_to(r)
                        .map(|n| n.iter().map(ToString::to_string).collect()),
                    not_on_tls_ports: built.policy.nameless_ports(r),
                })
                .collect(),
            not_enforced: &built.reference,
            warnings: &built.warnings,
        };
        serde_json::to_writer_pretty(&mut *out, &doc)?;
        return writeln!(out);
    }
    let features: Vec<&str> = built.features.iter().map(String::as_str).collect();
    writeln!(
        out,
        "# catalog {} for the {} cloud; optional parts on: {}",
        built.revision,
        built.cloud,
        if features.is_empty() {
            "none".to_owned()
        } else {
            features.join(", ")
        }
    )?;
    writeln!(out, "# enforced rules ({})", rules.len())?;
    let width = rules
        .iter()
        .map(|r| r.what.to_string().len())
        .max()
        .unwrap_or(0)
        .min(60);
    for r in rules {
        let action = match r.action {
            crate::policy::Action::Allow => "allow",
            crate::policy::Action::Deny => "deny ",
        };
        let mut note = String::new();
        if let Some(names) = built.policy.narrowed_to(r) {
            let names: Vec<String> = names.iter().map(ToString::to_string).collect();
            note = format!(" [narrowed to {} by catalog.narrow]", names.join(", "));
        }
        let nameless = built.policy.nameless_ports(r);
        if !nameless.is_empty() {
            let ports: Vec<String> = nameless.iter().map(u16::to_string).collect();
            note = format!(
                " [not on TLS port {}: no server name, catalog.service_tags_nameless_tls]",
                ports.join(", ")
            );
        }
        writeln!(
            out,
            "{action} {:<width$} {:<12} {}{note}",
            r.what.to_string(),
            r.ports.to_string(),
            r.source
        )?;
    }
    writeln!(
        out,
        "# not enforced by a proxy, kept for reference ({})",
        built.reference.len()
    )?;
    for e in built.reference.iter() {
        let kind = match (e.direction, e.kind) {
            (crate::catalog::Direction::Inbound, _) => "inbound",
            (_, crate::catalog::EntryKind::ServiceTag) => "tag",
            _ => "udp",
        };
        writeln!(
            out,
            "{kind:<7} {:<width$} {:<12} {} ({})",
            e.pattern,
            format!("{:?} {}", e.protocol, e.ports).to_lowercase(),
            e.source,
            e.not_enforced
        )?;
    }
    Ok(())
}
