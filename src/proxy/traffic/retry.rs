//! The retry budget (Finagle's and linkerd2-proxy's) and the backoff between attempts.
//!
//! Budget: each original request deposits `ratio` of a retry, each retry withdraws one, and
//! `min_per_second` retries a second are always allowed (a reserve of `min_per_second * 10`
//! over the window). Deposits and withdrawals both expire after the window, 10 s (Finagle's TTL),
//! kept as ten one-second slots: over any run, retries stay at about
//! `ratio * requests + min_per_second * seconds` however many requests fail, so a failing app
//! sees at most `ratio` more load, never a storm.
//!
//! Cost: a deposit (every request) is one compare-and-swap on an atomic, no lock; a withdrawal
//! (only when a retry is wanted) takes a lock and reads twenty counters, so that two retries
//! never both spend the last token.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;

/// The window deposits and withdrawals live in, in one-second slots.
const WINDOW_SECONDS: u32 = 10;

/// The most retries one request may earn (Finagle's bound): a ratio past it is taken as it.
const MAX_RATIO: f64 = 1000.0;

/// Retries across all routes, as a share of requests plus a floor.
#[derive(Debug)]
pub struct RetryBudget {
    epoch: Instant,
    ratio: f64,
    /// Retries the floor allows over one window.
    reserve: f64,
    /// Deposits per second, each slot `(second << 32) | count`: one atomic per update.
    deposits: [AtomicU64; WINDOW_SECONDS as usize],
    withdrawals: Mutex<[Slot; WINDOW_SECONDS as usize]>,
}

/// A count for one second (seconds since the budget was made).
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    second: u32,
    count: u32,
}

impl Slot {
    fn pack(self) -> u64 {
        (u64::from(self.second) << 32) | u64::from(self.count)
    }

    fn unpack(packed: u64) -> Slot {
        Slot {
            second: (packed >> 32) as u32,
            count: packed as u32,
        }
    }

    /// Whether the slot's second is within the window that ends at `now`. A slot a later clock
    /// reading wrote (another thread's) is too.
    fn live(self, now: u32) -> bool {
        now.checked_sub(self.second)
            .is_none_or(|age| age < WINDOW_SECONDS)
    }
}

impl RetryBudget {
    /// `ratio`: retries per original request (0.2: at most 20 % more load), between 0 and 1000;
    /// `min_per_second`: retries allowed every second whatever the ratio allows.
    pub fn new(ratio: f64, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            epoch: Instant::now(),
            // NaN or negative: no share.
            ratio: if ratio.is_nan() {
                0.0
            } else {
                ratio.clamp(0.0, MAX_RATIO)
            },
            reserve: f64::from(min_per_second) * f64::from(WINDOW_SECONDS),
            deposits: Default::default(),
            withdrawals: Mutex::default(),
        }
    }

    /// An original request (not a retry): it earns `ratio` of a retry for the window.
    pub fn deposit(&self) {
        let now = self.second();
        let slot = &self.deposits[(now % WINDOW_SECONDS) as usize];
        // `None` (the slot already holds a later second, read by another thread's later clock)
        // drops this deposit: a request on a window's edge, the budget is the stricter for it.
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |packed| {
            let slot = Slot::unpack(packed);
            let count = match slot.second.cmp(&now) {
                std::cmp::Ordering::Equal => slot.count.saturating_add(1),
                std::cmp::Ordering::Less => 1,
                std::cmp::Ordering::Greater => return None,
            };
            Some(Slot { second: now, count }.pack())
        });
    }

    /// Spends one retry if the budget holds one; `false`: the budget is exhausted and the retry
    /// is not made.
    pub fn try_withdraw(&self) -> bool {
        let mut withdrawals = lock(&self.withdrawals);
        // Read under the lock: withdrawals see the clock move forward only.
        let now = self.second();
        let deposited: u64 = self
            .deposits
            .iter()
            .map(|slot| Slot::unpack(slot.load(Ordering::Relaxed)))
            .filter(|slot| slot.live(now))
            .map(|slot| u64::from(slot.count))
            .sum();
        let withdrawn: u64 = withdrawals
            .iter()
            .filter(|slot| slot.live(now))
            .map(|slot| u64::from(slot.count))
            .sum();
        let balance = self.reserve + self.ratio * deposited as f64 - withdrawn as f64;
        // A hair under 1 is a whole retry that floating point rounded down (0.2 * 5).
        if balance < 1.0 - 1e-9 {
            return false;
        }
        let slot = &mut withdrawals[(now % WINDOW_SECONDS) as usize];
        if slot.second == now {
            slot.count = slot.count.saturating_add(1);
        } else {
            *slot = Slot {
                second: now,
                count: 1,
            };
        }
        true
    }

    /// Whole seconds since the budget was made (u32: 136 years).
    fn second(&self) -> u32 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        u32::try_from(elapsed.as_secs()).unwrap_or(u32::MAX)
    }
}

