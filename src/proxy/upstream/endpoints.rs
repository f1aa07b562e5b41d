//! The addresses of a route's endpoints, kept current: a static list, or a DNS name (a headless
//! Service's) re-resolved as its answers' TTL says.
//!
//! [`watch()`] hands out a [`watch::Receiver`] of the current set; for a DNS name a task resolves
//! the A and AAAA records (both: a dual-stack name keeps both families) through hickory-resolver
//! and publishes the set when it changes. The next resolution is due when the smallest TTL of the
//! answer runs out, within [`MIN_REFRESH`]..=[`MAX_REFRESH`], so that neither a TTL of 0 nor one
//! of a week is taken at its word. A failure keeps the last good set (of that address family)
//! and retries with a jittered backoff from 1 s to [`MAX_BACKOFF`]; an answer with no addresses
//! keeps the last good set too (a Service whose pods are all gone for a moment must not leave the
//! route with nothing), and says so in the log once. The task ends when every receiver is gone.
//!
//! What an answer may hold is bounded: at most [`MAX_ADDRESSES`] addresses (the lowest, sorted,
//! so the choice is stable), and no address that cannot be a pod's (unspecified, loopback,
//! multicast, broadcast, link-local: a spoofed answer cannot send the app's requests to the pod's
//! own loopback services nor to a node's metadata address). The resolver reads the pod's
//! /etc/resolv.conf ([`Resolver::from_system`]: its name servers, search domains and `ndots`) or
//! asks one given server ([`Resolver::with_name_server`], for tests); it keeps no cache of its
//! own (the watcher is the cache), so each resolution asks the server.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::{Resolver as Hickory, TokioResolver};
use tokio::sync::watch;

/// The longest a set is used without asking again, whatever the TTL says.
pub const MAX_REFRESH: Duration = Duration::from_secs(60);
/// The shortest time between two resolutions of a name, whatever the TTL says.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest wait between two tries after failures.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Addresses kept from one answer at most.
pub const MAX_ADDRESSES: usize = 256;
/// One resolution (both families, every search domain, the resolver's own retries) at most.
const LOOKUP_BOUND: Duration = Duration::from_secs(10);

/// Where a route's endpoints come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Static(Vec<SocketAddr>),
    /// Every address `name` resolves to, each with `port`.
    Dns {
        name: String,
        port: u16,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error(
        "cannot read the DNS configuration (/etc/resolv.conf): {0}; mount the pod's resolv.conf or use static endpoints"
    )]
    SystemConfig(NetError),
    #[error("cannot build the DNS resolver: {0}")]
    Build(NetError),
    #[error(
        "{name:?} is not a DNS name ({reason}); write a name such as reviews.default.svc.cluster.local"
    )]
    BadName { name: String, reason: String },
}

/// The DNS resolver the watchers share (cheap to clone).
#[derive(Clone)]
pub struct Resolver(TokioResolver);

impl Resolver {
    /// The pod's resolver: the name servers, search domains and options of /etc/resolv.conf.
    pub fn from_system() -> Result<Resolver, EndpointsError> {
        let builder = Hickory::builder_tokio().map_err(EndpointsError::SystemConfig)?;
        Resolver::build(builder)
    }

