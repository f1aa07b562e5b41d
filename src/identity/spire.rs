//! The SPIFFE Workload API as an identity source (`--identity-spire-socket`): X.509-SVIDs and trust
//! bundles streamed by a SPIRE agent (or any Workload API server) over a Unix socket.
//!
//! The protocol is the `spiffe` crate's (gRPC `SpiffeWorkloadAPI.FetchX509SVID`, a server stream that
//! sends a new message whenever the SVID rotates or a bundle changes). This module only keeps the
//! stream open and turns each message into DER material for rustls: the default SVID (the first one,
//! as the Workload API specifies), its chain and PKCS#8 key, the bundle of our trust domain, and
//! the bundles of the trust domains the agent federates with (each anchors its own domain only).
//!
//! An SVID stays valid until it expires even when the agent restarts, so the last good material is
//! kept while the stream is down or a message is unusable; the problem is reported beside it, and the
//! stream is reopened with a capped backoff. Whether old material is still good enough (expiry) is
//! for the consumer to judge, as for the other sources.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use spiffe::{WorkloadApiClient, X509Context};
use tokio::sync::watch;

use super::SpiffeId;
use super::bundles::Authorities;

/// First pause before reopening a lost stream; doubled on each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The workload's X.509 material, DER-encoded.
#[derive(Debug)]
pub struct SvidMaterial {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The trust bundle of our trust domain: the roots our peers' certificates must chain to.
    pub bundle: Vec<CertificateDer<'static>>,
    /// The federated trust domains' bundles, each for its own domain's peers.
    pub(crate) federated: Authorities,
}

/// What the source knows now.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The latest usable material, kept while the Workload API is unreachable.
    pub material: Option<Arc<SvidMaterial>>,
    /// What went wrong since that material arrived (or why there is none yet); `None` when the
    /// latest message was used.
    pub problem: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SvidError {
    #[error("the Workload API sent no X.509-SVID for this workload; register an entry for it")]
    NoSvid,
    #[error(
        "the default SVID's ID `{0}` is not a workload identity (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>); register the workload with that form"
    )]
    NotWorkloadId(String),
    #[error(
        "the default SVID `{got}` is not of our trust domain `{want}`; set --trust-domain to the agent's trust domain"
    )]
    WrongTrustDomain { got: String, want: String },
    #[error("the Workload API sent no trust bundle for our trust domain `{0}`")]
    NoBundle(String),
}

/// Starts watching the Workload API at `socket` for identities of `trust_domain`. The task runs
/// until every receiver is dropped. Must be called within a Tokio runtime.
pub fn watch(socket: &Path, trust_domain: &str) -> watch::Receiver<Snapshot> {
    let endpoint = endpoint(socket);
    let (tx, rx) = watch::channel(Snapshot {
        material: None,
        problem: Some(format!(
            "waiting for an X.509-SVID from the SPIFFE Workload API at {}",
            socket.display()
        )),
    });
    let trust_domain = trust_domain.to_owned();
    tokio::spawn(async move {
        tokio::select! {
            () = follow(&endpoint, &trust_domain, &tx) => {}
            () = tx.closed() => {}
        }
    });
    rx
}

/// The `unix:` endpoint of `socket`, made absolute (the Workload API's URI form requires it).
fn endpoint(socket: &Path) -> String {
    let absolute: PathBuf = std::path::absolute(socket).unwrap_or_else(|_| socket.to_owned());
    format!("unix://{}", absolute.display())
}

/// Keeps a stream open for ever, publishing each message; reopens it when it fails or ends.
async fn follow(endpoint: &str, trust_domain: &str, tx: &watch::Sender<Snapshot>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let problem = match stream_once(endpoint, trust_domain, tx, &mut backoff).await {
            Ok(()) => format!("the SPIFFE Workload API at {endpoint} ended the stream"),
            Err(err) => format!("the SPIFFE Workload API at {endpoint} is unavailable: {err}"),
        };
        report(tx, problem);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One stream, until it ends (Ok) or cannot be opened (Err). A message that arrives resets the
/// backoff: the agent is up.
async fn stream_once(
    endpoint: &str,
    trust_domain: &str,
    tx: &watch::Sender<Snapshot>,
    backoff: &mut Duration,
) -> Result<(), spiffe::WorkloadApiError> {
    let client = WorkloadApiClient::connect_to(endpoint).await?;
    let mut stream = client.stream_x509_contexts().await?;
    while let Some(item) = stream.next().await {
        *backoff = FIRST_BACKOFF;
        let result = item
            .map_err(|e| format!("unusable Workload API message: {e}"))
            .and_then(|context| material(&context, trust_domain).map_err(|e| e.to_string()));
        match result {
            Ok(material) => {
                tracing::info!(
                    spiffe_id = %material.spiffe_id,
                    "identity: new X.509-SVID from the SPIFFE Workload API"
                );
                tx.send_replace(Snapshot {
                    material: Some(Arc::new(material)),
                    problem: None,
                });
            }
            Err(problem) => report(tx, problem),
        }
    }
    Ok(())
}

/// Records `problem` beside the material kept, and logs it.
fn report(tx: &watch::Sender<Snapshot>, problem: String) {
    tracing::warn!("identity: {problem}");
    tx.send_modify(|snapshot| snapshot.problem = Some(problem));
}

/// The default SVID of `context` and our trust domain's bundle, checked and in DER.
pub(crate) fn material(
    context: &X509Context,
    trust_domain: &str,
) -> Result<SvidMaterial, SvidError> {
    let svid = context.default_svid().ok_or(SvidError::NoSvid)?;
    let id_text = svid.spiffe_id().to_string();
    let spiffe_id: SpiffeId = id_text
        .parse()
        .map_err(|_| SvidError::NotWorkloadId(id_text.clone()))?;
    if spiffe_id.trust_domain != trust_domain {
        return Err(SvidError::WrongTrustDomain {
            got: id_text,
            want: trust_domain.to_owned(),
        });
    }
    let mut federated: Authorities = context
        .bundle_set()
        .iter()
        .map(|(domain, bundle)| (domain.as_str().to_owned(), der_all(bundle.authorities())))
        .filter(|(_, roots)| !roots.is_empty())
        .collect();
    let bundle = federated
        .remove(trust_domain)
        .ok_or_else(|| SvidError::NoBundle(trust_domain.to_owned()))?;
    Ok(SvidMaterial {
        spiffe_id,
        chain: der_all(svid.cert_chain()),
        key: PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()),
        bundle,
        federated,
    })
}

fn der_all(certs: &[spiffe::Certificate]) -> Vec<CertificateDer<'static>> {
    certs
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect()
}
