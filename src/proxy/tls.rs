//! TLS on the proxy's own listeners, so that clients across a virtual network reach the
//! proxy over an encrypted hop (`curl --proxy https://...`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::error::SetupError;

/// Load a PEM certificate chain and key into an acceptor (ring provider, TLS 1.2 and 1.3,
/// HTTP/1.1 offered by ALPN). Errors name the file and say what to do.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, SetupError> {
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::Tls(format!("TLS set-up failed: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            SetupError::Tls(format!("proxy.tls_cert and proxy.tls_key do not make a usable pair: {e}; check that the key belongs to the certificate"))
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}
