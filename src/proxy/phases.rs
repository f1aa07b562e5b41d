//! Every decision the proxy takes about a request, as pure functions (Pingora's phases, without the
//! framework). Both protocol adapters apply them: the HTTP/1.1 fast path on raw header lines, the
//! hyper path on `HeaderMap`s. Nothing here does I/O.
//!
//! - request header rules: hop-by-hop removal ([`is_hop_by_hop`], [`connection_may_remove`]),
//!   `Upgrade: h2c` never passed on ([`remove_h2c_upgrade`]), the fields the proxy owns
//!   ([`add_forwarding`]: `X-Forwarded-*`, `Forwarded`, `x-forwarded-client-cert`,
//!   `X-Request-Id`), loop detection ([`Via`]);
//! - response header rules: [`prepare_response`] (hop-by-hop removal, `Server`);
//! - the responses the proxy makes itself: [`Synthetic`], gRPC-aware.

use std::net::IpAddr;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Version};

use crate::error::ErrorKind;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
pub static SERVER_VALUE: HeaderValue = HeaderValue::from_static("amazing-proxy");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop fields of RFC 9110 7.6.1, plus `Proxy-Connection` (non-standard, still sent)
/// and `HTTP2-Settings` (connection-specific, RFC 9113 3.2.1 of the h2c upgrade, never passed on).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    const HOP_BY_HOP: [&[u8]; 7] = [
        b"connection",
        b"http2-settings",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Whether a field named in `Connection` may be removed. A connection option never removes the
/// message's framing or its Host (`Connection: content-length` would otherwise turn a body into a
/// second request at the app: request smuggling), nor the fields the proxy owns: a client's
/// `Connection` option cannot decide what becomes of them (with --trusted-hops, of the chain the
/// proxy keeps), whatever the order in which the rules run.
pub fn connection_may_remove(name: &[u8]) -> bool {
    !PROTECTED.iter().any(|p| name.eq_ignore_ascii_case(p))
}

/// The framing, the Host, and the fields the proxy owns.
const PROTECTED: [&[u8]; 9] = [
    b"content-length",
    b"transfer-encoding",
    b"host",
    b"via",
    b"forwarded",
    b"x-forwarded-client-cert",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-request-id",
];

/// Whether `name` spells a protected field (framing or one the proxy owns) with `_` for `-`
/// (`X_Forwarded_Client_Cert`). CGI, WSGI and Rack turn both spellings into one variable
/// (`HTTP_X_FORWARDED_CLIENT_CERT`), so such a field would reach the app as the one the proxy
/// owns, past the rules that replace it. Every path drops it, as nginx drops any name with `_`
/// by default and Envoy can (`headers_with_underscores_action`); other names with `_` pass.
pub fn aliases_protected_field(name: &[u8]) -> bool {
    name.contains(&b'_')
        && PROTECTED.iter().any(|p| {
            p.len() == name.len()
                && (p.iter().zip(name))
                    .all(|(&p, &n)| p == n.to_ascii_lowercase() || (p == b'-' && n == b'_'))
        })
}

/// Removes every field [`aliases_protected_field`] names (rare: looked for before anything moves).
pub fn remove_protected_aliases(headers: &mut HeaderMap) {
    if !headers
        .keys()
        .any(|name| aliases_protected_field(name.as_str().as_bytes()))
    {
        return;
    }
    let aliases: Vec<HeaderName> = (headers.keys())
        .filter(|name| aliases_protected_field(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in aliases {
        headers.remove(name);
    }
}

/// Whether a field may not come in a request's trailer section: those that frame, route or
/// authorize a message (RFC 9110 6.5.1; hyper's HTTP/1 encoder drops the same), the hop-by-hop
/// ones, and those the proxy owns, which would reach the app past the rules that replace them in
/// the header section. `name` is lower-case.
pub fn forbidden_in_request_trailers(name: &[u8]) -> bool {
    const FORBIDDEN: [&[u8]; 23] = [
        b"authorization",
        b"cache-control",
        b"connection",
        b"content-encoding",
        b"content-length",
        b"content-range",
        b"content-type",
        b"forwarded",
        b"host",
        b"http2-settings",
        b"keep-alive",
        b"max-forwards",
        b"proxy-connection",
        b"set-cookie",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"via",
        b"x-forwarded-client-cert",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-request-id",
    ];
    FORBIDDEN.contains(&name)
}

/// Whether a `Via` field value names `pseudonym` as a recipient (RFC 9110 7.6.3:
/// `received-protocol RWS received-by [ RWS comment ]`, comma-separated).
pub fn via_names(value: &[u8], pseudonym: &str) -> bool {
    tokens(value).any(|entry| {
        entry
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty())
            .nth(1)
            .is_some_and(|received_by| received_by.eq_ignore_ascii_case(pseudonym.as_bytes()))
    })
}

/// A field value without the optional whitespace around it (RFC 9110 5.6.3: OWS is SP and HTAB
/// only; not `trim_ascii`, which also takes CR, LF and FF).
pub fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&b| b != b' ' && b != b'\t');
    let end = v.iter().rposition(|&b| b != b' ' && b != b'\t');
    match (start, end) {
        (Some(s), Some(e)) => &v[s..=e],
        _ => &[],
    }
}

