//! HTTP/1.1 message heads as the fast path reads and rewrites them: pure functions, no I/O.
//!
//! `plan_request` parses a request head in place with `httparse`, decides its framing and writes the
//! head to send to the app; `plan_response` does the same for the app's answer. What the fast path
//! does not handle itself is `Fallback` (the hyper path); anything ambiguous is `Invalid`.
//!
//! A sidecar that disagrees with the app about where a message ends lets one request smuggle
//! another, so wherever RFC 9112 allows a choice between being lenient and rejecting, this module
//! rejects (400 for a request, 502 for a response), and whatever it forwards is unambiguous: one
//! framing field, in its plain form, never removed by a `Connection` option. Each rule cites the
//! RFC section it comes from.
//!
//! Cost: one pass over the fields to decide, one to write; no allocation beyond `out` and the
//! path unless a head has more than `STACK_FIELDS` fields or `Connection` names fields to drop.

use std::cmp::Ordering;
use std::ops::Range;
use std::time::Duration;

use http::Method;
use http::header::HeaderValue;

use super::chunked::is_tchar;
use crate::proxy::path::{self, Ambiguous};
use crate::proxy::phases::{self, new_request_id, trim_ows};
use crate::telemetry::trace::{Parent, ParentFields, Sampler, SpanIds};

/// Fields parsed into an array on the stack; a head with more is parsed again into one sized
/// from its line count. The byte limit (--max-header-bytes, 431) is the caller's.
const STACK_FIELDS: usize = 64;

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// No length: the body ends when the sender closes (responses only).
    UntilClose,
}

/// What the request head says, once rewritten for the app into `out`.
#[derive(Debug)]
pub struct RequestPlan {
    pub head_len: usize,
    pub method: Method,
    /// The target in origin form (or `*`), as sent to the app.
    pub path: String,
    pub framing: Framing,
    pub keep_alive: bool,
    pub request_id: HeaderValue,
    /// This exchange's span, when tracing is on.
    pub trace: Option<SpanIds>,
    /// `content-type: application/grpc*`: errors are answered the gRPC way.
    pub grpc: bool,
    /// The path is ambiguous (`path::normalize`): the request is answered 400 before any rule is
    /// consulted, and `path` is the target as it came, for the log.
    pub ambiguous: Option<Ambiguous>,
    /// Our own `Via` pseudonym is already in the request: it went round in a loop (the driver
    /// answers 508).
    pub looped: bool,
    /// One valid Host (RFC 9112 3.2; HTTP/1.0 may omit it): else the driver answers 400, with the
    /// request's method, path and id in its record.
    pub authority_valid: bool,
    /// Where the authority as the client wrote it lies in the head (the absolute-form target's,
    /// else the first Host's), for routes to match on: read only when there are routes.
    pub authority_at: Option<std::ops::Range<usize>>,
    /// The client's `grpc-timeout` (the first), on a gRPC request: a route's deadline honours it.
    pub grpc_timeout: Option<Duration>,
    /// Where the client's `grpc-timeout` lines lie in `out` (together), or an empty range where
    /// one goes: what [`set_grpc_timeout`] replaces on a route with a deadline.
    pub grpc_timeout_at: Range<usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// More bytes needed.
    Partial,
    /// Valid, but for the hyper path.
    Fallback,
    /// Malformed or ambiguous: 400, then close.
    Invalid,
}

/// Options of the head rewriting that come from configuration.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite<'a> {
    /// Lower-case every field name; by default each name keeps the case it came in.
    pub lowercase_names: bool,
    /// `Some(app address)` with --rewrite-host.
    pub host: Option<&'a str>,
    /// The client's IP as text, for X-Forwarded-For.
    pub client_ip: &'a str,
    /// This proxy's pseudonym in `Via`.
    pub via: &'a str,
    /// Bring the path to the form the app resolves (inbound: `path::normalize`).
    pub normalize_path: bool,
    /// --trusted-hops: how much of the client's forwarding fields to keep.
    pub trusted_hops: usize,
    /// `x-forwarded-client-cert` for a verified peer (`phases::client_cert_details`).
    pub client_cert: Option<&'a [u8]>,
    /// Tracing is on: the trace phase reads the caller's context and writes this exchange's
    /// `traceparent` in place of the caller's.
    pub sampler: Option<&'a Sampler>,
    /// The span of the HBONE tunnel the request came in: its parent when it names none.
    pub tunnel_parent: Option<Parent>,
}

/// The fields the planners act on; everything else is `Other` and passes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Connection,
    ContentLength,
    ContentType,
    Expect,
    Forwarded,
    GrpcStatus,
    GrpcTimeout,
    Http2Settings,
    Host,
    KeepAlive,
    ProxyConnection,
    Server,
    Te,
    TransferEncoding,
    Upgrade,
    Via,
    XForwardedClientCert,
    XForwardedFor,
    XForwardedProto,
    XRequestId,
    // Trace context: read (and `traceparent` replaced) only when tracing is on.
    Traceparent,
    Tracestate,
    B3,
    XB3TraceId,
    XB3SpanId,
    XB3Sampled,
    XB3Flags,
    Other,
}

impl Field {
    fn of(name: &str) -> Field {
        let candidate = match name.len() {
            2 => match name.as_bytes()[0] | 0x20 {
                b'b' => Field::B3,
                _ => Field::Te,
            },
            3 => Field::Via,
            4 => Field::Host,
            6 => match name.as_bytes()[0] | 0x20 {
                b'e' => Field::Expect,
                _ => Field::Server,
            },
            7 => Field::Upgrade,
            9 => Field::Forwarded,
            10 => match name.as_bytes()[0] | 0x20 {
                b'c' => Field::Connection,
                b't' => Field::Tracestate,
                b'x' => Field::XB3Flags,
                _ => Field::KeepAlive,
            },
            11 => match name.as_bytes()[0] | 0x20 {
                b't' => Field::Traceparent,
                b'x' => Field::XB3SpanId,
                _ => Field::GrpcStatus,
            },
            12 => match (name.as_bytes()[0] | 0x20, name.as_bytes()[2] | 0x20) {
                (b'c', _) => Field::ContentType,
                (b'g', _) => Field::GrpcTimeout,
                (_, b'b') if name.as_bytes()[5] | 0x20 == b't' => Field::XB3TraceId,
                (_, b'b') => Field::XB3Sampled,
                _ => Field::XRequestId,
            },
            14 => match name.as_bytes()[0] | 0x20 {
                b'c' => Field::ContentLength,
                _ => Field::Http2Settings,
            },
            15 => Field::XForwardedFor,
            16 => Field::ProxyConnection,
            17 => match name.as_bytes()[0] | 0x20 {
                b't' => Field::TransferEncoding,
                _ => Field::XForwardedProto,
            },
            23 => Field::XForwardedClientCert,
            _ => return Field::Other,
        };
        if name.eq_ignore_ascii_case(candidate.name()) {
            candidate
        } else {
            Field::Other
        }
    }

    /// The canonical name, as the proxy writes it.
    fn name(self) -> &'static str {
        match self {
            Field::Connection => "Connection",
            Field::ContentLength => "Content-Length",
            Field::ContentType => "Content-Type",
            Field::Expect => "Expect",
            Field::Forwarded => "Forwarded",
            Field::GrpcStatus => "grpc-status",
            Field::GrpcTimeout => phases::GRPC_TIMEOUT,
            Field::Http2Settings => "HTTP2-Settings",
            Field::Host => "Host",
            Field::KeepAlive => "Keep-Alive",
            Field::ProxyConnection => "Proxy-Connection",
            Field::Server => "Server",
            Field::Te => "TE",
            Field::TransferEncoding => "Transfer-Encoding",
            Field::Upgrade => "Upgrade",
            Field::Via => "Via",
            Field::XForwardedClientCert => "X-Forwarded-Client-Cert",
            Field::XForwardedFor => "X-Forwarded-For",
            Field::XForwardedProto => "X-Forwarded-Proto",
            Field::XRequestId => "X-Request-Id",
            Field::Traceparent => "traceparent",
            Field::Tracestate => "tracestate",
            Field::B3 => "b3",
            Field::XB3TraceId => "X-B3-TraceId",
            Field::XB3SpanId => "X-B3-SpanId",
            Field::XB3Sampled => "X-B3-Sampled",
            Field::XB3Flags => "X-B3-Flags",
            Field::Other => "",
        }
    }

    /// Hop-by-hop fields, dropped here (the planners write their own `Transfer-Encoding`,
    /// `TE: trailers` and `Connection` where needed). The list is the phases' own.
    fn is_hop_by_hop(self) -> bool {
        self != Field::Other && phases::is_hop_by_hop(self.name().as_bytes())
    }

    /// Fields a `Connection` option never removes: the phases decide.
    fn is_protected(self) -> bool {
        self != Field::Other && !phases::connection_may_remove(self.name().as_bytes())
    }
}

fn push_name(out: &mut Vec<u8>, name: &str, lowercase: bool) {
    if lowercase {
        out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    } else {
        out.extend_from_slice(name.as_bytes());
    }
}

