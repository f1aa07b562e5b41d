//! `amazing-proxy identity ca` and `identity issue` as a user runs them: the files land in the
//! `--identity-dir` layout, the leaf carries only the workload's SPIFFE URI SAN with both usages and
//! chains to the CA, existing files are kept unless `--force`, and mistakes get a clear message.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::process::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::extensions::GeneralName;

fn identity(args: &[&str]) -> Output {
    let mut cmd: Command = command();
    cmd.arg("identity").args(args);
    run(&mut cmd)
}

fn ok(args: &[&str]) {
    let out = identity(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fails(args: &[&str]) -> String {
    let out = identity(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("readable PEM")
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `issue --ca CA --spiffe-id ID --out OUT` and `extra`.
fn issue_args<'a>(ca: &'a Path, id: &'a str, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["issue", "--ca", s(ca), "--spiffe-id", id, "--out", s(out)];
    args.extend_from_slice(extra);
    args
}

#[test]
fn ca_then_issue_writes_a_chain_peers_accept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, pod) = (dir.path().join("ca"), dir.path().join("pod"));
    ok(&["ca", "--out", s(&ca)]);
    ok(&issue_args(
        &ca,
        "spiffe://cluster.local/ns/default/sa/httpbin",
        &pod,
        &["--days", "2"],
    ));

    let chain = certs(&pod.join("tls.crt"));
    assert_eq!(chain.len(), 1, "the CA is the root: the chain is the leaf");
    let roots = certs(&pod.join("ca.crt"));
    assert_eq!(roots, certs(&ca.join("ca.crt")));
    let key = std::fs::read(pod.join("tls.key")).expect("tls.key");
    assert!(String::from_utf8_lossy(&key).starts_with("-----BEGIN PRIVATE KEY-----"));

    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("x509");
    let san = leaf.subject_alternative_name().expect("ok").expect("san");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(
            "spiffe://cluster.local/ns/default/sa/httpbin"
        )]
    );
    let eku = leaf.extended_key_usage().expect("ok").expect("eku").value;
    assert!(eku.server_auth && eku.client_auth);
    let validity = leaf.validity();
    let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
    assert_eq!(days, 2, "--days 2 (plus a few minutes of backdating)");

    let anchor = webpki::anchor_from_trusted_cert(&roots[0]).expect("anchor");
    let ee = webpki::EndEntityCert::try_from(&chain[0]).expect("end entity");
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            std::slice::from_ref(&anchor),
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .expect("the leaf chains to ca.crt");
    }
}

#[test]
fn existing_files_are_kept_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ok(&["ca", "--out", s(&ca)]);
    let first = std::fs::read(ca.join("ca.key")).expect("ca.key");
    let err = fails(&["ca", "--out", s(&ca)]);
    assert!(
        err.contains(&format!(
            "{} already exists: pass --force",
            s(&ca.join("ca.crt"))
        )),
        "{err}"
    );
    assert_eq!(std::fs::read(ca.join("ca.key")).expect("ca.key"), first);
    ok(&["ca", "--out", s(&ca), "--force"]);
    assert_ne!(std::fs::read(ca.join("ca.key")).expect("ca.key"), first);

    let pod = dir.path().join("pod");
    let id = "spiffe://cluster.local/ns/a/sa/b";
    let args = issue_args(&ca, id, &pod, &[]);
    ok(&args);
    assert!(fails(&args).contains("already exists: pass --force"));
    ok(&issue_args(&ca, id, &pod, &["--force"]));
}

#[test]
fn mistakes_are_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let out = dir.path().join("out");
    let issue = issue_args(&ca, "spiffe://cluster.local/ns/a/sa/b", &out, &[]);
    let err = fails(&issue);
    assert!(
        err.contains("cannot read") && err.contains("ca.crt") && err.contains("identity ca"),
        "{err}"
    );
    ok(&["ca", "--out", s(&ca), "--trust-domain", "example.org"]);
    let err = fails(&issue);
    assert!(
        err.contains("signs trust domain `example.org`, not `cluster.local`"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written on a refusal");

    let not_a_workload = dir.path().join("x");
    let out = identity(&issue_args(
        &ca,
        "spiffe://example.org/default/httpbin",
        &not_a_workload,
        &[],
    ));
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--spiffe-id") && err.contains("spiffe://<trust-domain>/ns/"),
        "{err}"
    );
}
