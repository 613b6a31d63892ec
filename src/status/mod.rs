//! The status page of the admin listener (`GET /`, and `GET /?format=json` for scripts):
//! health, refusals over the last hour, the most refused destinations with the entry that
//! would allow each, the names seen under wildcard rules, and the catalog in force.
//!
//! # Nothing here waits on the hot path
//! The denied-target table and the wildcard-names table each sit behind a mutex that
//! requests take. A page request takes neither: it reads one [`Snapshot`], published
//! through an [`ArcSwap`] by [`sample`], a task that wakes every [`SAMPLE_EVERY`] and
//!
//! - reads the per-reason decision counters (atomics; see
//!   [`Metrics::refusals_by_reason`]) and adds what they grew by to a ring of 60 minutes,
//!   so that the chart costs a request nothing and memory stays fixed;
//! - only when those counters moved, takes the denied table's lock for one pass that picks
//!   the [`DENIED_ROWS`] most denied targets ([`Metrics::top_denied`]), and otherwise keeps
//!   the rows it has;
//! - takes the wildcard-names lock to copy at most [`ALLOWED_ROWS`] names;
//! - loads the live configuration (an `ArcSwap` load) for the catalog in force.
//!
//! A request then renders at most [`DENIED_ROWS`] + [`ALLOWED_ROWS`] rows and 60 minutes.

pub mod host;
pub mod page;
pub mod session;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::watch;

use crate::allowed::AllowedReport;
use crate::clock::rfc3339;
use crate::metrics::{DeniedReport, Metrics, OpenNow};
use crate::proxy::Shared;
use crate::reason::ReasonCode;
use crate::reload::Reloader;

/// How often the sampler publishes a snapshot (the page refreshes every 10 s).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Most refused destinations on the page (and in its JSON).
pub const DENIED_ROWS: usize = 50;
/// Most names under wildcard rules on the page, the most recently seen.
pub const ALLOWED_ROWS: usize = 300;
/// Minutes the refusal chart covers.
pub const MINUTES: usize = 60;

/// What the status page reads from the running proxy; built once by `serve`.
pub struct Sources {
    pub metrics: Arc<Metrics>,
    pub shared: Arc<Shared>,
    pub reloader: Arc<Reloader>,
    /// The `/readyz` flag.
    pub ready: Arc<AtomicBool>,
    pub started: SystemTime,
    pub workers: usize,
    /// The proxy's listeners: the key that configures each, and its address.
    pub listeners: Vec<(&'static str, SocketAddr)>,
    /// The config file, or `None` for the embedded defaults.
    pub config_file: Option<std::path::PathBuf>,
}

/// The status page's state: its sources and the last published snapshot.
pub struct Status {
    sources: Sources,
    published: ArcSwap<Snapshot>,
}

impl Status {
    /// The state of a proxy that has just started: an empty snapshot until the first sample.
    pub fn new(sources: Sources) -> Arc<Status> {
        let empty = Snapshot::empty(&sources);
        Arc::new(Status {
            sources,
            published: ArcSwap::from_pointee(empty),
        })
    }

    /// The names of the configuration's policies now (`default` first): an `ArcSwap`
    /// load, no lock.
    pub fn policy_names(&self) -> Vec<String> {
        let live = self.sources.shared.live();
        let names = live.clients.compiled.names();
        names.into_iter().map(str::to_owned).collect()
    }

    /// The last snapshot, with what changes between samples (readiness, uptime) read now:
    /// an `ArcSwap` load and an atomic read, no lock.
    pub fn report(&self) -> Report {
        let now = SystemTime::now();
        let ready = self.sources.ready.load(Ordering::Relaxed);
        Report {
            now: rfc3339(now),
            ready,
            not_ready_because: (!ready).then_some(
                "starting up, or draining after SIGTERM (proxy.shutdown_delay_secs, then the grace period)",
            ),
            uptime_secs: now
                .duration_since(self.sources.started)
                .map_or(0, |d| d.as_secs()),
            snapshot: self.published.load_full(),
        }
    }

