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
//!   request, through the same code ([`crate::proxy::forward::http`]).
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
    self, ClientSide, Filled, Held, Start, Unread, ech_seen, fill, read_hello, shown,
};
use super::sni::HelloReader;
use crate::metrics::ListenerKind;
use crate::policy::{Host, Name, PathView, Reason, Target};
use crate::proxy::addr::ClientAddr;
use crate::proxy::head::Rewind;
use crate::proxy::plumbing::Slot;
use crate::proxy::refusal::{
    AllowCount, Count, Refusal, Seen, Unanswerable, denial, name_reason, note_allowed,
};
use crate::proxy::serve::{serve_h2_requests, serve_requests};
use crate::proxy::state::{Judgement, Live, Mode, Shared};
use crate::reason::ReasonCode;

/// What an open tunnel needs to know about itself.
pub(crate) struct Tunnel {
    pub live: Arc<Live>,
    pub shared: Arc<Shared>,
    /// The connection's place under `proxy.max_connections`.
    pub slot: Option<Arc<Slot>>,
    pub client: ClientAddr,
    pub target: Target,
    /// The upstream address dialled.
    pub addr: SocketAddr,
    pub started: Instant,
}

impl Tunnel {
    /// Inspect by what the tunnel carries, count the decision if not yet counted, relay.
    pub(crate) async fn run(
        &self,
        mut client: ClientSide,
        mut buf: BytesMut,
        mut upstream: TcpStream,
        mut v: Judgement,
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
                        Err(Unread::Refused(reason, seen)) => {
                            let answer = self.refuse(reason, false, &seen, None, "", &mut pending);
                            handshake::answer(&mut client, answer).await;
                            return;
                        }
                    }
                }
                Carried::Other | Carried::Incomplete => {
                    let reason = ReasonCode::TunnelProtocolNotAllowed;
                    let answer = self.refuse(reason, false, &shown(&buf), None, "", &mut pending);
                    handshake::answer(&mut client, answer).await;
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
            client = %self.client,
            target = %self.target,
            upstream = %self.addr,
            sni = %sni,
            decision = if v.would_deny { "would_deny" } else { "allow" },
            rule = %self.live.rule_text(&v),
            policy = self.live.policy_name(v.policy),
            mode = self.live.mode_of(v.policy).as_str(),
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
        if first.encrypted_client_hello && !self.live.config.ech_allowed {
            // The real name is encrypted: the outer one is not where the server sends it.
            let seen = ech_seen(&first);
            let reason = ReasonCode::TlsEchPresent;
            let answer = self.refuse(reason, false, &seen, None, "", pending);
            handshake::answer(client, answer).await;
            return Err(Unread::Gone); // counted by refuse
        }
        let audit = match self.judge_name(first.server_name, pending) {
            Ok(audit) => audit,
            Err(answer) => {
                handshake::answer(client, answer).await;
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
    /// it pass; `Err`: refused (and counted), with the client's answer.
    fn judge_name(
        &self,
        name: Option<Name>,
        pending: &mut Option<AllowCount>,
    ) -> Result<bool, Unanswerable> {
        let live = &*self.live;
        let (reason, verdict, by_name) = match (name, self.target.host) {
            // The CONNECT named this host and was decided on it.
            (Some(n), Host::Name(t)) if n == t => return Ok(false),
            (Some(n), _) => {
                let t = Target {
                    host: Host::Name(n),
                    port: self.target.port,
                };
                let v = live.judge(self.client, &t, PathView::Hidden);
                if v.decision.is_allowed() {
                    note_allowed(live, ListenerKind::Connect, self.client, &t, &v);
                    return Ok(false);
                }
                let reason = name_reason(ReasonCode::SniNotAllowed, &v.decision);
                (reason, Some(v), Some(t))
            }
            // Clients send no name for an IP address (RFC 6066 §3): the CONNECT's
            // decision on the address stands, unless only a service tag's (or other
            // catalog) prefix allowed it, which says nothing of the tenant behind it.
            (None, Host::Ip(_)) => {
                let v = live.judge_nameless_tls(self.client, &self.target);
                if v.decision.reason != Reason::ServiceTagWithoutName {
                    return Ok(false);
                }
                (ReasonCode::ServiceTagWithoutName, Some(v), None)
            }
            (None, Host::Name(_)) if live.config.sni_missing_allowed => return Ok(false),
            (None, Host::Name(_)) => (ReasonCode::NoServerName, None, None),
        };
        let shown = by_name.as_ref().map(|t| t.to_string());
        let seen = shown.as_deref().unwrap_or("(no server name)");
        // A policy answer (a name not allowed, or none) passes in audit mode; an operator's
        // deny rule, an invalid name and a client no policy serves hold in every mode.
        let pass = match verdict {
            Some(v) => v.pass,
            None => live.mode_of(live.choose(self.client)) == Mode::Audit,
        };
        let rule = verdict.map(|v| live.rule_text(&v)).unwrap_or_default();
        let answer = self.refuse(reason, pass, seen, by_name.as_ref(), &rule, pending);
        if pass { Ok(true) } else { Err(answer) }
    }

    /// Count, record and log a refusal of what the tunnel carried (`pass`: audit mode let
    /// it through), and give the client's answer.
    fn refuse(
        &self,
        reason: ReasonCode,
        pass: bool,
        seen: &str,
        by_name: Option<&Target>,
        rule: &str,
        pending: &mut Option<AllowCount>,
    ) -> Unanswerable {
        let what = by_name.unwrap_or(&self.target);
        let label = format!("{what} (inside CONNECT {})", self.target);
        let refusal = Refusal::in_tls(Seen {
            via: ListenerKind::Connect,
            client: self.client,
            target: Some(what),
            shown: &label,
            seen,
            outcome: denial(pass),
            reason,
            rule,
        });
        // This refusal is the request's decision, unless it was counted already (an audit
        // pass): then it is recorded and logged only.
        refusal.issue(&self.live, Count::instead_of(pending.take()))
    }

    /// An inspected tunnel: its ClientHello read and checked (it must name the CONNECT's
    /// host), the handshake completed with a certificate minted for that name, and each
    /// request inside decided like plain HTTP, path included, then forwarded over a
    /// verified TLS connection ([`crate::proxy::forward::http::forward_inspected`]). The
    /// upstream is dialled only for the first allowed request.
    pub(crate) async fn inspect(&self, mut client: ClientSide, mut buf: BytesMut) {
        let live = &self.live;
        let Some(inspector) = live.inspector.clone() else {
            return;
        };
        let deadline = Deadline::now() + live.config.sni_timeout;
        let first = match read_hello(&mut client, &mut buf, HelloReader::default(), deadline).await
        {
            Ok(h) => h,
            Err(Unread::Gone) => return,
            Err(Unread::Refused(reason, seen)) => {
                let answer = self.refuse_inspected(reason, &seen);
                handshake::answer(&mut client, answer).await;
                return;
            }
        };
        // The certificate is minted for the name the CONNECT was decided on, and for no
        // other: a hello naming another (or none) is refused. An ECH extension is moot
        // here: the proxy ends the handshake itself.
        let Host::Name(name) = self.target.host else {
            return;
        };
        if first.server_name != Some(name) {
            let (reason, seen) = match first.server_name {
                Some(n) => (ReasonCode::SniNotAllowed, n.as_str().to_owned()),
                None => (ReasonCode::NoServerName, "(no server name)".to_owned()),
            };
            let answer = self.refuse_inspected(reason, &seen);
            handshake::answer(&mut client, answer).await;
            return;
        }
        if !first.alpn.inspectable() {
            let answer =
                self.refuse_inspected(ReasonCode::TlsAlpnNotInspectable, first.alpn.shown());
            handshake::answer(&mut client, answer).await;
            return;
        }
        let session = inspected_session(
            &inspector,
            (self.client, self.target),
            (self.shared.clone(), self.slot.clone()),
        );
        session.serve(client, buf).await;
    }

    /// Count, record and log the refusal of an inspected tunnel's hello (its CONNECT was
    /// not counted: each request inside is), and give the client's answer.
    fn refuse_inspected(&self, reason: ReasonCode, seen: &str) -> Unanswerable {
        // Recorded and logged by `refuse` (nothing pending), counted here.
        let answer = self.refuse(reason, false, seen, None, "", &mut None);
        let policy = self.live.choose(self.client);
        self.live
            .decision_counter(
                policy,
                ListenerKind::Connect,
                crate::metrics::Outcome::Deny,
                reason,
            )
            .inc();
        answer
    }

    /// HTTP/1 inside the tunnel: each request decided and forwarded like an absolute-form
    /// one, its `Host` held to the CONNECT target.
    async fn serve_http(&self, client: ClientSide, buf: BytesMut) {
        let slot = self.slot.clone();
        let (client_addr, shared, target) = (self.client, self.shared.clone(), self.target);
        let handle = move |req, client, shared: Arc<Shared>| {
            crate::proxy::forward::http::forward_in_tunnel(req, client, shared.live(), target)
        };
        match client {
            ClientSide::Tcp(s) => {
                serve_requests(Rewind::new(buf, s), client_addr, shared, slot, handle).await
            }
            ClientSide::Upgraded(s) => {
                serve_requests(Rewind::new(buf, s), client_addr, shared, slot, handle).await
            }
        }
    }
}

/// The TLS session of an inspected tunnel (a CONNECT, or a redirected connection), its
/// ClientHello already checked to name `target`'s host.
pub(crate) struct InspectedSession {
    inspector: Arc<crate::proxy::inspect::Inspector>,
    client: ClientAddr,
    target: Target,
    shared: Arc<Shared>,
    slot: Option<Arc<Slot>>,
}

/// See [`InspectedSession`].
pub(crate) fn inspected_session(
    inspector: &Arc<crate::proxy::inspect::Inspector>,
    (client, target): (ClientAddr, Target),
    (shared, slot): (Arc<Shared>, Option<Arc<Slot>>),
) -> InspectedSession {
    InspectedSession {
        inspector: inspector.clone(),
        client,
        target,
        shared,
        slot,
    }
}

impl InspectedSession {
    /// Complete the handshake with a leaf for the target's name (the hello's bytes are at
    /// the start of `buf`), then serve its requests: each decided like plain HTTP, path
    /// included, and forwarded over a verified TLS connection
    /// ([`crate::proxy::forward::http::forward_inspected`]).
    pub(crate) async fn serve(self, mut client: ClientSide, buf: BytesMut) {
        let Host::Name(name) = self.target.host else {
            return;
        };
        let config = match self.inspector.server_config(name.as_str()) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(client = %self.client, target = %self.target, error = %e, "inspection failed");
                handshake::answer(&mut client, Unanswerable::Alert).await;
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        match client {
            ClientSide::Tcp(s) => self.handshake(acceptor, Rewind::new(buf, s)).await,
            ClientSide::Upgraded(s) => self.handshake(acceptor, Rewind::new(buf, s)).await,
        }
    }

    async fn handshake<S>(self, acceptor: tokio_rustls::TlsAcceptor, stream: Rewind<S>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let live = self.shared.live();
        let tls = match tokio::time::timeout(live.config.sni_timeout, acceptor.accept(stream)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let name = self.target.host.to_string();
                if self.inspector.handshake_failed(&name) && live.logs.line() {
                    tracing::warn!(
                        client = %self.client,
                        target = %self.target,
                        error = %e,
                        "the client did not complete the TLS handshake of an inspected tunnel: if it does not trust the inspection CA, install it on compute (aml-egress ca show prints how)"
                    );
                }
                return;
            }
            Err(_) => return,
        };
        let target = self.target;
        let handle = move |req, client, shared: Arc<Shared>| {
            crate::proxy::forward::http::forward_inspected(req, client, shared.live(), target)
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            serve_h2_requests(tls, self.client, self.shared, handle).await;
            return;
        }
        serve_requests(
            Rewind::new(BytesMut::new(), tls),
            self.client,
            self.shared,
            self.slot,
            handle,
        )
        .await;
    }
}
