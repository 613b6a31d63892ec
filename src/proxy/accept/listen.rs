//! Listeners and the accept loop: bind one socket per worker, admit a client (ACL,
//! connection limits), hand the connection to its task (TLS handshake first on TLS
//! listeners). The workers themselves, and the drain at shutdown, are in the
//! `workers` module.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;

use super::conn::{route, serve_plain};
use crate::metrics::Limit;
use crate::proxy::addr::ClientAddr;
use crate::proxy::error::SetupError;
use crate::proxy::plumbing::{Slot, register};
use crate::proxy::respond::{self, Reply};
use crate::proxy::serve::serve_connection;
use crate::proxy::state::Shared;
use crate::proxy::transparent;

/// A bound listening address: one socket per worker, all on the same address with
/// `SO_REUSEPORT`, so that each worker accepts on its own.
pub struct Listener {
    sockets: Vec<std::net::TcpListener>,
    addr: SocketAddr,
    pub role: Role,
    claim: Claim,
}

/// This process's claim on a listening address, held while it serves there: an abstract
/// Unix socket named after the address (unix(7); gone with the process, scoped like the
/// TCP port to the network namespace), which a second aml-egress cannot bind.
pub struct Claim(#[allow(dead_code)] std::os::unix::net::UnixDatagram);

/// What a listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `proxy.listen`: the forward proxy.
    Proxy,
    /// `proxy.tls_listen`: the forward proxy over TLS.
    ProxyTls,
    /// `transparent.tls_listen`: redirected TLS.
    TransparentTls,
    /// `transparent.http_listen`: redirected plain HTTP.
    TransparentHttp,
}

impl Role {
    /// The configuration key that names this listener.
    pub fn key(self) -> &'static str {
        match self {
            Role::Proxy => "proxy.listen",
            Role::ProxyTls => "proxy.tls_listen",
            Role::TransparentTls => "transparent.tls_listen",
            Role::TransparentHttp => "transparent.http_listen",
        }
    }
}

impl Listener {
    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }

    /// The sockets, one per worker, and the claim to hold while they serve.
    pub(crate) fn into_sockets(self) -> (Vec<std::net::TcpListener>, Claim) {
        (self.sockets, self.claim)
    }
}

/// Bind every configured listener (before reporting ready), `workers` sockets each: the
/// proxy's plain ones, then its TLS ones, then the transparent TLS and HTTP ones.
///
/// # Errors
/// A socket could not be bound; the error names the key and the address.
pub fn bind(c: &crate::config::Compiled, workers: usize) -> Result<Vec<Listener>, SetupError> {
    let mut out = Vec::new();
    let all = [
        (Role::Proxy, &c.proxy.listen),
        (Role::ProxyTls, &c.proxy.tls_listen),
        (Role::TransparentTls, &c.transparent.tls_listen),
        (Role::TransparentHttp, &c.transparent.http_listen),
    ];
    for (role, addrs) in all {
        for a in addrs {
            let failed = |source| SetupError::Listen {
                key: role.key(),
                addr: *a,
                source,
            };
            // A socket without SO_REUSEPORT cannot share the address with anyone already
            // listening there (another aml-egress included, which SO_REUSEPORT alone would
            // let in), and settles the port when 0 was asked for; the workers' sockets
            // then take its place.
            let addr = {
                let probe = exclusive_probe(*a).map_err(failed)?;
                probe.local_addr().map_err(failed)?
            };
            // The probe alone leaves a moment in which two instances starting together
            // both pass it; only one of them can claim the address.
            let claim = claim(addr).map_err(failed)?;
            let mut sockets = Vec::with_capacity(workers.max(1));
            for _ in 0..workers.max(1) {
                sockets.push(reuseport_socket(addr).map_err(failed)?);
            }
            out.push(Listener {
                sockets,
                addr,
                role,
                claim,
            });
        }
    }
    Ok(out)
}

/// Claim `addr` for this process (see [`Claim`]); `AddrInUse` when another holds it.
fn claim(addr: SocketAddr) -> std::io::Result<Claim> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("aml-egress listen {addr}");
    let at = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    Ok(Claim(std::os::unix::net::UnixDatagram::bind_addr(&at)?))
}

/// A socket bound to `addr` without `SO_REUSEPORT` (but with `SO_REUSEADDR`, as the
/// listeners have): binding fails when anything listens there already.
fn exclusive_probe(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    Ok(std::net::TcpListener::from(bound_socket(addr, false)?))
}

/// A non-blocking listening socket that shares its address with the proxy's other workers.
/// Only sockets of the same user can join a `SO_REUSEPORT` group (socket(7)).
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let fd = bound_socket(addr, true)?;
    // Inherited by every accepted socket: one system call per listener, not per connection.
    rustix::net::sockopt::set_tcp_nodelay(&fd, true)?;
    rustix::net::listen(&fd, 1024)?;
    Ok(std::net::TcpListener::from(fd))
}

