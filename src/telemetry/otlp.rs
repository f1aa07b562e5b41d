//! Spans, exported over OTLP (gRPC or HTTP/protobuf) by the OpenTelemetry project's own exporter.
//!
//! One span per exchange (server inbound, client outbound) and one per HBONE tunnel. The request
//! path only builds a sampled span and offers it to a bounded queue ([`QUEUE_SPANS`]); when the
//! queue is full the span is dropped and counted (`amazing_proxy_trace_spans_total{outcome=
//! "dropped"}`), never waited for. An export thread of its own (with its own small runtime, as the
//! admin server has) takes batches of up to [`BATCH_SPANS`] every [`EXPORT_EVERY`] and sends them,
//! each export bounded by [`EXPORT_TIMEOUT`]; a failed batch is counted and not retried (the
//! exporter's own retries are turned off: a collector's outage must not hold spans).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::access_log::Record;
use super::istio::workload_of_pod;
use super::metrics::{Direction, SpanOutcome};
use super::trace::{Sampler, SpanIds, parse_traceparent};
use crate::identity::source::Identity;
use crate::settings::{OtlpProtocol, PodNames, TraceConfig};
use crate::sync::lock;

/// Spans waiting for export at most. A span's values from the request are cut to
/// [`MAX_VALUE_BYTES`], so a span is a few KiB at most and the queue some MiB (a client that asks
/// for every request of its own to be sampled fills it with spans of its own, and pushes others'
/// out: they are counted as dropped).
pub const QUEUE_SPANS: usize = 2048;
/// The longest attribute value taken from a request (method, path, query, URL, request id), as
/// the SDK's attribute length limit would cut it.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Spans per export at most (the OpenTelemetry SDK's default; with values cut, well under a
/// collector's usual 4 MiB message limit).
pub const BATCH_SPANS: usize = 512;
/// How long a span waits for its batch to fill at most.
pub const EXPORT_EVERY: Duration = Duration::from_secs(1);
/// One export's bound (the OTLP default).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// This pod, as the spans' resource names it.
#[derive(Clone, Debug, Default)]
pub struct TraceResource {
    /// `service.name`: `--workload-name`, else the pod's workload, else `amazing-proxy`.
    pub service: String,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    pub workload: Option<String>,
}

impl TraceResource {
    pub(crate) fn new(names: &PodNames) -> TraceResource {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let workload = given(&names.workload);
        let pod = given(&names.pod);
        TraceResource {
            service: (workload.clone())
                .or_else(|| pod.as_deref().map(|pod| workload_of_pod(pod).to_owned()))
                .unwrap_or_else(|| "amazing-proxy".to_owned()),
            pod,
            namespace: given(&names.namespace),
            workload,
        }
    }
}

/// The tracer: the sampler, the export queue and what it counts.
pub struct Traces {
    pub(crate) sampler: Sampler,
    queue: mpsc::Sender<SpanData>,
    scope: InstrumentationScope,
    dropped: Counter,
    worker: Mutex<Option<Worker>>,
    /// Our identity, for the resource (read when the first batch goes, as it may load late).
    identity: Arc<std::sync::OnceLock<Identity>>,
}

struct Worker {
    close: Arc<tokio::sync::Notify>,
    closed: std::sync::mpsc::Receiver<()>,
}

/// What a tunnel's span says besides its ids.
#[derive(Debug)]
pub struct TunnelFacts {
    pub direction: Direction,
    pub start: SystemTime,
    /// The address the tunnel is for (`CONNECT <target>`).
    pub target: SocketAddr,
    /// The other end's SPIFFE ID.
    pub peer: Arc<str>,
}

/// A tunnel's span: exported when the tunnel ends (the guard is dropped with its stream).
pub struct TunnelSpan {
    traces: Arc<Traces>,
    ids: SpanIds,
    facts: TunnelFacts,
}

impl TunnelSpan {
    /// This span as the parent of what travels in the tunnel.
    pub(crate) fn as_parent(&self) -> super::trace::Parent {
        super::trace::Parent {
            trace_id: self.ids.trace_id,
            span_id: self.ids.span_id,
            sampled: Some(self.ids.sampled),
        }
    }
}

impl Drop for TunnelSpan {
    fn drop(&mut self) {
        let span = tunnel_span(
            &self.ids,
            &self.facts,
            SystemTime::now(),
            &self.traces.scope,
        );
        self.traces.enqueue(span);
    }
}

