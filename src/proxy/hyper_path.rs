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

use super::body::Replayable;
use super::body::{RequestBody, ResponseBody};
use super::driver::{self, Admitted, Attempt, AttemptFailure, Facts, Routed, Sent, may_retry};
use super::exchange::{ConnContext, ConnControl, Exchange, PathText, RequestProgress};
use super::limits::{ConnectionGuard, RequestMark};
use super::path;
use super::path::Ambiguous;
use super::phases::{self, Synthetic};
use super::shared::Shared;
use super::tcp::Counted;
use super::upstream::{Clients, ConnInfo, HttpClient, Noted};
use crate::error::{ErrorKind, classify_client_error};
use crate::settings::AppProtocol;
use crate::telemetry::metrics::Direction;
use crate::telemetry::trace::{self, ParentFields, SpanIds};
use hyper_util::client::legacy::connect::capture_connection;

/// The service hyper calls for every request on a client connection. `open` keeps the request
/// counted open on its connection until its response body is done, or its tunnel closed.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnContext>,
    req: Request<Incoming>,
    open: RequestMark,
) -> Result<Response<ResponseBody>, Infallible> {
    let mut open = Some(open);
    // Boxed: hyper moves each stream's future into a task of its own (HTTP/2), and `respond`'s
    // state is kilobytes; a pointer moves instead (perf: memmove was a tenth of the core).
    let response = Box::pin(respond(shared, conn, req, &mut open)).await;
    Ok(match open {
        Some(open) => {
            // The response is handed to the client from now: its progress is watched.
            open.touch();
            response.map(|body| body.holding(open))
        }
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
    // Never an HTTP/2 connection to the app behind the per-request rules: plain HTTP/1.1 instead.
    phases::remove_h2c_upgrade(req.headers_mut());
    let upgrade = phases::is_upgrade(req.version(), req.headers());
    // HTTP/2 extended CONNECT (`:protocol`, RFC 8441): a 2xx turns the stream into a tunnel.
    let extended_connect =
        req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some();
    let downstream_upgrade = (upgrade || extended_connect).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let grpc = is_grpc(&parts.headers);
    let ruled = request_rules(&shared, &conn, &mut parts, upgrade);
    let use_http2 = upstream_http2(&shared, &conn, parts.version);
    // RFC 8441 to an HTTP/1.1 app: only WebSocket has an HTTP/1.1 form (a GET with `Upgrade`).
    let websocket_over_http1 = extended_connect && !use_http2;
    let unsupported = websocket_over_http1 && !is_websocket(&parts.extensions);
    let (path, ambiguous) = judged_path(&conn, &parts.uri);
    let progress = body_progress(&body);
    let mut exchange = Exchange::new(
        conn.clone(),
        start,
        parts.method.clone(),
        parts.version,
        PathText::Uri(path.clone()),
        ruled.request_id,
    );
    exchange.request = progress.clone();
    exchange.trace = ruled.trace;
    let facts = Facts {
        method: &parts.method,
        path: path.as_str(),
        grpc,
        looped: ruled.looped,
        malformed: ruled.malformed || unsupported,
        ambiguous,
        plain_connect: parts.method == Method::CONNECT && !extended_connect,
        // An HTTP/2 refusal ends its stream only; hyper closes an HTTP/1 connection whose
        // request body was left unread.
        reusable: true,
        authority: ruled.authority.as_ref().and_then(|a| a.to_str().ok()),
        grpc_timeout: ruled.grpc_timeout,
    };
    let (in_flight, mut routed) = match driver::admit(&shared, &conn, &facts).await {
        Ok(Admitted { in_flight, route }) => (in_flight, route),
        Err(refused) => {
            exchange.route = refused.route.map(|route| (route, 0));
            return synthetic_response(refused.response, exchange);
        }
    };
    if let Some(routed) = &routed {
        exchange.route = Some((routed.state.label.clone(), 0));
    }
    if websocket_over_http1 {
        phases::websocket_handshake_for_http1(&mut parts.method, &mut parts.headers);
        parts.extensions.remove::<hyper::ext::Protocol>();
    }
    let content = body.size_hint().exact() != Some(0) && downstream_upgrade.is_none();
    point_at_upstream(&conn, &mut parts, path, (use_http2, content));
    let settings = &shared.settings;
    let body_timeout = settings.traffic.timeouts.request_body;
    let upstream_req = Request::from_parts(
        parts,
        RequestBody::new(body, progress.clone(), body_timeout),
    );
    let sent = forward(
        &shared,
        &conn,
        upstream_req,
        (use_http2, ruled.authority.as_ref()),
        progress.as_deref(),
        routed.as_mut(),
        &mut exchange,
    )
    .await;
    let mut response = match sent {
        Ok(response) => response,
        Err(kind) => return synthetic_response(Synthetic::new(kind, grpc), exchange),
    };

    // Response phase.
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if websocket_over_http1 && !switching && response.status().is_success() {
        // A 2xx opens the client's tunnel (RFC 8441), but only a 101 opened the app's.
        return synthetic_response(Synthetic::new(ErrorKind::UpstreamProtocol, grpc), exchange);
    }
    let tunnel_open =
        switching || (extended_connect && !websocket_over_http1 && response.status().is_success());
    phases::prepare_response(response.headers_mut(), switching && !websocket_over_http1);
    if websocket_over_http1 && switching {
        let mut status = response.status();
        phases::websocket_accepted_for_http2(&mut status, response.headers_mut());
        *response.status_mut() = status;
    }
    exchange.status = response.status().as_u16();
    exchange.read_grpc_status(response.headers());
    if let (true, Some(downstream)) = (tunnel_open, downstream_upgrade) {
        return open_tunnel(&shared, &conn, exchange, downstream, response, open.take());
    }
    let body_timeout = settings.traffic.timeouts.response_body;
    let give_up = give_up_hold(&mut response, use_http2, progress);
    response.map(|body| {
        let body = ResponseBody::upstream(body, exchange, Some(in_flight), body_timeout)
            .giving_up(give_up);
        Routed::hold(routed, body)
    })
}

/// The request's hold on its connection to the app, if `attempt` found its body still coming
/// when the response came ([`ConnControl`]). An HTTP/1.1 connection carries one request: given up
/// with it. Never an HTTP/2 one, which carries others (the app resets a stream whose body it does
/// not want).
/// The progress of a request's body, when it has one still to come.
fn body_progress(body: &Incoming) -> Option<Arc<RequestProgress>> {
    if body.is_end_stream() {
        return None;
    }
    let progress = Arc::<RequestProgress>::default();
    if body.size_hint().exact() == Some(0) {
        // Announced empty (`content-length: 0`), its END_STREAM still to come: an HTTP/1.1 app
        // is sent `Content-Length: 0` and the body is never read, so it is whole now, and the
        // response timer must not wait for a frame nobody polls.
        progress.end();
    }
    Some(progress)
}

fn give_up_hold(
    response: &mut Response<Incoming>,
    use_http2: bool,
    progress: Option<Arc<RequestProgress>>,
) -> Option<(Arc<ConnControl>, Arc<RequestProgress>)> {
    (response.extensions_mut().remove::<Arc<ConnControl>>())
        .filter(|_| !use_http2)
        .zip(progress)
}

/// Whether a request is a gRPC call (by its `content-type`).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    phases::is_grpc(headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes))
}

/// Whether an extended CONNECT's `:protocol` is WebSocket (the one with an HTTP/1.1 form).
fn is_websocket(extensions: &http::Extensions) -> bool {
    let websocket = extensions
        .get::<hyper::ext::Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    if !websocket {
        tracing::debug!("extended CONNECT refused: no HTTP/1.1 form for its :protocol");
    }
    websocket
}

/// A response that opened a tunnel (101, or 2xx to an extended CONNECT): bytes flow both ways
/// from now, on a task of their own; the client gets the head.
fn open_tunnel(
    shared: &Shared,
    conn: &ConnContext,
    exchange: Exchange,
    downstream: hyper::upgrade::OnUpgrade,
    mut response: Response<Incoming>,
    open: Option<RequestMark>,
) -> Response<ResponseBody> {
    let upstream = hyper::upgrade::on(&mut response);
    // Counted as an open connection so that the drain waits for it (up to --drain-timeout).
    let gauge = &shared
        .telemetry
        .metrics
        .direction(conn.direction)
        .open_connections;
    let guard = shared.limits.track(gauge);
    // An HTTP/2 tunnel is a stream on its connection, which stays busy until it closes.
    tokio::spawn(tunnel(exchange, downstream, upstream, guard, open));
    response.map(|_| ResponseBody::empty())
}

/// The path a request is judged, logged and forwarded with: inbound, in the form the app resolves
/// (an authority-form CONNECT has none), with why it is ambiguous when it is; outbound, as the app
/// wrote it.
fn judged_path(conn: &ConnContext, uri: &Uri) -> (PathAndQuery, Option<Ambiguous>) {
    let raw = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let normal = match uri.path_and_query() {
        Some(raw) if conn.direction == Direction::Inbound => normal_path(raw),
        _ => Ok(None),
    };
    match normal {
        Ok(normal) => (normal.unwrap_or(raw), None),
        Err(reason) => (raw, Some(reason)),
    }
}

/// The path in the form the app resolves (`None`: as it came), or 400 when it is ambiguous.
fn normal_path(raw: &PathAndQuery) -> Result<Option<PathAndQuery>, Ambiguous> {
    match path::normalize(raw.as_str())? {
        Cow::Borrowed(_) => Ok(None),
        // Decoding unreserved characters and removing segments keeps a valid path valid.
        Cow::Owned(normal) => PathAndQuery::try_from(normal)
            .map(Some)
            .map_err(|_| Ambiguous::NotAPath),
    }
}

/// What the request rules found.
struct Ruled {
    request_id: HeaderValue,
    /// This exchange's span, when tracing is on.
    trace: Option<SpanIds>,
    /// The request names this proxy in `Via`.
    looped: bool,
    /// No valid authority ([`phases::request_host`]), or an HTTP/2 field value with whitespace
    /// around it.
    malformed: bool,
    /// The authority as the client wrote it, read only when routes could match on it.
    authority: Option<HeaderValue>,
    /// `grpc-timeout`, read only when routes could honour it.
    grpc_timeout: Option<std::time::Duration>,
}

/// The request phase on a `HeaderMap`: loop check and `Via`, Host, hop-by-hop removal,
/// forwarding fields.
fn request_rules(
    shared: &Shared,
    conn: &ConnContext,
    parts: &mut http::request::Parts,
    upgrade: bool,
) -> Ruled {
    let settings = &shared.settings;
    let looped = settings.via.stamp(&mut parts.headers).is_err();
    // What routes match on, as the client wrote it (before Host is rewritten).
    let (authority, grpc_timeout) = if shared.routes.is_some() {
        let authority = match parts.uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
            None => parts.headers.get(header::HOST).cloned(),
        };
        let grpc = is_grpc(&parts.headers);
        let grpc_timeout = (parts.headers.get(phases::GRPC_TIMEOUT))
            .filter(|_| grpc)
            .and_then(|value| phases::parse_grpc_timeout(value.as_bytes()));
        (authority, grpc_timeout)
    } else {
        (None, None)
    };
    let tunnel =
        parts.method == Method::CONNECT && parts.extensions.get::<hyper::ext::Protocol>().is_none();
    let host = phases::request_host(
        &parts.headers,
        parts.version,
        parts.uri.authority().map(|a| a.as_str()),
        tunnel,
    );
    let malformed = host.is_err()
        || (parts.version == Version::HTTP_2 && phases::has_padded_value(&parts.headers))
        || phases::is_ambiguous_request(&parts.method, &parts.uri, &parts.headers);
    let host = if settings.traffic.rewrite_host {
        HeaderValue::from_str(conn.upstream.as_str()).ok()
    } else {
        host.ok().flatten()
    };
    // A malformed request is refused: its Host does not matter.
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    phases::remove_hop_by_hop(&mut parts.headers, upgrade);
    if parts.version == Version::HTTP_2 {
        phases::join_cookies(&mut parts.headers);
    }
    let request_id = phases::add_forwarding(
        &mut parts.headers,
        conn.client.ip(),
        settings.traffic.trusted_hops,
        shared.client_cert_details(conn),
    );
    // The trace phase: this exchange's span, a child of the caller's; the app (or the next
    // hop) sees ours as its parent.
    // The fields are read only when tracing is on.
    let trace = (shared.telemetry.traces.as_ref()).map(|traces| {
        let fields = ParentFields {
            tunnel: conn.tunnel_parent,
            ..ParentFields::from_headers(&parts.headers)
        };
        (traces.sampler.start_for(&fields), fields.continues_w3c())
    });
    if let Some((ids, continues_w3c)) = &trace {
        // The caller's tracestate goes on only with the W3C trace it belongs to.
        if !continues_w3c {
            parts.headers.remove(trace::TRACESTATE);
        }
        if let Ok(mut value) = HeaderValue::from_bytes(&ids.traceparent()) {
            // A new span id each request: never indexed by HPACK, as `phases::new_request_id`.
            value.set_sensitive(true);
            parts.headers.insert(trace::TRACEPARENT, value);
        }
    }
    Ruled {
        trace: trace.map(|(ids, _)| ids),
        request_id,
        looped,
        malformed,
        authority,
        grpc_timeout,
    }
}

