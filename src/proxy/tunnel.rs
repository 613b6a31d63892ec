//! An answered CONNECT: every tunnel is inspected by what it carries, and refused when the
//! proxy cannot read it.
//!
//! - Ports in `proxy.opaque_ports` are relayed on the CONNECT's decision alone.
//! - TLS (required on `proxy.tls_ports`, recognised by its first byte elsewhere): one
//!   well-formed ClientHello naming an allowed host; then the client's further bytes are held
//!   until the server's first handshake message is read. A ServerHello commits the
//!   handshake; a HelloRetryRequest means the client's second ClientHello is checked the same
//!   way and must name the same server (RFC 8446 §4.1.4).
//! - HTTP/1 (a request line): every request is decided and forwarded like an absolute-form
//!   request, through the same code ([`super::http`]).
//! - Anything else: refused (`tunnel_protocol_not_allowed`).
//!
//! These refusals come after the `200`, so no status carries them: they are counted, logged
//! (what was seen, bounded and escaped) and, to a TLS client, sent as an `access_denied`
//! alert.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant as Deadline;

use super::detect::{Carried, Detector};
use super::handshake::{
    self, ClientSide, Filled, Held, Refusal, Start, Unread, fill, read_hello, shown,
};
use super::head::Rewind;
use super::listen::Slot;
use super::sni::HelloReader;
use super::{AllowCount, Judged, Live, Seen, Shared};
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{Host, Name, PathView, Target};

/// What an open tunnel needs to know about itself.
pub(super) struct Tunnel {
    pub live: Arc<Live>,
    pub shared: Arc<Shared>,
    /// The connection's place under `proxy.max_connections`.
    pub slot: Option<Arc<Slot>>,
    pub peer: SocketAddr,
    pub target: Target,
    pub addr: SocketAddr,
    pub started: Instant,
}

impl Tunnel {
    /// Inspect by what the tunnel carries, count the decision if not yet counted, relay.
    pub(super) async fn run(
        &self,
        mut client: ClientSide,
        mut buf: BytesMut,
        mut upstream: TcpStream,
        mut v: Judged,
        mut pending: Option<AllowCount>,
    ) {
        let cfg = &self.live.config;
        let port = self.target.port;
        let mut sni = String::new();
        let mut start = None;
        if !cfg.opaque_ports.contains(&port) {
            let deadline = Deadline::now() + cfg.sni_timeout;
            let carried = if cfg.tls_ports.contains(&port) {
                Carried::Tls
            } else {
                match self.detect(&mut client, &mut buf, deadline).await {
                    Some(c) => c,
                    None => return,
                }
            };
            match carried {
                Carried::Http => {
                    drop(upstream); // each request goes through the guarded pool instead
                    drop(pending); // the CONNECT itself was allowed
                    // Boxed (in its own statement): a relaying tunnel does not carry hyper's state.
                    let http = Box::pin(self.serve_http(client, buf));
                    http.await;
                    return;
                }
                Carried::Tls => {
                    // Boxed: once relaying, a tunnel does not carry the handshake's state.
                    let tls = Box::pin(self.tls(
                        &mut client,
                        &mut buf,
                        &mut upstream,
                        &mut pending,
                        deadline,
                    ));
                    match tls.await {
                        Ok((name, audit, held)) => {
                            sni = name;
                            v.would_deny |= audit;
                            start = Some(held);
                        }
                        Err(Unread::Gone) => return,
                        Err(Unread::Refused(r, seen)) => {
                            self.count(r, false, &seen, None, "", &mut pending);
                            handshake::refuse(&mut client, r).await;
                            return;
                        }
                    }
                }
                Carried::Other | Carried::Incomplete => {
                    let r = Refusal::ProtocolNotAllowed;
                    self.count(r, false, &shown(&buf), None, "", &mut pending);
                    handshake::refuse(&mut client, r).await;
                    return;
                }
            }
        }
        drop(pending); // an allow, if nothing else was counted for this request
        let start = start.unwrap_or_else(|| Start::fresh(buf));
        let (up, down) = handshake::relay(
            client,
            upstream,
            start,
            cfg.idle_timeout,
            &self.live.metrics,
        )
        .await;
        tracing::info!(
            listener = "connect",
            client = %self.peer,
            target = %self.target,
            upstream = %self.addr,
            sni = %sni,
            decision = if v.would_deny { "would_deny" } else { "allow" },
            rule = %self.live.rule_text(&v.decision),
            mode = cfg.mode.as_str(),
            bytes_up = up,
            bytes_down = down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "tunnel closed"
        );
    }

