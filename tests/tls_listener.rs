//! The proxy's own TLS listener (`proxy.tls_listen`): curl over an HTTPS proxy hop, a bad
//! certificate at start-up, and tunnels through it.

mod support;

use std::sync::Arc;

use aml_egress::logs::LogBudget;
use aml_egress::metrics::Metrics;
use aml_egress::proxy::Live;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TempFile;
use support::clients::{curl_async, proxy_cert};
use support::net::echo_upstream;
use support::peers::tls_upstream;
use support::proxy::start_proxy;

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
    let err = Live::build(c, vec![], metrics, logs)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("proxy.tls_cert") && err.contains("junk.pem"),
        "{err}"
    );
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
