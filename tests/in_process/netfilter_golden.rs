//! Golden files pinning the scripts `amazing-proxy init` generates, for both backends.
//!
//! `UPDATE_GOLDENS=1 cargo test` rewrites every file under tests/golden/netfilter/ from the
//! current renderers; review the diff before committing.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use amazing_proxy::netfilter::iptables::{self, Family, NatState};
use amazing_proxy::netfilter::rules::Policy;
use amazing_proxy::netfilter::{InitArgs, Ipv6Mode, nft};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    init: InitArgs,
}

/// The policy for a command line; `--ipv6 auto` is pinned as "no IPv6" so goldens do not depend
/// on the machine.
fn policy(args: &[&str]) -> Policy {
    let leaked: Vec<String> = std::env::vars()
        .map(|(k, _)| k)
        // AMAZING_PROXY_TEST_* configure the tests themselves (scripts/test.sh sets the venv).
        .filter(|k| k.starts_with("AMAZING_PROXY_") && !k.starts_with("AMAZING_PROXY_TEST_"))
        .collect();
    assert!(
        leaked.is_empty(),
        "unset {leaked:?}: options from the environment would change the goldens"
    );
    let cli = Cli::try_parse_from(std::iter::once("init").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("bad golden args {args:?}: {e}"));
    let ipv6 = cli.init.ipv6 == Ipv6Mode::On;
    Policy::new(&cli.init.policy_options(), ipv6).unwrap()
}

fn families(p: &Policy) -> Vec<Family> {
    if p.ipv6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// What `--dry-run` prints after its header line, from an empty namespace.
fn iptables_script(p: &Policy) -> String {
    let parts: Vec<_> = families(p)
        .into_iter()
        .map(|f| {
            (
                f,
                iptables::transition(&NatState::default(), &iptables::desired(p, f)),
            )
        })
        .collect();
    iptables::render_dry_run(&parts)
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/netfilter")
}

/// A minimal line diff (longest common subsequence), enough to read a golden mismatch.
fn diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        }
    }
    out
}

fn check(name: &str, actual: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os("UPDATE_GOLDENS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden {}: {e}; run `UPDATE_GOLDENS=1 cargo test` to create it",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "golden {} differs (- expected, + actual); if the change is intended, run `UPDATE_GOLDENS=1 cargo test` and review:\n{}",
            path.display(),
            diff(&expected, actual)
        );
    }
}

/// The main configurations, each pinned for both backends.
const CASES: &[(&str, &[&str])] = &[
    ("default", &[]),
    (
        "tutorial_port_80",
        &["--inbound-ports", "80", "--no-outbound"],
    ),
    (
        "inbound_ports_and_exclusions",
        &[
            "--inbound-ports",
            "80,443,8080,9090",
            "--exclude-inbound-ports",
            "9090",
        ],
    ),
    (
        "inbound_exclusions",
        &["--exclude-inbound-ports", "22,9100"],
    ),
    (
        "outbound_exclusions",
        &[
            "--ipv6",
            "on",
            "--exclude-outbound-ports",
            "3306,22",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00::/8,169.254.169.254,2001:db8::/32",
        ],
    ),
    (
        "identity",
        &[
            "--proxy-uid",
            "2102",
            "--proxy-gid",
            "2103",
            "--proxy-mark",
            "0",
            "--inbound-port",
            "9000",
            "--outbound-port",
            "9001",
            "--admin-port",
            "9002",
        ],
    ),
    ("no_outbound", &["--no-outbound"]),
    ("ipv6_on", &["--ipv6", "on"]),
];

#[test]
fn iptables_goldens() {
    for (name, args) in CASES {
        check(&format!("{name}.iptables"), &iptables_script(&policy(args)));
    }
}

#[test]
fn nft_goldens() {
    for (name, args) in CASES {
        check(&format!("{name}.nft"), &nft::render(&policy(args)));
    }
}

/// A second run over our own rules: previous jumps deleted before new ones are appended.
#[test]
fn iptables_rerun_golden() {
    let p = policy(&["--ipv6", "on"]);
    let parts: Vec<_> = families(&p)
        .into_iter()
        .map(|f| {
            let state = iptables::desired(&p, f);
            (f, iptables::transition(&state, &state))
        })
        .collect();
    check("rerun.iptables", &iptables::render_dry_run(&parts));
}

/// `--clean` over the rules of a full configuration.
#[test]
fn clean_goldens() {
    let p = policy(&["--ipv6", "on"]);
    let parts: Vec<_> = families(&p)
        .into_iter()
        .map(|f| {
            (
                f,
                iptables::transition(&iptables::desired(&p, f), &NatState::default()),
            )
        })
        .collect();
    check("clean.iptables", &iptables::render_dry_run(&parts));
    check("clean.nft", &nft::render_clean());
}

#[test]
fn diff_shows_changed_lines() {
    let d = diff("a\nb\nc\n", "a\nx\nc\n");
    assert_eq!(d, "  a\n+ x\n- b\n  c\n");
}
