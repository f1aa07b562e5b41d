//! Connections to the app (inbound) and to original destinations (outbound).
//!
//! Two pools under one idle policy (`--pool-idle-timeout`, at most `POOL_MAX_IDLE_PER_UPSTREAM`
//! idle connections per address): the fast path's own [`Pool`] of raw connections, and
//! hyper-util's pooled clients for the hyper path. Idle connections are reaped when they expire
//! or when the app closes them, not only dropped on a later checkout. Every socket the proxy opens
//! can carry a mark (`--proxy-mark`) so that the pod's redirect rules let it pass, whatever user
//! the proxy runs as. HBONE's pool of connections to peers is [`tunnels`] (its state; HBONE dials).
//! Routes with endpoints choose one per request through [`balance`], over the addresses
//! [`endpoints`] keeps current (a static list, or a DNS name re-resolved as its TTL says).

pub mod balance;
pub mod endpoints;
pub mod tunnel_stream;
pub mod tunnels;

use crate::sync::lock;
use crate::telemetry::otlp::TunnelSpan;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{CaptureConnection, Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};

use super::body::RequestBody;
use super::exchange::ConnControl;

/// Idle connections kept per upstream address, in each pool.
const POOL_MAX_IDLE_PER_UPSTREAM: usize = 256;

#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectOptions {
    pub(crate) timeout: Duration,
    /// SO_MARK for upstream sockets; `None` when disabled or not permitted.
    pub(crate) mark: Option<u32>,
    /// How long a write to the app on hyper's path may wait for it to take anything: twice
    /// --request-body-timeout, the fast path's bound on its writes. An app that stops reading a
    /// request's body and never answers would otherwise hold the request, and its client, for good.
    pub(crate) write_stall: Duration,
}

/// Opens a TCP connection with Nagle off and the proxy's mark, bounded by the connect timeout.
pub(crate) async fn connect(addr: SocketAddr, opts: ConnectOptions) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    if let Some(mark) = opts.mark {
        socket2::SockRef::from(&socket).set_mark(mark)?;
    }
    match tokio::time::timeout(opts.timeout, socket.connect(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {addr} took longer than {:?}", opts.timeout),
        )),
    }
}

/// Whether this process may set SO_MARK (it needs CAP_NET_ADMIN). Checked once at startup so that
/// an unprivileged proxy (excluded from redirection by its uid instead) does not fail every connect.
pub(crate) fn mark_if_permitted(mark: u32) -> Option<u32> {
    if mark == 0 {
        return None;
    }
    let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    match probe.set_mark(mark) {
        Ok(()) => Some(mark),
        Err(e) => {
            tracing::info!(
                "not marking upstream sockets ({e}): the redirect rules must exclude the proxy by its uid/gid"
            );
            None
        }
    }
}

/// Opens an upstream connection in mutual TLS: an HBONE stream to the destination's proxy, or
/// plaintext where `--outbound-mtls auto` finds no HBONE there. Implemented by the HBONE adapter
/// and handed down by the wiring, so that hyper's clients (here, below the adapters) can carry
/// each request to a route's endpoint through a tunnel of its own.
pub(crate) trait Tunneller: Send + Sync {
    fn open(
        &self,
        target: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Transport>> + Send>>;
}

/// An upstream connection: a TCP socket, or a stream in an HBONE tunnel.
pub(crate) enum Transport {
    Tcp(TcpStream),
    Tunnel {
        io: tunnel_stream::TunnelStream,
        /// The peer proxy's SPIFFE ID, verified by the handshake.
        peer: Arc<str>,
        /// The stream's place on its pooled HBONE connection, held as long as the stream.
        slot: tunnels::StreamSlot,
        /// The tunnel's span (sampled, with tracing on), which ends with the stream.
        span: Option<TunnelSpan>,
    },
}

/// hyper-util connector. The URIs are ours, always `http://IP:PORT`, unless the connector dials
/// a `fixed` address (a route's endpoint: the request keeps the authority the app wrote, and
/// hyper pools per connector, so one client per endpoint); through a [`Tunneller`] when the
/// upstream is reached in mutual TLS.
#[derive(Clone)]
pub(crate) struct Connector {
    options: ConnectOptions,
    fixed: Option<SocketAddr>,
    tunneller: Option<Arc<dyn Tunneller>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = PooledIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let Connector {
            options,
            fixed,
            tunneller,
        } = self.clone();
        Box::pin(async move {
            let addr = match fixed {
                Some(addr) => addr,
                None => uri
                    .authority()
                    .and_then(|a| a.as_str().parse().ok())
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("not an IP:PORT upstream: {uri}"),
                        )
                    })?,
            };
            let transport = match tunneller {
                Some(tunneller) => tunneller.open(addr).await?,
                None => Transport::Tcp(connect(addr, options).await?),
            };
            Ok(PooledIo::new(transport, options.write_stall))
        })
    }
}