/// Whether the request goes to the upstream over HTTP/2.
/// `--app-protocol` is the app's (inbound); outbound, the request keeps the version the app spoke
/// (its gRPC calls stay HTTP/2), as Envoy's and Linkerd's outbound do.
fn upstream_http2(shared: &Shared, conn: &ConnContext, client_version: Version) -> bool {
    let follow_client = shared.settings.traffic.app_protocol == AppProtocol::Auto
        || conn.direction == Direction::Outbound;
    conn.upstream_http2 || (follow_client && client_version == Version::HTTP_2)
}

/// Points the request at the upstream, in the HTTP version it goes in.
/// `how`: whether the request goes in HTTP/2, and whether it may carry content (not an upgrade's).
fn point_at_upstream(
    conn: &ConnContext,
    parts: &mut http::request::Parts,
    path: PathAndQuery,
    how: (bool, bool),
) {
    let (use_http2, content) = how;
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(conn.upstream.clone());
    uri.path_and_query = Some(path);
    // Scheme, an IP:PORT authority and a parsed path always make a URI.
    if let Ok(uri) = Uri::from_parts(uri) {
        parts.uri = uri;
    }
    parts.version = if use_http2 {
        // `:authority` (the URI's, the upstream's address: hyper's client dials it) and `Host`
        // must agree in HTTP/2 (RFC 9113 8.3.1): `:authority` alone is sent.
        parts.headers.remove(header::HOST);
        Version::HTTP_2
    } else {
        // RFC 9112 3.2: an HTTP/1.1 request has a Host, empty when the request named no
        // authority (an HTTP/1.0 request and an HTTP/2 one may name none).
        if !parts.headers.contains_key(header::HOST) {
            parts
                .headers
                .insert(header::HOST, HeaderValue::from_static(""));
        }
        if content && phases::content_means_nothing(parts.method.as_str()) {
            (parts.headers).insert(header::CONNECTION, HeaderValue::from_static("close"));
            // hyper's client sends a GET's content of unknown length only when told how.
            if !parts.headers.contains_key(header::CONTENT_LENGTH) {
                (parts.headers).insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
        }
        Version::HTTP_11
    };
}

/// Sends the request: on its route when it took one, else once (and again only for the
/// keep-alive race). `how`: whether it goes in HTTP/2, and the authority the client wrote.
async fn forward(
    shared: &Shared,
    conn: &ConnContext,
    request: Request<RequestBody>,
    how: (bool, Option<&HeaderValue>),
    progress: Option<&RequestProgress>,
    routed: Option<&mut Routed>,
    exchange: &mut Exchange,
) -> Result<Response<Incoming>, ErrorKind> {
    let (use_http2, authority) = how;
    let clients = conn_clients(shared, conn);
    let Some(routed) = routed else {
        let (result, peer) = send(clients, shared, request, use_http2, progress).await;
        exchange.upstream_peer = peer;
        return result.map_err(|(kind, _)| kind);
    };
    let mut request = request;
    if use_http2
        && routed.state.endpoints.is_some()
        && let Some(uri) = authority.and_then(|a| with_authority(request.uri(), a))
    {
        // To a route's endpoints, HTTP/2's `:authority` names what the app asked for; HTTP/1.1
        // keeps its Host, and its URI the connection's destination, which keys hyper's pool (one
        // pool per endpoint, whatever Host the requests name). Each endpoint's clients dial it
        // whatever the URI says.
        *request.uri_mut() = uri;
    }
    let sent = send_routed(shared, conn, request, use_http2, progress, routed, exchange).await;
    exchange.route = Some((routed.state.label.clone(), routed.attempts));
    sent
}

/// Sends the request on a route: attempt after attempt as its `retry` allows, each to the
/// endpoint its balancer picks (else the request's own destination) and within the attempt's
/// bound, which is never past the route's deadline (no backoff ends after it either): the
/// attempts' bounds are the deadline's only timer.
async fn send_routed(
    shared: &Shared,
    conn: &ConnContext,
    request: Request<RequestBody>,
    use_http2: bool,
    progress: Option<&RequestProgress>,
    routed: &mut Routed,
    exchange: &mut Exchange,
) -> Result<Response<Incoming>, ErrorKind> {
    let (mut parts, body) = request.into_parts();
    let method = parts.method.clone();
    let grpc = is_grpc(&parts.headers);
    // Kept to be sent again only when the route retries; else sent by the first attempt alone.
    let (replay, mut body_once) = if routed.retries() {
        (Some(Replayable::new(body, driver::REPLAY_BUFFER)), None)
    } else {
        (None, Some(body))
    };
    loop {
        let (addr, pick, bound) = routed.start_attempt(conn.upstream_addr)?;
        let body = match &replay {
            Some(replay) => replay.attempt(),
            None => body_once.take().unwrap_or_else(RequestBody::empty),
        };
        let mut request = Request::from_parts(attempt_head(&mut parts, routed.retries()), body);
        // An endpoint has clients of its own (dialling it whatever the URI says): the request
        // keeps the authority the app wrote.
        let endpoint_clients = match (&pick, &routed.state.endpoints) {
            (Some(_), Some(endpoints)) => {
                exchange.endpoint = Some(addr);
                Some(endpoints.clients(addr))
            }
            _ => None,
        };
        let clients = endpoint_clients
            .as_deref()
            .unwrap_or_else(|| conn_clients(shared, conn));
        if let Some(deadline) = routed.deadline
            && grpc
        {
            // The app sees what is left of the deadline.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            request
                .headers_mut()
                .insert(phases::GRPC_TIMEOUT, phases::grpc_timeout_value(left));
        }
        let once = send(clients, shared, request, use_http2, progress);
        let (result, peer) = match bound {
            Some(bound) => match tokio::time::timeout_at(bound, once).await {
                Ok(sent) => sent,
                Err(_) if routed.deadline.is_some_and(|d| d <= bound) => {
                    let timed_out = ErrorKind::RouteTimeout;
                    routed.finish_failed_attempt(pick, blame(timed_out, true, progress));
                    routed.timed_out();
                    return Err(ErrorKind::RouteTimeout);
                }
                Err(_) => {
                    let failure = Some(AttemptFailure::PerTryTimeout);
                    (Err((ErrorKind::ResponseTimeout, failure)), None)
                }
            },
            None => once.await,
        };
        exchange.upstream_peer = peer;
        let (failure, kind) = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let grpc_status = (response.headers().get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u16>().ok());
                let failed = driver::response_failed(status, grpc_status);
                if !routed.retries_response(status, grpc_status) {
                    routed.finish_attempt(pick, failed);
                    // Not sealed: the request's body may still be streaming to the app (a
                    // client-streaming or bidi gRPC call, an upload answered early); sealing it
                    // here reset the stream under both the request and this response.
                    return Ok(response);
                }
                // Asked before sealing: a response that is not retried after all is forwarded
                // with its request's body still flowing.
                let replayable = replay.as_ref().is_some_and(Replayable::can_replay);
                let again = routed.next_attempt(&method, replayable, AttemptFailure::Response);
                // Sealed only to go again, and then the copy must still be whole (in the rare
                // case it outgrew the buffer meanwhile, this response is forwarded after all).
                match again.filter(|_| seal(replay.as_ref())) {
                    Some(backoff) => {
                        routed.finish_attempt(pick, failed);
                        drop(response);
                        tokio::time::sleep(backoff).await;
                        continue;
                    }
                    None => {
                        routed.finish_attempt(pick, failed);
                        return Ok(response);
                    }
                }
            }
            Err((kind, failure)) => (failure, kind),
        };
        // The attempt failed: its body, if hyper still polls it, reads no more.
        let replayable = seal(replay.as_ref());
        let timed_out = failure == Some(AttemptFailure::PerTryTimeout);
        routed.finish_failed_attempt(pick, blame(kind, timed_out, progress));
        let Some(failure) = failure else {
            return Err(kind);
        };
        match routed.next_attempt(&method, replayable, failure) {
            Some(backoff) => tokio::time::sleep(backoff).await,
            None => return Err(kind),
        }
    }
}