    /// Tell TLS from HTTP/1 from anything else by the first bytes (on ports that are
    /// neither TLS nor opaque); `None` when the client left first.
    async fn detect(
        &self,
        client: &mut ClientSide,
        buf: &mut BytesMut,
        deadline: Deadline,
    ) -> Option<Carried> {
        let limit = self.live.config.max_header_bytes;
        let mut detector = Detector::default();
        loop {
            match detector.read(buf, limit) {
                Carried::Incomplete => {}
                found => return Some(found),
            }
            match fill(client, buf, deadline).await {
                Filled::More => {}
                Filled::Closed => return None,
                // Nothing readable in time: a protocol where the server speaks first, or a
                // client that stalls. Neither can be inspected.
                Filled::TimedOut => return Some(Carried::Other),
            }
        }
    }

    /// Read and judge the ClientHello, and follow the handshake until the server has
    /// committed to a hello that was checked. Returns the server name, whether only audit
    /// mode let it pass, and what was exchanged.
    async fn tls(
        &self,
        client: &mut ClientSide,
        buf: &mut BytesMut,
        upstream: &mut TcpStream,
        pending: &mut Option<AllowCount>,
        deadline: Deadline,
    ) -> Result<(String, bool, Start), Unread> {
        let first = read_hello(client, buf, HelloReader::default(), deadline).await?;
        let audit = match self.judge_name(first.server_name, pending) {
            Ok(audit) => audit,
            Err(r) => {
                handshake::refuse(client, r).await;
                return Err(Unread::Gone); // counted by judge_name
            }
        };
        let cfg = &self.live.config;
        let mut held = Held::new(buf);
        held.follow(client, upstream, &first, cfg.idle_timeout, cfg.sni_timeout)
            .await?;
        let (sent, client_done, down) = (held.sent, held.client_done, held.down);
        let name = first
            .server_name
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default();
        let start = Start {
            buf: std::mem::take(buf),
            sent,
            client_done,
            down,
        };
        Ok((name, audit, start))
    }

    /// Judge the hello's server name for the CONNECT port. `Ok(true)`: only audit mode let
    /// it pass; `Err`: refused (and counted).
    fn judge_name(
        &self,
        name: Option<Name>,
        pending: &mut Option<AllowCount>,
    ) -> Result<bool, Refusal> {
        let live = &*self.live;
        let (refusal, verdict, by_name) = match (name, self.target.host) {
            // The CONNECT named this host and was decided on it.
            (Some(n), Host::Name(t)) if n == t => return Ok(false),
            (Some(n), _) => {
                let t = Target {
                    host: Host::Name(n),
                    port: self.target.port,
                };
                let v = live.judge(&t, PathView::Hidden);
                if v.decision.is_allowed() {
                    return Ok(false);
                }
                (Refusal::SniNotAllowed, Some(v), Some(t))
            }
            // Clients send no name for an IP address (RFC 6066 §3): the CONNECT's
            // decision on the address stands.
            (None, Host::Ip(_)) => return Ok(false),
            (None, Host::Name(_)) if live.config.sni_missing_allowed => return Ok(false),
            (None, Host::Name(_)) => (Refusal::NoServerName, None, None),
        };
        let shown = by_name.as_ref().map(|t| t.to_string());
        let seen = shown.as_deref().unwrap_or("(no server name)");
        let pass = live.config.mode == super::Mode::Audit && refusal.auditable();
        let rule = verdict
            .map(|v| live.rule_text(&v.decision))
            .unwrap_or_default();
        self.count(refusal, pass, seen, by_name.as_ref(), &rule, pending);
        if pass { Ok(true) } else { Err(refusal) }
    }

    /// Count, record and log a refusal (`pass`: audit mode let it through).
    fn count(
        &self,
        refusal: Refusal,
        pass: bool,
        seen: &str,
        by_name: Option<&Target>,
        rule: &str,
        pending: &mut Option<AllowCount>,
    ) {
        let what = by_name.unwrap_or(&self.target);
        let label = format!("{what} (inside CONNECT {})", self.target);
        let record = Seen {
            via: ListenerKind::Connect,
            client: self.peer,
            target: Some(what),
            shown: &label,
            seen,
            outcome: if pass {
                Outcome::WouldDeny
            } else {
                Outcome::Deny
            },
            reason: refusal.code(),
            rule,
        };
        match pending.take() {
            // This refusal is the request's decision.
            Some(p) => {
                p.instead();
                self.live.note(&record);
            }
            // The request was counted already (an audit pass): record and log only.
            None => self.live.record(&record),
        }
    }

    /// HTTP/1 inside the tunnel: each request decided and forwarded like an absolute-form
    /// one, its `Host` held to the CONNECT target.
    async fn serve_http(&self, client: ClientSide, buf: BytesMut) {
        let slot = self.slot.clone();
        let (peer, shared, target) = (self.peer, self.shared.clone(), self.target);
        let handle = move |req, peer, shared: Arc<Shared>| {
            super::http::forward_in_tunnel(req, peer, shared.live(), target)
        };
        match client {
            ClientSide::Tcp(s) => {
                super::serve_requests(Rewind::new(buf, s), peer, shared, slot, handle).await
            }
            ClientSide::Upgraded(s) => {
                super::serve_requests(Rewind::new(buf, s), peer, shared, slot, handle).await
            }
        }
    }
}
