//! Traffic policy per route, from one file (`--routes FILE`, schema in docs/routes.md): which
//! requests a route covers, and what applies to them: a timeout, retries under one budget, rate
//! and concurrency limits, and, outbound, the endpoints, how to balance over them and when to
//! leave one out.
//!
//! This module reads and validates the file (every error names the field, as
//! `inbound[0].rateLimit.burst: must be at least 1`, and says what to write) and answers which
//! route a request takes: the first of its direction whose `match` it satisfies. It decides
//! nothing else and does no I/O but reading the file: the data plane applies the specs.
//!
//! A lookup allocates nothing and compares only the routes that could match the request's port:
//! the routes are indexed by port at load ([`RouteTable`]). The pieces:
//! - [`spec`]: the values a route applies (plain data);
//! - [`matching`]: a route's `match` against a [`RequestKey`];
//! - [`table`]: a direction's routes and their index;
//! - [`parse`]: the file, read field by field.

mod matching;
mod parse;
mod spec;
mod table;

use std::io::Read;
use std::path::{Path, PathBuf};

pub use matching::{PathMatch, RequestKey, RouteMatch};
pub use spec::{
    Balance, ConcurrencySpec, EndpointsSpec, OutlierSpec, RateLimitSpec, RetryBudgetSpec, RetryOn,
    RetrySpec,
};
pub use table::{Route, RouteTable};

/// The largest routes file read: far above what [`parse::MAX_ROUTES`] routes take.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// A routes file's content. `Routes::default()` has no routes: every request takes none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routes {
    /// `retryBudget`; `None` when the file has none (retries then get
    /// [`RetryBudgetSpec::default`]).
    pub retry_budget: Option<RetryBudgetSpec>,
    /// Requests to this pod's app.
    pub inbound: RouteTable,
    /// Requests this pod's app sends.
    pub outbound: RouteTable,
}

/// A `--routes` file: where it was read from (to read it again when it changes) and what it said.
#[derive(Clone, Debug)]
pub struct RoutesFile {
    pub path: PathBuf,
    pub routes: Routes,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("cannot read the routes file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// `message` starts with the field's path: `inbound[0].timeout: ...`.
    #[error("{}{message}", file_prefix(.path))]
    Invalid {
        /// The file; `None` for text given as such.
        path: Option<PathBuf>,
        message: String,
    },
}

fn file_prefix(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

impl Routes {
    /// Parses and validates a routes file's text.
    pub fn from_yaml(text: &str) -> Result<Routes, RoutesError> {
        Routes::parse(text, None)
    }

    /// Reads and validates the routes file at `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Routes, RoutesError> {
        let read_error = |error| RoutesError::Read {
            path: path.to_owned(),
            error,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text))
            .map_err(read_error)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(RoutesError::Invalid {
                path: Some(path.to_owned()),
                message: format!(
                    "the file is larger than {} KiB; a routes file of {} routes is far smaller: is it the right file?",
                    MAX_FILE_BYTES / 1024,
                    parse::MAX_ROUTES
                ),
            });
        }
        Routes::parse(&text, Some(path))
    }

    fn parse(text: &str, path: Option<&Path>) -> Result<Routes, RoutesError> {
        let parsed = parse::parse(text).map_err(|message| RoutesError::Invalid {
            path: path.map(Path::to_owned),
            message,
        })?;
        Ok(Routes {
            retry_budget: parsed.retry_budget,
            inbound: RouteTable::new(parsed.inbound),
            outbound: RouteTable::new(parsed.outbound),
        })
    }

    /// The route of a request to this pod's app: the first inbound route it matches.
    pub fn inbound_route(&self, key: &RequestKey<'_>) -> Option<&Route> {
        self.inbound.find(key)
    }

    /// The route of a request this pod's app sends: the first outbound route it matches.
    pub fn outbound_route(&self, key: &RequestKey<'_>) -> Option<&Route> {
        self.outbound.find(key)
    }
}

impl RoutesFile {
    /// Reads and validates the routes file at `path`.
    pub fn load(path: &Path) -> Result<RoutesFile, RoutesError> {
        Ok(RoutesFile {
            path: path.to_owned(),
            routes: Routes::load(path)?,
        })
    }
}

