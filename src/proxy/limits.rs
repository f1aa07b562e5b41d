//! What a client can hold, and how it is taken back: requests in flight (`--max-in-flight`) and
//! open connections (`--max-connections`).
//!
//! At the connection limit the proxy makes room before it refuses anyone (Envoy's overload manager
//! and HAProxy do the same kind of shedding): it closes an idle keep-alive connection first, else
//! the connection whose request head has been arriving the longest (a slowloris). Connections
//! that are busy with a request are never shed. So a few hundred hostile sockets cannot lock a
//! service out, whatever `--max-connections` is.

use crate::sync::lock;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// What a connection is doing, for shedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Activity {
    /// Serving a request, or a protocol the proxy cannot see into: never shed.
    Busy = 0,
    /// Waiting for the next request on a keep-alive connection: shed first.
    Idle = 1,
    /// Receiving a request head: shed the oldest when no idle connection is left.
    Head = 2,
}

/// One open connection, as the shedder sees it.
pub struct Slot {
    activity: AtomicU8,
    /// Milliseconds since the limits were created, when the activity last changed.
    /// When the activity last changed, as a place in one sequence shared by all connections:
    /// orders them as a clock would, for an atomic increment instead of a clock read per request.
    since: AtomicU64,
    /// Close once idle: the drain is closing, or the shedder chose this connection.
    close: AtomicBool,
    /// Close now, even mid-head: the shedder chose this connection.
    shed: AtomicBool,
    notify: Notify,
    sequence: Arc<AtomicU64>,
}

impl Slot {
    pub(crate) fn set(&self, activity: Activity) {
        self.activity.store(activity as u8, Ordering::Relaxed);
        let now = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.since.store(now, Ordering::Relaxed);
    }

    /// Whether the connection should close as soon as it is idle (shed, or the drain is closing).
    pub(crate) fn close_requested(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    fn request_close(&self, shed: bool) {
        if shed {
            self.shed.store(true, Ordering::Release);
        }
        self.close.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Resolves when the connection should close once idle: the shedder chose it, or the drain.
    pub(crate) async fn close_requested_wait(&self) {
        self.wait_for(&self.close).await;
    }

    /// Resolves when the shedder chose this connection: it closes now, even mid-head.
    pub(crate) async fn shed_wait(&self) {
        self.wait_for(&self.shed).await;
    }

    async fn wait_for(&self, flag: &AtomicBool) {
        loop {
            let notified = self.notify.notified();
            if flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Whether the shedder chose this connection (it is to close at once).
    pub(crate) fn is_shed(&self) -> bool {
        self.shed.load(Ordering::Acquire)
    }

    /// Runs `work` unless the shedder chooses this connection first (`None`).
    ///
    /// A future of its own rather than an `async fn`: an `async fn` keeps its argument and the
    /// `select!` over it side by side, so `work` would take its room twice in every caller's task.
    pub(crate) fn unless_shed<F: Future>(
        &self,
        work: F,
    ) -> UnlessShed<impl Future<Output = ()> + '_, F> {
        UnlessShed {
            shed: self.shed_wait(),
            work,
        }
    }

    fn activity(&self) -> u8 {
        self.activity.load(Ordering::Relaxed)
    }
}

pin_project_lite::pin_project! {
    /// [`Slot::unless_shed`]'s future: the shed signal first, then the work.
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct UnlessShed<S, F> {
        #[pin]
        shed: S,
        #[pin]
        work: F,
    }
}

impl<S: Future<Output = ()>, F: Future> Future for UnlessShed<S, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.shed.poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        this.work.poll(cx).map(Some)
    }
}

/// Requests open on a connection that hyper serves (HTTP/2, and HTTP/1 after the fast path handed
/// it over): the connection is idle when none is, both for the shedder and for `--idle-timeout`.
/// The fast path tracks this itself; hyper does not say when an HTTP/2 connection has no stream.
pub(crate) struct OpenRequests {
    slot: Arc<Slot>,
    /// Under one lock with the slot's activity: HTTP/2 streams start and end on different threads,
    /// and a stream ending as another starts must not leave the slot idle with a request open.
    state: Mutex<OpenState>,
    /// Where the marks' progress clocks count from.
    epoch: tokio::time::Instant,
    /// A head began arriving ([`OpenRequests::bytes_arrived`]).
    head_started: tokio::sync::Notify,
}

struct OpenState {
    /// When the last request ended (or the connection opened).
    idle_since: tokio::time::Instant,
    /// When the first byte of a head arrived while no request was open (HTTP/1 on hyper).
    head_since: Option<tokio::time::Instant>,
    /// The open requests (how many is how many are open), with their response's progress, by
    /// mark id ([`RequestMark::touch`]).
    responses: HashMap<u64, Arc<AtomicU64>>,
    next_mark: u64,
}

impl OpenRequests {
    /// A connection that has not sent a request yet counts as receiving a head: shed after the
    /// idle ones, the oldest first.
    pub(crate) fn new(slot: Arc<Slot>) -> Arc<OpenRequests> {
        slot.set(Activity::Head);
        Arc::new(OpenRequests {
            slot,
            state: Mutex::new(OpenState {
                idle_since: tokio::time::Instant::now(),
                head_since: None,
                responses: HashMap::new(),
                next_mark: 0,
            }),
            epoch: tokio::time::Instant::now(),
            head_started: tokio::sync::Notify::new(),
        })
    }

