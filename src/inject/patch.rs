//! The injection itself, as a pure function on a generic JSON tree.
//!
//! The input is patched as a `serde_json::Value`, not deserialised into `k8s-openapi` structs: a typed
//! round trip would drop the fields this version of the structs does not know (newer Kubernetes
//! fields, fields of alpha features, typos the API server would report) and reorder everything.
//! Typed structs are used only to build the two containers we add, so that their shape is checked
//! by the compiler. The cost is that the checks on the input (is `containers` a list, is a port a
//! number) are written by hand here, each naming the field it looked at.
//!
//! Idempotency: a template we injected carries the `amazing-proxy.io/injected` annotation; on such a
//! template our two containers (recognised by name) are removed and freshly computed ones are put in
//! their place, so `inject(inject(x)) == inject(x)` and re-injecting with new settings updates them.
//! Without the annotation, a container with one of our names belongs to someone else: an error.
//!
//! Uninjection ([`uninject_object`]) is the inverse: on a template with that annotation it removes
//! our two containers, the annotation, and the Prometheus annotations if they are the ones we
//! wrote, so `uninject(inject(x)) == x`. Two cases cannot be told apart afterwards and are not
//! restored: a template that had an empty `initContainers: []` or `annotations: {}` loses it, and
//! a template whose own Prometheus annotations were exactly ours (the proxy's admin port, which
//! nothing answers without the proxy) loses them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, HTTPGetAction, Probe, ResourceRequirements,
    SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value};

use super::annotations::{INJECTED, SettingError, Settings, opted_out};
use super::identity::{self, ConfigMaps, IdentityKind};
use crate::vocab::{
    ADMIN_PORT, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID, PortList,
    format_duration,
};

pub const INIT_NAME: &str = "amazing-proxy-init";
pub const SIDECAR_NAME: &str = "amazing-proxy";
/// The injector's version, written in the `amazing-proxy.io/injected` annotation.
pub(crate) const VERSION: &str = env!("CARGO_PKG_VERSION");

/// uid and gid 0: the init container needs root for netfilter.
const ROOT: i64 = 0;

/// The app's port when neither the annotation nor a containerPort names one.
const DEFAULT_APP_PORT: u16 = 80;

/// Where Prometheus finds the proxy's metrics: the annotations most scrape configurations
/// (and the Prometheus Helm chart) follow. Written only on templates without any of these keys,
/// so that a pod's own scrape settings win.
fn prometheus_annotations() -> [(&'static str, String); 3] {
    [
        ("prometheus.io/scrape", "true".into()),
        ("prometheus.io/port", ADMIN_PORT.to_string()),
        ("prometheus.io/path", "/metrics".into()),
    ]
}

/// Container port names that announce HTTP, as Istio reads them; `grpc*`, `h2c*` and `http2*`
/// also announce HTTP/2 to the app.
const HTTP_PORT_PREFIXES: [&str; 3] = ["http", "grpc", "h2c"];
const HTTP2_PORT_PREFIXES: [&str; 3] = ["grpc", "h2c", "http2"];

/// Probes of the injected proxy: (period in seconds, failures tolerated).
/// Startup: up to two minutes, checked every second so that the app is not held back long.
const STARTUP_PROBE: (i32, i32) = (1, 120);
const READINESS_PROBE: (i32, i32) = (2, 1);
const LIVENESS_PROBE: (i32, i32) = (10, 3);

const RESERVED_PORTS: [(u16, &str); 4] = [
    (INBOUND_PORT, "inbound"),
    (OUTBOUND_PORT, "outbound"),
    (ADMIN_PORT, "admin"),
    (HBONE_PORT, "HBONE"),
];

/// The injection's inputs other than the object: the defaults (from flags) and the sidecar style.
#[derive(Clone, Debug)]
pub struct Options {
    pub(crate) defaults: Settings,
    /// Write the proxy as a regular container (clusters older than 1.29, no native sidecars).
    pub(crate) legacy_sidecar: bool,
}

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The pod template now has the sidecar.
    Injected,
    /// The sidecar and what came with it were removed from the pod template.
    Uninjected,
    /// A pod template left as it was, and why.
    Skipped(String),
    /// Not a kind with a pod template: passed through.
    NotAPod,
}

/// Why an object cannot be injected. Every variant names the field, as a path from the object's root.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error(
        "{field}: port {port} is the proxy's {role} port; move the app off ports {INBOUND_PORT}, {OUTBOUND_PORT}, \
         {ADMIN_PORT} and {HBONE_PORT} (the proxy owns them in every injected pod) or opt this pod out with amazing-proxy.io/inject: \"false\""
    )]
    PortConflict {
        field: String,
        port: u16,
        role: &'static str,
    },
    #[error(
        "{field}: the {what} name `{name}` is reserved for the injected proxy; rename this {what} (a template \
         injected by amazing-proxy carries the amazing-proxy.io/injected annotation and is re-injected instead)"
    )]
    NameTaken {
        field: String,
        name: String,
        what: &'static str,
    },
    #[error(
        "{field}: {id} is the proxy's {what}{applies}; the redirection exempts the proxy's {what}, so that \
         container's connections would bypass the proxy and its policy: run it as another {what} or opt this pod out \
         with amazing-proxy.io/inject: \"false\""
    )]
    ProxyIdentity {
        field: String,
        id: i64,
        /// `uid` or `gid`.
        what: &'static str,
        /// For a pod-level setting, the container it applies to (`, which applies to ...`).
        applies: String,
    },
    #[error("{0}")]
    Setting(#[from] SettingError),
    #[error("{field}: expected {expected}")]
    Malformed { field: String, expected: String },
    #[error(
        "not a Kubernetes object: {problem}; only Kubernetes manifests (with apiVersion and kind) can be injected"
    )]
    NotKubernetes { problem: String },
}

