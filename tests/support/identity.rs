//! Workload identities for the mTLS tests, made with rcgen: a CA, and SPIFFE leaves it signs,
//! written in the `--identity-dir` layout or as a pod-certificate bundle.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// The workload identities the mTLS tests give their client and server sides, and a client of a
/// partner trust domain.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/backend";
pub const PARTNER_ID: &str = "spiffe://partner.example/ns/shop/sa/frontend";

/// A `--trust-bundles` directory at `dir` holding `<domain>.pem` with `ca`'s certificate.
pub fn bundle_dir(dir: &Path, domain: &str, ca: &Ca) -> String {
    std::fs::create_dir_all(dir).expect("bundle dir");
    std::fs::write(dir.join(format!("{domain}.pem")), ca.pem()).expect("write bundle");
    dir.display().to_string()
}

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf's PEM texts.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
    /// The key as PKCS#8 DER (what the SPIFFE Workload API sends).
    pub key_der: Vec<u8>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// A leaf for `uri` (a SPIFFE ID, or anything to test refusals), valid an hour either side of now.
    pub fn issue(&self, uri: &str) -> Leaf {
        let now = OffsetDateTime::now_utc();
        self.issue_valid(uri, now - Duration::hours(1), now + Duration::hours(1))
    }

    pub fn issue_valid(&self, uri: &str, from: OffsetDateTime, until: OffsetDateTime) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        params.subject_alt_names = vec![SanType::URI(uri.try_into().expect("an IA5 URI"))];
        // X509-SVID: a leaf says it is not a CA (the spiffe crate refuses one that does not).
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = from;
        params.not_after = until;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    /// `tls.crt`, `tls.key`, `ca.crt` in `dir`, each written whole then renamed into place (a
    /// reader never sees half a file, as with Kubernetes' atomic volume updates).
    pub fn write_dir(&self, dir: &Path, leaf: &Leaf) {
        write_identity(dir, leaf, &[self]);
    }
}

/// `tls.crt`, `tls.key` and a `ca.crt` of the CAs `trusts` (the first should have issued `leaf`)
/// in `dir`, as [`Ca::write_dir`] writes them.
pub fn write_identity(dir: &Path, leaf: &Leaf, trusts: &[&Ca]) {
    let bundle: String = trusts.iter().map(|ca| ca.pem()).collect();
    std::fs::create_dir_all(dir).expect("identity dir");
    for (name, text) in [
        ("tls.key", &leaf.key_pem),
        ("tls.crt", &leaf.cert_pem),
        ("ca.crt", &bundle),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write identity file");
        std::fs::rename(&tmp, dir.join(name)).expect("rename identity file");
    }
}
