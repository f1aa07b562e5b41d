//! The HBONE server: TLS (a client certificate required, of a trust domain we have a bundle for and
//! chaining to that domain's CAs; a refusal is logged and counted with the check that failed,
//! `fault` peer), HTTP/2, and one
//! `CONNECT` per tunnelled connection. The authority must be an address of this pod (the one the
//! TLS connection arrived on: 400 otherwise, as ztunnel answers "ip mismatch"); the app is dialled
//! at the authority's port before the 200 (503 when it fails); the stream then takes the same
//! detection and HTTP or TCP path as a plaintext connection, with the peer's identity attached.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Request, Response};

use crate::proxy::phases::Synthetic;
use crate::telemetry::istio::PeerWorkload;
use std::time::SystemTime;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::headers::{self, BAGGAGE, FORWARDED, TRACEPARENT};
use super::keep_alive;
use super::{
    CONNECTION_WINDOW, MAX_CONCURRENT_STREAMS, MAX_FRAME, MAX_HEADER_LIST, MAX_LOCAL_ERROR_RESETS,
    MAX_SEND_BUFFER, STREAM_WINDOW,
};
use crate::error::{ErrorKind, HandshakeFailure, classify_io};
use crate::identity::SpiffeId;
use crate::identity::tls::{ALPN_H2, failure, peer_id};
use crate::proxy::limits::{Activity, ConnectionGuard, OpenRequests, RequestMark};
use crate::proxy::shared::Shared;
use crate::proxy::tcp::Route;
use crate::proxy::upstream::connect;
use crate::proxy::upstream::tunnel_stream::{Heard, TunnelStream};
use crate::telemetry::metrics::Direction;
use crate::telemetry::otlp::{TunnelFacts, TunnelSpan};
use crate::telemetry::trace::parse_traceparent;

/// The longest a TLS handshake may take (or --header-timeout when shorter): a peer that connects
/// and says nothing holds a descriptor, and is shed meanwhile when room is needed.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The bytes of one tunnelled connection: a CONNECT stream.
pub(crate) type Stream = TunnelStream;

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
        mut conn,
        heard,
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
    let idle = shared.settings.traffic.timeouts.idle;
    let mut keep_alive = std::pin::pin!(keep_alive(conn.ping_pong(), heard));
    let mut shed = std::pin::pin!(slot.shed_wait());
    let mut close_requested = std::pin::pin!(slot.close_requested_wait());
    let mut idle_out = std::pin::pin!(open.idle_for(idle));
    // Closing is graceful (GOAWAY: open streams finish, new ones go elsewhere) unless the shedder
    // takes the connection meanwhile: a peer that ignores the GOAWAY must not hold a slot the
    // shedder counted as freed. h2 sends its last GOAWAY only once its PING is answered, so a
    // closing connection with no stream open for --header-timeout (the time a peer has to
    // answer a keep-alive PING on the plaintext side) is dropped: a peer that never answers,
    // and keeps the keep-alive quiet with frames of its own, holds it no longer.
    let mut closing = false;
    let grace = shared.settings.traffic.timeouts.header;
    let mut closed_out = std::pin::pin!(open.idle_for(grace));
    // The streams whose tasks run: at most as many as a peer may have open. h2 forgets a stream
    // its peer resets at once, so HEADERS then RST_STREAM in a loop would otherwise start tasks
    // (each an app dial and a --max-connections slot) without bound.
    let running = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_STREAMS as usize));
    loop {
        tokio::select! {
            biased;
            // Chosen by the shedder: no stream was open, so nothing is cut.
            () = &mut shed => return,
            accepted = conn.accept() => match accepted {
                Some(Ok((request, mut respond))) => {
                    let Ok(permit) = running.clone().try_acquire_owned() else {
                        tracing::debug!(%client, "HBONE stream refused: {MAX_CONCURRENT_STREAMS} still running");
                        respond.send_reset(Reason::REFUSED_STREAM);
                        continue;
                    };
                    let mark = open.start();
                    let stream = open_stream(
                        shared.clone(), request, respond, client, local, peer.clone(), mark, serve,
                    );
                    tokio::spawn(async move {
                        let _permit = permit;
                        stream.await;
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%client, "HBONE connection ended: {e}");
                    return;
                }
                None => return,
            },
            () = &mut close_requested, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut idle_out, if !closing => {
                tracing::debug!(%client, "HBONE connection without a stream for --idle-timeout: closing");
                closing = true;
                conn.graceful_shutdown();
            }
            () = &mut keep_alive => return,
            () = &mut closed_out, if closing => {
                tracing::debug!(%client, "HBONE connection without a stream for --header-timeout after its GOAWAY: dropping it");
                return;
            }
        }
    }
}

