//! Network namespaces, and a Kubernetes pod reproduced on this machine with them.
//!
//! A pod is three namespaces, all created here and named `ap-e2e-<pid>-<n>-{out,pod,peer}`:
//! `out` plays the rest of the cluster sending requests to the pod, `pod` holds the app (httpbin
//! under gunicorn on :80 and :81) and the proxy, `peer` holds a server the app calls. Two veth
//! pairs join them, `out` to the pod's `eth0` and the pod's `eth1` to `peer`, on two /30s of
//! 198.18.0.0/15 derived from the pid and a counter. No address or interface is added to the
//! host's own namespace. Every process is started in its own process group and killed (group and
//! all) before its namespace is deleted, by guards that also run when a test panics.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process::{Background, Workdir, bin, must, run};
use super::tools::{have, normalise, text, venv, without_inert_chains};
use super::{eventually_blocking, not_root};

/// Longest any condition in a pod is polled for (gunicorn's start is the slow one).
pub const POD_WAIT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace; the processes started in it, and anything else still running in it, are
/// killed, then it is deleted.
pub struct Netns {
    pub name: String,
    children: Vec<Background>,
}

impl Netns {
    /// A namespace named `name`; `Err` with the reason when namespaces cannot be created here.
    pub fn new(name: String) -> Result<Netns, String> {
        if let Some(why) = not_root() {
            return Err(why);
        }
        let out = run(Command::new("ip").args(["netns", "add", &name]));
        if !out.status.success() {
            return Err(format!(
                "cannot create network namespace {name}: {}",
                text(&out.stderr)
            ));
        }
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        Ok(ns)
    }

    /// A namespace named `<prefix>-<pid>-<n>`.
    pub fn unique(prefix: &str) -> Result<Netns, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Netns::new(format!("{prefix}-{}-{n}", std::process::id()))
    }

    /// `ip netns exec NAME ARGS...`, not started.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        must(&mut self.cmd(args))
    }

    /// Starts `args` in the namespace in the background, output discarded, until the namespace goes.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Background::spawn(self.cmd(args).stdout(Stdio::null()).stderr(Stdio::null()));
        self.children.push(child);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.children.clear();
        // Only processes in our own namespace: left over children of the processes we started.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in text(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An HTTP response as curl printed it with `-i`.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Parses what `curl -i` printed.
    pub fn parse(raw: &str) -> Result<Response, String> {
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no complete response head in {raw:?}"))?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Ok(Response {
            status,
            headers,
            body: body.to_string(),
        })
    }
}

/// How to start the pod.
pub struct PodOptions<'a> {
    /// `--access-log` of the proxy: `seed` or `json`.
    pub access_log: &'a str,
    /// More `amazing-proxy run` arguments.
    pub run_args: &'a [&'a str],
    /// Run the proxy under this uid/gid (with `setpriv`) instead of root.
    pub proxy_user: Option<u32>,
}

/// The prefix that runs a command as the app's user (uid/gid 1000).
const AS_APP: [&str; 6] = [
    "setpriv",
    "--reuid",
    "1000",
    "--regid",
    "1000",
    "--clear-groups",
];

/// The port the peer's HTTP server listens on.
pub const PEER_PORT: u16 = 8080;
/// The port of the peer's line server (not HTTP): it answers each line upper-cased.
pub const PEER_TCP_PORT: u16 = 9000;
const LINE_SERVER: &str = "import socketserver, sys
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        print('got', line.decode().strip(), flush=True)
        self.wfile.write(line.upper())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
";
/// The file the peer serves, and its content.
pub const PEER_FILE: &str = "hello.txt";
pub const PEER_CONTENT: &str = "hello from the peer namespace\n";

/// A pod with its app and proxy running (no redirect rules yet: call `init`), a client
/// namespace outside it and a peer namespace it can call.
pub struct Pod {
    // Fields drop in order: processes first, then the namespaces they ran in.
    work: Workdir,
    namespaces: Vec<Netns>,
    pub pod_ip: Ipv4Addr,
    pub outside_ip: Ipv4Addr,
    pub pod_peer_side_ip: Ipv4Addr,
    pub peer_ip: Ipv4Addr,
}

/// Two /30s of 198.18.0.0/15 (2^17 addresses: 16384 blocks of 8), from the pid and a counter.
fn addresses(n: u32) -> [Ipv4Addr; 4] {
    let slot = (std::process::id() % 2048) * 8 + n % 8;
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * 8;
    [base + 1, base + 2, base + 5, base + 6].map(Ipv4Addr::from)
}

