//! One way to refuse. Every entry point (the CONNECT fast path and hyper's, absolute-form
//! and in-tunnel HTTP, both transparent listeners) describes what it refused as a
//! [`Refusal`]: what was seen ([`Seen`]: listener, client, target, the bytes that were
//! refused, the reason code) and what the client is to get (a [`Reply`]: status, reason
//! phrase, `Proxy-Status`, body; or inside TLS, an [`Unanswerable`]: the `access_denied`
//! alert). [`Refusal::issue`] then counts it (one decision
//! per request, see [`Count`]), records it in the denied-target table, logs it under the
//! log budget, and hands back the answer to send.
//!
//! Allowed requests are counted when they end ([`AllowCount`]), so that a later refusal
//! (a TLS name, a failed dial) can be counted in their place.

use hyper::StatusCode;

use super::addr::ClientAddr;
use super::dial::DialError;
use super::respond::Reply;
use super::state::{Judgement, Live, PolicyIx};
use crate::allowed::Recorded;
use crate::metrics::{ListenerKind, Outcome};
use crate::policy::{Decision, Host, InvalidTarget, PathView, Reason, Target, Verdict};
use crate::reason::ReasonCode;

/// What the proxy saw of one refused (or only audit-passed) destination: what is counted,
/// recorded in the denied-target table and logged.
#[derive(Clone, Copy)]
pub(crate) struct Seen<'a> {
    /// The listener the request came through.
    pub via: ListenerKind,
    pub client: ClientAddr,
    /// The destination as parsed, for the denied-target table; `None` when there is none
    /// to record (a target that could not be parsed, an upstream that failed).
    pub target: Option<&'a Target>,
    /// The target as the log line shows it.
    pub shown: &'a str,
    /// What the client sent that was refused (a TLS name, escaped bytes), or empty; for an
    /// error, what went wrong.
    pub seen: &'a str,
    /// What is counted: deny, would-be deny (audit mode let it through), or error.
    pub outcome: Outcome,
    pub reason: ReasonCode,
    /// The rule that decided, as shown, or empty.
    pub rule: &'a str,
}

/// What a client gets for a refusal where no HTTP answer can be sent: after a CONNECT's
/// `200`, or on a redirected TLS connection. (Everywhere else it is a [`Reply`]: status,
/// reason phrase, `Proxy-Status` and body.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unanswerable {
    /// An `access_denied` alert, then the connection closes.
    Alert,
    /// The client did not speak TLS: the connection just closes.
    Close,
}

impl Unanswerable {
    /// What a client refused for `reason` inside a tunnel or a redirected connection gets:
    /// an alert, unless it was refused for not speaking TLS.
    pub(crate) fn after(reason: ReasonCode) -> Unanswerable {
        match reason {
            ReasonCode::TunnelProtocolNotAllowed => Unanswerable::Close,
            _ => Unanswerable::Alert,
        }
    }
}

/// What is counted for a denial: `Deny`, or `WouldDeny` when audit mode let it `pass`.
pub(crate) fn denial(pass: bool) -> Outcome {
    match pass {
        true => Outcome::WouldDeny,
        false => Outcome::Deny,
    }
}

/// One refusal: what was seen, and what the client gets (`A`: a [`Reply`]; an
/// [`Unanswerable`] inside TLS; `()` for a connection closed without a word, such as one
/// redirected to the proxy itself).
pub(crate) struct Refusal<'a, A> {
    /// What is counted, recorded and logged.
    pub seen: Seen<'a>,
    /// What [`Refusal::issue`] hands back to be sent.
    pub answer: A,
}

/// How a refusal stands to its request's one counted decision.
pub(crate) enum Count {
    /// Nothing was counted for the request yet: this is its decision.
    Now,
    /// This is the request's decision, in place of the allow it was to be counted as.
    Instead(AllowCount),
    /// The request's decision was counted already (an audit pass): recorded and logged
    /// only.
    Already,
}

impl Count {
    /// In place of `pending` when there is one; otherwise the request was counted already.
    pub(crate) fn instead_of(pending: Option<AllowCount>) -> Count {
        pending.map_or(Count::Already, Count::Instead)
    }
}

impl<'a> Refusal<'a, Unanswerable> {
    /// A refusal of what a client sent where no HTTP answer can go (inside a tunnel, on a
    /// redirected TLS connection): the answer follows from the reason.
    pub(crate) fn in_tls(seen: Seen<'a>) -> Self {
        let answer = Unanswerable::after(seen.reason);
        Refusal { seen, answer }
    }
}

