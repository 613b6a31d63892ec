//! The inspection CA: the certificate and key an operator keeps (read and checked when a
//! configuration is compiled), what its X.509 name constraints permit, and a new one for
//! `aml-egress ca init`.
//!
//! The key is read once, held in a [`CaKey`] whose `Debug` shows nothing of it, and is
//! never written anywhere but the file `ca init` creates.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DnType, GeneralSubtree, IsCa, KeyPair,
    KeyUsagePurpose, NameConstraints, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

use crate::policy::HostPattern;

/// What is wrong with a CA file, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub problem: String,
    pub fix: String,
}

impl Problem {
    fn new(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        Problem {
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// The name constraints of a CA certificate (RFC 5280 §4.2.1.10), as far as TLS server
/// names are concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Whether the extension is marked critical.
    pub critical: bool,
    /// Permitted DNS subtrees (`example.com`: the name and its subdomains; `.example.com`:
    /// its subdomains only). Empty: DNS names are not constrained by a permitted list.
    pub permitted_dns: Vec<String>,
    pub excluded_dns: Vec<String>,
    pub permitted_ip: Vec<IpNet>,
    pub excluded_ip: Vec<IpNet>,
    /// Subtrees of other forms (e-mail, URI, directory names), counted only.
    pub other: usize,
}

/// The names one DNS constraint covers, as a host pattern: `.x` the subdomains of `x`,
/// `x` the name and its subdomains. This is how OpenSSL, NSS, Go and rustls-webpki read a
/// constraint (RFC 5280 gives the leading dot only for URIs).
fn constraint_pattern(c: &str) -> Option<HostPattern> {
    let c = c.trim_end_matches('.').to_ascii_lowercase();
    match c.strip_prefix('.') {
        Some(rest) if !rest.is_empty() => Some(HostPattern::Subdomains(rest.to_owned())),
        Some(_) => None,
        None if c.is_empty() => None,
        None => Some(HostPattern::ApexAndSubdomains(c)),
    }
}

impl Constraints {
    /// Whether a certificate for every name `p` matches may be issued under these
    /// constraints: some permitted DNS subtree (when there are any) covers all of them,
    /// and no excluded one covers any.
    pub fn permits(&self, p: &HostPattern) -> bool {
        let permitted = self.permitted_dns.is_empty()
            || self
                .permitted_dns
                .iter()
                .any(|c| c.is_empty() || constraint_pattern(c).is_some_and(|c| c.covers(p)));
        let excluded = self
            .excluded_dns
            .iter()
            .any(|c| c.is_empty() || constraint_pattern(c).is_some_and(|c| c.overlaps(p)));
        permitted && !excluded
    }

    /// One line: what is permitted and excluded.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let list = |v: &[String]| v.join(", ");
        let nets = |v: &[IpNet]| {
            v.iter()
                .map(IpNet::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.permitted_dns.is_empty() {
            parts.push(format!("permitted DNS {}", list(&self.permitted_dns)));
        }
        if !self.excluded_dns.is_empty() {
            parts.push(format!("excluded DNS {}", list(&self.excluded_dns)));
        }
        if !self.permitted_ip.is_empty() {
            parts.push(format!("permitted IP {}", nets(&self.permitted_ip)));
        }
        if !self.excluded_ip.is_empty() {
            parts.push(format!("excluded IP {}", nets(&self.excluded_ip)));
        }
        if self.other > 0 {
            parts.push(format!("{} of other forms", self.other));
        }
        parts.join("; ")
    }
}

/// What a CA certificate says, as `ca show` prints it and the load checks use it.
#[derive(Debug, Clone)]
pub struct CaCert {
    pub der: CertificateDer<'static>,
    pub subject: String,
    /// SHA-256 of the DER, as `AB:CD:...` (what `openssl x509 -fingerprint -sha256` prints).
    pub fingerprint: String,
    pub not_after: SystemTime,
    /// `None`: no name constraints, so it can sign for any name.
    pub constraints: Option<Constraints>,
    /// The public key's bits, to tell whether a key belongs to it.
    public_key: Vec<u8>,
}

impl CaCert {
    /// Seconds from `now` to the end of its validity; negative once it has expired.
    pub fn seconds_left(&self, now: SystemTime) -> i64 {
        match self.not_after.duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }
}

/// The SHA-256 fingerprint of a DER certificate, as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: Vec<String> = digest.as_ref().iter().map(|b| format!("{b:02X}")).collect();
    hex.join(":")
}

fn ip_constraint(bytes: &[u8]) -> Option<IpNet> {
    let (addr, mask): (IpAddr, &[u8]) = match bytes.len() {
        8 => (
            IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?),
            &bytes[4..],
        ),
        32 => (
            IpAddr::from(<[u8; 16]>::try_from(&bytes[..16]).ok()?),
            &bytes[16..],
        ),
        _ => return None,
    };
    let prefix = mask.iter().map(|b| b.count_ones()).sum::<u32>() as u8;
    IpNet::new(addr, prefix).ok()
}

/// Parse a DER certificate that must be a CA (basicConstraints CA true; keyCertSign when
/// it has a key usage).
pub fn parse_cert(der: CertificateDer<'static>) -> Result<CaCert, Problem> {
    let (_, x509) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
        Problem::new(
            format!("not an X.509 certificate: {e}"),
            "give the CA certificate in PEM (`aml-egress ca init` writes one)",
        )
    })?;
    let bad_ext = |e: x509_parser::error::X509Error| {
        Problem::new(
            format!("its extensions cannot be read: {e}"),
            "give a CA certificate made by `aml-egress ca init` or a well-formed one",
        )
    };
    let is_ca = x509
        .basic_constraints()
        .map_err(bad_ext)?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(Problem::new(
            "not a CA certificate (basicConstraints CA is not true), so clients would refuse the certificates it signs",
            "give a CA certificate: `aml-egress ca init --out DIR --config FILE` makes one",
        ));
    }
    if let Some(ku) = x509.key_usage().map_err(bad_ext)?
        && !ku.value.key_cert_sign()
    {
        return Err(Problem::new(
            "its key usage does not include keyCertSign, so it may not sign certificates",
            "give a CA certificate whose key usage has keyCertSign (`aml-egress ca init` makes one)",
        ));
    }
    let constraints = x509.name_constraints().map_err(bad_ext)?.map(|nc| {
        let mut c = Constraints {
            critical: nc.critical,
            ..Constraints::default()
        };
        let mut sort = |subtrees: &Option<Vec<x509_parser::extensions::GeneralSubtree<'_>>>,
                        dns: &mut Vec<String>,
                        ip: &mut Vec<IpNet>| {
            for s in subtrees.iter().flatten() {
                match &s.base {
                    GeneralName::DNSName(n) => dns.push((*n).to_owned()),
                    GeneralName::IPAddress(b) => match ip_constraint(b) {
                        Some(net) => ip.push(net),
                        None => c.other += 1,
                    },
                    _ => c.other += 1,
                }
            }
        };
        let (mut pd, mut pi, mut ed, mut ei) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        sort(&nc.value.permitted_subtrees, &mut pd, &mut pi);
        sort(&nc.value.excluded_subtrees, &mut ed, &mut ei);
        Constraints {
            permitted_dns: pd,
            excluded_dns: ed,
            permitted_ip: pi,
            excluded_ip: ei,
            ..c
        }
    });
    let not_after = x509.validity().not_after.timestamp();
    let not_after = if not_after >= 0 {
        UNIX_EPOCH + Duration::from_secs(not_after as u64)
    } else {
        UNIX_EPOCH
    };
    Ok(CaCert {
        subject: x509.subject().to_string(),
        fingerprint: fingerprint(&der),
        not_after,
        constraints,
        public_key: x509.public_key().subject_public_key.data.to_vec(),
        der,
    })
}

