//! Accepting connections: the connection limit (with shedding), the original destination,
//! protocol detection, then the adapter that serves it: the HTTP/1.1 fast path, hyper, or opaque
//! TCP.
//!
//! Detection peeks at the first bytes without consuming them. On ports not known to carry HTTP it
//! biases towards availability: what is not recognisably HTTP/1 or the HTTP/2 preface, or says
//! nothing within `--detect-timeout` (server-speaks-first protocols), is forwarded as opaque
//! bytes. On `--http-ports` nothing is ever opaque, whatever the timing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use super::detect::{Detected, MAX_PEEK, classify};
use super::drain::wait_for_closing;
use super::exchange::{ConnContext, Exchange};
use super::hbone;
use super::http1;
use super::hyper_path;
use super::limits::{Activity, ConnectionGuard, OpenRequests, Slot};
use super::phases::{self, Synthetic};
use super::rewind::Rewind;
use super::shared::{Settings, Shared};
use super::tcp;
use super::upstream::connect;
use crate::error::ErrorKind;
use crate::settings::{AppProtocol, OutboundMtls};
use crate::telemetry::metrics::{Direction, Protocol};

/// While the first bytes do not decide, peek again after this pause, doubling up to the max.
const DETECT_PAUSE_MIN: Duration = Duration::from_millis(1);
const DETECT_PAUSE_MAX: Duration = Duration::from_millis(50);
/// Accept failures (out of descriptors) back off from this, doubling up to `ACCEPT_BACKOFF_MAX`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long the refusal of a connection over the limit may take.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// One listening socket and the shared state its connections use.
pub struct Listener {
    shared: Arc<Shared>,
    listener: TcpListener,
    direction: Direction,
    /// Connections arrive in HBONE (mutual TLS) rather than in plaintext.
    hbone: bool,
}

impl Listener {
    pub fn new(shared: Arc<Shared>, listener: TcpListener, direction: Direction) -> Listener {
        Listener {
            shared,
            listener,
            direction,
            hbone: false,
        }
    }

    /// The HBONE listener: tunnels from peers, inbound.
    pub fn hbone(shared: Arc<Shared>, listener: TcpListener) -> Listener {
        Listener {
            hbone: true,
            ..Listener::new(shared, listener, Direction::Inbound)
        }
    }

    /// Accepts until the drain reaches `Closing`.
    pub async fn run(self) {
        let mut phase = self.shared.drain.subscribe();
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            let accepted = tokio::select! {
                biased;
                () = wait_for_closing(&mut phase) => return,
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, client)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let shared = self.shared.clone();
                    if self.hbone {
                        let serve = serve_tunnelled::<hbone::inbound::Stream>;
                        let connection =
                            hbone::inbound::serve_connection(shared, stream, client, serve);
                        tokio::spawn(connection);
                    } else {
                        tokio::spawn(serve_connection(shared, stream, client, self.direction));
                    }
                }
                Err(e) => {
                    // Out of file descriptors and the like: counted, then a growing pause instead
                    // of a spin (the pending connection stays in the backlog meanwhile).
                    self.shared.telemetry.metrics.accept_errors.inc();
                    tracing::warn!(
                        "accept failed on the {} listener: {e}; retrying in {backoff:?}",
                        self.direction.as_str()
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    }
}

/// IPv4 peers of a dual-stack listener (`[::]:8000`) appear as `::ffff:a.b.c.d`: they are IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Where a redirected connection was going, when it was redirected.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    // An IPv4 connection on a dual-stack socket was NAT-ed by IPv4 conntrack, which answers
    // SO_ORIGINAL_DST (SOL_IP) on that socket; asking IPv6 conntrack finds nothing.
    let local = canonical(stream.local_addr().ok()?);
    let sock = socket2::SockRef::from(stream);
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let original = original.ok()?.as_socket()?;
    // Without NAT, conntrack reports the local address itself.
    (original != local).then_some(original)
}

/// Where detection reads a connection's first bytes: a socket is peeked (the bytes stay for the
/// adapter to read), a tunnel is read (the bytes are handed back to be read again). One
/// [`detect`] decides for both.
trait FirstBytes {
    /// Waits until more than `seen` bytes are in `buf` (or the end, or an error) and returns how
    /// many there are. `Ok(seen)` after bytes means the client closed its side after them.
    async fn more(&mut self, buf: &mut [u8], seen: usize) -> std::io::Result<usize>;
}