impl<'a> Refusal<'a, Reply> {
    /// A `403` for a request the proxy refused on the host it named, not on a policy
    /// decision (a `Host` naming another host or port, no `Host` at all): the status line
    /// names the target and `words`, the body is `message`.
    pub(crate) fn host_refused(seen: Seen<'a>, words: &str, message: String) -> Self {
        let target = seen.target.map(|t| t.to_string());
        let answer = Reply::new(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            seen.reason.as_str(),
            (target.as_deref(), words),
            message,
        );
        Refusal { seen, answer }
    }
}

impl<A> Refusal<'_, A> {
    /// Count, record and log the refusal, and give back what the client is to get.
    pub(crate) fn issue(self, live: &Live, count: Count) -> A {
        note(live, &self.seen, count);
        self.answer
    }
}

/// Count one decision as `count` says; denials and would-be denials go into the
/// denied-target table and get one log line each, at most `log.denied_lines_per_minute` per
/// target; errors one line each under the log budget.
fn note(live: &Live, seen: &Seen<'_>, count: Count) {
    let counted = match count {
        Count::Now => true,
        Count::Instead(pending) => {
            pending.instead();
            true
        }
        Count::Already => false,
    };
    // The policy that served the client: the one its decision came from.
    let policy = live.choose(seen.client);
    if counted {
        live.decision_counter(policy, seen.via, seen.outcome, seen.reason)
            .inc();
    }
    match seen.outcome {
        Outcome::Allow => {} // allowed connections are logged once, when they finish
        Outcome::Error => {
            if live.logs.line() {
                let what = match seen.reason {
                    ReasonCode::UpstreamResponse => "no valid response forwarded",
                    _ => "upstream not reached",
                };
                tracing::warn!(
                    listener = seen.via.as_str(),
                    client = %seen.client,
                    target = seen.shown,
                    decision = "error",
                    reason = seen.reason.as_str(),
                    policy = live.policy_name(policy),
                    mode = live.mode_of(policy).as_str(),
                    error = seen.seen,
                    "{what}"
                );
            }
        }
        Outcome::Deny | Outcome::WouldDeny => record(live, seen, policy),
    }
}

/// Put a refusal in the denied-target table and log it (rate-limited per target).
fn record(live: &Live, seen: &Seen<'_>, policy: PolicyIx) {
    let Seen {
        via,
        client,
        target,
        shown,
        seen,
        outcome,
        reason,
        rule,
    } = *seen;
    let this_minute = match target {
        Some(t) => {
            let host = match t.host {
                Host::Name(n) => n.as_str().to_owned(),
                Host::Ip(ip) => ip.to_string(),
            };
            let part = live.built_of(policy).would_allow_with(t, PathView::Hidden);
            let name = live.policy_name(policy);
            let passed = outcome == Outcome::WouldDeny;
            live.metrics
                .denied_as(&host, t.port, name, (reason, seen), passed, || {
                    let entry = match part {
                        Some(p) => format!(
                            "catalog.features = [..., \"{p}\"] (the optional part {p} covers {t})"
                        ),
                        None => allow_entry(t, reason, rule),
                    };
                    in_policy(entry, policy, name, &[&host, &t.to_string()])
                })
        }
        None => live.metrics.denied_as(
            "(invalid target)",
            0,
            live.policy_name(policy),
            (reason, seen),
            outcome == Outcome::WouldDeny,
            || "nothing: the request did not name a valid host:port".to_owned(),
        ),
    };
    if live.logs.denial(this_minute) {
        tracing::warn!(
            listener = via.as_str(),
            client = %client,
            target = shown,
            seen,
            decision = outcome.as_str(),
            reason = reason.as_str(),
            rule,
            policy = live.policy_name(policy),
            mode = live.mode_of(policy).as_str(),
            "destination denied"
        );
    }
}

/// Where a suggested configuration entry goes: as written for the default policy, in
/// the client's `[[client_policy]]` for its policy (`keep`: what in `entry` came from the
/// network, never rewritten), or, for a client no policy serves, a policy that claims it.
/// The refused clients of every kind share one `/denied` row per target, so that advice
/// names no one client.
fn in_policy(entry: String, policy: PolicyIx, name: &str, keep: &[&str]) -> String {
    match policy {
        PolicyIx::DEFAULT => entry,
        PolicyIx::NONE => "a [[client_policy]] that serves the client: sources holding its address, or client_names matching its certificate (no policy serves it under policy.unmatched_clients = \"refuse\"; a connection whose certificate's policy a reload removed or renamed must reconnect)".to_owned(),
        _ => format!(
            "in the [[client_policy]] named {name:?}: {}",
            crate::config::clients::in_client_policy(&entry, keep)
        ),
    }
}

