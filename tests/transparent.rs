//! Transparent mode end to end, in network namespaces this test creates: two client
//! namespaces (spokes, each with a policy of its own) with no proxy setting whose default
//! route is the "appliance" namespace, where
//! nftables redirects its HTTPS and HTTP to the proxy's transparent listeners (the binary,
//! run there with `ip netns exec`). The upstreams listen in the appliance namespace on
//! documentation addresses (203.0.113.0/24, 198.51.100.0/24) of its own; a decoy
//! records every connection, and the test asserts that none reached it.
//!
//! Needs root, `ip` and `nft`. Outside CI the test skips with a reason when they are
//! missing; with `CI=true` it fails instead.

mod support;

use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;

use support::TempFile;
use support::net::read_request_head;
use support::netns::run;

/// The client namespaces (two spokes) and the appliance's, each client with its veth pair
/// to the appliance, removed when dropped.
struct Namespaces {
    client: String,
    /// Another spoke, on 10.232.0.0/24, with a policy of its own.
    spoke: String,
    appliance: String,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [&self.client, &self.spoke, &self.appliance] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

const REAL: &str = "203.0.113.10";
const DECOY: &str = "203.0.113.66";
const BY_ADDRESS: &str = "198.51.100.7";
const UNLISTED: &str = "198.51.100.9";

fn namespaces() -> Namespaces {
    static N: AtomicUsize = AtomicUsize::new(0);
    let id = (std::process::id() % 10_000) * 10 + N.fetch_add(1, Ordering::Relaxed) as u32;
    let ns = Namespaces {
        client: format!("amlc{id}"),
        spoke: format!("amls{id}"),
        appliance: format!("amln{id}"),
    };
    let n = ns.appliance.as_str();
    run(&["ip", "netns", "add", n]);
    run(&["ip", "-n", n, "link", "set", "lo", "up"]);
    let mut inward = Vec::new();
    for (c, net, side) in [(&ns.client, "10.231.0", "c"), (&ns.spoke, "10.232.0", "s")] {
        let (vc, vn) = (format!("v{side}{id}"), format!("v{side}n{id}"));
        run(&["ip", "netns", "add", c]);
        run(&[
            "ip", "link", "add", &vc, "type", "veth", "peer", "name", &vn,
        ]);
        run(&["ip", "link", "set", &vc, "netns", c]);
        run(&["ip", "link", "set", &vn, "netns", n]);
        run(&[
            "ip",
            "-n",
            c,
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            &vc,
        ]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            &vn,
        ]);
        for (ns, dev) in [(c.as_str(), vc.as_str()), (n, vn.as_str())] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        run(&["ip", "-n", c, "link", "set", "lo", "up"]);
        let gw = format!("{net}.1");
        run(&["ip", "-n", c, "route", "add", "default", "via", &gw]);
        inward.push(format!("\"{vn}\""));
    }
    let vn = inward.join(", ");
    // The upstreams' addresses are the appliance's own (on its loopback device), so that
    // what reaches them is delivered there, recorded, and goes nowhere else.
    for a in [REAL, DECOY, BY_ADDRESS] {
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{a}/32"),
            "dev",
            "lo",
        ]);
    }
    let rules = TempFile::new(
        "redirect.nft",
        &format!(
            "table ip aml {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    iifname {{ {vn} }} tcp dport {{ 443, 8443 }} redirect to :15443\n    iifname {{ {vn} }} tcp dport 80 redirect to :15080\n  }}\n}}\n"
        ),
    );
    run(&[
        "ip",
        "netns",
        "exec",
        n,
        "nft",
        "-f",
        rules.0.to_str().unwrap(),
    ]);
    ns
}