impl FirstBytes for &TcpStream {
    async fn more(&mut self, buf: &mut [u8], seen: usize) -> std::io::Result<usize> {
        let mut pause = DETECT_PAUSE_MIN;
        loop {
            let n = self.peek(buf).await?;
            if n != seen || n == 0 {
                return Ok(n);
            }
            // Peek returns at once while the bytes we have are unchanged: wait for the rest, a
            // little longer each time, so that a thousand trickling sockets cost a few wake-ups
            // each rather than a thousand.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(DETECT_PAUSE_MAX);
        }
    }
}

/// A tunnelled stream, read into the detection buffer.
struct Reading<'a, I>(&'a mut I);

impl<I: AsyncRead + Unpin> FirstBytes for Reading<'_, I> {
    async fn more(&mut self, buf: &mut [u8], seen: usize) -> std::io::Result<usize> {
        if seen == buf.len() {
            return Ok(seen);
        }
        Ok(seen + self.0.read(&mut buf[seen..]).await?)
    }
}

/// What the first bytes said, or that the client said nothing within the wait.
enum Detection {
    Decided(Detected),
    /// Silence (not a byte) for the whole wait: the app is asked whether it speaks first.
    Silent,
}

/// Reads the first bytes until they decide. Bytes that could still become an HTTP request line
/// when the wait ends (a slow head: a slowloris, or a client on a slow link) are HTTP, where the
/// head timeout and the shedder apply. With `http_only` (an HTTP port, or a port whose policy
/// names methods or paths) nothing is opaque and silence is left to the head timeout.
async fn detect<C: FirstBytes>(
    client: &mut C,
    buf: &mut [u8],
    len: &mut usize,
    wait: Duration,
    http_only: bool,
) -> Detection {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let more = match tokio::time::timeout_at(deadline, client.more(buf, *len)).await {
            Ok(more) => more,
            Err(_) if http_only || *len > 0 => return Detection::Decided(Detected::Http1),
            Err(_) => return Detection::Silent,
        };
        let decided = match more {
            Err(_) => Detected::Closed,
            // The client half-closed before sending anything (`nc host port < /dev/null`): it can
            // still read, and a server-first protocol still has something to say.
            Ok(0) if http_only => Detected::Closed,
            Ok(0) => Detected::Opaque("client_eof"),
            // The end after some bytes: they are all there will be.
            Ok(n) if n == *len => match classify(&buf[..n]) {
                Some(Detected::Opaque(_)) if http_only => Detected::Http1,
                Some(found) => found,
                None => Detected::Http1,
            },
            Ok(n) => {
                *len = n;
                match classify(&buf[..n]) {
                    Some(Detected::Opaque(_)) if http_only => Detected::Http1,
                    Some(found) => found,
                    None => continue,
                }
            }
        };
        return Detection::Decided(decided);
    }
}

/// After a silent detection wait, with the app connected: whoever speaks first decides. The app
/// first: opaque TCP (a server-speaks-first protocol). The client first: its bytes are detected
/// as they would have been. `None`: neither spoke before --tcp-idle-timeout, or the shedder took
/// the connection (a silent socket counts as idle).
async fn after_silence<C: FirstBytes>(
    shared: &Shared,
    client: &mut C,
    buf: &mut [u8],
    len: &mut usize,
    app: &TcpStream,
    slot: &Slot,
    http_only: bool,
) -> Option<Detected> {
    slot.set(Activity::Idle);
    let spoke = tokio::select! {
        biased;
        () = slot.shed_wait() => return None,
        more = client.more(buf, 0) => more,
        _ = app.readable() => {
            slot.set(Activity::Busy);
            return Some(Detected::Opaque("server_first"));
        }
        () = tokio::time::sleep(shared.settings.traffic.timeouts.tcp_idle) => return None,
    };
    slot.set(Activity::Head);
    match spoke {
        Ok(0) => Some(Detected::Opaque("client_eof")),
        Ok(n) => {
            *len = n;
            let wait = shared.settings.traffic.timeouts.detect;
            match detect(client, buf, len, wait, http_only).await {
                Detection::Decided(found) => Some(found),
                Detection::Silent => Some(Detected::Http1),
            }
        }
        Err(_) => Some(Detected::Closed),
    }
}

