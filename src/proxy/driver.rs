//! The exchange driver: the one place where a request is decided, whichever adapter read it (the
//! HTTP/1.1 fast path, hyper's HTTP/1 and HTTP/2, HTTP inside an HBONE tunnel). An adapter parses
//! the request into [`Facts`], calls [`admit`], and either forwards the request or writes the
//! [`Synthetic`] response it got back, with that response's own close flag. The adapters decide
//! nothing themselves: the order of the checks, their statuses and their log records are here.
//!
//! The order (each refusal is answered before the next check is consulted):
//! 1. loop: this proxy's own `Via` pseudonym in the request (508);
//! 2. a malformed request the parser could still read whole: no valid, unambiguous authority (one
//!    `Host`, agreeing with `:authority`), or an HTTP/2 field value with whitespace around it (400);
//! 3. the inbound path in the form the app resolves ([`super::path`]): ambiguous is 400;
//! 4. the policy in force now (inbound only), for this peer, port, method and path (403);
//! 5. the route (`--routes`, [`super::routing`]) the request takes, if any: its rate limit (429),
//!    then its concurrency limit, which may queue the request (503);
//! 6. capacity: a slot of `--max-in-flight` (503).
//!
//! The retry rules are the driver's too, from typed facts of the attempt: [`may_retry`] (the
//! keep-alive race, on every request) and [`Routed::next_attempt`] (a route's `retry`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

use super::body::ResponseBody;
use super::exchange::ConnContext;
use super::limits::InFlight;
use super::path::Ambiguous;
use super::phases::Synthetic;
use super::routing::{RouteState, RoutesInForce};
use super::shared::Shared;
use super::traffic::concurrency::ConcurrencyPermit;
use super::traffic::rate::PeerKey;
use super::traffic::retry::{RetryBackoff, RetryBudget};
use super::upstream::balance::{Outcome, Pick};
use crate::error::ErrorKind;
use crate::routes::RequestKey;
use crate::telemetry::metrics::Direction;

/// What an adapter read from a request head, before any decision.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Facts<'a> {
    pub(crate) method: &'a Method,
    /// The path as judged, logged and forwarded (inbound: in the form the app resolves).
    pub(crate) path: &'a str,
    /// `content-type: application/grpc*`: refusals are answered the gRPC way.
    pub(crate) grpc: bool,
    /// `Via` names this proxy: the request came round again.
    pub(crate) looped: bool,
    /// Malformed though readable: no valid, unambiguous authority (RFC 9112 3.2, RFC 9113
    /// 8.3.1), or a field value with whitespace around it (RFC 9113 8.2.1).
    pub(crate) malformed: bool,
    /// Why the inbound path is ambiguous, when it is.
    pub(crate) ambiguous: Option<Ambiguous>,
    /// The client's connection may carry another request after a refusal: it asked for
    /// keep-alive and no byte of this request is left unread.
    pub(crate) reusable: bool,
    /// `Host` or `:authority` as the client wrote it (routes match on it).
    pub(crate) authority: Option<&'a str>,
    /// A gRPC request's `grpc-timeout` (honoured on a route, capped by its `timeout`).
    pub(crate) grpc_timeout: Option<Duration>,
}

/// A request the driver refuses: the response, and the route it took when a route's phase
/// refused it (for its record).
pub(crate) struct Refused {
    pub(crate) response: Synthetic,
    pub(crate) route: Option<Arc<str>>,
}

impl From<Synthetic> for Refused {
    fn from(response: Synthetic) -> Refused {
        Refused {
            response,
            route: None,
        }
    }
}

/// A request the driver lets through, and what it holds until its response ends.
pub(crate) struct Admitted {
    pub(crate) in_flight: InFlight,
    /// The route it took, when `--routes` has one for it.
    pub(crate) route: Option<Routed>,
}

