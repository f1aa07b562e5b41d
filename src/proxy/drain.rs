//! The drain: `Serving -> Draining -> Closing`, driven by SIGTERM, SIGINT or `POST /shutdown`.
//!
//! Draining: `/ready` answers 503 at once so that endpoints stop sending new traffic, but the
//! listeners keep accepting and serving for `--drain-delay` (Linkerd and Istio users lose requests
//! when a proxy stops accepting while endpoint updates are still propagating). Closing: the
//! listeners stop, in-flight requests finish within `--drain-timeout`, idle connections are closed.

use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Listeners not bound yet.
    Starting,
    Serving,
    Draining,
    Closing,
}

/// Shared by the data plane, the signal handler and the admin thread.
#[derive(Clone, Debug)]
pub(crate) struct Drain {
    phase: watch::Sender<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            phase: watch::Sender::new(Phase::Starting),
        }
    }
}

impl Drain {
    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Moves forward only: a second shutdown request never restarts the drain delay.
    pub(crate) fn advance(&self, to: Phase) {
        self.phase.send_if_modified(|phase| {
            let forward = to > *phase;
            if forward {
                *phase = to;
            }
            forward
        });
    }
}

/// Resolves when the drain reaches `Closing` (or the drain is gone, at exit).
pub(crate) async fn wait_for_closing(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p == Phase::Closing).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let drain = Drain::default();
        drain.advance(Phase::Serving);
        drain.advance(Phase::Draining);
        drain.advance(Phase::Serving);
        assert_eq!(drain.phase(), Phase::Draining);
        drain.advance(Phase::Closing);
        assert_eq!(drain.phase(), Phase::Closing);
    }
}
