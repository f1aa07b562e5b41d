//! The live stream of exchanges (`GET /tap` on the admin listener) and `amazing-proxy tap`, its
//! client, against the binary: what a filter lets through, what the command prints, the refusals,
//! and a reader that stops reading, which loses lines (and is told) while every request is still
//! answered.

use std::process::Stdio;
use std::time::Duration;

use crate::support::http::*;
use crate::support::process::*;
use crate::support::{TEST_TIMEOUT, WAIT, bounded};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use serde_json::Value;

/// `GET /tap?query` on the admin listener: the response, its body unread.
async fn open_tap(proxy: &Proxy, query: &str) -> http::Response<Incoming> {
    let mut conn = H1Conn::<Empty<Bytes>>::connect(proxy.admin).await;
    let request = Request::get(format!("/tap?{query}"))
        .header("host", proxy.admin.to_string())
        .body(Empty::new())
        .expect("request");
    bounded("the /tap head", WAIT, conn.request(request)).await
}

/// The next `n` lines of a tap stream, parsed.
async fn lines(body: &mut Incoming, n: usize) -> Vec<Value> {
    let mut text = String::new();
    while text.matches('\n').count() < n {
        let frame = bounded("a line of /tap", WAIT, body.frame())
            .await
            .expect("the stream goes on")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_the_records_its_filter_passes_even_with_the_access_log_off() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--access-log", "off"]).await;
        let response = open_tap(&proxy, "status=4xx&method=GET").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "application/x-ndjson",
            "{response:?}"
        );
        let mut body = response.into_body();
        // The head came after the reader was registered: nothing below is missed.
        assert_eq!(proxy.get("/status/404").await.status, StatusCode::NOT_FOUND);
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        let post = send(
            proxy.inbound,
            full_request("POST", proxy.inbound, "/status/400", ""),
        );
        assert_eq!(post.await.status, StatusCode::BAD_REQUEST);
        assert_eq!(proxy.get("/status/418").await.status, 418);
        let got = lines(&mut body, 2).await;
        let statuses: Vec<u64> = got
            .iter()
            .map(|r| r["status"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(statuses, [404, 418], "{got:?}");
        for record in &got {
            assert_eq!(record["method"], "GET", "{record}");
            assert_eq!(record["direction"], "inbound", "{record}");
            assert!(record["original_url"].is_string(), "{record}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tap_command_prints_one_line_per_exchange() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let admin = proxy.admin.to_string();
        let mut tap = std::process::Command::new(bin())
            .args(["tap", "--admin", &admin, "--method", "POST", "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start amazing-proxy tap");
        // The command subscribes when it starts: POST until it has seen one and exited.
        let mut exited = None;
        for _ in 0..100 {
            let post = full_request("POST", proxy.inbound, "/echo?from=tap", "hi");
            assert_eq!(send(proxy.inbound, post).await.status, StatusCode::OK);
            assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(status) = tap.try_wait().expect("tap's exit status") {
                exited = Some(status);
                break;
            }
        }
        let Some(status) = exited else {
            let _ = tap.kill();
            panic!("tap did not see a POST and exit within 100 tries");
        };
        let output = tap.wait_with_output().expect("tap's output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            status.success(),
            "tap failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let printed: Vec<&str> = stdout.lines().collect();
        assert_eq!(printed.len(), 1, "{stdout}");
        let line = printed[0];
        assert!(line.contains(" in  POST "), "{line}");
        assert!(line.contains("/echo?from=tap 200 "), "{line}");
        assert!(line.contains("B/"), "bytes: {line}");
        assert!(
            !line.contains('\x1b'),
            "no colour when stdout is not a terminal: {line}"
        );

        // A filter the proxy refuses: the command says why and fails.
        let refused = tokio::task::spawn_blocking(move || {
            std::process::Command::new(bin())
                .args(["tap", "--admin", &admin, "--status", "500"])
                .output()
        });
        let refused = bounded("tap with a bad filter", WAIT, refused)
            .await
            .expect("a blocking task")
            .expect("run tap");
        assert!(!refused.status.success());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("the proxy refused /tap (400)") && stderr.contains("status"),
            "{stderr}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_refuses_bad_filters_other_methods_and_a_ninth_reader() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let bad = proxy.admin_get("/tap?colour=red").await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert!(
            bad.text().contains("unknown filter \"colour\""),
            "{}",
            bad.text()
        );
        let post = send(proxy.admin, full_request("POST", proxy.admin, "/tap", "")).await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
        let mut held = Vec::new();
        for _ in 0..8 {
            let response = open_tap(&proxy, "").await;
            assert_eq!(response.status(), StatusCode::OK);
            held.push(response);
        }
        let ninth = open_tap(&proxy, "").await;
        assert_eq!(ninth.status(), StatusCode::SERVICE_UNAVAILABLE);
        drop(held);
        // Readers that left make room, noticed when they close (no record is written to them).
        let mut reopened = None;
        for _ in 0..50 {
            let response = open_tap(&proxy, "").await;
            if response.status() == StatusCode::OK {
                reopened = Some(response);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(reopened.is_some(), "room again once the readers left");
    })
    .await;
}

/// A reader that stops reading never slows the data plane: every request is answered while its
/// queue overflows, and when it reads again it is told how many lines it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_reading_loses_lines_and_is_told_how_many() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--access-log", "off"]).await;
        let response = open_tap(&proxy, "").await;
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        // More lines than the reader's queue and both sockets' buffers hold.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let inbound = proxy.inbound;
                tokio::spawn(async move {
                    let mut conn = H1Conn::<Empty<Bytes>>::connect(inbound).await;
                    let path = format!("/echo?{}", "q".repeat(2000));
                    for _ in 0..800 {
                        let reply = conn.send(get_request(inbound, &path)).await;
                        assert_eq!(reply.status, StatusCode::OK);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a client task");
        }
        let mut dropped = None;
        let mut seen = 0u64;
        let mut pending = String::new();
        while dropped.is_none() && seen < 6_400 {
            let frame = bounded("the stream", WAIT, body.frame())
                .await
                .expect("the stream goes on")
                .expect("a frame");
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.push_str(&String::from_utf8_lossy(&data));
            // Frames need not end at a line's end.
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let value: Value = serde_json::from_str(&line).expect("a JSON line");
                match value.get("dropped").and_then(Value::as_u64) {
                    Some(n) => dropped = Some(n),
                    None => seen += 1,
                }
            }
        }
        let dropped = dropped.expect("a {\"dropped\":N} line");
        assert!(dropped > 0);
        assert!(seen + dropped <= 6_400, "{seen} seen, {dropped} dropped");
    })
    .await;
}
