//! The status page on the admin listener, as a browser sees it: headless Chromium (Debian's
//! `chromium`, which `.ci/run` installs) loads it from a proxy that has refused a few
//! targets, and the DOM it built holds the rows, the chart and each allow entry; hostile
//! names and bytes come out escaped with no script of theirs run; with a token, the login
//! form, the session cookie and the bearer header; a foreign `Host` is refused.
//!
//! Nothing waits by the clock: the page is read once its JSON shows what was refused (the
//! sampler publishes every two seconds), within a bounded deadline.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::net::{echo_upstream, exchange};
use support::proxy::{Proxy, start_proxy};

/// A directory of this test's own, removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("aml-egress-status-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One raw request to the admin listener (`Connection: close`): status, head, body.
async fn request(addr: SocketAddr, head: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{head}Connection: close\r\n\r\n{body}").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw[9..12].parse().unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (status, head.to_owned(), body.to_owned())
}

/// `GET path` naming the listener in `Host`, with extra header lines.
async fn get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, String) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}"),
        "",
    )
    .await
}

/// The page's JSON, once `ready` says it shows what the test is waiting for (at most 60 s:
/// the sampler publishes every two seconds).
async fn json_once(
    addr: SocketAddr,
    extra: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = get(addr, "/?format=json", extra).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if ready(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "the page never showed it: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn denied_count(v: &serde_json::Value, target: &str) -> u64 {
    v["denied"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == target)
        .and_then(|r| r["count"].as_u64())
        .unwrap_or(0)
}

/// Run headless Chromium with `args` and the URL, in `dir` (its profile and home), with
/// no proxy settings of the environment; its standard output. At most two minutes.
async fn chromium(dir: &Path, args: &[&str], url: &str) -> String {
    let profile = dir.join("chromium-profile");
    let mut cmd = Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox", // the tests run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--no-proxy-server",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .env("HOME", dir)
    .env("XDG_CONFIG_HOME", dir.join("config"))
    .env("XDG_CACHE_HOME", dir.join("cache"))
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
        "no_proxy",
        "NO_PROXY",
        "REQUESTS_CA_BUNDLE",
        "SSL_CERT_FILE",
    ] {
        cmd.env_remove(var);
    }
    let child = cmd
        .spawn()
        .expect("chromium is installed (.ci/run installs Debian's chromium)");
    let pid = child.id();
    let waited = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let out = match waited {
        Ok(done) => done.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("chromium did not finish within two minutes");
        }
    };
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 253-character name of the oddest characters target parsing lets through: four labels
/// (63, 63, 63, 61) of underscores, hyphens, letters of both cases and digits, the last
/// starting with a letter.
fn longest_odd_name() -> String {
    let labels = [
        format!("{}_", "_-".repeat(31)),
        format!("-{}", "A_".repeat(31)),
        "Z9-".repeat(21),
        format!("x{}", "-_".repeat(30)),
    ];
    let name = labels.join(".");
    assert_eq!(name.len(), 253);
    name
}

/// What a client sends in `Host` inside a tunnel to make it refused and recorded: markup
/// that would, unescaped, add an element, close a text area and run a script.
const HOSTILE: &str =
    "\"quoted' <b id=pwned>x</b></textarea><script>document.title='pwned'</script>";

/// The proxy of these tests: a wildcard rule and `web.test:80` allowed, both pinned to a
/// loopback echo upstream; tunnels on 443 opaque, so that the echo needs no TLS.
async fn proxy(extra_admin: &str) -> Proxy {
    let echo = echo_upstream().await;
    start_proxy(&format!(
        r#"
[admin]
{extra_admin}
[proxy]
tls_ports = []
opaque_ports = [443]
[[allow]]
host = "*.wild.example"
ports = [443]
[[allow]]
host = "web.test"
ports = [80]
[upstream]
allow_cidrs = ["127.0.0.1/32"]
connect_to = {{ "a.wild.example:443" = "{echo}", "b.wild.example:443" = "{echo}", "web.test:80" = "{echo}" }}
"#
    ))
    .await
}

