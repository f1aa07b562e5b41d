//! Bytes on the wire, for tests that must see exactly what crosses the proxy: a raw client (send
//! bytes, read one response or everything until the close, always within a bound), raw TCP apps
//! ([`RawApp`], a handler per connection) and the recording app (keeps every byte each connection
//! brought and answers each request it parses with scripted bytes).
//!
//! The app parses requests leniently on purpose (a head may end in a bare LF, a chunk line too),
//! as nginx or Werkzeug do: anything the proxy lets through that such an app could take for a
//! second request shows up in [`RecordingApp::requests`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::http::AbortOnDrop;
use super::{WAIT, bounded, eventually};

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
    let mut buf = Vec::new();
    let response = bounded(
        "a raw response",
        WAIT,
        read_message(stream, &mut buf, false),
    )
    .await
    .unwrap_or_else(|| panic!("connection closed inside a response: {buf:?}"));
    let length: usize = response
        .header("content-length")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {}", response.head));
    assert_eq!(response.body.len(), length, "{}", response.head);
    (response.head, response.body)
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

/// Reads a request head like [`read_head`], keeping count of the body bytes that came with it:
/// the head and that count; `None` at EOF.
pub async fn read_head_and_more(stream: &mut TcpStream) -> Option<(Vec<u8>, usize)> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let more = buf.len() - (i + 4);
            buf.truncate(i + 4);
            return Some((buf, more));
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads and discards until `have` bytes reach `want` or the connection ends: how many came.
pub async fn read_count(stream: &mut TcpStream, mut have: usize, want: usize) -> usize {
    let mut chunk = vec![0u8; 64 * 1024];
    while have < want {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    have
}

/// Writes `head`, then `body` bytes of `x` in 1 MiB writes, on a task of its own: the writer back
/// once all went, `None` when a write failed (the proxy closed or reset).
pub fn upload(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    head: String,
    body: usize,
) -> tokio::task::JoinHandle<Option<tokio::net::tcp::OwnedWriteHalf>> {
    tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await.ok()?;
        let chunk = vec![b'x'; 1 << 20];
        let mut left = body;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).await.ok()?;
            left -= n;
        }
        Some(writer)
    })
}

/// How a connection ended for the reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A clean close (FIN): whatever came looks whole.
    Clean,
    /// A reset: the reader knows something was cut.
    Reset,
}

/// Everything that arrives on `reader` until the connection ends or `limit` passes, and how it
/// ended (`None`: still open at the limit).
pub async fn read_until_end(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> (Vec<u8>, Option<Ending>) {
    let mut got = Vec::new();
    let ending = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) => return Ending::Clean,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
                Err(_) => return Ending::Reset,
            }
        }
    })
    .await
    .ok();
    (got, ending)
}

// ---------------------------------------------------------------------------------------------
// Parsing (lenient: bare LF ends a line)

/// One HTTP/1 message as read off the wire: its head as text, its fields, its decoded body.
#[derive(Debug, Clone)]
pub struct Message {
    /// The start line and fields, as received (lossy UTF-8), blank line included.
    pub head: String,
    /// The start line.
    pub start: String,
    pub fields: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// The bytes the message took on the wire.
    pub raw: Vec<u8>,
}

