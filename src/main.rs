//! The `aml-egress` command line: parse the arguments and hand each subcommand to its
//! function in [`aml_egress::cmd`], whose exit code becomes the process's.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use aml_egress::cmd;

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

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (embedded defaults without --config: public cloud, newest catalog, 127.0.0.1:3128).
    Serve(cmd::serve::Args),
    /// Say whether destinations would be allowed, and by which rule (exit 0 all allowed, 1 any denied, 2 error).
    Check(cmd::check::Args),
    /// Print the rendered rule set that will be enforced, each rule with its source.
    Catalog(cmd::catalog::Args),
    /// Print the most denied destinations of a running proxy, with the entry that would allow each (exit 0, or 2 if the proxy cannot be asked).
    Denied(cmd::denied::Args),
    /// Print the names let through under each wildcard allow rule of a running proxy (or a
    /// fleet's, merged), most recently seen first (exit 0, or 2 if a proxy cannot be asked).
    Allowed(cmd::allowed::Args),
    /// Check a configuration file and print a summary (exit 0 valid, 2 invalid).
    Validate(cmd::validate::Args),
    /// Print the enforced rule set for another enforcement point: an Azure Firewall Policy
    /// rule collection group (ARM JSON), or Squid acl and http_access lines.
    Export(cmd::export::Args),
    /// Suggest [[allow]] entries from refused (or, in audit mode, would-be refused) traffic:
    /// a running proxy's /denied, or its JSON log files; with --narrow, a [catalog.narrow]
    /// table of the names seen under each wildcard rule.
    Suggest(cmd::suggest::Args),
    /// Ask a running proxy whether it is ready (its `/readyz`): exit 0 when it is, 1 on
    /// every failure (for container health checks).
    Health(cmd::health::Args),
    /// Print an nftables rule set for a network virtual appliance VM (`nft -f` loads it).
    NvaRules(cmd::nva_rules::Args),
    /// Make (`init`) or show (`show`) the CA that signs inspected tunnels' certificates,
    /// constrained to the names the configuration inspects.
    Ca(cmd::ca::Args),
}

fn main() -> ExitCode {
    let code = match Args::parse().command {
        Command::Serve(a) => cmd::serve::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Catalog(a) => cmd::catalog::run(a),
        Command::Denied(a) => cmd::denied::run(a),
        Command::Allowed(a) => cmd::allowed::run(a),
        Command::Validate(a) => cmd::validate::run(a),
        Command::Export(a) => cmd::export::run(a),
        Command::Suggest(a) => cmd::suggest::run(a),
        Command::Health(a) => cmd::health::run(a),
        Command::NvaRules(a) => cmd::nva_rules::run(a),
        Command::Ca(a) => cmd::ca::run(a),
    };
    // Exit codes are 0, 1 and 2.
    ExitCode::from(code as u8)
}
