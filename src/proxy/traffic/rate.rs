//! A route's rate limit: token buckets, one overall and one per peer (the SPIFFE identity over
//! mutual TLS, the client's address otherwise), fair across peers.
//!
//! Each bucket is a GCRA (the generic cell rate algorithm, a token bucket kept as one number: the
//! theoretical arrival time, TAT, of the next request on an empty bucket). A request at `now`
//! conforms when `TAT - (burst - 1) * interval <= now`, and then moves the TAT to
//! `max(TAT, now) + interval`; the bucket is full (idle) when `TAT <= now`. One `u64` per bucket,
//! no refill timer, and the refusal says exactly when the next token is there.
//!
//! Fairness: the peer's bucket is checked first and the overall bucket is taken only when the
//! peer's passes; the peer's is charged only when the overall one passes too. So a noisy peer's
//! refused requests take nothing from the overall bucket and cannot starve the others, and a
//! request the overall bucket refuses costs its peer nothing.
//!
//! The per-peer table is bounded ([`PEER_CAPACITY`] entries): a client that makes endless
//! addresses (an IPv6 prefix holds 2^64) gets no more memory. A new peer takes a free entry, else
//! an idle one (a full bucket forgets nothing when dropped), found by a clock hand that probes at
//! most [`EVICTION_PROBES`] entries; when every probed entry is busy, the new peer shares one
//! overflow bucket (a single peer's rate for all of them) rather than evict a busy peer, whose
//! bucket would come back full. An entry turns busy only when the overall bucket admits its
//! request, so a flood the overall bucket refuses leaves the table idle and reusable.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashbrown::HashTable;
use tokio::time::Instant;

use super::RetryAfter;
use crate::identity::SpiffeId;
use crate::sync::lock;

/// The most peers a limiter keeps a bucket for: 32 bytes each in the slab and 10 in the index
/// (8192 buckets of 5 bytes), 168 KiB at most per route, allocated as peers arrive.
pub const PEER_CAPACITY: usize = 4096;

/// How many entries a new peer probes for an idle one when the table is full: the cost of a
/// new peer is bounded, and the hand goes round the whole table in 256 new peers.
pub const EVICTION_PROBES: usize = 16;

/// Whose bucket a request draws on: the peer's SPIFFE identity when the connection proved one,
/// else its IP address. Cheap to clone (a reference count or 16 bytes) and to hash.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey(Peer);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Peer {
    Identity(Arc<SpiffeId>),
    Address(IpAddr),
}

impl PeerKey {
    /// An IPv4 client seen on an IPv6 socket (`::ffff:a.b.c.d`) is the same peer as on an IPv4
    /// one.
    pub fn new(identity: Option<&Arc<SpiffeId>>, address: IpAddr) -> PeerKey {
        PeerKey(match identity {
            Some(identity) => Peer::Identity(Arc::clone(identity)),
            None => Peer::Address(address.to_canonical()),
        })
    }
}

/// A rate and a burst, in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Gcra {
    /// Between two tokens.
    interval: u64,
    /// How far the TAT may run ahead of now: `(burst - 1) * interval`.
    tolerance: u64,
}

/// The longest a bucket's TAT may run ahead of now (about 146 years), so that its arithmetic
/// never saturates: a rate too low for it behaves as no refill at all.
const HORIZON: u64 = 1 << 62;

impl Gcra {
    /// `burst` requests at once from a full bucket (at least 1), then `per_second`. The routes
    /// file refuses a rate that is not positive; here one is a bucket that never refills.
    fn new(per_second: f64, burst: u32) -> Gcra {
        let burst = u64::from(burst.max(1));
        let interval = if per_second.is_nan() || per_second <= 0.0 {
            u64::MAX
        } else {
            // A float-to-integer cast saturates: a huge interval is capped below, a rate above
            // 1e9 per second is one token per nanosecond.
            ((1e9 / per_second).round() as u64).max(1)
        };
        let interval = interval.min(HORIZON / burst);
        Gcra {
            interval,
            tolerance: interval * (burst - 1),
        }
    }

    /// The bucket's new TAT if a request at `now` conforms, else how long until one would.
    fn admit(self, tat: u64, now: u64) -> Result<u64, Duration> {
        let earliest = tat.saturating_sub(self.tolerance);
        if earliest > now {
            return Err(Duration::from_nanos(earliest - now));
        }
        Ok(tat.max(now) + self.interval)
    }
}

/// Token buckets for one route: overall, and per peer when the route says `perPeer`.
#[derive(Debug)]
pub struct RateLimiter {
    /// Time zero of the TATs.
    epoch: Instant,
    overall: Gcra,
    overall_tat: AtomicU64,
    per_peer: Option<PerPeer>,
}

#[derive(Debug)]
struct PerPeer {
    gcra: Gcra,
    table: Mutex<PeerTable>,
}

