//! The routes file, read and validated: YAML into an untyped tree first, then each field read by
//! hand, so that every error names its field by its path (`inbound[0].rateLimit.burst: must be at
//! least 1`) and says what to write instead. Unknown fields are refused everywhere, with the fields
//! that the place knows; a field of the other direction is refused by name.
//!
//! Bounds: at most [`MAX_ROUTES`] routes; durations above zero and below their maxima (a day for
//! timeouts); counts and rates within the maxima below; ratios 0-1, percentages 0-100.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::{Map, Value};

use super::matching::{PathMatch, RouteMatch};
use super::spec::{
    Balance, ConcurrencySpec, EndpointsSpec, GRPC_CODES, OutlierSpec, RateLimitSpec,
    RetryBudgetSpec, RetryOn, RetrySpec,
};
use super::table::Route;
use crate::vocab::{
    MAX_TIMEOUT, format_duration, is_dns_name, is_normal_path, parse_duration, parse_method,
    parse_port,
};

/// Routes in a file, both directions together.
pub(super) const MAX_ROUTES: usize = 1000;
/// Static endpoints in one route.
const MAX_ENDPOINTS: usize = 1000;
/// `retry.attempts`: retries after the first attempt.
const MAX_ATTEMPTS: u64 = 10;
/// `retry.backoff` and `concurrency.queueTimeout`: longer waits are mistakes.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// `outlier.ejectFor`.
const MAX_EJECTION: Duration = Duration::from_secs(60 * 60);
/// Requests per second, burst, concurrency and queue sizes, minimum retries per second.
const MAX_COUNT: u64 = 1_000_000;
/// `outlier.consecutiveFailures`.
const MAX_FAILURES: u64 = 1000;
/// A route's `name`: it labels metrics and access-log records.
const MAX_NAME: usize = 64;

const DEFAULT_ATTEMPTS: u32 = 2;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTED_PERCENT: u8 = 10;

