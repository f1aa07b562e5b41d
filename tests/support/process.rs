//! Processes: the binary under test, commands run to completion within a bound, background
//! processes killed (with their whole process group) on drop, and the proxy under test.
//!
//! Every command gets a clean environment of ours: inherited `AMAZING_PROXY_*` variables (the
//! test runner's own, such as `AMAZING_PROXY_TEST_SKIP_LOG`) are removed, so only what a test sets
//! reaches the binary.

use std::io::{Read, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Empty;
use serde_json::Value;

use super::http::{Reply, get_request, send};
use super::{WAIT, eventually, metrics, tools};

/// Longest any command run to completion may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_amazing-proxy")
}

/// Removes every inherited `AMAZING_PROXY_*` variable from `cmd`'s environment (those the test
/// set on `cmd` itself stay).
pub fn scrub(cmd: &mut Command) -> &mut Command {
    let set: Vec<_> = cmd
        .get_envs()
        .filter(|(_, value)| value.is_some())
        .map(|(key, _)| key.to_owned())
        .collect();
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AMAZING_PROXY_") && !set.contains(&key) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// A `Command` for the binary: scrubbed, with `AMAZING_PROXY_LOG=info`.
pub fn command() -> Command {
    command_under(&[])
}

/// [`command`] run by `wrapper` (a program and its arguments that exec the binary, such as
/// `prlimit --nofile=64`); the process is the binary's.
pub fn command_under(wrapper: &[&str]) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin());
            cmd
        }
        None => Command::new(bin()),
    };
    scrub(&mut cmd).env("AMAZING_PROXY_LOG", "info");
    cmd
}

/// Runs `cmd` (scrubbed, stdin empty) to completion; kills it after [`COMMAND_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Output {
    run_with_input(cmd, b"")
}

/// [`run`] with `input` written to its stdin.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = scrub(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin piped");
    // A program that exits without reading its input is not an error here.
    let _ = stdin.write_all(input);
    drop(stdin);
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {cmd:?}: {e}")),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
    }
}

/// [`run`], required to succeed; returns stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        tools::text(&out.stdout),
        tools::text(&out.stderr)
    );
    tools::text(&out.stdout)
}

/// Runs `run` with `args` (and `envs`) while this test holds the port `--inbound` points at (`HELD`
/// in `args` is that address): had the proxy tried to bind before validating, it would fail with
/// "cannot bind" instead. It must exit non-zero, by itself, naming each of `names`; returns its
/// stderr.
pub fn rejected_at_start(args: &[&str], envs: &[(&str, &str)], names: &[&str]) -> String {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().expect("held address").port();
    let held_addr = format!("127.0.0.1:{port}");
    let mut cmd = command();
    cmd.arg("run").args(["--outbound", "off"]);
    let mut args: Vec<String> = args.iter().map(|a| a.replace("HELD", &held_addr)).collect();
    if !args.iter().any(|a| a == "--inbound") {
        args.extend(["--inbound".into(), held_addr.clone()]);
    }
    if !args.iter().any(|a| a == "--admin") {
        args.extend(["--admin".into(), "127.0.0.1:0".into()]);
    }
    cmd.args(&args).envs(envs.iter().copied());
    let out = run(&mut cmd);
    let stderr = tools::text(&out.stderr);
    let code = out.status.code();
    assert_ne!(code, Some(0), "accepted {args:?} {envs:?}");
    assert!(code.is_some(), "killed by a signal with {args:?} {envs:?}");
    assert!(
        !stderr.contains("cannot bind") && !stderr.contains("listening"),
        "bound before validating {args:?} {envs:?}:\n{stderr}"
    );
    for name in names {
        assert!(
            stderr.contains(name),
            "the message for {args:?} {envs:?} does not mention {name:?}:\n{stderr}"
        );
    }
    drop(held);
    stderr
}

/// A background process in a process group of its own: the whole group (a server's workers too)
/// is killed, and the process reaped, on drop.
pub struct Background {
    child: Child,
}

impl Background {
    /// Starts `cmd` (scrubbed, stdin empty; stdout and stderr as the caller set them).
    pub fn spawn(cmd: &mut Command) -> Background {
        let child = scrub(cmd)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Background { child }
    }