    /// Publish a snapshot (the sampler does; tests and benches may).
    pub fn publish(&self, s: Snapshot) {
        self.published.store(Arc::new(s));
    }
}

/// What one request of the page shows: the last snapshot and the state of now.
#[derive(Debug, Clone)]
pub struct Report {
    /// When the request was answered (RFC 3339, UTC).
    pub now: String,
    pub ready: bool,
    pub not_ready_because: Option<&'static str>,
    pub uptime_secs: u64,
    pub snapshot: Arc<Snapshot>,
}

/// `/?format=json`: the report's fields, then the snapshot's, in one object.
impl Serialize for Report {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            now: &'a str,
            ready: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            not_ready_because: Option<&'static str>,
            uptime_secs: u64,
            #[serde(flatten)]
            snapshot: &'a Snapshot,
        }
        View {
            now: &self.now,
            ready: self.ready,
            not_ready_because: self.not_ready_because,
            uptime_secs: self.uptime_secs,
            snapshot: &self.snapshot,
        }
        .serialize(s)
    }
}

/// Everything the sampler publishes.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// When it was taken (RFC 3339, UTC).
    pub taken_at: String,
    pub health: Health,
    pub refusals: Refusals,
    /// The most refused destinations, most first (at most [`DENIED_ROWS`]).
    pub denied: Vec<DeniedReport>,
    /// Names allowed under wildcard rules, grouped by rule (at most [`ALLOWED_ROWS`]).
    pub wildcards: Vec<WildcardNames>,
    pub catalog: CatalogInForce,
}

/// The proxy's health, apart from readiness.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub version: &'static str,
    pub started_at: String,
    pub workers: usize,
    pub listeners: Vec<ListenerRow>,
    pub open: OpenNow,
    /// The config file, or "the embedded defaults".
    pub config_source: String,
    /// When the configuration in force was loaded (start-up or the last good reload).
    pub config_loaded_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadRow>,
    /// When the inspection CA expires, when inspection is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inspect_ca_expires_at: Option<String>,
    /// The CA has expired: tunnels that need inspection are refused.
    pub inspect_ca_expired: bool,
}

/// One listening socket.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerRow {
    pub key: &'static str,
    pub addr: String,
}

/// The last reload attempt.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadRow {
    pub at: String,
    pub trigger: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Refusals (denials and would-be denials) per minute over the last hour, by reason.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Refusals {
    /// The reasons that occur, most refusals first.
    pub reasons: Vec<&'static str>,
    /// Oldest first, [`MINUTES`] of them (none before the first sample).
    pub minutes: Vec<Minute>,
}

/// One minute of [`Refusals`].
#[derive(Debug, Clone, Serialize)]
pub struct Minute {
    /// The minute's start (RFC 3339, UTC).
    pub start: String,
    /// Refusals by reason, in the order of [`Refusals::reasons`].
    pub counts: Vec<u64>,
}

impl Refusals {
    /// All refusals in the hour.
    pub fn total(&self) -> u64 {
        self.minutes.iter().flat_map(|m| &m.counts).sum()
    }
}

/// The names seen under one wildcard pattern.
#[derive(Debug, Clone, Serialize)]
pub struct WildcardNames {
    pub rule: String,
    pub rule_source: String,
    pub names: Vec<AllowedReport>,
}

/// The catalog selection in force.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogInForce {
    pub revision: String,
    pub cloud: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Optional parts switched on, and off: name and what it covers.
    pub parts_on: Vec<(String, String)>,
    pub parts_off: Vec<(String, String)>,
    /// The `[[client_policy]]` policies: name, mode, and the optional parts each switches on.
    pub client_policies: Vec<ClientPolicyRow>,
}

/// One `[[client_policy]]`.
#[derive(Debug, Clone, Serialize)]
pub struct ClientPolicyRow {
    pub name: String,
    pub mode: &'static str,
    pub revision: String,
    pub cloud: &'static str,
    pub region: Option<String>,
    pub parts_on: Vec<String>,
}

impl Snapshot {
    fn empty(s: &Sources) -> Snapshot {
        let now = SystemTime::now();
        Snapshot {
            taken_at: rfc3339(now),
            health: health(s, OpenNow::default()),
            refusals: Refusals::default(),
            denied: Vec::new(),
            wildcards: Vec::new(),
            catalog: catalog(&s.shared),
        }
    }
}

