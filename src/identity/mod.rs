//! Workload identity: SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! the only form Istio's ztunnel accepts in a URI SAN (DNS and IP SANs are ignored), read from a
//! certificate by [`leaf`]; the material that proves it ([`material`]), watched for rotation
//! ([`source`]); the TLS configurations HBONE
//! uses ([`tls`]); the identities expected of peers ([`peers`]).

pub mod bundles;
pub mod leaf;
pub mod material;
pub mod peers;
pub mod source;
pub mod tls;

pub mod issue;
pub mod spire;

use std::fmt;
use std::str::FromStr;

/// A workload's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub(crate) trust_domain: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "`{0}` is not a workload SPIFFE ID: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct InvalidSpiffeId(pub String);

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let mut parts = rest.split('/');
        let (
            Some(trust_domain),
            Some("ns"),
            Some(namespace),
            Some("sa"),
            Some(service_account),
            None,
        ) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        )
        else {
            return Err(invalid());
        };
        // SPIFFE: path segments are letters, digits, `.`, `-`, `_` and never empty, `.` or `..`.
        let segment_ok = |seg: &str| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
        };
        if !is_trust_domain(trust_domain) || !segment_ok(namespace) || !segment_ok(service_account)
        {
            return Err(invalid());
        }
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }
}

/// Whether `name` is a SPIFFE trust domain name: lower-case letters, digits, `.`, `-`, `_`.
pub(crate) fn is_trust_domain(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/httpbin"
            .parse()
            .expect("valid");
        assert_eq!(id.trust_domain, "cluster.local");
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "httpbin");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/httpbin"
        );
    }

    #[test]
    fn other_forms_are_refused() {
        for bad in [
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/x/extra",
            "spiffe://Cluster.local/ns/default/sa/x",
            "spiffe:///ns/default/sa/x",
            "spiffe://cluster.local/ns/../sa/x",
            "https://cluster.local/ns/default/sa/x",
            "spiffe://cluster.local/sa/x/ns/default",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
