//! The HBONE client: the app's outbound connections, each carried as opaque bytes in a `CONNECT`
//! stream to `<destination ip>:15008`, over connections pooled per peer (at most
//! [`MAX_STREAMS`](crate::proxy::upstream::tunnels::MAX_STREAMS)
//! streams each), kept alive with PINGs every 10 s while idle and closed after
//! `--pool-idle-timeout` without a stream, with GOAWAY (NO_ERROR) and TLS's close_notify.
//!
//! `--outbound-mtls auto` falls back to plaintext when the TCP connection to the peer's 15008
//! fails (refused: nothing listens; or timed out, unreachable: a host outside the mesh), and
//! remembers that for [`PLAINTEXT_MEMORY`]. Once TCP is up, a failure (a certificate refused, an
//! identity not the expected one) is never a reason to send plaintext, and neither is anything for
//! a destination `--peer-identities` names: it is expected to speak HBONE. `strict` never falls
//! back: the app's connection is reset. A refused handshake is the peer's fault, logged and
//! counted with the check that refused it (`tls_<reason>`, `tls_handshake_failures_total`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use h2::Reason;
use http::{HeaderValue, Method, Request, StatusCode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::headers::{self, BAGGAGE, FORWARDED, TRACEPARENT, Workload};
use super::keep_alive;
use super::{CONNECTION_WINDOW, MAX_FRAME, MAX_HEADER_LIST, MAX_SEND_BUFFER, STREAM_WINDOW};
use crate::error::{ErrorKind, HandshakeFailure, Known, classify_io};
use crate::identity::material::Material;
use crate::identity::tls::{ALPN_H2, client_config, failure, peer_id};
use crate::proxy::shared::{Mtls, Shared};
use crate::proxy::tcp::{self, Route};
use crate::proxy::upstream::tunnel_stream::{Heard, TunnelStream};
/// Why [`Pool::open`] failed: the pool's error, which waiting callers share.
pub use crate::proxy::upstream::tunnels::OpenError;
use crate::proxy::upstream::tunnels::{
    MAX_STREAMS, PLAINTEXT_MEMORY, Pool, Pooled, Refusal, StreamSlot, Usage,
};
use crate::proxy::upstream::{self, Transport, connect};
use crate::settings::OutboundMtls;
use crate::telemetry::metrics::Direction;
use crate::telemetry::otlp::{TunnelFacts, TunnelSpan};
use crate::telemetry::trace::Sampler;
use crate::vocab::HBONE_PORT;

/// How long an idle connection's GOAWAY and close_notify may take to leave before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The TLS stream of a pooled connection, noting the first TLS failure a read meets: in TLS 1.3 a
/// server refuses our certificate after our handshake ended, on the first read, and HTTP/2 keeps
/// only the text of the I/O errors it passes on (`connection error`).
struct Watched {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    refusal: Arc<Refusal>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.tls).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &polled
            && let Some(found) = failure(e)
        {
            let _ = self.refusal.seen.set(found);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }
}

/// An open tunnel: the byte stream, the server's identity, the `traceparent` sent to it and the
/// stream's place in the pool.
pub struct Tunnel {
    pub io: TunnelStream,
    pub peer: Arc<str>,
    pub traceparent: String,
    pub slot: StreamSlot,
    /// The tunnel's span, when tracing is on and sampled it: it ends when this is dropped.
    pub span: Option<TunnelSpan>,
}

