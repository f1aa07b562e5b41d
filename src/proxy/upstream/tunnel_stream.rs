//! One tunnel's bytes: an HTTP/2 `CONNECT` stream read and written as a byte stream, on the `h2`
//! crate directly, and the keep-alive PINGs of the connections that carry them.
//!
//! hyper's upgraded stream (`hyper::upgrade::Upgraded`) hands every write to a task of its own
//! over a channel, one 16 KiB chunk at a time; here a write goes into the stream's send buffer
//! from the caller's task, bounded by HTTP/2 flow control and `h2`'s send buffer, and the
//! connection's task frames it. Measured with one bulk stream through an HBONE pair
//! (`ONLY=bulk bench/mtls.sh`): see docs/benchmarks.md. It lives below the adapters because an
//! upstream [`Transport`](super::Transport) may be one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A `CONNECT` stream as a byte stream: reads take the peer's DATA frames (and give their room
/// back to the peer's flow-control window once read), writes are sent as DATA frames, and
/// shutdown ends the stream (`END_STREAM`). Dropped before that, the stream is reset (`CANCEL`).
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The rest of the last DATA frame, beyond what the reader took.
    unread: Bytes,
    /// `END_STREAM` has been sent.
    ended: bool,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> TunnelStream {
        TunnelStream {
            send,
            recv,
            unread: Bytes::new(),
            ended: false,
        }
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("unread", &self.unread.len())
            .field("ended", &self.ended)
            .finish()
    }
}

/// An HTTP/2 error as the I/O error a byte stream reports: the transport's own error when there
/// is one; a stream reset or a GOAWAY as a TCP peer's reset (so that a writer takes an app's
/// reset after its answer as the end of writing, `upstream::PooledIo`, as on a socket); anything
/// else as text.
fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"))
    } else if e.is_reset() || e.is_go_away() {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    } else {
        io::Error::other(e)
    }
}

impl TunnelStream {
    /// Waits until a read would not wait: a DATA frame is in hand (kept for the read), or the
    /// stream has ended or failed (the read reports which). `Ok(true)`: bytes are in hand.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.unread.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(false)),
                Some(Ok(data)) => self.unread = data,
                // A peer that cancels or ends its side without error has closed the stream:
                // end of file, as a TCP FIN would be (hyper's upgraded stream does the same).
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => Ok(false),
                        Some(Reason::STREAM_CLOSED) => {
                            Err(io::Error::new(io::ErrorKind::BrokenPipe, e))
                        }
                        _ => Err(io_error(e)),
                    });
                }
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Moves up to `max` bytes in hand to `into`, and gives their room back to the peer's window.
    fn take_unread(&mut self, max: usize, into: impl FnOnce(&[u8])) -> usize {
        let taken = self.unread.len().min(max);
        into(&self.unread[..taken]);
        self.unread.advance(taken);
        // Read by the caller: the peer may send that much more.
        let _ = self.recv.flow_control().release_capacity(taken);
        taken
    }

    /// Resolves when a read would not wait (as `TcpStream::readable`): bytes in hand, the end, or
    /// an error. The bytes stay for the next read.
    pub async fn readable(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_fill(cx).map_ok(|_| ())).await
    }

    /// Reads what is in hand without waiting (as `TcpStream::try_read_buf`): `WouldBlock` when
    /// nothing is, `Ok(0)` at the end of the stream.
    pub fn try_read_buf(&mut self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.poll_fill(&mut cx) {
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Ready(Ok(false)) => Ok(0),
            // As much as the room the caller reserved (a DATA frame may be up to 1 MiB); the
            // rest stays in hand for the next read.
            Poll::Ready(Ok(true)) => {
                let room = (buf.capacity() - buf.len()).max(1);
                Ok(self.take_unread(room, |bytes| buf.extend_from_slice(bytes)))
            }
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if ready!(self.poll_fill(cx))? {
            let room = buf.remaining();
            self.take_unread(room, |bytes| buf.put_slice(bytes));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // The room the peer's windows and h2's send buffer give this stream: what is buffered and
        // not yet framed counts against it, so a writer faster than the connection waits here.
        self.send.reserve_capacity(buf.len());
        let room = loop {
            let room = self.send.capacity();
            if room > 0 {
                break room;
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                // The stream was reset or closed by the peer.
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the peer closed the tunnel's stream",
                    )));
                }
            }
        };
        let taken = room.min(buf.len());
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..taken]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(taken))
    }

    /// The connection's task writes what is buffered; nothing waits here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
            self.ended = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// A connection's transport that notes when the peer was last heard from (any bytes read), so
