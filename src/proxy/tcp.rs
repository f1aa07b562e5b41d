//! Opaque TCP: bytes copied both ways, half-close passed on (a client's `shutdown(Write)` reaches the
//! server while the response still flows back), one access-log record per connection.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::Proxy;
use super::drain::{Phase, wait_for_closing};
use super::error::ErrorKind;
use super::upstream::connect;
use crate::telemetry::access_log::Record;
use crate::telemetry::metrics::Direction;

pub async fn forward(
    proxy: &'static Proxy,
    mut client: TcpStream,
    client_addr: SocketAddr,
    dialled: SocketAddr,
    upstream: SocketAddr,
    direction: Direction,
    mut phase: watch::Receiver<Phase>,
) {
    let start = Instant::now();
    let (result, sent, received) = match connect(upstream, proxy.connect_options).await {
        Err(e) => {
            let kind = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
                std::io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
                _ => ErrorKind::ConnectFailed,
            };
            tracing::debug!(%upstream, "opaque connect failed: {e}");
            (Err(kind), 0, 0)
        }
        Ok(mut server) => {
            let copy = copy_both_ways(&mut client, &mut server);
            let mut copy = std::pin::pin!(copy);
            let outcome = tokio::select! {
                r = copy.as_mut() => r,
                // Opaque streams have no graceful end a proxy could signal: past the drain delay
                // they get the drain timeout, after which the process exits under them.
                _ = wait_for_closing(&mut phase) => copy.await,
            };
            outcome
        }
    };
    let metrics = proxy.metrics.direction(direction);
    metrics.tcp_bytes_in.inc_by(sent);
    metrics.tcp_bytes_out.inc_by(received);
    let error = result.err();
    if let Some(kind) = error {
        proxy.metrics.count_error(direction, kind);
    }
    if proxy.access_log.enabled() {
        let duration = start.elapsed();
        let original = dialled.to_string();
        let upstream = upstream.to_string();
        proxy.access_log.log(&Record {
            start: SystemTime::now() - duration,
            duration,
            direction,
            method: "-",
            protocol: "TCP",
            scheme: "tcp",
            original_authority: &original,
            upstream_authority: &upstream,
            path_and_query: "",
            client: &client_addr.to_string(),
            request_id: "-",
            status: 0,
            request_bytes: sent,
            response_bytes: received,
            grpc_status: None,
            error,
        });
    }
}

/// Returns (bytes client to server, bytes server to client).
async fn copy_both_ways<A, B>(a: &mut A, b: &mut B) -> (Result<(), ErrorKind>, u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional(a, b).await {
        Ok((sent, received)) => (Ok(()), sent, received),
        // copy_bidirectional loses the counts on error; the error is what matters then.
        Err(_) => (Err(ErrorKind::TcpIo), 0, 0),
    }
}