/// The pool's state is [`crate::proxy::upstream::tunnels`]'; dialling and opening streams are
/// HBONE's.
impl Pool {
    /// Opens a stream to `target` through `peer` (`target`'s HBONE address), on a pooled
    /// connection or a new one. Every wait is bounded by --connect-timeout: the TCP connection and
    /// the TLS handshake of a dial, and the peer's answer to CONNECT, so that a peer that takes
    /// the handshake and never answers (or never lets a stream open) holds nothing past it.
    pub async fn open(
        &self,
        shared: &Shared,
        mtls: &Mtls,
        peer: SocketAddr,
        target: SocketAddr,
        client: Option<SocketAddr>,
    ) -> Result<Tunnel, OpenError> {
        let failed = |kind, reason: String| OpenError::Failed { peer, kind, reason };
        let start = SystemTime::now();
        // Each tunnel starts a trace of its own (it may carry many requests).
        let traces = shared.telemetry.traces.as_ref();
        let ids = traces.map_or(Sampler::NEVER, |t| t.sampler).start(None);
        let traceparent = ids.traceparent_string();
        // A second try, on a new connection, only for a stream the peer never processed: its
        // connection was going away (GOAWAY) or it refused the stream.
        let mut retried = false;
        let (pooled, slot, response, send) = loop {
            let (pooled, slot) = self
                .checkout_or_dial(peer, || dial(shared, mtls, peer))
                .await?;
            let mut request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header(TRACEPARENT, &traceparent)
                .header(BAGGAGE, pooled.baggage.clone());
            // A tunnel hyper pools for many of the app's connections names none of them.
            if let Some(client) = client {
                request = request.header(FORWARDED, headers::forwarded(client));
            }
            let request = request
                .body(())
                .map_err(|e| failed(ErrorKind::ConnectFailed, e.to_string()))?;
            // h2 opens the stream when the peer's stream limit has room, on the connection's
            // task; then the peer's answer.
            let sender = pooled.sender.clone();
            let answered = async move {
                let mut sender = sender.ready().await?;
                let (response, send) = sender.send_request(request, false)?;
                Ok::<_, h2::Error>((response.await?, send))
            };
            let timeout = shared.upstreams.connect.timeout;
            let e = match tokio::time::timeout(timeout, answered).await {
                Ok(Ok((response, send))) => break (pooled, slot, response, send),
                Ok(Err(e)) => e,
                Err(_) => {
                    let reason =
                        format!("no answer to CONNECT within --connect-timeout ({timeout:?})");
                    return Err(failed(ErrorKind::ConnectTimeout, reason));
                }
            };
            let unprocessed = e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM);
            if unprocessed || e.is_io() {
                // No new stream goes on it (hyper's pool forgot such a connection too).
                pooled.usage.close();
            }
            if unprocessed && !retried {
                retried = true;
                tracing::debug!(%peer, "HBONE stream not taken ({e}): once more, on another connection");
                continue;
            }
            let Some((reason, detail)) = pooled.refusal.seen.get() else {
                return Err(failed(ErrorKind::ConnectFailed, e.to_string()));
            };
            if !pooled.refusal.counted.swap(true, Ordering::AcqRel) {
                let metrics = &shared.telemetry.metrics;
                metrics.count_handshake_failure(Direction::Outbound, *reason);
            }
            return Err(failed(
                ErrorKind::Handshake(*reason),
                format!("TLS: {detail}"),
            ));
        };
        if response.status() != StatusCode::OK {
            // The peer's refusal, in the statuses of `ErrorKind::status` (as every proxy answer).
            let kind = match response.status() {
                StatusCode::FORBIDDEN => ErrorKind::PolicyDenied,
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE => {
                    ErrorKind::ConnectRefused
                }
                StatusCode::GATEWAY_TIMEOUT => ErrorKind::ConnectTimeout,
                _ => ErrorKind::ConnectFailed,
            };
            return Err(failed(
                kind,
                format!(
                    "the peer answered {} to CONNECT {target}",
                    response.status()
                ),
            ));
        }
        let io = TunnelStream::new(send, response.into_body());
        let span = traces.and_then(|traces| {
            let facts = TunnelFacts {
                direction: Direction::Outbound,
                start,
                target,
                peer: pooled.peer.clone(),
            };
            traces.tunnel_span(ids, facts)
        });
        Ok(Tunnel {
            io,
            peer: pooled.peer.clone(),
            traceparent,
            slot,
            span,
        })
    }
}

/// A new HBONE connection: TCP (marked, so that `init`'s rules let it out), TLS, HTTP/2.
async fn dial(shared: &Shared, mtls: &Mtls, peer: SocketAddr) -> Result<Pooled, OpenError> {
    let failed = |kind, reason: String| OpenError::Failed { peer, kind, reason };
    let material = mtls.identity.material().ok_or_else(|| {
        failed(
            ErrorKind::ConnectFailed,
            "no valid workload identity (see /ready)".into(),
        )
    })?;
    let options = shared.upstreams.connect;
    let tcp = connect(peer, options)
        .await
        .map_err(|e| OpenError::NoHbone {
            peer,
            kind: classify_io(&e, true),
            reason: e.to_string(),
        })?;
    let (tls, peer_identity) = handshake(shared, mtls, &material, peer, tcp).await?;
    let workload = Workload::new(
        &material.id.namespace,
        mtls.pod_name.clone(),
        mtls.pod_namespace.clone(),
    )
    .with_workload(mtls.workload_name.clone());
    // Percent-encoded into visible ASCII, so always a valid header value.
    let baggage = HeaderValue::try_from(workload.baggage())
        .map_err(|e| failed(ErrorKind::ConnectFailed, format!("baggage: {e}")))?;
    let refusal = Arc::new(Refusal::default());
    let watched = Watched {
        tls,
        refusal: refusal.clone(),
    };
    let (watched, heard) = Heard::new(watched);
    let (sender, mut conn) = tunnel_client()
        .handshake::<_, Bytes>(watched)
        .await
        .map_err(|e| failed(ErrorKind::ConnectFailed, format!("HTTP/2: {e}")))?;
    let usage = Arc::new(Usage::with_first_stream());
    let idle_timeout = mtls.idle_timeout;
    let ping_pong = conn.ping_pong();
    tokio::spawn({
        let usage = usage.clone();
        let pool = mtls.pool.clone();
        async move {
            tokio::select! {
                result = &mut conn => if let Err(e) = result {
                    tracing::debug!(%peer, "HBONE connection ended: {e}");
                },
                () = pool.idle_out(peer, &usage, idle_timeout) => {
                    tracing::debug!(%peer, "HBONE connection idle for {idle_timeout:?}: closing it");
                    // Out of the pool, with no stream and no handle left: `h2` sends GOAWAY
                    // (NO_ERROR) and TLS its close_notify, so the peer knows nothing was cut.
                    // Bounded: a peer that reads nothing more holds it no longer.
                    if tokio::time::timeout(CLOSE_GRACE, conn).await.is_err() {
                        tracing::debug!(%peer, "HBONE connection's peer took no GOAWAY within {CLOSE_GRACE:?}");
                    }
                }
                () = keep_alive(ping_pong, heard) => {
                    tracing::debug!(%peer, "HBONE connection's peer stopped answering PINGs: closing it");
                }
            }
            usage.close();
        }
    });
    Ok(Pooled {
        sender,
        peer: peer_identity,
        baggage,
        usage,
        refusal,
    })
}

