//! The data plane: `amazing-proxy run`.
//!
//! Layers, each using only those above it (tests/layers.rs holds the code to them):
//! - [`exchange`]: the record of one exchange; [`phases`]: every decision as a pure function;
//!   [`path`], [`detect`]ion, the HTTP/1.1 parsers ([`http1::framing`], [`http1::chunked`]),
//!   [`rewind`]: pure too;
//! - [`limits`] (connections, requests in flight, shedding), [`upstream`] (connect, pools, HBONE's
//!   pool), [`drain`] (the shutdown state machine), [`body`] (the hyper path's body wrappers),
//!   [`traffic`] (a route's rate and concurrency limits, the retry budget and backoff);
//! - [`shared`]: [`Shared`], the data plane's state, handed to every adapter;
//! - the protocol adapters: [`http1`] (the fast path), [`hyper_path`] (HTTP/2, upgrades, the rest),
//!   [`tcp`] (opaque bytes), [`hbone`] (mutual TLS tunnels);
//! - [`listener`]: accept, original destination, detection, dispatch to an adapter;
//! - this module: [`Shared::new`], the one constructor (tests call it too), from a
//!   [`ProxyConfig`]. The `run` wiring (listeners, admin, signals, the drain) is [`crate::run`].
//!
//! Threads: the data plane runs on `--workers` threads (one current-thread runtime when 1, the
//! default); the admin listener has its own thread so that a slow scrape never delays a request;
//! the access log has a writer thread so that stdout never blocks a request.

pub mod body;
pub mod detect;
pub mod drain;
pub(crate) mod driver;
pub mod exchange;
pub mod hbone;
pub mod http1;
pub mod hyper_path;
pub mod limits;
pub mod listener;
pub mod path;
pub mod phases;
pub mod rewind;
pub(crate) mod routing;
pub mod shared;
pub mod tcp;
pub mod traffic;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::identity::source::Identity;
use crate::settings::{MtlsConfig, OutboundMtls, ProxyConfig};
use crate::telemetry::Telemetry;
use crate::telemetry::istio::OwnWorkload;
use crate::telemetry::otlp::TraceResource;
use drain::Drain;
use limits::Limits;
use phases::Via;
pub use shared::Shared;
use shared::{Mtls, Settings};
use upstream::{ClientFactory, ConnectOptions, Upstreams};

/// The constructor is the wiring's: it reads the configuration, sets the descriptor limit and builds
/// every part; the state it builds sits below the adapters ([`shared`]).
impl Shared {
    /// `access_log` is stdout in production, a pipe or buffer in tests.
    pub fn new(config: &ProxyConfig, access_log: Box<dyn std::io::Write + Send>) -> Arc<Shared> {
        let lowercase = config.traffic.lowercase_header_names;
        let (http1_server, http2_server) = server_builders(config);
        let connect = ConnectOptions {
            timeout: config.connect_timeout,
            mark: upstream::mark_if_permitted(config.proxy_mark),
            write_stall: 2 * config.traffic.timeouts.request_body,
        };
        let own = config.istio.as_ref().map(|names| {
            OwnWorkload::new(
                names.workload.as_deref(),
                names.pod.as_deref(),
                names.namespace.as_deref(),
            )
        });
        let traces = (config.traces.as_ref())
            .map(|(trace, names)| (trace, TraceResource::new(names), connect.mark));
        let telemetry = Arc::new(Telemetry::new(config.access_log, access_log, own, traces));
        let mtls = config.mtls.as_ref().map(|mtls_config| {
            mtls(
                mtls_config,
                &config.trust_domain,
                config.pool_idle_timeout,
                &telemetry.metrics.identity_expiry_seconds,
            )
        });
        // Istio's metrics name this proxy by its SPIFFE ID (read as it loads).
        if let (Some(istio), Some(mtls)) = (telemetry.istio(), &mtls) {
            istio.set_identity(mtls.identity.clone());
        }
        // And so does the spans' resource.
        if let (Some(traces), Some(mtls)) = (&telemetry.traces, &mtls) {
            traces.set_identity(mtls.identity.clone());
        }
        let outbound_mtls = mtls
            .as_ref()
            .is_some_and(|m| m.outbound != OutboundMtls::Off);
        // Cyclic: hyper's clients reach upstreams in mutual TLS through the HBONE pool, which
        // is part of the state they are part of.
        Arc::new_cyclic(|shared| {
            let tunneller = outbound_mtls.then(|| {
                let tunneller: Arc<dyn upstream::Tunneller> =
                    Arc::new(hbone::outbound::HboneTunneller::new(shared.clone()));
                tunneller
            });
            let factory =
                ClientFactory::new(connect, config.pool_idle_timeout, !lowercase, tunneller);
            let routes = config.routes_path.as_ref().map(|path| {
                routing::RoutesInForce::new(
                    path.clone(),
                    config.routes.clone(),
                    telemetry.clone(),
                    factory.clone(),
                )
            });
            Shared {
                routes,
                settings: Settings {
                    traffic: config.traffic.clone(),
                    via: Via::random(),
                    http1_server,
                    http2_server,
                },
                limits: Arc::new(Limits::new(
                    descriptor_budget(config.max_connections),
                    config.max_in_flight,
                )),
                upstreams: Upstreams::new(factory),
                telemetry,
                drain: Drain::default(),
                mtls,
                policy: config.policy.as_ref().map(|file| {
                    let policy = file
                        .policy
                        .clone()
                        .with_trust_domain(config.trust_domain.clone());
                    tokio::sync::watch::Sender::new(Arc::new(policy))
                }),
                policy_path: config.policy.as_ref().map(|file| file.path.clone()),
            }
        })
    }
}

