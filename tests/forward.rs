//! Forwarding end to end: CONNECT and absolute-form HTTP through the proxy on 127.0.0.1:0,
//! upstreams on 127.0.0.1:0 (plain HTTP, TLS with an rcgen certificate for catalog names,
//! a TCP echo) reached through `upstream.connect_to`, real `curl` as the client, and the
//! proxy's own resolver against a DNS responder on loopback. No sleeps as synchronisation.

mod support;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::clients::{curl_async, pins};
use support::net::{echo_upstream, exchange, read_request_head, upstream};
use support::peers::{body_reading_upstream, http_upstream, keepalive_upstream, tls_upstream};
use support::proxy::start_proxy;

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