#[cfg(test)]
mod tests {
    /// The lookup's cost for the benchmark's request against bench/peerbench/routes-100.yaml
    /// (99 routes it does not take, then a catch-all). A measurement, not a test: run it built
    /// for release, `cargo test --release --lib routes::tests::lookup_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a microbenchmark: run by hand, built for release"]
    fn lookup_cost() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench/peerbench/routes-100.yaml");
        let routes = Routes::load(&path).expect("the benchmark's routes");
        let key = RequestKey {
            port: 18080,
            authority: Some("127.0.0.1:18000"),
            path: "/get?query=param",
            method: &http::Method::GET,
            grpc: false,
        };
        const CALLS: u32 = 2_000_000;
        let start = std::time::Instant::now();
        for _ in 0..CALLS {
            std::hint::black_box(routes.inbound_route(std::hint::black_box(&key)));
        }
        let each = start.elapsed().as_nanos() as f64 / f64::from(CALLS);
        eprintln!("100 routes, the benchmark's request: {each:.1} ns a lookup");
        assert_eq!(
            routes.inbound_route(&key).map(|r| r.name.as_str()),
            Some("everything")
        );
    }

    use std::net::SocketAddr;
    use std::time::Duration;

    use http::Method;

    use super::*;

    /// The file of issue 19, as written there.
    const ISSUE: &str = r#"
retryBudget: {ratio: 0.2, minPerSecond: 10}     # retries at most 20 % of requests, plus 10/s
inbound:                                        # requests to this pod's app, first match wins
  - match: {port: 80, pathPrefix: /api, methods: [GET, POST]}   # also: path (exact), grpcService, grpcMethod
    timeout: 2s                                 # whole request: 504, or DEADLINE_EXCEEDED for gRPC
    rateLimit: {requestsPerSecond: 100, burst: 50, perPeer: 10}  # 429 + Retry-After; RESOURCE_EXHAUSTED
    concurrency: {max: 32, queue: 64, queueTimeout: 1s}          # past it: 503 + Retry-After; UNAVAILABLE
outbound:                                       # requests this pod's app sends
  - match: {host: reviews, port: 9080}          # the authority as the app wrote it (Host or :authority)
    timeout: 1s
    retry: {on: [connect-failure, reset, "503", unavailable], attempts: 2, perTryTimeout: 300ms, backoff: 25ms}
    endpoints: {dns: reviews-headless.default.svc.cluster.local}  # or: static: ["198.18.1.2:9080", ...]
    balance: p2c-ewma                           # or round-robin
    outlier: {consecutiveFailures: 5, ejectFor: 30s, maxEjectedPercent: 50}
