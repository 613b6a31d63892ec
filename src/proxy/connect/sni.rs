//! The first TLS flight of a tunnel, read strictly: the client's ClientHello (and its
//! server name), and the start of the server's answer (a ServerHello, or a
//! HelloRetryRequest after which the client sends a second ClientHello).
//!
//! Both readers are incremental: they are handed the stream's bytes received so far and
//! examine each byte once (the record headers and the handshake bytes they carry), so that a
//! hello sent one byte per record and one record per write costs no more than one sent
//! whole. Anything that is not exactly a well-formed ClientHello is refused: the proxy
//! relays only what it has understood (RFC 8446 §4.1.2, RFC 6066 §3).

use crate::policy::Name;

/// Largest ClientHello handshake message accepted, in bytes (post-quantum key shares make
/// them grow past 1 KiB; 64 KiB is the most a real client sends).
pub const MAX_HELLO: usize = 64 * 1024;

/// Largest TLS plaintext record body, in bytes (RFC 8446 §5.1: 2^14).
const MAX_RECORD: usize = 16 * 1024;

/// Most stream bytes a hello may take, record headers included: a hello split into tiny
/// records grows six-fold, and more than this is not a client that wants to be served.
pub const MAX_HELLO_STREAM: usize = 2 * MAX_HELLO;

/// TLS record content types (RFC 8446 §5.1).
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;

/// The `random` of a ServerHello that is a HelloRetryRequest: SHA-256 of
/// "HelloRetryRequest" (RFC 8446 §4.1.3).
const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// A fatal `access_denied` alert (RFC 8446 §6.2), sent to a client before its tunnel is
/// closed so that its TLS library reports a refusal rather than a broken connection.
pub const ACCESS_DENIED_ALERT: [u8; 7] = [ALERT, 0x03, 0x03, 0x00, 0x02, 0x02, 49];

/// Why the client's bytes are not a ClientHello the proxy will relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// More bytes are needed (only from [`server_name`]).
    Incomplete,
    /// The stream does not start with a TLS record at all.
    NotTls,
    /// A TLS stream, but not one well-formed ClientHello: the text says what is wrong.
    Malformed(&'static str),
    /// The server_name extension holds no valid DNS host name.
    BadName,
}

impl std::fmt::Display for SniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SniError::Incomplete => f.write_str("the ClientHello is incomplete"),
            SniError::NotTls => f.write_str("the stream does not start with a TLS record"),
            SniError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            SniError::BadName => f.write_str(
                "the server name is not a valid DNS host name (RFC 6066: no IP literal, no trailing dot, at most 253 octets)",
            ),
        }
    }
}

/// A complete, well-formed ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello {
    /// The one `host_name` of the server_name extension, normalised; `None` without one.
    /// With [`ClientHello::encrypted_client_hello`], only the outer name.
    pub server_name: Option<Name>,
    /// The hello carries the `encrypted_client_hello` extension (0xfe0d, RFC 9849): the
    /// real server name is encrypted inside, and a front end that accepts ECH routes by it.
    pub encrypted_client_hello: bool,
    /// The application protocols it offers (ALPN, RFC 7301).
    pub alpn: Alpn,
    /// Offset in the stream just past the hello's last record.
    pub end: usize,
}

/// What a ClientHello's `application_layer_protocol_negotiation` extension offers, as far
/// as inspection cares: an inspected session speaks HTTP/1.1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alpn {
    /// The extension is present.
    pub offered: bool,
    /// `http/1.1` is among the protocols.
    pub http11: bool,
    /// `h2` is among the protocols.
    pub h2: bool,
}

impl Alpn {
    /// Whether an inspected session can serve this client: no ALPN, or `h2` or `http/1.1`
    /// among the protocols.
    pub fn inspectable(self) -> bool {
        !self.offered || self.http11 || self.h2
    }

    /// The offer in words, for a log line.
    pub fn shown(self) -> &'static str {
        match (self.h2, self.http11) {
            (false, false) => "protocols other than http/1.1 and h2",
            _ => "http/1.1 or h2",
        }
    }
}

