//! `amazing-proxy run` options: every flag is also an `AMAZING_PROXY_*` environment variable so that a
//! pod spec can set it. Parsing and validation happen here, before anything binds: a bad value exits
//! with a message naming the option and what it accepts.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

use crate::settings::{
    AppProtocol, InboundMtls, MtlsConfig, OutboundMtls, PodNames, ProxyConfig, Timeouts,
    TraceConfig, Traffic,
};
use crate::vocab::{self, parse_drain_duration, parse_timeout};
pub(crate) use crate::vocab::{AccessLogFormat, PortList};

/// Where a listener binds, or `off` to not start it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Listen(pub(crate) Option<SocketAddr>);

/// `off` or the address, as [`FromStr`] reads it.
impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("off"),
        }
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(Listen(None));
        }
        s.parse().map(|addr| Listen(Some(addr))).map_err(|_| {
            format!("expected IP:PORT (for example 127.0.0.1:15001) or `off`, got `{s}`")
        })
    }
}

/// Parses `IP:PORT`, with a message that says so (the standard one only says "invalid syntax").
pub(crate) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("expected IP:PORT (for example 127.0.0.1:8000), got `{s}`"))
}

/// Reads and validates the `--policy` file, so that a bad one fails the start.
fn parse_policy(path: &str) -> Result<crate::policy::PolicyFile, String> {
    let path = std::path::PathBuf::from(path);
    let policy = crate::policy::Policy::load(&path).map_err(|e| e.to_string())?;
    Ok(crate::policy::PolicyFile { path, policy })
}

/// Reads and validates the `--routes` file, so that a bad one fails the start.
fn parse_routes(path: &str) -> Result<crate::routes::RoutesFile, String> {
    crate::routes::RoutesFile::load(std::path::Path::new(path)).map_err(|e| e.to_string())
}

/// Reads and parses the `--peer-identities` file, so that a bad one fails the start.
fn parse_peer_identities(path: &str) -> Result<crate::identity::peers::PeerIdentities, String> {
    crate::identity::peers::PeerIdentities::load(std::path::Path::new(path))
}

/// Parses `--peer-identities-inline`.
fn parse_peer_identities_inline(
    text: &str,
) -> Result<crate::identity::peers::PeerIdentities, String> {
    crate::identity::peers::PeerIdentities::parse(text)
}

