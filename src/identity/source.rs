//! The identity as the data plane sees it: the current material (a `watch` of `Arc<Material>`, so
//! that a handshake takes the newest and an open connection keeps what it was built with), and the
//! problem, if any, that `/ready` reports.
//!
//! The files are polled (their modification time and size, every [`POLL`]) rather than watched
//! with inotify: Kubernetes rotates projected and CSI volumes by swapping a `..data` symlink, which
//! file watches miss unless they follow the directory's renames, and three `stat`s every few
//! seconds cost nothing. The same tick re-checks the expiry, which no file event would signal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::material::{Material, MaterialError, Source, load};

/// How often the files are checked for a change, and the certificate for its expiry.
pub const POLL: Duration = Duration::from_secs(2);

/// The material in use and what is wrong, if anything.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The last valid material; kept while a newer one is broken, until it expires.
    pub material: Option<Arc<Material>>,
    /// Why the identity is not usable as it stands: `/ready` answers 503 with it.
    pub problem: Option<String>,
}

/// A handle on the workload identity, cheap to clone.
#[derive(Clone)]
pub struct Identity {
    source: Source,
    trust_domain: String,
    state: watch::Sender<State>,
}

impl Identity {
    /// Loads the material once (a failure is logged and reported, not fatal: the volume may be
    /// mounted a moment later).
    pub fn new(source: Source, trust_domain: String, expiry: &Gauge) -> Identity {
        let identity = Identity {
            source,
            trust_domain,
            state: watch::Sender::new(State::default()),
        };
        identity.reload(SystemTime::now(), expiry);
        identity
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The material new connections use, if there is a valid one.
    pub fn material(&self) -> Option<Arc<Material>> {
        self.state.borrow().material.clone()
    }

    pub fn problem(&self) -> Option<String> {
        self.state.borrow().problem.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    fn reload(&self, now: SystemTime, expiry: &Gauge) {
        self.publish(load(&self.source, &self.trust_domain, now), now, expiry);
    }

    /// Makes validated material current, or reports why a new one is unusable. The files' poller
    /// calls it; a streamed source (the SPIFFE Workload API) would call it with each message
    /// turned into [`super::material::validate`]'s result.
    pub fn publish(
        &self,
        loaded: Result<Material, MaterialError>,
        now: SystemTime,
        expiry: &Gauge,
    ) {
        match loaded {
            Ok(material) => {
                tracing::info!(
                    id = %material.id,
                    expires = %humantime::format_rfc3339_seconds(material.not_after),
                    "workload identity loaded"
                );
                set_expiry(expiry, material.not_after, now);
                self.state.send_replace(State {
                    material: Some(Arc::new(material)),
                    problem: None,
                });
            }
            Err(e) => {
                tracing::error!("workload identity unusable: {e}");
                self.state.send_modify(|state| {
                    state.problem = Some(e.to_string());
                    // Old material past its expiry is of no use to anyone.
                    if state.material.as_ref().is_some_and(|m| m.not_after < now) {
                        state.material = None;
                    }
                });
            }
        }
    }

    /// Polls the files forever: reloads on a change, and reports the expiry.
    pub async fn watch_forever(self, expiry: Gauge) {
        let files = self.source.files();
        let mut seen = stamps(&files);
        let mut ticker = tokio::time::interval(POLL);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = SystemTime::now();
            let current = stamps(&files);
            if current != seen {
                seen = current;
                self.reload(now, &expiry);
                continue;
            }
            let Some(material) = self.material() else {
                continue;
            };
            set_expiry(&expiry, material.not_after, now);
            if material.not_after < now && self.problem().is_none() {
                let problem = format!(
                    "the workload certificate {} expired at {}; renew it",
                    material.id,
                    humantime::format_rfc3339_seconds(material.not_after)
                );
                tracing::error!("workload identity unusable: {problem}");
                self.state.send_replace(State {
                    material: None,
                    problem: Some(problem),
                });
            }
        }
    }
}

fn set_expiry(gauge: &Gauge, not_after: SystemTime, now: SystemTime) {
    let left = match not_after.duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    };
    gauge.set(left);
}

/// Modification time and size of each file (None when unreadable): a change in any means reload.
fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            let meta = std::fs::metadata(f).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}
