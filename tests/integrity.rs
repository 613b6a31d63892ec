//! Enforcement integrity, end to end: each way a client could reach a host it is not allowed
//! is tried against a live proxy, and the test asserts what reached the upstream (a recorder
//! on loopback), not only what the client saw. Upstreams are pinned with
//! `upstream.connect_to`; names are resolved by the DNS responder of `support::dns`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::net::{echo_upstream, exchange, get, read_request_head, read_until, upstream};
use support::proxy::{Proxy, start_proxy};
use support::tls::{
    ACCESS_DENIED, client_hello, crafted_hello, crafted_hello_with, record, server_hello,
    split_records,
};

/// Every byte every connection sent to an upstream, and how many connections it accepted.
#[derive(Clone, Default)]
struct Recorded {
    bytes: Arc<Mutex<Vec<u8>>>,
    accepted: Arc<AtomicUsize>,
}

impl Recorded {
    fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    /// Record what `s` sends until it closes.
    async fn until_closed(&self, s: &mut TcpStream) {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            self.bytes.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    }
}

/// An upstream that records what it is sent until the client closes, and answers nothing.
async fn recorder() -> (SocketAddr, Recorded) {
    let rec = Recorded::default();
    let r = rec.clone();
    let addr = upstream(move |mut s| {
        let r = r.clone();
        async move {
            r.accepted.fetch_add(1, Ordering::SeqCst);
            r.until_closed(&mut s).await;
        }
    })
    .await;
    (addr, rec)
}

/// Open a tunnel with CONNECT and check the 200.
async fn tunnel(p: &Proxy, target: &str) -> TcpStream {
    let (s, resp) = exchange(p.addr, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "CONNECT {target}: {resp}");
    s
}

/// Everything the proxy sends until it closes the connection.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    got
}

/// A config allowing `allowed.test` on 443 and 80 (path rule) and `web.test` on 80, 2222
/// and 8080, pinned to the given upstreams.
fn pinned(tls: SocketAddr, web: SocketAddr, extra: &str) -> String {
    format!(
        r#"
[proxy]
sni_timeout_secs = 2
{extra}
[[allow]]
host = "allowed.test"
ports = [443]
[[allow]]
host = "web.test/ok/*"
ports = [80, 8080]
[[allow]]
host = "web.test"
ports = [2222]
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "allowed.test:443" = "{tls}", "web.test:80" = "{web}", "web.test:8080" = "{web}", "web.test:2222" = "{web}" }}
"#
    )
}

