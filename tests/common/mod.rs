//! Shared harness for the integration tests: starts the real `amazing-proxy run` binary on
//! 127.0.0.1 port 0, test upstreams (an in-process hyper app and raw TCP servers) and small HTTP
//! clients. Every wait is bounded; every process is killed and reaped on drop.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound for a whole test body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for one wait inside a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Runs `f`, failing the test with `what` if it takes longer than `limit`.
pub async fn bounded<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing with `what` after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    bounded(what, limit, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_amazing-proxy")
}

type Shared = Arc<Mutex<Vec<u8>>>;

fn text_of(buf: &Shared) -> String {
    let bytes = buf.lock().unwrap_or_else(|p| p.into_inner()).clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn capture(mut from: impl Read + Send + 'static, into: Shared) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match from.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
    });
}

/// A `Command` for the binary with the harness's environment: no inherited `AMAZING_PROXY_*`
/// variables, `AMAZING_PROXY_LOG=info`.
pub fn command() -> Command {
    let mut cmd = Command::new(bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AMAZING_PROXY_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AMAZING_PROXY_LOG", "info");
    cmd
}

/// `amazing-proxy run` in front of `app`.
pub struct ProxyBuilder {
    app: SocketAddr,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl ProxyBuilder {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub async fn start(self) -> Proxy {
        let mut cmd = command();
        cmd.arg("run")
            .args(["--inbound", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--outbound", "off", "--app"])
            .arg(self.app.to_string())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn amazing-proxy run");
        let stdout = Shared::default();
        let stderr = Shared::default();
        capture(child.stdout.take().expect("child stdout"), stdout.clone());
        capture(child.stderr.take().expect("child stderr"), stderr.clone());
        let mut proxy = Proxy {
            pid: child.id(),
            child,
            inbound: "0.0.0.0:0".parse().expect("placeholder address"),
            admin: "0.0.0.0:0".parse().expect("placeholder address"),
            app: self.app,
            stdout,
            stderr,
        };
        let (inbound, admin) = eventually("the proxy's `listening` line", WAIT, || {
            let found = proxy.listening_line();
            if found.is_none()
                && let Ok(Some(status)) = proxy.child.try_wait()
            {
                panic!(
                    "amazing-proxy exited with {status} before listening; stderr:\n{}",
                    proxy.stderr()
                );
            }
            async move { found }
        })
        .await;
        proxy.inbound = inbound;
        proxy.admin = admin;
        proxy
    }
}

/// A running proxy. Killed and reaped on drop.
pub struct Proxy {
    child: Child,
    pub pid: u32,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub app: SocketAddr,
    stdout: Shared,
    stderr: Shared,
}

impl Proxy {
    pub fn builder(app: SocketAddr) -> ProxyBuilder {
        ProxyBuilder {
            app,
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    pub async fn start(app: SocketAddr, args: &[&str]) -> Proxy {
        Proxy::builder(app).args(args.iter().copied()).start().await
    }

    /// Parses `listening inbound=IP:PORT outbound=off admin=IP:PORT app=...`.
    fn listening_line(&self) -> Option<(SocketAddr, SocketAddr)> {
        let text = self.stderr();
        let line = text.lines().find(|l| l.contains("listening"))?;
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        Some((field("inbound=")?, field("admin=")?))
    }

    /// Everything the proxy wrote to stdout (the access log) so far.
    pub fn stdout(&self) -> String {
        text_of(&self.stdout)
    }

    /// Everything the proxy wrote to stderr (diagnostics) so far.
    pub fn stderr(&self) -> String {
        text_of(&self.stderr)
    }

    /// Waits until the access log satisfies `pred`; returns the whole access log then.
    pub async fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let outcome = tokio::time::timeout(timeout, async {
            loop {
                let text = self.stdout();
                if pred(&text) {
                    return text;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match outcome {
            Ok(text) => text,
            Err(_) => panic!(
                "access log never matched within {timeout:?}; stdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            ),
        }
    }

    /// The JSON access-log records written so far (lines that are not JSON fail the test).
    pub fn json_records(&self) -> Vec<Value> {
        self.stdout()
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("access log line {l:?}: {e}"))
            })
            .collect()
    }

    /// Waits for the JSON access-log record whose `request_id` is `id`.
    pub async fn json_record(&self, id: &str) -> Value {
        let has = |text: &str| text.lines().any(|l| l.contains(&format!("\"{id}\"")));
        self.wait_for_log(has, WAIT).await;
        self.json_records()
            .into_iter()
            .find(|r| r["request_id"] == id)
            .unwrap_or_else(|| panic!("no record with request_id {id} in\n{}", self.stdout()))
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        send(self.admin, get_request(self.admin, path)).await
    }

    pub async fn admin_post(&self, path: &str) -> Reply {
        let req = Request::post(path)
            .header("host", self.admin.to_string())
            .body(Empty::<Bytes>::new())
            .expect("admin POST request");
        send(self.admin, req).await
    }

    pub async fn metrics(&self) -> String {
        let reply = self.admin_get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK, "GET /metrics");
        reply.text()
    }

    /// GET `path` through the proxy on a new connection.
    pub async fn get(&self, path: &str) -> Reply {
        send(self.inbound, get_request(self.inbound, path)).await
    }

    /// Sends a signal with the `kill` command (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let outcome = tokio::time::timeout(timeout, async {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait on the proxy") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match outcome {
            Ok(status) => status,
            Err(_) => panic!(
                "the proxy did not exit within {timeout:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Peak resident set size (VmHWM) in bytes, from /proc.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/PID/status of the proxy");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/PID/status");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmHWM value in kB");
        kib * 1024
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `name{labels...}` whose labels include every `label="value"` given.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            return None;
        }
        let (series, value) = rest.rsplit_once(' ')?;
        if !labels.iter().all(|l| series.contains(l)) {
            return None;
        }
        value.parse().ok()
    })
}

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

/// Writes `request` on a new TCP connection and reads until the server closes it.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("raw connect");
    stream.write_all(request).await.expect("raw write");
    let mut out = Vec::new();
    bounded(
        "the server closing a raw connection",
        WAIT,
        stream.read_to_end(&mut out),
    )
    .await
    .expect("raw read");
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a Content-Length body from a raw connection; returns head and body.
pub async fn raw_read_response(stream: &mut TcpStream) -> (String, Vec<u8>) {
    bounded("a raw response", WAIT, async {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("raw read head");
            assert!(n > 0, "connection closed inside a response head: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        let mut body = buf[head_end..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("raw read body");
            assert!(n > 0, "connection closed inside a response body");
            body.extend_from_slice(&chunk[..n]);
        }
        (head, body)
    })
    .await
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
// Raw TCP upstreams

/// A raw TCP app: for every connection, `handler` gets the stream and the connection's number.
pub struct RawApp {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

impl RawApp {
    pub async fn start<F, Fut>(handler: F) -> RawApp
    where
        F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw app");
        let addr = listener.local_addr().expect("raw app address");
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(handler(stream, n));
            }
        });
        RawApp {
            addr,
            connections,
            _task: AbortOnDrop(task),
        }
    }
}

/// Reads a request head (up to the blank line) from a raw connection; `None` at EOF.
pub async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            buf.truncate(i + 4);
            return Some(buf);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A port on 127.0.0.1 that nothing listens on: bound (so nobody else takes it) but not
/// listening, so connections to it are refused. Call `listen` to bring the app "up".
pub struct ReservedPort {
    socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("create a socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        socket.bind(&any.into()).expect("bind a reserved port");
        let addr = socket
            .local_addr()
            .expect("reserved address")
            .as_socket()
            .expect("an IP address");
        ReservedPort { socket, addr }
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

/// The lines of the seed access log, split into blocks (each block's lines, blank line removed).
pub fn seed_blocks(text: &str) -> Vec<Vec<String>> {
    text.split_terminator("\n\n")
        .map(|block| block.lines().map(str::to_owned).collect())
        .collect()
}
