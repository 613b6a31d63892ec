//! The admin client commands against a fleet: `allowed`, `denied` and `suggest` (plain and
//! `--narrow`) run as an operator runs them, with `--admin` once per instance, against two
//! loopback stand-ins for admin listeners that serve fixed `/allowed` and `/denied` lists
//! and, like the real one, answer 401 without the bearer token.

mod support;

use std::process::Output;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use support::TempFile;
use support::net::{read_request_head, upstream};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const BLOB: &str = "*.blob.core.windows.net";

/// A stand-in admin listener: its address, and the request heads it was sent.
struct Instance {
    admin: String,
    heads: Arc<Mutex<Vec<String>>>,
}

fn allowed_row(name: &str, port: u16, rule: &str, count: u64, first: &str, last: &str) -> Value {
    json!({
        "name": name, "port": port, "rule": rule,
        "rule_source": if rule == BLOB { "catalog 2026-03 public: Azure Machine Learning storage" } else { "config.toml:12" },
        "count": count, "first_seen": first, "last_seen": last,
    })
}

fn denied_row(target: &str, count: u64, first: &str, last: &str) -> Value {
    let (host, port) = target.rsplit_once(':').unwrap();
    json!({
        "target": target, "host": host, "port": port.parse::<u16>().unwrap(),
        "count": count, "first_seen": first, "last_seen": last,
        "allow_entry": format!("[[allow]]\nhost = \"{host}\"\nports = [{port}]"),
    })
}

/// Serves `allowed` (filtered by `?rule=`, which must arrive percent-encoded) and `denied`
/// (as the text given, so that a byte-for-byte copy can be checked), each only with the
/// token.
async fn instance(allowed: Vec<Value>, denied: String) -> Instance {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    let addr = upstream(move |mut s| {
        let (allowed, denied, seen) = (allowed.clone(), denied.clone(), seen.clone());
        async move {
            let Some(head) = read_request_head(&mut s).await else {
                return;
            };
            seen.lock().unwrap().push(head.clone());
            let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
            let (path, query) = target.split_once('?').unwrap_or((&target, ""));
            let authorised = head
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}")));
            let (status, body) = if !authorised {
                ("401 Unauthorized", "send Authorization: Bearer <token>\n".to_owned())
            } else if path == "/denied" {
                ("200 OK", denied)
            } else if path == "/allowed" {
                let rule = query.split('&').find_map(|kv| kv.strip_prefix("rule="));
                let rows: Vec<&Value> = allowed
                    .iter()
                    .filter(|r| match rule {
                        None => true,
                        Some("%2A.blob.core.windows.net") => r["rule"] == BLOB,
                        Some(_) => false,
                    })
                    .collect();
                ("200 OK", serde_json::to_string_pretty(&rows).unwrap() + "\n")
            } else {
                ("404 Not Found", "no such endpoint\n".to_owned())
            };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    Instance {
        admin: format!("http://{addr}"),
        heads,
    }
}

/// Two instances behind one load balancer: both let acct1 through, each another name.
async fn fleet() -> (Instance, Instance) {
    let a = instance(
        vec![
            allowed_row(
                "acct1.blob.core.windows.net",
                443,
                BLOB,
                7,
                "2026-11-01T10:00:00Z",
                "2026-11-02T12:00:00Z",
            ),
            allowed_row(
                "pkgs.example.org",
                443,
                ".example.org",
                2,
                "2026-11-01T00:00:00Z",
                "2026-11-03T08:00:00Z",
            ),
        ],
        serde_json::to_string_pretty(&[
            denied_row(
                "x.example.net:443",
                4,
                "2026-11-02T00:00:00Z",
                "2026-11-04T00:00:00Z",
            ),
            denied_row(
                "y.example.net:443",
                3,
                "2026-11-01T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ),
        ])
        .unwrap()
            + "\n",
    )
    .await;
    let b = instance(
        vec![
            allowed_row(
                "acct1.blob.core.windows.net",
                443,
                BLOB,
                3,
                "2026-10-31T23:00:00Z",
                "2026-11-03T11:00:00Z",
            ),
            allowed_row(
                "acct2.blob.core.windows.net",
                443,
                BLOB,
                5,
                "2026-11-02T08:00:00Z",
                "2026-11-03T09:00:00Z",
            ),
            allowed_row(
                "acct2.blob.core.windows.net",
                8787,
                BLOB,
                1,
                "2026-11-02T09:00:00Z",
                "2026-11-02T09:00:00Z",
            ),
        ],
        serde_json::to_string_pretty(&[
            denied_row(
                "y.example.net:443",
                2,
                "2026-10-30T00:00:00Z",
                "2026-11-05T00:00:00Z",
            ),
            denied_row(
                "z.example.net:80",
                1,
                "2026-11-01T00:00:00Z",
                "2026-11-01T00:00:00Z",
            ),
        ])
        .unwrap()
            + "\n",
    )
    .await;
    (a, b)
}

/// The binary, without the developer's own `AML_EGRESS__*` overrides.
fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AML_EGRESS__") {
            c.env_remove(k);
        }
    }
    c
}

