//! Host patterns as operators and the catalog write them, checked once at load time.
//!
//! The hot path never sees these strings: [`HostPattern`] is what the matcher compiles
//! into its tables.

use std::fmt;

use super::target::{InvalidTarget, Name};

/// The shape of a host pattern, which decides how the matcher files it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `name`: that name only.
    Exact(String),
    /// `*.suffix`: one or more extra labels in front of `suffix`, never `suffix` itself.
    Subdomains(String),
    /// `*suffix` (no dot after the star): `suffix` and its subdomains, never a name that
    /// merely ends in the same characters (`notpytorch.org` is not `*pytorch.org`).
    ApexAndSubdomains(String),
}

/// Whether `name` is a strict subdomain of `base` (`a.b.c` of `b.c`, never `xb.c`).
fn strictly_under(name: &str, base: &str) -> bool {
    name.len() > base.len() + 1
        && name.ends_with(base)
        && name.as_bytes()[name.len() - base.len() - 1] == b'.'
}

impl HostPattern {
    /// The name every match ends in (the pattern without its wildcard).
    pub fn base(&self) -> &str {
        match self {
            HostPattern::Exact(s)
            | HostPattern::Subdomains(s)
            | HostPattern::ApexAndSubdomains(s) => s,
        }
    }

    /// Whether the normalised `name` matches, as the policy's tables would match it (a
    /// load-time helper; the hot path uses the tables).
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(n) => name == n,
            HostPattern::Subdomains(b) => strictly_under(name, b),
            HostPattern::ApexAndSubdomains(b) => name == b || strictly_under(name, b),
        }
    }

    /// Whether every name `other` matches, this matches too.
    pub fn covers(&self, other: &HostPattern) -> bool {
        match other {
            HostPattern::Exact(n) => self.matches(n),
            HostPattern::Subdomains(b) => match self {
                HostPattern::Exact(_) => false,
                HostPattern::Subdomains(a) | HostPattern::ApexAndSubdomains(a) => {
                    b == a || strictly_under(b, a)
                }
            },
            HostPattern::ApexAndSubdomains(b) => match self {
                HostPattern::Exact(_) => false,
                HostPattern::Subdomains(a) => strictly_under(b, a),
                HostPattern::ApexAndSubdomains(a) => b == a || strictly_under(b, a),
            },
        }
    }

    /// Whether some name matches both patterns.
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(n), p) | (p, HostPattern::Exact(n)) => p.matches(n),
            // Two wildcards share names exactly when one base is the other or lies under it.
            (a, b) => {
                let (a, b) = (a.base(), b.base());
                a == b || strictly_under(a, b) || strictly_under(b, a)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(s) => f.write_str(s),
            HostPattern::Subdomains(s) => write!(f, "*.{s}"),
            HostPattern::ApexAndSubdomains(s) => write!(f, "*{s}"),
        }
    }
}

/// A path restriction from an entry such as `raw.githubusercontent.com/microsoft/x/*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    prefix: bool,
}

impl PathPattern {
    /// Whether a request path (the query, if any, is ignored) is within this pattern.
    /// Paths are compared byte for byte, so anything an upstream server might normalise
    /// into another path never matches: `.`/`..` segments, `\`, `;` parameters (`..;`)
    /// and any percent-encoding (`%2e`, `%2f`, `%5c`, ...), and raw non-ASCII, whose
    /// lookalikes of `.`, `/` and `\` (`．`, `‥`, `／`, `＼`) Unicode normalisation (NFKC)
    /// turns into them; a conforming client percent-encodes non-ASCII anyway.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or("");
        if !path.is_ascii()
            || path.contains(['%', '\\', ';'])
            || path.split('/').any(|seg| seg == ".." || seg == ".")
        {
            return false;
        }
        if self.prefix {
            path.starts_with(self.text.as_str())
        } else {
            path == self.text
        }
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)?;
        if self.prefix {
            f.write_str("*")?;
        }
        Ok(())
    }
}

