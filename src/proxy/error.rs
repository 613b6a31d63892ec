//! Why a compiled configuration could not be put to work: the errors of binding the
//! listeners, starting the resolver and the worker threads, and reading the TLS files.

use std::net::SocketAddr;
use std::path::PathBuf;

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