impl PatchError {
    fn malformed(field: impl Into<String>, expected: impl Into<String>) -> Self {
        PatchError::Malformed {
            field: field.into(),
            expected: expected.into(),
        }
    }
}

/// Where the pod template is in an object of this apiVersion and kind, if it has one.
fn template_path(api_version: &str, kind: &str) -> Option<&'static [&'static str]> {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    match (group, kind) {
        ("", "Pod") => Some(&[]),
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet") | ("batch", "Job") => {
            Some(&["spec", "template"])
        }
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// `apiVersion` and `kind` of a Kubernetes object, or why it is not one.
pub(crate) fn type_meta(object: &Value) -> Result<(&str, &str), PatchError> {
    let Some(map) = object.as_object() else {
        let problem = format!("expected a mapping, got {}", kind_of(object));
        return Err(PatchError::NotKubernetes { problem });
    };
    let field = |name: &str| match map.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
        Some(other) => Err(PatchError::NotKubernetes {
            problem: format!("`{name}` must be a string, got {}", kind_of(other)),
        }),
        None => Err(PatchError::NotKubernetes {
            problem: format!("`{name}` is missing"),
        }),
    };
    Ok((field("apiVersion")?, field("kind")?))
}

/// The pod template of an object, with its field path (trailing dot; empty for a Pod), or `None`
/// for kinds without one.
fn template_of(object: &mut Value) -> Result<Option<(&mut Value, String)>, PatchError> {
    let (api_version, kind) = type_meta(object)?;
    let Some(path) = template_path(api_version, kind) else {
        return Ok(None);
    };
    let expected = format!("a mapping (the {kind}'s pod template)");
    let mut node = object;
    let mut field = String::new();
    for step in path {
        field.push_str(step);
        field.push('.');
        node = match node.get_mut(*step) {
            Some(next @ Value::Object(_)) => next,
            _ => return Err(PatchError::malformed(field.trim_end_matches('.'), expected)),
        };
    }
    Ok(Some((node, field)))
}

/// Injects one Kubernetes object (not a `List`: see `documents`). Kinds without a pod template come
/// back unchanged with [`Outcome::NotAPod`].
pub fn inject_object(object: &Value, options: &Options) -> Result<(Value, Outcome), PatchError> {
    let mut patched = object.clone();
    let outcome = match template_of(&mut patched)? {
        Some((template, prefix)) => inject_template(template, &prefix, options)?,
        None => Outcome::NotAPod,
    };
    Ok((patched, outcome))
}

/// Removes what [`inject_object`] added. Kinds without a pod template, and templates we did not
/// inject, come back unchanged.
pub(crate) fn uninject_object(object: &Value) -> Result<(Value, Outcome), PatchError> {
    let mut patched = object.clone();
    let outcome = match template_of(&mut patched)? {
        Some((template, prefix)) => uninject_template(template, &prefix)?,
        None => Outcome::NotAPod,
    };
    Ok((patched, outcome))
}

/// A mapping of the input, if present.
type Mapping<'a> = Option<&'a Map<String, Value>>;

/// The template's `metadata` and `metadata.annotations`, each checked to be a mapping if present.
fn metadata_of<'a>(
    template: &'a Map<String, Value>,
    prefix: &str,
) -> Result<(Mapping<'a>, Mapping<'a>), PatchError> {
    let metadata = match template.get("metadata") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(_) => {
            return Err(PatchError::malformed(
                format!("{prefix}metadata"),
                "a mapping",
            ));
        }
    };
    let annotations = match metadata.and_then(|m| m.get("annotations")) {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => Some(a),
        Some(_) => {
            return Err(PatchError::malformed(
                format!("{prefix}metadata.annotations"),
                "a mapping of strings",
            ));
        }
    };
    Ok((metadata, annotations))
}

/// Why a pod spec is never injected, if it is not.
fn never_injected(spec: &Map<String, Value>) -> Option<&'static str> {
    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        // Redirection rules in a host-network pod would apply to the whole node.
        return Some("hostNetwork pods share the node's network and are never injected");
    }
    let os = spec.get("os").and_then(|os| os.get("name"));
    (os.and_then(Value::as_str) == Some("windows"))
        .then_some("Windows pods have no iptables and are never injected")
}

