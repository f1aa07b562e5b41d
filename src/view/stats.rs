//! What `top` shows, from the records of `/tap`: per group (a route, or a peer) over the last
//! [`WINDOW`], requests per second, success rate, p50 and p99 latency and bytes per second; and
//! the slowest and the latest failing requests. Pure: records and the clock come in, rows go out.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How far back the numbers look.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Samples kept at most (the oldest go first): bounds the view's memory under any load.
pub const MAX_SAMPLES: usize = 200_000;

/// What a row stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    /// The route the request took (`--routes`), else its direction and port.
    Route,
    /// The peer: its SPIFFE ID over mutual TLS, else the client's address (inbound) or the
    /// upstream (outbound).
    Peer,
}

impl GroupBy {
    pub fn other(self) -> GroupBy {
        match self {
            GroupBy::Route => GroupBy::Peer,
            GroupBy::Peer => GroupBy::Route,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            GroupBy::Route => "ROUTE",
            GroupBy::Peer => "PEER",
        }
    }
}

/// The column rows are sorted by, largest first (success: lowest first, the worst on top).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    Requests,
    Success,
    P99,
    Bytes,
}

impl SortBy {
    pub fn next(self) -> SortBy {
        match self {
            SortBy::Requests => SortBy::Success,
            SortBy::Success => SortBy::P99,
            SortBy::P99 => SortBy::Bytes,
            SortBy::Bytes => SortBy::Requests,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SortBy::Requests => "requests",
            SortBy::Success => "success",
            SortBy::P99 => "p99",
            SortBy::Bytes => "bytes",
        }
    }
}

/// One exchange, as `top` keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub route: String,
    pub peer: String,
    pub duration_ms: f64,
    /// Answered, and not with a 5xx or an error of the proxy's.
    pub ok: bool,
    pub bytes: u64,
    /// The exchange in a few words, for the tails.
    pub summary: String,
}

impl Sample {
    /// The sample of one `/tap` record; `None` for anything else (a `{"dropped":N}` notice).
    pub fn from_record(record: &Value, at: Instant) -> Option<Sample> {
        let text = |name: &str| record.get(name).and_then(Value::as_str);
        let number = |name: &str| record.get(name).and_then(Value::as_u64).unwrap_or(0);
        let direction = text("direction")?;
        let original = text("original_url").unwrap_or("-");
        let port = original
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|authority| authority.rsplit_once(':'))
            .map_or("-", |(_, port)| port);
        let route = match text("route") {
            Some(route) => route.to_owned(),
            None => format!("{direction} :{port} (no route)"),
        };
        let peer = match (text("peer"), direction) {
            (Some(peer), _) => peer.to_owned(),
            (None, "inbound") => {
                let client = text("client").unwrap_or("-");
                let ip = client.rsplit_once(':').map_or(client, |(ip, _)| ip);
                format!("inbound from {ip}")
            }
            (None, _) => format!("outbound to {}", text("upstream").unwrap_or("-")),
        };
        let status = number("status");
        let error = text("error");
        let ok = error.is_none() && status < 500;
        let duration_ms = record
            .get("duration_ms")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let shown_status = match (status, error) {
            (0, None) => "TCP".to_owned(),
            (s, Some(e)) => format!("{s} {e}"),
            (s, None) => s.to_string(),
        };
        Some(Sample {
            at,
            duration_ms,
            ok,
            bytes: number("request_bytes") + number("response_bytes"),
            summary: format!(
                "{} {original} {shown_status} {duration_ms:.1}ms",
                text("method").unwrap_or("-")
            ),
            route,
            peer,
        })
    }
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub requests_per_second: f64,
    /// Of 1: the share of `ok` samples.
    pub success: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub bytes_per_second: f64,
}

/// The samples of the last [`WINDOW`].
pub struct Stats {
    started: Instant,
    samples: VecDeque<Sample>,
    /// Records `/tap` did not send because this reader fell behind, since the start.
    pub dropped: u64,
    /// Exchanges seen since the start.
    pub seen: u64,
}

impl Stats {
    pub fn new(started: Instant) -> Stats {
        Stats {
            started,
            samples: VecDeque::new(),
            dropped: 0,
            seen: 0,
        }
    }