/// Read the first certificate of a PEM file and check that it is a CA.
pub fn read_cert(path: &Path) -> Result<CaCert, Problem> {
    let mut certs = CertificateDer::pem_file_iter(path).map_err(|e| {
        Problem::new(
            format!("cannot read the file: {e}"),
            "check the path and that the proxy may read it",
        )
    })?;
    let der = match certs.next() {
        Some(Ok(der)) => der,
        Some(Err(e)) => {
            return Err(Problem::new(
                format!("not a PEM certificate: {e}"),
                "give the CA certificate in PEM (a CERTIFICATE block)",
            ));
        }
        None => {
            return Err(Problem::new(
                "no CERTIFICATE block found",
                "give the CA certificate in PEM (`aml-egress ca init` writes ca.pem)",
            ));
        }
    };
    parse_cert(der)
}

/// The trust anchors of a PEM file (`inspect.upstream_ca_file`): every certificate in it
/// that parses; at least one.
pub fn read_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
        Problem::new(
            format!("cannot read the file: {e}"),
            "check the path and that the proxy may read it",
        )
    })?;
    let anchors: Vec<_> = certs
        .filter_map(Result::ok)
        .filter(|der| x509_parser::parse_x509_certificate(der).is_ok())
        .collect();
    if anchors.is_empty() {
        return Err(Problem::new(
            "no certificate in it could be read",
            "give one or more PEM CERTIFICATE blocks (the CAs that sign your upstreams' certificates)",
        ));
    }
    Ok(anchors)
}

