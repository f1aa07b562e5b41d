//! The hyper path's body wrappers: frames stream through untouched while the wrappers count what
//! really crossed the wire and bound every pause.
//!
//! The response body carries the request's [`Exchange`]: the access-log record and the metrics are
//! written when the last frame has gone out, or when the body is dropped early (client gone), so
//! the sizes and the duration cover the whole exchange, not just the headers.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::exchange::{ConnControl, Exchange, RequestProgress};
use super::limits::{InFlight, RequestMark};
use super::phases;
use super::traffic::concurrency::ConcurrencyPermit;
use crate::error::ErrorKind;
use crate::sync::lock;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bounds the pauses of a stream of frames: fires when the stream has had nothing to give for
/// `limit`. A pause counts from the first poll that found nothing after a frame (the proxy waits
/// from then on; a reader that does not ask meanwhile is not the stream's pause), so the clock is
/// read only when the stream makes the proxy wait, never per frame.
struct Stall {
    limit: Duration,
    /// A bound on the whole stream, whatever its pace (a route's `timeout`).
    deadline: Option<Instant>,
    /// When the current pause began; a frame ends it.
    paused_since: Option<Instant>,
    /// Created the first time the body has to wait: most bodies never do.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Stall {
        Stall {
            limit,
            deadline: None,
            paused_since: None,
            timer: None,
        }
    }

    fn progressed(&mut self) {
        self.paused_since = None;
    }

    /// Whether the whole stream's deadline has passed.
    fn past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
    }

    /// Called when the inner body is pending: `Ready` once the pause is too long, or the whole
    /// stream's deadline has come.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let paused = *self.paused_since.get_or_insert_with(Instant::now) + self.limit;
        let deadline = self.deadline.map_or(paused, |hard| hard.min(paused));
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Stalled(ErrorKind);

pub struct RequestBody(Kind);

enum Kind {
    /// No body (a request sent again after the keep-alive race).
    Empty,
    /// The client's body, streamed as it arrives.
    Stream(Stream),
    /// One attempt's view of a body kept to be sent again ([`Replayable`]).
    Replay(Cursor),
}

struct Stream {
    inner: Incoming,
    progress: Option<Arc<RequestProgress>>,
    stall: Stall,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        progress: Option<Arc<RequestProgress>>,
        request_body_timeout: Duration,
    ) -> Self {
        RequestBody(Kind::Stream(Stream {
            inner,
            progress,
            stall: Stall::new(request_body_timeout),
        }))
    }

    pub fn empty() -> Self {
        RequestBody(Kind::Empty)
    }
}

impl Stream {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                ready!(self.stall.poll_expired(cx));
                if let Some(progress) = &self.progress {
                    progress.timed_out.store(true, Ordering::Relaxed);
                    progress.failed.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(Box::new(Stalled(ErrorKind::RequestTimeout)))));
            }
        };
        self.stall.progressed();
        let mut frame = frame;
        if let Some(trailers) = frame.as_mut().and_then(|f| f.as_mut().ok()?.trailers_mut()) {
            drop_forbidden_trailers(trailers);
        }
        if let Some(progress) = &self.progress {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(data) = f.data_ref() {
                        progress
                            .bytes
                            .fetch_add(data.len() as u64, Ordering::Relaxed);
                    }
                }
                Some(Err(_)) => progress.failed.store(true, Ordering::Relaxed),
                None => progress.end(),
            }
            // hyper's client takes no more of a body once its length is sent, and never polls
            // for the end of a stream that the client ends in a later frame.
            if self.inner.is_end_stream() || self.inner.size_hint().exact() == Some(0) {
                progress.end();
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }
}

