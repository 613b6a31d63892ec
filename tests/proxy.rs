//! The forward proxy end to end: the proxy on 127.0.0.1:0, upstreams on 127.0.0.1:0 (plain
//! HTTP, TLS with an rcgen certificate for catalog names, a TCP echo), reached through
//! `upstream.connect_to`, and real `curl` as the client. No sleeps as synchronisation.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use aml_egress::loader;
use aml_egress::proxy::{self, ProxyConfig, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use support::{TempFile, settings};

struct Proxy {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<usize>,
}

/// Start the proxy with a config (TOML); `{HTTP}`, `{TLS}` and `{ECHO}` in it are replaced
/// by the upstream addresses.
async fn start_proxy(toml: &str) -> Proxy {
    let s = settings(toml).unwrap_or_else(|e| panic!("{e}"));
    let built = loader::build(&s).unwrap_or_else(|e| panic!("{e}"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ProxyConfig::from_settings(&s, vec![addr]);
    let (stop, stopping) = watch::channel(false);
    let shared = Arc::new(Shared {
        built: Arc::new(built),
        config,
        tracker: Default::default(),
        stopping,
    });
    let done = tokio::spawn(proxy::run(vec![listener], shared));
    Proxy { addr, stop, done }
}

/// A plain HTTP upstream answering with what it received.
async fn http_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&got).to_lowercase();
                let body = format!("upstream saw:\n{head}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// A TLS upstream with a self-signed certificate for `names`; returns its address and the
/// certificate (PEM) for curl's `--cacert`.
async fn tls_upstream(names: &[&str]) -> (SocketAddr, TempFile) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let pem = TempFile::new("ca.pem", &ck.cert.pem());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let body = "hello over TLS\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, pem)
}

/// A TCP echo upstream.
async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--noproxy", ""])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn curl_async(args: Vec<String>) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&a)
    })
    .await
    .unwrap()
}

