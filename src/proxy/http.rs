//! The life of one HTTP request, in the order it happens (Pingora's phases, without the framework):
//! admit (in-flight limit), request phase (hop-by-hop removal, Host, x-forwarded-*, x-request-id),
//! choose the upstream, send on a pooled connection with a response timeout, response phase
//! (`Server`, hop-by-hop removal, protocol switch), and logging when the response body ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Proxy;
use super::body::{RequestBody, RequestProgress, ResponseBody};
use super::error::{ErrorKind, classify_client_error};
use super::headers;
use super::listener::ConnectionGuard;
use crate::config::AppProtocol;
use crate::telemetry::access_log::Record;
use crate::telemetry::metrics::{Direction, MethodLabel};

/// What every request on one client connection shares.
#[derive(Debug)]
pub struct ConnContext {
    pub direction: Direction,
    pub client: SocketAddr,
    /// `client` as text, formatted once for the access log.
    pub client_text: String,
    /// The client's IP alone, for x-forwarded-for.
    pub client_ip_text: String,
    /// The address the client dialled (the pod's, before redirection).
    pub original: Authority,
    /// Where requests go: the app on loopback (inbound) or the original destination (outbound).
    pub upstream: Authority,
    /// Speak HTTP/2 to this upstream whatever the client spoke.
    pub upstream_http2: bool,
}

