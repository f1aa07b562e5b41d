//! Authorization: which peers may reach which inbound port, and for HTTP which methods and paths.
//!
//! The policy is a YAML file (`--policy`, schema in docs/policy.md) read and validated once; errors
//! name the field. Deciding is pure: the data plane asks with the port, the peer's SPIFFE ID (None
//! for plaintext) and, for an HTTP request, its method and path, and gets [`Decision`].
//!
//! A port with rules allows exactly what one of its rules allows. A port without rules gets the
//! default, named as Linkerd names its default policies. `audit` never refuses: what no rule allows is
//! let through as [`Decision::Audit`], for the caller to log, so that a policy can be tried on live
//! traffic before it is enforced.
//!
//! Plaintext peers (kubelet probes from the node, clients outside the mesh) are unauthenticated: only
//! `all-unauthenticated` and rules with `unauthenticated: true` let them in. A policy that keeps
//! `cluster-authenticated` as its default and must keep probes working gives the probed port a rule
//! with `unauthenticated: true` limited to the probe paths (docs/policy.md has the example).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::identity::SpiffeId;
use crate::vocab::{is_normal_path, parse_method, path_has_prefix};

/// The trust domain a policy calls "ours" until told otherwise (`--trust-domain`'s default).
pub(crate) const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// What the data plane does with a connection or request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Allow,
    /// Allowed because the default is `audit`, though nothing allows it: log `reason`.
    Audit {
        reason: String,
    },
    /// Refuse: a TCP or HBONE stream is closed (403 on HBONE), an HTTP request gets 403 with `reason`.
    Deny {
        reason: String,
    },
}

#[cfg(test)]
impl Decision {
    fn is_allowed(&self) -> bool {
        !matches!(self, Decision::Deny { .. })
    }
}

/// What ports without rules allow (Linkerd's default policy names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Default {
    /// Everyone, plaintext included.
    AllUnauthenticated,
    /// Any peer with a verified certificate, of any trust domain.
    AllAuthenticated,
    /// A peer with a verified certificate of our trust domain.
    ClusterAuthenticated,
    /// No one.
    Deny,
    /// Everyone, and what a rule does not allow is logged as an audit.
    Audit,
}

impl fmt::Display for Default {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Default::AllUnauthenticated => "all-unauthenticated",
            Default::AllAuthenticated => "all-authenticated",
            Default::ClusterAuthenticated => "cluster-authenticated",
            Default::Deny => "deny",
            Default::Audit => "audit",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    #[error("cannot read the policy {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid policy{}: {message}", source_name(.path))]
    Invalid {
        path: Option<PathBuf>,
        message: String,
    },
}

fn source_name(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!(" {}", p.display()))
        .unwrap_or_default()
}

// The file's shape, as written; validated into `Policy`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    default: Option<Default>,
    #[serde(default)]
    ports: Vec<PortFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortFile {
    port: u16,
    #[serde(default)]
    allow: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleFile {
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    trust_domains: Vec<String>,
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    unauthenticated: bool,
    #[serde(default)]
    paths: Vec<PathMatch>,
    #[serde(default)]
    methods: Vec<String>,
}

/// An HTTP path rule: `exact` compares the whole path; `prefix` matches whole segments, as Gateway
/// API's PathPrefix (`/api` matches `/api` and `/api/v1`, not `/apis`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) enum PathMatch {
    Exact(String),
    Prefix(String),
}

/// A policy file: where it was read from (to read it again when it changes) and what it said.
#[derive(Clone, Debug)]
pub(crate) struct PolicyFile {
    pub(crate) path: std::path::PathBuf,
    pub(crate) policy: Policy,
}

/// A validated policy.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    default: Default,
    trust_domain: String,
    ports: BTreeMap<u16, Vec<Rule>>,
}

#[derive(Clone, Debug)]
struct Rule {
    identities: Vec<SpiffeId>,
    namespaces: Vec<String>,
    trust_domains: Vec<String>,
    authenticated: bool,
    unauthenticated: bool,
    paths: Vec<PathMatch>,
    methods: Vec<http::Method>,
}

impl Policy {
    /// Parses and validates a policy; our trust domain is [`DEFAULT_TRUST_DOMAIN`] until
    /// [`Policy::with_trust_domain`]. (The unit tests' way in; `run` reads a file.)
    #[cfg(test)]
    fn from_yaml(text: &str) -> Result<Policy, PolicyError> {
        parse(text).map_err(|message| PolicyError::Invalid {
            path: None,
            message,
        })
    }

