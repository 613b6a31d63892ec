//! The proxy's state: the live configuration (swapped whole on reload, read without a lock
//! on the hot path), the connection limit and what a lowered limit still owes, and the
//! tracker that lets shutdown drain open connections and tunnels with a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::addr::ClientAddr;
use super::addr::ListenAddr;
use super::dial::{DialConfig, Resolver};
use super::error::SetupError;
use super::per_client;
use super::plumbing::Tracker;
use super::pool;
use crate::config::{Built, Chosen, ClientBuilt, ClientPolicies, Compiled};
use crate::logs::LogBudget;
use crate::metrics::{DecisionSlots, Limit, ListenerKind, Metrics, Outcome};
use crate::policy::{Decision, PathView, Reason, Target, Verdict};
use crate::reason::ReasonCode;

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
    /// `proxy.ech = "allow"`: a hello carrying an encrypted one is decided on its outer name.
    pub ech_allowed: bool,
    /// Which address a redirected TLS connection is dialled at.
    pub transparent_dial: crate::config::TransparentDial,
    /// Add `Via` to forwarded messages.
    pub via: bool,
    /// `proxy.forwarded_headers = "strip"`: forwarding fields are removed from requests.
    pub strip_forwarding: bool,
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
        own: Vec<ListenAddr>,
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
            ech_allowed: p.ech == crate::config::Ech::Allow,
            transparent_dial: s.transparent.dial,
            via: p.via,
            strip_forwarding: p.forwarded_headers == crate::config::ForwardedHeaders::Strip,
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

/// Which policy serves a client, in one [`Live`]: the default policy, a client policy (by
/// its place), or none (`policy.unmatched_clients = "refuse"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PolicyIx(u16);

impl PolicyIx {
    /// The default policy (the top-level `[catalog]` and `[[allow]]`).
    pub(crate) const DEFAULT: PolicyIx = PolicyIx(0);
    /// No policy: the client is refused.
    pub(crate) const NONE: PolicyIx = PolicyIx(u16::MAX);
}

/// The client policies of a configuration ([`ClientPolicies`] chooses a client's), with
/// each one's decision counters.
pub struct Clients {
    pub compiled: ClientPolicies,
    /// By the policies' places.
    decisions: Vec<DecisionSlots>,
    /// The counters of refused unclaimed clients (policy `(none)`).
    unserved: DecisionSlots,
    /// By the policies' places: the dialler's settings and pools of a policy whose
    /// `[[deny]]` networks (the global ones and its own) are not the default policy's,
    /// so that its addresses are refused when its clients' names resolve into them.
    dialling: Vec<Option<Dialling>>,
}

/// How a policy's upstream connections are dialled: with its `[[deny]]` networks.
struct Dialling {
    dial: Arc<DialConfig>,
    upstream: pool::Upstream,
}

impl Clients {
    fn new(compiled: ClientPolicies) -> Self {
        let decisions = compiled
            .policies
            .iter()
            .map(|cp| DecisionSlots::new(&cp.name))
            .collect();
        Clients {
            compiled,
            decisions,
            unserved: DecisionSlots::new(crate::metrics::NO_POLICY),
            dialling: Vec::new(),
        }
    }
}

/// Everything a configuration load produces: the compiled policy, the runtime settings,
/// the upstream pools and the TLS certificate. Swapped whole on reload, so that a request
/// sees one consistent version from decision to dial.
pub struct Live {
    /// The default policy.
    pub built: Built,
    /// The `[[client_policy]]` policies.
    pub clients: Clients,
    pub config: ProxyConfig,
    pub upstream: pool::Upstream,
    pub tls: Option<TlsAcceptor>,
    /// TLS inspection, when a CA is configured.
    pub inspector: Option<Arc<super::inspect::Inspector>>,
    /// The process's metrics (the same registry across reloads).
    pub metrics: Arc<Metrics>,
    /// The process's log budget (kept across reloads).
    pub logs: Arc<LogBudget>,
}

/// The proxy's judgement of a request: the policy's decision with the mode applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Judgement {
    pub decision: Decision,
    /// Let through (allowed, or denied but in audit mode).
    pub pass: bool,
    /// Denied by the policy but let through by audit mode.
    pub would_deny: bool,
    /// The policy that decided.
    pub policy: PolicyIx,
}

