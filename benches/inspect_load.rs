//! TLS inspection load: an HTTPS upstream and a load generator for HTTPS requests sent
//! directly or through a proxy that decrypts them (aml-egress with `[inspect]`, Squid with
//! `ssl_bump`). Used by `benches/inspect-side-by-side.sh`; run by hand with
//! `cargo bench --bench inspect_load -- <subcommand> ...` (cargo's own `--bench` is ignored).
//!
//! ```text
//! upstream --listen 127.0.0.1:P --name bench.example.test --ca-out DIR [--lifetime S]
//! load (--proxy 127.0.0.1:P | --direct 127.0.0.1:P) --target bench.example.test:PORT
//!      --ca FILE --mode new|keepalive --conns C --duration S [--cpu-pid PID]... [--label L]
//! ```
//!
//! `upstream` writes a fresh CA to DIR/upstream-ca.pem and serves HTTPS (HTTP/1.1 keep-alive,
//! ALPN http/1.1) with a leaf for `--name` from that CA, answering every request with the
//! same 200 and a 13-byte body; it exits after `--lifetime` seconds (default 900).
//!
//! `load` runs `--conns` workers for `--duration` seconds. `new`: every request on a new
//! connection (TCP connect, `CONNECT` and its 200 when through a proxy, a full TLS handshake
//! with SNI = the target's host and no session resumption, one GET, the whole response
//! read, close), its latency counted from the start of the connect. `keepalive`: each worker
//! opens one session and sends GETs on it in turn (a new session after an error). It prints
//! one JSON line on standard output and one human line on standard error: requests, errors,
//! requests per second, latency p50/p90/p99 in µs, and for each `--cpu-pid` the user and
//! system CPU of that process and its descendants (from /proc) per request.
//!
//! Every address must be on loopback; every loop is bounded by time and count, every
//! operation by a timeout, and errors are counted, never fatal to the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_DURATION_S: u64 = 120;
const MAX_LIFETIME_S: u64 = 3600;
const MAX_CONNS: usize = 256;
const MAX_REQUESTS: u64 = 2_000_000;
const OP_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 1 << 20;
const BODY: &str = "hello, bench\n";
const CLK_TCK: f64 = 100.0; // USER_HZ on Linux

fn main() {
    // cargo bench passes `--bench`; it is not ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let code = match args.first().map(String::as_str) {
        Some("upstream") => run_upstream(&args[1..]),
        Some("load") => run_load(&args[1..]),
        _ => Err("usage: inspect_load upstream ... | load ... (see the file's header)".into()),
    };
    if let Err(e) = code {
        eprintln!("inspect_load: {e}");
        std::process::exit(2);
    }
}

type Res<T> = Result<T, String>;

/// `--key value` pairs; a key given several times keeps every value.
fn options(args: &[String]) -> Res<HashMap<String, Vec<String>>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let Some(key) = k.strip_prefix("--") else {
            return Err(format!("unexpected argument {k:?}"));
        };
        let v = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        out.entry(key.to_owned()).or_default().push(v.clone());
    }
    Ok(out)
}

fn one<'a>(o: &'a HashMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    o.get(key).and_then(|v| v.last()).map(String::as_str)
}

fn need<'a>(o: &'a HashMap<String, Vec<String>>, key: &str) -> Res<&'a str> {
    one(o, key).ok_or_else(|| format!("--{key} is required"))
}

fn num<T: std::str::FromStr>(o: &HashMap<String, Vec<String>>, key: &str, default: T) -> Res<T> {
    match one(o, key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| format!("--{key}: not a number: {v}")),
    }
}