/// Whether inbound traffic to `port` must be HTTP: an HTTP port, or one whose policy judges
/// methods or paths (undetected bytes would skip those rules).
fn http_only(shared: &Shared, direction: Direction, port: u16) -> bool {
    shared.settings.traffic.http_ports.contains(&port)
        || (direction == Direction::Inbound && shared.judges_http_on(port))
}

/// A stream that arrived in an HBONE tunnel, its app connection already made: detection, then the
/// TCP path or the HTTP/1.1 fast path (either on that app connection; hyper's for HTTP/2 and what
/// the fast path hands over), as a plaintext connection to the same port would take, with the
/// peer's identity on every record.
async fn serve_tunnelled<I>(
    shared: Arc<Shared>,
    mut io: I,
    mut app: TcpStream,
    route: tcp::Route,
    guard: ConnectionGuard,
) where
    I: http1::ClientIo + 'static,
{
    let settings = &shared.settings;
    let port = route.upstream.port();
    let http_only = http_only(&shared, route.direction, port);
    let mut buf = vec![0u8; MAX_PEEK];
    let mut len = 0;
    let detected = if settings.traffic.opaque_ports.contains(&port) && !http_only {
        Detected::Opaque("opaque_port")
    } else {
        let wait = if http_only {
            settings.traffic.timeouts.header
        } else {
            settings.traffic.timeouts.detect
        };
        let slot = guard.slot();
        slot.set(Activity::Head);
        let mut reading = Reading(&mut io);
        let detected = slot.unless_shed(detect(&mut reading, &mut buf, &mut len, wait, http_only));
        let Some(detected) = detected.await else {
            return;
        };
        match detected {
            Detection::Decided(found) => found,
            Detection::Silent => {
                let slot = guard.slot();
                let found =
                    after_silence(&shared, &mut reading, &mut buf, &mut len, &app, slot, false);
                match Box::pin(found).await {
                    Some(found) => found,
                    None => return,
                }
            }
        }
    };
    buf.truncate(len);
    let (protocol, reason) = match detected {
        Detected::Http1 => (Protocol::Http, "http1"),
        Detected::Http2 => (Protocol::Http, "http2"),
        Detected::Opaque(reason) => (Protocol::Opaque, reason),
        Detected::Closed => return,
    };
    if guard.slot().is_shed() {
        return;
    }
    let metrics = &shared.telemetry.metrics;
    metrics.count_detection(route.direction, protocol, reason);
    if protocol == Protocol::Opaque {
        if !shared.allows(port, route.peer_id.as_deref(), None) {
            return;
        }
        guard.slot().set(Activity::Busy);
        let mut io = Rewind::new(bytes::Bytes::from(buf), io);
        Box::pin(tcp::forward_streams(&shared, &mut io, &mut app, route)).await;
        return;
    }
    let upstream_http2 = settings
        .traffic
        .http2_ports
        .contains(&route.upstream.port())
        || settings.traffic.app_protocol == AppProtocol::Http2;
    let mut ctx = ConnContext::new(
        shared.telemetry.clone(),
        route.direction,
        route.client,
        route.dialled,
        route.upstream,
        upstream_http2,
    );
    ctx.peer = route.peer;
    ctx.peer_id = route.peer_id;
    ctx.tunnel_traceparent = route.tunnel_traceparent;
    ctx.peer_workload = route.peer_workload;
    ctx.tunnel_parent = route.tunnel_parent;
    let ctx = Arc::new(ctx);
    let http2 = detected == Detected::Http2;
    let io = if http2 || upstream_http2 {
        drop(app);
        Rewind::new(bytes::Bytes::from(buf), io)
    } else {
        // The fast path, as for a plaintext client, and the app connection the CONNECT dialled
        // carries its first request: no second dial, no hyper connection on either side.
        let slot = guard.slot().clone();
        let read = BytesMut::from(&buf[..]);
        let mut connection =
            http1::Connection::new(shared.clone(), ctx.clone(), io, slot, read, Some(app));
        match Box::pin(connection.serve()).await {
            http1::Outcome::Done => return connection.close().await,
            http1::Outcome::Fallback => connection.into_rewind(),
        }
    };
    Box::pin(serve_hyper(shared.clone(), ctx, io, http2, &guard)).await;
}

