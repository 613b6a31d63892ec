//! `aml-egress allowed`: the names a running proxy let through under each wildcard allow
//! rule (its `/allowed`), most recently seen first; of several instances, their tables
//! merged ([`crate::fleet`]).

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, EXIT_USAGE, admin_get_all, exit_code};
use crate::allowed::AllowedReport;
use crate::fleet::{merge_allowed, parse_allowed};

/// The arguments of `allowed`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The proxy's admin listener, as http://host:port (admin.listen); once per instance
    /// behind a load balancer, whose tables are merged.
    #[arg(long, required = true)]
    pub admin: Vec<String>,
    /// File holding the admin bearer token (admin.token_file), when the proxy needs one.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Only the names under this rule pattern, exactly as written (`*.blob.core.windows.net`).
    #[arg(long, value_name = "PATTERN")]
    pub rule: Option<String>,
    /// Print the merged rows as JSON, in the shape /allowed serves.
    #[arg(long)]
    pub json: bool,
}

/// `allowed`: 0 after printing the table, 2 (with one line saying why) when an instance
/// cannot be asked or its answer cannot be printed.
pub fn run(args: Args) -> i32 {
    exit_code(allowed(args))
}

/// The rows any one instance keeps are bounded (`metrics.max_allowed_names`): ask for all.
const ALL_ROWS: usize = 1_000_000;

/// The `/allowed` request for every row, or only those of `rule`.
pub fn allowed_path(rule: Option<&str>) -> String {
    let mut path = format!("/allowed?limit={ALL_ROWS}");
    if let Some(rule) = rule {
        path.push_str("&rule=");
        path.push_str(&percent_encode(rule));
    }
    path
}

/// A query value with every byte but the unreserved ones (RFC 3986 §2.3) percent-encoded.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every instance's `/allowed` (of `rule`, when given), merged.
pub fn fetch_allowed(
    admins: &[String],
    rule: Option<&str>,
    token_file: Option<&std::path::Path>,
) -> Result<Vec<AllowedReport>, String> {
    let bodies = admin_get_all(admins, &allowed_path(rule), token_file)?;
    let lists = admins
        .iter()
        .zip(&bodies)
        .map(|(admin, body)| parse_allowed(admin, body))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(merge_allowed(lists))
}

fn allowed(args: Args) -> anyhow::Result<i32> {
    let fetched = fetch_allowed(
        &args.admin,
        args.rule.as_deref(),
        args.token_file.as_deref(),
    );
    let mut out = io::stdout().lock();
    let printed = fetched.and_then(|rows| {
        if args.json {
            let text = serde_json::to_string_pretty(&rows).map_err(|e| e.to_string())?;
            writeln!(out, "{text}").map_err(|e| e.to_string())
        } else {
            print_allowed(&rows, args.rule.as_deref(), &mut out)
        }
    });
    let code = match printed {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("aml-egress allowed: {e}");
            EXIT_USAGE
        }
    };
    out.flush()?;
    Ok(code)
}

/// `aml-egress allowed`: the names allowed under wildcard rules (those under `rule`, when the
/// rows were asked for by rule), as a table.
pub fn print_allowed(
    rows: &[AllowedReport],
    rule: Option<&str>,
    out: &mut impl Write,
) -> Result<(), String> {
    let shown: Vec<String> = rows
        .iter()
        .map(|r| format!("{}:{}", r.name, r.port))
        .collect();
    let w = shown.iter().map(String::len).max().unwrap_or(0).max(9);
    let rw = rows.iter().map(|r| r.rule.len()).max().unwrap_or(0).max(4);
    let mut text = format!(
        "{:>8}  {:<w$}  {:<rw$}  {:<20}  FIRST SEEN\n",
        "COUNT", "NAME:PORT", "RULE", "LAST SEEN"
    );
    for (r, name) in rows.iter().zip(&shown) {
        text.push_str(&format!(
            "{:>8}  {:<w$}  {:<rw$}  {:<20}  {}\n",
            r.count, name, r.rule, r.last_seen, r.first_seen
        ));
    }
    if rows.is_empty() {
        match rule {
            Some(rule) => text.push_str(&format!("(nothing allowed under {rule} yet)\n")),
            None => text.push_str("(nothing allowed under a wildcard rule yet)\n"),
        }
    }
    out.write_all(text.as_bytes()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_is_sent_percent_encoded() {
        assert_eq!(allowed_path(None), "/allowed?limit=1000000");
        assert_eq!(
            allowed_path(Some("*.blob.core.windows.net")),
            "/allowed?limit=1000000&rule=%2A.blob.core.windows.net"
        );
        assert_eq!(
            allowed_path(Some(r"regex:^a+\.x y&z=é$")),
            "/allowed?limit=1000000&rule=regex%3A%5Ea%2B%5C.x%20y%26z%3D%C3%A9%24"
        );
    }

    fn table(body: &str, rule: Option<&str>) -> String {
        let rows = merge_allowed([parse_allowed("http://a:9464", body).unwrap()]);
        let mut out = Vec::new();
        print_allowed(&rows, rule, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_table_lists_each_name_most_recent_first() {
        let body = r#"[
  {"name":"old.blob.core.windows.net","port":443,"rule":"*.blob.core.windows.net","rule_source":"catalog","count":12,"first_seen":"2026-11-01T10:00:00Z","last_seen":"2026-11-02T12:00:00Z"},
  {"name":"a.example.com","port":8443,"rule":".example.com","rule_source":"config.toml:9","count":3,"first_seen":"2026-11-02T00:00:00Z","last_seen":"2026-11-03T00:00:00Z"}
]"#;
        assert_eq!(
            table(body, None),
            "   COUNT  NAME:PORT                      RULE                     LAST SEEN             FIRST SEEN\n\
             \x20      3  a.example.com:8443             .example.com             2026-11-03T00:00:00Z  2026-11-02T00:00:00Z\n\
             \x20     12  old.blob.core.windows.net:443  *.blob.core.windows.net  2026-11-02T12:00:00Z  2026-11-01T10:00:00Z\n"
        );
    }

    #[test]
    fn an_empty_table_says_so() {
        assert_eq!(
            table("[]", None),
            "   COUNT  NAME:PORT  RULE  LAST SEEN             FIRST SEEN\n\
             (nothing allowed under a wildcard rule yet)\n"
        );
        assert!(
            table("[]", Some("*.blob.core.windows.net"))
                .ends_with("\n(nothing allowed under *.blob.core.windows.net yet)\n")
        );
    }
}
