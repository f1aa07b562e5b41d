//! Istio's standard metrics (`--metrics-compat istio`): `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes` and the
//! `istio_tcp_*` counters, with Istio's source and destination labels, so that Kiali's graph and
//! Istio's Grafana dashboards show these pods without Istio. Our own metrics stay as they are.
//!
//! Each proxy reports what it knows: inbound (`reporter="destination"`) this pod is the
//! destination and the peer the source (its namespace and principal from its verified SPIFFE ID,
//! its workload from the HBONE `baggage` it sent); outbound (`reporter="source"`) the reverse,
//! where the destination's principal is the tunnel's verified identity and its workload is not
//! known (`unknown`, as Istio writes what it does not know).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::sync::lock;
use crate::telemetry::metrics::Direction;

const UNKNOWN: &str = "unknown";
/// Distinct peer workloads a proxy labels by name; past it, `unknown`: a peer chooses what its
/// `baggage` says, and must not grow our metrics without bound.
const MAX_PEER_WORKLOADS: usize = 1000;

/// This pod, as its metrics name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnWorkload {
    pub workload: String,
    pub namespace: String,
}

impl OwnWorkload {
    /// From `--workload-name`, else the pod's name without what its controller added; the
    /// namespace from `POD_NAMESPACE`; `unknown` for what is not given.
    pub fn new(
        workload: Option<&str>,
        pod_name: Option<&str>,
        namespace: Option<&str>,
    ) -> OwnWorkload {
        let given = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_owned);
        OwnWorkload {
            workload: given(workload)
                .or_else(|| given(pod_name).map(|pod| workload_of_pod(&pod).to_owned()))
                .unwrap_or_else(|| UNKNOWN.into()),
            namespace: given(namespace).unwrap_or_else(|| UNKNOWN.into()),
        }
    }
}

/// The workload a pod belongs to, from its name as Kubernetes makes them: a Deployment's pod is
/// `<deployment>-<replicaset hash>-<5 characters>`, a StatefulSet's `<name>-<ordinal>`, a
/// DaemonSet's or Job's `<name>-<5 characters>`. A name that fits none is its own workload.
pub fn workload_of_pod(pod: &str) -> &str {
    let alnum = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let Some((rest, last)) = pod.rsplit_once('-') else {
        return pod;
    };
    if last.bytes().all(|b| b.is_ascii_digit()) && !last.is_empty() {
        return rest;
    }
    if last.len() != 5 || !alnum(last) {
        return pod;
    }
    match rest.rsplit_once('-') {
        Some((deployment, hash)) if (6..=10).contains(&hash.len()) && alnum(hash) => deployment,
        _ => rest,
    }
}

/// What the peer's HBONE `baggage` said of its workload (ztunnel's keys).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerWorkload {
    pub workload: Option<String>,
    pub namespace: Option<String>,
}

impl PeerWorkload {
    /// `k8s.deployment.name` (else the workload of `k8s.pod.name`) and `k8s.namespace.name` of a
    /// `baggage` value; values that are not DNS labels are left out.
    pub fn from_baggage(baggage: &str) -> PeerWorkload {
        let mut found = PeerWorkload::default();
        let mut pod = None;
        for member in baggage.split(',') {
            let member = member.split(';').next().unwrap_or("");
            let Some((key, value)) = member.split_once('=') else {
                continue;
            };
            let value = percent_decoded(value.trim());
            if !is_dns_label(&value) {
                continue;
            }
            match key.trim() {
                "k8s.deployment.name" | "service.name" if found.workload.is_none() => {
                    found.workload = Some(value);
                }
                "k8s.pod.name" => pod = Some(value),
                "k8s.namespace.name" => found.namespace = Some(value),
                _ => {}
            }
        }
        if found.workload.is_none() {
            found.workload = pod.map(|p| workload_of_pod(&p).to_owned());
        }
        found
    }
}

fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The labels Istio puts on its request metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: &'static str,
    source_cluster: &'static str,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: &'static str,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_cluster: &'static str,
    request_protocol: &'static str,
    response_code: String,
    grpc_response_status: String,
    response_flags: &'static str,
    connection_security_policy: &'static str,
}

/// The labels Istio puts on its TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_service: String,
    connection_security_policy: &'static str,
}

/// One side of an exchange as the metrics name it.
struct Side {
    workload: String,
    namespace: String,
    principal: String,
}