/// Mutual TLS and policy before detection: strict inbound refuses plaintext, and so does a policy
/// that admits no unauthenticated peer to the port; outbound goes into an HBONE tunnel (`None`:
/// carried or refused), unless `auto` found no HBONE there.
async fn gate(
    shared: &Shared,
    stream: TcpStream,
    direction: Direction,
    client: SocketAddr,
    upstream: SocketAddr,
    balanced: bool,
) -> Option<TcpStream> {
    if direction == Direction::Inbound && !shared.admits(upstream.port(), None) {
        return None;
    }
    let Some(mtls) = &shared.mtls else {
        return Some(stream);
    };
    match direction {
        Direction::Inbound if mtls.refuses_plaintext(upstream.port()) => {
            tracing::info!(%client, port = upstream.port(), "plaintext refused (--inbound-mtls strict; --plaintext-ports lists the exceptions)");
            let metrics = &shared.telemetry.metrics;
            metrics.count_detection(direction, Protocol::Opaque, "plaintext_refused");
            None
        }
        // Served as HTTP: each request goes in a tunnel to the endpoint its route picks.
        Direction::Outbound if balanced => Some(stream),
        Direction::Outbound if mtls.outbound != OutboundMtls::Off => {
            hbone::outbound::forward(shared, mtls, stream, client, upstream).await
        }
        _ => Some(stream),
    }
}

/// Serves one accepted connection: opened (admitted, gated, detected) on the heap, then served.
/// An idle keep-alive client holds this task for as long as it stays connected, so the task is
/// only as large as the fast path's idle state.
async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    direction: Direction,
) {
    // Boxed: opening takes the detection's state and the opaque relay, which a connection
    // served as HTTP should not carry afterwards.
    // Destructured in the `let` itself: a named `HttpConnection` would keep its room in the task.
    let Some(HttpConnection {
        shared,
        ctx,
        stream,
        guard,
        http2,
        fast,
    }) = Box::pin(open(shared, stream, client, direction)).await
    else {
        return;
    };
    let io = if fast {
        let slot = guard.slot().clone();
        let mut connection = http1::Connection::new(
            shared.clone(),
            ctx.clone(),
            stream,
            slot,
            BytesMut::new(),
            None,
        );
        match connection.serve().await {
            http1::Outcome::Done => return,
            http1::Outcome::Fallback => connection.into_rewind(),
        }
    } else {
        Rewind::new(bytes::Bytes::new(), stream)
    };
    Box::pin(serve_hyper(shared, ctx, io, http2, &guard)).await;
}

/// A connection [`open`] found to speak HTTP.
struct HttpConnection {
    shared: Arc<Shared>,
    ctx: Arc<ConnContext>,
    stream: TcpStream,
    guard: ConnectionGuard,
    /// It began with the HTTP/2 preface.
    http2: bool,
    /// The HTTP/1 fast path can serve it (plain TCP to an HTTP/1 app).
    fast: bool,
}

