//! The access log: one record per request (or opaque TCP connection), to stdout.
//!
//! Records are formatted on the request path into a shared buffer (a short, uncontended lock); full
//! 64 KiB batches move to a queue. A dedicated writer thread wakes every [`WRITE_EVERY`] on its own,
//! writes the queued batches and whatever is pending: the request path never makes a syscall to
//! wake it, and the writer (which shares the proxy's core in a sidecar) interrupts the data plane
//! 50 times a second rather than once per batch. The request path never waits for stdout: when the
//! writer falls behind by more than [`MAX_QUEUED_BATCHES`] batches, the newest batch is dropped and
//! counted in `amazing_proxy_access_log_dropped_records_total`. That trades completeness under overload for
//! latency, as Envoy's and nginx's buffered loggers do.

use crate::sync::lock;
use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

use crate::error::ErrorKind;
use crate::telemetry::metrics::Direction;
use crate::vocab::AccessLogFormat;

const BATCH_BYTES: usize = 64 * 1024;
/// 2 MiB at most: about 80 ms of a saturated core's records.
const MAX_QUEUED_BATCHES: usize = 32;
const WRITE_EVERY: Duration = Duration::from_millis(20);

/// What happened to one request, as the proxy saw it.
#[derive(Debug)]
pub(crate) struct Record<'a> {
    pub(crate) start: SystemTime,
    pub(crate) duration: Duration,
    pub(crate) direction: Direction,
    pub(crate) method: &'a str,
    pub(crate) protocol: &'a str,
    pub(crate) scheme: &'a str,
    pub(crate) original_authority: &'a str,
    pub(crate) upstream_authority: &'a str,
    pub(crate) path_and_query: &'a str,
    pub(crate) client: &'a str,
    pub(crate) request_id: &'a str,
    pub(crate) status: u16,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
    pub(crate) grpc_status: Option<u16>,
    pub(crate) error: Option<ErrorKind>,
    /// The peer's SPIFFE ID when the connection came (or went) through an HBONE tunnel.
    pub(crate) peer: Option<&'a str>,
    /// The HBONE tunnel's W3C `traceparent`, the same in the client's record and the server's.
    pub(crate) tunnel_traceparent: Option<&'a str>,
    /// The route the request took (`--routes`), and how many attempts it made.
    pub(crate) route: Option<(&'a str, u32)>,
    /// The exchange's span, when tracing is on (`--otlp-endpoint`).
    pub(crate) trace: Option<&'a crate::telemetry::trace::SpanIds>,
}

/// `scheme://authority/path`, written without building a String first.
struct Url<'a>(&'a str, &'a str, &'a str);

impl std::fmt::Display for Url<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.0, self.1, self.2)
    }
}

