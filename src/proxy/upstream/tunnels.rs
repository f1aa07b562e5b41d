//! HBONE's pool of connections to peers: one per peer with room for [`MAX_STREAMS`] streams,
//! one dial at a time per peer, and the destinations `auto` found without HBONE. The state only:
//! [`crate::proxy::hbone::outbound`] dials (TLS, HTTP/2) and opens the streams. It lives here,
//! below the adapters, because the data plane's state (`proxy::shared::Mtls`) holds it.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::HeaderValue;

use crate::error::{ErrorKind, HandshakeFailure};
use crate::sync::lock;

/// Streams opened on one pooled connection at most, as ztunnel's client does.
pub(crate) const MAX_STREAMS: usize = 100;
/// How long a destination with nothing on 15008 is sent plaintext without trying HBONE again.
pub(crate) const PLAINTEXT_MEMORY: Duration = Duration::from_secs(60);

/// One pooled HBONE connection.
#[derive(Clone)]
pub(crate) struct Pooled {
    pub(crate) sender: SendRequest<Bytes>,
    /// The server's SPIFFE ID, verified by the handshake.
    pub(crate) peer: Arc<str>,
    /// Our `baggage`, from the identity this connection presented.
    pub(crate) baggage: HeaderValue,
    pub(crate) usage: Arc<Usage>,
    /// Why the server refused us, if it did (noted by `hbone::outbound`'s TLS stream).
    pub(crate) refusal: Arc<Refusal>,
}

/// A refusal the server sent after our side of the handshake, noted by `hbone::outbound`'s TLS
/// stream.
#[derive(Default)]
pub(crate) struct Refusal {
    pub(crate) seen: OnceLock<(HandshakeFailure, String)>,
    /// Whether a stream already counted it: one refused connection, one count.
    pub(crate) counted: AtomicBool,
}

/// Streams open on a connection, when the last one ended (ms since `epoch`), and whether the
/// connection has ended.
pub(crate) struct Usage {
    streams: AtomicUsize,
    epoch: Instant,
    idle_since_ms: AtomicU64,
    closed: AtomicBool,
}