/// Writes `name: value` CRLF.
fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8], lowercase: bool) {
    push_name(out, name, lowercase);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Content-Length = 1*DIGIT (RFC 9110 8.6), with the OWS any field value may have around it
/// (RFC 9110 5.5). Not Rust's `trim` and `parse`: `+5`, a no-break space or `5\x85` are invalid.
fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = trim_ows(value);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The transfer codings of a message, over all its Transfer-Encoding fields in order.
#[derive(Default)]
struct Codings {
    present: bool,
    chunked_count: u8,
    last_is_chunked: bool,
    malformed: bool,
}

impl Codings {
    /// transfer-coding = token *( OWS ";" OWS transfer-parameter ), transfer-parameter = token
    /// BWS "=" BWS token (RFC 9112 7; quoted-string values are refused: no coding has them).
    /// Empty list elements, which RFC 9110 5.6.1 would have us skip, and non-ASCII bytes are
    /// refused too, as hyper refuses them (`chunked,` is not chunked to hyper): the framing field
    /// must mean the same to both paths and to the app.
    fn add(&mut self, value: &[u8]) {
        self.present = true;
        for coding in value.split(|&b| b == b',').map(trim_ows) {
            let mut parts = coding.split(|&b| b == b';').map(trim_ows);
            let name = parts.next().unwrap_or_default();
            let is_token = |t: &[u8]| !t.is_empty() && t.iter().all(|&b| is_tchar(b));
            let params_valid = parts.all(|param| {
                let mut kv = param.splitn(2, |&b| b == b'=').map(trim_ows);
                kv.next().is_some_and(is_token) && kv.next().is_some_and(is_token)
            });
            if !is_token(name) || !params_valid {
                self.malformed = true;
            }
            let chunked = name.eq_ignore_ascii_case(b"chunked");
            self.chunked_count = self.chunked_count.saturating_add(u8::from(chunked));
            self.last_is_chunked = chunked && coding.len() == name.len();
        }
    }
}

/// Writes one `Transfer-Encoding` field with every coding of the message, in order: codings
/// are never dropped (issue 9, defect 8), several fields become one list (RFC 9110 5.3).
fn push_codings(out: &mut Vec<u8>, headers: &[httparse::Header<'_>], lowercase: bool) {
    push_name(out, Field::TransferEncoding.name(), lowercase);
    out.extend_from_slice(b": ");
    let mut first = true;
    for h in headers
        .iter()
        .filter(|h| Field::of(h.name) == Field::TransferEncoding)
    {
        for coding in phases::tokens(h.value) {
            if !first {
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(coding);
            first = false;
        }
    }
    out.extend_from_slice(b"\r\n");
}

fn cmp_ignore_case(a: &[u8], b: &[u8]) -> Ordering {
    a.iter()
        .map(u8::to_ascii_lowercase)
        .cmp(b.iter().map(u8::to_ascii_lowercase))
}

/// The fields a message's `Connection` options name (RFC 9110 7.6.1), other than `close` and
/// `keep-alive`; sorted, so that a head listing thousands costs no more than a few lookups each.
/// `None`, without allocating, when there are none: the common case.
fn connection_options<'h>(headers: &[httparse::Header<'h>]) -> Option<Vec<&'h [u8]>> {
    let mut options: Option<Vec<&[u8]>> = None;
    for h in headers
        .iter()
        .filter(|h| Field::of(h.name) == Field::Connection)
    {
        for option in phases::tokens(h.value) {
            if !option.eq_ignore_ascii_case(b"close") && !option.eq_ignore_ascii_case(b"keep-alive")
            {
                options.get_or_insert_with(Vec::new).push(option);
            }
        }
    }
    if let Some(list) = options.as_mut() {
        list.sort_unstable_by(|a, b| cmp_ignore_case(a, b));
    }
    options
}

fn listed(options: Option<&[&[u8]]>, name: &str) -> bool {
    options.is_some_and(|list| {
        list.binary_search_by(|o| cmp_ignore_case(o, name.as_bytes()))
            .is_ok()
    })
}

/// Whether `Connection` says `close`.
fn says_close(value: &[u8]) -> bool {
    phases::tokens(value).any(|o| o.eq_ignore_ascii_case(b"close"))
}

/// Longest request target taken: `http::Uri`'s limit, so that the hyper path takes it too.
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// Which bytes an origin-form target may hold, by position: the path's, then the query's after
/// the first `?`. The same sets as `http::Uri` (and so the hyper path): RFC 3986's characters,
/// plus `"`, `{`, `}` and `|` in the path and any visible byte but `"`, `<`, `>` in the query,
/// which real clients send unencoded; non-ASCII bytes (httparse has checked they are UTF-8). A
/// fragment (`#`) is not part of a request target (RFC 9112 3.2): hyper would drop it, we refuse.
const fn target_byte_classes() -> [[bool; 256]; 2] {
    let mut t = [[false; 256]; 2];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[0][i] = matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | b'|'
            | b'~' | b'"' | b'{' | b'}' | 0x80..=0xFF);
        t[1][i] = matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E | 0x80..=0xFF);
        i += 1;
    }
    t
}
static TARGET_BYTES: [[bool; 256]; 2] = target_byte_classes();

/// Whether an origin-form target (path and query) holds only the bytes `TARGET_BYTES` allows.
fn valid_origin(origin: &str) -> bool {
    let (path, query) = origin.split_at(origin.find('?').unwrap_or(origin.len()));
    path.bytes().all(|b| TARGET_BYTES[0][usize::from(b)])
        && query.bytes().all(|b| TARGET_BYTES[1][usize::from(b)])
}

/// The request target, as the app gets it (RFC 9112 3.2).
struct Target<'a> {
    /// origin-form (or `*`) for the app.
    origin: std::borrow::Cow<'a, str>,
    /// The authority of an absolute-form target: it replaces Host (RFC 9112 3.2.2).
    authority: Option<&'a str>,
}

fn parse_target<'a>(method: &str, target: &'a str) -> Result<Target<'a>, RequestVerdict> {
    if target.len() > MAX_TARGET {
        return Err(RequestVerdict::Invalid);
    }
    if target.starts_with('/') {
        if !valid_origin(target) {
            return Err(RequestVerdict::Invalid);
        }
        return Ok(Target {
            origin: target.into(),
            authority: None,
        });
    }
    if target == "*" {
        // asterisk-form is for OPTIONS only (RFC 9112 3.2.4).
        return if method == "OPTIONS" {
            Ok(Target {
                origin: target.into(),
                authority: None,
            })
        } else {
            Err(RequestVerdict::Invalid)
        };
    }
    // absolute-form (RFC 9112 3.2.2): only http and https URIs are ours to forward.
    let rest = [("http://", 7), ("https://", 8)]
        .iter()
        .find(|(scheme, n)| {
            target
                .get(..*n)
                .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
        })
        .map(|&(_, n)| &target[n..])
        .ok_or(RequestVerdict::Invalid)?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    // userinfo is an error in an http(s) URI (RFC 9110 4.2.4); the host may not be empty (4.2.1).
    if authority.contains('@') || !phases::valid_host(authority.as_bytes(), true) {
        return Err(RequestVerdict::Invalid);
    }
    let origin: std::borrow::Cow<'a, str> = match path.as_bytes().first() {
        Some(b'/') => path.into(),
        // An empty path is `/`, or `*` for OPTIONS (RFC 9112 3.2.4).
        None if method == "OPTIONS" => "*".into(),
        None => "/".into(),
        Some(b'?') => format!("/{path}").into(),
        Some(_) => return Err(RequestVerdict::Invalid),
    };
    if !valid_origin(&origin) {
        return Err(RequestVerdict::Invalid);
    }
    Ok(Target {
        origin,
        authority: Some(authority),
    })
}

/// RFC 9112 2.3: HTTP/1.x with x above 1 is answered as the highest 1.x we know. httparse only
/// takes 1.0 and 1.1, so a request line ending in `HTTP/1.2`..`HTTP/1.9` gets its minor digit
/// rewritten to 1 in place. Returns whether it did.
fn downgrade_minor_version(buf: &mut [u8]) -> bool {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line_len = buf[start..]
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(buf.len() - start);
    let line = &mut buf[start..start + line_len];
    match line {
        [
            ..,
            b' ',
            b'H',
            b'T',
            b'T',
            b'P',
            b'/',
            b'1',
            b'.',
            minor @ b'2'..=b'9',
        ] => {
            *minor = b'1';
            true
        }
        _ => false,
    }
}

/// Parses a request head into a stack array of fields, or, when it has more, into one sized from
/// its lines, and hands the result to `f`.
fn parse_request<T>(
    buf: &[u8],
    f: impl FnOnce(&httparse::Request<'_, '_>, usize) -> T,
) -> Result<httparse::Status<T>, httparse::Error> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_FIELDS];
    let mut req = httparse::Request::new(&mut stack);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => return Ok(httparse::Status::Complete(f(&req, n))),
        Ok(httparse::Status::Partial) => return Ok(httparse::Status::Partial),
        Err(httparse::Error::TooManyHeaders) => {}
        Err(e) => return Err(e),
    }
    let lines = buf.iter().filter(|&&b| b == b'\n').count() + 1;
    let mut heap = vec![httparse::EMPTY_HEADER; lines];
    let mut req = httparse::Request::new(&mut heap);
    Ok(match req.parse(buf)? {
        httparse::Status::Complete(n) => httparse::Status::Complete(f(&req, n)),
        httparse::Status::Partial => httparse::Status::Partial,
    })
}

/// The response twin of `parse_request`.
fn parse_response<T>(
    buf: &[u8],
    f: impl FnOnce(&httparse::Response<'_, '_>, usize) -> T,
) -> Result<httparse::Status<T>, httparse::Error> {
    let mut stack = [httparse::EMPTY_HEADER; STACK_FIELDS];
    let mut res = httparse::Response::new(&mut stack);
    match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => return Ok(httparse::Status::Complete(f(&res, n))),
        Ok(httparse::Status::Partial) => return Ok(httparse::Status::Partial),
        Err(httparse::Error::TooManyHeaders) => {}
        Err(e) => return Err(e),
    }
    let lines = buf.iter().filter(|&&b| b == b'\n').count() + 1;
    let mut heap = vec![httparse::EMPTY_HEADER; lines];
    let mut res = httparse::Response::new(&mut heap);
    Ok(match res.parse(buf)? {
        httparse::Status::Complete(n) => httparse::Status::Complete(f(&res, n)),
        httparse::Status::Partial => httparse::Status::Partial,
    })
}