    /// Starts `cmd` with stdout and stderr written to files (the same path for both is fine).
    pub fn logging(cmd: &mut Command, stdout: &Path, stderr: &Path) -> Background {
        let out = std::fs::File::create(stdout).expect("creating a log file");
        let err = if stdout == stderr {
            out.try_clone().expect("duplicating a log file descriptor")
        } else {
            std::fs::File::create(stderr).expect("creating a log file")
        };
        Background::spawn(cmd.stdout(out).stderr(err))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Shared = Arc<Mutex<Vec<u8>>>;

fn text_of(buf: &Shared) -> String {
    tools::text(&buf.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Copies `from` into `into` on a thread of its own; the handle is finished at end of file.
fn capture(mut from: impl Read + Send + 'static, into: Shared) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match from.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// `amazing-proxy run` in front of `app`: `--inbound 127.0.0.1:0` (unless [`Self::inbound`]),
/// `--admin 127.0.0.1:0`, `--outbound off`, `--proxy-mark 0` (no SO_MARK, so no privilege needed),
/// then the test's own arguments.
pub struct ProxyBuilder {
    app: SocketAddr,
    wrapper: Vec<String>,
    inbound: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl ProxyBuilder {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Runs the binary through `wrapper` (see [`command_under`]).
    pub fn under(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        self
    }

    /// The inbound listener's address (a fixed port, when a test needs to know it in advance).
    pub fn inbound(mut self, addr: &str) -> Self {
        self.inbound = addr.into();
        self
    }

    pub async fn start(self) -> Proxy {
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        let mut cmd = command_under(&wrapper);
        cmd.arg("run")
            .args(["--inbound", &self.inbound, "--admin", "127.0.0.1:0"])
            .args(["--outbound", "off", "--proxy-mark", "0", "--app"])
            .arg(self.app.to_string())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn amazing-proxy run");
        let stdout = Shared::default();
        let stderr = Shared::default();
        let readers = [
            capture(child.stdout.take().expect("child stdout"), stdout.clone()),
            capture(child.stderr.take().expect("child stderr"), stderr.clone()),
        ];
        let mut proxy = Proxy {
            pid: child.id(),
            child,
            inbound: "0.0.0.0:0".parse().expect("placeholder address"),
            admin: "0.0.0.0:0".parse().expect("placeholder address"),
            app: self.app,
            stdout,
            stderr,
            readers,
        };
        let (inbound, admin) = eventually("the proxy's `listening` line", WAIT, || {
            let found = proxy.listening_line();
            if found.is_none()
                && let Ok(Some(status)) = proxy.child.try_wait()
            {
                panic!(
                    "amazing-proxy exited with {status} before listening; stderr:\n{}",
                    proxy.stderr()
                );
            }
            async move { found }
        })
        .await;
        proxy.inbound = inbound;
        proxy.admin = admin;
        proxy
    }
}

/// A running proxy. Killed and reaped on drop.
pub struct Proxy {
    child: Child,
    pub pid: u32,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub app: SocketAddr,
    stdout: Shared,
    stderr: Shared,
    /// The threads reading stdout and stderr: what the proxy wrote is all captured once they end.
    readers: [std::thread::JoinHandle<()>; 2],
}

impl Proxy {
    pub fn builder(app: SocketAddr) -> ProxyBuilder {
        ProxyBuilder {
            app,
            wrapper: Vec::new(),
            inbound: "127.0.0.1:0".into(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    pub async fn start(app: SocketAddr, args: &[&str]) -> Proxy {
        Proxy::builder(app).args(args.iter().copied()).start().await
    }

    /// Parses `listening inbound=IP:PORT outbound=off admin=IP:PORT app=...`.
    fn listening_line(&self) -> Option<(SocketAddr, SocketAddr)> {
        let text = self.stderr();
        let line = text.lines().find(|l| l.contains("listening"))?;
        let field = |name: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse().ok())
        };
        Some((field("inbound=")?, field("admin=")?))
    }

    /// Everything the proxy wrote to stdout (the access log) so far.
    pub fn stdout(&self) -> String {
        text_of(&self.stdout)
    }

    /// Everything the proxy wrote to stderr (diagnostics) so far.
    pub fn stderr(&self) -> String {
        text_of(&self.stderr)
    }

    /// Waits until stderr satisfies `pred` (a thread reads it, so a line the proxy wrote before
    /// an event the test saw may not be captured yet); returns the whole of stderr then.
    pub async fn wait_for_stderr(&self, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_output(&self.stderr, "the proxy's stderr to match", pred, WAIT)
            .await
    }

    /// Waits until the access log satisfies `pred`; returns the whole access log then.
    pub async fn wait_for_log(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        self.wait_for_output(&self.stdout, "the access log to match", pred, timeout)
            .await
    }

    /// Waits until `output` (stdout or stderr) satisfies `pred`; a timeout shows both.
    async fn wait_for_output(
        &self,
        output: &Shared,
        what: &str,
        pred: impl Fn(&str) -> bool,
        timeout: Duration,
    ) -> String {
        eventually(what, timeout, || {
            let text = text_of(output);
            let found = if pred(&text) {
                Ok(text)
            } else {
                Err(format!(
                    "stdout:\n{}\nstderr:\n{}",
                    self.stdout(),
                    self.stderr()
                ))
            };
            async move { found }
        })
        .await
    }

    /// The JSON access-log records written so far (lines that are not JSON fail the test).
    pub fn json_records(&self) -> Vec<Value> {
        tools::json_records(&self.stdout())
    }

    /// Waits for the first JSON access-log record that satisfies `pred`.
    pub async fn wait_record(&self, pred: impl Fn(&Value) -> bool) -> Value {
        eventually("a matching access-log record", WAIT, || {
            let found = self
                .json_records()
                .into_iter()
                .find(|r| pred(r))
                .ok_or_else(|| format!("access log:\n{}", self.stdout()));
            async move { found }
        })
        .await
    }

    /// Waits for the JSON access-log record whose `request_id` is `id`.
    pub async fn json_record(&self, id: &str) -> Value {
        self.wait_record(|r| r["request_id"] == id).await
    }

    pub async fn admin_get(&self, path: &str) -> Reply {
        send(self.admin, get_request(self.admin, path)).await
    }

    pub async fn admin_post(&self, path: &str) -> Reply {
        let req = Request::post(path)
            .header("host", self.admin.to_string())
            .body(Empty::<Bytes>::new())
            .expect("admin POST request");
        send(self.admin, req).await
    }

    pub async fn metrics(&self) -> String {
        let reply = self.admin_get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK, "GET /metrics");
        reply.text()
    }

    /// Waits until [`metrics::metric`]`(name, labels)` reaches at least `min`; returns its value.
    pub async fn wait_metric(&self, name: &str, labels: &[&str], min: f64) -> f64 {
        eventually("a metric to reach its value", WAIT, || async move {
            let text = self.metrics().await;
            match metrics::metric(&text, name, labels) {
                Some(v) if v >= min => Ok(v),
                v => Err(format!("{name}{labels:?} is {v:?} < {min}:\n{text}")),
            }
        })
        .await
    }

    /// Waits until the proxy holds no inbound connection (by its own count).
    pub async fn wait_no_open_connections(&self) {
        eventually("open connections to return to 0", WAIT, || async {
            let text = self.metrics().await;
            let open = metrics::metric(
                &text,
                "amazing_proxy_open_connections",
                &["direction=\"inbound\""],
            );
            (open == Some(0.0)).then_some(())
        })
        .await
    }

    /// GET `path` through the proxy on a new connection.
    pub async fn get(&self, path: &str) -> Reply {
        send(self.inbound, get_request(self.inbound, path)).await
    }

    /// Sends a signal with the `kill` command (`TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// Waits for the process to exit by itself and for everything it wrote to be captured.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        eventually("the proxy to exit", timeout, || {
            let exited = match self.child.try_wait().expect("try_wait on the proxy") {
                Some(status) if self.readers.iter().all(|r| r.is_finished()) => Ok(status),
                Some(status) => Err(format!("exited with {status}; its output not yet all read")),
                None => Err(format!("stderr:\n{}", text_of(&self.stderr))),
            };
            async move { exited }
        })
        .await
    }

    /// Peak resident set size (VmHWM) in bytes, from /proc.
    pub fn peak_rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("read /proc/PID/status of the proxy");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/PID/status");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("VmHWM value in kB");
        kib * 1024
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test host's scratch directory and the processes it started, their output logged there.
/// Dropped, it stops the processes first, then removes the directory.
pub struct Workdir {
    procs: Vec<Background>,
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new() -> Result<Workdir, String> {
        Ok(Workdir {
            procs: Vec::new(),
            dir: tempfile::tempdir().map_err(|e| format!("creating a temp dir: {e}"))?,
        })
    }

    /// Starts `cmd` with its stdout and stderr in the files `out` and `err` of the directory.
    pub fn spawn_logging(&mut self, cmd: &mut Command, out: &str, err: &str) {
        let (out, err) = (self.path(out), self.path(err));
        self.procs.push(Background::logging(cmd, &out, &err));
    }

    /// Starts `cmd` with both outputs in `log`.
    pub fn spawn(&mut self, cmd: &mut Command, log: &str) {
        self.spawn_logging(cmd, log, log);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Whether any process it started has exited.
    pub fn any_exited(&mut self) -> bool {
        self.procs.iter_mut().any(|p| !p.is_running())
    }
}
