//! Through the proxy against direct, to the same loopback upstream, in one run:
//! CONNECT-to-200 latency (p50, p99), allowed connects per second at 1 and 32 clients, the
//! deny path, and tunnel throughput. `cargo bench --bench proxy`.
//!
//! The proxy runs in-process on its own worker threads (`PROXY_WORKERS`, default 2);
//! clients and upstreams run on another (`CLIENT_WORKERS`, default 2). Every loop is
//! bounded in count and time, and all traffic stays on 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aml_egress::config::{self, Settings};
use aml_egress::proxy::{self, ListenAddr, Live, Shared};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// The tests' loopback peers: `upstream` runs a closure on each accepted connection.
#[allow(dead_code)]
#[path = "../tests/support/net.rs"]
mod net;
use net::upstream;

const CONNECTS: usize = 4000;
const BYTES: u64 = 1 << 30;
const TIME_CAP: Duration = Duration::from_secs(20);

fn main() {
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("CLIENT_WORKERS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
        )
        .enable_all()
        .build()
        .unwrap();
    let (echo, source) = client_rt.block_on(async { (echo().await, source().await) });
    // AML_BENCH_PROXY=host:port measures another proxy instead (Squid, say), with the
    // upstreams named by address; AML_BENCH_PROXY_PID lets it count that process's CPU.
    let external: Option<SocketAddr> = std::env::var("AML_BENCH_PROXY")
        .ok()
        .map(|a| a.parse().expect("AML_BENCH_PROXY is host:port"));
    let (proxy, allowed, bulk): (SocketAddr, &'static str, &'static str) = match external {
        Some(addr) => (
            addr,
            Box::leak(echo.to_string().into_boxed_str()),
            Box::leak(source.to_string().into_boxed_str()),
        ),
        None => (
            start_proxy(echo, source),
            "bench.example.com:8443",
            "bench.example.com:9443",
        ),
    };
    let metrics = METRICS.get().cloned();
    let pid: Option<u32> = std::env::var("AML_BENCH_PROXY_PID")
        .ok()
        .and_then(|p| p.parse().ok());
    // `cargo bench --bench proxy -- throughput` runs one part: latency, rate or throughput.
    let only: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let run = move |part: &str| only.as_deref().is_none_or(|o| part.contains(o));
    client_rt.block_on(async move {
        println!(
            "aml-egress through-proxy bench (loopback, {} connects per series)",
            CONNECTS
        );
        if run("latency") {
            let direct = latencies(CONNECTS, || async move {
                let t = Instant::now();
                let s = TcpStream::connect(echo).await.unwrap();
                let d = t.elapsed();
                drop(s);
                d
            })
            .await;
            let through = latencies(CONNECTS, || async move {
                let t = Instant::now();
                let (s, ok) = connect_via(proxy, allowed).await;
                let d = t.elapsed();
                assert!(ok, "CONNECT was not answered 200");
                drop(s);
                d
            })
            .await;
            let denied = latencies(CONNECTS, || async move {
                let t = Instant::now();
                let (s, ok) = connect_via(proxy, "denied.example.net:443").await;
                let d = t.elapsed();
                assert!(!ok);
                drop(s);
                d
            })
            .await;
            report("direct TCP connect", &direct);
            report("CONNECT to 200 (allowed)", &through);
            report("CONNECT to 403 (denied)", &denied);
            println!(
                "added latency per CONNECT: p50 {:.1} us, p99 {:.1} us",
                us(pct(&through, 50)) - us(pct(&direct, 50)),
                us(pct(&through, 99)) - us(pct(&direct, 99)),
            );
        }
        if run("rate") {
            for clients in [1usize, 32] {
                let rate = connect_rate(proxy, clients, allowed).await;
                println!("allowed connects per second, {clients:>2} clients: {rate:>8.0}");
            }
            let rate = connect_rate(proxy, 32, "denied.example.net:443").await;
            println!("denied connects per second,  32 clients: {rate:>8.0}");
        }
        if run("mix")
            && let Some(metrics) = &metrics
        {
            mix(proxy, allowed, bulk, metrics).await;
        }
        if !run("throughput") {
            return;
        }

        let direct = throughput(TcpStream::connect(source).await.unwrap()).await;
        let (s, ok) = connect_via(proxy, bulk).await;
        assert!(ok);
        let cpu_before = proxy_cpu_seconds(pid);
        let through = throughput(s).await;
        let cpu = proxy_cpu_seconds(pid) - cpu_before;
        println!(
            "tunnel throughput: direct {:.2} GiB/s, through the proxy {:.2} GiB/s ({:.2}x)",
            direct,
            through,
            through / direct
        );
        println!(
            "proxy CPU per GiB relayed: {:.0} ms (user and system time of its worker threads)",
            cpu * 1000.0 * (1u64 << 30) as f64 / BYTES as f64
        );
    });
}