#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Inbound listener: traffic to the pod, redirected here by `amazing-proxy init`.
    #[arg(long, env = "AMAZING_PROXY_INBOUND", default_value_t = SocketAddr::from((Ipv4Addr::UNSPECIFIED, vocab::INBOUND_PORT)), value_parser = parse_socket_addr)]
    pub(crate) inbound: SocketAddr,

    /// Outbound listener: the app's own connections, redirected here by `init`; `off` disables it.
    #[arg(
        long,
        env = "AMAZING_PROXY_OUTBOUND",
        default_value_t = Listen(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, vocab::OUTBOUND_PORT))))
    )]
    pub(crate) outbound: Listen,

    /// The app, used when an inbound connection has no original destination (not redirected).
    #[arg(long, env = "AMAZING_PROXY_APP", default_value = "127.0.0.1:80", value_parser = parse_socket_addr)]
    pub app: SocketAddr,

    /// Admin listener (/live, /ready, /metrics, POST /shutdown); never the data port.
    #[arg(long, env = "AMAZING_PROXY_ADMIN", default_value_t = SocketAddr::from((Ipv4Addr::LOCALHOST, vocab::ADMIN_PORT)), value_parser = parse_socket_addr)]
    pub(crate) admin: SocketAddr,

    /// Access log format, written to stdout.
    #[arg(
        long,
        env = "AMAZING_PROXY_ACCESS_LOG",
        value_enum,
        default_value = "json"
    )]
    pub(crate) access_log: AccessLogFormat,

    /// Worker threads for the data plane (a sidecar shares its pod's CPU budget).
    #[arg(long, env = "AMAZING_PROXY_WORKERS", default_value = "1",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) workers: u16,

    /// Lower-case HTTP/1.1 header names. By default each name keeps the case the client or the app
    /// wrote, and the proxy's own names are written in canonical case (`Server`, `X-Request-Id`).
    #[arg(
        long,
        env = "AMAZING_PROXY_LOWERCASE_HEADER_NAMES",
        conflicts_with = "preserve_header_case"
    )]
    pub(crate) lowercase_header_names: bool,

    /// Kept for old manifests: preserving header case is now the default.
    #[arg(long, env = "AMAZING_PROXY_PRESERVE_HEADER_CASE", hide = true)]
    pub(crate) preserve_header_case: bool,

    /// Rewrite the Host header to the app's address instead of keeping the client's.
    #[arg(long, env = "AMAZING_PROXY_REWRITE_HOST")]
    pub(crate) rewrite_host: bool,

    /// Proxies in front of the pod whose forwarding fields are trusted: the last N entries of a
    /// request's X-Forwarded-For are kept (then the client's address appended), and so are its
    /// X-Forwarded-Proto and Forwarded. 0: no client is trusted; these fields are the proxy's own.
    #[arg(long, env = "AMAZING_PROXY_TRUSTED_HOPS", default_value = "0",
          value_parser = clap::value_parser!(u8).range(0..=32))]
    pub(crate) trusted_hops: u8,

    /// HTTP version spoken to the app.
    #[arg(
        long,
        env = "AMAZING_PROXY_APP_PROTOCOL",
        value_enum,
        default_value = "http1"
    )]
    pub(crate) app_protocol: AppProtocol,

    /// Inbound ports whose app speaks HTTP/2 (h2c), whatever --app-protocol says.
    #[arg(long, env = "AMAZING_PROXY_HTTP2_PORTS", default_value = "", value_parser = PortList::from_str)]
    pub http2_ports: PortList,

    /// Time allowed to connect to the app or the original destination (504 when exceeded).
    #[arg(long, env = "AMAZING_PROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) connect_timeout: Duration,

    /// Time allowed for the app to start its response, counted for each attempt from the moment
    /// the request is written whole (504 when exceeded; Envoy's route timeout default).
    #[arg(long, env = "AMAZING_PROXY_RESPONSE_TIMEOUT", default_value = "15s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) response_timeout: Duration,

    /// Time allowed for a whole request head, from its first byte (408, then close; nginx's
    /// client_header_timeout).
    #[arg(long, env = "AMAZING_PROXY_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) header_timeout: Duration,

    /// An idle keep-alive client connection (HTTP/2: no open stream) is closed after this long
    /// (nginx's keepalive_timeout, Envoy's idle_timeout).
    #[arg(long, env = "AMAZING_PROXY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) idle_timeout: Duration,

    /// Longest pause between two reads of a request body (408, then close; nginx's
    /// client_body_timeout).
    #[arg(long, env = "AMAZING_PROXY_REQUEST_BODY_TIMEOUT", default_value = "60s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) request_body_timeout: Duration,

    /// Longest pause between two reads of the app's response body; the response is cut after it
    /// (nginx's proxy_read_timeout).
    #[arg(long, env = "AMAZING_PROXY_RESPONSE_BODY_TIMEOUT", default_value = "60s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) response_body_timeout: Duration,

    /// Idle pooled connections to the app are closed after this long.
    #[arg(long, env = "AMAZING_PROXY_POOL_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) pool_idle_timeout: Duration,

    /// Open client connections above which new ones get 503 with Retry-After.
    #[arg(long, env = "AMAZING_PROXY_MAX_CONNECTIONS", default_value = "10000",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_connections: u32,

    /// Requests in flight above which new ones get 503 with Retry-After.
    #[arg(long, env = "AMAZING_PROXY_MAX_IN_FLIGHT", default_value = "10000",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_in_flight: u32,

    /// Largest request head (request line and headers) accepted, in bytes (431 above it).
    #[arg(long, env = "AMAZING_PROXY_MAX_HEADER_BYTES", default_value = "65536",
          value_parser = clap::value_parser!(u32).range(8192..=16_777_216))]
    pub(crate) max_header_bytes: u32,

    /// When set, /ready also requires the app to answer GET on this path with a 2xx.
    #[arg(long, env = "AMAZING_PROXY_APP_READY_PATH")]
    pub(crate) app_ready_path: Option<String>,

    /// After SIGTERM or /shutdown: keep serving (while /ready says 503) for this long.
    #[arg(long, env = "AMAZING_PROXY_DRAIN_DELAY", default_value = "5s", value_parser = parse_drain_duration, allow_hyphen_values = true)]
    pub(crate) drain_delay: Duration,

    /// Then stop accepting and give in-flight requests at most this long to finish.
    #[arg(long, env = "AMAZING_PROXY_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_drain_duration, allow_hyphen_values = true)]
    pub(crate) drain_timeout: Duration,

    /// How long to wait for a new connection's first bytes before treating it as opaque TCP
    /// (server-speaks-first protocols).
    #[arg(long, env = "AMAZING_PROXY_DETECT_TIMEOUT", default_value = "1s", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) detect_timeout: Duration,

    /// An opaque TCP connection (or tunnel) with no byte either way for this long is closed
    /// (Envoy's tcp_proxy idle_timeout, also one hour by default).
    #[arg(long, env = "AMAZING_PROXY_TCP_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub(crate) tcp_idle_timeout: Duration,

    /// Ports forwarded as opaque TCP without protocol detection (MySQL, PostgreSQL, SMTP...).
    #[arg(long, env = "AMAZING_PROXY_OPAQUE_PORTS", default_value = "", value_parser = PortList::from_str)]
    pub(crate) opaque_ports: PortList,

    /// Ports known to carry HTTP: never forwarded as opaque TCP, whatever the timing (`inject`
    /// fills it from container ports named http*, grpc* or h2c*).
    #[arg(long, env = "AMAZING_PROXY_HTTP_PORTS", default_value = "", value_parser = PortList::from_str)]
    pub http_ports: PortList,

    /// Socket mark (SO_MARK) set on the proxy's upstream sockets so that `init`'s rules let them
    /// pass; 0 disables it. Must match `init --proxy-mark`.
    #[arg(long, env = "AMAZING_PROXY_PROXY_MARK", default_value_t = vocab::PROXY_MARK)]
    pub(crate) proxy_mark: u32,

    /// Workload identity from a directory holding tls.crt (leaf first, then intermediates),
    /// tls.key and ca.crt (the trust bundle): cert-manager csi-driver-spiffe's layout.
    #[arg(long, env = "AMAZING_PROXY_IDENTITY_DIR", group = "identity_source")]
    pub(crate) identity_dir: Option<PathBuf>,

    /// Workload identity from a Kubernetes pod certificate (KEP-4317): the key and the chain in
    /// one PEM file. Needs --identity-trust-bundle.
    #[arg(
        long,
        env = "AMAZING_PROXY_IDENTITY_CREDENTIAL_BUNDLE",
        group = "identity_source",
        requires = "identity_trust_bundle"
    )]
    pub(crate) identity_credential_bundle: Option<PathBuf>,

    /// Workload identity from the SPIFFE Workload API (a SPIRE agent's Unix socket): X.509-SVIDs
    /// and the trust bundle, streamed as they rotate.
    #[arg(
        long,
        env = "AMAZING_PROXY_IDENTITY_SPIRE_SOCKET",
        group = "identity_source"
    )]
    pub(crate) identity_spire_socket: Option<PathBuf>,

    /// The trust bundle (PEM CA certificates, a ClusterTrustBundle projected as a file) that goes
    /// with --identity-credential-bundle.
    #[arg(
        long,
        env = "AMAZING_PROXY_IDENTITY_TRUST_BUNDLE",
        requires = "identity_credential_bundle"
    )]
    pub(crate) identity_trust_bundle: Option<PathBuf>,

    /// The SPIFFE trust domain: our identity is in it, and `ca.crt` (or the identity's trust
    /// bundle) anchors its identities only.
    #[arg(
        long,
        env = "AMAZING_PROXY_TRUST_DOMAIN",
        default_value = "cluster.local"
    )]
    pub(crate) trust_domain: String,

    /// The CAs of other trust domains (federation), each anchoring only its own domain's
    /// identities: a directory of `<trust-domain>.pem` (or `.json`, a SPIFFE bundle) files, or a
    /// SPIFFE bundle JSON file (docs/mtls.md). Reloaded when it changes.
    #[arg(long, env = "AMAZING_PROXY_TRUST_BUNDLES")]
    pub(crate) trust_bundles: Option<PathBuf>,

    /// HBONE listener (HTTP/2 CONNECT over mutual TLS). Default 0.0.0.0:15008 when an identity is
    /// configured and --inbound-mtls is not off; `off` disables it.
    #[arg(long, env = "AMAZING_PROXY_HBONE")]
    pub(crate) hbone: Option<Listen>,

    /// Outbound mutual TLS: off, auto (HBONE when the destination listens on 15008, else
    /// plaintext) or strict (HBONE only). Default auto with an identity, off without.
    #[arg(long, env = "AMAZING_PROXY_OUTBOUND_MTLS", value_enum)]
    pub(crate) outbound_mtls: Option<OutboundMtls>,

    /// Inbound mutual TLS: off (no HBONE), permissive (HBONE and plaintext) or strict (plaintext
    /// refused but on --plaintext-ports). Default permissive with an identity, off without.
    #[arg(long, env = "AMAZING_PROXY_INBOUND_MTLS", value_enum)]
    pub(crate) inbound_mtls: Option<InboundMtls>,

    /// Ports that accept plaintext under --inbound-mtls strict (kubelet probes come from the node
    /// in plaintext).
    #[arg(long, env = "AMAZING_PROXY_PLAINTEXT_PORTS", default_value = "", value_parser = PortList::from_str)]
    pub(crate) plaintext_ports: PortList,

    /// The identity expected of HBONE servers: lines `CIDR-or-address SPIFFE-ID`. A server without
    /// an entry may have any identity of our trust domain (and none of another).
    #[arg(long, env = "AMAZING_PROXY_PEER_IDENTITIES", value_parser = parse_peer_identities)]
    pub(crate) peer_identities: Option<crate::identity::peers::PeerIdentities>,

    /// --peer-identities' entries given as text rather than a file (`;` also separates entries):
    /// what `inject` writes from the `amazing-proxy.io/peer-identities` annotation.
    #[arg(
        long,
        env = "AMAZING_PROXY_PEER_IDENTITIES_INLINE",
        value_parser = parse_peer_identities_inline,
        conflicts_with = "peer_identities"
    )]
    pub(crate) peer_identities_inline: Option<crate::identity::peers::PeerIdentities>,

    /// Authorization policy (YAML, docs/policy.md): which peers may reach which inbound port and,
    /// for HTTP, which methods and paths. A refused HBONE stream or request gets 403, a
    /// refused TCP connection is closed. Validated at start, reloaded when the file changes.
    #[arg(long, env = "AMAZING_PROXY_POLICY", value_parser = parse_policy)]
    pub(crate) policy: Option<crate::policy::PolicyFile>,

    /// Timeouts, retries, rate and concurrency limits, balancing and outlier ejection per route
    /// (YAML, docs/routes.md). Validated at start, reloaded when the file changes.
    #[arg(long, env = "AMAZING_PROXY_ROUTES", value_parser = parse_routes)]
    pub(crate) routes: Option<crate::routes::RoutesFile>,

    /// The pod's name, for the HBONE `baggage` header (`inject` sets POD_NAME from the downward
    /// API).
    #[arg(long, env = vocab::POD_NAME_ENV)]
    pub(crate) pod_name: Option<String>,

    /// The pod's namespace, for the HBONE `baggage` header (`inject` sets POD_NAMESPACE from the
    /// downward API); without it, the identity's namespace.
    #[arg(long, env = vocab::POD_NAMESPACE_ENV)]
    pub(crate) pod_namespace: Option<String>,

    /// Also export Istio's standard metrics (`istio_requests_total`...) on /metrics, for Kiali
    /// and Istio's Grafana dashboards (docs/observability.md).
    #[arg(
        long,
        env = "AMAZING_PROXY_METRICS_COMPAT",
        value_enum,
        default_value = "none"
    )]
    pub(crate) metrics_compat: vocab::MetricsCompat,

    /// This pod's workload (its Deployment's name, say), for Istio's metrics (`--metrics-compat
    /// istio`), the spans' `service.name` and the HBONE `baggage` (`k8s.deployment.name`), so that
    /// peers name it the same; without it, the pod's name without what its controller added.
    #[arg(long, env = "AMAZING_PROXY_WORKLOAD_NAME")]
    pub(crate) workload_name: Option<String>,

    /// Export a span per exchange and per HBONE tunnel to this OpenTelemetry collector
    /// (`http://host:4317` for gRPC, `http://host:4318` for HTTP/protobuf); no traces without it
    /// (docs/observability.md).
    #[arg(long, env = "AMAZING_PROXY_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint)]
    pub(crate) otlp_endpoint: Option<String>,

    /// How spans travel to --otlp-endpoint.
    #[arg(
        long,
        env = "AMAZING_PROXY_OTLP_PROTOCOL",
        value_enum,
        default_value = "grpc"
    )]
    pub(crate) otlp_protocol: crate::settings::OtlpProtocol,

    /// The share of traces this proxy starts that are sampled, from 0 to 1 (a caller's decision in
    /// `traceparent` or B3 is kept).
    #[arg(long, env = "AMAZING_PROXY_TRACE_SAMPLING", default_value = "0.01", value_parser = parse_ratio)]
    pub(crate) trace_sampling: f64,
}

