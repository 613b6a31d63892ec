//! Selective TLS inspection end to end: a path rule over TLS enforced inside the tunnel
//! with the operator's CA, `Host` held to the tunnel's name, every upstream verified, and
//! tunnels that need no inspection still relayed untouched. Real clients (curl, Python
//! requests), real TLS, and a recording upstream on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TempFile;
use support::clients::curl_async;
use support::net::{read_request_head, upstream};
use support::proxy::start_proxy;
use support::tls::inspection_ca;

/// The CA an upstream's certificates come from (stands in for a public CA).
struct UpstreamCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: TempFile,
}

fn upstream_ca() -> UpstreamCa {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test upstream CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    UpstreamCa {
        pem: TempFile::new("upstream-ca.pem", &cert.pem()),
        issuer: rcgen::Issuer::new(params, key),
    }
}

/// A TLS server side for `name`, its certificate from `ca`.
fn acceptor_for(ca: &UpstreamCa, name: &str) -> tokio_rustls::TlsAcceptor {
    acceptor_offering(ca, name, &[])
}

/// [`acceptor_for`] choosing from `alpn` (in its order of preference) by ALPN.
fn acceptor_offering(ca: &UpstreamCa, name: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut cfg = cfg;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// A TLS client that trusts only the CA in `ca` (PEM).
fn connector_trusting(ca: &TempFile) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca.0).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS upstream with a certificate for `name` from `ca`, answering every request with
/// `saw <path>`; what it received (request heads) is recorded.
async fn recording_upstream(ca: &UpstreamCa, name: &str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let acceptor = acceptor_for(ca, name);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    let addr = upstream(move |s| {
        let (acceptor, rec) = (acceptor.clone(), rec.clone());
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            while let Some(head) = read_request_head(&mut tls).await {
                let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                rec.lock().unwrap().push(head);
                let body = format!("saw {path}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if tls.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

/// A path rule `files.example.test/pkg/*` inspected with `ca`, its upstream at `files`
/// verified through `up_ca`.
fn config(ca: &TempFile, key: &TempFile, up_ca: &UpstreamCa, files: SocketAddr) -> String {
    format!(
        r#"
[[allow]]
host = "files.example.test/pkg/*"
ports = [443]
[inspect]
ca_cert = {:?}
ca_key = {:?}
upstream_ca_file = {:?}
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "files.example.test:443" = "{files}" }}
"#,
        ca.0, key.0, up_ca.pem.0
    )
}

/// `CONNECT name:443` through the proxy, then a TLS session with it trusting only `ca`.
async fn session(
    proxy: SocketAddr,
    name: &str,
    ca: &TempFile,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(format!("CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_request_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    connector_trusting(ca).connect(name, s).await.unwrap()
}

/// Send `raw` and read one response (head, and a body by its Content-Length).
async fn roundtrip<S>(s: &mut S, raw: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
}

/// curl through the proxy: exit code, body, and `%{http_code}` after a newline.
async fn curl(
    proxy: SocketAddr,
    ca: Option<&TempFile>,
    extra: &[&str],
    url: &str,
) -> (i32, String, String) {
    let mut args = vec![
        "--proxy".to_owned(),
        format!("http://{proxy}"),
        "-w".to_owned(),
        "\n%{http_code}".to_owned(),
    ];
    if let Some(ca) = ca {
        args.push("--cacert".into());
        args.push(ca.0.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(url.to_owned());
    curl_async(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_rule_is_enforced_inside_tls_and_the_upstream_sees_only_allowed_requests() {
    let up_ca = upstream_ca();
    let (files, files_seen) = recording_upstream(&up_ca, "files.example.test").await;
    let (wrong, wrong_seen) = recording_upstream(&up_ca, "someone-else.example.test").await;
    let (plain, _) = recording_upstream(&up_ca, "plain.example.test").await;
    let (ca, key) = inspection_ca(&["files.example.test", "mirror.example.test"]);
    let p = start_proxy(&format!(
        r#"
[[allow]]
host = "files.example.test/pkg/*"
ports = [443]
[[allow]]
host = "mirror.example.test/pkg/*"
ports = [443]
[[allow]]
host = "plain.example.test"
ports = [443]
[inspect]
ca_cert = {:?}
ca_key = {:?}
upstream_ca_file = {:?}
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "files.example.test:443" = "{files}", "mirror.example.test:443" = "{wrong}", "plain.example.test:443" = "{plain}" }}
"#,
        ca.0, key.0, up_ca.pem.0
    ))
    .await;

    // An allowed path, twice on one session, through the proxy's certificate.
    let (code, out, err) = curl(
        p.addr,
        Some(&ca),
        &[],
        "https://files.example.test/pkg/a.whl",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "saw /pkg/a.whl\n200"), "{err}");
    let (code, out, err) = curl(p.addr, Some(&ca), &[], "https://files.example.test/evil/x").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n403"), "{out}");
    assert!(out.contains("path"), "{out}");
    // Domain fronting: the session's name is allowed, the Host names another.
    let (code, out, err) = curl(
        p.addr,
        Some(&ca),
        &["-H", "Host: other.example.test"],
        "https://files.example.test/pkg/b.whl",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n403"), "{out}");
    let seen = files_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].starts_with("GET /pkg/a.whl HTTP/1.1"), "{seen:#?}");
    assert!(
        seen[0]
            .to_ascii_lowercase()
            .contains("host: files.example.test\r\n"),
        "{seen:#?}"
    );

    // Python requests with the CA in REQUESTS_CA_BUNDLE.
    let script = "import requests, sys\nr = requests.get(sys.argv[1], proxies={'https': sys.argv[2]}, timeout=20)\nprint(r.status_code, r.text)\n";
    let (proxy, ca_path) = (format!("http://{}", p.addr), ca.0.clone());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, "https://files.example.test/pkg/c.whl", &proxy])
            .env("REQUESTS_CA_BUNDLE", &ca_path)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 saw /pkg/c.whl\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // HTTP/2 between client and proxy (ALPN h2), HTTP/1.1 to the upstream; the same
    // path rule and Host check hold there.
    let (code, out, err) = curl(
        p.addr,
        Some(&ca),
        &["--http2", "-w", "\n%{http_code} %{http_version}"],
        "https://files.example.test/pkg/h2.whl",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "saw /pkg/h2.whl\n200 2"), "{err}");
    let (code, out, err) = curl(
        p.addr,
        Some(&ca),
        &["--http2", "-w", "\n%{http_code} %{http_version}"],
        "https://files.example.test/evil/h2",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n403 2"), "{out}");
    // Domain fronting over h2: the :authority names another host.
    let (code, out, err) = curl(
        p.addr,
        Some(&ca),
        &[
            "--http2",
            "-H",
            "Host: other.example.test",
            "-w",
            "\n%{http_code} %{http_version}",
        ],
        "https://files.example.test/pkg/h2.whl",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n403 2"), "{out}");
    let seen = files_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "only a.whl, c.whl and h2.whl: {seen:#?}");
    files_seen.lock().unwrap().clear();

    // An upstream whose certificate names someone else: 502, nothing sent to it.
    let (code, out, err) = curl(
        p.addr,
        Some(&ca),
        &["-i"],
        "https://mirror.example.test/pkg/a.whl",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n502"), "{out}");
    assert!(out.contains("upstream_certificate_invalid"), "{out}");
    assert!(wrong_seen.lock().unwrap().is_empty());

    // A tunnel that needs no inspection is relayed: the client sees the upstream's own
    // certificate (it trusts the upstream CA, not the proxy's).
    let (code, out, err) = curl(
        p.addr,
        Some(&up_ca.pem),
        &[],
        "https://plain.example.test/anything",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "saw /anything\n200"), "{err}");

    // A client without the CA fails its handshake: counted.
    let (code, _, _) = curl(p.addr, None, &[], "https://files.example.test/pkg/a.whl").await;
    assert_ne!(code, 0);
    p.until_sample("aml_egress_inspect_client_handshake_failures_total", 1.0)
        .await;
    let m = p.metrics().await;
    // Allowed: a.whl, c.whl, h2.whl and the mirror request (allowed, then its upstream
    // failed); refused by path: /evil/x and /evil/h2.
    for line in [
        "aml_egress_inspected_requests_total{decision=\"allow\",reason=\"rule\"} 4",
        "aml_egress_inspected_requests_total{decision=\"deny\",reason=\"path_not_allowed\"} 2",
        "aml_egress_inspected_requests_total{decision=\"deny\",reason=\"host_mismatch\"} 2",
        "aml_egress_inspect_upstream_certificate_failures_total 1",
        "aml_egress_inspect_cached_certificates 2",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
}

/// A TLS client of the proxy's inspected tunnel to `name`, trusting `ca`: whether the
/// handshake completed, and the certificate the proxy showed.
async fn handshake_through(
    proxy: SocketAddr,
    ca: &TempFile,
    name: &str,
) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let (s, resp) =
        support::net::exchange(proxy, &format!("CONNECT {name}:443 HTTP/1.1\r\n\r\n")).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let connector = connector_trusting(ca);
    let sni = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let tls = connector.connect(sni, s).await.ok()?;
    tls.get_ref().1.peer_certificates()?.first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_is_bounded_under_a_flood_of_names_and_each_leaf_names_only_its_host() {
    let (ca, key) = inspection_ca(&[".flood.test"]);
    let p = start_proxy(&format!(
        "[[allow]]\nhost = \"*.flood.test\"\nports = [443]\n[inspect]\nca_cert = {:?}\nca_key = {:?}\nhosts = [\"*.flood.test\"]\nmax_cached_certs = 3\n",
        ca.0, key.0
    ))
    .await;
    for i in 0..12 {
        let name = format!("n{i}.flood.test");
        let leaf = handshake_through(p.addr, &ca, &name)
            .await
            .expect("the handshake completes with the proxy's leaf");
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(sans, [format!("DNSName({name})")]);
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86_400;
        assert!(days <= 4, "{days} days");
    }
    // Each name minted once; only the bound is kept.
    assert_eq!(
        p.sample("aml_egress_inspect_certificates_minted_total")
            .await,
        12.0
    );
    assert_eq!(
        p.sample("aml_egress_inspect_cached_certificates").await,
        3.0
    );
    // A name the policy refuses gets no certificate at all: the CONNECT is refused.
    let (_, resp) =
        support::net::exchange(p.addr, "CONNECT n1.other.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_eq!(
        p.sample("aml_egress_inspect_certificates_minted_total")
            .await,
        12.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ca_refuses_what_needs_inspection_and_nothing_else() {
    let permitted = vec!["files.example.test".to_owned()];
    let long_ago = SystemTime::now() - std::time::Duration::from_secs(10 * 86_400);
    let old = aml_egress::inspect::ca::generate(Some(&permitted), 1, "test", long_ago).unwrap();
    let ca = TempFile::new("expired-ca.pem", &old.cert_pem);
    let key = TempFile::new("expired-ca.key", &old.key_pem);
    std::fs::set_permissions(&key.0, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let echo = support::net::echo_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\ntls_ports = [443]\nopaque_ports = [8443]\n[[allow]]\nhost = \"files.example.test/pkg/*\"\nports = [443]\n[[allow]]\nhost = \"plain.example.test\"\nports = [8443]\n[inspect]\nca_cert = {:?}\nca_key = {:?}\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"plain.example.test:8443\" = \"{echo}\" }}\n",
        ca.0, key.0
    ))
    .await;
    let (_, resp) =
        support::net::exchange(p.addr, "CONNECT files.example.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("inspect_ca_expired"), "{resp}");
    let (_, resp) =
        support::net::exchange(p.addr, "CONNECT plain.example.test:8443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(
        p.sample("aml_egress_inspect_certificates_minted_total")
            .await,
        0.0
    );
}

#[test]
fn check_says_when_a_target_would_be_inspected_and_decides_its_path() {
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let cfg = TempFile::new(
        "check-inspect.toml",
        &format!(
            "[[allow]]\nhost = \"files.example.test/pkg/*\"\nports = [443]\n[inspect]\nca_cert = {:?}\nca_key = {:?}\n",
            ca.0, key.0
        ),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_aml-egress"))
        .args(["check", "--config"])
        .arg(&cfg.0)
        .args([
            "https://files.example.test/pkg/a.whl",
            "https://files.example.test/evil/x",
            "files.example.test:443",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        lines[0].starts_with("allow https://files.example.test/pkg/a.whl")
            && lines[0].ends_with("(inspected)"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("deny https://files.example.test/evil/x path not allowed")
            && lines[1].ends_with("(inspected)"),
        "{text}"
    );
    // Without a path, a tunnel's name alone: the path rule cannot decide it.
    assert!(
        lines[2].starts_with("deny files.example.test:443"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_fields_in_an_inspected_request_are_refused_and_nothing_reaches_the_upstream() {
    let up_ca = upstream_ca();
    let (files, files_seen) = recording_upstream(&up_ca, "files.example.test").await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let mut tls = session(p.addr, "files.example.test", &ca).await;
    tls.write_all(
        b"GET /pkg/a HTTP/1.1\r\nHost: files.example.test\r\nHost: other.example.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tls.read_to_end(&mut got).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(got.contains("host_mismatch"), "{got}");
    assert!(files_seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_offering_neither_h2_nor_http11_to_an_inspected_name_is_refused() {
    use tokio::io::AsyncReadExt;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&format!(
        "[[allow]]\nhost = \"files.example.test/pkg/*\"\nports = [443]\n[inspect]\nca_cert = {:?}\nca_key = {:?}\n",
        ca.0, key.0
    ))
    .await;
    let (mut s, resp) =
        support::net::exchange(p.addr, "CONNECT files.example.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let imap: &[u8] = &[0, 5, 4, b'i', b'm', b'a', b'p'];
    let hello = support::tls::crafted_hello_with(&[b"files.example.test"], 1, &[(16, imap)]);
    s.write_all(&hello).await.unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    // A fatal access_denied alert, and nothing minted.
    assert_eq!(got, support::tls::ACCESS_DENIED);
    let series = "aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"default\",reason=\"tls_alpn_not_inspectable\"}";
    assert_eq!(p.sample(series).await, 1.0);
    assert_eq!(
        p.sample("aml_egress_inspect_certificates_minted_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_ca_for_new_sessions() {
    let (ca1, key1) = inspection_ca(&[".flood.test"]);
    let (ca2, key2) = inspection_ca(&[".flood.test"]);
    let config = |ca: &TempFile, key: &TempFile| {
        format!(
            "[proxy]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[[allow]]\nhost = \"*.flood.test\"\nports = [443]\n[inspect]\nca_cert = {:?}\nca_key = {:?}\nhosts = [\"*.flood.test\"]\n",
            ca.0, key.0
        )
    };
    let cfg = TempFile::new("reload-ca.toml", &config(&ca1, &key1));
    let p = support::proxy::start_file(&cfg.0).await;
    assert!(
        handshake_through(p.addr, &ca1, "a.flood.test")
            .await
            .is_some()
    );
    std::fs::write(&cfg.0, config(&ca2, &key2)).unwrap();
    assert!(p.reloader.reload(aml_egress::reload::Trigger::Requested));
    // The same name, minted again under the new CA: a client of the old one refuses it.
    assert!(
        handshake_through(p.addr, &ca2, "a.flood.test")
            .await
            .is_some()
    );
    assert!(
        handshake_through(p.addr, &ca1, "a.flood.test")
            .await
            .is_none()
    );
}

/// A TLS upstream for `name` (certificate from `ca`) serving `files` by path, the query
/// ignored (200 with the bytes, 404 otherwise); the request lines it received are recorded.
async fn file_upstream(
    ca: &UpstreamCa,
    name: &str,
    files: Vec<(String, Vec<u8>)>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let acceptor = acceptor_for(ca, name);
    let files = Arc::new(files);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    let addr = upstream(move |s| {
        let (acceptor, rec, files) = (acceptor.clone(), rec.clone(), files.clone());
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            while let Some(head) = read_request_head(&mut tls).await {
                let line = head.lines().next().unwrap_or_default().to_owned();
                let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                rec.lock().unwrap().push(line);
                // By path alone: git's first request asks `info/refs?service=...`, and a
                // plain file there tells it the server is a "dumb" one.
                let file = path.split('?').next().unwrap_or_default();
                let (status, body) = match files.iter().find(|(p, _)| p == file) {
                    Some((_, b)) => ("200 OK", b.clone()),
                    None => ("404 Not Found", b"not here".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: text/html\r\n\r\n",
                    body.len()
                );
                if tls.write_all(head.as_bytes()).await.is_err()
                    || tls.write_all(&body).await.is_err()
                {
                    return;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_downloads_from_an_inspected_index_under_a_path_rule_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("aml-egress-pip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A real wheel, made by Python's zipfile (the format pip checks).
    let wheel = dir.join("demo_pkg-1.0-py3-none-any.whl");
    let made = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1], 'w')\nz.writestr('demo_pkg/__init__.py', '')\nz.writestr('demo_pkg-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\\nName: demo-pkg\\nVersion: 1.0\\n')\nz.writestr('demo_pkg-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n')\nz.writestr('demo_pkg-1.0.dist-info/RECORD', '')\nz.close()\n")
        .arg(&wheel)
        .status()
        .unwrap();
    assert!(made.success());
    let bytes = std::fs::read(&wheel).unwrap();
    let index = b"<!DOCTYPE html><html><body><a href=\"/pkg/files/demo_pkg-1.0-py3-none-any.whl\">demo_pkg-1.0-py3-none-any.whl</a></body></html>".to_vec();
    let up_ca = upstream_ca();
    let (files, seen) = file_upstream(
        &up_ca,
        "files.example.test",
        vec![
            ("/pkg/simple/demo-pkg/".into(), index.clone()),
            ("/other/simple/demo-pkg/".into(), index),
            ("/pkg/files/demo_pkg-1.0-py3-none-any.whl".into(), bytes),
        ],
    )
    .await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let pip = |index: &str, into: &std::path::Path| {
        let (proxy, ca, index, into) = (
            format!("http://{}", p.addr),
            ca.0.clone(),
            index.to_owned(),
            into.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir"])
                .args([
                    "--disable-pip-version-check",
                    "--retries",
                    "0",
                    "--timeout",
                    "20",
                ])
                .arg("--index-url")
                .arg(index)
                .arg("--proxy")
                .arg(proxy)
                .arg("--cert")
                .arg(ca)
                .arg("-d")
                .arg(into)
                .arg("demo-pkg")
                // The machine's own pip and TLS settings stay out of the test.
                .env("PIP_CONFIG_FILE", "/dev/null")
                .env_remove("PIP_INDEX_URL")
                .env_remove("PIP_CERT")
                .env_remove("PIP_FIND_LINKS")
                .env_remove("REQUESTS_CA_BUNDLE")
                .env_remove("CURL_CA_BUNDLE")
                .env_remove("SSL_CERT_FILE")
                .env_remove("SSL_CERT_DIR")
                .env_remove("HTTPS_PROXY")
                .env_remove("https_proxy")
                .output()
                .expect("python3 with pip is installed (.ci/run installs it)")
        })
    };
    let got = dir.join("got");
    let out = pip("https://files.example.test/pkg/simple/", &got)
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(got.join("demo_pkg-1.0-py3-none-any.whl").exists());
    // The same index under another path of the same host: refused inside TLS.
    let other = dir.join("other");
    let out = pip("https://files.example.test/other/simple/", &other)
        .await
        .unwrap();
    assert!(!out.status.success());
    let lines = seen.lock().unwrap().clone();
    assert!(
        lines.iter().all(|l| l.contains(" /pkg/")),
        "the upstream saw a refused path: {lines:#?}"
    );
    assert_eq!(lines.len(), 2, "{lines:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every file under `root`, as (`prefix` + its path under root, contents).
fn files_under(root: &std::path::Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((format!("{prefix}/{rel}"), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clones_over_https_through_an_inspected_path_rule() {
    let dir = std::env::temp_dir().join(format!("aml-egress-git-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let git = |args: &[&str], cwd: &std::path::Path| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("HOME", &dir)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env_remove("GIT_SSL_CAINFO")
            .output()
            .expect("git is installed")
    };
    // A bare repository with one commit, served as files (git's "dumb" HTTP protocol).
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    assert!(git(&["init", "-q", "-b", "main"], &work).status.success());
    std::fs::write(work.join("README"), "cloned through the proxy\n").unwrap();
    assert!(git(&["add", "README"], &work).status.success());
    let commit = git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.test",
            "commit",
            "-q",
            "-m",
            "one",
        ],
        &work,
    );
    assert!(
        commit.status.success(),
        "{}",
        String::from_utf8_lossy(&commit.stderr)
    );
    let bare = dir.join("repo.git");
    assert!(
        git(
            &[
                "clone",
                "-q",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap()
            ],
            &dir
        )
        .status
        .success()
    );
    assert!(git(&["update-server-info"], &bare).status.success());
    let up_ca = upstream_ca();
    let (files, seen) = file_upstream(
        &up_ca,
        "files.example.test",
        files_under(&bare, "/pkg/repo.git"),
    )
    .await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let clone = |url: &str, into: &str| {
        let (dir, proxy, ca, url, into) = (
            dir.clone(),
            format!("http://{}", p.addr),
            ca.0.clone(),
            url.to_owned(),
            into.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("git")
                .args(["clone", "-q", &url, &into])
                .current_dir(&dir)
                .env("HOME", &dir)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_TERMINAL_PROMPT", "0")
                .env("GIT_SSL_CAINFO", &ca)
                .env("https_proxy", &proxy)
                .env_remove("HTTPS_PROXY")
                .env_remove("no_proxy")
                .env_remove("NO_PROXY")
                .output()
                .unwrap()
        })
    };
    let out = clone("https://files.example.test/pkg/repo.git", "cloned")
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("cloned/README")).unwrap(),
        "cloned through the proxy\n"
    );
    let out = clone("https://files.example.test/other/repo.git", "refused")
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .all(|l| l.contains(" /pkg/repo.git/")),
        "{:#?}",
        seen.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A path rule matches byte for byte so that nothing an upstream might normalise out of
/// the prefix ever matches (`..`, `%2e`, `\`, `;`). Raw non-ASCII in the request target
/// (which no conforming client sends: RFC 3986 percent-encodes it, and `%` is refused
/// already) slipped through: `/pkg/．．/evil` (U+FF0E), `/pkg/‥/evil` (U+2025) and
/// `/pkg/／..／evil` (U+FF0F) reach the upstream, which after Unicode (NFKC)
/// normalisation, as some frameworks and IIS's best-fit mapping do, serves `/evil`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_lookalikes_of_dots_and_slashes_never_match_a_path_rule() {
    let up_ca = upstream_ca();
    let (files, seen) = recording_upstream(&up_ca, "files.example.test").await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let mut s = session(p.addr, "files.example.test", &ca).await;
    for path in [
        "/pkg/\u{ff0e}\u{ff0e}/evil",
        "/pkg/\u{2025}/evil",
        "/pkg/\u{ff0f}..\u{ff0f}evil",
        "/pkg/x\u{ff3c}..\u{ff3c}..\u{ff3c}evil",
    ] {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: files.example.test\r\n\r\n");
        let answer = roundtrip(&mut s, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{path}: {answer}");
    }
    // The session still works for an allowed path; only that reached the upstream.
    let answer = roundtrip(
        &mut s,
        b"GET /pkg/ok HTTP/1.1\r\nHost: files.example.test\r\n\r\n",
    )
    .await;
    assert!(answer.ends_with("saw /pkg/ok"), "{answer}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:#?}");
}

/// Each minted leaf got its own `ServerConfig` with rustls' default session store (256
/// sessions, two TLS 1.3 tickets stored per handshake). With a wildcard path rule a client
/// fills `inspect.max_cached_certs` (10000) leaves' stores: measured on loopback, about
/// 150 kB more per leaf (20 names × 128 handshakes: +3.3 MB; one name × 2560: +0.3 MB), so
/// some 1.5 GB at the default bound where the certificates themselves are ~10 MB. The
/// leaves must share one bounded store (rustls refuses to resume across names anyway,
/// RFC 6066 §3).
#[test]
fn minted_leaves_share_one_bounded_session_store() {
    let (ca, key) = inspection_ca(&[".wild.example.test"]);
    let c = support::compiled(&format!(
        r#"
[[allow]]
host = "*.wild.example.test/pkg/*"
ports = [443]
[inspect]
ca_cert = {:?}
ca_key = {:?}
"#,
        ca.0, key.0
    ));
    let metrics = Arc::new(aml_egress::metrics::Metrics::new(16));
    let inspector = aml_egress::proxy::inspect::Inspector::new(c.inspect, metrics).unwrap();
    let a = inspector.server_config("a.wild.example.test").unwrap();
    let b = inspector.server_config("b.wild.example.test").unwrap();
    let key = b"a session id of some client".to_vec();
    assert!(a.session_storage.put(key.clone(), b"state".to_vec()));
    assert_eq!(
        b.session_storage.get(&key).as_deref(),
        Some(&b"state"[..]),
        "each leaf has a session store of its own"
    );
}

#[test]
fn a_client_distrusting_the_ca_is_counted_each_time_and_logged_once_a_minute_per_name() {
    let (ca, key) = inspection_ca(&[".wild.example.test"]);
    let c = support::compiled(&format!(
        "[[allow]]\nhost = \"*.wild.example.test/pkg/*\"\nports = [443]\n[inspect]\nca_cert = {:?}\nca_key = {:?}\n",
        ca.0, key.0
    ));
    let metrics = Arc::new(aml_egress::metrics::Metrics::new(16));
    let inspector = aml_egress::proxy::inspect::Inspector::new(c.inspect, metrics.clone()).unwrap();
    assert!(inspector.handshake_failed("a.wild.example.test"));
    assert!(!inspector.handshake_failed("a.wild.example.test"));
    assert!(inspector.handshake_failed("b.wild.example.test"));
    assert_eq!(metrics.inspect_client_failures.get(), 3);
}

/// A TLS upstream for `name` that accepts a WebSocket handshake on any path (a `101`, then
/// an echo of whatever bytes follow), and answers `101` even to a request that did not ask
/// to upgrade when its path ends in `/switch`; request heads are recorded.
async fn websocket_upstream(
    ca: &UpstreamCa,
    name: &str,
    alpn: &[&[u8]],
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let acceptor = acceptor_offering(ca, name, alpn);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    let addr = upstream(move |s| {
        let (acceptor, rec) = (acceptor.clone(), rec.clone());
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let Some(head) = read_request_head(&mut tls).await else {
                return;
            };
            rec.lock().unwrap().push(head.clone());
            let lower = head.to_ascii_lowercase();
            if !lower.contains("\r\nupgrade: websocket") && !lower.starts_with("get /pkg/switch") {
                let _ = tls
                    .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
            let switched = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
            if tls.write_all(switched.as_bytes()).await.is_err() {
                return;
            }
            let mut buf = [0u8; 1024];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tls.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_on_an_allowed_inspected_path_is_relayed_after_the_101_and_only_there() {
    let up_ca = upstream_ca();
    // It prefers h2, as real servers do: a handshake must reach it over HTTP/1.1 anyway.
    let (files, files_seen) =
        websocket_upstream(&up_ca, "files.example.test", &[b"h2", b"http/1.1"]).await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let handshake = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: files.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };

    // Allowed path: the 101 arrives with its upgrade fields, then bytes go both ways.
    let mut tls = session(p.addr, "files.example.test", &ca).await;
    tls.write_all(handshake("/pkg/ws").as_bytes())
        .await
        .unwrap();
    let head = read_request_head(&mut tls).await.unwrap();
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(lower.contains("\r\nupgrade: websocket"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade"), "{head}");
    assert!(lower.contains("sec-websocket-accept: "), "{head}");
    for frame in [
        &b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"[..],
        b"second message",
    ] {
        tls.write_all(frame).await.unwrap();
        let mut back = vec![0u8; frame.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, frame);
    }
    let up_head = files_seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(up_head.starts_with("get /pkg/ws "), "{up_head}");
    assert!(up_head.contains("\r\nupgrade: websocket"), "{up_head}");
    assert!(up_head.contains("sec-websocket-key: "), "{up_head}");
    drop(tls);

    // Another path on the same host: refused before the upstream hears of it.
    let mut tls = session(p.addr, "files.example.test", &ca).await;
    let got = roundtrip(&mut tls, handshake("/other/ws").as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 403"), "{got}");
    assert!(got.contains("path_not_allowed"), "{got}");
    assert_eq!(files_seen.lock().unwrap().len(), 1);

    // A 101 the request did not ask for is not passed on (from an HTTP/1.1-only upstream:
    // over h2 there is no 101).
    let (files, files_seen) = websocket_upstream(&up_ca, "files.example.test", &[]).await;
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let mut tls = session(p.addr, "files.example.test", &ca).await;
    let got = roundtrip(
        &mut tls,
        b"GET /pkg/switch HTTP/1.1\r\nHost: files.example.test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    assert!(got.contains("http_upgrade_failed"), "{got}");
    let switch_head = files_seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(!switch_head.contains("upgrade"), "{switch_head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_httpclient_with_a_trust_store_gets_allowed_paths_over_h2_and_403_elsewhere() {
    let up_ca = upstream_ca();
    let (files, files_seen) = recording_upstream(&up_ca, "files.example.test").await;
    // A constraint as `ca init` writes it for `*.example.test`: older JDKs refused a
    // leading-dot DNS constraint (JDK-8311546), which would fail every handshake.
    let (ca, key) = inspection_ca(&[".example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    // The trust store compute would have: the inspection CA imported with keytool.
    let store = ca.0.with_extension("p12");
    let imported = std::process::Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-alias",
            "aml-egress-inspection",
        ])
        .args(["-storetype", "PKCS12", "-storepass", "changeit"])
        .arg("-file")
        .arg(&ca.0)
        .arg("-keystore")
        .arg(&store)
        .output()
        .expect("keytool is installed (.ci/run installs a JDK)");
    assert!(imported.status.success(), "{imported:?}");
    let program = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/ProxyGet.java");
    let proxy = p.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("java")
            .arg(format!("-Djavax.net.ssl.trustStore={}", store.display()))
            .args([
                "-Djavax.net.ssl.trustStorePassword=changeit",
                "-Djavax.net.ssl.trustStoreType=PKCS12",
                program,
                &proxy,
                "https://files.example.test/pkg/a.jar",
                "https://files.example.test/evil/x.jar",
            ])
            .env_remove("JAVA_TOOL_OPTIONS")
            .output()
            .expect("java is installed (.ci/run installs a JDK)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "200 HTTP_2 saw /pkg/a.jar", "{stdout}");
    assert!(lines[1].starts_with("403 HTTP_2 "), "{stdout}");
    assert!(lines[1].contains("path not allowed"), "{stdout}");
    let seen = files_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(seen[0].starts_with("GET /pkg/a.jar HTTP/1.1"), "{seen:#?}");
}

/// A TLS upstream for `name` that prefers `h2` by ALPN and answers each request with
/// `saw <path> over <version>`, served by hyper; it records `<version> <path>`.
async fn h2_upstream(ca: &UpstreamCa, name: &str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let acceptor = acceptor_offering(ca, name, &[b"h2", b"http/1.1"]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    let addr = upstream(move |s| {
        let (acceptor, rec) = (acceptor.clone(), rec.clone());
        async move {
            let Ok(tls) = acceptor.accept(s).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let line = format!("{:?} {}", req.version(), req.uri().path());
                    rec.lock().unwrap().push(line.clone());
                    let body = format!("saw {line}");
                    async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(tls);
            if io.inner().get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
            } else {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            }
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_chooses_h2_is_spoken_to_in_h2_whatever_the_client_speaks() {
    let up_ca = upstream_ca();
    let (files, files_seen) = h2_upstream(&up_ca, "files.example.test").await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    for (flag, path) in [("--http1.1", "/pkg/one"), ("--http2", "/pkg/two")] {
        let url = format!("https://files.example.test{path}");
        let (code, out, err) = curl(p.addr, Some(&ca), &[flag], &url).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, format!("saw HTTP/2.0 {path}\n200"), "{err}");
    }
    let (code, out, err) = curl(p.addr, Some(&ca), &[], "https://files.example.test/evil").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("\n403"), "{out}");
    assert_eq!(
        *files_seen.lock().unwrap(),
        ["HTTP/2.0 /pkg/one", "HTTP/2.0 /pkg/two"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_session_is_closed_after_the_idle_timeout() {
    use rustls::pki_types::pem::PemObject;
    let up_ca = upstream_ca();
    let (files, _) = recording_upstream(&up_ca, "files.example.test").await;
    let (ca, key) = inspection_ca(&["files.example.test"]);
    let cfg = config(&ca, &key, &up_ca, files);
    let p = start_proxy(&format!("[proxy]\nidle_timeout_secs = 0.5\n{cfg}")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"CONNECT files.example.test:443 HTTP/1.1\r\nHost: files.example.test:443\r\n\r\n")
        .await
        .unwrap();
    let head = read_request_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca.0).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("files.example.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
        .connect(name, s)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get("https://files.example.test/pkg/a")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Then nothing: the proxy ends the connection (GOAWAY, close), which ends the client's
    // connection task. The bound only turns a session left open into a failure.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
    assert!(
        ended.is_ok(),
        "the idle h2 session was still open after 60 s"
    );
}
