//! rustls configurations for HBONE, as Istio's ztunnel makes them: TLS 1.3 only, the two AES-GCM
//! suites, ALPN exactly `h2`, a client certificate always required, no SNI, no resumption, and
//! peers identified only by the SPIFFE ID in their certificate's URI SAN.
//!
//! Both verifiers first check the chain with webpki against our trust bundle (a name check is
//! meaningless here: the client sends no SNI), then the SPIFFE ID: of our trust domain, and for
//! a server whose identity is known (`--peer-identities`), exactly that one.

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
use super::material::leaf;

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// ring, restricted to ztunnel's suites (no ChaCha20).
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

/// The server side: our certificate, and a client certificate of our trust domain required.
pub fn server_config(
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let chain = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let verifier = Arc::new(TrustDomainClientVerifier {
        chain,
        trust_domain: trust_domain.to_owned(),
    });
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
    roots: Arc<RootCertStore>,
    trust_domain: &str,
    expected: Option<SpiffeId>,
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        algorithms: provider.signature_verification_algorithms,
        trust_domain: trust_domain.to_owned(),
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

/// The SPIFFE ID of a peer whose certificate the handshake already verified.
pub fn peer_id(
    certificates: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Option<SpiffeId> {
    let first = certificates?.first()?;
    leaf(first, trust_domain).ok().map(|l| l.id)
}

fn refused(problem: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(problem))))
}

#[derive(Debug, thiserror::Error)]
#[error("the server is {found}, expected {expected} (--peer-identities)")]
struct UnexpectedServer {
    found: SpiffeId,
    expected: SpiffeId,
}

/// webpki's chain check, then the trust domain of the client's SPIFFE ID.
#[derive(Debug)]
struct TrustDomainClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        leaf(end_entity, &self.trust_domain).map_err(refused)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// webpki's chain check without a name (no SNI: a pod has no name to check), then the SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
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
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let found = leaf(end_entity, &self.trust_domain).map_err(refused)?.id;
        match &self.expected {
            Some(expected) if *expected != found => Err(refused(UnexpectedServer {
                found,
                expected: expected.clone(),
            })),
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
