//! What passes under a wildcard, end to end with the binary: names a wildcard rule let
//! through are listed by `/allowed` and the gauge, each logged once as a first use; the
//! wildcard narrowed to them (a reload) refuses a new name with `wildcard_narrowed` while
//! the listed ones still work, through curl and Python requests.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use support::TempFile;
use support::clients::curl_async;
use support::net::get;
use support::peers::tls_upstream;

const BIN: &str = env!("CARGO_BIN_EXE_aml-egress");
const NAMES: [&str; 3] = ["acct1.blob.test", "acct2.blob.test", "attacker.blob.test"];

/// The config: `*.blob.test` on 443, every name pinned to the TLS upstream, and
/// `narrow` appended (a `[catalog.narrow]` table, or nothing).
fn config(tls: std::net::SocketAddr, narrow: &str) -> String {
    let pins: Vec<String> = NAMES
        .iter()
        .map(|n| format!("\"{n}:443\" = \"{tls}\""))
        .collect();
    format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[reload]\nwatch_interval_secs = 0.05\n[[allow]]\nhost = \"*.blob.test\"\nports = [443]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ {} }}\n{narrow}",
        pins.join(", ")
    )
}

/// `serve` on a config file, its JSON log lines arriving on a channel.
struct Serving {
    child: Child,
    lines: Receiver<String>,
    proxy: String,
    admin: std::net::SocketAddr,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serving {
    fn start(cfg: &TempFile) -> Serving {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&cfg.0)
            .env_remove("AML_EGRESS_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut s = Serving {
            child,
            lines,
            proxy: String::new(),
            admin: "127.0.0.1:0".parse().unwrap(),
        };
        let serving = s.until("aml-egress serving");
        let v: serde_json::Value = serde_json::from_str(&serving).unwrap();
        // `listen` is the bound addresses' debug form: "[127.0.0.1:PORT]".
        let listen = v["fields"]["listen"].as_str().unwrap();
        s.proxy = format!("http://{}", listen.trim_matches(['[', ']']));
        s.admin = v["fields"]["admin"].as_str().unwrap().parse().unwrap();
        s
    }

