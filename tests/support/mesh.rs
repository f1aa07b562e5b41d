//! Two pods on this machine for the mTLS tests: each a network namespace with its app, its own
//! `amazing-proxy run` (a workload identity from [`super::identity`]) and its own `amazing-proxy
//! init` rules, joined by one veth pair (`eth0` on both sides) on a /30 of 198.18.0.0/15. Nothing
//! is added to the host's namespace; processes die, then namespaces go, on drop (also on panic).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use super::eventually_blocking;
use super::identity::{Ca, write_identity};
use super::netns::{Netns, POD_WAIT};
use super::process::{Workdir, bin, must};
use super::tools::{json_records, text, venv};

/// The port pod B's app (a static file server) listens on, and the file it serves.
pub const APP_PORT: u16 = 8080;
pub const APP_FILE: &str = "hello.txt";
pub const APP_CONTENT: &str = "hello over mutual TLS\n";

pub struct Mesh {
    // Fields drop in order: processes first, then the namespaces they ran in.
    work: Workdir,
    namespaces: Vec<Netns>,
    pub a_ip: Ipv4Addr,
    pub b_ip: Ipv4Addr,
}

/// A /30 of 198.18.0.0/15 from the pid (the namespaces are private, so a clash would be harmless):
/// pods A and B of every mesh this process starts, known before it starts.
pub fn addresses() -> [Ipv4Addr; 2] {
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (std::process::id() % 32768) * 4;
    [base + 1, base + 2].map(Ipv4Addr::from)
}

/// One pod of [`Mesh::start_pods`]: its SPIFFE ID, issued by the first of `trusts` (its `ca.crt`
/// holds them all), and more `run` arguments and environment variables.
pub struct Pod<'a> {
    pub id: &'a str,
    pub trusts: &'a [&'a Ca],
    pub args: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
}

impl Mesh {
    /// Pods A (identity `pod_a.0`, more `run` arguments `pod_a.1`) and B (likewise), both from
    /// `ca`. `Err` with the reason when this machine cannot run them (not root, no venv).
    pub fn start(ca: &Ca, pod_a: (&str, &[&str]), pod_b: (&str, &[&str])) -> Result<Mesh, String> {
        let pod = |(id, args)| Pod {
            id,
            trusts: std::slice::from_ref(&ca),
            args,
            env: &[],
        };
        Mesh::start_pods([pod(pod_a), pod(pod_b)])
    }

