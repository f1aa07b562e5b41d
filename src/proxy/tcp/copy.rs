//! A relay between two byte streams whose buffers grow for the directions that need them: each
//! direction starts with a small buffer and doubles it, up to a bound, whenever its reads fill it
//! (a bulk transfer, or a writer that keeps it waiting), so that a bulk stream moves in large
//! writes (one large DATA frame into an HBONE tunnel, fewer TLS flushes and system calls) while
//! the many connections that carry little keep small buffers. tokio's `copy_bidirectional` has
//! fixed buffers: 64 KiB made one bulk stream through HBONE 1.21x faster and 50 tunnelled
//! connections 4.7 MB larger (docs/benchmarks.md). The copy loop is tokio's (read ahead while a write waits, flush when
//! the reader has nothing, shut the writer down at the reader's end), with the growth added.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// One direction's copy.
struct OneWay {
    buf: Vec<u8>,
    /// The size the buffer may grow to.
    max: usize,
    /// The bytes of `buf[pos..cap]` are read and not yet written.
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    /// The last read reached the buffer's end (by itself, or after reads ahead while a write
    /// waited): once written out, the buffer may grow.
    filled_whole: bool,
    copied: u64,
}

impl OneWay {
    fn new(start: usize, max: usize) -> OneWay {
        OneWay {
            buf: vec![0; start],
            max: max.max(start),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            filled_whole: false,
            copied: 0,
        }
    }

