//! `aml-egress serve`: bind the listeners, start the admin endpoints, the reload watch and
//! the signal handler, serve until stopped, drain, exit.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::admin::{self, Admin};
use crate::config::{Compiled, LogSettings};
use crate::logs::LogBudget;
use crate::metrics::Metrics;
use crate::proxy::{self, Shared};
use crate::proxy::{ListenAddr, Live, SetupError};
use crate::reload::Reloader;
use crate::status::{Sources as StatusSources, Status};

/// Install the log subscriber: `log.level` (or `AML_EGRESS_LOG`, which wins, with
/// `tracing` filter syntax) and `log.format`, on standard error.
pub fn init_logging(log: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AML_EGRESS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log.level.as_str()));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr);
    if log.format == crate::config::LogFormat::Text {
        builder.init();
    } else {
        builder.json().with_current_span(false).init();
    }
}

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("cannot listen for SIGTERM and SIGINT: {0}")]
    Signal(std::io::Error),
}

/// A started proxy: its addresses, its reloader, and the task that ends after the drain.
pub struct Running {
    /// The proxy's listening sockets, plain then TLS.
    pub addrs: Vec<std::net::SocketAddr>,
    pub admin_addr: Option<std::net::SocketAddr>,
    pub reloader: Arc<Reloader>,
    /// Resolves with the number of connections still open when the grace period ended.
    pub done: tokio::task::JoinHandle<usize>,
}

/// Serve a compiled configuration until SIGTERM or SIGINT, then drain. Its config file,
/// if any, is watched and re-read on reload.
pub async fn serve(compiled: Compiled) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = crate::shutdown::channel();
    let signalled = crate::shutdown::on_signal(stop_tx).map_err(ServeError::Signal)?;
    let running = start(compiled, stop_rx).await?;
    tokio::spawn(signalled);
    let _ = running.done.await;
    tracing::info!("stopped");
    Ok(())
}

/// Bind, start serving, and return at once; everything stops when `stop` flips. Reloads
/// come from SIGHUP and the file watch, or [`Reloader::reload`].
pub async fn start(
    compiled: Compiled,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Running, ServeError> {
    let workers = proxy::Workers::new(compiled.proxy.workers).map_err(SetupError::Workers)?;
    let worker_count = workers.len();
    let listeners = proxy::bind(&compiled, worker_count)?;
    let addrs: Vec<_> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let listening: Vec<(&'static str, std::net::SocketAddr)> = listeners
        .iter()
        .filter_map(|l| Some((l.role.key(), l.local_addr().ok()?)))
        .collect();
    let config_file = compiled.file.clone();
    let admin_listener = match compiled.admin.listen {
        None => None,
        Some(addr) => Some(admin::bind(addr).await?),
    };
    // The self check refuses every listener of ours, the admin one included.
    let mut own: Vec<ListenAddr> = addrs.iter().copied().map(ListenAddr).collect();
    own.extend(admin_listener.as_ref().map(|(_, a)| ListenAddr(*a)));
    let token = match &compiled.admin.token_file {
        Some(f) => Some(admin::read_token(f)?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(compiled.metrics.max_denied_targets));
    metrics.allowed.set_max(compiled.metrics.max_allowed_names);
    let logs = Arc::new(LogBudget::new(
        compiled.log.denied_lines_per_minute,
        metrics.suppressed_lines(),
    ));
    let built = &compiled.built;
    let counts = built.policy.counts();
    let (cloud, revision) = (built.cloud, built.revision.clone());
    compiled.clients.log_notes(built);
    let (mode, interval) = (compiled.proxy.mode, compiled.reload.watch_interval_secs);
    metrics.inspect_ca(compiled.inspect.expires_at());
    let reloader = Reloader::new(&compiled, own.clone(), metrics.clone(), logs.clone());
    let live = Live::build(compiled, own, metrics.clone(), logs)?;
    metrics.loaded(true, Some((counts, revision.as_str(), cloud.name())));

    // The proxy stops accepting only after proxy.shutdown_delay_secs: until then a load
    // balancer that has not yet seen /readyz fail still gets its connections served.
    let (listeners_stop, listeners_stopping) = tokio::sync::watch::channel(false);
    let shared = Shared::new(live, listeners_stopping);
    let ready = Arc::new(AtomicBool::new(false));
    let admin_addr = admin_listener.as_ref().map(|(_, a)| *a);
    let (admin_stop_tx, admin_stop) = tokio::sync::watch::channel(false);
    let reloader = Arc::new(reloader.serving(shared.clone()));
    if let Some((l, _)) = admin_listener {
        let status = Status::new(StatusSources {
            metrics: metrics.clone(),
            shared: shared.clone(),
            reloader: reloader.clone(),
            ready: ready.clone(),
            started: std::time::SystemTime::now(),
            workers: worker_count,
            listeners: listening,
            config_file,
        });
        tokio::spawn(crate::status::sample(
            status.clone(),
            crate::status::SAMPLE_EVERY,
            admin_stop.clone(),
        ));
        let admin = Arc::new(Admin {
            metrics: metrics.clone(),
            token,
            ready: ready.clone(),
            status,
            sessions: Default::default(),
        });
        tokio::spawn(admin::serve(l, admin, admin_stop));
    }
    let baseline = reloader.baseline();
    let hup = crate::reload::hangup();
    tokio::spawn(
        reloader
            .clone()
            .watch(interval, stop.clone(), baseline, hup),
    );

    // Ready before the line that says so: a reader of the log (a test, an operator) may
    // ask /readyz the moment it sees it.
    ready.store(true, Ordering::Relaxed);
    tracing::info!(
        listen = ?addrs,
        admin = %admin_addr.map_or_else(|| "none".to_owned(), |a| a.to_string()),
        mode = %mode,
        workers = worker_count,
        cloud = %cloud,
        revision = %revision,
        exact = counts.exact,
        wildcard = counts.wildcard,
        deny = counts.deny,
        "aml-egress serving"
    );
    crate::systemd::notify(&[sd_notify::NotifyState::Ready]);
    let mut stopping = stop;
    let done = tokio::spawn(async move {
        let delay = shared.live().config.shutdown_delay;
        let run = tokio::spawn(proxy::run(listeners, workers, shared));
        let _ = stopping.wait_for(|s| *s).await;
        // Draining: not ready any more, but metrics and health stay up until the end.
        ready.store(false, Ordering::Relaxed);
        crate::systemd::notify(&[sd_notify::NotifyState::Stopping]);
        if !delay.is_zero() {
            tracing::info!(
                delay_secs = delay.as_secs_f64(),
                "not ready; still accepting for proxy.shutdown_delay_secs"
            );
            tokio::time::sleep(delay).await;
        }
        let _ = listeners_stop.send(true);
        let left = run.await.unwrap_or(0);
        let _ = admin_stop_tx.send(true);
        left
    });
    Ok(Running {
        addrs,
        admin_addr,
        reloader,
        done,
    })
}
