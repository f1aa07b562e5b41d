//! The access log: one record per request (or opaque TCP connection), to stdout.
//!
//! Records are formatted on the request path into a shared buffer (a short, uncontended lock), and a
//! dedicated writer thread flushes full batches, or whatever is there every 100 ms. The request path
//! never waits for stdout: when the writer falls behind by more than [`MAX_QUEUED_BATCHES`] batches,
//! the newest batch is dropped and counted in `amazing_proxy_access_log_dropped_records`. That trades
//! completeness under overload for latency, as Envoy's and nginx's buffered loggers do.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::AccessLogFormat;
use crate::proxy::error::ErrorKind;
use crate::telemetry::metrics::Direction;

const BATCH_BYTES: usize = 16 * 1024;
const MAX_QUEUED_BATCHES: usize = 16;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// What happened to one request, as the proxy saw it.
#[derive(Debug)]
pub struct Record<'a> {
    pub start: SystemTime,
    pub duration: Duration,
    pub direction: Direction,
    pub method: &'a str,
    pub protocol: &'a str,
    pub scheme: &'a str,
    pub original_authority: &'a str,
    pub upstream_authority: &'a str,
    pub path_and_query: &'a str,
    pub client: SocketAddr,
    pub request_id: &'a str,
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub grpc_status: Option<u16>,
    pub error: Option<ErrorKind>,
}

/// `scheme://authority/path`, written without building a String first.
struct Url<'a>(&'a str, &'a str, &'a str);

impl std::fmt::Display for Url<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.0, self.1, self.2)
    }
}

impl Serialize for Url<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

struct Rfc3339(SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    time: Rfc3339,
    direction: &'a str,
    protocol: &'a str,
    method: &'a str,
    original_url: Url<'a>,
    proxy_url: Url<'a>,
    status: u16,
    duration_ms: f64,
    request_bytes: u64,
    response_bytes: u64,
    client: SocketAddr,
    upstream: &'a str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fault: Option<&'a str>,
}

impl Record<'_> {
    /// Appends the record in `format` to `out`.
    pub fn write(&self, format: AccessLogFormat, out: &mut Vec<u8>) {
        match format {
            AccessLogFormat::Off => {}
            AccessLogFormat::Seed => {
                // Writing to a Vec cannot fail.
                let _ = write!(
                    out,
                    "Original URL: {}\nProxy URL: {}\nRequest Duration: {}\nRequest Size: {}\nResponse Size: {}\nResponse Status: {}\n\n",
                    Url(self.scheme, self.original_authority, self.path_and_query),
                    Url(self.scheme, self.upstream_authority, self.path_and_query),
                    GoDuration(self.duration),
                    self.request_bytes,
                    self.response_bytes,
                    self.status,
                );
            }
            AccessLogFormat::Json => {
                let record = JsonRecord {
                    time: Rfc3339(self.start),
                    direction: self.direction.as_str(),
                    protocol: self.protocol,
                    method: self.method,
                    original_url: Url(self.scheme, self.original_authority, self.path_and_query),
                    proxy_url: Url(self.scheme, self.upstream_authority, self.path_and_query),
                    status: self.status,
                    duration_ms: (self.duration.as_nanos() as f64 / 1000.0).round() / 1000.0,
                    request_bytes: self.request_bytes,
                    response_bytes: self.response_bytes,
                    client: self.client,
                    upstream: self.upstream_authority,
                    request_id: self.request_id,
                    grpc_status: self.grpc_status,
                    error: self.error.map(ErrorKind::as_str),
                    fault: self.error.map(|e| e.fault().as_str()),
                };
                if serde_json::to_writer(&mut *out, &record).is_ok() {
                    out.push(b'\n');
                }
            }
        }
    }
}

/// A duration written as Go's `time.Duration.String()` does (`1.503ms`, `250µs`, `2.5s`), since the
/// seed format reproduces the Go tutorial's output.
pub struct GoDuration(pub Duration);

impl std::fmt::Display for GoDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nanos = self.0.as_nanos();
        let (unit, scale) = match nanos {
            0 => return f.write_str("0s"),
            n if n < 1_000 => return write!(f, "{n}ns"),
            n if n < 1_000_000 => ("µs", 1_000u128),
            n if n < 1_000_000_000 => ("ms", 1_000_000),
            n if n < 60_000_000_000 => ("s", 1_000_000_000),
            n => {
                // Go writes long durations as 1m30s and 1h2m3.5s.
                let secs = n / 1_000_000_000;
                let (h, m) = (secs / 3600, secs % 3600 / 60);
                if h > 0 {
                    write!(f, "{h}h")?;
                }
                write!(f, "{m}m")?;
                return write_decimal(f, secs % 60, n % 1_000_000_000, 9, "s");
            }
        };
        write_decimal(
            f,
            nanos / scale,
            nanos % scale,
            scale.ilog10() as usize,
            unit,
        )
    }
}

/// `whole.frac` with the fraction's trailing zeros removed, as Go does.
fn write_decimal(
    f: &mut std::fmt::Formatter<'_>,
    whole: u128,
    frac: u128,
    width: usize,
    unit: &str,
) -> std::fmt::Result {
    if frac == 0 {
        return write!(f, "{whole}{unit}");
    }
    let digits = format!("{frac:0width$}");
    write!(f, "{whole}.{}{unit}", digits.trim_end_matches('0'))
}

/// Where records go: a buffer on the request path, a writer thread behind it.
pub struct AccessLog {
    format: AccessLogFormat,
    pending: Mutex<Batch>,
    queue: SyncSender<Batch>,
    dropped: Counter,
    writer: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    records: u64,
}