/// Parses a request head at the start of `buf` and writes the head to send to the app into `out`.
/// `buf` is mutable only for the HTTP/1.2..1.9 rewrite (see `downgrade_minor_version`). Pure: no I/O.
///
/// The head for the app: the request line in origin form with `HTTP/1.1` (the path in the form the
/// app resolves, with `normalize_path`: an ambiguous one is `plan.ambiguous`); the client's fields
/// in order and in their case (or lower-cased), less the hop-by-hop ones (`HTTP2-Settings`, and
/// `Upgrade`: an `Upgrade: h2c` stays here and is not passed on), those a `Connection` option
/// names, and the ones the proxy owns (`phases::add_forwarding`'s rule); Host replaced by the
/// absolute-form target's authority or by --rewrite-host; then, in this order, `TE: trailers` (when
/// the client's TE had it), `Transfer-Encoding` (every coding, chunked last), `X-Forwarded-For`
/// (the trusted end of the client's, then the client), `X-Forwarded-Proto: http` (unless a trusted
/// one came), `X-Forwarded-Client-Cert` for a verified peer, `X-Request-Id` (the client's if well
/// formed, else a new one), and `Via: 1.1 <via>` as a field line of its own after any the client
/// sent (RFC 9110 7.6.3 and 5.3: the same as one comma-joined list).
pub fn plan_request(
    buf: &mut [u8],
    rw: &Rewrite<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestPlan, RequestVerdict> {
    // The head's address: where a field lies in it is its value's address less this.
    let base = buf.as_ptr() as usize;
    let parsed = match parse_request(buf, |req, n| plan_parsed_request(req, n, base, rw, out)) {
        Err(httparse::Error::Version) if downgrade_minor_version(buf) => {
            parse_request(buf, |req, n| plan_parsed_request(req, n, base, rw, out))
        }
        parsed => parsed,
    };
    match parsed {
        Ok(httparse::Status::Complete(plan)) => plan,
        Ok(httparse::Status::Partial) => Err(RequestVerdict::Partial),
        // HTTP/2.0 or 0.9 in a request line, bad tokens, bare CR, obs-fold, control bytes.
        Err(_) => Err(RequestVerdict::Invalid),
    }
}

fn plan_parsed_request(
    req: &httparse::Request<'_, '_>,
    head_len: usize,
    base: usize,
    rw: &Rewrite<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestPlan, RequestVerdict> {
    use RequestVerdict::{Fallback, Invalid};
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(Invalid);
    };
    let http11 = minor == 1;
    // CONNECT's authority-form target is the hyper path's to check (RFC 9112 3.2.3).
    let connect = method == "CONNECT";
    let target = if connect {
        None
    } else {
        Some(parse_target(method, target)?)
    };
    let mut fields = scan_request_fields(req.headers, rw.via, http11)?;
    fields.hyper |= connect || !http11;
    let framing = request_framing(&fields, http11)?;
    let content = matches!(framing, Framing::Chunked | Framing::Length(1..));
    fields.hyper |= content && phases::content_means_nothing(method);
    // HTTP/1.0 (keep-alive rules), CONNECT, Upgrade (other than h2c), Expect, and content where
    // it means nothing (`phases::content_means_nothing`): the hyper path's.
    let Some(mut target) = target.filter(|_| !fields.hyper) else {
        return Err(Fallback);
    };
    let method_value = Method::from_bytes(method.as_bytes()).map_err(|_| Invalid)?;
    let normal = if rw.normalize_path {
        path::normalize(&target.origin).map(|p| match p {
            std::borrow::Cow::Owned(normal) => Some(normal),
            std::borrow::Cow::Borrowed(_) => None,
        })
    } else {
        Ok(None)
    };
    let ambiguous = match normal {
        Ok(Some(normal)) => {
            target.origin = normal.into();
            None
        }
        Ok(None) => None,
        Err(reason) => Some(reason),
    };
    let authority =
        (target.authority.map(|a| (a.as_ptr() as usize, a.len()))).or(fields.first_host);
    let authority_at = authority.and_then(|(at, len)| {
        let start = at.checked_sub(base)?;
        Some(start..start + len)
    });
    let (request_id, trace, grpc_timeout_at) =
        write_request_head(req.headers, method, &target, &mut fields, framing, rw, out);
    Ok(RequestPlan {
        authority_at,
        trace,
        head_len,
        method: method_value,
        path: target.origin.into_owned(),
        framing,
        keep_alive: fields.keep_alive,
        request_id,
        grpc: fields.grpc,
        ambiguous,
        // RFC 9110 7.6.3: our own pseudonym as a recipient means the request came round again.
        looped: fields.looped && !rw.via.is_empty(),
        // RFC 9112 3.2: exactly one valid Host in an HTTP/1.1 request.
        authority_valid: !fields.bad_host && (fields.hosts == 1 || !http11),
        grpc_timeout: fields.grpc_timeout.filter(|_| fields.grpc),
        grpc_timeout_at,
    })
}

/// What one pass over a request's fields found.
#[derive(Default)]
struct RequestFields {
    content_length: Option<u64>,
    codings: Codings,
    hosts: usize,
    /// The first Host's value: its address and length (see [`RequestPlan::authority_at`]).
    first_host: Option<(usize, usize)>,
    /// A Host field that is not a valid authority.
    bad_host: bool,
    keep_alive: bool,
    /// `Connection` names fields other than `close` and `keep-alive`.
    options: bool,
    /// The client's X-Request-Id fields: how many, and the first.
    request_ids: usize,
    request_id: Option<HeaderValue>,
    forwarded_for: bool,
    forwarded_proto: bool,
    te_trailers: bool,
    grpc: bool,
    /// The client's `grpc-timeout` fields: how many, and the first's value.
    grpc_timeouts: usize,
    grpc_timeout: Option<Duration>,
    /// Upgrade or Expect: the hyper path's.
    hyper: bool,
    looped: bool,
}

/// The request fields' checks, in one pass: one valid Host, one valid Content-Length, the codings,
/// and what the rewriting needs to know.
fn scan_request_fields(
    headers: &[httparse::Header<'_>],
    via: &str,
    http11: bool,
) -> Result<RequestFields, RequestVerdict> {
    use RequestVerdict::Invalid;
    let mut f = RequestFields {
        keep_alive: http11,
        ..RequestFields::default()
    };
    for h in headers {
        match Field::of(h.name) {
            Field::ContentLength => {
                // Two Content-Length fields are rejected even when equal (RFC 9110 8.6 allows
                // either; nginx rejects too): one framing field, or none.
                if f.content_length.is_some() {
                    return Err(Invalid);
                }
                f.content_length = Some(parse_length(h.value).ok_or(Invalid)?);
            }
            Field::TransferEncoding => f.codings.add(h.value),
            Field::Host => {
                // RFC 9112 3.2: one Host, with a valid value (judged by the driver).
                f.hosts += 1;
                f.bad_host |= !phases::valid_host(h.value, false);
                if f.first_host.is_none() {
                    f.first_host = Some((h.value.as_ptr() as usize, h.value.len()));
                }
            }
            Field::Connection => {
                f.keep_alive &= !says_close(h.value);
                f.options |= phases::tokens(h.value).any(|o| {
                    !o.eq_ignore_ascii_case(b"close") && !o.eq_ignore_ascii_case(b"keep-alive")
                });
            }
            Field::Te => {
                f.te_trailers |=
                    phases::tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
            }
            // An h2c upgrade is not one: the request goes on as plain HTTP/1.1, here.
            Field::Upgrade => f.hyper |= phases::tokens(h.value).any(|p| !phases::is_h2c(p)),
            Field::Expect => f.hyper = true,
            Field::XForwardedFor => f.forwarded_for = true,
            Field::XForwardedProto => f.forwarded_proto = true,
            Field::XRequestId => {
                f.request_ids += 1;
                if f.request_ids == 1 && phases::valid_request_id(h.value) {
                    f.request_id = HeaderValue::from_bytes(h.value).ok();
                }
            }
            Field::ContentType => f.grpc = phases::is_grpc(Some(h.value)),
            Field::GrpcTimeout => {
                f.grpc_timeouts += 1;
                if f.grpc_timeouts == 1 {
                    f.grpc_timeout = phases::parse_grpc_timeout(h.value);
                }
            }
            Field::Via => f.looped |= phases::via_names(h.value, via),
            Field::GrpcStatus | Field::KeepAlive | Field::ProxyConnection => {}
            Field::Forwarded | Field::Http2Settings | Field::XForwardedClientCert => {}
            Field::Server | Field::Other => {}
            Field::Traceparent | Field::Tracestate | Field::B3 => {}
            Field::XB3TraceId | Field::XB3SpanId => {}
            Field::XB3Sampled | Field::XB3Flags => {}
        }
    }
    Ok(f)
}

/// The request's framing from its fields.
fn request_framing(f: &RequestFields, http11: bool) -> Result<Framing, RequestVerdict> {
    if f.codings.present {
        // RFC 9112 6.1: Transfer-Encoding is HTTP/1.1 only, chunked at most once (RFC 9112
        // 6.1), and last in a request (6.3 item 4: else 400); with Content-Length it is a
        // smuggling attempt we may and do reject (6.1, 6.3 item 3) rather than forward both.
        if !http11
            || f.codings.malformed
            || f.codings.chunked_count != 1
            || !f.codings.last_is_chunked
            || f.content_length.is_some()
        {
            return Err(RequestVerdict::Invalid);
        }
        return Ok(Framing::Chunked);
    }
    Ok(match f.content_length {
        None | Some(0) => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// The request phase on raw fields: the head for the app, hop-by-hop fields and the fields the
/// client's `Connection` names removed, Host from the target (or --rewrite-host), then the fields
/// the proxy owns and Via. Returns the request id, the span when tracing is on, and where the
/// client's `grpc-timeout` lines lie in `out` (see [`RequestPlan::grpc_timeout_at`]).
fn write_request_head(
    headers: &[httparse::Header<'_>],
    method: &str,
    target: &Target<'_>,
    f: &mut RequestFields,
    framing: Framing,
    rw: &Rewrite<'_>,
    out: &mut Vec<u8>,
) -> (HeaderValue, Option<SpanIds>, Range<usize>) {
    let options = if f.options {
        connection_options(headers)
    } else {
        None
    };
    let lower = rw.lowercase_names;
    let host = rw.host.or(target.authority);
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.origin.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let trusted = rw.trusted_hops > 0;
    let mut parent = ParentFields {
        tunnel: rw.tunnel_parent,
        ..ParentFields::default()
    };
    let mut tracestate = Vec::new();
    let mut grpc_timeout_at = None;
    for h in headers {
        let field = Field::of(h.name);
        // The fields the proxy owns: written below, the client's kept only as `add_forwarding`
        // says (the same rule as the hyper path's), and never under another spelling.
        let owned = match field {
            Field::XForwardedFor | Field::XForwardedClientCert | Field::XRequestId => true,
            Field::XForwardedProto | Field::Forwarded => !trusted,
            Field::Other => phases::aliases_protected_field(h.name.as_bytes()),
            _ => false,
        };
        if owned || field.is_hop_by_hop() {
            continue;
        }
        if !field.is_protected() && listed(options.as_deref(), h.name) {
            continue;
        }
        // With tracing on, `traceparent` is replaced and `tracestate` follows it (below).
        if rw.sampler.is_some() {
            if field == Field::Tracestate {
                tracestate.push(h.value);
                continue;
            }
            if trace_field(&mut parent, field, h.value) {
                continue;
            }
        }
        match (field, host) {
            (Field::Host, Some(host)) => push_field(out, "Host", host.as_bytes(), lower),
            // All of them where the first was: one range for a route's deadline to replace (one
            // left behind could tell the app more time than is left).
            (Field::GrpcTimeout, _) if grpc_timeout_at.is_none() => {
                grpc_timeout_at = Some(push_grpc_timeouts(out, headers, f.grpc_timeouts, lower));
            }
            (Field::GrpcTimeout, _) => {}
            _ => push_field(out, h.name, h.value, lower),
        }
    }
    if f.te_trailers {
        // gRPC needs `TE: trailers` end to end; other TE codings are hop-by-hop.
        push_field(out, Field::Te.name(), b"trailers", lower);
    }
    if framing == Framing::Chunked {
        push_codings(out, headers, lower);
    }
    push_name(out, Field::XForwardedFor.name(), lower);
    out.extend_from_slice(b": ");
    if trusted && f.forwarded_for {
        let values = || {
            headers
                .iter()
                .filter(|h| Field::of(h.name) == Field::XForwardedFor)
                .map(|h| h.value)
        };
        for hop in phases::trusted_forwarded_for(values, rw.trusted_hops) {
            out.extend_from_slice(hop);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(rw.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !trusted || !f.forwarded_proto {
        push_field(out, Field::XForwardedProto.name(), b"http", lower);
    }
    if let Some(details) = rw.client_cert {
        push_field(out, Field::XForwardedClientCert.name(), details, lower);
    }
    // One X-Request-Id: the client's when it sent one well-formed field, else a new one.
    let request_id = match f.request_id.take().filter(|_| f.request_ids == 1) {
        Some(id) => id,
        None => new_request_id(),
    };
    push_field(out, Field::XRequestId.name(), request_id.as_bytes(), lower);
    let trace = rw.sampler.map(|sampler| sampler.start_for(&parent));
    if let Some(ids) = &trace {
        push_field(out, Field::Traceparent.name(), &ids.traceparent(), lower);
        // The caller's tracestate goes on only with the W3C trace it belongs to.
        if parent.continues_w3c() {
            for value in tracestate {
                push_field(out, Field::Tracestate.name(), value, lower);
            }
        }
    }
    push_name(out, Field::Via.name(), lower);
    out.extend_from_slice(b": 1.1 ");
    out.extend_from_slice(rw.via.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    // None came: one goes before the head's empty line.
    let end = out.len() - 2;
    (request_id, trace, grpc_timeout_at.unwrap_or(end..end))
}

/// Writes the client's `n` `grpc-timeout` fields, in their order; returns where they lie in `out`.
fn push_grpc_timeouts(
    out: &mut Vec<u8>,
    headers: &[httparse::Header<'_>],
    n: usize,
    lower: bool,
) -> Range<usize> {
    let start = out.len();
    let fields = headers
        .iter()
        .filter(|h| Field::of(h.name) == Field::GrpcTimeout);
    for h in fields.take(n) {
        push_field(out, h.name, h.value, lower);
    }
    start..out.len()
}

/// Replaces the `grpc-timeout` lines at `at` in a request head written by [`plan_request`] (the
/// client's, or none: `at` is then empty) with one telling the app `value`, and moves `at` onto it.
/// Only for a gRPC request on a route with a deadline: each attempt is told the time left.
pub fn set_grpc_timeout(head: &mut Vec<u8>, at: &mut Range<usize>, value: &[u8]) {
    let name = phases::GRPC_TIMEOUT.as_bytes();
    let len = name.len() + 2 + value.len() + 2;
    // Of exact size, so that the splice moves the rest of the head once.
    let line = name.iter().chain(b": ").chain(value).chain(b"\r\n");
    head.splice(at.clone(), line.copied());
    *at = at.start..at.start + len;
}

/// Notes a trace-context field in `parent`; returns whether the field is not to be passed on (the
/// caller's `traceparent`: ours replaces it). A field sent twice is read as malformed (W3C).
fn trace_field<'h>(parent: &mut ParentFields<'h>, field: Field, value: &'h [u8]) -> bool {
    let slot = match field {
        Field::Traceparent => &mut parent.traceparent,
        Field::B3 => &mut parent.b3,
        Field::XB3TraceId => &mut parent.x_b3_trace_id,
        Field::XB3SpanId => &mut parent.x_b3_span_id,
        Field::XB3Sampled => &mut parent.x_b3_sampled,
        Field::XB3Flags => &mut parent.x_b3_flags,
        _ => return false,
    };
    *slot = if slot.is_some() {
        Some(b"")
    } else {
        Some(value)
    };
    field == Field::Traceparent
}

/// The app's response head cannot be parsed or framed: 502.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidResponse;

#[derive(Debug, PartialEq, Eq)]
pub struct ResponsePlan {
    pub head_len: usize,
    pub status: u16,
    /// An interim (1xx) response to skip: the app sent `100 Continue` unasked.
    pub interim: bool,
    pub framing: Framing,
    /// The app's connection can carry another request afterwards: false whenever anything about
    /// the response is odd, so that a confused app never answers the next client.
    pub upstream_reusable: bool,
    /// The client's connection stays open afterwards.
    pub keep_alive: bool,
    pub grpc_status: Option<u16>,
}

/// Parses the app's response head and writes the head for the client into `out`: hop-by-hop
/// fields and those a `Connection` option names removed (never the framing), names in their case
/// (or lower-cased), `Content-Length` dropped when `Transfer-Encoding` is there, then `Server:
/// amazing-proxy`, `Transfer-Encoding` with every coding, and `Connection: close` when the client's
/// connection ends with this response. `Ok(None)` while more bytes are needed. Pure: no I/O.
pub fn plan_response(
    buf: &[u8],
    head_request: bool,
    keep_alive: bool,
    lowercase_names: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponsePlan>, InvalidResponse> {
    let parsed = parse_response(buf, |res, n| {
        plan_parsed_response(res, n, head_request, keep_alive, lowercase_names, out)
    });
    match parsed {
        Ok(httparse::Status::Complete(plan)) => plan.map(Some),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(InvalidResponse),
    }
}

/// Whether the app, answering before it has the whole request body, has said it will read no more
/// of it (RFC 9112 9.5: a response that shows the server does not wish to receive the body and is
/// closing the connection; the sender then ceases to send it): `Some(true)` once its final
/// response head (after any interim ones) is in `buf` and is an error (4xx, 5xx) that ends the
/// connection (`Connection: close`, or HTTP/1.0), or is no valid head at all; `Some(false)` for any
/// other final head (a success, or an error that keeps the connection: the app may read on);
/// `None` while no final head is complete. Pure.
pub fn early_answer_ends_request(mut buf: &[u8]) -> Option<bool> {
    loop {
        let parsed = parse_response(buf, |res, n| {
            let status = res.code.unwrap_or(0);
            let closes = res.version != Some(1)
                || (res.headers.iter())
                    .any(|h| Field::of(h.name) == Field::Connection && says_close(h.value));
            (status, closes, n)
        });
        match parsed {
            Err(_) => return Some(true),
            Ok(httparse::Status::Partial) => return None,
            // An interim answer (100 Continue): the final one follows.
            Ok(httparse::Status::Complete((status, _, n)))
                if (100..200).contains(&status) && status != 101 =>
            {
                buf = &buf[n..];
            }
            Ok(httparse::Status::Complete((status, closes, _))) => {
                return Some(closes && status >= 400);
            }
        }
    }
}

fn plan_parsed_response(
    res: &httparse::Response<'_, '_>,
    head_len: usize,
    head_request: bool,
    keep_alive: bool,
    lower: bool,
    out: &mut Vec<u8>,
) -> Result<ResponsePlan, InvalidResponse> {
    let status = res.code.ok_or(InvalidResponse)?;
    // RFC 9110 15: a status below 100 is invalid (600..999 are taken as they come).
    if status < 100 {
        return Err(InvalidResponse);
    }
    let http11 = res.version == Some(1);
    if status == 101 {
        // Never asked for on this path (upgrades go to hyper).
        return Err(InvalidResponse);
    }
    if (100..200).contains(&status) {
        return Ok(ResponsePlan {
            head_len,
            status,
            interim: true,
            framing: Framing::None,
            upstream_reusable: http11,
            keep_alive,
            grpc_status: None,
        });
    }
    let mut content_length = None;
    let mut codings = Codings::default();
    let mut odd = !http11;
    let mut options = false;
    let mut grpc_status = None;
    for h in res.headers.iter() {
        match Field::of(h.name) {
            Field::ContentLength => {
                // RFC 9110 8.6 / RFC 9112 6.3 item 5: differing values are unrecoverable; equal
                // ones are taken, but the connection is not trusted with another request.
                let len = parse_length(h.value).ok_or(InvalidResponse)?;
                if content_length.is_some_and(|prev| prev != len) {
                    return Err(InvalidResponse);
                }
                odd |= content_length.is_some();
                content_length = Some(len);
            }
            Field::TransferEncoding => codings.add(h.value),
            Field::Connection => {
                odd |= says_close(h.value);
                options |= phases::tokens(h.value).any(|o| {
                    !o.eq_ignore_ascii_case(b"close") && !o.eq_ignore_ascii_case(b"keep-alive")
                });
            }
            Field::GrpcStatus => {
                grpc_status = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
    let mut framing = if codings.present {
        // RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; chunked at most once.
        if !http11 || codings.malformed || codings.chunked_count > 1 {
            return Err(InvalidResponse);
        }
        // RFC 9112 6.3 item 3: Transfer-Encoding overrides Content-Length (dropped below); such a
        // response is a smuggling sign, so the connection is not reused.
        odd |= content_length.is_some();
        if codings.last_is_chunked {
            Framing::Chunked
        } else {
            // 6.3 item 4: a final coding other than chunked: the body ends at close.
            Framing::UntilClose
        }
    } else {
        match content_length {
            Some(n) => Framing::Length(n),
            // 6.3 item 8: neither: the body ends at close.
            None => Framing::UntilClose,
        }
    };
    // 6.3 item 1: no body after HEAD, 204 or 304, whatever the fields say.
    if head_request || status == 204 || status == 304 || framing == Framing::Length(0) {
        framing = Framing::None;
    }
    let upstream_reusable = !odd && framing != Framing::UntilClose;
    let keep_alive = keep_alive && framing != Framing::UntilClose;

    write_response_head(
        res,
        status,
        options,
        codings.present,
        keep_alive,
        lower,
        out,
    );
    Ok(ResponsePlan {
        head_len,
        status,
        interim: false,
        framing,
        upstream_reusable,
        keep_alive,
        grpc_status,
    })
}

/// The response phase on raw fields: the head for the client, hop-by-hop fields and the fields the
/// app's `Connection` names removed (never the framing), `Content-Length` dropped when the body is
/// chunked, our `Server`, and `Connection: close` when the client's connection ends here.
fn write_response_head(
    res: &httparse::Response<'_, '_>,
    status: u16,
    options: bool,
    chunked_codings: bool,
    keep_alive: bool,
    lower: bool,
    out: &mut Vec<u8>,
) {
    let options = if options {
        connection_options(res.headers)
    } else {
        None
    };
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        let field = Field::of(h.name);
        if field.is_hop_by_hop()
            || field == Field::Server
            || (field == Field::ContentLength && chunked_codings)
            || (!field.is_protected() && listed(options.as_deref(), h.name))
        {
            continue;
        }
        push_field(out, h.name, h.value, lower);
    }
    push_field(out, Field::Server.name(), b"amazing-proxy", lower);
    if chunked_codings {
        push_codings(out, res.headers, lower);
    }
    if !keep_alive {
        push_field(out, Field::Connection.name(), b"close", lower);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIA: &str = "amazing-proxy-1a2b3c4d";

    fn rewrite() -> Rewrite<'static> {
        Rewrite {
            lowercase_names: false,
            host: None,
            client_ip: "198.18.0.1",
            via: VIA,
            normalize_path: true,
            trusted_hops: 0,
            client_cert: None,
            sampler: None,
            tunnel_parent: None,
        }
    }

    fn plan_with(input: &str, rw: &Rewrite<'_>) -> (Result<RequestPlan, RequestVerdict>, String) {
        let mut buf = input.as_bytes().to_vec();
        let mut out = Vec::new();
        let r = plan_request(&mut buf, rw, &mut out);
        (r, String::from_utf8(out).expect("utf8"))
    }

    fn plan(input: &str) -> (RequestPlan, String) {
        let (r, out) = plan_with(input, &rewrite());
        (r.unwrap_or_else(|v| panic!("{v:?} for {input:?}")), out)
    }

    fn verdict(input: &str) -> Option<RequestVerdict> {
        plan_with(input, &rewrite()).0.err()
    }

    fn assert_invalid(inputs: &[&str]) {
        for input in inputs {
            assert_eq!(verdict(input), Some(RequestVerdict::Invalid), "{input:?}");
        }
    }

    /// What the proxy appends to every request it forwards, after `extra`.
    fn tail(extra: &str, request_id: &str) -> String {
        format!(
            "{extra}X-Forwarded-For: 198.18.0.1\r\nX-Forwarded-Proto: http\r\nX-Request-Id: {request_id}\r\nVia: 1.1 {VIA}\r\n\r\n"
        )
    }

    #[test]
    fn an_early_answer_ends_the_request_only_when_it_is_an_error_that_says_close() {
        let close =
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(early_answer_ends_request(close), Some(true));
        let keep = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(early_answer_ends_request(keep), Some(false));
        assert_eq!(
            early_answer_ends_request(b"HTTP/1.0 403 Forbidden\r\n\r\n"),
            Some(true)
        );
        // A success that says close: the app may still read the body before it closes.
        let success = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nstarted ";
        assert_eq!(early_answer_ends_request(success), Some(false));
        assert_eq!(
            early_answer_ends_request(b"HTTP/1.0 200 OK\r\n\r\n"),
            Some(false)
        );
        assert_eq!(early_answer_ends_request(b"HTTP/1.1 413 Too"), None);
        assert_eq!(early_answer_ends_request(b""), None);
        assert_eq!(
            early_answer_ends_request(b"\x00garbage\r\n\r\n"),
            Some(true)
        );
        // Past interim answers to the final one.
        let mut interim = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        assert_eq!(early_answer_ends_request(&interim), None);
        interim.extend_from_slice(close);
        assert_eq!(early_answer_ends_request(&interim), Some(true));
        let mut interim = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
        interim.extend_from_slice(keep);
        assert_eq!(early_answer_ends_request(&interim), Some(false));
    }

    #[test]
    fn field_names_are_recognised_whatever_their_case_and_only_whole() {
        for field in [
            Field::Connection,
            Field::ContentLength,
            Field::ContentType,
            Field::Expect,
            Field::Forwarded,
            Field::GrpcStatus,
            Field::GrpcTimeout,
            Field::Http2Settings,
            Field::Host,
            Field::KeepAlive,
            Field::ProxyConnection,
            Field::Server,
            Field::Te,
            Field::TransferEncoding,
            Field::Upgrade,
            Field::Via,
            Field::XForwardedClientCert,
            Field::XForwardedFor,
            Field::XForwardedProto,
            Field::XRequestId,
            Field::Traceparent,
            Field::Tracestate,
            Field::B3,
            Field::XB3TraceId,
            Field::XB3SpanId,
            Field::XB3Sampled,
            Field::XB3Flags,
        ] {
            let name = field.name();
            assert_eq!(Field::of(name), field, "{name}");
            assert_eq!(Field::of(&name.to_ascii_uppercase()), field, "{name}");
            assert_eq!(Field::of(&name.to_ascii_lowercase()), field, "{name}");
            // Same length, one letter off.
            let mut other = name.to_ascii_lowercase().into_bytes();
            let last = other.len() - 1;
            other[last] = if other[last] == b'q' { b'r' } else { b'q' };
            let other = String::from_utf8(other).expect("ascii");
            assert_eq!(Field::of(&other), Field::Other, "{other}");
        }
    }

    /// A request in an HBONE tunnel that names no parent is a child of the tunnel's span (as on
    /// the hyper path); one that names its own keeps it.
    #[test]
    fn a_tunnelled_request_without_a_parent_is_a_child_of_the_tunnels_span() {
        let tunnel = Parent {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x00f067aa0ba902b7,
            sampled: Some(true),
        };
        let rw = Rewrite {
            sampler: Some(&Sampler::NEVER),
            tunnel_parent: Some(tunnel),
            ..rewrite()
        };
        let (p, _) = plan_with("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &rw);
        let ids = p.expect("plan").trace.expect("a span");
        assert_eq!(ids.trace_id, tunnel.trace_id);
        assert_eq!(ids.parent_span_id, Some(tunnel.span_id));
        assert!(ids.sampled, "the tunnel's decision is kept");
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        let (p, _) = plan_with(
            &format!("GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {caller}\r\n\r\n"),
            &rw,
        );
        let ids = p.expect("plan").trace.expect("a span");
        assert_eq!(ids.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(ids.parent_span_id, Some(0xb7ad6b7169203331));
    }

    #[test]
    fn with_tracing_on_the_callers_traceparent_is_replaced_by_a_child_of_it() {
        let rw = Rewrite {
            sampler: Some(&Sampler::NEVER),
            ..rewrite()
        };
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {caller}\r\ntracestate: k=v\r\nX-Request-Id: r\r\n\r\n"
        );
        let (p, out) = plan_with(&head, &rw);
        let ids = p.expect("plan").trace.expect("a span");
        assert_eq!(ids.trace_id, 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(ids.parent_span_id, Some(0xb7ad6b7169203331));
        assert!(ids.sampled, "the caller's decision is kept");
        let ours = ids.traceparent_string();
        assert_eq!(
            out,
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\n{}",
                tail("", "r").replace(
                    "Via:",
                    &format!("traceparent: {ours}\r\ntracestate: k=v\r\nVia:")
                )
            )
        );
        // Without a caller's context: a new trace, sampled by the ratio.
        let (p, out) = plan_with("GET / HTTP/1.1\r\nHost: a\r\n\r\n", &rw);
        let ids = p.expect("plan").trace.expect("a span");
        assert_eq!((ids.parent_span_id, ids.sampled), (None, false));
        assert!(out.contains(&format!("traceparent: {}\r\n", ids.traceparent_string())));
        // B3 is read, and passed on as it came.
        let b3 = "GET / HTTP/1.1\r\nHost: a\r\nX-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\nX-B3-SpanId: e457b5a2e4d86bd1\r\nX-B3-Sampled: 1\r\n\r\n";
        let (p, out) = plan_with(b3, &rw);
        let ids = p.expect("plan").trace.expect("a span");
        assert_eq!(ids.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(ids.parent_span_id, Some(0xe457b5a2e4d86bd1));
        assert!(ids.sampled);
        assert!(out.contains("X-B3-SpanId: e457b5a2e4d86bd1\r\n"), "{out}");
        // Two traceparents: neither is believed; neither is passed on.
        let twice = format!(
            "GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {caller}\r\ntracestate: k=v\r\ntraceparent: {caller}\r\n\r\n"
        );
        let (p, out) = plan_with(&twice, &rw);
        let ids = p.expect("plan").trace.expect("a span");
        assert_eq!(ids.parent_span_id, None);
        assert_eq!(out.matches("traceparent").count(), 1, "{out}");
        // A new trace: the caller's tracestate belongs to another.
        assert!(!out.contains("tracestate"), "{out}");
        // A field the client's Connection names is gone before the trace phase reads it, as on
        // the hyper path.
        let listed = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: traceparent\r\ntraceparent: {caller}\r\n\r\n"
        );
        let (p, _) = plan_with(&listed, &rw);
        assert_eq!(p.expect("plan").trace.and_then(|t| t.parent_span_id), None);
    }

    #[test]
    fn with_tracing_off_trace_context_passes_untouched() {
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let head = format!("GET / HTTP/1.1\r\nHost: a\r\ntraceparent: {caller}\r\n\r\n");
        let (p, out) = plan(&head);
        assert!(p.trace.is_none());
        assert!(out.contains(&format!("traceparent: {caller}\r\n")), "{out}");
    }

    #[test]
    fn request_head_is_rewritten_for_the_app() {
        let head = "GET /get?query=param HTTP/1.1\r\nHost: pod\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\ntraceparent: 00-1-2-01\r\nX-Request-Id: given\r\n\r\n";
        let (p, out) = plan(&format!("{head}NEXT"));
        assert_eq!(p.head_len, head.len());
        assert_eq!(p.framing, Framing::None);
        assert!(p.keep_alive);
        assert!(!p.grpc);
        assert_eq!(p.request_id, "given");
        assert_eq!(p.path, "/get?query=param");
        assert_eq!(
            out,
            format!(
                "GET /get?query=param HTTP/1.1\r\nHost: pod\r\ntraceparent: 00-1-2-01\r\n{}",
                tail("TE: trailers\r\n", "given")
            )
        );
    }

    #[test]
    fn names_keep_their_case_or_are_lowered_and_host_is_rewritten() {
        let input = "POST /post HTTP/1.1\r\nhost: pod\r\nX-Custom-Header: A\r\nX-Forwarded-For: 203.0.113.9\r\nx-forwarded-proto: https\r\ncontent-length: 4\r\nConnection: close\r\n\r\n";
        let trusted = Rewrite {
            trusted_hops: 1,
            ..rewrite()
        };
        let (p, out) = plan_with(input, &trusted);
        let p = p.expect("plan");
        assert_eq!(p.framing, Framing::Length(4));
        assert!(!p.keep_alive);
        assert!(
            out.starts_with("POST /post HTTP/1.1\r\nhost: pod\r\nX-Custom-Header: A\r\nx-forwarded-proto: https\r\ncontent-length: 4\r\nX-Forwarded-For: 203.0.113.9, 198.18.0.1\r\nX-Request-Id: "),
            "{out}"
        );
        let rw = Rewrite {
            lowercase_names: true,
            host: Some("127.0.0.1:80"),
            ..trusted
        };
        let (r, out) = plan_with(input, &rw);
        r.expect("plan");
        assert!(
            out.starts_with("POST /post HTTP/1.1\r\nhost: 127.0.0.1:80\r\nx-custom-header: A\r\nx-forwarded-proto: https\r\ncontent-length: 4\r\nx-forwarded-for: 203.0.113.9, 198.18.0.1\r\nx-request-id: "),
            "{out}"
        );
        assert!(out.ends_with(&format!("via: 1.1 {VIA}\r\n\r\n")), "{out}");
    }

    /// --trusted-hops N keeps the last N entries of all X-Forwarded-For fields, in order; by
    /// default the client's own are dropped, as are its X-Forwarded-Proto and Forwarded.
    #[test]
    fn forwarding_fields_follow_the_trusted_hops() {
        let input = "GET / HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\nHost: a\r\nx-forwarded-for: 203.0.113.10, ,203.0.113.11\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.11\r\nX-Request-Id: r\r\n\r\n";
        let (_, out) = plan(input);
        assert_eq!(
            out,
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}", tail("", "r"))
        );
        for (hops, chain) in [
            (1, "203.0.113.11"),
            (2, "203.0.113.10, 203.0.113.11"),
            (9, "203.0.113.9, 203.0.113.10, 203.0.113.11"),
        ] {
            let rw = Rewrite {
                trusted_hops: hops,
                ..rewrite()
            };
            let (r, out) = plan_with(input, &rw);
            r.expect("plan");
            assert_eq!(
                out,
                format!(
                    "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.11\r\nX-Forwarded-For: {chain}, 198.18.0.1\r\nX-Request-Id: r\r\nVia: 1.1 {VIA}\r\n\r\n"
                ),
                "{hops}"
            );
        }
    }

    /// x-forwarded-client-cert is the proxy's: the client's never passes, a verified peer's is
    /// set; a request id is kept only when well formed and alone.
    #[test]
    fn client_cert_and_request_id_are_the_proxys() {
        let input = "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Client-Cert: By=x;URI=spiffe://cluster.local/ns/a/sa/admin\r\nx-forwarded-client-cert: forged\r\nX-Request-Id: r\r\n\r\n";
        let (_, out) = plan(input);
        assert_eq!(
            out,
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}", tail("", "r"))
        );
        let rw = Rewrite {
            client_cert: Some(b"By=spiffe://td/ns/a/sa/b;URI=spiffe://td/ns/c/sa/d"),
            ..rewrite()
        };
        let (_, out) = plan_with(input, &rw);
        assert!(
            out.contains("\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Client-Cert: By=spiffe://td/ns/a/sa/b;URI=spiffe://td/ns/c/sa/d\r\nX-Request-Id: r\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("-Client-Cert").count(), 1, "{out}");
        for ids in [
            "X-Request-Id: a b\r\n",
            "X-Request-Id: \r\n",
            "X-Request-Id: r\r\nX-Request-Id: r\r\n",
        ] {
            let (p, out) = plan(&format!("GET / HTTP/1.1\r\nHost: a\r\n{ids}\r\n"));
            let id = p.request_id.to_str().expect("text");
            assert_eq!(id.len(), 36, "{ids:?}");
            assert_eq!(out.matches("X-Request-Id").count(), 1, "{out}");
            assert!(
                out.contains(&format!("\r\nX-Request-Id: {id}\r\n")),
                "{out}"
            );
        }
    }

    /// `Upgrade: h2c` is not an upgrade: the request stays here and goes on as plain HTTP/1.1
    /// (Upgrade, Connection and HTTP2-Settings are hop-by-hop); any other protocol is hyper's.
    #[test]
    fn h2c_upgrades_are_not_passed_on() {
        let (_, out) = plan(
            "GET /public HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nX-Request-Id: r\r\n\r\n",
        );
        assert_eq!(
            out,
            format!("GET /public HTTP/1.1\r\nHost: a\r\n{}", tail("", "r"))
        );
        assert_eq!(
            verdict(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c, websocket\r\n\r\n"
            ),
            Some(RequestVerdict::Fallback)
        );
    }

    /// Inbound paths are brought to the form the app resolves (`path::normalize`), which is what
    /// the app gets; an ambiguous one is flagged (the caller answers 400); outbound ones pass.
    #[test]
    fn paths_in_the_form_the_app_resolves() {
        let (p, out) = plan("GET /public/./a/../%7Eb?x=/../y HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(p.path, "/public/~b?x=/../y");
        assert!(
            out.starts_with("GET /public/~b?x=/../y HTTP/1.1\r\n"),
            "{out}"
        );
        assert_eq!(p.ambiguous, None);
        let (p, _) = plan("GET http://x/a/../b HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(p.path, "/b");
        for (target, reason) in [
            ("/public/..;/admin", Ambiguous::DotSegmentParameter),
            ("/public/%2e%2e/admin", Ambiguous::EncodedDot),
            ("/public/%252e%252e/admin", Ambiguous::EncodedPercent),
            ("/public/%c0%ae%c0%ae/admin", Ambiguous::InvalidUtf8),
            ("/public/%u002e%u002e/admin", Ambiguous::PercentU),
            ("/public/..%09/admin", Ambiguous::Control),
            ("/../admin", Ambiguous::AboveRoot),
        ] {
            let (p, _) = plan(&format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n"));
            assert_eq!(p.ambiguous, Some(reason), "{target}");
            assert_eq!(p.path, target, "the log shows the path as it came");
        }
        let outbound = Rewrite {
            normalize_path: false,
            ..rewrite()
        };
        let (p, out) = plan_with("GET /a%2Fb/../c HTTP/1.1\r\nHost: a\r\n\r\n", &outbound);
        let p = p.expect("plan");
        assert_eq!((p.path.as_str(), p.ambiguous), ("/a%2Fb/../c", None));
        assert!(out.starts_with("GET /a%2Fb/../c HTTP/1.1\r\n"), "{out}");
    }

    /// Rule 1 (issue 9, defect 1): a `Connection` option never removes the framing, Host or
    /// the fields the proxy sets; any number of options is taken (RFC 9110 7.6.1).
    #[test]
    fn connection_options_never_remove_framing_or_host() {
        let (p, out) = plan(
            "POST /a HTTP/1.1\r\nHost: a\r\nConnection: content-length, host, via, x-request-id, x-forwarded-for, transfer-encoding, x-forwarded-proto, forwarded\r\nContent-Length: 35\r\nVia: 1.0 other\r\nX-Request-Id: r\r\nX-Forwarded-Proto: https\r\nForwarded: proto=https\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Length(35));
        assert_eq!(
            out,
            format!(
                "POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 35\r\nVia: 1.0 other\r\n{}",
                tail("", "r")
            )
        );
        let options: Vec<String> = (0..200).map(|i| format!("x-o{i}")).collect();
        let fields: String = (0..200).map(|i| format!("X-O{i}: v\r\n")).collect();
        let (_, out) = plan(&format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: {}\r\n{fields}X-Kept: 1\r\nX-Request-Id: r\r\n\r\n",
            options.join(", ")
        ));
        assert_eq!(
            out,
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Kept: 1\r\n{}",
                tail("", "r")
            )
        );
    }

    /// Rule 5: Content-Length is 1*DIGIT with OWS around it (RFC 9110 8.6), once, never with
    /// Transfer-Encoding (RFC 9112 6.1, 6.3 item 3).
    #[test]
    fn content_length_is_strict() {
        let (p, _) = plan("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \t 5 \t\r\n\r\n");
        assert_eq!(p.framing, Framing::Length(5));
        let (p, _) = plan("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(p.framing, Framing::None);
        let (p, _) =
            plan("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 00018446744073709551615\r\n\r\n");
        assert_eq!(p.framing, Framing::Length(u64::MAX));
        assert_invalid(&[
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\u{a0}\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5,5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]);
        let mut raw = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\x85\r\n\r\n".to_vec();
        assert_eq!(
            plan_request(&mut raw, &rewrite(), &mut Vec::new()).err(),
            Some(RequestVerdict::Invalid)
        );
    }

    /// Rule 6: one valid Host in HTTP/1.1 (RFC 9112 3.2); absolute form becomes origin form with
    /// the target's authority as Host (3.2.2), --rewrite-host winning.
    #[test]
    fn host_rules() {
        for host in [
            "a",
            "a.example:8080",
            "198.18.0.1:80",
            "[::1]",
            "[2001:db8::1]:443",
            "xn--bcher-kva.example",
            "",
        ] {
            let (p, _) = plan(&format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"));
            assert_eq!(p.path, "/", "{host}");
        }
        // Read whole, then refused by the driver (400, with the request's record).
        for input in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET http://x/p HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a:80:80\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a%2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a%20b\r\n\r\n",
        ] {
            let (p, _) = plan(input);
            assert!(!p.authority_valid, "{input:?}");
        }
        assert_invalid(&["GET http://x%807/ HTTP/1.1\r\nHost: x\r\n\r\n"]);
        let mut raw = b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n".to_vec();
        assert_eq!(
            plan_request(&mut raw, &rewrite(), &mut Vec::new()).err(),
            Some(RequestVerdict::Invalid)
        );

        let (p, out) =
            plan("GET http://x:8080/p?q HTTP/1.1\r\nHost: other\r\nX-Request-Id: r\r\n\r\n");
        assert_eq!(p.path, "/p?q");
        assert_eq!(
            out,
            format!("GET /p?q HTTP/1.1\r\nHost: x:8080\r\n{}", tail("", "r"))
        );
        for (target, method, path) in [
            ("HTTPS://x", "GET", "/"),
            ("http://x?q", "GET", "/?q"),
            ("http://x", "OPTIONS", "*"),
            ("http://x/", "OPTIONS", "/"),
            ("*", "OPTIONS", "*"),
        ] {
            let (p, out) = plan(&format!("{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n"));
            assert_eq!(p.path, path, "{target}");
            assert!(
                out.starts_with(&format!("{method} {path} HTTP/1.1\r\nHost: x\r\n")),
                "{out}"
            );
        }
        let rw = Rewrite {
            host: Some("127.0.0.1:8080"),
            ..rewrite()
        };
        let (r, out) = plan_with("GET http://x/p HTTP/1.1\r\nHost: x\r\n\r\n", &rw);
        assert_eq!(r.expect("plan").path, "/p");
        assert!(
            out.starts_with("GET /p HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"),
            "{out}"
        );
        assert_invalid(&[
            "GET ftp://x/p HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http:/x/p HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http:///p HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://u@x/p HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET x/p HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x/p#f HTTP/1.1\r\nHost: x\r\n\r\n",
        ]);
    }

    /// The target bytes `http::Uri` takes, so that both paths agree (found by the differential
    /// fuzzer: hyper refused "/`", which we forwarded).
    #[test]
    fn target_bytes() {
        for target in [
            "/a-b_c.d~e!$&'()*+,;=:@%20",
            "/{\"json\"}|[x]^\\",
            "/p?q={}|`^'\\?/",
            "/\u{e9}",
        ] {
            let (p, _) = plan(&format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n"));
            assert_eq!(p.path, target);
        }
        assert_invalid(&[
            "GET /` HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /< HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /> HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /?\" HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /?< HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /#f HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET /?a#f HTTP/1.1\r\nHost: a\r\n\r\n",
        ]);
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_TARGET)
        );
        assert_eq!(verdict(&long), Some(RequestVerdict::Invalid));
    }

    /// Rule 7: codings are never dropped, chunked exactly once and last (RFC 9112 6.1, 6.3 item
    /// 4); no Transfer-Encoding in HTTP/1.0 (6.1).
    #[test]
    fn transfer_codings() {
        let (p, out) = plan(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nX-Request-Id: r\r\ntransfer-encoding: Chunked\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Chunked);
        let (p, _) = plan(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x ; a = b ;c=d, chunked\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert_eq!(
            out,
            format!(
                "POST / HTTP/1.1\r\nHost: a\r\n{}",
                tail("Transfer-Encoding: gzip, Chunked\r\n", "r")
            )
        );
        assert_invalid(&[
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked;a=b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip,,chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x;a, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x;a=\"b\", chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x;a=b;=c, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: x;a=\u{e9}, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: g\"z, chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ]);
    }

    /// Rule 8: no field-count limit: only the caller's byte limit.
    #[test]
    fn many_fields_are_taken() {
        let fields: String = (0..150).map(|i| format!("X-F{i}: {i}\r\n")).collect();
        let (_, out) = plan(&format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}\r\n"));
        assert!(out.contains("\r\nX-F0: 0\r\n") && out.contains("\r\nX-F149: 149\r\n"));
        assert_eq!(
            verdict(&format!("GET / HTTP/1.1\r\nHost: a\r\n{fields}")),
            Some(RequestVerdict::Partial)
        );
        let mut out = Vec::new();
        let response = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{fields}\r\n");
        plan_response(response.as_bytes(), false, true, false, &mut out)
            .expect("valid")
            .expect("complete");
        assert!(String::from_utf8_lossy(&out).contains("\r\nX-F149: 149\r\n"));
    }

    /// Rule 9: HTTP/1.2..1.9 are HTTP/1.1 (RFC 9112 2.3); 1.0 goes to hyper; others are 400.
    #[test]
    fn versions() {
        for minor in 2..=9 {
            let (_, out) = plan(&format!("GET / HTTP/1.{minor}\r\nHost: a\r\n\r\n"));
            assert!(out.starts_with("GET / HTTP/1.1\r\n"), "{out}");
        }
        let (_, out) = plan("\r\n\r\nGET /x HTTP/1.5\nHost: a\n\n");
        assert!(out.starts_with("GET /x HTTP/1.1\r\nHost: a\r\n"), "{out}");
        // The rewrite happens in place, so a head completed later parses.
        let mut buf = b"GET / HTTP/1.2".to_vec();
        assert_eq!(
            plan_request(&mut buf, &rewrite(), &mut Vec::new()).err(),
            Some(RequestVerdict::Partial)
        );
        buf.extend_from_slice(b"\r\nHost: a\r\n\r\n");
        plan_request(&mut buf, &rewrite(), &mut Vec::new()).expect("plan");
        assert_invalid(&[
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET / HTTP/0.9\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.10\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.x\r\nHost: a\r\n\r\n",
            "GET /HTTP/1.2\r\nHost: a\r\n\r\n",
        ]);
        assert_eq!(
            verdict("GET / HTTP/1.0\r\n\r\n"),
            Some(RequestVerdict::Fallback)
        );
    }

    /// Rule 10: any token method (RFC 9110 9.1); CONNECT, Upgrade, Expect and HTTP/1.0 go to hyper.
    #[test]
    fn methods_and_fallbacks() {
        for method in ["PURGE", "get", "ABCDEFGHIJKLMNOPQ", "M-SEARCH"] {
            let (p, out) = plan(&format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n"));
            assert_eq!(p.method.as_str(), method);
            assert!(out.starts_with(&format!("{method} / HTTP/1.1\r\n")));
        }
        assert_invalid(&["G<T / HTTP/1.1\r\nHost: a\r\n\r\n"]);
        for input in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert_eq!(verdict(input), Some(RequestVerdict::Fallback), "{input}");
        }
        let (p, _) = plan(
            "POST /s/M HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc+proto\r\nTE: trailers\r\n\r\n",
        );
        assert!(p.grpc);
        let (p, _) = plan("POST / HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\r\n");
        assert!(!p.grpc);
    }

    /// A gRPC call's `grpc-timeout` (the first) is read; its lines stay where the first was, and
    /// on a route with a deadline they are replaced in place (or one is added) on each attempt,
    /// a body sent with the head staying after it.
    #[test]
    fn grpc_timeout_is_read_and_replaced_in_place() {
        let grpc = "POST /s/M HTTP/1.1\r\nHost: a\r\nContent-Type: application/grpc-web+proto\r\n";
        let (p, out) = plan(&format!(
            "{grpc}Grpc-Timeout: 1H\r\nX-A: 1\r\ngrpc-timeout: 1S\r\nX-Request-Id: r\r\n\r\n"
        ));
        assert_eq!(p.grpc_timeout, Some(Duration::from_secs(3600)));
        let lines = "Grpc-Timeout: 1H\r\ngrpc-timeout: 1S\r\n";
        assert_eq!(out, format!("{grpc}{lines}X-A: 1\r\n{}", tail("", "r")));
        assert_eq!(&out[p.grpc_timeout_at.clone()], lines);
        let mut head = out.into_bytes();
        let mut at = p.grpc_timeout_at;
        for value in ["4999m", "4S"] {
            set_grpc_timeout(&mut head, &mut at, value.as_bytes());
            let want = format!("{grpc}grpc-timeout: {value}\r\nX-A: 1\r\n{}", tail("", "r"));
            assert_eq!(String::from_utf8_lossy(&head), want);
        }

        // None came: one goes before the empty line, ahead of a body sent with the head.
        let (p, out) = plan(&format!("{grpc}X-Request-Id: r\r\n\r\n"));
        assert_eq!(p.grpc_timeout, None);
        let mut head = out.into_bytes();
        head.extend_from_slice(b"body");
        let mut at = p.grpc_timeout_at;
        let fields = tail("", "r");
        let fields = fields.strip_suffix("\r\n").expect("the empty line");
        for value in ["5S", "4999m"] {
            set_grpc_timeout(&mut head, &mut at, value.as_bytes());
            let want = format!("{grpc}{fields}grpc-timeout: {value}\r\n\r\nbody");
            assert_eq!(String::from_utf8_lossy(&head), want);
        }

        // Garbage is no deadline; not gRPC, the field is not read, and passes as it came.
        let (p, _) = plan(&format!("{grpc}grpc-timeout: 1h\r\n\r\n"));
        assert_eq!(p.grpc_timeout, None);
        let (p, out) =
            plan("GET / HTTP/1.1\r\nHost: a\r\ngrpc-timeout: 1S\r\nX-Request-Id: r\r\n\r\n");
        assert_eq!(p.grpc_timeout, None);
        assert_eq!(
            out,
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\ngrpc-timeout: 1S\r\n{}",
                tail("", "r")
            )
        );
    }

    /// RFC 9110 7.6.3: our own pseudonym in Via is a loop (508); other proxies' entries are kept.
    #[test]
    fn via_is_appended_and_loops_are_caught() {
        let (_, out) = plan(
            "GET / HTTP/1.1\r\nHost: a\r\nVia: 1.1 other, HTTP/1.0 amazing-proxy-1 (comment)\r\nX-Request-Id: r\r\n\r\n",
        );
        assert!(
            out.contains(
                "\r\nVia: 1.1 other, HTTP/1.0 amazing-proxy-1 (comment)\r\nX-Forwarded-For"
            ),
            "{out}"
        );
        assert!(
            out.ends_with(&format!("\r\nVia: 1.1 {VIA}\r\n\r\n")),
            "{out}"
        );
        for via in [
            format!("1.1 {VIA}"),
            format!("1.0 other, 1.1 {}", VIA.to_uppercase()),
            format!("1.1\t{VIA} (looped)"),
        ] {
            let (p, _) = plan(&format!("GET / HTTP/1.1\r\nHost: a\r\nVia: {via}\r\n\r\n"));
            assert!(p.looped, "{via}");
        }
        let (p, _) = plan(&format!(
            "GET / HTTP/1.1\r\nHost: a\r\nVia: 1.1 x (seen {VIA})\r\n\r\n"
        ));
        assert!(!p.looped);
    }

    #[test]
    fn malformed_and_partial_requests() {
        assert_eq!(
            verdict("GET / HTTP/1.1\r\nHost: a\r\n"),
            Some(RequestVerdict::Partial)
        );
        assert_eq!(verdict(""), Some(RequestVerdict::Partial));
        assert_invalid(&[
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\rHost: a\r\n\r\n",
        ]);
    }

    fn response_with(
        input: &str,
        head: bool,
        keep_alive: bool,
        lower: bool,
    ) -> (ResponsePlan, String) {
        let mut out = Vec::new();
        let plan = plan_response(input.as_bytes(), head, keep_alive, lower, &mut out)
            .unwrap_or_else(|e| panic!("{e:?} for {input:?}"))
            .expect("complete");
        (plan, String::from_utf8(out).expect("utf8"))
    }

    fn response(input: &str) -> (ResponsePlan, String) {
        response_with(input, false, true, false)
    }

    fn invalid_response(input: &str) -> bool {
        plan_response(input.as_bytes(), false, true, false, &mut Vec::new()) == Err(InvalidResponse)
    }

    #[test]
    fn response_head_gets_our_server_and_loses_hop_by_hop() {
        let input = "HTTP/1.1 429 TOO MANY REQUESTS\r\nServer: gunicorn\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\nX-App: 1\r\n\r\n";
        let (plan, out) = response(input);
        assert_eq!(plan.status, 429);
        assert_eq!(plan.framing, Framing::None);
        assert!(plan.upstream_reusable && plan.keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 429 TOO MANY REQUESTS\r\nContent-Length: 0\r\nX-App: 1\r\nServer: amazing-proxy\r\n\r\n"
        );
        let (_, out) = response_with(input, false, false, true);
        assert_eq!(
            out,
            "HTTP/1.1 429 TOO MANY REQUESTS\r\ncontent-length: 0\r\nx-app: 1\r\nserver: amazing-proxy\r\nconnection: close\r\n\r\n"
        );
    }

    /// Rule 4: the app's framing (RFC 9112 6.1, 6.3; RFC 9110 8.6).
    #[test]
    fn response_framing() {
        let (p, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(p.framing, Framing::Chunked);
        assert!(p.upstream_reusable);
        assert!(out.ends_with("\r\nTransfer-Encoding: chunked\r\n\r\n"));
        let (p, _) = response_with(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            true,
            true,
            false,
        );
        assert_eq!(p.framing, Framing::None);
        let (p, out) = response("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(p.framing, Framing::UntilClose);
        assert!(!p.upstream_reusable && !p.keep_alive);
        assert!(out.ends_with("Connection: close\r\n\r\n"));
        let (p, _) = response("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n");
        assert!(!p.upstream_reusable && p.keep_alive);
        let (p, _) = response("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!p.upstream_reusable && p.keep_alive);
        let (p, _) = response("HTTP/1.1 100 Continue\r\n\r\n");
        assert!(p.interim);
        let (p, _) = response("HTTP/1.1 200 OK\r\ngrpc-status: 7\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(p.grpc_status, Some(7));
        for status in [204, 304] {
            let (p, _) = response(&format!("HTTP/1.1 {status} X\r\nContent-Length: 5\r\n\r\n"));
            assert_eq!(p.framing, Framing::None);
        }

        // Content-Length with Transfer-Encoding: chunked wins, Content-Length is not forwarded,
        // the connection is not reused.
        let (p, out) = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert!(!p.upstream_reusable);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: amazing-proxy\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        );
        // A final coding other than chunked: until close (6.3 item 4).
        let (p, out) = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(p.framing, Framing::UntilClose);
        assert!(!p.upstream_reusable && !p.keep_alive);
        assert!(out.contains("\r\nTransfer-Encoding: gzip\r\n"));
        // `Connection: content-length` keeps the framing (issue 9, defect 4).
        let (p, out) = response(
            "HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!(p.framing, Framing::Length(2));
        assert!(out.contains("\r\nContent-Length: 2\r\n"));
        // Equal repeated lengths are taken, but the connection is not trusted again.
        let (p, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(p.framing, Framing::Length(2));
        assert!(!p.upstream_reusable);

        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 2,2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
            "HTTP/1.1 020 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(invalid_response(bad), "{bad:?}");
        }
    }
}
