//! What `amazing-proxy.io/identity`, `amazing-proxy.io/policy` and `amazing-proxy.io/routes` add
//! to an injected pod: the volumes that bring the workload's identity (or the SPIRE agent's
//! socket), the policy and the routes into the proxy's container, where they are mounted, and the
//! variables that point `run` at them. (The HBONE port is declared on every sidecar, identity or
//! not.)
//!
//! The volumes are mounted into the proxy's container only: the key never reaches the app's
//! containers, so the files can keep the default modes that kubelet and the CSI drivers give them.
//! Each kind mounts what its issuer documents:
//! - `csi-spiffe`: cert-manager's csi-driver-spiffe (`spiffe.csi.cert-manager.io`), a directory with
//!   `tls.crt`, `tls.key` and `ca.crt`;
//! - `pod-certificate`: a projected volume with a `podCertificate` source (KEP-4317, Kubernetes 1.34+:
//!   key and chain in one PEM file) and a `clusterTrustBundle` source of the same signer;
//! - `spire`: the SPIFFE CSI driver (`csi.spiffe.io`), which mounts the SPIRE agent's Workload API
//!   socket directory, as SPIRE documents.

use std::str::FromStr;

use k8s_openapi::api::core::v1::{
    CSIVolumeSource, ClusterTrustBundleProjection, ConfigMapVolumeSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, PodCertificateProjection, ProjectedVolumeSource, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::vocab::{POD_NAME_ENV, POD_NAMESPACE_ENV, is_dns_subdomain};

/// Names of the volumes we add; with our containers, the names a pod must not already use.
pub(crate) const IDENTITY_VOLUME: &str = "amazing-proxy-identity";
pub(crate) const POLICY_VOLUME: &str = "amazing-proxy-policy";
pub(crate) const ROUTES_VOLUME: &str = "amazing-proxy-routes";
pub(crate) const VOLUMES: [&str; 3] = [IDENTITY_VOLUME, POLICY_VOLUME, ROUTES_VOLUME];

/// Where the identity files are mounted (csi-spiffe, pod-certificate).
pub(crate) const IDENTITY_DIR: &str = "/var/run/secrets/amazing-proxy/identity";
/// The files of the pod-certificate projection, in [`IDENTITY_DIR`].
pub(crate) const CREDENTIAL_BUNDLE: &str = "credential-bundle.pem";
pub(crate) const TRUST_BUNDLE: &str = "trust-bundle.pem";
/// Where the SPIFFE CSI driver's socket directory is mounted, and the agent's socket in it (the
/// paths of SPIRE's and the SPIFFE CSI driver's examples).
pub(crate) const SPIRE_DIR: &str = "/spiffe-workload-api";
pub(crate) const SPIRE_SOCKET: &str = "spire-agent.sock";

/// A file the proxy reads from a ConfigMap an annotation names: the ConfigMap is mounted as a
/// directory (not `subPath`, so that kubelet's updates reach the proxy, which reloads the file).
struct ConfigMapFile {
    volume: &'static str,
    /// Where the ConfigMap is mounted.
    dir: &'static str,
    /// The key the proxy reads, a file in `dir`.
    key: &'static str,
    /// The `run` variable that names the file.
    var: &'static str,
}

const POLICY_FILE: ConfigMapFile = ConfigMapFile {
    volume: POLICY_VOLUME,
    dir: "/etc/amazing-proxy/policy",
    key: "policy.yaml",
    var: "AMAZING_PROXY_POLICY",
};

const ROUTES_FILE: ConfigMapFile = ConfigMapFile {
    volume: ROUTES_VOLUME,
    dir: "/etc/amazing-proxy/routes",
    key: "routes.yaml",
    var: "AMAZING_PROXY_ROUTES",
};

/// The ConfigMaps an injected proxy reads, by name: `amazing-proxy.io/policy` and
/// `amazing-proxy.io/routes`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConfigMaps<'a> {
    pub(crate) policy: Option<&'a str>,
    pub(crate) routes: Option<&'a str>,
}