    /// Reads and validates the policy file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError::Read {
            path: path.to_owned(),
            error,
        })?;
        parse(&text).map_err(|message| PolicyError::Invalid {
            path: Some(path.to_owned()),
            message,
        })
    }

    /// The trust domain `cluster-authenticated` and namespaces are judged in.
    pub(crate) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust domain that `cluster-authenticated` and `namespaces` refer to (`--trust-domain`).
    pub(crate) fn with_trust_domain(mut self, trust_domain: impl Into<String>) -> Policy {
        self.trust_domain = trust_domain.into();
        self
    }

    /// Whether some rule of `port` is limited to HTTP methods or paths (which only a per-request
    /// check can enforce).
    pub(crate) fn limits_http_on(&self, port: u16) -> bool {
        self.ports
            .get(&port)
            .into_iter()
            .flatten()
            .any(|rule| !rule.paths.is_empty() || !rule.methods.is_empty())
    }

    /// May `peer` open a connection (a TCP or HBONE stream) to `port`? Yes when some rule of the port
    /// could allow some of its traffic: HTTP rules then decide request by request through
    /// [`Policy::decide`].
    pub(crate) fn admits_connection(&self, port: u16, peer: Option<&SpiffeId>) -> Decision {
        self.judge(
            port,
            peer,
            |rule| rule.admits(peer, &self.trust_domain),
            || format!("{} may not connect to port {port}", Peer(peer)),
        )
    }

    /// Is this traffic allowed: an HTTP request when `http` is `Some((method, path))` (the path may
    /// carry a query, which is ignored), else a non-HTTP stream (which rules limited to paths or
    /// methods do not allow)?
    pub(crate) fn decide(
        &self,
        port: u16,
        peer: Option<&SpiffeId>,
        http: Option<(&http::Method, &str)>,
    ) -> Decision {
        self.judge(
            port,
            peer,
            |rule| rule.admits(peer, &self.trust_domain) && rule.allows_request(http),
            || match http {
                Some((method, path)) => {
                    format!("{} may not {method} {path} on port {port}", Peer(peer))
                }
                None => format!(
                    "{} may not send non-HTTP traffic to port {port}",
                    Peer(peer)
                ),
            },
        )
    }

    fn judge(
        &self,
        port: u16,
        peer: Option<&SpiffeId>,
        rule_allows: impl Fn(&Rule) -> bool,
        refusal: impl FnOnce() -> String,
    ) -> Decision {
        let rules = self.ports.get(&port);
        let allowed = match rules {
            Some(rules) => rules.iter().any(rule_allows),
            None => match self.default {
                Default::AllUnauthenticated => true,
                Default::AllAuthenticated => peer.is_some(),
                Default::ClusterAuthenticated => {
                    peer.is_some_and(|p| p.trust_domain == self.trust_domain)
                }
                // Nothing allows traffic to a port without rules under `audit`: all of it is audited.
                Default::Deny | Default::Audit => false,
            },
        };
        if allowed {
            return Decision::Allow;
        }
        let reason = match rules {
            Some(_) => format!("{}: no rule of the port allows it", refusal()),
            None => format!("{} (default {})", refusal(), self.default),
        };
        match self.default {
            Default::Audit => Decision::Audit { reason },
            _ => Decision::Deny { reason },
        }
    }
}

/// A peer as reasons name it.
struct Peer<'a>(Option<&'a SpiffeId>);

impl fmt::Display for Peer<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "{id}"),
            None => f.write_str("an unauthenticated peer"),
        }
    }
}

impl Rule {
    fn admits(&self, peer: Option<&SpiffeId>, our_trust_domain: &str) -> bool {
        let Some(peer) = peer else {
            return self.unauthenticated;
        };
        self.authenticated
            || self.identities.contains(peer)
            || self.trust_domains.contains(&peer.trust_domain)
            || (peer.trust_domain == our_trust_domain && self.namespaces.contains(&peer.namespace))
    }

    fn allows_request(&self, http: Option<(&http::Method, &str)>) -> bool {
        let limited = !self.paths.is_empty() || !self.methods.is_empty();
        let Some((method, target)) = http else {
            return !limited;
        };
        let path = target.split(['?', '#']).next().unwrap_or_default();
        (self.methods.is_empty() || self.methods.contains(method))
            && (self.paths.is_empty()
                || (is_normal_path(path) && self.paths.iter().any(|m| m.matches(path))))
    }
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(want) => path == want,
            PathMatch::Prefix(prefix) => path_has_prefix(path, prefix),
        }
    }
}