/// that [`unanswered_ping`] PINGs only a connection that has gone quiet, as hyper did: a PONG
/// queued behind a busy link's data could otherwise take longer than the timeout.
pub(crate) struct Heard<T> {
    io: T,
    heard: Arc<AtomicBool>,
}

impl<T> Heard<T> {
    pub(crate) fn new(io: T) -> (Heard<T>, Arc<AtomicBool>) {
        let heard = Arc::new(AtomicBool::new(false));
        (
            Heard {
                io,
                heard: heard.clone(),
            },
            heard,
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// PINGs the peer after each `interval` in which nothing was `heard` from it, and resolves when a
/// PING goes unanswered for `timeout` (or the connection can no longer carry one): the
/// connection's owner then drops it. A peer whose host vanished without a FIN would otherwise hold
/// the connection, and every stream on it, for good.
pub(crate) async fn unanswered_ping(
    mut ping_pong: PingPong,
    heard: Arc<AtomicBool>,
    interval: Duration,
    timeout: Duration,
) {
    loop {
        tokio::time::sleep(interval).await;
        if heard.swap(false, Ordering::Relaxed) {
            continue;
        }
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!("HBONE keep-alive PING failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("HBONE keep-alive PING unanswered for {timeout:?}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// Every wait of these tests: reached only when something is broken.
    const WAIT: Duration = Duration::from_secs(10);

    /// A client's and a server's [`TunnelStream`] for one CONNECT over an in-memory connection
    /// whose stream windows are `window` bytes, both connections driven by tasks of their own.
    async fn tunnel(window: u32) -> (TunnelStream, TunnelStream) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(window)
                .handshake::<_, Bytes>(far)
                .await
                .expect("server handshake");
            let (request, mut respond) = conn.accept().await.expect("a stream").expect("a CONNECT");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            TunnelStream::new(send, request.into_body())
        });
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(window)
            .handshake::<_, Bytes>(near)
            .await
            .expect("client handshake");
        tokio::spawn(conn);
        let mut sender = sender.ready().await.expect("ready");
        let request = http::Request::connect("198.18.0.2:80")
            .body(())
            .expect("request");
        let (response, send) = sender.send_request(request, false).expect("CONNECT");
        let response = response.await.expect("the answer");
        assert_eq!(response.status(), http::StatusCode::OK);
        let client = TunnelStream::new(send, response.into_body());
        let server = server.await.expect("the server's stream");
        (client, server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_and_shutdown_is_the_end_of_the_stream() {
        let (mut client, mut server) = tokio::time::timeout(WAIT, tunnel(65_535))
            .await
            .expect("a tunnel");
        client.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.expect("write");
        server.shutdown().await.expect("END_STREAM");
        let mut back = Vec::new();
        tokio::time::timeout(WAIT, client.read_to_end(&mut back))
            .await
            .expect("the end of the stream arrives")
            .expect("read");
        assert_eq!(back, b"pong", "the bytes, then end of file");
        client.shutdown().await.expect("END_STREAM");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, server.read_to_end(&mut rest)).await;
        assert!(
            read.expect("ends").expect("read").eq(&0),
            "nothing after the end"
        );
    }

    /// A writer far ahead of the window waits for the reader, and what the reader takes is given
    /// back to the window: were it not, this would stop after the first 16 KiB.
    #[tokio::test]
    async fn a_reader_that_reads_opens_the_window_again() {
        let (mut client, mut server) = tokio::time::timeout(WAIT, tunnel(16 * 1024))
            .await
            .expect("a tunnel");
        let sent: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("END_STREAM");
            client
        });
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, server.read_to_end(&mut got))
            .await
            .expect("the whole megabyte arrives")
            .expect("read");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the bytes arrive unchanged and in order");
        writer.await.expect("the writer ends");
    }

