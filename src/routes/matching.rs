//! Which requests a route covers (`match`), decided on a [`RequestKey`]: string comparisons on
//! slices of the request's own fields (no allocation but for a path written with `;` or `//`),
//! after a [`Quick`] check that rejects most requests with a few integer operations.
//!
//! Choices (docs/routes.md, "Matching"):
//! - `pathPrefix` matches whole segments, as Gateway API's PathPrefix (`/api` matches `/api` and
//!   `/api/v1`, not `/apis`); Envoy's plain string prefix would let `/api` take `/apis`. `path` is
//!   the whole path. Both compare the path without its query, as lenient apps resolve it
//!   ([`resolved_path`]).
//! - `host` is compared case-insensitively with the authority's host, without its port and
//!   trailing dots. As Istio's short names do, a name of one label (`reviews`) also matches the
//!   longer spellings of a Kubernetes Service's DNS name, in any namespace: `reviews.<ns>`,
//!   `reviews.<ns>.svc` and `reviews.<ns>.svc.<cluster domain>`; a name of two labels
//!   (`reviews.shop`) also matches `reviews.shop.svc` and `reviews.shop.svc.<cluster domain>`.
//!   Any other name matches only itself.
//! - `grpcService` and `grpcMethod` match gRPC requests only, on their path
//!   (`/<service>/<method>`); a request that is not gRPC never matches a route that names them.

use std::borrow::Cow;

use crate::vocab::path_has_prefix;

/// What a request is matched on, read once from its head.
#[derive(Clone, Copy, Debug)]
pub struct RequestKey<'a> {
    /// The connection's original destination port.
    pub port: u16,
    /// `Host` or `:authority` as the client wrote it.
    pub authority: Option<&'a str>,
    /// The path, with its query (inbound: in the form the app resolves).
    pub path: &'a str,
    pub method: &'a http::Method,
    /// A gRPC request (`content-type: application/grpc*`).
    pub grpc: bool,
}

/// A route's `match`: every field given must match; a match without fields matches every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteMatch {
    pub port: Option<u16>,
    pub path: Option<PathMatch>,
    /// Any of these; empty: any method.
    pub methods: Vec<http::Method>,
    /// Lower case, without a port or a trailing dot; a DNS name or an IP address.
    pub host: Option<String>,
    /// A gRPC service's full name (`helloworld.Greeter`).
    pub grpc_service: Option<String>,
    /// A gRPC method's name (`SayHello`).
    pub grpc_method: Option<String>,
}

/// `path` or `pathPrefix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// The path lies under this one by whole segments.
    Prefix(String),
}

/// The parts of a key the routes compare, worked out once per lookup.
pub(super) struct Prepared<'a> {
    port: u16,
    /// The authority's host: no port, no brackets, no trailing dots.
    host: Option<&'a str>,
    /// The path without its query, resolved ([`resolved_path`]).
    path: Cow<'a, str>,
    method: &'a http::Method,
    grpc: bool,
    /// The method's bit and the heads of the host and path, for [`Quick::admits`].
    method_bit: u32,
    host_head: u128,
    path_head: u128,
}

impl<'a> Prepared<'a> {
    /// `key`, its path resolved as [`request_path`] gives it.
    pub(super) fn new(key: &RequestKey<'a>, path: Cow<'a, str>) -> Prepared<'a> {
        let host = key.authority.map(host_of);
        let path_head = head(path.as_bytes(), false).0;
        Prepared {
            port: key.port,
            host,
            path,
            method: key.method,
            grpc: key.grpc,
            method_bit: method_bit(key.method),
            host_head: host.map_or(0, |h| head(h.as_bytes(), true).0),
            path_head,
        }
    }
}

/// What a key's path is matched as: without its query, and [`resolved_path`].
pub(super) fn request_path<'a>(key: &RequestKey<'a>) -> Cow<'a, str> {
    resolved_path(key.path.split_once('?').map_or(key.path, |(path, _)| path))
}

