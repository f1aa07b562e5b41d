//! The admin listener (/live, /ready, /metrics, /shutdown) and the graceful drain.

use std::time::Duration;

use crate::support::http::*;
use crate::support::metrics::metric;
use crate::support::process::*;
use crate::support::raw::*;
use crate::support::{TEST_TIMEOUT, WAIT, bounded, eventually};
use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_answers_200() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let reply = proxy.admin_get("/live").await;
        assert_eq!(reply.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_answers_200_once_bound() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        eventually("/ready to answer 200", WAIT, || async {
            (proxy.admin_get("/ready").await.status == StatusCode::OK).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_app_with_app_ready_path() {
    bounded("test", TEST_TIMEOUT, async {
        let app = ReservedPort::new();
        let proxy = Proxy::start(app.addr, &["--app-ready-path", "/status/200"]).await;
        let down = proxy.admin_get("/ready").await;
        assert_eq!(
            down.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            down.text()
        );
        assert!(down.text().contains("/status/200"), "{}", down.text());

        let _app = app.listen();
        eventually("/ready to answer 200 once the app is up", WAIT, || async {
            (proxy.admin_get("/ready").await.status == StatusCode::OK).then_some(())
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_app_answers_an_error() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--app-ready-path", "/status/500"]).await;
        let reply = proxy.admin_get("/ready").await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_durations_bytes_connections_and_errors() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &["--response-timeout", "300ms"]).await;
        assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
        let post = send(
            proxy.inbound,
            full_request("POST", proxy.inbound, "/echo", "hello"),
        )
        .await;
        assert_eq!(post.status, StatusCode::OK);
        assert_eq!(proxy.get("/status/404").await.status, StatusCode::NOT_FOUND);
        assert_eq!(
            proxy.get("/slow?ms=3000").await.status,
            StatusCode::GATEWAY_TIMEOUT
        );

        let reply = proxy.admin_get("/metrics").await;
        assert_eq!(reply.status, StatusCode::OK);
        let text = reply.text();
        let value = |name: &str, labels: &[&str]| {
            metric(&text, name, labels)
                .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{text}"))
        };
        let inbound = "direction=\"inbound\"";
        let requests = "amazing_proxy_requests_total";
        assert_eq!(
            value(requests, &[inbound, "method=\"GET\"", "status=\"200\""]),
            1.0
        );
        assert_eq!(
            value(requests, &[inbound, "method=\"POST\"", "status=\"200\""]),
            1.0
        );
        assert_eq!(
            value(requests, &[inbound, "method=\"GET\"", "status=\"404\""]),
            1.0
        );
        assert_eq!(
            value(requests, &[inbound, "method=\"GET\"", "status=\"504\""]),
            1.0
        );
        assert_eq!(
            value(
                "amazing_proxy_request_duration_seconds_bucket",
                &[inbound, "le=\"+Inf\""]
            ),
            4.0
        );
        assert_eq!(
            value("amazing_proxy_request_duration_seconds_count", &[inbound]),
            4.0
        );
        assert!(value("amazing_proxy_request_duration_seconds_sum", &[inbound]) > 0.0);
        assert_eq!(
            value("amazing_proxy_request_body_bytes_total", &[inbound]),
            5.0
        );
        assert!(value("amazing_proxy_response_body_bytes_total", &[inbound]) > 0.0);
        value("amazing_proxy_open_connections", &[inbound]);
        assert_eq!(
            value(
                "amazing_proxy_errors_total",
                &[inbound, "kind=\"response_timeout\"", "fault=\"app\""]
            ),
            1.0
        );
        assert!(
            text.contains("# TYPE amazing_proxy_requests counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE amazing_proxy_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_takes_post_only() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let proxy = Proxy::start(app.addr, &[]).await;
        let reply = proxy.admin_get("/shutdown").await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            proxy.admin_get("/ready").await.status,
            StatusCode::OK,
            "still serving"
        );
        assert_eq!(
            proxy.admin_get("/nowhere").await.status,
            StatusCode::NOT_FOUND
        );
    })
    .await;
}

/// An idle HTTP/1.1 keep-alive connection that has served one request.
async fn idle_keep_alive(proxy: &Proxy) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.inbound).await.expect("connect");
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = raw_read_response(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    stream
}

/// Reads until EOF: the proxy closed the connection.
async fn closed_by_proxy(stream: &mut TcpStream) {
    bounded(
        "the proxy to close an idle connection",
        Duration::from_secs(15),
        async {
            let mut buf = [0u8; 1024];
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => {}
                Ok(n) => panic!(
                    "unexpected bytes on an idle connection: {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ),
            }
        },
    )
    .await;
}

const DRIP_CHUNKS: u64 = 20;

fn full_drip() -> String {
    (0..DRIP_CHUNKS).map(|i| format!("drip {i}\n")).collect()
}

/// Checks a whole drain, started by `trigger` while a drip response is in flight and an idle
/// keep-alive connection is open.
async fn drains_gracefully(trigger: impl AsyncFnOnce(&Proxy)) {
    let app = TestApp::start().await;
    let mut proxy =
        Proxy::start(app.addr, &["--drain-delay", "2s", "--drain-timeout", "10s"]).await;
    let mut idle = idle_keep_alive(&proxy).await;

    let mut drip_conn = H1Conn::<Empty<Bytes>>::connect(proxy.inbound).await;
    let drip = bounded(
        "drip response head",
        WAIT,
        drip_conn.request(get_request(
            proxy.inbound,
            &format!("/drip?chunks={DRIP_CHUNKS}&ms=150"),
        )),
    )
    .await;
    assert_eq!(drip.status(), StatusCode::OK);
    let mut drip_body = drip.into_body();
    let first = bounded("first drip chunk", WAIT, drip_body.frame())
        .await
        .expect("a first frame")
        .expect("first frame ok")
        .into_data()
        .expect("a data frame");

    trigger(&proxy).await;

    eventually("/ready to answer 503", WAIT, || async {
        (proxy.admin_get("/ready").await.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    let during = proxy.get("/echo?during=drain").await;
    assert_eq!(
        during.status,
        StatusCode::OK,
        "a new connection during the delay"
    );

    let rest = bounded(
        "the rest of the drip",
        Duration::from_secs(15),
        drip_body.collect(),
    )
    .await
    .expect("the in-flight body completes")
    .to_bytes();
    let mut whole = first.to_vec();
    whole.extend_from_slice(&rest);
    assert_eq!(String::from_utf8_lossy(&whole), full_drip());

    closed_by_proxy(&mut idle).await;
    let status = proxy.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        proxy.stderr()
    );

    // The access log was flushed at exit and has the in-flight request complete.
    let drip_record = proxy
        .json_records()
        .into_iter()
        .find(|r| {
            r["original_url"]
                .as_str()
                .is_some_and(|u| u.contains("/drip"))
        })
        .expect("a record for the drip request");
    assert_eq!(drip_record["status"], 200);
    assert_eq!(drip_record["response_bytes"], full_drip().len());
    assert!(drip_record.get("error").is_none(), "{drip_record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_gracefully_and_exits_0() {
    bounded(
        "test",
        TEST_TIMEOUT,
        drains_gracefully(async |proxy: &Proxy| {
            proxy.signal("TERM");
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_shutdown_drains_gracefully_and_exits_0() {
    bounded(
        "test",
        TEST_TIMEOUT,
        drains_gracefully(async |proxy: &Proxy| {
            let reply = proxy.admin_post("/shutdown").await;
            assert_eq!(reply.status, StatusCode::ACCEPTED);
        }),
    )
    .await;
}
