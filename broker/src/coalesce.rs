//! Write coalescing for HTTP/2 connections.
//!
//! An HTTP/2 connection task writes whatever frames are queued each time it
//! is woken. Under load, the responses of many concurrent requests become
//! ready a few microseconds apart, each wakes the connection, and each goes
//! out in its own `sendto`: on loopback, where the sender's system call also
//! runs the receiver's TCP input, that was a fifth of the broker's CPU per
//! message. [`Coalescing`] defers the first write of each burst by one turn
//! of the task scheduler (the task wakes itself and returns `Pending`), so
//! the handlers that are ready run first and their frames join the same
//! write. The cost is one extra poll of the connection per burst; nothing
//! waits on a timer, so an idle connection adds no latency beyond that turn.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose writes are deferred by one scheduler turn per burst (a
/// burst ends at a completed flush). Reads pass straight through.
pub struct Coalescing<S> {
    inner: S,
    /// The current burst has already yielded once.
    yielded: bool,
}

impl<S> Coalescing<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            yielded: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether this write must first give the scheduler a turn; if so the
    /// task has been woken to come back.
    fn defer(&mut self, cx: &mut Context<'_>) -> bool {
        if self.yielded {
            return false;
        }
        self.yielded = true;
        cx.waker().wake_by_ref();
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalescing<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalescing<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.defer(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = ready!(Pin::new(&mut this.inner).poll_flush(cx));
        this.yielded = false;
        Poll::Ready(r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_first_write_of_each_burst_yields_once_and_wakes_the_task() {
        let (a, _b) = tokio::io::duplex(1 << 16);
        let mut io = Coalescing::new(a);
        let wakes = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = Pin::new(&mut io);

        // First write of a burst: deferred, and the task is woken to retry.
        assert!(io.as_mut().poll_write(&mut cx, b"one").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // Retried and later writes of the same burst go through at once.
        assert!(matches!(
            io.as_mut().poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        let bufs = [IoSlice::new(b"tw"), IoSlice::new(b"o")];
        assert!(matches!(
            io.as_mut().poll_write_vectored(&mut cx, &bufs),
            Poll::Ready(Ok(3))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        // A completed flush ends the burst: the next write yields again.
        assert!(io.as_mut().poll_flush(&mut cx).is_ready());
        assert!(io.as_mut().poll_write(&mut cx, b"x").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn bytes_arrive_whole_and_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 10);
        let writer = tokio::spawn(async move {
            let mut io = Coalescing::new(a);
            for i in 0..200u32 {
                io.write_all(&i.to_le_bytes().repeat(20)).await?;
                if i % 7 == 0 {
                    io.flush().await?;
                }
            }
            io.shutdown().await
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        writer.await.expect("join").expect("write");
        let want: Vec<u8> = (0..200u32)
            .flat_map(|i| i.to_le_bytes().repeat(20))
            .collect();
        assert_eq!(got, want);
    }
}
