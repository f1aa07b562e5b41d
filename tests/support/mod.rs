//! The one support tree of the integration tests, compiled once into each of the three suites
//! (tests/in_process, tests/netns, tests/containers), whose main.rs says
//! `#[path = "../support/mod.rs"] mod support;`; their modules use `crate::support::...`:
//! - [`process`]: the binary, bounded commands, child guards, and the proxy under test;
//! - [`http`]: HTTP clients, the in-process test app, raw TCP apps and ports that refuse or hang;
//! - [`golden`]: golden files, compared or rewritten (`UPDATE_GOLDENS=1`);
//! - [`raw`]: the recording app and raw client of the conformance tests (bytes in, bytes out);
//! - [`identity`]: a CA and SPIFFE workload certificates (rcgen), in the `--identity-dir` layout;
//! - [`mesh`]: two pods in network namespaces, each with its proxy, identity and `init` rules;
//! - [`metrics`]: reading the Prometheus text the admin port serves;
//! - [`netns`]: network namespaces and the reproduced Kubernetes pod;
//! - [`workload_api`]: a SPIFFE Workload API server (SPIRE agent's protocol) on a Unix socket;
//! - [`routes`]: a pod calling a service of three endpoints through its sidecar (routes tests);
//! - [`tools`]: external programs (is one installed, the venv), rule listings, access-log records.
//!
//! One skip policy: a test that cannot run here calls [`skip`], which says so loudly.
#![allow(dead_code)] // each suite uses a different part of the tree

pub mod golden;
pub mod http;
pub mod identity;
pub mod in_process;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod process;
pub mod raw;
pub mod routes;
pub mod tools;
pub mod workload_api;

use std::future::Future;
use std::io::Write as _;
use std::time::Duration;

/// Bound for a whole test body.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for one wait inside a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// Records that `test` did not run here and why: a `SKIP <test>: <reason>` line on stderr, and the
/// same line appended to the file `$AMAZING_PROXY_TEST_SKIP_LOG` names (scripts/test.sh counts them and
/// fails under CI). The caller then returns without asserting anything.
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIP {test}: {reason}");
    eprintln!("{line}");
    let Some(path) = std::env::var_os("AMAZING_PROXY_TEST_SKIP_LOG") else {
        return;
    };
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| writeln!(file, "{line}"));
    if let Err(e) = appended {
        panic!("cannot append to AMAZING_PROXY_TEST_SKIP_LOG={path:?}: {e}");
    }
}

/// `Some(reason)` when this process is not root (namespaces, iptables and nft need it).
pub fn not_root() -> Option<String> {
    let uid = std::process::Command::new("id").arg("-u").output();
    match uid {
        Ok(out) if String::from_utf8_lossy(&out.stdout).trim() == "0" => None,
        _ => Some("needs root to create network namespaces".into()),
    }
}

/// Runs `f`, failing the test with `what` if it takes longer than `limit`.
pub async fn bounded<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// What a poll of [`eventually`] found: a value, or not yet (with why, for the failure message).
pub trait Outcome<T> {
    fn ready(self) -> Result<T, String>;
}

impl<T> Outcome<T> for Option<T> {
    fn ready(self) -> Result<T, String> {
        self.ok_or_else(String::new)
    }
}

impl<T> Outcome<T> for Result<T, String> {
    fn ready(self) -> Result<T, String> {
        self
    }
}

/// Polls `check` every 20 ms until it is ready, failing with `what` (and the last reason it gave)
/// after `limit`.
pub async fn eventually<T, P, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    P: Outcome<T>,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    let mut why = String::new();
    let outcome = tokio::time::timeout(limit, async {
        loop {
            match check().await.ready() {
                Ok(v) => return v,
                Err(e) => why = e,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match outcome {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}; {why}"),
    }
}

/// [`eventually`] for tests without a runtime of their own (the namespace tests run commands).
pub fn eventually_blocking<T, P>(what: &str, limit: Duration, mut check: impl FnMut() -> P) -> T
where
    P: Outcome<T>,
{
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime to poll on")
        .block_on(eventually(what, limit, || {
            let found = check();
            async move { found }
        }))
}
