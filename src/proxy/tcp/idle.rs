//! A relay's idle bound: when bytes last moved (read per transfer by the copy and by splice), and
//! the wait that ends a relay after --tcp-idle-timeout without a byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::ErrorKind;

/// When bytes last moved on a relay, in milliseconds from its start: a clock read per transfer
/// (vDSO, no syscall) instead of a timer reset per transfer.
pub(super) struct IdleClock {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl IdleClock {
    pub(super) fn new() -> IdleClock {
        IdleClock {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Runs `relay` until it ends, or until `clock` says nothing moved for `timeout` (then the relay
/// is dropped, which closes both sockets, and the record says `tcp_idle_timeout`). The byte
/// counts of an abandoned relay are lost; an idle relay moved nothing recently anyway.
pub(super) async fn until_idle<F>(
    relay: F,
    clock: &IdleClock,
    timeout: Duration,
) -> (Result<(), ErrorKind>, u64, u64)
where
    F: std::future::Future<Output = (Result<(), ErrorKind>, u64, u64)>,
{
    let idle = async {
        loop {
            let deadline = clock.last() + timeout;
            tokio::time::sleep_until(deadline).await;
            if clock.last() + timeout <= tokio::time::Instant::now() {
                return;
            }
        }
    };
    tokio::select! {
        done = relay => done,
        () = idle => {
            tracing::debug!("opaque connection idle for --tcp-idle-timeout: closing it");
            (Err(ErrorKind::TcpIdleTimeout), 0, 0)
        }
    }
}
