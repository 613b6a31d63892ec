//! The status page as HTML, written by hand: one document, no external asset, readable
//! without JavaScript. Every value that came from the network (host names, what a client
//! sent, rule text) goes through [`Escaped`]; the one inline style sheet and the one inline
//! script (the "copy" buttons) are allowed by their hashes in [`csp`], and nothing else is.

use std::fmt::{self, Write};
use std::sync::OnceLock;

use super::{Refusals, Report};
use crate::reason::ReasonCode;

/// A string written with `&`, `<`, `>`, `"` and `'` escaped: safe in element content and
/// in quoted attribute values.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// `s` escaped for HTML (see [`Escaped`]).
pub fn escape(s: &str) -> String {
    Escaped(s).to_string()
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{background:#1b1f24;color:#fff;padding:12px 24px;display:flex;gap:16px;align-items:center;flex-wrap:wrap}\
header h1{font-size:18px;margin:0;font-weight:600}\
header a{color:#9cc4ff}\
main{padding:8px 24px 32px;max-width:1400px}\
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 16px;margin:16px 0}\
h2{font-size:16px;margin:0 0 8px}\
.badge{padding:2px 10px;border-radius:10px;font-weight:600}\
.ok{background:#1a7f37;color:#fff}.bad{background:#cf222e;color:#fff}.warn{background:#fff1c2;color:#5c4400}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}\
dt{color:#57606a}dd{margin:0}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;vertical-align:top;padding:5px 8px;border-bottom:1px solid #eaecef}\
th{color:#57606a;font-weight:600}\
td.n{text-align:right;font-variant-numeric:tabular-nums}\
.host,code{overflow-wrap:anywhere;word-break:break-all}\
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}\
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:#f6f8fa;padding:6px 8px;margin:0;border-radius:4px}\
button{margin-top:4px;font-size:12px}\
.muted{color:#57606a}\
.legend{list-style:none;padding:0;margin:6px 0 0;display:flex;flex-wrap:wrap;gap:4px 16px}\
svg.chart{width:100%;height:auto;max-width:1000px}\
form{display:flex;gap:8px;align-items:center;flex-wrap:wrap}\
input[type=password]{font:inherit;padding:4px 8px;min-width:320px}\
.error{color:#cf222e}";

const SCRIPT: &str = "\
document.querySelectorAll('button[data-copy]').forEach(function(b){\
b.hidden=false;\
b.addEventListener('click',function(){\
var t=document.getElementById(b.getAttribute('data-copy')).textContent;\
var done=function(){b.textContent='copied'};\
if(navigator.clipboard){navigator.clipboard.writeText(t).then(done,function(){b.textContent='select it and copy'})}\
else{b.textContent='select it and copy'}\
})});";

/// The `Content-Security-Policy` of the page and the login form: nothing loads, the inline
/// style sheet and script run by their hashes, forms post only here, no framing.
pub fn csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        format!(
            "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            sha256_base64(STYLE),
            sha256_base64(SCRIPT)
        )
    })
}

fn sha256_base64(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    base64(d.as_ref())
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(A[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The colours of the chart's reasons, most refused first; the rest share [`OTHER`].
const PALETTE: [&str; 8] = [
    "#cf222e", "#fb8f44", "#0969da", "#8250df", "#1a7f37", "#bf3989", "#1b7c83", "#9a6700",
];
const OTHER: &str = "#8c959f";

fn head(o: &mut String, title: &str, refresh: bool) {
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
    );
    if refresh {
        o.push_str("<meta http-equiv=\"refresh\" content=\"10\">");
    }
    let _ = write!(
        o,
        "<title>{}</title><style>{STYLE}</style></head><body>",
        Escaped(title)
    );
}

/// The login form (`admin.token_file` is set and the request carried neither a session
/// nor the bearer token); `error` says why the last attempt failed.
pub fn login(error: Option<&str>) -> String {
    let mut o = String::with_capacity(4096);
    head(&mut o, "aml-egress status: log in", false);
    o.push_str("<header><h1>aml-egress status</h1></header><main><section><h2>Log in</h2>");
    if let Some(e) = error {
        let _ = write!(
            o,
            "<p class=\"error\" id=\"login-error\">{}</p>",
            Escaped(e)
        );
    }
    o.push_str(
        "<p>This admin listener needs its token (the contents of the file that <code>admin.token_file</code> names). \
         Logging in sets a session cookie for this browser; the token itself is not kept in it. \
         Scripts send <code>Authorization: Bearer &lt;token&gt;</code> instead.</p>\
         <form method=\"post\" action=\"/login\">\
         <label for=\"token\">Token</label> \
         <input type=\"password\" id=\"token\" name=\"token\" autocomplete=\"current-password\" required autofocus> \
         <button type=\"submit\">Log in</button></form></section></main></body></html>\n",
    );
    o
}

/// The status page for `r`; `refresh`: reload itself every 10 s; `logout`: offer a
/// "log out" button (the page needs a token).
pub fn render(r: &Report, refresh: bool, logout: bool) -> String {
    let s = &r.snapshot;
    let h = &s.health;
    let mut o = String::with_capacity(64 * 1024);
    head(&mut o, "aml-egress status", refresh);
    let (class, word) = if r.ready {
        ("ok", "ready")
    } else {
        ("bad", "not ready")
    };
    let _ = write!(
        o,
        "<header><h1>aml-egress status</h1><span class=\"badge {class}\" id=\"ready\">{word}</span>\
         <span>version {}</span><span>as of {} (sampled {})</span>",
        Escaped(h.version),
        Escaped(&r.now),
        Escaped(&s.taken_at)
    );
    if refresh {
        o.push_str(
            "<span>refreshes every 10 s: <a href=\"/?refresh=0\">stop refreshing</a></span>",
        );
    } else {
        o.push_str("<span>not refreshing: <a href=\"/\">refresh every 10 s</a></span>");
    }
    o.push_str("<span><a href=\"/?format=json\">JSON</a></span>");
    if logout {
        o.push_str(
            "<form method=\"post\" action=\"/logout\"><button type=\"submit\" id=\"logout\">Log out</button></form>",
        );
    }
    o.push_str("</header><main>");
    health(&mut o, r);
    refusals(&mut o, &s.refusals);
    denied(&mut o, r);
    wildcards(&mut o, r);
    catalog(&mut o, r);
    o.push_str(
        "<p class=\"muted\" id=\"for-scripts\">The same data for scripts: <a href=\"/?format=json\">/?format=json</a>, \
         <a href=\"/denied\">/denied</a>, <a href=\"/allowed\">/allowed</a>, <a href=\"/metrics\">/metrics</a>",
    );
    if logout {
        // The session opens this page only; the endpoints keep to the bearer header.
        o.push_str(
            " (the last three need <code>Authorization: Bearer &lt;token&gt;</code>: this page's login does not open them)",
        );
    }
    o.push_str(".</p></main>");
    let _ = writeln!(o, "<script>{SCRIPT}</script></body></html>");
    o
}

fn health(o: &mut String, r: &Report) {
    let h = &r.snapshot.health;
    o.push_str("<section id=\"health\"><h2>Health</h2><dl>");
    let ready = match r.not_ready_because {
        None => "ready (answering /readyz with 200)".to_owned(),
        Some(why) => format!("not ready: {why}"),
    };
    let _ = write!(o, "<dt>Ready</dt><dd>{}</dd>", Escaped(&ready));
    let _ = write!(
        o,
        "<dt>Up</dt><dd>{} (since {})</dd><dt>Workers</dt><dd>{}</dd>",
        duration(r.uptime_secs),
        Escaped(&h.started_at),
        h.workers
    );
    o.push_str("<dt>Listeners</dt><dd>");
    for l in &h.listeners {
        let open = h.open.by_listener.iter().find(|o| o.listener == l.key);
        let (c, t) = open.map_or((0, 0), |o| (o.connections, o.tunnels));
        let _ = write!(
            o,
            "<div class=\"listener\"><code>{}</code> ({}): {c} connections, {t} tunnels open</div>",
            Escaped(&l.addr),
            Escaped(l.key)
        );
    }
    o.push_str("</dd><dt>Open</dt><dd>");
    let list = |v: &[(String, i64)]| -> String {
        if v.is_empty() {
            return "0".into();
        }
        v.iter()
            .map(|(m, n)| format!("{n} {}", escape(m)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = write!(
        o,
        "connections: {}; tunnels: {}",
        list(&h.open.connections),
        list(&h.open.tunnels)
    );
    if !h.open.workers.is_empty() {
        let per: Vec<String> = h.open.workers.iter().map(i64::to_string).collect();
        let _ = write!(o, "; by worker: {}", per.join(" / "));
    }
    let _ = write!(
        o,
        "</dd><dt>Configuration</dt><dd><code>{}</code>, loaded {}</dd>",
        Escaped(&h.config_source),
        Escaped(&h.config_loaded_at)
    );
    o.push_str("<dt>Last reload</dt><dd id=\"last-reload\">");
    match &h.last_reload {
        None => o.push_str("none since start-up"),
        Some(rl) if rl.ok => {
            let _ = write!(
                o,
                "<span class=\"badge ok\">succeeded</span> {} ({})",
                Escaped(&rl.at),
                Escaped(rl.trigger)
            );
        }
        Some(rl) => {
            let _ = write!(
                o,
                "<span class=\"badge bad\">failed</span> {} ({}); the previous configuration stays in force. \
                 Fix the file and reload again.<pre>{}</pre>",
                Escaped(&rl.at),
                Escaped(rl.trigger),
                Escaped(rl.error.as_deref().unwrap_or(""))
            );
        }
    }
    o.push_str("</dd>");
    if let Some(at) = &h.inspect_ca_expires_at {
        let _ = write!(o, "<dt>Inspection CA</dt><dd>");
        if h.inspect_ca_expired {
            let _ = write!(
                o,
                "<span class=\"badge bad\">expired</span> {}: tunnels that need inspection are refused; \
                 issue a new CA (<code>aml-egress ca</code>) and reload",
                Escaped(at)
            );
        } else {
            let _ = write!(o, "expires {}", Escaped(at));
        }
        o.push_str("</dd>");
    }
    o.push_str("</dl></section>");
}

/// `3 d 4 h`, `4 h 5 min`, `5 min 6 s`.
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) => format!("{m} min {s} s"),
        (0, _, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}

fn refusals(o: &mut String, r: &Refusals) {
    let _ = write!(
        o,
        "<section id=\"refusals\"><h2>Refusals in the last hour: {}</h2>",
        r.total()
    );
    o.push_str(&chart(r));
    if !r.reasons.is_empty() {
        o.push_str("<ul class=\"legend\">");
        for (i, reason) in r.reasons.iter().enumerate() {
            let total: u64 = r.minutes.iter().map(|m| m.counts[i]).sum();
            let _ = write!(
                o,
                "<li><svg width=\"10\" height=\"10\" aria-hidden=\"true\"><rect width=\"10\" height=\"10\" fill=\"{}\"/></svg> \
                 <code>{}</code> {} ({total})</li>",
                colour(i),
                Escaped(reason),
                Escaped(words(reason))
            );
        }
        o.push_str("</ul>");
    }
    o.push_str(
        "<p class=\"muted\">Per minute (UTC), denials and, in audit mode, would-be denials, by reason.</p></section>",
    );
}

fn colour(i: usize) -> &'static str {
    PALETTE.get(i).copied().unwrap_or(OTHER)
}

fn words(code: &str) -> &'static str {
    ReasonCode::ALL
        .iter()
        .find(|r| r.as_str() == code)
        .map_or("", |r| r.words())
}

/// The refusal chart: one stacked bar per minute, one colour per reason (the
/// [`PALETTE`]'s, then [`OTHER`]), a title on each piece for its count.
pub fn chart(r: &Refusals) -> String {
    const W: u64 = 960;
    const H: u64 = 220;
    const LEFT: u64 = 48;
    const TOP: u64 = 10;
    const PLOT_H: u64 = 180;
    let mut o = String::with_capacity(8 * 1024);
    let _ = write!(
        o,
        "<svg class=\"chart\" id=\"refusal-chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" \
         role=\"img\" aria-label=\"Refusals per minute over the last hour, by reason\">"
    );
    let max = r
        .minutes
        .iter()
        .map(|m| m.counts.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let axis = |o: &mut String| {
        let _ = write!(
            o,
            "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#8c959f\"/>",
            TOP + PLOT_H,
            W - 12,
            TOP + PLOT_H
        );
    };
    if max == 0 {
        axis(&mut o);
        let _ = write!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#57606a\" font-size=\"14\">No refusals in the last hour.</text></svg>",
            W / 2,
            TOP + PLOT_H / 2
        );
        return o;
    }
    let top = nice(max);
    for step in [0, top / 2, top] {
        let y = TOP + PLOT_H - PLOT_H * step / top;
        let _ = write!(
            o,
            "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eaecef\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#57606a\" font-size=\"11\">{step}</text>",
            W - 12,
            LEFT - 6,
            y + 4
        );
    }
    axis(&mut o);
    let slots = r.minutes.len().max(1) as u64;
    let slot = (W - 12 - LEFT) as f64 / slots as f64;
    for (i, m) in r.minutes.iter().enumerate() {
        let x = LEFT as f64 + i as f64 * slot;
        let hhmm = m.start.get(11..16).unwrap_or("");
        let mut base = (TOP + PLOT_H) as f64;
        for (k, n) in m.counts.iter().enumerate().filter(|(_, n)| **n > 0) {
            let h = PLOT_H as f64 * *n as f64 / top as f64;
            base -= h;
            let _ = write!(
                o,
                "<rect x=\"{x:.1}\" y=\"{base:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} UTC {}: {n}</title></rect>",
                (slot - 2.0).max(1.0),
                colour(k),
                Escaped(hhmm),
                Escaped(r.reasons.get(k).copied().unwrap_or(""))
            );
        }
        if i % 15 == 0 || i + 1 == r.minutes.len() {
            let _ = write!(
                o,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#57606a\" font-size=\"11\">{}</text>",
                x + slot / 2.0,
                TOP + PLOT_H + 16,
                Escaped(hhmm)
            );
        }
    }
    o.push_str("</svg>");
    o
}

/// The smallest of 1, 2, 5 × 10ⁿ at least `n`.
fn nice(n: u64) -> u64 {
    let mut p = 1u64;
    loop {
        for m in [1, 2, 5] {
            if m * p >= n {
                return m * p;
            }
        }
        p = p.saturating_mul(10);
    }
}

fn denied(o: &mut String, r: &Report) {
    let s = &r.snapshot;
    let policies = !s.catalog.client_policies.is_empty();
    let _ = write!(
        o,
        "<section id=\"denied\"><h2>Most refused destinations</h2>"
    );
    if s.denied.is_empty() {
        o.push_str("<p class=\"muted\">Nothing refused since start-up.</p></section>");
        return;
    }
    o.push_str(
        "<table><thead><tr><th>Destination</th><th>Refusals</th><th>Last seen</th><th>Reason</th>",
    );
    if policies {
        o.push_str("<th>Policy</th>");
    }
    o.push_str("<th>Client sent</th><th>To allow it</th></tr></thead><tbody>");
    for (i, d) in s.denied.iter().enumerate() {
        let _ = write!(
            o,
            "<tr><td class=\"host\">{}</td><td class=\"n\">{}{}</td><td>{}</td><td><code>{}</code><br><span class=\"muted\">{}</span></td>",
            Escaped(&d.target),
            d.count,
            // Audit mode let these through: they reached the destination.
            match d.let_through {
                0 => String::new(),
                n => format!("<br><span class=\"bad\">{n} let through (audit)</span>"),
            },
            Escaped(&d.last_seen),
            Escaped(&d.reason),
            Escaped(words(&d.reason))
        );
        if policies {
            let _ = write!(o, "<td>{}</td>", Escaped(&d.policy));
        }
        let _ = write!(
            o,
            "<td><code>{}</code></td><td><pre id=\"allow-{i}\">{}</pre>\
             <button type=\"button\" data-copy=\"allow-{i}\" hidden>copy</button></td></tr>",
            Escaped(&d.seen),
            Escaped(&d.allow_entry)
        );
    }
    let _ = write!(
        o,
        "</tbody></table><p class=\"muted\">The {} most refused since start-up (or since they entered the table of \
         <code>metrics.max_denied_targets</code>). Add an entry to the configuration, then reload (SIGHUP, or save the file).</p></section>",
        s.denied.len()
    );
}

fn wildcards(o: &mut String, r: &Report) {
    let s = &r.snapshot;
    o.push_str("<section id=\"wildcards\"><h2>Names seen under wildcard rules</h2>");
    if s.wildcards.is_empty() {
        o.push_str("<p class=\"muted\">No name allowed by a wildcard rule yet.</p></section>");
        return;
    }
    o.push_str("<table><thead><tr><th>Rule</th><th>Name</th><th>Allowed</th><th>Last seen</th></tr></thead><tbody>");
    for g in &s.wildcards {
        for (k, n) in g.names.iter().enumerate() {
            o.push_str("<tr>");
            if k == 0 {
                let _ = write!(
                    o,
                    "<td rowspan=\"{}\"><code>{}</code><br><span class=\"muted\">{}</span></td>",
                    g.names.len(),
                    Escaped(&g.rule),
                    Escaped(&g.rule_source)
                );
            }
            let _ = write!(
                o,
                "<td class=\"host\">{}:{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
                Escaped(&n.name),
                n.port,
                n.count,
                Escaped(&n.last_seen)
            );
        }
    }
    o.push_str(
        "</tbody></table><p class=\"muted\">The most recently seen names; <code>aml-egress suggest --narrow</code> \
         turns them into a <code>[catalog.narrow]</code> table.</p></section>",
    );
}

fn catalog(o: &mut String, r: &Report) {
    let c = &r.snapshot.catalog;
    let _ = write!(
        o,
        "<section id=\"catalog\"><h2>Catalog in force</h2><dl><dt>Revision</dt><dd>{}</dd><dt>Cloud</dt><dd>{}</dd>",
        Escaped(&c.revision),
        Escaped(c.cloud)
    );
    if let Some(region) = &c.region {
        let _ = write!(o, "<dt>Region</dt><dd>{}</dd>", Escaped(region));
    }
    let parts = |o: &mut String, v: &[(String, String)]| {
        if v.is_empty() {
            o.push_str("none");
        }
        for (name, what) in v {
            let _ = write!(
                o,
                "<code>{}</code> <span class=\"muted\">{}</span><br>",
                Escaped(name),
                Escaped(what)
            );
        }
    };
    o.push_str("<dt>Optional parts on</dt><dd>");
    parts(o, &c.parts_on);
    o.push_str("</dd><dt>Optional parts off</dt><dd>");
    parts(o, &c.parts_off);
    o.push_str("</dd>");
    for p in &c.client_policies {
        let _ = write!(
            o,
            "<dt>Client policy <code>{}</code></dt><dd>{} mode, revision {}, {} cloud, region {}, parts on: {}</dd>",
            Escaped(&p.name),
            Escaped(p.mode),
            Escaped(&p.revision),
            Escaped(p.cloud),
            Escaped(p.region.as_deref().unwrap_or("not set")),
            Escaped(&if p.parts_on.is_empty() {
                "none".to_owned()
            } else {
                p.parts_on.join(", ")
            })
        );
    }
    o.push_str("</dl></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{MINUTES, Minute};

    #[test]
    fn the_escaper_leaves_nothing_that_html_would_read() {
        assert_eq!(escape("plain.example:443"), "plain.example:443");
        assert_eq!(
            escape("<script>alert('x')</script>"),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"
        );
        assert_eq!(
            escape("\"a\" & </textarea>"),
            "&quot;a&quot; &amp; &lt;/textarea&gt;"
        );
        assert_eq!(escape("&amp;"), "&amp;amp;");
        assert_eq!(escape("é<é"), "é&lt;é");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_csp_allows_exactly_the_style_and_the_script_by_hash() {
        let c = csp();
        assert!(c.starts_with("default-src 'none'; "), "{c}");
        assert_eq!(c.matches("'sha256-").count(), 2, "{c}");
        assert!(c.contains("frame-ancestors 'none'") && c.contains("form-action 'self'"));
        assert!(!c.contains("unsafe"), "{c}");
    }

    fn hour(reasons: &[&'static str], at: &[(usize, Vec<u64>)]) -> Refusals {
        let minutes = (0..MINUTES)
            .map(|i| Minute {
                start: format!("2026-11-28T10:{:02}:00Z", i % 60),
                counts: at
                    .iter()
                    .find(|(k, _)| *k == i)
                    .map_or_else(|| vec![0; reasons.len()], |(_, c)| c.clone()),
            })
            .collect();
        Refusals {
            reasons: reasons.to_vec(),
            minutes,
        }
    }

    #[test]
    fn an_empty_chart_says_so() {
        let svg = chart(&hour(&[], &[]));
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert!(svg.contains("No refusals in the last hour."));
        assert!(!svg.contains("<rect"));
        let svg = chart(&Refusals::default());
        assert!(svg.contains("No refusals"));
    }

    #[test]
    fn one_reason_draws_one_bar_per_minute_with_counts() {
        let svg = chart(&hour(&["no_matching_rule"], &[(3, vec![4]), (59, vec![1])]));
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(
            svg.contains("<title>10:03 UTC no_matching_rule: 4</title>"),
            "{svg}"
        );
        assert!(svg.contains(&format!("fill=\"{}\"", PALETTE[0])));
        // The scale's top is the next 1, 2 or 5: 5 for a peak of 4.
        assert!(svg.contains(">5</text>"), "{svg}");
    }

    #[test]
    fn many_reasons_stack_and_the_ninth_on_share_a_colour() {
        let reasons: Vec<&'static str> = ReasonCode::ALL[..10].iter().map(|r| r.as_str()).collect();
        let svg = chart(&hour(&reasons, &[(0, vec![1; 10]), (1, vec![0; 10])]));
        assert_eq!(svg.matches("<rect").count(), 10, "{svg}");
        for c in PALETTE {
            assert!(svg.contains(&format!("fill=\"{c}\"")), "{c}");
        }
        assert_eq!(svg.matches(&format!("fill=\"{OTHER}\"")).count(), 2);
        assert!(svg.contains(">10</text>"), "{svg}");
    }

    #[test]
    fn nice_tops() {
        assert_eq!(
            [1, 2, 3, 7, 10, 11, 99, 1000].map(nice),
            [1, 2, 5, 10, 10, 20, 100, 1000]
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(5), "5 s");
        assert_eq!(duration(65), "1 min 5 s");
        assert_eq!(duration(3 * 3600 + 120), "3 h 2 min");
        assert_eq!(duration(2 * 86_400 + 3600), "2 d 1 h");
    }
}
