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
    use std::time::Duration;

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
}