    /// Pods A and B, each with its own CAs.
    pub fn start_pods(pods: [Pod<'_>; 2]) -> Result<Mesh, String> {
        let python = venv()?.join("bin/python3");
        let [a_ip, b_ip] = addresses();
        let mut mesh = Mesh {
            work: Workdir::new()?,
            namespaces: vec![Netns::unique("ap-mtls-a")?, Netns::unique("ap-mtls-b")?],
            a_ip,
            b_ip,
        };
        let (a, b) = (&mesh.namespaces[0], &mesh.namespaces[1]);
        must(Command::new("ip").args([
            "-n", &a.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
            &b.name,
        ]));
        for (ns, ip) in [(a, a_ip), (b, b_ip)] {
            ns.ok(&["ip", "addr", "add", &format!("{ip}/30"), "dev", "eth0"]);
            ns.ok(&["ip", "link", "set", "eth0", "up"]);
        }

        // Pod B's app: a static file server.
        let root = mesh.path("b-root");
        std::fs::create_dir(&root).map_err(|e| e.to_string())?;
        std::fs::write(root.join(APP_FILE), APP_CONTENT).map_err(|e| e.to_string())?;
        let app = mesh.namespaces[1].cmd(&[
            python.to_str().ok_or("a UTF-8 venv path")?,
            "-m",
            "http.server",
            &APP_PORT.to_string(),
            "--bind",
            "0.0.0.0",
            "--directory",
            root.to_str().ok_or("a UTF-8 temp dir")?,
        ]);
        mesh.spawn(app, "b-app.log");

        for (i, (pod, spec)) in ["a", "b"].into_iter().zip(pods).enumerate() {
            let identity = mesh.path(&format!("{pod}-identity"));
            let issuer = spec
                .trusts
                .first()
                .ok_or("a pod trusts at least its issuer")?;
            write_identity(&identity, &issuer.issue(spec.id), spec.trusts);
            let identity = identity.display().to_string();
            let app = format!("127.0.0.1:{APP_PORT}");
            let mut args = vec![
                bin(),
                "run",
                "--access-log",
                "json",
                "--drain-delay",
                "0s",
                "--app",
                &app,
                "--identity-dir",
                &identity,
            ];
            args.extend_from_slice(spec.args);
            let mut proxy = mesh.namespaces[i].cmd(&args);
            proxy.envs(spec.env.iter().copied());
            let (out, err) = (format!("{pod}-access.log"), format!("{pod}-proxy.log"));
            mesh.work.spawn_logging(&mut proxy, &out, &err);
        }
        for (i, pod) in ["a", "b"].into_iter().enumerate() {
            mesh.wait_ok(
                i,
                "http://127.0.0.1:15000/ready",
                &format!("{pod}-proxy.log"),
            );
            let out = mesh.namespaces[i].exec(&[bin(), "init"]);
            if !out.status.success() {
                return Err(format!("init in pod {pod} failed: {}", text(&out.stderr)));
            }
        }
        let app_url = format!("http://127.0.0.1:{APP_PORT}/{APP_FILE}");
        mesh.wait_ok(1, &app_url, "b-app.log");
        Ok(mesh)
    }

    /// Runs `cmd` (made with `ns_a().cmd` or `ns_b().cmd`) until the mesh drops; output to `log`.
    pub fn spawn(&mut self, mut cmd: Command, log: &str) {
        self.work.spawn(&mut cmd, log);
    }

    /// Starts `args` in pod `pod` ("a" or "b"), its output in the file `log`; stopped on drop.
    pub fn spawn_in(&mut self, pod: &str, args: &[&str], log: &str) {
        let cmd = self.namespaces[usize::from(pod == "b")].cmd(args);
        self.spawn(cmd, log);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path(name)
    }

    pub fn read(&self, name: &str) -> String {
        self.work.read(name)
    }

    pub fn ns_a(&self) -> &Netns {
        &self.namespaces[0]
    }

    pub fn ns_b(&self) -> &Netns {
        &self.namespaces[1]
    }

    /// Starts capturing TCP on pod A's end of the link (tcpdump, each packet written as it comes).
    pub fn start_capture(&mut self) {
        let pcap = self.path("link.pcap").display().to_string();
        let cmd = self.namespaces[0].cmd(&[
            "tcpdump",
            "-Z",
            "root",
            "--immediate-mode",
            "-i",
            "eth0",
            "-n",
            "-U",
            "-w",
            &pcap,
            "tcp",
        ]);
        self.spawn(cmd, "tcpdump.log");
        eventually_blocking("tcpdump to listen", POD_WAIT, || {
            let log = self.read("tcpdump.log");
            if log.contains("listening on") {
                Ok(())
            } else {
                Err(log)
            }
        });
    }

    /// What the capture holds so far, packets with their payloads as text (`tcpdump -A`).
    pub fn captured(&self) -> String {
        let pcap = self.path("link.pcap").display().to_string();
        let out = self.namespaces[0].exec(&["tcpdump", "-r", &pcap, "-n", "-A"]);
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }

    /// curl in pod A as `uid` (1000: the app; 1337: the proxy's user, which `init` lets out
    /// unredirected); `Err` with curl's stderr.
    pub fn curl_in_a(&self, uid: &str, args: &[&str]) -> Result<String, String> {
        let mut all = vec![
            "setpriv",
            "--reuid",
            uid,
            "--regid",
            uid,
            "--clear-groups",
            "curl",
            "-sS",
            "--connect-timeout",
            "3",
            "-m",
            "10",
        ];
        all.extend_from_slice(args);
        let out = self.namespaces[0].exec(&all);
        if out.status.success() {
            Ok(text(&out.stdout))
        } else {
            Err(text(&out.stderr))
        }
    }

    /// The Prometheus text of pod `pod`'s ("a" or "b") admin port.
    pub fn metrics(&self, pod: &str) -> String {
        let ns = if pod == "a" { self.ns_a() } else { self.ns_b() };
        text(
            &ns.exec(&["curl", "-sS", "-m", "5", "http://127.0.0.1:15000/metrics"])
                .stdout,
        )
    }

    /// The first JSON access-log record of pod `pod` ("a" or "b") in `direction`.
    pub fn record(&self, pod: &str, direction: &str) -> serde_json::Value {
        let file = format!("{pod}-access.log");
        eventually_blocking(&format!("a {direction} record in {file}"), POD_WAIT, || {
            json_records(&self.read(&file))
                .into_iter()
                .find(|r| r["direction"] == direction)
                .ok_or_else(|| self.read(&file))
        })
    }

    /// Waits until `url` answers 2xx in pod `i`; fails at once if a process exited.
    fn wait_ok(&mut self, i: usize, url: &str, log: &str) {
        eventually_blocking(&format!("{url} to answer"), POD_WAIT, || {
            let out = self.namespaces[i].exec(&["curl", "-fsS", "-o", "/dev/null", "-m", "1", url]);
            if out.status.success() {
                return Ok(());
            }
            let why = format!("{}\n--- {log}:\n{}", text(&out.stderr), self.read(log));
            if self.work.any_exited() {
                panic!("a process exited: {why}");
            }
            Err(why)
        })
    }
}