/// Removes from a request's trailers the fields that may not come there
/// ([`phases::forbidden_in_request_trailers`]: framing, routing, the fields the proxy owns). The
/// head has gone to the app by the time trailers arrive: here they are dropped, where the HTTP/1.1
/// fast path, which passes trailers on byte for byte, refuses the request (400).
fn drop_forbidden_trailers(trailers: &mut http::HeaderMap) {
    let forbidden: Vec<http::HeaderName> = trailers
        .keys()
        .filter(|name| phases::forbidden_in_request_trailers(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in forbidden {
        trailers.remove(name);
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Empty => Poll::Ready(None),
            Kind::Stream(stream) => stream.poll_frame(cx),
            Kind::Replay(cursor) => cursor.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Empty => true,
            Kind::Stream(stream) => stream.inner.is_end_stream(),
            Kind::Replay(cursor) => cursor.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Stream(stream) => stream.inner.size_hint(),
            Kind::Replay(cursor) => cursor.size_hint(),
        }
    }
}

/// A request body that can be sent again (a route's retries; linkerd2-proxy's `ReplayBody`):
/// each attempt's body streams what the client sends as it arrives, and a copy of it is kept,
/// up to `limit` bytes, so that the next attempt replays the copy and then goes on reading
/// the client. A body longer than `limit` is sent once: [`Replayable::can_replay`] then says no.
/// Only the newest attempt's body reads: an older one still held by its abandoned request
/// fails.
pub struct Replayable(Arc<std::sync::Mutex<Kept>>);

/// Any request body (the client's, in production; a test's own).
type AnyBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

struct Kept {
    source: AnyBody,
    frames: Vec<Bytes>,
    size: usize,
    limit: usize,
    trailers: Option<http::HeaderMap>,
    /// The source has ended: the copy is the whole body.
    ended: bool,
    /// More than `limit` was read, or the source failed: no more attempts.
    spent: bool,
    /// The attempt that was reading when the copy was given up: the only one that may go on
    /// reading the client's body (any other would send it without its beginning).
    spent_by: u32,
    /// The attempt whose body may read.
    generation: u32,
}

struct Cursor {
    kept: Arc<std::sync::Mutex<Kept>>,
    generation: u32,
    /// The next kept frame to replay.
    next: usize,
    trailers_sent: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body was handed to a newer attempt")]
struct Superseded;

impl Replayable {
    pub fn new<B>(source: B, limit: usize) -> Replayable
    where
        B: Body<Data = Bytes, Error = BoxError> + Send + 'static,
    {
        Replayable(Arc::new(std::sync::Mutex::new(Kept {
            source: Box::pin(source),
            frames: Vec::new(),
            size: 0,
            limit,
            trailers: None,
            ended: false,
            spent: false,
            spent_by: 0,
            generation: 0,
        })))
    }

    /// The body of the next attempt: the kept copy, then the rest of the client's body.
    pub fn attempt(&self) -> RequestBody {
        let mut kept = lock(&self.0);
        kept.generation = kept.generation.wrapping_add(1);
        RequestBody(Kind::Replay(Cursor {
            kept: self.0.clone(),
            generation: kept.generation,
            next: 0,
            trailers_sent: false,
        }))
    }

    /// Ends the current attempt's reading: its body, if hyper still polls it, reads no more
    /// (so that the copy cannot change between this and the next attempt). Call when an attempt
    /// has failed, before [`Replayable::can_replay`].
    pub fn seal(&self) {
        let mut kept = lock(&self.0);
        kept.generation = kept.generation.wrapping_add(1);
    }

    /// Whether another attempt could send the whole body.
    pub fn can_replay(&self) -> bool {
        !lock(&self.0).spent
    }
}

impl Cursor {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut kept = lock(&self.kept);
        // An older attempt's body; or the copy is gone and this attempt would send the body
        // without its beginning.
        if kept.generation != self.generation || (kept.spent && kept.spent_by != self.generation) {
            return Poll::Ready(Some(Err(Box::new(Superseded))));
        }
        if let Some(data) = kept.frames.get(self.next) {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(data.clone()))));
        }
        if kept.ended {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(trailers) = kept.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
            }
            return Poll::Ready(None);
        }
        let kept = &mut *kept;
        let frame = ready!(kept.source.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !kept.spent && kept.size + data.len() <= kept.limit {
                        kept.size += data.len();
                        kept.frames.push(data.clone());
                    } else if !kept.spent {
                        kept.spent = true;
                        kept.spent_by = self.generation;
                        kept.frames = Vec::new();
                    }
                    self.next = kept.frames.len();
                } else if let Some(trailers) = frame.trailers_ref() {
                    kept.trailers = Some(trailers.clone());
                    kept.ended = true;
                    self.trailers_sent = true;
                }
                if kept.source.is_end_stream() {
                    kept.ended = true;
                }
            }
            Some(Err(_)) => {
                if !kept.spent {
                    kept.spent = true;
                    kept.spent_by = self.generation;
                }
            }
            None => kept.ended = true,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        let kept = lock(&self.kept);
        kept.generation == self.generation
            && !(kept.spent && kept.spent_by != self.generation)
            && kept.ended
            && self.next >= kept.frames.len()
            && (self.trailers_sent || kept.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        let kept = lock(&self.kept);
        if kept.ended {
            let left: usize = kept.frames.iter().skip(self.next).map(Bytes::len).sum();
            SizeHint::with_exact(left as u64)
        } else if kept.frames.is_empty() && self.next == 0 && !kept.spent {
            kept.source.size_hint()
        } else {
            SizeHint::default()
        }
    }
}

