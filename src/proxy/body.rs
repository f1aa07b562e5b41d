//! Body wrappers that stream frames through untouched while counting what really crossed the wire.
//!
//! The response body carries the request's [`Exchange`]: the access-log record and the metrics are
//! written when the last frame has gone out, or when the body is dropped early (client gone), so the
//! sizes and the duration cover the whole exchange, not just the headers.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::hyper_path::Exchange;
use crate::error::ErrorKind;

/// Shared between the request body (polled by the client side) and the exchange (logged at the
/// end of the response): only allocated for requests that have a body.
#[derive(Default, Debug)]
pub struct RequestProgress {
    pub bytes: AtomicU64,
    pub failed: AtomicBool,
}

pub struct RequestBody {
    /// `None`: no body (a request sent again after the keep-alive race).
    inner: Option<Incoming>,
    progress: Option<Arc<RequestProgress>>,
}

impl RequestBody {
    pub fn new(inner: Incoming, progress: Option<Arc<RequestProgress>>) -> Self {
        RequestBody {
            inner: Some(inner),
            progress,
        }
    }

    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            progress: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
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
                None => {}
            }
        }
        Poll::Ready(frame)
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
    Upstream(Incoming),
    /// A response the proxy wrote itself (errors): sent in one frame.
    Message(Option<Bytes>),
}

pub struct ResponseBody {
    source: Source,
    exchange: Option<Exchange>,
}

impl ResponseBody {
    pub fn upstream(inner: Incoming, exchange: Exchange) -> Self {
        ResponseBody {
            source: Source::Upstream(inner),
            exchange: Some(exchange),
        }
    }

    pub fn message(text: &'static str, exchange: Option<Exchange>) -> Self {
        ResponseBody {
            source: Source::Message(Some(Bytes::from_static(text.as_bytes()))),
            exchange,
        }
    }

    fn finish(&mut self, error: Option<ErrorKind>) {
        if let Some(exchange) = self.exchange.take() {
            exchange.finish(error);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = match &mut this.source {
            Source::Upstream(inner) => ready!(Pin::new(inner).poll_frame(cx)),
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
            Source::Upstream(inner) => inner.is_end_stream(),
            Source::Message(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Upstream(inner) => inner.size_hint(),
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
