//! Accepting connections: limits, original destination, protocol detection, then HTTP or TCP.
//!
//! Detection peeks at the first bytes without consuming them. It biases towards availability: what
//! is not recognisably HTTP/1 or the HTTP/2 preface, or says nothing within `--detect-timeout`
//! (server-speaks-first protocols), is forwarded as opaque bytes rather than refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::Authority;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::Proxy;
use super::detect::{Detected, classify};
use super::drain::{Phase, wait_for_closing};
use super::http1::{self as h1, Outcome};
use super::hyper_path::{ConnContext, handle, refusal};
use super::tcp;
use crate::error::ErrorKind;
use crate::telemetry::metrics::{Direction, Protocol};

/// Open client connections, for `--max-connections`, the gauge, and the drain's wait.
#[derive(Default)]
pub struct Connections {
    open: AtomicUsize,
    all_closed: tokio::sync::Notify,
}

impl Connections {
    pub fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn wait_all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) struct ConnectionGuard {
    proxy: &'static Proxy,
    direction: Direction,
}

impl ConnectionGuard {
    pub(crate) fn open(proxy: &'static Proxy, direction: Direction) -> ConnectionGuard {
        proxy.connections.open.fetch_add(1, Ordering::AcqRel);
        proxy.metrics.direction(direction).open_connections.inc();
        ConnectionGuard { proxy, direction }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.proxy
            .metrics
            .direction(self.direction)
            .open_connections
            .dec();
        if self.proxy.connections.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.proxy.all_closed();
        }
    }
}

impl Proxy {
    fn all_closed(&self) {
        self.connections.all_closed.notify_waiters();
    }
}

/// Accepts until the drain reaches `Closing`.
pub async fn accept_loop(
    proxy: &'static Proxy,
    listener: TcpListener,
    direction: Direction,
    mut phase: watch::Receiver<Phase>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = wait_for_closing(&mut phase) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                let guard = ConnectionGuard::open(proxy, direction);
                let phase = phase.clone();
                tokio::spawn(serve_connection(
                    proxy, stream, client, direction, guard, phase,
                ));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed on the {} listener: {e}", direction.as_str());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// IPv4 peers of a dual-stack listener (`[::]:8000`) appear as `::ffff:a.b.c.d`: they are IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Where a redirected connection was going, when it was redirected.
fn original_destination(stream: &TcpStream) -> Option<SocketAddr> {
    // An IPv4 connection on a dual-stack socket was NAT-ed by IPv4 conntrack, which answers
    // SO_ORIGINAL_DST (SOL_IP) on that socket; asking IPv6 conntrack finds nothing.
    let local = canonical(stream.local_addr().ok()?);
    let sock = socket2::SockRef::from(stream);
    let original = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    let original = original.ok()?.as_socket()?;
    // Without NAT, conntrack reports the local address itself.
    (original != local).then_some(original)
}

async fn detect(stream: &TcpStream, timeout: Duration) -> Detected {
    // Room for the longest method (16), a space and `https://`.
    let mut buf = [0u8; 32];
    let peek = async {
        let mut last_len = 0;
        loop {
            match stream.peek(&mut buf).await {
                // The client half-closed before sending anything (`nc host port < /dev/null`):
                // it can still read, and a server-first protocol still has something to say.
                Ok(0) => return Detected::Opaque("client_eof"),
                Ok(n) => {
                    if let Some(found) = classify(&buf[..n]) {
                        return found;
                    }
                    if n == last_len {
                        // Peek returns at once while the bytes we have are unchanged: wait a bit
                        // for the rest instead of spinning.
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    last_len = n;
                }
                Err(_) => return Detected::Closed,
            }
        }
    };
    tokio::time::timeout(timeout, peek)
        .await
        .unwrap_or(Detected::Opaque("timeout"))
}

async fn serve_connection(
    proxy: &'static Proxy,
    stream: TcpStream,
    client: SocketAddr,
    direction: Direction,
    guard: ConnectionGuard,
    phase: watch::Receiver<Phase>,
) {
    let _ = stream.set_nodelay(true);
    if proxy.connections.count() > proxy.max_connections {
        proxy.metrics.rejected_connections.inc();
        proxy
            .metrics
            .count_error(direction, ErrorKind::TooManyConnections);
        refuse(stream).await;
        return;
    }
    let Ok(local) = stream.local_addr().map(canonical) else {
        return;
    };
    let client = canonical(client);
    let original = original_destination(&stream);
    let upstream = match (direction, original) {
        (Direction::Inbound, Some(original)) => SocketAddr::new(proxy.app.ip(), original.port()),
        (Direction::Inbound, None) => proxy.app,
        (Direction::Outbound, Some(original)) => original,
        (Direction::Outbound, None) => {
            tracing::warn!(%client, "outbound connection without an original destination (not redirected?): closing it");
            return;
        }
    };
    let dialled = original.unwrap_or(local);

    let detected = if proxy.opaque_ports.contains(&dialled.port()) {
        Detected::Opaque("opaque_port")
    } else {
        detect(&stream, proxy.detect_timeout).await
    };
    let (protocol, reason) = match detected {
        Detected::Http1 => (Protocol::Http, "http1"),
        Detected::Http2 => (Protocol::Http, "http2"),
        Detected::Opaque(reason) => (Protocol::Opaque, reason),
        Detected::Closed => return,
    };
    proxy.metrics.count_detection(direction, protocol, reason);
    if protocol == Protocol::Opaque {
        tcp::forward(proxy, stream, client, dialled, upstream, direction, phase).await;
        drop(guard);
        return;
    }

    let ctx = Arc::new(ConnContext {
        direction,
        client,
        client_text: client.to_string(),
        client_ip_text: client.ip().to_string(),
        original: authority(dialled),
        upstream: authority(upstream),
        upstream_http2: proxy.http2_ports.contains(&upstream.port())
            || proxy.app_protocol == crate::config::AppProtocol::Http2,
    });
    let mut phase = phase;
    let io = if detected == Detected::Http1 && !ctx.upstream_http2 {
        match h1::serve(proxy, stream, &ctx, &mut phase).await {
            Outcome::Done => return,
            Outcome::Fallback(io) => io,
        }
    } else {
        h1::Rewind::new(bytes::Bytes::new(), stream)
    };
    let service = service_fn(move |req| handle(proxy, ctx.clone(), req));
    let builder = if detected == Detected::Http2 {
        &proxy.http2_server
    } else {
        &proxy.http1_server
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => log_connection_end(result),
        _ = wait_for_closing(&mut phase) => {
            // HTTP/1.1: finish the request in progress, answer it with `Connection: close`, and
            // close an idle connection at once; HTTP/2: GOAWAY, then finish open streams.
            conn.as_mut().graceful_shutdown();
            log_connection_end(conn.await);
        }
    }
    drop(guard);
}

fn log_connection_end(result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        tracing::debug!("client connection ended: {e}");
    }
}

fn authority(addr: SocketAddr) -> Authority {
    Authority::try_from(addr.to_string().as_str())
        .unwrap_or_else(|_| Authority::from_static("unknown"))
}

/// Over --max-connections: answer one 503 with Retry-After and close.
async fn refuse(stream: TcpStream) {
    let service = service_fn(|_req| async {
        Ok::<_, std::convert::Infallible>(refusal(ErrorKind::TooManyConnections))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
}