enum Source {
    Upstream(Incoming, Stall),
    /// A response the proxy wrote itself (errors): sent in one frame.
    Message(Option<Bytes>),
}

pub struct ResponseBody {
    source: Source,
    exchange: Option<Exchange>,
    /// The request stays counted in flight until its response is done.
    in_flight: Option<InFlight>,
    /// And holds its route's concurrency slot.
    permit: Option<ConcurrencyPermit>,
    /// The route's count of requests cut by its timeout.
    timeouts: Option<prometheus_client::metrics::counter::Counter>,
    /// And open on its connection (hyper's), which is idle only once no response is in progress.
    open: Option<RequestMark>,
    /// The request's hold on its HTTP/1.1 connection to the app, given up if its body is still
    /// coming when this response is done ([`ConnControl`]).
    give_up: Option<(Arc<ConnControl>, Arc<RequestProgress>)>,
}

impl ResponseBody {
    pub fn upstream(
        inner: Incoming,
        exchange: Exchange,
        in_flight: Option<InFlight>,
        response_body_timeout: Duration,
    ) -> Self {
        ResponseBody {
            source: Source::Upstream(inner, Stall::new(response_body_timeout)),
            exchange: Some(exchange),
            in_flight,
            permit: None,
            timeouts: None,
            open: None,
            give_up: None,
        }
    }

    /// Gives up the request's connection to the app when this response is done before the
    /// request's body ([`ConnControl`]).
    pub fn giving_up(mut self, give_up: Option<(Arc<ConnControl>, Arc<RequestProgress>)>) -> Self {
        self.give_up = give_up;
        self
    }

    /// Bounds the whole body by `deadline` (a route's timeout; past it the body is cut and the
    /// exchange logged `route_timeout`) and holds the route's concurrency slot until it ends.
    pub fn routed(
        mut self,
        deadline: Option<Instant>,
        permit: Option<ConcurrencyPermit>,
        timeouts: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        if let Source::Upstream(_, stall) = &mut self.source {
            stall.deadline = deadline;
        }
        self.permit = permit;
        self.timeouts = Some(timeouts);
        self
    }

    pub fn message(text: &'static str, exchange: Option<Exchange>) -> Self {
        // No text (a gRPC refusal: its status is in the head): no body at all, so that HTTP/2
        // ends the stream with the HEADERS frame (a trailers-only response, as gRPC requires).
        let text = (!text.is_empty()).then(|| Bytes::from_static(text.as_bytes()));
        ResponseBody {
            source: Source::Message(text),
            exchange,
            in_flight: None,
            permit: None,
            timeouts: None,
            open: None,
            give_up: None,
        }
    }

    /// An empty body whose exchange is logged elsewhere (an upgraded tunnel logs at its close).
    pub fn empty() -> Self {
        ResponseBody {
            source: Source::Message(None),
            exchange: None,
            in_flight: None,
            permit: None,
            timeouts: None,
            open: None,
            give_up: None,
        }
    }

    /// Keeps the request open on its connection until this body is done.
    pub fn holding(mut self, open: RequestMark) -> Self {
        self.open = Some(open);
        self
    }

