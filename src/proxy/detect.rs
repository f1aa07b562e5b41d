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
/// Lenient towards HTTP, because whatever an app could read as a request must take the HTTP path
/// (where the strict parser answers `400` to anything malformed): an opaque connection skips the
/// routes, the owned fields and the log for every request it carries. RFC 9112 3 lets a server
/// split the request line on any whitespace and ignore whitespace before it, and real servers also
/// split on other bytes (Python's `str.split` on NBSP, NEL and 0x1C-0x1F), so every one of those
/// separates words here. HTTP/1 when, after any empty lines and whitespace:
/// - a token (any case, any length: RFC 9110 9.1), separators and a target that starts like one
///   (`/`, `*`, `http://`, `https://`, or anything after `CONNECT`); or
/// - a whole word after the first starts with `HTTP/` (any case) before any control byte, whatever
///   the others (`G<T /a HTTP/1.1` is a malformed request, not another protocol); or
/// - `MAX_PEEK` bytes hold no line end and are only whitespace, or a token and separators and
///   more: a request line padded past the peek.
///
/// Text protocols whose commands are also words on a line (Redis' inline `SET key value`, `GET
/// key`) are neither and stay opaque, and so, at once, is a first line with a control byte before
/// any version (TLS, AMQP, LDAP, MongoDB, MySQL).
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
        return Some(padded_request_line(first));
    }
    decided
}

/// Separates the words of a request line for some server: RFC 9112 3's whitespace (SP, HTAB, VT,
/// FF, a CR not ending the line) and what Python's `str.split` also splits a Latin-1 line on.
fn is_separator(b: u8) -> bool {
    matches!(
        b,
        b' ' | b'\t' | 0x0b | 0x0c | b'\r' | 0x1c..=0x1f | 0x85 | 0xa0
    )
}

/// Where the request line starts: after empty lines (RFC 9112 2.2) and whitespace.
fn line_start(first: &[u8]) -> Option<&[u8]> {
    let start = first.iter().position(|&b| b != b'\n' && !is_separator(b))?;
    Some(&first[start..])
}

fn classify_request_line(first: &[u8]) -> Option<Detected> {
    const OPAQUE: Option<Detected> = Some(Detected::Opaque("not_http"));
    let line = line_start(first)?;
    let method_end = line.iter().position(|&b| b == b'\n' || is_separator(b));
    if let Some(end) = method_end
        && line[..end].iter().all(|&b| is_tchar(b))
    {
        let target = &line[end..];
        let target = &target[target
            .iter()
            .position(|&b| !is_separator(b))
            .unwrap_or(target.len())..];
        // A target starts with a visible byte: not the line's end, not a control.
        if target.first().is_none_or(|&b| !is_control(b))
            && let Some(found) = classify_target(&line[..end], target)
        {
            return Some(found);
        }
    }
    // Then word by word, whichever comes first decides: a whole word after the first that starts
    // with a version (HTTP), or a control byte (binary protocols such as TLS, AMQP, LDAP, MongoDB
    // and MySQL put one where a request line has none: opaque at once, not at the timeout).
    let mut word_start = 0;
    let mut words = 0;
    for (i, &b) in line.iter().enumerate() {
        if b == b'\n' || is_separator(b) {
            if i > word_start {
                if words > 0 && is_version(&line[word_start..i]) {
                    return Some(Detected::Http1);
                }
                words += 1;
            }
            if b == b'\n' {
                return OPAQUE;
            }
            word_start = i + 1;
        } else if is_control(b) {
            return OPAQUE;
        }
    }
    None
}

/// A byte no request line holds before its end: a C0 control that separates no words, or DEL.
fn is_control(b: u8) -> bool {
    (b < 0x20 && !is_separator(b)) || b == 0x7f
}

