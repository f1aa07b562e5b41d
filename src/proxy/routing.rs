//! The routes in force (`--routes`, [`crate::routes`]) with each route's running state: its rate
//! and concurrency limiters, its endpoints and their balancer, its counters; and the retry
//! budget they share. Built by one constructor ([`RouteSet::build`]), replaced whole when the file
//! changes: a route whose name and spec are unchanged keeps its state (its buckets, its queue, its
//! balancer's latencies and ejections), so that a reload resets nothing that did not change.
//!
//! The driver asks [`RouteSet::find`] which route a request takes; what a route then does to the
//! request is the driver's ([`super::driver`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use super::traffic::concurrency::ConcurrencyLimiter;
use super::traffic::rate::RateLimiter;
use super::traffic::retry::RetryBudget;
use super::upstream::balance::{BalanceKind, Balancer, OutlierConfig, Pick};
use super::upstream::endpoints::{self, Resolver, Source};
use super::upstream::{ClientFactory, Clients};
use crate::routes::{
    Balance, EndpointsSpec, RequestKey, RetryBudgetSpec, Route, RouteTable, Routes,
};
use crate::sync::lock;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{Direction, EndpointLabels, RouteLabels};

/// How often the endpoints' latency and ejection metrics are brought up to date.
const ENDPOINT_METRICS_EVERY: Duration = Duration::from_secs(1);

/// The routes file in force, and where it is read from.
pub(crate) struct RoutesInForce {
    pub(crate) path: PathBuf,
    current: tokio::sync::watch::Sender<Arc<RouteSet>>,
    /// Built once, the first time a route names a DNS name (reading the pod's resolv.conf).
    resolver: Mutex<Option<Arc<Resolver>>>,
    /// Why the file on disk is not the routes in force, while it is not.
    problem: Mutex<Option<String>>,
    telemetry: Arc<Telemetry>,
    /// Builds each endpoint's clients for the hyper path.
    clients: ClientFactory,
}

impl RoutesInForce {
    /// The routes of a file validated at start. Must run in the runtime (DNS endpoints are kept
    /// current by tasks of it).
    pub(crate) fn new(
        path: PathBuf,
        routes: Routes,
        telemetry: Arc<Telemetry>,
        clients: ClientFactory,
    ) -> RoutesInForce {
        let in_force = RoutesInForce {
            path,
            current: tokio::sync::watch::Sender::new(Arc::new(RouteSet::default())),
            resolver: Mutex::new(None),
            problem: Mutex::new(None),
            telemetry,
            clients,
        };
        in_force.replace(routes);
        in_force
    }

    /// The routes in force now.
    pub(crate) fn current(&self) -> Arc<RouteSet> {
        self.current.borrow().clone()
    }

    /// Puts `routes` in force, keeping the state of every route that did not change.
    pub(crate) fn replace(&self, routes: Routes) {
        let previous = self.current();
        let next = RouteSet::build(
            routes,
            Some(&previous),
            &|| self.resolver(),
            &self.telemetry,
            &self.clients,
        );
        self.current.send_replace(Arc::new(next));
        self.said(None);
    }

    /// Notes why the file on disk is not in force (`None`: it is).
    pub(crate) fn said(&self, problem: Option<String>) {
        let failed = problem.is_some();
        *lock(&self.problem) = problem;
        self.telemetry
            .metrics
            .routes
            .reload_failed
            .set(i64::from(failed));
    }

    /// Why the file on disk is not the routes in force, if it is not.
    pub(crate) fn problem(&self) -> Option<String> {
        lock(&self.problem).clone()
    }

    fn resolver(&self) -> Option<Arc<Resolver>> {
        let mut resolver = lock(&self.resolver);
        if resolver.is_none() {
            match Resolver::from_system() {
                Ok(built) => *resolver = Some(Arc::new(built)),
                Err(e) => tracing::error!("routes: DNS endpoints cannot be resolved: {e}"),
            }
        }
        resolver.clone()
    }
}

