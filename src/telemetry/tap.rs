//! The live stream of what the proxy sees (`GET /tap` on the admin listener): the access log's
//! records, as JSON lines, to each reader whose filter they pass.
//!
//! The data plane never waits for a reader, nor wakes one: each reader has a queue of at most
//! [`QUEUE_BYTES`], which it empties every [`DRAIN_EVERY`] (as the access log's writer does: a
//! wake per record would cost the data plane's core a context switch per request); a record that
//! finds the queue full is dropped for that reader and counted, and the reader is told how many
//! before its next line. With no reader, a record costs one atomic load. At most [`MAX_READERS`]
//! read at once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::access_log::Record;
use crate::sync::lock;
use crate::telemetry::metrics::Direction;

/// Bytes of lines a reader may be behind before records are dropped for it.
pub(crate) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// How often a reader takes what is queued for it.
pub(crate) const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Readers at once.
pub(crate) const MAX_READERS: usize = 8;

/// Which records a reader wants; every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TapFilter {
    pub direction: Option<Direction>,
    /// The port the client dialled (the original destination's).
    pub port: Option<u16>,
    pub method: Option<String>,
    pub path_prefix: Option<String>,
    /// The status's first digit (`5` for `5xx`); opaque TCP records have none and never match.
    pub status_class: Option<u16>,
    /// The peer's SPIFFE ID (over mutual TLS).
    pub peer: Option<String>,
}

/// Why a `/tap` query was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error(
        "unknown filter {0:?}: use direction, port, method, path (a prefix), status (2xx..5xx) or peer"
    )]
    Unknown(String),
    #[error("filter {name}={value:?}: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

impl TapFilter {
    /// The filter of a query string (`direction=inbound&status=5xx`), values percent-decoded.
    pub fn from_query(query: &str) -> Result<TapFilter, FilterError> {
        let mut filter = TapFilter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(raw);
            let invalid = |name, why| FilterError::Invalid {
                name,
                value: value.clone(),
                why,
            };
            match name {
                "direction" => {
                    filter.direction = Some(match value.as_str() {
                        "inbound" => Direction::Inbound,
                        "outbound" => Direction::Outbound,
                        _ => return Err(invalid("direction", "inbound or outbound")),
                    });
                }
                "port" => {
                    let port = value
                        .parse()
                        .map_err(|_| invalid("port", "a port number"))?;
                    filter.port = Some(port);
                }
                "method" if !value.is_empty() => filter.method = Some(value),
                "path" if value.starts_with('/') => filter.path_prefix = Some(value),
                "path" => return Err(invalid("path", "a path prefix starting with /")),
                "status" => {
                    let class = match value.as_bytes() {
                        [d @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => u16::from(d - b'0'),
                        _ => return Err(invalid("status", "a class: 1xx, 2xx, 3xx, 4xx or 5xx")),
                    };
                    filter.status_class = Some(class);
                }
                "peer" if !value.is_empty() => filter.peer = Some(value),
                "method" | "peer" => {
                    let name = if name == "method" { "method" } else { "peer" };
                    return Err(invalid(name, "not empty"));
                }
                other => return Err(FilterError::Unknown(other.to_owned())),
            }
        }
        Ok(filter)
    }

    /// Whether `record` passes.
    pub(crate) fn matches(&self, record: &Record<'_>) -> bool {
        let port = || {
            (record.original_authority.rsplit_once(':'))
                .and_then(|(_, port)| port.parse::<u16>().ok())
        };
        self.direction.is_none_or(|d| d == record.direction)
            && self.port.is_none_or(|p| port() == Some(p))
            && (self.method.as_deref()).is_none_or(|m| m.eq_ignore_ascii_case(record.method))
            && (self.path_prefix.as_deref()).is_none_or(|p| record.path_and_query.starts_with(p))
            && self
                .status_class
                .is_none_or(|c| record.status != 0 && record.status / 100 == c)
            && (self.peer.as_deref()).is_none_or(|p| record.peer == Some(p))
    }
}

