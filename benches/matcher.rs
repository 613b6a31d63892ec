//! Decision time of the compiled matcher against two baselines (one `RegexSet` and a linear
//! scan of patterns), on the rendered catalog and on synthetic rule sets of 1,000, 10,000
//! and 100,000 rules; plus the time to compile each rule set. Policies per client: the load
//! time and memory of 200 `[[client_policy]]` tables over the catalog against one, and the
//! cost of choosing a client's policy.
//!
//! Run: `cargo bench --bench matcher`. README quotes the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes in use (for the policies' memory figures).
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        IN_USE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        IN_USE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

use aml_egress::metrics::{ListenerKind, Outcome};
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use regex::{RegexSet, RegexSetBuilder};

use aml_egress::config::build_policy;
use aml_egress::config::{NamelessTls, Settings};
use aml_egress::policy::{
    Action, HostPattern, Matchable, PathView, Policy, PolicyOptions, PortSet, Rule, RuleSpec,
    Source, Target,
};

/// The rendered 2026-03 public catalog with every optional part on.
fn catalog_rules() -> Vec<Rule> {
    let mut s = Settings::default();
    s.catalog.region = Some("westeurope".into());
    s.catalog.storage_account = Some("amlstore".into());
    s.catalog.container_registry = Some("amlregistry".into());
    s.catalog.features = vec!["all".into()];
    build_policy(&s)
        .expect("catalog builds")
        .policy
        .rules()
        .to_vec()
}

/// `n` rules: half exact names, half `*.suffix` wildcards, spread over many domains.
fn synthetic(n: usize) -> Vec<Rule> {
    (0..n)
        .map(|i| {
            let what = if i % 2 == 0 {
                HostPattern::Exact(format!("host{i}.svc{}.example{}.com", i % 97, i % 1000))
            } else {
                HostPattern::Subdomains(format!("svc{i}.example{}.net", i % 1000))
            };
            RuleSpec {
                action: Action::Allow,
                what: Matchable::Host(what, None),
                ports: PortSet::from_ranges([(443, 443)]),
                source: Source::Operator {
                    list: "allow".into(),
                    index: i + 1,
                    comment: None,
                },
            }
        })
        .collect()
}

fn regex_for(p: &HostPattern) -> String {
    match p {
        HostPattern::Exact(n) => format!("^{}$", regex::escape(n)),
        HostPattern::Subdomains(s) => format!(r"^(?:[^.]+\.)+{}$", regex::escape(s)),
        HostPattern::ApexAndSubdomains(s) => format!(r"^(?:[^.]+\.)*{}$", regex::escape(s)),
    }
}

fn host_patterns(rules: &[Rule]) -> Vec<(&HostPattern, &PortSet)> {
    rules
        .iter()
        .filter_map(|r| match &r.what {
            Matchable::Host(h, _) => Some((h, &r.ports)),
            _ => None,
        })
        .collect()
}

/// Baseline 1: one RegexSet; `matches` names the rules, then the port is checked.
struct RegexBaseline<'a> {
    set: RegexSet,
    rules: Vec<(&'a HostPattern, &'a PortSet)>,
}

impl RegexBaseline<'_> {
    fn decide(&self, name: &str, port: u16) -> Option<usize> {
        self.set
            .matches(name)
            .iter()
            .find(|&i| self.rules[i].1.contains(port))
    }
}

/// Baseline 2: a linear scan of the patterns.
fn linear(rules: &[(&HostPattern, &PortSet)], name: &str, port: u16) -> Option<usize> {
    rules.iter().position(|(p, ports)| {
        let hit = match p {
            HostPattern::Exact(n) => name == n,
            HostPattern::Subdomains(s) => {
                name.len() > s.len() + 1
                    && name.ends_with(s.as_str())
                    && name.as_bytes()[name.len() - s.len() - 1] == b'.'
            }
            HostPattern::ApexAndSubdomains(s) => {
                name == s
                    || (name.len() > s.len() + 1
                        && name.ends_with(s.as_str())
                        && name.as_bytes()[name.len() - s.len() - 1] == b'.')
            }
        };
        hit && ports.contains(port)
    })
}

