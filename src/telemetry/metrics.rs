//! Prometheus metrics, through `prometheus-client` (what linkerd2-proxy uses).
//!
//! Label sets are small enums so that cardinality is bounded whatever clients send: an unknown
//! method is counted as `OTHER`. Handles that do not depend on the request (per-direction
//! histograms, byte counters, gauges) are resolved once at startup so that the request path only
//! touches atomics, plus one map lookup for the (method, status) counter.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::{ErrorKind, Fault, HandshakeFailure};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// HTTP methods as a closed set, so a client cannot grow the label space.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub(crate) enum MethodLabel {
    GET,
    HEAD,
    POST,
    PUT,
    DELETE,
    CONNECT,
    OPTIONS,
    TRACE,
    PATCH,
    OTHER,
}

impl From<&http::Method> for MethodLabel {
    fn from(m: &http::Method) -> Self {
        match *m {
            http::Method::GET => MethodLabel::GET,
            http::Method::HEAD => MethodLabel::HEAD,
            http::Method::POST => MethodLabel::POST,
            http::Method::PUT => MethodLabel::PUT,
            http::Method::DELETE => MethodLabel::DELETE,
            http::Method::CONNECT => MethodLabel::CONNECT,
            http::Method::OPTIONS => MethodLabel::OPTIONS,
            http::Method::TRACE => MethodLabel::TRACE,
            http::Method::PATCH => MethodLabel::PATCH,
            _ => MethodLabel::OTHER,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) direction: Direction,
    pub(crate) method: MethodLabel,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub(crate) direction: Direction,
    pub(crate) kind: ErrorKind,
    pub(crate) fault: Fault,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabel {
    pub(crate) direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GrpcLabels {
    pub(crate) direction: Direction,
    pub(crate) grpc_status: u16,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http,
    Opaque,
}

impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        let name = match self {
            Protocol::Http => "http",
            Protocol::Opaque => "opaque",
        };
        std::fmt::Write::write_str(encoder, name)
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DetectLabels {
    pub(crate) direction: Direction,
    pub(crate) protocol: Protocol,
    pub(crate) reason: &'static str,
}

/// An HBONE stream's direction and the peer's SPIFFE ID. Only peers whose certificate chains to
/// the bundle of their trust domain get a series: the label space is the workloads of the trust
/// domains we have bundles for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PeerLabels {
    pub(crate) direction: Direction,
    pub(crate) peer: String,
}

/// What became of a sampled span (`amazing_proxy_trace_spans_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum SpanOutcome {
    /// Accepted by the collector.
    exported,
    /// The export queue was full: never queued.
    dropped,
    /// Its batch's export failed or timed out.
    failed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SpanLabels {
    pub(crate) outcome: SpanOutcome,
}

impl From<SpanOutcome> for SpanLabels {
    fn from(outcome: SpanOutcome) -> Self {
        SpanLabels { outcome }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandshakeLabels {
    pub(crate) direction: Direction,
    pub(crate) reason: HandshakeFailure,
}

/// A route of the routes file: its direction and name (the file's names, a bounded set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) direction: Direction,
    pub(crate) route: String,
}

/// An endpoint of an outbound route (the addresses its `endpoints` give, at most a few hundred).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndpointLabels {
    pub(crate) route: String,
    pub(crate) endpoint: String,
}

/// What the routes file's phases count, per route and per endpoint.
pub(crate) struct RouteFamilies {
    pub(crate) requests: Family<RouteLabels, Counter>,
    pub(crate) retries: Family<RouteLabels, Counter>,
    pub(crate) budget_exhausted: Family<RouteLabels, Counter>,
    pub(crate) rate_limited: Family<RouteLabels, Counter>,
    pub(crate) queued: Family<RouteLabels, Counter>,
    pub(crate) concurrency_rejected: Family<RouteLabels, Counter>,
    pub(crate) timeouts: Family<RouteLabels, Counter>,
    pub(crate) endpoint_requests: Family<EndpointLabels, Counter>,
    pub(crate) endpoint_failures: Family<EndpointLabels, Counter>,
    pub(crate) endpoint_ejections: Family<EndpointLabels, Counter>,
    pub(crate) endpoint_ewma: Family<EndpointLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while the routes file on disk does not validate and the last good routes stay in force.
    pub(crate) reload_failed: Gauge,
}

impl RouteFamilies {
    fn register(registry: &mut Registry) -> RouteFamilies {
        fn family<L, M>(registry: &mut Registry, name: &str, help: &str) -> Family<L, M>
        where
            L: Clone
                + std::hash::Hash
                + Eq
                + EncodeLabelSet
                + std::fmt::Debug
                + Send
                + Sync
                + 'static,
            M: Default
                + prometheus_client::metrics::TypedMetric
                + prometheus_client::encoding::EncodeMetric
                + std::fmt::Debug
                + Send
                + Sync
                + 'static,
        {
            let family = Family::<L, M>::default();
            registry.register(name, help, family.clone());
            family
        }
        let reload_failed = Gauge::default();
        registry.register(
            "routes_reload_failed",
            "1 while the --routes file does not validate and the last good routes stay in force",
            reload_failed.clone(),
        );
        RouteFamilies {
            requests: family(
                registry,
                "route_requests",
                "Requests that took a route, by route",
            ),
            retries: family(registry, "route_retries", "Retries sent, by route"),
            budget_exhausted: family(
                registry,
                "route_retry_budget_exhausted",
                "Retries the rules allowed but the retry budget refused, by route",
            ),
            rate_limited: family(
                registry,
                "route_rate_limited",
                "Requests refused by the route's rateLimit (429)",
            ),
            queued: family(
                registry,
                "route_queued",
                "Requests that waited in the route's concurrency queue",
            ),
            concurrency_rejected: family(
                registry,
                "route_concurrency_rejected",
                "Requests refused by the route's concurrency limit (503)",
            ),
            timeouts: family(
                registry,
                "route_timeouts",
                "Requests cut by the route's timeout or their grpc-timeout (504)",
            ),
            endpoint_requests: family(
                registry,
                "endpoint_requests",
                "Attempts sent to each endpoint of an outbound route",
            ),
            endpoint_failures: family(
                registry,
                "endpoint_failures",
                "Attempts that failed (connect failure, reset, 5xx, gRPC UNAVAILABLE) per endpoint",
            ),
            endpoint_ejections: family(
                registry,
                "endpoint_ejections",
                "Times each endpoint was ejected by the route's outlier detection",
            ),
            endpoint_ewma: family(
                registry,
                "endpoint_ewma_latency_seconds",
                "The balancer's EWMA of each endpoint's latency",
            ),
            reload_failed,
        }
    }
}

/// Handles resolved once per direction.
#[derive(Clone)]
pub(crate) struct DirectionMetrics {
    pub(crate) duration: Histogram,
    pub(crate) request_bytes: Counter,
    pub(crate) response_bytes: Counter,
    pub(crate) open_connections: Gauge,
    pub(crate) tcp_bytes_in: Counter,
    pub(crate) tcp_bytes_out: Counter,
}

pub struct Metrics {
    pub(crate) registry: Registry,
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    detect: Family<DetectLabels, Counter>,
    hbone_streams: Family<PeerLabels, Counter>,
    handshake_failures: Family<HandshakeLabels, Counter>,
    per_direction: [DirectionMetrics; 2],
    pub(crate) access_log_dropped: Counter,
    pub(crate) rejected_connections: Counter,
    pub(crate) shed_connections: Counter,
    pub(crate) accept_errors: Counter,
    pub(crate) drain_cut_requests: Counter,
    /// Seconds until the workload certificate expires (negative once expired); 0 without one.
    pub identity_expiry_seconds: Gauge,
    pub(crate) routes: RouteFamilies,
    /// Sampled spans by what became of them (--otlp-endpoint).
    pub(crate) trace_spans: Family<SpanLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The families labelled by direction, registered, and their two handles resolved once.
fn per_direction(registry: &mut Registry) -> [DirectionMetrics; 2] {
    let duration = Family::<DirectionLabel, Histogram>::new_with_constructor(|| {
        Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])
    });
    registry.register(
        "request_duration_seconds",
        "Time from receiving a request to the end of its response body",
        duration.clone(),
    );
    let request_bytes = Family::<DirectionLabel, Counter>::default();
    registry.register(
        "request_body_bytes",
        "HTTP request body bytes forwarded",
        request_bytes.clone(),
    );
    let response_bytes = Family::<DirectionLabel, Counter>::default();
    registry.register(
        "response_body_bytes",
        "HTTP response body bytes returned",
        response_bytes.clone(),
    );
    let open = Family::<DirectionLabel, Gauge>::default();
    registry.register(
        "open_connections",
        "Client connections currently open",
        open.clone(),
    );
    let tcp_in = Family::<DirectionLabel, Counter>::default();
    registry.register(
        "tcp_read_bytes",
        "Opaque TCP bytes read from clients",
        tcp_in.clone(),
    );
    let tcp_out = Family::<DirectionLabel, Counter>::default();
    registry.register(
        "tcp_write_bytes",
        "Opaque TCP bytes written to clients",
        tcp_out.clone(),
    );
    let resolve = |direction| {
        let label = DirectionLabel { direction };
        DirectionMetrics {
            duration: duration.get_or_create(&label).clone(),
            request_bytes: request_bytes.get_or_create(&label).clone(),
            response_bytes: response_bytes.get_or_create(&label).clone(),
            open_connections: open.get_or_create(&label).clone(),
            tcp_bytes_in: tcp_in.get_or_create(&label).clone(),
            tcp_bytes_out: tcp_out.get_or_create(&label).clone(),
        }
    };
    [resolve(Direction::Inbound), resolve(Direction::Outbound)]
}

/// A plain counter, registered.
fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    registry.register(name, help, counter.clone());
    counter
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("amazing_proxy");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by direction, method and status",
            requests.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "errors",
            "Requests and connections that failed, by kind and by whose fault it was",
            errors.clone(),
        );
        let grpc = Family::<GrpcLabels, Counter>::default();
        registry.register("grpc_responses", "gRPC calls by grpc-status", grpc.clone());
        let detect = Family::<DetectLabels, Counter>::default();
        registry.register(
            "protocol_detections",
            "Connections by detected protocol",
            detect.clone(),
        );

        let per_direction = per_direction(&mut registry);
        let access_log_dropped = counter(
            &mut registry,
            "access_log_dropped_records",
            "Access log records dropped because the writer could not keep up",
        );
        let rejected_connections = counter(
            &mut registry,
            "rejected_connections",
            "Connections refused because --max-connections was reached",
        );

        let shed_connections = counter(
            &mut registry,
            "shed_connections",
            "Idle or slow connections closed to make room at --max-connections",
        );
        let accept_errors = counter(
            &mut registry,
            "accept_errors",
            "Failed accepts (out of file descriptors and the like); the listener backs off",
        );

        let drain_cut_requests = counter(
            &mut registry,
            "drain_cut_requests",
            "Requests still running when --drain-timeout ended the drain",
        );

        let hbone_streams = Family::<PeerLabels, Counter>::default();
        registry.register(
            "hbone_streams",
            "HBONE tunnel streams opened, by direction and peer SPIFFE ID",
            hbone_streams.clone(),
        );
        let handshake_failures = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "HBONE TLS handshakes that failed, by direction and the check that refused them",
            handshake_failures.clone(),
        );
        let identity_expiry_seconds = Gauge::default();
        registry.register(
            "identity_expiry_seconds",
            "Seconds until the workload certificate expires (negative once expired; 0 without an identity)",
            identity_expiry_seconds.clone(),
        );

        let routes = RouteFamilies::register(&mut registry);
        let trace_spans = Family::<SpanLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Sampled spans by outcome: exported, dropped (the export queue was full) or failed (their export failed)",
            trace_spans.clone(),
        );
        Metrics {
            trace_spans,
            registry,
            routes,
            requests,
            errors,
            grpc,
            detect,
            hbone_streams,
            handshake_failures,
            per_direction,
            access_log_dropped,
            rejected_connections,
            shed_connections,
            accept_errors,
            drain_cut_requests,
            identity_expiry_seconds,
        }
    }

    pub(crate) fn direction(&self, direction: Direction) -> &DirectionMetrics {
        &self.per_direction[direction.index()]
    }

    pub(crate) fn count_request(&self, direction: Direction, method: MethodLabel, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                method,
                status,
            })
            .inc();
    }

    pub(crate) fn count_error(&self, direction: Direction, kind: ErrorKind) {
        if kind == ErrorKind::DrainTimeout {
            self.drain_cut_requests.inc();
        }
        self.errors
            .get_or_create(&ErrorLabels {
                direction,
                kind,
                fault: kind.fault(),
            })
            .inc();
    }

    pub(crate) fn count_grpc(&self, direction: Direction, grpc_status: u16) {
        self.grpc
            .get_or_create(&GrpcLabels {
                direction,
                grpc_status,
            })
            .inc();
    }

    pub(crate) fn count_detection(
        &self,
        direction: Direction,
        protocol: Protocol,
        reason: &'static str,
    ) {
        self.detect
            .get_or_create(&DetectLabels {
                direction,
                protocol,
                reason,
            })
            .inc();
    }

    pub(crate) fn count_hbone_stream(&self, direction: Direction, peer: &str) {
        self.hbone_streams
            .get_or_create(&PeerLabels {
                direction,
                peer: peer.to_owned(),
            })
            .inc();
    }

    pub(crate) fn count_handshake_failure(&self, direction: Direction, reason: HandshakeFailure) {
        self.handshake_failures
            .get_or_create(&HandshakeLabels { direction, reason })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod dashboard_tests {
    //! deploy/grafana/amazing-proxy.json, checked offline: the shape Grafana's dashboard schema
    //! asks for (as far as it matters to an import), and every metric its queries name is one
    //! this proxy exports.

    use super::*;
    use crate::error::{ErrorKind, HandshakeFailure};
    use serde_json::Value;
    use std::collections::BTreeSet;

    fn dashboard() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/amazing-proxy.json"
        );
        let text = std::fs::read_to_string(path).expect("the dashboard");
        serde_json::from_str(&text).expect("the dashboard is JSON")
    }

    /// The names of the families this proxy exports, each family given a sample first (an
    /// empty family is not written).
    fn exported() -> BTreeSet<String> {
        let metrics = Metrics::new();
        metrics.count_request(Direction::Inbound, MethodLabel::GET, 200);
        metrics.count_error(Direction::Inbound, ErrorKind::ConnectRefused);
        metrics.count_grpc(Direction::Inbound, 0);
        metrics.count_detection(Direction::Inbound, Protocol::Http, "http1");
        metrics.count_hbone_stream(Direction::Inbound, "spiffe://cluster.local/ns/a/sa/b");
        metrics.count_handshake_failure(Direction::Inbound, HandshakeFailure::UnknownCa);
        let routes = &metrics.routes;
        let route = RouteLabels {
            direction: Direction::Outbound,
            route: "r".into(),
        };
        for family in [
            &routes.requests,
            &routes.retries,
            &routes.budget_exhausted,
            &routes.rate_limited,
            &routes.queued,
            &routes.concurrency_rejected,
            &routes.timeouts,
        ] {
            family.get_or_create(&route).inc();
        }
        let endpoint = EndpointLabels {
            route: "r".into(),
            endpoint: "198.18.0.1:80".into(),
        };
        routes.endpoint_requests.get_or_create(&endpoint).inc();
        routes.endpoint_failures.get_or_create(&endpoint).inc();
        routes.endpoint_ejections.get_or_create(&endpoint).inc();
        routes.endpoint_ewma.get_or_create(&endpoint).set(0.001);
        (metrics.encode().lines())
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_dashboard_has_grafanas_shape() {
        let d = dashboard();
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
        let uid = d["uid"].as_str().expect("a uid");
        assert!(uid.len() <= 40 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
        let variables = d["templating"]["list"].as_array().expect("variables");
        assert!(
            variables
                .iter()
                .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            "a data source variable, so that the import asks for one"
        );
        let panels = d["panels"].as_array().expect("panels");
        let mut ids = BTreeSet::new();
        let mut cells = BTreeSet::new();
        for panel in panels {
            let id = panel["id"].as_u64().expect("a panel id");
            assert!(ids.insert(id), "panel id {id} twice");
            let kind = panel["type"].as_str().expect("a panel type");
            assert!(["row", "timeseries", "stat"].contains(&kind), "{kind}");
            let grid = &panel["gridPos"];
            let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| grid[k].as_u64().expect("gridPos"));
            assert!(w > 0 && h > 0 && x + w <= 24, "panel {id}: {grid}");
            for cx in x..x + w {
                for cy in y..y + h {
                    assert!(
                        cells.insert((cx, cy)),
                        "panel {id} overlaps another at {cx},{cy}"
                    );
                }
            }
            if kind == "row" {
                continue;
            }
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel {id}");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "panel {id} has no query");
            let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
            assert_eq!(refs.len(), targets.len(), "panel {id}: refIds");
        }
    }

    #[test]
    fn every_metric_the_dashboard_queries_is_exported() {
        let exported = exported();
        let d = dashboard();
        let mut exprs: Vec<String> = Vec::new();
        for panel in d["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().expect("an expr").to_owned());
            }
        }
        for variable in d["templating"]["list"].as_array().expect("variables") {
            if let Some(query) = variable["definition"].as_str() {
                exprs.push(query.to_owned());
            }
        }
        let mut named = 0;
        for expr in &exprs {
            let mut rest = expr.as_str();
            while let Some(at) = rest.find("amazing_proxy_") {
                let tail = &rest[at..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = &tail[..end];
                let family = ["_bucket", "_total", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|f| exported.contains(*f))
                    .unwrap_or(name);
                assert!(exported.contains(family), "{name} in {expr}: not exported");
                named += 1;
                rest = &tail[end..];
            }
        }
        assert!(named >= 20, "the queries name {named} metrics");
    }
}