/// `%XX` decoded, and `+` as a space (as forms write it); invalid escapes are kept as written.
fn percent_decode(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    String::from_utf8_lossy(&crate::vocab::percent_decode(spaced.as_bytes())).into_owned()
}

/// One reader: its filter, its queue (and its size in bytes) and what it missed.
struct Reader {
    filter: TapFilter,
    queue: Mutex<(VecDeque<Bytes>, usize)>,
    dropped: AtomicU64,
}

/// The readers of the stream.
#[derive(Default)]
pub(crate) struct Tap {
    readers: Mutex<Vec<Arc<Reader>>>,
    count: AtomicUsize,
}

impl Tap {
    /// Whether anyone reads: records are published only then.
    pub(crate) fn active(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Offers `record` to every reader whose filter it passes; formatted once, if at all.
    pub(crate) fn publish(&self, record: &Record<'_>) {
        let readers = lock(&self.readers);
        let mut line: Option<Bytes> = None;
        for reader in readers.iter().filter(|r| r.filter.matches(record)) {
            let line = line
                .get_or_insert_with(|| {
                    let mut out = Vec::with_capacity(512);
                    record.write_json(&mut out);
                    Bytes::from(out)
                })
                .clone();
            let mut queue = lock(&reader.queue);
            let (lines, bytes) = &mut *queue;
            if *bytes + line.len() <= QUEUE_BYTES {
                *bytes += line.len();
                lines.push_back(line);
            } else {
                reader.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A new reader, or `None` when [`MAX_READERS`] already read.
    pub(crate) fn subscribe(self: &Arc<Self>, filter: TapFilter) -> Option<Subscription> {
        let mut readers = lock(&self.readers);
        if readers.len() >= MAX_READERS {
            return None;
        }
        let reader = Arc::new(Reader {
            filter,
            queue: Mutex::new((VecDeque::new(), 0)),
            dropped: AtomicU64::new(0),
        });
        readers.push(reader.clone());
        self.count.store(readers.len(), Ordering::Relaxed);
        Some(Subscription {
            tap: self.clone(),
            reader,
        })
    }
}

/// A reader's end: lines as they come; unsubscribes when dropped.
pub(crate) struct Subscription {
    tap: Arc<Tap>,
    reader: Arc<Reader>,
}

impl Subscription {
    /// What is queued now: a `{"dropped":N}` line first when records were dropped since the
    /// last call, then every queued line (empty when there is none).
    pub(crate) fn take(&self) -> Vec<Bytes> {
        let mut lines: Vec<Bytes> = Vec::new();
        let dropped = self.reader.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            lines.push(Bytes::from(format!("{{\"dropped\":{dropped}}}\n")));
        }
        let mut queue = lock(&self.reader.queue);
        let (queued, bytes) = &mut *queue;
        lines.extend(queued.drain(..));
        *bytes = 0;
        lines
    }

    /// The next lines, every [`DRAIN_EVERY`] until there are some.
    pub(crate) async fn next(&self) -> Vec<Bytes> {
        loop {
            tokio::time::sleep(DRAIN_EVERY).await;
            let lines = self.take();
            if !lines.is_empty() {
                return lines;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut readers = lock(&self.tap.readers);
        readers.retain(|r| !Arc::ptr_eq(r, &self.reader));
        self.tap.count.store(readers.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn record(direction: Direction, status: u16, path: &'static str) -> Record<'static> {
        Record {
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(3),
            direction,
            method: "GET",
            protocol: "HTTP/1.1",
            scheme: "http",
            original_authority: "198.18.0.1:80",
            upstream_authority: "127.0.0.1:80",
            path_and_query: path,
            client: "198.18.0.2:40000",
            request_id: "-",
            status,
            request_bytes: 0,
            response_bytes: 5,
            grpc_status: None,
            error: None,
            peer: Some("spiffe://cluster.local/ns/a/sa/b"),
            tunnel_traceparent: None,
            trace: None,
            route: None,
        }
    }

    #[test]
    fn queries_become_filters_and_bad_ones_are_named() {
        let filter = TapFilter::from_query(
            "direction=inbound&port=80&method=get&path=%2Fapi&status=5xx&peer=spiffe%3A%2F%2Fcluster.local%2Fns%2Fa%2Fsa%2Fb",
        )
        .expect("a valid query");
        assert_eq!(
            filter,
            TapFilter {
                direction: Some(Direction::Inbound),
                port: Some(80),
                method: Some("get".into()),
                path_prefix: Some("/api".into()),
                status_class: Some(5),
                peer: Some("spiffe://cluster.local/ns/a/sa/b".into()),
            }
        );
        assert_eq!(TapFilter::from_query(""), Ok(TapFilter::default()));
        assert_eq!(
            TapFilter::from_query("colour=red"),
            Err(FilterError::Unknown("colour".into()))
        );
        for bad in [
            "direction=up",
            "port=http",
            "status=500",
            "path=api",
            "method=",
        ] {
            let err = TapFilter::from_query(bad).expect_err(bad);
            assert!(matches!(err, FilterError::Invalid { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn every_field_set_must_match() {
        let all = TapFilter::default();
        let inbound_ok = record(Direction::Inbound, 200, "/api/x");
        assert!(all.matches(&inbound_ok));
        let filter =
            TapFilter::from_query("direction=inbound&port=80&method=GET&path=/api").expect("valid");
        assert!(filter.matches(&inbound_ok));
        assert!(!filter.matches(&record(Direction::Outbound, 200, "/api")));
        assert!(!filter.matches(&record(Direction::Inbound, 200, "/other")));
        let errors = TapFilter::from_query("status=5xx").expect("valid");
        assert!(errors.matches(&record(Direction::Inbound, 503, "/")));
        assert!(!errors.matches(&record(Direction::Inbound, 200, "/")));
        let tcp = TapFilter::from_query("status=2xx").expect("valid");
        assert!(
            !tcp.matches(&record(Direction::Inbound, 0, "")),
            "TCP has no status"
        );
        let peer = TapFilter::from_query("peer=spiffe://other").expect("valid");
        assert!(!peer.matches(&inbound_ok));
        let other_port = TapFilter::from_query("port=81").expect("valid");
        assert!(!other_port.matches(&inbound_ok));
    }

    #[tokio::test]
    async fn a_slow_reader_loses_lines_and_is_told_how_many() {
        let tap = Arc::new(Tap::default());
        assert!(!tap.active());
        let reader = tap.subscribe(TapFilter::default()).expect("room");
        let only_5xx = tap
            .subscribe(TapFilter::from_query("status=5xx").expect("valid"))
            .expect("room");
        assert!(tap.active());
        let mut one = Vec::new();
        record(Direction::Inbound, 200, "/").write_json(&mut one);
        let fit = QUEUE_BYTES / one.len();
        for _ in 0..fit + 10 {
            tap.publish(&record(Direction::Inbound, 200, "/"));
        }
        tap.publish(&record(Direction::Inbound, 503, "/"));
        let lines = reader.next().await;
        assert_eq!(lines[0], Bytes::from("{\"dropped\":11}\n"));
        assert_eq!(lines.len(), fit + 1);
        assert!(lines[1].starts_with(b"{\"time\":"));
        assert!(reader.take().is_empty(), "taken whole");
        let errors = only_5xx.next().await;
        assert_eq!(errors.len(), 1, "the 5xx reader got only the 503");
        drop(reader);
        drop(only_5xx);
        assert!(!tap.active(), "readers that left are gone");
    }

    #[test]
    fn at_most_max_readers() {
        let tap = Arc::new(Tap::default());
        let held: Vec<Subscription> = (0..MAX_READERS)
            .map(|_| tap.subscribe(TapFilter::default()).expect("room"))
            .collect();
        assert!(tap.subscribe(TapFilter::default()).is_none());
        drop(held);
        assert!(tap.subscribe(TapFilter::default()).is_some());
    }
}