/// The CA's private key. Its `Debug` shows nothing of it.
pub struct CaKey(KeyPair);

impl CaKey {
    /// The key pair, to sign with.
    pub fn pair(&self) -> &KeyPair {
        &self.0
    }
}

impl fmt::Debug for CaKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaKey(..)")
    }
}

/// Whether a key file's mode lets in anyone it should not (`None` when it does not): only
/// its owner may read it, or, for a file owned by root, its group too (as PostgreSQL allows
/// for its key: a Kubernetes Secret mounted with `fsGroup` and `defaultMode: 0440` is
/// root's, readable by the proxy's group).
fn open_mode(path: &Path) -> Result<Option<u32>, Problem> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(|e| {
        Problem::new(
            format!("cannot read the file: {e}"),
            "check the path and that the proxy may read it",
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    let closed = match meta.uid() {
        0 => 0o037,
        _ => 0o077,
    };
    Ok((mode & closed != 0).then_some(mode))
}

/// Read the CA's private key: the file must be closed to others (and to its group unless
/// root owns it, see [`open_mode`]), hold one
/// unencrypted PKCS#8 key, and that key must be the certificate's. No message carries any
/// of the file's contents.
pub fn read_key(path: &Path, cert: &CaCert) -> Result<CaKey, Problem> {
    let shown = path.display();
    if let Some(mode) = open_mode(path)? {
        return Err(Problem::new(
            format!("the key file is open to group or others (mode {mode:04o})"),
            format!(
                "chmod 600 {shown} (owned by the user the proxy runs as), or, owned by root, chmod 640 with the proxy's group (a Kubernetes Secret: fsGroup and defaultMode 0440)"
            ),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| {
        Problem::new(
            format!("cannot read the file: {e}"),
            "check the path and that the proxy may read it",
        )
    })?;
    let key = KeyPair::from_pem(&text).map_err(|_| {
        if text.contains("ENCRYPTED PRIVATE KEY") {
            Problem::new(
                "the key is encrypted",
                format!("give it unencrypted (openssl pkcs8 -topk8 -nocrypt -in {shown}), kept by the file's mode"),
            )
        } else if text.contains("BEGIN EC PRIVATE KEY") || text.contains("BEGIN RSA PRIVATE KEY") {
            Problem::new(
                "the key is not in PKCS#8 form",
                format!("convert it: openssl pkcs8 -topk8 -nocrypt -in {shown} -out NEW_FILE"),
            )
        } else {
            Problem::new(
                "no usable private key (a PKCS#8 PRIVATE KEY block of an ECDSA, Ed25519 or RSA key)",
                "give the key `aml-egress ca init` wrote beside the certificate",
            )
        }
    })?;
    if key.public_key_raw() != cert.public_key.as_slice() {
        return Err(Problem::new(
            "the key does not belong to inspect.ca_cert",
            "give the key file written with that certificate",
        ));
    }
    Ok(CaKey(key))
}

/// The DNS subtree that permits exactly what `p` matches (as closely as X.509 allows):
/// `*.x` → `.x`, `*x` → `x`, a name → the name (which also permits its subdomains).
pub fn subtree(p: &HostPattern) -> String {
    match p {
        HostPattern::Exact(n) | HostPattern::ApexAndSubdomains(n) => n.clone(),
        HostPattern::Subdomains(b) => format!(".{b}"),
    }
}

/// The permitted subtrees for `patterns`: one each, without those another already covers,
/// sorted.
pub fn subtrees<'a>(patterns: impl IntoIterator<Item = &'a HostPattern>) -> Vec<String> {
    let mut all: Vec<String> = patterns.into_iter().map(subtree).collect();
    all.sort();
    all.dedup();
    let covered = |s: &String| {
        let p = constraint_pattern(s);
        all.iter().any(|o| {
            o != s
                && constraint_pattern(o)
                    .zip(p.as_ref())
                    .is_some_and(|(o, p)| o.covers(p))
        })
    };
    all.iter().filter(|s| !covered(s)).cloned().collect()
}

/// A CA made by [`generate`]: its PEM files and what its certificate says.
pub struct NewCa {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: CaCert,
}

/// An ECDSA P-256 CA valid from an hour before `now` for `days` days: basicConstraints CA
/// with pathLenConstraint 0, keyUsage keyCertSign and cRLSign, subject CN `aml-egress
/// inspection CA (host)`, and with `permitted` DNS subtrees critical name constraints that
/// permit only those and exclude every IP address (`None`: no name constraints).
pub fn generate(
    permitted: Option<&[String]>,
    days: u32,
    host: &str,
    now: SystemTime,
) -> Result<NewCa, String> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("aml-egress inspection CA ({host})"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    if let Some(dns) = permitted {
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: dns.iter().cloned().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ],
        });
    }
    let since_epoch = now.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?;
    let start = since_epoch.saturating_sub(Duration::from_secs(3600));
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + start;
    params.not_after = epoch + since_epoch + Duration::from_secs(u64::from(days) * 86_400);
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| "no random numbers for a serial number".to_owned())?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let parsed = parse_cert(cert.der().clone()).map_err(|p| p.problem)?;
    Ok(NewCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert: parsed,
    })
}