    fn finish(&mut self, error: Option<ErrorKind>) {
        if let Some(exchange) = self.exchange.take() {
            exchange.finish(error);
        }
        self.in_flight = None;
        self.permit = None;
        self.open = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(open) = &this.open {
            open.touch();
        }
        let frame = match &mut this.source {
            Source::Upstream(inner, stall) => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(ref frame))) if frame.is_data() && stall.past_deadline() => {
                    if let Some(timeouts) = &this.timeouts {
                        timeouts.inc();
                    }
                    this.finish(Some(ErrorKind::RouteTimeout));
                    return Poll::Ready(Some(Err(Box::new(Stalled(ErrorKind::RouteTimeout)))));
                }
                Poll::Ready(frame) => {
                    stall.progressed();
                    frame.map(|f| f.map_err(BoxError::from))
                }
                Poll::Pending => {
                    ready!(stall.poll_expired(cx));
                    let kind = if stall.past_deadline() {
                        if let Some(timeouts) = &this.timeouts {
                            timeouts.inc();
                        }
                        ErrorKind::RouteTimeout
                    } else {
                        ErrorKind::ResponseBodyTimeout
                    };
                    this.finish(Some(kind));
                    return Poll::Ready(Some(Err(Box::new(Stalled(kind)))));
                }
            },
            Source::Message(data) => data.take().map(|d| Ok(Frame::data(d))),
        };
        match &frame {
            Some(Ok(f)) => {
                if let Some(exchange) = &mut this.exchange {
                    if let Some(data) = f.data_ref() {
                        exchange.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = f.trailers_ref() {
                        exchange.read_grpc_status(trailers);
                    }
                }
                if this.is_end_stream() {
                    this.finish(None);
                }
            }
            Some(Err(_)) => this.finish(Some(ErrorKind::UpstreamBody)),
            None => this.finish(None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Upstream(inner, _) => inner.is_end_stream(),
            Source::Message(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream(inner, _) => inner.size_hint(),
            Source::Message(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper drops a body without polling it to the end when it knows it is complete (HEAD,
        // 204, content-length reached); otherwise the client went away mid-response.
        let error = (!self.is_end_stream()).then_some(ErrorKind::ClientDisconnected);
        self.finish(error);
        if let Some((give_up, progress)) = self.give_up.take()
            && !progress.ended_flag.load(Ordering::Acquire)
        {
            give_up.give_up();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body of these frames (data, then trailers when given), then its end.
    fn body_of(
        chunks: &[&'static str],
        trailers: Option<http::HeaderMap>,
    ) -> impl Body<Data = Bytes, Error = BoxError> + Send + 'static {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        if let Some(trailers) = trailers {
            frames.push(Ok(Frame::trailers(trailers)));
        }
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read(body: RequestBody) -> (Vec<u8>, Option<http::HeaderMap>) {
        let collected = body.collect().await.expect("the body");
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn every_attempt_sends_the_same_bytes_and_trailers() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let replay = Replayable::new(body_of(&["ab", "cd", "e"], Some(trailers)), 64);
        for _ in 0..3 {
            let (bytes, trailers) = read(replay.attempt()).await;
            assert_eq!(bytes, b"abcde");
            assert_eq!(
                trailers.and_then(|t| t.get("grpc-status").cloned()),
                Some(http::HeaderValue::from_static("0"))
            );
            assert!(replay.can_replay());
        }
    }

    #[tokio::test]
    async fn an_attempt_cut_short_is_completed_by_the_next() {
        let replay = Replayable::new(body_of(&["ab", "cd", "ef"], None), 64);
        // The first attempt reads one frame and fails: the next replays it, then reads on.
        let mut first = replay.attempt();
        let frame = first.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"ab")));
        let second = replay.attempt();
        // The old attempt's body is superseded: it can no longer take the client's frames.
        assert!(first.frame().await.is_some_and(|f| f.is_err()));
        assert_eq!(read(second).await.0, b"abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_once_and_is_not_replayable() {
        let replay = Replayable::new(body_of(&["abcd", "efgh", "ij"], None), 6);
        assert_eq!(read(replay.attempt()).await.0, b"abcdefghij");
        assert!(!replay.can_replay());
    }

    #[tokio::test]
    async fn no_attempt_sends_a_body_without_its_beginning() {
        let replay = Replayable::new(body_of(&["abcd", "efgh", "ij"], None), 6);
        let mut first = replay.attempt();
        let _ = first.frame().await;
        // The first attempt failed (sealed); hyper still polls its body, which reads no more.
        replay.seal();
        assert!(first.frame().await.is_some_and(|f| f.is_err()));
        assert!(replay.can_replay(), "4 bytes kept of 6");
        // Another attempt reads past the limit: the copy is given up, and an attempt after it
        // refuses to send the rest alone.
        let mut second = replay.attempt();
        let mut sent = Vec::new();
        while let Some(Ok(frame)) = second.frame().await {
            sent.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        assert_eq!(sent, b"abcdefghij");
        assert!(!replay.can_replay());
        let mut third = replay.attempt();
        assert!(third.frame().await.is_some_and(|f| f.is_err()));
    }

    #[tokio::test]
    async fn a_replayed_whole_body_says_its_exact_size() {
        let replay = Replayable::new(body_of(&["abc", "de"], None), 64);
        let _ = read(replay.attempt()).await;
        let again = replay.attempt();
        assert_eq!(again.size_hint().exact(), Some(5));
        assert!(!again.is_end_stream());
        assert_eq!(read(again).await.0, b"abcde");
    }
}
