//! The worker threads that serve connections: one single-threaded runtime per worker, each
//! accepting on its own socket of every listener (`SO_REUSEPORT`), so that a connection is
//! served start to end on the thread whose socket the kernel gave it to, with no hand-off
//! between threads (the design of nginx, Envoy and Traffic Server). The kernel hashes
//! connections over the sockets; `aml_egress_worker_connections` shows the spread.
//!
//! Shutdown: every worker stops accepting when `stopping` flips (its sockets close), then
//! keeps running its open connections and tunnels until the drain is over; only then do the
//! threads end, and whatever is still open closes with them.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::listen::{Listener, Role, accept_loop, stopped};
use super::state::Shared;

/// The workers' runtimes, built before the proxy reports ready so that a failure to build
/// one stops start-up instead of a running proxy.
pub struct Workers {
    runtimes: Vec<tokio::runtime::Runtime>,
}

impl Workers {
    /// `count` workers; `0`: one per CPU this process may run on.
    ///
    /// # Errors
    /// The operating system refused what a runtime needs (an epoll instance, an eventfd).
    pub fn new(count: usize) -> io::Result<Workers> {
        let runtimes = (0..resolve(count))
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            })
            .collect::<io::Result<_>>()?;
        Ok(Workers { runtimes })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.runtimes.len()
    }

    /// Never true: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.runtimes.is_empty()
    }
}

impl Drop for Workers {
    /// Runtimes never used (start-up failed after they were built) are let go without
    /// waiting: this may run inside the main runtime, where blocking is not allowed.
    fn drop(&mut self) {
        for rt in self.runtimes.drain(..) {
            rt.shutdown_background();
        }
    }
}

/// The number of workers `proxy.workers = count` means.
pub fn resolve(count: usize) -> usize {
    match count {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Serve every listener on every worker until `stopping` flips, then drain open
/// connections and tunnels for up to the grace period. Returns the number still open at
/// the deadline. `listeners` must have been bound for `workers.len()` workers.
pub async fn run(listeners: Vec<Listener>, workers: Workers, shared: Arc<Shared>) -> usize {
    let mut workers = workers;
    let runtimes = std::mem::take(&mut workers.runtimes);
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Role)>> =
        (0..runtimes.len()).map(|_| Vec::new()).collect();
    for l in listeners {
        let role = l.role;
        for (i, s) in l.into_sockets().into_iter().enumerate() {
            per_worker[i % runtimes.len()].push((s, role));
        }
    }
    let (exit_tx, exit_rx) = watch::channel(false);
    let mut closed = Vec::new();
    let mut ended = Vec::new();
    for (index, (rt, sockets)) in runtimes.into_iter().zip(per_worker).enumerate() {
        let (closed_tx, closed_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let (shared, exit) = (shared.clone(), exit_rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("aml-egress-w{index}"))
            .spawn(move || {
                rt.block_on(worker(index, sockets, shared, closed_tx, exit));
                drop(rt); // closes what is still open
                drop(ended_tx);
            });
        if let Err(e) = thread {
            tracing::error!(worker = index, error = %e, "cannot start a worker thread; serving with fewer");
            continue;
        }
        closed.push(closed_rx);
        ended.push(ended_rx);
    }
    let mut stopping = shared.stopping.clone();
    stopped(&mut stopping).await;
    for c in closed {
        let _ = c.await; // every listening socket is closed once these answer
    }
    let grace = shared.live().config.grace_period;
    let mut left = 0;
    if tokio::time::timeout(grace, shared.tracker.drained())
        .await
        .is_err()
    {
        left = shared.tracker.live();
        tracing::warn!(
            open = left,
            grace_secs = grace.as_secs_f64(),
            "grace period over; closing what is still open"
        );
        shared.tracker.close_all();
        // Each closes at its next poll; wait briefly so that their sockets are gone.
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.tracker.drained()).await;
    }
    let _ = exit_tx.send(true);
    for e in ended {
        let _ = e.await; // the sender drops when the thread's runtime is gone
    }
    left
}

/// One worker: accept on its sockets until shutdown, then keep serving what is open until
/// told to exit.
async fn worker(
    index: usize,
    sockets: Vec<(std::net::TcpListener, Role)>,
    shared: Arc<Shared>,
    closed: oneshot::Sender<()>,
    mut exit: watch::Receiver<bool>,
) {
    let gauge = shared.live().metrics.worker_connections(index);
    // tokio wakes its driver (an eventfd write and one more epoll_wait) whenever a timer is
    // armed that is due before the driver's next planned wake-up. A worker arms a few timers
    // per connection, all of a second or more (header, dial, idle), and it is never parked
    // while it arms them; a tick every half second keeps the planned wake-up near enough
    // that arming them never wakes the driver.
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
        }
    });
    let mut accepts = Vec::new();
    for (socket, role) in sockets {
        // Deprecated because an `AsRawFd` type need not own its descriptor; a std listener
        // does, for as long as the `AsyncFd` holds it, which is what `register` requires.
        #[allow(deprecated)]
        let registered = tokio::io::unix::AsyncFd::new(socket);
        match registered {
            Ok(tcp) => accepts.push(tokio::spawn(accept_loop(
                tcp,
                role,
                shared.clone(),
                gauge.clone(),
            ))),
            Err(e) => {
                tracing::error!(worker = index, listener = role.key(), error = %e, "a worker cannot use its listening socket")
            }
        }
    }
    let mut stopping = shared.stopping.clone();
    stopped(&mut stopping).await;
    for a in &accepts {
        a.abort();
    }
    for a in accepts {
        let _ = a.await; // the socket is closed once its loop is gone
    }
    let _ = closed.send(());
    let _ = exit.wait_for(|e| *e).await;
}