/// Injects a pod template (or a Pod: both have `metadata` and `spec`) in place. `prefix` is the
/// template's field path with a trailing dot (empty for a Pod), for error messages.
pub(crate) fn inject_template(
    template: &mut Value,
    prefix: &str,
    options: &Options,
) -> Result<Outcome, PatchError> {
    let Some(template) = template.as_object_mut() else {
        return Err(PatchError::malformed(
            prefix.trim_end_matches('.'),
            "a mapping (a pod template)",
        ));
    };
    let (metadata, annotations) = metadata_of(template, prefix)?;
    if opted_out(metadata, &format!("{prefix}metadata"))? {
        return Ok(Outcome::Skipped(
            "opted out with amazing-proxy.io/inject".into(),
        ));
    }
    let settings = options
        .defaults
        .with_annotations(annotations, &format!("{prefix}metadata.annotations"))?;
    let ours = annotations.is_some_and(|a| a.contains_key(INJECTED));

    let Some(Value::Object(spec)) = template.get_mut("spec") else {
        return Err(PatchError::malformed(
            format!("{prefix}spec"),
            "a mapping (the pod spec)",
        ));
    };
    if let Some(reason) = never_injected(spec) {
        return Ok(Outcome::Skipped(reason.into()));
    }

    let mut init_containers = take_named(spec, &INIT_CONTAINERS, prefix, ours)?;
    let mut containers = take_named(spec, &CONTAINERS, prefix, ours)?;
    let volumes = take_named(spec, &VOLUMES, prefix, ours)?;
    check_ports(&init_containers, &format!("{prefix}spec.initContainers"))?;
    check_ports(&containers, &format!("{prefix}spec.containers"))?;
    check_run_as(spec, &init_containers, &containers, prefix)?;
    check_settings(&settings, &format!("{prefix}metadata.annotations"))?;
    let app = app_ports(
        &containers,
        settings.app_port,
        &format!("{prefix}spec.containers"),
    )?;

    let init = to_json(init_container(&settings));
    let sidecar = to_json(sidecar_container(&settings, &app, options));
    init_containers.insert(0, init);
    if options.legacy_sidecar {
        containers.push(sidecar);
    } else {
        // Right after the rules: the app's own init containers already have their traffic
        // redirected, so the proxy must be up before them.
        init_containers.insert(1, sidecar);
    }
    spec.insert("initContainers".into(), Value::Array(init_containers));
    spec.insert("containers".into(), Value::Array(containers));
    let added = identity::volumes(
        settings.identity,
        settings.pod_certificate_signer.as_deref(),
        config_maps(&settings),
    );
    put_volumes(spec, volumes, added.into_iter().map(to_json).collect());
    annotate(template, prefix)?;
    Ok(Outcome::Injected)
}

/// Marks the template as ours and, unless it has its own, adds the Prometheus annotations.
fn annotate(template: &mut Map<String, Value>, prefix: &str) -> Result<(), PatchError> {
    let metadata = template
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    let Value::Object(metadata) = metadata else {
        return Err(PatchError::malformed(
            format!("{prefix}metadata"),
            "a mapping",
        ));
    };
    let annotations = metadata
        .entry("annotations")
        .or_insert_with(|| Value::Object(Map::new()));
    if annotations.is_null() {
        *annotations = Value::Object(Map::new());
    }
    if let Value::Object(annotations) = annotations {
        annotations.insert(INJECTED.into(), Value::String(VERSION.into()));
        let prometheus = prometheus_annotations();
        if !prometheus.iter().any(|(k, _)| annotations.contains_key(*k)) {
            for (key, value) in prometheus {
                annotations.insert(key.into(), Value::String(value));
            }
        }
    }
    Ok(())
}

/// Removes what [`inject_template`] added, in place.
pub(crate) fn uninject_template(template: &mut Value, prefix: &str) -> Result<Outcome, PatchError> {
    let Some(template) = template.as_object_mut() else {
        return Err(PatchError::malformed(
            prefix.trim_end_matches('.'),
            "a mapping (a pod template)",
        ));
    };
    let (_, annotations) = metadata_of(template, prefix)?;
    if !annotations.is_some_and(|a| a.contains_key(INJECTED)) {
        return Ok(Outcome::Skipped(format!(
            "not injected by amazing-proxy (no {INJECTED} annotation)"
        )));
    }
    if let Some(Value::Object(spec)) = template.get_mut("spec") {
        for list in [&INIT_CONTAINERS, &CONTAINERS] {
            if !spec.contains_key(list.key) {
                continue;
            }
            let kept = take_named(spec, list, prefix, true)?;
            if kept.is_empty() && list.key == "initContainers" {
                spec.shift_remove(list.key);
            } else {
                spec.insert(list.key.into(), Value::Array(kept));
            }
        }
        let kept = take_named(spec, &VOLUMES, prefix, true)?;
        put_volumes(spec, kept, Vec::new());
    }
    let Some(Value::Object(metadata)) = template.get_mut("metadata") else {
        return Ok(Outcome::Uninjected);
    };
    if let Some(Value::Object(annotations)) = metadata.get_mut("annotations") {
        annotations.shift_remove(INJECTED);
        let prometheus = prometheus_annotations();
        if prometheus
            .iter()
            .all(|(k, v)| annotations.get(*k).and_then(Value::as_str) == Some(v.as_str()))
        {
            for (key, _) in prometheus {
                annotations.shift_remove(key);
            }
        }
        if annotations.is_empty() {
            metadata.shift_remove("annotations");
        }
    }
    if metadata.is_empty() {
        template.shift_remove("metadata");
    }
    Ok(Outcome::Uninjected)
}

/// A list of the pod spec in which some names are ours.
struct Named {
    key: &'static str,
    ours: &'static [&'static str],
    /// What an item is, for messages.
    what: &'static str,
}

