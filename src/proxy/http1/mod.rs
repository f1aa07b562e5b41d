//! The HTTP/1.1 fast path: plain requests proxied with one read and one write each way.
//!
//! Why hand-written when hyper is right there: profiling the hyper forwarder under wrk showed four
//! syscalls per request (the minimum) but twice nginx's user-space CPU, spent in the client's
//! dispatch channel between tasks, the pool's checkout futures, header maps built and re-encoded,
//! and per-request allocations. Pingora made the same call and parses HTTP/1 itself. Here a
//! request is parsed in place ([`framing`]), its head is rewritten into one buffer, and bytes are
//! copied; a busy client connection keeps its upstream connection between requests (no pool
//! traffic per request) and gives it back to the pool as soon as it goes idle.
//!
//! It serves a client's socket and, the same way, the HTTP/1.1 a mesh peer sends in an HBONE
//! tunnel ([`ClientIo`]).
//!
//! The fast path covers what nearly all traffic is: HTTP/1.1 requests without a body, with a
//! `Content-Length` or with `Transfer-Encoding: chunked`. Everything else (`Upgrade`, `CONNECT`,
//! `Expect`, HTTP/1.0, apps spoken to over HTTP/2) is handed, bytes already read included, to the
//! hyper path for the rest of the connection. The decisions (header rules, retry, the responses
//! the proxy makes itself) are the [`phases`](crate::proxy::phases) both paths share.
//!
//! Every wait is bounded: the request head (`--header-timeout`, from its first byte), an idle
//! keep-alive connection (`--idle-timeout`), the request body between reads
//! (`--request-body-timeout`), the response head from the end of the request
//! (`--response-timeout`), the response body between reads (`--response-body-timeout`), and
//! every write the client must take, the proxy's own answers included (twice that).

pub mod chunked;
pub mod framing;

use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Sleep, timeout};

use crate::error::{ErrorKind, classify_io};
use crate::proxy::driver::{
    self, Admitted, Attempt, AttemptFailure, Facts, Routed, Sent, may_retry,
};
use crate::proxy::exchange::{ConnContext, Exchange, PathText};
use crate::proxy::limits::{Activity, Slot};
use crate::proxy::phases::{self, Synthetic};
use crate::proxy::rewind::Rewind;
use crate::proxy::shared::Shared;
use crate::proxy::upstream::UpstreamConn;
use crate::proxy::upstream::balance::Pick;
use crate::proxy::upstream::tunnel_stream::TunnelStream;
use crate::telemetry::metrics::Direction;
use chunked::{ChunkedTracker, InvalidChunk};
use framing::{
    Framing, InvalidResponse, RequestPlan, RequestVerdict, ResponsePlan, Rewrite,
    early_answer_ends_request, plan_request, plan_response,
};
use prometheus_client::metrics::counter::Counter;

/// Read size for bodies.
const READ_CHUNK: usize = 16 * 1024;
/// Read size for heads; the buffer grows up to --max-header-bytes.
const HEAD_CHUNK: usize = 4096;
/// The largest response head accepted from the app.
const UPSTREAM_MAX_HEAD: usize = 64 * 1024;
/// A connection that stays idle this long gives its buffers and its app connection back: a busy
/// keep-alive client (the next request within milliseconds) keeps both, an idle one holds one
/// descriptor and almost no memory (as nginx does).
const IDLE_GRACE: Duration = Duration::from_millis(20);
/// After an error response: how long and how much of the client's unread input to discard
/// before closing, so that the close does not reset the response away (nginx's lingering close).
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;

/// What the fast path serves: a client's socket, or an HBONE stream a peer opened to the app.
/// Beside reads and writes it waits for input without taking it (an idle connection holds no
/// buffer meanwhile) and takes what has arrived without waiting.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Resolves when a read would not wait (bytes, the end, or an error).
    fn readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Reads what has arrived; `WouldBlock` when nothing has, `Ok(0)` at the end.
    fn try_read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize>;
    /// Makes the end of the connection abortive (a TCP reset when it is dropped); a tunnel's
    /// stream is reset when dropped without [`Connection::close`].
    fn abort(&mut self) {}
    /// Resolves when the client has closed or reset the connection, as far as can be told
    /// without taking its bytes (never, by default).
    fn left(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

impl ClientIo for TcpStream {
    async fn readable(&mut self) -> std::io::Result<()> {
        TcpStream::readable(self).await
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let space = buf.capacity() - buf.len();
        let n = TcpStream::try_read_buf(self, buf)?;
        if 0 < n && n < space {
            // A short read emptied the socket (epoll): tokio is told, as its own reads tell it,
            // or the next wait for input would first make a read that finds nothing (one
            // system call more per request).
            let drained = || Err::<(), _>(std::io::ErrorKind::WouldBlock.into());
            let _ = self.try_io(tokio::io::Interest::READABLE, drained);
        }
        Ok(n)
    }

    fn abort(&mut self) {
        // SO_LINGER 0: the close sends RST, not FIN.
        let _ = socket2::SockRef::from(&*self).set_linger(Some(Duration::ZERO));
    }

    async fn left(&mut self) {
        match self.peek(&mut [0u8; 1]).await {
            Ok(0) | Err(_) => {}
            // Bytes not yet read (a body, a pipelined request): nothing more can be told of the
            // client until they are.
            Ok(_) => std::future::pending().await,
        }
    }
}

impl ClientIo for TunnelStream {
    async fn readable(&mut self) -> std::io::Result<()> {
        TunnelStream::readable(self).await
    }

    fn try_read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        TunnelStream::try_read_buf(self, buf)
    }
}

/// How a client connection served by the fast path ended.
pub enum Outcome {
    Done,
    /// Hand the connection to the hyper path ([`Connection::into_rewind`]).
    Fallback,
}

/// Why there is no head to answer: [`Connection::read_head`]'s `Err`.
enum NoHead {
    Fallback,
    /// The client closed, went idle too long, or the connection was shed or drained.
    Closed,
}

