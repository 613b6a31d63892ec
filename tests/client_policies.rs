//! Policies per client: one proxy serving several workspaces (hub and spoke), each client
//! decided by the policy its source network chooses. Clients bind to different loopback
//! addresses (127.0.0.2, 127.0.0.3, ::1); real clients are curl and Python requests.

mod support;

use std::net::{IpAddr, SocketAddr};

use aml_egress::reload::Trigger;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::TempFile;
use support::net::{echo_upstream, get, read_request_head, upstream};
use support::proxy::{start_file, start_proxy};

/// Team A's and team B's workspaces behind one proxy, and the default policy for anyone
/// else: each storage wildcard narrowed to that workspace's own account; each team also
/// has one host of its own over plain HTTP. `extra` goes into `[policy]`.
fn hub(echo: SocketAddr, web: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[catalog]
region = "westeurope"
storage_account = "defaultstore"
[catalog.narrow]
"*.blob.core.windows.net" = ["defaultstore.blob.core.windows.net"]
[policy]
{extra}
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "teamastore.blob.core.windows.net:443" = "{echo}", "teambstore.blob.core.windows.net:443" = "{echo}", "defaultstore.blob.core.windows.net:443" = "{echo}", "a.example.test:80" = "{web}", "b.example.test:80" = "{web}" }}

[[client_policy]]
name = "team-a"
sources = ["127.0.0.2/32"]
[client_policy.catalog]
region = "westeurope"
storage_account = "teamastore"
[client_policy.catalog.narrow]
"*.blob.core.windows.net" = ["teamastore.blob.core.windows.net"]
[[client_policy.allow]]
host = "a.example.test"
ports = [80]

[[client_policy]]
name = "team-b"
sources = ["127.0.0.3/32", "::1/128"]
[client_policy.catalog]
region = "westeurope"
storage_account = "teambstore"
[client_policy.catalog.narrow]
"*.blob.core.windows.net" = ["teambstore.blob.core.windows.net"]
[[client_policy.allow]]
host = "b.example.test"
ports = [80]
"#
    )
}

