//! What the status page costs: rendering the page (and its JSON) from a snapshot with full
//! tables (the most refused destinations at their bound, with the longest names, the
//! wildcard names at theirs, an hour of refusals by ten reasons), which is all a page
//! request does; and the sampler's pass over a full denied-target table, which is the only
//! time the page's work holds a lock that requests take. `cargo bench --bench status`.

use std::hint::black_box;
use std::sync::Arc;

use aml_egress::allowed::AllowedReport;
use aml_egress::metrics::{DeniedReport, ListenerKind, ListenerOpen, Metrics, OpenNow, Outcome};
use aml_egress::reason::ReasonCode;
use aml_egress::status::page;
use aml_egress::status::{
    ALLOWED_ROWS, CatalogInForce, DENIED_ROWS, Health, ListenerRow, MINUTES, Minute, Refusals,
    Report, Snapshot, WildcardNames,
};
use criterion::{Criterion, criterion_group, criterion_main};

const WHEN: &str = "2026-11-28T23:59:01Z";

fn full() -> Report {
    let long = |i: usize| format!("{}-{i:04}.{}", "a".repeat(58), "b-c_d.".repeat(30));
    let denied = (0..DENIED_ROWS)
        .map(|i| {
            let host = long(i);
            DeniedReport {
                target: format!("{host}:443"),
                allow_entry: format!("[[allow]]\nhost = \"{host}\"\nports = [443]"),
                host,
                port: 443,
                policy: "default".into(),
                count: 1000 - i as u64,
                let_through: 0,
                first_seen: WHEN.into(),
                last_seen: WHEN.into(),
                reason: "host_mismatch".into(),
                seen: "<script>\"'</textarea>".repeat(10),
            }
        })
        .collect();
    let names = (0..ALLOWED_ROWS)
        .map(|i| AllowedReport {
            name: format!("account{i}.blob.core.windows.net"),
            port: 443,
            rule: format!("*.r{}.core.windows.net", i % 10),
            rule_source: "catalog 2026-03 public: storage".into(),
            count: i as u64,
            first_seen: WHEN.into(),
            last_seen: WHEN.into(),
        })
        .collect::<Vec<_>>();
    let mut wildcards: Vec<WildcardNames> = Vec::new();
    for n in names {
        match wildcards.iter_mut().find(|w| w.rule == n.rule) {
            Some(w) => w.names.push(n),
            None => wildcards.push(WildcardNames {
                rule: n.rule.clone(),
                rule_source: n.rule_source.clone(),
                names: vec![n],
            }),
        }
    }
    let reasons: Vec<&'static str> = ReasonCode::ALL[2..12].iter().map(|r| r.as_str()).collect();
    let refusals = Refusals {
        minutes: (0..MINUTES)
            .map(|m| Minute {
                start: format!("2026-11-28T23:{:02}:00Z", m % 60),
                counts: (0..reasons.len() as u64)
                    .map(|r| (m as u64 * 7 + r) % 40)
                    .collect(),
            })
            .collect(),
        reasons,
    };
    let snapshot = Snapshot {
        taken_at: WHEN.into(),
        health: Health {
            version: "0.1.0",
            started_at: WHEN.into(),
            workers: 2,
            listeners: vec![ListenerRow {
                key: "proxy.listen",
                addr: "0.0.0.0:3128".into(),
            }],
            open: OpenNow {
                connections: vec![("enforce".into(), 120)],
                tunnels: vec![("enforce".into(), 80)],
                workers: vec![60, 60],
                by_listener: vec![ListenerOpen {
                    listener: "proxy.listen".into(),
                    connections: 40,
                    tunnels: 80,
                }],
            },
            config_source: "/etc/aml-egress/config.toml".into(),
            config_loaded_at: WHEN.into(),
            last_reload: None,
            inspect_ca_expires_at: Some(WHEN.into()),
            inspect_ca_expired: false,
        },
        refusals,
        denied,
        wildcards,
        catalog: CatalogInForce {
            revision: "2026-03".into(),
            cloud: "public",
            region: Some("westeurope".into()),
            parts_on: vec![("pip_downloads".into(), "pip installs".into())],
            parts_off: (0..8)
                .map(|i| (format!("part{i}"), "what it covers".into()))
                .collect(),
            client_policies: Vec::new(),
        },
    };
    Report {
        now: WHEN.into(),
        ready: true,
        not_ready_because: None,
        uptime_secs: 86_400,
        snapshot: Arc::new(snapshot),
    }
}

fn bench(c: &mut Criterion) {
    let report = full();
    let html = page::render(&report, true, false);
    eprintln!("page: {} bytes", html.len());
    c.bench_function("status/render-full", |b| {
        b.iter(|| page::render(black_box(&report), true, false))
    });
    c.bench_function("status/json-full", |b| {
        b.iter(|| serde_json::to_string(black_box(&report)).unwrap())
    });

    // The sampler's pick of the most denied from a full table (metrics.max_denied_targets
    // at its default, 1000): the time it holds the lock every denial takes, plus copying.
    let m = Metrics::new(1000);
    for i in 0..1000u64 {
        let host = format!("denied-{i}.example.net");
        for _ in 0..(i % 7 + 1) {
            m.denied(
                &host,
                443,
                "default",
                (ReasonCode::NoMatchingRule, ""),
                || format!("[[allow]]\nhost = \"{host}\"\nports = [443]"),
            );
        }
    }
    c.bench_function("status/sample-denied-1000", |b| {
        b.iter(|| m.top_denied(black_box(DENIED_ROWS), None))
    });
    // The per-reason counters, with 80 decision series in use.
    for r in &ReasonCode::ALL[..20] {
        for l in [ListenerKind::Connect, ListenerKind::Http] {
            for o in [Outcome::Deny, Outcome::Allow] {
                m.decision(l, o, *r);
            }
        }
    }
    c.bench_function("status/sample-counters", |b| {
        b.iter(|| m.refusals_by_reason())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