    /// A resolver that asks only `server` (UDP, and TCP for truncated answers), without search
    /// domains and without reading /etc/hosts; a query unanswered for 1 s is tried once more
    /// (the servers of tests are on this machine, where an answer takes microseconds).
    pub fn with_name_server(server: SocketAddr) -> Result<Resolver, EndpointsError> {
        let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
        for connection in &mut name_server.connections {
            connection.port = server.port();
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), vec![name_server]);
        let mut builder = Hickory::builder_with_config(config, TokioRuntimeProvider::default());
        let options = builder.options_mut();
        options.use_hosts_file = ResolveHosts::Never;
        options.timeout = Duration::from_secs(1);
        options.attempts = 2;
        Resolver::build(builder)
    }

    fn build(
        mut builder: hickory_resolver::ResolverBuilder<TokioRuntimeProvider>,
    ) -> Result<Resolver, EndpointsError> {
        // The watcher decides when to ask again: a cache would answer from memory instead.
        builder.options_mut().cache_size = 0;
        builder.build().map(Resolver).map_err(EndpointsError::Build)
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Whether `name` can be resolved (the routes file's check, with the reason when it cannot).
pub fn check_name(name: &str) -> Result<(), EndpointsError> {
    parse_name(name).map(drop)
}

fn parse_name(name: &str) -> Result<Name, EndpointsError> {
    let bad = |reason: String| EndpointsError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.parse::<IpAddr>().is_ok() {
        return Err(bad("an empty name or an IP address".into()));
    }
    Name::from_utf8(name).map_err(|e| bad(e.to_string()))
}

/// The current set of `source`'s endpoints. A static list is sent once (deduplicated, in its
/// order; `changed()` then reports the sender gone). A DNS name starts empty, is resolved at
/// once and kept current by a task of the calling runtime, which ends when every receiver is
/// dropped; a name that does not parse is logged and stays empty ([`check_name`] first).
pub fn watch(source: Source, resolver: &Resolver) -> watch::Receiver<Arc<[SocketAddr]>> {
    match source {
        Source::Static(addrs) => {
            let mut seen = BTreeSet::new();
            let unique: Vec<SocketAddr> = addrs.into_iter().filter(|a| seen.insert(*a)).collect();
            watch::channel(Arc::from(unique)).1
        }
        Source::Dns { name, port } => {
            let (tx, rx) = watch::channel(Arc::from(Vec::new()));
            match parse_name(&name) {
                Ok(parsed) => {
                    tokio::spawn(keep_resolved(tx, resolver.0.clone(), parsed, port));
                }
                Err(e) => tracing::error!("endpoints: {e}"),
            }
            rx
        }
    }
}

/// One family's last good addresses.
#[derive(Default)]
struct Family {
    addrs: Vec<IpAddr>,
}

/// What one resolution of one family gave.
enum Answer {
    /// The addresses (possibly none: the name has no record of this family) and the smallest TTL.
    Records(Vec<IpAddr>, Option<Duration>),
    Failed(NetError),
}

async fn keep_resolved(
    tx: watch::Sender<Arc<[SocketAddr]>>,
    resolver: TokioResolver,
    name: Name,
    port: u16,
) {
    let mut families = [Family::default(), Family::default()];
    let mut failures = 0u32;
    let mut said_empty = false;
    let mut said_filtered = false;
    loop {
        let round = async {
            tokio::time::timeout(
                LOOKUP_BOUND,
                futures_util::future::join(
                    lookup(&resolver, &name, RecordType::A),
                    lookup(&resolver, &name, RecordType::AAAA),
                ),
            )
            .await
        };
        let answers = tokio::select! {
            () = tx.closed() => return,
            answers = round => answers,
        };
        let mut ttl: Option<Duration> = None;
        let mut failed: Option<String> = None;
        match answers {
            Ok((v4, v6)) => {
                for (family, answer) in families.iter_mut().zip([v4, v6]) {
                    match answer {
                        Answer::Records(addrs, t) => {
                            family.addrs = addrs;
                            ttl = min_some(ttl, t);
                        }
                        Answer::Failed(e) => failed = Some(e.to_string()),
                    }
                }
            }
            Err(_) => failed = Some(format!("no answer within {LOOKUP_BOUND:?}")),
        }
        let (set, filtered) = endpoint_set(families.iter().flat_map(|f| &f.addrs), port);
        if filtered > 0 && !said_filtered {
            tracing::warn!(
                "endpoints: {name}: {filtered} address(es) left out (not a pod's address, or over {MAX_ADDRESSES})"
            );
        }
        said_filtered = filtered > 0;
        let kept = tx.borrow().len();
        let empty = set.is_empty();
        if empty {
            if failed.is_none() && !said_empty {
                tracing::warn!(
                    "endpoints: {name} resolved to no usable address; keeping the last {kept}"
                );
                said_empty = true;
            }
        } else {
            said_empty = false;
            tx.send_if_modified(|current| {
                let changed = **current != *set;
                if changed {
                    *current = Arc::from(set);
                }
                changed
            });
        }
        let wait = match failed {
            Some(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                tracing::warn!(
                    "endpoints: resolving {name} failed ({e}); keeping the last {kept}, next try in {wait:?}"
                );
                wait
            }
            None if empty => {
                failures = failures.saturating_add(1);
                backoff(failures)
            }
            None => {
                failures = 0;
                ttl.unwrap_or(MIN_REFRESH).clamp(MIN_REFRESH, MAX_REFRESH)
            }
        };
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

async fn lookup(resolver: &TokioResolver, name: &Name, kind: RecordType) -> Answer {
    match resolver.lookup(name.clone(), kind).await {
        Ok(lookup) => {
            let records = lookup.answers();
            let addrs = records.iter().filter_map(|r| r.data.ip_addr()).collect();
            let ttl = records.iter().map(|r| r.ttl).min();
            Answer::Records(addrs, ttl.map(|s| Duration::from_secs(u64::from(s))))
        }
        // NXDOMAIN, or a name without records of this family: an answer, with no address.
        Err(e) if e.is_no_records_found() => Answer::Records(Vec::new(), None),
        Err(e) => Answer::Failed(e),
    }
}

fn min_some(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The `failures`-th wait: 1 s doubling up to [`MAX_BACKOFF`], each between half and all of it
/// (jittered, so that the pods of a deployment do not all ask again at once).
fn backoff(failures: u32) -> Duration {
    let full = MIN_REFRESH
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(MAX_BACKOFF);
    full.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// The endpoint set of an answer: usable addresses only, sorted, deduplicated, at most
/// [`MAX_ADDRESSES`]; and how many were left out.
fn endpoint_set<'a>(ips: impl Iterator<Item = &'a IpAddr>, port: u16) -> (Vec<SocketAddr>, usize) {
    let mut kept = BTreeSet::new();
    let mut unusable = 0;
    for ip in ips.map(IpAddr::to_canonical) {
        if usable(ip) {
            kept.insert(ip);
        } else {
            unusable += 1;
        }
    }
    let over = kept.len().saturating_sub(MAX_ADDRESSES);
    let set = kept
        .into_iter()
        .take(MAX_ADDRESSES)
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    (set, unusable + over)
}

/// Whether `ip` can be a pod's address.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().expect("an IP")).collect()
    }

    #[test]
    fn an_answer_keeps_pod_addresses_sorted_and_once() {
        let answer = ips(&[
            "198.18.0.2",
            "2001:db8::1",
            "198.18.0.1",
            "198.18.0.2",
            "::ffff:198.18.0.1",
        ]);
        let (set, left_out) = endpoint_set(answer.iter(), 80);
        let want: Vec<SocketAddr> = ["198.18.0.1:80", "198.18.0.2:80", "[2001:db8::1]:80"]
            .iter()
            .map(|a| a.parse().expect("an address"))
            .collect();
        assert_eq!((set, left_out), (want, 0));
    }

    #[test]
    fn an_answer_cannot_point_at_the_pod_itself_or_a_metadata_address() {
        let hostile = ips(&[
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.169.254",
            "::1",
            "::",
            "ff02::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ]);
        let (set, left_out) = endpoint_set(hostile.iter().chain(&ips(&["198.18.0.1"])), 80);
        assert_eq!(
            set,
            ["198.18.0.1:80".parse::<SocketAddr>().expect("an address")]
        );
        assert_eq!(left_out, hostile.len());
    }

    #[test]
    fn an_answer_is_cut_at_max_addresses() {
        let many: Vec<IpAddr> = (0..1000u32)
            .map(|i| IpAddr::from([198, 18, (i / 256) as u8, (i % 256) as u8]))
            .rev()
            .collect();
        let (set, left_out) = endpoint_set(many.iter(), 80);
        assert_eq!((set.len(), left_out), (MAX_ADDRESSES, 1000 - MAX_ADDRESSES));
        assert_eq!(
            set[0].ip(),
            IpAddr::from([198, 18, 0, 0]),
            "the lowest are kept"
        );
    }

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter() {
        for (failures, full) in [(1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (50, 30)] {
            let full = Duration::from_secs(full);
            for _ in 0..100 {
                let wait = backoff(failures);
                assert!(wait >= full / 2 && wait <= full, "{failures}: {wait:?}");
            }
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("reviews.default.svc.cluster.local").is_ok());
        assert!(check_name("reviews").is_ok());
        for bad in ["", "198.18.0.1", "a..b", &"x".repeat(64)] {
            let err = check_name(bad).expect_err(bad);
            assert!(err.to_string().contains("is not a DNS name"), "{err}");
        }
    }

    #[tokio::test]
    async fn a_static_list_is_sent_once_without_duplicates() {
        let resolver = Resolver::with_name_server("127.0.0.1:53".parse().expect("an address"))
            .expect("a resolver");
        let a: SocketAddr = "198.18.0.1:80".parse().expect("an address");
        let b: SocketAddr = "127.0.0.1:8080".parse().expect("an address");
        let mut rx = watch(Source::Static(vec![a, b, a]), &resolver);
        assert_eq!(
            **rx.borrow_and_update(),
            [a, b],
            "static lists keep loopback: the operator's choice"
        );
        assert!(rx.changed().await.is_err(), "nothing will change it");
    }

    /// The watcher of a name whose server never answers ends once its receivers are gone (in
    /// paused time: its timeouts and backoffs pass at once, so a watcher that kept going would
    /// spin through the hour below rather than hang).
    #[tokio::test(start_paused = true)]
    async fn the_watcher_ends_when_every_receiver_is_gone() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        let server = silent.local_addr().expect("its address");
        let resolver = Resolver::with_name_server(server).expect("a resolver");
        let (tx, rx) = watch::channel(Arc::from(Vec::new()));
        let name = parse_name("svc.balance.test").expect("a name");
        let task = tokio::spawn(keep_resolved(tx, resolver.0, name, 80));
        let rx2 = rx.clone();
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(rx);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!task.is_finished(), "one receiver is left");
        drop(rx2);
        let ended = tokio::time::timeout(Duration::from_secs(3600), task).await;
        assert!(
            matches!(ended, Ok(Ok(()))),
            "still running an hour after: {ended:?}"
        );
    }
}