/// A plain HTTP upstream answering every request `saw <Host>`.
async fn web_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        while let Some(head) = read_request_head(&mut s).await {
            let host = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("host: ")
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            let body = format!("saw {host}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Connect to `proxy` from `from`, send `head`, and read the first answer.
async fn exchange_from(from: IpAddr, proxy: SocketAddr, head: &str) -> (TcpStream, String) {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4().unwrap(),
        IpAddr::V6(_) => TcpSocket::new_v6().unwrap(),
    };
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut s = socket.connect(proxy).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).await.unwrap();
    (s, String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// curl through `proxy` from the local address `from`: `%{http_connect}` (the CONNECT's
/// status) of an HTTPS URL, or the body and `%{http_code}` of an HTTP one.
async fn curl_from(from: &str, proxy: SocketAddr, url: &str) -> String {
    let write_out = match url.starts_with("https") {
        true => "%{http_connect}",
        false => "\n%{http_code}",
    };
    let args: Vec<String> = [
        "--proxy",
        &format!("http://{proxy}"),
        "--interface",
        from,
        "-w",
        write_out,
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (_, out, _) = support::clients::curl_async(args).await;
    out
}

/// Python requests through `proxy` with its connections bound to `from` (an adapter
/// passing `source_address` to urllib3): `<status> <body>`.
async fn requests_from(from: &str, proxy: SocketAddr, url: &str) -> String {
    let script = r#"
import requests, sys
src, proxy, url = sys.argv[1], sys.argv[2], sys.argv[3]
class Bound(requests.adapters.HTTPAdapter):
    def init_poolmanager(self, *a, **kw):
        kw["source_address"] = (src, 0)
        super().init_poolmanager(*a, **kw)
    def proxy_manager_for(self, proxy, **kw):
        kw["source_address"] = (src, 0)
        return super().proxy_manager_for(proxy, **kw)
s = requests.Session()
s.mount("http://", Bound())
r = s.get(url, proxies={"http": proxy}, timeout=20)
print(r.status_code, r.text)
"#;
    let (from, proxy, url) = (from.to_owned(), format!("http://{proxy}"), url.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, &from, &proxy, &url])
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .output()
            .expect("python3 with requests is installed (.ci/run installs it)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_network_gets_its_own_workspace_and_nobody_elses() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let p = start_proxy(&hub(echo, web, "")).await;
    let (a, b, other) = ("127.0.0.2", "127.0.0.3", "127.0.0.1");
    let store = |s: &str| format!("https://{s}.blob.core.windows.net/");

    // curl: team A reaches its own storage account only, team B its own.
    assert_eq!(curl_from(a, p.addr, &store("teamastore")).await, "200");
    assert_eq!(curl_from(a, p.addr, &store("teambstore")).await, "403");
    assert_eq!(curl_from(b, p.addr, &store("teambstore")).await, "200");
    assert_eq!(curl_from(b, p.addr, &store("teamastore")).await, "403");
    // A client no policy claims is served by the default policy.
    assert_eq!(
        curl_from(other, p.addr, &store("defaultstore")).await,
        "200"
    );
    assert_eq!(curl_from(other, p.addr, &store("teamastore")).await, "403");

    // Python requests, absolute-form HTTP: each team's own host.
    assert_eq!(
        requests_from(a, p.addr, "http://a.example.test/").await,
        "200 saw a.example.test"
    );
    let refused = requests_from(a, p.addr, "http://b.example.test/").await;
    assert!(refused.starts_with("403 "), "{refused}");
    assert!(
        refused.contains("under the policy \"team-a\" that serves the client 127.0.0.2"),
        "{refused}"
    );
    assert!(refused.contains("[[client_policy.allow]]"), "{refused}");
    assert_eq!(
        requests_from(b, p.addr, "http://b.example.test/").await,
        "200 saw b.example.test"
    );

    // What the operator sees: decisions and denials by policy, /denied filtered.
    let m = p.metrics().await;
    for series in [
        "aml_egress_decisions_total{decision=\"allow\",listener=\"connect\",policy=\"team-a\",reason=\"rule\"} 1",
        "aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"team-a\",reason=\"wildcard_narrowed\"} 1",
        "aml_egress_decisions_total{decision=\"deny\",listener=\"http\",policy=\"team-a\",reason=\"no_matching_rule\"} 1",
        "aml_egress_decisions_total{decision=\"allow\",listener=\"connect\",policy=\"default\",reason=\"rule\"} 1",
        "aml_egress_denied_total{host=\"teambstore.blob.core.windows.net\",policy=\"team-a\",port=\"443\"} 1",
        "aml_egress_denied_total{host=\"teamastore.blob.core.windows.net\",policy=\"team-b\",port=\"443\"} 1",
    ] {
        assert!(m.contains(series), "{series} missing:\n{m}");
    }
    let (status, body) = get(p.admin_addr, "/denied?policy=team-a", None).await;
    assert_eq!(status, 200);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let targets: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["target"].as_str().unwrap(), r["policy"].as_str().unwrap()))
        .collect();
    assert_eq!(
        targets,
        [
            ("b.example.test:80", "team-a"),
            ("teambstore.blob.core.windows.net:443", "team-a")
        ],
        "{body}"
    );
    let entry = rows[1]["allow_entry"].as_str().unwrap();
    assert!(
        entry.starts_with(
            "in the [[client_policy]] named \"team-a\": [client_policy.catalog.narrow]"
        ),
        "{entry}"
    );
    // The status page lists each policy with its catalog selection.
    let (_, page) = get(p.admin_addr, "/", None).await;
    assert!(
        page.contains("<dt>Client policy <code>team-a</code></dt><dd>enforce mode, revision 2026-03, public cloud, region westeurope, parts on: "),
        "{page}"
    );
    // A misspelt policy is said to be one, by the endpoint and the command.
    let (status, body) = get(p.admin_addr, "/denied?policy=team-c", None).await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("no such policy; this configuration has default, team-a, team-b"),
        "{body}"
    );
    let admin = format!("http://{}", p.admin_addr);
    let args = ["denied", "--admin", &admin, "--policy", "team-c"];
    let out = support::clients::aml_async(args.map(String::from).to_vec()).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no such policy"), "{err}");

    // The 403 names the policy's own narrowing, not the top-level one it never reads.
    let (mut s, mut text) = exchange_from(
        a.parse().unwrap(),
        p.addr,
        "CONNECT teambstore.blob.core.windows.net:443 HTTP/1.1\r\n\r\n",
    )
    .await;
    let mut rest = String::new();
    let _ = s.read_to_string(&mut rest).await;
    text.push_str(&rest);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.contains("add it to client_policy.catalog.narrow.\"*.blob.core.windows.net\"")
            && text.contains("[client_policy.catalog.narrow] in that policy and reload"),
        "{text}"
    );
    assert!(
        !text.contains(" catalog.narrow") && !text.contains("[catalog.narrow]"),
        "{text}"
    );
    // A host whose name reads like a key is named as it is, in the 403 and the entry.
    let odd = "catalog.features.example.test";
    let refused = requests_from(a, p.addr, &format!("http://{odd}/")).await;
    assert!(
        refused.starts_with("403 ") && refused.contains(&format!("refused {odd}")),
        "{refused}"
    );
    assert!(
        !refused.contains("client_policy.catalog.features.example"),
        "{refused}"
    );
    let (_, body) = get(p.admin_addr, "/denied?policy=team-a", None).await;
    assert!(body.contains(&format!("host = \\\"{odd}\\\"")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_is_chosen_by_its_own_prefix() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    }
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let cfg = TempFile::new(
        "hub6.toml",
        &format!(
            "[proxy]\nlisten = [\"[::1]:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n{}",
            hub(echo, web, "")
        ),
    );
    let p = start_file(&cfg.0).await;
    assert!(p.addr.is_ipv6());
    let store = |s: &str| format!("https://{s}.blob.core.windows.net/");
    assert_eq!(curl_from("::1", p.addr, &store("teambstore")).await, "200");
    assert_eq!(curl_from("::1", p.addr, &store("teamastore")).await, "403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_clients_are_refused_when_the_setting_says_so() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let p = start_proxy(&hub(echo, web, "unmatched_clients = \"refuse\"")).await;
    let head = "CONNECT defaultstore.blob.core.windows.net:443 HTTP/1.1\r\n\r\n";
    let (_, resp) = exchange_from("127.0.0.1".parse().unwrap(), p.addr, head).await;
    assert!(
        resp.starts_with("HTTP/1.1 403 Forbidden by aml-egress: defaultstore.blob.core.windows.net:443 no policy serves this client"),
        "{resp}"
    );
    assert!(
        resp.contains("error=destination_not_allowed; details=\"no_policy_for_client\""),
        "{resp}"
    );
    assert!(
        resp.contains("no [[client_policy]] serves the client 127.0.0.1"),
        "{resp}"
    );
    assert!(resp.contains("policy.unmatched_clients"), "{resp}");
    // Plain HTTP too; claimed clients carry on.
    let out = curl_from("127.0.0.1", p.addr, "http://a.example.test/").await;
    assert!(out.ends_with("\n403"), "{out}");
    assert_eq!(
        curl_from(
            "127.0.0.2",
            p.addr,
            "https://teamastore.blob.core.windows.net/"
        )
        .await,
        "200"
    );
    let m = p.metrics().await;
    let refused = "aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"(none)\",reason=\"no_policy_for_client\"} 1";
    assert!(m.contains(refused), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_changes_and_removes_policies_while_their_tunnels_stay_open() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    // Tunnels carry raw bytes (an opaque port) so that the echo shows they still flow.
    let listen = "[proxy]\nlisten = [\"127.0.0.1:0\"]\ntls_ports = []\nopaque_ports = [443]\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    let only_a = hub(echo, web, "");
    let only_a = &only_a[..only_a.rfind("[[client_policy]]").unwrap()];
    let cfg = TempFile::new("reload-hub.toml", &format!("{listen}{only_a}"));
    let p = start_file(&cfg.0).await;
    let b_store = "CONNECT teambstore.blob.core.windows.net:443 HTTP/1.1\r\n\r\n";
    let a_store = "CONNECT teamastore.blob.core.windows.net:443 HTTP/1.1\r\n\r\n";
    // 127.0.0.3 is nobody's yet: the default policy refuses team B's account.
    let (_, resp) = exchange_from("127.0.0.3".parse().unwrap(), p.addr, b_store).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let (mut a_tunnel, resp) = exchange_from("127.0.0.2".parse().unwrap(), p.addr, a_store).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // Added: team B.
    std::fs::write(&cfg.0, format!("{listen}{}", hub(echo, web, ""))).unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    let (mut b_tunnel, resp) = exchange_from("127.0.0.3".parse().unwrap(), p.addr, b_store).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    // Changed: team A's network moves to 127.0.0.4; removed: team B.
    let moved = only_a.replace("\"127.0.0.2/32\"", "\"127.0.0.4/32\"");
    std::fs::write(&cfg.0, format!("{listen}{moved}")).unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    let (_, resp) = exchange_from("127.0.0.2".parse().unwrap(), p.addr, a_store).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let (_, resp) = exchange_from("127.0.0.4".parse().unwrap(), p.addr, a_store).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let (_, resp) = exchange_from("127.0.0.3".parse().unwrap(), p.addr, b_store).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");

    // The tunnels opened under the old policies still carry bytes.
    for t in [&mut a_tunnel, &mut b_tunnel] {
        t.write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        t.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still");
    }
}