/// Bind listeners inside namespace `ns` (a thread enters it; the sockets stay there).
fn bind_in(ns: &str, addrs: &[String]) -> Vec<tokio::net::TcpListener> {
    let (ns, addrs) = (ns.to_owned(), addrs.to_vec());
    let std_listeners = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        addrs
            .iter()
            .map(|a| {
                let l = std::net::TcpListener::bind(a).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    std_listeners
        .into_iter()
        .map(|l| tokio::net::TcpListener::from_std(l).unwrap())
        .collect()
}

/// A TLS server answering every request with `body`.
fn serve_tls(l: tokio::net::TcpListener, names: &[&str], body: &'static str) -> TempFile {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let ca = TempFile::new("ca.pem", &ck.cert.pem());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                if read_request_head(&mut tls).await.is_some() {
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    ca
}

/// A plain HTTP server answering with `body` and the request line it got.
fn serve_http(l: tokio::net::TcpListener, body: &'static str) {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Some(head) = read_request_head(&mut s).await {
                    let line = head.lines().next().unwrap_or("").to_owned();
                    let text = format!("{body} {line}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
}

/// A listener that only counts the connections it accepts.
fn decoy(l: tokio::net::TcpListener, count: Arc<AtomicUsize>) {
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
}

/// The proxy binary serving `config` inside namespace `ns`, once it says it is serving.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(ns: &str, config: &TempFile) -> Serving {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_aml-egress"),
            "serve",
        ])
        .arg("--config")
        .arg(&config.0)
        .env_remove("AML_EGRESS_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.contains("aml-egress serving") {
            // Keep draining the log so that the proxy never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Serving(child);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the proxy exited before serving");
}

/// curl inside the client namespace, with no proxy setting at all: status, body, stderr.
async fn curl_in(ns: &str, args: Vec<String>) -> (i32, String, String) {
    let ns = ns.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "curl",
                "-sS",
                "--max-time",
                "15",
                "--noproxy",
                "*",
            ])
            .args(&args)
            .env_clear()
            .output()
            .expect("curl is installed");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_traffic_is_decided_on_its_name_and_never_reaches_the_address_the_client_chose()
{
    if !support::netns::able() {
        return;
    }
    let ns = namespaces();
    let addrs: Vec<String> = [
        format!("{REAL}:443"),
        format!("{REAL}:80"),
        format!("{DECOY}:443"),
        format!("{DECOY}:80"),
        format!("{BY_ADDRESS}:8443"),
        format!("{REAL}:8443"),
    ]
    .to_vec();
    let mut ls = bind_in(&ns.appliance, &addrs).into_iter();
    let ca = serve_tls(
        ls.next().unwrap(),
        &["allowed.test", "spoke.test"],
        "the real upstream",
    );
    serve_http(ls.next().unwrap(), "the real web upstream");
    let decoyed = Arc::new(AtomicUsize::new(0));
    decoy(ls.next().unwrap(), decoyed.clone());
    decoy(ls.next().unwrap(), decoyed.clone());
    let _by_address = serve_tls(ls.next().unwrap(), &[BY_ADDRESS], "the address upstream");
    // An inspected name: its upstream's own certificate is trusted through
    // inspect.upstream_ca_file; clients trust the proxy's CA.
    let inspected_upstream = serve_tls(ls.next().unwrap(), &["inspected.test"], "inspected");
    let (proxy_ca_pem, proxy_ca_key) = support::tls::inspection_ca(&["inspected.test"]);

    // A service tag whose prefix covers the decoy: a connection to it without a server
    // name must not be allowed by the tag (catalog.service_tags_nameless_tls = "deny").
    let tags = TempFile::new(
        "ServiceTags.json",
        &format!(
            r#"{{"changeNumber":1,"cloud":"Public","values":[
  {{"name":"Storage.WestEurope","id":"Storage.WestEurope","properties":{{"region":"westeurope","addressPrefixes":["{DECOY}/32"]}}}}]}}"#
        ),
    );
    let config = TempFile::new(
        "nva.toml",
        &format!(
            r#"
[catalog]
region = "westeurope"
service_tags_file = {:?}
[proxy]
listen = ["127.0.0.1:3128"]
tls_ports = [443, 8443]
[transparent]
tls_listen = ["[::]:15443"]
http_listen = ["0.0.0.0:15080"]
[admin]
listen = "127.0.0.1:9464"
[[allow]]
host = "allowed.test"
ports = [443, 80]
[[allow]]
cidr = "{BY_ADDRESS}/32"
ports = [8443]
[[allow]]
host = "inspected.test/ok/*"
ports = [8443]
[inspect]
ca_cert = {:?}
ca_key = {:?}
upstream_ca_file = {:?}
[upstream]
connect_to = {{ "allowed.test:443" = "{REAL}:443", "spoke.test:443" = "{REAL}:443", "allowed.test:80" = "{REAL}:80", "inspected.test:8443" = "{REAL}:8443" }}

# The other spoke's workspace: its own host, not the first spoke's.
[[client_policy]]
name = "spoke-b"
sources = ["10.232.0.0/24"]
[[client_policy.allow]]
host = "spoke.test"
ports = [443]
"#,
            tags.0, proxy_ca_pem.0, proxy_ca_key.0, inspected_upstream.0
        ),
    );
    // TLS arrives on a dual-stack listener, where an IPv4 flow still carries its original
    // destination in the IPv4 option.
    let _proxy = serve(&ns.appliance, &config);
    let ca = ca.0.to_str().unwrap().to_owned();
    let c = ns.client.as_str();

    // An allowed name aimed at the decoy reaches the real upstream, by name.
    let (code, body, err) = curl_in(
        c,
        vec![
            "--cacert".into(),
            ca.clone(),
            "--resolve".into(),
            format!("allowed.test:443:{DECOY}"),
            "https://allowed.test/".into(),
        ],
    )
    .await;
    assert_eq!((code, body.as_str()), (0, "the real upstream"), "{err}");
    // A denied name is refused with a TLS alert.
    let (code, _, err) = curl_in(
        c,
        vec![
            "--cacert".into(),
            ca.clone(),
            "--resolve".into(),
            format!("denied.test:443:{DECOY}"),
            "https://denied.test/".into(),
        ],
    )
    .await;
    assert_ne!(code, 0, "a denied name must not get through");
    assert!(err.contains("alert") || err.contains("SSL"), "{err}");
    // Plain HTTP by Host.
    let (code, body, err) = curl_in(
        c,
        vec![
            "--resolve".into(),
            format!("allowed.test:80:{DECOY}"),
            "http://allowed.test/x".into(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "the real web upstream GET /x HTTP/1.1");
    let (code, body, _) = curl_in(
        c,
        vec![
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--resolve".into(),
            format!("denied.test:80:{DECOY}"),
            "http://denied.test/".into(),
        ],
    )
    .await;
    assert_eq!((code, body.as_str()), (0, "403"));
    // No server name: only a CIDR rule for the original destination allows it.
    let (code, body, err) =
        curl_in(c, vec!["-k".into(), format!("https://{BY_ADDRESS}:8443/")]).await;
    assert_eq!((code, body.as_str()), (0, "the address upstream"), "{err}");
    let (code, _, _) = curl_in(c, vec!["-k".into(), format!("https://{UNLISTED}:8443/")]).await;
    assert_ne!(code, 0, "an address no rule lists must not get through");
    // No server name to an address inside a service tag's prefix: refused, with its reason.
    let (code, _, _) = curl_in(c, vec!["-k".into(), format!("https://{DECOY}/")]).await;
    assert_ne!(
        code, 0,
        "a tag's prefix must not allow a nameless connection"
    );
    let (_, metrics, err) =
        curl_in(&ns.appliance, vec!["http://127.0.0.1:9464/metrics".into()]).await;
    let refused = "aml_egress_decisions_total{decision=\"deny\",listener=\"transparent_tls\",policy=\"default\",reason=\"service_tag_without_name\"} 1";
    assert!(metrics.contains(refused), "{err}{metrics}");

    // Two spokes behind the one appliance, each decided by its own policy (chosen by the
    // redirected client's address): the first spoke cannot reach the second's host, nor the
    // second the first's.
    let https_to = |name: &str| {
        vec![
            "--cacert".to_owned(),
            ca.clone(),
            "--resolve".into(),
            format!("{name}:443:{DECOY}"),
            format!("https://{name}/"),
        ]
    };
    let (code, _, _) = curl_in(c, https_to("spoke.test")).await;
    assert_ne!(code, 0, "the first spoke must not reach the second's host");
    let (code, body, err) = curl_in(&ns.spoke, https_to("spoke.test")).await;
    assert_eq!((code, body.as_str()), (0, "the real upstream"), "{err}");
    let (code, _, _) = curl_in(&ns.spoke, https_to("allowed.test")).await;
    assert_ne!(code, 0, "the second spoke must not reach the first's host");
    let (_, metrics, err) =
        curl_in(&ns.appliance, vec!["http://127.0.0.1:9464/metrics".into()]).await;
    for series in [
        "aml_egress_decisions_total{decision=\"allow\",listener=\"transparent_tls\",policy=\"spoke-b\",reason=\"rule\"} 1",
        "aml_egress_decisions_total{decision=\"deny\",listener=\"transparent_tls\",policy=\"spoke-b\",reason=\"sni_not_allowed\"} 1",
    ] {
        assert!(metrics.contains(series), "{series}: {err}{metrics}");
    }
    assert_eq!(decoyed.load(Ordering::SeqCst), 0);

    // Inspected on the transparent listener: the path decides, inside TLS.
    let pca = proxy_ca_pem.0.to_str().unwrap().to_owned();
    let (code, body, err) = curl_in(
        c,
        vec![
            "--cacert".into(),
            pca.clone(),
            "--resolve".into(),
            format!("inspected.test:8443:{DECOY}"),
            "https://inspected.test:8443/ok/x".into(),
        ],
    )
    .await;
    assert_eq!((code, body.as_str()), (0, "inspected"), "{err}");
    let (code, body, err) = curl_in(
        c,
        vec![
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "--cacert".into(),
            pca,
            "--resolve".into(),
            format!("inspected.test:8443:{DECOY}"),
            "https://inspected.test:8443/evil".into(),
        ],
    )
    .await;
    assert_eq!((code, body.as_str()), (0, "403"), "{err}");

    assert_eq!(decoyed.load(Ordering::SeqCst), 0, "the decoy was reached");
}

/// A TLS upstream for `name` (self-signed; its certificate is returned) that accepts a
/// WebSocket handshake with a `101`, then echoes what follows.
fn serve_websocket(l: tokio::net::TcpListener, name: &str) -> TempFile {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let ca = TempFile::new("ws.pem", &ck.cert.pem());
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                if read_request_head(&mut tls).await.is_none() {
                    return;
                }
                let switched = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if tls.write_all(switched.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    ca
}

/// A TCP connection to `addr` made from inside namespace `ns`.
fn connect_in(ns: &str, addr: String) -> tokio::net::TcpStream {
    let ns = ns.to_owned();
    let s = std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        rustix::thread::move_into_link_name_space(
            f.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        s
    })
    .join()
    .unwrap();
    tokio::net::TcpStream::from_std(s).unwrap()
}

/// A WebSocket relayed inside an inspected redirected TLS session holds the connection's
/// place under `proxy.max_connections` as long as it is open, as it does through the
/// proxy's own listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_in_a_redirected_inspected_session_counts_against_the_connection_limit() {
    use tokio::io::AsyncReadExt;
    if !support::netns::able() {
        return;
    }
    let ns = namespaces();
    let mut ls = bind_in(
        &ns.appliance,
        &[format!("{REAL}:8443"), format!("{REAL}:80")],
    )
    .into_iter();
    let upstream_cert = serve_websocket(ls.next().unwrap(), "inspected.test");
    serve_http(ls.next().unwrap(), "the real web upstream");
    let (proxy_ca_pem, proxy_ca_key) = support::tls::inspection_ca(&["inspected.test"]);
    let config = TempFile::new(
        "nva-ws.toml",
        &format!(
            r#"
[proxy]
listen = ["127.0.0.1:3128"]
tls_ports = [8443]
max_connections = 1
[transparent]
tls_listen = ["0.0.0.0:15443"]
http_listen = ["0.0.0.0:15080"]
[admin]
listen = "127.0.0.1:9464"
[[allow]]
host = "inspected.test/ok/*"
ports = [8443]
[[allow]]
host = "allowed.test"
ports = [80]
[inspect]
ca_cert = {:?}
ca_key = {:?}
upstream_ca_file = {:?}
[upstream]
connect_to = {{ "inspected.test:8443" = "{REAL}:8443", "allowed.test:80" = "{REAL}:80" }}
"#,
            proxy_ca_pem.0, proxy_ca_key.0, upstream_cert.0
        ),
    );
    let _proxy = serve(&ns.appliance, &config);

    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject;
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&proxy_ca_pem.0).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let mut tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg));
    let s = connect_in(&ns.client, format!("{REAL}:8443"));
    let name = rustls::pki_types::ServerName::try_from("inspected.test").unwrap();
    let mut ws = connector.connect(name, s).await.unwrap();
    ws.write_all(b"GET /ok/ws HTTP/1.1\r\nHost: inspected.test:8443\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = read_request_head(&mut ws).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    ws.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    // The relay is the one connection the limit allows: another is turned away.
    let mut other = connect_in(&ns.client, format!("{REAL}:80"));
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        other.read_to_end(&mut got),
    )
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(got.contains("connection_limit"), "{got}");

    // The relay still works; once it closes, the place is free again.
    ws.write_all(b"pong").await.unwrap();
    ws.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"pong");
    drop(ws);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut again = connect_in(&ns.client, format!("{REAL}:80"));
    again
        .write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        again.read_to_end(&mut got),
    )
    .await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// `policy.unmatched_clients = "refuse"` behind one appliance: the spoke a policy claims is
