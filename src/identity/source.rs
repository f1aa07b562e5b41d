//! The identity as the data plane sees it: the current material (a `watch` of `Arc<Material>`, so
//! that a handshake takes the newest and an open connection keeps what it was built with), and the
//! problem, if any, that `/ready` reports.
//!
//! Files are polled (their modification time and size, every [`POLL`]) rather than watched
//! with inotify: Kubernetes rotates projected and CSI volumes by swapping a `..data` symlink, which
//! file watches miss unless they follow the directory's renames, and three `stat`s every few
//! seconds cost nothing. The same tick re-checks the expiry, which no file event would signal.
//! The SPIFFE Workload API streams its SVIDs ([`super::spire`]): each new one is validated as the
//! files are ([`validate`]). `--trust-bundles` is polled the same way with either source, and a
//! change in it is a reload: the bundle set is always the one the current material was built with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;

use super::bundles::{self, Authorities};
use super::material::{Files, Material, MaterialError, Parts, load, validate};
use super::spire::{self, SvidMaterial};

/// Where the identity comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Files(Files),
    /// The SPIFFE Workload API at this Unix socket (a SPIRE agent).
    WorkloadApi(PathBuf),
}

/// How often the files are checked for a change, and the certificate for its expiry.
pub(crate) const POLL: Duration = Duration::from_secs(2);

/// The material in use and what is wrong, if anything.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The last valid material; kept while a newer one is broken, until it expires.
    pub material: Option<Arc<Material>>,
    /// Why the identity is not usable as it stands: `/ready` answers 503 with it.
    pub(crate) problem: Option<String>,
}

/// A handle on the workload identity, cheap to clone.
#[derive(Clone)]
pub struct Identity {
    source: Source,
    trust_domain: String,
    /// `--trust-bundles`: other trust domains' CAs.
    trust_bundles: Option<PathBuf>,
    state: watch::Sender<State>,
}

impl Identity {
    /// Loads the material once (a failure is logged and reported, not fatal: the volume may be
    /// mounted a moment later).
    pub(crate) fn new(
        source: Source,
        trust_domain: String,
        trust_bundles: Option<PathBuf>,
        expiry: &Gauge,
    ) -> Identity {
        let identity = Identity {
            source,
            trust_domain,
            trust_bundles,
            state: watch::Sender::new(State::default()),
        };
        match &identity.source {
            Source::Files(files) => identity.reload(files, SystemTime::now(), expiry),
            Source::WorkloadApi(socket) => {
                identity.state.send_modify(|state| {
                    state.problem = Some(format!(
                        "waiting for an X.509-SVID from the SPIFFE Workload API at {}",
                        socket.display()
                    ));
                });
            }
        }
        identity
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

    fn reload(&self, files: &Files, now: SystemTime, expiry: &Gauge) {
        let loaded = load(
            files,
            &self.trust_domain,
            self.trust_bundles.as_deref(),
            now,
        );
        self.publish(loaded, now, expiry);
    }

    /// What identifies the current version of `--trust-bundles`, for the pollers.
    fn bundle_stamps(&self) -> Vec<(String, Option<(SystemTime, u64)>)> {
        self.trust_bundles
            .as_deref()
            .map(bundles::stamps)
            .unwrap_or_default()
    }

    /// Makes validated material current, or reports why a new one is unusable. The files' poller
    /// calls it; a streamed source (the SPIFFE Workload API) would call it with each message
    /// turned into [`super::material::validate`]'s result.
    pub(crate) fn publish(
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

    /// Follows the source forever: reloads on a change, and reports the expiry.
    pub async fn watch_forever(self, expiry: Gauge) {
        match self.source.clone() {
            Source::Files(files) => self.poll_files(&files, expiry).await,
            Source::WorkloadApi(socket) => self.follow_workload_api(&socket, expiry).await,
        }
    }

    async fn poll_files(&self, files: &Files, expiry: Gauge) {
        let paths = files.files();
        let mut seen = (stamps(&paths), self.bundle_stamps());
        let mut ticker = tokio::time::interval(POLL);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let now = SystemTime::now();
            let current = (stamps(&paths), self.bundle_stamps());
            if current != seen {
                seen = current;
                self.reload(files, now, &expiry);
                continue;
            }
            self.check_expiry(now, &expiry);
        }
    }

    /// Each SVID the Workload API sends is validated and made current, with `--trust-bundles` as
    /// it is then (and again when it changes); the stream's own problems (agent unreachable,
    /// unusable message) are reported while the last good SVID serves on.
    async fn follow_workload_api(&self, socket: &Path, expiry: Gauge) {
        let mut snapshots = spire::watch(socket, &self.trust_domain);
        let mut used: Option<Arc<SvidMaterial>> = None;
        let mut bundles_seen = self.bundle_stamps();
        let mut ticker = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Some(svid) = snapshot.material
                        && !used.as_ref().is_some_and(|u| Arc::ptr_eq(u, &svid))
                    {
                        self.publish_svid(&svid, socket, &expiry);
                        used = Some(svid);
                    }
                    if let Some(problem) = snapshot.problem {
                        tracing::warn!("SPIFFE Workload API: {problem}");
                        self.state.send_modify(|state| state.problem = Some(problem));
                    }
                }
                _ = ticker.tick() => {
                    let current = self.bundle_stamps();
                    if current != bundles_seen {
                        bundles_seen = current;
                        if let Some(svid) = &used {
                            self.publish_svid(svid, socket, &expiry);
                        }
                    }
                    self.check_expiry(SystemTime::now(), &expiry);
                }
            }
        }
    }

    /// Validates `svid` with the federated bundles it came with and `--trust-bundles`'s.
    fn publish_svid(&self, svid: &SvidMaterial, socket: &Path, expiry: &Gauge) {
        let now = SystemTime::now();
        let files = match self.trust_bundles.as_deref() {
            Some(path) => match bundles::read(path) {
                Ok(read) => Some((read, path)),
                Err(e) => return self.publish(Err(e.into()), now, expiry),
            },
            None => None,
        };
        let parts = svid_parts(svid, socket, files);
        self.publish(validate(parts, &self.trust_domain, now), now, expiry);
    }

    /// Updates the gauge; material past its expiry stops serving, and says so.
    fn check_expiry(&self, now: SystemTime, expiry: &Gauge) {
        let Some(material) = self.material() else {
            return;
        };
        set_expiry(expiry, material.not_after, now);
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

/// An SVID and the bundles read from `--trust-bundles` (and its path) as the parts [`validate`]
/// checks, named after where they came from.
fn svid_parts(svid: &SvidMaterial, socket: &Path, files: Option<(Authorities, &Path)>) -> Parts {
    let from = format!("the SVID from {}", socket.display());
    let mut federated = svid.federated.clone();
    let mut federated_from = format!("the federated bundles from {}", socket.display());
    if let Some((files, path)) = files {
        bundles::merge(&mut federated, files);
        federated_from = format!("{federated_from} and --trust-bundles {}", path.display());
    }
    Parts {
        chain: svid.chain.clone(),
        key: rustls_pki_types::PrivateKeyDer::Pkcs8(svid.key.clone_key()),
        bundle: svid.bundle.clone(),
        federated,
        chain_from: from.clone(),
        key_from: from,
        bundle_from: format!("the trust bundle from {}", socket.display()),
        federated_from,
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
