//! HTTP/1.1 message heads as the fast path reads and rewrites them: pure functions, no I/O.
//!
//! `plan_request` parses a request head in place with `httparse`, decides its framing and writes the
//! head to send to the app; `plan_response` does the same for the app's answer. Anything the fast
//! path does not handle itself is `Fallback` (the hyper path), anything ambiguous is `Invalid`.

use http::Method;
use http::header::HeaderValue;

use crate::proxy::phases::new_request_id;

const MAX_HEADERS: usize = 100;

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
    pub grpc: bool,
    pub head_len: usize,
    pub method: Method,
    pub path: String,
    pub framing: Framing,
    pub keep_alive: bool,
    pub request_id: HeaderValue,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    /// More bytes needed.
    Partial,
    /// Valid, but for the hyper path.
    Fallback,
    Invalid,
    /// Our own Via entry is already in the request: it looped back to this proxy.
    Loop,
}

/// Options of the head rewriting that come from configuration.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite<'a> {
    pub lowercase_names: bool,
    /// This proxy's Via pseudonym.
    pub via: &'a str,
    /// `Some(app address)` with --rewrite-host.
    pub host: Option<&'a str>,
    /// The client's IP as text, for x-forwarded-for.
    pub client_ip: &'a str,
}

fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

fn push_name(out: &mut Vec<u8>, name: &str, preserve_case: bool) {
    if preserve_case {
        out.extend_from_slice(name.as_bytes());
    } else {
        out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
    }
}

fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(|t| t.trim_ascii())
}

