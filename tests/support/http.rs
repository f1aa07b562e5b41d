//! HTTP for the tests: clients (hyper, one request or a kept-open connection), the in-process
//! test app, and ports that refuse or hang. Every wait is bounded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use super::{WAIT, bounded, eventually};

// ---------------------------------------------------------------------------------------------
// Clients

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn get_request(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::new())
        .expect("GET request")
}

pub fn full_request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &str,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("request with a body")
}

/// One HTTP/1.1 connection, kept open for several requests.
pub struct H1Conn<B> {
    sender: hyper::client::conn::http1::SendRequest<B>,
}

impl<B> H1Conn<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = bounded("connect", WAIT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        H1Conn { sender }
    }

    /// Sends a request; returns the response with its body unread. Not bounded: the caller
    /// bounds it (an upload's response head comes after the whole body).
    pub async fn request(&mut self, req: Request<B>) -> Response<Incoming> {
        self.sender.ready().await.expect("connection ready");
        self.sender.send_request(req).await.expect("send request")
    }

    /// Sends a request and reads the whole response, within [`WAIT`].
    pub async fn send(&mut self, req: Request<B>) -> Reply {
        let response = bounded("response head", WAIT, self.request(req)).await;
        read_reply(response).await
    }
}

pub async fn read_reply(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = bounded("response body", WAIT, body.collect())
        .await
        .expect("read the response body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends one request on a new HTTP/1.1 connection.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Reply
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    H1Conn::connect(addr).await.send(req).await
}

// ---------------------------------------------------------------------------------------------
// The in-process test app

/// What the test app has seen.
#[derive(Default)]
pub struct AppState {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
    /// `/slow` and `/hang` requests that reached their handler.
    pub started: AtomicUsize,
    /// `/hang` requests whose handler was dropped before answering.
    pub cancelled: AtomicUsize,
}

/// Aborts a task when dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A hyper 1.x app on 127.0.0.1:0. Routes:
/// - anything not below: echo, a JSON object with `method`, `uri`, `version`, `connection` (the id
///   of the TCP connection), `headers` (list of `[name, value]` as received), `body_len`,
///   `body_hash` (FNV-1a 64, hex) and `body` (the first 64 KiB, lossy UTF-8); the body is read as
///   a stream, never whole;
/// - `/status/N`: status N;
/// - `/slow?ms=N`: answers after N ms;
/// - `/stream?bytes=N`: N bytes of [`pattern`] in 64 KiB chunks, chunked, generated as they go;
/// - `/drip?chunks=N&ms=M`: N lines `drip i\n`, one every M ms;
/// - `/hang`: never answers; counts in `cancelled` when its handler is dropped;
/// - `/hop-headers`: answers with hop-by-hop fields (`Connection: x-app-hop`, `X-App-Hop`,
///   `Keep-Alive`, `Upgrade`, `Proxy-Connection`) and an end-to-end `X-App: yes`.
pub struct TestApp {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    _task: AbortOnDrop,
}

impl TestApp {
    pub async fn start() -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test app");
        TestApp::serve(listener)
    }

    pub fn serve(listener: TcpListener) -> TestApp {
        let addr = listener.local_addr().expect("test app address");
        let state = Arc::new(AppState::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| route(state.clone(), id, req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestApp {
            addr,
            state,
            _task: AbortOnDrop(task),
        }
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

pub type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> AppBody {
    Full::new(body.into()).boxed()
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

/// 64 KiB of a recognisable pattern, shared by every chunk the tests send or the app streams.
pub fn pattern() -> Bytes {
    static PATTERN: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    PATTERN
        .get_or_init(|| (0..64 * 1024).map(|i| (i % 251) as u8).collect())
        .clone()
}

/// A body of `total` bytes of [`pattern`], generated chunk by chunk.
pub fn pattern_body(
    total: u64,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
    let chunks = futures_util::stream::unfold(total, |left| async move {
        if left == 0 {
            return None;
        }
        let chunk = pattern();
        let n = left.min(chunk.len() as u64);
        Some((Ok(Frame::data(chunk.slice(..n as usize))), left - n))
    });
    StreamBody::new(chunks)
}

/// FNV-1a 64, updated chunk by chunk.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    pub fn hex(data: &[u8]) -> String {
        let mut h = Fnv::default();
        h.update(data);
        format!("{:016x}", h.0)
    }
}

struct CancelGuard {
    state: Arc<AppState>,
    answered: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn route(
    state: Arc<AppState>,
    connection: usize,
    req: Request<Incoming>,
) -> Result<Response<AppBody>, Infallible> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_owned();
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
        let mut r = Response::new(full(format!("status {code}\n")));
        *r.status_mut() = status;
        return Ok(r);
    }
    match path.as_str() {
        "/slow" => {
            state.started.fetch_add(1, Ordering::SeqCst);
            let ms = query(&req, "ms").unwrap_or(1000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(Response::new(full(format!("slept {ms}ms\n"))))
        }
        "/stream" => {
            let total = query(&req, "bytes").unwrap_or(0);
            Ok(Response::new(pattern_body(total).boxed()))
        }
        "/drip" => {
            let chunks = query(&req, "chunks").unwrap_or(10);
            let ms = query(&req, "ms").unwrap_or(100);
            let drip = futures_util::stream::unfold(0u64, move |i| async move {
                if i == chunks {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let line = Bytes::from(format!("drip {i}\n"));
                Some((Ok::<_, Infallible>(Frame::data(line)), i + 1))
            });
            Ok(Response::new(StreamBody::new(drip).boxed()))
        }
        "/hang" => {
            state.started.fetch_add(1, Ordering::SeqCst);
            let _guard = CancelGuard {
                state: state.clone(),
                answered: false,
            };
            std::future::pending::<()>().await;
            unreachable!("pending() never resolves")
        }
        "/hop-headers" => Ok(Response::builder()
            .header("connection", "x-app-hop")
            .header("x-app-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("upgrade", "h2c")
            .header("x-app", "yes")
            .body(full("hop\n"))
            .expect("hop-headers response")),
        _ => Ok(echo(connection, req).await),
    }
}

/// A header map as `[name, value]` pairs, in order, repeated names kept.
pub fn header_pairs(headers: &HeaderMap) -> Vec<Value> {
    headers
        .iter()
        .map(|(k, v)| json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect()
}

async fn echo(connection: usize, req: Request<Incoming>) -> Response<AppBody> {
    let (parts, mut body) = req.into_parts();
    let mut len = 0u64;
    let mut hash = Fnv::default();
    let mut head = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            let mut r = Response::new(full("request body broke off\n"));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        };
        if let Some(data) = frame.data_ref() {
            len += data.len() as u64;
            hash.update(data);
            let room = (64 * 1024usize).saturating_sub(head.len());
            head.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    let answer = json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "connection": connection,
        "headers": header_pairs(&parts.headers),
        "body_len": len,
        "body_hash": format!("{:016x}", hash.0),
        "body": String::from_utf8_lossy(&head),
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-app", "echo")
        .body(full(answer.to_string()))
        .expect("echo response")
}

/// The values the echo saw for header `name` (lower case).
pub fn echoed_header(echo: &Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("echo headers")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Every header the echo saw, by name, with the last value.
pub fn echoed_headers(echo: &Value) -> BTreeMap<String, String> {
    echo["headers"]
        .as_array()
        .expect("echo headers")
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap_or_default().to_owned(),
                p[1].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Ports that refuse or hang

/// A port on 127.0.0.1 that nothing listens on: bound, so the kernel never hands it to anyone else
/// (neither a `bind` to port 0 nor an outgoing connection picks a port another socket has bound),
/// but not listening, so connections to it are refused. Call `listen` to bring the app "up", or
/// give [`Self::port`] to a server the test starts and keep this alive meanwhile: bound with
/// `SO_REUSEADDR`, it lets a socket that sets `SO_REUSEADDR` too (tokio, gunicorn, redis-server,
/// mariadbd and Python's `http.server` all do) bind the same address explicitly, also when that
/// server restarts. A port bound, released and then handed on (a "free port") can be taken by
/// someone else in between.
pub struct ReservedPort {
    socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("create a socket");
        socket
            .set_reuse_address(true)
            .expect("SO_REUSEADDR on the reserved port");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        socket.bind(&any.into()).expect("bind a reserved port");
        let addr = socket
            .local_addr()
            .expect("reserved address")
            .as_socket()
            .expect("an IP address");
        ReservedPort { socket, addr }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Starts listening: the reserved port becomes a [`TestApp`].
    pub fn listen(self) -> TestApp {
        self.socket
            .listen(128)
            .expect("listen on the reserved port");
        self.socket
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let std: std::net::TcpListener = self.socket.into();
        TestApp::serve(TcpListener::from_std(std).expect("tokio listener"))
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// A listener whose accept queue is full and never drained: Linux drops further SYNs, so
/// connecting to it hangs until the caller's timeout. Keep it alive for as long as needed.
pub struct BlackHole {
    _listener: socket2::Socket,
    _queued: Vec<std::net::TcpStream>,
    pub addr: SocketAddr,
}

impl BlackHole {
    pub fn new() -> BlackHole {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("create a socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&any.into()).expect("bind the black hole");
        listener.listen(0).expect("listen with backlog 0");
        let addr = listener
            .local_addr()
            .expect("black hole address")
            .as_socket()
            .expect("an IP address");
        let mut queued = Vec::new();
        for _ in 0..64 {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => queued.push(s),
                Err(_) => {
                    return BlackHole {
                        _listener: listener,
                        _queued: queued,
                        addr,
                    };
                }
            }
        }
        panic!("the accept queue of {addr} never filled up");
    }
}

impl Default for BlackHole {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits until something accepts TCP connections on `addr` (a server started as a process).
pub async fn wait_listening(addr: SocketAddr, limit: Duration) {
    eventually("something to listen", limit, || async move {
        TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("{addr}: {e}"))
    })
    .await
}

/// A deterministic payload of `len` bytes that is not all one value.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

/// An HTTP/2 client (prior knowledge) of `addr`, its connection driven on a task of its own.
pub async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.expect("ready")
}

/// Sends `total` bytes of `x` on `body` in chunks of `chunk` as flow control lets them go, the
/// last ending the stream: how many went before the peer ended the stream (`total` if none).
pub async fn h2_upload(mut body: h2::SendStream<Bytes>, total: usize, chunk: usize) -> usize {
    let data = Bytes::from(vec![b'x'; chunk]);
    let mut sent = 0;
    while sent < total {
        let n = chunk.min(total - sent);
        body.reserve_capacity(n);
        match std::future::poll_fn(|cx| body.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            _ => return sent,
        }
        if body.send_data(data.slice(..n), sent + n == total).is_err() {
            return sent;
        }
        sent += n;
    }
    sent
}

/// An HTTP/2 response within `WAIT`: its status and its body (up to an error, if one cuts it).
pub async fn h2_response(response: h2::client::ResponseFuture) -> (u16, Vec<u8>) {
    let response = bounded("the answer", WAIT, response)
        .await
        .expect("a response");
    let status = response.status().as_u16();
    let mut recv = response.into_body();
    let mut got = Vec::new();
    while let Some(Ok(chunk)) = bounded("the body", WAIT, recv.data()).await {
        got.extend_from_slice(&chunk);
    }
    (status, got)
}

/// Starts a POST of `length` bytes (its `content-length`) to `url` on `client`: the response to
/// come, and the stream to send the body on.
pub fn h2_post(
    client: &mut h2::client::SendRequest<Bytes>,
    url: &str,
    length: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let request = Request::post(url)
        .header("content-length", length)
        .body(())
        .expect("a request");
    client.send_request(request, false).expect("send")
}