#[test]
fn policy_problems_are_reported_at_once_each_naming_its_policy() {
    let err = support::build_error(
        r#"
[[client_policy]]
name = "team-a"
sources = ["10.1.0.0/16"]
[client_policy.catalog]
region = "westeurop"
storage_account = "Team-A-Store"
[[client_policy.allow]]
host = "a.example.test"

[[client_policy]]
name = "Team B"
sources = ["10.1.0.0/16"]

[[client_policy]]
name = "team-a"
"#,
    );
    for part in [
        "client_policy[1].catalog.region = \"westeurop\": (policy team-a) not an Azure region",
        "client_policy[1].catalog.storage_account = \"Team-A-Store\": (policy team-a) not a storage account name",
        "client_policy[1].allow[1].ports: (policy team-a) an allow entry needs its ports",
        "client_policy[2].name = \"Team B\": not a policy name",
        "client_policy[2].sources = 10.1.0.0/16: policies \"team-a\" (client_policy[1]) and \"Team B\" both claim 10.1.0.0/16",
        "client_policy[3].name = \"team-a\": client_policy[1] already has this name",
        "client_policy[3].sources: policy \"team-a\" serves no client",
    ] {
        assert!(err.contains(part), "{part:?} missing from:\n{err}");
    }
    let err = support::build_error(
        "[[client_policy]]\nname = \"a\"\nsources = [\"10.0.0.0/8\"]\nsource = [\"10.0.0.0/8\"]\n[client_policy.catalog]\ncolour = \"blue\"\n",
    );
    assert!(
        err.contains("client_policy[1].source: (policy a) unknown key; did you mean sources?"),
        "{err}"
    );
    assert!(
        err.contains("client_policy[1].catalog.colour: (policy a) unknown key"),
        "{err}"
    );
    // A bound on how many, said once rather than per table.
    let many: String = (0..4097)
        .map(|i| {
            format!(
                "[[client_policy]]\nname = \"p{i}\"\nsources = [\"10.{}.{}.0/24\"]\n",
                i / 256,
                i % 256
            )
        })
        .collect();
    let err = support::build_error(&many);
    assert!(
        err.contains("client_policy = 4097 tables: more than 4096 client policies"),
        "{err}"
    );
}