/// A valid file's content.
#[derive(Default)]
pub(super) struct Parsed {
    pub(super) retry_budget: Option<RetryBudgetSpec>,
    pub(super) inbound: Vec<Route>,
    pub(super) outbound: Vec<Route>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

const TOP_FIELDS: &[&str] = &["retryBudget", "inbound", "outbound"];
const ROUTE_FIELDS: &[&str] = &[
    "name",
    "match",
    "timeout",
    "retry",
    "rateLimit",
    "concurrency",
    "endpoints",
    "balance",
    "outlier",
];
/// What only a request this pod's app sends can have.
const OUTBOUND_ONLY: &[&str] = &["retry", "endpoints", "balance", "outlier"];
const MATCH_FIELDS: &[&str] = &[
    "port",
    "path",
    "pathPrefix",
    "methods",
    "host",
    "grpcService",
    "grpcMethod",
];

/// Reads and validates a routes file's text; the error is one line, starting with the field path.
pub(super) fn parse(text: &str) -> Result<Parsed, String> {
    let mut options = serde_saphyr::options::Options::default();
    // `on`, `yes`, `no` stay strings (`retry.on` is a key, not `true`).
    options.strict_booleans = true;
    options.with_snippet = false;
    let tree: Value = serde_saphyr::from_str_with_options(text, options).map_err(|e| {
        format!(
            "not valid YAML: {}",
            e.render_with_formatter(&serde_saphyr::UserMessageFormatter)
        )
    })?;
    if tree.is_null() {
        return Ok(Parsed::default());
    }
    let top = Fields::of(&tree, "", "a mapping with inbound and outbound", TOP_FIELDS)?;
    let mut parsed = Parsed {
        retry_budget: top.optional("retryBudget", read_retry_budget)?,
        ..Parsed::default()
    };
    let lists = [Direction::Inbound, Direction::Outbound]
        .into_iter()
        .filter_map(|direction| {
            let (at, list) = top.get(direction.name())?;
            Some(sequence(list, &at, "a list of routes").map(|items| (direction, at, items)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Counted before any is read: a huge file is refused without building it.
    let total: usize = lists.iter().map(|(_, _, items)| items.len()).sum();
    if total > MAX_ROUTES {
        let at = lists
            .iter()
            .map(|(_, at, _)| at.as_str())
            .collect::<Vec<_>>();
        return Err(format!(
            "{}: {total} routes; a file may have at most {MAX_ROUTES}: merge routes that apply the same settings (one pathPrefix, several methods)",
            at.join(" and ")
        ));
    }
    for (direction, _, items) in lists {
        let routes = (items.iter().enumerate())
            .map(|(i, item)| read_route(item, direction, i))
            .collect::<Result<Vec<_>, _>>()?;
        match direction {
            Direction::Inbound => parsed.inbound = routes,
            Direction::Outbound => parsed.outbound = routes,
        }
    }
    unique_names(&parsed)?;
    Ok(parsed)
}

/// Names label metrics and log records: two routes may not share one.
fn unique_names(parsed: &Parsed) -> Result<(), String> {
    let mut seen: HashMap<&str, String> = HashMap::new();
    let places = (parsed.inbound.iter().enumerate())
        .map(|(i, r)| (format!("inbound[{i}]"), r))
        .chain((parsed.outbound.iter().enumerate()).map(|(i, r)| (format!("outbound[{i}]"), r)));
    for (at, route) in places {
        if let Some(first) = seen.get(route.name.as_str()) {
            return Err(format!(
                "{at}.name: {} is already the name of {first}; give each route its own name (names label the metrics)",
                shown(&route.name)
            ));
        }
        seen.insert(&route.name, at);
    }
    Ok(())
}

fn read_route(value: &Value, direction: Direction, index: usize) -> Result<Route, String> {
    let at = format!("{}[{index}]", direction.name());
    let fields = Fields::of(
        value,
        &at,
        "a route (a mapping such as {match: {port: 80}, timeout: 2s})",
        ROUTE_FIELDS,
    )?;
    if direction == Direction::Inbound
        && let Some(field) = OUTBOUND_ONLY.iter().find(|f| fields.has(f))
    {
        return Err(format!(
            "{at}.{field}: `{field}` applies to outbound routes only (the requests this pod's app sends); move it to an outbound route or remove it"
        ));
    }
    let name = fields
        .optional("name", read_name)?
        .unwrap_or_else(|| at.clone());
    let matcher = fields.optional("match", read_match)?.unwrap_or_default();
    let timeout = fields.duration("timeout", MAX_TIMEOUT)?;
    let retry = fields.optional("retry", |v, at| read_retry(v, at, timeout))?;
    let rate_limit = fields.optional("rateLimit", read_rate_limit)?;
    let concurrency = fields.optional("concurrency", read_concurrency)?;
    let endpoints = fields.optional("endpoints", read_endpoints)?;
    for needs_endpoints in ["balance", "outlier"] {
        if endpoints.is_none() && fields.has(needs_endpoints) {
            return Err(format!(
                "{at}.{needs_endpoints}: applies to a route's `endpoints`, and the route has none; add endpoints (dns or static) or remove {needs_endpoints}"
            ));
        }
    }
    let balance = fields.optional("balance", read_balance)?;
    let outlier = fields.optional("outlier", read_outlier)?;
    Ok(Route {
        name,
        matcher,
        timeout,
        retry,
        rate_limit,
        concurrency,
        endpoints,
        balance: balance.unwrap_or_default(),
        outlier,
    })
}

fn read_name(value: &Value, at: &str) -> Result<String, String> {
    let name = string(value, at, "a name such as reviews-read")?;
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        return Err(format!(
            "{at}: {name} is not a route name: 1-{MAX_NAME} letters, digits, `-`, `_` or `.`",
            name = shown(name),
        ));
    }
    Ok(name.to_owned())
}

fn read_match(value: &Value, at: &str) -> Result<RouteMatch, String> {
    if value.is_null() {
        return Err(format!(
            "{at}: empty; leave `match` out to match every request, or give fields such as {{port: 80, pathPrefix: /api}}"
        ));
    }
    let fields = Fields::of(
        value,
        at,
        "a mapping such as {port: 80, pathPrefix: /api}",
        MATCH_FIELDS,
    )?;
    let port = fields.optional("port", read_port)?;
    let exact = fields.optional("path", read_path)?;
    let prefix = fields.optional("pathPrefix", read_path)?;
    let path = match (exact, prefix) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "{at}.pathPrefix: give path (the whole path) or pathPrefix, not both"
            ));
        }
        (Some(path), None) => Some(PathMatch::Exact(path)),
        (None, Some(prefix)) => Some(PathMatch::Prefix(prefix)),
        (None, None) => None,
    };
    let grpc_service = fields.optional("grpcService", read_grpc_service)?;
    let grpc_method = fields.optional("grpcMethod", read_grpc_method)?;
    if path.is_some() && (grpc_service.is_some() || grpc_method.is_some()) {
        let field = if grpc_service.is_some() {
            "grpcService"
        } else {
            "grpcMethod"
        };
        return Err(format!(
            "{at}.{field}: a gRPC service or method is matched on the request's path; give it or path/pathPrefix, not both"
        ));
    }
    let methods = fields
        .optional("methods", read_methods)?
        .unwrap_or_default();
    let host = fields.optional("host", read_host)?;
    Ok(RouteMatch {
        port,
        path,
        methods,
        host,
        grpc_service,
        grpc_method,
    })
}

