//! `aml-egress suggest`: `[[allow]]` entries from refused (or, in audit mode, would-be
//! refused) traffic, read from a running proxy's `/denied` or its JSON log files (the
//! learning itself is [`crate::suggest`]).

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, EXIT_USAGE, admin_get, exit_code, load};
use crate::policy::{PathView, Target};
use crate::suggest::{Refused, from_denied, from_log, suggest};

/// The arguments of `suggest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, conflicts_with = "log")]
    pub admin: Option<String>,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// JSON log files of the proxy (repeatable).
    #[arg(long, value_name = "FILE")]
    pub log: Vec<PathBuf>,
    /// Suggest `*.parent` when at least this many names under it were refused (0: never).
    #[arg(long, default_value_t = 3)]
    pub collapse: usize,
    /// Suggest CIDR entries for IP destinations too.
    #[arg(long)]
    pub cidrs: bool,
    /// The configuration, to name optional parts that would allow a destination.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// `suggest`: the entries on standard output and 0; 2 when the configuration is invalid,
/// the proxy cannot be asked, a log file cannot be read, or neither source is given.
pub fn run(args: Args) -> i32 {
    exit_code(run_suggest(args))
}

fn run_suggest(args: Args) -> anyhow::Result<i32> {
    let built = match load("suggest", args.config.as_deref()) {
        Ok(c) => c.built,
        Err(code) => return Ok(code),
    };
    // The optional part (off) that would allow a destination, named beside its entry.
    let part = |host: &str, port: u16| {
        let t = Target::parse(&format!("{host}:{port}")).ok()?;
        built
            .would_allow_with(&t, PathView::Hidden)
            .map(str::to_owned)
    };
    let refused = if let Some(admin) = &args.admin {
        let fetched = admin_get(
            admin,
            "/denied?limit=100000",
            args.token_file.as_deref(),
            None,
        );
        match fetched.and_then(|body| from_denied(&body)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("aml-egress suggest: {e}");
                return Ok(EXIT_USAGE);
            }
        }
    } else if !args.log.is_empty() {
        let mut r = Refused::new();
        for f in &args.log {
            match std::fs::read_to_string(f) {
                Ok(text) => from_log(&text, &mut r),
                Err(e) => {
                    eprintln!("aml-egress suggest: {}: {e}", f.display());
                    return Ok(EXIT_USAGE);
                }
            }
        }
        r
    } else {
        eprintln!(
            "aml-egress suggest: give --admin URL (a running proxy's /denied) or --log FILE (its JSON log)"
        );
        return Ok(EXIT_USAGE);
    };
    let mut out = io::stdout().lock();
    out.write_all(suggest(&refused, args.collapse, args.cidrs, &part).as_bytes())?;
    out.flush()?;
    Ok(EXIT_OK)
}