/// The HTTP/2 client of HBONE connections: ztunnel's stream and window sizes, the server's bounds
/// on what the peer may make it hold, and no server push (a peer's pushed streams would hold
/// memory and connection window that no tunnel reads; hyper's client refused push too).
fn tunnel_client() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .enable_push(false)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .initial_max_send_streams(MAX_STREAMS);
    builder
}

/// Our side of the TLS handshake with `peer` over `tcp`: the stream and the server's SPIFFE ID. A
/// refusal is counted, with the check that refused it.
async fn handshake(
    shared: &Shared,
    mtls: &Mtls,
    material: &Material,
    peer: SocketAddr,
    tcp: TcpStream,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Arc<str>), OpenError> {
    let failed = |kind, reason: String| OpenError::Failed { peer, kind, reason };
    let expected = mtls.peers.expected(peer.ip()).cloned();
    let config = client_config(material.key.clone(), material.bundles.clone(), expected)
        .map_err(|e| failed(ErrorKind::ConnectFailed, e.to_string()))?;
    let refused = |reason, detail: String| {
        shared
            .telemetry
            .metrics
            .count_handshake_failure(Direction::Outbound, reason);
        failed(ErrorKind::Handshake(reason), format!("TLS: {detail}"))
    };
    // No SNI is sent (the configuration says so); the name only satisfies the API.
    let name = ServerName::IpAddress(peer.ip().into());
    let connecting = TlsConnector::from(config).connect(name, tcp);
    let tls = match tokio::time::timeout(shared.upstreams.connect.timeout, connecting).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let (reason, detail) =
                failure(&e).unwrap_or((HandshakeFailure::Protocol, e.to_string()));
            return Err(refused(reason, detail));
        }
        Err(_) => {
            return Err(failed(
                ErrorKind::ConnectTimeout,
                "the TLS handshake took longer than --connect-timeout".into(),
            ));
        }
    };
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(ALPN_H2) {
        return Err(refused(
            HandshakeFailure::NoAlpnH2,
            "the peer did not agree on ALPN h2".into(),
        ));
    }
    let peer_identity: Arc<str> = peer_id(session.peer_certificates())
        .map(|id| id.to_string())
        .unwrap_or_default()
        .into();
    Ok((tls, peer_identity))
}

