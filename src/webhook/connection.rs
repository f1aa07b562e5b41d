//! What one client of the webhook may hold, and for how long.
//!
//! The API server calls the webhook with `failurePolicy: Fail`: a webhook that cannot answer
//! blocks the creation of every opted-in pod, and anyone who reaches its Service can try. So every
//! phase of a connection has a bound, and the connections and the bytes buffered for them have a
//! total:
//!
//! - TLS handshake within [`HANDSHAKE_TIMEOUT`]; the first request head within [`HEADER_TIMEOUT`]
//!   of the handshake, and on HTTP/1.1 every later head within the same time of its first byte;
//!   the whole request body within [`BODY_TIMEOUT`] of its head (a deadline, not a pause between
//!   reads, so a trickled body gains nothing); the answer taken within [`EXCHANGE_TIMEOUT`] of the
//!   head; a connection with no request open for [`IDLE_TIMEOUT`] is closed gracefully, and a
//!   graceful close is cut after [`CLOSE_GRACE`].
//! - At most `--max-connections` connections ([`Connections`]). At the limit a new one makes
//!   room: the connection that has waited the longest in its current phase is closed at once,
//!   whatever it is waiting for (its handshake, a head, a body, a client to take its answer, or the next request
//!   on a keep-alive connection). A request under way is young, an idle connection of the API
//!   server is idle since its last answer, a slow client's connection is as old as its slowness:
//!   so a flood of slow clients only pushes its own connections out, while the API server's
//!   reviews and kubelet's probes are answered. (The proxy sheds idle keep-alive connections
//!   first, [`crate::proxy::limits`]; here that would close the API server's pooled connection
//!   at every connection of a flood.)
//! - A request body of at most [`MAX_BODY`], and at most [`MAX_BUFFERED`] bytes of request bodies
//!   and answers held at once across all connections ([`Budget`]); past it the connections
//!   holding the most are closed to give theirs back, and 503 only when no other one can.
//!   hyper's own buffers are bounded per connection (HTTP/1.1 [`H1_MAX_BUF`]; HTTP/2 flow-control
//!   windows, concurrent streams and send buffers below).
//!
//! The values, and why, are in docs/inject.md ("Limits of the webhook").

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::sync::lock;

/// Go's default for clients (the API server's among them) is the same 10 s.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The API server gives a review `timeoutSeconds` (10 s by default, 30 at most) and sends the whole
/// request at once: a head still arriving after 10 s is not the API server's.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The same reasoning for the body, counted from the end of the head.
pub(crate) const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A request, from its head to its answer taken by the client: the body's time, and as long again
/// for the client to read the answer.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longer than the 90 s after which Go clients close an idle connection themselves, so that the
/// client, not the webhook, ends a keep-alive connection and never sends on one being closed.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A graceful close (GOAWAY, or the end of the current exchange) waits this long at most: an
/// HTTP/2 client that never acknowledges the GOAWAY's PING would otherwise keep its connection.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The API server accepts request bodies of up to 3 MiB, and etcd stores objects of at most
/// 1.5 MiB: an AdmissionReview of a pod it can store (object, and oldObject on an update) fits.
pub(crate) const MAX_BODY: usize = 3 * 1024 * 1024;
/// Request bodies and responses held at once, across connections: five reviews of the largest
/// size, thousands of ordinary ones (a pod's review is a few KiB). The Deployment's memory limit
/// is 128 MiB.
pub(crate) const MAX_BUFFERED: usize = 16 * 1024 * 1024;
/// hyper's read and write buffers per HTTP/1.1 connection (also the largest request head).
pub(crate) const H1_MAX_BUF: usize = 64 * 1024;
/// Per HTTP/2 connection: streams at once (Go clients open another connection beyond it), what a
/// client may send before the webhook reads it, and what is queued for a client that does not read.
pub(crate) const H2_MAX_STREAMS: u32 = 8;
pub(crate) const H2_STREAM_WINDOW: u32 = 128 * 1024;
pub(crate) const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
pub(crate) const H2_MAX_SEND_BUF: usize = REPLY_SLICE;
/// A response is handed to hyper in slices of this size, as it has room (see [`Reply`]).
const REPLY_SLICE: usize = 16 * 1024;

/// The open connections, at most `--max-connections`, and the room made at the limit.
pub(crate) struct Connections {
    max: usize,
    open: Mutex<Open>,
    all_closed: Notify,
}