/// served, the other is refused for that reason on both transparent listeners (a TLS
/// alert; a 403 with or without a `Host`), and nothing it sent reaches an upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoke_no_policy_claims_is_refused_for_that_on_both_transparent_listeners() {
    if !support::netns::able() {
        return;
    }
    let ns = namespaces();
    let mut ls = bind_in(
        &ns.appliance,
        &[
            format!("{REAL}:443"),
            format!("{REAL}:80"),
            format!("{DECOY}:443"),
            format!("{DECOY}:80"),
        ],
    )
    .into_iter();
    let ca = serve_tls(ls.next().unwrap(), &["spoke.test"], "the real upstream");
    serve_http(ls.next().unwrap(), "the real web upstream");
    let decoyed = Arc::new(AtomicUsize::new(0));
    decoy(ls.next().unwrap(), decoyed.clone());
    decoy(ls.next().unwrap(), decoyed.clone());
    let config = TempFile::new(
        "nva-refuse.toml",
        &format!(
            r#"
[proxy]
listen = ["127.0.0.1:3128"]
[transparent]
tls_listen = ["0.0.0.0:15443"]
http_listen = ["0.0.0.0:15080"]
[admin]
listen = "127.0.0.1:9464"
[policy]
unmatched_clients = "refuse"
[upstream]
connect_to = {{ "spoke.test:443" = "{REAL}:443", "spoke.test:80" = "{REAL}:80" }}
# What the default policy allows, no unclaimed client gets.
[[allow]]
host = "spoke.test"
ports = [443, 80]
[[client_policy]]
name = "spoke-b"
sources = ["10.232.0.0/24"]
[[client_policy.allow]]
host = "spoke.test"
ports = [443, 80]
"#
        ),
    );
    let _proxy = serve(&ns.appliance, &config);
    let ca = ca.0.to_str().unwrap().to_owned();
    let https = vec![
        "--cacert".to_owned(),
        ca,
        "--resolve".into(),
        format!("spoke.test:443:{DECOY}"),
        "https://spoke.test/".into(),
    ];
    let status = |args: &[&str]| {
        let mut v: Vec<String> = ["-o", "/dev/null", "-w", "%{http_code}"]
            .map(String::from)
            .to_vec();
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };
    let http = status(&[
        "--resolve",
        &format!("spoke.test:80:{DECOY}"),
        "http://spoke.test/",
    ]);
    let no_host = status(&["-H", "Host:", &format!("http://{DECOY}/")]);

    let (code, body, err) = curl_in(&ns.spoke, https.clone()).await;
    assert_eq!((code, body.as_str()), (0, "the real upstream"), "{err}");
    let (code, body, err) = curl_in(&ns.spoke, http.clone()).await;
    assert_eq!((code, body.as_str()), (0, "200"), "{err}");

    let c = ns.client.as_str();
    let (code, _, err) = curl_in(c, https).await;
    assert_ne!(code, 0, "an unclaimed spoke must not get through");
    assert!(err.contains("alert") || err.contains("SSL"), "{err}");
    let (code, body, err) = curl_in(c, http).await;
    assert_eq!((code, body.as_str()), (0, "403"), "{err}");
    let (code, body, err) = curl_in(c, no_host).await;
    assert_eq!((code, body.as_str()), (0, "403"), "{err}");
    let (_, page, err) = curl_in(
        c,
        vec![
            "--resolve".into(),
            format!("spoke.test:80:{DECOY}"),
            "http://spoke.test/".into(),
        ],
    )
    .await;
    assert!(
        page.contains("10.231.0.2"),
        "the 403 names the client: {err}{page}"
    );
    assert!(
        page.contains("unmatched_clients"),
        "and the setting: {page}"
    );

    let (_, metrics, err) =
        curl_in(&ns.appliance, vec!["http://127.0.0.1:9464/metrics".into()]).await;
    for series in [
        "aml_egress_decisions_total{decision=\"deny\",listener=\"transparent_tls\",policy=\"(none)\",reason=\"no_policy_for_client\"} 1",
        "aml_egress_decisions_total{decision=\"deny\",listener=\"transparent_http\",policy=\"(none)\",reason=\"no_policy_for_client\"} 3",
    ] {
        assert!(metrics.contains(series), "{series}: {err}{metrics}");
    }
    assert_eq!(decoyed.load(Ordering::SeqCst), 0, "the decoy was reached");
}
