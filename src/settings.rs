//! The data plane's configuration as plain values: what `run`'s flags become
//! ([`crate::config::RunArgs::proxy_config`]) and what the data plane's state is built from
//! (`proxy::Shared::new`, which tests call with values of their own). Nothing here parses a flag
//! or reads the environment: clap did both, once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::identity::peers::PeerIdentities;
use crate::identity::source::Source;
use crate::policy::PolicyFile;
use crate::routes::Routes;
use crate::vocab::{AccessLogFormat, PortList};

/// Which HTTP version the proxy speaks to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum AppProtocol {
    /// HTTP/1.1 to the app.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to the app: gRPC servers.
    Http2,
    /// The version the client used: HTTP/2 clients reach the app over HTTP/2, HTTP/1 over HTTP/1.1.
    Auto,
}

/// Whether the app's outbound connections travel in HBONE tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutboundMtls {
    /// Plaintext, as the app sent it.
    Off,
    /// HBONE to `<destination>:15008`; plaintext when nothing listens there (remembered a minute).
    Auto,
    /// HBONE only: a destination without HBONE gets its connection closed.
    Strict,
}

/// Whether plaintext is accepted on the inbound listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum InboundMtls {
    /// No HBONE listener: plaintext only.
    Off,
    /// HBONE and plaintext.
    Permissive,
    /// HBONE only; plaintext is closed, except on --plaintext-ports (kubelet probes).
    Strict,
}

/// Every bound on a wait, each from its own flag.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    /// The whole request head, from its first byte.
    pub(crate) header: Duration,
    /// An idle keep-alive client connection.
    pub(crate) idle: Duration,
    /// Between two reads of a request body.
    pub(crate) request_body: Duration,
    /// The app's response head, from the end of the request body.
    pub(crate) response: Duration,
    /// Between two reads of the app's response body.
    pub(crate) response_body: Duration,
    /// A new connection's first bytes, before the app is connected to see who speaks first.
    pub(crate) detect: Duration,
    /// An opaque TCP connection with no byte either way.
    pub(crate) tcp_idle: Duration,
}

/// What the request path reads and never changes (each field is the flag of the same name unless
/// said): part of the configuration, and of `Shared`'s settings as it is.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub(crate) app: SocketAddr,
    pub(crate) app_protocol: AppProtocol,
    pub(crate) http2_ports: Vec<u16>,
    pub(crate) opaque_ports: Vec<u16>,
    pub(crate) http_ports: Vec<u16>,
    pub(crate) rewrite_host: bool,
    /// --trusted-hops: how much of a request's forwarding fields to keep.
    pub(crate) trusted_hops: usize,
    pub(crate) lowercase_header_names: bool,
    pub(crate) max_header_bytes: usize,
    /// The ports of the proxy's own listeners (inbound, outbound, admin, HBONE) as bound: never a
    /// destination of inbound traffic.
    pub(crate) own_ports: Vec<u16>,
    pub(crate) timeouts: Timeouts,
}

/// Everything the data plane is built from (each field is the flag of the same name unless said).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub(crate) traffic: Traffic,
    pub(crate) connect_timeout: Duration,
    /// SO_MARK on upstream sockets (--proxy-mark); 0 for none.
    pub(crate) proxy_mark: u32,
    pub(crate) pool_idle_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) access_log: AccessLogFormat,
    pub(crate) trust_domain: String,
    /// Mutual TLS (HBONE): `None` without an identity.
    pub(crate) mtls: Option<MtlsConfig>,
    pub(crate) policy: Option<PolicyFile>,
    /// Where --routes was read from, to read it again when it changes.
    pub(crate) routes_path: Option<PathBuf>,
    /// The --routes file as validated at start; no routes without the flag.
    pub(crate) routes: Routes,
    /// This pod's names, when Istio's metrics are exported too (`--metrics-compat istio`).
    pub(crate) istio: Option<PodNames>,
    /// Traces over OTLP (`--otlp-endpoint`), and this pod's names for their resource.
    pub(crate) traces: Option<(TraceConfig, PodNames)>,
}

/// Where spans go and which traces this proxy starts are sampled.
#[derive(Clone, Debug)]
pub(crate) struct TraceConfig {
    /// `--otlp-endpoint`: `http://host:port` (gRPC) or an OTLP/HTTP URL.
    pub(crate) endpoint: String,
    pub(crate) protocol: OtlpProtocol,
    /// `--trace-sampling`, in [0, 1].
    pub(crate) sampling: f64,
}

/// How spans travel to the collector (`run --otlp-protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OtlpProtocol {
    /// OTLP/gRPC (a collector's port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (a collector's port 4318; `/v1/traces` is added to an
    /// endpoint without a path).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

/// This pod's names as the flags give them (`--workload-name`, `POD_NAME`, `POD_NAMESPACE`).
#[derive(Clone, Debug, Default)]
pub(crate) struct PodNames {
    pub(crate) workload: Option<String>,
    pub(crate) pod: Option<String>,
    pub(crate) namespace: Option<String>,
}

/// Mutual TLS, when an identity is configured.
#[derive(Clone, Debug)]
pub(crate) struct MtlsConfig {
    /// Where the identity comes from.
    pub(crate) source: Source,
    pub(crate) trust_bundles: Option<PathBuf>,
    /// --inbound-mtls and --outbound-mtls as they apply (their defaults follow the identity).
    pub(crate) inbound: InboundMtls,
    pub(crate) outbound: OutboundMtls,
    pub(crate) plaintext_ports: PortList,
    /// --peer-identities or --peer-identities-inline.
    pub(crate) peers: PeerIdentities,
    /// The pod's name and namespace (`POD_NAME`, `POD_NAMESPACE`), for the `baggage` header.
    pub(crate) pod_name: Option<String>,
    pub(crate) pod_namespace: Option<String>,
    /// `--workload-name`, for the `baggage` header too.
    pub(crate) workload_name: Option<String>,
}
