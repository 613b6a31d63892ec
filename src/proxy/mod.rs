//! The forwarding proxy: listeners, the per-connection task, and the hot path that turns a
//! request into a decision, a dial and a tunnel or a forwarded request.
//!
//! Listeners and the shutdown signal are passed in, so that tests bind port 0 and stop the
//! proxy cleanly. Every connection and every upgraded tunnel holds a [`Tracker`] guard, so
//! that shutdown can drain them with a deadline.

mod connect;
pub mod detect;
pub mod dial;
pub mod head;
mod http;
pub mod keepalive;
pub mod per_client;
pub mod pool;
pub mod relay;
pub mod respond;
pub mod sni;
pub mod tls;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Settings;
use crate::loader::Built;
use crate::metrics::{Limit, ListenerKind, Metrics, Outcome};
use crate::policy::{Decision, PathView, Reason, Target};
use dial::{DialConfig, Resolver};
use respond::{Body, refuse};

pub use crate::config::Mode;

/// Runtime settings of the proxy, derived once from [`Settings`].
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
    pub sni_timeout: Duration,
    pub dial: Arc<DialConfig>,
}

impl ProxyConfig {
    /// From checked settings; `own` are the bound listening sockets, `deny_cidrs` the
    /// policy's `[[deny]]` networks.
    pub fn from_settings(
        s: &Settings,
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
}

impl Live {
    /// Build the runtime state for checked settings and a compiled policy; `own` are the
    /// proxy's bound listening sockets. Fails (with a message naming the setting) when the
    /// DNS resolver or the TLS certificate cannot be set up.
    pub fn new(
        s: &Settings,
        built: Built,
        own: Vec<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Result<Live, String> {
        let servers: Vec<SocketAddr> = s.upstream.name_servers.iter().map(|n| n.0).collect();
        let deny = built.policy.deny_networks();
        let config = ProxyConfig::from_settings(s, own, Resolver::new(&servers)?, deny);
        // Loaded whenever configured, so that a reload that drops tls_listen (which only
        // a restart changes) still has the certificate for the bound TLS listeners.
        let tls = match (&s.proxy.tls_cert, &s.proxy.tls_key) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let upstream =
            pool::Upstream::new(config.dial.clone(), config.idle_timeout, metrics.clone());
        Ok(Live {
            built,
            config,
            upstream,
            tls,
            metrics,
        })
    }
}

/// State shared by every connection: the live configuration (swapped on reload without a
/// lock on the hot path), the tracker of open connections and tunnels, and the stop signal.
pub struct Shared {
    live: ArcSwap<Live>,
    pub tracker: Arc<Tracker>,
    /// Flips to `true` when shutdown starts.
    pub stopping: watch::Receiver<bool>,
    limit: Arc<Semaphore>,
    /// The connection limit the semaphore was sized for.
    max_connections: AtomicUsize,
    /// Permits a lowered limit still has to take back from open connections.
    owed: Arc<AtomicUsize>,
    /// Open connections by client address.
    per_client: Arc<per_client::PerClient>,
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

/// The outcome of asking the policy, with the mode applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verdict {
    pub decision: Decision,
    /// Let through (allowed, or denied but in audit mode).
    pub pass: bool,
    /// Denied by the policy but let through by audit mode.
    pub would_deny: bool,
}

impl Live {
    pub(crate) fn judge(&self, target: &Target, view: PathView<'_>) -> Verdict {
        let decision = self.built.policy.decide(target, view);
        self.apply_mode(decision)
    }

    pub(crate) fn apply_mode(&self, decision: Decision) -> Verdict {
        let allowed = decision.is_allowed();
        // Operator deny rules and invalid targets hold even in audit mode.
        let auditable = !matches!(
            decision.reason,
            Reason::DeniedByRule | Reason::InvalidTarget(_)
        );
        let would_deny = !allowed && auditable && self.config.mode == Mode::Audit;
        Verdict {
            decision,
            pass: allowed || would_deny,
            would_deny,
        }
    }

    pub(crate) fn rule_text(&self, d: &Decision) -> String {
        d.rule
            .map(|id| self.built.policy.rule(id).display())
            .unwrap_or_default()
    }

    /// The 403 for a policy refusal.
    pub(crate) fn forbidden(&self, target: &str, d: &Decision) -> hyper::Response<Body> {
        let why = self.built.policy.explain(target, d);
        refuse(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            d.reason.code(),
            &format!(
                "aml-egress refused {target}: {why}. If the workspace needs it, add an [[allow]] entry (or switch on the catalog part that covers it) and reload."
            ),
        )
    }

