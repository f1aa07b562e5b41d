//! HBONE, Istio ambient's tunnel: HTTP/2 `CONNECT` inside mutual TLS on port 15008, one stream per
//! tunnelled TCP connection, `:authority` the original destination `ip:port`.
//!
//! [`inbound`] terminates the tunnels peers open to this pod and carries each stream through the
//! same detection and HTTP or TCP paths as plaintext; [`outbound`] carries the app's connections
//! to other pods in tunnels, over pooled connections (one per peer, at most 100 streams each).
//!
//! HTTP/2 is hyper's (the `h2` crate underneath): the rest of the proxy already runs on it, its
//! server answers PINGs while idle and its client sends keep-alive PINGs, and a `CONNECT` stream
//! becomes an ordinary byte stream (`hyper::upgrade`) that the existing paths can read.

pub mod headers;
pub mod inbound;
pub mod outbound;

use std::time::Duration;

use crate::identity::peers::PeerIdentities;
use crate::identity::source::Identity;
use crate::settings::{InboundMtls, MtlsConfig, OutboundMtls};
use crate::vocab::PortList;

/// ztunnel's HTTP/2 settings, so that either side can fill the other's windows.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams a server accepts per connection; a client opens at most [`outbound::MAX_STREAMS`].
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
/// PING an HBONE connection this often, and drop it when a PING goes unanswered this long.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Mutual TLS: the identity, the modes and the outbound pool.
pub struct Mtls {
    pub identity: Identity,
    pub inbound: InboundMtls,
    pub outbound: OutboundMtls,
    pub plaintext_ports: PortList,
    pub peers: PeerIdentities,
    pub pool: outbound::Pool,
    /// Pooled HBONE connections without a stream close after this long (--pool-idle-timeout).
    pub idle_timeout: Duration,
    /// The pod's name and namespace from the downward API, for the `baggage` header.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
}

impl Mtls {
    /// The material is loaded now (a failure is reported by `/ready` and retried by
    /// [`Identity::watch_forever`], which the caller spawns). Pooled connections close after
    /// `idle_timeout` without a stream.
    pub fn new(
        config: &MtlsConfig,
        trust_domain: &str,
        idle_timeout: Duration,
        expiry: &prometheus_client::metrics::gauge::Gauge,
    ) -> Mtls {
        Mtls {
            identity: Identity::new(
                config.source.clone(),
                trust_domain.to_owned(),
                config.trust_bundles.clone(),
                expiry,
            ),
            inbound: config.inbound,
            outbound: config.outbound,
            plaintext_ports: config.plaintext_ports.clone(),
            peers: config.peers.clone(),
            pool: outbound::Pool::default(),
            idle_timeout,
            pod_name: config.pod_name.clone(),
            pod_namespace: config.pod_namespace.clone(),
        }
    }

    /// Whether a plaintext inbound connection to `port` is refused.
    pub fn refuses_plaintext(&self, port: u16) -> bool {
        self.inbound == InboundMtls::Strict && !self.plaintext_ports.contains(port)
    }
}
