//! The HTTP/1.1 fast path: plain requests proxied with one read and one write each way.
//!
//! Why hand-written when hyper is right there: profiling the hyper forwarder under wrk showed four
//! syscalls per request (the minimum) but twice nginx's user-space CPU, spent in the client's
//! dispatch channel between tasks, the pool's checkout futures, header maps built and re-encoded,
//! and per-request allocations. Pingora made the same call and parses HTTP/1 itself. Here a
//! request is parsed in place with `httparse`, its head is rewritten into one buffer, and bytes
//! are copied; each client connection keeps its own upstream connection while it lives (no pool
//! traffic per request) and returns it to the pool when it closes.
//!
//! The fast path covers what nearly all traffic is: HTTP/1.1 requests without a body, with a
//! `Content-Length` or with `Transfer-Encoding: chunked`. Everything else (`Upgrade`, `CONNECT`,
//! `Expect`, HTTP/1.0, unusual transfer codings, apps spoken to over HTTP/2) is handed, bytes
//! already read included, to the hyper path for the rest of the connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::proxy::Proxy;
pub mod chunked;
pub mod framing;

use crate::error::{ErrorKind, classify_io};
use crate::proxy::drain::{Phase, wait_for_closing};
use crate::proxy::hyper_path::{ConnContext, Exchange, InFlight, PathText};
use crate::proxy::upstream::connect;
use chunked::{ChunkedTracker, InvalidChunk};

use framing::{
    Framing, InvalidResponse, RequestVerdict, ResponsePlan, Rewrite, plan_request, plan_response,
};

const READ_CHUNK: usize = 16 * 1024;
const UPSTREAM_MAX_HEAD: usize = 64 * 1024;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// hyper's default `header_read_timeout`, which the hyper path uses.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(30);
const POOL_MAX_IDLE_PER_UPSTREAM: usize = 256;

/// A connection to an upstream, with its read buffer.
pub struct UpstreamConn {
    stream: TcpStream,
    buf: BytesMut,
    /// Carried a request before: it may have been closed by the app while idle.
    reused: bool,
}

/// Idle upstream connections, by address. Touched when a client connection opens its first
/// upstream connection and when it closes, never per request.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<(UpstreamConn, Instant)>>>,
}

impl Pool {
    fn checkout(&self, addr: SocketAddr) -> Option<UpstreamConn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(&addr)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() > POOL_IDLE_TIMEOUT {
                continue;
            }
            // A closed or misbehaving idle connection reads something; a healthy one would block.
            let mut probe = [0u8; 1];
            if matches!(conn.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, conn: UpstreamConn) {
        if !conn.buf.is_empty() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(addr).or_default();
        if list.len() < POOL_MAX_IDLE_PER_UPSTREAM {
            list.push((conn, Instant::now()));
        }
    }
}

/// Bytes already read from a stream, served before the stream's own: lets the hyper path take
/// over a connection whose first request the fast path has already read.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// How a client connection served by the fast path ended.
pub enum Outcome {
    Done,
    /// Hand the connection, with the bytes read so far, to the hyper path.
    Fallback(Rewind<TcpStream>),
}

/// Which side a body copy failed on.
enum CopyError {
    Read,
    Write,
    Invalid,
}

impl From<InvalidChunk> for CopyError {
    fn from(_: InvalidChunk) -> Self {
        CopyError::Invalid
    }
}