const INIT_CONTAINERS: Named = Named {
    key: "initContainers",
    ours: &[INIT_NAME, SIDECAR_NAME],
    what: "container",
};
const CONTAINERS: Named = Named {
    key: "containers",
    ours: &[INIT_NAME, SIDECAR_NAME],
    what: "container",
};
const VOLUMES: Named = Named {
    key: "volumes",
    ours: &identity::VOLUMES,
    what: "volume",
};

/// The items of `spec[list.key]` without ours (if this template is ours to re-inject; else an item
/// with one of our names is an error).
fn take_named(
    spec: &Map<String, Value>,
    list: &Named,
    prefix: &str,
    ours: bool,
) -> Result<Vec<Value>, PatchError> {
    let Named { key, what, .. } = list;
    let items = match spec.get(*key) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(PatchError::malformed(
                format!("{prefix}spec.{key}"),
                format!("a list of {what}s"),
            ));
        }
    };
    let mut kept = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("{prefix}spec.{key}[{i}]");
        let Some(c) = item.as_object() else {
            return Err(PatchError::malformed(
                field,
                format!("a mapping (a {what})"),
            ));
        };
        match c.get("name").and_then(Value::as_str) {
            Some(name) if list.ours.contains(&name) => {
                if !ours {
                    return Err(PatchError::NameTaken {
                        field: format!("{field}.name"),
                        name: name.into(),
                        what,
                    });
                }
            }
            _ => kept.push(item.clone()),
        }
    }
    Ok(kept)
}

/// Sets the pod's volumes to `kept` then `added`. A list that ends up empty is removed if it held
/// ours, and left as it was otherwise (a pod's own `volumes: []` stays).
fn put_volumes(spec: &mut Map<String, Value>, kept: Vec<Value>, added: Vec<Value>) {
    let before = spec
        .get(VOLUMES.key)
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let removed_ours = before != kept.len();
    let mut volumes = kept;
    volumes.extend(added);
    if !volumes.is_empty() {
        spec.insert(VOLUMES.key.into(), Value::Array(volumes));
    } else if removed_ours {
        spec.shift_remove(VOLUMES.key);
    }
}

/// A container port: its field path, its number and the whole port entry.
type PortEntry<'a> = (String, u16, &'a Map<String, Value>);

/// The ports of one container; malformed ports are errors.
fn container_ports<'a>(
    container: &'a Value,
    field: &str,
) -> Result<Vec<PortEntry<'a>>, PatchError> {
    let mut out = Vec::new();
    match container.get("ports") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ports)) => {
            for (j, port) in ports.iter().enumerate() {
                let pfield = format!("{field}.ports[{j}]");
                let Some(p) = port.as_object() else {
                    return Err(PatchError::malformed(pfield, "a mapping (a port)"));
                };
                let cfield = format!("{pfield}.containerPort");
                let number = p.get("containerPort").and_then(Value::as_u64);
                match number
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|&n| n != 0)
                {
                    Some(n) => out.push((cfield, n, p)),
                    _ => return Err(PatchError::malformed(cfield, "a port number 1-65535")),
                }
            }
        }
        Some(_) => {
            return Err(PatchError::malformed(
                format!("{field}.ports"),
                "a list of ports",
            ));
        }
    }
    Ok(out)
}

fn check_ports(containers: &[Value], field: &str) -> Result<(), PatchError> {
    for (i, container) in containers.iter().enumerate() {
        // Indexes are those of the list without our containers, which only differ when re-injecting
        // (ours come first), so they are the user's indexes.
        for (pfield, port, _) in container_ports(container, &format!("{field}[{i}]"))? {
            if let Some((port, role)) = RESERVED_PORTS.iter().find(|(p, _)| *p == port) {
                return Err(PatchError::PortConflict {
                    field: pfield,
                    port: *port,
                    role,
                });
            }
        }
    }
    Ok(())
}

/// The ids `init` exempts from the redirection, by the securityContext field that sets each.
const PROXY_IDS: [(&str, u32, &str); 2] = [
    ("runAsUser", PROXY_UID, "uid"),
    ("runAsGroup", PROXY_GID, "gid"),
];

/// `securityContext.<key>` of a container or pod spec, with its field path, if set.
fn run_as(
    owner: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<(i64, String)>, PatchError> {
    let context = match owner.get("securityContext") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(c)) => c,
        Some(_) => {
            return Err(PatchError::malformed(
                format!("{field}.securityContext"),
                "a mapping",
            ));
        }
    };
    let at = format!("{field}.securityContext.{key}");
    match context.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(id) => Ok(Some((id, at))),
            None => Err(PatchError::malformed(at, "an integer")),
        },
    }
}

