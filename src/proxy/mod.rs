//! The data plane: `amazing-proxy run`.
//!
//! Layers, each using only those above it:
//! - [`exchange`]: the record of one exchange; [`phases`]: every decision as a pure function;
//! - [`limits`] (connections, requests in flight, shedding), [`upstream`] (connect, pools),
//!   [`drain`] (the shutdown state machine);
//! - the protocol adapters: [`http1`] (the fast path), [`hyper_path`] (HTTP/2, upgrades, the rest),
//!   [`tcp`] (opaque bytes), [`hbone`] (mutual TLS tunnels); [`body`] holds the hyper path's body wrappers;
//! - [`listener`]: accept, original destination, [`detect`]ion, dispatch to an adapter;
//! - this module: [`Shared`], the data plane's state, built by one constructor (tests call it too).
//!   The `run` wiring (listeners, admin, signals, the drain) is [`crate::run`].
//!
//! Threads: the data plane runs on `--workers` threads (one current-thread runtime when 1, the
//! default); the admin listener has its own thread so that a slow scrape never delays a request;
//! the access log has a writer thread so that stdout never blocks a request.

pub mod body;
pub mod detect;
pub mod drain;
pub mod exchange;
pub mod hbone;
pub mod http1;
pub mod hyper_path;
pub mod limits;
pub mod listener;
pub mod path;
pub mod phases;
pub mod rewind;
pub mod tcp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::settings::{AppProtocol, ProxyConfig, Timeouts};
use crate::telemetry::Telemetry;
use drain::Drain;
use limits::Limits;
use phases::Via;
use upstream::{ConnectOptions, Upstreams};

/// What the request path reads and never changes.
pub struct Settings {
    pub app: SocketAddr,
    pub app_protocol: AppProtocol,
    pub http2_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub http_ports: Vec<u16>,
    pub rewrite_host: bool,
    /// --trusted-hops: how much of a request's forwarding fields to keep (`phases::add_forwarding`).
    pub trusted_hops: usize,
    pub lowercase_header_names: bool,
    pub max_header_bytes: usize,
    /// The proxy's own listening ports (inbound, outbound, admin, HBONE): never a destination
    /// of inbound traffic, whatever its original destination or CONNECT authority says.
    pub own_ports: Vec<u16>,
    pub timeouts: Timeouts,
    pub via: Via,
    pub http1_server: auto::Builder<TokioExecutor>,
    pub http2_server: auto::Builder<TokioExecutor>,
}

/// The shared state of the data plane: settings, limits, upstreams, telemetry and the drain.
/// Built once by [`Shared::new`], which tests call too.
pub struct Shared {
    pub settings: Settings,
    pub limits: Arc<Limits>,
    pub upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    pub drain: Drain,
    /// Mutual TLS (HBONE), when an identity is configured.
    pub mtls: Option<hbone::Mtls>,
    /// Who may connect to which inbound port (--policy): the current policy, replaced when its
    /// file changes.
    pub policy: Option<tokio::sync::watch::Sender<Arc<crate::policy::Policy>>>,
    /// Where --policy was read from.
    pub policy_path: Option<std::path::PathBuf>,
}

impl Shared {
    /// `access_log` is stdout in production, a pipe or buffer in tests.
    pub fn new(config: &ProxyConfig, access_log: Box<dyn std::io::Write + Send>) -> Arc<Shared> {
        let lowercase = config.lowercase_header_names;
        let timeouts = config.timeouts;
        let (http1_server, http2_server) = server_builders(config);
        let connect = ConnectOptions {
            timeout: config.connect_timeout,
            mark: upstream::mark_if_permitted(config.proxy_mark),
        };
        let telemetry = Arc::new(Telemetry::new(config.access_log, access_log));
        let mtls = config.mtls.as_ref().map(|mtls| {
            hbone::Mtls::new(
                mtls,
                &config.trust_domain,
                config.pool_idle_timeout,
                &telemetry.metrics.identity_expiry_seconds,
            )
        });
        Arc::new(Shared {
            settings: Settings {
                app: config.app,
                app_protocol: config.app_protocol,
                http2_ports: config.http2_ports.clone(),
                opaque_ports: config.opaque_ports.clone(),
                http_ports: config.http_ports.clone(),
                rewrite_host: config.rewrite_host,
                trusted_hops: config.trusted_hops,
                lowercase_header_names: lowercase,
                max_header_bytes: config.max_header_bytes as usize,
                own_ports: config.own_ports.clone(),
                timeouts,
                via: Via::random(),
                http1_server,
                http2_server,
            },
            limits: Arc::new(Limits::new(
                descriptor_budget(config.max_connections),
                config.max_in_flight,
            )),
            upstreams: Upstreams::new(connect, config.pool_idle_timeout, !lowercase),
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
        })
    }
}

