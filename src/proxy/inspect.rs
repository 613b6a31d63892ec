//! TLS inspection at run time: the leaf certificates the proxy shows clients of an
//! inspected tunnel (minted for exactly the tunnel's name, only after the policy allowed
//! it, signed by the operator's CA, cached and bounded), and the TLS configuration that
//! verifies every upstream (the system's store plus `inspect.upstream_ca_file`; there is no
//! way to turn that off).
//!
//! What is inspected and why is decided by [`crate::inspect::Inspection`] at load; the
//! sessions themselves are served by [`crate::proxy::connect::tunnel`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SerialNumber};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::inspect::{Inspection, LoadedCa};
use crate::metrics::Metrics;

/// Resumable client sessions kept, for all inspected names together.
const SESSIONS: usize = 4096;

/// How long a minted leaf is valid (from an hour before it was minted); re-minted once
/// half of it has passed.
const LEAF_DAYS: u64 = 3;

/// Where Debian, Ubuntu, Alpine (the first) and RHEL-like systems (the second) keep the
/// system's trust store as one PEM bundle.
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// Names whose clients' handshake failures were logged in the current minute, at most
/// this many (a flood of names is then counted only).
const FAILURES_LOGGED: usize = 1024;

/// Why a leaf could not be minted (a broken CA; logged, and the tunnel refused).
#[derive(Debug, thiserror::Error)]
#[error("cannot mint a certificate for {name}: {why}")]
pub struct MintError {
    name: String,
    why: String,
}

struct Leaf {
    config: Arc<ServerConfig>,
    minted: SystemTime,
    /// Recency, for eviction.
    used: u64,
}

#[derive(Default)]
struct Leaves {
    by_name: HashMap<Box<str>, Leaf>,
    tick: u64,
}

/// The run-time side of inspection, one per loaded configuration.
pub struct Inspector {
    inspection: Inspection,
    leaves: Mutex<Leaves>,
    max: usize,
    /// Verifies upstreams: the system's store and `inspect.upstream_ca_file`.
    pub upstream: Arc<ClientConfig>,
    /// The clients' resumable sessions, one bounded store for every leaf (rustls' default,
    /// one per `ServerConfig`, would keep up to 256 per minted name); rustls resumes a
    /// session only under the name it began with (RFC 6066 §3).
    sessions: Arc<dyn rustls::server::StoresServerSessions>,
    /// (minute, names logged in it): a client that distrusts the CA is logged once per
    /// name per minute.
    failures: Mutex<(u64, std::collections::HashSet<Box<str>>)>,
    started: std::time::Instant,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspector(..)")
    }
}

/// The TLS configuration that verifies inspected tunnels' upstreams: the system's trust
/// store (its PEM bundle) and `extra`. Offers `h2` and `http/1.1` by ALPN.
pub fn upstream_config(extra: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    if let Some(bundle) = SYSTEM_BUNDLES
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        && let Ok(certs) = CertificateDer::pem_file_iter(bundle)
    {
        roots.add_parsable_certificates(certs.flatten());
    }
    roots.add_parsable_certificates(extra.iter().cloned());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

impl Inspector {
    /// The inspector of a loaded configuration; `None` when it inspects nothing (no CA).
    pub fn new(inspection: Inspection, metrics: Arc<Metrics>) -> Option<Inspector> {
        inspection.ca.as_ref()?;
        let upstream = upstream_config(&inspection.upstream_roots);
        Some(Inspector {
            max: inspection.max_cached_certs.max(1),
            inspection,
            leaves: Mutex::new(Leaves::default()),
            upstream,
            sessions: rustls::server::ServerSessionMemoryCache::new(SESSIONS),
            failures: Mutex::new((0, Default::default())),
            started: std::time::Instant::now(),
            metrics,
        })
    }

    /// Count a client's failed handshake with the leaf for `name`; whether to log it (the
    /// first for that name this minute, for at most [`FAILURES_LOGGED`] names a minute).
    pub fn handshake_failed(&self, name: &str) -> bool {
        self.metrics.inspect_client_failures.inc();
        let minute = self.started.elapsed().as_secs() / 60;
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if f.0 != minute {
            *f = (minute, Default::default());
        }
        f.1.len() < FAILURES_LOGGED && f.1.insert(name.into())
    }

    /// What is inspected, and why.
    pub fn inspection(&self) -> &Inspection {
        &self.inspection
    }

    /// Whether the CA has expired (then tunnels that need inspection are refused).
    pub fn ca_expired(&self, now: SystemTime) -> bool {
        self.inspection.expires_at().is_some_and(|t| t <= now)
    }

    /// The server configuration for an inspected tunnel to `name` (normalised, allowed by
    /// the policy): from the cache, or minted now. At most `inspect.max_cached_certs` are
    /// kept; the least recently used is dropped first.
    pub fn server_config(&self, name: &str) -> Result<Arc<ServerConfig>, MintError> {
        let now = SystemTime::now();
        let fresh = Duration::from_secs(LEAF_DAYS * 86_400 / 2);
        {
            let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            leaves.tick += 1;
            let tick = leaves.tick;
            if let Some(leaf) = leaves.by_name.get_mut(name)
                && now.duration_since(leaf.minted).unwrap_or_default() < fresh
            {
                leaf.used = tick;
                return Ok(leaf.config.clone());
            }
        }
        // Minted without the lock: signing takes far longer than a look-up.
        let config = self.mint(name, now)?;
        self.metrics.inspect_minted.inc();
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        leaves.tick += 1;
        let used = leaves.tick;
        if !leaves.by_name.contains_key(name) {
            while leaves.by_name.len() >= self.max {
                let Some(oldest) = leaves
                    .by_name
                    .iter()
                    .min_by_key(|(_, l)| l.used)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                leaves.by_name.remove(&oldest);
            }
        }
        leaves.by_name.insert(
            name.into(),
            Leaf {
                config: config.clone(),
                minted: now,
                used,
            },
        );
        self.metrics
            .inspect_cached
            .set(i64::try_from(leaves.by_name.len()).unwrap_or(i64::MAX));
        Ok(config)
    }

    /// A leaf for exactly `name` (its only SAN), valid from an hour ago for
    /// [`LEAF_DAYS`], signed by the CA, served with the CA behind it.
    fn mint(&self, name: &str, now: SystemTime) -> Result<Arc<ServerConfig>, MintError> {
        let fail = |why: String| MintError {
            name: name.to_owned(),
            why,
        };
        let LoadedCa { cert, key, .. } = self
            .inspection
            .ca
            .as_ref()
            .ok_or_else(|| fail("no CA is loaded".into()))?;
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| fail(e.to_string()))?;
        let mut params =
            CertificateParams::new(vec![name.to_owned()]).map_err(|e| fail(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + since.saturating_sub(Duration::from_secs(3600));
        // Never valid past the CA itself.
        let until = (now + Duration::from_secs(LEAF_DAYS * 86_400)).min(cert.not_after);
        params.not_after = epoch + until.duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| fail("no random numbers for a serial number".into()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let issuer =
            Issuer::from_ca_cert_der(&cert.der, key.pair()).map_err(|e| fail(e.to_string()))?;
        let leaf = params
            .signed_by(&leaf_key, &issuer)
            .map_err(|e| fail(e.to_string()))?;
        let chain = vec![leaf.der().clone(), cert.der.clone()];
        let key_der = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| fail(e.to_string()))?;
        // Early data is never accepted (rustls' default of 0).
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        cfg.session_storage = self.sessions.clone();
        Ok(Arc::new(cfg))
    }
}