fn read_methods(value: &Value, at: &str) -> Result<Vec<http::Method>, String> {
    let items = sequence(value, at, "a list of methods such as [GET, HEAD]")?;
    if items.is_empty() {
        return Err(format!(
            "{at}: an empty list matches no request; leave methods out to match every method"
        ));
    }
    (items.iter().enumerate())
        .map(|(k, m)| {
            let at = format!("{at}[{k}]");
            parse_method(string(m, &at, "a method such as GET")?).map_err(|e| format!("{at}: {e}"))
        })
        .collect()
}

fn read_port(value: &Value, at: &str) -> Result<u16, String> {
    let port = whole(value, at, 1, u64::from(u16::MAX))?;
    Ok(u16::try_from(port).unwrap_or(u16::MAX))
}

/// A `path` or `pathPrefix`: the form the proxy matches (docs/policy.md, "Paths").
fn read_path(value: &Value, at: &str) -> Result<String, String> {
    let path = string(value, at, "a path such as /api")?;
    if !is_normal_path(path)
        || path
            .bytes()
            .any(|b| b <= b' ' || b == 0x7f || b == b'?' || b == b'#')
    {
        return Err(format!(
            "{at}: {path} is not a normalised absolute path (starts with `/`; no query, spaces, `..`, `//` or encoded separators)",
            path = shown(path),
        ));
    }
    Ok(path.to_owned())
}

fn read_grpc_service(value: &Value, at: &str) -> Result<String, String> {
    let service = string(value, at, "a gRPC service such as helloworld.Greeter")?;
    let valid = service
        .split('.')
        .all(|part| !part.is_empty() && is_identifier(part));
    if !valid {
        return Err(format!(
            "{at}: {service} is not a gRPC service's full name such as helloworld.Greeter (its package, a dot, the service; no slashes)",
            service = shown(service),
        ));
    }
    Ok(service.to_owned())
}

fn read_grpc_method(value: &Value, at: &str) -> Result<String, String> {
    let method = string(value, at, "a gRPC method such as SayHello")?;
    if method.is_empty() || !is_identifier(method) {
        return Err(format!(
            "{at}: {method} is not a gRPC method name such as SayHello (letters, digits, `_`)",
            method = shown(method),
        ));
    }
    Ok(method.to_owned())
}

