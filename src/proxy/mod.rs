//! The data plane: `amazing-proxy run`.
//!
//! - [`listener`]: accept, limits, original destination, protocol detection;
//! - [`http`]: one request's phases; [`headers`]: the pure header rewriting; [`body`]: counting
//!   bodies that trigger the logging phase;
//! - [`upstream`]: pooled connections to the app and to original destinations; [`tcp`]: opaque bytes;
//! - [`drain`]: the shutdown state machine; [`error`]: the one error type.
//!
//! Threads: the data plane runs on `--workers` threads (one current-thread runtime when 1, the
//! default); the admin listener has its own thread so that a slow scrape never delays a request;
//! the access log has a writer thread so that stdout never blocks a request.

pub mod body;
pub mod chunked;
pub mod drain;
pub mod error;
pub mod h1;
pub mod headers;
pub mod http;
pub mod listener;
pub mod tcp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{AppProtocol, Listen, RunArgs};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{Direction, Metrics};
use drain::{Drain, Phase};
use listener::Connections;
use upstream::{ConnectOptions, Upstream};

/// Everything the request path reads, built once and shared for the life of the process.
pub struct Proxy {
    pub app: SocketAddr,
    pub app_protocol: AppProtocol,
    pub http2_ports: Vec<u16>,
    pub opaque_ports: Vec<u16>,
    pub rewrite_host: bool,
    pub preserve_header_case: bool,
    pub max_header_bytes: usize,
    pub response_timeout: Duration,
    pub detect_timeout: Duration,
    pub connect_options: ConnectOptions,
    pub max_connections: usize,
    pub max_in_flight: usize,
    pub in_flight: AtomicUsize,
    pub connections: Connections,
    pub upstream: Upstream,
    pub h1_pool: h1::Pool,
    pub metrics: Metrics,
    pub access_log: Arc<AccessLog>,
    pub http1_server: auto::Builder<TokioExecutor>,
    pub http2_server: auto::Builder<TokioExecutor>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "cannot bind the {what} listener on {addr}: {source} (is another process using the port?)"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the admin thread: {0}")]
    Admin(std::io::Error),
}

pub fn main(args: RunArgs) -> Result<(), RunError> {
    args.validate().map_err(RunError::Config)?;
    let mut runtime = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(usize::from(args.workers));
        b
    };
    let runtime = runtime.enable_all().build().map_err(RunError::Runtime)?;
    runtime.block_on(run(args))
}

fn server_builders(args: &RunArgs) -> (auto::Builder<TokioExecutor>, auto::Builder<TokioExecutor>) {
    let mut http1 = auto::Builder::new(TokioExecutor::new()).http1_only();
    http1
        .http1()
        .timer(TokioTimer::new())
        .preserve_header_case(args.preserve_header_case)
        .max_buf_size(args.max_header_bytes as usize);
    let mut http2 = auto::Builder::new(TokioExecutor::new()).http2_only();
    http2
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(args.max_header_bytes)
        // Extended CONNECT (RFC 8441: WebSocket over HTTP/2), forwarded to apps that support it.
        .enable_connect_protocol();
    (http1, http2)
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { what, addr, source })
}

// TODO(lead): split; clippy.toml limits functions to 100 lines.
#[allow(clippy::too_many_lines)]
async fn run(args: RunArgs) -> Result<(), RunError> {
    // Bind everything first: a port in use fails the start before anything is served.
    let inbound = bind("inbound", args.inbound).await?;
    let outbound = match args.outbound {
        Listen(Some(addr)) => Some(bind("outbound", addr).await?),
        Listen(None) => None,
    };
    let admin = std::net::TcpListener::bind(args.admin).map_err(|source| RunError::Bind {
        what: "admin",
        addr: args.admin,
        source,
    })?;
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        inbound = %local(&inbound),
        outbound = %outbound.as_ref().map(local).unwrap_or_else(|| "off".into()),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        app = %args.app,
        "listening"
    );

    let metrics = Metrics::new();
    let access_log = AccessLog::start(
        args.access_log,
        Box::new(std::io::stdout()),
        metrics.access_log_dropped.clone(),
    );
    let (http1_server, http2_server) = server_builders(&args);
    let connect_options = ConnectOptions {
        timeout: args.connect_timeout,
        mark: upstream::mark_if_permitted(args.proxy_mark),
    };
    // Lives as long as the process: the request path borrows it without reference counting.
    let proxy: &'static Proxy = Box::leak(Box::new(Proxy {
        app: args.app,
        app_protocol: args.app_protocol,
        http2_ports: args.http2_ports.0.clone(),
        opaque_ports: args.opaque_ports.0.clone(),
        rewrite_host: args.rewrite_host,
        preserve_header_case: args.preserve_header_case,
        max_header_bytes: args.max_header_bytes as usize,
        response_timeout: args.response_timeout,
        detect_timeout: args.detect_timeout,
        connect_options,
        max_connections: args.max_connections as usize,
        max_in_flight: args.max_in_flight as usize,
        in_flight: AtomicUsize::new(0),
        connections: Connections::default(),
        upstream: Upstream::new(connect_options, args.preserve_header_case),
        h1_pool: h1::Pool::default(),
        metrics,
        access_log,
        http1_server,
        http2_server,
    }));

    let drain = Drain::default();
    crate::admin::spawn(
        admin,
        crate::admin::AdminState {
            proxy,
            drain: drain.clone(),
            app: args.app,
            app_ready_path: args.app_ready_path.clone(),
        },
    )
    .map_err(RunError::Admin)?;

    tokio::spawn(listener::accept_loop(
        proxy,
        inbound,
        Direction::Inbound,
        drain.subscribe(),
    ));
    if let Some(outbound) = outbound {
        tokio::spawn(listener::accept_loop(
            proxy,
            outbound,
            Direction::Outbound,
            drain.subscribe(),
        ));
    }
    drain.advance(Phase::Serving);

    let fast = wait_for_shutdown(&drain, proxy).await;
    let delay = if fast {
        Duration::ZERO
    } else {
        args.drain_delay
    };
    tracing::info!(?delay, timeout = ?args.drain_timeout, "draining: /ready now answers 503");
    tokio::time::sleep(delay).await;
    drain.advance(Phase::Closing);
    let open = proxy.connections.count();
    tracing::info!(
        open,
        "closing: no longer accepting; finishing in-flight requests"
    );
    if tokio::time::timeout(args.drain_timeout, proxy.connections.wait_all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open = proxy.connections.count(),
            "drain timeout reached: closing the remaining connections"
        );
    }
    proxy.access_log.finish();
    tracing::info!("drained; exiting");
    Ok(())
}

/// Waits for SIGTERM (full drain), SIGINT (drain without the delay) or `POST /shutdown`.
/// Returns whether to skip the drain delay.
async fn wait_for_shutdown(drain: &Drain, proxy: &'static Proxy) -> bool {
    use tokio::signal::unix::{SignalKind, signal};
    let mut phase = drain.subscribe();
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!(
                "cannot install signal handlers; only POST /shutdown will stop the proxy"
            );
            let _ = phase.wait_for(|p| *p >= Phase::Draining).await;
            return false;
        }
    };
    let fast = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM received"); false }
        _ = int.recv() => { tracing::info!("SIGINT received"); true }
        _ = phase.wait_for(|p| *p >= Phase::Draining) => { tracing::info!("shutdown requested on the admin listener"); false }
    };
    drain.advance(Phase::Draining);
    // A second signal means "now".
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without finishing the drain");
        proxy.access_log.finish();
        std::process::exit(1);
    });
    fast
}