    /// Refuse a target that could not be parsed (counted and logged like any denial).
    pub(crate) fn refuse_invalid(
        &self,
        via: ListenerKind,
        peer: SocketAddr,
        shown: &str,
        e: crate::policy::InvalidTarget,
    ) -> hyper::Response<Body> {
        let v = self.apply_mode(Decision {
            verdict: crate::policy::Verdict::Deny,
            reason: Reason::InvalidTarget(e),
            rule: None,
        });
        self.note_verdict(via, peer, None, shown, &v);
        self.forbidden(shown, &v.decision)
    }

    /// One decision per request: a refusal or an audit pass is counted (and logged) now,
    /// whatever the dial does next, and a refusal is answered `403` (`Err`). An allow is
    /// returned uncounted, to be counted when the request ends ([`AllowCount`]).
    // The refusal is handed straight back to hyper; boxing it would only add an allocation.
    #[allow(clippy::result_large_err)]
    pub(crate) fn admit(
        &self,
        via: ListenerKind,
        client: SocketAddr,
        target: &Target,
        shown: impl FnOnce() -> String,
        v: &Verdict,
    ) -> Result<Option<AllowCount>, hyper::Response<Body>> {
        if v.pass && !v.would_deny {
            return Ok(Some(AllowCount::new(self, via, v)));
        }
        let shown = shown();
        self.note_verdict(via, client, Some(target), &shown, v);
        if v.pass {
            Ok(None)
        } else {
            Err(self.forbidden(&shown, &v.decision))
        }
    }

    /// Count a policy verdict; denials and would-be denials are also recorded and logged.
    pub(crate) fn note_verdict(
        &self,
        via: ListenerKind,
        client: SocketAddr,
        target: Option<&Target>,
        shown: &str,
        v: &Verdict,
    ) {
        let outcome = if v.would_deny {
            Outcome::WouldDeny
        } else if v.pass {
            Outcome::Allow
        } else {
            Outcome::Deny
        };
        let reason = v.decision.reason.code();
        if outcome == Outcome::Allow {
            self.metrics.decision(via, outcome, reason); // no rule text needed
            return;
        }
        let rule = self.rule_text(&v.decision);
        self.note(&Seen {
            via,
            client,
            target,
            shown,
            seen: "",
            outcome,
            reason,
            rule: &rule,
        });
    }

    /// Count one decision. Denials and would-be denials go into the denied-target table and
    /// get one log line each, at most `log.denied_lines_per_minute` per target.
    pub(crate) fn note(&self, seen: &Seen<'_>) {
        self.metrics.decision(seen.via, seen.outcome, seen.reason);
        if seen.outcome != Outcome::Allow {
            self.record(seen); // allowed connections are logged once, when they finish
        }
    }

    /// Put a refusal in the denied-target table and log it (rate-limited), without
    /// counting a decision: for a second refusal within a request already counted.
    pub(crate) fn record(&self, seen: &Seen<'_>) {
        let Seen {
            via,
            client,
            target,
            shown,
            seen,
            outcome,
            reason,
            rule,
        } = *seen;
        let log = match target {
            Some(t) => {
                let host = match t.host {
                    crate::policy::Host::Name(n) => n.as_str().to_owned(),
                    crate::policy::Host::Ip(ip) => ip.to_string(),
                };
                self.metrics
                    .denied(&host, t.port, || allow_entry(t, reason))
            }
            None => self.metrics.denied("(invalid target)", 0, || {
                "nothing: the request did not name a valid host:port".to_owned()
            }),
        };
        if log {
            tracing::warn!(
                listener = via.as_str(),
                client = %client,
                target = shown,
                seen,
                decision = outcome.as_str(),
                reason,
                rule,
                mode = self.config.mode.as_str(),
                "destination denied"
            );
        }
    }
}

/// One decision about one destination, as counted and logged.
#[derive(Clone, Copy)]
pub(crate) struct Seen<'a> {
    pub via: ListenerKind,
    pub client: SocketAddr,
    /// `None` for a target that could not be parsed.
    pub target: Option<&'a Target>,
    /// As shown in the log line.
    pub shown: &'a str,
    /// What the client sent that was refused (a TLS name, escaped bytes), or empty.
    pub seen: &'a str,
    pub outcome: Outcome,
    pub reason: &'a str,
    pub rule: &'a str,
}

/// An allowed request's decision, counted when this is dropped unless something else was
/// counted in its place ([`AllowCount::instead`]). A request whose client leaves while
/// the proxy dials or waits for the upstream is then still counted, once.
pub(crate) struct AllowCount {
    metrics: Arc<Metrics>,
    via: ListenerKind,
    reason: &'static str,
    armed: bool,
}

impl AllowCount {
    pub(crate) fn new(live: &Live, via: ListenerKind, v: &Verdict) -> Self {
        AllowCount {
            metrics: live.metrics.clone(),
            via,
            reason: v.decision.reason.code(),
            armed: true,
        }
    }

