//! From a compiled configuration to a live one: the I/O a configuration needs (the DNS
//! resolver, the TLS certificate, the upstream pools), in one place for `serve`, reload,
//! the CLI commands, the tests and the benches.
//!
//! `config file + env → Settings → checks → Compiled` is [`crate::config::load`]; this is
//! the last step before the live swap ([`crate::proxy::Shared::replace`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Compiled;
use crate::logs::LogBudget;
use crate::metrics::Metrics;
use crate::proxy::dial::Resolver;
use crate::proxy::{Live, ProxyConfig, pool, tls};

/// Why a compiled configuration could not be put to work; each names the setting or file.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(
        "cannot read the system's DNS settings (/etc/resolv.conf): {0}; list DNS servers in upstream.name_servers"
    )]
    SystemDns(String),
    #[error("cannot start the DNS resolver: {0}")]
    Resolver(String),
    /// A file a key names: the key, the file, what is wrong and what to do.
    #[error("{key} {}: {problem}", path.display())]
    File {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("{0}")]
    Tls(String),
    #[error(
        "cannot start the worker threads (proxy.workers): {0}; lower proxy.workers, or raise the process's thread or open-files limit (TasksMax, LimitNOFILE)"
    )]
    Workers(std::io::Error),
    #[error("cannot listen on {key} {addr}: {source}")]
    Listen {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Build the live configuration; `own` are the proxy's bound listening sockets (proxy, TLS
/// and admin), which the dialler refuses.
pub fn live(
    c: Compiled,
    own: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    logs: Arc<LogBudget>,
) -> Result<Live, SetupError> {
    let servers: Vec<SocketAddr> = c.upstream.name_servers.iter().map(|n| n.0).collect();
    let resolver = Resolver::new(&servers)?;
    let deny = c.built.policy.deny_networks();
    let config = ProxyConfig::new(&c, own, resolver, deny);
    // Loaded whenever configured, so that a reload that drops tls_listen (which only a
    // restart changes) still has the certificate for the bound TLS listeners.
    let tls = match (&c.proxy.tls_cert, &c.proxy.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let upstream = pool::Upstream::new(
        config.dial.clone(),
        config.idle_timeout,
        config.max_header_bytes,
        metrics.clone(),
    );
    Ok(Live {
        built: c.built,
        config,
        upstream,
        tls,
        metrics,
        logs,
    })
}
