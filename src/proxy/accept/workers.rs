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

use super::listen::{Listener, Role, accept_loop};
use crate::proxy::plumbing::stopped;
use crate::proxy::state::Shared;

/// The worker threads, started (each with its runtime built) before the proxy reports
/// ready, so that a failure to start one stops start-up instead of a running proxy. Each
/// waits for the sockets it is to serve ([`run`]); dropped without them, they end.
pub struct Workers {
    jobs: Vec<std::sync::mpsc::Sender<Job>>,
}

/// What a worker is given to serve.
struct Job {
    sockets: Vec<(std::net::TcpListener, Role)>,
    shared: Arc<Shared>,
    /// Answered once its listening sockets are closed.
    closed: oneshot::Sender<()>,
    /// Flips when the drain is over.
    exit: watch::Receiver<bool>,
    /// Dropped when the thread's runtime, and whatever it still ran, is gone.
    ended: oneshot::Sender<()>,
}

impl Workers {
    /// Start `count` worker threads; `0`: one per CPU this process may run on.
    ///
    /// # Errors
    /// The operating system refused a thread (the process's thread limit) or what a
    /// runtime needs (an epoll instance, an eventfd).
    pub fn new(count: usize) -> io::Result<Workers> {
        let mut jobs = Vec::new();
        for index in 0..resolve(count) {
            let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
            let (built_tx, built_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
            std::thread::Builder::new()
                .name(format!("aml-egress-w{index}"))
                .spawn(move || {
                    let built = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let rt = match built {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = built_tx.send(Ok(()));
                    // No job comes when start-up failed after this: the thread just ends.
                    let Ok(job) = job_rx.recv() else { return };
                    let ended = rt.block_on(worker(index, job));
                    drop(rt); // closes what is still open
                    drop(ended);
                })?;
            built_rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended as it started"))??;
            jobs.push(job_tx);
        }
        Ok(Workers { jobs })
    }

    /// How many workers there are.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Never true: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
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
    let count = workers.len().max(1);
    let mut per_worker: Vec<Vec<(std::net::TcpListener, Role)>> =
        (0..count).map(|_| Vec::new()).collect();
    // Held until the drain is over: the addresses stay this process's while it serves.
    let mut claims = Vec::new();
    for l in listeners {
        let role = l.role;
        let (sockets, claim) = l.into_sockets();
        claims.push(claim);
        for (i, s) in sockets.into_iter().enumerate() {
            per_worker[i % count].push((s, role));
        }
    }
    let (exit_tx, exit_rx) = watch::channel(false);
    let mut closed = Vec::new();
    let mut ended = Vec::new();
    for (index, (jobs, sockets)) in workers.jobs.into_iter().zip(per_worker).enumerate() {
        let (closed_tx, closed_rx) = oneshot::channel();
        let (ended_tx, ended_rx) = oneshot::channel::<()>();
        let job = Job {
            sockets,
            shared: shared.clone(),
            closed: closed_tx,
            exit: exit_rx.clone(),
            ended: ended_tx,
        };
        if jobs.send(job).is_err() {
            tracing::error!(
                worker = index,
                "a worker thread has ended; its share of the listening sockets is closed and the kernel gives their connections to the others"
            );
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
    drop(claims);
    left
}

/// One worker: accept on its sockets until shutdown, then keep serving what is open until
/// told to exit. Returns what the thread drops once its runtime is gone.
async fn worker(index: usize, job: Job) -> oneshot::Sender<()> {
    let Job {
        sockets,
        shared,
        closed,
        mut exit,
        ended,
    } = job;
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
        let addr = socket.local_addr().ok();
        // Deprecated because an `AsRawFd` type need not own its descriptor; a std listener
        // does, for as long as the `AsyncFd` holds it, which is what `register` requires.
        #[allow(deprecated)]
        let registered = tokio::io::unix::AsyncFd::new(socket);
        match registered {
            Ok(tcp) => accepts.push(tokio::spawn(accept_loop(
                tcp,
                role,
                index,
                shared.clone(),
                gauge.clone(),
            ))),
            Err(e) => {
                tracing::error!(worker = index, listener = role.key(), addr = ?addr, error = %e, "a worker cannot watch its listening socket (out of memory or of epoll watches, fs.epoll.max_user_watches); the other workers take its connections")
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
    ended
}