/// What an attempt that failed with `kind` says of its endpoint: for one that `timed_out`,
/// [`driver::timed_out_blame`], the client's body whole when it has ended (or there is none).
fn blame(kind: ErrorKind, timed_out: bool, progress: Option<&RequestProgress>) -> ErrorKind {
    let body_whole = progress.is_none_or(|p| p.ended_flag.load(Ordering::Acquire));
    if timed_out {
        driver::timed_out_blame(kind, body_whole)
    } else {
        kind
    }
}

/// Ends the reading of a given-up attempt's body ([`Replayable::seal`], so that the copy cannot
/// change before the next attempt): whether another attempt could send the body whole. Never for
/// an attempt whose response is forwarded: its request's body goes on streaming.
fn seal(replay: Option<&Replayable>) -> bool {
    replay.is_some_and(|replay| {
        replay.seal();
        replay.can_replay()
    })
}

/// The head an attempt sends. Without a retry rule there is one attempt, and it takes the head
/// (no copy of its fields); with one, each attempt sends a copy.
fn attempt_head(parts: &mut http::request::Parts, retries: bool) -> http::request::Parts {
    if retries {
        parts.clone()
    } else {
        std::mem::replace(parts, Request::new(()).into_parts().0)
    }
}

/// `uri` with `authority` instead of its own, if that is a valid authority.
fn with_authority(uri: &Uri, authority: &HeaderValue) -> Option<Uri> {
    let mut parts = uri.clone().into_parts();
    parts.authority = Some(http::uri::Authority::try_from(authority.as_bytes()).ok()?);
    Uri::from_parts(parts).ok()
}

