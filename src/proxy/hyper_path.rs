//! The hyper path: HTTP/2 and h2c, protocol upgrades (WebSocket), extended CONNECT, HTTP/1.0, and
//! apps spoken to over HTTP/2. One request's life, in the order it happens, applying the same
//! [`phases`] as the fast path: admit (in-flight limit), request rules (h2c upgrades removed, loop
//! check, hop-by-hop removal, Host, the fields the proxy owns), the inbound path in the form the
//! app resolves ([`path`]: 400 when ambiguous), the policy, the upstream, send with the retry rule
//! and the response timeout, response rules, and the logging phase when the response body ends.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::body::{RequestBody, ResponseBody};
use super::exchange::{ConnContext, Exchange, PathText, RequestProgress};
use super::limits::{ConnectionGuard, RequestMark};
use super::path;
use super::phases::{self, Sent, Synthetic, may_retry};
use super::shared::Shared;
use super::tcp::Counted;
use crate::error::{ErrorKind, classify_client_error};
use crate::settings::AppProtocol;
use crate::telemetry::metrics::Direction;

/// The service hyper calls for every request on a client connection. `open` keeps the request
/// counted open on its connection until its response body is done, or its tunnel closed.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnContext>,
    req: Request<Incoming>,
    open: RequestMark,
) -> Result<Response<ResponseBody>, Infallible> {
    let mut open = Some(open);
    let response = respond(shared, conn, req, &mut open).await;
    Ok(match open {
        Some(open) => response.map(|body| body.holding(open)),
        None => response,
    })
}

async fn respond(
    shared: Arc<Shared>,
    conn: Arc<ConnContext>,
    mut req: Request<Incoming>,
    open: &mut Option<RequestMark>,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let in_flight = shared.limits.start_request();
    // Never an HTTP/2 connection to the app behind the per-request rules: plain HTTP/1.1 instead.
    phases::remove_h2c_upgrade(req.headers_mut());
    let upgrade = phases::is_upgrade(req.headers());
    // HTTP/2 extended CONNECT (`:protocol`, RFC 8441): a 2xx turns the stream into a tunnel.
    let extended_connect =
        req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some();
    let downstream_upgrade = (upgrade || extended_connect).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let grpc = phases::is_grpc(
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .map(HeaderValue::as_bytes),
    );
    let ruled = request_rules(&shared, &conn, &mut parts, upgrade);
    let raw_path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    // Inbound paths are judged, logged and forwarded in the form the app resolves (an authority-
    // form CONNECT has none); outbound ones go as the app wrote them.
    let normal = match parts.uri.path_and_query() {
        Some(raw) if conn.direction == Direction::Inbound => normal_path(raw),
        _ => Ok(None),
    };
    let (path, ambiguous) = match normal {
        Ok(normal) => (normal.unwrap_or(raw_path), None),
        Err(kind) => (raw_path, Some(kind)),
    };
    let progress = (!body.is_end_stream()).then(Arc::<RequestProgress>::default);
    let mut exchange = Exchange::new(
        conn.clone(),
        start,
        parts.method.clone(),
        parts.version,
        PathText::Uri(path.clone()),
        ruled.request_id,
    );
    exchange.request = progress.clone();
    // A loop, then an ambiguous path: refused before any policy rule is consulted.
    if let Some(kind) = ruled.admitted.err().or(ambiguous) {
        return synthetic_response(Synthetic::new(kind, grpc), exchange);
    }
    if conn.direction == Direction::Inbound {
        let port = conn.port;
        let request = Some((&parts.method, path.as_str()));
        if !shared.allows(port, conn.peer_id.as_deref(), request) {
            let denied = Synthetic::new(ErrorKind::PolicyDenied, grpc);
            return synthetic_response(denied, exchange);
        }
    }
    let Some(in_flight) = in_flight else {
        let overloaded = Synthetic::new(ErrorKind::Overloaded, grpc);
        return synthetic_response(overloaded, exchange);
    };
    let use_http2 = choose_upstream(&shared, &conn, &mut parts, path);
    let settings = &shared.settings;
    let upstream_req = Request::from_parts(
        parts,
        RequestBody::new(body, progress.clone(), settings.timeouts.request_body),
    );
    let mut response =
        match send(&shared, &conn, upstream_req, use_http2, progress.as_deref()).await {
            Ok(response) => response,
            Err(kind) => return synthetic_response(Synthetic::new(kind, grpc), exchange),
        };

    // Response phase.
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let tunnel_open = switching || (extended_connect && response.status().is_success());
    phases::prepare_response(response.headers_mut(), switching);
    exchange.status = response.status().as_u16();
    exchange.read_grpc_status(response.headers());
    if let (true, Some(downstream)) = (tunnel_open, downstream_upgrade) {
        let upstream = hyper::upgrade::on(&mut response);
        // Counted as an open connection so that the drain waits for it (up to --drain-timeout).
        let gauge = &shared
            .telemetry
            .metrics
            .direction(conn.direction)
            .open_connections;
        let guard = shared.limits.track(gauge);
        // An HTTP/2 tunnel is a stream on its connection, which stays busy until it closes.
        tokio::spawn(tunnel(exchange, downstream, upstream, guard, open.take()));
        return response.map(|_| ResponseBody::empty());
    }
    let response_body_timeout = settings.timeouts.response_body;
    response
        .map(|body| ResponseBody::upstream(body, exchange, Some(in_flight), response_body_timeout))
}