/// The policy's `403` for `target` (`None`: it could not be parsed), shown to the client
/// as `shown`, under the judgement `v` of the policy that serves `client`.
pub(crate) fn policy_reply(
    live: &Live,
    client: ClientAddr,
    shown: &str,
    target: Option<&Target>,
    v: &Judgement,
) -> Reply {
    let d = &v.decision;
    let code = d.reason.code();
    // An unparseable target is not repeated in the status line.
    let in_phrase = (code != ReasonCode::InvalidTarget).then_some(shown);
    let reply = |message: String| {
        Reply::new(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            code.as_str(),
            (in_phrase, code.words()),
            message,
        )
    };
    let built = live.built_of(v.policy);
    let mut why = built.policy.explain(shown, d);
    if let Some(part) = target.and_then(|t| built.would_allow_with(t, PathView::Hidden)) {
        why.push_str(&crate::config::optional_part_hint(part));
    }
    match v.policy {
        // The certificate's names are not kept with the connection, so they cannot be
        // matched again here; a new connection's are.
        PolicyIx::NONE if client.certified.is_some() => reply(format!(
            "aml-egress refused {shown}: the [[client_policy]] this connection's client certificate chose is no longer in the configuration (a reload removed or renamed it). Open a new connection: its certificate is matched against the policies in force."
        ))
        .closing(),
        PolicyIx::NONE => reply(format!(
            "aml-egress refused {shown}: no [[client_policy]] serves the client {} (policy.unmatched_clients = \"refuse\"). Add its network to the sources of the workspace's [[client_policy]], or set policy.unmatched_clients = \"default\", and reload.",
            client.ip()
        )),
        PolicyIx::DEFAULT => reply(format!(
            "aml-egress refused {shown}: {why}. {}",
            what_to_do(d.reason)
        )),
        ix => reply(format!(
            "aml-egress refused {shown} under the policy {:?} that serves the client {}: {}. {}",
            live.policy_name(ix),
            client.ip(),
            crate::config::clients::in_client_policy(&why, &[shown]),
            crate::config::clients::in_client_policy(&what_to_do(d.reason), &[]).replace(
                "and reload",
                "in that policy and reload"
            )
        )),
    }
}

/// The last sentence of a policy's `403`: what lets such a target through, written for
/// the default policy (see [`crate::config::clients::in_client_policy`]).
fn what_to_do(reason: Reason) -> String {
    match reason {
        Reason::WildcardNarrowed => {
            "If the workspace needs it, list the name under the wildcard in [catalog.narrow] and reload."
        }
        _ => {
            "If the workspace needs it, add an [[allow]] entry (or switch on the catalog part that covers it) and reload."
        }
    }
    .to_owned()
}

/// Refuse a target that could not be parsed (counted and logged like any denial).
pub(crate) fn invalid(
    live: &Live,
    via: ListenerKind,
    client: ClientAddr,
    shown: &str,
    e: InvalidTarget,
) -> Reply {
    let v = live.apply_mode(
        live.choose(client),
        Decision {
            verdict: Verdict::Deny,
            reason: Reason::InvalidTarget(e),
            rule: None,
        },
    );
    let refusal = Refusal {
        seen: Seen {
            via,
            client,
            target: None,
            shown,
            seen: "",
            outcome: v.outcome(),
            reason: ReasonCode::InvalidTarget,
            rule: "",
        },
        answer: policy_reply(live, client, shown, None, &v),
    };
    refusal.issue(live, Count::Now)
}

/// One decision per request: a refusal or an audit pass is counted (and logged) now,
/// whatever the dial does next, and a refusal is answered `403` (`Err`). An allow is
/// returned uncounted, to be counted when the request ends ([`AllowCount`]).
pub(crate) fn admit(
    live: &Live,
    via: ListenerKind,
    client: ClientAddr,
    target: &Target,
    shown: impl FnOnce() -> String,
    v: &Judgement,
) -> Result<Option<AllowCount>, Reply> {
    if v.pass && !v.would_deny {
        return Ok(Some(AllowCount::new(live, via, client, target, v)));
    }
    let shown = shown();
    let rule = live.rule_text(v);
    let seen = Seen {
        via,
        client,
        target: Some(target),
        shown: &shown,
        seen: "",
        outcome: v.outcome(),
        reason: v.decision.reason.code(),
        rule: &rule,
    };
    if v.pass {
        note(live, &seen, Count::Now);
        return Ok(None);
    }
    let answer = policy_reply(live, client, &shown, Some(target), v);
    Err(Refusal { seen, answer }.issue(live, Count::Now))
}

