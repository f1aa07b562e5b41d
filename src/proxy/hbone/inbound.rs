//! The HBONE server: TLS (a client certificate required, of a trust domain we have a bundle for and
//! chaining to that domain's CAs; a refusal is logged and counted with the check that failed,
//! `fault` peer), HTTP/2, and one
//! `CONNECT` per tunnelled connection. The authority must be an address of this pod (the one the
//! TLS connection arrived on: 400 otherwise, as ztunnel answers "ip mismatch"); the app is dialled
//! at the authority's port before the 200 (503 when it fails); the stream then takes the same
//! detection and HTTP or TCP path as a plaintext connection, with the peer's identity attached.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response};

use crate::proxy::body::ResponseBody;
use crate::proxy::hyper_path;
use crate::proxy::phases::Synthetic;
use crate::telemetry::istio::PeerWorkload;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::time::SystemTime;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::headers::{self, BAGGAGE, FORWARDED, TRACEPARENT};
use super::{
    CONNECTION_WINDOW, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS, MAX_FRAME,
    STREAM_WINDOW,
};
use crate::error::{ErrorKind, HandshakeFailure, classify_io};
use crate::identity::SpiffeId;
use crate::identity::tls::{ALPN_H2, failure, peer_id};
use crate::proxy::limits::{Activity, ConnectionGuard, OpenRequests, RequestMark};
use crate::proxy::shared::Shared;
use crate::proxy::tcp::Route;
use crate::proxy::upstream::connect;
use crate::telemetry::metrics::Direction;
use crate::telemetry::otlp::{TunnelFacts, TunnelSpan};
use crate::telemetry::trace::parse_traceparent;

/// The longest a TLS handshake may take (or --header-timeout when shorter): a peer that connects
/// and says nothing holds a descriptor, and is shed meanwhile when room is needed.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The bytes of one tunnelled connection: a CONNECT stream, upgraded.
pub(crate) type Stream = TokioIo<hyper::upgrade::Upgraded>;

/// One TLS connection from a peer: handshake, then its CONNECT streams until it closes. The
/// connection counts against --max-connections, is shed when it has no open stream and room is
/// needed, and closes after --idle-timeout without a stream.
///
/// `serve` carries each stream once its app connection is made: the listener's detection, then
/// the HTTP or TCP path, as for plaintext. It is handed in so that this adapter does not reach up
/// to the listener that calls it.
pub(crate) async fn serve_connection<S, F>(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    serve: S,
) where
    S: Fn(Arc<Shared>, Stream, TcpStream, Route, ConnectionGuard) -> F + Copy + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    // Boxed: the handshake's state (a refused one's linger buffer included) would otherwise stay
    // in the connection's task for as long as the peer keeps it (it was 14.5 KB with it, inline).
    // Destructured in the `let` itself: a named `Accepted` would keep its room in the task.
    let Some(Accepted {
        tls,
        guard,
        local,
        client,
        peer,
    }) = Box::pin(accept(&shared, stream, client)).await
    else {
        return;
    };
    let slot = guard.slot().clone();

    // The connection is idle (sheddable, and closed after --idle-timeout) while no stream is open.
    let open = OpenRequests::new(slot.clone());
    let service = {
        let (shared, open) = (shared.clone(), open.clone());
        service_fn(move |req| {
            let shared = shared.clone();
            let peer = peer.clone();
            let mark = open.start();
            async move {
                let response = open_stream(shared, req, client, local, peer, mark, serve).await;
                Ok::<_, Infallible>(response)
            }
        })
    };
    let conn = tunnel_server().serve_connection(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        biased;
        // Chosen by the shedder: no stream was open, so nothing is cut.
        () = slot.shed_wait() => return,
        result = conn.as_mut() => result,
        () = slot.close_requested_wait() => {
            // GOAWAY: open streams finish, new ones go elsewhere (unless shed meanwhile: a peer
            // that ignores the GOAWAY must not hold a slot the shedder counted as freed).
            conn.as_mut().graceful_shutdown();
            let Some(result) = slot.unless_shed(conn).await else { return };
            result
        }
        () = open.idle_for(shared.settings.traffic.timeouts.idle) => {
            tracing::debug!(%client, "HBONE connection without a stream for --idle-timeout: closing");
            conn.as_mut().graceful_shutdown();
            let Some(result) = slot.unless_shed(conn).await else { return };
            result
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, "HBONE connection ended: {e}");
    }
}

/// A peer's TLS connection, past the handshake and the identity checks.
struct Accepted {
    tls: TlsStream<TcpStream>,
    guard: ConnectionGuard,
    /// The address the connection arrived on, and the peer's.
    local: SocketAddr,
    client: SocketAddr,
    peer: Arc<SpiffeId>,
}