/// The path in the form the app resolves (`None`: as it came), or 400 when it is ambiguous.
fn normal_path(raw: &PathAndQuery) -> Result<Option<PathAndQuery>, ErrorKind> {
    match path::normalize(raw.as_str()) {
        Ok(Cow::Borrowed(_)) => Ok(None),
        // Decoding unreserved characters and removing segments keeps a valid path valid.
        Ok(Cow::Owned(normal)) => PathAndQuery::try_from(normal)
            .map(Some)
            .map_err(|_| ErrorKind::AmbiguousPath),
        Err(reason) => {
            tracing::debug!(path = raw.as_str(), "ambiguous path refused: {reason}");
            Err(ErrorKind::AmbiguousPath)
        }
    }
}

/// What the request rules decided.
struct Ruled {
    request_id: HeaderValue,
    /// `Err` when the request must not go on (it looped back to this proxy).
    admitted: Result<(), ErrorKind>,
}

/// The request phase: loop check and `Via`, Host, hop-by-hop removal, forwarding fields.
fn request_rules(
    shared: &Shared,
    conn: &ConnContext,
    parts: &mut http::request::Parts,
    upgrade: bool,
) -> Ruled {
    let settings = &shared.settings;
    let admitted = settings.via.stamp(&mut parts.headers);
    if settings.rewrite_host {
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
    phases::remove_hop_by_hop(&mut parts.headers, upgrade);
    let request_id = phases::add_forwarding(
        &mut parts.headers,
        conn.client.ip(),
        settings.trusted_hops,
        shared.client_cert_details(conn),
    );
    Ruled {
        request_id,
        admitted,
    }
}

/// Points the request at the upstream; returns whether it goes over HTTP/2.
fn choose_upstream(
    shared: &Shared,
    conn: &ConnContext,
    parts: &mut http::request::Parts,
    path: PathAndQuery,
) -> bool {
    let use_http2 = conn.upstream_http2
        || (shared.settings.app_protocol == AppProtocol::Auto && parts.version == Version::HTTP_2);
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(conn.upstream.clone());
    uri.path_and_query = Some(path);
    // Scheme, an IP:PORT authority and a parsed path always make a URI.
    if let Ok(uri) = Uri::from_parts(uri) {
        parts.uri = uri;
    }
    parts.version = if use_http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    use_http2
}

/// Sends the request with the retry rule, bounded by the response timeout (counted from the end
/// of the request body).
async fn send(
    shared: &Shared,
    conn: &ConnContext,
    request: Request<RequestBody>,
    use_http2: bool,
    progress: Option<&RequestProgress>,
) -> Result<Response<Incoming>, ErrorKind> {
    let upstreams = &shared.upstreams;
    let client = if use_http2 {
        &upstreams.http2
    } else {
        &upstreams.http1
    };
    // A request with no body can be replayed: the retry rule decides whether it may be.
    let mut replay = progress.is_none().then(|| {
        let mut again = Request::new(RequestBody::empty());
        *again.method_mut() = request.method().clone();
        *again.uri_mut() = request.uri().clone();
        *again.version_mut() = request.version();
        *again.headers_mut() = request.headers().clone();
        *again.extensions_mut() = request.extensions().clone();
        again
    });
    let method = request.method().clone();
    let exchange_with_app = async {
        match client.request(request).await {
            Err(err)
                if is_closed_before_answering(&err)
                    && may_retry(&method, replay.is_some(), Sent::NoResponse) =>
            {
                tracing::debug!(error = %err, upstream = %conn.upstream, "the app closed a pooled connection without answering: sending the request again on a new one");
                let Some(again) = replay.take() else {
                    return Err(err);
                };
                // Another pooled connection may be just as dead: dial a new one. (HTTP/2
                // connections multiplex and are not raced this way.)
                if use_http2 {
                    client.request(again).await
                } else {
                    upstreams.http1_fresh.request(again).await
                }
            }
            other => other,
        }
    };
    let response_timer = async {
        if let Some(progress) = progress {
            progress.wait_ended().await;
        }
        tokio::time::sleep(shared.settings.timeouts.response).await;
    };
    tokio::select! {
        biased;
        result = exchange_with_app => result.map_err(|err| {
            let kind = match progress {
                Some(p) if p.timed_out.load(Ordering::Relaxed) => ErrorKind::RequestTimeout,
                Some(p) if p.failed.load(Ordering::Relaxed) => ErrorKind::ClientBody,
                _ => classify_client_error(&err),
            };
            tracing::debug!(error = %err, kind = kind.as_str(), upstream = %conn.upstream, "request failed");
            kind
        }),
        () = response_timer => Err(ErrorKind::ResponseTimeout),
    }
}

/// Whether the app closed or reset the connection before any response (not a connect failure).
fn is_closed_before_answering(err: &hyper_util::client::legacy::Error) -> bool {
    !err.is_connect() && classify_client_error(err) == ErrorKind::UpstreamReset
}

/// After a 101: bytes flow both ways until either side closes; no timeout, since an idle WebSocket
/// is a healthy one. The exchange is logged when the tunnel closes, with its bytes and duration.
async fn tunnel(
    mut exchange: Exchange,
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    _guard: ConnectionGuard,
    _open: Option<RequestMark>,
) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!("protocol switch failed: {e}");
            exchange.finish(Some(ErrorKind::UpstreamProtocol));
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    let mut client = Counted::new(&mut downstream);
    let result = relay_upgraded(&mut client, &mut upstream).await;
    let (from_client, from_app) = (client.read, client.written);
    // The tunnel's bytes are opaque: counted with the TCP bytes too.
    let metrics = exchange
        .conn()
        .telemetry
        .metrics
        .direction(exchange.conn().direction);
    metrics.tcp_bytes_in.inc_by(from_client);
    metrics.tcp_bytes_out.inc_by(from_app);
    exchange.request_bytes = from_client;
    exchange.response_bytes = from_app;
    match result {
        Ok(()) => exchange.finish(None),
        Err(e) => {
            tracing::debug!("upgraded connection ended: {e}");
            exchange.finish(Some(ErrorKind::TcpIo));
        }
    }
}