/// An allowed request's decision, counted when this is dropped unless something else was
/// counted in its place ([`Count::Instead`]). A request whose client leaves while the
/// proxy dials or waits for the upstream is then still counted, once.
pub(crate) struct AllowCount {
    /// The allow's counter, under the policy that allowed it.
    counter: prometheus::IntCounter,
    armed: bool,
}

impl AllowCount {
    /// The allow of a request through `via` that `v` let pass, counted when dropped; a name
    /// that a wildcard rule allowed is recorded now ([`note_allowed`]).
    pub(crate) fn new(
        live: &Live,
        via: ListenerKind,
        client: ClientAddr,
        target: &Target,
        v: &Judgement,
    ) -> Self {
        note_allowed(live, via, client, target, v);
        AllowCount {
            counter: live
                .decision_counter(v.policy, via, Outcome::Allow, v.decision.reason.code())
                .clone(),
            armed: true,
        }
    }

    /// Another outcome (a failed dial, a refused TLS name) is counted instead.
    pub(crate) fn instead(mut self) {
        self.armed = false;
    }
}

impl Drop for AllowCount {
    fn drop(&mut self) {
        if self.armed {
            self.counter.inc();
        }
    }
}

/// Record a name that a wildcard rule allowed (`/allowed`, `aml_egress_wildcard_names`),
/// with a log line, under the budget, the first time the name is seen under that rule.
/// Nothing for other decisions: exact names and addresses say what they reach.
pub(crate) fn note_allowed(
    live: &Live,
    via: ListenerKind,
    client: ClientAddr,
    target: &Target,
    v: &Judgement,
) {
    let d = &v.decision;
    let (Some(id), Host::Name(name), true) = (d.rule, target.host, d.is_allowed()) else {
        return;
    };
    let policy = &live.built_of(v.policy).policy;
    let Some(pattern) = policy.wildcard(id) else {
        return;
    };
    let rule = policy.rule(id);
    let name = name.as_str();
    let first = live
        .metrics
        .allowed
        .record(name, target.port, pattern, || rule.source.to_string());
    if first == Recorded::First && live.logs.first_use() {
        tracing::info!(
            listener = via.as_str(),
            client = %client,
            name,
            port = target.port,
            rule = pattern,
            rule_source = %rule.source,
            "first use under wildcard"
        );
    }
}

/// The reason a refused TLS name (or a hello without one) is reported under: the policy's
/// own when it says more than `fallback` (`sni_not_allowed`, `no_server_name`), that is a
/// narrowed wildcard, an address that only a service tag's prefix allows, or a client no
/// policy serves.
pub(crate) fn name_reason(fallback: ReasonCode, d: &Decision) -> ReasonCode {
    match d.reason {
        Reason::WildcardNarrowed | Reason::ServiceTagWithoutName | Reason::NoPolicyForClient => {
            d.reason.code()
        }
        _ => fallback,
    }
}