/// Reads one ClientHello from the start of a stream, record by record.
#[derive(Debug, Default)]
pub struct HelloReader {
    /// Stream offset of the next record header not yet read.
    pos: usize,
    /// The current record's body length, once its header is read.
    record: Option<usize>,
    /// Handshake bytes reassembled from earlier records (empty while the hello sits in
    /// one record, which is borrowed instead).
    joined: Vec<u8>,
    /// Bytes examined so far, for tests that check nothing is read twice.
    examined: usize,
}

impl HelloReader {
    /// A reader for a hello starting at stream offset `start` (after a retry, the second
    /// hello follows the first and an optional ChangeCipherSpec).
    pub fn at(start: usize) -> Self {
        HelloReader {
            pos: start,
            ..Self::default()
        }
    }

    /// Stream bytes examined so far (each byte once at most).
    pub fn examined(&self) -> usize {
        self.examined
    }

    /// Stream offset up to which bytes have been consumed.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Read on from where the last call stopped. `stream` is every byte received so far,
    /// from the start of the stream. `Ok(None)`: more bytes are needed.
    pub fn read(&mut self, stream: &[u8]) -> Result<Option<ClientHello>, SniError> {
        loop {
            let len = match self.record {
                Some(r) => r,
                None => {
                    let Some(h) = stream.get(self.pos..self.pos + 5) else {
                        // A first byte that is no record type says so before 5 bytes come.
                        if self.pos == 0 && stream.first().is_some_and(|b| !(20..=24).contains(b)) {
                            return Err(SniError::NotTls);
                        }
                        return Ok(None);
                    };
                    self.examined += 5;
                    let r = record_header(h, self.pos == 0)?;
                    if r.0 != HANDSHAKE {
                        return Err(SniError::Malformed(
                            "a record other than handshake before the ClientHello",
                        ));
                    }
                    self.record = Some(r.1);
                    r.1
                }
            };
            let start = self.pos + 5;
            let Some(body) = stream.get(start..start + len) else {
                return Ok(None);
            };
            self.examined += len;
            self.record = None;
            self.pos = start + len;
            if self.pos > MAX_HELLO_STREAM {
                return Err(SniError::Malformed(
                    "the ClientHello takes too many records",
                ));
            }
            // Borrow the common case, a hello in one record; copy only when split.
            let whole_here =
                self.joined.is_empty() && handshake_len(body)?.is_some_and(|n| body.len() >= n);
            let msg: &[u8] = if whole_here {
                body
            } else {
                if self.joined.len() + body.len() > MAX_HELLO + 4 {
                    return Err(SniError::Malformed("the ClientHello is larger than 64 KiB"));
                }
                self.joined.extend_from_slice(body);
                &self.joined
            };
            let Some(need) = handshake_len(msg)? else {
                continue;
            };
            if msg.len() < need {
                continue;
            }
            if msg.len() > need {
                return Err(SniError::Malformed(
                    "bytes after the ClientHello in its record",
                ));
            }
            let (server_name, encrypted_client_hello, alpn) = parse_client_hello(&msg[4..])?;
            return Ok(Some(ClientHello {
                server_name,
                encrypted_client_hello,
                alpn,
                end: self.pos,
            }));
        }
    }
}

/// Check a record header; returns its content type and body length.
fn record_header(h: &[u8], first: bool) -> Result<(u8, usize), SniError> {
    let ty = h[0];
    if !(20..=24).contains(&ty) {
        return Err(if first {
            SniError::NotTls
        } else {
            SniError::Malformed("not a TLS record")
        });
    }
    // legacy_record_version: 0x0300 to 0x0303 (RFC 8446 §5.1, appendix D).
    if h[1] != 0x03 || h[2] > 0x03 {
        return Err(SniError::Malformed("unknown record version"));
    }
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if len == 0 {
        return Err(SniError::Malformed("an empty record"));
    }
    if len > MAX_RECORD {
        return Err(SniError::Malformed("a record longer than 16 KiB"));
    }
    Ok((ty, len))
}