/// Mutual TLS from its configuration. The material is loaded now (a failure is reported by
/// `/ready` and retried by [`Identity::watch_forever`], which `run` spawns). Pooled HBONE
/// connections close after `idle_timeout` without a stream.
fn mtls(
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
        pool: Arc::default(),
        idle_timeout,
        pod_name: config.pod_name.clone(),
        pod_namespace: config.pod_namespace.clone(),
        workload_name: config.workload_name.clone(),
    }
}

/// Descriptors kept out of the connection budget (512, whatever the limit): the
/// admin listener and its scrapes, the pools' idle connections, the access log, the runtime's own.
const RESERVED_DESCRIPTORS: u64 = 512;

/// The connection limit the descriptors allow. Raises the soft RLIMIT_NOFILE to the hard one (as
/// nginx's worker_rlimit_nofile does), then caps --max-connections so that the connections (a
/// client and its app connection: two descriptors each) run into the limit, and its shedding,
/// before the process runs out of descriptors (when accepts and the admin port would fail).
fn descriptor_budget(max_connections: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let budget =
        usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS) / 2).unwrap_or(usize::MAX);
    if budget < max_connections {
        tracing::warn!(
            max_connections,
            descriptors = limit,
            "--max-connections lowered to {budget}: each connection may hold two descriptors; raise the descriptor limit (ulimit -n) to allow more"
        );
        return budget.max(1);
    }
    max_connections
}

fn server_builders(
    config: &ProxyConfig,
) -> (auto::Builder<TokioExecutor>, auto::Builder<TokioExecutor>) {
    let timeouts = config.traffic.timeouts;
    let keep_case = !config.traffic.lowercase_header_names;
    let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    http1
        .http1()
        .timer(TokioTimer::new())
        // hyper's head timer would also run while a keep-alive connection waits for its next
        // request: the listener bounds heads from their first byte instead (`head_overdue`).
        .header_read_timeout(None)
        .preserve_header_case(keep_case)
        .title_case_headers(keep_case)
        .max_headers(max_fields(config.traffic.max_header_bytes))
        .max_buf_size(config.traffic.max_header_bytes);
    let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    http2
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.traffic.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(upstream::CLIENT_STREAMS)
        .max_send_buf_size(CLIENT_STREAM_SEND_BUF)
        // An idle HTTP/2 client is pinged, and dropped when it stops answering.
        .keep_alive_interval(Some(timeouts.idle))
        .keep_alive_timeout(timeouts.header)
        // Extended CONNECT (RFC 8441: WebSocket over HTTP/2); an HTTP/1.1 app gets the WebSocket handshake.
        .enable_connect_protocol();
    (http1, http2)
}

/// What an HTTP/2 client's stream may hold of a response the client has not taken yet, besides
/// the app's side of it: hyper's default (400 KiB) let one connection that opens its windows
/// wide and never reads make the proxy hold about 1 MB per stream, 190 MB for its 200 streams
/// (tests/in_process/h2_attacks.rs). The kernel's socket buffer is what keeps a fast client
/// fed, not this.
const CLIENT_STREAM_SEND_BUF: usize = 64 * 1024;

/// The most header fields a head of `max_bytes` can hold: the limit is on bytes (431), never on a
/// count of fields (nginx accepts 150 fields; hyper's default refuses more than 100).
fn max_fields(max_bytes: usize) -> usize {
    // The shortest field line, `a:\r\n`, is 4 bytes.
    (max_bytes / 4).max(100)
}