const CONNECT_DENY: &str =
    "aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"default\",reason=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_or_refused_hellos_never_reach_the_upstream() {
    let (tls, rec) = recorder().await;
    let p = start_proxy(&pinned(tls, tls, "")).await;
    let denied = client_hello("denied.test");
    let mut empty_first = vec![0x16, 3, 1, 0, 0];
    empty_first.extend_from_slice(&denied);
    let mut ccs_first = record(0x14, &[1]);
    ccs_first.extend_from_slice(&denied);
    let mut oversize = vec![0x16, 3, 1, 0x40, 0x01];
    oversize.extend_from_slice(&[1, 0, 0x40, 0]);
    oversize.resize(5 + 16385, 0);
    let invalid: [(&str, Vec<u8>); 9] = [
        (
            "an empty record, then a hello naming a denied host",
            empty_first,
        ),
        ("a ChangeCipherSpec before the hello", ccs_first),
        ("a record over 16 KiB", oversize),
        (
            "two names",
            crafted_hello(&[b"allowed.test", b"denied.test"], 1),
        ),
        (
            "two server_name extensions",
            crafted_hello(&[b"allowed.test"], 2),
        ),
        (
            "a name ending in NUL",
            crafted_hello(&[b"allowed.test\0"], 1),
        ),
        (
            "a name ending in two dots",
            crafted_hello(&[b"allowed.test.."], 1),
        ),
        ("an IP literal", crafted_hello(&[b"127.0.0.1"], 1)),
        ("a 300-character name", crafted_hello(&[&[b'a'; 300]], 1)),
    ];
    for (what, bytes) in &invalid {
        let mut s = tunnel(&p, "allowed.test:443").await;
        s.write_all(bytes).await.unwrap();
        assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED, "{what}");
    }
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&split_records(&denied, 7)).await.unwrap();
    assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED, "a denied name");
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&crafted_hello(&[], 0)).await.unwrap();
    assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED, "no name");
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(b"GET /any HTTP/1.1\r\nHost: denied.test\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut s).await, b"", "HTTP on a TLS port");

    // The CONNECTs were dialled, but not one byte went upstream.
    assert!(rec.accepted.load(Ordering::SeqCst) >= 12);
    assert_eq!(rec.bytes(), b"");
    for (reason, n) in [
        ("tls_hello_invalid", 9.0),
        ("sni_not_allowed", 1.0),
        ("no_server_name", 1.0),
        ("tunnel_protocol_not_allowed", 1.0),
    ] {
        assert_eq!(
            p.sample(&format!("{CONNECT_DENY}\"{reason}\"}}")).await,
            n,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_that_does_not_arrive_in_time_is_refused() {
    let (tls, rec) = recorder().await;
    let p = start_proxy(
        &pinned(tls, tls, "").replace("sni_timeout_secs = 2", "sni_timeout_secs = 0.2"),
    )
    .await;
    let hello = client_hello("allowed.test");
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED);
    assert_eq!(rec.bytes(), b"");
    assert_eq!(
        p.sample(&format!("{CONNECT_DENY}\"tls_hello_timeout\"}}"))
            .await,
        1.0
    );
}

/// A scripted TLS upstream: reads one ClientHello of `hello_len` bytes, notes whether any
/// further byte was already there, answers `reply`, then records the rest.
async fn scripted_server(
    hello_len: usize,
    reply: Vec<u8>,
) -> (SocketAddr, Recorded, Arc<Mutex<Option<bool>>>) {
    let rec = Recorded::default();
    let early = Arc::new(Mutex::new(None));
    let (r, e) = (rec.clone(), early.clone());
    let addr = upstream(move |mut s| {
        let (r, e, reply) = (r.clone(), e.clone(), reply.clone());
        async move {
            let mut hello = vec![0u8; hello_len];
            if s.read_exact(&mut hello).await.is_err() {
                return;
            }
            r.bytes.lock().unwrap().extend_from_slice(&hello);
            // Had the proxy passed the client's next bytes with the hello, they would sit in
            // this socket already: the hello and what follows it left the client in one write.
            let mut probe = [0u8; 1];
            *e.lock().unwrap() = Some(s.try_read(&mut probe).is_ok());
            s.write_all(&reply).await.unwrap();
            r.until_closed(&mut s).await;
        }
    })
    .await;
    (addr, rec, early)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_further_bytes_wait_for_the_server_hello() {
    let hello = client_hello("allowed.test");
    let (tls, rec, early) = scripted_server(hello.len(), server_hello(false)).await;
    let p = start_proxy(&pinned(tls, tls, "")).await;
    let mut s = tunnel(&p, "allowed.test:443").await;
    let mut sent = hello.clone();
    sent.extend_from_slice(b"after the hello");
    s.write_all(&sent).await.unwrap();
    let mut answer = vec![0u8; server_hello(false).len()];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer, server_hello(false));
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    assert_eq!(
        *early.lock().unwrap(),
        Some(false),
        "bytes after the hello were held"
    );
    // Everything arrives, in order, once the server has committed.
    assert_eq!(rec.bytes(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_after_a_retry_must_name_the_same_server() {
    let first = client_hello("allowed.test");
    for (second_name, allowed) in [("denied.test", false), ("allowed.test", true)] {
        let (tls, rec, _) = scripted_server(first.len(), server_hello(true)).await;
        let p = start_proxy(&pinned(tls, tls, "")).await;
        let mut s = tunnel(&p, "allowed.test:443").await;
        s.write_all(&first).await.unwrap();
        let mut retry = vec![0u8; server_hello(true).len()];
        s.read_exact(&mut retry).await.unwrap();
        assert_eq!(retry, server_hello(true));
        // Middlebox compatibility mode: a ChangeCipherSpec, then the second hello.
        let mut second = record(0x14, &[1]);
        second.extend_from_slice(&client_hello(second_name));
        s.write_all(&second).await.unwrap();
        if allowed {
            s.shutdown().await.unwrap();
            read_to_close(&mut s).await;
            let mut want = first.clone();
            want.extend_from_slice(&second);
            assert_eq!(rec.bytes(), want);
        } else {
            assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED);
            assert_eq!(rec.bytes(), first, "only the first hello went upstream");
            assert_eq!(
                p.sample(&format!("{CONNECT_DENY}\"sni_changed_after_retry\"}}"))
                    .await,
                1.0
            );
        }
    }
}

/// A rustls server that accepts only P-256 key exchange, so that a client offering an
/// X25519 key share first gets a HelloRetryRequest; it echoes one line.
async fn retrying_tls_server(
    name: &str,
) -> (SocketAddr, rustls::pki_types::CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![rustls::crypto::ring::kx_group::SECP256R1];
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![ck.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let cert = ck.cert.der().clone();
    let addr = upstream(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut line = [0u8; 5];
            if tls.read_exact(&mut line).await.is_ok() {
                let _ = tls.write_all(&line).await;
                let _ = tls.shutdown().await;
            }
        }
    })
    .await;
    (addr, cert)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_hello_retry_handshake_completes_through_the_proxy() {
    let (tls, cert) = retrying_tls_server("allowed.test").await;
    let p = start_proxy(&pinned(tls, tls, "")).await;
    let s = tunnel(&p, "allowed.test:443").await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut provider = rustls::crypto::ring::default_provider();
    provider.kx_groups = vec![
        rustls::crypto::ring::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
    ];
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls::pki_types::ServerName::try_from("allowed.test").unwrap();
    let mut tls = connector
        .connect(name, s)
        .await
        .expect("handshake through the proxy");
    assert_eq!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::FullWithHelloRetryRequest)
    );
    tls.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
}

/// A keep-alive HTTP upstream that records every request head and answers `200 ok`.
async fn recording_web() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let addr = upstream(move |mut s| {
        let h = h.clone();
        async move {
            while let Some(head) = read_request_head(&mut s).await {
                h.lock().unwrap().push(head);
                let resp = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if s.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, heads)
}

/// Send one request inside an open tunnel and read the response head and a short body.
async fn ask(s: &mut TcpStream, request: &str) -> String {
    s.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the proxy closed the tunnel after: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            if body.len() >= len {
                return text.into_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_inside_a_tunnel_is_decided_per_request_like_absolute_form() {
    let (web, heads) = recording_web().await;
    let p = start_proxy(&pinned(web, web, "")).await;
    let mut s = tunnel(&p, "web.test:80").await;
    let ok = ask(
        &mut s,
        "GET /ok/1 HTTP/1.1\r\nHost: web.test\r\nProxy-Authorization: x\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    for (what, request, reason) in [
        (
            "a path outside the rule",
            "GET /other HTTP/1.1\r\nHost: web.test\r\n\r\n",
            "path_not_allowed",
        ),
        (
            "another host",
            "GET /ok/2 HTTP/1.1\r\nHost: denied.test\r\n\r\n",
            "host_mismatch",
        ),
        (
            "another port",
            "GET /ok/3 HTTP/1.1\r\nHost: web.test:8080\r\n\r\n",
            "host_mismatch",
        ),
        (
            "absolute form naming another host",
            "GET http://denied.test/ok/4 HTTP/1.1\r\nHost: web.test\r\n\r\n",
            "host_mismatch",
        ),
        (
            "userinfo",
            "GET /ok/5 HTTP/1.1\r\nHost: web.test@denied.test\r\n\r\n",
            "host_mismatch",
        ),
        (
            "a CONNECT inside",
            "CONNECT denied.test:443 HTTP/1.1\r\nHost: denied.test:443\r\n\r\n",
            "host_mismatch",
        ),
        (
            "asterisk form",
            "OPTIONS * HTTP/1.1\r\nHost: web.test\r\n\r\n",
            "invalid_target",
        ),
    ] {
        let resp = ask(&mut s, request).await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{what}: {resp}");
        assert!(
            resp.contains(&format!("details=\"{reason}\"")),
            "{what}: {resp}"
        );
    }
    // HTTP/1.0 without Host means the tunnel's host.
    let mut s10 = tunnel(&p, "web.test:80").await;
    s10.write_all(b"GET /ok/6 HTTP/1.0\r\n\r\n").await.unwrap();
    let resp = String::from_utf8_lossy(&read_to_close(&mut s10).await).into_owned();
    assert!(
        resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200"),
        "{resp}"
    );

    let seen = heads.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        2,
        "only the allowed requests went upstream: {seen:?}"
    );
    assert!(seen[0].starts_with("GET /ok/1 HTTP/1.1\r\n"), "{}", seen[0]);
    assert!(
        seen[0].to_ascii_lowercase().contains("host: web.test\r\n"),
        "{}",
        seen[0]
    );
    assert!(
        !seen[0].to_ascii_lowercase().contains("proxy-authorization"),
        "{}",
        seen[0]
    );
    assert!(seen[1].starts_with("GET /ok/6 HTTP/1."), "{}", seen[1]);
    assert!(
        seen[1].to_ascii_lowercase().contains("host: web.test\r\n"),
        "{}",
        seen[1]
    );
    assert_eq!(
        p.sample("aml_egress_decisions_total{decision=\"deny\",listener=\"http\",policy=\"default\",reason=\"host_mismatch\"}").await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_tunnel_to_a_plain_http_port_gets_the_path_rules() {
    let (web, heads) = recording_web().await;
    let p = start_proxy(&pinned(web, web, "")).await;
    let proxy = format!("http://{}", p.addr);
    let run = |url: &'static str| {
        let proxy = proxy.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "20",
                    "--noproxy",
                    "",
                    "-p",
                    "-x",
                    &proxy,
                ])
                .args(["-o", "/dev/null", "-w", "%{http_code}", url])
                .env_remove("http_proxy")
                .env_remove("HTTPS_PROXY")
                .env_remove("https_proxy")
                .env_remove("ALL_PROXY")
                .output()
                .expect("curl is installed");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    assert_eq!(run("http://web.test/ok/curl").await.unwrap(), "200");
    assert_eq!(run("http://web.test/etc/passwd").await.unwrap(), "403");
    let seen = heads.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /ok/curl HTTP/1.1\r\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocols_are_refused_unless_the_port_is_opaque() {
    let (raw, rec) = recorder().await;
    let p = start_proxy(&pinned(raw, raw, "")).await;
    let mut s = tunnel(&p, "web.test:2222").await;
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    assert_eq!(read_to_close(&mut s).await, b"");
    let mut s = tunnel(&p, "web.test:2222").await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut s).await, b"");
    assert_eq!(rec.bytes(), b"");
    assert_eq!(
        p.sample(&format!("{CONNECT_DENY}\"tunnel_protocol_not_allowed\"}}"))
            .await,
        2.0
    );

    let echo = echo_upstream().await;
    let p = start_proxy(&pinned(echo, echo, "opaque_ports = [2222]")).await;
    let mut s = tunnel(&p, "web.test:2222").await;
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let mut back = [0u8; 21];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"SSH-2.0-OpenSSH_9.2\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_passes_policy_refusals_but_never_unreadable_hellos() {
    let (tls, rec) = recorder().await;
    let p = start_proxy(&pinned(tls, tls, "mode = \"audit\"")).await;
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&crafted_hello(&[b"allowed.test", b"x.test"], 1))
        .await
        .unwrap();
    assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED);
    assert_eq!(rec.bytes(), b"");
    let denied = client_hello("denied.test");
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&denied).await.unwrap();
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    assert_eq!(rec.bytes(), denied, "audit mode passes a denied name");
    assert_eq!(
        p.sample("aml_egress_decisions_total{decision=\"would_deny\",listener=\"connect\",policy=\"default\",reason=\"sni_not_allowed\"}").await,
        1.0
    );
}

/// An operator's `[[deny]]` rule holds in audit mode for the name a tunnel's hello gives,
/// as it does for the name a CONNECT gives: audit mode passes only policy answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_never_passes_a_hello_naming_a_host_a_deny_rule_refuses() {
    let (tls, rec) = recorder().await;
    let extra = "mode = \"audit\"\n[[deny]]\nhost = \"blocked.test\"\n";
    let p = start_proxy(&pinned(tls, tls, extra)).await;
    let (_, resp) = exchange(p.addr, "CONNECT blocked.test:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&client_hello("blocked.test")).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED);
    assert_eq!(
        rec.bytes(),
        b"",
        "a hello naming a denied host reached the upstream"
    );
}

/// A config that allows every loopback address on every port by CIDR and exempts loopback
/// from the guard: only the self check stands between a client and the proxy itself.
const LOOPBACK_OPEN: &str = r#"
[[allow]]
cidr = "0.0.0.0/0"
ports = ["1-65535"]
[[allow]]
cidr = "::/0"
ports = ["1-65535"]
[upstream]
allow_cidrs = ["0.0.0.0/0", "::/0"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_and_its_admin_listener_are_never_reached_through_the_proxy() {
    let p = start_proxy(LOOPBACK_OPEN).await;
    let (proxy, admin) = (p.addr.port(), p.admin_addr.port());
    for port in [proxy, admin] {
        for host in [
            "127.0.0.1".to_owned(),
            "[::ffff:127.0.0.1]".to_owned(),
            "[::ffff:0:127.0.0.1]".to_owned(),
            "[::127.0.0.1]".to_owned(),
            "[64:ff9b::7f00:1]".to_owned(),
            "[2002:7f00:1::]".to_owned(),
            // The unspecified address: the kernel connects it to loopback.
            "0.0.0.0".to_owned(),
            "[::]".to_owned(),
            "[::ffff:0.0.0.0]".to_owned(),
        ] {
            let (_, resp) =
                exchange(p.addr, &format!("CONNECT {host}:{port} HTTP/1.1\r\n\r\n")).await;
            assert!(resp.starts_with("HTTP/1.1 403"), "{host}:{port}: {resp}");
            assert!(
                resp.contains("details=\"forbidden_address\""),
                "{host}:{port}: {resp}"
            );
        }
    }
    let (_, resp) = exchange(
        p.addr,
        &format!(
            "GET http://127.0.0.1:{admin}/metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n\r\n"
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("forbidden_address"), "{resp}");
    let (_, resp) = exchange(
        p.addr,
        &format!("GET http://[::]:{admin}/metrics HTTP/1.1\r\nHost: [::]:{admin}\r\n\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    // The same config does reach another loopback service.
    let echo = echo_upstream().await;
    let (_, resp) = exchange(
        p.addr,
        &format!(
            "CONNECT [::ffff:127.0.0.1]:{} HTTP/1.1\r\n\r\n",
            echo.port()
        ),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_cidr_applies_to_the_addresses_a_name_resolves_to() {
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let dns =
        support::dns::responder(&[("ok.example.test", &[lo]), ("x_y.example.test", &[lo])]).await;
    let (raw, rec) = recorder().await;
    let allow = "[[allow]]\nhost = \"*.example.test\"\nports = [\"1-65535\"]\n";
    let cfg = |deny: &str| {
        format!(
            "[proxy]\nopaque_ports = [{}]\n{allow}{deny}[upstream]\nname_servers = [\"{}\"]\nallow_cidrs = [\"127.0.0.1/32\"]\n",
            raw.port(),
            dns.addr
        )
    };
    let p = start_proxy(&cfg("[[deny]]\ncidr = \"127.0.0.1/32\"\n")).await;
    let (_, resp) = exchange(
        p.addr,
        &format!("CONNECT ok.example.test:{} HTTP/1.1\r\n\r\n", raw.port()),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(resp.contains("details=\"deny_rule\""), "{resp}");
    assert_eq!(rec.accepted.load(Ordering::SeqCst), 0);

    // Without the deny entry the same name is dialled, and a name with `_` resolves too.
    let p = start_proxy(&cfg("")).await;
    for name in ["ok.example.test", "x_y.example.test"] {
        let mut s = tunnel(&p, &format!("{name}:{}", raw.port())).await;
        s.write_all(name.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        read_to_close(&mut s).await;
    }
    assert_eq!(rec.bytes(), b"ok.example.testx_y.example.test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probes_are_answered_while_a_thousand_admin_connections_idle() {
    let p = start_proxy("").await;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(p.admin_addr).await.unwrap());
    }
    for path in ["/healthz", "/readyz"] {
        // A bound on a hang, not a speed measurement: the acceptance is "answered".
        let probe = get(p.admin_addr, path, None);
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), probe)
            .await
            .expect("the probe is answered");
        assert_eq!(status, 200, "{path}: {body}");
    }
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_every_connection() {
    let p = start_proxy("[proxy]\nmax_connections_per_client = 2\n").await;
    // These two hold both places once the proxy has accepted them (on any worker).
    let _a = TcpStream::connect(p.addr).await.unwrap();
    let _b = TcpStream::connect(p.addr).await.unwrap();
    p.until_sample("aml_egress_open_connections{mode=\"enforce\"}", 2.0)
        .await;
    let (_, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(
        resp.contains("details=\"connection_limit_per_client\""),
        "{resp}"
    );
    assert_eq!(
        p.sample("aml_egress_limits_hit_total{limit=\"connections_per_client\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_without_a_name_to_an_ip_literal_is_judged_by_the_cidr_rules() {
    let (raw, rec) = recorder().await;
    let port = raw.port();
    let p = start_proxy(&format!(
        "[proxy]\ntls_ports = [{port}]\n[[allow]]\ncidr = \"127.0.0.1/32\"\nports = [{port}]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\n"
    ))
    .await;
    // No name for an address (RFC 6066): the CIDR rule that allowed the CONNECT decides.
    let nameless = crafted_hello(&[], 0);
    let mut s = tunnel(&p, &format!("127.0.0.1:{port}")).await;
    s.write_all(&nameless).await.unwrap();
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    assert_eq!(rec.bytes(), nameless);
    // A name, if sent, must still be allowed.
    let mut s = tunnel(&p, &format!("127.0.0.1:{port}")).await;
    s.write_all(&client_hello("denied.test")).await.unwrap();
    assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED);
    assert_eq!(rec.bytes(), nameless, "nothing more went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_with_the_connect_head_are_the_tunnels_first_bytes() {
    let echo = echo_upstream().await;
    let p = start_proxy(&pinned(echo, echo, "opaque_ports = [2222]")).await;
    // One write: the head and the tunnel's first bytes, before any 200 (as clients that
    // send early data do).
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"CONNECT web.test:2222 HTTP/1.1\r\nHost: web.test:2222\r\n\r\nSSH-2.0-early\r\n")
        .await
        .unwrap();
    let got = read_until(&mut s, |got| got.ends_with(b"SSH-2.0-early\r\n")).await;
    let got = String::from_utf8_lossy(&got);
    let (head, tunnelled) = got.split_once("\r\n\r\n").unwrap();
    // The 200 (with its Date, as hyper's has one), then exactly the echoed early bytes.
    assert!(
        head.starts_with("HTTP/1.1 200 Connection established\r\ndate: "),
        "{got}"
    );
    assert_eq!(tunnelled, "SSH-2.0-early\r\n");
    // A CONNECT with more fields than the proxy parses itself goes through hyper, same result.
    let fields: String = (0..40).map(|i| format!("X-F{i}: v\r\n")).collect();
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        format!("CONNECT web.test:2222 HTTP/1.1\r\n{fields}\r\nSSH-2.0-late\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let got = read_until(&mut s, |got| got.ends_with(b"SSH-2.0-late\r\n")).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{got}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_with_an_encrypted_client_hello_is_refused_unless_allowed() {
    // The outer name is allowed; the real one, encrypted, could be any tenant of the front end.
    let ech: &[u8] = &[0, 0, 1, 0, 1, 7, 0, 0, 0, 0];
    let hello = crafted_hello_with(&[b"allowed.test"], 1, &[(0xfe0d, ech)]);
    let ech_deny = "aml_egress_decisions_total{decision=\"deny\",listener=\"connect\",policy=\"default\",reason=\"tls_ech_present\"}";
    for mode in ["enforce", "audit"] {
        let (raw, rec) = recorder().await;
        let p = start_proxy(&pinned(raw, raw, &format!("mode = \"{mode}\""))).await;
        let mut s = tunnel(&p, "allowed.test:443").await;
        s.write_all(&hello).await.unwrap();
        assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED, "{mode}");
        assert_eq!(rec.bytes(), b"", "nothing went upstream ({mode})");
        assert_eq!(p.sample(ech_deny).await, 1.0, "{mode}");
        let denied = support::net::get(p.admin_addr, "/denied", None).await.1;
        assert!(denied.contains("proxy.ech"), "{denied}");
    }
    // With proxy.ech = "allow", the outer name decides, as for any hello.
    let (raw, rec) = recorder().await;
    let p = start_proxy(&pinned(raw, raw, "ech = \"allow\"")).await;
    let mut s = tunnel(&p, "allowed.test:443").await;
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    assert_eq!(rec.bytes(), hello);
    assert_eq!(p.sample(ech_deny).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hello_after_a_retry_must_not_add_an_encrypted_client_hello() {
    let first = client_hello("allowed.test");
    let ech: &[u8] = &[0, 0, 1, 0, 1, 7, 0, 0, 0, 0];
    for setting in ["deny", "allow"] {
        let (tls, rec, _) = scripted_server(first.len(), server_hello(true)).await;
        let p = start_proxy(&pinned(tls, tls, &format!("ech = \"{setting}\""))).await;
        let mut s = tunnel(&p, "allowed.test:443").await;
        s.write_all(&first).await.unwrap();
        let mut retry = vec![0u8; server_hello(true).len()];
        s.read_exact(&mut retry).await.unwrap();
        let mut second = record(0x14, &[1]);
        second.extend_from_slice(&crafted_hello_with(&[b"allowed.test"], 1, &[(0xfe0d, ech)]));
        s.write_all(&second).await.unwrap();
        assert_eq!(read_to_close(&mut s).await, ACCESS_DENIED, "{setting}");
        assert_eq!(
            rec.bytes(),
            first,
            "only the first hello went upstream ({setting})"
        );
        assert_eq!(
            p.sample(&format!("{CONNECT_DENY}\"tls_ech_present\"}}"))
                .await,
            1.0,
            "{setting}"
        );
    }
}