/// The elements of a list field (RFC 9110 5.6.1: `Connection`, `Transfer-Encoding`, `Via`...),
/// without their OWS, empty ones skipped. The one tokeniser of both adapters.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop fields and every field `Connection` names (except the protected ones).
/// `TE: trailers` survives because gRPC requires it end to end over HTTP/2.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` are kept for a protocol switch.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none (an HTTP/2 peer may not send them): one pass over the fields says
    // so, where each removal below hashes its name (perf: 1.9 % of a core on gRPC calls).
    if !has_hop_by_hop(headers) {
        return;
    }
    for connection in headers
        .get_all(header::CONNECTION)
        .iter()
        .cloned()
        .collect::<Vec<_>>()
    {
        for token in tokens(connection.as_bytes()) {
            if keep_upgrade && token.eq_ignore_ascii_case(b"upgrade") {
                continue;
            }
            if connection_may_remove(token)
                && let Ok(name) = HeaderName::from_bytes(token)
                && name != header::TE
            {
                headers.remove(&name);
            }
        }
    }
    if headers.remove(header::CONNECTION).is_some() && keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(&HTTP2_SETTINGS);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if let Some(te) = headers.get(header::TE) {
        if tokens(te.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"trailers")) {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// Whether [`remove_hop_by_hop`] has anything to do: a hop-by-hop field, or a `TE` other than a
/// single `trailers` (which it would rewrite).
fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    let mut te_seen = false;
    headers.iter().any(|(name, value)| {
        if name == header::TE {
            let again = std::mem::replace(&mut te_seen, true);
            // Exactly `trailers`: another case is rewritten (h2 sends no other TE).
            again || value.as_bytes() != b"trailers"
        } else {
            name == header::CONNECTION
                || name == header::TRANSFER_ENCODING
                || name == header::UPGRADE
                || name == KEEP_ALIVE
                || name == PROXY_CONNECTION
                || name == HTTP2_SETTINGS
        }
    })
}

/// uri-host [ ":" port ] (RFC 9112 3.2, RFC 9110 4.2.1 and 7.2, RFC 3986 3.2.2): a reg-name
/// (IPv4 addresses are reg-names too) or a bracketed IPv6 address, and a decimal port.
/// `require_host`: the host may not be empty (an absolute-form target's authority).
pub fn valid_host(value: &[u8], require_host: bool) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let ip = std::str::from_utf8(&value[1..close]);
        if ip.map_or(true, |ip| ip.parse::<std::net::Ipv6Addr>().is_err()) {
            return false;
        }
        match &value[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&value[..=close], port),
            _ => return false,
        }
    } else {
        let (host, port) = match value.iter().rposition(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        };
        if !valid_reg_name(host) {
            return false;
        }
        (host, port)
    };
    (!require_host || !host.is_empty()) && port.iter().all(u8::is_ascii_digit)
}

/// reg-name = *( unreserved / pct-encoded / sub-delims ) (RFC 3986 3.2.2), less pct-encoded:
/// `http::Uri` refuses `%` in a host, and no real host name needs it (IDNs are punycode).
fn valid_reg_name(host: &[u8]) -> bool {
    host.iter().all(|&b| {
        matches!(b,
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~'
            | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
    })
}

/// The `Host` an app gets for a request read by hyper, or `None` when the request names no valid,
/// unambiguous authority (400), by the same rules as the fast path's parser:
/// - at most one `Host`, with a valid value; HTTP/1.1 requires one (RFC 9112 3.2);
/// - an HTTP/1 absolute-form target's authority replaces `Host` (RFC 9112 3.2.2);
/// - HTTP/2's `:authority` becomes the `Host` of an HTTP/1.1 app, and a `host` field that names
///   another authority makes the request malformed (RFC 9113 8.3.1);
/// - a `CONNECT` target (`tunnel`) is where the tunnel goes, not the request's authority.
///
/// `Ok(Some(host))`: the `Host` to send instead of the request's; `Ok(None)`: the request's
/// `Host` (or its absence: HTTP/1.0 and HTTP/2 may omit it) is the app's as it is.
pub fn request_host(
    headers: &HeaderMap,
    version: Version,
    target_authority: Option<&str>,
    tunnel: bool,
) -> Result<Option<HeaderValue>, ErrorKind> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() || host.is_some_and(|h| !valid_host(h.as_bytes(), false)) {
        return Err(ErrorKind::BadRequest);
    }
    if version == Version::HTTP_11 && host.is_none() {
        return Err(ErrorKind::BadRequest);
    }
    let Some(authority) = target_authority.filter(|_| !tunnel) else {
        return Ok(None);
    };
    if host.is_some_and(|h| h.as_bytes() == authority.as_bytes()) {
        return Ok(None);
    }
    if !valid_host(authority.as_bytes(), true) {
        return Err(ErrorKind::BadRequest);
    }
    if version == Version::HTTP_2
        && host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(authority.as_bytes()))
    {
        return Err(ErrorKind::BadRequest);
    }
    HeaderValue::from_str(authority)
        .map(Some)
        .map_err(|_| ErrorKind::BadRequest)
}