impl Traces {
    /// Starts the export thread. `spans` is the outcome family the queue and the thread count in.
    pub(crate) fn start(
        config: &TraceConfig,
        resource: TraceResource,
        mark: Option<u32>,
        spans: &prometheus_client::metrics::family::Family<super::metrics::SpanLabels, Counter>,
    ) -> std::io::Result<Arc<Traces>> {
        let (queue, received) = mpsc::channel(QUEUE_SPANS);
        let close = Arc::new(tokio::sync::Notify::new());
        let (done, closed) = std::sync::mpsc::channel();
        let identity = Arc::new(std::sync::OnceLock::new());
        // One statement each: the family's read guard lives to the end of its statement.
        let counter = |outcome: SpanOutcome| spans.get_or_create(&outcome.into()).clone();
        let (exported, failed, dropped) = (
            counter(SpanOutcome::exported),
            counter(SpanOutcome::failed),
            counter(SpanOutcome::dropped),
        );
        let export = Export {
            endpoint: config.endpoint.clone(),
            protocol: config.protocol,
            resource,
            identity: identity.clone(),
            mark,
            exported,
            failed,
        };
        let signal = close.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || {
                export.run(received, &signal);
                let _ = done.send(());
            })?;
        Ok(Arc::new(Traces {
            sampler: Sampler::new(config.sampling),
            queue,
            scope: InstrumentationScope::builder("amazing-proxy")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            dropped,
            worker: Mutex::new(Some(Worker { close, closed })),
            identity,
        }))
    }

    /// Our identity, for the resource's `spiffe.id`.
    pub(crate) fn set_identity(&self, identity: Identity) {
        let _ = self.identity.set(identity);
    }

    /// Offers an exchange's span, when sampled.
    pub(crate) fn export_exchange(&self, ids: &SpanIds, record: &Record<'_>) {
        if ids.sampled {
            self.enqueue(exchange_span(ids, record, &self.scope));
        }
    }

    /// A tunnel's span, exported when the returned guard is dropped; none when not sampled.
    pub(crate) fn tunnel_span(
        self: &Arc<Self>,
        ids: SpanIds,
        facts: TunnelFacts,
    ) -> Option<TunnelSpan> {
        ids.sampled.then(|| TunnelSpan {
            traces: self.clone(),
            ids,
            facts,
        })
    }

    fn enqueue(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    /// Exports what is queued and stops the thread, waiting `timeout` at most.
    pub(crate) fn close(&self, timeout: Duration) {
        let Some(worker) = lock(&self.worker).take() else {
            return;
        };
        worker.close.notify_one();
        if worker.closed.recv_timeout(timeout).is_err() {
            tracing::warn!("OTLP: spans still queued after {timeout:?} were not exported");
        }
    }
}

/// The export thread's side.
struct Export {
    endpoint: String,
    protocol: OtlpProtocol,
    resource: TraceResource,
    identity: Arc<std::sync::OnceLock<Identity>>,
    /// SO_MARK for the collector connection (`--proxy-mark`, when permitted).
    mark: Option<u32>,
    exported: Counter,
    failed: Counter,
}