impl Shared {
    /// Whether --policy lets `peer` (None: plaintext) connect to inbound `port` at all.
    pub fn admits(&self, port: u16, peer: Option<&crate::identity::SpiffeId>) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|policy| verdict(policy.borrow().admits_connection(port, peer)))
    }

    /// Whether --policy lets `peer` (None: plaintext) make this HTTP request
    /// (`Some((method, path))`) or send opaque bytes (`None`) to inbound `port`.
    pub fn allows(
        &self,
        port: u16,
        peer: Option<&crate::identity::SpiffeId>,
        http: Option<(&http::Method, &str)>,
    ) -> bool {
        let Some(policy) = &self.policy else {
            return true;
        };
        let decision = policy.borrow().decide(port, peer, http);
        verdict(decision)
    }

    /// `x-forwarded-client-cert` for an inbound request from a verified peer (the SPIFFE ID of the
    /// HBONE tunnel it came in): `None` for plaintext and outbound. `By` is the identity this
    /// proxy serves now.
    pub fn client_cert_details(&self, conn: &exchange::ConnContext) -> Option<http::HeaderValue> {
        if conn.direction != crate::telemetry::metrics::Direction::Inbound {
            return None;
        }
        let peer = conn.peer.as_deref()?;
        let ours = self.mtls.as_ref()?.identity.material()?.id.to_string();
        phases::client_cert_details(&ours, peer)
    }

    /// Whether the policy in force names methods or paths for inbound `port`: its traffic must
    /// then be HTTP, never undetected bytes.
    pub fn judges_http_on(&self, port: u16) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|policy| policy.borrow().limits_http_on(port))
    }
}

/// How often the --policy file is checked for changes (its modification time and size, as the
/// identity files: Kubernetes updates a mounted ConfigMap by swapping a symlink).
const POLICY_POLL: Duration = Duration::from_secs(2);

impl Shared {
    /// Reloads --policy whenever its file changes; a file that no longer validates is logged
    /// loudly and the policy in force stays.
    pub async fn watch_policy_forever(self: Arc<Self>) {
        let (Some(sender), Some(path)) = (&self.policy, &self.policy_path) else {
            return;
        };
        let stamp = || {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        // Nothing seen yet: the first tick reads the file again, so that a change made between
        // the start's validation and this watcher is not missed.
        let mut seen = None;
        let mut ticker = tokio::time::interval(POLICY_POLL);
        loop {
            ticker.tick().await;
            let now = Some(stamp());
            if now == seen {
                continue;
            }
            seen = now;
            let trust_domain = sender.borrow().trust_domain().to_owned();
            match crate::policy::Policy::load(path) {
                Ok(policy) => {
                    sender.send_replace(Arc::new(policy.with_trust_domain(trust_domain)));
                    tracing::info!(path = %path.display(), "policy reloaded");
                }
                Err(e) => tracing::error!(
                    "the policy file changed but cannot be used ({e}); the previous policy stays in force: fix the file"
                ),
            }
        }
    }
}

/// A policy decision as allowed or not; refusals and audits are logged.
fn verdict(decision: crate::policy::Decision) -> bool {
    use crate::policy::Decision;
    match decision {
        Decision::Allow => true,
        Decision::Audit { reason } => {
            tracing::info!("policy audit (allowed): {reason}");
            true
        }
        Decision::Deny { reason } => {
            tracing::info!("policy refused: {reason}");
            false
        }
    }
}

/// Descriptors kept out of the connection budget (a quarter of the limit, at most this many): the
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
    let timeouts = config.timeouts;
    let keep_case = !config.lowercase_header_names;
    let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    http1
        .http1()
        .timer(TokioTimer::new())
        // hyper's head timer also runs while a keep-alive connection waits for its next request.
        .header_read_timeout(timeouts.header)
        .preserve_header_case(keep_case)
        .title_case_headers(keep_case)
        .max_headers(max_fields(config.max_header_bytes as usize))
        .max_buf_size(config.max_header_bytes as usize);
    let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    http2
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes)
        // An idle HTTP/2 client is pinged, and dropped when it stops answering.
        .keep_alive_interval(Some(timeouts.idle))
        .keep_alive_timeout(timeouts.header)
        // Extended CONNECT (RFC 8441: WebSocket over HTTP/2), forwarded to apps that support it.
        .enable_connect_protocol();
    (http1, http2)
}

/// The most header fields a head of `max_bytes` can hold: the limit is on bytes (431), never on a
/// count of fields (nginx accepts 150 fields; hyper's default refuses more than 100).
fn max_fields(max_bytes: usize) -> usize {
    // The shortest field line, `a:\r\n`, is 4 bytes.
    (max_bytes / 4).max(100)
}