/// Whether content on a request with `method` has no meaning (RFC 9110 9.3.1, 9.3.2, 9.3.5: GET,
/// HEAD, DELETE; any case, as apps that upper-case methods read them). Many apps ignore it, and one
/// that ignores its `Content-Length` reads the content as the next request on the connection:
/// request smuggling past every phase ("CL.0"), answered to whichever client sends next. So such a
/// request goes to the app with `Connection: close` (hyper's path; the fast path hands it there),
/// and its app connection carries nothing after it.
pub fn content_means_nothing(method: &str) -> bool {
    ["GET", "HEAD", "DELETE"]
        .iter()
        .any(|m| method.eq_ignore_ascii_case(m))
}

/// Whether a request read by hyper is ambiguous where the fast path's parser refuses it (400):
/// more than one `Content-Length` field, even with equal values (HTTP/2's `h2` crate takes `5` and
/// `05`, and hyper's HTTP/1.1 client would write both: RFC 9112 6.3), or the asterisk-form target
/// with another method than OPTIONS (RFC 9112 3.2.4, RFC 9113 8.3.1).
pub fn is_ambiguous_request(method: &http::Method, uri: &http::Uri, headers: &HeaderMap) -> bool {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    let repeated_length = lengths.next().is_some() && lengths.next().is_some();
    repeated_length || (uri.path() == "*" && method != http::Method::OPTIONS)
}

/// Whether a field value starts or ends with whitespace: malformed in HTTP/2 (RFC 9113 8.2.1),
/// where no parser trims it as HTTP/1's does (RFC 9112 5), so an app would see another value than
/// the proxy judged.
pub fn has_padded_value(headers: &HeaderMap) -> bool {
    headers.values().any(|v| {
        let bytes = v.as_bytes();
        let padded = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
        padded(bytes.first()) || padded(bytes.last())
    })
}

/// Joins the `cookie` fields of an HTTP/2 request into one with "; " (RFC 9113 8.2.3): HTTP/2
/// lets a client split cookies into fields, an HTTP/1.1 app expects one `Cookie` line.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// RFC 8441 5 towards an HTTP/1.1 app: a WebSocket extended `CONNECT` becomes RFC 6455's opening
/// handshake, a `GET` with `Upgrade: websocket` and a `Sec-WebSocket-Key` of the proxy's (HTTP/2
/// carries none); `Sec-WebSocket-Version` and the rest go as the client sent them.
pub fn websocket_handshake_for_http1(method: &mut http::Method, headers: &mut HeaderMap) {
    use base64::Engine;
    *method = http::Method::GET;
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let key = base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_le_bytes());
    if let Ok(key) = HeaderValue::from_str(&key) {
        headers.insert(header::SEC_WEBSOCKET_KEY, key);
    }
}

/// The HTTP/1.1 app's `101` to that handshake, as the `200` an HTTP/2 client expects (RFC 8441 5):
/// the handshake's own fields stay on the app's side.
pub fn websocket_accepted_for_http2(status: &mut StatusCode, headers: &mut HeaderMap) {
    *status = StatusCode::OK;
    headers.remove(header::SEC_WEBSOCKET_ACCEPT);
}

/// Whether the request asks to switch protocols (WebSocket and others): `Connection: upgrade`
/// together with an `Upgrade` field, in HTTP/1.1 (RFC 9110 7.8: an HTTP/1.0 request's `Upgrade` is
/// ignored, and its client may not be sent a 1xx, 101 included).
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"upgrade")))
}

/// Whether a request is a gRPC call: its errors are then answered the gRPC way.
pub fn is_grpc(content_type: Option<&[u8]>) -> bool {
    content_type
        .is_some_and(|ct| ct.len() >= 16 && ct[..16].eq_ignore_ascii_case(b"application/grpc"))
}