/// The routes of a file and their running state, by the same index as the file's tables.
pub(crate) struct RouteSet {
    routes: Routes,
    inbound: Vec<Arc<RouteState>>,
    outbound: Vec<Arc<RouteState>>,
    budget_spec: RetryBudgetSpec,
    pub(crate) budget: Arc<RetryBudget>,
    /// The ports some outbound route with endpoints names, sorted: in mutual TLS, outbound
    /// connections to them are served as HTTP so that each request can go to its endpoint's
    /// proxy (others go whole into one tunnel to their destination).
    balanced_ports: Vec<u16>,
    /// The ports some inbound route names, sorted: connections to them are HTTP only, as a port
    /// the policy judges by method or path is, so that no undetected bytes skip those routes.
    routed_inbound_ports: Vec<u16>,
}

impl Default for RouteSet {
    fn default() -> Self {
        let budget_spec = RetryBudgetSpec::default();
        RouteSet {
            routes: Routes::default(),
            inbound: Vec::new(),
            outbound: Vec::new(),
            budget: Arc::new(RetryBudget::new(
                budget_spec.ratio,
                budget_spec.min_per_second,
            )),
            budget_spec,
            balanced_ports: Vec::new(),
            routed_inbound_ports: Vec::new(),
        }
    }
}

impl RouteSet {
    /// The running state of `routes`, reusing `previous`'s for every route whose name, direction
    /// and spec are the same (and its budget when `retryBudget` is).
    pub(crate) fn build(
        routes: Routes,
        previous: Option<&RouteSet>,
        resolver: &dyn Fn() -> Option<Arc<Resolver>>,
        telemetry: &Arc<Telemetry>,
        clients: &ClientFactory,
    ) -> RouteSet {
        let budget_spec = routes.retry_budget.clone().unwrap_or_default();
        let budget = match previous {
            Some(previous) if previous.budget_spec == budget_spec => previous.budget.clone(),
            _ => Arc::new(RetryBudget::new(
                budget_spec.ratio,
                budget_spec.min_per_second,
            )),
        };
        let states = |table: &RouteTable, direction: Direction| -> Vec<Arc<RouteState>> {
            let old = previous.map(|p| match direction {
                Direction::Inbound => &p.inbound,
                Direction::Outbound => &p.outbound,
            });
            table
                .iter()
                .map(|route| {
                    let kept =
                        old.and_then(|old| old.iter().find(|state| state.route == *route).cloned());
                    kept.unwrap_or_else(|| {
                        Arc::new(RouteState::new(
                            route.clone(),
                            direction,
                            resolver,
                            telemetry,
                            clients,
                        ))
                    })
                })
                .collect()
        };
        let balanced_ports =
            sorted_ports((routes.outbound.iter()).filter(|route| route.endpoints.is_some()));
        let routed_inbound_ports = sorted_ports(routes.inbound.iter());
        RouteSet {
            inbound: states(&routes.inbound, Direction::Inbound),
            outbound: states(&routes.outbound, Direction::Outbound),
            routes,
            budget_spec,
            budget,
            balanced_ports,
            routed_inbound_ports,
        }
    }

    /// Whether an inbound route names `port`.
    pub(crate) fn routes_inbound_port(&self, port: u16) -> bool {
        self.routed_inbound_ports.binary_search(&port).is_ok()
    }

    /// Whether an outbound route with endpoints names `port`.
    pub(crate) fn balances_port(&self, port: u16) -> bool {
        self.balanced_ports.binary_search(&port).is_ok()
    }

    /// The route a request takes, if any: the first of its direction whose `match` it satisfies.
    pub(crate) fn find(
        &self,
        direction: Direction,
        key: &RequestKey<'_>,
    ) -> Option<&Arc<RouteState>> {
        let (table, states) = match direction {
            Direction::Inbound => (&self.routes.inbound, &self.inbound),
            Direction::Outbound => (&self.routes.outbound, &self.outbound),
        };
        table.find_index(key).and_then(|i| states.get(i))
    }
}

/// One route and what it keeps between requests.
pub(crate) struct RouteState {
    pub(crate) route: Route,
    /// The route's name, shared with the records of its requests.
    pub(crate) label: Arc<str>,
    pub(crate) rate: Option<RateLimiter>,
    pub(crate) concurrency: Option<ConcurrencyLimiter>,
    pub(crate) endpoints: Option<RouteEndpoints>,
    pub(crate) counters: RouteCounters,
    telemetry: Arc<Telemetry>,
}

/// The route's counters, resolved once.
pub(crate) struct RouteCounters {
    pub(crate) requests: Counter,
    pub(crate) retries: Counter,
    pub(crate) budget_exhausted: Counter,
    pub(crate) rate_limited: Counter,
    pub(crate) queued: Counter,
    pub(crate) concurrency_rejected: Counter,
    pub(crate) timeouts: Counter,
}