/// Parses a request head at the start of `buf` and writes the head to send to the app into `out`:
/// hop-by-hop fields removed (RFC 9110 7.6.1), `x-forwarded-for` appended, `x-forwarded-proto`
/// and `x-request-id` added when missing, Host rewritten on request. Pure: no I/O.
// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
pub fn plan_request(
    buf: &mut [u8],
    rw: &Rewrite<'_>,
    out: &mut Vec<u8>,
) -> Result<RequestPlan, RequestVerdict> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(RequestVerdict::Partial),
        Err(_) => return Err(RequestVerdict::Invalid),
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        // HTTP/1.0 keep-alive rules and the like: hyper's.
        return Err(RequestVerdict::Fallback);
    };
    if method == "CONNECT" {
        return Err(RequestVerdict::Fallback);
    }

    let mut framing = Framing::None;
    let mut keep_alive = true;
    let mut request_id = None;
    let mut forwarded_for: Option<&[u8]> = None;
    let mut forwarded_proto = false;
    let mut connection_listed: [&[u8]; 8] = [&[]; 8];
    let mut listed = 0;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(RequestVerdict::Invalid)?;
            match framing {
                Framing::Length(prev) if prev != len => return Err(RequestVerdict::Invalid),
                Framing::Chunked => return Err(RequestVerdict::Fallback),
                _ => framing = Framing::Length(len),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") || framing != Framing::None {
                return Err(RequestVerdict::Fallback);
            }
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if listed < connection_listed.len() {
                    connection_listed[listed] = token;
                    listed += 1;
                } else {
                    return Err(RequestVerdict::Fallback);
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Err(RequestVerdict::Fallback);
        }
    }
    if framing == Framing::Length(0) {
        framing = Framing::None;
    }

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name;
        if is_hop_by_hop(name) {
            if name.eq_ignore_ascii_case("te")
                && tokens(h.value).any(|t| t.eq_ignore_ascii_case(b"trailers"))
            {
                out.extend_from_slice(b"te: trailers\r\n");
            }
            continue;
        }
        if connection_listed[..listed]
            .iter()
            .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for = Some(h.value);
            continue;
        }
        if rw.host.is_some() && name.eq_ignore_ascii_case("host") {
            continue;
        }
        if name.eq_ignore_ascii_case("x-forwarded-proto") {
            forwarded_proto = true;
        } else if name.eq_ignore_ascii_case("x-request-id") {
            request_id = HeaderValue::from_bytes(h.value).ok();
        }
        push_name(out, name, !rw.lowercase_names);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let Some(host) = rw.host {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = forwarded_for.filter(|p| !p.is_empty()) {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(rw.client_ip.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !forwarded_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    let request_id = match request_id {
        Some(id) => id,
        None => {
            let id = new_request_id();
            out.extend_from_slice(b"x-request-id: ");
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\r\n");
            id
        }
    };
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let _ = rw.via;
    Ok(RequestPlan {
        grpc: false,
        head_len,
        method: Method::from_bytes(method.as_bytes()).map_err(|_| RequestVerdict::Invalid)?,
        path: path.to_owned(),
        framing,
        keep_alive,
        request_id,
    })
}

/// The app's response head cannot be parsed or framed.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidResponse;

#[derive(Debug, PartialEq, Eq)]
pub struct ResponsePlan {
    pub head_len: usize,
    pub status: u16,
    /// An interim (1xx) response to skip: the app sent `100 Continue` unasked.
    pub interim: bool,
    pub framing: Framing,
    /// The app's connection can carry another request afterwards.
    pub upstream_reusable: bool,
    /// The client's connection stays open afterwards.
    pub keep_alive: bool,
    pub grpc_status: Option<u16>,
}

/// Parses the app's response head and writes the head for the client into `out`: hop-by-hop
/// fields removed, `Server: amazing-proxy`, `Connection: close` when the client's connection ends
/// with this response. `Ok(None)` while more bytes are needed. Pure: no I/O.
// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
pub fn plan_response(
    buf: &[u8],
    head_request: bool,
    keep_alive: bool,
    lowercase_names: bool,
    out: &mut Vec<u8>,
) -> Result<Option<ResponsePlan>, InvalidResponse> {
    let preserve_case = !lowercase_names;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut headers);
    let head_len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(InvalidResponse),
    };
    let status = res.code.ok_or(InvalidResponse)?;
    if status == 101 {
        // Never asked for on this path (upgrades go to hyper).
        return Err(InvalidResponse);
    }
    if (100..200).contains(&status) {
        return Ok(Some(ResponsePlan {
            head_len,
            status,
            interim: true,
            framing: Framing::None,
            upstream_reusable: true,
            keep_alive,
            grpc_status: None,
        }));
    }
    let mut framing = Framing::UntilClose;
    let mut upstream_reusable = res.version == Some(1);
    let mut grpc_status = None;
    let mut connection_listed: [&[u8]; 8] = [&[]; 8];
    let mut listed = 0;
    for h in res.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(InvalidResponse)?;
            match framing {
                Framing::Length(prev) if prev != len => return Err(InvalidResponse),
                Framing::Chunked => {}
                _ => framing = Framing::Length(len),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !tokens(h.value)
                .last()
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"))
            {
                return Err(InvalidResponse);
            }
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_reusable = false;
                } else if listed < connection_listed.len() {
                    connection_listed[listed] = token;
                    listed += 1;
                }
            }
        } else if h.name.eq_ignore_ascii_case("grpc-status") {
            grpc_status = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.parse().ok());
        }
    }
    if head_request || status == 204 || status == 304 || framing == Framing::Length(0) {
        framing = Framing::None;
    }
    if framing == Framing::UntilClose {
        upstream_reusable = false;
    }
    let keep_alive = keep_alive && framing != Framing::UntilClose;

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in res.headers.iter() {
        let name = h.name;
        if is_hop_by_hop(name)
            || name.eq_ignore_ascii_case("server")
            || connection_listed[..listed]
                .iter()
                .any(|l| l.eq_ignore_ascii_case(name.as_bytes()))
        {
            continue;
        }
        push_name(out, name, preserve_case);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if preserve_case {
        b"Server: amazing-proxy\r\n"
    } else {
        b"server: amazing-proxy\r\n"
    });
    if framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some(ResponsePlan {
        head_len,
        status,
        interim: false,
        framing,
        upstream_reusable,
        keep_alive,
        grpc_status,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite() -> Rewrite<'static> {
        Rewrite {
            lowercase_names: true,
            via: "amazing-proxy-00000001",
            host: None,
            client_ip: "198.18.0.1",
        }
    }

    fn plan(input: &str, rw: &Rewrite<'_>) -> (Result<RequestPlan, RequestVerdict>, String) {
        let mut out = Vec::new();
        let mut input = input.as_bytes().to_vec();
        let r = plan_request(&mut input, rw, &mut out);
        (r, String::from_utf8(out).expect("utf8"))
    }

    #[test]
    fn request_head_is_rewritten_for_the_app() {
        let (r, out) = plan(
            "GET /get?query=param HTTP/1.1\r\nHost: pod\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\ntraceparent: 00-1-2-01\r\nX-Request-Id: given\r\n\r\nNEXT",
            &rewrite(),
        );
        let plan = r.expect("plan");
        assert_eq!(plan.head_len, "GET /get?query=param HTTP/1.1\r\nHost: pod\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\ntraceparent: 00-1-2-01\r\nX-Request-Id: given\r\n\r\n".len());
        assert_eq!(plan.framing, Framing::None);
        assert!(plan.keep_alive);
        assert_eq!(plan.request_id, "given");
        assert_eq!(
            out,
            "GET /get?query=param HTTP/1.1\r\nhost: pod\r\nte: trailers\r\ntraceparent: 00-1-2-01\r\nx-request-id: given\r\nx-forwarded-for: 198.18.0.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn case_is_kept_when_asked_and_host_rewritten() {
        let rw = Rewrite {
            lowercase_names: false,
            host: Some("127.0.0.1:80"),
            ..rewrite()
        };
        let (r, out) = plan(
            "POST /post HTTP/1.1\r\nHost: pod\r\nX-Custom-Header: A\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
            &rw,
        );
        let plan = r.expect("plan");
        assert_eq!(plan.framing, Framing::Length(4));
        assert!(!plan.keep_alive);
        assert!(out.starts_with("POST /post HTTP/1.1\r\nX-Custom-Header: A\r\nX-Forwarded-Proto: https\r\nContent-Length: 4\r\nhost: 127.0.0.1:80\r\nx-forwarded-for: 203.0.113.9, 198.18.0.1\r\nx-request-id: "), "{out}");
    }

    #[test]
    fn unusual_requests_go_to_hyper() {
        for input in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert_eq!(
                plan(input, &rewrite()).0.err(),
                Some(RequestVerdict::Fallback),
                "{input}"
            );
        }
    }

    #[test]
    fn malformed_and_partial_requests() {
        assert_eq!(
            plan("GET / HTTP/1.1\r\nHost: a\r\n", &rewrite()).0.err(),
            Some(RequestVerdict::Partial)
        );
        assert_eq!(
            plan("GET / HTTP/1.1\r\nBad Header\r\n\r\n", &rewrite())
                .0
                .err(),
            Some(RequestVerdict::Invalid)
        );
        assert_eq!(
            plan(
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &rewrite()
            )
            .0
            .err(),
            Some(RequestVerdict::Invalid)
        );
        assert_eq!(
            plan("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", &rewrite())
                .0
                .err(),
            Some(RequestVerdict::Invalid)
        );
    }

    fn response(input: &str, head: bool, keep_alive: bool) -> (ResponsePlan, String) {
        let mut out = Vec::new();
        let plan = plan_response(input.as_bytes(), head, keep_alive, true, &mut out)
            .expect("valid")
            .expect("complete");
        (plan, String::from_utf8(out).expect("utf8"))
    }

    #[test]
    fn response_head_gets_our_server_and_loses_hop_by_hop() {
        let (plan, out) = response(
            "HTTP/1.1 429 TOO MANY REQUESTS\r\nServer: gunicorn\r\nConnection: keep-alive\r\nContent-Length: 0\r\nX-App: 1\r\n\r\n",
            false,
            true,
        );
        assert_eq!(plan.status, 429);
        assert_eq!(plan.framing, Framing::None);
        assert!(plan.upstream_reusable && plan.keep_alive);
        assert_eq!(
            out,
            "HTTP/1.1 429 TOO MANY REQUESTS\r\ncontent-length: 0\r\nx-app: 1\r\nserver: amazing-proxy\r\n\r\n"
        );
    }

    #[test]
    fn response_framing() {
        let (p, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            true,
        );
        assert_eq!(p.framing, Framing::Chunked);
        assert!(out.contains("transfer-encoding: chunked\r\n"));
        let (p, _) = response("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true, true);
        assert_eq!(p.framing, Framing::None);
        let (p, out) = response("HTTP/1.1 200 OK\r\n\r\n", false, true);
        assert_eq!(p.framing, Framing::UntilClose);
        assert!(!p.upstream_reusable && !p.keep_alive);
        assert!(out.ends_with("connection: close\r\n\r\n"));
        let (p, _) = response(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
            true,
        );
        assert!(!p.upstream_reusable && p.keep_alive);
        let (p, _) = response("HTTP/1.1 100 Continue\r\n\r\n", false, true);
        assert!(p.interim);
        let (p, _) = response(
            "HTTP/1.1 200 OK\r\ngrpc-status: 7\r\nContent-Length: 0\r\n\r\n",
            false,
            true,
        );
        assert_eq!(p.grpc_status, Some(7));
    }
}
