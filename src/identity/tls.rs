//! rustls configurations for HBONE, as Istio's ztunnel makes them: TLS 1.3 only, the two AES-GCM
//! suites, ALPN exactly `h2`, a client certificate always required, no SNI, no resumption, and
//! peers identified only by the SPIFFE ID in their certificate's URI SAN.
//!
//! Both verifiers read the peer's SPIFFE ID first and check the chain with webpki against the CAs
//! of that ID's trust domain only ([`BundleSet`]; a domain without a bundle is refused): a CA of one
//! domain never vouches for another's identities. A name check is meaningless here (the client
//! sends no SNI). The server then accepts a client of any domain it has a bundle for (the policy
//! decides what each may reach); the client accepts the server `--peer-identities` names for the
//! address, else any server of our own trust domain.
//!
//! Every refusal carries a [`HandshakeFailure`], read back by [`failure`] for the logs and metrics.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use super::SpiffeId;
use super::bundles::BundleSet;
use super::leaf::leaf;
use crate::error::HandshakeFailure;

/// The only ALPN protocol HBONE speaks.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// ring, restricted to ztunnel's suites (no ChaCha20).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

/// The server side: our certificate, and a client certificate required, of a trust domain we have
/// a bundle for and chaining to that domain's CAs.
pub(crate) fn server_config(
    key: Arc<CertifiedKey>,
    bundles: Arc<BundleSet>,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(BundleClientVerifier::new(bundles, &provider)?);
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients (ztunnel, us) never resume: tickets would be wasted work.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The client side: our certificate, and the server's identity checked (`expected` when known,
/// else any of our trust domain).
pub fn client_config(
    key: Arc<CertifiedKey>,
    bundles: Arc<BundleSet>,
    expected: Option<SpiffeId>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        bundles,
        algorithms: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID of a peer whose certificate the handshake already verified (against the bundle
/// of that ID's trust domain).
pub(crate) fn peer_id(certificates: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let first = certificates?.first()?;
    leaf(first).ok().map(|l| l.id)
}

/// A peer refused by one of our checks: which, and why in words.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub(crate) struct Refused {
    pub(crate) failure: HandshakeFailure,
    pub(crate) detail: String,
}

fn refused(failure: HandshakeFailure, detail: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused {
        failure,
        detail,
    }))))
}

/// Which check failed a handshake, and why in words, from an error that carries a rustls error
/// (an `io::Error` of tokio-rustls, a hyper error over one); `None` when there is none inside.
pub(crate) fn failure(
    error: &(dyn std::error::Error + 'static),
) -> Option<(HandshakeFailure, String)> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<Error>() {
            return Some(classify(tls));
        }
        // io::Error's `source` skips the error it wraps.
        next = match error.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    None
}

fn classify(error: &Error) -> (HandshakeFailure, String) {
    use HandshakeFailure as F;
    let failure = match error {
        Error::InvalidCertificate(CertificateError::Other(other)) => {
            if let Some(ours) = other.0.downcast_ref::<Refused>() {
                return (ours.failure, ours.detail.clone());
            }
            F::BadCertificate
        }
        Error::InvalidCertificate(problem) => chain_failure(problem),
        Error::NoCertificatesPresented => F::NoCertificate,
        Error::NoApplicationProtocol => F::NoAlpnH2,
        Error::AlertReceived(_) => F::RefusedByPeer,
        _ => F::Protocol,
    };
    let detail = match failure {
        F::RefusedByPeer => format!("the peer refused the handshake ({error})"),
        F::NoAlpnH2 => "the peer does not offer ALPN h2".into(),
        _ => error.to_string(),
    };
    (failure, detail)
}

/// What webpki's verdict on a chain means.
fn chain_failure(problem: &CertificateError) -> HandshakeFailure {
    use CertificateError as C;
    match problem {
        C::UnknownIssuer | C::BadSignature => HandshakeFailure::UnknownCa,
        C::Expired | C::ExpiredContext { .. } => HandshakeFailure::Expired,
        C::NotValidYet | C::NotValidYetContext { .. } => HandshakeFailure::NotYetValid,
        _ => HandshakeFailure::BadCertificate,
    }
}