/// Decides whether a request goes to the app. `Ok`: forward it, holding the in-flight slot until
/// its response ends. `Err`: answer with this response (its close flag says whether the
/// connection ends with it).
pub(crate) async fn admit(
    shared: &Shared,
    conn: &ConnContext,
    facts: &Facts<'_>,
) -> Result<Admitted, Refused> {
    let refuse = |kind| Refused::from(Synthetic::new(kind, facts.grpc).closing(!facts.reusable));
    if facts.looped {
        return Err(refuse(ErrorKind::LoopDetected));
    }
    if facts.malformed {
        return Err(refuse(ErrorKind::BadRequest));
    }
    if let Some(reason) = facts.ambiguous {
        tracing::debug!(path = facts.path, "ambiguous path refused: {reason}");
        return Err(refuse(ErrorKind::AmbiguousPath));
    }
    // Every inbound request is judged by the policy in force now (one reloaded since the
    // connection opened included), on every path.
    if conn.direction == Direction::Inbound
        && !shared.allows(
            conn.port,
            conn.peer_id.as_deref(),
            Some((facts.method, facts.path)),
        )
    {
        return Err(refuse(ErrorKind::PolicyDenied));
    }
    let route = match &shared.routes {
        Some(routes) => route_phases(routes, conn, facts).await?,
        None => None,
    };
    let in_flight = shared
        .limits
        .start_request()
        .ok_or_else(|| refuse(ErrorKind::Overloaded))?;
    Ok(Admitted { in_flight, route })
}

/// The route's admission phases: which route, its rate limit, its concurrency limit (waiting in
/// its queue when there is room in it).
async fn route_phases(
    routes: &RoutesInForce,
    conn: &ConnContext,
    facts: &Facts<'_>,
) -> Result<Option<Routed>, Refused> {
    let set = routes.current();
    let key = RequestKey {
        port: conn.port,
        authority: facts.authority,
        path: facts.path,
        method: facts.method,
        grpc: facts.grpc,
    };
    let Some(state) = set.find(conn.direction, &key) else {
        return Ok(None);
    };
    let state = state.clone();
    // The route's deadline counts from here: time in its queue is part of it.
    let matched_at = Instant::now();
    state.counters.requests.inc();
    let refuse = |kind| Refused {
        response: Synthetic::new(kind, facts.grpc).closing(!facts.reusable),
        route: Some(state.label.clone()),
    };
    if let Some(rate) = &state.rate
        && let Err(wait) = rate.check(&PeerKey::new(conn.peer_id.as_ref(), conn.client.ip()))
    {
        state.counters.rate_limited.inc();
        tracing::debug!(route = state.name(), "rate limited");
        let mut refused = refuse(ErrorKind::RateLimited);
        refused.response = refused.response.retry_after(wait.header_seconds());
        return Err(refused);
    }
    let permit = match &state.concurrency {
        Some(limiter) => {
            if state
                .route
                .concurrency
                .as_ref()
                .is_some_and(|spec| limiter.in_flight() >= spec.max)
            {
                state.counters.queued.inc();
            }
            match limiter.acquire().await {
                Ok(permit) => Some(permit),
                Err(rejected) => {
                    state.counters.concurrency_rejected.inc();
                    let wait = rejected.retry_after().header_seconds();
                    let mut refused = refuse(ErrorKind::ConcurrencyLimited);
                    refused.response = refused.response.retry_after(wait);
                    return Err(refused);
                }
            }
        }
        None => None,
    };
    let timeout = match (state.route.timeout, facts.grpc_timeout) {
        (Some(route), Some(grpc)) => Some(route.min(grpc)),
        (one, other) => one.or(other),
    };
    if state.route.retry.is_some() {
        set.budget.deposit();
    }
    Ok(Some(Routed {
        state,
        budget: set.budget.clone(),
        permit,
        deadline: timeout.map(|t| matched_at + t),
        attempts: 0,
    }))
}

/// The largest request body kept to send again (a route's retries): a longer one is sent once.
pub(crate) const REPLAY_BUFFER: usize = 64 * 1024;

/// A request on a route, from admission to the end of its response.
pub(crate) struct Routed {
    pub(crate) state: Arc<RouteState>,
    budget: Arc<RetryBudget>,
    /// The route's concurrency slot, held until the response ends.
    pub(crate) permit: Option<ConcurrencyPermit>,
    /// The whole exchange's end: the route's `timeout`, or the request's `grpc-timeout` if
    /// sooner.
    pub(crate) deadline: Option<Instant>,
    /// Attempts started so far.
    pub(crate) attempts: u32,
}

