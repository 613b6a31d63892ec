//! Hot reload: on SIGHUP, or when the config file (or a file it names) changes, load and
//! compile everything off the hot path and swap it in whole. A file that fails to load
//! leaves the running policy in force; the failure is logged with its location and counted.
//!
//! The watch reads the files' bytes rather than trusting modification times, following
//! symbolic links each time, so a Kubernetes ConfigMap update (which swaps the `..data`
//! symlink to a new directory) is seen like an edit in place.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::compile::RestartOnly;
use crate::config::{self, Compiled};
use crate::logs::LogBudget;
use crate::metrics::Metrics;
use crate::proxy::{ListenAddr, Live, Shared};

/// What started a reload (logged as its `trigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP (systemd's `ExecReload`, `kill -HUP`).
    Hangup,
    /// A watched file's contents changed.
    FileChanged,
    /// Asked for by the embedding program or a test.
    Requested,
}

impl Trigger {
    /// The log value.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Hangup => "SIGHUP",
            Trigger::FileChanged => "file changed",
            Trigger::Requested => "requested",
        }
    }
}

/// Reloads the configuration of a running proxy.
pub struct Reloader {
    /// The config file; `None` when serving the embedded defaults.
    path: Option<PathBuf>,
    shared: Option<Arc<Shared>>,
    metrics: Arc<Metrics>,
    logs: Arc<LogBudget>,
    /// The proxy's own listening sockets (for the self-connection guard).
    own: Vec<ListenAddr>,
    /// The restart-only values the process started with, to tell which changes need a
    /// restart.
    started: RestartOnly,
    /// Counts finished reload attempts (successful or not), for whoever waits on one.
    pub attempts: watch::Sender<u64>,
    /// The files the configuration in force was read from.
    files: std::sync::Mutex<Vec<PathBuf>>,
    /// When the configuration in force was loaded and how the last reload went, for the
    /// status page (swapped whole, so that a reader never waits on a reload).
    loads: ArcSwap<Loads>,
}

/// When the configuration in force was loaded, and how the last reload went.
#[derive(Debug, Clone)]
pub struct Loads {
    /// Start-up, or the last reload that succeeded.
    pub in_force_since: SystemTime,
    /// The last reload attempt, if there was one.
    pub last_reload: Option<Reloaded>,
}

/// One reload attempt.
#[derive(Debug, Clone)]
pub struct Reloaded {
    pub at: SystemTime,
    pub trigger: Trigger,
    /// Why it failed (the previous configuration stayed in force); `None` when it succeeded.
    pub error: Option<String>,
}

impl Reloader {
    /// A reloader for the configuration the proxy starts with; `own` are its listening
    /// sockets. It serves once given the proxy's state ([`Reloader::serving`]).
    pub fn new(
        started: &Compiled,
        own: Vec<ListenAddr>,
        metrics: Arc<Metrics>,
        logs: Arc<LogBudget>,
    ) -> Self {
        Reloader {
            path: started.file.clone(),
            shared: None,
            metrics,
            logs,
            own,
            started: started.restart.clone(),
            attempts: watch::Sender::new(0),
            files: std::sync::Mutex::new(started.watched_files()),
            loads: ArcSwap::from_pointee(Loads {
                in_force_since: SystemTime::now(),
                last_reload: None,
            }),
        }
    }

    /// The reloader, swapping into `shared`.
    pub fn serving(self, shared: Arc<Shared>) -> Self {
        Reloader {
            shared: Some(shared),
            ..self
        }
    }

    /// Load, compile and swap in the configuration; `why` is logged. Returns whether the
    /// new configuration is in force.
    pub fn reload(&self, why: Trigger) -> bool {
        crate::systemd::notify(&[sd_notify::NotifyState::Reloading]);
        let result = self.load_and_swap(why);
        let at = SystemTime::now();
        let before = self.loads.load();
        self.loads.store(Arc::new(Loads {
            in_force_since: match result {
                Ok(()) => at,
                Err(_) => before.in_force_since,
            },
            last_reload: Some(Reloaded {
                at,
                trigger: why,
                error: result.as_ref().err().cloned(),
            }),
        }));
        crate::systemd::notify(&[sd_notify::NotifyState::Ready]);
        self.attempts.send_modify(|n| *n += 1);
        result.is_ok()
    }

    /// When the configuration in force was loaded, and how the last reload went.
    pub fn loads(&self) -> Arc<Loads> {
        self.loads.load_full()
    }