/// A socket address that must be on loopback.
fn loopback(v: &str) -> Res<SocketAddr> {
    let a: SocketAddr = v
        .parse()
        .map_err(|_| format!("{v}: not an IP:port address"))?;
    if !a.ip().is_loopback() {
        return Err(format!("{v}: only loopback addresses are allowed"));
    }
    Ok(a)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn runtime() -> Res<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

// ---- upstream -------------------------------------------------------------------------

fn run_upstream(args: &[String]) -> Res<()> {
    let o = options(args)?;
    let listen = loopback(need(&o, "listen")?)?;
    let name = need(&o, "name")?.to_owned();
    let dir = PathBuf::from(need(&o, "ca-out")?);
    let lifetime = num(&o, "lifetime", 900u64)?.min(MAX_LIFETIME_S);

    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "inspect_load upstream CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let ca_cert = params.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let issuer = rcgen::Issuer::new(params, ca_key);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let leaf = rcgen::CertificateParams::new(vec![name])
        .map_err(|e| e.to_string())?
        .signed_by(&key, &issuer)
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).map_err(|e| format!("{}: {e}", ca_file.display()))?;

    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(4096);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));

    runtime()?.block_on(async move {
        let l = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("{listen}: {e}"))?;
        eprintln!("upstream on {listen}, CA in {}", ca_file.display());
        let end = tokio::time::sleep(Duration::from_secs(lifetime));
        tokio::pin!(end);
        loop {
            tokio::select! {
                _ = &mut end => return Ok(()),
                a = l.accept() => {
                    let Ok((s, _)) = a else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let _ = s.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(Ok(tls)) = tokio::time::timeout(OP_TIMEOUT, acceptor.accept(s)).await
                        else {
                            return;
                        };
                        serve(tls).await;
                    });
                }
            }
        }
    })
}

/// Answer each request head with the fixed response, until the peer closes or idles 60 s.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.drain(..end + 4);
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
        if buf.len() > MAX_HEAD {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---- load -----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    New,
    Keepalive,
}

struct Load {
    via_proxy: bool,
    addr: SocketAddr,
    target: String,
    host: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    request: Vec<u8>,
}