impl<'a> ConfigMaps<'a> {
    /// Each file the pod names, with its ConfigMap's name.
    fn each(self) -> impl Iterator<Item = (&'static ConfigMapFile, &'a str)> {
        [(&POLICY_FILE, self.policy), (&ROUTES_FILE, self.routes)]
            .into_iter()
            .filter_map(|(file, name)| Some((file, name?)))
    }
}

/// The key type asked of the pod-certificate signer: the one ztunnel and our certificates use.
const POD_CERTIFICATE_KEY_TYPE: &str = "ECDSAP256";

/// Where the proxy's identity comes from (`amazing-proxy.io/identity`, `inject --identity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum IdentityKind {
    /// No identity: plaintext only, no HBONE.
    #[default]
    None,
    /// cert-manager's csi-driver-spiffe.
    CsiSpiffe,
    /// Kubernetes Pod Certificates (1.34+), from the signer `pod-certificate-signer` names.
    PodCertificate,
    /// The SPIRE agent's Workload API, through the SPIFFE CSI driver.
    Spire,
}

impl FromStr for IdentityKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(IdentityKind::None),
            "csi-spiffe" => Ok(IdentityKind::CsiSpiffe),
            "pod-certificate" => Ok(IdentityKind::PodCertificate),
            "spire" => Ok(IdentityKind::Spire),
            _ => Err(format!(
                "expected csi-spiffe, pod-certificate, spire or none, got `{s}`"
            )),
        }
    }
}

/// A signer name as Kubernetes requires it: `<domain>/<path>` (e.g. `example.com/spiffe`).
pub(crate) fn parse_signer_name(s: &str) -> Result<String, String> {
    let valid = s
        .split_once('/')
        .is_some_and(|(domain, path)| is_dns_subdomain(domain) && !path.is_empty());
    if valid && !s.chars().any(char::is_whitespace) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected a signer name <domain>/<name> (e.g. example.com/spiffe), got `{s}`"
        ))
    }
}

/// A ConfigMap name: a DNS-1123 subdomain.
pub(crate) fn parse_configmap_name(s: &str) -> Result<String, String> {
    if is_dns_subdomain(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "expected a ConfigMap name (lower-case letters, digits, `-` and `.`), got `{s}`"
        ))
    }
}

