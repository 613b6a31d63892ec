//! Prometheus metrics on the proxy's own registry, and the bounded table of denied
//! destinations behind `aml_egress_denied_total`, `/denied` and the denial-log limiter.
//!
//! Denied host names are chosen by whoever sends the request, so the table is bounded:
//! when it is full, the least recently denied target loses its series to make room, and
//! both the eviction and the denials it had counted are themselves counted. Handles for
//! the fixed label sets are created once and kept, so that counting a decision is one
//! atomic add.

use crate::reason::ReasonCode;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Serialize;

use crate::allowed::AllowedNames;
pub use crate::clock::rfc3339;
use crate::policy::RuleCounts;

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    Connect,
    Http,
    TransparentTls,
    TransparentHttp,
}

impl ListenerKind {
    const ALL: [ListenerKind; 4] = [
        ListenerKind::Connect,
        ListenerKind::Http,
        ListenerKind::TransparentTls,
        ListenerKind::TransparentHttp,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Connect => "connect",
            ListenerKind::Http => "http",
            ListenerKind::TransparentTls => "transparent_tls",
            ListenerKind::TransparentHttp => "transparent_http",
        }
    }
}

/// What happened to a request, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Deny,
    WouldDeny,
    /// Allowed, but the upstream could not be reached (DNS, refused, timeout).
    Error,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Allow,
        Outcome::Deny,
        Outcome::WouldDeny,
        Outcome::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Deny => "deny",
            Outcome::WouldDeny => "would_deny",
            Outcome::Error => "error",
        }
    }
}

/// A limit that turned a client away.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Connections,
    ConnectionsPerClient,
    HeaderTimeout,
    HeaderSize,
    ClientNotAllowed,
    TlsHandshake,
}

impl Limit {
    /// The label value (also the log lines' `reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerClient => "connections_per_client",
            Limit::HeaderTimeout => "header_timeout",
            Limit::HeaderSize => "header_size",
            Limit::ClientNotAllowed => "client_not_allowed",
            Limit::TlsHandshake => "tls_handshake",
        }
    }
}

const DECISION_SLOTS: usize = ListenerKind::ALL.len() * Outcome::ALL.len() * ReasonCode::ALL.len();

/// The policy label of the default policy (the top-level `[catalog]` and `[[allow]]`).
pub const DEFAULT_POLICY: &str = "default";

/// The policy label of a client that no policy serves (`policy.unmatched_clients =
/// "refuse"`); `(` cannot start a policy's name.
pub const NO_POLICY: &str = "(none)";

/// One policy's decision counters (`aml_egress_decisions_total` with its `policy` label),
/// each made on first use: counting a decision then touches no map and no lock. The
/// slots themselves (8 KiB) are made at the policy's first decision, so that a hub's
/// policies that have decided nothing yet cost a pointer each.
pub struct DecisionSlots {
    policy: Box<str>,
    slots: OnceLock<Box<[OnceLock<IntCounter>]>>,
}

impl DecisionSlots {
    /// Counters for the policy named `policy`.
    pub fn new(policy: &str) -> Self {
        DecisionSlots {
            policy: policy.into(),
            slots: OnceLock::new(),
        }
    }

    /// The policy's name, as the `policy` label shows it.
    pub fn policy(&self) -> &str {
        &self.policy
    }
}