/// Why an attempt did not give the response to forward, as a route's `retry.on` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttemptFailure {
    /// No connection could be made: the app never saw the request.
    Connect,
    /// The connection failed before a response head; how far the request got.
    Reset(Sent),
    /// The attempt's own bound (`perTryTimeout`) ran out.
    PerTryTimeout,
    /// A response the route retries on (its status, or its head's gRPC status).
    Response,
}

impl Routed {
    pub(crate) fn name(&self) -> &str {
        self.state.name()
    }

    /// Whether the route retries at all: its requests' bodies are then kept to be sent again.
    pub(crate) fn retries(&self) -> bool {
        self.state.route.retry.is_some()
    }

    /// Starts an attempt: the endpoint it goes to (`None`: the request's own destination,
    /// `original`), and its bound (the route's deadline, or sooner the per-try timeout).
    pub(crate) fn start_attempt(
        &mut self,
        original: SocketAddr,
    ) -> Result<(SocketAddr, Option<Pick>, Option<Instant>), ErrorKind> {
        self.attempts += 1;
        let per_try = (self.state.route.retry.as_ref())
            .and_then(|retry| retry.per_try_timeout)
            .map(|t| Instant::now() + t);
        let bound = match (per_try, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match &self.state.endpoints {
            None => Ok((original, None, bound)),
            Some(endpoints) => match endpoints.pick(original) {
                Some((addr, pick)) => Ok((addr, Some(pick), bound)),
                None => Err(ErrorKind::NoEndpoints),
            },
        }
    }

    /// Whether this response head is one the route retries on (`retry.on`: its status, or the
    /// gRPC status of a trailers-only response).
    pub(crate) fn retries_response(&self, status: u16, grpc_status: Option<u16>) -> bool {
        self.state.route.retry.as_ref().is_some_and(|retry| {
            retry.on.on_status(status)
                || grpc_status.is_some_and(|code| retry.on.on_grpc(u32::from(code)))
        })
    }

    /// Ends an attempt at an endpoint: the balancer learns its latency and whether it failed
    /// (connect failures, resets, 5xx, gRPC UNAVAILABLE count, as for outlier ejection).
    pub(crate) fn finish_attempt(&self, pick: Option<Pick>, failed: bool) {
        let Some(pick) = pick else {
            return;
        };
        let latency = pick.picked_at.elapsed();
        // Counted under the balancer's address (a DNS name without a port: the address alone,
        // port 0), as its latency and ejections are.
        let endpoint = pick.addr;
        pick.finish(if failed {
            Outcome::Failure { latency }
        } else {
            Outcome::Success { latency }
        });
        self.state.count_attempt(endpoint, failed);
    }

    /// After an attempt failed: the wait before the next one, or `None` when there is none. A
    /// request is sent again only when the route's `retry.on` names the failure, the request is
    /// idempotent or provably never reached the app (RFC 9110 9.2.2: gRPC calls are POSTs, so
    /// they go again only then), its body is still in hand (`replayable`), attempts remain, the
    /// retry budget allows it and the backoff ends before the route's deadline.
    pub(crate) fn next_attempt(
        &self,
        method: &Method,
        replayable: bool,
        failure: AttemptFailure,
    ) -> Option<Duration> {
        let retry = self.state.route.retry.as_ref()?;
        if self.attempts > retry.attempts {
            return None;
        }
        let named = match failure {
            AttemptFailure::Connect => retry.on.connect_failure,
            AttemptFailure::Reset(_) => retry.on.reset,
            // A per-try timeout is the gateway timeout Envoy's `5xx` and `reset` cover.
            AttemptFailure::PerTryTimeout => retry.on.reset || retry.on.on_status(504),
            AttemptFailure::Response => true,
        };
        let never_received = matches!(
            failure,
            AttemptFailure::Connect | AttemptFailure::Reset(Sent::Nothing)
        );
        if !named || !replayable || !(never_received || method.is_idempotent()) {
            return None;
        }
        let backoff = RetryBackoff::delay(retry.backoff, self.attempts.saturating_sub(1));
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() + backoff >= deadline)
        {
            return None;
        }
        if !self.budget.try_withdraw() {
            self.state.counters.budget_exhausted.inc();
            tracing::debug!(route = self.name(), "retry budget spent: no retry");
            return None;
        }
        self.state.counters.retries.inc();
        Some(backoff)
    }

