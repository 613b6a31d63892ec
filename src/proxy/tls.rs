//! TLS on the proxy's own listeners, so that clients across a virtual network reach the
//! proxy over an encrypted hop (`curl --proxy https://...`), optionally with client
//! certificates (`proxy.tls_client_ca`) whose names choose a client's policy.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::error::SetupError;

/// Load a PEM certificate chain and key into an acceptor (ring provider, TLS 1.2 and 1.3,
/// HTTP/1.1 offered by ALPN); with `client_ca`, every client must present a certificate
/// that CA signed (RFC 5280 path validation by rustls' webpki verifier). Errors name the
/// file and say what to do.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, SetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| SetupError::File {
            key: "proxy.tls_cert",
            path: cert.to_owned(),
            problem: format!("cannot read a PEM certificate chain: {e}"),
        })?;
    if certs.is_empty() {
        return Err(SetupError::File {
            key: "proxy.tls_cert",
            path: cert.to_owned(),
            problem: "no CERTIFICATE block found; give the server certificate (then any intermediates) in PEM".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| SetupError::File {
        key: "proxy.tls_key",
        path: key.to_owned(),
        problem: format!("cannot read a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(format!("TLS set-up failed: {e}")))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => builder.with_client_cert_verifier(client_verifier(path, provider)?),
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| {
            SetupError::Tls(format!("proxy.tls_cert and proxy.tls_key do not make a usable pair: {e}; check that the key belongs to the certificate"))
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The verifier of client certificates: every certificate of the PEM file at `path` is a
/// trust anchor, and a client without a certificate is refused.
fn client_verifier(
    path: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, SetupError> {
    let problem = |problem: String| SetupError::File {
        key: "proxy.tls_client_ca",
        path: path.to_owned(),
        problem,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| problem(format!("cannot read PEM certificates: {e}")))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(problem(
            "no usable CERTIFICATE block found; give the PEM certificate of the CA that signs the clients' certificates".into(),
        ));
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| problem(format!("cannot verify client certificates with it: {e}")))
}

/// The names a client certificate (DER) gives for choosing its policy: its DNS subject
/// alternative names, or, without any, its subject's common name. Empty when it cannot be
/// parsed (rustls verified it; a parser that disagrees chooses nothing).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let dns: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if !dns.is_empty() {
        return dns;
    }
    cert.subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect()
}