impl Record<'_> {
    /// Appends the record in `format` to `out`.
    pub(crate) fn write(&self, format: AccessLogFormat, out: &mut Vec<u8>) {
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
            AccessLogFormat::Json => self.write_json(out),
        }
    }

    /// One JSON object and a newline. Written by hand rather than through serde: it is the
    /// request path's largest cost after the syscalls, and nearly every string needs no escaping.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        write_rfc3339_micros(out, self.start);
        out.extend_from_slice(b"\",\"direction\":\"");
        out.extend_from_slice(self.direction.as_str().as_bytes());
        out.extend_from_slice(b"\",\"protocol\":");
        json_str(out, &[self.protocol]);
        out.extend_from_slice(b",\"method\":");
        json_str(out, &[self.method]);
        out.extend_from_slice(b",\"original_url\":");
        json_str(
            out,
            &[
                self.scheme,
                "://",
                self.original_authority,
                self.path_and_query,
            ],
        );
        out.extend_from_slice(b",\"proxy_url\":");
        json_str(
            out,
            &[
                self.scheme,
                "://",
                self.upstream_authority,
                self.path_and_query,
            ],
        );
        out.extend_from_slice(b",\"status\":");
        json_int(out, u64::from(self.status));
        out.extend_from_slice(b",\"duration_ms\":");
        let micros = self.duration.as_micros() as u64;
        json_int(out, micros / 1000);
        out.push(b'.');
        let frac = micros % 1000;
        out.extend_from_slice(&[
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
        out.extend_from_slice(b",\"request_bytes\":");
        json_int(out, self.request_bytes);
        out.extend_from_slice(b",\"response_bytes\":");
        json_int(out, self.response_bytes);
        out.extend_from_slice(b",\"client\":");
        json_str(out, &[self.client]);
        out.extend_from_slice(b",\"upstream\":");
        json_str(out, &[self.upstream_authority]);
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, &[self.request_id]);
        if let Some(grpc) = self.grpc_status {
            out.extend_from_slice(b",\"grpc_status\":");
            json_int(out, u64::from(grpc));
        }
        if let Some(peer) = self.peer {
            out.extend_from_slice(b",\"peer\":");
            json_str(out, &[peer]);
        }
        if let Some(traceparent) = self.tunnel_traceparent {
            out.extend_from_slice(b",\"tunnel_traceparent\":");
            json_str(out, &[traceparent]);
        }
        if let Some(trace) = self.trace {
            // The ids as the traceparent writes them: 32 and 16 lower-case hex digits.
            let traceparent = trace.traceparent();
            out.extend_from_slice(b",\"trace_id\":\"");
            out.extend_from_slice(&traceparent[3..35]);
            out.extend_from_slice(b"\",\"span_id\":\"");
            out.extend_from_slice(&traceparent[36..52]);
            out.push(b'"');
        }
        if let Some((route, attempts)) = self.route {
            out.extend_from_slice(b",\"route\":");
            json_str(out, &[route]);
            out.extend_from_slice(b",\"attempts\":");
            json_int(out, u64::from(attempts));
        }
        if let Some(error) = self.error {
            out.extend_from_slice(b",\"error\":\"");
            out.extend_from_slice(error.as_str().as_bytes());
            out.extend_from_slice(b"\",\"fault\":\"");
            out.extend_from_slice(error.fault().as_str().as_bytes());
            out.push(b'"');
        }
        out.extend_from_slice(b"}\n");
    }
}

fn json_int(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// The concatenation of `parts` as one JSON string.
fn json_str(out: &mut Vec<u8>, parts: &[&str]) {
    let plain = |s: &&str| {
        s.bytes()
            .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f)
    };
    if parts.iter().all(plain) {
        out.push(b'"');
        for part in parts {
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'"');
    } else {
        // Writing to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &parts.concat());
    }
}

/// `2023-11-14T22:13:20.000000Z`. The date part is computed with the civil-from-days algorithm
/// (Howard Hinnant's), which is what `humantime` does too, minus the formatter machinery.
fn write_rfc3339_micros(out: &mut Vec<u8>, t: SystemTime) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let two = |out: &mut Vec<u8>, v: u64| {
        out.extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8])
    };
    out.extend_from_slice(itoa::Buffer::new().format(year).as_bytes());
    out.push(b'-');
    two(out, month as u64);
    out.push(b'-');
    two(out, day as u64);
    out.push(b'T');
    two(out, rem / 3600);
    out.push(b':');
    two(out, rem / 60 % 60);
    out.push(b':');
    two(out, rem % 60);
    out.push(b'.');
    let micros = since.subsec_micros();
    let digits = itoa::Buffer::new().format(micros).len();
    out.extend(std::iter::repeat_n(b'0', 6 - digits));
    out.extend_from_slice(itoa::Buffer::new().format(micros).as_bytes());
    out.extend_from_slice(b"Z");
}

