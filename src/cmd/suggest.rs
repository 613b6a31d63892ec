//! `aml-egress suggest`: `[[allow]]` entries from refused (or, in audit mode, would-be
//! refused) traffic, read from running proxies' `/denied` or their JSON log files (the
//! learning itself is [`crate::suggest`]); with `--narrow`, a `[catalog.narrow]` table from
//! their `/allowed` or the log's "first use under wildcard" lines
//! ([`crate::suggest::narrow`]).

use std::io::{self, Write};
use std::path::PathBuf;

use super::allowed::fetch_allowed;
use super::{EXIT_OK, EXIT_USAGE, admin_get_all, exit_code, load};
use crate::policy::{PathView, Target};
use crate::suggest::narrow::{Counted, Observed};
use crate::suggest::{Refused, from_denied, from_log, merge, suggest};

/// The arguments of `suggest`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A running proxy's admin listener, as http://host:port (admin.listen); once per
    /// instance behind a load balancer, whose tables are merged.
    #[arg(long, conflicts_with = "log")]
    pub admin: Vec<String>,
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
    /// Instead: a [catalog.narrow] table of the names seen under each wildcard allow rule
    /// (from /allowed, or the log lines "first use under wildcard").
    #[arg(long, conflicts_with_all = ["collapse", "cidrs", "config"])]
    pub narrow: bool,
}

/// `suggest`: the entries on standard output and 0; 2 when the configuration is invalid,
/// a proxy cannot be asked, a log file cannot be read, or neither source is given.
pub fn run(args: Args) -> i32 {
    exit_code(run_suggest(args))
}

/// Each log file's text, or the line saying which cannot be read.
fn read_logs(files: &[PathBuf]) -> Result<Vec<String>, String> {
    files
        .iter()
        .map(|f| std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display())))
        .collect()
}

fn run_suggest(args: Args) -> anyhow::Result<i32> {
    if args.admin.is_empty() && args.log.is_empty() {
        let wanted = if args.narrow { "/allowed" } else { "/denied" };
        eprintln!(
            "aml-egress suggest: give --admin URL (a running proxy's {wanted}) or --log FILE (its JSON log)"
        );
        return Ok(EXIT_USAGE);
    }
    if args.narrow {
        return narrow(&args);
    }
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
    let read = if args.admin.is_empty() {
        read_logs(&args.log).map(|texts| {
            let mut r = Refused::new();
            for text in &texts {
                from_log(text, &mut r);
            }
            r
        })
    } else {
        let path = "/denied?limit=100000";
        admin_get_all(&args.admin, path, args.token_file.as_deref()).and_then(|bodies| {
            let mut r = Refused::new();
            for (admin, body) in args.admin.iter().zip(&bodies) {
                merge(
                    &mut r,
                    from_denied(body).map_err(|e| format!("{admin}: {e}"))?,
                );
            }
            Ok(r)
        })
    };
    let refused = match read {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aml-egress suggest: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let mut out = io::stdout().lock();
    out.write_all(suggest(&refused, args.collapse, args.cidrs, &part).as_bytes())?;
    out.flush()?;
    Ok(EXIT_OK)
}

/// `suggest --narrow`.
fn narrow(args: &Args) -> anyhow::Result<i32> {
    let read = if args.admin.is_empty() {
        read_logs(&args.log).map(|texts| {
            let mut seen = Observed::new(Counted::FirstUses);
            for text in &texts {
                seen.add_log(text);
            }
            seen
        })
    } else {
        fetch_allowed(&args.admin, None, args.token_file.as_deref()).map(|rows| {
            let mut seen = Observed::new(Counted::Allowed);
            seen.add_reports(&rows);
            seen
        })
    };
    let seen = match read {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aml-egress suggest: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let mut out = io::stdout().lock();
    out.write_all(seen.render().as_bytes())?;
    out.flush()?;
    Ok(EXIT_OK)
}