/// The gRPC request field that carries the call's deadline.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// A `grpc-timeout` value (gRPC over HTTP/2: `TimeoutValue TimeoutUnit`, at most 8 ASCII digits
/// and one of `H M S m u n`); `None` for anything else, which gRPC says to treat as no deadline.
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value: the finest unit whose count fits in 8 digits (rounded
/// down, so the app never gets more time than is left).
pub fn grpc_timeout_value(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let units: [(u128, u8); 6] = [
        (left.as_nanos(), b'n'),
        (left.as_micros(), b'u'),
        (left.as_millis(), b'm'),
        (u128::from(left.as_secs()), b'S'),
        (u128::from(left.as_secs() / 60), b'M'),
        (u128::from(left.as_secs() / 3600), b'H'),
    ];
    let (count, unit) = units
        .into_iter()
        .find(|(count, _)| *count <= MAX)
        .unwrap_or((MAX, b'H'));
    let mut text = itoa::Buffer::new().format(count).as_bytes().to_vec();
    text.push(unit);
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0n"))
}

/// This proxy instance's name in `Via` (RFC 9110 7.6.3): a pseudonym random per process, so that a
/// request that comes back to the same proxy is recognised (a redirect loop) while one that passes
/// another amazing-proxy (the client pod's sidecar) is not.
#[derive(Clone, Debug)]
pub struct Via {
    pseudonym: String,
    /// `1.1 <pseudonym>`, the entry this proxy appends.
    entry: HeaderValue,
}

impl Via {
    pub fn new(id: u32) -> Via {
        let pseudonym = format!("amazing-proxy-{id:08x}");
        let entry = HeaderValue::from_str(&format!("1.1 {pseudonym}"))
            .unwrap_or_else(|_| HeaderValue::from_static("1.1 amazing-proxy"));
        Via { pseudonym, entry }
    }

    pub fn random() -> Via {
        Via::new(fastrand::u32(..))
    }

    pub fn pseudonym(&self) -> &str {
        &self.pseudonym
    }

    pub fn entry(&self) -> &HeaderValue {
        &self.entry
    }

    /// Whether a `Via` field value already names this proxy as a recipient.
    pub fn seen_in(&self, value: &[u8]) -> bool {
        via_names(value, &self.pseudonym)
    }

    /// Loop check and our entry for a `HeaderMap` request. `Err` when the request looped.
    pub fn stamp(&self, headers: &mut HeaderMap) -> Result<(), ErrorKind> {
        if headers
            .get_all(header::VIA)
            .iter()
            .any(|v| self.seen_in(v.as_bytes()))
        {
            return Err(ErrorKind::LoopDetected);
        }
        headers.append(header::VIA, self.entry.clone());
        Ok(())
    }
}

/// Whether an `Upgrade` protocol is HTTP/2 (`h2c`, or `h2`, which no client may offer in clear):
/// such an upgrade is never passed on (Envoy's default), or the app's connection would turn into an
/// HTTP/2 connection whose later requests no per-request rule, policy or log would see.
pub fn is_h2c(protocol: &[u8]) -> bool {
    let name = protocol.split(|&b| b == b'/').next().unwrap_or_default();
    name.eq_ignore_ascii_case(b"h2c") || name.eq_ignore_ascii_case(b"h2")
}

/// Removes the HTTP/2 protocols from `Upgrade` (the field goes when nothing else is left): the
/// request then goes on as plain HTTP/1.1. `HTTP2-Settings` is hop-by-hop and goes with the rest.
pub fn remove_h2c_upgrade(headers: &mut HeaderMap) {
    let values = headers.get_all(header::UPGRADE);
    if !values.iter().any(|v| tokens(v.as_bytes()).any(is_h2c)) {
        return;
    }
    let others: Vec<&[u8]> = values
        .iter()
        .flat_map(|v| tokens(v.as_bytes()))
        .filter(|p| !is_h2c(p))
        .collect();
    let kept = (!others.is_empty())
        .then(|| HeaderValue::from_bytes(&others.join(&b", "[..])).ok())
        .flatten();
    headers.remove(header::UPGRADE);
    if let Some(kept) = kept {
        headers.insert(header::UPGRADE, kept);
    }
}

/// The `X-Forwarded-For` entries kept from the request: the last `trusted_hops` of all its fields,
/// in order (Envoy's `xff_num_trusted_hops`). With none trusted, none are kept: a client's own
/// `X-Forwarded-For` is whatever it wants it to be. `values` gives the fields' values, in order.
pub fn trusted_forwarded_for<'v, I>(
    values: impl Fn() -> I,
    trusted_hops: usize,
) -> impl Iterator<Item = &'v [u8]>
where
    I: Iterator<Item = &'v [u8]>,
{
    let entries = values().flat_map(tokens).count();
    values()
        .flat_map(tokens)
        .skip(entries.saturating_sub(trusted_hops))
}

/// A client's `X-Request-Id` is kept when it is one field of 1 to 128 characters of
/// `[A-Za-z0-9._:-]` (a UUID, or any id a tracer makes of letters, digits and separators); any
/// other is replaced, so that the app can log it and put it in a URL or a file name safely.
pub fn valid_request_id(value: &[u8]) -> bool {
    (1..=128).contains(&value.len())
        && value
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `x-forwarded-client-cert` in Envoy's format for a request from a verified mutual-TLS peer:
/// `By=<our SPIFFE ID>;URI=<the peer's SPIFFE ID>` (SPIFFE IDs need no quoting: no `,;="`).
pub fn client_cert_details(ours: &str, peer: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("By={ours};URI={peer}")).ok()
}

