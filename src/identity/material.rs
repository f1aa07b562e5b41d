//! The workload's identity material: its certificate chain, the key and the trust bundles (ours,
//! and other trust domains' from `--trust-bundles` or the Workload API, [`super::bundles`]), read
//! from files and validated before use (the key matches the leaf, the leaf carries one workload
//! SPIFFE ID of our trust domain, chains to our domain's bundle and is within its validity).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::SpiffeId;
use super::bundles::{self, Authorities, BundleError, BundleSet};
use super::leaf::{LeafProblem, leaf};
use super::tls;

/// Material read from files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Files {
    /// `tls.crt` (leaf first, then intermediates), `tls.key`, `ca.crt`: cert-manager's
    /// csi-driver-spiffe layout.
    Dir(PathBuf),
    /// Kubernetes pod certificates (KEP-4317): the key and the chain in one PEM, and a trust bundle.
    PodCertificate { credential: PathBuf, trust: PathBuf },
}

impl Files {
    /// The files whose change means a reload.
    pub(crate) fn files(&self) -> Vec<PathBuf> {
        match self {
            Files::Dir(dir) => ["tls.crt", "tls.key", "ca.crt"]
                .iter()
                .map(|f| dir.join(f))
                .collect(),
            Files::PodCertificate { credential, trust } => vec![credential.clone(), trust.clone()],
        }
    }
}

/// Validated material, and the TLS configurations built from it once.
pub struct Material {
    pub id: SpiffeId,
    pub key: Arc<CertifiedKey>,
    /// The CAs of each trust domain peers may be of.
    pub bundles: Arc<BundleSet>,
    pub(crate) not_after: SystemTime,
    pub server: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("id", &self.id)
            .field(
                "not_after",
                &humantime::format_rfc3339_seconds(self.not_after),
            )
            .finish_non_exhaustive()
    }
}

/// Errors name where the material came from (a file, or another source's description).
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("cannot read {path}: {error}; mount the identity there or fix the path")]
    Read { path: String, error: String },
    #[error("{path} holds no {what}; expected PEM `{pem}` blocks")]
    Missing {
        path: String,
        what: &'static str,
        pem: &'static str,
    },
    #[error(
        "the key in {path} does not belong to the certificate ({error}); write the key and the chain of one issuance"
    )]
    KeyMismatch { path: String, error: String },
    #[error("the certificate in {path}: {problem}")]
    Leaf { path: String, problem: LeafProblem },
    #[error(
        "the certificate in {path} does not chain to the trust bundle in {bundle} ({error}); give the CA that issued it"
    )]
    Untrusted {
        path: String,
        bundle: String,
        error: String,
    },
    #[error("{0}")]
    Bundles(#[from] BundleError),
    #[error("cannot build the TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Material as a source delivers it, before validation, and where each part came from.
pub(crate) struct Parts {
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    /// Our trust domain's CAs.
    pub(crate) bundle: Vec<CertificateDer<'static>>,
    /// Other trust domains' CAs (our own among them adds to `bundle`).
    pub(crate) federated: Authorities,
    pub(crate) chain_from: String,
    pub(crate) key_from: String,
    pub(crate) bundle_from: String,
    pub(crate) federated_from: String,
}

fn read(path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|e| MaterialError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(MaterialError::Missing {
            path: path.display().to_string(),
            what: "certificate",
            pem: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// Reads the files of `source` (PEM) and the bundles of other trust domains at `trust_bundles`
/// (`--trust-bundles`), and validates them at `now`.
pub fn load(
    source: &Files,
    trust_domain: &str,
    trust_bundles: Option<&Path>,
    now: SystemTime,
) -> Result<Material, MaterialError> {
    let (chain_path, key_path, bundle_path) = match source {
        Files::Dir(dir) => (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt")),
        Files::PodCertificate { credential, trust } => {
            (credential.clone(), credential.clone(), trust.clone())
        }
    };
    let chain_pem = read(&chain_path)?;
    let key_pem = if key_path == chain_path {
        chain_pem.clone()
    } else {
        read(&key_path)?
    };
    let bundle_pem = read(&bundle_path)?;
    let parts = Parts {
        chain: certificates(&chain_pem, &chain_path)?,
        key: PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| MaterialError::Missing {
            path: key_path.display().to_string(),
            what: "private key",
            pem: "PRIVATE KEY",
        })?,
        bundle: certificates(&bundle_pem, &bundle_path)?,
        federated: trust_bundles
            .map(bundles::read)
            .transpose()?
            .unwrap_or_default(),
        chain_from: chain_path.display().to_string(),
        key_from: key_path.display().to_string(),
        bundle_from: bundle_path.display().to_string(),
        federated_from: trust_bundles
            .map(|p| format!("--trust-bundles {}", p.display()))
            .unwrap_or_default(),
    };
    validate(parts, trust_domain, now)
}

/// Validates material from any source (the files above; the SPIFFE Workload API delivers the
/// same parts as DER) at `now`, and builds its TLS configuration.
pub(crate) fn validate(
    parts: Parts,
    trust_domain: &str,
    now: SystemTime,
) -> Result<Material, MaterialError> {
    let Parts {
        chain,
        key,
        bundle,
        federated,
        chain_from,
        key_from,
        bundle_from,
        federated_from,
    } = parts;
    let Some(leaf_der) = chain.first() else {
        return Err(MaterialError::Missing {
            path: chain_from,
            what: "certificate",
            pem: "CERTIFICATE",
        });
    };
    let bundles = BundleSet::new(
        trust_domain,
        bundle,
        &bundle_from,
        federated,
        &federated_from,
    )?;

    let leaf_problem = |problem| MaterialError::Leaf {
        path: chain_from.clone(),
        problem,
    };
    let info = leaf(leaf_der).map_err(leaf_problem)?;
    if info.id.trust_domain != trust_domain {
        return Err(leaf_problem(LeafProblem::ForeignTrustDomain {
            id: info.id,
            expected: trust_domain.to_owned(),
        }));
    }
    info.check_time(now).map_err(leaf_problem)?;

    let provider: Arc<CryptoProvider> = tls::provider();
    let untrusted = |error: String| MaterialError::Untrusted {
        path: chain_from.clone(),
        bundle: bundle_from.clone(),
        error,
    };
    let parsed = ParsedCertificate::try_from(leaf_der).map_err(|e| untrusted(e.to_string()))?;
    let unix_now = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        bundles.ours(),
        &chain[1..],
        unix_now,
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| untrusted(e.to_string()))?;
    let certified = CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|e| {
        MaterialError::KeyMismatch {
            path: key_from,
            error: e.to_string(),
        }
    })?;

    let key = Arc::new(certified);
    let bundles = Arc::new(bundles);
    let server = tls::server_config(key.clone(), bundles.clone())?;
    Ok(Material {
        id: info.id,
        key,
        bundles,
        not_after: info.not_after,
        server,
    })
}
