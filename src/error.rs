//! One error type for everything that can go wrong with a proxied request or connection.
//!
//! Each kind knows whose fault it was (the client, the app, a mesh peer or the proxy itself), which
//! status the client gets and what one-line body explains it. The access log and the metrics read the kind;
//! nothing downstream matches on strings.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// Who caused a failure: lets operators tell "my app is broken" from "my clients are broken" from
/// "the mesh is broken" without reading logs.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) enum Fault {
    Client,
    App,
    /// The other end of a mutual TLS (HBONE) handshake: its certificate or its TLS was refused.
    Peer,
    Proxy,
}

impl Fault {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::App => "app",
            Fault::Peer => "peer",
            Fault::Proxy => "proxy",
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ErrorKind {
    /// The app refused the connection (nothing listens on the port).
    ConnectRefused,
    /// Connecting to the app took longer than --connect-timeout.
    ConnectTimeout,
    /// Any other failure to connect (unreachable, no route).
    ConnectFailed,
    /// The app closed or reset the connection before a complete response head.
    UpstreamReset,
    /// The app answered something that is not valid HTTP.
    UpstreamProtocol,
    /// The app did not start its response within --response-timeout of the request's end.
    ResponseTimeout,
    /// The app's response body broke off midway (the client got a truncated body).
    UpstreamBody,
    /// The app's response body paused longer than --response-body-timeout: the response was cut.
    ResponseBodyTimeout,
    /// The client's request body broke off midway.
    ClientBody,
    /// The client's request head or body paused too long (--header-timeout,
    /// --request-body-timeout).
    RequestTimeout,
    /// The client went away before the response was complete.
    ClientDisconnected,
    /// The request cannot be forwarded as written (malformed, ambiguous framing, invalid target).
    BadRequest,
    /// A plain `CONNECT` (HTTP/1.1's, or HTTP/2's without `:protocol`; not an extended one): no
    /// tunnel is opened to the target it names (501).
    ConnectUnsupported,
    /// An inbound request path that the app could resolve to another path than the one judged
    /// (`proxy::path`: encoded `/` or `.`, `..;`, double encoding, ...).
    AmbiguousPath,
    /// The request head is larger than --max-header-bytes.
    HeadersTooLarge,
    /// The request came back to this proxy (its own Via entry): a redirect loop.
    LoopDetected,
    /// --max-in-flight reached.
    Overloaded,
    /// --max-connections reached and no idle or slow connection could be shed.
    TooManyConnections,
    /// The request was still running when --drain-timeout ended the drain.
    DrainTimeout,
    /// Opaque TCP: the app's side failed after connecting.
    TcpIo,
    /// Opaque TCP: the client's side failed (reset).
    TcpClientReset,
    /// --policy does not let this peer make this request.
    PolicyDenied,
    /// Opaque TCP: no byte either way for --tcp-idle-timeout.
    TcpIdleTimeout,
    /// Inbound traffic addressed to one of the proxy's own ports (admin, inbound, outbound,
    /// HBONE), or to a loopback or unspecified address: refused, since it would reach what only
    /// the pod itself may.
    ProxyPort,
    /// A mutual TLS (HBONE) handshake with a peer failed this check.
    Handshake(HandshakeFailure),
    /// The route's `rateLimit` (overall or this peer's share) is spent for now.
    RateLimited,
    /// The route's `concurrency` is full and so is its queue, or the wait in the queue ran out.
    ConcurrencyLimited,
    /// The route's `timeout` (or the request's shorter `grpc-timeout`) ran out.
    RouteTimeout,
    /// The route's `endpoints` are none right now (a DNS name that resolves to nothing yet, or
    /// every endpoint ejected past what may be).
    NoEndpoints,
}

/// Which check failed a mutual TLS handshake with a peer: the `reason` label of
/// `tls_handshake_failures_total`, and the error kind `tls_<reason>`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The chain leads to no CA of the trust domain its SPIFFE ID claims.
    UnknownCa,
    /// Signed by the CA of another trust domain than its SPIFFE ID's; or a server of another trust
    /// domain that --peer-identities does not name.
    WrongTrustDomain,
    /// No trust bundle for the peer's trust domain.
    UnknownTrustDomain,
    /// A server that is not the identity --peer-identities expects at its address.
    UnexpectedIdentity,
    Expired,
    NotYetValid,
    /// Not one workload SPIFFE ID as its only URI SAN, or otherwise unusable.
    BadCertificate,
    /// The client sent no certificate.
    NoCertificate,
    /// The peer did not agree on ALPN `h2`.
    NoAlpnH2,
    /// The peer refused our certificate (a TLS alert).
    RefusedByPeer,
    /// Anything else of TLS (versions, cipher suites, a malformed message).
    Protocol,
}