/// The fields the proxy owns, one rule for every path:
/// - `X-Forwarded-For`: the last `trusted_hops` entries of the client's (none by default), then
///   the client's address;
/// - `X-Forwarded-Proto`: `http`, the scheme the proxy saw; a client's is kept only with
///   `trusted_hops` (it knows the scheme of the hop before it);
/// - `Forwarded`: removed, or kept as it came with `trusted_hops`;
/// - `x-forwarded-client-cert`: the client's removed; `client_cert` (a verified peer) set;
/// - `X-Request-Id`: the client's when [`valid_request_id`], else a new one;
/// - any of those spelled with `_` for `-` ([`aliases_protected_field`]): removed.
///
/// Returns the request id.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    trusted_hops: usize,
    client_cert: Option<HeaderValue>,
) -> HeaderValue {
    let mut ip_buf = [0u8; 48];
    let ip = format_ip(client_ip, &mut ip_buf);
    let mut chain = Vec::new();
    if trusted_hops > 0 {
        let values = headers.get_all(&X_FORWARDED_FOR);
        let values = || values.iter().map(HeaderValue::as_bytes);
        for hop in trusted_forwarded_for(values, trusted_hops) {
            chain.extend_from_slice(hop);
            chain.extend_from_slice(b", ");
        }
    }
    chain.extend_from_slice(ip);
    if let Ok(value) = HeaderValue::from_bytes(&chain) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    if trusted_hops == 0 || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if trusted_hops == 0 {
        headers.remove(header::FORWARDED);
    }
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    remove_protected_aliases(headers);
    if let Some(details) = client_cert {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), details);
    }
    let mut ids = headers.get_all(&X_REQUEST_ID).iter();
    match (ids.next(), ids.next()) {
        (Some(id), None) if valid_request_id(id.as_bytes()) => id.clone(),
        _ => {
            let id = new_request_id();
            headers.insert(X_REQUEST_ID.clone(), id.clone());
            id
        }
    }
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 48]) -> &[u8] {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // 48 bytes hold the longest IPv6 text form (45).
    let _ = write!(cursor, "{ip}");
    let len = usize::try_from(cursor.position()).unwrap_or(0);
    &buf[..len]
}

/// A random (version 4) UUID. `fastrand` is seeded once per thread: request ids need to be unique,
/// not unpredictable, and a syscall per request would cost more than the rest of this function.
pub fn new_request_id() -> HeaderValue {
    let bytes = fastrand::u128(..).to_le_bytes();
    let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid.hyphenated().encode_lower(&mut buf);
    let mut id =
        HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    // Never indexed by HPACK: a value used once would only churn the HTTP/2 header tables, ours
    // and the app's (HTTP/1.1 ignores the flag). h2 then sends the name as a literal too, 13
    // bytes a request, which costs less than the churn (docs/benchmarks.md, 2026-12-06).
    id.set_sensitive(true);
    id
}

/// The response on its way back: hop-by-hop fields removed and our `Server`.
pub fn prepare_response(headers: &mut HeaderMap, keep_upgrade: bool) {
    remove_hop_by_hop(headers, keep_upgrade);
    headers.insert(header::SERVER, SERVER_VALUE.clone());
}

/// A response the proxy makes itself. gRPC clients get HTTP 200 with `grpc-status` and
/// `grpc-message` (a trailers-only response), as linkerd2-proxy answers them, so that they see a
/// gRPC status instead of a content-type error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Synthetic {
    pub kind: ErrorKind,
    pub grpc: bool,
    /// The client's connection ends with this response (HTTP/1: `Connection: close`; HTTP/2
    /// has no such field and keeps its connection: the stream alone ends).
    pub close: bool,
    /// `Retry-After` in seconds, when the refusal knows when to come back (a rate limit); a 503
    /// without one says 1.
    pub retry_after: Option<u64>,
}

impl Synthetic {
    /// A response on a connection that stays open; see [`Synthetic::closing`].
    pub fn new(kind: ErrorKind, grpc: bool) -> Synthetic {
        Synthetic {
            kind,
            grpc,
            close: false,
            retry_after: None,
        }
    }

    /// The same response, telling the client to come back after `seconds` (at least 1).
    pub fn retry_after(mut self, seconds: u64) -> Synthetic {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// The `Retry-After` value in seconds: refusals that ask the client to come back (503,
    /// 429); gRPC has no such field.
    fn retry_after_seconds(self) -> Option<u64> {
        let status = self.kind.status();
        let asks_back =
            status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS;
        (!self.grpc && asks_back).then(|| self.retry_after.unwrap_or(1))
    }

    /// The same response, ending the connection when `close`.
    pub fn closing(mut self, close: bool) -> Synthetic {
        self.close = close;
        self
    }

    pub fn status(self) -> StatusCode {
        if self.grpc {
            StatusCode::OK
        } else {
            self.kind.status()
        }
    }

    /// The one-line body (empty for gRPC: the message travels in `grpc-message`).
    pub fn body(self) -> &'static str {
        if self.grpc { "" } else { self.kind.message() }
    }

    /// The header fields, in order, with our names in canonical case.
    pub fn fields(self) -> impl Iterator<Item = (&'static str, &'static str)> {
        let kind = self.kind;
        let grpc = self.grpc.then(|| {
            [
                ("Content-Type", "application/grpc"),
                ("grpc-status", grpc_status_text(kind.grpc_status())),
                ("grpc-message", kind.message().trim_end()),
            ]
        });
        let plain = (!self.grpc).then_some(("Content-Type", "text/plain; charset=utf-8"));
        std::iter::once(("Server", "amazing-proxy"))
            .chain(plain)
            .chain(grpc.into_iter().flatten())
    }