/// The path as lenient apps resolve it, for matching only (the request goes on as it came): each
/// segment's `;parameters` dropped (Tomcat, Spring, Jetty) and empty segments merged (`//admin` is
/// `/admin` to Python's http.server, Tomcat and Spring). Otherwise a route for `/admin` (its rate
/// limit, its deadline) is walked around by writing `/admin;x` or `//admin`, which such an app
/// serves as `/admin`.
pub(crate) fn resolved_path(path: &str) -> Cow<'_, str> {
    if !path.contains(';') && !path.contains("//") {
        return Cow::Borrowed(path);
    }
    let mut resolved = String::with_capacity(path.len());
    for segment in path.split('/') {
        let segment = segment.split_once(';').map_or(segment, |(name, _)| name);
        if !segment.is_empty() {
            resolved.push('/');
            resolved.push_str(segment);
        }
    }
    // A last segment that is empty, or only parameters (`/admin/;x`), leaves a trailing `/`.
    let last = path.rsplit('/').next().unwrap_or_default();
    if resolved.is_empty() || last.split(';').next().is_none_or(str::is_empty) {
        resolved.push('/');
    }
    Cow::Owned(resolved)
}

/// A route's match reduced to what rejects most requests with a few integer operations, on data
/// that sits together: the bits of its methods, the first 16 bytes of its host, and the length,
/// first 16 and last 16 bytes of its path. It never rejects a request the match takes
/// ([`RouteMatch::matches`] checks both); what it admits, the whole match then decides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Quick {
    /// All ones when any method matches.
    methods: u32,
    host: u128,
    host_mask: u128,
    path: u128,
    path_mask: u128,
    /// The path's length (a prefix without its trailing `/`): the request's is at least that.
    path_len: usize,
    /// The path's last 16 bytes, when it is longer than 16 (the head covers a shorter one).
    path_tail: Option<u128>,
    grpc: bool,
}

impl Quick {
    pub(super) fn of(matcher: &RouteMatch) -> Quick {
        let methods = if matcher.methods.is_empty() {
            u32::MAX
        } else {
            matcher
                .methods
                .iter()
                .fold(0, |bits, m| bits | method_bit(m))
        };
        // A host matches in any case and as the first bytes of the request's host.
        let (host, host_mask) = matcher
            .host
            .as_deref()
            .map_or((0, 0), |h| head(h.as_bytes(), true));
        // An exact path and a prefix (without its trailing `/`) begin the request's path.
        let begins = match &matcher.path {
            None => "",
            Some(PathMatch::Exact(p)) => p,
            Some(PathMatch::Prefix(p)) => p.trim_end_matches('/'),
        };
        let (path, path_mask) = head(begins.as_bytes(), false);
        let path_tail = (begins.len().checked_sub(16))
            .and_then(|from| begins.as_bytes().get(from..))
            .map(|tail| head(tail, false).0);
        Quick {
            methods,
            host,
            host_mask,
            path,
            path_mask,
            path_len: begins.len(),
            path_tail,
            grpc: matcher.grpc_service.is_some() || matcher.grpc_method.is_some(),
        }
    }

    /// False only for a request the match does not take.
    pub(super) fn admits(&self, key: &Prepared<'_>) -> bool {
        self.methods & key.method_bit != 0
            && key.host_head & self.host_mask == self.host
            && key.path_head & self.path_mask == self.path
            && key.path.len() >= self.path_len
            && self.path_tail.is_none_or(|tail| {
                // The 16 bytes of the request's path where the route's path ends.
                let from = self.path_len.saturating_sub(16);
                (key.path.as_bytes().get(from..self.path_len))
                    .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                    .is_some_and(|bytes| u128::from_le_bytes(bytes) == tail)
            })
            && (key.grpc || !self.grpc)
    }
}

/// The first 16 bytes of `bytes` (ASCII lower case if `fold`), zero-padded, and the mask of those
/// that are there. A request without a host has head 0, which no route's host (never NUL) matches.
fn head(bytes: &[u8], fold: bool) -> (u128, u128) {
    let mut word = [0u8; 16];
    let mut mask = [0u8; 16];
    for (i, &b) in bytes.iter().take(16).enumerate() {
        word[i] = if fold { b.to_ascii_lowercase() } else { b };
        mask[i] = 0xff;
    }
    (u128::from_le_bytes(word), u128::from_le_bytes(mask))
}

