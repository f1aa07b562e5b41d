//! `amazing-proxy identity ca` and `amazing-proxy identity issue`: a development CA and workload
//! identities in the `--identity-dir` layout (`tls.crt` leaf first, `tls.key`, `ca.crt`), for tests,
//! the demo and development. Production uses the user's own CA (cert-manager, SPIRE, Pod Certificates).
//!
//! What is made follows the X.509-SVID profile that Istio's ztunnel accepts: ECDSA P-256 keys, a leaf
//! whose only SAN is the workload's URI `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! with both serverAuth and clientAuth (one certificate serves both ends of HBONE), and a root CA whose
//! only SAN is `spiffe://<trust-domain>`. The CA directory holds `ca.crt` and `ca.key`; the leaf's
//! chain is the leaf alone because the CA is the root that peers trust.
//!
//! Files are never overwritten unless asked (`--force`): a CA key replaced by mistake invalidates
//! every identity it issued. Each file is written whole to a new file beside it (created
//! exclusively, never through a symlink), then renamed into place: a symlink at the target is
//! replaced, never followed, and a key is mode 0600 whatever was there before and whatever the
//! umask.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use super::SpiffeId;

/// Default lifetimes: a development CA outlives many rotations of the identities it issues.
pub(crate) const CA_DAYS: u32 = 3650;
pub(crate) const WORKLOAD_DAYS: u32 = 30;
/// Certificates start this long before "now": clocks of two nodes differ.
const BACKDATE: Duration = Duration::minutes(5);

/// File names of the CA directory and of the `--identity-dir` layout.
pub(crate) const CA_CERT: &str = "ca.crt";
pub(crate) const CA_KEY: &str = "ca.key";
pub(crate) const TLS_CERT: &str = "tls.crt";
pub(crate) const TLS_KEY: &str = "tls.key";

#[derive(Subcommand, Clone, Debug)]
pub enum IdentityCommand {
    /// Make a development CA (ca.crt, ca.key) for one trust domain.
    Ca(CaArgs),
    /// Issue a workload identity signed by a CA from `identity ca`, in the --identity-dir layout
    /// (tls.crt, tls.key, ca.crt).
    Issue(IssueArgs),
}

#[derive(Args, Clone, Debug)]
pub struct CaArgs {
    /// Directory to write ca.crt and ca.key to (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// The trust domain whose identities this CA signs.
    #[arg(long, default_value = "cluster.local")]
    pub(crate) trust_domain: String,
    /// Days the CA is valid.
    #[arg(long, default_value_t = CA_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub(crate) days: u32,
    /// Replace existing files.
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Args, Clone, Debug)]
pub struct IssueArgs {
    /// Directory of a CA made by `identity ca` (ca.crt, ca.key).
    #[arg(long)]
    pub(crate) ca: PathBuf,
    /// The workload's identity: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
    #[arg(long)]
    pub(crate) spiffe_id: SpiffeId,
    /// Directory to write tls.crt, tls.key and ca.crt to (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Days the certificate is valid (never past the CA's own expiry).
    #[arg(long, default_value_t = WORKLOAD_DAYS, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub(crate) days: u32,
    /// Replace existing files.
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(
        "`{0}` is not a trust domain: use lower-case letters, digits, `.`, `-` and `_` (e.g. cluster.local)"
    )]
    TrustDomain(String),
    #[error(
        "cannot read {path}: {error}; pass the directory written by `amazing-proxy identity ca`"
    )]
    ReadCa {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{path} is not usable: {reason}; pass the directory written by `amazing-proxy identity ca`"
    )]
    BadCa { path: PathBuf, reason: String },
    #[error(
        "the CA in {ca} signs trust domain `{ca_domain}`, not `{wanted}`: issue an ID of `{ca_domain}` or make a CA with --trust-domain {wanted}"
    )]
    WrongTrustDomain {
        ca: PathBuf,
        ca_domain: String,
        wanted: String,
    },
    #[error("the CA in {0} has expired: make a new one with `amazing-proxy identity ca`")]
    CaExpired(PathBuf),
    #[error("{0} already exists: pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot generate the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A PEM-encoded certificate and its PKCS#8 private key.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