impl AccessLog {
    /// Starts the writer thread; `out` is stdout in production and a pipe or buffer in tests.
    pub fn start(
        format: AccessLogFormat,
        out: Box<dyn Write + Send>,
        dropped: Counter,
    ) -> Arc<AccessLog> {
        let (queue, batches) = std::sync::mpsc::sync_channel(MAX_QUEUED_BATCHES);
        let log = Arc::new(AccessLog {
            format,
            pending: Mutex::new(Batch::default()),
            queue,
            dropped,
            writer: Mutex::new(None),
        });
        if format != AccessLogFormat::Off {
            let shared = Arc::downgrade(&log);
            let handle = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer_loop(out, batches, shared));
            match handle {
                Ok(h) => *lock(&log.writer) = Some(h),
                Err(e) => {
                    tracing::error!("access log disabled: cannot start its writer thread: {e}")
                }
            }
        }
        log
    }

    pub fn enabled(&self) -> bool {
        self.format != AccessLogFormat::Off
    }

    pub fn log(&self, record: &Record<'_>) {
        if !self.enabled() {
            return;
        }
        let full = {
            let mut pending = lock(&self.pending);
            record.write(self.format, &mut pending.bytes);
            pending.records += 1;
            if pending.bytes.len() < BATCH_BYTES {
                return;
            }
            std::mem::take(&mut *pending)
        };
        self.enqueue(full);
    }

    fn enqueue(&self, batch: Batch) {
        match self.queue.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(b)) | Err(TrySendError::Disconnected(b)) => {
                self.dropped.inc_by(b.records);
            }
        }
    }

    fn take_pending(&self) -> Batch {
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Writes out everything logged so far and stops the writer; called once at exit.
    pub fn finish(&self) {
        let handle = lock(&self.writer).take();
        let Some(handle) = handle else { return };
        let rest = self.take_pending();
        if !rest.bytes.is_empty() {
            self.enqueue(rest);
        }
        // An empty batch tells the writer to stop.
        let _ = self.queue.send(Batch::default());
        let _ = handle.join();
    }
}

/// A poisoned lock only means another thread panicked mid-append; the buffer is still bytes.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn writer_loop(
    mut out: Box<dyn Write + Send>,
    batches: Receiver<Batch>,
    log: std::sync::Weak<AccessLog>,
) {
    loop {
        let batch = match batches.recv_timeout(FLUSH_EVERY) {
            Ok(b) if b.bytes.is_empty() => break,
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout) => match log.upgrade() {
                Some(log) => log.take_pending(),
                None => break,
            },
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if batch.bytes.is_empty() {
            continue;
        }
        if out
            .write_all(&batch.bytes)
            .and_then(|()| out.flush())
            .is_err()
        {
            // stdout is gone (closed pipe): nothing left to log to.
            if let Some(log) = log.upgrade() {
                log.dropped.inc_by(batch.records);
            }
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            duration: Duration::from_micros(1503),
            direction: Direction::Inbound,
            method: "GET",
            protocol: "HTTP/1.1",
            scheme: "http",
            original_authority: "198.18.0.2:80",
            upstream_authority: "127.0.0.1:80",
            path_and_query: "/get?query=param",
            client: "198.18.0.1:40000".parse().expect("addr"),
            request_id: "abc",
            status: 200,
            request_bytes: 0,
            response_bytes: 321,
            grpc_status: None,
            error: None,
        }
    }

    #[test]
    fn seed_format_is_the_tutorials_block() {
        let mut out = Vec::new();
        record().write(AccessLogFormat::Seed, &mut out);
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "Original URL: http://198.18.0.2:80/get?query=param\n\
             Proxy URL: http://127.0.0.1:80/get?query=param\n\
             Request Duration: 1.503ms\n\
             Request Size: 0\n\
             Response Size: 321\n\
             Response Status: 200\n\n"
        );
    }

    #[test]
    fn json_format_has_the_same_facts_and_more() {
        let mut out = Vec::new();
        let mut r = record();
        r.error = Some(ErrorKind::ConnectRefused);
        r.status = 502;
        r.write(AccessLogFormat::Json, &mut out);
        let line = String::from_utf8(out).expect("utf8");
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["original_url"], "http://198.18.0.2:80/get?query=param");
        assert_eq!(v["proxy_url"], "http://127.0.0.1:80/get?query=param");
        assert_eq!(v["status"], 502);
        assert_eq!(v["duration_ms"], 1.503);
        assert_eq!(v["error"], "connect_refused");
        assert_eq!(v["fault"], "app");
        assert_eq!(v["client"], "198.18.0.1:40000");
        assert_eq!(v["time"], "2023-11-14T22:13:20.000000Z");
    }

    #[test]
    fn go_durations() {
        let go = |d| GoDuration(d).to_string();
        assert_eq!(go(Duration::ZERO), "0s");
        assert_eq!(go(Duration::from_nanos(999)), "999ns");
        assert_eq!(go(Duration::from_micros(250)), "250µs");
        assert_eq!(go(Duration::from_nanos(1_503_000)), "1.503ms");
        assert_eq!(go(Duration::from_millis(2500)), "2.5s");
        assert_eq!(go(Duration::from_secs(90)), "1m30s");
        assert_eq!(go(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go(Duration::from_millis(60_500)), "1m0.5s");
    }

    #[test]
    fn finish_flushes_everything() {
        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                lock(&self.0).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Shared::default();
        let log = AccessLog::start(
            AccessLogFormat::Json,
            Box::new(sink.clone()),
            Counter::default(),
        );
        for _ in 0..1000 {
            log.log(&record());
        }
        log.finish();
        let text = String::from_utf8(lock(&sink.0).clone()).expect("utf8");
        assert_eq!(text.lines().count(), 1000);
    }
}