    #[tokio::test]
    async fn a_stream_dropped_by_the_peer_is_seen_by_both_halves() {
        let (mut client, server) = tokio::time::timeout(WAIT, tunnel(65_535))
            .await
            .expect("a tunnel");
        drop(server);
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, client.read_to_end(&mut rest))
            .await
            .expect("the reset arrives");
        assert!(
            read.is_ok(),
            "a cancelled stream reads as its end: {read:?}"
        );
        let write = tokio::time::timeout(WAIT, client.write_all(b"more")).await;
        let err = write
            .expect("the write fails rather than waits")
            .expect_err("nothing is written to a stream the peer reset");
        // As a TCP peer's reset: the writer (`upstream::PooledIo`) takes it as the end of writing.
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "a reset stream's write error reads as a reset: {err:?} ({:?})",
            err.kind()
        );
    }

    /// What ended first: the PING loop, the connection, or ten minutes (virtual time).
    async fn first_to_end(io: DuplexStream) -> &'static str {
        let (_sender, mut conn) = h2::client::handshake(io).await.expect("client handshake");
        let ping_pong = conn.ping_pong().expect("the connection's PINGs");
        let quiet = Arc::new(AtomicBool::new(false));
        let pings = unanswered_ping(
            ping_pong,
            quiet,
            Duration::from_secs(10),
            Duration::from_secs(20),
        );
        // Biased: at the same virtual instant, the loop's verdict is the one under test.
        tokio::select! {
            biased;
            () = pings => "the PING loop",
            _ = conn => "the connection",
            () = tokio::time::sleep(Duration::from_secs(600)) => "ten minutes",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_pings_is_kept() {
        let (near, far) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(near).await.expect("server handshake");
            while conn.accept().await.is_some() {}
        });
        assert_eq!(
            first_to_end(far).await,
            "ten minutes",
            "answered PINGs never end the connection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_heard_from_is_not_pinged() {
        let (near, mut far_peer) = tokio::io::duplex(64 * 1024);
        // It never answers a PING, but was heard from within every interval.
        tokio::spawn(async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(far_peer.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let (_sender, mut conn) = h2::client::handshake(near).await.expect("client handshake");
        let ping_pong = conn.ping_pong().expect("the connection's PINGs");
        let heard = Arc::new(AtomicBool::new(false));
        let speaking = {
            let heard = heard.clone();
            async move {
                loop {
                    heard.store(true, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let pings = unanswered_ping(
            ping_pong,
            heard,
            Duration::from_secs(10),
            Duration::from_secs(20),
        );
        let ended = tokio::select! {
            biased;
            () = pings => "the PING loop",
            _ = conn => "the connection",
            () = speaking => "never",
            () = tokio::time::sleep(Duration::from_secs(600)) => "ten minutes",
        };
        assert_eq!(ended, "ten minutes", "no PING while the peer is heard from");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_answering_pings_is_dropped() {
        let (near, mut far_peer) = tokio::io::duplex(64 * 1024);
        // A peer that takes every byte and says nothing: no SETTINGS, no PONG.
        tokio::spawn(async move {
            let mut sink = vec![0u8; 16 * 1024];
            while matches!(far_peer.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        assert_eq!(
            first_to_end(near).await,
            "the PING loop",
            "a PING left unanswered for the timeout ends the loop"
        );
    }
}