impl Export {
    fn run(self, received: mpsc::Receiver<SpanData>, close: &tokio::sync::Notify) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(
                    "OTLP: cannot start the export thread's runtime ({e}); spans are dropped"
                );
                return;
            }
        };
        runtime.block_on(async {
            match self.exporter() {
                Ok(exporter) => self.export_loop(exporter, received, close).await,
                Err(e) => {
                    tracing::error!(endpoint = %self.endpoint, "OTLP: cannot build the exporter ({e}); spans are dropped");
                }
            }
        });
    }

    /// Batches until closed: at most BATCH_SPANS, waiting EXPORT_EVERY at most for a batch to
    /// fill; once closing, what is queued goes out and the loop ends.
    async fn export_loop(
        &self,
        mut exporter: opentelemetry_otlp::SpanExporter,
        mut received: mpsc::Receiver<SpanData>,
        close: &tokio::sync::Notify,
    ) {
        let mut identity_in_resource = false;
        let mut failing = false;
        let mut batch = Vec::with_capacity(BATCH_SPANS);
        let mut closing = false;
        loop {
            if !closing {
                tokio::select! {
                    span = received.recv() => match span {
                        Some(span) => batch.push(span),
                        None => closing = true,
                    },
                    () = close.notified() => closing = true,
                }
            }
            let deadline = tokio::time::Instant::now() + EXPORT_EVERY;
            while batch.len() < BATCH_SPANS {
                let next = if closing {
                    received.try_recv().ok()
                } else {
                    (tokio::time::timeout_at(deadline, received.recv()).await)
                        .ok()
                        .flatten()
                };
                match next {
                    Some(span) => batch.push(span),
                    None => break,
                }
            }
            if batch.is_empty() {
                if closing {
                    break;
                }
                continue;
            }
            // Set at the first batch, and again once the identity (which may load late) is known.
            if !identity_in_resource {
                let (resource, has_identity) = self.resource();
                exporter.set_resource(&resource);
                identity_in_resource = has_identity;
            }
            self.send(&exporter, std::mem::take(&mut batch), &mut failing)
                .await;
            batch.reserve(BATCH_SPANS);
        }
        let _ = exporter.shutdown();
    }

    /// One export, bounded by EXPORT_TIMEOUT, counted; a failure is logged when it starts.
    async fn send(
        &self,
        exporter: &opentelemetry_otlp::SpanExporter,
        batch: Vec<SpanData>,
        failing: &mut bool,
    ) {
        let count = batch.len() as u64;
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
            Ok(Ok(())) => {
                self.exported.inc_by(count);
                if *failing {
                    tracing::info!(endpoint = %self.endpoint, "OTLP: exporting again");
                    *failing = false;
                }
            }
            outcome => {
                if !*failing {
                    let reason = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                    };
                    tracing::warn!(endpoint = %self.endpoint, "OTLP: export failed ({reason}); failed spans are counted in amazing_proxy_trace_spans_total{{outcome=\"failed\"}} until it works again");
                    *failing = true;
                }
                // Counted after the warning: whoever sees the count finds the reason.
                self.failed.inc_by(count);
            }
        }
    }

    /// The exporter, connecting through [`Connector`] (marked sockets).
    fn exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, String> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let resolver = (hickory_resolver::Resolver::builder_tokio())
            .and_then(hickory_resolver::ResolverBuilder::build)
            .inspect_err(|e| tracing::debug!("OTLP: no DNS resolver ({e}); IP addresses only"))
            .ok();
        let connector = Connector {
            mark: self.mark,
            resolver,
        };
        let built = match self.protocol {
            OtlpProtocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(self.endpoint.clone())
                    .map_err(|e| e.to_string())?
                    .timeout(EXPORT_TIMEOUT);
                builder
                    .with_tonic()
                    .with_channel(endpoint.connect_with_connector_lazy(connector))
                    .with_retry_policy(no_retries())
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
            }
            OtlpProtocol::HttpProtobuf => {
                let client =
                    opentelemetry_http::hyper::HyperClient::new(connector, EXPORT_TIMEOUT, None);
                builder
                    .with_http()
                    .with_http_client(client)
                    .with_retry_policy(no_retries())
                    .with_endpoint(http_traces_url(&self.endpoint))
                    .with_timeout(EXPORT_TIMEOUT)
                    .build()
            }
        };
        built.map_err(|e| e.to_string())
    }

    /// The resource, and whether it names our identity yet.
    fn resource(&self) -> (Resource, bool) {
        let r = &self.resource;
        let mut attributes = Vec::new();
        let mut add = |key: &'static str, value: Option<&String>| {
            if let Some(value) = value {
                attributes.push(KeyValue::new(key, value.clone()));
            }
        };
        add("k8s.pod.name", r.pod.as_ref());
        add("service.instance.id", r.pod.as_ref());
        add("k8s.namespace.name", r.namespace.as_ref());
        add("k8s.deployment.name", r.workload.as_ref());
        let material = self.identity.get().and_then(Identity::material);
        if let Some(material) = &material {
            attributes.push(KeyValue::new("spiffe.id", material.id.to_string()));
        }
        let resource = Resource::builder_empty()
            .with_service_name(r.service.clone())
            .with_attributes(attributes)
            .build();
        (resource, material.is_some())
    }
}

/// Connects to the collector with the proxy's mark on the socket, as upstream connections have
/// it, so that `init`'s rules do not send the export back into this proxy where it runs with a uid
/// they do not exclude.
#[derive(Clone)]
struct Connector {
    mark: Option<u32>,
    resolver: Option<hickory_resolver::TokioResolver>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("mark", &self.mark)
            .finish_non_exhaustive()
    }
}

/// How long connecting to the collector may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (mark, resolver) = (self.mark, self.resolver.clone());
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(80);
            let ips: Vec<std::net::IpAddr> = match host.parse() {
                Ok(ip) => vec![ip],
                Err(_) => resolve(resolver.as_ref(), &host).await?,
            };
            let mut last = std::io::Error::other(format!("{host} resolves to no address"));
            for ip in ips {
                match connect_marked(SocketAddr::new(ip, port), mark).await {
                    Ok(stream) => return Ok(hyper_util::rt::TokioIo::new(stream)),
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
    }
}

