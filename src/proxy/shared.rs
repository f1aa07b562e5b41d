//! [`Shared`], the data plane's state (settings, limits, upstreams, telemetry, the drain, mutual
//! TLS, the policy), and the questions every adapter asks of it. It sits below the adapters, which
//! are handed it; its constructor is the wiring's ([`crate::proxy`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::drain::Drain;
use super::exchange::ConnContext;
use super::limits::Limits;
use super::phases::{self, Via};
use super::routing::RoutesInForce;
use super::upstream::Upstreams;
use super::upstream::tunnels::Pool;
use crate::identity::SpiffeId;
use crate::identity::peers::PeerIdentities;
use crate::identity::source::Identity;
use crate::policy::{Decision, Policy};
use crate::settings::{InboundMtls, OutboundMtls, Traffic};
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::Direction;
use crate::vocab::PortList;

/// What the request path reads and never changes: the configured [`Traffic`], and what the
/// wiring makes of it.
pub struct Settings {
    pub(crate) traffic: Traffic,
    pub via: Via,
    pub(crate) http1_server: auto::Builder<TokioExecutor>,
    pub(crate) http2_server: auto::Builder<TokioExecutor>,
}

impl Settings {
    /// Where inbound traffic for `port` goes: --app for the app's own port (the address the
    /// operator gave for the app), else this pod's address the connection arrived on (`local`),
    /// never loopback, so that a service the pod binds to 127.0.0.1 only is not for the network
    /// (Istio 1.10 made the same change; ztunnel dials the pod address). The destination's own
    /// address is not used: a peer that routes a packet for 127.0.0.1 or another host to this pod
    /// would reach it. Plaintext (the listener) and tunnels (HBONE) both ask.
    pub(crate) fn inbound_upstream(&self, port: u16, local: SocketAddr) -> SocketAddr {
        if port == self.traffic.app.port() {
            self.traffic.app
        } else {
            SocketAddr::new(local.ip(), port)
        }
    }
}

/// The shared state of the data plane: settings, limits, upstreams, telemetry and the drain.
/// Built once by `Shared::new` (in [`crate::proxy`], the wiring), which tests call too; handed to
/// every adapter.
pub struct Shared {
    pub settings: Settings,
    pub limits: Arc<Limits>,
    pub(crate) upstreams: Upstreams,
    pub telemetry: Arc<Telemetry>,
    pub(crate) drain: Drain,
    /// Mutual TLS (HBONE), when an identity is configured.
    pub mtls: Option<Mtls>,
    /// Who may connect to which inbound port (--policy): the current policy, replaced when its
    /// file changes.
    pub(crate) policy: Option<tokio::sync::watch::Sender<Arc<Policy>>>,
    /// Where --policy was read from.
    pub(crate) policy_path: Option<std::path::PathBuf>,
    /// The --routes file's routes in force, replaced when the file changes.
    pub(crate) routes: Option<RoutesInForce>,
}

/// Mutual TLS: the identity, the modes and the outbound pool.
pub struct Mtls {
    pub identity: Identity,
    pub(crate) inbound: InboundMtls,
    pub(crate) outbound: OutboundMtls,
    pub(crate) plaintext_ports: PortList,
    pub(crate) peers: PeerIdentities,
    pub pool: Arc<Pool>,
    /// Pooled HBONE connections without a stream close after this long (--pool-idle-timeout).
    pub(crate) idle_timeout: Duration,
    /// The pod's name and namespace from the downward API, for the `baggage` header.
    pub(crate) pod_name: Option<String>,
    pub(crate) pod_namespace: Option<String>,
    /// `--workload-name`, for the `baggage` header.
    pub(crate) workload_name: Option<String>,
}

impl Mtls {
    /// Whether a plaintext inbound connection to `port` is refused.
    pub(crate) fn refuses_plaintext(&self, port: u16) -> bool {
        self.inbound == InboundMtls::Strict && !self.plaintext_ports.contains(port)
    }
}

impl Shared {
    /// Whether outbound connections to `port` are served as HTTP in mutual TLS, each request in a
    /// tunnel to its own endpoint: an outbound route with endpoints names the port (routes that
    /// name no port balance only what is served as HTTP anyway). Without outbound mutual TLS,
    /// never: every outbound connection is detected.
    pub(crate) fn balances_in_tunnels(&self, port: u16) -> bool {
        self.upstreams.tunnelled.is_some()
            && (self.routes.as_ref()).is_some_and(|routes| routes.current().balances_port(port))
    }

