//! Operations against a running proxy: the metrics as scraped (parsed here, line by line),
//! the bound on denied-host series, `/denied` and `aml-egress denied`, the admin token,
//! readiness while draining, hot reload (direct, by file watch through a ConfigMap-style
//! symlink swap, and a broken file), and the Grafana dashboard's and the alerting rules'
//! queries.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aml_egress::config::{self, Settings};
use aml_egress::reload::Trigger;
use aml_egress::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use support::TempFile;
use support::net::{echo_upstream, exchange, get};
use support::proxy::{Proxy, start_file as start};

/// Listeners on loopback port 0; `[proxy]` comes last so that tests can add proxy keys.
const LISTEN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n[proxy]\nlisten = [\"127.0.0.1:0\"]\ntls_ports = []\nopaque_ports = [443]\n";

/// One sample of the exposition: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse the Prometheus text format strictly enough to catch malformed output: every
/// sample line is `name{label="value",...} number`, and every family has HELP and TYPE.
fn parse_metrics(text: &str) -> (Vec<Sample>, BTreeSet<String>) {
    let mut samples = Vec::new();
    let mut typed = BTreeSet::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line: {line:?}"
        );
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("closing brace");
                let mut map = BTreeMap::new();
                for pair in l.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                }
                (n.to_owned(), map)
            }
        };
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit()),
            "bad name {name:?}"
        );
        samples.push((name, labels, value));
    }
    assert_eq!(typed, helped, "every family needs both HELP and TYPE");
    (samples, typed)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
}

