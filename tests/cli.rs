//! The offline commands as an operator runs them: real binary, real files, exit codes.

mod support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use support::TempFile;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_aml-egress"));
    // The developer's own overrides must not leak into the tests.
    for (k, _) in std::env::vars() {
        if k.starts_with("AML_EGRESS__") {
            c.env_remove(k);
        }
    }
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_prints_one_line_per_target_and_exits_1_on_any_denial() {
    let out = run(&["check", "pytorch.org:443", "notpytorch.org:443"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with("allow pytorch.org:443 pytorch.org"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(
            "deny notpytorch.org:443 no rule matches (nearest: pytorch.org, *.pytorch.org"
        ),
        "{stdout}"
    );
}

#[test]
fn check_exits_0_when_all_allowed_and_reads_stdin() {
    let mut child = bin()
        .args(["check"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"# comment\nml.azure.com:443\n\nLOGIN.microsoftonline.com.:443\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert_eq!(text(&out.stdout).lines().count(), 2);
}

#[test]
fn check_json_is_one_object_per_line_with_rule_and_source() {
    let out = run(&["check", "--json", "pypi.org:443", "pypi.org:22"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let v: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v[0]["decision"], "allow");
    assert_eq!(v[0]["rule"], "pypi.org");
    assert_eq!(v[0]["source"]["origin"], "catalog");
    assert_eq!(v[1]["decision"], "deny");
    assert_eq!(v[1]["reason"], "port_not_allowed");
}

#[test]
fn check_with_a_bad_config_exits_2_and_names_file_key_and_fix() {
    let cfg = TempFile::new("bad.toml", "[catalog]\nregoin = \"westus\"\n");
    let out = run(&["check", "--config", cfg.0.to_str().unwrap(), "pypi.org:443"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains(cfg.0.to_str().unwrap()), "{err}");
    assert!(err.contains("catalog.regoin"), "{err}");
    assert!(err.contains("did you mean region?"), "{err}");
}

#[test]
fn validate_summarises_a_good_file_and_refuses_a_bad_one() {
    let good = TempFile::new(
        "good.toml",
        r#"
[catalog]
cloud = "public"
region = "westeurope"
storage_account = "amlstore"
features = ["hbi_workspace", "vscode"]
[[allow]]
host = "*.contoso.com"
ports = [443]
[[deny]]
host = "bad.anaconda.com"
"#,
    );
    let out = run(&["validate", "--config", good.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("1 deny"), "{stdout}");
    assert!(stdout.contains("warnings:"), "{stdout}");

    let bad = TempFile::new(
        "bad.toml",
        "[catalog]\ncloud = \"usgov\"\nregion = \"westus\"\nfeatures = [\"vscod\"]\n[[allow]]\nhost = \"a.*.com\"\nports = [443]\n",
    );
    let out = run(&["validate", "--config", bad.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("catalog.region = \"westus\""), "{err}");
    assert!(err.contains("usgov"), "{err}");
    assert!(err.contains("allow[1].host"), "{err}");
}

#[test]
fn a_misspelt_feature_gets_the_list_of_valid_names() {
    let bad = TempFile::new("f.toml", "[catalog]\nfeatures = [\"vscod\"]\n");
    let out = run(&["validate", "--config", bad.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("catalog.features = \"vscod\""), "{err}");
    assert!(err.contains("did you mean vscode?"), "{err}");
    assert!(err.contains("valid names: all,"), "{err}");
    assert!(err.contains("hbi_workspace"), "{err}");
}

#[test]
fn environment_overrides_scalars_and_lists_and_is_named_in_errors() {
    let out = bin()
        .args([
            "check",
            "amlstore.blob.core.windows.net:443",
            "x.vault.azure.net:443",
        ])
        .env("AML_EGRESS__CATALOG__STORAGE_ACCOUNT", "amlstore")
        .env("AML_EGRESS__CATALOG__FEATURES", "hbi_workspace,vscode")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    let out = bin()
        .args(["check", "pypi.org:443"])
        .env("AML_EGRESS__CATALOG__REGION", "westuss")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("environment variable AML_EGRESS__CATALOG__REGION"),
        "{err}"
    );
    assert!(err.contains("did you mean westus"), "{err}");
}

#[test]
fn catalog_prints_every_rule_with_its_source_and_lists_features() {
    let cfg = TempFile::new(
        "c.toml",
        "[catalog]\ncloud = \"china\"\nstorage_account = \"amlstore\"\nregion = \"chinaeast2\"\n",
    );
    let out = run(&["catalog", "--config", cfg.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("amlstore.blob.core.chinacloudapi.cn"),
        "{stdout}"
    );
    assert!(stdout.contains("catalog 2026-03 china"), "{stdout}");
    assert!(
        !stdout.contains("windows.net "),
        "public hosts in the china catalog:\n{stdout}"
    );

    let out = run(&[
        "catalog",
        "--config",
        cfg.0.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cloud"], "china");
    assert!(v["rules"].as_array().unwrap().len() > 10);
    assert!(!v["not_enforced"].as_array().unwrap().is_empty());

    let out = run(&["catalog", "--features"]);
    let stdout = text(&out.stdout);
    for f in [
        "hbi_workspace",
        "vscode",
        "r_packages",
        "aks",
        "arc_training",
        "arc_inference",
    ] {
        assert!(stdout.contains(f), "{f} missing:\n{stdout}");
    }
}

#[test]
fn catalog_file_replaces_the_embedded_catalog() {
    let file = TempFile::new(
        "cat.toml",
        r#"
format = 1
revision = "2030-01"
article = "test"
article_date = "2030-01-01"
[[rule]]
section = "Test"
purpose = "Only host"
clouds = ["public"]
kind = "host"
patterns = ["only.example.com"]
protocol = "tcp"
ports = [443]
"#,
    );
    let cfg = TempFile::new(
        "c.toml",
        &format!("[catalog]\nfile = {:?}\n", file.0.to_str().unwrap()),
    );
    let out = run(&[
        "check",
        "--config",
        cfg.0.to_str().unwrap(),
        "only.example.com:443",
        "pypi.org:443",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.starts_with("allow only.example.com:443"), "{stdout}");

    let broken = TempFile::new("broken.toml", "format = 1\nrevision = 3\n");
    let cfg = TempFile::new(
        "c2.toml",
        &format!("[catalog]\nfile = {:?}\n", broken.0.to_str().unwrap()),
    );
    let out = run(&["validate", "--config", cfg.0.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("catalog.file"), "{err}");
    assert!(err.contains(broken.0.to_str().unwrap()), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["check", "--bogus"]).status.code(), Some(2));
    assert_eq!(run(&["validate"]).status.code(), Some(2));
}

/// `check` ends a URL's authority at the first `/`, `?` or `#`, as the proxy does, so a
/// `?@host` in the query does not turn the allowed authority into userinfo; a real
/// `user@host` authority is still refused.
#[test]
fn check_splits_a_url_where_the_proxy_does() {
    let cfg = TempFile::new(
        "c.toml",
        "[[allow]]\nhost = \"allowed.example\"\nports = [8080]\n",
    );
    let out = run(&[
        "check",
        "--config",
        cfg.0.to_str().unwrap(),
        "http://allowed.example:8080?@evil.example/",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("allow http://allowed.example:8080?@evil.example/ allowed.example"),
        "{stdout}"
    );

    let out = run(&[
        "check",
        "--json",
        "--config",
        cfg.0.to_str().unwrap(),
        "http://allowed.example:8080@evil.example/",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["reason"], "invalid_target", "{stdout}");
}

#[test]
fn catalog_diff_shows_what_a_newer_revision_changes() {
    let out = bin()
        .args(["catalog", "diff", "2021-11", "2026-03"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "they differ");
    let t = text(&out.stdout);
    assert!(
        t.contains("~ AzureMachineLearning tcp 443 -> AzureMachineLearning tcp 443,8787,18881"),
        "{t}"
    );
    assert!(t.contains("+ BatchNodeManagement.<region> tcp 443"), "{t}");
    let cfg = TempFile::new("diff.toml", "[catalog]\nregion = \"westeurope\"\n");
    let out = bin()
        .args([
            "catalog", "diff", "2021-11", "2026-03", "--format", "json", "--config",
        ])
        .arg(&cfg.0)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let added = v["added"].as_array().unwrap();
    assert!(
        added
            .iter()
            .any(|r| r["pattern"] == "BatchNodeManagement.westeurope"),
        "placeholders filled from the config: {v}"
    );
    let out = bin()
        .args(["catalog", "diff", "2026-03", "2026-03"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = bin()
        .args(["catalog", "diff", "2026-03", "1999-01"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("1999-01"));
}

/// Log lines as the proxy writes them in audit mode (JSON, one per refusal).
const AUDIT_LOG: &str = r#"{"timestamp":"2026-11-20T10:00:00.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"connect","client":"10.0.1.4:50000","target":"a.data.example.com:443","seen":"","decision":"would_deny","reason":"no_matching_rule","rule":"","mode":"audit"},"target":"aml_egress::proxy::admit"}
{"timestamp":"2026-11-20T10:00:01.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"connect","client":"10.0.1.4:50001","target":"b.data.example.com:443","seen":"","decision":"would_deny","reason":"no_matching_rule","rule":"","mode":"audit"},"target":"aml_egress::proxy::admit"}
{"timestamp":"2026-11-20T10:00:02.000000Z","level":"INFO","fields":{"message":"tunnel closed","listener":"connect","target":"pypi.org:443"},"target":"aml_egress::proxy::tunnel"}
{"timestamp":"2026-11-21T09:00:00.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"connect","client":"10.0.1.5:50002","target":"c.data.example.com:8443 (inside CONNECT c.data.example.com:8443)","seen":"c.data.example.com:8443","decision":"would_deny","reason":"sni_not_allowed","rule":"","mode":"audit"},"target":"aml_egress::proxy::admit"}
{"timestamp":"2026-11-21T09:30:00.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"http","client":"10.0.1.5:50003","target":"mirror.example.org:80/simple/","seen":"","decision":"would_deny","reason":"no_matching_rule","rule":"","mode":"audit"},"target":"aml_egress::proxy::admit"}
{"timestamp":"2026-11-21T09:32:00.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"http","client":"10.0.1.5:50005","target":"archive.ubuntu.com:80/ubuntu/dists/","seen":"","decision":"would_deny","reason":"no_matching_rule","rule":"","mode":"audit"},"target":"aml_egress::proxy::admit"}
{"timestamp":"2026-11-21T09:31:00.000000Z","level":"WARN","fields":{"message":"destination denied","listener":"connect","client":"10.0.1.5:50004","target":"203.0.113.5:443","seen":"","decision":"would_deny","reason":"no_matching_rule","rule":"","mode":"audit"},"target":"aml_egress::proxy::admit"}
not json at all
"#;

#[test]
fn suggest_learns_entries_that_then_allow_every_recorded_target() {
    let log = TempFile::new("audit.log", AUDIT_LOG);
    let out = bin()
        .args(["suggest", "--collapse", "3", "--cidrs", "--log"])
        .arg(&log.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let suggested = text(&out.stdout);
    assert!(
        suggested.contains("host = \"*.data.example.com\"\nports = [443, 8443]"),
        "{suggested}"
    );
    assert!(
        suggested.contains("scope: every name under data.example.com"),
        "{suggested}"
    );
    assert!(
        suggested.contains("host = \"mirror.example.org\"\nports = [80]"),
        "{suggested}"
    );
    assert!(
        suggested.contains("cidr = \"203.0.113.5/32\""),
        "{suggested}"
    );
    assert!(
        suggested.contains("first 2026-11-20T10:00:00"),
        "{suggested}"
    );
    // Deterministic.
    let again = bin()
        .args(["suggest", "--collapse", "3", "--cidrs", "--log"])
        .arg(&log.0)
        .output()
        .unwrap();
    assert_eq!(text(&again.stdout), suggested);
    // With the suggestion as configuration, every recorded target is allowed.
    let cfg = TempFile::new("learnt.toml", &suggested);
    let out = bin()
        .args(["check", "--config"])
        .arg(&cfg.0)
        .args([
            "a.data.example.com:443",
            "b.data.example.com:443",
            "c.data.example.com:8443",
            "http://mirror.example.org/simple/",
            "203.0.113.5:443",
            "archive.ubuntu.com:80",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // Below the collapse threshold, names stay exact; without --cidrs, IPs are left out.
    let out = bin()
        .args(["suggest", "--collapse", "4", "--log"])
        .arg(&log.0)
        .output()
        .unwrap();
    let exact = text(&out.stdout);
    assert!(
        exact.contains("host = \"a.data.example.com\"") && !exact.contains("*."),
        "{exact}"
    );
    assert!(
        exact.contains("IP destinations left out") && !exact.contains("cidr ="),
        "{exact}"
    );
}

/// `serve` on the embedded defaults, listening on `addr`, without an admin listener.
fn serve_on(addr: &str) -> Command {
    let mut c = bin();
    c.args(["serve"])
        .env("AML_EGRESS__PROXY__LISTEN", addr)
        // A port of the kernel's choosing: an empty value does not turn the admin listener
        // off (empty variables are ignored), and the default 9464 may be held by another run.
        .env("AML_EGRESS__ADMIN__LISTEN", "127.0.0.1:0");
    c
}

#[test]
fn serve_on_a_port_another_program_holds_names_the_key_and_exits_2() {
    // A plain socket, without SO_REUSEPORT: the proxy's workers cannot join it.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap();
    let out = serve_on(&addr.to_string()).output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen on proxy.listen {addr}")),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_second_proxy_on_the_port_of_a_running_one_is_refused() {
    // The workers share their port with SO_REUSEPORT; another process must not join them.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut first = serve_on(&addr).stderr(Stdio::null()).spawn().unwrap();
    // Serving once it accepts (bounded: 10 s).
    let serving = (0..1000).any(|_| {
        let up = std::net::TcpStream::connect(&addr).is_ok();
        if !up {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        up
    });
    let mut second = serve_on(&addr).stderr(Stdio::piped()).spawn().unwrap();
    // It must exit at once; one that joined the port would serve on (bounded: 10 s).
    let exited = (0..1000).find_map(|_| {
        let done = second.try_wait().unwrap();
        if done.is_none() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        done
    });
    let _ = second.kill();
    let second = second.wait_with_output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    assert!(serving, "the first proxy never accepted on {addr}");
    let err = text(&second.stderr);
    assert_eq!(exited.and_then(|s| s.code()), Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen on proxy.listen {addr}")),
        "{err}"
    );
}

/// The standard error of `serve` on the embedded defaults (ports chosen by the kernel, log
/// level `level`) up to the line that says it serves; the proxy is stopped after.
fn serve_defaults_log(level: &str) -> Vec<String> {
    use std::io::BufRead;
    let mut child = bin()
        .args(["serve"])
        .env("AML_EGRESS__PROXY__LISTEN", "127.0.0.1:0")
        .env("AML_EGRESS__ADMIN__LISTEN", "127.0.0.1:0")
        .env("AML_EGRESS__LOG__LEVEL", level)
        .env_remove("AML_EGRESS_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // Bounded: 20 s for the proxy to say it serves, or to exit.
    while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(20)) {
        let serving = line.contains("aml-egress serving");
        lines.push(line);
        if serving {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.contains("aml-egress serving")),
        "serve did not start:\n{}",
        lines.join("\n")
    );
    lines
}

/// On the embedded defaults the catalog entries that need a region or a storage account are
/// left out: one WARN line says how many and which settings would add them, the entries
/// themselves are logged at debug (and listed by `validate` and `catalog`).
#[test]
fn serve_on_the_defaults_warns_once_about_the_entries_left_out() {
    let lines = serve_defaults_log("info");
    let warn: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"level\":\"WARN\""))
        .collect();
    assert_eq!(warn.len(), 1, "{}", lines.join("\n"));
    for words in [
        "7 catalog entries",
        "catalog.region",
        "catalog.storage_account",
    ] {
        assert!(warn[0].contains(words), "{words}: {}", warn[0]);
    }

    let lines = serve_defaults_log("debug");
    let entries = lines
        .iter()
        .filter(|l| l.contains("\"level\":\"DEBUG\"") && l.contains("\"note\":\"left out "))
        .count();
    assert_eq!(entries, 7, "{}", lines.join("\n"));

    let out = run(&["catalog"]);
    assert_eq!(text(&out.stderr).matches("warning: left out").count(), 7);
}

/// A configuration error names the file as the user gave it, with the line, whatever the
/// current directory: not rewritten relative to it (`../../x/bad.toml` reads as another
/// file), so this holds wherever the checkout lives.
#[test]
fn a_config_error_names_the_file_as_given_from_any_directory() {
    let cfg = TempFile::new("bad.toml", "[catalog]\nregoin = \"westus\"\n");
    let given = cfg.0.to_str().unwrap();
    let deep = std::env::temp_dir()
        .join(format!("aml-egress-test-cwd-{}", std::process::id()))
        .join("a/b/c");
    std::fs::create_dir_all(&deep).unwrap();
    let out = bin()
        .args(["check", "--config", given, "pypi.org:443"])
        .current_dir(&deep)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(deep.parent().unwrap().parent().unwrap().parent().unwrap());
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("  - {given}:2: catalog.regoin: unknown key")),
        "{err}"
    );
    assert!(!err.contains(".."), "{err}");

    // A relative path stays as written.
    let dir = cfg.0.parent().unwrap();
    let name = cfg.0.file_name().unwrap().to_str().unwrap();
    let out = bin()
        .args(["validate", "--config", name])
        .current_dir(dir)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("  - {name}:2: catalog.regoin: unknown key")),
        "{err}"
    );
}

/// An unknown key whose value is a table, and a whole unknown section, are the file's
/// problems (at their line), not the built-in defaults'.
#[test]
fn unknown_tables_are_blamed_on_their_file_and_line() {
    let cfg = TempFile::new(
        "tables.toml",
        "[proxy]\nfoo = { a = 1 }\n\n[tunnels]\nb = 2\n",
    );
    let path = cfg.0.to_str().unwrap();
    let out = run(&["validate", "--config", path]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("  - {path}:2: proxy.foo: unknown key")),
        "{err}"
    );
    assert!(
        err.contains(&format!("  - {path}:4: tunnels: unknown key")),
        "{err}"
    );
    assert!(!err.contains("built-in defaults"), "{err}");
}

/// Every problem of a file names the file and the line of its key: a bad value, a range,
/// a cross-key check and a rule entry alike.
#[test]
fn every_problem_names_its_file_and_line() {
    let cfg = TempFile::new(
        "lines.toml",
        "[proxy]\nmode = \"x\"\nmax_connections = 0\n[catalog]\ncloud = \"usgov\"\nregion = \"westus\"\n[[allow]]\nhost = \"a.*.com\"\nports = [443]\n",
    );
    let path = cfg.0.to_str().unwrap();
    let out = run(&["validate", "--config", path]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for (line, key) in [
        (2, "proxy.mode"),
        (3, "proxy.max_connections"),
        (6, "catalog.region"),
        (8, "allow[1].host"),
    ] {
        assert!(
            err.contains(&format!("  - {path}:{line}: {key} ")),
            "{key}: {err}"
        );
    }
    let problems = err.lines().filter(|l| l.starts_with("  - ")).count();
    assert_eq!(problems, 4, "{err}");
}

#[test]
fn nva_rules_without_the_transparent_listeners_names_the_file_and_what_to_add() {
    let cfg = TempFile::new(
        "no-transparent.toml",
        "[catalog]\nregion = \"westeurope\"\n",
    );
    let out = bin()
        .args(["nva-rules", "--from", "10.0.1.0/24", "--config"])
        .arg(&cfg.0)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains(&format!("{}: transparent.tls_listen", cfg.0.display())),
        "{err}"
    );
    assert!(err.contains("[transparent]\ntls_listen = ["), "{err}");
}
