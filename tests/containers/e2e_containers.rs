//! The tutorial's pod in real containers: the image built from the project's Dockerfile
//! (scripts/image.sh), and deploy/pod.yaml run in Docker as a kubelet would (scripts/pod-docker.py:
//! a pause container holding the network namespace, the init container with the manifest's args,
//! env, user and capabilities, the proxy as a native sidecar with its user, read-only root
//! filesystem and dropped capabilities, then httpbin). From the host: the tutorial's three `curl -i`
//! requests to the pod's address, the sidecar's log (`kubectl logs httpbin --container=amazing-proxy`
//! is `docker logs`), and `docker stop` of the sidecar, which drains and exits 0. The host's
//! FORWARD chain, nat table and forwarding switch are the same afterwards.
//!
//! Needs root and Docker (scripts/docker.sh installs Debian's docker.io and starts a daemon that
//! leaves the host's packet filter alone); otherwise it prints SKIP and why. The first run
//! debootstraps a Debian base image (a few minutes, cached under target/ for the next runs).
//! Everything it creates (containers, the pod's network, the daemon it started) is removed even
//! when it fails.

use crate::support;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::Duration;

const MANIFEST: &str = "deploy/pod.yaml";
/// The app image the manifest names, and the local one built in its place (no registry here).
const HTTPBIN: &str = "kennethreitz/httpbin=amazing-proxy-local/httpbin";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// scripts/pod-docker.py reads manifests with PyYAML.
fn has_pyyaml() -> bool {
    Command::new("python3")
        .args(["-c", "import yaml"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Docker daemon, held for the test's lifetime by `scripts/docker.sh hold`: closing its stdin
/// (on drop, panics included) lets it stop the daemon it started.
struct Daemon {
    child: Child,
    stdin: Option<ChildStdin>,
    host: String,
}

impl Daemon {
    /// `Err` says why Docker is not available.
    fn hold() -> Result<Daemon, String> {
        let mut child = Command::new(repo().join("scripts/docker.sh"))
            .arg("hold")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run scripts/docker.sh: {e}"))?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = BufReader::new(stdout).read_line(&mut line);
        }
        match line.trim().strip_prefix("DOCKER_HOST=") {
            Some(host) => Ok(Daemon {
                child,
                stdin,
                host: host.to_string(),
            }),
            None => {
                drop(stdin);
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(format!(
                    "Docker could not be installed or started (scripts/docker.sh hold: {status}; its reason is above)"
                ))
            }
        }
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(repo());
        if !self.host.is_empty() {
            cmd.env("DOCKER_HOST", &self.host);
        }
        cmd
    }

    fn docker(&self, args: &[&str]) -> Output {
        let mut cmd = self.command("docker");
        cmd.args(args);
        bounded(cmd, Duration::from_secs(120))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Runs a command to completion within `limit`, or kills it and panics.
fn bounded(mut cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(output) => output.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &id.to_string()])
                .status();
            panic!("{what} did not finish within {limit:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The pod, removed (containers and network) on drop.
struct Pod<'a> {
    daemon: &'a Daemon,
    name: String,
    ip: String,
    proxy: String,
}

impl<'a> Pod<'a> {
    fn up(daemon: &'a Daemon, name: &str) -> Pod<'a> {
        let mut pod = Pod {
            daemon,
            name: name.to_string(),
            ip: String::new(),
            proxy: String::new(),
        };
        let mut cmd = daemon.command("python3");
        cmd.args(["scripts/pod-docker.py", "up", MANIFEST, "--pod", name])
            .args(["--image", HTTPBIN]);
        let out = bounded(cmd, Duration::from_secs(300));
        eprintln!("{}", text(&out.stderr));
        assert!(
            out.status.success(),
            "the pod did not come up: {}",
            text(&out.stderr)
        );
        let result: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("pod-docker.py prints JSON");
        pod.ip = result["ip"].as_str().expect("the pod's address").into();
        pod.proxy = result["containers"]["amazing-proxy"]
            .as_str()
            .expect("the sidecar's container")
            .into();
        pod
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        let mut cmd = self.daemon.command("python3");
        cmd.args(["scripts/pod-docker.py", "down", "--pod", &self.name]);
        let out = bounded(cmd, Duration::from_secs(120));
        if !out.status.success() {
            eprintln!("removing pod {}: {}", self.name, text(&out.stderr));
        }
    }
}

/// One `curl -i` from the host: status, headers (names as sent), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn curl(args: &[&str]) -> Reply {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-i", "--max-time", "10"]).args(args);
    let out = bounded(cmd, Duration::from_secs(20));
    assert!(out.status.success(), "curl {args:?}: {}", text(&out.stderr));
    let raw = text(&out.stdout);
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, read top to bottom as a kubelet would run it
fn tutorial_pod_in_containers() {
    if !is_root() {
        return support::skip(
            "tutorial_pod_in_containers",
            "needs root (to install and start Docker); run scripts/test.sh as root",
        );
    }
    if !has_pyyaml() {
        return support::skip(
            "tutorial_pod_in_containers",
            "python3 with PyYAML is missing (scripts/deps.sh --containers installs python3-yaml)",
        );
    }
    let before = host_packet_filter();
    let daemon = match Daemon::hold() {
        Ok(daemon) => daemon,
        Err(why) => return support::skip("tutorial_pod_in_containers", &why),
    };
    let binary = env!("CARGO_BIN_EXE_amazing-proxy");
    let mut build = daemon.command(repo().join("scripts/image.sh"));
    build.args(["--binary", binary]);
    let built = bounded(build, Duration::from_secs(900));
    assert!(
        built.status.success(),
        "scripts/image.sh failed:\n{}",
        text(&built.stderr)
    );
    eprintln!("{}", text(&built.stderr));

    let pod = Pod::up(&daemon, &format!("ap-e2e-{}", std::process::id()));
    let ip = &pod.ip;
    let requests: [(&[&str], &str, u16); 3] = [
        (&[], "/get?query=param", 200),
        (&["-X", "POST", "-d", "body=parameters"], "/post", 200),
        (&[], "/status/429", 429),
    ];
    for (extra, path, status) in requests {
        let url = format!("http://{ip}{path}");
        let mut args = extra.to_vec();
        args.push(&url);
        let reply = curl(&args);
        assert_eq!(reply.status, status, "curl -i {args:?}: {}", reply.body);
        assert_eq!(
            reply.header("server"),
            Some("amazing-proxy"),
            "curl -i {args:?}: {:?}",
            reply.headers
        );
    }
    let get = curl(&[&format!("http://{ip}/get?query=param")]);
    let echo: serde_json::Value = serde_json::from_str(&get.body).expect("httpbin's JSON");
    assert_eq!(echo["args"], serde_json::json!({"query": "param"}));

    // The sidecar's stdout is its access log: the tutorial's six-line blocks (four requests now).
    let mut log = String::new();
    for _ in 0..50 {
        log = text(&daemon.docker(&["logs", &pod.proxy]).stdout);
        if log.split("\n\n").filter(|r| !r.trim().is_empty()).count() >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let records: Vec<&str> = log
        .split("\n\n")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect();
    assert_eq!(records.len(), 4, "docker logs {}:\n{log}", pod.proxy);
    for (record, (path, status)) in records.iter().zip([
        ("/get?query=param", 200),
        ("/post", 200),
        ("/status/429", 429),
        ("/get?query=param", 200),
    ]) {
        let lines: Vec<&str> = record.lines().collect();
        assert_eq!(lines.len(), 6, "not a six-line block:\n{record}");
        assert_eq!(lines[0], format!("Original URL: http://{ip}:80{path}"));
        assert_eq!(lines[1], format!("Proxy URL: http://127.0.0.1:80{path}"));
        assert!(lines[2].starts_with("Request Duration: "), "{record}");
        assert!(lines[3].starts_with("Request Size: "), "{record}");
        assert!(lines[4].starts_with("Response Size: "), "{record}");
        assert_eq!(lines[5], format!("Response Status: {status}"));
    }

    // kubelet's SIGTERM at pod deletion: the proxy drains and exits 0 (not killed at the timeout).
    let stop = daemon.docker(&["stop", &pod.proxy]);
    assert!(stop.status.success(), "docker stop: {}", text(&stop.stderr));
    let state = daemon.docker(&["inspect", "--format", "{{.State.ExitCode}}", &pod.proxy]);
    let diagnostics = text(&daemon.docker(&["logs", &pod.proxy]).stderr);
    assert_eq!(
        text(&state.stdout).trim(),
        "0",
        "the sidecar's exit code; its log:\n{diagnostics}"
    );
    assert!(diagnostics.contains("drain"), "{diagnostics}");

    // The project's daemon leaves the host's forwarding and rules as they were (a daemon someone
    // else runs is theirs to configure).
    let ours = daemon.host.contains("/run/amazing-proxy-docker/");
    drop(pod);
    drop(daemon);
    if ours {
        assert_eq!(
            host_packet_filter(),
            before,
            "Docker changed the host's packet filter"
        );
    }
}

/// The host's FORWARD chain, nat table and IPv4 forwarding switch.
fn host_packet_filter() -> String {
    let mut state = String::new();
    for args in [&["-S", "FORWARD"][..], &["-t", "nat", "-S"][..]] {
        match Command::new("iptables").args(args).output() {
            Ok(out) => state += &text(&out.stdout),
            Err(e) => state += &format!("iptables {args:?}: {e}\n"),
        }
    }
    state + &std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default()
}

#[test]
fn translation_refuses_what_it_does_not_translate_and_takes_the_tutorial_pod() {
    // No Docker needed: the manifest check comes before any container is made.
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    image: i\n    volumeMounts: [{name: v, mountPath: /v}]\n",
    )
    .expect("write manifest");
    if !has_pyyaml() {
        return support::skip(
            "translation_refuses_what_it_does_not_translate_and_takes_the_tutorial_pod",
            "python3 with PyYAML is missing (scripts/deps.sh --containers installs python3-yaml)",
        );
    }
    let check = |path: &Path| {
        let mut cmd = Command::new("python3");
        cmd.arg(repo().join("scripts/pod-docker.py"))
            .arg("check")
            .arg(path);
        bounded(cmd, Duration::from_secs(30))
    };
    let refused = check(&manifest);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("volumeMounts"),
        "{}",
        text(&refused.stderr)
    );
    let tutorial = check(&repo().join(MANIFEST));
    assert!(
        tutorial.status.success(),
        "{MANIFEST} has fields the translation would drop: {}",
        text(&tutorial.stderr)
    );
}
