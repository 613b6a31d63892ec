//! TLS bytes for tunnel tests: real ClientHellos from a rustls client, hand-built hellos for
//! what no real client sends, ServerHello and HelloRetryRequest records, re-framing.

use std::sync::Arc;

/// The fatal `access_denied` alert the proxy sends a refused TLS client.
pub const ACCESS_DENIED: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

/// A real ClientHello (one TLS record) from a rustls client naming `name`.
pub fn client_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(cfg), name.to_owned().try_into().unwrap()).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// One TLS record.
pub fn record(content_type: u8, body: &[u8]) -> Vec<u8> {
    let mut r = vec![content_type, 0x03, 0x03];
    r.extend_from_slice(&(body.len() as u16).to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// Re-frame one handshake record into records of at most `chunk` bytes each.
pub fn split_records(hello: &[u8], chunk: usize) -> Vec<u8> {
    let body = &hello[5..];
    let mut out = Vec::new();
    for part in body.chunks(chunk) {
        out.extend_from_slice(&[0x16, hello[1], hello[2]]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A hand-built ClientHello record whose server_name extension lists `names` (none: no
/// extension), with the extension repeated `copies` times.
pub fn crafted_hello(names: &[&[u8]], copies: usize) -> Vec<u8> {
    crafted_hello_with(names, copies, &[])
}

/// As [`crafted_hello`], with further extensions (type, data) after the server names.
pub fn crafted_hello_with(names: &[&[u8]], copies: usize, more: &[(u16, &[u8])]) -> Vec<u8> {
    let mut b = vec![0x03, 0x03];
    b.extend_from_slice(&[7; 32]);
    b.push(0);
    b.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    let mut exts = Vec::new();
    if !names.is_empty() {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        for _ in 0..copies {
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(&data);
        }
    }
    for (ty, data) in more {
        exts.extend_from_slice(&ty.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(data);
    }
    b.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    b.extend_from_slice(&exts);
    let mut msg = vec![1, 0, (b.len() >> 8) as u8, b.len() as u8];
    msg.extend_from_slice(&b);
    record(0x16, &msg)
}

/// A ServerHello record (`retry`: a HelloRetryRequest, RFC 8446 §4.1.3).
pub fn server_hello(retry: bool) -> Vec<u8> {
    const RETRY: [u8; 32] = [
        0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8,
        0x91, 0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8,
        0x33, 0x9c,
    ];
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(if retry { &RETRY } else { &[5; 32] });
    body.extend_from_slice(&[0, 0x13, 0x01, 0, 0, 0]);
    let mut msg = vec![2, 0, 0, body.len() as u8];
    msg.extend_from_slice(&body);
    record(0x16, &msg)
}

/// An inspection CA made the way `aml-egress ca init` makes it, constrained to `permitted`
/// (DNS subtrees, `.x` for subdomains), valid 30 days: its certificate and its key (mode
/// 0600) as files.
pub fn inspection_ca(permitted: &[&str]) -> (super::TempFile, super::TempFile) {
    let permitted: Vec<String> = permitted.iter().map(|s| s.to_string()).collect();
    let ca = aml_egress::inspect::ca::generate(
        Some(&permitted),
        30,
        "test",
        std::time::SystemTime::now(),
    )
    .unwrap();
    let cert = super::TempFile::new("inspect-ca.pem", &ca.cert_pem);
    let key = super::TempFile::new("inspect-ca.key", &ca.key_pem);
    std::fs::set_permissions(&key.0, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    (cert, key)
}
