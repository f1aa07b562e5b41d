//! The tutorial's three requests through the proxy against a real httpbin (gunicorn on
//! 127.0.0.1), with the access-log record of each in both formats.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::http::{ReservedPort, get_request, send};
use crate::support::process::{Background, Proxy, run};
use crate::support::tools::{seed_records, text, venv};
use crate::support::{WAIT, bounded, eventually, skip};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;

/// httpbin under gunicorn (from the test venv) on a free 127.0.0.1 port; the whole process group
/// (master and workers) is killed on drop.
/// Fields drop in order: gunicorn is killed before its port is released.
struct Httpbin {
    _process: Background,
    port: ReservedPort,
}

impl Httpbin {
    /// `Err` with the reason when the venv holding gunicorn and httpbin is missing.
    async fn start() -> Result<Httpbin, String> {
        let gunicorn = venv()?.join("bin/gunicorn");
        // gunicorn 23+ opens a control socket in $HOME unless told not to; older ones lack the flag.
        let help = run(Command::new(&gunicorn).arg("--help"));
        let no_control = text(&help.stdout).contains("--no-control-socket");
        let port = ReservedPort::new();
        let mut cmd = Command::new(&gunicorn);
        cmd.args(["-b", &port.addr.to_string(), "-w", "2", "httpbin:app"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if no_control {
            cmd.arg("--no-control-socket");
        }
        let mut process = Background::spawn(&mut cmd);
        assert!(
            up(&mut process, port.addr).await,
            "httpbin did not start under gunicorn ({})",
            gunicorn.display()
        );
        Ok(Httpbin {
            _process: process,
            port,
        })
    }
}

/// Whether httpbin answers `GET /get` with 200 within 30 s (false when gunicorn exited).
async fn up(process: &mut Background, addr: SocketAddr) -> bool {
    eventually("httpbin to answer", Duration::from_secs(30), || {
        let exited = !process.is_running();
        async move {
            if exited {
                return Some(false);
            }
            let attempt = async {
                let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(conn);
                let response = sender.send_request(get_request(addr, "/get")).await.ok()?;
                (response.status() == StatusCode::OK).then_some(true)
            };
            tokio::time::timeout(Duration::from_secs(2), attempt)
                .await
                .ok()
                .flatten()
        }
    })
    .await
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
        let httpbin = match Httpbin::start().await {
            Ok(httpbin) => httpbin,
            Err(why) => return skip("tutorial_requests_with_the_seed_access_log", &why),
        };
        let proxy = Proxy::start(httpbin.port.addr, &["--access-log", "seed"]).await;
        let sizes = tutorial_requests(&proxy, "seed").await;

        let text = proxy
            .wait_for_log(|t| seed_records(t).len() == 3 && t.ends_with("\n\n"), WAIT)
            .await;
        let blocks = seed_records(&text);
        assert_eq!(blocks.len(), 3, "{text}");
        for ((case, block), size) in CASES.iter().zip(&blocks).zip(sizes) {
            assert_eq!(block.len(), 6, "{text}");
            assert_eq!(
                block[0],
                format!("Original URL: http://{}{}", proxy.inbound, case.path)
            );
            assert_eq!(
                block[1],
                format!("Proxy URL: http://{}{}", httpbin.port.addr, case.path)
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
        let httpbin = match Httpbin::start().await {
            Ok(httpbin) => httpbin,
            Err(why) => return skip("tutorial_requests_with_the_json_access_log", &why),
        };
        let proxy = Proxy::start(httpbin.port.addr, &["--access-log", "json"]).await;
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
                format!("http://{}{}", httpbin.port.addr, case.path)
            );
            assert_eq!(record["status"], case.status);
            assert_eq!(record["request_bytes"], case.body.len());
            assert_eq!(record["response_bytes"], size);
            assert_eq!(record["upstream"], httpbin.port.addr.to_string());
            assert!(record.get("error").is_none(), "{record}");
        }
    })
    .await;
}
