//! Trust scoped by trust domain: a SPIFFE bundle set, one set of CA certificates per trust domain,
//! each of which anchors the identities of its own domain only. A CA of `partner.example` can
//! never vouch for `spiffe://cluster.local/...`, however the bundles are written.
//!
//! Our own domain's CAs come with the identity (`ca.crt`, the trust bundle file, or the Workload
//! API's bundle of our domain); other domains' from SPIRE's federated bundles and from
//! `--trust-bundles PATH`, which is either
//! - a directory of `<trust-domain>.pem` (PEM certificates) and `<trust-domain>.json` (one SPIFFE
//!   bundle) files; names starting with `.` are skipped (a mounted ConfigMap's `..data`), any other
//!   name is an error; or
//! - a JSON file: a map of trust domain (`partner.example` or `spiffe://partner.example`) to SPIFFE
//!   bundle, or one SPIFFE bundle in a file named `<trust-domain>.json`.
//!
//! A SPIFFE bundle is the JWK Set of the SPIFFE Trust Domain and Bundle specification: its `keys`
//! with `use: "x509-svid"` carry one CA certificate each (`x5c`: one base64 DER certificate); keys
//! of another `use` (`jwt-svid`) are ignored, as the specification requires. A domain whose sources
//! hold no CA certificate, an `x509-svid` key that is not exactly one certificate, a domain given
//! twice in one source: errors, never guesses.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use rustls::{DistinguishedName, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use super::is_trust_domain;

/// CA certificates by trust domain, as read from a source.
pub type Authorities = BTreeMap<String, Vec<CertificateDer<'static>>>;

/// Bundles are configuration: a file larger than this is a mistake, not a bundle.
pub(crate) const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// And a directory with more entries than this.
pub(crate) const MAX_DIR_ENTRIES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(
        "cannot read the trust bundles {path}: {error}; fix --trust-bundles or mount the bundles there"
    )]
    Read { path: String, error: String },
    #[error("the trust bundles {path} are larger than {limit} {what}; give only trust bundles")]
    TooLarge {
        path: String,
        limit: u64,
        what: &'static str,
    },
    #[error(
        "{path}: `{name}` is not a bundle file: name each one <trust-domain>.pem (PEM certificates) or <trust-domain>.json (a SPIFFE bundle)"
    )]
    Entry { path: String, name: String },
    #[error(
        "{from}: `{name}` is not a SPIFFE trust domain (lower-case letters, digits, `.`, `-`, `_`)"
    )]
    TrustDomain { from: String, name: String },
    #[error("{from}: trust domain {domain} is given twice; give each trust domain one bundle")]
    Twice { from: String, domain: String },
    #[error("{from} holds no CA certificate for trust domain {domain}")]
    Empty { from: String, domain: String },
    #[error("{from} is not a SPIFFE bundle: {problem}")]
    Json { from: String, problem: String },
    #[error(
        "{from}: one SPIFFE bundle does not say which trust domain it is for: name the file <trust-domain>.json, or write {{\"<trust-domain>\": <bundle>, ...}}"
    )]
    Unnamed { from: String },
    #[error("{from}: keys[{index}] of trust domain {domain}: {problem}")]
    Key {
        from: String,
        domain: String,
        index: usize,
        problem: String,
    },
    #[error("{from}: a CA certificate of trust domain {domain} is unusable: {error}")]
    Anchor {
        from: String,
        domain: String,
        error: String,
    },
}