#[test]
fn check_decides_as_a_client_or_a_policy_would_and_validate_lists_the_policies() {
    let echo: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cfg = TempFile::new("hub.toml", &hub(echo, echo, ""));
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
            .arg("check")
            .arg("--config")
            .arg(&cfg.0)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&[
        "--client",
        "127.0.0.2",
        "teamastore.blob.core.windows.net:443",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.starts_with("allow teamastore.blob.core.windows.net:443 "),
        "{out}"
    );
    assert!(out.trim_end().ends_with("[policy team-a]"), "{out}");
    let (code, out, _) = run(&["--client", "::1", "teamastore.blob.core.windows.net:443"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("narrowed") && out.contains("[policy team-b]"),
        "{out}"
    );
    let (code, out, _) = run(&[
        "--client",
        "10.9.9.9",
        "defaultstore.blob.core.windows.net:443",
    ]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.trim_end().ends_with("[policy default]"), "{out}");
    let (code, out, _) = run(&["--policy", "team-b", "--json", "b.example.test:80"]);
    assert_eq!(code, Some(0), "{out}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(line["policy"], "team-b");
    assert_eq!(line["source"]["list"], "client_policy.allow");
    let (code, _, err) = run(&["--policy", "team-c", "x.example:443"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no such policy; this configuration has default, team-a, team-b"),
        "{err}"
    );

    let refuse = TempFile::new(
        "hub-refuse.toml",
        &hub(echo, echo, "unmatched_clients = \"refuse\""),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["check", "--config"])
        .arg(&refuse.0)
        .args([
            "--client",
            "10.9.9.9",
            "defaultstore.blob.core.windows.net:443",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("no [[client_policy]] serves the client 10.9.9.9"),
        "{out:?}"
    );
    // As JSON, and with the targets on standard input, like any other check.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["check", "--json", "--config"])
        .arg(&refuse.0)
        .args(["--client", "10.9.9.9"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"defaultstore.blob.core.windows.net:443\nhttps://ml.azure.com\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    for l in &lines {
        assert_eq!(l["decision"], "deny", "{l}");
        assert_eq!(l["reason"], "no_policy_for_client", "{l}");
        assert_eq!(l["policy"], "(none)", "{l}");
    }
    assert_eq!(lines[1]["target"], "https://ml.azure.com");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["validate", "--config"])
        .arg(&cfg.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("client policies: 2\n"), "{text}");
    assert!(
        text.contains("  - team-a (enforce): 127.0.0.2/32; catalog "),
        "{text}"
    );
    assert!(
        text.contains("  - team-b (enforce): 127.0.0.3/32, ::1/128; catalog "),
        "{text}"
    );
    assert!(
        text.contains("other clients: served by the default policy"),
        "{text}"
    );
}

/// A CA that signs client certificates, and a certificate for `name` from it (PEM files).
struct ClientCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: TempFile,
}

fn client_ca(cn: &str) -> ClientCa {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    ClientCa {
        pem: TempFile::new("client-ca.pem", &cert.pem()),
        issuer: rcgen::Issuer::new(params, key),
    }
}

fn client_cert(ca: &ClientCa, name: &str) -> (TempFile, TempFile) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        TempFile::new("client.pem", &cert.pem()),
        TempFile::new("client.key", &key.serialize_pem()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_choose_the_policy_over_the_address_and_a_foreign_one_is_refused() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let pc = support::clients::proxy_cert();
    let ca = client_ca("workspace clients");
    let (a_cert, a_key) = client_cert(&ca, "ws-a.clients.test");
    let (b_cert, b_key) = client_cert(&ca, "ws-b.clients.test");
    let stranger = client_ca("someone else");
    let (x_cert, x_key) = client_cert(&stranger, "ws-a.clients.test");
    let cfg = hub(echo, web, "")
        .replace(
            "sources = [\"127.0.0.2/32\"]",
            "sources = [\"127.0.0.2/32\"]\nclient_names = [\"ws-a.clients.test\"]",
        )
        .replace(
            "sources = [\"127.0.0.3/32\", \"::1/128\"]",
            "sources = [\"127.0.0.3/32\", \"::1/128\"]\nclient_names = [\"*.b.clients.test\", \"ws-b.clients.test\"]",
        );
    let p = start_proxy(&format!(
        "[proxy]\n{}tls_client_ca = {:?}\n{cfg}",
        pc.keys, ca.pem.0
    ))
    .await;
    let tls = p.tls_addr.unwrap();
    let through = |from: &'static str, cert: &TempFile, key: &TempFile, url: &str| {
        let args: Vec<String> = vec![
            "--proxy".into(),
            format!("https://{tls}"),
            "--proxy-cacert".into(),
            pc.cert.0.display().to_string(),
            "--proxy-cert".into(),
            cert.0.display().to_string(),
            "--proxy-key".into(),
            key.0.display().to_string(),
            "--interface".into(),
            from.into(),
            "-w".into(),
            "%{http_connect}".into(),
            url.into(),
        ];
        support::clients::curl_async(args)
    };
    let store = |s: &str| format!("https://{s}.blob.core.windows.net/");
    // From team A's address, each certificate gets its own team's account.
    let (_, out, err) = through("127.0.0.2", &a_cert, &a_key, &store("teamastore")).await;
    assert_eq!(out, "200", "{err}");
    let (_, out, err) = through("127.0.0.2", &b_cert, &b_key, &store("teambstore")).await;
    assert_eq!(out, "200", "{err}");
    let (_, out, err) = through("127.0.0.2", &b_cert, &b_key, &store("teamastore")).await;
    assert_eq!(out, "403", "{err}");
    // A certificate from another CA never gets past the handshake.
    let (code, out, err) = through("127.0.0.2", &x_cert, &x_key, &store("teamastore")).await;
    assert_ne!(code, 0);
    assert_eq!(out, "000", "{err}");
    // Nor does a client without a certificate.
    let (code, _, err) = support::clients::curl_async(vec![
        "--proxy".into(),
        format!("https://{tls}"),
        "--proxy-cacert".into(),
        pc.cert.0.display().to_string(),
        store("teamastore"),
    ])
    .await;
    assert_ne!(code, 0, "{err}");
    let m = p.metrics().await;
    assert!(
        m.contains("aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"team-b\",reason=\"wildcard_narrowed\"} 1"),
        "{m}"
    );
    // `check` decides the same way: the certificate's name over the address.
    let file = TempFile::new(
        "hub-certs.toml",
        &format!("[proxy]\n{}tls_client_ca = {:?}\n{cfg}", pc.keys, ca.pem.0),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["check", "--config"])
        .arg(&file.0)
        .args(["--client", "127.0.0.2", "--client-name", "x.b.clients.test"])
        .arg("teamastore.blob.core.windows.net:443")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.trim_end().ends_with("[policy team-b]"), "{text}");
}

#[test]
fn certificate_names_two_policies_could_share_are_refused_at_load() {
    let ca = client_ca("c");
    let err = support::build_error(&format!(
        "[proxy]\ntls_client_ca = {:?}\n[[client_policy]]\nname = \"a\"\nclient_names = [\"*.clients.test\"]\n[[client_policy]]\nname = \"b\"\nclient_names = [\"ws-b.clients.test\"]\n",
        ca.pem.0
    ));
    assert!(
        err.contains("client_policy[2].client_names = \"ws-b.clients.test\": policies \"a\" (\"*.clients.test\") and \"b\" (\"ws-b.clients.test\") both claim some certificate names"),
        "{err}"
    );
    assert!(
        err.contains("proxy.tls_client_ca") && err.contains("proxy.tls_listen, which is not set"),
        "{err}"
    );
    let err = support::build_error(
        "[[client_policy]]\nname = \"a\"\nclient_names = [\"ws.clients.test\"]\n",
    );
    assert!(
        err.contains("client_policy[1].client_names") && err.contains("set proxy.tls_client_ca"),
        "{err}"
    );
}

#[test]
fn the_inspection_ca_must_permit_what_every_policy_inspects() {
    let ca_for = support::tls::inspection_ca;
    let config = |cert: &TempFile, key: &TempFile| {
        format!(
            "[inspect]\nca_cert = {:?}\nca_key = {:?}\n[[allow]]\nhost = \"files.example.test/pkg/*\"\nports = [443]\n[[client_policy]]\nname = \"team-a\"\nsources = [\"10.1.0.0/16\"]\n[[client_policy.allow]]\nhost = \"other.example.test/pkg/*\"\nports = [443]\n",
            cert.0, key.0
        )
    };
    let (cert, key) = ca_for(&["files.example.test"]);
    let err = support::build_error(&config(&cert, &key));
    assert!(
        err.contains("do not permit other.example.test")
            && err.contains("[[client_policy.allow]] #1"),
        "{err}"
    );
    let (cert, key) = ca_for(&["files.example.test", "other.example.test"]);
    let c = support::compiled(&config(&cert, &key));
    let inspected: Vec<String> = c
        .inspect
        .inspected
        .iter()
        .map(|i| i.pattern.to_string())
        .collect();
    assert_eq!(inspected, ["files.example.test", "other.example.test"]);
}

/// A `[[client_policy.deny]]` CIDR holds for the addresses its clients' names resolve to
/// (or are connected to), as a top-level `[[deny]]` CIDR does: through CONNECT and
/// absolute-form HTTP alike; another policy's clients are not affected by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_policy_deny_cidr_applies_to_the_addresses_its_names_reach() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let own_a = "host = \"a.example.test\"\nports = [80]\n";
    let cfg = hub(echo, web, "").replace(
        own_a,
        &format!("{own_a}[[client_policy.deny]]\ncidr = \"127.0.0.1/32\"\n"),
    );
    let p = start_proxy(&cfg).await;
    let a: IpAddr = "127.0.0.2".parse().unwrap();
    let connect = "CONNECT teamastore.blob.core.windows.net:443 HTTP/1.1\r\n\r\n";
    let (_, resp) = exchange_from(a, p.addr, connect).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("details=\"deny_rule\""), "{resp}");
    let get = "GET http://a.example.test/ HTTP/1.1\r\nHost: a.example.test\r\n\r\n";
    let (_, resp) = exchange_from(a, p.addr, get).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("details=\"deny_rule\""), "{resp}");
    // Team B's clients reach the same address.
    let b: IpAddr = "127.0.0.3".parse().unwrap();
    let get = "GET http://b.example.test/ HTTP/1.1\r\nHost: b.example.test\r\n\r\n";
    let (_, resp) = exchange_from(b, p.addr, get).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("saw b.example.test"), "{resp}");
}