fn health(s: &Sources, open: OpenNow) -> Health {
    let loads = s.reloader.loads();
    let live = s.shared.live();
    let ca = live
        .inspector
        .as_ref()
        .and_then(|i| i.inspection().expires_at());
    Health {
        version: env!("CARGO_PKG_VERSION"),
        started_at: rfc3339(s.started),
        workers: s.workers,
        listeners: s
            .listeners
            .iter()
            .map(|(key, a)| ListenerRow {
                key,
                addr: a.to_string(),
            })
            .collect(),
        open,
        config_source: s.config_file.as_ref().map_or_else(
            || "the embedded defaults (no --config)".to_owned(),
            |p| p.display().to_string(),
        ),
        config_loaded_at: rfc3339(loads.in_force_since),
        last_reload: loads.last_reload.as_ref().map(|r| ReloadRow {
            at: rfc3339(r.at),
            trigger: r.trigger.as_str(),
            ok: r.error.is_none(),
            error: r.error.clone(),
        }),
        inspect_ca_expires_at: ca.map(rfc3339),
        inspect_ca_expired: ca.is_some_and(|t| t <= SystemTime::now()),
    }
}

fn catalog(shared: &Shared) -> CatalogInForce {
    let live = shared.live();
    let b = &live.built;
    let (on, off) = b
        .parts
        .iter()
        .map(|p| (p.name.clone(), p.marked_summary()))
        .partition(|(name, _)| b.features.contains(name));
    CatalogInForce {
        revision: b.revision.clone(),
        cloud: b.cloud.name(),
        region: b.region.clone(),
        parts_on: on,
        parts_off: off,
        client_policies: live
            .clients
            .compiled
            .policies
            .iter()
            .map(|cp| ClientPolicyRow {
                name: cp.name.clone(),
                mode: cp.mode.as_str(),
                revision: cp.built.revision.clone(),
                cloud: cp.built.cloud.name(),
                region: cp.built.region.clone(),
                parts_on: cp.built.features.iter().cloned().collect(),
            })
            .collect(),
    }
}

/// The names seen under wildcard rules, grouped by pattern (groups in the order of their
/// most recent name).
fn group(rows: Vec<AllowedReport>) -> Vec<WildcardNames> {
    let mut out: Vec<WildcardNames> = Vec::new();
    for r in rows {
        match out.iter_mut().find(|g| g.rule == r.rule) {
            Some(g) => g.names.push(r),
            None => out.push(WildcardNames {
                rule: r.rule.clone(),
                rule_source: r.rule_source.clone(),
                names: vec![r],
            }),
        }
    }
    out
}

/// Refusal counts per minute, by reason, for the last [`MINUTES`] minutes: fixed memory,
/// fed by the sampler with what the counters grew by.
#[derive(Debug, Default)]
pub struct Ring {
    /// Minute number (Unix seconds / 60) and counts by reason index, oldest first.
    minutes: VecDeque<(u64, Vec<u64>)>,
}

impl Ring {
    /// Add `counts` (by [`ReasonCode::ALL`] index) to minute `minute`; minutes older than
    /// the last [`MINUTES`] are dropped.
    pub fn add(&mut self, minute: u64, counts: &[u64]) {
        match self.minutes.back_mut() {
            Some((m, c)) if *m == minute => {
                for (a, b) in c.iter_mut().zip(counts) {
                    *a += b;
                }
            }
            // A clock stepped back: count into the newest minute rather than reorder.
            Some((m, c)) if *m > minute => {
                for (a, b) in c.iter_mut().zip(counts) {
                    *a += b;
                }
            }
            _ => self.minutes.push_back((minute, counts.to_vec())),
        }
        while self
            .minutes
            .front()
            .is_some_and(|(m, _)| *m + MINUTES as u64 <= minute)
        {
            self.minutes.pop_front();
        }
    }