/// Every metric the proxy exports, on one registry.
pub struct Metrics {
    registry: Registry,
    decisions_vec: IntCounterVec,
    /// The default policy's counters.
    decisions: DecisionSlots,
    denied_vec: IntCounterVec,
    series_evicted: IntCounter,
    denials_evicted: IntCounter,
    request_duration: HistogramVec,
    dial_ok: Histogram,
    dial_error: Histogram,
    open_connections: IntGaugeVec,
    open_tunnels: IntGaugeVec,
    /// Connections and tunnels open now on each listener (by its setting).
    open_by_listener: IntGaugeVec,
    /// Handles of the two gauges above by `[tunnel][mode]`, made on first use.
    open_by_mode: [[OnceLock<IntGauge>; 2]; 2],
    /// Handles of `request_duration` by listener, made on first use.
    request_duration_by: [OnceLock<Histogram>; ListenerKind::ALL.len()],
    worker_connections: IntGaugeVec,
    /// Bytes client→upstream and upstream→client.
    pub tunnel_up: IntCounter,
    pub tunnel_down: IntCounter,
    limits: IntCounterVec,
    reloads: IntCounterVec,
    reload_ok: IntGauge,
    reload_time: IntGauge,
    rules: IntGaugeVec,
    build_info: IntGaugeVec,
    /// Seconds until the inspection CA expires; no series without a CA (a vector without
    /// labels, so that it can be absent).
    inspect_ca_expiry: IntGaugeVec,
    /// Leaf certificates minted for inspected tunnels.
    pub inspect_minted: IntCounter,
    /// Leaf certificates kept for inspected tunnels.
    pub inspect_cached: IntGauge,
    /// Inspected tunnels whose client did not complete the handshake with the proxy's
    /// certificate (it does not trust the CA, most often).
    pub inspect_client_failures: IntCounter,
    /// Inspected requests refused because the upstream's certificate did not verify.
    pub inspect_upstream_failures: IntCounter,
    /// Requests decided inside inspected tunnels, by decision and reason.
    pub inspected_requests: IntCounterVec,
    suppressed: IntCounter,
    /// Requests sent again after a reused upstream connection closed without answering.
    pub upstream_retries: IntCounter,
    denied: Mutex<DeniedTable>,
    /// The names wildcard rules let through (`/allowed`, `aml_egress_wildcard_names`).
    pub allowed: AllowedNames,
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("registered once");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("registered once");
    g
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("registered once");
    h
}

