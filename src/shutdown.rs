//! Turning SIGTERM and SIGINT into the proxy's stop signal.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// A stop signal for [`crate::proxy::run`] and the sender that flips it.
pub fn channel() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Flip `stop` on the first SIGTERM or SIGINT.
pub async fn on_signal(stop: watch::Sender<bool>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let which = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = which,
        "stopping: no new connections; draining open ones"
    );
    let _ = stop.send(true);
    Ok(())
}
