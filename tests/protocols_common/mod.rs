//! Shared harness for the protocol tests (issue 6): starts the real `amazing-proxy run` binary and
//! real or fake servers on loopback, reads the proxy's access log and metrics, and kills every
//! process it started when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on every test step that waits for something.
pub const STEP: Duration = Duration::from_secs(20);

/// A port free at the time of the call (bound on :0, read, released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind :0");
    l.local_addr().expect("local addr").port()
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard {
    pub name: &'static str,
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard { name, child }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The proxy under test.
pub struct Proxy {
    _child: ChildGuard,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts `amazing-proxy run --admin 127.0.0.1:0 --outbound off --proxy-mark 0` plus `args`
    /// (`--inbound 127.0.0.1:0` unless `args` name an inbound address) and waits for its
    /// `listening` line.
    pub fn start(args: &[&str]) -> Proxy {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amazing-proxy"));
        cmd.arg("run")
            .args(["--admin", "127.0.0.1:0", "--outbound", "off"])
            .args(["--proxy-mark", "0"]);
        if !args.contains(&"--inbound") {
            cmd.args(["--inbound", "127.0.0.1:0"]);
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = ChildGuard::spawn("amazing-proxy", &mut cmd);
        let out = child.child.stdout.take().expect("stdout");
        let err = child.child.stderr.take().expect("stderr");

        let stdout = Arc::new(Mutex::new(Vec::new()));
        let sink = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().expect("lock").push(line);
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("listening") && line.contains("inbound=") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().expect("lock").push(line);
            }
        });
        let line = rx
            .recv_timeout(STEP)
            .unwrap_or_else(|_| panic!("no `listening` line; stderr: {:?}", stderr.lock()));
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).expect("field") + name.len() + 1;
            let value = line[start..].split_whitespace().next().expect("value");
            value.parse().expect("address")
        };
        Proxy {
            inbound: field("inbound"),
            admin: field("admin"),
            _child: child,
            stdout,
            stderr,
        }
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lock").clone()
    }

    /// Access-log records written so far (JSON lines).
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (bounded) for an access-log record matching `pred`.
    pub async fn wait_log(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(r) = self.access_log().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no matching access-log record; have {:#?}",
                self.access_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /metrics` on the admin listener.
    pub async fn metrics(&self) -> String {
        let fetch = async {
            let mut s = tokio::net::TcpStream::connect(self.admin).await?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .await?;
            let mut body = String::new();
            s.read_to_string(&mut body).await?;
            Ok::<_, std::io::Error>(body)
        };
        tokio::time::timeout(STEP, fetch)
            .await
            .expect("metrics timed out")
            .expect("metrics")
    }

    /// Sum of the samples of `name` whose labels contain every one of `labels` (`key="value"`).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        sum_metric(&self.metrics().await, name, labels)
    }

    /// Waits (bounded) until `metric(name, labels)` reaches at least `min`; returns its value.
    pub async fn wait_metric(&self, name: &str, labels: &[&str], min: f64) -> f64 {
        let deadline = Instant::now() + STEP;
        loop {
            let text = self.metrics().await;
            let v = sum_metric(&text, name, labels);
            if v >= min {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} stayed at {v} < {min}; metrics:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether an executable is on PATH (or at an absolute path).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// A deterministic payload of `len` bytes that is not all one value.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}
