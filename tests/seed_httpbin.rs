//! The tutorial's three requests through the proxy against a real httpbin (gunicorn on
//! 127.0.0.1), with the access-log record of each in both formats.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

const NOT_FOUND: &str =
    "gunicorn+httpbin not found: run scripts/test.sh, which installs them into target/venv";

/// `$AMAZING_PROXY_TEST_VENV/bin/gunicorn`, else `target/venv/bin/gunicorn`, else `gunicorn` on
/// PATH.
fn gunicorn() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(venv) = std::env::var_os("AMAZING_PROXY_TEST_VENV") {
        candidates.push(PathBuf::from(venv).join("bin/gunicorn"));
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/gunicorn"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("gunicorn")));
    }
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .unwrap_or_else(|| panic!("{NOT_FOUND}"))
}

/// httpbin under gunicorn on a free 127.0.0.1 port, in a process group of its own; the whole group
/// (master and workers) is killed and the master reaped on drop.
struct Httpbin {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Httpbin {
    fn drop(&mut self) {
        // Killing only the master would orphan its workers.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Httpbin {
    async fn start() -> Httpbin {
        let gunicorn = gunicorn();
        // gunicorn 23+ opens a control socket in $HOME unless told not to; older ones lack the flag.
        let help = Command::new(&gunicorn)
            .arg("--help")
            .output()
            .unwrap_or_else(|e| panic!("{NOT_FOUND} ({}: {e})", gunicorn.display()));
        let no_control = String::from_utf8_lossy(&help.stdout).contains("--no-control-socket");
        // The port is free when chosen; if another process takes it first, gunicorn exits and
        // we try another.
        for _ in 0..3 {
            let addr = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("pick a free port");
            let mut cmd = Command::new(&gunicorn);
            cmd.args(["-b", &addr.to_string(), "-w", "2", "httpbin:app"])
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if no_control {
                cmd.arg("--no-control-socket");
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("{NOT_FOUND} ({}: {e})", gunicorn.display()));
            let mut bin = Httpbin { child, addr };
            if bin.wait_until_up().await {
                return bin;
            }
        }
        panic!(
            "httpbin did not start under gunicorn ({})",
            gunicorn.display()
        );
    }

    /// Whether httpbin answers within 30 s (false when gunicorn exited).
    async fn wait_until_up(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_exited)) = self.child.try_wait() {
                return false;
            }
            let attempt = async {
                let stream = tokio::net::TcpStream::connect(self.addr).await.ok()?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(conn);
                let response = sender
                    .send_request(get_request(self.addr, "/get"))
                    .await
                    .ok()?;
                Some(response.status())
            };
            let answered = tokio::time::timeout(Duration::from_secs(2), attempt).await;
            if let Ok(Some(StatusCode::OK)) = answered {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("httpbin on {} did not answer within 30 s", self.addr);
    }
}

/// One of the tutorial's requests and what it must produce.
struct Case {
    method: &'static str,
    path: &'static str,
    body: &'static str,
    status: u16,
}

const CASES: [Case; 3] = [
    Case {
        method: "GET",
        path: "/get?query=param",
        body: "",
        status: 200,
    },
    Case {
        method: "POST",
        path: "/post",
        body: "body=parameters",
        status: 200,
    },
    Case {
        method: "GET",
        path: "/status/429",
        body: "",
        status: 429,
    },
];

/// Sends the three requests through `proxy`; checks the replies; returns their body sizes.
async fn tutorial_requests(proxy: &Proxy, tag: &str) -> Vec<usize> {
    let mut sizes = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let mut req = Request::builder()
            .method(case.method)
            .uri(case.path)
            .header("host", proxy.inbound.to_string())
            .header("x-request-id", format!("{tag}-{i}"));
        if !case.body.is_empty() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let req = req
            .body(Full::new(Bytes::from_static(case.body.as_bytes())))
            .expect("tutorial request");
        let reply = send(proxy.inbound, req).await;
        assert_eq!(
            reply.status.as_u16(),
            case.status,
            "{} {}",
            case.method,
            case.path
        );
        assert_eq!(reply.header("server"), Some("amazing-proxy"));
        match case.path {
            "/get?query=param" => assert_eq!(reply.json()["args"]["query"], "param"),
            "/post" => assert_eq!(reply.json()["form"]["body"], "parameters"),
            _ => {}
        }
        sizes.push(reply.body.len());
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_requests_with_the_seed_access_log() {
    bounded("test", Duration::from_secs(90), async {
        let httpbin = Httpbin::start().await;
        let proxy = Proxy::start(httpbin.addr, &["--access-log", "seed"]).await;
        let sizes = tutorial_requests(&proxy, "seed").await;

        let text = proxy
            .wait_for_log(|t| seed_blocks(t).len() == 3 && t.ends_with("\n\n"), WAIT)
            .await;
        let blocks = seed_blocks(&text);
        assert_eq!(blocks.len(), 3, "{text}");
        for ((case, block), size) in CASES.iter().zip(&blocks).zip(sizes) {
            assert_eq!(block.len(), 6, "{text}");
            assert_eq!(
                block[0],
                format!("Original URL: http://{}{}", proxy.inbound, case.path)
            );
            assert_eq!(
                block[1],
                format!("Proxy URL: http://{}{}", httpbin.addr, case.path)
            );
            assert!(block[2].starts_with("Request Duration: "), "{text}");
            assert_eq!(block[3], format!("Request Size: {}", case.body.len()));
            assert_eq!(block[4], format!("Response Size: {size}"));
            assert_eq!(block[5], format!("Response Status: {}", case.status));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tutorial_requests_with_the_json_access_log() {
    bounded("test", Duration::from_secs(90), async {
        let httpbin = Httpbin::start().await;
        let proxy = Proxy::start(httpbin.addr, &["--access-log", "json"]).await;
        let sizes = tutorial_requests(&proxy, "json").await;

        for (i, (case, size)) in CASES.iter().zip(sizes).enumerate() {
            let record = proxy.json_record(&format!("json-{i}")).await;
            assert_eq!(record["method"], case.method);
            assert_eq!(record["protocol"], "HTTP/1.1");
            assert_eq!(
                record["original_url"],
                format!("http://{}{}", proxy.inbound, case.path)
            );
            assert_eq!(
                record["proxy_url"],
                format!("http://{}{}", httpbin.addr, case.path)
            );
            assert_eq!(record["status"], case.status);
            assert_eq!(record["request_bytes"], case.body.len());
            assert_eq!(record["response_bytes"], size);
            assert_eq!(record["upstream"], httpbin.addr.to_string());
            assert!(record.get("error").is_none(), "{record}");
        }
    })
    .await;
}