/// A head the fast path answers.
// The large variant is the common one, moved straight into its exchange: boxing it would cost an
// allocation per request. An idle connection's task holds neither (listener's tests bound it).
#[allow(clippy::large_enum_variant)]
enum Pending {
    Request(RequestPlan, Instant),
    /// Refused before it could be forwarded: answered by the proxy, then the connection closes.
    Refused(ErrorKind, Instant),
}

/// What the response depends on from its request.
#[derive(Clone, Copy)]
struct Shape {
    framing: Framing,
    keep_alive: bool,
    head_request: bool,
}

/// After an exchange: keep the connection for the next request or close it.
#[derive(PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// What the attempts need to know of the request.
struct Request<'a> {
    method: &'a Method,
    has_body: bool,
    shape: Shape,
    /// The body is in hand (or there is none): it can be sent again.
    replayable: bool,
    /// A gRPC call on a route with a deadline: where its `grpc-timeout` lies in the head, and the
    /// deadline, what is left of which each attempt tells the app.
    grpc_timeout: Option<(Range<usize>, tokio::time::Instant)>,
}

/// Why no response came to forward.
enum Unanswered {
    /// Answered with this error.
    Refused(ErrorKind),
    /// The client went away.
    ClientGone,
}

/// Where one attempt goes, and what the route's balancer needs to hear of it.
struct Target {
    addr: SocketAddr,
    pick: Option<Pick>,
    /// The attempt's bound: the route's deadline, or sooner its per-try timeout.
    bound: Option<tokio::time::Instant>,
}

/// How one attempt ended.
enum Tried {
    Answered(UpstreamConn, ResponsePlan),
    Failed {
        kind: ErrorKind,
        sent: Sent,
        /// The connection had carried a request before (the keep-alive race).
        reused: bool,
        /// No connection could be made.
        connect: bool,
    },
    /// The attempt's bound ran out.
    TimedOut,
}

/// Which side a body copy failed on.
enum CopyError {
    Read,
    Write,
    Invalid,
    /// The source paused longer than the body timeout.
    Stalled,
    /// The route's timeout came first.
    Deadline,
}

impl From<InvalidChunk> for CopyError {
    fn from(_: InvalidChunk) -> Self {
        CopyError::Invalid
    }
}

enum HeadError {
    Timeout,
    /// The app failed before a complete head; `bool`: some bytes of a response had arrived.
    Upstream(ErrorKind, bool),
    ClientGone,
}

/// One client connection on the fast path.
pub struct Connection<C = TcpStream> {
    shared: Arc<Shared>,
    ctx: Arc<ConnContext>,
    client: C,
    slot: Arc<Slot>,
    /// Bytes read from the client and not yet forwarded.
    buf: BytesMut,
    /// The request head for the app (with a small body, when it is all in hand).
    head: Vec<u8>,
    /// The response head for the client.
    out: Vec<u8>,
    /// The app connection the last request used, kept while the client is busy.
    sticky: Option<(SocketAddr, UpstreamConn)>,
    /// A response was cut after its head: the connection ends abortively ([`ClientIo::abort`]).
    aborted: bool,
    /// The app answered before it had the whole request body and read no more of it: the rest of
    /// the body is left unread, and the connection ends after the answer (a lingering close).
    body_left_unread: bool,
    /// The attempt is still taking the request's body from the client: a bound that runs out
    /// meanwhile is the client's slowness, not the endpoint's ([`driver::timed_out_blame`]).
    reading_body: bool,
}

impl<C: ClientIo> Connection<C> {
    /// `read`: bytes already read from the client (detection's, on a tunnel); `app`: a connection
    /// to the app already open (the one a tunnel's CONNECT dialled), used first.
    pub fn new(
        shared: Arc<Shared>,
        ctx: Arc<ConnContext>,
        client: C,
        slot: Arc<Slot>,
        read: BytesMut,
        app: Option<TcpStream>,
    ) -> Connection<C> {
        let sticky = app.map(|app| (ctx.upstream_addr, UpstreamConn::new(app)));
        Connection {
            shared,
            ctx,
            client,
            slot,
            buf: read,
            head: Vec::new(),
            out: Vec::new(),
            sticky,
            aborted: false,
            body_left_unread: false,
            reading_body: false,
        }
    }

    /// Serves requests until the client closes, or until one needs the hyper path.
    ///
    /// Borrows the connection (the caller holds it): an `async fn` taking it by value would keep
    /// it twice in the connection's task, the argument and the moved local side by side.
    pub async fn serve(&mut self) -> Outcome {
        loop {
            // The head is scoped to this block: held across the exchange's await below, its
            // 200 bytes would be in this future's state, idle connections included.
            let pending = {
                let head = self.read_head().await;
                match head {
                    Err(NoHead::Closed) => break,
                    Err(NoHead::Fallback) => {
                        self.release_upstream();
                        return Outcome::Fallback;
                    }
                    Ok(pending) => pending,
                }
            };
            // Boxed: an exchange's state is kilobytes that an idle connection should not carry.
            if Box::pin(self.answer(pending)).await == Next::Close {
                break;
            }
        }
        self.release_upstream();
        Outcome::Done
    }

    /// A request's exchange, or the proxy's answer to a head it refused.
    async fn answer(&mut self, pending: Pending) -> Next {
        match pending {
            Pending::Request(plan, start) => self.exchange(plan, start).await,
            Pending::Refused(kind, start) => {
                let exchange = Exchange::unparsed(self.ctx.clone(), start, http::Version::HTTP_11);
                let refusal = Synthetic::new(kind, false).closing(true);
                self.respond(exchange, refusal, false).await
            }
        }
    }

    /// The connection for the hyper path, with the bytes the fast path read and did not use.
    pub fn into_rewind(mut self) -> Rewind<C> {
        Rewind::new(self.buf.split().freeze(), self.client)
    }

    /// Ends the client's side (a tunnel's stream ends with `END_STREAM` instead of a reset,
    /// unless a response was cut: then the reset says so).
    pub async fn close(mut self) {
        if !self.aborted {
            let _ = self.client.shutdown().await;
        }
    }

