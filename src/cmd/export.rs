//! `aml-egress export`: the enforced rule set for another enforcement point (the
//! translation itself is [`crate::export`]).
//!
//! With `[[client_policy]]` policies and no `--policy`, every policy is exported, each for
//! the addresses it serves: Azure Firewall gets one rule collection group per policy,
//! Squid a section per policy. The default policy serves "every other client", which an
//! Azure Firewall rule cannot say: it is exported only for the `--source` addresses given.

use std::io::{self, Write};
use std::path::PathBuf;

use clap::ValueEnum;

use super::{EXIT_OK, EXIT_USAGE, exit_code, named_policy};
use crate::config::{
    Built, Chosen, ClientPolicies, Settings, build_client_policies, build_policy, parse_cidr,
};
use crate::export::{Export, PolicyPart, SquidDefault, group_priority};

/// The arguments of `export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, value_enum)]
    pub format: Format,
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Source addresses the rules apply to (repeatable). Default: the policy's own
    /// sources for a [[client_policy]], any for the default policy. Without --policy in a
    /// configuration with client policies, the sources of the default policy's rules.
    #[arg(long = "source", value_name = "CIDR")]
    pub source: Vec<String>,
    /// Export this policy alone: `default`, or a [[client_policy]]'s name.
    #[arg(long, value_name = "NAME")]
    pub policy: Option<String>,
}

/// What `export` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    AzureFirewall,
    Squid,
}

/// `export`: the rule set on standard output and a warning for each rule the target
/// cannot express; 0, or 2 on a configuration error or an unknown `--policy`.
pub fn run(args: Args) -> i32 {
    exit_code(export(args))
}

