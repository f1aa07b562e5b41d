//! The routes of one direction, in the file's order, and the lookup that finds the first one a
//! request matches. The lookup never scans routes that cannot match: the routes are indexed once,
//! at load, by port and then by the first segment of the path they name (`/api/v1` names `api`; a
//! gRPC service names its own), so a request's candidates are two binary searches away: the
//! routes of its port and its first segment, and those that name no port or no path, in the
//! file's order. Each candidate is then screened by its [`Quick`] check (a few integer operations
//! on data that sits together) and compared whole only if that admits it; nothing is allocated.

use std::ops::Deref;
use std::time::Duration;

use super::matching::{PathMatch, Prepared, Quick, RequestKey, RouteMatch, request_path};
use super::spec::{Balance, ConcurrencySpec, EndpointsSpec, OutlierSpec, RateLimitSpec, RetrySpec};

/// One route: which requests, and what applies to them.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// The file's `name`, else the route's place: `inbound[0]`, `outbound[2]`. Unique in a file.
    pub name: String,
    pub matcher: RouteMatch,
    /// The whole exchange's bound.
    pub timeout: Option<Duration>,
    /// Outbound only.
    pub retry: Option<RetrySpec>,
    pub rate_limit: Option<RateLimitSpec>,
    pub concurrency: Option<ConcurrencySpec>,
    /// Outbound only: where the requests go instead of their original destination.
    pub endpoints: Option<EndpointsSpec>,
    /// Outbound only, with `endpoints`.
    pub balance: Balance,
    /// Outbound only, with `endpoints`.
    pub outlier: Option<OutlierSpec>,
}

/// The routes of one direction, read as a slice (`&table[0]`, `table.iter()`, `table.len()`);
/// built at load only, so that the index always describes the routes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Each route's quick check, by the same index: compared before the route itself.
    quick: Vec<Quick>,
    /// The ports some route names, sorted, each with the routes a request to it may take: the
    /// port's own and those that name no port.
    by_port: Vec<(u16, Candidates)>,
    /// The routes that name no port: a request to any other port may take only these.
    any_port: Candidates,
}

/// The routes a request may take, by the first segment of its path, each list in the file's
/// order.
#[derive(Clone, Debug, Default, PartialEq)]
struct Candidates {
    /// The segments some route names, sorted, each with its routes and those that name none.
    by_segment: Vec<(Box<str>, Box<[u32]>)>,
    /// The routes that name no segment (no path, `pathPrefix: /`, a gRPC method of any service):
    /// a request whose first segment no route names may take only these.
    any_segment: Box<[u32]>,
}

impl Candidates {
    /// `routes` (indices in the file's order) indexed by the segment each names.
    fn new(routes: &[Route], indices: impl Iterator<Item = usize> + Clone) -> Candidates {
        let index = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        let segment = |i: usize| routes.get(i).and_then(|r| named_segment(&r.matcher));
        let mut segments: Vec<&str> = indices.clone().filter_map(segment).collect();
        segments.sort_unstable();
        segments.dedup();
        let by_segment = segments
            .into_iter()
            .map(|named| {
                let routes = (indices.clone())
                    .filter(|&i| segment(i).is_none_or(|s| s == named))
                    .map(index)
                    .collect();
                (Box::from(named), routes)
            })
            .collect();
        let any_segment = indices
            .filter(|&i| segment(i).is_none())
            .map(index)
            .collect();
        Candidates {
            by_segment,
            any_segment,
        }
    }

    fn of(&self, path: &str) -> &[u32] {
        let segment = first_segment(path);
        match (self.by_segment).binary_search_by(|(named, _)| (**named).cmp(segment)) {
            Ok(at) => &self.by_segment[at].1,
            Err(_) => &self.any_segment,
        }
    }
}

/// The first segment of a path (without its query): `/api/v1?x` is `api`, `/` is empty.
fn first_segment(path: &str) -> &str {
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let rest = path.strip_prefix('/').unwrap_or(path);
    rest.split_once('/').map_or(rest, |(segment, _)| segment)
}

