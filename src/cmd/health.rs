//! `aml-egress health`: ask a running proxy whether it is ready (its `/readyz`), for
//! container health checks.

use std::path::PathBuf;
use std::time::Duration;

use super::admin_get;

/// The arguments of `health`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = "http://127.0.0.1:9464")]
    pub admin: String,
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3.0)]
    pub timeout: f64,
}

/// `health`: 0 when `/readyz` answers 200, 1 otherwise (never 2, which Docker's
/// HEALTHCHECK reserves), with one line saying which.
pub fn run(args: Args) -> i32 {
    let limit = Duration::from_secs_f64(args.timeout.clamp(0.1, 300.0));
    match admin_get(
        &args.admin,
        "/readyz",
        args.token_file.as_deref(),
        Some(limit),
    ) {
        Ok(_) => {
            println!("ready: {}/readyz answered 200", args.admin);
            0
        }
        Err(e) => {
            eprintln!("not ready: {e}");
            1
        }
    }
}