/// One bit per standard method; every other method shares the last bit (the whole match then
/// compares it).
fn method_bit(method: &http::Method) -> u32 {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    let name = method.as_str();
    STANDARD
        .iter()
        .position(|m| m.eq_ignore_ascii_case(name))
        .map_or(1 << 31, |i| 1 << i)
}

impl RouteMatch {
    /// Whether the request `key` is one of this match's: for a single check (lookups go through
    /// [`super::RouteTable`], which prepares the key and the quick checks once).
    pub fn matches(&self, key: &RequestKey<'_>) -> bool {
        let key = Prepared::new(key, request_path(key));
        Quick::of(self).admits(&key) && self.matches_prepared(&key)
    }

    /// The cheap and most telling comparisons first.
    pub(super) fn matches_prepared(&self, key: &Prepared<'_>) -> bool {
        if self.port.is_some_and(|port| port != key.port) {
            return false;
        }
        // Any case: apps that upper-case methods (Symfony, Laravel) serve `post` as POST.
        let named = |m: &http::Method| m.as_str().eq_ignore_ascii_case(key.method.as_str());
        if !self.methods.is_empty() && !self.methods.iter().any(named) {
            return false;
        }
        if let Some(want) = &self.host
            && !key.host.is_some_and(|host| host_matches(want, host))
        {
            return false;
        }
        let path_matches = match &self.path {
            None => true,
            Some(PathMatch::Exact(want)) => *key.path == **want,
            Some(PathMatch::Prefix(prefix)) => path_has_prefix(&key.path, prefix),
        };
        path_matches && self.grpc_matches(key)
    }

    fn grpc_matches(&self, key: &Prepared<'_>) -> bool {
        if self.grpc_service.is_none() && self.grpc_method.is_none() {
            return true;
        }
        let Some((service, method)) = key.grpc.then(|| grpc_parts(&key.path)).flatten() else {
            return false;
        };
        self.grpc_service.as_deref().is_none_or(|s| s == service)
            && self.grpc_method.as_deref().is_none_or(|m| m == method)
    }
}

/// A gRPC request's service and method: its path is `/<service>/<method>`.
fn grpc_parts(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// An authority's host: `reviews:9080` is `reviews`, `[fd00::1]:80` is `fd00::1`, and a trailing
/// dot goes (`reviews.` is `reviews`).
fn host_of(authority: &str) -> &str {
    let host = match authority.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(ip, _)| ip),
        None => match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        },
    };
    host.trim_end_matches('.')
}

/// Whether the request's `host` is `want` (lower case), or one of the longer spellings of the
/// Kubernetes Service `want` names (the module's doc says which).
fn host_matches(want: &str, host: &str) -> bool {
    let Some(head) = host.get(..want.len()) else {
        return false;
    };
    if !head.eq_ignore_ascii_case(want) {
        return false;
    }
    let Some(rest) = host.get(want.len()..) else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let Some(rest) = rest.strip_prefix('.') else {
        return false;
    };
    if want.contains(':') {
        // An IPv6 address: itself only.
        return false;
    }
    match want.bytes().filter(|b| *b == b'.').count() {
        // `<name>.<ns>`, maybe followed by `.svc` and a cluster domain.
        0 => match rest.split_once('.') {
            None => !rest.is_empty(),
            Some((namespace, after)) => !namespace.is_empty() && is_service_suffix(after),
        },
        // `<name>.<ns>` given: `.svc` and a cluster domain may follow.
        1 => is_service_suffix(rest),
        _ => false,
    }
}

