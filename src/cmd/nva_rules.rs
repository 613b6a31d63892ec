//! `aml-egress nva-rules`: an nftables rule set for a network virtual appliance VM
//! (`nft -f` loads it; the rule set itself is [`crate::nva`]).

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, EXIT_USAGE, exit_code, load};
use crate::config::parse_cidr;
use crate::nva::{parse_redirect, rules};

/// The arguments of `nva-rules`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// A compute subnet whose traffic the VM handles (repeatable). With [[client_policy]]
    /// policies, their sources when left out.
    #[arg(long = "from", value_name = "CIDR")]
    pub from: Vec<String>,
    /// Send PORT to the TLS or the HTTP listener, or leave it to the network rules.
    #[arg(long, value_name = "PORT=tls|http|none")]
    pub redirect: Vec<String>,
}

/// `nva-rules`: the rule set on standard output and 0; 2 with one line saying why when the
/// configuration, a `--from` network or a `--redirect` is wrong, or the configuration
/// lacks what the rules need (the transparent listeners).
pub fn run(args: Args) -> i32 {
    exit_code(nva_rules(args))
}

fn nva_rules(args: Args) -> anyhow::Result<i32> {
    let compiled = match load("nva-rules", args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut nets = Vec::new();
    for f in &args.from {
        match parse_cidr(f) {
            Some(n) => nets.push(n),
            None => {
                eprintln!(
                    "aml-egress nva-rules: --from {f}: not a network; write for example 10.0.1.0/24"
                );
                return Ok(EXIT_USAGE);
            }
        }
    }
    let mut redirects = Vec::new();
    for r in &args.redirect {
        match parse_redirect(r) {
            Ok(x) => redirects.push(x),
            Err(e) => {
                eprintln!("aml-egress nva-rules: {e}");
                return Ok(EXIT_USAGE);
            }
        }
    }
    let mut out = io::stdout().lock();
    let code = match rules(&compiled, &nets, &redirects) {
        Ok(text) => {
            out.write_all(text.as_bytes())?;
            EXIT_OK
        }
        Err(e) => {
            // What the configuration lacks is added to its file (or the embedded defaults).
            let place = compiled
                .file
                .as_ref()
                .map_or("the embedded defaults".to_owned(), |f| {
                    f.display().to_string()
                });
            eprintln!("aml-egress nva-rules: {place}: {e}");
            EXIT_USAGE
        }
    };
    out.flush()?;
    Ok(code)
}