    /// Another outcome (a failed dial, a refused TLS name) is counted instead.
    pub(crate) fn instead(mut self) {
        self.armed = false;
    }
}

impl Drop for AllowCount {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.decision(self.via, Outcome::Allow, self.reason);
        }
    }
}

/// The configuration entry that would let a refused target through.
fn allow_entry(t: &Target, reason: &str) -> String {
    match (reason, t.host) {
        ("forbidden_address", _) => format!(
            "the address guard refused it: list its address in upstream.allow_cidrs (for example allow_cidrs = [\"<address>/32\"]) only if {t} must be reached"
        ),
        ("deny_rule", _) => format!("a [[deny]] entry refuses {t}: remove or narrow it"),
        ("tls_hello_invalid" | "tls_hello_timeout" | "sni_changed_after_retry", _) => format!(
            "nothing: the client's TLS handshake through CONNECT {t} could not be checked, and such tunnels are always refused"
        ),
        ("tunnel_protocol_not_allowed", _) => format!(
            "the tunnel to {t} carried neither TLS nor HTTP/1: list port {} in proxy.opaque_ports only if that protocol must pass uninspected",
            t.port
        ),
        ("no_server_name", _) => format!(
            "the client sent no TLS server name through CONNECT {t}: proxy.sni_missing = \"allow\" lets such tunnels through on the CONNECT's decision"
        ),
        ("host_mismatch", _) => format!(
            "nothing: a request inside the tunnel to {t} named another host; send requests for other hosts through their own CONNECT or as absolute-form requests"
        ),
        (_, crate::policy::Host::Name(n)) => {
            format!("[[allow]]\nhost = \"{}\"\nports = [{}]", n.as_str(), t.port)
        }
        (_, crate::policy::Host::Ip(ip)) => {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            format!("[[allow]]\ncidr = \"{ip}/{bits}\"\nports = [{}]", t.port)
        }
    }
}

/// A bound listening socket, plain or TLS.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: bool,
}

