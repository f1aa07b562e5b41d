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
use http::header::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Proxy;
use super::chunked::{ChunkedTracker, InvalidChunk};
use super::drain::{Phase, wait_for_closing};
use super::error::{ErrorKind, classify_io};
use super::headers::new_request_id;
use super::http::{ConnContext, Exchange, InFlight, PathText};
use super::upstream::connect;

const MAX_HEADERS: usize = 100;
const READ_CHUNK: usize = 16 * 1024;
const UPSTREAM_MAX_HEAD: usize = 64 * 1024;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// hyper's default `header_read_timeout`, which the hyper path uses.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(30);
const POOL_MAX_IDLE_PER_UPSTREAM: usize = 256;

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// No length: the body ends when the sender closes (responses only).
    UntilClose,
}

/// What the request head says, once rewritten for the app into `out`.
#[derive(Debug)]
pub struct RequestPlan {
    pub head_len: usize,
    pub method: Method,
    pub path: String,
    pub framing: Framing,
    pub keep_alive: bool,
    pub request_id: HeaderValue,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// More bytes needed.
    Partial,
    /// Valid, but for the hyper path.
    Fallback,
    Invalid,
}

/// Options of the head rewriting that come from configuration.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite<'a> {
    pub preserve_case: bool,
    /// `Some(app address)` with --rewrite-host.
    pub host: Option<&'a str>,
    /// The client's IP as text, for x-forwarded-for.
    pub client_ip: &'a str,
}

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