/// The pod's volumes for `kind` and the ConfigMaps; `signer` is the pod-certificate signer,
/// checked to be set for that kind before.
pub(crate) fn volumes(
    kind: IdentityKind,
    signer: Option<&str>,
    config_maps: ConfigMaps<'_>,
) -> Vec<Volume> {
    let csi = |driver: &str| Volume {
        name: IDENTITY_VOLUME.into(),
        csi: Some(CSIVolumeSource {
            driver: driver.into(),
            read_only: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = Vec::new();
    match kind {
        IdentityKind::None => {}
        IdentityKind::CsiSpiffe => out.push(csi("spiffe.csi.cert-manager.io")),
        IdentityKind::Spire => out.push(csi("csi.spiffe.io")),
        IdentityKind::PodCertificate => {
            let signer = signer.unwrap_or_default().to_owned();
            out.push(Volume {
                name: IDENTITY_VOLUME.into(),
                projected: Some(ProjectedVolumeSource {
                    sources: Some(vec![
                        VolumeProjection {
                            pod_certificate: Some(PodCertificateProjection {
                                signer_name: signer.clone(),
                                key_type: POD_CERTIFICATE_KEY_TYPE.into(),
                                credential_bundle_path: Some(CREDENTIAL_BUNDLE.into()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        VolumeProjection {
                            // The signer's bundles; an empty selector takes all of them (an unset
                            // one would take none).
                            cluster_trust_bundle: Some(ClusterTrustBundleProjection {
                                signer_name: Some(signer),
                                label_selector: Some(LabelSelector::default()),
                                path: TRUST_BUNDLE.into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    out.extend(config_maps.each().map(|(file, name)| Volume {
        name: file.volume.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    }));
    out
}

/// The proxy container's mounts of [`volumes`].
pub(crate) fn mounts(kind: IdentityKind, config_maps: ConfigMaps<'_>) -> Vec<VolumeMount> {
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let mut out = Vec::new();
    match kind {
        IdentityKind::None => {}
        IdentityKind::CsiSpiffe | IdentityKind::PodCertificate => {
            out.push(mount(IDENTITY_VOLUME, IDENTITY_DIR))
        }
        IdentityKind::Spire => out.push(mount(IDENTITY_VOLUME, SPIRE_DIR)),
    }
    out.extend(
        config_maps
            .each()
            .map(|(file, _)| mount(file.volume, file.dir)),
    );
    out
}

/// The `run` variables that point the proxy at the mounted files (the contract with `run`'s flags).
pub(crate) fn env(kind: IdentityKind, config_maps: ConfigMaps<'_>) -> Vec<EnvVar> {
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut out = Vec::new();
    match kind {
        IdentityKind::None => {}
        IdentityKind::CsiSpiffe => {
            out.push(var("AMAZING_PROXY_IDENTITY_DIR", IDENTITY_DIR.into()));
        }
        IdentityKind::PodCertificate => {
            out.push(var(
                "AMAZING_PROXY_IDENTITY_CREDENTIAL_BUNDLE",
                format!("{IDENTITY_DIR}/{CREDENTIAL_BUNDLE}"),
            ));
            out.push(var(
                "AMAZING_PROXY_IDENTITY_TRUST_BUNDLE",
                format!("{IDENTITY_DIR}/{TRUST_BUNDLE}"),
            ));
        }
        IdentityKind::Spire => out.push(var(
            "AMAZING_PROXY_IDENTITY_SPIRE_SOCKET",
            format!("{SPIRE_DIR}/{SPIRE_SOCKET}"),
        )),
    }
    out.extend(
        config_maps
            .each()
            .map(|(file, _)| var(file.var, format!("{}/{}", file.dir, file.key))),
    );
    out
}

/// The pod's name and namespace from the downward API, for the `baggage` header the proxy sends
/// on each HBONE `CONNECT`; none without an identity (no HBONE then).
pub(crate) fn downward_env(kind: IdentityKind) -> Vec<EnvVar> {
    if kind == IdentityKind::None {
        return Vec::new();
    }
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        field(POD_NAME_ENV, "metadata.name"),
        field(POD_NAMESPACE_ENV, "metadata.namespace"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(parse_signer_name("example.com/spiffe").is_ok());
        for bad in ["spiffe", "example.com/", "/x", "Example.com/x", "a b/c"] {
            assert!(parse_signer_name(bad).is_err(), "{bad}");
        }
        assert!(parse_configmap_name("web-policy.v1").is_ok());
        for bad in ["", "Web", "-web", "web-", "a_b"] {
            assert!(parse_configmap_name(bad).is_err(), "{bad}");
        }
        for (text, kind) in [
            ("none", IdentityKind::None),
            ("csi-spiffe", IdentityKind::CsiSpiffe),
            ("pod-certificate", IdentityKind::PodCertificate),
            ("spire", IdentityKind::Spire),
        ] {
            assert_eq!(text.parse::<IdentityKind>(), Ok(kind));
        }
        assert!("spiffe".parse::<IdentityKind>().is_err());
    }

    #[test]
    fn every_volume_is_mounted_and_every_mount_has_a_volume() {
        for kind in [
            IdentityKind::None,
            IdentityKind::CsiSpiffe,
            IdentityKind::PodCertificate,
            IdentityKind::Spire,
        ] {
            for (policy, routes) in [
                (None, None),
                (Some("p"), None),
                (None, Some("r")),
                (Some("p"), Some("r")),
            ] {
                let maps = ConfigMaps { policy, routes };
                let volumes: Vec<_> = volumes(kind, Some("example.com/x"), maps)
                    .into_iter()
                    .map(|v| v.name)
                    .collect();
                let mounted: Vec<_> = mounts(kind, maps).into_iter().map(|m| m.name).collect();
                assert_eq!(volumes, mounted, "{kind:?} {maps:?}");
                assert_eq!(env(kind, maps).is_empty(), volumes.is_empty());
            }
        }
    }
}
