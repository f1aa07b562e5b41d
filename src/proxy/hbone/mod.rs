//! HBONE, Istio ambient's tunnel: HTTP/2 `CONNECT` inside mutual TLS on port 15008, one stream per
//! tunnelled TCP connection, `:authority` the original destination `ip:port`.
//!
//! [`inbound`] terminates the tunnels peers open to this pod and carries each stream through the
//! same detection and HTTP or TCP paths as plaintext (the listener hands it the function that
//! does); [`outbound`] carries the app's connections to other pods in tunnels, over pooled
//! connections (one per peer, at most 100 streams each; the pool's state is
//! [`crate::proxy::upstream::tunnels`], held by [`crate::proxy::shared::Mtls`]).
//!
//! HTTP/2 is the `h2` crate's, used directly: a `CONNECT` stream is read and written as a byte
//! stream ([`TunnelStream`](crate::proxy::upstream::tunnel_stream::TunnelStream)) from the task
//! that relays it, with no task or channel between it and the connection (hyper's upgraded
//! streams had both). Both sides PING a peer not heard from for [`KEEP_ALIVE_INTERVAL`] and drop
//! the connection when the PING goes unanswered for [`KEEP_ALIVE_TIMEOUT`].

pub(crate) mod headers;
pub(crate) mod inbound;
pub mod outbound;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::proxy::upstream::tunnel_stream::unanswered_ping;

/// ztunnel's HTTP/2 settings, so that either side can fill the other's windows.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub(crate) const MAX_FRAME: u32 = 1024 * 1024;
/// What a peer may make one connection hold (hyper's bounds, kept when HBONE moved to `h2`
/// directly): its header list, what one stream buffers to send, and the streams reset for the
/// peer's errors before the connection is closed (HTTP/2 "rapid reset").
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;
pub(crate) const MAX_SEND_BUFFER: usize = 400 * 1024;
pub(crate) const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Streams a server accepts per connection; a client opens at most
/// [`MAX_STREAMS`](crate::proxy::upstream::tunnels::MAX_STREAMS).
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 200;
/// PING an HBONE connection whose peer was not heard from for this long, and drop it when a PING
/// goes unanswered this long.
pub(crate) const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// An HBONE connection's keep-alive: resolves when its peer, pinged after [`KEEP_ALIVE_INTERVAL`]
/// unheard, leaves the PING unanswered for [`KEEP_ALIVE_TIMEOUT`]. Never resolves when the
/// connection's PINGs were already taken (`None`: h2 hands them out once).
pub(crate) async fn keep_alive(ping_pong: Option<h2::PingPong>, heard: Arc<AtomicBool>) {
    match ping_pong {
        Some(ping_pong) => {
            unanswered_ping(ping_pong, heard, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT).await;
        }
        None => std::future::pending().await,
    }
}
