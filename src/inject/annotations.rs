//! The injection settings of one pod: flag defaults, overridden by `amazing-proxy.io/*` annotations
//! on the pod template.
//!
//! Every value is parsed and checked here, before anything is built, so that a typo in an annotation
//! is an error naming the annotation rather than a pod whose init container crashes at start. The
//! same parsers serve the flags (through clap) and the annotations, so both accept the same syntax.
//! Unknown `amazing-proxy.io/*` annotations are errors too: a misspelt setting silently ignored is
//! worse than a refused manifest.

use std::net::IpAddr;

use serde_json::{Map, Value};

/// Every annotation this module reads or writes shares this prefix.
pub const PREFIX: &str = "amazing-proxy.io/";
/// Written by the injector on every pod template it injects; its value is the injector's version.
pub const INJECTED: &str = "amazing-proxy.io/injected";
/// `"false"` / `"disabled"` skips the pod; as an annotation or as a label (labels also work with
/// the webhook's objectSelector).
pub const INJECT: &str = "amazing-proxy.io/inject";

/// The annotations a pod template may carry (after the prefix); `injected` is ours to write.
pub const KNOWN: &[&str] = &[
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
];

/// What the proxy writes to its access log (`run --access-log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccessLog {
    /// The tutorial's multi-line block.
    Seed,
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

impl AccessLog {
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLog::Seed => "seed",
            AccessLog::Json => "json",
            AccessLog::Off => "off",
        }
    }
}

/// The settings of one injection. The flags give the defaults ([`Settings`] built by clap); the
/// pod template's annotations override them field by field ([`Settings::with_annotations`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub image: String,
    /// Ports whose inbound traffic is redirected to the proxy; empty means all.
    pub inbound_ports: Vec<u16>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<String>,
    /// No outbound redirection at all (`AMAZING_PROXY_NO_OUTBOUND=true`).
    pub disable_outbound: bool,
    pub opaque_ports: Vec<u16>,
    /// `None`: the first containerPort of the first app container, else 80.
    pub app_port: Option<u16>,
    pub access_log: AccessLog,
    pub drain_delay: String,
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

/// An annotation (or flag) whose value does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SettingError {
    /// Where the value is, as a field path (`spec.template.metadata.annotations["..."]`).
    pub field: String,
    pub problem: String,
}

impl Settings {
    /// Overrides the defaults with the `amazing-proxy.io/*` annotations; `field` is the path of the
    /// annotations map, for error messages.
    pub fn with_annotations(
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
                "inbound-ports" => s.inbound_ports = parse_ports(text).map_err(err)?,
                "exclude-inbound-ports" => {
                    s.exclude_inbound_ports = parse_ports(text).map_err(err)?
                }
                "exclude-outbound-ports" => {
                    s.exclude_outbound_ports = parse_ports(text).map_err(err)?
                }
                "exclude-outbound-cidrs" => {
                    s.exclude_outbound_cidrs = parse_cidrs(text).map_err(err)?
                }
                "disable-outbound" => s.disable_outbound = parse_bool(text).map_err(err)?,
                "opaque-ports" => s.opaque_ports = parse_ports(text).map_err(err)?,
                "app-port" => s.app_port = Some(parse_port(text).map_err(err)?),
                "access-log" => s.access_log = parse_access_log(text).map_err(err)?,
                "drain-delay" => s.drain_delay = parse_duration(text).map_err(err)?,
                "proxy-cpu-request" => s.cpu_request = Some(parse_quantity(text).map_err(err)?),
                "proxy-memory-request" => {
                    s.memory_request = Some(parse_quantity(text).map_err(err)?)
                }
                "proxy-cpu-limit" => s.cpu_limit = Some(parse_quantity(text).map_err(err)?),
                "proxy-memory-limit" => s.memory_limit = Some(parse_quantity(text).map_err(err)?),
                other => {
                    return Err(err(format!(
                        "unknown amazing-proxy annotation `{other}`; known: {} (see docs/inject.md)",
                        KNOWN.join(", ")
                    )));
                }
            }
        }
        Ok(s)
    }
}

