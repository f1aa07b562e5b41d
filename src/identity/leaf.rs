//! A leaf certificate as a workload identity: its one SPIFFE ID (URI SAN) and its validity. Read
//! by the material's validation ([`super::material`]) and by the TLS verifiers ([`super::tls`]),
//! which both sit above it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::SpiffeId;

/// What is wrong with a leaf certificate as a workload identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeafProblem {
    #[error("is not a valid X.509 certificate ({0})")]
    Parse(String),
    #[error(
        "has {0} URI SANs, a SPIFFE certificate has exactly one: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    UriCount(usize),
    #[error("{0}")]
    NotWorkload(#[from] super::InvalidSpiffeId),
    #[error("identity {id} is not in the trust domain {expected} (--trust-domain)")]
    ForeignTrustDomain { id: SpiffeId, expected: String },
    #[error("expired at {0}; renew it")]
    Expired(String),
    #[error("is not valid before {0}; check the clock")]
    NotYetValid(String),
}

/// A leaf certificate's identity and validity.
pub(crate) struct Leaf {
    pub(crate) id: SpiffeId,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
}

fn system_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// The SPIFFE ID (the one URI SAN, of any trust domain) and the validity of a leaf.
pub(crate) fn leaf(der: &[u8]) -> Result<Leaf, LeafProblem> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| LeafProblem::Parse(e.to_string()))?;
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(LeafProblem::Parse(e.to_string())),
    };
    let [uri] = uris[..] else {
        return Err(LeafProblem::UriCount(uris.len()));
    };
    let id: SpiffeId = uri.parse()?;
    let validity = cert.validity();
    Ok(Leaf {
        id,
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
    })
}

impl Leaf {
    /// Err when `now` is outside the validity.
    pub(crate) fn check_time(&self, now: SystemTime) -> Result<(), LeafProblem> {
        if now > self.not_after {
            return Err(LeafProblem::Expired(
                humantime::format_rfc3339_seconds(self.not_after).to_string(),
            ));
        }
        if now < self.not_before {
            return Err(LeafProblem::NotYetValid(
                humantime::format_rfc3339_seconds(self.not_before).to_string(),
            ));
        }
        Ok(())
    }
}