/// A peer's HTTP/2 connection, past the TLS handshake, the identity checks and the HTTP/2
/// preface. Boxed: the connection's state (TLS included) is kilobytes, and it would otherwise
/// sit beside the handshake's in every idle connection's task.
type TunnelConnection = Box<h2::server::Connection<Heard<TlsStream<TcpStream>>, Bytes>>;

/// A peer's connection, accepted.
struct Accepted {
    conn: TunnelConnection,
    /// Whether the peer was heard from since last looked at (the keep-alive's question).
    heard: Arc<AtomicBool>,
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
    // The client's preface and SETTINGS, bounded as a connection without a stream is.
    let idle = shared.settings.traffic.timeouts.idle;
    let (tls, heard) = Heard::new(tls);
    let handshake = tokio::time::timeout(idle, tunnel_server().handshake::<_, Bytes>(tls));
    let conn = match slot.unless_shed(handshake).await? {
        Ok(Ok(conn)) => Box::new(conn),
        Ok(Err(e)) => {
            tracing::debug!(%client, %peer, "HBONE connection ended before its first frame: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(%client, %peer, "HBONE connection sent no HTTP/2 preface within --idle-timeout: closing");
            return None;
        }
    };
    tracing::debug!(%client, %peer, "HBONE connection accepted");
    Some(Accepted {
        conn,
        heard,
        guard,
        local,
        client,
        peer: Arc::new(peer),
    })
}

/// The HTTP/2 server of HBONE connections: ztunnel's stream and window sizes, and hyper's bounds
/// on what a peer may make it hold (a 16 KiB header list, 400 KiB buffered per stream, 1,024
/// streams reset for its errors before the connection is closed).
fn tunnel_server() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
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

/// A `CONNECT` refused: the same status, fields and body as every refusal of the proxy's
/// ([`Synthetic`] decides them), then the end of the stream.
fn refuse_connect(respond: &mut SendResponse<Bytes>, kind: ErrorKind) {
    let synthetic = Synthetic::new(kind, false);
    let body = synthetic.body();
    let mut response = Response::new(());
    *response.status_mut() = synthetic.status();
    *response.headers_mut() = synthetic.header_map();
    let sent = respond
        .send_response(response, body.is_empty())
        .and_then(|mut send| match body.is_empty() {
            true => Ok(()),
            false => send.send_data(Bytes::from_static(body.as_bytes()), true),
        });
    if let Err(e) = sent {
        tracing::debug!("HBONE CONNECT refusal not sent: {e}");
    }
}

/// One CONNECT, in a task of its own: the checks and the app connection, then 200 and the
/// stream's life as a tunnel, or the refusal. The stream keeps `mark` (its connection busy) for
/// its whole life.
#[allow(clippy::too_many_arguments)]
async fn open_stream<S, F>(
    shared: Arc<Shared>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    client: SocketAddr,
    local: SocketAddr,
    peer_id: Arc<SpiffeId>,
    mark: RequestMark,
    serve: S,
) where
    S: Fn(Arc<Shared>, Stream, TcpStream, Route, ConnectionGuard) -> F,
    F: Future<Output = ()>,
{
    let (head, recv) = request.into_parts();
    // A peer that resets the stream meanwhile takes its dial back, as hyper dropped the handler.
    let opening = Box::pin(open_app(&shared, &head, client, local, peer_id));
    let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
    let opened = tokio::select! {
        opened = opening => opened,
        _ = reset => return tracing::debug!(%client, "HBONE stream reset by the peer before it opened"),
    };
    let opened = match opened {
        Ok(opened) => opened,
        Err(kind) => return refuse_connect(&mut respond, kind),
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => return tracing::debug!("HBONE stream ended before it opened: {e}"),
    };
    let OpenedApp {
        app,
        route,
        guard,
        span,
    } = opened;
    let _mark = mark;
    let _span = span;
    serve(shared, TunnelStream::new(send, recv), app, route, guard).await;
}

/// What a CONNECT that passed its checks holds: the app connection, the route its records carry,
/// its place under --max-connections, and the tunnel's span.
struct OpenedApp {
    app: TcpStream,
    route: Route,
    guard: ConnectionGuard,
    span: Option<TunnelSpan>,
}

/// A CONNECT's checks (the authority is this pod's address and not a port of the proxy's, the
/// policy admits the peer, the limits have room) and its app connection; the refusal otherwise.
async fn open_app(
    shared: &Shared,
    req: &http::request::Parts,
    client: SocketAddr,
    local: SocketAddr,
    peer_id: Arc<SpiffeId>,
) -> Result<OpenedApp, ErrorKind> {
    let peer = peer_id.to_string();
    if req.method != Method::CONNECT {
        return Err(ErrorKind::BadRequest);
    }
    let Some(target) = req
        .uri
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        tracing::info!(%peer, uri = %req.uri, "HBONE CONNECT refused: the authority is not ip:port");
        return Err(ErrorKind::BadRequest);
    };
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    if target.ip() != local.ip() {
        tracing::info!(%peer, %target, pod = %local.ip(), "HBONE CONNECT refused: the authority is not this pod's address");
        return Err(ErrorKind::BadRequest);
    }
    let metrics = &shared.telemetry.metrics;
    if target.port() == local.port() || shared.settings.traffic.own_ports.contains(&target.port()) {
        // The admin port, or a listener of ours (a loop): never for a peer, as ztunnel answers.
        // Debug: a peer could fill the log with these; the metric counts them.
        tracing::debug!(%peer, %target, "HBONE CONNECT refused: the port is one of the proxy's own");
        metrics.count_error(Direction::Inbound, ErrorKind::ProxyPort);
        return Err(ErrorKind::ProxyPort);
    }
    let start = SystemTime::now();
    let traceparent = log_tunnel_headers(&req.headers, &peer, target);
    // Only read when Istio's metrics are exported: it names the peer's workload there.
    let peer_workload = shared.telemetry.istio().and_then(|_| {
        let baggage = req.headers.get(BAGGAGE)?.to_str().ok()?;
        Some(Arc::new(PeerWorkload::from_baggage(baggage)))
    });
    if !shared.admits(target.port(), Some(&peer_id)) {
        metrics.count_error(Direction::Inbound, ErrorKind::PolicyDenied);
        return Err(ErrorKind::PolicyDenied);
    }
    // The stream holds an app connection: it counts against --max-connections (and so the
    // descriptor budget) like a plaintext connection, shedding an idle one at the limit.
    let gauge = &metrics.direction(Direction::Inbound).open_connections;
    let Some(guard) = shared.limits.admit(gauge, &metrics.shed_connections) else {
        metrics.rejected_connections.inc();
        metrics.count_error(Direction::Inbound, ErrorKind::TooManyConnections);
        return Err(ErrorKind::TooManyConnections);
    };
    // Opening it is a request in flight (--max-in-flight bounds concurrent app dials).
    let Some(in_flight) = shared.limits.start_request() else {
        metrics.count_error(Direction::Inbound, ErrorKind::Overloaded);
        return Err(ErrorKind::Overloaded);
    };
    let upstream = shared.settings.inbound_upstream(target.port(), local);
    let app = match connect(upstream, shared.upstreams.connect).await {
        Ok(app) => app,
        Err(e) => {
            let kind = classify_io(&e, true);
            metrics.count_error(Direction::Inbound, kind);
            tracing::info!(%peer, %upstream, "HBONE CONNECT refused: the app connection failed: {e}");
            return Err(kind);
        }
    };
    drop(in_flight);
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
    Ok(OpenedApp {
        app,
        route,
        guard,
        span,
    })
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
