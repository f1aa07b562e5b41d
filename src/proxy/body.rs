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

use super::exchange::{Exchange, RequestProgress};
use super::limits::{InFlight, RequestMark};
use crate::error::ErrorKind;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bounds the pauses of a stream of frames: fires when no frame came for `limit`.
struct Stall {
    limit: Duration,
    last_frame: Instant,
    /// Created the first time the body has to wait: most bodies never do.
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    fn new(limit: Duration) -> Stall {
        Stall {
            limit,
            last_frame: Instant::now(),
            timer: None,
        }
    }

    fn progressed(&mut self) {
        self.last_frame = Instant::now();
    }

    /// Called when the inner body is pending: `Ready` once the pause is too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.last_frame + self.limit;
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

pub struct RequestBody {
    /// `None`: no body (a request sent again after the keep-alive race).
    inner: Option<Incoming>,
    progress: Option<Arc<RequestProgress>>,
    stall: Stall,
}

impl RequestBody {
    pub fn new(
        inner: Incoming,
        progress: Option<Arc<RequestProgress>>,
        request_body_timeout: Duration,
    ) -> Self {
        RequestBody {
            inner: Some(inner),
            progress,
            stall: Stall::new(request_body_timeout),
        }
    }

    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            progress: None,
            stall: Stall::new(Duration::MAX),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                ready!(this.stall.poll_expired(cx));
                if let Some(progress) = &this.progress {
                    progress.timed_out.store(true, Ordering::Relaxed);
                    progress.failed.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Err(Box::new(Stalled(ErrorKind::RequestTimeout)))));
            }
        };
        this.stall.progressed();
        if let Some(progress) = &this.progress {
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
            if this.inner.as_ref().is_some_and(Incoming::is_end_stream) {
                progress.end();
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), Incoming::size_hint)
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
    /// And open on its connection (hyper's), which is idle only once no response is in progress.
    open: Option<RequestMark>,
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
            open: None,
        }
    }

    pub fn message(text: &'static str, exchange: Option<Exchange>) -> Self {
        ResponseBody {
            source: Source::Message(Some(Bytes::from_static(text.as_bytes()))),
            exchange,
            in_flight: None,
            open: None,
        }
    }

    /// An empty body whose exchange is logged elsewhere (an upgraded tunnel logs at its close).
    pub fn empty() -> Self {
        ResponseBody {
            source: Source::Message(None),
            exchange: None,
            in_flight: None,
            open: None,
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
                Poll::Ready(frame) => {
                    stall.progressed();
                    frame.map(|f| f.map_err(BoxError::from))
                }
                Poll::Pending => {
                    ready!(stall.poll_expired(cx));
                    this.finish(Some(ErrorKind::ResponseBodyTimeout));
                    return Poll::Ready(Some(Err(Box::new(Stalled(
                        ErrorKind::ResponseBodyTimeout,
                    )))));
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
    }
}
