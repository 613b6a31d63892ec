//! `aml-egress ca init` and `ca show`: the CA that signs inspected tunnels' certificates.
//!
//! `init` makes an ECDSA P-256 CA whose name constraints permit only the DNS subtrees the
//! configuration inspects (and no IP address), so that its key, if stolen, cannot sign for
//! any other name. `show` prints a CA's subject, fingerprint, expiry and constraints, and
//! how to install it on compute. Neither ever prints the key.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;

use super::{EXIT_OK, EXIT_USAGE, exit_code};
use crate::config::{self, Compiled, Settings};
use crate::inspect::ca::{self, CaCert};

/// Validity of a new CA when `--days` is not given: two years, so that compute images
/// are not rebuilt often for it, while a forgotten CA still ages out.
pub const DEFAULT_DAYS: u32 = 730;

/// The arguments of `ca`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

/// The subcommands of `ca`.
#[derive(Debug, Subcommand)]
pub enum Action {
    /// Write DIR/ca.pem and DIR/ca.key (mode 0600): a CA whose name constraints permit only
    /// the names the configuration inspects (its path rules and inspect.hosts) and no IP
    /// address. The configuration's own inspect.ca_cert and inspect.ca_key are ignored.
    Init {
        /// The folder to write ca.pem and ca.key into (made if missing).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, short)]
        config: PathBuf,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
        days: u32,
        /// Make a CA without name constraints, which can sign for any name (weaker).
        #[arg(long)]
        unconstrained: bool,
        /// Replace existing ca.pem and ca.key.
        #[arg(long)]
        force: bool,
    },
    /// Print a CA's subject, SHA-256 fingerprint, expiry and name constraints, and the
    /// commands that install it on compute (never its key).
    Show {
        /// A configuration whose inspect.ca_cert to show.
        #[arg(long, short, conflicts_with = "cert")]
        config: Option<PathBuf>,
        /// A CA certificate file to show.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

/// `ca init`: 0 after writing the files, 2 on a configuration or usage error (nothing
/// inspected without `--unconstrained`, files that exist without `--force`); `ca show`: 0,
/// or 2 when the CA cannot be read.
pub fn run(args: Args) -> i32 {
    let mut out = io::stdout().lock();
    let outcome = match args.action {
        Action::Init {
            out: dir,
            config,
            days,
            unconstrained,
            force,
        } => init(&dir, &config, days, unconstrained, force, &mut out),
        Action::Show { config, cert } => show(config.as_deref(), cert.as_deref(), &mut out),
    };
    exit_code(outcome.and_then(|code| {
        out.flush()?;
        Ok(code)
    }))
}

/// The configuration compiled without its own CA (`inspect.ca_cert`, `inspect.ca_key`),
/// which `ca init` neither reads nor checks; its problems are printed.
fn without_ca(command: &str, path: &Path) -> Result<Compiled, i32> {
    let print = |e: config::ConfigError| {
        eprintln!("aml-egress {command}: {e}");
        EXIT_USAGE
    };
    let mut s = Settings::load(Some(path)).map_err(print)?;
    s.inspect.ca_cert = None;
    s.inspect.ca_key = None;
    config::compile(s).map_err(print)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown host".to_owned())
}

fn init(
    dir: &Path,
    config_path: &Path,
    days: u32,
    unconstrained: bool,
    force: bool,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let c = match without_ca("ca init", config_path) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let subtrees = c.inspect.subtrees();
    if subtrees.is_empty() && !unconstrained {
        eprintln!(
            "aml-egress ca init: {} inspects nothing (no path rule on a port in proxy.tls_ports, no inspect.hosts), so a CA constrained to what it inspects could sign for no name; add inspect.hosts or a path rule, or use --unconstrained",
            config_path.display()
        );
        return Ok(EXIT_USAGE);
    }
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                eprintln!(
                    "aml-egress ca init: {} exists; give --force to replace it (compute that trusts the old CA must then be given the new one)",
                    p.display()
                );
                return Ok(EXIT_USAGE);
            }
        }
    }
    if unconstrained {
        eprintln!(
            "aml-egress ca init: --unconstrained: this CA has no name constraints, so whoever holds ca.key can make certificates that compute accepts for any name (a bank, login.microsoftonline.com, a package index). A constrained CA limits a stolen key to the names the configuration inspects; prefer it, and make a new one when those names change."
        );
    }
    let permitted = (!unconstrained).then_some(subtrees.as_slice());
    let new = ca::generate(permitted, days, &host_name(), SystemTime::now())
        .map_err(|e| anyhow::anyhow!("cannot make the CA: {e}"))?;
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot make {}: {e}", dir.display()))?;
    ca::write_new(&key_path, &new.key_pem, 0o600, force)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", key_path.display()))?;
    ca::write_new(&cert_path, &new.cert_pem, 0o644, force)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", cert_path.display()))?;
    writeln!(
        out,
        "wrote {} (the CA certificate) and {} (its private key, mode 0600)",
        cert_path.display(),
        key_path.display()
    )?;
    describe(&new.cert, out)?;
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    writeln!(out)?;
    writeln!(out, "next:")?;
    writeln!(
        out,
        "  1. in {}, set (the key file must stay readable by the proxy's user alone):",
        config_path.display()
    )?;
    writeln!(out, "       [inspect]")?;
    writeln!(
        out,
        "       ca_cert = {:?}",
        absolute(&cert_path).display().to_string()
    )?;
    writeln!(
        out,
        "       ca_key = {:?}",
        absolute(&key_path).display().to_string()
    )?;
    writeln!(
        out,
        "  2. install {} on compute: aml-egress ca show --cert {} prints the commands",
        cert_path.display(),
        cert_path.display()
    )?;
    Ok(EXIT_OK)
}

