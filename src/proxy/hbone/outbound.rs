//! The HBONE client: the app's outbound connections, each carried as opaque bytes in a `CONNECT`
//! stream to `<destination ip>:15008`, over connections pooled per peer (at most [`MAX_STREAMS`]
//! streams each), kept alive with PINGs every 10 s while idle and closed after
//! `--pool-idle-timeout` without a stream.
//!
//! `--outbound-mtls auto` falls back to plaintext when the TCP connection to the peer's 15008
//! fails (refused: nothing listens; or timed out, unreachable: a host outside the mesh), and
//! remembers that for [`PLAINTEXT_MEMORY`]. Once TCP is up, a failure (a certificate refused, an
//! identity not the expected one) is never a reason to send plaintext, and neither is anything for
//! a destination `--peer-identities` names: it is expected to speak HBONE. `strict` never falls
//! back: the app's connection is reset. A refused handshake is the peer's fault, logged and
//! counted with the check that refused it (`tls_<reason>`, `tls_handshake_failures_total`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::headers::{self, BAGGAGE, FORWARDED, TRACEPARENT, Workload};
use super::{
    CONNECTION_WINDOW, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, MAX_FRAME, Mtls, STREAM_WINDOW,
};
use crate::error::{ErrorKind, HandshakeFailure, classify_io};
use crate::identity::material::Material;
use crate::identity::tls::{ALPN_H2, client_config, failure, peer_id};
use crate::proxy::Shared;
use crate::proxy::tcp::{self, Route};
use crate::proxy::upstream::connect;
use crate::settings::OutboundMtls;
use crate::sync::lock;
use crate::telemetry::metrics::Direction;
use crate::vocab::HBONE_PORT;

/// Streams opened on one pooled connection at most, as ztunnel's client does.
pub const MAX_STREAMS: usize = 100;
/// How long a destination with nothing on 15008 is sent plaintext without trying HBONE again.
pub const PLAINTEXT_MEMORY: Duration = Duration::from_secs(60);

/// One pooled HBONE connection.
#[derive(Clone)]
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    /// The server's SPIFFE ID, verified by the handshake.
    peer: Arc<str>,
    /// Our `baggage`, from the identity this connection presented.
    baggage: HeaderValue,
    usage: Arc<Usage>,
    /// Why the server refused us, if it did (see [`Watched`]).
    refusal: Arc<Refusal>,
}

/// A refusal the server sent after our side of the handshake, noted by [`Watched`].
#[derive(Default)]
struct Refusal {
    seen: OnceLock<(HandshakeFailure, String)>,
    /// Whether a stream already counted it: one refused connection, one count.
    counted: AtomicBool,
}

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

/// Streams open on a connection, and when the last one ended (ms since `epoch`).
struct Usage {
    streams: AtomicUsize,
    epoch: Instant,
    idle_since_ms: AtomicU64,
}

impl Usage {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Holds one stream's place on its connection.
pub struct StreamSlot(Arc<Usage>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open tunnel: the byte stream, the server's identity, the `traceparent` sent to it and the
/// stream's place in the pool.
pub struct Tunnel {
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    pub peer: Arc<str>,
    pub traceparent: String,
    pub slot: StreamSlot,
}

/// Why a tunnel could not be opened.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OpenError {
    /// No TCP connection to the peer's HBONE port: `auto` may send plaintext.
    #[error("no HBONE at {peer}: {reason}")]
    NoHbone {
        peer: SocketAddr,
        kind: ErrorKind,
        reason: String,
    },
    #[error("HBONE to {peer}: {reason}")]
    Failed {
        peer: SocketAddr,
        kind: ErrorKind,
        reason: String,
    },
}

impl OpenError {
    fn kind(&self) -> ErrorKind {
        match self {
            OpenError::NoHbone { kind, .. } | OpenError::Failed { kind, .. } => *kind,
        }
    }
}

#[derive(Default)]
pub struct Pool {
    connections: Mutex<HashMap<SocketAddr, Vec<Pooled>>>,
    /// One dial at a time per peer: a burst of new connections to a peer waits for one handshake
    /// instead of each making its own (50 connections at once made up to 50 TLS connections, and
    /// the extra ones cost both sides memory and CPU for as long as they stayed pooled). Holds the
    /// last dial's failure, which those who waited for it share rather than dialling again.
    dials: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<DialFailure>>>>>,
    plaintext_until: Mutex<HashMap<IpAddr, Instant>>,
}

/// A dial that failed, and when: callers that were waiting before then take it as their own.
struct DialFailure {
    at: Instant,
    error: OpenError,
}

/// A caller's hold on its peer's dial gate. The map keeps a gate only while someone holds it (one
/// entry per peer being dialled, not one per destination ever seen): whoever leaves it with no
/// other holder removes it, also when cancelled mid-dial. Checked after the caller's own clone is
/// gone, so that two callers leaving at once cannot each count the other.
struct GateHold<'a> {
    dials: &'a Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<DialFailure>>>>>,
    peer: SocketAddr,
}

