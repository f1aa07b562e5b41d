//! `amazing-proxy install`: prints the bundle that installs the injection webhook on a cluster.
//!
//! The bundle is deploy/install.yaml, compiled in, so that the file in the repository and what the
//! binary prints cannot drift apart. By default it is printed as it is: the serving certificate
//! comes from cert-manager (an `Issuer` and a `Certificate`, and the `cert-manager.io/inject-ca-from`
//! annotation through which cert-manager's CA injector fills in the `caBundle`).
//!
//! `--self-signed` is for clusters without cert-manager: it generates a CA and a serving certificate
//! for the `Certificate`'s DNS names (ECDSA P-256, with rcgen), and prints the bundle with a
//! `kubernetes.io/tls` Secret in place of the `Issuer` and the `Certificate`, and the CA in every
//! webhook's `clientConfig.caBundle`. The CA's private key is not kept: nothing else can be signed
//! with it, and renewing means running the command again (the webhook re-reads the Secret's files
//! when kubelet updates them, and the new caBundle replaces the old one on `kubectl apply`).

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use serde_json::{Value, json};

/// The bundle, as shipped.
pub(crate) const BUNDLE: &str = include_str!("../deploy/install.yaml");

/// How long a generated serving certificate is valid; the CA lives ten times as long.
const SERVING_DAYS: i64 = 365;
const CA_DAYS: i64 = 3650;

#[derive(Args, Clone, Debug)]
pub struct InstallArgs {
    /// Instead of cert-manager's Certificate: generate a CA and a serving certificate, and print
    /// them as a Secret and the webhooks' caBundle (valid one year; run again to renew).
    #[arg(long)]
    pub(crate) self_signed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(
        "the built-in bundle (deploy/install.yaml) is malformed: {0}; rebuild from a clean checkout"
    )]
    Bundle(String),
    #[error("cannot generate the self-signed certificates: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot write the bundle to stdout: {0}")]
    Write(std::io::Error),
}

pub fn main(args: InstallArgs) -> Result<(), InstallError> {
    let text = if args.self_signed {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self_signed(BUNDLE, &generate_tls(now)?)?
    } else {
        BUNDLE.to_string()
    };
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(InstallError::Write)
}

/// A CA and a serving certificate signed by it, PEM-encoded.
pub(crate) struct Tls {
    pub(crate) ca_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
    dns_names: Vec<String>,
}

