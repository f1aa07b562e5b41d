//! Per-request balancing over one route's endpoints, with outlier ejection.
//!
//! [`BalanceKind::P2cEwma`] is linkerd2-proxy's balancer (tower's `PeakEwma` under
//! power-of-two-choices): two distinct endpoints drawn at random, the one with the lower cost
//! wins, cost = `ewma_rtt * (pending + 1)`. The estimate is peak-sensitive: a sample above it
//! replaces it at once, a sample below it is blended in with weight `1 - e^(-elapsed/DECAY)`;
//! and every time an endpoint is weighed its estimate decays toward zero by `e^(-elapsed/DECAY)`,
//! so a slow endpoint that stops getting requests becomes cheap again and is probed. A new
//! endpoint starts at [`DEFAULT_RTT`]. A failure can raise the estimate (peak) but never lower it:
//! otherwise an endpoint that refuses connections in 100 µs would look like the fastest of all
//! and draw the traffic until it is ejected.
//!
//! [`BalanceKind::RoundRobin`] takes the endpoints in turn.
//!
//! Outlier ejection (Envoy's `consecutive_5xx`): `consecutive_failures` failures in a row leave an
//! endpoint out of both kinds of choice for `eject_for * streak`, at most
//! `max(MAX_EJECTION, eject_for)`; the streak grows by one with each ejection and drops by one for
//! every `eject_for` the endpoint then spends back in without being ejected (Envoy's multiplier
//! does the same per interval). At most `max_ejected_percent` of the endpoints are out at once, at
//! least one when the percentage is not 0 (as Envoy), and never all of them: an endpoint that
//! would cross that bound stays in (its failures keep counting, so it is ejected at its next
//! failure once there is room). With one endpoint nothing is ever ejected: the request would have
//! nowhere else to go. When [`Balancer::set_endpoints`] shrinks the set below what the bound
//! allows, the endpoints due back soonest return early. Failures of requests that were in flight
//! when an endpoint was ejected do not count toward its next ejection.
//!
//! One mutex guards the state: a pick or a finish holds it for a few dozen instructions and no
//! allocation (the [`Pick`] shares the balancer through an `Arc`). Time is
//! [`tokio::time::Instant`], so the tests run on paused time; randomness is a seeded
//! [`fastrand::Rng`].

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::sync::lock;

/// The estimate of an endpoint nothing was measured on yet (linkerd2-proxy's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The time constant of the estimate's decay (linkerd2-proxy's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// The longest an ejection lasts, unless `eject_for` itself is longer (Envoy's default).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// How the endpoint of each request is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BalanceKind {
    /// Power of two choices over a peak EWMA of latency times pending requests.
    P2cEwma,
    /// The endpoints in turn.
    RoundRobin,
}

/// When an endpoint is left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failures in a row that eject an endpoint (0 counts as 1).
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; the n-th in a streak lasts n times as long.
    pub eject_for: Duration,
    /// The largest share of the endpoints out at once, in percent (0: never eject; above 100
    /// counts as 100).
    pub max_ejected_percent: u8,
}

/// How an attempt on a picked endpoint went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response the caller does not count against the endpoint.
    Success { latency: Duration },
    /// A connect failure, a reset, a 5xx or gRPC UNAVAILABLE: counts toward ejection.
    Failure { latency: Duration },
}

/// One endpoint as the balancer sees it now, for metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// The latency estimate, decayed to now (what the next choice would weigh).
    pub ewma: Duration,
    /// Picks not finished or dropped yet.
    pub pending: u32,
    pub ejected: bool,
    /// Ejections since the endpoint joined the set (a counter).
    pub ejections: u64,
}

/// The balancer of one route. Clones share the same state.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    kind: BalanceKind,
    outlier: Option<OutlierConfig>,
    state: Mutex<State>,
}

struct State {
    endpoints: Vec<Endpoint>,
    rng: fastrand::Rng,
    /// Round-robin's next position.
    cursor: usize,
    next_id: u64,
    /// How many endpoints are ejected now: always below the number of endpoints.
    ejected: usize,
    /// The earliest end of an ejection, so that a pick scans for returns only when one is due.
    next_return: Option<Instant>,
}