    /// The hour ending with minute `now`: one [`Minute`] each, zero where nothing was
    /// counted, and only the reasons that occur (most first).
    pub fn hour(&self, now: u64) -> Refusals {
        let first = now.saturating_sub(MINUTES as u64 - 1);
        let mut totals = vec![0u64; ReasonCode::ALL.len()];
        for (m, c) in &self.minutes {
            if *m >= first && *m <= now {
                for (t, n) in totals.iter_mut().zip(c) {
                    *t += n;
                }
            }
        }
        let mut order: Vec<usize> = (0..totals.len()).filter(|&i| totals[i] > 0).collect();
        order.sort_by(|&a, &b| totals[b].cmp(&totals[a]).then(a.cmp(&b)));
        let minutes = (first..=now)
            .map(|m| {
                let counts = self.minutes.iter().find(|(k, _)| *k == m).map_or_else(
                    || vec![0; order.len()],
                    |(_, c)| {
                        order
                            .iter()
                            .map(|&i| c.get(i).copied().unwrap_or(0))
                            .collect()
                    },
                );
                Minute {
                    start: rfc3339(UNIX_EPOCH + Duration::from_secs(m * 60)),
                    counts,
                }
            })
            .collect();
        Refusals {
            reasons: order.iter().map(|&i| ReasonCode::ALL[i].as_str()).collect(),
            minutes,
        }
    }
}

fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() / 60)
}

/// Publish a [`Snapshot`] every `every` until `stopping` flips (see the module's
/// documentation for what it locks and when).
pub async fn sample(status: Arc<Status>, every: Duration, mut stopping: watch::Receiver<bool>) {
    let s = &status.sources;
    let mut ring = Ring::default();
    // The counters start at zero with the process, so the first sample counts everything
    // since start-up into its minute.
    let mut before = vec![0u64; ReasonCode::ALL.len()];
    let mut denied: Vec<DeniedReport> = Vec::new();
    let mut tick: u64 = 0;
    loop {
        let now = SystemTime::now();
        let counts = s.metrics.refusals_by_reason();
        let grew: Vec<u64> = counts
            .iter()
            .zip(&before)
            .map(|(n, b)| n.saturating_sub(*b))
            .collect();
        let moved = grew.iter().any(|&g| g > 0);
        ring.add(minute_of(now), &grew);
        before = counts;
        // A reload can evict rows (a lower bound) without a refusal: refresh them anyway
        // once a minute.
        if moved || tick % 30 == 0 {
            denied = s.metrics.top_denied(DENIED_ROWS, None);
        }
        tick += 1;
        let snapshot = Snapshot {
            taken_at: rfc3339(now),
            health: health(s, s.metrics.open_now(s.workers)),
            refusals: ring.hour(minute_of(now)),
            denied: denied.clone(),
            wildcards: group(s.metrics.allowed.report(None, ALLOWED_ROWS)),
            catalog: catalog(&s.shared),
        };
        status.publish(snapshot);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopping.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(ReasonCode, u64)]) -> Vec<u64> {
        let mut v = vec![0; ReasonCode::ALL.len()];
        for (r, n) in pairs {
            v[r.index()] = *n;
        }
        v
    }

    #[test]
    fn the_ring_keeps_an_hour_by_minute_and_orders_reasons_by_count() {
        let mut ring = Ring::default();
        ring.add(1000, &counts(&[(ReasonCode::NoMatchingRule, 2)]));
        ring.add(1000, &counts(&[(ReasonCode::DenyRule, 5)]));
        ring.add(1030, &counts(&[(ReasonCode::NoMatchingRule, 1)]));
        let h = ring.hour(1030);
        assert_eq!(h.minutes.len(), MINUTES);
        assert_eq!(h.reasons, ["deny_rule", "no_matching_rule"]);
        let first = 1030 - (MINUTES as u64 - 1);
        assert_eq!(h.minutes[(1000 - first) as usize].counts, [5, 2]);
        assert_eq!(h.minutes[MINUTES - 1].counts, [0, 1]);
        assert_eq!(h.total(), 8);
        // An hour later the first minute has left the ring.
        ring.add(1060, &counts(&[]));
        let h = ring.hour(1060);
        assert_eq!(h.reasons, ["no_matching_rule"]);
        assert_eq!(h.total(), 1);
        assert!(ring.minutes.len() <= MINUTES);
    }

    #[test]
    fn an_empty_ring_is_an_hour_of_nothing() {
        let h = Ring::default().hour(500);
        assert_eq!(h.minutes.len(), MINUTES);
        assert!(h.reasons.is_empty());
        assert_eq!(h.total(), 0);
    }
}
