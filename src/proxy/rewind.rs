//! Bytes already read from a stream, served before the stream's own: lets the hyper path take over
//! a connection whose first request the fast path has already read. Its reads can be noted
//! ([`Rewind::on_read`]): the listener times request heads by them. A write can be replaced
//! ([`Rewind::replace_writes`]): the listener answers in our own words the heads hyper refuses
//! itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
    on_read: Option<Box<dyn Fn() + Send + Sync>>,
    replace: Option<Box<Replacer>>,
    /// A replacement not written whole yet: it goes out before anything else.
    replacing: Bytes,
}

/// Judges a write: `Some(bytes)` to write those instead.
type Replacer = dyn FnMut(&[u8]) -> Option<Vec<u8>> + Send + Sync;

/// The write a replacement hook judges: the whole buffer when it is one slice (hyper writes a head
/// it makes itself as one), else nothing.
fn single<'a>(bufs: &'a [std::io::IoSlice<'a>]) -> Option<&'a [u8]> {
    let mut filled = bufs.iter().filter(|b| !b.is_empty());
    let first = filled.next()?;
    filled.next().is_none().then_some(&**first)
}

impl<T> Rewind<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Self {
        Rewind {
            prefix,
            inner,
            on_read: None,
            replace: None,
            replacing: Bytes::new(),
        }
    }

    /// Calls `noted` whenever a read returns bytes.
    pub(crate) fn on_read(mut self, noted: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_read = Some(Box::new(noted));
        self
    }

    /// Offers each write to `judge` first: when it returns bytes, those are written instead (the
    /// writer is told its own were).
    pub(crate) fn replace_writes(
        mut self,
        judge: impl FnMut(&[u8]) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Self {
        self.replace = Some(Box::new(judge));
        self
    }
}

impl<T: AsyncWrite + Unpin> Rewind<T> {
    /// Writes what is left of a replacement; ready when none is.
    fn poll_replacing(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.replacing.is_empty() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.replacing))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.replacing.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Swaps `buf` for the hook's bytes when it wants: `Some(len)` is what the writer is told.
    fn poll_replace(
        &mut self,
        cx: &mut Context<'_>,
        buf: Option<&[u8]>,
    ) -> Poll<std::io::Result<Option<usize>>> {
        std::task::ready!(self.poll_replacing(cx))?;
        let (Some(judge), Some(buf)) = (&mut self.replace, buf) else {
            return Poll::Ready(Ok(None));
        };
        let Some(instead) = judge(buf) else {
            return Poll::Ready(Ok(None));
        };
        self.replacing = Bytes::from(instead);
        // Written or not yet, the writer's bytes are taken: the rest follows before any other.
        let _ = self.poll_replacing(cx)?;
        Poll::Ready(Ok(Some(buf.len())))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = if self.prefix.is_empty() {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        } else {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            Poll::Ready(Ok(()))
        };
        if buf.filled().len() > before
            && let Some(noted) = &self.on_read
        {
            noted();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(taken) = std::task::ready!(self.poll_replace(cx, Some(buf)))? {
            return Poll::Ready(Ok(taken));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(taken) = std::task::ready!(self.poll_replace(cx, single(bufs)))? {
            return Poll::Ready(Ok(taken));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_replacing(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_replacing(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_replaced_write_goes_out_instead_and_counts_as_written() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = Rewind::new(Bytes::from_static(b"pre"), ours)
            .replace_writes(|w| (w == b"bare").then(|| b"in our words".to_vec()));
        let mut read = [0; 3];
        io.read_exact(&mut read).await.expect("prefix");
        assert_eq!(&read, b"pre");
        assert_eq!(io.write(b"bare").await.expect("write"), 4);
        io.write_all(b", then as written").await.expect("write");
        io.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        theirs.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"in our words, then as written");
    }
}
