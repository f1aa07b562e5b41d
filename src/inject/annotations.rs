//! The injection settings of one pod: flag defaults, overridden by `amazing-proxy.io/*` annotations
//! on the pod template.
//!
//! Every value is parsed and checked here, before anything is built, so that a typo in an annotation
//! is an error naming the annotation rather than a pod whose init container crashes at start. The
//! values are parsed by [`crate::vocab`], the parsers `init` and `run` use for the variables the
//! annotations become, and stored typed: what `inject` accepts, the injected pod accepts too.
//! Unknown `amazing-proxy.io/*` annotations are errors too: a misspelt setting silently ignored is
//! worse than a refused manifest.

use std::str::FromStr;
use std::time::Duration;

use serde_json::{Map, Value};

use super::identity::{IdentityKind, parse_configmap_name, parse_signer_name};
use crate::identity::peers::PeerIdentities;
use crate::vocab::{AccessLogFormat, CidrList, PortList, parse_drain_duration, parse_port};

/// Every annotation this module reads or writes shares this prefix.
pub(crate) const PREFIX: &str = "amazing-proxy.io/";
/// Written by the injector on every pod template it injects; its value is the injector's version.
pub(crate) const INJECTED: &str = "amazing-proxy.io/injected";
/// `"false"` / `"disabled"` skips the pod; as an annotation or as a label (labels also work with
/// the webhook's objectSelector).
pub(crate) const INJECT: &str = "amazing-proxy.io/inject";

/// The annotations a pod template may carry (after the prefix); `injected` is ours to write.
pub(crate) const KNOWN: &[&str] = &[
    "inject",
    "injected",
    "image",
    "inbound-ports",
    "exclude-inbound-ports",
    "exclude-outbound-ports",
    "exclude-outbound-cidrs",
    "disable-outbound",
    "opaque-ports",
    "app-port",
    "access-log",
    "drain-delay",
    "proxy-cpu-request",
    "proxy-memory-request",
    "proxy-cpu-limit",
    "proxy-memory-limit",
    "identity",
    "pod-certificate-signer",
    "policy",
    "routes",
    "peer-identities",
];

/// The settings of one injection. The flags give the defaults ([`Settings`] built by clap); the
/// pod template's annotations override them field by field ([`Settings::with_annotations`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) image: String,
    /// Ports whose inbound traffic is redirected to the proxy; empty means all.
    pub(crate) inbound_ports: PortList,
    pub(crate) exclude_inbound_ports: PortList,
    pub(crate) exclude_outbound_ports: PortList,
    pub(crate) exclude_outbound_cidrs: CidrList,
    /// No outbound redirection at all (`AMAZING_PROXY_NO_OUTBOUND=true`).
    pub(crate) disable_outbound: bool,
    pub(crate) opaque_ports: PortList,
    /// `None`: the first containerPort of the first app container, else 80.
    pub(crate) app_port: Option<u16>,
    pub(crate) access_log: AccessLogFormat,
    pub(crate) drain_delay: Duration,
    pub(crate) cpu_request: Option<String>,
    pub(crate) memory_request: Option<String>,
    pub(crate) cpu_limit: Option<String>,
    pub(crate) memory_limit: Option<String>,
    /// Where the proxy's mTLS identity comes from.
    pub(crate) identity: IdentityKind,
    /// The signer of `IdentityKind::PodCertificate` certificates and trust bundles.
    pub(crate) pod_certificate_signer: Option<String>,
    /// The ConfigMap whose `policy.yaml` is the proxy's authorization policy.
    pub(crate) policy: Option<String>,
    /// The ConfigMap whose `routes.yaml` is the proxy's routes file (docs/routes.md).
    pub(crate) routes: Option<String>,
    /// The identities expected of HBONE servers by address (`run --peer-identities-inline`).
    pub(crate) peer_identities: Option<PeerIdentities>,
}

/// An annotation (or flag) whose value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SettingError {
    /// Where the value is, as a field path (`spec.template.metadata.annotations["..."]`).
    pub(crate) field: String,
    pub(crate) problem: String,
}