struct Endpoint {
    addr: SocketAddr,
    /// Tells this endpoint from a later one at the same address (a pick can outlive a change).
    id: u64,
    /// The latency estimate, in nanoseconds, as of `stamp`.
    ewma: f64,
    stamp: Instant,
    pending: u32,
    failures: u32,
    ejected_until: Option<Instant>,
    /// When it last came back from an ejection (or joined): its time in, for the streak.
    returned_at: Instant,
    streak: u32,
    ejections: u64,
}

/// One request's endpoint: pending until [`Pick::finish`]ed or dropped (dropped counts as
/// neither a success nor a failure).
#[must_use = "a pick counts as pending until it is finished or dropped"]
pub struct Pick {
    pub addr: SocketAddr,
    /// When the endpoint was picked: an attempt's latency counts from here.
    pub picked_at: Instant,
    id: u64,
    /// Where the endpoint was when picked: checked against `id`, searched for when it moved.
    slot: usize,
    shared: Arc<Shared>,
    open: bool,
}

impl Balancer {
    pub fn new(kind: BalanceKind, outlier: Option<OutlierConfig>) -> Balancer {
        Balancer::seeded(kind, outlier, fastrand::u64(..))
    }

    /// A balancer whose random choices are those of `seed` (for tests).
    pub fn seeded(kind: BalanceKind, outlier: Option<OutlierConfig>, seed: u64) -> Balancer {
        let state = State {
            endpoints: Vec::new(),
            rng: fastrand::Rng::with_seed(seed),
            cursor: 0,
            next_id: 0,
            ejected: 0,
            next_return: None,
        };
        Balancer {
            shared: Arc::new(Shared {
                kind,
                outlier,
                state: Mutex::new(state),
            }),
        }
    }

    /// Replaces the set of endpoints. An endpoint that stays keeps its estimate, its pending
    /// count, its failures and its ejection; a new one starts fresh; duplicates count once.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let now = Instant::now();
        let mut state = lock(&self.shared.state);
        let same = state.endpoints.len() == addrs.len()
            && state.endpoints.iter().zip(addrs).all(|(e, a)| e.addr == *a);
        if !same {
            state.replace(addrs, self.shared.outlier, now);
        }
    }

    /// The endpoint for the next request, `None` when there is none.
    pub fn pick(&self) -> Option<Pick> {
        let now = Instant::now();
        let (slot, id, addr) = {
            let mut state = lock(&self.shared.state);
            let slot = state.choose(self.shared.kind, now)?;
            let endpoint = &mut state.endpoints[slot];
            endpoint.pending = endpoint.pending.saturating_add(1);
            (slot, endpoint.id, endpoint.addr)
        };
        Some(Pick {
            addr,
            picked_at: now,
            id,
            slot,
            shared: Arc::clone(&self.shared),
            open: true,
        })
    }

    /// Every endpoint's state now, in the order of the last [`Balancer::set_endpoints`].
    pub fn snapshot(&self) -> Vec<EndpointState> {
        let now = Instant::now();
        let state = lock(&self.shared.state);
        state
            .endpoints
            .iter()
            .map(|e| EndpointState {
                addr: e.addr,
                ewma: duration(e.decayed(now)),
                pending: e.pending,
                ejected: e.ejected_until.is_some(),
                ejections: e.ejections,
            })
            .collect()
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("kind", &self.shared.kind)
            .field("outlier", &self.shared.outlier)
            .finish_non_exhaustive()
    }
}

impl Pick {
    /// Records how the attempt went: the endpoint's estimate, and its failures in a row.
    pub fn finish(mut self, outcome: Outcome) {
        self.open = false;
        self.shared.settle(self.slot, self.id, Some(outcome));
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if self.open {
            self.shared.settle(self.slot, self.id, None);
        }
    }
}