/// Copies one body from `src` to `dst`. `out` holds a head not yet written: the body's first bytes
/// already in `src_buf` join it so that a small message leaves in one write. Bytes after the body
/// stay in `src_buf` (a pipelined request). `copied` ends as the body's size (without chunk
/// framing), or what was copied before an error.
async fn copy_body(
    src: &mut TcpStream,
    src_buf: &mut BytesMut,
    dst: &mut TcpStream,
    framing: Framing,
    out: &mut Vec<u8>,
    copied: &mut u64,
) -> Result<(), CopyError> {
    *copied = 0;
    let mut tracker = ChunkedTracker::default();
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut pending_head = !out.is_empty();
    loop {
        // Take what belongs to the body from the buffer.
        let take = match framing {
            Framing::None => 0,
            Framing::Length(_) => usize::try_from(remaining)
                .unwrap_or(usize::MAX)
                .min(src_buf.len()),
            Framing::Chunked => match tracker.advance(src_buf)? {
                Some(end) => end,
                None => src_buf.len(),
            },
            Framing::UntilClose => src_buf.len(),
        };
        if pending_head {
            out.extend_from_slice(&src_buf[..take]);
            dst.write_all(out).await.map_err(|_| CopyError::Write)?;
            pending_head = false;
        } else if take > 0 {
            dst.write_all(&src_buf[..take])
                .await
                .map_err(|_| CopyError::Write)?;
        }
        src_buf.advance(take);
        *copied += take as u64;
        let done = match framing {
            Framing::None => true,
            Framing::Length(_) => {
                remaining -= take as u64;
                remaining == 0
            }
            Framing::Chunked => tracker.is_done(),
            Framing::UntilClose => false,
        };
        if done {
            if framing == Framing::Chunked {
                *copied = tracker.payload();
            }
            return Ok(());
        }
        src_buf.reserve(READ_CHUNK);
        match src.read_buf(src_buf).await {
            Ok(0) if framing == Framing::UntilClose => return Ok(()),
            Ok(0) | Err(_) => return Err(CopyError::Read),
            Ok(_) => {}
        }
    }
}