impl Pod {
    #[allow(clippy::too_many_lines)] // one pod, set up in the order a kubelet and the CNI would
    /// `Err` with the reason when this machine cannot run a pod (not root, no namespaces, no
    /// venv with gunicorn and httpbin).
    pub fn start(opts: &PodOptions<'_>) -> Result<Pod, String> {
        let venv = venv()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ap-e2e-{}-{n}", std::process::id());
        let [outside_ip, pod_ip, pod_peer_side_ip, peer_ip] = addresses(n);
        let mut pod = Pod {
            work: Workdir::new().expect("a scratch directory"),
            namespaces: Vec::new(),
            pod_ip,
            outside_ip,
            pod_peer_side_ip,
            peer_ip,
        };
        for role in ["out", "pod", "peer"] {
            pod.namespaces.push(Netns::new(format!("{prefix}-{role}"))?);
        }
        // Interfaces are created inside our namespaces only, so their names cannot clash.
        let link = |from: &Netns, from_if: &str, to: &Netns, to_if: &str| {
            must(Command::new("ip").args([
                "-n", &from.name, "link", "add", from_if, "type", "veth", "peer", "name", to_if,
                "netns", &to.name,
            ]));
        };
        let addr = |ns: &Netns, ifname: &str, ip: Ipv4Addr| {
            ns.ok(&["ip", "addr", "add", &format!("{ip}/30"), "dev", ifname]);
            ns.ok(&["ip", "link", "set", ifname, "up"]);
        };
        {
            let [out, p, peer] = &pod.namespaces[..] else {
                unreachable!("three namespaces were just created")
            };
            link(out, "to-pod", p, "eth0");
            link(p, "eth1", peer, "to-pod");
            addr(out, "to-pod", outside_ip);
            addr(p, "eth0", pod_ip);
            addr(p, "eth1", pod_peer_side_ip);
            addr(peer, "to-pod", peer_ip);
        }

        // The app: httpbin on :80, and on :81 for the excluded-port checks.
        let gunicorn = venv.join("bin/gunicorn");
        let gunicorn = gunicorn.to_str().expect("a UTF-8 venv path");
        let app = pod.ns_pod().cmd(&[
            gunicorn,
            "-b",
            "0.0.0.0:80",
            "-b",
            "0.0.0.0:81",
            "httpbin:app",
        ]);
        pod.spawn(app, "app.log");

        // The peer: a plain HTTP server the app calls, logging each request it gets.
        let root = pod.path("peer-root");
        std::fs::create_dir(&root).expect("creating the peer's directory");
        std::fs::write(root.join(PEER_FILE), PEER_CONTENT).expect("writing the peer's file");
        let python = venv.join("bin/python3");
        let peer = pod.ns_peer().cmd(&[
            python.to_str().expect("a UTF-8 venv path"),
            "-m",
            "http.server",
            &PEER_PORT.to_string(),
            "--bind",
            &peer_ip.to_string(),
            "--directory",
            root.to_str().expect("a UTF-8 temp dir"),
        ]);
        pod.spawn(peer, "peer.log");
        let line_server = pod.ns_peer().cmd(&[
            python.to_str().expect("a UTF-8 venv path"),
            "-c",
            LINE_SERVER,
            &peer_ip.to_string(),
            &PEER_TCP_PORT.to_string(),
        ]);
        pod.spawn(line_server, "peer-tcp.log");

        // The sidecar.
        let mut args: Vec<String> = Vec::new();
        if let Some(uid) = opts.proxy_user {
            let id = uid.to_string();
            args.extend(
                ["setpriv", "--reuid", &id, "--regid", &id, "--clear-groups"].map(String::from),
            );
        }
        args.extend(
            [
                bin(),
                "run",
                "--access-log",
                opts.access_log,
                "--drain-delay",
                "0s",
            ]
            .map(String::from),
        );
        args.extend(opts.run_args.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut proxy = pod.ns_pod().cmd(&args);
        pod.work
            .spawn_logging(&mut proxy, "access.log", "proxy.log");

        pod.wait_ready("the app", "pod", "http://127.0.0.1:80/get", "app.log");
        pod.wait_ready(
            "the proxy",
            "pod",
            "http://127.0.0.1:15000/ready",
            "proxy.log",
        );
        let peer_url = format!("http://{peer_ip}:{PEER_PORT}/{PEER_FILE}");
        pod.wait_ready("the peer", "peer", &peer_url, "peer.log");
        eventually_blocking("the peer's line server listens", POD_WAIT, || {
            let out = pod
                .ns_peer()
                .exec(&["ss", "-Htln", &format!("sport = {PEER_TCP_PORT}")]);
            let listening = text(&out.stdout);
            (!listening.trim().is_empty())
                .then_some(())
                .ok_or_else(|| pod.read("peer-tcp.log"))
        });
        Ok(pod)
    }

    fn spawn(&mut self, mut cmd: Command, log: &str) {
        self.work.spawn(&mut cmd, log);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path(name)
    }

    pub fn read(&self, name: &str) -> String {
        self.work.read(name)
    }

    pub fn ns_outside(&self) -> &Netns {
        &self.namespaces[0]
    }

    pub fn ns_pod(&self) -> &Netns {
        &self.namespaces[1]
    }

    pub fn ns_peer(&self) -> &Netns {
        &self.namespaces[2]
    }

    fn ns(&self, role: &str) -> &Netns {
        match role {
            "out" => self.ns_outside(),
            "pod" => self.ns_pod(),
            _ => self.ns_peer(),
        }
    }

    /// Waits until `url` answers from the namespace `role`; fails at once if a process exited.
    fn wait_ready(&mut self, what: &str, role: &str, url: &str, log: &str) {
        let waited = format!("{what} to answer {url}");
        eventually_blocking(&waited, POD_WAIT, || {
            let out = self
                .ns(role)
                .exec(&["curl", "-fsS", "-o", "/dev/null", "-m", "1", url]);
            if out.status.success() {
                return Ok(());
            }
            let why = format!("{}\n--- {log}:\n{}", text(&out.stderr), self.read(log));
            if self.work.any_exited() {
                panic!("{what}: a process exited: {why}");
            }
            Err(why)
        })
    }

    /// `amazing-proxy init ARGS` in the pod, required to succeed; returns its stderr.
    pub fn init(&self, args: &[&str]) -> String {
        let mut all = vec![bin(), "init"];
        all.extend_from_slice(args);
        let out = self.ns_pod().exec(&all);
        assert!(
            out.status.success(),
            "init {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stderr)
    }

    /// curl in the `out` namespace (the rest of the cluster), `-i` added.
    pub fn curl_from_outside(&self, args: &[&str]) -> Response {
        curl(self.ns_outside(), &[], args)
    }

    /// curl in the pod as the app's user (uid/gid 1000).
    pub fn curl_as_app(&self, args: &[&str]) -> Response {
        curl(self.ns_pod(), &AS_APP, args)
    }

    /// Sends `line` to the peer's line server as the app's user and returns the answer, or `None`
    /// when there is no system python3 for the app's user to run.
    pub fn line_as_app(&self, line: &str) -> Option<String> {
        // The app's user cannot reach a python under /root (pyenv): only the system one will do.
        let python = "/usr/bin/python3";
        if !Path::new(python).is_file() {
            return None;
        }
        let client = "import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(sys.argv[3].encode() + b'\\n')
s.shutdown(socket.SHUT_WR)
print(s.makefile().read(), end='')
";
        let (ip, port) = (self.peer_ip.to_string(), PEER_TCP_PORT.to_string());
        let mut args = AS_APP.to_vec();
        args.extend([python, "-c", client, &ip, &port, line]);
        let out = self.ns_pod().exec(&args);
        assert!(out.status.success(), "{line}: {}", text(&out.stderr));
        Some(text(&out.stdout))
    }

    /// The access log once `ready` accepts it (the proxy flushes it every 100 ms).
    pub fn access_log_when(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        eventually_blocking(what, POD_WAIT, || {
            let log = self.read("access.log");
            if ready(&log) {
                Ok(log)
            } else {
                Err(format!(
                    "access log:\n{log}\n--- proxy's stderr:\n{}",
                    self.read("proxy.log")
                ))
            }
        })
    }

    /// The pod's nat table as `iptables-save` and `nft` show it, without comments and counters,
    /// and without the inert base chains iptables-nft leaves behind (see [`without_inert_chains`]).
    pub fn nat_state(&self) -> String {
        let mut all = normalise(&self.ns_pod().ok(&["iptables-save", "-t", "nat"]));
        if have("nft") {
            all.push_str("== nft\n");
            all.push_str(&without_inert_chains(&self.nft_ruleset()));
        }
        all
    }

    /// The pod's whole nftables ruleset, without counters.
    pub fn nft_ruleset(&self) -> String {
        normalise(&self.ns_pod().ok(&["nft", "list", "ruleset"]))
    }
}

fn curl(ns: &Netns, prefix: &[&str], args: &[&str]) -> Response {
    let mut all: Vec<&str> = prefix.to_vec();
    all.extend(["curl", "-sS", "-i", "--connect-timeout", "3", "-m", "10"]);
    all.extend_from_slice(args);
    let out = ns.exec(&all);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{all:?} in {} failed: {}{stdout}",
        ns.name,
        text(&out.stderr)
    );
    Response::parse(&stdout).unwrap_or_else(|e| panic!("{all:?}: {e}"))
}