/// A protobuf identifier: letters, digits and `_`.
fn is_identifier(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn read_host(value: &Value, at: &str) -> Result<String, String> {
    let host = string(value, at, "a host such as reviews")?;
    let lower = host.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.parse::<IpAddr>().is_ok() || is_dns_name(name) {
        return Ok(name.to_owned());
    }
    let hint = if host.contains(':') {
        "; write the host without its port, and match the port with `port`"
    } else if host.contains('*') {
        "; wildcards are not supported: give the host itself"
    } else {
        ""
    };
    Err(format!(
        "{at}: {host} is not a host name (letters, digits, `-`, dot-separated) or an IP address{hint}",
        host = shown(host),
    ))
}

fn read_retry(value: &Value, at: &str, timeout: Option<Duration>) -> Result<RetrySpec, String> {
    let fields = Fields::of(
        value,
        at,
        "a mapping such as {on: [connect-failure, \"503\"], attempts: 2}",
        &["on", "attempts", "perTryTimeout", "backoff"],
    )?;
    let (on_at, on) =
        fields.required("on", &format!("list what to retry: {}", retry_conditions()))?;
    let on = read_retry_on(on, &on_at)?;
    let attempts = fields.whole_or("attempts", 1, MAX_ATTEMPTS, u64::from(DEFAULT_ATTEMPTS))?;
    let per_try_timeout = fields.duration("perTryTimeout", MAX_TIMEOUT)?;
    if let (Some(per_try), Some(timeout)) = (per_try_timeout, timeout)
        && per_try > timeout
    {
        return Err(format!(
            "{at}.perTryTimeout: {} is longer than the route's timeout ({}), which bounds every attempt; shorten it or remove it",
            format_duration(per_try),
            format_duration(timeout)
        ));
    }
    let backoff = fields.duration("backoff", MAX_WAIT)?;
    Ok(RetrySpec {
        on,
        attempts: u32::try_from(attempts).unwrap_or(DEFAULT_ATTEMPTS),
        per_try_timeout,
        backoff: backoff.unwrap_or(DEFAULT_BACKOFF),
    })
}

/// What `retry.on` accepts, for the messages.
fn retry_conditions() -> String {
    let codes: Vec<&str> = GRPC_CODES.iter().map(|(name, _)| *name).collect();
    format!(
        "connect-failure, reset, a status 400-599 (\"503\"), 5xx, or a gRPC code ({})",
        codes.join(", ")
    )
}

fn read_retry_on(value: &Value, at: &str) -> Result<RetryOn, String> {
    let items = sequence(value, at, "a list such as [connect-failure, \"503\"]")?;
    if items.is_empty() {
        return Err(format!(
            "{at}: an empty list retries nothing; list what to retry ({}) or remove retry",
            retry_conditions()
        ));
    }
    let mut on = RetryOn::default();
    for (k, item) in items.iter().enumerate() {
        let at = format!("{at}[{k}]");
        let text = match item {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            other => {
                return Err(format!(
                    "{at}: expected a retry condition, got {}",
                    describe(other)
                ));
            }
        };
        match text.as_str() {
            "connect-failure" => on.connect_failure = true,
            "reset" => on.reset = true,
            "5xx" => (500..=599).for_each(|status| on.add_status(status)),
            status if !status.is_empty() && status.bytes().all(|b| b.is_ascii_digit()) => {
                match status.parse::<u16>() {
                    Ok(status @ 400..=599) => on.add_status(status),
                    _ => {
                        return Err(format!(
                            "{at}: {status} is not a status worth retrying; give a status 400-599"
                        ));
                    }
                }
            }
            name => match GRPC_CODES.iter().find(|(n, _)| *n == name) {
                Some(&(_, code)) => on.add_grpc(code),
                None => {
                    let lower = name.to_ascii_lowercase().replace('_', "-");
                    let hint = if GRPC_CODES.iter().any(|(n, _)| *n == lower) {
                        format!(" (write `{lower}`)")
                    } else {
                        String::new()
                    };
                    return Err(format!(
                        "{at}: {name} is not a retry condition{hint}; give {}",
                        retry_conditions(),
                        name = shown(name),
                    ));
                }
            },
        }
    }
    Ok(on)
}

fn read_rate_limit(value: &Value, at: &str) -> Result<RateLimitSpec, String> {
    let fields = Fields::of(
        value,
        at,
        "a mapping such as {requestsPerSecond: 100, burst: 50}",
        &["requestsPerSecond", "burst", "perPeer"],
    )?;
    let (rps_at, rps) = fields.required(
        "requestsPerSecond",
        "give the rate the route allows (e.g. 100)",
    )?;
    let requests_per_second = rate(rps, &rps_at)?;
    let burst = match fields.get("burst") {
        Some((at, v)) => whole(v, &at, 1, MAX_COUNT)?,
        // A second's worth.
        None => requests_per_second.ceil().max(1.0) as u64,
    };
    let per_peer = fields.optional("perPeer", |v, at| {
        let per_peer = rate(v, at)?;
        if per_peer > requests_per_second {
            return Err(format!(
                "{at}: {per_peer} is more than the route's requestsPerSecond ({requests_per_second}), so it would never apply; lower it or remove it"
            ));
        }
        Ok(per_peer)
    })?;
    Ok(RateLimitSpec {
        requests_per_second,
        burst: u32::try_from(burst).unwrap_or(u32::MAX),
        per_peer,
    })
}

/// Requests per second: more than 0, at most [`MAX_COUNT`].
fn rate(value: &Value, at: &str) -> Result<f64, String> {
    let Some(rate) = value.as_f64().filter(|r| r.is_finite()) else {
        return Err(format!(
            "{at}: expected a number of requests per second, got {}",
            describe(value)
        ));
    };
    if rate <= 0.0 {
        return Err(format!("{at}: must be more than 0"));
    }
    if rate > MAX_COUNT as f64 {
        return Err(format!("{at}: must be at most {MAX_COUNT}"));
    }
    Ok(rate)
}

fn read_concurrency(value: &Value, at: &str) -> Result<ConcurrencySpec, String> {
    let fields = Fields::of(
        value,
        at,
        "a mapping such as {max: 32, queue: 64, queueTimeout: 1s}",
        &["max", "queue", "queueTimeout"],
    )?;
    let (max_at, max) = fields.required(
        "max",
        "give how many requests may be in flight at once (e.g. 32)",
    )?;
    let max = whole(max, &max_at, 1, MAX_COUNT)?;
    let queue = fields.whole_or("queue", 0, MAX_COUNT, 0)?;
    let queue_timeout = fields.optional("queueTimeout", |v, at| {
        if queue == 0 {
            return Err(format!(
                "{at}: there is no queue to wait in (queue is 0); set queue or remove queueTimeout"
            ));
        }
        duration(v, at, MAX_WAIT)
    })?;
    Ok(ConcurrencySpec {
        max: u32::try_from(max).unwrap_or(u32::MAX),
        queue: u32::try_from(queue).unwrap_or(u32::MAX),
        queue_timeout: queue_timeout.unwrap_or(DEFAULT_QUEUE_TIMEOUT),
    })
}

fn read_endpoints(value: &Value, at: &str) -> Result<EndpointsSpec, String> {
    let fields = Fields::of(
        value,
        at,
        "a mapping with dns (a name) or static (a list of addresses)",
        &["dns", "static"],
    )?;
    match (fields.get("dns"), fields.get("static")) {
        (Some((at, v)), None) => read_dns(v, &at),
        (None, Some((at, v))) => read_static(v, &at),
        (Some(_), Some(_)) => Err(format!("{at}: give dns or static, not both")),
        (None, None) => Err(format!(
            "{at}: give dns (a name such as reviews-headless.shop.svc.cluster.local) or static (a list of IP:PORT)"
        )),
    }
}

fn read_dns(value: &Value, at: &str) -> Result<EndpointsSpec, String> {
    let text = string(
        value,
        at,
        "a DNS name such as reviews-headless.shop.svc.cluster.local",
    )?;
    let (name, port) = match text.rsplit_once(':') {
        Some((name, port)) => (
            name,
            Some(parse_port(port).map_err(|e| format!("{at}: {e} after the name"))?),
        ),
        None => (text, None),
    };
    let lower = name.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let address = |s: &str| s.parse::<IpAddr>().is_ok() || s.parse::<SocketAddr>().is_ok();
    if address(text) || address(name) {
        return Err(format!(
            "{at}: {text} is an address, not a name; list addresses under static",
            text = shown(text),
        ));
    }
    if !is_dns_name(name) {
        return Err(format!(
            "{at}: {text} is not a DNS name (letters, digits and `-` in dot-separated labels of at most 63), optionally with :PORT",
            text = shown(text),
        ));
    }
    Ok(EndpointsSpec::Dns {
        name: name.to_owned(),
        port,
    })
}

fn read_static(value: &Value, at: &str) -> Result<EndpointsSpec, String> {
    let items = sequence(value, at, "a list of IP:PORT such as [\"198.18.1.2:9080\"]")?;
    if items.is_empty() {
        return Err(format!(
            "{at}: the list is empty, which leaves the route nowhere to send requests; give at least one IP:PORT"
        ));
    }
    if items.len() > MAX_ENDPOINTS {
        return Err(format!(
            "{at}: {} addresses; at most {MAX_ENDPOINTS} are allowed",
            items.len()
        ));
    }
    let mut addresses: Vec<SocketAddr> = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        let at = format!("{at}[{k}]");
        let text = string(item, &at, "an address IP:PORT such as \"198.18.1.2:9080\"")?;
        let Ok(address) = text.parse::<SocketAddr>() else {
            return Err(format!(
                "{at}: {text} is not IP:PORT (198.18.1.2:9080, [fd00::1]:9080); a name goes under dns",
                text = shown(text),
            ));
        };
        let ip = address.ip();
        if address.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || ip == IpAddr::from([255, 255, 255, 255])
        {
            return Err(format!(
                "{at}: {text} cannot be connected to; give a host's address and a port 1-65535",
                text = shown(text),
            ));
        }
        if let Some(first) = addresses.iter().position(|a| *a == address) {
            return Err(format!(
                "{at}: {text} is listed twice (also at [{first}]); list each endpoint once",
                text = shown(text),
            ));
        }
        addresses.push(address);
    }
    Ok(EndpointsSpec::Static(addresses))
}

