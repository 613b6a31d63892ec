//! `aml-egress serve`: run the proxy until SIGTERM or SIGINT.

use std::path::PathBuf;

use super::{EXIT_OK, EXIT_USAGE, exit_code, load};

/// The arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// Load the configuration (the embedded defaults without `--config`), then serve until
/// stopped: 0 after a drain, 2 when the configuration is invalid or serving cannot start
/// (a port in use, an unreadable certificate: one line says which).
pub fn run(args: Args) -> i32 {
    exit_code(serve(args))
}

fn serve(args: Args) -> anyhow::Result<i32> {
    let compiled = match load("serve", args.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    crate::server::init_logging(&compiled.log);
    // Connections are served on the proxy's own worker threads (proxy.workers); this
    // runtime runs the admin endpoints, reloads and signals.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    match rt.block_on(crate::server::serve(compiled)) {
        Ok(()) => Ok(EXIT_OK),
        Err(e) => {
            eprintln!("aml-egress serve: {e}");
            Ok(EXIT_USAGE)
        }
    }
}
