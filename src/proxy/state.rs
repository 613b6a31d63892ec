//! The proxy's state: the live configuration (swapped whole on reload, read without a lock
//! on the hot path), the connection limit and what a lowered limit still owes, and the
//! tracker that lets shutdown drain open connections and tunnels with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::dial::{DialConfig, Resolver};
use super::{per_client, pool};
use crate::config::Built;
use crate::config::Compiled;
use crate::logs::LogBudget;
use crate::metrics::{Limit, Metrics};

pub use crate::config::Mode;

/// Runtime settings of the proxy, derived once from a [`Compiled`] configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub mode: Mode,
    pub allow_clients: Vec<IpNet>,
    pub max_connections: usize,
    /// `0`: no limit.
    pub max_connections_per_client: usize,
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub grace_period: Duration,
    pub tls_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub sni_missing_allowed: bool,
    /// Which address a redirected TLS connection is dialled at.
    pub transparent_dial: crate::config::TransparentDial,
    /// Add `Via` to forwarded messages.
    pub via: bool,
    /// After SIGTERM, how long the listeners keep accepting while not ready.
    pub shutdown_delay: Duration,
    pub sni_timeout: Duration,
    pub dial: Arc<DialConfig>,
}

impl ProxyConfig {
    /// From a compiled configuration; `own` are the bound listening sockets, `deny_cidrs`
    /// the policy's `[[deny]]` networks.
    pub fn new(
        s: &Compiled,
        own: Vec<SocketAddr>,
        resolver: Resolver,
        deny_cidrs: Vec<(IpNet, crate::policy::PortSet, String)>,
    ) -> Self {
        let p = &s.proxy;
        ProxyConfig {
            mode: p.mode,
            allow_clients: p.allow_clients.clone(),
            max_connections: p.max_connections,
            max_connections_per_client: p.max_connections_per_client,
            max_header_bytes: p.max_header_bytes,
            header_timeout: p.header_timeout_secs,
            idle_timeout: p.idle_timeout_secs,
            grace_period: p.grace_period_secs,
            tls_ports: p.tls_ports.clone(),
            opaque_ports: p.opaque_ports.clone(),
            sni_missing_allowed: p.sni_missing == crate::config::SniMissing::Allow,
            transparent_dial: s.transparent.dial,
            via: p.via,
            shutdown_delay: p.shutdown_delay_secs,
            sni_timeout: p.sni_timeout_secs,
            dial: Arc::new(DialConfig {
                connect_to: s
                    .upstream
                    .connect_to
                    .0
                    .iter()
                    .map(|(t, a)| (t.to_string(), *a))
                    .collect(),
                allow_cidrs: s.upstream.allow_cidrs.clone(),
                deny_cidrs,
                deny_private: s.upstream.private_ranges == crate::config::PrivateRanges::Deny,
                timeout: s.upstream.dial_timeout_secs,
                own,
                resolver: Some(resolver),
            }),
        }
    }
}

/// Counts live connections and tunnels so that shutdown can wait for them, and closes
/// what is left when the grace period is over.
#[derive(Debug)]
pub struct Tracker {
    live: AtomicUsize,
    idle: Notify,
    closing: watch::Sender<bool>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            live: AtomicUsize::new(0),
            idle: Notify::new(),
            closing: watch::Sender::new(false),
        }
    }
}

/// Held while a connection or tunnel is open.
pub struct TrackGuard(Arc<Tracker>);

impl Tracker {
    /// Register one more open connection or tunnel.
    pub fn track(self: &Arc<Self>) -> TrackGuard {
        self.live.fetch_add(1, Ordering::SeqCst);
        TrackGuard(self.clone())
    }

    /// Open connections and tunnels.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Tell every open connection and tunnel to close now.
    pub fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves when [`Tracker::close_all`] has been called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Wait until nothing is open.
    pub async fn drained(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything a configuration load produces: the compiled policy, the runtime settings,
/// the upstream pools and the TLS certificate. Swapped whole on reload, so that a request
/// sees one consistent version from decision to dial.
pub struct Live {
    pub built: Built,
    pub config: ProxyConfig,
    pub upstream: pool::Upstream,
    pub tls: Option<TlsAcceptor>,
    /// The process's metrics (the same registry across reloads).
    pub metrics: Arc<Metrics>,
    /// The process's log budget (kept across reloads).
    pub logs: Arc<LogBudget>,
}

impl Live {
    /// Count a client turned away by `which`; says whether to log it.
    pub(crate) fn limit_hit(&self, which: Limit) -> bool {
        self.metrics.limit(which);
        self.logs.line()
    }
}

/// State shared by every connection: the live configuration (swapped on reload without a
/// lock on the hot path), the tracker of open connections and tunnels, and the stop signal.
pub struct Shared {
    live: ArcSwap<Live>,
    pub tracker: Arc<Tracker>,
    /// Flips to `true` when shutdown starts.
    pub stopping: watch::Receiver<bool>,
    pub(super) limit: Arc<Semaphore>,
    /// The connection limit the semaphore was sized for.
    max_connections: AtomicUsize,
    /// Permits a lowered limit still has to take back from open connections.
    pub(super) owed: Arc<AtomicUsize>,
    /// Open connections by client address.
    pub(super) per_client: Arc<per_client::PerClient>,
}

impl Shared {
    /// Shared state serving `live` until `stopping` flips.
    pub fn new(live: Live, stopping: watch::Receiver<bool>) -> Arc<Shared> {
        let max = live.config.max_connections;
        let limit = Arc::new(Semaphore::new(max));
        Arc::new(Shared {
            max_connections: AtomicUsize::new(max),
            owed: Arc::default(),
            per_client: Arc::default(),
            live: ArcSwap::from_pointee(live),
            tracker: Default::default(),
            stopping,
            limit,
        })
    }

    /// The configuration in force now; a request keeps the one it started with.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Put a new configuration in force for new requests; open tunnels keep theirs. A new
    /// `proxy.max_connections` takes effect as connections close (permits are not revoked
    /// from open ones).
    pub fn replace(&self, live: Live) {
        let new = live.config.max_connections;
        let old = self.max_connections.swap(new, Ordering::SeqCst);
        if new > old {
            // Cancel what a lowered limit still owes before adding permits.
            let mut extra = new - old;
            let _ = self
                .owed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |owed| {
                    let cancel = owed.min(new - old);
                    extra = new - old - cancel;
                    Some(owed - cancel)
                });
            self.limit.add_permits(extra);
        } else if new < old {
            let debt = (old - new) - self.limit.forget_permits(old - new);
            self.owed.fetch_add(debt, Ordering::SeqCst);
        }
        self.live.store(Arc::new(live));
    }
}