/// The whole length (header included) of the ClientHello message starting `msg`, once its
/// 4-byte header is there.
fn handshake_len(msg: &[u8]) -> Result<Option<usize>, SniError> {
    if msg.is_empty() {
        return Ok(None);
    }
    if msg[0] != 1 {
        return Err(SniError::Malformed(
            "a handshake message other than ClientHello",
        ));
    }
    if msg.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize;
    if len > MAX_HELLO {
        return Err(SniError::Malformed("the ClientHello is larger than 64 KiB"));
    }
    Ok(Some(4 + len))
}

/// A cursor over a handshake body that fails on any short read.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed(
                "a length runs past the end of the ClientHello",
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, SniError> {
        Ok(self.take(1)?[0] as usize)
    }
    fn u16(&mut self) -> Result<usize, SniError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    /// A vector with a 1- or 2-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The `encrypted_client_hello` extension type (RFC 9849 §11.1).
const ENCRYPTED_CLIENT_HELLO: usize = 0xfe0d;

/// The ClientHello body (RFC 8446 §4.1.2), every length consistent, each extension type
/// once (§4.2), and at most one server_name extension with exactly one `host_name`: the
/// name, and whether the hello carries an encrypted one ([`ENCRYPTED_CLIENT_HELLO`]).
fn parse_client_hello(body: &[u8]) -> Result<(Option<Name>, bool, Alpn), SniError> {
    let mut c = Cursor(body);
    c.take(2 + 32)?; // legacy_version, random
    if c.vec8()?.len() > 32 {
        return Err(SniError::Malformed("a session id longer than 32 bytes"));
    }
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("a malformed cipher suite list"));
    }
    if c.vec8()?.is_empty() {
        return Err(SniError::Malformed("no compression method"));
    }
    if c.0.is_empty() {
        return Ok((None, false, Alpn::default())); // no extensions: an old client that names no server
    }
    let mut exts = Cursor(c.vec16()?);
    if !c.0.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut seen = [0u64; 1024]; // one bit per extension type
    let mut name = None;
    let mut alpn = Alpn::default();
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        let (word, bit) = (ty / 64, 1u64 << (ty % 64));
        if seen[word] & bit != 0 {
            return Err(SniError::Malformed("an extension appears twice"));
        }
        seen[word] |= bit;
        if ty == 0 {
            name = Some(parse_server_name(data)?);
        } else if ty == ALPN {
            alpn = parse_alpn(data);
        }
    }
    let ech = seen[ENCRYPTED_CLIENT_HELLO / 64] & (1u64 << (ENCRYPTED_CLIENT_HELLO % 64)) != 0;
    Ok((name, ech, alpn))
}

/// The `application_layer_protocol_negotiation` extension type (RFC 7301 §3.1).
const ALPN: usize = 16;

/// The protocols of an ALPN extension. A malformed list offers nothing inspection can
/// serve (its server would refuse it anyway): `offered` without `http11`.
fn parse_alpn(ext: &[u8]) -> Alpn {
    let mut out = Alpn {
        offered: true,
        ..Alpn::default()
    };
    let mut c = Cursor(ext);
    let Ok(list) = c.vec16() else {
        return out;
    };
    if !c.0.is_empty() {
        return out;
    }
    let mut list = Cursor(list);
    let (mut http11, mut h2) = (false, false);
    while !list.0.is_empty() {
        match list.vec8() {
            Ok(b"http/1.1") => http11 = true,
            Ok(b"h2") => h2 = true,
            Ok([]) | Err(_) => return out,
            Ok(_) => {}
        }
    }
    out.http11 = http11;
    out.h2 = h2;
    out
}

/// The server_name extension (RFC 6066 §3): a list holding exactly one `host_name`.
fn parse_server_name(ext: &[u8]) -> Result<Name, SniError> {
    let mut c = Cursor(ext);
    let mut list = Cursor(c.vec16()?);
    if !c.0.is_empty() {
        return Err(SniError::Malformed("bytes after the server name list"));
    }
    if list.u8()? != 0 {
        return Err(SniError::Malformed("a server name that is not a host_name"));
    }
    let host = list.vec16()?;
    if !list.0.is_empty() {
        return Err(SniError::Malformed("more than one server name"));
    }
    host_name(host)
}