    fn load_and_swap(&self, why: Trigger) -> Result<(), String> {
        let Some(shared) = &self.shared else {
            return Err("the proxy is not serving yet".into());
        };
        let loaded = config::load(self.path.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let counts = c.built.policy.counts();
                let (revision, cloud) = (c.built.revision.clone(), c.built.cloud.name());
                let changes = self.started.diff(&c.restart);
                let files = c.watched_files();
                let (lines, denied, allowed, ca_expiry) = (
                    c.log.denied_lines_per_minute,
                    c.metrics.max_denied_targets,
                    c.metrics.max_allowed_names,
                    c.inspect.expires_at(),
                );
                Live::build(c, self.own.clone(), self.metrics.clone(), self.logs.clone())
                    .map(|live| {
                        (
                            live,
                            changes,
                            files,
                            (lines, denied, allowed, ca_expiry),
                            counts,
                            revision,
                            cloud,
                        )
                    })
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Err(e) => {
                self.metrics.loaded(false, None);
                tracing::error!(trigger = why.as_str(), error = %e, "configuration reload failed; the previous configuration stays in force");
                Err(e)
            }
            Ok((
                live,
                changes,
                files,
                (lines, denied, allowed, ca_expiry),
                counts,
                revision,
                cloud,
            )) => {
                for c in changes {
                    tracing::warn!(key = c.key, running = %c.running, file = %c.new, "this setting changes only on restart; the running value stays");
                }
                live.clients.compiled.log_notes(&live.built);
                *self.files.lock().unwrap_or_else(|p| p.into_inner()) = files;
                self.logs.set_per_target(lines);
                self.metrics.set_max_denied(denied);
                self.metrics.allowed.set_max(allowed);
                self.metrics.inspect_ca(ca_expiry);
                shared.replace(live);
                let live = shared.live();
                let policies: Vec<&crate::policy::Policy> = live
                    .clients
                    .compiled
                    .with_default(&live.built)
                    .map(|(_, b)| &b.policy)
                    .collect();
                forget_refused_names(&self.metrics, &policies);
                self.metrics
                    .loaded(true, Some((counts, revision.as_str(), cloud)));
                tracing::info!(
                    trigger = why.as_str(),
                    revision = %revision,
                    cloud,
                    exact = counts.exact,
                    wildcard = counts.wildcard,
                    deny = counts.deny,
                    "configuration reloaded"
                );
                Ok(())
            }
        }
    }

    /// The files of the configuration in force (a failed reload keeps the last list).
    fn watched(&self) -> Vec<PathBuf> {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The watched files and their fingerprint now: taken when the proxy starts, so that
    /// a change made right after start-up is not mistaken for the starting state.
    pub fn baseline(&self) -> (Vec<PathBuf>, u64) {
        let files = self.watched();
        let seen = fingerprint(&files);
        (files, seen)
    }

    /// Reload on SIGHUP (`hup`, from [`hangup`]), and when a watched file differs from
    /// `baseline` or the last load (looked at every `interval`; never when it is zero),
    /// until `stopping` flips.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        mut stopping: watch::Receiver<bool>,
        baseline: (Vec<PathBuf>, u64),
        mut hup: Option<tokio::signal::unix::Signal>,
    ) {
        // Loading, compiling and reading files block: keep them off the runtime's workers.
        let (mut files, mut seen) = baseline;
        let polling = !interval.is_zero() && self.path.is_some();
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let why = tokio::select! {
                _ = stopping.wait_for(|s| *s) => return,
                _ = hup_recv => Trigger::Hangup,
                _ = tokio::time::sleep(interval), if polling => Trigger::FileChanged,
            };
            // What the files hold now, before loading them: an edit that lands during the
            // reload is then seen as a change at the next look.
            let f = files.clone();
            let now = blocking(move || fingerprint(&f)).await.unwrap_or_default();
            if why == Trigger::FileChanged && now == seen {
                continue;
            }
            let me = self.clone();
            let _ = blocking(move || me.reload(why)).await;
            let listed = self.watched();
            if listed == files {
                seen = now;
            } else {
                files = listed;
                let f = files.clone();
                seen = blocking(move || fingerprint(&f)).await.unwrap_or_default();
            }
        }
    }
}

/// Listen for SIGHUP. Called before the proxy says it is serving: until a handler is
/// installed, SIGHUP's default action ends the process, so a reload sent right after
/// start-up (systemd's `ExecReload`) would stop the proxy.
pub fn hangup() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload by signal is off");
            None
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// A hash of the files' contents (following symbolic links); a missing file counts too.
pub fn fingerprint(files: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        match std::fs::read(f) {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
    }
    h.finish()
}

/// After a reload, forget the names `/allowed` holds that no policy (the default one or a
/// client policy) still allows under the same wildcard (a narrowing refused them), so
/// that the next `suggest --narrow` does not list them again.
fn forget_refused_names(metrics: &crate::metrics::Metrics, policies: &[&crate::policy::Policy]) {
    let forgotten = metrics.allowed.retain(|name, port, pattern| {
        let Ok(t) = crate::policy::Target::parse(&format!("{name}:{port}")) else {
            return false;
        };
        policies.iter().any(|policy| {
            let d = policy.decide(&t, crate::policy::PathView::Hidden);
            d.is_allowed() && d.rule.and_then(|id| policy.wildcard(id)) == Some(pattern)
        })
    });
    if forgotten > 0 {
        tracing::info!(
            forgotten,
            "names no longer allowed under their wildcard removed from /allowed"
        );
    }
}