#[derive(Default)]
struct Open {
    next: u64,
    by_id: HashMap<u64, Arc<Conn>>,
}

impl Connections {
    pub(crate) fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max,
            open: Mutex::new(Open::default()),
            all_closed: Notify::new(),
        })
    }

    /// Takes a place for a connection just accepted, closing the one stalled the longest at the
    /// limit; `None` when every other connection is already closing to make room.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = lock(&self.open);
        if open.by_id.len() >= self.max {
            let victim = open
                .by_id
                .values()
                .filter(|c| !c.is_evicted())
                .min_by_key(|c| c.stalled_since())?;
            victim.evict();
        }
        let id = open.next;
        open.next += 1;
        let conn = Conn::new();
        open.by_id.insert(id, conn.clone());
        Some(Admitted {
            connections: self.clone(),
            id,
            conn,
        })
    }

    /// Shutting down: every connection closes gracefully, at once if idle.
    pub(crate) fn close_all(&self) {
        for conn in lock(&self.open).by_id.values() {
            conn.closing.store(true, Ordering::Release);
            conn.signal.notify_waiters();
        }
    }

    /// Resolves once no connection is open.
    pub(crate) async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if lock(&self.open).by_id.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// A connection's place among the [`Connections`], given back when dropped.
pub(crate) struct Admitted {
    connections: Arc<Connections>,
    id: u64,
    conn: Arc<Conn>,
}

impl Admitted {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = lock(&self.connections.open);
        open.by_id.remove(&self.id);
        if open.by_id.is_empty() {
            self.connections.all_closed.notify_waiters();
        }
    }
}

/// One connection's requests and deadlines, as its supervisor (`serve_connection`) sees them.
pub(crate) struct Conn {
    /// HTTP/1.1: bytes arriving with no request open are the next head. (HTTP/2 clients send
    /// PINGs and SETTINGS between requests; there a connection with no stream is simply idle.)
    heads: AtomicBool,
    /// The next read starts a head: HTTP/1.1 with no request open and no head under way.
    armed: AtomicBool,
    state: Mutex<State>,
    head_started: Notify,
    /// Close now: the limit or the [`Budget`] needs what this connection holds.
    evicted: AtomicBool,
    /// Close gracefully: the webhook is shutting down.
    closing: AtomicBool,
    signal: Notify,
}

struct State {
    /// When each open request's head came in.
    requests: Vec<Instant>,
    idle_since: Instant,
    /// When the head being waited for started: for the first request, the handshake's start.
    head_since: Option<Instant>,
}

/// What is due when a connection's deadline passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Due {
    /// A request's head, or its exchange, is late: close at once.
    Late(&'static str),
    /// No request for [`IDLE_TIMEOUT`]: close gracefully.
    Idle,
}

impl Conn {
    /// A connection just accepted: its handshake and then its first head are due.
    fn new() -> Arc<Conn> {
        let now = Instant::now();
        Arc::new(Conn {
            heads: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            state: Mutex::new(State {
                requests: Vec::new(),
                idle_since: now,
                head_since: Some(now),
            }),
            head_started: Notify::new(),
            evicted: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            signal: Notify::new(),
        })
    }

    /// The handshake is done: the first head is due within [`HEADER_TIMEOUT`] from now.
    pub(crate) fn handshake_done(&self, http1: bool) {
        self.heads.store(http1, Ordering::Release);
        lock(&self.state).head_since = Some(Instant::now());
    }

    /// A request's head is in: the request is open until the mark drops (with its answer).
    pub(crate) fn start(self: &Arc<Self>) -> RequestMark {
        self.armed.store(false, Ordering::Release);
        let start = Instant::now();
        let mut state = lock(&self.state);
        state.requests.push(start);
        state.head_since = None;
        RequestMark {
            conn: self.clone(),
            start,
        }
    }

    /// Bytes were read from the client.
    fn heard(&self) {
        if !self.armed.swap(false, Ordering::AcqRel) {
            return;
        }
        let mut state = lock(&self.state);
        if state.requests.is_empty() && state.head_since.is_none() {
            state.head_since = Some(Instant::now());
            self.head_started.notify_one();
        }
    }

    /// Since when the connection has waited in its current phase: for its oldest open request,
    /// for a head, or for the next request.
    fn stalled_since(&self) -> Instant {
        let state = lock(&self.state);
        let oldest = state.requests.iter().min().copied();
        oldest.or(state.head_since).unwrap_or(state.idle_since)
    }