/// Admission, destination, the mutual TLS and policy gate, and detection; relays opaque bytes to
/// the end. `Some` for a connection to serve as HTTP.
async fn open(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    direction: Direction,
) -> Option<HttpConnection> {
    let metrics = &shared.telemetry.metrics;
    let gauge = &metrics.direction(direction).open_connections;
    let Some(guard) = shared.limits.admit(gauge, &metrics.shed_connections) else {
        metrics.rejected_connections.inc();
        metrics.count_error(direction, ErrorKind::TooManyConnections);
        if let Ok(local) = stream.local_addr() {
            let kind = ErrorKind::TooManyConnections;
            tcp::log_refused(&shared, direction, client, local, kind);
        }
        refuse(stream).await;
        return None;
    };
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().map(canonical).ok()?;
    let client = canonical(client);
    let original = original_destination(&stream);
    let settings = &shared.settings;
    let upstream = destination(&shared, direction, original, local, client)?;
    let dialled = original.unwrap_or(local);
    // Decided once for the connection (a reload meanwhile must not split the decision): served
    // as HTTP, each request in a tunnel to its own endpoint.
    let balanced = direction == Direction::Outbound && shared.balances_in_tunnels(upstream.port());
    // Boxed, and only with an identity or a policy: the tunnel's state would otherwise be in
    // every connection's opening, plaintext ones included.
    let stream = if shared.mtls.is_some() || shared.policy.is_some() {
        let gate = gate(&shared, stream, direction, client, upstream, balanced);
        Box::pin(gate).await?
    } else {
        stream
    };

    let port = upstream.port();
    let (detected, app) =
        detect_plaintext(&shared, &stream, (direction, balanced), upstream, &guard).await?;
    let (protocol, reason) = match detected {
        Detected::Http1 => (Protocol::Http, "http1"),
        Detected::Http2 => (Protocol::Http, "http2"),
        Detected::Opaque(reason) => (Protocol::Opaque, reason),
        Detected::Closed => return None,
    };
    metrics.count_detection(direction, protocol, reason);
    if protocol == Protocol::Opaque {
        if direction == Direction::Inbound && !shared.allows(port, None, None) {
            return None;
        }
        guard.slot().set(Activity::Busy);
        let route = tcp::Route {
            client,
            dialled,
            upstream,
            direction,
            peer: None,
            peer_id: None,
            tunnel_traceparent: None,
            peer_workload: None,
            tunnel_parent: None,
        };
        // Boxed: a long relay should not carry detection's state, nor detection the relay's.
        Box::pin(tcp::forward(&shared, stream, app, route)).await;
        drop(guard);
        return None;
    }
    drop(app);

    let upstream_http2 = settings.traffic.http2_ports.contains(&upstream.port())
        || settings.traffic.app_protocol == AppProtocol::Http2;
    let ctx = Arc::new(ConnContext::new(
        shared.telemetry.clone(),
        direction,
        client,
        dialled,
        upstream,
        upstream_http2,
    ));
    // A balanced connection's requests go in tunnels: hyper's clients carry them (the fast
    // path's connections are plain TCP).
    let fast = detected == Detected::Http1 && !upstream_http2 && !balanced;
    Some(HttpConnection {
        shared,
        ctx,
        stream,
        guard,
        http2: detected == Detected::Http2,
        fast,
    })
}

/// [`upstream_of`], with the refusals logged and counted: an inbound destination that cannot be
/// this pod's, or one of the proxy's own ports.
fn destination(
    shared: &Shared,
    direction: Direction,
    original: Option<SocketAddr>,
    local: SocketAddr,
    client: SocketAddr,
) -> Option<SocketAddr> {
    let settings = &shared.settings;
    let metrics = &shared.telemetry.metrics;
    let Some(upstream) = upstream_of(settings, direction, original, local) else {
        match direction {
            Direction::Outbound => {
                tracing::warn!(%client, "outbound connection without an original destination (not redirected?): closing it")
            }
            Direction::Inbound => {
                tracing::debug!(%client, ?original, "inbound connection for a loopback or unspecified address refused");
                metrics.count_error(direction, ErrorKind::ProxyPort);
                let dialled = original.unwrap_or(local);
                tcp::log_refused(shared, direction, client, dialled, ErrorKind::ProxyPort);
            }
        }
        return None;
    };
    if direction == Direction::Inbound && settings.traffic.own_ports.contains(&upstream.port()) {
        // Debug, not info: a peer could otherwise fill the log; the metric counts them.
        tracing::debug!(%client, %upstream, "inbound connection to one of the proxy's own ports refused");
        metrics.count_error(direction, ErrorKind::ProxyPort);
        let dialled = original.unwrap_or(local);
        tcp::log_refused(shared, direction, client, dialled, ErrorKind::ProxyPort);
        return None;
    }
    Some(upstream)
}

