//! `aml-egress validate`: check a configuration file and print a summary.

use std::io::{self, Write};
use std::path::PathBuf;

use super::{EXIT_OK, exit_code, load};
use crate::config::{Built, ClientPolicies};
use crate::inspect::{Inspection, Why};

/// The arguments of `validate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short)]
    pub config: PathBuf,
    /// Summarise this policy instead of the default one: `default`, or a
    /// [[client_policy]]'s name.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
}

/// `validate`: 0 and the summary when the file is valid, 2 and every problem when not.
pub fn run(args: Args) -> i32 {
    exit_code(validate(args))
}

fn validate(args: Args) -> anyhow::Result<i32> {
    let c = match load("validate", Some(&args.config)) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut out = io::stdout().lock();
    let origin = args.config.display().to_string();
    match &args.policy {
        Some(name) => {
            let chosen = match super::named_policy("validate", &c.clients, name) {
                Ok(chosen) => chosen,
                Err(code) => return Ok(code),
            };
            print_summary(super::chosen_built(&c, chosen), &origin, &mut out)?;
            print_policy(&c.clients, chosen, &mut out)?;
        }
        None => {
            print_summary(&c.built, &origin, &mut out)?;
            print_clients(&c.clients, &mut out)?;
        }
    }
    print_inspection(&c.inspect, !c.clients.policies.is_empty(), &mut out)?;
    out.flush()?;
    Ok(EXIT_OK)
}

/// Print `validate`'s summary: rules per kind and every warning.
pub fn print_summary(built: &Built, origin: &str, out: &mut dyn Write) -> io::Result<()> {
    let c = built.policy.counts();
    writeln!(
        out,
        "{origin}: valid (catalog {} for the {} cloud)",
        built.revision, built.cloud
    )?;
    writeln!(
        out,
        "rules: {} exact, {} wildcard, {} with a path, {} regex, {} cidr allow; {} deny; {} catalog entries not enforced by a proxy",
        c.exact,
        c.wildcard,
        c.path,
        c.regex,
        c.cidr,
        c.deny,
        built.reference.len()
    )?;
    let features: Vec<&str> = built.features.iter().map(String::as_str).collect();
    writeln!(
        out,
        "optional parts on: {}",
        if features.is_empty() {
            "none".to_owned()
        } else {
            features.join(", ")
        }
    )?;
    writeln!(out, "warnings: {}", built.warnings.len())?;
    for w in &built.warnings {
        writeln!(out, "  - {w}")?;
    }
    Ok(())
}

/// Print the client policies: whom each serves, its catalog and rules, its warnings; and
/// what serves everyone else.
pub fn print_clients(clients: &ClientPolicies, out: &mut dyn Write) -> io::Result<()> {
    if clients.policies.is_empty() {
        return Ok(());
    }
    writeln!(out, "client policies: {}", clients.policies.len())?;
    for cp in &clients.policies {
        let c = cp.built.policy.counts();
        let mut whom: Vec<String> = cp.sources.iter().map(ToString::to_string).collect();
        whom.extend(cp.client_names.iter().map(|n| format!("certificate {n}")));
        writeln!(
            out,
            "  - {} ({}): {}; catalog {} for the {} cloud, {} exact, {} wildcard, {} with a path, {} cidr allow; {} deny; {} warnings",
            cp.name,
            cp.mode.as_str(),
            whom.join(", "),
            cp.built.revision,
            cp.built.cloud,
            c.exact,
            c.wildcard,
            c.path,
            c.cidr,
            c.deny,
            cp.built.warnings.len()
        )?;
        for w in &cp.built.warnings {
            writeln!(out, "      - {w}")?;
        }
    }
    let rest = match clients.unmatched {
        crate::config::UnmatchedClients::Default => "served by the default policy",
        crate::config::UnmatchedClients::Refuse => "refused (no_policy_for_client)",
    };
    writeln!(out, "other clients: {rest} (policy.unmatched_clients)")
}

/// Print whom the policy `chosen` serves (after its summary, for `validate --policy`).
pub fn print_policy(
    clients: &ClientPolicies,
    chosen: crate::config::Chosen,
    out: &mut dyn Write,
) -> io::Result<()> {
    match chosen {
        crate::config::Chosen::Client(i) => {
            let cp = &clients.policies[i];
            let mut whom: Vec<String> = cp.sources.iter().map(ToString::to_string).collect();
            whom.extend(cp.client_names.iter().map(|n| format!("certificate {n}")));
            writeln!(
                out,
                "policy {} ({}): serves {}",
                cp.name,
                cp.mode.as_str(),
                whom.join(", ")
            )
        }
        _ if clients.policies.is_empty() => Ok(()),
        _ => {
            let whom = match clients.unmatched {
                crate::config::UnmatchedClients::Default => {
                    "serves the clients no [[client_policy]] claims"
                }
                crate::config::UnmatchedClients::Refuse => {
                    "serves no client (policy.unmatched_clients = \"refuse\")"
                }
            };
            writeln!(out, "policy default: {whom}")
        }
    }
}

/// Print which tunnels will be inspected and why (after the warnings, which include a path
/// rule over a bypassed name); `several`: the configuration has client policies, whose
/// inspected names are listed together (one CA serves them all).
pub fn print_inspection(i: &Inspection, several: bool, out: &mut dyn Write) -> io::Result<()> {
    let over = if several {
        " over every policy (one CA serves them all)"
    } else {
        ""
    };
    match &i.ca {
        Some(ca) => {
            let days = (ca.cert.seconds_left(std::time::SystemTime::now()) + 43_200) / 86_400;
            writeln!(
                out,
                "TLS inspection: on, CA {} (expires {}, {days} days left)",
                ca.cert_path.display(),
                crate::clock::rfc3339(ca.cert.not_after)
            )?;
            if i.inspected.is_empty() {
                writeln!(
                    out,
                    "inspected: nothing (no path rule on a TLS port, no inspect.hosts)"
                )?;
            } else {
                writeln!(out, "inspected{over}: {}", i.inspected.len())?;
            }
        }
        None if i.inspected.is_empty() => {
            writeln!(out, "TLS inspection: off (inspect.ca_cert is not set)")?;
        }
        None => writeln!(
            out,
            "TLS inspection: off (inspect.ca_cert is not set); with a CA, inspected{over}: {}",
            i.inspected.len()
        )?,
    }
    for x in &i.inspected {
        match x.why {
            Why::PathRule => writeln!(out, "  - {}: path rule {}", x.pattern, x.what)?,
            Why::Hosts => writeln!(out, "  - {}: inspect.hosts", x.pattern)?,
        }
    }
    if !i.bypass().is_empty() {
        let names: Vec<String> = i.bypass().iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "never inspected (inspect.bypass): {}",
            names.join(", ")
        )?;
    }
    Ok(())
}