    /// Marks a request open until the returned mark is dropped (with its response body).
    pub(crate) fn start(self: &Arc<Self>) -> RequestMark {
        let mut state = lock(&self.state);
        state.head_since = None;
        if state.responses.is_empty() {
            self.slot.set(Activity::Busy);
        }
        let id = state.next_mark;
        state.next_mark += 1;
        let progress = Arc::new(AtomicU64::new(NOT_STARTED));
        state.responses.insert(id, progress.clone());
        RequestMark {
            open: self.clone(),
            id,
            progress,
        }
    }

    /// Resolves once a response in progress on this connection has not been taken by the client
    /// (its body not polled: the client's window, or its socket, stays full) for `timeout`: a
    /// client that stops reading would otherwise hold its streams and their app connections for
    /// good. Responses not started (waiting for the app) and tunnels are not counted.
    pub(crate) async fn stalled_for(&self, timeout: std::time::Duration) {
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(timeout / 2).await;
            let now = self.now_ms();
            let state = lock(&self.state);
            let stalled = state.responses.values().any(|p| {
                let last = p.load(Ordering::Relaxed);
                last != NOT_STARTED && now.saturating_sub(last) > limit
            });
            if stalled {
                return;
            }
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes came from the client: with no request open, they begin a head, whose time runs from
    /// now ([`OpenRequests::head_overdue`]).
    pub(crate) fn bytes_arrived(&self) {
        let mut state = lock(&self.state);
        if state.responses.is_empty() && state.head_since.is_none() {
            state.head_since = Some(tokio::time::Instant::now());
            self.head_started.notify_one();
        }
    }

    /// A head is arriving and no request is open: what is written now is not a response to a
    /// request the proxy handled.
    pub(crate) fn reading_head(&self) -> bool {
        let state = lock(&self.state);
        state.responses.is_empty() && state.head_since.is_some()
    }

    /// Resolves, with when the head began, once a head has been arriving for `timeout` without
    /// becoming a request: `--header-timeout` from a head's first byte, as on the fast path, while
    /// an idle keep-alive connection waits for `--idle-timeout` ([`OpenRequests::idle_for`]).
    pub(crate) async fn head_overdue(&self, timeout: std::time::Duration) -> tokio::time::Instant {
        loop {
            let head_since = lock(&self.state).head_since;
            match head_since {
                Some(since) if since + timeout <= tokio::time::Instant::now() => return since,
                Some(since) => tokio::time::sleep_until(since + timeout).await,
                // Woken once per head (a permit is kept if it starts before this waits).
                None => self.head_started.notified().await,
            }
        }
    }

    /// Resolves once the connection has had no open request for `timeout`. Looks at most once
    /// per `timeout` (or at the moment an idle period would end), never per request: a wake-up
    /// when the last stream ends would re-poll the whole HTTP/2 connection's task.
    pub(crate) async fn idle_for(&self, timeout: std::time::Duration) {
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            let now = tokio::time::Instant::now();
            let state = lock(&self.state);
            deadline = if !state.responses.is_empty() {
                now + timeout
            } else if state.idle_since + timeout <= now {
                return;
            } else {
                state.idle_since + timeout
            };
        }
    }
}

/// A response whose body was never polled.
const NOT_STARTED: u64 = u64::MAX;

/// One open request on an [`OpenRequests`] connection.
pub struct RequestMark {
    open: Arc<OpenRequests>,
    id: u64,
    /// When its response body was last polled, in ms from the connection's epoch.
    progress: Arc<AtomicU64>,
}

impl RequestMark {
    /// The response body was polled: the client takes what it is given (a clock read and a
    /// store, no lock).
    pub(crate) fn touch(&self) {
        self.progress.store(self.open.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for RequestMark {
    fn drop(&mut self) {
        let open = &self.open;
        let mut state = lock(&open.state);
        state.responses.remove(&self.id);
        if state.responses.is_empty() {
            state.idle_since = tokio::time::Instant::now();
            open.slot.set(Activity::Idle);
        }
    }
}

pub struct Limits {
    max_in_flight: usize,
    in_flight: AtomicUsize,
    max_connections: usize,
    open: AtomicUsize,
    all_closed: Notify,
    slots: Mutex<Slots>,
    sequence: Arc<AtomicU64>,
    /// The drain is closing: every connection, new ones included, closes once idle.
    closing: AtomicBool,
}

#[derive(Default)]
struct Slots {
    next_id: u64,
    by_id: HashMap<u64, Arc<Slot>>,
}

impl Limits {
    pub(crate) fn new(max_connections: usize, max_in_flight: usize) -> Limits {
        Limits {
            max_in_flight,
            in_flight: AtomicUsize::new(0),
            max_connections,
            open: AtomicUsize::new(0),
            all_closed: Notify::new(),
            slots: Mutex::new(Slots::default()),
            sequence: Arc::new(AtomicU64::new(0)),
            closing: AtomicBool::new(false),
        }
    }

    /// Open connections (upgraded tunnels included).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub(crate) async fn wait_all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.open_connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Admits a new client connection, shedding an idle or slow one at the limit. `None` when
    /// the limit is reached and nothing can be shed. `shed` counts the connections closed for it.
    pub(crate) fn admit(
        self: &Arc<Self>,
        gauge: &Gauge,
        shed: &prometheus_client::metrics::counter::Counter,
    ) -> Option<ConnectionGuard> {
        if self.open_connections() >= self.max_connections {
            if !self.shed_one() {
                return None;
            }
            shed.inc();
        }
        Some(self.track(gauge))
    }

    /// Counts a connection without checking the limit (an upgraded tunnel leaving its request).
    pub(crate) fn track(self: &Arc<Self>, gauge: &Gauge) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        gauge.inc();
        let slot = Arc::new(Slot {
            activity: AtomicU8::new(Activity::Busy as u8),
            since: AtomicU64::new(0),
            close: AtomicBool::new(self.closing.load(Ordering::Acquire)),
            shed: AtomicBool::new(false),
            notify: Notify::new(),
            sequence: self.sequence.clone(),
        });
        let id = {
            let mut slots = lock(&self.slots);
            let id = slots.next_id;
            slots.next_id += 1;
            slots.by_id.insert(id, slot.clone());
            id
        };
        ConnectionGuard {
            limits: self.clone(),
            gauge: gauge.clone(),
            id,
            slot,
        }
    }

    /// The drain is closing: idle connections close now, busy ones after their current request.
    pub(crate) fn close_all_when_idle(&self) {
        self.closing.store(true, Ordering::Release);
        for slot in lock(&self.slots).by_id.values() {
            slot.request_close(false);
        }
    }

    /// Picks the connection that does the least: idle first (the longest idle), then the request
    /// head that has been arriving the longest. Returns whether one was told to close.
    fn shed_one(&self) -> bool {
        let slots = lock(&self.slots);
        let candidates = slots
            .by_id
            .values()
            .filter(|s| !s.shed.load(Ordering::Relaxed) && s.activity() != Activity::Busy as u8);
        // Idle sorts before Head; within each, the oldest first.
        let victim = candidates.min_by_key(|s| {
            (
                s.activity() != Activity::Idle as u8,
                s.since.load(Ordering::Relaxed),
            )
        });
        match victim {
            Some(slot) => {
                slot.request_close(true);
                true
            }
            None => false,
        }
    }

    /// Takes a slot for a request, or `None` at `--max-in-flight`.
    pub(crate) fn start_request(self: &Arc<Self>) -> Option<InFlight> {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(InFlight(self.clone()))
    }
}

/// A request counted in flight; released when dropped.
pub struct InFlight(Arc<Limits>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open connection, counted until dropped.
pub(crate) struct ConnectionGuard {
    limits: Arc<Limits>,
    gauge: Gauge,
    id: u64,
    slot: Arc<Slot>,
}

impl ConnectionGuard {
    pub(crate) fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        lock(&self.limits.slots).by_id.remove(&self.id);
        self.gauge.dec();
        if self.limits.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.limits.all_closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_hyper_connection_is_idle_only_once_its_last_response_is_done() {
        let limits = Arc::new(Limits::new(10, 10));
        let (gauge, shed) = (Gauge::default(), Counter::default());
        let guard = limits.admit(&gauge, &shed).expect("room");
        let open = OpenRequests::new(guard.slot().clone());
        assert_eq!(
            guard.slot().activity(),
            Activity::Head as u8,
            "before a request"
        );
        let first = open.start();
        let second = open.start();
        assert_eq!(guard.slot().activity(), Activity::Busy as u8);
        let idle = open.idle_for(Duration::from_secs(60));
        tokio::pin!(idle);
        // Ten minutes with a request open: never idle, whatever the timeout.
        let waited = tokio::time::timeout(Duration::from_secs(600), idle.as_mut()).await;
        assert!(waited.is_err(), "idle while two requests were open");
        drop(first);
        assert_eq!(
            guard.slot().activity(),
            Activity::Busy as u8,
            "one still open"
        );
        drop(second);
        assert_eq!(guard.slot().activity(), Activity::Idle as u8);
        let last_done = tokio::time::Instant::now();
        idle.as_mut().await;
        assert_eq!(
            last_done.elapsed(),
            Duration::from_secs(60),
            "counted from the last response"
        );
        // A request in the meantime starts the count again.
        drop(open.start());
        let idle = open.idle_for(Duration::from_secs(60));
        tokio::pin!(idle);
        let waited = tokio::time::timeout(Duration::from_secs(30), idle.as_mut()).await;
        assert!(waited.is_err(), "idle after half the timeout");
        drop(open.start());
        let again = tokio::time::Instant::now();
        idle.as_mut().await;
        assert_eq!(again.elapsed(), Duration::from_secs(60));
    }

    #[test]
    fn sheds_idle_first_then_the_oldest_head_never_busy() {
        let limits = Arc::new(Limits::new(3, 10));
        let (gauge, shed) = (Gauge::default(), Counter::default());
        let busy = limits.admit(&gauge, &shed).expect("room");
        let head_old = limits.admit(&gauge, &shed).expect("room");
        head_old.slot().set(Activity::Head);
        let idle = limits.admit(&gauge, &shed).expect("room");
        idle.slot().set(Activity::Idle);
        let _ = limits.admit(&gauge, &shed).expect("idle shed");
        assert!(idle.slot().shed.load(Ordering::Relaxed));
        assert!(!head_old.slot().shed.load(Ordering::Relaxed));
        let _ = limits.admit(&gauge, &shed).expect("head shed");
        assert!(head_old.slot().shed.load(Ordering::Relaxed));
        assert!(limits.admit(&gauge, &shed).is_none(), "only busy ones left");
        assert!(!busy.slot().shed.load(Ordering::Relaxed));
        assert_eq!(shed.get(), 2);
    }

    #[test]
    fn in_flight_slots_come_back() {
        let limits = Arc::new(Limits::new(1, 1));
        let first = limits.start_request().expect("room");
        assert!(limits.start_request().is_none());
        drop(first);
        assert!(limits.start_request().is_some());
    }
}
