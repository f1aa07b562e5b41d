//! A route's concurrency limit: at most `max` requests in flight to the app, at most `queue` more
//! waiting in FIFO order, each for at most `queueTimeout` (Envoy's circuit breaker
//! `max_requests` with `max_pending_requests`). The app is protected before it falls over, and
//! what a client can hold here is bounded: a permit while its request is in flight, a place in
//! the queue for a bounded time.
//!
//! tokio's semaphore is fair: permits go to waiters in the order they asked, and a request that
//! finds waiters queues behind them (`try_acquire` never takes a permit a waiter is owed). A
//! waiter whose future is dropped (the client went away) leaves the queue at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::RetryAfter;

/// Requests in flight to one route's app, with a bounded queue.
#[derive(Debug)]
pub struct ConcurrencyLimiter {
    permits: Arc<Semaphore>,
    max: u32,
    queue: u32,
    /// Waiters, kept beside the semaphore so that the queue's bound is ours (the semaphore's
    /// own waiter list has none).
    queued: AtomicU32,
    queue_timeout: Duration,
}

/// One request in flight; the slot is given back (to the first waiter) when it is dropped. It
/// holds the semaphore, so a permit taken before a reload outlives the route that gave it.
#[derive(Debug)]
pub struct ConcurrencyPermit {
    _permit: OwnedSemaphorePermit,
}

/// Why a request was refused: 503 with `Retry-After` (gRPC: UNAVAILABLE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("the route's concurrency limit is reached and its queue is full")]
    QueueFull { retry_after: RetryAfter },
    #[error("no request of the route finished within its queue timeout")]
    QueueTimeout { retry_after: RetryAfter },
}

impl Rejected {
    pub fn retry_after(self) -> RetryAfter {
        match self {
            Rejected::QueueFull { retry_after } | Rejected::QueueTimeout { retry_after } => {
                retry_after
            }
        }
    }
}

impl ConcurrencyLimiter {
    /// `max` permits (the routes file refuses 0, which here would make every request wait and
    /// time out), `queue` waiters at most, each for `queue_timeout`.
    pub fn new(max: u32, queue: u32, queue_timeout: Duration) -> ConcurrencyLimiter {
        ConcurrencyLimiter {
            permits: Arc::new(Semaphore::new(max as usize)),
            max,
            queue,
            queued: AtomicU32::new(0),
            queue_timeout,
        }
    }

    /// A permit now, else a place in the queue until one is free or the queue timeout passes.
    /// Refused at once when the queue is full.
    ///
    /// The hint for both refusals is the queue timeout: by then every request queued now has
    /// left the queue (served or refused), so a retry then finds a queue that has turned over.
    pub async fn acquire(&self) -> Result<ConcurrencyPermit, Rejected> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Ok(ConcurrencyPermit { _permit: permit });
        }
        let retry_after = RetryAfter(self.queue_timeout);
        let Some(_place) = self.join_queue() else {
            return Err(Rejected::QueueFull { retry_after });
        };
        let wait = Arc::clone(&self.permits).acquire_owned();
        match tokio::time::timeout(self.queue_timeout, wait).await {
            Ok(Ok(permit)) => Ok(ConcurrencyPermit { _permit: permit }),
            // `Err(AcquireError)` only comes from a closed semaphore; this one is never closed.
            Ok(Err(_)) | Err(_) => Err(Rejected::QueueTimeout { retry_after }),
        }
    }

    /// Requests holding a permit now.
    pub fn in_flight(&self) -> u32 {
        // The semaphore never has more than `max` permits available.
        self.max - u32::try_from(self.permits.available_permits()).unwrap_or(self.max)
    }

    /// Requests waiting for a permit now.
    pub fn queued(&self) -> u32 {
        self.queued.load(Ordering::Relaxed)
    }

    fn join_queue(&self) -> Option<QueuePlace<'_>> {
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < self.queue).then_some(queued + 1)
            })
            .ok()?;
        Some(QueuePlace(&self.queued))
    }
}