/// Which optional part would allow a refused name: the hints of entries without
/// placeholders are compiled once for a hub's policies, while those with placeholders
/// (`<acr>`) keep each workspace's own values, and a wildcard a policy narrows hints only
/// for the names it keeps.
#[test]
fn the_hints_of_parts_that_are_off_are_shared_and_keep_each_policys_values() {
    use aml_egress::policy::{PathView, Target};
    let echo: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let text = hub(echo, echo, "")
        .replace(
            "storage_account = \"teamastore\"",
            "storage_account = \"teamastore\"\ncontainer_registry = \"teamareg\"",
        )
        .replace(
            "\"*.blob.core.windows.net\" = [\"teambstore.blob.core.windows.net\"]",
            "\"*.blob.core.windows.net\" = [\"teambstore.blob.core.windows.net\"]\n\"*.vscode.dev\" = [\"kept.vscode.dev\"]",
        )
        .replace(
            "host = \"b.example.test\"\nports = [80]",
            "host = \"b.example.test\"\nports = [80]\n[[client_policy.allow]]\nhost = \"*.vscode.dev\"\nports = [443]",
        );
    let cfg = TempFile::new("hub.toml", &text);
    let s = aml_egress::config::Settings::load_with_env(Some(&cfg.0), Some(Default::default()))
        .unwrap();
    let c = aml_egress::config::compile(s).unwrap();
    let (a, b) = (&c.clients.policies[0].built, &c.clients.policies[1].built);
    let shared = |p: &aml_egress::config::Built| p.off_parts.shared().cloned().unwrap();
    assert!(std::sync::Arc::ptr_eq(&shared(a), &shared(b)));
    let hint = |p: &aml_egress::config::Built, target: &str| {
        p.would_allow_with(&Target::parse(target).unwrap(), PathView::Hidden)
            .map(str::to_owned)
    };
    assert_eq!(
        hint(a, "code.visualstudio.com:443").as_deref(),
        Some("vscode")
    );
    assert_eq!(
        hint(b, "code.visualstudio.com:443").as_deref(),
        Some("vscode")
    );
    assert_eq!(
        hint(a, "teamareg.azurecr.io:443").as_deref(),
        Some("arc_extension")
    );
    assert_eq!(hint(b, "teamareg.azurecr.io:443"), None);
    assert_eq!(hint(a, "other.vscode.dev:443").as_deref(), Some("vscode"));
    assert_eq!(hint(b, "kept.vscode.dev:443").as_deref(), Some("vscode"));
    assert_eq!(hint(b, "other.vscode.dev:443"), None);
}