/// Whether a pod template opts out: `amazing-proxy.io/inject` set to `false`/`disabled` as an
/// annotation or a label. `true`/`enabled` (or absence) means inject; anything else is an error.
pub fn opted_out(metadata: Option<&Map<String, Value>>, field: &str) -> Result<bool, SettingError> {
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

pub fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() || s.chars().any(char::is_whitespace) {
        return Err(format!(
            "expected a container image reference without spaces, got `{s}`"
        ));
    }
    Ok(s.to_string())
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("expected a port 1-65535, got `{s}`")),
    }
}

/// `"80, 443"` → `[80, 443]`; empty → `[]`. Duplicates are kept out so that the env var is tidy.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = parse_port(part).map_err(|_| {
            format!("expected a comma-separated list of ports 1-65535, got `{part}` in `{s}`")
        })?;
        if !ports.contains(&p) {
            ports.push(p);
        }
    }
    Ok(ports)
}

/// `"10.0.0.0/8,fd00::/8"`; a bare address counts as a /32 or /128 and is written as given.
pub fn parse_cidrs(s: &str) -> Result<Vec<String>, String> {
    let mut cidrs = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            format!(
                "expected a comma-separated list of CIDRs such as 10.0.0.0/8 or fd00::/8, got `{part}`"
            )
        };
        let (addr, len) = match part.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (part, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        if let Some(len) = len {
            let max = if ip.is_ipv4() { 32 } else { 128 };
            match len.parse::<u8>() {
                Ok(n) if n <= max => {}
                _ => return Err(bad()),
            }
        }
        if !cidrs.iter().any(|c| c == part) {
            cidrs.push(part.to_string());
        }
    }
    Ok(cidrs)
}

pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("expected \"true\" or \"false\", got `{s}`")),
    }
}

pub fn parse_access_log(s: &str) -> Result<AccessLog, String> {
    match s {
        "seed" => Ok(AccessLog::Seed),
        "json" => Ok(AccessLog::Json),
        "off" => Ok(AccessLog::Off),
        _ => Err(format!("expected seed, json or off, got `{s}`")),
    }
}

/// A duration in the proxy's syntax (`500ms`, `5s`, `1m`), kept as written.
pub fn parse_duration(s: &str) -> Result<String, String> {
    humantime::parse_duration(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("expected a duration such as 500ms, 5s or 1m, got `{s}`: {e}"))
}

/// A Kubernetes resource quantity (`10m`, `0.5`, `16Mi`, `1e3`). Checked here because the API
/// server would reject the whole object with a message that does not name the annotation.
pub fn parse_quantity(s: &str) -> Result<String, String> {
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
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Settings {
        Settings {
            image: "img".into(),
            inbound_ports: vec![],
            exclude_inbound_ports: vec![],
            exclude_outbound_ports: vec![],
            exclude_outbound_cidrs: vec![],
            disable_outbound: false,
            opaque_ports: vec![],
            app_port: None,
            access_log: AccessLog::Json,
            drain_delay: "5s".into(),
            cpu_request: Some("10m".into()),
            memory_request: Some("16Mi".into()),
            cpu_limit: None,
            memory_limit: None,
        }
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
        assert_eq!(s.opaque_ports, vec![3306, 5432]);
        assert_eq!(
            s.exclude_outbound_cidrs,
            vec!["10.0.0.0/8", "fd00::/8", "1.2.3.4"]
        );
        assert_eq!(s.access_log, AccessLog::Off);
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
            ("access-log", json!("yes")),
            ("proxy-cpu-request", json!("lots")),
            ("drain-delay", json!("5 parsecs")),
            ("disable-outbound", json!("yes")),
            ("app-prot", json!("80")),
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