/// Where a connection goes; `None` for an outbound one that was not redirected, or an inbound one
/// whose original destination cannot be this pod's (loopback or unspecified: spoofed, since the
/// pod's own traffic never passes the inbound rules).
fn upstream_of(
    settings: &Settings,
    direction: Direction,
    original: Option<SocketAddr>,
    local: SocketAddr,
) -> Option<SocketAddr> {
    match (direction, original) {
        (Direction::Inbound, Some(original)) => {
            let ip = original.ip();
            if ip.is_loopback() || ip.is_unspecified() {
                return None;
            }
            Some(settings.inbound_upstream(original.port(), local))
        }
        // Not redirected (a client dialled the inbound port itself): it stands for --app, and
        // is judged by --app's port.
        (Direction::Inbound, None) => Some(settings.traffic.app),
        (Direction::Outbound, original) => original,
    }
}

/// Detection on a plaintext connection: `None` when it is to close; the app connection when
/// detection made it (only ever for opaque bytes). `balanced`: served as HTTP whatever it sends.
async fn detect_plaintext(
    shared: &Shared,
    stream: &TcpStream,
    (direction, balanced): (Direction, bool),
    upstream: SocketAddr,
    guard: &ConnectionGuard,
) -> Option<(Detected, Option<std::io::Result<TcpStream>>)> {
    let settings = &shared.settings;
    let port = upstream.port();
    let http_only = balanced || http_only(shared, direction, port);
    if settings.traffic.opaque_ports.contains(&port) && !http_only {
        return Some((Detected::Opaque("opaque_port"), None));
    }
    let wait = if http_only {
        settings.traffic.timeouts.header
    } else {
        settings.traffic.timeouts.detect
    };
    // On the heap, and only while detecting: it would otherwise stay in the connection's task.
    let mut buf = vec![0u8; MAX_PEEK];
    let mut len = 0;
    // Until it has said what it is, a connection does no work: the shedder may take it, and then
    // it closes at once (a mark it ignored would let connections grow past the limit).
    let slot = guard.slot();
    slot.set(Activity::Head);
    let mut client = stream;
    let detected = slot.unless_shed(detect(&mut client, &mut buf, &mut len, wait, http_only));
    let found = match detected.await? {
        Detection::Decided(found) => Some((found, None)),
        Detection::Silent => {
            Box::pin(server_first(shared, stream, &mut buf, upstream, guard)).await
        }
    };
    // Shed as it decided: closed, like any other shed connection.
    found.filter(|_| !slot.is_shed())
}

/// A plaintext client silent for the whole detection wait: the app is connected to, and whoever
/// speaks first decides ([`after_silence`]). Returns the app connection (or the failure to make
/// it, for the relay's record) when the bytes are opaque, `None` when the connection is to close.
async fn server_first(
    shared: &Shared,
    stream: &TcpStream,
    buf: &mut [u8],
    upstream: SocketAddr,
    guard: &ConnectionGuard,
) -> Option<(Detected, Option<std::io::Result<TcpStream>>)> {
    let app = match tokio::select! {
        biased;
        () = guard.slot().shed_wait() => return None,
        app = connect(upstream, shared.upstreams.connect) => app,
    } {
        Ok(app) => app,
        // The relay logs the failure, with the record the connection is owed.
        Err(e) => return Some((Detected::Opaque("timeout"), Some(Err(e)))),
    };
    let mut len = 0;
    let mut client = stream;
    let found = after_silence(
        shared,
        &mut client,
        buf,
        &mut len,
        &app,
        guard.slot(),
        false,
    )
    .await?;
    let app = matches!(found, Detected::Opaque(_)).then_some(Ok(app));
    Some((found, app))
}