/// A DNS host name as RFC 6066 allows it: ASCII, no trailing dot, not an IP literal, at
/// most 253 octets; then the same normalisation as every other name.
fn host_name(raw: &[u8]) -> Result<Name, SniError> {
    if raw.is_empty() || raw.len() > 253 || raw.ends_with(b".") {
        return Err(SniError::BadName);
    }
    if !raw
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(SniError::BadName);
    }
    let text = std::str::from_utf8(raw).map_err(|_| SniError::BadName)?;
    // Name::parse refuses a numeric last label, which covers IPv4 literals; `:` above
    // already refused IPv6 ones.
    Name::parse(text).map_err(|_| SniError::BadName)
}

/// The server name of the ClientHello at the start of `buf`: `Ok(Some)` for the one
/// `host_name`, `Ok(None)` for a hello without the extension, [`SniError::Incomplete`]
/// while more bytes are needed. A convenience over [`HelloReader`] for one whole buffer.
pub fn server_name(buf: &[u8]) -> Result<Option<Name>, SniError> {
    match HelloReader::default().read(buf)? {
        Some(h) => Ok(h.server_name),
        None => Err(SniError::Incomplete),
    }
}

/// Whether a ChangeCipherSpec record starts at `buf[at..]` (RFC 8446 §D.4: a client in
/// middlebox compatibility mode sends one before its second ClientHello): `Ok(Some(6))`
/// for one, `Ok(Some(0))` when another byte starts there, `Ok(None)` while more bytes are
/// needed to tell, `Err` for a malformed one.
pub fn change_cipher_spec(buf: &[u8], at: usize) -> Result<Option<usize>, SniError> {
    let rest = buf.get(at..).unwrap_or_default();
    match rest.first() {
        None => return Ok(None),
        Some(&CHANGE_CIPHER_SPEC) => {}
        Some(_) => return Ok(Some(0)),
    }
    match rest.get(..6) {
        None => Ok(None),
        Some([CHANGE_CIPHER_SPEC, 0x03, 0x01..=0x03, 0x00, 0x01, 0x01]) => Ok(Some(6)),
        Some(_) => Err(SniError::Malformed("a malformed ChangeCipherSpec record")),
    }
}

/// How one of the server's first handshake messages begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFirst {
    /// A ServerHello: the server has committed to the client's hello.
    ServerHello,
    /// A HelloRetryRequest: the client will send a second ClientHello.
    HelloRetry,
    /// An alert: the server refused the handshake.
    Alert,
    /// Anything else: not a TLS server answering a ClientHello.
    Invalid,
}

/// Most handshake bytes kept from the server: a HelloRetryRequest (with a cookie) and the
/// head of the message after it.
const MAX_SERVER_HANDSHAKE: usize = 16 * 1024;

/// Bytes of a ServerHello that tell it from a HelloRetryRequest: type, length, version,
/// random.
const SERVER_HELLO_HEAD: usize = 4 + 2 + 32;

/// Reads the server's first handshake messages from its bytes as they pass, fed chunk by
/// chunk (the caller forwards and drops them): record headers are checked, handshake
/// bytes are reassembled across records, and one ChangeCipherSpec after the first message
/// is allowed (RFC 8446 §D.4).
#[derive(Debug, Default)]
pub struct ServerReader {
    header: [u8; 5],
    have: usize,
    /// Content type and bytes left of the record being read.
    body: Option<(u8, usize)>,
    handshake: Vec<u8>,
    ccs: bool,
    /// Set by an alert or anything unreadable: nothing after it counts.
    end: Option<ServerFirst>,
}