/// Admission and the handshake: `None` for a connection refused (logged and counted) or gone.
async fn accept(shared: &Shared, stream: TcpStream, client: SocketAddr) -> Option<Accepted> {
    let mtls = shared.mtls.as_ref()?;
    let metrics = &shared.telemetry.metrics;
    let gauge = &metrics.direction(Direction::Inbound).open_connections;
    let Some(guard) = shared.limits.admit(gauge, &metrics.shed_connections) else {
        metrics.rejected_connections.inc();
        let kind = ErrorKind::TooManyConnections;
        metrics.count_error(Direction::Inbound, kind);
        if let Ok(local) = stream.local_addr() {
            crate::proxy::tcp::log_refused(shared, Direction::Inbound, client, local, kind);
        }
        return None;
    };
    // A handshake in progress does no work yet: the shedder may take it.
    let slot = guard.slot();
    slot.set(Activity::Head);
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok()?;
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    let Some(material) = mtls.identity.material() else {
        tracing::warn!(%client, "HBONE connection refused: no valid workload identity (see /ready)");
        return None;
    };
    let acceptor = TlsAcceptor::from(material.server.clone());
    let handshake_timeout = (shared.settings.traffic.timeouts.header).min(HANDSHAKE_TIMEOUT);
    let handshake =
        tokio::time::timeout(handshake_timeout, acceptor.accept(stream).into_fallible());
    let tls = match slot.unless_shed(handshake).await? {
        Ok(Ok(tls)) => tls,
        Ok(Err((e, stream))) => {
            let (reason, detail) =
                failure(&e).unwrap_or((HandshakeFailure::Protocol, e.to_string()));
            refused(shared, client, local, reason, &detail);
            slot.unless_shed(linger(stream)).await;
            return None;
        }
        Err(_) => {
            tracing::info!(%client, "HBONE handshake timed out ({handshake_timeout:?})");
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        // rustls already refuses a client offering other protocols; this one offered none.
        let detail = "the client offered no ALPN h2: closing the connection";
        refused(shared, client, local, HandshakeFailure::NoAlpnH2, detail);
        return None;
    }
    // The verifier accepted the certificate, so it has a workload ID.
    let peer = peer_id(session.peer_certificates())?;
    tracing::debug!(%client, %peer, "HBONE connection accepted");
    Some(Accepted {
        tls,
        guard,
        local,
        client,
        peer: Arc::new(peer),
    })
}

/// The HTTP/2 server of HBONE connections: ztunnel's stream and window sizes, pinged when idle.
fn tunnel_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    builder
}

/// A handshake refused: logged with the check that failed and whose fault it is, and counted.
fn refused(
    shared: &Shared,
    client: SocketAddr,
    local: SocketAddr,
    reason: HandshakeFailure,
    detail: &str,
) {
    let metrics = &shared.telemetry.metrics;
    metrics.count_handshake_failure(Direction::Inbound, reason);
    let kind = ErrorKind::Handshake(reason);
    metrics.count_error(Direction::Inbound, kind);
    crate::proxy::tcp::log_refused(shared, Direction::Inbound, client, local, kind);
    tracing::info!(
        %client,
        error = %kind.as_str(),
        fault = %kind.fault().as_str(),
        "HBONE handshake refused: {detail}"
    );
}

