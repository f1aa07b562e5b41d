//! What a route applies to the requests it matches, as validated values (the bounds and defaults
//! are [`super::parse`]'s; docs/routes.md lists them). Plain data: the data plane reads it.

use std::net::SocketAddr;
use std::time::Duration;

/// Retries of an outbound request (`retry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetrySpec {
    /// What makes an attempt worth retrying.
    pub on: RetryOn,
    /// Retries after the first attempt (Istio's meaning): `attempts: 2` is at most 3 attempts.
    pub attempts: u32,
    /// Each attempt's own bound; the route's `timeout` still bounds them all.
    pub per_try_timeout: Option<Duration>,
    /// The base wait before a retry (jittered by the data plane).
    pub backoff: Duration,
}

/// The conditions `retry.on` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// `connect-failure`: the connection to the upstream could not be made (refused, timed out).
    pub connect_failure: bool,
    /// `reset`: the upstream closed or reset the connection before a response head.
    pub reset: bool,
    /// Response statuses, one bit each (`"503"`, `5xx`).
    statuses: [u64; STATUS_WORDS],
    /// gRPC status codes, one bit each (`unavailable`...).
    grpc: u32,
}

/// Enough 64-bit words for a bit per status code 0-639.
const STATUS_WORDS: usize = 10;

/// The gRPC codes `retry.on` accepts, by the names it accepts (Envoy's `retry_on` for gRPC).
pub(super) const GRPC_CODES: [(&str, u32); 5] = [
    ("cancelled", 1),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("internal", 13),
    ("unavailable", 14),
];

impl RetryOn {
    /// Whether a response with this HTTP status is retried.
    pub fn on_status(&self, status: u16) -> bool {
        let status = usize::from(status);
        self.statuses
            .get(status / 64)
            .is_some_and(|word| word & (1 << (status % 64)) != 0)
    }

    /// Whether a response with this gRPC status code (`grpc-status`) is retried.
    pub fn on_grpc(&self, code: u32) -> bool {
        code < 32 && self.grpc & (1 << code) != 0
    }

    /// Retries responses with this status (a status the words do not cover is ignored: the file
    /// accepts 400-599 only).
    pub fn add_status(&mut self, status: u16) {
        let status = usize::from(status);
        if let Some(word) = self.statuses.get_mut(status / 64) {
            *word |= 1 << (status % 64);
        }
    }

    /// Retries responses with this gRPC status code (0-31).
    pub fn add_grpc(&mut self, code: u32) {
        if code < 32 {
            self.grpc |= 1 << code;
        }
    }
}

/// A token bucket per route (`rateLimit`), and one per peer within it.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimitSpec {
    /// The rate the bucket refills at, for all peers together.
    pub requests_per_second: f64,
    /// The bucket's size: how many requests may come at once after a quiet spell.
    pub burst: u32,
    /// Each peer's own rate, at most `requests_per_second`.
    pub per_peer: Option<f64>,
}

/// Requests in flight per route (`concurrency`), with a bounded queue before refusing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcurrencySpec {
    pub max: u32,
    /// How many requests may wait for a slot; 0: refused at once.
    pub queue: u32,
    /// How long a request may wait in the queue.
    pub queue_timeout: Duration,
}

/// Where an outbound route's requests go instead of the connection's original destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndpointsSpec {
    /// The addresses a DNS name resolves to (a headless Service's).
    Dns {
        /// Lower case, without a trailing dot.
        name: String,
        /// `name:port`; `None`: the port the request was sent to.
        port: Option<u16>,
    },
    /// A fixed list, never empty.
    Static(Vec<SocketAddr>),
}

/// How an outbound route's request picks its endpoint (`balance`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// Power of two choices over an EWMA of latency (linkerd2-proxy's algorithm).
    #[default]
    P2cEwma,
    RoundRobin,
}

impl Balance {
    /// The spelling of the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::P2cEwma => "p2c-ewma",
            Balance::RoundRobin => "round-robin",
        }
    }
}

/// Ejection of failing endpoints (`outlier`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierSpec {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts.
    pub eject_for: Duration,
    /// At most this share of the endpoints is ejected at once (0-100).
    pub max_ejected_percent: u8,
}

/// The bound on retries across all routes (`retryBudget`): at most `ratio` of the requests, plus
/// `min_per_second`.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryBudgetSpec {
    pub ratio: f64,
    pub min_per_second: u32,
}

/// Linkerd's defaults: what a file without `retryBudget` gets.
impl Default for RetryBudgetSpec {
    fn default() -> Self {
        RetryBudgetSpec {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_conditions_are_bits() {
        let mut on = RetryOn::default();
        assert!(!on.on_status(503) && !on.on_grpc(14));
        on.add_status(503);
        on.add_status(599);
        on.add_grpc(14);
        assert!(on.on_status(503) && on.on_status(599));
        assert!(!on.on_status(502) && !on.on_status(0) && !on.on_status(u16::MAX));
        assert!(on.on_grpc(14) && !on.on_grpc(13) && !on.on_grpc(u32::MAX));
        // Out of range: ignored, never a panic.
        on.add_status(u16::MAX);
        on.add_grpc(40);
        assert!(!on.on_status(u16::MAX) && !on.on_grpc(40));
    }
}