/// `svc`, or `svc.` and a cluster domain (`svc.cluster.local`).
fn is_service_suffix(s: &str) -> bool {
    match s.get(..3) {
        Some(svc) if svc.eq_ignore_ascii_case("svc") => {
            let domain = s.get(3..).unwrap_or_default();
            domain.is_empty() || domain.strip_prefix('.').is_some_and(|d| !d.is_empty())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn key<'a>(authority: Option<&'a str>, path: &'a str, method: &'a Method) -> RequestKey<'a> {
        RequestKey {
            port: 80,
            authority,
            path,
            method,
            grpc: false,
        }
    }

    #[test]
    fn hosts_and_their_service_spellings() {
        // (pattern, authority, matches)
        let cases = [
            ("reviews", "reviews", true),
            ("reviews", "REVIEWS:9080", true),
            ("reviews", "reviews.", true),
            ("reviews", "reviews..:80", true),
            ("reviews", "reviews.shop", true),
            ("reviews", "reviews.shop.svc", true),
            ("reviews", "reviews.shop.svc.cluster.local", true),
            ("reviews", "reviews.shop.svc.cluster.local.:80", true),
            ("reviews", "reviews.shop.svc.", true),
            ("reviews", "reviews.shop.example.com", false),
            ("reviews", "reviews.shop.svcx", false),
            ("reviews", "reviewsx", false),
            ("reviews", "reviews..svc", false),
            ("reviews", "reviews.shop.", true),
            ("reviews", "ratings", false),
            ("reviews", "rev", false),
            ("reviews.shop", "reviews.shop", true),
            ("reviews.shop", "reviews.shop.svc.cluster.local", true),
            ("reviews.shop", "reviews.shop.svc.x", true),
            ("reviews.shop", "reviews", false),
            ("reviews.shop", "reviews.shop.example", false),
            (
                "reviews.shop.svc.cluster.local",
                "reviews.shop.svc.cluster.local",
                true,
            ),
            ("reviews.shop.svc.cluster.local", "reviews.shop", false),
            ("api.example.com", "api.example.com:443", true),
            ("api.example.com", "api.example.com.svc", false),
            ("198.18.0.7", "198.18.0.7:8080", true),
            ("198.18.0.7", "198.18.0.70", false),
            ("fd00::1", "[fd00::1]:80", true),
            ("fd00::1", "[fd00::1]", true),
            // Longer than the quick check's 16 bytes, and in another case.
            (
                "reviews-headless-v2.shop",
                "Reviews-Headless-V2.Shop.svc.cluster.local",
                true,
            ),
            (
                "reviews-headless-v2.shop",
                "reviews-headless-v2.shoq",
                false,
            ),
            ("Reviews", "reviews.shop", true),
            // Not a host with a port: the whole text is compared.
            ("reviews", "reviews:http", false),
            ("réviews", "r", false),
        ];
        for (want, authority, matches) in cases {
            let m = RouteMatch {
                host: Some(want.into()),
                ..RouteMatch::default()
            };
            assert_eq!(
                m.matches(&key(Some(authority), "/", &Method::GET)),
                matches,
                "{want} ~ {authority}"
            );
        }
        let m = RouteMatch {
            host: Some("reviews".into()),
            ..RouteMatch::default()
        };
        assert!(!m.matches(&key(None, "/", &Method::GET)), "no authority");
    }

    #[test]
    fn paths_methods_and_ports() {
        let prefix = RouteMatch {
            port: Some(80),
            path: Some(PathMatch::Prefix("/api".into())),
            methods: vec![Method::GET, Method::POST],
            ..RouteMatch::default()
        };
        let exact = RouteMatch {
            path: Some(PathMatch::Exact("/version".into())),
            ..RouteMatch::default()
        };
        let long_prefix = RouteMatch {
            path: Some(PathMatch::Prefix("/api/v1/catalogue/items/".into())),
            ..RouteMatch::default()
        };
        let long_exact = RouteMatch {
            path: Some(PathMatch::Exact("/api/v1/catalogue/items/7".into())),
            ..RouteMatch::default()
        };
        let purge = RouteMatch {
            methods: vec![Method::from_bytes(b"PURGE").expect("method")],
            ..RouteMatch::default()
        };
        let get = &Method::GET;
        // (match, path, method, port, matches)
        let cases = [
            (&prefix, "/api", get, 80, true),
            (&prefix, "/api/v1?x=/y", get, 80, true),
            (&prefix, "/api?x", &Method::POST, 80, true),
            (&prefix, "/apis", get, 80, false),
            (&prefix, "/api", &Method::PUT, 80, false),
            (&prefix, "/api", get, 81, false),
            (&exact, "/version", get, 1, true),
            (&exact, "/version?full=1", get, 1, true),
            (&exact, "/version/", get, 1, false),
            (&exact, "/Version", get, 1, false),
            // Longer than the quick check's head: its tail and length are compared too.
            (&long_prefix, "/api/v1/catalogue/items", get, 1, true),
            (&long_prefix, "/api/v1/catalogue/items/7?x", get, 1, true),
            (&long_prefix, "/api/v1/catalogue/itemsx", get, 1, false),
            (&long_prefix, "/api/v1/catalogue/item", get, 1, false),
            (&long_prefix, "/api/v1/catalogueXitems", get, 1, false),
            (&long_exact, "/api/v1/catalogue/items/7", get, 1, true),
            (&long_exact, "/api/v1/catalogue/items/7/", get, 1, false),
            (&long_exact, "/api/v2/catalogue/items/7", get, 1, false),
            // As lenient apps resolve the path: `;parameters` dropped, empty segments merged.
            (&prefix, "//api", get, 80, true),
            (&prefix, "/api;jsessionid=1/v1", get, 80, true),
            (&prefix, "/;/api", get, 80, true),
            (&exact, "/version;x", get, 1, true),
            (&exact, "///version", get, 1, true),
            (
                &prefix,
                "/api",
                &Method::from_bytes(b"post").expect("method"),
                80,
                true,
            ),
            (
                &prefix,
                "/api",
                &Method::from_bytes(b"put").expect("method"),
                80,
                false,
            ),
            (&exact, "/version;x/", get, 1, false),
            (&exact, "/version/;x", get, 1, false),
            (&long_exact, "/api//v1/catalogue;a/items/7;b", get, 1, true),
            (
                &purge,
                "/",
                &Method::from_bytes(b"PURGE").expect("method"),
                1,
                true,
            ),
            (
                &purge,
                "/",
                &Method::from_bytes(b"BREW").expect("method"),
                1,
                false,
            ),
            (&purge, "/", get, 1, false),
        ];
        for (m, path, method, port, matches) in cases {
            let key = RequestKey {
                port,
                ..key(None, path, method)
            };
            assert_eq!(m.matches(&key), matches, "{m:?} ~ {port} {method} {path}");
        }
        assert!(RouteMatch::default().matches(&key(None, "*", &Method::OPTIONS)));
    }

    #[test]
    fn paths_resolved_as_lenient_apps_resolve_them() {
        for (path, resolved) in [
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/admin;jsessionid=1", "/admin"),
            ("/;/admin;", "/admin"),
            ("/a;x/b//c/", "/a/b/c/"),
            ("/admin/;x", "/admin/"),
            ("/admin/;", "/admin/"),
            ("/admin;x", "/admin"),
            ("//", "/"),
            (";", "/"),
        ] {
            assert_eq!(resolved_path(path), resolved, "{path}");
        }
        assert!(matches!(resolved_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn grpc_fields_match_grpc_requests_only() {
        let service = RouteMatch {
            grpc_service: Some("helloworld.Greeter".into()),
            ..RouteMatch::default()
        };
        let method = RouteMatch {
            grpc_method: Some("SayHello".into()),
            ..RouteMatch::default()
        };
        let both = RouteMatch {
            grpc_service: Some("helloworld.Greeter".into()),
            grpc_method: Some("SayHello".into()),
            ..RouteMatch::default()
        };
        let post = &Method::POST;
        let grpc = |path| RequestKey {
            grpc: true,
            ..key(None, path, post)
        };
        for (m, k, matches) in [
            (&service, grpc("/helloworld.Greeter/SayHello"), true),
            (&service, grpc("/helloworld.Greeter/SayBye"), true),
            (&service, grpc("/helloworld.Greeterx/SayHello"), false),
            (&service, grpc("/helloworld.Greeter"), false),
            (&service, grpc("/helloworld.Greeter/"), false),
            (&service, grpc("/helloworld.Greeter/a/b"), false),
            (
                &service,
                key(None, "/helloworld.Greeter/SayHello", post),
                false,
            ),
            (&method, grpc("/other.Service/SayHello"), true),
            (&method, grpc("/other.Service/SayHi"), false),
            (&both, grpc("/helloworld.Greeter/SayHello"), true),
            (&both, grpc("/other.Greeter/SayHello"), false),
        ] {
            assert_eq!(m.matches(&k), matches, "{m:?} ~ {k:?}");
        }
    }
}