fn read_balance(value: &Value, at: &str) -> Result<Balance, String> {
    match string(value, at, "p2c-ewma or round-robin")? {
        "p2c-ewma" => Ok(Balance::P2cEwma),
        "round-robin" => Ok(Balance::RoundRobin),
        other => Err(format!(
            "{at}: {other} is not a balancing algorithm; give p2c-ewma (the default) or round-robin",
            other = shown(other),
        )),
    }
}

fn read_outlier(value: &Value, at: &str) -> Result<OutlierSpec, String> {
    let fields = Fields::of(
        value,
        at,
        "a mapping such as {consecutiveFailures: 5, ejectFor: 30s, maxEjectedPercent: 50}",
        &["consecutiveFailures", "ejectFor", "maxEjectedPercent"],
    )?;
    let failures = fields.whole_or(
        "consecutiveFailures",
        1,
        MAX_FAILURES,
        u64::from(DEFAULT_CONSECUTIVE_FAILURES),
    )?;
    let eject_for = fields.duration("ejectFor", MAX_EJECTION)?;
    let percent = fields.whole_or(
        "maxEjectedPercent",
        0,
        100,
        u64::from(DEFAULT_MAX_EJECTED_PERCENT),
    )?;
    Ok(OutlierSpec {
        consecutive_failures: u32::try_from(failures).unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
        eject_for: eject_for.unwrap_or(DEFAULT_EJECT_FOR),
        max_ejected_percent: u8::try_from(percent).unwrap_or(DEFAULT_MAX_EJECTED_PERCENT),
    })
}