/// `catalog diff --policy` compares the revisions for that policy's cloud, region and
/// parts, and names the policies when given one that does not exist.
#[test]
fn catalog_diff_compares_the_revisions_for_the_named_policy() {
    let cfg = TempFile::new(
        "hub.toml",
        "[catalog]\nregion = \"westeurope\"\n[[client_policy]]\nname = \"team-a\"\nsources = [\"10.1.0.0/24\"]\n[client_policy.catalog]\nregion = \"eastus\"\n",
    );
    let diff = |policy: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
            .args(["catalog", "diff", "2021-11", "2026-03", "--config"])
            .arg(&cfg.0)
            .args(policy)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = diff(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("*.westeurope.batch.azure.com"), "{out}");
    assert!(!out.contains("eastus"), "{out}");
    let (code, out, _) = diff(&["--policy", "team-a"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("*.eastus.batch.azure.com"), "{out}");
    assert!(!out.contains("westeurope"), "{out}");
    let (code, _, err) = diff(&["--policy", "team-b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--policy \"team-b\": no such policy; this configuration has default, team-a"),
        "{err}"
    );
}

/// An open tunnel counts under its own policy's mode: team A audits while the default
/// policy enforces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_are_counted_under_the_mode_of_their_policy() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let text = hub(echo, web, "").replace(
        "name = \"team-a\"\n",
        "name = \"team-a\"\nmode = \"audit\"\n",
    );
    let p = start_proxy(&text).await;
    let connect = |store: &str| {
        format!(
            "CONNECT {store}.blob.core.windows.net:443 HTTP/1.1\r\nHost: {store}.blob.core.windows.net:443\r\n\r\n"
        )
    };
    let a: IpAddr = "127.0.0.2".parse().unwrap();
    let (_team_a, answer) = exchange_from(a, p.addr, &connect("teamastore")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    p.until_sample("aml_egress_open_tunnels{mode=\"audit\"}", 1.0)
        .await;
    let other: IpAddr = "127.0.0.1".parse().unwrap();
    let (_default, answer) = exchange_from(other, p.addr, &connect("defaultstore")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    p.until_sample("aml_egress_open_tunnels{mode=\"enforce\"}", 1.0)
        .await;
    let m = p.metrics().await;
    assert!(
        m.contains("aml_egress_open_tunnels{mode=\"audit\"} 1\n"),
        "{m}"
    );
}

/// A TLS client with the certificate `cert`/`key`, trusting the proxy's certificate.
fn certified_connector(
    proxy: &TempFile,
    cert: &TempFile,
    key: &TempFile,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&proxy.0).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.0)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&key.0).unwrap())
        .unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