fn push_name(out: &mut Vec<u8>, name: &str, preserve_case: bool) {
    if preserve_case {
        out.extend_from_slice(name.as_bytes());
    } else {
        out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    }
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

/// Parses a request head at the start of `buf` and writes the head to send to the app into `out`:
/// hop-by-hop fields removed (RFC 9110 7.6.1), `x-forwarded-for` appended, `x-forwarded-proto`
/// and `x-request-id` added when missing, Host rewritten on request. Pure: no I/O.
// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
pub fn plan_request(
    buf: &[u8],
    rw: &Rewrite<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestPlan, RequestVerdict> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(RequestVerdict::Partial),
        Err(_) => return Err(RequestVerdict::Invalid),
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        // HTTP/1.0 keep-alive rules and the like: hyper's.
        return Err(RequestVerdict::Fallback);
    };
    if method == "CONNECT" {
        return Err(RequestVerdict::Fallback);
    }

    let mut framing = Framing::None;
    let mut keep_alive = true;
    let mut request_id = None;
    let mut forwarded_for: Option<&[u8]> = None;
    let mut forwarded_proto = false;
    let mut connection_listed: [&[u8]; 8] = [&[]; 8];
    let mut listed = 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(RequestVerdict::Invalid)?;
            match framing {
                Framing::Length(prev) if prev != len => return Err(RequestVerdict::Invalid),
                Framing::Chunked => return Err(RequestVerdict::Fallback),
                _ => framing = Framing::Length(len),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") || framing != Framing::None {
                return Err(RequestVerdict::Fallback);
            }
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if listed < connection_listed.len() {
                    connection_listed[listed] = token;
                    listed += 1;
                } else {
                    return Err(RequestVerdict::Fallback);
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Err(RequestVerdict::Fallback);
        }
    }
    if framing == Framing::Length(0) {
        framing = Framing::None;
    }

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        if is_hop_by_hop(name) {
            if name.eq_ignore_ascii_case("te")
                && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers"))
            {
                out.extend_from_slice(b"te: trailers\r\n");
            }
            continue;
        }
        if connection_listed[..listed]
            .iter()
            .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = Some(h.value);
            continue;
        }
        if rw.host.is_some() && name.eq_ignore_ascii_case("host") {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-proto") {
            forwarded_proto = true;
        } else if name.eq_ignore_ascii_case("x-request-id") {
            request_id = HeaderValue::from_bytes(h.value).ok();
        }
        push_name(out, name, rw.preserve_case);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(host) = rw.host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = forwarded_for.filter(|p| !p.is_empty()) {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(rw.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !forwarded_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    let request_id = match request_id {
        Some(id) => id,
        None => {
            let id = new_request_id();
            out.extend_from_slice(b"x-request-id: ");
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\r\n");
            id
        }
    };
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(RequestPlan {
        head_len,
        method: Method::from_bytes(method.as_bytes()).map_err(|_| RequestVerdict::Invalid)?,
        path: path.to_owned(),
        framing,
        keep_alive,
        request_id,
    })
}

/// The app's response head cannot be parsed or framed.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidResponse;

#[derive(Debug, PartialEq, Eq)]
pub struct ResponsePlan {
    pub head_len: usize,
    pub status: u16,
    /// An interim (1xx) response to skip: the app sent `100 Continue` unasked.
    pub interim: bool,
    pub framing: Framing,
    /// The app's connection can carry another request afterwards.
    pub upstream_reusable: bool,
    /// The client's connection stays open afterwards.
    pub keep_alive: bool,
    pub grpc_status: Option<u16>,
}

/// Parses the app's response head and writes the head for the client into `out`: hop-by-hop
/// fields removed, `Server: amazing-proxy`, `Connection: close` when the client's connection ends
/// with this response. `Ok(None)` while more bytes are needed. Pure: no I/O.
// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
pub fn plan_response(
    buf: &[u8],
    head_request: bool,
    keep_alive: bool,
    preserve_case: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponsePlan>, InvalidResponse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(InvalidResponse),
    };
    let status = res.code.ok_or(InvalidResponse)?;
    if status == 101 {
        // Never asked for on this path (upgrades go to hyper).
        return Err(InvalidResponse);
    }
    if (100..200).contains(&status) {
        return Ok(Some(ResponsePlan {
            head_len,
            status,
            interim: true,
            framing: Framing::None,
            upstream_reusable: true,
            keep_alive,
            grpc_status: None,
        }));
    }
    let mut framing = Framing::UntilClose;
    let mut upstream_reusable = res.version == Some(1);
    let mut grpc_status = None;
    let mut connection_listed: [&[u8]; 8] = [&[]; 8];
    let mut listed = 0;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(InvalidResponse)?;
            match framing {
                Framing::Length(prev) if prev != len => return Err(InvalidResponse),
                Framing::Chunked => {}
                _ => framing = Framing::Length(len),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
            {
                return Err(InvalidResponse);
            }
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_reusable = false;
                } else if listed < connection_listed.len() {
                    connection_listed[listed] = token;
                    listed += 1;
                }
            }
        } else if h.name.eq_ignore_ascii_case("grpc-status") {
            grpc_status = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.parse().ok());
        }
    }
    if head_request || status == 204 || status == 304 || framing == Framing::Length(0) {
        framing = Framing::None;
    }
    if framing == Framing::UntilClose {
        upstream_reusable = false;
    }
    let keep_alive = keep_alive && framing != Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        let name = h.name;
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case("server")
            || connection_listed[..listed]
                .iter()
                .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        push_name(out, name, preserve_case);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if preserve_case {
        b"Server: amazing-proxy\r\n"
    } else {
        b"server: amazing-proxy\r\n"
    });
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponsePlan {
        head_len,
        status,
        interim: false,
        framing,
        upstream_reusable,
        keep_alive,
        grpc_status,
    }))
}

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
                proxy.preserve_header_case,
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
// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
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
        preserve_case: proxy.preserve_header_case,
        host: proxy.rewrite_host.then(|| ctx.upstream.as_str()),
        client_ip: &ctx.client_ip_text,
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
                match plan_request(&buf, &rewrite, &mut head_buf) {
                    Ok(plan) => break plan,
                    Err(RequestVerdict::Partial) if buf.len() < proxy.max_header_bytes => {}
                    Err(RequestVerdict::Partial) => {
                        proxy
                            .metrics
                            .count_error(ctx.direction, ErrorKind::HeadersTooLarge);
                        send_error(&mut client, ErrorKind::HeadersTooLarge, false, &mut out).await;
                        break 'connection Outcome::Done;
                    }
                    Err(RequestVerdict::Invalid) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite() -> Rewrite<'static> {
        Rewrite {
            preserve_case: false,
            host: None,
            client_ip: "198.18.0.1",
        }
    }

    fn plan(input: &str, rw: &Rewrite<'_>) -> (Result<RequestPlan, RequestVerdict>, String) {
        let mut out = Vec::new();
        let r = plan_request(input.as_bytes(), rw, &mut out);
        (r, String::from_utf8(out).expect("utf8"))
    }

    #[test]
    fn request_head_is_rewritten_for_the_app() {
        let (r, out) = plan(
            "GET /get?query=param HTTP/1.1\r\nHost: pod\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\ntraceparent: 00-1-2-01\r\nX-Request-Id: given\r\n\r\nNEXT",
            &rewrite(),
        );
        let plan = r.expect("plan");
        assert_eq!(plan.head_len, "GET /get?query=param HTTP/1.1\r\nHost: pod\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\ntraceparent: 00-1-2-01\r\nX-Request-Id: given\r\n\r\n".len());
        assert_eq!(plan.framing, Framing::None);
        assert!(plan.keep_alive);
        assert_eq!(plan.request_id, "given");
        assert_eq!(
            out,
            "GET /get?query=param HTTP/1.1\r\nhost: pod\r\nte: trailers\r\ntraceparent: 00-1-2-01\r\nx-request-id: given\r\nx-forwarded-for: 198.18.0.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn case_is_kept_when_asked_and_host_rewritten() {
        let rw = Rewrite {
            preserve_case: true,
            host: Some("127.0.0.1:80"),
            ..rewrite()
        };
        let (r, out) = plan(
            "POST /post HTTP/1.1\r\nHost: pod\r\nX-Custom-Header: A\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
            &rw,
        );
        let plan = r.expect("plan");
        assert_eq!(plan.framing, Framing::Length(4));
        assert!(!plan.keep_alive);
        assert!(out.starts_with("POST /post HTTP/1.1\r\nX-Custom-Header: A\r\nX-Forwarded-Proto: https\r\nContent-Length: 4\r\nhost: 127.0.0.1:80\r\nx-forwarded-for: 203.0.113.9, 198.18.0.1\r\nx-request-id: "), "{out}");
    }

    #[test]
    fn unusual_requests_go_to_hyper() {
        for input in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert_eq!(
                plan(input, &rewrite()).0.err(),
                Some(RequestVerdict::Fallback),
                "{input}"
            );
        }
    }

    #[test]
    fn malformed_and_partial_requests() {
        assert_eq!(
            plan("GET / HTTP/1.1\r\nHost: a\r\n", &rewrite()).0.err(),
            Some(RequestVerdict::Partial)
        );
        assert_eq!(
            plan("GET / HTTP/1.1\r\nBad Header\r\n\r\n", &rewrite())
                .0
                .err(),
            Some(RequestVerdict::Invalid)
        );
        assert_eq!(
            plan(
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &rewrite()
            )
            .0
            .err(),
            Some(RequestVerdict::Invalid)
        );
        assert_eq!(
            plan("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", &rewrite())
                .0
                .err(),
            Some(RequestVerdict::Invalid)
        );
    }

    fn response(input: &str, head: bool, keep_alive: bool) -> (ResponsePlan, String) {
        let mut out = Vec::new();
        let plan = plan_response(input.as_bytes(), head, keep_alive, false, &mut out)
            .expect("valid")
            .expect("complete");
        (plan, String::from_utf8(out).expect("utf8"))
    }

    #[test]
    fn response_head_gets_our_server_and_loses_hop_by_hop() {
        let (plan, out) = response(
            "HTTP/1.1 429 TOO MANY REQUESTS\r\nServer: gunicorn\r\nConnection: keep-alive\r\nContent-Length: 0\r\nX-App: 1\r\n\r\n",
            false,
            true,
        );
        assert_eq!(plan.status, 429);
        assert_eq!(plan.framing, Framing::None);
        assert!(plan.upstream_reusable && plan.keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 429 TOO MANY REQUESTS\r\ncontent-length: 0\r\nx-app: 1\r\nserver: amazing-proxy\r\n\r\n"
        );
    }

    #[test]
    fn response_framing() {
        let (p, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert!(out.contains("transfer-encoding: chunked\r\n"));
        let (p, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true, true);
        assert_eq!(p.framing, Framing::None);
        let (p, out) = response("HTTP/1.1 200 OK\r\n\r\n", false, true);
        assert_eq!(p.framing, Framing::UntilClose);
        assert!(!p.upstream_reusable && !p.keep_alive);
        assert!(out.ends_with("connection: close\r\n\r\n"));
        let (p, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
            true,
        );
        assert!(!p.upstream_reusable && p.keep_alive);
        let (p, _) = response("HTTP/1.1 100 Continue\r\n\r\n", false, true);
        assert!(p.interim);
        let (p, _) = response(
            "HTTP/1.1 200 OK\r\ngrpc-status: 7\r\nContent-Length: 0\r\n\r\n",
            false,
            true,
        );
        assert_eq!(p.grpc_status, Some(7));
    }
}