pub fn main(command: IdentityCommand) -> Result<(), IssueError> {
    match command {
        IdentityCommand::Ca(args) => {
            let ca = make_ca(&args.trust_domain, args.days, OffsetDateTime::now_utc())?;
            write_files(
                &args.out,
                &[(CA_CERT, &ca.cert, false), (CA_KEY, &ca.key, true)],
                args.force,
            )?;
            eprintln!(
                "amazing-proxy: wrote a CA for trust domain {} to {} ({CA_CERT}, {CA_KEY})",
                args.trust_domain,
                args.out.display()
            );
        }
        IdentityCommand::Issue(args) => {
            let ca = read_ca(&args.ca)?;
            let leaf = issue(
                &ca,
                &args.ca,
                &args.spiffe_id,
                args.days,
                OffsetDateTime::now_utc(),
            )?;
            write_files(
                &args.out,
                &[
                    (TLS_CERT, &leaf.cert, false),
                    (TLS_KEY, &leaf.key, true),
                    (CA_CERT, &ca.cert, false),
                ],
                args.force,
            )?;
            eprintln!(
                "amazing-proxy: wrote {} to {} ({TLS_CERT}, {TLS_KEY}, {CA_CERT})",
                args.spiffe_id,
                args.out.display()
            );
        }
    }
    Ok(())
}

/// A self-signed root CA for `trust_domain`, valid from just before `now` for `days`.
pub fn make_ca(trust_domain: &str, days: u32, now: OffsetDateTime) -> Result<Pem, IssueError> {
    // The same rule SpiffeId applies, checked through it so that the two cannot disagree.
    let probe = format!("spiffe://{trust_domain}/ns/x/sa/x");
    if probe.parse::<SpiffeId>().is_err() {
        return Err(IssueError::TrustDomain(trust_domain.to_owned()));
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "amazing-proxy development");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("amazing-proxy development CA for {trust_domain}"),
    );
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    // pathLen 0: this CA signs workloads only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days.into());
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let key_pem = key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(params, key)?;
    Ok(Pem {
        cert: ca.pem(),
        key: key_pem,
    })
}

/// Reads the CA of directory `dir` (ca.crt, ca.key).
pub(crate) fn read_ca(dir: &Path) -> Result<Pem, IssueError> {
    let read = |name: &str| {
        let path = dir.join(name);
        fs::read_to_string(&path).map_err(|error| IssueError::ReadCa { path, error })
    };
    Ok(Pem {
        cert: read(CA_CERT)?,
        key: read(CA_KEY)?,
    })
}

/// What issuing needs to know about the CA, read from its certificate.
struct CaFacts {
    trust_domain: String,
    not_after: OffsetDateTime,
}

fn ca_facts(cert_der: &[u8], path: &Path) -> Result<CaFacts, IssueError> {
    use x509_parser::extensions::GeneralName;
    let bad = |reason: String| IssueError::BadCa {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
    if !cert.is_ca() {
        return Err(bad("the certificate is not a CA".into()));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| bad(format!("malformed subjectAltName ({e})")))?;
    let trust_domain = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix("spiffe://").map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| bad("no spiffe://<trust-domain> URI SAN".into()))?;
    Ok(CaFacts {
        trust_domain,
        not_after: cert.validity().not_after.to_datetime(),
    })
}

/// A workload certificate for `id` signed by `ca` (read from `ca_dir`, named in errors), valid from
/// just before `now` for `days`, cut short at the CA's own expiry.
pub fn issue(
    ca: &Pem,
    ca_dir: &Path,
    id: &SpiffeId,
    days: u32,
    now: OffsetDateTime,
) -> Result<Pem, IssueError> {
    let cert_path = ca_dir.join(CA_CERT);
    let bad = |path: &Path, reason: String| IssueError::BadCa {
        path: path.to_owned(),
        reason,
    };
    let ca_der = CertificateDer::from_pem_slice(ca.cert.as_bytes())
        .map_err(|e| bad(&cert_path, format!("no PEM certificate ({e})")))?;
    let facts = ca_facts(&ca_der, &cert_path)?;
    if facts.trust_domain != id.trust_domain {
        return Err(IssueError::WrongTrustDomain {
            ca: ca_dir.to_owned(),
            ca_domain: facts.trust_domain,
            wanted: id.trust_domain.clone(),
        });
    }
    if facts.not_after <= now {
        return Err(IssueError::CaExpired(ca_dir.to_owned()));
    }
    let ca_key = KeyPair::from_pem(&ca.key)
        .map_err(|e| bad(&ca_dir.join(CA_KEY), format!("not a PEM private key ({e})")))?;
    let issuer =
        Issuer::from_ca_cert_der(&ca_der, ca_key).map_err(|e| bad(&cert_path, e.to_string()))?;

    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "amazing-proxy development");
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = (now + Duration::days(days.into())).min(facts.not_after);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Writes `files` (name, contents, secret) into `dir`, creating it. Without `force`, refuses before
/// writing anything when one of them exists (a dangling symlink too), so that a refusal leaves no
/// half-written set.
fn write_files(dir: &Path, files: &[(&str, &str, bool)], force: bool) -> Result<(), IssueError> {
    if !force
        && let Some((name, ..)) = files
            .iter()
            .find(|(name, ..)| dir.join(name).symlink_metadata().is_ok())
    {
        return Err(IssueError::Exists(dir.join(name)));
    }
    fs::create_dir_all(dir).map_err(|error| IssueError::Write {
        path: dir.to_owned(),
        error,
    })?;
    for (name, contents, secret) in files {
        write_file(dir, name, contents, *secret, force)?;
    }
    Ok(())
}