/// One request on a kept connection: the response head and body (by Content-Length).
async fn ask<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    request: &str,
) -> (String, String) {
    s.write_all(request.as_bytes()).await.unwrap();
    let split = |got: &[u8]| -> Option<(usize, usize)> {
        let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        Some((end, len))
    };
    let got =
        support::net::read_until(s, |g| split(g).is_some_and(|(e, l)| g.len() >= e + l)).await;
    let (end, _) = split(&got).unwrap();
    (
        String::from_utf8_lossy(&got[..end]).into_owned(),
        String::from_utf8_lossy(&got[end..]).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_certificates_policy_a_reload_renamed_is_refused_and_closed() {
    let (echo, web) = (echo_upstream().await, web_upstream().await);
    let pc = support::clients::proxy_cert();
    let ca = client_ca("workspace clients");
    let (a_cert, a_key) = client_cert(&ca, "ws-a.clients.test");
    let with_names = |cfg: String| {
        cfg.replace(
            "sources = [\"127.0.0.2/32\"]",
            "sources = [\"127.0.0.2/32\"]\nclient_names = [\"ws-a.clients.test\"]",
        )
    };
    // The default policy allows team A's host too, so a connection that fell back to it
    // (or to its address, 127.0.0.1) would still be let through.
    let everyone = "[[allow]]\nhost = \"a.example.test\"\nports = [80]\n";
    let text = format!(
        "[proxy]\n{}tls_client_ca = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n{everyone}{}",
        pc.keys,
        ca.pem.0,
        with_names(hub(echo, web, ""))
    );
    let cfg = TempFile::new("hub-renamed.toml", &text);
    let p = start_file(&cfg.0).await;
    let tls = p.tls_addr.unwrap();
    let connector = certified_connector(&pc.cert, &a_cert, &a_key);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connect = || async {
        let tcp = TcpStream::connect(tls).await.unwrap();
        connector.connect(name.clone(), tcp).await.unwrap()
    };
    let get_a = "GET http://a.example.test/ HTTP/1.1\r\nHost: a.example.test\r\n\r\n";

    let mut kept = connect().await;
    let (head, body) = ask(&mut kept, get_a).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "saw a.example.test");

    std::fs::write(
        &cfg.0,
        text.replace("name = \"team-a\"", "name = \"team-a-prod\""),
    )
    .unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    // The kept connection's policy is gone: refused, told why, and closed.
    let (head, body) = ask(&mut kept, get_a).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("no_policy_for_client"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(body.contains("removed or renamed"), "{body}");
    let mut rest = Vec::new();
    let _ = kept.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "nothing more on a closed connection");
    // A new connection's certificate chooses the renamed policy.
    let mut fresh = connect().await;
    let (head, body) = ask(&mut fresh, get_a).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "saw a.example.test");
    let m = p.metrics().await;
    assert!(
        m.contains("aml_egress_decisions_total{decision=\"allow\",listener=\"http\",policy=\"team-a-prod\",reason=\"rule\"} 1"),
        "{m}"
    );

    // The policy keeps its name but no longer claims the certificate, which another policy
    // (that allows nothing) claims now: the kept connection is not served by the policy
    // that has the name, which the certificate no longer chooses.
    let renamed = text.replace("name = \"team-a\"", "name = \"team-a-prod\"");
    let moved = renamed.replace(
        "client_names = [\"ws-a.clients.test\"]",
        "client_names = [\"other.clients.test\"]",
    ) + "\n[[client_policy]]\nname = \"team-z\"\nsources = [\"127.0.0.9/32\"]\nclient_names = [\"ws-a.clients.test\"]\n";
    assert_ne!(moved, renamed);
    std::fs::write(&cfg.0, moved).unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    let (head, _) = ask(&mut fresh, get_a).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("no_policy_for_client"), "{head}");
    let mut again = connect().await;
    let (head, _) = ask(&mut again, get_a).await;
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "team Z allows nothing: {head}"
    );
    assert!(!head.contains("no_policy_for_client"), "{head}");
}