/// No app container runs as the proxy's uid or gid: `init` lets the proxy's own connections
/// out unredirected by matching those ids, so such a container would skip the proxy. A
/// container's own setting wins over the pod's, as in Kubernetes. (An image whose USER is the
/// proxy's uid, with no runAsUser in the manifest, cannot be seen from here.)
fn check_run_as(
    spec: &Map<String, Value>,
    init_containers: &[Value],
    containers: &[Value],
    prefix: &str,
) -> Result<(), PatchError> {
    let lists = [
        ("initContainers", init_containers),
        ("containers", containers),
    ];
    for (key, proxy_id, what) in PROXY_IDS {
        let pod_level = run_as(spec, key, &format!("{prefix}spec"))?;
        for (list, items) in lists {
            for (i, container) in items.iter().enumerate() {
                // Indexes as in `check_ports`: the user's, without our containers.
                let cfield = format!("{prefix}spec.{list}[{i}]");
                let Some(c) = container.as_object() else {
                    continue;
                };
                let (effective, applies) = match run_as(c, key, &cfield)? {
                    Some(own) => (Some(own), String::new()),
                    None => (pod_level.clone(), format!(", which applies to {cfield}")),
                };
                if let Some((id, field)) = effective
                    && id == i64::from(proxy_id)
                {
                    return Err(PatchError::ProxyIdentity {
                        field,
                        id,
                        what,
                        applies,
                    });
                }
            }
        }
    }
    Ok(())
}

fn check_settings(s: &Settings, field: &str) -> Result<(), PatchError> {
    let at = |name: &str| format!("{field}[\"amazing-proxy.io/{name}\"]");
    let reserved = |port: u16| RESERVED_PORTS.iter().find(|(p, _)| *p == port);
    if let Some(port) = s.app_port
        && let Some((port, role)) = reserved(port)
    {
        return Err(PatchError::PortConflict {
            field: at("app-port"),
            port: *port,
            role,
        });
    }
    for port in &s.inbound_ports.0 {
        if let Some((port, role)) = reserved(*port) {
            return Err(PatchError::PortConflict {
                field: at("inbound-ports"),
                port: *port,
                role,
            });
        }
        if s.exclude_inbound_ports.contains(*port) {
            return Err(SettingError {
                field: at("exclude-inbound-ports"),
                problem: format!("port {port} is also in amazing-proxy.io/inbound-ports; list it in one of the two"),
            }
            .into());
        }
    }
    check_identity(s, field)
}

/// Pod certificates need their signer.
fn check_identity(s: &Settings, field: &str) -> Result<(), PatchError> {
    if s.identity == IdentityKind::PodCertificate && s.pod_certificate_signer.is_none() {
        return Err(SettingError {
            field: format!("{field}[\"amazing-proxy.io/identity\"]"),
            problem: "pod-certificate needs the signer that issues the pod's certificates: set amazing-proxy.io/pod-certificate-signer (or inject --pod-certificate-signer) to its name, e.g. example.com/spiffe".into(),
        }
        .into());
    }
    Ok(())
}

/// What the sidecar is told about the app, from its containers' ports.
struct AppPorts {
    /// Where connections without an original destination go: the annotation's port, else the
    /// first TCP containerPort of the first app container, else [`DEFAULT_APP_PORT`].
    app: u16,
    /// Ports named `http*`, `grpc*` or `h2c*` (`run --http-ports`).
    http: PortList,
    /// Ports named `grpc*`, `h2c*` or `http2*` (`run --http2-ports`).
    http2: PortList,
}

fn app_ports(
    containers: &[Value],
    app_port: Option<u16>,
    field: &str,
) -> Result<AppPorts, PatchError> {
    let mut first_tcp = None;
    let (mut http, mut http2) = (Vec::new(), Vec::new());
    for (i, container) in containers.iter().enumerate() {
        for (_, port, p) in container_ports(container, &format!("{field}[{i}]"))? {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP");
            if !tcp {
                continue;
            }
            if i == 0 && first_tcp.is_none() {
                first_tcp = Some(port);
            }
            let name = p.get("name").and_then(Value::as_str).unwrap_or("");
            if HTTP_PORT_PREFIXES.iter().any(|pre| name.starts_with(pre)) {
                http.push(port);
            }
            if HTTP2_PORT_PREFIXES.iter().any(|pre| name.starts_with(pre)) {
                http2.push(port);
            }
        }
    }
    Ok(AppPorts {
        app: app_port.or(first_tcp).unwrap_or(DEFAULT_APP_PORT),
        http: http.into_iter().collect(),
        http2: http2.into_iter().collect(),
    })
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn resources(s: &Settings) -> Option<ResourceRequirements> {
    let map = |cpu: &Option<String>, memory: &Option<String>| {
        let m: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), Quantity(v.clone()))))
            .collect();
        (!m.is_empty()).then_some(m)
    };
    let requests = map(&s.cpu_request, &s.memory_request);
    let limits = map(&s.cpu_limit, &s.memory_limit);
    (requests.is_some() || limits.is_some()).then(|| ResourceRequirements {
        requests,
        limits,
        ..Default::default()
    })
}