impl fmt::Debug for Pick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pick")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// An ejection that just happened, logged once the lock is released.
struct Ejection {
    addr: SocketAddr,
    duration: Duration,
    count: u64,
}

impl Shared {
    fn settle(&self, slot: usize, id: u64, outcome: Option<Outcome>) {
        let now = Instant::now();
        let ejection = {
            let mut state = lock(&self.state);
            // Gone from the set since it was picked: nothing left to update.
            let Some(i) = state.find(slot, id) else {
                return;
            };
            let endpoint = &mut state.endpoints[i];
            endpoint.pending = endpoint.pending.saturating_sub(1);
            match outcome {
                None => None,
                Some(Outcome::Success { latency }) => {
                    endpoint.observe(nanos(latency), now);
                    endpoint.failures = 0;
                    None
                }
                Some(Outcome::Failure { latency }) => {
                    let latency = nanos(latency);
                    if latency > endpoint.ewma {
                        endpoint.ewma = latency;
                        endpoint.stamp = now;
                    }
                    state.failed(i, now, self.outlier)
                }
            }
        };
        if let Some(e) = ejection {
            tracing::warn!(
                endpoint = %e.addr,
                "endpoint ejected for {:?} after consecutive failures (ejection {})",
                e.duration,
                e.count
            );
        }
    }
}

impl State {
    fn find(&self, slot: usize, id: u64) -> Option<usize> {
        match self.endpoints.get(slot) {
            Some(e) if e.id == id => Some(slot),
            _ => self.endpoints.iter().position(|e| e.id == id),
        }
    }

    fn choose(&mut self, kind: BalanceKind, now: Instant) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        self.release_returned(now);
        match kind {
            BalanceKind::RoundRobin => {
                for _ in 0..n {
                    let i = self.cursor % n;
                    self.cursor = i + 1;
                    if self.endpoints[i].ejected_until.is_none() {
                        return Some(i);
                    }
                }
                None
            }
            BalanceKind::P2cEwma => {
                let eligible = n.saturating_sub(self.ejected);
                if eligible <= 1 {
                    return self.nth_eligible(0);
                }
                let a = self.rng.usize(..eligible);
                let mut b = self.rng.usize(..eligible - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = if self.ejected == 0 {
                    (a, b)
                } else {
                    (self.nth_eligible(a)?, self.nth_eligible(b)?)
                };
                let cost_a = self.endpoints[a].cost(now);
                let cost_b = self.endpoints[b].cost(now);
                Some(if cost_a <= cost_b { a } else { b })
            }
        }
    }