/// Carries an outbound connection to `target` in HBONE. Returns the connection when it should go
/// in plaintext instead (`auto`, nothing listening on the peer's HBONE port).
pub(crate) async fn forward(
    shared: &Shared,
    mtls: &Mtls,
    mut client: TcpStream,
    client_addr: SocketAddr,
    target: SocketAddr,
) -> Option<TcpStream> {
    let auto = mtls.outbound == OutboundMtls::Auto;
    if auto && mtls.pool.remembers_plaintext(target.ip()) {
        return Some(client);
    }
    let peer = SocketAddr::new(target.ip(), HBONE_PORT);
    let start = Instant::now();
    let mut route = Route {
        client: client_addr,
        dialled: target,
        upstream: target,
        direction: Direction::Outbound,
        peer: None,
        peer_id: None,
        tunnel_traceparent: None,
        peer_workload: None,
        tunnel_parent: None,
    };
    match mtls
        .pool
        .open(shared, mtls, peer, target, Some(client_addr))
        .await
    {
        Ok(mut tunnel) => {
            let metrics = &shared.telemetry.metrics;
            metrics.count_hbone_stream(Direction::Outbound, &tunnel.peer);
            route.peer = Some(tunnel.peer.to_string());
            route.tunnel_traceparent = Some(std::mem::take(&mut tunnel.traceparent));
            tcp::forward_streams(shared, &mut client, &mut tunnel.io, route).await;
            None
        }
        Err(e @ OpenError::NoHbone { .. })
            if auto && mtls.peers.expected(target.ip()).is_none() =>
        {
            tracing::debug!(%target, "{e}: plaintext for {PLAINTEXT_MEMORY:?}");
            mtls.pool.remember_plaintext(target.ip());
            Some(client)
        }
        Err(e) => {
            let kind = e.kind();
            tracing::info!(
                %client_addr,
                %target,
                error = %kind.as_str(),
                fault = %kind.fault().as_str(),
                "outbound connection reset: {e}"
            );
            // A reset, not a clean close: the app must not take the silence for an answer.
            let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
            tcp::finish(shared, &route, start, Err(kind), 0, 0);
            None
        }
    }
}

/// HBONE per request, for hyper's clients: each request to a route's endpoint (and each to the
/// original destination of an outbound connection served as HTTP) goes in a stream to that
/// address's proxy, with `--outbound-mtls` deciding as for whole connections: `auto` sends
/// plaintext where nothing listens on the HBONE port (and nothing in `--peer-identities` expects
/// it to), `strict` never does.
pub(crate) struct HboneTunneller {
    /// Weak: the shared state holds the clients that hold this.
    shared: Weak<Shared>,
}

impl HboneTunneller {
    pub(crate) fn new(shared: Weak<Shared>) -> HboneTunneller {
        HboneTunneller { shared }
    }
}

impl upstream::Tunneller for HboneTunneller {
    fn open(
        &self,
        target: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Transport>> + Send>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let shared = shared
                .upgrade()
                .ok_or_else(|| std::io::Error::other("the proxy is stopping"))?;
            let options = shared.upstreams.connect;
            let Some(mtls) = shared
                .mtls
                .as_ref()
                .filter(|m| m.outbound != OutboundMtls::Off)
            else {
                return connect(target, options).await.map(Transport::Tcp);
            };
            let auto = mtls.outbound == OutboundMtls::Auto;
            if auto && mtls.pool.remembers_plaintext(target.ip()) {
                return connect(target, options).await.map(Transport::Tcp);
            }
            let peer = SocketAddr::new(target.ip(), HBONE_PORT);
            // Within --connect-timeout (`open`'s bound).
            match mtls.pool.open(&shared, mtls, peer, target, None).await {
                Ok(tunnel) => {
                    let metrics = &shared.telemetry.metrics;
                    metrics.count_hbone_stream(Direction::Outbound, &tunnel.peer);
                    Ok(Transport::Tunnel {
                        io: tunnel.io,
                        peer: tunnel.peer,
                        slot: tunnel.slot,
                        span: tunnel.span,
                    })
                }
                Err(e @ OpenError::NoHbone { .. })
                    if auto && mtls.peers.expected(target.ip()).is_none() =>
                {
                    tracing::debug!(%target, "{e}: plaintext for {PLAINTEXT_MEMORY:?}");
                    mtls.pool.remember_plaintext(target.ip());
                    connect(target, options).await.map(Transport::Tcp)
                }
                Err(e) => Err(Known::io(e.kind(), e.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer may not push streams into our tunnels' connections: we say so in our SETTINGS,
    /// and h2 refuses the server's PUSH_PROMISE.
    #[tokio::test]
    async fn the_client_refuses_server_push() {
        let wait = Duration::from_secs(10);
        let (near, far) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(far).await.expect("server handshake");
            let (_request, mut respond) =
                conn.accept().await.expect("a stream").expect("a CONNECT");
            let promise = Request::get("http://198.18.0.2/pushed")
                .body(())
                .expect("request");
            let pushed = respond.push_request(promise);
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            pushed.is_ok()
        });
        let (sender, conn) = tunnel_client()
            .handshake::<_, Bytes>(near)
            .await
            .expect("client handshake");
        tokio::spawn(conn);
        let mut sender = sender.ready().await.expect("ready");
        let request = Request::connect("198.18.0.2:80").body(()).expect("request");
        let _stream = sender.send_request(request, false).expect("CONNECT");
        let pushed = tokio::time::timeout(wait, server)
            .await
            .expect("the server answers")
            .expect("the server task");
        assert!(!pushed, "a push promise is refused");
    }
}