    /// Gives the app connection back to the pool (if it is clean).
    fn release_upstream(&mut self) {
        if let Some((addr, up)) = self.sticky.take() {
            self.shared.upstreams.pool.checkin(addr, up);
        }
    }

    /// Waits for the next request head: idle first (bounded by --idle-timeout), then the whole
    /// head within --header-timeout of its first byte.
    async fn read_head(&mut self) -> Result<Pending, NoHead> {
        if self.buf.is_empty() && !self.wait_while_idle().await {
            return Err(NoHead::Closed);
        }
        self.slot.set(Activity::Head);
        let start = Instant::now();
        let deadline =
            tokio::time::Instant::from_std(start) + self.shared.settings.traffic.timeouts.header;
        let max_head = self.shared.settings.traffic.max_header_bytes;
        // `None` without an allocation on plaintext; a tunnel's peer is named to the app.
        let client_cert = self.shared.client_cert_details(&self.ctx);
        // A head is parsed whole each time (httparse is not incremental), so a head trickled a
        // byte at a time would be parsed once per byte: quadratic work, gigabytes scanned for
        // one 64 KiB head. It is parsed again only when its verdict may have changed: an empty
        // line (its end) has arrived, it has doubled since, or it reached --max-header-bytes.
        // `parsed`: the bytes the last parse found partial; `scanned`: the bytes looked at for
        // an empty line; `skipped`: the empty lines before the request line, dropped here (as
        // httparse skips them) and counted against the limit.
        let (mut parsed, mut scanned, mut skipped) = (0usize, 0usize, 0usize);
        loop {
            let empty = leading_empty_lines(&self.buf);
            if empty > 0 {
                self.buf.advance(empty);
                skipped += empty;
                (parsed, scanned) = (0, 0);
            }
            let size = skipped + self.buf.len();
            if self.buf.is_empty() && size >= max_head {
                return Ok(Pending::Refused(ErrorKind::HeadersTooLarge, start));
            }
            // Only the new bytes are looked at (and the two before them: an empty line may have
            // begun there); a parse has looked at all the others.
            let due = parsed == 0
                || self.buf.len() >= 2 * parsed
                || size >= max_head
                || has_empty_line(&self.buf[scanned.saturating_sub(2)..]);
            scanned = self.buf.len();
            if !self.buf.is_empty() && due {
                let rewrite = Rewrite {
                    lowercase_names: self.shared.settings.traffic.lowercase_header_names,
                    host: self
                        .shared
                        .settings
                        .traffic
                        .rewrite_host
                        .then(|| self.ctx.upstream.as_str()),
                    client_ip: &self.ctx.client_ip_text,
                    via: self.shared.settings.via.pseudonym(),
                    normalize_path: self.ctx.direction == Direction::Inbound,
                    trusted_hops: self.shared.settings.traffic.trusted_hops,
                    client_cert: client_cert.as_ref().map(http::HeaderValue::as_bytes),
                    sampler: (self.shared.telemetry.traces.as_ref()).map(|t| &t.sampler),
                    tunnel_parent: self.ctx.tunnel_parent,
                };
                match plan_request(&mut self.buf, &rewrite, &mut self.head) {
                    // The buffer grows by doubling, so one read can bring in a whole head
                    // larger than the limit: it is still over it.
                    Ok(plan) if skipped + plan.head_len > max_head => {
                        return Ok(Pending::Refused(ErrorKind::HeadersTooLarge, start));
                    }
                    Ok(plan) => return Ok(Pending::Request(plan, start)),
                    Err(RequestVerdict::Partial) if size < max_head => parsed = self.buf.len(),
                    Err(RequestVerdict::Partial) => {
                        return Ok(Pending::Refused(ErrorKind::HeadersTooLarge, start));
                    }
                    Err(RequestVerdict::Invalid) => {
                        return Ok(Pending::Refused(ErrorKind::BadRequest, start));
                    }
                    Err(RequestVerdict::Fallback) => return Err(NoHead::Fallback),
                }
            }
            self.buf.reserve(HEAD_CHUNK);
            // What is already there needs no timer: most heads arrive whole, in one read.
            match self.client.try_read_buf(&mut self.buf) {
                Ok(0) => return Err(NoHead::Closed),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(NoHead::Closed),
            }
            // A head that has started finishes while draining (it gets its answer), but not
            // when the shedder needs its room: the slowest heads go first.
            let read = tokio::time::timeout_at(deadline, self.client.read_buf(&mut self.buf));
            tokio::select! {
                biased;
                read = read => match read {
                    Ok(Ok(0) | Err(_)) => return Err(NoHead::Closed),
                    Ok(Ok(_)) => {}
                    // Slowloris: the whole head gets --header-timeout, however it trickles in.
                    Err(_) => return Ok(Pending::Refused(ErrorKind::RequestTimeout, start)),
                },
                () = self.slot.shed_wait() => return Err(NoHead::Closed),
            }
        }
    }

    /// Between requests. Returns whether the client sent something (`false`: close).
    async fn wait_while_idle(&mut self) -> bool {
        self.slot.set(Activity::Idle);
        if self.slot.close_requested() {
            return false;
        }
        let idle_timeout = self.shared.settings.traffic.timeouts.idle;
        let grace = IDLE_GRACE.min(idle_timeout);
        // The next request of a busy client usually comes within the grace: no waiter is
        // registered for a close request meanwhile (one shed or drained now closes after the grace).
        tokio::select! {
            biased;
            ready = self.client.readable() => return ready.is_ok(),
            () = tokio::time::sleep(grace) => {}
        }
        if self.slot.close_requested() {
            return false;
        }
        // Idle for real: give back what a waiting connection does not need.
        self.release_upstream();
        self.buf = BytesMut::new();
        self.head = Vec::new();
        self.out = Vec::new();
        tokio::select! {
            biased;
            ready = self.client.readable() => ready.is_ok(),
            () = self.slot.close_requested_wait() => false,
            () = tokio::time::sleep(idle_timeout - grace) => false,
        }
    }