fn read_retry_budget(value: &Value, at: &str) -> Result<RetryBudgetSpec, String> {
    let fields = Fields::of(
        value,
        at,
        "a mapping such as {ratio: 0.2, minPerSecond: 10}",
        &["ratio", "minPerSecond"],
    )?;
    let default = RetryBudgetSpec::default();
    let ratio = match fields.get("ratio") {
        None => default.ratio,
        Some((at, v)) => match v.as_f64().filter(|r| r.is_finite()) {
            Some(ratio) if (0.0..=1.0).contains(&ratio) => ratio,
            Some(_) => {
                return Err(format!(
                    "{at}: must be between 0 and 1 (0.2: retries add at most 20 % to the requests)"
                ));
            }
            None => {
                return Err(format!(
                    "{at}: expected a ratio between 0 and 1 such as 0.2, got {}",
                    describe(v)
                ));
            }
        },
    };
    let min_per_second = fields.whole_or(
        "minPerSecond",
        0,
        MAX_COUNT,
        u64::from(default.min_per_second),
    )?;
    Ok(RetryBudgetSpec {
        ratio,
        min_per_second: u32::try_from(min_per_second).unwrap_or(u32::MAX),
    })
}

// -------------------------------------------------------------------------------------------------
// Reading the tree

/// A mapping of the file, each of its keys one of the place's known fields.
struct Fields<'a> {
    at: String,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    /// `value` as a mapping at `at` (`what` says what is expected there), refusing unknown keys.
    fn of(value: &'a Value, at: &str, what: &str, known: &[&str]) -> Result<Fields<'a>, String> {
        let Value::Object(map) = value else {
            let place = if at.is_empty() { "the file" } else { at };
            return Err(format!("{place}: expected {what}, got {}", describe(value)));
        };
        if let Some(key) = map.keys().find(|k| !known.contains(&k.as_str())) {
            let squashed = |s: &str| s.replace(['_', '-'], "").to_ascii_lowercase();
            let hint = match known.iter().find(|k| squashed(k) == squashed(key)) {
                Some(meant) => format!("did you mean `{meant}`? "),
                None => String::new(),
            };
            return Err(format!(
                "{}: unknown field; {hint}the fields here are {}",
                join(at, &key.escape_debug().to_string()),
                known.join(", ")
            ));
        }
        Ok(Fields {
            at: at.to_owned(),
            map,
        })
    }

    fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The field's path and value.
    fn get(&self, key: &str) -> Option<(String, &'a Value)> {
        self.map.get(key).map(|v| (join(&self.at, key), v))
    }

    /// The whole number at `key`, in `min..=max`; `default` without it.
    fn whole_or(&self, key: &str, min: u64, max: u64, default: u64) -> Result<u64, String> {
        self.get(key)
            .map_or(Ok(default), |(at, v)| whole(v, &at, min, max))
    }

    /// The duration at `key`, if any: more than zero, at most `max`.
    fn duration(&self, key: &str, max: Duration) -> Result<Option<Duration>, String> {
        self.optional(key, |v, at| duration(v, at, max))
    }

    /// The field at `key`, if any, read by `read` (given the value and its path).
    fn optional<T>(
        &self,
        key: &str,
        read: impl FnOnce(&Value, &str) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        self.get(key).map(|(at, v)| read(v, &at)).transpose()
    }

    /// The field's path and value; its absence is an error that says what to give (`hint`).
    fn required(&self, key: &str, hint: &str) -> Result<(String, &'a Value), String> {
        self.get(key)
            .ok_or_else(|| format!("{}: missing; {hint}", join(&self.at, key)))
    }
}