/// What a hyper-pooled connection tells the request that used it: how many requests it has
/// carried (the retry rule needs to know whether a failed attempt was on a reused connection, the
/// keep-alive race, or on a fresh one, the app's answer) and, in a tunnel, the peer's identity.
/// Read through [`ConnInfo::note`] after every attempt.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnInfo {
    uses: Arc<AtomicU32>,
    peer: Option<Arc<str>>,
    control: Arc<ConnControl>,
}

/// What [`ConnInfo::note`] learnt of an attempt's connection.
#[derive(Debug, Default)]
pub(crate) struct Noted {
    /// The connection had carried a request before this one.
    pub(crate) reused: bool,
    /// The peer proxy's SPIFFE ID, when the connection is an HBONE stream.
    pub(crate) peer: Option<Arc<str>>,
    /// What the request tells the connection ([`ConnControl`]).
    pub(crate) control: Option<Arc<ConnControl>>,
}

impl ConnInfo {
    /// Counts the attempt on the connection `captured` saw (nothing when no connection was made).
    pub(crate) fn note(captured: &CaptureConnection) -> Noted {
        match captured.connection_metadata().as_ref() {
            Some(connected) => ConnInfo::note_connected(connected),
            None => Noted::default(),
        }
    }

    /// Counts the attempt on the connection `connected` describes (a failed attempt's, from
    /// hyper's error).
    pub(crate) fn note_connected(connected: &Connected) -> Noted {
        let mut extras = http::Extensions::new();
        connected.get_extras(&mut extras);
        extras
            .get::<ConnInfo>()
            .map_or_else(Noted::default, ConnInfo::count)
    }

    /// Counts the attempt on the connection that answered: hyper's client puts the connection's
    /// record in the response's extensions.
    pub(crate) fn note_response(extensions: &http::Extensions) -> Noted {
        extensions
            .get::<ConnInfo>()
            .map_or_else(Noted::default, ConnInfo::count)
    }

    fn count(&self) -> Noted {
        Noted {
            reused: self.uses.fetch_add(1, Ordering::Relaxed) > 0,
            peer: self.peer.clone(),
            control: Some(self.control.clone()),
        }
    }
}

/// A connection of hyper's pools: the transport, and its [`ConnInfo`].
pub(crate) struct PooledIo {
    io: PooledTransport,
    info: ConnInfo,
    /// A tunnel's place on its HBONE connection, held while hyper keeps the connection.
    _slot: Option<tunnels::StreamSlot>,
    /// And its span, which ends when hyper lets the connection go.
    _span: Option<TunnelSpan>,
    /// The app reset the connection (or closed it) while a request was being written: later
    /// writes are taken and dropped, so that hyper goes on to read what the app answered first.
    /// An app that answers an upload it refuses (413) and closes without reading the body resets
    /// the connection, its answer still waiting to be read: hyper, failing on the write, would
    /// turn it into a 502. Reads then end the connection, with or without an answer.
    writes_dropped: bool,
    /// The bound on a write the app takes nothing of ([`ConnectOptions::write_stall`]), and its
    /// timer, armed while a write waits (allocated the first time one does).
    write_stall: Duration,
    stall_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    stall_armed: bool,
}

