//! `aml-egress validate`: check a configuration file and print a summary.

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, exit_code, load};
use crate::config::Built;

/// The arguments of `validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: PathBuf,
}

/// `validate`: 0 and the summary when the file is valid, 2 and every problem when not.
pub fn run(args: Args) -> i32 {
    exit_code(validate(args))
}

fn validate(args: Args) -> anyhow::Result<i32> {
    let c = match load("validate", Some(&args.config)) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut out = io::stdout().lock();
    print_summary(&c.built, &args.config.display().to_string(), &mut out)?;
    out.flush()?;
    Ok(EXIT_OK)
}

/// Print `validate`'s summary: rules per kind and every warning.
pub fn print_summary(built: &Built, origin: &str, out: &mut dyn Write) -> io::Result<()> {
    let c = built.policy.counts();
    writeln!(
        out,
        "{origin}: valid (catalog {} for the {} cloud)",
        built.revision, built.cloud
    )?;
    writeln!(
        out,
        "rules: {} exact, {} wildcard, {} with a path, {} regex, {} cidr allow; {} deny; {} catalog entries not enforced by a proxy",
        c.exact,
        c.wildcard,
        c.path,
        c.regex,
        c.cidr,
        c.deny,
        built.reference.len()
    )?;
    let features: Vec<&str> = built.features.iter().map(String::as_str).collect();
    writeln!(
        out,
        "optional parts on: {}",
        if features.is_empty() {
            "none".to_owned()
        } else {
            features.join(", ")
        }
    )?;
    writeln!(out, "warnings: {}", built.warnings.len())?;
    for w in &built.warnings {
        writeln!(out, "  - {w}")?;
    }
    Ok(())
}