    /// When the next deadline passes, and what is due then if nothing changes meanwhile.
    pub(crate) fn next(&self) -> (Instant, Due) {
        let state = lock(&self.state);
        if let Some(oldest) = state.requests.iter().min() {
            (
                *oldest + EXCHANGE_TIMEOUT,
                Due::Late("a request not answered and taken within"),
            )
        } else if let Some(since) = state.head_since {
            (since + HEADER_TIMEOUT, Due::Late("no request head within"))
        } else {
            (state.idle_since + IDLE_TIMEOUT, Due::Idle)
        }
    }

    /// Resolves when an HTTP/1.1 head starts on an idle connection (its deadline moves closer).
    pub(crate) async fn head_started(&self) {
        self.head_started.notified().await;
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.signal.notify_waiters();
    }

    fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Resolves when the limit or the [`Budget`] needs this connection: it closes at once.
    pub(crate) async fn evicted(&self) {
        self.wait_for(&self.evicted).await;
    }

    /// Resolves when the webhook shuts down: the connection closes gracefully.
    pub(crate) async fn closing(&self) {
        self.wait_for(&self.closing).await;
    }

    async fn wait_for(&self, flag: &AtomicBool) {
        loop {
            let notified = self.signal.notified();
            if flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// One open request. It goes with the answer's body, so the request stays open until hyper has
/// taken the whole answer: a connection is idle only once its client has its answer.
pub struct RequestMark {
    conn: Arc<Conn>,
    start: Instant,
}

impl RequestMark {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for RequestMark {
    fn drop(&mut self) {
        let conn = &self.conn;
        let mut state = lock(&conn.state);
        if let Some(i) = state.requests.iter().position(|s| *s == self.start) {
            state.requests.swap_remove(i);
        }
        if state.requests.is_empty() {
            state.idle_since = Instant::now();
            if conn.heads.load(Ordering::Acquire) {
                conn.armed.store(true, Ordering::Release);
            }
        }
    }
}

/// The client's stream, telling its connection when bytes arrive.
pub(crate) struct Watched<I> {
    io: I,
    conn: Arc<Conn>,
}

impl<I> Watched<I> {
    pub(crate) fn new(io: I, conn: Arc<Conn>) -> Watched<I> {
        Watched { io, conn }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.conn.heard();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Bytes of request bodies and responses held at once, across all connections. When a request
/// needs more than is left, the connections holding the most (a large body trickled, a large
/// response its client does not read) are closed to give them back, as the connection limit
/// closes the slowest connections: holding bytes cannot lock reviews out.
#[derive(Clone)]
pub(crate) struct Budget(Arc<Shares>);

struct Shares {
    bytes: Arc<Semaphore>,
    /// Every share holding bytes, oldest first.
    holders: Mutex<Holders>,
}

#[derive(Default)]
struct Holders {
    next: u64,
    by_age: std::collections::BTreeMap<u64, Holder>,
}

struct Holder {
    conn: Arc<Conn>,
    bytes: usize,
}

/// A request's share of the [`Budget`] (its body, then its response), given back when dropped.
pub(crate) struct Held {
    budget: Budget,
    conn: Arc<Conn>,
    permit: Option<OwnedSemaphorePermit>,
    /// Its place among the holders, once it holds bytes.
    id: Option<u64>,
}

impl Held {
    fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    fn add(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.permit {
            Some(mine) => mine.merge(permit),
            None => self.permit = Some(permit),
        }
        self.update();
    }

    /// Tells the holders what this share holds now.
    fn update(&mut self) {
        let bytes = self.bytes();
        let mut holders = lock(&self.budget.0.holders);
        let holders = &mut *holders;
        match self.id {
            Some(id) => {
                if let Some(holder) = holders.by_age.get_mut(&id) {
                    holder.bytes = bytes;
                }
            }
            None if bytes > 0 => {
                let id = holders.next;
                holders.next += 1;
                let conn = self.conn.clone();
                holders.by_age.insert(id, Holder { conn, bytes });
                self.id = Some(id);
            }
            None => {}
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock(&self.budget.0.holders).by_age.remove(&id);
        }
    }
}

impl Budget {
    pub(crate) fn new(bytes: usize) -> Budget {
        Budget(Arc::new(Shares {
            bytes: Arc::new(Semaphore::new(bytes)),
            holders: Mutex::new(Holders::default()),
        }))
    }

    /// An empty share for a request on `conn`.
    pub(crate) fn hold(&self, conn: &Arc<Conn>) -> Held {
        Held {
            budget: self.clone(),
            conn: conn.clone(),
            permit: None,
            id: None,
        }
    }

    /// Gives back what `held` counts beyond `bytes` (an answer smaller than its request).
    pub(crate) fn shrink(&self, held: &mut Held, bytes: usize) {
        if bytes < held.bytes() {
            self.try_resize(held, bytes);
        }
    }

    /// Makes `held` count `bytes`, at once or not at all (`false`, `held` unchanged).
    fn try_resize(&self, held: &mut Held, bytes: usize) -> bool {
        let now = held.bytes();
        if bytes <= now {
            if let Some(permit) = &mut held.permit {
                drop(permit.split(now - bytes));
            }
            held.update();
            return true;
        }
        let Ok(more) = u32::try_from(bytes - now) else {
            return false;
        };
        match self.0.bytes.clone().try_acquire_many_owned(more) {
            Ok(permit) => {
                held.add(permit);
                true
            }
            Err(_) => false,
        }
    }

    /// Makes `held` count `bytes`, making room if needed: other connections that have held bytes
    /// the longest are closed, and their bytes awaited until `deadline`. `false` when no other
    /// connection holds enough, or the bytes did not come back in time.
    pub(crate) async fn resize(&self, held: &mut Held, bytes: usize, deadline: Instant) -> bool {
        if self.try_resize(held, bytes) {
            return true;
        }
        let need = bytes - held.bytes();
        let Ok(more) = u32::try_from(need) else {
            return false;
        };
        if !self.evict_for(need, &held.conn) {
            return false;
        }
        let acquire = self.0.bytes.clone().acquire_many_owned(more);
        match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(permit)) => {
                held.add(permit);
                true
            }
            _ => false,
        }
    }

    /// Closes the connections holding the most bytes (the oldest among equals), other than
    /// `mine`, until `need` bytes are free or on their way back; whether they are. The most bytes
    /// first: a review is a few KiB, so a client holding more is the first to give them back, and
    /// as few connections as possible are closed.
    fn evict_for(&self, need: usize, mine: &Arc<Conn>) -> bool {
        let mut coming = self.0.bytes.available_permits();
        if coming >= need {
            return true;
        }
        let holders = lock(&self.0.holders);
        let mut candidates: Vec<&Holder> = holders
            .by_age
            .values()
            // Already evicted: its bytes may be counted on by another request.
            .filter(|h| !Arc::ptr_eq(&h.conn, mine) && !h.conn.is_evicted())
            .collect();
        // Stable: the oldest first among equals.
        candidates.sort_by_key(|h| std::cmp::Reverse(h.bytes));
        for holder in candidates {
            if coming >= need {
                break;
            }
            holder.conn.evict();
            coming += holder.bytes;
        }
        coming >= need
    }
}

/// Why a request body was not read whole.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over [`MAX_BODY`] (declared or sent): 413.
    TooLarge,
    /// The [`Budget`] has no room, and no other connection's bytes to take back: 503.
    Busy,
    /// Not all in within [`BODY_TIMEOUT`]: 408.
    Timeout,
    /// The client broke the framing or went away: 400.
    Read(String),
}

/// Reads a request body whole by `deadline`, counting what it buffers in `held` as it grows (so a
/// client that announces a large body but sends nothing holds nothing).
pub(crate) async fn read_body<B>(
    mut body: B,
    declared: Option<u64>,
    budget: &Budget,
    held: &mut Held,
    deadline: Instant,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if declared.is_some_and(|len| len > MAX_BODY as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(BodyError::Timeout),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(BodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > MAX_BODY {
            return Err(BodyError::TooLarge);
        }
        buf.reserve(data.len());
        if !budget.resize(held, buf.capacity(), deadline).await {
            return Err(BodyError::Busy);
        }
        buf.extend_from_slice(&data);
    }
}

/// An answer's body: handed to hyper a slice at a time, it holds the request open and its share
/// of the [`Budget`] until the last slice is taken. hyper asks for the next slice only when its
/// buffer (HTTP/1.1) or the stream's window (HTTP/2) has room, so a client that does not read
/// holds at most this answer, counted, and one slice in hyper.
pub(crate) struct Reply {
    data: Bytes,
    _held: Held,
    _open: RequestMark,
}

impl Reply {
    pub(crate) fn new(data: Bytes, held: Held, open: RequestMark) -> Reply {
        Reply {
            data,
            _held: held,
            _open: open,
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.data.is_empty() {
            return Poll::Ready(None);
        }
        let slice = this.data.split_to(REPLY_SLICE.min(this.data.len()));
        Poll::Ready(Some(Ok(Frame::data(slice))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body the test feeds by hand.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.get_mut()
                .0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(Frame::data(d))))
        }
    }

    fn fed() -> (mpsc::Sender<Bytes>, Fed) {
        let (tx, rx) = mpsc::channel(16);
        (tx, Fed(rx))
    }

    /// A body already sent whole.
    async fn sent(chunks: &[&[u8]]) -> Fed {
        let (tx, body) = fed();
        for chunk in chunks {
            tx.send(Bytes::copy_from_slice(chunk)).await.expect("open");
        }
        body
    }

    fn later() -> Instant {
        Instant::now() + BODY_TIMEOUT
    }

    /// Connections past their handshake (HTTP/1.1), kept open until dropped.
    struct Conns {
        connections: Arc<Connections>,
        admitted: Vec<Admitted>,
    }

    impl Conns {
        fn new(max: usize) -> Conns {
            Conns {
                connections: Connections::new(max),
                admitted: Vec::new(),
            }
        }

        fn open(&mut self) -> Arc<Conn> {
            let admitted = self.connections.admit().expect("room");
            let conn = admitted.conn().clone();
            conn.handshake_done(true);
            self.admitted.push(admitted);
            conn
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_is_read_whole_and_counted_until_its_answer_is_taken() {
        let budget = Budget::new(1024);
        let conn = Conns::new(4).open();
        let body = sent(&[b"hello ", b"world"]).await;
        let open = conn.start();
        let mut held = budget.hold(&conn);
        let got = read_body(body, Some(11), &budget, &mut held, later()).await;
        assert_eq!(got.as_deref(), Ok(&b"hello world"[..]));
        assert!(held.bytes() >= 11);
        assert_eq!(budget.0.bytes.available_permits(), 1024 - held.bytes());
        // Resized to the answer, then given back with it, once taken.
        assert!(budget.resize(&mut held, 4, later()).await);
        assert_eq!(budget.0.bytes.available_permits(), 1020);
        let mut reply = Reply::new(Bytes::from_static(b"done"), held, open);
        assert_eq!(
            conn.next().1,
            Due::Late("a request not answered and taken within")
        );
        let taken = std::future::poll_fn(|cx| Pin::new(&mut reply).poll_frame(cx)).await;
        assert!(taken.is_some_and(|f| f.is_ok()));
        drop(reply);
        assert_eq!(budget.0.bytes.available_permits(), 1024);
        assert!(lock(&budget.0.holders).by_age.is_empty());
        assert_eq!(conn.next().1, Due::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn too_large_declared_or_sent() {
        let budget = Budget::new(MAX_BUFFERED);
        let conn = Conns::new(4).open();
        let (_tx, body) = fed();
        let declared = Some(MAX_BODY as u64 + 1);
        let got = read_body(body, declared, &budget, &mut budget.hold(&conn), later()).await;
        assert_eq!(got, Err(BodyError::TooLarge), "refused before reading");
        let (tx, body) = fed();
        let sender = tokio::spawn(async move {
            let chunk = Bytes::from(vec![b'x'; 1024 * 1024]);
            for _ in 0..4 {
                if tx.send(chunk.clone()).await.is_err() {
                    return;
                }
            }
        });
        let mut held = budget.hold(&conn);
        let got = read_body(body, None, &budget, &mut held, later()).await;
        assert_eq!(got, Err(BodyError::TooLarge));
        budget.shrink(&mut held, 0);
        assert_eq!(budget.0.bytes.available_permits(), MAX_BUFFERED);
        sender.await.expect("sender");
    }

    #[tokio::test(start_paused = true)]
    async fn the_largest_holder_gives_its_bytes_back_for_a_new_request() {
        let budget = Budget::new(64 * 1024);
        let mut conns = Conns::new(4);
        let (small, large, new) = (conns.open(), conns.open(), conns.open());
        // Two holders: a small review first, then a larger body trickled, or an answer not read.
        let mut small_held = budget.hold(&small);
        assert!(budget.resize(&mut small_held, 8 * 1024, later()).await);
        let mut large_held = budget.hold(&large);
        assert!(budget.resize(&mut large_held, 40 * 1024, later()).await);
        // Their connections close when evicted, and their shares go with them.
        let closing = |conn: Arc<Conn>, held: Held| async move {
            conn.evicted().await;
            drop(held);
        };
        let large_closed = tokio::spawn(closing(large.clone(), large_held));
        let small_closed = tokio::spawn(closing(small.clone(), small_held));
        let body = sent(&[&[b' '; 32 * 1024]]).await;
        let mut held = budget.hold(&new);
        let got = read_body(body, None, &budget, &mut held, later()).await;
        assert_eq!(got.map(|b| b.len()), Ok(32 * 1024));
        assert!(large.is_evicted(), "the largest holder made room");
        assert!(
            !small.is_evicted(),
            "the small one kept its bytes: one was enough"
        );
        large_closed.await.expect("closed");
        drop(held);
        small_closed.abort();

        // A connection never evicts itself: with only its own bytes to take, 503.
        let mut first = budget.hold(&new);
        assert!(budget.resize(&mut first, 40 * 1024, later()).await);
        let body = sent(&[&[b' '; 32 * 1024]]).await;
        let mut second = budget.hold(&new);
        let got = read_body(body, None, &budget, &mut second, later()).await;
        assert_eq!(got, Err(BodyError::Busy));
        assert!(!new.is_evicted());
        assert_eq!(second.bytes(), 0, "nothing held after a refusal");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_body_times_out_at_its_deadline() {
        let budget = Budget::new(MAX_BUFFERED);
        let conn = Conns::new(4).open();
        let (tx, body) = fed();
        // A byte every tenth of the timeout: no pause is ever long, the whole body is.
        let trickle = tokio::spawn(async move {
            loop {
                if tx.send(Bytes::from_static(b"{")).await.is_err() {
                    return;
                }
                tokio::time::sleep(BODY_TIMEOUT / 10).await;
            }
        });
        let deadline = later();
        let mut held = budget.hold(&conn);
        let got = read_body(body, Some(1000), &budget, &mut held, deadline).await;
        assert_eq!(got, Err(BodyError::Timeout));
        assert_eq!(Instant::now(), deadline);
        drop(held);
        trickle.await.expect("trickle");
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_follow_the_connection() {
        let mut conns = Conns::new(4);
        let start = Instant::now();
        let conn = conns.open();
        assert_eq!(
            conn.next(),
            (start + HEADER_TIMEOUT, Due::Late("no request head within"))
        );
        let mark = conn.start();
        assert_eq!(conn.next().0, start + EXCHANGE_TIMEOUT);
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(mark);
        let idle = Instant::now();
        assert_eq!(conn.next(), (idle + IDLE_TIMEOUT, Due::Idle));
        // HTTP/1.1: the next head's first byte moves the deadline to the head timeout.
        tokio::time::advance(Duration::from_secs(30)).await;
        conn.heard();
        assert_eq!(conn.next().0, Instant::now() + HEADER_TIMEOUT);
        // HTTP/2: bytes between requests (PINGs) are no head.
        let h2 = conns.open();
        h2.handshake_done(false);
        drop(h2.start());
        let idle = Instant::now();
        h2.heard();
        assert_eq!(h2.next(), (idle + IDLE_TIMEOUT, Due::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_limit_the_connection_stalled_longest_makes_room() {
        let mut conns = Conns::new(3);
        let slow_head = conns.open();
        tokio::time::advance(Duration::from_secs(1)).await;
        let idle = conns.open();
        drop(idle.start());
        tokio::time::advance(Duration::from_secs(1)).await;
        let busy = conns.open();
        let _open = busy.start();
        tokio::time::advance(Duration::from_secs(1)).await;
        // The head waited since second 0, the idle one since 1, the request since 2.
        conns.open();
        assert!(slow_head.is_evicted());
        assert!(!idle.is_evicted() && !busy.is_evicted());
        conns.open();
        assert!(idle.is_evicted(), "then the one idle the longest");
        assert!(!busy.is_evicted());
        // An evicted connection not yet gone is not chosen twice: with nothing else, refused.
        let mut full = Conns::new(1);
        let only = full.open();
        let newcomer = full.open();
        assert!(only.is_evicted() && !newcomer.is_evicted());
        full.open();
        assert!(
            newcomer.is_evicted(),
            "a newcomer is no more protected than any other"
        );
        let mut none = Conns::new(1);
        none.open().evict();
        assert!(none.connections.admit().is_none());
    }
}