fn start_proxy(echo: SocketAddr, source: SocketAddr) -> SocketAddr {
    let workers: usize = std::env::var("PROXY_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let toml = format!(
        "[proxy]\nworkers = {workers}\nlisten = [\"127.0.0.1:0\"]\ntls_ports = []\nopaque_ports = [8443, 9443]\nmax_connections = 100000\nmax_connections_per_client = 0\n\
         [[allow]]\nhost = \"bench.example.com\"\nports = [\"8443\", \"9443\"]\n\
         [upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\n\
         connect_to = {{ \"bench.example.com:8443\" = \"{echo}\", \"bench.example.com:9443\" = \"{source}\" }}\n"
    );
    let dir = std::env::temp_dir().join(format!("aml-egress-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bench.toml");
    std::fs::write(&file, toml).unwrap();
    let settings = Settings::load_with_env(Some(&file), Some(Default::default())).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("proxy-worker")
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let compiled = config::compile(settings).unwrap();
            let workers = proxy::Workers::new(compiled.proxy.workers).unwrap();
            let listeners = proxy::bind(&compiled, workers.len()).unwrap();
            let own: Vec<ListenAddr> = listeners
                .iter()
                .map(|l| ListenAddr(l.local_addr().unwrap()))
                .collect();
            let metrics = std::sync::Arc::new(aml_egress::metrics::Metrics::new(1000));
            let _ = METRICS.set(metrics.clone());
            tx.send(own[0].0).unwrap();
            let logs = std::sync::Arc::new(aml_egress::logs::LogBudget::new(
                10,
                metrics.suppressed_lines(),
            ));
            let live = Live::build(compiled, own, metrics, logs).unwrap();
            let (_stop, stopping) = tokio::sync::watch::channel(false);
            proxy::run(listeners, workers, Shared::new(live, stopping)).await;
        });
    });
    rx.recv().unwrap()
}

/// An upstream that holds each connection until the client closes it.
async fn echo() -> SocketAddr {
    upstream(|mut s| async move {
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
}

/// An upstream that sends `BYTES` bytes to each connection, then closes.
async fn source() -> SocketAddr {
    upstream(|mut s| async move {
        let chunk = vec![7u8; 256 * 1024];
        let mut left = BYTES;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if s.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    })
    .await
}

/// CONNECT through the proxy; says whether the answer was 200.
async fn connect_via(proxy: SocketAddr, target: &str) -> (TcpStream, bool) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0, "proxy closed the connection");
        got += n;
    }
    let ok = buf.starts_with(b"HTTP/1.1 200");
    (s, ok)
}

async fn latencies<F, Fut>(n: usize, f: F) -> Vec<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let start = Instant::now();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(f().await);
        if start.elapsed() > TIME_CAP {
            break;
        }
    }
    v.sort();
    v
}

async fn connect_rate(proxy: SocketAddr, clients: usize, target: &'static str) -> f64 {
    let per = CONNECTS / clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            let t = Instant::now();
            while done < per && t.elapsed() < TIME_CAP {
                let (s, _) = connect_via(proxy, target).await;
                drop(s);
                done += 1;
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// The in-process proxy's metrics (not set when another proxy is measured).
static METRICS: std::sync::OnceLock<std::sync::Arc<aml_egress::metrics::Metrics>> =
    std::sync::OnceLock::new();

/// Long tunnels beside short requests: CONNECT latency before and while 200 tunnels are
/// held open and 4 of them stream (each bounded by `BYTES` and `TIME_CAP`), and how the
/// kernel spread the open connections over the workers.
async fn mix(
    proxy: SocketAddr,
    allowed: &'static str,
    bulk: &'static str,
    metrics: &aml_egress::metrics::Metrics,
) {
    let short = || async move {
        let t = Instant::now();
        let (s, ok) = connect_via(proxy, allowed).await;
        let d = t.elapsed();
        assert!(ok, "CONNECT was not answered 200");
        drop(s);
        d
    };
    let quiet = latencies(CONNECTS / 4, short).await;
    let mut held = Vec::new();
    for _ in 0..200 {
        let (s, ok) = connect_via(proxy, allowed).await;
        assert!(ok);
        held.push(s);
    }
    let streams: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let (s, ok) = connect_via(proxy, bulk).await;
                assert!(ok);
                throughput(s).await
            })
        })
        .collect();
    let busy = latencies(CONNECTS / 4, short).await;
    let spread: Vec<String> = metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("aml_egress_worker_connections{"))
        .map(str::to_owned)
        .collect();
    let mut rate = 0.0;
    for s in streams {
        rate += s.await.unwrap();
    }
    drop(held);
    report("CONNECT to 200, quiet", &quiet);
    report("CONNECT to 200, 4 streaming", &busy);
    println!("4 streams together: {rate:.2} GiB/s; open connections by worker meanwhile:");
    for line in spread {
        println!("  {line}");
    }
}

/// Read everything the source sends; GiB per second.
async fn throughput(mut s: TcpStream) -> f64 {
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let mut total = 0u64;
    while total < BYTES && start.elapsed() < TIME_CAP {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    total as f64 / start.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

/// CPU seconds (user + system) used so far by the proxy: its worker threads in this
/// process, or the whole process `pid`, from /proc.
fn proxy_cpu_seconds(pid: Option<u32>) -> f64 {
    let stats: Vec<std::path::PathBuf> = match pid {
        Some(pid) => vec![format!("/proc/{pid}/stat").into()],
        None => std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let comm = comm.trim();
                comm == "proxy-worker" || comm.starts_with("aml-egress-w")
            })
            .map(|t| t.path().join("stat"))
            .collect(),
    };
    let mut ticks = 0u64;
    for path in stats {
        let stat = std::fs::read_to_string(path).unwrap_or_default();
        // After the parenthesised name the state is field 3; utime and stime are 14 and 15.
        if let Some((_, rest)) = stat.rsplit_once(") ") {
            let f: Vec<&str> = rest.split(' ').collect();
            ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 / 100.0 // USER_HZ
}

fn pct(v: &[Duration], p: usize) -> Duration {
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(what: &str, v: &[Duration]) {
    println!(
        "{what:<28} p50 {:>7.1} us   p99 {:>7.1} us   ({} samples)",
        us(pct(v, 50)),
        us(pct(v, 99)),
        v.len()
    );
}