impl Settings {
    /// Overrides the defaults with the `amazing-proxy.io/*` annotations; `field` is the path of the
    /// annotations map, for error messages.
    pub(crate) fn with_annotations(
        &self,
        annotations: Option<&Map<String, Value>>,
        field: &str,
    ) -> Result<Settings, SettingError> {
        let mut s = self.clone();
        let Some(annotations) = annotations else {
            return Ok(s);
        };
        for (key, value) in annotations {
            let Some(name) = key.strip_prefix(PREFIX) else {
                continue;
            };
            let path = format!("{field}[\"{key}\"]");
            let err = |problem: String| SettingError {
                field: path.clone(),
                problem,
            };
            let Some(text) = value.as_str() else {
                return Err(err(
                    "annotation values must be strings; quote the value".into()
                ));
            };
            match name {
                "inject" | "injected" => {}
                "image" => s.image = parse_image(text).map_err(err)?,
                "inbound-ports" => s.inbound_ports = PortList::from_str(text).map_err(err)?,
                "exclude-inbound-ports" => {
                    s.exclude_inbound_ports = PortList::from_str(text).map_err(err)?
                }
                "exclude-outbound-ports" => {
                    s.exclude_outbound_ports = PortList::from_str(text).map_err(err)?
                }
                "exclude-outbound-cidrs" => {
                    s.exclude_outbound_cidrs = CidrList::from_str(text).map_err(err)?
                }
                "disable-outbound" => s.disable_outbound = parse_bool(text).map_err(err)?,
                "opaque-ports" => s.opaque_ports = PortList::from_str(text).map_err(err)?,
                "app-port" => s.app_port = Some(parse_port(text).map_err(err)?),
                "access-log" => s.access_log = AccessLogFormat::from_str(text).map_err(err)?,
                "drain-delay" => s.drain_delay = parse_drain_duration(text).map_err(err)?,
                "proxy-cpu-request" => s.cpu_request = Some(parse_quantity(text).map_err(err)?),
                "proxy-memory-request" => {
                    s.memory_request = Some(parse_quantity(text).map_err(err)?)
                }
                "proxy-cpu-limit" => s.cpu_limit = Some(parse_quantity(text).map_err(err)?),
                "proxy-memory-limit" => s.memory_limit = Some(parse_quantity(text).map_err(err)?),
                "identity" => s.identity = IdentityKind::from_str(text).map_err(err)?,
                "pod-certificate-signer" => {
                    s.pod_certificate_signer = Some(parse_signer_name(text).map_err(err)?)
                }
                "policy" => s.policy = Some(parse_configmap_name(text).map_err(err)?),
                "routes" => s.routes = Some(parse_configmap_name(text).map_err(err)?),
                "peer-identities" => {
                    s.peer_identities = Some(parse_peer_identities(text).map_err(err)?);
                }
                other => {
                    return Err(err(format!(
                        "unknown amazing-proxy annotation `{other}`; known: {} (see docs/inject.md)",
                        KNOWN.join(", ")
                    )));
                }
            }
        }
        if s.peer_identities.is_some() && s.identity == IdentityKind::None {
            return Err(SettingError {
                field: format!("{field}[\"{PREFIX}peer-identities\"]"),
                problem: "expected identities are for mutual TLS, which needs an identity: set amazing-proxy.io/identity (or inject --identity)".into(),
            });
        }
        Ok(s)
    }
}

/// `amazing-proxy.io/peer-identities`: `--peer-identities`' entries (`CIDR-or-address SPIFFE-ID`),
/// one a line or `;`-separated; at least one.
pub(crate) fn parse_peer_identities(s: &str) -> Result<PeerIdentities, String> {
    let peers = PeerIdentities::parse(s)?;
    if peers == PeerIdentities::default() {
        return Err(format!(
            "expected `CIDR-or-address SPIFFE-ID` entries, one a line or separated by `;`, got `{s}`"
        ));
    }
    Ok(peers)
}

/// Whether a pod template opts out: `amazing-proxy.io/inject` set to `false`/`disabled` as an
/// annotation or a label. `true`/`enabled` (or absence) means inject; anything else is an error.
pub(crate) fn opted_out(
    metadata: Option<&Map<String, Value>>,
    field: &str,
) -> Result<bool, SettingError> {
    let mut out = false;
    for map_name in ["annotations", "labels"] {
        let Some(value) = metadata
            .and_then(|m| m.get(map_name))
            .and_then(|m| m.get(INJECT))
        else {
            continue;
        };
        let field = format!("{field}.{map_name}[\"{INJECT}\"]");
        match value.as_str() {
            Some("false" | "disabled") => out = true,
            Some("true" | "enabled") => {}
            _ => {
                return Err(SettingError {
                    field,
                    problem: format!(
                        "expected \"true\", \"enabled\", \"false\" or \"disabled\", got {value}"
                    ),
                });
            }
        }
    }
    Ok(out)
}

pub(crate) fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "expected a container image reference without spaces, got `{s}`"
        ));
    }
    Ok(s.to_string())
}

pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected \"true\" or \"false\", got `{s}`")),
    }
}