/// An OTLP endpoint: an `http://` URL with a host (TLS to the collector is not built in: send to
/// a collector on the node or in the pod, which forwards it).
fn parse_otlp_endpoint(value: &str) -> Result<String, String> {
    let uri: http::Uri = value.parse().map_err(|e| {
        format!("`{value}` is not a URL ({e}); give one like http://otel-collector:4317")
    })?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(format!(
            "`{value}`: give an http:// URL with a host, like http://otel-collector:4317 (TLS to the collector is not built in: use a collector on the node or in the pod)"
        ));
    }
    Ok(value.to_owned())
}

/// A ratio from 0 to 1.
fn parse_ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!(
            "`{value}` is not a ratio from 0 to 1 (0.01 samples one trace in a hundred)"
        )),
    }
}

/// Whether a connection to (or a bind of) `a` would reach `b`: the same port, and the same address
/// or an unspecified one (`0.0.0.0` and `[::]` cover every local address). Port 0 asks the kernel
/// for a free port, so it never collides.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl RunArgs {
    /// Where the identity comes from, if one is configured.
    pub(crate) fn identity_source(&self) -> Option<crate::identity::source::Source> {
        use crate::identity::material::Files;
        use crate::identity::source::Source;
        if let Some(dir) = &self.identity_dir {
            return Some(Source::Files(Files::Dir(dir.clone())));
        }
        if let Some(socket) = &self.identity_spire_socket {
            return Some(Source::WorkloadApi(socket.clone()));
        }
        match (
            &self.identity_credential_bundle,
            &self.identity_trust_bundle,
        ) {
            (Some(credential), Some(trust)) => Some(Source::Files(Files::PodCertificate {
                credential: credential.clone(),
                trust: trust.clone(),
            })),
            _ => None,
        }
    }

    /// --inbound-mtls as it applies: permissive with an identity, off without, unless given.
    pub(crate) fn inbound_mtls(&self) -> InboundMtls {
        match (self.inbound_mtls, self.identity_source()) {
            (Some(mode), _) => mode,
            (None, Some(_)) => InboundMtls::Permissive,
            (None, None) => InboundMtls::Off,
        }
    }

    /// --outbound-mtls as it applies: auto with an identity, off without, unless given.
    pub(crate) fn outbound_mtls(&self) -> OutboundMtls {
        match (self.outbound_mtls, self.identity_source()) {
            (Some(mode), _) => mode,
            (None, Some(_)) => OutboundMtls::Auto,
            (None, None) => OutboundMtls::Off,
        }
    }

    /// The HBONE listener's address, if it runs.
    pub(crate) fn hbone_listen(&self) -> Option<SocketAddr> {
        if self.inbound_mtls() == InboundMtls::Off {
            return None;
        }
        match self.hbone {
            Some(Listen(addr)) => addr,
            None => Some(SocketAddr::from((Ipv4Addr::UNSPECIFIED, vocab::HBONE_PORT))),
        }
    }

    /// The ports of every listener `run` binds.
    fn own_ports(&self) -> Vec<u16> {
        let mut ports = vec![self.inbound.port(), self.admin.port()];
        ports.extend(self.outbound.0.map(|a| a.port()));
        ports.extend(self.hbone_listen().map(|a| a.port()));
        ports
    }

    /// The data plane's configuration: these flags as plain values, what `proxy::Shared::new`
    /// builds the data plane from.
    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            traffic: Traffic {
                app: self.app,
                app_protocol: self.app_protocol,
                http2_ports: self.http2_ports.0.clone(),
                opaque_ports: self.opaque_ports.0.clone(),
                http_ports: self.http_ports.0.clone(),
                rewrite_host: self.rewrite_host,
                trusted_hops: usize::from(self.trusted_hops),
                lowercase_header_names: self.lowercase_header_names,
                max_header_bytes: self.max_header_bytes as usize,
                own_ports: self.own_ports(),
                timeouts: Timeouts {
                    header: self.header_timeout,
                    idle: self.idle_timeout,
                    request_body: self.request_body_timeout,
                    response: self.response_timeout,
                    response_body: self.response_body_timeout,
                    detect: self.detect_timeout,
                    tcp_idle: self.tcp_idle_timeout,
                },
            },
            connect_timeout: self.connect_timeout,
            proxy_mark: self.proxy_mark,
            pool_idle_timeout: self.pool_idle_timeout,
            max_connections: self.max_connections as usize,
            max_in_flight: self.max_in_flight as usize,
            access_log: self.access_log,
            trust_domain: self.trust_domain.clone(),
            mtls: self.identity_source().map(|source| MtlsConfig {
                source,
                trust_bundles: self.trust_bundles.clone(),
                inbound: self.inbound_mtls(),
                outbound: self.outbound_mtls(),
                plaintext_ports: self.plaintext_ports.clone(),
                peers: (self.peer_identities.clone())
                    .or_else(|| self.peer_identities_inline.clone())
                    .unwrap_or_default(),
                pod_name: self.pod_name.clone(),
                pod_namespace: self.pod_namespace.clone(),
                workload_name: self.workload_name.clone(),
            }),
            istio: (self.metrics_compat == vocab::MetricsCompat::Istio).then(|| self.pod_names()),
            traces: self.otlp_endpoint.as_ref().map(|endpoint| {
                let config = TraceConfig {
                    endpoint: endpoint.clone(),
                    protocol: self.otlp_protocol,
                    sampling: self.trace_sampling,
                };
                (config, self.pod_names())
            }),
            policy: self.policy.clone(),
            routes_path: self.routes.as_ref().map(|file| file.path.clone()),
            routes: (self.routes.as_ref())
                .map(|file| file.routes.clone())
                .unwrap_or_default(),
        }
    }

    fn pod_names(&self) -> PodNames {
        PodNames {
            workload: self.workload_name.clone(),
            pod: self.pod_name.clone(),
            namespace: self.pod_namespace.clone(),
        }
    }

    /// Checks what clap cannot: relations between options.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_mtls()?;
        let mut listeners = vec![("--inbound", self.inbound), ("--admin", self.admin)];
        if let Listen(Some(out)) = self.outbound {
            listeners.push(("--outbound", out));
        }
        if let Some(hbone) = self.hbone_listen() {
            listeners.push(("--hbone", hbone));
        }
        for (i, &(name, addr)) in listeners.iter().enumerate() {
            // The app behind one of our own listeners: every request would come back to us,
            // and each pass opens one more connection.
            if overlaps(self.app, addr) {
                return Err(format!(
                    "--app {} is the proxy's own {name} listener {addr}: requests would loop back into the proxy; \
                     point --app at the app's port",
                    self.app
                ));
            }
            if let Some(&(other, other_addr)) =
                listeners[..i].iter().find(|(_, a)| overlaps(*a, addr))
            {
                return Err(format!(
                    "{name} {addr} collides with {other} {other_addr}: give each listener its own port"
                ));
            }
        }
        if let Some(path) = &self.app_ready_path
            && !path.starts_with('/')
        {
            return Err(format!(
                "--app-ready-path must start with `/`, got `{path}`"
            ));
        }
        Ok(())
    }

    fn validate_mtls(&self) -> Result<(), String> {
        let identity = self.identity_source().is_some();
        let without = |flag: &str| {
            format!(
                "{flag} needs a workload identity: give --identity-dir, --identity-spire-socket, or --identity-credential-bundle with --identity-trust-bundle"
            )
        };
        if !identity && self.inbound_mtls.is_some_and(|m| m != InboundMtls::Off) {
            return Err(without("--inbound-mtls"));
        }
        if !identity && self.outbound_mtls.is_some_and(|m| m != OutboundMtls::Off) {
            return Err(without("--outbound-mtls"));
        }
        if !identity && matches!(self.hbone, Some(Listen(Some(_)))) {
            return Err(without("--hbone"));
        }
        if !identity && self.trust_bundles.is_some() {
            return Err(without("--trust-bundles"));
        }
        if self.inbound_mtls() == InboundMtls::Strict && self.hbone == Some(Listen(None)) {
            return Err(
                "--inbound-mtls strict with --hbone off would refuse every connection: give --hbone an address"
                    .into(),
            );
        }
        if self.inbound_mtls() == InboundMtls::Off && matches!(self.hbone, Some(Listen(Some(_)))) {
            return Err("--hbone listens only when --inbound-mtls is permissive or strict".into());
        }
        // The trust domain is valid when an identity in it is.
        let probe = format!("spiffe://{}/ns/a/sa/b", self.trust_domain);
        if probe.parse::<crate::identity::SpiffeId>().is_err() {
            return Err(format!(
                "--trust-domain `{}` is not a SPIFFE trust domain: lower-case letters, digits, `.`, `-`, `_`",
                self.trust_domain
            ));
        }
        Ok(())
    }
}

