//! The record of one exchange: a request and its response, from the first byte of the request to
//! the last byte of the response (or an upgraded tunnel until it closes). Every exchange ends in
//! exactly one access-log record and one set of metrics, whichever adapter carried it and however
//! it ended: finished, answered by the proxy itself, abandoned by the client or cut by the drain.

use crate::telemetry::istio::{Observed, PeerWorkload};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Method, Version};

use super::phases::Synthetic;
use crate::error::ErrorKind;
use crate::telemetry::Telemetry;
use crate::telemetry::access_log::Record;
use crate::telemetry::metrics::{Direction, MethodLabel};
use crate::telemetry::trace::{Parent, SpanIds};

/// What every request on one client connection shares.
pub struct ConnContext {
    pub telemetry: Arc<Telemetry>,
    pub direction: Direction,
    pub client: SocketAddr,
    /// `client` as text, formatted once for the access log.
    pub client_text: String,
    /// The client's IP alone, for X-Forwarded-For.
    pub client_ip_text: String,
    /// The address the client dialled (the pod's, before redirection).
    pub original: Authority,
    /// The port whose policy judges the requests: the app port the connection stands for (the
    /// original destination's, or --app's for a connection made to the inbound port itself).
    pub port: u16,
    /// Where requests go: the app (inbound) or the original destination (outbound).
    pub upstream_addr: SocketAddr,
    /// `upstream_addr` as an authority, for URIs and the log.
    pub upstream: Authority,
    /// Speak HTTP/2 to this upstream whatever the client spoke.
    pub upstream_http2: bool,
    /// The peer's SPIFFE ID, when the connection arrived in an HBONE tunnel, as the log writes it.
    pub peer: Option<String>,
    /// The same, parsed once, for the policy.
    pub peer_id: Option<Arc<crate::identity::SpiffeId>>,
    /// That tunnel's `traceparent`, when the peer sent a valid one.
    pub tunnel_traceparent: Option<String>,
    /// What that tunnel's `baggage` said of the peer's workload (for Istio's metrics).
    pub peer_workload: Option<Arc<PeerWorkload>>,
    /// The tunnel's own span (sampled), parent of the requests in it that name none.
    pub tunnel_parent: Option<Parent>,
}

impl ConnContext {
    pub fn new(
        telemetry: Arc<Telemetry>,
        direction: Direction,
        client: SocketAddr,
        original: SocketAddr,
        upstream: SocketAddr,
        upstream_http2: bool,
    ) -> ConnContext {
        ConnContext {
            telemetry,
            direction,
            client,
            client_text: client.to_string(),
            client_ip_text: client.ip().to_string(),
            original: authority(original),
            port: upstream.port(),
            upstream_addr: upstream,
            upstream: authority(upstream),
            upstream_http2,
            peer: None,
            peer_id: None,
            tunnel_traceparent: None,
            peer_workload: None,
            tunnel_parent: None,
        }
    }
}

fn authority(addr: SocketAddr) -> Authority {
    // An IP:PORT always parses as an authority; the fallback only keeps this total.
    Authority::try_from(addr.to_string().as_str())
        .unwrap_or_else(|_| Authority::from_static("unknown"))
}

/// What a request tells the HTTP/1.1 connection to the app that carries it (one per connection,
/// read by `upstream::PooledIo`):
/// - that it gives the connection up: an app that answered early that it takes no more of the
///   body (a 413 that says close) and then waits without reading would keep hyper's connection
///   waiting on its write, holding the client's body and connection. Given up, the connection's
///   next write fails, which ends it and lets the body go;
/// - that the connection was upgraded (101): a tunnel's writes may wait on the app as long as it
///   likes (an idle WebSocket is a healthy one), out of the bound on a request's writes.
#[derive(Default, Debug)]
pub struct ConnControl {
    given_up: AtomicBool,
    upgraded: AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl ConnControl {
    pub fn upgrade(&self) {
        self.upgraded.store(true, Ordering::Release);
    }

    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }

    pub fn give_up(&self) {
        self.given_up.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn given_up(&self) -> bool {
        self.given_up.load(Ordering::Acquire)
    }

    /// Wakes `waker` when [`Self::give_up`] is called (a write waiting on the app).
    pub fn wake_on_give_up(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

/// Request body progress when the body is copied by another task (hyper's): shared between the
/// body wrapper and the exchange. Only allocated for requests that have a body.
#[derive(Default, Debug)]
pub struct RequestProgress {
    pub bytes: AtomicU64,
    pub failed: AtomicBool,
    /// The body paused longer than --request-body-timeout.
    pub timed_out: AtomicBool,
    /// The body's last frame went out: the response timeout starts now.
    pub ended_flag: AtomicBool,
    /// The one waiter for the end: the response timer of the attempt in progress (attempts
    /// follow one another). A waker, not a `Notify`: its list and lock were 1 % of a core on
    /// gRPC calls (perf).
    ended: futures_util::task::AtomicWaker,
}

impl RequestProgress {
    pub fn end(&self) {
        // Once: the end may be seen twice (the length sent, then the stream's end).
        if !self.ended_flag.swap(true, Ordering::AcqRel) {
            self.ended.wake();
        }
    }

    /// Resolves once the request body has been sent whole. One waiter at a time: a second
    /// waiter takes the wake-up from the first.
    pub async fn wait_ended(&self) {
        std::future::poll_fn(|cx| {
            if self.ended_flag.load(Ordering::Acquire) {
                return std::task::Poll::Ready(());
            }
            self.ended.register(cx.waker());
            // An end between the load and the registration woke no one: look again.
            if self.ended_flag.load(Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }
}

/// The request target as the log shows it: parsed by hyper, or raw from the fast path.
pub enum PathText {
    Uri(PathAndQuery),
    Raw(String),
    /// Opaque TCP and failures before a request line was read.
    None,
}

impl PathText {
    fn as_str(&self) -> &str {
        match self {
            PathText::Uri(p) => p.as_str(),
            PathText::Raw(s) => s,
            PathText::None => "",
        }
    }
}

/// One request and its response: the logging phase's input.
pub struct Exchange {
    conn: Arc<ConnContext>,
    start: Instant,
    method: Option<Method>,
    version: Version,
    path: PathText,
    request_id: HeaderValue,
    pub status: u16,
    /// Request body bytes, when counted by the proxy's own copy loop.
    pub request_bytes: u64,
    /// Request body bytes, when counted by a body wrapper on another task.
    pub request: Option<Arc<RequestProgress>>,
    pub response_bytes: u64,
    pub grpc_status: Option<u16>,
    /// Set when the proxy answered with an error of its own.
    pub error: Option<ErrorKind>,
    /// The route the request took (`--routes`) and the attempts it made.
    pub route: Option<(Arc<str>, u32)>,
    /// The endpoint the last attempt went to, when a route chose it (else the connection's
    /// upstream).
    pub endpoint: Option<SocketAddr>,
    /// The SPIFFE ID of the peer proxy the last attempt went to in an HBONE stream (outbound in
    /// mutual TLS, per request), when the connection itself did not come in a tunnel.
    pub upstream_peer: Option<Arc<str>>,
    /// This exchange's span, when tracing is on (the trace phase decides it with the request
    /// head).
    pub trace: Option<SpanIds>,
    /// Set once logged, so that dropping the exchange does not log it again.
    logged: bool,
}

impl Drop for Exchange {
    /// An exchange dropped before it was logged had its task dropped: the client left while the
    /// app was still working, or the drain timeout cut it. Logged either way (nginx logs 499).
    fn drop(&mut self) {
        if !self.logged {
            self.log(Some(ErrorKind::ClientDisconnected));
        }
    }
}

impl Exchange {
    pub fn new(
        conn: Arc<ConnContext>,
        start: Instant,
        method: Method,
        version: Version,
        path: PathText,
        request_id: HeaderValue,
    ) -> Exchange {
        Exchange {
            conn,
            start,
            method: Some(method),
            version,
            path,
            request_id,
            status: 0,
            request_bytes: 0,
            request: None,
            response_bytes: 0,
            grpc_status: None,
            error: None,
            route: None,
            endpoint: None,
            upstream_peer: None,
            trace: None,
            logged: false,
        }
    }

    /// A request refused before its request line could be read (malformed, too large, too slow).
    pub fn unparsed(conn: Arc<ConnContext>, start: Instant, version: Version) -> Exchange {
        let mut exchange = Exchange::new(
            conn,
            start,
            Method::GET,
            version,
            PathText::None,
            HeaderValue::from_static("-"),
        );
        exchange.method = None;
        exchange
    }

    pub fn conn(&self) -> &ConnContext {
        &self.conn
    }

    /// The request target as logged.
    pub fn path(&self) -> &str {
        self.path.as_str()
    }

    /// Ends an exchange that got no response (the client left, or the connection is closed).
    pub fn finish_with_error(mut self, kind: ErrorKind) {
        self.status = kind.status().as_u16();
        self.error = Some(kind);
        self.finish(None);
    }

    /// Notes the response the proxy answers with itself: its status, gRPC status and error, as
    /// every adapter records it.
    pub fn answer(&mut self, synthetic: Synthetic) {
        self.status = synthetic.status().as_u16();
        self.error = Some(synthetic.kind);
        if synthetic.grpc {
            self.grpc_status = Some(u16::from(synthetic.kind.grpc_status()));
        }
    }

    /// Ends an exchange the proxy answered itself.
    pub fn refused(mut self, synthetic: Synthetic) {
        self.answer(synthetic);
        self.finish(None);
    }

    pub fn read_grpc_status(&mut self, headers: &HeaderMap) {
        if let Some(status) = headers.get("grpc-status") {
            self.grpc_status = status.to_str().ok().and_then(|s| s.parse().ok());
        }
    }

    /// The logging phase: metrics and one access-log record.
    pub fn finish(mut self, error: Option<ErrorKind>) {
        self.log(error);
    }

    fn log(&mut self, error: Option<ErrorKind>) {
        self.logged = true;
        let telemetry = &self.conn.telemetry;
        let mut error = self.error.or(error);
        if error == Some(ErrorKind::ClientDisconnected) && telemetry.drain_cut() {
            error = Some(ErrorKind::DrainTimeout);
        }
        let duration = self.start.elapsed();
        let direction = self.conn.direction;
        let metrics = &telemetry.metrics;
        let per_direction = metrics.direction(direction);
        let request_bytes = self
            .request
            .as_ref()
            .map_or(self.request_bytes, |p| p.bytes.load(Ordering::Relaxed));
        // A client that left never saw the status: log what nginx logs for it.
        let status = match error {
            Some(kind @ (ErrorKind::ClientDisconnected | ErrorKind::DrainTimeout)) => {
                kind.status().as_u16()
            }
            _ => self.status,
        };
        let method = self.method.as_ref();
        metrics.count_request(
            direction,
            method.map_or(MethodLabel::OTHER, Into::into),
            status,
        );
        per_direction.duration.observe(duration.as_secs_f64());
        per_direction.request_bytes.inc_by(request_bytes);
        per_direction.response_bytes.inc_by(self.response_bytes);
        if let Some(kind) = error {
            metrics.count_error(direction, kind);
        }
        if let Some(grpc_status) = self.grpc_status {
            metrics.count_grpc(direction, grpc_status);
        }
        // The connection's peer (inbound tunnels), else the one the last attempt went to.
        let peer = (self.conn.peer.as_deref()).or(self.upstream_peer.as_deref());
        if let Some(istio) = telemetry.istio() {
            istio.observe_request(&Observed {
                direction,
                peer,
                peer_workload: self.conn.peer_workload.as_deref(),
                authority: self.conn.original.as_str(),
                status,
                grpc_status: self.grpc_status,
                duration_ms: duration.as_secs_f64() * 1000.0,
                request_bytes,
                response_bytes: self.response_bytes,
            });
        }
        let sampled = self.trace.filter(|ids| ids.sampled);
        let wants_record = telemetry.wants_records();
        if wants_record || sampled.is_some() {
            let endpoint = self.endpoint.map(|addr| addr.to_string());
            let record = Record {
                start: SystemTime::now() - duration,
                duration,
                direction,
                method: method.map_or("-", Method::as_str),
                protocol: version_str(self.version),
                scheme: "http",
                original_authority: self.conn.original.as_str(),
                upstream_authority: endpoint.as_deref().unwrap_or(self.conn.upstream.as_str()),
                path_and_query: self.path.as_str(),
                client: &self.conn.client_text,
                request_id: self.request_id.to_str().unwrap_or("-"),
                status,
                request_bytes,
                response_bytes: self.response_bytes,
                grpc_status: self.grpc_status,
                error,
                peer,
                tunnel_traceparent: self.conn.tunnel_traceparent.as_deref(),
                route: self.route.as_ref().map(|(name, n)| (&**name, *n)),
                trace: self.trace.as_ref(),
            };
            if wants_record {
                telemetry.record(&record);
            }
            if let (Some(ids), Some(traces)) = (sampled, &telemetry.traces) {
                traces.export_exchange(&ids, &record);
            }
        }
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}