/// Why a pattern from a config file or catalog was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("the pattern is empty")]
    Empty,
    #[error(
        "a wildcard may only stand at the far left ('*.example.com' or '*example.com'); '{0}' has one elsewhere"
    )]
    WildcardPosition(String),
    #[error("'{pattern}' holds non-ASCII letters; write it in punycode: '{suggestion}'")]
    NonAscii { pattern: String, suggestion: String },
    #[error("'{pattern}' still holds the placeholder {placeholder}")]
    Placeholder {
        pattern: String,
        placeholder: String,
    },
    #[error("'{pattern}' is not a valid host name: {reason}")]
    InvalidName {
        pattern: String,
        reason: InvalidTarget,
    },
    #[error("'{0}' is an IP address; write it as a cidr rule (for example cidr = \"{0}/32\")")]
    IpAddress(String),
}

/// Parse `host`, `*.host`, `*host`, optionally followed by `/path` or `/path/*`.
pub fn parse_pattern(input: &str) -> Result<(HostPattern, Option<PathPattern>), PatternError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(PatternError::Empty);
    }
    if !input.is_ascii() {
        return Err(PatternError::NonAscii {
            pattern: input.to_owned(),
            suggestion: to_ascii_suggestion(input),
        });
    }
    if let Some(start) = input.find('<') {
        let end = input[start..]
            .find('>')
            .map_or(input.len(), |e| start + e + 1);
        return Err(PatternError::Placeholder {
            pattern: input.to_owned(),
            placeholder: input[start..end].to_owned(),
        });
    }
    let (host, path) = match input.find('/') {
        Some(i) => (&input[..i], Some(&input[i..])),
        None => (input, None),
    };
    let path = path.map(|p| match p.strip_suffix('*') {
        Some(prefix) => PathPattern {
            text: prefix.to_owned(),
            prefix: true,
        },
        None => PathPattern {
            text: p.to_owned(),
            prefix: false,
        },
    });
    if let Some(p) = &path
        && p.text.contains('*')
    {
        return Err(PatternError::WildcardPosition(input.to_owned()));
    }
    let (kind, rest): (fn(String) -> HostPattern, &str) = if let Some(r) = host.strip_prefix("*.") {
        (HostPattern::Subdomains, r)
    } else if let Some(r) = host.strip_prefix('*') {
        (HostPattern::ApexAndSubdomains, r)
    } else {
        (HostPattern::Exact, host)
    };
    if rest.contains('*') {
        return Err(PatternError::WildcardPosition(input.to_owned()));
    }
    if rest.parse::<std::net::IpAddr>().is_ok() {
        return Err(PatternError::IpAddress(rest.to_owned()));
    }
    let name = Name::parse(rest).map_err(|reason| PatternError::InvalidName {
        pattern: input.to_owned(),
        reason,
    })?;
    Ok((kind(name.as_str().to_owned()), path))
}

