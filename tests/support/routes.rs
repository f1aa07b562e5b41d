//! A pod whose app calls a service of three endpoints through its sidecar, for the routes tests
//! (`run --routes`, issue 19). All namespaces are created here, named `ap-rt-<pid>-<n>-<role>`:
//!
//! - `pod`: the proxy (`run --routes FILE`, as root: its socket mark keeps its own connections out
//!   of the rules) and `init`'s redirect rules; the test's clients (curl, the Python apps of
//!   tests/fixtures/routes_apps, also as root, so redirected) run here and dial [`Lab::vip`], an
//!   address nobody holds (a ClusterIP), or an endpoint's own address;
//! - `svc`: the three endpoints, three addresses on one interface ([`Lab::endpoints`]), each with
//!   its own HTTP/1.1+h2c server on [`HTTP_PORT`] and grpcio server on [`GRPC_PORT`] when a test
//!   starts them, and [`Lab::dead`], an address where nothing listens (connections refused);
//! - `dns` (with [`Lab::with_dns`]): dnsmasq answering [`DNS_NAME`] with the three addresses;
//!   the pod's resolv.conf names it (`/etc/netns/<pod>/resolv.conf`, which `ip netns exec` mounts
//!   over /etc/resolv.conf for the processes it starts; removed on drop).
//!
//! Addresses are in 198.18.0.0/15 (a /26 from the pid and a counter); nothing is added to the
//! host's namespace. Processes die (whole process groups), then /etc/netns/<pod> and the
//! namespaces go, on drop, also when a test panics.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::eventually_blocking;
use super::identity::{Ca, write_identity};
use super::metrics::metric;
use super::netns::{Netns, Response};
use super::process::{Workdir, bin, must, run};
use super::tools::{json_records, missing, text, venv};

/// The endpoints' HTTP/1.1+h2c port, and the port the app dials.
pub const HTTP_PORT: u16 = 9080;
/// The endpoints' gRPC port.
pub const GRPC_PORT: u16 = 50051;
/// The headless-Service-like name dnsmasq answers with the three endpoints.
pub const DNS_NAME: &str = "web-headless.rt.test";
/// Longest a condition of the lab is polled for.
pub const LAB_WAIT: Duration = Duration::from_secs(20);
/// What each endpoint of [`Lab::endpoint`] answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// 200 with its name (the path may ask for `/sleep/MS` or `/status/CODE`).
    Ok,
    /// 503 to every request.
    Fail503,
    /// Reads each request whole, logs it, then resets the connection.
    Reset,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Fail503 => "fail503",
            Mode::Reset => "reset",
        }
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Removes `/etc/netns/<pod>` on drop, and `/etc/netns` itself when this made it and it is empty.
struct EtcNetns {
    dir: PathBuf,
    made_parent: bool,
}

impl Drop for EtcNetns {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.made_parent
            && let Some(parent) = self.dir.parent()
        {
            // Fails, and leaves it, when another test's directory is in it.
            let _ = std::fs::remove_dir(parent);
        }
    }
}

pub struct Lab {
    // Fields drop in order: processes first, then /etc/netns/<pod>, then the namespaces.
    work: Workdir,
    etc: Option<EtcNetns>,
    namespaces: Vec<Netns>,
    python: PathBuf,
    /// The service's address as the app dials it: nobody holds it, the redirect takes it.
    pub vip: Ipv4Addr,
    /// The three endpoints' addresses (in `svc`).
    pub endpoints: [Ipv4Addr; 3],
    /// An address in `svc` where nothing listens: a connection to it is refused.
    pub dead: Ipv4Addr,
    pub dns_ip: Option<Ipv4Addr>,
    /// The pod's address (inbound requests from `svc` go to it).
    pub pod_ip: Ipv4Addr,
    base: u32,
}

