//! The HBONE server: TLS (a client certificate required, of a trust domain we have a bundle for and
//! chaining to that domain's CAs; a refusal is logged and counted with the check that failed,
//! `fault` peer), HTTP/2, and one
//! `CONNECT` per tunnelled connection. The authority must be an address of this pod (the one the
//! TLS connection arrived on: 400 otherwise, as ztunnel answers "ip mismatch"); the app is dialled
//! at the authority's port before the 200 (503 when it fails); the stream then takes the same
//! detection and HTTP or TCP path as a plaintext connection, with the peer's identity attached.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::headers::{self, BAGGAGE, FORWARDED, TRACEPARENT};
use super::{
    CONNECTION_WINDOW, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS, MAX_FRAME,
    STREAM_WINDOW,
};
use crate::error::{ErrorKind, HandshakeFailure, classify_io};
use crate::identity::SpiffeId;
use crate::identity::tls::{ALPN_H2, failure, peer_id};
use crate::proxy::Shared;
use crate::proxy::listener::serve_tunnelled;
use crate::proxy::tcp::Route;
use crate::proxy::upstream::connect;
use crate::telemetry::metrics::Direction;

/// One TLS connection from a peer: handshake, then its CONNECT streams until it closes.
pub async fn serve_connection(shared: Arc<Shared>, stream: TcpStream, client: SocketAddr) {
    let Some(mtls) = shared.mtls.as_ref() else {
        return;
    };
    let metrics = &shared.telemetry.metrics;
    let gauge = &metrics.direction(Direction::Inbound).open_connections;
    let Some(guard) = shared.limits.admit(gauge, &metrics.shed_connections) else {
        metrics.rejected_connections.inc();
        return;
    };
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let client = SocketAddr::new(client.ip().to_canonical(), client.port());
    let Some(material) = mtls.identity.material() else {
        tracing::warn!(%client, "HBONE connection refused: no valid workload identity (see /ready)");
        return;
    };
    let acceptor = TlsAcceptor::from(material.server.clone());
    let tls = match tokio::time::timeout(shared.settings.timeouts.header, acceptor.accept(stream))
        .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let (reason, detail) =
                failure(&e).unwrap_or((HandshakeFailure::Protocol, e.to_string()));
            refused(&shared, client, reason, &detail);
            return;
        }
        Err(_) => {
            tracing::info!(%client, "HBONE handshake timed out (--header-timeout)");
            return;
        }
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        // rustls already refuses a client offering other protocols; this one offered none.
        let detail = "the client offered no ALPN h2: closing the connection";
        refused(&shared, client, HandshakeFailure::NoAlpnH2, detail);
        return;
    }
    // The verifier accepted the certificate, so it has a workload ID.
    let Some(peer) = peer_id(session.peer_certificates()) else {
        return;
    };
    tracing::debug!(%client, %peer, "HBONE connection accepted");
    let peer = Arc::new(peer);

    let service = {
        let shared = shared.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let peer = peer.clone();
            async move { Ok::<_, Infallible>(open_stream(shared, req, client, local, peer).await) }
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = guard.slot().close_requested_wait() => {
            // GOAWAY: open streams finish, new ones go elsewhere.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, "HBONE connection ended: {e}");
    }
}

/// A handshake refused: logged with the check that failed and whose fault it is, and counted.
fn refused(shared: &Shared, client: SocketAddr, reason: HandshakeFailure, detail: &str) {
    let metrics = &shared.telemetry.metrics;
    metrics.count_handshake_failure(Direction::Inbound, reason);
    let kind = ErrorKind::Handshake(reason);
    metrics.count_error(Direction::Inbound, kind);
    tracing::info!(
        %client,
        error = %kind.as_str(),
        fault = %kind.fault().as_str(),
        "HBONE handshake refused: {detail}"
    );
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// One CONNECT: checks, the app connection, 200, then the stream's own task.
async fn open_stream(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    client: SocketAddr,
    local: SocketAddr,
    peer_id: Arc<SpiffeId>,
) -> Response<Empty<Bytes>> {
    let peer = peer_id.to_string();
    if req.method() != Method::CONNECT {
        return status(StatusCode::BAD_REQUEST);
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        tracing::info!(%peer, uri = %req.uri(), "HBONE CONNECT refused: the authority is not ip:port");
        return status(StatusCode::BAD_REQUEST);
    };
    let target = SocketAddr::new(target.ip().to_canonical(), target.port());
    if target.ip() != local.ip() {
        tracing::info!(%peer, %target, pod = %local.ip(), "HBONE CONNECT refused: the authority is not this pod's address");
        return status(StatusCode::BAD_REQUEST);
    }
    if target.port() == local.port() {
        // A tunnel into our own HBONE port would loop.
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let traceparent = log_tunnel_headers(req.headers(), &peer, target);
    if !shared.admits(target.port(), Some(&peer_id)) {
        return status(StatusCode::UNAUTHORIZED);
    }
    let upstream = SocketAddr::new(shared.settings.app.ip(), target.port());
    let app = match connect(upstream, shared.upstreams.connect).await {
        Ok(app) => app,
        Err(e) => {
            let kind = classify_io(&e, true);
            shared
                .telemetry
                .metrics
                .count_error(Direction::Inbound, kind);
            tracing::info!(%peer, %upstream, "HBONE CONNECT answered 503: the app connection failed: {e}");
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let upgrade = hyper::upgrade::on(&mut req);
    let metrics = &shared.telemetry.metrics;
    metrics.count_hbone_stream(Direction::Inbound, &peer);
    let guard = shared
        .limits
        .track(&metrics.direction(Direction::Inbound).open_connections);
    let route = Route {
        client,
        dialled: target,
        upstream,
        direction: Direction::Inbound,
        peer: Some(peer),
        tunnel_traceparent: traceparent,
    };
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                serve_tunnelled(shared, TokioIo::new(upgraded), app, route, guard).await;
            }
            Err(e) => tracing::debug!("HBONE stream ended before it opened: {e}"),
        }
    });
    status(StatusCode::OK)
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