/// Generates the pair for `dns_names`, valid from an hour before `now` (seconds since the epoch;
/// clocks differ) for [`SERVING_DAYS`].
fn generate(now: u64, dns_names: &[String]) -> Result<Tls, rcgen::Error> {
    let start = time::OffsetDateTime::from_unix_timestamp(i64::try_from(now).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        - time::Duration::hours(1);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "amazing-proxy webhook CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = start;
    ca_params.not_after = start + time::Duration::days(CA_DAYS);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(dns_names.to_vec())?;
    if let Some(first) = dns_names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = start;
    params.not_after = start + time::Duration::days(SERVING_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(Tls {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        dns_names: dns_names.to_vec(),
    })
}

fn documents(bundle: &str) -> Result<Vec<Value>, InstallError> {
    crate::inject::documents::parse(bundle, "deploy/install.yaml")
        .map(|(_, docs)| docs)
        .map_err(|e| InstallError::Bundle(e.to_string()))
}

fn is(doc: &Value, api_version: &str, kind: &str) -> bool {
    doc["apiVersion"] == api_version && doc["kind"] == kind
}

/// The `Certificate` the bundle asks cert-manager for.
fn certificate(docs: &[Value]) -> Result<&Value, InstallError> {
    docs.iter()
        .find(|d| is(d, "cert-manager.io/v1", "Certificate"))
        .ok_or_else(|| InstallError::Bundle("no cert-manager Certificate".into()))
}

/// Certificates for the DNS names of the bundle's `Certificate`, generated at `now`.
pub(crate) fn generate_tls(now: u64) -> Result<Tls, InstallError> {
    let docs = documents(BUNDLE)?;
    let dns_names: Vec<String> = certificate(&docs)?["spec"]["dnsNames"]
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if dns_names.is_empty() {
        return Err(InstallError::Bundle(
            "the Certificate has no spec.dnsNames".into(),
        ));
    }
    Ok(generate(now, &dns_names)?)
}

/// The bundle with `tls` in a Secret and the caBundles instead of cert-manager's objects.
pub(crate) fn self_signed(bundle: &str, tls: &Tls) -> Result<String, InstallError> {
    let docs = documents(bundle)?;
    let cert = certificate(&docs)?;
    let secret_name = cert["spec"]["secretName"].clone();
    let namespace = cert["metadata"]["namespace"].clone();
    if !secret_name.is_string() || !namespace.is_string() {
        return Err(InstallError::Bundle(
            "the Certificate lacks spec.secretName or metadata.namespace".into(),
        ));
    }
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": secret_name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": {
            "ca.crt": b64(&tls.ca_pem),
            "tls.crt": b64(&tls.cert_pem),
            "tls.key": b64(&tls.key_pem),
        },
    });
    let mut out = Vec::new();
    for mut doc in docs {
        if is(&doc, "cert-manager.io/v1", "Issuer") {
            continue;
        }
        if is(&doc, "cert-manager.io/v1", "Certificate") {
            out.push(secret.clone());
            continue;
        }
        if is(
            &doc,
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
        ) {
            remove_annotation(&mut doc, "cert-manager.io/inject-ca-from");
            let webhooks = doc["webhooks"].as_array_mut().ok_or_else(|| {
                InstallError::Bundle("the MutatingWebhookConfiguration has no webhooks".into())
            })?;
            for webhook in webhooks {
                let config = webhook
                    .get_mut("clientConfig")
                    .and_then(Value::as_object_mut)
                    .ok_or_else(|| InstallError::Bundle("a webhook has no clientConfig".into()))?;
                config.insert("caBundle".into(), json!(b64(&tls.ca_pem)));
            }
        }
        out.push(doc);
    }
    let mut text = String::from(
        "# amazing-proxy's injection webhook, from `amazing-proxy install --self-signed`:\n\
         # deploy/install.yaml with a generated CA and serving certificate in place of\n\
         # cert-manager's Issuer and Certificate, for:\n",
    );
    for name in &tls.dns_names {
        text.push_str(&format!("#   {name}\n"));
    }
    text.push_str(&format!(
        "# The certificate expires after {SERVING_DAYS} days: run the command again and apply its\n\
         # output to renew. Apply with: kubectl apply -f FILE\n"
    ));
    let yaml = crate::inject::documents::render(crate::inject::documents::Format::Yaml, &out)
        .map_err(|e| InstallError::Bundle(e.to_string()))?;
    text.push_str(&yaml);
    Ok(text)
}

fn remove_annotation(doc: &mut Value, key: &str) {
    let Some(metadata) = doc.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let now_empty = match metadata
        .get_mut("annotations")
        .and_then(Value::as_object_mut)
    {
        Some(annotations) => {
            annotations.remove(key);
            annotations.is_empty()
        }
        None => false,
    };
    if now_empty {
        metadata.remove("annotations");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_replaces_cert_manager() {
        let tls = generate_tls(1_800_000_000).expect("certificates");
        let text = self_signed(BUNDLE, &tls).expect("bundle");
        let docs = documents(&text).expect("YAML");
        assert!(!docs.iter().any(|d| d["apiVersion"] == "cert-manager.io/v1"));
        let secret = docs
            .iter()
            .find(|d| d["kind"] == "Secret")
            .expect("a Secret");
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(secret["metadata"]["name"], "amazing-proxy-webhook-tls");
        let decode = |v: &Value| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("base64 text"))
                .expect("base64");
            String::from_utf8(bytes).expect("PEM")
        };
        assert_eq!(decode(&secret["data"]["tls.crt"]), tls.cert_pem);
        assert_eq!(decode(&secret["data"]["tls.key"]), tls.key_pem);
        let config = docs
            .iter()
            .find(|d| d["kind"] == "MutatingWebhookConfiguration")
            .expect("webhook configuration");
        assert_eq!(config["metadata"].get("annotations"), None);
        for webhook in config["webhooks"].as_array().expect("webhooks") {
            assert_eq!(decode(&webhook["clientConfig"]["caBundle"]), tls.ca_pem);
        }
    }

    #[test]
    fn every_run_generates_new_keys() {
        let a = generate_tls(1_800_000_000).expect("certificates");
        let b = generate_tls(1_800_000_000).expect("certificates");
        assert_ne!(a.key_pem, b.key_pem);
        assert_ne!(a.ca_pem, b.ca_pem);
    }
}