async fn scrape(p: &Proxy) -> (Vec<Sample>, BTreeSet<String>) {
    let (status, body) = get(p.admin_addr, "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_decisions_denied_targets_tunnels_and_limits() {
    let echo = echo_upstream().await;
    let cfg = TempFile::new(
        "ops.toml",
        &format!(
            "{LISTEN}max_header_bytes = 8192\n[[allow]]\nhost = \"*.wild.example\"\nports = [443]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\", \"a.wild.example:443\" = \"{echo}\" }}\n"
        ),
    );
    let p = start(&cfg.0).await;
    let (mut s, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping", "the echo, through the tunnel");
    for _ in 0..2 {
        let (_, resp) = exchange(p.addr, "CONNECT Evil.Example.COM.:443 HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    }
    let big = format!(
        "GET http://pypi.org/ HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let _ = exchange(p.addr, &big).await;

    let (m, _) = scrape(&p).await;
    let d = |decision, reason| {
        value(
            &m,
            "aml_egress_decisions_total",
            &[
                ("listener", "connect"),
                ("decision", decision),
                ("reason", reason),
                ("policy", "default"),
            ],
        )
    };
    assert_eq!(d("allow", "rule"), Some(1.0));
    assert_eq!(d("deny", "no_matching_rule"), Some(2.0));
    // The label is the normalised name, never the bytes the client sent.
    assert_eq!(
        value(
            &m,
            "aml_egress_denied_total",
            &[
                ("host", "evil.example.com"),
                ("port", "443"),
                ("policy", "default")
            ]
        ),
        Some(2.0)
    );
    assert!(
        !m.iter()
            .any(|(_, l, _)| l.values().any(|v| v.contains("Evil")))
    );
    assert_eq!(
        value(&m, "aml_egress_open_tunnels", &[("mode", "enforce")]),
        Some(1.0)
    );
    assert_eq!(
        value(&m, "aml_egress_tunnel_bytes_total", &[("direction", "up")]),
        Some(4.0)
    );
    assert_eq!(
        value(
            &m,
            "aml_egress_tunnel_bytes_total",
            &[("direction", "down")]
        ),
        Some(4.0)
    );
    assert_eq!(
        value(
            &m,
            "aml_egress_limits_hit_total",
            &[("limit", "header_size")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "aml_egress_dial_duration_seconds_count",
            &[("result", "ok")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "aml_egress_request_duration_seconds_count",
            &[("listener", "connect")]
        ),
        Some(3.0)
    );
    assert!(value(&m, "aml_egress_rules", &[("kind", "exact")]).unwrap() > 0.0);
    assert_eq!(
        value(
            &m,
            "aml_egress_build_info",
            &[("catalog_revision", "2026-03"), ("cloud", "public")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "aml_egress_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_series_are_bounded_with_the_least_recent_evicted_and_counted() {
    let cfg = TempFile::new(
        "bound.toml",
        &format!("{LISTEN}[metrics]\nmax_denied_targets = 3\n[log]\ndenied_lines_per_minute = 1\n"),
    );
    let p = start(&cfg.0).await;
    for host in ["a", "b", "c", "a", "d", "e"] {
        let (_, resp) = exchange(
            p.addr,
            &format!("CONNECT {host}.example.net:443 HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    }
    let (m, _) = scrape(&p).await;
    let hosts: BTreeSet<&str> = m
        .iter()
        .filter(|(n, _, _)| n == "aml_egress_denied_total")
        .map(|(_, l, _)| l["host"].as_str())
        .collect();
    assert_eq!(
        hosts,
        BTreeSet::from(["a.example.net", "d.example.net", "e.example.net"])
    );
    assert_eq!(
        value(&m, "aml_egress_denied_series_evicted_total", &[]),
        Some(2.0)
    );
    assert_eq!(value(&m, "aml_egress_denied_evicted_total", &[]), Some(2.0));
    // The second denial of a.example.net in the same minute was counted, not logged.
    assert_eq!(
        value(&m, "aml_egress_log_lines_suppressed_total", &[]),
        Some(1.0)
    );

    let (status, body) = get(p.admin_addr, "/denied", None).await;
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let first = &list[0];
    assert_eq!(first["target"], "a.example.net:443");
    assert_eq!(first["count"], 2);
    assert_eq!(
        first["allow_entry"],
        "[[allow]]\nhost = \"a.example.net\"\nports = [443]"
    );
    assert!(first["first_seen"].as_str().unwrap().ends_with('Z'));
    assert_eq!(list.as_array().unwrap().len(), 3);

    // The same, as a table, from the command line.
    let admin = format!("http://{}", p.admin_addr);
    let out =
        support::clients::aml_async(["denied", "--admin", &admin].map(String::from).to_vec()).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first_row = table.lines().nth(1).unwrap();
    assert!(
        first_row.contains("a.example.net:443")
            && first_row.contains("[[allow]] host = \"a.example.net\" ports = [443]"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_everything_but_health() {
    let token = TempFile::new("token", "0123456789abcdef0123456789abcdef\n");
    let cfg = TempFile::new(
        "token.toml",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\n[proxy]\nlisten = [\"127.0.0.1:0\"]\n",
            token.0
        ),
    );
    let p = start(&cfg.0).await;
    assert_eq!(get(p.admin_addr, "/metrics", None).await.0, 401);
    assert_eq!(
        get(p.admin_addr, "/metrics", Some("wrong-token-wrong-token"))
            .await
            .0,
        401
    );
    let good = "0123456789abcdef0123456789abcdef";
    assert_eq!(get(p.admin_addr, "/metrics", Some(good)).await.0, 200);
    assert_eq!(get(p.admin_addr, "/denied", None).await.0, 401);
    assert_eq!(get(p.admin_addr, "/healthz", None).await.0, 200);
    assert_eq!(get(p.admin_addr, "/readyz", None).await.0, 200);

    // The command line says what to do without the token, and works with it.
    let admin = format!("http://{}", p.admin_addr);
    let token_path = token.0.clone();
    let (without, with) = tokio::task::spawn_blocking(move || {
        let bin = env!("CARGO_BIN_EXE_aml-egress");
        let without = Command::new(bin)
            .args(["denied", "--admin", &admin])
            .output()
            .unwrap();
        let with = Command::new(bin)
            .args(["denied", "--admin", &admin, "--token-file"])
            .arg(&token_path)
            .output()
            .unwrap();
        (without, with)
    })
    .await
    .unwrap();
    assert_eq!(without.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&without.stderr).contains("--token-file"));
    assert!(with.status.success());
}

#[test]
fn an_admin_listener_off_loopback_without_a_token_is_a_config_error() {
    let err = support::settings("[admin]\nlisten = \"0.0.0.0:9464\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admin.listen") && err.contains("admin.token_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_drops_while_draining_and_health_stays() {
    let echo = echo_upstream().await;
    let cfg = TempFile::new(
        "drain.toml",
        &format!(
            "{LISTEN}grace_period_secs = 30\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\" }}\n"
        ),
    );
    let p = start(&cfg.0).await;
    assert_eq!(get(p.admin_addr, "/readyz", None).await.0, 200);
    let (tunnel, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    p.stop.send(true).unwrap();
    // The stop is seen by a task; wait for readiness to follow (bounded).
    let mut status = 200;
    for _ in 0..200 {
        status = get(p.admin_addr, "/readyz", None).await.0;
        if status == 503 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(status, 503);
    assert_eq!(get(p.admin_addr, "/healthz", None).await.0, 200);
    drop(tunnel);
    assert_eq!(p.done.await.unwrap(), 0);
}

fn allow_b(echo: SocketAddr, with_b: bool) -> String {
    let b = if with_b {
        "[[allow]]\nhost = \"b.example.org\"\nports = [443]\n"
    } else {
        ""
    };
    format!(
        "{LISTEN}[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\", \"b.example.org:443\" = \"{echo}\" }}\n[reload]\nwatch_interval_secs = 0.05\n{b}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_a_host_takes_effect_without_dropping_an_open_tunnel() {
    let echo = echo_upstream().await;
    let cfg = TempFile::new("reload.toml", &allow_b(echo, false));
    let p = start(&cfg.0).await;
    let (mut tunnel, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (_, resp) = exchange(p.addr, "CONNECT b.example.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    std::fs::write(&cfg.0, allow_b(echo, true)).unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    let (_, resp) = exchange(p.addr, "CONNECT b.example.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The tunnel opened before the reload still carries bytes.
    tunnel.write_all(b"still").await.unwrap();
    let mut got = [0u8; 5];
    tunnel.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"still");
    let (m, _) = scrape(&p).await;
    assert_eq!(
        value(
            &m,
            "aml_egress_config_reloads_total",
            &[("result", "success")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "aml_egress_config_last_reload_successful", &[]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_keeps_the_old_policy_and_is_counted() {
    let echo = echo_upstream().await;
    let cfg = TempFile::new("broken.toml", &allow_b(echo, true));
    let p = start(&cfg.0).await;
    std::fs::write(&cfg.0, "[proxy\nmode = \"enforce\"\n").unwrap();
    assert!(!p.reloader.reload(Trigger::Requested));
    std::fs::write(&cfg.0, allow_b(echo, false) + "[[allow]]\nhost = \"x\"\n").unwrap();
    assert!(!p.reloader.reload(Trigger::Requested)); // an allow entry without ports
    let (_, resp) = exchange(p.addr, "CONNECT b.example.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 200"),
        "old policy not serving: {resp}"
    );
    let (m, _) = scrape(&p).await;
    assert_eq!(
        value(
            &m,
            "aml_egress_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&m, "aml_egress_config_last_reload_successful", &[]),
        Some(0.0)
    );
    assert_eq!(get(p.admin_addr, "/readyz", None).await.0, 200);
}

/// Point `link` at `target` atomically, as Kubernetes does with a ConfigMap's `..data`.
fn swap_symlink(target: &Path, link: &Path) {
    let tmp = link.parent().unwrap().join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_is_picked_up_by_the_watch() {
    let echo = echo_upstream().await;
    let dir: PathBuf = std::env::temp_dir().join(format!("aml-egress-cm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (v, with_b) in [("v1", false), ("v2", true)] {
        std::fs::create_dir_all(dir.join(v)).unwrap();
        std::fs::write(dir.join(v).join("config.toml"), allow_b(echo, with_b)).unwrap();
    }
    swap_symlink(&dir.join("v1"), &dir.join("..data"));
    std::os::unix::fs::symlink("..data/config.toml", dir.join("config.toml")).unwrap();
    let p = start(&dir.join("config.toml")).await;
    let (_, resp) = exchange(p.addr, "CONNECT b.example.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    let mut attempts = p.reloader.attempts.subscribe();
    swap_symlink(&dir.join("v2"), &dir.join("..data"));
    tokio::time::timeout(Duration::from_secs(20), attempts.wait_for(|n| *n >= 1))
        .await
        .expect("the watch reloaded within 20 s")
        .unwrap();
    let (_, resp) = exchange(p.addr, "CONNECT b.example.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let echo = echo_upstream().await;
    let cfg = TempFile::new(
        "dash.toml",
        &format!(
            "{LISTEN}max_header_bytes = 8192\n[[allow]]\nhost = \"*.wild.example\"\nports = [443]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\", \"a.wild.example:443\" = \"{echo}\" }}\n"
        ),
    );
    let p = start(&cfg.0).await;
    // Traffic that makes every labelled family appear.
    let (tunnel, _) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    let (wild, resp) = exchange(p.addr, "CONNECT a.wild.example:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let _ = exchange(p.addr, "CONNECT denied.example.net:443 HTTP/1.1\r\n\r\n").await;
    let big = format!(
        "GET http://pypi.org/ HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let _ = exchange(p.addr, &big).await;
    let (_, families) = scrape(&p).await;
    drop((tunnel, wild));

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/aml-egress.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    // The alerting rules too: every metric name in the file (expressions and annotations).
    exprs.push(include_str!("../deploy/prometheus/alerts.yml").to_owned());
    let name = regex::Regex::new(r"aml_egress_[a-z_]+").unwrap();
    let mut queried = BTreeSet::new();
    for e in &exprs {
        for m in name.find_iter(e) {
            let n = m.as_str();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|b| families.contains(*b)))
                .unwrap_or(n);
            queried.insert(base.to_owned());
        }
    }
    let missing: Vec<_> = queried.difference(&families).collect();
    assert!(
        missing.is_empty(),
        "the dashboard or the alerts query metrics the proxy does not export: {missing:?}"
    );
    assert!(
        queried.contains("aml_egress_denied_total") && queried.len() >= 10,
        "{queried:?}"
    );
}

#[test]
fn the_binary_reloads_on_sighup_and_exits_0_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let cfg = TempFile::new(
        "hup.toml",
        &format!("{LISTEN}[reload]\nwatch_interval_secs = 0\n"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["serve", "--config"])
        .arg(&cfg.0)
        .env_remove("AML_EGRESS_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut wait_for = |what: &str| -> serde_json::Value {
        for line in lines.by_ref() {
            let line = line.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["fields"]["message"] == what {
                return v;
            }
        }
        panic!("the proxy exited before logging {what:?}");
    };
    let serving = wait_for("aml-egress serving");
    assert!(
        serving["fields"]["admin"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:")
    );
    let kill = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    kill("-HUP");
    let reloaded = wait_for("configuration reloaded");
    assert_eq!(reloaded["fields"]["trigger"], "SIGHUP");
    kill("-TERM");
    wait_for("stopped");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_listeners_ipv4_and_ipv6_serve_the_same_policy() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let cfg = TempFile::new(
        "dual.toml",
        "[admin]\nlisten = \"\"\n[proxy]\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\n",
    );
    let s = Settings::load_with_env(Some(&cfg.0), Some(Default::default())).unwrap();
    let (_stop, stopping) = watch::channel(false);
    let running = server::start(config::compile(s).unwrap(), stopping)
        .await
        .unwrap();
    assert_eq!(running.addrs.len(), 2);
    assert!(running.addrs[0].is_ipv4() && running.addrs[1].is_ipv6());
    assert!(running.admin_addr.is_none());
    for addr in &running.addrs {
        let (_, resp) = exchange(*addr, "CONNECT denied.example.net:443 HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{addr}: {resp}");
    }
}