/// The wait before a retry: exponential with full jitter (AWS's "full jitter": uniform between 0
/// and the ceiling, so that clients that failed together do not come back together).
pub struct RetryBackoff;

impl RetryBackoff {
    /// The ceiling grows no further than this many times the base: the route's own `backoff`
    /// sets the scale, and its timeout bounds the whole.
    pub const CAP_FACTOR: u32 = 10;

    /// The wait before retry number `attempt` (1 for the first retry; 0 is taken as 1): uniform
    /// in `[0, base * min(2^(attempt - 1), CAP_FACTOR)]`. Random from the thread's `fastrand`
    /// generator, which a test seeds (`fastrand::seed`) for a repeatable sequence.
    pub fn delay(base: Duration, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .map_or(Self::CAP_FACTOR, |doubled| doubled.min(Self::CAP_FACTOR));
        let ceiling = u64::try_from(base.saturating_mul(factor).as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::time::advance;

    /// Every request fails and wants one retry; requests arrive every `step` for ten minutes.
    /// At the end of every window, the retries made are `ratio * requests + min * seconds`, less
    /// at most one per window (the fraction of a retry each window's deposits leave).
    async fn retries_while_everything_fails(ratio: f64, min: u32, step: Duration) {
        let budget = RetryBudget::new(ratio, min);
        let start = Instant::now();
        let (mut requests, mut retries) = (0u64, 0u64);
        for window in 1..=60u32 {
            let end = Duration::from_secs(u64::from(window * WINDOW_SECONDS));
            while start.elapsed() < end {
                budget.deposit();
                requests += 1;
                retries += u64::from(budget.try_withdraw());
                advance(step).await;
            }
            let allowed = ratio * requests as f64 + f64::from(min) * end.as_secs_f64();
            let made = retries as f64;
            assert!(
                made <= allowed + 1e-6 && made >= allowed - f64::from(window),
                "ratio {ratio}, {min}/s, a request every {step:?}: after {end:?}, \
                 {requests} requests, {retries} retries made, {allowed} allowed"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stay_at_the_ratio_plus_the_floor_over_ten_minutes() {
        for (ratio, min, step_ms) in [
            (0.2, 10, 20), // Linkerd's defaults at 50 requests a second
            (0.2, 10, 1),  // at 1000 a second: the ratio dominates
            (0.5, 3, 7),   // deposits not a whole number per window
            (0.35, 7, 3),
            (0.2, 0, 9), // the ratio alone
            (0.0, 4, 9), // the floor alone
        ] {
            retries_while_everything_fails(ratio, min, Duration::from_millis(step_ms)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_allows_retries_without_requests() {
        let budget = RetryBudget::new(0.2, 3);
        // The floor's window's worth at once, then nothing until the window turns over.
        let burst = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(burst, 30);
        advance(Duration::from_millis(9999)).await;
        assert!(!budget.try_withdraw());
        advance(Duration::from_millis(1)).await;
        assert!(budget.try_withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_window() {
        let budget = RetryBudget::new(1.0, 0);
        for _ in 0..5 {
            budget.deposit();
        }
        advance(Duration::from_secs(9)).await;
        assert!(budget.try_withdraw(), "a deposit 9 s old is spent");
        advance(Duration::from_secs(1)).await;
        assert!(!budget.try_withdraw(), "deposits 10 s old were spent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_ratio_out_of_range_is_held_to_its_bounds() {
        for ratio in [f64::NAN, -1.0, f64::NEG_INFINITY] {
            let budget = RetryBudget::new(ratio, 0);
            budget.deposit();
            assert!(!budget.try_withdraw(), "ratio {ratio} allowed a retry");
        }
        let budget = RetryBudget::new(f64::INFINITY, 0);
        assert!(!budget.try_withdraw(), "no deposit, no floor, yet a retry");
        budget.deposit();
        let allowed = (0..2000).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed as f64, MAX_RATIO);
    }

    /// Threads deposit and withdraw at once: no deposit is lost, no token spent twice.
    #[test]
    fn the_budget_is_exact_across_threads() {
        const THREADS: u32 = 8;
        const REQUESTS: u32 = 20_000;
        let budget = Arc::new(RetryBudget::new(0.25, 5));
        let start = Instant::now();
        let retries: u64 = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..THREADS)
                .map(|_| {
                    let budget = Arc::clone(&budget);
                    scope.spawn(move || {
                        (0..REQUESTS)
                            .map(|_| {
                                budget.deposit();
                                u64::from(budget.try_withdraw())
                            })
                            .sum::<u64>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().expect("a worker finished"))
                .sum()
        });
        // What the budget still holds once every thread is done (seen after the joins).
        let left = std::iter::from_fn(|| budget.try_withdraw().then_some(())).count() as u64;
        let retries = retries + left;
        let requests = f64::from(THREADS * REQUESTS);
        let once = 0.25 * requests + 5.0 * f64::from(WINDOW_SECONDS);
        // Slots expire only once the run outlasts the window; each later window may add a
        // budget's worth at most.
        let windows = start.elapsed().as_secs() / u64::from(WINDOW_SECONDS);
        assert!(
            retries as f64 <= once * (1 + windows) as f64,
            "{retries} retries for {requests} requests"
        );
        if windows == 0 && start.elapsed().as_secs() < u64::from(WINDOW_SECONDS) - 1 {
            // Within one window: every deposit counted, every token spent once.
            assert_eq!(retries as f64, once.floor());
        } else {
            eprintln!("the run outlasted the budget's window: only the bound was checked");
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_capped_ceiling() {
        let base = Duration::from_millis(25);
        for (attempt, factor) in [(0, 1), (1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (40, 10)] {
            fastrand::seed(19);
            let delays: Vec<Duration> = (0..10_000)
                .map(|_| RetryBackoff::delay(base, attempt))
                .collect();
            let ceiling = base * factor;
            assert!(
                delays.iter().all(|delay| *delay <= ceiling),
                "attempt {attempt}"
            );
            // Uniform: the mean of 10k draws is half the ceiling, within 3 % (the sequence is
            // seeded, so this is one fixed sample, not a flaky one).
            let mean = delays.iter().sum::<Duration>() / 10_000;
            let half = ceiling / 2;
            assert!(
                mean.abs_diff(half) <= half * 3 / 100,
                "attempt {attempt}: mean {mean:?}, half the ceiling {half:?}"
            );
            // Seeded: the same sequence again.
            fastrand::seed(19);
            assert!(
                delays
                    .iter()
                    .all(|d| *d == RetryBackoff::delay(base, attempt))
            );
        }
        assert_eq!(RetryBackoff::delay(Duration::ZERO, 3), Duration::ZERO);
        assert!(RetryBackoff::delay(Duration::MAX, 9) <= Duration::from_nanos(u64::MAX));
    }
}