fn pins(http: SocketAddr, tls: SocketAddr) -> String {
    format!(
        r#"
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "login.microsoftonline.com:443" = "{tls}", "pypi.org:80" = "{http}", "raw.githubusercontent.com:80" = "{http}" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_an_allowed_tls_host_and_is_refused_a_denied_one() {
    let http = http_upstream().await;
    let (tls, ca) = tls_upstream(&["login.microsoftonline.com"]).await;
    let p = start_proxy(&pins(http, tls)).await;
    let proxy = format!("http://{}", p.addr);
    let ca = ca.0.to_str().unwrap().to_owned();

    let (code, body, err) = curl_async(vec![
        "-x".into(),
        proxy.clone(),
        "--cacert".into(),
        ca.clone(),
        "https://login.microsoftonline.com/".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello over TLS\n");

    let (code, _, err) = curl_async(vec![
        "-x".into(),
        proxy.clone(),
        "-w".into(),
        "%{http_connect}".into(),
        "https://notpytorch.org/".into(),
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "curl should report the 403: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_connect_gets_403_with_proxy_status_and_a_reason() {
    let p = start_proxy("").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"CONNECT notpytorch.org:443 HTTP/1.1\r\nHost: notpytorch.org:443\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]).to_lowercase();
    assert!(resp.starts_with("http/1.1 403"), "{resp}");
    assert!(
        resp.contains(
            "proxy-status: aml-egress; error=destination_not_allowed; details=\"no_matching_rule\""
        ),
        "{resp}"
    );
    assert!(resp.contains("nearest: pytorch.org"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_is_forwarded_by_authority_with_host_rewritten_and_proxy_headers_removed() {
    let http = http_upstream().await;
    let (tls, _ca) = tls_upstream(&["login.microsoftonline.com"]).await;
    let p = start_proxy(&pins(http, tls)).await;
    let (code, body, err) = curl_async(vec![
        "-x".into(),
        format!("http://{}", p.addr),
        "-H".into(),
        "Host: evil.example.com".into(),
        "-H".into(),
        "Proxy-Authorization: Basic secret".into(),
        "http://pypi.org/simple/requests/".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(body.contains("get /simple/requests/ http/1.1"), "{body}");
    assert!(body.contains("host: pypi.org"), "{body}");
    assert!(!body.contains("evil.example.com"), "{body}");
    assert!(!body.contains("proxy-authorization"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_tls_name_is_not_allowed_is_closed() {
    let http = http_upstream().await;
    let (tls, ca) = tls_upstream(&["login.microsoftonline.com", "evil.example.com"]).await;
    let p = start_proxy(&pins(http, tls)).await;
    // curl sends CONNECT login.microsoftonline.com:443 but a ClientHello for evil.example.com.
    let (code, _, err) = curl_async(vec![
        "-x".into(),
        format!("http://{}", p.addr),
        "--cacert".into(),
        ca.0.to_str().unwrap().into(),
        "--connect-to".into(),
        "evil.example.com:443:login.microsoftonline.com:443".into(),
        "https://evil.example.com/".into(),
    ])
    .await;
    assert_ne!(code, 0, "the tunnel must not carry a denied TLS name");
    assert!(
        !err.contains("403"),
        "the CONNECT itself was allowed: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_guard_refuses_loopback_unless_exempted() {
    let echo = echo_upstream().await;
    let rule = "[[allow]]\ncidr = \"127.0.0.0/8\"\nports = [\"1-65535\"]\n";
    let p = start_proxy(rule).await;
    let (_, body, _) = curl_async(vec![
        "-x".into(),
        format!("http://{}", p.addr),
        format!("http://{echo}/"),
    ])
    .await;
    assert!(
        body.contains("could not reach") && body.contains("upstream.allow_cidrs"),
        "{body}"
    );
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = s.read(&mut buf).await.unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.contains("error=destination_ip_prohibited; details=\"forbidden_address\""),
        "{resp}"
    );

    // The proxy's own socket is refused even when loopback is exempted.
    let p2 = start_proxy(&format!(
        "{rule}[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\n"
    ))
    .await;
    let mut s = TcpStream::connect(p2.addr).await.unwrap();
    s.write_all(format!("CONNECT {} HTTP/1.1\r\n\r\n", p2.addr).as_bytes())
        .await
        .unwrap();
    let n = s.read(&mut buf).await.unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.contains("forbidden_address"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_clients_get_503_at_once() {
    let p = start_proxy("[proxy]\nmax_connections = 1\n").await;
    let _held = TcpStream::connect(p.addr).await.unwrap();
    let mut second = TcpStream::connect(p.addr).await.unwrap();
    let mut resp = String::new();
    second.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("connection_limit"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_gets_408_and_is_closed() {
    let p = start_proxy("[proxy]\nheader_timeout_secs = 0.2\n").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_gets_431() {
    let p = start_proxy("[proxy]\nmax_header_bytes = 8192\n").await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let big = format!(
        "GET http://pypi.org/ HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let _ = s.write_all(big.as_bytes()).await;
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_drains_an_open_tunnel() {
    let echo = echo_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\ntls_ports = []\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\" }}\n"
    ))
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    p.stop.send(true).unwrap();
    // The open tunnel keeps working during the grace period.
    s.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here");
    assert!(!p.done.is_finished());
    // Closing the tunnel lets the proxy finish with nothing left open.
    drop(s);
    assert_eq!(p.done.await.unwrap(), 0);
    assert!(
        TcpStream::connect(p.addr).await.is_err(),
        "listener still accepting after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_lets_policy_denials_through_but_keeps_operator_denies() {
    let http = http_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\nmode = \"audit\"\n[[deny]]\nhost = \"blocked.example.com\"\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"notpytorch.org:80\" = \"{http}\", \"blocked.example.com:80\" = \"{http}\" }}\n"
    ))
    .await;
    let proxy = format!("http://{}", p.addr);
    let (code, body, err) = curl_async(vec![
        "-x".into(),
        proxy.clone(),
        "http://notpytorch.org/x".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(body.contains("upstream saw"), "{body}");
    let (_, body, _) = curl_async(vec![
        "-x".into(),
        proxy,
        "http://blocked.example.com/".into(),
    ])
    .await;
    assert!(
        body.contains("refused") && body.contains("[[deny]]"),
        "{body}"
    );
}