fn error_head(kind: ErrorKind, keep_alive: bool, out: &mut Vec<u8>) {
    use std::io::Write;
    let status = kind.status();
    let body = kind.message();
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nserver: amazing-proxy\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if status == http::StatusCode::SERVICE_UNAVAILABLE {
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// Writes a response the proxy makes itself; the connection closes afterwards unless
/// `keep_alive` (the request had no unread body).
async fn send_error(
    client: &mut TcpStream,
    kind: ErrorKind,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> bool {
    error_head(kind, keep_alive, out);
    let written = client.write_all(out).await.is_ok();
    if written && !keep_alive {
        linger_close(client).await;
    }
    written && keep_alive
}

/// Closing a socket with unread input makes the kernel send a reset, which can destroy the
/// response before the client reads it. So: send FIN, then read and discard what the client is
/// still sending, for a bounded time and amount (nginx's lingering close).
async fn linger_close(client: &mut TcpStream) {
    const LINGER_TIME: Duration = Duration::from_secs(1);
    const LINGER_BYTES: usize = 1024 * 1024;
    let _ = client.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 8192];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

enum HeadError {
    Timeout,
    Upstream(ErrorKind),
    ClientGone,
}

/// Reads the app's response head, skipping interim responses. Meanwhile watches the client: if it
/// goes away the request is abandoned (the upstream connection is dropped, which the app sees).
/// What the response head depends on from its request.
struct Awaiting {
    head_request: bool,
    keep_alive: bool,
    deadline: tokio::time::Instant,
}

async fn read_response_head(
    proxy: &'static Proxy,
    up: &mut UpstreamConn,
    client: &TcpStream,
    client_buf: &mut BytesMut,
    awaiting: Awaiting,
    out: &mut Vec<u8>,
) -> Result<ResponsePlan, HeadError> {
    let Awaiting {
        head_request,
        keep_alive,
        deadline,
    } = awaiting;
    let timeout = tokio::time::sleep_until(deadline);
    let mut timeout = std::pin::pin!(timeout);
    let mut watch_client = true;
    loop {
        if !up.buf.is_empty() {
            match plan_response(
                &up.buf,
                head_request,
                keep_alive,
                !proxy.preserve_header_case,
                out,
            ) {
                Ok(Some(plan)) if plan.interim => {
                    up.buf.advance(plan.head_len);
                    continue;
                }
                Ok(Some(plan)) => return Ok(plan),
                Ok(None) if up.buf.len() > UPSTREAM_MAX_HEAD => {
                    return Err(HeadError::Upstream(ErrorKind::UpstreamProtocol));
                }
                Ok(None) => {}
                Err(InvalidResponse) => {
                    return Err(HeadError::Upstream(ErrorKind::UpstreamProtocol));
                }
            }
        }
        up.buf.reserve(READ_CHUNK);
        tokio::select! {
            biased;
            read = up.stream.read_buf(&mut up.buf) => match read {
                Ok(0) | Err(_) => return Err(HeadError::Upstream(ErrorKind::UpstreamReset)),
                Ok(_) => {}
            },
            ready = client.readable(), if watch_client => {
                if ready.is_err() {
                    return Err(HeadError::ClientGone);
                }
                client_buf.reserve(1024);
                match client.try_read_buf(client_buf) {
                    Ok(0) => return Err(HeadError::ClientGone),
                    // A pipelined request: kept for later; stop watching if the client floods.
                    Ok(_) => watch_client = client_buf.len() < proxy.max_header_bytes,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(HeadError::ClientGone),
                }
            }
            _ = &mut timeout => return Err(HeadError::Timeout),
        }
    }
}

/// Serves a client connection until it closes, or until a request needs the hyper path.
pub async fn serve(
    proxy: &'static Proxy,
    mut client: TcpStream,
    ctx: &Arc<ConnContext>,
    phase: &mut watch::Receiver<Phase>,
) -> Outcome {
    let upstream_addr: SocketAddr = match ctx.upstream.as_str().parse() {
        Ok(a) => a,
        Err(_) => return Outcome::Done,
    };
    let rewrite = Rewrite {
        lowercase_names: !proxy.preserve_header_case,
        host: proxy.rewrite_host.then(|| ctx.upstream.as_str()),
        client_ip: &ctx.client_ip_text,
        via: "amazing-proxy",
    };
    let mut buf = BytesMut::with_capacity(4096);
    let mut head_buf: Vec<u8> = Vec::with_capacity(1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    let mut sticky: Option<UpstreamConn> = None;
    // One waiter for the whole connection: registering a new one per request costs a lock.
    let mut closing_watch = phase.clone();
    let closing_signal = wait_for_closing(&mut closing_watch);
    let mut closing_signal = std::pin::pin!(closing_signal);
    let outcome = 'connection: loop {
        // Read one request head; an idle connection closes when the drain does.
        let plan = loop {
            if !buf.is_empty() {
                match plan_request(&mut buf, &rewrite, &mut head_buf) {
                    Ok(plan) => break plan,
                    Err(RequestVerdict::Partial) if buf.len() < proxy.max_header_bytes => {}
                    Err(RequestVerdict::Partial) => {
                        proxy
                            .metrics
                            .count_error(ctx.direction, ErrorKind::HeadersTooLarge);
                        send_error(&mut client, ErrorKind::HeadersTooLarge, false, &mut out).await;
                        break 'connection Outcome::Done;
                    }
                    Err(RequestVerdict::Invalid | RequestVerdict::Loop) => {
                        proxy
                            .metrics
                            .count_error(ctx.direction, ErrorKind::BadRequest);
                        send_error(&mut client, ErrorKind::BadRequest, false, &mut out).await;
                        break 'connection Outcome::Done;
                    }
                    Err(RequestVerdict::Fallback) => {
                        break 'connection Outcome::Fallback(Rewind::new(
                            buf.split().freeze(),
                            client,
                        ));
                    }
                }
            }
            buf.reserve(4096);
            let read = if buf.is_empty() {
                tokio::select! {
                    biased;
                    _ = &mut closing_signal => break 'connection Outcome::Done,
                    read = client.read_buf(&mut buf) => read,
                }
            } else {
                // A head that started must finish (slowloris); hyper's path has the same bound.
                match tokio::time::timeout(HEAD_READ_TIMEOUT, client.read_buf(&mut buf)).await {
                    Ok(read) => read,
                    Err(_) => break 'connection Outcome::Done,
                }
            };
            match read {
                Ok(0) | Err(_) => break 'connection Outcome::Done,
                Ok(_) => {}
            }
        };
        let start = Instant::now();
        buf.advance(plan.head_len);
        let head_request = plan.method == Method::HEAD;
        let mut exchange = Exchange::new(
            proxy,
            ctx.clone(),
            start,
            plan.method,
            http::Version::HTTP_11,
            PathText::Raw(plan.path),
            plan.request_id,
        );
        let has_body = plan.framing != Framing::None;
        let Some(in_flight) = InFlight::acquire(&proxy.in_flight, proxy.max_in_flight) else {
            let keep = send_error(
                &mut client,
                ErrorKind::Overloaded,
                !has_body && plan.keep_alive,
                &mut out,
            )
            .await;
            exchange.finish_with_error(ErrorKind::Overloaded);
            if keep { continue } else { break Outcome::Done }
        };
        exchange.hold(in_flight);

        // A body already in the buffer travels with the head, and can be sent again.
        let inline_body = match plan.framing {
            Framing::None => Some(0),
            Framing::Length(n) if n <= buf.len() as u64 => usize::try_from(n).ok(),
            _ => None,
        };
        if let Some(n) = inline_body {
            head_buf.extend_from_slice(&buf[..n]);
            buf.advance(n);
            exchange.request_bytes = n as u64;
        }
        let mut attempt = 0;
        let (mut up, response) = loop {
            attempt += 1;
            let mut up = match sticky
                .take()
                .or_else(|| proxy.h1_pool.checkout(upstream_addr))
            {
                Some(up) => up,
                None => match connect(upstream_addr, proxy.connect_options).await {
                    Ok(stream) => UpstreamConn {
                        stream,
                        buf: BytesMut::with_capacity(4096),
                        reused: false,
                    },
                    Err(e) => {
                        let kind = classify_io(&e, true);
                        let keep = inline_body.is_some() && plan.keep_alive;
                        let keep = send_error(&mut client, kind, keep, &mut out).await;
                        exchange.finish_with_error(kind);
                        if keep {
                            continue 'connection;
                        } else {
                            break 'connection Outcome::Done;
                        }
                    }
                },
            };
            // The keep-alive race: the app closed this idle connection as the request left.
            // The request never reached the app, so it goes again, once, on a new connection.
            let retry_allowed = up.reused && inline_body.is_some() && attempt == 1;
            let sent = if inline_body.is_some() {
                up.stream
                    .write_all(&head_buf)
                    .await
                    .map_err(|_| CopyError::Write)
            } else {
                copy_body(
                    &mut client,
                    &mut buf,
                    &mut up.stream,
                    plan.framing,
                    &mut head_buf,
                    &mut exchange.request_bytes,
                )
                .await
            };
            match sent {
                Ok(()) => {}
                Err(CopyError::Write) if retry_allowed => continue,
                Err(e) => {
                    let kind = match e {
                        CopyError::Write => ErrorKind::UpstreamReset,
                        CopyError::Read | CopyError::Invalid => ErrorKind::ClientBody,
                    };
                    send_error(&mut client, kind, false, &mut out).await;
                    exchange.finish_with_error(kind);
                    break 'connection Outcome::Done;
                }
            }
            let deadline = tokio::time::Instant::from_std(start) + proxy.response_timeout;
            let awaiting = Awaiting {
                head_request,
                keep_alive: plan.keep_alive,
                deadline,
            };
            let head = read_response_head(proxy, &mut up, &client, &mut buf, awaiting, &mut out);
            let kind = match head.await {
                Ok(plan) => break (up, plan),
                Err(HeadError::Upstream(ErrorKind::UpstreamReset))
                    if retry_allowed && up.buf.is_empty() =>
                {
                    tracing::debug!(upstream = %upstream_addr, "pooled connection closed by the app; retrying on a new one");
                    continue;
                }
                Err(HeadError::Upstream(kind)) => kind,
                Err(HeadError::Timeout) => ErrorKind::ResponseTimeout,
                Err(HeadError::ClientGone) => {
                    exchange.finish_with_error(ErrorKind::ClientDisconnected);
                    break 'connection Outcome::Done;
                }
            };
            // The upstream connection is dropped: it may still carry the late answer.
            let keep = send_error(&mut client, kind, plan.keep_alive, &mut out).await;
            exchange.finish_with_error(kind);
            if keep {
                continue 'connection;
            } else {
                break 'connection Outcome::Done;
            }
        };

        // The response, head and body.
        let closing = *phase.borrow() == Phase::Closing;
        if closing && response.keep_alive {
            // Draining: this response is the connection's last.
            let at = out.len() - 2;
            out.splice(at..at, b"connection: close\r\n".iter().copied());
        }
        exchange.status = response.status;
        exchange.grpc_status = response.grpc_status;
        up.buf.advance(response.head_len);
        let copied = copy_body(
            &mut up.stream,
            &mut up.buf,
            &mut client,
            response.framing,
            &mut out,
            &mut exchange.response_bytes,
        )
        .await;
        match copied {
            Ok(_) => exchange.finish(None),
            Err(CopyError::Write) => {
                exchange.finish(Some(ErrorKind::ClientDisconnected));
                break Outcome::Done;
            }
            Err(_) => {
                exchange.finish(Some(ErrorKind::UpstreamBody));
                break Outcome::Done;
            }
        }
        if response.upstream_reusable {
            up.reused = true;
            sticky = Some(up);
        }
        if !response.keep_alive || closing {
            break Outcome::Done;
        }
    };
    if let Some(up) = sticky {
        proxy.h1_pool.checkin(upstream_addr, up);
    }
    outcome
}
