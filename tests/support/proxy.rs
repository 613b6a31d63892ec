//! A proxy started in-process from TOML, exactly as `serve` starts it, on 127.0.0.1:0 with
//! its admin listener on 127.0.0.1:0 too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use aml_egress::config::{self, Compiled, Settings};
use aml_egress::reload::Reloader;
use aml_egress::server;
use tokio::sync::watch;

/// A running proxy and how to stop it.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The first TLS listener, when `proxy.tls_listen` is set.
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub reloader: Arc<Reloader>,
    pub stop: watch::Sender<bool>,
    pub done: tokio::task::JoinHandle<usize>,
}

/// Start the proxy with a config (TOML); its listeners are moved to 127.0.0.1:0.
pub async fn start_proxy(toml: &str) -> Proxy {
    let mut c = super::compiled(toml);
    c.proxy.listen = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    c.admin.listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    start_compiled(c).await
}

/// Start from a config file (so that reload re-reads it), with an empty environment; the
/// file chooses the listeners.
pub async fn start_file(path: &Path) -> Proxy {
    let s = Settings::load_with_env(Some(path), Some(Default::default()))
        .unwrap_or_else(|e| panic!("{e}"));
    start_compiled(config::compile(s).unwrap_or_else(|e| panic!("{e}"))).await
}

async fn start_compiled(c: Compiled) -> Proxy {
    let tls = !c.proxy.tls_listen.is_empty();
    let (stop, stopping) = watch::channel(false);
    let running = server::start(c, stopping)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Proxy {
        addr: running.addrs[0],
        tls_addr: tls.then(|| running.addrs[1]),
        admin_addr: running.admin_addr.expect("an admin listener"),
        reloader: running.reloader,
        stop,
        done: running.done,
    }
}

impl Proxy {
    /// The metrics exposition, from the admin listener.
    pub async fn metrics(&self) -> String {
        super::net::get(self.admin_addr, "/metrics", None).await.1
    }

    /// Wait until a sample reads `value` (polling the exposition, at most 10 s): for
    /// state the proxy reaches on its own threads, such as connections it has accepted.
    pub async fn until_sample(&self, series: &str, value: f64) {
        for _ in 0..1000 {
            if self.sample(series).await == value {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{series} never reached {value}");
    }

    /// The value of one sample of the exposition (`name{labels}` exactly as printed, labels
    /// in alphabetical order), 0 when absent.
    pub async fn sample(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}