/// Reads `--trust-bundles`: a directory of bundle files, or one JSON file.
pub(crate) fn read(path: &Path) -> Result<Authorities, BundleError> {
    let shown = path.display().to_string();
    let read_error = |error: std::io::Error| BundleError::Read {
        path: shown.clone(),
        error: error.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_dir() {
        let text = read_file(path)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        return parse_json(&text, name.as_deref().and_then(domain_of_json), &shown);
    }
    let mut out = Authorities::new();
    for (name, file) in entries(path)? {
        let from = file.display().to_string();
        let (domain, certificates) = if let Some(domain) = name.strip_suffix(".pem") {
            (domain, pem_certificates(&read_file(&file)?))
        } else if let Some(domain) = name.strip_suffix(".json") {
            let bundle =
                serde_json::from_slice(&read_file(&file)?).map_err(|e| BundleError::Json {
                    from: from.clone(),
                    problem: e.to_string(),
                })?;
            (domain, jwks(&bundle, domain, &from)?)
        } else {
            return Err(BundleError::Entry { path: shown, name });
        };
        if !is_trust_domain(domain) {
            return Err(BundleError::Entry { path: shown, name });
        }
        if certificates.is_empty() {
            return Err(BundleError::Empty {
                from,
                domain: domain.to_owned(),
            });
        }
        if out.insert(domain.to_owned(), certificates).is_some() {
            return Err(BundleError::Twice {
                from: shown,
                domain: domain.to_owned(),
            });
        }
    }
    Ok(out)
}

/// The bundle files of a directory (names not starting with `.`), sorted by name.
fn entries(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, BundleError> {
    let shown = dir.display().to_string();
    let read_error = |error: std::io::Error| BundleError::Read {
        path: shown.clone(),
        error: error.to_string(),
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if out.len() == MAX_DIR_ENTRIES {
            return Err(BundleError::TooLarge {
                path: shown,
                limit: MAX_DIR_ENTRIES as u64,
                what: "files",
            });
        }
        out.push((name, entry.path()));
    }
    out.sort();
    Ok(out)
}

fn read_file(path: &Path) -> Result<Vec<u8>, BundleError> {
    use std::io::Read as _;
    let shown = || path.display().to_string();
    let file = std::fs::File::open(path).map_err(|e| BundleError::Read {
        path: shown(),
        error: e.to_string(),
    })?;
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| BundleError::Read {
            path: shown(),
            error: e.to_string(),
        })?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(BundleError::TooLarge {
            path: shown(),
            limit: MAX_FILE_BYTES,
            what: "bytes",
        });
    }
    Ok(text)
}

fn pem_certificates(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// `partner.example.json` -> `partner.example`.
fn domain_of_json(file_name: &str) -> Option<&str> {
    file_name
        .strip_suffix(".json")
        .filter(|d| is_trust_domain(d))
}

/// A JSON bundle file: a map of trust domain to SPIFFE bundle, or one SPIFFE bundle (a JWK Set:
/// `keys` is an array) for `named`, the trust domain its file name gives.
pub(crate) fn parse_json(
    text: &[u8],
    named: Option<&str>,
    from: &str,
) -> Result<Authorities, BundleError> {
    let json = |problem: String| BundleError::Json {
        from: from.to_owned(),
        problem,
    };
    let value: Value = serde_json::from_slice(text).map_err(|e| json(e.to_string()))?;
    let Value::Object(map) = &value else {
        return Err(json("expected a JSON object".into()));
    };
    if map.get("keys").is_some_and(Value::is_array) {
        let domain = named.ok_or_else(|| BundleError::Unnamed {
            from: from.to_owned(),
        })?;
        let certificates = jwks(&value, domain, from)?;
        return Ok(Authorities::from([(domain.to_owned(), certificates)]));
    }
    let mut out = Authorities::new();
    for (key, bundle) in map {
        let domain = key.strip_prefix("spiffe://").unwrap_or(key);
        if !is_trust_domain(domain) {
            return Err(BundleError::TrustDomain {
                from: from.to_owned(),
                name: key.clone(),
            });
        }
        let certificates = jwks(bundle, domain, from)?;
        if out.insert(domain.to_owned(), certificates).is_some() {
            return Err(BundleError::Twice {
                from: from.to_owned(),
                domain: domain.to_owned(),
            });
        }
    }
    if out.is_empty() {
        return Err(json("no trust domain in it".into()));
    }
    Ok(out)
}

/// The CA certificates of one SPIFFE bundle (the `x509-svid` keys of a JWK Set); at least one.
fn jwks(
    bundle: &Value,
    domain: &str,
    from: &str,
) -> Result<Vec<CertificateDer<'static>>, BundleError> {
    let Some(keys) = bundle.get("keys").and_then(Value::as_array) else {
        return Err(BundleError::Json {
            from: from.to_owned(),
            problem: format!("the bundle of trust domain {domain} has no `keys` array (a JWK Set)"),
        });
    };
    let mut out = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        if key.get("use").and_then(Value::as_str) != Some("x509-svid") {
            continue;
        }
        let problem = |problem: &str| BundleError::Key {
            from: from.to_owned(),
            domain: domain.to_owned(),
            index,
            problem: problem.to_owned(),
        };
        let x5c = match key.get("x5c").and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(one)]) => one,
            _ => {
                return Err(problem(
                    "an x509-svid key's `x5c` must hold exactly one base64 DER certificate",
                ));
            }
        };
        let der = base64::engine::general_purpose::STANDARD
            .decode(x5c)
            .map_err(|e| problem(&format!("`x5c` is not base64 ({e})")))?;
        out.push(CertificateDer::from(der));
    }
    if out.is_empty() {
        return Err(BundleError::Empty {
            from: from.to_owned(),
            domain: domain.to_owned(),
        });
    }
    Ok(out)
}