/// Copies both ways. The tunnel ends when the app closes its side (nginx does the same: a
/// WebSocket server that closed is done, whatever the client still holds); a client that closes
/// first has its end passed on, and the app's remaining bytes still flow back.
async fn relay_upgraded<C, U>(client: &mut C, app: &mut U) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut app_read, mut app_write) = tokio::io::split(app);
    let to_app = async {
        tokio::io::copy(&mut client_read, &mut app_write).await?;
        app_write.shutdown().await
    };
    let to_client = async {
        tokio::io::copy(&mut app_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    let mut to_app = std::pin::pin!(to_app);
    let mut to_client = std::pin::pin!(to_client);
    tokio::select! {
        done = to_client.as_mut() => done,
        done = to_app.as_mut() => {
            done?;
            to_client.await
        }
    }
}

/// A response the proxy makes itself; the exchange is logged once it has been written.
fn synthetic_response(synthetic: Synthetic, mut exchange: Exchange) -> Response<ResponseBody> {
    exchange.status = synthetic.status().as_u16();
    exchange.error = Some(synthetic.kind);
    if synthetic.grpc {
        exchange.grpc_status = Some(u16::from(synthetic.kind.grpc_status()));
    }
    let mut response = Response::new(ResponseBody::message(synthetic.body(), Some(exchange)));
    *response.status_mut() = synthetic.status();
    *response.headers_mut() = synthetic.header_map();
    response
}

/// A response the proxy sends without an exchange (connection-level refusals).
pub fn refusal(kind: ErrorKind) -> Response<ResponseBody> {
    let synthetic = Synthetic::new(kind, false);
    let mut response = Response::new(ResponseBody::message(synthetic.body(), None));
    *response.status_mut() = synthetic.status();
    *response.headers_mut() = synthetic.header_map();
    response
}