/// The binary with `args`, run off the runtime that serves the instances.
async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || bin().args(args).output().unwrap())
        .await
        .unwrap()
}

fn args(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_merges_the_instances_into_one_table() {
    let (a, b) = fleet().await;
    let token = TempFile::new("token", &format!("{TOKEN}\n"));
    let tf = token.0.to_str().unwrap();
    let both = [
        "allowed",
        "--admin",
        &a.admin,
        "--admin",
        &b.admin,
        "--token-file",
        tf,
    ];

    let table = stdout(&run(args(&both)).await);
    assert_eq!(
        table,
        "   COUNT  NAME:PORT                         RULE                     LAST SEEN             FIRST SEEN\n\
         \x20     10  acct1.blob.core.windows.net:443   *.blob.core.windows.net  2026-11-03T11:00:00Z  2026-10-31T23:00:00Z\n\
         \x20      5  acct2.blob.core.windows.net:443   *.blob.core.windows.net  2026-11-03T09:00:00Z  2026-11-02T08:00:00Z\n\
         \x20      2  pkgs.example.org:443              .example.org             2026-11-03T08:00:00Z  2026-11-01T00:00:00Z\n\
         \x20      1  acct2.blob.core.windows.net:8787  *.blob.core.windows.net  2026-11-02T09:00:00Z  2026-11-02T09:00:00Z\n"
    );

    // One rule: asked for percent-encoded, and only its names shown.
    let mut one_rule = args(&both);
    one_rule.extend(args(&["--rule", BLOB]));
    let table = stdout(&run(one_rule.clone()).await);
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(!table.contains("pkgs.example.org"), "{table}");
    for i in [&a, &b] {
        let heads = i.heads.lock().unwrap();
        let last = heads.last().unwrap();
        assert!(
            last.starts_with(
                "GET /allowed?limit=1000000&rule=%2A.blob.core.windows.net HTTP/1.1\r\n"
            ),
            "{last}"
        );
    }

    // JSON: the merged rows in /allowed's shape.
    one_rule.push("--json".into());
    let rows: Vec<Value> = serde_json::from_str(&stdout(&run(one_rule).await)).unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0],
        json!({
            "name": "acct1.blob.core.windows.net", "port": 443, "rule": BLOB,
            "rule_source": "catalog 2026-03 public: Azure Machine Learning storage",
            "count": 10, "first_seen": "2026-10-31T23:00:00Z", "last_seen": "2026-11-03T11:00:00Z",
        })
    );

    // A rule nothing was allowed under.
    let table = stdout(
        &run(args(&[
            "allowed",
            "--admin",
            &a.admin,
            "--token-file",
            tf,
            "--rule",
            "*.dfs.core.windows.net",
        ]))
        .await,
    );
    assert!(
        table.ends_with("\n(nothing allowed under *.dfs.core.windows.net yet)\n"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_be_asked_is_named_and_nothing_is_printed() {
    let (a, b) = fleet().await;
    let token = TempFile::new("token", TOKEN);
    let tf = token.0.to_str().unwrap();
    // Without the token: the instances say so, and the command says what to pass.
    let out = run(args(&["allowed", "--admin", &a.admin, "--admin", &b.admin])).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(a.admin.trim_start_matches("http://")), "{err}");
    assert!(err.contains("--token-file"), "{err}");
    assert!(out.stdout.is_empty());
    // Nothing listening at the second address: named, exit 2, for every command.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    for command in [
        &["allowed"][..],
        &["denied"],
        &["suggest"],
        &["suggest", "--narrow"],
    ] {
        let mut words = args(command);
        words.extend(args(&[
            "--admin",
            &a.admin,
            "--admin",
            &gone,
            "--token-file",
            tf,
        ]));
        let out = run(words).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {err}");
        assert!(
            err.contains(&format!("cannot connect to the admin listener {gone}")),
            "{command:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "{command:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_merges_the_instances_and_prints_one_as_before() {
    let (a, b) = fleet().await;
    let token = TempFile::new("token", TOKEN);
    let tf = token.0.to_str().unwrap();
    let table = stdout(
        &run(args(&[
            "denied",
            "--admin",
            &a.admin,
            "--admin",
            &b.admin,
            "--token-file",
            tf,
        ]))
        .await,
    );
    assert_eq!(
        table,
        "   COUNT  TARGET             LAST SEEN             FIRST SEEN            TO ALLOW\n\
         \x20      5  y.example.net:443  2026-11-05T00:00:00Z  2026-10-30T00:00:00Z  [[allow]] host = \"y.example.net\" ports = [443]\n\
         \x20      4  x.example.net:443  2026-11-04T00:00:00Z  2026-11-02T00:00:00Z  [[allow]] host = \"x.example.net\" ports = [443]\n\
         \x20      1  z.example.net:80   2026-11-01T00:00:00Z  2026-11-01T00:00:00Z  [[allow]] host = \"z.example.net\" ports = [80]\n"
    );
    let merged: Vec<Value> = serde_json::from_str(&stdout(
        &run(args(&[
            "denied",
            "--admin",
            &a.admin,
            "--admin",
            &b.admin,
            "--token-file",
            tf,
            "--json",
            "--limit",
            "2",
        ]))
        .await,
    ))
    .unwrap();
    let shown: Vec<(&str, u64)> = merged
        .iter()
        .map(|r| (r["target"].as_str().unwrap(), r["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(shown, [("y.example.net:443", 5), ("x.example.net:443", 4)]);
    // One instance: its JSON exactly as served.
    let one = run(args(&[
        "denied",
        "--admin",
        &a.admin,
        "--token-file",
        tf,
        "--json",
    ]))
    .await;
    let served = serde_json::to_string_pretty(&[
        denied_row(
            "x.example.net:443",
            4,
            "2026-11-02T00:00:00Z",
            "2026-11-04T00:00:00Z",
        ),
        denied_row(
            "y.example.net:443",
            3,
            "2026-11-01T00:00:00Z",
            "2026-11-01T00:00:00Z",
        ),
    ])
    .unwrap()
        + "\n";
    assert_eq!(stdout(&one), served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suggest_narrow_lists_the_fleets_names_under_each_wildcard() {
    let (a, b) = fleet().await;
    let token = TempFile::new("token", TOKEN);
    let tf = token.0.to_str().unwrap();
    let text = stdout(
        &run(args(&[
            "suggest",
            "--narrow",
            "--admin",
            &a.admin,
            "--admin",
            &b.admin,
            "--token-file",
            tf,
        ]))
        .await,
    );
    let table = &text[text.find("\n[catalog.narrow]\n").expect("a table")..];
    assert_eq!(
        table,
        r#"
[catalog.narrow]

# rule: catalog 2026-03 public: Azure Machine Learning storage
"*.blob.core.windows.net" = [
    "acct1.blob.core.windows.net",  # 10 allowed, first 2026-10-31T23:00:00Z, last 2026-11-03T11:00:00Z
    "acct2.blob.core.windows.net",  # 6 allowed, ports 443, 8787, first 2026-11-02T08:00:00Z, last 2026-11-03T09:00:00Z
]

# rule: config.toml:12
".example.org" = [
    "pkgs.example.org",  # 2 allowed, first 2026-11-01T00:00:00Z, last 2026-11-03T08:00:00Z
]
"#
    );
    assert!(text.contains("wildcard_narrowed"), "{text}");
    // It is TOML, and the same every time.
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(
        parsed["catalog"]["narrow"][BLOB].as_array().unwrap().len(),
        2
    );
    let again = run(args(&[
        "suggest",
        "--narrow",
        "--admin",
        &a.admin,
        "--admin",
        &b.admin,
        "--token-file",
        tf,
    ]))
    .await;
    assert_eq!(stdout(&again), text);
}

#[test]
fn suggest_narrow_reads_the_first_use_lines_of_log_files() {
    let line = |at: &str, name: &str, port: u16| {
        json!({
            "timestamp": at, "level": "INFO",
            "fields": {
                "message": "first use under wildcard", "name": name, "port": port,
                "rule": BLOB, "rule_source": "catalog 2026-03 public: storage",
                "client": "10.0.0.5:40000", "listener": "forward",
            },
            "target": "aml_egress::proxy",
        })
        .to_string()
    };
    // Two instances' logs: acct1's first use logged by both.
    let one = TempFile::new(
        "a.log",
        &[
            line("2026-11-20T10:00:00.000000Z", "acct1.blob.core.windows.net", 443),
            r#"{"timestamp":"2026-11-20T10:00:01.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"connect","client":"10.0.1.4:50000","target":"a.data.example.com:443","seen":"","decision":"deny","reason":"no_matching_rule","rule":"","mode":"enforce"},"target":"aml_egress::proxy"}"#.to_owned(),
        ]
        .join("\n"),
    );
    let two = TempFile::new(
        "b.log",
        &[
            line(
                "2026-11-21T09:00:00.000000Z",
                "acct1.blob.core.windows.net",
                443,
            ),
            line(
                "2026-11-21T09:05:00.000000Z",
                "acct2.blob.core.windows.net",
                443,
            ),
        ]
        .join("\n"),
    );
    let out = bin()
        .args(["suggest", "--narrow", "--log"])
        .arg(&one.0)
        .arg("--log")
        .arg(&two.0)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.ends_with(
            "\n\"*.blob.core.windows.net\" = [\n\
             \x20   \"acct1.blob.core.windows.net\",  # first use logged 2 times, first 2026-11-20T10:00:00.000000Z, last 2026-11-21T09:00:00.000000Z\n\
             \x20   \"acct2.blob.core.windows.net\",  # first use logged once, first 2026-11-21T09:05:00.000000Z, last 2026-11-21T09:05:00.000000Z\n\
             ]\n"
        ),
        "{text}"
    );
    assert!(!text.contains("data.example.com"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_suggest_learns_from_every_instances_denials() {
    let (a, b) = fleet().await;
    let token = TempFile::new("token", TOKEN);
    let tf = token.0.to_str().unwrap();
    let text = stdout(
        &run(args(&[
            "suggest",
            "--admin",
            &a.admin,
            "--admin",
            &b.admin,
            "--token-file",
            tf,
            "--collapse",
            "0",
        ]))
        .await,
    );
    assert!(
        text.contains(
            "\n# 5 refusals, first 2026-10-30T00:00:00Z, last 2026-11-05T00:00:00Z\n[[allow]]\nhost = \"y.example.net\"\nports = [443]\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("host = \"z.example.net\"\nports = [80]"),
        "{text}"
    );
}
