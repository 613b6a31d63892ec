//! The plumbing every way into the proxy shares, below the modules that use it: a
//! connection's place under the limits ([`Slot`], with what a tunnel inherits in
//! [`ConnHandles`]), registering an accepted socket with its worker's runtime, the drain
//! tracker and the shutdown signal. It imports none of the listener, CONNECT, tunnel or
//! transparent modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use super::addr::ClientAddr;
use super::keepalive;
use super::per_client;
use crate::logs::LogBudget;

/// A connection's place under `proxy.max_connections`, shared with its tunnel, and the
/// turn that tells its stream when it becomes a tunnel.
#[derive(Clone)]
pub(crate) struct ConnHandles {
    /// Handed on to a tunnel, which holds the place until it closes.
    pub slot: Arc<Slot>,
    pub turn: Arc<keepalive::Turn>,
    /// Where a connection that outlives its request (an upgraded one) registers, so that
    /// shutdown waits for it and closes it at the end of the grace period.
    pub tracker: Arc<Tracker>,
}

/// A permit that, when given back while a lowered limit is owed permits, is kept instead.
pub(crate) struct Slot {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    owed: Arc<AtomicUsize>,
    /// The place under `proxy.max_connections_per_client`, when that limit is on.
    _client: Option<per_client::ClientPlace>,
    /// The open-connections gauge of the worker serving it.
    worker: prometheus::IntGauge,
    /// The open-tunnels gauge of the listener that accepted it, for its tunnels.
    tunnels: prometheus::IntGauge,
}

impl Slot {
    /// A connection's place: its `permit` under `proxy.max_connections` (kept instead of
    /// given back while `owed` is above 0), its place under the per-client limit, and its
    /// worker's open-connections `gauge`, raised now and lowered when the slot drops; and
    /// the open-tunnels gauge of its listener (`tunnels`), for its tunnels to raise.
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        owed: Arc<AtomicUsize>,
        client: Option<per_client::ClientPlace>,
        gauge: prometheus::IntGauge,
        tunnels: prometheus::IntGauge,
    ) -> Slot {
        gauge.inc();
        Slot {
            permit: Some(permit),
            owed,
            _client: client,
            worker: gauge,
            tunnels,
        }
    }

    /// The open-tunnels gauge of the listener that accepted the connection.
    pub(crate) fn tunnel_gauge(&self) -> &prometheus::IntGauge {
        &self.tunnels
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.worker.dec();
        let paid = self
            .owed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| o.checked_sub(1))
            .is_ok();
        if paid && let Some(p) = self.permit.take() {
            p.forget();
        }
    }
}

/// Resolves once shutdown has started (or its sender is gone).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Register a client socket with the worker's runtime, to wait on it. A failure (out of
/// memory, or of epoll watches) closes the connection and is logged (rate-limited).
pub(crate) fn register(
    sock: std::net::TcpStream,
    client: ClientAddr,
    logs: &LogBudget,
) -> Option<TcpStream> {
    match TcpStream::from_std(sock) {
        Ok(s) => Some(s),
        Err(e) => {
            if logs.line() {
                tracing::error!(client = %client, error = %e, "cannot watch a client connection; closed (raise fs.epoll.max_user_watches or lower proxy.max_connections)");
            }
            None
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