impl Drop for Lab {
    /// A failing test shows the last of the proxy's logs (the directory goes with the lab).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for log in ["proxy.log", "access.log"] {
            let text = self.read(log);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            eprintln!(
                "--- the last {} lines of {log}:\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// The fixtures' directory.
fn apps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/routes_apps")
}

/// The venv's python, with grpcio and h2 (`Err`: what is missing and how to get it).
fn python() -> Result<PathBuf, String> {
    let python = venv()?.join("bin/python3");
    let out = run(Command::new(&python).args(["-c", "import grpc, h2"]));
    if out.status.success() {
        Ok(python)
    } else {
        Err(format!(
            "grpcio and h2 not in the test venv ({}): run scripts/deps.sh --tests",
            text(&out.stderr).trim()
        ))
    }
}

impl Lab {
    /// The pod and the service's namespace, joined; nothing started yet. `Err` with the reason
    /// when this machine cannot run it (not root, a tool or the venv missing).
    pub fn new() -> Result<Lab, String> {
        if let Some(why) = missing(&["ip", "curl", "iptables"]) {
            return Err(why);
        }
        let python = python()?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ap-rt-{}-{n}", std::process::id());
        // A /26 of 198.18.0.0/15 (2048 of them): .0/27 the service's link, .32/30 the DNS link.
        let slot = (std::process::id() % 256) * 8 + n % 8;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + slot * 64;
        let ip = |i: u32| Ipv4Addr::from(base + i);
        let mut lab = Lab {
            work: Workdir::new()?,
            etc: None,
            namespaces: Vec::new(),
            python,
            vip: ip(20),
            endpoints: [ip(2), ip(3), ip(4)],
            dead: ip(5),
            dns_ip: None,
            pod_ip: ip(1),
            base,
        };
        for role in ["pod", "svc"] {
            lab.namespaces.push(Netns::new(format!("{prefix}-{role}"))?);
        }
        let (pod, svc) = (&lab.namespaces[0], &lab.namespaces[1]);
        must(Command::new("ip").args([
            "-n", &pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", &svc.name,
        ]));
        pod.ok(&["ip", "addr", "add", &format!("{}/27", ip(1)), "dev", "eth0"]);
        pod.ok(&["ip", "link", "set", "eth0", "up"]);
        for addr in [ip(2), ip(3), ip(4), ip(5)] {
            svc.ok(&["ip", "addr", "add", &format!("{addr}/27"), "dev", "eth0"]);
        }
        svc.ok(&["ip", "link", "set", "eth0", "up"]);
        Ok(lab)
    }

    /// Adds the `dns` namespace, with dnsmasq answering [`DNS_NAME`] with the three endpoints'
    /// addresses (TTL 1 s), and makes it the pod's name server. Call before [`Lab::start_proxy`].
    pub fn with_dns(&mut self) -> Result<(), String> {
        if let Some(why) = missing(&["dnsmasq"]) {
            return Err(why);
        }
        let pod_name = self.namespaces[0].name.clone();
        let dns = Netns::new(format!("{}-dns", pod_name.trim_end_matches("-pod")))?;
        let (pod_side, dns_ip) = (
            Ipv4Addr::from(self.base + 33),
            Ipv4Addr::from(self.base + 34),
        );
        must(Command::new("ip").args([
            "-n", &pod_name, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0",
            "netns", &dns.name,
        ]));
        let pod = &self.namespaces[0];
        pod.ok(&[
            "ip",
            "addr",
            "add",
            &format!("{pod_side}/30"),
            "dev",
            "eth1",
        ]);
        pod.ok(&["ip", "link", "set", "eth1", "up"]);
        dns.ok(&["ip", "addr", "add", &format!("{dns_ip}/30"), "dev", "eth0"]);
        dns.ok(&["ip", "link", "set", "eth0", "up"]);

        let hosts: String = self
            .endpoints
            .iter()
            .map(|ip| format!("{ip} {DNS_NAME}\n"))
            .collect();
        std::fs::write(self.work.path("dns-hosts"), hosts).map_err(|e| e.to_string())?;
        let mut dnsmasq = dns.cmd(&[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--log-facility=-",
            "--log-queries",
            "--user=root",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={dns_ip}"),
            &format!("--addn-hosts={}", self.work.path("dns-hosts").display()),
            &format!("--pid-file={}", self.work.path("dnsmasq.pid").display()),
            "--local=/rt.test/",
            "--local-ttl=1",
        ]);
        self.work.spawn(&mut dnsmasq, "dnsmasq.log");
        self.namespaces.push(dns);
        self.dns_ip = Some(dns_ip);

        let etc = PathBuf::from("/etc/netns").join(&pod_name);
        let made_parent = !Path::new("/etc/netns").exists();
        std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
        self.etc = Some(EtcNetns {
            dir: etc.clone(),
            made_parent,
        });
        std::fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {dns_ip}\noptions timeout:1 attempts:2\n"),
        )
        .map_err(|e| format!("{}: {e}", etc.display()))?;