/// The first segment every path a match takes has, if it names one: an exact path's, a prefix's
/// (`/` names none), a gRPC service's.
fn named_segment(matcher: &RouteMatch) -> Option<&str> {
    match &matcher.path {
        Some(PathMatch::Exact(path)) => Some(first_segment(path)),
        Some(PathMatch::Prefix(prefix)) => {
            let prefix = prefix.trim_end_matches('/');
            (!prefix.is_empty()).then(|| first_segment(prefix))
        }
        None => matcher.grpc_service.as_deref(),
    }
}

impl RouteTable {
    pub(super) fn new(routes: Vec<Route>) -> RouteTable {
        let mut ports: Vec<u16> = routes.iter().filter_map(|r| r.matcher.port).collect();
        ports.sort_unstable();
        ports.dedup();
        let by_port = ports
            .into_iter()
            .map(|port| {
                let candidates =
                    (0..routes.len()).filter(|&i| routes[i].matcher.port.is_none_or(|p| p == port));
                (port, Candidates::new(&routes, candidates))
            })
            .collect();
        let any_port = (0..routes.len()).filter(|&i| routes[i].matcher.port.is_none());
        RouteTable {
            quick: routes.iter().map(|r| Quick::of(&r.matcher)).collect(),
            any_port: Candidates::new(&routes, any_port),
            routes,
            by_port,
        }
    }

    /// The first route that matches the request.
    pub fn find(&self, key: &RequestKey<'_>) -> Option<&Route> {
        self.find_index(key).and_then(|i| self.routes.get(i))
    }

    /// The place of the first route that matches the request (the data plane keeps each route's
    /// running state by it).
    pub fn find_index(&self, key: &RequestKey<'_>) -> Option<usize> {
        let path = request_path(key);
        let candidates = match self
            .by_port
            .binary_search_by_key(&key.port, |(port, _)| *port)
        {
            Ok(at) => &self.by_port[at].1,
            Err(_) => &self.any_port,
        }
        .of(&path);
        if candidates.is_empty() {
            return None;
        }
        let key = Prepared::new(key, path);
        candidates
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| self.quick.get(i).is_some_and(|q| q.admits(&key)))
            .find(|&i| {
                self.routes
                    .get(i)
                    .is_some_and(|route| route.matcher.matches_prepared(&key))
            })
    }
}

impl Deref for RouteTable {
    type Target = [Route];
    fn deref(&self) -> &[Route] {
        &self.routes
    }
}

