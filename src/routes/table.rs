//! The routes of one direction, in the file's order, and the lookup that finds the first one a
//! request matches. The lookup never scans routes that name another port: the routes are indexed
//! by port once, at load, so a request's candidates are one binary search away. Each candidate is
//! then screened by its [`Quick`] check (a few integer operations on data that sits together) and
//! compared whole only if that admits it; nothing is allocated.

use std::ops::Deref;
use std::time::Duration;

use super::matching::{Prepared, Quick, RequestKey, RouteMatch};
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
    /// The ports some route names, sorted, each with the routes a request to it may take, in the
    /// file's order: the port's own and those that name no port.
    by_port: Vec<(u16, Box<[u32]>)>,
    /// The routes that name no port, in order: a request to any other port may take only these.
    any_port: Box<[u32]>,
}

impl RouteTable {
    pub(super) fn new(routes: Vec<Route>) -> RouteTable {
        let index = |i: usize| u32::try_from(i).unwrap_or(u32::MAX);
        let mut ports: Vec<u16> = routes.iter().filter_map(|r| r.matcher.port).collect();
        ports.sort_unstable();
        ports.dedup();
        let by_port = ports
            .into_iter()
            .map(|port| {
                let candidates = (routes.iter().enumerate())
                    .filter(|(_, r)| r.matcher.port.is_none_or(|p| p == port))
                    .map(|(i, _)| index(i))
                    .collect();
                (port, candidates)
            })
            .collect();
        let any_port = (routes.iter().enumerate())
            .filter(|(_, r)| r.matcher.port.is_none())
            .map(|(i, _)| index(i))
            .collect();
        RouteTable {
            quick: routes.iter().map(|r| Quick::of(&r.matcher)).collect(),
            routes,
            by_port,
            any_port,
        }
    }

    /// The first route that matches the request.
    pub fn find(&self, key: &RequestKey<'_>) -> Option<&Route> {
        self.find_index(key).and_then(|i| self.routes.get(i))
    }

    /// The place of the first route that matches the request (the data plane keeps each route's
    /// running state by it).
    pub fn find_index(&self, key: &RequestKey<'_>) -> Option<usize> {
        let candidates = match self
            .by_port
            .binary_search_by_key(&key.port, |(port, _)| *port)
        {
            Ok(at) => &self.by_port[at].1,
            Err(_) => &self.any_port,
        };
        if candidates.is_empty() {
            return None;
        }
        let key = Prepared::new(key);
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

    #[test]
    fn ports_without_routes_find_nothing() {
        let table = RouteTable::new(vec![route("a", Some(80), "/")]);
        assert_eq!(find(&table, 80, "/x"), Some("a"));
        assert_eq!(find(&table, 81, "/x"), None);
        assert_eq!(find(&RouteTable::default(), 80, "/x"), None);
    }
}
