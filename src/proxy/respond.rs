//! Refusals and errors as the client sees them: a status, a `Proxy-Status` header
//! (RFC 9209) with the machine-readable reason, and a short text body saying what to do.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, header};

/// Why a response body ended early (an upstream error, or a stalled upstream).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the proxy sends.
pub type Body = BoxBody<Bytes, BodyError>;

/// A body from text.
pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

/// The reason phrase of a refusal's status line: `<standard phrase> by aml-egress:
/// <target> <words>`, so that clients that print only the status line (pip, Java, wget, git)
/// show why. Visible ASCII only (RFC 9112 §4), at most 128 bytes.
pub fn phrase(status: StatusCode, target: Option<&str>, words: &str) -> String {
    let standard = status.canonical_reason().unwrap_or("Refused");
    let text = match target {
        Some(t) => format!("{standard} by aml-egress: {t} {words}"),
        None => format!("{standard} by aml-egress: {words}"),
    };
    let mut out: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    out.truncate(128);
    out
}

/// An answer the proxy gives itself, a refusal or an error: a status with a reason phrase
/// saying why ([`phrase`]), `Proxy-Status: aml-egress; error=<error>; details="<details>"`
/// (RFC 9209 §2: `error` is one of its error types, `details` our reason code), and a text
/// body saying what to do. Built once ([`Reply::new`]), it is sent either through hyper
/// ([`Reply::into_response`]) or as bytes on a connection that then closes
/// ([`Reply::closing_bytes`]), with the same fields either way.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    phrase: String,
    error: &'static str,
    details: &'static str,
    /// The body without its final line end.
    message: String,
    /// Sent with `Connection: close`: the connection serves no further request.
    close: bool,
}

impl Reply {
    /// `(target, words)` go into the reason phrase; `details` is the reason code.
    pub fn new(
        status: StatusCode,
        error: &'static str,
        details: &'static str,
        (target, words): (Option<&str>, &str),
        message: String,
    ) -> Reply {
        Reply {
            status,
            phrase: phrase(status, target, words),
            error,
            details,
            message,
            close: false,
        }
    }

    /// The same answer, ending its connection (`Connection: close`): for a refusal that
    /// every later request on the connection would get too.
    pub fn closing(mut self) -> Reply {
        self.close = true;
        self
    }

    /// The response hyper sends (it adds `Content-Length` and `Date`).
    pub fn into_response(self) -> Response<Body> {
        let proxy_status = self.proxy_status();
        let mut message = self.message;
        message.push('\n');
        let mut resp = Response::new(full(message));
        *resp.status_mut() = self.status;
        if let Ok(p) = bytes::Bytes::from(self.phrase).try_into() {
            resp.extensions_mut().insert::<hyper::ext::ReasonPhrase>(p);
        }
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Ok(v) = header::HeaderValue::from_str(&proxy_status) {
            h.insert("proxy-status", v);
        }
        if self.close {
            h.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        resp
    }

    /// The whole response as bytes, with `Connection: close` and `Date` (as hyper sends
    /// them): for answers written on a connection before or instead of hyper, which then
    /// close it.
    pub fn closing_bytes(&self) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(256 + self.phrase.len() + self.message.len());
        let _ = with_now(|now| {
            write!(
                out,
                "HTTP/1.1 {} {}\r\nproxy-status: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\ndate: {}\r\n\r\n{}\n",
                self.status.as_u16(),
                self.phrase,
                self.proxy_status(),
                self.message.len() + 1,
                now.date,
                self.message
            )
        });
        out
    }

    /// The body's text, without its final line end.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn proxy_status(&self) -> String {
        format!(
            "aml-egress; error={}; details=\"{}\"",
            self.error, self.details
        )
    }
}

impl From<Reply> for Response<Body> {
    fn from(r: Reply) -> Self {
        r.into_response()
    }
}

/// The `200` of an accepted CONNECT written on the socket (no hyper), with the reason
/// phrase Squid, tinyproxy and goproxy send, which some clients expect, and the `Date`
/// hyper's own `200` carries (RFC 9110 §6.6.1). Shared, not copied: made once a second.
pub fn established() -> Bytes {
    with_now(|now| now.established.clone())
}

/// This second's HTTP-date and the `200` that carries it, per thread.
struct Now {
    second: u64,
    /// IMF-fixdate (RFC 9110 §5.6.7).
    date: String,
    established: Bytes,
}

/// Call `f` with this second's [`Now`], made at most once a second per thread (as hyper
/// caches its own date), so that an answer costs no formatting.
fn with_now<R>(f: impl FnOnce(&Now) -> R) -> R {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static NOW: RefCell<Option<Now>> = const { RefCell::new(None) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    NOW.with_borrow_mut(|cached| {
        if cached.as_ref().is_some_and(|c| c.second != second) {
            *cached = None; // a second old
        }
        let fresh = cached.get_or_insert_with(|| {
            let date = httpdate::fmt_http_date(now);
            let established =
                format!("HTTP/1.1 200 Connection established\r\ndate: {date}\r\n\r\n");
            Now {
                second,
                date,
                established: Bytes::from(established),
            }
        });
        f(fresh)
    })
}

/// The raw `408` for a request head that did not arrive in time (first or later).
pub fn request_timeout() -> Vec<u8> {
    Reply::new(
        StatusCode::REQUEST_TIMEOUT,
        "http_request_error",
        "header_timeout",
        (None, "request head too slow"),
        "the request head did not arrive within proxy.header_timeout_secs".to_owned(),
    )
    .closing_bytes()
}

/// Write a whole answer on a connection not registered with the runtime and close it: one
/// `send` when the socket takes it all (an answer of a few hundred bytes on a fresh
/// connection always fits), so that a refusal never costs an epoll registration; what the
/// socket does not take is written from a task, for at most 2 s.
pub(crate) fn send_and_close(sock: std::net::TcpStream, bytes: Vec<u8>) {
    use rustix::net::SendFlags;
    let sent = rustix::net::send(&sock, &bytes, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
    let sent = match sent {
        Ok(n) if n == bytes.len() => return,
        Ok(n) => n,
        Err(rustix::io::Errno::AGAIN) => 0,
        Err(_) => return, // the client is gone
    };
    let Ok(stream) = tokio::net::TcpStream::from_std(sock) else {
        return;
    };
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut stream = stream;
        let rest = stream.write_all(&bytes[sent..]);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rest).await;
    });
}
