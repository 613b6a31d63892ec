//! The admin listener: the status page (`/`, `/login`, `/logout`), `/metrics`, `/healthz`, `/readyz`,
//! `/denied` and `/allowed`, apart from the proxy's own port so that metrics are never
//! reachable through the proxy. This module routes; [`crate::status`] builds the page.
//!
//! Bound off loopback it requires `Authorization: Bearer <token>` (the token from
//! `admin.token_file`) on everything but the two health endpoints, which tell nothing; the
//! status page also takes the session cookie that logging in with the token sets.
//!
//! Against DNS rebinding, the status page and the login route answer only requests whose
//! `Host` names this listener (see [`crate::status::host`]), and so do `/denied`,
//! `/allowed` and `/metrics` (whose denied series name the same destinations) when no
//! token is set: then nothing else guards them, and the listener is on loopback (off
//! loopback it needs a token), where no Service name can reach it anyway. With a token,
//! those endpoints do not check `Host`: Prometheus names the listener by names the proxy
//! cannot know (a Kubernetes Service), and a browser led there by a hostile page cannot
//! send the bearer header. The health endpoints, which tell nothing, never check it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::metrics::Metrics;
use crate::proxy::respond::{Body, full};
use crate::status::session::Sessions;
use crate::status::{Status, host, page};

/// What the admin endpoints serve.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    /// Required bearer token, when set.
    pub token: Option<String>,
    /// True once the listeners are bound and a policy is loaded; false again while draining.
    pub ready: Arc<AtomicBool>,
    /// The status page's published snapshots.
    pub status: Arc<Status>,
    /// The status page's login sessions (with a token only).
    pub sessions: Sessions,
}

/// Read a bearer token file (surrounding whitespace ignored).
pub fn read_token(path: &std::path::Path) -> Result<String, crate::proxy::SetupError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| crate::proxy::SetupError::File {
            key: "admin.token_file",
            path: path.to_owned(),
            problem: format!("cannot read the token: {e}"),
        })
}

/// Most admin connections served at once. Idle ones cost a task and a socket each, so the
/// bound is high: a load balancer's health probe must get through while scrapers, or
/// anyone who can reach the port, hold connections open.
const MAX_ADMIN_CONNECTIONS: usize = 8192;

/// Serve admin requests until `stopping` flips.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut stopping: watch::Receiver<bool>) {
    let limit = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopping.wait_for(|s| *s) => return,
        };
        let Ok((stream, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue; // over the bound: drop the connection
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(answer(&admin, req, (local, peer)).await)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(permit);
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn authorised(admin: &Admin, req: &Request<hyper::body::Incoming>) -> bool {
    let Some(token) = &admin.token else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    same(given, token)
}

/// Whether `given` is the token. Both are hashed first and every byte of the digests is
/// compared whatever the first difference, so timing tells neither the token's bytes nor
/// its length.
fn same(given: &str, token: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let (a, b) = (digest(given), digest(token));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn answer(
    admin: &Admin,
    req: Request<hyper::body::Incoming>,
    (local, peer): (SocketAddr, SocketAddr),
) -> Response<Body> {
    let path = req.uri().path();
    if is_status_page(path) {
        return status_page(admin, req, (local, peer)).await;
    }
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "the admin endpoints answer GET only\n".into(),
        );
    }
    let req = &req;
    match path {
        "/healthz" => return text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => {
            return if admin.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, PLAIN, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "not ready: starting up or draining\n".into(),
                )
            };
        }
        _ => {}
    }
    if !authorised(admin, req) {
        let mut r = text(
            StatusCode::UNAUTHORIZED,
            PLAIN,
            "send Authorization: Bearer <the token in admin.token_file>\n".into(),
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"aml-egress admin\""),
        );
        return r;
    }
    if admin.token.is_none()
        && matches!(path, "/denied" | "/allowed" | "/metrics")
        && !host::is_ours(host_of(req), local, peer)
    {
        return misdirected(req, local);
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            admin.metrics.render(),
        ),
        "/denied" => {
            let query = req.uri().query().unwrap_or_default();
            let limit = param(query, "limit")
                .and_then(|n| n.parse().ok())
                .unwrap_or(100);
            let policy = param(query, "policy");
            if policy.is_none() && query.split('&').any(|kv| kv.starts_with("policy=")) {
                return text(
                    StatusCode::BAD_REQUEST,
                    PLAIN,
                    "policy: not UTF-8 once percent-decoded\n".into(),
                );
            }
            let top = admin.metrics.top_denied(limit, policy.as_deref());
            // A misspelt policy is not "nothing denied". A policy a reload removed still
            // has its rows, so only a name with none that the configuration lacks is one.
            if let Some(p) = policy.as_deref().filter(|_| top.is_empty() && limit > 0) {
                let names = admin.status.policy_names();
                if p != crate::metrics::NO_POLICY && !names.iter().any(|n| n == p) {
                    return text(
                        StatusCode::NOT_FOUND,
                        PLAIN,
                        format!(
                            "policy {p:?}: no such policy; this configuration has {} (and {} for clients no policy serves)\n",
                            names.join(", "),
                            crate::metrics::NO_POLICY
                        ),
                    );
                }
            }
            let body = serde_json::to_string_pretty(&top).unwrap_or_else(|_| "[]".into());
            text(StatusCode::OK, "application/json", body + "\n")
        }
        "/allowed" => {
            let query = req.uri().query().unwrap_or_default();
            let limit = param(query, "limit")
                .and_then(|n| n.parse().ok())
                .unwrap_or(usize::MAX);
            let rule = param(query, "rule");
            if rule.is_none() && query.split('&').any(|kv| kv.starts_with("rule=")) {
                // A filter that does not decode is not "no filter".
                return text(
                    StatusCode::BAD_REQUEST,
                    PLAIN,
                    "rule: not UTF-8 once percent-decoded\n".into(),
                );
            }
            let rows = admin.metrics.allowed.report(rule.as_deref(), limit);
            let body = serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into());
            text(StatusCode::OK, "application/json", body + "\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "aml-egress admin endpoints: / (the status page), /metrics, /healthz, /readyz, /denied[?limit=N], /allowed[?rule=PATTERN&limit=N]\n".into(),
        ),
    }
}