/// The clients for a connection's requests to its own destination: outbound ones go in HBONE
/// tunnels when outbound mutual TLS is on (the tunneller sends plaintext where `auto` says so).
fn conn_clients<'a>(shared: &'a Shared, conn: &ConnContext) -> &'a Clients {
    (shared.upstreams).clients(conn.direction == Direction::Outbound)
}

/// Sends the request through `clients`, and once more on a fresh connection when the retry rule
/// allows it. On failure: what went wrong, and the failure as a route's `retry.on` sees it
/// (`None`: none it could name). With it, the peer proxy's identity when the connection that
/// answered (or failed) was an HBONE stream.
async fn send(
    clients: &Clients,
    shared: &Shared,
    request: Request<RequestBody>,
    use_http2: bool,
    progress: Option<&RequestProgress>,
) -> (
    Result<Response<Incoming>, (ErrorKind, Option<AttemptFailure>)>,
    Option<Arc<str>>,
) {
    let (pooled, fresh) = clients.pair(use_http2);
    let has_body = progress.is_some();
    // A request without a body can be sent again: the retry rule decides whether it may be.
    let replay = (!has_body).then(|| {
        let mut again = Request::new(RequestBody::empty());
        *again.method_mut() = request.method().clone();
        *again.uri_mut() = request.uri().clone();
        *again.version_mut() = request.version();
        *again.headers_mut() = request.headers().clone();
        *again.extensions_mut() = request.extensions().clone();
        again
    });
    let method = request.method().clone();
    let request_upstream = request.uri().authority().cloned();
    let request_upstream = request_upstream.as_ref().map_or("-", |a| a.as_str());
    let failure = match attempt(shared, pooled, request, progress).await {
        Ok((response, peer)) => return (Ok(response), peer),
        Err(failure) => failure,
    };
    let sent = match &failure.error {
        Some(err) if is_closed_before_answering(err) => Sent::NoResponse,
        _ => Sent::ResponseStarted,
    };
    let retry = Attempt {
        reused: failure.reused,
        sent,
    };
    let failure = match replay {
        Some(again) if may_retry(&method, has_body, retry) => {
            tracing::debug!(
                upstream = request_upstream,
                "the app closed a reused connection without answering: sending the request again on a new one"
            );
            match attempt(shared, fresh, again, None).await {
                Ok((response, peer)) => return (Ok(response), peer),
                Err(failure) => failure,
            }
        }
        _ => failure,
    };
    let (kind, named) = match (&failure.error, progress) {
        (None, _) => (
            ErrorKind::ResponseTimeout,
            Some(AttemptFailure::PerTryTimeout),
        ),
        (Some(_), Some(p)) if p.timed_out.load(Ordering::Relaxed) => {
            (ErrorKind::RequestTimeout, None)
        }
        (Some(_), Some(p)) if p.failed.load(Ordering::Relaxed) => (ErrorKind::ClientBody, None),
        (Some(err), _) if err.is_connect() => match classify_client_error(err) {
            // The endpoint's proxy refused our identity: an answer, not a failure to retry.
            ErrorKind::PolicyDenied => (ErrorKind::PolicyDenied, None),
            kind => (kind, Some(AttemptFailure::Connect)),
        },
        (Some(err), _) if is_closed_before_answering(err) => (
            classify_client_error(err),
            Some(AttemptFailure::Reset(Sent::NoResponse)),
        ),
        (Some(err), _) => (classify_client_error(err), None),
    };
    if let Some(err) = &failure.error {
        tracing::debug!(error = %err, kind = kind.as_str(), upstream = %request_upstream, "request failed");
    }
    (Err((kind, named)), failure.peer)
}