/// The lines `init` and `show` share: subject, name constraints, fingerprint, expiry.
fn describe(cert: &CaCert, out: &mut dyn Write) -> io::Result<()> {
    writeln!(out, "subject: {}", cert.subject)?;
    match &cert.constraints {
        Some(c) => writeln!(
            out,
            "name constraints{}: {}",
            if c.critical { " (critical)" } else { "" },
            c.describe()
        )?,
        None => writeln!(
            out,
            "name constraints: none: unconstrained (it can sign for any name)"
        )?,
    }
    writeln!(out, "SHA-256 fingerprint: {}", cert.fingerprint)?;
    let left = cert.seconds_left(SystemTime::now());
    let when = crate::clock::rfc3339(cert.not_after);
    if left >= 0 {
        writeln!(
            out,
            "expires: {when} ({} days left)",
            (left + 43_200) / 86_400
        )
    } else {
        writeln!(
            out,
            "expires: {when} (EXPIRED {} days ago)",
            (43_200 - left) / 86_400
        )
    }
}

fn show(
    config_path: Option<&Path>,
    cert: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<i32> {
    let path: PathBuf = match (config_path, cert) {
        (_, Some(c)) => c.to_owned(),
        (Some(f), None) => match Settings::load(Some(f)) {
            Err(e) => {
                eprintln!("aml-egress ca show: {e}");
                return Ok(EXIT_USAGE);
            }
            Ok(s) => match s.inspect.ca_cert {
                Some(c) => c,
                None => {
                    eprintln!(
                        "aml-egress ca show: {} sets no inspect.ca_cert; give --cert FILE, or make a CA with aml-egress ca init",
                        f.display()
                    );
                    return Ok(EXIT_USAGE);
                }
            },
        },
        (None, None) => {
            eprintln!(
                "aml-egress ca show: give --config FILE (with inspect.ca_cert) or --cert FILE"
            );
            return Ok(EXIT_USAGE);
        }
    };
    let cert = match ca::read_cert(&path) {
        Ok(c) => c,
        Err(p) => {
            eprintln!(
                "aml-egress ca show: {}: {}; {}",
                path.display(),
                p.problem,
                p.fix
            );
            return Ok(EXIT_USAGE);
        }
    };
    writeln!(out, "certificate: {}", path.display())?;
    describe(&cert, out)?;
    if let (Some(f), Some(c)) = (config_path, &cert.constraints)
        && let Ok(compiled) = without_ca("ca show", f)
    {
        let missing = compiled.inspect.not_permitted(c);
        if missing.is_empty() {
            writeln!(
                out,
                "{}: every inspected name is permitted ({})",
                f.display(),
                compiled.inspect.inspected.len()
            )?;
        } else {
            let names: Vec<String> = missing.iter().map(|i| i.pattern.to_string()).collect();
            writeln!(
                out,
                "{}: NOT permitted: {} (make a new CA with aml-egress ca init --config {} --out DIR --force)",
                f.display(),
                names.join(", "),
                f.display()
            )?;
        }
    }
    let installed = "/usr/local/share/ca-certificates/aml-egress.crt";
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    writeln!(out)?;
    writeln!(
        out,
        "install on compute: copy {} there as ca.pem, then (as root where needed):",
        path.display()
    )?;
    for (who, how) in [
        (
            "Ubuntu, Debian",
            format!("cp ca.pem {installed} && update-ca-certificates"),
        ),
        (
            "Python requests, pip",
            format!("export REQUESTS_CA_BUNDLE={bundle} PIP_CERT={bundle} SSL_CERT_FILE={bundle}"),
        ),
        ("conda", format!("conda config --set ssl_verify {bundle}")),
        (
            "Java",
            format!(
                "keytool -importcert -noprompt -cacerts -storepass changeit -alias aml-egress -file {installed}"
            ),
        ),
        ("Node.js", format!("export NODE_EXTRA_CA_CERTS={installed}")),
        (
            "git",
            format!("git config --global http.sslCAInfo {bundle}"),
        ),
        (
            "Azure ML SDK (certifi's own bundle)",
            format!("cat {installed} >> \"$(python -m certifi)\""),
        ),
    ] {
        writeln!(out, "  {who}: {how}")?;
    }
    Ok(EXIT_OK)
}
