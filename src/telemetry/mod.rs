//! What the proxy tells operators: diagnostics (stderr), the access log (stdout) and metrics.

pub(crate) mod access_log;
pub mod istio;
pub mod metrics;
pub mod otlp;
pub mod tap;
pub mod trace;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use access_log::{AccessLog, Record};
use istio::{IstioMetrics, OwnWorkload};
use metrics::Metrics;
use otlp::{TraceResource, Traces};
use prometheus_client::registry::Registry;
use tap::Tap;

/// The metrics and the access log, shared by every connection.
pub struct Telemetry {
    pub metrics: Metrics,
    pub(crate) access_log: Arc<AccessLog>,
    /// Readers of the live stream (`GET /tap`), who see the records whatever the log's format.
    pub(crate) tap: Arc<Tap>,
    /// Istio's standard metrics (`--metrics-compat istio`), in a registry of their own (their
    /// names are Istio's, without our prefix).
    pub(crate) istio: Option<(IstioMetrics, Registry)>,
    /// Spans and their export (`--otlp-endpoint`).
    pub(crate) traces: Option<Arc<Traces>>,
    /// Set when --drain-timeout cuts what is still running: the exchanges dropped from then on
    /// are logged as `drain_timeout`, not as clients that went away.
    drain_cut: AtomicBool,
}

impl Telemetry {
    /// `istio`: this pod, when Istio's metrics are exported too; `traces`: where spans go, this
    /// pod as they name it, and the mark for the collector connection.
    pub(crate) fn new(
        format: crate::vocab::AccessLogFormat,
        out: Box<dyn std::io::Write + Send>,
        istio: Option<OwnWorkload>,
        traces: Option<(&crate::settings::TraceConfig, TraceResource, Option<u32>)>,
    ) -> Self {
        let metrics = Metrics::new();
        let access_log = AccessLog::start(format, out, metrics.access_log_dropped.clone());
        let traces = traces.and_then(|(config, resource, mark)| {
            Traces::start(config, resource, mark, &metrics.trace_spans)
                .inspect_err(|e| {
                    tracing::error!("cannot start the OTLP export thread ({e}); no traces");
                })
                .ok()
        });
        Telemetry {
            traces,
            metrics,
            access_log,
            tap: Arc::default(),
            istio: istio.map(|own| {
                let mut registry = Registry::default();
                (IstioMetrics::new(own, &mut registry), registry)
            }),
            drain_cut: AtomicBool::new(false),
        }
    }

    /// Whether an exchange's record is wanted at all: logged, or read live.
    pub(crate) fn wants_records(&self) -> bool {
        self.access_log.enabled() || self.tap.active()
    }

    /// Prometheus text exposition: ours, then Istio's when exported.
    pub fn encode_metrics(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.metrics.registry);
        if let Some((_, registry)) = &self.istio {
            let _ = encode_registry(&mut out, registry);
        }
        let _ = encode_eof(&mut out);
        out
    }

    /// Istio's metrics, when exported.
    pub(crate) fn istio(&self) -> Option<&IstioMetrics> {
        self.istio.as_ref().map(|(metrics, _)| metrics)
    }

    /// Logs the record, and offers it to the live stream's readers.
    pub(crate) fn record(&self, record: &Record<'_>) {
        if self.tap.active() {
            self.tap.publish(record);
        }
        self.access_log.log(record);
    }

    pub(crate) fn start_drain_cut(&self) {
        self.drain_cut.store(true, Ordering::Release);
    }

    pub(crate) fn drain_cut(&self) -> bool {
        self.drain_cut.load(Ordering::Acquire)
    }
}

/// Diagnostics (not the access log) go to stderr, filtered by `AMAZING_PROXY_LOG` (default `info`).
pub fn init_diagnostics() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMAZING_PROXY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