/// Writes `dir/name` through a new file beside it: created exclusively and without following a
/// symlink, its mode set (0600 for a `secret`, else 0644), then renamed over the target (with
/// `force`; a symlink there is replaced, not followed) or linked to it (without: fails if anything
/// appeared there since the check).
fn write_file(
    dir: &Path,
    name: &str,
    contents: &str,
    secret: bool,
    force: bool,
) -> Result<(), IssueError> {
    let path = dir.join(name);
    let mode = if secret { 0o600 } else { 0o644 };
    let temporary = dir.join(format!(
        ".{name}.{}-{:016x}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let write_error = |path: &Path, error| IssueError::Write {
        path: path.to_owned(),
        error,
    };
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&temporary)
        .and_then(|mut file| {
            // The umask may have taken bits away: the mode is exactly what it should be.
            file.set_permissions(fs::Permissions::from_mode(mode))?;
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        })
        .map_err(|e| write_error(&temporary, e));
    let placed = written.and_then(|()| {
        if force {
            fs::rename(&temporary, &path).map_err(|e| write_error(&path, e))
        } else {
            fs::hard_link(&temporary, &path).map_err(|error| match error.kind() {
                std::io::ErrorKind::AlreadyExists => IssueError::Exists(path.clone()),
                _ => write_error(&path, error),
            })
        }
    });
    // After a rename there is nothing left to remove; after a link or a failure, the new file goes.
    let _ = fs::remove_file(&temporary);
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::UnixTime;
    use x509_parser::extensions::GeneralName;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid id")
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("time")
    }

    #[test]
    fn leaf_has_only_the_workload_uri_san_both_usages_and_p256() {
        let ca = make_ca("cluster.local", 100, now()).expect("ca");
        let wanted = id("spiffe://cluster.local/ns/default/sa/httpbin");
        let leaf = issue(&ca, Path::new("ca"), &wanted, 7, now()).expect("leaf");
        let leaf_der = der(&leaf.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf_der).expect("x509");
        let sans: Vec<_> = cert
            .subject_alternative_name()
            .expect("san ok")
            .expect("san present")
            .value
            .general_names
            .clone();
        assert_eq!(
            sans,
            vec![GeneralName::URI(
                "spiffe://cluster.local/ns/default/sa/httpbin"
            )]
        );
        let eku = cert
            .extended_key_usage()
            .expect("eku ok")
            .expect("eku present")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let validity = cert.validity();
        assert_eq!(
            validity.not_after.to_datetime() - validity.not_before.to_datetime(),
            Duration::days(7) + BACKDATE
        );
    }

    #[test]
    fn leaf_chains_to_the_ca_for_server_and_client_use() {
        let ca = make_ca("cluster.local", 100, now()).expect("ca");
        let leaf = issue(
            &ca,
            Path::new("ca"),
            &id("spiffe://cluster.local/ns/a/sa/b"),
            7,
            now(),
        )
        .expect("leaf");
        let ca_der = der(&ca.cert);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).expect("anchor");
        let leaf_der = der(&leaf.cert);
        let ee = webpki::EndEntityCert::try_from(&leaf_der).expect("end entity");
        let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_100));
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                std::slice::from_ref(&anchor),
                &[],
                at,
                usage,
                None,
                None,
            )
            .expect("chains to the CA");
        }
        // The key is the certificate's: rustls accepts the pair.
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes())
            .expect("PKCS#8 key");
        assert!(matches!(key, rustls_pki_types::PrivateKeyDer::Pkcs8(_)));
        let provider = rustls::crypto::ring::default_provider();
        let certified = rustls::sign::CertifiedKey::from_der(vec![leaf_der], key, &provider)
            .expect("key matches");
        certified.keys_match().expect("keys match");
    }

    #[test]
    fn other_trust_domain_and_bad_trust_domain_are_refused() {
        let ca = make_ca("cluster.local", 100, now()).expect("ca");
        let err = issue(
            &ca,
            Path::new("ca"),
            &id("spiffe://example.org/ns/a/sa/b"),
            7,
            now(),
        )
        .map(|_| ())
        .expect_err("refused");
        assert!(
            err.to_string()
                .contains("signs trust domain `cluster.local`, not `example.org`"),
            "{err}"
        );
        let err = make_ca("Bad/Domain", 1, now())
            .map(|_| ())
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains("`Bad/Domain` is not a trust domain")
        );
    }

    #[test]
    fn leaf_never_outlives_the_ca_and_an_expired_ca_issues_nothing() {
        let ca = make_ca("cluster.local", 3, now()).expect("ca");
        let wanted = id("spiffe://cluster.local/ns/a/sa/b");
        let leaf = issue(&ca, Path::new("ca"), &wanted, 30, now()).expect("leaf");
        let leaf_der = der(&leaf.cert);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf_der).expect("x509");
        assert_eq!(
            cert.validity().not_after.to_datetime(),
            now() + Duration::days(3)
        );
        let later = now() + Duration::days(4);
        let err = issue(&ca, Path::new("ca"), &wanted, 1, later)
            .map(|_| ())
            .expect_err("refused");
        assert!(matches!(err, IssueError::CaExpired(_)), "{err}");
    }

    #[test]
    fn files_are_not_replaced_without_force_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("ca");
        write_files(&out, &[("a", "one", false), ("k", "key", true)], false).expect("first");
        let mode = fs::metadata(out.join("k"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = write_files(&out, &[("b", "two", false), ("k", "new", true)], false)
            .map(|_| ())
            .expect_err("refused");
        assert!(err.to_string().contains("pass --force"), "{err}");
        // Nothing of the refused set was written.
        assert!(!out.join("b").exists());
        write_files(&out, &[("k", "new", true)], true).expect("forced");
        assert_eq!(fs::read_to_string(out.join("k")).expect("read"), "new");
        let left: Vec<_> = fs::read_dir(&out)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left.len(), 2, "no temporary file left behind: {left:?}");
    }

    #[test]
    fn forced_keys_are_0600_and_symlinks_are_replaced_not_followed() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("ca");
        fs::create_dir(&out).expect("mkdir");
        let mode = |p: &Path| fs::symlink_metadata(p).expect("meta").permissions().mode() & 0o777;

        // A key path that is a world-readable file: replaced by a 0600 one.
        fs::write(out.join(CA_KEY), "old").expect("write");
        fs::set_permissions(out.join(CA_KEY), fs::Permissions::from_mode(0o644)).expect("chmod");
        // A key path that is a symlink to a file elsewhere: the link goes, its target is untouched.
        let elsewhere = dir.path().join("precious");
        fs::write(&elsewhere, "keep me").expect("write");
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o644)).expect("chmod");
        symlink(&elsewhere, out.join(TLS_KEY)).expect("symlink");

        write_files(
            &out,
            &[
                (CA_KEY, "new ca key", true),
                (TLS_KEY, "new key", true),
                (CA_CERT, "cert", false),
            ],
            true,
        )
        .expect("forced");
        for key in [CA_KEY, TLS_KEY] {
            let path = out.join(key);
            assert!(
                fs::symlink_metadata(&path).expect("meta").is_file(),
                "{key} is a plain file"
            );
            assert_eq!(mode(&path), 0o600, "{key}");
        }
        assert_eq!(
            fs::read_to_string(out.join(TLS_KEY)).expect("read"),
            "new key"
        );
        assert_eq!(fs::read_to_string(&elsewhere).expect("read"), "keep me");
        assert_eq!(
            mode(&elsewhere),
            0o644,
            "the symlink's target kept its mode"
        );
        assert_eq!(mode(&out.join(CA_CERT)), 0o644);

        // Without --force, a dangling symlink counts as a file that exists.
        let other = dir.path().join("other");
        fs::create_dir(&other).expect("mkdir");
        symlink(dir.path().join("nowhere"), other.join(TLS_KEY)).expect("symlink");
        let err = write_files(&other, &[(TLS_KEY, "k", true)], false)
            .map(|_| ())
            .expect_err("refused");
        assert!(matches!(err, IssueError::Exists(_)), "{err}");
        assert!(
            !dir.path().join("nowhere").exists(),
            "nothing written through the link"
        );
    }
}
