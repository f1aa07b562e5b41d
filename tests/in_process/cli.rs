//! `amazing-proxy run`'s command line: bad flags fail before anything binds, with a message that
//! names the option and what it accepts; environment variables work; `--help` documents every flag.

use std::net::TcpListener;
use std::process::Command;

use crate::support::http::*;
use crate::support::process::*;
use crate::support::tools::*;
use crate::support::{TEST_TIMEOUT, WAIT, bounded};
use http::StatusCode;

struct Exit {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its exit, within a bound.
fn run_to_exit(mut cmd: Command) -> Exit {
    let out = run(&mut cmd);
    Exit {
        code: out.status.code(),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

fn rejected(args: &[&str], names: &[&str]) {
    rejected_at_start(args, &[], names);
}

#[test]
fn workers_0_is_rejected() {
    rejected(&["--workers", "0"], &["--workers", "1..=1024"]);
}

#[test]
fn unknown_access_log_format_is_rejected() {
    rejected(
        &["--access-log", "xml"],
        &["--access-log", "seed", "json", "off"],
    );
}

#[test]
fn drain_delay_that_is_not_a_duration_is_rejected() {
    rejected(&["--drain-delay", "soon"], &["--drain-delay", "500ms"]);
}

#[test]
fn inbound_that_is_not_an_address_is_rejected() {
    rejected(
        &["--inbound", "nonsense", "--admin", "HELD"],
        &["--inbound", "nonsense", "IP:PORT"],
    );
}

#[test]
fn admin_on_the_inbound_address_is_rejected() {
    rejected(
        &["--inbound", "HELD", "--admin", "HELD"],
        &["--admin", "--inbound"],
    );
}

#[test]
fn bad_value_from_the_environment_is_rejected_naming_the_option() {
    let held = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let mut cmd = command();
    cmd.arg("run")
        .env(
            "AMAZING_PROXY_INBOUND",
            held.local_addr().expect("addr").to_string(),
        )
        .env("AMAZING_PROXY_ADMIN", "127.0.0.1:0")
        .env("AMAZING_PROXY_OUTBOUND", "off")
        .env("AMAZING_PROXY_ACCESS_LOG", "xml");
    let exit = run_to_exit(cmd);
    assert_ne!(exit.code, Some(0));
    assert!(exit.stderr.contains("--access-log"), "{}", exit.stderr);
    assert!(exit.stderr.contains("seed"), "{}", exit.stderr);
    assert!(
        exit.stderr
            .contains("comes from the environment variable AMAZING_PROXY_ACCESS_LOG"),
        "{}",
        exit.stderr
    );
    assert!(!exit.stderr.contains("cannot bind"), "{}", exit.stderr);
}

#[test]
fn durations_beyond_their_bound_are_rejected() {
    rejected(
        &["--response-timeout", "300000000000y"],
        &["--response-timeout", "at most 24h"],
    );
    rejected(
        &["--drain-timeout", "2h"],
        &["--drain-timeout", "at most 1h"],
    );
}

#[test]
fn negative_durations_are_rejected_naming_the_flag() {
    rejected(
        &["--drain-timeout", "-1s"],
        &["--drain-timeout", "negative durations are not allowed"],
    );
    rejected(
        &["--connect-timeout=-5s"],
        &["--connect-timeout", "negative durations are not allowed"],
    );
}

#[test]
fn app_on_the_proxy_own_listener_is_rejected() {
    rejected(&["--app", "HELD"], &["--app", "--inbound", "loop"]);
    rejected(
        &["--inbound", "0.0.0.0:8000", "--app", "127.0.0.1:8000"],
        &["--app", "--inbound"],
    );
}

/// A `--routes` file that does not validate stops `run` before it binds, with the file and the
/// field in the message; from the environment too.
#[test]
fn a_routes_file_that_does_not_validate_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("routes.yaml");
    std::fs::write(
        &bad,
        "inbound:\n  - rateLimit: {requestsPerSecond: 10, burst: 0}\n",
    )
    .expect("write");
    let bad = bad.to_str().expect("UTF-8 path");
    let wanted = format!("{bad}: inbound[0].rateLimit.burst: must be at least 1");
    rejected(&["--routes", bad], &["--routes", &wanted]);
    rejected_at_start(&[], &[("AMAZING_PROXY_ROUTES", bad)], &[&wanted]);
    let missing = dir.path().join("missing.yaml");
    let missing = missing.to_str().expect("UTF-8 path");
    rejected(
        &["--routes", missing],
        &[
            "--routes",
            &format!("cannot read the routes file {missing}"),
        ],
    );
}

/// A valid `--routes` file (here from the environment) is read at start and the proxy serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_routes_file_is_read_at_start() {
    bounded("test", TEST_TIMEOUT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.yaml");
        std::fs::write(
            &path,
            "inbound:\n  - match: {pathPrefix: /echo}\n    timeout: 5s\noutbound: []\n",
        )
        .expect("write");
        let app = TestApp::start().await;
        let proxy = Proxy::builder(app.addr)
            .env("AMAZING_PROXY_ROUTES", path.to_str().expect("UTF-8 path"))
            .start()
            .await;
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        // Logged before the listeners serve, so before the reply above.
        let log = proxy.stderr();
        let line = log.lines().find(|l| l.contains("routes read"));
        assert!(
            line.is_some_and(|l| l.contains("inbound=1") && l.contains("outbound=0")),
            "{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_variables_configure_run() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::builder(app.addr)
            .env("AMAZING_PROXY_ACCESS_LOG", "seed")
            .env("AMAZING_PROXY_REWRITE_HOST", "true")
            .start()
            .await;
        let reply = proxy.get("/echo?from=env").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(echoed_header(&reply.json(), "host"), [app.addr.to_string()]);
        let log = proxy
            .wait_for_log(|t| t.contains("Response Status: 200\n\n"), WAIT)
            .await;
        assert!(
            log.starts_with(&format!(
                "Original URL: http://{}/echo?from=env\n",
                proxy.inbound
            )),
            "{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_serve_requests() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--workers", "2"]).await;
        for _ in 0..5 {
            assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        }
    })
    .await;
}

