//! The server name of a TLS ClientHello, read from the first bytes of a tunnel.
//!
//! A pure function over the bytes received so far: it reassembles handshake fragments
//! across TLS records (a ClientHello may be split across TCP segments and across several
//! records) and answers [`SniError::Incomplete`] until it has enough. Sizes are bounded.

use crate::policy::Name;

/// Largest ClientHello handshake message accepted (post-quantum key shares make them grow).
pub const MAX_HELLO: usize = 64 * 1024;

/// Why no server name could be read (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// More bytes are needed.
    Incomplete,
    /// The stream does not start with a TLS handshake record.
    NotTls,
    /// A TLS handshake that is not a well-formed ClientHello, or one over [`MAX_HELLO`].
    Malformed,
    /// The server_name is not a valid host name.
    BadName,
}

/// The server name, validated and normalised (`Ok(Some)`), the absence of the extension
/// (`Ok(None)`), or why not. Allocates only when the hello spans several records.
pub fn server_name(buf: &[u8]) -> Result<Option<Name>, SniError> {
    // Reassemble the handshake message from consecutive handshake records. The common
    // case (one record) borrows; several records are copied into a bounded buffer.
    let mut pos = 0;
    let mut single: Option<&[u8]> = None;
    let mut joined: Vec<u8> = Vec::new();
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            if pos == 0 && !buf.is_empty() && buf[0] != 0x16 {
                return Err(SniError::NotTls);
            }
            return Err(SniError::Incomplete);
        };
        if header[0] != 0x16 || header[1] != 0x03 {
            return Err(if pos == 0 {
                SniError::NotTls
            } else {
                SniError::Malformed
            });
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 + 2048 {
            return Err(SniError::Malformed);
        }
        let body = buf
            .get(pos + 5..pos + 5 + len)
            .ok_or(SniError::Incomplete)?;
        pos += 5 + len;
        let msg: &[u8] = match single {
            None if joined.is_empty() => {
                single = Some(body);
                body
            }
            _ => {
                if joined.is_empty() {
                    joined.extend_from_slice(single.take().unwrap_or_default());
                }
                joined.extend_from_slice(body);
                &joined
            }
        };
        if msg.len() >= 4 {
            if msg[0] != 0x01 {
                return Err(SniError::Malformed);
            }
            let need = 4 + (u32::from_be_bytes([0, msg[1], msg[2], msg[3]]) as usize);
            if need > MAX_HELLO {
                return Err(SniError::Malformed);
            }
            if msg.len() >= need {
                let hello = &msg[4..need];
                return match parse_hello(hello) {
                    Some(Some((start, end))) => std::str::from_utf8(&hello[start..end])
                        .ok()
                        .and_then(|s| Name::parse(s).ok())
                        .map(Some)
                        .ok_or(SniError::BadName),
                    Some(None) => Ok(None),
                    None => Err(SniError::Malformed),
                };
            }
        }
        if pos > MAX_HELLO + 5 * 8 {
            return Err(SniError::Malformed);
        }
    }
}

/// Offsets of the host_name within the ClientHello body, `Some(None)` when there is no
/// server_name extension, `None` when malformed.
fn parse_hello(h: &[u8]) -> Option<Option<(usize, usize)>> {
    let mut p = 2 + 32; // legacy_version, random
    let sid = *h.get(p)? as usize;
    p += 1 + sid;
    let suites = u16::from_be_bytes([*h.get(p)?, *h.get(p + 1)?]) as usize;
    p += 2 + suites;
    let comp = *h.get(p)? as usize;
    p += 1 + comp;
    if p == h.len() {
        return Some(None); // no extensions at all
    }
    let ext_len = u16::from_be_bytes([*h.get(p)?, *h.get(p + 1)?]) as usize;
    p += 2;
    let end = p.checked_add(ext_len)?;
    if end > h.len() {
        return None;
    }
    while p + 4 <= end {
        let ty = u16::from_be_bytes([h[p], h[p + 1]]);
        let len = u16::from_be_bytes([h[p + 2], h[p + 3]]) as usize;
        p += 4;
        if p + len > end {
            return None;
        }
        if ty == 0 {
            let ext = &h[p..p + len];
            let list = u16::from_be_bytes([*ext.first()?, *ext.get(1)?]) as usize;
            let mut q = 2;
            let list_end = 2 + list;
            if list_end > ext.len() {
                return None;
            }
            while q + 3 <= list_end {
                let kind = ext[q];
                let n = u16::from_be_bytes([ext[q + 1], ext[q + 2]]) as usize;
                q += 3;
                if q + n > list_end {
                    return None;
                }
                if kind == 0 {
                    return Some(Some((p + q, p + q + n)));
                }
                q += n;
            }
            return Some(None);
        }
        p += len;
    }
    Some(None)
}