/// The collector's addresses, through the pod's /etc/resolv.conf (hickory: the static binary has
/// no NSS for getaddrinfo to load).
async fn resolve(
    resolver: Option<&hickory_resolver::TokioResolver>,
    host: &str,
) -> std::io::Result<Vec<std::net::IpAddr>> {
    let resolver = resolver.ok_or_else(|| {
        std::io::Error::other(format!(
            "cannot resolve {host}: no DNS resolver (/etc/resolv.conf unreadable); give the collector's IP address"
        ))
    })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, resolver.lookup_ip(host)).await {
        Ok(Ok(found)) => Ok(found.iter().collect()),
        Ok(Err(e)) => Err(std::io::Error::other(format!("cannot resolve {host}: {e}"))),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("resolving {host} took longer than {CONNECT_TIMEOUT:?}"),
        )),
    }
}

async fn connect_marked(
    addr: SocketAddr,
    mark: Option<u32>,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(mark) = mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connecting to {addr} took longer than {CONNECT_TIMEOUT:?}"),
            )
        })?
}

/// A failed batch is not sent again: the next batch is already waiting, and a collector's
/// outage must not hold spans (or the export thread) longer than one export's bound.
fn no_retries() -> opentelemetry_otlp::RetryPolicy {
    opentelemetry_otlp::RetryPolicy::default().with_max_retries(0)
}

/// OTLP/HTTP's traces path, added when the endpoint names none (a URL with a path is taken as
/// the traces URL, as `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is).
fn http_traces_url(endpoint: &str) -> String {
    let after_scheme = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    if after_scheme.trim_end_matches('/').contains('/') {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    }
}

fn context(trace_id: u128, span_id: u64, sampled: bool, remote: bool) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(
        TraceId::from(trace_id),
        SpanId::from(span_id),
        flags,
        remote,
        TraceState::NONE,
    )
}

/// An exchange's span, from its access-log record: named `<method> <route>` (or `<method>`), with
/// the stable HTTP semantic conventions' attributes.
fn exchange_span(ids: &SpanIds, record: &Record<'_>, scope: &InstrumentationScope) -> SpanData {
    let server = record.direction == Direction::Inbound;
    let attributes = exchange_attributes(record, server);
    // The semantic conventions: a server's 5xx, a client's 4xx and 5xx, or no response at all.
    let failed =
        record.error.is_some() || record.status >= 500 || (!server && record.status >= 400);
    let status = if failed {
        Status::Error {
            description: record.error.map_or("", |kind| kind.as_str()).into(),
        }
    } else {
        Status::Unset
    };
    let method = cut(record.method);
    let name = match record.route {
        Some((route, _)) => format!("{method} {route}"),
        None => method,
    };
    let mut span = span_data(
        ids,
        server,
        name,
        (record.start, record.start + record.duration),
        attributes,
        scope,
    );
    span.status = status;
    // An exchange that came in a tunnel links to the tunnel's span.
    if let Some(tunnel) =
        (record.tunnel_traceparent).and_then(|tp| parse_traceparent(tp.as_bytes()))
    {
        let sampled = tunnel.sampled == Some(true);
        let tunnel = context(tunnel.trace_id, tunnel.span_id, sampled, true);
        span.links.links.push(Link::with_context(tunnel));
    }
    span
}