/// A place in the queue, given up however the wait ends: a permit, the timeout, or the waiter's
/// future dropped.
struct QueuePlace<'a>(&'a AtomicU32);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::task::{JoinHandle, yield_now};
    use tokio::time::Instant;

    /// Lets the spawned tasks run until `limiter` has `queued` waiters.
    async fn until_queued(limiter: &ConcurrencyLimiter, queued: u32) {
        while limiter.queued() != queued {
            yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn permits_are_bounded_and_given_back_on_drop() {
        let limiter = ConcurrencyLimiter::new(2, 0, Duration::from_secs(1));
        let first = limiter.acquire().await.expect("a free permit");
        let second = limiter.acquire().await.expect("a free permit");
        assert_eq!(limiter.in_flight(), 2);
        // No queue: refused at once, with the queue timeout as the hint.
        assert_eq!(
            limiter.acquire().await.map(drop),
            Err(Rejected::QueueFull {
                retry_after: RetryAfter(Duration::from_secs(1))
            })
        );
        drop(first);
        assert_eq!(limiter.in_flight(), 1);
        let _third = limiter.acquire().await.expect("the permit given back");
        drop(second);
        assert_eq!(limiter.in_flight(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_and_the_queue_is_bounded() {
        let limiter = Arc::new(ConcurrencyLimiter::new(1, 3, Duration::from_secs(60)));
        let held = limiter.acquire().await.expect("a free permit");
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut waiters: Vec<JoinHandle<()>> = Vec::new();
        for n in 0..3 {
            let (waiter, served) = (Arc::clone(&limiter), Arc::clone(&served));
            waiters.push(tokio::spawn(async move {
                let permit = waiter.acquire().await.expect("served from the queue");
                served.lock().expect("not poisoned").push(n);
                // Hold the permit a moment, so that the order is the queue's, not the spawns'.
                yield_now().await;
                drop(permit);
            }));
            until_queued(&limiter, n + 1).await;
        }
        assert!(matches!(
            limiter.acquire().await,
            Err(Rejected::QueueFull { .. })
        ));
        drop(held);
        for waiter in waiters {
            waiter.await.expect("the waiter finished");
        }
        assert_eq!(*served.lock().expect("not poisoned"), [0, 1, 2]);
        assert_eq!((limiter.in_flight(), limiter.queued()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_gives_up_after_the_queue_timeout() {
        let timeout = Duration::from_millis(1500);
        let limiter = ConcurrencyLimiter::new(1, 1, timeout);
        let _held = limiter.acquire().await.expect("a free permit");
        let start = Instant::now();
        let refused = limiter.acquire().await.map(drop);
        assert_eq!(
            refused,
            Err(Rejected::QueueTimeout {
                retry_after: RetryAfter(timeout)
            })
        );
        // The paused clock moved exactly to the waiter's deadline.
        assert_eq!(start.elapsed(), timeout);
        assert_eq!(
            refused.map_err(|e| e.retry_after().header_seconds()),
            Err(2)
        );
        assert_eq!(limiter.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_at_once() {
        let limiter = Arc::new(ConcurrencyLimiter::new(1, 1, Duration::from_secs(60)));
        let held = limiter.acquire().await.expect("a free permit");
        let cancelled = tokio::spawn({
            let limiter = Arc::clone(&limiter);
            async move { limiter.acquire().await.map(drop) }
        });
        until_queued(&limiter, 1).await;
        // The client went away: its place is free for the next one at once.
        cancelled.abort();
        assert!(cancelled.await.expect_err("aborted").is_cancelled());
        assert_eq!(limiter.queued(), 0);
        let next = tokio::spawn({
            let limiter = Arc::clone(&limiter);
            async move { limiter.acquire().await.map(drop) }
        });
        until_queued(&limiter, 1).await;
        // The released permit goes to the live waiter, not to the one that left.
        drop(held);
        assert_eq!(next.await.expect("the waiter finished"), Ok(()));
        assert_eq!((limiter.in_flight(), limiter.queued()), (0, 0));
    }
}