impl Usage {
    /// A new connection's usage, its dialler's stream counted from the start: a connection is
    /// never idle before its first stream has had its place.
    pub(crate) fn with_first_stream() -> Usage {
        Usage {
            streams: AtomicUsize::new(1),
            epoch: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// The connection's task has ended: the pool forgets it.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Holds one stream's place on its connection.
pub struct StreamSlot(Arc<Usage>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0
            .idle_since_ms
            .store(self.0.now_ms(), Ordering::Release);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a tunnel could not be opened.
#[derive(Clone, Debug, thiserror::Error)]
pub enum OpenError {
    /// No TCP connection to the peer's HBONE port: `auto` may send plaintext.
    #[error("no HBONE at {peer}: {reason}")]
    NoHbone {
        peer: SocketAddr,
        kind: ErrorKind,
        reason: String,
    },
    #[error("HBONE to {peer}: {reason}")]
    Failed {
        peer: SocketAddr,
        kind: ErrorKind,
        reason: String,
    },
}

impl OpenError {
    pub(crate) fn kind(&self) -> ErrorKind {
        match self {
            OpenError::NoHbone { kind, .. } | OpenError::Failed { kind, .. } => *kind,
        }
    }
}

#[derive(Default)]
pub struct Pool {
    connections: Mutex<HashMap<SocketAddr, Vec<Pooled>>>,
    /// One dial at a time per peer: a burst of new connections to a peer waits for one handshake
    /// instead of each making its own (50 connections at once made up to 50 TLS connections, and
    /// the extra ones cost both sides memory and CPU for as long as they stayed pooled). Holds the
    /// last dial's failure, which those who waited for it share rather than dialling again.
    dials: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<DialFailure>>>>>,
    plaintext_until: Mutex<HashMap<IpAddr, Instant>>,
}

/// A dial that failed, and when: callers that were waiting before then take it as their own.
struct DialFailure {
    at: Instant,
    error: OpenError,
}

/// A caller's hold on its peer's dial gate. The map keeps a gate only while someone holds it (one
/// entry per peer being dialled, not one per destination ever seen): whoever leaves it with no
/// other holder removes it, also when cancelled mid-dial. Checked after the caller's own clone is
/// gone, so that two callers leaving at once cannot each count the other.
struct GateHold<'a> {
    dials: &'a Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<DialFailure>>>>>,
    peer: SocketAddr,
}

impl Drop for GateHold<'_> {
    fn drop(&mut self) {
        let mut dials = lock(self.dials);
        if dials
            .get(&self.peer)
            .is_some_and(|gate| Arc::strong_count(gate) == 1)
        {
            dials.remove(&self.peer);
        }
    }
}

impl Pool {
    /// Whether `auto` found nothing on `ip`'s HBONE port less than [`PLAINTEXT_MEMORY`] ago.
    pub(crate) fn remembers_plaintext(&self, ip: IpAddr) -> bool {
        let mut map = lock(&self.plaintext_until);
        let now = Instant::now();
        map.retain(|_, until| *until > now);
        map.contains_key(&ip)
    }

    pub(crate) fn remember_plaintext(&self, ip: IpAddr) {
        lock(&self.plaintext_until).insert(ip, Instant::now() + PLAINTEXT_MEMORY);
    }

    /// A pooled connection to `peer` with room for one more stream, its place taken.
    fn checkout(&self, peer: SocketAddr) -> Option<(Pooled, StreamSlot)> {
        let mut map = lock(&self.connections);
        let list = map.get_mut(&peer)?;
        list.retain(|p| !p.usage.is_closed());
        let found = list
            .iter()
            .find(|p| p.usage.streams.load(Ordering::Acquire) < MAX_STREAMS)?
            .clone();
        found.usage.streams.fetch_add(1, Ordering::AcqRel);
        let slot = StreamSlot(found.usage.clone());
        Some((found, slot))
    }

    /// A pooled connection to `peer` with room for a stream, or a new one: dialled (`dial`) by this
    /// caller, or by the one ahead of it in the peer's queue (then its connection or its failure is
    /// used).
    pub(crate) async fn checkout_or_dial<F>(
        &self,
        peer: SocketAddr,
        dial: impl FnOnce() -> F,
    ) -> Result<(Pooled, StreamSlot), OpenError>
    where
        F: Future<Output = Result<Pooled, OpenError>>,
    {
        if let Some(found) = self.checkout(peer) {
            return Ok(found);
        }
        let queued = Instant::now();
        // Declared before the gate, so dropped after it.
        let _hold = GateHold {
            dials: &self.dials,
            peer,
        };
        let gate = lock(&self.dials).entry(peer).or_default().clone();
        let mut last_failure = gate.lock().await;
        match (self.checkout(peer), &*last_failure) {
            (Some(found), _) => Ok(found),
            (None, Some(failure)) if failure.at >= queued => Err(failure.error.clone()),
            (None, _) => match dial().await {
                Ok(pooled) => {
                    *last_failure = None;
                    let slot = StreamSlot(pooled.usage.clone());
                    let mut connections = lock(&self.connections);
                    // Each dial also forgets the closed connections of every peer, and the
                    // peers left with none (pod addresses come and go): the map holds what is open.
                    connections.retain(|_, list| {
                        list.retain(|p| !p.usage.is_closed());
                        !list.is_empty()
                    });
                    connections.entry(peer).or_default().push(pooled.clone());
                    Ok((pooled, slot))
                }
                Err(error) => {
                    *last_failure = Some(DialFailure {
                        at: Instant::now(),
                        error: error.clone(),
                    });
                    Err(error)
                }
            },
        }
    }
    /// Resolves once `peer`'s connection (`usage`) has had no stream for `idle_timeout`, taken
    /// out of the pool: no stream can start on it from then on, and the pool holds no handle to
    /// it, so that `h2` ends it with GOAWAY once the caller's last handle is gone.
    pub(crate) async fn idle_out(&self, peer: SocketAddr, usage: &Usage, idle_timeout: Duration) {
        let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
        loop {
            tokio::time::sleep(idle_timeout).await;
            let since = usage.idle_since_ms.load(Ordering::Acquire);
            if usage.now_ms().saturating_sub(since) >= idle_ms && self.retire_if_idle(peer, usage) {
                return;
            }
        }
    }

    /// Takes `peer`'s connection out of the pool if it has no stream. Under the pool's lock, as
    /// `checkout` takes a place, so that no stream starts on a connection being closed.
    fn retire_if_idle(&self, peer: SocketAddr, usage: &Usage) -> bool {
        let mut map = lock(&self.connections);
        if usage.streams.load(Ordering::Acquire) != 0 {
            return false;
        }
        usage.close();
        if let Some(list) = map.get_mut(&peer) {
            list.retain(|p| !std::ptr::eq(Arc::as_ptr(&p.usage), usage));
            if list.is_empty() {
                map.remove(&peer);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller's entry into its peer's dial queue, as `checkout_or_dial` makes it.
    fn enter(
        pool: &Pool,
        peer: SocketAddr,
    ) -> (GateHold<'_>, Arc<tokio::sync::Mutex<Option<DialFailure>>>) {
        let hold = GateHold {
            dials: &pool.dials,
            peer,
        };
        let gate = lock(&pool.dials).entry(peer).or_default().clone();
        (hold, gate)
    }

    #[test]
    fn a_peer_keeps_one_gate_while_held_and_none_after() {
        let pool = Pool::default();
        let peer: SocketAddr = "198.18.0.2:15008".parse().expect("address");
        let (hold_a, gate_a) = enter(&pool, peer);
        let (hold_b, gate_b) = enter(&pool, peer);
        assert!(Arc::ptr_eq(&gate_a, &gate_b), "one gate per peer");
        drop(gate_a);
        drop(hold_a);
        let (hold_c, gate_c) = enter(&pool, peer);
        assert!(
            Arc::ptr_eq(&gate_b, &gate_c),
            "a caller leaving does not remove the gate another still holds"
        );
        // Two callers letting go at once (both clones gone before either checks): still removed.
        drop(gate_b);
        drop(gate_c);
        drop(hold_b);
        drop(hold_c);
        assert!(lock(&pool.dials).is_empty(), "no gate left behind");
    }
}
