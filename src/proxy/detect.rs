//! Protocol detection on a connection's first bytes: pure, no I/O.
//!
//! It biases towards availability for ports not known to carry HTTP: what is not recognisably
//! HTTP/1 or the HTTP/2 preface is forwarded as opaque bytes rather than refused.

#[derive(Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque(&'static str),
    Closed,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Classifies a connection's first bytes; `None` while more bytes are needed to decide.
pub fn classify(first: &[u8]) -> Option<Detected> {
    if first.is_empty() {
        return None;
    }
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Detected::Http2);
    }
    // An HTTP/1 request line starts with a token of upper-case letters and a space ("GET ",
    // "PROPFIND "). Methods are at most 16 bytes here; longer is not HTTP we want to parse.
    for (i, &b) in first.iter().enumerate().take(17) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return classify_target(&first[..i], &first[i + 1..]),
            _ => return Some(Detected::Opaque("not_http")),
        }
    }
    if first.len() >= 17 {
        Some(Detected::Opaque("not_http"))
    } else {
        None
    }
}

/// After the method: the request target must start like one (origin form `/`, asterisk form `*`,
/// absolute form `http://`, or anything after CONNECT). Text protocols whose commands are also an
/// upper-case word and a space (Redis' inline `SET key value`, `GET key`) are not HTTP.
fn classify_target(method: &[u8], target: &[u8]) -> Option<Detected> {
    let first = *target.first()?;
    if first == b'/' || first == b'*' || method == b"CONNECT" {
        return Some(Detected::Http1);
    }
    let mut undecided = false;
    for scheme in [&b"http://"[..], b"https://"] {
        let n = target.len().min(scheme.len());
        if target[..n].eq_ignore_ascii_case(&scheme[..n]) {
            if n == scheme.len() {
                return Some(Detected::Http1);
            }
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Opaque("not_http"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"PROPFIND /x"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        assert_eq!(
            classify(b"*3\r\n$3\r\nSET"),
            Some(Detected::Opaque("not_http"))
        );
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Detected::Opaque("not_http"))
        );
        assert_eq!(classify(b" GET"), Some(Detected::Opaque("not_http")));
        // Redis inline commands look like a method and a space.
        assert_eq!(
            classify(b"SET key value\r\n"),
            Some(Detected::Opaque("not_http"))
        );
        assert_eq!(classify(b"GET key\r\n"), Some(Detected::Opaque("not_http")));
        assert_eq!(classify(b"GET "), None);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"CONNECT db:5432 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GET http://a/ HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GET https://a/ HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GET http:"), None);
        assert_eq!(classify(b"GET httpx"), Some(Detected::Opaque("not_http")));
        assert_eq!(
            classify(b"AAAAAAAAAAAAAAAAAAAAAAAA"),
            Some(Detected::Opaque("not_http"))
        );
    }
}