/// A failed attempt: the client's error (`None`: the response timeout), whether the connection
/// it used had carried a request before, and its peer's identity if it was an HBONE stream.
struct Failure {
    error: Option<hyper_util::client::legacy::Error>,
    reused: bool,
    peer: Option<Arc<str>>,
}

/// One attempt, bounded by --response-timeout counted as on the fast path: from the moment the
/// request is written whole (its connection made and its body, if any, sent) to the response head.
async fn attempt(
    shared: &Shared,
    client: &HttpClient,
    mut request: Request<RequestBody>,
    progress: Option<&RequestProgress>,
) -> Result<(Response<Incoming>, Option<Arc<str>>), Failure> {
    // A body still to send goes only on a connection made: its end alone starts the timer, and
    // the connection's record comes with the answer or the error. Else the connection is
    // captured (a watch channel per request: 2 % of a core on gRPC calls, perf).
    let captured = (progress.is_none_or(|p| p.ended_flag.load(Ordering::Acquire)))
        .then(|| capture_connection(&mut request));
    let mut connected = captured.clone();
    let response_timer = async {
        if let Some(connected) = &mut connected {
            connected.wait_for_connection_metadata().await;
        }
        if let Some(progress) = progress {
            progress.wait_ended().await;
        }
        tokio::time::sleep(shared.settings.traffic.timeouts.response).await;
    };
    let result = tokio::select! {
        biased;
        result = client.request(request) => result.map_err(Some),
        () = response_timer => Err(None),
    };
    let noted = match (&captured, &result) {
        (Some(captured), _) => ConnInfo::note(captured),
        (None, Ok(response)) => ConnInfo::note_response(response.extensions()),
        (None, Err(Some(error))) => error
            .connect_info()
            .map_or_else(Noted::default, ConnInfo::note_connected),
        // Timed out after its body went whole: the connection is not known (the log names no
        // peer for it, and the connection does not count this request as a use).
        (None, Err(None)) => Noted::default(),
    };
    match result {
        Ok(mut response) => {
            if let Some(control) = noted.control {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    control.upgrade();
                } else if progress.is_some_and(|p| !p.ended_flag.load(Ordering::Acquire))
                    && ends_request(&response)
                {
                    // Answered, while the client's body is still coming, that the app takes
                    // no more of it: the response's end decides.
                    response.extensions_mut().insert(control);
                }
            }
            Ok((response, noted.peer))
        }
        Err(error) => Err(Failure {
            error,
            reused: noted.reused,
            peer: noted.peer,
        }),
    }
}

/// Whether an answer says the app takes no more of the request's body (RFC 9112 9.5): an error
/// that says close, as on the fast path (`framing::early_answer_ends_request`). Any other answer
/// may come from an app still reading: the body goes on.
fn ends_request(response: &Response<Incoming>) -> bool {
    // The status first: a success, the common case, never needs its fields read.
    response.status().as_u16() >= 400
        && (response.version() == Version::HTTP_10
            || (response.headers().get_all(header::CONNECTION).iter())
                .any(|v| phases::tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"))))
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
    let failure = client.failure();
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
            exchange.finish(Some(failure));
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
    exchange.answer(synthetic);
    let mut response = refusal(synthetic);
    *response.body_mut() = ResponseBody::message(synthetic.body(), Some(exchange));
    response
}

/// A response the proxy makes itself, with no exchange of its own to log (refusals of a whole
/// connection or of an HBONE `CONNECT`, which are counted where they are decided).
pub fn refusal(synthetic: Synthetic) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::message(synthetic.body(), None));
    *response.status_mut() = synthetic.status();
    *response.headers_mut() = synthetic.header_map();
    response
}
