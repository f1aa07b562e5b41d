//! Opaque TCP: bytes copied both ways, half-close passed on (a client's `shutdown(Write)` reaches the
//! server while the response still flows back), one access-log record per connection.
//! The bytes move with splice(2) (`splice`, zero-copy); the user-space copy below is the fallback
//! when no pipes can be had.

use crate::telemetry::trace::Parent;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

mod copy;
mod idle;
mod splice;

use super::upstream::connect;
use crate::error::{ErrorKind, classify_io};
use crate::identity::SpiffeId;
use crate::proxy::shared::Shared;
use crate::telemetry::access_log::Record;
use crate::telemetry::istio::{Observed, PeerWorkload};
use crate::telemetry::metrics::Direction;
use idle::{IdleClock, until_idle};

/// Where an opaque connection came from and goes.
pub(crate) struct Route {
    pub(crate) client: SocketAddr,
    pub(crate) dialled: SocketAddr,
    pub(crate) upstream: SocketAddr,
    pub(crate) direction: Direction,
    /// The peer's SPIFFE ID when the bytes travel in an HBONE tunnel, as the log writes it.
    pub(crate) peer: Option<String>,
    /// The same, parsed once, for the policy (inbound tunnels only).
    pub(crate) peer_id: Option<Arc<SpiffeId>>,
    /// The tunnel's `traceparent` (sent outbound, received inbound) when it had a valid one.
    pub(crate) tunnel_traceparent: Option<String>,
    /// What an inbound tunnel's `baggage` said of the peer's workload.
    pub(crate) peer_workload: Option<Arc<PeerWorkload>>,
    /// An inbound tunnel's own span, when tracing sampled it: the parent of the requests in it
    /// that name none.
    pub(crate) tunnel_parent: Option<Parent>,
}

/// Relays until both sides are done, or until no byte moved either way for --tcp-idle-timeout.
/// `app` is the app connection (or the failure to make it) when detection already tried (the
/// app was asked who speaks first). Opaque streams have no graceful end a proxy could signal: past the drain delay they get
/// the drain timeout, after which the process exits under them.
pub(crate) async fn forward(
    shared: &Shared,
    mut client: TcpStream,
    app: Option<std::io::Result<TcpStream>>,
    route: Route,
) {
    let start = Instant::now();
    let app = match app {
        Some(app) => app,
        None => connect(route.upstream, shared.upstreams.connect).await,
    };
    let (result, sent, received) = match app {
        Err(e) => {
            let kind = classify_io(&e, true);
            tracing::debug!(upstream = %route.upstream, "opaque connect failed: {e}");
            (Err(kind), 0, 0)
        }
        Ok(mut server) => {
            let clock = IdleClock::new();
            let relay = relay(&mut client, &mut server, &clock);
            until_idle(relay, &clock, shared.settings.traffic.timeouts.tcp_idle).await
        }
    };
    finish(shared, &route, start, result, sent, received);
}

/// Relays between two streams of any kind (an HBONE tunnel on one side) already connected, under
/// the same idle timeout.
pub(crate) async fn forward_streams<A, B>(
    shared: &Shared,
    client: &mut A,
    server: &mut B,
    route: Route,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let clock = IdleClock::new();
    let buffers = (TUNNEL_COPY_BUFFER, TUNNEL_COPY_BUFFER_MAX);
    let copy = copy_both_ways(client, server, buffers, &clock);
    let (result, sent, received) =
        until_idle(copy, &clock, shared.settings.traffic.timeouts.tcp_idle).await;
    finish(shared, &route, start, result, sent, received);
}

/// The connection's end: metrics and one access-log record.
pub(crate) fn finish(
    shared: &Shared,
    route: &Route,
    start: Instant,
    result: Result<(), ErrorKind>,
    sent: u64,
    received: u64,
) {
    let telemetry = &shared.telemetry;
    let direction = route.direction;
    let metrics = telemetry.metrics.direction(direction);
    metrics.tcp_bytes_in.inc_by(sent);
    metrics.tcp_bytes_out.inc_by(received);
    let error = result.err();
    if let Some(kind) = error {
        telemetry.metrics.count_error(direction, kind);
    }
    let istio = telemetry.istio();
    if istio.is_none() && !telemetry.wants_records() {
        return;
    }
    let original = route.dialled.to_string();
    if let Some(istio) = istio {
        istio.observe_tcp(&Observed {
            direction,
            peer: route.peer.as_deref(),
            peer_workload: route.peer_workload.as_deref(),
            authority: &original,
            status: 0,
            grpc_status: None,
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            request_bytes: sent,
            response_bytes: received,
        });
    }
    if telemetry.wants_records() {
        let duration = start.elapsed();
        let upstream = route.upstream.to_string();
        telemetry.record(&Record {
            start: SystemTime::now() - duration,
            duration,
            direction,
            method: "-",
            protocol: "TCP",
            scheme: "tcp",
            original_authority: &original,
            upstream_authority: &upstream,
            path_and_query: "",
            client: &route.client.to_string(),
            request_id: "-",
            status: 0,
            request_bytes: sent,
            response_bytes: received,
            grpc_status: None,
            error,
            peer: route.peer.as_deref(),
            tunnel_traceparent: route.tunnel_traceparent.as_deref(),
            trace: None,
            route: None,
        });
    }
}