impl Judgement {
    /// What is counted for it: allow, deny, or would-be deny.
    pub(crate) fn outcome(&self) -> Outcome {
        match (self.pass, self.would_deny) {
            (_, true) => Outcome::WouldDeny,
            (true, false) => Outcome::Allow,
            (false, false) => Outcome::Deny,
        }
    }
}

impl Live {
    /// The policy that serves `client`: the one its certificate chose, else the client
    /// policy with the most specific source network holding its address, else the default
    /// policy (or none, under `policy.unmatched_clients = "refuse"`). None, too, for a
    /// connection whose certificate chose a policy a reload has since removed or renamed:
    /// which policy its certificate names now cannot be told without matching it again,
    /// which a new connection does.
    pub(crate) fn choose(&self, client: ClientAddr) -> PolicyIx {
        let chosen = match client.certified {
            Some(key) => match self.clients.compiled.by_key(key) {
                Some(i) => Chosen::Client(i),
                None => Chosen::Refused,
            },
            None => self.clients.compiled.choose(client.ip()),
        };
        match chosen {
            Chosen::Default => PolicyIx::DEFAULT,
            // At most `MAX_CLIENT_POLICIES` (4096) policies: the place fits.
            Chosen::Client(i) => PolicyIx(i as u16 + 1),
            Chosen::Refused => PolicyIx::NONE,
        }
    }

    /// The compiled policy `ix` names (the default policy's for [`PolicyIx::NONE`], whose
    /// decisions never reach a rule).
    pub(crate) fn built_of(&self, ix: PolicyIx) -> &Built {
        match self.client_policy(ix) {
            Some(cp) => &cp.built,
            None => &self.built,
        }
    }

    /// The dialler's settings for the connections policy `ix` decides: its own `[[deny]]`
    /// networks are refused however a name resolves.
    pub(crate) fn dial_of(&self, ix: PolicyIx) -> &Arc<DialConfig> {
        self.dialling_of(ix).map_or(&self.config.dial, |d| &d.dial)
    }

    /// The upstream pools for the requests policy `ix` decides (see [`Live::dial_of`]).
    pub(crate) fn upstream_of(&self, ix: PolicyIx) -> &pool::Upstream {
        self.dialling_of(ix).map_or(&self.upstream, |d| &d.upstream)
    }

    fn dialling_of(&self, ix: PolicyIx) -> Option<&Dialling> {
        match ix {
            PolicyIx::DEFAULT | PolicyIx::NONE => None,
            PolicyIx(i) => self.clients.dialling.get(usize::from(i) - 1)?.as_ref(),
        }
    }

    fn client_policy(&self, ix: PolicyIx) -> Option<&ClientBuilt> {
        match ix {
            PolicyIx::DEFAULT | PolicyIx::NONE => None,
            PolicyIx(i) => self.clients.compiled.policies.get(usize::from(i) - 1),
        }
    }

    /// The policy's name, as the `policy` label and log field show it.
    pub(crate) fn policy_name(&self, ix: PolicyIx) -> &str {
        match ix {
            PolicyIx::NONE => crate::metrics::NO_POLICY,
            _ => self
                .client_policy(ix)
                .map_or(crate::metrics::DEFAULT_POLICY, |cp| &cp.name),
        }
    }

    /// The mode the policy runs in.
    pub(crate) fn mode_of(&self, ix: PolicyIx) -> Mode {
        self.client_policy(ix)
            .map_or(self.config.mode, |cp| cp.mode)
    }

    /// The counter of one kind of decision under policy `ix`.
    pub(crate) fn decision_counter(
        &self,
        ix: PolicyIx,
        via: ListenerKind,
        outcome: Outcome,
        reason: ReasonCode,
    ) -> &prometheus::IntCounter {
        let slots = match ix {
            PolicyIx::NONE => &self.clients.unserved,
            PolicyIx::DEFAULT => self.metrics.default_decisions(),
            PolicyIx(i) => self
                .clients
                .decisions
                .get(usize::from(i) - 1)
                .unwrap_or(self.metrics.default_decisions()),
        };
        self.metrics.decision_counter(slots, via, outcome, reason)
    }

    /// The decision of the policy serving `client` on `target` (its path as `view` shows
    /// it), with that policy's mode applied.
    pub(crate) fn judge(
        &self,
        client: ClientAddr,
        target: &Target,
        view: PathView<'_>,
    ) -> Judgement {
        let ix = self.choose(client);
        if ix == PolicyIx::NONE {
            return self.unserved();
        }
        let decision = self.built_of(ix).policy.decide(target, view);
        self.apply_mode(ix, decision)
    }

