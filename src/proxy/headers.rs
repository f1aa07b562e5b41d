//! Header rewriting: pure functions over `HeaderMap`, applied on the way to the app and back.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static SERVER_VALUE: HeaderValue = HeaderValue::from_static("amazing-proxy");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop fields of RFC 9110 section 7.6.1: `Connection` and every field it names,
/// plus `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`.
/// `TE: trailers` survives because gRPC requires it end to end over HTTP/2.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` are kept for a protocol switch.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(list) = connection.to_str() {
            for token in list.split(',').map(str::trim) {
                if keep_upgrade && token.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes())
                    && name != header::TE
                {
                    headers.remove(&name);
                }
            }
        }
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if let Some(te) = headers.get(header::TE) {
        let trailers_only = te
            .to_str()
            .map(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false);
        if trailers_only {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

/// Whether the request asks to switch protocols (WebSocket and others): `Connection: upgrade`
/// together with an `Upgrade` field.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// Adds the fields an app behind a proxy expects: `x-forwarded-for` (appended), `x-forwarded-proto`
/// (kept when an earlier hop set it: it knows the client's real scheme), and `x-request-id` when
/// the request has none. Returns the request id.
pub fn add_forwarding(
    headers: &mut HeaderMap,
    client_ip: IpAddr,
    scheme: &'static str,
) -> HeaderValue {
    let mut ip_buf = [0u8; 48];
    let ip = format_ip(client_ip, &mut ip_buf);
    let forwarded = match headers.get(&X_FORWARDED_FOR) {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(ip);
            HeaderValue::from_bytes(&v)
        }
        _ => HeaderValue::from_bytes(ip),
    };
    if let Ok(value) = forwarded {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
    }
    match headers.get(&X_REQUEST_ID) {
        Some(id) => id.clone(),
        None => {
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
    let len = cursor.position() as usize;
    &buf[..len]
}

/// A random (version 4) UUID. `fastrand` is seeded once per thread: request ids need to be unique,
/// not unpredictable, and a syscall per request would cost more than the rest of this function.
pub fn new_request_id() -> HeaderValue {
    let bytes = fastrand::u128(..).to_le_bytes();
    let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid.hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The response on its way back: hop-by-hop fields removed and our `Server`.
pub fn prepare_response(headers: &mut HeaderMap, keep_upgrade: bool) {
    remove_hop_by_hop(headers, keep_upgrade);
    headers.insert(header::SERVER, SERVER_VALUE.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = map(&[("te", "trailers")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }

    #[test]
    fn upgrade_is_kept_when_switching_protocols() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
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
    fn forwarding_fields() {
        let mut h = map(&[("x-forwarded-for", "203.0.113.9")]);
        let id = add_forwarding(&mut h, "198.18.0.1".parse().expect("ip"), "http");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 198.18.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-request-id"], id);
        assert_eq!(id.len(), 36);

        let mut h = map(&[("x-request-id", "given"), ("x-forwarded-proto", "https")]);
        let id = add_forwarding(&mut h, "::1".parse().expect("ip"), "http");
        assert_eq!(id, "given");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn request_ids_are_uuid_v4_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[14], b'4');
    }

    #[test]
    fn response_gets_our_server() {
        let mut h = map(&[("server", "gunicorn"), ("connection", "close")]);
        prepare_response(&mut h, false);
        assert_eq!(h["server"], "amazing-proxy");
        assert!(!h.contains_key("connection"));
    }
}