impl RouteState {
    fn new(
        route: Route,
        direction: Direction,
        resolver: &dyn Fn() -> Option<Arc<Resolver>>,
        telemetry: &Arc<Telemetry>,
        clients: &ClientFactory,
    ) -> RouteState {
        let families = &telemetry.metrics.routes;
        let labels = RouteLabels {
            direction,
            route: route.name.clone(),
        };
        let counters = RouteCounters {
            requests: families.requests.get_or_create(&labels).clone(),
            retries: families.retries.get_or_create(&labels).clone(),
            budget_exhausted: families.budget_exhausted.get_or_create(&labels).clone(),
            rate_limited: families.rate_limited.get_or_create(&labels).clone(),
            queued: families.queued.get_or_create(&labels).clone(),
            concurrency_rejected: families.concurrency_rejected.get_or_create(&labels).clone(),
            timeouts: families.timeouts.get_or_create(&labels).clone(),
        };
        let rate = route
            .rate_limit
            .as_ref()
            .map(|spec| RateLimiter::new(spec.requests_per_second, spec.burst, spec.per_peer));
        let concurrency = route
            .concurrency
            .as_ref()
            .map(|spec| ConcurrencyLimiter::new(spec.max, spec.queue, spec.queue_timeout));
        let endpoints = route
            .endpoints
            .as_ref()
            .map(|spec| RouteEndpoints::start(&route, spec, resolver, telemetry, clients));
        RouteState {
            label: Arc::from(route.name.as_str()),
            route,
            rate,
            concurrency,
            endpoints,
            counters,
            telemetry: telemetry.clone(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.route.name
    }

    /// Counts an attempt sent to `endpoint`, and whether it failed. Each endpoint's two counters
    /// are resolved once (the labels are built then), not per attempt.
    pub(crate) fn count_attempt(&self, endpoint: SocketAddr, failed: bool) {
        let Some(endpoints) = &self.endpoints else {
            return;
        };
        let mut counters = lock(&endpoints.counters);
        let (requests, failures) = counters.entry(endpoint).or_insert_with(|| {
            let families = &self.telemetry.metrics.routes;
            let labels = EndpointLabels {
                route: self.route.name.clone(),
                endpoint: endpoint.to_string(),
            };
            (
                families.endpoint_requests.get_or_create(&labels).clone(),
                families.endpoint_failures.get_or_create(&labels).clone(),
            )
        });
        requests.inc();
        if failed {
            failures.inc();
        }
    }
}

/// An outbound route's endpoints: the balancer over them, kept current by a task that ends with
/// the route.
pub(crate) struct RouteEndpoints {
    pub(crate) balancer: Arc<Balancer>,
    /// A DNS name without a port: its addresses take the port the request was sent to.
    port_from_request: bool,
    /// Each endpoint's attempts and failures counters (by the balancer's address).
    counters: Mutex<HashMap<SocketAddr, (Counter, Counter)>>,
    /// Each endpoint's clients for the hyper path, built at its first request: hyper pools per
    /// client, and the request keeps the authority the app wrote (HTTP/2's `:authority`
    /// included), so an endpoint's connections are its own client's. When an endpoint is first
    /// used, the clients of addresses no longer among the endpoints go, with their idle
    /// connections.
    clients: Mutex<HashMap<SocketAddr, Arc<Clients>>>,
    factory: ClientFactory,
    task: Option<tokio::task::AbortHandle>,
}

impl Drop for RouteEndpoints {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl RouteEndpoints {
    fn start(
        route: &Route,
        spec: &EndpointsSpec,
        resolver: &dyn Fn() -> Option<Arc<Resolver>>,
        telemetry: &Arc<Telemetry>,
        factory: &ClientFactory,
    ) -> RouteEndpoints {
        let kind = match route.balance {
            Balance::P2cEwma => BalanceKind::P2cEwma,
            Balance::RoundRobin => BalanceKind::RoundRobin,
        };
        let outlier = route.outlier.as_ref().map(|o| OutlierConfig {
            consecutive_failures: o.consecutive_failures,
            eject_for: o.eject_for,
            max_ejected_percent: o.max_ejected_percent,
        });
        let balancer = Arc::new(Balancer::new(kind, outlier));
        let receiver = match spec {
            EndpointsSpec::Static(addrs) => {
                balancer.set_endpoints(addrs);
                None
            }
            // Resolved with port 0 when the name has none: the request's port goes in at pick.
            EndpointsSpec::Dns { name, port } => resolver().map(|resolver| {
                let source = Source::Dns {
                    name: name.clone(),
                    port: port.unwrap_or(0),
                };
                endpoints::watch(source, &resolver)
            }),
        };
        let task = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            runtime
                .spawn(keep_current(
                    receiver,
                    balancer.clone(),
                    route.name.clone(),
                    telemetry.clone(),
                ))
                .abort_handle()
        });
        RouteEndpoints {
            balancer,
            port_from_request: matches!(spec, EndpointsSpec::Dns { port: None, .. }),
            counters: Mutex::default(),
            clients: Mutex::default(),
            factory: factory.clone(),
            task,
        }
    }

    /// The clients that reach `endpoint` (through HBONE when outbound mutual TLS is on).
    pub(crate) fn clients(&self, endpoint: SocketAddr) -> Arc<Clients> {
        let mut clients = lock(&self.clients);
        if let Some(found) = clients.get(&endpoint) {
            return found.clone();
        }
        // A new endpoint: those DNS no longer gives lose their clients (and idle connections).
        let current = self.balancer.snapshot();
        clients.retain(|addr, _| current.iter().any(|c| c.addr.ip() == addr.ip()));
        let built = Arc::new(self.factory.build(Some(endpoint), true));
        clients.insert(endpoint, built.clone());
        built
    }

    /// An endpoint for one attempt at a request sent to `original`; `None` when there is none
    /// to pick (no address yet, or every one ejected).
    pub(crate) fn pick(&self, original: SocketAddr) -> Option<(SocketAddr, Pick)> {
        let pick = self.balancer.pick()?;
        let mut addr = pick.addr;
        if self.port_from_request {
            addr.set_port(original.port());
        }
        Some((addr, pick))
    }
}

/// Keeps the balancer's endpoints those `receiver` publishes (DNS), and the endpoints' latency and
/// ejection metrics current, until the route is dropped (which aborts this task).
async fn keep_current(
    mut receiver: Option<tokio::sync::watch::Receiver<Arc<[SocketAddr]>>>,
    balancer: Arc<Balancer>,
    route: String,
    telemetry: Arc<Telemetry>,
) {
    let families = &telemetry.metrics.routes;
    let mut ejections_seen: Vec<(SocketAddr, u64)> = Vec::new();
    if let Some(receiver) = &mut receiver {
        let addrs = receiver.borrow_and_update().clone();
        balancer.set_endpoints(&addrs);
    }
    let mut ticker = tokio::time::interval(ENDPOINT_METRICS_EVERY);
    loop {
        let changed = async {
            match &mut receiver {
                Some(receiver) => receiver.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            alive = changed => {
                if !alive {
                    receiver = None;
                    continue;
                }
                if let Some(receiver) = &mut receiver {
                    let addrs = receiver.borrow_and_update().clone();
                    balancer.set_endpoints(&addrs);
                }
            }
            _ = ticker.tick() => {
                for endpoint in balancer.snapshot() {
                    let labels = EndpointLabels {
                        route: route.clone(),
                        endpoint: endpoint.addr.to_string(),
                    };
                    families
                        .endpoint_ewma
                        .get_or_create(&labels)
                        .set(endpoint.ewma.as_secs_f64());
                    let seen = match ejections_seen.iter_mut().find(|(a, _)| *a == endpoint.addr) {
                        Some((_, seen)) => seen,
                        None => {
                            ejections_seen.push((endpoint.addr, 0));
                            &mut ejections_seen.last_mut().expect("just pushed").1
                        }
                    };
                    if endpoint.ejections > *seen {
                        families
                            .endpoint_ejections
                            .get_or_create(&labels)
                            .inc_by(endpoint.ejections - *seen);
                        *seen = endpoint.ejections;
                    }
                }
            }
        }
    }
}

/// The ports `routes` name in their `match`, sorted and each once (for a binary search).
fn sorted_ports<'a>(routes: impl Iterator<Item = &'a crate::routes::Route>) -> Vec<u16> {
    let mut ports: Vec<u16> = routes.filter_map(|route| route.matcher.port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
