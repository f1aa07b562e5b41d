//! `amazing-proxy init` against real kernels rules, inside throwaway network namespaces.
//!
//! Needs root (to create namespaces); otherwise every test reports itself skipped (`support::skip`).
//! Each namespace is named `apt-nf-<pid>-<n>` and removed by a guard even when a test fails;
//! functional checks use 198.18.0.0/15 addresses only, between namespaces created here.
#![allow(clippy::unwrap_used)]

use crate::support;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::netns::Netns;
use crate::support::process::{Background, bin, run};
use crate::support::tools::{have, normalise, text};
use crate::support::{eventually_blocking, skip};

/// A namespace `apt-nf-<pid>-<n>`, or `None` after reporting `test` skipped.
fn netns(test: &str) -> Option<Netns> {
    Netns::unique("apt-nf").map_err(|why| skip(test, &why)).ok()
}

/// `amazing-proxy init` run inside a namespace, and the rule listings it changes.
trait Init {
    fn init(&self, args: &[&str]) -> Output;
    fn init_with_path(&self, path: &str, args: &[&str]) -> Output;
    fn init_ok(&self, args: &[&str]) -> String;
    fn save(&self, args: &[&str]) -> String;
    fn everything(&self) -> String;
}

impl Init for Netns {
    fn init(&self, args: &[&str]) -> Output {
        let mut all = vec![bin(), "init"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    fn init_with_path(&self, path: &str, args: &[&str]) -> Output {
        let mut all = vec![bin(), "init"];
        all.extend_from_slice(args);
        // `env` sets PATH for our binary only: `ip` itself is found with the test's PATH.
        let path = format!("PATH={path}");
        let mut with_env = vec!["env", path.as_str()];
        with_env.extend(all);
        self.exec(&with_env)
    }

    fn init_ok(&self, args: &[&str]) -> String {
        let out = self.init(args);
        assert!(
            out.status.success(),
            "init {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `<tool> -t nat` (or any listing) without comments and counters, to compare states.
    fn save(&self, args: &[&str]) -> String {
        normalise(&self.ok(args))
    }

    /// Every rule in the namespace, in all backends.
    fn everything(&self) -> String {
        let mut all = String::new();
        for tool in [
            "iptables-legacy-save",
            "ip6tables-legacy-save",
            "iptables-nft-save",
            "ip6tables-nft-save",
        ] {
            all.push_str(&format!("== {tool}\n{}", self.save(&[tool])));
        }
        // Native tables only: iptables-nft leaves empty base chains behind in nf_tables, which
        // the *-save views above show as they were (built-in chains with no rules).
        all.push_str(&format!("== nft\n{}", self.ok(&["nft", "list", "tables"])));
        all
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn iptables_rules_land_are_idempotent_and_clean_restores() {
    let Some(ns) = netns("iptables_rules_land_are_idempotent_and_clean_restores") else {
        return;
    };
    // Someone else's rule in the same nat table must survive everything we do.
    ns.ok(&[
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "--dport",
        "53",
        "-j",
        "RETURN",
    ]);
    let before4 = ns.save(&["iptables-nft-save", "-t", "nat"]);
    let before6 = ns.save(&["ip6tables-nft-save", "-t", "nat"]);

    ns.init_ok(&[
        "--backend",
        "iptables",
        "--exclude-outbound-cidrs",
        "10.0.0.0/8,fd00::/8",
    ]);
    let once4 = ns.save(&["iptables-nft-save", "-t", "nat"]);
    let once6 = ns.save(&["ip6tables-nft-save", "-t", "nat"]);
    assert_eq!(
        count(&once4, "-A PREROUTING -p tcp -j AMAZING_INBOUND"),
        1,
        "{once4}"
    );
    assert_eq!(
        count(&once4, "-A OUTPUT -p tcp -j AMAZING_OUTPUT"),
        1,
        "{once4}"
    );
    assert!(
        once4.contains("-A AMAZING_OUTPUT -d 10.0.0.0/8 -j RETURN"),
        "{once4}"
    );
    assert!(once4.contains("-A AMAZING_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
    assert!(once4.contains("-A OUTPUT -p udp -m udp --dport 53 -j RETURN"));
    assert!(
        once6.contains("-A AMAZING_IN_REDIRECT -p tcp -j REDIRECT --to-ports 8000"),
        "{once6}"
    );

    ns.init_ok(&[
        "--backend",
        "iptables",
        "--exclude-outbound-cidrs",
        "10.0.0.0/8,fd00::/8",
    ]);
    assert_eq!(
        ns.save(&["iptables-nft-save", "-t", "nat"]),
        once4,
        "second run differs"
    );
    assert_eq!(
        ns.save(&["ip6tables-nft-save", "-t", "nat"]),
        once6,
        "second run differs"
    );

    // Auto now finds our rules and stays with them.
    ns.init_ok(&["--exclude-outbound-cidrs", "10.0.0.0/8,fd00::/8"]);
    assert_eq!(ns.save(&["iptables-nft-save", "-t", "nat"]), once4);

    ns.init_ok(&["--clean"]);
    assert_eq!(ns.save(&["iptables-nft-save", "-t", "nat"]), before4);
    assert_eq!(ns.save(&["ip6tables-nft-save", "-t", "nat"]), before6);
    // A second clean has nothing to do and succeeds.
    ns.init_ok(&["--clean"]);
}

#[test]
fn changing_options_replaces_the_previous_rules() {
    let Some(ns) = netns("changing_options_replaces_the_previous_rules") else {
        return;
    };
    ns.init_ok(&["--backend", "iptables", "--ipv6", "off"]);
    ns.init_ok(&[
        "--backend",
        "iptables",
        "--ipv6",
        "off",
        "--inbound-ports",
        "80",
        "--no-outbound",
    ]);
    let now = ns.save(&["iptables-nft-save", "-t", "nat"]);
    assert!(!now.contains("AMAZING_OUTPUT"), "{now}");
    assert!(now.contains("--dport 80 -j AMAZING_IN_REDIRECT"), "{now}");
    assert_eq!(count(&now, "-j AMAZING_INBOUND"), 1, "{now}");
}

#[test]
fn nft_backend_lands_is_idempotent_and_clean_restores() {
    let Some(ns) = netns("nft_backend_lands_is_idempotent_and_clean_restores") else {
        return;
    };
    if !have("nft") {
        return skip(
            "nft_backend_lands_is_idempotent_and_clean_restores",
            "nft not installed",
        );
    }
    let before = ns.ok(&["nft", "list", "ruleset"]);
    ns.init_ok(&["--backend", "nft", "--exclude-outbound-ports", "22"]);
    let once = ns.ok(&["nft", "list", "ruleset"]);
    assert!(once.contains("table inet amazing_proxy"), "{once}");
    assert!(once.contains("redirect to :15001"), "{once}");
    ns.init_ok(&["--backend", "nft", "--exclude-outbound-ports", "22"]);
    assert_eq!(ns.ok(&["nft", "list", "ruleset"]), once);
    ns.init_ok(&["--clean"]);
    assert_eq!(ns.ok(&["nft", "list", "ruleset"]), before);
}

#[test]
fn auto_detects_legacy_when_legacy_rules_exist() {
    let Some(ns) = netns("auto_detects_legacy_when_legacy_rules_exist") else {
        return;
    };
    ns.ok(&[
        "iptables-legacy",
        "-A",
        "INPUT",
        "-p",
        "udp",
        "--dport",
        "9",
        "-j",
        "DROP",
    ]);
    // `-t nat` creates the (empty) legacy nat table if absent, as our run will: compare like that.
    let legacy = |ns: &Netns| {
        ns.save(&["iptables-legacy-save", "-t", "nat"])
            + &ns.save(&["ip6tables-legacy-save", "-t", "nat"])
            + &ns.save(&["iptables-legacy-save", "-t", "filter"])
    };
    let before = legacy(&ns);
    let out = ns.init(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("iptables (legacy)"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        ns.save(&["iptables-legacy-save"])
            .contains("AMAZING_INBOUND")
    );
    assert!(!ns.save(&["iptables-nft-save"]).contains("AMAZING"));
    ns.init_ok(&["--clean"]);
    assert_eq!(legacy(&ns), before);
}

#[test]
fn auto_detects_nf_tables_when_nft_rules_exist() {
    let Some(ns) = netns("auto_detects_nf_tables_when_nft_rules_exist") else {
        return;
    };
    ns.ok(&[
        "iptables-nft",
        "-A",
        "INPUT",
        "-p",
        "udp",
        "--dport",
        "9",
        "-j",
        "DROP",
    ]);
    let out = ns.init(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("iptables (nf_tables)"),
        "{}",
        text(&out.stderr)
    );
    assert!(ns.save(&["iptables-nft-save"]).contains("AMAZING_INBOUND"));
    assert!(!ns.save(&["iptables-legacy-save"]).contains("AMAZING"));
}

#[test]
fn auto_detects_native_nft_tables() {
    let Some(ns) = netns("auto_detects_native_nft_tables") else {
        return;
    };
    if !have("nft") {
        return skip("auto_detects_native_nft_tables", "nft not installed");
    }
    ns.ok(&["nft", "add", "table", "inet", "someone_else"]);
    let out = ns.init(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        ns.ok(&["nft", "list", "tables"])
            .contains("table inet amazing_proxy")
    );
    assert!(!ns.save(&["iptables-nft-save"]).contains("AMAZING"));
    ns.init_ok(&["--clean"]);
    assert_eq!(
        ns.ok(&["nft", "list", "tables"]).trim(),
        "table inet someone_else"
    );
}

#[test]
fn dry_run_prints_the_script_and_changes_nothing() {
    let Some(ns) = netns("dry_run_prints_the_script_and_changes_nothing") else {
        return;
    };
    let before = ns.everything();
    let out = ns.init_ok(&["--dry-run", "--backend", "iptables"]);
    assert!(out.contains("*nat\n"), "{out}");
    assert!(
        out.contains("-A PREROUTING -p tcp -j AMAZING_INBOUND"),
        "{out}"
    );
    assert!(out.contains("COMMIT"), "{out}");
    let out = ns.init_ok(&["--dry-run", "--backend", "nft"]);
    assert!(out.contains("table inet amazing_proxy {"), "{out}");
    let out = ns.init_ok(&["--dry-run", "--clean"]);
    assert!(out.contains("nothing to clean"), "{out}");
    assert_eq!(ns.everything(), before);
}

#[test]
fn options_come_from_the_environment_too() {
    let Some(ns) = netns("options_come_from_the_environment_too") else {
        return;
    };
    let mut cmd = ns.cmd(&[bin(), "init"]);
    cmd.env("AMAZING_PROXY_BACKEND", "nft")
        .env("AMAZING_PROXY_INBOUND_PORTS", "80,443")
        .env("AMAZING_PROXY_NO_OUTBOUND", "true")
        .env("AMAZING_PROXY_DRY_RUN", "true");
    let out = run(&mut cmd);
    let script = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        script.contains("tcp dport { 80, 443 } jump in_redirect"),
        "{script}"
    );
    assert!(!script.contains("outbound"), "{script}");
    assert!(!ns.ok(&["nft", "list", "tables"]).contains("amazing_proxy"));
}

#[test]
fn missing_binaries_fail_clearly() {
    let Some(ns) = netns("missing_binaries_fail_clearly") else {
        return;
    };
    let empty = tempfile::tempdir().unwrap();
    let path = empty.path().to_str().unwrap();
    for (backend, want) in [
        ("iptables", "iptables-restore not found in PATH"),
        ("nft", "nft not found in PATH"),
        ("auto", "not found in PATH"),
    ] {
        let out = ns.init_with_path(path, &["--backend", backend]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains(want) && err.contains("install"),
            "{backend}: {err}"
        );
    }
}

/// A directory of fake tools that fail like a rejected rule, first in PATH.
fn failing_tool(name: &str) -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join(name);
    std::fs::write(
        &tool,
        "#!/bin/sh\ncat >/dev/null\necho \"$0: line 3 failed: rule rejected\" >&2\nexit 2\n",
    )
    .unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into())
    );
    (dir, path)
}

#[test]
fn ipv6_failure_rolls_ipv4_back() {
    let Some(ns) = netns("ipv6_failure_rolls_ipv4_back") else {
        return;
    };
    // A previous version of our rules must come back exactly, not just vanish.
    ns.init_ok(&[
        "--backend",
        "iptables",
        "--inbound-ports",
        "80",
        "--no-outbound",
    ]);
    let before = ns.everything();
    let (_dir, path) = failing_tool("ip6tables-nft-restore");
    let out = ns.init_with_path(&path, &["--backend", "iptables", "--ipv6", "on"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("rejected the IPv6 rules") && err.contains("rolled back"),
        "{err}"
    );
    assert_eq!(ns.everything(), before);
}

#[test]
fn rejected_ipv4_changes_nothing() {
    let Some(ns) = netns("rejected_ipv4_changes_nothing") else {
        return;
    };
    let before = ns.everything();
    let (_dir, path) = failing_tool("iptables-nft-restore");
    let out = ns.init_with_path(&path, &["--backend", "iptables"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rejected the IPv4 rules"), "{err}");
    assert_eq!(ns.everything(), before);
}

#[test]
fn invalid_options_fail_before_touching_anything() {
    let Some(ns) = netns("invalid_options_fail_before_touching_anything") else {
        return;
    };
    let before = ns.everything();
    for args in [
        &["--exclude-outbound-cidrs", "10.1.2.3/8"][..],
        &["--inbound-ports", "80,http"][..],
        &["--outbound-port", "8000"][..],
    ] {
        let out = ns.init(args);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(!text(&out.stderr).is_empty());
    }
    assert_eq!(ns.everything(), before);
}

#[test]
fn without_net_admin_the_message_says_so() {
    let Some(ns) = netns("without_net_admin_the_message_says_so") else {
        return;
    };
    if !have("capsh") {
        return skip(
            "without_net_admin_the_message_says_so",
            "capsh not installed",
        );
    }
    let cmd = format!("exec {} init --backend iptables", bin());
    let out = ns.exec(&[
        "capsh",
        "--drop=cap_net_admin,cap_net_raw",
        "--",
        "-c",
        &cmd,
    ]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("permission denied") && err.contains("NET_ADMIN"),
        "{err}"
    );
}

/// Connects from `ns` to `addr:port` and returns what the server says (empty on failure).
fn fetch(ns: &Netns, addr: &str, port: u16, as_uid: Option<u32>) -> String {
    let target = format!("TCP:{addr}:{port},connect-timeout=2");
    let mut args: Vec<String> = Vec::new();
    if let Some(uid) = as_uid {
        args.extend(
            [
                "setpriv",
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
            ]
            .map(String::from),
        );
    }
    args.extend(["socat", "-T", "3", "-", &target].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    text(&ns.exec(&args).stdout).trim().to_string()
}

fn listen(ns: &mut Netns, bind: &str, port: u16, reply: &str) {
    let spec = format!("TCP-LISTEN:{port},bind={bind},reuseaddr,fork");
    ns.spawn(&["socat", &spec, &format!("SYSTEM:echo {reply}")]);
}

/// Polls until `f` returns something.
fn eventually(f: impl Fn() -> String) -> String {
    eventually_blocking("an answer", Duration::from_secs(10), || {
        let got = f();
        (!got.is_empty()).then_some(got)
    })
}

#[test]
fn traffic_is_redirected_both_ways_and_the_proxy_is_not() {
    const TEST: &str = "traffic_is_redirected_both_ways_and_the_proxy_is_not";
    if let Some(why) = support::tools::missing(&["socat", "setpriv"]) {
        return skip(TEST, &why);
    }
    let (Some(mut pod), Some(mut peer)) = (netns(TEST), netns(TEST)) else {
        return;
    };
    let link = run(Command::new("ip").args([
        "-n", &pod.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
        &peer.name,
    ]));
    assert!(link.status.success(), "{}", text(&link.stderr));
    pod.ok(&["ip", "addr", "add", "198.18.0.1/30", "dev", "veth0"]);
    pod.ok(&["ip", "link", "set", "veth0", "up"]);
    peer.ok(&["ip", "addr", "add", "198.18.0.2/30", "dev", "veth1"]);
    peer.ok(&["ip", "link", "set", "veth1", "up"]);

    listen(&mut pod, "0.0.0.0", 8000, "inbound-listener");
    listen(&mut pod, "127.0.0.1", 15001, "outbound-listener");
    listen(&mut pod, "0.0.0.0", 9100, "app-9100");
    listen(&mut peer, "198.18.0.2", 443, "peer-443");
    assert_eq!(
        eventually(|| fetch(&peer, "198.18.0.1", 9100, None)),
        "app-9100"
    );
    assert_eq!(
        eventually(|| fetch(&pod, "198.18.0.2", 443, None)),
        "peer-443"
    );

    pod.init_ok(&["--backend", "iptables", "--exclude-inbound-ports", "9100"]);
    // Inbound: any port of the pod's address reaches the inbound listener, except exclusions.
    assert_eq!(fetch(&peer, "198.18.0.1", 80, None), "inbound-listener");
    assert_eq!(fetch(&peer, "198.18.0.1", 9100, None), "app-9100");
    // Outbound: the app's connection goes to the outbound listener; the proxy's (uid 1337) does not.
    assert_eq!(fetch(&pod, "198.18.0.2", 443, None), "outbound-listener");
    assert_eq!(fetch(&pod, "198.18.0.2", 443, Some(1337)), "peer-443");
    // A proxy running as root is recognised by its SO_MARK (socat cannot set it before
    // connecting, python can).
    if have("python3") {
        let client = "import socket; s = socket.socket(); s.settimeout(3); \
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1337); \
            s.connect(('198.18.0.2', 443)); print(s.recv(100).decode().strip())";
        let got = pod.exec(&["python3", "-c", client]);
        assert_eq!(
            text(&got.stdout).trim(),
            "peer-443",
            "{}",
            text(&got.stderr)
        );
    } else {
        skip(
            &format!("{TEST} (its SO_MARK part)"),
            "python3 not installed",
        );
    }
    // Hairpin: the pod calling its own address goes straight to the app.
    assert_eq!(fetch(&pod, "198.18.0.1", 9100, None), "app-9100");

    pod.init_ok(&["--clean"]);
    assert_eq!(fetch(&pod, "198.18.0.2", 443, None), "peer-443");
    drop(peer);
}

/// The pod's and the peer's IPv6 addresses: the documentation prefix, inside the test's own
/// namespaces only.
const POD_V6: &str = "2001:db8::1";
const PEER_V6: &str = "[2001:db8::2]";

/// `amazing-proxy run` in `ns` as the sidecar runs (outbound listener on 127.0.0.1:15001, and so
/// on [::1]:15001 too), logging into `dir`; returns once it listens on the IPv6 loopback.
fn sidecar(ns: &Netns, dir: &std::path::Path, name: &str, extra: &[&str]) -> Background {
    let mut args = vec![
        bin(),
        "run",
        "--inbound",
        "0.0.0.0:8000",
        "--admin",
        "127.0.0.1:15000",
        "--app",
        "127.0.0.1:9",
        "--access-log",
        "json",
    ];
    args.extend_from_slice(extra);
    let (out, err) = (
        dir.join(format!("{name}.out")),
        dir.join(format!("{name}.err")),
    );
    let mut proxy = Background::logging(&mut ns.cmd(&args), &out, &err);
    eventually_blocking(
        "the proxy to listen on [::1]:15001",
        Duration::from_secs(10),
        || {
            assert!(
                proxy.is_running(),
                "the proxy exited: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
            let listening = ns.ok(&["ss", "-Htln", "src", "[::1]", "sport", "=", "15001"]);
            (!listening.trim().is_empty()).then_some(())
        },
    );
    proxy
}

/// Waits for the access-log record of a connection to `upstream` in the log file `out`.
fn record_to(out: &std::path::Path, upstream: &str) -> serde_json::Value {
    eventually_blocking(
        &format!("an access-log record for {upstream}"),
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(out).unwrap_or_default();
            support::tools::json_records(&log)
                .into_iter()
                .find(|r| r["upstream"] == upstream)
        },
    )
}

/// `--outbound-mtls strict` holds for IPv6 too: an app's IPv6 connection goes to the proxy (on
/// [::1]), which refuses a destination without HBONE, instead of reaching it directly; and without
/// mTLS the same connection is carried by the proxy, not refused. Both backends.
#[test]
fn ipv6_egress_cannot_bypass_the_proxy() {
    const TEST: &str = "ipv6_egress_cannot_bypass_the_proxy";
    if let Some(why) = support::tools::missing(&["socat", "setpriv", "ss"]) {
        return skip(TEST, &why);
    }
    let (Some(pod), Some(mut peer)) = (netns(TEST), netns(TEST)) else {
        return;
    };
    let link = run(Command::new("ip").args([
        "-n", &pod.name, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns",
        &peer.name,
    ]));
    assert!(link.status.success(), "{}", text(&link.stderr));
    // `nodad`: usable at once, not after duplicate address detection.
    pod.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{POD_V6}/64"),
        "dev",
        "veth0",
        "nodad",
    ]);
    pod.ok(&["ip", "link", "set", "veth0", "up"]);
    peer.ok(&[
        "ip",
        "addr",
        "add",
        "2001:db8::2/64",
        "dev",
        "veth1",
        "nodad",
    ]);
    peer.ok(&["ip", "link", "set", "veth1", "up"]);
    peer.spawn(&[
        "socat",
        "TCP6-LISTEN:443,bind=[2001:db8::2],reuseaddr,fork",
        "SYSTEM:echo peer-443",
    ]);
    let target = format!("{PEER_V6}:443");
    // Without rules the app reaches the peer over IPv6: the bypass the rules must close.
    assert_eq!(
        eventually(|| fetch(&pod, PEER_V6, 443, Some(1000))),
        "peer-443"
    );

    let dir = tempfile::tempdir().unwrap();
    let ca = support::identity::Ca::new("test-ca");
    let identity = dir.path().join("identity");
    ca.write_dir(
        &identity,
        &ca.issue("spiffe://cluster.local/ns/default/sa/app"),
    );
    let identity = identity.to_str().unwrap();
    let mut backends = vec!["iptables"];
    if have("nft") {
        backends.push("nft");
    } else {
        skip(&format!("{TEST} (its nft part)"), "nft not installed");
    }
    for backend in backends {
        pod.init_ok(&["--backend", backend, "--ipv6", "on"]);

        // Strict: refused by the proxy, not let through. Without mTLS: carried to the peer, so
        // redirected to a listening proxy rather than just refused.
        let cases: [(&str, &[&str], &str); 2] = [
            (
                "strict",
                &["--identity-dir", identity, "--outbound-mtls", "strict"],
                "",
            ),
            ("plain", &[], "peer-443"),
        ];
        for (name, args, reply) in cases {
            let name = format!("{name}-{backend}");
            let proxy = sidecar(&pod, dir.path(), &name, args);
            assert_eq!(fetch(&pod, PEER_V6, 443, Some(1000)), reply, "{name}");
            let out = dir.path().join(format!("{name}.out"));
            assert_eq!(record_to(&out, &target)["upstream"], target.as_str());
            drop(proxy);
        }
        pod.init_ok(&["--clean"]);
    }
    drop(peer);
}