fn export(args: Args) -> anyhow::Result<i32> {
    let settings = match Settings::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("aml-egress export: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    // Path rules are written as policy.tls_path_rules says (widened or left out).
    let tls_path_rules = settings.policy.tls_path_rules;
    // The policies without the rest of the configuration: no inspection CA is read.
    let built = build_policy(&settings).and_then(|b| Ok((b, build_client_policies(&settings)?)));
    let (built, clients) = match built {
        Ok(b) => b,
        Err(e) => {
            eprintln!("aml-egress export: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    let mut notes = Vec::new();
    let e = match &args.policy {
        Some(name) => {
            let chosen = match named_policy("export", &clients, name) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let (built, sources) = match one_policy(&built, &clients, chosen, &args.source) {
                Ok(x) => x,
                Err(why) => {
                    eprintln!("aml-egress export: --policy {name:?}: {why}");
                    return Ok(EXIT_USAGE);
                }
            };
            if chosen == Chosen::Default && args.source.is_empty() && !clients.policies.is_empty() {
                notes.push("the default policy's rules are exported for any source, the client policies' clients included: give --source CIDR (the clients no policy claims)".to_owned());
            }
            // The group's name and priority as in the export of every policy (the default
            // one's last), so that groups exported one at a time do not collide.
            let group = match chosen {
                Chosen::Client(i) => Some((format!("aml-egress-{name}"), group_priority(i))),
                _ if !clients.policies.is_empty() => Some((
                    format!("aml-egress-{}", crate::config::clients::DEFAULT_POLICY),
                    group_priority(clients.policies.len()),
                )),
                _ => None,
            };
            match (args.format, group) {
                (Format::AzureFirewall, Some((group, priority))) => {
                    crate::export::azure_firewall_group(
                        built,
                        tls_path_rules,
                        &sources,
                        (&group, priority),
                    )
                }
                _ => single(args.format, built, tls_path_rules, &sources),
            }
        }
        None if clients.policies.is_empty() => {
            single(args.format, &built, tls_path_rules, &args.source)
        }
        None => every_policy(
            args.format,
            &built,
            &clients,
            tls_path_rules,
            &args.source,
            &mut notes,
        ),
    };
    // Audit mode is the proxy's: a firewall enforces whatever it is given.
    let audited: Vec<&str> = match &args.policy {
        Some(name) => vec![name.as_str()],
        None => {
            let mut names = clients.names();
            // A default policy that serves nobody ("refuse" beside client policies) is
            // not exported.
            if clients.unclaimed() != Chosen::Default {
                names.remove(0);
            }
            names
        }
    }
    .into_iter()
    .filter(|n| {
        let chosen = clients.named(n).unwrap_or(Chosen::Default);
        clients.mode_of(chosen, settings.proxy.mode) == crate::config::Mode::Audit
    })
    .collect();
    for n in audited {
        notes.push(format!(
            "policy {n} is in audit mode: the proxy lets its denials through, but the exported rules enforce them"
        ));
    }
    let mut out = io::stdout().lock();
    out.write_all(e.text.as_bytes())?;
    for w in e.warnings.iter().chain(&notes) {
        eprintln!("warning: {w}");
    }
    out.flush()?;
    Ok(EXIT_OK)
}

fn single(
    format: Format,
    built: &Built,
    tls_path_rules: crate::policy::TlsPathRules,
    sources: &[String],
) -> Export {
    match format {
        Format::AzureFirewall => crate::export::azure_firewall(built, tls_path_rules, sources),
        Format::Squid => crate::export::squid(built, tls_path_rules, sources),
    }
}

/// The rules and source addresses of one chosen policy: `--source` when given, else a
/// client policy's own addresses, else (the default policy) any.
fn one_policy<'a>(
    default: &'a Built,
    clients: &'a ClientPolicies,
    chosen: Chosen,
    source: &[String],
) -> Result<(&'a Built, Vec<String>), String> {
    match chosen {
        Chosen::Client(i) => {
            let cp = &clients.policies[i];
            if !source.is_empty() {
                return Ok((&cp.built, source.to_vec()));
            }
            let served = served(clients, i);
            if served.is_empty() {
                return Err(format!(
                    "policy {} serves no source address of its own (it is chosen by client certificate names, or its sources are all more specific prefixes of other policies): give --source CIDR",
                    cp.name
                ));
            }
            Ok((&cp.built, served))
        }
        Chosen::Default | Chosen::Refused => Ok((default, source.to_vec())),
    }
}

/// The addresses the client policy at `i` serves, as an export writes them.
fn served(clients: &ClientPolicies, i: usize) -> Vec<String> {
    clients.served(i).iter().map(ToString::to_string).collect()
}

/// Every policy, each for the addresses it serves; the default one only where it serves
/// anyone and can be written (notes say why not).
fn every_policy(
    format: Format,
    default: &Built,
    clients: &ClientPolicies,
    tls_path_rules: crate::policy::TlsPathRules,
    source: &[String],
    notes: &mut Vec<String>,
) -> Export {
    let mut parts = Vec::new();
    for (i, cp) in clients.policies.iter().enumerate() {
        let sources = served(clients, i);
        if sources.is_empty() {
            notes.push(format!(
                "policy {} is not exported: it serves no source address of its own (it is chosen by client certificate names, or its sources are all more specific prefixes of other policies); `--policy {} --source CIDR` exports it",
                cp.name, cp.name
            ));
            continue;
        }
        parts.push(PolicyPart {
            name: &cp.name,
            place: i,
            built: &cp.built,
            sources,
        });
    }
    let serves_anyone = clients.unclaimed() == Chosen::Default;
    if !serves_anyone {
        notes.push(format!(
            "the default policy is not exported: policy.unmatched_clients = \"refuse\", so it serves no client{}",
            if source.is_empty() {
                ""
            } else {
                " (--source is not used; `--policy default --source CIDR` exports it anyway)"
            }
        ));
    }
    let claimed = clients.claimed();
    match format {
        Format::AzureFirewall => {
            if serves_anyone && source.is_empty() {
                notes.push("the default policy is not exported: it serves every client no [[client_policy]] claims, which an Azure Firewall rule cannot say; `--source CIDR` (repeatable) adds its group for those addresses, or `--policy default --source CIDR` exports it alone".to_owned());
            } else if serves_anyone {
                for s in source {
                    let Some(net) = parse_cidr(s) else { continue };
                    for cp in &clients.policies {
                        for c in cp
                            .sources
                            .iter()
                            .filter(|c| c.contains(&net.addr()) || net.contains(&c.addr()))
                        {
                            notes.push(format!(
                                "--source {s} overlaps policy {}'s {c}: Azure Firewall would also allow those clients what the default policy allows (the default policy's group comes last)",
                                cp.name
                            ));
                        }
                    }
                }
                parts.push(PolicyPart {
                    name: crate::config::clients::DEFAULT_POLICY,
                    place: clients.policies.len(),
                    built: default,
                    sources: source.to_vec(),
                });
            }
            crate::export::azure_firewall_policies(&parts, tls_path_rules)
        }
        Format::Squid => {
            let d = serves_anyone.then(|| SquidDefault {
                built: default,
                sources: source.to_vec(),
                claimed: claimed.iter().map(ToString::to_string).collect(),
            });
            crate::export::squid_policies(&parts, d.as_ref(), tls_path_rules)
        }
    }
}
