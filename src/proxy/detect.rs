//! Protocol detection on a connection's first bytes: pure, no I/O.
//!
//! Bytes that begin like an HTTP/1 request line are HTTP, even when malformed: the HTTP path then
//! answers 400 and the exchange is logged and counted, where an opaque tunnel would skip the
//! forwarding headers, the access log and the metrics (issue 9, defect 3). Otherwise it biases
//! towards availability for ports not known to carry HTTP: what is neither HTTP/1 nor the HTTP/2
//! preface is forwarded as opaque bytes rather than refused.

use super::http1::chunked::is_tchar;

#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque(&'static str),
    Closed,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most bytes `classify` looks at: with this many it always decides. The caller peeks up to
/// this much (fewer while `classify` says `None`).
pub const MAX_PEEK: usize = 1024;

/// Classifies a connection's first bytes; `None` while more bytes are needed to decide (never when
/// `first` holds `MAX_PEEK` bytes or more).
///
/// HTTP/1 when, after any empty lines (RFC 9112 2.2 says to ignore them):
/// - a token (any case, any length: RFC 9110 9.1), a space and a target that starts like one
///   (`/`, `*`, `http://`, `https://`, or anything after `CONNECT`); or
/// - the first line has the shape `method SP target SP HTTP/d.d`, whatever the bytes of the
///   method and the target (`G<T /a HTTP/1.1` is a malformed request, not another protocol).
///
/// Text protocols whose commands are also a word and a space (Redis' inline `SET key value`,
/// `GET key`) are neither and stay opaque.
pub fn classify(first: &[u8]) -> Option<Detected> {
    // Only the first MAX_PEEK bytes count, so that the answer never changes with more bytes.
    let first = &first[..first.len().min(MAX_PEEK)];
    if first.is_empty() {
        return None;
    }
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    let decided = classify_request_line(first);
    if decided.is_none() && first.len() >= MAX_PEEK {
        return Some(Detected::Opaque("not_http"));
    }
    decided
}

fn classify_request_line(first: &[u8]) -> Option<Detected> {
    let line = match first.iter().position(|&b| b != b'\r' && b != b'\n') {
        Some(start) => &first[start..],
        None => return None,
    };
    if let Some(sp) = line.iter().position(|&b| b == b' ')
        && sp > 0
        && line[..sp].iter().all(|&b| is_tchar(b))
        && let Some(found) = classify_target(&line[..sp], &line[sp + 1..])
    {
        return Some(found);
    }
    request_line_shape(line)
}

/// After a token method: `Some(Http1)` when the target starts like one, `None` when it may still.
fn classify_target(method: &[u8], target: &[u8]) -> Option<Detected> {
    let first = *target.first()?;
    if first == b'/' || first == b'*' || method.eq_ignore_ascii_case(b"CONNECT") {
        return Some(Detected::Http1);
    }
    for scheme in [&b"http://"[..], b"https://"] {
        let n = target.len().min(scheme.len());
        if n == scheme.len() && target[..n].eq_ignore_ascii_case(scheme) {
            return Some(Detected::Http1);
        }
    }
    None
}

/// Whether the line is, or can still become, `method SP target SP HTTP/d.d` then CRLF or LF.
fn request_line_shape(line: &[u8]) -> Option<Detected> {
    const OPAQUE: Option<Detected> = Some(Detected::Opaque("not_http"));
    let visible = |b: u8| b > b' ' && b != 0x7f;
    let method_end = line.iter().position(|&b| !visible(b))?;
    if method_end == 0 || line[method_end] != b' ' {
        return OPAQUE;
    }
    let rest = &line[method_end + 1..];
    let target_end = rest.iter().position(|&b| !visible(b))?;
    if target_end == 0 || rest[target_end] != b' ' {
        return OPAQUE;
    }
    let version = &rest[target_end + 1..];
    const SHAPE: &[u8] = b"HTTP/d.d";
    for (i, &b) in version.iter().enumerate() {
        let fits = match SHAPE.get(i) {
            Some(b'd') => b.is_ascii_digit(),
            Some(&s) => b == s,
            None => b == b'\r' || b == b'\n',
        };
        if !fits {
            return OPAQUE;
        }
        if i == SHAPE.len() {
            return Some(Detected::Http1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPAQUE: Option<Detected> = Some(Detected::Opaque("not_http"));

    #[test]
    fn detection() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PROPFIND /x"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"*3\r\n$3\r\nSET"), OPAQUE);
        assert_eq!(classify(b"\x16\x03\x01"), OPAQUE);
        assert_eq!(classify(b" GET"), OPAQUE);
        // Redis inline commands look like a method and a space.
        assert_eq!(classify(b"SET key value\r\n"), OPAQUE);
        assert_eq!(classify(b"GET key\r\n"), OPAQUE);
        assert_eq!(classify(b"get key\r\n"), OPAQUE);
        assert_eq!(classify(b"GET key"), None);
        assert_eq!(classify(b"GET "), None);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"CONNECT db:5432 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GET http://a/ HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GET https://a/ HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GET http:"), None);
        assert_eq!(classify(b"GET httpx"), None);
        assert_eq!(classify(b"GET httpx\r\n"), OPAQUE);
        assert_eq!(classify(b"AAAAAAAAAAAAAAAAAAAAAAAA"), None);
        assert_eq!(classify(b"AAAAAAAAAAAAAAAAAAAAAAAA\r\n"), OPAQUE);
    }

    /// Issue 9, defect 3: each of these went to an opaque tunnel.
    #[test]
    fn what_begins_like_a_request_line_is_http() {
        for input in [
            &b"\r\nGET / HTTP/1.1\r\n"[..],
            b"\r\n\r\nGET /",
            b"\nGET / HTTP/1.1\r\n",
            b"get /a HTTP/1.1\r\n",
            b"ABCDEFGHIJKLMNOPQ /a HTTP/1.1\r\n",
            b"G<T /a HTTP/1.1\r\n",
            b"G<T /a HTTP/1.1\n",
            b"GET example.com HTTP/1.1\r\n",
            b"GET a HTTP/9.9\r",
            b"connect db:5432 HTTP/1.1",
        ] {
            assert_eq!(
                classify(input),
                Some(Detected::Http1),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"\r\nG<T /a HTT"), None);
        assert_eq!(classify(b"G<T /a HTTP/x"), OPAQUE);
        assert_eq!(classify(b"G<T /a HTTP/1.1x"), OPAQUE);
        assert_eq!(classify(b"G<T  /a HTTP/1.1\r\n"), OPAQUE);
    }

    #[test]
    fn decides_by_max_peek() {
        let mut long = b"GET ".to_vec();
        long.resize(MAX_PEEK, b'k');
        assert_eq!(classify(&long[..MAX_PEEK - 1]), None);
        assert_eq!(classify(&long), OPAQUE);
        assert_eq!(classify(&[b'\r'; MAX_PEEK]), OPAQUE);
    }
}