enum PooledTransport {
    Tcp(TokioIo<TcpStream>),
    Tunnel(TokioIo<tunnel_stream::TunnelStream>),
}

impl PooledIo {
    fn new(transport: Transport, write_stall: Duration) -> PooledIo {
        let (io, info, slot, span) = match transport {
            Transport::Tcp(stream) => (
                PooledTransport::Tcp(TokioIo::new(stream)),
                ConnInfo::default(),
                None,
                None,
            ),
            Transport::Tunnel {
                io,
                peer,
                slot,
                span,
            } => (
                PooledTransport::Tunnel(TokioIo::new(io)),
                ConnInfo {
                    peer: Some(peer),
                    ..ConnInfo::default()
                },
                Some(slot),
                span,
            ),
        };
        PooledIo {
            io,
            info,
            _slot: slot,
            _span: span,
            writes_dropped: false,
            write_stall,
            stall_timer: None,
            stall_armed: false,
        }
    }

    /// Whether a waiting write has waited its bound out (the timer armed at the first wait).
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.info.control.upgraded() {
            return false;
        }
        let bound = self.write_stall;
        let timer = (self.stall_timer).get_or_insert_with(|| Box::pin(tokio::time::sleep(bound)));
        if !self.stall_armed {
            timer.as_mut().reset(tokio::time::Instant::now() + bound);
            self.stall_armed = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Whether the request on this connection gave it up ([`ConnControl`]): then every write fails.
    fn given_up(&self) -> Option<io::Error> {
        self.info.control.given_up().then(|| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the response is done and the app takes no more of the request's body",
            )
        })
    }

    /// A write's result, with the app's reset or close taken as the end of writing (see
    /// `writes_dropped`); `len`: what the write was given. A write that waits on the app also
    /// waits for its request to give the connection up.
    fn written(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Pending => {
                self.info.control.wake_on_give_up(cx.waker());
                if let Some(e) = self.given_up() {
                    return Poll::Ready(Err(e));
                }
                if self.stalled(cx) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the app took nothing for {:?}", self.write_stall),
                    )));
                }
                Poll::Pending
            }
            Poll::Ready(Ok(n)) => {
                self.stall_armed = false;
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                ) =>
            {
                self.writes_dropped = true;
                Poll::Ready(Ok(len))
            }
            other => other,
        }
    }
}

impl Connection for PooledIo {
    fn connected(&self) -> Connected {
        Connected::new().extra(self.info.clone())
    }
}