/// The stable HTTP semantic conventions' attributes of an exchange, and ours.
fn exchange_attributes(record: &Record<'_>, server: bool) -> Vec<KeyValue> {
    let (path, query) = record
        .path_and_query
        .split_once('?')
        .unwrap_or((record.path_and_query, ""));
    let mut attributes = Vec::with_capacity(16);
    let mut add = |key: &'static str, value: Value| attributes.push(KeyValue::new(key, value));
    add("http.request.method", cut(record.method).into());
    add("url.scheme", record.scheme.to_owned().into());
    add("url.path", cut(path).into());
    if !query.is_empty() {
        add("url.query", cut(query).into());
    }
    if !server {
        add(
            "url.full",
            cut(&format!(
                "{}://{}{}",
                record.scheme, record.original_authority, record.path_and_query
            ))
            .into(),
        );
    }
    let (host, port) = split_authority(record.original_authority);
    add("server.address", host.to_owned().into());
    if let Some(port) = port {
        add("server.port", Value::I64(i64::from(port)));
    }
    if server {
        let client = record
            .client
            .rsplit_once(':')
            .map_or(record.client, |(ip, _)| ip);
        add(
            "client.address",
            client.trim_matches(['[', ']']).to_owned().into(),
        );
    }
    let (peer_host, peer_port) = split_authority(record.upstream_authority);
    add("network.peer.address", peer_host.to_owned().into());
    if let Some(port) = peer_port {
        add("network.peer.port", Value::I64(i64::from(port)));
    }
    add("network.protocol.name", "http".into());
    add(
        "network.protocol.version",
        record
            .protocol
            .trim_start_matches("HTTP/")
            .trim_end_matches(".0")
            .to_owned()
            .into(),
    );
    if record.status != 0 {
        add(
            "http.response.status_code",
            Value::I64(i64::from(record.status)),
        );
    }
    add(
        "http.request.body.size",
        Value::I64(saturating_i64(record.request_bytes)),
    );
    add(
        "http.response.body.size",
        Value::I64(saturating_i64(record.response_bytes)),
    );
    if let Some(grpc) = record.grpc_status {
        add("rpc.grpc.status_code", Value::I64(i64::from(grpc)));
    }
    if let Some((route, _)) = record.route {
        add("http.route", route.to_owned().into());
    }
    if let Some(peer) = record.peer {
        add("peer.spiffe_id", peer.to_owned().into());
    }
    if record.request_id != "-" {
        add(
            "http.request.header.x-request-id",
            Value::Array(vec![StringValue::from(cut(record.request_id))].into()),
        );
    }
    if let Some(kind) = record.error {
        add("error.type", kind.as_str().into());
    }
    attributes
}

/// A tunnel's span: `CONNECT`, a client span outbound and a server span inbound.
fn tunnel_span(
    ids: &SpanIds,
    facts: &TunnelFacts,
    end: SystemTime,
    scope: &InstrumentationScope,
) -> SpanData {
    let server = facts.direction == Direction::Inbound;
    let attributes = vec![
        KeyValue::new("http.request.method", "CONNECT"),
        KeyValue::new("server.address", facts.target.ip().to_string()),
        KeyValue::new("server.port", i64::from(facts.target.port())),
        KeyValue::new("network.protocol.name", "hbone"),
        KeyValue::new("peer.spiffe_id", facts.peer.to_string()),
    ];
    let end = end.max(facts.start);
    span_data(
        ids,
        server,
        "CONNECT".into(),
        (facts.start, end),
        attributes,
        scope,
    )
}

/// A span of ours: `ids`' context, server or client, no events, links or status yet.
fn span_data(
    ids: &SpanIds,
    server: bool,
    name: String,
    (start_time, end_time): (SystemTime, SystemTime),
    attributes: Vec<KeyValue>,
    scope: &InstrumentationScope,
) -> SpanData {
    SpanData {
        span_context: context(ids.trace_id, ids.span_id, ids.sampled, false),
        parent_span_id: ids.parent_span_id.map_or(SpanId::INVALID, SpanId::from),
        parent_span_is_remote: ids.parent_span_id.is_some(),
        span_kind: if server {
            SpanKind::Server
        } else {
            SpanKind::Client
        },
        name: name.into(),
        start_time,
        end_time,
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

/// `host` and `port` of an authority (`[v6]:port` too); the whole as host when it has no port.
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') || host.starts_with('[') => match port.parse() {
            Ok(port) => (host.trim_matches(['[', ']']), Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// `value`, cut to [`MAX_VALUE_BYTES`] at a character boundary.
fn cut(value: &str) -> String {
    let mut end = value.len().min(MAX_VALUE_BYTES);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_endpoint_gets_the_traces_path_when_it_names_none() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://c:4318/custom"),
            "http://c:4318/custom"
        );
    }

    #[test]
    fn values_from_the_request_are_cut_at_a_character_boundary() {
        assert_eq!(cut("short"), "short");
        assert_eq!(cut(&"a".repeat(5000)).len(), MAX_VALUE_BYTES);
        let multi = format!("{}é", "a".repeat(MAX_VALUE_BYTES - 1));
        assert_eq!(cut(&multi), "a".repeat(MAX_VALUE_BYTES - 1));
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("198.18.0.1:80"), ("198.18.0.1", Some(80)));
        assert_eq!(
            split_authority("[2001:db8::1]:443"),
            ("2001:db8::1", Some(443))
        );
        assert_eq!(split_authority("svc"), ("svc", None));
        assert_eq!(split_authority("svc:http"), ("svc:http", None));
    }
}