/// The peer's SPIFFE ID, once `verify` (webpki, usage included) accepted its chain against the
/// CAs of the ID's own trust domain.
fn verify_peer(
    bundles: &BundleSet,
    end_entity: &CertificateDer<'_>,
    verify: impl Fn(&str, &Arc<RootCertStore>) -> Result<(), Error>,
) -> Result<SpiffeId, Error> {
    let id = leaf(end_entity)
        .map_err(|p| {
            refused(
                HandshakeFailure::BadCertificate,
                format!("the peer's certificate {p}"),
            )
        })?
        .id;
    let domain = id.trust_domain.as_str();
    let Some(roots) = bundles.roots(domain) else {
        return Err(refused(
            HandshakeFailure::UnknownTrustDomain,
            format!(
                "the peer is {id}, and there is no trust bundle for trust domain {domain} (--trust-bundles)"
            ),
        ));
    };
    match verify(domain, roots) {
        Ok(()) => Ok(id),
        Err(Error::InvalidCertificate(problem)) => {
            let failure = chain_failure(&problem);
            if failure == HandshakeFailure::UnknownCa
                && let Some(signer) = bundles
                    .domains()
                    .find(|(other, roots)| *other != domain && verify(other, roots).is_ok())
                    .map(|(other, _)| other)
            {
                // Worth naming: a CA trusted for one domain trying to mint another's identities.
                return Err(refused(
                    HandshakeFailure::WrongTrustDomain,
                    format!(
                        "the peer claims {id}, but its certificate is signed by a CA of trust domain {signer}, which vouches only for {signer}"
                    ),
                ));
            }
            Err(refused(
                failure,
                format!(
                    "the peer's certificate ({id}) does not verify against the CAs of {domain}: {problem}"
                ),
            ))
        }
        Err(other) => Err(other),
    }
}

