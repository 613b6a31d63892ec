//! HTTP conformance of what the proxy forwards and answers, against scripted upstreams that
//! write raw bytes (so that faults no well-behaved library produces can be made), asserting
//! what the client got and what reached the upstream.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::clients::curl_async;
use support::net::{exchange, read_request_head, read_until, upstream};
use support::proxy::start_proxy;

/// An upstream that records each request head and answers with `answer` verbatim.
async fn scripted(answer: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let addr = upstream(move |mut s| {
        let h = h.clone();
        async move {
            if let Some(head) = read_request_head(&mut s).await {
                h.lock().unwrap().push(head);
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            }
        }
    })
    .await;
    (addr, heads)
}

fn config(web: SocketAddr, extra: &str) -> String {
    format!(
        "[proxy]\n{extra}\n[[allow]]\nhost = \"web.test\"\nports = [80]\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"web.test:80\" = \"{web}\" }}\n"
    )
}

/// Send a raw request and read everything until the proxy closes.
async fn raw(proxy: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_with_a_content_length_reaches_the_client_whole() {
    let (web, _) = scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let p = start_proxy(&config(web, "")).await;
    let (code, body, err) = curl_async(vec![
        "-x".into(),
        format!("http://{}", p.addr),
        "http://web.test/".into(),
    ])
    .await;
    assert_eq!((code, body.as_str()), (0, "hello"), "{err}");
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !resp.to_ascii_lowercase().contains("content-length: 2"),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_refused_not_relabelled() {
    let (web, heads) = scripted(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    let p = start_proxy(&config(web, "")).await;
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
    let resp = raw(
        p.addr,
        b"POST http://web.test/up HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 501 "), "{resp}");
    assert!(resp.contains("details=\"transfer_coding\""), "{resp}");
    assert_eq!(
        heads.lock().unwrap().len(),
        1,
        "the POST never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_in_the_status_line() {
    let p = start_proxy("").await;
    let (_, resp) = exchange(p.addr, "CONNECT pypi.org:8080 HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with(
            "HTTP/1.1 403 Forbidden by aml-egress: pypi.org:8080 port not allowed\r\n"
        ),
        "{resp}"
    );
    let (_, resp) = exchange(p.addr, "CONNECT x..y:443 HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 403 Forbidden by aml-egress: invalid target\r\n"),
        "{resp}"
    );
    // What curl shows a person.
    let (code, _, err) = curl_async(vec![
        "-x".into(),
        format!("http://{}", p.addr),
        "https://notpytorch.org/".into(),
    ])
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("403"), "{err}");
    let (_, resp) = exchange(p.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 400 Bad Request by aml-egress: not a proxy request\r\n"),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_behind_a_refused_connect_are_never_read_as_a_request() {
    let (web, heads) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = start_proxy(&config(web, "")).await;
    let resp = raw(
        p.addr,
        b"CONNECT denied.example.com:443 HTTP/1.1\r\n\r\nGET http://web.test/smuggled HTTP/1.1\r\nHost: web.test\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403 "), "{resp}");
    assert_eq!(
        resp.matches("HTTP/1.1").count(),
        1,
        "one answer, then close: {resp}"
    );
    assert!(
        heads.lock().unwrap().is_empty(),
        "the smuggled GET reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_may_hold_many_fields_within_its_byte_limit() {
    let (web, heads) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = start_proxy(&config(web, "")).await;
    let fields: String = (0..120).map(|i| format!("X-F{i}: v\r\n")).collect();
    let request = format!(
        "GET http://web.test/many HTTP/1.1\r\nHost: web.test\r\n{fields}Connection: close\r\n\r\n"
    );
    let resp = raw(p.addr, request.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert!(heads.lock().unwrap()[0].contains("x-f119: v"));
    // More than one field per 64 bytes of the limit (256 at the default): 431.
    let fields: String = (0..300).map(|i| format!("X-F{i}: v\r\n")).collect();
    let request = format!(
        "GET http://web.test/many HTTP/1.1\r\nHost: web.test\r\n{fields}Connection: close\r\n\r\n"
    );
    let resp = raw(p.addr, request.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431 "), "{resp}");
    assert_eq!(heads.lock().unwrap().len(), 1);

    // A response head with many fields passes; one over the byte limit is a 502.
    let many: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\n{}Content-Length: 2\r\n\r\nok",
            (0..150)
                .map(|i| format!("X-R{i}: v\r\n"))
                .collect::<String>()
        )
        .into_boxed_str(),
    );
    let (web, _) = scripted(many.as_bytes()).await;
    let p = start_proxy(&config(web, "")).await;
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let huge: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\nok",
            "a".repeat(20_000)
        )
        .into_boxed_str(),
    );
    let (web, _) = scripted(huge.as_bytes()).await;
    let p = start_proxy(&config(web, "")).await;
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
    assert!(
        resp.contains("error=http_response_header_section_size"),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_ending_in_bare_line_feeds_is_answered_at_once() {
    let (web, _) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = start_proxy(&config(web, "header_timeout_secs = 30")).await;
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\nHost: web.test\nConnection: close\n\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn via_is_added_both_ways_unless_turned_off_and_connect_says_connection_established() {
    let (web, heads) = scripted(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = start_proxy(&config(web, "")).await;
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nVia: 1.1 inner\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "our version: {resp}");
    assert!(
        resp.to_ascii_lowercase().contains("via: 1.1 aml-egress"),
        "{resp}"
    );
    let up = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(
        up.contains("via: 1.1 inner") && up.contains("via: 1.1 aml-egress"),
        "{up}"
    );

    let (web, heads) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let p = start_proxy(&config(web, "via = false")).await;
    let resp = raw(
        p.addr,
        b"GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!resp.to_ascii_lowercase().contains("via:"), "{resp}");
    assert!(
        !heads.lock().unwrap()[0]
            .to_ascii_lowercase()
            .contains("via:")
    );

    let echo = support::net::echo_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\nopaque_ports = [443]\ntls_ports = []\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\" }}\n"
    ))
    .await;
    let (_, resp) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_on_a_stale_pooled_connection_is_sent_again_once() {
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    let get = |path: &str| {
        format!("GET http://web.test{path} HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
    };
    assert!(
        raw(p.addr, get("/1").as_bytes())
            .await
            .starts_with("HTTP/1.1 200 ")
    );
    let resp = raw(p.addr, get("/2").as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 200 "),
        "retried on a fresh connection: {resp}"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [
            (0, "GET /1 HTTP/1.1".to_owned()),
            (0, "GET /2 HTTP/1.1".to_owned()),
            (1, "GET /2 HTTP/1.1".to_owned())
        ]
    );
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);

    // A POST is not sent again.
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    assert!(
        raw(p.addr, get("/1").as_bytes())
            .await
            .starts_with("HTTP/1.1 200 ")
    );
    let post = b"POST http://web.test/form HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let resp = raw(p.addr, post).await;
    assert!(resp.starts_with("HTTP/1.1 502 "), "{resp}");
    assert_eq!(seen.lock().unwrap().len(), 2);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 0.0);
}

/// A response's status line, its fields (sorted; a `date` checked to be an HTTP-date and
/// then shown as `date: <http-date>`, since two answers may be a second apart), and its body.
fn without_date(resp: &str) -> (String, Vec<String>, String) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_owned();
    let mut fields: Vec<String> = lines
        .map(|l| match l.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("date") => {
                let date = httpdate::parse_http_date(value.trim());
                assert!(date.is_ok(), "not an HTTP-date: {l:?}");
                "date: <http-date>".to_owned()
            }
            _ => l.to_ascii_lowercase(),
        })
        .collect();
    fields.sort();
    (status, fields, body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connect_is_refused_with_the_same_answer_hyper_gives_a_later_one() {
    let p = start_proxy("").await;
    // The first request of a connection, answered by the proxy on the socket.
    let first = raw(
        p.addr,
        b"CONNECT pypi.org:8080 HTTP/1.1\r\nHost: pypi.org:8080\r\n\r\n",
    )
    .await;
    // The same CONNECT after a request on the same connection, so hyper answers it.
    let later = raw(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nCONNECT pypi.org:8080 HTTP/1.1\r\nHost: pypi.org:8080\r\n\r\n",
    )
    .await;
    let later = &later[later.find("\r\n\r\n").unwrap() + 4..]; // past the first answer's head
    let later = &later[later.find("HTTP/1.1 403").expect(later)..];
    assert_eq!(
        without_date(&first),
        without_date(later),
        "first:\n{first}\nlater:\n{later}"
    );
    let (status, fields, body) = without_date(&first);
    assert_eq!(
        status,
        "HTTP/1.1 403 Forbidden by aml-egress: pypi.org:8080 port not allowed"
    );
    assert!(
        fields.contains(&"connection: close".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"date: <http-date>".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&format!("content-length: {}", body.len())),
        "{fields:?} {body:?}"
    );
    assert!(
        body.starts_with("aml-egress refused pypi.org:8080: port not allowed"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connect_is_accepted_with_the_same_200_hyper_gives_a_later_one() {
    let echo = support::net::echo_upstream().await;
    let p = start_proxy(&format!(
        "[proxy]\nopaque_ports = [443]\ntls_ports = []\n[upstream]\nallow_cidrs = [\"127.0.0.1/32\"]\nconnect_to = {{ \"pypi.org:443\" = \"{echo}\" }}\n"
    ))
    .await;
    let (_first_conn, first) = exchange(p.addr, "CONNECT pypi.org:443 HTTP/1.1\r\n\r\n").await;
    // After a refused request on the same connection, hyper answers the CONNECT.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Its 400 read whole: the head, then as many bytes as its Content-Length says.
    let whole = |got: &[u8]| {
        let text = String::from_utf8_lossy(got);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0usize);
        body.len() >= length
    };
    let got = read_until(&mut s, whole).await;
    assert!(got.starts_with(b"HTTP/1.1 400 "));
    s.write_all(b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let later = read_until(&mut s, |got| got.windows(4).any(|w| w == b"\r\n\r\n")).await;
    let later = String::from_utf8_lossy(&later).into_owned();
    assert_eq!(
        without_date(&first),
        without_date(&later),
        "first:\n{first}\nlater:\n{later}"
    );
    let (status, fields, body) = without_date(&first);
    assert_eq!(status, "HTTP/1.1 200 Connection established");
    assert_eq!(fields, ["date: <http-date>"]);
    assert_eq!(body, "");
}

/// Send `requests` through a `CONNECT web.test:80` tunnel and read until the proxy closes.
async fn through_tunnel(proxy: SocketAddr, requests: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n")
        .await
        .unwrap();
    s.write_all(requests).await.unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pooled_connection_first_used_inside_a_tunnel_is_retried_too() {
    let get = |path: &str, close: bool| {
        let connection = if close { "Connection: close\r\n" } else { "" };
        format!("GET http://web.test{path} HTTP/1.1\r\nHost: web.test\r\n{connection}\r\n")
    };
    let in_tunnel = |path: &str, close: bool| {
        let connection = if close { "Connection: close\r\n" } else { "" };
        format!("GET {path} HTTP/1.1\r\nHost: web.test\r\n{connection}\r\n")
    };
    // The connection that served /1 was reused for /2, which it read and never answered;
    // /2 then went once more, on another connection.
    let retried = |seen: &Mutex<Vec<(usize, String)>>| {
        let seen = seen.lock().unwrap().clone();
        let lines: Vec<&str> = seen.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(
            lines,
            ["GET /1 HTTP/1.1", "GET /2 HTTP/1.1", "GET /2 HTTP/1.1"]
        );
        assert_eq!(seen[0].0, seen[1].0, "{seen:?}");
        assert_ne!(seen[1].0, seen[2].0, "{seen:?}");
    };

    // Opened by a request in a tunnel, reused by an absolute-form request.
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    let first = through_tunnel(p.addr, in_tunnel("/1", true).as_bytes()).await;
    assert!(first.contains("\r\n\r\nok"), "{first}");
    let resp = raw(p.addr, get("/2", true).as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    retried(&seen);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);

    // Opened by a request in a tunnel that stays open, reused by an absolute-form request.
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    let mut tunnel = TcpStream::connect(p.addr).await.unwrap();
    let open = format!(
        "CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n{}",
        in_tunnel("/1", false)
    );
    tunnel.write_all(open.as_bytes()).await.unwrap();
    read_until(&mut tunnel, |got| got.ends_with(b"\r\n\r\nok")).await;
    let resp = raw(p.addr, get("/2", true).as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    retried(&seen);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);
    drop(tunnel);

    // Opened and reused by the same tunnel's two requests.
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    let both = format!("{}{}", in_tunnel("/1", false), in_tunnel("/2", true));
    let resp = through_tunnel(p.addr, both.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    assert!(!resp.contains(" 502 "), "{resp}");
    retried(&seen);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);

    // Opened by an absolute-form request, reused inside a tunnel that hyper answered (a
    // CONNECT after a request on the same connection).
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(get("/1", false).as_bytes()).await.unwrap();
    read_until(&mut s, |got| got.ends_with(b"\r\n\r\nok")).await;
    let connect = "CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n";
    s.write_all(format!("{connect}{}", in_tunnel("/2", true)).as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200 Connection established\r\n"),
        "{rest}"
    );
    assert!(rest.contains("HTTP/1.1 200 OK"), "{rest}");
    assert!(!rest.contains(" 502 "), "{rest}");
    retried(&seen);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);

    // Opened by an absolute-form request, reused inside a tunnel.
    let (web, seen) = stale_after_one().await;
    let p = start_proxy(&config(web, "")).await;
    let first = raw(p.addr, get("/1", true).as_bytes()).await;
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
    let resp = through_tunnel(p.addr, in_tunnel("/2", true).as_bytes()).await;
    assert!(resp.contains("HTTP/1.1 200 OK"), "{resp}");
    assert!(!resp.contains(" 502 "), "{resp}");
    retried(&seen);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);
}

/// A keep-alive upstream on which the first connection to receive a request answers it,
/// then reads the next and closes without answering; every other connection answers all.
/// (A CONNECT's own dial opens a connection that never carries a request when the tunnel
/// turns out to carry HTTP.)
async fn stale_after_one() -> (SocketAddr, Arc<Mutex<Vec<(usize, String)>>>) {
    stale_after_one_closing(false).await
}

/// As [`stale_after_one`]; with `reset`, the stale connection ends with a reset (as a
/// server that drops a connection with unread bytes, or a middlebox, does) instead of a FIN.
async fn stale_after_one_closing(reset: bool) -> (SocketAddr, Arc<Mutex<Vec<(usize, String)>>>) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s2, c2, claimed) = (
        seen.clone(),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let addr = upstream(move |mut s| {
        let (seen, conn, claimed) = (
            s2.clone(),
            c2.fetch_add(1, Ordering::SeqCst),
            claimed.clone(),
        );
        async move {
            let mut n = 0;
            let mut stale = false;
            while let Some(head) = read_request_head(&mut s).await {
                n += 1;
                if n == 1 {
                    stale = !claimed.swap(true, Ordering::SeqCst);
                }
                let line = head.lines().next().unwrap_or("").to_owned();
                seen.lock().unwrap().push((conn, line));
                if stale && n == 2 {
                    if reset {
                        #[allow(deprecated)] // SO_LINGER 0 is the point: a reset, not a FIN
                        s.set_linger(Some(std::time::Duration::ZERO)).unwrap();
                    }
                    return; // read, never answered
                }
                let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if s.write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pooled_connection_that_ends_with_a_reset_is_retried_too() {
    let get = |path: &str| {
        format!("GET http://web.test{path} HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n")
    };
    let (web, seen) = stale_after_one_closing(true).await;
    let p = start_proxy(&config(web, "")).await;
    let first = raw(p.addr, get("/1").as_bytes()).await;
    assert!(first.starts_with("HTTP/1.1 200 "), "{first}");
    let resp = raw(p.addr, get("/2").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);

    // The same inside a tunnel: opened by its first request, reset on its second.
    let (web, seen) = stale_after_one_closing(true).await;
    let p = start_proxy(&config(web, "")).await;
    let both = "GET /1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n";
    let resp = through_tunnel(p.addr, both.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1 200 OK").count(), 2, "{resp}");
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(p.sample("aml_egress_upstream_retries_total").await, 1.0);
}

/// The fields a front end may route on, as a client could send them.
/// (CGI-style back ends read `X_Forwarded_Host` as `X-Forwarded-Host`.)
const FORWARDING: &str = "Forwarded: for=192.0.2.1;host=other-tenant.example\r\nX-Forwarded-For: 192.0.2.1\r\nX-Forwarded-Host: other-tenant.example\r\nX-Forwarded-Port: 8443\r\nX-Forwarded-Prefix: /admin\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Server: other-tenant.example\r\nX-Host: other-tenant.example\r\nX-Original-Host: other-tenant.example\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nX_Forwarded_Host: other-tenant.example\r\nx-forwarded_for: 192.0.2.1\r\n";

/// The field names of a request head, lower-cased.
fn field_names(head: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_fields_are_removed_from_forwarded_requests_unless_kept() {
    let forwarding: Vec<String> = field_names(&format!("GET / HTTP/1.1\r\n{FORWARDING}"));
    assert_eq!(forwarding.len(), 13);
    let absolute = format!(
        "GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n{FORWARDING}X-Other: kept\r\nConnection: close\r\n\r\n"
    );
    let in_tunnel = format!(
        "GET / HTTP/1.1\r\nHost: web.test\r\n{FORWARDING}X-Other: kept\r\nConnection: close\r\n\r\n"
    );
    for (extra, kept) in [("", false), ("forwarded_headers = \"keep\"", true)] {
        for through_a_tunnel in [false, true] {
            let (web, heads) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            let p = start_proxy(&config(web, extra)).await;
            let resp = match through_a_tunnel {
                false => raw(p.addr, absolute.as_bytes()).await,
                true => through_tunnel(p.addr, in_tunnel.as_bytes()).await,
            };
            assert!(resp.contains("HTTP/1.1 200 OK"), "{resp}");
            let up = field_names(&heads.lock().unwrap()[0]);
            assert!(up.contains(&"x-other".to_owned()), "{up:?}");
            for name in &forwarding {
                assert_eq!(
                    up.contains(name),
                    kept,
                    "{name} upstream with {extra:?} (tunnel: {through_a_tunnel}): {up:?}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_is_passed_on_and_any_other_transfer_coding_is_not() {
    for (te, kept) in [
        ("TE: trailers\r\n", true),
        ("TE: trailers, deflate\r\n", false),
        ("TE: gzip\r\n", false),
    ] {
        let (web, heads) = scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let p = start_proxy(&config(web, "")).await;
        let request = format!(
            "GET http://web.test/ HTTP/1.1\r\nHost: web.test\r\n{te}Connection: close\r\n\r\n"
        );
        let resp = raw(p.addr, request.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
        let head = heads.lock().unwrap()[0].to_ascii_lowercase();
        assert_eq!(head.contains("\r\nte: trailers\r\n"), kept, "{te}: {head}");
        assert!(
            !head.contains("deflate") && !head.contains("gzip"),
            "{head}"
        );
    }
}