async fn refused(p: &Proxy, target: &str) {
    let (_, resp) = exchange(p.addr, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "CONNECT {target}: {resp}");
}

async fn allowed(p: &Proxy, target: &str) {
    let (_, resp) = exchange(p.addr, &format!("CONNECT {target} HTTP/1.1\r\n\r\n")).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "CONNECT {target}: {resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shows_the_refused_rows_their_allow_entries_and_the_chart() {
    let dir = TestDir::new("browser");
    let p = proxy("").await;
    refused(&p, "denied-one.example:443").await;
    for _ in 0..3 {
        refused(&p, "denied-two.example:8443").await;
    }
    refused(&p, "10.20.30.40:443").await;
    allowed(&p, "a.wild.example:443").await;
    allowed(&p, "b.wild.example:443").await;
    let v = json_once(p.admin_addr, "", |v| {
        denied_count(v, "denied-two.example:8443") == 3
            && v["wildcards"].as_array().is_some_and(|w| !w.is_empty())
    })
    .await;
    assert_eq!(v["ready"], true);
    assert_eq!(v["catalog"]["cloud"], "public");
    let reasons = v["refusals"]["reasons"].as_array().unwrap();
    assert_eq!(reasons[0], "no_matching_rule", "{v:#}");

    let url = format!("http://{}/?refresh=0", p.admin_addr);
    let dom = chromium(&dir.0, &["--dump-dom"], &url).await;
    assert!(dom.contains("<title>aml-egress status</title>"), "{dom}");
    // The rows: each refused target, its count, its reason, and the entry that allows it.
    for (target, entry) in [
        (
            "denied-one.example:443",
            "[[allow]]\nhost = \"denied-one.example\"\nports = [443]",
        ),
        (
            "denied-two.example:8443",
            "[[allow]]\nhost = \"denied-two.example\"\nports = [8443]",
        ),
        (
            "10.20.30.40:443",
            "[[allow]]\ncidr = \"10.20.30.40/32\"\nports = [443]",
        ),
    ] {
        assert!(
            dom.contains(&format!("<td class=\"host\">{target}</td>")),
            "{target}: {dom}"
        );
        assert!(dom.contains(entry), "{entry}: {dom}");
    }
    assert!(dom.contains("<td class=\"n\">3</td>"), "{dom}");
    assert!(dom.contains("<code>no_matching_rule</code>"), "{dom}");
    // The chart, with the minute's refusals in it.
    assert!(
        dom.contains("<svg class=\"chart\" id=\"refusal-chart\""),
        "{dom}"
    );
    assert!(dom.contains(" UTC no_matching_rule: "), "{dom}");
    let total: u64 = v["refusals"]["minutes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["counts"].as_array().unwrap())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(total, 5, "{v:#}");
    // The names under the wildcard rule, and the catalog.
    assert!(dom.contains("<code>*.wild.example</code>"), "{dom}");
    assert!(dom.contains("a.wild.example:443") && dom.contains("b.wild.example:443"));
    assert!(dom.contains("id=\"catalog\""), "{dom}");
    // The copy buttons are shown: the inline script ran, so the CSP's hash of it is right.
    assert!(
        dom.contains("<button type=\"button\" data-copy=\"allow-0\">copy</button>"),
        "{dom}"
    );
    // Not refreshing (?refresh=0), and a way back to refreshing.
    assert!(!dom.contains("http-equiv=\"refresh\""), "{dom}");

    let png = dir.0.join("status.png");
    chromium(
        &dir.0,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,1600",
            "--hide-scrollbars",
        ],
        &url,
    )
    .await;
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {} bytes",
        bytes.len()
    );
    // Set to keep the screenshot (docs/status-page.png is made this way).
    if let Some(keep) = std::env::var_os("AML_EGRESS_STATUS_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_bytes_are_escaped_and_run_nothing() {
    let dir = TestDir::new("hostile");
    let p = proxy("").await;
    let odd = longest_odd_name();
    refused(&p, &format!("{odd}:443")).await;
    // Inside a tunnel to an allowed host, a request naming another host is refused, and
    // what it named is kept with the tunnel's row.
    let (mut s, resp) = exchange(p.addr, "CONNECT web.test:80 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {HOSTILE}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf).await.unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let odd_target = format!("{}:443", odd.to_ascii_lowercase());
    let v = json_once(p.admin_addr, "", |v| {
        denied_count(v, &odd_target) == 1 && denied_count(v, "web.test:80") == 1
    })
    .await;
    let row = v["denied"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == "web.test:80")
        .unwrap();
    assert_eq!(row["reason"], "host_mismatch");
    let seen = row["seen"].as_str().unwrap();
    assert!(
        seen.contains("<script>") && seen.contains("</textarea>"),
        "{seen}"
    );

    // The raw page: the bytes are there only escaped.
    let (status, head, html) = get(p.admin_addr, "/", "").await;
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'")
    );
    assert!(
        html.contains(
            "&lt;b id=pwned&gt;x&lt;/b&gt;&lt;/textarea&gt;&lt;script&gt;document.title="
        ),
        "{html}"
    );
    assert!(!html.contains("<b id=pwned>") && !html.contains("</textarea>"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only the page's own script"
    );
    assert!(html.contains(&odd_target));

    // And as the browser built it: no element of theirs, the title untouched.
    let url = format!("http://{}/?refresh=0", p.admin_addr);
    let dom = chromium(&dir.0, &["--dump-dom"], &url).await;
    assert!(dom.contains("<title>aml-egress status</title>"), "{dom}");
    assert!(!dom.contains("pwned</title>"), "{dom}");
    assert!(!dom.contains("id=\"pwned\""), "an element of theirs: {dom}");
    assert!(dom.contains("&lt;b id=pwned&gt;"), "{dom}");
    assert!(
        dom.contains(&format!("<td class=\"host\">{odd_target}</td>")),
        "{dom}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_wants_a_login_and_scripts_keep_the_bearer_header() {
    let dir = TestDir::new("token");
    let token = "0123456789abcdef0123456789abcdef";
    let file = dir.0.join("token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let p = proxy(&format!("token_file = {:?}", file)).await;
    let a = p.admin_addr;
    refused(&p, "denied-one.example:443").await;

    // No cookie, no header: the form, with the page's headers.
    let (status, head, body) = get(a, "/", "").await;
    assert_eq!(status, 401, "{head}");
    assert!(
        body.contains("<form method=\"post\" action=\"/login\">"),
        "{body}"
    );
    assert!(!body.contains("id=\"health\""));
    let lower = head.to_ascii_lowercase();
    for h in [
        "content-security-policy: default-src 'none';",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "cache-control: no-store",
    ] {
        assert!(lower.contains(h), "{h}: {head}");
    }
    assert!(get(a, "/?format=json", "").await.0 == 401);

    // A wrong token: the form again, saying so.
    let post = |body: String| async move {
        request(
            a,
            &format!(
                "POST /login HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
                body.len()
            ),
            &body,
        )
        .await
    };
    let (status, _, body) = post("token=not-the-token".into()).await;
    assert_eq!(status, 401);
    assert!(body.contains("id=\"login-error\""), "{body}");
    assert!(body.contains("<form"), "{body}");
    // A body larger than any token is refused without reading on.
    let (status, _, _) = post(format!("token={}", "a".repeat(5000))).await;
    assert_eq!(status, 413);

    // The right one: a session cookie (not the token), then the page.
    let (status, head, _) = post(format!("token={token}")).await;
    assert_eq!(status, 303, "{head}");
    assert!(
        head.contains("location: /\r\n") || head.contains("location: /"),
        "{head}"
    );
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    assert!(
        cookie_line.contains("HttpOnly")
            && cookie_line.contains("SameSite=Strict")
            && cookie_line.contains("Path=/")
            && cookie_line.contains("Max-Age="),
        "{cookie_line}"
    );
    assert!(!cookie_line.contains(token), "{cookie_line}");
    let cookie = cookie_line
        .split_once(':')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .trim()
        .to_owned();
    let with_cookie = format!("Cookie: {cookie}\r\n");
    let (status, _, page) = get(a, "/", &with_cookie).await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"health\""), "{page}");
    assert!(!page.contains(token), "the page never shows the token");
    // The cookie is this admin listener's (its port in the name: browsers keep cookies by
    // host alone, and another proxy on the host must not take or clobber it).
    assert!(
        cookie.starts_with(&format!("aml_egress_session_{}=", a.port())),
        "{cookie}"
    );
    assert!(
        page.contains("action=\"/logout\""),
        "a way to log out: {page}"
    );
    assert!(
        page.contains("the last three need <code>Authorization: Bearer"),
        "the links the session does not open say so: {page}"
    );
    // A forged session is not one.
    let forged = format!(
        "Cookie: aml_egress_session_{}={}\r\n",
        a.port(),
        "0".repeat(64)
    );
    assert_eq!(get(a, "/", &forged).await.0, 401);

    // Scripts: the bearer header, for the page's JSON and the endpoints, as before.
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let v = json_once(a, &bearer, |v| {
        denied_count(v, "denied-one.example:443") == 1
    })
    .await;
    assert!(!v.to_string().contains(token));
    assert_eq!(get(a, "/denied", "").await.0, 401);
    let (status, _, body) = get(a, "/denied", &bearer).await;
    assert_eq!(status, 200);
    let rows: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rows[0]["target"], "denied-one.example:443");
    assert_eq!(get(a, "/allowed", &bearer).await.0, 200);
    // The cookie is for the page only.
    assert_eq!(get(a, "/denied", &with_cookie).await.0, 401);
    assert_eq!(get(a, "/metrics", &with_cookie).await.0, 401);
    // A scrape naming the listener by a Service name still works with the token.
    let (status, _, _) = request(
        a,
        &format!("GET /metrics HTTP/1.1\r\nHost: aml-egress.monitoring.svc:9464\r\n{bearer}"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = request(
        a,
        &format!("GET /denied HTTP/1.1\r\nHost: aml-egress.monitoring.svc:9464\r\n{bearer}"),
        "",
    )
    .await;
    assert_eq!(status, 200, "with a token, /denied does not check Host");

    // Logging out ends the session: the cookie is cleared and no longer opens the page.
    let (status, head, _) = request(
        a,
        &format!("POST /logout HTTP/1.1\r\nHost: {a}\r\n{with_cookie}Content-Length: 0\r\n"),
        "",
    )
    .await;
    assert_eq!(status, 303, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("location: /login"), "{head}");
    assert!(
        lower.contains(&format!("set-cookie: aml_egress_session_{}=;", a.port()))
            && lower.contains("max-age=0"),
        "{head}"
    );
    assert_eq!(get(a, "/", &with_cookie).await.0, 401);

    // Login attempts are limited: past the minute's allowance the form answers 429 without
    // looking, even at the right token; the bearer header still works.
    let mut statuses = Vec::new();
    for _ in 0..25 {
        statuses.push(post("token=guess".into()).await.0);
    }
    assert!(
        statuses.contains(&401) && statuses.ends_with(&[429]),
        "{statuses:?}"
    );
    let (status, head, body) = post(format!("token={token}")).await;
    assert_eq!(status, 429, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 60"),
        "{head}"
    );
    assert!(body.contains("wait a minute"), "{body}");
    assert_eq!(get(a, "/", &bearer).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_is_refused_but_probes_are_not() {
    let p = proxy("").await;
    let a = p.admin_addr;
    let port = a.port();
    let foreign = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\n");
    let (status, head, body) = request(a, &foreign("/"), "").await;
    assert_eq!(status, 421, "{head}");
    assert!(
        body.contains("localhost") && body.contains(&a.to_string()),
        "{body}"
    );
    assert!(!body.contains("id=\"health\""));
    assert_eq!(request(a, &foreign("/?format=json"), "").await.0, 421);
    assert_eq!(request(a, &foreign("/login"), "").await.0, 421);
    // Without a token nothing else guards /denied and /allowed: they check Host too.
    assert_eq!(request(a, &foreign("/denied"), "").await.0, 421);
    assert_eq!(request(a, &foreign("/allowed"), "").await.0, 421);
    // So does /metrics, whose denied series name the same destinations; probes, which
    // tell nothing, name the listener as they like.
    assert_eq!(request(a, &foreign("/metrics"), "").await.0, 421);
    assert_eq!(request(a, &foreign("/healthz"), "").await.0, 200);
    assert_eq!(request(a, &foreign("/readyz"), "").await.0, 200);
    // localhost on any port (an SSH tunnel's), and the listener's own address.
    let named = |host: &str| format!("GET / HTTP/1.1\r\nHost: {host}\r\n");
    assert_eq!(request(a, &named("localhost:8080"), "").await.0, 200);
    assert_eq!(request(a, &named(&a.to_string()), "").await.0, 200);
    // No Host at all is no listener's.
    assert_eq!(request(a, "GET / HTTP/1.0\r\n", "").await.0, 421);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_a_rebound_name_cannot_read_the_denied_names_from_metrics() {
    // No token: the listener is on loopback (admin.listen off loopback needs one), so no
    // Service name can reach it, and a page rebound to the tunnel's localhost must not
    // read through /metrics what /denied keeps from it.
    let p = proxy("").await;
    let a = p.admin_addr;
    refused(&p, "internal-secret.example:443").await;
    let (status, _, body) = request(
        a,
        &format!(
            "GET /metrics HTTP/1.1\r\nHost: evil.example:{}\r\n",
            a.port()
        ),
        "",
    )
    .await;
    assert!(
        !body.contains("internal-secret.example"),
        "a rebound name read the refused destinations: {status} {body}"
    );
    assert_eq!(status, 421);
    // A scraper on loopback names the listener by its address or localhost.
    let (status, _, body) = get(a, "/metrics", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("internal-secret.example"), "{body}");
    let (status, _, _) = request(a, "GET /metrics HTTP/1.1\r\nHost: localhost:9090\r\n", "").await;
    assert_eq!(status, 200);
}

/// What is open is shown per listener: a tunnel through `proxy.listen` while it lasts (its
/// client connection no longer counts as one once it is a tunnel), and nothing after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_what_is_open_on_each_listener() {
    let p = proxy("").await;
    let open_on = |v: &serde_json::Value| -> (i64, i64) {
        let rows = v["health"]["open"]["by_listener"].as_array().unwrap();
        rows.iter()
            .find(|r| r["listener"] == "proxy.listen")
            .map_or((0, 0), |r| {
                (
                    r["connections"].as_i64().unwrap(),
                    r["tunnels"].as_i64().unwrap(),
                )
            })
    };
    let (tunnel, resp) = exchange(p.addr, "CONNECT a.wild.example:443 HTTP/1.1\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    json_once(p.admin_addr, "", |v| open_on(v) == (0, 1)).await;
    let (status, _, page) = get(p.admin_addr, "/", "").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("(proxy.listen): 0 connections, 1 tunnels open"),
        "{page}"
    );
    drop(tunnel);
    json_once(p.admin_addr, "", |v| open_on(v) == (0, 0)).await;
    let m = p.metrics().await;
    assert!(
        m.contains("aml_egress_open_by_listener{kind=\"tunnel\",listener=\"proxy.listen\"} 0\n"),
        "{m}"
    );
}