    /// The response body, bounded by the route's deadline and holding its concurrency slot
    /// until it ends.
    pub(crate) fn hold(routed: Option<Routed>, body: ResponseBody) -> ResponseBody {
        match routed {
            Some(r) => body.routed(r.deadline, r.permit, r.state.counters.timeouts.clone()),
            None => body,
        }
    }

    /// Counts a request cut by the route's deadline.
    pub(crate) fn timed_out(&self) {
        self.state.counters.timeouts.inc();
    }
}

/// How far an attempt got when its connection to the app failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Not a byte of the request was written.
    Nothing,
    /// Written (maybe partly), and not a byte of response came back.
    NoResponse,
    /// Some of the response arrived, or the request's body was streamed (it is gone).
    ResponseStarted,
}

/// One failed attempt, as the retry rule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Attempt {
    /// The connection had carried a request before: the app may have closed it while it sat
    /// idle (the keep-alive race). A freshly dialled connection that fails is the app's answer.
    pub(crate) reused: bool,
    pub(crate) sent: Sent,
}

/// The retry rule (RFC 9110 9.2.2, RFC 9112 9.3.1.1; Pingora's `ReusedOnly`): a request goes
/// again, once, on a freshly dialled connection, only when the failed attempt was on a reused
/// connection (the keep-alive race: the app closed it while it sat idle) and no byte of a
/// response arrived; and then only when not a byte of it was written, or when it is idempotent
/// and has no body (a body streams to the app as it arrives: once written it is no longer in
/// hand). A request that reached the app on a fresh connection, or a POST, is never sent twice.
pub(crate) fn may_retry(method: &Method, has_body: bool, attempt: Attempt) -> bool {
    if !attempt.reused {
        return false;
    }
    match attempt.sent {
        Sent::Nothing => true,
        Sent::NoResponse => !has_body && method.is_idempotent(),
        Sent::ResponseStarted => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::upstream::{ClientFactory, ConnectOptions};
    use crate::routes::Routes;
    use crate::telemetry::Telemetry;
    use crate::vocab::AccessLogFormat;

    /// The request on the first outbound route of `yaml`, admitted as the driver admits it.
    fn routed(yaml: &str) -> Routed {
        let telemetry = Arc::new(Telemetry::new(
            AccessLogFormat::Off,
            Box::new(std::io::sink()),
            None,
            None,
        ));
        let routes = Routes::from_yaml(yaml).expect("a valid routes file");
        let connect = ConnectOptions {
            timeout: Duration::from_secs(1),
            mark: None,
        };
        let clients = ClientFactory::new(connect, Duration::from_secs(1), true, None);
        let set =
            super::super::routing::RouteSet::build(routes, None, &|| None, &telemetry, &clients);
        let key = RequestKey {
            port: 80,
            authority: Some("svc"),
            path: "/",
            method: &Method::GET,
            grpc: false,
        };
        let state = set
            .find(Direction::Outbound, &key)
            .expect("a route")
            .clone();
        set.budget.deposit();
        Routed {
            state,
            budget: set.budget.clone(),
            permit: None,
            deadline: None,
            attempts: 1,
        }
    }

    #[test]
    fn a_route_retries_only_what_is_safe_and_named() {
        let route = routed(
            "outbound:\n  - retry: {on: [connect-failure, reset, \"503\"], attempts: 2, backoff: 1ms}\n",
        );
        let again = |method: &Method, replayable, failure| {
            route.next_attempt(method, replayable, failure).is_some()
        };
        // Named and idempotent.
        assert!(again(&Method::GET, true, AttemptFailure::Response));
        assert!(again(
            &Method::GET,
            true,
            AttemptFailure::Reset(Sent::NoResponse)
        ));
        // A POST the app may have seen: never; one it provably never got: yes.
        assert!(!again(&Method::POST, true, AttemptFailure::Response));
        assert!(!again(
            &Method::POST,
            true,
            AttemptFailure::Reset(Sent::NoResponse)
        ));
        assert!(!again(
            &Method::POST,
            true,
            AttemptFailure::Reset(Sent::ResponseStarted)
        ));
        assert!(again(&Method::POST, true, AttemptFailure::Connect));
        assert!(again(
            &Method::POST,
            true,
            AttemptFailure::Reset(Sent::Nothing)
        ));
        // A body no longer in hand: never.
        assert!(!again(&Method::PUT, false, AttemptFailure::Connect));
        // Not named (`reset` without 504 covers a per-try timeout; this route has reset).
        assert!(again(&Method::GET, true, AttemptFailure::PerTryTimeout));
        let unnamed = routed("outbound:\n  - retry: {on: [\"503\"], attempts: 2}\n");
        assert!(
            unnamed
                .next_attempt(&Method::GET, true, AttemptFailure::Connect)
                .is_none()
        );
        assert!(
            unnamed
                .next_attempt(&Method::GET, true, AttemptFailure::PerTryTimeout)
                .is_none()
        );
        assert!(unnamed.retries_response(503, None));
        assert!(!unnamed.retries_response(500, None));
        // No retry spec: never.
        let none = routed("outbound:\n  - timeout: 1s\n");
        assert!(
            none.next_attempt(&Method::GET, true, AttemptFailure::Connect)
                .is_none()
        );
    }

    #[test]
    fn a_route_stops_after_its_attempts_and_when_the_budget_is_spent() {
        let mut route = routed(
            "retryBudget: {ratio: 0.0, minPerSecond: 1}\noutbound:\n  - retry: {on: [connect-failure], attempts: 3}\n",
        );
        // `attempts: 3` retries; the budget's floor is 10 (1 a second over its 10 s window).
        for attempt in 1..=3 {
            route.attempts = attempt;
            assert!(
                route
                    .next_attempt(&Method::GET, true, AttemptFailure::Connect)
                    .is_some()
            );
        }
        route.attempts = 4;
        assert!(
            route
                .next_attempt(&Method::GET, true, AttemptFailure::Connect)
                .is_none()
        );
        route.attempts = 1;
        let mut granted = 0;
        while route
            .next_attempt(&Method::GET, true, AttemptFailure::Connect)
            .is_some()
        {
            granted += 1;
            assert!(granted < 100, "the budget never ran out");
        }
        assert_eq!(route.state.counters.budget_exhausted.get(), 1);
        assert_eq!(route.state.counters.retries.get(), 3 + granted);
    }

    #[test]
    fn no_retry_outlives_the_deadline() {
        let mut route =
            routed("outbound:\n  - retry: {on: [connect-failure], attempts: 2, backoff: 1m}\n");
        route.deadline = Some(Instant::now() + Duration::from_secs(1));
        // The backoff is jittered between 0 and 1 minute: mostly past the deadline. Never once
        // is a wait granted that ends after it.
        for _ in 0..200 {
            if let Some(wait) = route.next_attempt(&Method::GET, true, AttemptFailure::Connect) {
                assert!(wait < Duration::from_secs(1), "{wait:?}");
            }
        }
    }

    #[test]
    fn retry_rule() {
        use Sent::*;
        let reused = |sent| Attempt { reused: true, sent };
        let fresh = |sent| Attempt {
            reused: false,
            sent,
        };
        assert!(may_retry(&Method::POST, false, reused(Nothing)));
        assert!(!may_retry(&Method::POST, false, reused(NoResponse)));
        assert!(may_retry(&Method::GET, false, reused(NoResponse)));
        assert!(may_retry(&Method::PUT, false, reused(NoResponse)));
        assert!(!may_retry(&Method::PUT, true, reused(NoResponse)));
        assert!(may_retry(&Method::PUT, true, reused(Nothing)));
        assert!(!may_retry(&Method::GET, false, reused(ResponseStarted)));
        assert!(!may_retry(&Method::GET, false, fresh(NoResponse)));
        assert!(!may_retry(&Method::GET, false, fresh(Nothing)));
    }
}