/// Write `contents` to a new file with `mode`; with `replace`, an existing file is removed
/// first, so that the new one is created with the mode rather than keeping an old one's.
pub fn write_new(path: &Path, contents: &str, mode: u32, replace: bool) -> std::io::Result<()> {
    if replace {
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_pattern;

    fn pat(s: &str) -> HostPattern {
        parse_pattern(s).unwrap().0
    }

    #[test]
    fn subtrees_follow_the_patterns_and_drop_what_another_covers() {
        let ps = [
            pat("*.blob.core.windows.net"),
            pat("a.blob.core.windows.net"),
            pat("raw.githubusercontent.com"),
            pat("*pytorch.org"),
            pat("download.pytorch.org"),
        ];
        assert_eq!(
            subtrees(&ps),
            [
                ".blob.core.windows.net",
                "pytorch.org",
                "raw.githubusercontent.com"
            ]
        );
    }

    #[test]
    fn constraints_permit_what_a_subtree_covers() {
        let c = Constraints {
            permitted_dns: vec![".example.com".into(), "files.test".into()],
            excluded_dns: vec!["bad.example.com".into()],
            ..Constraints::default()
        };
        assert!(c.permits(&pat("a.example.com")));
        assert!(!c.permits(&pat("example.com")));
        assert!(!c.permits(&pat("*example.com")));
        assert!(
            !c.permits(&pat("*.example.com")),
            "bad.example.com is excluded"
        );
        assert!(c.permits(&pat("*.files.test")));
        assert!(c.permits(&pat("*files.test")));
        assert!(!c.permits(&pat("other.test")));
        assert!(Constraints::default().permits(&pat("anything.test")));
    }

    #[test]
    fn a_new_ca_says_what_it_permits() {
        let dns = vec![".example.com".to_owned()];
        let ca = generate(Some(&dns), 30, "host", SystemTime::now()).unwrap();
        let c = ca.cert.constraints.as_ref().unwrap();
        assert!(c.critical);
        assert_eq!(c.permitted_dns, dns);
        assert_eq!(
            c.excluded_ip,
            [
                "0.0.0.0/0".parse::<IpNet>().unwrap(),
                "::/0".parse().unwrap()
            ]
        );
        assert!(ca.cert.subject.contains("aml-egress inspection CA (host)"));
        let left = ca.cert.seconds_left(SystemTime::now());
        assert!((29 * 86_400..=30 * 86_400).contains(&left), "{left}");
        let open = generate(None, 1, "host", SystemTime::now()).unwrap();
        assert!(open.cert.constraints.is_none());
        assert!(
            !format!("{:?}", CaKey(KeyPair::from_pem(&ca.key_pem).unwrap())).contains("PRIVATE")
        );
    }
}