/// Each trust domain's webpki client verifier; a client is checked by the one of its own domain.
#[derive(Debug)]
struct BundleClientVerifier {
    bundles: Arc<BundleSet>,
    chains: Vec<(String, Arc<dyn ClientCertVerifier>)>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl BundleClientVerifier {
    fn new(
        bundles: Arc<BundleSet>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<BundleClientVerifier, Error> {
        let mut chains = Vec::new();
        for (domain, roots) in bundles.domains() {
            let chain =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| Error::General(format!("client verifier of {domain}: {e}")))?;
            chains.push((domain.to_owned(), chain));
        }
        Ok(BundleClientVerifier {
            bundles,
            chains,
            algorithms: provider.signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.bundles.hints()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_peer(&self.bundles, end_entity, |domain, _| {
            match self.chains.iter().find(|(d, _)| d == domain) {
                Some((_, chain)) => chain
                    .verify_client_cert(end_entity, intermediates, now)
                    .map(|_| ()),
                None => Err(Error::InvalidCertificate(CertificateError::UnknownIssuer)),
            }
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configuration allows TLS 1.3 only: a TLS 1.2 handshake never gets here.
        Err(Error::General("TLS 1.2 is not accepted on HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// webpki's chain check without a name (no SNI: a pod has no name to check) against the server's
/// own trust domain, then the identity: the expected one, else one of our trust domain.
#[derive(Debug)]
struct SpiffeServerVerifier {
    bundles: Arc<BundleSet>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Option<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let found = verify_peer(&self.bundles, end_entity, |_, roots| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &parsed,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )
        })?;
        match &self.expected {
            Some(expected) if *expected != found => Err(refused(
                HandshakeFailure::UnexpectedIdentity,
                format!("the server is {found}, expected {expected} (--peer-identities)"),
            )),
            None if found.trust_domain != self.bundles.trust_domain() => Err(refused(
                HandshakeFailure::WrongTrustDomain,
                format!(
                    "the server is {found}, of trust domain {}: a server of another trust domain than ours ({}) is accepted only where --peer-identities names it",
                    found.trust_domain,
                    self.bundles.trust_domain()
                ),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // The configuration allows TLS 1.3 only: a TLS 1.2 handshake never gets here.
        Err(Error::General("TLS 1.2 is not accepted on HBONE".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::bundles::Authorities;
    use crate::identity::issue::{Pem, issue, make_ca};
    use rustls_pki_types::pem::PemObject;
    use time::{Duration, OffsetDateTime};

    const OURS: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const PARTNER: &str = "spiffe://partner.example/ns/shop/sa/frontend";

    fn ca(trust_domain: &str) -> Pem {
        make_ca(trust_domain, 30, OffsetDateTime::now_utc()).expect("CA")
    }

    fn der(pem: &Pem) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.cert.as_bytes()).expect("PEM")
    }

    /// A leaf for `id` from `ca`, valid from `days_ago` for a day.
    fn leaf(ca: &Pem, id: &str, days_ago: i64) -> CertificateDer<'static> {
        let from = OffsetDateTime::now_utc() - Duration::days(days_ago);
        let id = id.parse().expect("id");
        der(&issue(ca, std::path::Path::new("ca"), &id, 1, from).expect("leaf"))
    }

    /// Our CA for cluster.local; for partner.example, the partner's CA and a rogue one of the
    /// partner's that claims cluster.local.
    fn bundles(ours: &Pem, partner: &Pem, rogue: &Pem) -> Arc<BundleSet> {
        let others =
            Authorities::from([("partner.example".to_owned(), vec![der(partner), der(rogue)])]);
        let set = BundleSet::new(
            "cluster.local",
            vec![der(ours)],
            "ca.crt",
            others,
            "bundles",
        )
        .expect("bundle set");
        Arc::new(set)
    }

    fn reason(result: Result<(), Error>) -> Option<HandshakeFailure> {
        result
            .err()
            .and_then(|e| failure(&e).map(|(reason, _)| reason))
    }

    fn as_client(bundles: &Arc<BundleSet>, leaf: &CertificateDer<'_>) -> Result<(), Error> {
        let verifier = BundleClientVerifier::new(bundles.clone(), &provider()).expect("verifier");
        verifier
            .verify_client_cert(leaf, &[], UnixTime::now())
            .map(|_| ())
    }

    fn as_server(
        bundles: &Arc<BundleSet>,
        leaf: &CertificateDer<'_>,
        expected: Option<&str>,
    ) -> Result<(), Error> {
        let verifier = SpiffeServerVerifier {
            bundles: bundles.clone(),
            algorithms: provider().signature_verification_algorithms,
            expected: expected.map(|e| e.parse().expect("id")),
        };
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        verifier
            .verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn each_trust_domain_is_anchored_by_its_own_cas_only() {
        use HandshakeFailure as F;
        let (ours, partner, rogue) = (
            ca("cluster.local"),
            ca("partner.example"),
            ca("cluster.local"),
        );
        let set = bundles(&ours, &partner, &rogue);
        let our_leaf = leaf(&ours, OURS, 0);
        let forged = leaf(&rogue, OURS, 0);
        let partner_leaf = leaf(&partner, PARTNER, 0);
        let unknown = leaf(&ca("cluster.local"), OURS, 0);
        let no_bundle = leaf(&ca("other.org"), "spiffe://other.org/ns/a/sa/b", 0);
        let expired = leaf(&ours, OURS, 3);
        // A CA's certificate: its URI SAN (spiffe://cluster.local) is no workload ID.
        let no_workload = der(&ours);

        // (certificate, as the HBONE server judges a client, as the client judges a server)
        let cases = [
            (&our_leaf, None, None),
            (
                &forged,
                Some(F::WrongTrustDomain),
                Some(F::WrongTrustDomain),
            ),
            (&partner_leaf, None, Some(F::WrongTrustDomain)),
            (&unknown, Some(F::UnknownCa), Some(F::UnknownCa)),
            (
                &no_bundle,
                Some(F::UnknownTrustDomain),
                Some(F::UnknownTrustDomain),
            ),
            (&expired, Some(F::Expired), Some(F::Expired)),
            (
                &no_workload,
                Some(F::BadCertificate),
                Some(F::BadCertificate),
            ),
        ];
        for (i, (leaf, client, server)) in cases.into_iter().enumerate() {
            assert_eq!(
                reason(as_client(&set, leaf)),
                client,
                "case {i} as a client"
            );
            assert_eq!(
                reason(as_server(&set, leaf, None)),
                server,
                "case {i} as a server"
            );
        }
        let err = as_client(&set, &forged).expect_err("forged");
        let (_, detail) = failure(&err).expect("ours");
        assert!(
            detail.contains("claims spiffe://cluster.local/ns/shop/sa/frontend")
                && detail.contains("signed by a CA of trust domain partner.example"),
            "{detail}"
        );
    }

    #[test]
    fn a_pin_admits_its_identity_only_of_whatever_domain() {
        use HandshakeFailure as F;
        let (ours, partner, rogue) = (
            ca("cluster.local"),
            ca("partner.example"),
            ca("cluster.local"),
        );
        let set = bundles(&ours, &partner, &rogue);
        let partner_leaf = leaf(&partner, PARTNER, 0);
        let our_leaf = leaf(&ours, OURS, 0);
        let other_of_ours = "spiffe://cluster.local/ns/shop/sa/backend";
        assert_eq!(reason(as_server(&set, &partner_leaf, Some(PARTNER))), None);
        assert_eq!(reason(as_server(&set, &our_leaf, Some(OURS))), None);
        assert_eq!(
            reason(as_server(&set, &our_leaf, Some(other_of_ours))),
            Some(F::UnexpectedIdentity)
        );
        assert_eq!(
            reason(as_server(&set, &partner_leaf, Some(OURS))),
            Some(F::UnexpectedIdentity)
        );
        // A pin never stands in for the chain: a forged certificate of the pinned ID is refused.
        let forged = leaf(&rogue, OURS, 0);
        assert_eq!(
            reason(as_server(&set, &forged, Some(OURS))),
            Some(F::WrongTrustDomain)
        );
    }

    #[test]
    fn other_tls_failures_are_named() {
        use HandshakeFailure as F;
        let io = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let cases = [
            (Error::NoCertificatesPresented, F::NoCertificate),
            (Error::NoApplicationProtocol, F::NoAlpnH2),
            (
                Error::AlertReceived(rustls::AlertDescription::BadCertificate),
                F::RefusedByPeer,
            ),
            (Error::DecryptError, F::Protocol),
            (
                Error::InvalidCertificate(CertificateError::UnknownIssuer),
                F::UnknownCa,
            ),
        ];
        for (error, wanted) in cases {
            let wrapped = io(error);
            assert_eq!(failure(&wrapped).map(|(r, _)| r), Some(wanted), "{wrapped}");
        }
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(failure(&plain), None);
    }
}