/// A client policy's load-time notes reach the log at start-up, each line naming the
/// policy and the setting under it that would add what was left out; the default policy's
/// are left out when it serves nobody.
#[test]
fn a_client_policys_left_out_entries_are_logged_at_start_up_under_its_name() {
    use std::io::{BufRead, BufReader};
    let cfg = TempFile::new(
        "hub-notes.toml",
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[policy]\nunmatched_clients = \"refuse\"\n[catalog]\nregion = \"westeurope\"\n\n[[client_policy]]\nname = \"team-a\"\nsources = [\"127.0.0.2/32\"]\n[client_policy.catalog]\nregion = \"westeurope\"\n",
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["serve", "--config"])
        .arg(&cfg.0)
        .env_remove("AML_EGRESS_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut before = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("aml-egress serving") {
            break;
        }
        before.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let notes: Vec<&String> = before.iter().filter(|l| l.contains("left out")).collect();
    assert_eq!(
        notes.len(),
        1,
        "only team A's (the default policy lacks one too, but serves nobody under refuse): {before:#?}"
    );
    let note = notes[0];
    assert!(note.contains("\"policy\":\"team-a\""), "{note}");
    assert!(note.contains("[[client_policy]] \\\"team-a\\\""), "{note}");
    assert!(
        note.contains("client_policy.catalog.storage_account"),
        "{note}"
    );
}

/// The files a client policy names and the client CA are watched like the top-level
/// ones: an edit to any of them is a change the reloader sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_policys_files_and_the_client_ca_are_watched() {
    let pc = support::clients::proxy_cert();
    let ca = client_ca("workspace clients");
    let tags = TempFile::new(
        "ServiceTags_Public.json",
        r#"{"changeNumber":1,"cloud":"Public","values":[{"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{"region":"westeurope","addressPrefixes":["192.0.2.0/24"]}}]}"#,
    );
    let cfg = TempFile::new(
        "hub-watched.toml",
        &format!(
            "[proxy]\n{}tls_client_ca = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[[client_policy]]\nname = \"team-a\"\nsources = [\"127.0.0.2/32\"]\nclient_names = [\"ws-a.clients.test\"]\n[client_policy.catalog]\nregion = \"westeurope\"\nservice_tags_file = {:?}\n",
            pc.keys, ca.pem.0, tags.0
        ),
    );
    let p = start_file(&cfg.0).await;
    let (files, before) = p.reloader.baseline();
    for f in [&tags.0, &ca.pem.0] {
        assert!(
            files.contains(f),
            "{} is not watched: {files:?}",
            f.display()
        );
    }
    let again = client_ca("workspace clients, renewed");
    std::fs::copy(&again.pem.0, &ca.pem.0).unwrap();
    assert_ne!(p.reloader.baseline().1, before, "the CA's change is seen");
}

/// A name a client policy's wildcard let through stays on `/allowed` across a reload
/// that still allows it (the reload's clean-up asks every policy, not the default one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_names_a_client_policys_wildcard_allowed() {
    let web = web_upstream().await;
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"x.a.example.test:80\" = \"{web}\" }}\n\n[[client_policy]]\nname = \"team-a\"\nsources = [\"127.0.0.2/32\"]\n[[client_policy.allow]]\nhost = \"*.a.example.test\"\nports = [80]\n"
    );
    let cfg = TempFile::new("hub-allowed.toml", &text);
    let p = start_file(&cfg.0).await;
    let out = curl_from("127.0.0.2", p.addr, "http://x.a.example.test/").await;
    assert!(out.contains("saw x.a.example.test"), "{out}");
    let (_, before) = get(p.admin_addr, "/allowed", None).await;
    assert!(before.contains("x.a.example.test"), "{before}");
    std::fs::write(&cfg.0, format!("{text}# reloaded\n")).unwrap();
    assert!(p.reloader.reload(Trigger::Requested));
    let (_, after) = get(p.admin_addr, "/allowed", None).await;
    assert!(after.contains("x.a.example.test"), "{after}");
}

/// What audit mode lets through reached the destination: `/denied` and `aml-egress
/// denied` say how many of a target's refusals were let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_rows_count_what_audit_mode_let_through() {
    let web = web_upstream().await;
    let text = format!(
        "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"x.example.test:80\" = \"{web}\" }}\n\n[[client_policy]]\nname = \"onboarding\"\nsources = [\"127.0.0.2/32\"]\nmode = \"audit\"\n"
    );
    let cfg = TempFile::new("hub-audit.toml", &text);
    let p = start_file(&cfg.0).await;
    for _ in 0..2 {
        let out = curl_from("127.0.0.2", p.addr, "http://x.example.test/").await;
        assert!(
            out.contains("saw x.example.test"),
            "audit lets it through: {out}"
        );
    }
    let out = curl_from("127.0.0.1", p.addr, "http://x.example.test/").await;
    assert!(out.ends_with("403"), "the default policy enforces: {out}");

    let (_, body) = get(p.admin_addr, "/denied", None).await;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let by_policy = |p: &str| {
        rows.iter()
            .find(|r| r["policy"] == p)
            .unwrap_or_else(|| panic!("{p}: {body}"))
    };
    assert_eq!(by_policy("onboarding")["count"], 2);
    assert_eq!(by_policy("onboarding")["let_through"], 2);
    assert_eq!(by_policy("default")["let_through"], 0);

    let admin = format!("http://{}", p.admin_addr);
    let out =
        support::clients::aml_async(["denied", "--admin", &admin].map(String::from).to_vec()).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().next().unwrap().contains("LET THROUGH"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains("onboarding"))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["2", "2", "x.example.test:80"], "{table}");
}