    /// Whether --policy lets `peer` (None: plaintext) connect to inbound `port` at all.
    pub(crate) fn admits(&self, port: u16, peer: Option<&SpiffeId>) -> bool {
        self.policy
            .as_ref()
            .is_none_or(|policy| verdict(policy.borrow().admits_connection(port, peer)))
    }

    /// Whether --policy lets `peer` (None: plaintext) make this HTTP request
    /// (`Some((method, path))`) or send opaque bytes (`None`) to inbound `port`.
    pub(crate) fn allows(
        &self,
        port: u16,
        peer: Option<&SpiffeId>,
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
    pub(crate) fn client_cert_details(&self, conn: &ConnContext) -> Option<http::HeaderValue> {
        if conn.direction != Direction::Inbound {
            return None;
        }
        let peer = conn.peer.as_deref()?;
        let ours = self.mtls.as_ref()?.identity.material()?.id.to_string();
        phases::client_cert_details(&ours, peer)
    }

    /// Whether the policy in force names methods or paths for inbound `port`, or an inbound route
    /// names the port: its traffic must then be HTTP, never undetected bytes.
    pub(crate) fn judges_http_on(&self, port: u16) -> bool {
        self.policy
            .as_ref()
            .is_some_and(|policy| policy.borrow().limits_http_on(port))
            || (self.routes.as_ref())
                .is_some_and(|routes| routes.current().routes_inbound_port(port))
    }
}

/// How often the --policy file is checked for changes (its modification time and size, as the
/// identity files: Kubernetes updates a mounted ConfigMap by swapping a symlink).
const POLICY_POLL: Duration = Duration::from_secs(2);

/// Calls `changed` whenever the file at `path` changes (its modification time and size, checked
/// every [`POLICY_POLL`]), and once at the first check: a change made between the start's
/// validation and the watcher's first look is not missed.
async fn on_change_forever(path: &std::path::Path, mut changed: impl FnMut()) {
    let stamp = || {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = None;
    let mut ticker = tokio::time::interval(POLICY_POLL);
    loop {
        ticker.tick().await;
        let now = Some(stamp());
        if now != seen {
            seen = now;
            changed();
        }
    }
}

impl Shared {
    /// Reloads --policy whenever its file changes; a file that no longer validates is logged
    /// loudly and the policy in force stays.
    pub async fn watch_policy_forever(self: Arc<Self>) {
        let (Some(sender), Some(path)) = (&self.policy, &self.policy_path) else {
            return;
        };
        on_change_forever(path, || {
            let trust_domain = sender.borrow().trust_domain().to_owned();
            match Policy::load(path) {
                Ok(policy) => {
                    sender.send_replace(Arc::new(policy.with_trust_domain(trust_domain)));
                    tracing::info!(path = %path.display(), "policy reloaded");
                }
                Err(e) => tracing::error!(
                    "the policy file changed but cannot be used ({e}); the previous policy stays in force: fix the file"
                ),
            }
        })
        .await;
    }

    /// Reloads --routes whenever its file changes (checked as --policy is); a file that no
    /// longer validates is logged loudly, shown on `/ready` and in `routes_reload_failed`, and
    /// the routes in force stay.
    pub async fn watch_routes_forever(self: Arc<Self>) {
        let Some(routes) = &self.routes else {
            return;
        };
        let path = &routes.path;
        on_change_forever(path, || match crate::routes::Routes::load(path) {
            Ok(loaded) => {
                routes.replace(loaded);
                tracing::info!(path = %path.display(), "routes reloaded");
            }
            Err(e) => {
                tracing::error!(
                    "the routes file changed but cannot be used ({e}); the previous routes stay in force: fix the file"
                );
                routes.said(Some(e.to_string()));
            }
        })
        .await;
    }

    /// Why the routes file on disk is not in force, when it is not (for `/ready`).
    pub fn routes_problem(&self) -> Option<String> {
        self.routes.as_ref().and_then(RoutesInForce::problem)
    }
}

/// A policy decision as allowed or not; refusals and audits are logged.
fn verdict(decision: Decision) -> bool {
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