    /// One request and its response.
    async fn exchange(&mut self, plan: RequestPlan, start: Instant) -> Next {
        self.slot.set(Activity::Busy);
        let shape = Shape {
            framing: plan.framing,
            keep_alive: plan.keep_alive,
            head_request: plan.method == Method::HEAD,
        };
        let mut exchange = Exchange::new(
            self.ctx.clone(),
            start,
            plan.method.clone(),
            http::Version::HTTP_11,
            PathText::Raw(plan.path),
            plan.request_id,
        );
        exchange.trace = plan.trace;
        // A body already in the buffer (after the head) travels with the head.
        let buffered = self.buf.len().saturating_sub(plan.head_len);
        let inline_body = match plan.framing {
            Framing::None => Some(0),
            Framing::Length(n) if n <= buffered as u64 => usize::try_from(n).ok(),
            _ => None,
        };
        let admitted = {
            // What routes match on, as the client wrote it: read in place from the head, which
            // stays in the buffer until the driver has decided; only when there are routes.
            let authority = (plan.authority_at.clone())
                .filter(|_| self.shared.routes.is_some())
                .and_then(|at| self.buf.get(at))
                .and_then(|bytes| std::str::from_utf8(bytes).ok());
            let facts = Facts {
                method: &plan.method,
                path: exchange.path(),
                grpc: plan.grpc,
                looped: plan.looped,
                malformed: !plan.authority_valid,
                ambiguous: plan.ambiguous,
                // CONNECT takes hyper's path.
                plain_connect: false,
                reusable: inline_body == Some(0) && plan.keep_alive,
                authority,
                grpc_timeout: plan.grpc_timeout,
            };
            // A request waiting for its turn (in a route's queue) is given up when its client
            // leaves: the app is not to do the work of a client that has gone.
            tokio::select! {
                biased;
                admitted = driver::admit(&self.shared, &self.ctx, &facts) => Some(admitted),
                () = self.client.left() => None,
            }
        };
        let Some(admitted) = admitted else {
            exchange.finish_with_error(ErrorKind::ClientDisconnected);
            return Next::Close;
        };
        self.buf.advance(plan.head_len);
        let Admitted {
            in_flight: _in_flight,
            route: mut routed,
        } = match admitted {
            Ok(admitted) => admitted,
            Err(refused) => {
                exchange.route = refused.route.map(|route| (route, 0));
                return self
                    .respond(exchange, refused.response, shape.head_request)
                    .await;
            }
        };
        if let Some(n) = inline_body {
            self.head.extend_from_slice(&self.buf[..n]);
            self.buf.advance(n);
            exchange.request_bytes = n as u64;
        }
        let has_body = plan.framing != Framing::None;
        // The connection survives an error response only when no request bytes are left unread.
        let close_after_error = inline_body.is_none() || !plan.keep_alive;
        let refuse = |kind| Synthetic::new(kind, plan.grpc).closing(close_after_error);

        let deadline = routed.as_ref().and_then(|r| r.deadline);
        if let Some(routed) = &routed {
            exchange.route = Some((routed.state.label.clone(), 0));
        }
        let request = Request {
            method: &plan.method,
            has_body,
            shape,
            // A body in hand can be sent again.
            replayable: inline_body.is_some(),
            grpc_timeout: plan.grpc.then_some(plan.grpc_timeout_at).zip(deadline),
        };
        // One timer for the route's deadline, shared by the attempts and the response's body.
        let mut timer = std::pin::pin!(deadline.map(tokio::time::sleep_until));
        let attempts = self.attempts(&request, &mut routed, &mut exchange, timer.as_mut());
        let (addr, up, response) = match attempts.await {
            Ok(answered) => answered,
            Err(Unanswered::ClientGone) => {
                exchange.finish_with_error(ErrorKind::ClientDisconnected);
                return Next::Close;
            }
            Err(Unanswered::Refused(kind)) => {
                return self
                    .respond(exchange, refuse(kind), shape.head_request)
                    .await;
            }
        };
        let timeouts = routed.as_ref().map(|r| &r.state.counters.timeouts);
        let deadline = timer.as_mut().as_pin_mut().zip(timeouts);
        self.forward_response(addr, up, response, exchange, deadline)
            .await
    }