impl HandshakeFailure {
    pub(crate) fn as_str(self) -> &'static str {
        use HandshakeFailure::*;
        match self {
            UnknownCa => "unknown_ca",
            WrongTrustDomain => "wrong_trust_domain",
            UnknownTrustDomain => "unknown_trust_domain",
            UnexpectedIdentity => "unexpected_identity",
            Expired => "expired",
            NotYetValid => "not_yet_valid",
            BadCertificate => "bad_certificate",
            NoCertificate => "no_certificate",
            NoAlpnH2 => "no_alpn_h2",
            RefusedByPeer => "refused_by_peer",
            Protocol => "protocol",
        }
    }

    /// The error kind's name.
    fn kind(self) -> &'static str {
        use HandshakeFailure::*;
        match self {
            UnknownCa => "tls_unknown_ca",
            WrongTrustDomain => "tls_wrong_trust_domain",
            UnknownTrustDomain => "tls_unknown_trust_domain",
            UnexpectedIdentity => "tls_unexpected_identity",
            Expired => "tls_expired",
            NotYetValid => "tls_not_yet_valid",
            BadCertificate => "tls_bad_certificate",
            NoCertificate => "tls_no_certificate",
            NoAlpnH2 => "tls_no_alpn_h2",
            RefusedByPeer => "tls_refused_by_peer",
            Protocol => "tls_protocol",
        }
    }

    fn message(self) -> &'static str {
        use HandshakeFailure::*;
        match self {
            UnknownCa => {
                "amazing-proxy: the peer's certificate chains to no CA of its trust domain\n"
            }
            WrongTrustDomain => {
                "amazing-proxy: the peer's certificate is of another trust domain than allowed\n"
            }
            UnknownTrustDomain => {
                "amazing-proxy: no trust bundle for the peer's trust domain (--trust-bundles)\n"
            }
            UnexpectedIdentity => {
                "amazing-proxy: the peer is not the identity expected (--peer-identities)\n"
            }
            Expired => "amazing-proxy: the peer's certificate has expired\n",
            NotYetValid => "amazing-proxy: the peer's certificate is not valid yet\n",
            BadCertificate => "amazing-proxy: the peer's certificate is not a workload SVID\n",
            NoCertificate => "amazing-proxy: the peer sent no certificate\n",
            NoAlpnH2 => "amazing-proxy: the peer does not speak ALPN h2\n",
            RefusedByPeer => "amazing-proxy: the peer refused our certificate\n",
            Protocol => "amazing-proxy: the TLS handshake with the peer failed\n",
        }
    }
}

impl ErrorKind {
    pub(crate) fn fault(self) -> Fault {
        use ErrorKind::*;
        match self {
            ConnectRefused | ConnectTimeout | ConnectFailed | UpstreamReset | UpstreamProtocol
            | ResponseTimeout | UpstreamBody | ResponseBodyTimeout | TcpIo | RouteTimeout
            | NoEndpoints => Fault::App,
            ClientBody | RequestTimeout | ClientDisconnected | BadRequest | AmbiguousPath
            | ConnectUnsupported | HeadersTooLarge | TcpClientReset | PolicyDenied
            | TcpIdleTimeout | ProxyPort | RateLimited => Fault::Client,
            Handshake(_) => Fault::Peer,
            LoopDetected | Overloaded | TooManyConnections | DrainTimeout | ConcurrencyLimited => {
                Fault::Proxy
            }
        }
    }