impl Metrics {
    /// A fresh registry with every metric; `max_denied` bounds the denied-target series.
    pub fn new(max_denied: usize) -> Self {
        let r = Registry::new();
        let latency = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let dial = histogram_vec(
            &r,
            "aml_egress_dial_duration_seconds",
            "Time to resolve and connect to an upstream, by result (ok or error).",
            &["result"],
            latency.clone(),
        );
        let tunnel_bytes = counter_vec(
            &r,
            "aml_egress_tunnel_bytes_total",
            "Bytes relayed through tunnels, by direction (up: client to upstream, down: upstream to client).",
            &["direction"],
        );
        let m = Metrics {
            decisions_vec: counter_vec(
                &r,
                "aml_egress_decisions_total",
                "Decisions on destinations, by listener, decision (allow, deny, would_deny, error), reason and the policy that served the client (default, a [[client_policy]]'s name, or (none)).",
                &["listener", "decision", "reason", "policy"],
            ),
            decisions: DecisionSlots::new(DEFAULT_POLICY),
            denied_vec: counter_vec(
                &r,
                "aml_egress_denied_total",
                "Denied (or, in audit mode, would-be denied) requests by destination host and port and the client's policy; at most metrics.max_denied_targets series, least recently denied evicted first.",
                &["host", "port", "policy"],
            ),
            series_evicted: counter(
                &r,
                "aml_egress_denied_series_evicted_total",
                "Denied-destination series removed to stay within metrics.max_denied_targets.",
            ),
            denials_evicted: counter(
                &r,
                "aml_egress_denied_evicted_total",
                "Denials counted by denied-destination series that have since been evicted.",
            ),
            request_duration: histogram_vec(
                &r,
                "aml_egress_request_duration_seconds",
                "Time from a request head to the proxy's answer (for CONNECT: the 200 after the dial, or the refusal), by listener.",
                &["listener"],
                latency,
            ),
            dial_ok: dial.with_label_values(&["ok"]),
            dial_error: dial.with_label_values(&["error"]),
            open_connections: gauge_vec(
                &r,
                "aml_egress_open_connections",
                "Client connections open now, by mode.",
                &["mode"],
            ),
            open_tunnels: gauge_vec(
                &r,
                "aml_egress_open_tunnels",
                "CONNECT tunnels open now, by mode.",
                &["mode"],
            ),
            open_by_listener: gauge_vec(
                &r,
                "aml_egress_open_by_listener",
                "Client connections (kind connection) and tunnels (kind tunnel) open now, by the listener's setting (proxy.listen, transparent.tls_listen, ...).",
                &["listener", "kind"],
            ),
            open_by_mode: Default::default(),
            request_duration_by: Default::default(),
            worker_connections: gauge_vec(
                &r,
                "aml_egress_worker_connections",
                "Client connections open now (tunnels included) on each worker thread.",
                &["worker"],
            ),
            tunnel_up: tunnel_bytes.with_label_values(&["up"]),
            tunnel_down: tunnel_bytes.with_label_values(&["down"]),
            limits: counter_vec(
                &r,
                "aml_egress_limits_hit_total",
                "Clients turned away by a limit: connections (503), connections_per_client (503), header_timeout (408), header_size (431), client_not_allowed, tls_handshake.",
                &["limit"],
            ),
            reloads: counter_vec(
                &r,
                "aml_egress_config_reloads_total",
                "Configuration reloads by result (success, failure).",
                &["result"],
            ),
            reload_ok: gauge(
                &r,
                "aml_egress_config_last_reload_successful",
                "1 if the last configuration load succeeded, 0 if it failed (the previous policy still serves).",
            ),
            reload_time: gauge(
                &r,
                "aml_egress_config_last_reload_timestamp_seconds",
                "Unix time of the last successful configuration load.",
            ),
            rules: gauge_vec(
                &r,
                "aml_egress_rules",
                "Compiled rules in force, by kind.",
                &["kind"],
            ),
            build_info: gauge_vec(
                &r,
                "aml_egress_build_info",
                "Always 1; the labels say which build, catalog revision and cloud are serving.",
                &["version", "catalog_revision", "cloud"],
            ),
            inspect_minted: counter(
                &r,
                "aml_egress_inspect_certificates_minted_total",
                "Leaf certificates minted for inspected tunnels (one per name, again when the cached one is evicted or half through its validity).",
            ),
            inspect_cached: gauge(
                &r,
                "aml_egress_inspect_cached_certificates",
                "Leaf certificates kept for inspected tunnels; at most inspect.max_cached_certs.",
            ),
            inspect_client_failures: counter(
                &r,
                "aml_egress_inspect_client_handshake_failures_total",
                "Inspected tunnels whose client did not complete the TLS handshake with the proxy's certificate (most often: the CA is not installed on the client); the hosts are in the log.",
            ),
            inspect_upstream_failures: counter(
                &r,
                "aml_egress_inspect_upstream_certificate_failures_total",
                "Inspected requests refused because the upstream's certificate did not verify (upstream_certificate_invalid).",
            ),
            inspected_requests: counter_vec(
                &r,
                "aml_egress_inspected_requests_total",
                "Requests decided inside inspected TLS tunnels, by decision and reason.",
                &["decision", "reason"],
            ),
            inspect_ca_expiry: gauge_vec(
                &r,
                "aml_egress_inspect_ca_expiry_seconds",
                "Seconds until the inspection CA (inspect.ca_cert) expires, set at each load; negative once expired; absent without a CA.",
                &[],
            ),
            suppressed: counter(
                &r,
                "aml_egress_log_lines_suppressed_total",
                "Denial log lines not written because their target was over log.denied_lines_per_minute.",
            ),
            upstream_retries: counter(
                &r,
                "aml_egress_upstream_retries_total",
                "Idempotent requests without a body sent again on a fresh connection after a reused upstream connection closed without answering.",
            ),
            denied: Mutex::new(DeniedTable::new(max_denied)),
            allowed: AllowedNames::new(&r, 1000),
            registry: r,
        };
        m.inspected_zero();
        m
    }

    /// Count one decision (an atomic add once the handle exists).
    pub fn decision(&self, listener: ListenerKind, outcome: Outcome, reason: ReasonCode) {
        self.decision_counter(&self.decisions, listener, outcome, reason)
            .inc();
    }