    /// Sends the request until an attempt gives the response to forward: once (and again on a
    /// fresh connection for the keep-alive race), or on a route, attempt after attempt as its
    /// `retry` allows, each to the endpoint its balancer picks, within the attempt's bound.
    async fn attempts(
        &mut self,
        request: &Request<'_>,
        routed: &mut Option<Routed>,
        exchange: &mut Exchange,
        mut timer: Pin<&mut Option<Sleep>>,
    ) -> Result<(SocketAddr, UpstreamConn, ResponsePlan), Unanswered> {
        let mut fresh = false;
        // The route's attempt in progress (a keep-alive race retry stays within it).
        let mut current: Option<Target> = None;
        let mut grpc_timeout = request.grpc_timeout.clone();
        loop {
            let target = match current.take() {
                Some(target) => target,
                None => self.start_attempt(routed.as_mut(), exchange)?,
            };
            self.tell_time_left(grpc_timeout.as_mut());
            let tried = self
                .try_once(
                    &target,
                    std::mem::take(&mut fresh),
                    request.shape,
                    exchange,
                    request.replayable,
                    timer.as_mut().as_pin_mut(),
                )
                .await;
            let settle = |target: Target, failed: bool| {
                if let Some(routed) = routed.as_ref() {
                    routed.finish_attempt(target.pick, failed);
                }
            };
            let (kind, failure, replayable) = match tried {
                Tried::Answered(up, response) => {
                    let retry = routed
                        .as_ref()
                        .is_some_and(|r| r.retries_response(response.status, response.grpc_status));
                    let addr = target.addr;
                    // A 5xx, or gRPC UNAVAILABLE in the head (gRPC-Web), as on hyper's path.
                    settle(
                        target,
                        driver::response_failed(response.status, response.grpc_status),
                    );
                    let backoff = routed.as_ref().filter(|_| retry).and_then(|r| {
                        r.next_attempt(request.method, request.replayable, AttemptFailure::Response)
                    });
                    let Some(backoff) = backoff else {
                        return Ok((addr, up, response));
                    };
                    // The response goes unread, and its connection with it.
                    drop(up);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                Tried::Failed {
                    kind,
                    sent,
                    reused,
                    connect,
                } => {
                    let attempt = Attempt { reused, sent };
                    if !connect && may_retry(request.method, request.has_body, attempt) {
                        // The keep-alive race: the app closed the reused connection as the
                        // request left. Again, once, on a freshly dialled connection.
                        tracing::debug!(upstream = %target.addr, "the app closed a reused connection without answering: sending the request again on a new one");
                        fresh = true;
                        current = Some(target);
                        continue;
                    }
                    // The client's own failures (its body, its leaving) are no mark against
                    // the endpoint, as on hyper's path.
                    if let Some(routed) = routed.as_ref() {
                        routed.finish_failed_attempt(target.pick, kind);
                    }
                    if kind == ErrorKind::ClientDisconnected {
                        return Err(Unanswered::ClientGone);
                    }
                    let failure = if connect {
                        Some(AttemptFailure::Connect)
                    } else if kind == ErrorKind::ResponseTimeout {
                        // --response-timeout: a per-try timeout, as on the hyper path.
                        Some(AttemptFailure::PerTryTimeout)
                    } else if kind == ErrorKind::UpstreamReset && sent != Sent::ResponseStarted {
                        Some(AttemptFailure::Reset(sent))
                    } else {
                        None
                    };
                    // A connect failure read nothing of a streamed body: it is still whole.
                    (kind, failure, request.replayable || connect)
                }
                Tried::TimedOut => {
                    self.settle_timed_out(routed.as_ref(), target.pick);
                    if let Some(routed) = routed.as_ref()
                        && routed
                            .deadline
                            .is_some_and(|d| tokio::time::Instant::now() >= d)
                    {
                        routed.timed_out();
                        return Err(Unanswered::Refused(ErrorKind::RouteTimeout));
                    }
                    let failure = Some(AttemptFailure::PerTryTimeout);
                    (ErrorKind::ResponseTimeout, failure, request.replayable)
                }
            };
            let backoff = routed
                .as_ref()
                .zip(failure)
                .and_then(|(r, failure)| r.next_attempt(request.method, replayable, failure));
            match backoff {
                Some(backoff) => tokio::time::sleep(backoff).await,
                None => return Err(Unanswered::Refused(kind)),
            }
        }
    }

    /// Ends an attempt whose bound ran out, as [`driver::timed_out_blame`] says: no mark against
    /// the endpoint while the client was still sending the body.
    fn settle_timed_out(&mut self, routed: Option<&Routed>, pick: Option<Pick>) {
        let body_whole = !std::mem::take(&mut self.reading_body);
        if let Some(routed) = routed {
            let blame = driver::timed_out_blame(ErrorKind::ResponseTimeout, body_whole);
            routed.finish_failed_attempt(pick, blame);
        }
    }

    /// A gRPC call on a route with a deadline: the head tells the app what is left of it, as on
    /// hyper's path (`grpc_timeout`: where the field lies in the head, and the deadline).
    fn tell_time_left(&mut self, grpc_timeout: Option<&mut (Range<usize>, tokio::time::Instant)>) {
        if let Some((at, deadline)) = grpc_timeout {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let value = phases::grpc_timeout_value(left);
            framing::set_grpc_timeout(&mut self.head, at, value.as_bytes());
        }
    }

    /// Where the next attempt goes: the request's own destination, or the endpoint the route
    /// picks (noted in the record with the attempt's number).
    fn start_attempt(
        &self,
        routed: Option<&mut Routed>,
        exchange: &mut Exchange,
    ) -> Result<Target, Unanswered> {
        let Some(routed) = routed else {
            return Ok(Target {
                addr: self.ctx.upstream_addr,
                pick: None,
                bound: None,
            });
        };
        let attempt = routed.start_attempt(self.ctx.upstream_addr);
        exchange.route = Some((routed.state.label.clone(), routed.attempts));
        let (addr, pick, bound) = attempt.map_err(Unanswered::Refused)?;
        if pick.is_some() {
            exchange.endpoint = Some(addr);
        }
        Ok(Target { addr, pick, bound })
    }

    /// One attempt: a connection to `target` (a fresh one when `fresh`), the request written
    /// and the response head read, within the attempt's bound.
    async fn try_once(
        &mut self,
        target: &Target,
        fresh: bool,
        shape: Shape,
        exchange: &mut Exchange,
        inline: bool,
        route_timer: Option<Pin<&mut Sleep>>,
    ) -> Tried {
        let attempt = async {
            let up = match self.upstream(target.addr, fresh).await {
                Ok(up) => up,
                Err(kind) => {
                    return Tried::Failed {
                        kind,
                        sent: Sent::Nothing,
                        reused: false,
                        connect: true,
                    };
                }
            };
            let reused = up.reused;
            match self.send_and_read_head(up, shape, exchange, inline).await {
                Ok((up, response)) => Tried::Answered(up, response),
                Err((kind, sent)) => Tried::Failed {
                    kind,
                    sent,
                    reused,
                    connect: false,
                },
            }
        };
        match (target.bound, route_timer) {
            // Bounded by the route's deadline alone: its timer, armed once for the exchange.
            (Some(bound), Some(timer)) if timer.deadline() == bound => tokio::select! {
                biased;
                tried = attempt => tried,
                () = timer => Tried::TimedOut,
            },
            (Some(bound), _) => tokio::time::timeout_at(bound, attempt)
                .await
                .unwrap_or(Tried::TimedOut),
            (None, _) => attempt.await,
        }
    }

    /// The response phase: the head (with `Connection: close` when draining) and the body; the
    /// app connection is kept for the next request only when it carried nothing more.
    async fn forward_response(
        &mut self,
        addr: SocketAddr,
        mut up: UpstreamConn,
        response: ResponsePlan,
        mut exchange: Exchange,
        deadline: Option<(Pin<&mut Sleep>, &Counter)>,
    ) -> Next {
        let closing = self.slot.close_requested();
        if closing && response.keep_alive {
            // Draining: this response is the connection's last.
            let at = self.out.len() - 2;
            let field: &[u8] = if self.shared.settings.traffic.lowercase_header_names {
                b"connection: close\r\n"
            } else {
                b"Connection: close\r\n"
            };
            self.out.splice(at..at, field.iter().copied());
        }
        exchange.status = response.status;
        exchange.grpc_status = response.grpc_status;
        up.buf.advance(response.head_len);
        let copying = copy_body::<false>(
            &mut up.stream,
            &mut up.buf,
            &mut self.client,
            response.framing,
            &mut self.out,
            &mut exchange.response_bytes,
            self.shared.settings.traffic.timeouts.response_body,
        );
        let copied = match deadline {
            // A route's timeout covers the body too.
            Some((timer, timeouts)) => tokio::select! {
                biased;
                copied = copying => copied,
                () = timer => {
                    timeouts.inc();
                    Err(CopyError::Deadline)
                }
            },
            None => copying.await,
        };
        match copied {
            Ok(trailer_status) => {
                // A gRPC status in the trailers is the call's (as the hyper path reads it).
                exchange.grpc_status = trailer_status.or(exchange.grpc_status);
                exchange.finish(None);
            }
            Err(e) => {
                // The client has the head and part of the body: a clean end of the connection
                // would make a response delimited by the close look complete (and any other
                // look merely short). A reset says it was cut.
                self.client.abort();
                self.aborted = true;
                exchange.finish(Some(match e {
                    CopyError::Write => ErrorKind::ClientDisconnected,
                    CopyError::Stalled => ErrorKind::ResponseBodyTimeout,
                    CopyError::Deadline => ErrorKind::RouteTimeout,
                    CopyError::Read | CopyError::Invalid => ErrorKind::UpstreamBody,
                }));
                return Next::Close;
            }
        }
        // Anything the app sent beyond the response (RFC 9112 6.3) means the connection is not
        // to be trusted with another request.
        if response.upstream_reusable && up.buf.is_empty() {
            up.reused = true;
            self.sticky = Some((addr, up));
        }
        if response.keep_alive && !closing {
            Next::KeepAlive
        } else {
            if std::mem::take(&mut self.body_left_unread) {
                // The client may still be sending the body: a close with its bytes unread
                // would reset the answer away.
                linger_close(&mut self.client).await;
            }
            Next::Close
        }
    }

    /// A connection to `addr`: the one the last request used, else a pooled one, else a new one;
    /// `fresh` always dials.
    async fn upstream(&mut self, addr: SocketAddr, fresh: bool) -> Result<UpstreamConn, ErrorKind> {
        if !fresh {
            match self.sticky.take() {
                Some((at, up)) if at == addr && up.is_clean() => return Ok(up),
                // Another endpoint's (a route's balancer picked elsewhere): back to the pool.
                Some((at, up)) if at != addr => self.shared.upstreams.pool.checkin(at, up),
                _ => {}
            }
            if let Some(up) = self.shared.upstreams.pool.checkout(addr) {
                return Ok(up);
            }
        }
        self.shared
            .upstreams
            .connect(addr)
            .await
            .map_err(|e| classify_io(&e, true))
    }

    /// Writes the request (streaming its body when it is not all in hand) and reads the response
    /// head. On failure: what went wrong and how far the request got, for the retry rule.
    async fn send_and_read_head(
        &mut self,
        mut up: UpstreamConn,
        plan: Shape,
        exchange: &mut Exchange,
        inline: bool,
    ) -> Result<(UpstreamConn, ResponsePlan), (ErrorKind, Sent)> {
        let timeouts = self.shared.settings.traffic.timeouts;
        if inline {
            // Nearly always the kernel takes the request whole at once, with no timer or clock
            // read. A first write that fails wrote nothing (the app reset the idle connection):
            // the request provably never left, whatever its method.
            let first = match up.stream.try_write(&self.head) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(_) => return Err((ErrorKind::UpstreamReset, Sent::Nothing)),
            };
            if first < self.head.len() {
                // An app that does not take the request within --response-timeout is too slow,
                // as one that does not answer it (a head of megabytes, under a raised
                // --max-header-bytes, outgrows the sockets' buffers).
                let (head, stream) = (&self.head, &mut up.stream);
                let rest = async move {
                    let mut at = first;
                    if at == 0 {
                        at = stream.write(head).await.map_err(|_| Sent::Nothing)?;
                    }
                    (stream.write_all(&head[at..]).await).map_err(|_| Sent::NoResponse)
                };
                match timeout(timeouts.response, rest).await {
                    Ok(Ok(())) => {}
                    Ok(Err(sent)) => return Err((ErrorKind::UpstreamReset, sent)),
                    Err(_) => return Err((ErrorKind::ResponseTimeout, Sent::ResponseStarted)),
                }
            }
        } else {
            let mut head = std::mem::take(&mut self.head);
            self.reading_body = true;
            let sent = send_body_watching_app(
                &mut self.client,
                &mut self.buf,
                &mut up,
                plan.framing,
                &mut head,
                &mut exchange.request_bytes,
                timeouts.request_body,
            )
            .await;
            self.head = head;
            self.reading_body = false;
            let refused = match sent {
                Ok(BodySent::Whole) => false,
                Ok(BodySent::Refused) => true,
                // The app stopped taking the body: an answer it gave first is still to be read.
                Err(CopyError::Write) if drain_ready(&mut up) => true,
                Err(e) => {
                    // The app connection is dropped with the request half sent: never reused.
                    let kind = match e {
                        CopyError::Write => ErrorKind::UpstreamReset,
                        CopyError::Read => ErrorKind::ClientBody,
                        CopyError::Invalid => ErrorKind::BadRequest,
                        CopyError::Stalled => ErrorKind::RequestTimeout,
                        CopyError::Deadline => ErrorKind::RouteTimeout,
                    };
                    return Err((kind, Sent::ResponseStarted));
                }
            };
            if refused {
                // The app answered and reads no more of the body (RFC 9112 9.5): its answer
                // goes to the client, and both connections end after it.
                let shape = Shape {
                    keep_alive: false,
                    ..plan
                };
                let deadline = tokio::time::Instant::now() + timeouts.response;
                return match self.read_response_head(&mut up, shape, deadline).await {
                    Ok(mut response) => {
                        response.upstream_reusable = false;
                        self.body_left_unread = true;
                        Ok((up, response))
                    }
                    Err(e) => Err((
                        match e {
                            HeadError::Timeout => ErrorKind::ResponseTimeout,
                            HeadError::ClientGone => ErrorKind::ClientDisconnected,
                            HeadError::Upstream(kind, _) => kind,
                        },
                        Sent::ResponseStarted,
                    )),
                };
            }
        }
        // The response timeout counts from the end of the request.
        let deadline = tokio::time::Instant::now() + timeouts.response;
        match self.read_response_head(&mut up, plan, deadline).await {
            Ok(response) => Ok((up, response)),
            Err(HeadError::Timeout) => Err((ErrorKind::ResponseTimeout, Sent::ResponseStarted)),
            Err(HeadError::ClientGone) => {
                Err((ErrorKind::ClientDisconnected, Sent::ResponseStarted))
            }
            Err(HeadError::Upstream(kind, got_bytes)) => {
                let sent = if got_bytes || kind != ErrorKind::UpstreamReset {
                    Sent::ResponseStarted
                } else {
                    Sent::NoResponse
                };
                Err((kind, sent))
            }
        }
    }