impl Drop for GateHold<'_> {
    fn drop(&mut self) {
        let mut dials = lock(self.dials);
        if dials
            .get(&self.peer)
            .is_some_and(|gate| Arc::strong_count(gate) == 1)
        {
            dials.remove(&self.peer);
        }
    }
}

impl Pool {
    fn remembers_plaintext(&self, ip: IpAddr) -> bool {
        let mut map = lock(&self.plaintext_until);
        let now = Instant::now();
        map.retain(|_, until| *until > now);
        map.contains_key(&ip)
    }

    fn remember_plaintext(&self, ip: IpAddr) {
        lock(&self.plaintext_until).insert(ip, Instant::now() + PLAINTEXT_MEMORY);
    }

    /// A pooled connection to `peer` with room for one more stream, its place taken.
    fn checkout(&self, peer: SocketAddr) -> Option<(Pooled, StreamSlot)> {
        let mut map = lock(&self.connections);
        let list = map.get_mut(&peer)?;
        list.retain(|p| !p.sender.is_closed());
        let found = list
            .iter()
            .find(|p| p.usage.streams.load(Ordering::Acquire) < MAX_STREAMS)?
            .clone();
        found.usage.streams.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(found.usage.clone());
        Some((found, slot))
    }

    /// A pooled connection to `peer` with room for a stream, or a new one: dialled by this caller,
    /// or by the one ahead of it in the peer's queue (then its connection or its failure is used).
    async fn checkout_or_dial(
        &self,
        shared: &Shared,
        mtls: &Mtls,
        peer: SocketAddr,
    ) -> Result<(Pooled, StreamSlot), OpenError> {
        if let Some(found) = self.checkout(peer) {
            return Ok(found);
        }
        let queued = Instant::now();
        // Declared before the gate, so dropped after it.
        let _hold = GateHold {
            dials: &self.dials,
            peer,
        };
        let gate = lock(&self.dials).entry(peer).or_default().clone();
        let mut last_failure = gate.lock().await;
        match (self.checkout(peer), &*last_failure) {
            (Some(found), _) => Ok(found),
            (None, Some(failure)) if failure.at >= queued => Err(failure.error.clone()),
            (None, _) => match dial(shared, mtls, peer).await {
                Ok(pooled) => {
                    *last_failure = None;
                    pooled.usage.streams.fetch_add(1, Ordering::AcqRel);
                    let slot = StreamSlot(pooled.usage.clone());
                    lock(&self.connections)
                        .entry(peer)
                        .or_default()
                        .push(pooled.clone());
                    Ok((pooled, slot))
                }
                Err(error) => {
                    *last_failure = Some(DialFailure {
                        at: Instant::now(),
                        error: error.clone(),
                    });
                    Err(error)
                }
            },
        }
    }