/// A non-blocking TCP socket bound to `addr`, with `SO_REUSEADDR`, and `SO_REUSEPORT` when
/// it is to `share` the address with the other workers' sockets.
fn bound_socket(addr: SocketAddr, share: bool) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType, sockopt};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let flags = SocketFlags::CLOEXEC | SocketFlags::NONBLOCK;
    let fd = rustix::net::socket_with(family, SocketType::STREAM, flags, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    if share {
        sockopt::set_socket_reuseport(&fd, true)?;
    }
    rustix::net::bind(&fd, &addr)?;
    Ok(fd)
}

/// Accept on one worker's socket of one listener; each connection is served on this
/// worker and counted in its `gauge`.
pub(crate) async fn accept_loop(
    tcp: AsyncFd<std::net::TcpListener>,
    role: Role,
    worker: usize,
    shared: Arc<Shared>,
    gauge: prometheus::IntGauge,
) {
    let here = shared.live().metrics.listener_gauges(role.key());
    loop {
        let (stream, client) = match accept(&tcp).await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                let addr = tcp.get_ref().local_addr().ok();
                tracing::error!(listener = role.key(), addr = ?addr, worker, error = %e, "cannot accept a connection; raise the open-files limit (LimitNOFILE) or lower proxy.max_connections");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let client_ip = client.ip(); // an IPv4 client on a dual-stack socket as IPv4
        let live = shared.live();
        if !live
            .config
            .allow_clients
            .iter()
            .any(|n| n.contains(&client_ip))
        {
            if live.limit_hit(Limit::ClientNotAllowed) {
                tracing::warn!(client = %client, reason = "client_not_allowed", "connection from a client outside proxy.allow_clients closed");
            }
            drop(stream);
            continue;
        }
        let limit = live.config.max_connections_per_client;
        let place = match limit {
            0 => None,
            _ => match shared.per_client.take(client_ip, limit) {
                Some(p) => Some(p),
                None => {
                    if live.limit_hit(Limit::ConnectionsPerClient) {
                        tracing::warn!(client = %client, reason = "connection_limit_per_client", limit, "over proxy.max_connections_per_client; answered 503");
                    }
                    refuse_at_limit(
                        stream,
                        "connection_limit_per_client",
                        "this client has as many connections open as proxy.max_connections_per_client allows; close some or retry shortly",
                    );
                    continue;
                }
            },
        };
        let permit = match shared.limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if live.limit_hit(Limit::Connections) {
                    tracing::warn!(client = %client, reason = "connection_limit", "over proxy.max_connections; answered 503");
                }
                refuse_at_limit(
                    stream,
                    "connection_limit",
                    "aml-egress is at its connection limit (proxy.max_connections); retry shortly",
                );
                continue;
            }
        };
        let guard = shared.tracker.track();
        let shared = shared.clone();
        // TCP_NODELAY comes from the listening socket (accepted sockets inherit it).
        let tls = live.tls.clone();
        if role == Role::ProxyTls && tls.is_none() {
            // A reload dropped the certificate; never serve plain HTTP on a TLS port.
            if live.limit_hit(Limit::TlsHandshake) {
                tracing::error!(client = %client, reason = "tls_handshake", "no TLS certificate is configured any more (proxy.tls_cert, proxy.tls_key); connection closed");
            }
            continue;
        }
        let open = live
            .metrics
            .open(false, live.config.mode)
            .on(&here.connections);
        let handshake_timeout = live.config.header_timeout;
        drop(live);
        // Tunnels take a clone, so that they count against the limit until they close; the
        // worker's gauge is given back when the slot drops.
        let permit = Arc::new(Slot::new(
            permit,
            shared.owed.clone(),
            place,
            gauge.clone(),
            here.tunnels.clone(),
        ));
        tokio::spawn(async move {
            // Only the plain proxy takes the socket unregistered (a refusal then needs no
            // epoll registration); the others register it with the worker's runtime.
            if role == Role::Proxy {
                // Counted as an open connection until it ends or becomes a tunnel.
                serve_plain(stream, client, shared, permit, open).await;
                drop(guard);
                return;
            } else if let Some(stream) = register(stream, client, &shared.live().logs) {
                // Boxed (in its own statement) so that the common task stays small: a
                // task's whole future is moved into place when it is spawned.
                let other = Box::pin(serve_other(
                    role,
                    tls,
                    stream,
                    client,
                    shared,
                    permit,
                    handshake_timeout,
                ));
                other.await;
            }
            drop(open);
            drop(guard);
        });
    }
}