/// Adds `more` to `into`, domain by domain (two sources of one domain: both sets of CAs).
pub(crate) fn merge(into: &mut Authorities, more: Authorities) {
    for (domain, certificates) in more {
        into.entry(domain).or_default().extend(certificates);
    }
}

/// What identifies a version of `--trust-bundles` for the poller: each file's name, modification
/// time and size (`None` where unreadable). A mounted ConfigMap swaps its `..data` symlink: the
/// files seen through it change time.
pub(crate) fn stamps(path: &Path) -> Vec<(String, Option<(SystemTime, u64)>)> {
    let stamp = |p: &Path| {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => entries(path)
            .map(|files| {
                files
                    .into_iter()
                    .map(|(name, file)| (name, stamp(&file)))
                    .collect()
            })
            .unwrap_or_default(),
        _ => vec![(String::new(), stamp(path))],
    }
}

/// The bundle set in use: the CAs of each trust domain, as rustls root stores.
#[derive(Debug)]
pub struct BundleSet {
    trust_domain: String,
    ours: Arc<RootCertStore>,
    /// Every domain's, ours included.
    roots: BTreeMap<String, Arc<RootCertStore>>,
    /// Every domain's CA subjects: the names a server sends in its certificate request.
    hints: Vec<DistinguishedName>,
}

/// The CAs of `domain`, read from `from`, as a root store; at least one.
fn store(
    domain: &str,
    certificates: Vec<CertificateDer<'static>>,
    from: &str,
) -> Result<Arc<RootCertStore>, BundleError> {
    if certificates.is_empty() {
        return Err(BundleError::Empty {
            from: from.to_owned(),
            domain: domain.to_owned(),
        });
    }
    let mut store = RootCertStore::empty();
    for certificate in certificates {
        store.add(certificate).map_err(|e| BundleError::Anchor {
            from: from.to_owned(),
            domain: domain.to_owned(),
            error: e.to_string(),
        })?;
    }
    Ok(Arc::new(store))
}

impl BundleSet {
    /// Our trust domain's CAs (`own`, from `own_from`) and other domains' (`others`, from
    /// `others_from`; our own domain among them adds to `own`).
    pub fn new(
        trust_domain: &str,
        mut own: Vec<CertificateDer<'static>>,
        own_from: &str,
        mut others: Authorities,
        others_from: &str,
    ) -> Result<BundleSet, BundleError> {
        own.extend(others.remove(trust_domain).unwrap_or_default());
        let ours = store(trust_domain, own, own_from)?;
        let mut roots = BTreeMap::from([(trust_domain.to_owned(), ours.clone())]);
        for (domain, certificates) in others {
            let store = store(&domain, certificates, others_from)?;
            roots.insert(domain, store);
        }
        let hints = roots.values().flat_map(|store| store.subjects()).collect();
        Ok(BundleSet {
            trust_domain: trust_domain.to_owned(),
            ours,
            roots,
            hints,
        })
    }