impl Message {
    /// The first value of field `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of field `name` (any case), in order.
    pub fn headers(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// A response's status code (0 when the start line has none).
    pub fn status(&self) -> u16 {
        self.start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    /// A request's method.
    pub fn method(&self) -> &str {
        self.start.split_whitespace().next().unwrap_or_default()
    }

    /// A request's target.
    pub fn target(&self) -> &str {
        self.start.split_whitespace().nth(1).unwrap_or_default()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The end of the line starting at `from` (index after its LF), if complete.
fn line_end(buf: &[u8], from: usize) -> Option<usize> {
    buf[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|i| from + i + 1)
}

fn trim_line(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches(['\r', '\n'])
        .to_owned()
}

enum Parsed {
    /// Needs more bytes.
    Incomplete,
    /// A message, and how many bytes it took.
    Done(Message, usize),
    /// The body runs to the end of the connection (a response without framing).
    UntilClose(Message),
}

/// Parses one message from the front of `buf`. `bodiless` says the message has no body whatever
/// its fields say (a response to HEAD, a 1xx/204/304); a request without framing has no body,
/// a response without framing runs to the close.
fn parse(buf: &[u8], is_request: bool, bodiless: bool) -> Parsed {
    // A request may be preceded by empty lines (RFC 9112 §2.2).
    let mut at = 0;
    while is_request && buf[at..].starts_with(b"\r\n") {
        at += 2;
    }
    let head_start = at;
    let Some(mut pos) = line_end(buf, at) else {
        return Parsed::Incomplete;
    };
    let start = trim_line(&buf[at..pos]);
    let mut fields = Vec::new();
    loop {
        let Some(end) = line_end(buf, pos) else {
            return Parsed::Incomplete;
        };
        let line = trim_line(&buf[pos..end]);
        pos = end;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            fields.push((k.to_owned(), v.trim_matches([' ', '\t']).to_owned()));
        }
    }
    let mut message = Message {
        head: String::from_utf8_lossy(&buf[head_start..pos]).into_owned(),
        start,
        fields,
        body: Vec::new(),
        raw: Vec::new(),
    };
    let status = message.status();
    let bodiless = bodiless || (!is_request && (status < 200 || status == 204 || status == 304));
    let chunked = message
        .headers("transfer-encoding")
        .last()
        .is_some_and(|v| v.to_ascii_lowercase().trim_end().ends_with("chunked"));
    if bodiless {
    } else if chunked {
        loop {
            let Some(end) = line_end(buf, pos) else {
                return Parsed::Incomplete;
            };
            let line = trim_line(&buf[pos..end]);
            let digits: String = line.chars().take_while(char::is_ascii_hexdigit).collect();
            let size = usize::from_str_radix(&digits, 16).unwrap_or(0);
            pos = end;
            if size == 0 {
                // Trailer fields, up to an empty line.
                loop {
                    let Some(end) = line_end(buf, pos) else {
                        return Parsed::Incomplete;
                    };
                    let empty = trim_line(&buf[pos..end]).is_empty();
                    pos = end;
                    if empty {
                        break;
                    }
                }
                break;
            }
            if buf.len() < pos + size {
                return Parsed::Incomplete;
            }
            message.body.extend_from_slice(&buf[pos..pos + size]);
            pos += size;
            let Some(end) = line_end(buf, pos) else {
                return Parsed::Incomplete;
            };
            pos = end;
        }
    } else if let Some(length) = message.header("content-length") {
        let length: usize = length.trim().parse().unwrap_or(0);
        if buf.len() < pos + length {
            return Parsed::Incomplete;
        }
        message.body = buf[pos..pos + length].to_vec();
        pos += length;
    } else if !is_request {
        message.body = buf[pos..].to_vec();
        message.raw = buf[head_start..].to_vec();
        return Parsed::UntilClose(message);
    }
    message.raw = buf[head_start..pos].to_vec();
    Parsed::Done(message, pos)
}

/// Reads one message from `stream`, keeping what follows it in `buf`; `None` when the connection
/// ends before a whole message (a response running to the close is whole at the close).
async fn read_message(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    bodiless: bool,
) -> Option<Message> {
    loop {
        let mut chunk = [0u8; 16 * 1024];
        match parse(buf, false, bodiless) {
            Parsed::Done(message, used) => {
                buf.drain(..used);
                return Some(message);
            }
            Parsed::UntilClose(message) => match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    buf.clear();
                    return Some(message);
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            Parsed::Incomplete => match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The raw client

/// One client connection to the proxy: bytes out, responses in, every read bounded.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What became of a connection within a bound.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The peer closed it (EOF or reset).
    Closed,
    /// Still open when the bound ran out.
    Open,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = bounded("connect", WAIT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; a write the proxy refuses (it closed) is not an error here.
    pub async fn send(&mut self, bytes: &[u8]) -> &mut Self {
        let _ = bounded("a raw write", WAIT, self.stream.write_all(bytes)).await;
        self
    }

    /// The next response, `None` if the connection ends before a whole one (within [`WAIT`]).
    pub async fn response(&mut self) -> Option<Message> {
        self.response_within(WAIT).await
    }

    /// The next response within `limit`, `None` if the connection ends first.
    pub async fn response_within(&mut self, limit: Duration) -> Option<Message> {
        bounded(
            "a response",
            limit,
            read_message(&mut self.stream, &mut self.buf, false),
        )
        .await
    }

    /// The response to a HEAD request (no body, whatever its fields say).
    pub async fn head_response(&mut self) -> Option<Message> {
        bounded(
            "a response to HEAD",
            WAIT,
            read_message(&mut self.stream, &mut self.buf, true),
        )
        .await
    }

    /// Sends `request` and reads its response, which must come.
    pub async fn exchange(&mut self, request: &[u8]) -> Message {
        self.send(request).await;
        let response = self.response().await;
        response.unwrap_or_else(|| {
            panic!(
                "the connection ended without a response to {:?}",
                String::from_utf8_lossy(request)
            )
        })
    }

    /// Everything that arrives until the peer closes, or until `limit`; and which came first.
    pub async fn rest(&mut self, limit: Duration) -> (Vec<u8>, End) {
        let mut out = std::mem::take(&mut self.buf);
        let read = async {
            let mut chunk = [0u8; 16 * 1024];
            loop {
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => out.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let end = match tokio::time::timeout(limit, read).await {
            Ok(()) => End::Closed,
            Err(_) => End::Open,
        };
        (out, end)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("the client's address")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw apps

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

/// A request as the recording app parsed it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The connection it came on (1 for the first accepted).
    pub connection: usize,
    /// Its place on that connection (1 for the first).
    pub nth: usize,
    pub message: Message,
}

/// What the app does, in order, in answer to one request.
#[derive(Debug, Clone)]
pub enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Close the connection (the rest of the steps are not run).
    Close,
    /// Never answer, never read again, keep the connection open.
    Hang,
}

/// Writes `bytes` and waits for the next request on the connection.
pub fn answer(bytes: impl AsRef<[u8]>) -> Vec<Step> {
    vec![Step::Write(bytes.as_ref().to_vec())]
}

/// A 200 with a body of `body`, framed by Content-Length.
pub fn ok(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What one connection brought, and whether it ended.
#[derive(Default)]
struct Connection {
    bytes: Vec<u8>,
    eof: bool,
}

#[derive(Default)]
struct Record {
    connections: Vec<Connection>,
    requests: Vec<Received>,
}

type Script = dyn Fn(&Received) -> Vec<Step> + Send + Sync;

/// A TCP app on 127.0.0.1:0 that records every byte each connection brings and answers each
/// request it parses with what `script` says.
pub struct RecordingApp {
    pub addr: SocketAddr,
    app: RawApp,
    record: Arc<Mutex<Record>>,
    /// Reads whose bytes have left the kernel and are not recorded yet (see [`Self::settled`]).
    reading: Arc<AtomicUsize>,
}

impl RecordingApp {
    pub async fn start(script: impl Fn(&Received) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let record = Arc::new(Mutex::new(Record::default()));
        let reading = Arc::new(AtomicUsize::new(0));
        let script: Arc<Script> = Arc::new(script);
        let (shared, counted) = (record.clone(), reading.clone());
        let app = RawApp::start(move |stream, connection| {
            let reads = Reads {
                stream,
                busy: counted.clone(),
            };
            serve_connection(reads, connection, shared.clone(), script.clone())
        })
        .await;
        RecordingApp {
            addr: app.addr,
            app,
            record,
            reading,
        }
    }

    /// Waits until the app has taken in everything sent to it so far: no connection waiting in
    /// its listener's accept queue, no byte unread on a connection it accepted (the kernel's
    /// counts, from /proc/net/tcp), and every read recorded (its bytes, and the request parsed
    /// from them that the app answers next). A proxy's write is in those queues once it returns:
    /// after the client has the proxy's answer, this is the barrier before asserting what the app
    /// did not receive, where a sleep would only make it likely.
    pub async fn settled(&self) {
        let addr = self.addr;
        eventually("the app to take in what was sent to it", WAIT, || async {
            // The kernel first, then the reads: a read that empties a queue after the first look
            // is still counted by the second.
            let queued = kernel_queued(addr);
            let reading = self.reading.load(Ordering::SeqCst);
            (queued == 0 && reading == 0).then_some(()).ok_or_else(|| {
                format!("{queued} connections or bytes queued, {reading} reads being recorded")
            })
        })
        .await;
    }

    /// How many connections the app accepted.
    pub fn connections(&self) -> usize {
        self.app.connections.load(Ordering::SeqCst)
    }

    /// Every request parsed so far, in arrival order, across all connections.
    pub fn requests(&self) -> Vec<Received> {
        lock(&self.record).requests.clone()
    }

    /// Every byte connection `n` (from 1) brought.
    pub fn bytes(&self, n: usize) -> Vec<u8> {
        lock(&self.record)
            .connections
            .get(n - 1)
            .map(|c| c.bytes.clone())
            .unwrap_or_default()
    }

    /// Every byte of every connection, concatenated in connection order.
    pub fn all_bytes(&self) -> Vec<u8> {
        lock(&self.record)
            .connections
            .iter()
            .flat_map(|c| c.bytes.clone())
            .collect()
    }

    /// Whether connection `n` (from 1) ended from the proxy's side.
    pub fn saw_eof(&self, n: usize) -> bool {
        lock(&self.record)
            .connections
            .get(n - 1)
            .is_some_and(|c| c.eof)
    }
}

fn lock(record: &Mutex<Record>) -> std::sync::MutexGuard<'_, Record> {
    record.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the kernel holds for the IPv4 listener on `addr` and the connections accepted on it: the
/// accept queue's length (a listening socket's `rx_queue` in /proc/net/tcp) plus the unread bytes
/// of each connection whose local address is `addr`.
fn kernel_queued(addr: SocketAddr) -> u64 {
    let SocketAddr::V4(v4) = addr else {
        panic!("the recording app listens on IPv4, not {addr}");
    };
    // The kernel prints the address as the native-endian integer of its network-order bytes.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) != Some(&local.as_str()) {
                return None;
            }
            let (_, rx) = fields.get(4)?.split_once(':')?;
            u64::from_str_radix(rx, 16).ok()
        })
        .sum()
}

/// A connection's reads, each counted in `busy` from the moment its bytes leave the kernel until
/// the caller drops the [`Reading`] it came with (once they are recorded).
struct Reads {
    stream: TcpStream,
    busy: Arc<AtomicUsize>,
}

/// One counted read (see [`Reads`]).
struct Reading(Arc<AtomicUsize>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Reads {
    async fn read(&mut self, chunk: &mut [u8]) -> (std::io::Result<usize>, Reading) {
        loop {
            let ready = self.stream.readable().await;
            self.busy.fetch_add(1, Ordering::SeqCst);
            let reading = Reading(self.busy.clone());
            let read = ready.and_then(|()| self.stream.try_read(chunk));
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                read => return (read, reading),
            }
        }
    }
}

async fn serve_connection(
    mut reads: Reads,
    connection: usize,
    record: Arc<Mutex<Record>>,
    script: Arc<Script>,
) {
    {
        // Connections are numbered as accepted; their records may be made in another order.
        let mut r = lock(&record);
        if r.connections.len() < connection {
            r.connections.resize_with(connection, Connection::default);
        }
    }
    let mut buf = Vec::new();
    let mut nth = 0;
    // The last read, counted until its bytes and the first request parsed from them are recorded.
    let mut reading: Option<Reading> = None;
    loop {
        while let Parsed::Done(message, used) = parse(&buf, true, false) {
            buf.drain(..used);
            nth += 1;
            let received = Received {
                connection,
                nth,
                message,
            };
            lock(&record).requests.push(received.clone());
            drop(reading.take());
            for step in script(&received) {
                match step {
                    Step::Write(bytes) => {
                        let _ = reads.stream.write_all(&bytes).await;
                    }
                    Step::Sleep(d) => tokio::time::sleep(d).await,
                    Step::Close => return,
                    Step::Hang => {
                        // Keeps recording what arrives, answers nothing more.
                        let mut chunk = [0u8; 16 * 1024];
                        loop {
                            let (read, counted) = reads.read(&mut chunk).await;
                            match read {
                                Ok(0) | Err(_) => {
                                    lock(&record).connections[connection - 1].eof = true;
                                    drop(counted);
                                    std::future::pending::<()>().await;
                                }
                                Ok(n) => lock(&record).connections[connection - 1]
                                    .bytes
                                    .extend_from_slice(&chunk[..n]),
                            }
                        }
                    }
                }
            }
        }
        drop(reading.take());
        let mut chunk = [0u8; 16 * 1024];
        let (read, counted) = reads.read(&mut chunk).await;
        match read {
            Ok(0) | Err(_) => {
                lock(&record).connections[connection - 1].eof = true;
                return;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                lock(&record).connections[connection - 1]
                    .bytes
                    .extend_from_slice(&chunk[..n]);
                reading = Some(counted);
            }
        }
    }
}
