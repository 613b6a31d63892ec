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

/// A refusal or error response. `error` is an RFC 9209 error token, `details` our reason;
/// `target` and `words` go into the reason phrase ([`phrase`]).
pub fn refuse(
    status: StatusCode,
    error: &str,
    details: &str,
    (target, words): (Option<&str>, &str),
    message: &str,
) -> Response<Body> {
    let mut resp = Response::new(full(format!("{message}\n")));
    *resp.status_mut() = status;
    if let Ok(p) = bytes::Bytes::from(phrase(status, target, words)).try_into() {
        resp.extensions_mut().insert::<hyper::ext::ReasonPhrase>(p);
    }
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) =
        header::HeaderValue::from_str(&format!("aml-egress; error={error}; details=\"{details}\""))
    {
        h.insert("proxy-status", v);
    }
    resp
}

/// The raw bytes of a response written before hyper takes the connection (limits, slow
/// clients), so that even those refusals carry a status, a reason and a body; `words` go
/// into the reason phrase.
pub fn raw(status: StatusCode, words: &str, error: &str, details: &str, message: &str) -> Vec<u8> {
    let reason = phrase(status, None, words);
    let status = status.as_u16();
    format!(
        "HTTP/1.1 {status} {reason}\r\nproxy-status: aml-egress; error={error}; details=\"{details}\"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{message}\n",
        message.len() + 1
    )
    .into_bytes()
}

/// The raw `408` for a request head that did not arrive in time (first or later).
pub fn request_timeout() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        raw(
            StatusCode::REQUEST_TIMEOUT,
            "request head too slow",
            "http_request_error",
            "header_timeout",
            "the request head did not arrive within proxy.header_timeout_secs",
        )
    })
}
