//! Adversarial review of selective TLS inspection (issue 20): what got past, or cost more
//! than it should, inside an inspected session. Each test names the hole it shows; real
//! TLS (tokio-rustls as the client) through the proxy, and a recording upstream on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TempFile;
use support::clients::curl_async;
use support::net::{read_request_head, upstream};
use support::proxy::start_proxy;

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

/// A TLS upstream with a certificate for `name` from `ca`, answering every request with
/// `saw <path>`; the request heads it received are recorded.
async fn recording_upstream(ca: &UpstreamCa, name: &str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
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
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
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

/// An inspection CA made the way `aml-egress ca init` makes it, for `permitted`, valid for
/// `days` from `from`.
fn inspection_ca_at(permitted: &[&str], days: u32, from: SystemTime) -> (TempFile, TempFile) {
    let permitted: Vec<String> = permitted.iter().map(|s| s.to_string()).collect();
    let ca = aml_egress::inspect::ca::generate(Some(&permitted), days, "test", from).unwrap();
    let cert = TempFile::new("inspect-ca.pem", &ca.cert_pem);
    let key = TempFile::new("inspect-ca.key", &ca.key_pem);
    std::fs::set_permissions(&key.0, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (cert, key)
}

fn inspection_ca(permitted: &[&str]) -> (TempFile, TempFile) {
    inspection_ca_at(permitted, 30, SystemTime::now())
}

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
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&ca.0).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, s)
        .await
        .unwrap()
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

/// "An expired CA does not make the instance unready ...: tunnels that need inspection are
/// refused (`inspect_ca_expired`)". The load says so ("tunnels that need inspection will
/// be refused"), but the data path never asks: it mints leaves under the expired CA (valid
/// for 3 more days, past the CA's own end), hands them out, and counts the clients that
/// rightly reject them as not trusting the CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_inspection_ca_refuses_the_tunnels_that_need_it() {
    let up_ca = upstream_ca();
    let (files, seen) = recording_upstream(&up_ca, "files.example.test").await;
    let long_ago = SystemTime::now() - Duration::from_secs(10 * 86_400);
    let (ca, key) = inspection_ca_at(&["files.example.test"], 2, long_ago);
    let p = start_proxy(&config(&ca, &key, &up_ca, files)).await;
    let args = vec![
        "--proxy".to_owned(),
        format!("http://{}", p.addr),
        "--cacert".to_owned(),
        ca.0.display().to_string(),
        "https://files.example.test/pkg/a.whl".to_owned(),
    ];
    let (code, _, _) = curl_async(args).await;
    assert_ne!(code, 0);
    let m = p.metrics().await;
    assert!(m.contains("reason=\"inspect_ca_expired\""), "{m}");
    assert_eq!(
        p.sample("aml_egress_inspect_certificates_minted_total")
            .await,
        0.0,
        "nothing is minted under an expired CA"
    );
    assert!(seen.lock().unwrap().is_empty());
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
