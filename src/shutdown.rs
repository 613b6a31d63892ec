//! Turning SIGTERM and SIGINT into the proxy's stop signal.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// A stop signal for [`crate::proxy::run`] and the sender that flips it.
pub fn channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Listen for SIGTERM and SIGINT now; the future flips `stop` on the first one. Called
/// before the proxy says it is ready: until a handler is installed, SIGTERM's default
/// action ends the process without a drain (and without telling systemd).
pub fn on_signal(stop: watch::Sender<bool>) -> std::io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = which,
            "stopping: no new connections; draining open ones"
        );
        let _ = stop.send(true);
    })
}