    /// Log lines up to (and including) the first whose message is `message`; bounded:
    /// 20 s without a line fails the test.
    fn until_lines(&self, message: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no {message:?} line; saw:\n{}", seen.join("\n")));
            let done = serde_json::from_str::<serde_json::Value>(&line)
                .is_ok_and(|v| v["fields"]["message"] == message);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    fn until(&self, message: &str) -> String {
        self.until_lines(message).pop().unwrap()
    }
}

/// GET `https://{name}/` through the proxy with curl: exit code and body.
async fn curl(s: &Serving, ca: &TempFile, name: &str) -> (i32, String, String) {
    curl_async(vec![
        "--proxy".into(),
        s.proxy.clone(),
        "--cacert".into(),
        ca.0.display().to_string(),
        format!("https://{name}/"),
    ])
    .await
}

/// The same with Python requests: its status line or the exception's name and text.
async fn python(s: &Serving, ca: &TempFile, name: &str) -> String {
    let script = "import sys, requests\ntry:\n    r = requests.get(sys.argv[1], proxies={'https': sys.argv[2]}, verify=sys.argv[3], timeout=20)\n    print(r.status_code, r.text.strip())\nexcept Exception as e:\n    print(type(e).__name__, e)\n";
    let args = [
        format!("https://{name}/"),
        s.proxy.clone(),
        ca.0.display().to_string(),
    ];
    tokio::task::spawn_blocking(move || {
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("REQUESTS_CA_BUNDLE")
            .output()
            .expect("python3 with requests is installed (.ci/run installs it)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
            + &String::from_utf8_lossy(&out.stderr)
    })
    .await
    .unwrap()
}

/// Run a client subcommand: its exit code and standard output (standard error after it).
fn cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `/allowed` as (name, port, rule, count) rows, most recent first.
async fn allowed(s: &Serving, query: &str) -> Vec<(String, u64, String, u64)> {
    let (status, body) = get(s.admin, &format!("/allowed{query}"), None).await;
    assert_eq!(status, 200, "{body}");
    let rows: Vec<aml_egress::allowed::AllowedReport> = serde_json::from_str(&body).unwrap();
    rows.into_iter()
        .map(|r| (r.name, u64::from(r.port), r.rule, r.count))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_under_a_wildcard_are_seen_once_narrowed_and_then_only_those_pass() {
    let (tls, ca) = tls_upstream(&NAMES).await;
    let cfg = TempFile::new("wildcards.toml", &config(tls, ""));
    let s = Serving::start(&cfg);

    // Observe: two accounts used, one twice, through two clients.
    for _ in 0..2 {
        let (code, body, err) = curl(&s, &ca, NAMES[0]).await;
        assert_eq!((code, body.as_str()), (0, "hello over TLS\n"), "{err}");
    }
    let first_a = s.until("first use under wildcard");
    assert_eq!(python(&s, &ca, NAMES[1]).await, "200 hello over TLS");
    let lines = s.until_lines("first use under wildcard");
    // One first-use line per name: the second request to the first name wrote none
    // (its line would have come before the second name's).
    assert!(
        !lines[..lines.len() - 1]
            .iter()
            .any(|l| l.contains("first use under wildcard")),
        "{lines:#?}"
    );
    for (line, name) in [(&first_a, NAMES[0]), (lines.last().unwrap(), NAMES[1])] {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let f = &v["fields"];
        assert_eq!(f["name"], name, "{line}");
        assert_eq!(f["rule"], "*.blob.test", "{line}");
        assert_eq!(f["port"], 443, "{line}");
        assert!(
            f["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        assert!(
            f["rule_source"].as_str().unwrap().contains("[[allow]] #1"),
            "{line}"
        );
    }
    let rows = allowed(&s, "").await;
    assert_eq!(
        rows,
        [
            (NAMES[1].to_owned(), 443, "*.blob.test".to_owned(), 1),
            (NAMES[0].to_owned(), 443, "*.blob.test".to_owned(), 2),
        ]
    );
    assert_eq!(allowed(&s, "?rule=%2A.blob.test&limit=1").await.len(), 1);
    assert!(allowed(&s, "?rule=*.other.test").await.is_empty());
    let metrics = get(s.admin, "/metrics", None).await.1;
    assert!(
        metrics.contains("aml_egress_wildcard_names{rule=\"*.blob.test\"} 2"),
        "{metrics}"
    );

    // The operator's view: `allowed` prints the same rows.
    let admin = format!("http://{}", s.admin);
    let (code, table) = cli(&["allowed", "--admin", &admin]);
    assert_eq!(code, 0, "{table}");
    // Rows by last seen (to the second), then by name: both here in the same second.
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert!(
        rows.contains(&vec!["2", "acct1.blob.test:443", "*.blob.test"]),
        "{table}"
    );
    assert!(
        rows.contains(&vec!["1", "acct2.blob.test:443", "*.blob.test"]),
        "{table}"
    );
    assert_eq!(rows.len(), 2, "{table}");

    // Narrow to what was seen with `suggest --narrow`'s table (a reload); then a new name
    // is refused and the two pass.
    let (code, narrow) = cli(&["suggest", "--narrow", "--admin", &admin]);
    assert_eq!(code, 0, "{narrow}");
    assert!(
        narrow.contains("[catalog.narrow]") && narrow.contains("\"*.blob.test\" = ["),
        "{narrow}"
    );
    assert!(!narrow.contains(NAMES[2]), "{narrow}");
    std::fs::write(&cfg.0, config(tls, &narrow)).unwrap();
    s.until("configuration reloaded");
    let (code, _, err) = curl(&s, &ca, NAMES[2]).await;
    assert_ne!(code, 0, "a name outside the narrowed list got through");
    assert!(err.contains("403"), "{err}");
    let out = python(&s, &ca, NAMES[2]).await;
    assert!(
        out.starts_with("ProxyError") && out.contains("403"),
        "{out}"
    );
    let (code, body, err) = curl(&s, &ca, NAMES[0]).await;
    assert_eq!((code, body.as_str()), (0, "hello over TLS\n"), "{err}");
    assert_eq!(python(&s, &ca, NAMES[1]).await, "200 hello over TLS");
    let metrics = get(s.admin, "/metrics", None).await.1;
    assert!(
        metrics.contains("aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"default\",reason=\"wildcard_narrowed\"} 2"),
        "{metrics}"
    );
    // /denied says how to let it through.
    let denied = get(s.admin, "/denied", None).await.1;
    assert!(
        denied.contains("attacker.blob.test") && denied.contains("[catalog.narrow]"),
        "{denied}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_names_under_a_wildcard_keeps_allowed_within_its_bound() {
    // Each name costs one CONNECT: the decision records it before the dial, which fails at
    // once on a resolver that knows no name.
    let dns = support::dns::responder(&[]).await;
    let cfg = TempFile::new(
        "flood.toml",
        &format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[metrics]\nmax_allowed_names = 50\n[log]\ndenied_lines_per_minute = 1\n[[allow]]\nhost = \"*.flood.test\"\nports = [443]\n[upstream]\nname_servers = [\"{}\"]\n",
            dns.addr
        ),
    );
    let s = Serving::start(&cfg);
    let proxy: std::net::SocketAddr = s.proxy.trim_start_matches("http://").parse().unwrap();
    for i in 0..400 {
        let (_, resp) = support::net::exchange(
            proxy,
            &format!("CONNECT n{i}.flood.test:443 HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    }
    let rows = allowed(&s, "").await;
    assert_eq!(rows.len(), 50);
    assert_eq!(rows[0].0, "n399.flood.test");
    assert_eq!(rows[49].0, "n350.flood.test");
    let metrics = get(s.admin, "/metrics", None).await.1;
    assert!(
        metrics.contains("aml_egress_wildcard_names{rule=\"*.flood.test\"} 50"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aml_egress_allowed_names_evicted_total 350"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_audit_mode_a_narrowed_name_passes_as_would_deny() {
    let echo = support::net::echo_upstream().await;
    let p = support::proxy::start_proxy(&format!(
        "[proxy]\nmode = \"audit\"\ntls_ports = []\nopaque_ports = [443]\n[[allow]]\nhost = \"*.blob.test\"\nports = [443]\n[catalog.narrow]\n\"*.blob.test\" = [\"acct1.blob.test\"]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"other.blob.test:443\" = \"{echo}\" }}\n"
    ))
    .await;
    let (_s, resp) =
        support::net::exchange(p.addr, "CONNECT other.blob.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let series = "aml_egress_decisions_total{decision=\"would_deny\",listener=\"connect\",policy=\"default\",reason=\"wildcard_narrowed\"}";
    assert_eq!(p.sample(series).await, 1.0);
    // Not an allow under the wildcard: nothing is recorded for it.
    let (_, body) = get(p.admin_addr, "/allowed", None).await;
    assert!(!body.contains("other.blob.test"), "{body}");
}

#[test]
fn check_and_catalog_show_the_narrowing_and_the_nameless_refusal() {
    let tags = TempFile::new(
        "ServiceTags.json",
        r#"{"changeNumber":1,"cloud":"Public","values":[
  {"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{"region":"westeurope","addressPrefixes":["20.1.0.0/16"]}}]}"#,
    );
    let cfg = TempFile::new(
        "narrow.toml",
        &format!(
            "[catalog]\nregion = \"westeurope\"\nstorage_account = \"amlstore\"\nservice_tags_file = {:?}\n[catalog.narrow]\n\"*.blob.core.windows.net\" = [\"mlbatchprod7.blob.core.windows.net\"]\n",
            tags.0
        ),
    );
    let config = cfg.0.to_str().unwrap();
    let (code, out) = cli(&[
        "check",
        "--config",
        config,
        "amlstore.blob.core.windows.net:443",
        "mlbatchprod7.blob.core.windows.net:443",
    ]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&[
        "check",
        "--json",
        "--config",
        config,
        "attacker.blob.core.windows.net:443",
        "20.1.2.3:443",
        "https://20.1.2.3",
    ]);
    assert_eq!(code, 1, "{out}");
    let reasons: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"].to_string())
        .collect();
    assert_eq!(
        reasons,
        [
            "\"wildcard_narrowed\"",
            "\"service_tag_without_name\"",
            "\"service_tag_without_name\""
        ],
        "{out}"
    );
    let (code, out) = cli(&["catalog", "--config", config]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("allow *.blob.core.windows.net")
                && l.contains("narrowed to mlbatchprod7.blob.core.windows.net")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("20.1.0.0/16") && l.contains("not on TLS port 443")),
        "{out}"
    );
    // A key no rule has, and a name its wildcard does not match: one error each.
    let bad = TempFile::new(
        "bad.toml",
        "[catalog.narrow]\n\"*.blob.core.windows.nt\" = [\"a.blob.core.windows.net\"]\n\"*.queue.core.windows.net\" = [\"a.blob.core.windows.net\"]\n",
    );
    let (code, out) = cli(&["check", "--config", bad.0.to_str().unwrap(), "x:443"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("2 problems"), "{out}");
    assert!(
        out.contains("*.blob.core.windows.nt matches no allow rule")
            && out.contains("did you mean *.blob.core.windows.net"),
        "{out}"
    );
    assert!(
        out.contains("*.queue.core.windows.net does not match a.blob.core.windows.net"),
        "{out}"
    );
}