impl<'a> IntoIterator for &'a RouteTable {
    type Item = &'a Route;
    type IntoIter = std::slice::Iter<'a, Route>;
    fn into_iter(self) -> Self::IntoIter {
        self.routes.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::matching::PathMatch;
    use http::Method;

    fn route(name: &str, port: Option<u16>, prefix: &str) -> Route {
        Route {
            name: name.into(),
            matcher: RouteMatch {
                port,
                path: Some(PathMatch::Prefix(prefix.into())),
                ..RouteMatch::default()
            },
            timeout: None,
            retry: None,
            rate_limit: None,
            concurrency: None,
            endpoints: None,
            balance: Balance::default(),
            outlier: None,
        }
    }

    fn find<'t>(table: &'t RouteTable, port: u16, path: &str) -> Option<&'t str> {
        let key = RequestKey {
            port,
            authority: Some("x"),
            path,
            method: &Method::GET,
            grpc: false,
        };
        table.find(&key).map(|r| r.name.as_str())
    }

    #[test]
    fn first_match_wins_across_ported_and_portless_routes() {
        let table = RouteTable::new(vec![
            route("a", Some(80), "/api"),
            route("b", None, "/api/v1"),
            route("c", Some(80), "/"),
            route("d", None, "/"),
            route("e", Some(8080), "/api"),
        ]);
        assert_eq!(find(&table, 80, "/api/v1"), Some("a"));
        assert_eq!(find(&table, 80, "/other"), Some("c"));
        assert_eq!(find(&table, 8080, "/api/v1"), Some("b"));
        assert_eq!(find(&table, 8080, "/api"), Some("d"));
        assert_eq!(find(&table, 9090, "/api/v1"), Some("b"));
        assert_eq!(find(&table, 9090, "/x"), Some("d"));
        assert_eq!(table.len(), 5);
        assert_eq!(
            table.iter().map(|r| r.name.as_str()).collect::<String>(),
            "abcde"
        );
    }

    /// The segment index only narrows: every route that could match is a candidate, in order.
    #[test]
    fn first_match_wins_across_segments_and_routes_that_name_none() {
        let exact = |name: &str, path: &str| {
            let mut r = route(name, None, "/");
            r.matcher.path = Some(PathMatch::Exact(path.into()));
            r
        };
        let table = RouteTable::new(vec![
            route("a", None, "/api/v2"),
            exact("b", "/"),
            route("c", None, "/"),
            route("d", None, "/api"),
            exact("e", "/api"),
            route("f", None, "/*"),
        ]);
        assert_eq!(find(&table, 80, "/api/v2/x?q=1"), Some("a"));
        assert_eq!(find(&table, 80, "/api/v1"), Some("c"));
        assert_eq!(find(&table, 80, "/?q"), Some("b"));
        assert_eq!(find(&table, 80, "/apis"), Some("c"));
        assert_eq!(find(&table, 80, "*"), Some("c"));
        let later = RouteTable::new(vec![
            route("a", None, "/api/v2"),
            route("d", None, "/api"),
            exact("e", "/api"),
            route("f", None, "/*"),
            route("g", Some(80), "/"),
        ]);
        assert_eq!(find(&later, 80, "/api/v1"), Some("d"));
        assert_eq!(find(&later, 80, "/api"), Some("d"));
        assert_eq!(find(&later, 80, "/*/x"), Some("f"));
        assert_eq!(find(&later, 80, "/other"), Some("g"));
        assert_eq!(find(&later, 81, "/other"), None);
        assert_eq!(first_segment("/a/b?c"), "a");
        assert_eq!(first_segment("/?c"), "");
        assert_eq!(first_segment("/a?c/d"), "a");
    }

    /// The indexed lookup agrees with a plain scan of every route, over tables and requests made
    /// of the same few ports, segments and shapes.
    #[test]
    fn the_index_agrees_with_a_scan() {
        let paths = ["/", "/a", "/a/", "/a/b", "/ab", "/b", "/b/a", "/a/b/c"];
        let ports = [None, Some(80), Some(81)];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for _ in 0..300 {
            let routes: Vec<Route> = (0..next(8) + 1)
                .map(|i| {
                    let mut r = route(&i.to_string(), ports[next(3)], paths[next(paths.len())]);
                    r.matcher.path = match next(3) {
                        0 => None,
                        1 => Some(PathMatch::Exact(paths[next(paths.len())].into())),
                        _ => r.matcher.path,
                    };
                    r
                })
                .collect();
            let table = RouteTable::new(routes.clone());
            for port in [80, 81, 82] {
                for path in paths.iter().chain(&["/a?x", "/b/?y", "*"]) {
                    let key = RequestKey {
                        port,
                        authority: Some("x"),
                        path,
                        method: &Method::GET,
                        grpc: false,
                    };
                    let scanned = routes.iter().find(|r| r.matcher.matches(&key));
                    assert_eq!(
                        table.find(&key).map(|r| &r.name),
                        scanned.map(|r| &r.name),
                        "{port} {path} in {routes:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn ports_without_routes_find_nothing() {
        let table = RouteTable::new(vec![route("a", Some(80), "/")]);
        assert_eq!(find(&table, 80, "/x"), Some("a"));
        assert_eq!(find(&table, 81, "/x"), None);
        assert_eq!(find(&RouteTable::default(), 80, "/x"), None);
    }
}
