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
use crate::vocab::{AccessLogFormat, PortList};

/// Which HTTP version the proxy speaks to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AppProtocol {
    /// HTTP/1.1 to the app.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to the app: gRPC servers.
    Http2,
    /// The version the client used: HTTP/2 clients reach the app over HTTP/2, HTTP/1 over HTTP/1.1.
    Auto,
}

/// Whether the app's outbound connections travel in HBONE tunnels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutboundMtls {
    /// Plaintext, as the app sent it.
    Off,
    /// HBONE to `<destination>:15008`; plaintext when nothing listens there (remembered a minute).
    Auto,
    /// HBONE only: a destination without HBONE gets its connection closed.
    Strict,
}

/// Whether plaintext is accepted on the inbound listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InboundMtls {
    /// No HBONE listener: plaintext only.
    Off,
    /// HBONE and plaintext.
    Permissive,
    /// HBONE only; plaintext is closed, except on --plaintext-ports (kubelet probes).
    Strict,
}

/// Every bound on a wait, each from its own flag.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// The whole request head, from its first byte.
    pub header: Duration,
    /// An idle keep-alive client connection.
    pub idle: Duration,
    /// Between two reads of a request body.
    pub request_body: Duration,
    /// The app's response head, from the end of the request body.
    pub response: Duration,
    /// Between two reads of the app's response body.
    pub response_body: Duration,
    /// A new connection's first bytes, before the app is connected to see who speaks first.
    pub detect: Duration,
    /// An opaque TCP connection with no byte either way.
    pub tcp_idle: Duration,
}

/// Everything the data plane is built from (each field is the flag of the same name unless said).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub app: SocketAddr,
    pub app_protocol: AppProtocol,
    pub http2_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub http_ports: Vec<u16>,
    pub rewrite_host: bool,
    pub trusted_hops: usize,
    pub lowercase_header_names: bool,
    pub max_header_bytes: u32,
    /// The ports of the proxy's own listeners (inbound, outbound, admin, HBONE) as bound: never a
    /// destination of inbound traffic.
    pub own_ports: Vec<u16>,
    pub timeouts: Timeouts,
    pub connect_timeout: Duration,
    /// SO_MARK on upstream sockets (--proxy-mark); 0 for none.
    pub proxy_mark: u32,
    pub pool_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub access_log: AccessLogFormat,
    pub trust_domain: String,
    /// Mutual TLS (HBONE): `None` without an identity.
    pub mtls: Option<MtlsConfig>,
    pub policy: Option<PolicyFile>,
}

/// Mutual TLS, when an identity is configured.
#[derive(Clone, Debug)]
pub struct MtlsConfig {
    /// Where the identity comes from.
    pub source: Source,
    pub trust_bundles: Option<PathBuf>,
    /// --inbound-mtls and --outbound-mtls as they apply (their defaults follow the identity).
    pub inbound: InboundMtls,
    pub outbound: OutboundMtls,
    pub plaintext_ports: PortList,
    /// --peer-identities or --peer-identities-inline.
    pub peers: PeerIdentities,
    /// The pod's name and namespace (`POD_NAME`, `POD_NAMESPACE`), for the `baggage` header.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
}
