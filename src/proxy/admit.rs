//! Admission and counting: the policy's verdict with the mode applied, one decision counted
//! per request, refusals recorded in the denied-target table and logged (rate-limited), and
//! the responses a refusal or a failed dial gets.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::StatusCode;

use super::dial::DialError;
use super::respond::Refusal;
use super::state::{Live, Mode};
use crate::metrics::{ListenerKind, Metrics, Outcome};
use crate::policy::{Decision, PathView, Reason, Target};
use crate::reason::ReasonCode;

/// The outcome of asking the policy, with the mode applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Judged {
    pub decision: Decision,
    /// Let through (allowed, or denied but in audit mode).
    pub pass: bool,
    /// Denied by the policy but let through by audit mode.
    pub would_deny: bool,
}

impl Live {
    pub(crate) fn judge(&self, target: &Target, view: PathView<'_>) -> Judged {
        let decision = self.built.policy.decide(target, view);
        self.apply_mode(decision)
    }

    pub(crate) fn apply_mode(&self, decision: Decision) -> Judged {
        let allowed = decision.is_allowed();
        // Operator deny rules and invalid targets hold even in audit mode.
        let auditable = !matches!(
            decision.reason,
            Reason::DeniedByRule | Reason::InvalidTarget(_)
        );
        let would_deny = !allowed && auditable && self.config.mode == Mode::Audit;
        Judged {
            decision,
            pass: allowed || would_deny,
            would_deny,
        }
    }

    pub(crate) fn rule_text(&self, d: &Decision) -> String {
        d.rule
            .map(|id| self.built.policy.rule(id).display())
            .unwrap_or_default()
    }

    /// The 403 for a policy refusal of `target` (`None`: it could not be parsed), shown
    /// to the client as `shown`.
    pub(crate) fn forbidden(&self, shown: &str, target: Option<&Target>, d: &Decision) -> Refusal {
        let mut why = self.built.policy.explain(shown, d);
        if let Some(part) = target.and_then(|t| self.built.would_allow_with(t, PathView::Hidden)) {
            why.push_str(&crate::config::optional_part_hint(part));
        }
        let code = d.reason.code();
        // An unparseable target is not repeated in the status line.
        let in_phrase = (code != ReasonCode::InvalidTarget).then_some(shown);
        Refusal::new(
            StatusCode::FORBIDDEN,
            "destination_not_allowed",
            code.as_str(),
            (in_phrase, code.words()),
            format!(
                "aml-egress refused {shown}: {why}. If the workspace needs it, add an [[allow]] entry (or switch on the catalog part that covers it) and reload."
            ),
        )
    }

    /// Refuse a target that could not be parsed (counted and logged like any denial).
    pub(crate) fn refuse_invalid(
        &self,
        via: ListenerKind,
        peer: SocketAddr,
        shown: &str,
        e: crate::policy::InvalidTarget,
    ) -> Refusal {
        let v = self.apply_mode(Decision {
            verdict: crate::policy::Verdict::Deny,
            reason: Reason::InvalidTarget(e),
            rule: None,
        });
        self.note_verdict(via, peer, None, shown, &v);
        self.forbidden(shown, None, &v.decision)
    }

    /// One decision per request: a refusal or an audit pass is counted (and logged) now,
    /// whatever the dial does next, and a refusal is answered `403` (`Err`). An allow is
    /// returned uncounted, to be counted when the request ends ([`AllowCount`]).
    pub(crate) fn admit(
        &self,
        via: ListenerKind,
        client: SocketAddr,
        target: &Target,
        shown: impl FnOnce() -> String,
        v: &Judged,
    ) -> Result<Option<AllowCount>, Refusal> {
        if v.pass && !v.would_deny {
            return Ok(Some(AllowCount::new(self, via, v)));
        }
        let shown = shown();
        self.note_verdict(via, client, Some(target), &shown, v);
        if v.pass {
            Ok(None)
        } else {
            Err(self.forbidden(&shown, Some(target), &v.decision))
        }
    }

    /// Count a policy verdict; denials and would-be denials are also recorded and logged.
    pub(crate) fn note_verdict(
        &self,
        via: ListenerKind,
        client: SocketAddr,
        target: Option<&Target>,
        shown: &str,
        v: &Judged,
    ) {
        let outcome = if v.would_deny {
            Outcome::WouldDeny
        } else if v.pass {
            Outcome::Allow
        } else {
            Outcome::Deny
        };
        let reason = v.decision.reason.code();
        if outcome == Outcome::Allow {
            self.metrics.decision(via, outcome, reason); // no rule text needed
            return;
        }
        let rule = self.rule_text(&v.decision);
        self.note(&Seen {
            via,
            client,
            target,
            shown,
            seen: "",
            outcome,
            reason,
            rule: &rule,
        });
    }

