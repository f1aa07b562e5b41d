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
//! 5. capacity: a slot of `--max-in-flight` (503).
//!
//! The retry rule ([`may_retry`]) is the driver's too: one rule from typed facts of the attempt.

use http::Method;

use super::exchange::ConnContext;
use super::limits::InFlight;
use super::path::Ambiguous;
use super::phases::Synthetic;
use super::shared::Shared;
use crate::error::ErrorKind;
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
}

/// Decides whether a request goes to the app. `Ok`: forward it, holding the in-flight slot until
/// its response ends. `Err`: answer with this response (its close flag says whether the
/// connection ends with it).
pub(crate) fn admit(
    shared: &Shared,
    conn: &ConnContext,
    facts: &Facts<'_>,
) -> Result<InFlight, Synthetic> {
    let refuse = |kind| Synthetic::new(kind, facts.grpc).closing(!facts.reusable);
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
    shared
        .limits
        .start_request()
        .ok_or_else(|| refuse(ErrorKind::Overloaded))
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