/// What a record tells the Istio metrics.
pub struct Observed<'a> {
    pub direction: Direction,
    /// The peer's verified SPIFFE ID (an HBONE tunnel), if any.
    pub peer: Option<&'a str>,
    /// What the peer's `baggage` said (inbound tunnels).
    pub peer_workload: Option<&'a PeerWorkload>,
    /// The authority the client asked for (`host:port`).
    pub authority: &'a str,
    pub status: u16,
    pub grpc_status: Option<u16>,
    pub duration_ms: f64,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

pub struct IstioMetrics {
    own: OwnWorkload,
    /// This proxy's SPIFFE ID, once its identity is loaded.
    own_principal: Mutex<Arc<str>>,
    peer_workloads: Mutex<HashSet<(String, String)>>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram>,
    request_bytes: Family<RequestLabels, Histogram>,
    response_bytes: Family<RequestLabels, Histogram>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
}

impl IstioMetrics {
    /// The families, registered in `registry` (unprefixed: the names are Istio's).
    pub fn new(own: OwnWorkload, registry: &mut Registry) -> IstioMetrics {
        fn duration_histogram() -> Histogram {
            Histogram::new([
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
            ])
        }
        fn bytes_histogram() -> Histogram {
            Histogram::new([
                1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1e6, 1e7, 1e8, 1e9,
            ])
        }
        let duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let bytes = || Family::new_with_constructor(bytes_histogram as fn() -> Histogram);
        let metrics = IstioMetrics {
            own,
            own_principal: Mutex::new(Arc::from(UNKNOWN)),
            peer_workloads: Mutex::default(),
            requests: Family::default(),
            duration,
            request_bytes: bytes(),
            response_bytes: bytes(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
        };
        registry.register(
            "istio_requests",
            "Requests (Istio's standard metric)",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request durations in milliseconds (Istio's standard metric)",
            metrics.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes (Istio's standard metric)",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes (Istio's standard metric)",
            metrics.response_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client of a TCP connection (Istio's standard metric)",
            metrics.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client of a TCP connection (Istio's standard metric)",
            metrics.tcp_received.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened, counted when they close (Istio's standard metric)",
            metrics.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed (Istio's standard metric)",
            metrics.tcp_closed.clone(),
        );
        metrics
    }

    /// This proxy's SPIFFE ID, once known.
    pub fn set_own_principal(&self, principal: &str) {
        *lock(&self.own_principal) = Arc::from(principal);
    }

    /// Both sides of an exchange: (source, destination).
    fn sides(&self, seen: &Observed<'_>) -> (Side, Side) {
        let own = Side {
            workload: self.own.workload.clone(),
            namespace: self.own.namespace.clone(),
            principal: lock(&self.own_principal).to_string(),
        };
        let namespace_of = |id: &str| {
            id.split("/ns/")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .filter(|ns| is_dns_label(ns))
                .map(str::to_owned)
        };
        let peer_namespace = seen.peer.and_then(namespace_of);
        let peer_workload = seen
            .peer_workload
            .and_then(|w| w.workload.clone())
            .filter(|w| {
                let ns = peer_namespace.clone().unwrap_or_default();
                let mut known = lock(&self.peer_workloads);
                known.contains(&(ns.clone(), w.clone()))
                    || (known.len() < MAX_PEER_WORKLOADS && known.insert((ns, w.clone())))
            });
        let peer = Side {
            workload: peer_workload.unwrap_or_else(|| UNKNOWN.into()),
            namespace: peer_namespace.unwrap_or_else(|| UNKNOWN.into()),
            principal: seen.peer.unwrap_or(UNKNOWN).to_owned(),
        };
        match seen.direction {
            Direction::Inbound => (peer, own),
            Direction::Outbound => (own, peer),
        }
    }

    pub fn observe_request(&self, seen: &Observed<'_>) {
        let (source, destination) = self.sides(seen);
        let inbound = seen.direction == Direction::Inbound;
        let service = seen
            .authority
            .rsplit_once(':')
            .map_or(seen.authority, |(h, _)| h);
        let labels = RequestLabels {
            reporter: if inbound { "destination" } else { "source" },
            source_app: source.workload.clone(),
            source_workload: source.workload,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            source_version: UNKNOWN,
            source_cluster: UNKNOWN,
            destination_app: destination.workload.clone(),
            destination_workload: destination.workload,
            destination_service_namespace: destination.namespace.clone(),
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_version: UNKNOWN,
            destination_service: seen.authority.to_owned(),
            destination_service_name: service.to_owned(),
            destination_cluster: UNKNOWN,
            request_protocol: if seen.grpc_status.is_some() {
                "grpc"
            } else {
                "http"
            },
            response_code: seen.status.to_string(),
            grpc_response_status: seen.grpc_status.map_or_else(String::new, |s| s.to_string()),
            response_flags: "-",
            connection_security_policy: if seen.peer.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
        };
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(seen.duration_ms);
        self.request_bytes
            .get_or_create(&labels)
            .observe(seen.request_bytes as f64);
        self.response_bytes
            .get_or_create(&labels)
            .observe(seen.response_bytes as f64);
    }

    /// A TCP connection, when it closes: `sent` bytes from its client, `received` back.
    pub fn observe_tcp(&self, seen: &Observed<'_>) {
        let (source, destination) = self.sides(seen);
        let inbound = seen.direction == Direction::Inbound;
        let labels = TcpLabels {
            reporter: if inbound { "destination" } else { "source" },
            source_workload: source.workload,
            source_workload_namespace: source.namespace,
            source_principal: source.principal,
            destination_workload: destination.workload,
            destination_workload_namespace: destination.namespace,
            destination_principal: destination.principal,
            destination_service: seen.authority.to_owned(),
            connection_security_policy: if seen.peer.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
        };
        // Istio's sent bytes are those sent to the destination, its received those it answered.
        self.tcp_sent
            .get_or_create(&labels)
            .inc_by(seen.request_bytes);
        self.tcp_received
            .get_or_create(&labels)
            .inc_by(seen.response_bytes);
        self.tcp_opened.get_or_create(&labels).inc();
        self.tcp_closed.get_or_create(&labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_belong_to_the_workloads_their_controllers_name() {
        assert_eq!(workload_of_pod("frontend-7d4f9b6c8-x2x9k"), "frontend");
        assert_eq!(workload_of_pod("my-api-6b9f5c7d4d-abcde"), "my-api");
        assert_eq!(workload_of_pod("web-0"), "web");
        assert_eq!(workload_of_pod("node-agent-q8k2m"), "node-agent");
        assert_eq!(workload_of_pod("httpbin"), "httpbin");
        assert_eq!(workload_of_pod("client"), "client");
        assert_eq!(workload_of_pod("a-b"), "a-b");
    }

    #[test]
    fn baggage_gives_the_peers_workload_and_namespace() {
        let w = PeerWorkload::from_baggage(
            "k8s.namespace.name=shop,k8s.pod.name=frontend-7d4f9b6c8-x2x9k",
        );
        assert_eq!(w.workload.as_deref(), Some("frontend"));
        assert_eq!(w.namespace.as_deref(), Some("shop"));
        let ztunnel = PeerWorkload::from_baggage(
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=cart,service.name=cart-svc,service.version=v1",
        );
        assert_eq!(ztunnel.workload.as_deref(), Some("cart"));
        let hostile =
            PeerWorkload::from_baggage("k8s.deployment.name=Not A Label,k8s.namespace.name=x%2Fy");
        assert_eq!(hostile, PeerWorkload::default());
        assert_eq!(
            OwnWorkload::new(None, Some("backend-5f6d7c8b9-qwert"), Some("shop")).workload,
            "backend"
        );
        assert_eq!(OwnWorkload::new(None, None, None).namespace, "unknown");
    }

    #[test]
    fn a_peer_cannot_grow_the_metrics_without_bound() {
        let mut registry = Registry::default();
        let istio = IstioMetrics::new(
            OwnWorkload::new(Some("backend"), None, Some("shop")),
            &mut registry,
        );
        for i in 0..MAX_PEER_WORKLOADS + 50 {
            let workload = PeerWorkload {
                workload: Some(format!("w{i}")),
                namespace: None,
            };
            istio.observe_request(&Observed {
                direction: Direction::Inbound,
                peer: Some("spiffe://cluster.local/ns/shop/sa/frontend"),
                peer_workload: Some(&workload),
                authority: "backend:80",
                status: 200,
                grpc_status: None,
                duration_ms: 1.0,
                request_bytes: 0,
                response_bytes: 5,
            });
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count();
        assert_eq!(
            series,
            MAX_PEER_WORKLOADS + 1,
            "the named ones, then one `unknown`"
        );
        assert!(text.contains("source_workload=\"unknown\""));
        assert!(text.contains("reporter=\"destination\""));
        assert!(text.contains("source_workload_namespace=\"shop\""));
        assert!(text.contains("destination_workload=\"backend\""));
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
    }
}