/// Adds to clap's error the `AMAZING_PROXY_*` variable the refused value came from, if it came
/// from the environment: clap's message names only the flag, and a user who never typed that flag
/// would look for it in vain. `argv` is the command line; `is_set` says whether a variable is set.
pub fn name_env_source(
    mut error: clap::Error,
    command: &clap::Command,
    argv: &[String],
    is_set: impl Fn(&str) -> bool,
) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    if let Some(var) = env_source(&error, command, argv, is_set) {
        let mut tips = match error.get(ContextKind::Suggested) {
            Some(ContextValue::StyledStrs(tips)) => tips.clone(),
            _ => Vec::new(),
        };
        tips.push(format!("that value comes from the environment variable {var}").into());
        error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    }
    error
}

/// The `AMAZING_PROXY_*` variable a refused value came from, if it came from the environment.
fn env_source(
    error: &clap::Error,
    command: &clap::Command,
    argv: &[String],
    is_set: impl Fn(&str) -> bool,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    // `--drain-timeout <DRAIN_TIMEOUT>`
    let long = arg.strip_prefix("--")?.split([' ', '=']).next()?;
    let typed = argv
        .iter()
        .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if typed {
        return None;
    }
    // The subcommand named on the command line, else every one (a flag may exist in several).
    let chosen: Vec<&clap::Command> = command
        .get_subcommands()
        .filter(|c| argv.iter().any(|a| a == c.get_name()))
        .collect();
    let candidates = if chosen.is_empty() {
        command.get_subcommands().collect()
    } else {
        chosen
    };
    candidates
        .into_iter()
        .flat_map(clap::Command::get_arguments)
        .filter(|a| a.get_long() == Some(long))
        .filter_map(|a| a.get_env()?.to_str().map(str::to_string))
        .find(|var| is_set(var))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run)
    }

    fn validate(args: &[&str]) -> Result<(), String> {
        parse(args).expect("parses").validate()
    }

    #[test]
    fn listen_accepts_off_and_addresses() {
        assert_eq!("off".parse::<Listen>(), Ok(Listen(None)));
        assert_eq!(
            "127.0.0.1:15001"
                .parse::<Listen>()
                .map(|l| l.0.map(|a| a.port())),
            Ok(Some(15001))
        );
        assert!("15001".parse::<Listen>().is_err());
        assert_eq!(Listen(None).to_string().parse::<Listen>(), Ok(Listen(None)));
    }

    #[test]
    fn defaults_are_the_shared_ports() {
        let run = parse(&[]).unwrap();
        assert_eq!(run.inbound.port(), vocab::INBOUND_PORT);
        assert_eq!(run.admin.port(), vocab::ADMIN_PORT);
        assert_eq!(run.outbound.0.map(|a| a.port()), Some(vocab::OUTBOUND_PORT));
        assert_eq!(run.proxy_mark, vocab::PROXY_MARK);
        assert_eq!(run.validate(), Ok(()));
    }

    #[test]
    fn durations_are_bounded_and_negative_ones_named() {
        let err = parse(&["--response-timeout", "300000000000y"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--response-timeout") && err.contains("at most 24h"),
            "{err}"
        );
        let err = parse(&["--drain-timeout", "-1s"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--drain-timeout") && err.contains("negative durations are not allowed"),
            "{err}"
        );
        assert!(parse(&["--drain-delay", "2h"]).is_err());
        assert!(parse(&["--connect-timeout", "0s"]).is_err());
        let run = parse(&["--drain-delay=0s", "--idle-timeout", "24h"]).unwrap();
        assert_eq!(run.drain_delay, Duration::ZERO);
        assert_eq!(run.idle_timeout, vocab::MAX_TIMEOUT);
    }

    #[test]
    fn app_behind_our_own_listener_is_refused() {
        for args in [
            &["--app", "0.0.0.0:8000"][..],
            &["--app", "127.0.0.1:8000"],
            &["--app", "127.0.0.1:8000", "--inbound", "127.0.0.1:8000"],
            &["--app", "10.1.2.3:8000"],
            &["--app", "127.0.0.1:15001"],
            &["--app", "127.0.0.1:15000"],
            &["--app", "[::1]:9000", "--inbound", "[::]:9000"],
        ] {
            let err = validate(args).expect_err(&format!("{args:?}"));
            assert!(err.starts_with("--app "), "{err}");
        }
        assert_eq!(
            validate(&["--app", "127.0.0.2:8000", "--inbound", "127.0.0.1:8000"]),
            Ok(())
        );
        assert_eq!(
            validate(&["--app", "127.0.0.1:15001", "--outbound", "off"]),
            Ok(())
        );
    }

    #[test]
    fn listeners_collide_unless_on_port_zero() {
        let zero = ["--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        assert_eq!(validate(&zero), Ok(()));
        assert_eq!(
            validate(&[&zero[..], &["--outbound", "127.0.0.1:0"]].concat()),
            Ok(())
        );
        assert!(validate(&["--inbound", "127.0.0.1:9", "--admin", "127.0.0.1:9"]).is_err());
        let err = validate(&["--admin", "0.0.0.0:15001"]).unwrap_err();
        assert!(
            err.contains("--outbound") && err.contains("--admin"),
            "{err}"
        );
    }

    #[test]
    fn mtls_defaults_follow_the_identity() {
        let plain = parse(&[]).unwrap();
        assert_eq!(plain.inbound_mtls(), InboundMtls::Off);
        assert_eq!(plain.outbound_mtls(), OutboundMtls::Off);
        assert_eq!(plain.hbone_listen(), None);
        let with = parse(&["--identity-dir", "/var/run/identity"]).unwrap();
        assert_eq!(with.inbound_mtls(), InboundMtls::Permissive);
        assert_eq!(with.outbound_mtls(), OutboundMtls::Auto);
        assert_eq!(
            with.hbone_listen().map(|a| a.port()),
            Some(vocab::HBONE_PORT)
        );
        assert_eq!(with.validate(), Ok(()));
        for args in [
            &["--inbound-mtls", "strict"][..],
            &["--outbound-mtls", "auto"],
            &["--hbone", "127.0.0.1:15008"],
            &[
                "--identity-dir",
                "/d",
                "--inbound-mtls",
                "strict",
                "--hbone",
                "off",
            ],
            &["--identity-dir", "/d", "--trust-domain", "Upper.Case"],
            &["--identity-dir", "/d", "--hbone", "0.0.0.0:8000"],
        ] {
            assert!(validate(args).is_err(), "{args:?}");
        }
        // Exactly one source; the pod certificate needs its trust bundle.
        assert!(parse(&["--identity-dir", "/d", "--identity-credential-bundle", "/c"]).is_err());
        assert!(parse(&["--identity-credential-bundle", "/c"]).is_err());
        assert!(parse(&["--identity-dir", "/d", "--identity-spire-socket", "/s"]).is_err());
        let spire = parse(&["--identity-spire-socket", "/run/spire/agent.sock"]).unwrap();
        assert!(spire.identity_source().is_some());
        assert_eq!(spire.outbound_mtls(), OutboundMtls::Auto);
        let pod = parse(&[
            "--identity-credential-bundle",
            "/c",
            "--identity-trust-bundle",
            "/t",
        ])
        .unwrap();
        assert!(pod.identity_source().is_some());
    }

    #[test]
    fn env_source_names_the_variable_only_when_the_flag_was_not_typed() {
        #[derive(Parser)]
        enum Top {
            Run(RunArgs),
        }
        let command = Top::command();
        let err = Top::try_parse_from(["amazing-proxy", "run", "--drain-timeout", "-1s"])
            .err()
            .unwrap();
        let set = |v: &str| v == "AMAZING_PROXY_DRAIN_TIMEOUT";
        let typed: Vec<String> = ["amazing-proxy", "run", "--drain-timeout", "-1s"]
            .map(String::from)
            .to_vec();
        assert_eq!(env_source(&err, &command, &typed, set), None);
        let untyped: Vec<String> = ["amazing-proxy", "run"].map(String::from).to_vec();
        assert_eq!(
            env_source(&err, &command, &untyped, set).as_deref(),
            Some("AMAZING_PROXY_DRAIN_TIMEOUT")
        );
        assert_eq!(env_source(&err, &command, &untyped, |_| false), None);
        let rendered = name_env_source(err, &command, &untyped, set).to_string();
        assert!(
            rendered.contains(
                "that value comes from the environment variable AMAZING_PROXY_DRAIN_TIMEOUT"
            ),
            "{rendered}"
        );
    }
}