const RUN_FLAGS: &[&str] = &[
    "inbound",
    "outbound",
    "app",
    "admin",
    "access-log",
    "workers",
    "lowercase-header-names",
    "rewrite-host",
    "app-protocol",
    "http2-ports",
    "connect-timeout",
    "response-timeout",
    "header-timeout",
    "idle-timeout",
    "request-body-timeout",
    "response-body-timeout",
    "pool-idle-timeout",
    "http-ports",
    "max-connections",
    "max-in-flight",
    "max-header-bytes",
    "app-ready-path",
    "drain-delay",
    "drain-timeout",
    "detect-timeout",
    "opaque-ports",
    "proxy-mark",
    "identity-dir",
    "identity-credential-bundle",
    "identity-trust-bundle",
    "identity-spire-socket",
    "trust-domain",
    "hbone",
    "outbound-mtls",
    "inbound-mtls",
    "plaintext-ports",
    "peer-identities",
    "policy",
    "routes",
];

#[test]
fn run_help_documents_every_flag_and_its_environment_variable() {
    let mut cmd = command();
    cmd.args(["run", "--help"]);
    let exit = run_to_exit(cmd);
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    let help = exit.stdout;
    for flag in RUN_FLAGS {
        let line = help
            .lines()
            .position(|l| l.trim_start().starts_with(&format!("--{flag}")))
            .unwrap_or_else(|| panic!("--{flag} missing from run --help:\n{help}"));
        let doc = help.lines().nth(line + 1).unwrap_or_default().trim();
        assert!(!doc.is_empty(), "--{flag} has no description:\n{help}");
        let env = format!("AMAZING_PROXY_{}", flag.to_uppercase().replace('-', "_"));
        assert!(
            help.contains(&format!("[env: {env}=")),
            "{env} missing:\n{help}"
        );
    }
}

/// `--version` names the commit (from git when the build had it) and the build date.
#[test]
fn version_names_the_commit_and_build_date() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_amazing-proxy"));
    cmd.arg("--version");
    let exit = run_to_exit(cmd);
    assert_eq!(exit.code, Some(0), "{}", exit.stderr);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_string(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
        );
    let prefix = format!(
        "amazing-proxy {} (commit {commit}, built ",
        env!("CARGO_PKG_VERSION")
    );
    let line = exit.stdout.trim();
    let date = line
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line:?} does not start with {prefix:?}"));
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_digit())),
        "not a YYYY-MM-DD date: {date:?}"
    );
}