    /// Opens a stream to `target` through `peer` (`target`'s HBONE address), on a pooled
    /// connection or a new one.
    pub async fn open(
        &self,
        shared: &Shared,
        mtls: &Mtls,
        peer: SocketAddr,
        target: SocketAddr,
        client: SocketAddr,
    ) -> Result<Tunnel, OpenError> {
        let (mut pooled, slot) = self.checkout_or_dial(shared, mtls, peer).await?;
        let failed = |kind, reason: String| OpenError::Failed { peer, kind, reason };
        let traceparent = headers::new_traceparent();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header(TRACEPARENT, &traceparent)
            .header(BAGGAGE, pooled.baggage.clone())
            .header(FORWARDED, headers::forwarded(client))
            .body(Empty::new())
            .map_err(|e| failed(ErrorKind::ConnectFailed, e.to_string()))?;
        let response = pooled.sender.send_request(request).await.map_err(|e| {
            let Some((reason, detail)) = pooled.refusal.seen.get() else {
                return failed(ErrorKind::ConnectFailed, e.to_string());
            };
            if !pooled.refusal.counted.swap(true, Ordering::AcqRel) {
                let metrics = &shared.telemetry.metrics;
                metrics.count_handshake_failure(Direction::Outbound, *reason);
            }
            failed(ErrorKind::Handshake(*reason), format!("TLS: {detail}"))
        })?;
        if response.status() != StatusCode::OK {
            let kind = if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                ErrorKind::ConnectRefused
            } else {
                ErrorKind::ConnectFailed
            };
            return Err(failed(
                kind,
                format!(
                    "the peer answered {} to CONNECT {target}",
                    response.status()
                ),
            ));
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| failed(ErrorKind::ConnectFailed, e.to_string()))?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            peer: pooled.peer.clone(),
            traceparent,
            slot,
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
    );
    // Percent-encoded into visible ASCII, so always a valid header value.
    let baggage = HeaderValue::try_from(workload.baggage())
        .map_err(|e| failed(ErrorKind::ConnectFailed, format!("baggage: {e}")))?;
    let refusal = Arc::new(Refusal::default());
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(Watched {
            tls,
            refusal: refusal.clone(),
        }))
        .await
        .map_err(|e| failed(ErrorKind::ConnectFailed, format!("HTTP/2: {e}")))?;
    let usage = Arc::new(Usage {
        streams: AtomicUsize::new(0),
        epoch: Instant::now(),
        idle_since_ms: AtomicU64::new(0),
    });
    let idle_timeout = mtls.idle_timeout;
    tokio::spawn({
        let usage = usage.clone();
        async move {
            tokio::select! {
                result = conn => if let Err(e) = result {
                    tracing::debug!(%peer, "HBONE connection ended: {e}");
                },
                () = idle_out(&usage, idle_timeout) => {
                    tracing::debug!(%peer, "HBONE connection idle for {idle_timeout:?}: closing it");
                }
            }
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

/// Resolves once the connection has had no stream for `idle_timeout`.
async fn idle_out(usage: &Usage, idle_timeout: Duration) {
    let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
    loop {
        tokio::time::sleep(idle_timeout).await;
        let since = usage.idle_since_ms.load(Ordering::Acquire);
        if usage.streams.load(Ordering::Acquire) == 0
            && usage.now_ms().saturating_sub(since) >= idle_ms
        {
            return;
        }
    }
}

/// Carries an outbound connection to `target` in HBONE. Returns the connection when it should go
/// in plaintext instead (`auto`, nothing listening on the peer's HBONE port).
pub async fn forward(
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
    };
    match mtls
        .pool
        .open(shared, mtls, peer, target, client_addr)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller's entry into its peer's dial queue, as `checkout_or_dial` makes it.
    fn enter(
        pool: &Pool,
        peer: SocketAddr,
    ) -> (GateHold<'_>, Arc<tokio::sync::Mutex<Option<DialFailure>>>) {
        let hold = GateHold {
            dials: &pool.dials,
            peer,
        };
        let gate = lock(&pool.dials).entry(peer).or_default().clone();
        (hold, gate)
    }

    #[test]
    fn a_peer_keeps_one_gate_while_held_and_none_after() {
        let pool = Pool::default();
        let peer: SocketAddr = "198.18.0.2:15008".parse().expect("address");
        let (hold_a, gate_a) = enter(&pool, peer);
        let (hold_b, gate_b) = enter(&pool, peer);
        assert!(Arc::ptr_eq(&gate_a, &gate_b), "one gate per peer");
        drop(gate_a);
        drop(hold_a);
        let (hold_c, gate_c) = enter(&pool, peer);
        assert!(
            Arc::ptr_eq(&gate_b, &gate_c),
            "a caller leaving does not remove the gate another still holds"
        );
        // Two callers letting go at once (both clones gone before either checks): still removed.
        drop(gate_b);
        drop(gate_c);
        drop(hold_b);
        drop(hold_c);
        assert!(lock(&pool.dials).is_empty(), "no gate left behind");
    }
}