        eventually_blocking("dnsmasq to answer", LAB_WAIT, || {
            let out = self.pod().exec(&["getent", "ahostsv4", DNS_NAME]);
            let got = text(&out.stdout);
            let all = self
                .endpoints
                .iter()
                .all(|ip| got.contains(&ip.to_string()));
            all.then_some(()).ok_or_else(|| {
                format!(
                    "getent: {got}\n--- dnsmasq.log:\n{}",
                    self.read("dnsmasq.log")
                )
            })
        });
        Ok(())
    }

    pub fn pod(&self) -> &Netns {
        &self.namespaces[0]
    }

    pub fn svc(&self) -> &Netns {
        &self.namespaces[1]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.work.path(name)
    }

    pub fn read(&self, name: &str) -> String {
        self.work.read(name)
    }

    /// `ip:port` of endpoint `i` on `port`.
    pub fn addr(&self, i: usize, port: u16) -> String {
        format!("{}:{port}", self.endpoints[i])
    }

    /// Starts the HTTP/1.1+h2c server `name` on endpoint `i`; its log is `<name>.log`.
    pub fn endpoint(&mut self, i: usize, name: &str, mode: Mode) {
        let (ip, port) = (self.endpoints[i].to_string(), HTTP_PORT.to_string());
        self.start_app(&["endpoint.py", name, &ip, &port, mode.arg()], name);
    }

    /// Starts the HTTP/1.1+h2c server `name` on [`Lab::dead`]'s address (an app with no proxy in
    /// front of it, in the mutual-TLS tests); returns that address.
    pub fn bare_endpoint(&mut self, name: &str) -> String {
        let (ip, port) = (self.dead.to_string(), HTTP_PORT.to_string());
        self.start_app(&["endpoint.py", name, &ip, &port, "ok"], name);
        ip
    }

    /// Starts the grpcio server `name` on endpoint `i` (`unavailable`: every call fails).
    pub fn grpc_endpoint(&mut self, i: usize, name: &str, unavailable: bool) {
        let (ip, port) = (self.endpoints[i].to_string(), GRPC_PORT.to_string());
        let mode = if unavailable { "unavailable" } else { "ok" };
        self.start_app(&["grpc_endpoint.py", name, &ip, &port, mode], name);
    }

    /// Starts the pod's own app: the HTTP/1.1+h2c server `name` on 127.0.0.1:80 in the pod
    /// (`run`'s default `--app`), for inbound routes.
    pub fn pod_app(&mut self, name: &str) {
        self.start_app_in(0, &["endpoint.py", name, "127.0.0.1", "80", "ok"], name);
    }

    fn start_app(&mut self, args: &[&str], name: &str) {
        self.start_app_in(1, args, name);
    }