    /// The index of the k-th endpoint not ejected (a scan: only while some are ejected).
    fn nth_eligible(&self, k: usize) -> Option<usize> {
        self.endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.ejected_until.is_none())
            .nth(k)
            .map(|(i, _)| i)
    }

    /// Brings back the endpoints whose ejection is over.
    fn release_returned(&mut self, now: Instant) {
        if self.next_return.is_none_or(|t| t > now) {
            return;
        }
        let mut next: Option<Instant> = None;
        for e in &mut self.endpoints {
            match e.ejected_until {
                Some(until) if until <= now => {
                    e.ejected_until = None;
                    e.returned_at = until;
                    self.ejected -= 1;
                }
                Some(until) => next = Some(next.map_or(until, |t| t.min(until))),
                None => {}
            }
        }
        self.next_return = next;
    }

    /// Counts a failure of endpoint `i`, and ejects it when that makes enough in a row.
    fn failed(
        &mut self,
        i: usize,
        now: Instant,
        outlier: Option<OutlierConfig>,
    ) -> Option<Ejection> {
        let config = outlier?;
        let cap = ejection_cap(self.endpoints.len(), config.max_ejected_percent);
        let endpoint = &mut self.endpoints[i];
        if endpoint.ejected_until.is_some() {
            return None;
        }
        endpoint.failures = endpoint.failures.saturating_add(1);
        if endpoint.failures < config.consecutive_failures.max(1) || self.ejected >= cap {
            return None;
        }
        let time_in = now.saturating_duration_since(endpoint.returned_at);
        let relief = match time_in.as_nanos().checked_div(config.eject_for.as_nanos()) {
            Some(periods) => u32::try_from(periods).unwrap_or(u32::MAX),
            None => u32::MAX,
        };
        endpoint.streak = endpoint.streak.saturating_sub(relief).saturating_add(1);
        let duration = config
            .eject_for
            .saturating_mul(endpoint.streak)
            .min(MAX_EJECTION.max(config.eject_for));
        let until = now + duration;
        endpoint.ejected_until = Some(until);
        endpoint.failures = 0;
        endpoint.ejections += 1;
        let ejection = Ejection {
            addr: endpoint.addr,
            duration,
            count: endpoint.ejections,
        };
        self.ejected += 1;
        self.next_return = Some(self.next_return.map_or(until, |t| t.min(until)));
        Some(ejection)
    }

    fn replace(&mut self, addrs: &[SocketAddr], outlier: Option<OutlierConfig>, now: Instant) {
        let mut old: HashMap<SocketAddr, Endpoint> =
            self.endpoints.drain(..).map(|e| (e.addr, e)).collect();
        let mut endpoints: Vec<Endpoint> = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            if let Some(kept) = old.remove(&addr) {
                endpoints.push(kept);
            } else if !endpoints.iter().any(|e| e.addr == addr) {
                endpoints.push(Endpoint::new(addr, self.next_id, now));
                self.next_id += 1;
            }
        }
        self.endpoints = endpoints;
        // Fewer endpoints may allow fewer ejected: those due back soonest return now.
        let cap = outlier.map_or(0, |o| {
            ejection_cap(self.endpoints.len(), o.max_ejected_percent)
        });
        loop {
            let out = self
                .endpoints
                .iter_mut()
                .filter(|e| e.ejected_until.is_some());
            let (count, soonest) = out.fold((0, None::<&mut Endpoint>), |(n, soonest), e| {
                let sooner = soonest.filter(|s| s.ejected_until <= e.ejected_until);
                (n + 1, Some(sooner.unwrap_or(e)))
            });
            match soonest {
                Some(e) if count > cap => {
                    e.ejected_until = None;
                    e.returned_at = now;
                }
                _ => {
                    self.ejected = count;
                    break;
                }
            }
        }
        self.next_return = self.endpoints.iter().filter_map(|e| e.ejected_until).min();
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// An estimate back to a duration (estimates are finite and not negative; `as` saturates).
fn duration(nanos: f64) -> Duration {
    Duration::from_nanos(nanos.round() as u64)
}

/// How many of `n` endpoints may be ejected at once.
fn ejection_cap(n: usize, percent: u8) -> usize {
    if percent == 0 || n < 2 {
        return 0;
    }
    let share = n * usize::from(percent.min(100)) / 100;
    share.clamp(1, n - 1)
}

impl Endpoint {
    fn new(addr: SocketAddr, id: u64, now: Instant) -> Endpoint {
        Endpoint {
            addr,
            id,
            ewma: nanos(DEFAULT_RTT),
            stamp: now,
            pending: 0,
            failures: 0,
            ejected_until: None,
            returned_at: now,
            streak: 0,
            ejections: 0,
        }
    }

