//! What a tunnel carries, told from its first bytes: a TLS record, an HTTP/1 request line,
//! or something else (which a tunnel outside `proxy.opaque_ports` is refused for).
//!
//! Incremental like the ClientHello reader: each byte is looked at once, however the
//! client splits its writes.

/// The protocol at the start of a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// A TLS record type byte (the ClientHello reader judges the rest).
    Tls,
    /// A whole, well-formed HTTP/1.0 or HTTP/1.1 request line (RFC 9112 §3).
    Http,
    /// Anything else, or a request line longer than the limit.
    Other,
}

/// Where the request-line scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Step {
    #[default]
    Start,
    Method,
    Target,
    /// How many bytes of `HTTP/1.` have matched.
    Version(u8),
    Minor,
    Cr,
    Done(Carried),
}

/// Tells [`Carried`] from a stream's first bytes.
#[derive(Debug, Default)]
pub struct Detector {
    pos: usize,
    step: Step,
}

impl Detector {
    /// Look at the bytes of `stream` not yet seen (it holds everything received so far);
    /// `limit` bounds the request line in bytes.
    pub fn read(&mut self, stream: &[u8], limit: usize) -> Carried {
        const VERSION: &[u8] = b"HTTP/1.";
        while let Step::Start
        | Step::Method
        | Step::Target
        | Step::Version(_)
        | Step::Minor
        | Step::Cr = self.step
        {
            let Some(&b) = stream.get(self.pos) else {
                return Carried::Incomplete;
            };
            if self.pos >= limit {
                self.step = Step::Done(Carried::Other);
                break;
            }
            self.pos += 1;
            self.step = match (self.step, b) {
                (Step::Start, 20..=24) => Step::Done(Carried::Tls),
                (Step::Start, b) if is_tchar(b) => Step::Method,
                (Step::Method, b) if is_tchar(b) => Step::Method,
                (Step::Method, b' ') => Step::Target,
                (Step::Target, 0x21..=0x7e) => Step::Target,
                (Step::Target, b' ') if stream[self.pos - 2] != b' ' => Step::Version(0),
                (Step::Version(n), b) if b == VERSION[n as usize] => {
                    if n as usize + 1 == VERSION.len() {
                        Step::Minor
                    } else {
                        Step::Version(n + 1)
                    }
                }
                (Step::Minor, b'0' | b'1') => Step::Cr,
                (Step::Cr, b'\r') => Step::Cr,
                (Step::Cr, b'\n') => Step::Done(Carried::Http),
                _ => Step::Done(Carried::Other),
            };
            // `\r` must come once, right before `\n`.
            if self.step == Step::Cr && b == b'\r' && stream[self.pos - 2] == b'\r' {
                self.step = Step::Done(Carried::Other);
            }
        }
        match self.step {
            Step::Done(c) => c,
            _ => Carried::Incomplete,
        }
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(s: &[u8]) -> Carried {
        Detector::default().read(s, 8192)
    }

    #[test]
    fn request_lines_tls_and_the_rest() {
        assert_eq!(whole(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"), Carried::Http);
        assert_eq!(whole(b"GET /x HTTP/1.0\n"), Carried::Http);
        assert_eq!(whole(b"\x16\x03\x01"), Carried::Tls);
        assert_eq!(whole(b"GET /x HTTP/1.1"), Carried::Incomplete);
        assert_eq!(whole(b""), Carried::Incomplete);
        for other in [
            &b"SSH-2.0-OpenSSH_9.2\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET  /x HTTP/1.1\r\n",
            b"GET /x HTTP/1.1\r\r\n",
            b"GET /x\r\n",
            b"\x00\x00",
            b"GET /\x7f HTTP/1.1\r\n",
        ] {
            assert_eq!(whole(other), Carried::Other, "{}", other.escape_ascii());
        }
        assert_eq!(
            Detector::default().read(b"GET /aaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\n", 16),
            Carried::Other
        );
    }

    #[test]
    fn byte_by_byte_is_the_same() {
        let line = b"POST /upload?x=1 HTTP/1.1\r\n";
        let mut d = Detector::default();
        for n in 1..line.len() {
            assert_eq!(d.read(&line[..n], 8192), Carried::Incomplete, "{n}");
        }
        assert_eq!(d.read(line, 8192), Carried::Http);
    }
}