/// Serves the rest of a connection with hyper: HTTP/2, the HTTP/1 the fast path hands over, and
/// HTTP/1 to an app spoken to over HTTP/2; on a socket or in an HBONE tunnel.
async fn serve_hyper<I>(
    shared: Arc<Shared>,
    ctx: Arc<ConnContext>,
    io: Rewind<I>,
    http2: bool,
    guard: &ConnectionGuard,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let builder = if http2 {
        &shared.settings.http2_server
    } else {
        &shared.settings.http1_server
    };
    let open = OpenRequests::new(guard.slot().clone());
    let service = {
        let (shared, ctx, open) = (shared.clone(), ctx.clone(), open.clone());
        service_fn(move |req| hyper_path::handle(shared.clone(), ctx.clone(), req, open.start()))
    };
    // HTTP/1: a head is bounded from its first byte (--header-timeout), an idle connection by
    // --idle-timeout, as on the fast path.
    let io = if http2 {
        io
    } else {
        let (on_read, on_write) = (open.clone(), open.clone());
        let lowercase = shared.settings.traffic.lowercase_header_names;
        io.on_read(move || on_read.bytes_arrived())
            .replace_writes(move |written| our_words(&on_write, written, lowercase))
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let slot: &Slot = guard.slot();
    let timeouts = shared.settings.traffic.timeouts;
    // A client that stops taking a response (twice --response-body-timeout, so that an app that
    // stalls ends its own stream first): nginx's send_timeout, for the connection.
    let stall = 2 * timeouts.response_body;
    // Closing for the drain or the idle timeout is graceful. HTTP/1.1: finish the request in
    // progress, answer it with `Connection: close`, and close an idle connection at once; HTTP/2:
    // GOAWAY, then finish open streams.
    let result = tokio::select! {
        biased;
        () = slot.shed_wait() => None,
        result = conn.as_mut() => Some(result),
        () = slot.close_requested_wait() => {
            conn.as_mut().graceful_shutdown();
            slot.unless_shed(closed(conn, &open, stall, timeouts.header)).await.flatten()
        }
        since = open.head_overdue(shared.settings.traffic.timeouts.header), if !http2 => {
            // Closed without an answer, as nginx does at client_header_timeout; logged as 408.
            tracing::debug!(client = %ctx.client, "no whole head within --header-timeout: closing");
            let started = since.into_std();
            Exchange::unparsed(ctx.clone(), started, http::Version::HTTP_11)
                .finish_with_error(ErrorKind::RequestTimeout);
            return;
        }
        () = open.stalled_for(stall) => {
            tracing::debug!(client = %ctx.client, "a response not taken for twice --response-body-timeout: closing");
            return;
        }
        // Idle HTTP/1 keep-alive, and an HTTP/2 client that only answers PINGs, which would
        // otherwise hold its connection for good.
        () = open.idle_for(timeouts.idle) => {
            tracing::debug!(client = %ctx.client, "no request for --idle-timeout: closing");
            conn.as_mut().graceful_shutdown();
            slot.unless_shed(closed(conn, &open, stall, timeouts.header)).await.flatten()
        }
    };
    let Some(result) = result else {
        // The shedder chose this connection to make room: it had no request open (or was still
        // sending its first head), so it closes now, as the fast path's do. A graceful HTTP/2
        // close waits for a PING answer that a hostile client never sends, and the slot it was
        // to free is already given to the connection that asked for room. Or a graceful close
        // was cut short (`closed`).
        tracing::debug!(client = %ctx.client, "closing without waiting for hyper's close");
        return;
    };
    if let Err(e) = result {
        log_rejected_by_hyper(&ctx, &*e, started, http2);
    }
}

/// A graceful close, as bounded as the connection was before it: hyper's HTTP/2 close sends
/// its last GOAWAY only once its PING is answered, and accepts new streams until then, so a
/// client that never answers (or never reads, and so never takes the GOAWAY) would keep the
/// connection for good. So: a response the client stops taking still ends the connection after
/// `stall`, and once no request has been open for `grace` (the time a client has to answer a
/// keep-alive PING, --header-timeout) the connection is dropped. `None` when cut short.
async fn closed<C: Future>(
    conn: Pin<&mut C>,
    open: &OpenRequests,
    stall: Duration,
    grace: Duration,
) -> Option<C::Output> {
    tokio::select! {
        result = conn => Some(result),
        () = open.stalled_for(stall) => {
            tracing::debug!("a response not taken for twice --response-body-timeout while closing");
            None
        }
        () = open.idle_for(grace) => {
            tracing::debug!("no request for --header-timeout after the GOAWAY: dropping the connection");
            None
        }
    }
}

/// A head hyper refused itself (before the proxy's handler saw it) is answered in the proxy's
/// words: the same status, `Server`, one-line body and close as the fast path's refusal. Its
/// record is the connection's error's ([`log_rejected_by_hyper`]).
fn our_words(open: &OpenRequests, written: &[u8], lowercase_names: bool) -> Option<Vec<u8>> {
    if !open.reading_head() {
        return None;
    }
    let kind = phases::hyper_refusal(written)?;
    let mut out = Vec::new();
    Synthetic::new(kind, false)
        .closing(true)
        .render_h1(lowercase_names, &mut out);
    Some(out)
}

/// A request hyper refused before it reached the proxy's handler (malformed head, too large,
/// head timeout): hyper answered it (400, 431, 408) or closed; it still gets its record.
fn log_rejected_by_hyper(
    ctx: &Arc<ConnContext>,
    error: &(dyn std::error::Error + 'static),
    started: Instant,
    http2: bool,
) {
    tracing::debug!("client connection ended: {error}");
    let Some(hyper_error) = error.downcast_ref::<hyper::Error>() else {
        return;
    };
    let kind = if hyper_error.is_parse_too_large() {
        ErrorKind::HeadersTooLarge
    } else if hyper_error.is_parse() {
        ErrorKind::BadRequest
    } else if hyper_error.is_timeout() {
        ErrorKind::RequestTimeout
    } else {
        return;
    };
    let version = if http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    Exchange::unparsed(ctx.clone(), started, version).finish_with_error(kind);
}

/// Over --max-connections with nothing to shed: one 503 with Retry-After, then close. The request
/// is read first (by hyper), so that the client sees an answer rather than a connection that
/// closed before it could send.
async fn refuse(stream: TcpStream) {
    let service = service_fn(|_req| async {
        let synthetic = Synthetic::new(ErrorKind::TooManyConnections, false).closing(true);
        Ok::<_, Infallible>(hyper_path::refusal(synthetic))
    });
    // The only response of ours here carries `Server`: anything else is hyper refusing a head.
    let io = Rewind::new(bytes::Bytes::new(), stream).replace_writes(|written| {
        let kind = phases::hyper_refusal(written)?;
        let mut out = Vec::new();
        Synthetic::new(kind, false)
            .closing(true)
            .render_h1(false, &mut out);
        Some(out)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    let _ = tokio::time::timeout(REFUSAL_TIME, conn).await;
}
#[cfg(test)]
mod tests {
    use clap::{Args, FromArgMatches};

    use crate::config::RunArgs;
    use crate::proxy::Shared;
    use crate::telemetry::metrics::Direction;

    fn size_of_future<F: std::future::Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's task is as large as the largest state of its future, and an idle client
    /// holds it for as long as it is connected: the opening (detection, the gate, the opaque
    /// relay), the exchange and the refusal live on the heap only while they run. Bounds the
    /// future (tokio's task cell adds its header and rounds up to 128 bytes): 880 bytes in
    /// release and 904 in debug builds on 2026-12-06, against 1,728 before the opening moved to
    /// the heap and 976 while the opened connection was still a named local.
    #[tokio::test]
    async fn an_idle_connection_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let matches = RunArgs::augment_args(clap::Command::new("run")).get_matches_from([
            "run",
            "--proxy-mark",
            "0",
            "--access-log",
            "off",
        ]);
        let args = RunArgs::from_arg_matches(&matches).expect("flags");
        let shared = Shared::new(&args.proxy_config(), Box::new(std::io::sink()));
        let task = super::serve_connection(shared.clone(), stream, addr, Direction::Inbound);
        let size = size_of_future(&task);
        assert!(size <= 960, "a connection's future takes {size} bytes");
        // A peer's HBONE connection: the handshakes (TLS, then HTTP/2's preface) live on the
        // heap only while they run, and the HTTP/2 connection in a box of its own (the future
        // was 14.5 KB with the TLS handshake inline, 3,376 bytes with hyper's connection inline,
        // 984 in debug builds since: the keep-alive, the timers and the loop's state).
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let serve = super::serve_tunnelled::<crate::proxy::hbone::inbound::Stream>;
        let task = crate::proxy::hbone::inbound::serve_connection(shared, stream, addr, serve);
        let size = size_of_future(&task);
        assert!(
            size <= 1280,
            "an HBONE connection's future takes {size} bytes"
        );
    }
}