/// The connections of every listener but the plain proxy's: TLS to the proxy, and the
/// transparent listeners.
async fn serve_other(
    role: Role,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stream: TcpStream,
    client: ClientAddr,
    shared: Arc<Shared>,
    permit: Arc<Slot>,
    handshake_timeout: Duration,
) {
    match (role, tls) {
        // Never here: the plain proxy is served by serve_plain, and a TLS listener without
        // a certificate was closed before.
        (Role::Proxy, _) | (Role::ProxyTls, None) => {}
        (Role::TransparentTls, _) => transparent::tls::serve(stream, client, shared, permit).await,
        (Role::TransparentHttp, _) => {
            transparent::http::serve(stream, client, shared, permit).await
        }
        (Role::ProxyTls, Some(acceptor)) => {
            let live = shared.live();
            let (metrics, logs) = (live.metrics.clone(), live.logs.clone());
            drop(live);
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => {
                    let Some(client) = certified(&s, client, &shared) else {
                        return;
                    };
                    serve_connection(s, client, shared, permit, route).await
                }
                Ok(Err(e)) => {
                    metrics.limit(Limit::TlsHandshake);
                    if logs.line() {
                        tracing::warn!(client = %client, reason = "tls_handshake", error = %e, "TLS handshake with a client failed");
                    }
                }
                Err(_) => {
                    metrics.limit(Limit::TlsHandshake);
                    if logs.line() {
                        tracing::warn!(client = %client, reason = "tls_handshake", "TLS handshake with a client timed out (proxy.header_timeout_secs)");
                    }
                }
            }
        }
    }
}

/// The client of a TLS connection, with the policy its certificate chose, if it presented
/// one that a `[[client_policy]]` claims (the certificate wins over the address, and the
/// choice is logged when the address would have chosen another). `None`: its names are
/// two policies', and the connection is closed.
fn certified(
    s: &tokio_rustls::server::TlsStream<TcpStream>,
    client: ClientAddr,
    shared: &Shared,
) -> Option<ClientAddr> {
    use crate::config::CertificateChoice;
    let Some(cert) = s.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        return Some(client);
    };
    let live = shared.live();
    let names = crate::proxy::tls::certificate_names(cert);
    match live.clients.compiled.by_certificate(&names) {
        Ok(i) => {
            let cp = &live.clients.compiled.policies[i];
            let name = &cp.name;
            let certified = ClientAddr {
                certified: Some(crate::config::PolicyKey::of(name, &cp.client_names)),
                ..client
            };
            let by_address = live.choose(client);
            if live.policy_name(by_address) != name.as_str() && live.logs.line() {
                tracing::info!(
                    client = %client,
                    certificate = %names.join(","),
                    policy = %name,
                    by_address = live.policy_name(by_address),
                    "the client certificate chose the policy (over the one its address would)"
                );
            }
            Some(certified)
        }
        Err(CertificateChoice::Unclaimed) => Some(client),
        Err(CertificateChoice::Ambiguous(a, b)) => {
            live.metrics.limit(Limit::TlsHandshake);
            if live.logs.line() {
                tracing::warn!(
                    client = %client,
                    certificate = %names.join(","),
                    reason = "tls_handshake",
                    "the client certificate's names are claimed by two policies ({a}, {b}); connection closed: give each name to one policy's client_names"
                );
            }
            None
        }
    }
}

/// Whether an accept error is the process running out of descriptors or memory.
fn out_of_resources(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw_os_error);
    matches!(
        errno,
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    )
}

/// Accept one connection without registering it with the runtime (non-blocking, its peer
/// address canonical later): a refusal answered at once then never touches epoll.
async fn accept(
    listener: &AsyncFd<std::net::TcpListener>,
) -> std::io::Result<(std::net::TcpStream, ClientAddr)> {
    use rustix::net::SocketFlags;
    loop {
        let mut ready = listener.readable().await?;
        let accepted = ready.try_io(|l| {
            let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
            Ok(rustix::net::acceptfrom_with(l.get_ref(), flags)?)
        });
        match accepted {
            Ok(Ok((fd, addr))) => match addr.and_then(|a| SocketAddr::try_from(a).ok()) {
                Some(peer) => return Ok((std::net::TcpStream::from(fd), ClientAddr::new(peer))),
                None => continue, // a TCP listener's peers are IP addresses; closed
            },
            // Only a lack of descriptors or memory is the listener's problem; the rest are
            // one connection's errors (reset while queued, or a pending network error that
            // accept(2) passes on, see its "Error handling") and the next one is fine.
            Ok(Err(e)) if !out_of_resources(&e) => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue, // readiness cleared; wait for the next
        }
    }
}

/// Answer `503` to a connection turned away by a limit, without holding up the accept loop.
fn refuse_at_limit(stream: std::net::TcpStream, details: &'static str, message: &'static str) {
    let reply = Reply::new(
        hyper::StatusCode::SERVICE_UNAVAILABLE,
        "connection_limit_reached",
        details,
        (None, "connection limit reached"),
        message.to_owned(),
    );
    respond::send_and_close(stream, reply.closing_bytes());
}

#[cfg(test)]
mod tests {
    use super::claim;

    #[test]
    fn an_address_is_claimed_by_one_holder_until_it_lets_go() {
        let addr = "127.0.0.1:1".parse().unwrap(); // never bound: only named
        let held = claim(addr).unwrap();
        let again = claim(addr).map(|_| ()).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse);
        drop(held);
        assert!(claim(addr).is_ok());
    }
}
