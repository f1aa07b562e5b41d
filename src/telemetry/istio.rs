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

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::identity::source::Identity;
use crate::sync::lock;
use crate::telemetry::metrics::Direction;
use crate::vocab::percent_decode;

const UNKNOWN: &str = "unknown";
/// What a label says past its bound.
const OTHER: &str = "other";
/// Distinct values a label a peer or a client chooses may take (peer principals, destination
/// services): past it, `other`, so that no one grows our metrics without bound.
const MAX_VALUES: usize = 1000;
/// Distinct workloads one peer principal may name in its `baggage` (a service account may run
/// several): past it, `other`.
const MAX_WORKLOADS_PER_PEER: usize = 16;

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
            let value =
                String::from_utf8_lossy(&percent_decode(value.trim().as_bytes())).into_owned();
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

/// `value`, while `set` has it or room for it ([`MAX_VALUES`]); else `other`.
fn bounded(set: &Mutex<HashSet<String>>, value: &str) -> String {
    let mut set = lock(set);
    if set.contains(value) || (set.len() < MAX_VALUES && set.insert(value.to_owned())) {
        value.to_owned()
    } else {
        OTHER.to_owned()
    }
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
    /// Where this proxy's SPIFFE ID comes from (read per exchange: it may load after start).
    identity: OnceLock<Identity>,
    principals: Mutex<HashSet<String>>,
    services: Mutex<HashSet<String>>,
    peer_workloads: Mutex<HashMap<String, HashSet<String>>>,
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
            identity: OnceLock::new(),
            principals: Mutex::default(),
            services: Mutex::default(),
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
            "Bytes a TCP connection's destination sent back (Istio's standard metric)",
            metrics.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes a TCP connection's client sent (Istio's standard metric)",
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

    /// Where this proxy's SPIFFE ID comes from.
    pub fn set_identity(&self, identity: Identity) {
        let _ = self.identity.set(identity);
    }

    fn own_principal(&self) -> String {
        (self.identity.get())
            .and_then(Identity::material)
            .map_or_else(|| UNKNOWN.to_owned(), |m| m.id.to_string())
    }

    /// Both sides of an exchange: (source, destination).
    fn sides(&self, seen: &Observed<'_>) -> (Side, Side) {
        let own = Side {
            workload: self.own.workload.clone(),
            namespace: self.own.namespace.clone(),
            principal: self.own_principal(),
        };
        let namespace_of = |id: &str| {
            id.split("/ns/")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .filter(|ns| is_dns_label(ns))
                .map(str::to_owned)
        };
        let principal = seen.peer.map(|p| bounded(&self.principals, p));
        let peer_namespace = (principal.as_deref())
            .filter(|p| *p != OTHER)
            .and_then(namespace_of);
        // Named only for a known peer: its principal keys the workloads it may name.
        let named = seen.peer_workload.and_then(|w| w.workload.as_deref());
        let peer_workload = match (&principal, named) {
            (Some(principal), Some(workload)) if principal != OTHER => {
                let mut known = lock(&self.peer_workloads);
                let names = known.entry(principal.clone()).or_default();
                if names.contains(workload) || names.len() < MAX_WORKLOADS_PER_PEER {
                    names.insert(workload.to_owned());
                    Some(workload.to_owned())
                } else {
                    Some(OTHER.to_owned())
                }
            }
            _ => None,
        };
        let peer = Side {
            workload: peer_workload.unwrap_or_else(|| UNKNOWN.into()),
            namespace: peer_namespace.unwrap_or_else(|| UNKNOWN.into()),
            principal: principal.unwrap_or_else(|| UNKNOWN.into()),
        };
        match seen.direction {
            Direction::Inbound => (peer, own),
            Direction::Outbound => (own, peer),
        }
    }

    pub fn observe_request(&self, seen: &Observed<'_>) {
        let (source, destination) = self.sides(seen);
        let inbound = seen.direction == Direction::Inbound;
        let service_address = bounded(&self.services, seen.authority);
        let service = (service_address.rsplit_once(':'))
            .map_or(service_address.as_str(), |(h, _)| h)
            .to_owned();
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
            destination_service_name: service,
            destination_service: service_address,
            destination_cluster: UNKNOWN,
            request_protocol: if seen.grpc_status.is_some() {
                "grpc"
            } else {
                "http"
            },
            // What the upstream chooses, bounded: HTTP's codes, gRPC's 17.
            response_code: if (100..=599).contains(&seen.status) {
                seen.status.to_string()
            } else {
                OTHER.to_owned()
            },
            grpc_response_status: match seen.grpc_status {
                None => String::new(),
                Some(code @ 0..=16) => code.to_string(),
                Some(_) => OTHER.to_owned(),
            },
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
            destination_service: bounded(&self.services, seen.authority),
            connection_security_policy: if seen.peer.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
        };
        // Istio's: sent, the bytes of the response (to the client); received, of the request.
        self.tcp_sent
            .get_or_create(&labels)
            .inc_by(seen.response_bytes);
        self.tcp_received
            .get_or_create(&labels)
            .inc_by(seen.request_bytes);
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
        let observe = |peer: &str, workload: &str, authority: &str, status: u16| {
            let workload = PeerWorkload {
                workload: Some(workload.to_owned()),
                namespace: None,
            };
            istio.observe_request(&Observed {
                direction: Direction::Inbound,
                peer: Some(peer),
                peer_workload: Some(&workload),
                authority,
                status,
                grpc_status: Some(99),
                duration_ms: 1.0,
                request_bytes: 0,
                response_bytes: 5,
            });
        };
        let frontend = "spiffe://cluster.local/ns/shop/sa/frontend";
        // One peer naming many workloads, with statuses no HTTP has.
        for i in 0..MAX_WORKLOADS_PER_PEER + 50 {
            observe(frontend, &format!("w{i}"), "backend:80", 1000 + i as u16);
        }
        // Many peers, many destinations.
        for i in 0..MAX_VALUES + 50 {
            let peer = format!("spiffe://cluster.local/ns/shop/sa/p{i}");
            observe(&peer, "w", &format!("198.18.0.{}:{i}", i % 250), 200);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count();
        // The first peer's named workloads and `other`; then the other peers until the bound
        // (the first took one place), then `other`.
        assert!(
            series <= MAX_WORKLOADS_PER_PEER + 1 + MAX_VALUES + 1,
            "{series} series"
        );
        for bounded in [
            "source_workload=\"other\"",
            "source_principal=\"other\"",
            "destination_service=\"other\"",
            "response_code=\"other\"",
            "grpc_response_status=\"other\"",
        ] {
            assert!(text.contains(bounded), "{bounded}");
        }
        assert!(text.contains("reporter=\"destination\""));
        assert!(text.contains("source_workload_namespace=\"shop\""));
        assert!(text.contains("destination_workload=\"backend\""));
        assert!(text.contains("connection_security_policy=\"mutual_tls\""));
    }
}