/// A Kubernetes resource quantity (`10m`, `0.5`, `16Mi`, `1e3`). Checked here because the API
/// server would reject the whole object with a message that does not name the annotation.
pub(crate) fn parse_quantity(s: &str) -> Result<String, String> {
    let bad = || format!("expected a Kubernetes quantity such as 10m, 0.5, 16Mi or 1G, got `{s}`");
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let dots = number.matches('.').count();
    if number.is_empty() || number == "." || dots > 1 {
        return Err(bad());
    }
    const SUFFIXES: &[&str] = &[
        "", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let exponent_ok = suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    if SUFFIXES.contains(&suffix) || exponent_ok {
        Ok(s.to_string())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
impl Settings {
    /// The flags' defaults with image `img`: the unit tests' starting point.
    pub(crate) fn example() -> Settings {
        Settings {
            image: "img".into(),
            inbound_ports: PortList::default(),
            exclude_inbound_ports: PortList::default(),
            exclude_outbound_ports: PortList::default(),
            exclude_outbound_cidrs: CidrList::default(),
            disable_outbound: false,
            opaque_ports: PortList::default(),
            app_port: None,
            access_log: AccessLogFormat::Json,
            drain_delay: Duration::from_secs(5),
            cpu_request: Some("10m".into()),
            memory_request: Some("16Mi".into()),
            cpu_limit: None,
            memory_limit: None,
            identity: IdentityKind::None,
            pod_certificate_signer: None,
            policy: None,
            routes: None,
            peer_identities: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Settings {
        Settings::example()
    }

    #[test]
    fn annotations_override_defaults() {
        let ann = json!({
            "amazing-proxy.io/app-port": "8080",
            "amazing-proxy.io/opaque-ports": "3306, 5432,3306",
            "amazing-proxy.io/exclude-outbound-cidrs": "10.0.0.0/8,fd00::/8,1.2.3.4",
            "amazing-proxy.io/access-log": "off",
            "amazing-proxy.io/proxy-memory-limit": "64Mi",
            "other.io/x": "kept",
        });
        let s = defaults()
            .with_annotations(ann.as_object(), "metadata.annotations")
            .expect("valid");
        assert_eq!(s.app_port, Some(8080));
        assert_eq!(s.opaque_ports, PortList(vec![3306, 5432]));
        assert_eq!(
            s.exclude_outbound_cidrs.to_string(),
            "10.0.0.0/8,fd00::/8,1.2.3.4/32"
        );
        assert_eq!(s.access_log, AccessLogFormat::Off);
        assert_eq!(s.memory_limit.as_deref(), Some("64Mi"));
        assert_eq!(s.cpu_request.as_deref(), Some("10m"));
    }

    #[test]
    fn bad_values_name_the_annotation() {
        for (key, value) in [
            ("app-port", json!("http")),
            ("app-port", json!(8080)),
            ("inbound-ports", json!("80,0")),
            ("exclude-outbound-cidrs", json!("10.0.0.0/33")),
            ("exclude-outbound-cidrs", json!("10.1.2.3/8")),
            ("drain-delay", json!("-1s")),
            ("drain-delay", json!("2h")),
            ("access-log", json!("yes")),
            ("proxy-cpu-request", json!("lots")),
            ("drain-delay", json!("5 parsecs")),
            ("disable-outbound", json!("yes")),
            ("app-prot", json!("80")),
            ("identity", json!("istio")),
            ("pod-certificate-signer", json!("spiffe")),
            ("policy", json!("Policy_1")),
            ("routes", json!("web routes")),
            ("routes", json!("-routes")),
            ("peer-identities", json!("198.18.0.7")),
            (
                "peer-identities",
                json!("198.18.0.7 spiffe://cluster.local/ns/a"),
            ),
            (
                "peer-identities",
                json!("10.1.2.3/8 spiffe://cluster.local/ns/a/sa/b"),
            ),
            ("peer-identities", json!(" # nothing\n;")),
            // Valid entries, but the pod has no identity (the default): nothing would use them.
            (
                "peer-identities",
                json!("198.18.0.7 spiffe://cluster.local/ns/a/sa/b"),
            ),
        ] {
            let key = format!("{PREFIX}{key}");
            let ann = json!({ key.clone(): value });
            let err = defaults()
                .with_annotations(ann.as_object(), "metadata.annotations")
                .expect_err(&key);
            assert_eq!(err.field, format!("metadata.annotations[\"{key}\"]"));
        }
    }

    #[test]
    fn peer_identities_are_parsed_and_written_back_on_one_line() {
        let ann = json!({
            "amazing-proxy.io/identity": "spire",
            "amazing-proxy.io/peer-identities": "# the database\n198.18.0.7 spiffe://cluster.local/ns/db/sa/postgres\n198.19.0.0/16 spiffe://partner.example/ns/api/sa/gateway; ",
        });
        let s = defaults()
            .with_annotations(ann.as_object(), "metadata.annotations")
            .expect("valid");
        assert_eq!(
            s.peer_identities.map(|p| p.to_string()).as_deref(),
            Some(
                "198.18.0.7/32 spiffe://cluster.local/ns/db/sa/postgres; 198.19.0.0/16 spiffe://partner.example/ns/api/sa/gateway"
            )
        );
    }

    #[test]
    fn quantities() {
        for ok in ["10m", "0.5", "16Mi", "1", "1e3", "2E-2", "1.5Gi"] {
            assert!(parse_quantity(ok).is_ok(), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "10 m", "16MB", "1e", "-1"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn opt_out_by_annotation_or_label() {
        let meta = json!({"labels": {INJECT: "disabled"}});
        assert_eq!(opted_out(meta.as_object(), "metadata"), Ok(true));
        let meta = json!({"annotations": {INJECT: "false"}});
        assert_eq!(opted_out(meta.as_object(), "metadata"), Ok(true));
        let meta = json!({"annotations": {INJECT: "true"}});
        assert_eq!(opted_out(meta.as_object(), "metadata"), Ok(false));
        assert_eq!(opted_out(None, "metadata"), Ok(false));
        let meta = json!({"annotations": {INJECT: "nope"}});
        assert!(opted_out(meta.as_object(), "metadata").is_err());
    }
}
