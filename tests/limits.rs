//! Limits and time: connection limits (503), slow and oversized heads (408, 431), keep-alive
//! timers, idle tunnels, and shutdown with its grace period, against a live proxy.

mod support;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::net::exchange;
use support::peers::{keepalive_upstream, open_echo_tunnel};
use support::proxy::{Proxy, start_proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_clients_get_503_at_once() {
    let p = start_proxy("[proxy]\nmax_connections = 1\n").await;
    let _held = TcpStream::connect(p.addr).await.unwrap();
    // Held once accepted (by either worker); only then is the next one over the limit.
    p.until_sample("aml_egress_open_connections{mode=\"enforce\"}", 1.0)
        .await;
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
async fn tunnels_are_spread_over_the_workers_and_each_worker_counts_its_own() {
    let (p, first) = open_echo_tunnel("workers = 2\n").await;
    let mut tunnels = vec![first];
    for _ in 1..64 {
        let (mut s, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        tunnels.push(s);
    }
    let w0 = p
        .sample("aml_egress_worker_connections{worker=\"0\"}")
        .await;
    let w1 = p
        .sample("aml_egress_worker_connections{worker=\"1\"}")
        .await;
    assert_eq!(w0 + w1, 64.0, "{w0} + {w1}");
    // The kernel hashes connections over the workers' sockets: both get some (the chance
    // that one of two gets none of 64 is 2^-63).
    assert!(w0 > 0.0 && w1 > 0.0, "{w0} and {w1}");
    drop(tunnels);
    p.until_sample("aml_egress_worker_connections{worker=\"0\"}", 0.0)
        .await;
    p.until_sample("aml_egress_worker_connections{worker=\"1\"}", 0.0)
        .await;
}
