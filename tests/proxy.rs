//! The forward proxy end to end: the proxy on 127.0.0.1:0, upstreams on 127.0.0.1:0 (plain
//! HTTP, TLS with an rcgen certificate for catalog names, a TCP echo), reached through
//! `upstream.connect_to`, and real `curl` as the client. No sleeps as synchronisation.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use aml_egress::logs::LogBudget;
use aml_egress::metrics::Metrics;
use aml_egress::runtime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TempFile;
use support::net::{echo_upstream, exchange, read_request_head, upstream};
use support::proxy::{Proxy, start_proxy};

/// A plain HTTP upstream answering with what it received.
async fn http_upstream() -> SocketAddr {
    upstream(|mut s| async move {
        let Some(head) = read_request_head(&mut s).await else {
            return;
        };
        let body = format!("upstream saw:\n{}", head.to_lowercase());
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
    })
    .await
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
    let addr = upstream(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            if read_request_head(&mut tls).await.is_none() {
                return;
            }
            let body = "hello over TLS\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
    .await;
    (addr, pem)
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
    let (_, resp) = exchange(
        p.addr,
        "CONNECT notpytorch.org:443 HTTP/1.1\r\nHost: notpytorch.org:443\r\n\r\n",
    )
    .await;
    let resp = resp.to_lowercase();
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
    let (_, resp) = exchange(p.addr, &format!("CONNECT {echo} HTTP/1.1\r\n\r\n")).await;
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
    let (_, resp) = exchange(p2.addr, &format!("CONNECT {} HTTP/1.1\r\n\r\n", p2.addr)).await;
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
    let (p, mut s) = open_echo_tunnel("").await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_resolved_once_by_the_configured_dns_and_failures_are_answered() {
    use std::net::IpAddr;
    let echo = echo_upstream().await;
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let dns =
        support::dns::responder(&[("echo.example.test", &[lo]), ("loop.example.test", &[lo])])
            .await;
    let allow = "[[allow]]\nhost = \"*.example.test\"\nports = [\"1-65535\"]\n";
    let p = start_proxy(&format!(
        "[proxy]\ntls_ports = []\n{allow}[upstream]\nname_servers = [\"{}\"]\n",
        dns.addr
    ))
    .await;
    // A name that does not exist: 502 with the DNS error.
    let (_, resp) = exchange(p.addr, "CONNECT gone.example.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert!(resp.contains("error=dns_error"), "{resp}");
    // A name that resolves to loopback: the address guard refuses it.
    let (_, resp) = exchange(p.addr, "CONNECT loop.example.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("details=\"forbidden_address\""), "{resp}");
    assert!(dns.asked_for("loop.example.test") >= 1);

    // With loopback exempted, the tunnel goes to exactly the address the DNS gave.
    // The echo speaks neither TLS nor HTTP: its port is opaque (relayed uninspected).
    let p = start_proxy(&format!(
        "[proxy]\ntls_ports = []\nopaque_ports = [{}]\n{allow}[upstream]\nname_servers = [\"{}\"]\nallow_cidrs = [\"127.0.0.1/32\"]\n",
        echo.port(),
        dns.addr
    ))
    .await;
    let head = format!("CONNECT echo.example.test:{} HTTP/1.1\r\n\r\n", echo.port());
    let (mut s, resp) = exchange(p.addr, &head).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    // One look-up (an A and an AAAA question) per name, and the address is cached for its
    // TTL. (The empty AAAA answer carries no SOA, so it is not cached and asked again.)
    assert_eq!(dns.asked_type("echo.example.test", Some(1)), 1);
    assert_eq!(dns.asked_type("echo.example.test", Some(28)), 1);
    let (_, resp) = exchange(p.addr, &head).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(dns.asked_type("echo.example.test", Some(1)), 1);
}

/// A certificate for the proxy's own TLS listener (for 127.0.0.1): the key pair, its
/// files, and the `[proxy]` lines that use them.
struct ProxyCert {
    ck: rcgen::CertifiedKey<rcgen::KeyPair>,
    cert: TempFile,
    _key: TempFile,
    keys: String,
}

fn proxy_cert() -> ProxyCert {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = TempFile::new("proxy.pem", &ck.cert.pem());
    let key = TempFile::new("proxy.key", &ck.signing_key.serialize_pem());
    let keys = format!(
        "tls_listen = [\"127.0.0.1:0\"]\ntls_cert = {:?}\ntls_key = {:?}\n",
        cert.0, key.0
    );
    ProxyCert {
        ck,
        cert,
        _key: key,
        keys,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_the_proxy_over_tls() {
    let (tls, ca) = tls_upstream(&["login.microsoftonline.com"]).await;
    let pc = proxy_cert();
    let cert = &pc.cert;
    let p = start_proxy(&format!(
        "[proxy]\n{}[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"login.microsoftonline.com:443\" = \"{tls}\" }}\n",
        pc.keys
    ))
    .await;
    let (code, body, err) = curl_async(vec![
        "--proxy".into(),
        format!("https://{}", p.tls_addr.unwrap()),
        "--proxy-cacert".into(),
        cert.0.to_str().unwrap().into(),
        "--cacert".into(),
        ca.0.to_str().unwrap().into(),
        "https://login.microsoftonline.com/".into(),
    ])
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "hello over TLS\n");
    // A denied host is refused over the TLS hop too.
    let (code, _, err) = curl_async(vec![
        "--proxy".into(),
        format!("https://{}", p.tls_addr.unwrap()),
        "--proxy-cacert".into(),
        cert.0.to_str().unwrap().into(),
        "https://example.com/".into(),
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
}

#[test]
fn a_bad_proxy_certificate_is_a_clear_startup_error() {
    let junk = TempFile::new("junk.pem", "not a certificate\n");
    let c = support::compiled(&format!(
        "[proxy]\ntls_listen = [\"127.0.0.1:0\"]\ntls_cert = {:?}\ntls_key = {:?}\n",
        junk.0, junk.0
    ));
    let metrics = Arc::new(Metrics::new(10));
    let logs = Arc::new(LogBudget::new(10, metrics.suppressed_lines()));
    let err = runtime::live(c, vec![], metrics, logs)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("proxy.tls_cert") && err.contains("junk.pem"),
        "{err}"
    );
}

/// A keep-alive HTTP upstream that counts the connections it accepts.
async fn keepalive_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = upstream(move |mut s| {
        count.fetch_add(1, Ordering::SeqCst);
        async move {
            while read_request_head(&mut s).await.is_some() {
                let body = "kept alive\n";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_reuses_pooled_upstream_connections() {
    let (up, accepted) = keepalive_upstream().await;
    let p = start_proxy(&format!(
        "[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:80\" = \"{up}\" }}\n"
    ))
    .await;
    for _ in 0..3 {
        // Separate curl processes: separate client connections to the proxy.
        let (code, body, err) = curl_async(vec![
            "-x".into(),
            format!("http://{}", p.addr),
            "http://pypi.org/simple/".into(),
        ])
        .await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(body, "kept alive\n");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A proxy (with `proxy_keys` in its `[proxy]` section) pinning pypi.org:443 to a TCP echo,
/// and a tunnel through it that has carried one byte each way. Port 443 is opaque there:
/// the echo speaks no TLS.
async fn open_echo_tunnel(proxy_keys: &str) -> (Proxy, TcpStream) {
    let echo = echo_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\ntls_ports = []\nopaque_ports = [443]\n{proxy_keys}[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\" }}\n"
    ))
    .await;
    let (mut s, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    (p, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let (_p, mut s) = open_echo_tunnel("idle_timeout_secs = 0.3\n").await;
    // Nothing more either way: the proxy closes the tunnel (well before the 10 s bound).
    let rest = until_closed(&mut s).await.expect("tunnel closed");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_still_open_when_the_grace_period_ends_are_closed() {
    let (p, mut s) = open_echo_tunnel("grace_period_secs = 0.2\n").await;
    p.stop.send(true).unwrap();
    // The tunnel (and its client connection) were still open at the deadline.
    let left = p.done.await.unwrap();
    assert!(left >= 1, "{left}");
    let rest = until_closed(&mut s).await.expect("tunnel closed");
    assert!(rest.is_empty());
}

/// A proxy (with `proxy_keys` in its `[proxy]` section) in front of a keep-alive upstream,
/// and a client connection that has had one answered request.
async fn after_one_keep_alive_request(proxy_keys: &str) -> (Proxy, TcpStream) {
    let (up, _) = keepalive_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\n{proxy_keys}[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:80\" = \"{up}\" }}\n"
    ))
    .await;
    let head = "GET http://pypi.org/simple/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n";
    let (s, first) = exchange(p.addr, head).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(first.ends_with("kept alive\n"), "{first}");
    (p, s)
}

/// Everything the proxy still sends until it closes; `None` if it has not closed in 10 s.
async fn until_closed(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut rest = Vec::new();
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    matches!(read, Ok(Ok(_))).then_some(rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_second_head_on_a_keep_alive_connection_gets_408() {
    let (_p, mut s) = after_one_keep_alive_request("header_timeout_secs = 0.3\n").await;
    // Half of a second head, then nothing.
    s.write_all(b"GET http://pypi.org/other HTTP/1.1\r\nHo")
        .await
        .unwrap();
    let rest = until_closed(&mut s).await.expect("connection closed");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 408"), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_quietly() {
    let keys = "header_timeout_secs = 0.2\nidle_timeout_secs = 0.5\n";
    let (_p, mut s) = after_one_keep_alive_request(keys).await;
    // Quiet past the header timeout: still open, since no head was begun; then closed
    // without a word once idle for idle_timeout_secs.
    let rest = until_closed(&mut s).await.expect("connection closed");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_count_against_the_connection_limit() {
    // The tunnel has carried bytes, so hyper has let go of its connection.
    let (p, _tunnel) = open_echo_tunnel("max_connections = 1\n").await;
    let mut second = TcpStream::connect(p.addr).await.unwrap();
    let mut refused = String::new();
    second.read_to_string(&mut refused).await.unwrap();
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_through_the_tls_listener_outlives_the_header_timeout() {
    let echo = echo_upstream().await;
    let pc = proxy_cert();
    let p = start_proxy(&format!(
        "[proxy]\nheader_timeout_secs = 0.2\ntls_ports = []\nopaque_ports = [443]\n{}[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\" }}\n",
        pc.keys
    ))
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pc.ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(p.tls_addr.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = connector.connect(name, tcp).await.unwrap();
    s.write_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(b"first").await.unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).await.unwrap();
    // The scenario is time passing: a quiet tunnel, longer than the header timeout.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    s.write_all(b"later").await.unwrap();
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_upstream_stalls_is_cut_off_as_incomplete() {
    let up = upstream(|mut s| async move {
        if read_request_head(&mut s).await.is_some() {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await;
            // Then nothing more, and the connection stays open.
            let mut sink = [0u8; 16];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    })
    .await;
    let p = start_proxy(&format!(
        "[proxy]\nidle_timeout_secs = 0.3\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:80\" = \"{up}\" }}\n"
    ))
    .await;
    let (code, body, err) = curl_async(vec![
        "-x".into(),
        format!("http://{}", p.addr),
        "http://pypi.org/simple/".into(),
    ])
    .await;
    // 18: "transferred a partial file", well before curl's own 20 s limit (28).
    assert_eq!(code, 18, "{err}");
    assert_eq!(body, "abc");
}

/// An HTTP upstream that reads the whole request body (by content-length) before it
/// answers with the number of body bytes it got; `answer: false` never answers.
async fn body_reading_upstream(answer: bool) -> SocketAddr {
    upstream(move |mut s| async move {
        let Some(head) = read_request_head(&mut s).await else {
            return;
        };
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
            .unwrap_or(0);
        let already = head.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
        let mut rest = vec![0u8; len.saturating_sub(already)];
        if s.read_exact(&mut rest).await.is_err() {
            return;
        }
        if !answer {
            let mut sink = [0u8; 16];
            while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        let body = format!("got {len}");
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(resp.as_bytes()).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_mistaken_for_a_silent_upstream_but_a_silent_upstream_gets_504() {
    let (up, silent) = (
        body_reading_upstream(true).await,
        body_reading_upstream(false).await,
    );
    let p = start_proxy(&format!(
        "[proxy]\nidle_timeout_secs = 0.5\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:80\" = \"{up}\", \"silent.example.org:80\" = \"{silent}\" }}\n[[allow]]\nhost = \"silent.example.org\"\nports = [80]\n"
    ))
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST http://pypi.org/upload HTTP/1.1\r\nHost: pypi.org\r\nContent-Length: 30\r\n\r\n",
    )
    .await
    .unwrap();
    // The scenario is time passing: 30 bytes over about 1.2 s, longer than the idle
    // timeout, but never quiet for as long.
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        s.write_all(b"12345").await.unwrap();
    }
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(
        resp.starts_with("HTTP/1.1 200") && resp.ends_with("got 30"),
        "{resp}"
    );

    let (_, resp) = exchange(
        p.addr,
        "POST http://silent.example.org/x HTTP/1.1\r\nHost: silent.example.org\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert!(resp.contains("details=\"upstream_response\""), "{resp}");
}