fn join(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_owned()
    } else {
        format!("{at}.{key}")
    }
}

fn sequence<'a>(value: &'a Value, at: &str, what: &str) -> Result<&'a [Value], String> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(format!("{at}: expected {what}, got {}", describe(other))),
    }
}

fn string<'a>(value: &'a Value, at: &str, what: &str) -> Result<&'a str, String> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(format!("{at}: expected {what}, got {}", describe(other))),
    }
}

/// A whole number in `min..=max`.
fn whole(value: &Value, at: &str, min: u64, max: u64) -> Result<u64, String> {
    let n = match value.as_u64() {
        Some(n) => n,
        None if value.as_i64().is_some_and(|n| n < 0) => {
            return Err(format!("{at}: must be at least {min}"));
        }
        None => {
            return Err(format!(
                "{at}: expected a whole number, got {}",
                describe(value)
            ));
        }
    };
    if n < min {
        return Err(format!("{at}: must be at least {min}"));
    }
    if n > max {
        return Err(format!("{at}: must be at most {max}"));
    }
    Ok(n)
}

/// A duration in humantime syntax, more than zero, at most `max`.
fn duration(value: &Value, at: &str, max: Duration) -> Result<Duration, String> {
    let text = string(value, at, "a duration such as 2s or 300ms")?;
    parse_duration(text, false, max).map_err(|e| format!("{at}: {e}"))
}

/// A value as an error shows it: short, on one line.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing".into(),
        Value::String(s) => shown(s),
        Value::Array(_) => "a list".into(),
        Value::Object(_) => "a mapping".into(),
        other => other.to_string(),
    }
}

/// Text of the file as an error quotes it: in backticks, escaped onto one line, cut short.
fn shown(text: &str) -> String {
    const MAX: usize = 60;
    let escaped: String = text.escape_debug().collect();
    match escaped.char_indices().nth(MAX) {
        Some((cut, _)) => format!("`{}`...", escaped.get(..cut).unwrap_or_default()),
        None => format!("`{escaped}`"),
    }
}