fn is_version(word: &[u8]) -> bool {
    word.len() >= 5 && word[..5].eq_ignore_ascii_case(b"HTTP/")
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

/// `MAX_PEEK` bytes and no line end: HTTP/1 when they are only whitespace, a token and a separator
/// (a method, then a target or padding no shorter peek can see past), or whitespace and a token up
/// to the end (padding before a method).
fn padded_request_line(first: &[u8]) -> Detected {
    let Some(line) = line_start(first) else {
        return Detected::Http1;
    };
    let padded = line.len() < first.len();
    let token_end = line
        .iter()
        .position(|&b| !is_tchar(b))
        .unwrap_or(line.len());
    let method = token_end > 0
        && match line.get(token_end) {
            Some(&b) => is_separator(b),
            None => padded,
        };
    if method {
        Detected::Http1
    } else {
        Detected::Opaque("not_http")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPAQUE: Option<Detected> = Some(Detected::Opaque("not_http"));

    fn each_is(inputs: &[&[u8]], want: Option<Detected>) {
        for input in inputs {
            assert_eq!(classify(input), want, "{}", input.escape_ascii());
        }
    }

    #[test]
    fn detection() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PROPFIND /x"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(classify(b"*3\r\n$3\r\nSET"), OPAQUE);
        assert_eq!(classify(b"\x16\x03\x01"), OPAQUE);
        assert_eq!(classify(b" GET"), None);
        assert_eq!(classify(b"\x00GET / HTTP/1.1\r\n"), OPAQUE);
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
        each_is(
            &[
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
            ],
            Some(Detected::Http1),
        );
        assert_eq!(classify(b"\r\n"), None);
        assert_eq!(classify(b"\r\nG<T /a HTT"), None);
        assert_eq!(classify(b"G<T /a HTTP/x"), None);
        assert_eq!(classify(b"G<T /a HTTP/x\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"G<T /a HTTX/1.1\r\n"), OPAQUE);
        assert_eq!(classify(b"HTTP/1.1\r\n"), OPAQUE);
        assert_eq!(classify(b"HTTP/1.1 200 OK\r\n"), OPAQUE);
    }

    /// Client-first binary and text protocols are decided opaque at once (their first line holds
    /// a control byte, or ends with no version): waiting for the detection timeout turned them
    /// into a 400.
    #[test]
    fn client_first_protocols_stay_opaque_at_once() {
        each_is(
            &[
                &b"AMQP\x00\x00\x09\x01"[..],
                b"AMQP\x00\x01\x00\x00",
                b"\x30\x0c\x02\x01\x01\x60\x07\x02\x01\x03\x04\x00\x80\x00",
                b"\x41\x00\x00\x00\x01\x00\x00\x00",
                b"Z\x00\x00\x01\x85\xa6",
                b"CONNECT\r\naccept-version:1.2\r\n\r\n\x00",
                b"connect\x0c\x00\x01",
                b"CONNECT\t\x16\x03\x01",
                b"\x16\x03\x01\x02\x00",
            ],
            OPAQUE,
        );
        // A byte order mark before a request line is no control: HTTP (and a 400).
        assert_eq!(
            classify(b"\xef\xbb\xbfGET /x HTTP/1.1\r\n"),
            Some(Detected::Http1)
        );
    }

    /// What a lenient server (Python's http.server and wsgiref, Tomcat) reads as a request line,
    /// each of which an opaque tunnel would have carried past the routes and the owned fields,
    /// with every request after it on the connection.
    #[test]
    fn request_lines_split_on_any_whitespace_are_http() {
        each_is(
            &[
                &b"GET\t/admin HTTP/1.1\r\n"[..],
                b"GET\t/admin\tHTTP/1.1\r\n",
                b" GET /admin HTTP/1.1\r\n",
                b"\t\r\n GET /admin HTTP/1.1\r\n",
                b"GET  /admin HTTP/1.1\r\n",
                b"GET\x0b/admin\x0cHTTP/1.1\r\n",
                b"GET\r/admin HTTP/1.1\r\n",
                b"GET\xa0/admin\xa0HTTP/1.1\r\n",
                b"GET\x85/admin\x1cHTTP/1.1\r\n",
                b"GET\t/admin\r\n",
                b"G<T\t/a\tHTTP/1.1\r\n",
                b"GET\tadmin\thttp/1.1\n",
                b"get\thttp://a/admin",
            ],
            Some(Detected::Http1),
        );
    }

    #[test]
    fn decides_by_max_peek() {
        let mut long = b"GET ".to_vec();
        long.resize(MAX_PEEK, b'k');
        assert_eq!(classify(&long[..MAX_PEEK - 1]), None);
        // A method and a target longer than the peek: a request line (RFC 9112 3 sets no limit).
        assert_eq!(classify(&long), Some(Detected::Http1));
        // Whitespace before a request line, as much as the peek holds.
        assert_eq!(classify(&[b'\r'; MAX_PEEK]), Some(Detected::Http1));
        let mut padded = vec![b' '; MAX_PEEK - 3];
        padded.extend_from_slice(b"GET");
        assert_eq!(classify(&padded), Some(Detected::Http1));
        let mut padded = b"GET".to_vec();
        padded.resize(MAX_PEEK, b'\t');
        assert_eq!(classify(&padded), Some(Detected::Http1));
        // No separator, or no token before it: not a request line.
        assert_eq!(classify(&[b'k'; MAX_PEEK]), OPAQUE);
        let mut binary = b"G<T ".to_vec();
        binary.resize(MAX_PEEK, b'k');
        assert_eq!(classify(&binary), OPAQUE);
    }
}
