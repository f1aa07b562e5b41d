//! Traffic policy's building blocks (issue 19), pure and driven by plain numbers: a route's
//! [`rate`] limiter (token buckets, overall and per peer), its [`concurrency`] limiter (requests in
//! flight with a bounded FIFO queue), and the [`retry`] budget with its backoff. No I/O and no
//! configuration types: the wiring builds them from the routes file, the driver calls them.
//!
//! Every one of them is bounded in what a client can make it hold: the per-peer map has a fixed
//! number of entries, the queue a fixed number of waiters each with a deadline, the budget a fixed
//! number of counters.

pub mod concurrency;
pub mod rate;
pub mod retry;

use std::time::Duration;

/// When to try again, for a refusal's `Retry-After` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// The value of the `Retry-After` header: whole seconds, rounded up, at least 1 (a client
    /// told 0 would come back at once).
    pub fn header_seconds(self) -> u64 {
        let seconds = self.0.as_secs();
        let rounded = if self.0.subsec_nanos() > 0 {
            seconds.saturating_add(1)
        } else {
            seconds
        };
        rounded.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::RetryAfter;
    use super::concurrency::ConcurrencyLimiter;
    use super::rate::{PEER_CAPACITY, PeerKey, RateLimiter};
    use super::retry::{RetryBackoff, RetryBudget};
    use std::hint::black_box;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, Instant};

    #[test]
    fn header_seconds_round_up_and_never_say_zero() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_nanos(1), 1),
            (Duration::from_millis(999), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(30), 30),
            (Duration::MAX, u64::MAX),
        ];
        for (wait, seconds) in cases {
            assert_eq!(RetryAfter(wait).header_seconds(), seconds, "{wait:?}");
        }
    }

    /// Nanoseconds per call of `op`, over `calls` calls.
    fn cost(calls: u32, mut op: impl FnMut(u32)) -> f64 {
        let start = Instant::now();
        for n in 0..calls {
            op(n);
        }
        start.elapsed().as_nanos() as f64 / f64::from(calls)
    }

    /// The per-request cost of each building block, for the lead to quote. A measurement, not
    /// a test: run it built for release,
    /// `cargo test --release --lib traffic::tests::per_request_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a microbenchmark: run by hand, built for release"]
    fn per_request_cost() {
        const CALLS: u32 = 2_000_000;
        let peers: Vec<PeerKey> = (0..PEER_CAPACITY as u32)
            .map(|n| PeerKey::new(None, IpAddr::V4(Ipv4Addr::from(0xC612_0000 + n))))
            .collect();
        // Rates high enough that every check is admitted: the path a request takes.
        let overall = RateLimiter::new(1e9, u32::MAX, None);
        let per_peer = RateLimiter::new(1e9, u32::MAX, Some(1e9));
        let refused = RateLimiter::new(1e-6, 1, Some(1e-6));
        let _ = refused.check(&peers[0]);
        let budget = RetryBudget::new(0.2, 10);
        let limiter = ConcurrencyLimiter::new(64, 64, Duration::from_secs(1));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        let rows = [
            (
                "RateLimiter::check, overall only",
                cost(CALLS, |_| {
                    black_box(overall.check(&peers[0]).is_ok());
                }),
            ),
            (
                "RateLimiter::check, per peer, one peer",
                cost(CALLS, |_| {
                    black_box(per_peer.check(&peers[0]).is_ok());
                }),
            ),
            (
                "RateLimiter::check, per peer, 4096 peers in turn",
                cost(CALLS, |n| {
                    black_box(per_peer.check(&peers[n as usize % peers.len()]).is_ok());
                }),
            ),
            (
                "RateLimiter::check, refused",
                cost(CALLS, |_| {
                    black_box(refused.check(&peers[0]).is_err());
                }),
            ),
            (
                "ConcurrencyLimiter::acquire and drop, a free permit",
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..CALLS {
                        black_box(limiter.acquire().await.is_ok());
                    }
                    start.elapsed().as_nanos() as f64 / f64::from(CALLS)
                }),
            ),
            ("RetryBudget::deposit", cost(CALLS, |_| budget.deposit())),
            (
                "RetryBudget::try_withdraw",
                cost(CALLS, |_| {
                    black_box(budget.try_withdraw());
                }),
            ),
            (
                "RetryBackoff::delay",
                cost(CALLS, |n| {
                    black_box(RetryBackoff::delay(Duration::from_millis(25), n % 4));
                }),
            ),
        ];
        for (what, nanoseconds) in rows {
            eprintln!("{what:<55} {nanoseconds:>7.1} ns");
        }
        // Two threads on one limiter with a per-peer table: the lock contended.
        let start = Instant::now();
        std::thread::scope(|scope| {
            for thread in 0..2u32 {
                let (per_peer, peers) = (&per_peer, &peers);
                scope.spawn(move || {
                    for n in 0..CALLS {
                        let peer = &peers[((n + thread * 7) as usize) % peers.len()];
                        black_box(per_peer.check(peer).is_ok());
                    }
                });
            }
        });
        let nanoseconds = start.elapsed().as_nanos() as f64 / f64::from(2 * CALLS);
        eprintln!(
            "{:<55} {nanoseconds:>7.1} ns (wall time per check)",
            "RateLimiter::check, per peer, two threads at once"
        );
    }
}
