//! `aml-egress export`: the enforced rule set for another enforcement point (the
//! translation itself is [`crate::export`]).

use std::io::{self, Write};
use std::path::PathBuf;

use clap::ValueEnum;

use super::{EXIT_OK, EXIT_USAGE, exit_code};
use crate::config::{Settings, build_policy};

/// The arguments of `export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    pub format: Format,
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Source addresses the rules apply to (repeatable; default any).
    #[arg(long = "source", value_name = "CIDR")]
    pub source: Vec<String>,
}

/// What `export` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    AzureFirewall,
    Squid,
}

/// `export`: the rule set on standard output and a warning for each rule the target
/// cannot express; 0, or 2 on a configuration error.
pub fn run(args: Args) -> i32 {
    exit_code(export(args))
}

fn export(args: Args) -> anyhow::Result<i32> {
    let settings = match Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aml-egress export: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    // Path rules are written as policy.tls_path_rules says (widened or left out).
    let tls_path_rules = settings.policy.tls_path_rules;
    let built = match build_policy(&settings) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("aml-egress export: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let e = match args.format {
        Format::AzureFirewall => {
            crate::export::azure_firewall(&built, tls_path_rules, &args.source)
        }
        Format::Squid => crate::export::squid(&built, tls_path_rules, &args.source),
    };
    let mut out = io::stdout().lock();
    out.write_all(e.text.as_bytes())?;
    for w in &e.warnings {
        eprintln!("warning: {w}");
    }
    out.flush()?;
    Ok(EXIT_OK)
}