impl hyper::rt::Read for PooledIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            PooledTransport::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            PooledTransport::Tunnel(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for PooledIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.given_up() {
            return Poll::Ready(Err(e));
        }
        if this.writes_dropped {
            return Poll::Ready(Ok(buf.len()));
        }
        let result = match &mut this.io {
            PooledTransport::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            PooledTransport::Tunnel(io) => Pin::new(io).poll_write(cx, buf),
        };
        this.written(cx, result, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.given_up() {
            return Poll::Ready(Err(e));
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.writes_dropped {
            return Poll::Ready(Ok(len));
        }
        let result = match &mut this.io {
            PooledTransport::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            PooledTransport::Tunnel(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        };
        this.written(cx, result, len)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            PooledTransport::Tcp(io) => io.is_write_vectored(),
            PooledTransport::Tunnel(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.writes_dropped {
            return Poll::Ready(Ok(()));
        }
        match &mut self.get_mut().io {
            PooledTransport::Tcp(io) => Pin::new(io).poll_flush(cx),
            PooledTransport::Tunnel(io) => Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.writes_dropped {
            return Poll::Ready(Ok(()));
        }
        match &mut self.get_mut().io {
            PooledTransport::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            PooledTransport::Tunnel(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
}

pub(crate) type HttpClient = Client<Connector, RequestBody>;

/// hyper's clients to one kind of upstream, one per HTTP version spoken to it.
pub(crate) struct Clients {
    http1: HttpClient,
    http2: HttpClient,
    /// Never pool: a retry goes out on a freshly dialled connection, since another pooled one
    /// may be just as dead (the keep-alive race).
    http1_fresh: HttpClient,
    http2_fresh: HttpClient,
}

impl Clients {
    /// The pooled client and the fresh one for the HTTP version spoken to the upstream.
    pub(crate) fn pair(&self, http2: bool) -> (&HttpClient, &HttpClient) {
        if http2 {
            (&self.http2, &self.http2_fresh)
        } else {
            (&self.http1, &self.http1_fresh)
        }
    }
}

/// Builds [`Clients`], all alike but for where they dial: one place for hyper's client settings.
#[derive(Clone)]
pub(crate) struct ClientFactory {
    connect: ConnectOptions,
    pool_idle_timeout: Duration,
    title_case: bool,
    /// Mutual TLS to upstreams, when outbound HBONE is on.
    tunneller: Option<Arc<dyn Tunneller>>,
}

impl ClientFactory {
    pub(crate) fn new(
        connect: ConnectOptions,
        pool_idle_timeout: Duration,
        title_case: bool,
        tunneller: Option<Arc<dyn Tunneller>>,
    ) -> ClientFactory {
        ClientFactory {
            connect,
            pool_idle_timeout,
            title_case,
            tunneller,
        }
    }

    /// Clients that dial `fixed` (else the URI's address), through the tunneller when
    /// `tunnelled` and there is one.
    pub(crate) fn build(&self, fixed: Option<SocketAddr>, tunnelled: bool) -> Clients {
        let connector = Connector {
            options: self.connect,
            fixed,
            tunneller: self.tunneller.clone().filter(|_| tunnelled),
        };
        let build = |http2_only: bool, max_idle: usize| {
            Client::builder(TokioExecutor::new())
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(self.pool_idle_timeout)
                .pool_max_idle_per_host(max_idle)
                .retry_canceled_requests(true)
                // The proxy sets Host itself: the client's by default, the app's with --rewrite-host.
                .set_host(false)
                // Names keep the case the client wrote; ours are written in canonical case.
                .http1_preserve_header_case(self.title_case)
                .http1_title_case_headers(self.title_case)
                .http2_only(http2_only)
                .http2_initial_stream_window_size(APP_STREAM_WINDOW)
                .http2_initial_connection_window_size(APP_CONNECTION_WINDOW)
                .build(connector.clone())
        };
        Clients {
            http1: build(false, POOL_MAX_IDLE_PER_UPSTREAM),
            http2: build(true, POOL_MAX_IDLE_PER_UPSTREAM),
            http1_fresh: build(false, 0),
            http2_fresh: build(true, 0),
        }
    }

    /// Whether upstreams are reached in mutual TLS.
    pub(crate) fn tunnels(&self) -> bool {
        self.tunneller.is_some()
    }
}

/// Every way to reach upstreams, built once.
pub(crate) struct Upstreams {
    pub(crate) connect: ConnectOptions,
    /// The fast path's raw HTTP/1.1 connections.
    pub(crate) pool: Arc<Pool>,
    /// hyper's pooled clients to the app and to original destinations in plaintext.
    pub(crate) plain: Clients,
    /// The same through HBONE, when outbound mutual TLS is on: outbound connections served as
    /// HTTP (a port a route balances over endpoints) send each request in a tunnel.
    pub(crate) tunnelled: Option<Clients>,
}

/// Streams an HTTP/2 client may have open at once on one connection (hyper's default, made
/// explicit: the app connection's window is sized from it).
pub(crate) const CLIENT_STREAMS: u32 = 200;

/// HTTP/2 to the app: each stream may hold this much of a response the client has not taken yet.
const APP_STREAM_WINDOW: u32 = 64 * 1024;

/// HTTP/2 to the app: the connection's window outlasts every stream of two clients that stop
/// reading at once ([`CLIENT_STREAMS`] each), so that they cannot take the window the
/// other clients sharing the app connection need (hyper's defaults, 2 MiB a stream and 5 MiB
/// the connection, let three stalled streams stop everyone). It is also what the app connection
/// can buffer: 25 MiB.
const APP_CONNECTION_WINDOW: u32 = 2 * CLIENT_STREAMS * APP_STREAM_WINDOW;

impl Upstreams {
    pub(crate) fn new(factory: ClientFactory) -> Upstreams {
        Upstreams {
            connect: factory.connect,
            pool: Arc::new(Pool::new(factory.pool_idle_timeout)),
            plain: factory.build(None, false),
            tunnelled: factory.tunnels().then(|| factory.build(None, true)),
        }
    }

    /// The clients for a connection's requests: in tunnels when `tunnelled`.
    pub(crate) fn clients(&self, tunnelled: bool) -> &Clients {
        match &self.tunnelled {
            Some(clients) if tunnelled => clients,
            _ => &self.plain,
        }
    }

    pub(crate) async fn connect(&self, addr: SocketAddr) -> io::Result<UpstreamConn> {
        Ok(UpstreamConn::new(connect(addr, self.connect).await?))
    }
}

/// A raw connection to an upstream, with its read buffer.
pub(crate) struct UpstreamConn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    /// Carried a request before: the app may have closed it while it was idle.
    pub(crate) reused: bool,
}

impl UpstreamConn {
    /// A connection just dialled (with [`connect`]'s options).
    pub(crate) fn new(stream: TcpStream) -> UpstreamConn {
        UpstreamConn {
            stream,
            buf: BytesMut::new(),
            reused: false,
        }
    }

    /// Whether the connection can carry a request: nothing unread, nothing arrived since the last
    /// response (a closed or misbehaving connection reads something; a healthy idle one would block).
    pub(crate) fn is_clean(&self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Idle raw connections by address. The fast path touches it when a client connection needs its
/// first upstream connection and when it goes idle or closes, never per request.
pub(crate) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<(UpstreamConn, Instant)>>>,
    idle_timeout: Duration,
}

impl Pool {
    fn new(idle_timeout: Duration) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
        }
    }

    pub(crate) fn checkout(&self, addr: SocketAddr) -> Option<UpstreamConn> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(&addr)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < self.idle_timeout && conn.is_clean() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps a connection for later, if it is clean and there is room.
    pub(crate) fn checkin(&self, addr: SocketAddr, mut conn: UpstreamConn) {
        if !conn.is_clean() {
            return;
        }
        // An idle connection holds no buffer (a few KiB per connection otherwise).
        conn.buf = BytesMut::new();
        conn.reused = true;
        let mut idle = lock(&self.idle);
        let list = idle.entry(addr).or_default();
        if list.len() < POOL_MAX_IDLE_PER_UPSTREAM {
            list.push((conn, Instant::now()));
        }
    }

    /// Closes expired connections and those the app closed; returns how many are left.
    pub(crate) fn reap(&self) -> usize {
        let mut idle = lock(&self.idle);
        idle.retain(|_, list| {
            list.retain(|(conn, since)| since.elapsed() < self.idle_timeout && conn.is_clean());
            !list.is_empty()
        });
        idle.values().map(Vec::len).sum()
    }

    /// Reaps for the life of the process, a few times per idle timeout.
    pub(crate) async fn reap_forever(self: Arc<Self>) {
        let every =
            (self.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            tokio::time::sleep(every).await;
            self.reap();
        }
    }
}