fn run_load(args: &[String]) -> Res<()> {
    let o = options(args)?;
    let (via_proxy, addr) = match (one(&o, "proxy"), one(&o, "direct")) {
        (Some(p), None) => (true, loopback(p)?),
        (None, Some(d)) => (false, loopback(d)?),
        _ => return Err("give exactly one of --proxy and --direct".into()),
    };
    let target = need(&o, "target")?.to_owned();
    let (host, port) = target.rsplit_once(':').ok_or("--target is host:port")?;
    port.parse::<u16>()
        .map_err(|_| format!("--target {target}: bad port"))?;
    if let Ok(ip) = host.trim_matches(['[', ']']).parse::<std::net::IpAddr>()
        && !ip.is_loopback()
    {
        return Err(format!(
            "--target {target}: only loopback addresses are allowed"
        ));
    }
    let mode = match need(&o, "mode")? {
        "new" => Mode::New,
        "keepalive" => Mode::Keepalive,
        m => return Err(format!("--mode {m}: new or keepalive")),
    };
    let conns = num(&o, "conns", 1usize)?.clamp(1, MAX_CONNS);
    let duration =
        Duration::from_secs_f64(num(&o, "duration", 3.0f64)?.clamp(0.1, MAX_DURATION_S as f64));
    let label = one(&o, "label").unwrap_or("").to_owned();
    let pids: Vec<u32> = o
        .get("cpu-pid")
        .map(|v| {
            v.iter()
                .map(|p| p.parse().map_err(|_| format!("--cpu-pid {p}")))
                .collect()
        })
        .transpose()?
        .unwrap_or_default();

    let ca = need(&o, "ca")?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{ca}: {e}"))? {
        roots
            .add(c.map_err(|e| format!("{ca}: {e}"))?)
            .map_err(|e| format!("{ca}: {e}"))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every new connection is a full handshake: what a client without a session cache
    // (or the first connection of any client) costs the proxy.
    cfg.resumption = rustls::client::Resumption::disabled();
    let load = Arc::new(Load {
        via_proxy,
        addr,
        request: format!(
            "GET /bench HTTP/1.1\r\nHost: {}\r\nUser-Agent: inspect_load\r\nAccept: */*\r\n\r\n",
            if port == "443" { host } else { &target }
        )
        .into_bytes(),
        host: ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?,
        target,
        connector: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    });

    runtime()?.block_on(async move {
        let done = Arc::new(AtomicU64::new(0));
        let cpu_before: Vec<f64> = pids.iter().map(|p| tree_cpu_s(*p)).collect();
        let start = Instant::now();
        let deadline = start + duration;
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let (load, done) = (load.clone(), done.clone());
            tasks.push(tokio::spawn(worker(load, mode, deadline, done)));
        }
        let mut lat: Vec<u32> = Vec::new();
        let mut errors = 0u64;
        let mut first_error: Option<String> = None;
        for t in tasks {
            if let Ok(w) = t.await {
                lat.extend(w.lat);
                errors += w.errors;
                if first_error.is_none() {
                    first_error = w.first_error;
                }
            } else {
                errors += 1;
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu: Vec<(u32, f64)> = pids
            .iter()
            .zip(&cpu_before)
            .map(|(p, b)| (*p, tree_cpu_s(*p) - b))
            .collect();
        lat.sort_unstable();
        let n = lat.len() as u64;
        let pct = |p: usize| -> u32 {
            if lat.is_empty() { 0 } else { lat[(lat.len() - 1) * p / 100] }
        };
        let rate = n as f64 / elapsed;
        let cpu_json: Vec<serde_json::Value> = cpu
            .iter()
            .map(|(p, s)| {
                serde_json::json!({
                    "pid": p,
                    "cpu_s": s,
                    "cpu_us_per_req": if n > 0 { s * 1e6 / n as f64 } else { f64::NAN },
                })
            })
            .collect();
        let mode_s = if mode == Mode::New { "new" } else { "keepalive" };
        let line = serde_json::json!({
            "label": label,
            "via": if load.via_proxy { "proxy" } else { "direct" },
            "addr": load.addr.to_string(),
            "target": load.target,
            "mode": mode_s,
            "conns": conns,
            "seconds": elapsed,
            "requests": n,
            "errors": errors,
            "rate_per_s": rate,
            "latency_us": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
            "cpu": cpu_json,
        });
        println!("{line}");
        let cpu_h: Vec<String> = cpu
            .iter()
            .map(|(p, s)| {
                format!("pid {p} {:.1} us/req", if n > 0 { s * 1e6 / n as f64 } else { f64::NAN })
            })
            .collect();
        eprintln!(
            "{label} {mode_s} c={conns}: {n} requests, {errors} errors, {rate:.0}/s, p50 {} p90 {} p99 {} us{}{}",
            pct(50),
            pct(90),
            pct(99),
            if cpu_h.is_empty() { String::new() } else { format!(", cpu {}", cpu_h.join(", ")) },
            first_error.map(|e| format!(" (first error: {e})")).unwrap_or_default(),
        );
        Ok(())
    })
}

struct WorkerResult {
    lat: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
}

async fn worker(
    load: Arc<Load>,
    mode: Mode,
    deadline: Instant,
    done: Arc<AtomicU64>,
) -> WorkerResult {
    let mut r = WorkerResult {
        lat: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut session: Option<Session> = None;
    let mut buf = Vec::with_capacity(4096);
    while Instant::now() < deadline && done.load(Ordering::Relaxed) < MAX_REQUESTS {
        let t = Instant::now();
        let res = match mode {
            Mode::New => match timed(open(&load)).await {
                Ok(mut s) => {
                    let res = timed(request(&mut s, &load.request, &mut buf)).await;
                    if res.is_ok() {
                        let _ =
                            tokio::time::timeout(Duration::from_millis(100), s.shutdown()).await;
                    }
                    res
                }
                Err(e) => Err(e),
            },
            Mode::Keepalive => {
                if session.is_none() {
                    match timed(open(&load)).await {
                        Ok(s) => session = Some(s),
                        Err(e) => {
                            note(&mut r, e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let t = Instant::now();
                let s = session.as_mut().expect("opened above");
                let res = timed(request(s, &load.request, &mut buf)).await;
                if res.is_err() {
                    session = None;
                }
                res.map(|_| t)
                    .map(|t| {
                        record(&mut r, &done, t);
                    })
                    .unwrap_or_else(|e| note(&mut r, e));
                continue;
            }
        };
        match res {
            Ok(()) => record(&mut r, &done, t),
            Err(e) => {
                note(&mut r, e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    r
}

fn record(r: &mut WorkerResult, done: &AtomicU64, t: Instant) {
    r.lat
        .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    done.fetch_add(1, Ordering::Relaxed);
}

fn note(r: &mut WorkerResult, e: String) {
    r.errors += 1;
    if r.first_error.is_none() {
        r.first_error = Some(e);
    }
}

async fn timed<T>(f: impl Future<Output = Res<T>>) -> Res<T> {
    tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

type Session = tokio_rustls::client::TlsStream<TcpStream>;

/// TCP connect, `CONNECT` and its 200 when through a proxy, then the TLS handshake.
async fn open(load: &Load) -> Res<Session> {
    let mut s = TcpStream::connect(load.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    if load.via_proxy {
        let t = &load.target;
        s.write_all(format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("CONNECT: {e}"))?;
        let mut got = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        let end = loop {
            if let Some(end) = find(&got, b"\r\n\r\n") {
                break end + 4;
            }
            if got.len() > MAX_HEAD {
                return Err("CONNECT answer too long".into());
            }
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("CONNECT: {e}"))?;
            if n == 0 {
                return Err("CONNECT: closed".into());
            }
            got.extend_from_slice(&chunk[..n]);
        };
        let status = String::from_utf8_lossy(&got[..got.len().min(64)]).into_owned();
        if !status.starts_with("HTTP/1.1 200") && !status.starts_with("HTTP/1.0 200") {
            return Err(format!("CONNECT: {}", status.lines().next().unwrap_or("")));
        }
        if end != got.len() {
            return Err("CONNECT: bytes after the 200".into());
        }
    }
    load.connector
        .connect(load.host.clone(), s)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

/// One GET and its whole response (a Content-Length or chunked body).
async fn request(s: &mut Session, req: &[u8], buf: &mut Vec<u8>) -> Res<()> {
    s.write_all(req).await.map_err(|e| format!("write: {e}"))?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err("response head too long".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") && !head.starts_with("http/1.0 200") {
        return Err(format!("status: {}", head.lines().next().unwrap_or("")));
    }
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head
        .lines()
        .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
    loop {
        let body = &buf[head_end..];
        let complete = match (length, chunked) {
            (Some(n), false) => body.len() >= n,
            (_, true) => body.ends_with(b"0\r\n\r\n"),
            (None, false) => return Err("response without a length".into()),
        };
        if complete {
            return Ok(());
        }
        if body.len() > MAX_BODY {
            return Err("response body too long".into());
        }
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed in the body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// User and system CPU seconds of `pid` and all its descendants, from /proc.
fn tree_cpu_s(pid: u32) -> f64 {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut ticks: HashMap<u32, u64> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Fields after the last ')' (the command may hold spaces and parentheses):
            // state ppid ... utime (12th) stime (13th).
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if f.len() < 13 {
                continue;
            }
            let ppid: u32 = f[1].parse().unwrap_or(0);
            let t = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            children.entry(ppid).or_default().push(p);
            ticks.insert(p, t);
        }
    }
    let mut total = 0u64;
    let mut stack = vec![pid];
    let mut seen = 0usize;
    while let Some(p) = stack.pop() {
        seen += 1;
        if seen > 100_000 {
            break;
        }
        total += ticks.get(&p).copied().unwrap_or(0);
        if let Some(c) = children.get(&p) {
            stack.extend(c);
        }
    }
    total as f64 / CLK_TCK
}
