//! The SPIFFE Workload API source against a Workload API server this test runs: gRPC over a Unix
//! socket, `SpiffeWorkloadAPI.FetchX509SVID` streaming, the `workload.spiffe.io: true` header
//! required as SPIRE's agent requires it. The server sends an SVID, then a rotated one on the same
//! stream, then one of a foreign trust domain, then ends the stream and sends a third SVID on the
//! connection the source reopens: the source must yield each usable SVID in turn, keep the last good
//! one through the bad message and the reconnection, and say what went wrong.
//!
//! The server is `support::workload_api`.

use std::path::Path;
use std::time::Duration;

use crate::support::workload_api::{X509SvidResponse, start_agent, svid_response};
use amazing_proxy::identity::issue::{Pem, issue, make_ca};
use amazing_proxy::identity::spire::{self, Snapshot};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::sync::watch;

/// Bound of the whole exchange; each step normally takes milliseconds.
const LIMIT: Duration = Duration::from_secs(30);

struct Issued {
    id: String,
    chain: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    ca: CertificateDer<'static>,
}

fn issued(ca: &Pem, id: &str) -> Issued {
    let now = OffsetDateTime::now_utc();
    let leaf = issue(ca, Path::new("test-ca"), &id.parse().expect("id"), 1, now).expect("issue");
    Issued {
        id: id.to_owned(),
        chain: CertificateDer::from_pem_slice(leaf.cert.as_bytes()).expect("cert"),
        key: PrivatePkcs8KeyDer::from_pem_slice(leaf.key.as_bytes()).expect("key"),
        ca: CertificateDer::from_pem_slice(ca.cert.as_bytes()).expect("ca"),
    }
}

fn response(svid: &Issued) -> X509SvidResponse {
    svid_response(&svid.id, &svid.chain, svid.key.secret_pkcs8_der(), &svid.ca)
}

/// Waits until the snapshot satisfies `done`.
async fn until(rx: &mut watch::Receiver<Snapshot>, done: impl Fn(&Snapshot) -> bool) -> Snapshot {
    loop {
        let snapshot = rx.borrow_and_update().clone();
        if done(&snapshot) {
            return snapshot;
        }
        rx.changed().await.expect("the source is running");
    }
}

fn holds(snapshot: &Snapshot, svid: &Issued) -> bool {
    snapshot
        .material
        .as_ref()
        .is_some_and(|m| m.chain == std::slice::from_ref(&svid.chain))
}

fn assert_material(snapshot: &Snapshot, svid: &Issued) {
    let material = snapshot.material.as_ref().expect("material");
    assert_eq!(material.spiffe_id.to_string(), svid.id);
    assert_eq!(material.chain, std::slice::from_ref(&svid.chain));
    assert_eq!(material.key.secret_pkcs8_der(), svid.key.secret_pkcs8_der());
    assert_eq!(material.bundle, std::slice::from_ref(&svid.ca));
}

#[tokio::test]
async fn svids_stream_in_and_rotate_across_reconnections() {
    tokio::time::timeout(LIMIT, exchange())
        .await
        .expect("the exchange finished in time");
}

async fn exchange() {
    let now = OffsetDateTime::now_utc();
    let ca = make_ca("cluster.local", 2, now).expect("ca");
    let foreign_ca = make_ca("other.org", 2, now).expect("foreign ca");
    let id = "spiffe://cluster.local/ns/default/sa/httpbin";
    let (first, rotated, after_reconnect) = (issued(&ca, id), issued(&ca, id), issued(&ca, id));
    let foreign = issued(&foreign_ca, "spiffe://other.org/ns/default/sa/httpbin");

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    // The source starts before the agent listens, as a sidecar may start before the SPIRE agent.
    let mut rx = spire::watch(&socket, "cluster.local");
    let waiting = rx.borrow().clone();
    assert!(waiting.material.is_none());
    assert!(
        waiting
            .problem
            .as_deref()
            .is_some_and(|p| p.contains("SPIFFE Workload API at") && p.contains("agent.sock")),
        "{waiting:?}"
    );
    let (_agent, mut calls) = start_agent(&socket);

    let stream = calls.recv().await.expect("the source calls FetchX509SVID");
    stream.send(Ok(response(&first))).await.expect("send");
    let snapshot = until(&mut rx, |s| holds(s, &first)).await;
    assert_material(&snapshot, &first);
    assert_eq!(snapshot.problem, None);

    stream.send(Ok(response(&rotated))).await.expect("send");
    assert_material(&until(&mut rx, |s| holds(s, &rotated)).await, &rotated);

    // An SVID of another trust domain is refused; the rotated one stays.
    stream.send(Ok(response(&foreign))).await.expect("send");
    let snapshot = until(&mut rx, |s| s.problem.is_some()).await;
    assert_material(&snapshot, &rotated);
    let problem = snapshot.problem.unwrap_or_default();
    assert!(
        problem.contains("not of our trust domain `cluster.local`"),
        "{problem}"
    );

    // The agent ends the stream (as on a restart): the source reopens it and takes the next SVID.
    drop(stream);
    let stream = calls.recv().await.expect("the source calls again");
    stream
        .send(Ok(response(&after_reconnect)))
        .await
        .expect("send");
    let snapshot = until(&mut rx, |s| holds(s, &after_reconnect)).await;
    assert_material(&snapshot, &after_reconnect);
    assert_eq!(snapshot.problem, None);
}
