//! `amazing-proxy run`: the wiring. Binds every listener first (a port in use fails the start before
//! anything is served), builds the data plane's [`Shared`] state, starts the listeners and the admin
//! server, then waits for the signal that starts the drain.
//!
//! The signal contract: SIGTERM drains (readiness turns 503, serving continues for --drain-delay,
//! then in-flight requests get up to --drain-timeout); SIGINT drains without the delay; a second
//! signal exits at once; `POST /shutdown` from loopback is SIGTERM.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Listen, RunArgs};
use crate::proxy::Shared;
use crate::proxy::drain::Phase;
use crate::proxy::listener::Listener;
use crate::telemetry::metrics::Direction;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    // The OS error is part of the message, not a `source`: printed once.
    #[error(
        "cannot bind the {what} listener on {addr}: {error} (is another process using the port?)"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the admin thread: {0}")]
    Admin(std::io::Error),
}

/// How long the spans still queued at exit may take to export.
const TRACES_CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

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
    let shared = runtime.block_on(run(args))?;
    // Whatever is still running was cut by the drain timeout: dropping the runtime drops those
    // tasks, and each unfinished exchange logs itself as `drain_timeout`.
    shared.telemetry.start_drain_cut();
    drop(runtime);
    let cut = shared.telemetry.metrics.drain_cut_requests.get();
    shared.telemetry.access_log.finish();
    if let Some(traces) = &shared.telemetry.traces {
        traces.close(TRACES_CLOSE_TIMEOUT);
    }
    if cut > 0 {
        tracing::warn!(
            cut,
            "drained; {cut} requests were cut by --drain-timeout; exiting"
        );
    } else {
        tracing::info!("drained; exiting");
    }
    Ok(())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|error| RunError::Bind { what, addr, error })
}

/// The outbound listener's twin on `[::1]`, same port, when it listens on 127.0.0.1: `init`
/// redirects the app's IPv6 connections as it does IPv4's, and an IPv6 REDIRECT leads to `::1`.
/// `None` where the namespace has no IPv6 loopback (then nothing can be redirected there either).
async fn ipv6_loopback_twin(v4: &TcpListener) -> Result<Option<TcpListener>, RunError> {
    let port = match v4.local_addr() {
        Ok(addr) if addr.ip() == IpAddr::V4(Ipv4Addr::LOCALHOST) => addr.port(),
        _ => return Ok(None),
    };
    let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrNotAvailable
                || e.raw_os_error() == Some(nix::errno::Errno::EAFNOSUPPORT as i32) =>
        {
            tracing::debug!("no IPv6 loopback ({e}): the outbound listener is IPv4 only");
            Ok(None)
        }
        // Taken: whoever holds it would receive the app's redirected IPv6 connections.
        Err(error) => Err(RunError::Bind {
            what: "outbound (IPv6 loopback)",
            addr,
            error,
        }),
    }
}

async fn run(args: RunArgs) -> Result<Arc<Shared>, RunError> {
    // Bind everything first: a port in use fails the start before anything is served.
    let inbound = bind("inbound", args.inbound).await?;
    let outbound = match args.outbound {
        Listen(Some(addr)) => Some(bind("outbound", addr).await?),
        Listen(None) => None,
    };
    let outbound6 = match &outbound {
        Some(v4) => ipv6_loopback_twin(v4).await?,
        None => None,
    };
    let hbone = match args.hbone_listen() {
        Some(addr) => Some(bind("hbone", addr).await?),
        None => None,
    };
    let admin = std::net::TcpListener::bind(args.admin).map_err(|error| RunError::Bind {
        what: "admin",
        addr: args.admin,
        error,
    })?;
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(
        inbound = %local(&inbound),
        outbound = %outbound.as_ref().map(local).unwrap_or_else(|| "off".into()),
        outbound_ipv6 = %outbound6.as_ref().map(local).unwrap_or_else(|| "off".into()),
        hbone = %hbone.as_ref().map(local).unwrap_or_else(|| "off".into()),
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        app = %args.app,
        "listening"
    );

    // The ports as bound (`:0` picks one), so that the proxy knows its own ports as they are.
    let mut bound = args.clone();
    let port_of = |l: &TcpListener| l.local_addr().ok();
    bound.inbound = port_of(&inbound).unwrap_or(args.inbound);
    bound.admin = admin.local_addr().unwrap_or(args.admin);
    if let Some(addr) = outbound.as_ref().and_then(port_of) {
        bound.outbound = Listen(Some(addr));
    }
    if let Some(addr) = hbone.as_ref().and_then(port_of) {
        bound.hbone = Some(Listen(Some(addr)));
    }
    let config = bound.proxy_config();
    if let Some(path) = &config.routes_path {
        tracing::info!(
            path = %path.display(),
            inbound = config.routes.inbound.len(),
            outbound = config.routes.outbound.len(),
            "routes read: in force, reloaded when the file changes"
        );
    }
    let shared = Shared::new(&config, Box::new(std::io::stdout()));
    crate::admin::spawn(
        admin,
        crate::admin::AdminState {
            shared: shared.clone(),
            app_ready_path: args.app_ready_path.clone(),
        },
    )
    .map_err(RunError::Admin)?;

    tokio::spawn(shared.upstreams.pool.clone().reap_forever());
    tokio::spawn(shared.clone().watch_policy_forever());
    tokio::spawn(shared.clone().watch_routes_forever());
    tokio::spawn(Listener::new(shared.clone(), inbound, Direction::Inbound).run());
    for outbound in outbound.into_iter().chain(outbound6) {
        tokio::spawn(Listener::new(shared.clone(), outbound, Direction::Outbound).run());
    }
    if let Some(mtls) = &shared.mtls {
        let expiry = shared.telemetry.metrics.identity_expiry_seconds.clone();
        tokio::spawn(mtls.identity.clone().watch_forever(expiry));
    }
    if let Some(hbone) = hbone {
        tokio::spawn(Listener::hbone(shared.clone(), hbone).run());
    }
    shared.drain.advance(Phase::Serving);

    let fast = wait_for_shutdown(&shared).await;
    let delay = if fast {
        Duration::ZERO
    } else {
        args.drain_delay
    };
    tracing::info!(?delay, timeout = ?args.drain_timeout, "draining: /ready now answers 503");
    tokio::time::sleep(delay).await;
    shared.drain.advance(Phase::Closing);
    shared.limits.close_all_when_idle();
    let open = shared.limits.open_connections();
    tracing::info!(
        open,
        "closing: no longer accepting; finishing in-flight requests"
    );
    if tokio::time::timeout(args.drain_timeout, shared.limits.wait_all_closed())
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.limits.open_connections(),
            "drain timeout reached: cutting the remaining connections"
        );
    }
    Ok(shared)
}

/// Waits for SIGTERM (full drain), SIGINT (drain without the delay) or `POST /shutdown`.
/// Returns whether to skip the drain delay.
async fn wait_for_shutdown(shared: &Arc<Shared>) -> bool {
    let drain = &shared.drain;
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
    let telemetry = shared.telemetry.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without finishing the drain");
        telemetry.access_log.finish();
        std::process::exit(1);
    });
    fast
}