impl Listener {
    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Bind every configured listener, plain then TLS (before reporting ready).
pub async fn bind(proxy: &crate::config::ProxySettings) -> std::io::Result<Vec<Listener>> {
    let mut out = Vec::new();
    let all = proxy.listen.iter().map(|a| (a, false));
    for (a, tls) in all.chain(proxy.tls_listen.iter().map(|a| (a, true))) {
        let tcp = TcpListener::bind(a)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
        out.push(Listener { tcp, tls });
    }
    Ok(out)
}

/// Serve until `stop` flips to `true`, then drain open connections and tunnels for up to
/// the grace period. Returns the number of connections still open at the deadline.
pub async fn run(listeners: Vec<Listener>, shared: Arc<Shared>) -> usize {
    let mut accepts = Vec::new();
    for l in listeners {
        accepts.push(tokio::spawn(accept_loop(l, shared.clone())));
    }
    let mut stopping = shared.stopping.clone();
    stopped(&mut stopping).await;
    for a in &accepts {
        a.abort();
    }
    for a in accepts {
        let _ = a.await; // the listeners are closed once these return
    }
    let grace = shared.live().config.grace_period;
    if tokio::time::timeout(grace, shared.tracker.drained())
        .await
        .is_err()
    {
        let left = shared.tracker.live();
        tracing::warn!(
            open = left,
            grace_secs = grace.as_secs_f64(),
            "grace period over; closing what is still open"
        );
        shared.tracker.close_all();
        // Each closes at its next poll; wait briefly so that their sockets are gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.tracker.drained()).await;
        return left;
    }
    0
}

/// Resolves once shutdown has started (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.tcp.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer_ip = peer.ip().to_canonical(); // an IPv4 client on a dual-stack socket
        let live = shared.live();
        if !live
            .config
            .allow_clients
            .iter()
            .any(|n| n.contains(&peer_ip))
        {
            if live.metrics.limit(Limit::ClientNotAllowed) {
                tracing::warn!(client = %peer, reason = "client_not_allowed", "connection from a client outside proxy.allow_clients closed");
            }
            drop(stream);
            continue;
        }
        let limit = live.config.max_connections_per_client;
        let place = match limit {
            0 => None,
            _ => match shared.per_client.take(peer_ip, limit) {
                Some(p) => Some(p),
                None => {
                    if live.metrics.limit(Limit::ConnectionsPerClient) {
                        tracing::warn!(client = %peer, reason = "connection_limit_per_client", limit, "over proxy.max_connections_per_client; answered 503");
                    }
                    refuse_at_limit(
                        stream,
                        "connection_limit_per_client",
                        "this client has as many connections open as proxy.max_connections_per_client allows; close some or retry shortly",
                    );
                    continue;
                }
            },
        };
        let permit = match shared.limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if live.metrics.limit(Limit::Connections) {
                    tracing::warn!(client = %peer, reason = "connection_limit", "over proxy.max_connections; answered 503");
                }
                refuse_at_limit(
                    stream,
                    "connection_limit",
                    "aml-egress is at its connection limit (proxy.max_connections); retry shortly",
                );
                continue;
            }
        };
        let guard = shared.tracker.track();
        let shared = shared.clone();
        let listener_tls = listener.tls;
        let _ = stream.set_nodelay(true);
        let tls = live.tls.clone();
        if listener.tls && tls.is_none() {
            // A reload dropped the certificate; never serve plain HTTP on a TLS port.
            if live.metrics.limit(Limit::TlsHandshake) {
                tracing::error!(client = %peer, reason = "tls_handshake", "no TLS certificate is configured any more (proxy.tls_cert, proxy.tls_key); connection closed");
            }
            continue;
        }
        let open = live.metrics.open(false, live.config.mode.as_str());
        let metrics = live.metrics.clone();
        let handshake_timeout = live.config.header_timeout;
        drop(live);
        // Tunnels take a clone, so that they count against the limit until they close.
        let permit = Arc::new(Slot {
            permit: Some(permit),
            owed: shared.owed.clone(),
            _client: place,
        });
        tokio::spawn(async move {
            match tls.filter(|_| listener_tls) {
                None => serve_connection(stream, peer, shared, permit).await,
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => serve_connection(s, peer, shared, permit).await,
                        Ok(Err(e)) => {
                            if metrics.limit(Limit::TlsHandshake) {
                                tracing::warn!(client = %peer, reason = "tls_handshake", error = %e, "TLS handshake with a client failed");
                            }
                        }
                        Err(_) => {
                            if metrics.limit(Limit::TlsHandshake) {
                                tracing::warn!(client = %peer, reason = "tls_handshake", "TLS handshake with a client timed out (proxy.header_timeout_secs)");
                            }
                        }
                    }
                }
            }
            drop(open);
            drop(guard);
        });
    }
}

/// A connection's place under `proxy.max_connections`, shared with its tunnel, and the
/// turn that tells its stream when it becomes a tunnel.
#[derive(Clone)]
pub(crate) struct ConnHandles {
    #[allow(dead_code)] // held, not read: the place is given back when the last holder drops
    pub slot: Arc<Slot>,
    pub turn: Arc<keepalive::Turn>,
}

/// A permit that, when given back while a lowered limit is owed permits, is kept instead.
pub(crate) struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
    /// The place under `proxy.max_connections_per_client`, when that limit is on.
    _client: Option<per_client::ClientPlace>,
}

/// Answer `503` to a connection turned away by a limit, off the accept loop.
fn refuse_at_limit(stream: tokio::net::TcpStream, details: &'static str, message: &'static str) {
    tokio::spawn(async move {
        let mut stream = stream;
        let body = respond::raw(
            503,
            "Service Unavailable",
            "connection_limit_reached",
            details,
            message,
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.write_all(&body)).await;
    });
}

impl Drop for Slot {
    fn drop(&mut self) {
        let paid = self
            .owed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| o.checked_sub(1))
            .is_ok();
        if paid && let Some(p) = self.permit.take() {
            p.forget();
        }
    }
}