    /// The status the client receives when the error happens before a response started.
    pub(crate) fn status(self) -> http::StatusCode {
        use ErrorKind::*;
        use http::StatusCode as S;
        match self {
            ConnectRefused | ConnectFailed | UpstreamReset | UpstreamProtocol | UpstreamBody
            | ResponseBodyTimeout | TcpIo | Handshake(_) => S::BAD_GATEWAY,
            ConnectTimeout | ResponseTimeout | RouteTimeout => S::GATEWAY_TIMEOUT,
            RateLimited => S::TOO_MANY_REQUESTS,
            ClientBody | BadRequest | AmbiguousPath => S::BAD_REQUEST,
            RequestTimeout => S::REQUEST_TIMEOUT,
            HeadersTooLarge => S::REQUEST_HEADER_FIELDS_TOO_LARGE,
            LoopDetected => S::LOOP_DETECTED,
            // Never sent (nobody is listening); 499 is what nginx logs for it.
            ClientDisconnected | TcpClientReset => S::from_u16(499).unwrap_or(S::BAD_REQUEST),
            PolicyDenied => S::FORBIDDEN,
            ConnectUnsupported => S::NOT_IMPLEMENTED,
            // Never sent: the connection is closed.
            TcpIdleTimeout => S::REQUEST_TIMEOUT,
            // As ztunnel answers a CONNECT to one of its own ports.
            ProxyPort => S::SERVICE_UNAVAILABLE,
            Overloaded | TooManyConnections | DrainTimeout | ConcurrencyLimited | NoEndpoints => {
                S::SERVICE_UNAVAILABLE
            }
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        use ErrorKind::*;
        match self {
            ConnectRefused => "connect_refused",
            ConnectTimeout => "connect_timeout",
            ConnectFailed => "connect_failed",
            UpstreamReset => "upstream_reset",
            UpstreamProtocol => "upstream_protocol",
            ResponseTimeout => "response_timeout",
            UpstreamBody => "upstream_body",
            ResponseBodyTimeout => "response_body_timeout",
            ClientBody => "client_body",
            RequestTimeout => "request_timeout",
            ClientDisconnected => "client_disconnected",
            BadRequest => "bad_request",
            AmbiguousPath => "ambiguous_path",
            ConnectUnsupported => "connect_unsupported",
            HeadersTooLarge => "headers_too_large",
            LoopDetected => "loop_detected",
            Overloaded => "overloaded",
            TooManyConnections => "too_many_connections",
            DrainTimeout => "drain_timeout",
            TcpIo => "tcp_io",
            TcpClientReset => "tcp_client_reset",
            PolicyDenied => "policy_denied",
            TcpIdleTimeout => "tcp_idle_timeout",
            ProxyPort => "proxy_port",
            Handshake(failure) => failure.kind(),
            RateLimited => "rate_limited",
            ConcurrencyLimited => "concurrency_limited",
            RouteTimeout => "route_timeout",
            NoEndpoints => "no_endpoints",
        }
    }

    /// One line for the response body: what happened and what to look at.
    pub(crate) fn message(self) -> &'static str {
        use ErrorKind::*;
        match self {
            ConnectRefused => {
                "amazing-proxy: the app refused the connection (is it listening on its port?)\n"
            }
            ConnectTimeout => {
                "amazing-proxy: connecting to the app timed out (--connect-timeout)\n"
            }
            ConnectFailed => "amazing-proxy: could not connect to the app\n",
            UpstreamReset => "amazing-proxy: the app closed the connection before answering\n",
            UpstreamProtocol => "amazing-proxy: the app sent an invalid HTTP response\n",
            ResponseTimeout => {
                "amazing-proxy: the app did not answer in time (--response-timeout)\n"
            }
            UpstreamBody => "amazing-proxy: the app's response body broke off\n",
            ResponseBodyTimeout => {
                "amazing-proxy: the app's response body stalled (--response-body-timeout)\n"
            }
            ClientBody => "amazing-proxy: the request body broke off\n",
            RequestTimeout => {
                "amazing-proxy: the request did not arrive in time (--header-timeout, --request-body-timeout)\n"
            }
            ClientDisconnected => "amazing-proxy: the client went away\n",
            BadRequest => "amazing-proxy: malformed request (request line, headers or framing)\n",
            ConnectUnsupported => {
                "amazing-proxy: CONNECT opens no tunnel here; to reach a forward proxy through the sidecar, list its port in --opaque-ports so its tunnels pass as TCP\n"
            }
            AmbiguousPath => {
                "amazing-proxy: ambiguous request path (encoded `/`, `.`, `%` or `\\`, `..;`, control characters, invalid UTF-8 or `..` above the root): send it in plain form\n"
            }
            HeadersTooLarge => "amazing-proxy: request headers too large (--max-header-bytes)\n",
            LoopDetected => {
                "amazing-proxy: the request looped back to this proxy (check --app and the redirect rules)\n"
            }
            Overloaded => {
                "amazing-proxy: too many requests in flight (--max-in-flight); retry later\n"
            }
            TooManyConnections => {
                "amazing-proxy: too many connections (--max-connections); retry later\n"
            }
            DrainTimeout => "amazing-proxy: shutting down (--drain-timeout reached)\n",
            TcpIo => "amazing-proxy: the TCP stream broke off\n",
            TcpClientReset => "amazing-proxy: the client reset the TCP stream\n",
            PolicyDenied => {
                "amazing-proxy: the policy does not allow this request from this peer (--policy)\n"
            }
            TcpIdleTimeout => {
                "amazing-proxy: the TCP stream was idle too long (--tcp-idle-timeout)\n"
            }
            ProxyPort => "amazing-proxy: the destination is one of the proxy's own ports\n",
            Handshake(failure) => failure.message(),
            RateLimited => "amazing-proxy: rate limited (the route's rateLimit); retry later\n",
            ConcurrencyLimited => {
                "amazing-proxy: too many requests in flight on this route (its concurrency limit); retry later\n"
            }
            RouteTimeout => {
                "amazing-proxy: the request ran out of time (the route's timeout or grpc-timeout)\n"
            }
            NoEndpoints => {
                "amazing-proxy: the route has no endpoint to send to (DNS gave none, or all are ejected)\n"
            }
        }
    }

