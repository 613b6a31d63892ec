//! `aml-egress denied`: the most denied destinations of a running proxy, with the entry
//! that would allow each.

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, EXIT_USAGE, admin_get, exit_code};

/// The arguments of `denied`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The proxy's admin listener, as http://host:port (admin.listen).
    #[arg(long)]
    pub admin: String,
    /// File holding the admin bearer token (admin.token_file), when the proxy needs one.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// How many targets, most denied first.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Print the JSON as served by /denied.
    #[arg(long)]
    pub json: bool,
}

/// `denied`: 0 after printing the table, 2 (with one line saying why) when the proxy
/// cannot be asked or its answer cannot be printed.
pub fn run(args: Args) -> i32 {
    exit_code(denied(args))
}

fn denied(args: Args) -> anyhow::Result<i32> {
    let path = format!("/denied?limit={}", args.limit);
    let fetched = admin_get(&args.admin, &path, args.token_file.as_deref(), None);
    let mut out = io::stdout().lock();
    let code = match fetched.and_then(|body| print_denied(&body, args.json, &mut out)) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("aml-egress denied: {e}");
            EXIT_USAGE
        }
    };
    out.flush()?;
    Ok(code)
}

/// `aml-egress denied`: the most denied destinations of a running proxy, as a table (or the
/// JSON as served with `json`).
pub fn print_denied(body: &str, json: bool, out: &mut impl Write) -> Result<(), String> {
    if json {
        return out.write_all(body.as_bytes()).map_err(|e| e.to_string());
    }
    let rows: Vec<crate::metrics::DeniedReport> = serde_json::from_str(body).map_err(|e| {
        format!("the admin listener sent something other than the /denied list: {e}")
    })?;
    let w = rows
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut text = format!(
        "{:>8}  {:<w$}  {:<20}  {:<20}  TO ALLOW\n",
        "COUNT", "TARGET", "LAST SEEN", "FIRST SEEN"
    );
    for r in &rows {
        text.push_str(&format!(
            "{:>8}  {:<w$}  {:<20}  {:<20}  {}\n",
            r.count,
            r.target,
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