/// The per-peer buckets: a slab of at most [`PEER_CAPACITY`] entries, and an index of slab
/// positions by the key's hash (each key is stored once, in the slab). The hash is SipHash with a
/// random key per table: client-chosen addresses cannot pile up in one probe sequence.
#[derive(Debug, Default)]
struct PeerTable {
    hasher: RandomState,
    index: HashTable<u32>,
    slots: Vec<PeerSlot>,
    /// Where the next search for an idle entry starts.
    hand: usize,
    /// The TAT of the bucket new peers share when every entry they probe is busy.
    overflow: u64,
}

#[derive(Debug)]
struct PeerSlot {
    key: PeerKey,
    tat: u64,
}

impl RateLimiter {
    /// `burst` requests at once (the bucket's size, at least 1), refilled at `requests_per_second`.
    /// With `per_peer`, each peer also has a bucket refilled at that rate, holding the same time's
    /// worth of burst as the overall one (`burst * per_peer / requests_per_second`, between 1
    /// and `burst`).
    pub fn new(requests_per_second: f64, burst: u32, per_peer: Option<f64>) -> RateLimiter {
        RateLimiter {
            epoch: Instant::now(),
            overall: Gcra::new(requests_per_second, burst),
            overall_tat: AtomicU64::new(0),
            per_peer: per_peer.map(|rate| {
                // NaN (a rate of 0 overall) casts to 0, raised to 1.
                let share = (f64::from(burst) * rate / requests_per_second).round() as u32;
                PerPeer {
                    gcra: Gcra::new(rate, share.clamp(1, burst.max(1))),
                    table: Mutex::new(PeerTable::default()),
                }
            }),
        }
    }

    /// Takes a token for one request from `peer`, or says when one will be there. One lock
    /// (none without `perPeer`), no allocation once the peer table has grown.
    pub fn check(&self, peer: &PeerKey) -> Result<(), RetryAfter> {
        let now = self.now();
        let Some(per_peer) = &self.per_peer else {
            return self.take_overall(now).map_err(RetryAfter);
        };
        let mut table = lock(&per_peer.table);
        let tat = table.bucket(peer, now);
        let next = per_peer.gcra.admit(*tat, now).map_err(RetryAfter)?;
        self.take_overall(now).map_err(RetryAfter)?;
        *tat = next;
        Ok(())
    }

