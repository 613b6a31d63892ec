//! Telling systemd how the service is (`Type=notify`): ready, reloading, stopping. Used by
//! `serve` and by reload, so it sits below both.

/// Tell systemd (when it started us with `Type=notify`, `NOTIFY_SOCKET` set) how the
/// service is; without a notify socket this does nothing. A failure is logged, never
/// returned: the proxy serves the same either way.
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