fn init_container(s: &Settings) -> Container {
    let mut vars = vec![
        env("AMAZING_PROXY_INBOUND_PORT", INBOUND_PORT.to_string()),
        env("AMAZING_PROXY_OUTBOUND_PORT", OUTBOUND_PORT.to_string()),
        env("AMAZING_PROXY_ADMIN_PORT", ADMIN_PORT.to_string()),
        env("AMAZING_PROXY_PROXY_UID", PROXY_UID.to_string()),
        env("AMAZING_PROXY_PROXY_GID", PROXY_GID.to_string()),
    ];
    // Empty lists are left out: absent and empty mean the same to `init`, and short specs read better.
    for (name, value) in [
        ("AMAZING_PROXY_INBOUND_PORTS", s.inbound_ports.to_string()),
        (
            "AMAZING_PROXY_EXCLUDE_INBOUND_PORTS",
            s.exclude_inbound_ports.to_string(),
        ),
        (
            "AMAZING_PROXY_EXCLUDE_OUTBOUND_PORTS",
            s.exclude_outbound_ports.to_string(),
        ),
        (
            "AMAZING_PROXY_EXCLUDE_OUTBOUND_CIDRS",
            s.exclude_outbound_cidrs.to_string(),
        ),
    ] {
        if !value.is_empty() {
            vars.push(env(name, value));
        }
    }
    if s.disable_outbound {
        vars.push(env("AMAZING_PROXY_NO_OUTBOUND", "true"));
    }
    Container {
        name: INIT_NAME.into(),
        image: Some(s.image.clone()),
        args: Some(vec!["init".into()]),
        env: Some(vars),
        resources: resources(s),
        // Root with exactly the two capabilities netfilter needs; the root filesystem stays
        // writable because iptables takes its lock under /run.
        security_context: Some(SecurityContext {
            run_as_user: Some(ROOT),
            run_as_group: Some(ROOT),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn probe(path: &str, (period, failure_threshold): (i32, i32)) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(i32::from(ADMIN_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    }
}

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// The ConfigMaps the pod's annotations name for the proxy to read.
fn config_maps(s: &Settings) -> ConfigMaps<'_> {
    ConfigMaps {
        policy: s.policy.as_deref(),
        routes: s.routes.as_deref(),
    }
}

fn sidecar_container(s: &Settings, app: &AppPorts, options: &Options) -> Container {
    let outbound = if s.disable_outbound {
        "off".to_string()
    } else {
        format!("127.0.0.1:{OUTBOUND_PORT}")
    };
    let mut vars = vec![
        env("AMAZING_PROXY_INBOUND", format!("0.0.0.0:{INBOUND_PORT}")),
        env("AMAZING_PROXY_OUTBOUND", outbound),
        // Not loopback: kubelet probes come from the node.
        env("AMAZING_PROXY_ADMIN", format!("0.0.0.0:{ADMIN_PORT}")),
        env("AMAZING_PROXY_APP", format!("127.0.0.1:{}", app.app)),
        env("AMAZING_PROXY_ACCESS_LOG", s.access_log.as_str()),
        env("AMAZING_PROXY_DRAIN_DELAY", format_duration(s.drain_delay)),
    ];
    for (name, ports) in [
        ("AMAZING_PROXY_OPAQUE_PORTS", &s.opaque_ports),
        ("AMAZING_PROXY_HTTP_PORTS", &app.http),
        ("AMAZING_PROXY_HTTP2_PORTS", &app.http2),
    ] {
        if !ports.is_empty() {
            vars.push(env(name, ports.to_string()));
        }
    }
    vars.extend(identity::env(s.identity, config_maps(s)));
    if let Some(peers) = &s.peer_identities {
        vars.push(env(
            "AMAZING_PROXY_PEER_IDENTITIES_INLINE",
            peers.to_string(),
        ));
    }
    vars.extend(identity::downward_env(s.identity));
    let mounts = identity::mounts(s.identity, config_maps(s));
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(s.image.clone()),
        args: Some(vec!["run".into()]),
        env: Some(vars),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ports: Some(vec![
            port("proxy-inbound", INBOUND_PORT),
            port("proxy-admin", ADMIN_PORT),
            // Peers' HBONE tunnels (mutual TLS); `init` leaves it out of the redirection.
            port("proxy-hbone", HBONE_PORT),
        ]),
        // A native sidecar: an init container that keeps running; the next init container (and the
        // app) starts only once its startup probe passes.
        restart_policy: (!options.legacy_sidecar).then(|| "Always".to_string()),
        startup_probe: Some(probe("/ready", STARTUP_PROBE)),
        readiness_probe: Some(probe("/ready", READINESS_PROBE)),
        liveness_probe: Some(probe("/live", LIVENESS_PROBE)),
        resources: resources(s),
        security_context: Some(SecurityContext {
            run_as_user: Some(i64::from(PROXY_UID)),
            run_as_group: Some(i64::from(PROXY_GID)),
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A built container or volume as JSON, with `name` first so that the output reads like a
/// hand-written spec.
fn to_json(item: impl serde::Serialize) -> Value {
    let mut out = Map::new();
    // Serialising our own struct cannot fail (no maps with non-string keys, no floats).
    if let Ok(Value::Object(mut fields)) = serde_json::to_value(&item) {
        if let Some(name) = fields.shift_remove("name") {
            out.insert("name".into(), name);
        }
        out.extend(fields);
    }
    Value::Object(out)
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(legacy: bool) -> Options {
        Options {
            defaults: Settings {
                image: "img:1".into(),
                ..Settings::example()
            },
            legacy_sidecar: legacy,
        }
    }

    fn pod(containers: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": containers}})
    }

    fn names(v: &Value, key: &str) -> Vec<String> {
        v["spec"][key]
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|c| c["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
        c["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
    }

    #[test]
    fn native_sidecar_and_app_port() {
        let input = pod(
            json!([{"name": "app", "image": "a", "ports": [{"containerPort": 9090, "protocol": "UDP"}, {"containerPort": 8080}]}]),
        );
        let (out, outcome) = inject_object(&input, &options(false)).expect("injects");
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(names(&out, "initContainers"), [INIT_NAME, SIDECAR_NAME]);
        assert_eq!(names(&out, "containers"), ["app"]);
        let sidecar = &out["spec"]["initContainers"][1];
        assert_eq!(sidecar["restartPolicy"], "Always");
        assert_eq!(env_of(sidecar, "AMAZING_PROXY_APP"), Some("127.0.0.1:8080"));
        assert_eq!(out["metadata"]["annotations"][INJECTED], VERSION);
    }

    #[test]
    fn legacy_sidecar_is_a_container_and_reinjection_switches() {
        let input = pod(json!([{"name": "app", "image": "a"}]));
        let (legacy, _) = inject_object(&input, &options(true)).expect("injects");
        assert_eq!(names(&legacy, "initContainers"), [INIT_NAME]);
        assert_eq!(names(&legacy, "containers"), ["app", SIDECAR_NAME]);
        assert_eq!(
            env_of(&legacy["spec"]["containers"][1], "AMAZING_PROXY_APP"),
            Some("127.0.0.1:80")
        );
        let (native, _) = inject_object(&legacy, &options(false)).expect("re-injects");
        assert_eq!(
            native,
            inject_object(&input, &options(false)).expect("injects").0
        );
    }

    #[test]
    fn idempotent() {
        let input = pod(json!([{"name": "app", "image": "a", "unknownField": {"x": 1}}]));
        let (once, _) = inject_object(&input, &options(false)).expect("injects");
        let (twice, _) = inject_object(&once, &options(false)).expect("re-injects");
        assert_eq!(once, twice);
        assert_eq!(
            once["spec"]["containers"][0]["unknownField"],
            json!({"x": 1})
        );
    }

    #[test]
    fn conflicts_name_the_field() {
        let err = inject_object(&pod(json!([{"name": "app", "ports": [{"containerPort": 80}, {"containerPort": 15001}]}])), &options(false))
            .expect_err("conflict");
        assert!(
            matches!(&err, PatchError::PortConflict { field, port: 15001, .. } if field == "spec.containers[0].ports[1].containerPort")
        );
        let err = inject_object(
            &pod(json!([{"name": "app"}, {"name": "amazing-proxy"}])),
            &options(false),
        )
        .expect_err("taken");
        assert!(
            matches!(&err, PatchError::NameTaken { field, .. } if field == "spec.containers[1].name")
        );
        let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"template": {
            "metadata": {"annotations": {"amazing-proxy.io/app-port": "8000"}}, "spec": {"containers": []}}}});
        let err = inject_object(&deploy, &options(false)).expect_err("app port");
        assert!(
            err.to_string().starts_with(
                "spec.template.metadata.annotations[\"amazing-proxy.io/app-port\"]: port 8000"
            ),
            "{err}"
        );
    }

    #[test]
    fn app_containers_running_as_the_proxy_are_refused() {
        let refused = |p: Value| {
            inject_object(&p, &options(false))
                .expect_err("runs as the proxy")
                .to_string()
        };
        let mut own =
            pod(json!([{"name": "app"}, {"name": "side", "securityContext": {"runAsUser": 1337}}]));
        assert!(
            refused(own.clone()).starts_with(
                "spec.containers[1].securityContext.runAsUser: 1337 is the proxy's uid; the redirection exempts the proxy's uid"
            ),
            "{}",
            refused(own.clone())
        );
        own["spec"]["containers"][1]["securityContext"] =
            json!({"runAsUser": 1000, "runAsGroup": 1337});
        assert!(refused(own).starts_with(
            "spec.containers[1].securityContext.runAsGroup: 1337 is the proxy's gid;"
        ));
        // The pod's setting applies to the containers that set none of their own, init ones too.
        let mut pod_level = pod(json!([{"name": "app", "securityContext": {"runAsUser": 1000}}]));
        pod_level["spec"]["securityContext"] = json!({"runAsUser": 1337});
        pod_level["spec"]["initContainers"] = json!([{"name": "migrate"}]);
        assert!(
            refused(pod_level.clone()).starts_with(
                "spec.securityContext.runAsUser: 1337 is the proxy's uid, which applies to spec.initContainers[0];"
            ),
            "{}",
            refused(pod_level.clone())
        );
        // Once every container has its own uid, the pod's no longer applies to any of them.
        pod_level["spec"]["initContainers"][0]["securityContext"] = json!({"runAsUser": 1001});
        let (out, _) =
            inject_object(&pod_level, &options(false)).expect("no container runs as 1337");
        assert_eq!(
            out["spec"]["initContainers"][1]["securityContext"]["runAsUser"], 1337,
            "the proxy does"
        );
        // Re-injecting is checked the same way (our own containers are not the app's).
        let (again, _) = inject_object(&out, &options(false)).expect("re-injects");
        assert_eq!(again, out);
        let mut bad = pod(json!([{"name": "app", "securityContext": {"runAsUser": "1337"}}]));
        assert!(
            refused(bad.clone())
                .starts_with("spec.containers[0].securityContext.runAsUser: expected an integer")
        );
        bad["spec"]["containers"][0]["securityContext"] = json!("root");
        assert!(refused(bad).starts_with("spec.containers[0].securityContext: expected a mapping"));
    }

    #[test]
    fn skips_and_passes_through() {
        let mut p = pod(json!([{"name": "app"}]));
        p["metadata"]["labels"] = json!({"amazing-proxy.io/inject": "disabled"});
        assert!(
            matches!(inject_object(&p, &options(false)), Ok((ref v, Outcome::Skipped(_))) if *v == p)
        );
        let mut p = pod(json!([{"name": "app"}]));
        p["spec"]["hostNetwork"] = json!(true);
        assert!(matches!(
            inject_object(&p, &options(false)),
            Ok((_, Outcome::Skipped(_)))
        ));
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "b"}});
        assert_eq!(
            inject_object(&cm, &options(false)),
            Ok((cm.clone(), Outcome::NotAPod))
        );
        // A kind named like ours in another group is someone else's.
        let crd = json!({"apiVersion": "example.com/v1", "kind": "Deployment", "spec": {}});
        assert_eq!(
            inject_object(&crd, &options(false)),
            Ok((crd.clone(), Outcome::NotAPod))
        );
        assert!(matches!(
            inject_object(&json!({"kind": "Pod"}), &options(false)),
            Err(PatchError::NotKubernetes { .. })
        ));
        assert!(matches!(
            inject_object(&json!("text"), &options(false)),
            Err(PatchError::NotKubernetes { .. })
        ));
    }

    #[test]
    fn cronjob_template_is_found() {
        let cj = json!({"apiVersion": "batch/v1", "kind": "CronJob", "spec": {"schedule": "* * * * *",
            "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "c"}], "restartPolicy": "OnFailure"}}}}}});
        let (out, outcome) = inject_object(&cj, &options(false)).expect("injects");
        assert_eq!(outcome, Outcome::Injected);
        assert_eq!(
            out["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][1]["name"],
            SIDECAR_NAME
        );
        let bad = json!({"apiVersion": "batch/v1", "kind": "CronJob", "spec": {}});
        let err = inject_object(&bad, &options(false)).expect_err("no template");
        assert!(
            err.to_string()
                .starts_with("spec.jobTemplate: expected a mapping"),
            "{err}"
        );
    }

    fn with_annotations(mut p: Value, annotations: Value) -> Value {
        p["metadata"]["annotations"] = annotations;
        p
    }

    #[test]
    fn identity_volumes_follow_the_annotations_on_reinjection() {
        let input = with_annotations(
            pod(json!([{"name": "app", "image": "a"}])),
            json!({"amazing-proxy.io/identity": "spire", "amazing-proxy.io/policy": "p", "amazing-proxy.io/routes": "r"}),
        );
        let (spire, _) = inject_object(&input, &options(false)).expect("injects");
        let volume_names = |v: &Value| -> Vec<String> {
            v["spec"]["volumes"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|v| v["name"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            volume_names(&spire),
            [
                "amazing-proxy-identity",
                "amazing-proxy-policy",
                "amazing-proxy-routes"
            ]
        );
        assert_eq!(spire["spec"]["volumes"][2]["configMap"]["name"], "r");
        let sidecar = &spire["spec"]["initContainers"][1];
        assert_eq!(
            env_of(sidecar, "AMAZING_PROXY_IDENTITY_SPIRE_SOCKET"),
            Some("/spiffe-workload-api/spire-agent.sock")
        );
        assert_eq!(
            env_of(sidecar, "AMAZING_PROXY_ROUTES"),
            Some("/etc/amazing-proxy/routes/routes.yaml")
        );
        assert_eq!(
            sidecar["volumeMounts"][2],
            json!({"name": "amazing-proxy-routes", "mountPath": "/etc/amazing-proxy/routes", "readOnly": true})
        );
        // Switching to no identity, no policy and no routes takes everything back out.
        let mut none = spire.clone();
        none["metadata"]["annotations"]["amazing-proxy.io/identity"] = json!("none");
        let annotations = none["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations");
        annotations.shift_remove("amazing-proxy.io/policy");
        annotations.shift_remove("amazing-proxy.io/routes");
        let (plain, _) = inject_object(&none, &options(false)).expect("re-injects");
        assert!(plain["spec"].get("volumes").is_none(), "{plain}");
        let sidecar = &plain["spec"]["initContainers"][1];
        assert!(sidecar.get("volumeMounts").is_none());
        assert_eq!(env_of(sidecar, "AMAZING_PROXY_IDENTITY_SPIRE_SOCKET"), None);
        assert_eq!(env_of(sidecar, "AMAZING_PROXY_POLICY"), None);
        assert_eq!(env_of(sidecar, "AMAZING_PROXY_ROUTES"), None);
    }

    #[test]
    fn identity_volume_names_are_ours() {
        let spire = json!({"amazing-proxy.io/identity": "spire"});
        let mut volume = with_annotations(pod(json!([{"name": "app"}])), spire);
        volume["spec"]["volumes"] = json!([{"name": "amazing-proxy-identity", "emptyDir": {}}]);
        let err = inject_object(&volume, &options(false)).expect_err("volume name");
        assert_eq!(
            err.to_string().split(';').next(),
            Some(
                "spec.volumes[0].name: the volume name `amazing-proxy-identity` is reserved for the injected proxy"
            )
        );
    }
}