    fn take_overall(&self, now: u64) -> Result<(), Duration> {
        let mut tat = self.overall_tat.load(Ordering::Relaxed);
        loop {
            let next = self.overall.admit(tat, now)?;
            match self.overall_tat.compare_exchange_weak(
                tat,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    fn now(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.epoch);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl PeerTable {
    /// The TAT of `peer`'s bucket: its entry, a new one (free or idle), or the overflow's.
    fn bucket(&mut self, peer: &PeerKey, now: u64) -> &mut u64 {
        let hash = self.hasher.hash_one(peer);
        let slots = &self.slots;
        if let Some(&slot) = self
            .index
            .find(hash, |&slot| slots[slot as usize].key == *peer)
        {
            return &mut self.slots[slot as usize].tat;
        }
        let fresh = PeerSlot {
            key: peer.clone(),
            tat: 0,
        };
        let slot = if self.slots.len() < PEER_CAPACITY {
            self.slots.push(fresh);
            self.slots.len() - 1
        } else if let Some(idle) = self.idle_slot(now) {
            let old = std::mem::replace(&mut self.slots[idle], fresh);
            if let Ok(entry) = self
                .index
                .find_entry(self.hasher.hash_one(&old.key), |&slot| {
                    slot as usize == idle
                })
            {
                entry.remove();
            }
            idle
        } else {
            return &mut self.overflow;
        };
        let (hasher, slots) = (&self.hasher, &self.slots);
        // The slab never holds more than PEER_CAPACITY entries, which fits a u32.
        self.index.insert_unique(hash, slot as u32, |&slot| {
            hasher.hash_one(&slots[slot as usize].key)
        });
        &mut self.slots[slot].tat
    }

    /// An entry whose bucket is full, among the next [`EVICTION_PROBES`] from the hand.
    fn idle_slot(&mut self, now: u64) -> Option<usize> {
        for _ in 0..EVICTION_PROBES {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            if self.slots[slot].tat <= now {
                return Some(slot);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::time::advance;

    fn address(n: u32) -> PeerKey {
        PeerKey::new(None, IpAddr::V4(Ipv4Addr::from(n)))
    }

    /// Takes every token there is now; how many.
    fn drain(limiter: &RateLimiter, peer: &PeerKey) -> u64 {
        let mut admitted = 0;
        while limiter.check(peer).is_ok() {
            admitted += 1;
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_admits_the_burst_and_the_rate() {
        let peer = address(1);
        for (rate, burst) in [(100.0, 50), (7.3, 1), (0.5, 3), (1000.0, 1)] {
            let limiter = RateLimiter::new(rate, burst, None);
            let mut admitted = 0;
            // A client that asks as fast as it can, once a millisecond, for a minute.
            for _ in 0..60_000 {
                admitted += drain(&limiter, &peer);
                advance(Duration::from_millis(1)).await;
            }
            let expected = f64::from(burst) + rate * 60.0;
            assert!(
                (admitted as f64 - expected).abs() <= 1.0,
                "rate {rate}/s, burst {burst}: {admitted} admitted in a minute, expected {expected}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_admits_its_burst_at_once_and_no_more() {
        let peer = address(1);
        let limiter = RateLimiter::new(10.0, 25, None);
        assert_eq!(drain(&limiter, &peer), 25);
        // Idle far longer than it takes to fill: still only the burst.
        advance(Duration::from_secs(3600)).await;
        assert_eq!(drain(&limiter, &peer), 25);
        // A burst of 0 is one request at a time.
        let limiter = RateLimiter::new(10.0, 0, None);
        assert_eq!(drain(&limiter, &peer), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_when_the_next_token_is_there() {
        let peer = address(1);
        let limiter = RateLimiter::new(3.0, 2, Some(1.0));
        // The peer's bucket holds round(2 * 1 / 3) = 1 token, refilled once a second.
        assert!(limiter.check(&peer).is_ok());
        let Err(RetryAfter(wait)) = limiter.check(&peer) else {
            panic!("a second request at once passed a per-peer bucket of one");
        };
        assert_eq!(wait, Duration::from_secs(1));
        advance(wait - Duration::from_nanos(1)).await;
        assert!(limiter.check(&peer).is_err(), "admitted before its time");
        advance(Duration::from_nanos(1)).await;
        assert!(
            limiter.check(&peer).is_ok(),
            "refused at the time it was given"
        );

        // Overall: 2 at once, then one every third of a second.
        let limiter = RateLimiter::new(3.0, 2, None);
        assert_eq!(drain(&limiter, &peer), 2);
        let Err(wait) = limiter.check(&peer) else {
            panic!("an empty bucket admitted");
        };
        assert_eq!(wait, RetryAfter(Duration::from_nanos(333_333_333)));
        assert_eq!(wait.header_seconds(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_noisy_peer_cannot_starve_the_quiet_ones() {
        // Room overall for 40 a second; the noisy peer tries 1000 a second, four quiet peers 5
        // each. Were the noisy peer's refused requests to take overall tokens, it would empty
        // the overall bucket and the quiet peers would be refused.
        let limiter = RateLimiter::new(40.0, 40, Some(10.0));
        let noisy = address(1);
        let quiet: Vec<PeerKey> = (2..6).map(address).collect();
        let (mut noisy_admitted, mut quiet_refused) = (0, 0);
        for millisecond in 0..10_000 {
            noisy_admitted += u64::from(limiter.check(&noisy).is_ok());
            if millisecond % 200 == 0 {
                for peer in &quiet {
                    quiet_refused += u64::from(limiter.check(peer).is_err());
                }
            }
            advance(Duration::from_millis(1)).await;
        }
        assert_eq!(quiet_refused, 0, "a quiet peer was refused");
        // Its own bucket's burst (round(40 * 10 / 40) = 10) and ten seconds at 10 a second.
        assert!(
            (10 + 100 - 1..=10 + 100 + 1).contains(&noisy_admitted),
            "the noisy peer got {noisy_admitted} in 10 s at 10/s with a burst of 10"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_overall_costs_the_peer_nothing() {
        // Overall 1 every 100 ms; each peer 1 a second.
        let limiter = RateLimiter::new(10.0, 1, Some(1.0));
        let (first, second) = (address(1), address(2));
        assert!(limiter.check(&first).is_ok());
        // The overall bucket is empty: the second peer is refused, its own bucket untouched.
        assert_eq!(
            limiter.check(&second),
            Err(RetryAfter(Duration::from_millis(100)))
        );
        advance(Duration::from_millis(100)).await;
        assert!(limiter.check(&second).is_ok());
    }

    #[test]
    fn a_peer_is_its_identity_else_its_canonical_address() {
        let identity: Arc<SpiffeId> = Arc::new(
            "spiffe://cluster.local/ns/default/sa/reviews"
                .parse()
                .expect("a valid SPIFFE ID"),
        );
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 18, 0, 1).to_ipv6_mapped());
        assert_eq!(PeerKey::new(None, v4), PeerKey::new(None, mapped));
        // The same identity from two addresses (two connections, two parsed certificates).
        assert_eq!(
            PeerKey::new(Some(&identity), v4),
            PeerKey::new(Some(&Arc::new((*identity).clone())), address(7).ip()),
        );
        assert_ne!(PeerKey::new(Some(&identity), v4), PeerKey::new(None, v4));
    }

    impl PeerKey {
        fn ip(&self) -> IpAddr {
            match &self.0 {
                Peer::Address(address) => *address,
                Peer::Identity(_) => panic!("not an address"),
            }
        }
    }

    fn table(limiter: &RateLimiter) -> std::sync::MutexGuard<'_, PeerTable> {
        lock(&limiter.per_peer.as_ref().expect("a per-peer limit").table)
    }

    /// A flood of 100k peers of one request each, 10 µs apart (a second in all); returns how
    /// many were admitted, and checks the table's bound after every request.
    async fn flood(limiter: &RateLimiter, first: u32, room: &mut usize) -> usize {
        let mut admitted = 0;
        for n in first..first + 100_000 {
            admitted += usize::from(limiter.check(&address(n)).is_ok());
            advance(Duration::from_micros(10)).await;
            let table = table(limiter);
            assert!(table.slots.len() <= PEER_CAPACITY);
            assert_eq!(table.index.len(), table.slots.len());
            if table.slots.len() == PEER_CAPACITY && *room == 0 {
                *room = table.index.capacity();
            }
            // Removals leave tombstones, which may cost the index one doubling, never more.
            assert!(
                *room == 0 || table.index.capacity() <= 2 * *room,
                "the index grew from room for {} to {} peers",
                *room,
                table.index.capacity()
            );
        }
        admitted
    }

    #[tokio::test(start_paused = true)]
    async fn the_peer_table_stays_bounded_under_100k_peers() {
        // Room overall for everyone; each peer 1 every 2 s with a burst of 1, so an entry is
        // busy for 2 s after its request, longer than the flood lasts.
        let limiter = RateLimiter::new(1e6, 1_000_000, Some(0.5));
        let noisy = address(u32::MAX);
        assert!(limiter.check(&noisy).is_ok());
        assert!(limiter.check(&noisy).is_err());
        let mut room = 0;
        // Every entry is busy while the flood lasts: the first peers take the free entries,
        // the rest share the overflow bucket (its burst of 1, then 1 every 2 s).
        let admitted = flood(&limiter, 0, &mut room).await;
        assert!(
            (PEER_CAPACITY - 1..=PEER_CAPACITY + 1).contains(&admitted),
            "{admitted} of 100k new peers admitted with {PEER_CAPACITY} entries and an overflow of 1 every 2 s"
        );
        // The noisy peer's busy entry was not taken: its bucket is still empty.
        assert!(limiter.check(&noisy).is_err());

        // Later every entry is idle: new peers take them over instead of the overflow.
        advance(Duration::from_secs(3)).await;
        let admitted = flood(&limiter, 100_000, &mut room).await;
        assert!(
            (PEER_CAPACITY..=PEER_CAPACITY + 2).contains(&admitted),
            "{admitted} of 100k new peers admitted after the table went idle"
        );
    }

    /// Threads hammer one limiter at once: every token is taken once, none twice. The buckets
    /// refill once in 1000 s (overall) and 10 000 s (per peer), so the counts are the bursts,
    /// plus what the run's real duration refilled.
    #[test]
    fn check_is_exact_across_threads() {
        const THREADS: u32 = 8;
        const CHECKS: u32 = 20_000;
        const PEERS: u32 = 16;
        for per_peer in [None, Some(0.0001)] {
            // Per peer: round(5000 * 0.0001 / 0.001) = 500 each, 8000 in all: the overall
            // bucket runs dry first.
            let limiter = RateLimiter::new(0.001, 5000, per_peer);
            let start = std::time::Instant::now();
            let admitted: Vec<u64> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..THREADS)
                    .map(|thread| {
                        let limiter = &limiter;
                        scope.spawn(move || {
                            let mut admitted = vec![0u64; PEERS as usize];
                            for n in 0..CHECKS {
                                let peer = (n + thread) % PEERS;
                                if limiter.check(&address(peer)).is_ok() {
                                    admitted[peer as usize] += 1;
                                }
                            }
                            admitted
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .fold(vec![0; PEERS as usize], |sum, worker| {
                        let counts = worker.join().expect("a worker finished");
                        sum.iter().zip(counts).map(|(a, b)| a + b).collect()
                    })
            });
            let refills = start.elapsed().as_secs() / 1000;
            let total: u64 = admitted.iter().sum();
            assert!(
                (5000..=5000 + refills + 1).contains(&total),
                "per peer {per_peer:?}: {total} admitted from a bucket of 5000"
            );
            if per_peer.is_some() {
                let most = admitted.iter().max().copied().unwrap_or_default();
                assert!(
                    most <= 500 + refills / 10 + 1,
                    "a peer took {most} of its 500"
                );
            }
        }
    }
}