    /// The refusal of a client no policy serves.
    fn unserved(&self) -> Judgement {
        let decision = Decision {
            verdict: Verdict::Deny,
            reason: Reason::NoPolicyForClient,
            rule: None,
        };
        self.apply_mode(PolicyIx::NONE, decision)
    }

    /// Whether a tunnel to `target`, so judged, is inspected: inspection on, a TLS port, a
    /// name, not bypassed, and either allowed and in `inspect.hosts`, or only a path rule
    /// of the deciding policy matches it (`policy.tls_path_rules = "inspect"`), whose path
    /// inspection will see.
    pub(crate) fn inspects(&self, target: &Target, v: &Judgement) -> bool {
        self.inspector.as_ref().is_some_and(|i| {
            i.inspection().inspects_tunnel(
                &self.built_of(v.policy).policy,
                &self.config.tls_ports,
                target,
                &v.decision,
            )
        })
    }

    /// The judgement of a TLS hello without a server name to an address (see
    /// [`crate::policy::Policy::decide_nameless_tls`]); a named target is judged as usual.
    pub(crate) fn judge_nameless_tls(&self, client: ClientAddr, target: &Target) -> Judgement {
        match target.host {
            crate::policy::Host::Ip(ip) => {
                let ix = self.choose(client);
                if ix == PolicyIx::NONE {
                    return self.unserved();
                }
                let decision = self
                    .built_of(ix)
                    .policy
                    .decide_nameless_tls(ip, target.port);
                self.apply_mode(ix, decision)
            }
            crate::policy::Host::Name(_) => self.judge(client, target, PathView::Hidden),
        }
    }

    /// Apply policy `ix`'s mode to its decision: audit mode lets a denial pass, except an
    /// operator's deny rule, an invalid target and a client no policy serves, which hold in
    /// every mode.
    pub(crate) fn apply_mode(&self, ix: PolicyIx, decision: Decision) -> Judgement {
        let allowed = decision.is_allowed();
        let auditable = decision.reason.audit_lets_through();
        let would_deny = !allowed && auditable && self.mode_of(ix) == Mode::Audit;
        Judgement {
            decision,
            pass: allowed || would_deny,
            would_deny,
            policy: ix,
        }
    }

    /// The rule a judgement names, as shown in logs (empty when none).
    pub(crate) fn rule_text(&self, v: &Judgement) -> String {
        v.decision
            .rule
            .map(|id| self.built_of(v.policy).policy.rule(id).display())
            .unwrap_or_default()
    }

    /// Build the live configuration from a compiled one, with the I/O it needs (the DNS
    /// resolver, the TLS certificate, the upstream pools): the last step before the live
    /// swap ([`Shared::replace`]), for `serve`, reload, the tests and the benches. `own` are
    /// the proxy's bound listening sockets (proxy, TLS and admin), which the dialler refuses.
    ///
    /// # Errors
    /// The resolver could not start, or the TLS certificate or key could not be read.
    pub fn build(
        c: Compiled,
        own: Vec<ListenAddr>,
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
            (Some(cert), Some(key)) => Some(super::tls::acceptor(
                cert,
                key,
                c.proxy.tls_client_ca.as_deref(),
            )?),
            _ => None,
        };
        let mut clients = Clients::new(c.clients);
        let inspector = super::inspect::Inspector::new(c.inspect, metrics.clone()).map(Arc::new);
        let pools = |dial: Arc<DialConfig>| {
            pool::Upstream::new(
                dial,
                config.idle_timeout,
                config.max_header_bytes,
                metrics.clone(),
                inspector.as_ref().map(|i| i.upstream.clone()),
            )
        };
        let upstream = pools(config.dial.clone());
        clients.dialling = clients
            .compiled
            .policies
            .iter()
            .map(|cp| {
                let deny = cp.built.policy.deny_networks();
                (deny != config.dial.deny_cidrs).then(|| {
                    let dial = Arc::new(DialConfig {
                        deny_cidrs: deny,
                        ..DialConfig::clone(&config.dial)
                    });
                    Dialling {
                        upstream: pools(dial.clone()),
                        dial,
                    }
                })
            })
            .collect();
        Ok(Live {
            inspector,
            clients,
            built: c.built,
            config,
            upstream,
            tls,
            metrics,
            logs,
        })
    }

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