async fn serve_connection<S>(
    mut stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let live = shared.live();
    let cfg = &live.config;
    let prefix = match head::read_head(&mut stream, cfg.max_header_bytes, cfg.header_timeout).await
    {
        Ok(p) => p,
        Err(head::HeadError::Timeout) => {
            if live.metrics.limit(Limit::HeaderTimeout) {
                tracing::warn!(client = %peer, reason = "header_timeout", "request head not received in time; answered 408");
            }
            refuse_raw(stream, respond::request_timeout()).await;
            return;
        }
        Err(head::HeadError::TooLarge) => {
            if live.metrics.limit(Limit::HeaderSize) {
                tracing::warn!(client = %peer, reason = "header_too_large", "request head larger than proxy.max_header_bytes; answered 431");
            }
            let body = respond::raw(
                431,
                "Request Header Fields Too Large",
                "http_request_error",
                "header_too_large",
                "the request head is larger than proxy.max_header_bytes",
            );
            refuse_raw(stream, &body).await;
            return;
        }
        Err(_) => return,
    };
    drop(live);
    serve_requests(
        head::Rewind::new(prefix, stream),
        peer,
        shared,
        Some(permit),
        route,
    )
    .await;
}

/// Serve HTTP/1 requests on a client stream until it closes or shutdown closes it, with
/// the keep-alive timers of [`keepalive`]; `handle` answers each request (at the proxy
/// itself, or inside a tunnel). `permit` is the connection's place under
/// `proxy.max_connections`, handed on to tunnels.
pub(crate) async fn serve_requests<S, H, F>(
    stream: head::Rewind<S>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: Option<Arc<Slot>>,
    handle: H,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<hyper::body::Incoming>, SocketAddr, Arc<Shared>) -> F + Copy + Send + 'static,
    F: std::future::Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let live = shared.live();
    let cfg = &live.config;
    let turn = Arc::new(keepalive::Turn::default());
    let io = TokioIo::new(keepalive::Watched::new(
        stream,
        turn.clone(),
        cfg.header_timeout,
        cfg.idle_timeout,
        respond::request_timeout(),
    ));
    let svc_shared = shared.clone();
    let idle = cfg.idle_timeout;
    let svc = service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let shared = svc_shared.clone();
        let turn = turn.clone();
        turn.begin();
        if let Some(slot) = &permit {
            req.extensions_mut().insert(ConnHandles {
                slot: slot.clone(),
                turn: turn.clone(),
            });
        }
        async move {
            let resp = handle(req, peer, shared).await;
            Ok::<_, std::convert::Infallible>(resp.map(|b| turn.wrap(b, idle)))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(None) // see keepalive: ours answers 408
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    let metrics = live.metrics.clone();
    drop(live);
    let conn = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    let mut stopping = shared.stopping.clone();
    tokio::select! {
        done = conn.as_mut() => {
            let hit = match &done {
                Err(e) if keepalive::is_head_timeout(e) => Some((
                    Limit::HeaderTimeout,
                    "a later request head on a keep-alive connection was not completed in time; answered 408",
                )),
                Err(e) if e.is_parse_too_large() => Some((
                    Limit::HeaderSize,
                    "a later request head was larger than proxy.max_header_bytes; answered 431",
                )),
                _ => None,
            };
            if let Some((which, what)) = hit
                && metrics.limit(which)
            {
                tracing::warn!(client = %peer, reason = which.as_str(), "{what}");
            }
        }
        _ = stopped(&mut stopping) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shared.tracker.closed() => {}
            }
        }
    }
}

/// Write a raw refusal, then read and discard what the client is still sending (bounded in
/// bytes and time) before closing, so that the kernel does not reset the connection and
/// destroy the answer before the client reads it.
async fn refuse_raw<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, body: &[u8]) {
    use tokio::io::AsyncReadExt;
    if stream.write_all(body).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 8192];
    let mut left = 256 * 1024usize;
    let drain = async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

async fn route(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
) -> hyper::Response<Body> {
    let live = shared.live();
    let start = std::time::Instant::now();
    if req.method() == Method::CONNECT {
        let resp = connect::handle(req, peer, live.clone(), shared).await;
        live.metrics
            .request_duration(ListenerKind::Connect, start.elapsed());
        return resp;
    }
    match req.uri().scheme_str() {
        Some("http") => {
            let resp = http::forward(req, peer, live.clone()).await;
            live.metrics
                .request_duration(ListenerKind::Http, start.elapsed());
            resp
        }
        Some("https") => refuse(
            StatusCode::BAD_REQUEST,
            "http_request_error",
            "https_absolute_form",
            "aml-egress tunnels TLS with CONNECT: use this proxy as HTTPS_PROXY (https://host URLs are then sent as CONNECT host:443)",
        ),
        _ => refuse(
            StatusCode::BAD_REQUEST,
            "http_request_error",
            "not_a_proxy_request",
            "aml-egress is a forwarding proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port, for example by setting HTTP_PROXY and HTTPS_PROXY to http://<this proxy>:3128",
        ),
    }
}