    /// As HTTP/1.1 bytes, `Content-Length` and (when it closes) `Connection: close` included.
    pub fn render_h1(self, lowercase_names: bool, out: &mut Vec<u8>) {
        let status = self.status();
        let body = self.body();
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut field = |name: &str, value: &[u8]| {
            if lowercase_names {
                out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
            } else {
                out.extend_from_slice(name.as_bytes());
            }
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        for (name, value) in self.fields() {
            field(name, value.as_bytes());
        }
        if let Some(seconds) = self.retry_after_seconds() {
            field(
                "Retry-After",
                itoa::Buffer::new().format(seconds).as_bytes(),
            );
        }
        field(
            "Content-Length",
            itoa::Buffer::new().format(body.len()).as_bytes(),
        );
        if self.close {
            field("Connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
    }

    /// As a `HeaderMap` for hyper (which drops `Connection` from HTTP/2 responses itself).
    pub fn header_map(self) -> HeaderMap {
        let mut headers = HeaderMap::with_capacity(6);
        for (name, value) in self.fields() {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        if let Some(seconds) = self.retry_after_seconds() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        headers
    }
}

/// A response head hyper wrote on its own, for a request head it refused before the proxy saw it
/// (hyper's `on_parse_error`): the status line and at most `content-length: 0` and `date`,
/// nothing after the head, no `Server` (every response of ours carries one). Gives the refusal
/// to answer in its place, so that a client gets the same words for the same fault on every path.
pub fn hyper_refusal(written: &[u8]) -> Option<ErrorKind> {
    let mut fields = [httparse::EMPTY_HEADER; 4];
    let mut head = httparse::Response::new(&mut fields);
    let Ok(httparse::Status::Complete(len)) = head.parse(written) else {
        return None;
    };
    let only_hyper_fields = head.headers.iter().all(|field| {
        field.name.eq_ignore_ascii_case("date")
            || (field.name.eq_ignore_ascii_case("content-length") && field.value == b"0")
    });
    if len != written.len() || !only_hyper_fields {
        return None;
    }
    match head.code? {
        400 => Some(ErrorKind::BadRequest),
        // Our parser answers a request line past --max-header-bytes as a head too large.
        414 | 431 => Some(ErrorKind::HeadersTooLarge),
        _ => None,
    }
}

fn grpc_status_text(code: u8) -> &'static str {
    const TEXT: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    TEXT.get(usize::from(code)).copied().unwrap_or("2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_render() {
        let parse = |v: &str| parse_grpc_timeout(v.as_bytes());
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("7n"), Some(Duration::from_nanos(7)));
        for bad in [
            "",
            "m",
            "100",
            "123456789m",
            "1x",
            "-1S",
            "1.5S",
            " 1S",
            "1 S",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        let render = |d: Duration| grpc_timeout_value(d).to_str().unwrap_or("?").to_owned();
        assert_eq!(render(Duration::from_millis(30)), "30000000n");
        assert_eq!(render(Duration::from_millis(300)), "300000u");
        assert_eq!(render(Duration::from_secs(2)), "2000000u");
        assert_eq!(render(Duration::from_secs(1000)), "1000000m");
        assert_eq!(render(Duration::from_secs(200_000)), "200000S");
        assert_eq!(render(Duration::ZERO), "0n");
        for d in [
            Duration::from_millis(1234),
            Duration::from_secs(86_400 * 3000),
        ] {
            let back = parse(&render(d)).unwrap_or_default();
            assert!(back <= d, "{d:?} rendered as more: {back:?}");
        }
    }

    #[test]
    fn hyper_refusals_are_recognised_and_nothing_else() {
        let hyper = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Sat, 05 Dec 2026 17:00:00 GMT\r\n\r\n";
        assert_eq!(hyper_refusal(hyper), Some(ErrorKind::BadRequest));
        let large = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_refusal(large), Some(ErrorKind::HeadersTooLarge));
        let long = b"HTTP/1.1 414 URI Too Long\r\ndate: x\r\n\r\n";
        assert_eq!(hyper_refusal(long), Some(ErrorKind::HeadersTooLarge));
        let mut ours = Vec::new();
        Synthetic::new(ErrorKind::BadRequest, false).render_h1(false, &mut ours);
        assert_eq!(hyper_refusal(&ours), None, "ours carry Server and a body");
        for other in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nmore"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nserver: app\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"not a response at all",
        ] {
            assert_eq!(
                hyper_refusal(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_fields_and_those_named_by_connection_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-keep", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, vec!["traceparent", "x-keep"]);
    }

    /// Each hop-by-hop field alone still goes (the pass that skips clean messages misses none);
    /// a single `te: trailers` stays as it is, two become one, and any other `TE` goes.
    #[test]
    fn underscore_spellings_of_protected_fields_are_aliases() {
        for alias in [
            &b"X_Forwarded_Client_Cert"[..],
            b"x_forwarded_for",
            b"X-Forwarded_Proto",
            b"X_REQUEST_ID",
            b"content_length",
            b"Transfer_Encoding",
        ] {
            assert!(aliases_protected_field(alias), "{}", alias.escape_ascii());
        }
        for other in [
            &b"x-forwarded-for"[..],
            b"x_custom",
            b"x_forwarded_fo",
            b"x_forwarded_forx",
        ] {
            assert!(!aliases_protected_field(other), "{}", other.escape_ascii());
        }
        let mut headers = HeaderMap::new();
        headers.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        headers.append("x_forwarded_for", HeaderValue::from_static("7.7.7.7"));
        headers.insert("x_custom", HeaderValue::from_static("kept"));
        remove_protected_aliases(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x_custom"));
    }

    #[test]
    fn every_hop_by_hop_field_alone_goes() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "http2-settings",
            "transfer-encoding",
            "upgrade",
        ] {
            let mut h = map(&[(name, "x"), ("x-keep", "yes")]);
            remove_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(name), "{name} is removed");
            assert_eq!(h["x-keep"], "yes");
        }
        let mut h = map(&[("te", "trailers"), ("x-keep", "yes")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers", "a single te: trailers is left");
        let mut h = map(&[("te", "TRAILERS")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers", "in the one form HTTP/2 allows");
        let mut h = map(&[("te", "trailers"), ("te", "trailers")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.get_all("te").iter().count(), 1, "two become one");
        let mut h = map(&[("te", "trailers, deflate")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["te"], "trailers");
        let mut h = map(&[("te", "deflate")]);
        remove_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("te"));
    }

    #[test]
    fn connection_never_removes_framing_or_host() {
        let mut h = map(&[
            (
                "connection",
                "content-length, host, forwarded, x-forwarded-client-cert",
            ),
            ("connection", "Transfer-Encoding, x-gone"),
            ("forwarded", "for=203.0.113.9"),
            ("x-forwarded-client-cert", "forged"),
            ("content-length", "35"),
            ("host", "pod"),
            ("x-gone", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["content-length"], "35");
        assert_eq!(h["host"], "pod");
        assert!(!h.contains_key("x-gone"));
        // Left for the forwarding rule to decide (see `add_forwarding`).
        assert!(h.contains_key("forwarded") && h.contains_key("x-forwarded-client-cert"));
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = map(&[("te", "trailers")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }

    #[test]
    fn upgrade_is_kept_when_switching_protocols() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(Version::HTTP_11, &h));
        assert!(!is_upgrade(Version::HTTP_10, &h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
    }

    #[test]
    fn forwarding_fields_from_an_untrusted_client_are_overwritten() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.9;proto=https"),
            (
                "x-forwarded-client-cert",
                "By=spiffe://x/ns/a/sa/b;URI=spiffe://x/ns/c/sa/d",
            ),
            ("x-request-id", "given-1:a.b_c"),
        ]);
        let id = add_forwarding(&mut h, "198.18.0.1".parse().expect("ip"), 0, None);
        assert_eq!(h["x-forwarded-for"], "198.18.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("forwarded"));
        assert!(!h.contains_key("x-forwarded-client-cert"));
        assert_eq!(id, "given-1:a.b_c");
        assert_eq!(h["x-request-id"], id);

        let mut h = HeaderMap::new();
        let id = add_forwarding(&mut h, "::1".parse().expect("ip"), 0, None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-request-id"], id);
        assert_eq!(id.len(), 36);
    }

    #[test]
    fn trusted_hops_keep_the_end_of_the_chain() {
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.1, 203.0.113.2"),
            ("x-forwarded-for", " ,203.0.113.3"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.3"),
        ]);
        add_forwarding(&mut h, "198.18.0.1".parse().expect("ip"), 2, None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.2, 203.0.113.3, 198.18.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=203.0.113.3");
        let mut h = map(&[("x-forwarded-for", "203.0.113.1")]);
        add_forwarding(&mut h, "198.18.0.1".parse().expect("ip"), 5, None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 198.18.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn client_cert_details_are_ours_only() {
        let ours = "spiffe://cluster.local/ns/shop/sa/backend";
        let peer = "spiffe://cluster.local/ns/shop/sa/frontend";
        let details = client_cert_details(ours, peer);
        assert_eq!(
            details.as_ref().map(HeaderValue::as_bytes),
            Some(&b"By=spiffe://cluster.local/ns/shop/sa/backend;URI=spiffe://cluster.local/ns/shop/sa/frontend"[..])
        );
        let mut h = map(&[
            (
                "x-forwarded-client-cert",
                "URI=spiffe://cluster.local/ns/kube-system/sa/admin",
            ),
            ("x-forwarded-client-cert", "forged"),
        ]);
        add_forwarding(
            &mut h,
            "198.18.0.1".parse().expect("ip"),
            3,
            details.clone(),
        );
        let all: Vec<_> = h.get_all("x-forwarded-client-cert").iter().collect();
        assert_eq!(all, details.iter().collect::<Vec<_>>());
    }

    #[test]
    fn request_ids_are_kept_only_when_well_formed() {
        for (given, kept) in [
            ("a", true),
            ("0af7651916cd43dd8448eb211c80319c", true),
            ("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", true),
            ("trace:span.1_2", true),
            (&"x".repeat(128), true),
            (&"x".repeat(129), false),
            ("", false),
            ("a b", false),
            ("a/b", false),
            ("<script>", false),
            ("id,other", false),
        ] {
            let mut h = map(&[("x-request-id", given)]);
            let id = add_forwarding(&mut h, "198.18.0.1".parse().expect("ip"), 0, None);
            assert_eq!(id == given, kept, "{given:?}");
            assert_eq!(h.get_all("x-request-id").iter().count(), 1);
        }
        let mut h = map(&[("x-request-id", "one"), ("x-request-id", "two")]);
        let id = add_forwarding(&mut h, "198.18.0.1".parse().expect("ip"), 0, None);
        assert_eq!(id.len(), 36, "two ids are none");
        assert_eq!(h.get_all("x-request-id").iter().collect::<Vec<_>>(), [&id]);
    }

    #[test]
    fn h2c_is_never_an_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        remove_h2c_upgrade(&mut h);
        assert!(!is_upgrade(Version::HTTP_11, &h));
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");

        let mut h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "H2C, websocket"),
            ("upgrade", "h2/2.0"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ]);
        remove_h2c_upgrade(&mut h);
        assert!(is_upgrade(Version::HTTP_11, &h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert!(!h.contains_key("http2-settings"));
    }

    #[test]
    fn the_host_an_app_gets() {
        use http::Version as V;
        let h = |pairs: &[(&str, &str)]| map(pairs);
        let host = |v: &str| Ok(Some(HeaderValue::from_str(v).expect("value")));
        // As it came, or from the target's authority (HTTP/1 absolute form, HTTP/2 :authority).
        assert_eq!(
            request_host(&h(&[("host", "a")]), V::HTTP_11, None, false),
            Ok(None)
        );
        assert_eq!(
            request_host(&h(&[("host", "a")]), V::HTTP_11, Some("b"), false),
            host("b")
        );
        assert_eq!(
            request_host(&h(&[("host", "a")]), V::HTTP_11, Some("a"), false),
            Ok(None)
        );
        assert_eq!(
            request_host(&h(&[]), V::HTTP_2, Some("a:80"), false),
            host("a:80")
        );
        assert_eq!(request_host(&h(&[]), V::HTTP_2, None, false), Ok(None));
        assert_eq!(request_host(&h(&[]), V::HTTP_10, None, false), Ok(None));
        // A CONNECT's target is the tunnel's.
        assert_eq!(
            request_host(&h(&[("host", "a")]), V::HTTP_11, Some("b:1"), true),
            Ok(None)
        );
        for (pairs, version, target) in [
            (&[][..], V::HTTP_11, None),
            (&[("host", "a"), ("host", "a")][..], V::HTTP_11, None),
            (&[("host", "a b")][..], V::HTTP_11, None),
            (&[("host", "a")][..], V::HTTP_2, Some("b")),
            (&[][..], V::HTTP_2, Some("u@b")),
        ] {
            assert_eq!(
                request_host(&h(pairs), version, target, false),
                Err(ErrorKind::BadRequest),
                "{pairs:?} {target:?}"
            );
        }
    }

    #[test]
    fn padded_values_and_cookies() {
        assert!(has_padded_value(&map(&[("x", " a")])));
        assert!(has_padded_value(&map(&[("x", "a\t")])));
        assert!(!has_padded_value(&map(&[("x", "a b")])));
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("x", "y")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().collect::<Vec<_>>(), ["a=1; b=2"]);
        let mut h = map(&[("cookie", "a=1")]);
        join_cookies(&mut h);
        assert_eq!(h["cookie"], "a=1");
    }

    #[test]
    fn request_ids_are_uuid_v4_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[14], b'4');
        // Used once: HTTP/2 must send it as a never-indexed literal, not add it to HPACK's table.
        assert!(a.is_sensitive());
    }

    #[test]
    fn response_gets_our_server() {
        let mut h = map(&[("server", "gunicorn"), ("connection", "close")]);
        prepare_response(&mut h, false);
        assert_eq!(h["server"], "amazing-proxy");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn via_detects_our_own_entry_only() {
        let via = Via::new(0xabc);
        assert_eq!(via.entry(), "1.1 amazing-proxy-00000abc");
        assert!(via.seen_in(b"1.0 fred, 1.1 amazing-proxy-00000abc (amazing)"));
        assert!(!via.seen_in(b"1.1 amazing-proxy-00000abd"));
        let mut h = map(&[("via", "1.1 other")]);
        assert_eq!(via.stamp(&mut h), Ok(()));
        assert_eq!(via.stamp(&mut h), Err(ErrorKind::LoopDetected));
    }

    #[test]
    fn synthetic_responses() {
        let mut out = Vec::new();
        Synthetic::new(ErrorKind::Overloaded, false)
            .closing(true)
            .render_h1(false, &mut out);
        let text = String::from_utf8(out.clone()).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\nServer: amazing-proxy\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\nContent-Length: "), "{text}");
        assert!(text.contains("Connection: close\r\n\r\namazing-proxy: too many requests"));

        let grpc = Synthetic::new(ErrorKind::ConnectRefused, true);
        assert_eq!(grpc.status(), StatusCode::OK);
        let h = grpc.header_map();
        assert_eq!(h["grpc-status"], "14");
        assert_eq!(h["content-type"], "application/grpc");
        assert!(!h.contains_key("retry-after"));
        assert_eq!(
            Synthetic::new(ErrorKind::ResponseTimeout, true).header_map()["grpc-status"],
            "4"
        );
        assert_eq!(
            Synthetic::new(ErrorKind::Overloaded, true).header_map()["grpc-status"],
            "8"
        );
    }
}
