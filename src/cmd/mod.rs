//! The subcommands, one file each: every one takes its parsed arguments (a `clap::Args`
//! struct defined beside it) and returns the process's exit code. `main` only parses
//! arguments and calls these; what the commands compute lives in the library ([`crate::config`],
//! [`crate::export`], [`crate::suggest`], [`crate::nva`], ...), what they print here.

pub mod allowed;
pub mod ca;
pub mod catalog;
pub mod check;
pub mod denied;
pub mod export;
pub mod health;
pub mod nva_rules;
pub mod serve;
pub mod suggest;
pub mod validate;

use std::io;
use std::path::Path;
use std::time::Duration;

use crate::config::{self, Compiled};

/// Exit code: every target allowed / the file is valid.
pub const EXIT_OK: i32 = 0;
/// Exit code: at least one target denied.
pub const EXIT_DENIED: i32 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: i32 = 2;

/// The exit code of a command that may fail on output: its own code; 0 when standard output
/// was closed early (`aml-egress catalog | head` is not an error); otherwise the error on
/// standard error and [`EXIT_USAGE`].
pub fn exit_code(outcome: anyhow::Result<i32>) -> i32 {
    match outcome {
        Ok(code) => code,
        Err(e)
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) =>
        {
            EXIT_OK
        }
        Err(e) => {
            eprintln!("aml-egress: {e:#}");
            EXIT_USAGE
        }
    }
}

/// Load settings and build the policy for `command`; on failure print the problems
/// (`aml-egress COMMAND: N problems ...`) and give the exit code, [`EXIT_USAGE`].
pub fn load(command: &str, path: Option<&Path>) -> Result<Compiled, i32> {
    config::load(path).map_err(|e| {
        eprintln!("aml-egress {command}: {e}");
        EXIT_USAGE
    })
}

/// The policy `--policy NAME` names for `command`: `default` or a `[[client_policy]]`'s
/// name; an unknown name is printed with the policies there are, and gives
/// [`EXIT_USAGE`].
pub fn named_policy(
    command: &str,
    clients: &config::ClientPolicies,
    name: &str,
) -> Result<config::Chosen, i32> {
    clients.named(name).ok_or_else(|| {
        eprintln!(
            "aml-egress {command}: --policy {name:?}: no such policy; this configuration has {}",
            clients.names().join(", ")
        );
        EXIT_USAGE
    })
}

/// The compiled policy a choice names (the default one for a refused client, which
/// [`config::ClientPolicies::named`] never gives).
pub fn chosen_built(c: &Compiled, chosen: config::Chosen) -> &config::Built {
    match chosen {
        config::Chosen::Client(i) => &c.clients.policies[i].built,
        config::Chosen::Default | config::Chosen::Refused => &c.built,
    }
}

/// One GET to the admin listener for the client subcommands (`health`; `denied`,
/// `allowed` and `suggest` ask every instance with [`admin_get_all`]): reads the bearer token file when given, runs the request on a small
/// runtime and returns the body of a 200 answer, or one line saying what went wrong
/// (including, with `timeout`, that no answer came in time).
pub fn admin_get(
    admin: &str,
    path: &str,
    token_file: Option<&Path>,
    timeout: Option<Duration>,
) -> Result<String, String> {
    let (rt, token) = client_setup(token_file)?;
    rt.block_on(async {
        let fetch = crate::admin::fetch(admin, path, token.as_deref());
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

/// What every admin client needs first: the bearer token (from `token_file`, when given)
/// and a small runtime for the requests.
fn client_setup(
    token_file: Option<&Path>,
) -> Result<(tokio::runtime::Runtime, Option<String>), String> {
    let token = token_file
        .map(crate::admin::read_token)
        .transpose()
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    Ok((rt, token))
}

/// The same GET from each admin listener of a fleet, all at once (one slow instance does
/// not wait behind another): the bodies in the order of `admins`, or the first failure in
/// that order, which names its instance (the errors of [`crate::admin::fetch`] do).
pub fn admin_get_all(
    admins: &[String],
    path: &str,
    token_file: Option<&Path>,
) -> Result<Vec<String>, String> {
    let (rt, token) = client_setup(token_file)?;
    rt.block_on(async {
        let asked: Vec<_> = admins
            .iter()
            .map(|admin| {
                let (admin, path, token) = (admin.clone(), path.to_owned(), token.clone());
                tokio::spawn(
                    async move { crate::admin::fetch(&admin, &path, token.as_deref()).await },
                )
            })
            .collect();
        let mut bodies = Vec::with_capacity(asked.len());
        for (admin, task) in admins.iter().zip(asked) {
            let body = task.await.map_err(|e| format!("asking {admin}: {e}"))??;
            bodies.push(body);
        }
        Ok(bodies)
    })
}