/// The status page's routes (the page, its login and logout), which `status_page`
/// answers.
fn is_status_page(path: &str) -> bool {
    matches!(path, "/" | "/login" | "/logout")
}

fn host_of<B>(req: &Request<B>) -> Option<&[u8]> {
    req.headers().get(header::HOST).map(|h| h.as_bytes())
}

/// The answer to a request naming another host than this listener (DNS rebinding, or a
/// name the page cannot vouch for).
fn misdirected<B>(req: &Request<B>, local: SocketAddr) -> Response<Body> {
    let named = host_of(req).map_or_else(|| "no Host".to_owned(), |h| h.escape_ascii().to_string());
    let path = req.uri().path().escape_default();
    let mut r = text(
        StatusCode::MISDIRECTED_REQUEST,
        PLAIN,
        format!(
            "this admin listener answers {} only to requests for {local} or localhost (on a loopback connection), not {named}: \
             ask http://{local}{path} , or tunnel to it (ssh -L 9464:{local} ...) and ask http://localhost:9464{path}\n",
            match is_status_page(req.uri().path()) {
                true => "its status page".to_owned(),
                false => format!("{path} without a token"),
            },
        ),
    );
    secure(&mut r);
    r
}

/// The headers of every status-page answer: nothing loads but the page's own style sheet
/// and script, no sniffing, no referrer, no caching.
fn secure(r: &mut Response<Body>) {
    let h = r.headers_mut();
    if let Ok(v) = header::HeaderValue::from_str(page::csp()) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

const HTML: &str = "text/html; charset=utf-8";

/// Most bytes of a login form's body.
const MAX_LOGIN_BODY: usize = 4096;
/// How long a login form's body may take to arrive.
const LOGIN_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /` (the page, or `?format=json`), `GET /login` and `POST /login`.
async fn status_page(
    admin: &Admin,
    req: Request<hyper::body::Incoming>,
    (local, peer): (SocketAddr, SocketAddr),
) -> Response<Body> {
    if !host::is_ours(host_of(&req), local, peer) {
        return misdirected(&req, local);
    }
    let port = local.port();
    let cookies = || req.headers().get_all(header::COOKIE).into_iter();
    let signed_in =
        authorised(admin, &req) || admin.sessions.valid(cookies().map(|v| v.as_bytes()), port);
    let mut r = match (req.method(), req.uri().path()) {
        (&Method::POST, "/login") => login(admin, req, port).await,
        (&Method::POST, "/logout") => {
            let gone = admin.sessions.close(cookies().map(|v| v.as_bytes()), port);
            see_other("/login", Some(gone))
        }
        (&Method::GET, "/login") if signed_in => see_other("/", None),
        (&Method::GET, "/login") => form(StatusCode::OK, None),
        (&Method::GET, "/") if !signed_in => form(StatusCode::UNAUTHORIZED, None),
        (&Method::GET, "/") => {
            let query = req.uri().query().unwrap_or_default();
            let report = admin.status.report();
            if param(query, "format").as_deref() == Some("json") {
                let body = serde_json::to_string_pretty(&report).unwrap_or_else(|_| "{}".into());
                text(StatusCode::OK, "application/json", body + "\n")
            } else {
                let refresh = param(query, "refresh").as_deref() != Some("0");
                let logout = admin.token.is_some();
                text(StatusCode::OK, HTML, page::render(&report, refresh, logout))
            }
        }
        _ => text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "the status page answers GET /, GET /login, POST /login and POST /logout\n".into(),
        ),
    };
    secure(&mut r);
    r
}

/// The login form, with `status` (401 where the page itself was asked for).
fn form(status: StatusCode, error: Option<&str>) -> Response<Body> {
    text(status, HTML, page::login(error))
}

fn see_other(to: &'static str, cookie: Option<String>) -> Response<Body> {
    let mut r = text(StatusCode::SEE_OTHER, PLAIN, format!("see {to}\n"));
    r.headers_mut()
        .insert(header::LOCATION, header::HeaderValue::from_static(to));
    if let Some(c) = cookie.and_then(|c| header::HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// `POST /login` with `token=...` (a form) on the admin listener on `port`: the right
/// token opens a session and sends the browser to the page; anything else gets the form
/// again, saying why; past [`crate::status::session::MAX_ATTEMPTS_PER_MINUTE`] attempts in
/// a minute, a `429` without reading the form.
async fn login(admin: &Admin, req: Request<hyper::body::Incoming>, port: u16) -> Response<Body> {
    let Some(token) = &admin.token else {
        // Nothing to log in to: the page is open.
        return see_other("/", None);
    };
    if !admin.sessions.attempt() {
        let mut r = form(
            StatusCode::TOO_MANY_REQUESTS,
            Some(
                "Too many login attempts in the last minute; wait a minute and try again (Authorization: Bearer still works).",
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        return r;
    }
    let limited = http_body_util::Limited::new(req.into_body(), MAX_LOGIN_BODY);
    let body = match tokio::time::timeout(LOGIN_BODY_TIMEOUT, limited.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return form(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some("The form was larger than a token can be (4 KiB); paste the token alone."),
            );
        }
        Err(_) => {
            return form(
                StatusCode::REQUEST_TIMEOUT,
                Some("The form took too long to arrive; try again."),
            );
        }
    };
    let given = std::str::from_utf8(&body)
        .ok()
        .and_then(|b| param(b, "token"))
        .unwrap_or_default();
    if !same(given.trim(), token) {
        return form(
            StatusCode::UNAUTHORIZED,
            Some(
                "That is not the token in admin.token_file. Check the file on the proxy and try again.",
            ),
        );
    }
    match admin.sessions.open(port) {
        Some(cookie) => see_other("/", Some(cookie)),
        None => form(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(
                "The system's random source failed, so no session could be opened; use Authorization: Bearer meanwhile.",
            ),
        ),
    }
}

/// The value of `key` in a query string, percent-decoded (`+` is a space); `None` when
/// absent or not UTF-8 once decoded.
fn param(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Bind the admin listener, with the setting named in the error.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), crate::proxy::SetupError> {
    let listen = |source| crate::proxy::SetupError::Listen {
        key: "admin.listen",
        addr,
        source,
    };
    let l = TcpListener::bind(addr).await.map_err(listen)?;
    let a = l.local_addr().map_err(listen)?;
    Ok((l, a))
}

/// GET a path from a running proxy's admin listener (`http://host:port` or `host:port`),
/// for `aml-egress denied`. Errors say what to check.
pub async fn fetch(admin: &str, path: &str, token: Option<&str>) -> Result<String, String> {
    use http_body_util::BodyExt;
    let authority = admin
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if admin.starts_with("https://") || authority.contains('/') {
        return Err(format!(
            "--admin {admin}: give the admin listener as http://host:port (admin.listen)"
        ));
    }
    let connect = tokio::net::TcpStream::connect(&authority);
    let stream = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err(format!(
                "cannot connect to the admin listener {authority}: {e}; is the proxy running with admin.listen = \"{authority}\"?"
            ));
        }
        Err(_) => {
            return Err(format!(
                "connecting to the admin listener {authority} timed out"
            ));
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("talking to {authority}: {e}"))?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header(header::HOST, authority.as_str());
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| format!("{authority} did not answer within 30 s"))?
        .map_err(|e| format!("talking to {authority}: {e}"))?;
    match status {
        StatusCode::OK => Ok(body),
        StatusCode::UNAUTHORIZED => Err(format!(
            "{authority} wants a bearer token: pass --token-file with the file named by admin.token_file"
        )),
        s => Err(format!("{authority}{path} answered {s}: {}", body.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::{param, same};

    #[test]
    fn only_the_token_itself_is_the_token() {
        let token = "0123456789abcdef0123";
        assert!(same(token, token));
        for other in [
            "",
            "0123456789abcdef012",
            "0123456789abcdef0124",
            "0123456789abcdef01234",
        ] {
            assert!(!same(other, token), "{other:?}");
        }
    }

    #[test]
    fn query_values_are_found_and_percent_decoded() {
        let q = "limit=5&rule=%2A.blob.core.windows.net&x=a+b%";
        assert_eq!(param(q, "limit").as_deref(), Some("5"));
        assert_eq!(param(q, "rule").as_deref(), Some("*.blob.core.windows.net"));
        assert_eq!(param(q, "x").as_deref(), Some("a b%"));
        assert_eq!(param(q, "lim"), None);
        assert_eq!(param("rule=%ff", "rule"), None);
        assert_eq!(param("rule=%4", "rule").as_deref(), Some("%4"));
    }
}