/// The configuration entry that would let a refused target through (`rule`: the rule
/// that nearly allowed it, as [`Live::rule_text`] shows it).
fn allow_entry(t: &Target, reason: ReasonCode, rule: &str) -> String {
    match (reason, t.host) {
        (ReasonCode::WildcardNarrowed, Host::Name(n)) => {
            // `rule` reads "<pattern> port <ports>".
            let pattern = rule.split_once(" port ").map_or(rule, |(p, _)| p);
            format!(
                "[catalog.narrow]\n\"{pattern}\" = [..., \"{}\"] (the wildcard is narrowed; list the name to let it through)",
                n.as_str()
            )
        }
        (ReasonCode::ServiceTagWithoutName, Host::Ip(ip)) => {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            format!(
                "[[allow]]\ncidr = \"{ip}/{bits}\"\nports = [{}] (an address on a TLS port carries no server name: only an operator CIDR rule allows it, not a service tag; or catalog.service_tags_nameless_tls = \"allow\")",
                t.port
            )
        }
        (ReasonCode::ForbiddenAddress, _) => format!(
            "the address guard refused it: list its address in upstream.allow_cidrs (for example allow_cidrs = [\"<address>/32\"]) only if {t} must be reached"
        ),
        (ReasonCode::DenyRule, _) => format!("a [[deny]] entry refuses {t}: remove or narrow it"),
        (
            ReasonCode::TlsHelloInvalid
            | ReasonCode::TlsHelloTimeout
            | ReasonCode::SniChangedAfterRetry,
            _,
        ) => format!(
            "nothing: the client's TLS handshake through CONNECT {t} could not be checked, and such tunnels are always refused"
        ),
        (ReasonCode::TlsEchPresent, _) => format!(
            "the client's TLS hello to {t} carries an encrypted client hello (ECH), whose real server name the proxy cannot see: proxy.ech = \"allow\" decides such hellos on their outer name (or turn ECH off in the client, for browsers the EncryptedClientHelloEnabled policy)"
        ),
        (ReasonCode::TunnelProtocolNotAllowed, _) => format!(
            "the tunnel to {t} carried neither TLS nor HTTP/1: list port {} in proxy.opaque_ports only if that protocol must pass uninspected",
            t.port
        ),
        (ReasonCode::NoServerName, _) => format!(
            "the client sent no TLS server name through CONNECT {t}: proxy.sni_missing = \"allow\" lets such tunnels through on the CONNECT's decision"
        ),
        (ReasonCode::HostMismatch, _) => format!(
            "nothing: a request inside the tunnel to {t} named another host; send requests for other hosts through their own CONNECT or as absolute-form requests"
        ),
        (_, Host::Name(n)) => {
            format!("[[allow]]\nhost = \"{}\"\nports = [{}]", n.as_str(), t.port)
        }
        (_, Host::Ip(ip)) => {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            format!("[[allow]]\ncidr = \"{ip}/{bits}\"\nports = [{}]", t.port)
        }
    }
}

/// The answer (count and log line) for a dial that failed after the policy allowed it:
/// the address guard's refusals are denials; DNS and connection failures are errors.
/// `pending` is the request's uncounted allow, replaced by this outcome; `None` when the
/// decision was counted already (an audit pass).
pub(crate) fn dial_failed(
    live: &Live,
    via: ListenerKind,
    client: ClientAddr,
    target: &Target,
    e: &DialError,
    pending: Option<AllowCount>,
) -> Reply {
    let (error, details) = e.proxy_status();
    let guard = matches!(
        e,
        DialError::Forbidden(_) | DialError::SelfConnection(_) | DialError::DenyRule(..)
    );
    let status = match e {
        _ if guard => StatusCode::FORBIDDEN,
        DialError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    };
    let shown = target.to_string();
    let hint = if matches!(e, DialError::DenyRule(..)) {
        " (remove or narrow that [[deny]] entry if the destination must be reached)"
    } else if guard {
        " (the address guard refuses loopback, link-local, metadata and similar addresses; list a network in upstream.allow_cidrs to exempt it)"
    } else {
        ""
    };
    let reply = Reply::new(
        status,
        error,
        details.as_str(),
        (Some(&shown), details.words()),
        format!("aml-egress could not reach {shown}: {e}{hint}"),
    );
    // A guard refusal is a denial, unless the request was counted already (an audit pass):
    // then it is logged as an upstream not reached.
    let outcome = match guard && pending.is_some() {
        true => Outcome::Deny,
        false => Outcome::Error,
    };
    let what = match outcome {
        Outcome::Error => e.to_string(),
        _ => String::new(),
    };
    let refusal = Refusal {
        seen: Seen {
            via,
            client,
            target: Some(target),
            shown: &shown,
            seen: &what,
            outcome,
            reason: details,
            rule: "",
        },
        answer: reply,
    };
    refusal.issue(live, Count::instead_of(pending))
}

/// The answer for a request whose response could not be forwarded (none in time, none
/// valid, or one the proxy cannot pass on faithfully; `error` says which): counted as an
/// error in place of its allow, and logged.
pub(crate) fn upstream_failed(
    live: &Live,
    (via, client): (ListenerKind, ClientAddr),
    shown: &str,
    error: &str,
    pending: Option<AllowCount>,
    reply: Reply,
) -> Reply {
    let refusal = Refusal {
        seen: Seen {
            via,
            client,
            target: None,
            shown,
            seen: error,
            outcome: Outcome::Error,
            reason: ReasonCode::UpstreamResponse,
            rule: "",
        },
        answer: reply,
    };
    refusal.issue(live, Count::instead_of(pending))
}