fn bench_set(c: &mut Criterion, label: &str, rules: Vec<Rule>, allowed: &str, denied: &str) {
    let start = Instant::now();
    let policy = Policy::compile(rules.clone(), PolicyOptions::default()).unwrap();
    eprintln!(
        "{label}: {} rules compiled in {:?}",
        rules.len(),
        start.elapsed()
    );
    let patterns = host_patterns(&rules);
    let regex_start = Instant::now();
    // Generous limits, so that the baseline exists wherever the engine can build it at all.
    let regex = RegexSetBuilder::new(patterns.iter().map(|(p, _)| regex_for(p)))
        .size_limit(2 << 30)
        .dfa_size_limit(1 << 30)
        .build();
    let regex = match regex {
        Ok(set) => {
            eprintln!("{label}: RegexSet built in {:?}", regex_start.elapsed());
            Some(RegexBaseline {
                set,
                rules: patterns.clone(),
            })
        }
        Err(e) => {
            eprintln!("{label}: RegexSet cannot be built: {e}");
            None
        }
    };
    let mut g = c.benchmark_group(format!("decide/{label}"));
    for (case, target) in [("allowed", allowed), ("denied", denied)] {
        let t = Target::parse(target).unwrap();
        let name = target.rsplit_once(':').unwrap().0;
        assert_eq!(
            policy.decide(&t, PathView::Hidden).is_allowed(),
            case == "allowed",
            "{target}"
        );
        g.bench_function(BenchmarkId::new("matcher", case), |b| {
            b.iter(|| policy.decide(black_box(&t), PathView::Hidden))
        });
        // What the proxy adds per decision: one counter increment through a kept handle.
        let metrics = aml_egress::metrics::Metrics::new(1000);
        g.bench_function(BenchmarkId::new("matcher+count", case), |b| {
            b.iter(|| {
                let d = policy.decide(black_box(&t), PathView::Hidden);
                metrics.decision(ListenerKind::Connect, Outcome::Allow, d.reason.code());
                d
            })
        });
        g.bench_function(BenchmarkId::new("parse+matcher", case), |b| {
            b.iter(|| policy.decide_str(black_box(target), PathView::Hidden))
        });
        if let Some(r) = &regex {
            assert_eq!(r.decide(name, 443).is_some(), case == "allowed");
            g.bench_function(BenchmarkId::new("regexset", case), |b| {
                b.iter(|| r.decide(black_box(name), 443))
            });
        }
        g.bench_function(BenchmarkId::new("linear", case), |b| {
            b.iter(|| linear(&patterns, black_box(name), 443))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    g.bench_function(label, |b| {
        b.iter_batched(
            || rules.clone(),
            |r| Policy::compile(r, PolicyOptions::default()).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// A Service Tags file of the public file's size and shape (about 50,000 prefixes, IPv4
/// and IPv6), its prefixes spread over the tags the catalog names, so that every one of
/// them becomes a rule.
fn service_tags_file() -> (std::path::PathBuf, usize) {
    const TAGS: [&str; 8] = [
        "AzureActiveDirectory",
        "AzureMachineLearning",
        "Storage.WestEurope",
        "AzureResourceManager",
        "AzureFrontDoor.Frontend",
        "MicrosoftContainerRegistry",
        "AzureFrontDoor.FirstParty",
        "BatchNodeManagement.WestEurope",
    ];
    let per_tag = 6_250;
    let mut values = Vec::new();
    for (t, name) in TAGS.iter().enumerate() {
        let prefixes: Vec<String> = (0..per_tag)
            .map(|i| {
                if i % 5 == 4 {
                    format!("\"2603:{:x}:{:x}::/48\"", 0x1000 + t, i)
                } else {
                    format!("\"{}.{}.{}.0/24\"", 20 + t, (i / 256) % 256, i % 256)
                }
            })
            .collect();
        values.push(format!(
            "{{\"name\":\"{name}\",\"id\":\"{name}\",\"properties\":{{\"region\":\"\",\"addressPrefixes\":[{}]}}}}",
            prefixes.join(",")
        ));
    }
    let text = format!(
        "{{\"changeNumber\":1,\"cloud\":\"Public\",\"values\":[{}]}}",
        values.join(",")
    );
    let path =
        std::env::temp_dir().join(format!("aml-egress-bench-tags-{}.json", std::process::id()));
    std::fs::write(&path, text).unwrap();
    (path, per_tag * TAGS.len())
}

fn service_tags(c: &mut Criterion) {
    let (path, prefixes) = service_tags_file();
    let mut s = Settings::default();
    s.catalog.region = Some("westeurope".into());
    s.catalog.service_tags_file = Some(path.clone());
    // Addresses on a TLS port are refused by default (they carry no server name); allow
    // them so that the decisions below reach the prefix lookup this bench measures.
    s.catalog.service_tags_nameless_tls = NamelessTls::Allow;
    let started = Instant::now();
    let built = build_policy(&s).expect("the policy builds with the tags");
    eprintln!(
        "service tags: {prefixes} prefixes loaded and compiled in {:?} ({} CIDR rules)",
        started.elapsed(),
        built.policy.counts().cidr
    );
    let mut g = c.benchmark_group("service_tags");
    g.sample_size(10);
    g.bench_function("load+compile-50k", |b| b.iter(|| build_policy(&s).unwrap()));
    for (case, target) in [
        ("allowed-v4", "22.10.7.9:443"),
        ("allowed-v6", "[2603:1002:4e6::1]:443"),
        ("denied", "40.1.2.3:443"),
    ] {
        let t = Target::parse(target).unwrap();
        assert_eq!(
            built.policy.decide(&t, PathView::Hidden).is_allowed(),
            case != "denied",
            "{target}"
        );
        g.bench_function(BenchmarkId::new("decide", case), |b| {
            b.iter(|| built.policy.decide(black_box(&t), PathView::Hidden))
        });
    }
    g.finish();
    let _ = std::fs::remove_file(path);
}

/// What recording an allowed wildcard name costs per decision (`/allowed`): the catalog's
/// decision on a storage account under `*.blob.core.windows.net`, alone and with the
/// record the proxy makes, for a name already kept (the common case), for 1,000 names
/// taken in turn in a table of 1,000 (each one kept), and for 2,000 names in turn in a
/// table of 1,000 (each one new, evicting the least recently seen).
fn record_cost(c: &mut Criterion) {
    let policy = Policy::compile(catalog_rules(), PolicyOptions::default()).unwrap();
    let targets: Vec<Target> = (0..2000)
        .map(|i| Target::parse(&format!("acct{i}.blob.core.windows.net:443")).unwrap())
        .collect();
    let record = |metrics: &aml_egress::metrics::Metrics, t: &Target| {
        let d = policy.decide(t, PathView::Hidden);
        if let (Some(id), aml_egress::policy::Host::Name(n)) = (d.rule, t.host)
            && let Some(pattern) = policy.wildcard(id)
        {
            metrics.allowed.record(n.as_str(), t.port, pattern, || {
                policy.rule(id).source.to_string()
            });
        }
        d
    };
    let mut g = c.benchmark_group("record/catalog");
    g.bench_function("decide", |b| {
        b.iter(|| policy.decide(black_box(&targets[0]), PathView::Hidden))
    });
    for (case, names) in [("kept-1", 1usize), ("kept-1000", 1000), ("new-2000", 2000)] {
        let metrics = aml_egress::metrics::Metrics::new(1000);
        let mut i = 0usize;
        g.bench_function(BenchmarkId::new("decide+record", case), |b| {
            b.iter(|| {
                i = (i + 1) % names;
                record(&metrics, black_box(&targets[i]))
            })
        });
    }
    g.finish();
}

/// A hub configuration of `n` client policies over the catalog, each a spoke's /24 with
/// its own storage account (the storage wildcard narrowed to it).
fn hub(n: usize) -> String {
    let mut t = String::from("[catalog]\nregion = \"westeurope\"\n");
    for i in 0..n {
        t.push_str(&format!(
            "[[client_policy]]\nname = \"ws{i}\"\nsources = [\"10.{}.{}.0/24\"]\n[client_policy.catalog]\nregion = \"westeurope\"\nstorage_account = \"ws{i}store\"\n[client_policy.catalog.narrow]\n\"*.blob.core.windows.net\" = [\"ws{i}store.blob.core.windows.net\"]\n",
            i / 256,
            i % 256
        ));
    }
    t
}

/// Load time and memory of 1 and 200 client policies (printed), and the cost of choosing
/// the policy of a client (one per connection), with 1 and 200 policies.
fn client_policies(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("aml-egress-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut compiled = Vec::new();
    for n in [1usize, 200] {
        let file = dir.join(format!("hub{n}.toml"));
        std::fs::write(&file, hub(n)).unwrap();
        let before = IN_USE.load(Ordering::Relaxed);
        let start = Instant::now();
        let s = Settings::load_with_env(Some(&file), Some(Default::default())).unwrap();
        let built = aml_egress::config::compile(s).unwrap();
        let took = start.elapsed();
        let bytes = IN_USE.load(Ordering::Relaxed) - before;
        eprintln!(
            "client policies: {n} loaded in {took:?}, {:.1} MiB held ({:.0} KiB per policy with the default one)",
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / 1024.0 / (n + 1) as f64
        );
        compiled.push((n, built));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let mut g = c.benchmark_group("choose");
    for (n, built) in &compiled {
        let claimed: std::net::IpAddr = format!("10.0.{}.7", n - 1).parse().unwrap();
        let unclaimed: std::net::IpAddr = "192.168.1.1".parse().unwrap();
        g.bench_function(BenchmarkId::new("claimed", n), |b| {
            b.iter(|| built.clients.choose(black_box(claimed)))
        });
        g.bench_function(BenchmarkId::new("unclaimed", n), |b| {
            b.iter(|| built.clients.choose(black_box(unclaimed)))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    client_policies(c);
    record_cost(c);
    service_tags(c);
    bench_set(
        c,
        "catalog",
        catalog_rules(),
        "amlstore.blob.core.windows.net:443",
        "notpytorch.org:443",
    );
    for n in [1_000usize, 10_000, 100_000] {
        let k = n / 2 - 1;
        bench_set(
            c,
            &format!("synthetic-{n}"),
            synthetic(n),
            &format!("a.b.svc{}.example{}.net:443", 2 * k + 1, (2 * k + 1) % 1000),
            "a.b.svc1.example2.net:443",
        );
    }
}

criterion_group! {
    name = matcher;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(matcher);