impl ServerReader {
    /// Take the next bytes the server sent.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() && self.end.is_none() {
            let Some((ty, left)) = self.body else {
                let n = (5 - self.have).min(chunk.len());
                self.header[self.have..self.have + n].copy_from_slice(&chunk[..n]);
                self.have += n;
                chunk = &chunk[n..];
                if self.have == 5 {
                    self.have = 0;
                    self.start_record();
                }
                continue;
            };
            let n = left.min(chunk.len());
            let (part, rest) = chunk.split_at(n);
            chunk = rest;
            match ty {
                HANDSHAKE if self.handshake.len() + n <= MAX_SERVER_HANDSHAKE => {
                    self.handshake.extend_from_slice(part)
                }
                CHANGE_CIPHER_SPEC if part == [1] => {}
                _ => self.end = Some(ServerFirst::Invalid),
            }
            self.body = (left > n).then_some((ty, left - n));
        }
    }

    fn start_record(&mut self) {
        let first = self.handshake.is_empty() && !self.ccs;
        let (ty, len) = match record_header(&self.header, first) {
            Ok(r) => r,
            Err(_) => {
                self.end = Some(ServerFirst::Invalid);
                return;
            }
        };
        match ty {
            HANDSHAKE => {}
            CHANGE_CIPHER_SPEC if !self.ccs && !self.handshake.is_empty() && len == 1 => {
                self.ccs = true
            }
            ALERT => self.end = Some(ServerFirst::Alert),
            _ => self.end = Some(ServerFirst::Invalid),
        }
        self.body = Some((ty, len));
    }

    /// How handshake message `index` begins (0 the first, 1 the one after a
    /// HelloRetryRequest); `None` while more bytes are needed.
    pub fn message(&self, index: usize) -> Option<ServerFirst> {
        let mut start = 0;
        for i in 0..=index {
            let Some(head) = self.handshake.get(start..start + SERVER_HELLO_HEAD) else {
                return self.end;
            };
            let kind = if head[0] != 2 || head[4] != 0x03 {
                ServerFirst::Invalid
            } else if head[6..] == HELLO_RETRY_RANDOM {
                ServerFirst::HelloRetry
            } else {
                ServerFirst::ServerHello
            };
            if i == index || kind != ServerFirst::HelloRetry {
                return Some(if i == index {
                    kind
                } else {
                    ServerFirst::Invalid
                });
            }
            start += 4 + u32::from_be_bytes([0, head[1], head[2], head[3]]) as usize;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![ty, 0x03, 0x01];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    /// A minimal ClientHello body with the given extensions (type, data).
    fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut b = vec![0x03, 0x03];
        b.extend_from_slice(&[7; 32]);
        b.push(0); // session id
        b.extend_from_slice(&[0, 2, 0x13, 0x01]);
        b.extend_from_slice(&[1, 0]);
        let mut e = Vec::new();
        for (ty, data) in exts {
            e.extend_from_slice(&ty.to_be_bytes());
            e.extend_from_slice(&(data.len() as u16).to_be_bytes());
            e.extend_from_slice(data);
        }
        b.extend_from_slice(&(e.len() as u16).to_be_bytes());
        b.extend_from_slice(&e);
        let mut m = vec![1, 0, (b.len() >> 8) as u8, b.len() as u8];
        m.extend_from_slice(&b);
        record(HANDSHAKE, &m)
    }

    fn sni(names: &[&[u8]]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for n in names {
            list.push(0);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        (0, d)
    }

    #[test]
    fn one_name_is_read_and_others_are_refused() {
        let ok = hello(&[sni(&[b"Pypi.org"])]);
        assert_eq!(server_name(&ok).unwrap().unwrap().as_str(), "pypi.org");
        assert_eq!(server_name(&hello(&[])), Ok(None));
        let bad: [(&str, Vec<u8>); 9] = [
            ("two names", hello(&[sni(&[b"a.example", b"b.example"])])),
            (
                "two extensions",
                hello(&[sni(&[b"a.example"]), sni(&[b"b.example"])]),
            ),
            ("NUL", hello(&[sni(&[b"a.example\0"])])),
            ("dot dot", hello(&[sni(&[b"a.example.."])])),
            ("trailing dot", hello(&[sni(&[b"a.example."])])),
            ("IPv4", hello(&[sni(&[b"10.0.0.1"])])),
            ("IPv6", hello(&[sni(&[b"::1"])])),
            ("long", hello(&[sni(&[&[b'a'; 300]])])),
            ("empty", hello(&[sni(&[b""])])),
        ];
        for (what, h) in bad {
            assert!(
                matches!(
                    server_name(&h),
                    Err(SniError::BadName | SniError::Malformed(_))
                ),
                "{what}: {:?}",
                server_name(&h)
            );
        }
        let dup = hello(&[(10, vec![0, 0]), (10, vec![0, 0])]);
        assert_eq!(
            server_name(&dup),
            Err(SniError::Malformed("an extension appears twice"))
        );
    }

    #[test]
    fn records_before_the_hello_are_refused() {
        let h = hello(&[sni(&[b"a.example"])]);
        let mut empty = vec![HANDSHAKE, 3, 1, 0, 0];
        empty.extend_from_slice(&h);
        assert_eq!(
            server_name(&empty),
            Err(SniError::Malformed("an empty record"))
        );
        let mut ccs = record(CHANGE_CIPHER_SPEC, &[1]);
        ccs.extend_from_slice(&h);
        assert!(matches!(server_name(&ccs), Err(SniError::Malformed(_))));
        let mut trailing = h.clone();
        trailing.push(0);
        let n = trailing.len() - 5;
        trailing[3..5].copy_from_slice(&((n as u16).to_be_bytes()));
        assert!(matches!(
            server_name(&trailing),
            Err(SniError::Malformed(_))
        ));
        assert_eq!(server_name(b"SSH-2.0-x\r\n"), Err(SniError::NotTls));
    }

    #[test]
    fn one_byte_records_are_each_examined_once() {
        let h = hello(&[sni(&[b"a.example"])]);
        let body = &h[5..];
        let stream: Vec<u8> = body.iter().flat_map(|b| record(HANDSHAKE, &[*b])).collect();
        let mut r = HelloReader::default();
        // The stream as a client writing one byte at a time delivers it.
        let got = (1..=stream.len()).find_map(|n| r.read(&stream[..n]).unwrap());
        assert_eq!(got.unwrap().server_name.unwrap().as_str(), "a.example");
        assert_eq!(got.unwrap().end, stream.len());
        assert_eq!(r.examined(), stream.len());
    }

    fn server_first(bytes: &[u8], index: usize) -> Option<ServerFirst> {
        let mut r = ServerReader::default();
        r.feed(bytes);
        r.message(index)
    }

    #[test]
    fn server_hello_and_retry_are_told_apart() {
        let mut sh = vec![2, 0, 0, 70, 0x03, 0x03];
        sh.extend_from_slice(&[9; 32]);
        sh.extend_from_slice(&[0; 36]);
        let mut hrr = sh.clone();
        hrr[6..38].copy_from_slice(&HELLO_RETRY_RANDOM);
        let whole = record(HANDSHAKE, &sh);
        assert_eq!(server_first(&whole, 0), Some(ServerFirst::ServerHello));
        assert_eq!(server_first(&whole[..30], 0), None);
        // A retry split across records and fed byte by byte, a ChangeCipherSpec, then
        // the ServerHello that answers the second ClientHello.
        let mut stream = Vec::new();
        for part in hrr.chunks(5) {
            stream.extend_from_slice(&record(HANDSHAKE, part));
        }
        stream.extend_from_slice(&record(CHANGE_CIPHER_SPEC, &[1]));
        stream.extend_from_slice(&whole);
        let mut r = ServerReader::default();
        let mut firsts = Vec::new();
        for b in &stream {
            r.feed(std::slice::from_ref(b));
            firsts.push((r.message(0), r.message(1)));
        }
        assert_eq!(
            firsts.last(),
            Some(&(
                Some(ServerFirst::HelloRetry),
                Some(ServerFirst::ServerHello)
            ))
        );
        // The second message is told exactly when its first 38 bytes are in.
        let told = firsts.iter().position(|(_, second)| second.is_some());
        assert_eq!(
            told,
            Some(stream.len() - whole.len() + 5 + SERVER_HELLO_HEAD - 1)
        );
        let mut twice = record(HANDSHAKE, &hrr);
        twice.extend_from_slice(&record(HANDSHAKE, &hrr));
        assert_eq!(server_first(&twice, 1), Some(ServerFirst::HelloRetry));
        assert_eq!(
            server_first(&record(ALERT, &[2, 40]), 0),
            Some(ServerFirst::Alert)
        );
        assert_eq!(
            server_first(b"HTTP/1.1 400 Bad Request\r\n", 0),
            Some(ServerFirst::Invalid)
        );
        let mut ccs_first = record(CHANGE_CIPHER_SPEC, &[1]);
        ccs_first.extend_from_slice(&whole);
        assert_eq!(server_first(&ccs_first, 0), Some(ServerFirst::Invalid));
    }

    #[test]
    fn change_cipher_spec_between_hellos() {
        assert_eq!(change_cipher_spec(&[20, 3, 3, 0, 1, 1, 22], 0), Ok(Some(6)));
        assert_eq!(change_cipher_spec(&[20, 3, 3], 0), Ok(None));
        assert_eq!(change_cipher_spec(&[22, 3, 3], 0), Ok(Some(0)));
        assert_eq!(change_cipher_spec(&[], 0), Ok(None));
        assert!(change_cipher_spec(&[20, 3, 3, 0, 2, 1, 1], 0).is_err());
    }

    #[test]
    fn the_alpn_offer_is_read_and_a_malformed_one_offers_nothing_inspectable() {
        let alpn = |names: &[&[u8]]| {
            let mut list = Vec::new();
            for n in names {
                list.push(n.len() as u8);
                list.extend_from_slice(n);
            }
            let mut ext = (list.len() as u16).to_be_bytes().to_vec();
            ext.extend(list);
            parse_alpn(&ext)
        };
        let both = alpn(&[b"h2", b"http/1.1"]);
        assert!(both.offered && both.h2 && both.http11 && both.inspectable());
        assert!(alpn(&[b"h2"]).inspectable());
        let imap = alpn(&[b"imap"]);
        assert!(!imap.inspectable());
        assert_eq!(imap.shown(), "protocols other than http/1.1 and h2");
        assert!(
            !alpn(&[b"", b"http/1.1"]).inspectable(),
            "an empty name is malformed"
        );
        assert!(
            !parse_alpn(&[0, 5, 2]).inspectable(),
            "a short list is malformed"
        );
        assert!(
            Alpn::default().inspectable(),
            "no ALPN: HTTP/1.1 by default"
        );
    }

    #[test]
    fn an_encrypted_client_hello_is_told_apart_by_its_extension() {
        let read = |exts: &[(u16, Vec<u8>)]| HelloReader::default().read(&hello(exts));
        let outer = sni(&[b"public.example"]);
        let ech = (0xfe0d, vec![0, 0, 1, 0, 1, 7, 0, 0, 0, 0]); // outer ECH, bytes opaque here
        let got = read(&[outer.clone(), ech.clone()]).unwrap().unwrap();
        assert!(got.encrypted_client_hello);
        assert_eq!(got.server_name.unwrap().as_str(), "public.example");
        let got = read(std::slice::from_ref(&ech)).unwrap().unwrap();
        assert!(got.encrypted_client_hello && got.server_name.is_none());
        let got = read(std::slice::from_ref(&outer)).unwrap().unwrap();
        assert!(!got.encrypted_client_hello);
        // Its neighbours in the type space are other extensions.
        for ty in [0xfe0c, 0xfe0e, 0xfd0d] {
            let got = read(&[outer.clone(), (ty, vec![])]).unwrap().unwrap();
            assert!(!got.encrypted_client_hello, "{ty:#x}");
        }
        assert!(matches!(
            read(&[ech.clone(), ech]),
            Err(SniError::Malformed(_))
        ));
    }
}