    /// Reads the app's response head, skipping interim responses. Meanwhile watches the client:
    /// if it goes away the request is abandoned (the upstream connection is dropped, which the
    /// app sees).
    async fn read_response_head(
        &mut self,
        up: &mut UpstreamConn,
        plan: Shape,
        deadline: tokio::time::Instant,
    ) -> Result<ResponsePlan, HeadError> {
        let head_request = plan.head_request;
        let lowercase = self.shared.settings.traffic.lowercase_header_names;
        let max_pipelined = self.shared.settings.traffic.max_header_bytes;
        let mut watch_client = true;
        let mut got_bytes = false;
        let sleep = tokio::time::sleep_until(deadline);
        let mut sleep = std::pin::pin!(sleep);
        loop {
            if !up.buf.is_empty() {
                got_bytes = true;
                match plan_response(
                    &up.buf,
                    head_request,
                    plan.keep_alive,
                    lowercase,
                    &mut self.out,
                ) {
                    Ok(Some(response)) if response.interim => {
                        up.buf.advance(response.head_len);
                        continue;
                    }
                    Ok(Some(response)) => return Ok(response),
                    Ok(None) if up.buf.len() > UPSTREAM_MAX_HEAD => {
                        return Err(HeadError::Upstream(ErrorKind::UpstreamProtocol, true));
                    }
                    Ok(None) => {}
                    Err(InvalidResponse) => {
                        return Err(HeadError::Upstream(ErrorKind::UpstreamProtocol, true));
                    }
                }
            }
            up.buf.reserve(READ_CHUNK);
            tokio::select! {
                biased;
                read = up.stream.read_buf(&mut up.buf) => match read {
                    Ok(0) | Err(_) => return Err(HeadError::Upstream(ErrorKind::UpstreamReset, got_bytes)),
                    Ok(_) => {}
                },
                ready = self.client.readable(), if watch_client => {
                    if ready.is_err() {
                        return Err(HeadError::ClientGone);
                    }
                    self.buf.reserve(1024);
                    match self.client.try_read_buf(&mut self.buf) {
                        Ok(0) => return Err(HeadError::ClientGone),
                        // A pipelined request: kept for later; stop watching if the client floods.
                        Ok(_) => watch_client = self.buf.len() < max_pipelined,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => return Err(HeadError::ClientGone),
                    }
                }
                () = &mut sleep => return Err(HeadError::Timeout),
            }
        }
    }

