//! The `aml-egress` command line: parse arguments, call the library, map errors to exit codes.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use aml_egress::cli::{self, EXIT_USAGE};
use aml_egress::config::{self, Compiled};

#[derive(Parser)]
#[command(
    name = "aml-egress",
    version,
    about = "An egress proxy that lets an Azure Machine Learning workspace reach exactly the hosts it needs"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    AzureFirewall,
    Squid,
}

#[derive(Clone, Copy, ValueEnum)]
enum DiffFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum CatalogAction {
    /// What changes from catalog A to catalog B (revisions such as 2021-11 and 2026-03, or
    /// catalog files) for the configured cloud, features and placeholders.
    Diff {
        a: String,
        b: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        format: DiffFormat,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (embedded defaults without --config: public cloud, newest catalog, 127.0.0.1:3128).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Say whether destinations would be allowed, and by which rule (exit 0 all allowed, 1 any denied, 2 error).
    Check {
        /// Configuration file (TOML); embedded defaults when left out.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print load-time notes and warnings to standard error.
        #[arg(long, short)]
        verbose: bool,
        /// Targets as host:port, http://host/path (path checked) or https://host; one per line on standard input when none are given.
        targets: Vec<String>,
    },
    /// Print the rendered rule set that will be enforced, each rule with its source.
    Catalog {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        /// List the optional parts (features) instead, marking those switched on.
        #[arg(long)]
        features: bool,
        #[command(subcommand)]
        action: Option<CatalogAction>,
    },
    /// Print the most denied destinations of a running proxy, with the entry that would allow each (exit 0, or 2 if the proxy cannot be asked).
    Denied {
        /// The proxy's admin listener, as http://host:port (admin.listen).
        #[arg(long)]
        admin: String,
        /// File holding the admin bearer token (admin.token_file), when the proxy needs one.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// How many targets, most denied first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the JSON as served by /denied.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and print a summary (exit 0 valid, 2 invalid).
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the enforced rule set for another enforcement point: an Azure Firewall Policy
    /// rule collection group (ARM JSON), or Squid acl and http_access lines.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Source addresses the rules apply to (repeatable; default any).
        #[arg(long = "source", value_name = "CIDR")]
        source: Vec<String>,
    },
    /// Suggest [[allow]] entries from refused (or, in audit mode, would-be refused) traffic:
    /// a running proxy's /denied, or its JSON log files.
    Suggest {
        #[arg(long, conflicts_with = "log")]
        admin: Option<String>,
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// JSON log files of the proxy (repeatable).
        #[arg(long, value_name = "FILE")]
        log: Vec<PathBuf>,
        /// Suggest `*.parent` when at least this many names under it were refused (0: never).
        #[arg(long, default_value_t = 3)]
        collapse: usize,
        /// Suggest CIDR entries for IP destinations too.
        #[arg(long)]
        cidrs: bool,
        /// The configuration, to name optional parts that would allow a destination.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask a running proxy whether it is ready (its `/readyz`): exit 0 when it is, 1 on
    /// every failure (for container health checks).
    Health {
        #[arg(long, default_value = "http://127.0.0.1:9464")]
        admin: String,
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
    /// Print an nftables rule set for a network virtual appliance VM (`nft -f` loads it).
    NvaRules {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A compute subnet whose traffic the VM handles (repeatable).
        #[arg(long = "from", value_name = "CIDR")]
        from: Vec<String>,
        /// Send PORT to the TLS or the HTTP listener, or leave it to the network rules.
        #[arg(long, value_name = "PORT=tls|http|none")]
        redirect: Vec<String>,
    },
}

/// Load settings and build the policy; on failure print the problems for `command` and
/// give the exit code.
fn load(command: &str, path: Option<&PathBuf>) -> Result<Compiled, i32> {
    config::load(path.map(PathBuf::as_path)).map_err(|e| {
        eprintln!("aml-egress {command}: {e}");
        EXIT_USAGE
    })
}

fn run(args: Args) -> anyhow::Result<i32> {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let code = match args.command {
        Command::Serve { config } => return serve(config),
        Command::Check {
            config,
            json,
            verbose,
            targets,
        } => {
            let built = match load("check", config.as_ref()) {
                Ok(c) => c.built,
                Err(code) => return Ok(code),
            };
            if verbose {
                for w in &built.warnings {
                    eprintln!("note: {w}");
                }
            }
            cli::check(&built, &targets, json, &mut out)?
        }
        Command::Catalog {
            action:
                Some(CatalogAction::Diff {
                    a,
                    b,
                    config,
                    format,
                }),
            ..
        } => catalog_diff(&a, &b, config.as_deref(), format, &mut out)?,
        Command::Catalog {
            config,
            format,
            features,
            action: None,
        } => {
            let built = match load("catalog", config.as_ref()) {
                Ok(c) => c.built,
                Err(code) => return Ok(code),
            };
            if features {
                cli::print_features(&built, &mut out)?;
            } else {
                cli::print_catalog(&built, matches!(format, Format::Json), &mut out)?;
                for w in &built.warnings {
                    eprintln!("warning: {w}");
                }
            }
            0
        }
        Command::Denied {
            admin,
            token_file,
            limit,
            json,
        } => {
            let path = format!("/denied?limit={limit}");
            let fetched = admin_get(&admin, &path, token_file.as_deref(), None);
            match fetched.and_then(|body| cli::print_denied(&body, json, &mut out)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("aml-egress denied: {e}");
                    EXIT_USAGE
                }
            }
        }
        Command::Export {
            format,
            config,
            source,
        } => {
            let settings = match aml_egress::config::Settings::load(config.as_deref()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("aml-egress export: {e}");
                    return Ok(EXIT_USAGE);
                }
            };
            let tls_path_rules = settings.policy.tls_path_rules;
            let built = match aml_egress::config::build_policy(&settings) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("aml-egress export: {e}");
                    return Ok(EXIT_USAGE);
                }
            };
            let e = match format {
                ExportFormat::AzureFirewall => {
                    aml_egress::export::azure_firewall(&built, tls_path_rules, &source)
                }
                ExportFormat::Squid => aml_egress::export::squid(&built, tls_path_rules, &source),
            };
            out.write_all(e.text.as_bytes())?;
            for w in &e.warnings {
                eprintln!("warning: {w}");
            }
            0
        }
        Command::Suggest {
            admin,
            token_file,
            log,
            collapse,
            cidrs,
            config,
        } => {
            let built = match load("suggest", config.as_ref()) {
                Ok(c) => c.built,
                Err(code) => return Ok(code),
            };
            let part = |host: &str, port: u16| {
                let t = aml_egress::policy::Target::parse(&format!("{host}:{port}")).ok()?;
                built
                    .would_allow_with(&t, aml_egress::policy::PathView::Hidden)
                    .map(str::to_owned)
            };
            let refused = if let Some(admin) = admin {
                let fetched =
                    admin_get(&admin, "/denied?limit=100000", token_file.as_deref(), None);
                match fetched.and_then(|body| aml_egress::suggest::from_denied(&body)) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("aml-egress suggest: {e}");
                        return Ok(EXIT_USAGE);
                    }
                }
            } else if !log.is_empty() {
                let mut r = aml_egress::suggest::Refused::new();
                for f in &log {
                    match std::fs::read_to_string(f) {
                        Ok(text) => aml_egress::suggest::from_log(&text, &mut r),
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
            out.write_all(
                aml_egress::suggest::suggest(&refused, collapse, cidrs, &part).as_bytes(),
            )?;
            0
        }
        Command::Health {
            admin,
            token_file,
            timeout,
        } => health(&admin, token_file.as_deref(), timeout),
        Command::NvaRules {
            config,
            from,
            redirect,
        } => {
            let compiled = match load("nva-rules", config.as_ref()) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let mut nets = Vec::new();
            for f in &from {
                match aml_egress::config::parse_cidr(f) {
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
            for r in &redirect {
                match aml_egress::nva::parse_redirect(r) {
                    Ok(x) => redirects.push(x),
                    Err(e) => {
                        eprintln!("aml-egress nva-rules: {e}");
                        return Ok(EXIT_USAGE);
                    }
                }
            }
            match aml_egress::nva::rules(&compiled, &nets, &redirects) {
                Ok(text) => {
                    out.write_all(text.as_bytes())?;
                    0
                }
                Err(e) => {
                    eprintln!("aml-egress nva-rules: {e}");
                    EXIT_USAGE
                }
            }
        }
        Command::Validate { config } => match load("validate", Some(&config)) {
            Ok(c) => {
                cli::print_summary(&c.built, &config.display().to_string(), &mut out)?;
                0
            }
            Err(code) => code,
        },
    };
    out.flush()?;
    Ok(code)
}

/// Load a catalog named by revision or by file.
fn load_catalog(name: &str) -> Result<aml_egress::catalog::Catalog, String> {
    use aml_egress::catalog::{Catalog, REVISIONS};
    if let Some(c) = Catalog::embedded(name) {
        return Ok(c);
    }
    let text = std::fs::read_to_string(name).map_err(|e| {
        let known: Vec<&str> = REVISIONS.iter().map(|(r, _)| *r).collect();
        format!(
            "{name}: neither a built-in revision ({}) nor a readable catalog file: {e}",
            known.join(", ")
        )
    })?;
    Catalog::from_toml(&text, name).map_err(|e| format!("{name}: {e}"))
}

/// `aml-egress catalog diff A B`: 0 when equal, 1 when they differ, 2 on an error.
fn catalog_diff(
    a: &str,
    b: &str,
    config: Option<&std::path::Path>,
    format: DiffFormat,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let settings = match aml_egress::config::Settings::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aml-egress catalog diff: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let (ca, cb) = match (load_catalog(a), load_catalog(b)) {
        (Ok(ca), Ok(cb)) => (ca, cb),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("aml-egress catalog diff: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let c = &settings.catalog;
    let sel = aml_egress::catalog::Selection {
        cloud: c.cloud,
        region: c
            .region
            .as_deref()
            .map(aml_egress::config::checks::region_name),
        storage_account: c.storage_account.clone(),
        container_registry: c.container_registry.as_deref().map(str::to_ascii_lowercase),
    };
    let d = aml_egress::catalog::diff::diff(&ca, &cb, &sel, &c.features);
    match format {
        DiffFormat::Text => write!(out, "{}", aml_egress::catalog::diff::text(&d, a, b))?,
        DiffFormat::Json => writeln!(out, "{}", serde_json::to_string(&d)?)?,
    }
    Ok(if d.is_empty() { 0 } else { 1 })
}

/// `aml-egress health`: 0 when `/readyz` answers 200, 1 otherwise (never 2, which
/// Docker's HEALTHCHECK reserves), with one line saying which.
fn health(admin: &str, token_file: Option<&std::path::Path>, timeout: f64) -> i32 {
    let limit = std::time::Duration::from_secs_f64(timeout.clamp(0.1, 300.0));
    match admin_get(admin, "/readyz", token_file, Some(limit)) {
        Ok(_) => {
            println!("ready: {admin}/readyz answered 200");
            0
        }
        Err(e) => {
            eprintln!("not ready: {e}");
            1
        }
    }
}

/// One GET to the admin listener for the client subcommands (`denied`, `suggest`,
/// `health`): reads the bearer token file when given, runs the request on a small
/// runtime and returns the body of a 200 answer, or one line saying what went wrong.
fn admin_get(
    admin: &str,
    path: &str,
    token_file: Option<&std::path::Path>,
    timeout: Option<std::time::Duration>,
) -> Result<String, String> {
    let token = token_file
        .map(aml_egress::admin::read_token)
        .transpose()
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let fetch = aml_egress::admin::fetch(admin, path, token.as_deref());
        match timeout {
            None => fetch.await,
            Some(limit) => tokio::time::timeout(limit, fetch)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "{admin}{path} did not answer within {} s",
                        limit.as_secs_f64()
                    ))
                }),
        }
    })
}

fn serve(config: Option<PathBuf>) -> anyhow::Result<i32> {
    let compiled = match load("serve", config.as_ref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    aml_egress::server::init_logging(&compiled.log);
    // Connections are served on the proxy's own worker threads (proxy.workers); this
    // runtime runs the admin endpoints, reloads and signals.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    match rt.block_on(aml_egress::server::serve(compiled)) {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("aml-egress serve: {e}");
            Ok(EXIT_USAGE)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("aml-egress: {e:#}");
            ExitCode::from(EXIT_USAGE as u8)
        }
    }
}
