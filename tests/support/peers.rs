//! Upstreams on loopback for the proxy tests: plain HTTP that answers with what it
//! received, TLS with an rcgen certificate, keep-alive and body-reading HTTP, and a tunnel
//! to a TCP echo through a started proxy.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::TempFile;
use super::net::{echo_upstream, exchange, read_request_head, upstream};
use super::proxy::{Proxy, start_proxy};

/// A plain HTTP upstream answering with what it received.
pub async fn http_upstream() -> SocketAddr {
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
pub async fn tls_upstream(names: &[&str]) -> (SocketAddr, TempFile) {
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

/// A keep-alive HTTP upstream that counts the connections it accepts.
pub async fn keepalive_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
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

/// An HTTP upstream that reads the whole request body (by content-length) before it
/// answers with the number of body bytes it got; `answer: false` never answers.
pub async fn body_reading_upstream(answer: bool) -> SocketAddr {
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

/// A proxy (with `proxy_keys` in its `[proxy]` section) pinning pypi.org:443 to a TCP echo,
/// and a tunnel through it that has carried one byte each way. Port 443 is opaque there:
/// the echo speaks no TLS.
pub async fn open_echo_tunnel(proxy_keys: &str) -> (Proxy, TcpStream) {
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