    /// Answers with a response the proxy makes itself and ends the exchange. The connection
    /// closes afterwards when the response says so or the write failed. `head_request`: the
    /// answer to HEAD has no body (RFC 9112 6.3), only the `Content-Length` a GET would get.
    async fn respond(
        &mut self,
        exchange: Exchange,
        synthetic: Synthetic,
        head_request: bool,
    ) -> Next {
        // Draining: this answer is the connection's last and says so, as a forwarded one does.
        let synthetic = synthetic.closing(synthetic.close || self.slot.close_requested());
        synthetic.render_h1(
            self.shared.settings.traffic.lowercase_header_names,
            &mut self.out,
        );
        if head_request {
            // A client reads no body after HEAD: on a connection kept open these bytes would
            // begin its next response.
            self.out.truncate(self.out.len() - synthetic.body().len());
        }
        // Logged before the write: whoever reads the answer finds the record and the metrics.
        exchange.refused(synthetic);
        // Bounded as a response body's writes are: a client (or a tunnel's peer that never opens
        // its window) that takes nothing cannot keep the exchange's slots.
        let stall = self.shared.settings.traffic.timeouts.response_body;
        let written = write_taken(&mut self.client, &self.out, stall)
            .await
            .is_ok();
        if written && !synthetic.close {
            return Next::KeepAlive;
        }
        if written {
            linger_close(&mut self.client).await;
        }
        Next::Close
    }
}

/// How many bytes of empty lines (CRLF or a bare LF, which httparse skips too) begin `buf`.
fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match &buf[at..] {
            [b'\n', ..] => at += 1,
            [b'\r', b'\n', ..] => at += 2,
            _ => return at,
        }
    }
}

/// Whether `bytes` may hold the empty line that ends a head (`LF CR` or `LF LF`; a head always
/// ends in `LF CRLF` or `LF LF`).
fn has_empty_line(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .any(|w| w[0] == b'\n' && (w[1] == b'\n' || w[1] == b'\r'))
}

/// How sending a streamed request body ended, the app watched meanwhile.
enum BodySent {
    /// All of it went.
    Whole,
    /// The app answered first, saying it reads no more of it: the rest was not sent.
    Refused,
}