/// Turn a name with non-ASCII letters into its punycode (IDNA A-label) form, label by
/// label, so that an error message can offer the spelling to use instead.
pub fn to_ascii_suggestion(input: &str) -> String {
    input
        .split('.')
        .map(|label| {
            if label.is_ascii() {
                return label.to_ascii_lowercase();
            }
            let chars: Vec<char> = label.chars().flat_map(char::to_lowercase).collect();
            match punycode_encode(&chars) {
                Some(p) => format!("xn--{p}"),
                None => label.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// RFC 3492 encoder; `None` only on arithmetic overflow for absurd inputs.
fn punycode_encode(input: &[char]) -> Option<String> {
    const BASE: u32 = 36;
    const TMIN: u32 = 1;
    const TMAX: u32 = 26;
    const SKEW: u32 = 38;
    const DAMP: u32 = 700;
    fn adapt(delta: u32, points: u32, first: bool) -> u32 {
        let mut delta = if first { delta / DAMP } else { delta / 2 };
        delta += delta / points;
        let mut k = 0;
        while delta > ((BASE - TMIN) * TMAX) / 2 {
            delta /= BASE - TMIN;
            k += BASE;
        }
        k + ((BASE - TMIN + 1) * delta) / (delta + SKEW)
    }
    fn digit(d: u32) -> char {
        if d < 26 {
            (b'a' + d as u8) as char
        } else {
            (b'0' + (d - 26) as u8) as char
        }
    }
    let mut out: String = input.iter().filter(|c| c.is_ascii()).collect();
    let basic = out.len() as u32;
    let mut handled = basic;
    if basic > 0 {
        out.push('-');
    }
    let (mut n, mut delta, mut bias) = (128u32, 0u32, 72u32);
    let total = input.len() as u32;
    while handled < total {
        let m = input.iter().map(|&c| c as u32).filter(|&c| c >= n).min()?;
        delta = delta.checked_add((m - n).checked_mul(handled + 1)?)?;
        n = m;
        for &c in input {
            let c = c as u32;
            if c < n {
                delta = delta.checked_add(1)?;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = if k <= bias {
                        TMIN
                    } else if k >= bias + TMAX {
                        TMAX
                    } else {
                        k - bias
                    };
                    if q < t {
                        break;
                    }
                    out.push(digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                out.push(digit(q));
                bias = adapt(delta, handled + 1, handled == basic);
                delta = 0;
                handled += 1;
            }
        }
        delta = delta.checked_add(1)?;
        n += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> HostPattern {
        parse_pattern(s).unwrap().0
    }

    #[test]
    fn patterns_match_cover_and_overlap_as_the_tables_do() {
        assert!(pat("*.x.com").matches("a.b.x.com"));
        assert!(!pat("*.x.com").matches("x.com"));
        assert!(!pat("*.x.com").matches("ax.com"));
        assert!(pat("*x.com").matches("x.com") && pat("*x.com").matches("a.x.com"));
        assert!(!pat("*x.com").matches("ax.com"));
        for (a, b, covers) in [
            ("*.x.com", "a.x.com", true),
            ("*.x.com", "*.a.x.com", true),
            ("*.x.com", "*x.com", false),
            ("*x.com", "*.x.com", true),
            ("*x.com", "x.com", true),
            ("*.a.x.com", "*.x.com", false),
            ("a.x.com", "a.x.com", true),
            ("a.x.com", "*.a.x.com", false),
        ] {
            assert_eq!(pat(a).covers(&pat(b)), covers, "{a} covers {b}");
        }
        for (a, b, overlap) in [
            ("*.x.com", "*.a.x.com", true),
            ("*.a.x.com", "*.x.com", true),
            ("*.x.com", "*.y.com", false),
            ("*.x.com", "x.com", false),
            ("*x.com", "x.com", true),
            ("a.x.com", "*.x.com", true),
            ("*.ax.com", "*.x.com", false),
        ] {
            assert_eq!(pat(a).overlaps(&pat(b)), overlap, "{a} overlaps {b}");
        }
    }

    #[test]
    fn shapes() {
        assert_eq!(
            parse_pattern("PyPI.org").unwrap().0,
            HostPattern::Exact("pypi.org".into())
        );
        assert_eq!(
            parse_pattern("*.anaconda.org").unwrap().0,
            HostPattern::Subdomains("anaconda.org".into())
        );
        assert_eq!(
            parse_pattern("*pytorch.org").unwrap().0,
            HostPattern::ApexAndSubdomains("pytorch.org".into())
        );
    }

    #[test]
    fn wildcards_elsewhere_are_refused() {
        for p in [
            "a.*.com",
            "pypi.*",
            "*.*.com",
            "**.com",
            "a*b.com",
            "x.com/a*/b",
        ] {
            assert!(
                matches!(parse_pattern(p), Err(PatternError::WildcardPosition(_))),
                "{p}"
            );
        }
    }

    #[test]
    fn non_ascii_gets_a_punycode_suggestion() {
        match parse_pattern("bücher.example") {
            Err(PatternError::NonAscii { suggestion, .. }) => {
                assert_eq!(suggestion, "xn--bcher-kva.example")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(to_ascii_suggestion("MÜNCHEN.de"), "xn--mnchen-3ya.de");
        assert_eq!(to_ascii_suggestion("例え.jp"), "xn--r8jz45g.jp");
    }

    #[test]
    fn paths() {
        let (host, path) =
            parse_pattern("raw.githubusercontent.com/microsoft/vscode-tools-for-ai/master/x/*")
                .unwrap();
        assert_eq!(host.base(), "raw.githubusercontent.com");
        let path = path.unwrap();
        assert!(path.matches("/microsoft/vscode-tools-for-ai/master/x/server.py"));
        assert!(path.matches("/microsoft/vscode-tools-for-ai/master/x/a?b=1"));
        assert!(!path.matches("/microsoft/other/x"));
        assert!(!path.matches("/microsoft/vscode-tools-for-ai/master/x/../../../evil"));
        assert!(!path.matches("/microsoft/vscode-tools-for-ai/master/x/%2e%2e/evil"));
    }

    /// Every form an upstream server might normalise out of the allowed prefix is refused
    /// (`path_not_allowed`), while ordinary paths under the prefix still match.
    #[test]
    fn paths_that_could_be_normalised_never_match() {
        let prefix = parse_pattern("h.example/allowed/*").unwrap().1.unwrap();
        let exact = parse_pattern("h.example/allowed/file").unwrap().1.unwrap();
        for ok in [
            "/allowed/",
            "/allowed/file",
            "/allowed/a/b.tar.gz",
            "/allowed/v1.2/x",
            "/allowed/x?a=1;b=2&p=%2F..",
            "/allowed/x#frag;..",
        ] {
            assert!(prefix.matches(ok), "{ok}");
        }
        assert!(exact.matches("/allowed/file"));
        assert!(exact.matches("/allowed/file?q=%2e;x"));
        let refused = [
            // dot segments
            "/allowed/../evil",
            "/allowed/./file",
            "/allowed/x/..",
            // backslash
            "/allowed/..\\evil",
            "/allowed\\..\\evil",
            "/allowed/file\\",
            // `;` parameters, with and without dot-dot
            "/allowed/..;/evil",
            "/allowed/x;a=b/../evil",
            "/allowed/.;/file",
            "/allowed/file;jsessionid=1",
            "/allowed/;",
            // percent-encoded `/`, `\` and `.`, either case
            "/allowed/..%2Fevil",
            "/allowed/..%2fevil",
            "/allowed/..%5Cevil",
            "/allowed/..%5cevil",
            "/allowed/%2E%2E/evil",
            "/allowed/%2e%2e/evil",
            "/allowed/fil%65",
            // non-ASCII lookalikes of `.`, `/` and `\`
            "/allowed/\u{ff0e}\u{ff0e}/evil",
            "/allowed/\u{2025}/evil",
            "/allowed/\u{ff0f}..\u{ff0f}evil",
            "/allowed/x\u{ff3c}..\u{ff3c}evil",
        ];
        for bad in refused {
            assert!(!prefix.matches(bad), "{bad}");
        }
        for bad in [
            "/allowed/file;x",
            "/allowed/file\\",
            "/allowed/fil%65",
            "/allowed/./file",
        ] {
            assert!(!exact.matches(bad), "{bad}");
        }
    }

    #[test]
    fn placeholders_and_addresses_are_refused() {
        assert!(matches!(
            parse_pattern("<storage>.blob.core.windows.net"),
            Err(PatternError::Placeholder { placeholder, .. }) if placeholder == "<storage>"
        ));
        assert!(matches!(
            parse_pattern("10.1.2.3"),
            Err(PatternError::IpAddress(_))
        ));
    }
}