    /// The estimate decayed toward zero for the time since it was last touched.
    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(self.stamp));
        self.ewma * (-elapsed / nanos(DECAY)).exp()
    }

    /// What a choice weighs: the decayed estimate (kept, as tower does) times the pending load.
    fn cost(&mut self, now: Instant) -> f64 {
        self.ewma = self.decayed(now);
        self.stamp = now;
        self.ewma * f64::from(self.pending.saturating_add(1))
    }

    /// A measured latency: above the estimate it replaces it, below it is blended in.
    fn observe(&mut self, rtt: f64, now: Instant) {
        if rtt > self.ewma {
            self.ewma = rtt;
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.stamp));
            let decay = (-elapsed / nanos(DECAY)).exp();
            self.ewma = self.ewma * decay + rtt * (1.0 - decay);
        }
        self.stamp = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const MS: Duration = Duration::from_millis(1);

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([198, 18, 0, i], 80)))
            .collect()
    }

    fn balancer(kind: BalanceKind, outlier: Option<OutlierConfig>, n: u8) -> Balancer {
        let b = Balancer::seeded(kind, outlier, 7);
        b.set_endpoints(&addrs(n));
        b
    }

    fn outlier(
        consecutive_failures: u32,
        eject_for: Duration,
        percent: u8,
    ) -> Option<OutlierConfig> {
        Some(OutlierConfig {
            consecutive_failures,
            eject_for,
            max_ejected_percent: percent,
        })
    }

    fn state(b: &Balancer, addr: SocketAddr) -> EndpointState {
        b.snapshot()
            .into_iter()
            .find(|e| e.addr == addr)
            .expect("endpoint in the set")
    }

    /// Picks until `addr` comes up and finishes that pick with `outcome` (others succeed fast).
    fn finish_on(b: &Balancer, addr: SocketAddr, outcome: Outcome) {
        for _ in 0..1000 {
            let pick = b.pick().expect("an endpoint");
            if pick.addr == addr {
                pick.finish(outcome);
                return;
            }
            pick.finish(Outcome::Success { latency: MS });
        }
        panic!("{addr} never picked in 1000 picks");
    }

    fn fail(latency: Duration) -> Outcome {
        Outcome::Failure { latency }
    }

    #[test]
    fn no_endpoints_no_pick() {
        let b = Balancer::seeded(BalanceKind::P2cEwma, None, 1);
        assert!(b.pick().is_none());
        b.set_endpoints(&addrs(2));
        b.set_endpoints(&[]);
        assert!(b.pick().is_none());
        assert!(b.snapshot().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_sends_most_picks_to_the_fast_endpoints_and_still_probes_the_slow_one() {
        let b = balancer(BalanceKind::P2cEwma, None, 3);
        let slow = addrs(3)[2];
        let mut to_slow = 0;
        // 10 000 sequential requests, 10 ms apart: 100 s, ten times the decay's time constant.
        for _ in 0..10_000 {
            let pick = b.pick().expect("an endpoint");
            let latency = if pick.addr == slow {
                to_slow += 1;
                200 * MS
            } else {
                MS
            };
            pick.finish(Outcome::Success { latency });
            advance(10 * MS).await;
        }
        // The slow endpoint wins a draw only once its estimate has decayed below the fast ones'
        // (about ln(200) * 10 s = 53 s after its last sample): a few probes in 100 s.
        assert!(to_slow > 0, "the slow endpoint was never probed");
        assert!(
            to_slow < 10,
            "the slow endpoint got {to_slow} of 10 000 picks"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pending_requests_move_picks_away() {
        let b = balancer(BalanceKind::P2cEwma, None, 2);
        // Equal estimates: each pick goes where fewer are pending, so they alternate.
        let held: Vec<Pick> = (0..10).map(|_| b.pick().expect("an endpoint")).collect();
        let pending: Vec<u32> = b.snapshot().iter().map(|e| e.pending).collect();
        assert_eq!(pending, [5, 5]);

        // A busy endpoint among three (busy before the others joined): it is never the cheaper
        // of any pair.
        let b = balancer(BalanceKind::P2cEwma, None, 1);
        let busy = addrs(3)[0];
        let held_on_busy: Vec<Pick> = (0..20).map(|_| b.pick().expect("an endpoint")).collect();
        b.set_endpoints(&addrs(3));
        assert_eq!(state(&b, busy).pending, 20);
        for _ in 0..300 {
            let pick = b.pick().expect("an endpoint");
            assert_ne!(
                pick.addr, busy,
                "a pick went to the endpoint with 20 pending"
            );
            pick.finish(Outcome::Success { latency: 30 * MS });
        }
        drop(held_on_busy);
        assert_eq!(
            state(&b, busy).pending,
            0,
            "dropped picks are no longer pending"
        );
        drop(held);
    }

    #[test]
    fn round_robin_spreads_evenly_in_turn() {
        let b = balancer(BalanceKind::RoundRobin, None, 3);
        let order: Vec<SocketAddr> = (0..300)
            .map(|_| {
                let pick = b.pick().expect("an endpoint");
                let addr = pick.addr;
                pick.finish(Outcome::Success { latency: MS });
                addr
            })
            .collect();
        for (i, addr) in order.iter().enumerate() {
            assert_eq!(*addr, addrs(3)[i % 3], "pick {i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_is_ejected_after_n_failures_in_a_row_and_not_before() {
        let b = balancer(BalanceKind::RoundRobin, outlier(3, 30 * 1000 * MS, 50), 3);
        let bad = addrs(3)[1];
        finish_on(&b, bad, fail(MS));
        finish_on(&b, bad, fail(MS));
        assert!(!state(&b, bad).ejected, "two failures of three");
        // A success resets the count; so does nothing else (a dropped pick counts as neither).
        finish_on(&b, bad, Outcome::Success { latency: MS });
        finish_on(&b, bad, fail(MS));
        finish_on(&b, bad, fail(MS));
        let pick = loop {
            let pick = b.pick().expect("an endpoint");
            if pick.addr == bad {
                break pick;
            }
        };
        drop(pick);
        assert!(!state(&b, bad).ejected, "two failures since the success");
        finish_on(&b, bad, fail(MS));
        let s = state(&b, bad);
        assert!(s.ejected && s.ejections == 1, "{s:?}");
        for _ in 0..100 {
            let pick = b.pick().expect("an endpoint");
            assert_ne!(pick.addr, bad, "a pick went to an ejected endpoint");
        }
    }

    /// Picks (round-robin) for `span`, one every 100 ms: does `addr` come up?
    async fn picked_within(b: &Balancer, addr: SocketAddr, span: Duration) -> bool {
        let mut seen = false;
        let mut waited = Duration::ZERO;
        while waited < span {
            for _ in 0..3 {
                seen |= b.pick().expect("an endpoint").addr == addr;
            }
            advance(100 * MS).await;
            waited += 100 * MS;
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_gets_nothing_until_its_time_is_up_and_longer_on_repeat() {
        let eject_for = Duration::from_secs(10);
        let b = balancer(BalanceKind::RoundRobin, outlier(1, eject_for, 50), 3);
        let bad = addrs(3)[0];
        for (nth, out_for) in [(1, 10), (2, 20), (3, 30)] {
            finish_on(&b, bad, fail(MS));
            assert_eq!(state(&b, bad).ejections, nth);
            let out_for = Duration::from_secs(out_for);
            assert!(
                !picked_within(&b, bad, out_for - 100 * MS).await,
                "ejection {nth}: picked before {out_for:?}"
            );
            advance(100 * MS).await;
            assert!(
                picked_within(&b, bad, 300 * MS).await,
                "ejection {nth}: not picked once {out_for:?} were up"
            );
        }
        // Time back in shortens the next ejection: 25 s in takes two off the streak of 3.
        advance(Duration::from_secs(25)).await;
        finish_on(&b, bad, fail(MS));
        assert!(!picked_within(&b, bad, 20 * 1000 * MS - 100 * MS).await);
        advance(100 * MS).await;
        assert!(
            picked_within(&b, bad, 300 * MS).await,
            "the fourth lasted 20 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_is_capped() {
        let eject_for = Duration::from_secs(100);
        let b = balancer(BalanceKind::RoundRobin, outlier(1, eject_for, 50), 2);
        let bad = addrs(2)[0];
        for (nth, out_for) in [(1, 100), (2, 200), (3, 300), (4, 300), (5, 300)] {
            finish_on(&b, bad, fail(MS));
            let out_for = Duration::from_secs(out_for);
            advance(out_for - MS).await;
            assert!(
                state(&b, bad).ejected,
                "ejection {nth}: back before {out_for:?}"
            );
            advance(MS).await;
            // A pick notices the return.
            drop(b.pick());
            assert!(
                !state(&b, bad).ejected,
                "ejection {nth}: still out after {out_for:?}"
            );
        }
    }

    fn ejected_when_all_fail(n: u8, percent: u8) -> usize {
        let b = balancer(
            BalanceKind::RoundRobin,
            outlier(1, Duration::from_secs(30), percent),
            n,
        );
        for _ in 0..u32::from(n) * 3 {
            if let Some(pick) = b.pick() {
                pick.finish(fail(MS));
            }
        }
        b.snapshot().iter().filter(|e| e.ejected).count()
    }

    #[test]
    fn never_more_than_max_ejected_percent_and_never_all() {
        assert_eq!(ejected_when_all_fail(10, 30), 3);
        assert_eq!(ejected_when_all_fail(10, 35), 3, "rounded down");
        assert_eq!(ejected_when_all_fail(3, 10), 1, "at least one, as Envoy");
        assert_eq!(ejected_when_all_fail(3, 100), 2, "never all");
        assert_eq!(ejected_when_all_fail(3, 255), 2, "above 100 counts as 100");
        assert_eq!(ejected_when_all_fail(3, 0), 0, "0 disables ejection");
        assert_eq!(
            ejected_when_all_fail(1, 100),
            0,
            "a single endpoint stays in"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_kept_in_by_the_bound_is_ejected_once_there_is_room() {
        let b = balancer(
            BalanceKind::RoundRobin,
            outlier(2, Duration::from_secs(10), 50),
            2,
        );
        let [first, second] = [addrs(2)[0], addrs(2)[1]];
        for _ in 0..2 {
            finish_on(&b, first, fail(MS));
        }
        for _ in 0..2 {
            finish_on(&b, second, fail(MS));
        }
        assert!(state(&b, first).ejected && !state(&b, second).ejected);
        advance(Duration::from_secs(10)).await;
        // The first is back (at the next pick); the second's next failure ejects it.
        finish_on(&b, second, fail(MS));
        assert!(!state(&b, first).ejected && state(&b, second).ejected);
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_skips_an_ejected_endpoint_then_takes_it_back() {
        let eject_for = Duration::from_secs(30);
        let b = balancer(BalanceKind::P2cEwma, outlier(1, eject_for, 50), 3);
        let bad = addrs(3)[1];
        finish_on(&b, bad, fail(MS));
        let mut waited = Duration::ZERO;
        while waited < eject_for - MS {
            let pick = b.pick().expect("an endpoint");
            assert_ne!(
                pick.addr, bad,
                "picked {waited:?} into a {eject_for:?} ejection"
            );
            pick.finish(Outcome::Success { latency: MS });
            advance(10 * MS).await;
            waited += 10 * MS;
        }
        advance(MS).await;
        let back = (0..100).any(|_| b.pick().expect("an endpoint").addr == bad);
        assert!(back, "not picked in 100 picks after its ejection ended");
    }

    #[tokio::test(start_paused = true)]
    async fn set_endpoints_keeps_the_state_of_those_that_stay() {
        let b = balancer(
            BalanceKind::RoundRobin,
            outlier(1, Duration::from_secs(30), 100),
            3,
        );
        let [a, slow, c] = [addrs(3)[0], addrs(3)[1], addrs(3)[2]];
        let d = SocketAddr::from(([198, 18, 0, 4], 80));
        finish_on(&b, slow, Outcome::Success { latency: 500 * MS });
        finish_on(&b, a, fail(MS));
        let held = loop {
            let pick = b.pick().expect("an endpoint");
            if pick.addr == c {
                break pick;
            }
        };
        let on_removed = loop {
            let pick = b.pick().expect("an endpoint");
            if pick.addr == slow {
                break pick;
            }
        };
        b.set_endpoints(&[c, a, d, a]);
        let snap = b.snapshot();
        let addrs_now: Vec<SocketAddr> = snap.iter().map(|e| e.addr).collect();
        assert_eq!(addrs_now, [c, a, d], "in the given order, duplicates once");
        assert_eq!(
            (snap[0].pending, snap[0].ejected),
            (1, false),
            "c: {:?}",
            snap[0]
        );
        assert_eq!(
            (snap[1].ejected, snap[1].ejections),
            (true, 1),
            "a: {:?}",
            snap[1]
        );
        assert_eq!(
            (snap[2].ewma, snap[2].pending),
            (DEFAULT_RTT, 0),
            "d: {:?}",
            snap[2]
        );
        // A pick on a removed endpoint finishes harmlessly; one on a moved endpoint still counts.
        on_removed.finish(fail(MS));
        held.finish(Outcome::Success { latency: MS });
        assert_eq!(state(&b, c).pending, 0);
        // The slow endpoint comes back as a new one: its 500 ms are forgotten.
        b.set_endpoints(&[c, a, d, slow]);
        assert_eq!(state(&b, slow).ewma, DEFAULT_RTT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_smaller_set_releases_the_ejections_due_back_soonest() {
        let b = balancer(
            BalanceKind::RoundRobin,
            outlier(1, Duration::from_secs(30), 50),
            4,
        );
        let all = addrs(4);
        finish_on(&b, all[0], fail(MS));
        advance(Duration::from_secs(1)).await;
        finish_on(&b, all[1], fail(MS));
        assert_eq!(ejected_count(&b), 2);
        // Two endpoints at 50 %: one may be out; the one ejected first is due back first.
        b.set_endpoints(&all[..2]);
        assert!(!state(&b, all[0]).ejected && state(&b, all[1]).ejected);
    }

    fn ejected_count(b: &Balancer) -> usize {
        b.snapshot().iter().filter(|e| e.ejected).count()
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_is_a_peak_ewma_that_decays() {
        let b = balancer(BalanceKind::RoundRobin, None, 1);
        let only = addrs(1)[0];
        let ewma = |b: &Balancer| state(b, only).ewma.as_secs_f64();
        // Durations are whole nanoseconds.
        let close = |got: f64, want: f64| (got - want).abs() < 1e-9;
        // A sample above the estimate replaces it at once.
        finish_on(&b, only, Outcome::Success { latency: 1000 * MS });
        assert!(close(ewma(&b), 1.0));
        // Untouched for one time constant: e^-1 of it.
        advance(DECAY).await;
        assert!(close(ewma(&b), (-1f64).exp()), "{}", ewma(&b));
        // A sample below the estimate is blended in by the time since the last update (two
        // time constants: round-robin does not weigh, so the pick did not touch it).
        let pick = b.pick().expect("the endpoint");
        advance(DECAY).await;
        pick.finish(Outcome::Success { latency: 100 * MS });
        let decay = (-2f64).exp();
        assert!(close(ewma(&b), decay + 0.1 * (1.0 - decay)), "{}", ewma(&b));
        // A failure raises the estimate but never lowers it.
        let before = ewma(&b);
        finish_on(&b, only, fail(MS));
        assert!(close(ewma(&b), before));
        finish_on(&b, only, fail(2000 * MS));
        assert!(close(ewma(&b), 2.0));
    }

    /// Prints what one `pick` + `finish` costs, for the benchmark notes:
    /// `cargo test --release --lib balance::tests::cost_of_a_pick -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_of_a_pick() {
        for (kind, n) in [
            (BalanceKind::P2cEwma, 3),
            (BalanceKind::P2cEwma, 100),
            (BalanceKind::RoundRobin, 3),
            (BalanceKind::RoundRobin, 100),
        ] {
            let b = balancer(kind, outlier(5, Duration::from_secs(30), 50), n);
            let rounds = 1_000_000u32;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                let pick = b.pick().expect("an endpoint");
                pick.finish(Outcome::Success { latency: MS });
            }
            let ns = start.elapsed().as_nanos() / u128::from(rounds);
            println!("{kind:?}, {n} endpoints: {ns} ns per pick + finish");
        }
    }
}