/// Streams the request's body to the app as [`copy_body`] does, reading what the app sends
/// meanwhile into `up.buf`: an answer that says the app reads no more of the body (an error that
/// says close, as a 413 to an upload too large: [`early_answer_ends_request`]) ends the sending,
/// where waiting for the app to take a body it will never read would end in a timeout. Any other
/// answer (an app that may be reading on) changes nothing: the whole body goes first.
async fn send_body_watching_app(
    client: &mut impl ClientIo,
    client_buf: &mut BytesMut,
    up: &mut UpstreamConn,
    framing: Framing,
    head: &mut Vec<u8>,
    copied: &mut u64,
    stall: Duration,
) -> Result<BodySent, CopyError> {
    let (mut from_app, mut to_app) = up.stream.split();
    let sending = copy_body::<true>(
        client,
        client_buf,
        &mut to_app,
        framing,
        head,
        copied,
        stall,
    );
    let mut sending = std::pin::pin!(sending);
    let mut watching = true;
    loop {
        if watching {
            up.buf.reserve(HEAD_CHUNK);
        }
        tokio::select! {
            biased;
            sent = &mut sending => return sent.map(|_| BodySent::Whole),
            read = from_app.read_buf(&mut up.buf), if watching => match read {
                Ok(n) if n > 0 => match early_answer_ends_request(&up.buf) {
                    Some(true) => return Ok(BodySent::Refused),
                    Some(false) => watching = false,
                    // A head past the limit is the app's error, found when it is read as one.
                    None => watching = up.buf.len() <= UPSTREAM_MAX_HEAD,
                },
                // The app closed or reset: the next write of the body says so.
                _ => watching = false,
            },
        }
    }
}

/// Reads what the app has sent and not been read, without waiting (after a failed write: an app
/// that answers and closes with the body unread resets the connection, and the answer arrived
/// before the reset). Straight from the socket: tokio may not have heard yet that it is readable.
/// Whether there is anything of an answer.
fn drain_ready(up: &mut UpstreamConn) -> bool {
    use std::io::Read;
    let socket = socket2::SockRef::from(&up.stream);
    let mut chunk = [0u8; HEAD_CHUNK];
    while up.buf.len() <= UPSTREAM_MAX_HEAD {
        match (&*socket).read(&mut chunk) {
            Ok(n) if n > 0 => up.buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    !up.buf.is_empty()
}

/// Copies one body from `src` to `dst`. `out` holds a head not yet written: the body's first bytes
/// already in `src_buf` join it so that a small message leaves in one write. Bytes after the body
/// stay in `src_buf` (a pipelined request). `copied` ends as the body's size (without chunk
/// framing), or what was copied before an error. Each read waits at most `stall`. `REQUEST`: the
/// body is a request's (a chunked one's trailer section is checked for forbidden fields).
async fn copy_body<const REQUEST: bool>(
    src: &mut (impl AsyncRead + Unpin),
    src_buf: &mut BytesMut,
    dst: &mut (impl AsyncWrite + Unpin),
    framing: Framing,
    out: &mut Vec<u8>,
    copied: &mut u64,
    stall: Duration,
) -> Result<Option<u16>, CopyError> {
    *copied = 0;
    // A request's trailer section is checked for the fields it may not carry.
    let mut tracker = if REQUEST {
        ChunkedTracker::request()
    } else {
        ChunkedTracker::default()
    };
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut pending_head = !out.is_empty();
    loop {
        // Take what belongs to the body from the buffer; a chunked body is checked before any of
        // it is forwarded, so nothing after a framing error reaches the other side.
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
            write_taken(dst, out, stall).await?;
            pending_head = false;
        } else if take > 0 {
            write_taken(dst, &src_buf[..take], stall).await?;
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
            return Ok(tracker.grpc_status());
        }
        src_buf.reserve(READ_CHUNK);
        match timeout(stall, src.read_buf(src_buf)).await {
            Err(_) => return Err(CopyError::Stalled),
            Ok(Ok(0)) if framing == Framing::UntilClose => return Ok(None),
            Ok(Ok(0) | Err(_)) => return Err(CopyError::Read),
            Ok(Ok(_)) => {}
        }
    }
}

/// Writes `bytes` to the other side, which must take them within twice `stall` (the same bound as
/// the hyper path's for a response nobody takes: a peer that stops reading cannot hold the
/// exchange, and the connections behind it, for good). No timer is armed when the write completes
/// at once, as nearly all do.
async fn write_taken(
    dst: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
    stall: Duration,
) -> Result<(), CopyError> {
    match timeout(2 * stall, dst.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(CopyError::Write),
    }
}

/// Closing a socket with unread input makes the kernel send a reset, which can destroy the
/// response before the client reads it. So: send FIN, then read and discard what the client is
/// still sending, for a bounded time and amount (nginx's lingering close).
async fn linger_close(client: &mut impl ClientIo) {
    let _ = client.shutdown().await;
    let drain = async {
        // On the heap: this rare path would otherwise make every connection's task 8 KiB larger.
        let mut sink = vec![0u8; 8192];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = timeout(LINGER_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    /// A read that empties the socket tells tokio so: the next wait for input waits, where it
    /// would otherwise resolve at once and cost a read that finds nothing (one system call more
    /// per request on the fast path: 3 reads per request instead of 2 under wrk).
    #[tokio::test]
    async fn a_short_read_leaves_the_socket_waiting_for_input() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut peer = TcpStream::connect(addr).await.expect("connect");
        let (mut ours, _) = listener.accept().await.expect("accept");
        peer.write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        ClientIo::readable(&mut ours).await.expect("readable");
        let mut buf = BytesMut::with_capacity(4096);
        let n = ClientIo::try_read_buf(&mut ours, &mut buf).expect("a read");
        assert_eq!(n, 18);
        assert!(
            ClientIo::readable(&mut ours).now_or_never().is_none(),
            "readable at once after a read that emptied the socket"
        );
        peer.write_all(b"more").await.expect("write");
        let more = tokio::time::timeout(Duration::from_secs(10), ClientIo::readable(&mut ours));
        more.await
            .expect("bounded")
            .expect("readable again when more comes");
    }
}
