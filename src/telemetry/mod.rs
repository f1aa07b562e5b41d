//! What the proxy tells operators: diagnostics (stderr), the access log (stdout) and metrics.

pub mod access_log;
pub mod metrics;

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