"#;

    fn key<'a>(port: u16, authority: &'a str, path: &'a str, method: &'a Method) -> RequestKey<'a> {
        RequestKey {
            port,
            authority: Some(authority),
            path,
            method,
            grpc: false,
        }
    }

    #[test]
    fn the_issue_file_loads_with_every_field() {
        let routes = Routes::from_yaml(ISSUE).expect("the issue's file");
        assert_eq!(
            routes.retry_budget,
            Some(RetryBudgetSpec {
                ratio: 0.2,
                min_per_second: 10
            })
        );
        let inbound = &routes.inbound[0];
        assert_eq!(inbound.name, "inbound[0]");
        assert_eq!(
            inbound.matcher,
            RouteMatch {
                port: Some(80),
                path: Some(PathMatch::Prefix("/api".into())),
                methods: vec![Method::GET, Method::POST],
                ..RouteMatch::default()
            }
        );
        assert_eq!(inbound.timeout, Some(Duration::from_secs(2)));
        assert_eq!(
            inbound.rate_limit,
            Some(RateLimitSpec {
                requests_per_second: 100.0,
                burst: 50,
                per_peer: Some(10.0)
            })
        );
        assert_eq!(
            inbound.concurrency,
            Some(ConcurrencySpec {
                max: 32,
                queue: 64,
                queue_timeout: Duration::from_secs(1)
            })
        );
        assert_eq!(
            (inbound.retry.as_ref(), inbound.endpoints.as_ref()),
            (None, None)
        );

        let outbound = &routes.outbound[0];
        assert_eq!(outbound.name, "outbound[0]");
        assert_eq!(outbound.matcher.host.as_deref(), Some("reviews"));
        assert_eq!(outbound.matcher.port, Some(9080));
        let retry = outbound.retry.as_ref().expect("retry");
        assert_eq!(retry.attempts, 2);
        assert_eq!(retry.per_try_timeout, Some(Duration::from_millis(300)));
        assert_eq!(retry.backoff, Duration::from_millis(25));
        assert!(retry.on.connect_failure && retry.on.reset);
        assert!(retry.on.on_status(503) && !retry.on.on_status(502));
        assert!(retry.on.on_grpc(14) && !retry.on.on_grpc(13));
        assert_eq!(
            outbound.endpoints,
            Some(EndpointsSpec::Dns {
                name: "reviews-headless.default.svc.cluster.local".into(),
                port: None
            })
        );
        assert_eq!(outbound.balance, Balance::P2cEwma);
        assert_eq!(
            outbound.outlier,
            Some(OutlierSpec {
                consecutive_failures: 5,
                eject_for: Duration::from_secs(30),
                max_ejected_percent: 50
            })
        );
    }

    #[test]
    fn lookups_take_the_first_route_of_their_direction() {
        let routes = Routes::from_yaml(ISSUE).expect("the issue's file");
        let get = &Method::GET;
        let found = |route: Option<&Route>| route.map(|r| r.name.clone());
        assert_eq!(
            found(routes.inbound_route(&key(80, "pod:80", "/api/items?x=1", get))),
            Some("inbound[0]".into())
        );
        assert_eq!(
            found(routes.inbound_route(&key(80, "pod", "/apis", get))),
            None
        );
        assert_eq!(
            found(routes.inbound_route(&key(80, "pod", "/api", &Method::DELETE))),
            None
        );
        // Outbound routes are not consulted for inbound requests, and the other way round.
        assert_eq!(
            found(routes.inbound_route(&key(9080, "reviews", "/", get))),
            None
        );
        assert_eq!(
            found(routes.outbound_route(&key(
                9080,
                "reviews.default.svc.cluster.local:9080",
                "/",
                get
            ))),
            Some("outbound[0]".into())
        );
        assert_eq!(
            found(routes.outbound_route(&key(80, "pod", "/api", get))),
            None
        );
        assert_eq!(
            found(Routes::default().inbound_route(&key(80, "pod", "/", get))),
            None
        );
    }

    #[test]
    fn defaults_and_names() {
        let routes = Routes::from_yaml(
            r#"
outbound:
  - name: ratings.read
    retry: {on: [5xx, "429", cancelled, deadline-exceeded, resource-exhausted, internal]}
    endpoints: {static: ["198.18.1.2:9080", "[fd00::2]:9080"]}
    outlier: {}
  - endpoints: {dns: "Ratings.shop.:8080"}
    balance: round-robin
    rateLimit: {requestsPerSecond: 0.5}
    concurrency: {max: 1}
"#,
        )
        .expect("valid");
        assert_eq!(routes.retry_budget, None);
        let first = &routes.outbound[0];
        assert_eq!(first.name, "ratings.read");
        assert_eq!(first.matcher, RouteMatch::default());
        let retry = first.retry.as_ref().expect("retry");
        assert_eq!(
            (retry.attempts, retry.backoff),
            (2, Duration::from_millis(25))
        );
        assert!(!retry.on.connect_failure && !retry.on.reset);
        assert!((500..=599).all(|s| retry.on.on_status(s)) && retry.on.on_status(429));
        assert!(!retry.on.on_status(404));
        assert!([1, 4, 8, 13].iter().all(|c| retry.on.on_grpc(*c)) && !retry.on.on_grpc(14));
        let addresses: Vec<SocketAddr> = vec![
            "198.18.1.2:9080".parse().expect("v4"),
            "[fd00::2]:9080".parse().expect("v6"),
        ];
        assert_eq!(first.endpoints, Some(EndpointsSpec::Static(addresses)));
        assert_eq!(first.balance, Balance::P2cEwma);
        assert_eq!(
            first.outlier,
            Some(OutlierSpec {
                consecutive_failures: 5,
                eject_for: Duration::from_secs(30),
                max_ejected_percent: 10
            })
        );
        let second = &routes.outbound[1];
        assert_eq!(second.name, "outbound[1]");
        assert_eq!(
            second.endpoints,
            Some(EndpointsSpec::Dns {
                name: "ratings.shop".into(),
                port: Some(8080)
            })
        );
        assert_eq!(second.balance, Balance::RoundRobin);
        assert_eq!(
            second.rate_limit,
            Some(RateLimitSpec {
                requests_per_second: 0.5,
                burst: 1,
                per_peer: None
            })
        );
        assert_eq!(
            second.concurrency,
            Some(ConcurrencySpec {
                max: 1,
                queue: 0,
                queue_timeout: Duration::from_secs(1)
            })
        );
        // An empty file, and one with empty lists, have no routes.
        for empty in ["", "# nothing yet\n", "inbound: []\noutbound: []\n", "{}"] {
            assert_eq!(Routes::from_yaml(empty).expect(empty), Routes::default());
        }
        assert_eq!(
            Routes::from_yaml("retryBudget: {}")
                .expect("defaults")
                .retry_budget,
            Some(RetryBudgetSpec::default())
        );
    }

    /// Files with one mistake each, and how their error begins: the field's path, then what is
    /// wrong. The whole messages of a set of files are pinned by the goldens of
    /// tests/in_process/routes_golden.rs.
    const INVALID: &[(&str, &str)] = &[
        (
            "inbound:\n  - rateLimit: {requestsPerSecond: 10, burst: 0}",
            "inbound[0].rateLimit.burst: must be at least 1",
        ),
        (
            "inbound:\n  - retry: {on: [reset]}",
            "inbound[0].retry: `retry` applies to outbound routes only",
        ),
        (
            "inbound:\n  - endpoints: {dns: a}",
            "inbound[0].endpoints: `endpoints` applies to outbound routes only",
        ),
        (
            "outbound:\n  - balance: round-robin",
            "outbound[0].balance: applies to a route's `endpoints`",
        ),
        (
            "outbound:\n  - match: {pathprefix: /a}",
            "outbound[0].match.pathprefix: unknown field; did you mean `pathPrefix`?",
        ),
        ("inboud: []", "inboud: unknown field"),
        (
            "inbound: {port: 80}",
            "inbound: expected a list of routes, got a mapping",
        ),
        (
            "inbound:\n  - match: {port: 0}",
            "inbound[0].match.port: must be at least 1",
        ),
        (
            "inbound:\n  - match: {port: 65536}",
            "inbound[0].match.port: must be at most 65535",
        ),
        (
            "inbound:\n  - match: {port: http}",
            "inbound[0].match.port: expected a whole number, got `http`",
        ),
        (
            "inbound:\n  - match: {path: /a, pathPrefix: /b}",
            "inbound[0].match.pathPrefix: give path (the whole path) or pathPrefix, not both",
        ),
        (
            "inbound:\n  - match: {pathPrefix: api}",
            "inbound[0].match.pathPrefix: `api` is not a normalised absolute path",
        ),
        (
            "inbound:\n  - match: {path: \"/a?b=1\"}",
            "inbound[0].match.path: `/a?b=1` is not a normalised absolute path",
        ),
        (
            "inbound:\n  - match: {methods: [get]}",
            "inbound[0].match.methods[0]: `get` is not an upper-case HTTP method",
        ),
        (
            "inbound:\n  - match: {methods: []}",
            "inbound[0].match.methods: an empty list matches no request",
        ),
        (
            "inbound:\n  - match: {host: \"reviews:9080\"}",
            "inbound[0].match.host: `reviews:9080` is not a host name",
        ),
        (
            "inbound:\n  - match: {grpcService: /helloworld.Greeter}",
            "inbound[0].match.grpcService: `/helloworld.Greeter` is not a gRPC service",
        ),
        (
            "inbound:\n  - match: {grpcMethod: Say.Hello}",
            "inbound[0].match.grpcMethod: `Say.Hello` is not a gRPC method name",
        ),
        (
            "inbound:\n  - match: {grpcService: a.B, pathPrefix: /a}",
            "inbound[0].match.grpcService: a gRPC service or method is matched on the request's path",
        ),
        (
            "inbound:\n  - match:",
            "inbound[0].match: empty; leave `match` out to match every request, or give fields such as {port: 80, pathPrefix: /api}",
        ),
        (
            "inbound:\n  - timeout: 0s",
            "inbound[0].timeout: must be greater than zero",
        ),
        (
            "inbound:\n  - timeout: 2",
            "inbound[0].timeout: expected a duration such as 2s or 300ms, got 2",
        ),
        (
            "inbound:\n  - timeout: 25h",
            "inbound[0].timeout: at most 24h is allowed",
        ),
        (
            "inbound:\n  - timeout: -1s",
            "inbound[0].timeout: negative durations are not allowed",
        ),
        (
            "outbound:\n  - retry: {attempts: 2}",
            "outbound[0].retry.on: missing",
        ),
        (
            "outbound:\n  - retry: {on: []}",
            "outbound[0].retry.on: an empty list retries nothing",
        ),
        (
            "outbound:\n  - retry: {on: [UNAVAILABLE]}",
            "outbound[0].retry.on[0]: `UNAVAILABLE` is not a retry condition (write `unavailable`)",
        ),
        (
            "outbound:\n  - retry: {on: [\"200\"]}",
            "outbound[0].retry.on[0]: 200 is not a status worth retrying",
        ),
        (
            "outbound:\n  - retry: {on: [4xx]}",
            "outbound[0].retry.on[0]: `4xx` is not a retry condition",
        ),
        (
            "outbound:\n  - retry: {on: [reset], attempts: 11}",
            "outbound[0].retry.attempts: must be at most 10",
        ),
        (
            "outbound:\n  - retry: {on: [reset], attempts: 0}",
            "outbound[0].retry.attempts: must be at least 1",
        ),
        (
            "outbound:\n  - timeout: 1s\n    retry: {on: [reset], perTryTimeout: 2s}",
            "outbound[0].retry.perTryTimeout: 2s is longer than the route's timeout (1s)",
        ),
        (
            "outbound:\n  - retry: {on: [reset], backoff: 2m}",
            "outbound[0].retry.backoff: at most 1m is allowed",
        ),
        (
            "inbound:\n  - rateLimit: {burst: 5}",
            "inbound[0].rateLimit.requestsPerSecond: missing",
        ),
        (
            "inbound:\n  - rateLimit: {requestsPerSecond: 0}",
            "inbound[0].rateLimit.requestsPerSecond: must be more than 0",
        ),
        (
            "inbound:\n  - rateLimit: {requestsPerSecond: 10, perPeer: 20}",
            "inbound[0].rateLimit.perPeer: 20 is more than the route's requestsPerSecond (10)",
        ),
        (
            "inbound:\n  - concurrency: {queue: 1}",
            "inbound[0].concurrency.max: missing",
        ),
        (
            "inbound:\n  - concurrency: {max: 1, queueTimeout: 1s}",
            "inbound[0].concurrency.queueTimeout: there is no queue to wait in",
        ),
        (
            "outbound:\n  - endpoints: {}",
            "outbound[0].endpoints: give dns",
        ),
        (
            "outbound:\n  - endpoints: {dns: a, static: [\"198.18.0.1:80\"]}",
            "outbound[0].endpoints: give dns or static, not both",
        ),
        (
            "outbound:\n  - endpoints: {dns: 198.18.0.1}",
            "outbound[0].endpoints.dns: `198.18.0.1` is an address, not a name",
        ),
        (
            "outbound:\n  - endpoints: {dns: \"[fd00::1]:80\"}",
            "outbound[0].endpoints.dns: `[fd00::1]:80` is an address, not a name",
        ),
        (
            "outbound:\n  - endpoints: {dns: reviews_headless}",
            "outbound[0].endpoints.dns: `reviews_headless` is not a DNS name",
        ),
        (
            "outbound:\n  - endpoints: {dns: \"reviews:0\"}",
            "outbound[0].endpoints.dns: expected a TCP port 1-65535, got `0` after the name",
        ),
        (
            "outbound:\n  - endpoints: {static: []}",
            "outbound[0].endpoints.static: the list is empty",
        ),
        (
            "outbound:\n  - endpoints: {static: [reviews:80]}",
            "outbound[0].endpoints.static[0]: `reviews:80` is not IP:PORT",
        ),
        (
            "outbound:\n  - endpoints: {static: [\"0.0.0.0:80\"]}",
            "outbound[0].endpoints.static[0]: `0.0.0.0:80` cannot be connected to",
        ),
        (
            "outbound:\n  - endpoints: {static: [\"198.18.0.1:80\", \"198.18.0.1:80\"]}",
            "outbound[0].endpoints.static[1]: `198.18.0.1:80` is listed twice (also at [0])",
        ),
        (
            "outbound:\n  - endpoints: {dns: a}\n    balance: random",
            "outbound[0].balance: `random` is not a balancing algorithm",
        ),
        (
            "outbound:\n  - endpoints: {dns: a}\n    outlier: {maxEjectedPercent: 101}",
            "outbound[0].outlier.maxEjectedPercent: must be at most 100",
        ),
        (
            "outbound:\n  - endpoints: {dns: a}\n    outlier: {consecutiveFailures: 0}",
            "outbound[0].outlier.consecutiveFailures: must be at least 1",
        ),
        (
            "retryBudget: {ratio: 1.5}",
            "retryBudget.ratio: must be between 0 and 1",
        ),
        (
            "retryBudget: {minPerSecond: -1}",
            "retryBudget.minPerSecond: must be at least 0",
        ),
        (
            "inbound:\n  - name: a\noutbound:\n  - name: a",
            "outbound[0].name: `a` is already the name of inbound[0]",
        ),
        (
            "inbound:\n  - name: \"a b\"",
            "inbound[0].name: `a b` is not a route name",
        ),
        (
            "inbound:\n  - name: \"line\\nbreak\"",
            "inbound[0].name: `line\\nbreak` is not a route name",
        ),
        ("inbound: [\n", "not valid YAML: "),
        (
            "inbound: []\ninbound: []",
            "not valid YAML: duplicate mapping key `inbound`",
        ),
        (
            "- 1",
            "the file: expected a mapping with inbound and outbound, got a list",
        ),
    ];

    #[test]
    fn invalid_files_name_the_field() {
        for (yaml, wanted) in INVALID {
            let err = Routes::from_yaml(yaml).expect_err(yaml).to_string();
            assert!(
                err.starts_with(wanted),
                "{yaml}\n-> {err}\nwanted: {wanted}"
            );
            assert!(!err.contains('\n'), "{yaml}: not one line: {err}");
        }
    }

    #[test]
    fn the_number_of_routes_is_bounded() {
        let file = |n: usize| format!("inbound:\n{}", "  - timeout: 1s\n".repeat(n));
        let routes = Routes::from_yaml(&file(parse::MAX_ROUTES)).expect("at the bound");
        assert_eq!(routes.inbound.len(), parse::MAX_ROUTES);
        let err = Routes::from_yaml(&file(parse::MAX_ROUTES + 1)).expect_err("above");
        assert!(
            err.to_string()
                .starts_with("inbound: 1001 routes; a file may have at most 1000"),
            "{err}"
        );
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.yaml");
        let err = Routes::load(&path).expect_err("missing").to_string();
        assert!(
            err.starts_with(&format!("cannot read the routes file {}: ", path.display())),
            "{err}"
        );
        std::fs::write(
            &path,
            "inbound:\n  - rateLimit: {requestsPerSecond: 1, burst: 0}\n",
        )
        .expect("write");
        let err = Routes::load(&path).expect_err("invalid").to_string();
        assert_eq!(
            err,
            format!(
                "{}: inbound[0].rateLimit.burst: must be at least 1",
                path.display()
            )
        );
        let big = format!("# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
        std::fs::write(&path, big).expect("write");
        let err = Routes::load(&path).expect_err("too big").to_string();
        assert!(err.contains("larger than 1024 KiB"), "{err}");
        std::fs::write(&path, ISSUE).expect("write");
        let file = RoutesFile::load(&path).expect("valid");
        assert_eq!((file.path, file.routes.inbound.len()), (path, 1));
    }

    /// Every ```yaml block of docs/routes.md loads.
    #[test]
    fn documented_examples() {
        let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/routes.md");
        let text = std::fs::read_to_string(&page).expect("docs/routes.md");
        let mut blocks = Vec::new();
        let mut block: Option<String> = None;
        for line in text.lines() {
            match (&mut block, line.trim_end()) {
                (None, "```yaml") => block = Some(String::new()),
                (Some(b), "```") => {
                    blocks.push(std::mem::take(b));
                    block = None;
                }
                (Some(b), _) => {
                    b.push_str(line);
                    b.push('\n');
                }
                (None, _) => {}
            }
        }
        assert!(
            block.is_none(),
            "an unclosed ```yaml block in docs/routes.md"
        );
        assert!(blocks.len() >= 8, "only {} yaml blocks", blocks.len());
        for yaml in &blocks {
            let routes = Routes::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            assert!(
                routes.retry_budget.is_some()
                    || !routes.inbound.is_empty()
                    || !routes.outbound.is_empty(),
                "an example without routes:\n{yaml}"
            );
        }
    }
}