fn parse(text: &str) -> Result<Policy, String> {
    let file: File = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    let default = file.default.ok_or_else(|| {
        "`default` is missing: give one of all-unauthenticated, all-authenticated, cluster-authenticated, deny, audit".to_owned()
    })?;
    let mut ports = BTreeMap::new();
    for (i, port) in file.ports.into_iter().enumerate() {
        let at = format!("ports[{i}]");
        if port.port == 0 {
            return Err(format!("{at}.port: 0 is not a port; use 1-65535"));
        }
        if port.allow.is_empty() {
            return Err(format!(
                "{at}.allow: port {} has no rules, which would deny it whatever the default; add rules or remove the port",
                port.port
            ));
        }
        let rules = port
            .allow
            .into_iter()
            .enumerate()
            .map(|(j, rule)| validate_rule(rule, &format!("{at}.allow[{j}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if ports.insert(port.port, rules).is_some() {
            return Err(format!(
                "{at}.port: port {} is listed twice; merge its rules into one entry",
                port.port
            ));
        }
    }
    Ok(Policy {
        default,
        trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
        ports,
    })
}

fn validate_rule(rule: RuleFile, at: &str) -> Result<Rule, String> {
    let identities = rule
        .identities
        .iter()
        .enumerate()
        .map(|(k, id)| {
            id.parse::<SpiffeId>()
                .map_err(|e| format!("{at}.identities[{k}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Namespaces and trust domains follow the SpiffeId rules; checked through it so they cannot drift.
    for (k, ns) in rule.namespaces.iter().enumerate() {
        if format!("spiffe://x/ns/{ns}/sa/x")
            .parse::<SpiffeId>()
            .is_err()
        {
            return Err(format!(
                "{at}.namespaces[{k}]: `{ns}` is not a namespace (letters, digits, `.`, `-`, `_`)"
            ));
        }
    }
    for (k, td) in rule.trust_domains.iter().enumerate() {
        if format!("spiffe://{td}/ns/x/sa/x")
            .parse::<SpiffeId>()
            .is_err()
        {
            return Err(format!(
                "{at}.trustDomains[{k}]: `{td}` is not a trust domain (lower-case letters, digits, `.`, `-`, `_`; no spiffe:// prefix)"
            ));
        }
    }
    if identities.is_empty()
        && rule.namespaces.is_empty()
        && rule.trust_domains.is_empty()
        && !rule.authenticated
        && !rule.unauthenticated
    {
        return Err(format!(
            "{at}: the rule allows no peer; give identities, namespaces, trustDomains, `authenticated: true` or `unauthenticated: true`"
        ));
    }
    for (k, path) in rule.paths.iter().enumerate() {
        let (PathMatch::Exact(p) | PathMatch::Prefix(p)) = path;
        if !p.starts_with('/') || !is_normal_path(p) || p.contains(['?', '#']) {
            return Err(format!(
                "{at}.paths[{k}]: `{p}` is not a normalised absolute path (starts with `/`, no `..`, `//`, query or encoded separators)"
            ));
        }
    }
    let methods = rule
        .methods
        .iter()
        .enumerate()
        .map(|(k, m)| parse_method(m).map_err(|e| format!("{at}.methods[{k}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule {
        identities,
        namespaces: rule.namespaces,
        trust_domains: rule.trust_domains,
        authenticated: rule.authenticated,
        unauthenticated: rule.unauthenticated,
        paths: rule.paths,
        methods,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    const POLICY: &str = r#"
default: cluster-authenticated
ports:
  - port: 8080
    allow:
      - identities: [spiffe://cluster.local/ns/shop/sa/frontend]
        methods: [GET, HEAD]
        paths:
          - prefix: /api
          - exact: /version
      - namespaces: [ops]
      - unauthenticated: true
        methods: [GET]
        paths: [{exact: /healthz}]
  - port: 5432
    allow:
      - identities: [spiffe://cluster.local/ns/shop/sa/backend]
      - trustDomains: [partner.example]
"#;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid id")
    }

    /// Port, peer, HTTP method and path, allowed.
    type Case<'a> = (
        u16,
        Option<&'a SpiffeId>,
        Option<(&'a Method, &'a str)>,
        bool,
    );

    #[test]
    fn decisions_follow_rules_and_default() {
        let policy = Policy::from_yaml(POLICY).expect("valid");
        let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
        let backend = id("spiffe://cluster.local/ns/shop/sa/backend");
        let ops = id("spiffe://cluster.local/ns/ops/sa/debug");
        let foreign_ops = id("spiffe://other.org/ns/ops/sa/debug");
        let partner = id("spiffe://partner.example/ns/x/sa/y");
        let get = &Method::GET;
        let post = &Method::POST;
        // (port, peer, http, allowed)
        let cases: &[Case<'_>] = &[
            (8080, Some(&frontend), Some((get, "/api")), true),
            (
                8080,
                Some(&frontend),
                Some((get, "/api/v1/items?x=1")),
                true,
            ),
            (8080, Some(&frontend), Some((get, "/apis")), false),
            (8080, Some(&frontend), Some((get, "/api/../admin")), false),
            (
                8080,
                Some(&frontend),
                Some((get, "/api/%2e%2e/admin")),
                false,
            ),
            (8080, Some(&frontend), Some((get, "/version")), true),
            (8080, Some(&frontend), Some((get, "/version/x")), false),
            (8080, Some(&frontend), Some((&Method::HEAD, "/api")), true),
            (8080, Some(&frontend), Some((post, "/api")), false),
            // A rule limited to HTTP allows no opaque stream.
            (8080, Some(&frontend), None, false),
            (8080, Some(&ops), Some((post, "/anything")), true),
            (8080, Some(&ops), None, true),
            // `namespaces` means namespaces of our trust domain.
            (8080, Some(&foreign_ops), Some((get, "/api")), false),
            (8080, None, Some((get, "/healthz")), true),
            (8080, None, Some((post, "/healthz")), false),
            (8080, None, Some((get, "/api")), false),
            (8080, Some(&backend), Some((get, "/api")), false),
            (5432, Some(&backend), None, true),
            (5432, Some(&partner), None, true),
            (5432, Some(&frontend), None, false),
            (5432, None, None, false),
            // No rules: the default, cluster-authenticated.
            (9000, Some(&frontend), None, true),
            (9000, Some(&partner), None, false),
            (9000, None, Some((get, "/")), false),
        ];
        for &(port, peer, http, allowed) in cases {
            let decision = policy.decide(port, peer, http);
            assert_eq!(
                decision.is_allowed(),
                allowed,
                "{port} {peer:?} {http:?}: {decision:?}"
            );
        }
    }

    #[test]
    fn connections_are_admitted_when_some_rule_could_allow_them() {
        let policy = Policy::from_yaml(POLICY).expect("valid");
        let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
        let stranger = id("spiffe://cluster.local/ns/x/sa/y");
        assert_eq!(
            policy.admits_connection(8080, Some(&frontend)),
            Decision::Allow
        );
        assert_eq!(policy.admits_connection(8080, None), Decision::Allow);
        assert_eq!(
            policy.admits_connection(5432, Some(&stranger)),
            Decision::Deny {
                reason: "spiffe://cluster.local/ns/x/sa/y may not connect to port 5432: no rule of the port allows it".into()
            }
        );
        assert_eq!(
            policy.admits_connection(9000, None),
            Decision::Deny {
                reason: "an unauthenticated peer may not connect to port 9000 (default cluster-authenticated)".into()
            }
        );
    }

    #[test]
    fn each_default_on_a_port_without_rules() {
        let ours = id("spiffe://cluster.local/ns/a/sa/b");
        let theirs = id("spiffe://other.org/ns/a/sa/b");
        // (default, plaintext, other trust domain, ours)
        let cases = [
            ("all-unauthenticated", true, true, true),
            ("all-authenticated", false, true, true),
            ("cluster-authenticated", false, false, true),
            ("deny", false, false, false),
        ];
        for (default, plain, other, same) in cases {
            let policy = Policy::from_yaml(&format!("default: {default}")).expect("valid");
            let got = [None, Some(&theirs), Some(&ours)]
                .map(|peer| policy.decide(1, peer, None) == Decision::Allow);
            assert_eq!(got, [plain, other, same], "{default}");
        }
        // Our trust domain is configurable.
        let policy = Policy::from_yaml("default: cluster-authenticated")
            .expect("valid")
            .with_trust_domain("other.org");
        assert!(policy.decide(1, Some(&theirs), None).is_allowed());
        assert!(!policy.decide(1, Some(&ours), None).is_allowed());
    }

    #[test]
    fn audit_allows_what_rules_would_deny_and_says_why() {
        let policy = Policy::from_yaml(
            "default: audit\nports:\n  - port: 80\n    allow:\n      - namespaces: [web]\n",
        )
        .expect("valid");
        let web = id("spiffe://cluster.local/ns/web/sa/a");
        assert_eq!(policy.decide(80, Some(&web), None), Decision::Allow);
        assert_eq!(
            policy.decide(80, None, Some((&Method::GET, "/x"))),
            Decision::Audit {
                reason: "an unauthenticated peer may not GET /x on port 80: no rule of the port allows it".into()
            }
        );
        assert!(matches!(
            policy.decide(81, Some(&web), None),
            Decision::Audit { .. }
        ));
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases = [
            ("ports: []", "`default` is missing"),
            ("default: permissive", "permissive"),
            ("default: deny\nport: []", "port"),
            (
                "default: deny\nports:\n  - port: 0\n    allow: [{authenticated: true}]",
                "ports[0].port: 0 is not a port",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: []",
                "ports[0].allow: port 80 has no rules",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{methods: [GET]}]",
                "ports[0].allow[0]: the rule allows no peer",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{identities: [spiffe://td/ns/a]}]",
                "ports[0].allow[0].identities[0]: `spiffe://td/ns/a` is not a workload SPIFFE ID",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{namespaces: [a/b]}]",
                "ports[0].allow[0].namespaces[0]: `a/b` is not a namespace",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{trustDomains: [spiffe://x]}]",
                "ports[0].allow[0].trustDomains[0]",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{authenticated: true, paths: [{prefix: api}]}]",
                "ports[0].allow[0].paths[0]: `api` is not a normalised absolute path",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{authenticated: true, methods: [get]}]",
                "ports[0].allow[0].methods[0]: `get` is not an upper-case HTTP method",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{authenticated: true}]\n  - port: 80\n    allow: [{authenticated: true}]",
                "ports[1].port: port 80 is listed twice",
            ),
            (
                "default: deny\nports:\n  - port: 80\n    allow: [{authenticated: true, verbs: [GET]}]",
                "verbs",
            ),
        ];
        for (yaml, wanted) in cases {
            let err = Policy::from_yaml(yaml).expect_err(yaml).to_string();
            assert!(err.contains(wanted), "{yaml}\n-> {err}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("policy.yaml");
        let err = Policy::load(&path).expect_err("missing").to_string();
        assert!(err.contains("cannot read the policy") && err.contains("policy.yaml"));
        std::fs::write(&path, "default: nope").expect("write");
        let err = Policy::load(&path).expect_err("invalid").to_string();
        assert!(
            err.starts_with(&format!("invalid policy {}: ", path.display())),
            "{err}"
        );
    }

    /// The examples of docs/policy.md load, and mean what their comments say.
    #[test]
    fn documented_examples() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/policy-examples");
        let load = |name: &str| Policy::load(&dir.join(name)).expect(name);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("docs/policy-examples")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["audit.yaml", "cluster-with-probes.yaml", "shop.yaml"]
        );
        let get = &Method::GET;
        let frontend = id("spiffe://cluster.local/ns/shop/sa/frontend");
        let prometheus = id("spiffe://cluster.local/ns/monitoring/sa/prometheus");
        let partner = id("spiffe://partner.example/ns/shop/sa/frontend");

        let probes = load("cluster-with-probes.yaml");
        assert!(
            probes
                .decide(8080, None, Some((get, "/healthz")))
                .is_allowed()
        );
        assert!(!probes.decide(8080, None, Some((get, "/"))).is_allowed());
        assert!(
            probes
                .decide(8080, Some(&frontend), Some((get, "/")))
                .is_allowed()
        );
        assert!(!probes.decide(8080, Some(&partner), None).is_allowed());
        assert!(!probes.decide(9000, None, None).is_allowed());

        let shop = load("shop.yaml");
        assert!(
            shop.decide(8080, Some(&frontend), Some((&Method::POST, "/api/orders")))
                .is_allowed()
        );
        assert!(
            shop.decide(8080, Some(&partner), Some((get, "/api/catalog/1")))
                .is_allowed()
        );
        assert!(
            !shop
                .decide(8080, Some(&partner), Some((get, "/api/orders")))
                .is_allowed()
        );
        assert!(
            shop.decide(9090, Some(&prometheus), Some((get, "/metrics")))
                .is_allowed()
        );
        assert!(!shop.decide(5432, Some(&frontend), None).is_allowed());
        assert!(!shop.decide(22, Some(&frontend), None).is_allowed());

        let audit = load("audit.yaml");
        assert_eq!(audit.decide(8080, Some(&frontend), None), Decision::Allow);
        assert!(matches!(
            audit.decide(8080, None, None),
            Decision::Audit { .. }
        ));
    }
}
