//! Scale-out: three aml-egress instances behind HAProxy (TCP mode, health checks on each
//! instance's `/readyz`, no redispatch and no retries, as Azure's load balancer has
//! neither), under steady CONNECT and plain-HTTP load, restarted one at a time (SIGTERM with
//! `proxy.shutdown_delay_secs` above HAProxy's detection time, drain, start again). Every
//! request must get its expected answer and every tunnel run to its end.
//!
//! Needs `haproxy` (CI installs it; elsewhere the test skips with a reason).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::TempFile;
use support::net::{echo_upstream, read_request_head, upstream};

const BIN: &str = env!("CARGO_BIN_EXE_aml-egress");

/// A free loopback port (bound and released; the instances bind it again at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One instance: its config and, while running, its process.
struct Instance {
    config: TempFile,
    child: Option<Child>,
}

impl Instance {
    fn start(&mut self) {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config.0)
            .env_remove("AML_EGRESS_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.contains("aml-egress serving") {
                std::thread::spawn(move || lines.for_each(drop));
                self.child = Some(child);
                return;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("an instance exited before serving");
    }

    /// SIGTERM, then wait for the drain to end and the process to exit 0.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        assert_eq!(child.wait().unwrap().code(), Some(0));
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// HAProxy's view of its servers (`show servers state`): how many are UP.
fn servers_up(socket: &std::path::Path) -> usize {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return 0;
    };
    let _ = s.write_all(b"show servers state aml\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    // Columns: be_id be_name srv_id srv_name srv_addr srv_op_state (2 = running) ...
    out.lines()
        .filter(|l| l.split_whitespace().nth(5) == Some("2"))
        .count()
}

/// Wait (bounded) until HAProxy sees `n` servers UP.
fn wait_up(socket: &std::path::Path, n: usize) {
    let until = Instant::now() + Duration::from_secs(30);
    while servers_up(socket) != n {
        assert!(Instant::now() < until, "HAProxy never saw {n} servers up");
        std::thread::sleep(Duration::from_millis(50)); // polling an external process
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_a_load_balancer_loses_no_request_and_no_tunnel() {
    let found = Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "CI installs haproxy");
        eprintln!("skipped: haproxy is not installed");
        return;
    }
    let web = upstream(|mut s| async move {
        while read_request_head(&mut s).await.is_some() {
            if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let echo = echo_upstream().await;
    let mut instances = Vec::new();
    let mut servers = String::new();
    for i in 0..3 {
        let (port, admin) = (free_port(), free_port());
        let config = TempFile::new(
            "instance.toml",
            &format!(
                "[proxy]\nlisten = [\"127.0.0.1:{port}\"]\nshutdown_delay_secs = 3\ngrace_period_secs = 20\ntls_ports = []\nopaque_ports = [{}]\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[allow]]\nhost = \"web.test\"\nports = [80]\n[[allow]]\nhost = \"tunnel.test\"\nports = [{}]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"web.test:80\" = \"{web}\", \"tunnel.test:{}\" = \"{echo}\" }}\n",
                echo.port(),
                echo.port(),
                echo.port()
            ),
        );
        servers.push_str(&format!(
            "    server a{i} 127.0.0.1:{port} check port {admin} inter 300 fall 2 rise 1\n"
        ));
        instances.push(Instance {
            config,
            child: None,
        });
    }
    for inst in &mut instances {
        inst.start();
    }
    let front = free_port();
    let dir = std::env::temp_dir().join(format!("aml-egress-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("admin.sock");
    let cfg = TempFile::new(
        "haproxy.cfg",
        &format!(
            "global\n    stats socket {} level admin\n    maxconn 2000\ndefaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    retries 0\n    no option redispatch\nfrontend lb\n    bind 127.0.0.1:{front}\n    default_backend aml\nbackend aml\n    balance roundrobin\n    option httpchk GET /readyz\n{servers}",
            socket.display()
        ),
    );
    let mut haproxy = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg.0)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_up(&socket, 3);
    let lb: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();

    // Steady load until the restarts are over: plain HTTP and short tunnels, bounded.
    let done = Arc::new(AtomicBool::new(false));
    let (requests, tunnels, failures) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(std::sync::Mutex::new(Vec::<String>::new())),
    );
    let mut load = Vec::new();
    for worker in 0..4 {
        let (done, requests, tunnels, failures) = (
            done.clone(),
            requests.clone(),
            tunnels.clone(),
            failures.clone(),
        );
        let echo_port = echo.port();
        load.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !done.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let result = if worker % 2 == 0 {
                    http_once(lb)
                        .await
                        .map(|_| requests.fetch_add(1, Ordering::Relaxed))
                } else {
                    tunnel_once(lb, echo_port)
                        .await
                        .map(|_| tunnels.fetch_add(1, Ordering::Relaxed))
                };
                if let Err(e) = result {
                    failures.lock().unwrap().push(e);
                }
            }
        }));
    }
    // One at a time: SIGTERM (HAProxy sees /readyz fail within the shutdown delay), drain,
    // start again, wait until HAProxy has it back.
    let restarts = tokio::task::spawn_blocking(move || {
        for inst in &mut instances {
            inst.stop();
            inst.start();
            wait_up(&socket, 3);
        }
        instances
    })
    .await
    .unwrap();
    done.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    drop(restarts);
    let _ = std::fs::remove_dir_all(&dir);
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests and {} tunnels failed: {:?}",
        failures.len(),
        requests.load(Ordering::Relaxed),
        tunnels.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(requests.load(Ordering::Relaxed) > 0 && tunnels.load(Ordering::Relaxed) > 0);
}

/// One plain-HTTP request through the load balancer; `Err` says what went wrong.
async fn http_once(lb: SocketAddr) -> Result<(), String> {
    let mut s = TcpStream::connect(lb)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    match read {
        Ok(Ok(_)) if text.starts_with("HTTP/1.1 200 ") && text.ends_with("ok") => Ok(()),
        _ => Err(format!("http: {text:?}")),
    }
}

/// One tunnel through the load balancer carrying three round trips to the echo.
async fn tunnel_once(lb: SocketAddr, port: u16) -> Result<(), String> {
    let mut s = TcpStream::connect(lb)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(format!("CONNECT tunnel.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut b))
            .await
            .map_err(|_| "no CONNECT answer".to_owned())?
            .map_err(|e| format!("CONNECT answer: {e}"))?;
        head.push(b[0]);
        if head.len() > 1024 {
            return Err("a long CONNECT answer".into());
        }
    }
    if !head.starts_with(b"HTTP/1.1 200 Connection established\r\n") {
        return Err(format!("CONNECT: {}", String::from_utf8_lossy(&head)));
    }
    for round in 0..3u8 {
        let msg = [b'a' + round; 16];
        s.write_all(&msg)
            .await
            .map_err(|e| format!("tunnel write: {e}"))?;
        let mut back = [0u8; 16];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut back))
            .await
            .map_err(|_| "tunnel stalled".to_owned())?
            .map_err(|e| format!("tunnel read: {e}"))?;
        if back != msg {
            return Err("tunnel bytes differ".into());
        }
    }
    Ok(())
}