    fn poll_fill_buf<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
    ) -> Poll<io::Result<()>> {
        let mut buf = ReadBuf::new(&mut self.buf);
        buf.set_filled(self.cap);
        let res = loop {
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                res => break res,
            }
        };
        if let Poll::Ready(Ok(())) = res {
            let filled = buf.filled().len();
            self.read_done = self.cap == filled;
            self.filled_whole = filled == self.buf.len();
            self.cap = filled;
        }
        res
    }

    fn poll_write_buf<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<usize>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match writer
                .as_mut()
                .poll_write(cx, &self.buf[self.pos..self.cap])
            {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                // While the writer waits, read ahead into the rest of the buffer.
                Poll::Pending => {
                    if !self.read_done && self.cap < self.buf.len() {
                        ready!(self.poll_fill_buf(cx, reader.as_mut()))?;
                    }
                    return Poll::Pending;
                }
                res => return res,
            }
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        // The task's budget: a relay whose both ends are always ready yields like any I/O.
        let coop = ready!(tokio::task::coop::poll_proceed(cx));
        loop {
            if self.cap < self.buf.len() && !self.read_done {
                match self.poll_fill_buf(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => coop.made_progress(),
                    Poll::Ready(Err(e)) => {
                        coop.made_progress();
                        return Poll::Ready(Err(e));
                    }
                    Poll::Pending => {
                        // Nothing to write either: flush what was written (the reader may be
                        // waiting for it), then wait.
                        if self.pos == self.cap {
                            if self.need_flush {
                                ready!(writer.as_mut().poll_flush(cx))?;
                                coop.made_progress();
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
            while self.pos < self.cap {
                let written = ready!(self.poll_write_buf(cx, reader.as_mut(), writer.as_mut()))?;
                coop.made_progress();
                if written == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "write zero byte into writer",
                    )));
                }
                self.pos += written;
                self.copied += written as u64;
                self.need_flush = true;
            }
            debug_assert!(
                self.pos <= self.cap,
                "writer returned length larger than input slice"
            );
            // All written: the buffer is empty again, and grows if the last read filled it. It
            // never shrinks: a direction that once carried bulk may again.
            self.pos = 0;
            self.cap = 0;
            if self.filled_whole && self.buf.len() < self.max {
                let grown = (self.buf.len() * 2).min(self.max);
                // A fresh buffer: nothing in the old one is needed any more.
                self.buf = vec![0; grown];
                self.filled_whole = false;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                coop.made_progress();
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

enum Transfer {
    Running(OneWay),
    ShuttingDown(u64),
    Done(u64),
}

fn transfer<R, W>(
    cx: &mut Context<'_>,
    state: &mut Transfer,
    reader: &mut R,
    writer: &mut W,
) -> Poll<io::Result<u64>>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut reader = Pin::new(reader);
    let mut writer = Pin::new(writer);
    loop {
        match state {
            Transfer::Running(copy) => {
                let copied = ready!(copy.poll_copy(cx, reader.as_mut(), writer.as_mut()))?;
                *state = Transfer::ShuttingDown(copied);
            }
            Transfer::ShuttingDown(copied) => {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                *state = Transfer::Done(*copied);
            }
            Transfer::Done(copied) => return Poll::Ready(Ok(*copied)),
        }
    }
}

/// Copies both ways until both readers end (each end of file shuts the other side's writer
/// down) or either side fails; returns the bytes copied a to b and b to a. Each direction's
/// buffer starts at `start` bytes (more than 0: panics otherwise, as tokio's does) and may grow to
/// `max`.
pub(crate) async fn both_ways<A, B>(
    a: &mut A,
    b: &mut B,
    start: usize,
    max: usize,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    assert!(start > 0, "a relay's buffer must hold at least one byte");
    let mut a_to_b = Transfer::Running(OneWay::new(start, max));
    let mut b_to_a = Transfer::Running(OneWay::new(start, max));
    std::future::poll_fn(|cx| {
        let forward = transfer(cx, &mut a_to_b, a, b)?;
        let back = transfer(cx, &mut b_to_a, b, a)?;
        let forward = ready!(forward);
        let back = ready!(back);
        Poll::Ready(Ok((forward, back)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: std::time::Duration = std::time::Duration::from_secs(10);

    /// A megabyte one way through buffers that grow from 1 KiB, a few bytes the other: both
    /// arrive whole and in order, each end of file reaches the other side, and the counts are
    /// what crossed.
    #[tokio::test]
    async fn a_relay_carries_a_megabyte_one_way_and_an_answer_back() {
        let (mut client, mut near) = tokio::io::duplex(256 * 1024);
        let (mut far, mut server) = tokio::io::duplex(256 * 1024);
        let relay = tokio::spawn(async move { both_ways(&mut near, &mut far, 1024, 8192).await });
        let bulk: Vec<u8> = (0..1024 * 1024).map(|i| (i % 253) as u8).collect();
        let sent = bulk.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.expect("read back");
            back
        });
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, server.read_to_end(&mut got))
            .await
            .expect("the bulk arrives")
            .expect("read");
        assert!(got == bulk, "a megabyte arrives whole and in order");
        server.write_all(b"ok").await.expect("write");
        server.shutdown().await.expect("shutdown");
        let back = tokio::time::timeout(WAIT, writer)
            .await
            .expect("the answer arrives")
            .expect("writer");
        assert_eq!(back, b"ok");
        let copied = tokio::time::timeout(WAIT, relay)
            .await
            .expect("the relay ends")
            .expect("relay task")
            .expect("relay");
        assert_eq!(copied, (1024 * 1024, 2));
    }

    /// A reader that hands out uneven pieces and sometimes nothing yet, and a writer that takes
    /// uneven pieces and sometimes waits: the read-ahead and growth paths all run.
    struct Uneven<'a> {
        data: &'a [u8],
        out: Vec<u8>,
        state: u64,
    }

    impl Uneven<'_> {
        fn next(&mut self) -> u64 {
            self.state = self
                .state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.state >> 33
        }
    }

    impl AsyncRead for Uneven<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let roll = self.next();
            if roll.is_multiple_of(4) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let most = [1, 7, 1000, 5000, 70_000][(roll / 4 % 5) as usize];
            let taken = most.min(buf.remaining()).min(self.data.len());
            buf.put_slice(&self.data[..taken]);
            self.data = &self.data[taken..];
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Uneven<'_> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let roll = self.next();
            if roll.is_multiple_of(3) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let taken = ((roll / 3) as usize % 9000 + 1).min(buf.len());
            self.out.extend_from_slice(&buf[..taken]);
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn bytes_survive_growth_with_uneven_reads_and_waiting_writes() {
        let data: Vec<u8> = (0..512 * 1024u64)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for seed in 0..40u64 {
            let mut copy = OneWay::new(1024, 64 * 1024);
            let mut reader = Uneven {
                data: &data,
                out: Vec::new(),
                state: seed * 7 + 1,
            };
            let mut writer = Uneven {
                data: &[],
                out: Vec::new(),
                state: seed * 13 + 5,
            };
            let copied = loop {
                let polled = copy.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
                if let Poll::Ready(copied) = polled {
                    break copied.expect("no error");
                }
            };
            assert_eq!(copied, data.len() as u64, "seed {seed}: the count");
            assert!(writer.out == data, "seed {seed}: every byte, in order");
            assert!(copy.buf.len() > 1024, "seed {seed}: a bulk direction grew");
        }
    }

    #[test]
    fn reads_that_never_fill_the_buffer_keep_it_small() {
        /// Hands out 1,000 bytes at a time, always less than the buffer.
        struct Small<'a>(&'a [u8]);
        impl AsyncRead for Small<'_> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                let taken = 1000.min(self.0.len()).min(buf.remaining());
                buf.put_slice(&self.0[..taken]);
                self.0 = &self.0[taken..];
                Poll::Ready(Ok(()))
            }
        }
        let data = vec![1u8; 100_000];
        let mut copy = OneWay::new(1024, 64 * 1024);
        let mut sink = Vec::new();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let polled = copy.poll_copy(&mut cx, Pin::new(&mut Small(&data)), Pin::new(&mut sink));
        assert!(polled.is_ready());
        assert_eq!(sink.len(), data.len());
        assert_eq!(
            copy.buf.len(),
            1024,
            "no read filled it: it stays at its start"
        );
    }

    #[test]
    fn the_buffer_doubles_on_full_reads_up_to_its_bound() {
        let mut copy = OneWay::new(1024, 4096);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let data = vec![7u8; 64 * 1024];
        let mut reader: &[u8] = &data;
        let mut sink = Vec::new();
        let mut sizes = Vec::new();
        // Each poll copies until the reader ends; watch the buffer between single rounds.
        for _ in 0..4 {
            let mut limited = (&mut reader).take(copy.buf.len() as u64);
            let polled = copy.poll_copy(&mut cx, Pin::new(&mut limited), Pin::new(&mut sink));
            assert!(polled.is_ready());
            sizes.push(copy.buf.len());
            copy.read_done = false;
        }
        assert_eq!(
            sizes,
            [2048, 4096, 4096, 4096],
            "doubled on full reads, then held"
        );
    }
}