    /// Count one decision. Denials and would-be denials go into the denied-target table and
    /// get one log line each, at most `log.denied_lines_per_minute` per target.
    pub(crate) fn note(&self, seen: &Seen<'_>) {
        self.metrics.decision(seen.via, seen.outcome, seen.reason);
        if seen.outcome != Outcome::Allow {
            self.record(seen); // allowed connections are logged once, when they finish
        }
    }

    /// Put a refusal in the denied-target table and log it (rate-limited), without
    /// counting a decision: for a second refusal within a request already counted.
    pub(crate) fn record(&self, seen: &Seen<'_>) {
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
                    crate::policy::Host::Name(n) => n.as_str().to_owned(),
                    crate::policy::Host::Ip(ip) => ip.to_string(),
                };
                let part = self.built.would_allow_with(t, PathView::Hidden);
                self.metrics.denied(&host, t.port, || match part {
                    Some(p) => format!(
                        "catalog.features = [..., \"{p}\"] (the optional part {p} covers {t})"
                    ),
                    None => allow_entry(t, reason),
                })
            }
            None => self.metrics.denied("(invalid target)", 0, || {
                "nothing: the request did not name a valid host:port".to_owned()
            }),
        };
        if self.logs.denial(this_minute) {
            tracing::warn!(
                listener = via.as_str(),
                client = %client,
                target = shown,
                seen,
                decision = outcome.as_str(),
                reason = reason.as_str(),
                rule,
                mode = self.config.mode.as_str(),
                "destination denied"
            );
        }
    }
}

/// One decision about one destination, as counted and logged.
#[derive(Clone, Copy)]
pub(crate) struct Seen<'a> {
    pub via: ListenerKind,
    pub client: SocketAddr,
    /// `None` for a target that could not be parsed.
    pub target: Option<&'a Target>,
    /// As shown in the log line.
    pub shown: &'a str,
    /// What the client sent that was refused (a TLS name, escaped bytes), or empty.
    pub seen: &'a str,
    pub outcome: Outcome,
    pub reason: ReasonCode,
    pub rule: &'a str,
}

/// An allowed request's decision, counted when this is dropped unless something else was
/// counted in its place ([`AllowCount::instead`]). A request whose client leaves while
/// the proxy dials or waits for the upstream is then still counted, once.
pub(crate) struct AllowCount {
    metrics: Arc<Metrics>,
    via: ListenerKind,
    reason: ReasonCode,
    armed: bool,
}

impl AllowCount {
    pub(crate) fn new(live: &Live, via: ListenerKind, v: &Judged) -> Self {
        AllowCount {
            metrics: live.metrics.clone(),
            via,
            reason: v.decision.reason.code(),
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
            self.metrics.decision(self.via, Outcome::Allow, self.reason);
        }
    }
}

/// The configuration entry that would let a refused target through.
fn allow_entry(t: &Target, reason: ReasonCode) -> String {
    match (reason, t.host) {
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
        (_, crate::policy::Host::Name(n)) => {
            format!("[[allow]]\nhost = \"{}\"\nports = [{}]", n.as_str(), t.port)
        }
        (_, crate::policy::Host::Ip(ip)) => {
            let bits = if ip.is_ipv4() { 32 } else { 128 };
            format!("[[allow]]\ncidr = \"{ip}/{bits}\"\nports = [{}]", t.port)
        }
    }
}

/// The response (count and log line) for a dial that failed after the policy allowed it:
/// the address guard's refusals are denials; DNS and connection failures are errors.
/// `pending` is the request's uncounted allow, replaced by this outcome; `None` when the
/// decision was counted already (an audit pass).
pub(crate) fn dial_failed(
    live: &Live,
    via: ListenerKind,
    peer: SocketAddr,
    target: &Target,
    e: &DialError,
    pending: Option<AllowCount>,
) -> Refusal {
    let counted = pending.is_none();
    if let Some(p) = pending {
        p.instead();
    }
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
    if guard && !counted {
        live.note(&Seen {
            via,
            client: peer,
            target: Some(target),
            shown: &shown,
            seen: "",
            outcome: Outcome::Deny,
            reason: details,
            rule: "",
        });
    } else {
        if !counted {
            live.metrics.decision(via, Outcome::Error, details);
        }
        if live.logs.line() {
            tracing::warn!(client = %peer, target = %shown, decision = "error", reason = details.as_str(), mode = live.config.mode.as_str(), error = %e, "upstream not reached");
        }
    }
    let hint = if matches!(e, DialError::DenyRule(..)) {
        " (remove or narrow that [[deny]] entry if the destination must be reached)"
    } else if guard {
        " (the address guard refuses loopback, link-local, metadata and similar addresses; list a network in upstream.allow_cidrs to exempt it)"
    } else {
        ""
    };
    Refusal::new(
        status,
        error,
        details.as_str(),
        (Some(&shown), details.words()),
        format!("aml-egress could not reach {shown}: {e}{hint}"),
    )
}
