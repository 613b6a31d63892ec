//! `aml-egress denied`: the most denied destinations of a running proxy, with the entry
//! that would allow each; of several instances, their tables merged.

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, EXIT_USAGE, admin_get_all, exit_code};
use crate::fleet::{merge_denied, parse_denied};
use crate::metrics::DeniedReport;

/// The arguments of `denied`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The proxy's admin listener, as http://host:port (admin.listen); once per instance
    /// behind a load balancer, whose tables are merged.
    #[arg(long, required = true)]
    pub admin: Vec<String>,
    /// File holding the admin bearer token (admin.token_file), when the proxy needs one.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How many targets, most denied first.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print the JSON as served by /denied (of several instances, merged in that shape).
    #[arg(long)]
    pub json: bool,
    /// Only the targets refused under this policy (`default`, or a [[client_policy]]'s
    /// name).
    #[arg(long)]
    pub policy: Option<String>,
}

/// `denied`: 0 after printing the table, 2 (with one line saying why) when the proxy
/// cannot be asked or its answer cannot be printed.
pub fn run(args: Args) -> i32 {
    exit_code(denied(args))
}

fn denied(args: Args) -> anyhow::Result<i32> {
    let path = match &args.policy {
        Some(p) => format!("/denied?limit={}&policy={}", args.limit, encode(p)),
        None => format!("/denied?limit={}", args.limit),
    };
    let fetched = admin_get_all(&args.admin, &path, args.token_file.as_deref());
    let mut out = io::stdout().lock();
    let printed = fetched.and_then(|bodies| match bodies.as_slice() {
        // One instance's JSON exactly as it was served.
        [body] if args.json => out.write_all(body.as_bytes()).map_err(|e| e.to_string()),
        _ => {
            let lists = args
                .admin
                .iter()
                .zip(&bodies)
                .map(|(admin, body)| parse_denied(admin, body))
                .collect::<Result<Vec<_>, _>>()?;
            let rows = merge_denied(lists, args.limit);
            if args.json {
                let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
                writeln!(out, "{text}").map_err(|e| e.to_string())
            } else {
                print_denied(&rows, &mut out)
            }
        }
    });
    let code = match printed {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("aml-egress denied: {e}");
            EXIT_USAGE
        }
    };
    out.flush()?;
    Ok(code)
}

/// A query value, percent-encoded (a policy name is `[a-z0-9_-]`, but a typo is not).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `aml-egress denied`: the most denied destinations, as a table (with a POLICY column
/// when any row is another policy's than `default`).
pub fn print_denied(rows: &[DeniedReport], out: &mut impl Write) -> Result<(), String> {
    let w = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let policies = rows
        .iter()
        .any(|r| r.policy != crate::metrics::DEFAULT_POLICY);
    let pw = rows
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let policy_col = |p: &str| match policies {
        true => format!("{p:<pw$}  "),
        false => String::new(),
    };
    // What audit mode let through reached the destination: a column of its own when any
    // row has some.
    let audited = rows.iter().any(|r| r.let_through > 0);
    let through_col = |n: &str| match audited {
        true => format!("{n:>11}  "),
        false => String::new(),
    };
    let mut text = format!(
        "{:>8}  {}{:<w$}  {}{:<20}  {:<20}  TO ALLOW\n",
        "COUNT",
        through_col("LET THROUGH"),
        "TARGET",
        policy_col("POLICY"),
        "LAST SEEN",
        "FIRST SEEN"
    );
    for r in rows {
        text.push_str(&format!(
            "{:>8}  {}{:<w$}  {}{:<20}  {:<20}  {}\n",
            r.count,
            through_col(&r.let_through.to_string()),
            r.target,
            policy_col(&r.policy),
            r.last_seen,
            r.first_seen,
            r.allow_entry.replace('\n', " ")
        ));
    }
    if rows.is_empty() {
        text.push_str("(nothing denied since the proxy started)\n");
    }
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}