    /// The counter of one kind of decision under the policy whose counters `slots` are.
    pub fn decision_counter<'a>(
        &self,
        slots: &'a DecisionSlots,
        listener: ListenerKind,
        outcome: Outcome,
        reason: ReasonCode,
    ) -> &'a IntCounter {
        let (l, o) = (listener as usize, outcome as usize);
        let slot = (l * Outcome::ALL.len() + o) * ReasonCode::ALL.len() + reason.index();
        let all = slots
            .slots
            .get_or_init(|| (0..DECISION_SLOTS).map(|_| OnceLock::new()).collect());
        all[slot].get_or_init(|| {
            self.decisions_vec.with_label_values(&[
                listener.as_str(),
                outcome.as_str(),
                reason.as_str(),
                &slots.policy,
            ])
        })
    }

    /// The default policy's decision counters.
    pub fn default_decisions(&self) -> &DecisionSlots {
        &self.decisions
    }

    /// Record a denied (or would-be denied) destination, refused for `why` (its reason, and
    /// what the client sent that was refused, or empty); returns how often it was denied in
    /// the current minute (which the log budget, [`crate::logs::LogBudget`], judges).
    pub fn denied(
        &self,
        host: &str,
        port: u16,
        policy: &str,
        why: (ReasonCode, &str),
        suggestion: impl FnOnce() -> String,
    ) -> u64 {
        self.denied_as(host, port, policy, why, false, suggestion)
    }

    /// [`Metrics::denied`], saying whether audit mode let this one through
    /// (`let_through`: a would-be denial, which reached the destination).
    pub fn denied_as(
        &self,
        host: &str,
        port: u16,
        policy: &str,
        why: (ReasonCode, &str),
        let_through: bool,
        suggestion: impl FnOnce() -> String,
    ) -> u64 {
        let mut t = self.denied.lock().unwrap_or_else(|p| p.into_inner());
        let note = t.note(
            (host, port, policy),
            why,
            let_through,
            suggestion,
            |h, p, pol| self.denied_vec.with_label_values(&[h, &p.to_string(), pol]),
        );
        // Unregister evicted series under the table's lock: a target evicted here and
        // denied again by another thread must get a registered series, not this one.
        for ((h, p, pol), count) in note.evicted {
            let _ = self
                .denied_vec
                .remove_label_values(&[&h, &p.to_string(), &pol]);
            self.series_evicted.inc();
            self.denials_evicted.inc_by(count);
        }
        drop(t);
        note.this_minute
    }

    /// The counter of log lines not written, for the log budget to count into.
    pub fn suppressed_lines(&self) -> IntCounter {
        self.suppressed.clone()
    }

    /// The `limit` most denied targets, most first; `policy`: only those refused under it.
    /// The table's lock, which every denial takes, is held only to pick them: one pass over
    /// the entries choosing by count, then copies of the chosen few. Dates are formatted
    /// and rows sorted after it is released. For `/denied` and the status page's sampler.
    pub fn top_denied(&self, limit: usize, policy: Option<&str>) -> Vec<DeniedReport> {
        let chosen: Vec<(DeniedKey, DeniedCopy)> = {
            let t = self.denied.lock().unwrap_or_else(|p| p.into_inner());
            let mut all: Vec<(&DeniedKey, &DeniedEntry)> = t
                .entries
                .iter()
                .filter(|((_, _, p), _)| policy.is_none_or(|want| want == p))
                .collect();
            if all.len() > limit && limit > 0 {
                all.select_nth_unstable_by(limit - 1, |a, b| {
                    b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0))
                });
            }
            all.truncate(limit);
            all.into_iter()
                .map(|(k, e)| (k.clone(), DeniedCopy::of(e)))
                .collect()
        };
        let mut v: Vec<DeniedReport> = chosen.iter().map(|(k, c)| c.report(k)).collect();
        v.sort_by(by_count);
        v
    }

    /// Denials and would-be denials counted so far by reason (indexed like
    /// [`ReasonCode::ALL`]), every policy's, read from `aml_egress_decisions_total`. Takes
    /// the counter family's read lock, which a request takes only the first time its kind of
    /// decision is counted (the handles are kept in [`DecisionSlots`]); for the status
    /// page's sampler, not for a request.
    pub fn refusals_by_reason(&self) -> Vec<u64> {
        use prometheus::core::Collector;
        let mut out = vec![0u64; ReasonCode::ALL.len()];
        for family in self.decisions_vec.collect() {
            for m in family.get_metric() {
                let label = |name: &str| label_of(m, name);
                if !matches!(label("decision"), Some("deny" | "would_deny")) {
                    continue;
                }
                let Some(i) = label("reason")
                    .and_then(|r| ReasonCode::ALL.iter().position(|c| c.as_str() == r))
                else {
                    continue;
                };
                out[i] += m.get_counter().get_value() as u64;
            }
        }
        out
    }

    /// Connections and tunnels open now by mode, and connections by worker (the first
    /// `workers`): gauge reads, for the status page's sampler.
    pub fn open_now(&self, workers: usize) -> OpenNow {
        use prometheus::core::Collector;
        let by_mode = |vec: &IntGaugeVec| -> Vec<(String, i64)> {
            let mut v = Vec::new();
            for family in vec.collect() {
                for m in family.get_metric() {
                    let mode = m.get_label().first().map_or("", |l| l.value());
                    v.push((mode.to_owned(), m.get_gauge().get_value() as i64));
                }
            }
            v.sort();
            v
        };
        let mut by_listener: Vec<ListenerOpen> = Vec::new();
        for family in self.open_by_listener.collect() {
            for m in family.get_metric() {
                let label = |name: &str| label_of(m, name).unwrap_or("");
                let listener = label("listener");
                let n = m.get_gauge().get_value() as i64;
                let i = match by_listener.iter().position(|l| l.listener == listener) {
                    Some(i) => i,
                    None => {
                        by_listener.push(ListenerOpen {
                            listener: listener.to_owned(),
                            ..Default::default()
                        });
                        by_listener.len() - 1
                    }
                };
                match label("kind") {
                    "tunnel" => by_listener[i].tunnels = n,
                    _ => by_listener[i].connections = n,
                }
            }
        }
        OpenNow {
            by_listener,
            connections: by_mode(&self.open_connections),
            tunnels: by_mode(&self.open_tunnels),
            workers: (0..workers)
                .map(|i| self.worker_connections(i).get())
                .collect(),
        }
    }

    /// Time spent before the proxy answered a request head.
    pub fn request_duration(&self, listener: ListenerKind, d: Duration) {
        self.request_duration_by[listener as usize]
            .get_or_init(|| {
                self.request_duration
                    .with_label_values(&[listener.as_str()])
            })
            .observe(d.as_secs_f64());
    }

    /// One upstream dial and whether it connected.
    pub fn dial(&self, ok: bool, d: Duration) {
        let h = if ok { &self.dial_ok } else { &self.dial_error };
        h.observe(d.as_secs_f64());
    }

    /// A gauge to hold up while a connection (or tunnel) is open in `mode`.
    pub fn open(&self, tunnel: bool, mode: crate::config::Mode) -> OpenGuard {
        let vec = if tunnel {
            &self.open_tunnels
        } else {
            &self.open_connections
        };
        let m = match mode {
            crate::config::Mode::Enforce => 0,
            crate::config::Mode::Audit => 1,
        };
        let g = self.open_by_mode[usize::from(tunnel)][m]
            .get_or_init(|| vec.with_label_values(&[mode.as_str()]))
            .clone();
        g.inc();
        OpenGuard(g, None)
    }

    /// The gauges of what is open on the listener `key` names (`proxy.listen`): taken once
    /// per accept loop, raised through [`OpenGuard::on`].
    pub fn listener_gauges(&self, key: &str) -> ListenerGauges {
        ListenerGauges {
            connections: self
                .open_by_listener
                .with_label_values(&[key, "connection"]),
            tunnels: self.open_by_listener.with_label_values(&[key, "tunnel"]),
        }
    }

    /// The open-connections gauge of worker `index` (`proxy.workers` bounds the labels).
    pub fn worker_connections(&self, index: usize) -> IntGauge {
        self.worker_connections
            .with_label_values(&[index.to_string().as_str()])
    }

    /// A client turned away by a limit.
    pub fn limit(&self, which: Limit) {
        self.limits.with_label_values(&[which.as_str()]).inc();
    }

    /// A configuration load: the rules and build labels when it succeeded.
    pub fn loaded(&self, ok: bool, counts: Option<(RuleCounts, &str, &str)>) {
        self.reloads
            .with_label_values(&[if ok { "success" } else { "failure" }])
            .inc();
        self.reload_ok.set(i64::from(ok));
        let Some((c, revision, cloud)) = counts else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.reload_time.set(now as i64);
        for (kind, n) in [
            ("exact", c.exact),
            ("wildcard", c.wildcard),
            ("path", c.path),
            ("regex", c.regex),
            ("cidr", c.cidr),
            ("deny", c.deny),
        ] {
            self.rules.with_label_values(&[kind]).set(n as i64);
        }
        self.build_info.reset();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), revision, cloud])
            .set(1);
    }

    /// The inspection CA of a load: seconds from now to `expires_at` (negative once past),
    /// or no series without a CA.
    pub fn inspect_ca(&self, expires_at: Option<SystemTime>) {
        self.inspect_ca_expiry.reset();
        if let Some(t) = expires_at {
            let secs = match t.duration_since(SystemTime::now()) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            };
            self.inspect_ca_expiry
                .with_label_values(&[] as &[&str])
                .set(secs);
        }
    }

    /// Change the bound on denied targets (a reload); evicts down to it at once.
    pub fn set_max_denied(&self, max: usize) {
        let mut t = self.denied.lock().unwrap_or_else(|p| p.into_inner());
        t.max = max.max(1);
        while t.entries.len() > t.max {
            if let Some(((h, p, pol), count)) = t.evict_oldest() {
                let _ = self
                    .denied_vec
                    .remove_label_values(&[&h, &p.to_string(), &pol]);
                self.series_evicted.inc();
                self.denials_evicted.inc_by(count);
            }
        }
    }

    /// Start the inspected-request series a dashboard plots at zero, so that the family is
    /// exported (and a rate reads 0, not nothing) before the first inspected request.
    fn inspected_zero(&self) {
        for (decision, reason) in [
            (Outcome::Allow, ReasonCode::Rule),
            (Outcome::Deny, ReasonCode::PathNotAllowed),
            (Outcome::Deny, ReasonCode::HostMismatch),
        ] {
            self.inspected_requests
                .with_label_values(&[decision.as_str(), reason.as_str()]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Open connections and tunnels, as [`Metrics::open_now`] reads them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenNow {
    /// Client connections open, by mode (`enforce`, `audit`).
    pub connections: Vec<(String, i64)>,
    /// CONNECT tunnels open, by mode.
    pub tunnels: Vec<(String, i64)>,
    /// Client connections open on each worker thread.
    pub workers: Vec<i64>,
    /// By listener (its setting, `proxy.listen`): connections and tunnels open.
    pub by_listener: Vec<ListenerOpen>,
}

/// What is open on one listener.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListenerOpen {
    pub listener: String,
    pub connections: i64,
    pub tunnels: i64,
}

/// The gauges of what is open on one listener.
#[derive(Clone)]
pub struct ListenerGauges {
    pub connections: IntGauge,
    pub tunnels: IntGauge,
}

/// Decrements its gauges when dropped: the one by mode, and the listener's when
/// [`OpenGuard::on`] named it.
pub struct OpenGuard(IntGauge, Option<IntGauge>);

impl OpenGuard {
    /// Count this connection or tunnel on its listener's `gauge` too, until dropped.
    pub fn on(mut self, gauge: &IntGauge) -> Self {
        gauge.inc();
        self.1 = Some(gauge.clone());
        self
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
        if let Some(g) = &self.1 {
            g.dec();
        }
    }
}

/// One denied target in `/denied`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeniedReport {
    pub target: String,
    pub host: String,
    pub port: u16,
    /// The policy that served the refused client (`default` without client policies;
    /// instances from before policies per client send none).
    #[serde(default = "default_policy")]
    pub policy: String,
    pub count: u64,
    /// Of `count`, how many audit mode let through (would-be denials): those reached the
    /// destination. Instances from before it was kept send none.
    #[serde(default)]
    pub let_through: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// The `[[allow]]` entry that would let it through.
    pub allow_entry: String,
    /// The reason of its last refusal (instances from before it was kept send none).
    #[serde(default)]
    pub reason: String,
    /// What the client sent that was last refused (a TLS name, a `Host`; escaped, at most
    /// [`MAX_SEEN`] bytes), or empty.
    #[serde(default)]
    pub seen: String,
}

/// Most bytes of what a client sent that the denied table keeps per target.
pub const MAX_SEEN: usize = 256;

/// The value of the label `name` of a gathered series, if it has one.
fn label_of<'a>(m: &'a prometheus::proto::Metric, name: &str) -> Option<&'a str> {
    m.get_label()
        .iter()
        .find(|l| l.name() == name)
        .map(|l| l.value())
}