    fn start_app_in(&mut self, ns: usize, args: &[&str], name: &str) {
        let script = apps().join(args[0]);
        let mut all = vec![
            self.python.to_str().expect("a UTF-8 venv path"),
            "-u",
            script.to_str().expect("a UTF-8 path"),
        ];
        all.extend_from_slice(&args[1..]);
        let mut cmd = self.namespaces[ns].cmd(&all);
        let log = format!("{name}.log");
        self.work.spawn(&mut cmd, &log);
        eventually_blocking(&format!("{name} to listen"), LAB_WAIT, || {
            let log = self.read(&format!("{name}.log"));
            log.contains("\"listening\"").then_some(()).ok_or(log)
        });
    }

    /// The requests (HTTP) or calls (gRPC) endpoint `name` has logged so far.
    pub fn seen(&self, name: &str) -> Vec<Value> {
        self.read(&format!("{name}.log"))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["event"] == "request" || v["event"] == "call")
            .collect()
    }

    /// Writes the routes file: a new file renamed over the old, so the proxy never reads half.
    pub fn write_routes(&self, yaml: &str) {
        let staged = self.path("routes.yaml.new");
        std::fs::write(&staged, yaml).expect("writing the routes file");
        std::fs::rename(&staged, self.path("routes.yaml")).expect("renaming the routes file");
    }

    /// Starts `amazing-proxy run --routes` with `yaml` (JSON access log on stdout, in
    /// `access.log`), waits for `/ready`, then applies `init`'s rules in the pod.
    pub fn start_proxy(&mut self, yaml: &str) {
        self.start_proxy_with(yaml, &[]);
    }

    /// Gives each endpoint its own proxy, as a meshed pod has: `run` with identity
    /// [`endpoint_id`]`(i)` (issued by `ca`, which it trusts) serving HBONE on the endpoint's
    /// address, port 15008, in front of its app on [`HTTP_PORT`]; its access log is
    /// `ep-proxy-<i>.log`; `extra`: more `run` arguments for each. Returns the pod's identity
    /// directory (`client_id`, from `ca`), for [`Lab::start_proxy_with`]'s `--identity-dir`.
    pub fn mesh_endpoints(&mut self, ca: &Ca, client_id: &str, extra: &[&str]) -> String {
        for i in 0..self.endpoints.len() {
            let dir = self.path(&format!("ep-identity-{i}"));
            write_identity(&dir, &ca.issue(&endpoint_id(i)), &[ca]);
            let ip = self.endpoints[i];
            let at = |port: u16| format!("{ip}:{port}");
            let (dir, app, hbone) = (dir.display().to_string(), at(HTTP_PORT), at(15008));
            let (inbound, outbound, admin) = (at(15006), at(15001), at(15000));
            let mut proxy = self.svc().cmd(&[
                bin(),
                "run",
                "--access-log",
                "json",
                "--drain-delay",
                "0s",
                "--identity-dir",
                &dir,
                "--app",
                &app,
                "--hbone",
                &hbone,
                "--inbound",
                &inbound,
                "--outbound",
                &outbound,
                "--admin",
                &admin,
            ]);
            proxy.args(extra);
            let log = format!("ep-proxy-{i}.log");
            self.work
                .spawn_logging(&mut proxy, &log, &format!("ep-proxy-{i}.err"));
            let ready = format!("http://{admin}/ready");
            eventually_blocking(
                &format!("endpoint {i}'s proxy to be ready"),
                LAB_WAIT,
                || {
                    let out =
                        self.svc()
                            .exec(&["curl", "-fsS", "-o", "/dev/null", "-m", "1", &ready]);
                    out.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| self.read(&format!("ep-proxy-{i}.err")))
                },
            );
        }
        let dir = self.path("pod-identity");
        write_identity(&dir, &ca.issue(client_id), &[ca]);
        dir.display().to_string()
    }

    /// [`Lab::start_proxy`] with more `run` arguments.
    pub fn start_proxy_with(&mut self, yaml: &str, extra: &[&str]) {
        self.write_routes(yaml);
        let routes = self.path("routes.yaml").display().to_string();
        let ports = format!("{HTTP_PORT},{GRPC_PORT}");
        let mut proxy = self.pod().cmd(&[
            bin(),
            "run",
            "--access-log",
            "json",
            "--drain-delay",
            "0s",
            "--http-ports",
            &ports,
            "--routes",
            &routes,
        ]);
        proxy.args(extra);
        proxy.env("AMAZING_PROXY_LOG", "info");
        self.work
            .spawn_logging(&mut proxy, "access.log", "proxy.log");
        eventually_blocking("the proxy to be ready", LAB_WAIT, || {
            let out = self.pod().exec(&[
                "curl",
                "-fsS",
                "-o",
                "/dev/null",
                "-m",
                "1",
                "http://127.0.0.1:15000/ready",
            ]);
            if out.status.success() {
                return Ok(());
            }
            let why = format!(
                "{}--- proxy.log:\n{}",
                text(&out.stderr),
                self.read("proxy.log")
            );
            if self.work.any_exited() {
                panic!("a process of the lab exited: {why}");
            }
            Err(why)
        });
        let out = self.pod().exec(&[bin(), "init"]);
        assert!(out.status.success(), "init: {}", text(&out.stderr));
    }

    /// The proxy's diagnostics so far (its stderr).
    pub fn proxy_log(&self) -> String {
        self.read("proxy.log")
    }

    /// curl in the pod (`-sS -i`, bounded), its output parsed; fails the test if curl fails.
    pub fn curl(&self, args: &[&str]) -> Response {
        let out = self.curl_raw(&[&["-i"], args].concat());
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "curl {args:?} failed: {}{stdout}",
            text(&out.stderr)
        );
        Response::parse(&stdout).unwrap_or_else(|e| panic!("curl {args:?}: {e}"))
    }

    /// curl in the pod (`-sS`, bounded), as it came out.
    pub fn curl_raw(&self, args: &[&str]) -> Output {
        let mut all = vec!["curl", "-sS", "--connect-timeout", "3", "-m", "15"];
        all.extend_from_slice(args);
        self.pod().exec(&all)
    }

    /// `curl --resolve HOST:PORT:VIP http://HOST:PORT/PATH`: the app calling the service by name.
    pub fn get(&self, host: &str, path: &str) -> Response {
        let resolve = format!("{host}:{HTTP_PORT}:{}", self.vip);
        self.curl(&[
            "--resolve",
            &resolve,
            &format!("http://{host}:{HTTP_PORT}{path}"),
        ])
    }

    /// A fixture app (a script of tests/fixtures/routes_apps) in the pod, to completion (30 s at
    /// most); returns its stdout, failing the test if it fails.
    pub fn app(&self, script: &str, args: &[&str]) -> String {
        let script = apps().join(script);
        let mut all = vec![
            self.python.to_str().expect("a UTF-8 venv path"),
            script.to_str().expect("a UTF-8 path"),
        ];
        all.extend_from_slice(args);
        let out = self.pod().exec(&all);
        assert!(
            out.status.success(),
            "{script:?} {args:?} failed: {}{}",
            text(&out.stderr),
            text(&out.stdout)
        );
        text(&out.stdout)
    }

    /// A fixture app started in the background in the pod (output in `log`), or any command
    /// when `script` has no `.py`.
    pub fn spawn_app(&mut self, script: &str, args: &[&str], log: &str) {
        self.spawn_app_in(0, script, args, log);
    }

    /// [`Lab::spawn_app`] in the service's namespace (a client of the pod's inbound side).
    pub fn spawn_app_in_svc(&mut self, script: &str, args: &[&str], log: &str) {
        self.spawn_app_in(1, script, args, log);
    }

    fn spawn_app_in(&mut self, ns: usize, script: &str, args: &[&str], log: &str) {
        let path = apps().join(script);
        let mut all: Vec<&str> = Vec::new();
        if script.ends_with(".py") {
            all.extend([
                self.python.to_str().expect("a UTF-8 venv path"),
                "-u",
                path.to_str().expect("a UTF-8 path"),
            ]);
        } else {
            all.push(script);
        }
        all.extend_from_slice(args);
        let mut cmd = self.namespaces[ns].cmd(&all);
        self.work.spawn(&mut cmd, log);
    }

    /// The JSON line a background app wrote to `log` once it has (its summary).
    pub fn summary(&self, log: &str) -> Value {
        eventually_blocking(&format!("the summary in {log}"), LAB_WAIT, || {
            let text = self.read(log);
            serde_json::from_str::<Value>(text.trim()).map_err(|e| format!("{e}: {text}"))
        })
    }

    /// The gRPC app: `grpc_client.py` to the VIP with `authority`, `calls` calls and `extra`
    /// options; one JSON value per call.
    pub fn grpc_calls(&self, authority: &str, calls: usize, extra: &[&str]) -> Vec<Value> {
        let target = format!("{}:{GRPC_PORT}", self.vip);
        let calls = calls.to_string();
        let mut args = vec![target.as_str(), authority, calls.as_str()];
        args.extend_from_slice(extra);
        json_records(&self.app("grpc_client.py", &args))
    }

    /// The access log's records so far.
    pub fn records(&self) -> Vec<Value> {
        json_records(&self.read("access.log"))
    }

    /// The access log's records of route `route`, once there are at least `n` of them.
    pub fn route_records(&self, route: &str, n: usize) -> Vec<Value> {
        eventually_blocking(&format!("{n} records of route {route}"), LAB_WAIT, || {
            let found: Vec<Value> = self
                .records()
                .into_iter()
                .filter(|r| r["route"] == route)
                .collect();
            if found.len() >= n {
                Ok(found)
            } else {
                Err(format!(
                    "{} of {n}; access log:\n{}\n--- proxy.log:\n{}",
                    found.len(),
                    self.read("access.log"),
                    self.proxy_log()
                ))
            }
        })
    }

    /// The access log's records with `"error": kind`, once there are `n` of them.
    pub fn error_records(&self, kind: &str, n: usize) -> Vec<Value> {
        eventually_blocking(&format!("{n} records of error {kind}"), LAB_WAIT, || {
            let found: Vec<Value> = self
                .records()
                .into_iter()
                .filter(|r| r["error"] == kind)
                .collect();
            if found.len() == n {
                Ok(found)
            } else {
                Err(format!("{} of {n}", found.len()))
            }
        })
    }

    /// GET on the admin port (in the pod): (status, body).
    pub fn admin(&self, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:15000{path}");
        let out = self.curl_raw(&["-w", "\n%{http_code}", &url]);
        let all = text(&out.stdout);
        let (body, code) = all.rsplit_once('\n').unwrap_or(("", &all));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `amazing_proxy_<name>` with these labels (summed), 0 when absent.
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let (status, body) = self.admin("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        metric(&body, &format!("amazing_proxy_{name}"), labels).unwrap_or(0.0)
    }

    /// Waits until the metric is `want`.
    pub fn wait_metric(&self, name: &str, labels: &[&str], want: f64) {
        eventually_blocking(&format!("{name}{labels:?} to be {want}"), LAB_WAIT, || {
            let got = self.metric(name, labels);
            (got == want).then_some(()).ok_or_else(|| {
                let (_, body) = self.admin("/metrics");
                let lines: Vec<&str> = body.lines().filter(|l| l.contains(name)).collect();
                format!("it is {got}:\n{}", lines.join("\n"))
            })
        });
    }
}

/// The SPIFFE ID of endpoint `i`'s proxy ([`Lab::mesh_endpoints`]).
pub fn endpoint_id(i: usize) -> String {
    format!("spiffe://cluster.local/ns/rt/sa/ep-{i}")
}

/// How many of `names` each name occurs: `names` as counted.
pub fn tally<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for n in names {
        *counts.entry(n.to_string()).or_insert(0) += 1;
    }
    counts
}
