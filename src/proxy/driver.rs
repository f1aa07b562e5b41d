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
//!    then its concurrency limit, which may queue the request (503; 504 when the route's deadline
//!    passes first, in the queue or before);
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
    /// A plain `CONNECT` (HTTP/1.1's, or HTTP/2's without `:protocol`): refused, 501.
    pub(crate) plain_connect: bool,
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
    // Forwarded, its target became the app's own address and the 2xx opened nothing: the
    // client saw a 200, then the end. A forward proxy behind the sidecar is reached on an opaque port.
    if facts.plain_connect {
        return Err(refuse(ErrorKind::ConnectUnsupported));
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
    let timeout = match (state.route.timeout, facts.grpc_timeout) {
        (Some(route), Some(grpc)) => Some(route.min(grpc)),
        (one, other) => one.or(other),
    };
    let deadline = timeout.map(|t| matched_at + t);
    let timed_out = || {
        state.counters.timeouts.inc();
        refuse(ErrorKind::RouteTimeout)
    };
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
            // The deadline bounds the wait in the queue too (the timeout bounds the whole
            // exchange, queueing included): waited out to `queueTimeout` alone, a request was
            // sent to the app past its deadline, to be cut at once.
            let acquired = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, limiter.acquire()).await,
                None => Ok(limiter.acquire().await),
            };
            match acquired {
                Ok(Ok(permit)) => Some(permit),
                Ok(Err(rejected)) => {
                    state.counters.concurrency_rejected.inc();
                    let wait = rejected.retry_after().header_seconds();
                    let mut refused = refuse(ErrorKind::ConcurrencyLimited);
                    refused.response = refused.response.retry_after(wait);
                    return Err(refused);
                }
                Err(_) => return Err(timed_out()),
            }
        }
        None => None,
    };
    // Already past its deadline (a `grpc-timeout` of 0, a slot given at the last moment): the
    // app is not sent a request that is cut before it can answer.
    if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
        return Err(timed_out());
    }
    if state.route.retry.is_some() {
        set.budget.deposit();
    }
    Ok(Some(Routed {
        state,
        budget: set.budget.clone(),
        permit,
        deadline,
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

    /// Ends an attempt that failed with `kind` (no response head), as [`marks_endpoint`] says:
    /// the client's own failures leave the balancer unmarked (the pick dropped).
    pub(crate) fn finish_failed_attempt(&self, pick: Option<Pick>, kind: ErrorKind) {
        match marks_endpoint(kind) {
            Some(failed) => self.finish_attempt(pick, failed),
            None => drop(pick),
        }
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
        // The retry about to be made is number `attempts` (one attempt done: the first retry);
        // `attempts - 1` made the ceiling double one retry late (docs/routes.md).
        let backoff = RetryBackoff::delay(retry.backoff, self.attempts);
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

/// gRPC's UNAVAILABLE: an attempt that failed, for the balancer.
const UNAVAILABLE: u16 = 14;

/// Whether a response head is its endpoint's failure, for the balancer: a 5xx, or gRPC
/// UNAVAILABLE in the head (a trailers-only response; gRPC-Web's come over HTTP/1.1 too).
pub(crate) fn response_failed(status: u16, grpc_status: Option<u16>) -> bool {
    status >= 500 || grpc_status == Some(UNAVAILABLE)
}

/// What an attempt that failed with `kind` says of its endpoint, on every path: `Some(failed)`,
/// or `None` for neither. The client's own failures are neither (docs/routes.md: "a request the
/// client cancelled counts as neither"): its body broke off, stalled or was malformed (hyper's
/// path calls that `ClientBody` too; the fast path answers it 400), or it left. Counted as
/// failures, one client could eject healthy endpoints for every other caller in the pod. A peer's
/// policy refusal says nothing of the endpoint's health: no failure.
pub(crate) fn marks_endpoint(kind: ErrorKind) -> Option<bool> {
    match kind {
        ErrorKind::ClientBody
        | ErrorKind::RequestTimeout
        | ErrorKind::BadRequest
        | ErrorKind::ClientDisconnected => None,
        ErrorKind::PolicyDenied => Some(false),
        _ => Some(true),
    }
}

/// What an attempt that ran out of time says of its endpoint: nothing while the client was still
/// sending the request's body (its own slowness: counted as a stalled body is, see
/// [`marks_endpoint`]), else what `kind` says. A client trickling its body past a route's
/// deadline could otherwise eject healthy endpoints.
pub(crate) fn timed_out_blame(kind: ErrorKind, body_whole: bool) -> ErrorKind {
    if body_whole {
        kind
    } else {
        ErrorKind::RequestTimeout
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
            write_stall: Duration::from_secs(1),
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
    fn the_backoff_ceiling_doubles_from_the_second_retry() {
        let mut route = routed(
            "retryBudget: {ratio: 0.0, minPerSecond: 1000000}\noutbound:\n  - retry: {on: [connect-failure], attempts: 10, backoff: 100ms}\n",
        );
        let waits = |route: &Routed| -> Vec<Duration> {
            fastrand::seed(19);
            (0..200)
                .map(|_| {
                    route
                        .next_attempt(&Method::GET, true, AttemptFailure::Connect)
                        .expect("a retry")
                })
                .collect()
        };
        let base = Duration::from_millis(100);
        // One attempt done: the first retry waits up to `backoff`.
        route.attempts = 1;
        assert!(waits(&route).iter().all(|w| *w <= base));
        // Two done: the second retry up to twice that (docs/routes.md: `backoff * 2^(n - 1)`
        // before retry n), uniformly: of 200 draws, some are past `backoff`.
        route.attempts = 2;
        let second = waits(&route);
        assert!(second.iter().all(|w| *w <= 2 * base));
        assert!(
            second.iter().any(|w| *w > base),
            "the second retry's ceiling is still `backoff`: {:?}",
            second.iter().max()
        );
    }

    /// The proxy's state with the outbound routes of `yaml` (and `run`'s flags `extra`).
    fn shared_with_routes(yaml: &str, extra: &[&str]) -> Arc<Shared> {
        use clap::{Args, FromArgMatches};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let routes = dir.path().join("routes.yaml");
        std::fs::write(&routes, yaml).expect("the routes file");
        let mut flags = vec![
            "run",
            "--proxy-mark",
            "0",
            "--access-log",
            "off",
            "--routes",
        ];
        flags.push(routes.to_str().expect("a UTF-8 path"));
        flags.extend_from_slice(extra);
        let matches =
            crate::config::RunArgs::augment_args(clap::Command::new("run")).get_matches_from(flags);
        let args = crate::config::RunArgs::from_arg_matches(&matches).expect("flags");
        Shared::new(&args.proxy_config(), Box::new(std::io::sink()))
    }

    /// The hyper path with the outbound routes of `yaml` (and `run`'s flags `extra`), serving
    /// HTTP/2 on loopback as the listener would for connections redirected to `app` (outbound
    /// connections cannot be redirected in a unit test); returns the address to connect to.
    async fn outbound_hyper_path(
        app: SocketAddr,
        yaml: &str,
        extra: &[&str],
    ) -> (SocketAddr, Arc<Shared>) {
        let shared = shared_with_routes(yaml, extra);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let served = shared.clone();
        tokio::spawn(async move {
            let shared = served;
            while let Ok((stream, client)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let ctx = Arc::new(ConnContext::new(
                        shared.telemetry.clone(),
                        Direction::Outbound,
                        client,
                        app,
                        app,
                        false,
                    ));
                    let metrics = shared.telemetry.metrics.direction(Direction::Outbound);
                    let guard = shared.limits.track(&metrics.open_connections);
                    let open = crate::proxy::limits::OpenRequests::new(guard.slot().clone());
                    let service = hyper::service::service_fn(move |req| {
                        let (shared, ctx) = (shared.clone(), ctx.clone());
                        crate::proxy::hyper_path::handle(shared, ctx, req, open.start())
                    });
                    let builder = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let served = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                    drop((served, guard));
                });
            }
        });
        (addr, shared)
    }

    /// An HTTP/2 app on loopback whose every request is answered by `answer`.
    async fn h2_app<F, Fut, B>(answer: F) -> SocketAddr
    where
        F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Copy + Send + Sync + 'static,
        Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| async move {
                        Ok::<_, std::convert::Infallible>(answer(req).await)
                    });
                    let builder = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// An HTTP/2 app that answers at once with the request's own body, streamed back.
    async fn echo_app() -> SocketAddr {
        h2_app(|req| async move { http::Response::new(req.into_body()) }).await
    }

    /// A route that retries keeps a copy of the request's body; once an attempt's response is
    /// the one forwarded, that body must go on streaming to the app (a bidi or client-streaming
    /// gRPC call: the app answers before the client has sent everything). Sealing the copy on
    /// every response cut the stream, request and response both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retrying_route_lets_the_request_body_stream_past_the_response_head() {
        use http_body_util::BodyExt;
        const WAIT: Duration = Duration::from_secs(10);
        let routes =
            "outbound:\n  - name: streamed\n    retry: {on: [\"503\", reset], attempts: 2}\n";
        let app = echo_app().await;
        let (proxy, _shared) = outbound_hyper_path(app, routes, &[]).await;

        let mut sender = h2_sender(proxy).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)),
                rx,
            ))
        });
        let request = http::Request::put("http://svc.test/stream")
            .body(http_body_util::StreamBody::new(Box::pin(chunks)))
            .expect("a request");
        tx.send(bytes::Bytes::from_static(b"hello"))
            .await
            .expect("the first chunk");
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("bounded: the response head")
            .expect("a response");
        assert_eq!(response.status(), 200);
        // The app has answered; the rest of the body follows.
        tx.send(bytes::Bytes::from_static(b" world"))
            .await
            .expect("the second chunk");
        drop(tx);
        let body = tokio::time::timeout(WAIT, response.into_body().collect())
            .await
            .expect("bounded: the response body")
            .map(|collected| collected.to_bytes());
        assert_eq!(
            body.as_deref().ok(),
            Some(&b"hello world"[..]),
            "the echo of the whole body: {body:?}"
        );
    }

    /// An HTTP/2 app that reads each request's body whole, then answers.
    async fn reading_app() -> SocketAddr {
        use http_body_util::BodyExt;
        h2_app(|req| async move {
            let read = req.into_body().collect().await.is_ok();
            let answer: &'static [u8] = if read { b"read" } else { b"broken" };
            http::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(answer)))
        })
        .await
    }

    /// docs/routes.md: an endpoint's failures are connect failures, resets, 5xx and gRPC
    /// UNAVAILABLE, "a request the client cancelled counts as neither". A client whose own body
    /// stalls (408) is no mark against the endpoint: counted as a failure, a client that starts
    /// uploads and stops could eject healthy endpoints for every other caller in the pod.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_whose_body_stalls_is_no_failure_of_the_endpoint() {
        const WAIT: Duration = Duration::from_secs(10);
        let endpoints = [reading_app().await, reading_app().await];
        let routes = balanced_route(&endpoints);
        let timeout = ["--request-body-timeout", "200ms"];
        let (proxy, shared) = outbound_hyper_path(endpoints[0], &routes, &timeout).await;
        let mut sender = h2_sender(proxy).await;
        // A body that begins and then stops: the sender is kept, never used again.
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
        tx.send(bytes::Bytes::from_static(b"hel"))
            .await
            .expect("the first chunk");
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk)),
                rx,
            ))
        });
        let request = http::Request::put("http://svc.test/upload")
            .body(http_body_util::StreamBody::new(Box::pin(chunks)))
            .expect("a request");
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("bounded: the response head")
            .expect("a response");
        assert_eq!(response.status(), 408, "the client's body stalled");
        drop(tx);
        assert_eq!(
            endpoint_failures(&shared, &endpoints),
            0,
            "the client's stalled body was counted against the endpoint"
        );
    }

    /// A client still sending its body when the route's deadline comes is slow itself, not the
    /// endpoint: it keeps every read within --request-body-timeout and trickles past the
    /// deadline. Counted as a failure, such clients could eject healthy endpoints.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_trickling_its_body_past_the_deadline_is_no_failure_of_the_endpoint() {
        const WAIT: Duration = Duration::from_secs(10);
        let endpoints = [reading_app().await, reading_app().await];
        let routes =
            balanced_route(&endpoints).replace("    balance:", "    timeout: 300ms\n    balance:");
        let (proxy, shared) = outbound_hyper_path(endpoints[0], &routes, &[]).await;
        let mut sender = h2_sender(proxy).await;
        // A byte every 50 ms, for as long as the proxy reads them (bounded by the test's WAIT).
        let chunks = futures_util::stream::unfold(0u32, |n| async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            (n < 200).then(|| {
                (
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                        bytes::Bytes::from_static(b"x"),
                    )),
                    n + 1,
                )
            })
        });
        let request = http::Request::put("http://svc.test/upload")
            .body(http_body_util::StreamBody::new(Box::pin(chunks)))
            .expect("a request");
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("bounded: the response head")
            .expect("a response");
        assert_eq!(response.status(), 504, "the route's deadline came");
        assert_eq!(
            endpoint_failures(&shared, &endpoints),
            0,
            "the client's trickled body was counted against the endpoint"
        );
    }

    /// The same on the fast path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_the_fast_path_a_client_trickling_its_body_past_the_deadline_is_no_failure_of_the_endpoint()
     {
        use tokio::io::AsyncWriteExt;
        const WAIT: Duration = Duration::from_secs(10);
        let endpoints = [http1_app(b"").await.0, http1_app(b"").await.0];
        let routes =
            balanced_route(&endpoints).replace("    balance:", "    timeout: 300ms\n    balance:");
        let (proxy, shared, _ended) = outbound_fast_path(endpoints[0], &routes, &[]).await;
        let client = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        let (mut reader, mut writer) = client.into_split();
        let trickling = tokio::spawn(async move {
            let head = b"PUT /upload HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 200\r\n\r\n";
            if writer.write_all(head).await.is_err() {
                return;
            }
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if writer.write_all(b"x").await.is_err() {
                    return;
                }
            }
        });
        let status = tokio::time::timeout(WAIT, read_status(&mut reader))
            .await
            .expect("bounded: the response head");
        trickling.abort();
        assert_eq!(status, 504, "the route's deadline came");
        assert_eq!(
            endpoint_failures(&shared, &endpoints),
            0,
            "the client's trickled body was counted against the endpoint"
        );
    }

    /// An HTTP/2 connection to `proxy`, driven on a task of its own.
    async fn h2_sender<B>(proxy: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("an HTTP/2 connection");
        tokio::spawn(conn);
        sender
    }

    /// Sends `request` to `proxy` on a connection of its own: the response's status, within 10 s.
    async fn status_of(proxy: SocketAddr, request: &[u8]) -> u16 {
        use tokio::io::AsyncWriteExt;
        let mut client = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        client.write_all(request).await.expect("the request");
        tokio::time::timeout(Duration::from_secs(10), read_status(&mut client))
            .await
            .expect("bounded: the response head")
    }

    /// The failures counted against `endpoints` of the route `balanced`.
    fn endpoint_failures(shared: &Shared, endpoints: &[SocketAddr]) -> u64 {
        use crate::telemetry::metrics::EndpointLabels;
        let family = &shared.telemetry.metrics.routes.endpoint_failures;
        endpoints
            .iter()
            .map(|endpoint| {
                let labels = EndpointLabels {
                    route: "balanced".into(),
                    endpoint: endpoint.to_string(),
                };
                family.get_or_create(&labels).get()
            })
            .sum()
    }

    /// A route balancing over `endpoints`, an endpoint ejected at its first failure.
    fn balanced_route(endpoints: &[SocketAddr]) -> String {
        format!(
            "outbound:\n  - name: balanced\n    endpoints: {{static: [\"{}\", \"{}\"]}}\n    balance: round-robin\n    outlier: {{consecutiveFailures: 1, ejectFor: 1h, maxEjectedPercent: 50}}\n",
            endpoints[0], endpoints[1]
        )
    }

    /// The HTTP/1.1 fast path with the outbound routes of `yaml` (and `run`'s flags `extra`),
    /// serving loopback connections as the listener would those redirected to `app`; returns the
    /// address to connect to, and a channel told each time a connection's serving ends.
    async fn outbound_fast_path(
        app: SocketAddr,
        yaml: &str,
        extra: &[&str],
    ) -> (
        SocketAddr,
        Arc<Shared>,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ) {
        let shared = shared_with_routes(yaml, extra);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (done, ended) = tokio::sync::mpsc::unbounded_channel();
        let served = shared.clone();
        tokio::spawn(async move {
            let shared = served;
            while let Ok((stream, client)) = listener.accept().await {
                let (shared, done) = (shared.clone(), done.clone());
                tokio::spawn(async move {
                    let ctx = Arc::new(ConnContext::new(
                        shared.telemetry.clone(),
                        Direction::Outbound,
                        client,
                        app,
                        app,
                        false,
                    ));
                    let metrics = shared.telemetry.metrics.direction(Direction::Outbound);
                    let guard = shared.limits.track(&metrics.open_connections);
                    let slot = guard.slot().clone();
                    let mut connection = crate::proxy::http1::Connection::new(
                        shared.clone(),
                        ctx,
                        stream,
                        slot,
                        bytes::BytesMut::new(),
                        None,
                    );
                    let outcome = connection.serve().await;
                    assert!(
                        matches!(outcome, crate::proxy::http1::Outcome::Done),
                        "served by the fast path"
                    );
                    drop((connection, guard));
                    let _ = done.send(());
                });
            }
        });
        (addr, shared, ended)
    }

    /// An HTTP/1.1 app that reads each request's head, tells `heads`, writes `answer` (if any),
    /// then reads on until the proxy closes the connection.
    async fn http1_app(
        answer: &'static [u8],
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (tell, heads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tell = tell.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    let mut chunk = [0; 1024];
                    while !read.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => read.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = tell.send(());
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                    while matches!(stream.read(&mut chunk).await, Ok(n) if n > 0) {}
                });
            }
        });
        (addr, heads)
    }

    /// The status of the response head `client` reads.
    async fn read_status(client: &mut (impl tokio::io::AsyncRead + Unpin)) -> u16 {
        use tokio::io::AsyncReadExt;
        let mut read = Vec::new();
        let mut chunk = [0; 1024];
        while !read.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = client.read(&mut chunk).await.expect("the response");
            assert!(n > 0, "the proxy closed without a response head: {read:?}");
            read.extend_from_slice(&chunk[..n]);
        }
        let line = String::from_utf8_lossy(&read);
        line.get(9..12)
            .and_then(|status| status.parse().ok())
            .unwrap_or_else(|| panic!("a status line: {line}"))
    }

    /// As [`a_client_whose_body_stalls_is_no_failure_of_the_endpoint`], on the HTTP/1.1 fast
    /// path: it counted the client's stalled body (408) against the endpoint.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_the_fast_path_a_client_whose_body_stalls_is_no_failure_of_the_endpoint() {
        let endpoints = [http1_app(b"").await.0, http1_app(b"").await.0];
        let timeout = ["--request-body-timeout", "200ms"];
        let (proxy, shared, _ended) =
            outbound_fast_path(endpoints[0], &balanced_route(&endpoints), &timeout).await;
        // A body that begins and then stops: 3 bytes of 10.
        let status = status_of(
            proxy,
            b"PUT /upload HTTP/1.1\r\nHost: svc.test\r\nContent-Length: 10\r\n\r\nhel",
        )
        .await;
        assert_eq!(status, 408, "the client's body stalled");
        assert_eq!(
            endpoint_failures(&shared, &endpoints),
            0,
            "the client's stalled body was counted against the endpoint"
        );
    }

    /// docs/routes.md: "a request the client cancelled counts as neither". On the fast path a
    /// client that left while the app was still to answer was counted against the endpoint, so
    /// clients that hang up could eject healthy endpoints.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_the_fast_path_a_client_that_leaves_is_no_failure_of_the_endpoint() {
        use tokio::io::AsyncWriteExt;
        const WAIT: Duration = Duration::from_secs(10);
        // Apps that never answer.
        let (first, mut heads) = http1_app(b"").await;
        let (second, mut other_heads) = http1_app(b"").await;
        let endpoints = [first, second];
        let (proxy, shared, mut ended) =
            outbound_fast_path(endpoints[0], &balanced_route(&endpoints), &[]).await;
        let mut client = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        client
            .write_all(b"GET /slow HTTP/1.1\r\nHost: svc.test\r\n\r\n")
            .await
            .expect("the request");
        // The request reached an endpoint; then its client leaves.
        tokio::time::timeout(WAIT, async {
            tokio::select! {
                _ = heads.recv() => {}
                _ = other_heads.recv() => {}
            }
        })
        .await
        .expect("bounded: the request reaches the app");
        drop(client);
        tokio::time::timeout(WAIT, ended.recv())
            .await
            .expect("bounded: the proxy notices the client gone");
        assert_eq!(
            endpoint_failures(&shared, &endpoints),
            0,
            "the client's leaving was counted against the endpoint"
        );
    }

    /// A gRPC status UNAVAILABLE in a response head (a trailers-only response; gRPC-Web comes
    /// over HTTP/1.1) is an endpoint's failure on the fast path as on hyper's: it was ignored
    /// there, so such an endpoint was never ejected.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_the_fast_path_grpc_unavailable_in_the_head_is_a_failure_of_the_endpoint() {
        const UNAVAILABLE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc-web+proto\r\ngrpc-status: 14\r\ncontent-length: 0\r\n\r\n";
        let endpoints = [
            http1_app(UNAVAILABLE).await.0,
            http1_app(UNAVAILABLE).await.0,
        ];
        let (proxy, shared, _ended) =
            outbound_fast_path(endpoints[0], &balanced_route(&endpoints), &[]).await;
        let status = status_of(proxy, b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: svc.test\r\nContent-Type: application/grpc-web+proto\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status, 200, "a trailers-only response");
        assert_eq!(
            endpoint_failures(&shared, &endpoints),
            1,
            "gRPC UNAVAILABLE in the head was not counted against the endpoint"
        );
    }

    /// The one rule both paths account attempts by.
    #[test]
    fn what_marks_an_endpoint() {
        use ErrorKind::*;
        for kind in [ClientBody, RequestTimeout, BadRequest, ClientDisconnected] {
            assert_eq!(marks_endpoint(kind), None, "{kind:?} is the client's");
        }
        assert_eq!(marks_endpoint(PolicyDenied), Some(false));
        for kind in [ConnectRefused, UpstreamReset, ResponseTimeout, RouteTimeout] {
            assert_eq!(marks_endpoint(kind), Some(true), "{kind:?}");
        }
        assert!(response_failed(500, None));
        assert!(response_failed(200, Some(14)));
        assert!(!response_failed(200, Some(0)));
        assert!(!response_failed(404, Some(5)));
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