/// The order of `/denied`: most denied first, then by target and policy (a fleet's merged
/// list too).
pub fn by_count(a: &DeniedReport, b: &DeniedReport) -> std::cmp::Ordering {
    b.count
        .cmp(&a.count)
        .then_with(|| a.target.cmp(&b.target))
        .then_with(|| a.policy.cmp(&b.policy))
}

fn default_policy() -> String {
    DEFAULT_POLICY.to_owned()
}

/// A denied-table key: host, port, policy.
type DeniedKey = (String, u16, String);

struct DeniedEntry {
    count: u64,
    first: SystemTime,
    last: SystemTime,
    /// Recency, for eviction.
    tick: u64,
    series: IntCounter,
    suggestion: String,
    /// Start of the current minute, and denials within it.
    window: Instant,
    in_window: u64,
    /// The last refusal's reason, and what it refused (at most [`MAX_SEEN`] bytes).
    reason: ReasonCode,
    seen: String,
    /// Of `count`, those audit mode let through.
    let_through: u64,
}

/// What a report needs of an entry, copied under the table's lock.
struct DeniedCopy {
    count: u64,
    let_through: u64,
    first: SystemTime,
    last: SystemTime,
    suggestion: String,
    reason: ReasonCode,
    seen: String,
}

impl DeniedCopy {
    fn of(e: &DeniedEntry) -> Self {
        DeniedCopy {
            count: e.count,
            let_through: e.let_through,
            first: e.first,
            last: e.last,
            suggestion: e.suggestion.clone(),
            reason: e.reason,
            seen: e.seen.clone(),
        }
    }