/// How long, and how many bytes, a refused handshake's client is read after the alert.
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// After refusing a handshake: a FIN behind the alert, and what the client already sent (a TLS
/// 1.3 client sends its first request right after its Finished) read and dropped, bounded. Closed
/// with those bytes unread, the socket would answer with a reset that can reach the client before
/// it reads the alert: it would then see a broken connection instead of why it was refused.
async fn linger(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// A `CONNECT` refused: the same response, status and body as every refusal of the proxy's.
fn refuse_connect(kind: ErrorKind) -> Response<ResponseBody> {
    hyper_path::refusal(Synthetic::new(kind, false))
}

/// One CONNECT: checks, the app connection, 200, then the stream's own task. The stream keeps
/// `mark` (its connection busy) for its whole life.
async fn open_stream<S, F>(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    client: SocketAddr,
    local: SocketAddr,
    peer_id: Arc<SpiffeId>,
    mark: RequestMark,
    serve: S,
) -> Response<ResponseBody>
where
    S: Fn(Arc<Shared>, Stream, TcpStream, Route, ConnectionGuard) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let peer = peer_id.to_string();
    if req.method() != Method::CONNECT {
        return refuse_connect(ErrorKind::BadRequest);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        tracing::info!(%peer, uri = %req.uri(), "HBONE CONNECT refused: the authority is not ip:port");
        return refuse_connect(ErrorKind::BadRequest);
    };
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    if target.ip() != local.ip() {
        tracing::info!(%peer, %target, pod = %local.ip(), "HBONE CONNECT refused: the authority is not this pod's address");
        return refuse_connect(ErrorKind::BadRequest);
    }
    let metrics = &shared.telemetry.metrics;
    if target.port() == local.port() || shared.settings.traffic.own_ports.contains(&target.port()) {
        // The admin port, or a listener of ours (a loop): never for a peer, as ztunnel answers.
        // Debug: a peer could fill the log with these; the metric counts them.
        tracing::debug!(%peer, %target, "HBONE CONNECT refused: the port is one of the proxy's own");
        metrics.count_error(Direction::Inbound, ErrorKind::ProxyPort);
        return refuse_connect(ErrorKind::ProxyPort);
    }
    let start = SystemTime::now();
    let traceparent = log_tunnel_headers(req.headers(), &peer, target);
    // Only read when Istio's metrics are exported: it names the peer's workload there.
    let peer_workload = shared.telemetry.istio().and_then(|_| {
        let baggage = req.headers().get(BAGGAGE)?.to_str().ok()?;
        Some(Arc::new(PeerWorkload::from_baggage(baggage)))
    });
    if !shared.admits(target.port(), Some(&peer_id)) {
        metrics.count_error(Direction::Inbound, ErrorKind::PolicyDenied);
        return refuse_connect(ErrorKind::PolicyDenied);
    }
    // The stream holds an app connection: it counts against --max-connections (and so the
    // descriptor budget) like a plaintext connection, shedding an idle one at the limit.
    let gauge = &metrics.direction(Direction::Inbound).open_connections;
    let Some(guard) = shared.limits.admit(gauge, &metrics.shed_connections) else {
        metrics.rejected_connections.inc();
        metrics.count_error(Direction::Inbound, ErrorKind::TooManyConnections);
        return refuse_connect(ErrorKind::TooManyConnections);
    };
    // Opening it is a request in flight (--max-in-flight bounds concurrent app dials).
    let Some(in_flight) = shared.limits.start_request() else {
        metrics.count_error(Direction::Inbound, ErrorKind::Overloaded);
        return refuse_connect(ErrorKind::Overloaded);
    };
    let upstream = shared.settings.inbound_upstream(target.port(), local);
    let app = match connect(upstream, shared.upstreams.connect).await {
        Ok(app) => app,
        Err(e) => {
            let kind = classify_io(&e, true);
            metrics.count_error(Direction::Inbound, kind);
            tracing::info!(%peer, %upstream, "HBONE CONNECT refused: the app connection failed: {e}");
            return refuse_connect(kind);
        }
    };
    drop(in_flight);
    let upgrade = hyper::upgrade::on(&mut req);
    metrics.count_hbone_stream(Direction::Inbound, &peer);
    // The tunnel's span: a child of the peer's, ending with the stream; when sampled, the
    // parent of the requests in it that name none.
    let span = shared.telemetry.traces.as_ref().and_then(|traces| {
        let parent = traceparent
            .as_deref()
            .and_then(|tp| parse_traceparent(tp.as_bytes()));
        let facts = TunnelFacts {
            direction: Direction::Inbound,
            start,
            target,
            peer: Arc::from(peer.as_str()),
        };
        traces.tunnel_span(traces.sampler.start(parent), facts)
    });
    let tunnel_parent = span.as_ref().map(TunnelSpan::as_parent);
    let route = Route {
        client,
        dialled: target,
        upstream,
        direction: Direction::Inbound,
        peer: Some(peer),
        peer_id: Some(peer_id),
        tunnel_traceparent: traceparent,
        peer_workload,
        tunnel_parent,
    };
    tokio::spawn(async move {
        let _mark = mark;
        let _span = span;
        match upgrade.await {
            Ok(upgraded) => serve(shared, TokioIo::new(upgraded), app, route, guard).await,
            Err(e) => tracing::debug!("HBONE stream ended before it opened: {e}"),
        }
    });
    Response::new(ResponseBody::empty())
}

/// The tracing context and the original client a peer may send (ztunnel does), logged once per
/// tunnel for correlation (at debug: a line per connection on stderr would cost the data plane
/// under connection churn; the access log carries the traceparent and the peer); nothing is
/// decided on them. Returns the `traceparent` when it is well
/// formed (a malformed one is logged as such and otherwise ignored), for the access log.
fn log_tunnel_headers(headers: &HeaderMap, peer: &str, target: SocketAddr) -> Option<String> {
    let field = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let sent = field(TRACEPARENT);
    let traceparent = sent.and_then(headers::valid_traceparent);
    if let (Some(sent), None) = (sent, traceparent) {
        tracing::debug!(%peer, %target, "HBONE CONNECT: ignoring a malformed traceparent {sent:?}");
    }
    tracing::debug!(
        %peer,
        %target,
        traceparent = %traceparent.unwrap_or("-"),
        baggage = %field(BAGGAGE).unwrap_or("-"),
        forwarded = %field(FORWARDED).unwrap_or("-"),
        "HBONE CONNECT"
    );
    traceparent.map(str::to_owned)
}