    pub fn add(&mut self, sample: Sample) {
        self.seen += 1;
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Forgets what is older than [`WINDOW`].
    pub fn prune(&mut self, now: Instant) {
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The rows, one per group, sorted.
    pub fn rows(&self, now: Instant, by: GroupBy, sort: SortBy) -> Vec<Row> {
        // Rates over the window, or over the time since the start when that is shorter.
        let span = now
            .saturating_duration_since(self.started)
            .clamp(Duration::from_secs(1), WINDOW)
            .as_secs_f64();
        let mut groups: HashMap<&str, Vec<&Sample>> = HashMap::new();
        for sample in &self.samples {
            let key = match by {
                GroupBy::Route => sample.route.as_str(),
                GroupBy::Peer => sample.peer.as_str(),
            };
            groups.entry(key).or_default().push(sample);
        }
        let mut rows: Vec<Row> = groups
            .into_iter()
            .map(|(name, samples)| {
                let mut durations: Vec<f64> = samples.iter().map(|s| s.duration_ms).collect();
                durations.sort_by(f64::total_cmp);
                let count = samples.len() as f64;
                Row {
                    name: name.to_owned(),
                    requests_per_second: count / span,
                    success: samples.iter().filter(|s| s.ok).count() as f64 / count,
                    p50_ms: percentile(&durations, 0.50),
                    p99_ms: percentile(&durations, 0.99),
                    bytes_per_second: samples.iter().map(|s| s.bytes as f64).sum::<f64>() / span,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            let order = match sort {
                SortBy::Requests => b.requests_per_second.total_cmp(&a.requests_per_second),
                SortBy::Success => a.success.total_cmp(&b.success),
                SortBy::P99 => b.p99_ms.total_cmp(&a.p99_ms),
                SortBy::Bytes => b.bytes_per_second.total_cmp(&a.bytes_per_second),
            };
            order.then_with(|| a.name.cmp(&b.name))
        });
        rows
    }

    /// The `n` slowest exchanges of the window, slowest first.
    pub fn slowest(&self, n: usize) -> Vec<&Sample> {
        let mut all: Vec<&Sample> = self.samples.iter().collect();
        all.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms));
        all.truncate(n);
        all
    }

    /// The `n` latest failing exchanges of the window, latest first.
    pub fn failing(&self, n: usize) -> Vec<&Sample> {
        self.samples
            .iter()
            .rev()
            .filter(|s| !s.ok)
            .take(n)
            .collect()
    }
}

/// The nearest-rank percentile `q` of sorted `values` (0 when there are none).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(at: Instant, route: &str, ms: f64, status: u64) -> Sample {
        let record = json!({
            "direction": "inbound", "method": "GET",
            "original_url": "http://198.18.0.1:80/api", "status": status, "duration_ms": ms,
            "request_bytes": 10, "response_bytes": 90, "client": "198.18.0.2:4000",
            "route": route,
        });
        Sample::from_record(&record, at).expect("a record")
    }

    #[test]
    fn records_become_samples_grouped_by_route_or_peer() {
        let now = Instant::now();
        let record = json!({
            "direction": "outbound", "method": "POST", "original_url": "http://10.0.0.9:9080/x",
            "status": 503, "duration_ms": 2.5, "request_bytes": 1, "response_bytes": 2,
            "upstream": "198.18.1.2:9080", "error": "rate_limited",
        });
        let s = Sample::from_record(&record, now).expect("a record");
        assert_eq!(s.route, "outbound :9080 (no route)");
        assert_eq!(s.peer, "outbound to 198.18.1.2:9080");
        assert!(!s.ok);
        assert_eq!(s.bytes, 3);
        assert_eq!(
            s.summary,
            "POST http://10.0.0.9:9080/x 503 rate_limited 2.5ms"
        );
        let meshed =
            json!({"direction": "inbound", "status": 200, "peer": "spiffe://td/ns/a/sa/b"});
        let meshed = Sample::from_record(&meshed, now).expect("a record");
        assert_eq!(meshed.peer, "spiffe://td/ns/a/sa/b");
        assert!(meshed.ok);
        assert!(Sample::from_record(&json!({"dropped": 3}), now).is_none());
    }

    #[test]
    fn rows_have_rates_success_and_percentiles_over_the_window() {
        let start = Instant::now();
        let mut stats = Stats::new(start);
        let now = start + Duration::from_secs(20);
        // Too old: outside the window once pruned.
        stats.add(sample(start, "api", 1000.0, 200));
        for i in 1..=100 {
            let status = if i <= 10 { 503 } else { 200 };
            stats.add(sample(now, "api", f64::from(i), status));
        }
        for _ in 0..10 {
            stats.add(sample(now, "web", 1.0, 200));
        }
        stats.prune(now);
        let rows = stats.rows(now, GroupBy::Route, SortBy::Requests);
        assert_eq!(rows.len(), 2);
        let api = &rows[0];
        assert_eq!(api.name, "api");
        assert!((api.requests_per_second - 10.0).abs() < 1e-9, "{api:?}");
        assert!((api.success - 0.9).abs() < 1e-9, "{api:?}");
        assert_eq!((api.p50_ms, api.p99_ms), (50.0, 99.0));
        assert!((api.bytes_per_second - 1000.0).abs() < 1e-9, "{api:?}");
        let by_success = stats.rows(now, GroupBy::Route, SortBy::Success);
        assert_eq!(by_success[0].name, "api", "the worst success first");
        let by_peer = stats.rows(now, GroupBy::Peer, SortBy::Requests);
        assert_eq!(by_peer.len(), 1);
        assert_eq!(by_peer[0].name, "inbound from 198.18.0.2");
        assert_eq!(stats.slowest(1)[0].duration_ms, 100.0);
        let failing = stats.failing(3);
        assert_eq!(failing.len(), 3);
        assert!(failing.iter().all(|s| !s.ok));
        assert_eq!(stats.seen, 111);
    }

    #[test]
    fn memory_is_bounded() {
        let now = Instant::now();
        let mut stats = Stats::new(now);
        for _ in 0..MAX_SAMPLES + 5 {
            stats.add(sample(now, "api", 1.0, 200));
        }
        assert_eq!(stats.samples.len(), MAX_SAMPLES);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
    }
}