/// A duration written as Go's `time.Duration.String()` does (`1.503ms`, `250µs`, `2.5s`), since the
/// seed format reproduces the Go tutorial's output.
pub(crate) struct GoDuration(pub(crate) Duration);

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
pub(crate) struct AccessLog {
    format: AccessLogFormat,
    pending: Mutex<Batch>,
    queue: Mutex<VecDeque<Batch>>,
    stop: AtomicBool,
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
    pub(crate) fn start(
        format: AccessLogFormat,
        out: Box<dyn Write + Send>,
        dropped: Counter,
    ) -> Arc<AccessLog> {
        let log = Arc::new(AccessLog {
            format,
            pending: Mutex::new(Batch::default()),
            queue: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
            dropped,
            writer: Mutex::new(None),
        });
        if format != AccessLogFormat::Off {
            let shared = Arc::downgrade(&log);
            let handle = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || writer_loop(out, shared));
            match handle {
                Ok(h) => *lock(&log.writer) = Some(h),
                Err(e) => {
                    tracing::error!("access log disabled: cannot start its writer thread: {e}")
                }
            }
        }
        log
    }

    pub(crate) fn enabled(&self) -> bool {
        self.format != AccessLogFormat::Off
    }

    pub(crate) fn log(&self, record: &Record<'_>) {
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
        let mut queue = lock(&self.queue);
        if queue.len() < MAX_QUEUED_BATCHES {
            queue.push_back(batch);
        } else {
            drop(queue);
            self.dropped.inc_by(batch.records);
        }
    }

    /// Everything to write now: the queued batches, then what is pending.
    fn take_all(&self) -> VecDeque<Batch> {
        let mut batches = std::mem::take(&mut *lock(&self.queue));
        let pending = std::mem::take(&mut *lock(&self.pending));
        if !pending.bytes.is_empty() {
            batches.push_back(pending);
        }
        batches
    }

    /// Writes out everything logged so far and stops the writer; called once at exit.
    pub(crate) fn finish(&self) {
        let handle = lock(&self.writer).take();
        let Some(handle) = handle else { return };
        self.stop.store(true, Ordering::Release);
        handle.thread().unpark();
        let _ = handle.join();
    }
}

fn writer_loop(mut out: Box<dyn Write + Send>, log: std::sync::Weak<AccessLog>) {
    loop {
        std::thread::park_timeout(WRITE_EVERY);
        let Some(log) = log.upgrade() else { break };
        let stopping = log.stop.load(Ordering::Acquire);
        for batch in log.take_all() {
            if out
                .write_all(&batch.bytes)
                .and_then(|()| out.flush())
                .is_err()
            {
                // stdout is gone (closed pipe): nothing left to log to.
                log.dropped.inc_by(batch.records);
            }
        }
        if stopping {
            break;
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
            client: "198.18.0.1:40000",
            request_id: "abc",
            status: 200,
            request_bytes: 0,
            response_bytes: 321,
            grpc_status: None,
            error: None,
            peer: None,
            tunnel_traceparent: None,
            trace: None,
            route: None,
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
        assert_eq!(v["method"], "GET");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["upstream"], "127.0.0.1:80");
        assert!(v.get("peer").is_none(), "plaintext has no peer: {line}");
        assert!(v.get("tunnel_traceparent").is_none(), "{line}");
        let mut out = Vec::new();
        r.peer = Some("spiffe://cluster.local/ns/a/sa/b");
        r.tunnel_traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
        r.write(AccessLogFormat::Json, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["peer"], "spiffe://cluster.local/ns/a/sa/b");
        assert_eq!(
            v["tunnel_traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        );
        assert!(v.get("grpc_status").is_none());
    }

    #[test]
    fn json_escapes_what_needs_it_and_dates_match_humantime() {
        let mut r = record();
        r.path_and_query = "/a\"b\\c";
        let mut out = Vec::new();
        r.write(AccessLogFormat::Json, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["original_url"], "http://198.18.0.2:80/a\"b\\c");
        for secs in [
            0u64,
            951_782_400,
            1_709_251_199,
            4_102_444_800,
            1_700_000_000,
        ] {
            let t = SystemTime::UNIX_EPOCH + Duration::from_micros(secs * 1_000_000 + 4321);
            let mut out = Vec::new();
            write_rfc3339_micros(&mut out, t);
            assert_eq!(
                String::from_utf8(out).expect("utf8"),
                humantime::format_rfc3339_micros(t).to_string()
            );
        }
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
