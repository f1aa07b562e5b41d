//! Traces against a collector that is not there or never answers: every request is still answered
//! at once, failed exports and the spans a full queue turns away are counted, and the trace context
//! the app receives is this proxy's span, a child of the caller's. (Spans decoded by a real OTLP
//! receiver across two pods: `tests/netns/traces.rs`.)

use crate::support::http::*;
use crate::support::metrics::metric;
use crate::support::process::*;
use crate::support::{TEST_TIMEOUT, bounded};
use http::{HeaderValue, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const SPANS: &str = "amazing_proxy_trace_spans_total";

/// A collector that takes connections and never reads or answers: every export waits its whole
/// timeout.
async fn silent_collector() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_spans_not_requests() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let (collector, _task) = silent_collector().await;
        let endpoint = format!("http://{collector}");
        let proxy = Proxy::start(
            app.addr,
            &[
                "--access-log",
                "off",
                "--otlp-endpoint",
                &endpoint,
                "--trace-sampling",
                "1",
            ],
        )
        .await;
        // The queue holds 2048 spans and the first export (up to 512) hangs for its 10 s: past
        // that, spans are turned away. Bounded in count, not in time.
        let mut sent = 0;
        let mut dropped = 0.0;
        while dropped == 0.0 && sent < 20_000 {
            let mut batch = Vec::new();
            for _ in 0..200 {
                batch.push(proxy.get("/echo"));
            }
            for reply in futures_util::future::join_all(batch).await {
                assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            }
            sent += 200;
            let text = proxy.metrics().await;
            dropped = metric(&text, SPANS, &["outcome=\"dropped\""]).unwrap_or(0.0);
        }
        assert!(dropped > 0.0, "{sent} requests and no span turned away");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_is_counted_as_failed_exports() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        // A port nothing listens on.
        let closed = ReservedPort::new();
        // By address over gRPC, by name (resolved through /etc/hosts) over HTTP.
        let by_ip = format!("http://{}", closed.addr);
        let by_name = format!("http://localhost:{}", closed.addr.port());
        for (protocol, endpoint) in [("grpc", by_ip), ("http/protobuf", by_name)] {
            let proxy = Proxy::start(
                app.addr,
                &[
                    "--otlp-endpoint",
                    &endpoint,
                    "--otlp-protocol",
                    protocol,
                    "--trace-sampling",
                    "1",
                ],
            )
            .await;
            for _ in 0..5 {
                assert_eq!(proxy.get("/echo").await.status, StatusCode::OK);
            }
            let failed = proxy.wait_metric(SPANS, &["outcome=\"failed\""], 5.0).await;
            assert_eq!(failed, 5.0, "{protocol}");
            // Written before the count, but read by a thread that may lag behind.
            proxy
                .wait_for_stderr(|e| e.contains("OTLP: export failed") && e.contains(&endpoint))
                .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_this_proxys_span_as_its_parent_on_both_paths() {
    bounded("test", TEST_TIMEOUT, async {
        let app = TestApp::start().await;
        let (collector, _task) = silent_collector().await;
        let endpoint = format!("http://{collector}");
        let proxy = Proxy::start(
            app.addr,
            &[
                "--access-log",
                "json",
                "--otlp-endpoint",
                &endpoint,
                "--trace-sampling",
                "0",
            ],
        )
        .await;
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        // HTTP/1.1 (the fast path) and HTTP/2 (the hyper path).
        let mut h1 = get_request(proxy.inbound, "/headers");
        h1.headers_mut()
            .insert("traceparent", HeaderValue::from_static(caller));
        h1.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("t-h1"));
        let h1 = send(proxy.inbound, h1).await;
        let h2 = http2_get(proxy.inbound, "/headers", caller, "t-h2").await;
        for (reply, id) in [(h1, "t-h1"), (h2, "t-h2")] {
            assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
            let seen = reply.json();
            let traceparent = echoed_header(&seen, "traceparent").join(",");
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!(parts.len(), 4, "{seen}");
            assert_eq!(
                parts[1], "0af7651916cd43dd8448eb211c80319c",
                "the caller's trace: {seen}"
            );
            assert_ne!(parts[2], "b7ad6b7169203331", "a span of its own: {seen}");
            assert_eq!(parts[3], "01", "the caller's decision: {seen}");
            // The access log names the same span.
            let record = proxy.json_record(id).await;
            assert_eq!(record["trace_id"], parts[1], "{record}");
            assert_eq!(record["span_id"], parts[2], "{record}");
        }
    })
    .await;
}

/// One HTTP/2 GET (prior knowledge) with a `traceparent` and a request id.
async fn http2_get(addr: std::net::SocketAddr, path: &str, traceparent: &str, id: &str) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    let request = http::Request::get(format!("http://pod{path}"))
        .header("traceparent", traceparent)
        .header("x-request-id", id)
        .body(Empty::<bytes::Bytes>::new())
        .expect("a request");
    let response = bounded(
        "an HTTP/2 response",
        crate::support::WAIT,
        sender.send_request(request),
    )
    .await
    .expect("a response");
    read_reply(response).await
}