/// Counts requests in flight for `--max-in-flight`; released when the exchange ends.
pub struct InFlight(&'static AtomicUsize);

impl InFlight {
    pub fn acquire(counter: &'static AtomicUsize, max: usize) -> Option<InFlight> {
        if counter.fetch_add(1, Ordering::Relaxed) >= max {
            counter.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight(counter))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The request target as the log shows it: parsed by hyper, or raw from the fast path.
pub enum PathText {
    Uri(PathAndQuery),
    Raw(String),
}

impl PathText {
    fn as_str(&self) -> &str {
        match self {
            PathText::Uri(p) => p.as_str(),
            PathText::Raw(s) => s,
        }
    }
}

/// One request and its response, from arrival to the last byte: the logging phase's input.
pub struct Exchange {
    proxy: &'static Proxy,
    conn: Arc<ConnContext>,
    start: Instant,
    method: Method,
    version: Version,
    path: PathText,
    request_id: HeaderValue,
    pub status: u16,
    /// Request body bytes, when counted by the proxy's own copy loop.
    pub request_bytes: u64,
    /// Request body bytes, when counted by a body wrapper on another task.
    request: Option<Arc<RequestProgress>>,
    pub response_bytes: u64,
    pub grpc_status: Option<u16>,
    /// Set when the proxy answered with an error of its own.
    error: Option<ErrorKind>,
    /// Set once logged, so that dropping the exchange does not log it again.
    logged: bool,
    in_flight_slot: Option<InFlight>,
}

impl Drop for Exchange {
    /// An exchange dropped before it was logged had its request future dropped: the client left
    /// while the app was still working on the response head. Log it as nginx does (499).
    fn drop(&mut self) {
        if !self.logged {
            self.log(Some(ErrorKind::ClientDisconnected));
        }
    }
}

impl Exchange {
    pub fn new(
        proxy: &'static Proxy,
        conn: Arc<ConnContext>,
        start: Instant,
        method: Method,
        version: Version,
        path: PathText,
        request_id: HeaderValue,
    ) -> Exchange {
        Exchange {
            proxy,
            conn,
            start,
            method,
            version,
            path,
            request_id,
            status: 0,
            request_bytes: 0,
            request: None,
            response_bytes: 0,
            grpc_status: None,
            error: None,
            logged: false,
            in_flight_slot: None,
        }
    }

    /// Keeps the request counted in flight until the exchange ends.
    pub fn hold(&mut self, in_flight: InFlight) {
        self.in_flight_slot = Some(in_flight);
    }

    /// Ends an exchange the proxy answered itself.
    pub fn finish_with_error(mut self, kind: ErrorKind) {
        self.status = kind.status().as_u16();
        self.error = Some(kind);
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
        let error = self.error.or(error);
        let duration = self.start.elapsed();
        let direction = self.conn.direction;
        let metrics = &self.proxy.metrics;
        let per_direction = metrics.direction(direction);
        let request_bytes = self
            .request
            .as_ref()
            .map_or(self.request_bytes, |p| p.bytes.load(Ordering::Relaxed));
        // A client that left never saw the status: log what nginx logs for it.
        let status = match error {
            Some(ErrorKind::ClientDisconnected) => ErrorKind::ClientDisconnected.status().as_u16(),
            _ => self.status,
        };
        metrics.count_request(direction, MethodLabel::from(&self.method), status);
        per_direction.duration.observe(duration.as_secs_f64());
        per_direction.request_bytes.inc_by(request_bytes);
        per_direction.response_bytes.inc_by(self.response_bytes);
        if let Some(kind) = error {
            metrics.count_error(direction, kind);
        }
        if let Some(grpc_status) = self.grpc_status {
            metrics.count_grpc(direction, grpc_status);
        }
        let log = &self.proxy.access_log;
        if log.enabled() {
            log.log(&Record {
                start: SystemTime::now() - duration,
                duration,
                direction,
                method: self.method.as_str(),
                protocol: version_str(self.version),
                scheme: "http",
                original_authority: self.conn.original.as_str(),
                upstream_authority: self.conn.upstream.as_str(),
                path_and_query: self.path.as_str(),
                client: &self.conn.client_text,
                request_id: self.request_id.to_str().unwrap_or("-"),
                status,
                request_bytes,
                response_bytes: self.response_bytes,
                grpc_status: self.grpc_status,
                error,
            });
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

/// The service hyper calls for every request on a client connection.
// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
pub async fn handle(
    proxy: &'static Proxy,
    conn: Arc<ConnContext>,
    mut req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let start = Instant::now();
    let in_flight = InFlight::acquire(&proxy.in_flight, proxy.max_in_flight);
    let upgrade = headers::is_upgrade(req.headers());
    // HTTP/2 extended CONNECT (`:protocol`, RFC 8441): a 2xx turns the stream into a tunnel.
    let extended_connect =
        req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some();
    let downstream_upgrade = (upgrade || extended_connect).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // Request phase.
    if proxy.rewrite_host {
        if let Ok(host) = HeaderValue::from_str(conn.upstream.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
    } else if !parts.headers.contains_key(header::HOST) {
        // HTTP/2 clients name the host in :authority; an HTTP/1.1 app needs it as Host.
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
    }
    headers::remove_hop_by_hop(&mut parts.headers, upgrade);
    let request_id = headers::add_forwarding(&mut parts.headers, conn.client.ip(), "http");
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let progress = (!body.is_end_stream()).then(Arc::<RequestProgress>::default);

    let mut exchange = Exchange::new(
        proxy,
        conn.clone(),
        start,
        parts.method.clone(),
        parts.version,
        PathText::Uri(path.clone()),
        request_id,
    );
    exchange.request = progress.clone();
    let Some(in_flight) = in_flight else {
        return Ok(error_response(ErrorKind::Overloaded, exchange));
    };
    exchange.hold(in_flight);

    // Choose the upstream.
    let use_http2 = conn.upstream_http2
        || (proxy.app_protocol == AppProtocol::Auto && parts.version == Version::HTTP_2);
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(conn.upstream.clone());
    uri.path_and_query = Some(path);
    parts.uri = match Uri::from_parts(uri) {
        Ok(uri) => uri,
        Err(_) => return Ok(error_response(ErrorKind::BadRequest, exchange)),
    };
    parts.version = if use_http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let client = if use_http2 {
        &proxy.upstream.http2
    } else {
        &proxy.upstream.http1
    };
    // The keep-alive race: the app may close a pooled connection just as a request is written on
    // it, and hyper only retries requests it had not written yet. A bodyless idempotent request
    // can safely be sent once more, on a new connection.
    let mut replay = (progress.is_none() && parts.method.is_idempotent()).then(|| {
        let mut again = Request::new(RequestBody::empty());
        *again.method_mut() = parts.method.clone();
        *again.uri_mut() = parts.uri.clone();
        *again.version_mut() = parts.version;
        *again.headers_mut() = parts.headers.clone();
        *again.extensions_mut() = parts.extensions.clone();
        again
    });
    let upstream_req = Request::from_parts(parts, RequestBody::new(body, progress.clone()));
    let exchange_with_app = async {
        match client.request(upstream_req).await {
            Err(err) if replay.is_some() && is_closed_before_answering(&err) => {
                tracing::debug!(error = %err, upstream = %conn.upstream, "the app closed a pooled connection without answering: sending the request again");
                match replay.take() {
                    Some(again) => client.request(again).await,
                    None => Err(err),
                }
            }
            other => other,
        }
    };

    let mut response = match tokio::time::timeout(proxy.response_timeout, exchange_with_app).await {
        Err(_) => return Ok(error_response(ErrorKind::ResponseTimeout, exchange)),
        Ok(Err(err)) => {
            let client_body_failed = progress.is_some_and(|p| p.failed.load(Ordering::Relaxed));
            let kind = if client_body_failed {
                ErrorKind::ClientBody
            } else {
                classify_client_error(&err)
            };
            tracing::debug!(error = %err, kind = kind.as_str(), upstream = %conn.upstream, "request failed");
            return Ok(error_response(kind, exchange));
        }
        Ok(Ok(response)) => response,
    };

    // Response phase.
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let tunnel_open = switching || (extended_connect && response.status().is_success());
    if let (true, Some(downstream)) = (tunnel_open, downstream_upgrade) {
        let upstream = hyper::upgrade::on(&mut response);
        // Counted as an open connection so that the drain waits for it (up to --drain-timeout).
        let guard = ConnectionGuard::open(proxy, conn.direction);
        tokio::spawn(tunnel(proxy, conn.direction, downstream, upstream, guard));
    }
    headers::prepare_response(response.headers_mut(), switching);
    exchange.status = response.status().as_u16();
    exchange.read_grpc_status(response.headers());
    Ok(response.map(|body| ResponseBody::upstream(body, exchange)))
}

/// Whether the app closed or reset the connection before any response (not a connect failure).
fn is_closed_before_answering(err: &hyper_util::client::legacy::Error) -> bool {
    !err.is_connect() && classify_client_error(err) == ErrorKind::UpstreamReset
}

/// After a 101: bytes flow both ways until either side closes; no timeout, since an idle WebSocket
/// is a healthy one.
async fn tunnel(
    proxy: &'static Proxy,
    direction: Direction,
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _guard: ConnectionGuard,
) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("protocol switch failed: {e}");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        Ok((from_client, from_app)) => {
            // The tunnel's bytes are opaque: counted with the TCP bytes.
            let metrics = proxy.metrics.direction(direction);
            metrics.tcp_bytes_in.inc_by(from_client);
            metrics.tcp_bytes_out.inc_by(from_app);
        }
        Err(e) => tracing::debug!("upgraded connection ended: {e}"),
    }
}

fn error_response(kind: ErrorKind, mut exchange: Exchange) -> Response<ResponseBody> {
    exchange.status = kind.status().as_u16();
    exchange.error = Some(kind);
    // The exchange is logged once the message has been written.
    let mut response = Response::new(ResponseBody::message(kind.message(), Some(exchange)));
    *response.status_mut() = kind.status();
    fill_error_headers(response.headers_mut(), kind);
    response
}

/// A response the proxy sends without an exchange (connection-level refusals).
pub fn refusal(kind: ErrorKind) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::message(kind.message(), None));
    *response.status_mut() = kind.status();
    fill_error_headers(response.headers_mut(), kind);
    response
}

fn fill_error_headers(headers: &mut HeaderMap, kind: ErrorKind) {
    headers.insert(header::SERVER, headers::SERVER_VALUE.clone());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if kind.status() == StatusCode::SERVICE_UNAVAILABLE {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
}