    fn report(&self, (host, port, policy): &DeniedKey) -> DeniedReport {
        // An IPv6 address in brackets, as a target is written.
        let target = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        DeniedReport {
            target,
            host: host.clone(),
            port: *port,
            policy: policy.clone(),
            count: self.count,
            let_through: self.let_through,
            first_seen: rfc3339(self.first),
            last_seen: rfc3339(self.last),
            allow_entry: self.suggestion.clone(),
            reason: self.reason.as_str().to_owned(),
            seen: self.seen.clone(),
        }
    }
}

/// `seen` cut to at most [`MAX_SEEN`] bytes, on a character boundary.
fn bounded(seen: &str) -> &str {
    if seen.len() <= MAX_SEEN {
        return seen;
    }
    let mut end = MAX_SEEN;
    while !seen.is_char_boundary(end) {
        end -= 1;
    }
    &seen[..end]
}

struct Noted {
    this_minute: u64,
    evicted: Vec<(DeniedKey, u64)>,
}

struct DeniedTable {
    max: usize,
    tick: u64,
    entries: HashMap<DeniedKey, DeniedEntry>,
    /// The same keys by recency, so that eviction takes O(log n), not a scan.
    by_tick: BTreeMap<u64, DeniedKey>,
}

impl DeniedTable {
    fn new(max: usize) -> Self {
        DeniedTable {
            max: max.max(1),
            tick: 0,
            entries: HashMap::new(),
            by_tick: BTreeMap::new(),
        }
    }