    /// The gRPC status a gRPC client gets instead of an HTTP error (linkerd2-proxy's mapping).
    pub(crate) fn grpc_status(self) -> u8 {
        const UNAVAILABLE: u8 = 14;
        const DEADLINE_EXCEEDED: u8 = 4;
        const RESOURCE_EXHAUSTED: u8 = 8;
        const INTERNAL: u8 = 13;
        const INVALID_ARGUMENT: u8 = 3;
        const PERMISSION_DENIED: u8 = 7;
        const UNIMPLEMENTED: u8 = 12;
        use ErrorKind::*;
        match self {
            ConnectTimeout | ResponseTimeout | ResponseBodyTimeout | RequestTimeout
            | RouteTimeout => DEADLINE_EXCEEDED,
            Overloaded | TooManyConnections | HeadersTooLarge | RateLimited => RESOURCE_EXHAUSTED,
            BadRequest | AmbiguousPath | ClientBody => INVALID_ARGUMENT,
            UpstreamProtocol | LoopDetected => INTERNAL,
            PolicyDenied => PERMISSION_DENIED,
            ConnectUnsupported => UNIMPLEMENTED,
            _ => UNAVAILABLE,
        }
    }
}

impl EncodeLabelValue for Fault {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for HandshakeFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl EncodeLabelValue for ErrorKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message().trim_end())
    }
}

impl std::error::Error for ErrorKind {}

/// An I/O failure that already knows what it means (an HBONE tunnel the peer refused, say):
/// carried inside an `io::Error` through hyper's client, and read back by [`classify_io`] instead
/// of guessing from the I/O kind.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub(crate) struct Known {
    pub(crate) kind: ErrorKind,
    pub(crate) reason: String,
}

impl Known {
    pub(crate) fn io(kind: ErrorKind, reason: String) -> std::io::Error {
        std::io::Error::other(Known { kind, reason })
    }
}

/// Classifies a failure of the pooled client. Connect errors carry the connector's `io::Error`.
pub(crate) fn classify_client_error(err: &hyper_util::client::legacy::Error) -> ErrorKind {
    use std::error::Error as _;
    let mut source = err.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return classify_io(io, err.is_connect());
        }
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            return classify_hyper(h);
        }
        source = cause.source();
    }
    if err.is_connect() {
        ErrorKind::ConnectFailed
    } else {
        ErrorKind::UpstreamReset
    }
}

/// What an I/O error means; `connecting` when it came from opening the upstream connection.
pub(crate) fn classify_io(io: &std::io::Error, connecting: bool) -> ErrorKind {
    use std::io::ErrorKind as Io;
    if let Some(known) = io.get_ref().and_then(|e| e.downcast_ref::<Known>()) {
        return known.kind;
    }
    match io.kind() {
        Io::TimedOut if connecting => ErrorKind::ConnectTimeout,
        Io::ConnectionRefused => ErrorKind::ConnectRefused,
        _ if connecting => ErrorKind::ConnectFailed,
        _ => ErrorKind::UpstreamReset,
    }
}

pub(crate) fn classify_hyper(err: &hyper::Error) -> ErrorKind {
    if err.is_parse() || err.is_parse_status() {
        ErrorKind::UpstreamProtocol
    } else {
        ErrorKind::UpstreamReset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_fault() {
        assert_eq!(ErrorKind::ConnectRefused.status(), 502);
        assert_eq!(ErrorKind::ResponseTimeout.status(), 504);
        assert_eq!(ErrorKind::ConnectTimeout.status(), 504);
        assert_eq!(ErrorKind::Overloaded.status(), 503);
        assert_eq!(ErrorKind::ClientBody.fault(), Fault::Client);
        assert_eq!(ErrorKind::UpstreamReset.fault(), Fault::App);
        assert_eq!(ErrorKind::TooManyConnections.fault(), Fault::Proxy);
        let refused = ErrorKind::Handshake(HandshakeFailure::WrongTrustDomain);
        assert_eq!(refused.fault(), Fault::Peer);
        assert_eq!(refused.as_str(), "tls_wrong_trust_domain");
        assert_eq!(refused.status(), 502);
    }

    #[test]
    fn io_errors_while_connecting() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(classify_io(&refused, true), ErrorKind::ConnectRefused);
        let timeout = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert_eq!(classify_io(&timeout, true), ErrorKind::ConnectTimeout);
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(classify_io(&reset, false), ErrorKind::UpstreamReset);
    }
}