    /// Our trust domain's CAs.
    pub(crate) fn ours(&self) -> &Arc<RootCertStore> {
        &self.ours
    }

    /// Our trust domain.
    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CAs of `domain`, if it has a bundle.
    pub(crate) fn roots(&self, domain: &str) -> Option<&Arc<RootCertStore>> {
        self.roots.get(domain)
    }

    /// Every trust domain with a bundle, and its CAs.
    pub(crate) fn domains(&self) -> impl Iterator<Item = (&str, &Arc<RootCertStore>)> {
        self.roots.iter().map(|(d, r)| (d.as_str(), r))
    }

    pub(crate) fn hints(&self) -> &[DistinguishedName] {
        &self.hints
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed CA's DER, made with rcgen.
    fn ca(name: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("CA").der().to_vec()
    }

    fn pem(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        )
    }

    fn jwk(der: &[u8]) -> Value {
        serde_json::json!({
            "use": "x509-svid",
            "kty": "EC",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(der)],
        })
    }

    fn ders(a: &Authorities, domain: &str) -> Vec<Vec<u8>> {
        a.get(domain)
            .map(|v| v.iter().map(|c| c.to_vec()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn a_directory_of_pem_and_json_files() {
        let (partner, other, rotated) = (ca("partner"), ca("other"), ca("rotated"));
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("partner.example.pem"),
            pem(&partner) + &pem(&rotated),
        )
        .expect("write");
        let bundle = serde_json::json!({
            "spiffe_sequence": 3,
            "keys": [{"use": "jwt-svid", "kty": "EC", "kid": "k"}, jwk(&other)],
        });
        std::fs::write(dir.path().join("other.org.json"), bundle.to_string()).expect("write");
        // What a mounted ConfigMap has besides its keys.
        std::fs::create_dir(dir.path().join("..2026_01_01")).expect("mkdir");
        std::fs::write(dir.path().join(".hidden"), "x").expect("write");

        let read = read(dir.path()).expect("reads");
        assert_eq!(
            read.keys().collect::<Vec<_>>(),
            ["other.org", "partner.example"]
        );
        assert_eq!(ders(&read, "partner.example"), [partner, rotated]);
        assert_eq!(ders(&read, "other.org"), [other]);
    }

    #[test]
    fn directory_mistakes_are_named() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("README.md", b"hi", "`README.md` is not a bundle file"),
            ("Partner.pem", b"", "`Partner.pem` is not a bundle file"),
            (
                "partner.example.pem",
                b"no pem here",
                "holds no CA certificate for trust domain partner.example",
            ),
            (
                "p.json",
                b"{\"keys\": []}",
                "holds no CA certificate for trust domain p",
            ),
            ("p.json", b"[1]", "is not a SPIFFE bundle"),
        ];
        for (name, content, wanted) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join(name), content).expect("write");
            let err = read(dir.path()).expect_err(name).to_string();
            assert!(err.contains(wanted), "{name}: {err}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("p.pem"), pem(&ca("a"))).expect("write");
        std::fs::write(
            dir.path().join("p.json"),
            serde_json::json!({"keys": [jwk(&ca("b"))]}).to_string(),
        )
        .expect("write");
        let err = read(dir.path()).expect_err("twice").to_string();
        assert!(err.contains("trust domain p is given twice"), "{err}");
        let err = read(&dir.path().join("absent"))
            .expect_err("absent")
            .to_string();
        assert!(err.contains("cannot read the trust bundles"), "{err}");
    }

    #[test]
    fn json_files_map_or_one_named_bundle() {
        let (partner, other) = (ca("partner"), ca("other"));
        let map = serde_json::json!({
            "spiffe://partner.example": {"keys": [jwk(&partner)]},
            "other.org": {"keys": [jwk(&other)], "spiffe_refresh_hint": 60},
        })
        .to_string();
        let read = parse_json(map.as_bytes(), None, "bundles.json").expect("a map");
        assert_eq!(
            ders(&read, "partner.example"),
            std::slice::from_ref(&partner)
        );
        assert_eq!(ders(&read, "other.org"), [other]);

        let one = serde_json::json!({"keys": [jwk(&partner)]}).to_string();
        let read = parse_json(one.as_bytes(), Some("partner.example"), "x").expect("named");
        assert_eq!(
            ders(&read, "partner.example"),
            std::slice::from_ref(&partner)
        );
        let err = parse_json(one.as_bytes(), None, "bundle.json").expect_err("unnamed");
        assert!(
            err.to_string()
                .contains("name the file <trust-domain>.json"),
            "{err}"
        );
        assert_eq!(
            domain_of_json("partner.example.json"),
            Some("partner.example")
        );
        assert_eq!(domain_of_json("bundle.JSON"), None);

        let b64 = base64::engine::general_purpose::STANDARD.encode(&partner);
        for (bundle, wanted) in [
            (
                serde_json::json!({"Bad/Domain": {"keys": []}}),
                "`Bad/Domain` is not a SPIFFE trust domain",
            ),
            (
                serde_json::json!({"p.example": {"keys": [{"use": "x509-svid", "x5c": [b64, b64]}]}}),
                "keys[0] of trust domain p.example: an x509-svid key's `x5c` must hold exactly one",
            ),
            (
                serde_json::json!({"p.example": {"keys": [{"use": "x509-svid", "x5c": ["***"]}]}}),
                "`x5c` is not base64",
            ),
            (
                serde_json::json!({"p.example": {"keys": [{"use": "jwt-svid"}]}}),
                "holds no CA certificate for trust domain p.example",
            ),
            (serde_json::json!({"p.example": {}}), "has no `keys` array"),
            (
                serde_json::json!({"p.example": {"keys": [jwk(&partner)]}, "spiffe://p.example": {"keys": [jwk(&partner)]}}),
                "trust domain p.example is given twice",
            ),
            (serde_json::json!({}), "no trust domain in it"),
        ] {
            let err = parse_json(bundle.to_string().as_bytes(), None, "b.json")
                .expect_err(wanted)
                .to_string();
            assert!(err.contains(wanted), "{err}");
        }
    }

    #[test]
    fn the_set_has_one_store_per_domain_and_ours_takes_both_sources() {
        let (ours, extra, partner) = (ca("ours"), ca("extra"), ca("partner"));
        let others = Authorities::from([
            (
                "cluster.local".to_owned(),
                vec![CertificateDer::from(extra)],
            ),
            (
                "partner.example".to_owned(),
                vec![CertificateDer::from(partner)],
            ),
        ]);
        let set = BundleSet::new(
            "cluster.local",
            vec![CertificateDer::from(ours)],
            "ca.crt",
            others,
            "bundles",
        )
        .expect("set");
        assert_eq!(set.trust_domain(), "cluster.local");
        assert_eq!(set.roots("cluster.local").map(|r| r.len()), Some(2));
        assert_eq!(set.roots("partner.example").map(|r| r.len()), Some(1));
        assert!(set.roots("other.org").is_none());
        assert_eq!(set.hints().len(), 3);
        let err = BundleSet::new(
            "cluster.local",
            Vec::new(),
            "ca.crt",
            Authorities::new(),
            "b",
        )
        .expect_err("empty")
        .to_string();
        assert!(
            err.contains("ca.crt holds no CA certificate for trust domain cluster.local"),
            "{err}"
        );
        let bad = Authorities::from([(
            "p.example".to_owned(),
            vec![CertificateDer::from(vec![1, 2, 3])],
        )]);
        let err = BundleSet::new(
            "cluster.local",
            vec![CertificateDer::from(ca("x"))],
            "ca.crt",
            bad,
            "b",
        )
        .expect_err("bad anchor")
        .to_string();
        assert!(
            err.contains("a CA certificate of trust domain p.example is unusable"),
            "{err}"
        );
    }
}