    fn evict_oldest(&mut self) -> Option<(DeniedKey, u64)> {
        let (_, key) = self.by_tick.pop_first()?;
        let e = self.entries.remove(&key)?;
        Some((key, e.count))
    }

    fn note(
        &mut self,
        (host, port, policy): (&str, u16, &str),
        (reason, seen): (ReasonCode, &str),
        let_through: bool,
        suggestion: impl FnOnce() -> String,
        series: impl FnOnce(&str, u16, &str) -> IntCounter,
    ) -> Noted {
        self.tick += 1;
        let now = Instant::now();
        let mut evicted = Vec::new();
        let key = (host.to_owned(), port, policy.to_owned());
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= self.max {
                evicted.extend(self.evict_oldest());
            }
            self.entries.insert(
                key.clone(),
                DeniedEntry {
                    count: 0,
                    first: SystemTime::now(),
                    last: SystemTime::now(),
                    tick: 0,
                    series: series(host, port, policy),
                    suggestion: suggestion(),
                    window: now,
                    in_window: 0,
                    reason,
                    seen: String::new(),
                    let_through: 0,
                },
            );
        }
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(&key) else {
            return Noted {
                this_minute: 1,
                evicted,
            };
        };
        self.by_tick.remove(&e.tick);
        self.by_tick.insert(tick, key);
        e.count += 1;
        e.let_through += u64::from(let_through);
        e.tick = tick;
        e.last = SystemTime::now();
        e.series.inc();
        e.reason = reason;
        // Reuses the entry's buffer: no allocation once it has held as much.
        let seen = bounded(seen);
        if e.seen != seen {
            e.seen.clear();
            e.seen.push_str(seen);
        }
        if now.duration_since(e.window) >= Duration::from_secs(60) {
            e.window = now;
            e.in_window = 0;
        }
        e.in_window += 1;
        Noted {
            this_minute: e.in_window,
            evicted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_MATCH: (ReasonCode, &str) = (ReasonCode::NoMatchingRule, "");

    #[test]
    fn every_reason_and_kind_has_its_own_slot() {
        for (i, k) in ListenerKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }

    #[test]
    fn the_denied_table_evicts_the_least_recently_denied_and_counts_it() {
        let m = Metrics::new(2);
        let logs = crate::logs::LogBudget::new(1, m.suppressed_lines());
        assert!(logs.denial(m.denied("a.example", 443, DEFAULT_POLICY, NO_MATCH, String::new)));
        assert!(logs.denial(m.denied("b.example", 443, DEFAULT_POLICY, NO_MATCH, String::new)));
        assert!(!logs.denial(m.denied("a.example", 443, DEFAULT_POLICY, NO_MATCH, String::new))); // over 1 line per minute
        assert!(logs.denial(m.denied("c.example", 443, DEFAULT_POLICY, NO_MATCH, String::new))); // evicts b (least recent)
        let top: Vec<String> = m
            .top_denied(10, None)
            .into_iter()
            .map(|r| r.target)
            .collect();
        assert_eq!(top, ["a.example:443", "c.example:443"]);
        let text = m.render();
        assert!(
            text.contains("aml_egress_denied_series_evicted_total 1"),
            "{text}"
        );
        assert!(text.contains("aml_egress_denied_evicted_total 1"), "{text}");
        assert!(
            text.contains("aml_egress_log_lines_suppressed_total 1"),
            "{text}"
        );
        assert!(!text.contains("b.example"), "{text}");
    }

    #[test]
    fn denied_rows_pick_the_most_denied_with_their_last_reason_and_bounded_seen() {
        let m = Metrics::new(100);
        for (host, n) in [("a.example", 3), ("b.example", 1), ("c.example", 2)] {
            for _ in 0..n {
                m.denied(host, 443, DEFAULT_POLICY, NO_MATCH, String::new);
            }
        }
        let long = "x".repeat(MAX_SEEN + 10);
        m.denied(
            "b.example",
            443,
            DEFAULT_POLICY,
            (ReasonCode::HostMismatch, &long),
            String::new,
        );
        let rows = m.top_denied(2, None);
        let got: Vec<(&str, u64, &str)> = rows
            .iter()
            .map(|r| (r.target.as_str(), r.count, r.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a.example:443", 3, "no_matching_rule"),
                ("b.example:443", 2, "host_mismatch"),
            ]
        );
        assert_eq!(rows[1].seen.len(), MAX_SEEN);
        assert_eq!(m.top_denied(10, None).len(), 3);
        assert_eq!(m.top_denied(10, None)[0].reason, "no_matching_rule");
        let by_reason = m.refusals_by_reason();
        assert_eq!(by_reason.iter().sum::<u64>(), 0, "no decision was counted");
    }

    #[test]
    fn an_ipv6_target_is_shown_in_brackets() {
        // Unbracketed, "2001:db8::1:443" reads as another address with no port.
        let m = Metrics::new(10);
        m.denied("2001:db8::1", 443, DEFAULT_POLICY, NO_MATCH, String::new);
        m.denied("10.0.0.1", 443, DEFAULT_POLICY, NO_MATCH, String::new);
        let mut got: Vec<(String, String)> = m
            .top_denied(10, None)
            .into_iter()
            .map(|r| (r.target, r.host))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("10.0.0.1:443".to_owned(), "10.0.0.1".to_owned()),
                ("[2001:db8::1]:443".to_owned(), "2001:db8::1".to_owned()),
            ]
        );
        assert_eq!(m.top_denied(1, None)[0].target, "10.0.0.1:443");
    }

    #[test]
    fn the_ca_expiry_gauge_is_there_only_with_a_ca_and_goes_negative() {
        let m = Metrics::new(1);
        m.inspect_ca(None);
        assert!(!m.render().contains("aml_egress_inspect_ca_expiry_seconds "));
        m.inspect_ca(Some(SystemTime::now() + Duration::from_secs(86_400 + 30)));
        let text = m.render();
        let line = text
            .lines()
            .find(|l| l.starts_with("aml_egress_inspect_ca_expiry_seconds "))
            .unwrap_or_else(|| panic!("{text}"));
        let secs: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((86_400..=86_430).contains(&secs), "{line}");
        m.inspect_ca(Some(SystemTime::now() - Duration::from_secs(100)));
        assert!(
            m.render()
                .contains("aml_egress_inspect_ca_expiry_seconds -1"),
            "expired"
        );
        m.inspect_ca(None);
        assert!(!m.render().contains("aml_egress_inspect_ca_expiry_seconds "));
    }
}