/// The record of a connection refused before anything was relayed (at the connection limit, to
/// one of the proxy's own ports, a refused mutual-TLS handshake): every connection leaves one, as
/// every exchange does. The caller has counted the error.
pub(crate) fn log_refused(
    shared: &Shared,
    direction: Direction,
    client: SocketAddr,
    dialled: SocketAddr,
    error: ErrorKind,
) {
    let telemetry = &shared.telemetry;
    if !telemetry.wants_records() {
        return;
    }
    let (original, client) = (dialled.to_string(), client.to_string());
    telemetry.record(&Record {
        start: SystemTime::now(),
        duration: std::time::Duration::ZERO,
        direction,
        method: "-",
        protocol: "TCP",
        scheme: "tcp",
        original_authority: &original,
        upstream_authority: "-",
        path_and_query: "",
        client: &client,
        request_id: "-",
        status: 0,
        request_bytes: 0,
        response_bytes: 0,
        grpc_status: None,
        error: Some(error),
        peer: None,
        tunnel_traceparent: None,
        trace: None,
        route: None,
    });
}

/// Splice when the pipes can be had, else the user-space copy.
async fn relay(
    client: &mut TcpStream,
    server: &mut TcpStream,
    clock: &IdleClock,
) -> (Result<(), ErrorKind>, u64, u64) {
    match splice::Pipes::new() {
        Ok(pipes) => splice::both_ways(client, server, &pipes, clock).await,
        Err(e) => {
            // Out of descriptors (EMFILE/ENFILE) most likely; the copy needs none. Untested: making
            // pipe2 fail in one test process without starving everything else is not worth it.
            static LOGGED: std::sync::Once = std::sync::Once::new();
            LOGGED.call_once(|| {
                tracing::debug!("no pipes for splice ({e}): copying through user space instead")
            });
            copy_both_ways(client, server, (COPY_BUFFER, COPY_BUFFER), clock).await
        }
    }
}

/// Per-direction copy buffer. tokio's default (8 KiB) capped one stream at ~2-3 Gbit/s on
/// loopback (iperf3 through bench/protocols.sh, 15-20 Gbit/s direct): every 8 KiB cost a read,
/// a write and often a cross-core wake-up. 64 KiB gives ~7 Gbit/s at half the CPU; 256 KiB adds
/// little more and 1 MiB is slower, while each opaque connection holds two such buffers for
/// its whole life (128 KiB here).
const COPY_BUFFER: usize = 64 * 1024;

/// Per-direction copy buffer between an HBONE tunnel's stream and a socket, at first. Fixed at
/// 64 KiB, each tunnelled connection held 128 KiB, most of the client side's memory at 50
/// connections (`bench/mtls.sh`); so a direction's buffer grows, up to [`TUNNEL_COPY_BUFFER_MAX`],
/// only when its reads fill it ([`copy`]). Starting at 4 KiB instead of 16 KiB took 1.3 MB off
/// the client side at 50 connections of small requests; a bulk stream reaches 64 KiB after four
/// full reads and ran as fast (docs/benchmarks.md, 2026-12-07).
const TUNNEL_COPY_BUFFER: usize = 4 * 1024;
/// A bulk direction's buffer: each write into the tunnel one 64 KiB DATA frame (one bulk stream
/// 1.14x as fast as with 16 KiB throughout, docs/benchmarks.md).
const TUNNEL_COPY_BUFFER_MAX: usize = 64 * 1024;

/// Returns (bytes client to server, bytes server to client). The counts are kept even when the
/// copy fails (a reset from either side): what crossed before the error is still logged and
/// counted. Each direction's buffer starts at `buffers.0` bytes and may grow to `buffers.1`.
async fn copy_both_ways<A, B>(
    a: &mut A,
    b: &mut B,
    buffers: (usize, usize),
    clock: &IdleClock,
) -> (Result<(), ErrorKind>, u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Counted::new(a);
    a.clock = Some(clock);
    let result = copy::both_ways(&mut a, b, buffers.0, buffers.1).await;
    let result = result.map(|_| ()).map_err(|e| {
        tracing::debug!("opaque connection ended: {e}");
        a.failure()
    });
    (result, a.read, a.written)
}

/// Counts the bytes read from and written to the client side.
/// Every byte of a relay passes the client side one way or the other, so its clock, when it has
/// one, sees all activity.
pub(crate) struct Counted<'a, S> {
    inner: &'a mut S,
    pub(crate) read: u64,
    pub(crate) written: u64,
    clock: Option<&'a IdleClock>,
    /// A read or write on the client side failed (a reset, most often).
    client_failed: bool,
}

impl<'a, S> Counted<'a, S> {
    pub(crate) fn new(inner: &'a mut S) -> Self {
        Counted {
            inner,
            read: 0,
            written: 0,
            clock: None,
            client_failed: false,
        }
    }

    /// What a failed relay is logged as: the side whose I/O failed (as the splice path does).
    pub(crate) fn failure(&self) -> ErrorKind {
        if self.client_failed {
            ErrorKind::TcpClientReset
        } else {
            ErrorKind::TcpIo
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.client_failed |= matches!(poll, Poll::Ready(Err(_)));
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.read += read;
            if let Some(clock) = self.clock {
                clock.touch();
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut *self.inner).poll_write(cx, data);
        self.client_failed |= matches!(poll, Poll::Ready(Err(_)));
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
            if let Some(clock) = self.clock {
                clock.touch();
            }
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}
